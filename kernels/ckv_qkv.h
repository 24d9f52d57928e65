/*
 * Q/K/V of one attention layer over a decode: the input of `ckv eval-attn` and of the
 * attention benchmark, either read from a dump (docs/QKV_DUMP.md; the engine writes one with
 * `ckv run --dump-qkv DIR`) or generated with structure (ckv_qkv_synth).
 *
 * A dump file holds one layer: a header, the prompt's K and V, then one record per decode
 * step (its query, and its own new key and value, appended to the cache at its position).
 * The writer appends and flushes a record per step, so a dump grows while the engine runs
 * and a reader of a killed run loses at most the last, partial record.
 *
 * In memory (struct ckv_qkv) every token's K/V is in one array, prompt then steps; step s
 * (0-based) is the token at position n_prompt + s and its query attends to positions
 * [0, n_prompt + s]. All arrays are host memory owned by the struct.
 */
#ifndef CKV_QKV_H
#define CKV_QKV_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#define CKV_QKV_MAGIC      "CKVQKV01"
#define CKV_QKV_VERSION    1
#define CKV_QKV_STEP_MAGIC 0x50455453u /* "STEP" little-endian */

struct ckv_qkv {
    int layer;
    int n_q_heads, n_kv_heads, head_dim;
    enum ckv_dtype dtype; /* of K and V; queries are f32 */
    int n_prompt;         /* tokens before the first step */
    int n_steps;          /* decode steps (queries) */
    int n_ctx;            /* n_prompt + n_steps */
    void *k, *v;          /* (n_kv_heads, n_ctx, head_dim) dtype */
    float *q;             /* (n_steps, n_q_heads, head_dim) */
    int truncated;        /* reader: bytes of a partial last record were ignored */
};

/* Reads a dump file. On error returns -errno (file) or CKV_EFORMAT / CKV_ETOOBIG with a
 * message naming the problem in err; *out is then empty. The caller frees *out with
 * ckv_qkv_free(). */
int ckv_qkv_read(const char *path, struct ckv_qkv *out, char *err, size_t errlen);

void ckv_qkv_free(struct ckv_qkv *q);

/* Element (h, t, i) offsets. */
static inline size_t ckv_qkv_kv_index(const struct ckv_qkv *q, int h, int t)
{
    return ((size_t)h * q->n_ctx + t) * q->head_dim;
}

/* ---- writer ---- */

struct ckv_qkv_writer;

/* Creates (truncates) path and writes the header and the prompt's K and V, given as
 * element (h, t, i) at h * head_stride + t * token_stride + i of dtype. The caller owns
 * *out and ends it with ckv_qkv_writer_close(). Returns 0, -errno or -EINVAL. */
int ckv_qkv_writer_open(const char *path, int layer, int n_q_heads, int n_kv_heads, int head_dim,
                        enum ckv_dtype dtype, int n_prompt, const void *k, const void *v,
                        size_t head_stride, size_t token_stride, struct ckv_qkv_writer **out);

/* Appends one decode step: q (n_q_heads, head_dim) f32, the step's own k and v
 * (n_kv_heads, head_dim) of the dump's dtype; pos must be n_prompt + steps written so far.
 * Returns 0, -EINVAL or -errno. */
int ckv_qkv_writer_step(struct ckv_qkv_writer *w, int pos, const float *q, const void *k,
                        const void *v);

/* Flushes, closes, frees, NULLs *w. Returns 0 or -errno of the last failed write. */
int ckv_qkv_writer_close(struct ckv_qkv_writer **w);

/* ---- synthetic data with structure (docs/QKV_DUMP.md, "Synthetic data") ---- */

struct ckv_qkv_synth_params {
    int n_q_heads, n_kv_heads, head_dim;
    int n_prompt, n_steps;
    enum ckv_dtype dtype;
    int n_topics;      /* directions per KV head keys are drawn around; default one per
                          256 prompt tokens, at least 16, at most 1024 */
    float key_noise;   /* noise around the topic, relative to it; default 0.8 */
    float query_gain;  /* scaled score (logit) a query gives keys of its topics, split
                          over them as 1, 1/2, 1/3...: how peaked attention is; 12 */
    int query_topics;  /* topics a query mixes; default 3 */
    float group_share; /* chance a query head's topic is its group's shared one; 0.5 */
    float drift;       /* chance per step and topic that a query topic changes; 0.02 */
    uint64_t seed;
};

/* Fills p with the defaults above for the given shape. */
void ckv_qkv_synth_defaults(struct ckv_qkv_synth_params *p, int n_q_heads, int n_kv_heads,
                            int head_dim, int n_prompt, int n_steps);

/* Generates a data set (deterministic in the params). Returns 0, -EINVAL or -ENOMEM. */
int ckv_qkv_synth(const struct ckv_qkv_synth_params *p, struct ckv_qkv *out);

#endif
