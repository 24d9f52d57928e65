/*
 * Portable micro-kernels (see cpu_simd.h): plain C, no -m flags, so the same binary runs
 * under valgrind (which cannot execute AVX-512). Written for clarity with a little register
 * blocking; the compiler's baseline (SSE2) vectorisation does the rest.
 */
#include <math.h>

#include "ckv_half.h"
#include "cpu_simd.h"

static inline float elem(const void *row, enum ckv_dtype dt, int i)
{
    return dt == CKV_DTYPE_F16 ? ckv_half_to_f32(((const uint16_t *)row)[i])
                               : ((const float *)row)[i];
}

static void gemm_nt_portable(int m, int n, int d, const float *a, size_t lda, const void *b,
                             enum ckv_dtype bdt, size_t ldb, float *c, size_t ldc, const void *pf)
{
    size_t esz = ckv_dtype_size(bdt);
    float brow[CKV_MAX_HEAD_DIM];
    for (int j = 0; j < n; j++) {
        if (pf)
            cpu_prefetch_row(pf, ldb * esz, j, (size_t)d * esz);
        const char *bj = (const char *)b + (size_t)j * ldb * esz;
        for (int t = 0; t < d; t++)
            brow[t] = elem(bj, bdt, t);
        for (int i = 0; i < m; i++) {
            const float *ai = a + (size_t)i * lda;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int t = 0;
            for (; t + 4 <= d; t += 4) {
                s0 += ai[t] * brow[t];
                s1 += ai[t + 1] * brow[t + 1];
                s2 += ai[t + 2] * brow[t + 2];
                s3 += ai[t + 3] * brow[t + 3];
            }
            for (; t < d; t++)
                s0 += ai[t] * brow[t];
            c[(size_t)i * ldc + j] = (s0 + s1) + (s2 + s3);
        }
    }
}

static void dots_idx_portable(const float *q, const void *rows, enum ckv_dtype rdt, size_t ld,
                              const int32_t *idx, int m, int d, float *out)
{
    size_t esz = ckv_dtype_size(rdt);
    for (int i = 0; i < m; i++)
        gemm_nt_portable(1, 1, d, q, (size_t)d, (const char *)rows + (size_t)idx[i] * ld * esz, rdt,
                         ld, out + i, 1, NULL);
}

static void gemm_pv_portable(int m, int n, int d, const float *p, size_t ldp, const void *v,
                             enum ckv_dtype vdt, size_t ldv, float *acc, size_t ldacc,
                             const float *corr, const void *pf)
{
    size_t esz = ckv_dtype_size(vdt);
    float vrow[CKV_MAX_HEAD_DIM];
    if (corr)
        for (int i = 0; i < m; i++)
            for (int t = 0; t < d; t++)
                acc[(size_t)i * ldacc + t] *= corr[i];
    for (int j = 0; j < n; j++) {
        const char *vj = (const char *)v + (size_t)j * ldv * esz;
        if (pf)
            cpu_prefetch_row(pf, ldv * esz, j, (size_t)d * esz);
        for (int t = 0; t < d; t++)
            vrow[t] = elem(vj, vdt, t);
        for (int i = 0; i < m; i++) {
            float w = p[(size_t)i * ldp + j];
            float *ai = acc + (size_t)i * ldacc;
            for (int t = 0; t < d; t++)
                ai[t] += w * vrow[t];
        }
    }
}

static float exp_sum_portable(float *x, int n, float sub)
{
    float sum = 0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - sub);
        sum += x[i];
    }
    return sum;
}

static float max_portable(const float *x, int n)
{
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        if (x[i] > m)
            m = x[i];
    return m;
}

static int argmax_portable(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best] || (isnan(x[best]) && !isnan(x[i])))
            best = i;
    return best;
}

static void f16_to_f32_portable(const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = ckv_half_to_f32(src[i]);
}

static void f32_to_f16_portable(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = ckv_half_from_f32(src[i]);
}

const struct cpu_simd cpu_simd_portable = {
    .isa = CKV_ISA_PORTABLE,
    .gemm_nt = gemm_nt_portable,
    .dots_idx = dots_idx_portable,
    .gemm_pv = gemm_pv_portable,
    .exp_sum = exp_sum_portable,
    .max = max_portable,
    .argmax = argmax_portable,
    .f16_to_f32 = f16_to_f32_portable,
    .f32_to_f16 = f32_to_f16_portable,
};
