/*
 * The store's index: the clusters of the segment (struct ckv_shm_entry, in shared memory) and
 * the process-private state that goes with them, rebuilt from the segment at every start.
 *
 *   in the segment (survives kill -9)      in this process (rebuilt by kvs_index_recover())
 *   ------------------------------------   ---------------------------------------------------
 *   entry: key, n_tokens, state, chains    hash key -> entry, per-sequence lists, LRU list,
 *   block_next[], slot_next[]              free lists of entries / blocks / slots, pins, I/O
 *
 * Entry life: kvs_index_reserve() (RESERVED, blocks granted) -> kvs_index_commit() (RESIDENT,
 * joins the LRU) -> spill_begin/spill_end (SPILLED, blocks freed) -> restore_begin/restore_end
 * (RESIDENT again) ... -> kvs_index_unlink() (FREE in the segment at once; the blocks and slots
 * come back when nothing pins the entry and no I/O is in flight on it).
 *
 * Every transition writes the entry's fields and chains first and publishes the state last
 * (ckv_shm_entry_publish()), so a store killed at any instruction leaves a segment in which
 * every RESIDENT or SPILLED entry is whole (ckv_shm.h).
 *
 * Pins: a reservation, a read lease and a waiting fetch each pin their entries. A pinned entry
 * is never evicted and never freed; an unlinked (dropped) pinned entry is freed at its last
 * unpin. Entries are indices (uint32_t); KVS_NONE ends every list.
 */
#ifndef KVS_INDEX_H
#define KVS_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ckv_shm.h"
#include "kvs_key.h"

#define KVS_NONE UINT32_MAX

enum kvs_io_state {
    KVS_RT_IO_NONE = 0,
    KVS_RT_IO_SPILL = 1,   /* blocks -> slots (io_first: the slot chain) */
    KVS_RT_IO_RESTORE = 2, /* slots -> blocks (io_first: the new block chain) */
};

enum kvs_hold {
    KVS_HOLD_NONE = 0,
    KVS_HOLD_BLOCKS = 1, /* the chain from entry.first_block */
    KVS_HOLD_SLOTS = 2,  /* the chain from entry.first_slot */
};

/* Process-private state of one entry. */
struct kvs_rt {
    uint32_t hash_next;          /* hash chain */
    uint32_t seq_prev, seq_next; /* list of the entries of one sequence */
    uint32_t lru_prev, lru_next; /* LRU list: committed, resident, no I/O, live */
    uint32_t pins;
    uint32_t io_first;    /* head of the I/O's target chain (slots for SPILL, blocks for RESTORE) */
    uint32_t io_left;     /* block I/Os not finished */
    uint32_t io_unissued; /* block I/Os not yet handed to the ring */
    uint32_t io_src;      /* next source block (SPILL) or slot (RESTORE) to issue */
    uint32_t io_dst;      /* next target slot (SPILL) or block (RESTORE) to issue */
    uint32_t ioq_next;    /* queue of entries with unissued I/O */
    int32_t io_err;       /* first error of the running I/O; after a failed restore, its error */
    uint32_t mark;        /* the store's scratch stamp (duplicate detection) */
    uint8_t io;           /* enum kvs_io_state */
    uint8_t hold;         /* enum kvs_hold */
    uint8_t live;         /* in the hash: reserved or committed, not unlinked */
    uint8_t in_lru;
    uint8_t in_ioq;
    struct kvs_seq *seq; /* the sequence's record while live */
};

/* The entries of one sequence. */
struct kvs_seq {
    uint64_t seq_uid;
    uint32_t head; /* first entry */
    uint32_t n;    /* entries */
    struct kvs_seq *next;
};

/* A stack of free ids (entries, blocks or slots). */
struct kvs_ids {
    uint32_t *ids;
    uint32_t n;
    uint32_t cap;
};

struct kvs_index {
    struct ckv_shm *shm;       /* not owned */
    struct ckv_shm_entry *ent; /* (n_entries) in the segment */
    uint32_t *block_next;      /* (n_blocks) in the segment */
    uint32_t *slot_next;       /* (n_slots) in the segment */
    uint32_t n_entries, n_blocks, n_slots;
    uint32_t block_bytes;
    struct kvs_rt *rt; /* (n_entries) */
    uint32_t *hash;    /* (hash_mask + 1) bucket heads */
    uint32_t hash_mask;
    struct kvs_seq **seq_hash; /* (seq_mask + 1) */
    uint32_t seq_mask;
    uint32_t n_seqs;
    struct kvs_ids free_entries, free_blocks, free_slots;
    uint32_t lru_head, lru_tail; /* head: least recently fetched */
    uint64_t evictable_blocks;   /* blocks of LRU entries without pins */
    uint64_t spilling_blocks;    /* blocks of entries being spilled (freed when done) */
    uint64_t restoring_blocks;   /* blocks being filled by restores */
    uint64_t data_blocks;        /* blocks of data held by entries, in memory or spilled */
    uint32_t n_reserved, n_resident, n_spilled; /* live entries by state */
    uint32_t n_unlinked;                        /* entries unlinked but not yet freed */
};

/* What a recovery found. */
struct kvs_recovery {
    uint32_t resident, spilled;    /* committed clusters kept */
    uint32_t reservations_dropped; /* RESERVED entries of the dead epoch, freed */
    uint32_t damaged;              /* entries whose fields or chains were inconsistent, freed */
};

/* Sets up the process-private side for a mapped segment (not owned; must outlive ix) whose
 * index is empty or about to be recovered. Returns 0 or -ENOMEM. */
int kvs_index_init(struct kvs_index *ix, struct ckv_shm *shm);

void kvs_index_free(struct kvs_index *ix);

/* Scans the segment: RESERVED entries are freed (the dead epoch's reservations), RESIDENT and
 * SPILLED entries are checked (fields, chains inside the pool / spill file, no block or slot
 * claimed twice, no key twice) and indexed; damaged ones are freed and logged. Builds the free
 * lists from what is left. Call once, right after kvs_index_init(). */
void kvs_index_recover(struct kvs_index *ix, struct kvs_recovery *rep);

/* The live entry of key k, or KVS_NONE. */
uint32_t kvs_index_find(const struct kvs_index *ix, const struct kvs_key *k);

/* Blocks needed for n_tokens: ceil(n_tokens / 16). */
static inline uint32_t kvs_index_blocks_for(uint32_t n_tokens)
{
    return (n_tokens + CKV_SHM_BLOCK_TOKENS - 1) / CKV_SHM_BLOCK_TOKENS;
}

/* Creates a RESERVED entry for k (not already live) with a fresh block chain, pinned once (by
 * its reservation). The caller checked that an entry and enough free blocks exist. Returns
 * the entry; never fails. */
uint32_t kvs_index_reserve(struct kvs_index *ix, const struct kvs_key *k, uint32_t n_tokens);

/* RESERVED -> RESIDENT (published), joins the LRU tail. */
void kvs_index_commit(struct kvs_index *ix, uint32_t e);

/* Removes a live entry from the index: FREE in the segment at once, out of the hash, its
 * sequence and the LRU. Its blocks or slots come back now when nothing holds it, else at its
 * last unpin or the end of its I/O. */
void kvs_index_unlink(struct kvs_index *ix, uint32_t e);

/* Frees an unlinked entry once no pin and no I/O holds it. Returns true when freed. */
bool kvs_index_maybe_free(struct kvs_index *ix, uint32_t e);

void kvs_index_pin(struct kvs_index *ix, uint32_t e);

/* Drops one pin; frees the entry when it was unlinked and this was the last hold. */
void kvs_index_unpin(struct kvs_index *ix, uint32_t e);

/* Moves a committed resident entry to the LRU tail (most recently fetched). */
void kvs_index_touch(struct kvs_index *ix, uint32_t e);

/* The least recently fetched entry that can be spilled now (committed, resident, unpinned, no
 * I/O), or KVS_NONE. */
uint32_t kvs_index_victim(const struct kvs_index *ix);

/* Starts spilling e (a victim): allocates its slot chain (the caller checked the free slots),
 * leaves the LRU, counts its blocks as spilling. The block I/Os are the caller's. */
void kvs_index_spill_begin(struct kvs_index *ix, uint32_t e);

/* Ends a spill. err 0: SPILLED is published unless the entry was unlinked (then freed) or
 * pinned meanwhile (a fetch came: the spill is abandoned, the entry stays resident); its
 * blocks are freed. err < 0: the slots are freed and the entry stays resident.
 * Returns true when the entry is now spilled. */
bool kvs_index_spill_end(struct kvs_index *ix, uint32_t e, int err);

/* Starts restoring a spilled e: allocates its new block chain (the caller checked the free
 * blocks). The block I/Os are the caller's. */
void kvs_index_restore_begin(struct kvs_index *ix, uint32_t e);

/* Ends a restore. err 0: RESIDENT is published with the new chain, the slots are freed, the
 * entry joins the LRU tail (or is freed when unlinked meanwhile). err < 0: the new blocks are
 * freed, the entry stays spilled and rt.io_err keeps err. Returns true when now resident. */
bool kvs_index_restore_end(struct kvs_index *ix, uint32_t e, int err);

/* Writes the byte offsets of e's blocks (resident) to out (entry.n_blocks of them). */
void kvs_index_block_offsets(const struct kvs_index *ix, uint32_t e, uint64_t *out);

/* The live entries of a sequence, as a list through rt.seq_next; KVS_NONE when none. */
uint32_t kvs_index_seq_head(const struct kvs_index *ix, uint64_t seq_uid);

/* Blocks used (granted, resident, being restored). */
static inline uint64_t kvs_index_blocks_used(const struct kvs_index *ix)
{
    return ix->n_blocks - ix->free_blocks.n;
}

/* Checks every invariant (chains, free lists, counters, hash, lists) in O(entries + blocks +
 * slots). Returns 0, or -EUCLEAN with the first violation in err. For tests and fuzzing. */
int kvs_index_check(const struct kvs_index *ix, char *err, size_t errlen);

#endif
