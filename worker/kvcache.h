/*
 * The KV manager of one sequence (DESIGN.md "Decode step on a worker", ALGORITHM.md): what
 * the forward pass (forward.c) calls for every layer to store K/V and compute attention.
 *
 * Methods:
 *   full       every token attended (the reference).
 *   clusterkv  sinks + clusters selected up to `budget` tokens + recent window. The prompt's
 *              keys are clustered after prefill (ckv_kvcache_end_prefill), every full window of
 *              decoded tokens is clustered into window_clusters new clusters. Clusters live in
 *              a block store (block_store.h) as 16-token blocks and are recalled through a
 *              per-sequence cluster cache; layers < full_layers and (layer, head)s whose
 *              clustered tokens number at most `budget` use full attention (a layer whose
 *              heads all do attends the contiguous cache: bit for bit the method full).
 *   quest      16-token pages of consecutive tokens, min/max key bounds, top budget/16 pages,
 *              the current page always (ALGORITHM.md section 6); first full_layers full.
 *   streaming  sinks + the most recent `budget` tokens (StreamingLLM); the first full_layers
 *              are full here too, so that the baselines compare at equal terms (full_layers 0
 *              gives the original StreamingLLM).
 *
 * ClusterKV's window right after prefill (n prompt tokens): the last min(n - sinks, window / 2)
 * prompt tokens stay unclustered in the window, attended in full, because the first generated
 * tokens depend most on the end of the prompt; the window is clustered once it holds `window`
 * tokens (the first time after window - window / 2 steps, then every `window` steps). Clusters
 * of the prompt are written to the store and recalled on demand; window clusters are written
 * and also kept in the cache. cache_blocks is a soft limit: the clusters one layer attends in
 * one step are never evicted during that step, the cache grows instead.
 *
 * Memory: every layer also keeps its whole K/V contiguous (max_ctx tokens, KV dtype): prefill
 * attention, the full layers, k-means of the windows and streaming read it. The sparse paths
 * attend only their blocks (clusterkv: sinks, window and the cluster cache; quest: a copy of
 * every page in block layout).
 *
 * Usage per sequence: for each prefill chunk and layer, ckv_kvcache_append() the chunk's K/V
 * (post-RoPE) then ckv_kvcache_attn_prefill() (causal, full attention over everything cached:
 * every method prefills exactly); after the last chunk ckv_kvcache_end_prefill(); then per
 * decode step and layer ckv_kvcache_append() one token and ckv_kvcache_attn_decode(), then
 * ckv_kvcache_end_step() once all layers are done.
 *
 * Threading: one sequence is used by one thread at a time; arrays are device pointers of the
 * context (host memory on the CPU backend).
 */
#ifndef CKV_KVCACHE_H
#define CKV_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

struct ckv_block_store;

enum ckv_kv_method {
    CKV_KV_FULL = 0,
    CKV_KV_CLUSTERKV = 1,
    CKV_KV_QUEST = 2,
    CKV_KV_STREAMING = 3,
};

/* The names, indexed by the enums, NULL-terminated (for config tables' enum options). */
extern const char *const ckv_kv_method_names[];
extern const char *const ckv_select_mode_names[];

/* "full", "clusterkv", "quest", "streaming"; parse returns -EINVAL for other names. */
const char *ckv_kv_method_name(enum ckv_kv_method m);
int ckv_kv_method_parse(const char *s, enum ckv_kv_method *out);
/* "per-qhead", "kvhead-max", "kvhead-sum". */
const char *ckv_select_mode_name(enum ckv_select_mode m);
int ckv_select_mode_parse(const char *s, enum ckv_select_mode *out);

struct ckv_kv_opts {
    enum ckv_kv_method method;
    int budget;             /* tokens per selection unit (clusterkv, quest, streaming); 1024 */
    int sinks;              /* attention sinks; 16 */
    int window;             /* recent window, clustered when full (clusterkv); 320 */
    int tokens_per_cluster; /* C = ceil(clustered tokens / this) after prefill; 80 */
    int window_clusters;    /* clusters per full window; 8 */
    int kmeans_iters;       /* 20 */
    int full_layers;        /* first layers always full; 2 */
    enum ckv_select_mode select_mode; /* GQA selection unit */
    enum ckv_dtype dtype;             /* KV dtype; f16 */
    int cache_blocks; /* cluster cache capacity in blocks per sequence; 0: unbounded */
    uint64_t seed;    /* k-means seed */
};

/* The defaults above (method clusterkv). */
void ckv_kv_opts_default(struct ckv_kv_opts *o);
/* 0, or -EINVAL with a message naming the bad option. */
int ckv_kv_opts_check(const struct ckv_kv_opts *o, char *err, size_t errlen);

struct ckv_kv_geom {
    int n_layers, n_q_heads, n_kv_heads, head_dim;
    int max_ctx; /* tokens the sequence may hold */
};

/* Counters since creation (the engine sums them over sequences). A selection unit is a KV
 * head, or a query head for CKV_SELECT_PER_QHEAD; the full layers count as attending every
 * token per unit. Cache hits and misses count each cluster once per layer step (query heads
 * of a group selecting the same cluster make one lookup); bytes are its blocks' bytes. */
struct ckv_kv_stats {
    uint64_t decode_attn_calls;
    uint64_t attended_tokens;          /* tokens attended, summed over calls and selection units */
    uint64_t clusters_selected;        /* summed over calls and units */
    uint64_t cache_hits, cache_misses; /* clusters */
    uint64_t cache_hit_bytes, cache_miss_bytes;
    uint64_t clusters_made; /* by k-means, prompt and windows */
    double kmeans_ms, select_ms, attn_ms, fetch_ms;
};

typedef struct ckv_kvcache ckv_kvcache_t;

/* store may be NULL for methods other than clusterkv; for clusterkv it receives the clusters
 * under seq_uid. Returns 0, -EINVAL (err says why) or -ENOMEM. */
int ckv_kvcache_new(ckv_ctx_t *ctx, const struct ckv_kv_geom *g, const struct ckv_kv_opts *o,
                    struct ckv_block_store *store, uint64_t seq_uid, ckv_kvcache_t **out, char *err,
                    size_t errlen);
/* Frees the sequence and drops its clusters from the store; NULLs the pointer. */
void ckv_kvcache_free(ckv_kvcache_t **kv);

/* Tokens stored (the next position). Every layer holds the same count between steps. */
int ckv_kvcache_n_tokens(const ckv_kvcache_t *kv);
const struct ckv_kv_opts *ckv_kvcache_opts(const ckv_kvcache_t *kv);

/* Appends n tokens of layer `layer`: k, v (n, n_kv_heads, head_dim) f32, post-RoPE, at the
 * positions n_tokens .. n_tokens + n - 1. -ENOSPC beyond max_ctx. The token count advances
 * when the last layer has been appended. */
int ckv_kvcache_append(ckv_kvcache_t *kv, int layer, const float *k, const float *v, int n);

/* Causal attention of the n queries just appended to layer: q, out (n, n_q_heads, head_dim). */
int ckv_kvcache_attn_prefill(ckv_kvcache_t *kv, int layer, const float *q, int n, float *out);

/* Ends the prompt: clusterkv clusters every layer >= full_layers and writes the clusters to
 * the store; quest builds its page bounds. Idempotent (a second call does nothing). A
 * sequence that decodes without it attends in full (streaming excepted). After an error
 * (store full, -ENOMEM) the sequence should be freed. */
int ckv_kvcache_end_prefill(ckv_kvcache_t *kv);

/* Attention of the one token just appended to layer, by the method: q, out (n_q_heads,
 * head_dim) f32. */
int ckv_kvcache_attn_decode(ckv_kvcache_t *kv, int layer, const float *q, float *out);

/* After every layer of a decode step: clusterkv clusters a full window into window_clusters
 * clusters per (layer >= full_layers, KV head), one store put per layer. Until it is called
 * a full window refuses more tokens (ckv_kvcache_append: -EINVAL). */
int ckv_kvcache_end_step(ckv_kvcache_t *kv);

void ckv_kvcache_stats(const ckv_kvcache_t *kv, struct ckv_kv_stats *out);

/* The clusters of one (layer, KV head) of a clusterkv sequence (evaluation, debugging): in
 * creation order (prompt clusters, then each window's), host arrays owned by kv and valid
 * until its next end_step/free. Cluster c holds the positions members[offsets[c] ..
 * offsets[c+1]), ascending; sizes[c] = offsets[c+1] - offsets[c]. */
struct ckv_kv_clusters {
    int n_clusters;
    const int32_t *sizes;       /* (n_clusters) */
    const int32_t *offsets;     /* (n_clusters + 1) */
    const int32_t *members;     /* (offsets[n_clusters]) token positions */
    const float *centroids;     /* (n_clusters, head_dim) f32, device memory of the context */
    int n_sinks;                /* positions [0, n_sinks) are sinks */
    int window_start, n_window; /* the window: [window_start, window_start + n_window) */
};
/* 0, or -EINVAL (not clusterkv, a full layer, a bad index, or before end_prefill). */
int ckv_kvcache_clusters(const ckv_kvcache_t *kv, int layer, int kv_head,
                         struct ckv_kv_clusters *out);

#endif
