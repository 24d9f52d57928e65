/*
 * The block store backed by ckv-kvstore (block_store.h, DESIGN.md "The KV store"): what a
 * served worker hands its engine so that clusters live in the host's shared segment instead
 * of this process. One put is reserve + write the blocks into the mapped segment + commit;
 * one get is fetch under a read lease + copy + release. A call larger than the store's
 * per-request limit is split into several requests; every reservation of a put is made before
 * anything is committed, so a put that fails part-way aborts what it reserved and changes
 * nothing (the interface's promise).
 *
 * The client is not thread-safe, and neither is this store: the engine's thread uses it.
 */
#include "block_store.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_log.h"
#include "kvs_client.h"

struct kvs_store {
    struct ckv_block_store pub;
    kvs_client_t *c;
    struct ckv_block_store_kvs_stats st;
    struct kvs_key *keys; /* (cap) scratch for one request's keys */
    uint32_t *ntok;       /* (cap) */
    uint64_t *resv;       /* (cap) reservation ids of one put */
    size_t cap;
};

static int grow(struct kvs_store *s, size_t n)
{
    if (n <= s->cap)
        return 0;
    struct kvs_key *k = realloc(s->keys, n * sizeof(*k));
    if (!k)
        return -ENOMEM;
    s->keys = k;
    uint32_t *t = realloc(s->ntok, n * sizeof(*t));
    if (!t)
        return -ENOMEM;
    s->ntok = t;
    uint64_t *r = realloc(s->resv, n * sizeof(*r));
    if (!r)
        return -ENOMEM;
    s->resv = r;
    s->cap = n;
    return 0;
}

static int to_kvs_key(const struct ckv_cluster_key *k, struct kvs_key *out)
{
    if (k->layer < 0 || k->kv_head < 0 || k->cluster_id < 0)
        return -EINVAL;
    out->seq_uid = k->seq_uid;
    out->layer = (uint32_t)k->layer;
    out->kv_head = (uint32_t)k->kv_head;
    out->cluster_id = (uint32_t)k->cluster_id;
    return 0;
}

/* The store answers a duplicate key with BAD_REQUEST; the interface says -EEXIST. */
static int put_error(struct kvs_store *s, int rc)
{
    if (rc == -EINVAL && strstr(kvs_client_last_error(s->c), "already"))
        return -EEXIST;
    return rc;
}

static int kvs_put(void *self, const struct ckv_cluster_key *keys, const int32_t *n_blocks,
                   const void *const *blocks, int n)
{
    struct kvs_store *s = self;
    const struct kvs_geometry *g = kvs_client_geometry(s->c);
    if (n < 0 || (n > 0 && (!keys || !n_blocks || !blocks)))
        return -EINVAL;
    if (n == 0)
        return 0;
    int rc = grow(s, (size_t)n);
    if (rc)
        return rc;
    for (int i = 0; i < n; i++) {
        if (n_blocks[i] < 1 || !blocks[i] ||
            (uint64_t)n_blocks[i] * g->block_tokens > g->max_cluster_tokens)
            return -EINVAL;
        if ((rc = to_kvs_key(&keys[i], &s->keys[i])) < 0)
            return rc;
        /* the interface counts whole blocks; the store counts tokens (full blocks here) */
        s->ntok[i] = (uint32_t)n_blocks[i] * g->block_tokens;
    }
    size_t per = g->max_request_clusters ? g->max_request_clusters : (size_t)n;
    int n_resv = 0;
    /* phase 1: reserve every chunk and write its blocks; nothing is visible yet */
    for (size_t at = 0; at < (size_t)n; at += per) {
        size_t m = CKV_MIN(per, (size_t)n - at);
        struct kvs_blocks b;
        rc = kvs_client_reserve(s->c, s->keys + at, s->ntok + at, m, &b);
        if (rc < 0) {
            rc = put_error(s, rc);
            LOG_DEBUG("kvstore reserve of %zu clusters: %s (%s)", m, ckv_strerror(rc),
                      kvs_client_last_error(s->c));
            goto err_abort;
        }
        s->resv[n_resv++] = b.id;
        for (size_t i = 0; i < m; i++) {
            const unsigned char *src = blocks[at + i];
            for (uint32_t j = 0; j < b.n_blocks[i]; j++)
                memcpy(b.block[b.first[i] + j], src + (size_t)j * g->block_bytes, g->block_bytes);
        }
    }
    /* phase 2: publish */
    for (int r = 0; r < n_resv; r++) {
        if ((rc = kvs_client_commit(s->c, s->resv[r], NULL)) < 0) {
            /* earlier chunks are visible already: a failure here (the store restarted and
             * forgot the reservation) cannot be rolled back; drop is the caller's cleanup */
            LOG_WARN("kvstore commit: %s (%s)", ckv_strerror(rc), kvs_client_last_error(s->c));
            for (int q = r + 1; q < n_resv; q++)
                kvs_client_abort(s->c, s->resv[q]);
            return rc;
        }
    }
    s->st.puts++;
    s->st.clusters_put += (uint64_t)n;
    for (int i = 0; i < n; i++)
        s->st.blocks_put += (uint64_t)n_blocks[i];
    return 0;

err_abort:
    for (int r = 0; r < n_resv; r++)
        kvs_client_abort(s->c, s->resv[r]);
    s->st.errors++;
    return rc;
}

static int kvs_get(void *self, const struct ckv_cluster_key *keys, void *const *dst,
                   int32_t *n_blocks, int n)
{
    struct kvs_store *s = self;
    const struct kvs_geometry *g = kvs_client_geometry(s->c);
    if (n < 0 || (n > 0 && (!keys || !dst || !n_blocks)))
        return -EINVAL;
    if (n == 0)
        return 0;
    int rc = grow(s, (size_t)n);
    if (rc)
        return rc;
    for (int i = 0; i < n; i++)
        if ((rc = to_kvs_key(&keys[i], &s->keys[i])) < 0 || !dst[i])
            return rc < 0 ? rc : -EINVAL;
    size_t per = g->max_request_clusters ? g->max_request_clusters : (size_t)n;
    uint64_t lease = 0;
    for (size_t at = 0; at < (size_t)n; at += per) {
        size_t m = CKV_MIN(per, (size_t)n - at);
        struct kvs_blocks b;
        /* the previous chunk's lease is released by this fetch: one round trip per chunk */
        rc = kvs_client_fetch_release(s->c, s->keys + at, m, lease, &b);
        if (rc < 0) {
            LOG_DEBUG("kvstore fetch of %zu clusters: %s (%s)", m, ckv_strerror(rc),
                      kvs_client_last_error(s->c));
            if (lease)
                kvs_client_release(s->c, lease);
            s->st.errors++;
            return rc;
        }
        lease = b.id;
        s->st.restored += b.restored;
        for (size_t i = 0; i < m; i++) {
            unsigned char *d = dst[at + i];
            for (uint32_t j = 0; j < b.n_blocks[i]; j++)
                memcpy(d + (size_t)j * g->block_bytes, b.block[b.first[i] + j], g->block_bytes);
            n_blocks[at + i] = (int32_t)b.n_blocks[i];
            s->st.blocks_got += b.n_blocks[i];
        }
    }
    if (lease && (rc = kvs_client_release(s->c, lease)) < 0)
        LOG_DEBUG("kvstore release: %s (the lease expires)", ckv_strerror(rc));
    s->st.gets++;
    s->st.clusters_got += (uint64_t)n;
    return 0;
}

static int kvs_drop(void *self, uint64_t seq_uid)
{
    struct kvs_store *s = self;
    int rc = kvs_client_drop(s->c, seq_uid, NULL);
    if (rc == 0)
        s->st.drops++;
    else
        s->st.errors++;
    return rc;
}

static void kvs_destroy(void *self)
{
    struct kvs_store *s = self;
    kvs_client_destroy(&s->c);
    free(s->keys);
    free(s->ntok);
    free(s->resv);
    free(s);
}

static const struct ckv_block_store_ops kvs_ops = {
    .put = kvs_put,
    .get = kvs_get,
    .drop = kvs_drop,
    .destroy = kvs_destroy,
};

int ckv_block_store_kvs_new(const char *endpoint, const char *client_name, int timeout_ms,
                            size_t block_bytes, struct ckv_block_store **out, char *err,
                            size_t errlen)
{
    if (!out || !endpoint || !*endpoint)
        return ckv_errorf(-EINVAL, err, errlen, "kvstore block store: no endpoint");
    *out = NULL;
    struct kvs_store *s = calloc(1, sizeof(*s));
    if (!s)
        return ckv_errorf(-ENOMEM, err, errlen, "kvstore block store: out of memory");
    int rc = kvs_client_new(endpoint, client_name ? client_name : "worker", timeout_ms, &s->c);
    if (rc < 0) {
        ckv_errorf(rc, err, errlen, "kvstore at %s: %s", endpoint, ckv_strerror(rc));
        free(s);
        return rc;
    }
    const struct kvs_geometry *g = kvs_client_geometry(s->c);
    if (block_bytes && g->block_bytes != block_bytes) {
        ckv_errorf(-EINVAL, err, errlen,
                   "kvstore at %s has blocks of %u bytes (head_dim %u), the model needs %zu: "
                   "start the store with the model's head_dim",
                   endpoint, g->block_bytes, g->head_dim, block_bytes);
        kvs_client_destroy(&s->c);
        free(s);
        return -EINVAL;
    }
    s->pub.ops = &kvs_ops;
    s->pub.self = s;
    s->pub.block_bytes = g->block_bytes;
    *out = &s->pub;
    return 0;
}

int ckv_block_store_kvs_stats(const struct ckv_block_store *s,
                              struct ckv_block_store_kvs_stats *out)
{
    if (!s || !out || s->ops != &kvs_ops)
        return -EINVAL;
    *out = ((const struct kvs_store *)s->self)->st;
    return 0;
}

int ckv_block_store_kvs_store_stats(struct ckv_block_store *s, bool prometheus, struct ckv_buf *out)
{
    if (!s || !out || s->ops != &kvs_ops)
        return -EINVAL;
    return kvs_client_stats(((struct kvs_store *)s->self)->c, prometheus, out);
}
