/*
 * Suite "kernels_qkv": the Q/K/V dump format (docs/QKV_DUMP.md) and the synthetic data.
 *
 * Asserted: a written dump reads back bit-exact (f16 and f32, strided prompt input); it can
 * be read while still being written (records are whole after every step); a partial last
 * record is dropped and flagged; every malformed input (bad magic, version, header fields,
 * positions, record magic, non-finite values, a file shorter than its header promises, an
 * absent file) is an error that names the problem, never a crash; synthetic data is
 * deterministic in its seed and has the structure the evaluation relies on.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckv_error.h"
#include "ckv_qkv.h"
#include "ckv_test.h"
#include "ktest.h"

static char dir[512], path[600];

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    snprintf(path, sizeof(path), "%s/layer-03.qkv", dir);
}

static void teardown(void)
{
    ckv_test_rmrf(dir);
}

/* Writes a dump of n_prompt tokens and n_steps steps from a synthetic set; returns it. */
static void write_dump(const struct ckv_qkv *s, int n_steps_to_write)
{
    struct ckv_qkv_writer *w = NULL;
    size_t esz = ckv_dtype_size(s->dtype);
    cr_assert_eq(ckv_qkv_writer_open(path, 3, s->n_q_heads, s->n_kv_heads, s->head_dim, s->dtype,
                                     s->n_prompt, s->k, s->v, (size_t)s->n_ctx * s->head_dim,
                                     (size_t)s->head_dim, &w),
                 0);
    size_t row = (size_t)s->head_dim * esz;
    char *k = malloc(row * s->n_kv_heads), *v = malloc(row * s->n_kv_heads);
    for (int st = 0; st < n_steps_to_write; st++) {
        int t = s->n_prompt + st;
        for (int h = 0; h < s->n_kv_heads; h++) {
            memcpy(k + h * row, (char *)s->k + ckv_qkv_kv_index(s, h, t) * esz, row);
            memcpy(v + h * row, (char *)s->v + ckv_qkv_kv_index(s, h, t) * esz, row);
        }
        cr_assert_eq(
            ckv_qkv_writer_step(w, t, s->q + (size_t)st * s->n_q_heads * s->head_dim, k, v), 0);
        if (st == 0) { /* readable mid-write: one whole step so far */
            struct ckv_qkv mid;
            char err[256];
            cr_assert_eq(ckv_qkv_read(path, &mid, err, sizeof(err)), 0, "%s", err);
            cr_assert_eq(mid.n_steps, 1);
            cr_assert_eq(mid.truncated, 0);
            ckv_qkv_free(&mid);
        }
    }
    cr_assert_eq(ckv_qkv_writer_step(w, 12345, s->q, k, v), -EINVAL); /* wrong position */
    cr_assert_eq(ckv_qkv_writer_close(&w), 0);
    cr_assert_null(w);
    free(k), free(v);
}

static void assert_same(const struct ckv_qkv *a, const struct ckv_qkv *b)
{
    cr_assert_eq(a->n_q_heads, b->n_q_heads);
    cr_assert_eq(a->n_kv_heads, b->n_kv_heads);
    cr_assert_eq(a->head_dim, b->head_dim);
    cr_assert_eq(a->dtype, b->dtype);
    cr_assert_eq(a->n_prompt, b->n_prompt);
    cr_assert_eq(a->n_steps, b->n_steps);
    size_t esz = ckv_dtype_size(a->dtype);
    for (int h = 0; h < a->n_kv_heads; h++) {
        size_t n = (size_t)a->n_ctx * a->head_dim * esz;
        cr_assert_arr_eq((char *)a->k + ckv_qkv_kv_index(a, h, 0) * esz,
                         (char *)b->k + ckv_qkv_kv_index(b, h, 0) * esz, n);
        cr_assert_arr_eq((char *)a->v + ckv_qkv_kv_index(a, h, 0) * esz,
                         (char *)b->v + ckv_qkv_kv_index(b, h, 0) * esz, n);
    }
    cr_assert_arr_eq(a->q, b->q, sizeof(float) * a->n_steps * a->n_q_heads * a->head_dim);
}

Test(kernels_qkv, round_trip, .init = setup, .fini = teardown)
{
    for (int dt = CKV_DTYPE_F32; dt <= CKV_DTYPE_F16; dt++) {
        struct ckv_qkv_synth_params p;
        ckv_qkv_synth_defaults(&p, 12, 4, 64, 100, 7);
        p.dtype = (enum ckv_dtype)dt;
        struct ckv_qkv s, r;
        cr_assert_eq(ckv_qkv_synth(&p, &s), 0);
        write_dump(&s, s.n_steps);
        char err[256];
        cr_assert_eq(ckv_qkv_read(path, &r, err, sizeof(err)), 0, "%s", err);
        cr_assert_eq(r.layer, 3);
        cr_assert_eq(r.truncated, 0);
        assert_same(&s, &r);
        ckv_qkv_free(&s);
        ckv_qkv_free(&r);
    }
}

static long file_size(void)
{
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fclose(f);
    return n;
}

static void patch(long off, const void *bytes, size_t n)
{
    FILE *f = fopen(path, "r+b");
    fseek(f, off, SEEK_SET);
    fwrite(bytes, 1, n, f);
    fclose(f);
}

/* Expects the read to fail with rc and a message containing `word`. */
static void expect_error(int rc_want, const char *word)
{
    struct ckv_qkv r;
    char err[256] = "";
    int rc = ckv_qkv_read(path, &r, err, sizeof(err));
    cr_assert_eq(rc, rc_want, "rc %d (%s), want %d", rc, err, rc_want);
    cr_assert(strstr(err, word), "message '%s' does not say '%s'", err, word);
    cr_assert_null(r.k);
}

Test(kernels_qkv, truncated_and_corrupt, .init = setup, .fini = teardown)
{
    struct ckv_qkv_synth_params p;
    ckv_qkv_synth_defaults(&p, 4, 2, 64, 40, 3);
    struct ckv_qkv s, r;
    cr_assert_eq(ckv_qkv_synth(&p, &s), 0);
    write_dump(&s, 3);
    long full = file_size();
    long rec = 8 + 4 * 64 * 4 + 2 * 2 * 64 * 2;
    long prompt_end = 64 + 2L * 2 * 40 * 64 * 2;
    cr_assert_eq(full, prompt_end + 3 * rec);
    char err[256];
    /* a partial last record (killed writer): dropped, flagged */
    cr_assert_eq(truncate(path, full - 10), 0);
    cr_assert_eq(ckv_qkv_read(path, &r, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(r.n_steps, 2);
    cr_assert_eq(r.truncated, 1);
    ckv_qkv_free(&r);
    /* no whole step at all */
    cr_assert_eq(truncate(path, prompt_end + 5), 0);
    expect_error(CKV_EFORMAT, "no decode step");
    /* shorter than the prompt */
    cr_assert_eq(truncate(path, prompt_end - 1), 0);
    expect_error(CKV_EFORMAT, "prompt");
    cr_assert_eq(truncate(path, 10), 0);
    expect_error(CKV_EFORMAT, "header");

    write_dump(&s, 3);
    patch(0, "XKVQKV01", 8);
    expect_error(CKV_EFORMAT, "magic");
    write_dump(&s, 3);
    unsigned char v2[4] = {2, 0, 0, 0};
    patch(8, v2, 4);
    expect_error(CKV_EFORMAT, "version");
    write_dump(&s, 3);
    unsigned char three[4] = {3, 0, 0, 0}; /* n_kv_heads 3 does not divide 4 q heads */
    patch(24, three, 4);
    expect_error(CKV_EFORMAT, "bad header");
    write_dump(&s, 3);
    unsigned char huge[4] = {0xff, 0xff, 0xff, 0x7f}; /* n_prompt */
    patch(36, huge, 4);
    expect_error(CKV_ETOOBIG, "limit");
    write_dump(&s, 3);
    unsigned char pos[4] = {99, 0, 0, 0}; /* step 1's position */
    patch(prompt_end + rec + 4, pos, 4);
    expect_error(CKV_EFORMAT, "position");
    write_dump(&s, 3);
    float nan = NAN;
    patch(prompt_end + 2 * rec + 8 + 4, &nan, 4);
    expect_error(CKV_EFORMAT, "non-finite");
    write_dump(&s, 3);
    uint16_t inf = 0x7c00; /* an f16 inf in the prompt K */
    patch(64 + 2 * 64 * 7, &inf, 2);
    expect_error(CKV_EFORMAT, "non-finite");
    unlink(path);
    struct ckv_qkv none;
    cr_assert_eq(ckv_qkv_read(path, &none, err, sizeof(err)), -ENOENT);
    ckv_qkv_free(&s);
}

Test(kernels_qkv, writer_bad_arguments, .init = setup, .fini = teardown)
{
    struct ckv_qkv_writer *w = NULL;
    float kv[64] = {0};
    cr_assert_eq(ckv_qkv_writer_open(path, 0, 3, 2, 64, CKV_DTYPE_F32, 1, kv, kv, 64, 64, &w),
                 -EINVAL);
    cr_assert_eq(ckv_qkv_writer_open(path, 0, 2, 2, 0, CKV_DTYPE_F32, 1, kv, kv, 64, 64, &w),
                 -EINVAL);
    cr_assert_eq(ckv_qkv_writer_open(path, 0, 2, 2, 64, CKV_DTYPE_F32, 1, NULL, kv, 64, 64, &w),
                 -EINVAL);
    cr_assert_eq(ckv_qkv_writer_open("/nonexistent-dir/x.qkv", 0, 2, 2, 64, CKV_DTYPE_F32, 0, NULL,
                                     NULL, 64, 64, &w),
                 -ENOENT);
    cr_assert_null(w);
}

Test(kernels_qkv, synthetic_is_deterministic_and_structured)
{
    struct ckv_qkv_synth_params p;
    ckv_qkv_synth_defaults(&p, 8, 2, 64, 2000, 5);
    struct ckv_qkv a, b;
    cr_assert_eq(ckv_qkv_synth(&p, &a), 0);
    cr_assert_eq(ckv_qkv_synth(&p, &b), 0);
    assert_same(&a, &b);
    ckv_qkv_free(&b);
    p.seed = 2;
    cr_assert_eq(ckv_qkv_synth(&p, &b), 0);
    cr_assert(memcmp(a.q, b.q, sizeof(float) * 64) != 0, "another seed, other data");
    ckv_qkv_free(&b);
    /* structure: attention is concentrated, the top 10% of tokens hold most of the mass */
    int n = a.n_prompt + 1;
    float *s = malloc(sizeof(float) * n);
    double top_mass = 0;
    for (int qh = 0; qh < a.n_q_heads; qh++) {
        const float *q = a.q + (size_t)qh * 64;
        double mx = -INFINITY, sum = 0;
        for (int t = 0; t < n; t++) {
            double x = 0;
            for (int i = 0; i < 64; i++)
                x += q[i] * ckv_half_to_f32(((uint16_t *)a.k)[ckv_qkv_kv_index(&a, qh / 4, t) + i]);
            s[t] = (float)(x / 8.0);
            mx = fmax(mx, s[t]);
        }
        for (int t = 0; t < n; t++)
            sum += exp(s[t] - mx);
        /* mass of the 200 largest: a partial selection sort is enough here */
        double m = 0;
        for (int k = 0; k < 200; k++) {
            int best = 0;
            for (int t = 1; t < n; t++)
                if (s[t] > s[best])
                    best = t;
            m += exp(s[best] - mx);
            s[best] = -INFINITY;
        }
        top_mass += m / sum / a.n_q_heads;
    }
    cr_assert(top_mass > 0.5 && top_mass < 0.99, "top-10%% mass %.3f", top_mass);
    free(s);
    ckv_qkv_free(&a);
    struct ckv_qkv_synth_params bad = p;
    bad.n_q_heads = 3;
    cr_assert_eq(ckv_qkv_synth(&bad, &a), -EINVAL);
}
