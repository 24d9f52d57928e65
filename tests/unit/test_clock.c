/*
 * Suite "clock": monotonic clocks move forward at the right rate.
 */
#include <criterion/criterion.h>
#include <time.h>

#include "ckv_clock.h"

Test(clock, monotonic_and_consistent_units)
{
    uint64_t a = ckv_now_ns();
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
    uint64_t b = ckv_now_ns();
    cr_assert_gt(b, a);
    cr_assert_geq(b - a, 20000000ull, "slept 20 ms, clock moved %llu ns", (unsigned long long)(b - a));
    cr_assert_lt(b - a, 5000000000ull);
    double s = ckv_elapsed_s(a);
    cr_assert(s >= 0.020 && s < 5.0, "%f", s);
    uint64_t us = ckv_now_us(), ms = ckv_now_ms();
    cr_assert_leq(ms, us / 1000 + 1);
    cr_assert_gt(ckv_wall_ms(), 1600000000000ull, "wall clock is epoch milliseconds");
}
