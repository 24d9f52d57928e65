/*
 * The backend-neutral entry points of kernels.h: every argument that can be checked without
 * reading device memory is checked here, once for all backends, and the call goes to the
 * context's backend: the CPU one, or the CUDA one (kernels/cuda/) for a CUDA context when the
 * build has it (CKV_HAVE_CUDA; without it a CUDA context is CKV_ENODEVICE).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "kernels_impl.h"

/* The backend's entry point `fn` for ctx: cpu_<fn>, or cuda_<fn> for a CUDA context. */
#ifdef CKV_HAVE_CUDA
#define BACKEND(ctx, fn) ((ctx)->backend == CKV_BACKEND_CUDA ? cuda_##fn : cpu_##fn)
#else
#define BACKEND(ctx, fn) cpu_##fn
#endif

size_t ckv_dtype_size(enum ckv_dtype dt)
{
    switch (dt) {
    case CKV_DTYPE_F32: return 4;
    case CKV_DTYPE_F16: return 2;
    }
    return 0;
}

const char *ckv_dtype_name(enum ckv_dtype dt)
{
    switch (dt) {
    case CKV_DTYPE_F32: return "f32";
    case CKV_DTYPE_F16: return "f16";
    }
    return "?";
}

size_t ckv_block_bytes(int head_dim, enum ckv_dtype dt)
{
    if (head_dim <= 0)
        return 0;
    return (size_t)2 * CKV_BLOCK_TOKENS * (size_t)head_dim * ckv_dtype_size(dt);
}

/* ---- contexts and memory ---- */

int ckv_cuda_available(void)
{
#ifdef CKV_HAVE_CUDA
    return cuda_available();
#else
    return 0; /* no CUDA backend in this build */
#endif
}

int ckv_ctx_new(const struct ckv_ctx_opts *opts, ckv_ctx_t **out)
{
    if (!opts || !out)
        return -EINVAL;
#ifndef CKV_HAVE_CUDA
    if (opts->backend == CKV_BACKEND_CUDA)
        return CKV_ENODEVICE;
#endif
    if (opts->backend != CKV_BACKEND_CPU && opts->backend != CKV_BACKEND_CUDA)
        return -EINVAL;
    struct ckv_ctx *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return -ENOMEM;
    ctx->backend = opts->backend;
    int rc = BACKEND(ctx, backend_init)(ctx, opts);
    if (rc) {
        free(ctx);
        return rc;
    }
    *out = ctx;
    return 0;
}

void ckv_ctx_destroy(ckv_ctx_t **ctx)
{
    if (!ctx || !*ctx)
        return;
    BACKEND(*ctx, backend_fini)(*ctx);
    free(*ctx);
    *ctx = NULL;
}

const char *ckv_ctx_describe(const ckv_ctx_t *ctx)
{
    return ctx ? ctx->describe : "(null)";
}

enum ckv_backend_kind ckv_ctx_backend(const ckv_ctx_t *ctx)
{
    return ctx->backend;
}

enum ckv_cpu_isa ckv_ctx_cpu_isa(const ckv_ctx_t *ctx)
{
    return ctx->backend == CKV_BACKEND_CPU ? cpu_backend_isa(ctx) : CKV_ISA_AUTO;
}

int ckv_ctx_n_threads(const ckv_ctx_t *ctx)
{
    return ctx->backend == CKV_BACKEND_CPU ? cpu_backend_n_threads(ctx) : 0;
}

int ckv_ctx_sync(ckv_ctx_t *ctx)
{
    if (!ctx)
        return -EINVAL;
#ifdef CKV_HAVE_CUDA
    if (ctx->backend == CKV_BACKEND_CUDA)
        return cuda_sync(ctx);
#endif
    return 0; /* the CPU backend runs every kernel to completion */
}

int ckv_dev_alloc(ckv_ctx_t *ctx, size_t bytes, void **ptr)
{
    if (!ctx || !ptr || bytes == 0)
        return -EINVAL;
    return BACKEND(ctx, dev_alloc)(ctx, bytes, ptr);
}

void ckv_dev_free(ckv_ctx_t *ctx, void *ptr)
{
    if (ctx && ptr)
        BACKEND(ctx, dev_free)(ctx, ptr);
}

/* cuda_fn: the CUDA backend's copy of this direction (unused without CKV_HAVE_CUDA). */
static int copy_check(ckv_ctx_t *ctx, void *dst, const void *src, size_t bytes,
                      int (*cuda_fn)(struct ckv_ctx *, void *, const void *, size_t))
{
    if (!ctx || (bytes && (!dst || !src)))
        return -EINVAL;
#ifdef CKV_HAVE_CUDA
    if (ctx->backend == CKV_BACKEND_CUDA)
        return bytes ? cuda_fn(ctx, dst, src, bytes) : 0;
#endif
    (void)cuda_fn;
    if (bytes)
        memmove(dst, src, bytes); /* CPU: device memory is host memory */
    return 0;
}

#ifdef CKV_HAVE_CUDA
#define CUDA_COPY(dir) cuda_copy_##dir
#else
#define CUDA_COPY(dir) NULL
#endif

int ckv_copy_h2d(ckv_ctx_t *ctx, void *dst_dev, const void *src_host, size_t bytes)
{
    return copy_check(ctx, dst_dev, src_host, bytes, CUDA_COPY(h2d));
}

int ckv_copy_d2h(ckv_ctx_t *ctx, void *dst_host, const void *src_dev, size_t bytes)
{
    return copy_check(ctx, dst_host, src_dev, bytes, CUDA_COPY(d2h));
}

int ckv_copy_d2d(ckv_ctx_t *ctx, void *dst_dev, const void *src_dev, size_t bytes)
{
    return copy_check(ctx, dst_dev, src_dev, bytes, CUDA_COPY(d2d));
}

/* ---- argument checks shared by the kernels ---- */

static int dtype_ok(enum ckv_dtype dt)
{
    return dt == CKV_DTYPE_F32 || dt == CKV_DTYPE_F16;
}

static int head_dim_ok(int d)
{
    return d >= 1 && d <= CKV_MAX_HEAD_DIM;
}

static int gqa_ok(int n_q_heads, int n_kv_heads)
{
    return n_q_heads >= 1 && n_kv_heads >= 1 && n_q_heads % n_kv_heads == 0;
}

/* A row stride between n rows of head_dim elements. */
static int stride_ok(size_t stride, int n, int head_dim)
{
    return n <= 1 || stride >= (size_t)head_dim;
}

static int scale_ok(float s)
{
    return isfinite(s);
}

static int mode_ok(enum ckv_select_mode m)
{
    return m == CKV_SELECT_PER_QHEAD || m == CKV_SELECT_KVHEAD_MAX || m == CKV_SELECT_KVHEAD_SUM;
}

int ckv_convert(ckv_ctx_t *ctx, void *dst_dev, enum ckv_dtype dst_dt, const void *src_dev,
                enum ckv_dtype src_dt, size_t n)
{
    if (!ctx || !dtype_ok(dst_dt) || !dtype_ok(src_dt) || (n && (!dst_dev || !src_dev)))
        return -EINVAL;
    if (n == 0)
        return 0;
    return BACKEND(ctx, convert)(ctx, dst_dev, dst_dt, src_dev, src_dt, n);
}

/* ---- clustering ---- */

int ckv_kmeans(ckv_ctx_t *ctx, const void *keys, enum ckv_dtype dtype, int n_tokens, int head_dim,
               size_t row_stride, int32_t pos_base, const struct ckv_kmeans_params *params,
               struct ckv_kmeans_out *out, int *n_clusters_host, int *n_iter_host)
{
    if (!ctx || !keys || !dtype_ok(dtype) || n_tokens < 1 || !head_dim_ok(head_dim) ||
        !stride_ok(row_stride, n_tokens, head_dim) || pos_base < 0 ||
        (int64_t)pos_base + n_tokens > INT32_MAX || !params || params->n_clusters < 1 ||
        params->max_iter < 1 || !(params->tol >= 0.0f && params->tol <= 1.0f) || !out ||
        !out->centroids || !out->sizes || !out->offsets || !out->members || !n_clusters_host)
        return -EINVAL;
    return BACKEND(ctx, kmeans)(ctx, keys, dtype, n_tokens, head_dim, row_stride, pos_base, params,
                                out, n_clusters_host, n_iter_host);
}

int ckv_pack_blocks(ckv_ctx_t *ctx, const void *k, const void *v, enum ckv_dtype dtype,
                    int head_dim, size_t token_stride, const int32_t *rows, int n_rows,
                    void *pool, const int32_t *slots)
{
    if (!ctx || !k || !v || !dtype_ok(dtype) || !head_dim_ok(head_dim) ||
        token_stride < (size_t)head_dim || !rows || n_rows < 1 || !pool || !slots)
        return -EINVAL;
    return BACKEND(ctx, pack_blocks)(ctx, k, v, dtype, head_dim, token_stride, rows, n_rows, pool,
                                     slots);
}

/* ---- selection ---- */

int ckv_select_clusters(ckv_ctx_t *ctx, const struct ckv_select_args *a)
{
    if (!ctx || !a || !gqa_ok(a->n_q_heads, a->n_kv_heads) || !head_dim_ok(a->head_dim) ||
        !mode_ok(a->mode) || !a->q || a->n_clusters_total < 0 ||
        (a->n_clusters_total > 0 && ((!a->centroids && !a->centroids_f16) || !a->sizes)) ||
        !a->head_offsets ||
        a->budget < 1 || a->max_selected < 1 || !a->sel_clusters || !a->sel_count ||
        !a->sel_last_take)
        return -EINVAL;
    return BACKEND(ctx, select_clusters)(ctx, a);
}

int ckv_quest_page_bounds(ckv_ctx_t *ctx, const void *keys, enum ckv_dtype dtype, int n_tokens,
                          int head_dim, size_t row_stride, float *page_min, float *page_max)
{
    if (!ctx || !keys || !dtype_ok(dtype) || n_tokens < 1 || !head_dim_ok(head_dim) ||
        !stride_ok(row_stride, n_tokens, head_dim) || !page_min || !page_max)
        return -EINVAL;
    return BACKEND(ctx, quest_page_bounds)(ctx, keys, dtype, n_tokens, head_dim, row_stride,
                                           page_min, page_max);
}

int ckv_quest_select(ckv_ctx_t *ctx, const struct ckv_quest_args *a)
{
    if (!ctx || !a || !gqa_ok(a->n_q_heads, a->n_kv_heads) || !head_dim_ok(a->head_dim) ||
        !mode_ok(a->mode) || !a->q || !a->page_min || !a->page_max || a->n_pages < 1 ||
        a->n_select < 1 || !a->sel_pages || !a->sel_count)
        return -EINVAL;
    return BACKEND(ctx, quest_select)(ctx, a);
}

int ckv_oracle_topk(ckv_ctx_t *ctx, const float *q, const void *k, enum ckv_dtype dtype,
                    int n_q_heads, int n_kv_heads, int head_dim, int n_ctx, size_t head_stride,
                    size_t token_stride, int budget, int32_t *sel_tokens)
{
    if (!ctx || !q || !k || !dtype_ok(dtype) || !gqa_ok(n_q_heads, n_kv_heads) ||
        !head_dim_ok(head_dim) || n_ctx < 1 || !stride_ok(token_stride, n_ctx, head_dim) ||
        !stride_ok(head_stride, n_kv_heads, head_dim) || budget < 1 || budget > n_ctx ||
        !sel_tokens)
        return -EINVAL;
    return BACKEND(ctx, oracle_topk)(ctx, q, k, dtype, n_q_heads, n_kv_heads, head_dim, n_ctx,
                                     head_stride, token_stride, budget, sel_tokens);
}

/* ---- attention ---- */

int ckv_attn_decode_full(ckv_ctx_t *ctx, const struct ckv_attn_full_args *a)
{
    if (!ctx || !a || !gqa_ok(a->n_q_heads, a->n_kv_heads) || !head_dim_ok(a->head_dim) ||
        a->n_ctx < 0 || !a->q || !a->out || !dtype_ok(a->dtype) || !scale_ok(a->scale) ||
        (a->n_ctx > 0 && (!a->k || !a->v || !stride_ok(a->head_stride, a->n_kv_heads, a->head_dim))) ||
        !stride_ok(a->token_stride, a->n_ctx, a->head_dim))
        return -EINVAL;
    return BACKEND(ctx, attn_decode_full)(ctx, a);
}

int ckv_attn_decode_blocks(ckv_ctx_t *ctx, const struct ckv_attn_blocks_args *a)
{
    if (!ctx || !a || a->n_q_heads < 1 || !head_dim_ok(a->head_dim) || a->n_lists < 1 ||
        a->heads_per_list < 1 || (int64_t)a->n_lists * a->heads_per_list != a->n_q_heads ||
        !a->q || !a->list_offsets || !a->out || !dtype_ok(a->dtype) || !scale_ok(a->scale))
        return -EINVAL;
    return BACKEND(ctx, attn_decode_blocks)(ctx, a);
}

int ckv_attn_prefill(ckv_ctx_t *ctx, const struct ckv_attn_prefill_args *a)
{
    if (!ctx || !a || !gqa_ok(a->n_q_heads, a->n_kv_heads) || !head_dim_ok(a->head_dim) ||
        a->n_new < 0 || a->pos0 < 0 || (int64_t)a->pos0 + a->n_new > INT32_MAX ||
        !dtype_ok(a->dtype) || !scale_ok(a->scale))
        return -EINVAL;
    if (a->n_new == 0)
        return 0;
    if (!a->q || !a->k || !a->v || !a->out ||
        !stride_ok(a->token_stride, a->pos0 + a->n_new, a->head_dim) ||
        !stride_ok(a->head_stride, a->n_kv_heads, a->head_dim))
        return -EINVAL;
    return BACKEND(ctx, attn_prefill)(ctx, a);
}
