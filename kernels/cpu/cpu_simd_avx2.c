/*
 * AVX2 + FMA + F16C micro-kernels (see cpu_simd.h), for x86-64 CPUs without AVX-512 (and
 * for valgrind, whose CPU model has AVX2). Compiled with -mavx2 -mfma -mf16c, used only after
 * cpu_backend_init() checked the CPU.
 *
 * gemm_nt computes 2 x 4 dot products at a time (8 ymm accumulators, folded into one vector
 * by a hadd tree); gemm_pv keeps 2 rows x 32 dims of the output in registers. AVX2 has no
 * masked 16-bit loads, so a head_dim that is not a multiple of 8 finishes its last dims in
 * scalar code.
 */
#include <immintrin.h>
#include <math.h>

#include "ckv_half.h"
#include "cpu_simd.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __m256 load_row8(const void *row, int f16, int off)
{
    if (f16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + off)));
    return _mm256_loadu_ps((const float *)row + off);
}

ALWAYS_INLINE float row_elem(const void *row, int f16, int i)
{
    return f16 ? ckv_half_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* Element i of the result: the total of a[i]. */
ALWAYS_INLINE __m256 reduce8(__m256 a[8])
{
    __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                         _mm256_permute2f128_ps(h0, h1, 0x31));
}

ALWAYS_INLINE void gemm_nt_impl(int m, int n, int d, const float *a, size_t lda, const void *b,
                                int f16, size_t ldb, float *c, size_t ldc, const void *pf)
{
    size_t bstride = ldb * (f16 ? 2 : 4), row_bytes = (size_t)d * (f16 ? 2 : 4);
    int d8 = d & ~7;
    for (int i = 0; i < m; i += 2) {
        const float *ar[2];
        for (int r = 0; r < 2; r++)
            ar[r] = a + (size_t)(i + r < m ? i + r : m - 1) * lda;
        int mi = m - i < 2 ? m - i : 2;
        for (int j = 0; j < n; j += 4) {
            const void *br[4];
            for (int q = 0; q < 4; q++)
                br[q] = (const char *)b + (size_t)(j + q < n ? j + q : n - 1) * bstride;
            if (pf && i == 0)
                for (int q = 0; q < 4 && j + q < n; q++)
                    cpu_prefetch_row(pf, bstride, j + q, row_bytes);
            __m256 acc[8];
            for (int t = 0; t < 8; t++)
                acc[t] = _mm256_setzero_ps();
            for (int off = 0; off < d8; off += 8) {
                __m256 va0 = _mm256_loadu_ps(ar[0] + off), va1 = _mm256_loadu_ps(ar[1] + off);
                for (int q = 0; q < 4; q++) {
                    __m256 vb = load_row8(br[q], f16, off);
                    acc[q] = _mm256_fmadd_ps(va0, vb, acc[q]);
                    acc[4 + q] = _mm256_fmadd_ps(va1, vb, acc[4 + q]);
                }
            }
            float tmp[8];
            _mm256_storeu_ps(tmp, reduce8(acc));
            for (int off = d8; off < d; off++)
                for (int r = 0; r < 2; r++)
                    for (int q = 0; q < 4; q++)
                        tmp[4 * r + q] += ar[r][off] * row_elem(br[q], f16, off);
            int nj = n - j < 4 ? n - j : 4;
            for (int r = 0; r < mi; r++)
                for (int q = 0; q < nj; q++)
                    c[(size_t)(i + r) * ldc + j + q] = tmp[4 * r + q];
        }
    }
}

static void gemm_nt_avx2(int m, int n, int d, const float *a, size_t lda, const void *b,
                         enum ckv_dtype bdt, size_t ldb, float *c, size_t ldc, const void *pf)
{
    if (m <= 0 || n <= 0)
        return;
    if (bdt == CKV_DTYPE_F16)
        gemm_nt_impl(m, n, d, a, lda, b, 1, ldb, c, ldc, pf);
    else
        gemm_nt_impl(m, n, d, a, lda, b, 0, ldb, c, ldc, pf);
}

/* 8 gathered rows at a time through the hadd tree; dims past a multiple of 8 in scalar. */
ALWAYS_INLINE void dots_idx_impl(const float *q, const void *rows, int f16, size_t ld,
                                 const int32_t *idx, int m, int d, float *out)
{
    size_t stride = ld * (f16 ? 2 : 4);
    int d8 = d & ~7;
    for (int i = 0; i < m; i += 8) {
        const void *r[8];
        for (int j = 0; j < 8; j++)
            r[j] = (const char *)rows + (size_t)idx[i + j < m ? i + j : m - 1] * stride;
        __m256 acc[8];
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_setzero_ps();
        for (int off = 0; off < d8; off += 8) {
            __m256 vq = _mm256_loadu_ps(q + off);
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_fmadd_ps(vq, load_row8(r[j], f16, off), acc[j]);
        }
        float tmp[8];
        _mm256_storeu_ps(tmp, reduce8(acc));
        for (int j = 0; j < 8 && i + j < m; j++) {
            for (int t = d8; t < d; t++)
                tmp[j] += q[t] * row_elem(r[j], f16, t);
            out[i + j] = tmp[j];
        }
    }
}

static void dots_idx_avx2(const float *q, const void *rows, enum ckv_dtype rdt, size_t ld,
                          const int32_t *idx, int m, int d, float *out)
{
    if (rdt == CKV_DTYPE_F16)
        dots_idx_impl(q, rows, 1, ld, idx, m, d, out);
    else
        dots_idx_impl(q, rows, 0, ld, idx, m, d, out);
}

/* MR rows x NCH 8-lane chunks of acc from dims off: acc = acc * corr + P V. */
ALWAYS_INLINE void pv_kernel(int MR, int NCH, int n, int off, const float *p, size_t ldp,
                             const void *v, int f16, size_t vstride, float *acc, size_t ldacc,
                             const float *corr, const void *pf, size_t row_bytes)
{
    __m256 r[2][4];
    for (int i = 0; i < MR; i++) {
        __m256 f = _mm256_set1_ps(corr ? corr[i] : 1.0f);
        for (int c = 0; c < NCH; c++)
            r[i][c] = _mm256_mul_ps(f, _mm256_loadu_ps(acc + (size_t)i * ldacc + off + 8 * c));
    }
    const char *vp = (const char *)v;
    for (int j = 0; j < n; j++, vp += vstride) {
        __m256 vv[4];
        if (pf)
            cpu_prefetch_row(pf, vstride, j, row_bytes);
        for (int c = 0; c < NCH; c++)
            vv[c] = load_row8(vp, f16, off + 8 * c);
        for (int i = 0; i < MR; i++) {
            __m256 w = _mm256_set1_ps(p[(size_t)i * ldp + j]);
            for (int c = 0; c < NCH; c++)
                r[i][c] = _mm256_fmadd_ps(w, vv[c], r[i][c]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < NCH; c++)
            _mm256_storeu_ps(acc + (size_t)i * ldacc + off + 8 * c, r[i][c]);
}

#define PV_CASE(MR, NCH)                                                                           \
    case (MR)*8 + (NCH):                                                                           \
        pv_kernel(MR, NCH, n, off, p, ldp, v, f16, vstride, acc, ldacc, corr, pf, row_bytes);      \
        break

ALWAYS_INLINE void gemm_pv_impl(int m, int n, int d, const float *p, size_t ldp, const void *v,
                                int f16, size_t ldv, float *acc, size_t ldacc, const float *corr,
                                const void *pf)
{
    size_t vstride = ldv * (f16 ? 2 : 4), row_bytes = (size_t)d * (f16 ? 2 : 4);
    int d8 = d & ~7;
    for (int i = 0; i < m; i += 2) {
        int mr = m - i < 2 ? m - i : 2;
        for (int off = 0; off < d8; off += 32, pf = NULL) { /* prefetch in the first pass */
            int nch = (d8 - off) / 8;
            if (nch > 4)
                nch = 4;
            switch (mr * 8 + nch) {
                PV_CASE(1, 1);
                PV_CASE(1, 2);
                PV_CASE(1, 3);
                PV_CASE(1, 4);
                PV_CASE(2, 1);
                PV_CASE(2, 2);
                PV_CASE(2, 3);
                PV_CASE(2, 4);
            }
        }
        for (int r = 0; r < mr; r++) { /* the dims past the last multiple of 8 */
            float *ar = acc + (size_t)r * ldacc;
            float f = corr ? corr[r] : 1.0f;
            for (int t = d8; t < d; t++) {
                float s = ar[t] * f;
                for (int j = 0; j < n; j++)
                    s += p[(size_t)r * ldp + j] *
                         row_elem((const char *)v + (size_t)j * vstride, f16, t);
                ar[t] = s;
            }
        }
        p += 2 * ldp;
        acc += 2 * ldacc;
        if (corr)
            corr += 2;
    }
}

static void gemm_pv_avx2(int m, int n, int d, const float *p, size_t ldp, const void *v,
                         enum ckv_dtype vdt, size_t ldv, float *acc, size_t ldacc,
                         const float *corr, const void *pf)
{
    if (m <= 0)
        return;
    if (vdt == CKV_DTYPE_F16)
        gemm_pv_impl(m, n, d, p, ldp, v, 1, ldv, acc, ldacc, corr, pf);
    else
        gemm_pv_impl(m, n, d, p, ldp, v, 0, ldv, acc, ldacc, corr, pf);
}

/* exp(x): Cody-Waite reduction, Cephes' polynomial, 2^n built in the exponent field; inputs
 * below -87.3 (where 2^n would leave the normal range) give 0. */
ALWAYS_INLINE __m256 exp8(__m256 x)
{
    __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(tiny, y);
}

static float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static float exp_sum_avx2(float *x, int n, float sub)
{
    __m256 s = _mm256_setzero_ps(), vsub = _mm256_set1_ps(sub);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vsub));
        _mm256_storeu_ps(x + i, e);
        s = _mm256_add_ps(s, e);
    }
    if (i < n) {
        float tmp[8] = {0};
        for (int t = i; t < n; t++)
            tmp[t - i] = x[t] - sub;
        __m256 e = exp8(_mm256_loadu_ps(tmp));
        _mm256_storeu_ps(tmp, e);
        for (int t = i; t < n; t++) {
            x[t] = tmp[t - i];
            s = _mm256_add_ps(s, _mm256_setr_ps(tmp[t - i], 0, 0, 0, 0, 0, 0, 0));
        }
    }
    return hsum8(s);
}

static float max_avx2(const float *x, int n)
{
    __m256 m = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) /* vmaxps returns the second operand on NaN */
        m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; i < n; i++)
        if (x[i] > r)
            r = x[i];
    return r;
}

static int argmax_avx2(const float *x, int n)
{
    float m = max_avx2(x, n);
    __m256 vm = _mm256_set1_ps(m);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vm, _CMP_EQ_OQ));
        if (eq)
            return i + __builtin_ctz((unsigned)eq);
    }
    for (; i < n; i++)
        if (x[i] == m)
            return i;
    return 0; /* all NaN */
}

static void f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = ckv_half_to_f32(src[i]);
}

static void f32_to_f16_avx2(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++)
        dst[i] = ckv_half_from_f32(src[i]);
}

const struct cpu_simd cpu_simd_avx2 = {
    .isa = CKV_ISA_AVX2,
    .gemm_nt = gemm_nt_avx2,
    .dots_idx = dots_idx_avx2,
    .gemm_pv = gemm_pv_avx2,
    .exp_sum = exp_sum_avx2,
    .max = max_avx2,
    .argmax = argmax_avx2,
    .f16_to_f32 = f16_to_f32_avx2,
    .f32_to_f16 = f32_to_f16_avx2,
};
