/*
 * Loading a Llama-family model from GGUF (model.h): the hyperparameters under "<arch>.*", the
 * tensors by llama.cpp's names, each checked before anything reads it, so that a file with a
 * missing tensor or a wrong shape is an error naming the tensor and never a read out of bounds
 * later (the GGUF reader has already checked that every tensor lies inside the file).
 */
#include "model.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_half.h"

/* Architectures and how they differ. */
struct arch_desc {
    const char *name;
    enum ckv_rope_style rope_style;
    bool qkv_bias; /* Q/K/V biases required */
};

static const struct arch_desc arches[] = {
    {"llama", CKV_ROPE_NORM, false},
    {"qwen2", CKV_ROPE_NEOX, true},
};

/* Context of one load: the file and where errors go. */
struct loader {
    const gguf_t *g;
    const char *arch;
    char *err;
    size_t errlen;
};

/* An integer hyperparameter "<arch>.<key>"; missing and required is an error. Values must lie
 * in [lo, hi]: a GGUF with absurd sizes would otherwise make us allocate absurd buffers. */
static int get_int(struct loader *L, const char *key, bool required, int64_t dflt, int64_t lo,
                   int64_t hi, int *out)
{
    char full[128];
    snprintf(full, sizeof(full), "%s.%s", L->arch, key);
    int64_t v;
    int rc = gguf_get_i64(L->g, full, &v, L->err, L->errlen);
    if (rc == -ENOENT) {
        if (required)
            return ckv_errorf(CKV_EFORMAT, L->err, L->errlen, "metadata key %s missing", full);
        v = dflt;
    } else if (rc < 0) {
        return rc;
    }
    if (v < lo || v > hi)
        return ckv_errorf(CKV_EFORMAT, L->err, L->errlen, "metadata %s = %lld outside [%lld, %lld]",
                          full, (long long)v, (long long)lo, (long long)hi);
    *out = (int)v;
    return 0;
}

static int get_float(struct loader *L, const char *key, float dflt, float *out)
{
    char full[128];
    snprintf(full, sizeof(full), "%s.%s", L->arch, key);
    int rc = gguf_get_f32(L->g, full, out, L->err, L->errlen);
    if (rc == -ENOENT) {
        *out = dflt;
        return 0;
    }
    return rc;
}

/* Copies a 1-D tensor of n elements (f32, f16 or bf16) into a new f32 array. name is the full
 * tensor name; absent is an error when required, else *out = NULL. */
static int load_vec(struct loader *L, const char *name, int64_t n, bool required, float **out)
{
    *out = NULL;
    const struct gguf_tensor *t = gguf_find_tensor(L->g, name);
    if (!t) {
        if (required)
            return ckv_errorf(CKV_EFORMAT, L->err, L->errlen, "tensor %s missing", name);
        return 0;
    }
    uint64_t elems = 1;
    for (uint32_t d = 0; d < t->n_dims; d++)
        elems *= t->ne[d];
    if (t->ne[0] != (uint64_t)n || elems != (uint64_t)n)
        return ckv_errorf(CKV_EFORMAT, L->err, L->errlen,
                          "tensor %s has shape [%llu, %llu], expected [%lld]", name,
                          (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], (long long)n);
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16)
        return ckv_errorf(CKV_EUNSUPPORTED, L->err, L->errlen,
                          "tensor %s has type %s, expected f32, f16 or bf16", name,
                          ggml_type_name(t->type));
    float *v = malloc((size_t)n * sizeof(float));
    if (!v)
        return -ENOMEM;
    /* Element by element through memcpy: the mapping gives no alignment promise beyond the
     * file's (usually 32, but a file may say 1). */
    const uint8_t *p = t->data;
    for (int64_t i = 0; i < n; i++) {
        if (t->type == GGML_TYPE_F32) {
            memcpy(&v[i], p + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            if (t->type == GGML_TYPE_F16) {
                v[i] = ckv_half_to_f32(h);
            } else {
                uint32_t bits = (uint32_t)h << 16;
                memcpy(&v[i], &bits, 4);
            }
        }
    }
    *out = v;
    return 0;
}

/* Wraps a matrix of `rows` rows of `cols` elements. */
static int load_mat(struct loader *L, const char *name, int64_t rows, int64_t cols,
                    struct ckv_weight *w)
{
    const struct gguf_tensor *t = gguf_find_tensor(L->g, name);
    if (!t)
        return ckv_errorf(CKV_EFORMAT, L->err, L->errlen, "tensor %s missing", name);
    if (t->n_dims > 2 || t->ne[0] != (uint64_t)cols || t->ne[1] != (uint64_t)rows)
        return ckv_errorf(CKV_EFORMAT, L->err, L->errlen,
                          "tensor %s has shape [%llu, %llu] (%u dims), expected [%lld, %lld]", name,
                          (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], t->n_dims,
                          (long long)cols, (long long)rows);
    if (!ckv_wtype_supported((int)t->type))
        return ckv_errorf(CKV_EUNSUPPORTED, L->err, L->errlen,
                          "tensor %s has type %s, which the matrix products do not support", name,
                          ggml_type_name(t->type));
    size_t rb = ckv_wtype_row_bytes((int)t->type, (int)cols);
    if (rb == 0 || (uint64_t)rb * (uint64_t)rows != t->nbytes)
        return ckv_errorf(CKV_EFORMAT, L->err, L->errlen,
                          "tensor %s: %lld columns of type %s do not make whole rows", name,
                          (long long)cols, ggml_type_name(t->type));
    w->type = (enum ckv_wtype)t->type;
    w->rows = (int)rows;
    w->cols = (int)cols;
    w->row_bytes = rb;
    w->data = t->data;
    return 0;
}

static void copy_gstr(char *dst, size_t cap, const struct gguf_str *s)
{
    size_t n = s->len < cap - 1 ? (size_t)s->len : cap - 1;
    memcpy(dst, s->ptr, n);
    dst[n] = '\0';
}

/* The RoPE frequency scaling: linear (a factor) or none; other kinds (yarn, longrope) would
 * silently give wrong logits, so they are refused. */
static int load_rope_scaling(struct loader *L, float *freq_scale)
{
    char key[128];
    struct gguf_str s;
    *freq_scale = 1.0f;
    snprintf(key, sizeof(key), "%s.rope.scaling.type", L->arch);
    int rc = gguf_get_str(L->g, key, &s, L->err, L->errlen);
    bool linear = false;
    if (rc == 0) {
        if (s.len == 6 && memcmp(s.ptr, "linear", 6) == 0)
            linear = true;
        else if (!(s.len == 4 && memcmp(s.ptr, "none", 4) == 0))
            return ckv_errorf(CKV_EUNSUPPORTED, L->err, L->errlen,
                              "%s = '%.*s': only linear RoPE scaling is supported", key,
                              (int)CKV_MIN(s.len, 32), s.ptr);
    } else if (rc != -ENOENT) {
        return rc;
    }
    float factor = 0.0f;
    rc = get_float(L, "rope.scaling.factor", 0.0f, &factor);
    if (rc < 0)
        return rc;
    if (factor == 0.0f) { /* older files: rope.scale_linear */
        rc = get_float(L, "rope.scale_linear", 0.0f, &factor);
        if (rc < 0)
            return rc;
        if (factor != 0.0f)
            linear = true;
    }
    if (linear && factor != 0.0f) {
        if (!(factor > 0.0f && factor < 1e6f))
            return ckv_errorf(CKV_EFORMAT, L->err, L->errlen, "RoPE scaling factor %g invalid",
                              (double)factor);
        *freq_scale = 1.0f / factor;
    }
    return 0;
}

static void layer_free(struct ckv_layer *l)
{
    free(l->attn_norm);
    free(l->bq);
    free(l->bk);
    free(l->bv);
    free(l->ffn_norm);
}

static int load_layer(struct loader *L, const struct ckv_model_info *in, bool bias, int i,
                      struct ckv_layer *l)
{
    char nm[96];
    int rc;
    int qd = in->n_q_heads * in->head_dim, kvd = in->n_kv_heads * in->head_dim;
#define NAME(s) (snprintf(nm, sizeof(nm), "blk.%d.%s", i, s), nm)
    if ((rc = load_vec(L, NAME("attn_norm.weight"), in->n_embd, true, &l->attn_norm)) < 0 ||
        (rc = load_mat(L, NAME("attn_q.weight"), qd, in->n_embd, &l->wq)) < 0 ||
        (rc = load_mat(L, NAME("attn_k.weight"), kvd, in->n_embd, &l->wk)) < 0 ||
        (rc = load_mat(L, NAME("attn_v.weight"), kvd, in->n_embd, &l->wv)) < 0 ||
        (rc = load_mat(L, NAME("attn_output.weight"), in->n_embd, qd, &l->wo)) < 0 ||
        (rc = load_vec(L, NAME("attn_q.bias"), qd, bias, &l->bq)) < 0 ||
        (rc = load_vec(L, NAME("attn_k.bias"), kvd, bias, &l->bk)) < 0 ||
        (rc = load_vec(L, NAME("attn_v.bias"), kvd, bias, &l->bv)) < 0 ||
        (rc = load_vec(L, NAME("ffn_norm.weight"), in->n_embd, true, &l->ffn_norm)) < 0 ||
        (rc = load_mat(L, NAME("ffn_gate.weight"), in->n_ff, in->n_embd, &l->w_gate)) < 0 ||
        (rc = load_mat(L, NAME("ffn_up.weight"), in->n_ff, in->n_embd, &l->w_up)) < 0 ||
        (rc = load_mat(L, NAME("ffn_down.weight"), in->n_embd, in->n_ff, &l->w_down)) < 0)
        return rc;
#undef NAME
    return 0;
}

int ckv_model_load(const gguf_t *g, const char *path, struct ckv_model **out, char *err,
                   size_t errlen)
{
    *out = NULL;
    struct loader L = {.g = g, .err = err, .errlen = errlen};
    struct gguf_str s;
    int rc = gguf_get_str(g, "general.architecture", &s, err, errlen);
    if (rc == -ENOENT)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata key general.architecture missing");
    if (rc < 0)
        return rc;
    const struct arch_desc *ad = NULL;
    for (size_t i = 0; i < CKV_ARRAY_LEN(arches); i++)
        if (s.len == strlen(arches[i].name) && memcmp(s.ptr, arches[i].name, s.len) == 0)
            ad = &arches[i];
    if (!ad)
        return ckv_errorf(CKV_EUNSUPPORTED, err, errlen,
                          "architecture '%.*s' not supported (llama, qwen2)",
                          (int)CKV_MIN(s.len, 64), s.ptr);
    L.arch = ad->name;

    struct ckv_model *m = calloc(1, sizeof(*m));
    if (!m)
        return -ENOMEM;
    m->gguf = g;
    struct ckv_model_info *in = &m->info;
    snprintf(in->arch, sizeof(in->arch), "%s", ad->name);
    if (gguf_get_str(g, "general.name", &s, NULL, 0) == 0) {
        copy_gstr(in->name, sizeof(in->name), &s);
    } else {
        const char *base = path ? strrchr(path, '/') : NULL;
        snprintf(in->name, sizeof(in->name), "%s", base ? base + 1 : path ? path : "?");
    }

    /* Sizes, bounded so that a corrupt file cannot make us allocate terabytes. */
    int n_rot = 0, key_len = 0;
    if ((rc = get_int(&L, "block_count", true, 0, 1, 1024, &in->n_layers)) < 0 ||
        (rc = get_int(&L, "embedding_length", true, 0, 1, 1 << 16, &in->n_embd)) < 0 ||
        (rc = get_int(&L, "feed_forward_length", true, 0, 1, 1 << 18, &in->n_ff)) < 0 ||
        (rc = get_int(&L, "attention.head_count", true, 0, 1, 1024, &in->n_q_heads)) < 0 ||
        (rc = get_int(&L, "attention.head_count_kv", false, in->n_q_heads, 1, 1024,
                      &in->n_kv_heads)) < 0 ||
        (rc = get_int(&L, "context_length", false, 4096, 1, 1 << 24, &in->n_ctx_train)) < 0)
        goto err;
    if (in->n_q_heads % in->n_kv_heads != 0) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "%d query heads not a multiple of %d KV heads",
                        in->n_q_heads, in->n_kv_heads);
        goto err;
    }
    if (in->n_embd % in->n_q_heads != 0) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "embedding %d not a multiple of %d heads",
                        in->n_embd, in->n_q_heads);
        goto err;
    }
    if ((rc = get_int(&L, "attention.key_length", false, in->n_embd / in->n_q_heads, 2,
                      CKV_MAX_HEAD_DIM, &key_len)) < 0)
        goto err;
    in->head_dim = key_len;
    int val_len = 0;
    if ((rc = get_int(&L, "attention.value_length", false, key_len, 1, CKV_MAX_HEAD_DIM,
                      &val_len)) < 0)
        goto err;
    if (val_len != key_len) {
        rc = ckv_errorf(CKV_EUNSUPPORTED, err, errlen, "key length %d != value length %d", key_len,
                        val_len);
        goto err;
    }
    if ((rc = get_int(&L, "rope.dimension_count", false, in->head_dim, 2, in->head_dim, &n_rot)) <
        0)
        goto err;
    if (n_rot % 2 != 0) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "rope.dimension_count %d is odd", n_rot);
        goto err;
    }
    if ((rc = get_float(&L, "attention.layer_norm_rms_epsilon", 1e-5f, &in->rms_eps)) < 0 ||
        (rc = get_float(&L, "rope.freq_base", 10000.0f, &in->rope_theta)) < 0)
        goto err;
    if (!(in->rms_eps > 0.0f && in->rms_eps < 1.0f) ||
        !(in->rope_theta > 1.0f && in->rope_theta < 1e12f)) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "rms epsilon %g or rope theta %g invalid",
                        (double)in->rms_eps, (double)in->rope_theta);
        goto err;
    }
    m->rope.style = ad->rope_style;
    m->rope.n_rot = n_rot;
    m->rope.theta = in->rope_theta;
    if ((rc = load_rope_scaling(&L, &m->rope.freq_scale)) < 0)
        goto err;

    /* The vocabulary size is the embedding's row count (the logits' width). */
    const struct gguf_tensor *te = gguf_find_tensor(g, "token_embd.weight");
    if (!te) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "tensor token_embd.weight missing");
        goto err;
    }
    if (te->ne[1] < 1 || te->ne[1] > (1u << 22)) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen, "tensor token_embd.weight has %llu rows",
                        (unsigned long long)te->ne[1]);
        goto err;
    }
    in->n_vocab = (int)te->ne[1];
    if ((rc = load_mat(&L, "token_embd.weight", in->n_vocab, in->n_embd, &m->tok_embd)) < 0 ||
        (rc = load_vec(&L, "output_norm.weight", in->n_embd, true, &m->output_norm)) < 0 ||
        (rc = load_vec(&L, "rope_freqs.weight", n_rot / 2, false, &m->rope_freqs)) < 0)
        goto err;
    m->rope.freq_factors = m->rope_freqs;
    if (gguf_find_tensor(g, "output.weight")) {
        if ((rc = load_mat(&L, "output.weight", in->n_vocab, in->n_embd, &m->output)) < 0)
            goto err;
    } else {
        m->output = m->tok_embd;
        m->tied_output = 1;
    }

    m->layers = calloc((size_t)in->n_layers, sizeof(*m->layers));
    if (!m->layers) {
        rc = -ENOMEM;
        goto err;
    }
    for (int i = 0; i < in->n_layers; i++)
        if ((rc = load_layer(&L, in, ad->qkv_bias, i, &m->layers[i])) < 0)
            goto err;

    /* What the matrices are, for display, and their bytes. */
    in->weight_type = ckv_wtype_name(m->layers[0].wq.type);
    size_t bytes = m->tok_embd.row_bytes * (size_t)m->tok_embd.rows;
    if (!m->tied_output)
        bytes += m->output.row_bytes * (size_t)m->output.rows;
    for (int i = 0; i < in->n_layers; i++) {
        const struct ckv_layer *l = &m->layers[i];
        const struct ckv_weight *ws[] = {&l->wq,     &l->wk,   &l->wv,    &l->wo,
                                         &l->w_gate, &l->w_up, &l->w_down};
        for (size_t j = 0; j < CKV_ARRAY_LEN(ws); j++)
            bytes += ws[j]->row_bytes * (size_t)ws[j]->rows;
    }
    in->weight_bytes = bytes;
    *out = m;
    return 0;
err:
    ckv_model_free(&m);
    return rc;
}

void ckv_model_free(struct ckv_model **mp)
{
    struct ckv_model *m = mp ? *mp : NULL;
    if (!m)
        return;
    if (m->layers)
        for (int i = 0; i < m->info.n_layers; i++)
            layer_free(&m->layers[i]);
    free(m->layers);
    free(m->output_norm);
    free(m->rope_freqs);
    free(m);
    *mp = NULL;
}
