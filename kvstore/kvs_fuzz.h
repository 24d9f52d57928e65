/*
 * The fuzz harness of ckv-kvstore's request path, shared by the libFuzzer target
 * (kvstore/fuzz/fuzz_kvs_request.c) and the Criterion suite that runs it over a corpus of
 * mutated inputs in CI (tests/kvstore/test_kvs_fuzz.c).
 *
 * An input is a byte of options then a sequence of frames, each a 2-byte little-endian length
 * and that many bytes of envelope:
 *
 *   [options] [len lo][len hi][frame bytes] [len lo][len hi][frame bytes] ...
 *   options bit 0: give the store a spill file (and a 16-block segment, so that it spills)
 *
 * Each input runs against a fresh store: every frame goes through the request decoder
 * (kvs_proto_decode()) and, when it decodes, into kvs_store_handle(); I/O is drained after each
 * frame. Small ids in commit, abort, release and fetch's release_lease_id (< 2^16) get the
 * store's epoch bits so that mutated inputs reach real reservations and leases. The harness
 * writes a pattern into every reserved block and checks it in every fetch reply, and checks
 * the index invariants after every frame: data read back wrong, a request without exactly one
 * reply, or a broken invariant is reported as an error.
 */
#ifndef KVS_FUZZ_H
#define KVS_FUZZ_H

#include <stddef.h>
#include <stdint.h>

#include "kvs_config.h"

struct kvs_fuzz {
    struct kvs_config cfg; /* base configuration; segment name unique to this process */
    char spill_path[256];
    uint64_t runs;
    uint64_t frames, decoded, replies, errors_replied, bytes_checked;
};

/* Prepares the harness; the spill file (when an input asks for one) goes into dir, which must
 * exist. Returns 0 or CKV_ECONFIG. */
int kvs_fuzz_init(struct kvs_fuzz *f, const char *dir);

/* Runs one input. Returns 0, or -EUCLEAN with the broken rule in err (the caller aborts). A
 * store that cannot be created at all returns its error code. */
int kvs_fuzz_run(struct kvs_fuzz *f, const uint8_t *data, size_t len, char *err, size_t errlen);

/* Writes seed input i into buf (cap bytes). Returns its length, or 0 when i is past the last
 * seed (or cap is too small). */
size_t kvs_fuzz_seed(unsigned i, uint8_t *buf, size_t cap);

#endif
