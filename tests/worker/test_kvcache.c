/*
 * The KV manager (worker/kvcache.c) on the real CPU kernels with random K/V, no model:
 * every method against a scalar reference attention over the token set it should attend,
 * the clusterkv budget, window clustering and cache accounting, Quest's page choice, and the
 * option and capacity errors.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
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
    const char *thr = getenv("CKV_TEST_THREADS");
    struct ckv_ctx_opts co = {.backend = CKV_BACKEND_CPU, .n_threads = thr ? atoi(thr) : 1};
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

/* One decode step: appends a token to every layer and decodes it with a random query (or
 * q_in's, per layer, when not NULL). q_out / out (n_layers, n_q_heads, head_dim) receive the
 * queries and the method's outputs when not NULL. Returns the largest relative error against
 * full attention over the layers. */
static float fx_step_q(struct fx *f, const float *q_in, float *q_out, float *o_out)
{
    int row = f->g.n_kv_heads * f->g.head_dim, qrow = f->g.n_q_heads * f->g.head_dim;
    float k[row], v[row], q[qrow], out[qrow], ref[qrow];
    float worst = 0;
    int pos = ckv_kvcache_n_tokens(f->kv);
    for (int l = 0; l < f->g.n_layers; l++) {
        fx_make_kv(f, l, pos, 1, k, v);
        cr_assert_eq(ckv_kvcache_append(f->kv, l, k, v, 1), 0);
        if (q_in)
            memcpy(q, q_in + (size_t)l * qrow, sizeof(q));
        else
            rand_q(f, q);
        int rc = ckv_kvcache_attn_decode(f->kv, l, q, out);
        cr_assert_eq(rc, 0, "attn_decode layer %d: %d", l, rc);
        ref_full(f, l, q, pos + 1, ref);
        float e = rel_err(out, ref, qrow);
        if (e > worst)
            worst = e;
        if (q_out)
            memcpy(q_out + (size_t)l * qrow, q, sizeof(q));
        if (o_out)
            memcpy(o_out + (size_t)l * qrow, out, sizeof(out));
    }
    cr_assert_eq(ckv_kvcache_end_step(f->kv), 0);
    return worst;
}

static float fx_step(struct fx *f, float *q_out)
{
    return fx_step_q(f, NULL, q_out, NULL);
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

static const struct ckv_kv_geom geom_ckv = {
    .n_layers = 4, .n_q_heads = 4, .n_kv_heads = 2, .head_dim = 32, .max_ctx = 2048};

static struct ckv_kv_opts opts_of(enum ckv_kv_method m, int budget)
{
    struct ckv_kv_opts o;
    ckv_kv_opts_default(&o);
    o.method = m;
    o.budget = budget;
    o.window = 32;
    o.window_clusters = 4;
    o.tokens_per_cluster = 20;
    return o;
}

/* With a budget above the context every method is full attention (to f16 rounding): for
 * clusterkv through the prompt's clusters, the window and, after window clustering, the
 * windows' clusters, each selection mode. */
static void check_large_budget(enum ckv_kv_method m, enum ckv_select_mode mode, int cache_blocks)
{
    struct ckv_kv_opts o = opts_of(m, 4096);
    o.select_mode = mode;
    o.cache_blocks = cache_blocks;
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    fx_prefill(&f, 300, 128);
    for (int s = 0; s < 70; s++) {
        float e = fx_step(&f, NULL);
        cr_assert_lt(e, 2e-3f, "%s mode %d step %d: error %g", ckv_kv_method_name(m), (int)mode, s,
                     e);
    }
    struct ckv_kv_stats st;
    ckv_kvcache_stats(f.kv, &st);
    cr_assert_eq(st.decode_attn_calls, 70 * 4);
    if (m == CKV_KV_CLUSTERKV) {
        /* 2 sparse layers x 2 heads: the prompt's clusters (<= 14 each, k-means may drop
         * empty ones) and two windows of 4 (steps 15 and 47) */
        cr_assert_geq(st.clusters_made, 2 * 2 * (10 + 2 * 4), "%llu",
                      (unsigned long long)st.clusters_made);
        cr_assert_leq(st.clusters_made, 2 * 2 * (14 + 2 * 4));
        /* every head's clusters fit the budget: full attention on the contiguous cache, the
         * store is written but never read */
        cr_assert_eq(st.cache_misses + st.cache_hits, 0);
        struct ckv_block_store_mem_stats ms;
        cr_assert_eq(ckv_block_store_mem_stats(f.store, &ms), 0);
        cr_assert_eq(ms.clusters, st.clusters_made);
        /* one put per layer: after prefill and at each window */
        cr_assert_eq(ms.puts, 2 * 3);
        cr_assert_eq(ms.gets, 0);
        printf("clusterkv mode %d cache %d: made %llu hits %llu misses %llu gets %llu\n", (int)mode,
               cache_blocks, (unsigned long long)st.clusters_made,
               (unsigned long long)st.cache_hits, (unsigned long long)st.cache_misses,
               (unsigned long long)ms.gets);
    }
    fx_close(&f);
}

Test(kvcache, clusterkv_large_budget_is_full)
{
    check_large_budget(CKV_KV_CLUSTERKV, CKV_SELECT_KVHEAD_SUM, 0);
    check_large_budget(CKV_KV_CLUSTERKV, CKV_SELECT_KVHEAD_MAX, 0);
    check_large_budget(CKV_KV_CLUSTERKV, CKV_SELECT_PER_QHEAD, 0);
}

Test(kvcache, quest_streaming_large_budget_is_full)
{
    check_large_budget(CKV_KV_QUEST, CKV_SELECT_KVHEAD_SUM, 0);
    check_large_budget(CKV_KV_QUEST, CKV_SELECT_PER_QHEAD, 0);
    check_large_budget(CKV_KV_STREAMING, CKV_SELECT_KVHEAD_SUM, 0);
}

/* clusterkv with a small budget attends exactly sinks + min(budget, clustered) + window
 * tokens per selection unit in the sparse layers, everything in the full ones. */
static void check_small_budget(enum ckv_select_mode mode)
{
    struct ckv_kv_opts o = opts_of(CKV_KV_CLUSTERKV, 64);
    o.select_mode = mode;
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    fx_prefill(&f, 300, 100);
    int units = mode == CKV_SELECT_PER_QHEAD ? 4 : 2;
    /* after the prompt: 16 sinks, window of 32 / 2 = 16 tokens, 268 clustered */
    int n = 300, nwin = 16, clustered = 268;
    struct ckv_kv_stats st0, st1;
    float worst = 0;
    for (int s = 0; s < 60; s++) {
        ckv_kvcache_stats(f.kv, &st0);
        float e = fx_step(&f, NULL);
        worst = e > worst ? e : worst;
        ckv_kvcache_stats(f.kv, &st1);
        n++;
        nwin++;
        uint64_t want = 2 * (uint64_t)units * n +
                        2 * (uint64_t)units * (16 + (clustered < 64 ? clustered : 64) + nwin);
        cr_assert_eq(st1.attended_tokens - st0.attended_tokens, want, "step %d: %llu, want %llu", s,
                     (unsigned long long)(st1.attended_tokens - st0.attended_tokens),
                     (unsigned long long)want);
        cr_assert_geq(st1.clusters_selected - st0.clusters_selected, 2 * units * 1);
        if (nwin == 32) {
            /* the full window was clustered at the end of this step */
            cr_assert_eq(st1.clusters_made - st0.clusters_made, 2 * 2 * 4, "step %d", s);
            clustered += 32;
            nwin = 0;
        } else {
            cr_assert_eq(st1.clusters_made, st0.clusters_made, "step %d", s);
        }
    }
    /* 64 of ~300 tokens: not full attention any more (a sanity check that it is sparse) */
    cr_assert_gt(worst, 1e-2f);
    fx_close(&f);
}

Test(kvcache, clusterkv_small_budget_attends_budget)
{
    check_small_budget(CKV_SELECT_KVHEAD_SUM);
    check_small_budget(CKV_SELECT_PER_QHEAD);
}

Test(kvcache, clusterkv_repeated_query_hits_cache)
{
    struct ckv_kv_opts o = opts_of(CKV_KV_CLUSTERKV, 64);
    o.window = 64; /* no window clustering within these steps */
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    fx_prefill(&f, 400, 200);
    int qrow = geom_ckv.n_q_heads * geom_ckv.head_dim;
    float *q = malloc(sizeof(float) * (size_t)qrow * geom_ckv.n_layers);
    for (int i = 0; i < qrow * geom_ckv.n_layers; i++)
        q[i] = rng_normal(&f.rng);
    struct ckv_kv_stats a, b;
    fx_step_q(&f, q, NULL, NULL);
    ckv_kvcache_stats(f.kv, &a);
    /* the prompt's clusters were cached when written (unbounded cache): all hits. KV-head
     * units of distinct heads never share a cluster: hits == clusters selected */
    cr_assert_eq(a.cache_misses, 0);
    cr_assert_gt(a.cache_hits, 0);
    cr_assert_eq(a.cache_hits, a.clusters_selected);
    for (int s = 0; s < 10; s++)
        fx_step_q(&f, q, NULL, NULL);
    ckv_kvcache_stats(f.kv, &b);
    cr_assert_eq(b.cache_misses, 0, "the same query selects the same clusters");
    cr_assert_eq(b.cache_hits, 11 * a.clusters_selected);
    cr_assert_eq(b.cache_hit_bytes, 11 * a.cache_hit_bytes);
    free(q);
    fx_close(&f);
}

Test(kvcache, clusterkv_short_prompt)
{
    /* a prompt shorter than the sinks: the first decoded tokens are sinks, then the window
     * fills and is clustered; still full attention at a large budget */
    struct ckv_kv_opts o = opts_of(CKV_KV_CLUSTERKV, 4096);
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    fx_prefill(&f, 5, 5);
    for (int s = 0; s < 80; s++)
        cr_assert_lt(fx_step(&f, NULL), 2e-3f, "step %d", s);
    struct ckv_kv_stats st;
    ckv_kvcache_stats(f.kv, &st);
    /* windows of 32 after 16 sinks: clustered at positions 48 and 80 */
    cr_assert_eq(st.clusters_made, 2 * 2 * 2 * 4);
    fx_close(&f);
}

Test(kvcache, streaming_is_sinks_plus_recent)
{
    struct ckv_kv_opts o = opts_of(CKV_KV_STREAMING, 64);
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    fx_prefill(&f, 200, 64);
    int qrow = geom_ckv.n_q_heads * geom_ckv.head_dim, d = geom_ckv.head_dim;
    float *q = malloc(sizeof(float) * (size_t)qrow * geom_ckv.n_layers);
    float *out = malloc(sizeof(float) * (size_t)qrow * geom_ckv.n_layers);
    float ref[qrow];
    int pos[16 + 64];
    for (int s = 0; s < 5; s++) {
        fx_step_q(&f, NULL, q, out);
        int n = ckv_kvcache_n_tokens(f.kv);
        for (int i = 0; i < 16; i++)
            pos[i] = i;
        for (int i = 0; i < 64; i++)
            pos[16 + i] = n - 64 + i;
        for (int l = 0; l < geom_ckv.n_layers; l++) {
            const float *ql = q + (size_t)l * qrow;
            if (l < o.full_layers)
                ref_full(&f, l, ql, n, ref);
            else
                for (int qh = 0; qh < geom_ckv.n_q_heads; qh++)
                    ref_attn(&f, l, qh, ql + qh * d, pos, 80, ref + qh * d);
            float e = rel_err(out + (size_t)l * qrow, ref, qrow);
            cr_assert_lt(e, 2e-3f, "step %d layer %d: error %g", s, l, e);
        }
    }
    free(q);
    free(out);
    fx_close(&f);
}

/* Quest's choice by a scalar reference: page bounds of the stored keys, page score
 * sum_i max(q_i M_i, q_i m_i) per query head (folded by max or sum over a group for the KV
 * head modes), top n_select with the last page forced in, ties to the lower page. */
static void quest_ref_pages(const struct fx *f, int l, const float *q, int n, int unit,
                            enum ckv_select_mode mode, int n_select, int *pages, int *count)
{
    int d = f->g.head_dim, G = f->g.n_q_heads / f->g.n_kv_heads, row = f->g.n_kv_heads * d;
    int np = (n + 15) / 16;
    int h = mode == CKV_SELECT_PER_QHEAD ? unit / G : unit;
    int q0 = mode == CKV_SELECT_PER_QHEAD ? unit : h * G, nq = mode == CKV_SELECT_PER_QHEAD ? 1 : G;
    double *score = malloc(sizeof(double) * np);
    for (int p = 0; p < np; p++) {
        double s = 0;
        for (int r = 0; r < nq; r++) {
            double v = 0;
            for (int i = 0; i < d; i++) {
                float mn = INFINITY, mx = -INFINITY;
                for (int t = p * 16; t < n && t < p * 16 + 16; t++) {
                    float x = f->k[l][(size_t)t * row + h * d + i];
                    mn = x < mn ? x : mn;
                    mx = x > mx ? x : mx;
                }
                double qi = q[(size_t)(q0 + r) * d + i], a = qi * mx, b = qi * mn;
                v += a > b ? a : b;
            }
            if (r == 0)
                s = v;
            else
                s = mode == CKV_SELECT_KVHEAD_MAX ? (v > s ? v : s) : s + v;
        }
        score[p] = s;
    }
    int k = n_select < np ? n_select : np, have_last = 0;
    char *taken = calloc((size_t)np, 1);
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int p = 0; p < np; p++)
            if (!taken[p] && (best < 0 || score[p] > score[best]))
                best = p;
        taken[best] = 1;
        pages[i] = best;
        have_last |= best == np - 1;
    }
    if (!have_last)
        pages[k - 1] = np - 1;
    *count = k;
    free(score);
    free(taken);
}

static void check_quest(enum ckv_select_mode mode)
{
    struct ckv_kv_opts o = opts_of(CKV_KV_QUEST, 64);
    o.select_mode = mode;
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    fx_prefill(&f, 250, 128);
    int qrow = geom_ckv.n_q_heads * geom_ckv.head_dim, d = geom_ckv.head_dim;
    int G = geom_ckv.n_q_heads / geom_ckv.n_kv_heads;
    float *q = malloc(sizeof(float) * (size_t)qrow * geom_ckv.n_layers);
    float *out = malloc(sizeof(float) * (size_t)qrow * geom_ckv.n_layers);
    float ref[qrow];
    int units = mode == CKV_SELECT_PER_QHEAD ? 4 : 2;
    for (int s = 0; s < 20; s++) {
        struct ckv_kv_stats a, b;
        ckv_kvcache_stats(f.kv, &a);
        fx_step_q(&f, NULL, q, out);
        ckv_kvcache_stats(f.kv, &b);
        int n = ckv_kvcache_n_tokens(f.kv);
        uint64_t attended = 0;
        for (int l = 0; l < geom_ckv.n_layers; l++) {
            const float *ql = q + (size_t)l * qrow;
            if (l < o.full_layers) {
                ref_full(&f, l, ql, n, ref);
                attended += (uint64_t)units * n;
            } else {
                for (int u = 0; u < units; u++) {
                    int pages[8], cnt, pos[8 * 16], np = 0;
                    quest_ref_pages(&f, l, ql, n, u, mode, 4, pages, &cnt);
                    for (int i = 0; i < cnt; i++)
                        for (int t = pages[i] * 16; t < n && t < pages[i] * 16 + 16; t++)
                            pos[np++] = t;
                    attended += (uint64_t)np;
                    int qh0 = mode == CKV_SELECT_PER_QHEAD ? u : u * G;
                    int nqh = mode == CKV_SELECT_PER_QHEAD ? 1 : G;
                    for (int qh = qh0; qh < qh0 + nqh; qh++)
                        ref_attn(&f, l, qh, ql + qh * d, pos, np, ref + qh * d);
                }
            }
            float e = rel_err(out + (size_t)l * qrow, ref, qrow);
            cr_assert_lt(e, 2e-3f, "mode %d step %d layer %d: error %g", (int)mode, s, l, e);
        }
        cr_assert_eq(b.attended_tokens - a.attended_tokens, attended, "step %d", s);
    }
    free(q);
    free(out);
    fx_close(&f);
}

Test(kvcache, quest_pages_match_reference)
{
    check_quest(CKV_SELECT_PER_QHEAD);
    check_quest(CKV_SELECT_KVHEAD_SUM);
    check_quest(CKV_SELECT_KVHEAD_MAX);
}

/* The clusters partition exactly the positions between the sinks and the window: the
 * prompt's after end_prefill, each window's after it is clustered; sizes and members agree. */
static void check_partition(ckv_kvcache_t *kv, int layer, int h, int n_tokens)
{
    struct ckv_kv_clusters c;
    cr_assert_eq(ckv_kvcache_clusters(kv, layer, h, &c), 0);
    char *seen = calloc((size_t)n_tokens, 1);
    cr_assert_eq(c.offsets[0], 0);
    for (int i = 0; i < c.n_clusters; i++) {
        cr_assert_eq(c.sizes[i], c.offsets[i + 1] - c.offsets[i]);
        cr_assert_gt(c.sizes[i], 0);
        for (int j = c.offsets[i]; j < c.offsets[i + 1]; j++) {
            int p = c.members[j];
            cr_assert(p >= c.n_sinks && p < c.window_start, "position %d outside", p);
            cr_assert_eq(seen[p], 0, "position %d twice", p);
            seen[p] = 1;
            if (j > c.offsets[i])
                cr_assert_gt(p, c.members[j - 1]);
        }
    }
    for (int p = c.n_sinks; p < c.window_start; p++)
        cr_assert_eq(seen[p], 1, "position %d in no cluster", p);
    cr_assert_eq(c.window_start + c.n_window, n_tokens);
    free(seen);
}

Test(kvcache, clusterkv_clusters_partition_positions)
{
    struct ckv_kv_opts o = opts_of(CKV_KV_CLUSTERKV, 64);
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    struct ckv_kv_clusters c;
    cr_assert_eq(ckv_kvcache_clusters(f.kv, 2, 0, &c), -EINVAL, "before end_prefill");
    fx_prefill(&f, 300, 150);
    cr_assert_eq(ckv_kvcache_clusters(f.kv, 0, 0, &c), -EINVAL, "a full layer");
    cr_assert_eq(ckv_kvcache_clusters(f.kv, 2, 2, &c), -EINVAL, "no such head");
    cr_assert_eq(ckv_kvcache_clusters(f.kv, 2, 1, &c), 0);
    /* tokens_per_cluster 20: ceil(268 / 20) = 14 clusters at most */
    cr_assert(c.n_clusters >= 10 && c.n_clusters <= 14, "%d", c.n_clusters);
    cr_assert_eq(c.n_sinks, 16);
    cr_assert_eq(c.window_start, 284);
    cr_assert_eq(c.n_window, 16);
    for (int s = 0; s < 50; s++) {
        fx_step(&f, NULL);
        for (int l = 2; l < 4; l++)
            for (int h = 0; h < 2; h++)
                check_partition(f.kv, l, h, 301 + s);
    }
    cr_assert_eq(ckv_kvcache_clusters(f.kv, 3, 0, &c), 0);
    cr_assert_eq(c.window_start, 316 + 32); /* two windows clustered: at 316 and 348 */
    fx_close(&f);

    struct ckv_kv_opts q = opts_of(CKV_KV_QUEST, 64);
    fx_open(&f, &geom_ckv, &q);
    fx_prefill(&f, 40, 40);
    cr_assert_eq(ckv_kvcache_clusters(f.kv, 2, 0, &c), -EINVAL, "not clusterkv");
    fx_close(&f);
}

Test(kvcache, clusterkv_store_full_is_an_error)
{
    /* a store with room for a few blocks: end_prefill reports its -ENOSPC */
    struct ckv_ctx_opts co = {.backend = CKV_BACKEND_CPU, .n_threads = 1};
    ckv_ctx_t *ctx = NULL;
    cr_assert_eq(ckv_ctx_new(&co, &ctx), 0);
    struct ckv_kv_opts o = opts_of(CKV_KV_CLUSTERKV, 64);
    struct ckv_block_store *store = NULL;
    size_t bb = ckv_block_bytes(geom_ckv.head_dim, o.dtype);
    cr_assert_eq(ckv_block_store_mem_new(bb, 4 * bb, &store), 0);
    ckv_kvcache_t *kv = NULL;
    char err[128];
    cr_assert_eq(ckv_kvcache_new(ctx, &geom_ckv, &o, store, 9, &kv, err, sizeof(err)), 0);
    int row = geom_ckv.n_kv_heads * geom_ckv.head_dim;
    float *k = calloc((size_t)200 * row, sizeof(float)), *v = calloc((size_t)200 * row, 4);
    for (int i = 0; i < 200 * row; i++)
        k[i] = (float)((i * 37) % 101) / 50.0f - 1.0f;
    for (int l = 0; l < geom_ckv.n_layers; l++)
        cr_assert_eq(ckv_kvcache_append(kv, l, k, v, 200), 0);
    cr_assert_eq(ckv_kvcache_end_prefill(kv), -ENOSPC);
    ckv_kvcache_free(&kv);
    /* and a block size that is not the KV's is refused up front */
    struct ckv_block_store *other = NULL;
    cr_assert_eq(ckv_block_store_mem_new(bb * 2, 0, &other), 0);
    cr_assert_eq(ckv_kvcache_new(ctx, &geom_ckv, &o, other, 9, &kv, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "block"), "%s", err);
    ckv_block_store_destroy(&other);
    ckv_block_store_destroy(&store);
    free(k);
    free(v);
    ckv_ctx_destroy(&ctx);
}

Test(kvcache, end_prefill_twice_and_free_drops_clusters)
{
    struct ckv_kv_opts o = opts_of(CKV_KV_CLUSTERKV, 64);
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    fx_prefill(&f, 120, 120);
    struct ckv_block_store_mem_stats a, b;
    cr_assert_eq(ckv_block_store_mem_stats(f.store, &a), 0);
    cr_assert_gt(a.clusters, 0);
    cr_assert_eq(ckv_kvcache_end_prefill(f.kv), 0);
    cr_assert_eq(ckv_block_store_mem_stats(f.store, &b), 0);
    cr_assert_eq(b.clusters, a.clusters, "a second end_prefill clusters nothing");
    ckv_kvcache_free(&f.kv);
    cr_assert_eq(ckv_block_store_mem_stats(f.store, &b), 0);
    cr_assert_eq(b.clusters, 0, "freeing the sequence drops its clusters");
    fx_close(&f);
}

/* A copy of one head's clusters (ckv_kvcache_clusters is valid until the next end_step). */
struct snap {
    int n, n_sinks, wstart;
    int32_t *sizes, *offsets, *members;
    float *cent;
};

static void snap_take(struct snap *s, ckv_kvcache_t *kv, int l, int h, int d)
{
    struct ckv_kv_clusters c;
    cr_assert_eq(ckv_kvcache_clusters(kv, l, h, &c), 0);
    s->n = c.n_clusters;
    s->n_sinks = c.n_sinks;
    s->wstart = c.window_start;
    s->sizes = malloc(sizeof(int32_t) * (size_t)(c.n_clusters + 1));
    s->offsets = malloc(sizeof(int32_t) * (size_t)(c.n_clusters + 1));
    s->members = malloc(sizeof(int32_t) * (size_t)(c.offsets[c.n_clusters] + 1));
    s->cent = malloc(sizeof(float) * (size_t)(c.n_clusters + 1) * d);
    memcpy(s->sizes, c.sizes, sizeof(int32_t) * (size_t)c.n_clusters);
    memcpy(s->offsets, c.offsets, sizeof(int32_t) * (size_t)(c.n_clusters + 1));
    memcpy(s->members, c.members, sizeof(int32_t) * (size_t)c.offsets[c.n_clusters]);
    /* CPU backend: device memory is host memory */
    memcpy(s->cent, c.centroids, sizeof(float) * (size_t)c.n_clusters * d);
}

static void snap_free(struct snap *s)
{
    free(s->sizes);
    free(s->offsets);
    free(s->members);
    free(s->cent);
}

/* The positions a unit attends by the scalar rule of ALGORITHM.md 3: clusters ranked by
 * q . centroid (folded over the group for the KV-head modes), best first, ties to the lower
 * index, until `budget` tokens, the last truncated to its first members; plus sinks and
 * window [wstart, n). Returns the count. */
static int ref_selection(const struct snap *s, const float *q, int nq, int d, int budget,
                         enum ckv_select_mode mode, int n, int *pos)
{
    double *score = malloc(sizeof(double) * (size_t)(s->n + 1));
    char *taken = calloc((size_t)s->n + 1, 1);
    for (int c = 0; c < s->n; c++) {
        double acc = 0;
        for (int r = 0; r < nq; r++) {
            double dot = 0;
            for (int i = 0; i < d; i++)
                dot += (double)q[r * d + i] * s->cent[(size_t)c * d + i];
            acc = r == 0 ? dot : mode == CKV_SELECT_KVHEAD_MAX ? fmax(acc, dot) : acc + dot;
        }
        score[c] = acc;
    }
    int np = 0, got = 0;
    for (int p = 0; p < s->n_sinks; p++)
        pos[np++] = p;
    while (got < budget) {
        int best = -1;
        for (int c = 0; c < s->n; c++)
            if (!taken[c] && (best < 0 || score[c] > score[best]))
                best = c;
        if (best < 0)
            break;
        taken[best] = 1;
        int take = s->sizes[best] < budget - got ? s->sizes[best] : budget - got;
        for (int i = 0; i < take; i++)
            pos[np++] = s->members[s->offsets[best] + i];
        got += take;
    }
    for (int p = s->wstart; p < n; p++)
        pos[np++] = p;
    free(score);
    free(taken);
    return np;
}

/* clusterkv's sparse path equals attention over the scalar rule's selection, through window
 * clusterings, with an unbounded and with a tiny (evicting) cache, each selection mode. */
static void check_sparse_reference(enum ckv_select_mode mode, int budget, int cache_blocks)
{
    struct ckv_kv_opts o = opts_of(CKV_KV_CLUSTERKV, budget);
    o.select_mode = mode;
    o.cache_blocks = cache_blocks;
    struct fx f;
    fx_open(&f, &geom_ckv, &o);
    fx_prefill(&f, 300, 150);
    int d = geom_ckv.head_dim, nkv = geom_ckv.n_kv_heads, L = geom_ckv.n_layers;
    int qrow = geom_ckv.n_q_heads * d, G = geom_ckv.n_q_heads / nkv;
    float *q = malloc(sizeof(float) * (size_t)qrow * L);
    float *out = malloc(sizeof(float) * (size_t)qrow * L);
    float ref[qrow];
    int *pos = malloc(sizeof(int) * 2048);
    struct snap sn[L][nkv];
    for (int s = 0; s < 70; s++) {
        for (int l = o.full_layers; l < L; l++)
            for (int h = 0; h < nkv; h++)
                snap_take(&sn[l][h], f.kv, l, h, d);
        fx_step_q(&f, NULL, q, out);
        int n = ckv_kvcache_n_tokens(f.kv);
        for (int l = o.full_layers; l < L; l++) {
            const float *ql = q + (size_t)l * qrow;
            int units = mode == CKV_SELECT_PER_QHEAD ? geom_ckv.n_q_heads : nkv;
            for (int u = 0; u < units; u++) {
                int h = mode == CKV_SELECT_PER_QHEAD ? u / G : u;
                int q0 = mode == CKV_SELECT_PER_QHEAD ? u : u * G;
                int nq = mode == CKV_SELECT_PER_QHEAD ? 1 : G;
                int np = ref_selection(&sn[l][h], ql + (size_t)q0 * d, nq, d, budget, mode, n, pos);
                for (int qh = q0; qh < q0 + nq; qh++)
                    ref_attn(&f, l, qh, ql + (size_t)qh * d, pos, np, ref + (size_t)qh * d);
            }
            float e = rel_err(out + (size_t)l * qrow, ref, qrow);
            cr_assert_lt(e, 2e-3f, "mode %d budget %d cache %d step %d layer %d: error %g",
                         (int)mode, budget, cache_blocks, s, l, e);
            for (int h = 0; h < nkv; h++)
                snap_free(&sn[l][h]);
        }
    }
    struct ckv_kv_stats st;
    ckv_kvcache_stats(f.kv, &st);
    if (cache_blocks == 0) {
        /* everything was cached when written (prompt and windows) */
        cr_assert_eq(st.cache_misses, 0);
        cr_assert_gt(st.cache_hits, 0);
    } else {
        cr_assert_gt(st.cache_misses, 0);
    }
    free(q);
    free(out);
    free(pos);
    fx_close(&f);
}

Test(kvcache, clusterkv_sparse_matches_reference)
{
    check_sparse_reference(CKV_SELECT_KVHEAD_SUM, 64, 0);
    check_sparse_reference(CKV_SELECT_KVHEAD_MAX, 100, 0);
    check_sparse_reference(CKV_SELECT_PER_QHEAD, 70, 0);
}

Test(kvcache, clusterkv_tiny_cache_matches_reference)
{
    /* 4 blocks: far below one layer's selection, evictions every step */
    check_sparse_reference(CKV_SELECT_KVHEAD_SUM, 64, 4);
    check_sparse_reference(CKV_SELECT_PER_QHEAD, 90, 4);
}
