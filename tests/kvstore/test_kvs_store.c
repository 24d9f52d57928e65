/*
 * Suite "kvs_store": the store in-process (no socket), driven with real envelopes: byte-exact
 * reserve/commit/fetch, out-of-order and bad requests that change nothing, lease and
 * reservation expiry, drop, leases against eviction, spill and restore through a segment far
 * smaller than the data, full segment and spill file, recovery after a close without cleanup.
 * After every test the index invariants are checked (kvs_store_check()).
 */
#include "ckv_log.h"
#include "kvs_test.h"

static char dir[256];
static struct kvt t;

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    memset(&t, 0, sizeof(t));
    ckv_log_init("kvs_store", CKV_LOG_ERROR); /* the refusals below log warnings by design */
}

static void teardown(void)
{
    if (t.s) {
        char err[256];
        int rc = kvs_store_check(t.s, err, sizeof(err));
        kvt_close(&t, true);
        cr_expect_eq(rc, 0, "index check: %s", err);
    }
    if (t.cfg.segment_name[0])
        ckv_shm_unlink(t.cfg.segment_name); /* also when the test failed midway */
    ckv_test_rmrf(dir);
}

/* The runner's one timeout (see test_kvs_fuzz.c: Criterion leaks with mixed timeouts). */
TestSuite(kvs_store, .init = setup, .fini = teardown, .timeout = 20);

static void check_index(void)
{
    char err[256];
    cr_assert_eq(kvs_store_check(t.s, err, sizeof(err)), 0, "index check: %s", err);
}

static struct kvs_key key(uint64_t seq, uint32_t layer, uint32_t head, uint32_t cl)
{
    struct kvs_key k = {.seq_uid = seq, .layer = layer, .kv_head = head, .cluster_id = cl};
    return k;
}

/* Reserves n clusters, fills every block with the pattern, commits. Returns the reservation
 * id (already committed). */
static uint64_t put(const struct kvs_key *keys, const uint32_t *ntok, size_t n)
{
    struct kvt_msg m;
    Ckv__Envelope *r = kvt_call(&t, kvt_reserve(&m, keys, ntok, n));
    cr_assert_eq(r->body_case, CKV__ENVELOPE__BODY_KVS_RESERVE_REPLY, "reserve: %s",
                 r->body_case == CKV__ENVELOPE__BODY_ERROR ? r->error->message : "?");
    const Ckv__KvsReserveReply *rr = r->kvs_reserve_reply;
    const struct ckv_shm *shm = kvs_store_shm(t.s);
    uint32_t bb = shm->hdr->block_bytes;
    cr_assert_eq(rr->n_n_blocks, n);
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(rr->n_blocks[i], (ntok[i] + 15) / 16);
        for (uint32_t j = 0; j < rr->n_blocks[i]; j++, off++) {
            cr_assert_lt(off, rr->n_block_offset);
            uint64_t o = rr->block_offset[off];
            cr_assert_geq(o, shm->hdr->pool_offset);
            cr_assert_eq((o - shm->hdr->pool_offset) % bb, 0);
            kvt_fill(shm->base + o, bb, &keys[i], j);
        }
    }
    cr_assert_eq(off, rr->n_block_offset);
    uint64_t id = rr->reservation_id;
    ckv_wire_free(r);
    r = kvt_call(&t, kvt_id(&m, CKV__ENVELOPE__BODY_KVS_COMMIT, id));
    cr_assert_eq(r->body_case, CKV__ENVELOPE__BODY_KVS_ACK, "commit: error %d", kvt_error_code(r));
    cr_assert_eq(r->kvs_ack->count, n);
    ckv_wire_free(r);
    return id;
}

/* Fetches n clusters, checks tokens and every byte; returns the lease (not released). */
static uint64_t get_check(const struct kvs_key *keys, const uint32_t *ntok, size_t n,
                          uint64_t release, uint32_t *restored)
{
    struct kvt_msg m;
    Ckv__Envelope *r = kvt_call(&t, kvt_fetch(&m, keys, n, release));
    cr_assert_eq(r->body_case, CKV__ENVELOPE__BODY_KVS_FETCH_REPLY, "fetch: %s",
                 r->body_case == CKV__ENVELOPE__BODY_ERROR ? r->error->message : "?");
    const Ckv__KvsFetchReply *fr = r->kvs_fetch_reply;
    const struct ckv_shm *shm = kvs_store_shm(t.s);
    uint32_t bb = shm->hdr->block_bytes;
    cr_assert_eq(fr->n_n_tokens, n);
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(fr->n_tokens[i], ntok[i]);
        cr_assert_eq(fr->n_blocks[i], (ntok[i] + 15) / 16);
        for (uint32_t j = 0; j < fr->n_blocks[i]; j++, off++) {
            long bad = kvt_check(shm->base + fr->block_offset[off], bb, &keys[i], j);
            cr_assert_eq(bad, -1, "cluster %zu (seq %llu id %u) block %u differs at word %ld", i,
                         (unsigned long long)keys[i].seq_uid, keys[i].cluster_id, j, bad);
        }
    }
    cr_assert_eq(off, fr->n_block_offset);
    uint64_t lease = fr->lease_id;
    if (restored)
        *restored = fr->restored;
    ckv_wire_free(r);
    return lease;
}

static void ack_ok(Ckv__Envelope *req, uint32_t count)
{
    Ckv__Envelope *r = kvt_call(&t, req);
    cr_assert_eq(r->body_case, CKV__ENVELOPE__BODY_KVS_ACK, "%s: error %d %s",
                 kvs_proto_body_name(req->body_case), kvt_error_code(r),
                 r->body_case == CKV__ENVELOPE__BODY_ERROR ? r->error->message : "");
    cr_assert_eq(r->kvs_ack->count, count);
    ckv_wire_free(r);
}

static void expect_error(Ckv__Envelope *req, Ckv__ErrorCode code, const char *needle)
{
    Ckv__Envelope *r = kvt_call(&t, req);
    cr_assert_eq(kvt_error_code(r), (int)code, "%s: expected error %d, got body %d (%s)",
                 kvs_proto_body_name(req->body_case), (int)code, (int)r->body_case,
                 r->body_case == CKV__ENVELOPE__BODY_ERROR ? r->error->message : "");
    if (needle)
        cr_assert(strstr(r->error->message, needle), "message '%s' lacks '%s'", r->error->message,
                  needle);
    ckv_wire_free(r);
}

/* Counters that a failed request must leave alone. */
static void snapshot(struct kvs_store_info *in)
{
    kvs_store_info(t.s, in);
}

static void expect_unchanged(const struct kvs_store_info *a)
{
    struct kvs_store_info b;
    kvs_store_info(t.s, &b);
    cr_assert_eq(a->blocks_used, b.blocks_used);
    cr_assert_eq(a->slots_used, b.slots_used);
    cr_assert_eq(a->clusters_reserved, b.clusters_reserved);
    cr_assert_eq(a->clusters_resident, b.clusters_resident);
    cr_assert_eq(a->clusters_spilled, b.clusters_spilled);
    cr_assert_eq(a->leases, b.leases);
    cr_assert_eq(a->reservations, b.reservations);
    check_index();
}

Test(kvs_store, reserve_commit_fetch_byte_exact)
{
    kvt_config(&t.cfg, dir, 1 << 20, 0);
    cr_assert_eq(kvt_open(&t), 0);
    struct kvs_key keys[6];
    uint32_t ntok[6] = {1, 15, 16, 17, 100, 256};
    for (int i = 0; i < 6; i++)
        keys[i] = key(42, 3, (uint32_t)i % 2, (uint32_t)i);
    put(keys, ntok, 6);
    struct kvs_store_info in;
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.clusters_resident, 6);
    cr_assert_eq(in.blocks_used, 1 + 1 + 1 + 2 + 7 + 16);
    /* in another order, and a subset */
    struct kvs_key rk[3] = {keys[5], keys[0], keys[3]};
    uint32_t rt[3] = {ntok[5], ntok[0], ntok[3]};
    uint64_t lease = get_check(rk, rt, 3, 0, NULL);
    ack_ok(kvt_id(&(struct kvt_msg){0}, CKV__ENVELOPE__BODY_KVS_RELEASE, lease), 3);
    /* fetch with the release of the previous lease folded in */
    uint64_t l1 = get_check(keys, ntok, 6, 0, NULL);
    uint64_t l2 = get_check(rk, rt, 3, l1, NULL);
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.leases, 1, "the folded release ended the first lease");
    ack_ok(kvt_id(&(struct kvt_msg){0}, CKV__ENVELOPE__BODY_KVS_RELEASE, l2), 3);
    check_index();
}

Test(kvs_store, out_of_order_and_bad_requests_change_nothing)
{
    kvt_config(&t.cfg, dir, 1 << 20, 0);
    t.cfg.max_request_clusters = 8;
    t.cfg.max_cluster_tokens = 64;
    cr_assert_eq(kvt_open(&t), 0);
    struct kvs_key k[2] = {key(1, 0, 0, 0), key(1, 0, 0, 1)};
    uint32_t n[2] = {20, 40};
    uint64_t committed = put(k, n, 2);
    /* an open reservation and an open lease, to show they are untouched too */
    struct kvt_msg m;
    struct kvs_key k3 = key(1, 0, 0, 3);
    uint32_t n3 = 5;
    Ckv__Envelope *r = kvt_call(&t, kvt_reserve(&m, &k3, &n3, 1));
    cr_assert_eq(r->body_case, CKV__ENVELOPE__BODY_KVS_RESERVE_REPLY);
    uint64_t open_rsv = r->kvs_reserve_reply->reservation_id;
    ckv_wire_free(r);
    uint64_t lease = get_check(k, n, 2, 0, NULL);

    struct kvs_store_info before;
    snapshot(&before);
    const Ckv__ErrorCode NOT_FOUND = CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND;
    const Ckv__ErrorCode BAD = CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST;
    /* commit twice, commit/abort/release of ids never granted or of the wrong kind */
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_COMMIT, committed), NOT_FOUND, "not found");
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_ABORT, committed), NOT_FOUND, NULL);
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_COMMIT, lease), NOT_FOUND, NULL);
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_RELEASE, open_rsv), NOT_FOUND, NULL);
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_RELEASE, 12345), NOT_FOUND, "never granted");
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_COMMIT, 0), BAD, "reservation_id 0");
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_RELEASE, 0), BAD, "lease_id 0");
    /* fetch: unknown cluster, uncommitted cluster, duplicates, unknown lease to release */
    struct kvs_key bad[2] = {k[0], key(9, 9, 9, 9)};
    expect_error(kvt_fetch(&m, bad, 2, 0), NOT_FOUND, "not found");
    expect_error(kvt_fetch(&m, &k3, 1, 0), NOT_FOUND, "not committed");
    struct kvs_key dup[2] = {k[1], k[1]};
    expect_error(kvt_fetch(&m, dup, 2, 0), BAD, "twice");
    expect_error(kvt_fetch(&m, k, 2, 777), NOT_FOUND, "lease to release");
    expect_error(kvt_fetch(&m, k, 0, 0), BAD, "no keys");
    kvt_fetch(&m, k, 2, 0);
    m.keys.n_kv_head = 1;
    expect_error(&m.env, BAD, "different lengths");
    m.keys.n_kv_head = 2;
    m.u.fetch.keys = NULL;
    expect_error(&m.env, BAD, "no keys");
    struct kvs_key many[9];
    uint32_t manyn[9];
    for (int i = 0; i < 9; i++) {
        many[i] = key(5, 0, 0, (uint32_t)i);
        manyn[i] = 1;
    }
    expect_error(kvt_fetch(&m, many, 9, 0), BAD, "at most 8");
    /* reserve: existing, reserved, duplicate, token counts out of range, count mismatch */
    expect_error(kvt_reserve(&m, k, n, 1), BAD, "already stored");
    expect_error(kvt_reserve(&m, &k3, &n3, 1), BAD, "already reserved");
    struct kvs_key d2[2] = {key(7, 0, 0, 0), key(7, 0, 0, 0)};
    expect_error(kvt_reserve(&m, d2, n, 2), BAD, "twice");
    uint32_t zero = 0, big = 65;
    expect_error(kvt_reserve(&m, many, &zero, 1), BAD, "0 tokens");
    expect_error(kvt_reserve(&m, many, &big, 1), BAD, "65 tokens");
    expect_error(kvt_reserve(&m, many, manyn, 9), BAD, "at most 8");

    kvt_reserve(&m, many, manyn, 2);
    m.u.reserve.n_n_tokens = 1;
    expect_error(&m.env, BAD, "token counts");
    /* replies and bodies the store does not take */
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__KvsAck ack = CKV__KVS_ACK__INIT;
    env.body_case = CKV__ENVELOPE__BODY_KVS_ACK;
    env.kvs_ack = &ack;
    expect_error(&env, CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE, "not a request");
    Ckv__Pong pong = CKV__PONG__INIT;
    env.body_case = CKV__ENVELOPE__BODY_PONG;
    env.pong = &pong;
    expect_error(&env, CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE, "pong");
    expect_unchanged(&before);

    /* the good state is still good */
    ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_RELEASE, lease), 2);
    ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_ABORT, open_rsv), 1);
    expect_error(kvt_fetch(&m, &k3, 1, 0), NOT_FOUND, "not found");
    get_check(k, n, 2, 0, NULL);
}

Test(kvs_store, replies_stay_inside_the_message_limit)
{
    kvt_config(&t.cfg, dir, 1 << 20, 0);
    t.cfg.max_cluster_tokens = 1 << 24;
    cr_assert_eq(kvt_open(&t), 0);
    struct kvt_msg m;
    struct kvs_key k = key(1, 0, 0, 0);
    uint32_t n = 1 << 24; /* 2^20 blocks: a reply of ~10 MB of offsets */
    expect_error(kvt_reserve(&m, &k, &n, 1), CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST,
                 "at most 262144");
    struct kvs_store_info in;
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.blocks_used, 0);
}

Test(kvs_store, leases_and_reservations_expire)
{
    kvt_config(&t.cfg, dir, 1 << 20, 0);
    t.cfg.lease_ms = 40;
    t.cfg.reserve_ms = 40;
    cr_assert_eq(kvt_open(&t), 0);
    struct kvs_key k = key(3, 1, 0, 0);
    uint32_t n = 33;
    put(&k, &n, 1);
    uint64_t lease = get_check(&k, &n, 1, 0, NULL);
    struct kvt_msg m;
    struct kvs_key k2 = key(3, 1, 0, 1);
    Ckv__Envelope *r = kvt_call(&t, kvt_reserve(&m, &k2, &n, 1));
    uint64_t rsv = r->kvs_reserve_reply->reservation_id;
    ckv_wire_free(r);
    struct kvs_store_info in;
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.blocks_used, 6);
    cr_assert_eq(in.leases, 1);
    cr_assert_geq(kvs_store_timeout_ms(t.s), 0);
    cr_assert_leq(kvs_store_timeout_ms(t.s), 40);
    usleep(60 * 1000);
    kvs_store_poll(t.s);
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.lease_expiries, 1);
    cr_assert_eq(in.reservation_expiries, 1);
    cr_assert_eq(in.leases, 0);
    cr_assert_eq(in.reservations, 0);
    cr_assert_eq(in.blocks_used, 3, "the expired reservation's blocks are free again");
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_RELEASE, lease),
                 CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND, NULL);
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_COMMIT, rsv),
                 CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND, NULL);
    expect_error(kvt_fetch(&m, &k2, 1, 0), CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND, NULL);
    get_check(&k, &n, 1, 0, NULL);
}

Test(kvs_store, drop_frees_everything)
{
    kvt_config(&t.cfg, dir, 1 << 20, 0);
    cr_assert_eq(kvt_open(&t), 0);
    struct kvs_key a[40], b[10];
    uint32_t na[40], nb[10];
    for (uint32_t i = 0; i < 40; i++) {
        a[i] = key(100, i / 8, i % 8, i);
        na[i] = 1 + i * 3;
    }
    for (uint32_t i = 0; i < 10; i++) {
        b[i] = key(200, 0, 0, i);
        nb[i] = 16;
    }
    put(a, na, 40);
    put(b, nb, 10);
    uint64_t lease = get_check(a, na, 4, 0, NULL); /* a leased part of seq 100 */
    struct kvt_msg m;
    struct kvs_key extra = key(100, 99, 0, 0);
    uint32_t ne = 64;
    Ckv__Envelope *r = kvt_call(&t, kvt_reserve(&m, &extra, &ne, 1)); /* and a reserved one */
    uint64_t rsv = r->kvs_reserve_reply->reservation_id;
    ckv_wire_free(r);

    ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_DROP, 100), 41);
    struct kvs_store_info in;
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.clusters_resident, 10, "seq 200 stays");
    cr_assert_eq(in.clusters_reserved, 0);
    cr_assert_eq(in.clusters_unlinked, 5, "leased and reserved ones wait for their holders");
    expect_error(kvt_fetch(&m, a, 1, 0), CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND, NULL);
    check_index();
    /* the leased blocks were not reused while leased: still intact */
    ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_RELEASE, lease), 4);
    ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_COMMIT, rsv), 0);
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.clusters_unlinked, 0);
    cr_assert_eq(in.blocks_used, 10, "only seq 200's 10 blocks remain");
    ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_DROP, 100), 0);
    lease = get_check(b, nb, 10, 0, NULL);
    ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_DROP, 200), 10);
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.blocks_used, 10, "the lease still holds seq 200's blocks");
    ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_RELEASE, lease), 10);
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.blocks_used, 0, "everything free");
    cr_assert_eq(in.clusters_unlinked + in.clusters_resident, 0);
}

Test(kvs_store, full_segment_without_spill_refuses_and_keeps_data)
{
    kvt_config(&t.cfg, dir, 64 * 4096, 0); /* 64 blocks */
    cr_assert_eq(kvt_open(&t), 0);
    struct kvs_key k[4];
    uint32_t n[4] = {16 * 20, 16 * 20, 16 * 20, 1};
    for (uint32_t i = 0; i < 4; i++)
        k[i] = key(9, 0, 0, i);
    put(k, n, 3); /* 60 blocks */
    struct kvs_store_info before;
    snapshot(&before);
    struct kvt_msg m;
    struct kvs_key more[2] = {key(9, 1, 0, 0), key(9, 1, 0, 1)};
    uint32_t mn[2] = {48, 32}; /* 5 blocks: one too many */
    expect_error(kvt_reserve(&m, more, mn, 2), CKV__ERROR_CODE__ERROR_CODE_NO_SPACE,
                 "no spill file");
    uint32_t huge = 16 * 65;
    expect_error(kvt_reserve(&m, more, &huge, 1), CKV__ERROR_CODE__ERROR_CODE_NO_SPACE,
                 "whole segment holds 64");
    expect_unchanged(&before);
    get_check(k, n, 3, 0, NULL);
}

/* Writes `rounds` batches of clusters of varied sizes (seq s, layer = round), each batch one
 * reserve and one commit. */
static void put_many(uint64_t seq, int rounds, int per_round, struct kvs_key *keys, uint32_t *ntok)
{
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < per_round; i++) {
            int idx = r * per_round + i;
            keys[idx] = key(seq, (uint32_t)r, (uint32_t)i % 4, (uint32_t)i);
            ntok[idx] = 1 + (uint32_t)((idx * 37) % 80); /* 1..80 tokens: 1..5 blocks */
        }
        put(keys + r * per_round, ntok + r * per_round, (size_t)per_round);
    }
}

Test(kvs_store, spill_and_restore_every_byte)
{
    /* 64 blocks of memory, ~1600 blocks of data: everything goes through the spill file */
    kvt_config(&t.cfg, dir, 64 * 4096, 16 << 20);
    cr_assert_eq(kvt_open(&t), 0);
    enum { ROUNDS = 60, PER = 16, N = ROUNDS * PER };
    static struct kvs_key keys[N];
    static uint32_t ntok[N];
    put_many(7, ROUNDS, PER, keys, ntok);
    struct kvs_store_info in;
    kvs_store_info(t.s, &in);
    cr_assert_gt(in.spills, 500, "spills %llu", (unsigned long long)in.spills);
    cr_assert_eq(in.clusters_resident + in.clusters_spilled, N);
    check_index();
    /* read everything back, 8 clusters per fetch, in a scrambled order */
    uint32_t restored_total = 0;
    uint64_t lease = 0;
    for (int i = 0; i < N / 8; i++) {
        int g = (i * 37) % (N / 8);
        uint32_t restored;
        lease = get_check(keys + g * 8, ntok + g * 8, 8, lease, &restored);
        restored_total += restored;
    }
    ack_ok(kvt_id(&(struct kvt_msg){0}, CKV__ENVELOPE__BODY_KVS_RELEASE, lease), 8);
    kvs_store_info(t.s, &in);
    cr_assert_gt(restored_total, 500);
    cr_assert_eq(in.restores, restored_total);
    cr_assert_eq(in.errors, 0);
    check_index();
    /* dropping everything frees memory and spill slots */
    ack_ok(kvt_id(&(struct kvt_msg){0}, CKV__ENVELOPE__BODY_KVS_DROP, 7), N);
    /* spills still in flight free their clusters when they land */
    for (int i = 0; i < 1000; i++) {
        kvs_store_poll(t.s);
        kvs_store_info(t.s, &in);
        if (in.io_in_flight == 0)
            break;
        usleep(2000);
    }
    kvs_store_poll(t.s);
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.blocks_used + in.slots_used + in.io_in_flight, 0,
                 "blocks %llu slots %llu io %u", (unsigned long long)in.blocks_used,
                 (unsigned long long)in.slots_used, in.io_in_flight);
}

Test(kvs_store, leases_protect_from_eviction)
{
    kvt_config(&t.cfg, dir, 64 * 4096, 16 << 20);
    cr_assert_eq(kvt_open(&t), 0);
    struct kvs_key hot[4];
    uint32_t hn[4] = {64, 64, 64, 64}; /* 16 blocks */
    for (uint32_t i = 0; i < 4; i++)
        hot[i] = key(1, 0, 0, i);
    put(hot, hn, 4);
    /* lease them; remember where their blocks are */
    struct kvt_msg m;
    Ckv__Envelope *r = kvt_call(&t, kvt_fetch(&m, hot, 4, 0));
    cr_assert_eq(r->body_case, CKV__ENVELOPE__BODY_KVS_FETCH_REPLY);
    uint64_t lease = r->kvs_fetch_reply->lease_id;
    uint64_t offs[16];
    memcpy(offs, r->kvs_fetch_reply->block_offset, sizeof(offs));
    ckv_wire_free(r);
    /* 20x the memory through the store while they are leased */
    enum { N = 320 };
    static struct kvs_key keys[N];
    static uint32_t ntok[N];
    put_many(2, 40, 8, keys, ntok); /* 8 clusters, at most 40 blocks a round: 48 are unpinned */
    struct kvs_store_info in;
    kvs_store_info(t.s, &in);
    cr_assert_gt(in.spills, 200);
    const struct ckv_shm *shm = kvs_store_shm(t.s);
    for (int i = 0; i < 16; i++)
        cr_assert_eq(kvt_check(shm->base + offs[i], 4096, &hot[i / 4], (uint32_t)i % 4), -1,
                     "leased block %d was overwritten", i);
    uint32_t restored;
    get_check(hot, hn, 4, lease, &restored);
    cr_assert_eq(restored, 0, "leased clusters were never spilled");
}

Test(kvs_store, segment_and_spill_full_refuses_and_keeps_data)
{
    kvt_config(&t.cfg, dir, 64 * 4096, 128 * 4096); /* 64 blocks + 128 slots */
    cr_assert_eq(kvt_open(&t), 0);
    enum { N = 400 };
    static struct kvs_key keys[N];
    static uint32_t ntok[N];
    int stored = 0;
    struct kvt_msg m;
    Ckv__ErrorCode code = 0;
    for (int i = 0; i < N; i++) {
        keys[i] = key(5, 0, 0, (uint32_t)i);
        ntok[i] = 32; /* 2 blocks */
        Ckv__Envelope *r = kvt_call(&t, kvt_reserve(&m, &keys[i], &ntok[i], 1));
        if (r->body_case == CKV__ENVELOPE__BODY_ERROR) {
            code = r->error->code;
            cr_assert(strstr(r->error->message, "spill file full"), "%s", r->error->message);
            ckv_wire_free(r);
            break;
        }
        const struct ckv_shm *shm = kvs_store_shm(t.s);
        for (uint32_t j = 0; j < 2; j++)
            kvt_fill(shm->base + r->kvs_reserve_reply->block_offset[j], 4096, &keys[i], j);
        uint64_t id = r->kvs_reserve_reply->reservation_id;
        ckv_wire_free(r);
        ack_ok(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_COMMIT, id), 1);
        stored++;
    }
    cr_assert_eq(code, CKV__ERROR_CODE__ERROR_CODE_NO_SPACE);
    /* (64 blocks + 128 slots - 16 kept for restores) / 2 = 88 */
    cr_assert_geq(stored, 80, "stored %d", stored);
    cr_assert_leq(stored, 88);
    check_index();
    /* every committed cluster reads back, in batches that fit next to the pinned ones */
    uint64_t lease = 0;
    for (int i = 0; i + 4 <= stored; i += 4)
        lease = get_check(keys + i, ntok + i, 4, lease, NULL);
    for (int i = stored - stored % 4; i < stored; i++)
        lease = get_check(keys + i, ntok + i, 1, lease, NULL);
}

Test(kvs_store, recovery_after_close_keeps_committed_drops_reserved)
{
    kvt_config(&t.cfg, dir, 64 * 4096, 16 << 20);
    cr_assert_eq(kvt_open(&t), 0);
    enum { N = 200 };
    static struct kvs_key keys[N];
    static uint32_t ntok[N];
    put_many(11, 20, 10, keys, ntok);
    struct kvt_msg m;
    struct kvs_key pend = key(12, 0, 0, 0);
    uint32_t pn = 16;
    Ckv__Envelope *r = kvt_call(&t, kvt_reserve(&m, &pend, &pn, 1));
    uint64_t rsv = r->kvs_reserve_reply->reservation_id;
    ckv_wire_free(r);
    /* let the spills in flight land, then close without removing the segment */
    for (int i = 0; i < 200; i++) {
        struct kvs_store_info in;
        kvs_store_info(t.s, &in);
        if (in.io_in_flight == 0)
            break;
        usleep(5000);
        kvs_store_poll(t.s);
    }
    struct kvs_store_info before;
    kvs_store_info(t.s, &before);
    cr_assert_gt(before.clusters_spilled, 0);
    kvt_close(&t, false);

    /* another geometry is refused and changes nothing */
    struct kvs_config keep = t.cfg;
    t.cfg.head_dim = 128;
    cr_assert_eq(kvt_open(&t), CKV_ECONFIG);
    t.cfg = keep;
    cr_assert_eq(kvt_open(&t), 0);
    struct kvs_store_info in;
    kvs_store_info(t.s, &in);
    cr_assert_eq(in.epoch, before.epoch + 1);
    cr_assert_eq(in.clusters_reserved, 0, "the dead epoch's reservation is gone");
    cr_assert_eq(in.clusters_resident + in.clusters_spilled, N);
    cr_assert_eq(in.blocks_used, before.blocks_used - 1);
    check_index();
    expect_error(kvt_id(&m, CKV__ENVELOPE__BODY_KVS_COMMIT, rsv),
                 CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND, "restarted");
    uint64_t lease = 0;
    for (int i = 0; i < N; i += 5)
        lease = get_check(keys + i, ntok + i, 5, lease, NULL);

    /* a second store on the same segment is refused */
    struct kvt t2 = {.cfg = t.cfg};
    cr_assert_eq(kvt_open(&t2), -EBUSY);
}
