/*
 * Helpers of the kernel suites (tests/kernels/test_*.c): which ISAs to test, contexts, random
 * inputs, comparisons. Header-only (static), so each suite stays one file.
 *
 * ISAs: every kernel test runs on each ISA this CPU supports, capped by CKV_CPU_ISA when it is
 * set (so `CKV_CPU_ISA=portable valgrind build/bin/ckv-tests --filter 'kernels*'` never
 * executes an AVX-512 instruction).
 */
#ifndef KTEST_H
#define KTEST_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_half.h"
#include "ckv_ref.h"
#include "kernels.h"

/* Fills out with the ISAs to test; returns how many (portable is always one). */
static inline int ktest_isas(enum ckv_cpu_isa out[3])
{
    enum ckv_cpu_isa cap = CKV_ISA_AVX512;
    const char *env = getenv("CKV_CPU_ISA");
    if (env && strcmp(env, "portable") == 0)
        cap = CKV_ISA_PORTABLE;
    else if (env && strcmp(env, "avx2") == 0)
        cap = CKV_ISA_AVX2;
    int n = 0;
    for (int i = CKV_ISA_PORTABLE; i <= (int)cap; i++)
        if (ckv_cpu_isa_supported((enum ckv_cpu_isa)i))
            out[n++] = (enum ckv_cpu_isa)i;
    return n;
}

static inline ckv_ctx_t *ktest_ctx(enum ckv_cpu_isa isa, int n_threads)
{
    struct ckv_ctx_opts o = {.backend = CKV_BACKEND_CPU, .n_threads = n_threads, .isa = isa};
    ckv_ctx_t *ctx = NULL;
    int rc = ckv_ctx_new(&o, &ctx);
    cr_assert_eq(rc, 0, "ckv_ctx_new(%s, %d threads): %d", ckv_cpu_isa_name(isa), n_threads, rc);
    return ctx;
}

/* Calls fn(ctx, arg) on a context of each ISA to test, with 1 and then 2 threads. */
static inline void ktest_each_ctx(void (*fn)(ckv_ctx_t *ctx, const void *arg), const void *arg)
{
    enum ckv_cpu_isa isas[3];
    int n = ktest_isas(isas);
    for (int i = 0; i < n; i++)
        for (int threads = 1; threads <= 2; threads++) {
            ckv_ctx_t *ctx = ktest_ctx(isas[i], threads);
            fn(ctx, arg);
            ckv_ctx_destroy(&ctx);
        }
}

/* A small deterministic generator (xorshift64*), one per test. */
struct ktest_rng {
    uint64_t s;
};

static inline uint64_t ktest_next(struct ktest_rng *r)
{
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 2685821657736338717ull;
}

static inline float ktest_uniform(struct ktest_rng *r) /* [0, 1) */
{
    return (float)(ktest_next(r) >> 40) * (1.0f / 16777216.0f);
}

static inline float ktest_normal(struct ktest_rng *r)
{
    float u = ktest_uniform(r) + 1e-7f, v = ktest_uniform(r);
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static inline int ktest_int(struct ktest_rng *r, int lo, int hi) /* [lo, hi] */
{
    return lo + (int)(ktest_next(r) % (uint64_t)(hi - lo + 1));
}

static inline void ktest_fill_normal(struct ktest_rng *r, float *x, size_t n, float sd)
{
    for (size_t i = 0; i < n; i++)
        x[i] = sd * ktest_normal(r);
}

/* Random values as an array of dtype dt (f16 values are rounded f32 normals). Caller frees. */
static inline void *ktest_random_kv(struct ktest_rng *r, size_t n, enum ckv_dtype dt, float sd)
{
    void *p = malloc(n * ckv_dtype_size(dt) + 64);
    cr_assert(p);
    for (size_t i = 0; i < n; i++) {
        float x = sd * ktest_normal(r);
        if (dt == CKV_DTYPE_F16)
            ((uint16_t *)p)[i] = ckv_half_from_f32(x);
        else
            ((float *)p)[i] = x;
    }
    return p;
}

/* max |a - b| over n, and max |b| (the scale of the tolerance). */
static inline float ktest_max_abs_diff(const float *a, const float *b, size_t n, float *max_b)
{
    float m = 0, mb = 0;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m)) /* NaN counts as a difference */
            m = isnan(d) ? INFINITY : d;
        if (fabsf(b[i]) > mb)
            mb = fabsf(b[i]);
    }
    if (max_b)
        *max_b = mb;
    return m;
}

#endif
