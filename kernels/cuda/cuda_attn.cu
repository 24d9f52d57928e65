/*
 * Attention on CUDA: decode over a contiguous KV cache, decode over lists of pool blocks (the
 * sparse path), and causal prefill. One warp-level step serves all three (warp_attend): a
 * warp holds up to RW query rows (the query heads of one KV head that share its K/V, or the
 * (token, head) rows of a prefill tile) in registers, spread over its lanes (cuda_dev.cuh),
 * and meets keys one at a time:
 *
 *   s_r = (scale q_r) . k          lane partial sums, one butterfly reduction per row
 *   online softmax per row         ckv_math_softmax_add (the CPU's rule): m, l, corr, p
 *   acc_r = acc_r corr + p v       the lane's elements of the row
 *
 * so K and V are read once per KV head and row group (GQA), and every sum is f32.
 *
 * Decode is split-K (flash-decoding): a CTA of ATTN_WARPS warps owns (KV head or list, row
 * group, split); its warps take the split's tokens (or blocks) in turn, merge their states in
 * shared memory, and write either the output or the split's partial (m, l, acc). With more
 * than one split a second kernel merges the partials exactly. Splits are sized so the grid
 * gives every multiprocessor a few CTAs: a single sequence's decode is memory-bound, and
 * only enough CTAs in flight keep HBM busy.
 *
 * Prefill: a CTA owns one KV head and up to ATTN_WARPS * RW consecutive (token, head) rows,
 * loads tiles of keys and values into shared memory (f32) and each warp runs its rows over
 * the tile, masked causally; no split (the grid is large already).
 *
 * Template parameters: T, the KV element (uint16_t for f16, float), and EPL, the elements of
 * a row per lane: 2, 4, 8, 16 for head_dim up to 64, 128, 256, 512. RW, rows per warp,
 * follows from EPL to keep a warp's registers near 2 * RW * EPL <= 64 floats.
 */
#include <errno.h>
#include <math.h>

#include "ckv_math.h"
#include "cuda_dev.cuh"

#define ATTN_WARPS            4
#define ATTN_THREADS          (ATTN_WARPS * CUDA_WARP)
#define ATTN_UNROLL           2    /* tokens a warp loads before it uses the first */
#define ATTN_MIN_SPLIT_TOKENS 256  /* fewest tokens worth a decode split */
#define ATTN_MIN_SPLIT_REFS   16   /* fewest blocks worth a decode split */
#define ATTN_CTAS_PER_SM      4    /* decode grid target: CTAs per multiprocessor */
#define ATTN_PF_SMEM_FLOATS   8192 /* prefill K + V tile: 32 KiB */
#define ATTN_MERGE_THREADS    128

template <int EPL> struct attn_rw {
    static constexpr int RW = EPL <= 4 ? 8 : 32 / EPL;
};

/* One warp's rows: queries (already scaled) and online-softmax state. */
template <int EPL, int RW> struct warp_acc {
    float q[RW][EPL];
    float acc[RW][EPL];
    float m[RW], l[RW];
};

template <int EPL, int RW>
static __device__ __forceinline__ void warp_acc_clear(warp_acc<EPL, RW> &w)
{
#pragma unroll
    for (int r = 0; r < RW; r++) {
        w.m[r] = -INFINITY;
        w.l[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            w.q[r][e] = 0.0f;
            w.acc[r][e] = 0.0f;
        }
    }
}

/* Row r's query from q (d floats), scaled, in the layout of T. */
template <typename T, int EPL, int RW>
static __device__ __forceinline__ void warp_acc_set_q(warp_acc<EPL, RW> &w, int r, const float *q,
                                                      int d, float scale, bool vec, int lane)
{
#pragma unroll
    for (int e = 0; e < EPL; e++) {
        int i = dev_elem<T, EPL>(e, lane, vec);
        w.q[r][e] = i < d ? q[i] * scale : 0.0f;
    }
}

/* Attends the warp's first nrows rows to nt (1..ATTN_UNROLL) keys: key j is the row at
 * k + j * stride, its value at v + j * stride. valid_pos: NULL, or row r sees key j only when
 * key_pos + j <= valid_pos[r] (causal prefill). */
template <typename T, int EPL, int RW>
static __device__ __forceinline__ void warp_attend(warp_acc<EPL, RW> &w, int nrows, const T *k,
                                                   const T *v, size_t stride, int nt, int d,
                                                   bool vec, int lane)
{
    float kx[ATTN_UNROLL][EPL], vx[ATTN_UNROLL][EPL];
#pragma unroll
    for (int j = 0; j < ATTN_UNROLL; j++) {
        if (j < nt) {
            dev_load_row<T, EPL>(k + (size_t)j * stride, d, vec, lane, kx[j]);
            dev_load_row<T, EPL>(v + (size_t)j * stride, d, vec, lane, vx[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < ATTN_UNROLL; j++) {
        if (j >= nt)
            break;
        float s[RW];
#pragma unroll
        for (int r = 0; r < RW; r++) {
            s[r] = 0.0f;
#pragma unroll
            for (int e = 0; e < EPL; e++)
                s[r] += w.q[r][e] * kx[j][e];
        }
        /* the rows' reductions interleaved (independent shuffles in flight) */
#pragma unroll
        for (int o = CUDA_WARP / 2; o > 0; o >>= 1)
#pragma unroll
            for (int r = 0; r < RW; r++)
                if (r < nrows)
                    s[r] += __shfl_xor_sync(0xffffffffu, s[r], o);
#pragma unroll
        for (int r = 0; r < RW; r++) {
            if (r < nrows) {
                float corr, p;
                ckv_math_softmax_add(&w.m[r], &w.l[r], s[r], &corr, &p);
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    w.acc[r][e] = w.acc[r][e] * corr + p * vx[j][e];
            }
        }
    }
}

/* Shared memory of a decode CTA: every warp's state, in row order (element i at [i]). */
template <int EPL, int RW> struct attn_cta_smem {
    float acc[ATTN_WARPS][RW][CUDA_WARP * EPL];
    float m[ATTN_WARPS][RW], l[ATTN_WARPS][RW];
};

/* Merges the CTA's warps for rows qh0 .. qh0 + nrows - 1 (of d elements) and writes either the
 * output (out, lse: n_splits == 1) or the split's partial: part row (qh, split) is
 * [m, l, acc[0..d)] at part + (qh * n_splits + split) * (d + 2). */
template <typename T, int EPL, int RW>
static __device__ void attn_cta_finish(const warp_acc<EPL, RW> &w, attn_cta_smem<EPL, RW> &sm,
                                       int nrows, int qh0, int d, bool vec, int split, int n_splits,
                                       float *out, float *lse, float *part)
{
    const int lane = threadIdx.x % CUDA_WARP, warp = threadIdx.x / CUDA_WARP;
#pragma unroll
    for (int r = 0; r < RW; r++) {
        if (r < nrows) {
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                int i = dev_elem<T, EPL>(e, lane, vec);
                if (i < d)
                    sm.acc[warp][r][i] = w.acc[r][e];
            }
            if (lane == 0) {
                sm.m[warp][r] = w.m[r];
                sm.l[warp][r] = w.l[r];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nrows * d; idx += blockDim.x) {
        const int r = idx / d, i = idx % d, qh = qh0 + r;
        float M = -INFINITY;
        for (int wi = 0; wi < ATTN_WARPS; wi++)
            M = fmaxf(M, sm.m[wi][r]);
        float L = 0.0f, O = 0.0f;
        for (int wi = 0; wi < ATTN_WARPS; wi++) {
            float wt = ckv_math_softmax_weight(sm.m[wi][r], M);
            L += wt * sm.l[wi][r];
            O += wt * sm.acc[wi][r][i];
        }
        if (n_splits == 1) {
            out[(size_t)qh * d + i] = L > 0.0f ? O / L : 0.0f;
            if (i == 0 && lse)
                lse[qh] = L > 0.0f ? M + logf(L) : -INFINITY;
        } else {
            float *pr = part + ((size_t)qh * n_splits + split) * (d + 2);
            pr[2 + i] = O;
            if (i == 0) {
                pr[0] = M;
                pr[1] = L;
            }
        }
    }
}

/* Merges the n_splits partials of each query head (one CTA per head) into out and lse. */
static __global__ void attn_merge_kernel(const float *__restrict__ part, int n_splits, int d,
                                         float *__restrict__ out, float *__restrict__ lse)
{
    const int qh = blockIdx.x;
    const float *ph = part + (size_t)qh * n_splits * (d + 2);
    float M = -INFINITY;
    for (int s = 0; s < n_splits; s++)
        M = fmaxf(M, ph[(size_t)s * (d + 2)]);
    float L = 0.0f;
    for (int s = 0; s < n_splits; s++)
        L += ckv_math_softmax_weight(ph[(size_t)s * (d + 2)], M) * ph[(size_t)s * (d + 2) + 1];
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float O = 0.0f;
        for (int s = 0; s < n_splits; s++)
            O += ckv_math_softmax_weight(ph[(size_t)s * (d + 2)], M) *
                 ph[(size_t)s * (d + 2) + 2 + i];
        out[(size_t)qh * d + i] = L > 0.0f ? O / L : 0.0f;
    }
    if (threadIdx.x == 0 && lse)
        lse[qh] = L > 0.0f ? M + logf(L) : -INFINITY;
}

/* Splits per unit so that units * splits gives every multiprocessor ATTN_CTAS_PER_SM CTAs,
 * none with fewer than min_per_split tokens (or blocks) of work. */
static int attn_splits(const struct cuda_backend *cb, int units, int64_t work, int min_per_split)
{
    int target = cb->n_sm * ATTN_CTAS_PER_SM;
    int want = (target + units - 1) / units;
    int64_t most = (work + min_per_split - 1) / min_per_split;
    int s = (int64_t)want < most ? want : (int)most;
    if (s > 65535) /* gridDim.y */
        s = 65535;
    return s < 1 ? 1 : s;
}

static float attn_scale(float scale, int d)
{
    return scale != 0.0f ? scale : 1.0f / sqrtf((float)d);
}

/* Merges partials when there are several splits; else nothing. */
static int attn_merge(struct cuda_backend *cb, const float *part, int n_splits, int nq, int d,
                      float *out, float *lse)
{
    if (n_splits == 1)
        return 0;
    CUDA_LAUNCH(attn_merge_kernel, nq, ATTN_MERGE_THREADS, cb->stream, part, n_splits, d, out, lse);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

/* Scratch for n_splits partials of nq heads (NULL for one split). */
static int attn_partials(struct cuda_backend *cb, int nq, int n_splits, int d, float **part)
{
    *part = NULL;
    if (n_splits == 1)
        return 0;
    void *p;
    int rc = cuda_scratch(cb, (size_t)nq * n_splits * (d + 2) * sizeof(float), &p);
    *part = (float *)p;
    return rc;
}

/* ------------------------------------------------------------------------------------------
 * Decode over a contiguous KV cache
 * ------------------------------------------------------------------------------------------ */

struct attn_full_params {
    const float *q;
    const void *k, *v;
    size_t head_stride, token_stride; /* elements */
    float *out, *lse, *part;
    int G, d, n_ctx, n_hchunks, n_splits, split_tokens;
    float scale;
    int vec;
};

/* grid (n_kv_heads * n_hchunks, n_splits), ATTN_THREADS threads. */
template <typename T, int EPL>
static __global__ void __launch_bounds__(ATTN_THREADS) attn_full_kernel(struct attn_full_params p)
{
    constexpr int RW = attn_rw<EPL>::RW;
    __shared__ attn_cta_smem<EPL, RW> sm;
    const int lane = threadIdx.x % CUDA_WARP, warp = threadIdx.x / CUDA_WARP;
    const int kvh = blockIdx.x / p.n_hchunks, hc = blockIdx.x % p.n_hchunks;
    const int split = blockIdx.y;
    const int qh0 = kvh * p.G + hc * RW;
    const int nrows = p.G - hc * RW < RW ? p.G - hc * RW : RW;
    warp_acc<EPL, RW> w;
    warp_acc_clear(w);
#pragma unroll
    for (int r = 0; r < RW; r++) /* constant indices keep w in registers */
        if (r < nrows)
            warp_acc_set_q<T>(w, r, p.q + (size_t)(qh0 + r) * p.d, p.d, p.scale, p.vec, lane);
    const T *kh = (const T *)p.k + (size_t)kvh * p.head_stride;
    const T *vh = (const T *)p.v + (size_t)kvh * p.head_stride;
    const int t0 = split * p.split_tokens;
    const int t1 = p.n_ctx - t0 < p.split_tokens ? p.n_ctx : t0 + p.split_tokens;
    /* warps take ATTN_UNROLL consecutive tokens in turn: together they read a contiguous run */
    for (int t = t0 + warp * ATTN_UNROLL; t < t1; t += ATTN_WARPS * ATTN_UNROLL) {
        int nt = t1 - t < ATTN_UNROLL ? t1 - t : ATTN_UNROLL;
        warp_attend<T>(w, nrows, kh + (size_t)t * p.token_stride, vh + (size_t)t * p.token_stride,
                       p.token_stride, nt, p.d, p.vec, lane);
    }
    attn_cta_finish<T>(w, sm, nrows, qh0, p.d, p.vec, split, p.n_splits, p.out, p.lse, p.part);
}

template <typename T, int EPL>
static int full_run(struct cuda_backend *cb, const struct ckv_attn_full_args *a)
{
    constexpr int RW = attn_rw<EPL>::RW;
    struct attn_full_params p = {};
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.head_stride = a->head_stride;
    p.token_stride = a->token_stride;
    p.out = a->out;
    p.lse = a->lse;
    p.G = a->n_q_heads / a->n_kv_heads;
    p.d = a->head_dim;
    p.n_ctx = a->n_ctx;
    p.n_hchunks = (p.G + RW - 1) / RW;
    p.scale = attn_scale(a->scale, a->head_dim);
    p.vec = a->n_ctx > 0 && dev_vec_ok<T, EPL>(a->k, p.d, a->head_stride, a->token_stride) &&
            dev_vec_ok<T, EPL>(a->v, p.d, a->head_stride, a->token_stride);
    const int units = a->n_kv_heads * p.n_hchunks;
    p.n_splits = attn_splits(cb, units, a->n_ctx, ATTN_MIN_SPLIT_TOKENS);
    /* tokens per split: whole warp rounds, then as few splits as that needs */
    const int round = ATTN_WARPS * ATTN_UNROLL;
    p.split_tokens = (a->n_ctx + p.n_splits - 1) / p.n_splits;
    p.split_tokens = (p.split_tokens + round - 1) / round * round;
    p.n_splits = p.split_tokens > 0 ? (a->n_ctx + p.split_tokens - 1) / p.split_tokens : 1;
    int rc = attn_partials(cb, a->n_q_heads, p.n_splits, p.d, &p.part);
    if (rc)
        return rc;
    auto *kern = attn_full_kernel<T, EPL>;
    CUDA_LAUNCH(kern, dim3(units, p.n_splits), ATTN_THREADS, cb->stream, p);
    CUDA_CHECK_LAUNCH(cb);
    return attn_merge(cb, p.part, p.n_splits, a->n_q_heads, p.d, a->out, a->lse);
}

extern "C" int cuda_attn_decode_full(struct ckv_ctx *ctx, const struct ckv_attn_full_args *a)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    return DEV_DISPATCH(full_run, a->dtype == CKV_DTYPE_F16, a->head_dim, cb, a);
}

/* ------------------------------------------------------------------------------------------
 * Decode over lists of blocks
 * ------------------------------------------------------------------------------------------ */

/* One CTA per list: offsets non-decreasing from >= 0, refs in range; the longest list's
 * block count into st->max. */
static __global__ void attn_blocks_check(const struct ckv_block_ref *refs, const int32_t *offs,
                                         const void *pool, struct cuda_status *st)
{
    const int l = blockIdx.x;
    const int r0 = offs[l], r1 = offs[l + 1];
    if (r0 < 0 || r1 < r0) {
        if (threadIdx.x == 0)
            atomicOr(&st->bad, 1);
        return;
    }
    if (r1 > r0 && (!refs || !pool)) {
        if (threadIdx.x == 0)
            atomicOr(&st->bad, 1);
        return;
    }
    if (threadIdx.x == 0)
        atomicMax(&st->max, r1 - r0);
    for (int b = r0 + threadIdx.x; b < r1; b += blockDim.x) {
        struct ckv_block_ref ref = refs[b];
        if (ref.slot < 0 || ref.n_tokens < 1 || ref.n_tokens > CKV_BLOCK_TOKENS)
            atomicOr(&st->bad, 1);
    }
}

struct attn_blocks_params {
    const float *q;
    const void *pool;
    const struct ckv_block_ref *refs;
    const int32_t *list_offsets;
    size_t block_elems; /* elements of a block: 2 * 16 * d */
    float *out, *lse, *part;
    int hpl, d, n_hchunks, n_splits, split_refs;
    float scale;
    int vec;
};

/* grid (n_lists * n_hchunks, n_splits), ATTN_THREADS threads. */
template <typename T, int EPL>
static __global__ void __launch_bounds__(ATTN_THREADS)
    attn_blocks_kernel(struct attn_blocks_params p)
{
    constexpr int RW = attn_rw<EPL>::RW;
    __shared__ attn_cta_smem<EPL, RW> sm;
    const int lane = threadIdx.x % CUDA_WARP, warp = threadIdx.x / CUDA_WARP;
    const int list = blockIdx.x / p.n_hchunks, hc = blockIdx.x % p.n_hchunks;
    const int split = blockIdx.y;
    const int qh0 = list * p.hpl + hc * RW;
    const int nrows = p.hpl - hc * RW < RW ? p.hpl - hc * RW : RW;
    warp_acc<EPL, RW> w;
    warp_acc_clear(w);
#pragma unroll
    for (int r = 0; r < RW; r++) /* constant indices keep w in registers */
        if (r < nrows)
            warp_acc_set_q<T>(w, r, p.q + (size_t)(qh0 + r) * p.d, p.d, p.scale, p.vec, lane);
    const int r0 = p.list_offsets[list], r1 = p.list_offsets[list + 1];
    const int b0 = r0 + split * p.split_refs;
    const int b1 = r1 - b0 < p.split_refs ? r1 : b0 + p.split_refs;
    /* warps take whole blocks in turn: a block is 16 K rows then 16 V rows, contiguous */
    for (int b = b0 + warp; b < b1; b += ATTN_WARPS) {
        const struct ckv_block_ref ref = p.refs[b];
        const T *blk = (const T *)p.pool + (size_t)ref.slot * p.block_elems;
        for (int i = 0; i < ref.n_tokens; i += ATTN_UNROLL) {
            int nt = ref.n_tokens - i < ATTN_UNROLL ? ref.n_tokens - i : ATTN_UNROLL;
            warp_attend<T>(w, nrows, blk + (size_t)i * p.d,
                           blk + (size_t)(CKV_BLOCK_TOKENS + i) * p.d, (size_t)p.d, nt, p.d, p.vec,
                           lane);
        }
    }
    attn_cta_finish<T>(w, sm, nrows, qh0, p.d, p.vec, split, p.n_splits, p.out, p.lse, p.part);
}

template <typename T, int EPL>
static int blocks_run(struct cuda_backend *cb, const struct ckv_attn_blocks_args *a, int max_refs)
{
    constexpr int RW = attn_rw<EPL>::RW;
    struct attn_blocks_params p = {};
    p.q = a->q;
    p.pool = a->pool;
    p.refs = a->refs;
    p.list_offsets = a->list_offsets;
    p.block_elems = (size_t)2 * CKV_BLOCK_TOKENS * a->head_dim;
    p.out = a->out;
    p.lse = a->lse;
    p.hpl = a->heads_per_list;
    p.d = a->head_dim;
    p.n_hchunks = (p.hpl + RW - 1) / RW;
    p.scale = attn_scale(a->scale, a->head_dim);
    p.vec = a->pool && dev_vec_ok<T, EPL>(a->pool, p.d, (size_t)p.d, p.block_elems);
    const int units = a->n_lists * p.n_hchunks;
    p.n_splits = attn_splits(cb, units, max_refs, ATTN_MIN_SPLIT_REFS);
    p.split_refs = (max_refs + p.n_splits - 1) / p.n_splits;
    p.n_splits = p.split_refs > 0 ? (max_refs + p.split_refs - 1) / p.split_refs : 1;
    int rc = attn_partials(cb, a->n_q_heads, p.n_splits, p.d, &p.part);
    if (rc)
        return rc;
    auto *kern = attn_blocks_kernel<T, EPL>;
    CUDA_LAUNCH(kern, dim3(units, p.n_splits), ATTN_THREADS, cb->stream, p);
    CUDA_CHECK_LAUNCH(cb);
    return attn_merge(cb, p.part, p.n_splits, a->n_q_heads, p.d, a->out, a->lse);
}

extern "C" int cuda_attn_decode_blocks(struct ckv_ctx *ctx, const struct ckv_attn_blocks_args *a)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    /* the lists live on the device: check them there, then size the splits by the longest */
    rc = cuda_status_reset(cb);
    if (rc)
        return rc;
    CUDA_LAUNCH(attn_blocks_check, a->n_lists, 128, cb->stream, a->refs, a->list_offsets, a->pool,
                cb->status_dev);
    CUDA_CHECK_LAUNCH(cb);
    struct cuda_status st;
    rc = cuda_status_read(cb, &st);
    if (rc)
        return rc;
    if (st.bad)
        return -EINVAL;
    return DEV_DISPATCH(blocks_run, a->dtype == CKV_DTYPE_F16, a->head_dim, cb, a, st.max);
}

/* ------------------------------------------------------------------------------------------
 * Causal prefill
 * ------------------------------------------------------------------------------------------ */

struct attn_prefill_params {
    const float *q;
    const void *k, *v;
    size_t head_stride, token_stride;
    float *out;
    int nq, G, d, n_new, pos0, kt; /* kt: keys per shared-memory tile */
    float scale;
};

/* grid (row tiles, n_kv_heads), ATTN_THREADS threads. Rows of KV head h are (token j, group
 * head g) pairs, row = j * G + g; a CTA owns ATTN_WARPS * RW consecutive rows, a warp RW. The
 * layout is the plain one (vec = false): the tiles are f32 in shared memory. */
template <typename T, int EPL>
static __global__ void __launch_bounds__(ATTN_THREADS)
    attn_prefill_kernel(struct attn_prefill_params p)
{
    constexpr int RW = attn_rw<EPL>::RW;
    __shared__ float tile[ATTN_PF_SMEM_FLOATS]; /* K rows (kt, d) then V rows (kt, d) */
    const int lane = threadIdx.x % CUDA_WARP, warp = threadIdx.x / CUDA_WARP;
    const int kvh = blockIdx.y;
    const int n_rows = p.n_new * p.G;
    const int cta_row0 = blockIdx.x * ATTN_WARPS * RW;
    const int cta_rows = n_rows - cta_row0 < ATTN_WARPS * RW ? n_rows - cta_row0 : ATTN_WARPS * RW;
    const int row0 = cta_row0 + warp * RW;
    int nrows = cta_row0 + cta_rows - row0;
    nrows = nrows < 0 ? 0 : nrows > RW ? RW : nrows;
    warp_acc<EPL, RW> w;
    warp_acc_clear(w);
#pragma unroll
    for (int r = 0; r < RW; r++) {
        if (r < nrows) {
            int j = (row0 + r) / p.G, g = (row0 + r) % p.G;
            warp_acc_set_q<T>(w, r, p.q + ((size_t)j * p.nq + (size_t)kvh * p.G + g) * p.d, p.d,
                              p.scale, false, lane);
        }
    }
    /* positions: rows are in token order, so the last row sees the most keys */
    const int cta_last = p.pos0 + (cta_row0 + cta_rows - 1) / p.G;
    const int warp_first = p.pos0 + row0 / p.G;
    const int warp_last = nrows > 0 ? p.pos0 + (row0 + nrows - 1) / p.G : -1;
    const T *kh = (const T *)p.k + (size_t)kvh * p.head_stride;
    const T *vh = (const T *)p.v + (size_t)kvh * p.head_stride;
    float *ks = tile, *vs = tile + (size_t)p.kt * p.d;
    for (int t0 = 0; t0 <= cta_last; t0 += p.kt) {
        const int n = cta_last + 1 - t0 < p.kt ? cta_last + 1 - t0 : p.kt;
        __syncthreads(); /* the previous tile is consumed */
        for (int idx = threadIdx.x; idx < n * p.d; idx += blockDim.x) {
            int j = idx / p.d, i = idx % p.d;
            ks[idx] = dev_load(kh + (size_t)(t0 + j) * p.token_stride + i);
            vs[idx] = dev_load(vh + (size_t)(t0 + j) * p.token_stride + i);
        }
        __syncthreads();
        for (int j = 0; j < n && t0 + j <= warp_last; j++) {
            const int t = t0 + j;
            float kx[EPL], vx[EPL];
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                int i = e * CUDA_WARP + lane;
                kx[e] = i < p.d ? ks[(size_t)j * p.d + i] : 0.0f;
                vx[e] = i < p.d ? vs[(size_t)j * p.d + i] : 0.0f;
            }
            float s[RW];
#pragma unroll
            for (int r = 0; r < RW; r++) {
                s[r] = 0.0f;
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    s[r] += w.q[r][e] * kx[e];
            }
#pragma unroll
            for (int o = CUDA_WARP / 2; o > 0; o >>= 1)
#pragma unroll
                for (int r = 0; r < RW; r++)
                    if (r < nrows)
                        s[r] += __shfl_xor_sync(0xffffffffu, s[r], o);
            const bool all_see = t <= warp_first;
#pragma unroll
            for (int r = 0; r < RW; r++) {
                if (r < nrows && (all_see || t <= p.pos0 + (row0 + r) / p.G)) {
                    float corr, pw;
                    ckv_math_softmax_add(&w.m[r], &w.l[r], s[r], &corr, &pw);
#pragma unroll
                    for (int e = 0; e < EPL; e++)
                        w.acc[r][e] = w.acc[r][e] * corr + pw * vx[e];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RW; r++) {
        if (r < nrows) {
            int j = (row0 + r) / p.G, g = (row0 + r) % p.G;
            float *o = p.out + ((size_t)j * p.nq + (size_t)kvh * p.G + g) * p.d;
            float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                int i = e * CUDA_WARP + lane;
                if (i < p.d)
                    o[i] = w.acc[r][e] * inv;
            }
        }
    }
}

template <typename T, int EPL>
static int prefill_run(struct cuda_backend *cb, const struct ckv_attn_prefill_args *a)
{
    constexpr int RW = attn_rw<EPL>::RW;
    struct attn_prefill_params p = {};
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.head_stride = a->head_stride;
    p.token_stride = a->token_stride;
    p.out = a->out;
    p.nq = a->n_q_heads;
    p.G = a->n_q_heads / a->n_kv_heads;
    p.d = a->head_dim;
    p.n_new = a->n_new;
    p.pos0 = a->pos0;
    p.kt = ATTN_PF_SMEM_FLOATS / (2 * p.d);
    p.kt = p.kt > 32 ? 32 : p.kt;
    p.scale = attn_scale(a->scale, a->head_dim);
    int64_t rows = (int64_t)a->n_new * p.G;
    if (rows > INT32_MAX || a->n_kv_heads > 65535) /* int row indices; gridDim.y */
        return -EINVAL;
    unsigned tiles = (unsigned)((rows + ATTN_WARPS * RW - 1) / (ATTN_WARPS * RW));
    auto *kern = attn_prefill_kernel<T, EPL>;
    CUDA_LAUNCH(kern, dim3(tiles, a->n_kv_heads), ATTN_THREADS, cb->stream, p);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

extern "C" int cuda_attn_prefill(struct ckv_ctx *ctx, const struct ckv_attn_prefill_args *a)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    return DEV_DISPATCH(prefill_run, a->dtype == CKV_DTYPE_F16, a->head_dim, cb, a);
}
