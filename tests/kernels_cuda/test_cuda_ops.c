/*
 * Suite "cuda_ops": the CUDA backend's dense ops (ops.h, kernels/cuda/cuda_ops.cu) against the
 * CPU backend (itself tested against f64 references in tests/kernels/test_ops.c), on random
 * inputs. Skipped without a CUDA device (kcuda.h); runs on the emulation in
 * ckv-tests-cuda-emu, where cuBLAS's GemmEx is a plain loop (cuda_emu.h).
 *
 * Tolerances (what cuda_ops.h says agrees how):
 *  - get_rows, RoPE, add, add_bias: bit-equal.
 *  - quantized matmul: the same 8-bit blocks (codes, f16 d and s), f32 scaling and sums in
 *    another order: |cuda - cpu| <= 2 gamma_{nb+8} S, S = sum_b sum_j (|d_w q_w,j| + |m_w|)
 *    (|x_j| + d_b) (a bound on the sum of |terms| either side adds, d_b = max|x_b|/127 * 1.01),
 *    gamma_k = k u / (1 - k u), u = 2^-24. One code quantized differently would move an
 *    output by ~|w| d_b, far above this.
 *  - f32 matmul: 2 gamma_K sum_j |w_j x_j| (both are f32 dot products, any order).
 *  - f16 / bf16 matmul: CUDA multiplies x rounded to the weight's type: plus u_t sum |w_j x_j|
 *    (u_t = 2^-11, 2^-8) and 2^-25 sum |w_j| for f16's subnormals.
 *  - rmsnorm: the f64 sum of squares in another order can change the f32 scale by an ulp:
 *    |cuda - cpu| <= 2^-21 |cpu|.
 *  - swiglu: the device's expf is within 2 ulp: |cuda - cpu| <= 2^-20 |cpu|.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_half.h"
#include "kcuda.h"
#include "ops.h"

static const double U32 = 1.0 / 16777216.0;

static double gamma_k(int k)
{
    return k * U32 / (1.0 - k * U32);
}

static int is_q(enum ckv_wtype t)
{
    return t == CKV_W_Q8_0 || t == CKV_W_Q4_0 || t == CKV_W_Q4_1;
}

/* A random weight (host memory) of type t; rows 6 bytes longer than needed (a stride that
 * keeps 2-byte alignment but not 4 for the quantized types). */
static struct ckv_weight random_weight(struct ktest_rng *r, enum ckv_wtype t, int rows, int cols)
{
    size_t pad = t == CKV_W_F32 ? 8 : is_q(t) ? 6 : 4;
    struct ckv_weight w = {t, rows, cols, ckv_wtype_row_bytes(t, cols) + pad, NULL};
    uint8_t *p = calloc((size_t)rows, w.row_bytes);
    cr_assert(p);
    size_t bb = t == CKV_W_Q8_0 ? 34 : t == CKV_W_Q4_0 ? 18 : 20;
    for (int i = 0; i < rows; i++) {
        uint8_t *row = p + (size_t)i * w.row_bytes;
        if (!is_q(t)) {
            for (int j = 0; j < cols; j++) {
                float v = 0.1f * ktest_normal(r);
                uint32_t u;
                memcpy(&u, &v, 4);
                uint16_t h = t == CKV_W_F16 ? ckv_half_from_f32(v) : (uint16_t)(u >> 16);
                if (t == CKV_W_F32)
                    memcpy(row + 4 * (size_t)j, &v, 4);
                else
                    memcpy(row + 2 * (size_t)j, &h, 2);
            }
            continue;
        }
        for (int b = 0; b < cols / 32; b++) {
            uint8_t *blk = row + (size_t)b * bb;
            uint16_t d = ckv_half_from_f32(0.002f + 0.02f * ktest_uniform(r));
            memcpy(blk, &d, 2);
            if (t == CKV_W_Q8_0) {
                for (int e = 0; e < 32; e++)
                    blk[2 + e] = (uint8_t)(int8_t)ktest_int(r, -128, 127);
                continue;
            }
            int hdr = 2;
            if (t == CKV_W_Q4_1) {
                uint16_t m = ckv_half_from_f32(-0.15f * ktest_uniform(r));
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

/* |d q| and |m| of element j of a quantized row; the value itself for float rows. */
static void elem_parts(const struct ckv_weight *w, const uint8_t *row, int j, double *dq, double *m)
{
    *m = 0;
    if (!is_q(w->type)) {
        float f;
        if (w->type == CKV_W_F32) {
            memcpy(&f, row + 4 * (size_t)j, 4);
        } else {
            uint16_t h;
            memcpy(&h, row + 2 * (size_t)j, 2);
            uint32_t u = (uint32_t)h << 16;
            if (w->type == CKV_W_F16)
                f = ckv_half_to_f32(h);
            else
                memcpy(&f, &u, 4);
        }
        *dq = fabs(f);
        return;
    }
    size_t bb = w->type == CKV_W_Q8_0 ? 34 : w->type == CKV_W_Q4_0 ? 18 : 20;
    const uint8_t *blk = row + (size_t)(j / 32) * bb;
    uint16_t h;
    memcpy(&h, blk, 2);
    double d = ckv_half_to_f32(h);
    int e = j % 32, q;
    if (w->type == CKV_W_Q8_0) {
        q = (int8_t)blk[2 + e];
    } else {
        int hdr = w->type == CKV_W_Q4_0 ? 2 : 4;
        q = e < 16 ? blk[hdr + e] & 0xf : blk[hdr + e - 16] >> 4;
        if (w->type == CKV_W_Q4_0)
            q -= 8;
        else {
            memcpy(&h, blk + 2, 2);
            *m = fabs(ckv_half_to_f32(h));
        }
    }
    *dq = fabs(d * q);
}

static void check_matmul(ckv_ctx_t *gpu, ckv_ctx_t *cpu, enum ckv_wtype t, int rows, int cols,
                         uint64_t seed)
{
    static const int batches[] = {1, 5, 9};
    struct ktest_rng r = {seed};
    struct ckv_weight w = random_weight(&r, t, rows, cols);
    struct ckv_weight wd = w;
    wd.data = kcuda_up(gpu, w.data, (size_t)rows * w.row_bytes);
    for (size_t bi = 0; bi < sizeof(batches) / sizeof(batches[0]); bi++) {
        int n = batches[bi], nb = cols / 32;
        size_t nx = (size_t)n * cols, ny = (size_t)n * rows;
        float *x = malloc(nx * sizeof(float)), *yc = malloc(ny * sizeof(float));
        cr_assert(x && yc);
        ktest_fill_normal(&r, x, nx, 1.0f);
        for (int i = 0; i < n; i++) { /* an outlier and an all-zero block per row */
            x[(size_t)i * cols + (i * 7) % cols] = 30.0f;
            memset(x + (size_t)i * cols + 32, 0, 32 * sizeof(float));
        }
        cr_assert_eq(ckv_matmul(cpu, &w, x, n, yc), 0);
        float *xd = kcuda_up(gpu, x, nx * sizeof(float));
        float *yd = kcuda_alloc(gpu, ny * sizeof(float));
        cr_assert_eq(ckv_matmul(gpu, &wd, xd, n, yd), 0, "%s", ckv_wtype_name(t));
        float *yg = kcuda_down(gpu, yd, ny * sizeof(float));
        for (int i = 0; i < n; i++) {
            const float *xi = x + (size_t)i * cols;
            double amax[64] = {0};
            for (int j = 0; j < cols; j++)
                amax[j / 32] = fmax(amax[j / 32], fabs(xi[j]));
            for (int o = 0; o < rows; o++) {
                const uint8_t *row = (const uint8_t *)w.data + (size_t)o * w.row_bytes;
                double s = 0, sw = 0;
                for (int j = 0; j < cols; j++) {
                    double dq, m;
                    elem_parts(&w, row, j, &dq, &m);
                    if (is_q(t))
                        s += (dq + m) * (fabs(xi[j]) + amax[j / 32] / 127 * 1.01);
                    else
                        s += dq * fabs(xi[j]);
                    sw += dq;
                }
                double tol;
                if (is_q(t))
                    tol = 2 * gamma_k(nb + 8) * s;
                else if (t == CKV_W_F32)
                    tol = 2 * gamma_k(cols) * s;
                else
                    tol = (t == CKV_W_F16 ? 1.0 / 2048 : 1.0 / 256) * s + 2 * gamma_k(cols) * s +
                          sw / 33554432.0;
                size_t k = (size_t)i * rows + o;
                cr_assert(fabs((double)yg[k] - yc[k]) <= tol + 1e-30,
                          "%s %dx%d n=%d [%d,%d]: cuda %.9g cpu %.9g (tol %.3g)", ckv_wtype_name(t),
                          rows, cols, n, i, o, yg[k], yc[k], tol);
            }
        }
        free(yg);
        ckv_dev_free(gpu, yd);
        ckv_dev_free(gpu, xd);
        free(yc);
        free(x);
    }
    ckv_dev_free(gpu, (void *)wd.data);
    free((void *)w.data);
}

/* Row counts not a multiple of the 4 rows a CTA takes; 10 blocks per row (lanes idle) and 36
 * (lanes with two blocks). */
Test(cuda_ops, matmul_quantized)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    check_matmul(gpu, cpu, CKV_W_Q4_1, 37, 320, 1);
    check_matmul(gpu, cpu, CKV_W_Q4_1, 9, 1152, 2);
    check_matmul(gpu, cpu, CKV_W_Q4_0, 37, 320, 3);
    check_matmul(gpu, cpu, CKV_W_Q4_0, 6, 1152, 4);
    check_matmul(gpu, cpu, CKV_W_Q8_0, 37, 320, 5);
    check_matmul(gpu, cpu, CKV_W_Q8_0, 5, 1152, 6);
    ckv_ctx_destroy(&cpu);
    ckv_ctx_destroy(&gpu);
}

Test(cuda_ops, matmul_float)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    check_matmul(gpu, cpu, CKV_W_F32, 23, 200, 7);
    check_matmul(gpu, cpu, CKV_W_F16, 23, 200, 8);
    check_matmul(gpu, cpu, CKV_W_BF16, 23, 200, 9);
    /* cuBLAS takes the row stride in elements: an f16 row stride of odd bytes is refused */
    struct ktest_rng r = {10};
    struct ckv_weight w = random_weight(&r, CKV_W_F16, 4, 32), wd = w;
    wd.row_bytes = 65;
    wd.data = kcuda_up(gpu, w.data, 4 * 65);
    float *xd = kcuda_alloc(gpu, 32 * sizeof(float)), *yd = kcuda_alloc(gpu, 4 * sizeof(float));
    cr_assert_eq(ckv_matmul(gpu, &wd, xd, 1, yd), -EINVAL);
    ckv_dev_free(gpu, yd);
    ckv_dev_free(gpu, xd);
    ckv_dev_free(gpu, (void *)wd.data);
    free((void *)w.data);
    ckv_ctx_destroy(&cpu);
    ckv_ctx_destroy(&gpu);
}

/* Activations that stress the quantization: block maxima that are ties, NaN-free zeros,
 * codes on the grid's half points (ties to even). */
Test(cuda_ops, matmul_quantized_ties_and_zeros)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    struct ktest_rng r = {77};
    int rows = 8, cols = 96, n = 2;
    struct ckv_weight w = random_weight(&r, CKV_W_Q4_1, rows, cols), wd = w;
    wd.data = kcuda_up(gpu, w.data, (size_t)rows * w.row_bytes);
    float x[2 * 96] = {0};
    for (int e = 0; e < 32; e++) /* block 0: max 127, the others on half points */
        x[e] = e ? (float)(e % 2 ? e : -e) * 0.5f : 127.0f;
    for (int e = 64; e < 96; e++)
        x[e] = -1.0f; /* every element the maximum, negative */
    for (int e = 96; e < 192; e++)
        x[e] = 1e-3f * (float)(e - 150);
    float yc[16], *xd = kcuda_up(gpu, x, sizeof(x)), *yd = kcuda_alloc(gpu, sizeof(yc));
    cr_assert_eq(ckv_matmul(cpu, &w, x, n, yc), 0);
    cr_assert_eq(ckv_matmul(gpu, &wd, xd, n, yd), 0);
    float *yg = kcuda_down(gpu, yd, sizeof(yc));
    for (int k = 0; k < rows * n; k++)
        cr_assert(fabsf(yg[k] - yc[k]) <= 1e-5f * (1.0f + fabsf(yc[k])), "[%d] %.9g vs %.9g", k,
                  yg[k], yc[k]);
    free(yg);
    ckv_dev_free(gpu, yd);
    ckv_dev_free(gpu, xd);
    ckv_dev_free(gpu, (void *)wd.data);
    free((void *)w.data);
    ckv_ctx_destroy(&cpu);
    ckv_ctx_destroy(&gpu);
}

Test(cuda_ops, get_rows_bit_equal)
{
    static const enum ckv_wtype types[] = {CKV_W_F32,  CKV_W_F16,  CKV_W_BF16,
                                           CKV_W_Q8_0, CKV_W_Q4_0, CKV_W_Q4_1};
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    struct ktest_rng r = {21};
    int32_t ids[] = {0, 12, 3, 12, 7};
    int n = 5, rows = 13, cols = 96;
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        struct ckv_weight w = random_weight(&r, types[ti], rows, cols), wd = w;
        wd.data = kcuda_up(gpu, w.data, (size_t)rows * w.row_bytes);
        size_t bytes = (size_t)n * cols * sizeof(float);
        float *oc = malloc(bytes), *od = kcuda_alloc(gpu, bytes);
        cr_assert_eq(ckv_get_rows(cpu, &w, ids, n, oc), 0);
        cr_assert_eq(ckv_get_rows(gpu, &wd, ids, n, od), 0);
        float *og = kcuda_down(gpu, od, bytes);
        cr_assert(memcmp(og, oc, bytes) == 0, "%s rows differ", ckv_wtype_name(types[ti]));
        int32_t bad = rows;
        cr_assert_eq(ckv_get_rows(gpu, &wd, &bad, 1, od), -EINVAL);
        free(og);
        free(oc);
        ckv_dev_free(gpu, od);
        ckv_dev_free(gpu, (void *)wd.data);
        free((void *)w.data);
    }
    ckv_ctx_destroy(&cpu);
    ckv_ctx_destroy(&gpu);
}

Test(cuda_ops, rmsnorm)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    static const int dims[] = {576, 1000, 7};
    struct ktest_rng r = {31};
    for (size_t di = 0; di < 3; di++) {
        int n = 3, dim = dims[di];
        size_t ne = (size_t)n * dim;
        float *x = malloc(ne * sizeof(float)), *wt = malloc(dim * sizeof(float));
        float *oc = malloc(ne * sizeof(float));
        ktest_fill_normal(&r, x, ne, 2.0f);
        ktest_fill_normal(&r, wt, dim, 1.0f);
        cr_assert_eq(ckv_rmsnorm(cpu, x, wt, n, dim, 1e-5f, oc), 0);
        float *xd = kcuda_up(gpu, x, ne * sizeof(float)), *wd = kcuda_up(gpu, wt, dim * 4);
        /* in place: out == x */
        cr_assert_eq(ckv_rmsnorm(gpu, xd, wd, n, dim, 1e-5f, xd), 0);
        float *og = kcuda_down(gpu, xd, ne * sizeof(float));
        for (size_t k = 0; k < ne; k++)
            cr_assert(fabsf(og[k] - oc[k]) <= ldexpf(fabsf(oc[k]), -21), "dim %d [%zu] %.9g %.9g",
                      dim, k, og[k], oc[k]);
        free(og);
        ckv_dev_free(gpu, wd);
        ckv_dev_free(gpu, xd);
        free(oc);
        free(wt);
        free(x);
    }
    ckv_ctx_destroy(&cpu);
    ckv_ctx_destroy(&gpu);
}

static void check_rope(ckv_ctx_t *gpu, ckv_ctx_t *cpu, enum ckv_rope_style style, int n_rot,
                       const float *factors, float fscale)
{
    struct ktest_rng r = {41 + (uint64_t)n_rot};
    int n = 4, heads = 3, hd = 64;
    int32_t pos[] = {0, 1, 517, 30000};
    struct ckv_rope_params p = {style, n_rot, 10000.0f, fscale, factors};
    size_t bytes = (size_t)n * heads * hd * sizeof(float);
    float *x = malloc(bytes);
    ktest_fill_normal(&r, x, (size_t)n * heads * hd, 1.0f);
    float *xd = kcuda_up(gpu, x, bytes);
    cr_assert_eq(ckv_rope(cpu, x, n, heads, hd, pos, &p), 0);
    cr_assert_eq(ckv_rope(gpu, xd, n, heads, hd, pos, &p), 0);
    float *xg = kcuda_down(gpu, xd, bytes);
    cr_assert(memcmp(xg, x, bytes) == 0, "rope style %d n_rot %d differs", style, n_rot);
    free(xg);
    ckv_dev_free(gpu, xd);
    free(x);
}

Test(cuda_ops, rope_bit_equal)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    float factors[32];
    for (int i = 0; i < 32; i++)
        factors[i] = 1.0f + 0.25f * (float)i;
    check_rope(gpu, cpu, CKV_ROPE_NORM, 64, NULL, 1.0f);
    check_rope(gpu, cpu, CKV_ROPE_NEOX, 64, NULL, 1.0f);
    check_rope(gpu, cpu, CKV_ROPE_NEOX, 32, NULL, 0.5f);
    check_rope(gpu, cpu, CKV_ROPE_NORM, 48, factors, 1.0f);
    ckv_ctx_destroy(&cpu);
    ckv_ctx_destroy(&gpu);
}

Test(cuda_ops, elementwise)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    struct ktest_rng r = {51};
    int n = 5, dim = 333;
    size_t ne = (size_t)n * dim, bytes = ne * sizeof(float);
    float *a = malloc(bytes), *b = malloc(bytes), *c = malloc(bytes);
    ktest_fill_normal(&r, a, ne, 4.0f);
    ktest_fill_normal(&r, b, ne, 1.0f);
    a[0] = -200.0f; /* exp overflows: silu is -0 */
    a[1] = 90.0f;
    float *ad = kcuda_up(gpu, a, bytes), *bd = kcuda_up(gpu, b, bytes),
          *cd = kcuda_alloc(gpu, bytes);

    cr_assert_eq(ckv_swiglu(cpu, a, b, ne, c), 0);
    cr_assert_eq(ckv_swiglu(gpu, ad, bd, ne, cd), 0);
    float *g = kcuda_down(gpu, cd, bytes);
    for (size_t k = 0; k < ne; k++)
        cr_assert(fabsf(g[k] - c[k]) <= ldexpf(fabsf(c[k]), -20), "swiglu [%zu] %.9g %.9g", k, g[k],
                  c[k]);
    free(g);

    memcpy(c, a, bytes);
    cr_assert_eq(ckv_add(cpu, c, b, ne), 0);
    cr_assert_eq(ckv_add(gpu, ad, bd, ne), 0);
    g = kcuda_down(gpu, ad, bytes);
    cr_assert(memcmp(g, c, bytes) == 0, "add differs");
    free(g);

    cr_assert_eq(ckv_add_bias(cpu, c, b, n, dim), 0);
    cr_assert_eq(ckv_add_bias(gpu, ad, bd, n, dim), 0);
    g = kcuda_down(gpu, ad, bytes);
    cr_assert(memcmp(g, c, bytes) == 0, "add_bias differs");
    free(g);

    ckv_dev_free(gpu, cd);
    ckv_dev_free(gpu, bd);
    ckv_dev_free(gpu, ad);
    free(c);
    free(b);
    free(a);
    ckv_ctx_destroy(&cpu);
    ckv_ctx_destroy(&gpu);
}
