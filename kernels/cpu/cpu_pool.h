/*
 * A small fork-join thread pool for the CPU backend: the calling thread plus n_threads - 1
 * workers run the tasks of one job, claimed one at a time from a shared counter, and
 * cpu_pool_run() returns when every task has finished.
 *
 * Workers start lazily, at the first job with more than one task, so a process may fork
 * (Criterion forks per test) after cpu_pool_new(). Between jobs a worker spins for a short
 * while (decode calls come back to back, and a wake-up across vCPUs costs tens of
 * microseconds) and then sleeps on a condition variable.
 *
 * One thread submits jobs at a time (the context's user); tasks must not submit jobs.
 */
#ifndef CPU_POOL_H
#define CPU_POOL_H

/* Runs task `task` (0 .. n_tasks-1) on thread `tid` (0 = the caller, 1 .. n_threads-1). */
typedef void (*cpu_task_fn)(void *arg, int task, int tid);

struct cpu_pool;

/* Creates a pool of n_threads >= 1 threads (the caller counts as one). The caller owns *out and
 * frees it with cpu_pool_destroy(). Returns 0 or -ENOMEM. */
int cpu_pool_new(int n_threads, struct cpu_pool **out);

/* Stops and joins the workers, frees the pool, NULLs the pointer; NULL is fine. */
void cpu_pool_destroy(struct cpu_pool **pool);

/* Threads a job may use (the caller included). */
int cpu_pool_n_threads(const struct cpu_pool *pool);

/* Runs fn(arg, t, tid) for every t in [0, n_tasks) and returns when all have finished. With
 * one task or one thread, everything runs on the caller. If workers cannot be started the
 * caller runs the job alone (logged once). */
void cpu_pool_run(struct cpu_pool *pool, int n_tasks, cpu_task_fn fn, void *arg);

#endif
