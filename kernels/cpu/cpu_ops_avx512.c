/*
 * AVX-512 matmul micro-kernel of the dense ops (cpu_ops.h), built with the AVX-512 F/BW/VL/DQ
 * flags of cpu_simd_avx512.c and called only on a context whose ISA is avx512.
 *
 * Float weights: 16-wide FMAs, 4 x 4 register tiles (4 weight rows, 4 activation rows, 16 of
 * the 32 zmm registers as accumulators: 0.5 loads per FMA) for 4 activation rows or more;
 * below that one weight row after the other with two accumulators (see mm_f: reading rows
 * interleaved from DRAM is slow here). The ragged end of a row is a masked load.
 *
 * Quantized weights: with AVX512-VNNI (checked at run time: the context's ISA does not imply
 * it) the block dot product is one vpdpbusd (u8 x s8 -> i32, 4 products per lane) on a 256-bit
 * register per 32-element block, in place of AVX2's vpmaddubsw + vpmaddwd. 256-bit and not
 * 512-bit: two blocks per zmm would need the two blocks' nibbles and activations interleaved
 * into one register and two scales per register, and on Zen 4 (this machine: 512-bit
 * operations issue as two 256-bit halves) that buys no throughput. Without VNNI the AVX2
 * quantized kernel runs (cpu_ops_mm_q_avx2).
 */
#include <immintrin.h>
#include <string.h>

#include "cpu_ops.h"

#define NX 4 /* activation rows per register tile */

#define VNNI __attribute__((target("avx512vnni")))

static inline float f16(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* ---- quantized, VNNI ---- */

static inline VNNI float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 nibbles of qs[16] in element order: low nibbles (0-15), then high nibbles (16-31). */
static inline VNNI __m256i unpack_nibbles(const uint8_t *qs)
{
    __m128i q = _mm_loadu_si128((const __m128i *)qs);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

/* One weight row against nx activation rows (nx a constant after inlining). For signed
 * weights w holds |w| and the activation takes w's sign (vpsignb), as vpdpbusd wants u8 x s8;
 * activations are in [-127, 127], so negating one never overflows. */
static inline __attribute__((always_inline)) VNNI void
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
        __m256i wabs = t == CKV_W_Q4_1 ? wv : _mm256_abs_epi8(wv);
        for (int k = 0; k < nx; k++) {
            const struct cpu_q8 *xb = xr[k] + b;
            __m256i xv = _mm256_loadu_si256((const __m256i *)xb->q);
            if (t != CKV_W_Q4_1)
                xv = _mm256_sign_epi8(xv, wv);
            __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, xv);
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xb->d), acc[k]);
            if (t == CKV_W_Q4_1)
                macc[k] += mw * xb->s;
        }
    }
    for (int k = 0; k < nx; k++)
        out[k] = hsum8(acc[k]) + macc[k];
}

static inline __attribute__((always_inline)) VNNI void mm_q(enum ckv_wtype t, const void *w,
                                                            size_t row_bytes, int n_w,
                                                            const void *x, size_t x_stride, int n_x,
                                                            int cols, float *y, size_t ldy)
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

static VNNI void mm_q_vnni(enum ckv_wtype t, const void *w, size_t row_bytes, int n_w,
                           const void *x, size_t x_stride, int n_x, int cols, float *y, size_t ldy)
{
    switch (t) {
    case CKV_W_Q8_0: mm_q(CKV_W_Q8_0, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    case CKV_W_Q4_0: mm_q(CKV_W_Q4_0, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    default: mm_q(CKV_W_Q4_1, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    }
}

/* ---- float weights ---- */

/* 16 weights from j on, the lanes of m only (others 0). */
static inline __m512 load16(enum ckv_wtype t, const void *row, int j, __mmask16 m)
{
    if (t == CKV_W_F32)
        return _mm512_maskz_loadu_ps(m, (const float *)row + j);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + j);
    if (t == CKV_W_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* bf16 */
}

/* nr weight rows against nx activation rows (constants after inlining): out[rr * nx + k]. */
static inline __attribute__((always_inline)) void f_tile(enum ckv_wtype t, const char *w,
                                                         size_t row_bytes, int nr,
                                                         const float *const *xr, int nx, int cols,
                                                         float *out)
{
    __m512 acc[4][NX];
    for (int rr = 0; rr < nr; rr++)
        for (int k = 0; k < nx; k++)
            acc[rr][k] = _mm512_setzero_ps();
    int j = 0;
    if (nr == 1 && nx == 1) { /* decode: a second accumulator, or the FMA latency bounds it */
        __m512 acc2 = _mm512_setzero_ps();
        for (; j + 32 <= cols; j += 32) {
            acc[0][0] =
                _mm512_fmadd_ps(load16(t, w, j, 0xffff), _mm512_loadu_ps(xr[0] + j), acc[0][0]);
            acc2 = _mm512_fmadd_ps(load16(t, w, j + 16, 0xffff), _mm512_loadu_ps(xr[0] + j + 16),
                                   acc2);
        }
        acc[0][0] = _mm512_add_ps(acc[0][0], acc2);
    }
    for (; j < cols; j += 16) {
        __mmask16 m = cols - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cols - j)) - 1);
        __m512 wv[4];
        for (int rr = 0; rr < nr; rr++)
            wv[rr] = load16(t, w + (size_t)rr * row_bytes, j, m);
        for (int k = 0; k < nx; k++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, xr[k] + j);
            for (int rr = 0; rr < nr; rr++)
                acc[rr][k] = _mm512_fmadd_ps(wv[rr], xv, acc[rr][k]);
        }
    }
    for (int rr = 0; rr < nr; rr++)
        for (int k = 0; k < nx; k++)
            out[rr * nx + k] = _mm512_reduce_add_ps(acc[rr][k]);
}

/* Rows [r, r + nr) against every activation row: nr x 4 tiles over whole groups of 4
 * activation rows, nr x 1 for the rest. */
static inline __attribute__((always_inline)) void f_rows(enum ckv_wtype t, const char *wr,
                                                         size_t row_bytes, int nr, const void *x,
                                                         size_t x_stride, int n_x, int cols,
                                                         float *y, size_t ldy, int r)
{
    int i = 0;
    for (; i + NX <= n_x; i += NX) {
        const float *xr[NX];
        float out[4 * NX];
        for (int k = 0; k < NX; k++)
            xr[k] = (const float *)((const char *)x + (size_t)(i + k) * x_stride);
        f_tile(t, wr, row_bytes, nr, xr, NX, cols, out);
        for (int rr = 0; rr < nr; rr++)
            for (int k = 0; k < NX; k++)
                y[(size_t)(i + k) * ldy + r + rr] = out[rr * NX + k];
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

static void mm_avx512(enum ckv_wtype t, const void *w, size_t row_bytes, int n_w, const void *x,
                      size_t x_stride, int n_x, int cols, float *y, size_t ldy)
{
    /* VNNI is probed once; a data race on the cache is benign (same value from every thread) */
    static int vnni = -1;
    switch (t) {
    case CKV_W_F32: mm_f(CKV_W_F32, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    case CKV_W_F16: mm_f(CKV_W_F16, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    case CKV_W_BF16: mm_f(CKV_W_BF16, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy); return;
    default:
        if (__atomic_load_n(&vnni, __ATOMIC_RELAXED) < 0)
            __atomic_store_n(&vnni, __builtin_cpu_supports("avx512vnni") ? 1 : 0, __ATOMIC_RELAXED);
        if (vnni)
            mm_q_vnni(t, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy);
        else
            cpu_ops_mm_q_avx2(t, w, row_bytes, n_w, x, x_stride, n_x, cols, y, ldy);
        return;
    }
}

const cpu_mm_fn cpu_ops_mm_avx512 = mm_avx512;
