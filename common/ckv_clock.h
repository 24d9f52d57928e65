/*
 * Clocks. Monotonic time for durations and timeouts (never the wall clock), wall time only
 * for display.
 */
#ifndef CKV_CLOCK_H
#define CKV_CLOCK_H

#include <stdint.h>
#include <time.h>

/* CLOCK_MONOTONIC in nanoseconds. */
static inline uint64_t ckv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t ckv_now_us(void)
{
    return ckv_now_ns() / 1000ull;
}

static inline uint64_t ckv_now_ms(void)
{
    return ckv_now_ns() / 1000000ull;
}

/* Wall-clock milliseconds since the epoch (for display and file names only). */
uint64_t ckv_wall_ms(void);

/* Seconds elapsed since t0_ns (a ckv_now_ns() value), as a double. */
double ckv_elapsed_s(uint64_t t0_ns);

#endif
