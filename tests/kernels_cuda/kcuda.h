/*
 * Helpers of the CUDA suites (tests/kernels_cuda/test_cuda_*.c): a CUDA context (or the test
 * is skipped: a machine without a GPU runs the CPU backend, STYLE.md rule 11), the CPU
 * context whose results the CUDA ones are compared with, and device buffers.
 *
 * The same suites run in two binaries: build/bin/ckv-tests (the real CUDA backend when the
 * build has it: skipped here, where no GPU exists) and build/bin/ckv-tests-cuda-emu (the
 * backend's sources on the CPU emulation of CUDA, kernels/cuda/emu/), see docs/CUDA.md.
 * Header-only (static), like tests/kernels/ktest.h, whose generators it reuses.
 */
#ifndef KCUDA_H
#define KCUDA_H

#include "../kernels/ktest.h"

/* A context on CUDA device 0; skips the test when there is none. */
static inline ckv_ctx_t *kcuda_ctx(void)
{
    if (!ckv_cuda_available())
        cr_skip_test("no CUDA device: the CUDA backend is tested on a GPU machine or in "
                     "ckv-tests-cuda-emu");
    struct ckv_ctx_opts o = {.backend = CKV_BACKEND_CUDA, .device = 0};
    ckv_ctx_t *ctx = NULL;
    int rc = ckv_ctx_new(&o, &ctx);
    cr_assert_eq(rc, 0, "ckv_ctx_new(cuda): %s", ckv_strerror(rc));
    cr_assert_eq(ckv_ctx_backend(ctx), CKV_BACKEND_CUDA);
    return ctx;
}

/* The CPU context the CUDA results are compared with (best ISA, 2 threads). */
static inline ckv_ctx_t *kcuda_cpu(void)
{
    return ktest_ctx(CKV_ISA_AUTO, 2);
}

/* An uninitialised device buffer of `bytes` (at least 1); free with ckv_dev_free. */
static inline void *kcuda_alloc(ckv_ctx_t *ctx, size_t bytes)
{
    void *p = NULL;
    cr_assert_eq(ckv_dev_alloc(ctx, bytes ? bytes : 1, &p), 0);
    return p;
}

/* A device copy of `bytes` of host memory; free with ckv_dev_free. */
static inline void *kcuda_up(ckv_ctx_t *ctx, const void *host, size_t bytes)
{
    void *p = kcuda_alloc(ctx, bytes);
    if (bytes)
        cr_assert_eq(ckv_copy_h2d(ctx, p, host, bytes), 0);
    return p;
}

/* A host copy of `bytes` of device memory (synchronises); free with free(). */
static inline void *kcuda_down(ckv_ctx_t *ctx, const void *dev, size_t bytes)
{
    void *h = malloc(bytes ? bytes : 1);
    cr_assert(h);
    cr_assert_eq(ckv_copy_d2h(ctx, h, dev, bytes), 0);
    return h;
}

#endif
