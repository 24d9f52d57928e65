/*
 * The CPU backend's fork-join pool (see cpu_pool.h).
 *
 * Protocol. A job has a generation number g. The caller writes fn/arg, then `limit` =
 * (g << 32 | n_tasks), then `ticket` = (g << 32 | 0). A thread claims a task by a CAS of
 * ticket from (g, i) to (g, i + 1) and runs it only if `limit` still names g and i < n_tasks;
 * a task of g that is claimed but not finished keeps the caller from writing job g + 1, so the
 * fn/arg it reads after the claim are g's. `completed` counts finished tasks; the caller
 * returns when it reaches n_tasks. A stale thread (still holding g when g + 1 is published)
 * fails its CAS or reads a limit of another generation and claims nothing.
 */
#include "cpu_pool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "ckv_clock.h"
#include "ckv_error.h"
#include "ckv_log.h"

/* How long an idle worker spins before it sleeps, and how often it reads the clock. */
#define POOL_SPIN_NS    200000ull
#define POOL_SPIN_CHECK 64

struct cpu_pool {
    int n_threads; /* the caller included */
    int n_started; /* workers running (0 until the first parallel job) */
    int start_failed;
    pthread_t *threads;
    uint32_t gen; /* caller-side generation counter */

    _Atomic uint64_t ticket; /* (gen << 32) | next task index */
    _Atomic uint64_t limit;  /* (gen << 32) | n_tasks */
    _Atomic int completed;   /* tasks of the current job finished */
    cpu_task_fn fn;
    void *arg;

    _Atomic int sleepers;
    _Atomic int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

struct worker_arg {
    struct cpu_pool *pool;
    int tid;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claims and runs tasks of generation gen until none is left. */
static void pool_work(struct cpu_pool *p, uint32_t gen, int tid)
{
    for (;;) {
        uint64_t t = atomic_load(&p->ticket);
        if ((uint32_t)(t >> 32) != gen)
            return;
        if (!atomic_compare_exchange_weak(&p->ticket, &t, t + 1))
            continue;
        uint32_t idx = (uint32_t)t;
        uint64_t lim = atomic_load(&p->limit);
        if ((uint32_t)(lim >> 32) != gen || idx >= (uint32_t)lim)
            return;
        p->fn(p->arg, (int)idx, tid);
        atomic_fetch_add_explicit(&p->completed, 1, memory_order_release);
    }
}

static void *pool_worker(void *argp)
{
    struct worker_arg wa = *(struct worker_arg *)argp;
    free(argp);
    struct cpu_pool *p = wa.pool;
    uint32_t seen = 0; /* the generation before the first job; a late start joins the current */
    for (;;) {
        uint64_t t0 = ckv_now_ns();
        unsigned spins = 0;
        for (;;) {
            if (atomic_load(&p->stop))
                return NULL;
            if ((uint32_t)(atomic_load(&p->ticket) >> 32) != seen)
                break;
            cpu_relax();
            if (++spins % POOL_SPIN_CHECK)
                continue;
            if (ckv_now_ns() - t0 < POOL_SPIN_NS)
                continue;
            /* sleep; the caller broadcasts when it sees sleepers (seq_cst on both sides) */
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while (!atomic_load(&p->stop) && (uint32_t)(atomic_load(&p->ticket) >> 32) == seen)
                pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
            t0 = ckv_now_ns();
        }
        seen = (uint32_t)(atomic_load(&p->ticket) >> 32);
        pool_work(p, seen, wa.tid);
    }
}

int cpu_pool_new(int n_threads, struct cpu_pool **out)
{
    ASSERT(n_threads >= 1 && out);
    struct cpu_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) {
        free(p);
        return -ENOMEM;
    }
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    *out = p;
    return 0;
}

int cpu_pool_n_threads(const struct cpu_pool *pool)
{
    return pool->n_threads;
}

static void pool_start(struct cpu_pool *p)
{
    for (int i = 1; i < p->n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof(*wa));
        if (wa) {
            wa->pool = p;
            wa->tid = i;
        }
        int rc = wa ? pthread_create(&p->threads[i], NULL, pool_worker, wa) : ENOMEM;
        if (rc) {
            free(wa);
            LOG_WARN("cpu pool: cannot start worker %d of %d (%s): running with %d thread(s)", i,
                     p->n_threads - 1, ckv_strerror(-rc), i);
            p->start_failed = 1;
            break;
        }
        p->n_started++;
    }
}

void cpu_pool_run(struct cpu_pool *p, int n_tasks, cpu_task_fn fn, void *arg)
{
    if (n_tasks <= 0)
        return;
    if (n_tasks == 1 || p->n_threads == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(arg, t, 0);
        return;
    }
    if (p->n_started == 0 && !p->start_failed)
        pool_start(p);
    if (p->n_started == 0) {
        for (int t = 0; t < n_tasks; t++)
            fn(arg, t, 0);
        return;
    }
    uint32_t g = ++p->gen;
    if (g == 0) /* 0 is the workers' initial "seen"; skip it on wrap-around */
        g = ++p->gen;
    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->completed, 0);
    atomic_store(&p->limit, ((uint64_t)g << 32) | (uint32_t)n_tasks);
    atomic_store(&p->ticket, (uint64_t)g << 32);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    pool_work(p, g, 0);
    unsigned spins = 0;
    while (atomic_load_explicit(&p->completed, memory_order_acquire) < n_tasks) {
        /* a worker mid-task may have been descheduled (2 vCPUs, shared machine) */
        if (++spins > 4096)
            sched_yield();
        else
            cpu_relax();
    }
}

void cpu_pool_destroy(struct cpu_pool **pool)
{
    if (!pool || !*pool)
        return;
    struct cpu_pool *p = *pool;
    atomic_store(&p->stop, 1);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i <= p->n_started; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
    *pool = NULL;
}
