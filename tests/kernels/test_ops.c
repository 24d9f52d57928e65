/*
 * Suite "ops": the dense ops of the forward pass (kernels/ops.h) against plain scalar f64
 * references written here from ops.h's definitions (block layouts included), on random inputs,
 * on every ISA this CPU has (portable, avx2, avx512; capped by CKV_CPU_ISA) with 1 and 2
 * threads, batch sizes 1, 3, 8 and 64.
 *
 * Matmul tolerances (per output element y = sum_j w_j x_j, cols = K):
 *  - float weights (f32, f16, bf16 are exact in f32): only f32 rounding of K products and sums
 *    in any order, |err| <= gamma_K * sum_j |w_j x_j| with gamma_K = K u / (1 - K u),
 *    u = 2^-24 (Higham's bound for a dot product, whatever the summation order).
 *  - quantized weights, against the exact product of the dequantized weights and the
 *    unquantized x: the activation quantization moves each x_j by at most d_b / 2 (rounding to
 *    nearest on a grid of step d_b = max|x in block b| / 127) plus |f16(d_b) - d_b| |q_j| (the
 *    scale is stored as f16, as llama.cpp does, the codes are not), so
 *    |err| <= sum_b sum_{j in b} |w_j| (d_b / 2 + |f16(d_b) - d_b| |q_j|), plus for Q4_1
 *    |m_b| |s16_b - f16(d_b) sum(q)| (Q8_1's s rounded to f16), plus the f32 rounding of the
 *    scaled block sums (gamma bound on sum_b |d_w d_x| sum_j |q_w q_x| + |m_w s_b|: on the sum
 *    of |products|, since SIMD kernels split a block's integer sum into lanes), plus a 1e-3
 *    relative slack on the first term for the rounding of x * 127/max. This bound is rigorous, so
 * the test has no false failures; it is loose (the errors are random, ~sqrt(K) not K) so a second
 * check holds the kernel to the exact semantics: a reference that quantizes x the way ops.h says
 * (ties on the grid included: they round to even), with only the f32-rounding tolerance. Q8_0 codes
 * include -128, which a file may hold. Every ISA's result is also compared with the portable one's
 * (within twice the f32 bound).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_half.h"
#include "kernels.h"
#include "ktest.h"
#include "ops.h"

/* ---- weights built from ops.h's block layouts, independently of the kernels ---- */

static size_t blk_bytes(enum ckv_wtype t)
{
    return t == CKV_W_Q8_0 ? 34 : t == CKV_W_Q4_0 ? 18 : 20;
}

static int is_q(enum ckv_wtype t)
{
    return t == CKV_W_Q8_0 || t == CKV_W_Q4_0 || t == CKV_W_Q4_1;
}

static uint16_t f16_of(float f)
{
    return ckv_half_from_f32(f);
}

static double f16_val(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return ckv_half_to_f32(h);
}

/* Element j of a weight row, in f64, straight from ops.h's description. */
static double w_elem(enum ckv_wtype t, const uint8_t *row, int j)
{
    if (t == CKV_W_F32) {
        float f;
        memcpy(&f, row + 4 * (size_t)j, 4);
        return f;
    }
    if (t == CKV_W_F16)
        return f16_val(row + 2 * (size_t)j);
    if (t == CKV_W_BF16) {
        uint16_t b;
        memcpy(&b, row + 2 * (size_t)j, 2);
        uint32_t u = (uint32_t)b << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    const uint8_t *blk = row + (size_t)(j / 32) * blk_bytes(t);
    int e = j % 32;
    if (t == CKV_W_Q8_0)
        return f16_val(blk) * (int8_t)blk[2 + e];
    int hdr = t == CKV_W_Q4_0 ? 2 : 4;
    int nib = e < 16 ? blk[hdr + e] & 0xf : blk[hdr + e - 16] >> 4;
    if (t == CKV_W_Q4_0)
        return f16_val(blk) * (nib - 8);
    return f16_val(blk) * nib + f16_val(blk + 2);
}

/* A random weight (rows, cols) of type t, rows row_pad bytes longer than needed. */
static struct ckv_weight make_weight(struct ktest_rng *r, enum ckv_wtype t, int rows, int cols,
                                     size_t row_pad)
{
    struct ckv_weight w = {t, rows, cols, ckv_wtype_row_bytes(t, cols) + row_pad, NULL};
    cr_assert_gt(w.row_bytes, row_pad);
    uint8_t *p = calloc((size_t)rows, w.row_bytes);
    cr_assert(p);
    for (int i = 0; i < rows; i++) {
        uint8_t *row = p + (size_t)i * w.row_bytes;
        for (int j = 0; j < cols; j++) {
            float v = 0.1f * ktest_normal(r);
            if (t == CKV_W_F32) {
                memcpy(row + 4 * (size_t)j, &v, 4);
            } else if (t == CKV_W_F16) {
                uint16_t h = f16_of(v);
                memcpy(row + 2 * (size_t)j, &h, 2);
            } else if (t == CKV_W_BF16) {
                uint32_t u;
                memcpy(&u, &v, 4);
                uint16_t b = (uint16_t)(u >> 16);
                memcpy(row + 2 * (size_t)j, &b, 2);
            }
        }
        if (!is_q(t))
            continue;
        for (int b = 0; b < cols / 32; b++) {
            uint8_t *blk = row + (size_t)b * blk_bytes(t);
            /* random scale, random codes (every code value occurs) */
            uint16_t d = f16_of(0.002f + 0.02f * ktest_uniform(r));
            memcpy(blk, &d, 2);
            if (t == CKV_W_Q8_0) {
                for (int e = 0; e < 32; e++)
                    blk[2 + e] =
                        (uint8_t)(int8_t)ktest_int(r, -128, 127); /* -128 too: a file may hold it */
                continue;
            }
            int hdr = 2;
            if (t == CKV_W_Q4_1) {
                uint16_t m = f16_of(-0.15f * ktest_uniform(r));
                memcpy(blk + 2, &m, 2);
                hdr = 4;
            }
            for (int e = 0; e < 16; e++)
                blk[hdr + e] = (uint8_t)ktest_int(r, 0, 255);
        }
    }
    w.data = p;
    return w;
}

/* ---- matmul ---- */

struct mm_case {
    struct ckv_weight w;
    const float *x;
    int n;
    const double *ref_exact; /* dequantized W . x in f64 */
    const double *tol_exact;
    const double *ref_q; /* ops.h's quantized semantics in f64 (quantized types) */
    const double *tol_q;
    float *y_portable; /* filled by the first (portable) context */
};

static const double u32 = 1.0 / 16777216.0;

static double gamma_k(int k)
{
    return k * u32 / (1.0 - k * u32);
}

static void references(struct mm_case *c, double *ref, double *tol, double *refq, double *tolq)
{
    const struct ckv_weight *w = &c->w;
    int K = w->cols, nb = K / 32;
    for (int i = 0; i < c->n; i++) {
        const float *x = c->x + (size_t)i * K;
        /* the activation quantization as ops.h states it */
        float dq[4096], d32[4096], sq16[4096];
        int8_t q[4096 * 32 / 32];
        if (is_q(w->type)) {
            cr_assert_leq(K, 4096);
            for (int b = 0; b < nb; b++) {
                float amax = 0;
                for (int e = 0; e < 32; e++)
                    amax = fmaxf(amax, fabsf(x[b * 32 + e]));
                float id = amax > 0 ? 127.0f / amax : 0.0f;
                /* d is the f32 quotient stored as f16; the codes come from the unrounded id */
                d32[b] = amax / 127.0f;
                dq[b] = ckv_half_to_f32(f16_of(d32[b]));
                int qs = 0;
                for (int e = 0; e < 32; e++) {
                    q[b * 32 + e] = (int8_t)nearbyintf(x[b * 32 + e] * id);
                    qs += q[b * 32 + e];
                }
                /* Q8_1's s: f32 product of the unrounded d and the code sum, stored as f16 */
                sq16[b] = ckv_half_to_f32(f16_of(d32[b] * (float)qs));
            }
        }
        for (int r = 0; r < w->rows; r++) {
            const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
            double s = 0, sabs = 0, qerr = 0;
            for (int j = 0; j < K; j++) {
                double wj = w_elem(w->type, row, j);
                s += wj * x[j];
                sabs += fabs(wj * x[j]);
                /* x_j is reconstructed as d16 * q_j: off by at most d/2 (the grid) plus
                 * |d16 - d| * |q_j| (the scale's f16 rounding, a relative 2^-11) */
                if (is_q(w->type))
                    qerr += fabs(wj) * (d32[j / 32] / 2 +
                                        fabs((double)dq[j / 32] - d32[j / 32]) * abs(q[j]));
            }
            size_t o = (size_t)i * w->rows + r;
            ref[o] = s;
            if (!is_q(w->type)) {
                tol[o] = gamma_k(K) * sabs + 1e-30;
                continue;
            }
            /* ops.h's integer semantics, f64 */
            double sq = 0, sqabs = 0;
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = row + (size_t)b * blk_bytes(w->type);
                double dw = f16_val(blk), dx = dq[b], m = 0;
                long isum = 0, qsum = 0, iabs = 0;
                for (int e = 0; e < 32; e++) {
                    int wq;
                    if (w->type == CKV_W_Q8_0)
                        wq = (int8_t)blk[2 + e];
                    else {
                        int hdr = w->type == CKV_W_Q4_0 ? 2 : 4;
                        wq = e < 16 ? blk[hdr + e] & 0xf : blk[hdr + e - 16] >> 4;
                        if (w->type == CKV_W_Q4_0)
                            wq -= 8;
                    }
                    isum += (long)wq * q[b * 32 + e];
                    iabs += labs((long)wq * q[b * 32 + e]);
                    qsum += q[b * 32 + e];
                }
                double term = dw * dx * (double)isum;
                double mterm = 0;
                if (w->type == CKV_W_Q4_1) {
                    m = f16_val(blk + 2);
                    mterm = m * sq16[b];
                    /* computed = sum_j w_j d16 q_j + m (s16 - d16 sum(q)): the first term's
                     * distance to sum_j w_j x_j is in qerr element by element; the second
                     * is the f16 rounding of s and of d */
                    qerr += fabs(m) * fabs((double)sq16[b] - (double)dq[b] * (double)qsum);
                }
                sq += term + mterm;
                /* the kernels may split a block's integer sum in any way (SIMD lanes), so
                 * the rounding bound is on the sum of |products|, not on |isum| */
                sqabs += fabs(dw * dx) * (double)iabs + fabs(mterm);
            }
            refq[o] = sq;
            /* d_w*d_x and its product with a partial sum rounded in f32, then at most
             * nb + 1 additions per accumulator and a few for the horizontal sum */
            tolq[o] = gamma_k(nb + 8) * sqabs + 1e-30;
            tol[o] = qerr * 1.001 + tolq[o] + 1e-3 * qerr;
        }
    }
}

static void mm_check(ckv_ctx_t *ctx, const void *arg)
{
    struct mm_case *c = (struct mm_case *)arg;
    size_t ny = (size_t)c->n * c->w.rows;
    float *y = malloc(ny * sizeof(float));
    cr_assert(y);
    for (size_t o = 0; o < ny; o++)
        y[o] = NAN;
    int rc = ckv_matmul(ctx, &c->w, c->x, c->n, y);
    cr_assert_eq(rc, 0, "%s: %d", ckv_ctx_describe(ctx), rc);
    for (size_t o = 0; o < ny; o++) {
        cr_assert(fabs(y[o] - c->ref_exact[o]) <= c->tol_exact[o],
                  "%s %s %dx%d n=%d [%zu]: %.9g vs %.9g (tol %.3g)", ckv_ctx_describe(ctx),
                  ckv_wtype_name(c->w.type), c->w.rows, c->w.cols, c->n, o, y[o], c->ref_exact[o],
                  c->tol_exact[o]);
        if (c->ref_q)
            cr_assert(fabs(y[o] - c->ref_q[o]) <= c->tol_q[o],
                      "%s %s n=%d [%zu]: %.9g vs quantized ref %.9g (tol %.3g)",
                      ckv_ctx_describe(ctx), ckv_wtype_name(c->w.type), c->n, o, y[o], c->ref_q[o],
                      c->tol_q[o]);
    }
    /* every ISA agrees with the portable kernel within twice the f32-rounding bound */
    if (ckv_ctx_cpu_isa(ctx) == CKV_ISA_PORTABLE) {
        memcpy(c->y_portable, y, ny * sizeof(float));
    } else {
        const double *t = c->ref_q ? c->tol_q : c->tol_exact;
        for (size_t o = 0; o < ny; o++)
            cr_assert(fabs(y[o] - c->y_portable[o]) <= 2 * t[o], "%s vs portable [%zu]: %.9g %.9g",
                      ckv_ctx_describe(ctx), o, y[o], c->y_portable[o]);
    }
    free(y);
}

static void run_matmul(enum ckv_wtype t, int rows, int cols, uint64_t seed)
{
    static const int batches[] = {1, 3, 8, 64};
    struct ktest_rng r = {seed};
    struct ckv_weight w = make_weight(&r, t, rows, cols, 16);
    for (size_t bi = 0; bi < CKV_ARRAY_LEN(batches); bi++) {
        int n = batches[bi];
        float *x = malloc((size_t)n * cols * sizeof(float));
        cr_assert(x);
        ktest_fill_normal(&r, x, (size_t)n * cols, 1.0f);
        /* an outlier per row and an all-zero block: scales that differ across blocks */
        for (int i = 0; i < n; i++) {
            x[(size_t)i * cols + (i * 7) % cols] = 30.0f;
            if (cols >= 64)
                memset(x + (size_t)i * cols + 32, 0, 32 * sizeof(float));
            if (i % 2) { /* block 0 on the grid's half points: ties round to even */
                float *b0 = x + (size_t)i * cols;
                b0[0] = 127.0f;
                for (int e = 1; e < 32; e++)
                    b0[e] = (float)(e % 2 ? e : -e) * 0.5f;
            }
        }
        size_t ny = (size_t)n * rows;
        double *buf = malloc(4 * ny * sizeof(double));
        float *yp = malloc(ny * sizeof(float));
        cr_assert(buf && yp);
        struct mm_case c = {w, x, n, buf, buf + ny, NULL, NULL, yp};
        references(&c, buf, buf + ny, buf + 2 * ny, buf + 3 * ny);
        if (is_q(t)) {
            c.ref_q = buf + 2 * ny;
            c.tol_q = buf + 3 * ny;
        }
        ktest_each_ctx(mm_check, &c);
        free(buf);
        free(yp);
        free(x);
    }
    free((void *)w.data);
}

Test(ops, matmul_q4_1)
{
    run_matmul(CKV_W_Q4_1, 67, 576, 11);
    run_matmul(CKV_W_Q4_1, 130, 1536, 12);
}

Test(ops, matmul_q4_0)
{
    run_matmul(CKV_W_Q4_0, 67, 576, 21);
    run_matmul(CKV_W_Q4_0, 33, 96, 22);
}

Test(ops, matmul_q8_0)
{
    run_matmul(CKV_W_Q8_0, 67, 576, 31);
    run_matmul(CKV_W_Q8_0, 33, 32, 32);
}

Test(ops, matmul_f32)
{
    run_matmul(CKV_W_F32, 67, 576, 41);
    run_matmul(CKV_W_F32, 29, 101, 42); /* cols off every vector width */
}

Test(ops, matmul_f16)
{
    run_matmul(CKV_W_F16, 67, 576, 51);
    run_matmul(CKV_W_F16, 29, 77, 52);
}

Test(ops, matmul_bf16)
{
    run_matmul(CKV_W_BF16, 40, 200, 61);
}

/* Many rows: several tasks per thread, slices of the weight, the tail of the last task. */
Test(ops, matmul_many_rows)
{
    run_matmul(CKV_W_Q4_1, 2051, 64, 71);
    run_matmul(CKV_W_F16, 1027, 64, 72);
}

/* ---- get_rows ---- */

struct rows_case {
    struct ckv_weight w;
    const int32_t *ids;
    int n;
};

static void rows_check(ckv_ctx_t *ctx, const void *arg)
{
    const struct rows_case *c = arg;
    int K = c->w.cols;
    float *out = malloc((size_t)c->n * K * sizeof(float));
    cr_assert(out);
    cr_assert_eq(ckv_get_rows(ctx, &c->w, c->ids, c->n, out), 0);
    for (int i = 0; i < c->n; i++) {
        const uint8_t *row = (const uint8_t *)c->w.data + (size_t)c->ids[i] * c->w.row_bytes;
        for (int j = 0; j < K; j++) {
            double ref = w_elem(c->w.type, row, j);
            /* d*q (+m) rounded once or twice in f32 */
            cr_assert(fabs(out[(size_t)i * K + j] - ref) <= 2.5 * u32 * (fabs(ref) + 0.2),
                      "%s %s id %d [%d]: %.9g vs %.9g", ckv_ctx_describe(ctx),
                      ckv_wtype_name(c->w.type), c->ids[i], j, out[(size_t)i * K + j], ref);
        }
    }
    free(out);
}

Test(ops, get_rows)
{
    static const enum ckv_wtype types[] = {CKV_W_F32,  CKV_W_F16,  CKV_W_BF16,
                                           CKV_W_Q4_0, CKV_W_Q4_1, CKV_W_Q8_0};
    struct ktest_rng r = {81};
    for (size_t ti = 0; ti < CKV_ARRAY_LEN(types); ti++) {
        struct ckv_weight w = make_weight(&r, types[ti], 50, 96, 8);
        int32_t ids[] = {0, 49, 7, 7, 23};
        struct rows_case c = {w, ids, 5};
        ktest_each_ctx(rows_check, &c);
        free((void *)w.data);
    }
}

/* ---- RMSNorm ---- */

struct norm_case {
    const float *x, *wt;
    int n, dim;
    float eps;
};

static void norm_check(ckv_ctx_t *ctx, const void *arg)
{
    const struct norm_case *c = arg;
    size_t sz = (size_t)c->n * c->dim;
    float *out = malloc(sz * sizeof(float)), *inplace = malloc(sz * sizeof(float));
    cr_assert(out && inplace);
    memcpy(inplace, c->x, sz * sizeof(float));
    cr_assert_eq(ckv_rmsnorm(ctx, c->x, c->wt, c->n, c->dim, c->eps, out), 0);
    cr_assert_eq(ckv_rmsnorm(ctx, inplace, c->wt, c->n, c->dim, c->eps, inplace), 0);
    for (int i = 0; i < c->n; i++) {
        const float *x = c->x + (size_t)i * c->dim;
        double ss = 0;
        for (int k = 0; k < c->dim; k++)
            ss += (double)x[k] * x[k];
        double scale = 1.0 / sqrt(ss / c->dim + c->eps);
        for (int k = 0; k < c->dim; k++) {
            double ref = x[k] * scale * c->wt[k];
            size_t o = (size_t)i * c->dim + k;
            /* scale rounded once, two f32 products */
            cr_assert(fabs(out[o] - ref) <= 4 * u32 * fabs(ref) + 1e-30, "%s [%zu] %.9g %.9g",
                      ckv_ctx_describe(ctx), o, out[o], ref);
            cr_assert_eq(inplace[o], out[o]);
        }
    }
    free(out);
    free(inplace);
}

Test(ops, rmsnorm)
{
    struct ktest_rng r = {91};
    static const int batches[] = {1, 3, 8, 64};
    for (size_t bi = 0; bi < CKV_ARRAY_LEN(batches); bi++) {
        int n = batches[bi], dim = 576;
        float *x = malloc((size_t)n * dim * sizeof(float)), *wt = malloc(dim * sizeof(float));
        cr_assert(x && wt);
        ktest_fill_normal(&r, x, (size_t)n * dim, 3.0f);
        ktest_fill_normal(&r, wt, dim, 1.0f);
        memset(x, 0, dim * sizeof(float)); /* an all-zero row: eps alone */
        struct norm_case c = {x, wt, n, dim, 1e-5f};
        ktest_each_ctx(norm_check, &c);
        free(x);
        free(wt);
    }
}

/* ---- RoPE ---- */

struct rope_case {
    const float *x;
    const int32_t *pos;
    int n, n_heads, head_dim;
    struct ckv_rope_params p;
};

static void rope_check(ckv_ctx_t *ctx, const void *arg)
{
    const struct rope_case *c = arg;
    size_t sz = (size_t)c->n * c->n_heads * c->head_dim;
    float *y = malloc(sz * sizeof(float));
    cr_assert(y);
    memcpy(y, c->x, sz * sizeof(float));
    cr_assert_eq(ckv_rope(ctx, y, c->n, c->n_heads, c->head_dim, c->pos, &c->p), 0);
    int half = c->p.n_rot / 2;
    for (int i = 0; i < c->n; i++)
        for (int h = 0; h < c->n_heads; h++) {
            size_t base = ((size_t)i * c->n_heads + h) * c->head_dim;
            const float *x = c->x + base;
            const float *o = y + base;
            for (int k = c->p.n_rot; k < c->head_dim; k++)
                cr_assert_eq(o[k], x[k], "dimension %d past n_rot changed", k);
            for (int k = 0; k < half; k++) {
                double f = pow((double)c->p.theta, -2.0 * k / c->p.n_rot);
                if (c->p.freq_factors)
                    f /= c->p.freq_factors[k];
                double a = (double)c->pos[i] * c->p.freq_scale * f;
                int i0 = c->p.style == CKV_ROPE_NORM ? 2 * k : k;
                int i1 = c->p.style == CKV_ROPE_NORM ? 2 * k + 1 : k + half;
                double r0 = x[i0] * cos(a) - x[i1] * sin(a);
                double r1 = x[i0] * sin(a) + x[i1] * cos(a);
                /* cos and sin rounded to f32, two products and a sum in f32 */
                double tol = 4 * u32 * (fabs(x[i0]) + fabs(x[i1]));
                cr_assert(fabs(o[i0] - r0) <= tol && fabs(o[i1] - r1) <= tol,
                          "%s style %d tok %d head %d pair %d: (%.9g %.9g) vs (%.9g %.9g)",
                          ckv_ctx_describe(ctx), c->p.style, i, h, k, o[i0], o[i1], r0, r1);
            }
        }
    free(y);
}

static void run_rope(enum ckv_rope_style style, int n_rot, const float *factors, float fscale)
{
    struct ktest_rng r = {101 + (uint64_t)style * 7 + (uint64_t)n_rot};
    static const int batches[] = {1, 3, 8, 64};
    for (size_t bi = 0; bi < CKV_ARRAY_LEN(batches); bi++) {
        int n = batches[bi], nh = 3, hd = 64;
        float *x = malloc((size_t)n * nh * hd * sizeof(float));
        int32_t *pos = malloc((size_t)n * sizeof(int32_t));
        cr_assert(x && pos);
        ktest_fill_normal(&r, x, (size_t)n * nh * hd, 1.0f);
        for (int i = 0; i < n; i++)
            pos[i] = i == 0 ? 0 : ktest_int(&r, 0, 130000); /* long contexts: large angles */
        struct rope_case c = {x, pos, n, nh, hd, {style, n_rot, 10000.0f, fscale, factors}};
        ktest_each_ctx(rope_check, &c);
        free(x);
        free(pos);
    }
}

Test(ops, rope_norm)
{
    run_rope(CKV_ROPE_NORM, 64, NULL, 1.0f);
}

Test(ops, rope_neox)
{
    run_rope(CKV_ROPE_NEOX, 64, NULL, 1.0f);
}

Test(ops, rope_partial_factors_scale)
{
    float factors[32];
    for (int i = 0; i < 32; i++)
        factors[i] = 1.0f + 0.37f * i;
    run_rope(CKV_ROPE_NORM, 32, factors, 0.25f);
    run_rope(CKV_ROPE_NEOX, 32, factors, 0.25f);
    run_rope(CKV_ROPE_NEOX, 48, factors, 1.0f);
}

/* Position 0 is the identity (cos 0 = 1, sin 0 = 0 exactly). */
Test(ops, rope_position_zero)
{
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_PORTABLE, 1);
    float x[128], y[128];
    struct ktest_rng r = {111};
    ktest_fill_normal(&r, x, 128, 1.0f);
    memcpy(y, x, sizeof(x));
    int32_t pos = 0;
    struct ckv_rope_params p = {CKV_ROPE_NORM, 64, 10000.0f, 1.0f, NULL};
    cr_assert_eq(ckv_rope(ctx, y, 1, 2, 64, &pos, &p), 0);
    cr_assert_arr_eq(x, y, sizeof(x));
    ckv_ctx_destroy(&ctx);
}

/* ---- element-wise ---- */

struct ew_case {
    const float *a, *b;
    size_t n;
    int dim;
};

static void ew_check(ckv_ctx_t *ctx, const void *arg)
{
    const struct ew_case *c = arg;
    float *o = malloc(c->n * sizeof(float)), *g = malloc(c->n * sizeof(float));
    cr_assert(o && g);
    /* swiglu, out separate, then in place on gate */
    cr_assert_eq(ckv_swiglu(ctx, c->a, c->b, c->n, o), 0);
    memcpy(g, c->a, c->n * sizeof(float));
    cr_assert_eq(ckv_swiglu(ctx, g, c->b, c->n, g), 0);
    for (size_t i = 0; i < c->n; i++) {
        double a = c->a[i], ref = a / (1.0 + exp(-a)) * c->b[i];
        /* expf within a few ulp, then 3 f32 operations */
        cr_assert(fabs(o[i] - ref) <= 8 * u32 * fabs(ref) + 1e-37, "swiglu [%zu] %.9g %.9g", i,
                  o[i], ref);
        cr_assert_eq(g[i], o[i]);
    }
    /* add: one f32 rounding of the exact sum */
    memcpy(o, c->a, c->n * sizeof(float));
    cr_assert_eq(ckv_add(ctx, o, c->b, c->n), 0);
    for (size_t i = 0; i < c->n; i++)
        cr_assert_eq(o[i], (float)((double)c->a[i] + c->b[i]));
    /* add_bias over rows of dim */
    memcpy(o, c->a, c->n * sizeof(float));
    int rows = (int)(c->n / (size_t)c->dim);
    cr_assert_eq(ckv_add_bias(ctx, o, c->b, rows, c->dim), 0);
    for (size_t i = 0; i < c->n; i++)
        cr_assert_eq(o[i], (float)((double)c->a[i] + c->b[i % (size_t)c->dim]));
    free(o);
    free(g);
}

Test(ops, elementwise)
{
    struct ktest_rng r = {121};
    static const int batches[] = {1, 3, 8, 64};
    for (size_t bi = 0; bi < CKV_ARRAY_LEN(batches); bi++) {
        size_t n = (size_t)batches[bi] * 1536;
        float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
        cr_assert(a && b);
        ktest_fill_normal(&r, a, n, 4.0f);
        ktest_fill_normal(&r, b, n, 1.0f);
        a[0] = -100.0f; /* silu's exp overflows: must give -0, not NaN */
        a[1] = 100.0f;
        struct ew_case c = {a, b, n, 1536};
        ktest_each_ctx(ew_check, &c);
        free(a);
        free(b);
    }
}

/* ---- types and bad arguments ---- */

Test(ops, wtype_table)
{
    cr_assert_eq(ckv_wtype_row_bytes(CKV_W_Q4_1, 576), 18 * 20);
    cr_assert_eq(ckv_wtype_row_bytes(CKV_W_Q4_0, 576), 18 * 18);
    cr_assert_eq(ckv_wtype_row_bytes(CKV_W_Q8_0, 576), 18 * 34);
    cr_assert_eq(ckv_wtype_row_bytes(CKV_W_F16, 577), 2 * 577);
    cr_assert_eq(ckv_wtype_row_bytes(CKV_W_F32, 3), 12);
    cr_assert_eq(ckv_wtype_row_bytes(CKV_W_BF16, 3), 6);
    cr_assert_eq(ckv_wtype_row_bytes(CKV_W_Q4_1, 33), 0);
    cr_assert_eq(ckv_wtype_row_bytes(7, 64), 0);
    cr_assert_eq(ckv_wtype_row_bytes(CKV_W_F32, 0), 0);
    cr_assert(ckv_wtype_supported(CKV_W_Q8_0));
    cr_assert(!ckv_wtype_supported(6));
    cr_assert_str_eq(ckv_wtype_name(CKV_W_Q4_1), "q4_1");
    cr_assert_str_eq(ckv_wtype_name(99), "?");
}

Test(ops, bad_arguments)
{
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_PORTABLE, 2);
    struct ktest_rng r = {131};
    struct ckv_weight w = make_weight(&r, CKV_W_Q4_1, 8, 64, 0);
    float x[2 * 64] = {0}, y[64];
    for (int i = 0; i < 64; i++)
        y[i] = 42.0f;
    cr_assert_eq(ckv_matmul(NULL, &w, x, 1, y), -EINVAL);
    cr_assert_eq(ckv_matmul(ctx, NULL, x, 1, y), -EINVAL);
    cr_assert_eq(ckv_matmul(ctx, &w, NULL, 1, y), -EINVAL);
    cr_assert_eq(ckv_matmul(ctx, &w, x, 1, NULL), -EINVAL);
    cr_assert_eq(ckv_matmul(ctx, &w, x, 0, y), -EINVAL);
    struct ckv_weight b = w;
    b.cols = 48; /* not a whole number of blocks */
    cr_assert_eq(ckv_matmul(ctx, &b, x, 1, y), -EINVAL);
    b = w;
    b.row_bytes = 39; /* shorter than a row */
    cr_assert_eq(ckv_matmul(ctx, &b, x, 1, y), -EINVAL);
    b = w;
    b.type = 7;
    cr_assert_eq(ckv_matmul(ctx, &b, x, 1, y), -EINVAL);
    b = w;
    b.rows = 0;
    cr_assert_eq(ckv_matmul(ctx, &b, x, 1, y), -EINVAL);
    b = w;
    b.data = NULL;
    cr_assert_eq(ckv_matmul(ctx, &b, x, 1, y), -EINVAL);
    for (int i = 0; i < 64; i++)
        cr_assert_eq(y[i], 42.0f, "a failed call wrote its output");

    int32_t ids[] = {0, 8};
    cr_assert_eq(ckv_get_rows(ctx, &w, ids, 2, y), -EINVAL); /* 8 == rows */
    ids[1] = -1;
    cr_assert_eq(ckv_get_rows(ctx, &w, ids, 2, y), -EINVAL);
    cr_assert_eq(ckv_get_rows(ctx, &w, ids, 0, y), -EINVAL);
    for (int i = 0; i < 64; i++)
        cr_assert_eq(y[i], 42.0f, "a failed get_rows wrote its output");

    float wt[64] = {0};
    cr_assert_eq(ckv_rmsnorm(ctx, x, wt, 1, 0, 1e-5f, y), -EINVAL);
    cr_assert_eq(ckv_rmsnorm(ctx, x, wt, 0, 64, 1e-5f, y), -EINVAL);
    cr_assert_eq(ckv_rmsnorm(ctx, x, wt, 1, 64, -1.0f, y), -EINVAL);
    cr_assert_eq(ckv_rmsnorm(ctx, x, wt, 1, 64, NAN, y), -EINVAL);
    cr_assert_eq(ckv_rmsnorm(ctx, x, NULL, 1, 64, 1e-5f, y), -EINVAL);

    int32_t pos = 3;
    float ff[32];
    for (int i = 0; i < 32; i++)
        ff[i] = 1.0f;
    struct ckv_rope_params ok = {CKV_ROPE_NORM, 64, 10000.0f, 1.0f, ff};
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, &ok), 0);
    struct ckv_rope_params p = ok;
    p.n_rot = 63;
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, &p), -EINVAL);
    p.n_rot = 66;
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, &p), -EINVAL);
    p.n_rot = 0;
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, &p), -EINVAL);
    p = ok;
    p.style = 2;
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, &p), -EINVAL);
    p = ok;
    p.theta = 0.0f;
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, &p), -EINVAL);
    p = ok;
    p.freq_scale = INFINITY;
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, &p), -EINVAL);
    p = ok;
    ff[5] = 0.0f;
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, &p), -EINVAL);
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, NULL, &ok), -EINVAL);
    cr_assert_eq(ckv_rope(ctx, x, 1, 0, 64, &pos, &ok), -EINVAL);
    cr_assert_eq(ckv_rope(ctx, x, 1, 1, 64, &pos, NULL), -EINVAL);

    cr_assert_eq(ckv_swiglu(ctx, NULL, x, 4, y), -EINVAL);
    cr_assert_eq(ckv_swiglu(ctx, x, x, 0, y), 0);
    cr_assert_eq(ckv_add(ctx, NULL, x, 4), -EINVAL);
    cr_assert_eq(ckv_add(NULL, y, x, 4), -EINVAL);
    cr_assert_eq(ckv_add_bias(ctx, y, x, 1, 0), -EINVAL);
    cr_assert_eq(ckv_add_bias(ctx, y, NULL, 1, 4), -EINVAL);

    free((void *)w.data);
    ckv_ctx_destroy(&ctx);
}
