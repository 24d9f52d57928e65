/*
 * The KV store's request semantics, eviction and I/O scheduling (see kvs_store.h).
 *
 * Everything runs on the caller's thread, one step at a time, and never blocks: a request that
 * needs blocks the pool does not have, or clusters that live in the spill file, waits in a
 * FIFO (struct kvs_wait) while eviction and restores run through the io_uring ring, and is
 * run again from the start whenever an I/O finishes or blocks come free. Running a request
 * again is safe because every run first checks everything and changes state only when it can
 * finish (reserve) or only in ways a failure undoes (fetch: pins, restores of its clusters).
 *
 * Ids of reservations and leases carry the epoch in their top 24 bits, so an id from before a
 * restart is told apart from an unknown one.
 */
#include "kvs_store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include "ckv_clock.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_stats.h"
#include "kvs_index.h"
#include "kvs_proto.h"
#include "kvs_spill.h"

#define ID_EPOCH_SHIFT       40
#define ERROR_LOG_PER_SECOND 20
/* Blocks one reserve or fetch may cover: its reply (about 10 bytes per block offset) must stay
 * well inside a client's 4 MiB message limit (CKV_WIRE_DEFAULT_MAX_BYTES). */
#define MAX_REQUEST_BLOCKS (1u << 18)

/* Outcome of running a request. */
enum { RUN_DONE = 0, RUN_WAIT = 1 };

/* A reservation or a lease: entries pinned until commit/abort/release or the deadline. */
struct kvs_grant {
    uint64_t id;
    uint64_t deadline_ns;
    uint32_t n;
    uint32_t *entries; /* (n), owned */
    struct kvs_grant *prev, *next;
};

/* Grants in creation order, which is deadline order (one timeout per kind). */
struct kvs_grants {
    struct kvs_grant *head, *tail;
    uint32_t n;
};

/* A reserve or fetch request waiting for blocks or restores. */
struct kvs_wait {
    struct ckv_wire_addr from;
    Ckv__Envelope *req; /* owned */
    uint64_t t_start_ns;
    uint64_t deadline_ns;
    uint32_t *pinned;     /* fetch: (n_keys) entries pinned from the first run on; owned */
    uint32_t restored;    /* fetch: restores started for it */
    uint64_t need_blocks; /* free blocks it waits for (eviction aims at the sum of these) */
    struct kvs_wait *next;
};

struct kvs_stats {
    uint64_t hellos, reserves, reserve_clusters, commits, commit_clusters, aborts;
    uint64_t fetches, fetch_clusters, fetch_hits, fetch_misses, releases, drops, drop_clusters;
    uint64_t stats_requests, pings;
    uint64_t spills, restores, spills_abandoned, spill_errors, restore_errors;
    uint64_t bytes_spilled, bytes_restored;
    uint64_t lease_expiries, reservation_expiries, waits, wait_timeouts;
    uint64_t errors, errors_by_code[16];
    struct ckv_hist request_us;    /* requests answered at once: handling time */
    struct ckv_hist fetch_wait_us; /* fetches that waited for restores: arrival to reply */
};

struct kvs_store {
    struct kvs_config cfg;
    struct ckv_shm shm;
    struct kvs_index ix;
    bool ix_ready;
    struct kvs_spill sp;
    bool have_spill;
    uint64_t epoch;
    uint64_t next_id;
    kvs_reply_fn reply;
    void *reply_arg;
    struct kvs_limits lim;
    struct kvs_grants reservations, leases;
    struct kvs_wait *wait_head, *wait_tail;
    uint32_t n_waiting;
    bool retry_waiting;          /* blocks came free or I/O finished since the last retry */
    uint32_t ioq_head, ioq_tail; /* entries with block I/Os not yet in the ring */
    uint32_t mark_gen;           /* stamp for kvs_rt.mark (duplicate keys of a fetch) */
    uint64_t high_blocks, low_blocks;
    uint64_t capacity_blocks; /* blocks of data reservations may fill: pool + slots - headroom */
    uint64_t start_ns;
    bool mlocked;
    struct kvs_recovery recovery;
    bool recovered; /* the segment existed and was recovered */
    bool created;   /* the segment was created by this store */
    struct kvs_stats st;
    /* scratch for replies, grown on demand */
    uint32_t *s_ntok, *s_nblk, *s_idx;
    uint64_t *s_off;
    struct kvs_key *s_keys;
    size_t s_cap, s_off_cap;
    /* error log rate limit */
    uint64_t log_window_ns;
    uint32_t log_in_window, log_suppressed;
};

/* ---------------------------------------------------------------- replies and errors ---- */

static uint32_t stats_code_slot(Ckv__ErrorCode code)
{
    return (uint32_t)code < 16 ? (uint32_t)code : 0;
}

__attribute__((format(printf, 4, 5))) static void
reply_error(kvs_store_t *s, const struct ckv_wire_addr *to, int rc, const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    Ckv__ErrorCode code = ckv_wire_error_code(rc);
    s->st.errors++;
    s->st.errors_by_code[stats_code_slot(code)]++;
    uint64_t now = ckv_now_ns();
    if (now - s->log_window_ns > 1000000000ull) {
        if (s->log_suppressed)
            LOG_WARN("%u more error replies not logged", s->log_suppressed);
        s->log_window_ns = now;
        s->log_in_window = 0;
        s->log_suppressed = 0;
    }
    if (s->log_in_window++ < ERROR_LOG_PER_SECOND)
        LOG_WARN("request %llu: error %d: %s", (unsigned long long)to->request_id, (int)code, text);
    else
        s->log_suppressed++;
    Ckv__Error err = CKV__ERROR__INIT;
    err.code = code;
    err.message = text;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.request_id = to->request_id;
    env.body_case = CKV__ENVELOPE__BODY_ERROR;
    env.error = &err;
    s->reply(s->reply_arg, to, &env);
}

static void send_body(kvs_store_t *s, const struct ckv_wire_addr *to, Ckv__Envelope *env)
{
    env->request_id = to->request_id;
    s->reply(s->reply_arg, to, env);
}

static void send_ack(kvs_store_t *s, const struct ckv_wire_addr *to, uint32_t count)
{
    Ckv__KvsAck ack = CKV__KVS_ACK__INIT;
    ack.epoch = s->epoch;
    ack.count = count;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.body_case = CKV__ENVELOPE__BODY_KVS_ACK;
    env.kvs_ack = &ack;
    send_body(s, to, &env);
}

void kvs_store_reject(kvs_store_t *s, const struct ckv_wire_addr *from, int rc)
{
    reply_error(s, from, rc, "%s", ckv_strerror(rc));
}

/* Grows the reply scratch to n clusters and n_off offsets. Returns 0 or -ENOMEM. */
static int scratch_reserve(kvs_store_t *s, size_t n, size_t n_off)
{
    if (n > s->s_cap) {
        size_t cap = n < 64 ? 64 : n;
        uint32_t *a = realloc(s->s_ntok, cap * sizeof(uint32_t));
        if (a)
            s->s_ntok = a;
        uint32_t *b = realloc(s->s_nblk, cap * sizeof(uint32_t));
        if (b)
            s->s_nblk = b;
        uint32_t *c = realloc(s->s_idx, cap * sizeof(uint32_t));
        if (c)
            s->s_idx = c;
        struct kvs_key *d = realloc(s->s_keys, cap * sizeof(struct kvs_key));
        if (d)
            s->s_keys = d;
        if (!a || !b || !c || !d)
            return -ENOMEM;
        s->s_cap = cap;
    }
    if (n_off > s->s_off_cap) {
        size_t cap = n_off < 256 ? 256 : n_off;
        uint64_t *o = realloc(s->s_off, cap * sizeof(uint64_t));
        if (!o)
            return -ENOMEM;
        s->s_off = o;
        s->s_off_cap = cap;
    }
    return 0;
}

/* ---------------------------------------------------------------- holds ---------------- */

static uint64_t new_id(kvs_store_t *s)
{
    return (s->epoch << ID_EPOCH_SHIFT) | (++s->next_id & ((1ull << ID_EPOCH_SHIFT) - 1));
}

static uint64_t id_epoch(uint64_t id)
{
    return id >> ID_EPOCH_SHIFT;
}

static void grants_append(struct kvs_grants *l, struct kvs_grant *h)
{
    h->next = NULL;
    h->prev = l->tail;
    if (l->tail)
        l->tail->next = h;
    else
        l->head = h;
    l->tail = h;
    l->n++;
}

static void grants_remove(struct kvs_grants *l, struct kvs_grant *h)
{
    if (h->prev)
        h->prev->next = h->next;
    else
        l->head = h->next;
    if (h->next)
        h->next->prev = h->prev;
    else
        l->tail = h->prev;
    l->n--;
}

/* Searches from the newest: the one a client releases is nearly always among the last few. */
static struct kvs_grant *grants_find(const struct kvs_grants *l, uint64_t id)
{
    for (struct kvs_grant *h = l->tail; h; h = h->prev)
        if (h->id == id)
            return h;
    return NULL;
}

/* Unpins a lease's entries and frees it. */
static void lease_end(kvs_store_t *s, struct kvs_grant *h)
{
    grants_remove(&s->leases, h);
    for (uint32_t i = 0; i < h->n; i++)
        kvs_index_unpin(&s->ix, h->entries[i]);
    free(h->entries);
    free(h);
    s->retry_waiting = true;
}

/* Ends a reservation: commit publishes its live entries; otherwise they are unlinked. Returns
 * the entries committed or unlinked. */
static uint32_t reservation_end(kvs_store_t *s, struct kvs_grant *h, bool commit)
{
    grants_remove(&s->reservations, h);
    uint32_t count = 0;
    for (uint32_t i = 0; i < h->n; i++) {
        uint32_t e = h->entries[i];
        if (s->ix.rt[e].live) { /* a drop of the sequence may have come first */
            if (commit)
                kvs_index_commit(&s->ix, e);
            else
                kvs_index_unlink(&s->ix, e);
            count++;
        }
        kvs_index_unpin(&s->ix, e);
    }
    free(h->entries);
    free(h);
    s->retry_waiting = true;
    return count;
}

/* A message for an id that is not (or no longer) there. */
static void reply_unknown_id(kvs_store_t *s, const struct ckv_wire_addr *to, const char *what,
                             uint64_t id)
{
    if (id_epoch(id) != 0 && id_epoch(id) < s->epoch)
        reply_error(s, to, -ENOENT,
                    "%s %llu is from epoch %llu; the store restarted (epoch %llu) and dropped it",
                    what, (unsigned long long)id, (unsigned long long)id_epoch(id),
                    (unsigned long long)s->epoch);
    else
        reply_error(s, to, -ENOENT, "%s %llu not found (never granted, already ended, or expired)",
                    what, (unsigned long long)id);
}

/* ---------------------------------------------------------------- I/O ------------------- */

static void ioq_push(kvs_store_t *s, uint32_t e)
{
    struct kvs_rt *r = &s->ix.rt[e];
    ASSERT(!r->in_ioq);
    r->in_ioq = 1;
    r->ioq_next = KVS_NONE;
    if (s->ioq_tail != KVS_NONE)
        s->ix.rt[s->ioq_tail].ioq_next = e;
    else
        s->ioq_head = e;
    s->ioq_tail = e;
}

/* Hands queued block I/Os to the ring, as many as it has room for, and submits them at once. */
static void issue_io(kvs_store_t *s)
{
    if (!s->have_spill)
        return;
    struct kvs_index *ix = &s->ix;
    while (s->ioq_head != KVS_NONE && kvs_spill_room(&s->sp) > 0) {
        uint32_t e = s->ioq_head;
        struct kvs_rt *r = &ix->rt[e];
        while (r->io_unissued > 0 && kvs_spill_room(&s->sp) > 0) {
            struct kvs_io *io;
            if (r->io == KVS_RT_IO_SPILL) {
                io = kvs_spill_prep(&s->sp, KVS_IO_WRITE, ckv_shm_block(&s->shm, r->io_src),
                                    r->io_dst);
                io->block = r->io_src;
                r->io_src = ix->block_next[r->io_src];
                r->io_dst = ix->slot_next[r->io_dst];
            } else {
                ASSERT(r->io == KVS_RT_IO_RESTORE);
                io = kvs_spill_prep(&s->sp, KVS_IO_READ, ckv_shm_block(&s->shm, r->io_dst),
                                    r->io_src);
                io->block = r->io_dst;
                r->io_src = ix->slot_next[r->io_src];
                r->io_dst = ix->block_next[r->io_dst];
            }
            ASSERT(io);
            io->entry = e;
            r->io_unissued--;
        }
        if (r->io_unissued == 0) {
            s->ioq_head = r->ioq_next;
            if (s->ioq_head == KVS_NONE)
                s->ioq_tail = KVS_NONE;
            r->in_ioq = 0;
            r->ioq_next = KVS_NONE;
        }
    }
    int rc = kvs_spill_submit(&s->sp);
    if (rc)
        LOG_ERROR("io_uring submit: %s (retried on the next turn)", strerror(-rc));
}

static void on_io_done(void *arg, struct kvs_io *io, int res)
{
    kvs_store_t *s = arg;
    uint32_t e = io->entry;
    struct kvs_rt *r = &s->ix.rt[e];
    if (res && !r->io_err)
        r->io_err = res;
    ASSERT(r->io_left > 0);
    if (--r->io_left > 0)
        return;
    uint64_t bytes = (uint64_t)s->ix.ent[e].n_blocks * s->ix.block_bytes;
    int err = r->io_err;
    if (r->io == KVS_RT_IO_SPILL) {
        if (kvs_index_spill_end(&s->ix, e, err)) {
            s->st.spills++;
            s->st.bytes_spilled += bytes;
        } else if (err) {
            s->st.spill_errors++;
        } else {
            s->st.spills_abandoned++;
        }
    } else {
        if (kvs_index_restore_end(&s->ix, e, err)) {
            s->st.restores++;
            s->st.bytes_restored += bytes;
        } else if (err) {
            s->st.restore_errors++;
        }
    }
    s->retry_waiting = true;
}

/* Blocks that can come free without waiting for anyone: free ones, ones being spilled, and
 * unpinned LRU clusters as far as the spill file has room for them. */
static uint64_t blocks_obtainable(const kvs_store_t *s)
{
    const struct kvs_index *ix = &s->ix;
    uint64_t evictable =
        s->have_spill ? CKV_MIN(ix->evictable_blocks, (uint64_t)ix->free_slots.n) : 0;
    return ix->free_blocks.n + ix->spilling_blocks + evictable;
}

/* Spills least-recently-fetched clusters until the blocks free (or on their way) cover what
 * waiting requests need, and, above the high watermark, until the low watermark is in sight. */
static void evict(kvs_store_t *s)
{
    if (!s->have_spill)
        return;
    struct kvs_index *ix = &s->ix;
    uint64_t goal = 0;
    for (struct kvs_wait *w = s->wait_head; w; w = w->next)
        goal += w->need_blocks;
    if (kvs_index_blocks_used(ix) > s->high_blocks)
        goal = CKV_MAX(goal, ix->n_blocks - s->low_blocks);
    goal = CKV_MIN(goal, (uint64_t)ix->n_blocks);
    while (ix->free_blocks.n + ix->spilling_blocks < goal) {
        uint32_t e = kvs_index_victim(ix);
        if (e == KVS_NONE || ix->free_slots.n < ix->ent[e].n_blocks)
            break;
        kvs_index_spill_begin(ix, e);
        ioq_push(s, e);
    }
}

/* ---------------------------------------------------------------- requests -------------- */

static void do_hello(kvs_store_t *s, const struct ckv_wire_addr *from, const Ckv__KvsHello *h)
{
    s->st.hellos++;
    const struct ckv_shm_header *hd = s->shm.hdr;
    LOG_INFO("hello from '%.64s' (request %llu)", h->client_name ? h->client_name : "",
             (unsigned long long)from->request_id);
    Ckv__KvsHelloReply r = CKV__KVS_HELLO_REPLY__INIT;
    r.epoch = s->epoch;
    r.segment_name = s->cfg.segment_name;
    r.segment_bytes = hd->segment_bytes;
    r.block_tokens = hd->block_tokens;
    r.head_dim = hd->head_dim;
    r.dtype = (Ckv__KvsDtype)hd->dtype;
    r.block_bytes = hd->block_bytes;
    r.n_blocks = hd->n_blocks;
    r.lease_ms = (uint32_t)s->cfg.lease_ms;
    r.reserve_ms = (uint32_t)s->cfg.reserve_ms;
    r.max_request_clusters = s->lim.max_request_clusters;
    r.max_cluster_tokens = s->lim.max_cluster_tokens;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.body_case = CKV__ENVELOPE__BODY_KVS_HELLO_REPLY;
    env.kvs_hello_reply = &r;
    send_body(s, from, &env);
}

static int key_cmp_qsort(const void *a, const void *b)
{
    return kvs_key_cmp(a, b);
}

/* Copies the keys to scratch and finds a duplicate; returns its index in the sorted copy or -1. */
static long find_duplicate(kvs_store_t *s, const Ckv__KvsKeys *keys, size_t n)
{
    for (size_t i = 0; i < n; i++)
        s->s_keys[i] = kvs_proto_key(keys, i);
    qsort(s->s_keys, n, sizeof(struct kvs_key), key_cmp_qsort);
    for (size_t i = 1; i < n; i++)
        if (kvs_key_cmp(&s->s_keys[i - 1], &s->s_keys[i]) == 0)
            return (long)i;
    return -1;
}

#define KEY_FMT     "(seq %llu, layer %u, head %u, cluster %u)"
#define KEY_ARGS(k) (unsigned long long)(k).seq_uid, (k).layer, (k).kv_head, (k).cluster_id

static int run_reserve(kvs_store_t *s, struct kvs_wait *w)
{
    const Ckv__KvsReserve *rq = w->req->kvs_reserve;
    struct kvs_index *ix = &s->ix;
    size_t n = kvs_proto_n_keys(rq->keys);
    if (scratch_reserve(s, n, 0)) {
        reply_error(s, &w->from, -ENOMEM, "out of memory for %zu keys", n);
        return RUN_DONE;
    }
    long dup = find_duplicate(s, rq->keys, n);
    if (dup >= 0) {
        reply_error(s, &w->from, -EINVAL, "reserve: cluster " KEY_FMT " listed twice",
                    KEY_ARGS(s->s_keys[dup]));
        return RUN_DONE;
    }
    uint64_t need = 0;
    for (size_t i = 0; i < n; i++) {
        struct kvs_key k = kvs_proto_key(rq->keys, i);
        uint32_t e = kvs_index_find(ix, &k);
        if (e != KVS_NONE) {
            bool committed = ckv_shm_entry_state(&ix->ent[e]) != CKV_SHM_RESERVED;
            reply_error(s, &w->from, -EINVAL, "reserve: cluster " KEY_FMT " is already %s",
                        KEY_ARGS(k), committed ? "stored" : "reserved");
            return RUN_DONE;
        }
        need += kvs_index_blocks_for(rq->n_tokens[i]);
    }
    if (need > MAX_REQUEST_BLOCKS) {
        reply_error(s, &w->from, -EINVAL,
                    "reserve: %llu blocks in one request, at most %u (split it)",
                    (unsigned long long)need, MAX_REQUEST_BLOCKS);
        return RUN_DONE;
    }
    if (n > ix->free_entries.n) {
        reply_error(s, &w->from, -ENOSPC,
                    "reserve: index full (%zu clusters asked, %u entries free of max-clusters %u)",
                    n, ix->free_entries.n, ix->n_entries);
        return RUN_DONE;
    }
    if (need > ix->n_blocks) {
        reply_error(s, &w->from, -ENOSPC, "reserve: %llu blocks asked, the whole segment holds %u",
                    (unsigned long long)need, ix->n_blocks);
        return RUN_DONE;
    }
    if (ix->data_blocks + need > s->capacity_blocks) {
        reply_error(s, &w->from, -ENOSPC,
                    "reserve: segment%s full (%llu blocks asked; %llu of %llu stored%s)",
                    s->have_spill ? " and spill file" : "", (unsigned long long)need,
                    (unsigned long long)ix->data_blocks, (unsigned long long)s->capacity_blocks,
                    s->have_spill ? ", the rest of the spill file is kept for restores"
                                  : "; no spill file");
        return RUN_DONE;
    }
    if (need > ix->free_blocks.n) {
        uint64_t can = blocks_obtainable(s);
        if (need > can) {
            reply_error(s, &w->from, -ENOSPC,
                        "reserve: %llu blocks asked, %llu can be had: %u free, %llu being "
                        "spilled, %llu evictable with %u spill slots free; the rest is pinned "
                        "by leases, reservations and waiting fetches",
                        (unsigned long long)need, (unsigned long long)can, ix->free_blocks.n,
                        (unsigned long long)ix->spilling_blocks,
                        (unsigned long long)ix->evictable_blocks, ix->free_slots.n);
            return RUN_DONE;
        }
        w->need_blocks = need;
        return RUN_WAIT;
    }
    /* Everything checked: grant. */
    struct kvs_grant *h = calloc(1, sizeof(*h));
    uint32_t *entries = malloc(n * sizeof(uint32_t));
    if (scratch_reserve(s, n, need) || !h || !entries) {
        free(h);
        free(entries);
        reply_error(s, &w->from, -ENOMEM, "out of memory for a reservation of %zu clusters", n);
        return RUN_DONE;
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        struct kvs_key k = kvs_proto_key(rq->keys, i);
        uint32_t e = kvs_index_reserve(ix, &k, rq->n_tokens[i]);
        entries[i] = e;
        s->s_nblk[i] = ix->ent[e].n_blocks;
        kvs_index_block_offsets(ix, e, s->s_off + off);
        off += ix->ent[e].n_blocks;
    }
    h->id = new_id(s);
    h->deadline_ns = ckv_now_ns() + (uint64_t)s->cfg.reserve_ms * 1000000ull;
    h->n = (uint32_t)n;
    h->entries = entries;
    grants_append(&s->reservations, h);
    s->st.reserves++;
    s->st.reserve_clusters += n;

    Ckv__KvsReserveReply r = CKV__KVS_RESERVE_REPLY__INIT;
    r.epoch = s->epoch;
    r.reservation_id = h->id;
    r.n_n_blocks = n;
    r.n_blocks = s->s_nblk;
    r.n_block_offset = off;
    r.block_offset = s->s_off;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.body_case = CKV__ENVELOPE__BODY_KVS_RESERVE_REPLY;
    env.kvs_reserve_reply = &r;
    send_body(s, &w->from, &env);
    return RUN_DONE;
}

/* Unpins what a fetch pinned. */
static void fetch_unpin(kvs_store_t *s, struct kvs_wait *w)
{
    if (!w->pinned)
        return;
    for (size_t i = 0; i < kvs_proto_n_keys(w->req->kvs_fetch->keys); i++)
        kvs_index_unpin(&s->ix, w->pinned[i]);
    free(w->pinned);
    w->pinned = NULL;
    s->retry_waiting = true;
}

/* First run of a fetch: checks the keys and the lease to release, releases it, pins the
 * clusters. Returns 0, or an error already answered. */
static int fetch_start(kvs_store_t *s, struct kvs_wait *w)
{
    const Ckv__KvsFetch *f = w->req->kvs_fetch;
    struct kvs_index *ix = &s->ix;
    size_t n = kvs_proto_n_keys(f->keys);
    if (scratch_reserve(s, n, 0)) {
        reply_error(s, &w->from, -ENOMEM, "out of memory for %zu keys", n);
        return -ENOMEM;
    }
    struct kvs_grant *old = NULL;
    if (f->release_lease_id) {
        old = grants_find(&s->leases, f->release_lease_id);
        if (!old) {
            reply_unknown_id(s, &w->from, "fetch: lease to release", f->release_lease_id);
            return -ENOENT;
        }
    }
    /* duplicates show as the same entry twice: marks instead of a sort on the hot path */
    uint32_t mark = ++s->mark_gen ? s->mark_gen : ++s->mark_gen;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        struct kvs_key k = kvs_proto_key(f->keys, i);
        uint32_t e = kvs_index_find(ix, &k);
        if (e == KVS_NONE || ckv_shm_entry_state(&ix->ent[e]) == CKV_SHM_RESERVED) {
            reply_error(s, &w->from, -ENOENT, "fetch: cluster " KEY_FMT " %s", KEY_ARGS(k),
                        e == KVS_NONE ? "not found" : "is reserved, not committed");
            return -ENOENT;
        }
        if (ix->rt[e].mark == mark) {
            reply_error(s, &w->from, -EINVAL, "fetch: cluster " KEY_FMT " listed twice",
                        KEY_ARGS(k));
            return -EINVAL;
        }
        ix->rt[e].mark = mark;
        s->s_idx[i] = e;
        total += ix->ent[e].n_blocks;
    }
    if (total > MAX_REQUEST_BLOCKS) {
        reply_error(s, &w->from, -EINVAL,
                    "fetch: %llu blocks in one request, at most %u (split it)",
                    (unsigned long long)total, MAX_REQUEST_BLOCKS);
        return -EINVAL;
    }
    if (s->leases.n - (old ? 1 : 0) >= (uint32_t)s->cfg.max_leases) {
        reply_error(s, &w->from, -EBUSY,
                    "fetch: %u leases outstanding (max-leases); release some and retry",
                    s->leases.n);
        return -EBUSY;
    }
    uint32_t *pinned = malloc(n * sizeof(uint32_t));
    if (!pinned) {
        reply_error(s, &w->from, -ENOMEM, "out of memory for a fetch of %zu clusters", n);
        return -ENOMEM;
    }
    if (old) {
        lease_end(s, old);
        s->st.releases++;
    }
    uint32_t hits = 0;
    for (size_t i = 0; i < n; i++) {
        pinned[i] = s->s_idx[i];
        kvs_index_pin(ix, pinned[i]);
        hits += ckv_shm_entry_state(&ix->ent[pinned[i]]) == CKV_SHM_RESIDENT;
    }
    w->pinned = pinned;
    s->st.fetches++;
    s->st.fetch_clusters += n;
    s->st.fetch_hits += hits;
    s->st.fetch_misses += n - hits;
    return 0;
}

static int run_fetch(kvs_store_t *s, struct kvs_wait *w)
{
    const Ckv__KvsFetch *f = w->req->kvs_fetch;
    struct kvs_index *ix = &s->ix;
    size_t n = kvs_proto_n_keys(f->keys);
    if (!w->pinned) {
        if (fetch_start(s, w))
            return RUN_DONE;
    } else {
        for (size_t i = 0; i < n; i++) {
            uint32_t e = w->pinned[i];
            const struct kvs_rt *r = &ix->rt[e];
            struct kvs_key k = kvs_proto_key(f->keys, i);
            if (!r->live) {
                reply_error(s, &w->from, -ENOENT,
                            "fetch: cluster " KEY_FMT " was dropped while the fetch waited",
                            KEY_ARGS(k));
                fetch_unpin(s, w);
                return RUN_DONE;
            }
            if (r->io == KVS_RT_IO_NONE && r->hold == KVS_HOLD_SLOTS && r->io_err) {
                reply_error(s, &w->from, -EIO,
                            "fetch: restore of cluster " KEY_FMT " from the spill file failed: %s",
                            KEY_ARGS(k), strerror(-r->io_err));
                fetch_unpin(s, w);
                return RUN_DONE;
            }
        }
    }
    /* Restores: start what the free blocks allow, in key order. */
    uint64_t need = 0;
    bool all_resident = true;
    for (size_t i = 0; i < n; i++) {
        uint32_t e = w->pinned[i];
        struct kvs_rt *r = &ix->rt[e];
        if (r->hold == KVS_HOLD_BLOCKS && r->io != KVS_RT_IO_RESTORE)
            continue;
        all_resident = false;
        if (r->io == KVS_RT_IO_RESTORE)
            continue; /* on its way (maybe for another fetch) */
        uint32_t nb = ix->ent[e].n_blocks;
        if (ix->free_blocks.n >= nb) {
            kvs_index_restore_begin(ix, e);
            ioq_push(s, e);
            w->restored++;
        } else {
            need += nb;
        }
    }
    if (all_resident) {
        struct kvs_grant *h = calloc(1, sizeof(*h));
        size_t total = 0;
        for (size_t i = 0; i < n; i++)
            total += ix->ent[w->pinned[i]].n_blocks;
        if (!h || scratch_reserve(s, n, total)) {
            free(h);
            reply_error(s, &w->from, -ENOMEM, "out of memory for a lease");
            fetch_unpin(s, w);
            return RUN_DONE;
        }
        size_t off = 0;
        for (size_t i = 0; i < n; i++) {
            uint32_t e = w->pinned[i];
            s->s_ntok[i] = ix->ent[e].n_tokens;
            s->s_nblk[i] = ix->ent[e].n_blocks;
            kvs_index_block_offsets(ix, e, s->s_off + off);
            off += s->s_nblk[i];
            kvs_index_touch(ix, e);
        }
        h->id = new_id(s);
        h->deadline_ns = ckv_now_ns() + (uint64_t)s->cfg.lease_ms * 1000000ull;
        h->n = (uint32_t)n;
        h->entries = w->pinned; /* the pins become the lease's */
        w->pinned = NULL;
        grants_append(&s->leases, h);

        Ckv__KvsFetchReply r = CKV__KVS_FETCH_REPLY__INIT;
        r.epoch = s->epoch;
        r.lease_id = h->id;
        r.lease_ms = (uint32_t)s->cfg.lease_ms;
        r.n_n_tokens = n;
        r.n_tokens = s->s_ntok;
        r.n_n_blocks = n;
        r.n_blocks = s->s_nblk;
        r.n_block_offset = off;
        r.block_offset = s->s_off;
        r.restored = w->restored;
        Ckv__Envelope env = CKV__ENVELOPE__INIT;
        env.body_case = CKV__ENVELOPE__BODY_KVS_FETCH_REPLY;
        env.kvs_fetch_reply = &r;
        send_body(s, &w->from, &env);
        return RUN_DONE;
    }
    if (need > 0 && need > blocks_obtainable(s)) {
        reply_error(s, &w->from, -ENOSPC,
                    "fetch: restoring needs %llu more blocks; %u are free, %llu can be evicted "
                    "(the rest is pinned by leases, reservations and waiting fetches)",
                    (unsigned long long)need, ix->free_blocks.n,
                    (unsigned long long)ix->evictable_blocks);
        fetch_unpin(s, w);
        return RUN_DONE;
    }
    w->need_blocks = need;
    return RUN_WAIT;
}

static void do_drop(kvs_store_t *s, const struct ckv_wire_addr *from, uint64_t seq_uid)
{
    uint32_t count = 0;
    uint32_t e = kvs_index_seq_head(&s->ix, seq_uid);
    while (e != KVS_NONE) {
        uint32_t next = s->ix.rt[e].seq_next;
        kvs_index_unlink(&s->ix, e);
        count++;
        e = next;
    }
    s->st.drops++;
    s->st.drop_clusters += count;
    s->retry_waiting = true;
    send_ack(s, from, count);
}

static void do_stats(kvs_store_t *s, const struct ckv_wire_addr *from, bool prometheus)
{
    s->st.stats_requests++;
    struct ckv_buf b = {0};
    kvs_store_stats(s, prometheus, &b);
    if (b.oom) {
        ckv_buf_free(&b);
        reply_error(s, from, -ENOMEM, "out of memory rendering stats");
        return;
    }
    Ckv__StatsReply r = CKV__STATS_REPLY__INIT;
    r.text = b.data ? b.data : "";
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.body_case = CKV__ENVELOPE__BODY_STATS_REPLY;
    env.stats_reply = &r;
    send_body(s, from, &env);
    ckv_buf_free(&b);
}

/* Runs a reserve or fetch; returns RUN_DONE (answered, resources settled) or RUN_WAIT. */
static int run_request(kvs_store_t *s, struct kvs_wait *w)
{
    if (w->req->body_case == CKV__ENVELOPE__BODY_KVS_RESERVE)
        return run_reserve(s, w);
    return run_fetch(s, w);
}

static void wait_free(struct kvs_wait *w)
{
    ckv_wire_free(w->req);
    free(w->pinned);
    free(w);
}

void kvs_store_handle(kvs_store_t *s, const struct ckv_wire_addr *from, Ckv__Envelope *req)
{
    uint64_t t0 = ckv_now_ns();
    char err[256];
    int rc = kvs_proto_check(req, &s->lim, err, sizeof(err));
    if (rc) {
        reply_error(s, from, rc, "%s", err);
        ckv_wire_free(req);
        return;
    }
    switch (req->body_case) {
    case CKV__ENVELOPE__BODY_KVS_HELLO: do_hello(s, from, req->kvs_hello); break;
    case CKV__ENVELOPE__BODY_PING: {
        s->st.pings++;
        Ckv__Pong pong = CKV__PONG__INIT;
        pong.nonce = req->ping->nonce;
        Ckv__Envelope env = CKV__ENVELOPE__INIT;
        env.body_case = CKV__ENVELOPE__BODY_PONG;
        env.pong = &pong;
        send_body(s, from, &env);
        break;
    }
    case CKV__ENVELOPE__BODY_STATS_REQUEST:
        do_stats(s, from, req->stats_request->prometheus);
        break;
    case CKV__ENVELOPE__BODY_KVS_COMMIT:
    case CKV__ENVELOPE__BODY_KVS_ABORT: {
        bool commit = req->body_case == CKV__ENVELOPE__BODY_KVS_COMMIT;
        uint64_t id = commit ? req->kvs_commit->reservation_id : req->kvs_abort->reservation_id;
        struct kvs_grant *h = grants_find(&s->reservations, id);
        if (!h) {
            reply_unknown_id(s, from, commit ? "commit: reservation" : "abort: reservation", id);
            break;
        }
        uint32_t count = reservation_end(s, h, commit);
        if (commit) {
            s->st.commits++;
            s->st.commit_clusters += count;
        } else {
            s->st.aborts++;
        }
        send_ack(s, from, count);
        break;
    }
    case CKV__ENVELOPE__BODY_KVS_RELEASE: {
        struct kvs_grant *h = grants_find(&s->leases, req->kvs_release->lease_id);
        if (!h) {
            reply_unknown_id(s, from, "release: lease", req->kvs_release->lease_id);
            break;
        }
        uint32_t count = h->n;
        lease_end(s, h);
        s->st.releases++;
        send_ack(s, from, count);
        break;
    }
    case CKV__ENVELOPE__BODY_KVS_DROP: do_drop(s, from, req->kvs_drop->seq_uid); break;
    case CKV__ENVELOPE__BODY_KVS_RESERVE:
    case CKV__ENVELOPE__BODY_KVS_FETCH: {
        struct kvs_wait w = {.from = *from, .req = req, .t_start_ns = t0};
        if (run_request(s, &w) == RUN_WAIT) {
            struct kvs_wait *p = malloc(sizeof(*p));
            if (!p) {
                reply_error(s, from, -ENOMEM, "out of memory for a waiting request");
                fetch_unpin(s, &w);
                break;
            }
            *p = w;
            p->deadline_ns = t0 + (uint64_t)s->cfg.io_wait_ms * 1000000ull;
            p->next = NULL;
            if (s->wait_tail)
                s->wait_tail->next = p;
            else
                s->wait_head = p;
            s->wait_tail = p;
            s->n_waiting++;
            s->st.waits++;
            evict(s);
            issue_io(s);
            return; /* req is the waiting request's now */
        }
        break;
    }
    default: ASSERT(!"kvs_proto_check() let an unhandled body through");
    }
    ckv_wire_free(req);
    evict(s);
    issue_io(s);
    ckv_hist_record(&s->st.request_us, (ckv_now_ns() - t0) / 1000u);
}

/* Runs every waiting request again, in arrival order; answers the ones past their deadline. */
static void retry_waiting(kvs_store_t *s, uint64_t now)
{
    s->retry_waiting = false;
    struct kvs_wait **link = &s->wait_head, *prev = NULL;
    while (*link) {
        struct kvs_wait *w = *link;
        int r;
        if (now >= w->deadline_ns) {
            s->st.wait_timeouts++;
            reply_error(s, &w->from, -ETIMEDOUT,
                        "%s waited %d ms (io-wait-ms) for spill I/O and gave up",
                        kvs_proto_body_name(w->req->body_case), s->cfg.io_wait_ms);
            if (w->req->body_case == CKV__ENVELOPE__BODY_KVS_FETCH)
                fetch_unpin(s, w);
            r = RUN_DONE;
        } else {
            r = run_request(s, w);
        }
        if (r == RUN_DONE) {
            if (w->req->body_case == CKV__ENVELOPE__BODY_KVS_FETCH)
                ckv_hist_record(&s->st.fetch_wait_us, (now - w->t_start_ns) / 1000u);
            *link = w->next;
            if (s->wait_tail == w)
                s->wait_tail = prev;
            s->n_waiting--;
            wait_free(w);
        } else {
            prev = w;
            link = &w->next;
        }
    }
}

void kvs_store_poll(kvs_store_t *s)
{
    if (s->have_spill)
        kvs_spill_reap(&s->sp, on_io_done, s);
    uint64_t now = ckv_now_ns();
    while (s->leases.head && s->leases.head->deadline_ns <= now) {
        struct kvs_grant *h = s->leases.head;
        LOG_WARN("lease %llu of %u clusters expired unreleased", (unsigned long long)h->id, h->n);
        s->st.lease_expiries++;
        lease_end(s, h);
    }
    while (s->reservations.head && s->reservations.head->deadline_ns <= now) {
        struct kvs_grant *h = s->reservations.head;
        LOG_WARN("reservation %llu of %u clusters expired uncommitted", (unsigned long long)h->id,
                 h->n);
        s->st.reservation_expiries++;
        reservation_end(s, h, false);
    }
    /* Waiting requests share one timeout: the head's deadline is the earliest. */
    if (s->wait_head && (s->retry_waiting || now >= s->wait_head->deadline_ns))
        retry_waiting(s, now);
    evict(s);
    issue_io(s);
}

int kvs_store_timeout_ms(const kvs_store_t *s)
{
    if (s->wait_head && s->retry_waiting)
        return 0;
    uint64_t next = UINT64_MAX;
    if (s->leases.head)
        next = CKV_MIN(next, s->leases.head->deadline_ns);
    if (s->reservations.head)
        next = CKV_MIN(next, s->reservations.head->deadline_ns);
    if (s->wait_head)
        next = CKV_MIN(next, s->wait_head->deadline_ns);
    if (next == UINT64_MAX)
        return -1;
    uint64_t now = ckv_now_ns();
    if (next <= now)
        return 0;
    uint64_t ms = (next - now + 999999ull) / 1000000ull;
    return ms > 60000 ? 60000 : (int)ms;
}

int kvs_store_io_fd(const kvs_store_t *s)
{
    return s->have_spill ? kvs_spill_fd(&s->sp) : -1;
}

/* ---------------------------------------------------------------- stats ----------------- */

void kvs_store_info(const kvs_store_t *s, struct kvs_store_info *in)
{
    const struct kvs_index *ix = &s->ix;
    memset(in, 0, sizeof(*in));
    in->epoch = s->epoch;
    in->blocks_total = ix->n_blocks;
    in->blocks_free = ix->free_blocks.n;
    in->blocks_used = ix->n_blocks - ix->free_blocks.n;
    in->slots_total = ix->n_slots;
    in->slots_used = ix->n_slots - ix->free_slots.n;
    in->clusters_reserved = ix->n_reserved;
    in->clusters_resident = ix->n_resident;
    in->clusters_spilled = ix->n_spilled;
    in->clusters_unlinked = ix->n_unlinked;
    in->leases = s->leases.n;
    in->reservations = s->reservations.n;
    in->waiting = s->n_waiting;
    in->io_in_flight = s->have_spill ? s->sp.in_flight : 0;
    in->spills = s->st.spills;
    in->restores = s->st.restores;
    in->bytes_spilled = s->st.bytes_spilled;
    in->bytes_restored = s->st.bytes_restored;
    if (s->have_spill) {
        uint64_t now = ckv_now_ns();
        in->spill_busy_ns =
            s->sp.busy_ns[KVS_IO_WRITE] +
            (s->sp.kind_in_flight[KVS_IO_WRITE] ? now - s->sp.busy_since_ns[KVS_IO_WRITE] : 0);
        in->restore_busy_ns =
            s->sp.busy_ns[KVS_IO_READ] +
            (s->sp.kind_in_flight[KVS_IO_READ] ? now - s->sp.busy_since_ns[KVS_IO_READ] : 0);
    }
    in->lease_expiries = s->st.lease_expiries;
    in->reservation_expiries = s->st.reservation_expiries;
    in->errors = s->st.errors;
    in->direct_io = s->have_spill && s->sp.direct;
    in->mlocked = s->mlocked;
}

void kvs_store_stats(kvs_store_t *s, bool prometheus, struct ckv_buf *out)
{
    struct kvs_store_info in;
    kvs_store_info(s, &in);
    const struct kvs_index *ix = &s->ix;
    const struct kvs_stats *st = &s->st;
    struct ckv_stats_writer w;
    ckv_stats_begin(&w, out, prometheus, "ckv_kvstore");

    ckv_stats_section(&w, "server");
    ckv_stats_gauge(&w, "epoch", "store epoch (bumped at every start)", (double)s->epoch);
    ckv_stats_gauge(&w, "pid", "process id", (double)getpid());
    ckv_stats_gauge(&w, "uptime_s", "seconds since start", ckv_elapsed_s(s->start_ns));
    ckv_stats_text(&w, "segment_name", "shared-memory segment", s->cfg.segment_name);
    ckv_stats_gauge(&w, "segment_bytes", "bytes of the segment", (double)s->shm.bytes);
    ckv_stats_gauge(&w, "mlocked", "1 when the segment is locked in RAM", in.mlocked);
    ckv_stats_gauge(&w, "recovered_resident", "resident clusters recovered at start",
                    s->recovery.resident);
    ckv_stats_gauge(&w, "recovered_spilled", "spilled clusters recovered at start",
                    s->recovery.spilled);
    ckv_stats_gauge(&w, "recovered_reservations_dropped",
                    "uncommitted reservations of the previous epoch dropped at start",
                    s->recovery.reservations_dropped);
    ckv_stats_gauge(&w, "recovered_damaged", "damaged index entries freed at start",
                    s->recovery.damaged);

    ckv_stats_section(&w, "memory");
    ckv_stats_gauge(&w, "block_bytes", "bytes per block", ix->block_bytes);
    ckv_stats_gauge(&w, "blocks_total", "blocks in the pool", (double)in.blocks_total);
    ckv_stats_gauge(&w, "blocks_used", "blocks granted, resident or being restored",
                    (double)in.blocks_used);
    ckv_stats_gauge(&w, "blocks_free", "free blocks", (double)in.blocks_free);
    ckv_stats_gauge(&w, "blocks_spilling", "blocks being written to the spill file",
                    (double)ix->spilling_blocks);
    ckv_stats_gauge(&w, "blocks_restoring", "blocks being read back", (double)ix->restoring_blocks);
    ckv_stats_gauge(&w, "blocks_evictable", "blocks of unpinned resident clusters",
                    (double)ix->evictable_blocks);
    ckv_stats_gauge(&w, "clusters_resident", "committed clusters in memory", in.clusters_resident);
    ckv_stats_gauge(&w, "clusters_spilled", "committed clusters in the spill file",
                    in.clusters_spilled);
    ckv_stats_gauge(&w, "clusters_reserved", "reserved, uncommitted clusters",
                    in.clusters_reserved);
    ckv_stats_gauge(&w, "clusters_dropped_pending",
                    "dropped clusters waiting for a lease or an I/O to end", in.clusters_unlinked);
    ckv_stats_gauge(&w, "index_entries_free", "free index entries", ix->free_entries.n);
    ckv_stats_gauge(&w, "sequences", "sequences with clusters", ix->n_seqs);

    ckv_stats_section(&w, "spill");
    ckv_stats_gauge(&w, "spill_enabled", "1 with a spill file", s->have_spill);
    ckv_stats_gauge(&w, "direct_io", "1 when the spill file uses O_DIRECT", in.direct_io);
    ckv_stats_gauge(&w, "slots_total", "slots of the spill file", (double)in.slots_total);
    ckv_stats_gauge(&w, "slots_used", "slots holding spilled blocks", (double)in.slots_used);
    ckv_stats_gauge(&w, "io_in_flight", "block I/Os in the ring", in.io_in_flight);
    ckv_stats_counter(&w, "spills", "clusters spilled", st->spills);
    ckv_stats_counter(&w, "restores", "clusters restored", st->restores);
    ckv_stats_counter(&w, "spills_abandoned", "spills dropped because a fetch came first",
                      st->spills_abandoned);
    ckv_stats_counter(&w, "spill_errors", "clusters whose spill failed", st->spill_errors);
    ckv_stats_counter(&w, "restore_errors", "clusters whose restore failed", st->restore_errors);
    ckv_stats_counter(&w, "bytes_spilled", "bytes written to the spill file", st->bytes_spilled);
    ckv_stats_counter(&w, "bytes_restored", "bytes read back", st->bytes_restored);
    ckv_stats_counter(&w, "spill_busy_us", "time with spill writes in flight",
                      in.spill_busy_ns / 1000u);
    ckv_stats_counter(&w, "restore_busy_us", "time with restore reads in flight",
                      in.restore_busy_ns / 1000u);
    if (s->have_spill) {
        ckv_stats_counter(&w, "io_submit_calls", "io_uring_submit calls", s->sp.submit_calls);
        ckv_stats_counter(&w, "io_short_retries", "short transfers resubmitted",
                          s->sp.short_retries);
        ckv_stats_counter(&w, "io_reaps", "completion batches reaped", s->sp.reaps);
        ckv_stats_hist(&w, "io_latency_us", "block I/O latency, microseconds", &s->sp.lat_us);
    }

    ckv_stats_section(&w, "requests");
    ckv_stats_counter(&w, "hellos", "hello requests", st->hellos);
    ckv_stats_counter(&w, "reserves", "reservations granted", st->reserves);
    ckv_stats_counter(&w, "reserve_clusters", "clusters reserved", st->reserve_clusters);
    ckv_stats_counter(&w, "commits", "reservations committed", st->commits);
    ckv_stats_counter(&w, "commit_clusters", "clusters committed", st->commit_clusters);
    ckv_stats_counter(&w, "aborts", "reservations aborted", st->aborts);
    ckv_stats_counter(&w, "fetches", "fetch requests accepted", st->fetches);
    ckv_stats_counter(&w, "fetch_clusters", "clusters asked by fetches", st->fetch_clusters);
    ckv_stats_counter(&w, "hits", "fetched clusters found resident", st->fetch_hits);
    ckv_stats_counter(&w, "misses", "fetched clusters found spilled", st->fetch_misses);
    ckv_stats_counter(&w, "releases", "leases released", st->releases);
    ckv_stats_counter(&w, "drops", "drop requests", st->drops);
    ckv_stats_counter(&w, "drop_clusters", "clusters dropped", st->drop_clusters);
    ckv_stats_counter(&w, "stats_requests", "stats requests", st->stats_requests);
    ckv_stats_counter(&w, "pings", "ping requests", st->pings);
    ckv_stats_gauge(&w, "leases_active", "leases outstanding", in.leases);
    ckv_stats_gauge(&w, "reservations_active", "reservations outstanding", in.reservations);
    ckv_stats_gauge(&w, "requests_waiting", "requests waiting for spill I/O", in.waiting);
    ckv_stats_counter(&w, "lease_expiries", "leases that expired unreleased", st->lease_expiries);
    ckv_stats_counter(&w, "reservation_expiries", "reservations that expired uncommitted",
                      st->reservation_expiries);
    ckv_stats_counter(&w, "waits", "requests that had to wait for spill I/O", st->waits);
    ckv_stats_counter(&w, "wait_timeouts", "waiting requests that gave up", st->wait_timeouts);
    ckv_stats_counter(&w, "errors", "error replies", st->errors);
    ckv_stats_counter(&w, "errors_malformed", "frames that did not decode",
                      st->errors_by_code[CKV__ERROR_CODE__ERROR_CODE_MALFORMED]);
    ckv_stats_counter(&w, "errors_too_large", "frames above max-msg-size",
                      st->errors_by_code[CKV__ERROR_CODE__ERROR_CODE_TOO_LARGE]);
    ckv_stats_counter(&w, "errors_bad_request", "requests with a bad field or order",
                      st->errors_by_code[CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST] +
                          st->errors_by_code[CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE] +
                          st->errors_by_code[CKV__ERROR_CODE__ERROR_CODE_BAD_VERSION]);
    ckv_stats_counter(&w, "errors_not_found", "unknown clusters, leases or reservations",
                      st->errors_by_code[CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND]);
    ckv_stats_counter(&w, "errors_no_space", "refused for lack of memory and spill space",
                      st->errors_by_code[CKV__ERROR_CODE__ERROR_CODE_NO_SPACE]);
    ckv_stats_hist(&w, "request_us", "handling time of requests answered at once, us",
                   &st->request_us);
    ckv_stats_hist(&w, "fetch_wait_us", "arrival to reply of fetches that waited, us",
                   &st->fetch_wait_us);
}

int kvs_store_check(const kvs_store_t *s, char *err, size_t errlen)
{
    return kvs_index_check(&s->ix, err, errlen);
}

const struct ckv_shm *kvs_store_shm(const kvs_store_t *s)
{
    return &s->shm;
}

/* ---------------------------------------------------------------- open / close ---------- */

__attribute__((format(printf, 4, 5))) static int open_fail(char *err, size_t errlen, int rc,
                                                           const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static uint64_t random_nonce(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != (ssize_t)sizeof(v))
        v = ckv_now_ns() ^ ((uint64_t)getpid() << 40);
    return v ? v : 1;
}

/* Opens the segment: recovers an existing one, replaces a half-made one, or creates it. */
static int open_segment(kvs_store_t *s, const struct ckv_shm_geometry *g, char *err, size_t errlen)
{
    const char *name = s->cfg.segment_name;
    struct ckv_shm_header layout;
    int rc = ckv_shm_layout(g, &layout);
    if (rc)
        return open_fail(err, errlen, CKV_ECONFIG, "segment geometry: %s", ckv_strerror(rc));
    char why[256];
    rc = ckv_shm_open(name, &s->shm, why, sizeof(why));
    if (rc == 0) {
        if (flock(s->shm.fd, LOCK_EX | LOCK_NB) != 0)
            return open_fail(err, errlen, -EBUSY,
                             "segment %s is in use by another ckv-kvstore "
                             "(pid %u)",
                             name, s->shm.hdr->store_pid);
        const struct ckv_shm_header *h = s->shm.hdr;
        const char *field = h->head_dim != g->head_dim             ? "head-dim"
                            : h->dtype != g->dtype                 ? "dtype"
                            : h->n_blocks != g->n_blocks           ? "segment-size"
                            : h->max_clusters != g->max_clusters   ? "max-clusters"
                            : h->n_spill_slots != g->n_spill_slots ? "spill-size/spill-file"
                                                                   : NULL;
        if (field)
            return open_fail(err, errlen, CKV_ECONFIG,
                             "segment %s exists with another geometry (%s differs: it has "
                             "head_dim %u, dtype %s, %llu blocks, %llu entries, %llu spill "
                             "slots): start with its configuration, or remove it with --cleanup "
                             "(its clusters are lost)",
                             name, field, h->head_dim, ckv_shm_dtype_name(h->dtype),
                             (unsigned long long)h->n_blocks, (unsigned long long)h->max_clusters,
                             (unsigned long long)h->n_spill_slots);
        s->recovered = true;
        return 0;
    }
    if (rc == CKV_EFORMAT && strstr(why, "magic")) {
        /* Half-made by a store that died while creating it: nothing was ever committed. */
        int fd = shm_open(name, O_RDWR, 0);
        bool locked = fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) != 0;
        if (fd >= 0)
            close(fd);
        if (locked)
            return open_fail(err, errlen, -EBUSY,
                             "segment %s is being created by another "
                             "ckv-kvstore",
                             name);
        LOG_WARN("segment %s: %s; replacing it", name, why);
        ckv_shm_unlink(name);
        rc = -ENOENT;
    }
    if (rc == CKV_EFORMAT)
        return open_fail(err, errlen, CKV_EFORMAT,
                         "segment %s is not one this store can read (%s): remove it with "
                         "ckv-kvstore --cleanup",
                         name, why);
    if (rc != -ENOENT)
        return open_fail(err, errlen, rc, "segment %s: %s", name, why);
    rc = ckv_shm_create(name, &layout, random_nonce(), &s->shm);
    if (rc)
        return open_fail(err, errlen, rc, "creating segment %s (%llu bytes): %s", name,
                         (unsigned long long)layout.segment_bytes, ckv_strerror(rc));
    s->created = true;
    if (flock(s->shm.fd, LOCK_EX | LOCK_NB) != 0)
        return open_fail(err, errlen, -EBUSY, "segment %s: lock taken right after creation", name);
    return 0;
}

/* Opens the spill file and checks that it is the one this segment's spilled clusters live in. */
static int open_spill(kvs_store_t *s, char *err, size_t errlen)
{
    const struct ckv_shm_header *h = s->shm.hdr;
    int rc = kvs_spill_open(&s->sp, s->cfg.spill_file, h->n_spill_slots, h->block_bytes,
                            s->cfg.direct_io, (uint32_t)s->cfg.io_depth);
    if (rc)
        return open_fail(err, errlen, rc, "spill file %s (%llu bytes): %s", s->cfg.spill_file,
                         (unsigned long long)(h->n_spill_slots * h->block_bytes), ckv_strerror(rc));
    s->have_spill = true;
    struct kvs_spill_header fh;
    rc = kvs_spill_header_read(&s->sp, &fh);
    if (rc)
        return open_fail(err, errlen, rc, "spill file %s: header: %s", s->cfg.spill_file,
                         ckv_strerror(rc));
    bool ours = fh.magic == KVS_SPILL_MAGIC && fh.nonce == h->spill_nonce &&
                fh.n_slots == h->n_spill_slots && fh.block_bytes == h->block_bytes;
    if (ours)
        return 0;
    if (s->recovered && s->ix.n_spilled > 0)
        return open_fail(err, errlen, CKV_ECONFIG,
                         "spill file %s does not belong to segment %s, whose %u spilled "
                         "clusters live in its own spill file: start with that file, or "
                         "remove the segment with --cleanup (those clusters are lost)",
                         s->cfg.spill_file, s->cfg.segment_name, s->ix.n_spilled);
    struct kvs_spill_header nh = {.magic = KVS_SPILL_MAGIC,
                                  .nonce = h->spill_nonce,
                                  .n_slots = h->n_spill_slots,
                                  .block_bytes = h->block_bytes};
    snprintf(nh.segment_name, sizeof(nh.segment_name), "%s", s->cfg.segment_name);
    rc = kvs_spill_header_write(&s->sp, &nh);
    if (rc)
        return open_fail(err, errlen, rc, "spill file %s: writing the header: %s",
                         s->cfg.spill_file, ckv_strerror(rc));
    return 0;
}

int kvs_store_new(const struct kvs_config *cfg, kvs_reply_fn reply, void *reply_arg,
                  kvs_store_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (err && errlen)
        err[0] = '\0';
    int rc = kvs_config_check(cfg, err, errlen);
    if (rc)
        return rc;
    kvs_store_t *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->cfg = *cfg;
    s->shm.fd = -1;
    s->reply = reply;
    s->reply_arg = reply_arg;
    s->ioq_head = s->ioq_tail = KVS_NONE;
    s->start_ns = ckv_now_ns();
    s->lim.max_request_clusters = (uint32_t)cfg->max_request_clusters;
    s->lim.max_cluster_tokens = (uint32_t)cfg->max_cluster_tokens;

    uint32_t bb = ckv_shm_block_bytes((uint32_t)cfg->head_dim, (uint32_t)cfg->dtype);
    struct ckv_shm_geometry g = {
        .head_dim = (uint32_t)cfg->head_dim,
        .dtype = (uint32_t)cfg->dtype,
        .n_blocks = cfg->pool_bytes / bb,
        .n_spill_slots = cfg->spill_file[0] ? cfg->spill_bytes / bb : 0,
    };
    g.max_clusters =
        cfg->max_clusters ? cfg->max_clusters : CKV_MAX(1024, (g.n_blocks + g.n_spill_slots) / 2);
    g.max_clusters = CKV_MIN(g.max_clusters, (uint64_t)CKV_SHM_MAX_BLOCKS);

    if ((rc = open_segment(s, &g, err, errlen)) != 0)
        goto fail;
    if ((rc = kvs_index_init(&s->ix, &s->shm)) != 0) {
        open_fail(err, errlen, rc, "index of %llu entries: out of memory",
                  (unsigned long long)g.max_clusters);
        goto fail;
    }
    s->ix_ready = true;
    kvs_index_recover(&s->ix, &s->recovery);
    if (g.n_spill_slots && (rc = open_spill(s, err, errlen)) != 0)
        goto fail;

    struct ckv_shm_header *h = s->shm.hdr;
    if (s->recovered)
        __atomic_add_fetch(&h->epoch, 1, __ATOMIC_RELEASE);
    h->store_pid = (uint32_t)getpid();
    s->epoch = ckv_shm_epoch(&s->shm);
    if (s->epoch >= (1ull << (64 - ID_EPOCH_SHIFT)) - 1) {
        rc = open_fail(err, errlen, CKV_EFORMAT, "segment %s: epoch %llu exhausted; --cleanup",
                       cfg->segment_name, (unsigned long long)s->epoch);
        goto fail;
    }
    /* With a spill file, reservations leave some of it free so that a full store can still
     * restore: a fetch evicts into that headroom to make room for what it reads back. */
    uint64_t headroom = 0;
    if (s->have_spill)
        headroom =
            CKV_MIN((uint64_t)s->ix.n_blocks / 4,
                    CKV_MAX(64u, 2u * (uint64_t)cfg->max_cluster_tokens / CKV_SHM_BLOCK_TOKENS));
    headroom = CKV_MIN(headroom, (uint64_t)s->ix.n_slots / 2);
    s->capacity_blocks = (uint64_t)s->ix.n_blocks + s->ix.n_slots - headroom;
    s->high_blocks = (uint64_t)(cfg->high_watermark * (double)s->ix.n_blocks);
    s->low_blocks = (uint64_t)(cfg->low_watermark * (double)s->ix.n_blocks);
    if (cfg->mlock) {
        if (mlock(s->shm.base, s->shm.bytes) == 0)
            s->mlocked = true;
        else
            LOG_WARN("mlock of the %llu-byte segment failed (%s): it is not pinned in RAM and "
                     "may be swapped; run as root or raise the memlock limit (ulimit -l)",
                     (unsigned long long)s->shm.bytes, strerror(errno));
    }
    if (s->recovered)
        LOG_INFO("segment %s recovered, epoch %llu: %u resident and %u spilled clusters kept, "
                 "%u uncommitted reservations dropped, %u damaged entries freed",
                 cfg->segment_name, (unsigned long long)s->epoch, s->recovery.resident,
                 s->recovery.spilled, s->recovery.reservations_dropped, s->recovery.damaged);
    else
        LOG_INFO("segment %s created: %llu bytes, %u blocks of %u bytes (head_dim %u, %s), %u "
                 "index entries, %u spill slots",
                 cfg->segment_name, (unsigned long long)s->shm.bytes, s->ix.n_blocks,
                 s->ix.block_bytes, h->head_dim, ckv_shm_dtype_name(h->dtype), s->ix.n_entries,
                 s->ix.n_slots);
    if (s->have_spill)
        LOG_INFO("spill file %s: %u slots, %s I/O, queue depth %d", cfg->spill_file, s->ix.n_slots,
                 s->sp.direct ? "O_DIRECT" : "buffered", cfg->io_depth);
    *out = s;
    return 0;

fail:
    kvs_store_destroy(&s, s->created); /* a segment made just now holds nothing */
    return rc;
}

static void grants_free_all(struct kvs_grants *l)
{
    struct kvs_grant *h = l->head;
    while (h) {
        struct kvs_grant *nx = h->next;
        free(h->entries);
        free(h);
        h = nx;
    }
    memset(l, 0, sizeof(*l));
}

void kvs_store_destroy(kvs_store_t **sp, bool remove_segment)
{
    kvs_store_t *s = *sp;
    if (!s)
        return;
    *sp = NULL;
    struct kvs_wait *w = s->wait_head;
    while (w) {
        struct kvs_wait *nx = w->next;
        wait_free(w);
        w = nx;
    }
    grants_free_all(&s->leases);
    grants_free_all(&s->reservations);
    if (s->have_spill)
        kvs_spill_close(&s->sp);
    if (s->ix_ready)
        kvs_index_free(&s->ix);
    if (s->shm.base) {
        if (remove_segment) {
            ckv_shm_unlink(s->cfg.segment_name);
            LOG_INFO("segment %s removed", s->cfg.segment_name);
        }
        ckv_shm_close(&s->shm);
    }
    free(s->s_ntok);
    free(s->s_nblk);
    free(s->s_idx);
    free(s->s_off);
    free(s->s_keys);
    free(s);
}

int kvs_store_cleanup(const struct kvs_config *cfg, char *msg, size_t msglen)
{
    const char *name = cfg->segment_name;
    if (ckv_shm_name_check(name)) {
        snprintf(msg, msglen, "bad segment name '%s'", name);
        return -EINVAL;
    }
    int fd = shm_open(name, O_RDWR, 0);
    if (fd >= 0) {
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            close(fd);
            snprintf(msg, msglen, "segment %s is in use by a running ckv-kvstore: stop it first",
                     name);
            return -EBUSY;
        }
        int rc = ckv_shm_unlink(name);
        close(fd);
        if (rc) {
            snprintf(msg, msglen, "removing segment %s: %s", name, strerror(-rc));
            return rc;
        }
    } else if (errno != ENOENT) {
        int rc = -errno;
        snprintf(msg, msglen, "segment %s: %s", name, strerror(errno));
        return rc;
    }
    bool had_segment = fd >= 0;
    bool had_spill = cfg->spill_file[0] && unlink(cfg->spill_file) == 0;
    snprintf(msg, msglen, "segment %s %s; spill file %s %s", name,
             had_segment ? "removed" : "did not exist",
             cfg->spill_file[0] ? cfg->spill_file : "(none)", had_spill ? "removed" : "not there");
    return 0;
}
