/*
 * The CUDA backend's context and the host-side helpers its .cu files share (cuda_ctx.cu):
 * error checking that poisons the context, the launch macro, device scratch, the device
 * status word of argument checks, and the segmented key sort (cuda_sort.cu).
 *
 * One context is one device and one stream. Every kernel of the context is queued on that
 * stream, so scratch memory is reused from call to call without any other ordering: a later
 * kernel cannot start before an earlier one has finished.
 *
 * Errors (STYLE.md rule 8): every CUDA call and launch is checked. A failed cudaMalloc is
 * -ENOMEM and harmless; any other CUDA error poisons the context: the call returns -EIO, so
 * does every later call, and the worker exits and is restarted (its device state is lost).
 *
 * Under CKV_CUDA_EMU the same sources build for the CPU against a host emulation of the
 * runtime (tests/kernels_cuda/emu/cuda_emu.h): that is how the kernels' logic is executed on
 * a machine without a GPU. Nothing else changes between the two builds.
 */
#ifndef CUDA_BACKEND_H
#define CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef CKV_CUDA_EMU
#include "cuda_emu.h"
#else
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

extern "C" {
#include "ckv_error.h"
#include "ckv_log.h"
#include "kernels_impl.h"
}

/* What a device-side argument check found (cuda_status_*). */
struct cuda_status {
    int bad;     /* nonzero: some index was invalid */
    int max;     /* a maximum the check computed (e.g. refs of the longest list) */
    int nospace; /* nonzero: an output capacity is too small */
    int pad;
};

struct cuda_backend {
    int device;
    int n_sm; /* multiprocessors: sizes the split-K grids */
    cudaStream_t stream;
    cublasHandle_t cublas;
    int poisoned;  /* a CUDA error happened: every call returns -EIO */
    void *scratch; /* device scratch, scratch_bytes, reused by every call */
    size_t scratch_bytes;
    struct cuda_status *status_dev;  /* device: written by check kernels */
    struct cuda_status *status_host; /* pinned host copy */
    char name[256];                  /* the device's name (cudaDeviceProp.name) */
};

/* Threads of a warp; the kernels are written for 32. */
#define CUDA_WARP 32

/* Launches kernel k on a grid and block (dim3 or int) on stream. Always follow with
 * CUDA_CHECK_LAUNCH. The kernel may be a function pointer (templates: take its address first). */
#ifdef CKV_CUDA_EMU
#define CUDA_LAUNCH(k, grid, block, stream, ...)                                                   \
    cuda_emu_launch((k), dim3(grid), dim3(block), (stream), __VA_ARGS__)
#else
#define CUDA_LAUNCH(k, grid, block, stream, ...) (k)<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

/* Logs the failed call, poisons the context (except for an allocation failure) and returns
 * -EIO (-ENOMEM for an allocation failure). */
int cuda_fail(struct cuda_backend *cb, cudaError_t err, const char *what, const char *file,
              int line);
int cuda_fail_cublas(struct cuda_backend *cb, int status, const char *what, const char *file,
                     int line);

/* Returns from the calling function when a CUDA call fails (see cuda_fail). */
#define CUDA_CHECK(cb, call)                                                                       \
    do {                                                                                           \
        cudaError_t err_ = (call);                                                                 \
        if (err_ != cudaSuccess)                                                                   \
            return cuda_fail((cb), err_, #call, __FILE__, __LINE__);                               \
    } while (0)

/* After every launch: a bad configuration or an earlier asynchronous fault shows here. */
#define CUDA_CHECK_LAUNCH(cb) CUDA_CHECK((cb), cudaGetLastError())

#define CUBLAS_CHECK(cb, call)                                                                     \
    do {                                                                                           \
        cublasStatus_t st_ = (call);                                                               \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                          \
            return cuda_fail_cublas((cb), (int)st_, #call, __FILE__, __LINE__);                    \
    } while (0)

/* The backend of a CUDA context, ready for work: -EIO when poisoned; makes the context's
 * device current on this thread (a process may drive several devices). */
int cuda_enter(struct ckv_ctx *ctx, struct cuda_backend **cb);

/* ---- scratch ----
 * A kernel lays out its device temporaries with cuda_arena_take() twice: once on an arena
 * with base NULL to measure, then on the reserved scratch. */
struct cuda_arena {
    char *base;
    size_t used;
};

/* The next `bytes` of the arena, 256-byte aligned (NULL while measuring). */
static inline void *cuda_arena_take(struct cuda_arena *a, size_t bytes)
{
    size_t off = (a->used + 255) & ~(size_t)255;
    a->used = off + bytes;
    return a->base ? a->base + off : NULL;
}

/* Makes the scratch at least `bytes` and returns its base in *p. Growing frees the old
 * scratch (cudaFree waits for the device, so no queued kernel still uses it). */
int cuda_scratch(struct cuda_backend *cb, size_t bytes, void **p);

/* ---- device-side argument checks ----
 * A check kernel reads indices only the device holds and records what it finds in
 * cb->status_dev; cuda_status_read() brings that to the host (it synchronises). */
int cuda_status_reset(struct cuda_backend *cb);
int cuda_status_read(struct cuda_backend *cb, struct cuda_status *out);

/* ---- ranking (cuda_sort.cu) ----
 * A ranking sorts n_seg segments of 64-bit ranking keys (ckv_math.h) in descending order:
 * segment s is keys_in[seg_begin[s] .. seg_end[s]), sorted into the same positions of
 * keys_out (positions outside every segment are undefined). */
struct cuda_rank {
    uint64_t *keys_in, *keys_out; /* (n_keys) */
    int *seg_begin, *seg_end;     /* (n_seg) */
    void *sort_temp;              /* the sort's own scratch */
    size_t sort_temp_bytes;
    int n_keys, n_seg;
};

/* Lays a ranking's device temporaries out in the arena (pointers NULL while measuring). */
int cuda_rank_layout(struct cuda_backend *cb, struct cuda_arena *ar, int n_keys, int n_seg,
                     struct cuda_rank *r);

/* Queues segments of equal length: segment s is [s * len, (s + 1) * len). */
int cuda_rank_uniform(struct cuda_backend *cb, struct cuda_rank *r, int len);

/* Queues the sort of keys_in's segments into keys_out. */
int cuda_rank_sort(struct cuda_backend *cb, struct cuda_rank *r);

/* Blocks of `threads` covering n items (at least 1). */
static inline unsigned cuda_blocks(size_t n, int threads)
{
    size_t b = (n + (size_t)threads - 1) / (size_t)threads;
    return b ? (unsigned)b : 1u;
}

/* Bytes of one element of a KV dtype (kernels.c checked the dtype). */
static inline size_t cuda_dtype_size(enum ckv_dtype dt)
{
    return dt == CKV_DTYPE_F16 ? 2 : 4;
}

#endif
