/*
 * ckv eval-attn: how much of the true attention each selection rule keeps, on Q/K/V dumps
 * (docs/QKV_DUMP.md) or on structured synthetic data, per method and token budget.
 *
 *   ckv eval-attn --synthetic [--n-prompt 16384 --steps 64] --out out/eval
 *   ckv eval-attn --dump DIR_OR_FILE --out out/eval
 *
 * Methods (ALGORITHM.md sections 3 and 6): clusterkv-q (selection per query head, the
 * authors'), clusterkv-kv (per KV head, max over the group), clusterkv-kvsum (per KV head,
 * sum), quest (16-token pages by their min/max bound, per query head), streaming (the most
 * recent tokens), oracle (the tokens of largest true weight, per query head).
 *
 * Fair budgets: at every step all methods attend the same always-on set A (the sinks and the
 * decode window: decoded tokens since the last window clustering, the current one included)
 * and exactly B more tokens chosen by their rule from the rest. Each rule ranks tokens (by
 * cluster, page, recency or weight), so the set for budget B is a prefix of one ranking and
 * every budget is measured from one pass.
 *
 * Per method and budget, averaged over steps and query heads (and layers of a dump):
 *   recall        share of the full softmax mass on A and the chosen tokens (ALGORITHM.md 7)
 *   out_rel_err   |o_sparse - o_full| / |o_full| of the attention output
 *   hit rate      of the units (clusters, pages, tokens) a KV head needs at a step, the share
 *                 already needed at one of the previous R steps (a cache holding the last R
 *                 steps' units would hold them), counted in units and in tokens
 * Writes OUT/eval-attn.csv, OUT/eval-attn.gp and, with gnuplot installed, OUT/eval-attn.png
 * (recall against budget).
 *
 * ClusterKV state follows ALGORITHM.md: the prompt's tokens after the sinks are clustered
 * (ceil(n / tokens-per-cluster) clusters per KV head); every `window` decoded tokens the
 * window is clustered into `window-clusters` new clusters and restarts.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_cmds.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_half.h"
#include "ckv_log.h"
#include "ckv_qkv.h"
#include "kernels.h"

#define MAX_BUDGETS 16
#define N_METHODS   6

enum method { M_CKV_Q, M_CKV_KV, M_CKV_KVSUM, M_QUEST, M_STREAMING, M_ORACLE };
static const char *const method_names[N_METHODS] = {
    "clusterkv-q", "clusterkv-kv", "clusterkv-kvsum", "quest", "streaming", "oracle"};
static const char *const method_units[N_METHODS] = {"cluster", "cluster", "cluster",
                                                    "page",    "token",   "token"};

static const char *const centroid_names[] = {"f32", "f16", NULL};

struct eval_cfg {
    char dump[512];
    bool synthetic;
    char out[512];
    char budgets[256];
    char methods[256];
    int n_prompt, steps, n_q_heads, n_kv_heads, head_dim;
    int sinks, window, tokens_per_cluster, window_clusters, kmeans_iter, hit_r, threads, seed;
    double query_gain, key_noise, group_share, drift;
    int topics;
    int centroid_f16;
    int max_steps;
};

static const struct ckv_config_opt eval_options[] = {
    CKV_OPT_STRING(struct eval_cfg, dump, "dump", "",
                   "a dump file (layer-LL.qkv) or a directory of them (every layer evaluated)"),
    CKV_OPT_BOOL(struct eval_cfg, synthetic, "synthetic", "no", "generate structured data"),
    CKV_OPT_STRING(struct eval_cfg, out, "out", "out/eval-attn", "directory for CSV and PNG"),
    CKV_OPT_STRING(struct eval_cfg, budgets, "budgets", "64,128,256,512,1024,2048",
                   "token budgets, comma-separated"),
    CKV_OPT_STRING(struct eval_cfg, methods, "methods",
                   "clusterkv-q,clusterkv-kv,clusterkv-kvsum,quest,streaming,oracle",
                   "methods, comma-separated"),
    CKV_OPT_INT(struct eval_cfg, n_prompt, "n-prompt", "16384", 16, 1 << 21,
                "synthetic: prompt tokens"),
    CKV_OPT_INT(struct eval_cfg, steps, "steps", "64", 1, 1 << 20, "synthetic: decode steps"),
    CKV_OPT_INT(struct eval_cfg, n_q_heads, "n-q-heads", "32", 1, 1024, "synthetic: query heads"),
    CKV_OPT_INT(struct eval_cfg, n_kv_heads, "n-kv-heads", "8", 1, 1024, "synthetic: KV heads"),
    CKV_OPT_INT(struct eval_cfg, head_dim, "head-dim", "128", 1, CKV_MAX_HEAD_DIM,
                "synthetic: head dimension"),
    CKV_OPT_DOUBLE(struct eval_cfg, query_gain, "query-gain", "12", 0, 100,
                   "synthetic: logit of a query's topics (attention peakedness)"),
    CKV_OPT_INT(struct eval_cfg, topics, "topics", "0", 0, 1 << 20,
                "synthetic: key directions per KV head (0: one per 256 prompt tokens)"),
    CKV_OPT_DOUBLE(struct eval_cfg, key_noise, "key-noise", "0.8", 0, 10,
                   "synthetic: key noise around its topic"),
    CKV_OPT_DOUBLE(struct eval_cfg, group_share, "group-share", "0.5", 0, 1,
                   "synthetic: chance a query topic is shared by its GQA group"),
    CKV_OPT_DOUBLE(struct eval_cfg, drift, "drift", "0.02", 0, 1,
                   "synthetic: chance per step that a query topic changes"),
    CKV_OPT_INT(struct eval_cfg, seed, "seed", "1", 0, INT_MAX, "synthetic: seed"),
    CKV_OPT_INT(struct eval_cfg, max_steps, "max-steps", "0", 0, INT_MAX,
                "evaluate at most this many steps per layer (0: all)"),
    CKV_OPT_INT(struct eval_cfg, sinks, "sinks", "16", 0, 4096, "attention sink tokens"),
    CKV_OPT_INT(struct eval_cfg, window, "window", "320", 1, 65536,
                "decoded tokens per window before it is clustered"),
    CKV_OPT_INT(struct eval_cfg, tokens_per_cluster, "tokens-per-cluster", "80", 1, 1 << 20,
                "prompt tokens per cluster"),
    CKV_OPT_INT(struct eval_cfg, window_clusters, "window-clusters", "8", 1, 4096,
                "clusters per clustered window"),
    CKV_OPT_INT(struct eval_cfg, kmeans_iter, "kmeans-iter", "20", 1, 1000, "k-means iterations"),
    CKV_OPT_ENUM(struct eval_cfg, centroid_f16, "centroids", "f32", centroid_names,
                 "ClusterKV scores clusters with f32 centroids or their f16 copy"),
    CKV_OPT_INT(struct eval_cfg, hit_r, "hit-r", "8", 1, 4096,
                "cache hit rate: units seen in the last R steps"),
    CKV_OPT_INT(struct eval_cfg, threads, "threads", "0", 0, 1024, "CPU threads; 0: all cores"),
    CKV_OPT_END,
};

/* ---- one KV head's clusters, growing as windows are clustered ---- */

struct head_clusters {
    int n, cap;
    float *cen;       /* (cap, d) */
    int32_t *size;    /* (cap) */
    int32_t *mstart;  /* (cap) first member index in members */
    int32_t *members; /* positions, cluster after cluster */
    int n_members, cap_members;
};

static int hc_add(struct head_clusters *hc, int d, int n_new, const float *cen,
                  const int32_t *sizes, const int32_t *members, int n_members)
{
    if (hc->n + n_new > hc->cap) {
        int cap = CKV_MAX(hc->cap * 2, hc->n + n_new);
        float *c = realloc(hc->cen, sizeof(float) * (size_t)cap * d);
        if (!c)
            return -ENOMEM;
        hc->cen = c;
        int32_t *s = realloc(hc->size, sizeof(int32_t) * cap), *m;
        if (!s)
            return -ENOMEM;
        hc->size = s;
        if (!(m = realloc(hc->mstart, sizeof(int32_t) * cap)))
            return -ENOMEM;
        hc->mstart = m;
        hc->cap = cap;
    }
    if (hc->n_members + n_members > hc->cap_members) {
        int cap = CKV_MAX(hc->cap_members * 2, hc->n_members + n_members);
        int32_t *m = realloc(hc->members, sizeof(int32_t) * cap);
        if (!m)
            return -ENOMEM;
        hc->members = m;
        hc->cap_members = cap;
    }
    memcpy(hc->cen + (size_t)hc->n * d, cen, sizeof(float) * (size_t)n_new * d);
    for (int c = 0; c < n_new; c++) {
        hc->size[hc->n + c] = sizes[c];
        hc->mstart[hc->n + c] = hc->n_members;
        memcpy(hc->members + hc->n_members, members, sizeof(int32_t) * sizes[c]);
        hc->n_members += sizes[c];
        members += sizes[c];
    }
    hc->n += n_new;
    return 0;
}

/* Clusters tokens [t0, t1) of head h (keys f16/f32 of the data set) and appends them. */
static int cluster_range(ckv_ctx_t *ctx, const struct ckv_qkv *q, const struct eval_cfg *cfg,
                         struct head_clusters *hc, int h, int t0, int t1, int n_clusters)
{
    int n = t1 - t0, d = q->head_dim;
    if (n <= 0)
        return 0;
    int C = CKV_MIN(n_clusters, n);
    float *cen = malloc(sizeof(float) * (size_t)C * d);
    int32_t *sizes = malloc(sizeof(int32_t) * C), *offs = malloc(sizeof(int32_t) * (C + 1));
    int32_t *mem = malloc(sizeof(int32_t) * n);
    int rc = cen && sizes && offs && mem ? 0 : -ENOMEM, nc = 0;
    struct ckv_kmeans_params p = {.n_clusters = C,
                                  .max_iter = cfg->kmeans_iter,
                                  .tol = 0.001f,
                                  .seed = (uint64_t)(h * 7919 + t0)};
    struct ckv_kmeans_out o = {cen, sizes, offs, mem};
    if (!rc)
        rc = ckv_kmeans(ctx,
                        (const char *)q->k + ckv_qkv_kv_index(q, h, t0) * ckv_dtype_size(q->dtype),
                        q->dtype, n, d, (size_t)d, t0, &p, &o, &nc, NULL);
    if (!rc)
        rc = hc_add(hc, d, nc, cen, sizes, mem, n);
    free(cen), free(sizes), free(offs), free(mem);
    return rc;
}

/* ---- accumulators ---- */

struct acc {
    double recall, err, err_n, recall_n;
    double attended;
    double hit_units, all_units, hit_tokens, all_tokens;
};

struct eval_result {
    int n_budgets;
    int budgets[MAX_BUDGETS];
    int enabled[N_METHODS];
    struct acc a[N_METHODS][MAX_BUDGETS];
    int steps;
};

/* Per (method, budget, KV head): for each unit, the last step it was needed (last) and,
 * once it is needed at the current step, the step before that (prev). */
struct hit_state {
    int32_t *last, *prev; /* (cap) */
    int cap;
};

static int hit_grow(struct hit_state *hs, int n)
{
    if (n <= hs->cap)
        return 0;
    int cap = CKV_MAX(n, hs->cap * 2);
    int32_t *l = realloc(hs->last, sizeof(int32_t) * cap), *p;
    if (!l)
        return -ENOMEM;
    hs->last = l;
    if (!(p = realloc(hs->prev, sizeof(int32_t) * cap)))
        return -ENOMEM;
    hs->prev = p;
    for (int i = hs->cap; i < cap; i++)
        l[i] = p[i] = INT_MIN / 2;
    hs->cap = cap;
    return 0;
}

/* A ranked list of one selection unit (KV head or query head): tokens in priority order and,
 * for the hit rate, the unit of each token. */
struct ranked {
    int32_t *tok, *unit;
    int n, cap;
};

static int ranked_push(struct ranked *r, int32_t tok, int32_t unit)
{
    if (r->n == r->cap) {
        int cap = CKV_MAX(64, r->cap * 2);
        int32_t *t = realloc(r->tok, sizeof(int32_t) * cap), *u;
        if (!t)
            return -ENOMEM;
        r->tok = t;
        if (!(u = realloc(r->unit, sizeof(int32_t) * cap)))
            return -ENOMEM;
        r->unit = u;
        r->cap = cap;
    }
    r->tok[r->n] = tok;
    r->unit[r->n] = unit;
    r->n++;
    return 0;
}

/* ---- evaluating one layer ---- */

struct layer_eval {
    const struct eval_cfg *cfg;
    ckv_ctx_t *ctx;
    const struct ckv_qkv *q;
    struct eval_result *res;
    int G, d, b_max;
    float *kf, *vf;           /* (nkv, n_ctx, d) f32 */
    struct head_clusters *hc; /* (nkv) */
    struct hit_state *hits;   /* (N_METHODS, n_budgets, nkv) */
    struct ranked *rk;        /* (nq) lists of the current method */
    char *in_a;               /* (n_ctx) token is in the always-on set */
    double *p;                /* (nq, n_ctx) softmax weights at this step */
    double *o_full;           /* (nq, d) */
    double *acc_a, *mass_a;   /* (nq, d), (nq): the always-on set's contribution */
};

static double vnorm(const double *x, int d)
{
    double s = 0;
    for (int i = 0; i < d; i++)
        s += x[i] * x[i];
    return sqrt(s);
}

/* Walks each query head's ranked list, recording recall and output error at every budget,
 * and the hit rate of the units each KV head needs. lists_per_kv: the ranked list of query
 * head qh is rk[qh] (per-query-head methods) or rk[qh / G] (per-KV-head ones). */
static int score_lists(struct layer_eval *e, int m, int step, int per_kv)
{
    const struct ckv_qkv *q = e->q;
    const int d = e->d, nq = q->n_q_heads, nkv = q->n_kv_heads, nb = e->res->n_budgets;
    double *acc = malloc(sizeof(double) * d);
    if (!acc)
        return -ENOMEM;
    for (int qh = 0; qh < nq; qh++) {
        const struct ranked *r = &e->rk[per_kv ? qh / e->G : qh];
        const double *p = e->p + (size_t)qh * q->n_ctx;
        memcpy(acc, e->acc_a + (size_t)qh * d, sizeof(double) * d);
        double mass = e->mass_a[qh];
        int i = 0;
        const int h = qh / e->G;
        for (int b = 0; b < nb; b++) {
            int want = e->res->budgets[b];
            for (; i < r->n && i < want; i++) {
                int t = r->tok[i];
                mass += p[t];
                const float *v = e->vf + ((size_t)h * q->n_ctx + t) * d;
                for (int j = 0; j < d; j++)
                    acc[j] += p[t] * v[j];
            }
            double diff = 0;
            for (int j = 0; j < d; j++) {
                double o = mass > 0 ? acc[j] / mass : 0;
                diff += (o - e->o_full[(size_t)qh * d + j]) * (o - e->o_full[(size_t)qh * d + j]);
            }
            double of = vnorm(e->o_full + (size_t)qh * d, d);
            struct acc *a = &e->res->a[m][b];
            a->recall += mass;
            a->recall_n += 1;
            if (of > 0) {
                a->err += sqrt(diff) / of;
                a->err_n += 1;
            }
            a->attended += i; /* plus |A|, added by the caller */
        }
    }
    /* hit rate, per KV head over its lists' prefixes (the cache is per KV head): a unit is a
     * hit when it was needed at one of the previous R steps; tokens count every (list,
     * token) attended, units every distinct unit of the step. Step 0 has no history. */
    const int R = e->cfg->hit_r;
    for (int b = 0; b < nb; b++) {
        int want = e->res->budgets[b];
        struct acc *a = &e->res->a[m][b];
        for (int h = 0; h < nkv; h++) {
            struct hit_state *hs = &e->hits[((size_t)m * MAX_BUDGETS + b) * nkv + h];
            int first = per_kv ? h : h * e->G, n_lists = per_kv ? 1 : e->G;
            for (int l = 0; l < n_lists; l++) {
                const struct ranked *r = &e->rk[first + l];
                for (int i = 0; i < r->n && i < want; i++) {
                    int u = r->unit[i];
                    if (hit_grow(hs, u + 1)) {
                        free(acc);
                        return -ENOMEM;
                    }
                    if (hs->last[u] != step) { /* first need of u at this step */
                        hs->prev[u] = hs->last[u];
                        hs->last[u] = step;
                        if (step > 0) {
                            a->all_units += 1;
                            a->hit_units += hs->prev[u] >= step - R;
                        }
                    }
                    if (step > 0) {
                        a->all_tokens += 1;
                        a->hit_tokens += hs->prev[u] >= step - R;
                    }
                }
            }
        }
    }
    free(acc);
    return 0;
}

/* Rebuilds the global cluster arrays the selection kernel wants from the heads' lists. */
struct global_clusters {
    float *cen;
    uint16_t *cen16; /* the f16 copy, when --centroids f16 */
    int32_t *sizes, *head_off, *head_of, *local_of;
    int total;
};

static int gc_build(struct global_clusters *g, const struct head_clusters *hc, int nkv, int d)
{
    int total = 0;
    for (int h = 0; h < nkv; h++)
        total += hc[h].n;
    free(g->cen), free(g->cen16), free(g->sizes), free(g->head_off), free(g->head_of);
    free(g->local_of);
    g->cen = malloc(sizeof(float) * ((size_t)total + 1) * d);
    g->cen16 = malloc(sizeof(uint16_t) * ((size_t)total + 1) * d);
    g->sizes = malloc(sizeof(int32_t) * (total + 1));
    g->head_off = malloc(sizeof(int32_t) * (nkv + 1));
    g->head_of = malloc(sizeof(int32_t) * (total + 1));
    g->local_of = malloc(sizeof(int32_t) * (total + 1));
    if (!g->cen || !g->cen16 || !g->sizes || !g->head_off || !g->head_of || !g->local_of)
        return -ENOMEM;
    int c = 0;
    for (int h = 0; h < nkv; h++) {
        g->head_off[h] = c;
        memcpy(g->cen + (size_t)c * d, hc[h].cen, sizeof(float) * (size_t)hc[h].n * d);
        for (int i = 0; i < hc[h].n; i++, c++) {
            g->sizes[c] = hc[h].size[i];
            g->head_of[c] = h;
            g->local_of[c] = i;
        }
    }
    g->head_off[nkv] = c;
    g->total = total;
    for (size_t i = 0; i < (size_t)total * d; i++)
        g->cen16[i] = ckv_half_from_f32(g->cen[i]);
    return 0;
}

static void gc_free(struct global_clusters *g)
{
    free(g->cen), free(g->cen16), free(g->sizes);
    free(g->head_off), free(g->head_of), free(g->local_of);
    memset(g, 0, sizeof(*g));
}

/* Ranked token lists of a ClusterKV mode: clusters best-first, members in storage order,
 * tokens of the always-on set skipped (there are none: A is never clustered). */
static int rank_clusterkv(struct layer_eval *e, const struct global_clusters *g,
                          enum ckv_select_mode mode, const float *qstep)
{
    const struct ckv_qkv *q = e->q;
    int n_units = mode == CKV_SELECT_PER_QHEAD ? q->n_q_heads : q->n_kv_heads;
    int max_head = 0;
    for (int h = 0; h < q->n_kv_heads; h++)
        max_head = CKV_MAX(max_head, g->head_off[h + 1] - g->head_off[h]);
    int max_sel = CKV_MAX(1, max_head);
    int32_t *sel = malloc(sizeof(int32_t) * (size_t)n_units * max_sel);
    int32_t *cnt = malloc(sizeof(int32_t) * n_units), *last = malloc(sizeof(int32_t) * n_units);
    int rc = sel && cnt && last ? 0 : -ENOMEM;
    struct ckv_select_args a = {.n_q_heads = q->n_q_heads,
                                .n_kv_heads = q->n_kv_heads,
                                .head_dim = e->d,
                                .mode = mode,
                                .q = qstep,
                                .centroids = g->cen,
                                .sizes = g->sizes,
                                .head_offsets = g->head_off,
                                .n_clusters_total = g->total,
                                .budget = e->b_max,
                                .max_selected = max_sel,
                                .sel_clusters = sel,
                                .sel_count = cnt,
                                .sel_last_take = last,
                                .centroids_f16 = e->cfg->centroid_f16 ? g->cen16 : NULL};
    if (!rc)
        rc = ckv_select_clusters(e->ctx, &a);
    for (int u = 0; rc == 0 && u < n_units; u++) {
        struct ranked *r = &e->rk[u];
        r->n = 0;
        for (int i = 0; rc == 0 && i < cnt[u] && r->n < e->b_max; i++) {
            int c = sel[(size_t)u * max_sel + i];
            const struct head_clusters *hc = &e->hc[g->head_of[c]];
            int lc = g->local_of[c];
            for (int j = 0; rc == 0 && j < hc->size[lc] && r->n < e->b_max; j++)
                rc = ranked_push(r, hc->members[hc->mstart[lc] + j], lc);
        }
    }
    free(sel), free(cnt), free(last);
    return rc;
}

/* Quest: per query head, pages by their bound, tokens outside A, page order. */
static int rank_quest(struct layer_eval *e, int pos, const float *qstep)
{
    const struct ckv_qkv *q = e->q;
    const int d = e->d, n = pos + 1, np = (n + 15) / 16;
    float *mn = malloc(sizeof(float) * (size_t)q->n_kv_heads * np * d);
    float *mx = malloc(sizeof(float) * (size_t)q->n_kv_heads * np * d);
    int n_sel = np; /* every page ranked: the ones inside A are skipped below */
    int32_t *sp = malloc(sizeof(int32_t) * (size_t)q->n_q_heads * n_sel);
    int32_t *cnt = malloc(sizeof(int32_t) * q->n_q_heads);
    int rc = mn && mx && sp && cnt ? 0 : -ENOMEM;
    size_t esz = ckv_dtype_size(q->dtype);
    for (int h = 0; rc == 0 && h < q->n_kv_heads; h++)
        rc = ckv_quest_page_bounds(e->ctx, (const char *)q->k + ckv_qkv_kv_index(q, h, 0) * esz,
                                   q->dtype, n, d, (size_t)d, mn + (size_t)h * np * d,
                                   mx + (size_t)h * np * d);
    struct ckv_quest_args a = {.n_q_heads = q->n_q_heads,
                               .n_kv_heads = q->n_kv_heads,
                               .head_dim = d,
                               .mode = CKV_SELECT_PER_QHEAD,
                               .q = qstep,
                               .page_min = mn,
                               .page_max = mx,
                               .n_pages = np,
                               .n_select = n_sel,
                               .sel_pages = sp,
                               .sel_count = cnt};
    if (!rc)
        rc = ckv_quest_select(e->ctx, &a);
    for (int qh = 0; rc == 0 && qh < q->n_q_heads; qh++) {
        struct ranked *r = &e->rk[qh];
        r->n = 0;
        for (int i = 0; rc == 0 && i < cnt[qh] && r->n < e->b_max; i++) {
            int pg = sp[(size_t)qh * n_sel + i];
            for (int t = pg * 16; rc == 0 && t < CKV_MIN(n, pg * 16 + 16) && r->n < e->b_max; t++)
                if (!e->in_a[t])
                    rc = ranked_push(r, t, pg);
        }
    }
    free(mn), free(mx), free(sp), free(cnt);
    return rc;
}

static int rank_streaming(struct layer_eval *e, int pos)
{
    for (int qh = 0; qh < e->q->n_q_heads; qh++) {
        struct ranked *r = &e->rk[qh];
        r->n = 0;
        for (int t = pos; t >= 0 && r->n < e->b_max; t--)
            if (!e->in_a[t] && ranked_push(r, t, t))
                return -ENOMEM;
    }
    return 0;
}

static int rank_oracle(struct layer_eval *e, int pos, int n_in_a, const float *qstep)
{
    const struct ckv_qkv *q = e->q;
    int n = pos + 1, want = CKV_MIN(n, e->b_max + n_in_a);
    int32_t *sel = malloc(sizeof(int32_t) * (size_t)q->n_q_heads * want);
    if (!sel)
        return -ENOMEM;
    int rc = ckv_oracle_topk(e->ctx, qstep, q->k, q->dtype, q->n_q_heads, q->n_kv_heads, e->d, n,
                             (size_t)q->n_ctx * e->d, (size_t)e->d, want, sel);
    for (int qh = 0; rc == 0 && qh < q->n_q_heads; qh++) {
        struct ranked *r = &e->rk[qh];
        r->n = 0;
        for (int i = 0; rc == 0 && i < want && r->n < e->b_max; i++) {
            int t = sel[(size_t)qh * want + i];
            if (!e->in_a[t])
                rc = ranked_push(r, t, t);
        }
    }
    free(sel);
    return rc;
}

/* Softmax weights, full output and the always-on set's share of one step. */
static void step_reference(struct layer_eval *e, int pos, int win_start, const float *qstep)
{
    const struct ckv_qkv *q = e->q;
    const int d = e->d, n = pos + 1;
    const double scale = 1.0 / sqrt((double)d);
    for (int qh = 0; qh < q->n_q_heads; qh++) {
        const int h = qh / e->G;
        const float *qv = qstep + (size_t)qh * d;
        double *p = e->p + (size_t)qh * q->n_ctx, mx = -INFINITY, sum = 0;
        for (int t = 0; t < n; t++) {
            const float *k = e->kf + ((size_t)h * q->n_ctx + t) * d;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int i = 0;
            for (; i + 4 <= d; i += 4) {
                s0 += qv[i] * k[i], s1 += qv[i + 1] * k[i + 1];
                s2 += qv[i + 2] * k[i + 2], s3 += qv[i + 3] * k[i + 3];
            }
            for (; i < d; i++)
                s0 += qv[i] * k[i];
            p[t] = ((double)s0 + s1 + s2 + s3) * scale;
            mx = p[t] > mx ? p[t] : mx;
        }
        for (int t = 0; t < n; t++)
            sum += (p[t] = exp(p[t] - mx));
        double *of = e->o_full + (size_t)qh * d, *oa = e->acc_a + (size_t)qh * d;
        memset(of, 0, sizeof(double) * d);
        memset(oa, 0, sizeof(double) * d);
        double ma = 0;
        for (int t = 0; t < n; t++) {
            p[t] /= sum;
            const float *v = e->vf + ((size_t)h * q->n_ctx + t) * d;
            for (int j = 0; j < d; j++)
                of[j] += p[t] * v[j];
            if (t < e->cfg->sinks || t >= win_start) {
                ma += p[t];
                for (int j = 0; j < d; j++)
                    oa[j] += p[t] * v[j];
            }
        }
        e->mass_a[qh] = ma;
    }
}

static int eval_layer(const struct eval_cfg *cfg, ckv_ctx_t *ctx, const struct ckv_qkv *q,
                      struct eval_result *res)
{
    struct layer_eval e = {.cfg = cfg, .ctx = ctx, .q = q, .res = res, .d = q->head_dim};
    e.G = q->n_q_heads / q->n_kv_heads;
    e.b_max = res->budgets[res->n_budgets - 1];
    const int nq = q->n_q_heads, nkv = q->n_kv_heads, d = q->head_dim, n_ctx = q->n_ctx;
    size_t kv_el = (size_t)nkv * n_ctx * d;
    struct global_clusters g = {0};
    e.kf = malloc(sizeof(float) * kv_el);
    e.vf = malloc(sizeof(float) * kv_el);
    e.hc = calloc((size_t)nkv, sizeof(*e.hc));
    e.hits = calloc((size_t)N_METHODS * MAX_BUDGETS * nkv, sizeof(*e.hits));
    e.rk = calloc((size_t)nq, sizeof(*e.rk));
    e.in_a = calloc((size_t)n_ctx, 1);
    e.p = malloc(sizeof(double) * (size_t)nq * n_ctx);
    e.o_full = malloc(sizeof(double) * (size_t)nq * d);
    e.acc_a = malloc(sizeof(double) * (size_t)nq * d);
    e.mass_a = malloc(sizeof(double) * nq);
    int rc =
        e.kf && e.vf && e.hc && e.hits && e.rk && e.in_a && e.p && e.o_full && e.acc_a && e.mass_a
            ? 0
            : -ENOMEM;
    if (!rc)
        rc = ckv_convert(ctx, e.kf, CKV_DTYPE_F32, q->k, q->dtype, kv_el);
    if (!rc)
        rc = ckv_convert(ctx, e.vf, CKV_DTYPE_F32, q->v, q->dtype, kv_el);
    /* prefill: the prompt after the sinks, clustered per KV head */
    int sinks = CKV_MIN(cfg->sinks, q->n_prompt);
    int n_clu = q->n_prompt - sinks;
    int C = (n_clu + cfg->tokens_per_cluster - 1) / cfg->tokens_per_cluster;
    for (int h = 0; rc == 0 && h < nkv; h++)
        rc = cluster_range(ctx, q, cfg, &e.hc[h], h, sinks, q->n_prompt, C);
    if (!rc)
        rc = gc_build(&g, e.hc, nkv, d);
    int win_start = q->n_prompt;
    int steps = cfg->max_steps > 0 ? CKV_MIN(cfg->max_steps, q->n_steps) : q->n_steps;
    for (int s = 0; rc == 0 && s < steps; s++) {
        int pos = q->n_prompt + s;
        if (pos - win_start == cfg->window) { /* the window is full: cluster it */
            for (int h = 0; rc == 0 && h < nkv; h++)
                rc = cluster_range(ctx, q, cfg, &e.hc[h], h, win_start, pos, cfg->window_clusters);
            if (!rc)
                rc = gc_build(&g, e.hc, nkv, d);
            win_start = pos;
        }
        memset(e.in_a, 0, (size_t)n_ctx);
        int n_in_a = 0;
        for (int t = 0; t <= pos; t++)
            if (t < sinks || t >= win_start)
                e.in_a[t] = 1, n_in_a++;
        const float *qs = q->q + (size_t)s * nq * d;
        step_reference(&e, pos, win_start, qs);
        for (int m = 0; rc == 0 && m < N_METHODS; m++) {
            if (!res->enabled[m])
                continue;
            int per_kv = 0;
            switch (m) {
            case M_CKV_Q: rc = rank_clusterkv(&e, &g, CKV_SELECT_PER_QHEAD, qs); break;
            case M_CKV_KV:
                rc = rank_clusterkv(&e, &g, CKV_SELECT_KVHEAD_MAX, qs);
                per_kv = 1;
                break;
            case M_CKV_KVSUM:
                rc = rank_clusterkv(&e, &g, CKV_SELECT_KVHEAD_SUM, qs);
                per_kv = 1;
                break;
            case M_QUEST: rc = rank_quest(&e, pos, qs); break;
            case M_STREAMING: rc = rank_streaming(&e, pos); break;
            case M_ORACLE: rc = rank_oracle(&e, pos, n_in_a, qs); break;
            }
            if (!rc)
                rc = score_lists(&e, m, s, per_kv);
        }
        /* attended = A + chosen: add |A| once per step and head */
        for (int m = 0; m < N_METHODS; m++)
            for (int b = 0; b < res->n_budgets; b++)
                res->a[m][b].attended += (double)n_in_a * nq;
    }
    res->steps += steps;
    for (int h = 0; e.hc && h < nkv; h++)
        free(e.hc[h].cen), free(e.hc[h].size), free(e.hc[h].mstart), free(e.hc[h].members);
    for (int i = 0; e.hits && i < N_METHODS * MAX_BUDGETS * nkv; i++)
        free(e.hits[i].last), free(e.hits[i].prev);
    for (int i = 0; e.rk && i < nq; i++)
        free(e.rk[i].tok), free(e.rk[i].unit);
    gc_free(&g);
    free(e.kf), free(e.vf), free(e.hc), free(e.hits), free(e.rk), free(e.in_a), free(e.p);
    free(e.o_full), free(e.acc_a), free(e.mass_a);
    return rc;
}

/* ---- output ---- */

static int write_outputs(const struct eval_cfg *cfg, const struct eval_result *res,
                         const char *source)
{
    char path[700];
    snprintf(path, sizeof(path), "%s/eval-attn.csv", cfg->out);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "ckv eval-attn: %s: %s\n", path, strerror(errno));
        return 1;
    }
    fprintf(f, "method,budget,attended_tokens,recall,out_rel_err,hit_unit,hit_rate_units,"
               "hit_rate_tokens,hit_r,steps,source\n");
    printf("\n%s, %d steps, hit rate over the last %d steps\n\n", source, res->steps, cfg->hit_r);
    printf("| method | budget | attended | recall | output rel. error | hit rate (units) | hit "
           "rate (tokens) |\n|---|---|---|---|---|---|---|\n");
    for (int m = 0; m < N_METHODS; m++) {
        if (!res->enabled[m])
            continue;
        for (int b = 0; b < res->n_budgets; b++) {
            const struct acc *a = &res->a[m][b];
            double rec = a->recall / CKV_MAX(a->recall_n, 1);
            double err = a->err / CKV_MAX(a->err_n, 1);
            double att = a->attended / CKV_MAX(a->recall_n, 1);
            double hu = a->all_units > 0 ? a->hit_units / a->all_units : NAN;
            double ht = a->all_tokens > 0 ? a->hit_tokens / a->all_tokens : NAN;
            fprintf(f, "%s,%d,%.1f,%.6f,%.6f,%s,%.4f,%.4f,%d,%d,%s\n", method_names[m],
                    res->budgets[b], att, rec, err, method_units[m], hu, ht, cfg->hit_r, res->steps,
                    source);
            printf("| %s | %d | %.0f | %.4f | %.4f | %.3f (%ss) | %.3f |\n", method_names[m],
                   res->budgets[b], att, rec, err, hu, method_units[m], ht);
        }
    }
    fclose(f);
    printf("\nwrote %s\n", path);
    /* the plot: recall against budget, one line per method */
    char gp[700], png[700];
    snprintf(gp, sizeof(gp), "%s/eval-attn.gp", cfg->out);
    snprintf(png, sizeof(png), "%s/eval-attn.png", cfg->out);
    f = fopen(gp, "w");
    if (!f) {
        fprintf(stderr, "ckv eval-attn: %s: %s\n", gp, strerror(errno));
        return 1;
    }
    fprintf(f, "# gnuplot script written by ckv eval-attn: gnuplot %s\n", gp);
    fprintf(f, "set terminal pngcairo size 900,600 noenhanced\nset output '%s'\n", png);
    fprintf(f, "set datafile separator ','\nset key bottom right\nset grid\n"
               "set logscale x 2\nset xlabel 'token budget B (plus sinks and window)'\n"
               "set ylabel 'attention recall'\nset yrange [0:1]\n");
    fprintf(f, "set title \"Attention recall against budget (%s, %d steps)\"\n", source,
            res->steps);
    fprintf(f, "plot ");
    int first = 1;
    for (int m = 0; m < N_METHODS; m++)
        if (res->enabled[m]) {
            fprintf(f,
                    "%s'%s/eval-attn.csv' using (strcol(1) eq '%s' ? $2 : NaN):4 with "
                    "linespoints lw 2 title '%s'",
                    first ? "" : ", \\\n     ", cfg->out, method_names[m], method_names[m]);
            first = 0;
        }
    fprintf(f, "\n");
    fclose(f);
    if (system("command -v gnuplot >/dev/null 2>&1") == 0) {
        char cmd[800];
        snprintf(cmd, sizeof(cmd), "gnuplot '%s'", gp);
        if (system(cmd) == 0)
            printf("wrote %s\n", png);
        else
            fprintf(stderr, "ckv eval-attn: gnuplot failed on %s\n", gp);
    } else {
        fprintf(stderr,
                "ckv eval-attn: gnuplot not found (deploy/install-deps.sh --bench "
                "installs it): run 'gnuplot %s' for the PNG\n",
                gp);
    }
    return 0;
}

/* Dump files to evaluate: PATH itself, or every *.qkv in the directory PATH, sorted. */
static int list_dumps(const char *path, char ***out, int *n)
{
    struct stat st;
    *out = NULL;
    *n = 0;
    if (stat(path, &st) != 0)
        return -errno;
    if (!S_ISDIR(st.st_mode)) {
        *out = malloc(sizeof(char *));
        if (!*out || !((*out)[0] = strdup(path)))
            return -ENOMEM;
        *n = 1;
        return 0;
    }
    struct dirent **ents;
    int k = scandir(path, &ents, NULL, alphasort);
    if (k < 0)
        return -errno;
    *out = calloc((size_t)k + 1, sizeof(char *));
    for (int i = 0; i < k; i++) {
        size_t len = strlen(ents[i]->d_name);
        if (*out && len > 4 && strcmp(ents[i]->d_name + len - 4, ".qkv") == 0) {
            char *p = malloc(strlen(path) + len + 2);
            if (p) {
                sprintf(p, "%s/%s", path, ents[i]->d_name);
                (*out)[(*n)++] = p;
            }
        }
        free(ents[i]);
    }
    free(ents);
    return *out ? 0 : -ENOMEM;
}

static int parse_budgets(const char *s, struct eval_result *res)
{
    res->n_budgets = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > (1 << 22) || res->n_budgets == MAX_BUDGETS ||
            (res->n_budgets && v <= res->budgets[res->n_budgets - 1]))
            return -EINVAL;
        res->budgets[res->n_budgets++] = (int)v;
        if (*end && *end != ',')
            return -EINVAL;
        s = *end ? end + 1 : end;
    }
    return res->n_budgets ? 0 : -EINVAL;
}

static int parse_methods(const char *s, struct eval_result *res)
{
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", s);
    int any = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        int found = 0;
        for (int m = 0; m < N_METHODS; m++)
            if (strcmp(tok, method_names[m]) == 0)
                res->enabled[m] = found = any = 1;
        if (!found)
            return -EINVAL;
    }
    return any ? 0 : -EINVAL;
}

/* mkdir -p: creates dir and its missing parents (mode 0755). Returns 0, or -1 with errno. */
static int mkdir_parents(const char *dir)
{
    char p[512];
    snprintf(p, sizeof(p), "%s", dir);
    for (char *c = p + 1; *c; c++)
        if (*c == '/') {
            *c = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST)
                return -1;
            *c = '/';
        }
    return mkdir(p, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

int ckv_cmd_eval_attn(int argc, char **argv)
{
    struct eval_cfg cfg;
    char err[512];
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(eval_options, &u);
            printf("usage: ckv eval-attn (--synthetic | --dump PATH) [options]\n%s", u.data);
            ckv_buf_free(&u);
            return 0;
        }
    if (ckv_config_load(eval_options, &cfg, argc - 1, argv + 1, NULL, 0, NULL, err, sizeof(err))) {
        fprintf(stderr, "ckv eval-attn: %s\n", err);
        return 2;
    }
    static struct eval_result res;
    memset(&res, 0, sizeof(res));
    if (parse_budgets(cfg.budgets, &res)) {
        fprintf(stderr,
                "ckv eval-attn: --budgets takes increasing positive integers, "
                "comma-separated (at most %d)\n",
                MAX_BUDGETS);
        return 2;
    }
    if (parse_methods(cfg.methods, &res)) {
        fprintf(stderr, "ckv eval-attn: --methods: expected a comma-separated list of "
                        "clusterkv-q, clusterkv-kv, clusterkv-kvsum, quest, streaming, oracle\n");
        return 2;
    }
    if (cfg.synthetic == (cfg.dump[0] != 0)) {
        fprintf(stderr, "ckv eval-attn: give exactly one of --synthetic and --dump PATH\n");
        return 2;
    }
    if (cfg.synthetic && cfg.n_q_heads % cfg.n_kv_heads) {
        fprintf(stderr, "ckv eval-attn: --n-q-heads must be a multiple of --n-kv-heads\n");
        return 2;
    }
    if (mkdir_parents(cfg.out) != 0) {
        fprintf(stderr, "ckv eval-attn: --out %s: %s\n", cfg.out, strerror(errno));
        return 1;
    }
    ckv_log_init("ckv", CKV_LOG_WARN);
    struct ckv_ctx_opts o = {.backend = CKV_BACKEND_CPU, .n_threads = cfg.threads};
    ckv_ctx_t *ctx = NULL;
    int rc = ckv_ctx_new(&o, &ctx);
    if (rc) {
        fprintf(stderr, "ckv eval-attn: %s\n", ckv_strerror(rc));
        return 1;
    }
    uint64_t t0 = ckv_now_ns();
    char source[600];
    int status = 0;
    if (cfg.synthetic) {
        struct ckv_qkv_synth_params sp;
        ckv_qkv_synth_defaults(&sp, cfg.n_q_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_prompt,
                               cfg.steps);
        sp.seed = (uint64_t)cfg.seed;
        sp.query_gain = (float)cfg.query_gain;
        sp.key_noise = (float)cfg.key_noise;
        sp.group_share = (float)cfg.group_share;
        sp.drift = (float)cfg.drift;
        if (cfg.topics > 0)
            sp.n_topics = cfg.topics;
        struct ckv_qkv q;
        rc = ckv_qkv_synth(&sp, &q);
        if (rc == 0) {
            snprintf(source, sizeof(source),
                     "synthetic %d/%d heads, d %d, %d+%d tokens, %d topics, seed %d%s",
                     cfg.n_q_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_prompt, cfg.steps,
                     sp.n_topics, cfg.seed, cfg.centroid_f16 ? ", f16 centroids" : "");
            rc = eval_layer(&cfg, ctx, &q, &res);
            ckv_qkv_free(&q);
        }
        if (rc) {
            fprintf(stderr, "ckv eval-attn: %s\n", ckv_strerror(rc));
            status = 1;
        }
    } else {
        char **files;
        int n_files;
        rc = list_dumps(cfg.dump, &files, &n_files);
        if (rc || n_files == 0) {
            fprintf(stderr, "ckv eval-attn: --dump %s: %s\n", cfg.dump,
                    rc ? ckv_strerror(rc) : "no .qkv file in this directory");
            status = 1;
        }
        for (int i = 0; status == 0 && i < n_files; i++) {
            struct ckv_qkv q;
            rc = ckv_qkv_read(files[i], &q, err, sizeof(err));
            if (rc) {
                fprintf(stderr, "ckv eval-attn: %s\n", err);
                status = 1;
                break;
            }
            if (q.truncated)
                fprintf(stderr, "ckv eval-attn: %s: partial last step ignored\n", files[i]);
            fprintf(stderr, "layer %d: %d/%d heads, d %d, %d+%d tokens\n", q.layer, q.n_q_heads,
                    q.n_kv_heads, q.head_dim, q.n_prompt, q.n_steps);
            rc = eval_layer(&cfg, ctx, &q, &res);
            ckv_qkv_free(&q);
            if (rc) {
                fprintf(stderr, "ckv eval-attn: %s: %s\n", files[i], ckv_strerror(rc));
                status = 1;
            }
        }
        snprintf(source, sizeof(source), "%s (%d layer file%s%s)", cfg.dump, n_files,
                 n_files == 1 ? "" : "s", cfg.centroid_f16 ? ", f16 centroids" : "");
        for (int i = 0; i < n_files; i++)
            free(files[i]);
        free(files);
    }
    if (status == 0) {
        status = write_outputs(&cfg, &res, source);
        printf("(%.1f s, %s)\n", ckv_elapsed_s(t0), ckv_ctx_describe(ctx));
    }
    ckv_ctx_destroy(&ctx);
    return status;
}
