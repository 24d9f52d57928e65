/*
 * The KV manager (worker/kvcache.c) on the real CPU kernels with random K/V, no model:
 * every method against a scalar reference attention over the token set it should attend,
 * the clusterkv budget, window clustering and cache accounting, Quest's page choice, and the
 * option and capacity errors.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "block_store.h"
#include "ckv_half.h"
#include "kvcache.h"

/* xorshift64* */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static float rng_normal(uint64_t *s)
{
    float u = (float)(rng_next(s) >> 40) * (1.0f / 16777216.0f) + 1e-7f;
    float v = (float)(rng_next(s) >> 40) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

/* A sequence under test with its host copy of every K/V row (rounded as the cache stores
 * them) so the reference attends exactly the stored values. */
struct fx {
    ckv_ctx_t *ctx;
    struct ckv_block_store *store;
    ckv_kvcache_t *kv;
    struct ckv_kv_geom g;
    struct ckv_kv_opts o;
    float **k, **v; /* per layer (max_ctx, n_kv_heads, head_dim) rounded */
    uint64_t rng;
};

static void fx_open(struct fx *f, const struct ckv_kv_geom *g, const struct ckv_kv_opts *o)
{
    memset(f, 0, sizeof(*f));
    f->g = *g;
    f->o = *o;
    f->rng = 0x1234567ull + (uint64_t)o->method * 77 + (uint64_t)o->budget;
    struct ckv_ctx_opts co = {.backend = CKV_BACKEND_CPU, .n_threads = 1};
    cr_assert_eq(ckv_ctx_new(&co, &f->ctx), 0);
    cr_assert_eq(ckv_block_store_mem_new(ckv_block_bytes(g->head_dim, o->dtype), 0, &f->store), 0);
    char err[256] = "";
    int rc = ckv_kvcache_new(f->ctx, g, o, f->store, 42, &f->kv, err, sizeof(err));
    cr_assert_eq(rc, 0, "ckv_kvcache_new: %d %s", rc, err);
    f->k = calloc((size_t)g->n_layers, sizeof(float *));
    f->v = calloc((size_t)g->n_layers, sizeof(float *));
    size_t n = (size_t)g->max_ctx * g->n_kv_heads * g->head_dim;
    for (int l = 0; l < g->n_layers; l++) {
        f->k[l] = calloc(n, sizeof(float));
        f->v[l] = calloc(n, sizeof(float));
    }
}

static void fx_close(struct fx *f)
{
    ckv_kvcache_free(&f->kv);
    cr_assert_null(f->kv);
    ckv_block_store_destroy(&f->store);
    ckv_ctx_destroy(&f->ctx);
    for (int l = 0; l < f->g.n_layers; l++) {
        free(f->k[l]);
        free(f->v[l]);
    }
    free(f->k);
    free(f->v);
}

static float round_kv(const struct fx *f, float x)
{
    return f->o.dtype == CKV_DTYPE_F16 ? ckv_half_to_f32(ckv_half_from_f32(x)) : x;
}

/* Random K/V for n tokens of one layer; keys drawn around a few directions so that k-means
 * has structure to find. */
static void fx_make_kv(struct fx *f, int layer, int pos, int n, float *k, float *v)
{
    int row = f->g.n_kv_heads * f->g.head_dim;
    for (int t = 0; t < n; t++)
        for (int i = 0; i < row; i++) {
            float c = (float)(((pos + t) * 7 % 5) - 2) * 0.5f * (float)((i % 3) - 1);
            k[t * row + i] = c + rng_normal(&f->rng);
            v[t * row + i] = rng_normal(&f->rng);
            f->k[layer][(size_t)(pos + t) * row + i] = round_kv(f, k[t * row + i]);
            f->v[layer][(size_t)(pos + t) * row + i] = round_kv(f, v[t * row + i]);
        }
}

/* Reference attention of query head qh over the listed positions (double precision). */
static void ref_attn(const struct fx *f, int layer, int qh, const float *q, const int *pos, int n,
                     float *out)
{
    int d = f->g.head_dim, G = f->g.n_q_heads / f->g.n_kv_heads, h = qh / G;
    int row = f->g.n_kv_heads * d;
    double m = -INFINITY, s = 0, *acc = calloc((size_t)d, sizeof(double));
    double *sc = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; i++) {
        const float *kr = f->k[layer] + (size_t)pos[i] * row + (size_t)h * d;
        double dot = 0;
        for (int j = 0; j < d; j++)
            dot += (double)q[j] * kr[j];
        sc[i] = dot / sqrt((double)d);
        if (sc[i] > m)
            m = sc[i];
    }
    for (int i = 0; i < n; i++) {
        double w = exp(sc[i] - m);
        s += w;
        const float *vr = f->v[layer] + (size_t)pos[i] * row + (size_t)h * d;
        for (int j = 0; j < d; j++)
            acc[j] += w * vr[j];
    }
    for (int j = 0; j < d; j++)
        out[j] = n > 0 ? (float)(acc[j] / s) : 0.0f;
    free(acc);
    free(sc);
}

/* Full-attention reference of all q heads over positions [0, n). */
static void ref_full(const struct fx *f, int layer, const float *q, int n, float *out)
{
    int *pos = malloc(sizeof(int) * (size_t)n);
    for (int i = 0; i < n; i++)
        pos[i] = i;
    for (int qh = 0; qh < f->g.n_q_heads; qh++)
        ref_attn(f, layer, qh, q + (size_t)qh * f->g.head_dim, pos, n,
                 out + (size_t)qh * f->g.head_dim);
    free(pos);
}

static void rand_q(struct fx *f, float *q)
{
    for (int i = 0; i < f->g.n_q_heads * f->g.head_dim; i++)
        q[i] = rng_normal(&f->rng) * 0.5f;
}

/* max |a - b| / max(1, max |b|) */
static float rel_err(const float *a, const float *b, int n)
{
    float m = 0, mb = 1;
    for (int i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m))
            m = isnan(d) ? INFINITY : d;
        if (fabsf(b[i]) > mb)
            mb = fabsf(b[i]);
    }
    return m / mb;
}

/* Prefills n tokens in chunks of `chunk`, checking every prefill output against the causal
 * reference, then ends the prompt. */
static void fx_prefill(struct fx *f, int n, int chunk)
{
    int row = f->g.n_kv_heads * f->g.head_dim, qrow = f->g.n_q_heads * f->g.head_dim;
    float *k = malloc(sizeof(float) * (size_t)chunk * row);
    float *v = malloc(sizeof(float) * (size_t)chunk * row);
    float *q = malloc(sizeof(float) * (size_t)chunk * qrow);
    float *out = malloc(sizeof(float) * (size_t)chunk * qrow);
    float *ref = malloc(sizeof(float) * (size_t)qrow);
    for (int p = 0; p < n; p += chunk) {
        int m = n - p < chunk ? n - p : chunk;
        for (int l = 0; l < f->g.n_layers; l++) {
            fx_make_kv(f, l, p, m, k, v);
            cr_assert_eq(ckv_kvcache_append(f->kv, l, k, v, m), 0);
            for (int t = 0; t < m; t++)
                rand_q(f, q + (size_t)t * qrow);
            cr_assert_eq(ckv_kvcache_attn_prefill(f->kv, l, q, m, out), 0);
            /* check the chunk's first and last token */
            for (int t = 0; t < m; t += (m > 1 ? m - 1 : 1)) {
                ref_full(f, l, q + (size_t)t * qrow, p + t + 1, ref);
                float e = rel_err(out + (size_t)t * qrow, ref, qrow);
                cr_assert_lt(e, 2e-3f, "prefill layer %d pos %d: error %g", l, p + t, e);
            }
        }
        cr_assert_eq(ckv_kvcache_n_tokens(f->kv), p + m);
    }
    cr_assert_eq(ckv_kvcache_end_prefill(f->kv), 0);
    free(k);
    free(v);
    free(q);
    free(out);
    free(ref);
}

/* One decode step: appends a token to every layer, decodes it with q; out/ref per layer
 * receive the method's output and the full-attention reference when not NULL. Returns the
 * largest relative error against full attention over all layers. */
static float fx_step(struct fx *f, float *q_out)
{
    int row = f->g.n_kv_heads * f->g.head_dim, qrow = f->g.n_q_heads * f->g.head_dim;
    float k[row], v[row], q[qrow], out[qrow], ref[qrow];
    float worst = 0;
    int pos = ckv_kvcache_n_tokens(f->kv);
    for (int l = 0; l < f->g.n_layers; l++) {
        fx_make_kv(f, l, pos, 1, k, v);
        cr_assert_eq(ckv_kvcache_append(f->kv, l, k, v, 1), 0);
        rand_q(f, q);
        int rc = ckv_kvcache_attn_decode(f->kv, l, q, out);
        cr_assert_eq(rc, 0, "attn_decode layer %d: %d", l, rc);
        ref_full(f, l, q, pos + 1, ref);
        float e = rel_err(out, ref, qrow);
        if (e > worst)
            worst = e;
        if (q_out)
            memcpy(q_out + (size_t)l * qrow, q, sizeof(q));
    }
    cr_assert_eq(ckv_kvcache_end_step(f->kv), 0);
    return worst;
}

static const struct ckv_kv_geom geom_small = {
    .n_layers = 3, .n_q_heads = 4, .n_kv_heads = 2, .head_dim = 32, .max_ctx = 1024};

Test(kvcache, full_matches_reference)
{
    struct ckv_kv_opts o;
    ckv_kv_opts_default(&o);
    o.method = CKV_KV_FULL;
    struct fx f;
    fx_open(&f, &geom_small, &o);
    fx_prefill(&f, 200, 64);
    for (int s = 0; s < 20; s++) {
        float e = fx_step(&f, NULL);
        cr_assert_lt(e, 2e-3f, "step %d: error %g", s, e);
    }
    struct ckv_kv_stats st;
    ckv_kvcache_stats(f.kv, &st);
    cr_assert_eq(st.decode_attn_calls, 20 * 3);
    fx_close(&f);
}

Test(kvcache, full_f32_matches_reference)
{
    struct ckv_kv_opts o;
    ckv_kv_opts_default(&o);
    o.method = CKV_KV_FULL;
    o.dtype = CKV_DTYPE_F32;
    struct fx f;
    fx_open(&f, &geom_small, &o);
    fx_prefill(&f, 100, 33);
    for (int s = 0; s < 5; s++)
        cr_assert_lt(fx_step(&f, NULL), 1e-4f);
    fx_close(&f);
}

Test(kvcache, max_ctx_is_enospc)
{
    struct ckv_kv_geom g = geom_small;
    g.max_ctx = 40;
    struct ckv_kv_opts o;
    ckv_kv_opts_default(&o);
    o.method = CKV_KV_FULL;
    struct fx f;
    fx_open(&f, &g, &o);
    fx_prefill(&f, 39, 16);
    fx_step(&f, NULL);
    int row = g.n_kv_heads * g.head_dim;
    float k[row], v[row];
    memset(k, 0, sizeof(k));
    memset(v, 0, sizeof(v));
    cr_assert_eq(ckv_kvcache_append(f.kv, 0, k, v, 1), -ENOSPC);
    cr_assert_eq(ckv_kvcache_n_tokens(f.kv), 40);
    fx_close(&f);
}

Test(kvcache, names_parse)
{
    for (int m = 0; m < 4; m++) {
        enum ckv_kv_method out;
        cr_assert_eq(ckv_kv_method_parse(ckv_kv_method_name((enum ckv_kv_method)m), &out), 0);
        cr_assert_eq((int)out, m);
    }
    for (int m = 0; m < 3; m++) {
        enum ckv_select_mode out;
        cr_assert_eq(ckv_select_mode_parse(ckv_select_mode_name((enum ckv_select_mode)m), &out), 0);
        cr_assert_eq((int)out, m);
    }
    enum ckv_kv_method m;
    enum ckv_select_mode sm;
    cr_assert_eq(ckv_kv_method_parse("h2o", &m), -EINVAL);
    cr_assert_eq(ckv_select_mode_parse("kvhead", &sm), -EINVAL);
    cr_assert_str_eq(ckv_kv_method_name(CKV_KV_QUEST), "quest");
    cr_assert_str_eq(ckv_select_mode_name(CKV_SELECT_KVHEAD_SUM), "kvhead-sum");
}

Test(kvcache, bad_options_are_einval)
{
    struct ckv_kv_opts d;
    ckv_kv_opts_default(&d);
    char err[256];
    cr_assert_eq(ckv_kv_opts_check(&d, err, sizeof(err)), 0);
    cr_assert_eq(d.method, CKV_KV_CLUSTERKV);
    cr_assert_eq(d.select_mode, CKV_SELECT_KVHEAD_SUM);
    cr_assert_eq(d.dtype, CKV_DTYPE_F16);
    struct ckv_kv_opts o;
#define BAD(field, value, word)                                                                    \
    do {                                                                                           \
        o = d;                                                                                     \
        o.field = value;                                                                           \
        err[0] = 0;                                                                                \
        cr_assert_eq(ckv_kv_opts_check(&o, err, sizeof(err)), -EINVAL, #field);                    \
        cr_assert(strstr(err, word), "message for %s: '%s'", #field, err);                         \
    } while (0)
    BAD(budget, 0, "budget");
    BAD(sinks, -1, "sinks");
    BAD(window, 0, "window");
    BAD(tokens_per_cluster, 0, "tokens_per_cluster");
    BAD(window_clusters, 0, "window_clusters");
    BAD(window_clusters, 321, "window_clusters");
    BAD(kmeans_iters, 0, "kmeans_iters");
    BAD(full_layers, -1, "full_layers");
    BAD(select_mode, (enum ckv_select_mode)9, "select_mode");
    BAD(dtype, (enum ckv_dtype)7, "dtype");
    BAD(method, (enum ckv_kv_method)5, "method");
    BAD(cache_blocks, -2, "cache_blocks");
#undef BAD
    /* and ckv_kvcache_new refuses them, as well as clusterkv without a store */
    struct ckv_ctx_opts co = {.backend = CKV_BACKEND_CPU, .n_threads = 1};
    ckv_ctx_t *ctx = NULL;
    cr_assert_eq(ckv_ctx_new(&co, &ctx), 0);
    ckv_kvcache_t *kv = (ckv_kvcache_t *)1;
    o = d;
    o.budget = -3;
    cr_assert_eq(ckv_kvcache_new(ctx, &geom_small, &o, NULL, 1, &kv, err, sizeof(err)), -EINVAL);
    cr_assert_null(kv);
    cr_assert(strstr(err, "budget"));
    cr_assert_eq(ckv_kvcache_new(ctx, &geom_small, &d, NULL, 1, &kv, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "store"), "%s", err);
    struct ckv_kv_geom g = geom_small;
    g.n_q_heads = 3;
    o = d;
    o.method = CKV_KV_FULL;
    cr_assert_eq(ckv_kvcache_new(ctx, &g, &o, NULL, 1, &kv, err, sizeof(err)), -EINVAL);
    ckv_ctx_destroy(&ctx);
}
