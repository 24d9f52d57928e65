/*
 * Q/K/V dumps and synthetic data (see ckv_qkv.h and docs/QKV_DUMP.md).
 *
 * File layout, little-endian:
 *   header, 64 bytes: "CKVQKV01", u32 version (1), u32 header bytes (64), u32 dtype (0 f32,
 *     1 f16), u32 n_q_heads, u32 n_kv_heads, u32 head_dim, u32 layer, u32 n_prompt, zeros
 *   prompt K: (n_kv_heads, n_prompt, head_dim) dtype; prompt V: the same
 *   per decode step: u32 "STEP", u32 position, q (n_q_heads, head_dim) f32,
 *     k (n_kv_heads, head_dim) dtype, v (n_kv_heads, head_dim) dtype
 * The reader checks every field and value (sizes, positions, finiteness) and names the first
 * problem; a partial last record (a writer killed mid-step) is dropped and flagged.
 */
#include "ckv_qkv.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckv_error.h"
#include "ckv_half.h"
#include "ckv_rng.h"

#define QKV_HEADER_BYTES 64
#define QKV_MAX_HEADS    1024
#define QKV_MAX_TOKENS   (1 << 22) /* 4M tokens per layer */

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void wr32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v, p[1] = (unsigned char)(v >> 8), p[2] = (unsigned char)(v >> 16),
    p[3] = (unsigned char)(v >> 24);
}

/* First non-finite element of n values of dtype dt, or -1. */
static long first_nonfinite(const void *p, enum ckv_dtype dt, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float x =
            dt == CKV_DTYPE_F16 ? ckv_half_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
        if (!isfinite(x))
            return (long)i;
    }
    return -1;
}

void ckv_qkv_free(struct ckv_qkv *q)
{
    if (!q)
        return;
    free(q->k);
    free(q->v);
    free(q->q);
    memset(q, 0, sizeof(*q));
}

int ckv_qkv_read(const char *path, struct ckv_qkv *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    FILE *f = fopen(path, "rb");
    if (!f) {
        int rc = -errno;
        if (err && errlen)
            snprintf(err, errlen, "%s: %s", path, strerror(-rc));
        return rc;
    }
    int rc = 0;
    struct stat st;
    unsigned char h[QKV_HEADER_BYTES];
    if (fstat(fileno(f), &st) != 0) {
        rc = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        goto out_close;
    }
    if (fread(h, 1, sizeof(h), f) != sizeof(h)) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s: shorter than the %d-byte header", path,
                        QKV_HEADER_BYTES);
        goto out_close;
    }
    if (memcmp(h, CKV_QKV_MAGIC, 8) != 0) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s: not a Q/K/V dump (magic is not %s)", path,
                        CKV_QKV_MAGIC);
        goto out_close;
    }
    uint32_t version = rd32(h + 8), hbytes = rd32(h + 12), dt = rd32(h + 16), nq = rd32(h + 20),
             nkv = rd32(h + 24), d = rd32(h + 28), layer = rd32(h + 32), np = rd32(h + 36);
    if (version != CKV_QKV_VERSION) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s: version %u, this build reads %d", path,
                        version, CKV_QKV_VERSION);
        goto out_close;
    }
    if (hbytes != QKV_HEADER_BYTES || dt > 1 || nq < 1 || nq > QKV_MAX_HEADS || nkv < 1 ||
        nkv > nq || nq % nkv != 0 || d < 1 || d > CKV_MAX_HEAD_DIM || layer > 100000) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                        "%s: bad header (header bytes %u, dtype %u, heads %u/%u, head_dim %u, "
                        "layer %u)",
                        path, hbytes, dt, nq, nkv, d, layer);
        goto out_close;
    }
    if (np > QKV_MAX_TOKENS) {
        rc = CKV_ETOOBIG;
        snprintf(err, errlen, "%s: %u prompt tokens, above the limit of %d", path, np,
                 QKV_MAX_TOKENS);
        goto out_close;
    }
    size_t esz = dt == 1 ? 2 : 4;
    size_t prompt_bytes = 2 * (size_t)nkv * np * d * esz;
    size_t rec_bytes = 8 + (size_t)nq * d * 4 + 2 * (size_t)nkv * d * esz;
    if ((uint64_t)st.st_size < QKV_HEADER_BYTES + prompt_bytes) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                        "%s: %lld bytes, the header promises %zu of prompt K/V", path,
                        (long long)st.st_size, prompt_bytes);
        goto out_close;
    }
    uint64_t rest = (uint64_t)st.st_size - QKV_HEADER_BYTES - prompt_bytes;
    uint64_t n_steps = rest / rec_bytes;
    if (np + n_steps > QKV_MAX_TOKENS) {
        rc = CKV_ETOOBIG;
        snprintf(err, errlen, "%s: %llu tokens, above the limit of %d", path,
                 (unsigned long long)(np + n_steps), QKV_MAX_TOKENS);
        goto out_close;
    }
    if (np + n_steps < 1 || n_steps < 1) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s: no decode step recorded", path);
        goto out_close;
    }
    out->layer = (int)layer;
    out->n_q_heads = (int)nq;
    out->n_kv_heads = (int)nkv;
    out->head_dim = (int)d;
    out->dtype = dt == 1 ? CKV_DTYPE_F16 : CKV_DTYPE_F32;
    out->n_prompt = (int)np;
    out->n_steps = (int)n_steps;
    out->n_ctx = (int)(np + n_steps);
    out->truncated = rest % rec_bytes != 0;
    size_t kv_bytes = (size_t)nkv * out->n_ctx * d * esz;
    out->k = malloc(kv_bytes);
    out->v = malloc(kv_bytes);
    out->q = malloc((size_t)n_steps * nq * d * sizeof(float));
    if (!out->k || !out->v || !out->q) {
        rc = -ENOMEM;
        snprintf(err, errlen, "%s: out of memory for %zu bytes of K/V", path, 2 * kv_bytes);
        goto out_free;
    }
    for (int which = 0; which < 2; which++) {
        char *dst = which ? out->v : out->k;
        for (uint32_t hh = 0; hh < nkv; hh++)
            if (fread(dst + ckv_qkv_kv_index(out, (int)hh, 0) * esz, esz, (size_t)np * d, f) !=
                (size_t)np * d) {
                rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s: short read in the prompt %s", path,
                                which ? "V" : "K");
                goto out_free;
            }
        for (uint32_t hh = 0; hh < nkv; hh++) {
            long bad = first_nonfinite(dst + ckv_qkv_kv_index(out, (int)hh, 0) * esz, out->dtype,
                                       (size_t)np * d);
            if (bad >= 0) {
                rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                                "%s: prompt %s head %u token %ld holds a non-finite value", path,
                                which ? "V" : "K", hh, bad / (long)d);
                goto out_free;
            }
        }
    }
    for (uint64_t s = 0; s < n_steps; s++) {
        unsigned char rh[8];
        int t = (int)(np + s);
        float *qs = out->q + (size_t)s * nq * d;
        if (fread(rh, 1, 8, f) != 8 || fread(qs, 4, (size_t)nq * d, f) != (size_t)nq * d) {
            rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s: short read in step %llu", path,
                            (unsigned long long)s);
            goto out_free;
        }
        if (rd32(rh) != CKV_QKV_STEP_MAGIC || rd32(rh + 4) != (uint32_t)t) {
            rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                            "%s: step %llu: bad record (magic 0x%08x, position %u, want %d)", path,
                            (unsigned long long)s, rd32(rh), rd32(rh + 4), t);
            goto out_free;
        }
        if (first_nonfinite(qs, CKV_DTYPE_F32, (size_t)nq * d) >= 0) {
            rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s: step %llu: non-finite value in q", path,
                            (unsigned long long)s);
            goto out_free;
        }
        for (int which = 0; which < 2; which++) {
            char *dst = which ? out->v : out->k;
            for (uint32_t hh = 0; hh < nkv; hh++) {
                char *row = dst + ckv_qkv_kv_index(out, (int)hh, t) * esz;
                if (fread(row, esz, d, f) != d) {
                    rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%s: short read in step %llu", path,
                                    (unsigned long long)s);
                    goto out_free;
                }
                if (first_nonfinite(row, out->dtype, d) >= 0) {
                    rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                                    "%s: step %llu: non-finite value in %s of head %u", path,
                                    (unsigned long long)s, which ? "v" : "k", hh);
                    goto out_free;
                }
            }
        }
    }
    goto out_close;
out_free:
    ckv_qkv_free(out);
out_close:
    fclose(f);
    return rc;
}

/* ---- writer ---- */

struct ckv_qkv_writer {
    FILE *f;
    int n_q_heads, n_kv_heads, head_dim, next_pos;
    size_t esz;
    int err; /* -errno of the first failed write */
};

static int put(struct ckv_qkv_writer *w, const void *p, size_t bytes)
{
    if (!w->err && fwrite(p, 1, bytes, w->f) != bytes)
        w->err = errno ? -errno : -EIO;
    return w->err;
}

int ckv_qkv_writer_open(const char *path, int layer, int n_q_heads, int n_kv_heads, int head_dim,
                        enum ckv_dtype dtype, int n_prompt, const void *k, const void *v,
                        size_t head_stride, size_t token_stride, struct ckv_qkv_writer **out)
{
    if (!path || !out || n_q_heads < 1 || n_kv_heads < 1 || n_q_heads % n_kv_heads ||
        n_q_heads > QKV_MAX_HEADS || head_dim < 1 || head_dim > CKV_MAX_HEAD_DIM || layer < 0 ||
        n_prompt < 0 || n_prompt > QKV_MAX_TOKENS || (n_prompt > 0 && (!k || !v)) ||
        (dtype != CKV_DTYPE_F32 && dtype != CKV_DTYPE_F16))
        return -EINVAL;
    struct ckv_qkv_writer *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->f = fopen(path, "wb");
    if (!w->f) {
        int rc = -errno;
        free(w);
        return rc;
    }
    w->n_q_heads = n_q_heads, w->n_kv_heads = n_kv_heads, w->head_dim = head_dim;
    w->next_pos = n_prompt;
    w->esz = ckv_dtype_size(dtype);
    unsigned char h[QKV_HEADER_BYTES] = {0};
    memcpy(h, CKV_QKV_MAGIC, 8);
    wr32(h + 8, CKV_QKV_VERSION);
    wr32(h + 12, QKV_HEADER_BYTES);
    wr32(h + 16, dtype == CKV_DTYPE_F16 ? 1 : 0);
    wr32(h + 20, (uint32_t)n_q_heads);
    wr32(h + 24, (uint32_t)n_kv_heads);
    wr32(h + 28, (uint32_t)head_dim);
    wr32(h + 32, (uint32_t)layer);
    wr32(h + 36, (uint32_t)n_prompt);
    put(w, h, sizeof(h));
    for (int which = 0; which < 2; which++)
        for (int hh = 0; hh < n_kv_heads; hh++)
            for (int t = 0; t < n_prompt; t++)
                put(w,
                    (const char *)(which ? v : k) +
                        ((size_t)hh * head_stride + (size_t)t * token_stride) * w->esz,
                    (size_t)head_dim * w->esz);
    if (!w->err && fflush(w->f) != 0)
        w->err = -errno;
    if (w->err) {
        int rc = w->err;
        ckv_qkv_writer_close(&w);
        return rc;
    }
    *out = w;
    return 0;
}

int ckv_qkv_writer_step(struct ckv_qkv_writer *w, int pos, const float *q, const void *k,
                        const void *v)
{
    if (!w || !q || !k || !v || pos != w->next_pos || pos >= QKV_MAX_TOKENS)
        return -EINVAL;
    unsigned char rh[8];
    wr32(rh, CKV_QKV_STEP_MAGIC);
    wr32(rh + 4, (uint32_t)pos);
    put(w, rh, 8);
    put(w, q, (size_t)w->n_q_heads * w->head_dim * sizeof(float));
    put(w, k, (size_t)w->n_kv_heads * w->head_dim * w->esz);
    put(w, v, (size_t)w->n_kv_heads * w->head_dim * w->esz);
    if (!w->err && fflush(w->f) != 0) /* a reader (or a crash) sees whole records */
        w->err = -errno;
    if (!w->err)
        w->next_pos++;
    return w->err;
}

int ckv_qkv_writer_close(struct ckv_qkv_writer **wp)
{
    if (!wp || !*wp)
        return 0;
    struct ckv_qkv_writer *w = *wp;
    int rc = w->err;
    if (fclose(w->f) != 0 && !rc)
        rc = -errno;
    free(w);
    *wp = NULL;
    return rc;
}

/* ---- synthetic data ---- */

struct synth_rng {
    uint64_t s;
};

static uint64_t synth_next(struct synth_rng *r)
{
    return ckv_rng_next(&r->s);
}

static float synth_uniform(struct synth_rng *r) /* [0, 1) */
{
    return (float)(synth_next(r) >> 40) * (1.0f / 16777216.0f);
}

/* Approximately N(0, 1): the sum of four uniforms, centred and scaled (Irwin-Hall): cheap,
 * and the tails do not matter here. */
static float synth_normal(struct synth_rng *r)
{
    uint64_t x = synth_next(r);
    float s = (float)(x & 0xffff) + (float)((x >> 16) & 0xffff) + (float)((x >> 32) & 0xffff) +
              (float)(x >> 48);
    return (s * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
}

void ckv_qkv_synth_defaults(struct ckv_qkv_synth_params *p, int n_q_heads, int n_kv_heads,
                            int head_dim, int n_prompt, int n_steps)
{
    *p = (struct ckv_qkv_synth_params){.n_q_heads = n_q_heads,
                                       .n_kv_heads = n_kv_heads,
                                       .head_dim = head_dim,
                                       .n_prompt = n_prompt,
                                       .n_steps = n_steps,
                                       .dtype = CKV_DTYPE_F16,
                                       .n_topics = n_prompt / 256 < 16     ? 16
                                                   : n_prompt / 256 > 1024 ? 1024
                                                                           : n_prompt / 256,
                                       .key_noise = 0.8f,
                                       .query_gain = 12.0f,
                                       .query_topics = 3,
                                       .group_share = 0.5f,
                                       .drift = 0.02f,
                                       .seed = 1};
}

/* A topic index drawn with Zipf-like popularity (weight 1 / (j + 1)^0.8, by inversion of a
 * precomputed cumulative table). */
static int synth_topic(struct synth_rng *r, const float *cum, int n)
{
    float u = synth_uniform(r) * cum[n - 1];
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (cum[mid] > u)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static void synth_store(void *dst, enum ckv_dtype dt, size_t i, float x)
{
    if (dt == CKV_DTYPE_F16)
        ((uint16_t *)dst)[i] = ckv_half_from_f32(x);
    else
        ((float *)dst)[i] = x;
}

/* Writes key/value rows of token t of head h: the key around topic `topic`. */
static void synth_token(struct synth_rng *r, const struct ckv_qkv_synth_params *p,
                        struct ckv_qkv *o, int h, int t, const float *dir, const float *sink)
{
    const int d = p->head_dim;
    float sd = sqrtf((float)d), mag = 0.7f + 0.6f * synth_uniform(r);
    size_t base = ckv_qkv_kv_index(o, h, t);
    for (int i = 0; i < d; i++) {
        /* topic direction (unit) * sqrt(d), noise of relative size key_noise; the first 4
         * tokens point along the sink direction instead (attention sinks) */
        float x = t < 4 ? sd * sink[i] : sd * dir[i] + p->key_noise * synth_normal(r);
        synth_store(o->k, p->dtype, base + i, mag * x);
        synth_store(o->v, p->dtype, base + i, synth_normal(r));
    }
}

int ckv_qkv_synth(const struct ckv_qkv_synth_params *p, struct ckv_qkv *o)
{
    memset(o, 0, sizeof(*o));
    if (!p || p->n_q_heads < 1 || p->n_kv_heads < 1 || p->n_q_heads % p->n_kv_heads ||
        p->head_dim < 1 || p->head_dim > CKV_MAX_HEAD_DIM || p->n_prompt < 1 || p->n_steps < 1 ||
        p->n_prompt + p->n_steps > QKV_MAX_TOKENS || p->n_topics < 1 || p->query_topics < 1 ||
        p->query_topics > 8 || (p->dtype != CKV_DTYPE_F16 && p->dtype != CKV_DTYPE_F32))
        return -EINVAL;
    const int d = p->head_dim, T = p->n_topics, nq = p->n_q_heads, nkv = p->n_kv_heads;
    const int G = nq / nkv, Q = p->query_topics;
    o->n_q_heads = nq, o->n_kv_heads = nkv, o->head_dim = d, o->dtype = p->dtype;
    o->n_prompt = p->n_prompt, o->n_steps = p->n_steps, o->n_ctx = p->n_prompt + p->n_steps;
    size_t esz = ckv_dtype_size(p->dtype), kv = (size_t)nkv * o->n_ctx * d;
    o->k = malloc(kv * esz);
    o->v = malloc(kv * esz);
    o->q = malloc(sizeof(float) * (size_t)p->n_steps * nq * d);
    float *dirs = malloc(sizeof(float) * ((size_t)nkv * (T + 1)) * d); /* + sink direction */
    float *cum = malloc(sizeof(float) * T);
    int *topic = malloc(sizeof(int) * (size_t)(nkv + nq) * Q); /* group's, then each head's */
    char *shared = malloc((size_t)nq * Q);
    if (!o->k || !o->v || !o->q || !dirs || !cum || !topic || !shared) {
        free(dirs), free(cum), free(topic), free(shared);
        ckv_qkv_free(o);
        return -ENOMEM;
    }
    struct synth_rng r = {p->seed};
    for (size_t i = 0; i < (size_t)nkv * (T + 1); i++) { /* random unit directions */
        float *u = dirs + i * d, n2 = 0;
        for (int j = 0; j < d; j++)
            u[j] = synth_normal(&r), n2 += u[j] * u[j];
        for (int j = 0; j < d; j++)
            u[j] /= sqrtf(n2);
    }
    for (int j = 0; j < T; j++)
        cum[j] = (j ? cum[j - 1] : 0.0f) + powf((float)(j + 1), -0.8f);
    /* prompt: runs of tokens on one topic (locality, as sentences), topics by popularity */
    for (int h = 0; h < nkv; h++) {
        const float *hd = dirs + (size_t)h * (T + 1) * d, *sink = hd + (size_t)T * d;
        int cur = synth_topic(&r, cum, T);
        for (int t = 0; t < p->n_prompt; t++) {
            if (synth_uniform(&r) < 0.3f)
                cur = synth_topic(&r, cum, T);
            synth_token(&r, p, o, h, t, hd + (size_t)cur * d, sink);
        }
    }
    /* query topics: per group Q shared ones, per head Q own ones; slot k of head i uses the
     * group's topic with probability group_share (fixed per slot) */
    for (int i = 0; i < (nkv + nq) * Q; i++)
        topic[i] = synth_topic(&r, cum, T);
    for (int i = 0; i < nq * Q; i++)
        shared[i] = synth_uniform(&r) < p->group_share;
    float wsum = 0;
    for (int k = 0; k < Q; k++)
        wsum += 1.0f / (float)(k + 1);
    for (int s = 0; s < p->n_steps; s++) {
        for (int i = 0; i < (nkv + nq) * Q; i++) /* slow drift: consecutive steps share topics */
            if (synth_uniform(&r) < p->drift)
                topic[i] = synth_topic(&r, cum, T);
        for (int qh = 0; qh < nq; qh++) {
            int h = qh / G;
            const float *hd = dirs + (size_t)h * (T + 1) * d, *sink = hd + (size_t)T * d;
            float *q = o->q + ((size_t)s * nq + qh) * d;
            /* logit of a key on topic k's direction ~ query_gain * weight_k; sinks ~ 5 */
            for (int j = 0; j < d; j++)
                q[j] = 5.0f * sink[j] + 0.15f * p->query_gain * synth_normal(&r) / sqrtf((float)d);
            for (int k = 0; k < Q; k++) {
                int tp = shared[qh * Q + k] ? topic[h * Q + k] : topic[(nkv + qh) * Q + k];
                float w = p->query_gain * (1.0f / (float)(k + 1)) / wsum;
                for (int j = 0; j < d; j++)
                    q[j] += w * hd[(size_t)tp * d + j];
            }
        }
        /* the step's own token: about one of its group's current topics half the time */
        int t = p->n_prompt + s;
        for (int h = 0; h < nkv; h++) {
            const float *hd = dirs + (size_t)h * (T + 1) * d, *sink = hd + (size_t)T * d;
            int tp = synth_uniform(&r) < 0.5f ? topic[h * Q + (int)(synth_next(&r) % Q)]
                                              : synth_topic(&r, cum, T);
            synth_token(&r, p, o, h, t, hd + (size_t)tp * d, sink);
        }
    }
    free(dirs), free(cum), free(topic), free(shared);
    return 0;
}
