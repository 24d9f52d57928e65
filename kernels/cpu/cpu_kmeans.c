/*
 * Cosine k-means of one (layer, KV head)'s keys (ALGORITHM.md section 1), and packing rows
 * into pool blocks.
 *
 * Clustering works on the unit-normalised keys X (n, d) f32. It is spherical k-means: a
 * token's cluster is argmax_c X_i . U_c, where U_c is the normalised sum of its members' unit
 * keys (the mean direction, which maximises the members' summed cosine similarity).
 *   - init: k-means++ from a splitmix64 stream (ckv_rng.h) seeded by params->seed. Centre 0 is a
 * uniform token; each next centre is token i with probability proportional to 1 - max_c cos(i, c)
 *     (half the squared Euclidean distance between unit vectors: k-means++'s D^2 weight).
 *     Its C sequential passes over all tokens are memory-bound, so they read the unit keys
 *     rounded to f16 (Xh: half the bytes; cosines change by ~1e-4, the weights only steer
 *     the sampling) and skip tokens the triangle inequality proves unaffected.
 *   - iterate: recompute U from the labels (an emptied cluster keeps its centre), reassign,
 *     stop after max_iter or when at most tol * n labels changed.
 *   - output: empty clusters dropped, survivors keep their order; centroid = mean of the RAW
 *     member keys (so q . centroid is the members' mean logit), CSR members ascending.
 * Every reduction runs in a fixed order over fixed chunks, so the result is the same for
 * any number of threads (ISAs may differ in the last bits of a dot product).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_rng.h"
#include "cpu_backend.h"

#define KM_CHUNK       1024 /* rows per task of the row-parallel passes (fixed: determinism) */
#define KM_ASSIGN_ROWS 64   /* rows per similarity block in the assignment */

struct km {
    struct cpu_backend *cb;
    const void *keys;
    enum ckv_dtype dtype;
    size_t row_stride;
    int n, d, C;
    float *X;               /* (n, d) unit keys */
    uint16_t *Xh;           /* (n, d) unit keys rounded to f16: the init's distances */
    float *U;               /* (C, d) unit centre directions */
    float *D;               /* (n) init: 1 - max cos to the chosen centres */
    float *cc;              /* (C) init: |U_j - U_cur|^2 for the centres j < cur */
    int32_t *label;         /* (n) */
    int32_t *order;         /* (n) token indices grouped by label, ascending within one */
    int32_t *start;         /* (C + 1) offsets into order */
    double *chunk_sum;      /* (n_chunks) init: sum of D per chunk */
    int32_t *chunk_changes; /* (n_chunks) */
    int n_chunks;
    int cur; /* init: the centre being added */
    int assign_rows;
};

static const char *km_key(const struct km *k, int i)
{
    return (const char *)k->keys + (size_t)i * k->row_stride * ckv_dtype_size(k->dtype);
}

static void normalise(float *x, int d)
{
    double ss = 0;
    for (int t = 0; t < d; t++)
        ss += (double)x[t] * x[t];
    float inv = ss > 0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
    for (int t = 0; t < d; t++)
        x[t] *= inv;
}

static void task_normalise(void *arg, int task, int tid)
{
    (void)tid;
    struct km *k = arg;
    int i1 = (task + 1) * KM_CHUNK < k->n ? (task + 1) * KM_CHUNK : k->n;
    for (int i = task * KM_CHUNK; i < i1; i++) {
        float *x = k->X + (size_t)i * k->d;
        cpu_simd_load_row(k->cb->simd, km_key(k, i), k->dtype, k->d, x);
        normalise(x, k->d);
        k->cb->simd->f32_to_f16(x, k->Xh + (size_t)i * k->d, (size_t)k->d);
    }
}

/* init: D = min(D, 1 - X . U_cur), label = cur where it improves; chunk sums of D.
 * Pruning (exact): with unit vectors, |x - U|^2 = 2 (1 - x . U). If the new centre is at
 * least twice as far from token i's current centre a as i is (|U_a - U_cur|^2 >= 8 D_i),
 * the triangle inequality puts i at least D_i from U_cur: no dot product needed. A small
 * slack keeps rounding from skipping a token the full computation would have moved. */
static void task_init_update(void *arg, int task, int tid)
{
    struct km *k = arg;
    int i0 = task * KM_CHUNK;
    int rows = k->n - i0 < KM_CHUNK ? k->n - i0 : KM_CHUNK;
    float *sim = cpu_scratch(k->cb, tid);
    int32_t *idx = (int32_t *)(sim + KM_CHUNK);
    const float *u = k->U + (size_t)k->cur * k->d;
    int m = 0;
    if (k->cur == 0) {
        for (int r = 0; r < rows; r++)
            idx[m++] = i0 + r;
    } else {
        for (int r = 0; r < rows; r++) {
            float cc = k->cc[k->label[i0 + r]];
            if (!(cc > 8.0f * k->D[i0 + r] * (1.0f + 1e-4f) + 1e-6f))
                idx[m++] = i0 + r;
        }
    }
    k->cb->simd->dots_idx(u, k->Xh, CKV_DTYPE_F16, (size_t)k->d, idx, m, k->d, sim);
    for (int j = 0; j < m; j++) {
        int i = idx[j];
        float dist = 1.0f - sim[j];
        if (dist < 0.0f)
            dist = 0.0f;
        if (k->cur == 0 || dist < k->D[i]) {
            k->D[i] = dist;
            k->label[i] = k->cur;
        }
    }
    double sum = 0;
    for (int r = 0; r < rows; r++)
        sum += k->D[i0 + r];
    k->chunk_sum[task] = sum;
}

/* Token with probability proportional to D (k-means++), walking the chunk sums in order. */
static int init_pick(const struct km *k, uint64_t *rng)
{
    double total = 0;
    for (int c = 0; c < k->n_chunks; c++)
        total += k->chunk_sum[c];
    double u = ckv_rng_uniform(rng);
    if (!(total > 0)) /* every token sits on a centre: any token (a duplicate centre) */
        return (int)(u * k->n);
    double target = u * total, cum = 0;
    int last_pos = -1;
    for (int c = 0; c < k->n_chunks; c++) {
        if (cum + k->chunk_sum[c] <= target && c + 1 < k->n_chunks) {
            cum += k->chunk_sum[c];
            continue;
        }
        int i1 = (c + 1) * KM_CHUNK < k->n ? (c + 1) * KM_CHUNK : k->n;
        for (int i = c * KM_CHUNK; i < i1; i++) {
            if (k->D[i] <= 0.0f)
                continue;
            last_pos = i;
            cum += k->D[i];
            if (cum > target)
                return i;
        }
    }
    ASSERT(last_pos >= 0); /* total > 0 means some D > 0 */
    return last_pos;       /* rounding ran past the end */
}

/* Counting sort of the labels into order/start (ascending token index within a cluster). */
static void group_by_label(struct km *k)
{
    memset(k->start, 0, (size_t)(k->C + 1) * sizeof(int32_t));
    for (int i = 0; i < k->n; i++)
        k->start[k->label[i] + 1]++;
    for (int c = 0; c < k->C; c++)
        k->start[c + 1] += k->start[c];
    for (int i = 0; i < k->n; i++)
        k->order[k->start[k->label[i]]++] = i;
    for (int c = k->C; c > 0; c--) /* start[c] now holds the end of c: shift back */
        k->start[c] = k->start[c - 1];
    k->start[0] = 0;
}

/* U_c = normalised sum of the members' unit keys, for a range of clusters. */
static void task_update(void *arg, int task, int tid)
{
    (void)tid;
    struct km *k = arg;
    int per = (k->C + 63) / 64;
    int c1 = (task + 1) * per < k->C ? (task + 1) * per : k->C;
    for (int c = task * per; c < c1; c++) {
        int b = k->start[c], e = k->start[c + 1];
        if (b == e)
            continue; /* emptied: keep the previous direction */
        float *u = k->U + (size_t)c * k->d;
        memset(u, 0, (size_t)k->d * sizeof(float));
        for (int m = b; m < e; m++) {
            const float *x = k->X + (size_t)k->order[m] * k->d;
            for (int t = 0; t < k->d; t++)
                u[t] += x[t];
        }
        normalise(u, k->d);
    }
}

static void task_assign(void *arg, int task, int tid)
{
    struct km *k = arg;
    int i0 = task * KM_CHUNK;
    int i1 = i0 + KM_CHUNK < k->n ? i0 + KM_CHUNK : k->n;
    float *sim = cpu_scratch(k->cb, tid);
    int changes = 0;
    for (int b = i0; b < i1; b += k->assign_rows) {
        int rows = i1 - b < k->assign_rows ? i1 - b : k->assign_rows;
        k->cb->simd->gemm_nt(rows, k->C, k->d, k->X + (size_t)b * k->d, (size_t)k->d, k->U,
                             CKV_DTYPE_F32, (size_t)k->d, sim, (size_t)k->C, NULL);
        for (int r = 0; r < rows; r++) {
            int best = k->cb->simd->argmax(sim + (size_t)r * k->C, k->C);
            if (best != k->label[b + r]) {
                k->label[b + r] = best;
                changes++;
            }
        }
    }
    k->chunk_changes[task] = changes;
}

struct km_out_job {
    struct km *k;
    const int32_t *old_of_new; /* (n_out) surviving cluster -> its index in k */
    int n_out;
    struct ckv_kmeans_out *out;
};

/* Centroid (mean of the raw keys), size, offsets and members of output clusters. */
static void task_output(void *arg, int task, int tid)
{
    struct km_out_job *j = arg;
    struct km *k = j->k;
    int per = (j->n_out + 63) / 64;
    int c1 = (task + 1) * per < j->n_out ? (task + 1) * per : j->n_out;
    float *row = cpu_scratch(k->cb, tid);
    for (int c = task * per; c < c1; c++) {
        int old = j->old_of_new[c];
        int b = k->start[old], e = k->start[old + 1];
        float *cen = j->out->centroids + (size_t)c * k->d;
        memset(cen, 0, (size_t)k->d * sizeof(float));
        for (int m = b; m < e; m++) {
            cpu_simd_load_row(k->cb->simd, km_key(k, k->order[m]), k->dtype, k->d, row);
            for (int t = 0; t < k->d; t++)
                cen[t] += row[t];
        }
        float inv = 1.0f / (float)(e - b);
        for (int t = 0; t < k->d; t++)
            cen[t] *= inv;
        j->out->sizes[c] = e - b;
    }
}

int cpu_kmeans(struct ckv_ctx *ctx, const void *keys, enum ckv_dtype dtype, int n_tokens,
               int head_dim, size_t row_stride, int32_t pos_base,
               const struct ckv_kmeans_params *params, struct ckv_kmeans_out *out,
               int *n_clusters_host, int *n_iter_host)
{
    struct cpu_backend *cb = cpu_of(ctx);
    struct km k = {.cb = cb,
                   .keys = keys,
                   .dtype = dtype,
                   .row_stride = row_stride,
                   .n = n_tokens,
                   .d = head_dim};
    k.C = params->n_clusters < n_tokens ? params->n_clusters : n_tokens;
    k.n_chunks = (n_tokens + KM_CHUNK - 1) / KM_CHUNK;
    /* similarity rows per block: up to 64, fewer when there are very many clusters */
    k.assign_rows = KM_ASSIGN_ROWS;
    while (k.assign_rows > 4 && (size_t)k.assign_rows * k.C * sizeof(float) > (1u << 20))
        k.assign_rows /= 2;
    int rc = -ENOMEM;
    int32_t *old_of_new = NULL;
    k.X = malloc((size_t)n_tokens * head_dim * sizeof(float));
    k.Xh = malloc((size_t)n_tokens * head_dim * sizeof(uint16_t));
    k.U = malloc((size_t)k.C * head_dim * sizeof(float));
    k.D = malloc((size_t)n_tokens * sizeof(float));
    k.cc = malloc((size_t)k.C * sizeof(float));
    k.label = malloc((size_t)n_tokens * sizeof(int32_t));
    k.order = malloc((size_t)n_tokens * sizeof(int32_t));
    k.start = malloc((size_t)(k.C + 1) * sizeof(int32_t));
    k.chunk_sum = malloc((size_t)k.n_chunks * sizeof(double));
    k.chunk_changes = malloc((size_t)k.n_chunks * sizeof(int32_t));
    if (!k.X || !k.Xh || !k.U || !k.D || !k.cc || !k.label || !k.order || !k.start ||
        !k.chunk_sum || !k.chunk_changes)
        goto out_free;
    size_t scratch = (size_t)k.assign_rows * k.C * sizeof(float);
    if (scratch < KM_CHUNK * (sizeof(float) + sizeof(int32_t)))
        scratch = KM_CHUNK * (sizeof(float) + sizeof(int32_t));
    if (scratch < (size_t)head_dim * sizeof(float))
        scratch = (size_t)head_dim * sizeof(float);
    rc = cpu_scratch_reserve(cb, scratch);
    if (rc)
        goto out_free;

    cpu_pool_run(cb->pool, k.n_chunks, task_normalise, &k);

    /* k-means++ */
    uint64_t rng = params->seed;
    int first = (int)(ckv_rng_uniform(&rng) * n_tokens);
    cb->simd->f16_to_f32(k.Xh + (size_t)first * head_dim, k.U, (size_t)head_dim);
    k.cur = 0;
    cpu_pool_run(cb->pool, k.n_chunks, task_init_update, &k);
    for (int c = 1; c < k.C; c++) {
        int pick = init_pick(&k, &rng);
        cb->simd->f16_to_f32(k.Xh + (size_t)pick * head_dim, k.U + (size_t)c * head_dim,
                             (size_t)head_dim);
        k.cur = c;
        const float *uc = k.U + (size_t)c * head_dim;
        cb->simd->gemm_nt(1, c, head_dim, uc, (size_t)head_dim, k.U, CKV_DTYPE_F32,
                          (size_t)head_dim, k.cc, (size_t)c, NULL);
        for (int j = 0; j < c; j++)
            k.cc[j] = 2.0f - 2.0f * k.cc[j];
        cpu_pool_run(cb->pool, k.n_chunks, task_init_update, &k);
    }

    /* Lloyd iterations */
    int iters = 0;
    int n_update_tasks = k.C < 64 ? k.C : 64;
    for (int it = 1; it <= params->max_iter; it++) {
        group_by_label(&k);
        cpu_pool_run(cb->pool, n_update_tasks, task_update, &k);
        cpu_pool_run(cb->pool, k.n_chunks, task_assign, &k);
        iters = it;
        int64_t changes = 0;
        for (int c = 0; c < k.n_chunks; c++)
            changes += k.chunk_changes[c];
        if (changes == 0 || (double)changes < (double)params->tol * n_tokens)
            break;
    }

    /* output: surviving clusters in order, CSR, raw-key centroids */
    group_by_label(&k);
    old_of_new = malloc((size_t)k.C * sizeof(int32_t));
    if (!old_of_new) {
        rc = -ENOMEM;
        goto out_free;
    }
    int n_out = 0;
    for (int c = 0; c < k.C; c++)
        if (k.start[c + 1] > k.start[c])
            old_of_new[n_out++] = c;
    out->offsets[0] = 0;
    for (int c = 0; c < n_out; c++) {
        int old = old_of_new[c];
        int size = k.start[old + 1] - k.start[old];
        out->offsets[c + 1] = out->offsets[c] + size;
        for (int m = 0; m < size; m++)
            out->members[out->offsets[c] + m] = pos_base + k.order[k.start[old] + m];
    }
    struct km_out_job oj = {&k, old_of_new, n_out, out};
    cpu_pool_run(cb->pool, n_out < 64 ? n_out : 64, task_output, &oj);
    *n_clusters_host = n_out;
    if (n_iter_host)
        *n_iter_host = iters;
    rc = 0;
out_free:
    free(old_of_new);
    free(k.chunk_changes);
    free(k.chunk_sum);
    free(k.start);
    free(k.order);
    free(k.label);
    free(k.cc);
    free(k.D);
    free(k.U);
    free(k.Xh);
    free(k.X);
    return rc;
}

/* ---- packing rows into blocks ---- */

int cpu_pack_blocks(struct ckv_ctx *ctx, const void *k, const void *v, enum ckv_dtype dtype,
                    int head_dim, size_t token_stride, const int32_t *rows, int n_rows, void *pool,
                    const int32_t *slots)
{
    (void)ctx;
    int n_blocks = (n_rows + CKV_BLOCK_TOKENS - 1) / CKV_BLOCK_TOKENS;
    for (int i = 0; i < n_rows; i++)
        if (rows[i] < 0)
            return -EINVAL;
    for (int b = 0; b < n_blocks; b++)
        if (slots[b] < 0)
            return -EINVAL;
    size_t esz = ckv_dtype_size(dtype), row_bytes = (size_t)head_dim * esz;
    size_t block_bytes = ckv_block_bytes(head_dim, dtype);
    for (int i = 0; i < n_rows; i++) {
        char *blk = (char *)pool + (size_t)slots[i / CKV_BLOCK_TOKENS] * block_bytes;
        int t = i % CKV_BLOCK_TOKENS;
        size_t src = (size_t)rows[i] * token_stride * esz;
        memcpy(blk + (size_t)t * row_bytes, (const char *)k + src, row_bytes);
        memcpy(blk + (size_t)(CKV_BLOCK_TOKENS + t) * row_bytes, (const char *)v + src, row_bytes);
    }
    int tail = n_rows % CKV_BLOCK_TOKENS;
    if (tail) {
        char *blk = (char *)pool + (size_t)slots[n_blocks - 1] * block_bytes;
        size_t n = (size_t)(CKV_BLOCK_TOKENS - tail) * row_bytes;
        memset(blk + (size_t)tail * row_bytes, 0, n);
        memset(blk + (size_t)(CKV_BLOCK_TOKENS + tail) * row_bytes, 0, n);
    }
    return 0;
}
