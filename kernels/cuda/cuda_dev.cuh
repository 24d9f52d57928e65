/*
 * Device-side helpers shared by the CUDA kernels: f16 loads, warp reductions, and the way a
 * warp holds one head_dim row (a query, an accumulator) spread over its 32 lanes.
 *
 * Row layout ("lane elements"): lane `lane` holds EPL elements of a row of d <= 32 * EPL
 * elements. With vec = false element e of the lane is row[e * 32 + lane]; with vec = true the
 * lane holds runs of V consecutive elements, element e being row[(e / V) * 32 V + lane V +
 * e % V], so that one 8-byte load fetches a run (V = 4 halves or 2 floats). The vectorised
 * layout needs d and every row offset to be multiples of V and an 8-byte aligned base (the
 * launcher checks; see dev_vec_ok). Elements past d read as 0 and are never written.
 * Queries, keys, values and accumulators of one kernel use the same layout, so a dot product
 * is a sum over the lane's elements plus a warp reduction.
 */
#ifndef CUDA_DEV_CUH
#define CUDA_DEV_CUH

#include "cuda_backend.h"

/* f16 bits -> f32 (exact). */
static __device__ __forceinline__ float dev_h2f(uint16_t h)
{
#ifdef CKV_CUDA_EMU
    return ckv_half_to_f32(h);
#else
    return __half2float(__ushort_as_half(h));
#endif
}

/* One element of a KV row as f32. */
static __device__ __forceinline__ float dev_load(const float *p)
{
    return *p;
}
static __device__ __forceinline__ float dev_load(const uint16_t *p)
{
    return dev_h2f(*p);
}

/* Elements per 8-byte run: 4 halves or 2 floats. */
template <typename T> struct dev_vec {
    static constexpr int V = sizeof(T) == 2 ? 4 : 2;
};

/* Loads a run of VV (1, 2 or 4) elements starting at p into x[0..VV). */
template <int VV> static __device__ __forceinline__ void dev_load_run(const uint16_t *p, float *x)
{
    if (VV == 4) {
        uint2 u = *reinterpret_cast<const uint2 *>(p);
        x[0] = dev_h2f((uint16_t)(u.x & 0xffffu));
        x[1] = dev_h2f((uint16_t)(u.x >> 16));
        x[2] = dev_h2f((uint16_t)(u.y & 0xffffu));
        x[3] = dev_h2f((uint16_t)(u.y >> 16));
    } else if (VV == 2) {
        unsigned u = *reinterpret_cast<const unsigned *>(p);
        x[0] = dev_h2f((uint16_t)(u & 0xffffu));
        x[1] = dev_h2f((uint16_t)(u >> 16));
    } else {
        x[0] = dev_h2f(*p);
    }
}

template <int VV> static __device__ __forceinline__ void dev_load_run(const float *p, float *x)
{
    if (VV == 2) {
        float2 f = *reinterpret_cast<const float2 *>(p);
        x[0] = f.x;
        x[1] = f.y;
    } else {
        for (int i = 0; i < VV; i++)
            x[i] = p[i];
    }
}

/* The run length of the vectorised layout for dtype T and EPL elements per lane. */
template <typename T, int EPL> struct dev_layout {
    static constexpr int V = dev_vec<T>::V < EPL ? dev_vec<T>::V : EPL;
};

/* Row index of lane element e (see the file comment). */
template <typename T, int EPL>
static __device__ __forceinline__ int dev_elem(int e, int lane, bool vec)
{
    constexpr int V = dev_layout<T, EPL>::V;
    return vec ? (e / V) * (CUDA_WARP * V) + lane * V + e % V : e * CUDA_WARP + lane;
}

/* Loads the lane's elements of a row of d elements of dtype T. */
template <typename T, int EPL>
static __device__ __forceinline__ void dev_load_row(const T *row, int d, bool vec, int lane,
                                                    float (&x)[EPL])
{
    constexpr int V = dev_layout<T, EPL>::V;
    if (vec) {
#pragma unroll
        for (int c = 0; c < EPL / V; c++) {
            int i = c * CUDA_WARP * V + lane * V;
            if (i < d) {
                dev_load_run<V>(row + i, &x[c * V]);
            } else {
#pragma unroll
                for (int j = 0; j < V; j++)
                    x[c * V + j] = 0.0f;
            }
        }
    } else {
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            int i = e * CUDA_WARP + lane;
            x[e] = i < d ? dev_load(row + i) : 0.0f;
        }
    }
}

/* True when rows of dtype T at base + k * stride (for every k) suit the vectorised layout. */
template <typename T, int EPL>
static inline bool dev_vec_ok(const void *base, int d, size_t stride_a, size_t stride_b)
{
    constexpr size_t V = dev_layout<T, EPL>::V;
    return V > 1 && d % (int)V == 0 && stride_a % V == 0 && stride_b % V == 0 &&
           (uintptr_t)base % (V * sizeof(T)) == 0;
}

/* Calls run<T, EPL>(...) for the KV or centroid dtype (f16: T = uint16_t, else float) and the
 * lane elements EPL that head_dim d needs (2, 4, 8, 16 for d <= 64, 128, 256, 512; kernels.c
 * bounds d by CKV_MAX_HEAD_DIM = 512). */
#define DEV_DISPATCH(run, f16, d, ...)                                                             \
    ((f16) ? ((d) <= 64    ? run<uint16_t, 2>(__VA_ARGS__)                                         \
              : (d) <= 128 ? run<uint16_t, 4>(__VA_ARGS__)                                         \
              : (d) <= 256 ? run<uint16_t, 8>(__VA_ARGS__)                                         \
                           : run<uint16_t, 16>(__VA_ARGS__))                                       \
           : ((d) <= 64    ? run<float, 2>(__VA_ARGS__)                                            \
              : (d) <= 128 ? run<float, 4>(__VA_ARGS__)                                            \
              : (d) <= 256 ? run<float, 8>(__VA_ARGS__)                                            \
                           : run<float, 16>(__VA_ARGS__)))

/* Sum over the warp; every lane gets the same bits (a butterfly: each step adds the same two
 * values on both partners, and IEEE addition is commutative), so branches on it are uniform. */
static __device__ __forceinline__ float dev_warp_sum(float x)
{
#pragma unroll
    for (int o = CUDA_WARP / 2; o > 0; o >>= 1)
        x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

#endif
