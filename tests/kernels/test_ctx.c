/*
 * Suite "kernels_ctx": contexts, ISA dispatch, device memory, copies and dtype conversion of
 * the CPU backend.
 *
 * Tolerance: conversions are exact (f16 -> f32 for all 65536 halves; f32 -> f16 bit-equal to
 * the scalar ckv_half_from_f32, round to nearest even, on random and special values).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ktest.h"

Test(kernels_ctx, create_describe_destroy)
{
    enum ckv_cpu_isa isas[3];
    int n = ktest_isas(isas);
    for (int i = 0; i < n; i++) {
        ckv_ctx_t *ctx = ktest_ctx(isas[i], 2);
        cr_assert_eq(ckv_ctx_backend(ctx), CKV_BACKEND_CPU);
        cr_assert_eq(ckv_ctx_cpu_isa(ctx), isas[i]);
        cr_assert_eq(ckv_ctx_n_threads(ctx), 2);
        char want[64];
        snprintf(want, sizeof(want), "cpu %s 2 threads", ckv_cpu_isa_name(isas[i]));
        cr_assert_str_eq(ckv_ctx_describe(ctx), want);
        cr_assert_eq(ckv_ctx_sync(ctx), 0);
        ckv_ctx_destroy(&ctx);
        cr_assert_null(ctx);
    }
    ckv_ctx_destroy(NULL); /* harmless */
    ckv_ctx_t *none = NULL;
    ckv_ctx_destroy(&none);
}

Test(kernels_ctx, auto_threads_and_isa)
{
    struct ckv_ctx_opts o = {.backend = CKV_BACKEND_CPU};
    ckv_ctx_t *ctx = NULL;
    cr_assert_eq(ckv_ctx_new(&o, &ctx), 0);
    cr_assert_geq(ckv_ctx_n_threads(ctx), 1);
    enum ckv_cpu_isa isa = ckv_ctx_cpu_isa(ctx);
    cr_assert(isa >= CKV_ISA_PORTABLE && isa <= CKV_ISA_AVX512);
    cr_assert(ckv_cpu_isa_supported(isa));
    if (!getenv("CKV_CPU_ISA")) /* AUTO takes the best the CPU has */
        cr_assert_eq(isa, ckv_cpu_isa_supported(CKV_ISA_AVX512) ? CKV_ISA_AVX512
                          : ckv_cpu_isa_supported(CKV_ISA_AVX2) ? CKV_ISA_AVX2
                                                                : CKV_ISA_PORTABLE);
    ckv_ctx_destroy(&ctx);
}

Test(kernels_ctx, env_override)
{
    /* Criterion runs each test in its own process: setenv stays here */
    struct ckv_ctx_opts o = {.backend = CKV_BACKEND_CPU, .n_threads = 1};
    ckv_ctx_t *ctx = NULL;
    setenv("CKV_CPU_ISA", "portable", 1);
    cr_assert_eq(ckv_ctx_new(&o, &ctx), 0);
    cr_assert_eq(ckv_ctx_cpu_isa(ctx), CKV_ISA_PORTABLE);
    ckv_ctx_destroy(&ctx);
    /* an explicit ISA wins over the variable */
    o.isa = CKV_ISA_PORTABLE;
    setenv("CKV_CPU_ISA", "avx512", 1);
    cr_assert_eq(ckv_ctx_new(&o, &ctx), 0);
    cr_assert_eq(ckv_ctx_cpu_isa(ctx), CKV_ISA_PORTABLE);
    ckv_ctx_destroy(&ctx);
    o.isa = CKV_ISA_AUTO;
    setenv("CKV_CPU_ISA", "sse9", 1);
    cr_assert_eq(ckv_ctx_new(&o, &ctx), -EINVAL);
    cr_assert_null(ctx);
    unsetenv("CKV_CPU_ISA");
}

Test(kernels_ctx, bad_options)
{
    ckv_ctx_t *ctx = NULL;
    struct ckv_ctx_opts o = {.backend = CKV_BACKEND_CUDA};
    cr_assert_eq(ckv_ctx_new(&o, &ctx), CKV_ENODEVICE);
    cr_assert_eq(ckv_cuda_available(), 0);
    o = (struct ckv_ctx_opts){.backend = (enum ckv_backend_kind)7};
    cr_assert_eq(ckv_ctx_new(&o, &ctx), -EINVAL);
    o = (struct ckv_ctx_opts){.backend = CKV_BACKEND_CPU, .n_threads = -1};
    cr_assert_eq(ckv_ctx_new(&o, &ctx), -EINVAL);
    o = (struct ckv_ctx_opts){.backend = CKV_BACKEND_CPU, .isa = (enum ckv_cpu_isa)9};
    cr_assert_eq(ckv_ctx_new(&o, &ctx), -EINVAL);
    cr_assert_eq(ckv_ctx_new(NULL, &ctx), -EINVAL);
    cr_assert_null(ctx);
    /* an ISA the CPU lacks is -ENOTSUP (only checkable on such a CPU) */
    for (int i = CKV_ISA_AVX2; i <= CKV_ISA_AVX512; i++)
        if (!ckv_cpu_isa_supported((enum ckv_cpu_isa)i)) {
            o = (struct ckv_ctx_opts){.backend = CKV_BACKEND_CPU, .isa = (enum ckv_cpu_isa)i};
            cr_assert_eq(ckv_ctx_new(&o, &ctx), -ENOTSUP);
        }
}

Test(kernels_ctx, memory_and_copies)
{
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_PORTABLE, 1);
    void *a = NULL, *b = NULL, *big = NULL;
    cr_assert_eq(ckv_dev_alloc(ctx, 1000, &a), 0);
    cr_assert_eq(ckv_dev_alloc(ctx, 1000, &b), 0);
    cr_assert_eq((uintptr_t)a % 64, 0);
    cr_assert_eq(ckv_dev_alloc(ctx, 5u << 20, &big), 0); /* large: huge-page aligned */
    cr_assert_eq((uintptr_t)big % (2u << 20), 0);
    memset(big, 7, 5u << 20);
    char host[1000], back[1000];
    for (int i = 0; i < 1000; i++)
        host[i] = (char)(i * 7);
    cr_assert_eq(ckv_copy_h2d(ctx, a, host, sizeof(host)), 0);
    cr_assert_eq(ckv_copy_d2d(ctx, b, a, sizeof(host)), 0);
    cr_assert_eq(ckv_copy_d2h(ctx, back, b, sizeof(back)), 0);
    cr_assert_arr_eq(back, host, sizeof(host));
    cr_assert_eq(ckv_copy_d2h(ctx, back, NULL, 0), 0); /* nothing to copy */
    cr_assert_eq(ckv_copy_d2h(ctx, back, NULL, 4), -EINVAL);
    void *z = (void *)1;
    cr_assert_eq(ckv_dev_alloc(ctx, 0, &z), -EINVAL);
    cr_assert_eq(ckv_dev_alloc(NULL, 10, &z), -EINVAL);
    ckv_dev_free(ctx, a);
    ckv_dev_free(ctx, b);
    ckv_dev_free(ctx, big);
    ckv_dev_free(ctx, NULL);
    ckv_ctx_destroy(&ctx);
}

Test(kernels_ctx, sizes)
{
    cr_assert_eq(ckv_dtype_size(CKV_DTYPE_F32), 4);
    cr_assert_eq(ckv_dtype_size(CKV_DTYPE_F16), 2);
    cr_assert_eq(ckv_block_bytes(128, CKV_DTYPE_F16), 8192);
    cr_assert_eq(ckv_block_bytes(64, CKV_DTYPE_F16), 4096);
    cr_assert_eq(ckv_block_bytes(64, CKV_DTYPE_F32), 8192);
    cr_assert_str_eq(ckv_dtype_name(CKV_DTYPE_F16), "f16");
}

/* The scalar conversion against values whose halves are known. */
Test(kernels_ctx, half_scalar_known_values)
{
    struct {
        float f;
        uint16_t h;
    } known[] = {
        {0.0f, 0x0000},
        {-0.0f, 0x8000},
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {65504.0f, 0x7bff},
        {65520.0f, 0x7c00},
        {1e10f, 0x7c00},
        {-INFINITY, 0xfc00},
        {0x1p-14f, 0x0400},
        {0x1p-24f, 0x0001},
        {0x1p-25f, 0x0000},
        {0x1.8p-25f, 0x0001},
        {1.0009765625f, 0x3c01},  /* exactly 1 + 2^-10 */
        {1.00048828125f, 0x3c00}, /* halfway between 1 and 1+2^-10: to even (1.0) */
        {1.00146484375f, 0x3c02}, /* halfway between 1+2^-10 and 1+2^-9: to even */
        {0.333251953125f, 0x3555},
    };
    for (size_t i = 0; i < CKV_ARRAY_LEN(known); i++) {
        cr_assert_eq(ckv_half_from_f32(known[i].f), known[i].h, "f=%a: got 0x%04x want 0x%04x",
                     (double)known[i].f, ckv_half_from_f32(known[i].f), known[i].h);
        if ((known[i].h & 0x7c00) != 0x7c00 || !(known[i].h & 0x3ff))
            cr_assert_eq(ckv_half_to_f32(ckv_half_from_f32(known[i].f)),
                         ckv_half_to_f32(known[i].h));
    }
    cr_assert(isnan(ckv_half_to_f32(ckv_half_from_f32(NAN))));
    /* every half survives a round trip */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = ckv_half_to_f32((uint16_t)h);
        if (isnan(f))
            continue;
        cr_assert_eq(ckv_half_from_f32(f), h, "half 0x%04x", h);
    }
}

/* Every ISA's bulk conversion, through ckv_convert, bit-equal to the scalar one. */
Test(kernels_ctx, convert_all_isas)
{
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    const size_t n = 65536 + 1000 + 13; /* all halves, then random floats, odd tail */
    uint16_t *h = malloc(n * 2), *h2 = malloc(n * 2);
    float *f = malloc(n * 4), *f2 = malloc(n * 4);
    struct ktest_rng rng = {42};
    for (size_t i = 0; i < n; i++)
        h[i] = i < 65536 ? (uint16_t)i : (uint16_t)ktest_next(&rng);
    for (size_t i = 0; i < n; i++) {
        float x = ktest_normal(&rng) * (i % 3 == 0 ? 1e-5f : i % 3 == 1 ? 1.0f : 3e4f);
        f[i] = x;
    }
    f[5] = NAN, f[6] = INFINITY, f[7] = -0.0f, f[8] = 70000.0f, f[9] = 65519.0f;
    for (int k = 0; k < n_isa; k++) {
        ckv_ctx_t *ctx = ktest_ctx(isas[k], 2);
        cr_assert_eq(ckv_convert(ctx, f2, CKV_DTYPE_F32, h, CKV_DTYPE_F16, n), 0);
        for (size_t i = 0; i < n; i++) {
            float want = ckv_half_to_f32(h[i]);
            if (isnan(want))
                cr_assert(isnan(f2[i]));
            else
                cr_assert_eq(f2[i], want, "%s: half 0x%04x", ckv_cpu_isa_name(isas[k]), h[i]);
        }
        cr_assert_eq(ckv_convert(ctx, h2, CKV_DTYPE_F16, f, CKV_DTYPE_F32, n), 0);
        for (size_t i = 0; i < n; i++)
            cr_assert_eq(h2[i], ckv_half_from_f32(f[i]), "%s: f=%a", ckv_cpu_isa_name(isas[k]),
                         (double)f[i]);
        cr_assert_eq(ckv_convert(ctx, f2, CKV_DTYPE_F32, f, CKV_DTYPE_F32, 100), 0);
        cr_assert_arr_eq(f2, f, 100 * sizeof(float));
        cr_assert_eq(ckv_convert(ctx, f2, CKV_DTYPE_F32, NULL, CKV_DTYPE_F16, 4), -EINVAL);
        cr_assert_eq(ckv_convert(ctx, f2, (enum ckv_dtype)5, h, CKV_DTYPE_F16, 4), -EINVAL);
        cr_assert_eq(ckv_convert(ctx, f2, CKV_DTYPE_F32, h, CKV_DTYPE_F16, 0), 0);
        ckv_ctx_destroy(&ctx);
    }
    free(h), free(h2), free(f), free(f2);
}
