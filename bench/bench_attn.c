/*
 * ckv-bench-attn: decode attention of one layer at Llama-3-8B shapes (32 query heads, 8 KV
 * heads, head_dim 128, f16 KV), full attention against ClusterKV (scoring + selection +
 * block lists + attention), on the CPU backend. Prints tables and the command that
 * reproduces them; --json FILE writes every figure.
 *
 *   build/bin/ckv-bench-attn                 contexts 8k/32k/128k, budgets 512/1024/2048
 *   build/bin/ckv-bench-attn --quick         32k and budget 1024 only (< 30 s)
 *   build/bin/ckv-bench-attn --json out.json
 *
 * Method. Data: ckv_qkv_synth (keys around topics, queries mixing a few of them; the
 * content only matters for the clusters' sizes and which clusters are chosen). Per context:
 * memcpy and read-only bandwidth of the same machine in the same run (threads as the
 * context); full attention (ckv_attn_decode_full) over the whole cache; ClusterKV state built
 * as after prefill: 16 sink tokens, ceil((n - 16 - 320) / 80) clusters per KV head by
 * ckv_kmeans (timed per head), a full 320-token window, all packed into 16-token blocks; then
 * per decode step ckv_select_clusters + ckv_sparse_lists + ckv_attn_decode_blocks, per KV
 * head (max or sum over the group) and per query head (the authors'). Before every timed call
 * the context's threads copy 64 MiB (see flush_caches), so K/V, centroids and blocks come
 * from DRAM as they would after the other layers ran, with the workers awake as in a decode
 * step.
 * Figures are medians over --reps calls, each call a different decode step's queries.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_config.h"
#include "ckv_main.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_qkv.h"
#include "ckv_sparse.h"
#include "kernels.h"

#define NQ           32
#define NKV          8
#define HD           128
#define MAX_CONTEXTS 8
#define MAX_BUDGETS  8
#define FLUSH_BYTES  (64u << 20)

static const char *const isa_names[] = {"auto", "portable", "avx2", "avx512", NULL};

static const char *const centroid_names[] = {"f32", "f16", NULL};

struct bench_cfg {
    bool quick;
    int centroid_f16;
    char json[512];
    char contexts[256];
    char budgets[256];
    int reps;
    int threads;
    int isa;
    int sinks, window, tokens_per_cluster, kmeans_iter;
};

static const struct ckv_config_opt bench_options[] = {
    CKV_OPT_BOOL(struct bench_cfg, quick, "quick", "no", "32k context and budget 1024 only"),
    CKV_OPT_STRING(struct bench_cfg, json, "json", "", "write every figure to this JSON file"),
    CKV_OPT_STRING(struct bench_cfg, contexts, "contexts", "8192,32768,131072",
                   "context lengths, comma-separated"),
    CKV_OPT_STRING(struct bench_cfg, budgets, "budgets", "512,1024,2048",
                   "ClusterKV token budgets, comma-separated"),
    CKV_OPT_INT(struct bench_cfg, reps, "reps", "9", 1, 1000, "timed calls per figure (median)"),
    CKV_OPT_INT(struct bench_cfg, threads, "threads", "0", 0, 1024, "CPU threads; 0: all cores"),
    CKV_OPT_ENUM(struct bench_cfg, isa, "isa", "auto", isa_names, "CPU ISA"),
    CKV_OPT_INT(struct bench_cfg, sinks, "sinks", "16", 0, 1024, "attention sink tokens"),
    CKV_OPT_INT(struct bench_cfg, window, "window", "320", 0, 65536, "recent-window tokens"),
    CKV_OPT_INT(struct bench_cfg, tokens_per_cluster, "tokens-per-cluster", "80", 1, 100000,
                "clustered tokens per cluster"),
    CKV_OPT_INT(struct bench_cfg, kmeans_iter, "kmeans-iter", "20", 1, 1000,
                "k-means iterations at most"),
    CKV_OPT_ENUM(struct bench_cfg, centroid_f16, "centroids", "f16", centroid_names,
                 "selection reads f32 centroids or their f16 copy (same recall, half the bytes)"),
    CKV_OPT_END,
};

static int parse_list(const char *s, int *out, int cap)
{
    int n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > (1 << 22) || n == cap)
            return -EINVAL;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -EINVAL;
    }
    return n ? n : -EINVAL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* ---- memory bandwidth of this machine, now ---- */

static char *flush_buf; /* 2 x 64 MiB */
static ckv_ctx_t *flush_ctx;

/* Evicts the caches before a timed call so that it starts from DRAM, as after the other
 * layers of a decode step: a 64 MiB copy (more than the L3) run by the context's own threads,
 * so that, as in a decode step where kernels run back to back, its workers are awake when
 * the timed call starts (a worker asleep on this VM takes 0.05-0.3 ms to wake up). */
static void flush_caches(void)
{
    flush_buf[0]++;
    if (ckv_convert(flush_ctx, flush_buf + FLUSH_BYTES, CKV_DTYPE_F32, flush_buf, CKV_DTYPE_F32,
                    FLUSH_BYTES / sizeof(float)) != 0)
        for (size_t i = 0; i < FLUSH_BYTES; i += 64) /* not expected: flush by hand */
            flush_buf[i]++;
}

struct bw_job {
    char *dst;
    const char *src;
    size_t bytes;
    int read_only;
    uint64_t sum;
};

static void *bw_thread(void *arg)
{
    struct bw_job *j = arg;
    if (!j->read_only) {
        memcpy(j->dst, j->src, j->bytes);
        return NULL;
    }
    const uint64_t *p = (const uint64_t *)j->src;
    uint64_t s[8] = {0};
    for (size_t i = 0; i + 8 <= j->bytes / 8; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] += p[i + k];
    for (int k = 0; k < 8; k++)
        j->sum += s[k];
    return NULL;
}

/* Seconds of one memcpy (bytes copied) or one read pass over `bytes`, on n_threads threads. */
static double bandwidth_once(char *dst, const char *src, size_t bytes, int n_threads, int read_only)
{
    pthread_t th[64];
    struct bw_job jobs[64];
    n_threads = CKV_MIN(n_threads, 64);
    size_t per = bytes / (size_t)n_threads & ~(size_t)63;
    uint64_t t0 = ckv_now_ns();
    for (int i = 0; i < n_threads; i++) {
        jobs[i] = (struct bw_job){dst + i * per, src + i * per, per, read_only, 0};
        pthread_create(&th[i], NULL, bw_thread, &jobs[i]);
    }
    for (int i = 0; i < n_threads; i++)
        pthread_join(th[i], NULL);
    return (double)(ckv_now_ns() - t0) * 1e-9;
}

/* ---- one context ---- */

struct budget_row {
    int budget;
    double ckv_ms_kv, ckv_ms_sum, ckv_ms_q; /* per KV head (max, sum), per query head */
    double sel_ms_kv;           /* of the KV-head (max) figure: score + select + lists */
    double tokens_kv, tokens_q; /* tokens attended per unit (mean) */
};

struct ctx_row {
    int n_ctx, n_clusters;
    double kv_mib, full_ms, full_gbs, memcpy_gbs, read_gbs;
    double kmeans_ms, kmeans_iters;
    int n_budgets;
    struct budget_row b[MAX_BUDGETS];
};

/* One ClusterKV configuration (budget, GQA mode) with its buffers, timed step by step. */
struct ckv_runner {
    enum ckv_select_mode mode;
    int budget, n_units, max_sel, refs_cap;
    int32_t *sel, cnt[NQ], last[NQ], offs[NQ + 1];
    struct ckv_block_ref *refs;
    double *t_total, *t_sel; /* (reps) ms */
    long tokens;
};

static int runner_init(struct ckv_runner *x, const struct bench_cfg *cfg,
                       const struct ckv_sparse_layout *l, int budget, enum ckv_select_mode mode)
{
    memset(x, 0, sizeof(*x));
    x->mode = mode;
    x->budget = budget;
    x->n_units = mode == CKV_SELECT_PER_QHEAD ? NQ : NKV;
    int max_head = 0;
    for (int h = 0; h < NKV; h++)
        max_head = CKV_MAX(max_head, l->head_offsets[h + 1] - l->head_offsets[h]);
    x->max_sel = CKV_MAX(1, CKV_MIN(budget, max_head));
    x->refs_cap = x->n_units * (budget / 16 + x->max_sel + (cfg->sinks + cfg->window) / 16 + 4);
    x->sel = malloc(sizeof(int32_t) * x->n_units * x->max_sel);
    x->refs = malloc(sizeof(*x->refs) * x->refs_cap);
    x->t_total = malloc(sizeof(double) * cfg->reps);
    x->t_sel = malloc(sizeof(double) * cfg->reps);
    return x->sel && x->refs && x->t_total && x->t_sel ? 0 : -ENOMEM;
}

static void runner_free(struct ckv_runner *x)
{
    free(x->sel), free(x->refs), free(x->t_total), free(x->t_sel);
}

/* One decode step as the engine runs it: score + select, block lists, block attention. */
static int runner_step(struct ckv_runner *x, ckv_ctx_t *ctx, const struct ckv_sparse_layout *l,
                       const float *cen, const uint16_t *cen16, const void *pool, enum ckv_dtype dt,
                       const float *q, int r)
{
    const int G = NQ / NKV;
    float out[NQ * HD];
    uint64_t t0 = ckv_now_ns();
    struct ckv_select_args sa = {.n_q_heads = NQ,
                                 .n_kv_heads = NKV,
                                 .head_dim = HD,
                                 .mode = x->mode,
                                 .q = q,
                                 .centroids = cen,
                                 .sizes = l->sizes,
                                 .head_offsets = l->head_offsets,
                                 .n_clusters_total = l->n_clusters_total,
                                 .budget = x->budget,
                                 .max_selected = x->max_sel,
                                 .sel_clusters = x->sel,
                                 .sel_count = x->cnt,
                                 .sel_last_take = x->last,
                                 .centroids_f16 = cen16};
    int rc = ckv_select_clusters(ctx, &sa);
    if (rc == 0)
        rc = ckv_sparse_lists(l, x->mode, NQ, x->sel, x->cnt, x->last, x->max_sel, x->refs,
                              x->refs_cap, x->offs);
    uint64_t t1 = ckv_now_ns();
    int hpl = x->mode == CKV_SELECT_PER_QHEAD ? 1 : G;
    struct ckv_attn_blocks_args ba = {.n_q_heads = NQ,
                                      .head_dim = HD,
                                      .n_lists = NQ / hpl,
                                      .heads_per_list = hpl,
                                      .q = q,
                                      .pool = pool,
                                      .dtype = dt,
                                      .refs = x->refs,
                                      .list_offsets = x->offs,
                                      .out = out};
    if (rc == 0)
        rc = ckv_attn_decode_blocks(ctx, &ba);
    uint64_t t2 = ckv_now_ns();
    x->t_total[r] = (double)(t2 - t0) * 1e-6;
    x->t_sel[r] = (double)(t1 - t0) * 1e-6;
    for (int i = 0; rc == 0 && i < x->offs[x->n_units]; i++)
        x->tokens += x->refs[i].n_tokens;
    return rc;
}

static int run_context(ckv_ctx_t *ctx, const struct bench_cfg *cfg, int n, const int *budgets,
                       int n_budgets, struct ctx_row *row)
{
    memset(row, 0, sizeof(*row));
    row->n_ctx = n;
    struct ckv_qkv_synth_params sp;
    ckv_qkv_synth_defaults(&sp, NQ, NKV, HD, n, cfg->reps);
    sp.seed = 1000 + (uint64_t)n;
    struct ckv_qkv qkv;
    int rc = ckv_qkv_synth(&sp, &qkv);
    if (rc)
        return rc;
    const size_t esz = ckv_dtype_size(qkv.dtype), head_bytes = (size_t)n * HD * esz;
    const size_t kv_bytes = 2 * NKV * head_bytes;
    row->kv_mib = (double)kv_bytes / (1 << 20);
    void *k = NULL, *v = NULL, *pool = NULL;
    char *bw_a = NULL, *bw_b = NULL;
    float *cen = NULL;
    uint16_t *cen16 = NULL;
    struct ckv_sparse_layout l = {0};
    struct ckv_runner *runners = NULL;
    int n_run = 0;
    double *t_cp = NULL, *t_rd = NULL;
    double *t = malloc(sizeof(double) * cfg->reps);
    size_t bw_bytes = CKV_MAX(kv_bytes, (size_t)256 << 20);
    rc = t ? 0 : -ENOMEM;
    if (!rc)
        rc = ckv_dev_alloc(ctx, NKV * head_bytes, &k);
    if (!rc)
        rc = ckv_dev_alloc(ctx, NKV * head_bytes, &v);
    for (int h = 0; rc == 0 && h < NKV; h++) { /* the cache: (8, n, 128), head-major */
        rc = ckv_copy_h2d(ctx, (char *)k + h * head_bytes,
                          (char *)qkv.k + ckv_qkv_kv_index(&qkv, h, 0) * esz, head_bytes);
        if (!rc)
            rc = ckv_copy_h2d(ctx, (char *)v + h * head_bytes,
                              (char *)qkv.v + ckv_qkv_kv_index(&qkv, h, 0) * esz, head_bytes);
    }
    if (rc)
        goto out;

    /* bandwidth references (same thread count as the kernels), timed in the rep loop below */
    bw_a = malloc(bw_bytes);
    bw_b = malloc(bw_bytes);
    t_cp = malloc(sizeof(double) * cfg->reps);
    t_rd = malloc(sizeof(double) * cfg->reps);
    if (!bw_a || !bw_b || !t_cp || !t_rd) {
        rc = -ENOMEM;
        goto out;
    }
    memset(bw_a, 1, bw_bytes);
    memset(bw_b, 2, bw_bytes);

    /* ClusterKV state after prefill */
    int clustered = CKV_MAX(0, n - cfg->sinks - cfg->window);
    int C = (clustered + cfg->tokens_per_cluster - 1) / cfg->tokens_per_cluster;
    int slots = NKV * (n / 16 + C + 4);
    rc = ckv_sparse_layout_init(&l, NKV, NKV * C + 1, NKV * clustered + 1);
    if (!rc)
        rc = ckv_dev_alloc(ctx, sizeof(float) * ((size_t)NKV * C + 1) * HD, (void **)&cen);
    if (!rc)
        rc = ckv_dev_alloc(ctx, ckv_block_bytes(HD, qkv.dtype) * slots, &pool);
    double km[NKV], it = 0;
    struct ckv_kmeans_params kp = {
        .n_clusters = CKV_MAX(C, 1), .max_iter = cfg->kmeans_iter, .tol = 0.001f, .seed = 7};
    for (int h = 0; rc == 0 && h < NKV; h++) {
        rc = ckv_sparse_add_head(ctx, &l, h, (char *)k + h * head_bytes, (char *)v + h * head_bytes,
                                 qkv.dtype, HD, HD, n, cfg->sinks, cfg->window, &kp, cen, pool,
                                 slots);
        km[h] = l.last_kmeans_ms;
        it += l.last_kmeans_iters;
    }
    if (rc)
        goto out;
    /* the f16 copy of the centroids the selection may read instead (as an engine keeps it) */
    rc = ckv_dev_alloc(ctx, sizeof(uint16_t) * ((size_t)l.n_clusters_total + 1) * HD,
                       (void **)&cen16);
    if (!rc)
        rc = ckv_convert(ctx, cen16, CKV_DTYPE_F16, cen, CKV_DTYPE_F32,
                         (size_t)l.n_clusters_total * HD);
    if (rc)
        goto out;
    row->n_clusters = l.n_clusters_total / NKV;
    row->kmeans_ms = median(km, NKV);
    row->kmeans_iters = it / NKV;
    row->n_budgets = n_budgets;
    n_run = 3 * n_budgets;
    runners = calloc((size_t)n_run, sizeof(*runners));
    rc = runners ? 0 : -ENOMEM;
    for (int i = 0; rc == 0 && i < n_run; i++)
        rc = runner_init(&runners[i], cfg, &l, budgets[i / 3],
                         i % 3 == 0   ? CKV_SELECT_KVHEAD_MAX
                         : i % 3 == 1 ? CKV_SELECT_KVHEAD_SUM
                                      : CKV_SELECT_PER_QHEAD);

    /* the timed calls, interleaved rep by rep so that the bandwidth references, full
     * attention and every ClusterKV configuration see the same machine (other processes come
     * and go) */
    float out[NQ * HD];
    for (int r = 0; rc == 0 && r < cfg->reps; r++) {
        flush_caches();
        t_cp[r] = bandwidth_once(bw_b, bw_a, bw_bytes, ckv_ctx_n_threads(ctx), 0);
        flush_caches();
        t_rd[r] = bandwidth_once(NULL, bw_a, bw_bytes, ckv_ctx_n_threads(ctx), 1);
        const float *q = qkv.q + (size_t)r * NQ * HD;
        struct ckv_attn_full_args fa = {.n_q_heads = NQ,
                                        .n_kv_heads = NKV,
                                        .head_dim = HD,
                                        .n_ctx = n,
                                        .q = q,
                                        .k = k,
                                        .v = v,
                                        .dtype = qkv.dtype,
                                        .head_stride = (size_t)n * HD,
                                        .token_stride = HD,
                                        .out = out};
        flush_caches();
        uint64_t t0 = ckv_now_ns();
        rc = ckv_attn_decode_full(ctx, &fa);
        t[r] = (double)(ckv_now_ns() - t0) * 1e-6;
        for (int i = 0; rc == 0 && i < n_run; i++) {
            flush_caches();
            rc = runner_step(&runners[i], ctx, &l, cen, cfg->centroid_f16 ? cen16 : NULL, pool,
                             qkv.dtype, q, r);
        }
    }
    if (rc == 0) {
        size_t per = bw_bytes / (size_t)ckv_ctx_n_threads(ctx) & ~(size_t)63;
        double moved = (double)(per * (size_t)ckv_ctx_n_threads(ctx));
        row->memcpy_gbs = moved / median(t_cp, cfg->reps) / 1e9;
        row->read_gbs = moved / median(t_rd, cfg->reps) / 1e9;
    }
    if (rc)
        goto out;
    row->full_ms = median(t, cfg->reps);
    row->full_gbs = (double)kv_bytes / (row->full_ms * 1e-3) / 1e9;
    for (int b = 0; b < n_budgets; b++) {
        struct budget_row *br = &row->b[b];
        struct ckv_runner *kv = &runners[3 * b], *sum = &runners[3 * b + 1];
        struct ckv_runner *qh = &runners[3 * b + 2];
        br->budget = budgets[b];
        br->ckv_ms_kv = median(kv->t_total, cfg->reps);
        br->sel_ms_kv = median(kv->t_sel, cfg->reps);
        br->ckv_ms_sum = median(sum->t_total, cfg->reps);
        br->ckv_ms_q = median(qh->t_total, cfg->reps);
        br->tokens_kv = (double)kv->tokens / cfg->reps / kv->n_units;
        br->tokens_q = (double)qh->tokens / cfg->reps / qh->n_units;
    }
out:
    for (int i = 0; runners && i < n_run; i++)
        runner_free(&runners[i]);
    free(runners);
    ckv_sparse_layout_free(&l);
    ckv_dev_free(ctx, cen);
    ckv_dev_free(ctx, cen16);
    ckv_dev_free(ctx, pool);
    ckv_dev_free(ctx, k);
    ckv_dev_free(ctx, v);
    free(bw_a), free(bw_b), free(t), free(t_cp), free(t_rd);
    ckv_qkv_free(&qkv);
    return rc;
}

/* ---- report ---- */

static void print_tables(const struct ctx_row *rows, int n_rows, const char *describe,
                         const char *command, const char *centroids)
{
    printf("\nDecode attention, one layer, 32 q heads / 8 KV heads / head_dim 128, f16 KV "
           "(%s; selection reads %s centroids)\n\n",
           describe, centroids);
    printf("| context | KV MiB | full ms | full GB/s | memcpy GB/s | full / memcpy | read GB/s "
           "| full / read |\n|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < n_rows; i++) {
        const struct ctx_row *r = &rows[i];
        printf("| %d | %.0f | %.2f | %.1f | %.1f | %.0f%% | %.1f | %.0f%% |\n", r->n_ctx, r->kv_mib,
               r->full_ms, r->full_gbs, r->memcpy_gbs, 100.0 * r->full_gbs / r->memcpy_gbs,
               r->read_gbs, 100.0 * r->full_gbs / r->read_gbs);
    }
    printf("\n| context | budget | full ms | ClusterKV per KV head (max) ms | speedup | of which "
           "select ms | per KV head (sum) ms | speedup | per q head ms | speedup |\n"
           "|---|---|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < n_rows; i++)
        for (int b = 0; b < rows[i].n_budgets; b++) {
            const struct ctx_row *r = &rows[i];
            const struct budget_row *br = &r->b[b];
            printf("| %d | %d | %.2f | %.3f | %.1fx | %.3f | %.3f | %.1fx | %.3f | %.1fx |\n",
                   r->n_ctx, br->budget, r->full_ms, br->ckv_ms_kv, r->full_ms / br->ckv_ms_kv,
                   br->sel_ms_kv, br->ckv_ms_sum, r->full_ms / br->ckv_ms_sum, br->ckv_ms_q,
                   r->full_ms / br->ckv_ms_q);
        }
    printf("\n| context | clusters per KV head | k-means ms per (layer, KV head) | iterations "
           "|\n|---|---|---|---|\n");
    for (int i = 0; i < n_rows; i++)
        printf("| %d | %d | %.1f | %.1f |\n", rows[i].n_ctx, rows[i].n_clusters, rows[i].kmeans_ms,
               rows[i].kmeans_iters);
    printf("\nmedians of the timed calls; reproduce with:\n  %s\n", command);
}

static int write_json(const char *path, const struct ctx_row *rows, int n_rows,
                      const char *describe, const char *command, const char *centroids)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    fprintf(f, "{\n  \"bench\": \"ckv-bench-attn\",\n  \"backend\": \"%s\",\n", describe);
    fprintf(f, "  \"centroids\": \"%s\",\n", centroids);
    fprintf(f, "  \"command\": \"%s\",\n", command);
    fprintf(f,
            "  \"shape\": {\"n_q_heads\": %d, \"n_kv_heads\": %d, \"head_dim\": %d, "
            "\"kv_dtype\": \"f16\"},\n",
            NQ, NKV, HD);
    for (int i = 0; i < n_rows; i++) {
        const struct ctx_row *r = &rows[i];
        if (r->n_ctx != 32768)
            continue;
        for (int b = 0; b < r->n_budgets; b++)
            if (r->b[b].budget == 1024) {
                fprintf(f, "  \"speedup_32k_b1024\": %.3f,\n", r->full_ms / r->b[b].ckv_ms_kv);
                fprintf(f, "  \"speedup_32k_b1024_kvhead_sum\": %.3f,\n",
                        r->full_ms / r->b[b].ckv_ms_sum);
                fprintf(f, "  \"speedup_32k_b1024_per_qhead\": %.3f,\n",
                        r->full_ms / r->b[b].ckv_ms_q);
            }
        fprintf(f, "  \"full_attn_bw_fraction\": %.4f,\n", r->full_gbs / r->memcpy_gbs);
        fprintf(f, "  \"full_attn_read_bw_fraction\": %.4f,\n", r->full_gbs / r->read_gbs);
        fprintf(f, "  \"kmeans_ms_32k\": %.3f,\n", r->kmeans_ms);
    }
    fprintf(f, "  \"contexts\": [\n");
    for (int i = 0; i < n_rows; i++) {
        const struct ctx_row *r = &rows[i];
        fprintf(f,
                "    {\"n_ctx\": %d, \"kv_mib\": %.1f, \"full_ms\": %.4f, \"full_gbs\": %.3f, "
                "\"memcpy_gbs\": %.3f, \"read_gbs\": %.3f, \"full_attn_bw_fraction\": %.4f, "
                "\"clusters_per_kv_head\": %d, \"kmeans_ms\": %.3f, \"kmeans_iters\": %.2f, "
                "\"budgets\": [",
                r->n_ctx, r->kv_mib, r->full_ms, r->full_gbs, r->memcpy_gbs, r->read_gbs,
                r->full_gbs / r->memcpy_gbs, r->n_clusters, r->kmeans_ms, r->kmeans_iters);
        for (int b = 0; b < r->n_budgets; b++) {
            const struct budget_row *br = &r->b[b];
            fprintf(f,
                    "%s\n      {\"budget\": %d, \"clusterkv_ms_kvhead\": %.4f, "
                    "\"speedup_kvhead\": %.3f, \"select_ms_kvhead\": %.4f, "
                    "\"clusterkv_ms_kvhead_sum\": %.4f, \"speedup_kvhead_sum\": %.3f, "
                    "\"tokens_per_unit_kvhead\": %.1f, "
                    "\"clusterkv_ms_qhead\": %.4f, \"speedup_qhead\": %.3f, "
                    "\"tokens_per_unit_qhead\": %.1f}",
                    b ? "," : "", br->budget, br->ckv_ms_kv, r->full_ms / br->ckv_ms_kv,
                    br->sel_ms_kv, br->ckv_ms_sum, r->full_ms / br->ckv_ms_sum, br->tokens_kv,
                    br->ckv_ms_q, r->full_ms / br->ckv_ms_q, br->tokens_q);
        }
        fprintf(f, "]}%s\n", i + 1 < n_rows ? "," : "");
    }
    fprintf(f, "  ]\n}\n");
    return fclose(f) ? -errno : 0;
}

int main(int argc, char **argv)
{
    ckv_log_init("ckv-bench-attn", CKV_LOG_WARN);
    struct bench_cfg cfg;
    static const struct ckv_main_spec spec = {
        .prog = "ckv-bench-attn",
        .usage = "usage: ckv-bench-attn [options]\n",
        .table = bench_options,
    };
    int rc = ckv_main_config(&spec, &cfg, NULL, argc, argv);
    if (rc)
        return rc == 1 ? 0 : rc;
    int contexts[MAX_CONTEXTS], budgets[MAX_BUDGETS];
    int n_ctx = parse_list(cfg.quick ? "32768" : cfg.contexts, contexts, MAX_CONTEXTS);
    int n_b = parse_list(cfg.quick ? "1024" : cfg.budgets, budgets, MAX_BUDGETS);
    if (n_ctx < 0 || n_b < 0) {
        fprintf(stderr, "ckv-bench-attn: --contexts and --budgets take positive integers "
                        "separated by commas (at most 8)\n");
        return 2;
    }
    struct ckv_buf cmd = {0};
    for (int i = 0; i < argc; i++)
        ckv_buf_printf(&cmd, "%s%s", i ? " " : "", i ? argv[i] : "build/bin/ckv-bench-attn");
    struct ckv_ctx_opts o = {
        .backend = CKV_BACKEND_CPU, .n_threads = cfg.threads, .isa = (enum ckv_cpu_isa)cfg.isa};
    ckv_ctx_t *ctx = NULL;
    rc = ckv_ctx_new(&o, &ctx);
    if (rc) {
        fprintf(stderr, "ckv-bench-attn: cpu context: %s\n", ckv_strerror(rc));
        return 1;
    }
    flush_buf = calloc(2, FLUSH_BYTES);
    flush_ctx = ctx;
    struct ctx_row rows[MAX_CONTEXTS];
    uint64_t t0 = ckv_now_ns();
    for (int i = 0; i < n_ctx && rc == 0; i++) {
        fprintf(stderr, "context %d...\n", contexts[i]);
        rc = run_context(ctx, &cfg, contexts[i], budgets, n_b, &rows[i]);
    }
    if (rc) {
        fprintf(stderr, "ckv-bench-attn: %s\n", ckv_strerror(rc));
    } else {
        print_tables(rows, n_ctx, ckv_ctx_describe(ctx), cmd.data,
                     centroid_names[cfg.centroid_f16]);
        printf("(%.1f s in all)\n", ckv_elapsed_s(t0));
        if (cfg.json[0]) {
            rc = write_json(cfg.json, rows, n_ctx, ckv_ctx_describe(ctx), cmd.data,
                            centroid_names[cfg.centroid_f16]);
            if (rc)
                fprintf(stderr, "ckv-bench-attn: %s: %s\n", cfg.json, ckv_strerror(rc));
        }
    }
    free(flush_buf);
    ckv_buf_free(&cmd);
    ckv_ctx_destroy(&ctx);
    return rc ? 1 : 0;
}
