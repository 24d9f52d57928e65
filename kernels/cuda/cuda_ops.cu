/*
 * The CUDA backend's dense ops (ops.h; what agrees with the CPU how: cuda_ops.h): matrix
 * products, embedding lookup, RMSNorm, RoPE, SwiGLU, adds, on the context's stream.
 *
 * Quantized matmul, two kernels. quant_q8_kernel: one warp per 32-element activation block,
 * a lane per element: max|x| by a warp reduction, the codes from the f32 reciprocal, their sum
 * by a warp reduction, d and s rounded to f16 as cpu_ops.c's quantize_row_q8 does (the same
 * bytes). mm_q_kernel: one warp per weight row and MQ_X activation rows; lane l takes the
 * row's blocks l, l + 32, ..., packs each weight block once into registers and dots it with
 * the MQ_X activation blocks in DP4As (8 per block pair), so a decode batch reads the weights
 * once; a warp sum ends each output. Float weights go to cuBLAS (DESIGN.md: cuBLAS for matrix
 * products on a GPU).
 *
 * Host arrays (get_rows' ids, RoPE's positions) are copied into the context's scratch first;
 * cudaMemcpyAsync from pageable memory returns once the bytes are staged, so the caller's
 * array may go away at once.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_half.h"
#include "cuda_backend.h"
#include "cuda_dev.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define QK    32 /* elements per quantized block (ggml's QK4_0 = QK4_1 = QK8_0) */
#define MQ_W  4  /* weight rows per CTA of mm_q_kernel: one per warp */
#define MQ_X  4  /* activation rows per warp of mm_q_kernel */
#define EW_TB 256

/* An activation block quantized to 8 bits (cpu_ops.h's struct cpu_q8, the same values). */
struct dev_q8 {
    float d;      /* f16(max|x|/127), held in f32 */
    float s;      /* f16(max|x|/127 * sum(q)) */
    int qsum;     /* sum(q): Q4_0's offset of 8 is subtracted through it */
    int8_t q[QK]; /* 4-byte aligned: read as 8 packed ints */
};

/* ---- device helpers ---- */

/* A little-endian 16-bit value at any byte address (weight rows need no alignment). */
static __device__ __forceinline__ uint16_t dev_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

/* f16 rounding of a block scale or sum; beyond f16's range it stays f32 (cpu_ops.c). */
static __device__ __forceinline__ float dev_round_f16(float v)
{
    uint16_t h = ckv_half_from_f32(v);
    return (h & 0x7c00u) == 0x7c00u && isfinite(v) ? v : ckv_half_to_f32(h);
}

/* f32 -> bf16 bits, nearest even, NaN stays a quiet NaN. */
static __device__ __forceinline__ uint16_t dev_bf16_from_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* c + the dot product of the four signed bytes of a and of b (the DP4A instruction on a GPU,
 * sm_61 and later). */
static __device__ __forceinline__ int dev_dp4a(int a, int b, int c)
{
#ifdef CKV_CUDA_EMU
    for (int k = 0; k < 4; k++)
        c += (int)(int8_t)(uint8_t)((unsigned)a >> (8 * k)) *
             (int)(int8_t)(uint8_t)((unsigned)b >> (8 * k));
    return c;
#else
    return __dp4a(a, b, c);
#endif
}

/* Four bytes at any address as one little-endian int (weight blocks are 2-byte aligned at best). */
static __device__ __forceinline__ int dev_pack4(const uint8_t *p)
{
    return (int)((unsigned)p[0] | (unsigned)p[1] << 8 | (unsigned)p[2] << 16 |
                 (unsigned)p[3] << 24);
}

/* Element c of a weight row of type t, as cpu_ops_dequant_row computes it (no FMA). */
static __device__ __forceinline__ float dev_dequant(int t, const uint8_t *row, int c)
{
    switch (t) {
    case CKV_W_F32: {
        float f;
        memcpy(&f, row + (size_t)c * 4, sizeof(f));
        return f;
    }
    case CKV_W_F16: return ckv_half_to_f32(dev_u16(row + (size_t)c * 2));
    case CKV_W_BF16: {
        uint32_t u = (uint32_t)dev_u16(row + (size_t)c * 2) << 16;
        float f;
        memcpy(&f, &u, sizeof(f));
        return f;
    }
    case CKV_W_Q8_0: {
        const uint8_t *blk = row + (size_t)(c / QK) * (2 + QK);
        return __fmul_rn(ckv_half_to_f32(dev_u16(blk)), (float)(int8_t)blk[2 + c % QK]);
    }
    case CKV_W_Q4_0: {
        const uint8_t *blk = row + (size_t)(c / QK) * (2 + QK / 2);
        int j = c % QK;
        int nib = j < QK / 2 ? blk[2 + j] & 0xf : blk[2 + j - QK / 2] >> 4;
        return __fmul_rn(ckv_half_to_f32(dev_u16(blk)), (float)(nib - 8));
    }
    default: { /* CKV_W_Q4_1 */
        const uint8_t *blk = row + (size_t)(c / QK) * (4 + QK / 2);
        int j = c % QK;
        int nib = j < QK / 2 ? blk[4 + j] & 0xf : blk[4 + j - QK / 2] >> 4;
        return __fadd_rn(__fmul_rn(ckv_half_to_f32(dev_u16(blk)), (float)nib),
                         ckv_half_to_f32(dev_u16(blk + 2)));
    }
    }
}

static inline int is_quant(int t)
{
    return t == CKV_W_Q4_0 || t == CKV_W_Q4_1 || t == CKV_W_Q8_0;
}

/* ---- quantized matmul ---- */

/* x (n_blocks, 32) f32 -> out (n_blocks) dev_q8; one warp per block. */
static __global__ void quant_q8_kernel(const float *__restrict__ x, size_t n_blocks,
                                       dev_q8 *__restrict__ out)
{
    size_t g = (size_t)blockIdx.x * (blockDim.x / CUDA_WARP) + threadIdx.x / CUDA_WARP;
    int lane = threadIdx.x % CUDA_WARP;
    if (g >= n_blocks) /* the whole warp */
        return;
    float v = x[g * QK + lane];
    float a = fabsf(v);
    a = a > 0.0f ? a : 0.0f; /* NaN takes no part in the maximum, as on the CPU */
#pragma unroll
    for (int o = CUDA_WARP / 2; o > 0; o >>= 1) {
        float b = __shfl_xor_sync(0xffffffffu, a, o);
        a = b > a ? b : a;
    }
    float id = a > 0.0f ? 127.0f / a : 0.0f;
    float t = v * id;
    t = t > 127.0f ? 127.0f : t;
    t = t < -127.0f ? -127.0f : t;
    t = t == t ? t : 0.0f;
    int q = (int)rintf(t); /* nearest even */
    int sum = q;
#pragma unroll
    for (int o = CUDA_WARP / 2; o > 0; o >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    out[g].q[lane] = (int8_t)q;
    if (lane == 0) {
        out[g].qsum = sum;
        float d = a / 127.0f;
        out[g].d = dev_round_f16(d);
        out[g].s = dev_round_f16(d * (float)sum);
    }
}

/* y (n, rows) = W . xq for activation rows i_base + blockIdx.y * MQ_X + [0, MQ_X). A weight
 * block is packed into 8 ints of signed bytes once (Q4: the nibbles as bytes 0..15) and meets
 * each activation block in 8 DP4As; Q4_0's -8 comes off as 8 * sum(q_x). */
template <int T>
static __global__ void mm_q_kernel(const uint8_t *__restrict__ w, size_t row_bytes, int rows,
                                   int nb, const dev_q8 *__restrict__ xq, int n, int i_base,
                                   float *__restrict__ y)
{
    constexpr int BLK = T == CKV_W_Q8_0 ? 2 + QK : T == CKV_W_Q4_0 ? 2 + QK / 2 : 4 + QK / 2;
    int lane = threadIdx.x % CUDA_WARP;
    int r = blockIdx.x * MQ_W + threadIdx.x / CUDA_WARP;
    int i0 = i_base + blockIdx.y * MQ_X;
    if (r >= rows) /* the whole warp */
        return;
    const uint8_t *wr = w + (size_t)r * row_bytes;
    float acc[MQ_X];
#pragma unroll
    for (int k = 0; k < MQ_X; k++)
        acc[k] = 0.0f;
    for (int b = lane; b < nb; b += CUDA_WARP) {
        const uint8_t *blk = wr + (size_t)b * BLK;
        float dw = ckv_half_to_f32(dev_u16(blk)), mw = 0.0f;
        int wq[QK / 4]; /* elements 4c .. 4c+3 in wq[c] */
        if (T == CKV_W_Q8_0) {
#pragma unroll
            for (int c = 0; c < QK / 4; c++)
                wq[c] = dev_pack4(blk + 2 + 4 * c);
        } else {
            const uint8_t *qs = blk + (T == CKV_W_Q4_1 ? 4 : 2);
#pragma unroll
            for (int c = 0; c < QK / 8; c++) {
                unsigned u = (unsigned)dev_pack4(qs + 4 * c);
                wq[c] = (int)(u & 0x0f0f0f0fu);                 /* elements 4c .. 4c+3 */
                wq[c + QK / 8] = (int)((u >> 4) & 0x0f0f0f0fu); /* elements 16+4c .. */
            }
            if (T == CKV_W_Q4_1)
                mw = ckv_half_to_f32(dev_u16(blk + 2));
        }
#pragma unroll
        for (int k = 0; k < MQ_X; k++) {
            if (i0 + k >= n)
                break;
            const dev_q8 *xb = xq + (size_t)(i0 + k) * nb + b;
            const int *xq4 = reinterpret_cast<const int *>(xb->q);
            int isum = 0;
#pragma unroll
            for (int c = 0; c < QK / 4; c++)
                isum = dev_dp4a(wq[c], xq4[c], isum);
            if (T == CKV_W_Q4_0)
                isum -= 8 * xb->qsum;
            acc[k] = fmaf(dw * xb->d, (float)isum, acc[k]);
            if (T == CKV_W_Q4_1)
                acc[k] = fmaf(mw, xb->s, acc[k]);
        }
    }
#pragma unroll
    for (int k = 0; k < MQ_X; k++) {
        float s = dev_warp_sum(acc[k]);
        if (lane == 0 && i0 + k < n)
            y[(size_t)(i0 + k) * rows + r] = s;
    }
}

static int matmul_quant(struct cuda_backend *cb, const struct ckv_weight *w, const float *x, int n,
                        float *y)
{
    int nb = w->cols / QK;
    size_t n_blocks = (size_t)n * nb;
    void *scratch;
    int rc = cuda_scratch(cb, n_blocks * sizeof(dev_q8), &scratch);
    if (rc)
        return rc;
    dev_q8 *xq = (dev_q8 *)scratch;
    CUDA_LAUNCH(quant_q8_kernel, cuda_blocks(n_blocks, 4), 4 * CUDA_WARP, cb->stream, x, n_blocks,
                xq);
    CUDA_CHECK_LAUNCH(cb);
    /* activation rows in launches of at most 65535 grid rows (the y limit) */
    const int per_launch = 65535 * MQ_X;
    for (int i_base = 0; i_base < n; i_base += per_launch) {
        int nx = n - i_base < per_launch ? n - i_base : per_launch;
        dim3 grid(cuda_blocks((size_t)w->rows, MQ_W), cuda_blocks((size_t)nx, MQ_X));
        auto *kern = w->type == CKV_W_Q8_0   ? mm_q_kernel<CKV_W_Q8_0>
                     : w->type == CKV_W_Q4_0 ? mm_q_kernel<CKV_W_Q4_0>
                                             : mm_q_kernel<CKV_W_Q4_1>;
        CUDA_LAUNCH(kern, grid, MQ_W * CUDA_WARP, cb->stream, (const uint8_t *)w->data,
                    w->row_bytes, w->rows, nb, (const dev_q8 *)xq, n, i_base, y);
        CUDA_CHECK_LAUNCH(cb);
    }
    return 0;
}

/* ---- float matmul (cuBLAS) ---- */

/* x (n) f32 -> f16 (bf16 = 0) or bf16 (bf16 = 1) bits. */
static __global__ void round_x_kernel(const float *__restrict__ x, size_t n, int bf16,
                                      uint16_t *__restrict__ out)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = bf16 ? dev_bf16_from_f32(x[i]) : ckv_half_from_f32(x[i]);
}

/* A grid-stride grid: a few waves of blocks whatever n is. */
static unsigned ew_grid(const struct cuda_backend *cb, size_t n)
{
    size_t blocks = cuda_blocks(n, EW_TB), most = (size_t)cb->n_sm * 8;
    return (unsigned)(blocks < most ? blocks : most);
}

static int matmul_float(struct cuda_backend *cb, const struct ckv_weight *w, const float *x, int n,
                        float *y)
{
    size_t esz = w->type == CKV_W_F32 ? 4 : 2;
    /* cuBLAS takes the row stride in elements and wants element-aligned rows */
    if (w->row_bytes % esz || w->row_bytes / esz > INT32_MAX || (uintptr_t)w->data % esz) {
        LOG_WARN("cuda matmul: %s weight rows %zu bytes apart at %p are not element-aligned",
                 ckv_wtype_name(w->type), w->row_bytes, w->data);
        return -EINVAL;
    }
    const void *b = x;
    cudaDataType_t ab_type = CUDA_R_32F;
    if (w->type != CKV_W_F32) {
        size_t ne = (size_t)n * w->cols;
        void *scratch;
        int rc = cuda_scratch(cb, ne * sizeof(uint16_t), &scratch);
        if (rc)
            return rc;
        int bf16 = w->type == CKV_W_BF16;
        CUDA_LAUNCH(round_x_kernel, ew_grid(cb, ne), EW_TB, cb->stream, x, ne, bf16,
                    (uint16_t *)scratch);
        CUDA_CHECK_LAUNCH(cb);
        b = scratch;
        ab_type = bf16 ? CUDA_R_16BF : CUDA_R_16F;
    }
    /* Column-major view: W (rows, cols) row-major is W^T (cols, rows) column-major with
     * lda = row stride, x (n, cols) is (cols, n) with ldb = cols, y (n, rows) is (rows, n):
     * y = op_T(W^T) . x. */
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cb, cublasGemmEx(cb->cublas, CUBLAS_OP_T, CUBLAS_OP_N, w->rows, n, w->cols, &one,
                                  w->data, ab_type, (int)(w->row_bytes / esz), b, ab_type, w->cols,
                                  &zero, y, CUDA_R_32F, w->rows, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
    return 0;
}

extern "C" int cuda_matmul(struct ckv_ctx *ctx, const struct ckv_weight *w, const float *x, int n,
                           float *y)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    return is_quant(w->type) ? matmul_quant(cb, w, x, n, y) : matmul_float(cb, w, x, n, y);
}

/* ---- embedding lookup ---- */

/* out (n, cols): block i dequantizes row ids[i]. */
static __global__ void get_rows_kernel(int t, const uint8_t *__restrict__ w, size_t row_bytes,
                                       int cols, const int32_t *__restrict__ ids,
                                       float *__restrict__ out)
{
    const uint8_t *row = w + (size_t)ids[blockIdx.x] * row_bytes;
    float *o = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        o[c] = dev_dequant(t, row, c);
}

extern "C" int cuda_get_rows(struct ckv_ctx *ctx, const struct ckv_weight *w, const int32_t *ids,
                             int n, float *out)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    void *scratch;
    rc = cuda_scratch(cb, (size_t)n * sizeof(int32_t), &scratch);
    if (rc)
        return rc;
    CUDA_CHECK(cb, cudaMemcpyAsync(scratch, ids, (size_t)n * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, cb->stream));
    CUDA_LAUNCH(get_rows_kernel, n, EW_TB, cb->stream, (int)w->type, (const uint8_t *)w->data,
                w->row_bytes, w->cols, (const int32_t *)scratch, out);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

/* ---- RMSNorm ---- */

/* One CTA of EW_TB threads per row: the f64 sum of squares (as the CPU), tree-reduced. */
static __global__ void rmsnorm_kernel(const float *x, const float *__restrict__ weight, int dim,
                                      float eps, float *out)
{
    __shared__ double part[EW_TB];
    const float *xr = x + (size_t)blockIdx.x * dim;
    float *o = out + (size_t)blockIdx.x * dim;
    double ss = 0.0;
    for (int k = threadIdx.x; k < dim; k += blockDim.x)
        ss += (double)xr[k] * xr[k];
    part[threadIdx.x] = ss;
    __syncthreads();
    for (int h = EW_TB / 2; h > 0; h >>= 1) {
        if ((int)threadIdx.x < h)
            part[threadIdx.x] += part[threadIdx.x + h];
        __syncthreads();
    }
    float scale = (float)(1.0 / sqrt(part[0] / dim + (double)eps));
    /* each thread reads only the elements it writes, after the sum: out may be x */
    for (int k = threadIdx.x; k < dim; k += blockDim.x)
        o[k] = xr[k] * scale * weight[k];
}

extern "C" int cuda_rmsnorm(struct ckv_ctx *ctx, const float *x, const float *weight, int n,
                            int dim, float eps, float *out)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    CUDA_LAUNCH(rmsnorm_kernel, n, EW_TB, cb->stream, x, weight, dim, eps, out);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

/* ---- RoPE ---- */

/* x (n, n_heads, head_dim) in place; cs (n, half) and sn (n, half) the token's cos and sin. */
static __global__ void rope_kernel(float *x, int n_heads, int head_dim, int half, int norm,
                                   const float *__restrict__ cs, const float *__restrict__ sn)
{
    const float *c = cs + (size_t)blockIdx.x * half, *s = sn + (size_t)blockIdx.x * half;
    int stride = norm ? 2 : 1, other = norm ? 1 : half;
    for (int p = threadIdx.x; p < n_heads * half; p += blockDim.x) {
        int h = p / half, k = p % half;
        float *a = x + ((size_t)blockIdx.x * n_heads + h) * head_dim + k * stride;
        float *b = a + other;
        float x0 = *a, x1 = *b;
        /* two roundings per product and one per sum, as the CPU (no FMA contraction) */
        *a = __fadd_rn(__fmul_rn(x0, c[k]), -__fmul_rn(x1, s[k]));
        *b = __fadd_rn(__fmul_rn(x0, s[k]), __fmul_rn(x1, c[k]));
    }
}

extern "C" int cuda_rope(struct ckv_ctx *ctx, float *x, int n, int n_heads, int head_dim,
                         const int32_t *pos, const struct ckv_rope_params *p)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    /* The cos/sin table on the host, computed as cpu_ops.c computes it (f64 angle, f64 cos and
     * sin rounded to f32): the same bits on both backends, and positions are a host array. */
    int half = p->n_rot / 2;
    size_t nt = (size_t)n * half;
    float *tab = (float *)malloc(2 * nt * sizeof(float));
    if (!tab)
        return -ENOMEM;
    for (int k = 0; k < half; k++) {
        double inv = pow((double)p->theta, -2.0 * k / p->n_rot) /
                     (p->freq_factors ? (double)p->freq_factors[k] : 1.0);
        for (int i = 0; i < n; i++) {
            double a = (double)pos[i] * (double)p->freq_scale * inv;
            tab[(size_t)i * half + k] = (float)cos(a);
            tab[nt + (size_t)i * half + k] = (float)sin(a);
        }
    }
    void *scratch;
    rc = cuda_scratch(cb, 2 * nt * sizeof(float), &scratch);
    if (!rc) {
        cudaError_t e = cudaMemcpyAsync(scratch, tab, 2 * nt * sizeof(float),
                                        cudaMemcpyHostToDevice, cb->stream);
        if (e != cudaSuccess)
            rc = cuda_fail(cb, e, "cudaMemcpyAsync(rope table)", __FILE__, __LINE__);
    }
    free(tab); /* staged by the copy */
    if (rc)
        return rc;
    const float *cs = (const float *)scratch;
    CUDA_LAUNCH(rope_kernel, n, 128, cb->stream, x, n_heads, head_dim, half,
                p->style == CKV_ROPE_NORM ? 1 : 0, cs, cs + nt);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

/* ---- element-wise ---- */

static __global__ void swiglu_kernel(const float *gate, const float *up, size_t n, float *out)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/* x += y; dim > 0: y is a bias row of dim elements repeated over x's rows. */
static __global__ void add_kernel(float *x, const float *y, size_t n, int dim)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[dim ? i % (size_t)dim : i];
}

extern "C" int cuda_swiglu(struct ckv_ctx *ctx, const float *gate, const float *up, size_t n,
                           float *out)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    CUDA_LAUNCH(swiglu_kernel, ew_grid(cb, n), EW_TB, cb->stream, gate, up, n, out);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

extern "C" int cuda_add(struct ckv_ctx *ctx, float *x, const float *y, size_t n)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    CUDA_LAUNCH(add_kernel, ew_grid(cb, n), EW_TB, cb->stream, x, y, n, 0);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

extern "C" int cuda_add_bias(struct ckv_ctx *ctx, float *x, const float *bias, int n, int dim)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    size_t ne = (size_t)n * dim;
    CUDA_LAUNCH(add_kernel, ew_grid(cb, ne), EW_TB, cb->stream, x, bias, ne, dim);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}
