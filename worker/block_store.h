/*
 * Where a sequence's clusters live once written (DESIGN.md "Data model"): an interface, so the
 * KV manager does not care whether the blocks sit in this process (block_store_mem.c, used by
 * `ckv run`, the evaluation and the benchmarks) or in ckv-kvstore's shared segment (a client
 * implementation, later). A cluster is keyed by (seq_uid, layer, kv_head, cluster_id) and is
 * a whole number of blocks (ckv_block_bytes(head_dim, dtype) each, kernels.h layout: 16 K rows
 * then 16 V rows), written once and read many times.
 *
 * Every function returns 0 or a negative error (-ENOENT for an unknown key, -ENOSPC when full,
 * -EEXIST for a key written twice, -EINVAL); a failed call changes nothing.
 */
#ifndef CKV_BLOCK_STORE_H
#define CKV_BLOCK_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ckv_cluster_key {
    uint64_t seq_uid;
    int32_t layer, kv_head, cluster_id;
};

struct ckv_block_store_ops {
    /* Stores n clusters: cluster i is n_blocks[i] blocks read from blocks[i] (host memory,
     * contiguous). One call carries a whole layer's clusters. */
    int (*put)(void *self, const struct ckv_cluster_key *keys, const int32_t *n_blocks,
               const void *const *blocks, int n);
    /* Copies n clusters into dst[i] (host memory, room for the cluster's blocks);
     * n_blocks[i] receives its block count. One call per layer's misses. */
    int (*get)(void *self, const struct ckv_cluster_key *keys, void *const *dst, int32_t *n_blocks,
               int n);
    /* Forgets every cluster of seq_uid. */
    int (*drop)(void *self, uint64_t seq_uid);
    void (*destroy)(void *self);
};

struct ckv_block_store {
    const struct ckv_block_store_ops *ops;
    void *self;
    size_t block_bytes;
};

static inline int ckv_block_store_put(struct ckv_block_store *s, const struct ckv_cluster_key *keys,
                                      const int32_t *n_blocks, const void *const *blocks, int n)
{
    return s->ops->put(s->self, keys, n_blocks, blocks, n);
}

static inline int ckv_block_store_get(struct ckv_block_store *s, const struct ckv_cluster_key *keys,
                                      void *const *dst, int32_t *n_blocks, int n)
{
    return s->ops->get(s->self, keys, dst, n_blocks, n);
}

static inline int ckv_block_store_drop(struct ckv_block_store *s, uint64_t seq_uid)
{
    return s->ops->drop(s->self, seq_uid);
}

/* In-process store (block_store_mem.c): a hash map of heap copies, at most max_bytes in all
 * (0: unbounded). *out is freed with ckv_block_store_destroy(). */
int ckv_block_store_mem_new(size_t block_bytes, size_t max_bytes, struct ckv_block_store **out);

/* Destroys any store and NULLs the pointer; NULL is fine. */
void ckv_block_store_destroy(struct ckv_block_store **s);

/* Counters of the in-process store (tests, stats). */
struct ckv_block_store_mem_stats {
    uint64_t clusters, blocks, puts, gets, drops;
};
int ckv_block_store_mem_stats(const struct ckv_block_store *s,
                              struct ckv_block_store_mem_stats *out);

/* Store backed by ckv-kvstore (block_store_kvs.c): connects to the store at endpoint
 * (client_name is for its logs; timeout_ms bounds each request) and maps its segment.
 * block_bytes: the model's ckv_block_bytes(), checked against the store's geometry (0: not
 * checked). Returns 0, or a negative error with a message in err (-ETIMEDOUT: no store
 * there; -EINVAL: another block geometry). *out is freed with ckv_block_store_destroy(). */
int ckv_block_store_kvs_new(const char *endpoint, const char *client_name, int timeout_ms,
                            size_t block_bytes, struct ckv_block_store **out, char *err,
                            size_t errlen);

/* Counters of a kvstore-backed store (tests, stats). */
struct ckv_block_store_kvs_stats {
    uint64_t puts, clusters_put, blocks_put;
    uint64_t gets, clusters_got, blocks_got, restored;
    uint64_t drops, errors;
};
int ckv_block_store_kvs_stats(const struct ckv_block_store *s,
                              struct ckv_block_store_kvs_stats *out);

/* Appends the store daemon's own stats (key:value or Prometheus) to out. */
struct ckv_buf;
int ckv_block_store_kvs_store_stats(struct ckv_block_store *s, bool prometheus,
                                    struct ckv_buf *out);

#endif
