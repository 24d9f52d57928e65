/*
 * Request decoding and field checks (see kvs_proto.h).
 */
#include "kvs_proto.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

#include "ckv_error.h"

const char *kvs_proto_body_name(Ckv__Envelope__BodyCase body)
{
    switch (body) {
    case CKV__ENVELOPE__BODY__NOT_SET: return "(no body)";
    case CKV__ENVELOPE__BODY_ERROR: return "error";
    case CKV__ENVELOPE__BODY_STATS_REQUEST: return "stats_request";
    case CKV__ENVELOPE__BODY_STATS_REPLY: return "stats_reply";
    case CKV__ENVELOPE__BODY_PING: return "ping";
    case CKV__ENVELOPE__BODY_PONG: return "pong";
    case CKV__ENVELOPE__BODY_KVS_HELLO: return "kvs_hello";
    case CKV__ENVELOPE__BODY_KVS_HELLO_REPLY: return "kvs_hello_reply";
    case CKV__ENVELOPE__BODY_KVS_RESERVE: return "kvs_reserve";
    case CKV__ENVELOPE__BODY_KVS_RESERVE_REPLY: return "kvs_reserve_reply";
    case CKV__ENVELOPE__BODY_KVS_COMMIT: return "kvs_commit";
    case CKV__ENVELOPE__BODY_KVS_ABORT: return "kvs_abort";
    case CKV__ENVELOPE__BODY_KVS_FETCH: return "kvs_fetch";
    case CKV__ENVELOPE__BODY_KVS_FETCH_REPLY: return "kvs_fetch_reply";
    case CKV__ENVELOPE__BODY_KVS_RELEASE: return "kvs_release";
    case CKV__ENVELOPE__BODY_KVS_DROP: return "kvs_drop";
    case CKV__ENVELOPE__BODY_KVS_ACK: return "kvs_ack";
    default: return "(unknown body)";
    }
}

static int check_keys(const Ckv__KvsKeys *k, const struct kvs_limits *lim, const char *what,
                      char *err, size_t errlen)
{
    size_t n = k ? k->n_seq_uid : 0;
    if (n == 0)
        return ckv_errorf(-EINVAL, err, errlen, "%s: no keys", what);
    if (k->n_layer != n || k->n_kv_head != n || k->n_cluster_id != n)
        return ckv_errorf(
            -EINVAL, err, errlen,
            "%s: key arrays of different lengths (seq_uid %zu, layer %zu, kv_head %zu, "
            "cluster_id %zu)",
            what, n, k->n_layer, k->n_kv_head, k->n_cluster_id);
    if (n > lim->max_request_clusters)
        return ckv_errorf(-EINVAL, err, errlen, "%s: %zu keys, at most %u per request", what, n,
                          lim->max_request_clusters);
    return 0;
}

int kvs_proto_check(const Ckv__Envelope *env, const struct kvs_limits *lim, char *err,
                    size_t errlen)
{
    const char *name = kvs_proto_body_name(env->body_case);
    switch (env->body_case) {
    case CKV__ENVELOPE__BODY_STATS_REQUEST:
    case CKV__ENVELOPE__BODY_PING:
    case CKV__ENVELOPE__BODY_KVS_HELLO: return 0;
    case CKV__ENVELOPE__BODY_KVS_RESERVE: {
        const Ckv__KvsReserve *r = env->kvs_reserve;
        int rc = check_keys(r->keys, lim, name, err, errlen);
        if (rc)
            return rc;
        if (r->n_n_tokens != r->keys->n_seq_uid)
            return ckv_errorf(-EINVAL, err, errlen, "%s: %zu keys but %zu token counts", name,
                              r->keys->n_seq_uid, r->n_n_tokens);
        for (size_t i = 0; i < r->n_n_tokens; i++)
            if (r->n_tokens[i] < 1 || r->n_tokens[i] > lim->max_cluster_tokens)
                return ckv_errorf(-EINVAL, err, errlen, "%s: cluster %zu has %u tokens (1..%u)",
                                  name, i, r->n_tokens[i], lim->max_cluster_tokens);
        return 0;
    }
    case CKV__ENVELOPE__BODY_KVS_COMMIT:
        if (!env->kvs_commit->reservation_id)
            return ckv_errorf(-EINVAL, err, errlen, "%s: reservation_id 0", name);
        return 0;
    case CKV__ENVELOPE__BODY_KVS_ABORT:
        if (!env->kvs_abort->reservation_id)
            return ckv_errorf(-EINVAL, err, errlen, "%s: reservation_id 0", name);
        return 0;
    case CKV__ENVELOPE__BODY_KVS_FETCH:
        return check_keys(env->kvs_fetch->keys, lim, name, err, errlen);
    case CKV__ENVELOPE__BODY_KVS_RELEASE:
        if (!env->kvs_release->lease_id)
            return ckv_errorf(-EINVAL, err, errlen, "%s: lease_id 0", name);
        return 0;
    case CKV__ENVELOPE__BODY_KVS_DROP: return 0;
    case CKV__ENVELOPE__BODY__NOT_SET:
        return ckv_errorf(CKV_EUNKNOWN_TYPE, err, errlen, "no message body this store knows");
    default:
        return ckv_errorf(CKV_EUNKNOWN_TYPE, err, errlen, "%s is not a request ckv-kvstore answers",
                          name);
    }
}

int kvs_proto_decode(const uint8_t *buf, size_t len, size_t max_bytes, const struct kvs_limits *lim,
                     Ckv__Envelope **env, char *err, size_t errlen)
{
    *env = NULL;
    if (len > max_bytes)
        return ckv_errorf(CKV_ETOOBIG, err, errlen, "frame of %zu bytes, at most %zu", len,
                          max_bytes);
    Ckv__Envelope *e = ckv__envelope__unpack(NULL, len, buf);
    if (!e)
        return ckv_errorf(CKV_EMALFORMED, err, errlen, "frame of %zu bytes is not an envelope",
                          len);
    int rc = 0;
    if (e->version != CKV_PROTOCOL_VERSION)
        rc =
            ckv_errorf(CKV_EPROTO_VERSION, err, errlen, "protocol version %u, this store speaks %u",
                       e->version, CKV_PROTOCOL_VERSION);
    else
        rc = kvs_proto_check(e, lim, err, errlen);
    if (rc) {
        ckv__envelope__free_unpacked(e, NULL);
        return rc;
    }
    *env = e;
    return 0;
}
