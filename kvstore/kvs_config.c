/*
 * ckv-kvstore's option table (see kvs_config.h). deploy/kvstore.conf documents every option
 * with its default; keep the two in step.
 */
#include "kvs_config.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_shm.h"

const char *const kvs_config_dtypes[] = {"f16", "bf16", "f32", NULL};

#define C struct kvs_config
const struct ckv_config_opt kvs_config_options[] = {
    CKV_OPT_STRING(C, run_dir, "run-dir", "/tmp/ckv",
                   "directory of the ipc endpoint (created with mode 0700)"),
    CKV_OPT_STRING(C, socket_name, "socket", "kvstore.sock",
                   "endpoint file in run-dir: ipc://<run-dir>/<socket>"),
    CKV_OPT_STRING(C, segment_name, "segment-name", "/ckv-kvstore",
                   "POSIX shared-memory segment name (mode 0600)"),
    CKV_OPT_SIZE(C, pool_bytes, "segment-size", "1g", 64 * 1024, 1ull << 44,
                 "bytes of KV blocks in the segment; the index adds a little on top"),
    CKV_OPT_INT(C, head_dim, "head-dim", "64", 8, 1024,
                "block geometry: head dimension (a multiple of 8)"),
    CKV_OPT_ENUM(C, dtype, "dtype", "f16", kvs_config_dtypes, "block geometry: KV dtype"),
    CKV_OPT_SIZE(C, max_clusters, "max-clusters", "0", 0, 4294967294.0,
                 "index entries; 0: (blocks + spill slots) / 2"),
    CKV_OPT_STRING(C, spill_file, "spill-file", "",
                   "spill file path (preallocated); empty: no spilling"),
    CKV_OPT_SIZE(C, spill_bytes, "spill-size", "4g", 0, 1ull << 46,
                 "bytes of spill slots in the spill file"),
    CKV_OPT_BOOL(C, direct_io, "direct-io", "yes",
                 "open the spill file with O_DIRECT (buffered when the file system refuses)"),
    CKV_OPT_INT(C, io_depth, "io-depth", "64", 32, 4096,
                "io_uring queue depth: block reads and writes in flight"),
    CKV_OPT_DOUBLE(C, high_watermark, "high-watermark", "0.90", 0.05, 1.0,
                   "spill least-recently-fetched clusters above this fraction of blocks used"),
    CKV_OPT_DOUBLE(C, low_watermark, "low-watermark", "0.80", 0.0, 1.0,
                   "... until this fraction is reached"),
    CKV_OPT_INT(C, lease_ms, "lease-ms", "5000", 1, 3600000,
                "read leases of fetch expire after this many milliseconds"),
    CKV_OPT_INT(C, reserve_ms, "reserve-ms", "30000", 1, 3600000,
                "uncommitted reservations expire after this many milliseconds"),
    CKV_OPT_INT(C, io_wait_ms, "io-wait-ms", "10000", 1, 3600000,
                "a request waiting for spill or restore I/O fails after this many milliseconds"),
    CKV_OPT_INT(C, max_request_clusters, "max-request-clusters", "8192", 1, 1 << 20,
                "clusters in one reserve or fetch request, at most"),
    CKV_OPT_INT(C, max_cluster_tokens, "max-cluster-tokens", "65536", 16, 1 << 24,
                "tokens of one cluster, at most"),
    CKV_OPT_INT(C, max_leases, "max-leases", "65536", 1, 1 << 24,
                "read leases outstanding at once; beyond, fetch answers OVERLOADED"),
    CKV_OPT_SIZE(C, max_msg_bytes, "max-msg-size", "4m", 4096, 1ull << 30,
                 "largest request accepted (ZMQ_MAXMSGSIZE)"),
    CKV_OPT_BOOL(C, mlock, "mlock", "yes",
                 "lock the segment in RAM; without the privilege: a warning, and on"),
    CKV_OPT_STRING(C, log_level, "log-level", "info", "debug, info, warn, error or off"),
    CKV_OPT_STRING(C, log_file, "log-file", "", "append logs to this file; empty: stderr"),
    CKV_OPT_END,
};
#undef C

int kvs_config_check(const struct kvs_config *cfg, char *err, size_t errlen)
{
    if (cfg->low_watermark > cfg->high_watermark) {
        snprintf(err, errlen, "low-watermark %.3f is above high-watermark %.3f", cfg->low_watermark,
                 cfg->high_watermark);
        return CKV_ECONFIG;
    }
    uint32_t bb = ckv_shm_block_bytes((uint32_t)cfg->head_dim, (uint32_t)cfg->dtype);
    if (!bb) {
        snprintf(err, errlen, "head-dim %d is not a multiple of 8", cfg->head_dim);
        return CKV_ECONFIG;
    }
    if (cfg->pool_bytes < bb) {
        snprintf(err, errlen, "segment-size %llu holds no block of %u bytes",
                 (unsigned long long)cfg->pool_bytes, bb);
        return CKV_ECONFIG;
    }
    if (cfg->pool_bytes / bb > CKV_SHM_MAX_BLOCKS || cfg->spill_bytes / bb > CKV_SHM_MAX_BLOCKS) {
        snprintf(err, errlen, "more than %u blocks or spill slots", CKV_SHM_MAX_BLOCKS);
        return CKV_ECONFIG;
    }
    if (ckv_shm_name_check(cfg->segment_name)) {
        snprintf(err, errlen, "segment-name '%s': needs a leading '/' and no other '/'",
                 cfg->segment_name);
        return CKV_ECONFIG;
    }
    if (!cfg->run_dir[0] || !cfg->socket_name[0] || strchr(cfg->socket_name, '/')) {
        snprintf(err, errlen, "run-dir must not be empty; socket is a file name without '/'");
        return CKV_ECONFIG;
    }
    /* sockaddr_un.sun_path holds 107 characters and a NUL */
    if (strlen(cfg->run_dir) + 1 + strlen(cfg->socket_name) > 107) {
        snprintf(err, errlen, "run-dir/socket is longer than a unix socket path may be (107)");
        return CKV_ECONFIG;
    }
    if (cfg->spill_file[0] && cfg->spill_bytes < bb) {
        snprintf(err, errlen, "spill-size %llu holds no block of %u bytes",
                 (unsigned long long)cfg->spill_bytes, bb);
        return CKV_ECONFIG;
    }
    return 0;
}
