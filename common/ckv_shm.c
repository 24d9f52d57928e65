/*
 * The KV store's shared-memory segment: layout, creation and mapping (see ckv_shm.h).
 */
#include "ckv_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckv_clock.h"
#include "ckv_error.h"

#define SEGMENT_MAX_BYTES (1ull << 46)

static uint64_t page_up(uint64_t v)
{
    return (v + CKV_SHM_PAGE - 1) / CKV_SHM_PAGE * CKV_SHM_PAGE;
}

uint32_t ckv_shm_dtype_bytes(uint32_t dtype)
{
    switch (dtype) {
    case CKV_SHM_F16:
    case CKV_SHM_BF16: return 2;
    case CKV_SHM_F32: return 4;
    default: return 0;
    }
}

const char *ckv_shm_dtype_name(uint32_t dtype)
{
    switch (dtype) {
    case CKV_SHM_F16: return "f16";
    case CKV_SHM_BF16: return "bf16";
    case CKV_SHM_F32: return "f32";
    default: return "?";
    }
}

uint32_t ckv_shm_block_bytes(uint32_t head_dim, uint32_t dtype)
{
    uint32_t e = ckv_shm_dtype_bytes(dtype);
    if (!e || head_dim < 8 || head_dim > 1024 || head_dim % 8)
        return 0;
    return CKV_SHM_BLOCK_TOKENS * head_dim * 2u * e; /* a multiple of 512: O_DIRECT-aligned */
}

int ckv_shm_name_check(const char *name)
{
    if (!name || name[0] != '/')
        return -EINVAL;
    size_t n = strlen(name);
    if (n < 2 || n >= CKV_SHM_NAME_MAX || strchr(name + 1, '/'))
        return -EINVAL;
    return 0;
}

int ckv_shm_layout(const struct ckv_shm_geometry *g, struct ckv_shm_header *h)
{
    memset(h, 0, sizeof(*h));
    uint32_t bb = ckv_shm_block_bytes(g->head_dim, g->dtype);
    if (!bb || g->n_blocks == 0 || g->max_clusters == 0 || g->n_blocks > CKV_SHM_MAX_BLOCKS ||
        g->n_spill_slots > CKV_SHM_MAX_BLOCKS || g->max_clusters > CKV_SHM_MAX_BLOCKS)
        return -EINVAL;
    /* Every product below is < 2^32 * 2^12, far from overflowing 64 bits. */
    uint64_t off = page_up(sizeof(struct ckv_shm_header));
    h->index_offset = off;
    off = page_up(off + g->max_clusters * sizeof(struct ckv_shm_entry));
    h->block_next_offset = off;
    off = page_up(off + g->n_blocks * sizeof(uint32_t));
    h->slot_next_offset = off;
    off = page_up(off + g->n_spill_slots * sizeof(uint32_t));
    h->pool_offset = off;
    off += g->n_blocks * (uint64_t)bb;
    if (off > SEGMENT_MAX_BYTES)
        return -EOVERFLOW;
    h->layout_version = CKV_SHM_LAYOUT_VERSION;
    h->header_bytes = sizeof(struct ckv_shm_header);
    h->segment_bytes = off;
    h->block_tokens = CKV_SHM_BLOCK_TOKENS;
    h->head_dim = g->head_dim;
    h->dtype = g->dtype;
    h->block_bytes = bb;
    h->n_blocks = g->n_blocks;
    h->max_clusters = g->max_clusters;
    h->n_spill_slots = g->n_spill_slots;
    return 0;
}

int ckv_shm_create(const char *name, const struct ckv_shm_header *layout, uint64_t spill_nonce,
                   struct ckv_shm *s)
{
    memset(s, 0, sizeof(*s));
    s->fd = -1;
    if (ckv_shm_name_check(name) || layout->segment_bytes < layout->pool_offset)
        return -EINVAL;
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    int rc;
    if (ftruncate(fd, (off_t)layout->segment_bytes) != 0) {
        rc = -errno;
        goto err_unlink;
    }
    void *base = mmap(NULL, layout->segment_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = -errno;
        goto err_unlink;
    }
    struct ckv_shm_header *h = base;
    *h = *layout;
    h->magic = 0;
    h->epoch = 1;
    h->spill_nonce = spill_nonce;
    h->created_wall_ms = ckv_wall_ms();
    h->store_pid = (uint32_t)getpid();
    __atomic_store_n(&h->magic, CKV_SHM_MAGIC, __ATOMIC_RELEASE);
    s->fd = fd;
    s->base = base;
    s->bytes = layout->segment_bytes;
    s->hdr = h;
    return 0;

err_unlink:
    shm_unlink(name);
    close(fd);
    return rc;
}

/* Checks a header against the size of its file; 0 or CKV_EFORMAT with a message. */
static int header_check(const struct ckv_shm_header *h, uint64_t file_bytes, char *err,
                        size_t errlen)
{
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != CKV_SHM_MAGIC) {
        ckv_errorf(0, err, errlen, "no segment magic (half-made by a store that died, or foreign)");
        return CKV_EFORMAT;
    }
    if (h->layout_version != CKV_SHM_LAYOUT_VERSION) {
        ckv_errorf(0, err, errlen, "layout version %u, this build reads %u", h->layout_version,
                   CKV_SHM_LAYOUT_VERSION);
        return CKV_EFORMAT;
    }
    struct ckv_shm_geometry g = {
        .head_dim = h->head_dim,
        .dtype = h->dtype,
        .n_blocks = h->n_blocks,
        .max_clusters = h->max_clusters,
        .n_spill_slots = h->n_spill_slots,
    };
    struct ckv_shm_header want;
    if (h->block_tokens != CKV_SHM_BLOCK_TOKENS || ckv_shm_layout(&g, &want) != 0) {
        ckv_errorf(0, err, errlen,
                   "bad geometry (block_tokens %u, head_dim %u, dtype %u, %llu blocks)",
                   h->block_tokens, h->head_dim, h->dtype, (unsigned long long)h->n_blocks);
        return CKV_EFORMAT;
    }
    if (want.block_bytes != h->block_bytes || want.index_offset != h->index_offset ||
        want.block_next_offset != h->block_next_offset ||
        want.slot_next_offset != h->slot_next_offset || want.pool_offset != h->pool_offset ||
        want.segment_bytes != h->segment_bytes) {
        ckv_errorf(0, err, errlen, "region offsets do not match the geometry");
        return CKV_EFORMAT;
    }
    if (h->segment_bytes != file_bytes) {
        ckv_errorf(0, err, errlen, "header says %llu bytes, the file has %llu",
                   (unsigned long long)h->segment_bytes, (unsigned long long)file_bytes);
        return CKV_EFORMAT;
    }
    return 0;
}

int ckv_shm_open(const char *name, struct ckv_shm *s, char *err, size_t errlen)
{
    memset(s, 0, sizeof(*s));
    s->fd = -1;
    if (err && errlen)
        err[0] = '\0';
    if (ckv_shm_name_check(name)) {
        ckv_errorf(0, err, errlen, "bad segment name '%s'", name ? name : "(null)");
        return -EINVAL;
    }
    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        int rc = -errno;
        ckv_errorf(0, err, errlen, "%s", strerror(-rc));
        return rc;
    }
    int rc;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = -errno;
        goto err_close;
    }
    if ((uint64_t)st.st_size < sizeof(struct ckv_shm_header)) {
        ckv_errorf(0, err, errlen, "%lld bytes: too small for a header", (long long)st.st_size);
        rc = CKV_EFORMAT;
        goto err_close;
    }
    /* Copy the header out first: its sizes decide how much to map. */
    struct ckv_shm_header h;
    if (pread(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h)) {
        rc = -EIO;
        goto err_close;
    }
    if ((rc = header_check(&h, (uint64_t)st.st_size, err, errlen)) != 0)
        goto err_close;
    void *base = mmap(NULL, h.segment_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = -errno;
        goto err_close;
    }
    s->fd = fd;
    s->base = base;
    s->bytes = h.segment_bytes;
    s->hdr = base;
    return 0;

err_close:
    if (rc < 0 && rc > -4096 && err && !err[0])
        ckv_errorf(0, err, errlen, "%s", strerror(-rc));
    close(fd);
    return rc;
}

void ckv_shm_close(struct ckv_shm *s)
{
    if (s->base) { /* fd and mapping come and go together */
        munmap(s->base, s->bytes);
        close(s->fd);
    }
    s->base = NULL;
    s->hdr = NULL;
    s->bytes = 0;
    s->fd = -1;
}

int ckv_shm_unlink(const char *name)
{
    if (ckv_shm_name_check(name))
        return -EINVAL;
    return shm_unlink(name) == 0 ? 0 : -errno;
}

uint64_t ckv_shm_epoch(const struct ckv_shm *s)
{
    return __atomic_load_n(&s->hdr->epoch, __ATOMIC_ACQUIRE);
}
