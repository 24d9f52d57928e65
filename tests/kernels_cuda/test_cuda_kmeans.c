/*
 * Suite "cuda_kmeans": the CUDA backend's cosine k-means against the CPU backend.
 *
 * CPU and CUDA run the same algorithm from the same splitmix64 draws, with bit-equal unit
 * keys, centre updates and centroid means, but dot products summed in another order (warp
 * and cuBLAS vs SIMD): they agree except where a token's best centres tie to within the last
 * bit (kernels/cuda/cuda_kmeans.cu, docs/CUDA.md). So the tests ask what kernels_kmeans asks
 * of the CPU against its double-precision reference: planted clusters recovered exactly; a
 * well-formed CSR output (sizes >= 1, offsets their prefix sums, members ascending within a
 * cluster, pos_base applied, every token once); centroids = mean of the raw member keys
 * within 1e-5 of the key scale; on unstructured random keys the CPU's cluster count and at
 * most 1% of tokens in a different cluster; empty clusters removed; one-token clusters,
 * clamping, one token and an all-zero key; max_iter bounds the iterations.
 * Skipped without a CUDA device (kcuda.h).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kcuda.h"

struct km_result {
    int n_clusters, n_iter;
    float *centroids;
    int32_t *sizes, *offsets, *members;
};

static void km_free(struct km_result *r)
{
    free(r->centroids), free(r->sizes), free(r->offsets), free(r->members);
}

/* k-means of host keys on ctx (CPU: host buffers; CUDA: device copies, results brought back).
 * Returns the kernel's return code. */
static int km_run(ckv_ctx_t *ctx, const void *keys, enum ckv_dtype dt, int n, int d, size_t stride,
                  int32_t pos_base, int C, int max_iter, uint64_t seed, struct km_result *r)
{
    struct ckv_kmeans_params p = {
        .n_clusters = C, .max_iter = max_iter, .tol = 0.001f, .seed = seed};
    int cap = C < n ? C : n;
    size_t cen_b = sizeof(float) * (size_t)cap * d, sz_b = sizeof(int32_t) * cap;
    size_t off_b = sizeof(int32_t) * (cap + 1), mem_b = sizeof(int32_t) * n;
    r->centroids = calloc(1, cen_b), r->sizes = calloc(1, sz_b);
    r->offsets = calloc(1, off_b), r->members = calloc(1, mem_b);
    if (ckv_ctx_backend(ctx) == CKV_BACKEND_CPU) {
        struct ckv_kmeans_out o = {r->centroids, r->sizes, r->offsets, r->members};
        return ckv_kmeans(ctx, keys, dt, n, d, stride, pos_base, &p, &o, &r->n_clusters,
                          &r->n_iter);
    }
    size_t key_b = ((size_t)(n - 1) * stride + d) * ckv_dtype_size(dt);
    void *dkeys = kcuda_up(ctx, keys, key_b);
    struct ckv_kmeans_out o = {kcuda_alloc(ctx, cen_b), kcuda_alloc(ctx, sz_b),
                               kcuda_alloc(ctx, off_b), kcuda_alloc(ctx, mem_b)};
    int rc = ckv_kmeans(ctx, dkeys, dt, n, d, stride, pos_base, &p, &o, &r->n_clusters, &r->n_iter);
    if (rc == 0) {
        cr_assert_eq(ckv_copy_d2h(ctx, r->centroids, o.centroids, cen_b), 0);
        cr_assert_eq(ckv_copy_d2h(ctx, r->sizes, o.sizes, sz_b), 0);
        cr_assert_eq(ckv_copy_d2h(ctx, r->offsets, o.offsets, off_b), 0);
        cr_assert_eq(ckv_copy_d2h(ctx, r->members, o.members, mem_b), 0);
    }
    ckv_dev_free(ctx, dkeys), ckv_dev_free(ctx, o.centroids), ckv_dev_free(ctx, o.sizes);
    ckv_dev_free(ctx, o.offsets), ckv_dev_free(ctx, o.members);
    return rc;
}

/* CSR invariants and centroid = mean of the raw member keys. */
static void check_csr(const struct km_result *r, const void *keys, enum ckv_dtype dt, int n, int d,
                      size_t stride, int32_t pos_base)
{
    cr_assert(r->n_clusters >= 1);
    cr_assert_eq(r->offsets[0], 0);
    char *seen = calloc((size_t)n, 1);
    double *mean = calloc((size_t)d, sizeof(double));
    for (int c = 0; c < r->n_clusters; c++) {
        cr_assert_geq(r->sizes[c], 1, "cluster %d empty", c);
        cr_assert_eq(r->offsets[c + 1], r->offsets[c] + r->sizes[c]);
        memset(mean, 0, sizeof(double) * d);
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
    }
    cr_assert_eq(r->offsets[r->n_clusters], n, "every token in one cluster");
    free(seen), free(mean);
}

/* Tokens whose cluster differs between two clusterings of the same keys (clusters matched by
 * index: both keep the k-means++ order). */
static int labels_differ(const struct km_result *a, const struct km_result *b, int n,
                         int32_t pos_base)
{
    int *la = malloc(sizeof(int) * n), differ = 0;
    for (int c = 0; c < a->n_clusters; c++)
        for (int m = a->offsets[c]; m < a->offsets[c + 1]; m++)
            la[a->members[m] - pos_base] = c;
    for (int c = 0; c < b->n_clusters; c++)
        for (int m = b->offsets[c]; m < b->offsets[c + 1]; m++)
            differ += la[b->members[m] - pos_base] != c;
    free(la);
    return differ;
}

/* n_groups directions, n_per tokens each, keys = magnitude * (dir + noise), rows stride apart. */
static void *planted(struct ktest_rng *rng, int n_groups, int n_per, int d, size_t stride,
                     enum ckv_dtype dt, int *group)
{
    float *dirs = malloc(sizeof(float) * (size_t)n_groups * d);
    ktest_fill_normal(rng, dirs, (size_t)n_groups * d, 1.0f);
    int n = n_groups * n_per;
    char *keys = calloc((size_t)n * stride + d, ckv_dtype_size(dt));
    for (int i = 0; i < n; i++) {
        int g = (i * 5) % n_groups; /* interleaved (n_groups coprime to 5) */
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

Test(cuda_kmeans, recovers_planted_clusters)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    const int G = 12, per = 40, n = G * per, d = 64;
    int group[12 * 40];
    for (int dt = CKV_DTYPE_F32; dt <= CKV_DTYPE_F16; dt++) {
        struct ktest_rng rng = {100 + dt};
        size_t stride = 3 * d; /* rows of a (t, 3 heads, d) layout */
        void *keys = planted(&rng, G, per, d, stride, (enum ckv_dtype)dt, group);
        struct km_result r;
        cr_assert_eq(km_run(gpu, keys, (enum ckv_dtype)dt, n, d, stride, 1000, G, 20, 7, &r), 0);
        check_csr(&r, keys, (enum ckv_dtype)dt, n, d, stride, 1000);
        cr_assert_eq(r.n_clusters, G, "%d clusters", r.n_clusters);
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
        free(keys);
    }
    ckv_ctx_destroy(&gpu);
}

struct vs_cpu_case {
    int n, d, C;
    enum ckv_dtype dt;
};

Test(cuda_kmeans, matches_cpu_on_random_keys)
{
    static const struct vs_cpu_case cases[] = {
        {400, 64, 10, CKV_DTYPE_F32},
        {2500, 64, 31, CKV_DTYPE_F16},   /* > 2 init chunks of 1024 rows */
        {3000, 128, 300, CKV_DTYPE_F16}, /* > 256 clusters, head_dim 128 */
        {700, 80, 20, CKV_DTYPE_F32},    /* head_dim 80 */
    };
    ckv_ctx_t *gpu = kcuda_ctx(), *cpu = kcuda_cpu();
    for (size_t i = 0; i < CKV_ARRAY_LEN(cases); i++) {
        const struct vs_cpu_case *c = &cases[i];
        struct ktest_rng rng = {12 + i};
        void *keys = ktest_random_kv(&rng, (size_t)c->n * c->d, c->dt, 1.0f);
        struct km_result rc, rg;
        cr_assert_eq(km_run(cpu, keys, c->dt, c->n, c->d, c->d, 0, c->C, 20, 5, &rc), 0);
        cr_assert_eq(km_run(gpu, keys, c->dt, c->n, c->d, c->d, 0, c->C, 20, 5, &rg), 0);
        check_csr(&rg, keys, c->dt, c->n, c->d, c->d, 0);
        cr_assert_eq(rg.n_clusters, rc.n_clusters, "case %zu: %d clusters, CPU %d", i,
                     rg.n_clusters, rc.n_clusters);
        int differ = labels_differ(&rc, &rg, c->n, 0);
        cr_assert(differ <= c->n / 100,
                  "case %zu: %d of %d tokens in another cluster than on "
                  "the CPU",
                  i, differ, c->n);
        km_free(&rc), km_free(&rg);
        free(keys);
    }
    ckv_ctx_destroy(&gpu);
    ckv_ctx_destroy(&cpu);
}

Test(cuda_kmeans, empty_clusters_are_removed)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    const int n = 90, d = 64; /* 3 distinct directions: 10 requested, 3 survive */
    float *keys = malloc(sizeof(float) * n * d), dirs[3][64];
    struct ktest_rng rng = {8};
    ktest_fill_normal(&rng, &dirs[0][0], 3 * 64, 1.0f);
    for (int i = 0; i < n; i++)
        for (int t = 0; t < d; t++)
            keys[i * d + t] = dirs[i % 3][t] * (1.0f + (float)(i % 5));
    struct km_result r;
    cr_assert_eq(km_run(gpu, keys, CKV_DTYPE_F32, n, d, d, 0, 10, 20, 1, &r), 0);
    check_csr(&r, keys, CKV_DTYPE_F32, n, d, d, 0);
    cr_assert_eq(r.n_clusters, 3);
    for (int c = 0; c < 3; c++) {
        cr_assert_eq(r.sizes[c], 30);
        for (int m = r.offsets[c]; m < r.offsets[c + 1]; m++)
            cr_assert_eq(r.members[m] % 3, r.members[r.offsets[c]] % 3);
    }
    km_free(&r);
    ckv_ctx_destroy(&gpu);
    free(keys);
}

Test(cuda_kmeans, one_token_clusters_clamping_and_zero_keys)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    struct ktest_rng rng = {21};
    const int d = 128;
    float *keys = malloc(sizeof(float) * 20 * d);
    ktest_fill_normal(&rng, keys, 20 * (size_t)d, 1.0f);
    struct km_result r;
    cr_assert_eq(km_run(gpu, keys, CKV_DTYPE_F32, 20, d, d, 0, 20, 20, 3, &r), 0);
    check_csr(&r, keys, CKV_DTYPE_F32, 20, d, d, 0);
    cr_assert_eq(r.n_clusters, 20); /* as many clusters as tokens: each alone */
    km_free(&r);
    cr_assert_eq(km_run(gpu, keys, CKV_DTYPE_F32, 7, d, d, 0, 50, 20, 3, &r), 0);
    check_csr(&r, keys, CKV_DTYPE_F32, 7, d, d, 0);
    cr_assert_leq(r.n_clusters, 7); /* more clusters than tokens: clamped */
    km_free(&r);
    cr_assert_eq(km_run(gpu, keys, CKV_DTYPE_F32, 1, d, d, 42, 8, 20, 3, &r), 0);
    cr_assert_eq(r.n_clusters, 1);
    cr_assert_eq(r.members[0], 42);
    cr_assert_arr_eq(r.centroids, keys, sizeof(float) * d);
    km_free(&r);
    /* a decode window with an all-zero key (no direction: still clustered) */
    int group[320];
    void *win = planted(&rng, 8, 40, 64, 64, CKV_DTYPE_F16, group);
    memset((uint16_t *)win + 5 * 64, 0, 64 * sizeof(uint16_t));
    cr_assert_eq(km_run(gpu, win, CKV_DTYPE_F16, 320, 64, 64, 32000, 8, 20, 11, &r), 0);
    check_csr(&r, win, CKV_DTYPE_F16, 320, 64, 64, 32000);
    cr_assert_eq(r.n_clusters, 8);
    km_free(&r);
    ckv_ctx_destroy(&gpu);
    free(keys), free(win);
}

Test(cuda_kmeans, max_iter_bounds_iterations)
{
    ckv_ctx_t *gpu = kcuda_ctx();
    const int n = 500, d = 64;
    struct ktest_rng rng = {41};
    float *keys = malloc(sizeof(float) * n * d);
    ktest_fill_normal(&rng, keys, (size_t)n * d, 1.0f);
    struct km_result r;
    cr_assert_eq(km_run(gpu, keys, CKV_DTYPE_F32, n, d, d, 0, 16, 1, 2, &r), 0);
    cr_assert_eq(r.n_iter, 1);
    check_csr(&r, keys, CKV_DTYPE_F32, n, d, d, 0);
    km_free(&r);
    cr_assert_eq(km_run(gpu, keys, CKV_DTYPE_F32, n, d, d, 0, 16, 3, 2, &r), 0);
    cr_assert(r.n_iter >= 1 && r.n_iter <= 3);
    km_free(&r);
    ckv_ctx_destroy(&gpu);
    free(keys);
}
