/*
 * The store's index: segment entries plus process-private hash, lists and free lists (see
 * kvs_index.h for the life of an entry and the crash-safety rule).
 */
#include "kvs_index.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_log.h"

/* ---- id stacks ---- */

static int ids_init(struct kvs_ids *s, uint32_t cap)
{
    s->n = 0;
    s->cap = cap;
    s->ids = cap ? malloc((size_t)cap * sizeof(uint32_t)) : NULL;
    return cap && !s->ids ? -ENOMEM : 0;
}

static void ids_push(struct kvs_ids *s, uint32_t id)
{
    ASSERT(s->n < s->cap);
    s->ids[s->n++] = id;
}

static uint32_t ids_pop(struct kvs_ids *s)
{
    ASSERT(s->n > 0);
    return s->ids[--s->n];
}

/* ---- chains ---- */

/* Pops n ids from free and links them through next[]; returns the head. */
static uint32_t chain_alloc(struct kvs_ids *free_ids, uint32_t *next, uint32_t n)
{
    ASSERT(n >= 1 && free_ids->n >= n);
    uint32_t head = ids_pop(free_ids), cur = head;
    for (uint32_t i = 1; i < n; i++) {
        uint32_t id = ids_pop(free_ids);
        next[cur] = id;
        cur = id;
    }
    next[cur] = CKV_SHM_NONE;
    return head;
}

static void chain_free(struct kvs_ids *free_ids, const uint32_t *next, uint32_t head, uint32_t n)
{
    uint32_t cur = head;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t nx = next[cur];
        ids_push(free_ids, cur);
        cur = nx;
    }
}

static uint32_t entry_blocks(const struct kvs_index *ix, uint32_t e)
{
    return ix->ent[e].n_blocks;
}

static struct kvs_key entry_key(const struct ckv_shm_entry *en)
{
    struct kvs_key k = {.seq_uid = en->seq_uid,
                        .layer = en->layer,
                        .kv_head = en->kv_head,
                        .cluster_id = en->cluster_id};
    return k;
}

/* ---- hash ---- */

static uint32_t bucket_of(const struct kvs_index *ix, const struct kvs_key *k)
{
    return (uint32_t)kvs_key_hash(k) & ix->hash_mask;
}

uint32_t kvs_index_find(const struct kvs_index *ix, const struct kvs_key *k)
{
    for (uint32_t e = ix->hash[bucket_of(ix, k)]; e != KVS_NONE; e = ix->rt[e].hash_next) {
        const struct ckv_shm_entry *en = &ix->ent[e];
        if (en->seq_uid == k->seq_uid && en->layer == k->layer && en->kv_head == k->kv_head &&
            en->cluster_id == k->cluster_id)
            return e;
    }
    return KVS_NONE;
}

static void hash_insert(struct kvs_index *ix, uint32_t e)
{
    struct kvs_key k = entry_key(&ix->ent[e]);
    uint32_t b = bucket_of(ix, &k);
    ix->rt[e].hash_next = ix->hash[b];
    ix->hash[b] = e;
}

static void hash_remove(struct kvs_index *ix, uint32_t e)
{
    struct kvs_key k = entry_key(&ix->ent[e]);
    uint32_t *link = &ix->hash[bucket_of(ix, &k)];
    while (*link != e) {
        ASSERT(*link != KVS_NONE);
        link = &ix->rt[*link].hash_next;
    }
    *link = ix->rt[e].hash_next;
    ix->rt[e].hash_next = KVS_NONE;
}

/* ---- sequences ---- */

static uint32_t seq_bucket(const struct kvs_index *ix, uint64_t seq_uid)
{
    uint64_t h = seq_uid * 0x9e3779b97f4a7c15ull;
    return (uint32_t)(h >> 32) & ix->seq_mask;
}

static struct kvs_seq *seq_find(const struct kvs_index *ix, uint64_t seq_uid)
{
    for (struct kvs_seq *q = ix->seq_hash[seq_bucket(ix, seq_uid)]; q; q = q->next)
        if (q->seq_uid == seq_uid)
            return q;
    return NULL;
}

uint32_t kvs_index_seq_head(const struct kvs_index *ix, uint64_t seq_uid)
{
    struct kvs_seq *q = seq_find(ix, seq_uid);
    return q ? q->head : KVS_NONE;
}

static void seq_insert(struct kvs_index *ix, uint32_t e)
{
    uint64_t uid = ix->ent[e].seq_uid;
    struct kvs_seq *q = seq_find(ix, uid);
    if (!q) {
        q = calloc(1, sizeof(*q));
        ASSERT(q); /* a few bytes per sequence; out of memory here is not survivable */
        q->seq_uid = uid;
        q->head = KVS_NONE;
        uint32_t b = seq_bucket(ix, uid);
        q->next = ix->seq_hash[b];
        ix->seq_hash[b] = q;
        ix->n_seqs++;
    }
    struct kvs_rt *r = &ix->rt[e];
    r->seq = q;
    r->seq_prev = KVS_NONE;
    r->seq_next = q->head;
    if (q->head != KVS_NONE)
        ix->rt[q->head].seq_prev = e;
    q->head = e;
    q->n++;
}

static void seq_remove(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    struct kvs_seq *q = r->seq;
    ASSERT(q && q->n > 0);
    if (r->seq_prev != KVS_NONE)
        ix->rt[r->seq_prev].seq_next = r->seq_next;
    else
        q->head = r->seq_next;
    if (r->seq_next != KVS_NONE)
        ix->rt[r->seq_next].seq_prev = r->seq_prev;
    r->seq = NULL;
    r->seq_prev = r->seq_next = KVS_NONE;
    if (--q->n == 0) {
        struct kvs_seq **link = &ix->seq_hash[seq_bucket(ix, q->seq_uid)];
        while (*link != q)
            link = &(*link)->next;
        *link = q->next;
        free(q);
        ix->n_seqs--;
    }
}

/* ---- LRU ---- */

static void lru_add(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    ASSERT(!r->in_lru);
    r->lru_next = KVS_NONE;
    r->lru_prev = ix->lru_tail;
    if (ix->lru_tail != KVS_NONE)
        ix->rt[ix->lru_tail].lru_next = e;
    else
        ix->lru_head = e;
    ix->lru_tail = e;
    r->in_lru = 1;
    if (r->pins == 0)
        ix->evictable_blocks += entry_blocks(ix, e);
}

static void lru_remove(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    ASSERT(r->in_lru);
    if (r->lru_prev != KVS_NONE)
        ix->rt[r->lru_prev].lru_next = r->lru_next;
    else
        ix->lru_head = r->lru_next;
    if (r->lru_next != KVS_NONE)
        ix->rt[r->lru_next].lru_prev = r->lru_prev;
    else
        ix->lru_tail = r->lru_prev;
    r->lru_prev = r->lru_next = KVS_NONE;
    r->in_lru = 0;
    if (r->pins == 0)
        ix->evictable_blocks -= entry_blocks(ix, e);
}

void kvs_index_touch(struct kvs_index *ix, uint32_t e)
{
    if (ix->rt[e].in_lru && ix->lru_tail != e) {
        lru_remove(ix, e);
        lru_add(ix, e);
    }
}

uint32_t kvs_index_victim(const struct kvs_index *ix)
{
    for (uint32_t e = ix->lru_head; e != KVS_NONE; e = ix->rt[e].lru_next)
        if (ix->rt[e].pins == 0)
            return e;
    return KVS_NONE;
}

/* ---- set-up and recovery ---- */

static uint32_t pow2_at_least(uint64_t n, uint32_t cap)
{
    uint32_t p = 1;
    while (p < n && p < cap)
        p <<= 1;
    return p;
}

int kvs_index_init(struct kvs_index *ix, struct ckv_shm *shm)
{
    memset(ix, 0, sizeof(*ix));
    const struct ckv_shm_header *h = shm->hdr;
    ix->shm = shm;
    ix->ent = ckv_shm_entries(shm);
    ix->block_next = ckv_shm_block_next(shm);
    ix->slot_next = ckv_shm_slot_next(shm);
    ix->n_entries = (uint32_t)h->max_clusters;
    ix->n_blocks = (uint32_t)h->n_blocks;
    ix->n_slots = (uint32_t)h->n_spill_slots;
    ix->block_bytes = h->block_bytes;
    ix->lru_head = ix->lru_tail = KVS_NONE;
    /* calloc'ed runtime state: untouched pages cost nothing until used */
    ix->rt = calloc(ix->n_entries, sizeof(*ix->rt));
    uint32_t nb = pow2_at_least(ix->n_entries, 1u << 24);
    ix->hash = malloc((size_t)nb * sizeof(uint32_t));
    ix->hash_mask = nb - 1;
    uint32_t ns = pow2_at_least(ix->n_entries, 1u << 16);
    ix->seq_hash = calloc(ns, sizeof(*ix->seq_hash));
    ix->seq_mask = ns - 1;
    if (!ix->rt || !ix->hash || !ix->seq_hash || ids_init(&ix->free_entries, ix->n_entries) ||
        ids_init(&ix->free_blocks, ix->n_blocks) || ids_init(&ix->free_slots, ix->n_slots)) {
        kvs_index_free(ix);
        return -ENOMEM;
    }
    memset(ix->hash, 0xff, (size_t)nb * sizeof(uint32_t)); /* KVS_NONE everywhere */
    return 0;
}

void kvs_index_free(struct kvs_index *ix)
{
    if (ix->seq_hash) {
        for (uint32_t b = 0; b <= ix->seq_mask; b++) {
            struct kvs_seq *q = ix->seq_hash[b];
            while (q) {
                struct kvs_seq *nx = q->next;
                free(q);
                q = nx;
            }
        }
    }
    free(ix->seq_hash);
    free(ix->hash);
    free(ix->rt);
    free(ix->free_entries.ids);
    free(ix->free_blocks.ids);
    free(ix->free_slots.ids);
    memset(ix, 0, sizeof(*ix));
}

static void rt_reset(struct kvs_rt *r)
{
    memset(r, 0, sizeof(*r));
    r->hash_next = r->seq_prev = r->seq_next = r->lru_prev = r->lru_next = KVS_NONE;
    r->io_first = r->io_src = r->io_dst = r->ioq_next = KVS_NONE;
}

/* Marks the n ids of the chain from head in used[]; on any id out of range, already used, or
 * a chain not ending after n ids, unmarks what it marked and returns false. */
static bool chain_claim(uint8_t *used, const uint32_t *next, uint32_t limit, uint32_t head,
                        uint32_t n)
{
    uint32_t cur = head, i = 0;
    bool ok = true;
    for (; i < n; i++) {
        if (cur >= limit || used[cur]) {
            ok = false;
            break;
        }
        used[cur] = 1;
        uint32_t nx = next[cur];
        if (i + 1 == n && nx != CKV_SHM_NONE)
            ok = false;
        cur = nx;
    }
    if (ok)
        return true;
    cur = head;
    for (uint32_t j = 0; j < i; j++) { /* the first i ids were marked by this chain */
        used[cur] = 0;
        cur = next[cur];
    }
    return false;
}

void kvs_index_recover(struct kvs_index *ix, struct kvs_recovery *rep)
{
    memset(rep, 0, sizeof(*rep));
    uint8_t *bused = calloc(ix->n_blocks, 1);
    uint8_t *sused = calloc(ix->n_slots ? ix->n_slots : 1, 1);
    ASSERT(bused && sused); /* start-up: a few bytes per block */
    for (uint32_t e = 0; e < ix->n_entries; e++) {
        struct ckv_shm_entry *en = &ix->ent[e];
        struct kvs_rt *r = &ix->rt[e];
        rt_reset(r);
        uint32_t st = ckv_shm_entry_state(en);
        if (st == CKV_SHM_FREE)
            continue;
        if (st == CKV_SHM_RESERVED) {
            ckv_shm_entry_publish(en, CKV_SHM_FREE);
            rep->reservations_dropped++;
            continue;
        }
        struct kvs_key k = entry_key(en);
        bool ok = (st == CKV_SHM_RESIDENT || st == CKV_SHM_SPILLED) && en->n_tokens >= 1 &&
                  en->n_blocks == kvs_index_blocks_for(en->n_tokens) &&
                  kvs_index_find(ix, &k) == KVS_NONE;
        if (ok && st == CKV_SHM_RESIDENT)
            ok = chain_claim(bused, ix->block_next, ix->n_blocks, en->first_block, en->n_blocks);
        else if (ok)
            ok = chain_claim(sused, ix->slot_next, ix->n_slots, en->first_slot, en->n_blocks);
        if (!ok) {
            LOG_ERROR("recovery: entry %u (seq %llu layer %u head %u cluster %u, state %u) is "
                      "damaged: freed",
                      e, (unsigned long long)en->seq_uid, en->layer, en->kv_head, en->cluster_id,
                      st);
            ckv_shm_entry_publish(en, CKV_SHM_FREE);
            rep->damaged++;
            continue;
        }
        r->live = 1;
        hash_insert(ix, e);
        seq_insert(ix, e);
        ix->data_blocks += en->n_blocks;
        if (st == CKV_SHM_RESIDENT) {
            r->hold = KVS_HOLD_BLOCKS;
            ix->n_resident++;
            rep->resident++;
            lru_add(ix, e);
        } else {
            r->hold = KVS_HOLD_SLOTS;
            ix->n_spilled++;
            rep->spilled++;
        }
    }
    /* Free lists in descending order so that pops hand out ascending ids: sequential slots. */
    for (uint32_t e = ix->n_entries; e-- > 0;)
        if (!ix->rt[e].live)
            ids_push(&ix->free_entries, e);
    for (uint32_t b = ix->n_blocks; b-- > 0;)
        if (!bused[b])
            ids_push(&ix->free_blocks, b);
    for (uint32_t s = ix->n_slots; s-- > 0;)
        if (!sused[s])
            ids_push(&ix->free_slots, s);
    free(bused);
    free(sused);
}

/* ---- transitions ---- */

uint32_t kvs_index_reserve(struct kvs_index *ix, const struct kvs_key *k, uint32_t n_tokens)
{
    ASSERT(kvs_index_find(ix, k) == KVS_NONE);
    uint32_t nb = kvs_index_blocks_for(n_tokens);
    uint32_t e = ids_pop(&ix->free_entries);
    struct ckv_shm_entry *en = &ix->ent[e];
    ASSERT(ckv_shm_entry_state(en) == CKV_SHM_FREE);
    en->n_tokens = n_tokens;
    en->seq_uid = k->seq_uid;
    en->layer = k->layer;
    en->kv_head = k->kv_head;
    en->cluster_id = k->cluster_id;
    en->n_blocks = nb;
    en->first_block = chain_alloc(&ix->free_blocks, ix->block_next, nb);
    en->first_slot = CKV_SHM_NONE;
    ckv_shm_entry_publish(en, CKV_SHM_RESERVED);
    struct kvs_rt *r = &ix->rt[e];
    rt_reset(r);
    r->live = 1;
    r->hold = KVS_HOLD_BLOCKS;
    r->pins = 1; /* the reservation's */
    ix->data_blocks += nb;
    hash_insert(ix, e);
    seq_insert(ix, e);
    ix->n_reserved++;
    return e;
}

void kvs_index_commit(struct kvs_index *ix, uint32_t e)
{
    struct ckv_shm_entry *en = &ix->ent[e];
    ASSERT(ix->rt[e].live && ckv_shm_entry_state(en) == CKV_SHM_RESERVED);
    ckv_shm_entry_publish(en, CKV_SHM_RESIDENT);
    ix->n_reserved--;
    ix->n_resident++;
    lru_add(ix, e);
}

void kvs_index_unlink(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    struct ckv_shm_entry *en = &ix->ent[e];
    ASSERT(r->live);
    switch (ckv_shm_entry_state(en)) {
    case CKV_SHM_RESERVED: ix->n_reserved--; break;
    case CKV_SHM_RESIDENT: ix->n_resident--; break;
    case CKV_SHM_SPILLED: ix->n_spilled--; break;
    default: ASSERT(!"live entry in state FREE");
    }
    ckv_shm_entry_publish(en, CKV_SHM_FREE); /* gone for a restarted store from here on */
    hash_remove(ix, e);
    seq_remove(ix, e);
    if (r->in_lru)
        lru_remove(ix, e);
    r->live = 0;
    ix->n_unlinked++;
    kvs_index_maybe_free(ix, e);
}

bool kvs_index_maybe_free(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    if (r->live || r->pins || r->io != KVS_RT_IO_NONE || r->hold == KVS_HOLD_NONE)
        return false;
    const struct ckv_shm_entry *en = &ix->ent[e];
    if (r->hold == KVS_HOLD_BLOCKS)
        chain_free(&ix->free_blocks, ix->block_next, en->first_block, en->n_blocks);
    else
        chain_free(&ix->free_slots, ix->slot_next, en->first_slot, en->n_blocks);
    ix->data_blocks -= en->n_blocks;
    rt_reset(r);
    ids_push(&ix->free_entries, e);
    ix->n_unlinked--;
    return true;
}

void kvs_index_pin(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    if (r->pins++ == 0 && r->in_lru)
        ix->evictable_blocks -= entry_blocks(ix, e);
}

void kvs_index_unpin(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    ASSERT(r->pins > 0);
    if (--r->pins == 0) {
        if (r->in_lru)
            ix->evictable_blocks += entry_blocks(ix, e);
        kvs_index_maybe_free(ix, e);
    }
}

void kvs_index_spill_begin(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    const struct ckv_shm_entry *en = &ix->ent[e];
    ASSERT(r->in_lru && r->pins == 0 && r->io == KVS_RT_IO_NONE && r->hold == KVS_HOLD_BLOCKS);
    lru_remove(ix, e);
    r->io = KVS_RT_IO_SPILL;
    r->io_first = chain_alloc(&ix->free_slots, ix->slot_next, en->n_blocks);
    r->io_left = r->io_unissued = en->n_blocks;
    r->io_src = en->first_block;
    r->io_dst = r->io_first;
    r->io_err = 0;
    ix->spilling_blocks += en->n_blocks;
}

bool kvs_index_spill_end(struct kvs_index *ix, uint32_t e, int err)
{
    struct kvs_rt *r = &ix->rt[e];
    struct ckv_shm_entry *en = &ix->ent[e];
    ASSERT(r->io == KVS_RT_IO_SPILL && r->io_left == 0);
    ix->spilling_blocks -= en->n_blocks;
    r->io = KVS_RT_IO_NONE;
    if (err || !r->live || r->pins) {
        /* failed, dropped, or fetched meanwhile: the copy in the file is not needed */
        chain_free(&ix->free_slots, ix->slot_next, r->io_first, en->n_blocks);
        r->io_first = KVS_NONE;
        if (r->live)
            lru_add(ix, e);
        else
            kvs_index_maybe_free(ix, e);
        return false;
    }
    en->first_slot = r->io_first;
    ckv_shm_entry_publish(en, CKV_SHM_SPILLED);
    chain_free(&ix->free_blocks, ix->block_next, en->first_block, en->n_blocks);
    r->io_first = KVS_NONE;
    r->hold = KVS_HOLD_SLOTS;
    ix->n_resident--;
    ix->n_spilled++;
    return true;
}

void kvs_index_restore_begin(struct kvs_index *ix, uint32_t e)
{
    struct kvs_rt *r = &ix->rt[e];
    const struct ckv_shm_entry *en = &ix->ent[e];
    ASSERT(r->live && r->io == KVS_RT_IO_NONE && r->hold == KVS_HOLD_SLOTS);
    r->io = KVS_RT_IO_RESTORE;
    r->io_first = chain_alloc(&ix->free_blocks, ix->block_next, en->n_blocks);
    r->io_left = r->io_unissued = en->n_blocks;
    r->io_src = en->first_slot;
    r->io_dst = r->io_first;
    r->io_err = 0;
    ix->restoring_blocks += en->n_blocks;
}

bool kvs_index_restore_end(struct kvs_index *ix, uint32_t e, int err)
{
    struct kvs_rt *r = &ix->rt[e];
    struct ckv_shm_entry *en = &ix->ent[e];
    ASSERT(r->io == KVS_RT_IO_RESTORE && r->io_left == 0);
    ix->restoring_blocks -= en->n_blocks;
    r->io = KVS_RT_IO_NONE;
    if (err || !r->live) {
        chain_free(&ix->free_blocks, ix->block_next, r->io_first, en->n_blocks);
        r->io_first = KVS_NONE;
        r->io_err = err;
        if (!r->live)
            kvs_index_maybe_free(ix, e);
        return false;
    }
    en->first_block = r->io_first;
    ckv_shm_entry_publish(en, CKV_SHM_RESIDENT);
    chain_free(&ix->free_slots, ix->slot_next, en->first_slot, en->n_blocks);
    r->io_first = KVS_NONE;
    r->hold = KVS_HOLD_BLOCKS;
    ix->n_spilled--;
    ix->n_resident++;
    lru_add(ix, e);
    return true;
}

void kvs_index_block_offsets(const struct kvs_index *ix, uint32_t e, uint64_t *out)
{
    const struct ckv_shm_entry *en = &ix->ent[e];
    const struct ckv_shm_header *h = ix->shm->hdr;
    uint32_t b = en->first_block;
    for (uint32_t i = 0; i < en->n_blocks; i++) {
        out[i] = ckv_shm_block_offset(h, b);
        b = ix->block_next[b];
    }
}

/* ---- consistency check ---- */

/* Marks a chain; returns false on an id out of range or marked twice. */
static bool check_chain(uint8_t *used, const uint32_t *next, uint32_t limit, uint32_t head,
                        uint32_t n)
{
    uint32_t cur = head;
    for (uint32_t i = 0; i < n; i++) {
        if (cur >= limit || used[cur])
            return false;
        used[cur] = 1;
        cur = next[cur];
    }
    return true;
}

int kvs_index_check(const struct kvs_index *ix, char *err, size_t errlen)
{
    int rc = 0;
    uint8_t *bused = calloc(ix->n_blocks, 1);
    uint8_t *sused = calloc(ix->n_slots ? ix->n_slots : 1, 1);
    uint8_t *efree = calloc(ix->n_entries, 1);
    if (!bused || !sused || !efree) {
        rc = -ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < ix->free_entries.n; i++) {
        uint32_t e = ix->free_entries.ids[i];
        if (e >= ix->n_entries || efree[e]) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "free entry %u twice or out of range", e);
            goto out;
        }
        efree[e] = 1;
    }
    for (uint32_t i = 0; i < ix->free_blocks.n; i++) {
        uint32_t b = ix->free_blocks.ids[i];
        if (b >= ix->n_blocks || bused[b]) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "free block %u twice or out of range", b);
            goto out;
        }
        bused[b] = 1;
    }
    for (uint32_t i = 0; i < ix->free_slots.n; i++) {
        uint32_t sl = ix->free_slots.ids[i];
        if (sl >= ix->n_slots || sused[sl]) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "free slot %u twice or out of range", sl);
            goto out;
        }
        sused[sl] = 1;
    }
    uint32_t n_res = 0, n_rsv = 0, n_spl = 0, n_unl = 0, n_live = 0;
    uint64_t spilling = 0, restoring = 0, data = 0;
    for (uint32_t e = 0; e < ix->n_entries; e++) {
        const struct kvs_rt *r = &ix->rt[e];
        const struct ckv_shm_entry *en = &ix->ent[e];
        uint32_t st = ckv_shm_entry_state(en);
        if (efree[e]) {
            if (st != CKV_SHM_FREE || r->live || r->hold || r->pins || r->io) {
                rc = ckv_errorf(-EUCLEAN, err, errlen, "free entry %u is in use (state %u)", e, st);
                goto out;
            }
            continue;
        }
        if (r->hold == KVS_HOLD_NONE) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "entry %u is neither free nor holding anything",
                            e);
            goto out;
        }
        if (en->n_blocks != kvs_index_blocks_for(en->n_tokens) || en->n_tokens == 0) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "entry %u: %u tokens in %u blocks", e,
                            en->n_tokens, en->n_blocks);
            goto out;
        }
        data += en->n_blocks;
        bool ok =
            r->hold == KVS_HOLD_BLOCKS
                ? check_chain(bused, ix->block_next, ix->n_blocks, en->first_block, en->n_blocks)
                : check_chain(sused, ix->slot_next, ix->n_slots, en->first_slot, en->n_blocks);
        if (ok && r->io == KVS_RT_IO_SPILL) {
            ok = check_chain(sused, ix->slot_next, ix->n_slots, r->io_first, en->n_blocks);
            spilling += en->n_blocks;
        } else if (ok && r->io == KVS_RT_IO_RESTORE) {
            ok = check_chain(bused, ix->block_next, ix->n_blocks, r->io_first, en->n_blocks);
            restoring += en->n_blocks;
        }
        if (!ok) {
            rc = ckv_errorf(-EUCLEAN, err, errlen,
                            "entry %u: a chain shares a block or slot or leaves the pool", e);
            goto out;
        }
        if (!r->live) {
            if (st != CKV_SHM_FREE || (!r->pins && r->io == KVS_RT_IO_NONE)) {
                rc =
                    ckv_errorf(-EUCLEAN, err, errlen, "unlinked entry %u: state %u, %u pins, io %u",
                               e, st, r->pins, r->io);
                goto out;
            }
            n_unl++;
            continue;
        }
        n_live++;
        struct kvs_key k = entry_key(en);
        if (kvs_index_find(ix, &k) != e) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "live entry %u is not found by its key", e);
            goto out;
        }
        bool want_lru = st == CKV_SHM_RESIDENT && r->io == KVS_RT_IO_NONE;
        if ((st == CKV_SHM_RESERVED && (r->hold != KVS_HOLD_BLOCKS || r->io || !r->pins)) ||
            (st == CKV_SHM_RESIDENT && r->hold != KVS_HOLD_BLOCKS) ||
            (st == CKV_SHM_SPILLED && r->hold != KVS_HOLD_SLOTS) || st == CKV_SHM_FREE ||
            (bool)r->in_lru != want_lru) {
            rc = ckv_errorf(-EUCLEAN, err, errlen,
                            "entry %u: state %u, hold %u, io %u, pins %u, in_lru %u", e, st,
                            r->hold, r->io, r->pins, r->in_lru);
            goto out;
        }
        n_rsv += st == CKV_SHM_RESERVED;
        n_res += st == CKV_SHM_RESIDENT;
        n_spl += st == CKV_SHM_SPILLED;
    }
    for (uint32_t b = 0; b < ix->n_blocks; b++)
        if (!bused[b]) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "block %u is lost: neither free nor in a chain",
                            b);
            goto out;
        }
    for (uint32_t s = 0; s < ix->n_slots; s++)
        if (!sused[s]) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "slot %u is lost: neither free nor in a chain",
                            s);
            goto out;
        }
    if (n_rsv != ix->n_reserved || n_res != ix->n_resident || n_spl != ix->n_spilled ||
        n_unl != ix->n_unlinked || spilling != ix->spilling_blocks || data != ix->data_blocks ||
        restoring != ix->restoring_blocks) {
        rc = ckv_errorf(-EUCLEAN, err, errlen,
                        "counters: reserved %u/%u resident %u/%u spilled %u/%u unlinked %u/%u "
                        "spilling %llu/%llu restoring %llu/%llu",
                        n_rsv, ix->n_reserved, n_res, ix->n_resident, n_spl, ix->n_spilled, n_unl,
                        ix->n_unlinked, (unsigned long long)spilling,
                        (unsigned long long)ix->spilling_blocks, (unsigned long long)restoring,
                        (unsigned long long)ix->restoring_blocks);
        goto out;
    }
    uint64_t evictable = 0;
    uint32_t lru_n = 0, prev = KVS_NONE;
    for (uint32_t e = ix->lru_head; e != KVS_NONE; e = ix->rt[e].lru_next) {
        if (!ix->rt[e].in_lru || ix->rt[e].lru_prev != prev || ++lru_n > ix->n_entries) {
            rc = ckv_errorf(-EUCLEAN, err, errlen, "LRU list broken at entry %u", e);
            goto out;
        }
        if (!ix->rt[e].pins)
            evictable += ix->ent[e].n_blocks;
        prev = e;
    }
    if (prev != ix->lru_tail || evictable != ix->evictable_blocks) {
        rc = ckv_errorf(-EUCLEAN, err, errlen,
                        "LRU tail or evictable blocks (%llu, counted %llu) wrong",
                        (unsigned long long)ix->evictable_blocks, (unsigned long long)evictable);
        goto out;
    }
    uint32_t seq_total = 0;
    for (uint32_t b = 0; b <= ix->seq_mask; b++)
        for (const struct kvs_seq *q = ix->seq_hash[b]; q; q = q->next) {
            uint32_t n = 0;
            for (uint32_t e = q->head; e != KVS_NONE; e = ix->rt[e].seq_next) {
                if (ix->ent[e].seq_uid != q->seq_uid || ix->rt[e].seq != q || ++n > q->n) {
                    rc = ckv_errorf(-EUCLEAN, err, errlen, "sequence %llu: list broken at entry %u",
                                    (unsigned long long)q->seq_uid, e);
                    goto out;
                }
            }
            if (n != q->n || n == 0) {
                rc = ckv_errorf(-EUCLEAN, err, errlen,
                                "sequence %llu: %u entries listed, %u counted",
                                (unsigned long long)q->seq_uid, n, q->n);
                goto out;
            }
            seq_total += n;
        }
    if (seq_total != n_live) {
        rc = ckv_errorf(-EUCLEAN, err, errlen, "sequences list %u entries, %u are live", seq_total,
                        n_live);
        goto out;
    }
out:
    free(bused);
    free(sused);
    free(efree);
    return rc;
}
