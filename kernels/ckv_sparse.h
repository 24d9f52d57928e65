/*
 * Host-side assembly of ClusterKV's sparse path over one block pool, for one layer of one
 * sequence: clustering each KV head's keys, laying sinks, clusters and window into blocks
 * (DESIGN.md: a cluster's K/V rows contiguous in cluster order, 16-token blocks, every
 * cluster starting a fresh block), and turning a step's selection into the block lists of
 * ckv_attn_decode_blocks(). The benchmark, the evaluation and the tests use it; the engine
 * may, or may keep its own cache-aware version (its clusters live in a cache, not at fixed
 * slots).
 *
 * Layout of head h, in token positions: sinks [0, n_sink), clustered [n_sink, n_ctx -
 * n_window), window [n_ctx - n_window, n_ctx); a context shorter than the sinks has only
 * sinks. Cluster indices are global over the layer (head h owns [head_offsets[h],
 * head_offsets[h+1]), as ckv_select_args wants).
 *
 * Ownership: the layout owns its host arrays (free with ckv_sparse_layout_free); the pool
 * and the centroid buffer belong to the caller (device memory of ctx).
 */
#ifndef CKV_SPARSE_H
#define CKV_SPARSE_H

#include <stdint.h>

#include "kernels.h"

struct ckv_sparse_layout {
    int n_kv_heads;
    int cap_clusters, cap_tokens; /* capacities of the cluster and member arrays */
    int n_clusters_total;
    int32_t *head_offsets;       /* (n_kv_heads + 1) */
    int32_t *sizes;              /* (cap_clusters) tokens per cluster */
    int32_t *first_slot;         /* (cap_clusters) cluster c: slots first_slot[c] .. + blocks(c) */
    int32_t *member_offsets;     /* (cap_clusters + 1) into members */
    int32_t *members;            /* (cap_tokens) positions, cluster by cluster, ascending in one */
    int32_t *sink_slot, *n_sink; /* (n_kv_heads) first slot, tokens */
    int32_t *window_slot, *n_window; /* (n_kv_heads) first slot, tokens */
    int32_t next_slot;               /* first unused slot of the pool */
    double last_kmeans_ms;           /* wall time of the last ckv_sparse_add_head's k-means */
    int last_kmeans_iters;           /* its iterations */
};

/* Allocates the host arrays for n_kv_heads heads, at most cap_clusters clusters and
 * cap_tokens clustered tokens in all. Returns 0, -EINVAL or -ENOMEM. */
int ckv_sparse_layout_init(struct ckv_sparse_layout *l, int n_kv_heads, int cap_clusters,
                           int cap_tokens);
void ckv_sparse_layout_free(struct ckv_sparse_layout *l);

/* Adds KV head h (heads in order 0, 1, ...): clusters its keys [n_sink, n_ctx - n_window)
 * with ckv_kmeans (params->n_clusters clusters, clamped), writes their centroids to
 * centroids (device, (cap_clusters, head_dim) f32, at the head's global index) and packs
 * sinks, clusters and window into the pool from l->next_slot on (pool_slots blocks in all).
 * k, v: the head's (n_ctx, head_dim) rows at token_stride. Returns 0, -EINVAL, -ENOSPC
 * (pool or capacities too small) or a kernel's error. */
int ckv_sparse_add_head(ckv_ctx_t *ctx, struct ckv_sparse_layout *l, int h, const void *k,
                        const void *v, enum ckv_dtype dtype, int head_dim, size_t token_stride,
                        int n_ctx, int n_sink, int n_window, const struct ckv_kmeans_params *params,
                        float *centroids, void *pool, int pool_slots);

/* Appends to refs the blocks of the first n_tokens tokens of cluster c (n_tokens <= its
 * size). Returns refs written. */
int ckv_sparse_cluster_refs(const struct ckv_sparse_layout *l, int c, int n_tokens,
                            struct ckv_block_ref *refs);

/* Block lists of one decode step, one list per selection unit (mode, as ckv_select_args):
 * the unit's KV head's sinks, its selected clusters (sel_*, as ckv_select_clusters wrote
 * them; the last one truncated to sel_last_take tokens) and its window. With sel_clusters
 * NULL every cluster of the head is listed in full (full attention through blocks).
 * list_offsets: (n_units + 1). Returns 0 or -ENOSPC when refs_cap is too small. */
int ckv_sparse_lists(const struct ckv_sparse_layout *l, enum ckv_select_mode mode, int n_q_heads,
                     const int32_t *sel_clusters, const int32_t *sel_count,
                     const int32_t *sel_last_take, int max_selected, struct ckv_block_ref *refs,
                     int refs_cap, int32_t *list_offsets);

#endif
