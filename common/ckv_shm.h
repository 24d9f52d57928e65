/*
 * The KV store's shared-memory segment: its layout and how to map it (DESIGN.md, "The KV
 * store"). ckv-kvstore creates the segment and owns the index inside it; a worker maps the same
 * segment read/write through kvstore/kvs_client.h and touches only the blocks it was granted.
 *
 * Layout (every offset from the start of the segment; every region page aligned):
 *
 *   0                  struct ckv_shm_header, one page
 *   index_offset       struct ckv_shm_entry[max_clusters]   the cluster index
 *   block_next_offset  uint32_t[n_blocks]                   block chains: next block of a cluster
 *   slot_next_offset   uint32_t[n_spill_slots]              slot chains in the spill file
 *   pool_offset        n_blocks blocks of block_bytes       the KV data
 *
 * A block holds CKV_SHM_BLOCK_TOKENS tokens of one (sequence, layer, KV head): K rows then V
 * rows, (2, 16, head_dim) in the dtype, so 4 KiB for head_dim 64 f16 and 8 KiB for head_dim
 * 128. A cluster is a chain of blocks: entry.first_block, then block_next[b] until n_blocks
 * blocks are walked (the chain of a spilled cluster runs through slot_next from first_slot).
 *
 * Crash safety (kill -9 of the store): the segment outlives the process in /dev/shm, so every
 * store the dead process made is there for the next one, in program order as long as the
 * compiler kept it. Each entry's `state` is therefore written last, with a release store,
 * after every other field of the entry and its chain: a restarted store trusts exactly the
 * entries whose state is RESIDENT or SPILLED, and rebuilds its allocators from their chains.
 * The header's magic is likewise written last at creation: a segment without it is half-made.
 */
#ifndef CKV_SHM_H
#define CKV_SHM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CKV_SHM_MAGIC          0x314d48535f564b43ull /* "CKV_SHM1" in little-endian bytes */
#define CKV_SHM_LAYOUT_VERSION 1u
#define CKV_SHM_BLOCK_TOKENS   16u
#define CKV_SHM_PAGE           4096u
#define CKV_SHM_NONE           UINT32_MAX /* end of a chain, no block, no slot */
#define CKV_SHM_NAME_MAX       200        /* bytes of a segment name, '/' included */
#define CKV_SHM_MAX_BLOCKS     (UINT32_MAX - 1u)

/* KV dtypes; the values match proto/kvstore.proto's KvsDtype. */
enum ckv_shm_dtype {
    CKV_SHM_F16 = 0,
    CKV_SHM_BF16 = 1,
    CKV_SHM_F32 = 2,
};

/* Entry states. Zero is FREE so that a fresh (zero-filled) segment has an empty index. */
enum ckv_shm_state {
    CKV_SHM_FREE = 0,
    CKV_SHM_RESERVED = 1, /* blocks granted, not committed: discarded by a restart */
    CKV_SHM_RESIDENT = 2, /* committed, data in the block chain from first_block */
    CKV_SHM_SPILLED = 3,  /* committed, data in the spill file's slot chain from first_slot */
};

/* What the creator of a segment asks for. */
struct ckv_shm_geometry {
    uint32_t head_dim;      /* 8..1024, a multiple of 8 */
    uint32_t dtype;         /* enum ckv_shm_dtype */
    uint64_t n_blocks;      /* blocks in the pool, >= 1 */
    uint64_t max_clusters;  /* index entries, >= 1 */
    uint64_t n_spill_slots; /* slots of the spill file (0: no spill file) */
};

/* At offset 0 of the segment. Fields never move; new ones go at the end (layout_version). */
struct ckv_shm_header {
    uint64_t magic;          /* CKV_SHM_MAGIC, written last at creation */
    uint32_t layout_version; /* CKV_SHM_LAYOUT_VERSION */
    uint32_t header_bytes;   /* sizeof(struct ckv_shm_header) of the creator */
    uint64_t epoch;          /* bumped (atomically) at every store start; read with acquire */
    uint64_t segment_bytes;  /* the whole mapping */
    uint32_t block_tokens;   /* CKV_SHM_BLOCK_TOKENS */
    uint32_t head_dim;
    uint32_t dtype;       /* enum ckv_shm_dtype */
    uint32_t block_bytes; /* block_tokens * head_dim * 2 * dtype bytes */
    uint64_t n_blocks;
    uint64_t max_clusters;
    uint64_t n_spill_slots;
    uint64_t index_offset;      /* struct ckv_shm_entry[max_clusters] */
    uint64_t block_next_offset; /* uint32_t[n_blocks] */
    uint64_t slot_next_offset;  /* uint32_t[n_spill_slots] */
    uint64_t pool_offset;       /* the blocks */
    uint64_t spill_nonce;       /* names the spill file that holds this segment's slots */
    uint64_t created_wall_ms;   /* wall clock at creation, for humans */
    uint32_t store_pid;         /* pid of the store that last bumped the epoch, for humans */
    uint32_t pad0;
};

/* One cluster of the index, 40 bytes. Only `state` is atomic; see the crash-safety note. */
struct ckv_shm_entry {
    uint32_t state;    /* enum ckv_shm_state; written last, with a release store */
    uint32_t n_tokens; /* tokens of the cluster, >= 1 */
    uint64_t seq_uid;
    uint32_t layer;
    uint32_t kv_head;
    uint32_t cluster_id;
    uint32_t n_blocks;    /* ceil(n_tokens / block_tokens) */
    uint32_t first_block; /* RESIDENT, RESERVED: first block of the chain */
    uint32_t first_slot;  /* SPILLED: first slot of the chain */
};

/* A mapping of a segment: caller-owned, filled by ckv_shm_create() or ckv_shm_open(). */
struct ckv_shm {
    int fd;                     /* the shm file, kept open (the store holds a lock on it) */
    uint8_t *base;              /* the mapping, segment_bytes long */
    size_t bytes;               /* mapped bytes */
    struct ckv_shm_header *hdr; /* == base */
};

/* Bytes per element of a dtype (2, 2, 4), or 0 for an unknown one. */
uint32_t ckv_shm_dtype_bytes(uint32_t dtype);

/* Name of a dtype ("f16", "bf16", "f32", "?"). */
const char *ckv_shm_dtype_name(uint32_t dtype);

/* Bytes of one block: 16 tokens x head_dim x (K, V) x dtype. 0 for a bad geometry. */
uint32_t ckv_shm_block_bytes(uint32_t head_dim, uint32_t dtype);

/* Checks a segment name: "/" then 1..CKV_SHM_NAME_MAX-1 characters without another '/'.
 * Returns 0 or -EINVAL. */
int ckv_shm_name_check(const char *name);

/* Computes the layout of a segment for geometry g into *h (every field but magic, epoch,
 * spill_nonce, created_wall_ms and store_pid). Returns 0, -EINVAL for a bad geometry (head_dim
 * not a multiple of 8, unknown dtype, zero blocks or entries, more than CKV_SHM_MAX_BLOCKS
 * blocks or slots) or -EOVERFLOW when the segment would not fit in 2^46 bytes. */
int ckv_shm_layout(const struct ckv_shm_geometry *g, struct ckv_shm_header *h);

/* Creates segment `name` (mode 0600; it must not exist) sized and laid out as `layout` (from
 * ckv_shm_layout()), maps it read/write and writes the header, magic last, with epoch = 1.
 * The pool and index are the zero pages of a fresh shm file: nothing is touched. On success
 * *s owns the fd and the mapping (ckv_shm_close()). Returns 0, -EEXIST, or -errno. */
int ckv_shm_create(const char *name, const struct ckv_shm_header *layout, uint64_t spill_nonce,
                   struct ckv_shm *s);

/* Maps an existing segment read/write and checks its header against the file: magic, layout
 * version, block geometry, regions inside the file and in order. On success *s owns the fd
 * and mapping. Returns 0, -ENOENT (no such segment), -EACCES, CKV_EFORMAT (not a valid
 * segment: half-made, foreign or damaged; err says what) or -errno. err may be NULL. */
int ckv_shm_open(const char *name, struct ckv_shm *s, char *err, size_t errlen);

/* Unmaps and closes; the segment itself stays. Safe on a zeroed or closed struct. */
void ckv_shm_close(struct ckv_shm *s);

/* Removes segment `name`. Returns 0, -ENOENT or -errno. */
int ckv_shm_unlink(const char *name);

/* The epoch, read with acquire. */
uint64_t ckv_shm_epoch(const struct ckv_shm *s);

static inline struct ckv_shm_entry *ckv_shm_entries(const struct ckv_shm *s)
{
    return (struct ckv_shm_entry *)(s->base + s->hdr->index_offset);
}

static inline uint32_t *ckv_shm_block_next(const struct ckv_shm *s)
{
    return (uint32_t *)(s->base + s->hdr->block_next_offset);
}

static inline uint32_t *ckv_shm_slot_next(const struct ckv_shm *s)
{
    return (uint32_t *)(s->base + s->hdr->slot_next_offset);
}

/* Byte offset of block b from the start of the segment (what replies carry). */
static inline uint64_t ckv_shm_block_offset(const struct ckv_shm_header *h, uint32_t b)
{
    return h->pool_offset + (uint64_t)b * h->block_bytes;
}

/* Address of block b in this mapping. */
static inline uint8_t *ckv_shm_block(const struct ckv_shm *s, uint32_t b)
{
    return s->base + ckv_shm_block_offset(s->hdr, b);
}

/* The entry state, read with acquire (pairs with ckv_shm_entry_publish()). */
static inline uint32_t ckv_shm_entry_state(const struct ckv_shm_entry *e)
{
    return __atomic_load_n(&e->state, __ATOMIC_ACQUIRE);
}

/* Publishes a new state with a release store: every earlier write of this process (the entry's
 * other fields, its chain) is in the segment before the new state is. */
static inline void ckv_shm_entry_publish(struct ckv_shm_entry *e, uint32_t state)
{
    __atomic_store_n(&e->state, state, __ATOMIC_RELEASE);
}

#endif
