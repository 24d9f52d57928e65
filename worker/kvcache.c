/*
 * The KV manager of one sequence (kvcache.h).
 *
 * Every layer keeps its whole K/V contiguous, token-major: (max_ctx, n_kv_heads, head_dim) in
 * the KV dtype, so a chunk of tokens is appended with one ckv_convert() per tensor and prefill
 * attention, the full layers, k-means and packing read it at a fixed stride.
 */
#include "kvcache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block_store.h"
#include "ckv_clock.h"
#include "ckv_error.h"

struct kv_layer {
    void *k, *v; /* (max_ctx, n_kv_heads, head_dim) dtype, device */
    int n;       /* tokens appended to this layer */
};

struct ckv_kvcache {
    ckv_ctx_t *ctx;
    struct ckv_kv_geom g;
    struct ckv_kv_opts o;
    struct ckv_block_store *store;
    uint64_t seq_uid;
    size_t esz;              /* bytes of one KV element */
    size_t row;              /* elements of one token's row: n_kv_heads * head_dim */
    int n_tokens;            /* tokens of every layer between steps */
    int prefilled;           /* ckv_kvcache_end_prefill done */
    struct kv_layer *layers; /* (n_layers) */
    struct ckv_kv_stats st;
};

/* ------------------------------------------------------------------------------------------
 * Names and options
 * ------------------------------------------------------------------------------------------ */

static const char *const method_names[] = {"full", "clusterkv", "quest", "streaming"};
static const char *const select_names[] = {"per-qhead", "kvhead-max", "kvhead-sum"};

const char *ckv_kv_method_name(enum ckv_kv_method m)
{
    return (unsigned)m < CKV_ARRAY_LEN(method_names) ? method_names[m] : "?";
}

int ckv_kv_method_parse(const char *s, enum ckv_kv_method *out)
{
    for (size_t i = 0; s && i < CKV_ARRAY_LEN(method_names); i++)
        if (strcmp(s, method_names[i]) == 0) {
            *out = (enum ckv_kv_method)i;
            return 0;
        }
    return -EINVAL;
}

const char *ckv_select_mode_name(enum ckv_select_mode m)
{
    return (unsigned)m < CKV_ARRAY_LEN(select_names) ? select_names[m] : "?";
}

int ckv_select_mode_parse(const char *s, enum ckv_select_mode *out)
{
    for (size_t i = 0; s && i < CKV_ARRAY_LEN(select_names); i++)
        if (strcmp(s, select_names[i]) == 0) {
            *out = (enum ckv_select_mode)i;
            return 0;
        }
    return -EINVAL;
}

void ckv_kv_opts_default(struct ckv_kv_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->method = CKV_KV_CLUSTERKV;
    o->budget = 1024;
    o->sinks = 16;
    o->window = 320;
    o->tokens_per_cluster = 80;
    o->window_clusters = 8;
    o->kmeans_iters = 20;
    o->full_layers = 2;
    o->select_mode = CKV_SELECT_KVHEAD_SUM;
    o->dtype = CKV_DTYPE_F16;
    o->cache_blocks = 0;
    o->seed = 0x5eed;
}

int ckv_kv_opts_check(const struct ckv_kv_opts *o, char *err, size_t errlen)
{
    if (!o)
        return ckv_errorf(-EINVAL, err, errlen, "no KV options");
    if ((unsigned)o->method >= CKV_ARRAY_LEN(method_names))
        return ckv_errorf(-EINVAL, err, errlen, "kv method %d unknown", (int)o->method);
    if (o->budget < 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv budget %d: must be >= 1", o->budget);
    if (o->sinks < 0)
        return ckv_errorf(-EINVAL, err, errlen, "kv sinks %d: must be >= 0", o->sinks);
    if (o->window < 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv window %d: must be >= 1", o->window);
    if (o->tokens_per_cluster < 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv tokens_per_cluster %d: must be >= 1",
                          o->tokens_per_cluster);
    if (o->window_clusters < 1 || o->window_clusters > o->window)
        return ckv_errorf(-EINVAL, err, errlen, "kv window_clusters %d: must be in [1, window=%d]",
                          o->window_clusters, o->window);
    if (o->kmeans_iters < 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv kmeans_iters %d: must be >= 1",
                          o->kmeans_iters);
    if (o->full_layers < 0)
        return ckv_errorf(-EINVAL, err, errlen, "kv full_layers %d: must be >= 0", o->full_layers);
    if ((unsigned)o->select_mode >= CKV_ARRAY_LEN(select_names))
        return ckv_errorf(-EINVAL, err, errlen, "kv select_mode %d unknown", (int)o->select_mode);
    if (o->dtype != CKV_DTYPE_F16 && o->dtype != CKV_DTYPE_F32)
        return ckv_errorf(-EINVAL, err, errlen, "kv dtype %d: must be f16 or f32", (int)o->dtype);
    if (o->cache_blocks < 0)
        return ckv_errorf(-EINVAL, err, errlen, "kv cache_blocks %d: must be >= 0",
                          o->cache_blocks);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Life cycle
 * ------------------------------------------------------------------------------------------ */

int ckv_kvcache_new(ckv_ctx_t *ctx, const struct ckv_kv_geom *g, const struct ckv_kv_opts *o,
                    struct ckv_block_store *store, uint64_t seq_uid, ckv_kvcache_t **out, char *err,
                    size_t errlen)
{
    if (!out)
        return ckv_errorf(-EINVAL, err, errlen, "kvcache: no output pointer");
    *out = NULL;
    if (!ctx || !g)
        return ckv_errorf(-EINVAL, err, errlen, "kvcache: no context or geometry");
    int rc = ckv_kv_opts_check(o, err, errlen);
    if (rc)
        return rc;
    if (g->n_layers < 1 || g->n_q_heads < 1 || g->n_kv_heads < 1 || g->max_ctx < 1 ||
        g->n_q_heads % g->n_kv_heads != 0 || g->head_dim < 1 || g->head_dim > CKV_MAX_HEAD_DIM)
        return ckv_errorf(-EINVAL, err, errlen,
                          "kvcache: bad geometry (layers %d, q heads %d, kv heads %d, head_dim "
                          "%d, max_ctx %d)",
                          g->n_layers, g->n_q_heads, g->n_kv_heads, g->head_dim, g->max_ctx);
    if (o->method == CKV_KV_CLUSTERKV) {
        if (!store)
            return ckv_errorf(-EINVAL, err, errlen, "kvcache: clusterkv needs a block store");
        if (store->block_bytes != ckv_block_bytes(g->head_dim, o->dtype))
            return ckv_errorf(-EINVAL, err, errlen,
                              "kvcache: store block size %zu, KV blocks are %zu bytes",
                              store->block_bytes, ckv_block_bytes(g->head_dim, o->dtype));
    }
    ckv_kvcache_t *kv = calloc(1, sizeof(*kv));
    if (!kv)
        return ckv_errorf(-ENOMEM, err, errlen, "kvcache: out of memory");
    kv->ctx = ctx;
    kv->g = *g;
    kv->o = *o;
    kv->store = store;
    kv->seq_uid = seq_uid;
    kv->esz = ckv_dtype_size(o->dtype);
    kv->row = (size_t)g->n_kv_heads * (size_t)g->head_dim;
    kv->layers = calloc((size_t)g->n_layers, sizeof(*kv->layers));
    if (!kv->layers)
        goto err_nomem;
    size_t bytes = (size_t)g->max_ctx * kv->row * kv->esz;
    for (int l = 0; l < g->n_layers; l++) {
        if (ckv_dev_alloc(ctx, bytes, &kv->layers[l].k) ||
            ckv_dev_alloc(ctx, bytes, &kv->layers[l].v))
            goto err_nomem;
    }
    *out = kv;
    return 0;

err_nomem:
    ckv_kvcache_free(&kv);
    return ckv_errorf(-ENOMEM, err, errlen, "kvcache: out of memory for %d tokens", g->max_ctx);
}

void ckv_kvcache_free(ckv_kvcache_t **pkv)
{
    if (!pkv || !*pkv)
        return;
    ckv_kvcache_t *kv = *pkv;
    if (kv->store && kv->o.method == CKV_KV_CLUSTERKV)
        ckv_block_store_drop(kv->store, kv->seq_uid);
    for (int l = 0; kv->layers && l < kv->g.n_layers; l++) {
        if (kv->layers[l].k)
            ckv_dev_free(kv->ctx, kv->layers[l].k);
        if (kv->layers[l].v)
            ckv_dev_free(kv->ctx, kv->layers[l].v);
    }
    free(kv->layers);
    free(kv);
    *pkv = NULL;
}

int ckv_kvcache_n_tokens(const ckv_kvcache_t *kv)
{
    return kv->n_tokens;
}

const struct ckv_kv_opts *ckv_kvcache_opts(const ckv_kvcache_t *kv)
{
    return &kv->o;
}

void ckv_kvcache_stats(const ckv_kvcache_t *kv, struct ckv_kv_stats *out)
{
    *out = kv->st;
}

/* ------------------------------------------------------------------------------------------
 * Appending and prefill
 * ------------------------------------------------------------------------------------------ */

int ckv_kvcache_append(ckv_kvcache_t *kv, int layer, const float *k, const float *v, int n)
{
    if (!kv || layer < 0 || layer >= kv->g.n_layers || !k || !v || n < 1)
        return -EINVAL;
    struct kv_layer *L = &kv->layers[layer];
    /* every layer appends once per step: a layer ahead of the sequence is a caller bug */
    if (L->n != kv->n_tokens)
        return -EINVAL;
    if (n > kv->g.max_ctx - L->n)
        return -ENOSPC;
    size_t off = (size_t)L->n * kv->row * kv->esz, cnt = (size_t)n * kv->row;
    int rc = ckv_convert(kv->ctx, (char *)L->k + off, kv->o.dtype, k, CKV_DTYPE_F32, cnt);
    if (rc == 0)
        rc = ckv_convert(kv->ctx, (char *)L->v + off, kv->o.dtype, v, CKV_DTYPE_F32, cnt);
    if (rc)
        return rc;
    L->n += n;
    if (layer == kv->g.n_layers - 1)
        kv->n_tokens = L->n;
    return 0;
}

int ckv_kvcache_attn_prefill(ckv_kvcache_t *kv, int layer, const float *q, int n, float *out)
{
    if (!kv || layer < 0 || layer >= kv->g.n_layers || !q || !out || n < 1)
        return -EINVAL;
    struct kv_layer *L = &kv->layers[layer];
    if (n > L->n)
        return -EINVAL;
    struct ckv_attn_prefill_args a = {
        .n_q_heads = kv->g.n_q_heads,
        .n_kv_heads = kv->g.n_kv_heads,
        .head_dim = kv->g.head_dim,
        .n_new = n,
        .pos0 = L->n - n,
        .q = q,
        .k = L->k,
        .v = L->v,
        .dtype = kv->o.dtype,
        .head_stride = (size_t)kv->g.head_dim,
        .token_stride = kv->row,
        .out = out,
    };
    return ckv_attn_prefill(kv->ctx, &a);
}

int ckv_kvcache_end_prefill(ckv_kvcache_t *kv)
{
    if (!kv)
        return -EINVAL;
    kv->prefilled = 1;
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Decode
 * ------------------------------------------------------------------------------------------ */

/* Selection units of the options' select_mode (attended_tokens counts per unit). */
static int n_units(const ckv_kvcache_t *kv)
{
    return kv->o.select_mode == CKV_SELECT_PER_QHEAD ? kv->g.n_q_heads : kv->g.n_kv_heads;
}

/* Full attention of layer L's n tokens. */
static int attn_full(ckv_kvcache_t *kv, struct kv_layer *L, const float *q, float *out)
{
    struct ckv_attn_full_args a = {
        .n_q_heads = kv->g.n_q_heads,
        .n_kv_heads = kv->g.n_kv_heads,
        .head_dim = kv->g.head_dim,
        .n_ctx = L->n,
        .q = q,
        .k = L->k,
        .v = L->v,
        .dtype = kv->o.dtype,
        .head_stride = (size_t)kv->g.head_dim,
        .token_stride = kv->row,
        .out = out,
    };
    int rc = ckv_attn_decode_full(kv->ctx, &a);
    if (rc == 0)
        kv->st.attended_tokens += (uint64_t)L->n * (uint64_t)n_units(kv);
    return rc;
}

int ckv_kvcache_attn_decode(ckv_kvcache_t *kv, int layer, const float *q, float *out)
{
    if (!kv || layer < 0 || layer >= kv->g.n_layers || !q || !out)
        return -EINVAL;
    struct kv_layer *L = &kv->layers[layer];
    if (L->n < 1)
        return -EINVAL;
    uint64_t t0 = ckv_now_ns();
    int rc = attn_full(kv, L, q, out);
    kv->st.attn_ms += (double)(ckv_now_ns() - t0) * 1e-6;
    if (rc == 0)
        kv->st.decode_attn_calls++;
    return rc;
}

int ckv_kvcache_end_step(ckv_kvcache_t *kv)
{
    if (!kv)
        return -EINVAL;
    return 0;
}
