/*
 * GGUF reader (see gguf.h). Parsing is a bounds-checked cursor over the mapped bytes: every
 * read checks the remaining length first, every count is checked against what the remaining
 * bytes could possibly hold before anything is allocated for it.
 */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckv_error.h"

#define GGUF_MAGIC             "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_KEY_LEN       65535
#define GGUF_MAX_NAME_LEN      1024 /* ggml uses 64; be generous but bounded */

struct gguf_kv {
    char *key; /* owned, NUL-terminated */
    enum gguf_type type;
    enum gguf_type elem_type; /* arrays */
    uint64_t n;               /* arrays: element count */
    const uint8_t *value;     /* into the image: the value (for arrays: the first element) */
    const uint8_t **strs;     /* string arrays: owned table of n element pointers (len-prefixed) */
};

struct gguf {
    const uint8_t *base; /* image */
    size_t size;
    bool mapped; /* base is our mmap */
    uint32_t version;
    uint64_t n_kv, n_tensors;
    struct gguf_kv *kvs;         /* (n_kv) */
    struct gguf_tensor *tensors; /* (n_tensors) */
    uint32_t alignment;
    uint64_t data_offset;
};

struct cursor {
    const uint8_t *p, *end;
};

static size_t remaining(const struct cursor *c)
{
    return (size_t)(c->end - c->p);
}

static bool take(struct cursor *c, void *dst, size_t n)
{
    if (remaining(c) < n)
        return false;
    memcpy(dst, c->p, n);
    c->p += n;
    return true;
}

static bool skip(struct cursor *c, uint64_t n)
{
    if (remaining(c) < n)
        return false;
    c->p += n;
    return true;
}

/* Reads a length-prefixed string header; leaves the cursor after the bytes. */
static bool take_str(struct cursor *c, struct gguf_str *s)
{
    uint64_t len;
    if (!take(c, &len, sizeof(len)) || remaining(c) < len)
        return false;
    s->ptr = (const char *)c->p;
    s->len = len;
    c->p += len;
    return true;
}

static size_t scalar_size(enum gguf_type t)
{
    switch (t) {
    case GGUF_TYPE_UINT8:
    case GGUF_TYPE_INT8:
    case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16:
    case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32:
    case GGUF_TYPE_INT32:
    case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64:
    case GGUF_TYPE_INT64:
    case GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

static char *dup_str(const struct gguf_str *s)
{
    char *d = malloc(s->len + 1);
    if (d) {
        memcpy(d, s->ptr, s->len);
        d[s->len] = '\0';
    }
    return d;
}

struct type_info {
    const char *name;
    uint32_t block_elems, block_bytes;
    bool supported;
};

static const struct type_info type_table[GGML_TYPE_COUNT] = {
    [GGML_TYPE_F32] = {"F32", 1, 4, true},        [GGML_TYPE_F16] = {"F16", 1, 2, true},
    [GGML_TYPE_Q4_0] = {"Q4_0", 32, 18, true},    [GGML_TYPE_Q4_1] = {"Q4_1", 32, 20, true},
    [GGML_TYPE_Q5_0] = {"Q5_0", 32, 22, false},   [GGML_TYPE_Q5_1] = {"Q5_1", 32, 24, false},
    [GGML_TYPE_Q8_0] = {"Q8_0", 32, 34, true},    [GGML_TYPE_Q8_1] = {"Q8_1", 32, 36, false},
    [GGML_TYPE_Q2_K] = {"Q2_K", 256, 84, false},  [GGML_TYPE_Q3_K] = {"Q3_K", 256, 110, false},
    [GGML_TYPE_Q4_K] = {"Q4_K", 256, 144, false}, [GGML_TYPE_Q5_K] = {"Q5_K", 256, 176, false},
    [GGML_TYPE_Q6_K] = {"Q6_K", 256, 210, false}, [GGML_TYPE_Q8_K] = {"Q8_K", 256, 292, false},
    [GGML_TYPE_BF16] = {"BF16", 1, 2, true},
};

const char *ggml_type_name(enum ggml_type t)
{
    if ((unsigned)t < GGML_TYPE_COUNT && type_table[t].name)
        return type_table[t].name;
    return "unknown";
}

uint32_t ggml_type_block_elems(enum ggml_type t)
{
    return (unsigned)t < GGML_TYPE_COUNT ? type_table[t].block_elems : 0;
}

uint32_t ggml_type_block_bytes(enum ggml_type t)
{
    return (unsigned)t < GGML_TYPE_COUNT ? type_table[t].block_bytes : 0;
}

uint64_t ggml_row_bytes(enum ggml_type t, uint64_t n)
{
    uint32_t be = ggml_type_block_elems(t);
    return be ? n / be * ggml_type_block_bytes(t) : 0;
}

bool gguf_tensor_type_supported(enum ggml_type t)
{
    return (unsigned)t < GGML_TYPE_COUNT && type_table[t].supported;
}

const char *gguf_type_name(enum gguf_type t)
{
    static const char *const names[GGUF_TYPE_COUNT] = {
        "uint8", "int8",   "uint16", "int16",  "uint32", "int32",  "float32",
        "bool",  "string", "array",  "uint64", "int64",  "float64"};
    return (unsigned)t < GGUF_TYPE_COUNT ? names[t] : "unknown";
}

static int parse_kv(gguf_t *g, struct cursor *c, uint64_t i, char *err, size_t errlen)
{
    struct gguf_kv *kv = &g->kvs[i];
    struct gguf_str key;
    if (!take_str(c, &key))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata entry %llu: truncated key",
                          (unsigned long long)i);
    if (key.len == 0 || key.len > GGUF_MAX_KEY_LEN)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata entry %llu: key length %llu",
                          (unsigned long long)i, (unsigned long long)key.len);
    if (!(kv->key = dup_str(&key)))
        return -ENOMEM;
    if (memchr(kv->key, '\0', key.len))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata entry %llu: NUL byte in key",
                          (unsigned long long)i);
    uint32_t type;
    if (!take(c, &type, sizeof(type)))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': truncated type", kv->key);
    if (type >= GGUF_TYPE_COUNT)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': unknown value type %u", kv->key,
                          type);
    kv->type = (enum gguf_type)type;
    kv->value = c->p;
    if (kv->type == GGUF_TYPE_STRING) {
        struct gguf_str s;
        if (!take_str(c, &s))
            return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': truncated string", kv->key);
        return 0;
    }
    if (kv->type != GGUF_TYPE_ARRAY) {
        if (!skip(c, scalar_size(kv->type)))
            return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': truncated value", kv->key);
        return 0;
    }
    uint32_t et;
    uint64_t n;
    if (!take(c, &et, sizeof(et)) || !take(c, &n, sizeof(n)))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': truncated array header",
                          kv->key);
    if (et >= GGUF_TYPE_COUNT)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': unknown array element type %u",
                          kv->key, et);
    if (et == GGUF_TYPE_ARRAY)
        return ckv_errorf(CKV_EFORMAT, err, errlen,
                          "metadata '%s': nested arrays are not supported", kv->key);
    kv->elem_type = (enum gguf_type)et;
    kv->n = n;
    kv->value = c->p;
    if (kv->elem_type != GGUF_TYPE_STRING) {
        size_t es = scalar_size(kv->elem_type);
        if (n > remaining(c) / es)
            return ckv_errorf(CKV_EFORMAT, err, errlen,
                              "metadata '%s': array of %llu %s runs past the end of file", kv->key,
                              (unsigned long long)n, gguf_type_name(kv->elem_type));
        c->p += n * es;
        return 0;
    }
    /* each string takes at least its 8-byte length */
    if (n > remaining(c) / 8)
        return ckv_errorf(CKV_EFORMAT, err, errlen,
                          "metadata '%s': array of %llu strings runs past the end of file", kv->key,
                          (unsigned long long)n);
    kv->strs = malloc((n ? n : 1) * sizeof(*kv->strs));
    if (!kv->strs)
        return -ENOMEM;
    for (uint64_t j = 0; j < n; j++) {
        kv->strs[j] = c->p;
        struct gguf_str s;
        if (!take_str(c, &s))
            return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': string %llu truncated",
                              kv->key, (unsigned long long)j);
    }
    return 0;
}

static int parse_tensor(gguf_t *g, struct cursor *c, uint64_t i, char *err, size_t errlen)
{
    struct gguf_tensor *t = &g->tensors[i];
    struct gguf_str name;
    if (!take_str(c, &name))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor %llu: truncated name",
                          (unsigned long long)i);
    if (name.len == 0 || name.len > GGUF_MAX_NAME_LEN)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor %llu: name length %llu",
                          (unsigned long long)i, (unsigned long long)name.len);
    if (!(t->name = dup_str(&name)))
        return -ENOMEM;
    if (memchr(t->name, '\0', name.len))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor %llu: NUL byte in name",
                          (unsigned long long)i);
    if (!take(c, &t->n_dims, sizeof(t->n_dims)))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor '%s': truncated", t->name);
    if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor '%s': %u dimensions (1..%d allowed)",
                          t->name, t->n_dims, GGUF_MAX_DIMS);
    uint64_t n_elems = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d < t->n_dims && !take(c, &t->ne[d], sizeof(t->ne[d])))
            return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor '%s': truncated shape", t->name);
        if (t->ne[d] == 0 || t->ne[d] > (1ull << 40))
            return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor '%s': dimension %u is %llu",
                              t->name, d, (unsigned long long)t->ne[d]);
        if (n_elems > UINT64_MAX / t->ne[d])
            return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor '%s': element count overflows",
                              t->name);
        n_elems *= t->ne[d];
    }
    uint32_t type;
    if (!take(c, &type, sizeof(type)) || !take(c, &t->offset, sizeof(t->offset)))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor '%s': truncated", t->name);
    t->type = (enum ggml_type)type;
    if (!ggml_type_block_elems(t->type))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor '%s': unknown type %u", t->name, type);
    if (!gguf_tensor_type_supported(t->type)) {
        if (err && errlen)
            snprintf(err, errlen,
                     "tensor '%s': type %s is not supported (F32, F16, BF16, Q8_0, "
                     "Q4_0, Q4_1 are)",
                     t->name, ggml_type_name(t->type));
        return CKV_EUNSUPPORTED;
    }
    uint32_t be = ggml_type_block_elems(t->type);
    if (t->ne[0] % be)
        return ckv_errorf(CKV_EFORMAT, err, errlen,
                          "tensor '%s': row of %llu elements is not a multiple of the %s "
                          "block (%u)",
                          t->name, (unsigned long long)t->ne[0], ggml_type_name(t->type), be);
    if (n_elems / be > UINT64_MAX / ggml_type_block_bytes(t->type))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tensor '%s': size overflows", t->name);
    t->nbytes = n_elems / be * ggml_type_block_bytes(t->type);
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Duplicate names would make lookups ambiguous: sorts a copy of the n names (char * fields at
 * name_off in elements of elem_size bytes) and refuses repeats. */
static int check_unique(const void *elems, uint64_t n, size_t elem_size, size_t name_off,
                        const char *what, char *err, size_t errlen)
{
    if (n < 2)
        return 0;
    const char **names = malloc(n * sizeof(*names));
    if (!names)
        return -ENOMEM;
    for (uint64_t i = 0; i < n; i++)
        memcpy(&names[i], (const char *)elems + i * elem_size + name_off, sizeof(char *));
    qsort(names, n, sizeof(*names), cmp_names);
    int rc = 0;
    for (uint64_t i = 1; i < n && !rc; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s '%s' appears twice", what, names[i]);
    free(names);
    return rc;
}

static int gguf_parse(gguf_t *g, char *err, size_t errlen)
{
    struct cursor c = {g->base, g->base + g->size};
    char magic[4];
    if (!take(&c, magic, 4) || memcmp(magic, GGUF_MAGIC, 4) != 0)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "not a GGUF file (bad magic)");
    if (!take(&c, &g->version, 4))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "truncated header");
    if (g->version != 2 && g->version != 3)
        return ckv_errorf(CKV_EFORMAT, err, errlen,
                          "GGUF version %u is not supported (2 and 3 are)", g->version);
    if (!take(&c, &g->n_tensors, 8) || !take(&c, &g->n_kv, 8))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "truncated header");
    /* a metadata entry takes at least 8 (key len) + 1 (key) + 4 (type) + 1 bytes, a tensor
     * info at least 8 + 1 + 4 + 8 + 4 + 8: refuse counts the file cannot hold before
     * allocating for them */
    if (g->n_kv > remaining(&c) / 14)
        return ckv_errorf(CKV_EFORMAT, err, errlen,
                          "header claims %llu metadata entries, more than the file holds",
                          (unsigned long long)g->n_kv);
    if (g->n_tensors > remaining(&c) / 33)
        return ckv_errorf(CKV_EFORMAT, err, errlen,
                          "header claims %llu tensors, more than the file holds",
                          (unsigned long long)g->n_tensors);
    g->kvs = calloc(g->n_kv ? g->n_kv : 1, sizeof(*g->kvs));
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof(*g->tensors));
    if (!g->kvs || !g->tensors)
        return -ENOMEM;
    int rc;
    for (uint64_t i = 0; i < g->n_kv; i++)
        if ((rc = parse_kv(g, &c, i, err, errlen)) != 0)
            return rc;
    if ((rc = check_unique(g->kvs, g->n_kv, sizeof(*g->kvs), offsetof(struct gguf_kv, key),
                           "metadata key", err, errlen)) != 0)
        return rc;
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t ai = gguf_find_key(g, "general.alignment");
    if (ai >= 0) {
        uint32_t a = 0;
        if ((rc = gguf_get_u32(g, "general.alignment", &a, err, errlen)) != 0)
            return rc;
        if (a == 0 || (a & (a - 1)) != 0 || a > (1u << 20))
            return ckv_errorf(CKV_EFORMAT, err, errlen,
                              "general.alignment %u is not a power of two", a);
        g->alignment = a;
    }
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if ((rc = parse_tensor(g, &c, i, err, errlen)) != 0)
            return rc;
    uint64_t pos = (uint64_t)(c.p - g->base);
    g->data_offset = (pos + g->alignment - 1) / g->alignment * g->alignment;
    if (g->data_offset > g->size && g->n_tensors > 0)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "truncated before the tensor data");
    uint64_t data_size = g->size > g->data_offset ? g->size - g->data_offset : 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        struct gguf_tensor *t = &g->tensors[i];
        if (t->offset % g->alignment)
            return ckv_errorf(CKV_EFORMAT, err, errlen,
                              "tensor '%s': offset %llu is not aligned to %u", t->name,
                              (unsigned long long)t->offset, g->alignment);
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return ckv_errorf(CKV_EFORMAT, err, errlen,
                              "tensor '%s': data [%llu, +%llu) lies outside the file "
                              "(%llu data bytes): truncated file?",
                              t->name, (unsigned long long)t->offset, (unsigned long long)t->nbytes,
                              (unsigned long long)data_size);
        t->data = g->base + g->data_offset + t->offset;
    }
    return check_unique(g->tensors, g->n_tensors, sizeof(*g->tensors),
                        offsetof(struct gguf_tensor, name), "tensor", err, errlen);
}

static void gguf_free(gguf_t *g)
{
    if (g->kvs) {
        for (uint64_t i = 0; i < g->n_kv; i++) {
            free(g->kvs[i].key);
            free(g->kvs[i].strs);
        }
        free(g->kvs);
    }
    if (g->tensors) {
        for (uint64_t i = 0; i < g->n_tensors; i++)
            free(g->tensors[i].name);
        free(g->tensors);
    }
    if (g->mapped)
        munmap((void *)g->base, g->size);
    free(g);
}

int gguf_open_mem(const void *data, size_t size, gguf_t **out, char *err, size_t errlen)
{
    *out = NULL;
    gguf_t *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->base = data;
    g->size = size;
    int rc = gguf_parse(g, err, errlen);
    if (rc) {
        gguf_free(g);
        return rc;
    }
    *out = g;
    return 0;
}

int gguf_open(const char *path, gguf_t **out, char *err, size_t errlen)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (err)
            snprintf(err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        int e = errno ? errno : EINVAL;
        close(fd);
        if (err)
            snprintf(err, errlen, "%s: not a regular file", path);
        return -e;
    }
    if (st.st_size == 0) {
        close(fd);
        if (err)
            snprintf(err, errlen, "%s: empty file", path);
        return CKV_EFORMAT;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (base == MAP_FAILED) {
        if (err)
            snprintf(err, errlen, "%s: mmap: %s", path, strerror(e));
        return -e;
    }
    char msg[512] = "";
    gguf_t *g;
    int rc = gguf_open_mem(base, (size_t)st.st_size, &g, msg, sizeof(msg));
    if (rc) {
        munmap(base, (size_t)st.st_size);
        if (err)
            snprintf(err, errlen, "%s: %s", path, msg[0] ? msg : ckv_strerror(rc));
        return rc;
    }
    g->mapped = true;
    *out = g;
    return 0;
}

void gguf_close(gguf_t **gp)
{
    if (gp && *gp) {
        gguf_free(*gp);
        *gp = NULL;
    }
}

uint32_t gguf_version(const gguf_t *g)
{
    return g->version;
}

uint64_t gguf_n_kv(const gguf_t *g)
{
    return g->n_kv;
}

uint64_t gguf_n_tensors(const gguf_t *g)
{
    return g->n_tensors;
}

size_t gguf_file_size(const gguf_t *g)
{
    return g->size;
}

int64_t gguf_find_key(const gguf_t *g, const char *key)
{
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (strcmp(g->kvs[i].key, key) == 0)
            return (int64_t)i;
    return -1;
}

const char *gguf_key(const gguf_t *g, int64_t i)
{
    ASSERT(i >= 0 && (uint64_t)i < g->n_kv);
    return g->kvs[i].key;
}

enum gguf_type gguf_kv_type(const gguf_t *g, int64_t i)
{
    ASSERT(i >= 0 && (uint64_t)i < g->n_kv);
    return g->kvs[i].type;
}

static const struct gguf_kv *find(const gguf_t *g, const char *key)
{
    int64_t i = gguf_find_key(g, key);
    return i < 0 ? NULL : &g->kvs[i];
}

/* Reads an integer-typed value as int64 (uint64 above INT64_MAX is refused). */
static bool read_int(enum gguf_type t, const uint8_t *p, int64_t *out)
{
    switch (t) {
    case GGUF_TYPE_UINT8: *out = *p; return true;
    case GGUF_TYPE_INT8: *out = (int8_t)*p; return true;
    case GGUF_TYPE_UINT16: {
        uint16_t v;
        memcpy(&v, p, 2);
        *out = v;
        return true;
    }
    case GGUF_TYPE_INT16: {
        int16_t v;
        memcpy(&v, p, 2);
        *out = v;
        return true;
    }
    case GGUF_TYPE_UINT32: {
        uint32_t v;
        memcpy(&v, p, 4);
        *out = v;
        return true;
    }
    case GGUF_TYPE_INT32: {
        int32_t v;
        memcpy(&v, p, 4);
        *out = v;
        return true;
    }
    case GGUF_TYPE_UINT64: {
        uint64_t v;
        memcpy(&v, p, 8);
        if (v > INT64_MAX)
            return false;
        *out = (int64_t)v;
        return true;
    }
    case GGUF_TYPE_INT64: {
        int64_t v;
        memcpy(&v, p, 8);
        *out = v;
        return true;
    }
    default: return false;
    }
}

int gguf_get_i64(const gguf_t *g, const char *key, int64_t *out, char *err, size_t errlen)
{
    const struct gguf_kv *kv = find(g, key);
    if (!kv)
        return -ENOENT;
    if (!read_int(kv->type, kv->value, out))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': %s is not an integer in range",
                          key, gguf_type_name(kv->type));
    return 0;
}

int gguf_get_u32(const gguf_t *g, const char *key, uint32_t *out, char *err, size_t errlen)
{
    int64_t v;
    int rc = gguf_get_i64(g, key, &v, err, errlen);
    if (rc)
        return rc;
    if (v < 0 || v > UINT32_MAX)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': %lld does not fit in 32 bits",
                          key, (long long)v);
    *out = (uint32_t)v;
    return 0;
}

int gguf_get_f32(const gguf_t *g, const char *key, float *out, char *err, size_t errlen)
{
    const struct gguf_kv *kv = find(g, key);
    if (!kv)
        return -ENOENT;
    if (kv->type == GGUF_TYPE_FLOAT32) {
        memcpy(out, kv->value, 4);
        return 0;
    }
    if (kv->type == GGUF_TYPE_FLOAT64) {
        double d;
        memcpy(&d, kv->value, 8);
        *out = (float)d;
        return 0;
    }
    return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': %s is not a float", key,
                      gguf_type_name(kv->type));
}

int gguf_get_bool(const gguf_t *g, const char *key, bool *out, char *err, size_t errlen)
{
    const struct gguf_kv *kv = find(g, key);
    if (!kv)
        return -ENOENT;
    if (kv->type != GGUF_TYPE_BOOL)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': %s is not a bool", key,
                          gguf_type_name(kv->type));
    *out = kv->value[0] != 0;
    return 0;
}

static void str_at(const uint8_t *p, struct gguf_str *s)
{
    memcpy(&s->len, p, 8);
    s->ptr = (const char *)p + 8;
}

int gguf_get_str(const gguf_t *g, const char *key, struct gguf_str *out, char *err, size_t errlen)
{
    const struct gguf_kv *kv = find(g, key);
    if (!kv)
        return -ENOENT;
    if (kv->type != GGUF_TYPE_STRING)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': %s is not a string", key,
                          gguf_type_name(kv->type));
    str_at(kv->value, out);
    return 0;
}

int gguf_get_arr(const gguf_t *g, const char *key, enum gguf_type *elem_type, uint64_t *n,
                 const void **data, char *err, size_t errlen)
{
    const struct gguf_kv *kv = find(g, key);
    if (!kv)
        return -ENOENT;
    if (kv->type != GGUF_TYPE_ARRAY)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': %s is not an array", key,
                          gguf_type_name(kv->type));
    *elem_type = kv->elem_type;
    *n = kv->n;
    *data = kv->value;
    return 0;
}

int gguf_get_arr_str(const gguf_t *g, const char *key, uint64_t i, struct gguf_str *out)
{
    const struct gguf_kv *kv = find(g, key);
    if (!kv)
        return -ENOENT;
    if (kv->type != GGUF_TYPE_ARRAY || kv->elem_type != GGUF_TYPE_STRING || i >= kv->n)
        return CKV_EFORMAT;
    str_at(kv->strs[i], out);
    return 0;
}

const struct gguf_tensor *gguf_tensor(const gguf_t *g, uint64_t i)
{
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const struct gguf_tensor *gguf_find_tensor(const gguf_t *g, const char *name)
{
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0)
            return &g->tensors[i];
    return NULL;
}
