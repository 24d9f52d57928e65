/*
 * A CPU emulation of the part of CUDA the backend uses, so that the backend's own sources
 * (kernels/cuda/cuda_*.cu, built as C++ with CKV_CUDA_EMU) run on a machine without a GPU: the
 * test binary ckv-tests-cuda-emu runs the CUDA suites (tests/kernels_cuda/) through it.
 *
 * Execution model: a launch runs its blocks one after the other; each thread of a block is a
 * fiber with its own stack (a 64-bit x86 context switch, cuda_emu.cc). A fiber runs until it
 * reaches __syncthreads() or a warp shuffle, or returns. __syncthreads() releases when every
 * thread of the block waits there; a shuffle when all 32 lanes of the warp wait at a shuffle.
 * Anything else (a lane that returned or waits at __syncthreads while its warp shuffles, a
 * thread that returned while the others wait at __syncthreads) is reported as a divergence
 * and aborts: on a GPU it is undefined behaviour or a hang.
 *
 * What it checks: indexing, reductions, barriers, the online softmax and every other piece
 * of the kernels' logic, on the same inputs as the GPU tests, against the CPU backend. What
 * it cannot check: the memory model between blocks (blocks run in sequence, so a race
 * between blocks cannot show), timing, launch limits and resource use of real hardware,
 * floating-point differences of the GPU's math library (expf, logf here are glibc's), and
 * CUB and cuBLAS themselves (a sort and plain SGEMM / GemmEx loops stand in). Device memory is host
 * memory; a stream runs everything at once, in order.
 *
 * Only what the backend calls is here; extend it alongside the backend.
 */
#ifndef CUDA_EMU_H
#define CUDA_EMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>

#include "ckv_half.h"

/* ---- qualifiers ---- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
/* a block's shared variables: one instance, blocks run one at a time */
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_)
    {
    }
};
struct uint2 {
    unsigned x, y;
};
struct float2 {
    float x, y;
};

/* ---- runtime ---- */
enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevice = 101,
    cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
};
#define cudaStreamNonBlocking 0x01
typedef struct emu_stream *cudaStream_t;
struct cudaDeviceProp {
    char name[256];
    int multiProcessorCount;
    int major, minor;
};

cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int dev);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaMalloc(void **p, size_t bytes);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocHost(void **p, size_t bytes);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t s);
cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t s);
cudaError_t cudaGetLastError(void);
const char *cudaGetErrorString(cudaError_t err);

/* ---- cuBLAS ---- */
typedef struct emu_cublas *cublasHandle_t;
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0 } cublasMath_t;
cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
/* Column-major C = alpha op(A) op(B) + beta C, in f32, one plain loop per element. */
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float *alpha, const float *A, int lda,
                           const float *B, int ldb, const float *beta, float *C, int ldc);

/* Mixed-type products (cuda_ops.cu): A and B f32, f16 or bf16 (the same type), C f32,
 * compute f32; the values of cuBLAS's enums. */
typedef enum { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 } cudaDataType_t;
typedef enum { CUBLAS_COMPUTE_32F = 68 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
/* Column-major C = alpha op(A) op(B) + beta C: each element converted to f32, f32 sums in
 * order, one plain loop per element (cuBLAS's own order and tensor-core rounding are not
 * emulated). */
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType_t atype,
                            int lda, const void *B, cudaDataType_t btype, int ldb,
                            const void *beta, void *C, cudaDataType_t ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo);

/* ---- device side ---- */
struct emu_thread_ids {
    dim3 thread, block, block_dim, grid_dim;
};
/* The running fiber's coordinates. */
const emu_thread_ids *emu_ids(void);
#define threadIdx (emu_ids()->thread)
#define blockIdx  (emu_ids()->block)
#define blockDim  (emu_ids()->block_dim)
#define gridDim   (emu_ids()->grid_dim)

void __syncthreads(void);

/* Exchanges 8 bytes with the other lanes of the warp: returns what lane src_lane put in. */
uint64_t emu_warp_exchange(uint64_t mine, int src_lane);
int emu_lane(void);

template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask)
{
    (void)mask;
    uint64_t in = 0, out;
    memcpy(&in, &v, sizeof(T));
    out = emu_warp_exchange(in, emu_lane() ^ lane_mask);
    T r;
    memcpy(&r, &out, sizeof(T));
    return r;
}

/* Fibers switch only at barriers: these are atomic as they stand. */
static inline int atomicAdd(int *p, int v)
{
    int old = *p;
    *p = old + v;
    return old;
}
static inline int atomicOr(int *p, int v)
{
    int old = *p;
    *p = old | v;
    return old;
}
static inline int atomicMax(int *p, int v)
{
    int old = *p;
    *p = old > v ? old : v;
    return old;
}

/* Rounded operations that never fuse: plain operations here (built with -ffp-contract=off). */
static inline float __fmul_rn(float a, float b)
{
    return a * b;
}
static inline float __fadd_rn(float a, float b)
{
    return a + b;
}
static inline double __dmul_rn(double a, double b)
{
    return a * b;
}
static inline double __dadd_rn(double a, double b)
{
    return a + b;
}

/* ---- launches ---- */
/* Runs body once per thread of every block of grid x block; returns an error for an invalid
 * configuration (as the GPU would report at cudaGetLastError). While the environment has
 * CKV_CUDA_EMU_FAIL_LAUNCH=1 every launch fails instead (cudaErrorLaunchFailure, a sticky
 * error on a GPU): the tests of context poisoning use it. */
cudaError_t emu_run(dim3 grid, dim3 block, const std::function<void()> &body);

template <typename... P, typename... A>
static inline void cuda_emu_launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t s,
                                   A... args)
{
    (void)s;
    /* the arguments are converted to the parameter types once, as a launch copies them */
    std::function<void()> body = [=]() { kernel(args...); };
    emu_run(grid, block, body);
}

#endif
