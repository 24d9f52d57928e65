/*
 * Cosine k-means of one (layer, KV head)'s keys on CUDA (ALGORITHM.md section 1), and packing
 * rows into pool blocks.
 *
 * The algorithm is the CPU's (cpu/cpu_kmeans.c), step for step, so that the same seed gives
 * the same clustering wherever the arithmetic allows:
 *   - unit keys X and their f16 copy Xh: one thread per row, the CPU's double-precision norm
 *     in the CPU's order (__dadd_rn / __dmul_rn: no FMA contraction), so X and Xh are
 *     bit-equal to the CPU's;
 *   - k-means++: the same splitmix64 draws (made on the host from the seed, one per centre),
 *     the same 1024-row chunks, chunk sums of D in double in row order, and the CPU's walk to
 *     the picked token (one thread); distances 1 - Xh . U from warp dot products;
 *   - Lloyd: tokens grouped by label (a radix sort of (label, index) keys: ascending index
 *     within a cluster, as the CPU's counting sort), centre directions summed member by member
 *     in that order in f32 and normalised like X (bit-equal given equal labels), assignment
 *     by cuBLAS SGEMM (plain f32, no TF32) and a first-maximum argmax per row;
 *   - output: empty clusters dropped, CSR in cluster order, centroids = mean of the raw keys
 *     summed in member order (bit-equal given equal members).
 * What can differ is the order of the f32 sums inside dot products (warp and cuBLAS order vs
 * the CPU's SIMD order, which already differs between the CPU's own ISAs): a distance or a
 * similarity may differ in its last bit, and a token whose two best centres tie to within
 * that may go the other way. CPU and CUDA therefore give the same clustering except at such
 * near-ties; the tests ask for the CPU's cluster count and at most 1% of tokens elsewhere
 * (the criterion the CPU meets against its double-precision reference), and exact recovery of
 * planted clusters. docs/CUDA.md says the same.
 *
 * Cost: the initialisation is sequential in its C centres (two small kernels each) and each
 * iteration synchronises once to read the label changes; fine for a prefill's clustering
 * (C in the hundreds), dominated on a GPU by launch latency, not bandwidth.
 */
#include <errno.h>
#include <stdlib.h>

#include "ckv_half.h"
#include "ckv_rng.h"
#include "cuda_dev.cuh"

#define KM_CHUNK   1024 /* rows per init chunk: the CPU's, for the same chunk sums */
#define KM_THREADS 256
#define KM_S_BYTES (64u << 20) /* similarity rows per assignment GEMM: at most 64 MiB */

/* Unit keys: X (n, d) f32 and Xh (n, d) f16, one thread per row (see the file comment). */
template <typename T>
static __global__ void km_normalise(const T *keys, size_t row_stride, int n, int d, float *X,
                                    uint16_t *Xh)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    const T *row = keys + (size_t)i * row_stride;
    float *x = X + (size_t)i * d;
    double ss = 0.0;
    for (int t = 0; t < d; t++) {
        float v = dev_load(row + t);
        x[t] = v;
        ss = __dadd_rn(ss, __dmul_rn((double)v, (double)v));
    }
    float inv = ss > 0.0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
    for (int t = 0; t < d; t++) {
        float v = __fmul_rn(x[t], inv);
        x[t] = v;
        Xh[(size_t)i * d + t] = ckv_half_from_f32(v);
    }
}

/* k-means++: centre c's token (the CPU's init_pick on chunk sums and D; one thread), then its
 * f16 unit key as U[c]. uniform[c] is the c-th draw of the seed's stream. */
static __global__ void km_init_pick(int c, int n, int d, int n_chunks, const double *uniform,
                                    const double *chunk_sum, const float *D, const uint16_t *Xh,
                                    float *U)
{
    __shared__ int pick;
    if (threadIdx.x == 0) {
        const double u = uniform[c];
        int p = -1;
        if (c == 0) {
            p = (int)(u * n);
        } else {
            double total = 0.0;
            for (int k = 0; k < n_chunks; k++)
                total += chunk_sum[k];
            if (!(total > 0.0)) { /* every token sits on a centre: a duplicate centre */
                p = (int)(u * n);
            } else {
                double target = u * total, cum = 0.0;
                int last_pos = -1;
                for (int k = 0; k < n_chunks && p < 0; k++) {
                    if (cum + chunk_sum[k] <= target && k + 1 < n_chunks) {
                        cum += chunk_sum[k];
                        continue;
                    }
                    int i1 = (k + 1) * KM_CHUNK < n ? (k + 1) * KM_CHUNK : n;
                    for (int i = k * KM_CHUNK; i < i1; i++) {
                        if (D[i] <= 0.0f)
                            continue;
                        last_pos = i;
                        cum += D[i];
                        if (cum > target) {
                            p = i;
                            break;
                        }
                    }
                }
                if (p < 0)
                    p = last_pos >= 0 ? last_pos : 0; /* rounding ran past the end */
            }
        }
        pick = p;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < d; t += blockDim.x)
        U[(size_t)c * d + t] = ckv_half_to_f32(Xh[(size_t)pick * d + t]);
}

/* k-means++: D = min(D, 1 - Xh . U_c), label = c where it improves; the chunk's sum of D in
 * double, in row order. One CTA per chunk, a warp per row. */
template <int EPL>
static __global__ void __launch_bounds__(KM_THREADS)
    km_init_update(int c, int n, int d, const uint16_t *Xh, const float *U, float *D,
                   int32_t *label, double *chunk_sum)
{
    __shared__ float dsh[KM_CHUNK];
    const int lane = threadIdx.x % CUDA_WARP, warp = threadIdx.x / CUDA_WARP;
    const int i0 = blockIdx.x * KM_CHUNK;
    const int rows = n - i0 < KM_CHUNK ? n - i0 : KM_CHUNK;
    float u[EPL];
    dev_load_row<float, EPL>(U + (size_t)c * d, d, false, lane, u);
    for (int r = warp; r < rows; r += KM_THREADS / CUDA_WARP) {
        const int i = i0 + r;
        float x[EPL];
        dev_load_row<uint16_t, EPL>(Xh + (size_t)i * d, d, false, lane, x);
        float part = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++)
            part += x[e] * u[e];
        float sim = dev_warp_sum(part);
        if (lane == 0) {
            float dist = 1.0f - sim;
            if (dist < 0.0f)
                dist = 0.0f;
            if (c == 0 || dist < D[i]) {
                D[i] = dist;
                label[i] = c;
            }
            dsh[r] = D[i];
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum = 0.0;
        for (int r = 0; r < rows; r++)
            sum += dsh[r];
        chunk_sum[blockIdx.x] = sum;
    }
}

/* Grouping: key of token i = (C - 1 - label, ~i), so a descending sort puts clusters in
 * ascending order and tokens ascending within each; counts per label. */
static __global__ void km_group_keys(const int32_t *label, int n, int C, uint64_t *keys,
                                     int32_t *count)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    keys[i] = ((uint64_t)(uint32_t)(C - 1 - label[i]) << 32) | (0xffffffffu - (uint32_t)i);
    atomicAdd(&count[label[i]], 1);
}

/* order[m] = the token of sorted key m; start = exclusive prefix sum of count (thread 0 of
 * CTA 0, sequential: C is at most n and this runs once per iteration). */
static __global__ void km_group_order(const uint64_t *sorted, int n, const int32_t *count, int C,
                                      int32_t *order, int32_t *start)
{
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m < n)
        order[m] = (int32_t)(0xffffffffu - (uint32_t)sorted[m]);
    if (m == 0) {
        start[0] = 0;
        for (int c = 0; c < C; c++)
            start[c + 1] = start[c] + count[c];
    }
}

/* U_c[t] = sum of the members' X[.][t] in member order, for non-empty c (an emptied cluster
 * keeps its direction). A thread per (c, t). */
static __global__ void km_update_sum(const float *X, const int32_t *order, const int32_t *start,
                                     int C, int d, float *U)
{
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)C * d)
        return;
    const int c = (int)(idx / d), t = (int)(idx % d);
    const int b = start[c], e = start[c + 1];
    if (b == e)
        return;
    float acc = 0.0f;
    for (int m = b; m < e; m++)
        acc = __fadd_rn(acc, X[(size_t)order[m] * d + t]);
    U[(size_t)c * d + t] = acc;
}

/* Normalises the non-empty centres as km_normalise normalises keys. A thread per centre. */
static __global__ void km_update_norm(const int32_t *count, int C, int d, float *U)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C || count[c] == 0)
        return;
    float *u = U + (size_t)c * d;
    double ss = 0.0;
    for (int t = 0; t < d; t++)
        ss = __dadd_rn(ss, __dmul_rn((double)u[t], (double)u[t]));
    float inv = ss > 0.0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
    for (int t = 0; t < d; t++)
        u[t] = __fmul_rn(u[t], inv);
}

/* Assignment of rows r0 .. r0 + rows - 1 from their similarity rows S (rows, C): the first
 * maximum (a NaN never wins; all NaN or -inf gives 0). A warp per row; changes counted. */
static __global__ void km_argmax(const float *S, int rows, int r0, int C, int32_t *label,
                                 int *changes)
{
    const int lane = threadIdx.x % CUDA_WARP;
    const int r = blockIdx.x * (blockDim.x / CUDA_WARP) + threadIdx.x / CUDA_WARP;
    if (r >= rows)
        return; /* whole warps leave together */
    const float *s = S + (size_t)r * C;
    float best = -INFINITY;
    int bi = -1;
    for (int c = lane; c < C; c += CUDA_WARP)
        if (s[c] > best) {
            best = s[c];
            bi = c;
        }
#pragma unroll
    for (int o = CUDA_WARP / 2; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ob > best || (ob == best && oi < bi))) {
            best = ob;
            bi = oi;
        }
    }
    if (lane == 0) {
        int i = r0 + r;
        int best_c = bi < 0 ? 0 : bi;
        if (best_c != label[i]) {
            label[i] = best_c;
            atomicAdd(changes, 1);
        }
    }
}

/* Output members (pos_base + token, in cluster order: empty clusters hold none) and, a thread
 * per (output cluster, element), the centroid: the raw keys summed in member order, times
 * 1 / size; sizes. */
static __global__ void km_out_members(const int32_t *order, int n, int32_t pos_base,
                                      int32_t *members)
{
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m < n)
        members[m] = pos_base + order[m];
}

template <typename T>
static __global__ void km_out_centroids(const T *keys, size_t row_stride, const int32_t *order,
                                        const int32_t *start, const int32_t *old_of_new, int n_out,
                                        int d, float *centroids, int32_t *sizes)
{
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)n_out * d)
        return;
    const int c = (int)(idx / d), t = (int)(idx % d);
    const int old = old_of_new[c], b = start[old], e = start[old + 1];
    float acc = 0.0f;
    for (int m = b; m < e; m++)
        acc = __fadd_rn(acc, dev_load(keys + (size_t)order[m] * row_stride + t));
    float inv = 1.0f / (float)(e - b);
    centroids[(size_t)c * d + t] = __fmul_rn(acc, inv);
    if (t == 0)
        sizes[c] = e - b;
}

/* Device temporaries of one clustering. */
struct km_dev {
    float *X, *U, *D, *S;
    uint16_t *Xh;
    int32_t *label, *order, *count, *start, *old_of_new;
    double *chunk_sum, *uniform;
    int *changes;
    struct cuda_rank rank; /* (label, token) keys, one segment */
};

static int km_layout(struct cuda_backend *cb, struct cuda_arena *ar, int n, int d, int C,
                     int n_chunks, int s_rows, struct km_dev *k)
{
    k->X = (float *)cuda_arena_take(ar, (size_t)n * d * sizeof(float));
    k->Xh = (uint16_t *)cuda_arena_take(ar, (size_t)n * d * sizeof(uint16_t));
    k->U = (float *)cuda_arena_take(ar, (size_t)C * d * sizeof(float));
    k->D = (float *)cuda_arena_take(ar, (size_t)n * sizeof(float));
    k->S = (float *)cuda_arena_take(ar, (size_t)s_rows * C * sizeof(float));
    k->label = (int32_t *)cuda_arena_take(ar, (size_t)n * sizeof(int32_t));
    k->order = (int32_t *)cuda_arena_take(ar, (size_t)n * sizeof(int32_t));
    k->count = (int32_t *)cuda_arena_take(ar, (size_t)C * sizeof(int32_t));
    k->start = (int32_t *)cuda_arena_take(ar, (size_t)(C + 1) * sizeof(int32_t));
    k->old_of_new = (int32_t *)cuda_arena_take(ar, (size_t)C * sizeof(int32_t));
    k->chunk_sum = (double *)cuda_arena_take(ar, (size_t)n_chunks * sizeof(double));
    k->uniform = (double *)cuda_arena_take(ar, (size_t)C * sizeof(double));
    k->changes = (int *)cuda_arena_take(ar, sizeof(int));
    return cuda_rank_layout(cb, ar, n, 1, &k->rank);
}

/* Groups tokens by label: order, count, start (queued). */
static int km_group(struct cuda_backend *cb, struct km_dev *k, int n, int C)
{
    CUDA_CHECK(cb, cudaMemsetAsync(k->count, 0, (size_t)C * sizeof(int32_t), cb->stream));
    CUDA_LAUNCH(km_group_keys, cuda_blocks((size_t)n, KM_THREADS), KM_THREADS, cb->stream, k->label,
                n, C, k->rank.keys_in, k->count);
    CUDA_CHECK_LAUNCH(cb);
    int rc = cuda_rank_sort(cb, &k->rank);
    if (rc)
        return rc;
    CUDA_LAUNCH(km_group_order, cuda_blocks((size_t)n, KM_THREADS), KM_THREADS, cb->stream,
                k->rank.keys_out, n, k->count, C, k->order, k->start);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

/* k-means++ initialisation (queued). */
template <int EPL>
static int km_init(struct cuda_backend *cb, struct km_dev *k, int n, int d, int C, int n_chunks)
{
    auto *update = km_init_update<EPL>;
    for (int c = 0; c < C; c++) {
        CUDA_LAUNCH(km_init_pick, 1, 128, cb->stream, c, n, d, n_chunks, k->uniform, k->chunk_sum,
                    k->D, k->Xh, k->U);
        CUDA_CHECK_LAUNCH(cb);
        CUDA_LAUNCH(update, n_chunks, KM_THREADS, cb->stream, c, n, d, k->Xh, k->U, k->D, k->label,
                    k->chunk_sum);
        CUDA_CHECK_LAUNCH(cb);
    }
    return 0;
}

static int km_init_dispatch(struct cuda_backend *cb, struct km_dev *k, int n, int d, int C,
                            int n_chunks)
{
    return d <= 64    ? km_init<2>(cb, k, n, d, C, n_chunks)
           : d <= 128 ? km_init<4>(cb, k, n, d, C, n_chunks)
           : d <= 256 ? km_init<8>(cb, k, n, d, C, n_chunks)
                      : km_init<16>(cb, k, n, d, C, n_chunks);
}

/* One Lloyd iteration: group, new directions, reassign; *changes_host (synchronises). */
static int km_iterate(struct cuda_backend *cb, struct km_dev *k, int n, int d, int C, int s_rows,
                      int *changes_host)
{
    int rc = km_group(cb, k, n, C);
    if (rc)
        return rc;
    size_t cd = (size_t)C * d;
    CUDA_LAUNCH(km_update_sum, cuda_blocks(cd, KM_THREADS), KM_THREADS, cb->stream, k->X, k->order,
                k->start, C, d, k->U);
    CUDA_CHECK_LAUNCH(cb);
    CUDA_LAUNCH(km_update_norm, cuda_blocks((size_t)C, 128), 128, cb->stream, k->count, C, d, k->U);
    CUDA_CHECK_LAUNCH(cb);
    CUDA_CHECK(cb, cudaMemsetAsync(k->changes, 0, sizeof(int), cb->stream));
    const float one = 1.0f, zero = 0.0f;
    for (int r0 = 0; r0 < n; r0 += s_rows) {
        int rows = n - r0 < s_rows ? n - r0 : s_rows;
        /* column-major view: S^T (C, rows) = U (C, d) . X_chunk^T, i.e. row-major S (rows, C) */
        CUBLAS_CHECK(cb, cublasSgemm(cb->cublas, CUBLAS_OP_T, CUBLAS_OP_N, C, rows, d, &one, k->U,
                                     d, k->X + (size_t)r0 * d, d, &zero, k->S, C));
        CUDA_LAUNCH(km_argmax, cuda_blocks((size_t)rows, KM_THREADS / CUDA_WARP), KM_THREADS,
                    cb->stream, k->S, rows, r0, C, k->label, k->changes);
        CUDA_CHECK_LAUNCH(cb);
    }
    CUDA_CHECK(cb, cudaMemcpyAsync(changes_host, k->changes, sizeof(int), cudaMemcpyDeviceToHost,
                                   cb->stream));
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    return 0;
}

/* Host arrays of the output step; freed by the caller. */
struct km_host {
    double *uniform;
    int32_t *count, *old_of_new, *offsets;
};

static void km_host_free(struct km_host *h)
{
    free(h->uniform);
    free(h->count);
    free(h->old_of_new);
    free(h->offsets);
}

extern "C" int cuda_kmeans(struct ckv_ctx *ctx, const void *keys, enum ckv_dtype dtype,
                           int n_tokens, int head_dim, size_t row_stride, int32_t pos_base,
                           const struct ckv_kmeans_params *params, struct ckv_kmeans_out *out,
                           int *n_clusters_host, int *n_iter_host)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    const int n = n_tokens, d = head_dim;
    const int C = params->n_clusters < n ? params->n_clusters : n;
    const int n_chunks = (n + KM_CHUNK - 1) / KM_CHUNK;
    int s_rows = (int)(KM_S_BYTES / ((size_t)C * sizeof(float)));
    s_rows = s_rows < 1 ? 1 : s_rows > n ? n : s_rows;

    struct km_host h = {};
    h.uniform = (double *)malloc((size_t)C * sizeof(double));
    h.count = (int32_t *)malloc((size_t)C * sizeof(int32_t));
    h.old_of_new = (int32_t *)malloc((size_t)C * sizeof(int32_t));
    h.offsets = (int32_t *)malloc((size_t)(C + 1) * sizeof(int32_t));
    struct km_dev k;
    struct cuda_arena ar = {NULL, 0};
    void *base;
    if (!h.uniform || !h.count || !h.old_of_new || !h.offsets) {
        rc = -ENOMEM;
        goto out;
    }
    if ((rc = km_layout(cb, &ar, n, d, C, n_chunks, s_rows, &k)) ||
        (rc = cuda_scratch(cb, ar.used, &base)))
        goto out;
    ar = (struct cuda_arena){(char *)base, 0};
    if ((rc = km_layout(cb, &ar, n, d, C, n_chunks, s_rows, &k)))
        goto out;
    if ((rc = cuda_rank_uniform(cb, &k.rank, n)))
        goto out;

    /* the seed's stream, one draw per centre, as the CPU draws them */
    {
        uint64_t rng = params->seed;
        for (int c = 0; c < C; c++)
            h.uniform[c] = ckv_rng_uniform(&rng);
    }
    if (cudaMemcpyAsync(k.uniform, h.uniform, (size_t)C * sizeof(double), cudaMemcpyHostToDevice,
                        cb->stream) != cudaSuccess) {
        rc = cuda_fail(cb, cudaGetLastError(), "cudaMemcpyAsync(uniform)", __FILE__, __LINE__);
        goto out;
    }
    if (dtype == CKV_DTYPE_F16)
        CUDA_LAUNCH(km_normalise<uint16_t>, cuda_blocks((size_t)n, 128), 128, cb->stream,
                    (const uint16_t *)keys, row_stride, n, d, k.X, k.Xh);
    else
        CUDA_LAUNCH(km_normalise<float>, cuda_blocks((size_t)n, 128), 128, cb->stream,
                    (const float *)keys, row_stride, n, d, k.X, k.Xh);
    if ((rc = cudaGetLastError()) != cudaSuccess) {
        rc = cuda_fail(cb, (cudaError_t)rc, "km_normalise", __FILE__, __LINE__);
        goto out;
    }
    if ((rc = km_init_dispatch(cb, &k, n, d, C, n_chunks)))
        goto out;

    {
        int iters = 0;
        for (int it = 1; it <= params->max_iter; it++) {
            int changes = 0;
            if ((rc = km_iterate(cb, &k, n, d, C, s_rows, &changes)))
                goto out;
            iters = it;
            if (changes == 0 || (double)changes < (double)params->tol * n)
                break;
        }
        if (n_iter_host)
            *n_iter_host = iters;
    }

    /* output: the final grouping; the survivors' map and offsets on the host */
    if ((rc = km_group(cb, &k, n, C)))
        goto out;
    if (cudaMemcpyAsync(h.count, k.count, (size_t)C * sizeof(int32_t), cudaMemcpyDeviceToHost,
                        cb->stream) != cudaSuccess ||
        cudaStreamSynchronize(cb->stream) != cudaSuccess) {
        rc = cuda_fail(cb, cudaGetLastError(), "k-means counts", __FILE__, __LINE__);
        goto out;
    }
    {
        int n_out = 0;
        h.offsets[0] = 0;
        for (int c = 0; c < C; c++)
            if (h.count[c] > 0) {
                h.old_of_new[n_out] = c;
                h.offsets[n_out + 1] = h.offsets[n_out] + h.count[c];
                n_out++;
            }
        if (cudaMemcpyAsync(k.old_of_new, h.old_of_new, (size_t)n_out * sizeof(int32_t),
                            cudaMemcpyHostToDevice, cb->stream) != cudaSuccess ||
            cudaMemcpyAsync(out->offsets, h.offsets, (size_t)(n_out + 1) * sizeof(int32_t),
                            cudaMemcpyHostToDevice, cb->stream) != cudaSuccess) {
            rc = cuda_fail(cb, cudaGetLastError(), "k-means offsets", __FILE__, __LINE__);
            goto out;
        }
        CUDA_LAUNCH(km_out_members, cuda_blocks((size_t)n, KM_THREADS), KM_THREADS, cb->stream,
                    k.order, n, pos_base, out->members);
        size_t nd = (size_t)n_out * d;
        if (dtype == CKV_DTYPE_F16)
            CUDA_LAUNCH(km_out_centroids<uint16_t>, cuda_blocks(nd, KM_THREADS), KM_THREADS,
                        cb->stream, (const uint16_t *)keys, row_stride, k.order, k.start,
                        k.old_of_new, n_out, d, out->centroids, out->sizes);
        else
            CUDA_LAUNCH(km_out_centroids<float>, cuda_blocks(nd, KM_THREADS), KM_THREADS,
                        cb->stream, (const float *)keys, row_stride, k.order, k.start, k.old_of_new,
                        n_out, d, out->centroids, out->sizes);
        cudaError_t err = cudaGetLastError();
        if (err == cudaSuccess)
            err = cudaStreamSynchronize(cb->stream); /* h's buffers are freed below */
        if (err != cudaSuccess) {
            rc = cuda_fail(cb, err, "k-means output", __FILE__, __LINE__);
            goto out;
        }
        *n_clusters_host = n_out;
    }
    rc = 0;
out:
    km_host_free(&h);
    return rc;
}

/* ------------------------------------------------------------------------------------------
 * Packing rows into blocks
 * ------------------------------------------------------------------------------------------ */

/* rows and slots non-negative (grid-stride). */
static __global__ void pack_check(const int32_t *rows, int n_rows, const int32_t *slots,
                                  int n_blocks, struct cuda_status *st)
{
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_rows; i += stride)
        if (rows[i] < 0)
            atomicOr(&st->bad, 1);
    for (int b = blockIdx.x * blockDim.x + threadIdx.x; b < n_blocks; b += stride)
        if (slots[b] < 0)
            atomicOr(&st->bad, 1);
}

/* One CTA per block: token t of block b is row rows[16 b + t] (zeros past n_rows), K rows then
 * V rows. Elements are copied as they are (no conversion). */
template <typename T>
static __global__ void pack_kernel(const T *k, const T *v, int d, size_t token_stride,
                                   const int32_t *rows, int n_rows, T *pool, const int32_t *slots)
{
    const int b = blockIdx.x;
    T *blk = pool + (size_t)slots[b] * 2 * CKV_BLOCK_TOKENS * d;
    for (int idx = threadIdx.x; idx < CKV_BLOCK_TOKENS * d; idx += blockDim.x) {
        const int t = idx / d, i = idx % d, r = b * CKV_BLOCK_TOKENS + t;
        T kx = T(), vx = T();
        if (r < n_rows) {
            size_t src = (size_t)rows[r] * token_stride + i;
            kx = k[src];
            vx = v[src];
        }
        blk[idx] = kx;
        blk[(size_t)CKV_BLOCK_TOKENS * d + idx] = vx;
    }
}

extern "C" int cuda_pack_blocks(struct ckv_ctx *ctx, const void *k, const void *v,
                                enum ckv_dtype dtype, int head_dim, size_t token_stride,
                                const int32_t *rows, int n_rows, void *pool, const int32_t *slots)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    const int n_blocks = (n_rows + CKV_BLOCK_TOKENS - 1) / CKV_BLOCK_TOKENS;
    /* rows and slots live on the device: check them there first */
    if ((rc = cuda_status_reset(cb)))
        return rc;
    unsigned grid = cuda_blocks((size_t)n_rows, 256);
    grid = grid > 256 ? 256 : grid;
    CUDA_LAUNCH(pack_check, grid, 256, cb->stream, rows, n_rows, slots, n_blocks, cb->status_dev);
    CUDA_CHECK_LAUNCH(cb);
    struct cuda_status st;
    if ((rc = cuda_status_read(cb, &st)))
        return rc;
    if (st.bad)
        return -EINVAL;
    if (dtype == CKV_DTYPE_F16)
        CUDA_LAUNCH(pack_kernel<uint16_t>, n_blocks, 128, cb->stream, (const uint16_t *)k,
                    (const uint16_t *)v, head_dim, token_stride, rows, n_rows, (uint16_t *)pool,
                    slots);
    else
        CUDA_LAUNCH(pack_kernel<float>, n_blocks, 128, cb->stream, (const float *)k,
                    (const float *)v, head_dim, token_stride, rows, n_rows, (float *)pool, slots);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}
