/*
 * IEEE binary16 <-> binary32 conversion of one value, in plain C: the scalar reference for
 * every vector conversion (F16C, AVX-512, CUDA's __half) and the portable CPU path. Static
 * inline so that host and device code (CKV_HALF_FN becomes __host__ __device__ under nvcc)
 * share one definition (STYLE.md rule 10).
 *
 * ckv_half_to_f32 is exact (subnormals included); ckv_half_from_f32 rounds to nearest even,
 * overflows to +-inf, keeps NaN a (quiet) NaN and the sign of zero.
 */
#ifndef CKV_HALF_H
#define CKV_HALF_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define CKV_HALF_FN static inline __host__ __device__
#else
#define CKV_HALF_FN static inline
#endif

CKV_HALF_FN float ckv_half_bits_to_f32_(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

CKV_HALF_FN uint32_t ckv_f32_to_bits_(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

/* binary16 bits -> float, exact. */
CKV_HALF_FN float ckv_half_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) /* inf / NaN */
        return ckv_half_bits_to_f32_(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return ckv_half_bits_to_f32_(sign);
        /* subnormal: man * 2^-24, exact in float */
        float f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    return ckv_half_bits_to_f32_(sign | ((exp + 112u) << 23) | (man << 13));
}

/* float -> binary16 bits, round to nearest even. */
CKV_HALF_FN uint16_t ckv_half_from_f32(float f)
{
    uint32_t x = ckv_f32_to_bits_(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or NaN (NaN keeps a quiet bit) */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0));
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {   /* below 2^-14: subnormal half or zero */
        if (ax < 0x33000000u) /* below 2^-25: rounds to zero */
            return (uint16_t)sign;
        uint32_t e = ax >> 23;
        uint32_t man = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24: value = man * 2^(e-150), half unit 2^-24 */
        uint32_t q = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
    /* normal: rebias exponent, round the 13 dropped mantissa bits to nearest even; a carry
     * into the exponent is the correct result (and 0x477ff000 above caught overflow) */
    uint32_t r = ax - 0x38000000u; /* exponent - 112 */
    uint32_t q = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u)))
        q++;
    return (uint16_t)(sign | q);
}

#endif
