/*
 * Attention on the CPU: decode over a contiguous KV cache, decode over lists of pool blocks
 * (the sparse path), and causal prefill. All three share one tile step (attn_tile): a set of
 * query rows (the q heads of one KV head, times the query tokens of a prefill chunk) meets up
 * to ATTN_TILE keys at once:
 *
 *   S = (scale q) K^T          gemm_nt, (R, T), K rows read in place (f16 converted in regs)
 *   online softmax per row     m' = max(m, max S), P = exp(S - m'), l = l e^(m-m') + sum P
 *   acc = acc e^(m-m') + P V   gemm_pv, V rows read in place
 *
 * so K and V are read once per KV head however many query heads share them (GQA), and every
 * sum is f32. A long context is split into parts (flash-decoding) when there are too few KV
 * heads to keep every thread busy; the parts' (m, l, acc) are merged exactly at the end.
 *
 * Threads: work items are (KV head or list, part) for decode and (KV head, query chunk) for
 * prefill, claimed dynamically from the context's pool.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "cpu_backend.h"

#define ATTN_TILE         64   /* keys per softmax step */
#define ATTN_PREFILL_ROWS 64   /* query rows (tokens x group heads) per prefill work item */
#define ATTN_MIN_PART     2048 /* fewest tokens of a decode part (each starts cold) */
#define ATTN_PF_BLOCKS    4    /* blocks ahead a block list prefetches */
#define ATTN_MAX_SEGS     8    /* block runs per tile (partly filled blocks make more than 4) */

/* The rows of one work item, carved from the thread's scratch. */
struct attn_state {
    int R, d;
    float *q;    /* (R, d) queries, already multiplied by the scale */
    float *acc;  /* (R, d) unnormalised output */
    float *m;    /* (R) running max of the scaled scores, -inf before any key */
    float *l;    /* (R) running sum of exp(score - m) */
    float *corr; /* (R) this tile's rescale factor of acc */
    float *s;    /* (R, ATTN_TILE) scores, then probabilities */
};

/* Up to ATTN_TILE keys of one tile, as contiguous runs of rows. */
struct attn_seg {
    const void *k, *v;   /* first K and V row of the run */
    size_t ld;           /* elements between rows */
    int n;               /* rows */
    const void *pk, *pv; /* NULL, or rows laid out alike to prefetch meanwhile (the next
                            tile's): memory stays busy while this tile computes */
};

static size_t attn_state_bytes(int R, int d)
{
    return 2 * cpu_align64((size_t)R * d * sizeof(float)) +
           3 * cpu_align64((size_t)R * sizeof(float)) +
           cpu_align64((size_t)R * ATTN_TILE * sizeof(float));
}

static void attn_state_init(struct attn_state *st, void *mem, int R, int d)
{
    char *p = mem;
    st->R = R;
    st->d = d;
    st->q = (float *)p;
    p += cpu_align64((size_t)R * d * sizeof(float));
    st->acc = (float *)p;
    p += cpu_align64((size_t)R * d * sizeof(float));
    st->m = (float *)p;
    p += cpu_align64((size_t)R * sizeof(float));
    st->l = (float *)p;
    p += cpu_align64((size_t)R * sizeof(float));
    st->corr = (float *)p;
    p += cpu_align64((size_t)R * sizeof(float));
    st->s = (float *)p;
    memset(st->acc, 0, (size_t)R * d * sizeof(float));
    for (int r = 0; r < R; r++) {
        st->m[r] = -INFINITY;
        st->l[r] = 0.0f;
    }
}

static void attn_state_set_q(struct attn_state *st, int r, const float *q, float scale)
{
    float *dst = st->q + (size_t)r * st->d;
    for (int i = 0; i < st->d; i++)
        dst[i] = q[i] * scale;
}

/* One tile: nseg runs of keys (<= ATTN_TILE in all). valid: NULL, or per row the number of
 * leading keys of the tile the row may see (causal mask). */
static void attn_tile(const struct cpu_simd *simd, struct attn_state *st,
                      const struct attn_seg *seg, int nseg, enum ckv_dtype dt, const int *valid)
{
    const int R = st->R, d = st->d;
    int T = 0;
    for (int i = 0; i < nseg; i++) {
        simd->gemm_nt(R, seg[i].n, d, st->q, (size_t)d, seg[i].k, dt, seg[i].ld, st->s + T,
                      ATTN_TILE, seg[i].pk);
        T += seg[i].n;
    }
    for (int r = 0; r < R; r++) {
        float *sr = st->s + (size_t)r * ATTN_TILE;
        int nv = valid ? valid[r] : T;
        if (nv <= 0) {
            st->corr[r] = 1.0f;
            memset(sr, 0, (size_t)T * sizeof(float));
            continue;
        }
        float mx = simd->max(sr, nv);
        float mnew = mx > st->m[r] ? mx : st->m[r];
        if (mnew == -INFINITY) { /* every visible score is -inf: nothing to add */
            st->corr[r] = 1.0f;
            memset(sr, 0, (size_t)T * sizeof(float));
            continue;
        }
        st->corr[r] = st->m[r] == -INFINITY ? 0.0f : expf(st->m[r] - mnew);
        float sum = simd->exp_sum(sr, nv, mnew);
        if (nv < T)
            memset(sr + nv, 0, (size_t)(T - nv) * sizeof(float));
        st->l[r] = st->l[r] * st->corr[r] + sum;
        st->m[r] = mnew;
    }
    T = 0;
    for (int i = 0; i < nseg; i++) {
        simd->gemm_pv(R, seg[i].n, d, st->s + T, ATTN_TILE, seg[i].v, dt, seg[i].ld, st->acc,
                      (size_t)d, i == 0 ? st->corr : NULL, seg[i].pv);
        T += seg[i].n;
    }
}

/* Row r's output acc / l (zero when no key was seen) and lse = m + log l (-inf then). */
static void attn_finish_row(const struct attn_state *st, int r, float *out, float *lse)
{
    const float *acc = st->acc + (size_t)r * st->d;
    float l = st->l[r];
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int i = 0; i < st->d; i++)
        out[i] = acc[i] * inv;
    if (lse)
        *lse = l > 0.0f ? st->m[r] + logf(l) : -INFINITY;
}

/* ---- partial results of split work items ----
 * partial p, row r: [m, l, acc[0..d)] at part + ((size_t)p * R + r) * (d + 2). */

static void attn_save_partial(const struct attn_state *st, float *part)
{
    for (int r = 0; r < st->R; r++) {
        float *dst = part + (size_t)r * (st->d + 2);
        dst[0] = st->m[r];
        dst[1] = st->l[r];
        memcpy(dst + 2, st->acc + (size_t)r * st->d, (size_t)st->d * sizeof(float));
    }
}

/* Merges n_parts partials of one row (stride between parts in floats) into out and lse. */
static void attn_merge_row(const float *first, size_t part_stride, int n_parts, int d, float *out,
                           float *lse)
{
    float M = -INFINITY;
    for (int p = 0; p < n_parts; p++) {
        float m = first[(size_t)p * part_stride];
        if (m > M)
            M = m;
    }
    memset(out, 0, (size_t)d * sizeof(float));
    if (M == -INFINITY) {
        if (lse)
            *lse = -INFINITY;
        return;
    }
    float L = 0.0f;
    for (int p = 0; p < n_parts; p++) {
        const float *src = first + (size_t)p * part_stride;
        if (src[0] == -INFINITY)
            continue;
        float w = expf(src[0] - M);
        L += src[1] * w;
        for (int i = 0; i < d; i++)
            out[i] += src[2 + i] * w;
    }
    float inv = L > 0.0f ? 1.0f / L : 0.0f;
    for (int i = 0; i < d; i++)
        out[i] *= inv;
    if (lse)
        *lse = L > 0.0f ? M + logf(L) : -INFINITY;
}

/* Parts per unit so that units * parts gives about 8 items per thread, none shorter than
 * ATTN_MIN_PART tokens: small items balance the threads, and on a shared machine a worker
 * descheduled in the middle of an item holds up the call by one small item only. */
static int attn_parts(int n_threads, int n_units, int64_t tokens)
{
    if (n_threads <= 1)
        return 1;
    int want = (8 * n_threads + n_units - 1) / n_units;
    int64_t most = (tokens + ATTN_MIN_PART - 1) / ATTN_MIN_PART;
    int parts = want < most ? want : (int)most;
    return parts < 1 ? 1 : parts;
}

static float attn_scale(float scale, int d)
{
    return scale != 0.0f ? scale : 1.0f / sqrtf((float)d);
}

/* Runs fn over n_units * parts work items (unit u, part p is task u * parts + p; a unit is R
 * consecutive output rows) and, with parts > 1, merges each row's parts into out and lse.
 * *partials is where the tasks find the parts' buffer, (n_units * parts, R, d + 2). */
static int attn_run_units(struct cpu_backend *cb, int n_units, int parts, int R, int d,
                          cpu_task_fn fn, void *job, float **partials, float *out, float *lse)
{
    int rc = cpu_scratch_reserve(cb, attn_state_bytes(R, d));
    if (rc)
        return rc;
    *partials = NULL;
    if (parts > 1) {
        *partials = malloc((size_t)n_units * parts * R * (d + 2) * sizeof(float));
        if (!*partials)
            return -ENOMEM;
    }
    cpu_pool_run(cb->pool, n_units * parts, fn, job);
    if (parts > 1) {
        for (int u = 0; u < n_units; u++)
            for (int r = 0; r < R; r++)
                attn_merge_row(*partials + ((size_t)u * parts * R + r) * (d + 2),
                               (size_t)R * (d + 2), parts, d, out + (size_t)(u * R + r) * d,
                               lse ? lse + u * R + r : NULL);
        free(*partials);
        *partials = NULL;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Decode over a contiguous KV cache
 * ------------------------------------------------------------------------------------------ */

struct full_job {
    const struct ckv_attn_full_args *a;
    struct cpu_backend *cb;
    int G, parts, chunk;
    float scale;
    float *partials; /* (n_kv_heads * parts, G, d + 2) when parts > 1 */
};

static void full_task(void *arg, int task, int tid)
{
    struct full_job *j = arg;
    const struct ckv_attn_full_args *a = j->a;
    const int d = a->head_dim, G = j->G;
    const int h = task / j->parts, part = task % j->parts;
    const size_t esz = ckv_dtype_size(a->dtype);
    struct attn_state st;
    attn_state_init(&st, cpu_scratch(j->cb, tid), G, d);
    for (int g = 0; g < G; g++)
        attn_state_set_q(&st, g, a->q + (size_t)(h * G + g) * d, j->scale);
    int t0 = part * j->chunk;
    int t1 = t0 + j->chunk < a->n_ctx ? t0 + j->chunk : a->n_ctx;
    const char *kh = (const char *)a->k + (size_t)h * a->head_stride * esz;
    const char *vh = (const char *)a->v + (size_t)h * a->head_stride * esz;
    const size_t sb = a->token_stride * esz;
    for (int t = t0; t < t1; t += ATTN_TILE) {
        int tn = t + ATTN_TILE; /* prefetch the next tile's rows (past t1: harmless hint) */
        struct attn_seg seg = {kh + (size_t)t * sb,
                               vh + (size_t)t * sb,
                               a->token_stride,
                               t1 - t < ATTN_TILE ? t1 - t : ATTN_TILE,
                               tn < t1 ? kh + (size_t)tn * sb : NULL,
                               tn < t1 ? vh + (size_t)tn * sb : NULL};
        attn_tile(j->cb->simd, &st, &seg, 1, a->dtype, NULL);
    }
    if (j->parts == 1) {
        for (int g = 0; g < G; g++)
            attn_finish_row(&st, g, a->out + (size_t)(h * G + g) * d,
                            a->lse ? a->lse + h * G + g : NULL);
    } else {
        attn_save_partial(&st, j->partials + (size_t)task * G * (d + 2));
    }
}

int cpu_attn_decode_full(struct ckv_ctx *ctx, const struct ckv_attn_full_args *a)
{
    struct cpu_backend *cb = cpu_of(ctx);
    const int d = a->head_dim, G = a->n_q_heads / a->n_kv_heads;
    struct full_job j = {.a = a, .cb = cb, .G = G, .scale = attn_scale(a->scale, d)};
    j.parts = attn_parts(cb->n_threads, a->n_kv_heads, a->n_ctx);
    j.chunk = (a->n_ctx + j.parts - 1) / j.parts;
    j.chunk = (j.chunk + ATTN_TILE - 1) / ATTN_TILE * ATTN_TILE;
    if (j.chunk > 0)
        j.parts = (a->n_ctx + j.chunk - 1) / j.chunk;
    if (j.parts < 1)
        j.parts = 1;
    return attn_run_units(cb, a->n_kv_heads, j.parts, G, d, full_task, &j, &j.partials, a->out,
                          a->lse);
}

/* ------------------------------------------------------------------------------------------
 * Decode over lists of blocks
 * ------------------------------------------------------------------------------------------ */

struct blocks_job {
    const struct ckv_attn_blocks_args *a;
    struct cpu_backend *cb;
    int parts;
    float scale;
    size_t block_bytes, v_offset; /* bytes of a block; of its K rows */
    float *partials;              /* (n_lists * parts, heads_per_list, d + 2) when parts > 1 */
};

static void blocks_task(void *arg, int task, int tid)
{
    struct blocks_job *j = arg;
    const struct ckv_attn_blocks_args *a = j->a;
    const int d = a->head_dim, R = a->heads_per_list;
    const int list = task / j->parts, part = task % j->parts;
    struct attn_state st;
    attn_state_init(&st, cpu_scratch(j->cb, tid), R, d);
    for (int r = 0; r < R; r++)
        attn_state_set_q(&st, r, a->q + (size_t)(list * R + r) * d, j->scale);
    int r0 = a->list_offsets[list], r1 = a->list_offsets[list + 1];
    int n = r1 - r0, per = (n + j->parts - 1) / j->parts;
    int b0 = r0 + part * per, b1 = b0 + per < r1 ? b0 + per : r1;
    struct attn_seg seg[ATTN_MAX_SEGS];
    int nseg = 0, tokens = 0;
    for (int b = b0; b < b1; b++) {
        const struct ckv_block_ref *ref = &a->refs[b];
        const char *blk = (const char *)a->pool + (size_t)ref->slot * j->block_bytes;
        /* prefetch the block about one tile ahead while this one computes */
        const char *nb =
            b + ATTN_PF_BLOCKS < b1
                ? (const char *)a->pool + (size_t)a->refs[b + ATTN_PF_BLOCKS].slot * j->block_bytes
                : NULL;
        if (tokens + ref->n_tokens > ATTN_TILE || nseg == ATTN_MAX_SEGS) {
            attn_tile(j->cb->simd, &st, seg, nseg, a->dtype, NULL);
            nseg = tokens = 0;
        }
        seg[nseg++] = (struct attn_seg){blk, blk + j->v_offset,           (size_t)d, ref->n_tokens,
                                        nb,  nb ? nb + j->v_offset : NULL};
        tokens += ref->n_tokens;
    }
    if (nseg)
        attn_tile(j->cb->simd, &st, seg, nseg, a->dtype, NULL);
    if (j->parts == 1) {
        for (int r = 0; r < R; r++)
            attn_finish_row(&st, r, a->out + (size_t)(list * R + r) * d,
                            a->lse ? a->lse + list * R + r : NULL);
    } else {
        attn_save_partial(&st, j->partials + (size_t)task * R * (d + 2));
    }
}

int cpu_attn_decode_blocks(struct ckv_ctx *ctx, const struct ckv_attn_blocks_args *a)
{
    struct cpu_backend *cb = cpu_of(ctx);
    const int d = a->head_dim, R = a->heads_per_list;
    /* the refs live in host memory on the CPU backend: check them all before any output */
    if (a->list_offsets[0] < 0)
        return -EINVAL;
    int64_t max_tokens = 0;
    for (int l = 0; l < a->n_lists; l++) {
        int r0 = a->list_offsets[l], r1 = a->list_offsets[l + 1];
        if (r1 < r0)
            return -EINVAL;
        if (r1 > r0 && (!a->refs || !a->pool))
            return -EINVAL;
        int64_t tokens = 0;
        for (int b = r0; b < r1; b++) {
            if (a->refs[b].slot < 0 || a->refs[b].n_tokens < 1 ||
                a->refs[b].n_tokens > CKV_BLOCK_TOKENS)
                return -EINVAL;
            tokens += a->refs[b].n_tokens;
        }
        if (tokens > max_tokens)
            max_tokens = tokens;
    }
    size_t esz = ckv_dtype_size(a->dtype);
    struct blocks_job j = {.a = a,
                           .cb = cb,
                           .scale = attn_scale(a->scale, d),
                           .block_bytes = ckv_block_bytes(d, a->dtype),
                           .v_offset = (size_t)CKV_BLOCK_TOKENS * d * esz};
    j.parts = attn_parts(cb->n_threads, a->n_lists, max_tokens);
    return attn_run_units(cb, a->n_lists, j.parts, R, d, blocks_task, &j, &j.partials, a->out,
                          a->lse);
}

/* ------------------------------------------------------------------------------------------
 * Causal prefill
 * ------------------------------------------------------------------------------------------ */

struct prefill_job {
    const struct ckv_attn_prefill_args *a;
    struct cpu_backend *cb;
    int G, qc, n_chunks; /* group size, query tokens per item, items per KV head */
    float scale;
};

static void prefill_task(void *arg, int task, int tid)
{
    struct prefill_job *j = arg;
    const struct ckv_attn_prefill_args *a = j->a;
    const int d = a->head_dim, G = j->G, nq = a->n_q_heads;
    /* the longest items (latest query chunks) first, for balance */
    const int c = j->n_chunks - 1 - task / a->n_kv_heads, h = task % a->n_kv_heads;
    const int jt0 = c * j->qc;
    const int n_tok = a->n_new - jt0 < j->qc ? a->n_new - jt0 : j->qc;
    const int R = n_tok * G;
    const size_t esz = ckv_dtype_size(a->dtype);
    char *mem = cpu_scratch(j->cb, tid);
    int *valid = (int *)mem;
    struct attn_state st;
    attn_state_init(&st, mem + cpu_align64((size_t)ATTN_PREFILL_ROWS * G * sizeof(int)), R, d);
    for (int jl = 0; jl < n_tok; jl++)
        for (int g = 0; g < G; g++)
            attn_state_set_q(&st, jl * G + g,
                             a->q + ((size_t)(jt0 + jl) * nq + (size_t)h * G + g) * d, j->scale);
    const int p_first = a->pos0 + jt0, p_last = p_first + n_tok - 1;
    const char *kh = (const char *)a->k + (size_t)h * a->head_stride * esz;
    const char *vh = (const char *)a->v + (size_t)h * a->head_stride * esz;
    for (int t = 0; t <= p_last; t += ATTN_TILE) {
        int n = p_last + 1 - t < ATTN_TILE ? p_last + 1 - t : ATTN_TILE;
        const int *vp = NULL;
        if (t + n - 1 > p_first) { /* some row cannot see every key of this tile */
            for (int jl = 0; jl < n_tok; jl++) {
                int nv = p_first + jl - t + 1;
                nv = nv < 0 ? 0 : nv > n ? n : nv;
                for (int g = 0; g < G; g++)
                    valid[jl * G + g] = nv;
            }
            vp = valid;
        }
        struct attn_seg seg = {kh + (size_t)t * a->token_stride * esz,
                               vh + (size_t)t * a->token_stride * esz,
                               a->token_stride,
                               n,
                               NULL,
                               NULL};
        attn_tile(j->cb->simd, &st, &seg, 1, a->dtype, vp);
    }
    for (int jl = 0; jl < n_tok; jl++)
        for (int g = 0; g < G; g++)
            attn_finish_row(&st, jl * G + g,
                            a->out + ((size_t)(jt0 + jl) * nq + (size_t)h * G + g) * d, NULL);
}

int cpu_attn_prefill(struct ckv_ctx *ctx, const struct ckv_attn_prefill_args *a)
{
    struct cpu_backend *cb = cpu_of(ctx);
    const int d = a->head_dim, G = a->n_q_heads / a->n_kv_heads;
    struct prefill_job j = {.a = a, .cb = cb, .G = G, .scale = attn_scale(a->scale, d)};
    j.qc = ATTN_PREFILL_ROWS / G > 0 ? ATTN_PREFILL_ROWS / G : 1;
    j.n_chunks = (a->n_new + j.qc - 1) / j.qc;
    int rows = j.qc * G;
    int rc = cpu_scratch_reserve(cb, cpu_align64((size_t)ATTN_PREFILL_ROWS * G * sizeof(int)) +
                                         attn_state_bytes(rows, d));
    if (rc)
        return rc;
    int64_t items = (int64_t)j.n_chunks * a->n_kv_heads;
    if (items > INT32_MAX)
        return -EINVAL;
    cpu_pool_run(cb->pool, (int)items, prefill_task, &j);
    return 0;
}
