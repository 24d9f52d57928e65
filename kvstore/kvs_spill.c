/*
 * The spill file and its io_uring ring (see kvs_spill.h).
 */
#include "kvs_spill.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "ckv_clock.h"
#include "ckv_error.h"
#include "ckv_log.h"

static uint64_t slot_offset(const struct kvs_spill *sp, uint32_t slot)
{
    return KVS_SPILL_HEADER_BYTES + (uint64_t)slot * sp->block_bytes;
}

/* Writes one aligned page synchronously: the O_DIRECT probe and the header writer. */
static int write_page(int fd, const void *src, size_t len)
{
    void *page = NULL;
    if (posix_memalign(&page, KVS_SPILL_HEADER_BYTES, KVS_SPILL_HEADER_BYTES))
        return -ENOMEM;
    memset(page, 0, KVS_SPILL_HEADER_BYTES);
    memcpy(page, src, len);
    ssize_t w = pwrite(fd, page, KVS_SPILL_HEADER_BYTES, 0);
    int rc = w == (ssize_t)KVS_SPILL_HEADER_BYTES ? 0 : w < 0 ? -errno : -EIO;
    free(page);
    return rc;
}

static int submit_prepared(struct kvs_spill *sp);

/* Reopens the file without O_DIRECT. */
static int fall_back_to_buffered(struct kvs_spill *sp, const char *why)
{
    int fd = open(sp->path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    LOG_WARN("spill file %s: O_DIRECT refused (%s): using buffered I/O", sp->path, why);
    if (sp->ring_ready)
        submit_prepared(sp); /* SQEs name the old descriptor: let them go before it closes */
    close(sp->fd);           /* the ring holds its own reference for I/Os in flight */
    sp->fd = fd;
    sp->direct = false;
    return 0;
}

int kvs_spill_open(struct kvs_spill *sp, const char *path, uint64_t n_slots, uint32_t block_bytes,
                   bool direct, uint32_t depth)
{
    memset(sp, 0, sizeof(*sp));
    sp->fd = -1;
    sp->efd = -1;
    if (!path || !*path || strlen(path) >= sizeof(sp->path) || !n_slots || !block_bytes ||
        block_bytes % 512 || depth < 1)
        return -EINVAL;
    snprintf(sp->path, sizeof(sp->path), "%s", path);
    sp->block_bytes = block_bytes;
    sp->n_slots = n_slots;
    sp->depth = depth;
    int rc;

    bool created = access(path, F_OK) != 0;
    int flags = O_RDWR | O_CREAT | O_CLOEXEC;
    sp->fd = direct ? open(path, flags | O_DIRECT, 0600) : -1;
    sp->direct = sp->fd >= 0;
    if (sp->fd < 0) {
        if (direct)
            LOG_WARN("spill file %s: O_DIRECT open failed (%s): using buffered I/O", path,
                     strerror(errno));
        sp->fd = open(path, flags, 0600);
    }
    if (sp->fd < 0) {
        rc = -errno;
        goto err;
    }
    uint64_t bytes = KVS_SPILL_HEADER_BYTES + n_slots * (uint64_t)block_bytes;
    rc = posix_fallocate(sp->fd, 0, (off_t)bytes);
    if (rc == EOPNOTSUPP || rc == EINVAL) {
        LOG_WARN("spill file %s: no fallocate on this file system: space is not reserved", path);
        rc = ftruncate(sp->fd, (off_t)bytes) ? errno : 0;
    }
    if (rc) {
        rc = -rc;
        goto err;
    }
    if (created) {
        struct kvs_spill_header h = {
            .magic = KVS_SPILL_MAGIC, .n_slots = n_slots, .block_bytes = block_bytes};
        rc = kvs_spill_header_write(sp, &h); /* also the O_DIRECT probe */
        if (rc)
            goto err;
    } else if (sp->direct) {
        /* Probe O_DIRECT with an aligned read of the header page. */
        void *page = NULL;
        if (posix_memalign(&page, KVS_SPILL_HEADER_BYTES, KVS_SPILL_HEADER_BYTES)) {
            rc = -ENOMEM;
            goto err;
        }
        ssize_t r = pread(sp->fd, page, KVS_SPILL_HEADER_BYTES, 0);
        int e = errno;
        free(page);
        if (r < 0 && e == EINVAL && (rc = fall_back_to_buffered(sp, "probe read")) != 0)
            goto err;
    }

    sp->ops = calloc(depth, sizeof(*sp->ops));
    if (!sp->ops) {
        rc = -ENOMEM;
        goto err;
    }
    for (uint32_t i = 0; i < depth; i++) {
        sp->ops[i].next_free = sp->free_ops;
        sp->free_ops = &sp->ops[i];
    }
    /* CQ twice the SQ (liburing's default): completions never overflow with depth in flight. */
    rc = io_uring_queue_init(depth, &sp->ring, 0);
    if (rc)
        goto err;
    sp->ring_ready = true;
    sp->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (sp->efd < 0) {
        rc = -errno;
        goto err;
    }
    rc = io_uring_register_eventfd(&sp->ring, sp->efd);
    if (rc)
        goto err;
    return 0;

err:
    kvs_spill_close(sp);
    return rc;
}

int kvs_spill_header_read(struct kvs_spill *sp, struct kvs_spill_header *h)
{
    void *page = NULL;
    if (posix_memalign(&page, KVS_SPILL_HEADER_BYTES, KVS_SPILL_HEADER_BYTES))
        return -ENOMEM;
    ssize_t r = pread(sp->fd, page, KVS_SPILL_HEADER_BYTES, 0);
    int rc = r == (ssize_t)KVS_SPILL_HEADER_BYTES ? 0 : r < 0 ? -errno : -EIO;
    if (rc == 0)
        memcpy(h, page, sizeof(*h));
    free(page);
    return rc;
}

int kvs_spill_header_write(struct kvs_spill *sp, const struct kvs_spill_header *h)
{
    int rc = write_page(sp->fd, h, sizeof(*h));
    if (rc == -EINVAL && sp->direct) {
        if ((rc = fall_back_to_buffered(sp, "header write")) != 0)
            return rc;
        rc = write_page(sp->fd, h, sizeof(*h));
    }
    return rc;
}

void kvs_spill_close(struct kvs_spill *sp)
{
    if (sp->ring_ready)
        io_uring_queue_exit(&sp->ring);
    sp->ring_ready = false;
    if (sp->efd >= 0)
        close(sp->efd);
    if (sp->fd >= 0)
        close(sp->fd);
    sp->efd = -1;
    sp->fd = -1;
    free(sp->ops);
    sp->ops = NULL;
    sp->free_ops = NULL;
}

/* Queues the (remaining part of the) transfer of io as one SQE. */
static void queue_sqe(struct kvs_spill *sp, struct kvs_io *io)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&sp->ring);
    ASSERT(sqe); /* at most depth I/Os, each with at most one SQE, in a ring of depth */
    uint8_t *buf = io->buf + io->done_bytes;
    unsigned len = sp->block_bytes - io->done_bytes;
    uint64_t off = slot_offset(sp, io->slot) + io->done_bytes;
    if (io->kind == KVS_IO_WRITE)
        io_uring_prep_write(sqe, sp->fd, buf, len, off);
    else
        io_uring_prep_read(sqe, sp->fd, buf, len, off);
    io_uring_sqe_set_data(sqe, io);
    io->direct = sp->direct;
    sp->prepared++;
}

struct kvs_io *kvs_spill_prep(struct kvs_spill *sp, enum kvs_io_kind kind, uint8_t *buf,
                              uint32_t slot)
{
    ASSERT(slot < sp->n_slots);
    struct kvs_io *io = sp->free_ops;
    if (!io)
        return NULL;
    sp->free_ops = io->next_free;
    memset(io, 0, sizeof(*io));
    io->kind = (uint8_t)kind;
    io->buf = buf;
    io->slot = slot;
    io->t_submit_ns = ckv_now_ns();
    if (sp->kind_in_flight[kind]++ == 0)
        sp->busy_since_ns[kind] = io->t_submit_ns;
    sp->in_flight++;
    queue_sqe(sp, io);
    return io;
}

int kvs_spill_submit(struct kvs_spill *sp)
{
    return submit_prepared(sp);
}

static int submit_prepared(struct kvs_spill *sp)
{
    if (!sp->prepared)
        return 0;
    /* EAGAIN/EBUSY are transient (kernel short of memory, CQ backlog): a few more tries, then
     * the SQEs stay prepared and the next call submits them. */
    int n = -EAGAIN;
    for (int tries = 0; tries < 16; tries++) {
        n = io_uring_submit(&sp->ring);
        sp->submit_calls++;
        if (n >= 0) {
            sp->prepared = (uint32_t)n >= sp->prepared ? 0 : sp->prepared - (uint32_t)n;
            return 0;
        }
        if (n != -EINTR && n != -EAGAIN && n != -EBUSY)
            break;
    }
    return n;
}

int kvs_spill_reap(struct kvs_spill *sp, kvs_spill_done_fn done, void *arg)
{
    uint64_t ticks;
    if (read(sp->efd, &ticks, sizeof(ticks)) < 0 && errno != EAGAIN)
        LOG_WARN("spill eventfd read: %s", strerror(errno));
    int finished = 0;
    struct io_uring_cqe *cqe;
    while (io_uring_peek_cqe(&sp->ring, &cqe) == 0) {
        struct kvs_io *io = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&sp->ring, cqe);
        ASSERT(io);
        /* O_DIRECT refused: fall back once, and send every I/O that went out on the O_DIRECT
         * descriptor (several may be in flight) again on the buffered one. */
        if (res == -EINVAL && io->direct &&
            (!sp->direct || fall_back_to_buffered(sp, "I/O answered EINVAL") == 0)) {
            queue_sqe(sp, io);
            continue;
        }
        if (res == -EAGAIN || res == -EINTR) {
            queue_sqe(sp, io);
            continue;
        }
        if (res > 0 && io->done_bytes + (uint32_t)res < sp->block_bytes) {
            io->done_bytes += (uint32_t)res; /* short: go on from where it stopped */
            sp->short_retries++;
            queue_sqe(sp, io);
            continue;
        }
        int rc = 0;
        if (res < 0)
            rc = res;
        else if (res == 0)
            rc = -EIO; /* end of file inside the preallocated file: it was truncated */
        uint64_t now = ckv_now_ns();
        ckv_hist_record(&sp->lat_us, (now - io->t_submit_ns) / 1000u);
        if (--sp->kind_in_flight[io->kind] == 0)
            sp->busy_ns[io->kind] += now - sp->busy_since_ns[io->kind];
        if (rc) {
            sp->io_errors++;
            LOG_ERROR("spill file %s: %s of slot %u failed: %s", sp->path,
                      io->kind == KVS_IO_WRITE ? "write" : "read", io->slot, strerror(-rc));
        } else {
            sp->ios[io->kind]++;
        }
        sp->in_flight--;
        done(arg, io, rc);
        io->next_free = sp->free_ops;
        sp->free_ops = io;
        finished++;
    }
    if (finished)
        sp->reaps++;
    int rc = kvs_spill_submit(sp); /* resubmissions */
    if (rc)
        LOG_ERROR("spill file %s: io_uring_submit: %s", sp->path, strerror(-rc));
    return finished;
}
