/*
 * Inside the engine (engine.c, forward.c): the engine object, its sequences and scratch, and
 * the forward pass entry points. Not for other modules: they use engine.h.
 */
#ifndef CKV_ENGINE_IMPL_H
#define CKV_ENGINE_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "block_store.h"
#include "ckv_qkv.h"
#include "engine.h"
#include "gguf.h"
#include "model.h"

/* Q/K/V dump of one layer of one sequence (docs/QKV_DUMP.md). The prompt's K/V are gathered
 * during prefill (the writer wants them at open), then every decode step is appended. */
struct ckv_engine_dump {
    int layer;
    float *pk, *pv; /* (n_prompt, n_kv_heads, head_dim) f32, grown during prefill */
    int n_prompt, cap;
    struct ckv_qkv_writer *w; /* open after prefill */
};

struct ckv_engine_seq {
    bool live, prefilled;
    uint64_t uid;
    ckv_kvcache_t *kv;
    char *dump_dir; /* NULL: no dump */
    struct ckv_engine_dump *dumps;
    int n_dumps;
};

struct ckv_engine {
    struct ckv_engine_opts o; /* model_path copied below */
    char *model_path;
    gguf_t *gguf;
    struct ckv_model *model;
    tokenizer_t *tok;
    struct chat_template chat;
    bool has_chat;
    ckv_ctx_t *ctx;
    struct ckv_block_store *store;
    bool own_store;
    int max_ctx;                 /* tokens per sequence */
    struct ckv_engine_seq *seqs; /* (max_seqs) */
    uint64_t next_uid;

    /* Scratch for up to max_tokens tokens at once (max(prefill_chunk, max_seqs)), device
     * memory of ctx, allocated at open. */
    int max_tokens;
    float *x;         /* (T, n_embd) residual stream */
    float *xn;        /* (T, n_embd) normalised input of a block / block output */
    float *q;         /* (T, n_q_heads * head_dim) post-RoPE */
    float *k, *v;     /* (T, n_kv_heads * head_dim), k post-RoPE */
    float *att;       /* (T, n_q_heads * head_dim) attention output */
    float *gate, *up; /* (T, n_ff) */
    float *logits;    /* (max_seqs, n_vocab) */
    int32_t *pos;     /* (T) host: positions of the tokens */
    int32_t *ids;     /* (T) device: token ids for the embedding lookup */

    struct ckv_engine_stats stats;
    struct ckv_kv_stats freed_kv; /* of sequences already freed */
};

/* One forward pass of n tokens (n <= e->max_tokens).
 * Prefill (decode == false): tokens of sequence seqs[0] at positions len .. len + n - 1; the
 * last token's logits go to logits (host, n_vocab) when logits is not NULL.
 * Decode (decode == true): token i of sequence seqs[i] at that sequence's length; logits
 * (host, n x n_vocab). K/V are appended to each sequence's KV manager. */
int ckv_forward(struct ckv_engine *e, const int *seqs, const int32_t *tokens, int n, bool decode,
                float *logits);

/* Dump hooks of forward.c, in engine.c; k, v, q are device pointers (n tokens). */
int ckv_engine_dump_prefill(struct ckv_engine *e, struct ckv_engine_seq *s, int layer,
                            const float *k, const float *v, int n);
int ckv_engine_dump_step(struct ckv_engine *e, struct ckv_engine_seq *s, int layer, int pos,
                         const float *q, const float *k, const float *v);

#endif
