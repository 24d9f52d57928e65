/*
 * Dense operations of the transformer forward pass (the engine, worker/forward.c): matrix
 * products against GGUF weights (float and quantized), RMSNorm, RoPE, SwiGLU, embedding
 * lookup, residual adds. Same rules as kernels.h: every call runs on a context, array
 * arguments are device pointers of that context's backend (host memory on the CPU backend),
 * results are visible after ckv_copy_d2h()/ckv_ctx_sync(), errors are negative errno values
 * and a failed call has written nothing the caller may rely on. Activations are f32.
 *
 * The CPU backend implements every op (kernels/cpu/cpu_ops*.c), threaded on the context's
 * pool and dispatched on the context's ISA, and is the reference; the CUDA backend
 * (kernels/cuda/cuda_ops.cu, cuda_ops.h says how it agrees with the CPU) implements every op
 * too: cuBLAS for the float products, own kernels for the rest.
 */
#ifndef CKV_OPS_H
#define CKV_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* Weight element types, in ggml's numbering so that a GGUF tensor type maps without a table.
 * Quantized rows are sequences of 32-element blocks, as ggml lays them out:
 *   Q8_0: f16 d, int8 q[32]              x = d * q
 *   Q4_0: f16 d, u8 qs[16]               x = d * (nibble - 8); element j < 16 in the low
 *                                        nibble of qs[j], element j + 16 in its high nibble
 *   Q4_1: f16 d, f16 m, u8 qs[16]        x = d * nibble + m (same nibble order)
 */
enum ckv_wtype {
    CKV_W_F32 = 0,
    CKV_W_F16 = 1,
    CKV_W_Q4_0 = 2,
    CKV_W_Q4_1 = 3,
    CKV_W_Q8_0 = 8,
    CKV_W_BF16 = 30,
};

/* A weight matrix of `rows` output rows, each of `cols` input elements (cols a multiple of 32
 * for quantized types), row r at data + r * row_bytes. On the CPU backend data may point into
 * a read-only mmap of the GGUF file. */
struct ckv_weight {
    enum ckv_wtype type;
    int rows, cols;
    size_t row_bytes;
    const void *data;
};

/* 1 when ops accept the type (and, for quantized types, cols % 32 == 0 is still checked per
 * call). */
int ckv_wtype_supported(int type);
/* "f32", "q4_1", ...; "?" for others. */
const char *ckv_wtype_name(int type);
/* Bytes of one row of cols elements of type t; 0 when t is unsupported or cols does not fit
 * its block size. */
size_t ckv_wtype_row_bytes(int type, int cols);

/* y (n, w->rows) = x (n, w->cols) . W^T, for n >= 1 activation rows (a batch of tokens).
 * Float weights: f32 accumulation of products of f32 values. Quantized weights: each
 * 32-element block of x is first quantized to 8 bits exactly as llama.cpp's Q8_0/Q8_1
 * activations on x86: q = round(x * (127/max|x|)) to nearest even, computed in f32; the scale
 * d_x = f16(max|x|/127) (the f32 quotient rounded to f16, nearest even; the codes do not see
 * that rounding); the block dot products are integer, scaled in f32:
 *   Q8_0, Q4_0: dot = sum_b d_w*d_x*sum(q_w*q_x)
 *   Q4_1:       dot = sum_b d_w*d_x*sum(q_w*q_x) + m_w*s_x, s_x = f16(f32(max|x|/127)*sum(q_x))
 * (llama.cpp's Q8_1 s, from the unrounded d). Only the order of the f32 sums differs from
 * llama.cpp. A d or s beyond f16's range (|x| > ~8e6, or a Q8_1 sum > 65504) stays f32 where
 * llama.cpp's becomes inf. The kernels and their reasons are documented in cpu_ops.c.
 * CUDA: f16 and bf16 weights multiply x rounded to their type (cuBLAS, cuda_ops.h). */
int ckv_matmul(ckv_ctx_t *ctx, const struct ckv_weight *w, const float *x, int n, float *y);

/* Embedding lookup: out (n, w->cols) f32 = dequantized rows ids[i] of w (0 <= ids[i] <
 * w->rows, else -EINVAL and nothing written). */
int ckv_get_rows(ckv_ctx_t *ctx, const struct ckv_weight *w, const int32_t *ids, int n,
                 float *out);

/* out (n, dim) = x / sqrt(mean(x^2) + eps) * weight, row by row; out may equal x. */
int ckv_rmsnorm(ckv_ctx_t *ctx, const float *x, const float *weight, int n, int dim, float eps,
                float *out);

/* RoPE conventions: NORM rotates adjacent pairs (x[2i], x[2i+1]) (GGUF `llama`, whose Q/K
 * weights the converter permuted); NEOX rotates (x[i], x[i + n_rot/2]) (`qwen2`). */
enum ckv_rope_style {
    CKV_ROPE_NORM = 0,
    CKV_ROPE_NEOX = 1,
};

struct ckv_rope_params {
    enum ckv_rope_style style;
    int n_rot;               /* rotated dimensions, even, <= head_dim (usually head_dim) */
    float theta;             /* base frequency (rope.freq_base), e.g. 10000 */
    float freq_scale;        /* linear scaling: position * freq_scale (1 = none) */
    const float *freq_factors; /* optional (n_rot / 2): theta_i divided by factor i (llama 3
                                  `rope_freqs`); NULL: none */
};

/* In place on x (n, n_heads, head_dim): token i at position pos[i] (host array). The angle of
 * pair i is pos * freq_scale * theta^(-2i/n_rot) / factor_i, computed in f64; its cos and sin
 * (f64) are rounded to f32 and the rotation is f32. Dimensions n_rot.. head_dim-1 are left
 * as they are. -EINVAL: n_rot odd, < 2 or > head_dim, theta or freq_scale not finite and > 0,
 * a freq_factor not finite and > 0. */
int ckv_rope(ckv_ctx_t *ctx, float *x, int n, int n_heads, int head_dim, const int32_t *pos,
             const struct ckv_rope_params *p);

/* out (n) = silu(gate) * up, silu(g) = g / (1 + exp(-g)); out may equal gate or up. */
int ckv_swiglu(ckv_ctx_t *ctx, const float *gate, const float *up, size_t n, float *out);

/* x (n) += y (n). */
int ckv_add(ckv_ctx_t *ctx, float *x, const float *y, size_t n);

/* x (n, dim) += bias (dim), row by row (QKV bias of qwen2). */
int ckv_add_bias(ckv_ctx_t *ctx, float *x, const float *bias, int n, int dim);

#endif
