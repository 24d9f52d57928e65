/*
 * Suite "cuda_ctx": CUDA contexts, device memory, copies and dtype conversion.
 *
 * What runs on a machine without a GPU (this one): asking for a CUDA context is
 * CKV_ENODEVICE, cleanly (no context, nothing leaked, a CPU context still works), in a CUDA
 * build (the runtime finds no driver) and in a CPU-only build alike. The rest needs a device
 * (a GPU, or the emulation in ckv-tests-cuda-emu) and is skipped otherwise.
 * Tolerance: conversions are exact, bit-equal to the scalar ckv_half.h (NaN payloads too).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kcuda.h"

Test(cuda_ctx, no_device_is_a_clean_enodevice)
{
    ckv_ctx_t *ctx = NULL;
    struct ckv_ctx_opts o = {.backend = CKV_BACKEND_CUDA, .device = 0};
    if (!ckv_cuda_available()) {
        cr_assert_eq(ckv_ctx_new(&o, &ctx), CKV_ENODEVICE);
        cr_assert_null(ctx);
        cr_assert_eq(ckv_cuda_available(), 0); /* asking twice is fine */
    } else { /* a device exists: only a missing ordinal is CKV_ENODEVICE */
        o.device = 4096;
        cr_assert_eq(ckv_ctx_new(&o, &ctx), CKV_ENODEVICE);
        cr_assert_null(ctx);
    }
    o.device = -1;
    int rc = ckv_ctx_new(&o, &ctx);
    cr_assert(rc == -EINVAL || rc == CKV_ENODEVICE, "negative ordinal: %d", rc);
    cr_assert_null(ctx);
    /* the CPU backend is unaffected */
    ckv_ctx_t *cpu = kcuda_cpu();
    float x = 1.5f, y = 0;
    cr_assert_eq(ckv_copy_d2d(cpu, &y, &x, sizeof(x)), 0);
    cr_assert_eq(y, 1.5f);
    ckv_ctx_destroy(&cpu);
}

Test(cuda_ctx, create_describe_destroy)
{
    ckv_ctx_t *ctx = kcuda_ctx();
    cr_assert(strncmp(ckv_ctx_describe(ctx), "cuda:0 ", 7) == 0, "%s", ckv_ctx_describe(ctx));
    cr_assert_eq(ckv_ctx_cpu_isa(ctx), CKV_ISA_AUTO);
    cr_assert_eq(ckv_ctx_n_threads(ctx), 0);
    cr_assert_eq(ckv_ctx_sync(ctx), 0);
    ckv_ctx_destroy(&ctx);
    cr_assert_null(ctx);
}

Test(cuda_ctx, memory_and_copies)
{
    ckv_ctx_t *ctx = kcuda_ctx();
    void *a = NULL, *b = NULL;
    cr_assert_eq(ckv_dev_alloc(ctx, 1000, &a), 0);
    cr_assert_eq(ckv_dev_alloc(ctx, 1000, &b), 0);
    cr_assert_eq((uintptr_t)a % 256, 0);
    char host[1000], back[1000];
    for (int i = 0; i < 1000; i++)
        host[i] = (char)(i * 7);
    cr_assert_eq(ckv_copy_h2d(ctx, a, host, sizeof(host)), 0);
    cr_assert_eq(ckv_copy_d2d(ctx, b, a, sizeof(host)), 0);
    cr_assert_eq(ckv_copy_d2h(ctx, back, b, sizeof(back)), 0);
    cr_assert_arr_eq(back, host, sizeof(host));
    cr_assert_eq(ckv_copy_d2h(ctx, back, NULL, 0), 0);
    cr_assert_eq(ckv_copy_d2h(ctx, back, NULL, 4), -EINVAL);
    void *z = (void *)1;
    cr_assert_eq(ckv_dev_alloc(ctx, 0, &z), -EINVAL);
    ckv_dev_free(ctx, a);
    ckv_dev_free(ctx, b);
    ckv_dev_free(ctx, NULL);
    cr_assert_eq(ckv_ctx_sync(ctx), 0);
    ckv_ctx_destroy(&ctx);
}

Test(cuda_ctx, convert_is_bit_equal_to_the_scalar_one)
{
    ckv_ctx_t *ctx = kcuda_ctx();
    const size_t n = 65536 + 1000 + 13; /* all halves, then random floats, odd tail */
    uint16_t *h = malloc(n * 2);
    float *f = malloc(n * 4);
    struct ktest_rng rng = {42};
    for (size_t i = 0; i < n; i++) {
        h[i] = i < 65536 ? (uint16_t)i : (uint16_t)ktest_next(&rng);
        f[i] = ktest_normal(&rng) * (i % 3 == 0 ? 1e-5f : i % 3 == 1 ? 1.0f : 3e4f);
    }
    f[5] = NAN, f[6] = INFINITY, f[7] = -0.0f, f[8] = 70000.0f, f[9] = 65519.0f;
    f[10] = -NAN, f[11] = 0x1p-25f, f[12] = 0x1.8p-25f;
    uint16_t *dh = kcuda_up(ctx, h, n * 2), *dh2 = kcuda_alloc(ctx, n * 2);
    float *df = kcuda_up(ctx, f, n * 4), *df2 = kcuda_alloc(ctx, n * 4);
    cr_assert_eq(ckv_convert(ctx, df2, CKV_DTYPE_F32, dh, CKV_DTYPE_F16, n), 0);
    cr_assert_eq(ckv_convert(ctx, dh2, CKV_DTYPE_F16, df, CKV_DTYPE_F32, n), 0);
    float *f2 = kcuda_down(ctx, df2, n * 4);
    uint16_t *h2 = kcuda_down(ctx, dh2, n * 2);
    for (size_t i = 0; i < n; i++) {
        float want = ckv_half_to_f32(h[i]);
        cr_assert(memcmp(&f2[i], &want, 4) == 0, "half 0x%04x -> %a, want %a", h[i], (double)f2[i],
                  (double)want);
        cr_assert_eq(h2[i], ckv_half_from_f32(f[i]), "f=%a", (double)f[i]);
    }
    /* equal dtypes copy */
    cr_assert_eq(ckv_convert(ctx, df2, CKV_DTYPE_F32, df, CKV_DTYPE_F32, 100), 0);
    float *f3 = kcuda_down(ctx, df2, 100 * 4);
    cr_assert_arr_eq(f3, f, 100 * 4);
    cr_assert_eq(ckv_convert(ctx, df2, CKV_DTYPE_F32, NULL, CKV_DTYPE_F16, 4), -EINVAL);
    ckv_dev_free(ctx, dh), ckv_dev_free(ctx, dh2), ckv_dev_free(ctx, df), ckv_dev_free(ctx, df2);
    free(h), free(f), free(f2), free(h2), free(f3);
    ckv_ctx_destroy(&ctx);
}

/* A CUDA error poisons the context: the failing call and every later one return -EIO, and the
 * context is still destroyed cleanly. Only the emulation can make a launch fail on purpose
 * (CKV_CUDA_EMU_FAIL_LAUNCH, kernels/cuda/emu/cuda_emu.h); skipped on a GPU. */
Test(cuda_ctx, a_cuda_error_poisons_the_context)
{
    ckv_ctx_t *ctx = kcuda_ctx();
    if (!strstr(ckv_ctx_describe(ctx), "cuda_emu"))
        cr_skip_test("needs the emulation to make a launch fail");
    float f[64] = {0};
    float *df = kcuda_up(ctx, f, sizeof(f));
    uint16_t *dh = kcuda_alloc(ctx, sizeof(f) / 2);
    cr_assert_eq(ckv_convert(ctx, dh, CKV_DTYPE_F16, df, CKV_DTYPE_F32, 64), 0);
    setenv("CKV_CUDA_EMU_FAIL_LAUNCH", "1", 1);
    cr_assert_eq(ckv_convert(ctx, dh, CKV_DTYPE_F16, df, CKV_DTYPE_F32, 64), -EIO);
    unsetenv("CKV_CUDA_EMU_FAIL_LAUNCH");
    cr_assert_eq(ckv_convert(ctx, dh, CKV_DTYPE_F16, df, CKV_DTYPE_F32, 64), -EIO);
    cr_assert_eq(ckv_ctx_sync(ctx), -EIO);
    cr_assert_eq(ckv_copy_h2d(ctx, df, f, sizeof(f)), -EIO);
    void *p = NULL;
    cr_assert_eq(ckv_dev_alloc(ctx, 64, &p), -EIO);
    ckv_dev_free(ctx, df);
    ckv_dev_free(ctx, dh);
    ckv_ctx_destroy(&ctx);
    cr_assert_null(ctx);
    /* a new context works */
    ctx = kcuda_ctx();
    cr_assert_eq(ckv_ctx_sync(ctx), 0);
    ckv_ctx_destroy(&ctx);
}
