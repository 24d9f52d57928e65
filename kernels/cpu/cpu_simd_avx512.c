/*
 * AVX-512 (F/BW/VL/DQ) micro-kernels (see cpu_simd.h). This file alone is compiled with
 * -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c; nothing here runs unless
 * cpu_backend_init() found the CPU able to.
 *
 * gemm_nt computes 16 dot products at a time, 4 x 4 (or 2 x 8, 1 x 16 for the last rows),
 * in 16 zmm accumulators over d in 16-lane chunks (f16 rows converted with vcvtph2ps as they
 * are loaded), and folds the 16 accumulators into one vector of 16 sums with a shuffle tree
 * (45 instructions for 16 dots instead of 16 horizontal reductions). gemm_pv keeps up to 4 rows x
 * 64 dims of the output in registers and streams the V rows through them. Tails of d use masked
 * loads.
 */
#include <immintrin.h>
#include <math.h>

#include "cpu_simd.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __mmask16 tail_mask(int left)
{
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

/* 16 elements (masked) of a row of dtype f16 (f16 != 0) or f32, from element off. */
ALWAYS_INLINE __m512 load_row16(const void *row, int f16, int off, __mmask16 k)
{
    if (f16)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)row + off));
    return _mm512_maskz_loadu_ps(k, (const float *)row + off);
}

/* Folds a[0..15] into one vector whose element 4*g + i is the total of a[4*g + i]. */
ALWAYS_INLINE __m512 reduce16(__m512 a[16])
{
    __m512 s[8], u[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] */
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per lane: [a, b, c, d] lane-partial sums */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* lane j of the result: the four lanes of u[j] added */
    __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* An MR x NR block (MR * NR == 16): element NR*r + j of the result is dot(a_r, b_j). */
ALWAYS_INLINE __m512 nt_block(int MR, int NR, const float *const ar[], const void *const br[],
                              int f16, int d)
{
    __m512 acc[16];
    for (int i = 0; i < 16; i++)
        acc[i] = _mm512_setzero_ps();
    for (int off = 0; off < d; off += 16) {
        __mmask16 k = tail_mask(d - off);
        __m512 va[4];
        for (int r = 0; r < MR; r++)
            va[r] = _mm512_maskz_loadu_ps(k, ar[r] + off);
        for (int j = 0; j < NR; j++) {
            __m512 vb = load_row16(br[j], f16, off, k);
            for (int r = 0; r < MR; r++)
                acc[NR * r + j] = _mm512_fmadd_ps(va[r], vb, acc[NR * r + j]);
        }
    }
    return reduce16(acc);
}

/* Rows [i, i + MR) of c against every b row, in blocks of NR columns. */
ALWAYS_INLINE void nt_rows(int MR, int NR, int i, int m, int n, int d, const float *a, size_t lda,
                           const void *b, int f16, size_t bstride, float *c, size_t ldc,
                           const void *pf)
{
    size_t row_bytes = (size_t)d * (f16 ? 2 : 4);
    const float *ar[4];
    for (int r = 0; r < MR; r++) /* rows past m repeat the last one; not stored */
        ar[r] = a + (size_t)(i + r < m ? i + r : m - 1) * lda;
    int mi = m - i < MR ? m - i : MR;
    for (int j = 0; j < n; j += NR) {
        const void *br[16];
        for (int q = 0; q < NR; q++)
            br[q] = (const char *)b + (size_t)(j + q < n ? j + q : n - 1) * bstride;
        if (pf) /* the rows of the next tile, as this block's are consumed */
            for (int q = 0; q < NR && j + q < n; q++)
                cpu_prefetch_row(pf, bstride, j + q, row_bytes);
        __m512 s = nt_block(MR, NR, ar, br, f16, d);
        float *cb = c + (size_t)i * ldc + j;
        if (mi == MR && n - j >= NR) {
            if (NR == 16) {
                _mm512_storeu_ps(cb, s);
            } else if (NR == 8) {
                _mm256_storeu_ps(cb, _mm512_castps512_ps256(s));
                _mm256_storeu_ps(cb + ldc, _mm512_extractf32x8_ps(s, 1));
            } else {
                _mm_storeu_ps(cb, _mm512_extractf32x4_ps(s, 0));
                _mm_storeu_ps(cb + ldc, _mm512_extractf32x4_ps(s, 1));
                _mm_storeu_ps(cb + 2 * ldc, _mm512_extractf32x4_ps(s, 2));
                _mm_storeu_ps(cb + 3 * ldc, _mm512_extractf32x4_ps(s, 3));
            }
        } else {
            float tmp[16];
            _mm512_storeu_ps(tmp, s);
            int nj = n - j < NR ? n - j : NR;
            for (int r = 0; r < mi; r++)
                for (int q = 0; q < nj; q++)
                    cb[(size_t)r * ldc + q] = tmp[NR * r + q];
        }
    }
}

/* 4 x 4 blocks while 4 rows are left, then 2 x 8 and 1 x 16 (so a product with one or two
 * query rows, MHA decode or a k-means++ update, does not compute 4 rows). */
ALWAYS_INLINE void gemm_nt_impl(int m, int n, int d, const float *a, size_t lda, const void *b,
                                int f16, size_t ldb, float *c, size_t ldc, const void *pf)
{
    size_t bstride = ldb * (f16 ? 2 : 4);
    int i = 0;
    for (; i + 4 <= m; i += 4, pf = NULL) /* prefetch during the first pass only */
        nt_rows(4, 4, i, m, n, d, a, lda, b, f16, bstride, c, ldc, pf);
    if (m - i >= 2) {
        nt_rows(2, 8, i, m, n, d, a, lda, b, f16, bstride, c, ldc, pf);
        i += 2;
        pf = NULL;
    }
    if (m - i == 1)
        nt_rows(1, 16, i, m, n, d, a, lda, b, f16, bstride, c, ldc, pf);
}

static void gemm_nt_avx512(int m, int n, int d, const float *a, size_t lda, const void *b,
                           enum ckv_dtype bdt, size_t ldb, float *c, size_t ldc, const void *pf)
{
    if (m <= 0 || n <= 0)
        return;
    if (bdt == CKV_DTYPE_F16)
        gemm_nt_impl(m, n, d, a, lda, b, 1, ldb, c, ldc, pf);
    else
        gemm_nt_impl(m, n, d, a, lda, b, 0, ldb, c, ldc, pf);
}

/* 16 gathered rows at a time through the same reduction tree. */
ALWAYS_INLINE void dots_idx_impl(const float *q, const void *rows, int f16, size_t ld,
                                 const int32_t *idx, int m, int d, float *out)
{
    size_t stride = ld * (f16 ? 2 : 4);
    for (int i = 0; i < m; i += 16) {
        const void *r[16];
        for (int j = 0; j < 16; j++)
            r[j] = (const char *)rows + (size_t)idx[i + j < m ? i + j : m - 1] * stride;
        __m512 acc[16];
        for (int j = 0; j < 16; j++)
            acc[j] = _mm512_setzero_ps();
        for (int off = 0; off < d; off += 16) {
            __mmask16 k = tail_mask(d - off);
            __m512 vq = _mm512_maskz_loadu_ps(k, q + off);
            for (int j = 0; j < 16; j++)
                acc[j] = _mm512_fmadd_ps(vq, load_row16(r[j], f16, off, k), acc[j]);
        }
        __m512 s = reduce16(acc);
        _mm512_mask_storeu_ps(out + i, tail_mask(m - i), s);
    }
}

static void dots_idx_avx512(const float *q, const void *rows, enum ckv_dtype rdt, size_t ld,
                            const int32_t *idx, int m, int d, float *out)
{
    if (rdt == CKV_DTYPE_F16)
        dots_idx_impl(q, rows, 1, ld, idx, m, d, out);
    else
        dots_idx_impl(q, rows, 0, ld, idx, m, d, out);
}

/* MR rows x NCH 16-lane chunks of acc, from dims off: acc = acc * corr + P V. */
ALWAYS_INLINE void pv_kernel(int MR, int NCH, int n, int off, int d, const float *p, size_t ldp,
                             const void *v, int f16, size_t vstride, float *acc, size_t ldacc,
                             const float *corr, const void *pf)
{
    size_t row_bytes = (size_t)d * (f16 ? 2 : 4);
    __mmask16 k[4];
    __m512 r[4][4];
    for (int c = 0; c < NCH; c++)
        k[c] = tail_mask(d - off - 16 * c);
    for (int i = 0; i < MR; i++) {
        __m512 f = _mm512_set1_ps(corr ? corr[i] : 1.0f);
        for (int c = 0; c < NCH; c++)
            r[i][c] = _mm512_mul_ps(
                f, _mm512_maskz_loadu_ps(k[c], acc + (size_t)i * ldacc + off + 16 * c));
    }
    const char *vp = (const char *)v;
    for (int j = 0; j < n; j++, vp += vstride) {
        __m512 vv[4];
        if (pf)
            cpu_prefetch_row(pf, vstride, j, row_bytes);
        for (int c = 0; c < NCH; c++)
            vv[c] = load_row16(vp, f16, off + 16 * c, k[c]);
        for (int i = 0; i < MR; i++) {
            __m512 w = _mm512_set1_ps(p[(size_t)i * ldp + j]);
            for (int c = 0; c < NCH; c++)
                r[i][c] = _mm512_fmadd_ps(w, vv[c], r[i][c]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int c = 0; c < NCH; c++)
            _mm512_mask_storeu_ps(acc + (size_t)i * ldacc + off + 16 * c, k[c], r[i][c]);
}

#define PV_CASE(MR, NCH)                                                                           \
    case (MR)*8 + (NCH):                                                                           \
        pv_kernel(MR, NCH, n, off, d, p, ldp, v, f16, vstride, acc, ldacc, corr, pf);              \
        break

ALWAYS_INLINE void gemm_pv_impl(int m, int n, int d, const float *p, size_t ldp, const void *v,
                                int f16, size_t ldv, float *acc, size_t ldacc, const float *corr,
                                const void *pf)
{
    size_t vstride = ldv * (f16 ? 2 : 4);
    for (int i = 0; i < m; i += 4) {
        int mr = m - i < 4 ? m - i : 4;
        for (int off = 0; off < d; off += 64, pf = NULL) { /* prefetch in the first pass */
            int nch = (d - off + 15) / 16;
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
                PV_CASE(3, 1);
                PV_CASE(3, 2);
                PV_CASE(3, 3);
                PV_CASE(3, 4);
                PV_CASE(4, 1);
                PV_CASE(4, 2);
                PV_CASE(4, 3);
                PV_CASE(4, 4);
            }
        }
        p += 4 * ldp;
        acc += 4 * ldacc;
        if (corr)
            corr += 4;
    }
}

static void gemm_pv_avx512(int m, int n, int d, const float *p, size_t ldp, const void *v,
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

/* exp(x) for a vector: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-7
 * polynomial for e^r, 2^n by vscalefps (which also underflows gracefully to 0). */
ALWAYS_INLINE __m512 exp16(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

static float exp_sum_avx512(float *x, int n, float sub)
{
    __m512 s = _mm512_setzero_ps(), vsub = _mm512_set1_ps(sub);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = tail_mask(n - i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vsub));
        _mm512_mask_storeu_ps(x + i, k, e);
        s = _mm512_mask_add_ps(s, k, s, e);
    }
    return _mm512_reduce_add_ps(s);
}

static float max_avx512(const float *x, int n)
{
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = tail_mask(n - i);
        /* vmaxps returns its second operand when either is NaN: NaN never wins */
        m = _mm512_mask_max_ps(m, k, _mm512_maskz_loadu_ps(k, x + i), m);
    }
    return _mm512_reduce_max_ps(m);
}

static int argmax_avx512(const float *x, int n)
{
    __m512 m = _mm512_set1_ps(max_avx512(x, n));
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = tail_mask(n - i);
        __mmask16 eq = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, x + i), m, _CMP_EQ_OQ);
        if (eq)
            return i + __builtin_ctz(eq);
    }
    return 0; /* all NaN */
}

static void f16_to_f32_avx512(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    if (i < n) {
        __mmask16 k = tail_mask((int)(n - i));
        _mm512_mask_storeu_ps(dst + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, src + i)));
    }
}

static void f32_to_f16_avx512(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (i < n) {
        __mmask16 k = tail_mask((int)(n - i));
        _mm256_mask_storeu_epi16(dst + i, k,
                                 _mm512_cvtps_ph(_mm512_maskz_loadu_ps(k, src + i),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

const struct cpu_simd cpu_simd_avx512 = {
    .isa = CKV_ISA_AVX512,
    .gemm_nt = gemm_nt_avx512,
    .dots_idx = dots_idx_avx512,
    .gemm_pv = gemm_pv_avx512,
    .exp_sum = exp_sum_avx512,
    .max = max_avx512,
    .argmax = argmax_avx512,
    .f16_to_f32 = f16_to_f32_avx512,
    .f32_to_f16 = f32_to_f16_avx512,
};
