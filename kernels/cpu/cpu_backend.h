/*
 * State of a CPU context and the helpers the CPU kernels share (cpu_ctx.c): the micro-kernel
 * table of the chosen ISA, the thread pool, and scratch memory per thread.
 *
 * Scratch: a kernel computes its per-thread need, calls cpu_scratch_reserve() on the caller's
 * thread (the only place that allocates, so an allocation failure is an -ENOMEM before any
 * output is written), then each task uses cpu_scratch(cb, tid).
 */
#ifndef CPU_BACKEND_H
#define CPU_BACKEND_H

#include <stddef.h>

#include "cpu_pool.h"
#include "cpu_simd.h"
#include "kernels_impl.h"

struct cpu_scratch {
    void *p;
    size_t cap;
};

struct cpu_backend {
    enum ckv_cpu_isa isa;
    const struct cpu_simd *simd;
    struct cpu_pool *pool;
    int n_threads;
    struct cpu_scratch *scratch; /* (n_threads) */
};

static inline struct cpu_backend *cpu_of(struct ckv_ctx *ctx)
{
    return ctx->cpu;
}

/* Makes every thread's scratch at least `bytes` (64-byte aligned). Returns 0 or -ENOMEM. */
int cpu_scratch_reserve(struct cpu_backend *cb, size_t bytes);

/* Thread tid's scratch, as reserved. */
static inline void *cpu_scratch(struct cpu_backend *cb, int tid)
{
    return cb->scratch[tid].p;
}

/* Rounds a byte count up to a multiple of 64 (carving scratch into aligned pieces). */
static inline size_t cpu_align64(size_t n)
{
    return (n + 63) & ~(size_t)63;
}

#endif
