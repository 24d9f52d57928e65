/*
 * The CUDA backend's context: device discovery, stream, cuBLAS handle, error handling that
 * poisons the context, device memory and copies, scratch, the status word of device-side
 * argument checks, and dtype conversion.
 *
 * Without a driver (no GPU) cudaGetDeviceCount fails with cudaErrorInsufficientDriver and
 * leaves the count untouched: it starts at 0, so "no device" is what every caller sees. The
 * driver API (libcuda) is never linked: cudart loads it at run time if it exists.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_half.h"
#include "cuda_backend.h"

extern "C" int cuda_available(void)
{
    int n = 0; /* untouched when there is no driver */
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* not sticky: clear it */
        return 0;
    }
    return n > 0;
}

int cuda_fail(struct cuda_backend *cb, cudaError_t err, const char *what, const char *file,
              int line)
{
    if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        LOG_WARN("cuda: %s: out of device memory (%s:%d)", what, file, line);
        return -ENOMEM;
    }
    LOG_ERROR("cuda:%d: %s failed: %s (%d) at %s:%d; context poisoned", cb ? cb->device : -1, what,
              cudaGetErrorString(err), (int)err, file, line);
    if (cb)
        cb->poisoned = 1;
    return -EIO;
}

int cuda_fail_cublas(struct cuda_backend *cb, int status, const char *what, const char *file,
                     int line)
{
    if (status == (int)CUBLAS_STATUS_ALLOC_FAILED) {
        LOG_WARN("cuda: %s: cuBLAS could not allocate (%s:%d)", what, file, line);
        return -ENOMEM;
    }
    LOG_ERROR("cuda:%d: %s failed: cuBLAS status %d at %s:%d; context poisoned",
              cb ? cb->device : -1, what, status, file, line);
    if (cb)
        cb->poisoned = 1;
    return -EIO;
}

int cuda_enter(struct ckv_ctx *ctx, struct cuda_backend **cbp)
{
    struct cuda_backend *cb = ctx->cuda;
    *cbp = cb;
    if (cb->poisoned)
        return -EIO;
    CUDA_CHECK(cb, cudaSetDevice(cb->device));
    return 0;
}

/* Releases what init acquired; every field may be unset. */
static void backend_release(struct cuda_backend *cb)
{
    if (cb->stream)
        cudaStreamSynchronize(cb->stream); /* errors here are moot: we are tearing down */
    if (cb->cublas)
        cublasDestroy(cb->cublas);
    if (cb->scratch)
        cudaFree(cb->scratch);
    if (cb->status_dev)
        cudaFree(cb->status_dev);
    if (cb->status_host)
        cudaFreeHost(cb->status_host);
    if (cb->stream)
        cudaStreamDestroy(cb->stream);
    cudaGetLastError();
    free(cb);
}

extern "C" int cuda_backend_init(struct ckv_ctx *ctx, const struct ckv_ctx_opts *opts)
{
    if (opts->device < 0)
        return -EINVAL;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0 || opts->device >= n) {
        cudaGetLastError();
        LOG_INFO("cuda: no device %d (%d visible)", opts->device, n);
        return CKV_ENODEVICE;
    }
    struct cuda_backend *cb = (struct cuda_backend *)calloc(1, sizeof(*cb));
    if (!cb)
        return -ENOMEM;
    cb->device = opts->device;
    int rc = 0;
    cudaDeviceProp prop;
    cudaError_t err = cudaSetDevice(cb->device);
    if (err == cudaSuccess)
        err = cudaGetDeviceProperties(&prop, cb->device);
    if (err == cudaSuccess)
        err = cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking);
    if (err == cudaSuccess)
        err = cudaMalloc((void **)&cb->status_dev, sizeof(struct cuda_status));
    if (err == cudaSuccess)
        err = cudaMallocHost((void **)&cb->status_host, sizeof(struct cuda_status));
    if (err != cudaSuccess) {
        rc = cuda_fail(NULL, err, "device setup", __FILE__, __LINE__);
        goto err_release;
    }
    if (cublasCreate(&cb->cublas) != CUBLAS_STATUS_SUCCESS) {
        cb->cublas = NULL;
        rc = -ENOMEM; /* cuBLAS fails to create only for lack of resources */
        goto err_release;
    }
    /* plain f32 products (no TF32): k-means assignments are compared with the CPU's */
    if (cublasSetStream(cb->cublas, cb->stream) != CUBLAS_STATUS_SUCCESS ||
        cublasSetMathMode(cb->cublas, CUBLAS_DEFAULT_MATH) != CUBLAS_STATUS_SUCCESS) {
        rc = -EIO;
        goto err_release;
    }
    cb->n_sm = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    memcpy(cb->name, prop.name, sizeof(cb->name) - 1);
    ctx->cuda = cb;
    /* "cuda:0 NVIDIA H100 80GB HBM3 (132 SMs, cc 9.0)", the name cut to fit */
    snprintf(ctx->describe, sizeof(ctx->describe), "cuda:%d %.80s (%d SMs, cc %d.%d)", cb->device,
             cb->name, cb->n_sm, prop.major, prop.minor);
    return 0;
err_release:
    backend_release(cb);
    return rc;
}

extern "C" void cuda_backend_fini(struct ckv_ctx *ctx)
{
    if (!ctx->cuda)
        return;
    cudaSetDevice(ctx->cuda->device);
    backend_release(ctx->cuda);
    ctx->cuda = NULL;
}

extern "C" int cuda_sync(struct ckv_ctx *ctx)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    return 0;
}

/* ---- memory ---- */

extern "C" int cuda_dev_alloc(struct ckv_ctx *ctx, size_t bytes, void **ptr)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    void *p = NULL;
    CUDA_CHECK(cb, cudaMalloc(&p, bytes)); /* 256-byte aligned */
    *ptr = p;
    return 0;
}

extern "C" void cuda_dev_free(struct ckv_ctx *ctx, void *ptr)
{
    struct cuda_backend *cb = ctx->cuda;
    cudaSetDevice(cb->device);
    cudaError_t err = cudaFree(ptr); /* waits for the device: no queued kernel still uses it */
    if (err != cudaSuccess)
        cuda_fail(cb, err, "cudaFree", __FILE__, __LINE__);
}

extern "C" int cuda_copy_h2d(struct ckv_ctx *ctx, void *dst, const void *src, size_t bytes)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    /* from pageable memory the call returns once src has been staged: the caller may reuse it */
    CUDA_CHECK(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cb->stream));
    return 0;
}

extern "C" int cuda_copy_d2h(struct ckv_ctx *ctx, void *dst, const void *src, size_t bytes)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    CUDA_CHECK(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cb->stream));
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    return 0;
}

extern "C" int cuda_copy_d2d(struct ckv_ctx *ctx, void *dst, const void *src, size_t bytes)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    CUDA_CHECK(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cb->stream));
    return 0;
}

/* ---- scratch and status ---- */

int cuda_scratch(struct cuda_backend *cb, size_t bytes, void **p)
{
    if (bytes > cb->scratch_bytes) {
        size_t want = bytes + bytes / 2; /* grow with headroom: fewer frees that wait */
        if (cb->scratch) {
            CUDA_CHECK(cb, cudaFree(cb->scratch));
            cb->scratch = NULL;
            cb->scratch_bytes = 0;
        }
        void *s = NULL;
        if (cudaMalloc(&s, want) != cudaSuccess) {
            cudaGetLastError();
            CUDA_CHECK(cb, cudaMalloc(&s, bytes)); /* no headroom, then -ENOMEM */
            want = bytes;
        }
        cb->scratch = s;
        cb->scratch_bytes = want;
    }
    *p = cb->scratch;
    return 0;
}

int cuda_status_reset(struct cuda_backend *cb)
{
    CUDA_CHECK(cb, cudaMemsetAsync(cb->status_dev, 0, sizeof(struct cuda_status), cb->stream));
    return 0;
}

int cuda_status_read(struct cuda_backend *cb, struct cuda_status *out)
{
    CUDA_CHECK(cb, cudaMemcpyAsync(cb->status_host, cb->status_dev, sizeof(struct cuda_status),
                                   cudaMemcpyDeviceToHost, cb->stream));
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    *out = *cb->status_host;
    return 0;
}

/* ---- conversion ---- */

static __global__ void convert_f16_to_f32(const uint16_t *__restrict__ src, float *__restrict__ dst,
                                          size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = ckv_half_to_f32(src[i]);
}

/* The shared scalar rounding (ckv_half.h): bit-equal to the CPU, NaN payloads included. */
static __global__ void convert_f32_to_f16(const float *__restrict__ src, uint16_t *__restrict__ dst,
                                          size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = ckv_half_from_f32(src[i]);
}

extern "C" int cuda_convert(struct ckv_ctx *ctx, void *dst, enum ckv_dtype dst_dt, const void *src,
                            enum ckv_dtype src_dt, size_t n)
{
    struct cuda_backend *cb;
    int rc = cuda_enter(ctx, &cb);
    if (rc)
        return rc;
    if (dst_dt == src_dt) {
        CUDA_CHECK(cb, cudaMemcpyAsync(dst, src, n * cuda_dtype_size(src_dt),
                                       cudaMemcpyDeviceToDevice, cb->stream));
        return 0;
    }
    /* grid-stride: a few waves of blocks whatever n is */
    size_t blocks = cuda_blocks(n, 256);
    size_t most = (size_t)cb->n_sm * 8;
    unsigned grid = (unsigned)(blocks < most ? blocks : most);
    if (src_dt == CKV_DTYPE_F16)
        CUDA_LAUNCH(convert_f16_to_f32, grid, 256, cb->stream, (const uint16_t *)src, (float *)dst,
                    n);
    else
        CUDA_LAUNCH(convert_f32_to_f16, grid, 256, cb->stream, (const float *)src, (uint16_t *)dst,
                    n);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}
