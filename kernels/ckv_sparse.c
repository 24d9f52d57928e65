/*
 * ClusterKV's sparse path assembled on the host (see ckv_sparse.h).
 */
#include "ckv_sparse.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_clock.h"

static int blocks_of(int tokens)
{
    return (tokens + CKV_BLOCK_TOKENS - 1) / CKV_BLOCK_TOKENS;
}

int ckv_sparse_layout_init(struct ckv_sparse_layout *l, int n_kv_heads, int cap_clusters,
                           int cap_tokens)
{
    memset(l, 0, sizeof(*l));
    if (n_kv_heads < 1 || cap_clusters < 0 || cap_tokens < 0)
        return -EINVAL;
    l->n_kv_heads = n_kv_heads;
    l->cap_clusters = cap_clusters;
    l->cap_tokens = cap_tokens;
    l->head_offsets = calloc((size_t)n_kv_heads + 1, sizeof(int32_t));
    l->sizes = calloc((size_t)cap_clusters + 1, sizeof(int32_t));
    l->first_slot = calloc((size_t)cap_clusters + 1, sizeof(int32_t));
    l->member_offsets = calloc((size_t)cap_clusters + 1, sizeof(int32_t));
    l->members = calloc((size_t)cap_tokens + 1, sizeof(int32_t));
    l->sink_slot = calloc((size_t)n_kv_heads, sizeof(int32_t));
    l->n_sink = calloc((size_t)n_kv_heads, sizeof(int32_t));
    l->window_slot = calloc((size_t)n_kv_heads, sizeof(int32_t));
    l->n_window = calloc((size_t)n_kv_heads, sizeof(int32_t));
    if (!l->head_offsets || !l->sizes || !l->first_slot || !l->member_offsets || !l->members ||
        !l->sink_slot || !l->n_sink || !l->window_slot || !l->n_window) {
        ckv_sparse_layout_free(l);
        return -ENOMEM;
    }
    return 0;
}

void ckv_sparse_layout_free(struct ckv_sparse_layout *l)
{
    free(l->head_offsets);
    free(l->sizes);
    free(l->first_slot);
    free(l->member_offsets);
    free(l->members);
    free(l->sink_slot);
    free(l->n_sink);
    free(l->window_slot);
    free(l->n_window);
    memset(l, 0, sizeof(*l));
}

/* Packs rows [r0, r0 + n) of k/v into consecutive slots from l->next_slot. */
static int pack_range(ckv_ctx_t *ctx, struct ckv_sparse_layout *l, const void *k, const void *v,
                      enum ckv_dtype dt, int d, size_t stride, const int32_t *rows, int n,
                      int pool_slots, void *pool, int32_t *first)
{
    *first = l->next_slot;
    if (n == 0)
        return 0;
    int nb = blocks_of(n);
    if (l->next_slot + nb > pool_slots)
        return -ENOSPC;
    int32_t *slots = malloc(sizeof(int32_t) * (size_t)nb);
    if (!slots)
        return -ENOMEM;
    for (int b = 0; b < nb; b++)
        slots[b] = l->next_slot + b;
    int rc = ckv_pack_blocks(ctx, k, v, dt, d, stride, rows, n, pool, slots);
    free(slots);
    if (rc == 0)
        l->next_slot += nb;
    return rc;
}

int ckv_sparse_add_head(ckv_ctx_t *ctx, struct ckv_sparse_layout *l, int h, const void *k,
                        const void *v, enum ckv_dtype dtype, int head_dim, size_t token_stride,
                        int n_ctx, int n_sink, int n_window, const struct ckv_kmeans_params *params,
                        float *centroids, void *pool, int pool_slots)
{
    if (!l || h < 0 || h >= l->n_kv_heads || n_ctx < 0 || n_sink < 0 || n_window < 0 || !params)
        return -EINVAL;
    int sinks = n_sink < n_ctx ? n_sink : n_ctx;
    int window = n_window < n_ctx - sinks ? n_window : n_ctx - sinks;
    int n_clu = n_ctx - sinks - window;
    int c0 = l->head_offsets[h], m0 = l->member_offsets[c0];
    int want = params->n_clusters < n_clu ? params->n_clusters : n_clu;
    if (c0 + want > l->cap_clusters || m0 + n_clu > l->cap_tokens)
        return -ENOSPC;
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)(n_ctx > 0 ? n_ctx : 1));
    if (!rows)
        return -ENOMEM;
    int rc = 0, nc = 0;
    for (int t = 0; t < n_ctx; t++)
        rows[t] = t;
    rc = pack_range(ctx, l, k, v, dtype, head_dim, token_stride, rows, sinks, pool_slots, pool,
                    &l->sink_slot[h]);
    l->n_sink[h] = sinks;
    if (rc == 0 && n_clu > 0) {
        const char *kc = (const char *)k + (size_t)sinks * token_stride * ckv_dtype_size(dtype);
        struct ckv_kmeans_out o = {centroids + (size_t)c0 * head_dim, l->sizes + c0,
                                   l->member_offsets + c0, l->members + m0};
        uint64_t t0 = ckv_now_ns();
        rc = ckv_kmeans(ctx, kc, dtype, n_clu, head_dim, token_stride, sinks, params, &o, &nc,
                        &l->last_kmeans_iters);
        l->last_kmeans_ms = (double)(ckv_now_ns() - t0) * 1e-6;
        /* kmeans wrote offsets relative to the head's first member: make them global */
        for (int c = 0; rc == 0 && c <= nc; c++)
            l->member_offsets[c0 + c] += m0;
        for (int c = 0; rc == 0 && c < nc; c++)
            rc = pack_range(ctx, l, k, v, dtype, head_dim, token_stride,
                            l->members + l->member_offsets[c0 + c], l->sizes[c0 + c], pool_slots,
                            pool, &l->first_slot[c0 + c]);
    }
    if (rc == 0)
        rc = pack_range(ctx, l, k, v, dtype, head_dim, token_stride, rows + sinks + n_clu, window,
                        pool_slots, pool, &l->window_slot[h]);
    l->n_window[h] = window;
    free(rows);
    if (rc)
        return rc;
    l->member_offsets[c0 + nc] = m0 + n_clu;
    for (int hh = h + 1; hh <= l->n_kv_heads; hh++)
        l->head_offsets[hh] = c0 + nc;
    l->n_clusters_total = c0 + nc;
    return 0;
}

/* Appends the blocks of n tokens starting at slot first. */
static int range_refs(int32_t first, int n, struct ckv_block_ref *refs)
{
    int nb = blocks_of(n);
    for (int b = 0; b < nb; b++)
        refs[b] = (struct ckv_block_ref){first + b,
                                         b == nb - 1 ? n - b * CKV_BLOCK_TOKENS : CKV_BLOCK_TOKENS};
    return nb;
}

int ckv_sparse_cluster_refs(const struct ckv_sparse_layout *l, int c, int n_tokens,
                            struct ckv_block_ref *refs)
{
    return range_refs(l->first_slot[c], n_tokens, refs);
}

int ckv_sparse_lists(const struct ckv_sparse_layout *l, enum ckv_select_mode mode, int n_q_heads,
                     const int32_t *sel_clusters, const int32_t *sel_count,
                     const int32_t *sel_last_take, int max_selected, struct ckv_block_ref *refs,
                     int refs_cap, int32_t *list_offsets)
{
    int G = n_q_heads / l->n_kv_heads;
    int n_units = mode == CKV_SELECT_PER_QHEAD ? n_q_heads : l->n_kv_heads;
    int n = 0;
    list_offsets[0] = 0;
    for (int u = 0; u < n_units; u++) {
        int h = mode == CKV_SELECT_PER_QHEAD ? u / G : u;
        int c0 = l->head_offsets[h], c1 = l->head_offsets[h + 1];
        int count = sel_clusters ? sel_count[u] : c1 - c0;
        /* bound first: every block of this unit */
        int need = blocks_of(l->n_sink[h]) + blocks_of(l->n_window[h]);
        for (int i = 0; i < count; i++) {
            int c = sel_clusters ? sel_clusters[(size_t)u * max_selected + i] : c0 + i;
            need += blocks_of(l->sizes[c]);
        }
        if (n + need > refs_cap)
            return -ENOSPC;
        n += range_refs(l->sink_slot[h], l->n_sink[h], refs + n);
        for (int i = 0; i < count; i++) {
            int c = sel_clusters ? sel_clusters[(size_t)u * max_selected + i] : c0 + i;
            int take = sel_clusters && i == count - 1 ? sel_last_take[u] : l->sizes[c];
            n += range_refs(l->first_slot[c], take, refs + n);
        }
        n += range_refs(l->window_slot[h], l->n_window[h], refs + n);
        list_offsets[u + 1] = n;
    }
    return 0;
}
