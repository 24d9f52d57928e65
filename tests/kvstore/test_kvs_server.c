/*
 * Suite "kvs_server": the real ckv-kvstore binary, spawned with a private run directory (mode
 * 0700), a small segment of its own and a spill file in the temporary directory, driven
 * through the client library and raw ZeroMQ sockets: byte-exact round trips through two
 * mappings, spill and restore, kill -9 and restart (also in the middle of spilling), malformed
 * frames of every kind, single-instance locks, --cleanup, orderly exit, stats.
 */
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <zmq.h>

#include "kvs_client.h"
#include "kvs_test.h"

static char dir[256];
static char seg[64];
static char sock_path[512];
static char endpoint[600];
static char spill[300];
static char log_path[300];
static pid_t pids[8];
static int n_pids;

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    kvt_segment_name(seg, sizeof(seg));
    snprintf(sock_path, sizeof(sock_path), "%s/kvstore.sock", dir);
    snprintf(endpoint, sizeof(endpoint), "ipc://%s", sock_path);
    snprintf(spill, sizeof(spill), "%s/spill", dir);
    snprintf(log_path, sizeof(log_path), "%s/kvstore.log", dir);
    n_pids = 0;
}

static void teardown(void)
{
    for (int i = 0; i < n_pids; i++)
        if (pids[i] > 0)
            ckv_test_stop(pids[i], SIGKILL, 2000);
    ckv_shm_unlink(seg); /* even when the test failed midway */
    ckv_test_rmrf(dir);
}

/* The runner's one timeout (see test_kvs_fuzz.c: Criterion leaks with mixed timeouts). */
TestSuite(kvs_server, .init = setup, .fini = teardown, .timeout = 20);

/* Starts ckv-kvstore with a 64-block segment, a 16 MiB spill file and extra options. Returns
 * its pid; with wait, once its socket exists. */
static pid_t start_with(const char *const *extra, bool wait)
{
    char bin[512];
    ckv_test_bin_path("ckv-kvstore", bin, sizeof(bin));
    const char *argv[40] = {bin,      "--run-dir",      dir,    "--segment-name",
                            seg,      "--segment-size", "256k", "--head-dim",
                            "64",     "--spill-file",   spill,  "--spill-size",
                            "16m",    "--mlock",        "no",   "--log-file",
                            log_path, "--lease-ms",     "20000"};
    int n = 19;
    for (int i = 0; extra && extra[i]; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    unlink(sock_path); /* a socket file left by a killed store is no sign of life */
    pid_t pid = ckv_test_spawn((char *const *)argv, log_path);
    cr_assert_gt(pid, 0);
    cr_assert_lt(n_pids, 8);
    pids[n_pids++] = pid;
    if (wait)
        cr_assert_eq(ckv_test_wait_path(sock_path, 20000), 0, "ckv-kvstore did not come up");
    return pid;
}

static pid_t start(void)
{
    return start_with(NULL, true);
}

static void forget_pid(pid_t pid)
{
    for (int i = 0; i < n_pids; i++)
        if (pids[i] == pid)
            pids[i] = 0;
}

static kvs_client_t *connect_client(void)
{
    kvs_client_t *c = NULL;
    int rc = kvs_client_new(endpoint, "test", 10000, &c);
    cr_assert_eq(rc, 0, "kvs_client_new: %s", ckv_strerror(rc));
    return c;
}

static struct kvs_key key(uint64_t seq, uint32_t layer, uint32_t head, uint32_t cl)
{
    struct kvs_key k = {.seq_uid = seq, .layer = layer, .kv_head = head, .cluster_id = cl};
    return k;
}

/* Reserve, fill through the client's mapping, commit. */
static void put(kvs_client_t *c, const struct kvs_key *keys, const uint32_t *ntok, size_t n)
{
    struct kvs_blocks b;
    int rc = kvs_client_reserve(c, keys, ntok, n, &b);
    cr_assert_eq(rc, 0, "reserve: %s (%s)", ckv_strerror(rc), kvs_client_last_error(c));
    uint32_t bb = kvs_client_geometry(c)->block_bytes;
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(b.n_blocks[i], (ntok[i] + 15) / 16);
        for (uint32_t j = 0; j < b.n_blocks[i]; j++)
            kvt_fill(b.block[b.first[i] + j], bb, &keys[i], j);
    }
    uint32_t committed = 0;
    rc = kvs_client_commit(c, b.id, &committed);
    cr_assert_eq(rc, 0, "commit: %s (%s)", ckv_strerror(rc), kvs_client_last_error(c));
    cr_assert_eq(committed, n);
}

/* Fetch (folding in the release of `release`), check every byte; returns the lease. */
static uint64_t get_check(kvs_client_t *c, const struct kvs_key *keys, const uint32_t *ntok,
                          size_t n, uint64_t release)
{
    struct kvs_blocks b;
    int rc = kvs_client_fetch_release(c, keys, n, release, &b);
    cr_assert_eq(rc, 0, "fetch: %s (%s)", ckv_strerror(rc), kvs_client_last_error(c));
    uint32_t bb = kvs_client_geometry(c)->block_bytes;
    cr_assert_eq(b.n, n);
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(b.n_tokens[i], ntok[i]);
        for (uint32_t j = 0; j < b.n_blocks[i]; j++) {
            long bad = kvt_check(b.block[b.first[i] + j], bb, &keys[i], j);
            cr_assert_eq(bad, -1, "cluster (seq %llu, id %u) block %u differs at word %ld",
                         (unsigned long long)keys[i].seq_uid, keys[i].cluster_id, j, bad);
        }
    }
    return b.id;
}

/* A value of key:value stats text ("name:value" at a line start); -1 when absent. */
static double stat_in(const char *text, const char *name)
{
    char needle[96];
    snprintf(needle, sizeof(needle), "\n%s:", name);
    const char *p = strstr(text, needle);
    return p ? strtod(p + strlen(needle), NULL) : -1;
}

static double stat_value(kvs_client_t *c, const char *name)
{
    struct ckv_buf b = {0};
    cr_assert_eq(kvs_client_stats(c, false, &b), 0);
    double v = stat_in(b.data, name);
    ckv_buf_free(&b);
    return v;
}

/* Clusters stored, resident plus spilled, counted in one stats reply. */
static double stored_clusters(kvs_client_t *c)
{
    struct ckv_buf b = {0};
    cr_assert_eq(kvs_client_stats(c, false, &b), 0);
    double v = stat_in(b.data, "clusters_resident") + stat_in(b.data, "clusters_spilled");
    ckv_buf_free(&b);
    return v;
}

/* Waits until the store has no I/O in flight (spills land in the background). */
static void settle(kvs_client_t *c)
{
    for (int i = 0; i < 400 && stat_value(c, "io_in_flight") != 0; i++)
        usleep(5000);
}

static void make_keys(uint64_t seq, int n, struct kvs_key *keys, uint32_t *ntok)
{
    for (int i = 0; i < n; i++) {
        keys[i] = key(seq, (uint32_t)i / 8, (uint32_t)i % 4, (uint32_t)i);
        ntok[i] = 1 + (uint32_t)((i * 37) % 80); /* 1..5 blocks */
    }
}

Test(kvs_server, byte_exact_through_two_mappings)
{
    start();
    kvs_client_t *w = connect_client(), *r = connect_client();
    const struct kvs_geometry *g = kvs_client_geometry(w);
    cr_assert_eq(g->block_bytes, 4096);
    cr_assert_eq(g->block_tokens, 16);
    cr_assert_eq(g->head_dim, 64);
    cr_assert_eq(g->n_blocks, 64);
    cr_assert_eq(g->epoch, 1);
    cr_assert_str_eq(g->segment_name, seg);
    struct stat st;
    char shm_path[128];
    snprintf(shm_path, sizeof(shm_path), "/dev/shm%s", seg);
    cr_assert_eq(stat(shm_path, &st), 0);
    cr_assert_eq(st.st_mode & 0777, 0600, "segment mode %o", st.st_mode & 0777);
    cr_assert_eq(stat(dir, &st), 0);
    cr_assert_eq(st.st_mode & 0777, 0700);

    struct kvs_key keys[16];
    uint32_t ntok[16];
    make_keys(1, 16, keys, ntok);                     /* 44 blocks */
    put(w, keys, ntok, 16);                           /* written through one mapping ... */
    uint64_t lease = get_check(r, keys, ntok, 16, 0); /* ... read through another */
    cr_assert_eq(kvs_client_release(r, lease), 0);
    cr_assert_eq(kvs_client_release(r, lease), -ENOENT);
    cr_assert(strstr(kvs_client_last_error(r), "not found"), "%s", kvs_client_last_error(r));
    uint32_t dropped = 0;
    cr_assert_eq(kvs_client_drop(w, 1, &dropped), 0);
    cr_assert_eq(dropped, 16);
    struct kvs_blocks b;
    cr_assert_eq(kvs_client_fetch(r, keys, 1, &b), -ENOENT);
    cr_assert_eq(stat_value(r, "blocks_used"), 0);
    kvs_client_destroy(&w);
    kvs_client_destroy(&r);
    cr_assert_null(w);
}

Test(kvs_server, segment_far_smaller_than_data_spills_and_restores)
{
    start();
    kvs_client_t *c = connect_client();
    enum { N = 600 }; /* ~1800 blocks through a 64-block segment */
    static struct kvs_key keys[N];
    static uint32_t ntok[N];
    make_keys(2, N, keys, ntok);
    for (int i = 0; i < N; i += 10)
        put(c, keys + i, ntok + i, 10);
    cr_assert_gt(stat_value(c, "spills"), 400);
    uint64_t lease = 0;
    for (int i = 0; i < N / 10; i++) {
        int g = (i * 7) % (N / 10);
        lease = get_check(c, keys + g * 10, ntok + g * 10, 10, lease);
    }
    cr_assert_eq(kvs_client_release(c, lease), 0);
    cr_assert_gt(stat_value(c, "restores"), 400);
    cr_assert_eq(stat_value(c, "restore_errors"), 0);
    cr_assert_eq(stat_value(c, "spill_errors"), 0);
    cr_assert_gt(stat_value(c, "bytes_restored"), 400.0 * 4096);
    kvs_client_destroy(&c);
}

Test(kvs_server, kill9_and_restart_recover_every_committed_cluster)
{
    pid_t pid = start();
    kvs_client_t *c = connect_client();
    enum { N = 300 };
    static struct kvs_key keys[N];
    static uint32_t ntok[N];
    make_keys(3, N, keys, ntok);
    for (int i = 0; i < N; i += 10)
        put(c, keys + i, ntok + i, 10);
    settle(c);
    cr_assert_eq(stored_clusters(c), N);
    double spilled = stat_value(c, "clusters_spilled");
    double resident = stat_value(c, "clusters_resident");
    cr_assert_gt(spilled, 0);
    cr_assert_gt(resident, 0);
    cr_assert_eq(spilled + resident, N);
    /* an uncommitted reservation and an unreleased lease die with the process */
    struct kvs_key pend = key(4, 0, 0, 0);
    uint32_t pn = 40;
    struct kvs_blocks b;
    cr_assert_eq(kvs_client_reserve(c, &pend, &pn, 1, &b), 0);
    uint64_t rsv = b.id;
    uint64_t lease = get_check(c, keys, ntok, 5, 0);
    settle(c); /* the fetch may have restored and evicted: count again */
    spilled = stat_value(c, "clusters_spilled");
    resident = stat_value(c, "clusters_resident");
    cr_assert_eq(spilled + resident, N);

    cr_assert_eq(kill(pid, SIGKILL), 0);
    int status;
    cr_assert_eq(ckv_test_wait(pid, 5000, &status), 0);
    forget_pid(pid);
    cr_assert(WIFSIGNALED(status));
    start();

    /* the same client: its next reply carries epoch 2 and it re-attaches */
    cr_assert_eq(kvs_client_commit(c, rsv, NULL), -ENOENT);
    cr_assert(strstr(kvs_client_last_error(c), "restarted"), "%s", kvs_client_last_error(c));
    cr_assert_eq(kvs_client_release(c, lease), -ENOENT);
    cr_assert_eq(stat_value(c, "recovered_resident"), resident);
    cr_assert_eq(stat_value(c, "recovered_spilled"), spilled);
    cr_assert_eq(stat_value(c, "recovered_reservations_dropped"), 1);
    cr_assert_eq(stat_value(c, "recovered_damaged"), 0);
    cr_assert_eq(kvs_client_fetch(c, &pend, 1, &b), -ENOENT);
    lease = 0;
    for (int i = 0; i < N; i += 10)
        lease = get_check(c, keys + i, ntok + i, 10, lease);
    cr_assert_eq(kvs_client_geometry(c)->epoch, 2, "re-attached at the first reply");
    cr_assert_eq(kvs_client_release(c, lease), 0);
    kvs_client_destroy(&c);
}

/* ---- raw frames ---- */

static void *raw_ctx, *raw;

static void raw_open(void)
{
    raw_ctx = zmq_ctx_new();
    raw = zmq_socket(raw_ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(raw, ZMQ_LINGER, &linger, sizeof(linger));
    cr_assert_eq(zmq_connect(raw, endpoint), 0);
}

static void raw_close(void)
{
    zmq_close(raw);
    zmq_ctx_term(raw_ctx);
}

Test(kvs_server, kill9_in_the_middle_of_spilling)
{
    /* Kill the store while it spills: each round commits clusters, then sends (without
     * waiting) a reservation as big as most of the segment, which makes the store spill ~50
     * blocks at once, and kills it a moment later. After the restarts every cluster whose
     * commit was acknowledged reads back byte for byte. */
    enum { N = 400, KILLS = 4 };
    static struct kvs_key keys[N];
    static uint32_t ntok[N];
    make_keys(5, N, keys, ntok);
    int acked = 0;
    double in_flight_seen = 0;
    kvs_client_t *c = NULL;
    for (int k = 0; k < KILLS; k++) {
        pid_t pid = start();
        if (!c)
            c = connect_client();
        int until = acked + 40 + 9 * k;
        for (; acked < until && acked < N; acked += 4)
            put(c, keys + acked, ntok + acked, 4);
        settle(c);
        struct kvt_msg m;
        struct kvs_key big = key(6, (uint32_t)k, 0, 0);
        uint32_t big_tokens = 16 * 50;
        Ckv__Envelope *env = kvt_reserve(&m, &big, &big_tokens, 1);
        env->version = CKV_PROTOCOL_VERSION;
        uint8_t frame[512];
        size_t len = ckv__envelope__pack(env, frame);
        raw_open();
        cr_assert_eq(zmq_send(raw, frame, len, 0), (int)len);
        /* kill as soon as the reservation waits for its spills */
        for (int i = 0; i < 2000; i++) {
            struct ckv_buf b = {0};
            cr_assert_eq(kvs_client_stats(c, false, &b), 0);
            const char *w = strstr(b.data, "\nrequests_waiting:");
            const char *f = strstr(b.data, "\nio_in_flight:");
            bool waiting = w && atoi(w + 18) > 0;
            if (waiting)
                in_flight_seen += f ? atof(f + 14) : 0;
            ckv_buf_free(&b);
            if (waiting)
                break;
        }
        cr_assert_eq(kill(pid, SIGKILL), 0);
        int status;
        cr_assert_eq(ckv_test_wait(pid, 5000, &status), 0);
        forget_pid(pid);
        raw_close();
    }
    cr_assert_gt(in_flight_seen, 0, "no spill was in flight at any kill");
    start();
    uint64_t lease = 0;
    for (int i = 0; i < acked; i += 4)
        lease = get_check(c, keys + i, ntok + i, 4, lease);
    cr_assert_eq(stat_value(c, "epoch"), KILLS + 1);
    cr_assert_eq(stat_value(c, "recovered_damaged"), 0);
    cr_assert_eq(stored_clusters(c), acked);
    kvs_client_destroy(&c);
}

/* Sends bytes as one frame, returns the reply's error code (-1: not an error, -2: no reply
 * within 3 s). */
static int raw_exchange(const void *bytes, size_t len)
{
    cr_assert_geq(zmq_send(raw, bytes, len, 0), 0);
    zmq_pollitem_t it = {.socket = raw, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, 3000) != 1)
        return -2;
    struct ckv_wire_addr from;
    Ckv__Envelope *rep;
    int rc = ckv_wire_recv(raw, &from, &rep, CKV_WIRE_DEFAULT_MAX_BYTES, 0);
    cr_assert_eq(rc, 0, "reply did not decode: %s", ckv_strerror(rc));
    int code = kvt_error_code(rep);
    ckv_wire_free(rep);
    return code;
}

static int raw_envelope(Ckv__Envelope *env)
{
    uint8_t buf[65536];
    size_t len = ckv__envelope__get_packed_size(env);
    cr_assert_leq(len, sizeof(buf));
    ckv__envelope__pack(env, buf);
    return raw_exchange(buf, len);
}

/* Each bad frame sent gets the expected error code, and is counted. */
#define EXPECT_CODE(got, want)                                                                     \
    do {                                                                                           \
        int code_ = (got);                                                                         \
        cr_assert_eq(code_, (want), "error code %d, expected %d", code_, (int)(want));             \
        sent++;                                                                                    \
    } while (0)

Test(kvs_server, malformed_frames_of_every_kind_get_errors_and_change_nothing)
{
    const char *extra[] = {"--max-msg-size", "65536", "--max-request-clusters", "16", NULL};
    pid_t pid = start_with(extra, true);
    kvs_client_t *c = connect_client();
    struct kvs_key keys[20];
    uint32_t ntok[20];
    make_keys(6, 20, keys, ntok);
    put(c, keys, ntok, 10);
    uint64_t lease = get_check(c, keys, ntok, 3, 0);
    double used = stat_value(c, "blocks_used");
    double errors0 = stat_value(c, "errors");
    raw_open();
    const int MALFORMED = CKV__ERROR_CODE__ERROR_CODE_MALFORMED;
    const int BAD = CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST;
    const int UNKNOWN = CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE;
    int sent = 0;
    /* bytes that are no envelope */
    EXPECT_CODE(raw_exchange("\xff\xff\xff\xff\xff", 5), MALFORMED);
    EXPECT_CODE(raw_exchange("\x0a\x80", 2), MALFORMED);
    /* a valid reserve, truncated at every length that breaks it */
    struct kvt_msg m;
    Ckv__Envelope *env = kvt_reserve(&m, keys + 10, ntok + 10, 3);
    env->version = CKV_PROTOCOL_VERSION;
    env->request_id = 99;
    uint8_t frame[4096];
    size_t flen = ckv__envelope__pack(env, frame);
    int truncated_errors = 0;
    for (size_t cut = 1; cut < flen; cut++) {
        int code = raw_exchange(frame, cut);
        cr_assert_neq(code, -1, "a reserve cut to %zu of %zu bytes was accepted", cut, flen);
        cr_assert_neq(code, -2, "no reply to a reserve cut to %zu bytes", cut);
        truncated_errors++;
        sent++;
    }
    cr_assert_gt(truncated_errors, 10);
    /* wrong version, no body, replies and unknown bodies */
    env->version = 7;
    EXPECT_CODE(raw_exchange(frame, ckv__envelope__pack(env, frame)),
                CKV__ERROR_CODE__ERROR_CODE_BAD_VERSION);
    Ckv__Envelope empty = CKV__ENVELOPE__INIT;
    empty.version = CKV_PROTOCOL_VERSION;
    EXPECT_CODE(raw_envelope(&empty), UNKNOWN);
    EXPECT_CODE(raw_exchange("\x08\x01\x10\x05\xaa\x7f\x02\x08\x01", 9), UNKNOWN);
    Ckv__KvsAck ack = CKV__KVS_ACK__INIT;
    Ckv__KvsHelloReply hr = CKV__KVS_HELLO_REPLY__INIT;
    Ckv__KvsFetchReply fr = CKV__KVS_FETCH_REPLY__INIT;
    Ckv__KvsReserveReply rr = CKV__KVS_RESERVE_REPLY__INIT;
    Ckv__Error er = CKV__ERROR__INIT;
    Ckv__StatsReply sr = CKV__STATS_REPLY__INIT;
    Ckv__Envelope e2 = CKV__ENVELOPE__INIT;
    e2.version = CKV_PROTOCOL_VERSION;
    e2.body_case = CKV__ENVELOPE__BODY_KVS_ACK, e2.kvs_ack = &ack;
    EXPECT_CODE(raw_envelope(&e2), UNKNOWN);
    e2.body_case = CKV__ENVELOPE__BODY_KVS_HELLO_REPLY, e2.kvs_hello_reply = &hr;
    EXPECT_CODE(raw_envelope(&e2), UNKNOWN);
    e2.body_case = CKV__ENVELOPE__BODY_KVS_FETCH_REPLY, e2.kvs_fetch_reply = &fr;
    EXPECT_CODE(raw_envelope(&e2), UNKNOWN);
    e2.body_case = CKV__ENVELOPE__BODY_KVS_RESERVE_REPLY, e2.kvs_reserve_reply = &rr;
    EXPECT_CODE(raw_envelope(&e2), UNKNOWN);
    e2.body_case = CKV__ENVELOPE__BODY_ERROR, e2.error = &er;
    EXPECT_CODE(raw_envelope(&e2), UNKNOWN);
    e2.body_case = CKV__ENVELOPE__BODY_STATS_REPLY, e2.stats_reply = &sr;
    EXPECT_CODE(raw_envelope(&e2), UNKNOWN);
    /* every request type with a bad field */
    struct kvs_key many[17];
    uint32_t manyn[17];
    make_keys(7, 17, many, manyn);
    Ckv__Envelope *bad = kvt_reserve(&m, many, manyn, 17);
    bad->version = CKV_PROTOCOL_VERSION;
    EXPECT_CODE(raw_envelope(bad), BAD); /* too many keys */
    bad = kvt_reserve(&m, many, manyn, 2);
    bad->version = CKV_PROTOCOL_VERSION;
    m.u.reserve.n_n_tokens = 1;
    EXPECT_CODE(raw_envelope(bad), BAD); /* counts disagree */
    m.u.reserve.n_n_tokens = 2;
    m.ntok[1] = 0;
    EXPECT_CODE(raw_envelope(bad), BAD); /* zero tokens */
    m.ntok[1] = 1u << 30;
    EXPECT_CODE(raw_envelope(bad), BAD); /* too many tokens */
    bad = kvt_reserve(&m, keys, ntok, 1);
    bad->version = CKV_PROTOCOL_VERSION;
    EXPECT_CODE(raw_envelope(bad), BAD); /* exists */
    bad = kvt_fetch(&m, keys, 0, 0);
    bad->version = CKV_PROTOCOL_VERSION;
    EXPECT_CODE(raw_envelope(bad), BAD); /* no keys */
    bad = kvt_fetch(&m, many, 17, 0);
    bad->version = CKV_PROTOCOL_VERSION;
    EXPECT_CODE(raw_envelope(bad), BAD); /* too many keys */
    bad = kvt_fetch(&m, keys + 15, 1, 0);
    bad->version = CKV_PROTOCOL_VERSION;
    EXPECT_CODE(raw_envelope(bad), CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND);
    Ckv__Envelope__BodyCase ids[] = {CKV__ENVELOPE__BODY_KVS_COMMIT, CKV__ENVELOPE__BODY_KVS_ABORT,
                                     CKV__ENVELOPE__BODY_KVS_RELEASE};
    for (int i = 0; i < 3; i++) {
        bad = kvt_id(&m, ids[i], 0);
        bad->version = CKV_PROTOCOL_VERSION;
        EXPECT_CODE(raw_envelope(bad), BAD); /* id 0 */
        bad = kvt_id(&m, ids[i], 0xdeadbeef);
        bad->version = CKV_PROTOCOL_VERSION;
        EXPECT_CODE(raw_envelope(bad), CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND);
    }
    /* too large: just above the limit gets an error; far above, ZeroMQ drops the peer */
    static uint8_t big[65536 + 600];
    memset(big, 0x0a, sizeof(big));
    EXPECT_CODE(raw_exchange(big, sizeof(big)), CKV__ERROR_CODE__ERROR_CODE_TOO_LARGE);
    static uint8_t huge[1 << 20];
    cr_assert_eq(raw_exchange(huge, sizeof(huge)), -2, "the peer is disconnected, no reply");
    raw_close();

    /* alive, unchanged, and every bad frame counted */
    int status;
    cr_assert_eq(ckv_test_wait(pid, 0, &status), -ETIMEDOUT, "ckv-kvstore died");
    cr_assert_eq(stat_value(c, "blocks_used"), used);
    cr_assert_eq(stat_value(c, "clusters_resident"), 10);
    cr_assert_eq(stat_value(c, "leases_active"), 1);
    cr_assert_eq(stat_value(c, "reservations_active"), 0);
    cr_assert_eq(stat_value(c, "errors"), errors0 + sent, "errors %f, sent %d",
                 stat_value(c, "errors"), sent);
    get_check(c, keys, ntok, 10, lease);
    kvs_client_destroy(&c);
}

Test(kvs_server, one_store_per_segment_and_endpoint_cleanup_and_orderly_exit)
{
    pid_t a = start();
    /* same segment, other endpoint: refused */
    const char *other_sock[] = {"--socket", "other.sock", NULL};
    pid_t b = start_with(other_sock, false);
    int status;
    cr_assert_eq(ckv_test_wait(b, 20000, &status), 0);
    forget_pid(b);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "status %x", status);
    /* same endpoint, other segment: refused by the endpoint lock */
    char seg2[64];
    kvt_segment_name(seg2, sizeof(seg2));
    const char *other_seg[] = {"--segment-name", seg2, NULL};
    /* start_with() unlinks the socket path; the running store keeps its bound socket */
    b = start_with(other_seg, false);
    cr_assert_eq(ckv_test_wait(b, 20000, &status), 0);
    forget_pid(b);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "status %x", status);
    cr_assert_eq(ckv_shm_unlink(seg2), -ENOENT, "the refused store made no segment");
    /* --cleanup refuses while a store holds the segment */
    const char *cleanup[] = {"--cleanup", NULL};
    b = start_with(cleanup, false);
    cr_assert_eq(ckv_test_wait(b, 20000, &status), 0);
    forget_pid(b);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "status %x", status);

    /* kill -9 leaves the segment; --cleanup removes it and the spill file */
    kill(a, SIGKILL);
    ckv_test_wait(a, 5000, &status);
    forget_pid(a);
    struct ckv_shm shm;
    cr_assert_eq(ckv_shm_open(seg, &shm, NULL, 0), 0, "the segment outlives kill -9");
    ckv_shm_close(&shm);
    b = start_with(cleanup, false);
    cr_assert_eq(ckv_test_wait(b, 20000, &status), 0);
    forget_pid(b);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %x", status);
    cr_assert_eq(ckv_shm_open(seg, &shm, NULL, 0), -ENOENT);
    cr_assert_neq(access(spill, F_OK), 0, "spill file removed");

    /* SIGTERM: orderly exit removes the segment */
    a = start();
    cr_assert_eq(ckv_shm_open(seg, &shm, NULL, 0), 0);
    ckv_shm_close(&shm);
    status = ckv_test_stop(a, SIGTERM, 10000);
    forget_pid(a);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %x", status);
    cr_assert_eq(ckv_shm_open(seg, &shm, NULL, 0), -ENOENT);
}

Test(kvs_server, stats_in_both_formats)
{
    start();
    kvs_client_t *c = connect_client();
    struct kvs_key keys[8];
    uint32_t ntok[8];
    make_keys(8, 8, keys, ntok);
    put(c, keys, ntok, 8);
    uint64_t lease = get_check(c, keys, ntok, 8, 0);
    cr_assert_eq(kvs_client_release(c, lease), 0);
    struct ckv_buf kv = {0}, prom = {0};
    cr_assert_eq(kvs_client_stats(c, false, &kv), 0);
    cr_assert_eq(kvs_client_stats(c, true, &prom), 0);
    const char *fields[] = {"blocks_used:",
                            "blocks_free:",
                            "clusters_resident:",
                            "clusters_spilled:",
                            "fetches:1",
                            "hits:8",
                            "restores:",
                            "bytes_spilled:",
                            "bytes_restored:",
                            "io_latency_us_p50:",
                            "lease_expiries:0",
                            "errors:0",
                            "epoch:1",
                            "commits:1"};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
        cr_assert(strstr(kv.data, fields[i]), "key:value stats lack %s:\n%s", fields[i], kv.data);
    const char *pfields[] = {"# TYPE ckv_kvstore_fetches_total counter", "ckv_kvstore_blocks_used ",
                             "ckv_kvstore_io_latency_us_bucket{le=\"+Inf\"}",
                             "ckv_kvstore_hits_total 8"};
    for (size_t i = 0; i < sizeof(pfields) / sizeof(pfields[0]); i++)
        cr_assert(strstr(prom.data, pfields[i]), "Prometheus stats lack %s", pfields[i]);
    ckv_buf_free(&kv);
    ckv_buf_free(&prom);
    kvs_client_destroy(&c);
}
