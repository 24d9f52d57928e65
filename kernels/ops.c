/*
 * The backend-neutral entry points of ops.h: arguments are checked here, once for all
 * backends, and the call goes to the context's backend: the CPU one (kernels/cpu/cpu_ops*.c)
 * or, in a build with CUDA (CKV_HAVE_CUDA), the CUDA one (kernels/cuda/cuda_ops.cu).
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>

#include "ckv_error.h"
#include "cpu/cpu_ops.h"
#include "kernels_impl.h"
#include "ops.h"
#ifdef CKV_HAVE_CUDA
#include "cuda/cuda_ops.h"
#endif

/* The backend's entry point `fn` for ctx: cpu_<fn>, or cuda_<fn> for a CUDA context. */
#ifdef CKV_HAVE_CUDA
#define OPS(ctx, fn) ((ctx)->backend == CKV_BACKEND_CUDA ? cuda_##fn : cpu_##fn)
#else
#define OPS(ctx, fn) cpu_##fn
#endif

int ckv_wtype_supported(int type)
{
    switch (type) {
    case CKV_W_F32:
    case CKV_W_F16:
    case CKV_W_BF16:
    case CKV_W_Q4_0:
    case CKV_W_Q4_1:
    case CKV_W_Q8_0: return 1;
    }
    return 0;
}

const char *ckv_wtype_name(int type)
{
    switch (type) {
    case CKV_W_F32: return "f32";
    case CKV_W_F16: return "f16";
    case CKV_W_BF16: return "bf16";
    case CKV_W_Q4_0: return "q4_0";
    case CKV_W_Q4_1: return "q4_1";
    case CKV_W_Q8_0: return "q8_0";
    }
    return "?";
}

size_t ckv_wtype_row_bytes(int type, int cols)
{
    if (cols <= 0)
        return 0;
    size_t c = (size_t)cols;
    switch (type) {
    case CKV_W_F32: return 4 * c;
    case CKV_W_F16:
    case CKV_W_BF16: return 2 * c;
    case CKV_W_Q4_0:
    case CKV_W_Q4_1:
    case CKV_W_Q8_0:
        if (c % CPU_QK)
            return 0;
        return c / CPU_QK *
               (type == CKV_W_Q4_0   ? sizeof(struct cpu_blk_q4_0)
                : type == CKV_W_Q4_1 ? sizeof(struct cpu_blk_q4_1)
                                     : sizeof(struct cpu_blk_q8_0));
    }
    return 0;
}

/* A weight the ops can read: known type, positive shape, rows at least a row apart. */
static int weight_ok(const struct ckv_weight *w)
{
    if (!w || !w->data || w->rows < 1 || w->cols < 1 || !ckv_wtype_supported(w->type))
        return 0;
    size_t rb = ckv_wtype_row_bytes(w->type, w->cols);
    return rb > 0 && w->row_bytes >= rb;
}

/* A backend this build implements the ops for. */
static int backend_ok(ckv_ctx_t *ctx)
{
#ifdef CKV_HAVE_CUDA
    return ctx->backend == CKV_BACKEND_CPU || ctx->backend == CKV_BACKEND_CUDA;
#else
    return ctx->backend == CKV_BACKEND_CPU;
#endif
}

int ckv_matmul(ckv_ctx_t *ctx, const struct ckv_weight *w, const float *x, int n, float *y)
{
    if (!ctx || !weight_ok(w) || !x || !y || n < 1)
        return -EINVAL;
    if (!backend_ok(ctx))
        return CKV_EUNSUPPORTED;
    return OPS(ctx, matmul)(ctx, w, x, n, y);
}

int ckv_get_rows(ckv_ctx_t *ctx, const struct ckv_weight *w, const int32_t *ids, int n, float *out)
{
    if (!ctx || !weight_ok(w) || !ids || !out || n < 1)
        return -EINVAL;
    for (int i = 0; i < n; i++) /* ids are a host array: checked before anything is written */
        if (ids[i] < 0 || ids[i] >= w->rows)
            return -EINVAL;
    if (!backend_ok(ctx))
        return CKV_EUNSUPPORTED;
    return OPS(ctx, get_rows)(ctx, w, ids, n, out);
}

int ckv_rmsnorm(ckv_ctx_t *ctx, const float *x, const float *weight, int n, int dim, float eps,
                float *out)
{
    if (!ctx || !x || !weight || !out || n < 1 || dim < 1 || !(eps >= 0.0f) || !isfinite(eps))
        return -EINVAL;
    if (!backend_ok(ctx))
        return CKV_EUNSUPPORTED;
    return OPS(ctx, rmsnorm)(ctx, x, weight, n, dim, eps, out);
}

int ckv_rope(ckv_ctx_t *ctx, float *x, int n, int n_heads, int head_dim, const int32_t *pos,
             const struct ckv_rope_params *p)
{
    if (!ctx || !x || n < 1 || n_heads < 1 || head_dim < 2 || !pos || !p ||
        (p->style != CKV_ROPE_NORM && p->style != CKV_ROPE_NEOX) || p->n_rot < 2 || p->n_rot % 2 ||
        p->n_rot > head_dim || !(p->theta > 0.0f) || !isfinite(p->theta) ||
        !(p->freq_scale > 0.0f) || !isfinite(p->freq_scale))
        return -EINVAL;
    if (p->freq_factors)
        for (int i = 0; i < p->n_rot / 2; i++)
            if (!(p->freq_factors[i] > 0.0f) || !isfinite(p->freq_factors[i]))
                return -EINVAL;
    if (!backend_ok(ctx))
        return CKV_EUNSUPPORTED;
    return OPS(ctx, rope)(ctx, x, n, n_heads, head_dim, pos, p);
}

int ckv_swiglu(ckv_ctx_t *ctx, const float *gate, const float *up, size_t n, float *out)
{
    if (!ctx || (n && (!gate || !up || !out)))
        return -EINVAL;
    if (!backend_ok(ctx))
        return CKV_EUNSUPPORTED;
    return n ? OPS(ctx, swiglu)(ctx, gate, up, n, out) : 0;
}

int ckv_add(ckv_ctx_t *ctx, float *x, const float *y, size_t n)
{
    if (!ctx || (n && (!x || !y)))
        return -EINVAL;
    if (!backend_ok(ctx))
        return CKV_EUNSUPPORTED;
    return n ? OPS(ctx, add)(ctx, x, y, n) : 0;
}

int ckv_add_bias(ckv_ctx_t *ctx, float *x, const float *bias, int n, int dim)
{
    if (!ctx || !x || !bias || n < 1 || dim < 1)
        return -EINVAL;
    if (!backend_ok(ctx))
        return CKV_EUNSUPPORTED;
    return OPS(ctx, add_bias)(ctx, x, bias, n, dim);
}
