/*
 * A Llama-family model read from a GGUF file: hyperparameters from the metadata and every
 * weight tensor checked (present, shape, type) and wrapped as struct ckv_weight, pointing into
 * the file's read-only mapping. Architectures `llama` (RoPE NORM) and `qwen2` (RoPE NEOX, QKV
 * bias). Nothing is specific to one model: every size comes from the file.
 *
 * Shapes in GGUF order (ne[0] = the innermost, a row of the matrix = one output unit):
 *   token_embd          (n_vocab rows, n_embd cols)
 *   output              (n_vocab, n_embd); absent: tied to token_embd
 *   output_norm         (n_embd) vector
 *   blk.N.attn_norm     (n_embd)
 *   blk.N.attn_q        (n_q_heads * head_dim, n_embd)   + .bias (n_q_heads * head_dim), qwen2
 *   blk.N.attn_k / _v   (n_kv_heads * head_dim, n_embd)  + .bias, qwen2
 *   blk.N.attn_output   (n_embd, n_q_heads * head_dim)
 *   blk.N.ffn_norm      (n_embd)
 *   blk.N.ffn_gate/_up  (n_ff, n_embd)
 *   blk.N.ffn_down      (n_embd, n_ff)
 * Vectors (norms, biases, rope_freqs) are copied to owned f32 arrays at load (they are small
 * and may be stored as f16); matrices stay in the mapping.
 */
#ifndef CKV_MODEL_H
#define CKV_MODEL_H

#include <stddef.h>

#include "engine.h"
#include "gguf.h"
#include "ops.h"

struct ckv_layer {
    float *attn_norm;             /* (n_embd) */
    struct ckv_weight wq, wk, wv; /* see above */
    float *bq, *bk, *bv;          /* (rows of wq/wk/wv) or NULL (llama) */
    struct ckv_weight wo;
    float *ffn_norm; /* (n_embd) */
    struct ckv_weight w_gate, w_up, w_down;
};

struct ckv_model {
    struct ckv_model_info info;
    struct ckv_rope_params rope; /* freq_factors points at rope_freqs below */
    struct ckv_weight tok_embd;
    struct ckv_weight output; /* == tok_embd when tied */
    int tied_output;
    float *output_norm;       /* (n_embd) */
    float *rope_freqs;        /* (n_rot / 2) or NULL */
    struct ckv_layer *layers; /* (n_layers) */
    const gguf_t *gguf;       /* borrowed: must outlive the model */
};

/* Reads hyperparameters and tensors of an open GGUF. g stays owned by the caller and must
 * outlive *out. Returns 0, or CKV_EFORMAT (a missing key or tensor, a wrong shape: err names
 * it), CKV_EUNSUPPORTED (architecture, tensor type, RoPE scaling type), -ENOMEM. The caller
 * frees *out with ckv_model_free(). */
int ckv_model_load(const gguf_t *g, const char *path, struct ckv_model **out, char *err,
                   size_t errlen);

/* Frees the model (not its gguf) and NULLs the pointer; NULL is fine. */
void ckv_model_free(struct ckv_model **m);

#endif
