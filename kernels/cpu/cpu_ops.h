/*
 * The CPU backend's dense ops (ops.h): entry points called by kernels/ops.c after its argument
 * checks, and the matrix-product micro-kernels per ISA (cpu_ops.c portable, cpu_ops_avx2.c,
 * cpu_ops_avx512.c), each SIMD file compiled with its own -m flags and used only when
 * cpu_backend_init() found the ISA.
 *
 * Quantized products: cpu_ops.c quantizes each 32-element block of the activations once per
 * call into a struct cpu_q8 (the same bytes for every ISA, so every ISA sees the same integers),
 * and the micro-kernels take the integer block dot products against the weight's blocks.
 */
#ifndef CPU_OPS_H
#define CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels_impl.h"
#include "ops.h"

#define CPU_QK 32 /* elements per quantized block, ggml's QK4_0 = QK4_1 = QK8_0 */

/* One 32-element block of an activation row quantized to 8 bits: x ~= d * q,
 * q = round-to-nearest-even(x * 127/max|x|), d = f16(max|x|/127); s = f16(max|x|/127 * sum(q)),
 * the term a Q4_1 weight's offset m multiplies (llama.cpp's Q8_1 s). d and s hold f16 values
 * (as llama.cpp stores them: its logits differed from ours by up to 1.07 while we kept them
 * f32) in f32 fields, so the micro-kernels need no conversion; a value beyond f16's range
 * stays f32. */
struct cpu_q8 {
    float d;
    float s;
    int8_t q[CPU_QK];
};

/* ggml's weight blocks. */
struct cpu_blk_q8_0 {
    uint16_t d; /* f16 */
    int8_t q[CPU_QK];
};
struct cpu_blk_q4_0 {
    uint16_t d; /* f16 */
    uint8_t qs[CPU_QK / 2];
};
struct cpu_blk_q4_1 {
    uint16_t d, m; /* f16 */
    uint8_t qs[CPU_QK / 2];
};

/*
 * y[i * ldy + r] = dot(weight row r, activation row i) for r < n_w, i < n_x.
 * w: n_w rows of type t, row_bytes apart. x: n_x activation rows x_stride bytes apart, f32
 * values (cols of them) for float types, cols/32 struct cpu_q8 blocks for quantized types.
 * Implementations reuse each weight block across the activation rows (the batch) while it is
 * in registers: a batch of n costs about one pass over the weights, not n.
 */
typedef void (*cpu_mm_fn)(enum ckv_wtype t, const void *w, size_t row_bytes, int n_w, const void *x,
                          size_t x_stride, int n_x, int cols, float *y, size_t ldy);

/* Per-ISA matmul micro-kernel; NULL entries fall back to the portable one. */
extern const cpu_mm_fn cpu_ops_mm_portable;
extern const cpu_mm_fn cpu_ops_mm_avx2;
extern const cpu_mm_fn cpu_ops_mm_avx512;

/* The AVX2 quantized kernel (the quantized part of cpu_ops_mm_avx2), which the AVX-512 table
 * uses on a CPU without VNNI. */
void cpu_ops_mm_q_avx2(enum ckv_wtype t, const void *w, size_t row_bytes, int n_w, const void *x,
                       size_t x_stride, int n_x, int cols, float *y, size_t ldy);

/* Entry points (arguments already checked by kernels/ops.c, ctx is a CPU context). */
int cpu_matmul(struct ckv_ctx *ctx, const struct ckv_weight *w, const float *x, int n, float *y);
int cpu_get_rows(struct ckv_ctx *ctx, const struct ckv_weight *w, const int32_t *ids, int n,
                 float *out);
int cpu_rmsnorm(struct ckv_ctx *ctx, const float *x, const float *weight, int n, int dim, float eps,
                float *out);
int cpu_rope(struct ckv_ctx *ctx, float *x, int n, int n_heads, int head_dim, const int32_t *pos,
             const struct ckv_rope_params *p);
int cpu_swiglu(struct ckv_ctx *ctx, const float *gate, const float *up, size_t n, float *out);
int cpu_add(struct ckv_ctx *ctx, float *x, const float *y, size_t n);
int cpu_add_bias(struct ckv_ctx *ctx, float *x, const float *bias, int n, int dim);

/* Dequantizes one row of cols elements of type t to f32 (the scalar definition of each type,
 * as ops.h states it). */
void cpu_ops_dequant_row(enum ckv_wtype t, const void *row, int cols, float *out);

#endif
