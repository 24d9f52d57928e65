/*
 * AVX2 + FMA + F16C matmul micro-kernel of the dense ops (cpu_ops.h), built with those -m flags
 * only and called only on a context whose ISA is avx2 (or avx512, which reuses the quantized
 * part when the CPU lacks VNNI).
 *
 * Quantized weights: one 32-element block is one 256-bit register of int8 (Q4 nibbles
 * unpacked: low nibbles are elements 0-15, high nibbles 16-31, the same order as the
 * activation's q[32]). The block dot product is vpmaddubsw (u8 x s8 -> pairs of i16) then
 * vpmaddwd by 1 (-> 8 x i32), exact: |products| <= 128 * 127, pairs <= 32512 < 2^15, so no
 * saturation. Signed weights (Q8_0, Q4_0 - 8) go through vpsignb: |w| x (x * sign w). The 8
 * lanes are scaled by d_w * d_x and accumulated in f32; the horizontal sum comes once per
 * output.
 *
 * Batch reuse: the weight block is unpacked once and applied to NX activation rows held in
 * registers (a batch of 8 decodes each weight block twice, reads it from DRAM once).
 * Float weights: 2 x 4 tiles (2 weight rows, 4 activation rows, 8 accumulators) so that each
 * FMA needs 0.75 loads, which L1 sustains, for 4 activation rows or more; below that one weight
 * row after the other with two accumulators (see mm_f).
 */
#include <immintrin.h>
#include <string.h>

#include "cpu_ops.h"

#define NX 4 /* activation rows per register tile */

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float f16(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* 32 nibbles of qs[16] in element order: low nibbles (0-15), then high nibbles (16-31). */
static inline __m256i unpack_nibbles(const uint8_t *qs)
{
    __m128i q = _mm_loadu_si128((const __m128i *)qs);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

/* 8 partial sums of sum_j w_j x_j, w signed. */
static inline __m256i dot_s8(__m256i w, __m256i x)
{
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* 8 partial sums of sum_j w_j x_j, w unsigned (< 128). */
static inline __m256i dot_u8(__m256i w, __m256i x)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

/* One weight row against nx activation rows (nx a constant after inlining). */
static inline __attribute__((always_inline)) void
q_row(enum ckv_wtype t, const char *wr, const struct cpu_q8 *const *xr, int nx, int nb, float *out)
{
    __m256 acc[NX];
    float macc[NX];
    for (int k = 0; k < nx; k++) {
        acc[k] = _mm256_setzero_ps();
        macc[k] = 0.0f;
    }
    for (int b = 0; b < nb; b++) {
        __m256i wv;
        float dw, mw = 0.0f;
        if (t == CKV_W_Q8_0) {
            const struct cpu_blk_q8_0 *blk = (const struct cpu_blk_q8_0 *)wr + b;
            wv = _mm256_loadu_si256((const __m256i *)blk->q);
            dw = f16(blk->d);
        } else if (t == CKV_W_Q4_0) {
            const struct cpu_blk_q4_0 *blk = (const struct cpu_blk_q4_0 *)wr + b;
            wv = _mm256_sub_epi8(unpack_nibbles(blk->qs), _mm256_set1_epi8(8));
            dw = f16(blk->d);
        } else {
            const struct cpu_blk_q4_1 *blk = (const struct cpu_blk_q4_1 *)wr + b;
            wv = unpack_nibbles(blk->qs);
            dw = f16(blk->d);
            mw = f16(blk->m);
        }
        for (int k = 0; k < nx; k++) {
            const struct cpu_q8 *xb = xr[k] + b;
            __m256i xv = _mm256_loadu_si256((const __m256i *)xb->q);
            __m256i p = t == CKV_W_Q4_1 ? dot_u8(wv, xv) : dot_s8(wv, xv);
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xb->d), acc[k]);
            if (t == CKV_W_Q4_1)
                macc[k] += mw * xb->s;
        }
    }
    for (int k = 0; k < nx; k++)
        out[k] = hsum8(acc[k]) + macc[k];
}

static inline __attribute__((always_inline)) void mm_q(enum ckv_wtype t, const void *w,
                                                       size_t row_bytes, int n_w, const void *x,
                                                       size_t x_stride, int n_x, int cols, float *y,
                                                       size_t ldy)
{
    int nb = cols / CPU_QK;
    for (int r = 0; r < n_w; r++) {
        const char *wr = (const char *)w + (size_t)r * row_bytes;
        int i = 0;
        for (; i + NX <= n_x; i += NX) {
            const struct cpu_q8 *xr[NX];
            float out[NX];
            for (int k = 0; k < NX; k++)
                xr[k] = (const struct cpu_q8 *)((const char *)x + (size_t)(i + k) * x_stride);
            q_row(t, wr, xr, NX, nb, out);
            for (int k = 0; k < NX; k++)
                y[(size_t)(i + k) * ldy + r] = out[k];
        }
        for (; i < n_x; i++) {
            const struct cpu_q8 *xr[1] = {
                (const struct cpu_q8 *)((const char *)x + (size_t)i * x_stride)};
            float out[1];
            q_row(t, wr, xr, 1, nb, out);
            y[(size_t)i * ldy + r] = out[0];
        }
    }
}

void cpu_ops_mm_q_avx2(enum ckv_wtype t, const void *w, size_t row_bytes, int n_w, const void *x,
                       size_t x_stride, int n_x, int cols, float *y, size_t ldy)
{
    switch (t) {
    case CKV_W_Q8_0: mm_q(CKV_W_Q8_0, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    case CKV_W_Q4_0: mm_q(CKV_W_Q4_0, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    default: mm_q(CKV_W_Q4_1, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    }
}

/* ---- float weights ---- */

static inline __m256 load8(enum ckv_wtype t, const void *row, int j)
{
    if (t == CKV_W_F32)
        return _mm256_loadu_ps((const float *)row + j);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + j));
    if (t == CKV_W_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); /* bf16 */
}

static inline float elem(enum ckv_wtype t, const void *row, int j)
{
    if (t == CKV_W_F32)
        return ((const float *)row)[j];
    uint16_t h = ((const uint16_t *)row)[j];
    if (t == CKV_W_F16)
        return f16(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* nr weight rows against nx activation rows (constants after inlining, nr * nx <= 8 so the
 * accumulators stay in the 16 ymm registers): out[rr * nx + k]. */
static inline __attribute__((always_inline)) void f_tile(enum ckv_wtype t, const char *w,
                                                         size_t row_bytes, int nr,
                                                         const float *const *xr, int nx, int cols,
                                                         float *out)
{
    __m256 acc[4][NX];
    for (int rr = 0; rr < nr; rr++)
        for (int k = 0; k < nx; k++)
            acc[rr][k] = _mm256_setzero_ps();
    int j = 0;
    if (nr == 1 && nx == 1) { /* decode: a second accumulator, or the FMA latency bounds it */
        __m256 acc2 = _mm256_setzero_ps();
        for (; j + 16 <= cols; j += 16) {
            acc[0][0] = _mm256_fmadd_ps(load8(t, w, j), _mm256_loadu_ps(xr[0] + j), acc[0][0]);
            acc2 = _mm256_fmadd_ps(load8(t, w, j + 8), _mm256_loadu_ps(xr[0] + j + 8), acc2);
        }
        acc[0][0] = _mm256_add_ps(acc[0][0], acc2);
    }
    for (; j + 8 <= cols; j += 8) {
        __m256 wv[4];
        for (int rr = 0; rr < nr; rr++)
            wv[rr] = load8(t, w + (size_t)rr * row_bytes, j);
        for (int k = 0; k < nx; k++) {
            __m256 xv = _mm256_loadu_ps(xr[k] + j);
            for (int rr = 0; rr < nr; rr++)
                acc[rr][k] = _mm256_fmadd_ps(wv[rr], xv, acc[rr][k]);
        }
    }
    for (int rr = 0; rr < nr; rr++)
        for (int k = 0; k < nx; k++) {
            float s = hsum8(acc[rr][k]);
            for (int jj = j; jj < cols; jj++)
                s += elem(t, w + (size_t)rr * row_bytes, jj) * xr[k][jj];
            out[rr * nx + k] = s;
        }
}

/* Rows [r, r + nr) against every activation row: 2 x 4 tiles over whole groups of 4 activation
 * rows (each FMA needs 0.75 loads), nr x 1 for the rest. */
static inline __attribute__((always_inline)) void f_rows(enum ckv_wtype t, const char *wr,
                                                         size_t row_bytes, int nr, const void *x,
                                                         size_t x_stride, int n_x, int cols,
                                                         float *y, size_t ldy, int r)
{
    int i = 0;
    for (; i + NX <= n_x; i += NX) {
        const float *xr[NX];
        float out[2 * NX];
        for (int k = 0; k < NX; k++)
            xr[k] = (const float *)((const char *)x + (size_t)(i + k) * x_stride);
        for (int r2 = 0; r2 < nr; r2 += 2) {
            int m = nr - r2 >= 2 ? 2 : 1;
            if (m == 2)
                f_tile(t, wr + (size_t)r2 * row_bytes, row_bytes, 2, xr, NX, cols, out);
            else
                f_tile(t, wr + (size_t)r2 * row_bytes, row_bytes, 1, xr, NX, cols, out);
            for (int rr = 0; rr < m; rr++)
                for (int k = 0; k < NX; k++)
                    y[(size_t)(i + k) * ldy + r + r2 + rr] = out[rr * NX + k];
        }
    }
    for (; i < n_x; i++) {
        const float *xr[1] = {(const float *)((const char *)x + (size_t)i * x_stride)};
        float out[4];
        f_tile(t, wr, row_bytes, nr, xr, 1, cols, out);
        for (int rr = 0; rr < nr; rr++)
            y[(size_t)i * ldy + r + rr] = out[rr];
    }
}

static inline __attribute__((always_inline)) void mm_f(enum ckv_wtype t, const void *w,
                                                       size_t row_bytes, int n_w, const void *x,
                                                       size_t x_stride, int n_x, int cols, float *y,
                                                       size_t ldy)
{
    /* Fewer than 4 activation rows (decode): one weight row after the other. Measured on this
     * machine (Zen 4 VM, 49152 x 576 f16 from DRAM, one thread): 4 rows read interleaved
     * stream at 1.4-3 GB/s, one row after the other at 7.5-17 GB/s. With 4 or more rows
     * the multi-row tiles measured faster (the weight is reused 4 times per load). */
    int r = 0;
    if (n_x >= NX)
        for (; r + 4 <= n_w; r += 4)
            f_rows(t, (const char *)w + (size_t)r * row_bytes, row_bytes, 4, x, x_stride, n_x, cols,
                   y, ldy, r);
    for (; r < n_w; r++)
        f_rows(t, (const char *)w + (size_t)r * row_bytes, row_bytes, 1, x, x_stride, n_x, cols, y,
               ldy, r);
}

static void mm_avx2(enum ckv_wtype t, const void *w, size_t row_bytes, int n_w, const void *x,
                    size_t x_stride, int n_x, int cols, float *y, size_t ldy)
{
    switch (t) {
    case CKV_W_F32: mm_f(CKV_W_F32, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    case CKV_W_F16: mm_f(CKV_W_F16, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    case CKV_W_BF16: mm_f(CKV_W_BF16, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    default: cpu_ops_mm_q_avx2(t, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    }
}

const cpu_mm_fn cpu_ops_mm_avx2 = mm_avx2;
