/*
 * ckv-bench-kvcache: decode cost of the KV manager (worker/kvcache.c) per layer and step, by
 * method, on random K/V at a model's attention shape (default SmolLM2-135M: 9 query heads, 3
 * KV heads, head_dim 64). Every layer is a sparse one (full_layers 0), so the time is that of
 * the method's path: append, selection, cache lookups and fetches, attention, window
 * clustering amortised over the steps. The prompt is appended without prefill attention
 * (which is the same for every method).
 *
 *   build/bin/ckv-bench-kvcache [--ctx 8192] [--budget 512] [--layers 4] [--steps 256]
 *                               [--q-heads 9] [--kv-heads 3] [--head-dim 64] [--threads 0]
 *                               [--cache-blocks 0] [--json out.json]
 *
 * Prints a table (ms per layer-step, tokens attended per unit, speedup over full) and, with
 * --json, the same as JSON.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block_store.h"
#include "ckv_clock.h"
#include "kvcache.h"

struct cfg {
    int ctx, budget, layers, steps, nq, nkv, d, threads, cache_blocks;
    const char *json;
};

static uint64_t rng = 88172645463325252ull;

static float rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)(rng >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
}

struct result {
    const char *method;
    double ms_step_layer, attended_per_unit, end_prefill_s;
    double hit_rate, select_ms, fetch_ms, attn_ms, kmeans_ms;
};

static int run(const struct cfg *c, ckv_ctx_t *ctx, enum ckv_kv_method m, struct result *r)
{
    struct ckv_kv_geom g = {c->layers, c->nq, c->nkv, c->d, c->ctx + c->steps + 1};
    struct ckv_kv_opts o;
    ckv_kv_opts_default(&o);
    o.method = m;
    o.budget = c->budget;
    o.full_layers = 0;
    o.cache_blocks = c->cache_blocks;
    struct ckv_block_store *store = NULL;
    ckv_kvcache_t *kv = NULL;
    char err[256];
    int rc = ckv_block_store_mem_new(ckv_block_bytes(c->d, o.dtype), 0, &store);
    if (rc == 0)
        rc = ckv_kvcache_new(ctx, &g, &o, store, 1, &kv, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "kvcache_new: %d %s\n", rc, err);
        return rc;
    }
    int row = c->nkv * c->d, qrow = c->nq * c->d, chunk = 512;
    float *k = malloc(sizeof(float) * (size_t)chunk * row);
    float *v = malloc(sizeof(float) * (size_t)chunk * row);
    float *q = malloc(sizeof(float) * (size_t)qrow);
    float *out = malloc(sizeof(float) * (size_t)qrow);
    /* keys: a few directions plus noise, so that clusters mean something */
    for (int p = 0; p < c->ctx; p += chunk) {
        int n = c->ctx - p < chunk ? c->ctx - p : chunk;
        for (int l = 0; l < c->layers; l++) {
            for (int i = 0; i < n * row; i++) {
                k[i] = rnd() + (float)(((p + i / row) * 7 % 11) - 5) * 0.3f * (float)((i % 5) - 2);
                v[i] = rnd();
            }
            if ((rc = ckv_kvcache_append(kv, l, k, v, n)))
                goto out;
        }
    }
    uint64_t t0 = ckv_now_ns();
    if ((rc = ckv_kvcache_end_prefill(kv)))
        goto out;
    r->end_prefill_s = ckv_elapsed_s(t0);
    struct ckv_kv_stats s0, s1;
    ckv_kvcache_stats(kv, &s0);
    uint64_t t1 = ckv_now_ns();
    for (int s = 0; s < c->steps; s++) {
        for (int l = 0; l < c->layers; l++) {
            for (int i = 0; i < row; i++) {
                k[i] = rnd();
                v[i] = rnd();
            }
            /* a slowly drifting query: consecutive steps select mostly the same clusters */
            for (int i = 0; i < qrow; i++)
                q[i] = sinf(0.01f * (float)s + (float)(i * 13 % 29) + (float)l) * 1.5f;
            if ((rc = ckv_kvcache_append(kv, l, k, v, 1)) ||
                (rc = ckv_kvcache_attn_decode(kv, l, q, out)))
                goto out;
        }
        if ((rc = ckv_kvcache_end_step(kv)))
            goto out;
    }
    double el = ckv_elapsed_s(t1);
    ckv_kvcache_stats(kv, &s1);
    int units = c->nkv; /* kvhead-sum default */
    double calls = (double)c->steps * c->layers;
    r->method = ckv_kv_method_name(m);
    r->ms_step_layer = el * 1e3 / calls;
    r->attended_per_unit = (double)(s1.attended_tokens - s0.attended_tokens) / calls / units;
    uint64_t h = s1.cache_hits - s0.cache_hits, mi = s1.cache_misses - s0.cache_misses;
    r->hit_rate = h + mi ? (double)h / (double)(h + mi) : 0;
    r->select_ms = (s1.select_ms - s0.select_ms) / calls;
    r->fetch_ms = (s1.fetch_ms - s0.fetch_ms) / calls;
    r->attn_ms = (s1.attn_ms - s0.attn_ms) / calls;
    r->kmeans_ms = (s1.kmeans_ms - s0.kmeans_ms) / calls;
out:
    free(k);
    free(v);
    free(q);
    free(out);
    ckv_kvcache_free(&kv);
    ckv_block_store_destroy(&store);
    if (rc)
        fprintf(stderr, "%s: error %d\n", ckv_kv_method_name(m), rc);
    return rc;
}

int main(int argc, char **argv)
{
    struct cfg c = {8192, 512, 4, 256, 9, 3, 64, 0, 0, NULL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--json") == 0 && i + 1 < argc) {
            c.json = argv[++i];
            continue;
        }
        int *dst = strcmp(a, "--ctx") == 0            ? &c.ctx
                   : strcmp(a, "--budget") == 0       ? &c.budget
                   : strcmp(a, "--layers") == 0       ? &c.layers
                   : strcmp(a, "--steps") == 0        ? &c.steps
                   : strcmp(a, "--q-heads") == 0      ? &c.nq
                   : strcmp(a, "--kv-heads") == 0     ? &c.nkv
                   : strcmp(a, "--head-dim") == 0     ? &c.d
                   : strcmp(a, "--threads") == 0      ? &c.threads
                   : strcmp(a, "--cache-blocks") == 0 ? &c.cache_blocks
                                                      : NULL;
        if (!dst || i + 1 >= argc) {
            fprintf(stderr,
                    "usage: %s [--ctx N] [--budget B] [--layers L] [--steps S] "
                    "[--q-heads H] [--kv-heads H] [--head-dim D] [--threads T] "
                    "[--cache-blocks N] [--json FILE]\n",
                    argv[0]);
            return 2;
        }
        *dst = atoi(argv[++i]);
    }
    struct ckv_ctx_opts co = {.backend = CKV_BACKEND_CPU, .n_threads = c.threads};
    ckv_ctx_t *ctx = NULL;
    if (ckv_ctx_new(&co, &ctx)) {
        fprintf(stderr, "no context\n");
        return 1;
    }
    printf("# ckv-bench-kvcache --ctx %d --budget %d --layers %d --steps %d --q-heads %d "
           "--kv-heads %d --head-dim %d --threads %d --cache-blocks %d  (%s)\n",
           c.ctx, c.budget, c.layers, c.steps, c.nq, c.nkv, c.d, c.threads, c.cache_blocks,
           ckv_ctx_describe(ctx));
    enum ckv_kv_method ms[] = {CKV_KV_FULL, CKV_KV_CLUSTERKV, CKV_KV_QUEST, CKV_KV_STREAMING};
    struct result r[4];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < 4; i++)
        if (run(&c, ctx, ms[i], &r[i]))
            return 1;
    printf("%-10s %12s %10s %8s %9s %9s %9s %9s %9s %10s\n", "method", "ms/layer-step", "attended",
           "speedup", "hit-rate", "select", "fetch", "attn", "kmeans", "prefill-s");
    for (int i = 0; i < 4; i++)
        printf("%-10s %12.4f %10.1f %8.2f %9.3f %9.4f %9.4f %9.4f %9.4f %10.2f\n", r[i].method,
               r[i].ms_step_layer, r[i].attended_per_unit, r[0].ms_step_layer / r[i].ms_step_layer,
               r[i].hit_rate, r[i].select_ms, r[i].fetch_ms, r[i].attn_ms, r[i].kmeans_ms,
               r[i].end_prefill_s);
    if (c.json) {
        FILE *f = fopen(c.json, "w");
        if (!f) {
            perror(c.json);
            return 1;
        }
        fprintf(f,
                "{\"ctx\": %d, \"budget\": %d, \"layers\": %d, \"steps\": %d, \"backend\": "
                "\"%s\", \"methods\": [",
                c.ctx, c.budget, c.layers, c.steps, ckv_ctx_describe(ctx));
        for (int i = 0; i < 4; i++)
            fprintf(f,
                    "%s{\"method\": \"%s\", \"ms_per_layer_step\": %.5f, \"attended_per_unit\": "
                    "%.1f, \"speedup_vs_full\": %.3f, \"cache_hit_rate\": %.4f, \"select_ms\": "
                    "%.5f, \"fetch_ms\": %.5f, \"attn_ms\": %.5f, \"kmeans_ms\": %.5f, "
                    "\"end_prefill_s\": %.3f}",
                    i ? ", " : "", r[i].method, r[i].ms_step_layer, r[i].attended_per_unit,
                    r[0].ms_step_layer / r[i].ms_step_layer, r[i].hit_rate, r[i].select_ms,
                    r[i].fetch_ms, r[i].attn_ms, r[i].kmeans_ms, r[i].end_prefill_s);
        fprintf(f, "]}\n");
        fclose(f);
    }
    ckv_ctx_destroy(&ctx);
    return 0;
}
