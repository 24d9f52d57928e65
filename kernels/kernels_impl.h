/*
 * What the backend-neutral entry points (kernels.c) and the backends share: the context
 * structure and each backend's entry points. Not a public header: code outside kernels/
 * includes kernels.h only.
 *
 * kernels.c checks every argument that can be checked without reading device memory, then
 * calls the backend; a backend checks what only it can read (sizes, offsets, block refs).
 */
#ifndef CKV_KERNELS_IMPL_H
#define CKV_KERNELS_IMPL_H

#include "kernels.h"

struct cpu_backend;
struct cuda_backend;

struct ckv_ctx {
    enum ckv_backend_kind backend;
    char describe[128];
    struct cpu_backend *cpu;   /* CKV_BACKEND_CPU: owned */
    struct cuda_backend *cuda; /* CKV_BACKEND_CUDA: owned */
};

/* ---- CPU backend (kernels/cpu/); every function takes a context whose backend is CPU ---- */

/* Sets up ctx->cpu: ISA (opts->isa, or CKV_CPU_ISA when AUTO), thread count. -EINVAL for a bad
 * CKV_CPU_ISA value, -ENOTSUP for an ISA this CPU lacks, -ENOMEM. */
int cpu_backend_init(struct ckv_ctx *ctx, const struct ckv_ctx_opts *opts);
void cpu_backend_fini(struct ckv_ctx *ctx);
enum ckv_cpu_isa cpu_backend_isa(const struct ckv_ctx *ctx);
int cpu_backend_n_threads(const struct ckv_ctx *ctx);

int cpu_dev_alloc(struct ckv_ctx *ctx, size_t bytes, void **ptr);
void cpu_dev_free(struct ckv_ctx *ctx, void *ptr);
int cpu_convert(struct ckv_ctx *ctx, void *dst, enum ckv_dtype dst_dt, const void *src,
                enum ckv_dtype src_dt, size_t n);

int cpu_kmeans(struct ckv_ctx *ctx, const void *keys, enum ckv_dtype dtype, int n_tokens,
               int head_dim, size_t row_stride, int32_t pos_base,
               const struct ckv_kmeans_params *params, struct ckv_kmeans_out *out,
               int *n_clusters_host, int *n_iter_host);
int cpu_pack_blocks(struct ckv_ctx *ctx, const void *k, const void *v, enum ckv_dtype dtype,
                    int head_dim, size_t token_stride, const int32_t *rows, int n_rows,
                    void *pool, const int32_t *slots);

int cpu_select_clusters(struct ckv_ctx *ctx, const struct ckv_select_args *a);
int cpu_quest_page_bounds(struct ckv_ctx *ctx, const void *keys, enum ckv_dtype dtype,
                          int n_tokens, int head_dim, size_t row_stride, float *page_min,
                          float *page_max);
int cpu_quest_select(struct ckv_ctx *ctx, const struct ckv_quest_args *a);
int cpu_oracle_topk(struct ckv_ctx *ctx, const float *q, const void *k, enum ckv_dtype dtype,
                    int n_q_heads, int n_kv_heads, int head_dim, int n_ctx, size_t head_stride,
                    size_t token_stride, int budget, int32_t *sel_tokens);

int cpu_attn_decode_full(struct ckv_ctx *ctx, const struct ckv_attn_full_args *a);
int cpu_attn_decode_blocks(struct ckv_ctx *ctx, const struct ckv_attn_blocks_args *a);
int cpu_attn_prefill(struct ckv_ctx *ctx, const struct ckv_attn_prefill_args *a);

/* ---- CUDA backend (kernels/cuda/, built with CKV_HAVE_CUDA); every function but
 * cuda_available() takes a context whose backend is CUDA. The kernels have the CPU ones'
 * signatures and contract; memory arguments are device pointers. A CUDA error poisons the
 * context: that call and every later one returns -EIO (the worker exits and is restarted). */
#ifdef CKV_HAVE_CUDA
#ifdef __cplusplus
extern "C" {
#endif

/* 1 when the runtime sees at least one device (0 without a driver: no GPU here). */
int cuda_available(void);

/* Sets up ctx->cuda on device opts->device: stream, cuBLAS handle, describe string.
 * CKV_ENODEVICE when there is no such device, -EINVAL for a negative ordinal, -ENOMEM. */
int cuda_backend_init(struct ckv_ctx *ctx, const struct ckv_ctx_opts *opts);
void cuda_backend_fini(struct ckv_ctx *ctx);
int cuda_sync(struct ckv_ctx *ctx);

int cuda_dev_alloc(struct ckv_ctx *ctx, size_t bytes, void **ptr);
void cuda_dev_free(struct ckv_ctx *ctx, void *ptr);
/* h2d and d2d are queued on the stream; d2h synchronises. */
int cuda_copy_h2d(struct ckv_ctx *ctx, void *dst, const void *src, size_t bytes);
int cuda_copy_d2h(struct ckv_ctx *ctx, void *dst, const void *src, size_t bytes);
int cuda_copy_d2d(struct ckv_ctx *ctx, void *dst, const void *src, size_t bytes);
int cuda_convert(struct ckv_ctx *ctx, void *dst, enum ckv_dtype dst_dt, const void *src,
                 enum ckv_dtype src_dt, size_t n);

int cuda_kmeans(struct ckv_ctx *ctx, const void *keys, enum ckv_dtype dtype, int n_tokens,
                int head_dim, size_t row_stride, int32_t pos_base,
                const struct ckv_kmeans_params *params, struct ckv_kmeans_out *out,
                int *n_clusters_host, int *n_iter_host);
int cuda_pack_blocks(struct ckv_ctx *ctx, const void *k, const void *v, enum ckv_dtype dtype,
                     int head_dim, size_t token_stride, const int32_t *rows, int n_rows,
                     void *pool, const int32_t *slots);

int cuda_select_clusters(struct ckv_ctx *ctx, const struct ckv_select_args *a);
int cuda_quest_page_bounds(struct ckv_ctx *ctx, const void *keys, enum ckv_dtype dtype,
                           int n_tokens, int head_dim, size_t row_stride, float *page_min,
                           float *page_max);
int cuda_quest_select(struct ckv_ctx *ctx, const struct ckv_quest_args *a);
int cuda_oracle_topk(struct ckv_ctx *ctx, const float *q, const void *k, enum ckv_dtype dtype,
                     int n_q_heads, int n_kv_heads, int head_dim, int n_ctx, size_t head_stride,
                     size_t token_stride, int budget, int32_t *sel_tokens);

int cuda_attn_decode_full(struct ckv_ctx *ctx, const struct ckv_attn_full_args *a);
int cuda_attn_decode_blocks(struct ckv_ctx *ctx, const struct ckv_attn_blocks_args *a);
int cuda_attn_prefill(struct ckv_ctx *ctx, const struct ckv_attn_prefill_args *a);

#ifdef __cplusplus
}
#endif
#endif /* CKV_HAVE_CUDA */

#endif
