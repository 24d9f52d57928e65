/*
 * Suite "kernels_attn": decode attention over a contiguous cache and over block lists, and
 * causal prefill, on every ISA with 1 and 2 threads, against the double-precision references
 * of ckv_ref.h on fresh random inputs.
 *
 * Tolerance: outputs are convex combinations of V rows (values ~N(0,1), so |out| <= ~4); the
 * kernels accumulate in f32 with an online softmax, the reference in double: we require
 * max |out - ref| <= ATTN_TOL = 2e-5 and max |lse - ref| <= LSE_TOL = 1e-4 (lse ~ log n_ctx
 * plus a few units). f16 inputs are the same halves for both, so no conversion error enters.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ktest.h"

#define ATTN_TOL 2e-5f
#define LSE_TOL  1e-4f

struct full_case {
    int nq, nkv, d, n_ctx;
    enum ckv_dtype dt;
    int token_major; /* layout (t, h, d) instead of (h, t, d) */
    float k_sd;      /* key scale: larger gives peakier softmax */
};

static void check_full(ckv_ctx_t *ctx, const struct full_case *c, uint64_t seed)
{
    struct ktest_rng rng = {seed};
    size_t nkv_elems = (size_t)c->nkv * c->n_ctx * c->d;
    float *q = malloc(sizeof(float) * (size_t)c->nq * c->d);
    ktest_fill_normal(&rng, q, (size_t)c->nq * c->d, 1.0f);
    void *k = ktest_random_kv(&rng, nkv_elems + 1, c->dt, c->k_sd);
    void *v = ktest_random_kv(&rng, nkv_elems + 1, c->dt, 1.0f);
    float *out = malloc(sizeof(float) * (size_t)c->nq * c->d), *lse = malloc(sizeof(float) * c->nq);
    float *ref = malloc(sizeof(float) * (size_t)c->nq * c->d),
          *rlse = malloc(sizeof(float) * c->nq);
    struct ckv_attn_full_args a = {
        .n_q_heads = c->nq,
        .n_kv_heads = c->nkv,
        .head_dim = c->d,
        .n_ctx = c->n_ctx,
        .q = q,
        .k = k,
        .v = v,
        .dtype = c->dt,
        .head_stride = c->token_major ? (size_t)c->d : (size_t)c->n_ctx * c->d,
        .token_stride = c->token_major ? (size_t)c->nkv * c->d : (size_t)c->d,
        .out = out,
        .lse = lse};
    cr_assert_eq(ckv_attn_decode_full(ctx, &a), 0);
    a.out = ref;
    a.lse = rlse;
    cr_assert_eq(ckv_ref_attn_decode_full(&a), 0);
    float mb, err = ktest_max_abs_diff(out, ref, (size_t)c->nq * c->d, &mb);
    cr_assert(err <= ATTN_TOL, "%s nq=%d nkv=%d d=%d n=%d %s: out err %g (max |ref| %g)",
              ckv_ctx_describe(ctx), c->nq, c->nkv, c->d, c->n_ctx, ckv_dtype_name(c->dt), err, mb);
    for (int h = 0; h < c->nq; h++) {
        if (c->n_ctx == 0) {
            cr_assert(isinf(lse[h]) && lse[h] < 0);
            continue;
        }
        cr_assert(fabsf(lse[h] - rlse[h]) <= LSE_TOL, "lse %g vs %g", lse[h], rlse[h]);
    }
    free(q), free(k), free(v), free(out), free(lse), free(ref), free(rlse);
}

static const struct full_case full_cases[] = {
    {32, 8, 128, 700, CKV_DTYPE_F16, 0, 1.0f}, /* Llama-3-8B shape, group 4 */
    {8, 8, 64, 777, CKV_DTYPE_F32, 0, 1.0f},   /* group 1 (MHA) */
    {12, 4, 64, 300, CKV_DTYPE_F16, 0, 2.0f},  /* group 3 */
    {32, 4, 128, 200, CKV_DTYPE_F32, 1, 1.0f}, /* group 8, token-major layout */
    {9, 3, 64, 1, CKV_DTYPE_F16, 0, 1.0f},     /* one token */
    {4, 1, 128, 3000, CKV_DTYPE_F16, 0, 3.0f}, /* one KV head: split across threads */
    {4, 2, 80, 100, CKV_DTYPE_F32, 0, 1.0f},   /* head_dim not a multiple of 16 */
    {2, 1, 40, 65, CKV_DTYPE_F16, 1, 1.0f},    /* head_dim 40, 65 tokens (tile + 1) */
    {6, 2, 64, 0, CKV_DTYPE_F16, 0, 1.0f},     /* empty context: zero output, lse -inf */
};

static void full_cases_on(ckv_ctx_t *ctx, const void *arg)
{
    (void)arg;
    for (size_t c = 0; c < CKV_ARRAY_LEN(full_cases); c++)
        check_full(ctx, &full_cases[c], 1000 + c);
}

Test(kernels_attn, decode_full_vs_reference)
{
    ktest_each_ctx(full_cases_on, NULL);
}

/* One softmax dominated by a single key: the output is (almost) that token's V row. */
Test(kernels_attn, decode_full_peaked)
{
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    const int d = 64, n = 500;
    float q[64], *k = calloc((size_t)n * d, 4), *v = calloc((size_t)n * d, 4), out[64];
    for (int i = 0; i < d; i++)
        q[i] = 1.0f;
    for (int t = 0; t < n; t++)
        for (int i = 0; i < d; i++)
            v[t * d + i] = (float)t;
    for (int i = 0; i < d; i++)
        k[321 * d + i] = 10.0f; /* score 10 * 64 / 8 = 80 vs 0 elsewhere */
    for (int j = 0; j < n_isa; j++) {
        ckv_ctx_t *ctx = ktest_ctx(isas[j], 2);
        struct ckv_attn_full_args a = {.n_q_heads = 1,
                                       .n_kv_heads = 1,
                                       .head_dim = d,
                                       .n_ctx = n,
                                       .q = q,
                                       .k = k,
                                       .v = v,
                                       .dtype = CKV_DTYPE_F32,
                                       .head_stride = (size_t)n * d,
                                       .token_stride = d,
                                       .out = out};
        cr_assert_eq(ckv_attn_decode_full(ctx, &a), 0);
        for (int i = 0; i < d; i++)
            cr_assert(fabsf(out[i] - 321.0f) < 1e-3f, "%g", out[i]);
        ckv_ctx_destroy(&ctx);
    }
    free(k), free(v);
}

/* ---- blocks ---- */

struct blocks_case {
    int nq, nkv, d;
    int per_kv; /* 1: one list per KV head (heads_per_list = group); 0: per query head */
    enum ckv_dtype dt;
    int max_refs;
};

static void check_blocks(ckv_ctx_t *ctx, const struct blocks_case *c, uint64_t seed)
{
    struct ktest_rng rng = {seed};
    const int G = c->nq / c->nkv, n_slots = 40;
    const int hpl = c->per_kv ? G : 1, n_lists = c->nq / hpl;
    size_t bb = ckv_block_bytes(c->d, c->dt);
    void *pool = ktest_random_kv(&rng, bb * n_slots / ckv_dtype_size(c->dt), c->dt, 1.0f);
    float *q = malloc(sizeof(float) * (size_t)c->nq * c->d);
    ktest_fill_normal(&rng, q, (size_t)c->nq * c->d, 1.0f);
    int32_t *offs = malloc(sizeof(int32_t) * (n_lists + 1));
    struct ckv_block_ref *refs = malloc(sizeof(*refs) * (size_t)n_lists * c->max_refs + 1);
    offs[0] = 0;
    for (int l = 0; l < n_lists; l++) {
        int n = l == 1 ? 0 : ktest_int(&rng, 1, c->max_refs); /* list 1 is empty */
        for (int r = 0; r < n; r++)
            refs[offs[l] + r] =
                (struct ckv_block_ref){ktest_int(&rng, 0, n_slots - 1), ktest_int(&rng, 1, 16)};
        offs[l + 1] = offs[l] + n;
    }
    float *out = malloc(sizeof(float) * (size_t)c->nq * c->d), *lse = malloc(sizeof(float) * c->nq);
    float *ref = malloc(sizeof(float) * (size_t)c->nq * c->d),
          *rlse = malloc(sizeof(float) * c->nq);
    struct ckv_attn_blocks_args a = {.n_q_heads = c->nq,
                                     .head_dim = c->d,
                                     .n_lists = n_lists,
                                     .heads_per_list = hpl,
                                     .q = q,
                                     .pool = pool,
                                     .dtype = c->dt,
                                     .refs = refs,
                                     .list_offsets = offs,
                                     .out = out,
                                     .lse = lse};
    cr_assert_eq(ckv_attn_decode_blocks(ctx, &a), 0);
    a.out = ref;
    a.lse = rlse;
    cr_assert_eq(ckv_ref_attn_decode_blocks(&a), 0);
    float mb, err = ktest_max_abs_diff(out, ref, (size_t)c->nq * c->d, &mb);
    cr_assert(err <= ATTN_TOL, "%s nq=%d d=%d hpl=%d: err %g", ckv_ctx_describe(ctx), c->nq, c->d,
              hpl, err);
    for (int h = 0; h < c->nq; h++) {
        int l = h / hpl;
        if (offs[l] == offs[l + 1]) { /* empty list: zero output and lse -inf */
            for (int i = 0; i < c->d; i++)
                cr_assert_eq(out[(size_t)h * c->d + i], 0.0f);
            cr_assert(isinf(lse[h]) && lse[h] < 0);
        } else {
            cr_assert(fabsf(lse[h] - rlse[h]) <= LSE_TOL, "lse %g vs %g", lse[h], rlse[h]);
        }
    }
    free(pool), free(q), free(offs), free(refs), free(out), free(lse), free(ref), free(rlse);
}

static void blocks_cases_on(ckv_ctx_t *ctx, const void *arg)
{
    static const struct blocks_case cases[] = {
        {32, 8, 128, 1, CKV_DTYPE_F16, 30}, {32, 8, 128, 0, CKV_DTYPE_F16, 12},
        {12, 4, 64, 1, CKV_DTYPE_F32, 25},  {8, 1, 64, 1, CKV_DTYPE_F16, 200}, /* split */
        {3, 3, 64, 0, CKV_DTYPE_F32, 9},    {8, 2, 80, 1, CKV_DTYPE_F16, 7},
    };
    (void)arg;
    for (size_t c = 0; c < CKV_ARRAY_LEN(cases); c++)
        check_blocks(ctx, &cases[c], 77 + c);
}

Test(kernels_attn, decode_blocks_vs_reference)
{
    ktest_each_ctx(blocks_cases_on, NULL);
}

/* Packing a whole context into blocks and attending over every block is full attention. */
Test(kernels_attn, all_blocks_equal_full)
{
    const int nq = 16, nkv = 4, d = 64, n = 203, G = nq / nkv;
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    struct ktest_rng rng = {5};
    void *k = ktest_random_kv(&rng, (size_t)nkv * n * d, CKV_DTYPE_F16, 1.5f);
    void *v = ktest_random_kv(&rng, (size_t)nkv * n * d, CKV_DTYPE_F16, 1.0f);
    float q[16 * 64];
    ktest_fill_normal(&rng, q, CKV_ARRAY_LEN(q), 1.0f);
    int nb = (n + 15) / 16;
    int32_t rows[203], slots[64];
    for (int t = 0; t < n; t++)
        rows[t] = t;
    for (int i = 0; i < n_isa; i++) {
        ckv_ctx_t *ctx = ktest_ctx(isas[i], 2);
        size_t bb = ckv_block_bytes(d, CKV_DTYPE_F16);
        char *pool = malloc(bb * (size_t)nb * nkv);
        struct ckv_block_ref refs[64];
        int32_t offs[5] = {0};
        for (int h = 0; h < nkv; h++) {
            for (int b = 0; b < nb; b++) /* head h's blocks in reverse slot order */
                slots[b] = h * nb + (nb - 1 - b);
            cr_assert_eq(ckv_pack_blocks(ctx, (uint16_t *)k + (size_t)h * n * d,
                                         (uint16_t *)v + (size_t)h * n * d, CKV_DTYPE_F16, d, d,
                                         rows, n, pool, slots),
                         0);
            for (int b = 0; b < nb; b++)
                refs[h * nb + b] = (struct ckv_block_ref){slots[b], b == nb - 1 ? n - 16 * b : 16};
            offs[h + 1] = offs[h] + nb;
        }
        /* the tail of the last block of head nkv-1 (slot 3 * nb) is zeroed */
        const uint16_t *tailk =
            (const uint16_t *)(pool + (size_t)(3 * nb + 0) * bb) + (size_t)(n - 16 * (nb - 1)) * d;
        for (int t = 0; t < (16 - (n - 16 * (nb - 1))) * d; t++)
            cr_assert_eq(tailk[t], 0);
        float out_full[16 * 64], out_blk[16 * 64];
        struct ckv_attn_full_args fa = {.n_q_heads = nq,
                                        .n_kv_heads = nkv,
                                        .head_dim = d,
                                        .n_ctx = n,
                                        .q = q,
                                        .k = k,
                                        .v = v,
                                        .dtype = CKV_DTYPE_F16,
                                        .head_stride = (size_t)n * d,
                                        .token_stride = d,
                                        .out = out_full};
        cr_assert_eq(ckv_attn_decode_full(ctx, &fa), 0);
        struct ckv_attn_blocks_args ba = {.n_q_heads = nq,
                                          .head_dim = d,
                                          .n_lists = nkv,
                                          .heads_per_list = G,
                                          .q = q,
                                          .pool = pool,
                                          .dtype = CKV_DTYPE_F16,
                                          .refs = refs,
                                          .list_offsets = offs,
                                          .out = out_blk};
        cr_assert_eq(ckv_attn_decode_blocks(ctx, &ba), 0);
        float err = ktest_max_abs_diff(out_blk, out_full, CKV_ARRAY_LEN(out_full), NULL);
        cr_assert(err <= ATTN_TOL, "%s: blocks vs full %g", ckv_ctx_describe(ctx), err);
        free(pool);
        ckv_ctx_destroy(&ctx);
    }
    free(k), free(v);
}

Test(kernels_attn, pack_blocks_vs_reference)
{
    struct ktest_rng rng = {9};
    const int d = 64, n_tok = 100, n_rows = 37;
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_PORTABLE, 1);
    for (int dt = CKV_DTYPE_F32; dt <= CKV_DTYPE_F16; dt++) {
        size_t stride = 2 * d; /* rows of a (t, 2 heads, d) layout */
        void *k = ktest_random_kv(&rng, (size_t)n_tok * stride, (enum ckv_dtype)dt, 1.0f);
        void *v = ktest_random_kv(&rng, (size_t)n_tok * stride, (enum ckv_dtype)dt, 1.0f);
        int32_t rows[37], slots[3] = {4, 0, 2};
        for (int i = 0; i < n_rows; i++)
            rows[i] = ktest_int(&rng, 0, n_tok - 1);
        size_t bb = ckv_block_bytes(d, (enum ckv_dtype)dt);
        char *p1 = malloc(bb * 5), *p2 = malloc(bb * 5);
        memset(p1, 0x5a, bb * 5);
        memset(p2, 0x5a, bb * 5);
        cr_assert_eq(
            ckv_pack_blocks(ctx, k, v, (enum ckv_dtype)dt, d, stride, rows, n_rows, p1, slots), 0);
        cr_assert_eq(
            ckv_ref_pack_blocks(k, v, (enum ckv_dtype)dt, d, stride, rows, n_rows, p2, slots), 0);
        cr_assert_arr_eq(p1, p2, bb * 5);
        int32_t bad_rows[2] = {0, -1}, bad_slots[1] = {-3};
        cr_assert_eq(
            ckv_pack_blocks(ctx, k, v, (enum ckv_dtype)dt, d, stride, bad_rows, 2, p1, slots),
            -EINVAL);
        cr_assert_eq(
            ckv_pack_blocks(ctx, k, v, (enum ckv_dtype)dt, d, stride, rows, 3, p1, bad_slots),
            -EINVAL);
        cr_assert_eq(ckv_pack_blocks(ctx, k, v, (enum ckv_dtype)dt, d, stride, rows, 0, p1, slots),
                     -EINVAL);
        cr_assert_eq(ckv_pack_blocks(ctx, k, v, (enum ckv_dtype)dt, d, d - 1, rows, 3, p1, slots),
                     -EINVAL);
        free(k), free(v), free(p1), free(p2);
    }
    ckv_ctx_destroy(&ctx);
}

/* ---- prefill ---- */

struct prefill_case {
    int nq, nkv, d, n_new, pos0;
    enum ckv_dtype dt;
};

static void check_prefill(ckv_ctx_t *ctx, const struct prefill_case *c, uint64_t seed)
{
    struct ktest_rng rng = {seed};
    int n_tot = c->pos0 + c->n_new + 3; /* a few tokens past the chunk: must be masked */
    size_t nq_elems = (size_t)c->n_new * c->nq * c->d;
    float *q = malloc(sizeof(float) * nq_elems);
    ktest_fill_normal(&rng, q, nq_elems, 1.0f);
    /* token-major cache (t, h, d), the layout an engine appends to */
    void *k = ktest_random_kv(&rng, (size_t)n_tot * c->nkv * c->d, c->dt, 1.5f);
    void *v = ktest_random_kv(&rng, (size_t)n_tot * c->nkv * c->d, c->dt, 1.0f);
    float *out = malloc(sizeof(float) * nq_elems), *ref = malloc(sizeof(float) * nq_elems);
    struct ckv_attn_prefill_args a = {.n_q_heads = c->nq,
                                      .n_kv_heads = c->nkv,
                                      .head_dim = c->d,
                                      .n_new = c->n_new,
                                      .pos0 = c->pos0,
                                      .q = q,
                                      .k = k,
                                      .v = v,
                                      .dtype = c->dt,
                                      .head_stride = (size_t)c->d,
                                      .token_stride = (size_t)c->nkv * c->d,
                                      .out = out};
    cr_assert_eq(ckv_attn_prefill(ctx, &a), 0);
    a.out = ref;
    cr_assert_eq(ckv_ref_attn_prefill(&a), 0);
    float err = ktest_max_abs_diff(out, ref, nq_elems, NULL);
    cr_assert(err <= ATTN_TOL, "%s prefill nq=%d nkv=%d d=%d n_new=%d pos0=%d: err %g",
              ckv_ctx_describe(ctx), c->nq, c->nkv, c->d, c->n_new, c->pos0, err);
    free(q), free(k), free(v), free(out), free(ref);
}

static void prefill_cases_on(ckv_ctx_t *ctx, const void *arg)
{
    static const struct prefill_case cases[] = {
        {8, 2, 64, 100, 0, CKV_DTYPE_F16},  /* group 4, from the start */
        {12, 4, 64, 37, 50, CKV_DTYPE_F32}, /* group 3, a later chunk */
        {8, 1, 128, 70, 10, CKV_DTYPE_F16}, /* group 8 */
        {4, 4, 128, 65, 0, CKV_DTYPE_F32},  /* group 1 */
        {9, 3, 64, 1, 200, CKV_DTYPE_F16},  /* one new token: a decode step */
        {2, 1, 80, 130, 3, CKV_DTYPE_F16},  /* head_dim 80 */
    };
    (void)arg;
    for (size_t c = 0; c < CKV_ARRAY_LEN(cases); c++)
        check_prefill(ctx, &cases[c], 300 + c);
}

Test(kernels_attn, prefill_vs_reference)
{
    ktest_each_ctx(prefill_cases_on, NULL);
}

/* The last row of a prefill equals a decode step over the same cache. */
Test(kernels_attn, prefill_last_row_is_decode)
{
    const int nq = 8, nkv = 2, d = 64, n_new = 40, pos0 = 25, n = pos0 + n_new;
    struct ktest_rng rng = {11};
    float *q = malloc(sizeof(float) * n_new * nq * d), out[8 * 64], dec[8 * 64];
    ktest_fill_normal(&rng, q, (size_t)n_new * nq * d, 1.0f);
    void *k = ktest_random_kv(&rng, (size_t)n * nkv * d, CKV_DTYPE_F16, 1.0f);
    void *v = ktest_random_kv(&rng, (size_t)n * nkv * d, CKV_DTYPE_F16, 1.0f);
    float *pout = malloc(sizeof(float) * n_new * nq * d);
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_AUTO, 2);
    struct ckv_attn_prefill_args p = {.n_q_heads = nq,
                                      .n_kv_heads = nkv,
                                      .head_dim = d,
                                      .n_new = n_new,
                                      .pos0 = pos0,
                                      .q = q,
                                      .k = k,
                                      .v = v,
                                      .dtype = CKV_DTYPE_F16,
                                      .head_stride = d,
                                      .token_stride = (size_t)nkv * d,
                                      .out = pout};
    cr_assert_eq(ckv_attn_prefill(ctx, &p), 0);
    memcpy(out, pout + (size_t)(n_new - 1) * nq * d, sizeof(out));
    struct ckv_attn_full_args f = {.n_q_heads = nq,
                                   .n_kv_heads = nkv,
                                   .head_dim = d,
                                   .n_ctx = n,
                                   .q = q + (size_t)(n_new - 1) * nq * d,
                                   .k = k,
                                   .v = v,
                                   .dtype = CKV_DTYPE_F16,
                                   .head_stride = d,
                                   .token_stride = (size_t)nkv * d,
                                   .out = dec};
    cr_assert_eq(ckv_attn_decode_full(ctx, &f), 0);
    cr_assert(ktest_max_abs_diff(out, dec, CKV_ARRAY_LEN(out), NULL) <= ATTN_TOL);
    ckv_ctx_destroy(&ctx);
    free(q), free(k), free(v), free(pout);
}

/* ---- bad arguments ---- */

Test(kernels_attn, bad_arguments)
{
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_PORTABLE, 1);
    float q[4 * 64] = {0}, out[4 * 64], lse[4];
    uint16_t kv[4 * 16 * 64] = {0};
    struct ckv_attn_full_args ok = {.n_q_heads = 4,
                                    .n_kv_heads = 2,
                                    .head_dim = 64,
                                    .n_ctx = 16,
                                    .q = q,
                                    .k = kv,
                                    .v = kv,
                                    .dtype = CKV_DTYPE_F16,
                                    .head_stride = 16 * 64,
                                    .token_stride = 64,
                                    .out = out,
                                    .lse = lse};
    cr_assert_eq(ckv_attn_decode_full(ctx, &ok), 0);
    struct ckv_attn_full_args a;
#define BAD_FULL(field, value)                                                                     \
    do {                                                                                           \
        a = ok;                                                                                    \
        a.field = value;                                                                           \
        cr_assert_eq(ckv_attn_decode_full(ctx, &a), -EINVAL, #field " = " #value);                 \
    } while (0)
    BAD_FULL(n_q_heads, 3); /* not a multiple of n_kv_heads */
    BAD_FULL(n_kv_heads, 0);
    BAD_FULL(head_dim, 0);
    BAD_FULL(head_dim, CKV_MAX_HEAD_DIM + 1);
    BAD_FULL(n_ctx, -1);
    BAD_FULL(q, NULL);
    BAD_FULL(k, NULL);
    BAD_FULL(out, NULL);
    BAD_FULL(dtype, (enum ckv_dtype)3);
    BAD_FULL(token_stride, 63);
    BAD_FULL(scale, NAN);
    BAD_FULL(scale, INFINITY);
#undef BAD_FULL
    cr_assert_eq(ckv_attn_decode_full(NULL, &ok), -EINVAL);
    cr_assert_eq(ckv_attn_decode_full(ctx, NULL), -EINVAL);

    struct ckv_block_ref refs[2] = {{0, 16}, {1, 5}};
    int32_t offs[3] = {0, 1, 2};
    struct ckv_attn_blocks_args bok = {.n_q_heads = 4,
                                       .head_dim = 64,
                                       .n_lists = 2,
                                       .heads_per_list = 2,
                                       .q = q,
                                       .pool = kv,
                                       .dtype = CKV_DTYPE_F16,
                                       .refs = refs,
                                       .list_offsets = offs,
                                       .out = out};
    cr_assert_eq(ckv_attn_decode_blocks(ctx, &bok), 0);
    struct ckv_attn_blocks_args b = bok;
    b.heads_per_list = 3; /* 2 * 3 != 4 */
    cr_assert_eq(ckv_attn_decode_blocks(ctx, &b), -EINVAL);
    refs[1].n_tokens = 17;
    cr_assert_eq(ckv_attn_decode_blocks(ctx, &bok), -EINVAL);
    refs[1].n_tokens = 0;
    cr_assert_eq(ckv_attn_decode_blocks(ctx, &bok), -EINVAL);
    refs[1] = (struct ckv_block_ref){-1, 4};
    cr_assert_eq(ckv_attn_decode_blocks(ctx, &bok), -EINVAL);
    refs[1] = (struct ckv_block_ref){1, 4};
    offs[1] = 2, offs[2] = 1; /* decreasing */
    cr_assert_eq(ckv_attn_decode_blocks(ctx, &bok), -EINVAL);

    struct ckv_attn_prefill_args pok = {.n_q_heads = 4,
                                        .n_kv_heads = 2,
                                        .head_dim = 64,
                                        .n_new = 4,
                                        .pos0 = 0,
                                        .q = q,
                                        .k = kv,
                                        .v = kv,
                                        .dtype = CKV_DTYPE_F16,
                                        .head_stride = 64,
                                        .token_stride = 128,
                                        .out = out};
    float pq[4 * 4 * 64] = {0}, pout[4 * 4 * 64];
    pok.q = pq;
    pok.out = pout;
    cr_assert_eq(ckv_attn_prefill(ctx, &pok), 0);
    struct ckv_attn_prefill_args p = pok;
    p.pos0 = -1;
    cr_assert_eq(ckv_attn_prefill(ctx, &p), -EINVAL);
    p = pok;
    p.n_kv_heads = 3;
    cr_assert_eq(ckv_attn_prefill(ctx, &p), -EINVAL);
    p = pok;
    p.k = NULL;
    cr_assert_eq(ckv_attn_prefill(ctx, &p), -EINVAL);
    p = pok;
    p.n_new = 0; /* nothing to do */
    cr_assert_eq(ckv_attn_prefill(ctx, &p), 0);
    ckv_ctx_destroy(&ctx);
}
