/*
 * Suite "block_store_kvs": the block store backed by a real ckv-kvstore process (spawned in a
 * private run directory with a small segment of its own): byte-exact round trips, calls split
 * over the store's per-request limit, the interface's error codes (-ENOENT, -EEXIST, -EINVAL)
 * and that a failed put leaves nothing behind, drop, the geometry check, and no store.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block_store.h"
#include "ckv_error.h"
#include "ckv_shm.h"
#include "ckv_test.h"

static char dir[256], seg[64], sock_path[512], endpoint[600], log_path[300];
static pid_t pid;

#define BB 4096 /* head_dim 64, f16: 16 tokens x (K, V) x 64 x 2 bytes */

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    snprintf(seg, sizeof(seg), "/ckv-test-bsk-%d", (int)getpid());
    snprintf(sock_path, sizeof(sock_path), "%s/kvstore.sock", dir);
    snprintf(endpoint, sizeof(endpoint), "ipc://%s", sock_path);
    snprintf(log_path, sizeof(log_path), "%s/kvstore.log", dir);
    pid = 0;
}

static void teardown(void)
{
    if (pid > 0)
        ckv_test_stop(pid, SIGKILL, 2000);
    ckv_shm_unlink(seg);
    ckv_test_rmrf(dir);
}

TestSuite(block_store_kvs, .init = setup, .fini = teardown, .timeout = 20);

/* A 64-block store that takes at most max_req clusters per request. */
static void start(const char *max_req)
{
    char bin[512];
    ckv_test_bin_path("ckv-kvstore", bin, sizeof(bin));
    char *argv[] = {bin,
                    "--run-dir",
                    dir,
                    "--segment-name",
                    seg,
                    "--segment-size",
                    "256k",
                    "--head-dim",
                    "64",
                    "--mlock",
                    "no",
                    "--log-file",
                    log_path,
                    "--max-request-clusters",
                    (char *)max_req,
                    NULL};
    pid = ckv_test_spawn(argv, log_path);
    cr_assert_gt(pid, 0);
    cr_assert_eq(ckv_test_wait_path(sock_path, 10000), 0, "ckv-kvstore did not come up");
}

static struct ckv_block_store *open_store(void)
{
    struct ckv_block_store *s = NULL;
    char err[256] = "";
    int rc = ckv_block_store_kvs_new(endpoint, "test", 5000, BB, &s, err, sizeof(err));
    cr_assert_eq(rc, 0, "ckv_block_store_kvs_new: %s", err);
    cr_assert_eq(s->block_bytes, BB);
    return s;
}

/* A byte pattern depending on the key and the offset. */
static void fill(unsigned char *p, size_t n, const struct ckv_cluster_key *k)
{
    uint32_t x = (uint32_t)(k->seq_uid * 2654435761u) ^
                 (uint32_t)(k->layer * 97 + k->kv_head * 13 + k->cluster_id * 7919);
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        p[i] = (unsigned char)(x >> 24);
    }
}

#define N 12

struct set {
    struct ckv_cluster_key keys[N];
    int32_t nb[N];
    unsigned char *data[N];
};

static void make(struct set *s, uint64_t seq)
{
    for (int i = 0; i < N; i++) {
        s->keys[i] = (struct ckv_cluster_key){seq, i / 4, i % 2, i};
        s->nb[i] = 1 + i % 3;
        s->data[i] = malloc((size_t)s->nb[i] * BB);
        fill(s->data[i], (size_t)s->nb[i] * BB, &s->keys[i]);
    }
}

static void unmake(struct set *s)
{
    for (int i = 0; i < N; i++)
        free(s->data[i]);
}

static void check_get(struct ckv_block_store *st, struct set *s)
{
    void *dst[N];
    int32_t got[N];
    for (int i = 0; i < N; i++)
        dst[i] = calloc((size_t)s->nb[i], BB);
    int rc = ckv_block_store_get(st, s->keys, dst, got, N);
    cr_assert_eq(rc, 0, "get: %s", ckv_strerror(rc));
    for (int i = 0; i < N; i++) {
        cr_assert_eq(got[i], s->nb[i]);
        cr_assert_eq(memcmp(dst[i], s->data[i], (size_t)s->nb[i] * BB), 0, "cluster %d differs", i);
        free(dst[i]);
    }
}

static void round_trip(const char *max_req)
{
    start(max_req);
    struct ckv_block_store *st = open_store();
    struct set s;
    make(&s, 7);
    int rc = ckv_block_store_put(st, s.keys, s.nb, (const void *const *)s.data, N);
    cr_assert_eq(rc, 0, "put: %s", ckv_strerror(rc));
    check_get(st, &s);
    /* a second client (another mapping) sees the same bytes */
    struct ckv_block_store *st2 = open_store();
    check_get(st2, &s);
    struct ckv_block_store_kvs_stats ks;
    cr_assert_eq(ckv_block_store_kvs_stats(st, &ks), 0);
    cr_assert_eq(ks.clusters_put, N);
    cr_assert_eq(ks.blocks_put, 24); /* 1+2+3 four times */
    ckv_block_store_destroy(&st2);
    ckv_block_store_destroy(&st);
    cr_assert_null(st);
    unmake(&s);
}

Test(block_store_kvs, byte_exact_round_trip)
{
    round_trip("8192");
}

Test(block_store_kvs, split_over_request_limit)
{
    round_trip("5"); /* 12 clusters: three requests each way */
}

Test(block_store_kvs, errors_change_nothing)
{
    start("5");
    struct ckv_block_store *st = open_store();
    struct set s;
    make(&s, 9);
    /* unknown key */
    void *dst[1] = {malloc(3 * BB)};
    int32_t got[1];
    cr_assert_eq(ckv_block_store_get(st, s.keys, dst, got, 1), -ENOENT);
    /* put the first 4; then a put of all 12 repeats them: -EEXIST, and the 8 new ones of
     * that call (two requests of it were reserved before the third failed) are not stored */
    cr_assert_eq(ckv_block_store_put(st, s.keys, s.nb, (const void *const *)s.data, 4), 0);
    struct ckv_cluster_key k2[N];
    int32_t nb2[N];
    const void *d2[N];
    for (int i = 0; i < N; i++) { /* the known ones last, so earlier chunks get reserved */
        int j = (i + 4) % N;
        k2[i] = s.keys[j];
        nb2[i] = s.nb[j];
        d2[i] = s.data[j];
    }
    int rc = ckv_block_store_put(st, k2, nb2, d2, N);
    cr_assert_eq(rc, -EEXIST, "put of a duplicate: %s", ckv_strerror(rc));
    cr_assert_eq(ckv_block_store_get(st, &s.keys[4], dst, got, 1), -ENOENT);
    cr_assert_eq(ckv_block_store_get(st, &s.keys[11], dst, got, 1), -ENOENT);
    cr_assert_eq(ckv_block_store_get(st, &s.keys[3], dst, got, 1), 0);
    cr_assert_eq(memcmp(dst[0], s.data[3], (size_t)s.nb[3] * BB), 0);
    /* bad arguments */
    struct ckv_cluster_key bad = {9, -1, 0, 0};
    cr_assert_eq(ckv_block_store_get(st, &bad, dst, got, 1), -EINVAL);
    int32_t zero = 0;
    cr_assert_eq(ckv_block_store_put(st, &s.keys[5], &zero, (const void *const *)&s.data[5], 1),
                 -EINVAL);
    /* drop forgets the sequence */
    cr_assert_eq(ckv_block_store_drop(st, 9), 0);
    cr_assert_eq(ckv_block_store_get(st, &s.keys[3], dst, got, 1), -ENOENT);
    free(dst[0]);
    ckv_block_store_destroy(&st);
    unmake(&s);
}

Test(block_store_kvs, geometry_mismatch)
{
    start("8192");
    struct ckv_block_store *s = NULL;
    char err[256] = "";
    int rc = ckv_block_store_kvs_new(endpoint, "test", 5000, 8192, &s, err, sizeof(err));
    cr_assert_eq(rc, -EINVAL);
    cr_assert_null(s);
    cr_assert(strstr(err, "head_dim"), "message: %s", err);
}

Test(block_store_kvs, no_store)
{
    struct ckv_block_store *s = NULL;
    char err[256] = "";
    int rc = ckv_block_store_kvs_new(endpoint, "test", 300, BB, &s, err, sizeof(err));
    cr_assert_lt(rc, 0);
    cr_assert_null(s);
    cr_assert(strstr(err, endpoint), "message: %s", err);
}
