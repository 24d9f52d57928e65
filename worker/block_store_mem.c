/*
 * The in-process block store (block_store.h): every cluster is one heap copy of its blocks in
 * a chained hash map keyed by (seq_uid, layer, kv_head, cluster_id). Used by `ckv run`, the
 * evaluation, the benchmarks and the tests; ckv-kvstore is the shared-memory counterpart.
 *
 * Every call validates all of its clusters before changing anything, so a failed call (a
 * duplicate key, an unknown key, no room under max_bytes) leaves the store as it was.
 * Not thread-safe: one sequence's KV manager (one thread) uses it at a time, or the caller
 * locks.
 */
#include "block_store.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct mem_entry {
    struct ckv_cluster_key key;
    int32_t n_blocks;
    struct mem_entry *next; /* hash chain */
    unsigned char data[];   /* n_blocks * block_bytes */
};

struct mem_store {
    struct ckv_block_store pub;
    size_t max_bytes, used_bytes; /* bytes of block data */
    struct mem_entry **buckets;   /* (n_buckets), a power of two */
    size_t n_buckets, n_entries;
    struct ckv_block_store_mem_stats st;
};

static uint64_t key_hash(const struct ckv_cluster_key *k)
{
    /* splitmix64 over the fields: keys of one sequence differ in the low bits only */
    uint64_t x = k->seq_uid * 0x9e3779b97f4a7c15ull;
    x ^= (uint64_t)(uint32_t)k->layer << 40 ^ (uint64_t)(uint32_t)k->kv_head << 20 ^
         (uint64_t)(uint32_t)k->cluster_id;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static int key_eq(const struct ckv_cluster_key *a, const struct ckv_cluster_key *b)
{
    return a->seq_uid == b->seq_uid && a->layer == b->layer && a->kv_head == b->kv_head &&
           a->cluster_id == b->cluster_id;
}

static struct mem_entry *find(struct mem_store *s, const struct ckv_cluster_key *k)
{
    struct mem_entry *e = s->buckets[key_hash(k) & (s->n_buckets - 1)];
    while (e && !key_eq(&e->key, k))
        e = e->next;
    return e;
}

/* Doubles the bucket array; on -ENOMEM the old one stays (chains just get longer). */
static void grow_buckets(struct mem_store *s)
{
    size_t nb = s->n_buckets * 2;
    struct mem_entry **b = calloc(nb, sizeof(*b));
    if (!b)
        return;
    for (size_t i = 0; i < s->n_buckets; i++) {
        struct mem_entry *e = s->buckets[i];
        while (e) {
            struct mem_entry *next = e->next;
            size_t j = key_hash(&e->key) & (nb - 1);
            e->next = b[j];
            b[j] = e;
            e = next;
        }
    }
    free(s->buckets);
    s->buckets = b;
    s->n_buckets = nb;
}

static int mem_put(void *self, const struct ckv_cluster_key *keys, const int32_t *n_blocks,
                   const void *const *blocks, int n)
{
    struct mem_store *s = self;
    if (n < 0 || (n > 0 && (!keys || !n_blocks || !blocks)))
        return -EINVAL;
    size_t bytes = 0;
    for (int i = 0; i < n; i++) {
        if (n_blocks[i] < 1 || !blocks[i])
            return -EINVAL;
        if (find(s, &keys[i]))
            return -EEXIST;
        /* a key twice in one call is a duplicate too (quadratic, but n is one layer's) */
        for (int j = 0; j < i; j++)
            if (key_eq(&keys[i], &keys[j]))
                return -EEXIST;
        bytes += (size_t)n_blocks[i] * s->pub.block_bytes;
    }
    if (s->max_bytes && bytes > s->max_bytes - s->used_bytes)
        return -ENOSPC;
    struct mem_entry **made = calloc((size_t)(n > 0 ? n : 1), sizeof(*made));
    if (!made)
        return -ENOMEM;
    for (int i = 0; i < n; i++) {
        size_t sz = (size_t)n_blocks[i] * s->pub.block_bytes;
        made[i] = malloc(sizeof(struct mem_entry) + sz);
        if (!made[i]) {
            for (int j = 0; j < i; j++)
                free(made[j]);
            free(made);
            return -ENOMEM;
        }
        made[i]->key = keys[i];
        made[i]->n_blocks = n_blocks[i];
        memcpy(made[i]->data, blocks[i], sz);
    }
    for (int i = 0; i < n; i++) {
        size_t j = key_hash(&keys[i]) & (s->n_buckets - 1);
        made[i]->next = s->buckets[j];
        s->buckets[j] = made[i];
        s->n_entries++;
        s->st.blocks += (uint64_t)n_blocks[i];
    }
    free(made);
    s->used_bytes += bytes;
    s->st.clusters += (uint64_t)n;
    s->st.puts++;
    if (s->n_entries > s->n_buckets)
        grow_buckets(s);
    return 0;
}

static int mem_get(void *self, const struct ckv_cluster_key *keys, void *const *dst,
                   int32_t *n_blocks, int n)
{
    struct mem_store *s = self;
    if (n < 0 || (n > 0 && (!keys || !dst || !n_blocks)))
        return -EINVAL;
    for (int i = 0; i < n; i++) {
        if (!dst[i])
            return -EINVAL;
        if (!find(s, &keys[i]))
            return -ENOENT;
    }
    for (int i = 0; i < n; i++) {
        const struct mem_entry *e = find(s, &keys[i]);
        memcpy(dst[i], e->data, (size_t)e->n_blocks * s->pub.block_bytes);
        n_blocks[i] = e->n_blocks;
    }
    s->st.gets++;
    return 0;
}

static int mem_drop(void *self, uint64_t seq_uid)
{
    struct mem_store *s = self;
    for (size_t i = 0; i < s->n_buckets; i++) {
        struct mem_entry **pp = &s->buckets[i];
        while (*pp) {
            struct mem_entry *e = *pp;
            if (e->key.seq_uid == seq_uid) {
                *pp = e->next;
                s->used_bytes -= (size_t)e->n_blocks * s->pub.block_bytes;
                s->st.blocks -= (uint64_t)e->n_blocks;
                s->st.clusters--;
                s->n_entries--;
                free(e);
            } else {
                pp = &e->next;
            }
        }
    }
    s->st.drops++;
    return 0;
}

static void mem_destroy(void *self)
{
    struct mem_store *s = self;
    for (size_t i = 0; i < s->n_buckets; i++) {
        struct mem_entry *e = s->buckets[i];
        while (e) {
            struct mem_entry *next = e->next;
            free(e);
            e = next;
        }
    }
    free(s->buckets);
    free(s);
}

static const struct ckv_block_store_ops mem_ops = {
    .put = mem_put,
    .get = mem_get,
    .drop = mem_drop,
    .destroy = mem_destroy,
};

int ckv_block_store_mem_new(size_t block_bytes, size_t max_bytes, struct ckv_block_store **out)
{
    if (!out || block_bytes == 0)
        return -EINVAL;
    *out = NULL;
    struct mem_store *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->n_buckets = 64;
    s->buckets = calloc(s->n_buckets, sizeof(*s->buckets));
    if (!s->buckets) {
        free(s);
        return -ENOMEM;
    }
    s->max_bytes = max_bytes;
    s->pub.ops = &mem_ops;
    s->pub.self = s;
    s->pub.block_bytes = block_bytes;
    *out = &s->pub;
    return 0;
}

void ckv_block_store_destroy(struct ckv_block_store **s)
{
    if (!s || !*s)
        return;
    (*s)->ops->destroy((*s)->self);
    *s = NULL;
}

int ckv_block_store_mem_stats(const struct ckv_block_store *s,
                              struct ckv_block_store_mem_stats *out)
{
    if (!s || !out || s->ops != &mem_ops)
        return -EINVAL;
    *out = ((const struct mem_store *)s->self)->st;
    return 0;
}
