/*
 * The engine (engine.h): opening a model, sequences as slots with their KV managers, prefill
 * in chunks and batched decode through forward.c, phase timings, and the Q/K/V dumps of
 * `ckv run --dump-qkv`.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckv_clock.h"
#include "ckv_error.h"
#include "engine_impl.h"

char *ckv_engine_default_model(char *out, size_t cap)
{
    const char *dir = getenv("CKV_MODEL_DIR");
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    if (dir && *dir)
        snprintf(out, cap, "%s/%s", dir, CKV_DEFAULT_MODEL_FILE);
    else if (xdg && *xdg)
        snprintf(out, cap, "%s/clusterkv/models/%s", xdg, CKV_DEFAULT_MODEL_FILE);
    else
        snprintf(out, cap, "%s/.cache/clusterkv/models/%s", home && *home ? home : "/root",
                 CKV_DEFAULT_MODEL_FILE);
    return out;
}

void ckv_engine_opts_default(struct ckv_engine_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->backend = CKV_BACKEND_CPU;
    o->n_threads = 0;
    o->max_seqs = 8;
    o->max_ctx = 0;
    o->prefill_chunk = 512;
    ckv_kv_opts_default(&o->kv);
}

/* Scratch of the forward pass, device memory of the context. */
static int alloc_scratch(struct ckv_engine *e)
{
    const struct ckv_model_info *in = &e->model->info;
    size_t T = (size_t)e->max_tokens;
    size_t qd = (size_t)in->n_q_heads * in->head_dim, kvd = (size_t)in->n_kv_heads * in->head_dim;
    struct {
        void **p;
        size_t bytes;
    } bufs[] = {
        {(void **)&e->x, T * in->n_embd * sizeof(float)},
        {(void **)&e->xn, T * in->n_embd * sizeof(float)},
        {(void **)&e->q, T * qd * sizeof(float)},
        {(void **)&e->k, T * kvd * sizeof(float)},
        {(void **)&e->v, T * kvd * sizeof(float)},
        {(void **)&e->att, T * qd * sizeof(float)},
        {(void **)&e->gate, T * in->n_ff * sizeof(float)},
        {(void **)&e->up, T * in->n_ff * sizeof(float)},
        {(void **)&e->logits, (size_t)e->o.max_seqs * in->n_vocab * sizeof(float)},
        {(void **)&e->ids, T * sizeof(int32_t)},
    };
    for (size_t i = 0; i < CKV_ARRAY_LEN(bufs); i++) {
        int rc = ckv_dev_alloc(e->ctx, bufs[i].bytes, bufs[i].p);
        if (rc < 0)
            return rc;
    }
    e->pos = malloc(T * sizeof(int32_t));
    return e->pos ? 0 : -ENOMEM;
}

static void free_scratch(struct ckv_engine *e)
{
    float **fs[] = {&e->x, &e->xn, &e->q, &e->k, &e->v, &e->att, &e->gate, &e->up, &e->logits};
    for (size_t i = 0; i < CKV_ARRAY_LEN(fs); i++) {
        if (*fs[i])
            ckv_dev_free(e->ctx, *fs[i]);
        *fs[i] = NULL;
    }
    if (e->ids)
        ckv_dev_free(e->ctx, e->ids);
    e->ids = NULL;
    free(e->pos);
    e->pos = NULL;
}

int ckv_engine_open(const struct ckv_engine_opts *o, ckv_engine_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!o->model_path)
        return ckv_errorf(-EINVAL, err, errlen, "no model path");
    if (o->max_seqs < 1 || o->max_seqs > 4096 || o->prefill_chunk < 1 || o->prefill_chunk > 65536 ||
        o->max_ctx < 0 || o->n_threads < 0)
        return ckv_errorf(-EINVAL, err, errlen,
                          "engine options out of range (max_seqs %d, prefill_chunk %d, max_ctx "
                          "%d, threads %d)",
                          o->max_seqs, o->prefill_chunk, o->max_ctx, o->n_threads);
    int rc = ckv_kv_opts_check(&o->kv, err, errlen);
    if (rc < 0)
        return rc;
    struct ckv_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->o = *o;
    e->model_path = strdup(o->model_path);
    if (!e->model_path) {
        rc = -ENOMEM;
        goto err;
    }
    e->o.model_path = e->model_path;

    char msg[256];
    if ((rc = gguf_open(o->model_path, &e->gguf, msg, sizeof(msg))) < 0) {
        /* the reader's message may already name the file */
        if (strstr(msg, o->model_path))
            ckv_errorf(rc, err, errlen, "%s", msg);
        else
            ckv_errorf(rc, err, errlen, "%s: %s", o->model_path, msg);
        goto err;
    }
    if ((rc = ckv_model_load(e->gguf, o->model_path, &e->model, msg, sizeof(msg))) < 0) {
        ckv_errorf(rc, err, errlen, "%s: %s", o->model_path, msg);
        goto err;
    }
    if ((rc = tokenizer_new_from_gguf(e->gguf, &e->tok, msg, sizeof(msg))) < 0) {
        ckv_errorf(rc, err, errlen, "%s: tokenizer: %s", o->model_path, msg);
        goto err;
    }
    if (tokenizer_n_vocab(e->tok) > e->model->info.n_vocab) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                        "%s: the tokenizer has %d tokens, the embedding only %d rows",
                        o->model_path, tokenizer_n_vocab(e->tok), e->model->info.n_vocab);
        goto err;
    }
    /* A template is optional: base models have none, and `ckv run` without --chat does not
     * need one. */
    e->has_chat = chat_template_from_gguf(e->gguf, NULL, &e->chat, NULL, 0) == 0;

    struct ckv_ctx_opts co = {.backend = o->backend, .n_threads = o->n_threads};
    if ((rc = ckv_ctx_new(&co, &e->ctx)) < 0) {
        ckv_errorf(rc, err, errlen, "kernel context: %s", ckv_strerror(rc));
        goto err;
    }
    e->max_ctx = o->max_ctx > 0 ? o->max_ctx : e->model->info.n_ctx_train;
    if (o->store) {
        e->store = o->store;
    } else {
        size_t bb = ckv_block_bytes(e->model->info.head_dim, o->kv.dtype);
        if ((rc = ckv_block_store_mem_new(bb, 0, &e->store)) < 0) {
            ckv_errorf(rc, err, errlen, "in-memory block store: %s", ckv_strerror(rc));
            goto err;
        }
        e->own_store = true;
    }
    e->seqs = calloc((size_t)o->max_seqs, sizeof(*e->seqs));
    e->max_tokens = CKV_MAX(o->prefill_chunk, o->max_seqs);
    if (!e->seqs) {
        rc = -ENOMEM;
        goto err;
    }
    if ((rc = alloc_scratch(e)) < 0) {
        ckv_errorf(rc, err, errlen, "scratch buffers: %s", ckv_strerror(rc));
        goto err;
    }
    /* Sequence uids unique across engines of a process and across restarts, for a shared
     * store: time in the high bits, a counter in the low ones. */
    e->next_uid = (ckv_wall_ms() << 20) ^ ((uint64_t)(uintptr_t)e & 0xfff00);
    *out = e;
    return 0;
err:
    ckv_engine_close(&e);
    return rc;
}

static void dumps_close(struct ckv_engine_seq *s)
{
    for (int i = 0; i < s->n_dumps; i++) {
        struct ckv_engine_dump *d = &s->dumps[i];
        if (d->w)
            ckv_qkv_writer_close(&d->w);
        free(d->pk);
        free(d->pv);
    }
    free(s->dumps);
    s->dumps = NULL;
    s->n_dumps = 0;
    free(s->dump_dir);
    s->dump_dir = NULL;
}

static void kv_stats_add(struct ckv_kv_stats *a, const struct ckv_kv_stats *b)
{
    a->decode_attn_calls += b->decode_attn_calls;
    a->attended_tokens += b->attended_tokens;
    a->clusters_selected += b->clusters_selected;
    a->cache_hits += b->cache_hits;
    a->cache_misses += b->cache_misses;
    a->cache_hit_bytes += b->cache_hit_bytes;
    a->cache_miss_bytes += b->cache_miss_bytes;
    a->clusters_made += b->clusters_made;
    a->kmeans_ms += b->kmeans_ms;
    a->select_ms += b->select_ms;
    a->attn_ms += b->attn_ms;
    a->fetch_ms += b->fetch_ms;
}

void ckv_engine_seq_free(ckv_engine_t *e, int seq)
{
    if (!e || seq < 0 || seq >= e->o.max_seqs || !e->seqs[seq].live)
        return;
    struct ckv_engine_seq *s = &e->seqs[seq];
    struct ckv_kv_stats st;
    ckv_kvcache_stats(s->kv, &st);
    kv_stats_add(&e->freed_kv, &st);
    ckv_kvcache_free(&s->kv);
    dumps_close(s);
    memset(s, 0, sizeof(*s));
}

void ckv_engine_close(ckv_engine_t **ep)
{
    struct ckv_engine *e = ep ? *ep : NULL;
    if (!e)
        return;
    if (e->seqs)
        for (int i = 0; i < e->o.max_seqs; i++)
            ckv_engine_seq_free(e, i);
    free(e->seqs);
    if (e->ctx)
        free_scratch(e);
    if (e->own_store)
        ckv_block_store_destroy(&e->store);
    ckv_ctx_destroy(&e->ctx);
    if (e->has_chat)
        chat_template_free(&e->chat);
    tokenizer_destroy(&e->tok);
    ckv_model_free(&e->model);
    gguf_close(&e->gguf);
    free(e->model_path);
    free(e);
    *ep = NULL;
}

const struct ckv_model_info *ckv_engine_info(const ckv_engine_t *e)
{
    return &e->model->info;
}

const tokenizer_t *ckv_engine_tokenizer(const ckv_engine_t *e)
{
    return e->tok;
}

int ckv_engine_chat_template(const ckv_engine_t *e, const struct chat_template **out)
{
    if (!e->has_chat)
        return -ENOENT;
    *out = &e->chat;
    return 0;
}

ckv_ctx_t *ckv_engine_ctx(ckv_engine_t *e)
{
    return e->ctx;
}

int ckv_engine_seq_new(ckv_engine_t *e, const struct ckv_kv_opts *kv, int *seq, char *err,
                       size_t errlen)
{
    if (!kv)
        kv = &e->o.kv;
    int rc = ckv_kv_opts_check(kv, err, errlen);
    if (rc < 0)
        return rc;
    int slot = -1;
    for (int i = 0; i < e->o.max_seqs && slot < 0; i++)
        if (!e->seqs[i].live)
            slot = i;
    if (slot < 0)
        return ckv_errorf(-EBUSY, err, errlen, "all %d sequences are live", e->o.max_seqs);
    const struct ckv_model_info *in = &e->model->info;
    struct ckv_kv_geom g = {.n_layers = in->n_layers,
                            .n_q_heads = in->n_q_heads,
                            .n_kv_heads = in->n_kv_heads,
                            .head_dim = in->head_dim,
                            .max_ctx = e->max_ctx};
    struct ckv_engine_seq *s = &e->seqs[slot];
    s->uid = e->next_uid++;
    if ((rc = ckv_kvcache_new(e->ctx, &g, kv, e->store, s->uid, &s->kv, err, errlen)) < 0)
        return rc;
    s->live = true;
    s->prefilled = false;
    *seq = slot;
    return 0;
}

static struct ckv_engine_seq *seq_get(const ckv_engine_t *e, int seq)
{
    if (!e || seq < 0 || seq >= e->o.max_seqs || !e->seqs[seq].live)
        return NULL;
    return &e->seqs[seq];
}

int ckv_engine_seq_len(const ckv_engine_t *e, int seq)
{
    struct ckv_engine_seq *s = seq_get(e, seq);
    return s ? ckv_kvcache_n_tokens(s->kv) : -EINVAL;
}

ckv_kvcache_t *ckv_engine_seq_kv(ckv_engine_t *e, int seq)
{
    struct ckv_engine_seq *s = seq_get(e, seq);
    return s ? s->kv : NULL;
}

static int check_tokens(const struct ckv_engine *e, const int32_t *tokens, int n)
{
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= e->model->info.n_vocab)
            return -EINVAL;
    return 0;
}

/* Opens the dump writers once the prompt is complete. */
static int dumps_open(struct ckv_engine *e, struct ckv_engine_seq *s)
{
    const struct ckv_model_info *in = &e->model->info;
    for (int i = 0; i < s->n_dumps; i++) {
        struct ckv_engine_dump *d = &s->dumps[i];
        char path[4096];
        snprintf(path, sizeof(path), "%s/layer-%02d.qkv", s->dump_dir, d->layer);
        size_t hd = (size_t)in->head_dim;
        int rc = ckv_qkv_writer_open(path, d->layer, in->n_q_heads, in->n_kv_heads, in->head_dim,
                                     CKV_DTYPE_F32, d->n_prompt, d->pk, d->pv, hd,
                                     (size_t)in->n_kv_heads * hd, &d->w);
        if (rc < 0)
            return rc;
        free(d->pk);
        free(d->pv);
        d->pk = d->pv = NULL;
    }
    return 0;
}

int ckv_engine_prefill(ckv_engine_t *e, int seq, const int32_t *tokens, int n, float *logits,
                       ckv_progress_fn progress, void *progress_arg)
{
    struct ckv_engine_seq *s = seq_get(e, seq);
    if (!s || s->prefilled || n < 1 || !tokens)
        return -EINVAL;
    if (check_tokens(e, tokens, n) < 0)
        return -EINVAL;
    if ((int64_t)ckv_kvcache_n_tokens(s->kv) + n > e->max_ctx)
        return -ENOSPC;
    uint64_t t0 = ckv_now_ns();
    int rc = 0;
    for (int done = 0; done < n;) {
        int c = CKV_MIN(e->o.prefill_chunk, n - done);
        bool last = done + c == n;
        if ((rc = ckv_forward(e, &seq, tokens + done, c, false, last ? logits : NULL)) < 0)
            goto out;
        done += c;
        if (progress)
            progress(progress_arg, done, n);
    }
    if ((rc = ckv_kvcache_end_prefill(s->kv)) < 0)
        goto out;
    s->prefilled = true;
    if (s->dump_dir && (rc = dumps_open(e, s)) < 0)
        goto out;
    e->stats.prefill_tokens += (uint64_t)n;
out:
    e->stats.prefill_ms += (double)(ckv_now_ns() - t0) * 1e-6;
    return rc;
}

int ckv_engine_decode(ckv_engine_t *e, const int *seqs, const int32_t *tokens, int n, float *logits)
{
    if (!e || n < 1 || n > e->o.max_seqs || !seqs || !tokens || !logits)
        return -EINVAL;
    for (int i = 0; i < n; i++) {
        struct ckv_engine_seq *s = seq_get(e, seqs[i]);
        if (!s || !s->prefilled)
            return -EINVAL;
        for (int j = 0; j < i; j++)
            if (seqs[j] == seqs[i])
                return -EINVAL;
        if (ckv_kvcache_n_tokens(s->kv) >= e->max_ctx)
            return -ENOSPC;
    }
    if (check_tokens(e, tokens, n) < 0)
        return -EINVAL;
    uint64_t t0 = ckv_now_ns();
    int rc = ckv_forward(e, seqs, tokens, n, true, logits);
    for (int i = 0; i < n && rc == 0; i++)
        rc = ckv_kvcache_end_step(e->seqs[seqs[i]].kv);
    if (rc == 0) {
        e->stats.decode_tokens += (uint64_t)n;
        e->stats.decode_steps++;
    }
    e->stats.decode_ms += (double)(ckv_now_ns() - t0) * 1e-6;
    return rc;
}

void ckv_engine_stats(const ckv_engine_t *e, struct ckv_engine_stats *out)
{
    *out = e->stats;
    out->kv = e->freed_kv;
    for (int i = 0; i < e->o.max_seqs; i++)
        if (e->seqs[i].live) {
            struct ckv_kv_stats st;
            ckv_kvcache_stats(e->seqs[i].kv, &st);
            kv_stats_add(&out->kv, &st);
        }
}

void ckv_engine_stats_reset(ckv_engine_t *e)
{
    memset(&e->stats, 0, sizeof(e->stats));
    memset(&e->freed_kv, 0, sizeof(e->freed_kv));
    /* Live sequences' KV counters cannot be reset: subtract them from now on. */
    for (int i = 0; i < e->o.max_seqs; i++)
        if (e->seqs[i].live) {
            struct ckv_kv_stats st;
            ckv_kvcache_stats(e->seqs[i].kv, &st);
            struct ckv_kv_stats *f = &e->freed_kv;
            f->decode_attn_calls -= st.decode_attn_calls;
            f->attended_tokens -= st.attended_tokens;
            f->clusters_selected -= st.clusters_selected;
            f->cache_hits -= st.cache_hits;
            f->cache_misses -= st.cache_misses;
            f->cache_hit_bytes -= st.cache_hit_bytes;
            f->cache_miss_bytes -= st.cache_miss_bytes;
            f->clusters_made -= st.clusters_made;
            f->kmeans_ms -= st.kmeans_ms;
            f->select_ms -= st.select_ms;
            f->attn_ms -= st.attn_ms;
            f->fetch_ms -= st.fetch_ms;
        }
}

/* ---- Q/K/V dumps ---- */

int ckv_engine_seq_dump_qkv(ckv_engine_t *e, int seq, const char *dir, const int *layers,
                            int n_layers, char *err, size_t errlen)
{
    struct ckv_engine_seq *s = seq_get(e, seq);
    if (!s || s->prefilled || ckv_kvcache_n_tokens(s->kv) > 0)
        return ckv_errorf(-EINVAL, err, errlen, "dumps are set on a new sequence");
    if (!dir || n_layers < 1 || n_layers > e->model->info.n_layers)
        return ckv_errorf(-EINVAL, err, errlen, "dump: no directory or no layers");
    for (int i = 0; i < n_layers; i++)
        if (layers[i] < 0 || layers[i] >= e->model->info.n_layers)
            return ckv_errorf(-EINVAL, err, errlen, "dump: layer %d not in [0, %d)", layers[i],
                              e->model->info.n_layers);
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        return ckv_errorf(-errno, err, errlen, "dump: mkdir %s: %s", dir, strerror(errno));
    dumps_close(s);
    s->dumps = calloc((size_t)n_layers, sizeof(*s->dumps));
    s->dump_dir = strdup(dir);
    if (!s->dumps || !s->dump_dir) {
        dumps_close(s);
        return -ENOMEM;
    }
    s->n_dumps = n_layers;
    for (int i = 0; i < n_layers; i++)
        s->dumps[i].layer = layers[i];
    return 0;
}

static struct ckv_engine_dump *dump_find(struct ckv_engine_seq *s, int layer)
{
    for (int i = 0; i < s->n_dumps; i++)
        if (s->dumps[i].layer == layer)
            return &s->dumps[i];
    return NULL;
}

int ckv_engine_dump_prefill(struct ckv_engine *e, struct ckv_engine_seq *s, int layer,
                            const float *k, const float *v, int n)
{
    struct ckv_engine_dump *d = dump_find(s, layer);
    if (!d)
        return 0;
    size_t kvd = (size_t)e->model->info.n_kv_heads * e->model->info.head_dim;
    if (d->n_prompt + n > d->cap) {
        int cap = CKV_MAX(d->n_prompt + n, 2 * d->cap);
        float *pk = realloc(d->pk, (size_t)cap * kvd * sizeof(float));
        if (!pk)
            return -ENOMEM;
        d->pk = pk;
        float *pv = realloc(d->pv, (size_t)cap * kvd * sizeof(float));
        if (!pv)
            return -ENOMEM;
        d->pv = pv;
        d->cap = cap;
    }
    int rc;
    size_t bytes = (size_t)n * kvd * sizeof(float);
    if ((rc = ckv_copy_d2h(e->ctx, d->pk + (size_t)d->n_prompt * kvd, k, bytes)) < 0 ||
        (rc = ckv_copy_d2h(e->ctx, d->pv + (size_t)d->n_prompt * kvd, v, bytes)) < 0)
        return rc;
    d->n_prompt += n;
    return 0;
}

int ckv_engine_dump_step(struct ckv_engine *e, struct ckv_engine_seq *s, int layer, int pos,
                         const float *q, const float *k, const float *v)
{
    struct ckv_engine_dump *d = dump_find(s, layer);
    if (!d || !d->w)
        return 0;
    const struct ckv_model_info *in = &e->model->info;
    size_t qd = (size_t)in->n_q_heads * in->head_dim, kvd = (size_t)in->n_kv_heads * in->head_dim;
    float *h = malloc((qd + 2 * kvd) * sizeof(float));
    if (!h)
        return -ENOMEM;
    int rc;
    if ((rc = ckv_copy_d2h(e->ctx, h, q, qd * sizeof(float))) == 0 &&
        (rc = ckv_copy_d2h(e->ctx, h + qd, k, kvd * sizeof(float))) == 0 &&
        (rc = ckv_copy_d2h(e->ctx, h + qd + kvd, v, kvd * sizeof(float))) == 0)
        rc = ckv_qkv_writer_step(d->w, pos, h, h + qd, h + qd + kvd);
    free(h);
    return rc;
}
