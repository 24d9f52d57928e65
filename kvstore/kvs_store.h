/*
 * The KV store without its socket: segment, index, leases, reservations, eviction, spill and
 * restore, stats. ckv-kvstore's event loop (kvs_server.c) feeds it decoded envelopes and polls
 * it; tests and the fuzz target drive it the same way in-process.
 *
 *   kvs_store_t *s;
 *   kvs_store_new(&cfg, send_reply, sock, &s, err, sizeof(err));
 *   for (;;) {
 *       poll: the socket, kvs_store_io_fd(s), timeout kvs_store_timeout_ms(s)
 *       kvs_store_handle(s, &from, env);       // for each request; takes env
 *       kvs_store_poll(s);                     // I/O completions, expiries, waiting requests
 *   }
 *   kvs_store_destroy(&s, true);               // orderly exit removes the segment
 *
 * Replies go out through the reply callback, synchronously, from kvs_store_handle() (most
 * requests) or kvs_store_poll() (requests that waited for spill or restore I/O). The reply
 * envelope and everything it points to belong to the store and are valid during the call.
 *
 * Request semantics (proto/kvstore.proto, docs/KVSTORE.md): reserve grants blocks invisibly,
 * commit publishes them, abort and expiry take them back; fetch pins committed clusters under
 * a lease (restoring spilled ones first, other requests served meanwhile); release and expiry
 * unpin; drop forgets a sequence. A request that fails changes nothing.
 */
#ifndef KVS_STORE_H
#define KVS_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ckv_buf.h"
#include "ckv_shm.h"
#include "ckv_wire.h"
#include "kvs_config.h"

typedef struct kvs_store kvs_store_t;

/* Sends `reply` to `to`. Both are borrowed for the duration of the call. */
typedef void (*kvs_reply_fn)(void *arg, const struct ckv_wire_addr *to, Ckv__Envelope *reply);

/* Opens the store of cfg: recovers the segment cfg->segment_name when one exists (bumping its
 * epoch; its geometry must match cfg) or creates it; opens the spill file; locks the segment
 * against a second store; mlocks it when cfg->mlock (a warning when refused). On 0 *out is
 * owned by the caller (kvs_store_destroy()). Errors (negative, message in err): -EBUSY
 * (another store holds the segment), CKV_ECONFIG (geometry differs from the segment's, or the
 * spill file belongs to another segment while spilled clusters depend on it), CKV_EFORMAT (a
 * damaged segment: --cleanup removes it), -errno. */
int kvs_store_new(const struct kvs_config *cfg, kvs_reply_fn reply, void *reply_arg,
                  kvs_store_t **out, char *err, size_t errlen);

/* Closes the store; with remove_segment the segment is unlinked (orderly exit), without it the
 * segment stays for the next start. NULLs *s. */
void kvs_store_destroy(kvs_store_t **s, bool remove_segment);

/* Handles one request from `from` (routing frames and request id), taking ownership of req:
 * checks it (kvs_proto_check()), then answers or, when it waits for I/O, keeps it. */
void kvs_store_handle(kvs_store_t *s, const struct ckv_wire_addr *from, Ckv__Envelope *req);

/* Answers a frame that did not decode (rc from ckv_wire_recv()) with an Error, logs it (rate
 * limited) and counts it. */
void kvs_store_reject(kvs_store_t *s, const struct ckv_wire_addr *from, int rc);

/* The eventfd signalled by I/O completions, or -1 without a spill file. */
int kvs_store_io_fd(const kvs_store_t *s);

/* Reaps I/O completions, expires leases, reservations and waiting requests, retries waiting
 * requests, starts eviction and submits I/O. Never blocks. */
void kvs_store_poll(kvs_store_t *s);

/* Milliseconds until the next deadline (lease, reservation, waiting request), -1 for none. */
int kvs_store_timeout_ms(const kvs_store_t *s);

/* Appends the stats (key:value sections or Prometheus text) to out. */
void kvs_store_stats(kvs_store_t *s, bool prometheus, struct ckv_buf *out);

/* A snapshot of the counters tests and the bench look at. */
struct kvs_store_info {
    uint64_t epoch;
    uint64_t blocks_total, blocks_used, blocks_free;
    uint64_t slots_total, slots_used;
    uint32_t clusters_reserved, clusters_resident, clusters_spilled, clusters_unlinked;
    uint32_t leases, reservations, waiting, io_in_flight;
    uint64_t spills, restores, bytes_spilled, bytes_restored;
    uint64_t spill_busy_ns, restore_busy_ns;
    uint64_t lease_expiries, reservation_expiries, errors;
    bool direct_io, mlocked;
};
void kvs_store_info(const kvs_store_t *s, struct kvs_store_info *info);

/* Checks the index invariants (kvs_index_check()). Returns 0 or -EUCLEAN with err set. */
int kvs_store_check(const kvs_store_t *s, char *err, size_t errlen);

/* The mapped segment (for tests). */
const struct ckv_shm *kvs_store_shm(const kvs_store_t *s);

/* `ckv-kvstore --cleanup`: removes cfg's segment and spill file unless a running store holds
 * them. Returns 0 (also when there was nothing to remove), -EBUSY, or -errno; msg says what
 * was done. */
int kvs_store_cleanup(const struct kvs_config *cfg, char *msg, size_t msglen);

#endif
