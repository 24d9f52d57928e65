/*
 * The engine: a GGUF model (model.h), its tokenizer and chat template, a kernel context, and
 * sequences that prefill and decode through the KV manager (kvcache.h). The same code serves
 * `ckv run` (embedded, in-memory block store), the evaluation, the benchmarks and ckv-worker.
 *
 * A sequence is a slot id. Prefill takes a sequence's prompt in chunks (causal attention,
 * exact for every method) and returns the last token's logits; decode advances several
 * sequences by one token each in one batch (matrix products batched, attention per sequence)
 * and returns each one's logits. One thread drives an engine at a time.
 */
#ifndef CKV_ENGINE_H
#define CKV_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "chat.h"
#include "kernels.h"
#include "kvcache.h"
#include "tokenizer.h"

struct ckv_block_store;

struct ckv_engine_opts {
    const char *model_path; /* GGUF file */
    enum ckv_backend_kind backend;
    int n_threads;                 /* 0: one per online core */
    int max_seqs;                  /* live sequences at once; 8 */
    int max_ctx;                   /* per sequence; 0: the model's training context */
    int prefill_chunk;             /* tokens per prefill chunk; 512 */
    struct ckv_kv_opts kv;         /* default KV options of new sequences */
    struct ckv_block_store *store; /* NULL: the engine makes an in-memory store */
};

/* Fills the defaults above (kv from ckv_kv_opts_default). */
void ckv_engine_opts_default(struct ckv_engine_opts *o);

/* The default model's file name and its path in the model cache, as deploy/fetch-model.sh
 * computes it: $CKV_MODEL_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/clusterkv/models. Writes
 * the path into out (truncated to cap) and returns out. */
#define CKV_DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"
char *ckv_engine_default_model(char *out, size_t cap);

/* What the model is, read from the GGUF (model.c). */
struct ckv_model_info {
    char arch[32];  /* "llama", "qwen2" */
    char name[128]; /* general.name, or the file name */
    int n_layers, n_embd, n_ff, n_q_heads, n_kv_heads, head_dim, n_vocab, n_ctx_train;
    float rms_eps, rope_theta;
    const char *weight_type; /* of the attention/FFN matrices, e.g. "q4_1" */
    size_t weight_bytes;
};

typedef struct ckv_engine ckv_engine_t;

/* Opens the model and makes the context. Returns 0, or a negative error with a message that
 * names the file and the problem in err. */
int ckv_engine_open(const struct ckv_engine_opts *o, ckv_engine_t **out, char *err, size_t errlen);
void ckv_engine_close(ckv_engine_t **e);

const struct ckv_model_info *ckv_engine_info(const ckv_engine_t *e);
const tokenizer_t *ckv_engine_tokenizer(const ckv_engine_t *e);
/* The model's chat template (ChatML etc.); -ENOENT when the GGUF has none. */
int ckv_engine_chat_template(const ckv_engine_t *e, const struct chat_template **out);
ckv_ctx_t *ckv_engine_ctx(ckv_engine_t *e);

/* A new empty sequence with KV options kv (NULL: the engine's). -EBUSY when max_seqs are
 * live; -EINVAL (err says why) for bad options. */
int ckv_engine_seq_new(ckv_engine_t *e, const struct ckv_kv_opts *kv, int *seq, char *err,
                       size_t errlen);
void ckv_engine_seq_free(ckv_engine_t *e, int seq);
int ckv_engine_seq_len(const ckv_engine_t *e, int seq);
/* The sequence's KV manager (evaluation, statistics). */
ckv_kvcache_t *ckv_engine_seq_kv(ckv_engine_t *e, int seq);

/* Dumps Q/K/V of the given layers of a new (empty) sequence into DIR/layer-LL.qkv
 * (docs/QKV_DUMP.md, f32): the prompt's K/V when prefill ends, then one record per decode
 * step. DIR is created when missing. Returns 0, -EINVAL (err says why), -ENOMEM or -errno. */
int ckv_engine_seq_dump_qkv(ckv_engine_t *e, int seq, const char *dir, const int *layers,
                            int n_layers, char *err, size_t errlen);

/* Called after every prefill chunk: tokens done of total. */
typedef void (*ckv_progress_fn)(void *arg, int done, int total);

/* Appends n >= 1 tokens to seq in chunks and ends the prompt (ckv_kvcache_end_prefill).
 * logits: NULL, or (n_vocab) f32 host memory receiving the last token's logits. A sequence
 * is prefilled once, before any decode (-EINVAL otherwise). */
int ckv_engine_prefill(ckv_engine_t *e, int seq, const int32_t *tokens, int n, float *logits,
                       ckv_progress_fn progress, void *progress_arg);

/* One decode step: token tokens[i] is appended to seqs[i] (distinct, prefilled) for i < n;
 * logits (n, n_vocab) f32 host memory. */
int ckv_engine_decode(ckv_engine_t *e, const int *seqs, const int32_t *tokens, int n,
                      float *logits);

/* Wall time by phase since open (or since ckv_engine_stats_reset), in ms, and token counts. */
struct ckv_engine_stats {
    uint64_t prefill_tokens, decode_tokens, decode_steps;
    double prefill_ms, decode_ms;
    double attn_ms;         /* of which attention (prefill and decode, all layers) */
    double matmul_ms;       /* of which matrix products */
    struct ckv_kv_stats kv; /* summed over sequences (live and freed) */
};
void ckv_engine_stats(const ckv_engine_t *e, struct ckv_engine_stats *out);
void ckv_engine_stats_reset(ckv_engine_t *e);

#endif
