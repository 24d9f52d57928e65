/*
 * Rankings: the one sort of the CUDA backend, CUB's segmented radix sort of 64-bit ranking
 * keys (ckv_math.h), descending. Selection ranks each unit's clusters with it, Quest each
 * unit's pages, the oracle each head's tokens, and k-means groups tokens by cluster. Kept
 * alone in this file because CUB's templates are most of the backend's compile time: one
 * instantiation, built once.
 *
 * Under CKV_CUDA_EMU the sort is std::sort per segment (the emulation cannot run CUB).
 */
#include "cuda_backend.h"

#ifdef CKV_CUDA_EMU
#include <algorithm>
#include <functional>
#else
#include <cub/device/device_segmented_radix_sort.cuh>
#endif

/* Sorts keys (see cuda_rank); with temp NULL only sets *temp_bytes. */
static int sort_keys_desc(struct cuda_backend *cb, void *temp, size_t *temp_bytes,
                          const uint64_t *in, uint64_t *out, int n_keys, int n_seg,
                          const int *begin, const int *end)
{
#ifdef CKV_CUDA_EMU
    if (!temp) {
        *temp_bytes = 1;
        return 0;
    }
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    for (int s = 0; s < n_seg; s++) {
        std::copy(in + begin[s], in + end[s], out + begin[s]);
        std::sort(out + begin[s], out + end[s], std::greater<uint64_t>());
    }
    (void)n_keys;
    return 0;
#else
    CUDA_CHECK(cb, cub::DeviceSegmentedRadixSort::SortKeysDescending(
                       temp, *temp_bytes, in, out, n_keys, n_seg, begin, end, 0, 64, cb->stream));
    return 0;
#endif
}

int cuda_rank_layout(struct cuda_backend *cb, struct cuda_arena *ar, int n_keys, int n_seg,
                     struct cuda_rank *r)
{
    r->n_keys = n_keys;
    r->n_seg = n_seg;
    r->keys_in = (uint64_t *)cuda_arena_take(ar, (size_t)n_keys * sizeof(uint64_t) + 8);
    r->keys_out = (uint64_t *)cuda_arena_take(ar, (size_t)n_keys * sizeof(uint64_t) + 8);
    r->seg_begin = (int *)cuda_arena_take(ar, (size_t)n_seg * sizeof(int) + 4);
    r->seg_end = (int *)cuda_arena_take(ar, (size_t)n_seg * sizeof(int) + 4);
    r->sort_temp_bytes = 0;
    int rc = sort_keys_desc(cb, NULL, &r->sort_temp_bytes, r->keys_in, r->keys_out, n_keys, n_seg,
                            r->seg_begin, r->seg_end);
    r->sort_temp = cuda_arena_take(ar, r->sort_temp_bytes);
    return rc;
}

static __global__ void rank_uniform(int *begin, int *end, int n, int len)
{
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s < n) {
        begin[s] = s * len;
        end[s] = (s + 1) * len;
    }
}

int cuda_rank_uniform(struct cuda_backend *cb, struct cuda_rank *r, int len)
{
    CUDA_LAUNCH(rank_uniform, cuda_blocks((size_t)r->n_seg, 128), 128, cb->stream, r->seg_begin,
                r->seg_end, r->n_seg, len);
    CUDA_CHECK_LAUNCH(cb);
    return 0;
}

int cuda_rank_sort(struct cuda_backend *cb, struct cuda_rank *r)
{
    return sort_keys_desc(cb, r->sort_temp, &r->sort_temp_bytes, r->keys_in, r->keys_out, r->n_keys,
                          r->n_seg, r->seg_begin, r->seg_end);
}
