/*
 * Suite "kvs_spill": the spill file's io_uring engine on its own: block writes and reads
 * round-trip at full queue depth, an O_DIRECT refusal in the middle of many I/Os in flight
 * falls back to buffered I/O and loses none of them, and a read past the end of a truncated
 * file is an error, not a hang.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_test.h"
#include "kvs_spill.h"

static char dir[256], path[320];
static struct kvs_spill sp;

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    snprintf(path, sizeof(path), "%s/spill", dir);
    memset(&sp, 0, sizeof(sp));
    sp.fd = sp.efd = -1;
    ckv_log_init("kvs_spill", CKV_LOG_ERROR);
}

static void teardown(void)
{
    kvs_spill_close(&sp);
    ckv_test_rmrf(dir);
}

TestSuite(kvs_spill, .init = setup, .fini = teardown, .timeout = 20);

enum { BLOCK = 4096, SLOTS = 256 };

struct done {
    int ok, failed, last_err;
    uint8_t seen[SLOTS];
};

static void on_done(void *arg, struct kvs_io *io, int res)
{
    struct done *d = arg;
    if (res) {
        d->failed++;
        d->last_err = res;
    } else {
        d->ok++;
    }
    d->seen[io->slot]++;
}

/* Issues one block I/O per slot, keeping the ring full, until all have finished. */
static void run_all(enum kvs_io_kind kind, uint8_t *bufs, size_t stride, struct done *d)
{
    int next = 0;
    while (d->ok + d->failed < SLOTS) {
        while (next < SLOTS && kvs_spill_room(&sp) > 0) {
            struct kvs_io *io =
                kvs_spill_prep(&sp, kind, bufs + (size_t)next * stride, (uint32_t)next);
            cr_assert_not_null(io);
            next++;
        }
        cr_assert_eq(kvs_spill_submit(&sp), 0);
        struct pollfd p = {.fd = kvs_spill_fd(&sp), .events = POLLIN};
        cr_assert_geq(poll(&p, 1, 5000), 0);
        kvs_spill_reap(&sp, on_done, d);
    }
}

/* Page-aligned memory (posix_memalign: any size). */
static uint8_t *page_alloc(size_t bytes)
{
    void *p = NULL;
    cr_assert_eq(posix_memalign(&p, 4096, bytes), 0);
    return p;
}

static uint8_t pattern(int slot, size_t i)
{
    return (uint8_t)(slot * 31 + i * 7 + (i >> 9));
}

Test(kvs_spill, blocks_round_trip_at_full_depth)
{
    cr_assert_eq(kvs_spill_open(&sp, path, SLOTS, BLOCK, true, 32), 0);
    uint8_t *out = page_alloc((size_t)SLOTS * BLOCK);
    uint8_t *in = page_alloc((size_t)SLOTS * BLOCK);
    for (int s = 0; s < SLOTS; s++)
        for (size_t i = 0; i < BLOCK; i++)
            out[(size_t)s * BLOCK + i] = pattern(s, i);
    struct done w = {0}, r = {0};
    run_all(KVS_IO_WRITE, out, BLOCK, &w);
    cr_assert_eq(w.ok, SLOTS, "writes: %d ok, %d failed (%s)", w.ok, w.failed,
                 ckv_strerror(w.last_err));
    memset(in, 0, (size_t)SLOTS * BLOCK);
    run_all(KVS_IO_READ, in, BLOCK, &r);
    cr_assert_eq(r.ok, SLOTS);
    cr_assert_eq(memcmp(in, out, (size_t)SLOTS * BLOCK), 0);
    for (int s = 0; s < SLOTS; s++)
        cr_assert_eq(w.seen[s] + r.seen[s], 2, "slot %d", s);
    cr_assert_eq(sp.ios[KVS_IO_WRITE], SLOTS);
    cr_assert_eq(sp.ios[KVS_IO_READ], SLOTS);
    cr_assert_eq(sp.lat_us.count, 2 * SLOTS);
    cr_assert_gt(sp.busy_ns[KVS_IO_WRITE], 0);
    cr_assert_lt(sp.submit_calls, 2 * SLOTS, "submissions are batched");
    free(out);
    free(in);
}

Test(kvs_spill, direct_io_refused_in_flight_falls_back_without_losing_io)
{
    cr_assert_eq(kvs_spill_open(&sp, path, SLOTS, BLOCK, true, 64), 0);
    bool direct_at_open = sp.direct;
    /* buffers one byte off alignment: O_DIRECT answers EINVAL for every one of the 64 I/Os in
     * flight at once, after the open and its probe succeeded */
    uint8_t *base = page_alloc((size_t)SLOTS * (BLOCK + 8) + 4096);
    uint8_t *bufs = base + 1;
    size_t stride = BLOCK + 8;
    for (int s = 0; s < SLOTS; s++)
        for (size_t i = 0; i < BLOCK; i++)
            bufs[(size_t)s * stride + i] = pattern(s, i);
    struct done w = {0};
    run_all(KVS_IO_WRITE, bufs, stride, &w);
    cr_assert_eq(w.ok, SLOTS, "writes: %d ok, %d failed (%s)", w.ok, w.failed,
                 ckv_strerror(w.last_err));
    cr_assert_eq(sp.io_errors, 0);
    if (direct_at_open)
        cr_log_info("O_DIRECT at open; %s after misaligned I/O",
                    sp.direct ? "still direct (the file system accepts it)" : "fell back");
    /* every block landed where it belongs */
    int fd = open(path, O_RDONLY);
    uint8_t *check = malloc(BLOCK);
    for (int s = 0; s < SLOTS; s++) {
        cr_assert_eq(pread(fd, check, BLOCK, KVS_SPILL_HEADER_BYTES + (off_t)s * BLOCK), BLOCK);
        cr_assert_eq(memcmp(check, bufs + (size_t)s * stride, BLOCK), 0, "slot %d", s);
    }
    close(fd);
    free(check);
    free(base);
}

Test(kvs_spill, read_past_a_truncated_file_is_an_error)
{
    cr_assert_eq(kvs_spill_open(&sp, path, SLOTS, BLOCK, true, 32), 0);
    cr_assert_eq(truncate(path, KVS_SPILL_HEADER_BYTES), 0); /* someone cut the file */
    uint8_t *buf = page_alloc(BLOCK);
    struct kvs_io *io = kvs_spill_prep(&sp, KVS_IO_READ, buf, 9);
    cr_assert_not_null(io);
    cr_assert_eq(kvs_spill_submit(&sp), 0);
    struct done d = {0};
    for (int i = 0; i < 100 && d.ok + d.failed == 0; i++) {
        struct pollfd p = {.fd = kvs_spill_fd(&sp), .events = POLLIN};
        poll(&p, 1, 50);
        kvs_spill_reap(&sp, on_done, &d);
    }
    cr_assert_eq(d.failed, 1);
    cr_assert_eq(d.last_err, -EIO);
    cr_assert_eq(sp.io_errors, 1);
    cr_assert_eq(sp.in_flight, 0);
    free(buf);
}

Test(kvs_spill, header_round_trip_and_bad_arguments)
{
    cr_assert_eq(kvs_spill_open(&sp, path, 0, BLOCK, true, 32), -EINVAL);
    cr_assert_eq(kvs_spill_open(&sp, path, SLOTS, 1000, true, 32), -EINVAL, "not 512-aligned");
    cr_assert_eq(kvs_spill_open(&sp, path, SLOTS, BLOCK, true, 32), 0);
    struct kvs_spill_header h = {0}, back;
    cr_assert_eq(kvs_spill_header_read(&sp, &h), 0);
    cr_assert_eq(h.magic, KVS_SPILL_MAGIC);
    cr_assert_eq(h.nonce, 0, "a new file is unclaimed");
    h.nonce = 0x1234;
    snprintf(h.segment_name, sizeof(h.segment_name), "/seg");
    cr_assert_eq(kvs_spill_header_write(&sp, &h), 0);
    kvs_spill_close(&sp);
    cr_assert_eq(kvs_spill_open(&sp, path, SLOTS, BLOCK, true, 32), 0);
    cr_assert_eq(kvs_spill_header_read(&sp, &back), 0);
    cr_assert_eq(back.nonce, 0x1234, "an existing file keeps its header");
    cr_assert_str_eq(back.segment_name, "/seg");
}
