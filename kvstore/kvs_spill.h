/*
 * The spill file and its io_uring ring: block-sized writes (spill) and reads (restore) between
 * the segment's pool and the file's slots, never blocking the caller.
 *
 * File layout: a 4 KiB header (magic, the owning segment's spill nonce, geometry), then
 * n_slots slots of block_bytes. The file is preallocated at open (fallocate), so a spill never
 * meets a full disk halfway. O_DIRECT is tried first; when the file system answers EINVAL, at
 * open or at the first I/O, the file is reopened buffered and the I/O resubmitted.
 *
 * Use (caller-owned struct, liburing style):
 *
 *   struct kvs_spill sp;
 *   kvs_spill_open(&sp, path, n_slots, block_bytes, true, 64);
 *   struct kvs_io *io = kvs_spill_prep(&sp, KVS_IO_WRITE, buf, slot);   // NULL: ring full
 *   io->entry = e; io->block = b;                                         // the caller's tags
 *   kvs_spill_submit(&sp);                 // one io_uring_submit for everything prepared
 *   ... poll kvs_spill_fd(&sp) for POLLIN, then:
 *   kvs_spill_reap(&sp, on_done, arg);     // on_done(arg, io, 0 or -errno) per finished block
 *   kvs_spill_close(&sp);
 *
 * Short transfers are resubmitted for their remainder; on_done sees whole blocks only.
 */
#ifndef KVS_SPILL_H
#define KVS_SPILL_H

#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>

#include "ckv_stats.h"

#define KVS_SPILL_HEADER_BYTES 4096u
#define KVS_SPILL_MAGIC        0x314c4950535f564bull /* "KV_SPIL1" */

enum kvs_io_kind {
    KVS_IO_READ = 0,  /* slot -> block: restore */
    KVS_IO_WRITE = 1, /* block -> slot: spill */
};

/* One block I/O. Owned by the ring's pool; valid from kvs_spill_prep() to the end of its
 * on_done callback. */
struct kvs_io {
    uint32_t entry;       /* caller's tag: the index entry */
    uint32_t block;       /* caller's tag: the pool block */
    uint32_t slot;        /* spill slot */
    uint8_t kind;         /* enum kvs_io_kind */
    uint8_t direct;       /* last submitted on the O_DIRECT descriptor */
    uint8_t *buf;         /* block_bytes in the segment */
    uint32_t done_bytes;  /* transferred so far */
    uint64_t t_submit_ns; /* for the latency histogram */
    struct kvs_io *next_free;
};

/* The spill file header, at offset 0 of the file. */
struct kvs_spill_header {
    uint64_t magic; /* KVS_SPILL_MAGIC */
    uint64_t nonce; /* == the segment's spill_nonce */
    uint64_t n_slots;
    uint32_t block_bytes;
    uint32_t pad;
    char segment_name[200];
};

struct kvs_spill {
    int fd;      /* the spill file (O_DIRECT when direct) */
    bool direct; /* fd has O_DIRECT */
    char path[256];
    uint32_t block_bytes; /* bytes per slot */
    uint64_t n_slots;
    struct io_uring ring;
    bool ring_ready;
    int efd;            /* eventfd the ring signals on every completion */
    uint32_t depth;     /* I/Os in flight at most */
    uint32_t in_flight; /* prepared and not yet completed */
    uint32_t prepared;  /* prepared since the last submit */
    struct kvs_io *ops; /* (depth) */
    struct kvs_io *free_ops;
    /* stats */
    struct ckv_hist lat_us; /* completion latency of block I/Os, microseconds */
    uint64_t busy_ns[2];    /* time with at least one I/O of a kind in flight */
    uint64_t busy_since_ns[2];
    uint32_t kind_in_flight[2];
    uint64_t ios[2]; /* block I/Os completed, by kind */
    uint64_t io_errors;
    uint64_t short_retries;
    uint64_t submit_calls;
    uint64_t reaps; /* kvs_spill_reap() calls that found completions */
};

/* Opens (creating it with mode 0600 if needed) and preallocates the spill file for n_slots
 * slots, sets up the ring with `depth` entries and its eventfd. With direct, O_DIRECT is tried
 * and probed by writing the header page; EINVAL at open or probe falls back to buffered I/O.
 * The header is written with nonce 0 (unclaimed) only when the file was created; callers then
 * read and write it with kvs_spill_header_read() / kvs_spill_header_write(). Returns 0 or
 * -errno (-ENOSPC when the preallocation does not fit). On error sp is closed. */
int kvs_spill_open(struct kvs_spill *sp, const char *path, uint64_t n_slots, uint32_t block_bytes,
                   bool direct, uint32_t depth);

/* Reads the file header. Returns 0, or -EIO for a short read. Blocking: start-up only. */
int kvs_spill_header_read(struct kvs_spill *sp, struct kvs_spill_header *h);

/* Writes the file header. Returns 0 or -errno. Blocking: start-up only. */
int kvs_spill_header_write(struct kvs_spill *sp, const struct kvs_spill_header *h);

/* Closes the ring, eventfd and file; waits for nothing (the kernel finishes in-flight I/O on
 * its own). Safe on a zeroed or closed struct. */
void kvs_spill_close(struct kvs_spill *sp);

/* The eventfd to poll for completions. */
static inline int kvs_spill_fd(const struct kvs_spill *sp)
{
    return sp->efd;
}

/* Free room for more I/Os. */
static inline uint32_t kvs_spill_room(const struct kvs_spill *sp)
{
    return sp->depth - sp->in_flight;
}

/* Prepares one block I/O between buf (block_bytes, 512-aligned) and slot; NULL when depth
 * I/Os are in flight. Nothing reaches the kernel before kvs_spill_submit(). */
struct kvs_io *kvs_spill_prep(struct kvs_spill *sp, enum kvs_io_kind kind, uint8_t *buf,
                              uint32_t slot);

/* Submits everything prepared in one system call. Returns 0 or -errno. */
int kvs_spill_submit(struct kvs_spill *sp);

typedef void (*kvs_spill_done_fn)(void *arg, struct kvs_io *io, int res);

/* Clears the eventfd and handles every completion: short transfers and O_DIRECT refusals are
 * resubmitted; finished blocks go to done(arg, io, 0 or -errno), after which io is recycled.
 * Returns the number of finished blocks. Never blocks. */
int kvs_spill_reap(struct kvs_spill *sp, kvs_spill_done_fn done, void *arg);

#endif
