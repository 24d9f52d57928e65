/*
 * The client of ckv-kvstore (see kvs_client.h).
 */
#include "kvs_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_shm.h"
#include "ckv_wire.h"

struct kvs_client {
    void *zctx;
    void *sock;
    int timeout_ms;
    char name[64];
    struct kvs_geometry geo;
    struct ckv_shm shm; /* the mapping */
    char last_error[512];
    /* result storage, grown on demand */
    uint32_t *ntok, *nblk, *first;
    size_t cap;
    uint8_t **blk;
    uint64_t *off;
    size_t bcap;
};

static int grow(kvs_client_t *c, size_t n, size_t nb)
{
    if (n > c->cap) {
        size_t cap = n < 64 ? 64 : n;
        uint32_t *a = realloc(c->ntok, cap * sizeof(uint32_t));
        if (a)
            c->ntok = a;
        uint32_t *b = realloc(c->nblk, cap * sizeof(uint32_t));
        if (b)
            c->nblk = b;
        uint32_t *f = realloc(c->first, cap * sizeof(uint32_t));
        if (f)
            c->first = f;
        if (!a || !b || !f)
            return -ENOMEM;
        c->cap = cap;
    }
    if (nb > c->bcap) {
        size_t cap = nb < 256 ? 256 : nb;
        uint8_t **p = realloc(c->blk, cap * sizeof(uint8_t *));
        if (p)
            c->blk = p;
        uint64_t *o = realloc(c->off, cap * sizeof(uint64_t));
        if (o)
            c->off = o;
        if (!p || !o)
            return -ENOMEM;
        c->bcap = cap;
    }
    return 0;
}

/* Sends req and waits for a reply of type `want`. An Error reply becomes its local code and
 * its message goes to last_error. On 0 *rep is owned by the caller. */
static int request(kvs_client_t *c, Ckv__Envelope *req, Ckv__Envelope__BodyCase want,
                   Ckv__Envelope **rep)
{
    c->last_error[0] = '\0';
    req->request_id = 0; /* a fresh id for every request */
    int rc = ckv_wire_request(c->sock, req, rep, c->timeout_ms, CKV_WIRE_DEFAULT_MAX_BYTES);
    if (rc) {
        snprintf(c->last_error, sizeof(c->last_error), "%s", ckv_strerror(rc));
        return rc;
    }
    if ((*rep)->body_case == CKV__ENVELOPE__BODY_ERROR) {
        const Ckv__Error *e = (*rep)->error;
        snprintf(c->last_error, sizeof(c->last_error), "%s", e->message ? e->message : "");
        rc = ckv_wire_error_rc(e->code);
    } else if ((*rep)->body_case != want) {
        snprintf(c->last_error, sizeof(c->last_error), "reply of type %d, expected %d",
                 (int)(*rep)->body_case, (int)want);
        rc = -EPROTO;
    }
    if (rc) {
        ckv_wire_free(*rep);
        *rep = NULL;
    }
    return rc;
}

/* Hello, then (re)maps the segment it names. */
static int attach(kvs_client_t *c)
{
    Ckv__KvsHello h = CKV__KVS_HELLO__INIT;
    h.client_name = c->name;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_KVS_HELLO;
    req.kvs_hello = &h;
    Ckv__Envelope *rep;
    int rc = request(c, &req, CKV__ENVELOPE__BODY_KVS_HELLO_REPLY, &rep);
    if (rc)
        return rc;
    const Ckv__KvsHelloReply *r = rep->kvs_hello_reply;
    struct kvs_geometry g = {
        .epoch = r->epoch,
        .segment_bytes = r->segment_bytes,
        .block_tokens = r->block_tokens,
        .head_dim = r->head_dim,
        .dtype = (uint32_t)r->dtype,
        .block_bytes = r->block_bytes,
        .n_blocks = r->n_blocks,
        .lease_ms = r->lease_ms,
        .reserve_ms = r->reserve_ms,
        .max_request_clusters = r->max_request_clusters,
        .max_cluster_tokens = r->max_cluster_tokens,
    };
    snprintf(g.segment_name, sizeof(g.segment_name), "%s", r->segment_name ? r->segment_name : "");
    ckv_wire_free(rep);

    struct ckv_shm shm;
    char why[256];
    rc = ckv_shm_open(g.segment_name, &shm, why, sizeof(why));
    if (rc) {
        snprintf(c->last_error, sizeof(c->last_error), "mapping segment %s: %s", g.segment_name,
                 why);
        return rc;
    }
    const struct ckv_shm_header *hd = shm.hdr;
    if (hd->segment_bytes != g.segment_bytes || hd->block_bytes != g.block_bytes ||
        hd->n_blocks != g.n_blocks || hd->head_dim != g.head_dim) {
        snprintf(c->last_error, sizeof(c->last_error),
                 "segment %s does not match the store's hello", g.segment_name);
        ckv_shm_close(&shm);
        return -EPROTO;
    }
    ckv_shm_close(&c->shm);
    c->shm = shm;
    c->geo = g;
    return 0;
}

/* After a reply carrying epoch: re-attaches when the store restarted. */
static int check_epoch(kvs_client_t *c, uint64_t epoch)
{
    if (epoch == c->geo.epoch)
        return 0;
    LOG_INFO("kvstore epoch %llu -> %llu: re-attaching", (unsigned long long)c->geo.epoch,
             (unsigned long long)epoch);
    return attach(c);
}

int kvs_client_new(const char *endpoint, const char *client_name, int timeout_ms,
                   kvs_client_t **out)
{
    *out = NULL;
    kvs_client_t *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->shm.fd = -1;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 2000;
    snprintf(c->name, sizeof(c->name), "%s", client_name ? client_name : "");
    int rc;
    c->zctx = zmq_ctx_new();
    c->sock = c->zctx ? zmq_socket(c->zctx, ZMQ_DEALER) : NULL;
    if (!c->sock) {
        rc = -errno;
        goto fail;
    }
    if ((rc = ckv_wire_socket_setup(c->sock, CKV_WIRE_DEFAULT_MAX_BYTES)) != 0)
        goto fail;
    if (zmq_connect(c->sock, endpoint) != 0) {
        rc = -errno;
        goto fail;
    }
    if ((rc = attach(c)) != 0)
        goto fail;
    *out = c;
    return 0;
fail:
    kvs_client_destroy(&c);
    return rc;
}

void kvs_client_destroy(kvs_client_t **cp)
{
    kvs_client_t *c = *cp;
    if (!c)
        return;
    *cp = NULL;
    ckv_shm_close(&c->shm);
    if (c->sock)
        zmq_close(c->sock);
    if (c->zctx)
        zmq_ctx_term(c->zctx);
    free(c->ntok);
    free(c->nblk);
    free(c->first);
    free(c->blk);
    free(c->off);
    free(c);
}

const struct kvs_geometry *kvs_client_geometry(const kvs_client_t *c)
{
    return &c->geo;
}

uint8_t *kvs_client_segment(const kvs_client_t *c)
{
    return c->shm.base;
}

const char *kvs_client_last_error(const kvs_client_t *c)
{
    return c->last_error;
}

/* Fills out from a reply's per-cluster block counts and flat offsets, checking that they add
 * up and stay inside the pool. */
static int fill_blocks(kvs_client_t *c, size_t n, size_t n_nblk, const uint32_t *nblk, size_t n_off,
                       const uint64_t *off, struct kvs_blocks *out)
{
    if (n_nblk != n) {
        snprintf(c->last_error, sizeof(c->last_error), "reply lists %zu clusters, asked %zu",
                 n_nblk, n);
        return -EPROTO;
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += nblk[i];
    if (total != n_off || grow(c, n, total)) {
        snprintf(c->last_error, sizeof(c->last_error), "reply has %zu offsets for %zu blocks",
                 n_off, total);
        return total != n_off ? -EPROTO : -ENOMEM;
    }
    const struct ckv_shm_header *h = c->shm.hdr;
    for (size_t j = 0; j < n_off; j++) {
        uint64_t o = off[j];
        if (o < h->pool_offset || o > h->segment_bytes - h->block_bytes ||
            (o - h->pool_offset) % h->block_bytes) {
            snprintf(c->last_error, sizeof(c->last_error), "block offset %llu outside the pool",
                     (unsigned long long)o);
            return -EPROTO;
        }
        c->off[j] = o;
        c->blk[j] = c->shm.base + o;
    }
    size_t f = 0;
    for (size_t i = 0; i < n; i++) {
        c->nblk[i] = nblk[i];
        c->first[i] = (uint32_t)f;
        f += nblk[i];
    }
    out->n = n;
    out->n_tokens = c->ntok;
    out->n_blocks = c->nblk;
    out->first = c->first;
    out->block = c->blk;
    out->offset = c->off;
    return 0;
}

/* Parallel arrays of n keys for the wire: (4, n) in one allocation, owned by the caller. */
struct wire_keys {
    Ckv__KvsKeys msg;
    uint64_t *mem;
    uint64_t stack[4 * 64];
};

static int keys_to_proto(const struct kvs_key *keys, size_t n, struct wire_keys *w)
{
    Ckv__KvsKeys init = CKV__KVS_KEYS__INIT;
    w->msg = init;
    w->mem = n <= 64 ? w->stack : malloc(n * (sizeof(uint64_t) + 3 * sizeof(uint32_t)));
    if (!w->mem)
        return -ENOMEM;
    uint64_t *seq = w->mem;
    uint32_t *layer = (uint32_t *)(seq + n), *head = layer + n, *cl = head + n;
    for (size_t i = 0; i < n; i++) {
        seq[i] = keys[i].seq_uid;
        layer[i] = keys[i].layer;
        head[i] = keys[i].kv_head;
        cl[i] = keys[i].cluster_id;
    }
    w->msg.n_seq_uid = w->msg.n_layer = w->msg.n_kv_head = w->msg.n_cluster_id = n;
    w->msg.seq_uid = seq;
    w->msg.layer = layer;
    w->msg.kv_head = head;
    w->msg.cluster_id = cl;
    return 0;
}

static void keys_free(struct wire_keys *w)
{
    if (w->mem != w->stack)
        free(w->mem);
}

int kvs_client_reserve(kvs_client_t *c, const struct kvs_key *keys, const uint32_t *n_tokens,
                       size_t n, struct kvs_blocks *out)
{
    memset(out, 0, sizeof(*out));
    if (n == 0)
        return -EINVAL;
    struct wire_keys wk;
    if (grow(c, n, 0) || keys_to_proto(keys, n, &wk))
        return -ENOMEM;
    Ckv__KvsReserve r = CKV__KVS_RESERVE__INIT;
    r.keys = &wk.msg;
    r.n_n_tokens = n;
    r.n_tokens = (uint32_t *)n_tokens;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_KVS_RESERVE;
    req.kvs_reserve = &r;
    Ckv__Envelope *rep;
    int rc = request(c, &req, CKV__ENVELOPE__BODY_KVS_RESERVE_REPLY, &rep);
    keys_free(&wk);
    if (rc)
        return rc;
    const Ckv__KvsReserveReply *rr = rep->kvs_reserve_reply;
    rc = check_epoch(c, rr->epoch);
    if (!rc)
        rc = fill_blocks(c, n, rr->n_n_blocks, rr->n_blocks, rr->n_block_offset, rr->block_offset,
                         out);
    if (!rc) {
        memcpy(c->ntok, n_tokens, n * sizeof(uint32_t));
        out->id = rr->reservation_id;
    }
    ckv_wire_free(rep);
    return rc;
}

/* commit, abort, release, drop: an id in, an ack out. */
static int ack_request(kvs_client_t *c, Ckv__Envelope *req, uint32_t *count)
{
    Ckv__Envelope *rep;
    int rc = request(c, req, CKV__ENVELOPE__BODY_KVS_ACK, &rep);
    if (rc)
        return rc;
    rc = check_epoch(c, rep->kvs_ack->epoch);
    if (count)
        *count = rep->kvs_ack->count;
    ckv_wire_free(rep);
    return rc;
}

int kvs_client_commit(kvs_client_t *c, uint64_t reservation_id, uint32_t *n_committed)
{
    Ckv__KvsCommit m = CKV__KVS_COMMIT__INIT;
    m.reservation_id = reservation_id;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_KVS_COMMIT;
    req.kvs_commit = &m;
    return ack_request(c, &req, n_committed);
}

int kvs_client_abort(kvs_client_t *c, uint64_t reservation_id)
{
    Ckv__KvsAbort m = CKV__KVS_ABORT__INIT;
    m.reservation_id = reservation_id;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_KVS_ABORT;
    req.kvs_abort = &m;
    return ack_request(c, &req, NULL);
}

int kvs_client_release(kvs_client_t *c, uint64_t lease_id)
{
    Ckv__KvsRelease m = CKV__KVS_RELEASE__INIT;
    m.lease_id = lease_id;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_KVS_RELEASE;
    req.kvs_release = &m;
    return ack_request(c, &req, NULL);
}

int kvs_client_drop(kvs_client_t *c, uint64_t seq_uid, uint32_t *n_dropped)
{
    Ckv__KvsDrop m = CKV__KVS_DROP__INIT;
    m.seq_uid = seq_uid;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_KVS_DROP;
    req.kvs_drop = &m;
    return ack_request(c, &req, n_dropped);
}

int kvs_client_fetch_release(kvs_client_t *c, const struct kvs_key *keys, size_t n,
                             uint64_t release_lease_id, struct kvs_blocks *out)
{
    memset(out, 0, sizeof(*out));
    if (n == 0)
        return -EINVAL;
    struct wire_keys wk;
    if (keys_to_proto(keys, n, &wk))
        return -ENOMEM;
    Ckv__KvsFetch f = CKV__KVS_FETCH__INIT;
    f.keys = &wk.msg;
    f.release_lease_id = release_lease_id;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_KVS_FETCH;
    req.kvs_fetch = &f;
    Ckv__Envelope *rep;
    int rc = request(c, &req, CKV__ENVELOPE__BODY_KVS_FETCH_REPLY, &rep);
    keys_free(&wk);
    if (rc)
        return rc;
    const Ckv__KvsFetchReply *fr = rep->kvs_fetch_reply;
    rc = check_epoch(c, fr->epoch);
    if (!rc && fr->n_n_tokens != n) {
        snprintf(c->last_error, sizeof(c->last_error), "fetch reply has %zu token counts",
                 fr->n_n_tokens);
        rc = -EPROTO;
    }
    if (!rc)
        rc = fill_blocks(c, n, fr->n_n_blocks, fr->n_blocks, fr->n_block_offset, fr->block_offset,
                         out);
    if (!rc) {
        memcpy(c->ntok, fr->n_tokens, n * sizeof(uint32_t));
        out->id = fr->lease_id;
        out->restored = fr->restored;
    }
    ckv_wire_free(rep);
    return rc;
}

int kvs_client_fetch(kvs_client_t *c, const struct kvs_key *keys, size_t n, struct kvs_blocks *out)
{
    return kvs_client_fetch_release(c, keys, n, 0, out);
}

int kvs_client_stats(kvs_client_t *c, bool prometheus, struct ckv_buf *out)
{
    Ckv__StatsRequest m = CKV__STATS_REQUEST__INIT;
    m.prometheus = prometheus;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_STATS_REQUEST;
    req.stats_request = &m;
    Ckv__Envelope *rep;
    int rc = request(c, &req, CKV__ENVELOPE__BODY_STATS_REPLY, &rep);
    if (rc)
        return rc;
    const char *t = rep->stats_reply->text ? rep->stats_reply->text : "";
    rc = ckv_buf_append(out, t, strlen(t));
    ckv_wire_free(rep);
    return rc;
}
