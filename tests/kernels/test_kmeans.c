/*
 * Suite "kernels_kmeans": cosine k-means (ckv_kmeans) on every ISA with 1 and 2 threads.
 *
 * What is asserted: planted clusters are recovered exactly (every output cluster is one
 * planted group, every group one cluster); the CSR output is well formed (sizes >= 1,
 * offsets are their prefix sums, members ascending within a cluster, pos_base applied); a
 * centroid is the mean of its members' raw keys (tolerance 1e-5 relative to the key scale);
 * the result does not depend on the thread count (bit-equal); it matches the
 * double-precision reference ckv_ref_kmeans on unstructured random keys (same cluster count,
 * at most 1% of tokens in a different cluster: rounding may flip near-ties); empty clusters
 * are removed; one-token clusters, more clusters than tokens, one token, zero keys work;
 * bad arguments are -EINVAL.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ktest.h"

struct km_result {
    int n_clusters, n_iter;
    float *centroids;
    int32_t *sizes, *offsets, *members;
};

static void km_alloc(struct km_result *r, int cap, int n, int d)
{
    r->centroids = calloc((size_t)cap * d, sizeof(float));
    r->sizes = calloc((size_t)cap, sizeof(int32_t));
    r->offsets = calloc((size_t)cap + 1, sizeof(int32_t));
    r->members = calloc((size_t)n, sizeof(int32_t));
}

static void km_free(struct km_result *r)
{
    free(r->centroids), free(r->sizes), free(r->offsets), free(r->members);
}

static int km_run(ckv_ctx_t *ctx, const void *keys, enum ckv_dtype dt, int n, int d, size_t stride,
                  int32_t pos_base, int C, uint64_t seed, struct km_result *r)
{
    struct ckv_kmeans_params p = {.n_clusters = C, .max_iter = 20, .tol = 0.001f, .seed = seed};
    km_alloc(r, C < n ? C : n, n, d);
    struct ckv_kmeans_out o = {r->centroids, r->sizes, r->offsets, r->members};
    if (!ctx)
        return ckv_ref_kmeans(keys, dt, n, d, stride, pos_base, &p, &o, &r->n_clusters, &r->n_iter);
    return ckv_kmeans(ctx, keys, dt, n, d, stride, pos_base, &p, &o, &r->n_clusters, &r->n_iter);
}

/* CSR invariants and centroid = mean of the raw member keys. */
static void check_csr(const struct km_result *r, const void *keys, enum ckv_dtype dt, int n, int d,
                      size_t stride, int32_t pos_base)
{
    cr_assert(r->n_clusters >= 1);
    cr_assert_eq(r->offsets[0], 0);
    char *seen = calloc((size_t)n, 1);
    for (int c = 0; c < r->n_clusters; c++) {
        cr_assert_geq(r->sizes[c], 1, "cluster %d empty", c);
        cr_assert_eq(r->offsets[c + 1], r->offsets[c] + r->sizes[c]);
        double *mean = calloc((size_t)d, sizeof(double));
        double scale = 0;
        for (int m = r->offsets[c]; m < r->offsets[c + 1]; m++) {
            int t = r->members[m] - pos_base;
            cr_assert(t >= 0 && t < n, "member %d out of range", r->members[m]);
            cr_assert(!seen[t], "token %d twice", t);
            seen[t] = 1;
            if (m > r->offsets[c])
                cr_assert_gt(r->members[m], r->members[m - 1], "members not ascending");
            const char *row = (const char *)keys + (size_t)t * stride * ckv_dtype_size(dt);
            for (int i = 0; i < d; i++) {
                double x = ckv_ref_elem(row, dt, (size_t)i);
                mean[i] += x;
                scale = fabs(x) > scale ? fabs(x) : scale;
            }
        }
        for (int i = 0; i < d; i++) {
            double want = mean[i] / r->sizes[c];
            cr_assert(fabs(r->centroids[(size_t)c * d + i] - want) <= 1e-5 * (scale + 1e-30),
                      "centroid %d[%d] = %g, mean %g", c, i, r->centroids[(size_t)c * d + i], want);
        }
        free(mean);
    }
    cr_assert_eq(r->offsets[r->n_clusters], n, "every token in one cluster");
    free(seen);
}

/* n_groups directions in d dims, n_per tokens each, keys = magnitude * (dir + noise). Token
 * i's group goes to group[i]. Rows are `stride` apart. */
static void *planted(struct ktest_rng *rng, int n_groups, int n_per, int d, size_t stride,
                     enum ckv_dtype dt, int *group)
{
    float *dirs = malloc(sizeof(float) * (size_t)n_groups * d);
    ktest_fill_normal(rng, dirs, (size_t)n_groups * d, 1.0f);
    int n = n_groups * n_per;
    size_t esz = ckv_dtype_size(dt);
    char *keys = calloc((size_t)n * stride + d, esz);
    for (int i = 0; i < n; i++) {
        int g = (i * 5) % n_groups; /* interleaved, n_per each (n_groups coprime to 5) */
        group[i] = g;
        float mag = 0.5f + 3.0f * ktest_uniform(rng);
        for (int t = 0; t < d; t++) {
            float x = mag * (dirs[(size_t)g * d + t] + 0.08f * ktest_normal(rng));
            if (dt == CKV_DTYPE_F16)
                ((uint16_t *)keys)[(size_t)i * stride + t] = ckv_half_from_f32(x);
            else
                ((float *)keys)[(size_t)i * stride + t] = x;
        }
    }
    free(dirs);
    return keys;
}

Test(kernels_kmeans, recovers_planted_clusters)
{
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    const int G = 12, per = 40, n = G * 40, d = 64;
    int group[12 * 40];
    for (int dt = CKV_DTYPE_F32; dt <= CKV_DTYPE_F16; dt++) {
        struct ktest_rng rng = {100 + dt};
        size_t stride = 3 * d; /* rows of a (t, 3 heads, d) layout */
        void *keys = planted(&rng, G, per, d, stride, (enum ckv_dtype)dt, group);
        for (int i = 0; i < n_isa; i++)
            for (int threads = 1; threads <= 2; threads++) {
                ckv_ctx_t *ctx = ktest_ctx(isas[i], threads);
                struct km_result r;
                cr_assert_eq(km_run(ctx, keys, (enum ckv_dtype)dt, n, d, stride, 1000, G, 7, &r),
                             0);
                check_csr(&r, keys, (enum ckv_dtype)dt, n, d, stride, 1000);
                cr_assert_eq(r.n_clusters, G, "%s: %d clusters", ckv_ctx_describe(ctx),
                             r.n_clusters);
                int used[12] = {0};
                for (int c = 0; c < r.n_clusters; c++) {
                    int g = group[r.members[r.offsets[c]] - 1000];
                    cr_assert(!used[g], "group %d split", g);
                    used[g] = 1;
                    cr_assert_eq(r.sizes[c], per);
                    for (int m = r.offsets[c]; m < r.offsets[c + 1]; m++)
                        cr_assert_eq(group[r.members[m] - 1000], g, "mixed cluster");
                }
                cr_assert(r.n_iter >= 1 && r.n_iter < 20, "converged early: %d", r.n_iter);
                km_free(&r);
                ckv_ctx_destroy(&ctx);
            }
        free(keys);
    }
}

Test(kernels_kmeans, thread_count_does_not_change_result)
{
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    const int n = 2500, d = 64, C = 31; /* > 2 row chunks of 1024 */
    struct ktest_rng rng = {3};
    void *keys = ktest_random_kv(&rng, (size_t)n * d, CKV_DTYPE_F16, 1.0f);
    for (int i = 0; i < n_isa; i++) {
        struct km_result r[2];
        for (int t = 0; t < 2; t++) {
            ckv_ctx_t *ctx = ktest_ctx(isas[i], t + 1);
            cr_assert_eq(km_run(ctx, keys, CKV_DTYPE_F16, n, d, d, 0, C, 99, &r[t]), 0);
            ckv_ctx_destroy(&ctx);
        }
        cr_assert_eq(r[0].n_clusters, r[1].n_clusters);
        cr_assert_eq(r[0].n_iter, r[1].n_iter);
        cr_assert_arr_eq(r[0].members, r[1].members, sizeof(int32_t) * n);
        cr_assert_arr_eq(r[0].offsets, r[1].offsets, sizeof(int32_t) * (r[0].n_clusters + 1));
        cr_assert_arr_eq(r[0].centroids, r[1].centroids,
                         sizeof(float) * (size_t)r[0].n_clusters * d);
        km_free(&r[0]);
        km_free(&r[1]);
    }
    free(keys);
}

Test(kernels_kmeans, matches_reference_on_random_keys)
{
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    const int n = 400, d = 64, C = 10;
    struct ktest_rng rng = {12};
    float *keys = malloc(sizeof(float) * n * d);
    ktest_fill_normal(&rng, keys, (size_t)n * d, 1.0f);
    struct km_result ref;
    cr_assert_eq(km_run(NULL, keys, CKV_DTYPE_F32, n, d, d, 0, C, 5, &ref), 0);
    check_csr(&ref, keys, CKV_DTYPE_F32, n, d, d, 0);
    int *ref_label = malloc(sizeof(int) * n);
    for (int c = 0; c < ref.n_clusters; c++)
        for (int m = ref.offsets[c]; m < ref.offsets[c + 1]; m++)
            ref_label[ref.members[m]] = c;
    for (int i = 0; i < n_isa; i++) {
        ckv_ctx_t *ctx = ktest_ctx(isas[i], 2);
        struct km_result r;
        cr_assert_eq(km_run(ctx, keys, CKV_DTYPE_F32, n, d, d, 0, C, 5, &r), 0);
        check_csr(&r, keys, CKV_DTYPE_F32, n, d, d, 0);
        cr_assert_eq(r.n_clusters, ref.n_clusters);
        int differ = 0;
        for (int c = 0; c < r.n_clusters; c++)
            for (int m = r.offsets[c]; m < r.offsets[c + 1]; m++)
                differ += ref_label[r.members[m]] != c;
        cr_assert(differ <= n / 100, "%s: %d of %d tokens in another cluster",
                  ckv_ctx_describe(ctx), differ, n);
        km_free(&r);
        ckv_ctx_destroy(&ctx);
    }
    km_free(&ref);
    free(keys), free(ref_label);
}

Test(kernels_kmeans, empty_clusters_are_removed)
{
    /* 90 keys, 3 distinct directions (exact duplicates): 10 requested, 3 survive */
    const int n = 90, d = 64;
    float *keys = malloc(sizeof(float) * n * d);
    struct ktest_rng rng = {8};
    float dirs[3][64];
    ktest_fill_normal(&rng, &dirs[0][0], 3 * 64, 1.0f);
    for (int i = 0; i < n; i++)
        for (int t = 0; t < d; t++)
            keys[i * d + t] = dirs[i % 3][t] * (1.0f + (float)(i % 5)); /* same direction */
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    for (int i = 0; i < n_isa; i++) {
        ckv_ctx_t *ctx = ktest_ctx(isas[i], 2);
        struct km_result r;
        cr_assert_eq(km_run(ctx, keys, CKV_DTYPE_F32, n, d, d, 0, 10, 1, &r), 0);
        check_csr(&r, keys, CKV_DTYPE_F32, n, d, d, 0);
        cr_assert_eq(r.n_clusters, 3);
        for (int c = 0; c < 3; c++) {
            cr_assert_eq(r.sizes[c], 30);
            for (int m = r.offsets[c]; m < r.offsets[c + 1]; m++)
                cr_assert_eq(r.members[m] % 3, r.members[r.offsets[c]] % 3);
        }
        km_free(&r);
        ckv_ctx_destroy(&ctx);
    }
    free(keys);
}

Test(kernels_kmeans, one_token_clusters_and_clamping)
{
    enum ckv_cpu_isa isas[3];
    int n_isa = ktest_isas(isas);
    struct ktest_rng rng = {21};
    const int d = 128;
    float *keys = malloc(sizeof(float) * 20 * d);
    ktest_fill_normal(&rng, keys, 20 * (size_t)d, 1.0f);
    for (int i = 0; i < n_isa; i++) {
        ckv_ctx_t *ctx = ktest_ctx(isas[i], 2);
        struct km_result r;
        /* as many clusters as tokens: each token alone */
        cr_assert_eq(km_run(ctx, keys, CKV_DTYPE_F32, 20, d, d, 0, 20, 3, &r), 0);
        check_csr(&r, keys, CKV_DTYPE_F32, 20, d, d, 0);
        cr_assert_eq(r.n_clusters, 20);
        for (int c = 0; c < 20; c++)
            cr_assert_eq(r.sizes[c], 1);
        km_free(&r);
        /* more clusters than tokens: clamped */
        cr_assert_eq(km_run(ctx, keys, CKV_DTYPE_F32, 7, d, d, 0, 50, 3, &r), 0);
        check_csr(&r, keys, CKV_DTYPE_F32, 7, d, d, 0);
        cr_assert_leq(r.n_clusters, 7);
        km_free(&r);
        /* one token */
        cr_assert_eq(km_run(ctx, keys, CKV_DTYPE_F32, 1, d, d, 42, 8, 3, &r), 0);
        cr_assert_eq(r.n_clusters, 1);
        cr_assert_eq(r.members[0], 42);
        cr_assert_arr_eq(r.centroids, keys, sizeof(float) * d);
        km_free(&r);
        ckv_ctx_destroy(&ctx);
    }
    free(keys);
}

Test(kernels_kmeans, decode_window_and_zero_keys)
{
    /* a decode window of 320 tokens into 8 clusters, positions after the prompt */
    const int n = 320, d = 64;
    int group[320];
    struct ktest_rng rng = {31};
    void *keys = planted(&rng, 8, 40, d, d, CKV_DTYPE_F16, group);
    uint16_t *k16 = keys;
    for (int t = 0; t < d; t++) /* token 5 is all zeros: no direction, still clustered */
        k16[5 * d + t] = 0;
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_AUTO, 2);
    struct km_result r;
    cr_assert_eq(km_run(ctx, keys, CKV_DTYPE_F16, n, d, d, 32000, 8, 11, &r), 0);
    check_csr(&r, keys, CKV_DTYPE_F16, n, d, d, 32000);
    cr_assert_eq(r.n_clusters, 8);
    for (int m = 0; m < n; m++)
        cr_assert(r.members[m] >= 32000 && r.members[m] < 32000 + n);
    km_free(&r);
    ckv_ctx_destroy(&ctx);
    free(keys);
}

Test(kernels_kmeans, max_iter_bounds_iterations)
{
    const int n = 500, d = 64;
    struct ktest_rng rng = {41};
    float *keys = malloc(sizeof(float) * n * d);
    ktest_fill_normal(&rng, keys, (size_t)n * d, 1.0f);
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_AUTO, 2);
    float cen[16 * 64];
    int32_t sizes[16], offs[17], mem[500];
    struct ckv_kmeans_out o = {cen, sizes, offs, mem};
    struct ckv_kmeans_params p = {.n_clusters = 16, .max_iter = 1, .tol = 0.0f, .seed = 2};
    int nc, ni;
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, n, d, d, 0, &p, &o, &nc, &ni), 0);
    cr_assert_eq(ni, 1);
    p.max_iter = 3;
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, n, d, d, 0, &p, &o, &nc, NULL), 0);
    p.max_iter = 200; /* tol 0: runs until no label changes (a fixed point) */
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, n, d, d, 0, &p, &o, &nc, &ni), 0);
    cr_assert(ni < 200, "no fixed point in 200 iterations: %d", ni);
    ckv_ctx_destroy(&ctx);
    free(keys);
}

Test(kernels_kmeans, bad_arguments)
{
    ckv_ctx_t *ctx = ktest_ctx(CKV_ISA_PORTABLE, 1);
    float keys[8 * 64] = {0}, cen[4 * 64];
    int32_t sizes[4], offs[5], mem[8];
    struct ckv_kmeans_out o = {cen, sizes, offs, mem}, bad_o = {cen, NULL, offs, mem};
    struct ckv_kmeans_params p = {.n_clusters = 4, .max_iter = 5, .tol = 0.001f, .seed = 1};
    int nc;
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, 0, &p, &o, &nc, NULL), 0);
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 0, 64, 64, 0, &p, &o, &nc, NULL), -EINVAL);
    cr_assert_eq(ckv_kmeans(ctx, NULL, CKV_DTYPE_F32, 8, 64, 64, 0, &p, &o, &nc, NULL), -EINVAL);
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 0, 64, 0, &p, &o, &nc, NULL), -EINVAL);
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 63, 0, &p, &o, &nc, NULL), -EINVAL);
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, -1, &p, &o, &nc, NULL), -EINVAL);
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, INT32_MAX - 3, &p, &o, &nc, NULL),
                 -EINVAL);
    cr_assert_eq(ckv_kmeans(ctx, keys, (enum ckv_dtype)2, 8, 64, 64, 0, &p, &o, &nc, NULL),
                 -EINVAL);
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, 0, &p, &bad_o, &nc, NULL),
                 -EINVAL);
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, 0, &p, &o, NULL, NULL), -EINVAL);
    struct ckv_kmeans_params bp = p;
    bp.n_clusters = 0;
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, 0, &bp, &o, &nc, NULL), -EINVAL);
    bp = p;
    bp.max_iter = 0;
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, 0, &bp, &o, &nc, NULL), -EINVAL);
    bp = p;
    bp.tol = -1;
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, 0, &bp, &o, &nc, NULL), -EINVAL);
    bp.tol = NAN;
    cr_assert_eq(ckv_kmeans(ctx, keys, CKV_DTYPE_F32, 8, 64, 64, 0, &bp, &o, &nc, NULL), -EINVAL);
    ckv_ctx_destroy(&ctx);
}
