/*
 * The client of ckv-kvstore, for workers: one DEALER socket to the store, the store's shared
 * segment mapped read/write, and one call per request. Not thread-safe: one client per thread.
 *
 * A worker's life with it (DESIGN.md, "Decode step on a worker"):
 *
 *   kvs_client_t *c;
 *   kvs_client_new("ipc:///tmp/ckv/kvstore.sock", "worker-0", 2000, &c);   // hello + map
 *
 *   // write a layer's new clusters: reserve, fill the blocks, commit
 *   struct kvs_blocks b;
 *   kvs_client_reserve(c, keys, n_tokens, n, &b);
 *   for (i < n) for (j < b.n_blocks[i]) fill(b.block[b.first[i] + j]);  // (2, 16, head_dim)
 *   kvs_client_commit(c, b.id);
 *
 *   // read a layer's missing clusters in one request; copy; release (or pass the lease to the
 *   // next fetch with kvs_client_fetch_release(), which saves the round trip)
 *   kvs_client_fetch(c, keys, n, &b);
 *   copy from b.block[...];
 *   kvs_client_release(c, b.id);
 *
 *   kvs_client_drop(c, seq_uid, NULL);                   // the sequence is finished
 *   kvs_client_destroy(&c);
 *
 * Blocks: each holds 16 tokens of one (sequence, layer, KV head), K rows then V rows,
 * (2, 16, head_dim) in the store's dtype; the last block of a cluster may be partly used
 * (n_tokens says how much). Pointers are into the mapped segment and stay valid until the
 * client re-attaches (a new epoch) or is destroyed; the data behind them is the caller's to
 * write between reserve and commit, and to read between fetch and release.
 *
 * Epochs: every reply carries the store's epoch. When it changes (the store restarted), the
 * client maps the segment again before returning; reservations and leases of the old epoch
 * are gone (commit and release of them answer -ENOENT), committed clusters are not.
 *
 * Errors: 0 or a negative code. The store's Error replies map to -EINVAL (bad request),
 * -ENOENT (unknown cluster, lease or reservation), -ENOSPC (segment and spill full), -EBUSY
 * (overloaded), -ETIMEDOUT (the store waited too long for I/O), CKV_EMALFORMED, ...;
 * kvs_client_last_error() has the store's message. No reply in time: -ETIMEDOUT. A reply
 * that does not add up (offsets outside the segment, counts that disagree): -EPROTO.
 */
#ifndef KVS_CLIENT_H
#define KVS_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ckv_buf.h"
#include "kvs_key.h"

typedef struct kvs_client kvs_client_t;

/* What hello told: the segment and its block geometry. */
struct kvs_geometry {
    uint64_t epoch;
    char segment_name[200];
    uint64_t segment_bytes;
    uint32_t block_tokens; /* 16 */
    uint32_t head_dim;
    uint32_t dtype; /* enum ckv_shm_dtype: 0 f16, 1 bf16, 2 f32 */
    uint32_t block_bytes;
    uint64_t n_blocks;
    uint32_t lease_ms, reserve_ms;
    uint32_t max_request_clusters, max_cluster_tokens;
};

/* The answer to reserve or fetch. Arrays are owned by the client and valid until its next
 * reserve or fetch call. */
struct kvs_blocks {
    uint64_t id;              /* reservation id (reserve) or lease id (fetch) */
    size_t n;                 /* clusters, in request order */
    const uint32_t *n_tokens; /* (n) fetch: tokens of each cluster; reserve: as asked */
    const uint32_t *n_blocks; /* (n) blocks of each cluster */
    const uint32_t *first;    /* (n) index in block[] of each cluster's first block */
    uint8_t *const *block;    /* (sum n_blocks) block addresses in the mapped segment */
    const uint64_t *offset;   /* (sum n_blocks) the same as byte offsets from the segment base */
    uint32_t restored;        /* fetch: clusters the store read back from its spill file */
};

/* Connects to the store at endpoint, says hello (client_name is for its logs) and maps the
 * segment. timeout_ms bounds every request of this client. On 0 *out is owned by the caller
 * (kvs_client_destroy()). Returns -ETIMEDOUT when the store does not answer, -errno when the
 * segment cannot be mapped. */
int kvs_client_new(const char *endpoint, const char *client_name, int timeout_ms,
                   kvs_client_t **out);

/* Unmaps, closes, frees; NULLs *c. */
void kvs_client_destroy(kvs_client_t **c);

const struct kvs_geometry *kvs_client_geometry(const kvs_client_t *c);

/* Base of the mapped segment (for cudaHostRegister and offset arithmetic). */
uint8_t *kvs_client_segment(const kvs_client_t *c);

/* The store's message from its last Error reply ("" when none). */
const char *kvs_client_last_error(const kvs_client_t *c);

/* Reserves blocks for n new clusters: keys[i] of n_tokens[i] tokens (1..max_cluster_tokens;
 * n at most max_request_clusters). Invisible to fetch until committed; expires after
 * reserve_ms uncommitted. */
int kvs_client_reserve(kvs_client_t *c, const struct kvs_key *keys, const uint32_t *n_tokens,
                       size_t n, struct kvs_blocks *out);

/* Publishes every cluster of a reservation (after its blocks are written). *n_committed (may
 * be NULL) gets the clusters published (fewer when a drop came in between). */
int kvs_client_commit(kvs_client_t *c, uint64_t reservation_id, uint32_t *n_committed);

/* Gives a reservation's blocks back. */
int kvs_client_abort(kvs_client_t *c, uint64_t reservation_id);

/* Leases n committed clusters for reading (restoring spilled ones first). Release the lease
 * once copied; it expires after lease_ms. */
int kvs_client_fetch(kvs_client_t *c, const struct kvs_key *keys, size_t n, struct kvs_blocks *out);

/* kvs_client_fetch() that first releases release_lease_id (0: none) in the same round trip.
 * When that lease is unknown the fetch fails and nothing is released or leased. */
int kvs_client_fetch_release(kvs_client_t *c, const struct kvs_key *keys, size_t n,
                             uint64_t release_lease_id, struct kvs_blocks *out);

int kvs_client_release(kvs_client_t *c, uint64_t lease_id);

/* Forgets every cluster of a sequence. *n_dropped (may be NULL) gets the count. */
int kvs_client_drop(kvs_client_t *c, uint64_t seq_uid, uint32_t *n_dropped);

/* Appends the store's stats (key:value, or Prometheus text) to out. */
int kvs_client_stats(kvs_client_t *c, bool prometheus, struct ckv_buf *out);

#endif
