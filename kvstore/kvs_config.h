/*
 * ckv-kvstore's configuration: one struct, one option table (STYLE.md rule 13), mirrored by
 * the commented example deploy/kvstore.conf. Load with ckv_config_load(kvs_config_options, ...).
 */
#ifndef KVS_CONFIG_H
#define KVS_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "ckv_config.h"

struct kvs_config {
    char run_dir[256];        /* ipc endpoint directory, mode 0700 */
    char socket_name[64];     /* endpoint: ipc://<run_dir>/<socket_name> */
    char segment_name[200];   /* POSIX shm name, "/ckv-kvstore" */
    uint64_t pool_bytes;      /* bytes of blocks in the segment (the index comes on top) */
    int head_dim;             /* block geometry: 16 tokens x head_dim x (K, V) x dtype */
    int dtype;                /* index into kvs_config_dtypes, = enum ckv_shm_dtype */
    uint64_t max_clusters;    /* index entries; 0: (pool blocks + spill slots) / 2 */
    char spill_file[256];     /* "" : no spilling */
    uint64_t spill_bytes;     /* preallocated size of the spill file's slots */
    bool direct_io;           /* try O_DIRECT first */
    int io_depth;             /* io_uring queue depth (block I/Os in flight) */
    double high_watermark;    /* start spilling above this fraction of blocks used */
    double low_watermark;     /* ... down to this fraction */
    int lease_ms;             /* read leases expire after this */
    int reserve_ms;           /* uncommitted reservations expire after this */
    int io_wait_ms;           /* a request waiting for spill I/O fails after this */
    int max_request_clusters; /* clusters per reserve/fetch request */
    int max_cluster_tokens;   /* tokens per cluster */
    int max_leases;           /* leases outstanding at once */
    uint64_t max_msg_bytes;   /* ZMQ_MAXMSGSIZE of the socket */
    bool mlock;               /* lock the segment in RAM (warns and goes on when refused) */
    char log_level[16];
    char log_file[256]; /* "" : stderr */
};

extern const char *const kvs_config_dtypes[]; /* "f16", "bf16", "f32", NULL */
extern const struct ckv_config_opt kvs_config_options[];

/* Checks what the table's bounds cannot: watermarks in order, a spill size that is a whole
 * number of blocks, the segment name. Returns 0 or CKV_ECONFIG with a message in err. */
int kvs_config_check(const struct kvs_config *cfg, char *err, size_t errlen);

#endif
