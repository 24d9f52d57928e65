/*
 * Suite "kernels_select": ClusterKV cluster selection, Quest, oracle top-k, and the whole
 * sparse path (k-means + packing + selection + block attention) against full attention.
 *
 * Tolerances: on integer-valued inputs every score is exact in f32, so selections must be
 * bit-equal to the references, ties (there are many) included. On random float inputs a
 * selection must be a correct ranking up to rounding: every chosen cluster scores at least
 * as high as every cluster left out, within SCORE_TOL = 1e-4 (relative to the score scale),
 * and the chosen order must be non-increasing within the same tolerance (both with f32
 * centroids and with their f16 copy, which the reference reads too). The budget is exact:
 * the tokens taken are min(B, tokens of the head), never one more or less. Sparse attention
 * with B >= the clustered tokens must match full attention within 2e-5 (as kernels_attn).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_sparse.h"
#include "ktest.h"

#define SCORE_TOL 1e-4f
#define ATTN_TOL  2e-5f

struct sel_case {
    int nq, nkv, d;
    int clusters_per_head; /* the last head gets none when `empty_head` */
    int empty_head;
    int integer; /* integer-valued q and centroids: exact scores, many ties */
};

struct sel_bufs {
    float *q, *cen, *scores, *rscores;
    uint16_t *cen16; /* the centroids rounded to f16 */
    int32_t *sizes, *offs;
    int32_t *sel, *cnt, *last, *rsel, *rcnt, *rlast;
    int total, max_sel, n_units;
};

static void sel_alloc(struct sel_bufs *b, const struct sel_case *c, struct ktest_rng *rng)
{
    int total = c->clusters_per_head * (c->nkv - (c->empty_head ? 1 : 0));
    b->total = total;
    b->q = malloc(sizeof(float) * c->nq * c->d);
    b->cen = malloc(sizeof(float) * ((size_t)total + 1) * c->d);
    b->sizes = malloc(sizeof(int32_t) * (total + 1));
    b->offs = malloc(sizeof(int32_t) * (c->nkv + 1));
    for (int i = 0; i < c->nq * c->d; i++)
        b->q[i] = c->integer ? (float)ktest_int(rng, -2, 2) : ktest_normal(rng);
    b->cen16 = malloc(sizeof(uint16_t) * ((size_t)total + 1) * c->d);
    for (int i = 0; i < total * c->d; i++) {
        b->cen[i] = c->integer ? (float)ktest_int(rng, -2, 2) : ktest_normal(rng);
        b->cen16[i] = ckv_half_from_f32(b->cen[i]);
    }
    for (int i = 0; i < total; i++) /* sizes 1..200, a few empty (never selected) */
        b->sizes[i] = ktest_int(rng, 0, 30) == 0 ? 0 : ktest_int(rng, 1, 200);
    b->offs[0] = 0;
    for (int h = 0; h < c->nkv; h++)
        b->offs[h + 1] = b->offs[h] + (c->empty_head && h == c->nkv - 1 ? 0 : c->clusters_per_head);
    b->max_sel = c->clusters_per_head > 0 ? c->clusters_per_head : 1;
    size_t n = (size_t)c->nq * b->max_sel;
    b->sel = malloc(sizeof(int32_t) * n), b->rsel = malloc(sizeof(int32_t) * n);
    b->cnt = malloc(sizeof(int32_t) * c->nq), b->rcnt = malloc(sizeof(int32_t) * c->nq);
    b->last = malloc(sizeof(int32_t) * c->nq), b->rlast = malloc(sizeof(int32_t) * c->nq);
    b->scores = malloc(sizeof(float) * c->nq * ((size_t)total + 1));
    b->rscores = malloc(sizeof(float) * c->nq * ((size_t)total + 1));
}

static void sel_free(struct sel_bufs *b)
{
    free(b->q), free(b->cen), free(b->cen16), free(b->sizes), free(b->offs);
    free(b->sel), free(b->rsel);
    free(b->cnt), free(b->rcnt), free(b->last), free(b->rlast), free(b->scores), free(b->rscores);
}

/* Budget exactness and ranking validity of unit u against the reference scores. */
static void check_unit(const struct sel_bufs *b, int u, int h, int budget, const char *what)
{
    int c0 = b->offs[h], c1 = b->offs[h + 1];
    long head_tokens = 0;
    for (int c = c0; c < c1; c++)
        head_tokens += b->sizes[c];
    int n = b->cnt[u];
    const int32_t *sel = b->sel + (size_t)u * b->max_sel;
    long taken = 0;
    char *chosen = calloc((size_t)b->total + 1, 1);
    for (int i = 0; i < n; i++) {
        int c = sel[i];
        cr_assert(c >= c0 && c < c1, "%s unit %d: cluster %d of another head", what, u, c);
        cr_assert(!chosen[c], "%s: cluster %d twice", what, c);
        chosen[c] = 1;
        cr_assert_gt(b->sizes[c], 0, "%s: empty cluster selected", what);
        taken += i == n - 1 ? b->last[u] : b->sizes[c];
    }
    long want = head_tokens < budget ? head_tokens : budget;
    cr_assert_eq(taken, want, "%s unit %d: took %ld tokens, want exactly %ld", what, u, taken,
                 want);
    if (n > 0) {
        cr_assert(b->last[u] >= 1 && b->last[u] <= b->sizes[sel[n - 1]]);
        if (n > 1) /* only the last may be truncated; earlier ones were all needed */
            cr_assert(taken - b->last[u] < budget);
    } else {
        cr_assert_eq(b->last[u], 0);
    }
    /* ranking: chosen >= not chosen, order non-increasing (reference scores, tolerance) */
    const float *rs = b->rscores + (size_t)u * b->total;
    float scale = 1e-6f;
    for (int c = c0; c < c1; c++)
        scale = fmaxf(scale, fabsf(rs[c]));
    float tol = SCORE_TOL * scale;
    float worst = INFINITY;
    for (int i = 0; i < n; i++) {
        if (i > 0)
            cr_assert(rs[sel[i]] <= rs[sel[i - 1]] + tol, "%s: order", what);
        worst = fminf(worst, rs[sel[i]]);
    }
    if (taken == budget) /* the budget ran out: nothing left out may beat a chosen one */
        for (int c = c0; c < c1; c++)
            if (!chosen[c] && b->sizes[c] > 0)
                cr_assert(rs[c] <= worst + tol, "%s: cluster %d (%g) left out, chosen worst %g",
                          what, c, rs[c], worst);
    free(chosen);
}

static void run_select_case(ckv_ctx_t *ctx, const struct sel_case *c, uint64_t seed)
{
    struct ktest_rng rng = {seed};
    struct sel_bufs b;
    sel_alloc(&b, c, &rng);
    int G = c->nq / c->nkv;
    static const int budgets[] = {1, 15, 17, 100, 1000, 5000, 1000000};
    for (int f16 = 0; f16 <= 1; f16++) /* f32 centroids, then the f16 copy alone */
        for (int mode = CKV_SELECT_PER_QHEAD; mode <= CKV_SELECT_KVHEAD_SUM; mode++) {
            int n_units = mode == CKV_SELECT_PER_QHEAD ? c->nq : c->nkv;
            for (size_t bi = 0; bi < CKV_ARRAY_LEN(budgets); bi++) {
                struct ckv_select_args a = {.n_q_heads = c->nq,
                                            .n_kv_heads = c->nkv,
                                            .head_dim = c->d,
                                            .mode = (enum ckv_select_mode)mode,
                                            .q = b.q,
                                            .centroids = f16 ? NULL : b.cen,
                                            .centroids_f16 = f16 ? b.cen16 : NULL,
                                            .sizes = b.sizes,
                                            .head_offsets = b.offs,
                                            .n_clusters_total = b.total,
                                            .budget = budgets[bi],
                                            .max_selected = b.max_sel,
                                            .sel_clusters = b.sel,
                                            .sel_count = b.cnt,
                                            .sel_last_take = b.last,
                                            .scores = b.scores};
                cr_assert_eq(ckv_select_clusters(ctx, &a), 0);
                struct ckv_select_args r = a;
                r.sel_clusters = b.rsel, r.sel_count = b.rcnt, r.sel_last_take = b.rlast;
                r.scores = b.rscores;
                cr_assert_eq(ckv_ref_select_clusters(&r), 0);
                char what[128];
                snprintf(what, sizeof(what), "%s nq=%d nkv=%d d=%d C=%d mode=%d B=%d %s",
                         ckv_ctx_describe(ctx), c->nq, c->nkv, c->d, c->clusters_per_head, mode,
                         budgets[bi], f16 ? "f16 centroids" : "f32 centroids");
                for (int u = 0; u < n_units; u++) {
                    int h = mode == CKV_SELECT_PER_QHEAD ? u / G : u;
                    check_unit(&b, u, h, budgets[bi], what);
                    if (c->integer) { /* exact: bit-equal to the reference, ties included */
                        cr_assert_eq(b.cnt[u], b.rcnt[u], "%s unit %d count", what, u);
                        cr_assert_eq(b.last[u], b.rlast[u], "%s", what);
                        cr_assert_arr_eq(b.sel + (size_t)u * b.max_sel,
                                         b.rsel + (size_t)u * b.max_sel, sizeof(int32_t) * b.cnt[u],
                                         "%s unit %d order", what, u);
                    }
                    for (int cc = b.offs[h]; cc < b.offs[h + 1]; cc++) {
                        float s = b.scores[(size_t)u * b.total + cc],
                              rs = b.rscores[(size_t)u * b.total + cc];
                        cr_assert(fabsf(s - rs) <= 1e-4f * (1.0f + fabsf(rs)), "%s: score", what);
                    }
                }
            }
        }
    sel_free(&b);
}

static void select_cases_on(ckv_ctx_t *ctx, const void *arg)
{
    static const struct sel_case cases[] = {
        {32, 8, 128, 410, 0, 1}, /* Llama-3-8B shape, 410 clusters (> 256), exact */
        {32, 8, 128, 410, 0, 0}, /* same, float */
        {8, 8, 64, 300, 0, 1},   /* group 1 */
        {12, 4, 64, 1000, 1, 1}, /* group 3, 1000 clusters, one head without clusters */
        {32, 4, 128, 77, 0, 0},  /* group 8 */
        {9, 3, 64, 5, 0, 1},     /* few clusters: budget exceeds the head */
    };
    (void)arg;
    for (size_t c = 0; c < CKV_ARRAY_LEN(cases); c++)
        run_select_case(ctx, &cases[c], 500 + c);
}

Test(kernels_select, clusters_vs_reference)
{
    ktest_each_ctx(select_cases_on, NULL);
}

/* Ties go to the lower index; the ranking is a real sort (ClusterKV's authors' kernel is not). */
Test(kernels_select, ranking_is_exact_and_ties_go_to_lower_index)
{
    const int d = 64, C = 600;
    float q[64], *cen = calloc((size_t)C * d, sizeof(float));
    int32_t sizes[600], offs[2] = {0, C}, sel[600], cnt, last;
    for (int i = 0; i < d; i++)
        q[i] = i == 0 ? 1.0f : 0.0f;
    for (int c = 0; c < C; c++) { /* score of c = (c * 37) % 300: each score twice */
        cen[(size_t)c * d] = (float)((c * 37) % 300);
        sizes[c] = 1;
    }
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_AUTO, 2);
    struct ckv_select_args a = {.n_q_heads = 1,
                                .n_kv_heads = 1,
                                .head_dim = d,
                                .q = q,
                                .centroids = cen,
                                .sizes = sizes,
                                .head_offsets = offs,
                                .n_clusters_total = C,
                                .budget = C,
                                .max_selected = C,
                                .sel_clusters = sel,
                                .sel_count = &cnt,
                                .sel_last_take = &last};
    cr_assert_eq(ckv_select_clusters(ctx, &a), 0);
    cr_assert_eq(cnt, C);
    for (int i = 1; i < C; i++) {
        float s0 = cen[(size_t)sel[i - 1] * d], s1 = cen[(size_t)sel[i] * d];
        cr_assert(s0 > s1 || (s0 == s1 && sel[i - 1] < sel[i]), "position %d", i);
    }
    ckv_ctx_destroy(&ctx);
    free(cen);
}

Test(kernels_select, errors)
{
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_PORTABLE, 1);
    float q[2 * 64] = {0}, cen[4 * 64] = {0};
    int32_t sizes[4] = {5, 5, 5, 5}, offs[3] = {0, 2, 4}, sel[8], cnt[2], last[2];
    struct ckv_select_args ok = {.n_q_heads = 2,
                                 .n_kv_heads = 2,
                                 .head_dim = 64,
                                 .q = q,
                                 .centroids = cen,
                                 .sizes = sizes,
                                 .head_offsets = offs,
                                 .n_clusters_total = 4,
                                 .budget = 7,
                                 .max_selected = 2,
                                 .sel_clusters = sel,
                                 .sel_count = cnt,
                                 .sel_last_take = last};
    cr_assert_eq(ckv_select_clusters(ctx, &ok), 0);
    struct ckv_select_args a = ok;
    a.max_selected = 1; /* min(B, 2 clusters) = 2 needed */
    cr_assert_eq(ckv_select_clusters(ctx, &a), -ENOSPC);
    a = ok, a.budget = 0;
    cr_assert_eq(ckv_select_clusters(ctx, &a), -EINVAL);
    a = ok, a.mode = (enum ckv_select_mode)3;
    cr_assert_eq(ckv_select_clusters(ctx, &a), -EINVAL);
    a = ok, a.n_q_heads = 3;
    cr_assert_eq(ckv_select_clusters(ctx, &a), -EINVAL);
    a = ok, a.n_clusters_total = 3; /* disagrees with head_offsets */
    cr_assert_eq(ckv_select_clusters(ctx, &a), -EINVAL);
    a = ok, a.sel_count = NULL;
    cr_assert_eq(ckv_select_clusters(ctx, &a), -EINVAL);
    sizes[2] = -1;
    cr_assert_eq(ckv_select_clusters(ctx, &ok), -EINVAL);
    sizes[2] = 5;
    offs[1] = 5; /* decreasing */
    cr_assert_eq(ckv_select_clusters(ctx, &ok), -EINVAL);
    ckv_ctx_destroy(&ctx);
}

/* ---- Quest ---- */

Test(kernels_select, quest_vs_reference)
{
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    const int nq = 12, nkv = 4, d = 64, n_tok = 16 * 40 + 7; /* partial last page */
    const int np = (n_tok + 15) / 16, G = nq / nkv;
    struct ktest_rng rng = {71};
    for (int dt = CKV_DTYPE_F32; dt <= CKV_DTYPE_F16; dt++) {
        /* integer keys and queries: exact scores, many ties */
        size_t n_el = (size_t)nkv * n_tok * d;
        void *k = malloc(n_el * ckv_dtype_size((enum ckv_dtype)dt));
        for (size_t i = 0; i < n_el; i++) {
            float x = (float)ktest_int(&rng, -3, 3);
            if (dt == CKV_DTYPE_F16)
                ((uint16_t *)k)[i] = ckv_half_from_f32(x);
            else
                ((float *)k)[i] = x;
        }
        float q[12 * 64];
        for (int i = 0; i < nq * d; i++)
            q[i] = (float)ktest_int(&rng, -2, 2);
        float *mn = malloc(sizeof(float) * nkv * np * d),
              *mx = malloc(sizeof(float) * nkv * np * d);
        float *rmn = malloc(sizeof(float) * np * d), *rmx = malloc(sizeof(float) * np * d);
        for (int i = 0; i < n_isa; i++) {
            ckv_ctx_t *ctx = ktest_ctx(isas[i], 2);
            for (int h = 0; h < nkv; h++) {
                const char *kh = (const char *)k + (size_t)h * n_tok * d * ckv_dtype_size(dt);
                cr_assert_eq(ckv_quest_page_bounds(ctx, kh, (enum ckv_dtype)dt, n_tok, d, d,
                                                   mn + (size_t)h * np * d,
                                                   mx + (size_t)h * np * d),
                             0);
                ckv_ref_quest_page_bounds(kh, (enum ckv_dtype)dt, n_tok, d, d, rmn, rmx);
                cr_assert_arr_eq(mn + (size_t)h * np * d, rmn, sizeof(float) * np * d);
                cr_assert_arr_eq(mx + (size_t)h * np * d, rmx, sizeof(float) * np * d);
            }
            for (int mode = 0; mode <= 2; mode++)
                for (int n_sel = 1; n_sel <= np + 3; n_sel += 6) {
                    int n_units = mode == 0 ? nq : nkv;
                    int32_t *sp = malloc(sizeof(int32_t) * n_units * n_sel), cnt[12];
                    int32_t *rsp = malloc(sizeof(int32_t) * n_units * n_sel), rcnt[12];
                    struct ckv_quest_args a = {.n_q_heads = nq,
                                               .n_kv_heads = nkv,
                                               .head_dim = d,
                                               .mode = (enum ckv_select_mode)mode,
                                               .q = q,
                                               .page_min = mn,
                                               .page_max = mx,
                                               .n_pages = np,
                                               .n_select = n_sel,
                                               .sel_pages = sp,
                                               .sel_count = cnt};
                    cr_assert_eq(ckv_quest_select(ctx, &a), 0);
                    a.sel_pages = rsp, a.sel_count = rcnt;
                    cr_assert_eq(ckv_ref_quest_select(&a), 0);
                    for (int u = 0; u < n_units; u++) {
                        int want = n_sel < np ? n_sel : np;
                        cr_assert_eq(cnt[u], want);
                        cr_assert_arr_eq(sp + (size_t)u * n_sel, rsp + (size_t)u * n_sel,
                                         sizeof(int32_t) * want, "mode %d n_sel %d unit %d", mode,
                                         n_sel, u);
                        int has_last = 0;
                        for (int j = 0; j < want; j++)
                            has_last |= sp[(size_t)u * n_sel + j] == np - 1;
                        cr_assert(has_last, "the current page is always attended");
                    }
                    free(sp), free(rsp);
                }
            (void)G;
            ckv_ctx_destroy(&ctx);
        }
        free(k), free(mn), free(mx), free(rmn), free(rmx);
    }
}

/* The page score is an upper bound of q . k over the page's tokens. */
Test(kernels_select, quest_score_bounds_every_token)
{
    const int d = 64, n = 160;
    struct ktest_rng rng = {72};
    float *k = malloc(sizeof(float) * n * d), q[64], mn[10 * 64], mx[10 * 64];
    ktest_fill_normal(&rng, k, (size_t)n * d, 1.0f);
    ktest_fill_normal(&rng, q, d, 1.0f);
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_AUTO, 1);
    cr_assert_eq(ckv_quest_page_bounds(ctx, k, CKV_DTYPE_F32, n, d, d, mn, mx), 0);
    for (int p = 0; p < 10; p++) {
        double bound = 0;
        for (int i = 0; i < d; i++)
            bound += fmax((double)q[i] * mx[p * d + i], (double)q[i] * mn[p * d + i]);
        for (int t = p * 16; t < p * 16 + 16; t++) {
            double s = 0;
            for (int i = 0; i < d; i++)
                s += (double)q[i] * k[t * d + i];
            cr_assert(s <= bound + 1e-9, "page %d token %d", p, t);
        }
    }
    ckv_ctx_destroy(&ctx);
    free(k);
}

/* ---- oracle ---- */

Test(kernels_select, oracle_vs_reference)
{
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    const int nq = 8, nkv = 2, d = 64, n = 1500;
    struct ktest_rng rng = {81};
    float q[8 * 64];
    for (int integer = 0; integer <= 1; integer++) {
        void *k = malloc((size_t)nkv * n * d * 2);
        for (size_t i = 0; i < (size_t)nkv * n * d; i++)
            ((uint16_t *)k)[i] =
                ckv_half_from_f32(integer ? (float)ktest_int(&rng, -2, 2) : ktest_normal(&rng));
        for (int i = 0; i < nq * d; i++)
            q[i] = integer ? (float)ktest_int(&rng, -2, 2) : ktest_normal(&rng);
        for (int i = 0; i < n_isa; i++) {
            ckv_ctx_t *ctx = ktest_ctx(isas[i], 2);
            static const int budgets[] = {1, 100, 1023, 1500};
            for (size_t bi = 0; bi < CKV_ARRAY_LEN(budgets); bi++) {
                int B = budgets[bi];
                int32_t *sel = malloc(sizeof(int32_t) * nq * B),
                        *rsel = malloc(sizeof(int32_t) * nq * B);
                cr_assert_eq(ckv_oracle_topk(ctx, q, k, CKV_DTYPE_F16, nq, nkv, d, n, (size_t)n * d,
                                             d, B, sel),
                             0);
                ckv_ref_oracle_topk(q, k, CKV_DTYPE_F16, nq, nkv, d, n, (size_t)n * d, d, B, rsel);
                if (integer) {
                    cr_assert_arr_eq(sel, rsel, sizeof(int32_t) * nq * B, "B=%d", B);
                } else { /* validity by exact recomputation: descending, and a true top-B */
                    for (int h = 0; h < nq; h++) {
                        double *s = malloc(sizeof(double) * n);
                        for (int t = 0; t < n; t++) {
                            s[t] = 0;
                            for (int j = 0; j < d; j++)
                                s[t] += (double)q[h * d + j] *
                                        ckv_half_to_f32(
                                            ((uint16_t *)k)[((size_t)(h / 4) * n + t) * d + j]);
                        }
                        char *in = calloc(n, 1);
                        double worst = INFINITY;
                        for (int j = 0; j < B; j++) {
                            int t = sel[h * B + j];
                            cr_assert(!in[t]);
                            in[t] = 1;
                            if (j)
                                cr_assert(s[t] <= s[sel[h * B + j - 1]] + 1e-4);
                            worst = fmin(worst, s[t]);
                        }
                        for (int t = 0; t < n; t++)
                            if (!in[t])
                                cr_assert(s[t] <= worst + 1e-4);
                        free(s), free(in);
                    }
                }
                free(sel), free(rsel);
            }
            int32_t one[8];
            cr_assert_eq(ckv_oracle_topk(ctx, q, k, CKV_DTYPE_F16, nq, nkv, d, n, (size_t)n * d, d,
                                         n + 1, one),
                         -EINVAL);
            cr_assert_eq(
                ckv_oracle_topk(ctx, q, k, CKV_DTYPE_F16, nq, nkv, d, n, (size_t)n * d, d, 0, one),
                -EINVAL);
            ckv_ctx_destroy(&ctx);
        }
        free(k);
    }
}

/* ---- the whole sparse path ---- */

struct sparse_case {
    int nq, nkv, d, n_ctx, sinks, window, clusters;
    enum ckv_dtype dt;
};

/* k-means every KV head, pack, select with B >= clustered tokens, attend over blocks: equal
 * to full attention, in both GQA selection modes. */
static void check_sparse_equals_full(ckv_ctx_t *ctx, const struct sparse_case *c, uint64_t seed)
{
    struct ktest_rng rng = {seed};
    size_t n_el = (size_t)c->nkv * c->n_ctx * c->d;
    void *k = ktest_random_kv(&rng, n_el + 1, c->dt, 1.5f);
    void *v = ktest_random_kv(&rng, n_el + 1, c->dt, 1.0f);
    float *q = malloc(sizeof(float) * c->nq * c->d);
    ktest_fill_normal(&rng, q, (size_t)c->nq * c->d, 1.0f);
    int cap_c = c->nkv * c->clusters + 1, slots = c->nkv * (c->n_ctx / 16 + c->clusters + 4);
    struct ckv_sparse_layout l;
    cr_assert_eq(ckv_sparse_layout_init(&l, c->nkv, cap_c, c->nkv * c->n_ctx), 0);
    float *cen = malloc(sizeof(float) * cap_c * c->d);
    void *pool = malloc(ckv_block_bytes(c->d, c->dt) * slots);
    struct ckv_kmeans_params kp = {
        .n_clusters = c->clusters, .max_iter = 10, .tol = 0.001f, .seed = 3};
    size_t esz = ckv_dtype_size(c->dt);
    for (int h = 0; h < c->nkv; h++)
        cr_assert_eq(ckv_sparse_add_head(ctx, &l, h, (char *)k + (size_t)h * c->n_ctx * c->d * esz,
                                         (char *)v + (size_t)h * c->n_ctx * c->d * esz, c->dt, c->d,
                                         c->d, c->n_ctx, c->sinks, c->window, &kp, cen, pool,
                                         slots),
                     0);
    float *full = malloc(sizeof(float) * c->nq * c->d),
          *sparse = malloc(sizeof(float) * c->nq * c->d);
    struct ckv_attn_full_args fa = {.n_q_heads = c->nq,
                                    .n_kv_heads = c->nkv,
                                    .head_dim = c->d,
                                    .n_ctx = c->n_ctx,
                                    .q = q,
                                    .k = k,
                                    .v = v,
                                    .dtype = c->dt,
                                    .head_stride = (size_t)c->n_ctx * c->d,
                                    .token_stride = (size_t)c->d,
                                    .out = full};
    cr_assert_eq(ckv_attn_decode_full(ctx, &fa), 0);
    int clustered = c->n_ctx - c->sinks - c->window;
    if (clustered < 0)
        clustered = 0;
    int G = c->nq / c->nkv, max_sel = c->clusters > 0 ? c->clusters : 1;
    int32_t *sel = malloc(sizeof(int32_t) * c->nq * max_sel), cnt[64], last[64], offs[65];
    int refs_cap = slots + 16;
    struct ckv_block_ref *refs = malloc(sizeof(*refs) * refs_cap * G);
    for (int mode = 0; mode <= 2; mode++) {
        struct ckv_select_args sa = {.n_q_heads = c->nq,
                                     .n_kv_heads = c->nkv,
                                     .head_dim = c->d,
                                     .mode = (enum ckv_select_mode)mode,
                                     .q = q,
                                     .centroids = cen,
                                     .sizes = l.sizes,
                                     .head_offsets = l.head_offsets,
                                     .n_clusters_total = l.n_clusters_total,
                                     .budget =
                                         clustered > 0 ? clustered + ktest_int(&rng, 0, 20) : 1,
                                     .max_selected = max_sel,
                                     .sel_clusters = sel,
                                     .sel_count = cnt,
                                     .sel_last_take = last};
        cr_assert_eq(ckv_select_clusters(ctx, &sa), 0);
        cr_assert_eq(ckv_sparse_lists(&l, (enum ckv_select_mode)mode, c->nq, sel, cnt, last,
                                      max_sel, refs, refs_cap * G, offs),
                     0);
        int hpl = mode == CKV_SELECT_PER_QHEAD ? 1 : G;
        struct ckv_attn_blocks_args ba = {.n_q_heads = c->nq,
                                          .head_dim = c->d,
                                          .n_lists = c->nq / hpl,
                                          .heads_per_list = hpl,
                                          .q = q,
                                          .pool = pool,
                                          .dtype = c->dt,
                                          .refs = refs,
                                          .list_offsets = offs,
                                          .out = sparse};
        cr_assert_eq(ckv_attn_decode_blocks(ctx, &ba), 0);
        float err = ktest_max_abs_diff(sparse, full, (size_t)c->nq * c->d, NULL);
        cr_assert(err <= ATTN_TOL, "%s mode %d n_ctx %d: sparse vs full %g", ckv_ctx_describe(ctx),
                  mode, c->n_ctx, err);
    }
    ckv_sparse_layout_free(&l);
    free(k), free(v), free(q), free(cen), free(pool), free(full), free(sparse), free(sel);
    free(refs);
}

Test(kernels_select, sparse_equals_full_when_budget_covers)
{
    static const struct sparse_case cases[] = {
        {32, 8, 128, 700, 16, 40, 9, CKV_DTYPE_F16}, /* Llama-3-8B heads */
        {12, 4, 64, 333, 16, 20, 5, CKV_DTYPE_F32},  /* group 3 */
        {8, 1, 64, 300, 4, 0, 7, CKV_DTYPE_F16},     /* group 8, no window */
        {9, 3, 64, 10, 16, 32, 4, CKV_DTYPE_F16},    /* fewer tokens than sinks */
        {4, 4, 128, 50, 16, 40, 3, CKV_DTYPE_F32},   /* everything in sinks + window */
    };
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    for (int i = 0; i < n_isa; i++) {
        ckv_ctx_t *ctx = ktest_ctx(isas[i], 2);
        for (size_t c = 0; c < CKV_ARRAY_LEN(cases); c++)
            check_sparse_equals_full(ctx, &cases[c], 900 + c);
        ckv_ctx_destroy(&ctx);
    }
}
