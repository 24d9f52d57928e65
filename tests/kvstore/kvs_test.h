/*
 * Helpers shared by the kvstore suites (static: each suite file includes its own copy):
 * an in-process store whose replies are collected, request builders, and a byte pattern to
 * write into blocks and check on the way back.
 */
#ifndef KVS_TEST_H
#define KVS_TEST_H

#include <criterion/criterion.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckv_clock.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_shm.h"
#include "ckv_test.h"
#include "ckv_wire.h"
#include "kvs_config.h"
#include "kvs_key.h"
#include "kvs_proto.h"
#include "kvs_store.h"

/* A unique segment name per test process and call (tests run in parallel). */
static inline void kvt_segment_name(char *out, size_t cap)
{
    static atomic_int counter;
    snprintf(out, cap, "/ckv-test-%d-%d", (int)getpid(), atomic_fetch_add(&counter, 1));
}

/* Defaults plus a private segment name, a 4 KiB-block geometry and no spill file. */
static inline void kvt_config(struct kvs_config *cfg, const char *dir, uint64_t pool_bytes,
                              uint64_t spill_bytes)
{
    char err[256];
    cr_assert_eq(ckv_config_defaults(kvs_config_options, cfg, err, sizeof(err)), 0, "%s", err);
    snprintf(cfg->run_dir, sizeof(cfg->run_dir), "%s", dir);
    kvt_segment_name(cfg->segment_name, sizeof(cfg->segment_name));
    cfg->pool_bytes = pool_bytes;
    cfg->head_dim = 64; /* 4 KiB blocks */
    cfg->mlock = false;
    if (spill_bytes) {
        int len = snprintf(cfg->spill_file, sizeof(cfg->spill_file), "%.200s/spill", dir);
        cr_assert_lt(len, (int)sizeof(cfg->spill_file));
        cfg->spill_bytes = spill_bytes;
    }
}

/* ---- an in-process store with a reply queue ---- */

#define KVT_MAX_REPLIES 64

struct kvt {
    kvs_store_t *s;
    struct kvs_config cfg;
    Ckv__Envelope *replies[KVT_MAX_REPLIES]; /* deep copies, owned */
    int n_replies;
};

/* Copies an envelope by packing and unpacking it. */
static inline Ckv__Envelope *kvt_copy(Ckv__Envelope *env)
{
    size_t len = ckv__envelope__get_packed_size(env);
    uint8_t *buf = malloc(len ? len : 1);
    cr_assert(buf);
    ckv__envelope__pack(env, buf);
    Ckv__Envelope *c = ckv__envelope__unpack(NULL, len, buf);
    free(buf);
    cr_assert(c, "envelope did not survive pack/unpack");
    return c;
}

static inline void kvt_on_reply(void *arg, const struct ckv_wire_addr *to, Ckv__Envelope *rep)
{
    struct kvt *t = arg;
    (void)to;
    cr_assert_lt(t->n_replies, KVT_MAX_REPLIES);
    rep->version = CKV_PROTOCOL_VERSION;
    t->replies[t->n_replies++] = kvt_copy(rep);
}

static inline int kvt_open(struct kvt *t)
{
    char err[512] = "";
    int rc = kvs_store_new(&t->cfg, kvt_on_reply, t, &t->s, err, sizeof(err));
    if (rc)
        cr_log_info("kvs_store_new: %s", err);
    return rc;
}

/* Hands a request to the store (a copy: the store takes ownership), then polls the store
 * until a reply comes (up to 10 s: waits for spill I/O). Returns the reply, owned. */
static inline Ckv__Envelope *kvt_call(struct kvt *t, Ckv__Envelope *req)
{
    static uint64_t next_id = 1;
    req->version = CKV_PROTOCOL_VERSION;
    req->request_id = next_id++;
    struct ckv_wire_addr from = {.request_id = req->request_id};
    kvs_store_handle(t->s, &from, kvt_copy(req));
    uint64_t deadline = ckv_now_ms() + 10000;
    while (t->n_replies == 0 && ckv_now_ms() < deadline) {
        int fd = kvs_store_io_fd(t->s);
        if (fd >= 0) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            int to = kvs_store_timeout_ms(t->s);
            poll(&p, 1, to < 0 || to > 10 ? 10 : to);
        }
        kvs_store_poll(t->s);
    }
    cr_assert_eq(t->n_replies, 1, "expected one reply, got %d", t->n_replies);
    Ckv__Envelope *r = t->replies[0];
    t->n_replies = 0;
    cr_assert_eq(r->request_id, req->request_id);
    return r;
}

static inline void kvt_close(struct kvt *t, bool remove)
{
    for (int i = 0; i < t->n_replies; i++)
        ckv_wire_free(t->replies[i]);
    t->n_replies = 0;
    kvs_store_destroy(&t->s, remove);
}

/* ---- request builders: the envelope and its parts live in a struct kvt_msg ---- */

struct kvt_msg {
    Ckv__Envelope env;
    Ckv__KvsKeys keys;
    uint64_t seq[512];
    uint32_t layer[512], head[512], id[512];
    uint32_t ntok[512];
    union {
        Ckv__KvsHello hello;
        Ckv__KvsReserve reserve;
        Ckv__KvsCommit commit;
        Ckv__KvsAbort abort;
        Ckv__KvsFetch fetch;
        Ckv__KvsRelease release;
        Ckv__KvsDrop drop;
        Ckv__StatsRequest stats;
        Ckv__Ping ping;
    } u;
};

static inline void kvt_keys(struct kvt_msg *m, const struct kvs_key *keys, size_t n)
{
    cr_assert_leq(n, 512);
    Ckv__KvsKeys init = CKV__KVS_KEYS__INIT;
    m->keys = init;
    for (size_t i = 0; i < n; i++) {
        m->seq[i] = keys[i].seq_uid;
        m->layer[i] = keys[i].layer;
        m->head[i] = keys[i].kv_head;
        m->id[i] = keys[i].cluster_id;
    }
    m->keys.n_seq_uid = m->keys.n_layer = m->keys.n_kv_head = m->keys.n_cluster_id = n;
    m->keys.seq_uid = m->seq;
    m->keys.layer = m->layer;
    m->keys.kv_head = m->head;
    m->keys.cluster_id = m->id;
}

static inline Ckv__Envelope *kvt_reserve(struct kvt_msg *m, const struct kvs_key *keys,
                                         const uint32_t *ntok, size_t n)
{
    Ckv__Envelope e = CKV__ENVELOPE__INIT;
    Ckv__KvsReserve r = CKV__KVS_RESERVE__INIT;
    m->env = e;
    kvt_keys(m, keys, n);
    memcpy(m->ntok, ntok, n * sizeof(uint32_t));
    r.keys = &m->keys;
    r.n_n_tokens = n;
    r.n_tokens = m->ntok;
    m->u.reserve = r;
    m->env.body_case = CKV__ENVELOPE__BODY_KVS_RESERVE;
    m->env.kvs_reserve = &m->u.reserve;
    return &m->env;
}

static inline Ckv__Envelope *kvt_fetch(struct kvt_msg *m, const struct kvs_key *keys, size_t n,
                                       uint64_t release_lease_id)
{
    Ckv__Envelope e = CKV__ENVELOPE__INIT;
    Ckv__KvsFetch f = CKV__KVS_FETCH__INIT;
    m->env = e;
    kvt_keys(m, keys, n);
    f.keys = &m->keys;
    f.release_lease_id = release_lease_id;
    m->u.fetch = f;
    m->env.body_case = CKV__ENVELOPE__BODY_KVS_FETCH;
    m->env.kvs_fetch = &m->u.fetch;
    return &m->env;
}

/* commit, abort, release, drop: one id. */
static inline Ckv__Envelope *kvt_id(struct kvt_msg *m, Ckv__Envelope__BodyCase body, uint64_t id)
{
    Ckv__Envelope e = CKV__ENVELOPE__INIT;
    m->env = e;
    m->env.body_case = body;
    switch (body) {
    case CKV__ENVELOPE__BODY_KVS_COMMIT: {
        Ckv__KvsCommit c = CKV__KVS_COMMIT__INIT;
        c.reservation_id = id;
        m->u.commit = c;
        m->env.kvs_commit = &m->u.commit;
        break;
    }
    case CKV__ENVELOPE__BODY_KVS_ABORT: {
        Ckv__KvsAbort a = CKV__KVS_ABORT__INIT;
        a.reservation_id = id;
        m->u.abort = a;
        m->env.kvs_abort = &m->u.abort;
        break;
    }
    case CKV__ENVELOPE__BODY_KVS_RELEASE: {
        Ckv__KvsRelease r = CKV__KVS_RELEASE__INIT;
        r.lease_id = id;
        m->u.release = r;
        m->env.kvs_release = &m->u.release;
        break;
    }
    case CKV__ENVELOPE__BODY_KVS_DROP: {
        Ckv__KvsDrop d = CKV__KVS_DROP__INIT;
        d.seq_uid = id;
        m->u.drop = d;
        m->env.kvs_drop = &m->u.drop;
        break;
    }
    default: cr_assert_fail("kvt_id: body %d", (int)body);
    }
    return &m->env;
}

/* The error code of a reply, or -1 when it is not an Error. */
static inline int kvt_error_code(const Ckv__Envelope *r)
{
    return r->body_case == CKV__ENVELOPE__BODY_ERROR ? (int)r->error->code : -1;
}

/* ---- block contents ---- */

/* Word w of block j of cluster k: a function of all three, so a block read back at the wrong
 * place, of the wrong cluster, or shifted, differs. Blocks are whole 8-byte words. */
static inline uint64_t kvt_word(uint64_t base, uint32_t w)
{
    uint64_t h = base + (uint64_t)w * 0x9e3779b97f4a7c15ull;
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

static inline uint64_t kvt_base(const struct kvs_key *k, uint32_t j)
{
    return kvs_key_hash(k) ^ ((uint64_t)j << 48);
}

static inline void kvt_fill(uint8_t *block, uint32_t bytes, const struct kvs_key *k, uint32_t j)
{
    uint64_t base = kvt_base(k, j);
    for (uint32_t w = 0; w < bytes / 8; w++) {
        uint64_t v = kvt_word(base, w);
        memcpy(block + 8 * w, &v, 8);
    }
}

/* Returns the first word index that differs, or -1. */
static inline long kvt_check(const uint8_t *block, uint32_t bytes, const struct kvs_key *k,
                             uint32_t j)
{
    uint64_t base = kvt_base(k, j);
    for (uint32_t w = 0; w < bytes / 8; w++) {
        uint64_t v;
        memcpy(&v, block + 8 * w, 8);
        if (v != kvt_word(base, w))
            return (long)w;
    }
    return -1;
}

#endif
