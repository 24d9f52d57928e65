/*
 * The fuzz harness of the request path (see kvs_fuzz.h).
 */
#include "kvs_fuzz.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_shm.h"
#include "kvs_index.h"
#include "kvs_proto.h"
#include "kvs_store.h"

#define SMALL_ID_LIMIT (1u << 16)
#define ID_EPOCH_SHIFT 40 /* as kvs_store.c */

/* What the harness remembers of one frame's request, to check its reply. */
struct req {
    Ckv__Envelope__BodyCase type; /* 0 when the frame did not decode */
    struct kvs_key *keys;         /* reserve, fetch: (n), owned */
    uint32_t *ntok;               /* reserve: (n), owned */
    size_t n;
    int replies;
};

struct run {
    struct kvs_fuzz *f;
    kvs_store_t *s;
    struct req *reqs;
    size_t n_reqs;
    char *err;
    size_t errlen;
    int rc; /* first failure */
};

__attribute__((format(printf, 2, 3))) static void fail(struct run *r, const char *fmt, ...)
{
    if (r->rc)
        return;
    r->rc = -EUCLEAN;
    if (r->err && r->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err, r->errlen, fmt, ap);
        va_end(ap);
    }
}

/* The pattern: word w of block j of cluster k. Cheap, and different for every block. */
static uint64_t pattern_base(const struct kvs_key *k, uint32_t j)
{
    return kvs_key_hash(k) ^ ((uint64_t)j * 0x9e3779b97f4a7c15ull);
}

static void on_reply(void *arg, const struct ckv_wire_addr *to, Ckv__Envelope *rep)
{
    struct run *r = arg;
    /* every reply must pack */
    size_t len = ckv__envelope__get_packed_size(rep);
    uint8_t *buf = malloc(len ? len : 1);
    ASSERT(buf);
    ASSERT(ckv__envelope__pack(rep, buf) == len);
    free(buf);
    r->f->replies++;
    if (to->request_id >= r->n_reqs) {
        fail(r, "reply to request %llu, which was never sent", (unsigned long long)to->request_id);
        return;
    }
    struct req *q = &r->reqs[to->request_id];
    if (++q->replies > 1) {
        fail(r, "request %llu answered twice", (unsigned long long)to->request_id);
        return;
    }
    const struct ckv_shm *shm = kvs_store_shm(r->s);
    uint32_t bb = shm->hdr->block_bytes;
    if (rep->body_case == CKV__ENVELOPE__BODY_ERROR) {
        r->f->errors_replied++;
        if (!rep->error->message || !rep->error->message[0])
            fail(r, "error reply without a message");
    } else if (rep->body_case == CKV__ENVELOPE__BODY_KVS_RESERVE_REPLY) {
        const Ckv__KvsReserveReply *rr = rep->kvs_reserve_reply;
        if (q->type != CKV__ENVELOPE__BODY_KVS_RESERVE || rr->n_n_blocks != q->n) {
            fail(r, "reserve reply does not match its request");
            return;
        }
        size_t off = 0;
        for (size_t i = 0; i < q->n; i++) {
            if (rr->n_blocks[i] != kvs_index_blocks_for(q->ntok[i])) {
                fail(r, "reserve reply: cluster %zu has %u blocks for %u tokens", i,
                     rr->n_blocks[i], q->ntok[i]);
                return;
            }
            for (uint32_t j = 0; j < rr->n_blocks[i]; j++, off++) {
                uint64_t o = rr->block_offset[off];
                if (o < shm->hdr->pool_offset || o + bb > shm->bytes) {
                    fail(r, "reserve reply: offset %llu outside the pool", (unsigned long long)o);
                    return;
                }
                uint64_t *w = (uint64_t *)(shm->base + o), base = pattern_base(&q->keys[i], j);
                for (uint32_t k = 0; k < bb / 8; k++)
                    w[k] = base ^ k;
            }
        }
    } else if (rep->body_case == CKV__ENVELOPE__BODY_KVS_FETCH_REPLY) {
        const Ckv__KvsFetchReply *fr = rep->kvs_fetch_reply;
        if (q->type != CKV__ENVELOPE__BODY_KVS_FETCH || fr->n_n_blocks != q->n ||
            fr->n_n_tokens != q->n) {
            fail(r, "fetch reply does not match its request");
            return;
        }
        size_t off = 0;
        for (size_t i = 0; i < q->n; i++) {
            if (fr->n_blocks[i] != kvs_index_blocks_for(fr->n_tokens[i])) {
                fail(r, "fetch reply: %u blocks for %u tokens", fr->n_blocks[i], fr->n_tokens[i]);
                return;
            }
            for (uint32_t j = 0; j < fr->n_blocks[i]; j++, off++) {
                if (off >= fr->n_block_offset) {
                    fail(r, "fetch reply: fewer offsets than blocks");
                    return;
                }
                uint64_t o = fr->block_offset[off];
                if (o < shm->hdr->pool_offset || o + bb > shm->bytes) {
                    fail(r, "fetch reply: offset %llu outside the pool", (unsigned long long)o);
                    return;
                }
                const uint64_t *w = (const uint64_t *)(shm->base + o);
                uint64_t base = pattern_base(&q->keys[i], j);
                for (uint32_t k = 0; k < bb / 8; k++)
                    if (w[k] != (base ^ k)) {
                        fail(r,
                             "fetch reply: cluster (seq %llu, layer %u, head %u, id %u) block "
                             "%u differs at word %u",
                             (unsigned long long)q->keys[i].seq_uid, q->keys[i].layer,
                             q->keys[i].kv_head, q->keys[i].cluster_id, j, k);
                        return;
                    }
                r->f->bytes_checked += bb;
            }
        }
    }
}

int kvs_fuzz_init(struct kvs_fuzz *f, const char *dir)
{
    memset(f, 0, sizeof(*f));
    char err[256];
    if (ckv_config_defaults(kvs_config_options, &f->cfg, err, sizeof(err)))
        return CKV_ECONFIG;
    snprintf(f->cfg.segment_name, sizeof(f->cfg.segment_name), "/ckv-fuzz-%d", (int)getpid());
    snprintf(f->cfg.run_dir, sizeof(f->cfg.run_dir), "%s", dir);
    if (snprintf(f->spill_path, sizeof(f->spill_path), "%s/fuzz-spill-%d", dir, (int)getpid()) >=
        (int)sizeof(f->spill_path))
        return CKV_ECONFIG;
    f->cfg.head_dim = 8; /* 512-byte blocks: cheap to fill and check */
    f->cfg.mlock = false;
    f->cfg.max_request_clusters = 64;
    f->cfg.max_cluster_tokens = 256;
    f->cfg.max_clusters = 256;
    f->cfg.direct_io = false;
    f->cfg.io_depth = 32;
    return 0;
}

/* Polls until no request waits and no I/O is in flight. */
static void drain(struct run *r)
{
    int idle = 0;
    for (int i = 0; i < 20000 && !r->rc; i++) {
        kvs_store_poll(r->s);
        struct kvs_store_info in;
        kvs_store_info(r->s, &in);
        if (in.waiting == 0 && in.io_in_flight == 0)
            return;
        if (in.io_in_flight == 0) {
            if (++idle > 3) {
                fail(r, "%u requests wait with no I/O in flight", in.waiting);
                return;
            }
            continue;
        }
        idle = 0;
        struct pollfd p = {.fd = kvs_store_io_fd(r->s), .events = POLLIN};
        poll(&p, 1, 100);
    }
    if (!r->rc)
        fail(r, "I/O did not settle");
}

/* Gives small ids the store's epoch bits, and remembers what to check in the reply. */
static int prepare(struct run *r, Ckv__Envelope *env, struct req *q, uint64_t epoch)
{
    uint64_t high = epoch << ID_EPOCH_SHIFT;
#define WIDEN(x)                                                                                   \
    do {                                                                                           \
        if ((x) && (x) < SMALL_ID_LIMIT)                                                           \
            (x) |= high;                                                                           \
    } while (0)
    q->type = env->body_case;
    switch (env->body_case) {
    case CKV__ENVELOPE__BODY_KVS_COMMIT: WIDEN(env->kvs_commit->reservation_id); break;
    case CKV__ENVELOPE__BODY_KVS_ABORT: WIDEN(env->kvs_abort->reservation_id); break;
    case CKV__ENVELOPE__BODY_KVS_RELEASE: WIDEN(env->kvs_release->lease_id); break;
    case CKV__ENVELOPE__BODY_KVS_FETCH:
        WIDEN(env->kvs_fetch->release_lease_id);
        q->n = kvs_proto_n_keys(env->kvs_fetch->keys);
        q->keys = calloc(q->n, sizeof(*q->keys));
        if (!q->keys)
            return -ENOMEM;
        for (size_t i = 0; i < q->n; i++)
            q->keys[i] = kvs_proto_key(env->kvs_fetch->keys, i);
        break;
    case CKV__ENVELOPE__BODY_KVS_RESERVE:
        q->n = kvs_proto_n_keys(env->kvs_reserve->keys);
        q->keys = calloc(q->n, sizeof(*q->keys));
        q->ntok = calloc(q->n, sizeof(*q->ntok));
        if (!q->keys || !q->ntok)
            return -ENOMEM;
        for (size_t i = 0; i < q->n; i++) {
            q->keys[i] = kvs_proto_key(env->kvs_reserve->keys, i);
            q->ntok[i] = env->kvs_reserve->n_tokens[i];
        }
        break;
    default: break;
    }
#undef WIDEN
    return 0;
}

int kvs_fuzz_run(struct kvs_fuzz *f, const uint8_t *data, size_t len, char *err, size_t errlen)
{
    if (len < 1)
        return 0;
    f->runs++;
    struct kvs_config cfg = f->cfg;
    uint8_t opts = data[0];
    uint32_t bb = ckv_shm_block_bytes((uint32_t)cfg.head_dim, (uint32_t)cfg.dtype);
    if (opts & 1) {
        snprintf(cfg.spill_file, sizeof(cfg.spill_file), "%s", f->spill_path);
        cfg.spill_bytes = 512ull * bb;
        cfg.pool_bytes = 16ull * bb;
    } else {
        cfg.pool_bytes = 64ull * bb;
    }
    /* count the frames */
    size_t n_frames = 0;
    for (size_t p = 1; p + 2 <= len;) {
        size_t fl = data[p] | (size_t)data[p + 1] << 8;
        p += 2 + fl;
        n_frames++;
    }
    struct run r = {.f = f, .err = err, .errlen = errlen, .n_reqs = n_frames};
    r.reqs = calloc(n_frames ? n_frames : 1, sizeof(*r.reqs));
    if (!r.reqs)
        return -ENOMEM;
    char msg[512];
    int rc = kvs_store_new(&cfg, on_reply, &r, &r.s, msg, sizeof(msg));
    if (rc) {
        snprintf(err, errlen, "store: %s", msg);
        free(r.reqs);
        return rc;
    }
    uint64_t epoch;
    {
        struct kvs_store_info in;
        kvs_store_info(r.s, &in);
        epoch = in.epoch;
    }
    struct kvs_limits lim = {.max_request_clusters = (uint32_t)cfg.max_request_clusters,
                             .max_cluster_tokens = (uint32_t)cfg.max_cluster_tokens};
    size_t p = 1;
    for (size_t i = 0; i < n_frames && !r.rc; i++) {
        size_t fl = data[p] | (size_t)data[p + 1] << 8;
        p += 2;
        if (fl > len - p)
            fl = len - p; /* the last frame may be cut short */
        f->frames++;
        struct ckv_wire_addr from = {.request_id = i};
        Ckv__Envelope *env;
        rc = kvs_proto_decode(data + p, fl, cfg.max_msg_bytes, &lim, &env, msg, sizeof(msg));
        p += fl;
        if (rc) {
            kvs_store_reject(r.s, &from, rc);
        } else {
            f->decoded++;
            if (prepare(&r, env, &r.reqs[i], epoch)) {
                ckv_wire_free(env);
                fail(&r, "out of memory");
                break;
            }
            kvs_store_handle(r.s, &from, env);
        }
        drain(&r);
        for (size_t j = 0; j <= i && !r.rc; j++)
            if (r.reqs[j].replies != 1)
                fail(&r, "request %zu (%s) got %d replies", j, kvs_proto_body_name(r.reqs[j].type),
                     r.reqs[j].replies);
        char why[256];
        if (!r.rc && kvs_store_check(r.s, why, sizeof(why)))
            fail(&r, "after frame %zu: %s", i, why);
    }
    kvs_store_destroy(&r.s, true);
    for (size_t i = 0; i < n_frames; i++) {
        free(r.reqs[i].keys);
        free(r.reqs[i].ntok);
    }
    free(r.reqs);
    return r.rc;
}

/* ---- seeds ---- */

struct seed {
    uint8_t *buf;
    size_t cap, len;
    bool overflow;
    uint32_t next_id; /* grants of a fresh store are numbered 1, 2, ... */
};

static void put_env(struct seed *s, Ckv__Envelope__BodyCase body, void *msg)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.version = CKV_PROTOCOL_VERSION;
    env.body_case = body;
    /* every body pointer of the oneof shares one union slot */
    env.kvs_hello = msg;
    size_t n = ckv__envelope__get_packed_size(&env);
    if (s->len + 2 + n > s->cap || n > 0xffff) {
        s->overflow = true;
        return;
    }
    s->buf[s->len++] = (uint8_t)(n & 0xff);
    s->buf[s->len++] = (uint8_t)(n >> 8);
    s->len += ckv__envelope__pack(&env, s->buf + s->len);
}

static void put_bytes(struct seed *s, const void *bytes, size_t n)
{
    if (s->len + 2 + n > s->cap) {
        s->overflow = true;
        return;
    }
    s->buf[s->len++] = (uint8_t)(n & 0xff);
    s->buf[s->len++] = (uint8_t)(n >> 8);
    memcpy(s->buf + s->len, bytes, n);
    s->len += n;
}

/* Keys of n clusters (at most 16) of seq and layer, cluster ids from first on. */
struct seed_keys {
    Ckv__KvsKeys msg;
    uint64_t seq[16];
    uint32_t layer[16], head[16], id[16];
};

static void seed_keys(struct seed_keys *k, uint64_t seq, uint32_t layer, uint32_t first, size_t n)
{
    Ckv__KvsKeys init = CKV__KVS_KEYS__INIT;
    k->msg = init;
    n = n < 16 ? n : 16;
    for (size_t i = 0; i < n; i++) {
        k->seq[i] = seq;
        k->layer[i] = layer;
        k->head[i] = (uint32_t)i % 2;
        k->id[i] = first + (uint32_t)i;
    }
    k->msg.n_seq_uid = k->msg.n_layer = k->msg.n_kv_head = k->msg.n_cluster_id = n;
    k->msg.seq_uid = k->seq;
    k->msg.layer = k->layer;
    k->msg.kv_head = k->head;
    k->msg.cluster_id = k->id;
}

/* n clusters of seq, layer, from cluster id first, of tokens, tokens + 5, ... tokens. */
static void put_reserve(struct seed *s, uint64_t seq, uint32_t layer, uint32_t first, size_t n,
                        uint32_t tokens)
{
    struct seed_keys k;
    seed_keys(&k, seq, layer, first, n);
    uint32_t nt[16];
    for (size_t i = 0; i < k.msg.n_seq_uid; i++)
        nt[i] = tokens + (uint32_t)i * 5;
    Ckv__KvsReserve r = CKV__KVS_RESERVE__INIT;
    r.keys = &k.msg;
    r.n_n_tokens = k.msg.n_seq_uid;
    r.n_tokens = nt;
    put_env(s, CKV__ENVELOPE__BODY_KVS_RESERVE, &r);
}

static void put_fetch(struct seed *s, uint64_t seq, uint32_t layer, uint32_t first, size_t n,
                      uint32_t release)
{
    struct seed_keys k;
    seed_keys(&k, seq, layer, first, n);
    Ckv__KvsFetch f = CKV__KVS_FETCH__INIT;
    f.keys = &k.msg;
    f.release_lease_id = release;
    put_env(s, CKV__ENVELOPE__BODY_KVS_FETCH, &f);
}

static void put_id(struct seed *s, Ckv__Envelope__BodyCase body, uint64_t id)
{
    /* commit, abort, release and drop all have one varint as field 1 */
    Ckv__KvsCommit c = CKV__KVS_COMMIT__INIT;
    Ckv__KvsAbort a = CKV__KVS_ABORT__INIT;
    Ckv__KvsRelease r = CKV__KVS_RELEASE__INIT;
    Ckv__KvsDrop d = CKV__KVS_DROP__INIT;
    c.reservation_id = a.reservation_id = r.lease_id = d.seq_uid = id;
    void *msg = body == CKV__ENVELOPE__BODY_KVS_COMMIT    ? (void *)&c
                : body == CKV__ENVELOPE__BODY_KVS_ABORT   ? (void *)&a
                : body == CKV__ENVELOPE__BODY_KVS_RELEASE ? (void *)&r
                                                          : (void *)&d;
    put_env(s, body, msg);
}

size_t kvs_fuzz_seed(unsigned i, uint8_t *buf, size_t cap)
{
    struct seed s = {.buf = buf, .cap = cap};
    if (cap < 1)
        return 0;
    const Ckv__Envelope__BodyCase COMMIT = CKV__ENVELOPE__BODY_KVS_COMMIT,
                                  ABORT = CKV__ENVELOPE__BODY_KVS_ABORT,
                                  RELEASE = CKV__ENVELOPE__BODY_KVS_RELEASE,
                                  DROP = CKV__ENVELOPE__BODY_KVS_DROP;
    switch (i) {
    case 0: { /* the harmless ones */
        buf[s.len++] = 0;
        Ckv__KvsHello h = CKV__KVS_HELLO__INIT;
        h.client_name = "seed";
        put_env(&s, CKV__ENVELOPE__BODY_KVS_HELLO, &h);
        Ckv__Ping ping = CKV__PING__INIT;
        ping.nonce = 7;
        put_env(&s, CKV__ENVELOPE__BODY_PING, &ping);
        Ckv__StatsRequest st = CKV__STATS_REQUEST__INIT;
        put_env(&s, CKV__ENVELOPE__BODY_STATS_REQUEST, &st);
        st.prometheus = true;
        put_env(&s, CKV__ENVELOPE__BODY_STATS_REQUEST, &st);
        break;
    }
    case 1: /* reserve, commit, fetch, release, drop */
        buf[s.len++] = 0;
        put_reserve(&s, 1, 0, 0, 3, 7);
        put_id(&s, COMMIT, 1);
        put_fetch(&s, 1, 0, 0, 3, 0);
        put_id(&s, RELEASE, 2);
        put_id(&s, DROP, 1);
        break;
    case 2: /* abort, reuse, duplicates, folded release */
        buf[s.len++] = 0;
        put_reserve(&s, 2, 1, 0, 2, 20);
        put_id(&s, ABORT, 1);
        put_fetch(&s, 2, 1, 0, 2, 0);
        put_reserve(&s, 2, 1, 0, 2, 20);
        put_id(&s, COMMIT, 2);
        put_fetch(&s, 2, 1, 0, 2, 0);
        put_fetch(&s, 2, 1, 0, 1, 3);
        put_id(&s, RELEASE, 4);
        put_id(&s, COMMIT, 2);
        break;
    case 3: /* spill and restore: 48 clusters of 3-4 blocks through a 16-block segment */
        buf[s.len++] = 1;
        for (uint32_t k = 0; k < 12; k++) {
            put_reserve(&s, 3, k, 0, 4, 40);
            put_id(&s, COMMIT, k + 1);
        }
        for (uint32_t k = 0; k < 12; k++)
            put_fetch(&s, 3, k, 0, 2, k ? 12 + k : 0);
        put_id(&s, DROP, 3);
        break;
    case 4: /* drop while leased and reserved, with spill */
        buf[s.len++] = 1;
        put_reserve(&s, 4, 0, 0, 4, 30);
        put_id(&s, COMMIT, 1);
        put_fetch(&s, 4, 0, 0, 4, 0);
        put_reserve(&s, 4, 1, 0, 2, 10);
        put_id(&s, DROP, 4);
        put_id(&s, RELEASE, 2);
        put_id(&s, COMMIT, 3);
        put_fetch(&s, 4, 0, 0, 1, 0);
        break;
    case 5: { /* frames that are not requests */
        buf[s.len++] = 0;
        put_bytes(&s, "\xff\xff\xff", 3);
        Ckv__KvsAck ack = CKV__KVS_ACK__INIT;
        put_env(&s, CKV__ENVELOPE__BODY_KVS_ACK, &ack);
        Ckv__Pong pong = CKV__PONG__INIT;
        put_env(&s, CKV__ENVELOPE__BODY_PONG, &pong);
        put_bytes(&s, "\x08\x02", 2); /* version 2, no body */
        put_bytes(&s, "", 0);
        break;
    }
    default: return 0;
    }
    return s.overflow ? 0 : s.len;
}
