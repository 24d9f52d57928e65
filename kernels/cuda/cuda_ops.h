/*
 * The CUDA backend's dense ops (ops.h), implemented in cuda_ops.cu: entry points called by
 * kernels/ops.c after its argument checks, for a CUDA context (CKV_HAVE_CUDA). Plain C
 * declarations: ops.c includes this header as C, cuda_ops.cu inside extern "C".
 *
 * What they compute, against the CPU backend (the reference, kernels/cpu/cpu_ops.c):
 *  - quantized matmul (Q4_0/Q4_1/Q8_0): own kernels, the same 8-bit activation quantization
 *    (the same codes, f16 scales and sums: bit-equal blocks), integer block dot products,
 *    scaled and summed in f32 in another order;
 *  - float matmul (f32/f16/bf16 weights): cuBLAS (cublasGemmEx, f32 accumulation, no TF32).
 *    f32 weights multiply f32 activations; f16 and bf16 weights multiply the activations
 *    rounded to the weight's type (cuBLAS has no mixed f16 x f32 product; llama.cpp's CUDA
 *    backend rounds them the same way), a relative 2^-11 (f16) or 2^-8 (bf16) per element;
 *    rows and data must be element-aligned for cuBLAS (-EINVAL otherwise);
 *  - get_rows, add, add_bias: bit-equal; RoPE: bit-equal (the host computes the same cos/sin
 *    table as the CPU, the rotation never fuses); rmsnorm: the f64 sum of squares in another
 *    order; swiglu: the device's expf (within 2 ulp).
 */
#ifndef CUDA_OPS_H
#define CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "ops.h"

struct ckv_ctx;

int cuda_matmul(struct ckv_ctx *ctx, const struct ckv_weight *w, const float *x, int n, float *y);
int cuda_get_rows(struct ckv_ctx *ctx, const struct ckv_weight *w, const int32_t *ids, int n,
                  float *out);
int cuda_rmsnorm(struct ckv_ctx *ctx, const float *x, const float *weight, int n, int dim,
                 float eps, float *out);
int cuda_rope(struct ckv_ctx *ctx, float *x, int n, int n_heads, int head_dim, const int32_t *pos,
              const struct ckv_rope_params *p);
int cuda_swiglu(struct ckv_ctx *ctx, const float *gate, const float *up, size_t n, float *out);
int cuda_add(struct ckv_ctx *ctx, float *x, const float *y, size_t n);
int cuda_add_bias(struct ckv_ctx *ctx, float *x, const float *bias, int n, int dim);

#endif
