/*
 * libFuzzer target: ckv-kvstore's request decoder and handler (kvstore/kvs_fuzz.h describes the
 * input format and what is checked). Any broken rule aborts, so libFuzzer keeps the input.
 *
 *   KVS_FUZZ_SEEDS=DIR build-fuzz/bin/fuzz-kvs-request -runs=0   writes the seed inputs to DIR
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_log.h"
#include "kvs_fuzz.h"

static struct kvs_fuzz harness;

static void write_seeds(const char *dir)
{
    static uint8_t buf[1 << 16];
    for (unsigned i = 0;; i++) {
        size_t n = kvs_fuzz_seed(i, buf, sizeof(buf));
        if (!n)
            break;
        char path[512];
        snprintf(path, sizeof(path), "%s/seed-%02u", dir, i);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(buf, 1, n, f) != n) {
            fprintf(stderr, "fuzz-kvs-request: cannot write %s\n", path);
            exit(1);
        }
        fclose(f);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    ckv_log_init("fuzz-kvs-request", CKV_LOG_OFF);
    const char *tmp = getenv("TMPDIR");
    if (kvs_fuzz_init(&harness, tmp && *tmp ? tmp : "/tmp")) {
        fprintf(stderr, "fuzz-kvs-request: harness set-up failed\n");
        exit(1);
    }
    const char *seeds = getenv("KVS_FUZZ_SEEDS");
    if (seeds && *seeds)
        write_seeds(seeds);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512];
    int rc = kvs_fuzz_run(&harness, data, size, err, sizeof(err));
    if (rc == -EUCLEAN) {
        fprintf(stderr, "fuzz-kvs-request: %s\n", err);
        abort();
    }
    return 0;
}
