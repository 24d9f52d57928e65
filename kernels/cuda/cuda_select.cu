/*
 * Selection on CUDA: ClusterKV's cluster ranking under a token budget (ALGORITHM.md section
 * 3), Quest's page bounds and page selection, and the oracle's top-k (section 6).
 *
 * Every ranking is a real sort of 64-bit ranking keys (ckv_math.h: score bits above, the
 * complement of the index below, 0 for "not a candidate") with CUB's segmented radix sort,
 * one segment per selection unit, so there is no cap on clusters, pages or tokens and ties
 * go to the lower index exactly as on the CPU. Scores are warp dot products (a few query rows
 * against many centroid or key rows is a memory-bound GEMV shape, not cuBLAS's).
 *
 * Selection reads head_offsets and sizes, which live on the device: a check kernel validates
 * them and finds the largest head, the host reads that (one synchronisation) and returns
 * -EINVAL / -ENOSPC before anything is queued; the rest runs asynchronously.
 *
 * Quest's scores are summed in the CPU's order with rounding forced per operation
 * (__fmul_rn / __fadd_rn never fuse into an FMA), so they are bit-equal to the CPU's and so
 * are the selections, ties included.
 */
#include <errno.h>

#include "ckv_math.h"
#include "cuda_dev.cuh"

#define SEL_WARPS   4
#define SEL_THREADS (SEL_WARPS * CUDA_WARP)

/* Per selection unit: first query row, rows, KV head (as the CPU's unit_rows). */
static __device__ __forceinline__ void unit_rows(enum ckv_select_mode mode, int u, int G, int *row0,
                                                 int *n_rows, int *kv)
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

/* Lays out a ranking's temporaries in the context's scratch: measure, reserve, lay out. */
static int rank_alloc(struct cuda_backend *cb, int n_keys, int n_seg, struct cuda_rank *t)
{
    struct cuda_arena ar = {NULL, 0};
    int rc = cuda_rank_layout(cb, &ar, n_keys, n_seg, t);
    void *base;
    if (rc || (rc = cuda_scratch(cb, ar.used, &base)))
        return rc;
    ar = (struct cuda_arena){(char *)base, 0};
    return cuda_rank_layout(cb, &ar, n_keys, n_seg, t);
}

/* ------------------------------------------------------------------------------------------
 * ClusterKV selection
 * ------------------------------------------------------------------------------------------ */

/* head_offsets from >= 0, non-decreasing, ending at total; sizes >= 0; st->max = most
 * clusters of one head. */
static __global__ void select_check(const int32_t *offs, int n_kv, const int32_t *sizes, int total,
                                    struct cuda_status *st)
{
    const int tid = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
    if (tid == 0 && (offs[0] < 0 || offs[n_kv] != total))
        atomicOr(&st->bad, 1);
    for (int h = tid; h < n_kv; h += stride) {
        int n = offs[h + 1] - offs[h];
        if (n < 0)
            atomicOr(&st->bad, 1);
        else
            atomicMax(&st->max, n);
    }
    for (int c = tid; c < total; c += stride)
        if (sizes[c] < 0)
            atomicOr(&st->bad, 1);
}

struct select_params {
    const float *q;
    const void *cen; /* f32 or f16 centroids */
    const int32_t *sizes, *offs;
    float *scores;  /* (n_units, total) */
    uint64_t *keys; /* ranking keys, unit segments packed */
    int *seg_begin, *seg_end;
    int G, d, total, mode, vec;
};

/* Unit u's segment: PER_QHEAD units of head h follow each other inside the head's G * nc keys
 * from G * c0; a KV-head unit's segment is its head's clusters. */
static __device__ __forceinline__ int unit_key_base(int mode, int r, int G, int c0, int nc)
{
    return mode == CKV_SELECT_PER_QHEAD ? G * c0 + r * nc : c0;
}

/* grid (n_kv_heads, chunks), SEL_THREADS threads; a warp scores one cluster at a time against
 * the head's query rows. */
template <typename T, int EPL>
static __global__ void __launch_bounds__(SEL_THREADS) select_score(struct select_params p)
{
    __shared__ float qsum[CKV_MAX_HEAD_DIM];
    const int lane = threadIdx.x % CUDA_WARP, warp = threadIdx.x / CUDA_WARP;
    const int h = blockIdx.x, G = p.G, d = p.d;
    const int c0 = p.offs[h], nc = p.offs[h + 1] - c0;
    const int n_units_h = p.mode == CKV_SELECT_PER_QHEAD ? G : 1;
    for (int r = threadIdx.x; blockIdx.y == 0 && r < n_units_h; r += blockDim.x) {
        int u = p.mode == CKV_SELECT_PER_QHEAD ? h * G + r : h; /* (groups may exceed a CTA) */
        int base = unit_key_base(p.mode, r, G, c0, nc);
        p.seg_begin[u] = base;
        p.seg_end[u] = base + nc;
    }
    const float *qh = p.q + (size_t)h * G * d;
    if (p.mode == CKV_SELECT_KVHEAD_SUM) {
        /* sum_g q_g . c = (sum_g q_g) . c: the CPU's summed query, in its order */
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            float acc = 0.0f;
            for (int r = 0; r < G; r++)
                acc += qh[(size_t)r * d + i];
            qsum[i] = acc;
        }
        __syncthreads();
    }
    const T *cen = (const T *)p.cen;
    for (int c = blockIdx.y * SEL_WARPS + warp; c < nc; c += gridDim.y * SEL_WARPS) {
        const int cg = c0 + c;
        float cx[EPL];
        dev_load_row<T, EPL>(cen + (size_t)cg * d, d, p.vec, lane, cx);
        const bool nonempty = p.sizes[cg] > 0;
        if (p.mode == CKV_SELECT_KVHEAD_SUM) {
            float part = 0.0f;
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                int i = dev_elem<T, EPL>(e, lane, p.vec);
                part += (i < d ? qsum[i] : 0.0f) * cx[e];
            }
            float s = dev_warp_sum(part);
            if (lane == 0) {
                if (p.scores)
                    p.scores[(size_t)h * p.total + cg] = s;
                p.keys[c0 + c] = nonempty ? ckv_math_rank_key(s, (uint32_t)cg) : 0;
            }
            continue;
        }
        float best = 0.0f;
        for (int r = 0; r < G; r++) {
            const float *qr = qh + (size_t)r * d;
            float part = 0.0f;
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                int i = dev_elem<T, EPL>(e, lane, p.vec);
                part += (i < d ? qr[i] : 0.0f) * cx[e];
            }
            float s = dev_warp_sum(part);
            if (p.mode == CKV_SELECT_PER_QHEAD) {
                if (lane == 0) {
                    int u = h * G + r;
                    if (p.scores)
                        p.scores[(size_t)u * p.total + cg] = s;
                    p.keys[unit_key_base(p.mode, r, G, c0, nc) + c] =
                        nonempty ? ckv_math_rank_key(s, (uint32_t)cg) : 0;
                }
            } else {
                best = r == 0 || s > best ? s : best; /* the CPU's fold: max, first row first */
            }
        }
        if (p.mode == CKV_SELECT_KVHEAD_MAX && lane == 0) {
            if (p.scores)
                p.scores[(size_t)h * p.total + cg] = best;
            p.keys[c0 + c] = nonempty ? ckv_math_rank_key(best, (uint32_t)cg) : 0;
        }
    }
}

/* One thread per unit: walks its ranked clusters until the budget is filled. */
static __global__ void select_take(const uint64_t *sorted, const int *seg_begin, const int *seg_end,
                                   const int32_t *sizes, int n_units, int budget, int max_sel,
                                   int32_t *sel, int32_t *sel_count, int32_t *sel_last)
{
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= n_units)
        return;
    int count = 0, last = 0;
    int64_t taken = 0;
    for (int i = seg_begin[u]; i < seg_end[u] && taken < budget; i++) {
        uint64_t key = sorted[i];
        if (key == 0)
            break; /* empty clusters rank last */
        int c = (int)ckv_math_rank_index(key);
        int size = sizes[c];
        int take = (int64_t)size < budget - taken ? size : (int)(budget - taken);
        sel[(size_t)u * max_sel + count++] = c;
        taken += take;
        last = take;
    }
    sel_count[u] = count;
    sel_last[u] = count ? last : 0;
}

template <typename T, int EPL>
static int select_score_run(struct cuda_backend *cb, struct select_params p, int n_kv, int max_head)
{
    p.vec = p.total > 0 && dev_vec_ok<T, EPL>(p.cen, p.d, (size_t)p.d, (size_t)p.d);
    int chunks = (max_head + SEL_WARPS * 4 - 1) / (SEL_WARPS * 4); /* ~4 clusters per warp */
    chunks = chunks < 1 ? 1 : chunks > 65535 ? 65535 : chunks;
    auto *kern = select_score<T, EPL>;
    CUDA_LAUNCH(kern, dim3(n_kv, chunks), SEL_THREADS, cb->stream, p);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

extern "C" int cuda_select_clusters(struct ckv_ctx *ctx, const struct ckv_select_args *a)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    const int G = a->n_q_heads / a->n_kv_heads, total = a->n_clusters_total;
    const int n_units = a->mode == CKV_SELECT_PER_QHEAD ? a->n_q_heads : a->n_kv_heads;
    int64_t n_keys64 = a->mode == CKV_SELECT_PER_QHEAD ? (int64_t)G * total : total;
    if (n_keys64 > INT32_MAX)
        return -EINVAL; /* the sort's item count is an int */
    const int n_keys = (int)n_keys64;

    /* head_offsets and sizes are on the device: check them there */
    if ((rc = cuda_status_reset(cb)))
        return rc;
    int span = total > a->n_kv_heads ? total : a->n_kv_heads;
    unsigned grid = cuda_blocks((size_t)span, 256);
    grid = grid > 1024 ? 1024 : grid;
    CUDA_LAUNCH(select_check, grid, 256, cb->stream, a->head_offsets, a->n_kv_heads, a->sizes,
                total, cb->status_dev);
    CUDA_CHECK_LAUNCH(cb);
    struct cuda_status st;
    if ((rc = cuda_status_read(cb, &st)))
        return rc;
    if (st.bad)
        return -EINVAL;
    const int max_head = st.max;
    if (a->max_selected < (a->budget < max_head ? a->budget : max_head))
        return -ENOSPC;

    struct cuda_rank t;
    if ((rc = rank_alloc(cb, n_keys, n_units, &t)))
        return rc;
    struct select_params p = {};
    const bool f16 = a->centroids_f16 != NULL;
    p.q = a->q;
    p.cen = f16 ? (const void *)a->centroids_f16 : (const void *)a->centroids;
    p.sizes = a->sizes;
    p.offs = a->head_offsets;
    p.scores = a->scores; /* NULL: not written */
    p.keys = t.keys_in;
    p.seg_begin = t.seg_begin;
    p.seg_end = t.seg_end;
    p.G = G;
    p.d = a->head_dim;
    p.total = total;
    p.mode = a->mode;
    if ((rc = DEV_DISPATCH(select_score_run, f16, p.d, cb, p, a->n_kv_heads, max_head)))
        return rc;
    if ((rc = cuda_rank_sort(cb, &t)))
        return rc;
    CUDA_LAUNCH(select_take, cuda_blocks((size_t)n_units, 128), 128, cb->stream, t.keys_out,
                t.seg_begin, t.seg_end, a->sizes, n_units, a->budget, a->max_selected,
                a->sel_clusters, a->sel_count, a->sel_last_take);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Quest
 * ------------------------------------------------------------------------------------------ */

/* One CTA per page; a thread per element: min and max over the page's tokens, compared as the
 * CPU compares (exact: no arithmetic). */
template <typename T>
static __global__ void quest_bounds(const T *keys, int n_tokens, int d, size_t row_stride,
                                    float *page_min, float *page_max)
{
    const int pg = blockIdx.x;
    const int t0 = pg * CKV_BLOCK_TOKENS;
    const int t1 = n_tokens - t0 < CKV_BLOCK_TOKENS ? n_tokens : t0 + CKV_BLOCK_TOKENS;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float mn = dev_load(keys + (size_t)t0 * row_stride + i), mx = mn;
        for (int t = t0 + 1; t < t1; t++) {
            float x = dev_load(keys + (size_t)t * row_stride + i);
            mn = x < mn ? x : mn;
            mx = x > mx ? x : mx;
        }
        page_min[(size_t)pg * d + i] = mn;
        page_max[(size_t)pg * d + i] = mx;
    }
}

extern "C" int cuda_quest_page_bounds(struct ckv_ctx *ctx, const void *keys, enum ckv_dtype dtype,
                                      int n_tokens, int head_dim, size_t row_stride,
                                      float *page_min, float *page_max)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    int n_pages = (n_tokens + CKV_BLOCK_TOKENS - 1) / CKV_BLOCK_TOKENS;
    int threads = head_dim < 128 ? (head_dim + 31) / 32 * 32 : 128;
    if (dtype == CKV_DTYPE_F16)
        CUDA_LAUNCH(quest_bounds<uint16_t>, n_pages, threads, cb->stream, (const uint16_t *)keys,
                    n_tokens, head_dim, row_stride, page_min, page_max);
    else
        CUDA_LAUNCH(quest_bounds<float>, n_pages, threads, cb->stream, (const float *)keys,
                    n_tokens, head_dim, row_stride, page_min, page_max);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

/* A thread per (unit, page): the score sum_i max(q_i M_i, q_i m_i) per query row in the CPU's
 * order and rounding, folded over the unit's rows as the CPU folds them; its ranking key. */
static __global__ void quest_score(const float *q, const float *page_min, const float *page_max,
                                   int n_pages, int n_units, int G, int d, int mode, uint64_t *keys)
{
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)n_units * n_pages)
        return;
    const int u = (int)(idx / n_pages), pg = (int)(idx % n_pages);
    int row0, n_rows, h;
    unit_rows((enum ckv_select_mode)mode, u, G, &row0, &n_rows, &h);
    const float *mn = page_min + ((size_t)h * n_pages + pg) * d;
    const float *mx = page_max + ((size_t)h * n_pages + pg) * d;
    float s = 0.0f;
    for (int r = 0; r < n_rows; r++) {
        const float *qr = q + (size_t)(row0 + r) * d;
        float acc = 0.0f;
        for (int i = 0; i < d; i++) {
            float x = __fmul_rn(qr[i], mx[i]), y = __fmul_rn(qr[i], mn[i]);
            acc = __fadd_rn(acc, x > y ? x : y);
        }
        if (r == 0)
            s = acc;
        else if (mode == CKV_SELECT_KVHEAD_SUM)
            s = __fadd_rn(s, acc);
        else
            s = acc > s ? acc : s;
    }
    keys[idx] = ckv_math_rank_key(s, (uint32_t)pg);
}

/* One thread per unit: the top n_sel pages, the last page forced into the last place when it
 * did not make it. */
static __global__ void quest_take(const uint64_t *sorted, int n_pages, int n_units, int n_select,
                                  int32_t *sel_pages, int32_t *sel_count)
{
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= n_units)
        return;
    const int n_sel = n_select < n_pages ? n_select : n_pages;
    int32_t *out = sel_pages + (size_t)u * n_select;
    int have_last = 0;
    for (int i = 0; i < n_sel; i++) {
        out[i] = (int32_t)ckv_math_rank_index(sorted[(size_t)u * n_pages + i]);
        have_last |= out[i] == n_pages - 1;
    }
    if (!have_last)
        out[n_sel - 1] = n_pages - 1;
    sel_count[u] = n_sel;
}

extern "C" int cuda_quest_select(struct ckv_ctx *ctx, const struct ckv_quest_args *a)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    const int G = a->n_q_heads / a->n_kv_heads, np = a->n_pages;
    const int n_units = a->mode == CKV_SELECT_PER_QHEAD ? a->n_q_heads : a->n_kv_heads;
    if ((int64_t)n_units * np > INT32_MAX)
        return -EINVAL; /* the sort's item count is an int */
    const int n_keys = n_units * np;
    struct cuda_rank t;
    if ((rc = rank_alloc(cb, n_keys, n_units, &t)))
        return rc;
    if ((rc = cuda_rank_uniform(cb, &t, np)))
        return rc;
    CUDA_LAUNCH(quest_score, cuda_blocks((size_t)n_keys, 128), 128, cb->stream, a->q, a->page_min,
                a->page_max, np, n_units, G, a->head_dim, (int)a->mode, t.keys_in);
    CUDA_CHECK_LAUNCH(cb);
    if ((rc = cuda_rank_sort(cb, &t)))
        return rc;
    CUDA_LAUNCH(quest_take, cuda_blocks((size_t)n_units, 128), 128, cb->stream, t.keys_out, np,
                n_units, a->n_select, a->sel_pages, a->sel_count);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Oracle top-k
 * ------------------------------------------------------------------------------------------ */

struct oracle_params {
    const float *q;
    const void *k;
    size_t head_stride, token_stride;
    uint64_t *keys; /* (n_q_heads, n_ctx) */
    int G, d, n_ctx, vec;
};

/* grid (token groups, n_kv_heads), SEL_THREADS threads: a warp reads one key row and scores
 * it against the group's query rows. */
template <typename T, int EPL>
static __global__ void __launch_bounds__(SEL_THREADS) oracle_score(struct oracle_params p)
{
    const int lane = threadIdx.x % CUDA_WARP, warp = threadIdx.x / CUDA_WARP;
    const int h = blockIdx.y;
    const int t = blockIdx.x * SEL_WARPS + warp;
    if (t >= p.n_ctx)
        return; /* whole warps leave together */
    float kx[EPL];
    dev_load_row<T, EPL>((const T *)p.k + (size_t)h * p.head_stride + (size_t)t * p.token_stride,
                         p.d, p.vec, lane, kx);
    for (int g = 0; g < p.G; g++) {
        const int qh = h * p.G + g;
        const float *qr = p.q + (size_t)qh * p.d;
        float part = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            int i = dev_elem<T, EPL>(e, lane, p.vec);
            part += (i < p.d ? qr[i] : 0.0f) * kx[e];
        }
        float s = dev_warp_sum(part);
        if (lane == 0)
            p.keys[(size_t)qh * p.n_ctx + t] = ckv_math_rank_key(s, (uint32_t)t);
    }
}

/* The first `budget` keys of each head's ranking, as token indices. */
static __global__ void oracle_take(const uint64_t *sorted, int n_q_heads, int n_ctx, int budget,
                                   int32_t *sel)
{
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)n_q_heads * budget)
        return;
    const int qh = (int)(idx / budget), i = (int)(idx % budget);
    sel[idx] = (int32_t)ckv_math_rank_index(sorted[(size_t)qh * n_ctx + i]);
}

template <typename T, int EPL>
static int oracle_score_run(struct cuda_backend *cb, struct oracle_params p, int n_kv)
{
    p.vec = dev_vec_ok<T, EPL>(p.k, p.d, p.head_stride, p.token_stride);
    auto *kern = oracle_score<T, EPL>;
    CUDA_LAUNCH(kern, dim3(cuda_blocks((size_t)p.n_ctx, SEL_WARPS), n_kv), SEL_THREADS, cb->stream,
                p);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

extern "C" int cuda_oracle_topk(struct ckv_ctx *ctx, const float *q, const void *k,
                                enum ckv_dtype dtype, int n_q_heads, int n_kv_heads, int head_dim,
                                int n_ctx, size_t head_stride, size_t token_stride, int budget,
                                int32_t *sel_tokens)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    if ((int64_t)n_q_heads * n_ctx > INT32_MAX || n_kv_heads > 65535)
        return -EINVAL; /* the sort's item count is an int; gridDim.y */
    const int n_keys = n_q_heads * n_ctx;
    struct cuda_rank t;
    if ((rc = rank_alloc(cb, n_keys, n_q_heads, &t)))
        return rc;
    if ((rc = cuda_rank_uniform(cb, &t, n_ctx)))
        return rc;
    struct oracle_params p = {};
    p.q = q;
    p.k = k;
    p.head_stride = head_stride;
    p.token_stride = token_stride;
    p.keys = t.keys_in;
    p.G = n_q_heads / n_kv_heads;
    p.d = head_dim;
    p.n_ctx = n_ctx;
    if ((rc = DEV_DISPATCH(oracle_score_run, dtype == CKV_DTYPE_F16, head_dim, cb, p, n_kv_heads)))
        return rc;
    if ((rc = cuda_rank_sort(cb, &t)))
        return rc;
    CUDA_LAUNCH(oracle_take, cuda_blocks((size_t)n_q_heads * budget, 128), 128, cb->stream,
                t.keys_out, n_q_heads, n_ctx, budget, sel_tokens);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}
