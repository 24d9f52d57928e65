/*
 * Suite "cuda_select": the CUDA backend's cluster selection, Quest (page bounds and page
 * selection) and oracle top-k against the CPU backend and the references of ckv_ref.h, in the
 * CPU suite's cases (> 256 clusters, 1000 clusters, a head without clusters, empty clusters,
 * group sizes 1/3/4/8, B not a multiple of 16, budgets beyond the head, f32 and f16
 * centroids, every GQA mode).
 *
 * Tolerances: with integer-valued inputs every score is exact in f32, so the selections are
 * bit-equal to the CPU backend's (and the reference's), ties included. With random floats a
 * selection must be a correct ranking up to rounding, checked against the reference's scores
 * as kernels_select checks the CPU: the budget is exact (min(B, tokens of the head)), every
 * chosen cluster scores at least every one left out and the order is non-increasing, within
 * SCORE_TOL = 1e-4 of the score scale; scores within 1e-4 relative. Quest is bit-equal to the
 * CPU on any input (same order of operations, no FMA), the oracle bit-equal on integers and a
 * true top-B (exact recomputation) on floats. Skipped without a CUDA device (kcuda.h).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kcuda.h"

#define SCORE_TOL 1e-4f

struct sel_case {
    int nq, nkv, d;
    int clusters_per_head;
    int empty_head; /* the last KV head has no clusters */
    int integer;
};

/* Host inputs of one case. */
struct sel_in {
    float *q, *cen;
    uint16_t *cen16;
    int32_t *sizes, *offs;
    int total, max_sel;
};

static void sel_in_make(struct sel_in *in, const struct sel_case *c, struct ktest_rng *rng)
{
    in->total = c->clusters_per_head * (c->nkv - (c->empty_head ? 1 : 0));
    in->q = malloc(sizeof(float) * c->nq * c->d);
    in->cen = malloc(sizeof(float) * ((size_t)in->total + 1) * c->d);
    in->cen16 = malloc(sizeof(uint16_t) * ((size_t)in->total + 1) * c->d);
    in->sizes = malloc(sizeof(int32_t) * (in->total + 1));
    in->offs = malloc(sizeof(int32_t) * (c->nkv + 1));
    for (int i = 0; i < c->nq * c->d; i++)
        in->q[i] = c->integer ? (float)ktest_int(rng, -2, 2) : ktest_normal(rng);
    for (int i = 0; i < in->total * c->d; i++) {
        in->cen[i] = c->integer ? (float)ktest_int(rng, -2, 2) : ktest_normal(rng);
        in->cen16[i] = ckv_half_from_f32(in->cen[i]);
    }
    for (int i = 0; i < in->total; i++) /* sizes 1..200, a few empty (never selected) */
        in->sizes[i] = ktest_int(rng, 0, 30) == 0 ? 0 : ktest_int(rng, 1, 200);
    in->offs[0] = 0;
    for (int h = 0; h < c->nkv; h++)
        in->offs[h + 1] =
            in->offs[h] + (c->empty_head && h == c->nkv - 1 ? 0 : c->clusters_per_head);
    in->max_sel = c->clusters_per_head > 0 ? c->clusters_per_head : 1;
}

static void sel_in_free(struct sel_in *in)
{
    free(in->q), free(in->cen), free(in->cen16), free(in->sizes), free(in->offs);
}

/* Budget exactness and ranking validity of unit u (selection sel, count n, last take) against
 * the reference scores rs (unit's row). */
static void check_unit(const struct sel_in *in, const int32_t *sel, int n, int last,
                       const float *rs, int h, int budget, const char *what)
{
    int c0 = in->offs[h], c1 = in->offs[h + 1];
    long head_tokens = 0, taken = 0;
    for (int c = c0; c < c1; c++)
        head_tokens += in->sizes[c];
    char *chosen = calloc((size_t)in->total + 1, 1);
    for (int i = 0; i < n; i++) {
        int c = sel[i];
        cr_assert(c >= c0 && c < c1, "%s: cluster %d of another head", what, c);
        cr_assert(!chosen[c], "%s: cluster %d twice", what, c);
        chosen[c] = 1;
        cr_assert_gt(in->sizes[c], 0, "%s: empty cluster selected", what);
        taken += i == n - 1 ? last : in->sizes[c];
    }
    long want = head_tokens < budget ? head_tokens : budget;
    cr_assert_eq(taken, want, "%s: took %ld tokens, want exactly %ld", what, taken, want);
    if (n > 0)
        cr_assert(last >= 1 && last <= in->sizes[sel[n - 1]], "%s: last take %d", what, last);
    else
        cr_assert_eq(last, 0, "%s", what);
    float scale = 1e-6f;
    for (int c = c0; c < c1; c++)
        scale = fmaxf(scale, fabsf(rs[c]));
    float tol = SCORE_TOL * scale, worst = INFINITY;
    for (int i = 0; i < n; i++) {
        if (i > 0)
            cr_assert(rs[sel[i]] <= rs[sel[i - 1]] + tol, "%s: order", what);
        worst = fminf(worst, rs[sel[i]]);
    }
    if (taken == budget)
        for (int c = c0; c < c1; c++)
            if (!chosen[c] && in->sizes[c] > 0)
                cr_assert(rs[c] <= worst + tol, "%s: cluster %d (%g) left out, worst chosen %g",
                          what, c, rs[c], worst);
    free(chosen);
}

static void run_select_case(ckv_ctx_t *gpu, ckv_ctx_t *cpu, const struct sel_case *c, uint64_t seed)
{
    struct ktest_rng rng = {seed};
    struct sel_in in;
    sel_in_make(&in, c, &rng);
    const int G = c->nq / c->nkv, T = in.total + 1;
    size_t sel_n = (size_t)c->nq * in.max_sel;
    /* device copies of the inputs, device outputs */
    float *dq = kcuda_up(gpu, in.q, sizeof(float) * c->nq * c->d);
    float *dcen = kcuda_up(gpu, in.cen, sizeof(float) * (size_t)T * c->d);
    uint16_t *dcen16 = kcuda_up(gpu, in.cen16, sizeof(uint16_t) * (size_t)T * c->d);
    int32_t *dsizes = kcuda_up(gpu, in.sizes, sizeof(int32_t) * T);
    int32_t *doffs = kcuda_up(gpu, in.offs, sizeof(int32_t) * (c->nkv + 1));
    int32_t *dsel = kcuda_alloc(gpu, sizeof(int32_t) * sel_n);
    int32_t *dcnt = kcuda_alloc(gpu, sizeof(int32_t) * c->nq);
    int32_t *dlast = kcuda_alloc(gpu, sizeof(int32_t) * c->nq);
    float *dscores = kcuda_alloc(gpu, sizeof(float) * (size_t)c->nq * T);
    int32_t *csel = malloc(sizeof(int32_t) * sel_n), ccnt[256], clast[256];
    int32_t *rsel = malloc(sizeof(int32_t) * sel_n), rcnt[256], rlast[256];
    cr_assert_leq(c->nq, 256);
    float *cscores = malloc(sizeof(float) * (size_t)c->nq * T);
    float *rscores = malloc(sizeof(float) * (size_t)c->nq * T);
    static const int budgets[] = {1, 15, 17, 100, 1000, 5000, 1000000};
    for (int f16 = 0; f16 <= 1; f16++)
        for (int mode = CKV_SELECT_PER_QHEAD; mode <= CKV_SELECT_KVHEAD_SUM; mode++) {
            int n_units = mode == CKV_SELECT_PER_QHEAD ? c->nq : c->nkv;
            for (size_t bi = 0; bi < CKV_ARRAY_LEN(budgets); bi++) {
                struct ckv_select_args a = {.n_q_heads = c->nq,
                                            .n_kv_heads = c->nkv,
                                            .head_dim = c->d,
                                            .mode = (enum ckv_select_mode)mode,
                                            .q = in.q,
                                            .centroids = f16 ? NULL : in.cen,
                                            .centroids_f16 = f16 ? in.cen16 : NULL,
                                            .sizes = in.sizes,
                                            .head_offsets = in.offs,
                                            .n_clusters_total = in.total,
                                            .budget = budgets[bi],
                                            .max_selected = in.max_sel,
                                            .sel_clusters = rsel,
                                            .sel_count = rcnt,
                                            .sel_last_take = rlast,
                                            .scores = rscores};
                cr_assert_eq(ckv_ref_select_clusters(&a), 0);
                a.sel_clusters = csel, a.sel_count = ccnt, a.sel_last_take = clast;
                a.scores = cscores;
                cr_assert_eq(ckv_select_clusters(cpu, &a), 0);
                struct ckv_select_args g = a;
                g.q = dq, g.centroids = f16 ? NULL : dcen, g.centroids_f16 = f16 ? dcen16 : NULL;
                g.sizes = dsizes, g.head_offsets = doffs, g.sel_clusters = dsel;
                g.sel_count = dcnt, g.sel_last_take = dlast, g.scores = dscores;
                cr_assert_eq(ckv_select_clusters(gpu, &g), 0);
                int32_t *sel = kcuda_down(gpu, dsel, sizeof(int32_t) * sel_n);
                int32_t *cnt = kcuda_down(gpu, dcnt, sizeof(int32_t) * c->nq);
                int32_t *last = kcuda_down(gpu, dlast, sizeof(int32_t) * c->nq);
                float *scores = kcuda_down(gpu, dscores, sizeof(float) * (size_t)c->nq * T);
                char what[160];
                snprintf(what, sizeof(what), "nq=%d nkv=%d d=%d C=%d mode=%d B=%d %s", c->nq,
                         c->nkv, c->d, c->clusters_per_head, mode, budgets[bi],
                         f16 ? "f16 centroids" : "f32 centroids");
                for (int u = 0; u < n_units; u++) {
                    int h = mode == CKV_SELECT_PER_QHEAD ? u / G : u;
                    const int32_t *su = sel + (size_t)u * in.max_sel;
                    check_unit(&in, su, cnt[u], last[u], rscores + (size_t)u * in.total, h,
                               budgets[bi], what);
                    if (c->integer) { /* exact scores: bit-equal to the CPU, ties included */
                        cr_assert_eq(cnt[u], ccnt[u], "%s unit %d: count", what, u);
                        cr_assert_eq(last[u], clast[u], "%s unit %d: last take", what, u);
                        cr_assert_arr_eq(su, csel + (size_t)u * in.max_sel,
                                         sizeof(int32_t) * cnt[u], "%s unit %d: order", what, u);
                    }
                    for (int cc = in.offs[h]; cc < in.offs[h + 1]; cc++) {
                        float s = scores[(size_t)u * in.total + cc];
                        float rs = rscores[(size_t)u * in.total + cc];
                        cr_assert(fabsf(s - rs) <= 1e-4f * (1.0f + fabsf(rs)), "%s: score %g vs %g",
                                  what, s, rs);
                    }
                }
                free(sel), free(cnt), free(last), free(scores);
            }
        }
    ckv_dev_free(gpu, dq), ckv_dev_free(gpu, dcen), ckv_dev_free(gpu, dcen16);
    ckv_dev_free(gpu, dsizes), ckv_dev_free(gpu, doffs), ckv_dev_free(gpu, dsel);
    ckv_dev_free(gpu, dcnt), ckv_dev_free(gpu, dlast), ckv_dev_free(gpu, dscores);
    free(csel), free(rsel), free(cscores), free(rscores);
    sel_in_free(&in);
}

Test(cuda_select, clusters_vs_cpu)
{
    static const struct sel_case cases[] = {
        {32, 8, 128, 410, 0, 1}, /* Llama-3-8B shape, 410 clusters (> 256), exact */
        {32, 8, 128, 410, 0, 0}, /* same, float */
        {8, 8, 64, 300, 0, 1},   /* group 1 */
        {12, 4, 64, 1000, 1, 1}, /* group 3, 1000 clusters, one head without clusters */
        {32, 4, 128, 77, 0, 0},  /* group 8 */
        {9, 3, 64, 5, 0, 1},     /* few clusters: budget exceeds the head */
        {4, 2, 80, 40, 0, 0},    /* head_dim 80: scalar row layout */
        {160, 1, 64, 50, 0, 1},  /* a group of 160 query heads: more units than a CTA's threads */
    };
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    for (size_t c = 0; c < CKV_ARRAY_LEN(cases); c++)
        run_select_case(gpu, cpu, &cases[c], 500 + c);
    ckv_ctx_destroy(&gpu);
    ckv_ctx_destroy(&cpu);
}

/* Ties go to the lower index; the ranking is a real sort of all 600 clusters. */
Test(cuda_select, ranking_is_exact_and_ties_go_to_lower_index)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    const int d = 64, C = 600;
    float q[64], *cen = calloc((size_t)C * d, sizeof(float));
    int32_t sizes[600], offs[2] = {0, C}, cnt, last;
    for (int i = 0; i < d; i++)
        q[i] = i == 0 ? 1.0f : 0.0f;
    for (int c = 0; c < C; c++) { /* score of c = (c * 37) % 300: each score twice */
        cen[(size_t)c * d] = (float)((c * 37) % 300);
        sizes[c] = 1;
    }
    struct ckv_select_args a = {.n_q_heads = 1,
                                .n_kv_heads = 1,
                                .head_dim = d,
                                .q = kcuda_up(gpu, q, sizeof(q)),
                                .centroids = kcuda_up(gpu, cen, sizeof(float) * C * d),
                                .sizes = kcuda_up(gpu, sizes, sizeof(sizes)),
                                .head_offsets = kcuda_up(gpu, offs, sizeof(offs)),
                                .n_clusters_total = C,
                                .budget = C,
                                .max_selected = C,
                                .sel_clusters = kcuda_alloc(gpu, sizeof(int32_t) * C),
                                .sel_count = kcuda_alloc(gpu, 4),
                                .sel_last_take = kcuda_alloc(gpu, 4)};
    cr_assert_eq(ckv_select_clusters(gpu, &a), 0);
    int32_t *sel = kcuda_down(gpu, a.sel_clusters, sizeof(int32_t) * C);
    cr_assert_eq(ckv_copy_d2h(gpu, &cnt, a.sel_count, 4), 0);
    cr_assert_eq(ckv_copy_d2h(gpu, &last, a.sel_last_take, 4), 0);
    cr_assert_eq(cnt, C);
    cr_assert_eq(last, 1);
    for (int i = 1; i < C; i++) {
        float s0 = cen[(size_t)sel[i - 1] * d], s1 = cen[(size_t)sel[i] * d];
        cr_assert(s0 > s1 || (s0 == s1 && sel[i - 1] < sel[i]), "position %d", i);
    }
    ckv_dev_free(gpu, (void *)a.q), ckv_dev_free(gpu, (void *)a.centroids);
    ckv_dev_free(gpu, (void *)a.sizes), ckv_dev_free(gpu, (void *)a.head_offsets);
    ckv_dev_free(gpu, a.sel_clusters), ckv_dev_free(gpu, a.sel_count);
    ckv_dev_free(gpu, a.sel_last_take);
    ckv_ctx_destroy(&gpu);
    free(cen), free(sel);
}

/* head_offsets and sizes live on the device: the CUDA backend checks them there. */
Test(cuda_select, errors)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    float q[2 * 64] = {0}, cen[4 * 64] = {0};
    int32_t sizes[4] = {5, 5, 5, 5}, offs[3] = {0, 2, 4};
    int32_t *dsizes = kcuda_up(gpu, sizes, sizeof(sizes)),
            *doffs = kcuda_up(gpu, offs, sizeof(offs));
    struct ckv_select_args ok = {.n_q_heads = 2,
                                 .n_kv_heads = 2,
                                 .head_dim = 64,
                                 .q = kcuda_up(gpu, q, sizeof(q)),
                                 .centroids = kcuda_up(gpu, cen, sizeof(cen)),
                                 .sizes = dsizes,
                                 .head_offsets = doffs,
                                 .n_clusters_total = 4,
                                 .budget = 7,
                                 .max_selected = 2,
                                 .sel_clusters = kcuda_alloc(gpu, 16),
                                 .sel_count = kcuda_alloc(gpu, 8),
                                 .sel_last_take = kcuda_alloc(gpu, 8)};
    cr_assert_eq(ckv_select_clusters(gpu, &ok), 0);
    struct ckv_select_args a = ok;
    a.max_selected = 1; /* min(B, 2 clusters) = 2 needed */
    cr_assert_eq(ckv_select_clusters(gpu, &a), -ENOSPC);
    a = ok, a.n_clusters_total = 3; /* disagrees with head_offsets */
    cr_assert_eq(ckv_select_clusters(gpu, &a), -EINVAL);
    int32_t bad_size[4] = {5, 5, -1, 5};
    cr_assert_eq(ckv_copy_h2d(gpu, dsizes, bad_size, sizeof(bad_size)), 0);
    cr_assert_eq(ckv_select_clusters(gpu, &ok), -EINVAL);
    cr_assert_eq(ckv_copy_h2d(gpu, dsizes, sizes, sizeof(sizes)), 0);
    int32_t bad_offs[3] = {0, 5, 4}; /* decreasing */
    cr_assert_eq(ckv_copy_h2d(gpu, doffs, bad_offs, sizeof(bad_offs)), 0);
    cr_assert_eq(ckv_select_clusters(gpu, &ok), -EINVAL);
    int32_t neg_offs[3] = {-1, 2, 4};
    cr_assert_eq(ckv_copy_h2d(gpu, doffs, neg_offs, sizeof(neg_offs)), 0);
    cr_assert_eq(ckv_select_clusters(gpu, &ok), -EINVAL);
    cr_assert_eq(ckv_copy_h2d(gpu, doffs, offs, sizeof(offs)), 0);
    cr_assert_eq(ckv_select_clusters(gpu, &ok), 0); /* bad input did not poison the context */
    ckv_dev_free(gpu, (void *)ok.q), ckv_dev_free(gpu, (void *)ok.centroids);
    ckv_dev_free(gpu, dsizes), ckv_dev_free(gpu, doffs), ckv_dev_free(gpu, ok.sel_clusters);
    ckv_dev_free(gpu, ok.sel_count), ckv_dev_free(gpu, ok.sel_last_take);
    ckv_ctx_destroy(&gpu);
}

/* ---- Quest ---- */

Test(cuda_select, quest_vs_cpu)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    const int nq = 12, nkv = 4, d = 64, n_tok = 16 * 40 + 7; /* partial last page */
    const int np = (n_tok + 15) / 16;
    struct ktest_rng rng = {71};
    for (int integer = 0; integer <= 1; integer++)
        for (int dt = CKV_DTYPE_F32; dt <= CKV_DTYPE_F16; dt++) {
            size_t n_el = (size_t)nkv * n_tok * d, esz = ckv_dtype_size((enum ckv_dtype)dt);
            void *k = malloc(n_el * esz);
            for (size_t i = 0; i < n_el; i++) {
                float x = integer ? (float)ktest_int(&rng, -3, 3) : ktest_normal(&rng);
                if (dt == CKV_DTYPE_F16)
                    ((uint16_t *)k)[i] = ckv_half_from_f32(x);
                else
                    ((float *)k)[i] = x;
            }
            float q[12 * 64];
            for (int i = 0; i < nq * d; i++)
                q[i] = integer ? (float)ktest_int(&rng, -2, 2) : ktest_normal(&rng);
            size_t b_bytes = sizeof(float) * nkv * np * d;
            float *mn = malloc(b_bytes), *mx = malloc(b_bytes);
            char *dk = kcuda_up(gpu, k, n_el * esz);
            float *dmn = kcuda_alloc(gpu, b_bytes), *dmx = kcuda_alloc(gpu, b_bytes);
            for (int h = 0; h < nkv; h++) {
                size_t off = (size_t)h * n_tok * d;
                cr_assert_eq(ckv_quest_page_bounds(cpu, (char *)k + off * esz, (enum ckv_dtype)dt,
                                                   n_tok, d, d, mn + (size_t)h * np * d,
                                                   mx + (size_t)h * np * d),
                             0);
                cr_assert_eq(ckv_quest_page_bounds(gpu, dk + off * esz, (enum ckv_dtype)dt, n_tok,
                                                   d, d, dmn + (size_t)h * np * d,
                                                   dmx + (size_t)h * np * d),
                             0);
            }
            float *gmn = kcuda_down(gpu, dmn, b_bytes), *gmx = kcuda_down(gpu, dmx, b_bytes);
            cr_assert_arr_eq(gmn, mn, b_bytes, "page minima");
            cr_assert_arr_eq(gmx, mx, b_bytes, "page maxima");
            float *dq = kcuda_up(gpu, q, sizeof(q));
            for (int mode = 0; mode <= 2; mode++)
                for (int n_sel = 1; n_sel <= np + 3; n_sel += 6) {
                    int n_units = mode == 0 ? nq : nkv;
                    size_t sb = sizeof(int32_t) * n_units * n_sel;
                    int32_t *sp = malloc(sb), cnt[12];
                    int32_t *dsp = kcuda_alloc(gpu, sb), *dcnt = kcuda_alloc(gpu, sizeof(cnt));
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
                    cr_assert_eq(ckv_quest_select(cpu, &a), 0);
                    struct ckv_quest_args g = a;
                    g.q = dq, g.page_min = dmn, g.page_max = dmx, g.sel_pages = dsp;
                    g.sel_count = dcnt;
                    cr_assert_eq(ckv_quest_select(gpu, &g), 0);
                    int32_t *gsp = kcuda_down(gpu, dsp, sb),
                            *gcnt = kcuda_down(gpu, dcnt, sizeof(cnt));
                    int want = n_sel < np ? n_sel : np;
                    for (int u = 0; u < n_units; u++) {
                        cr_assert_eq(gcnt[u], want);
                        cr_assert_arr_eq(
                            gsp + (size_t)u * n_sel, sp + (size_t)u * n_sel, sizeof(int32_t) * want,
                            "%s %s mode %d n_sel %d unit %d: pages differ",
                            integer ? "integer" : "float", ckv_dtype_name(dt), mode, n_sel, u);
                    }
                    ckv_dev_free(gpu, dsp), ckv_dev_free(gpu, dcnt);
                    free(sp), free(gsp), free(gcnt);
                }
            ckv_dev_free(gpu, dk), ckv_dev_free(gpu, dmn), ckv_dev_free(gpu, dmx);
            ckv_dev_free(gpu, dq);
            free(k), free(mn), free(mx), free(gmn), free(gmx);
        }
    ckv_ctx_destroy(&gpu);
    ckv_ctx_destroy(&cpu);
}

/* ---- oracle ---- */

Test(cuda_select, oracle_vs_cpu)
{
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    const int nq = 8, nkv = 2, d = 64, n = 1500, G = nq / nkv;
    struct ktest_rng rng = {81};
    float q[8 * 64];
    for (int integer = 0; integer <= 1; integer++) {
        size_t kb = (size_t)nkv * n * d * 2;
        uint16_t *k = malloc(kb);
        for (size_t i = 0; i < (size_t)nkv * n * d; i++)
            k[i] = ckv_half_from_f32(integer ? (float)ktest_int(&rng, -2, 2) : ktest_normal(&rng));
        for (int i = 0; i < nq * d; i++)
            q[i] = integer ? (float)ktest_int(&rng, -2, 2) : ktest_normal(&rng);
        void *dk = kcuda_up(gpu, k, kb), *dq = kcuda_up(gpu, q, sizeof(q));
        static const int budgets[] = {1, 100, 1023, 1500};
        for (size_t bi = 0; bi < CKV_ARRAY_LEN(budgets); bi++) {
            int B = budgets[bi];
            size_t sb = sizeof(int32_t) * nq * B;
            int32_t *csel = malloc(sb), *dsel = kcuda_alloc(gpu, sb);
            cr_assert_eq(
                ckv_oracle_topk(cpu, q, k, CKV_DTYPE_F16, nq, nkv, d, n, (size_t)n * d, d, B, csel),
                0);
            cr_assert_eq(ckv_oracle_topk(gpu, dq, dk, CKV_DTYPE_F16, nq, nkv, d, n, (size_t)n * d,
                                         d, B, dsel),
                         0);
            int32_t *sel = kcuda_down(gpu, dsel, sb);
            if (integer) {
                cr_assert_arr_eq(sel, csel, sb, "B=%d: differs from the CPU", B);
            } else { /* a true top-B in descending order, by exact recomputation */
                for (int h = 0; h < nq; h++) {
                    double *s = malloc(sizeof(double) * n);
                    for (int t = 0; t < n; t++) {
                        s[t] = 0;
                        for (int j = 0; j < d; j++)
                            s[t] += (double)q[h * d + j] *
                                    ckv_half_to_f32(k[((size_t)(h / G) * n + t) * d + j]);
                    }
                    char *in = calloc(n, 1);
                    double worst = INFINITY;
                    for (int j = 0; j < B; j++) {
                        int t = sel[h * B + j];
                        cr_assert(t >= 0 && t < n && !in[t], "B=%d head %d: token %d", B, h, t);
                        in[t] = 1;
                        if (j)
                            cr_assert(s[t] <= s[sel[h * B + j - 1]] + 1e-4, "order");
                        worst = fmin(worst, s[t]);
                    }
                    for (int t = 0; t < n; t++)
                        if (!in[t])
                            cr_assert(s[t] <= worst + 1e-4, "B=%d head %d: %d left out", B, h, t);
                    free(s), free(in);
                }
            }
            ckv_dev_free(gpu, dsel);
            free(csel), free(sel);
        }
        ckv_dev_free(gpu, dk), ckv_dev_free(gpu, dq);
        free(k);
    }
    ckv_ctx_destroy(&gpu);
    ckv_ctx_destroy(&cpu);
}

/* ---- the whole sparse path on the device ---- */

/* k-means of every KV head on the device, its CSR output packed into blocks by the device
 * (members as the rows), centroids and sizes fed to the device selection with B >= the
 * clustered tokens, block lists over sinks + selected clusters + window: decode attention
 * over them equals full attention (both on the device) within ATTN 2e-5, per query head and
 * per KV head. (ckv_sparse.h assembles the same on the host for CPU contexts.) */
Test(cuda_select, sparse_path_equals_full_when_budget_covers)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    const int nq = 32, nkv = 8, d = 128, n = 700, sinks = 16, window = 40, C = 9;
    const int G = nq / nkv, n_clu = n - sinks - window;
    struct ktest_rng rng = {900};
    size_t head_el = (size_t)n * d, kv_b = (size_t)nkv * head_el * 2;
    uint16_t *k = ktest_random_kv(&rng, (size_t)nkv * head_el, CKV_DTYPE_F16, 1.5f);
    uint16_t *v = ktest_random_kv(&rng, (size_t)nkv * head_el, CKV_DTYPE_F16, 1.0f);
    float q[32 * 128];
    ktest_fill_normal(&rng, q, CKV_ARRAY_LEN(q), 1.0f);
    uint16_t *dk = kcuda_up(gpu, k, kv_b), *dv = kcuda_up(gpu, v, kv_b);
    float *dq = kcuda_up(gpu, q, sizeof(q));
    const int max_blocks = nkv * (n / 16 + C + 3);
    void *dpool = kcuda_alloc(gpu, ckv_block_bytes(d, CKV_DTYPE_F16) * max_blocks);
    int32_t *rows = malloc(sizeof(int32_t) * n);
    for (int t = 0; t < n; t++)
        rows[t] = t;
    int32_t *drows = kcuda_up(gpu, rows, sizeof(int32_t) * n);
    /* host layout: per head sinks, clusters, window as runs of slots */
    int32_t head_off[9] = {0}, sizes[8 * 9], first_slot[8 * 9], sink_slot[8], win_slot[8];
    float *cen = malloc(sizeof(float) * nkv * C * d);
    int next = 0, total = 0;
    float *dcen = kcuda_alloc(gpu, sizeof(float) * C * d);
    int32_t *dsz = kcuda_alloc(gpu, sizeof(int32_t) * C), *doff = kcuda_alloc(gpu, 4 * (C + 1));
    int32_t *dmem = kcuda_alloc(gpu, sizeof(int32_t) * n_clu);
    int32_t slots[64];
    for (int h = 0; h < nkv; h++) {
        const uint16_t *kh = dk + (size_t)h * head_el, *vh = dv + (size_t)h * head_el;
        /* packs n_rows rows (device row indices) into consecutive fresh slots */
#define PACK(drow_ptr, n_rows, first)                                                              \
    do {                                                                                           \
        int nb_ = ((n_rows) + 15) / 16;                                                            \
        for (int b_ = 0; b_ < nb_; b_++)                                                           \
            slots[b_] = next + b_;                                                                 \
        int32_t *ds_ = kcuda_up(gpu, slots, sizeof(int32_t) * nb_);                                \
        cr_assert_eq(                                                                              \
            ckv_pack_blocks(gpu, kh, vh, CKV_DTYPE_F16, d, d, (drow_ptr), (n_rows), dpool, ds_),   \
            0);                                                                                    \
        ckv_dev_free(gpu, ds_);                                                                    \
        (first) = next;                                                                            \
        next += nb_;                                                                               \
    } while (0)
        PACK(drows, sinks, sink_slot[h]);
        struct ckv_kmeans_params kp = {.n_clusters = C, .max_iter = 10, .tol = 0.001f, .seed = 3};
        struct ckv_kmeans_out o = {dcen, dsz, doff, dmem};
        int nc = 0;
        cr_assert_eq(ckv_kmeans(gpu, kh + (size_t)sinks * d, CKV_DTYPE_F16, n_clu, d, d, sinks, &kp,
                                &o, &nc, NULL),
                     0);
        int32_t off[10];
        cr_assert_eq(ckv_copy_d2h(gpu, off, doff, sizeof(int32_t) * (nc + 1)), 0);
        cr_assert_eq(ckv_copy_d2h(gpu, sizes + total, dsz, sizeof(int32_t) * nc), 0);
        cr_assert_eq(ckv_copy_d2h(gpu, cen + (size_t)total * d, dcen, sizeof(float) * nc * d), 0);
        for (int c = 0; c < nc; c++) /* members are positions: rows of the head's cache */
            PACK(dmem + off[c], off[c + 1] - off[c], first_slot[total + c]);
        total += nc;
        head_off[h + 1] = total;
        PACK(drows + (n - window), window, win_slot[h]);
#undef PACK
    }
    cr_assert_leq(next, max_blocks);
    float *dcen_all = kcuda_up(gpu, cen, sizeof(float) * total * d);
    int32_t *dsizes = kcuda_up(gpu, sizes, sizeof(int32_t) * total);
    int32_t *dhoff = kcuda_up(gpu, head_off, sizeof(head_off));
    /* full attention on the device */
    float full[32 * 128], sparse[32 * 128];
    struct ckv_attn_full_args fa = {.n_q_heads = nq,
                                    .n_kv_heads = nkv,
                                    .head_dim = d,
                                    .n_ctx = n,
                                    .q = dq,
                                    .k = dk,
                                    .v = dv,
                                    .dtype = CKV_DTYPE_F16,
                                    .head_stride = head_el,
                                    .token_stride = d,
                                    .out = kcuda_alloc(gpu, sizeof(full))};
    cr_assert_eq(ckv_attn_decode_full(gpu, &fa), 0);
    cr_assert_eq(ckv_copy_d2h(gpu, full, fa.out, sizeof(full)), 0);
    int32_t *dsel = kcuda_alloc(gpu, sizeof(int32_t) * nq * C);
    int32_t *dcnt = kcuda_alloc(gpu, 4 * nq), *dlast = kcuda_alloc(gpu, 4 * nq);
    struct ckv_block_ref *refs = malloc(sizeof(*refs) * nq * (max_blocks + 1));
    int32_t loffs[33];
    for (int mode = CKV_SELECT_PER_QHEAD; mode <= CKV_SELECT_KVHEAD_MAX; mode++) {
        int n_units = mode == CKV_SELECT_PER_QHEAD ? nq : nkv, hpl = nq / n_units;
        struct ckv_select_args sa = {.n_q_heads = nq,
                                     .n_kv_heads = nkv,
                                     .head_dim = d,
                                     .mode = (enum ckv_select_mode)mode,
                                     .q = dq,
                                     .centroids = dcen_all,
                                     .sizes = dsizes,
                                     .head_offsets = dhoff,
                                     .n_clusters_total = total,
                                     .budget = n_clu + 7,
                                     .max_selected = C,
                                     .sel_clusters = dsel,
                                     .sel_count = dcnt,
                                     .sel_last_take = dlast};
        cr_assert_eq(ckv_select_clusters(gpu, &sa), 0);
        int32_t sel[32 * 9], cnt[32], last[32];
        cr_assert_eq(ckv_copy_d2h(gpu, sel, dsel, sizeof(int32_t) * n_units * C), 0);
        cr_assert_eq(ckv_copy_d2h(gpu, cnt, dcnt, sizeof(int32_t) * n_units), 0);
        cr_assert_eq(ckv_copy_d2h(gpu, last, dlast, sizeof(int32_t) * n_units), 0);
        int nr = 0;
        loffs[0] = 0;
        for (int u = 0; u < n_units; u++) {
            int h = mode == CKV_SELECT_PER_QHEAD ? u / G : u;
            /* adds the blocks of the first `tokens` tokens of a run of slots */
#define RUN(first, tokens)                                                                         \
    for (int t_ = 0; t_ < (tokens); t_ += 16)                                                      \
        refs[nr++] = (struct ckv_block_ref){(first) + t_ / 16, (tokens)-t_ < 16 ? (tokens)-t_ : 16};
            RUN(sink_slot[h], sinks);
            cr_assert_eq(cnt[u], head_off[h + 1] - head_off[h], "the budget covers every cluster");
            for (int i = 0; i < cnt[u]; i++) {
                int c = sel[u * C + i];
                int take = i == cnt[u] - 1 ? last[u] : sizes[c];
                RUN(first_slot[c], take);
            }
            RUN(win_slot[h], window);
#undef RUN
            loffs[u + 1] = nr;
        }
        struct ckv_attn_blocks_args ba = {.n_q_heads = nq,
                                          .head_dim = d,
                                          .n_lists = n_units,
                                          .heads_per_list = hpl,
                                          .q = dq,
                                          .pool = dpool,
                                          .dtype = CKV_DTYPE_F16,
                                          .refs = kcuda_up(gpu, refs, sizeof(*refs) * nr),
                                          .list_offsets = kcuda_up(gpu, loffs, 4 * (n_units + 1)),
                                          .out = kcuda_alloc(gpu, sizeof(sparse))};
        cr_assert_eq(ckv_attn_decode_blocks(gpu, &ba), 0);
        cr_assert_eq(ckv_copy_d2h(gpu, sparse, ba.out, sizeof(sparse)), 0);
        float err = ktest_max_abs_diff(sparse, full, CKV_ARRAY_LEN(full), NULL);
        cr_assert(err <= 2e-5f, "mode %d: sparse vs full %g", mode, err);
        ckv_dev_free(gpu, (void *)ba.refs), ckv_dev_free(gpu, (void *)ba.list_offsets);
        ckv_dev_free(gpu, ba.out);
    }
    ckv_dev_free(gpu, dk), ckv_dev_free(gpu, dv), ckv_dev_free(gpu, dq), ckv_dev_free(gpu, dpool);
    ckv_dev_free(gpu, drows), ckv_dev_free(gpu, dcen), ckv_dev_free(gpu, dsz);
    ckv_dev_free(gpu, doff), ckv_dev_free(gpu, dmem), ckv_dev_free(gpu, dcen_all);
    ckv_dev_free(gpu, dsizes), ckv_dev_free(gpu, dhoff), ckv_dev_free(gpu, fa.out);
    ckv_dev_free(gpu, dsel), ckv_dev_free(gpu, dcnt), ckv_dev_free(gpu, dlast);
    free(k), free(v), free(rows), free(cen), free(refs);
    ckv_ctx_destroy(&gpu);
}
