/*
 * The CPU backend's micro-kernels, one table per instruction set: portable C
 * (cpu_simd_portable.c, built with the project's flags only, so valgrind can run it), AVX2 +
 * FMA + F16C (cpu_simd_avx2.c) and AVX-512 F/BW/VL/DQ (cpu_simd_avx512.c), each file compiled
 * with its own -m flags and used only after cpu_backend_init() checked the CPU.
 *
 * Everything the kernels do that costs more than O(rows) goes through this table: the two
 * matrix products of attention and k-means, exp/max/argmax over a row, and f16 conversion.
 * All arithmetic is f32 (ALGORITHM.md: "accumulate in fp32"). Strides are in elements.
 */
#ifndef CPU_SIMD_H
#define CPU_SIMD_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

struct cpu_simd {
    enum ckv_cpu_isa isa;

    /* c[i * ldc + j] = dot(a_i, b_j) for i < m, j < n.
     * a: (m, d) f32 rows at lda; b: (n, d) rows of dtype bdt at ldb; c: (m, n) at ldc.
     * pf: NULL, or rows (of b's dtype and d, ldb apart) that will be needed soon: row j is
     * prefetched as b_j is consumed (an interleaved prefetch keeps the memory busy where a
     * burst of prefetches before the call does not). */
    void (*gemm_nt)(int m, int n, int d, const float *a, size_t lda, const void *b,
                    enum ckv_dtype bdt, size_t ldb, float *c, size_t ldc, const void *pf);

    /* out[i] = dot(q, row idx[i]) for i < m: one f32 vector against gathered rows of dtype
     * rdt, ld elements apart. */
    void (*dots_idx)(const float *q, const void *rows, enum ckv_dtype rdt, size_t ld,
                     const int32_t *idx, int m, int d, float *out);

    /* acc_i = acc_i * corr[i] + sum_{j < n} p[i * ldp + j] * v_j for i < m (corr NULL: no
     * rescale). p: (m, n) f32; v: (n, d) rows of dtype vdt at ldv; acc: (m, d) f32 at ldacc.
     * pf: as gemm_nt's, rows laid out like v. */
    void (*gemm_pv)(int m, int n, int d, const float *p, size_t ldp, const void *v,
                    enum ckv_dtype vdt, size_t ldv, float *acc, size_t ldacc, const float *corr,
                    const void *pf);

    /* x[i] = exp(x[i] - sub) for i < n; returns their sum. Relative error <= 2e-7 for
     * arguments in [-87, 0] (the softmax range); below that the result is 0 or subnormal. */
    float (*exp_sum)(float *x, int n, float sub);

    /* max(x[0..n)); -inf for n == 0. */
    float (*max)(const float *x, int n);

    /* Index of the first maximum of x[0..n), n >= 1 (NaN never wins unless all are NaN). */
    int (*argmax)(const float *x, int n);

    /* f16 <-> f32 of n elements, as ckv_half.h (round to nearest even). */
    void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n);
    void (*f32_to_f16)(const float *src, uint16_t *dst, size_t n);
};

/* Prefetches row j of pf (rows `stride` bytes apart, `bytes` long) into L2 (prefetcht1):
 * measured on Zen 4, an L1 prefetch stream (prefetcht0) gains nothing over no prefetch, an
 * L2 one lets DRAM reads overlap the compute (full attention 12.4 -> 8.9 ms, one thread). */
static inline void cpu_prefetch_row(const void *pf, size_t stride, int j, size_t bytes)
{
    const char *r = (const char *)pf + (size_t)j * stride;
    for (size_t b = 0; b < bytes; b += 64)
        __builtin_prefetch(r + b, 0, 2);
}

extern const struct cpu_simd cpu_simd_portable;
extern const struct cpu_simd cpu_simd_avx2;
extern const struct cpu_simd cpu_simd_avx512;

/* Loads one row of d elements of dtype dt as f32. */
static inline void cpu_simd_load_row(const struct cpu_simd *s, const void *src, enum ckv_dtype dt,
                                     int d, float *dst)
{
    if (dt == CKV_DTYPE_F16) {
        s->f16_to_f32((const uint16_t *)src, dst, (size_t)d);
    } else {
        const float *f = (const float *)src;
        for (int i = 0; i < d; i++)
            dst[i] = f[i];
    }
}

#endif
