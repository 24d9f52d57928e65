/*
 * Selection on the CPU: ClusterKV's cluster ranking under a token budget (ALGORITHM.md
 * section 3) and the baselines' rules, Quest pages and oracle top-k (section 6).
 *
 * Ranking is a real one, for any number of clusters: every candidate becomes a 64-bit key
 * (order-preserving bits of its f32 score above, the complement of its index below, so that
 * a larger key is a better score and, on a tie, the lower index), the keys are heapified in
 * O(C) and popped best-first only as far as the budget needs. The oracle partially sorts its
 * keys with a quickselect and sorts the chosen B.
 *
 * One task per selection unit (a query head, or a KV head with its group), dynamically
 * claimed from the pool.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_math.h"
#include "cpu_backend.h"

/* ---- a max-heap of keys ---- */

static void heap_down(uint64_t *h, int n, int i)
{
    uint64_t v = h[i];
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && h[c + 1] > h[c])
            c++;
        if (h[c] <= v)
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
}

static void heapify(uint64_t *h, int n)
{
    for (int i = n / 2 - 1; i >= 0; i--)
        heap_down(h, n, i);
}

static uint64_t heap_pop(uint64_t *h, int *n)
{
    uint64_t top = h[0];
    h[0] = h[--*n];
    if (*n > 0)
        heap_down(h, *n, 0);
    return top;
}

/* Per selection unit: the first query row, their number, and the KV head. */
static void unit_rows(enum ckv_select_mode mode, int u, int G, int *row0, int *n_rows, int *kv)
{
    if (mode == CKV_SELECT_PER_QHEAD) {
        *row0 = u;
        *n_rows = 1;
        *kv = u / G;
    } else {
        *row0 = u * G;
        *n_rows = G;
        *kv = u;
    }
}

/* Folds the rows' scores of n items (s: (n_rows, n)) into s[0..n) by max or sum. */
static void fold_rows(enum ckv_select_mode mode, float *s, int n_rows, int n)
{
    for (int r = 1; r < n_rows; r++) {
        const float *sr = s + (size_t)r * n;
        if (mode == CKV_SELECT_KVHEAD_SUM)
            for (int c = 0; c < n; c++)
                s[c] += sr[c];
        else
            for (int c = 0; c < n; c++)
                s[c] = sr[c] > s[c] ? sr[c] : s[c];
    }
}

/* ------------------------------------------------------------------------------------------
 * ClusterKV selection
 * ------------------------------------------------------------------------------------------ */

struct sel_job {
    const struct ckv_select_args *a;
    struct cpu_backend *cb;
    int G, max_head; /* group size; most clusters of one head */
};

static void sel_task(void *arg, int u, int tid)
{
    struct sel_job *j = arg;
    const struct ckv_select_args *a = j->a;
    const int d = a->head_dim;
    int row0, n_rows, h;
    unit_rows(a->mode, u, j->G, &row0, &n_rows, &h);
    const int c0 = a->head_offsets[h], nc = a->head_offsets[h + 1] - c0;
    char *mem = cpu_scratch(j->cb, tid);
    uint64_t *keys = (uint64_t *)mem;
    float *s = (float *)(mem + cpu_align64((size_t)j->max_head * sizeof(uint64_t)));
    int32_t *sel = a->sel_clusters + (size_t)u * a->max_selected;
    int count = 0, last = 0;
    if (nc > 0) {
        const float *qr = a->q + (size_t)row0 * d;
        if (a->mode == CKV_SELECT_KVHEAD_SUM && n_rows > 1) {
            /* sum_g q_g . c = (sum_g q_g) . c: one row to score instead of the group */
            float *qsum = s + (size_t)n_rows * j->max_head;
            for (int i = 0; i < d; i++) {
                float acc = 0.0f;
                for (int r = 0; r < n_rows; r++)
                    acc += qr[(size_t)r * d + i];
                qsum[i] = acc;
            }
            qr = qsum;
            n_rows = 1;
        }
        /* centroids are cold (one read per step and layer): prefetch 16 rows ahead */
        const void *cen = a->centroids_f16 ? (const void *)(a->centroids_f16 + (size_t)c0 * d)
                                           : (const void *)(a->centroids + (size_t)c0 * d);
        enum ckv_dtype cdt = a->centroids_f16 ? CKV_DTYPE_F16 : CKV_DTYPE_F32;
        j->cb->simd->gemm_nt(n_rows, nc, d, qr, (size_t)d, cen, cdt, (size_t)d, s, (size_t)nc,
                             (const char *)cen + (size_t)16 * d * ckv_dtype_size(cdt));
        fold_rows(a->mode, s, n_rows, nc);
        if (a->scores)
            memcpy(a->scores + (size_t)u * a->n_clusters_total + c0, s, (size_t)nc * sizeof(float));
        int n_keys = 0;
        for (int c = 0; c < nc; c++)
            if (a->sizes[c0 + c] > 0)
                keys[n_keys++] = ckv_math_rank_key(s[c], (uint32_t)c);
        heapify(keys, n_keys);
        int64_t taken = 0;
        while (taken < a->budget && n_keys > 0) {
            int c = (int)ckv_math_rank_index(heap_pop(keys, &n_keys));
            int size = a->sizes[c0 + c];
            int take = (int64_t)size < a->budget - taken ? size : (int)(a->budget - taken);
            sel[count++] = c0 + c;
            taken += take;
            last = take;
        }
    }
    a->sel_count[u] = count;
    a->sel_last_take[u] = count ? last : 0;
}

int cpu_select_clusters(struct ckv_ctx *ctx, const struct ckv_select_args *a)
{
    struct cpu_backend *cb = cpu_of(ctx);
    const int G = a->n_q_heads / a->n_kv_heads;
    if (a->head_offsets[0] < 0 || a->head_offsets[a->n_kv_heads] != a->n_clusters_total)
        return -EINVAL;
    int max_head = 0;
    for (int h = 0; h < a->n_kv_heads; h++) {
        int n = a->head_offsets[h + 1] - a->head_offsets[h];
        if (n < 0)
            return -EINVAL;
        max_head = n > max_head ? n : max_head;
    }
    for (int c = 0; c < a->n_clusters_total; c++)
        if (a->sizes[c] < 0)
            return -EINVAL;
    if (a->max_selected < (a->budget < max_head ? a->budget : max_head))
        return -ENOSPC;
    int n_rows = a->mode == CKV_SELECT_PER_QHEAD ? 1 : G;
    int rc = cpu_scratch_reserve(cb, cpu_align64((size_t)max_head * sizeof(uint64_t)) +
                                         ((size_t)n_rows * max_head + a->head_dim) * sizeof(float));
    if (rc)
        return rc;
    struct sel_job j = {a, cb, G, max_head};
    int n_units = a->mode == CKV_SELECT_PER_QHEAD ? a->n_q_heads : a->n_kv_heads;
    cpu_pool_run(cb->pool, n_units, sel_task, &j);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Quest
 * ------------------------------------------------------------------------------------------ */

struct bounds_job {
    struct cpu_backend *cb;
    const void *keys;
    enum ckv_dtype dtype;
    int n_tokens, d;
    size_t row_stride;
    float *page_min, *page_max;
};

#define BOUNDS_PAGES_PER_TASK 64

static void bounds_task(void *arg, int task, int tid)
{
    struct bounds_job *j = arg;
    float *row = cpu_scratch(j->cb, tid);
    int n_pages = (j->n_tokens + CKV_BLOCK_TOKENS - 1) / CKV_BLOCK_TOKENS;
    int p0 = task * BOUNDS_PAGES_PER_TASK;
    int p1 = p0 + BOUNDS_PAGES_PER_TASK < n_pages ? p0 + BOUNDS_PAGES_PER_TASK : n_pages;
    size_t esz = ckv_dtype_size(j->dtype);
    for (int p = p0; p < p1; p++) {
        float *mn = j->page_min + (size_t)p * j->d, *mx = j->page_max + (size_t)p * j->d;
        int t0 = p * CKV_BLOCK_TOKENS;
        int t1 = t0 + CKV_BLOCK_TOKENS < j->n_tokens ? t0 + CKV_BLOCK_TOKENS : j->n_tokens;
        for (int t = t0; t < t1; t++) {
            cpu_simd_load_row(j->cb->simd, (const char *)j->keys + (size_t)t * j->row_stride * esz,
                              j->dtype, j->d, row);
            if (t == t0) {
                memcpy(mn, row, (size_t)j->d * sizeof(float));
                memcpy(mx, row, (size_t)j->d * sizeof(float));
                continue;
            }
            for (int i = 0; i < j->d; i++) {
                mn[i] = row[i] < mn[i] ? row[i] : mn[i];
                mx[i] = row[i] > mx[i] ? row[i] : mx[i];
            }
        }
    }
}

int cpu_quest_page_bounds(struct ckv_ctx *ctx, const void *keys, enum ckv_dtype dtype, int n_tokens,
                          int head_dim, size_t row_stride, float *page_min, float *page_max)
{
    struct cpu_backend *cb = cpu_of(ctx);
    int rc = cpu_scratch_reserve(cb, (size_t)head_dim * sizeof(float));
    if (rc)
        return rc;
    struct bounds_job j = {cb, keys, dtype, n_tokens, head_dim, row_stride, page_min, page_max};
    int n_pages = (n_tokens + CKV_BLOCK_TOKENS - 1) / CKV_BLOCK_TOKENS;
    cpu_pool_run(cb->pool, (n_pages + BOUNDS_PAGES_PER_TASK - 1) / BOUNDS_PAGES_PER_TASK,
                 bounds_task, &j);
    return 0;
}

struct quest_job {
    const struct ckv_quest_args *a;
    struct cpu_backend *cb;
    int G;
};

static void quest_task(void *arg, int u, int tid)
{
    struct quest_job *j = arg;
    const struct ckv_quest_args *a = j->a;
    const int d = a->head_dim, np = a->n_pages;
    int row0, n_rows, h;
    unit_rows(a->mode, u, j->G, &row0, &n_rows, &h);
    char *mem = cpu_scratch(j->cb, tid);
    uint64_t *keys = (uint64_t *)mem;
    float *s = (float *)(mem + cpu_align64((size_t)np * sizeof(uint64_t)));
    const float *mn = a->page_min + (size_t)h * np * d, *mx = a->page_max + (size_t)h * np * d;
    for (int r = 0; r < n_rows; r++) {
        const float *q = a->q + (size_t)(row0 + r) * d;
        for (int p = 0; p < np; p++) {
            const float *pm = mn + (size_t)p * d, *pM = mx + (size_t)p * d;
            float acc = 0.0f;
            for (int i = 0; i < d; i++) {
                float x = q[i] * pM[i], y = q[i] * pm[i];
                acc += x > y ? x : y;
            }
            s[(size_t)r * np + p] = acc;
        }
    }
    fold_rows(a->mode, s, n_rows, np);
    for (int p = 0; p < np; p++)
        keys[p] = ckv_math_rank_key(s[p], (uint32_t)p);
    int n_keys = np;
    heapify(keys, n_keys);
    int n_sel = a->n_select < np ? a->n_select : np;
    int32_t *out = a->sel_pages + (size_t)u * a->n_select;
    int have_last = 0;
    for (int i = 0; i < n_sel; i++) {
        out[i] = (int32_t)ckv_math_rank_index(heap_pop(keys, &n_keys));
        have_last |= out[i] == np - 1;
    }
    if (!have_last) /* the current page is always attended: it replaces the worst pick */
        out[n_sel - 1] = np - 1;
    a->sel_count[u] = n_sel;
}

int cpu_quest_select(struct ckv_ctx *ctx, const struct ckv_quest_args *a)
{
    struct cpu_backend *cb = cpu_of(ctx);
    const int G = a->n_q_heads / a->n_kv_heads;
    int n_rows = a->mode == CKV_SELECT_PER_QHEAD ? 1 : G;
    int rc = cpu_scratch_reserve(cb, cpu_align64((size_t)a->n_pages * sizeof(uint64_t)) +
                                         (size_t)n_rows * a->n_pages * sizeof(float));
    if (rc)
        return rc;
    struct quest_job j = {a, cb, G};
    int n_units = a->mode == CKV_SELECT_PER_QHEAD ? a->n_q_heads : a->n_kv_heads;
    cpu_pool_run(cb->pool, n_units, quest_task, &j);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Oracle top-k
 * ------------------------------------------------------------------------------------------ */

static void swap_u64(uint64_t *a, uint64_t *b)
{
    uint64_t t = *a;
    *a = *b;
    *b = t;
}

/* Reorders x[0..n) so that its k largest keys come first (in no order); keys are distinct. */
static void select_top(uint64_t *x, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        /* median of three as the pivot, moved to hi */
        if (x[mid] > x[lo])
            swap_u64(&x[mid], &x[lo]);
        if (x[hi] > x[lo])
            swap_u64(&x[hi], &x[lo]);
        if (x[mid] > x[hi])
            swap_u64(&x[mid], &x[hi]);
        uint64_t pivot = x[hi];
        int store = lo;
        for (int i = lo; i < hi; i++)
            if (x[i] > pivot)
                swap_u64(&x[i], &x[store++]);
        swap_u64(&x[store], &x[hi]);
        /* x[lo..store) > pivot = x[store] > x(store..hi] */
        if (store == k - 1 || store == k)
            return;
        if (store < k)
            lo = store + 1;
        else
            hi = store - 1;
    }
}

static int cmp_desc_u64(const void *pa, const void *pb)
{
    uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
    return a < b ? 1 : a > b ? -1 : 0;
}

struct oracle_job {
    struct cpu_backend *cb;
    const float *q;
    const void *k;
    enum ckv_dtype dtype;
    int G, d, n_ctx, budget;
    size_t head_stride, token_stride;
    int32_t *sel;
};

static void oracle_task(void *arg, int h, int tid)
{
    struct oracle_job *j = arg;
    char *mem = cpu_scratch(j->cb, tid);
    uint64_t *keys = (uint64_t *)mem;
    float *s = (float *)(mem + cpu_align64((size_t)j->n_ctx * sizeof(uint64_t)));
    const char *kh = (const char *)j->k + (size_t)h * j->head_stride * ckv_dtype_size(j->dtype);
    j->cb->simd->gemm_nt(j->G, j->n_ctx, j->d, j->q + (size_t)h * j->G * j->d, (size_t)j->d, kh,
                         j->dtype, j->token_stride, s, (size_t)j->n_ctx, NULL);
    for (int g = 0; g < j->G; g++) {
        const float *sg = s + (size_t)g * j->n_ctx;
        for (int t = 0; t < j->n_ctx; t++)
            keys[t] = ckv_math_rank_key(sg[t], (uint32_t)t);
        select_top(keys, j->n_ctx, j->budget);
        qsort(keys, (size_t)j->budget, sizeof(uint64_t), cmp_desc_u64);
        int32_t *out = j->sel + (size_t)(h * j->G + g) * j->budget;
        for (int i = 0; i < j->budget; i++)
            out[i] = (int32_t)ckv_math_rank_index(keys[i]);
    }
}

int cpu_oracle_topk(struct ckv_ctx *ctx, const float *q, const void *k, enum ckv_dtype dtype,
                    int n_q_heads, int n_kv_heads, int head_dim, int n_ctx, size_t head_stride,
                    size_t token_stride, int budget, int32_t *sel_tokens)
{
    struct cpu_backend *cb = cpu_of(ctx);
    const int G = n_q_heads / n_kv_heads;
    int rc = cpu_scratch_reserve(cb, cpu_align64((size_t)n_ctx * sizeof(uint64_t)) +
                                         (size_t)G * n_ctx * sizeof(float));
    if (rc)
        return rc;
    struct oracle_job j = {cb,    q,      k,           dtype,        G,         head_dim,
                           n_ctx, budget, head_stride, token_stride, sel_tokens};
    cpu_pool_run(cb->pool, n_kv_heads, oracle_task, &j);
    return 0;
}
