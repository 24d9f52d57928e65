/*
 * The key of a cluster in the KV store: (seq_uid, layer, kv_head, cluster_id). Shared by the
 * store and its client library.
 */
#ifndef KVS_KEY_H
#define KVS_KEY_H

#include <stdint.h>

struct kvs_key {
    uint64_t seq_uid; /* unique across workers */
    uint32_t layer;
    uint32_t kv_head;
    uint32_t cluster_id;
};

static inline int kvs_key_cmp(const struct kvs_key *a, const struct kvs_key *b)
{
    if (a->seq_uid != b->seq_uid)
        return a->seq_uid < b->seq_uid ? -1 : 1;
    if (a->layer != b->layer)
        return a->layer < b->layer ? -1 : 1;
    if (a->kv_head != b->kv_head)
        return a->kv_head < b->kv_head ? -1 : 1;
    if (a->cluster_id != b->cluster_id)
        return a->cluster_id < b->cluster_id ? -1 : 1;
    return 0;
}

/* A 64-bit mix of the key (splitmix64's finaliser over the packed fields). */
static inline uint64_t kvs_key_hash(const struct kvs_key *k)
{
    uint64_t h = k->seq_uid * 0x9e3779b97f4a7c15ull;
    h ^= (((uint64_t)k->layer << 32) | k->kv_head) * 0xc2b2ae3d27d4eb4full;
    h ^= (uint64_t)k->cluster_id * 0x165667b19e3779f9ull;
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h;
}

#endif
