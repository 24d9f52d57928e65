/*
 * Suite "cuda_attn": the CUDA backend's decode attention (contiguous cache and block lists),
 * causal prefill and block packing against the CPU backend and the double-precision
 * references of ckv_ref.h, on fresh random inputs, in the CPU suite's cases (GQA groups
 * 1/3/4/8, head_dim 40/64/80/128, token-major and head-major layouts, f16 and f32, an empty
 * context, empty lists) and a few more that make decode split (long contexts, long lists).
 *
 * Tolerance: as kernels_attn, max |out - ref| <= ATTN_TOL = 2e-5 and max |lse - ref| <=
 * LSE_TOL = 1e-4 against the reference (f32 accumulation, online softmax, split merge), and
 * so max |out_cuda - out_cpu| <= 2 * ATTN_TOL. Packing copies bits: equal bytes.
 * Skipped without a CUDA device (kcuda.h).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kcuda.h"

#define ATTN_TOL 2e-5f
#define LSE_TOL  1e-4f

/* out/lse of the CUDA run against the reference and the CPU run. */
static void check_outputs(const char *what, const float *out, const float *lse, const float *ref,
                          const float *rlse, const float *cpu, int nq, int d)
{
    float mb, err = ktest_max_abs_diff(out, ref, (size_t)nq * d, &mb);
    cr_assert(err <= ATTN_TOL, "%s: out err %g vs reference (max |ref| %g)", what, err, mb);
    err = ktest_max_abs_diff(out, cpu, (size_t)nq * d, NULL);
    cr_assert(err <= 2 * ATTN_TOL, "%s: out err %g vs the CPU backend", what, err);
    for (int h = 0; lse && h < nq; h++) {
        if (isinf(rlse[h])) {
            cr_assert(isinf(lse[h]) && lse[h] < 0, "%s: lse[%d] = %g, want -inf", what, h, lse[h]);
            continue;
        }
        cr_assert(fabsf(lse[h] - rlse[h]) <= LSE_TOL, "%s: lse[%d] %g vs %g", what, h, lse[h],
                  rlse[h]);
    }
}

/* ---- decode over a contiguous cache ---- */

struct full_case {
    int nq, nkv, d, n_ctx;
    enum ckv_dtype dt;
    int token_major;
    float k_sd;
};

static void check_full(ckv_ctx_t *gpu, ckv_ctx_t *cpu, const struct full_case *c, uint64_t seed)
{
    struct ktest_rng rng = {seed};
    size_t nkv_elems = (size_t)c->nkv * c->n_ctx * c->d + 1, esz = ckv_dtype_size(c->dt);
    size_t q_bytes = sizeof(float) * c->nq * c->d;
    float *q = malloc(q_bytes);
    ktest_fill_normal(&rng, q, (size_t)c->nq * c->d, 1.0f);
    void *k = ktest_random_kv(&rng, nkv_elems, c->dt, c->k_sd);
    void *v = ktest_random_kv(&rng, nkv_elems, c->dt, 1.0f);
    float *ref = malloc(q_bytes), *rlse = malloc(sizeof(float) * c->nq);
    float *cpu_out = malloc(q_bytes), *cpu_lse = malloc(sizeof(float) * c->nq);
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
        .out = ref,
        .lse = rlse};
    cr_assert_eq(ckv_ref_attn_decode_full(&a), 0);
    a.out = cpu_out, a.lse = cpu_lse;
    cr_assert_eq(ckv_attn_decode_full(cpu, &a), 0);
    /* the same call on device copies */
    struct ckv_attn_full_args g = a;
    g.q = kcuda_up(gpu, q, q_bytes);
    g.k = kcuda_up(gpu, k, nkv_elems * esz);
    g.v = kcuda_up(gpu, v, nkv_elems * esz);
    g.out = kcuda_alloc(gpu, q_bytes);
    g.lse = kcuda_alloc(gpu, sizeof(float) * c->nq);
    cr_assert_eq(ckv_attn_decode_full(gpu, &g), 0);
    float *out = kcuda_down(gpu, g.out, q_bytes),
          *lse = kcuda_down(gpu, g.lse, sizeof(float) * c->nq);
    char what[160];
    snprintf(what, sizeof(what), "%s full nq=%d nkv=%d d=%d n=%d %s%s", ckv_ctx_describe(gpu),
             c->nq, c->nkv, c->d, c->n_ctx, ckv_dtype_name(c->dt),
             c->token_major ? " (t,h,d)" : "");
    check_outputs(what, out, lse, ref, rlse, cpu_out, c->nq, c->d);
    ckv_dev_free(gpu, (void *)g.q), ckv_dev_free(gpu, (void *)g.k), ckv_dev_free(gpu, (void *)g.v);
    ckv_dev_free(gpu, g.out), ckv_dev_free(gpu, g.lse);
    free(q), free(k), free(v), free(ref), free(rlse), free(cpu_out), free(cpu_lse), free(out);
    free(lse);
}

Test(cuda_attn, decode_full_vs_cpu)
{
    static const struct full_case cases[] = {
        {32, 8, 128, 700, CKV_DTYPE_F16, 0, 1.0f}, /* Llama-3-8B shape, group 4 */
        {8, 8, 64, 777, CKV_DTYPE_F32, 0, 1.0f},   /* group 1 (MHA) */
        {12, 4, 64, 300, CKV_DTYPE_F16, 0, 2.0f},  /* group 3 */
        {32, 4, 128, 200, CKV_DTYPE_F32, 1, 1.0f}, /* group 8, token-major layout */
        {9, 3, 64, 1, CKV_DTYPE_F16, 0, 1.0f},     /* one token */
        {4, 1, 128, 3000, CKV_DTYPE_F16, 0, 3.0f}, /* one KV head: many splits, merged */
        {4, 2, 80, 100, CKV_DTYPE_F32, 0, 1.0f},   /* head_dim not a multiple of 16 */
        {2, 1, 40, 65, CKV_DTYPE_F16, 1, 1.0f},    /* head_dim 40, odd rows: scalar layout */
        {6, 2, 64, 0, CKV_DTYPE_F16, 0, 1.0f},     /* empty context: zero output, lse -inf */
        {16, 1, 64, 600, CKV_DTYPE_F16, 0, 1.0f},  /* group 16: two row groups per KV head */
        {2, 1, 256, 300, CKV_DTYPE_F32, 0, 1.0f},  /* head_dim 256 */
        {2, 2, 512, 70, CKV_DTYPE_F16, 0, 0.5f},   /* head_dim 512 (the maximum) */
        {3, 1, 33, 50, CKV_DTYPE_F32, 0, 1.0f},    /* odd head_dim */
        {160, 1, 64, 90, CKV_DTYPE_F16, 0, 1.0f},  /* a group of 160: 20 row groups */
    };
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    for (size_t c = 0; c < CKV_ARRAY_LEN(cases); c++)
        check_full(gpu, cpu, &cases[c], 1000 + c);
    ckv_ctx_destroy(&gpu);
    ckv_ctx_destroy(&cpu);
}

/* One softmax dominated by a single key: the output is (almost) that token's V row. */
Test(cuda_attn, decode_full_peaked)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    const int d = 64, n = 500;
    float q[64], *k = calloc((size_t)n * d, 4), *v = calloc((size_t)n * d, 4), out[64];
    for (int i = 0; i < d; i++)
        q[i] = 1.0f;
    for (int t = 0; t < n; t++)
        for (int i = 0; i < d; i++)
            v[t * d + i] = (float)t;
    for (int i = 0; i < d; i++)
        k[321 * d + i] = 10.0f; /* score 10 * 64 / 8 = 80 vs 0 elsewhere */
    struct ckv_attn_full_args a = {.n_q_heads = 1,
                                   .n_kv_heads = 1,
                                   .head_dim = d,
                                   .n_ctx = n,
                                   .q = kcuda_up(gpu, q, sizeof(q)),
                                   .k = kcuda_up(gpu, k, (size_t)n * d * 4),
                                   .v = kcuda_up(gpu, v, (size_t)n * d * 4),
                                   .dtype = CKV_DTYPE_F32,
                                   .head_stride = (size_t)n * d,
                                   .token_stride = d,
                                   .out = kcuda_alloc(gpu, sizeof(out))};
    cr_assert_eq(ckv_attn_decode_full(gpu, &a), 0);
    cr_assert_eq(ckv_copy_d2h(gpu, out, a.out, sizeof(out)), 0);
    for (int i = 0; i < d; i++)
        cr_assert(fabsf(out[i] - 321.0f) < 1e-3f, "%g", out[i]);
    ckv_dev_free(gpu, (void *)a.q), ckv_dev_free(gpu, (void *)a.k), ckv_dev_free(gpu, (void *)a.v);
    ckv_dev_free(gpu, a.out);
    ckv_ctx_destroy(&gpu);
    free(k), free(v);
}

/* ---- decode over block lists ---- */

struct blocks_case {
    int nq, nkv, d;
    int per_kv;
    enum ckv_dtype dt;
    int max_refs;
};

static void check_blocks(ckv_ctx_t *gpu, ckv_ctx_t *cpu, const struct blocks_case *c, uint64_t seed)
{
    struct ktest_rng rng = {seed};
    const int G = c->nq / c->nkv, n_slots = 40;
    const int hpl = c->per_kv ? G : 1, n_lists = c->nq / hpl;
    size_t bb = ckv_block_bytes(c->d, c->dt), q_bytes = sizeof(float) * c->nq * c->d;
    void *pool = ktest_random_kv(&rng, bb * n_slots / ckv_dtype_size(c->dt), c->dt, 1.0f);
    float *q = malloc(q_bytes);
    ktest_fill_normal(&rng, q, (size_t)c->nq * c->d, 1.0f);
    int32_t *offs = malloc(sizeof(int32_t) * (n_lists + 1));
    struct ckv_block_ref *refs = malloc(sizeof(*refs) * ((size_t)n_lists * c->max_refs + 1));
    offs[0] = 0;
    for (int l = 0; l < n_lists; l++) {
        int n = l == 1 ? 0 : ktest_int(&rng, 1, c->max_refs); /* list 1 is empty */
        for (int r = 0; r < n; r++)
            refs[offs[l] + r] =
                (struct ckv_block_ref){ktest_int(&rng, 0, n_slots - 1), ktest_int(&rng, 1, 16)};
        offs[l + 1] = offs[l] + n;
    }
    float *ref = malloc(q_bytes), *rlse = malloc(sizeof(float) * c->nq);
    float *cpu_out = malloc(q_bytes), *cpu_lse = malloc(sizeof(float) * c->nq);
    struct ckv_attn_blocks_args a = {.n_q_heads = c->nq,
                                     .head_dim = c->d,
                                     .n_lists = n_lists,
                                     .heads_per_list = hpl,
                                     .q = q,
                                     .pool = pool,
                                     .dtype = c->dt,
                                     .refs = refs,
                                     .list_offsets = offs,
                                     .out = ref,
                                     .lse = rlse};
    cr_assert_eq(ckv_ref_attn_decode_blocks(&a), 0);
    a.out = cpu_out, a.lse = cpu_lse;
    cr_assert_eq(ckv_attn_decode_blocks(cpu, &a), 0);
    struct ckv_attn_blocks_args g = a;
    g.q = kcuda_up(gpu, q, q_bytes);
    g.pool = kcuda_up(gpu, pool, bb * n_slots);
    g.refs = kcuda_up(gpu, refs, sizeof(*refs) * (offs[n_lists] + 1));
    g.list_offsets = kcuda_up(gpu, offs, sizeof(int32_t) * (n_lists + 1));
    g.out = kcuda_alloc(gpu, q_bytes);
    g.lse = kcuda_alloc(gpu, sizeof(float) * c->nq);
    cr_assert_eq(ckv_attn_decode_blocks(gpu, &g), 0);
    float *out = kcuda_down(gpu, g.out, q_bytes),
          *lse = kcuda_down(gpu, g.lse, sizeof(float) * c->nq);
    char what[160];
    snprintf(what, sizeof(what), "%s blocks nq=%d d=%d hpl=%d refs<=%d %s", ckv_ctx_describe(gpu),
             c->nq, c->d, hpl, c->max_refs, ckv_dtype_name(c->dt));
    check_outputs(what, out, lse, ref, rlse, cpu_out, c->nq, c->d);
    for (int i = 0; n_lists > 1 && i < hpl * c->d; i++) /* list 1 is empty: zero output */
        cr_assert_eq(out[(size_t)hpl * c->d + i], 0.0f, "%s: empty list output", what);
    ckv_dev_free(gpu, (void *)g.q), ckv_dev_free(gpu, (void *)g.pool);
    ckv_dev_free(gpu, (void *)g.refs), ckv_dev_free(gpu, (void *)g.list_offsets);
    ckv_dev_free(gpu, g.out), ckv_dev_free(gpu, g.lse);
    free(pool), free(q), free(offs), free(refs), free(ref), free(rlse), free(cpu_out);
    free(cpu_lse), free(out), free(lse);
}

Test(cuda_attn, decode_blocks_vs_cpu)
{
    static const struct blocks_case cases[] = {
        {32, 8, 128, 1, CKV_DTYPE_F16, 30}, {32, 8, 128, 0, CKV_DTYPE_F16, 12},
        {12, 4, 64, 1, CKV_DTYPE_F32, 25},  {8, 1, 64, 1, CKV_DTYPE_F16, 200}, /* splits */
        {3, 3, 64, 0, CKV_DTYPE_F32, 9},    {8, 2, 80, 1, CKV_DTYPE_F16, 7},
        {4, 1, 40, 1, CKV_DTYPE_F16, 5},    {2, 2, 256, 0, CKV_DTYPE_F32, 6},
    };
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    for (size_t c = 0; c < CKV_ARRAY_LEN(cases); c++)
        check_blocks(gpu, cpu, &cases[c], 77 + c);
    ckv_ctx_destroy(&gpu);
    ckv_ctx_destroy(&cpu);
}

/* Refs and offsets live on the device: the CUDA backend checks them there. */
Test(cuda_attn, decode_blocks_bad_refs)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    float q[4 * 64] = {0};
    uint16_t kv[4 * 32 * 64] = {0};
    struct ckv_block_ref refs[2] = {{0, 16}, {1, 5}};
    int32_t offs[3] = {0, 1, 2};
    struct ckv_attn_blocks_args a = {.n_q_heads = 4,
                                     .head_dim = 64,
                                     .n_lists = 2,
                                     .heads_per_list = 2,
                                     .q = kcuda_up(gpu, q, sizeof(q)),
                                     .pool = kcuda_up(gpu, kv, sizeof(kv)),
                                     .dtype = CKV_DTYPE_F16,
                                     .refs = kcuda_up(gpu, refs, sizeof(refs)),
                                     .list_offsets = kcuda_up(gpu, offs, sizeof(offs)),
                                     .out = kcuda_alloc(gpu, sizeof(q))};
    cr_assert_eq(ckv_attn_decode_blocks(gpu, &a), 0);
    struct {
        struct ckv_block_ref refs[2];
        int32_t offs[3];
    } bad[] = {
        {{{0, 16}, {1, 17}}, {0, 1, 2}}, /* more than 16 tokens */
        {{{0, 16}, {1, 0}}, {0, 1, 2}},  /* no token */
        {{{0, 16}, {-1, 4}}, {0, 1, 2}}, /* negative slot */
        {{{0, 16}, {1, 4}}, {0, 2, 1}},  /* decreasing offsets */
        {{{0, 16}, {1, 4}}, {-1, 1, 2}}, /* negative first offset */
    };
    for (size_t i = 0; i < CKV_ARRAY_LEN(bad); i++) {
        cr_assert_eq(ckv_copy_h2d(gpu, (void *)a.refs, bad[i].refs, sizeof(refs)), 0);
        cr_assert_eq(ckv_copy_h2d(gpu, (void *)a.list_offsets, bad[i].offs, sizeof(offs)), 0);
        cr_assert_eq(ckv_attn_decode_blocks(gpu, &a), -EINVAL, "case %zu", i);
    }
    /* the context is not poisoned by bad input */
    cr_assert_eq(ckv_copy_h2d(gpu, (void *)a.refs, refs, sizeof(refs)), 0);
    cr_assert_eq(ckv_copy_h2d(gpu, (void *)a.list_offsets, offs, sizeof(offs)), 0);
    cr_assert_eq(ckv_attn_decode_blocks(gpu, &a), 0);
    ckv_dev_free(gpu, (void *)a.q), ckv_dev_free(gpu, (void *)a.pool);
    ckv_dev_free(gpu, (void *)a.refs), ckv_dev_free(gpu, (void *)a.list_offsets);
    ckv_dev_free(gpu, a.out);
    ckv_ctx_destroy(&gpu);
}

/* ---- packing, and attention over every packed block equals full attention ---- */

Test(cuda_attn, pack_blocks_vs_cpu)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    struct ktest_rng rng = {9};
    const int d = 64, n_tok = 100, n_rows = 37;
    for (int dt = CKV_DTYPE_F32; dt <= CKV_DTYPE_F16; dt++) {
        size_t stride = 2 * d, esz = ckv_dtype_size((enum ckv_dtype)dt);
        size_t kv_bytes = (size_t)n_tok * stride * esz;
        void *k = ktest_random_kv(&rng, (size_t)n_tok * stride, (enum ckv_dtype)dt, 1.0f);
        void *v = ktest_random_kv(&rng, (size_t)n_tok * stride, (enum ckv_dtype)dt, 1.0f);
        int32_t rows[37], slots[3] = {4, 0, 2};
        for (int i = 0; i < n_rows; i++)
            rows[i] = ktest_int(&rng, 0, n_tok - 1);
        size_t bb = ckv_block_bytes(d, (enum ckv_dtype)dt);
        char *p1 = malloc(bb * 5);
        memset(p1, 0x5a, bb * 5);
        cr_assert_eq(
            ckv_pack_blocks(cpu, k, v, (enum ckv_dtype)dt, d, stride, rows, n_rows, p1, slots), 0);
        void *dk = kcuda_up(gpu, k, kv_bytes), *dv = kcuda_up(gpu, v, kv_bytes);
        void *drows = kcuda_up(gpu, rows, sizeof(rows)),
             *dslots = kcuda_up(gpu, slots, sizeof(slots));
        char *fill = malloc(bb * 5);
        memset(fill, 0x5a, bb * 5);
        void *dpool = kcuda_up(gpu, fill, bb * 5);
        cr_assert_eq(ckv_pack_blocks(gpu, dk, dv, (enum ckv_dtype)dt, d, stride, drows, n_rows,
                                     dpool, dslots),
                     0);
        char *p2 = kcuda_down(gpu, dpool, bb * 5);
        cr_assert_arr_eq(p2, p1, bb * 5, "%s: packed pool differs", ckv_dtype_name(dt));
        /* bad rows and slots are found on the device */
        int32_t bad_rows[2] = {0, -1}, bad_slots[1] = {-3};
        void *dbr = kcuda_up(gpu, bad_rows, sizeof(bad_rows));
        void *dbs = kcuda_up(gpu, bad_slots, sizeof(bad_slots));
        cr_assert_eq(
            ckv_pack_blocks(gpu, dk, dv, (enum ckv_dtype)dt, d, stride, dbr, 2, dpool, dslots),
            -EINVAL);
        cr_assert_eq(
            ckv_pack_blocks(gpu, dk, dv, (enum ckv_dtype)dt, d, stride, drows, 3, dpool, dbs),
            -EINVAL);
        ckv_dev_free(gpu, dk), ckv_dev_free(gpu, dv), ckv_dev_free(gpu, drows);
        ckv_dev_free(gpu, dslots), ckv_dev_free(gpu, dpool), ckv_dev_free(gpu, dbr);
        ckv_dev_free(gpu, dbs);
        free(k), free(v), free(p1), free(p2), free(fill);
    }
    ckv_ctx_destroy(&gpu);
    ckv_ctx_destroy(&cpu);
}

Test(cuda_attn, all_blocks_equal_full)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    const int nq = 16, nkv = 4, d = 64, n = 203, G = nq / nkv, nb = (n + 15) / 16;
    struct ktest_rng rng = {5};
    size_t kv_bytes = (size_t)nkv * n * d * 2, bb = ckv_block_bytes(d, CKV_DTYPE_F16);
    void *k = ktest_random_kv(&rng, (size_t)nkv * n * d, CKV_DTYPE_F16, 1.5f);
    void *v = ktest_random_kv(&rng, (size_t)nkv * n * d, CKV_DTYPE_F16, 1.0f);
    float q[16 * 64], out_full[16 * 64], out_blk[16 * 64];
    ktest_fill_normal(&rng, q, CKV_ARRAY_LEN(q), 1.0f);
    int32_t rows[203], slots[4][13];
    struct ckv_block_ref refs[4 * 13];
    int32_t offs[5] = {0};
    for (int t = 0; t < n; t++)
        rows[t] = t;
    char *dk = kcuda_up(gpu, k, kv_bytes), *dv = kcuda_up(gpu, v, kv_bytes);
    void *drows = kcuda_up(gpu, rows, sizeof(rows)), *dpool = kcuda_alloc(gpu, bb * nb * nkv);
    for (int h = 0; h < nkv; h++) {
        for (int b = 0; b < nb; b++) /* head h's blocks in reverse slot order */
            slots[h][b] = h * nb + (nb - 1 - b);
        void *dslots = kcuda_up(gpu, slots[h], sizeof(slots[h]));
        cr_assert_eq(ckv_pack_blocks(gpu, dk + (size_t)h * n * d * 2, dv + (size_t)h * n * d * 2,
                                     CKV_DTYPE_F16, d, d, drows, n, dpool, dslots),
                     0);
        ckv_dev_free(gpu, dslots);
        for (int b = 0; b < nb; b++)
            refs[h * nb + b] = (struct ckv_block_ref){slots[h][b], b == nb - 1 ? n - 16 * b : 16};
        offs[h + 1] = offs[h] + nb;
    }
    void *dq = kcuda_up(gpu, q, sizeof(q));
    struct ckv_attn_full_args fa = {.n_q_heads = nq,
                                    .n_kv_heads = nkv,
                                    .head_dim = d,
                                    .n_ctx = n,
                                    .q = dq,
                                    .k = dk,
                                    .v = dv,
                                    .dtype = CKV_DTYPE_F16,
                                    .head_stride = (size_t)n * d,
                                    .token_stride = d,
                                    .out = kcuda_alloc(gpu, sizeof(out_full))};
    cr_assert_eq(ckv_attn_decode_full(gpu, &fa), 0);
    struct ckv_attn_blocks_args ba = {.n_q_heads = nq,
                                      .head_dim = d,
                                      .n_lists = nkv,
                                      .heads_per_list = G,
                                      .q = dq,
                                      .pool = dpool,
                                      .dtype = CKV_DTYPE_F16,
                                      .refs = kcuda_up(gpu, refs, sizeof(refs)),
                                      .list_offsets = kcuda_up(gpu, offs, sizeof(offs)),
                                      .out = kcuda_alloc(gpu, sizeof(out_blk))};
    cr_assert_eq(ckv_attn_decode_blocks(gpu, &ba), 0);
    cr_assert_eq(ckv_copy_d2h(gpu, out_full, fa.out, sizeof(out_full)), 0);
    cr_assert_eq(ckv_copy_d2h(gpu, out_blk, ba.out, sizeof(out_blk)), 0);
    float err = ktest_max_abs_diff(out_blk, out_full, CKV_ARRAY_LEN(out_full), NULL);
    cr_assert(err <= ATTN_TOL, "blocks vs full %g", err);
    ckv_dev_free(gpu, dk), ckv_dev_free(gpu, dv), ckv_dev_free(gpu, drows);
    ckv_dev_free(gpu, dpool), ckv_dev_free(gpu, dq), ckv_dev_free(gpu, fa.out);
    ckv_dev_free(gpu, (void *)ba.refs), ckv_dev_free(gpu, (void *)ba.list_offsets);
    ckv_dev_free(gpu, ba.out);
    ckv_ctx_destroy(&gpu);
    free(k), free(v);
}

/* ---- prefill ---- */

struct prefill_case {
    int nq, nkv, d, n_new, pos0;
    enum ckv_dtype dt;
};

static void check_prefill(ckv_ctx_t *gpu, ckv_ctx_t *cpu, const struct prefill_case *c,
                          uint64_t seed)
{
    struct ktest_rng rng = {seed};
    int n_tot = c->pos0 + c->n_new + 3; /* a few tokens past the chunk: must be masked */
    size_t nq_elems = (size_t)c->n_new * c->nq * c->d, q_bytes = nq_elems * sizeof(float);
    size_t kv_elems = (size_t)n_tot * c->nkv * c->d, kv_bytes = kv_elems * ckv_dtype_size(c->dt);
    float *q = malloc(q_bytes);
    ktest_fill_normal(&rng, q, nq_elems, 1.0f);
    void *k = ktest_random_kv(&rng, kv_elems, c->dt, 1.5f);
    void *v = ktest_random_kv(&rng, kv_elems, c->dt, 1.0f);
    float *ref = malloc(q_bytes), *cpu_out = malloc(q_bytes);
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
                                      .out = ref};
    cr_assert_eq(ckv_ref_attn_prefill(&a), 0);
    a.out = cpu_out;
    cr_assert_eq(ckv_attn_prefill(cpu, &a), 0);
    struct ckv_attn_prefill_args g = a;
    g.q = kcuda_up(gpu, q, q_bytes);
    g.k = kcuda_up(gpu, k, kv_bytes);
    g.v = kcuda_up(gpu, v, kv_bytes);
    g.out = kcuda_alloc(gpu, q_bytes);
    cr_assert_eq(ckv_attn_prefill(gpu, &g), 0);
    float *out = kcuda_down(gpu, g.out, q_bytes);
    char what[160];
    snprintf(what, sizeof(what), "%s prefill nq=%d nkv=%d d=%d n_new=%d pos0=%d %s",
             ckv_ctx_describe(gpu), c->nq, c->nkv, c->d, c->n_new, c->pos0, ckv_dtype_name(c->dt));
    check_outputs(what, out, NULL, ref, NULL, cpu_out, c->n_new * c->nq, c->d);
    ckv_dev_free(gpu, (void *)g.q), ckv_dev_free(gpu, (void *)g.k), ckv_dev_free(gpu, (void *)g.v);
    ckv_dev_free(gpu, g.out);
    free(q), free(k), free(v), free(ref), free(cpu_out), free(out);
}

Test(cuda_attn, prefill_vs_cpu)
{
    static const struct prefill_case cases[] = {
        {8, 2, 64, 100, 0, CKV_DTYPE_F16},  /* group 4, from the start */
        {12, 4, 64, 37, 50, CKV_DTYPE_F32}, /* group 3, a later chunk */
        {8, 1, 128, 70, 10, CKV_DTYPE_F16}, /* group 8 */
        {4, 4, 128, 65, 0, CKV_DTYPE_F32},  /* group 1 */
        {9, 3, 64, 1, 200, CKV_DTYPE_F16},  /* one new token: a decode step */
        {2, 1, 80, 130, 3, CKV_DTYPE_F16},  /* head_dim 80 */
        {4, 2, 256, 20, 5, CKV_DTYPE_F32},  /* head_dim 256: short key tiles */
        {2, 1, 512, 9, 30, CKV_DTYPE_F16},  /* head_dim 512 */
    };
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    for (size_t c = 0; c < CKV_ARRAY_LEN(cases); c++)
        check_prefill(gpu, cpu, &cases[c], 300 + c);
    ckv_ctx_destroy(&gpu);
    ckv_ctx_destroy(&cpu);
}
