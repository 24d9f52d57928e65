/*
 * The request decoder of ckv-kvstore: from the bytes of an envelope frame to a request whose
 * every field is in range, or an error code with a message naming the problem. The store runs
 * kvs_proto_check() on every envelope before it changes anything; the fuzz target and the
 * corpus suite run kvs_proto_decode() (the same checks after the wire's own) on raw bytes.
 */
#ifndef KVS_PROTO_H
#define KVS_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "ckv_wire.h"
#include "kvs_key.h"

struct kvs_limits {
    uint32_t max_request_clusters; /* keys per reserve / fetch */
    uint32_t max_cluster_tokens;   /* tokens per cluster */
};

/* Checks that env is a request ckv-kvstore answers (hello, reserve, commit, abort, fetch,
 * release, drop, stats, ping) with fields in range: key counts within limits and matching
 * n_tokens, token counts in [1, max_cluster_tokens], non-zero ids. Returns 0, CKV_EUNKNOWN_TYPE
 * (a reply or a body this store does not take) or -EINVAL, with a message in err. Duplicates
 * and existence are the store's to judge. */
int kvs_proto_check(const Ckv__Envelope *env, const struct kvs_limits *lim, char *err,
                    size_t errlen);

/* Decodes one envelope frame as ckv_wire_recv() does (size limit, protobuf, version, known
 * body), then kvs_proto_check(). On 0 *env is owned by the caller (ckv_wire_free()); otherwise
 * *env is NULL and the code is CKV_ETOOBIG, CKV_EMALFORMED, CKV_EPROTO_VERSION,
 * CKV_EUNKNOWN_TYPE or -EINVAL, with a message in err. */
int kvs_proto_decode(const uint8_t *buf, size_t len, size_t max_bytes, const struct kvs_limits *lim,
                     Ckv__Envelope **env, char *err, size_t errlen);

/* The message name of a body case ("kvs_fetch", "ping", ...). */
const char *kvs_proto_body_name(Ckv__Envelope__BodyCase body);

/* Clusters in a checked KvsKeys (0 when absent). */
static inline size_t kvs_proto_n_keys(const Ckv__KvsKeys *k)
{
    return k ? k->n_seq_uid : 0;
}

/* Cluster i of a checked KvsKeys. */
static inline struct kvs_key kvs_proto_key(const Ckv__KvsKeys *k, size_t i)
{
    struct kvs_key out = {.seq_uid = k->seq_uid[i],
                          .layer = k->layer[i],
                          .kv_head = k->kv_head[i],
                          .cluster_id = k->cluster_id[i]};
    return out;
}

#endif
