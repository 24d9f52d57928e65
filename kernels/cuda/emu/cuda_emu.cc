/*
 * The CPU emulation of CUDA (see cuda_emu.h): fibers, the block scheduler with its barrier
 * and divergence checks, memory, streams and the cuBLAS stand-in.
 *
 * Fibers switch with a few instructions of x86-64 assembly (callee-saved registers and the
 * stack pointer): ucontext's swapcontext makes a system call per switch, and a decode test
 * switches millions of times (every shuffle of every lane).
 *
 * Fresh device memory is filled with 0xff bytes (NaN floats, -1 integers): a kernel that
 * reads scratch it never wrote shows up as NaN or a bad index instead of a lucky zero.
 */
#include "cuda_emu.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <set>
#include <vector>

#if !defined(__x86_64__)
#error "cuda_emu: the fiber switch is written for x86-64"
#endif

/* void emu_ctx_switch(void **save_sp, void *new_sp): saves the callee-saved registers on the
 * current stack, stores its pointer in *save_sp, and resumes the stack new_sp. */
extern "C" void emu_ctx_switch(void **save_sp, void *new_sp);
asm(R"(
    .text
    .globl emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
)");

enum fiber_state { F_RUN, F_WAIT_BLOCK, F_WAIT_WARP, F_DONE };

struct fiber {
    void *sp;
    char *stack; /* lowest usable byte */
    fiber_state state;
    emu_thread_ids ids;
    int lane, warp;
    unsigned shfl_gen; /* shuffles done: picks the exchange buffer */
};

#define EMU_STACK_BYTES (256u << 10)
#define EMU_PAGE        4096u

static struct {
    std::vector<fiber> fibers;
    char *stacks; /* mmap: per fiber a guard page, then the stack */
    size_t n_stacks;
    void *main_sp;
    fiber *cur;
    const std::function<void()> *body;
    std::vector<uint64_t> slots; /* (warps, 2 buffers, 32 lanes) */
    cudaError_t last_error;
    std::set<void *> allocs;
} E;

const emu_thread_ids *emu_ids(void)
{
    return &E.cur->ids;
}

int emu_lane(void)
{
    return E.cur->lane;
}

static void to_scheduler(fiber *f)
{
    emu_ctx_switch(&f->sp, E.main_sp);
}

static void fiber_start(void)
{
    (*E.body)();
    E.cur->state = F_DONE;
    to_scheduler(E.cur);
    abort(); /* a finished fiber is never resumed */
}

void __syncthreads(void)
{
    fiber *f = E.cur;
    f->state = F_WAIT_BLOCK;
    to_scheduler(f);
}

uint64_t emu_warp_exchange(uint64_t mine, int src_lane)
{
    fiber *f = E.cur;
    uint64_t *w = &E.slots[((size_t)f->warp * 2 + (f->shfl_gen & 1)) * 32];
    w[f->lane] = mine;
    f->state = F_WAIT_WARP;
    to_scheduler(f);
    uint64_t r = w[src_lane & 31];
    f->shfl_gen++;
    return r;
}

static void stacks_reserve(size_t n)
{
    if (n <= E.n_stacks)
        return;
    if (E.stacks)
        munmap(E.stacks, E.n_stacks * (EMU_STACK_BYTES + EMU_PAGE));
    size_t bytes = n * (EMU_STACK_BYTES + EMU_PAGE);
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "cuda_emu: no memory for %zu fiber stacks\n", n);
        abort();
    }
    E.stacks = (char *)p;
    E.n_stacks = n;
    for (size_t i = 0; i < n; i++) /* a stack overflow faults on its guard page */
        mprotect(E.stacks + i * (EMU_STACK_BYTES + EMU_PAGE), EMU_PAGE, PROT_NONE);
}

/* A fresh fiber stack that "returns" into fiber_start, entered as if called (rsp = 8 mod 16). */
static void fiber_prepare(fiber *f, size_t i)
{
    f->stack = E.stacks + i * (EMU_STACK_BYTES + EMU_PAGE) + EMU_PAGE;
    uintptr_t top = ((uintptr_t)f->stack + EMU_STACK_BYTES) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = NULL;                 /* fiber_start's return address: never used */
    *--sp = (void *)&fiber_start; /* popped by ret */
    for (int r = 0; r < 6; r++)   /* rbp rbx r12 r13 r14 r15 */
        *--sp = NULL;
    f->sp = sp;
}

[[noreturn]] static void divergence(const char *what, const dim3 &b)
{
    fprintf(stderr, "cuda_emu: block (%u,%u,%u): %s (undefined on a GPU)\n", b.x, b.y, b.z, what);
    abort();
}

/* Runs one block to completion. */
static void run_block(size_t n)
{
    const int n_warps = (int)((n + 31) / 32);
    for (;;) {
        for (size_t i = 0; i < n; i++) {
            fiber *f = &E.fibers[i];
            if (f->state != F_RUN)
                continue;
            E.cur = f;
            emu_ctx_switch(&E.main_sp, f->sp);
        }
        /* every fiber now waits or is done: release what can be released */
        size_t n_done = 0, n_block = 0;
        for (size_t i = 0; i < n; i++) {
            n_done += E.fibers[i].state == F_DONE;
            n_block += E.fibers[i].state == F_WAIT_BLOCK;
        }
        if (n_done == n)
            return;
        const dim3 &bid = E.fibers[0].ids.block;
        bool released = false;
        if (n_block == n) {
            for (size_t i = 0; i < n; i++)
                E.fibers[i].state = F_RUN;
            released = true;
        }
        for (int w = 0; w < n_warps; w++) {
            size_t l0 = (size_t)w * 32, l1 = l0 + 32 < n ? l0 + 32 : n;
            size_t waiting = 0;
            for (size_t i = l0; i < l1; i++)
                waiting += E.fibers[i].state == F_WAIT_WARP;
            if (waiting == 0)
                continue;
            if (waiting != l1 - l0)
                divergence("a warp shuffle without every lane (some returned or wait elsewhere)",
                           bid);
            for (size_t i = l0; i < l1; i++)
                E.fibers[i].state = F_RUN;
            released = true;
        }
        if (!released)
            divergence(n_block ? "__syncthreads() not reached by every thread" : "deadlock", bid);
    }
}

cudaError_t emu_run(dim3 grid, dim3 block, const std::function<void()> &body)
{
    size_t n = (size_t)block.x * block.y * block.z;
    if (n == 0 || n > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535) {
        E.last_error = cudaErrorInvalidConfiguration;
        return E.last_error;
    }
    const char *fail = getenv("CKV_CUDA_EMU_FAIL_LAUNCH");
    if (fail && strcmp(fail, "1") == 0) {
        E.last_error = cudaErrorLaunchFailure;
        return E.last_error;
    }
    stacks_reserve(n);
    E.fibers.resize(n);
    E.slots.assign((size_t)((n + 31) / 32) * 64, 0);
    E.body = &body;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                for (size_t i = 0; i < n; i++) {
                    fiber *f = &E.fibers[i];
                    f->ids.thread = dim3((unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                                         (unsigned)(i / ((size_t)block.x * block.y)));
                    f->ids.block = dim3(bx, by, bz);
                    f->ids.block_dim = block;
                    f->ids.grid_dim = grid;
                    f->lane = (int)(i % 32);
                    f->warp = (int)(i / 32);
                    f->shfl_gen = 0;
                    f->state = F_RUN;
                    fiber_prepare(f, i);
                }
                run_block(n);
            }
    E.cur = NULL;
    return cudaSuccess;
}

/* ---- runtime ---- */

struct emu_stream {
    int unused;
};
struct emu_cublas {
    int unused;
};

cudaError_t cudaGetDeviceCount(int *n)
{
    *n = 1;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int dev)
{
    return dev == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int dev)
{
    if (dev != 0)
        return cudaErrorInvalidDevice;
    memset(prop, 0, sizeof(*prop));
    snprintf(prop->name, sizeof(prop->name), "cuda_emu (CPU emulation)");
    /* few "SMs" so that small tests already split decode attention (CKV_CUDA_EMU_SMS) */
    const char *env = getenv("CKV_CUDA_EMU_SMS");
    prop->multiProcessorCount = env && atoi(env) > 0 ? atoi(env) : 4;
    prop->major = 9;
    prop->minor = 0;
    return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    (void)flags;
    *s = new emu_stream();
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    delete s;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    return s ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t cudaMalloc(void **p, size_t bytes)
{
    /* exactly `bytes`: a sanitizer build sees a kernel reading one element too far */
    void *m = NULL;
    if (posix_memalign(&m, 256, bytes ? bytes : 1) != 0)
        return E.last_error = cudaErrorMemoryAllocation;
    memset(m, 0xff, bytes);
    E.allocs.insert(m);
    *p = m;
    return cudaSuccess;
}

cudaError_t cudaFree(void *p)
{
    if (!p)
        return cudaSuccess;
    if (!E.allocs.erase(p))
        return E.last_error = cudaErrorInvalidValue;
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **p, size_t bytes)
{
    *p = malloc(bytes ? bytes : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaFreeHost(void *p)
{
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t s)
{
    (void)kind;
    if (!s || (bytes && (!dst || !src)))
        return E.last_error = cudaErrorInvalidValue;
    memmove(dst, src, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t s)
{
    if (!s || (bytes && !dst))
        return E.last_error = cudaErrorInvalidValue;
    memset(dst, value, bytes);
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = E.last_error;
    E.last_error = cudaSuccess;
    return e;
}

const char *cudaGetErrorString(cudaError_t err)
{
    switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    }
    return "unknown error";
}

/* ---- cuBLAS ---- */

cublasStatus_t cublasCreate(cublasHandle_t *h)
{
    *h = new emu_cublas();
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t h)
{
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s)
{
    return h && s ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m)
{
    (void)m;
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float *alpha, const float *A, int lda,
                           const float *B, int ldb, const float *beta, float *C, int ldc)
{
    if (!h || m < 0 || n < 0 || k < 0 || ldc < m || lda < (ta == CUBLAS_OP_N ? m : k) ||
        ldb < (tb == CUBLAS_OP_N ? k : n))
        return CUBLAS_STATUS_INVALID_VALUE;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float acc = 0.0f;
            for (int p = 0; p < k; p++) {
                float a = ta == CUBLAS_OP_N ? A[i + (size_t)p * lda] : A[p + (size_t)i * lda];
                float b = tb == CUBLAS_OP_N ? B[p + (size_t)j * ldb] : B[j + (size_t)p * ldb];
                acc += a * b;
            }
            float *c = &C[i + (size_t)j * ldc];
            /* beta == 0: C is not read (it may hold anything, NaN included), as in cuBLAS */
            *c = *beta == 0.0f ? *alpha * acc : *alpha * acc + *beta * *c;
        }
    return CUBLAS_STATUS_SUCCESS;
}

/* One element of a GemmEx operand as f32. */
static float gemm_elem(const void *p, cudaDataType_t t, size_t i)
{
    if (t == CUDA_R_32F)
        return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (t == CUDA_R_16F)
        return ckv_half_to_f32(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType_t atype,
                            int lda, const void *B, cudaDataType_t btype, int ldb,
                            const void *beta, void *C, cudaDataType_t ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo)
{
    (void)algo;
    /* the combinations cuBLAS accepts for f32 compute and an f32 C */
    if (!h || m < 0 || n < 0 || k < 0 || ldc < m || lda < (ta == CUBLAS_OP_N ? m : k) ||
        ldb < (tb == CUBLAS_OP_N ? k : n) || atype != btype || ctype != CUDA_R_32F ||
        compute != CUBLAS_COMPUTE_32F ||
        (atype != CUDA_R_32F && atype != CUDA_R_16F && atype != CUDA_R_16BF))
        return CUBLAS_STATUS_INVALID_VALUE;
    float al = *(const float *)alpha, be = *(const float *)beta;
    float *Cf = (float *)C;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float acc = 0.0f;
            for (int p = 0; p < k; p++) {
                float a = gemm_elem(A, atype,
                                    ta == CUBLAS_OP_N ? i + (size_t)p * lda : p + (size_t)i * lda);
                float b = gemm_elem(B, btype,
                                    tb == CUBLAS_OP_N ? p + (size_t)j * ldb : j + (size_t)p * ldb);
                acc += a * b;
            }
            float *c = &Cf[i + (size_t)j * ldc];
            *c = be == 0.0f ? al * acc : al * acc + be * *c; /* beta 0: C is not read */
        }
    return CUBLAS_STATUS_SUCCESS;
}
