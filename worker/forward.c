/*
 * The transformer forward pass of a Llama-family model (llama2.c's shape: one readable loop
 * over layers), for a batch of tokens: the tokens of one prefill chunk of one sequence, or one
 * token of each of several decoding sequences. Every matrix product runs once over the whole
 * batch (the weights are read once per batch: what makes batching pay on a memory-bound
 * decode); attention goes through each sequence's KV manager (kvcache.h), which implements the
 * method (full, clusterkv, quest, streaming).
 *
 * Per layer, x (n, n_embd) the residual stream:
 *   xn = rmsnorm(x) * attn_norm
 *   q, k, v = xn Wq^T (+ bq), xn Wk^T (+ bk), xn Wv^T (+ bv); RoPE on q and k
 *   att = attention(q, K/V cache)          prefill: causal over the chunk and what is cached
 *   x += att Wo^T
 *   xn = rmsnorm(x) * ffn_norm
 *   x += (silu(xn Wgate^T) * (xn Wup^T)) Wdown^T
 * then logits = rmsnorm(x) * output_norm . Wout^T, for the last token of a prefill chunk and
 * every token of a decode batch.
 *
 * Matrix products go through kernels/ops.h (quantized dot products with 8-bit activations, as
 * llama.cpp; the kernel choice and its reason are in the CPU backend's cpu_ops.c).
 */
#include <stdlib.h>
#include <string.h>

#include "ckv_clock.h"
#include "ckv_error.h"
#include "engine_impl.h"

/* Times a matrix product into the matmul share of the stats. */
static int mm(struct ckv_engine *e, const struct ckv_weight *w, const float *x, int n, float *y)
{
    uint64_t t0 = ckv_now_ns();
    int rc = ckv_matmul(e->ctx, w, x, n, y);
    e->stats.matmul_ms += (double)(ckv_now_ns() - t0) * 1e-6;
    return rc;
}

/* Attention of layer l for the batch: append the new K/V to each sequence's cache, then
 * attend. q, k, v, att are the batch rows (see engine_impl.h for shapes). */
static int attention(struct ckv_engine *e, const int *seqs, int n, bool decode, int l)
{
    const struct ckv_model_info *in = &e->model->info;
    size_t qd = (size_t)in->n_q_heads * in->head_dim, kvd = (size_t)in->n_kv_heads * in->head_dim;
    uint64_t t0 = ckv_now_ns();
    int rc = 0;
    if (!decode) {
        struct ckv_engine_seq *s = &e->seqs[seqs[0]];
        if (s->dump_dir && (rc = ckv_engine_dump_prefill(e, s, l, e->k, e->v, n)) < 0)
            return rc;
        if ((rc = ckv_kvcache_append(s->kv, l, e->k, e->v, n)) < 0 ||
            (rc = ckv_kvcache_attn_prefill(s->kv, l, e->q, n, e->att)) < 0)
            return rc;
    } else {
        for (int i = 0; i < n; i++) {
            struct ckv_engine_seq *s = &e->seqs[seqs[i]];
            const float *k = e->k + i * kvd, *v = e->v + i * kvd, *q = e->q + i * qd;
            if (s->dump_dir && (rc = ckv_engine_dump_step(e, s, l, e->pos[i], q, k, v)) < 0)
                return rc;
            if ((rc = ckv_kvcache_append(s->kv, l, k, v, 1)) < 0 ||
                (rc = ckv_kvcache_attn_decode(s->kv, l, q, e->att + i * qd)) < 0)
                return rc;
        }
    }
    e->stats.attn_ms += (double)(ckv_now_ns() - t0) * 1e-6;
    return 0;
}

int ckv_forward(struct ckv_engine *e, const int *seqs, const int32_t *tokens, int n, bool decode,
                float *logits)
{
    const struct ckv_model *m = e->model;
    const struct ckv_model_info *in = &m->info;
    ckv_ctx_t *ctx = e->ctx;
    const int d = in->n_embd, hd = in->head_dim;
    const int qd = in->n_q_heads * hd, kvd = in->n_kv_heads * hd;
    int rc;
    ASSERT(n >= 1 && n <= e->max_tokens);

    /* Positions: a prefill chunk continues its sequence; each decode token is at the end of
     * its own sequence. */
    for (int i = 0; i < n; i++) {
        if (decode)
            e->pos[i] = ckv_kvcache_n_tokens(e->seqs[seqs[i]].kv);
        else
            e->pos[i] = ckv_kvcache_n_tokens(e->seqs[seqs[0]].kv) + i;
    }

    if ((rc = ckv_copy_h2d(ctx, e->ids, tokens, (size_t)n * sizeof(int32_t))) < 0 ||
        (rc = ckv_get_rows(ctx, &m->tok_embd, e->ids, n, e->x)) < 0)
        return rc;

    for (int l = 0; l < in->n_layers; l++) {
        const struct ckv_layer *L = &m->layers[l];
        /* attention block */
        if ((rc = ckv_rmsnorm(ctx, e->x, L->attn_norm, n, d, in->rms_eps, e->xn)) < 0 ||
            (rc = mm(e, &L->wq, e->xn, n, e->q)) < 0 || (rc = mm(e, &L->wk, e->xn, n, e->k)) < 0 ||
            (rc = mm(e, &L->wv, e->xn, n, e->v)) < 0)
            return rc;
        if (L->bq && ((rc = ckv_add_bias(ctx, e->q, L->bq, n, qd)) < 0 ||
                      (rc = ckv_add_bias(ctx, e->k, L->bk, n, kvd)) < 0 ||
                      (rc = ckv_add_bias(ctx, e->v, L->bv, n, kvd)) < 0))
            return rc;
        if ((rc = ckv_rope(ctx, e->q, n, in->n_q_heads, hd, e->pos, &m->rope)) < 0 ||
            (rc = ckv_rope(ctx, e->k, n, in->n_kv_heads, hd, e->pos, &m->rope)) < 0)
            return rc;
        if ((rc = attention(e, seqs, n, decode, l)) < 0)
            return rc;
        if ((rc = mm(e, &L->wo, e->att, n, e->xn)) < 0 ||
            (rc = ckv_add(ctx, e->x, e->xn, (size_t)n * d)) < 0)
            return rc;
        /* feed-forward block */
        if ((rc = ckv_rmsnorm(ctx, e->x, L->ffn_norm, n, d, in->rms_eps, e->xn)) < 0 ||
            (rc = mm(e, &L->w_gate, e->xn, n, e->gate)) < 0 ||
            (rc = mm(e, &L->w_up, e->xn, n, e->up)) < 0 ||
            (rc = ckv_swiglu(ctx, e->gate, e->up, (size_t)n * in->n_ff, e->gate)) < 0 ||
            (rc = mm(e, &L->w_down, e->gate, n, e->xn)) < 0 ||
            (rc = ckv_add(ctx, e->x, e->xn, (size_t)n * d)) < 0)
            return rc;
    }

    if (!logits)
        return 0;
    /* A prefill chunk needs only its last token's logits: one output row instead of n (the
     * output matrix is the largest of a small model). */
    const float *xs = decode ? e->x : e->x + (size_t)(n - 1) * d;
    int rows = decode ? n : 1;
    if ((rc = ckv_rmsnorm(ctx, xs, m->output_norm, rows, d, in->rms_eps, e->xn)) < 0 ||
        (rc = mm(e, &m->output, e->xn, rows, e->logits)) < 0 ||
        (rc = ckv_copy_d2h(ctx, logits, e->logits, (size_t)rows * in->n_vocab * sizeof(float))) < 0)
        return rc;
    return 0;
}
