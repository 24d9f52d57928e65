/*
 * Suite "gguf": the GGUF reader on images built here byte by byte (every malformation the
 * reader must refuse, every truncation, random corruption) and on the real default model.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "gguf.h"

/* ---- a tiny GGUF writer for building test images ---- */

struct img {
    uint8_t *p;
    size_t len, cap;
};

static void put(struct img *m, const void *d, size_t n)
{
    if (m->len + n > m->cap) {
        m->cap = (m->len + n) * 2 + 64;
        m->p = realloc(m->p, m->cap);
        cr_assert_not_null(m->p);
    }
    memcpy(m->p + m->len, d, n);
    m->len += n;
}
static void put_u32(struct img *m, uint32_t v) { put(m, &v, 4); }
static void put_u64(struct img *m, uint64_t v) { put(m, &v, 8); }
static void put_f32(struct img *m, float v) { put(m, &v, 4); }
static void put_str(struct img *m, const char *s)
{
    put_u64(m, strlen(s));
    put(m, s, strlen(s));
}
static void pad_to(struct img *m, size_t align)
{
    while (m->len % align)
        put(m, "", 1);
}

struct tinfo {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t offset;
};

/* header + kvs are written by the caller; this writes tensor infos and data */
static void put_tensors(struct img *m, const struct tinfo *t, int n, size_t data_bytes)
{
    for (int i = 0; i < n; i++) {
        put_str(m, t[i].name);
        put_u32(m, t[i].n_dims);
        for (uint32_t d = 0; d < t[i].n_dims; d++)
            put_u64(m, t[i].ne[d]);
        put_u32(m, t[i].type);
        put_u64(m, t[i].offset);
    }
    pad_to(m, 32);
    for (size_t i = 0; i < data_bytes; i++) {
        uint8_t b = (uint8_t)(i * 7 + 1);
        put(m, &b, 1);
    }
}

static void put_header(struct img *m, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    put(m, "GGUF", 4);
    put_u32(m, version);
    put_u64(m, n_tensors);
    put_u64(m, n_kv);
}

/* A valid image: 5 metadata entries, two tensors (F32 3x2 at 0, Q4_1 64x2 at 32). */
static struct img valid_image(void)
{
    struct img m = {0};
    put_header(&m, 3, 2, 5);
    put_str(&m, "general.architecture");
    put_u32(&m, GGUF_TYPE_STRING);
    put_str(&m, "llama");
    put_str(&m, "llama.block_count");
    put_u32(&m, GGUF_TYPE_UINT32);
    put_u32(&m, 30);
    put_str(&m, "llama.rope.freq_base");
    put_u32(&m, GGUF_TYPE_FLOAT32);
    put_f32(&m, 100000.0f);
    put_str(&m, "tokenizer.ggml.tokens");
    put_u32(&m, GGUF_TYPE_ARRAY);
    put_u32(&m, GGUF_TYPE_STRING);
    put_u64(&m, 3);
    put_str(&m, "<s>");
    put_str(&m, "hello");
    put_str(&m, "");
    put_str(&m, "tokenizer.ggml.scores");
    put_u32(&m, GGUF_TYPE_ARRAY);
    put_u32(&m, GGUF_TYPE_FLOAT32);
    put_u64(&m, 3);
    put_f32(&m, -1.0f);
    put_f32(&m, -2.0f);
    put_f32(&m, -3.5f);
    const struct tinfo t[] = {
        {"a.weight", 2, {3, 2}, GGML_TYPE_F32, 0},
        {"b.weight", 2, {64, 2}, GGML_TYPE_Q4_1, 32},
    };
    put_tensors(&m, t, 2, 32 + 2 * 2 * 20);
    return m;
}

static int open_img(const struct img *m, gguf_t **g, char *err)
{
    return gguf_open_mem(m->p, m->len, g, err, 256);
}

Test(gguf, reads_a_valid_image)
{
    struct img m = valid_image();
    gguf_t *g;
    char err[256] = "";
    cr_assert_eq(open_img(&m, &g, err), 0, "%s", err);
    cr_assert_eq(gguf_version(g), 3);
    cr_assert_eq(gguf_n_kv(g), 5);
    cr_assert_eq(gguf_n_tensors(g), 2);
    struct gguf_str s;
    cr_assert_eq(gguf_get_str(g, "general.architecture", &s, err, sizeof(err)), 0);
    cr_assert_eq(s.len, 5);
    cr_assert_eq(memcmp(s.ptr, "llama", 5), 0);
    uint32_t u;
    cr_assert_eq(gguf_get_u32(g, "llama.block_count", &u, err, sizeof(err)), 0);
    cr_assert_eq(u, 30);
    float f;
    cr_assert_eq(gguf_get_f32(g, "llama.rope.freq_base", &f, err, sizeof(err)), 0);
    cr_assert_eq(f, 100000.0f);
    cr_assert_eq(gguf_get_u32(g, "missing.key", &u, err, sizeof(err)), -ENOENT);
    cr_assert_eq(gguf_get_u32(g, "general.architecture", &u, err, sizeof(err)), CKV_EFORMAT);
    cr_assert(strstr(err, "general.architecture"), "%s", err);
    enum gguf_type et;
    uint64_t n;
    const void *data;
    cr_assert_eq(gguf_get_arr(g, "tokenizer.ggml.scores", &et, &n, &data, err, sizeof(err)), 0);
    cr_assert_eq(et, GGUF_TYPE_FLOAT32);
    cr_assert_eq(n, 3);
    memcpy(&f, (const char *)data + 8, 4);
    cr_assert_eq(f, -3.5f);
    cr_assert_eq(gguf_get_arr_str(g, "tokenizer.ggml.tokens", 1, &s), 0);
    cr_assert_eq(s.len, 5);
    cr_assert_eq(memcmp(s.ptr, "hello", 5), 0);
    cr_assert_eq(gguf_get_arr_str(g, "tokenizer.ggml.tokens", 2, &s), 0);
    cr_assert_eq(s.len, 0);
    cr_assert_eq(gguf_get_arr_str(g, "tokenizer.ggml.tokens", 3, &s), CKV_EFORMAT);
    const struct gguf_tensor *t = gguf_find_tensor(g, "b.weight");
    cr_assert_not_null(t);
    cr_assert_eq(t->type, GGML_TYPE_Q4_1);
    cr_assert_eq(t->ne[0], 64);
    cr_assert_eq(t->ne[1], 2);
    cr_assert_eq(t->ne[2], 1);
    cr_assert_eq(t->nbytes, 80);
    const struct gguf_tensor *a = gguf_tensor(g, 0);
    cr_assert_eq(a->nbytes, 24);
    /* data starts at the aligned data section; b sits 32 bytes later */
    cr_assert_eq((const uint8_t *)t->data - (const uint8_t *)a->data, 32);
    cr_assert_eq(((uintptr_t)a->data - (uintptr_t)m.p) % 32, 0);
    cr_assert_eq(*(const uint8_t *)a->data, 1, "first data byte as written");
    cr_assert_null(gguf_find_tensor(g, "nope"));
    gguf_close(&g);
    cr_assert_null(g);
    free(m.p);
}

/* Every strict prefix of a valid image is refused with an error, never a crash. */
Test(gguf, every_truncation_is_an_error)
{
    struct img m = valid_image();
    for (size_t len = 0; len < m.len; len++) {
        uint8_t *copy = malloc(len ? len : 1); /* exact-size copy so ASan sees overreads */
        memcpy(copy, m.p, len);
        gguf_t *g = NULL;
        char err[256] = "";
        int rc = gguf_open_mem(copy, len, &g, err, sizeof(err));
        cr_assert_lt(rc, 0, "prefix of %zu/%zu bytes accepted", len, m.len);
        cr_assert_null(g);
        cr_assert_neq(err[0], '\0', "no message for prefix %zu", len);
        free(copy);
    }
    free(m.p);
}

/* Random corruption: the reader returns (0 or an error) and every tensor it accepts lies inside
 * the image. */
Test(gguf, random_corruption_never_reads_outside)
{
    struct img m = valid_image();
    srand(1234);
    uint8_t *copy = malloc(m.len);
    for (int iter = 0; iter < 20000; iter++) {
        memcpy(copy, m.p, m.len);
        int flips = 1 + rand() % 4;
        for (int f = 0; f < flips; f++)
            copy[rand() % m.len] = (uint8_t)rand();
        gguf_t *g = NULL;
        char err[256];
        if (gguf_open_mem(copy, m.len, &g, err, sizeof(err)) == 0) {
            for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
                const struct gguf_tensor *t = gguf_tensor(g, i);
                cr_assert((const uint8_t *)t->data >= copy);
                cr_assert((const uint8_t *)t->data + t->nbytes <= copy + m.len);
            }
            gguf_close(&g);
        }
    }
    free(copy);
    free(m.p);
}

/* One malformed image per case, each with the message it must produce. */
struct bad_case {
    const char *what;
    struct img m;
    int rc;
    const char *expect;
};

static struct img tensor_image(const struct tinfo *t, int n, size_t data_bytes)
{
    struct img m = {0};
    put_header(&m, 3, (uint64_t)n, 0);
    put_tensors(&m, t, n, data_bytes);
    return m;
}

Test(gguf, malformed_images_are_refused_by_name)
{
    struct bad_case cases[32];
    int nc = 0;
    struct img m;

    m = (struct img){0};
    put(&m, "GGUX", 4);
    put_u32(&m, 3);
    put_u64(&m, 0);
    put_u64(&m, 0);
    cases[nc++] = (struct bad_case){"magic", m, CKV_EFORMAT, "bad magic"};

    m = (struct img){0};
    put_header(&m, 7, 0, 0);
    cases[nc++] = (struct bad_case){"version", m, CKV_EFORMAT, "version 7"};

    m = (struct img){0};
    put_header(&m, 3, 0, 1ull << 60);
    cases[nc++] = (struct bad_case){"n_kv", m, CKV_EFORMAT, "metadata entries, more than"};

    m = (struct img){0};
    put_header(&m, 3, 1ull << 40, 0);
    cases[nc++] = (struct bad_case){"n_tensors", m, CKV_EFORMAT, "tensors, more than"};

    m = (struct img){0};
    put_header(&m, 3, 0, 1);
    put_u64(&m, 1ull << 62);
    put(&m, "key and some more bytes", 23);
    cases[nc++] = (struct bad_case){"key length", m, CKV_EFORMAT, "truncated key"};

    m = (struct img){0};
    put_header(&m, 3, 0, 1);
    put_str(&m, "k");
    put_u32(&m, 77);
    put_u32(&m, 0);
    cases[nc++] = (struct bad_case){"value type", m, CKV_EFORMAT, "'k': unknown value type 77"};

    m = (struct img){0};
    put_header(&m, 3, 0, 1);
    put_str(&m, "k");
    put_u32(&m, GGUF_TYPE_ARRAY);
    put_u32(&m, GGUF_TYPE_ARRAY);
    put_u64(&m, 1);
    cases[nc++] = (struct bad_case){"nested", m, CKV_EFORMAT, "'k': nested arrays"};

    m = (struct img){0};
    put_header(&m, 3, 0, 1);
    put_str(&m, "k");
    put_u32(&m, GGUF_TYPE_ARRAY);
    put_u32(&m, GGUF_TYPE_UINT32);
    put_u64(&m, 1ull << 61);
    put_u32(&m, 5);
    cases[nc++] = (struct bad_case){"array len", m, CKV_EFORMAT, "'k': array of"};

    m = (struct img){0};
    put_header(&m, 3, 0, 1);
    put_str(&m, "k");
    put_u32(&m, GGUF_TYPE_STRING);
    put_u64(&m, 1000);
    put(&m, "short", 5);
    cases[nc++] = (struct bad_case){"string len", m, CKV_EFORMAT, "'k': truncated string"};

    m = (struct img){0};
    put_header(&m, 3, 0, 2);
    put_str(&m, "k");
    put_u32(&m, GGUF_TYPE_UINT8);
    put(&m, "\1", 1);
    put_str(&m, "k");
    put_u32(&m, GGUF_TYPE_UINT8);
    put(&m, "\2", 1);
    cases[nc++] = (struct bad_case){"dup key", m, CKV_EFORMAT, "metadata key 'k' appears twice"};

    m = (struct img){0};
    put_header(&m, 3, 0, 1);
    put_str(&m, "general.alignment");
    put_u32(&m, GGUF_TYPE_UINT32);
    put_u32(&m, 24);
    cases[nc++] = (struct bad_case){"alignment", m, CKV_EFORMAT, "not a power of two"};

    {
        const struct tinfo t[] = {{"t0", 0, {4}, GGML_TYPE_F32, 0}};
        cases[nc++] = (struct bad_case){"n_dims 0", tensor_image(t, 1, 64), CKV_EFORMAT,
                                        "'t0': 0 dimensions"};
    }
    {
        const struct tinfo t[] = {{"t1", 2, {4, 0}, GGML_TYPE_F32, 0}};
        cases[nc++] = (struct bad_case){"dim 0", tensor_image(t, 1, 64), CKV_EFORMAT,
                                        "'t1': dimension 1 is 0"};
    }
    {
        const struct tinfo t[] = {{"t2", 1, {256}, GGML_TYPE_Q6_K, 0}};
        cases[nc++] = (struct bad_case){"unsupported", tensor_image(t, 1, 256), CKV_EUNSUPPORTED,
                                        "'t2': type Q6_K is not supported"};
    }
    {
        const struct tinfo t[] = {{"t3", 1, {4}, 99, 0}};
        cases[nc++] = (struct bad_case){"unknown type", tensor_image(t, 1, 64), CKV_EFORMAT,
                                        "'t3': unknown type 99"};
    }
    {
        const struct tinfo t[] = {{"t4", 1, {4}, GGML_TYPE_F32, 8}};
        cases[nc++] = (struct bad_case){"misaligned", tensor_image(t, 1, 64), CKV_EFORMAT,
                                        "'t4': offset 8 is not aligned"};
    }
    {
        const struct tinfo t[] = {{"t5", 1, {64}, GGML_TYPE_F32, 0}};
        cases[nc++] = (struct bad_case){"past end", tensor_image(t, 1, 100), CKV_EFORMAT,
                                        "'t5': data [0, +256) lies outside the file"};
    }
    {
        const struct tinfo t[] = {{"t6", 1, {4}, GGML_TYPE_F32, 1ull << 62}};
        cases[nc++] = (struct bad_case){"huge offset", tensor_image(t, 1, 64), CKV_EFORMAT,
                                        "'t6': data"};
    }
    {
        const struct tinfo t[] = {{"t7", 1, {4}, GGML_TYPE_F32, 0}, {"t7", 1, {4}, GGML_TYPE_F32, 32}};
        cases[nc++] = (struct bad_case){"dup tensor", tensor_image(t, 2, 64), CKV_EFORMAT,
                                        "tensor 't7' appears twice"};
    }
    {
        const struct tinfo t[] = {{"t8", 1, {48}, GGML_TYPE_Q8_0, 0}};
        cases[nc++] = (struct bad_case){"block", tensor_image(t, 1, 64), CKV_EFORMAT,
                                        "'t8': row of 48 elements is not a multiple"};
    }
    {
        const struct tinfo t[] = {{"t9", 4, {1ull << 40, 1ull << 40, 1ull << 40, 2}, GGML_TYPE_F32, 0}};
        cases[nc++] = (struct bad_case){"overflow", tensor_image(t, 1, 64), CKV_EFORMAT,
                                        "'t9': element count overflows"};
    }

    for (int i = 0; i < nc; i++) {
        gguf_t *g = NULL;
        char err[256] = "";
        int rc = gguf_open_mem(cases[i].m.p, cases[i].m.len, &g, err, sizeof(err));
        cr_assert_eq(rc, cases[i].rc, "%s: rc %d (%s)", cases[i].what, rc, err);
        cr_assert(strstr(err, cases[i].expect), "%s: got '%s', want '%s'", cases[i].what, err,
                  cases[i].expect);
        cr_assert_null(g);
        free(cases[i].m.p);
    }
}

Test(gguf, file_errors_name_the_path)
{
    gguf_t *g;
    char err[256] = "";
    cr_assert_eq(gguf_open("/nonexistent/model.gguf", &g, err, sizeof(err)), -ENOENT);
    cr_assert(strstr(err, "/nonexistent/model.gguf"), "%s", err);
    cr_assert_lt(gguf_open("/dev/null", &g, err, sizeof(err)), 0);
    cr_assert_lt(gguf_open("/tmp", &g, err, sizeof(err)), 0);
}

/* The default model, when present (deploy/fetch-model.sh; required when CKV_REQUIRE_MODEL=1). */
Test(gguf, reads_the_default_model)
{
    char path[512];
    const char *dir = getenv("CKV_MODEL_DIR");
    const char *home = getenv("HOME");
    if (dir)
        snprintf(path, sizeof(path), "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    else
        snprintf(path, sizeof(path), "%s/.cache/clusterkv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 home ? home : "/root");
    FILE *f = fopen(path, "rb");
    if (!f) {
        cr_assert_null(getenv("CKV_REQUIRE_MODEL"), "model %s missing", path);
        cr_skip_test("default model not fetched (deploy/fetch-model.sh)");
    }
    fclose(f);
    gguf_t *g;
    char err[512] = "";
    cr_assert_eq(gguf_open(path, &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(gguf_n_tensors(g), 272);
    struct gguf_str arch;
    cr_assert_eq(gguf_get_str(g, "general.architecture", &arch, err, sizeof(err)), 0);
    cr_assert_eq(arch.len, 5);
    cr_assert_eq(memcmp(arch.ptr, "llama", 5), 0);
    uint32_t heads = 0, kv_heads = 0;
    cr_assert_eq(gguf_get_u32(g, "llama.attention.head_count", &heads, err, sizeof(err)), 0);
    cr_assert_eq(gguf_get_u32(g, "llama.attention.head_count_kv", &kv_heads, err, sizeof(err)), 0);
    cr_assert_eq(heads, 9);
    cr_assert_eq(kv_heads, 3);
    const struct gguf_tensor *emb = gguf_find_tensor(g, "token_embd.weight");
    cr_assert_not_null(emb);
    cr_assert_eq(emb->type, GGML_TYPE_Q8_0);
    cr_assert_eq(emb->ne[0], 576);
    cr_assert_eq(emb->ne[1], 49152);
    enum gguf_type et;
    uint64_t n;
    const void *data;
    cr_assert_eq(gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n, &data, err, sizeof(err)), 0);
    cr_assert_eq(et, GGUF_TYPE_STRING);
    cr_assert_eq(n, 49152);
    gguf_close(&g);
}
