/*
 * Scalar math that the CPU and CUDA kernels must agree on, as static inline functions usable
 * from C and from CUDA device code (CKV_MATH_FN becomes __host__ __device__ under nvcc), next
 * to ckv_half.h's f16 conversion (STYLE.md rule 10):
 *   - the ranking key of a score: one 64-bit integer whose order is "higher score first, on a
 *     tie the lower index first", so that any integer sort (a heap, a radix sort) ranks
 *     clusters, pages and tokens the same way;
 *   - one key of an online softmax, and the weight of a partial result in a merge.
 */
#ifndef CKV_MATH_H
#define CKV_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define CKV_MATH_FN static inline __host__ __device__
#else
#define CKV_MATH_FN static inline
#endif

/* f32 -> u32 with the same order: NaN lowest (0), -0 == +0. */
CKV_MATH_FN uint32_t ckv_math_score_bits(float f)
{
    if (f != f)
        return 0;
    if (f == 0.0f)
        f = 0.0f;
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The ranking key of (score, index): a larger key is a higher score or, on equal scores, a
 * lower index. Never 0 for an index below 0xffffffff, so 0 can mark "not a candidate". */
CKV_MATH_FN uint64_t ckv_math_rank_key(float score, uint32_t index)
{
    return ((uint64_t)ckv_math_score_bits(score) << 32) | (0xffffffffu - index);
}

/* The index a ranking key was made from. */
CKV_MATH_FN uint32_t ckv_math_rank_index(uint64_t key)
{
    return 0xffffffffu - (uint32_t)key;
}

/* Adds one scaled score s to an online softmax with running max *m (-inf before any key) and
 * running sum *l of exp(score - m). Returns in *corr the factor that rescales the old
 * accumulator and in *p the weight of the new value row: acc = acc * corr + p * v. */
CKV_MATH_FN void ckv_math_softmax_add(float *m, float *l, float s, float *corr, float *p)
{
    if (s == -INFINITY) { /* a key of weight 0 (also keeps -inf - -inf out) */
        *corr = 1.0f;
        *p = 0.0f;
    } else if (s > *m) {
        *corr = *m == -INFINITY ? 0.0f : expf(*m - s);
        *p = 1.0f;
        *l = *l * *corr + 1.0f;
        *m = s;
    } else {
        *corr = 1.0f;
        *p = expf(s - *m);
        *l += *p;
    }
}

/* The weight exp(m_part - m_max) of a partial softmax (max m_part) in a merge whose overall
 * max is m_max; 0 for a part that saw no key. */
CKV_MATH_FN float ckv_math_softmax_weight(float m_part, float m_max)
{
    return m_part == -INFINITY ? 0.0f : expf(m_part - m_max);
}

#endif
