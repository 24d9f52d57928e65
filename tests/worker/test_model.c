/*
 * Suite "model": worker/model.c reads hyperparameters and tensors of a GGUF and refuses bad
 * files with a message naming the problem. Small models are written here with the GGUF image
 * writer of tests/ckv_test.h (all-f32, one or two layers), so that every refusal is tested
 * without the real model; the real model's hyperparameters are checked against its model card
 * (skipped when it is absent, unless CKV_REQUIRE_MODEL is set).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_test.h"
#include "engine.h"
#include "gguf.h"
#include "model.h"

/* A tiny llama: 2 layers, n_embd 32, 2 query heads / 1 KV head of 16, n_ff 64, vocab 40. */
enum { T_LAYERS = 2, T_EMBD = 32, T_HEADS = 2, T_KV = 1, T_HD = 16, T_FF = 64, T_VOCAB = 40 };

struct tspec {
    char name[64];
    uint64_t ne0, ne1; /* ne1 = 1 for vectors */
};

/* What to break: a tensor to leave out, a tensor whose row count is off by one, an
 * architecture name. */
struct breakage {
    const char *skip;
    const char *bad_shape;
    const char *arch;
    bool qkv_bias;
    bool no_block_count;
};

static int tensor_list(struct tspec *t, bool bias)
{
    int n = 0;
#define ADD(nm, a, b)                                                                              \
    (snprintf(t[n].name, sizeof(t[n].name), "%s", nm), t[n].ne0 = a, t[n++].ne1 = b)
    ADD("token_embd.weight", T_EMBD, T_VOCAB);
    ADD("output_norm.weight", T_EMBD, 1);
    for (int l = 0; l < T_LAYERS; l++) {
        char nm[64];
#define LADD(s, a, b) (snprintf(nm, sizeof(nm), "blk.%d.%s", l, s), ADD(nm, a, b))
        LADD("attn_norm.weight", T_EMBD, 1);
        LADD("attn_q.weight", T_EMBD, T_HEADS * T_HD);
        LADD("attn_k.weight", T_EMBD, T_KV * T_HD);
        LADD("attn_v.weight", T_EMBD, T_KV * T_HD);
        if (bias) {
            LADD("attn_q.bias", T_HEADS * T_HD, 1);
            LADD("attn_k.bias", T_KV * T_HD, 1);
            LADD("attn_v.bias", T_KV * T_HD, 1);
        }
        LADD("attn_output.weight", T_HEADS * T_HD, T_EMBD);
        LADD("ffn_norm.weight", T_EMBD, 1);
        LADD("ffn_gate.weight", T_EMBD, T_FF);
        LADD("ffn_up.weight", T_EMBD, T_FF);
        LADD("ffn_down.weight", T_FF, T_EMBD);
#undef LADD
    }
#undef ADD
    return n;
}

static void kv_f32(struct ckv_test_img *m, const char *key, float v)
{
    ckv_test_img_str(m, key);
    ckv_test_img_u32(m, 6); /* FLOAT32 */
    ckv_test_img_put(m, &v, 4);
}

/* Builds the tiny model's GGUF image (caller frees m->p). */
static void build(struct ckv_test_img *m, const struct breakage *b)
{
    struct tspec t[64];
    int nt = tensor_list(t, b->qkv_bias);
    int kept = 0;
    for (int i = 0; i < nt; i++)
        if (!b->skip || strcmp(t[i].name, b->skip) != 0)
            t[kept++] = t[i];
    nt = kept;
    const char *arch = b->arch ? b->arch : "llama";
    char key[96];
    ckv_test_img_header(m, 3, (uint64_t)nt, b->no_block_count ? 8 : 9);
    ckv_test_img_kv_str(m, "general.architecture", arch);
    ckv_test_img_kv_str(m, "general.name", "tiny test model");
#define K(s) (snprintf(key, sizeof(key), "%s.%s", arch, s), key)
    if (!b->no_block_count)
        ckv_test_img_kv_u32(m, K("block_count"), T_LAYERS);
    ckv_test_img_kv_u32(m, K("embedding_length"), T_EMBD);
    ckv_test_img_kv_u32(m, K("feed_forward_length"), T_FF);
    ckv_test_img_kv_u32(m, K("attention.head_count"), T_HEADS);
    ckv_test_img_kv_u32(m, K("attention.head_count_kv"), T_KV);
    ckv_test_img_kv_u32(m, K("context_length"), 256);
    kv_f32(m, K("rope.freq_base"), 50000.0f);
#undef K
    uint64_t off = 0;
    for (int i = 0; i < nt; i++) {
        uint64_t ne1 = t[i].ne1;
        if (b->bad_shape && strcmp(t[i].name, b->bad_shape) == 0)
            ne1 += 1;
        ckv_test_img_str(m, t[i].name);
        ckv_test_img_u32(m, ne1 == 1 ? 1 : 2);
        ckv_test_img_u64(m, t[i].ne0);
        if (ne1 != 1)
            ckv_test_img_u64(m, ne1);
        ckv_test_img_u32(m, 0); /* F32 */
        ckv_test_img_u64(m, off);
        t[i].ne1 = ne1;
        off += (t[i].ne0 * ne1 * 4 + 31) / 32 * 32;
    }
    static const uint8_t zero[32] = {0};
    ckv_test_img_put(m, zero, (32 - m->len % 32) % 32);
    for (int i = 0; i < nt; i++) {
        uint64_t n = t[i].ne0 * t[i].ne1;
        for (uint64_t j = 0; j < n; j++) {
            float v = 0.01f * (float)((j * 7 + (uint64_t)i) % 13) - 0.06f;
            ckv_test_img_put(m, &v, 4);
        }
        ckv_test_img_put(m, zero, (32 - (n * 4) % 32) % 32);
    }
}

/* Loads the image; returns the model loader's code and its message in err. */
static int load(const struct breakage *b, struct ckv_model **out, char *err, size_t errlen)
{
    struct ckv_test_img m = {0};
    build(&m, b);
    gguf_t *g = NULL;
    char gerr[256];
    int rc = gguf_open_mem(m.p, m.len, &g, gerr, sizeof(gerr));
    cr_assert_eq(rc, 0, "tiny image does not parse: %s", gerr);
    rc = ckv_model_load(g, "tiny.gguf", out, err, errlen);
    if (*out) {
        /* the weights point into the image: check then drop both together */
        cr_assert_eq((*out)->gguf, g);
        ckv_model_free(out);
    }
    gguf_close(&g);
    free(m.p);
    return rc;
}

Test(model, tiny_llama_loads)
{
    struct ckv_test_img m = {0};
    struct breakage b = {0};
    build(&m, &b);
    gguf_t *g = NULL;
    char err[256];
    cr_assert_eq(gguf_open_mem(m.p, m.len, &g, err, sizeof(err)), 0, "%s", err);
    struct ckv_model *md = NULL;
    cr_assert_eq(ckv_model_load(g, "tiny.gguf", &md, err, sizeof(err)), 0, "%s", err);
    const struct ckv_model_info *in = &md->info;
    cr_expect_str_eq(in->arch, "llama");
    cr_expect_str_eq(in->name, "tiny test model");
    cr_expect_eq(in->n_layers, T_LAYERS);
    cr_expect_eq(in->n_embd, T_EMBD);
    cr_expect_eq(in->n_ff, T_FF);
    cr_expect_eq(in->n_q_heads, T_HEADS);
    cr_expect_eq(in->n_kv_heads, T_KV);
    cr_expect_eq(in->head_dim, T_HD);
    cr_expect_eq(in->n_vocab, T_VOCAB);
    cr_expect_eq(in->n_ctx_train, 256);
    cr_expect_float_eq(in->rope_theta, 50000.0f, 1e-3);
    cr_expect_float_eq(in->rms_eps, 1e-5f, 1e-12); /* the default when the key is absent */
    cr_expect_eq(md->rope.style, CKV_ROPE_NORM);
    cr_expect_eq(md->rope.n_rot, T_HD);
    cr_expect_float_eq(md->rope.freq_scale, 1.0f, 0);
    cr_expect(md->tied_output, "no output.weight: tied to the embedding");
    cr_expect_eq(md->output.data, md->tok_embd.data);
    cr_expect_eq(md->layers[1].wk.rows, T_KV * T_HD);
    cr_expect_eq(md->layers[1].wk.cols, T_EMBD);
    cr_expect_eq(md->layers[1].w_down.cols, T_FF);
    cr_expect_null(md->layers[0].bq);
    /* a vector is copied as f32: the first element of output_norm (tensor 1) */
    cr_expect_float_eq(md->output_norm[0], 0.01f * 1 - 0.06f, 1e-7);
    ckv_model_free(&md);
    cr_expect_null(md);
    gguf_close(&g);
    free(m.p);
}

Test(model, qwen2_needs_bias_and_uses_neox)
{
    char err[256];
    struct ckv_model *md = NULL;
    struct breakage b = {.arch = "qwen2", .qkv_bias = true};
    cr_assert_eq(load(&b, &md, err, sizeof(err)), 0, "%s", err);
    b.qkv_bias = false;
    int rc = load(&b, &md, err, sizeof(err));
    cr_assert_eq(rc, CKV_EFORMAT);
    cr_expect(strstr(err, "blk.0.attn_q.bias") && strstr(err, "missing"), "%s", err);
}

Test(model, missing_tensor_named)
{
    char err[256];
    struct ckv_model *md = NULL;
    const char *names[] = {"blk.1.ffn_down.weight", "output_norm.weight", "blk.0.attn_norm.weight",
                           "token_embd.weight"};
    for (size_t i = 0; i < CKV_ARRAY_LEN(names); i++) {
        struct breakage b = {.skip = names[i]};
        int rc = load(&b, &md, err, sizeof(err));
        cr_expect_eq(rc, CKV_EFORMAT, "%s: rc %d", names[i], rc);
        cr_expect(strstr(err, names[i]) && strstr(err, "missing"), "%s: '%s'", names[i], err);
        cr_expect_null(md);
    }
}

Test(model, wrong_shape_named)
{
    char err[256];
    struct ckv_model *md = NULL;
    const char *names[] = {"blk.0.attn_k.weight", "blk.1.ffn_up.weight", "blk.1.ffn_norm.weight",
                           "blk.0.attn_output.weight"};
    for (size_t i = 0; i < CKV_ARRAY_LEN(names); i++) {
        struct breakage b = {.bad_shape = names[i]};
        int rc = load(&b, &md, err, sizeof(err));
        cr_expect_eq(rc, CKV_EFORMAT, "%s: rc %d", names[i], rc);
        cr_expect(strstr(err, names[i]) && strstr(err, "shape"), "%s: '%s'", names[i], err);
    }
}

Test(model, bad_metadata_named)
{
    char err[256];
    struct ckv_model *md = NULL;
    struct breakage b = {.arch = "gpt2"};
    cr_expect_eq(load(&b, &md, err, sizeof(err)), CKV_EUNSUPPORTED);
    cr_expect(strstr(err, "gpt2"), "%s", err);
    struct breakage c = {.no_block_count = true};
    cr_expect_eq(load(&c, &md, err, sizeof(err)), CKV_EFORMAT);
    cr_expect(strstr(err, "llama.block_count"), "%s", err);
}

/* A truncated file fails at open with the file's name and the reader's reason. */
Test(model, truncated_file_through_engine)
{
    struct ckv_test_img m = {0};
    struct breakage b = {0};
    build(&m, &b);
    char dir[512], path[600];
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    snprintf(path, sizeof(path), "%s/truncated.gguf", dir);
    cr_assert_eq(ckv_test_write_file(path, (const char *)m.p, m.len * 2 / 3), 0);
    struct ckv_engine_opts o;
    ckv_engine_opts_default(&o);
    o.model_path = path;
    ckv_engine_t *e = NULL;
    char err[512] = "";
    int rc = ckv_engine_open(&o, &e, err, sizeof(err));
    cr_expect_lt(rc, 0);
    cr_expect_null(e);
    cr_expect(strstr(err, "truncated.gguf"), "%s", err);
    cr_expect(strlen(err) > strlen(path) + 4, "no reason given: '%s'", err);
    snprintf(path, sizeof(path), "%s/absent.gguf", dir);
    rc = ckv_engine_open(&o, &e, err, sizeof(err));
    cr_expect_eq(rc, -ENOENT, "%d: %s", rc, err);
    ckv_test_rmrf(dir);
    free(m.p);
}

Test(model, default_model_card)
{
    const char *model = ckv_test_default_model();
    if (!model) {
        cr_assert_null(getenv("CKV_REQUIRE_MODEL"), "default model missing");
        cr_skip_test("default model not fetched (deploy/fetch-model.sh)");
    }
    gguf_t *g = NULL;
    char err[256];
    cr_assert_eq(gguf_open(model, &g, err, sizeof(err)), 0, "%s", err);
    struct ckv_model *md = NULL;
    cr_assert_eq(ckv_model_load(g, model, &md, err, sizeof(err)), 0, "%s", err);
    const struct ckv_model_info *in = &md->info;
    /* SmolLM2-135M's card: 30 layers, hidden 576, 9/3 heads of 64, SwiGLU 1536, eps 1e-5,
     * theta 100000, tied embeddings, 49152 tokens, 8192 context. */
    cr_expect_str_eq(in->arch, "llama");
    cr_expect_eq(in->n_layers, 30);
    cr_expect_eq(in->n_embd, 576);
    cr_expect_eq(in->n_q_heads, 9);
    cr_expect_eq(in->n_kv_heads, 3);
    cr_expect_eq(in->head_dim, 64);
    cr_expect_eq(in->n_ff, 1536);
    cr_expect_eq(in->n_vocab, 49152);
    cr_expect_eq(in->n_ctx_train, 8192);
    cr_expect_float_eq(in->rms_eps, 1e-5f, 1e-9);
    cr_expect_float_eq(in->rope_theta, 100000.0f, 1e-2);
    cr_expect(md->tied_output);
    cr_expect_eq(md->layers[0].wq.type, CKV_W_Q4_1);
    cr_expect_gt(in->weight_bytes, 50u << 20);
    ckv_model_free(&md);
    gguf_close(&g);
}
