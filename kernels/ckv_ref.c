/*
 * Scalar references (see ckv_ref.h): double precision, one obvious loop per formula.
 */
#include "ckv_ref.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_half.h"
#include "ckv_rng.h"

double ckv_ref_elem(const void *row, enum ckv_dtype dt, size_t i)
{
    if (dt == CKV_DTYPE_F16)
        return ckv_half_to_f32(((const uint16_t *)row)[i]);
    return ((const float *)row)[i];
}

static const char *row_at(const void *base, enum ckv_dtype dt, size_t elems)
{
    return (const char *)base + elems * ckv_dtype_size(dt);
}

static double dot_qk(const float *q, const void *krow, enum ckv_dtype dt, int d)
{
    double s = 0;
    for (int i = 0; i < d; i++)
        s += (double)q[i] * ckv_ref_elem(krow, dt, (size_t)i);
    return s;
}

/* Softmax attention over n rows given by pointers. */
static void attend(const float *q, const void *const *krows, const void *const *vrows, int n,
                   enum ckv_dtype dt, int d, float scale, float *out, float *lse)
{
    double sc = scale != 0.0f ? scale : 1.0 / sqrt((double)d);
    double m = -INFINITY;
    double *s = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    for (int t = 0; t < n; t++) {
        s[t] = sc * dot_qk(q, krows[t], dt, d);
        if (s[t] > m)
            m = s[t];
    }
    double l = 0;
    for (int t = 0; t < n; t++) {
        s[t] = exp(s[t] - m);
        l += s[t];
    }
    for (int i = 0; i < d; i++) {
        double o = 0;
        for (int t = 0; t < n; t++)
            o += s[t] * ckv_ref_elem(vrows[t], dt, (size_t)i);
        out[i] = n > 0 ? (float)(o / l) : 0.0f;
    }
    if (lse)
        *lse = n > 0 ? (float)(m + log(l)) : -INFINITY;
    free(s);
}

/* Two arrays of n row pointers (at least one), freed with free(). Returns 0 or -ENOMEM. */
static int rows_alloc(int n, const void ***kr, const void ***vr)
{
    *kr = malloc(sizeof(void *) * (size_t)(n > 0 ? n : 1));
    *vr = malloc(sizeof(void *) * (size_t)(n > 0 ? n : 1));
    if (*kr && *vr)
        return 0;
    free(*kr);
    free(*vr);
    return -ENOMEM;
}

int ckv_ref_attn_tokens(const float *q, const void *k, const void *v, enum ckv_dtype dtype,
                        int head_dim, size_t token_stride, const int32_t *tokens, int n,
                        float scale, float *out, float *lse)
{
    if (!q || !out || n < 0 || (n > 0 && (!k || !v || !tokens)))
        return -EINVAL;
    const void **kr, **vr;
    if (rows_alloc(n, &kr, &vr))
        return -ENOMEM;
    for (int t = 0; t < n; t++) {
        kr[t] = row_at(k, dtype, (size_t)tokens[t] * token_stride);
        vr[t] = row_at(v, dtype, (size_t)tokens[t] * token_stride);
    }
    attend(q, kr, vr, n, dtype, head_dim, scale, out, lse);
    free(kr);
    free(vr);
    return 0;
}

int ckv_ref_attn_decode_full(const struct ckv_attn_full_args *a)
{
    int G = a->n_q_heads / a->n_kv_heads, d = a->head_dim;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(a->n_ctx > 0 ? a->n_ctx : 1));
    if (!tok)
        return -ENOMEM;
    for (int t = 0; t < a->n_ctx; t++)
        tok[t] = t;
    for (int qh = 0; qh < a->n_q_heads; qh++) {
        size_t h = (size_t)(qh / G) * a->head_stride;
        ckv_ref_attn_tokens(a->q + (size_t)qh * d, row_at(a->k, a->dtype, h),
                            row_at(a->v, a->dtype, h), a->dtype, d, a->token_stride, tok, a->n_ctx,
                            a->scale, a->out + (size_t)qh * d, a->lse ? a->lse + qh : NULL);
    }
    free(tok);
    return 0;
}

int ckv_ref_attn_decode_blocks(const struct ckv_attn_blocks_args *a)
{
    int d = a->head_dim;
    size_t bb = ckv_block_bytes(d, a->dtype), rb = (size_t)d * ckv_dtype_size(a->dtype);
    for (int l = 0; l < a->n_lists; l++) {
        int r0 = a->list_offsets[l], r1 = a->list_offsets[l + 1];
        int n = 0;
        for (int b = r0; b < r1; b++)
            n += a->refs[b].n_tokens;
        const void **kr, **vr;
        if (rows_alloc(n, &kr, &vr))
            return -ENOMEM;
        int t = 0;
        for (int b = r0; b < r1; b++) {
            const char *blk = (const char *)a->pool + (size_t)a->refs[b].slot * bb;
            for (int i = 0; i < a->refs[b].n_tokens; i++, t++) {
                kr[t] = blk + (size_t)i * rb;
                vr[t] = blk + (size_t)(CKV_BLOCK_TOKENS + i) * rb;
            }
        }
        for (int r = 0; r < a->heads_per_list; r++) {
            int qh = l * a->heads_per_list + r;
            attend(a->q + (size_t)qh * d, kr, vr, n, a->dtype, d, a->scale, a->out + (size_t)qh * d,
                   a->lse ? a->lse + qh : NULL);
        }
        free(kr);
        free(vr);
    }
    return 0;
}

int ckv_ref_attn_prefill(const struct ckv_attn_prefill_args *a)
{
    int G = a->n_q_heads / a->n_kv_heads, d = a->head_dim;
    int n_max = a->pos0 + a->n_new;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(n_max > 0 ? n_max : 1));
    if (!tok)
        return -ENOMEM;
    for (int t = 0; t < n_max; t++)
        tok[t] = t;
    for (int j = 0; j < a->n_new; j++)
        for (int qh = 0; qh < a->n_q_heads; qh++) {
            size_t h = (size_t)(qh / G) * a->head_stride;
            size_t row = ((size_t)j * a->n_q_heads + qh) * d;
            ckv_ref_attn_tokens(a->q + row, row_at(a->k, a->dtype, h), row_at(a->v, a->dtype, h),
                                a->dtype, d, a->token_stride, tok, a->pos0 + j + 1, a->scale,
                                a->out + row, NULL);
        }
    free(tok);
    return 0;
}

int ckv_ref_pack_blocks(const void *k, const void *v, enum ckv_dtype dtype, int head_dim,
                        size_t token_stride, const int32_t *rows, int n_rows, void *pool,
                        const int32_t *slots)
{
    size_t esz = ckv_dtype_size(dtype), rb = (size_t)head_dim * esz;
    size_t bb = ckv_block_bytes(head_dim, dtype);
    int n_blocks = (n_rows + CKV_BLOCK_TOKENS - 1) / CKV_BLOCK_TOKENS;
    for (int b = 0; b < n_blocks; b++) {
        char *blk = (char *)pool + (size_t)slots[b] * bb;
        for (int t = 0; t < CKV_BLOCK_TOKENS; t++) {
            int i = b * CKV_BLOCK_TOKENS + t;
            char *kd = blk + (size_t)t * rb, *vd = blk + (size_t)(CKV_BLOCK_TOKENS + t) * rb;
            if (i < n_rows) {
                memcpy(kd, row_at(k, dtype, (size_t)rows[i] * token_stride), rb);
                memcpy(vd, row_at(v, dtype, (size_t)rows[i] * token_stride), rb);
            } else {
                memset(kd, 0, rb);
                memset(vd, 0, rb);
            }
        }
    }
    return 0;
}

/* ---- k-means ---- */

static void ref_normalise(double *x, int d)
{
    double ss = 0;
    for (int t = 0; t < d; t++)
        ss += x[t] * x[t];
    double inv = ss > 0 ? 1.0 / sqrt(ss) : 0.0;
    for (int t = 0; t < d; t++)
        x[t] *= inv;
}

static double ref_dot(const double *a, const double *b, int d)
{
    double s = 0;
    for (int t = 0; t < d; t++)
        s += a[t] * b[t];
    return s;
}

int ckv_ref_kmeans(const void *keys, enum ckv_dtype dtype, int n_tokens, int head_dim,
                   size_t row_stride, int32_t pos_base, const struct ckv_kmeans_params *params,
                   struct ckv_kmeans_out *out, int *n_clusters_host, int *n_iter_host)
{
    if (!keys || n_tokens < 1 || head_dim < 1 || !params || params->n_clusters < 1 || !out)
        return -EINVAL;
    const int n = n_tokens, d = head_dim;
    const int C = params->n_clusters < n ? params->n_clusters : n;
    double *X = malloc(sizeof(double) * (size_t)n * d);
    double *U = malloc(sizeof(double) * (size_t)C * d);
    double *D = malloc(sizeof(double) * (size_t)n);
    int *label = malloc(sizeof(int) * (size_t)n);
    int *count = malloc(sizeof(int) * (size_t)C);
    int *newidx = malloc(sizeof(int) * (size_t)C);
    if (!X || !U || !D || !label || !count || !newidx) {
        free(X), free(U), free(D), free(label), free(count), free(newidx);
        return -ENOMEM;
    }
    double *Xh = malloc(sizeof(double) * (size_t)n * d); /* init distances: f16 unit keys */
    if (!Xh) {
        free(X), free(U), free(D), free(label), free(count), free(newidx);
        return -ENOMEM;
    }
    for (int i = 0; i < n; i++) {
        const char *row = row_at(keys, dtype, (size_t)i * row_stride);
        for (int t = 0; t < d; t++)
            X[(size_t)i * d + t] = ckv_ref_elem(row, dtype, (size_t)t);
        ref_normalise(X + (size_t)i * d, d);
        for (int t = 0; t < d; t++) /* the unit key as f32, rounded to f16 */
            Xh[(size_t)i * d + t] = ckv_half_to_f32(ckv_half_from_f32((float)X[(size_t)i * d + t]));
    }
    uint64_t rng = params->seed;
    for (int c = 0; c < C; c++) {
        int pick;
        double u = ckv_rng_uniform(&rng);
        if (c == 0) {
            pick = (int)(u * n);
        } else {
            double total = 0;
            for (int i = 0; i < n; i++)
                total += D[i];
            if (!(total > 0)) {
                pick = (int)(u * n);
            } else {
                double target = u * total, cum = 0;
                pick = -1;
                int last = -1;
                for (int i = 0; i < n; i++) {
                    if (D[i] <= 0)
                        continue;
                    last = i;
                    cum += D[i];
                    if (cum > target) {
                        pick = i;
                        break;
                    }
                }
                if (pick < 0)
                    pick = last;
            }
        }
        memcpy(U + (size_t)c * d, Xh + (size_t)pick * d, sizeof(double) * (size_t)d);
        for (int i = 0; i < n; i++) {
            double dist = 1.0 - ref_dot(Xh + (size_t)i * d, U + (size_t)c * d, d);
            if (dist < 0)
                dist = 0;
            if (c == 0 || dist < D[i]) {
                D[i] = dist;
                label[i] = c;
            }
        }
    }
    int iters = 0;
    for (int it = 1; it <= params->max_iter; it++) {
        memset(count, 0, sizeof(int) * (size_t)C);
        for (int i = 0; i < n; i++)
            count[label[i]]++;
        for (int c = 0; c < C; c++) {
            if (!count[c])
                continue;
            double *u = U + (size_t)c * d;
            memset(u, 0, sizeof(double) * (size_t)d);
            for (int i = 0; i < n; i++)
                if (label[i] == c)
                    for (int t = 0; t < d; t++)
                        u[t] += X[(size_t)i * d + t];
            ref_normalise(u, d);
        }
        int changes = 0;
        for (int i = 0; i < n; i++) {
            int best = 0;
            double bs = -INFINITY;
            for (int c = 0; c < C; c++) {
                double s = ref_dot(X + (size_t)i * d, U + (size_t)c * d, d);
                if (s > bs) {
                    bs = s;
                    best = c;
                }
            }
            if (best != label[i]) {
                label[i] = best;
                changes++;
            }
        }
        iters = it;
        if (changes == 0 || (double)changes < (double)params->tol * n)
            break;
    }
    memset(count, 0, sizeof(int) * (size_t)C);
    for (int i = 0; i < n; i++)
        count[label[i]]++;
    int n_out = 0;
    for (int c = 0; c < C; c++)
        newidx[c] = count[c] ? n_out++ : -1;
    out->offsets[0] = 0;
    for (int c = 0; c < C; c++) {
        if (newidx[c] < 0)
            continue;
        int o = newidx[c];
        out->sizes[o] = count[c];
        out->offsets[o + 1] = out->offsets[o] + count[c];
        int m = out->offsets[o];
        for (int t = 0; t < d; t++) {
            double s = 0;
            for (int i = 0; i < n; i++)
                if (label[i] == c)
                    s +=
                        ckv_ref_elem(row_at(keys, dtype, (size_t)i * row_stride), dtype, (size_t)t);
            out->centroids[(size_t)o * d + t] = (float)(s / count[c]);
        }
        for (int i = 0; i < n; i++)
            if (label[i] == c)
                out->members[m++] = pos_base + i;
    }
    *n_clusters_host = n_out;
    if (n_iter_host)
        *n_iter_host = iters;
    free(Xh);
    free(X), free(U), free(D), free(label), free(count), free(newidx);
    return 0;
}

/* ---- selection ---- */

struct ranked {
    double score;
    int index;
};

static int cmp_ranked(const void *pa, const void *pb)
{
    const struct ranked *a = pa, *b = pb;
    if (a->score != b->score)
        return a->score > b->score ? -1 : 1;
    return a->index - b->index;
}

/* Scores of n items for unit u: per row dots in double, folded by mode. */
static void unit_of(enum ckv_select_mode mode, int u, int G, int *row0, int *rows, int *kv)
{
    *row0 = mode == CKV_SELECT_PER_QHEAD ? u : u * G;
    *rows = mode == CKV_SELECT_PER_QHEAD ? 1 : G;
    *kv = mode == CKV_SELECT_PER_QHEAD ? u / G : u;
}

static double fold(enum ckv_select_mode mode, double acc, double v, int first)
{
    if (first)
        return v;
    return mode == CKV_SELECT_KVHEAD_SUM ? acc + v : (v > acc ? v : acc);
}

int ckv_ref_select_clusters(const struct ckv_select_args *a)
{
    int G = a->n_q_heads / a->n_kv_heads, d = a->head_dim;
    int n_units = a->mode == CKV_SELECT_PER_QHEAD ? a->n_q_heads : a->n_kv_heads;
    struct ranked *rk = malloc(sizeof(*rk) * (size_t)(a->n_clusters_total + 1));
    if (!rk)
        return -ENOMEM;
    for (int u = 0; u < n_units; u++) {
        int row0, rows, h;
        unit_of(a->mode, u, G, &row0, &rows, &h);
        int c0 = a->head_offsets[h], c1 = a->head_offsets[h + 1], n = 0;
        for (int c = c0; c < c1; c++) {
            double s = 0;
            for (int r = 0; r < rows; r++) {
                double v = 0;
                for (int t = 0; t < d; t++)
                    v += (double)a->q[(size_t)(row0 + r) * d + t] *
                         (a->centroids_f16 ? ckv_half_to_f32(a->centroids_f16[(size_t)c * d + t])
                                           : a->centroids[(size_t)c * d + t]);
                s = fold(a->mode, s, v, r == 0);
            }
            if (a->scores)
                a->scores[(size_t)u * a->n_clusters_total + c] = (float)s;
            if (a->sizes[c] > 0)
                rk[n++] = (struct ranked){s, c};
        }
        qsort(rk, (size_t)n, sizeof(*rk), cmp_ranked);
        int count = 0, last = 0;
        long taken = 0;
        for (int i = 0; i < n && taken < a->budget; i++) {
            int take = a->sizes[rk[i].index];
            if (take > a->budget - taken)
                take = (int)(a->budget - taken);
            a->sel_clusters[(size_t)u * a->max_selected + count++] = rk[i].index;
            taken += take;
            last = take;
        }
        a->sel_count[u] = count;
        a->sel_last_take[u] = count ? last : 0;
    }
    free(rk);
    return 0;
}

int ckv_ref_quest_page_bounds(const void *keys, enum ckv_dtype dtype, int n_tokens, int head_dim,
                              size_t row_stride, float *page_min, float *page_max)
{
    int n_pages = (n_tokens + CKV_BLOCK_TOKENS - 1) / CKV_BLOCK_TOKENS;
    for (int p = 0; p < n_pages; p++)
        for (int i = 0; i < head_dim; i++) {
            double mn = INFINITY, mx = -INFINITY;
            for (int t = p * CKV_BLOCK_TOKENS; t < n_tokens && t < (p + 1) * CKV_BLOCK_TOKENS;
                 t++) {
                double x =
                    ckv_ref_elem(row_at(keys, dtype, (size_t)t * row_stride), dtype, (size_t)i);
                mn = x < mn ? x : mn;
                mx = x > mx ? x : mx;
            }
            page_min[(size_t)p * head_dim + i] = (float)mn;
            page_max[(size_t)p * head_dim + i] = (float)mx;
        }
    return 0;
}

int ckv_ref_quest_select(const struct ckv_quest_args *a)
{
    int G = a->n_q_heads / a->n_kv_heads, d = a->head_dim, np = a->n_pages;
    int n_units = a->mode == CKV_SELECT_PER_QHEAD ? a->n_q_heads : a->n_kv_heads;
    struct ranked *rk = malloc(sizeof(*rk) * (size_t)np);
    if (!rk)
        return -ENOMEM;
    for (int u = 0; u < n_units; u++) {
        int row0, rows, h;
        unit_of(a->mode, u, G, &row0, &rows, &h);
        for (int p = 0; p < np; p++) {
            double s = 0;
            for (int r = 0; r < rows; r++) {
                double v = 0;
                for (int i = 0; i < d; i++) {
                    double q = a->q[(size_t)(row0 + r) * d + i];
                    size_t e = ((size_t)h * np + p) * d + i;
                    double x = q * a->page_max[e], y = q * a->page_min[e];
                    v += x > y ? x : y;
                }
                s = fold(a->mode, s, v, r == 0);
            }
            rk[p] = (struct ranked){s, p};
        }
        qsort(rk, (size_t)np, sizeof(*rk), cmp_ranked);
        int n_sel = a->n_select < np ? a->n_select : np, have_last = 0;
        int32_t *out = a->sel_pages + (size_t)u * a->n_select;
        for (int i = 0; i < n_sel; i++) {
            out[i] = rk[i].index;
            have_last |= rk[i].index == np - 1;
        }
        if (!have_last)
            out[n_sel - 1] = np - 1;
        a->sel_count[u] = n_sel;
    }
    free(rk);
    return 0;
}

int ckv_ref_oracle_topk(const float *q, const void *k, enum ckv_dtype dtype, int n_q_heads,
                        int n_kv_heads, int head_dim, int n_ctx, size_t head_stride,
                        size_t token_stride, int budget, int32_t *sel_tokens)
{
    if (budget < 1 || budget > n_ctx)
        return -EINVAL;
    int G = n_q_heads / n_kv_heads;
    struct ranked *rk = malloc(sizeof(*rk) * (size_t)n_ctx);
    if (!rk)
        return -ENOMEM;
    for (int qh = 0; qh < n_q_heads; qh++) {
        for (int t = 0; t < n_ctx; t++)
            rk[t] = (struct ranked){
                dot_qk(q + (size_t)qh * head_dim,
                       row_at(k, dtype, (size_t)(qh / G) * head_stride + (size_t)t * token_stride),
                       dtype, head_dim),
                t};
        qsort(rk, (size_t)n_ctx, sizeof(*rk), cmp_ranked);
        for (int i = 0; i < budget; i++)
            sel_tokens[(size_t)qh * budget + i] = rk[i].index;
    }
    free(rk);
    return 0;
}
