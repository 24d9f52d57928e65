/*
 * The KV manager of one sequence (kvcache.h).
 *
 * Storage. Every layer keeps its whole K/V contiguous, token-major: (max_ctx, n_kv_heads,
 * head_dim) in the KV dtype, so a chunk of tokens is appended with one ckv_convert() per
 * tensor, and prefill attention, the full layers, k-means, packing and streaming read it at a
 * fixed stride. The sparse methods add a block pool (kernels.h block layout) read by
 * ckv_attn_decode_blocks():
 *   clusterkv  per (layer >= full_layers, KV head) resident blocks for the sinks and the
 *              recent window, then the cluster cache: blocks of recalled clusters, LRU over
 *              clusters, `cache_blocks` blocks at most (0: unbounded; a soft limit: a layer's
 *              own selection is never evicted while it is being attended, the pool grows
 *              instead).
 *   quest      every token also in its 16-token page's block (page p of head h at slot
 *              h * max_pages + p), plus per page f32 min/max key bounds.
 *
 * ClusterKV after prefill (n prompt tokens, per layer >= full_layers and KV head):
 *   sinks      positions [0, min(sinks, n)), resident.
 *   clustered  [sinks, n - w0), w0 = min(n - sinks, window / 2): k-means, packed into blocks,
 *              written to the store (one put per layer), not cached (the first decode step
 *              recalls what it selects).
 *   window     [n - w0, n): resident, attended in full.
 * Why w0 = window / 2 and not 0 or window: the last prompt tokens (the question, the chat
 * template's assistant header) are what the first generated tokens attend to most, so they
 * stay exact until the first window clustering; a full window (w0 = window) would have to be
 * clustered at the very first step, and w0 = 0 would leave the first steps without their
 * most recent context unless it happened to be selected. Decoded tokens join the window; the
 * window is clustered into window_clusters clusters by ckv_kvcache_end_step() as soon as it
 * holds `window` tokens (so after window - w0 steps the first time, then every `window`
 * steps), written to the store and kept in the cache.
 */
#include "kvcache.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "block_store.h"
#include "ckv_clock.h"
#include "ckv_error.h"

#define BT  CKV_BLOCK_TOKENS
#define NIL ((int64_t)-1)

static int blocks_of(int tokens)
{
    return (tokens + BT - 1) / BT;
}

/* One (layer, KV head) of clusterkv: its clusters in creation order (local ids 0..n_clu-1,
 * also the store's cluster_id), where their blocks sit in the cache, and their LRU links. */
struct ckv_head {
    int n_clu, cap_clu;
    int clustered;  /* tokens in clusters */
    float *cent;    /* (cap_clu, head_dim) f32, device */
    int32_t *size;  /* (cap_clu) tokens */
    int32_t *blk0;  /* (cap_clu + 1) cluster c's blocks are slots[blk0[c] .. blk0[c+1]) */
    int32_t *slots; /* (cap_blk) cache slot of each block, -1 when not cached */
    int cap_blk;
    int32_t *mem0;    /* (cap_clu + 1) cluster c's member positions: members[mem0[c] ..] */
    int32_t *members; /* (cap_tok) ascending within a cluster */
    int cap_tok;
    int64_t *prev, *next; /* (cap_clu) LRU links (handles, see handle()) */
    uint32_t *stamp;      /* (cap_clu) layer step that last looked the cluster up */
    int res_slot;         /* first resident slot: sink blocks, then window blocks */
};

struct kv_layer {
    void *k, *v; /* (max_ctx, n_kv_heads, head_dim) dtype, device */
    int n;       /* tokens appended to this layer */
    /* clusterkv, layers >= full_layers */
    struct ckv_head *heads; /* (n_kv_heads) */
    int n_sink;             /* tokens in the sink blocks */
    int wstart, n_win;      /* window: positions [wstart, wstart + n_win) */
    int n_clu_total;
    int32_t *head_off;     /* (n_kv_heads + 1) host copy */
    int32_t *head_off_dev; /* (n_kv_heads + 1) device */
    float *cent_all;       /* (cap_all, head_dim) f32 device, grouped by head */
    int32_t *size_all;     /* (cap_all) device */
    int cap_all;
    int dirty;     /* clusters changed: rebuild cent_all/size_all before the next selection */
    int all_small; /* every head has at most `budget` clustered tokens: no selection needed */
    /* quest, layers >= full_layers */
    float *pmin, *pmax; /* (n_kv_heads, max_pages, head_dim) f32 device */
};

struct ckv_kvcache {
    ckv_ctx_t *ctx;
    struct ckv_kv_geom g;
    struct ckv_kv_opts o;
    struct ckv_block_store *store;
    uint64_t seq_uid;
    size_t esz;              /* bytes of one KV element */
    size_t row;              /* elements of one token's row: n_kv_heads * head_dim */
    size_t bb;               /* bytes of one block */
    int n_tokens;            /* tokens of every layer between steps */
    int prefilled;           /* ckv_kvcache_end_prefill done */
    int n_units;             /* selection units of select_mode */
    int group;               /* query heads per KV head */
    struct kv_layer *layers; /* (n_layers) */
    struct ckv_kv_stats st;

    /* block pool (clusterkv, quest) */
    void *pool;
    int pool_slots;
    int res_slots;         /* clusterkv: resident slots at the start of the pool */
    int sink_blk, win_blk; /* clusterkv: resident blocks per head */
    int max_pages;         /* quest: pages per head */

    /* cluster cache (clusterkv) */
    int32_t *free_slots; /* stack of free cache slots */
    int n_free, cap_free;
    int cached_blocks;
    int64_t lru_head, lru_tail; /* most / least recently used */
    uint32_t stamp;

    /* per-step scratch, grown and never shrunk (no allocation on the steady decode path) */
    int max_sel;                           /* selection capacity per unit */
    int32_t *sel_dev, *cnt_dev, *take_dev; /* device selection outputs */
    int32_t *sel, *cnt, *take;             /* host copies */
    struct ckv_block_ref *refs, *refs_dev;
    int cap_refs;
    int32_t *loff, *loff_dev; /* (n_units + 1) */
    struct ckv_cluster_key *mkeys;
    int32_t *mnb;
    void **mdst;
    int64_t *mh;  /* missed clusters' handles */
    size_t *moff; /* missed clusters' offsets in stage */
    int cap_miss;
    struct ckv_cluster_key *pkeys; /* put: keys */
    int32_t *pnb;                  /* put: blocks per cluster */
    void **pptr;                   /* put: where each cluster's blocks are */
    int cap_put;
    unsigned char *stage; /* host staging of blocks (store get/put) */
    size_t cap_stage;
    /* streaming / full-range merge */
    float *out2, *lse1, *lse2; /* device */
    float *h_out1, *h_out2, *h_lse1, *h_lse2;
    /* quest */
    int32_t *qsel_dev, *qcnt_dev, *qsel, *qcnt;
    /* clustering scratch (device) */
    int32_t *iota; /* 0, 1, 2, ... */
    int cap_iota;
    int32_t *km_size, *km_off, *km_mem; /* k-means CSR outputs of one head */
    int cap_km_clu, cap_km_tok;
    void *spool; /* freshly packed clusters of one layer, before the store put */
    int cap_spool;
};

/* ------------------------------------------------------------------------------------------
 * Names and options
 * ------------------------------------------------------------------------------------------ */

const char *const ckv_kv_method_names[] = {"full", "clusterkv", "quest", "streaming", NULL};
const char *const ckv_select_mode_names[] = {"per-qhead", "kvhead-max", "kvhead-sum", NULL};

const char *ckv_kv_method_name(enum ckv_kv_method m)
{
    return (unsigned)m < CKV_ARRAY_LEN(ckv_kv_method_names) - 1 ? ckv_kv_method_names[m] : "?";
}

int ckv_kv_method_parse(const char *s, enum ckv_kv_method *out)
{
    for (size_t i = 0; s && i < CKV_ARRAY_LEN(ckv_kv_method_names) - 1; i++)
        if (strcmp(s, ckv_kv_method_names[i]) == 0) {
            *out = (enum ckv_kv_method)i;
            return 0;
        }
    return -EINVAL;
}

const char *ckv_select_mode_name(enum ckv_select_mode m)
{
    return (unsigned)m < CKV_ARRAY_LEN(ckv_select_mode_names) - 1 ? ckv_select_mode_names[m] : "?";
}

int ckv_select_mode_parse(const char *s, enum ckv_select_mode *out)
{
    for (size_t i = 0; s && i < CKV_ARRAY_LEN(ckv_select_mode_names) - 1; i++)
        if (strcmp(s, ckv_select_mode_names[i]) == 0) {
            *out = (enum ckv_select_mode)i;
            return 0;
        }
    return -EINVAL;
}

void ckv_kv_opts_default(struct ckv_kv_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->method = CKV_KV_CLUSTERKV;
    o->budget = 1024;
    o->sinks = 16;
    o->window = 320;
    o->tokens_per_cluster = 80;
    o->window_clusters = 8;
    o->kmeans_iters = 20;
    o->full_layers = 2;
    o->select_mode = CKV_SELECT_KVHEAD_SUM;
    o->dtype = CKV_DTYPE_F16;
    o->cache_blocks = 0;
    o->seed = 0x5eed;
}

int ckv_kv_opts_check(const struct ckv_kv_opts *o, char *err, size_t errlen)
{
    if (!o)
        return ckv_errorf(-EINVAL, err, errlen, "no KV options");
    if ((unsigned)o->method >= CKV_ARRAY_LEN(ckv_kv_method_names) - 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv method %d unknown", (int)o->method);
    if (o->budget < 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv budget %d: must be >= 1", o->budget);
    if (o->sinks < 0)
        return ckv_errorf(-EINVAL, err, errlen, "kv sinks %d: must be >= 0", o->sinks);
    if (o->window < 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv window %d: must be >= 1", o->window);
    if (o->tokens_per_cluster < 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv tokens_per_cluster %d: must be >= 1",
                          o->tokens_per_cluster);
    if (o->window_clusters < 1 || o->window_clusters > o->window)
        return ckv_errorf(-EINVAL, err, errlen, "kv window_clusters %d: must be in [1, window=%d]",
                          o->window_clusters, o->window);
    if (o->kmeans_iters < 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv kmeans_iters %d: must be >= 1",
                          o->kmeans_iters);
    if (o->full_layers < 0)
        return ckv_errorf(-EINVAL, err, errlen, "kv full_layers %d: must be >= 0", o->full_layers);
    if ((unsigned)o->select_mode >= CKV_ARRAY_LEN(ckv_select_mode_names) - 1)
        return ckv_errorf(-EINVAL, err, errlen, "kv select_mode %d unknown", (int)o->select_mode);
    if (o->dtype != CKV_DTYPE_F16 && o->dtype != CKV_DTYPE_F32)
        return ckv_errorf(-EINVAL, err, errlen, "kv dtype %d: must be f16 or f32", (int)o->dtype);
    if (o->cache_blocks < 0)
        return ckv_errorf(-EINVAL, err, errlen, "kv cache_blocks %d: must be >= 0",
                          o->cache_blocks);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Small helpers: growth of host and device arrays
 * ------------------------------------------------------------------------------------------ */

/* Grows a host array to at least `need` elements (doubling); 0 or -ENOMEM (array kept). */
static int host_grow(void *pp, int *cap, int need, size_t elem)
{
    if (need <= *cap)
        return 0;
    int n = *cap > 0 ? *cap : 16;
    while (n < need)
        n *= 2;
    void *p = realloc(*(void **)pp, (size_t)n * elem);
    if (!p)
        return -ENOMEM;
    *(void **)pp = p;
    *cap = n;
    return 0;
}

/* Grows a device buffer from old_bytes to new_bytes, keeping its contents. */
static int dev_grow(ckv_ctx_t *ctx, void *pp, size_t old_bytes, size_t new_bytes)
{
    void *n = NULL;
    int rc = ckv_dev_alloc(ctx, new_bytes, &n);
    if (rc)
        return rc;
    void *old = *(void **)pp;
    if (old && old_bytes) {
        rc = ckv_copy_d2d(ctx, n, old, old_bytes);
        if (rc) {
            ckv_dev_free(ctx, n);
            return rc;
        }
    }
    if (old)
        ckv_dev_free(ctx, old);
    *(void **)pp = n;
    return 0;
}

static double ms_since(uint64_t t0)
{
    return (double)(ckv_now_ns() - t0) * 1e-6;
}

/* Layers with a sparse decode path (every layer for full is none). */
static int layer_sparse(const ckv_kvcache_t *kv, int l)
{
    return kv->o.method != CKV_KV_FULL && l >= kv->o.full_layers;
}

/* The KV head a selection unit reads. */
static int unit_head(const ckv_kvcache_t *kv, int u)
{
    return kv->o.select_mode == CKV_SELECT_PER_QHEAD ? u / kv->group : u;
}

static char *pool_at(const ckv_kvcache_t *kv, int slot)
{
    return (char *)kv->pool + (size_t)slot * kv->bb;
}

/* Copies token pos of layer L, KV head h (already in the contiguous cache) into row t of a
 * pool block. */
static int block_write(ckv_kvcache_t *kv, struct kv_layer *L, int pos, int h, int slot, int t)
{
    size_t d = (size_t)kv->g.head_dim, rb = d * kv->esz;
    size_t src = ((size_t)pos * kv->row + (size_t)h * d) * kv->esz;
    int rc = ckv_copy_d2d(kv->ctx, pool_at(kv, slot) + (size_t)t * rb, (char *)L->k + src, rb);
    if (rc == 0)
        rc = ckv_copy_d2d(kv->ctx, pool_at(kv, slot) + (size_t)(BT + t) * rb, (char *)L->v + src,
                          rb);
    return rc;
}

/* A device array 0, 1, ..., n - 1 (rows and slots of ckv_pack_blocks are consecutive runs of
 * it). */
static int ensure_iota(ckv_kvcache_t *kv, int n)
{
    if (n <= kv->cap_iota)
        return 0;
    int cap = kv->cap_iota > 0 ? kv->cap_iota : 1024;
    while (cap < n)
        cap *= 2;
    int32_t *h = malloc(sizeof(int32_t) * (size_t)cap);
    if (!h)
        return -ENOMEM;
    for (int i = 0; i < cap; i++)
        h[i] = i;
    int32_t *d = NULL;
    int rc = ckv_dev_alloc(kv->ctx, sizeof(int32_t) * (size_t)cap, (void **)&d);
    if (rc == 0)
        rc = ckv_copy_h2d(kv->ctx, d, h, sizeof(int32_t) * (size_t)cap);
    free(h);
    if (rc) {
        if (d)
            ckv_dev_free(kv->ctx, d);
        return rc;
    }
    if (kv->iota)
        ckv_dev_free(kv->ctx, kv->iota);
    kv->iota = d;
    kv->cap_iota = cap;
    return 0;
}

/* Packs positions [p0, p0 + n) of layer L, KV head h into consecutive pool slots from slot. */
static int pack_range(ckv_kvcache_t *kv, struct kv_layer *L, int h, int p0, int n, void *pool,
                      int slot)
{
    if (n <= 0)
        return 0;
    int rc = ensure_iota(kv, CKV_MAX(p0 + n, slot + blocks_of(n)));
    if (rc)
        return rc;
    size_t hoff = (size_t)h * kv->g.head_dim * kv->esz;
    return ckv_pack_blocks(kv->ctx, (char *)L->k + hoff, (char *)L->v + hoff, kv->o.dtype,
                           kv->g.head_dim, kv->row, kv->iota + p0, n, pool, kv->iota + slot);
}

/* ------------------------------------------------------------------------------------------
 * The cluster cache: LRU over clusters, blocks in pool slots
 * ------------------------------------------------------------------------------------------ */

/* A cluster's handle in the LRU list: (layer * n_kv_heads + head) << 32 | local id. */
static int64_t handle(const ckv_kvcache_t *kv, int l, int h, int c)
{
    return ((int64_t)(l * kv->g.n_kv_heads + h) << 32) | (int64_t)c;
}

static struct ckv_head *handle_head(const ckv_kvcache_t *kv, int64_t x, int *c)
{
    int lh = (int)(x >> 32);
    *c = (int)(x & 0xffffffff);
    return &kv->layers[lh / kv->g.n_kv_heads].heads[lh % kv->g.n_kv_heads];
}

static void lru_unlink(ckv_kvcache_t *kv, int64_t x)
{
    int c;
    struct ckv_head *H = handle_head(kv, x, &c);
    int64_t p = H->prev[c], n = H->next[c];
    int pc, nc;
    if (p != NIL)
        handle_head(kv, p, &pc)->next[pc] = n;
    else
        kv->lru_head = n;
    if (n != NIL)
        handle_head(kv, n, &nc)->prev[nc] = p;
    else
        kv->lru_tail = p;
    H->prev[c] = H->next[c] = NIL;
}

static void lru_push_front(ckv_kvcache_t *kv, int64_t x)
{
    int c, hc;
    struct ckv_head *H = handle_head(kv, x, &c);
    H->prev[c] = NIL;
    H->next[c] = kv->lru_head;
    if (kv->lru_head != NIL)
        handle_head(kv, kv->lru_head, &hc)->prev[hc] = x;
    else
        kv->lru_tail = x;
    kv->lru_head = x;
}

/* Forgets a cached cluster: its slots go back to the free stack. */
static void cache_drop(ckv_kvcache_t *kv, int64_t x)
{
    int c;
    struct ckv_head *H = handle_head(kv, x, &c);
    lru_unlink(kv, x);
    for (int b = H->blk0[c]; b < H->blk0[c + 1]; b++) {
        kv->free_slots[kv->n_free++] = H->slots[b];
        H->slots[b] = -1;
    }
    kv->cached_blocks -= H->blk0[c + 1] - H->blk0[c];
}

/* Grows the pool by at least `need` slots (doubling), the new slots onto the free stack. */
static int pool_grow(ckv_kvcache_t *kv, int need)
{
    int n = kv->pool_slots * 2;
    if (n < kv->pool_slots + need)
        n = kv->pool_slots + need;
    int rc = host_grow(&kv->free_slots, &kv->cap_free, n - kv->res_slots, sizeof(int32_t));
    if (rc == 0)
        rc = dev_grow(kv->ctx, &kv->pool, (size_t)kv->pool_slots * kv->bb, (size_t)n * kv->bb);
    if (rc)
        return rc;
    /* pushed high to low so that low slots are handed out first */
    for (int s = n - 1; s >= kv->pool_slots; s--)
        kv->free_slots[kv->n_free++] = s;
    kv->pool_slots = n;
    return 0;
}

/* Gives cluster x cache slots (contents to be written by the caller) and makes it the most
 * recently used. Evicts least recently used clusters above cache_blocks, never one looked up
 * in the current layer step (stamp): those are all at the front of the list, so eviction
 * stops at the first one. */
static int cache_alloc(ckv_kvcache_t *kv, int64_t x)
{
    int c;
    struct ckv_head *H = handle_head(kv, x, &c);
    int nb = H->blk0[c + 1] - H->blk0[c];
    while (kv->o.cache_blocks > 0 && kv->cached_blocks + nb > kv->o.cache_blocks &&
           kv->lru_tail != NIL) {
        int tc;
        struct ckv_head *T = handle_head(kv, kv->lru_tail, &tc);
        if (T->stamp[tc] == kv->stamp)
            break;
        cache_drop(kv, kv->lru_tail);
    }
    if (kv->n_free < nb) {
        int rc = pool_grow(kv, nb - kv->n_free);
        if (rc)
            return rc;
    }
    for (int b = H->blk0[c]; b < H->blk0[c + 1]; b++)
        H->slots[b] = kv->free_slots[--kv->n_free];
    kv->cached_blocks += nb;
    lru_push_front(kv, x);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Clustering (ALGORITHM.md sections 1 and 2)
 * ------------------------------------------------------------------------------------------ */

/* realloc to exactly n elements; 0 or -ENOMEM (array kept) */
static int host_resize(void *pp, size_t n, size_t elem)
{
    void *p = realloc(*(void **)pp, n * elem);
    if (!p)
        return -ENOMEM;
    *(void **)pp = p;
    return 0;
}

/* Room in head H for `more` clusters of `tokens` tokens in all. */
static int head_reserve(ckv_kvcache_t *kv, struct ckv_head *H, int more, int tokens)
{
    int need_clu = H->n_clu + more;
    if (need_clu > H->cap_clu) {
        int cap = H->cap_clu > 0 ? H->cap_clu : 16;
        while (cap < need_clu)
            cap *= 2;
        size_t n1 = (size_t)cap + 1; /* blk0 and mem0 have an entry more than clusters */
        if (host_resize(&H->size, n1, sizeof(int32_t)) ||
            host_resize(&H->blk0, n1, sizeof(int32_t)) ||
            host_resize(&H->mem0, n1, sizeof(int32_t)) ||
            host_resize(&H->prev, n1, sizeof(int64_t)) ||
            host_resize(&H->next, n1, sizeof(int64_t)) ||
            host_resize(&H->stamp, n1, sizeof(uint32_t)))
            return -ENOMEM;
        size_t row = (size_t)kv->g.head_dim * sizeof(float);
        int rc = dev_grow(kv->ctx, &H->cent, (size_t)H->cap_clu * row, (size_t)cap * row);
        if (rc)
            return rc;
        if (H->cap_clu == 0)
            H->blk0[0] = H->mem0[0] = 0;
        H->cap_clu = cap;
    }
    int need_blk = H->blk0[H->n_clu] + blocks_of(tokens) + more;
    int need_tok = H->mem0[H->n_clu] + tokens;
    if (host_grow(&H->slots, &H->cap_blk, need_blk, sizeof(int32_t)) ||
        host_grow(&H->members, &H->cap_tok, need_tok, sizeof(int32_t)))
        return -ENOMEM;
    return 0;
}

/* Device scratch of one k-means (C clusters, n tokens) and of packing nb blocks. */
static int km_reserve(ckv_kvcache_t *kv, int C, int n, int nb)
{
    int rc = 0;
    if (C > kv->cap_km_clu) {
        if ((rc = dev_grow(kv->ctx, &kv->km_size, 0, sizeof(int32_t) * (size_t)C)) ||
            (rc = dev_grow(kv->ctx, &kv->km_off, 0, sizeof(int32_t) * ((size_t)C + 1))))
            return rc;
        kv->cap_km_clu = C;
    }
    if (n > kv->cap_km_tok) {
        if ((rc = dev_grow(kv->ctx, &kv->km_mem, 0, sizeof(int32_t) * (size_t)n)))
            return rc;
        kv->cap_km_tok = n;
    }
    if (nb > kv->cap_spool) {
        if ((rc = dev_grow(kv->ctx, &kv->spool, 0, kv->bb * (size_t)nb)))
            return rc;
        kv->cap_spool = nb;
    }
    return 0;
}

/* Clusters positions [p0, p0 + n) of layer l into at most n_clusters clusters per KV head,
 * appends them to each head's list, writes them to the store in one put and, when `cache`,
 * keeps them in the cluster cache. On an error the heads are left as they were (the new
 * clusters are only counted in once the put succeeded). */
static int cluster_range(ckv_kvcache_t *kv, int l, int p0, int n, int n_clusters, int cache)
{
    struct kv_layer *L = &kv->layers[l];
    int nkv = kv->g.n_kv_heads, d = kv->g.head_dim;
    int C = CKV_MIN(n_clusters, n);
    /* bound on the blocks of one layer's new clusters: every cluster may waste a block */
    int nb_max = nkv * (blocks_of(n) + C);
    uint64_t t0 = ckv_now_ns();
    int rc = km_reserve(kv, C, n, nb_max);
    if (rc)
        return rc;
    if (nkv * C > kv->cap_put) {
        if (host_resize(&kv->pkeys, (size_t)nkv * C, sizeof(*kv->pkeys)) ||
            host_resize(&kv->pnb, (size_t)nkv * C, sizeof(int32_t)) ||
            host_resize(&kv->pptr, (size_t)nkv * C, sizeof(void *)))
            return -ENOMEM;
        kv->cap_put = nkv * C;
    }
    if ((size_t)nb_max * kv->bb > kv->cap_stage) {
        if (host_resize(&kv->stage, (size_t)nb_max * kv->bb, 1))
            return -ENOMEM;
        kv->cap_stage = (size_t)nb_max * kv->bb;
    }
    int made[nkv]; /* clusters made per head */
    int nput = 0, blk = 0;
    for (int h = 0; h < nkv; h++) {
        struct ckv_head *H = &L->heads[h];
        if ((rc = head_reserve(kv, H, C, n)))
            return rc;
        struct ckv_kmeans_params kp = {.n_clusters = C,
                                       .max_iter = kv->o.kmeans_iters,
                                       .tol = 0.001f,
                                       /* a distinct, reproducible seed per (layer, head, window) */
                                       .seed = kv->o.seed ^ ((uint64_t)l << 40) ^
                                               ((uint64_t)h << 32) ^ (uint64_t)p0};
        struct ckv_kmeans_out ko = {H->cent + (size_t)H->n_clu * d, kv->km_size, kv->km_off,
                                    kv->km_mem};
        const char *keys = (const char *)L->k + ((size_t)p0 * kv->row + (size_t)h * d) * kv->esz;
        int nc = 0;
        rc = ckv_kmeans(kv->ctx, keys, kv->o.dtype, n, d, kv->row, p0, &kp, &ko, &nc, NULL);
        if (rc)
            return rc;
        int c0 = H->n_clu, m0 = H->mem0[c0];
        int32_t offs[nc + 1];
        if ((rc = ckv_copy_d2h(kv->ctx, H->size + c0, kv->km_size, sizeof(int32_t) * nc)) ||
            (rc = ckv_copy_d2h(kv->ctx, offs, kv->km_off, sizeof(int32_t) * (nc + 1))) ||
            (rc = ckv_copy_d2h(kv->ctx, H->members + m0, kv->km_mem, sizeof(int32_t) * n)))
            return rc;
        /* every cluster starts a fresh block (DESIGN.md "Data model") */
        for (int c = 0; c < nc; c++) {
            int nbc = blocks_of(H->size[c0 + c]);
            H->mem0[c0 + c + 1] = m0 + offs[c + 1];
            H->blk0[c0 + c + 1] = H->blk0[c0 + c] + nbc;
            for (int b = H->blk0[c0 + c]; b < H->blk0[c0 + c + 1]; b++)
                H->slots[b] = -1;
            if ((rc = ensure_iota(kv, blk + nbc)))
                return rc;
            size_t hoff = (size_t)h * d * kv->esz;
            rc = ckv_pack_blocks(kv->ctx, (char *)L->k + hoff, (char *)L->v + hoff, kv->o.dtype, d,
                                 kv->row, kv->km_mem + offs[c], H->size[c0 + c], kv->spool,
                                 kv->iota + blk);
            if (rc)
                return rc;
            kv->pkeys[nput] = (struct ckv_cluster_key){kv->seq_uid, l, h, c0 + c};
            kv->pnb[nput] = nbc;
            kv->pptr[nput] = kv->stage + (size_t)blk * kv->bb;
            nput++;
            blk += nbc;
        }
        made[h] = nc;
    }
    kv->st.kmeans_ms += ms_since(t0);
    uint64_t t1 = ckv_now_ns();
    if ((rc = ckv_copy_d2h(kv->ctx, kv->stage, kv->spool, (size_t)blk * kv->bb)))
        return rc;
    rc = ckv_block_store_put(kv->store, kv->pkeys, kv->pnb, (const void *const *)kv->pptr, nput);
    kv->st.fetch_ms += ms_since(t1);
    if (rc)
        return rc;
    /* the clusters exist now: count them in */
    blk = 0;
    kv->stamp++;
    for (int h = 0; h < nkv; h++) {
        struct ckv_head *H = &L->heads[h];
        for (int c = H->n_clu; c < H->n_clu + made[h]; c++) {
            H->prev[c] = H->next[c] = NIL;
            H->stamp[c] = 0;
            H->clustered += H->size[c];
        }
        int c0 = H->n_clu;
        H->n_clu += made[h];
        L->n_clu_total += made[h];
        kv->st.clusters_made += (uint64_t)made[h];
        for (int c = c0; cache && c < H->n_clu; c++) {
            int nbc = H->blk0[c + 1] - H->blk0[c];
            /* not cached is fine (the store has it): errors here only cost a later miss */
            if (cache_alloc(kv, handle(kv, l, h, c)) == 0) {
                int crc = 0;
                for (int b = 0; crc == 0 && b < nbc; b++)
                    crc = ckv_copy_d2d(kv->ctx, pool_at(kv, H->slots[H->blk0[c] + b]),
                                       (char *)kv->spool + (size_t)(blk + b) * kv->bb, kv->bb);
                if (crc)
                    cache_drop(kv, handle(kv, l, h, c));
            }
            blk += nbc;
        }
        if (!cache)
            for (int c = c0; c < H->n_clu; c++)
                blk += H->blk0[c + 1] - H->blk0[c];
    }
    L->dirty = 1;
    return 0;
}

/* After clusters changed: the layer's selection inputs (centroids grouped by KV head, sizes,
 * head offsets) rebuilt from the heads, and the selection capacity. Every `window` steps. */
static int layer_rebuild(ckv_kvcache_t *kv, struct kv_layer *L)
{
    int nkv = kv->g.n_kv_heads, d = kv->g.head_dim, rc;
    size_t crow = (size_t)d * sizeof(float);
    if (L->n_clu_total > L->cap_all) {
        int cap = L->cap_all > 0 ? L->cap_all : 64;
        while (cap < L->n_clu_total)
            cap *= 2;
        if ((rc = dev_grow(kv->ctx, &L->cent_all, 0, (size_t)cap * crow)) ||
            (rc = dev_grow(kv->ctx, &L->size_all, 0, (size_t)cap * sizeof(int32_t))))
            return rc;
        L->cap_all = cap;
    }
    int32_t *sizes = malloc(sizeof(int32_t) * (size_t)(L->n_clu_total + 1));
    if (!sizes)
        return -ENOMEM;
    int max_clu = 0, all_small = 1;
    L->head_off[0] = 0;
    for (int h = 0; h < nkv; h++) {
        struct ckv_head *H = &L->heads[h];
        int o = L->head_off[h];
        L->head_off[h + 1] = o + H->n_clu;
        if (H->n_clu && (rc = ckv_copy_d2d(kv->ctx, L->cent_all + (size_t)o * d, H->cent,
                                           (size_t)H->n_clu * crow))) {
            free(sizes);
            return rc;
        }
        if (H->n_clu)
            memcpy(sizes + o, H->size, sizeof(int32_t) * (size_t)H->n_clu);
        max_clu = CKV_MAX(max_clu, H->n_clu);
        if (H->clustered > kv->o.budget)
            all_small = 0;
    }
    rc = L->n_clu_total
             ? ckv_copy_h2d(kv->ctx, L->size_all, sizes, sizeof(int32_t) * (size_t)L->n_clu_total)
             : 0;
    free(sizes);
    if (rc == 0)
        rc = ckv_copy_h2d(kv->ctx, L->head_off_dev, L->head_off,
                          sizeof(int32_t) * (size_t)(nkv + 1));
    if (rc)
        return rc;
    L->all_small = all_small;
    /* the kernel wants room for min(B, clusters of any head); with every head small all of a
     * head's clusters are listed */
    int ms = all_small ? max_clu : CKV_MIN(kv->o.budget, max_clu);
    if (ms < 1)
        ms = 1;
    if (ms > kv->max_sel) {
        size_t n = (size_t)kv->n_units * (size_t)ms;
        if ((rc = dev_grow(kv->ctx, &kv->sel_dev, 0, n * sizeof(int32_t))) ||
            (rc = host_resize(&kv->sel, n, sizeof(int32_t))))
            return rc;
        kv->max_sel = ms;
    }
    L->dirty = 0;
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Life cycle
 * ------------------------------------------------------------------------------------------ */

int ckv_kvcache_new(ckv_ctx_t *ctx, const struct ckv_kv_geom *g, const struct ckv_kv_opts *o,
                    struct ckv_block_store *store, uint64_t seq_uid, ckv_kvcache_t **out, char *err,
                    size_t errlen)
{
    if (!out)
        return ckv_errorf(-EINVAL, err, errlen, "kvcache: no output pointer");
    *out = NULL;
    if (!ctx || !g)
        return ckv_errorf(-EINVAL, err, errlen, "kvcache: no context or geometry");
    int rc = ckv_kv_opts_check(o, err, errlen);
    if (rc)
        return rc;
    if (g->n_layers < 1 || g->n_q_heads < 1 || g->n_kv_heads < 1 || g->max_ctx < 1 ||
        g->n_q_heads % g->n_kv_heads != 0 || g->head_dim < 1 || g->head_dim > CKV_MAX_HEAD_DIM)
        return ckv_errorf(-EINVAL, err, errlen,
                          "kvcache: bad geometry (layers %d, q heads %d, kv heads %d, head_dim "
                          "%d, max_ctx %d)",
                          g->n_layers, g->n_q_heads, g->n_kv_heads, g->head_dim, g->max_ctx);
    if (o->method == CKV_KV_CLUSTERKV) {
        if (!store)
            return ckv_errorf(-EINVAL, err, errlen, "kvcache: clusterkv needs a block store");
        if (store->block_bytes != ckv_block_bytes(g->head_dim, o->dtype))
            return ckv_errorf(-EINVAL, err, errlen,
                              "kvcache: store block size %zu, KV blocks are %zu bytes",
                              store->block_bytes, ckv_block_bytes(g->head_dim, o->dtype));
    }
    ckv_kvcache_t *kv = calloc(1, sizeof(*kv));
    if (!kv)
        return ckv_errorf(-ENOMEM, err, errlen, "kvcache: out of memory");
    kv->ctx = ctx;
    kv->g = *g;
    kv->o = *o;
    kv->store = store;
    kv->seq_uid = seq_uid;
    kv->esz = ckv_dtype_size(o->dtype);
    kv->row = (size_t)g->n_kv_heads * (size_t)g->head_dim;
    kv->bb = ckv_block_bytes(g->head_dim, o->dtype);
    kv->group = g->n_q_heads / g->n_kv_heads;
    kv->n_units = o->select_mode == CKV_SELECT_PER_QHEAD ? g->n_q_heads : g->n_kv_heads;
    kv->lru_head = kv->lru_tail = NIL;
    int nkv = g->n_kv_heads, nu = kv->n_units, d = g->head_dim;
    int n_sparse = CKV_MAX(0, g->n_layers - o->full_layers);
    kv->layers = calloc((size_t)g->n_layers, sizeof(*kv->layers));
    if (!kv->layers)
        goto err_nomem;
    size_t bytes = (size_t)g->max_ctx * kv->row * kv->esz;
    for (int l = 0; l < g->n_layers; l++) {
        struct kv_layer *L = &kv->layers[l];
        if (ckv_dev_alloc(ctx, bytes, &L->k) || ckv_dev_alloc(ctx, bytes, &L->v))
            goto err_nomem;
        if (o->method == CKV_KV_CLUSTERKV && l >= o->full_layers) {
            L->heads = calloc((size_t)nkv, sizeof(*L->heads));
            L->head_off = calloc((size_t)nkv + 1, sizeof(int32_t));
            if (!L->heads || !L->head_off ||
                ckv_dev_alloc(ctx, sizeof(int32_t) * ((size_t)nkv + 1), (void **)&L->head_off_dev))
                goto err_nomem;
        }
    }
    /* device scratch of every step: selection counts, refs, lists, the streaming merge */
    kv->cap_refs = 1024;
    if (ckv_dev_alloc(ctx, sizeof(int32_t) * (size_t)nu, (void **)&kv->cnt_dev) ||
        ckv_dev_alloc(ctx, sizeof(int32_t) * (size_t)nu, (void **)&kv->take_dev) ||
        ckv_dev_alloc(ctx, sizeof(int32_t) * ((size_t)nu + 1), (void **)&kv->loff_dev) ||
        ckv_dev_alloc(ctx, sizeof(struct ckv_block_ref) * (size_t)kv->cap_refs,
                      (void **)&kv->refs_dev) ||
        ckv_dev_alloc(ctx, sizeof(float) * (size_t)g->n_q_heads * d, (void **)&kv->out2) ||
        ckv_dev_alloc(ctx, sizeof(float) * (size_t)g->n_q_heads, (void **)&kv->lse1) ||
        ckv_dev_alloc(ctx, sizeof(float) * (size_t)g->n_q_heads, (void **)&kv->lse2))
        goto err_nomem;
    kv->cnt = calloc((size_t)nu, sizeof(int32_t));
    kv->take = calloc((size_t)nu, sizeof(int32_t));
    kv->loff = calloc((size_t)nu + 1, sizeof(int32_t));
    kv->refs = calloc((size_t)kv->cap_refs, sizeof(struct ckv_block_ref));
    kv->h_out1 = calloc((size_t)g->n_q_heads * d, sizeof(float));
    kv->h_out2 = calloc((size_t)g->n_q_heads * d, sizeof(float));
    kv->h_lse1 = calloc((size_t)g->n_q_heads, sizeof(float));
    kv->h_lse2 = calloc((size_t)g->n_q_heads, sizeof(float));
    if (!kv->cnt || !kv->take || !kv->loff || !kv->refs || !kv->h_out1 || !kv->h_out2 ||
        !kv->h_lse1 || !kv->h_lse2)
        goto err_nomem;
    if (o->method == CKV_KV_CLUSTERKV && n_sparse > 0) {
        kv->sink_blk = blocks_of(o->sinks);
        kv->win_blk = blocks_of(o->window);
        kv->res_slots = n_sparse * nkv * (kv->sink_blk + kv->win_blk);
        for (int l = o->full_layers; l < g->n_layers; l++)
            for (int h = 0; h < nkv; h++)
                kv->layers[l].heads[h].res_slot =
                    ((l - o->full_layers) * nkv + h) * (kv->sink_blk + kv->win_blk);
        kv->pool_slots = kv->res_slots;
        if (ckv_dev_alloc(ctx, kv->bb * (size_t)CKV_MAX(kv->pool_slots, 1), &kv->pool) ||
            pool_grow(kv, o->cache_blocks > 0 ? o->cache_blocks : 256))
            goto err_nomem;
    }
    if (o->method == CKV_KV_QUEST && n_sparse > 0) {
        kv->max_pages = blocks_of(g->max_ctx);
        kv->pool_slots = n_sparse * nkv * kv->max_pages;
        size_t pb = (size_t)nkv * kv->max_pages * d * sizeof(float);
        int ns = CKV_MAX(1, o->budget / BT);
        if (ckv_dev_alloc(ctx, kv->bb * (size_t)kv->pool_slots, &kv->pool) ||
            ckv_dev_alloc(ctx, sizeof(int32_t) * (size_t)nu * ns, (void **)&kv->qsel_dev) ||
            ckv_dev_alloc(ctx, sizeof(int32_t) * (size_t)nu, (void **)&kv->qcnt_dev) ||
            !(kv->qsel = calloc((size_t)nu * ns, sizeof(int32_t))) ||
            !(kv->qcnt = calloc((size_t)nu, sizeof(int32_t))))
            goto err_nomem;
        for (int l = o->full_layers; l < g->n_layers; l++)
            if (ckv_dev_alloc(ctx, pb, (void **)&kv->layers[l].pmin) ||
                ckv_dev_alloc(ctx, pb, (void **)&kv->layers[l].pmax))
                goto err_nomem;
    }
    *out = kv;
    return 0;

err_nomem:
    ckv_kvcache_free(&kv);
    return ckv_errorf(-ENOMEM, err, errlen, "kvcache: out of memory for %d tokens", g->max_ctx);
}

static void dfree(ckv_kvcache_t *kv, void *p)
{
    if (p)
        ckv_dev_free(kv->ctx, p);
}

void ckv_kvcache_free(ckv_kvcache_t **pkv)
{
    if (!pkv || !*pkv)
        return;
    ckv_kvcache_t *kv = *pkv;
    if (kv->store && kv->o.method == CKV_KV_CLUSTERKV)
        ckv_block_store_drop(kv->store, kv->seq_uid);
    for (int l = 0; kv->layers && l < kv->g.n_layers; l++) {
        struct kv_layer *L = &kv->layers[l];
        dfree(kv, L->k);
        dfree(kv, L->v);
        dfree(kv, L->pmin);
        dfree(kv, L->pmax);
        dfree(kv, L->head_off_dev);
        dfree(kv, L->cent_all);
        dfree(kv, L->size_all);
        free(L->head_off);
        for (int h = 0; L->heads && h < kv->g.n_kv_heads; h++) {
            struct ckv_head *H = &L->heads[h];
            dfree(kv, H->cent);
            free(H->size);
            free(H->blk0);
            free(H->slots);
            free(H->mem0);
            free(H->members);
            free(H->prev);
            free(H->next);
            free(H->stamp);
        }
        free(L->heads);
    }
    free(kv->layers);
    dfree(kv, kv->pool);
    dfree(kv, kv->sel_dev);
    dfree(kv, kv->cnt_dev);
    dfree(kv, kv->take_dev);
    dfree(kv, kv->refs_dev);
    dfree(kv, kv->loff_dev);
    dfree(kv, kv->out2);
    dfree(kv, kv->lse1);
    dfree(kv, kv->lse2);
    dfree(kv, kv->qsel_dev);
    dfree(kv, kv->qcnt_dev);
    dfree(kv, kv->iota);
    dfree(kv, kv->km_size);
    dfree(kv, kv->km_off);
    dfree(kv, kv->km_mem);
    dfree(kv, kv->spool);
    free(kv->free_slots);
    free(kv->sel);
    free(kv->cnt);
    free(kv->take);
    free(kv->refs);
    free(kv->loff);
    free(kv->mkeys);
    free(kv->mnb);
    free(kv->mdst);
    free(kv->mh);
    free(kv->moff);
    free(kv->pkeys);
    free(kv->pnb);
    free(kv->pptr);
    free(kv->stage);
    free(kv->h_out1);
    free(kv->h_out2);
    free(kv->h_lse1);
    free(kv->h_lse2);
    free(kv->qsel);
    free(kv->qcnt);
    free(kv);
    *pkv = NULL;
}

int ckv_kvcache_n_tokens(const ckv_kvcache_t *kv)
{
    return kv->n_tokens;
}

const struct ckv_kv_opts *ckv_kvcache_opts(const ckv_kvcache_t *kv)
{
    return &kv->o;
}

void ckv_kvcache_stats(const ckv_kvcache_t *kv, struct ckv_kv_stats *out)
{
    *out = kv->st;
}

/* ------------------------------------------------------------------------------------------
 * Appending and prefill
 * ------------------------------------------------------------------------------------------ */

/* Quest: bounds of the page holding position pos of layer L, all KV heads. */
static int quest_update_page(ckv_kvcache_t *kv, struct kv_layer *L, int pos)
{
    int d = kv->g.head_dim, page = pos / BT, p0 = page * BT;
    for (int h = 0; h < kv->g.n_kv_heads; h++) {
        size_t off = ((size_t)h * kv->max_pages + page) * d;
        const char *keys = (const char *)L->k + ((size_t)p0 * kv->row + (size_t)h * d) * kv->esz;
        int rc = ckv_quest_page_bounds(kv->ctx, keys, kv->o.dtype, pos - p0 + 1, d, kv->row,
                                       L->pmin + off, L->pmax + off);
        if (rc)
            return rc;
    }
    return 0;
}

/* Quest: the pool slot of page `page` of (layer l, KV head h). */
static int quest_slot(const ckv_kvcache_t *kv, int l, int h, int page)
{
    return ((l - kv->o.full_layers) * kv->g.n_kv_heads + h) * kv->max_pages + page;
}

/* After prefill: tokens [from, L->n) of a sparse layer l also go to its blocks. */
static int sparse_append(ckv_kvcache_t *kv, int l, int from)
{
    struct kv_layer *L = &kv->layers[l];
    int nkv = kv->g.n_kv_heads, rc = 0;
    for (int p = from; p < L->n && rc == 0; p++) {
        if (kv->o.method == CKV_KV_QUEST) {
            for (int h = 0; h < nkv && rc == 0; h++)
                rc = block_write(kv, L, p, h, quest_slot(kv, l, h, p / BT), p % BT);
            if (rc == 0)
                rc = quest_update_page(kv, L, p);
        } else if (p < kv->o.sinks) {
            /* a prompt shorter than the sinks: the first decoded tokens are sinks too */
            for (int h = 0; h < nkv && rc == 0; h++)
                rc = block_write(kv, L, p, h, L->heads[h].res_slot + p / BT, p % BT);
            L->n_sink = p + 1;
            L->wstart = p + 1;
        } else {
            int t = L->n_win;
            for (int h = 0; h < nkv && rc == 0; h++)
                rc = block_write(kv, L, p, h, L->heads[h].res_slot + kv->sink_blk + t / BT, t % BT);
            L->n_win++;
        }
    }
    return rc;
}

int ckv_kvcache_append(ckv_kvcache_t *kv, int layer, const float *k, const float *v, int n)
{
    if (!kv || layer < 0 || layer >= kv->g.n_layers || !k || !v || n < 1)
        return -EINVAL;
    struct kv_layer *L = &kv->layers[layer];
    /* every layer appends once per step: a layer ahead of the sequence is a caller bug */
    if (L->n != kv->n_tokens)
        return -EINVAL;
    if (n > kv->g.max_ctx - L->n)
        return -ENOSPC;
    int blocks = kv->prefilled && layer_sparse(kv, layer) && kv->o.method != CKV_KV_STREAMING;
    /* the window has room for `window` tokens; end_step empties it when full */
    if (blocks && kv->o.method == CKV_KV_CLUSTERKV &&
        L->n_win + n - CKV_MAX(0, CKV_MIN(n, kv->o.sinks - L->n)) > kv->o.window)
        return -EINVAL;
    size_t off = (size_t)L->n * kv->row * kv->esz, cnt = (size_t)n * kv->row;
    int rc = ckv_convert(kv->ctx, (char *)L->k + off, kv->o.dtype, k, CKV_DTYPE_F32, cnt);
    if (rc == 0)
        rc = ckv_convert(kv->ctx, (char *)L->v + off, kv->o.dtype, v, CKV_DTYPE_F32, cnt);
    if (rc)
        return rc;
    L->n += n;
    if (blocks && (rc = sparse_append(kv, layer, L->n - n))) {
        L->n -= n;
        return rc;
    }
    if (layer == kv->g.n_layers - 1)
        kv->n_tokens = L->n;
    return 0;
}

int ckv_kvcache_attn_prefill(ckv_kvcache_t *kv, int layer, const float *q, int n, float *out)
{
    if (!kv || layer < 0 || layer >= kv->g.n_layers || !q || !out || n < 1)
        return -EINVAL;
    struct kv_layer *L = &kv->layers[layer];
    if (n > L->n)
        return -EINVAL;
    struct ckv_attn_prefill_args a = {
        .n_q_heads = kv->g.n_q_heads,
        .n_kv_heads = kv->g.n_kv_heads,
        .head_dim = kv->g.head_dim,
        .n_new = n,
        .pos0 = L->n - n,
        .q = q,
        .k = L->k,
        .v = L->v,
        .dtype = kv->o.dtype,
        .head_stride = (size_t)kv->g.head_dim,
        .token_stride = kv->row,
        .out = out,
    };
    return ckv_attn_prefill(kv->ctx, &a);
}

/* clusterkv after the prompt: sinks and window into their resident blocks, the rest
 * clustered into the store (see the top of the file for the window's choice). */
static int clusterkv_end_prefill(ckv_kvcache_t *kv, int l)
{
    struct kv_layer *L = &kv->layers[l];
    int n = L->n, rc = 0;
    L->n_sink = CKV_MIN(kv->o.sinks, n);
    int w0 = CKV_MIN(n - L->n_sink, kv->o.window / 2);
    int ncl = n - L->n_sink - w0;
    L->wstart = n - w0;
    L->n_win = w0;
    for (int h = 0; h < kv->g.n_kv_heads && rc == 0; h++) {
        int res = L->heads[h].res_slot;
        rc = pack_range(kv, L, h, 0, L->n_sink, kv->pool, res);
        if (rc == 0)
            rc = pack_range(kv, L, h, L->wstart, w0, kv->pool, res + kv->sink_blk);
    }
    if (rc == 0 && ncl > 0) {
        int C = (ncl + kv->o.tokens_per_cluster - 1) / kv->o.tokens_per_cluster;
        /* written through: the store holds them, the cache keeps what it can (DESIGN.md), so
         * the first decode steps do not recall the whole prompt */
        rc = cluster_range(kv, l, L->n_sink, ncl, C, 1);
    }
    if (rc == 0)
        rc = layer_rebuild(kv, L);
    return rc;
}

static int quest_end_prefill(ckv_kvcache_t *kv, int l)
{
    struct kv_layer *L = &kv->layers[l];
    int rc = 0, d = kv->g.head_dim;
    if (L->n == 0)
        return 0;
    for (int h = 0; h < kv->g.n_kv_heads && rc == 0; h++) {
        rc = pack_range(kv, L, h, 0, L->n, kv->pool, quest_slot(kv, l, h, 0));
        size_t off = (size_t)h * kv->max_pages * d;
        if (rc == 0)
            rc = ckv_quest_page_bounds(kv->ctx, (const char *)L->k + (size_t)h * d * kv->esz,
                                       kv->o.dtype, L->n, d, kv->row, L->pmin + off, L->pmax + off);
    }
    return rc;
}

int ckv_kvcache_end_prefill(ckv_kvcache_t *kv)
{
    if (!kv)
        return -EINVAL;
    if (kv->prefilled)
        return 0;
    int rc = 0;
    for (int l = kv->o.full_layers; l < kv->g.n_layers && rc == 0; l++) {
        if (kv->o.method == CKV_KV_CLUSTERKV)
            rc = clusterkv_end_prefill(kv, l);
        else if (kv->o.method == CKV_KV_QUEST)
            rc = quest_end_prefill(kv, l);
    }
    if (rc)
        return rc;
    kv->prefilled = 1;
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Decode
 * ------------------------------------------------------------------------------------------ */

/* Full attention of layer L's n tokens. */
static int attn_full(ckv_kvcache_t *kv, struct kv_layer *L, const float *q, float *out)
{
    struct ckv_attn_full_args a = {
        .n_q_heads = kv->g.n_q_heads,
        .n_kv_heads = kv->g.n_kv_heads,
        .head_dim = kv->g.head_dim,
        .n_ctx = L->n,
        .q = q,
        .k = L->k,
        .v = L->v,
        .dtype = kv->o.dtype,
        .head_stride = (size_t)kv->g.head_dim,
        .token_stride = kv->row,
        .out = out,
    };
    int rc = ckv_attn_decode_full(kv->ctx, &a);
    if (rc == 0)
        kv->st.attended_tokens += (uint64_t)L->n * (uint64_t)kv->n_units;
    return rc;
}

/* Room for n refs (host and device). */
static int refs_reserve(ckv_kvcache_t *kv, int n)
{
    if (n <= kv->cap_refs)
        return 0;
    int cap = kv->cap_refs;
    while (cap < n)
        cap *= 2;
    int rc = host_resize(&kv->refs, (size_t)cap, sizeof(struct ckv_block_ref));
    if (rc == 0)
        rc = dev_grow(kv->ctx, &kv->refs_dev, 0, sizeof(struct ckv_block_ref) * (size_t)cap);
    if (rc == 0)
        kv->cap_refs = cap;
    return rc;
}

/* Appends the refs of n tokens held in blocks slots[0], slots[1], ... (consecutive from
 * `first` when slots is NULL). Returns refs written. */
static int add_refs(struct ckv_block_ref *r, const int32_t *slots, int first, int n)
{
    int nb = blocks_of(n);
    for (int b = 0; b < nb; b++)
        r[b] = (struct ckv_block_ref){slots ? slots[b] : first + b, b == nb - 1 ? n - b * BT : BT};
    return nb;
}

/* Block attention over the n_units lists in kv->refs / kv->loff. */
static int attn_lists(ckv_kvcache_t *kv, const float *q, float *out)
{
    int nu = kv->n_units;
    int rc = ckv_copy_h2d(kv->ctx, kv->refs_dev, kv->refs,
                          sizeof(struct ckv_block_ref) * (size_t)kv->loff[nu]);
    if (rc == 0)
        rc = ckv_copy_h2d(kv->ctx, kv->loff_dev, kv->loff, sizeof(int32_t) * ((size_t)nu + 1));
    if (rc)
        return rc;
    struct ckv_attn_blocks_args a = {
        .n_q_heads = kv->g.n_q_heads,
        .head_dim = kv->g.head_dim,
        .n_lists = nu,
        .heads_per_list = kv->g.n_q_heads / nu,
        .q = q,
        .pool = kv->pool,
        .dtype = kv->o.dtype,
        .refs = kv->refs_dev,
        .list_offsets = kv->loff_dev,
        .out = out,
    };
    return ckv_attn_decode_blocks(kv->ctx, &a);
}

static int miss_reserve(ckv_kvcache_t *kv, int n)
{
    if (n <= kv->cap_miss)
        return 0;
    int cap = kv->cap_miss > 0 ? kv->cap_miss * 2 : 64;
    while (cap < n)
        cap *= 2;
    if (host_resize(&kv->mkeys, (size_t)cap, sizeof(*kv->mkeys)) ||
        host_resize(&kv->mnb, (size_t)cap, sizeof(int32_t)) ||
        host_resize(&kv->mdst, (size_t)cap, sizeof(void *)) ||
        host_resize(&kv->mh, (size_t)cap, sizeof(int64_t)) ||
        host_resize(&kv->moff, (size_t)cap, sizeof(size_t)))
        return -ENOMEM;
    kv->cap_miss = cap;
    return 0;
}

/* Which clusters of layer L each unit attends: ckv_select_clusters() (the layer has a head
 * with more than `budget` clustered tokens; layers without one attend in full). */
static int clusterkv_select(ckv_kvcache_t *kv, struct kv_layer *L, const float *q)
{
    int nu = kv->n_units, ms = kv->max_sel, rc;
    struct ckv_select_args a = {
        .n_q_heads = kv->g.n_q_heads,
        .n_kv_heads = kv->g.n_kv_heads,
        .head_dim = kv->g.head_dim,
        .mode = kv->o.select_mode,
        .q = q,
        .centroids = L->cent_all,
        .sizes = L->size_all,
        .head_offsets = L->head_off_dev,
        .n_clusters_total = L->n_clu_total,
        .budget = kv->o.budget,
        .max_selected = ms,
        .sel_clusters = kv->sel_dev,
        .sel_count = kv->cnt_dev,
        .sel_last_take = kv->take_dev,
    };
    if ((rc = ckv_select_clusters(kv->ctx, &a)) ||
        (rc = ckv_copy_d2h(kv->ctx, kv->sel, kv->sel_dev, sizeof(int32_t) * (size_t)nu * ms)) ||
        (rc = ckv_copy_d2h(kv->ctx, kv->cnt, kv->cnt_dev, sizeof(int32_t) * (size_t)nu)) ||
        (rc = ckv_copy_d2h(kv->ctx, kv->take, kv->take_dev, sizeof(int32_t) * (size_t)nu)))
        return rc;
    return 0;
}

/* Undoes the cache entries of the first n misses (their data never arrived). */
static void misses_drop(ckv_kvcache_t *kv, int n)
{
    for (int i = 0; i < n; i++)
        cache_drop(kv, kv->mh[i]);
}

/* Looks the selected clusters up in the cache and fetches every miss of the layer with one
 * store get. *n_refs receives the refs the step's lists need. */
static int clusterkv_fetch(ckv_kvcache_t *kv, int l, int *n_refs)
{
    struct kv_layer *L = &kv->layers[l];
    int nu = kv->n_units, ms = kv->max_sel, n_miss = 0, rc = 0, need = 0;
    size_t stage = 0;
    kv->stamp++;
    for (int u = 0; u < nu; u++) {
        int h = unit_head(kv, u);
        struct ckv_head *H = &L->heads[h];
        need += blocks_of(L->n_sink) + blocks_of(L->n_win);
        for (int i = 0; i < kv->cnt[u]; i++) {
            int c = kv->sel[(size_t)u * ms + i] - L->head_off[h];
            int nb = H->blk0[c + 1] - H->blk0[c];
            need += nb;
            if (H->stamp[c] == kv->stamp)
                continue; /* another unit of this step already looked it up */
            H->stamp[c] = kv->stamp;
            int64_t x = handle(kv, l, h, c);
            if (H->slots[H->blk0[c]] >= 0) {
                lru_unlink(kv, x);
                lru_push_front(kv, x);
                kv->st.cache_hits++;
                kv->st.cache_hit_bytes += (uint64_t)nb * kv->bb;
                continue;
            }
            if ((rc = miss_reserve(kv, n_miss + 1)) || (rc = cache_alloc(kv, x))) {
                misses_drop(kv, n_miss);
                return rc;
            }
            kv->mkeys[n_miss] = (struct ckv_cluster_key){kv->seq_uid, l, h, c};
            kv->mh[n_miss] = x;
            kv->moff[n_miss] = stage;
            stage += (size_t)nb * kv->bb;
            n_miss++;
        }
    }
    *n_refs = need;
    if (n_miss == 0)
        return 0;
    if (stage > kv->cap_stage) {
        if ((rc = host_resize(&kv->stage, stage, 1))) {
            misses_drop(kv, n_miss);
            return rc;
        }
        kv->cap_stage = stage;
    }
    for (int i = 0; i < n_miss; i++)
        kv->mdst[i] = kv->stage + kv->moff[i];
    rc = ckv_block_store_get(kv->store, kv->mkeys, kv->mdst, kv->mnb, n_miss);
    for (int i = 0; rc == 0 && i < n_miss; i++) {
        int c;
        struct ckv_head *H = handle_head(kv, kv->mh[i], &c);
        int nb = H->blk0[c + 1] - H->blk0[c];
        if (kv->mnb[i] != nb) {
            rc = -EIO; /* the store holds something else under this key */
            break;
        }
        /* runs of consecutive slots in one copy */
        for (int b = 0; b < nb && rc == 0;) {
            int e = b + 1;
            while (e < nb && H->slots[H->blk0[c] + e] == H->slots[H->blk0[c] + e - 1] + 1)
                e++;
            rc = ckv_copy_h2d(kv->ctx, pool_at(kv, H->slots[H->blk0[c] + b]),
                              kv->stage + kv->moff[i] + (size_t)b * kv->bb,
                              (size_t)(e - b) * kv->bb);
            b = e;
        }
        kv->st.cache_misses++;
        kv->st.cache_miss_bytes += (uint64_t)nb * kv->bb;
    }
    if (rc)
        misses_drop(kv, n_miss);
    return rc;
}

static int clusterkv_decode(ckv_kvcache_t *kv, int l, const float *q, float *out)
{
    struct kv_layer *L = &kv->layers[l];
    int rc, n_refs = 0, nu = kv->n_units, ms;
    if (L->dirty && (rc = layer_rebuild(kv, L)))
        return rc;
    if (L->all_small) {
        /* every head's clusters fit the budget: all of them would be selected, i.e. full
         * attention; the contiguous cache gives it bit for bit (the blocks would sum in
         * cluster order: the same to rounding, but the engine's quantised activations can
         * turn such 1e-6 differences into other greedy tokens at near-ties) */
        uint64_t t0 = ckv_now_ns();
        rc = attn_full(kv, L, q, out);
        kv->st.attn_ms += ms_since(t0);
        return rc;
    }
    ms = kv->max_sel;
    uint64_t t0 = ckv_now_ns();
    if ((rc = clusterkv_select(kv, L, q)))
        return rc;
    uint64_t t1 = ckv_now_ns();
    kv->st.select_ms += (double)(t1 - t0) * 1e-6;
    rc = clusterkv_fetch(kv, l, &n_refs);
    uint64_t t2 = ckv_now_ns();
    kv->st.fetch_ms += (double)(t2 - t1) * 1e-6;
    if (rc || (rc = refs_reserve(kv, n_refs)))
        return rc;
    int n = 0;
    uint64_t attended = 0;
    kv->loff[0] = 0;
    for (int u = 0; u < nu; u++) {
        int h = unit_head(kv, u);
        struct ckv_head *H = &L->heads[h];
        n += add_refs(kv->refs + n, NULL, H->res_slot, L->n_sink);
        attended += (uint64_t)L->n_sink + (uint64_t)L->n_win;
        for (int i = 0; i < kv->cnt[u]; i++) {
            int c = kv->sel[(size_t)u * ms + i] - L->head_off[h];
            int take = i == kv->cnt[u] - 1 ? kv->take[u] : H->size[c];
            n += add_refs(kv->refs + n, H->slots + H->blk0[c], 0, take);
            attended += (uint64_t)take;
        }
        n += add_refs(kv->refs + n, NULL, H->res_slot + kv->sink_blk, L->n_win);
        kv->loff[u + 1] = n;
        kv->st.clusters_selected += (uint64_t)kv->cnt[u];
    }
    rc = attn_lists(kv, q, out);
    kv->st.attn_ms += ms_since(t2);
    if (rc == 0)
        kv->st.attended_tokens += attended;
    return rc;
}

static int quest_decode(ckv_kvcache_t *kv, int l, const float *q, float *out)
{
    struct kv_layer *L = &kv->layers[l];
    int n = L->n, n_pages = blocks_of(n), ns = CKV_MAX(1, kv->o.budget / BT);
    int nu = kv->n_units, G = kv->group, d = kv->g.head_dim, rc = 0;
    int uph = nu / kv->g.n_kv_heads; /* units per KV head */
    int all = n_pages <= ns;
    uint64_t t0 = ckv_now_ns();
    /* one call per KV head: the page bounds are laid out (max_pages, head_dim) per head */
    for (int h = 0; !all && h < kv->g.n_kv_heads && rc == 0; h++) {
        size_t off = (size_t)h * kv->max_pages * d;
        struct ckv_quest_args a = {
            .n_q_heads = G,
            .n_kv_heads = 1,
            .head_dim = d,
            .mode = kv->o.select_mode,
            .q = q + (size_t)h * G * d,
            .page_min = L->pmin + off,
            .page_max = L->pmax + off,
            .n_pages = n_pages,
            .n_select = ns,
            .sel_pages = kv->qsel_dev + (size_t)h * uph * ns,
            .sel_count = kv->qcnt_dev + (size_t)h * uph,
        };
        rc = ckv_quest_select(kv->ctx, &a);
    }
    if (!all && rc == 0 &&
        ((rc = ckv_copy_d2h(kv->ctx, kv->qsel, kv->qsel_dev, sizeof(int32_t) * (size_t)nu * ns)) ||
         (rc = ckv_copy_d2h(kv->ctx, kv->qcnt, kv->qcnt_dev, sizeof(int32_t) * (size_t)nu))))
        return rc;
    if (rc || (rc = refs_reserve(kv, nu * (all ? n_pages : ns))))
        return rc;
    uint64_t t1 = ckv_now_ns();
    kv->st.select_ms += (double)(t1 - t0) * 1e-6;
    int nr = 0;
    uint64_t attended = 0;
    kv->loff[0] = 0;
    for (int u = 0; u < nu; u++) {
        int h = unit_head(kv, u), cnt = all ? n_pages : kv->qcnt[u];
        for (int i = 0; i < cnt; i++) {
            int p = all ? i : kv->qsel[(size_t)u * ns + i];
            int t = p == n_pages - 1 ? n - p * BT : BT;
            kv->refs[nr++] = (struct ckv_block_ref){quest_slot(kv, l, h, p), t};
            attended += (uint64_t)t;
        }
        kv->loff[u + 1] = nr;
    }
    rc = attn_lists(kv, q, out);
    kv->st.attn_ms += ms_since(t1);
    if (rc == 0)
        kv->st.attended_tokens += attended;
    return rc;
}

/* Full attention over positions [p0, p0 + n) of layer L into out (lse optional). */
static int attn_range(ckv_kvcache_t *kv, struct kv_layer *L, int p0, int n, const float *q,
                      float *out, float *lse)
{
    size_t off = (size_t)p0 * kv->row * kv->esz;
    struct ckv_attn_full_args a = {
        .n_q_heads = kv->g.n_q_heads,
        .n_kv_heads = kv->g.n_kv_heads,
        .head_dim = kv->g.head_dim,
        .n_ctx = n,
        .q = q,
        .k = (const char *)L->k + off,
        .v = (const char *)L->v + off,
        .dtype = kv->o.dtype,
        .head_stride = (size_t)kv->g.head_dim,
        .token_stride = kv->row,
        .out = out,
        .lse = lse,
    };
    return ckv_attn_decode_full(kv->ctx, &a);
}

/* StreamingLLM: sinks [0, s) and the recent [n - budget, n), two full-attention calls over
 * the contiguous cache merged by their log-sum-exps (a few hundred floats through the host:
 * simpler than a merge kernel per backend, and negligible next to the attention). */
static int streaming_decode(ckv_kvcache_t *kv, struct kv_layer *L, const float *q, float *out)
{
    int n = L->n, s = CKV_MIN(kv->o.sinks, n), B = kv->o.budget, rc;
    if (n <= s + B)
        return attn_full(kv, L, q, out);
    size_t nq = (size_t)kv->g.n_q_heads, d = (size_t)kv->g.head_dim;
    if (s == 0)
        rc = attn_range(kv, L, n - B, B, q, out, NULL);
    else if ((rc = attn_range(kv, L, 0, s, q, out, kv->lse1)) == 0 &&
             (rc = attn_range(kv, L, n - B, B, q, kv->out2, kv->lse2)) == 0 &&
             (rc = ckv_copy_d2h(kv->ctx, kv->h_out1, out, sizeof(float) * nq * d)) == 0 &&
             (rc = ckv_copy_d2h(kv->ctx, kv->h_out2, kv->out2, sizeof(float) * nq * d)) == 0 &&
             (rc = ckv_copy_d2h(kv->ctx, kv->h_lse1, kv->lse1, sizeof(float) * nq)) == 0 &&
             (rc = ckv_copy_d2h(kv->ctx, kv->h_lse2, kv->lse2, sizeof(float) * nq)) == 0) {
        for (size_t i = 0; i < nq; i++) {
            float a = kv->h_lse1[i], b = kv->h_lse2[i], m = a > b ? a : b;
            float wa = expf(a - m), wb = expf(b - m), inv = 1.0f / (wa + wb);
            for (size_t j = 0; j < d; j++)
                kv->h_out1[i * d + j] =
                    (wa * kv->h_out1[i * d + j] + wb * kv->h_out2[i * d + j]) * inv;
        }
        rc = ckv_copy_h2d(kv->ctx, out, kv->h_out1, sizeof(float) * nq * d);
    }
    if (rc == 0)
        kv->st.attended_tokens += (uint64_t)(s + B) * (uint64_t)kv->n_units;
    return rc;
}

int ckv_kvcache_attn_decode(ckv_kvcache_t *kv, int layer, const float *q, float *out)
{
    if (!kv || layer < 0 || layer >= kv->g.n_layers || !q || !out)
        return -EINVAL;
    struct kv_layer *L = &kv->layers[layer];
    if (L->n < 1)
        return -EINVAL;
    int rc;
    uint64_t t0 = ckv_now_ns();
    if (!layer_sparse(kv, layer) || (!kv->prefilled && kv->o.method != CKV_KV_STREAMING)) {
        /* the full layers, and every layer of a sequence decoded without end_prefill */
        rc = attn_full(kv, L, q, out);
        kv->st.attn_ms += ms_since(t0);
    } else if (kv->o.method == CKV_KV_CLUSTERKV) {
        rc = clusterkv_decode(kv, layer, q, out);
    } else if (kv->o.method == CKV_KV_QUEST) {
        rc = quest_decode(kv, layer, q, out);
    } else {
        rc = streaming_decode(kv, L, q, out);
        kv->st.attn_ms += ms_since(t0);
    }
    if (rc == 0)
        kv->st.decode_attn_calls++;
    return rc;
}

int ckv_kvcache_end_step(ckv_kvcache_t *kv)
{
    if (!kv)
        return -EINVAL;
    if (kv->o.method != CKV_KV_CLUSTERKV || !kv->prefilled)
        return 0;
    for (int l = kv->o.full_layers; l < kv->g.n_layers; l++) {
        struct kv_layer *L = &kv->layers[l];
        if (L->n_win < kv->o.window)
            continue;
        int rc = cluster_range(kv, l, L->wstart, L->n_win, kv->o.window_clusters, 1);
        if (rc)
            return rc;
        L->wstart += L->n_win;
        L->n_win = 0;
    }
    return 0;
}

int ckv_kvcache_clusters(const ckv_kvcache_t *kv, int layer, int kv_head,
                         struct ckv_kv_clusters *out)
{
    if (!kv || !out || kv->o.method != CKV_KV_CLUSTERKV || !kv->prefilled || layer < 0 ||
        layer >= kv->g.n_layers || !layer_sparse(kv, layer) || kv_head < 0 ||
        kv_head >= kv->g.n_kv_heads)
        return -EINVAL;
    const struct kv_layer *L = &kv->layers[layer];
    const struct ckv_head *H = &L->heads[kv_head];
    static const int32_t zero = 0; /* the offsets of a head that never had a cluster */
    *out = (struct ckv_kv_clusters){
        .n_clusters = H->n_clu,
        .sizes = H->size,
        .offsets = H->mem0 ? H->mem0 : &zero,
        .members = H->members,
        .centroids = H->cent,
        .n_sinks = L->n_sink,
        .window_start = L->wstart,
        .n_window = L->n_win,
    };
    return 0;
}
