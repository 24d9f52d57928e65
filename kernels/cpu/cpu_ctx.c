/*
 * The CPU backend's context: run-time ISA choice (cpuid + xgetbv, CKV_CPU_ISA override),
 * thread pool, per-thread scratch, host "device" memory and copies, dtype conversion.
 *
 * "Device" memory of the CPU backend is host memory. Large buffers (KV caches, block pools)
 * are 2 MiB aligned and advised for transparent huge pages: sparse attention touches 8 KiB
 * blocks all over a pool, and 4 KiB pages would cost a TLB miss per block.
 */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ckv_error.h"
#include "ckv_log.h"
#include "cpu_backend.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static unsigned long long xgetbv0(void)
{
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static void cpu_features(int *avx2, int *avx512)
{
    unsigned a, b, c, d;
    *avx2 = *avx512 = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx)
        return;
    unsigned long long xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) /* the OS saves SSE and AVX state */
        return;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return;
    int has_avx2 = (b >> 5) & 1;
    *avx2 = has_avx2 && fma && f16c;
    int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    *avx512 = *avx2 && f && dq && bw && vl && (xcr0 & 0xe6) == 0xe6; /* opmask + zmm state */
}
#else
static void cpu_features(int *avx2, int *avx512)
{
    *avx2 = *avx512 = 0;
}
#endif

int ckv_cpu_isa_supported(enum ckv_cpu_isa isa)
{
    int avx2, avx512;
    switch (isa) {
    case CKV_ISA_AUTO:
    case CKV_ISA_PORTABLE: return 1;
    case CKV_ISA_AVX2: cpu_features(&avx2, &avx512); return avx2;
    case CKV_ISA_AVX512: cpu_features(&avx2, &avx512); return avx512;
    }
    return 0;
}

const char *ckv_cpu_isa_name(enum ckv_cpu_isa isa)
{
    switch (isa) {
    case CKV_ISA_AUTO: return "auto";
    case CKV_ISA_PORTABLE: return "portable";
    case CKV_ISA_AVX2: return "avx2";
    case CKV_ISA_AVX512: return "avx512";
    }
    return "?";
}

static int isa_parse(const char *s, enum ckv_cpu_isa *out)
{
    static const enum ckv_cpu_isa all[] = {CKV_ISA_AUTO, CKV_ISA_PORTABLE, CKV_ISA_AVX2,
                                           CKV_ISA_AVX512};
    for (size_t i = 0; i < CKV_ARRAY_LEN(all); i++)
        if (strcmp(s, ckv_cpu_isa_name(all[i])) == 0) {
            *out = all[i];
            return 0;
        }
    return -EINVAL;
}

static int online_cores(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int cpu_backend_init(struct ckv_ctx *ctx, const struct ckv_ctx_opts *opts)
{
    enum ckv_cpu_isa isa = opts->isa;
    if ((int)isa < CKV_ISA_AUTO || isa > CKV_ISA_AVX512)
        return -EINVAL;
    const char *env = getenv("CKV_CPU_ISA");
    if (isa == CKV_ISA_AUTO && env && *env) {
        if (isa_parse(env, &isa)) {
            LOG_ERROR("CKV_CPU_ISA=%s: expected portable, avx2, avx512 or auto", env);
            return -EINVAL;
        }
    }
    if (isa == CKV_ISA_AUTO)
        isa = ckv_cpu_isa_supported(CKV_ISA_AVX512) ? CKV_ISA_AVX512
              : ckv_cpu_isa_supported(CKV_ISA_AVX2) ? CKV_ISA_AVX2
                                                    : CKV_ISA_PORTABLE;
    if (!ckv_cpu_isa_supported(isa)) {
        LOG_ERROR("cpu backend: this CPU cannot run %s", ckv_cpu_isa_name(isa));
        return -ENOTSUP;
    }
    int n_threads = opts->n_threads;
    if (n_threads < 0 || n_threads > 1024)
        return -EINVAL;
    if (n_threads == 0)
        n_threads = online_cores();

    struct cpu_backend *cb = calloc(1, sizeof(*cb));
    if (!cb)
        return -ENOMEM;
    cb->isa = isa;
    cb->simd = isa == CKV_ISA_AVX512 ? &cpu_simd_avx512
               : isa == CKV_ISA_AVX2 ? &cpu_simd_avx2
                                     : &cpu_simd_portable;
    cb->n_threads = n_threads;
    cb->scratch = calloc((size_t)n_threads, sizeof(*cb->scratch));
    int rc = cb->scratch ? cpu_pool_new(n_threads, &cb->pool) : -ENOMEM;
    if (rc) {
        free(cb->scratch);
        free(cb);
        return rc;
    }
    ctx->cpu = cb;
    snprintf(ctx->describe, sizeof(ctx->describe), "cpu %s %d thread%s", ckv_cpu_isa_name(isa),
             n_threads, n_threads == 1 ? "" : "s");
    return 0;
}

void cpu_backend_fini(struct ckv_ctx *ctx)
{
    struct cpu_backend *cb = ctx->cpu;
    if (!cb)
        return;
    cpu_pool_destroy(&cb->pool);
    for (int i = 0; i < cb->n_threads; i++)
        free(cb->scratch[i].p);
    free(cb->scratch);
    free(cb);
    ctx->cpu = NULL;
}

enum ckv_cpu_isa cpu_backend_isa(const struct ckv_ctx *ctx)
{
    return ctx->cpu->isa;
}

int cpu_backend_n_threads(const struct ckv_ctx *ctx)
{
    return ctx->cpu->n_threads;
}

int cpu_scratch_reserve(struct cpu_backend *cb, size_t bytes)
{
    bytes = cpu_align64(bytes ? bytes : 64);
    for (int i = 0; i < cb->n_threads; i++) {
        if (cb->scratch[i].cap >= bytes)
            continue;
        void *p = aligned_alloc(64, bytes);
        if (!p)
            return -ENOMEM;
        free(cb->scratch[i].p);
        cb->scratch[i].p = p;
        cb->scratch[i].cap = bytes;
    }
    return 0;
}

/* ---- memory ---- */

#define HUGE_BYTES (2u << 20)

int cpu_dev_alloc(struct ckv_ctx *ctx, size_t bytes, void **ptr)
{
    (void)ctx;
    size_t align = bytes >= HUGE_BYTES ? HUGE_BYTES : 64;
    size_t rounded = (bytes + align - 1) & ~(align - 1);
    if (rounded < bytes)
        return -ENOMEM;
    void *p = aligned_alloc(align, rounded);
    if (!p)
        return -ENOMEM;
#ifdef MADV_HUGEPAGE
    if (align == HUGE_BYTES)
        madvise(p, rounded, MADV_HUGEPAGE); /* advice only: failure is harmless */
#endif
    *ptr = p;
    return 0;
}

void cpu_dev_free(struct ckv_ctx *ctx, void *ptr)
{
    (void)ctx;
    free(ptr);
}

/* ---- conversion ---- */

struct convert_job {
    const struct cpu_simd *simd;
    void *dst;
    const void *src;
    enum ckv_dtype dst_dt, src_dt;
    size_t n, chunk;
};

static void convert_task(void *arg, int task, int tid)
{
    (void)tid;
    struct convert_job *j = arg;
    size_t i0 = (size_t)task * j->chunk;
    size_t n = j->n - i0 < j->chunk ? j->n - i0 : j->chunk;
    if (j->src_dt == CKV_DTYPE_F16 && j->dst_dt == CKV_DTYPE_F32)
        j->simd->f16_to_f32((const uint16_t *)j->src + i0, (float *)j->dst + i0, n);
    else if (j->src_dt == CKV_DTYPE_F32 && j->dst_dt == CKV_DTYPE_F16)
        j->simd->f32_to_f16((const float *)j->src + i0, (uint16_t *)j->dst + i0, n);
    else {
        size_t es = ckv_dtype_size(j->src_dt);
        memcpy((char *)j->dst + i0 * es, (const char *)j->src + i0 * es, n * es);
    }
}

int cpu_convert(struct ckv_ctx *ctx, void *dst, enum ckv_dtype dst_dt, const void *src,
                enum ckv_dtype src_dt, size_t n)
{
    struct cpu_backend *cb = cpu_of(ctx);
    struct convert_job j = {cb->simd, dst, src, dst_dt, src_dt, n, 1u << 16};
    size_t n_tasks = (n + j.chunk - 1) / j.chunk;
    if (n_tasks > (size_t)1 << 30)
        return -EINVAL;
    cpu_pool_run(cb->pool, (int)n_tasks, convert_task, &j);
    return 0;
}
