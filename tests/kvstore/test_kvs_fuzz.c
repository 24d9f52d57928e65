/*
 * Suite "kvs_fuzz": the libFuzzer harness of the request path (kvstore/kvs_fuzz.h) run over its
 * seeds and over a corpus of deterministic mutations of them, so that CI exercises the decoder
 * and the handler on hostile input without clang. Each input runs against a fresh store with
 * data checks and index invariants after every frame; the decoder alone also gets single
 * frames, mutated.
 */
#include "ckv_log.h"
#include "kvs_fuzz.h"
#include "kvs_test.h"

static char dir[256];
static struct kvs_fuzz fz;

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    cr_assert_eq(kvs_fuzz_init(&fz, dir), 0);
    ckv_log_init("kvs_fuzz", CKV_LOG_OFF); /* thousands of error replies */
}

static void teardown(void)
{
    ckv_shm_unlink(fz.cfg.segment_name);
    ckv_test_rmrf(dir);
}

/* Every suite of the runner uses the same timeout: Criterion 2.4.1 leaks in its runner when
 * suites with different timeouts run side by side (LeakSanitizer then fails the ASan run). */
TestSuite(kvs_fuzz, .init = setup, .fini = teardown, .timeout = 20);

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

Test(kvs_fuzz, seeds_run_clean_and_check_data)
{
    static uint8_t buf[1 << 16];
    unsigned n = 0;
    char err[512];
    for (unsigned i = 0;; i++) {
        size_t len = kvs_fuzz_seed(i, buf, sizeof(buf));
        if (!len)
            break;
        n++;
        uint64_t checked = fz.bytes_checked, errors = fz.errors_replied, frames = fz.frames;
        int rc = kvs_fuzz_run(&fz, buf, len, err, sizeof(err));
        cr_assert_eq(rc, 0, "seed %u: %s", i, err);
        uint64_t d_checked = fz.bytes_checked - checked, d_err = fz.errors_replied - errors;
        uint64_t d_frames = fz.frames - frames;
        switch (i) {
        case 0: cr_assert_eq(d_err, 0, "seed 0: %llu errors", (unsigned long long)d_err); break;
        case 1: /* 3 clusters of 7, 12, 17 tokens: 4 blocks checked, no error */
            cr_assert_eq(d_err, 0);
            cr_assert_eq(d_checked, 4 * 512);
            break;
        case 2: cr_assert_eq(d_err, 2, "fetch of aborted, commit twice"); break;
        case 3: /* 12 fetches of 2 clusters (40, 45 tokens: 3 blocks each) through the spill */
            cr_assert_eq(d_err, 0);
            cr_assert_eq(d_checked, 12 * 6 * 512);
            break;
        case 4: cr_assert_eq(d_err, 1, "the fetch after the drop"); break;
        case 5: cr_assert_eq(d_err, d_frames, "every frame of seed 5 is refused"); break;
        }
    }
    cr_assert_geq(n, 6);
}

/* Mutates src (n bytes) into dst; returns the new length. */
static size_t mutate(const uint8_t *src, size_t n, uint8_t *dst, size_t cap, const uint8_t *other,
                     size_t n_other)
{
    size_t len = n < cap ? n : cap;
    memcpy(dst, src, len);
    int ops = 1 + (int)(rng() % 4);
    for (int k = 0; k < ops && len > 1; k++) {
        size_t at = 1 + rng() % (len - 1); /* keep the options byte mostly */
        switch (rng() % 9) {
        case 0: dst[at] ^= (uint8_t)(1u << (rng() % 8)); break; /* bit flip */
        case 1: dst[at] = (uint8_t)rng(); break;                /* random byte */
        case 2: dst[at] = (uint8_t[]){0, 1, 0x7f, 0x80, 0xff}[rng() % 5]; break;
        case 3: len = at; break; /* truncate */
        case 4:                  /* delete a run */
            if (len - at > 1) {
                size_t d = 1 + rng() % CKV_MIN(len - at - 1, 8);
                memmove(dst + at, dst + at + d, len - at - d);
                len -= d;
            }
            break;
        case 5: /* insert bytes */
            if (len + 4 < cap) {
                memmove(dst + at + 4, dst + at, len - at);
                for (int i = 0; i < 4; i++)
                    dst[at + i] = (uint8_t)rng();
                len += 4;
            }
            break;
        case 6: /* splice another input */
            if (n_other > 1) {
                size_t from = 1 + rng() % (n_other - 1);
                size_t cnt = CKV_MIN(n_other - from, cap - at);
                memcpy(dst + at, other + from, cnt);
                len = at + cnt;
            }
            break;
        case 7: /* repeat a region */
            if (len * 2 < cap) {
                size_t cnt = len - at;
                memcpy(dst + len, dst + at, cnt);
                len += cnt;
            }
            break;
        case 8: dst[0] ^= 1; break; /* spill on/off */
        }
    }
    return len;
}

Test(kvs_fuzz, mutated_corpus_keeps_every_rule)
{
    static uint8_t seeds[8][1 << 12], buf[1 << 13];
    size_t lens[8];
    unsigned n_seeds = 0;
    while (n_seeds < 8 &&
           (lens[n_seeds] = kvs_fuzz_seed(n_seeds, seeds[n_seeds], sizeof(seeds[0]))))
        n_seeds++;
    cr_assert_geq(n_seeds, 6);
    char err[512];
    enum { INPUTS = 20000 };
    for (int i = 0; i < INPUTS; i++) {
        unsigned a = (unsigned)(rng() % n_seeds), b = (unsigned)(rng() % n_seeds);
        size_t len = mutate(seeds[a], lens[a], buf, sizeof(buf), seeds[b], lens[b]);
        int rc = kvs_fuzz_run(&fz, buf, len, err, sizeof(err));
        if (rc) {
            char hex[3 * 64 + 1] = "";
            for (size_t j = 0; j < len && j < 64; j++)
                sprintf(hex + 3 * j, "%02x ", buf[j]);
            cr_assert_fail("input %d (from seed %u, %zu bytes: %s...): %s", i, a, len, hex, err);
        }
    }
    /* the mutations reach the handler, not only the decoder */
    cr_assert_gt(fz.decoded, fz.frames / 4, "decoded %llu of %llu frames",
                 (unsigned long long)fz.decoded, (unsigned long long)fz.frames);
    cr_assert_gt(fz.bytes_checked, 0);
    cr_log_info("kvs_fuzz: %llu inputs, %llu frames, %llu decoded, %llu error replies, %llu bytes "
                "checked",
                (unsigned long long)fz.runs, (unsigned long long)fz.frames,
                (unsigned long long)fz.decoded, (unsigned long long)fz.errors_replied,
                (unsigned long long)fz.bytes_checked);
}

Test(kvs_fuzz, decoder_on_mutated_single_frames)
{
    /* every frame of every seed, mutated 2000 times each: each decodes to a request that
     * passes the checks, or fails with a known code and a message */
    static uint8_t seed[1 << 12], frame[1 << 12];
    struct kvs_limits lim = {.max_request_clusters = 64, .max_cluster_tokens = 256};
    unsigned ok = 0, bad = 0;
    for (unsigned s = 0;; s++) {
        size_t len = kvs_fuzz_seed(s, seed, sizeof(seed));
        if (!len)
            break;
        for (size_t p = 1; p + 2 <= len;) {
            size_t fl = seed[p] | (size_t)seed[p + 1] << 8;
            p += 2;
            for (int m = 0; m < 2000; m++) {
                size_t n = mutate(seed + p - 1, fl + 1, frame, sizeof(frame), seed, len) - 1;
                Ckv__Envelope *env = NULL;
                char msg[256] = "";
                int rc = kvs_proto_decode(frame + 1, n, 2048, &lim, &env, msg, sizeof(msg));
                if (rc == 0) {
                    cr_assert_not_null(env);
                    cr_assert_eq(kvs_proto_check(env, &lim, msg, sizeof(msg)), 0);
                    ckv_wire_free(env);
                    ok++;
                } else {
                    cr_assert_null(env);
                    cr_assert(rc == CKV_EMALFORMED || rc == CKV_ETOOBIG ||
                                  rc == CKV_EPROTO_VERSION || rc == CKV_EUNKNOWN_TYPE ||
                                  rc == -EINVAL,
                              "code %d", rc);
                    cr_assert(msg[0], "error %d without a message", rc);
                    bad++;
                }
            }
            p += fl;
        }
    }
    cr_assert_gt(ok, 1000);
    cr_assert_gt(bad, 1000);
}
