/*
 * The project's deterministic random stream: splitmix64 (Steele, Lea, Flood 2014), one 64-bit
 * state, as static inline functions so that the k-means initialisation, its scalar reference
 * and the synthetic data generator draw the same numbers from the same seed.
 */
#ifndef CKV_RNG_H
#define CKV_RNG_H

#include <stdint.h>

/* Advances *state and returns the next 64 random bits. */
static inline uint64_t ckv_rng_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1) with 53 random bits. */
static inline double ckv_rng_uniform(uint64_t *state)
{
    return (double)(ckv_rng_next(state) >> 11) * 0x1.0p-53;
}

#endif
