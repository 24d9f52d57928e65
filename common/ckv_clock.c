/*
 * Clock helpers that are not worth inlining.
 */
#include "ckv_clock.h"

uint64_t ckv_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

double ckv_elapsed_s(uint64_t t0_ns)
{
    return (double)(ckv_now_ns() - t0_ns) * 1e-9;
}
