/*
 * Suite "engine": the forward pass of the default model against llama.cpp, recorded by
 * tests/fixtures/make_engine_fixture.py into tests/fixtures/engine_fixture.txt (this suite only
 * compares): last-token logits after the prompt and after 8 fed-back tokens, and greedy
 * continuations. Then the engine against itself: ClusterKV, Quest and StreamingLLM with a
 * budget covering the context decode exactly as full attention; chunked prefill and batched
 * decode give what one chunk and one sequence give. Skipped without the model, unless
 * CKV_REQUIRE_MODEL is set.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_qkv.h"
#include "ckv_test.h"
#include "engine.h"

/*
 * Logit tolerance, measured. Both sides quantize each 32-element block of the activations to 8
 * bits before the Q4_1/Q8_0 dot products, bit for bit alike since ops.h rounds the block scale d
 * (and Q8_1's sum term s) to f16 as llama.cpp stores them (while we kept them f32 the largest
 * difference was 1.07: SmolLM2 has large outlier activations, so the last bits of a block scale
 * matter, and 30 layers carry them to the logits). What remains: llama.cpp's attention (without
 * flash attention, as the fixture runs it) converts Q to f16 for the K.Q product against its f16
 * cache and the softmax weights to f16 for the product with V, where ours stays f32; RoPE angles
 * in f32 (ours f64); sums run in other orders. For scale: a float64 reference of the same
 * weights differed from llama.cpp by up to 0.76 (f32 scales), and llama.cpp differs from itself
 * by up to 0.68 when the same prompt is evaluated one token at a time instead of in one batch
 * (n_batch 1 vs 512). Measured against llama.cpp: largest difference 0.91 (5 prompts x 59 ids, at
 * the prompt end and after 8 decode steps; 2026-12-06, f16 scales); 1.0 is a little above that.
 * Logits range from about 10 to 40, so this still catches any real error (a wrong RoPE, norm or
 * bias moves them by several units).
 */
#define LOGIT_TOL 1.0f
/* A step where our greedy token differs from llama.cpp's must be a near-tie for llama.cpp: its
 * logit for our token within TIE_TOL of its best. Measured: the largest such margin was 0.25
 * (5 prompts x 16 steps); the bound is the logit tolerance, the noise of one logit. */
#define TIE_TOL LOGIT_TOL
/* Greedy agreement. With teacher forcing (llama.cpp's token is fed back at every step, so one
 * near-tie does not derail the rest), we measured 76 of 80 steps agreeing (73 with f32 scales),
 * and 2 of 5 prompts agreeing on all of their first 16 tokens (a flip at a near-tie ends a
 * prompt's run: "code" flips at its first token on a margin of 0.057, "unicode" at step 8 on
 * 0.053, "long" at step 13 on 0.198). llama.cpp against itself, prompt evaluated in one batch vs
 * one token at a time, agrees on 3 of 5 prompts for 16 tokens: the per-prompt count is
 * dominated by near-ties, so the test asserts the per-step rate (0.9: 72 of 80, four steps
 * below the measurement) and the near-tie property, and the per-prompt count at the measured 2
 * (llama.cpp against itself minus one). */
#define MIN_STEP_AGREEMENT 0.9
#define MIN_PROMPTS_AGREE 2
#define GREEDY_CHECK 16
#define DECODE_AT 8

struct fx_prompt {
    char name[32];
    int32_t *ids;
    int n_ids;
    int32_t lid[128];
    float lval[128];
    int n_logits;
    int32_t greedy[64];
    int n_greedy;
    int32_t sid[128];
    float sval[128];
    int n_step;
    int32_t tid[64][8]; /* llama.cpp's top logits at continuation step k */
    float tval[64][8];
    int n_top[64];
};

static struct fx_prompt fx[16];
static int n_fx;

static int parse_ints(char *s, int32_t *out, int cap)
{
    int n = 0;
    for (char *t = strtok(s, " \n"); t && n < cap; t = strtok(NULL, " \n"))
        out[n++] = (int32_t)strtol(t, NULL, 10);
    return n;
}

static int parse_pairs(char *s, int32_t *ids, float *vals, int cap)
{
    int n = 0;
    for (char *t = strtok(s, " \n"); t && n < cap; t = strtok(NULL, " \n")) {
        char *colon = strchr(t, ':');
        cr_assert_not_null(colon, "bad pair '%s'", t);
        ids[n] = (int32_t)strtol(t, NULL, 10);
        vals[n] = strtof(colon + 1, NULL);
        n++;
    }
    return n;
}

static void load_fixture(void)
{
    char path[1024];
    ckv_test_src_path("tests/fixtures/engine_fixture.txt", path, sizeof(path));
    size_t len;
    char *text = ckv_test_read_file(path, &len);
    cr_assert_not_null(text, "%s: %s", path, strerror(errno));
    n_fx = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '#')
            continue;
        struct fx_prompt *p = n_fx > 0 ? &fx[n_fx - 1] : NULL;
        if (strncmp(line, "prompt ", 7) == 0) {
            cr_assert_lt(n_fx, 16);
            p = &fx[n_fx++];
            memset(p, 0, sizeof(*p));
            sscanf(line + 7, "%31s", p->name);
        } else if (strncmp(line, "ids ", 4) == 0) {
            p->ids = malloc(4096 * sizeof(int32_t));
            p->n_ids = parse_ints(line + 4, p->ids, 4096);
        } else if (strncmp(line, "logits ", 7) == 0) {
            p->n_logits = parse_pairs(line + 7, p->lid, p->lval, 128);
        } else if (strncmp(line, "greedy ", 7) == 0) {
            p->n_greedy = parse_ints(line + 7, p->greedy, 64);
        } else if (strncmp(line, "logits_step ", 12) == 0) {
            char *rest = strchr(line + 12, ' ');
            cr_assert_eq(atoi(line + 12), DECODE_AT);
            p->n_step = parse_pairs(rest + 1, p->sid, p->sval, 128);
        } else if (strncmp(line, "top ", 4) == 0) {
            int k = atoi(line + 4);
            char *rest = strchr(line + 4, ' ');
            cr_assert(k >= 0 && k < 64 && rest);
            p->n_top[k] = parse_pairs(rest + 1, p->tid[k], p->tval[k], 8);
        }
    }
    free(text);
    cr_assert_geq(n_fx, 5, "fixture has %d prompts", n_fx);
}

static const char *need_model(void)
{
    const char *model = ckv_test_default_model();
    if (!model) {
        cr_assert_null(getenv("CKV_REQUIRE_MODEL"), "default model missing");
        cr_skip_test("default model not fetched (deploy/fetch-model.sh)");
    }
    return model;
}

static ckv_engine_t *open_engine(const char *model, int max_seqs, int chunk)
{
    struct ckv_engine_opts o;
    ckv_engine_opts_default(&o);
    o.model_path = model;
    o.n_threads = 2;
    o.max_seqs = max_seqs;
    o.max_ctx = 1024;
    o.prefill_chunk = chunk;
    o.kv.method = CKV_KV_FULL;
    ckv_engine_t *e = NULL;
    char err[512];
    int rc = ckv_engine_open(&o, &e, err, sizeof(err));
    cr_assert_eq(rc, 0, "engine open: %s", err);
    return e;
}

static int new_seq(ckv_engine_t *e, const struct ckv_kv_opts *kv)
{
    int seq;
    char err[512];
    int rc = ckv_engine_seq_new(e, kv, &seq, err, sizeof(err));
    cr_assert_eq(rc, 0, "seq_new: %s", err);
    return seq;
}

static int32_t argmax(const float *x, int n)
{
    int32_t b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

static float max_diff(const float *logits, const int32_t *ids, const float *vals, int n,
                      int32_t *worst)
{
    float m = 0;
    for (int i = 0; i < n; i++) {
        float d = fabsf(logits[ids[i]] - vals[i]);
        if (d > m) {
            m = d;
            *worst = ids[i];
        }
    }
    return m;
}

/* Logits and greedy continuations of every fixture prompt, method full. */
Test(engine, logits_and_greedy_match_llamacpp, .timeout = 900)
{
    const char *model = need_model();
    load_fixture();
    ckv_engine_t *e = open_engine(model, 1, 512);
    int nv = ckv_engine_info(e)->n_vocab;
    float *logits = malloc((size_t)nv * sizeof(float));
    int agree_prompts = 0, steps_agree = 0, steps = 0;
    float worst_all = 0;
    for (int p = 0; p < n_fx; p++) {
        struct fx_prompt *f = &fx[p];
        int seq = new_seq(e, NULL);
        cr_assert_eq(ckv_engine_prefill(e, seq, f->ids, f->n_ids, logits, NULL, NULL), 0);
        int32_t worst = -1;
        float d = max_diff(logits, f->lid, f->lval, f->n_logits, &worst);
        cr_log_info("%s: %d prompt tokens, max |logit diff| %.4f (id %d)", f->name, f->n_ids,
                    (double)d, worst);
        cr_expect_leq(d, LOGIT_TOL, "%s: prompt logits differ by %.4f at id %d", f->name, (double)d,
                      worst);
        worst_all = fmaxf(worst_all, d);
        int agree = 0;
        bool same = true;
        for (int k = 0; k < GREEDY_CHECK; k++) {
            int32_t tok = argmax(logits, nv);
            if (tok != f->greedy[k]) {
                /* llama.cpp's margin between its token and ours at this step */
                float best = f->tval[k][0], ours = -INFINITY;
                for (int j = 0; j < f->n_top[k]; j++)
                    if (f->tid[k][j] == tok)
                        ours = f->tval[k][j];
                cr_log_info("%s: step %d: ours %d, llama.cpp %d, llama.cpp's margin %.3f", f->name,
                            k, tok, f->greedy[k], (double)(best - ours));
                cr_expect_leq(best - ours, TIE_TOL,
                              "%s: step %d: token %d where llama.cpp chose %d by a margin of "
                              "%.3f (not a near-tie)",
                              f->name, k, tok, f->greedy[k], (double)(best - ours));
            }
            same = same && tok == f->greedy[k];
            if (same)
                agree++;
            steps++;
            steps_agree += tok == f->greedy[k];
            /* Feed llama.cpp's token (not ours): the later steps stay comparable even after
             * a near-tie went the other way. */
            tok = f->greedy[k];
            cr_assert_eq(ckv_engine_decode(e, &seq, &tok, 1, logits), 0);
            if (k + 1 == DECODE_AT) {
                d = max_diff(logits, f->sid, f->sval, f->n_step, &worst);
                cr_log_info("%s: after %d decode steps max |logit diff| %.4f (id %d)", f->name,
                            DECODE_AT, (double)d, worst);
                cr_expect_leq(d, LOGIT_TOL, "%s: step %d logits differ by %.4f at id %d", f->name,
                              DECODE_AT, (double)d, worst);
                worst_all = fmaxf(worst_all, d);
            }
        }
        cr_log_info("%s: greedy agrees for %d of %d tokens", f->name, agree, GREEDY_CHECK);
        if (agree == GREEDY_CHECK)
            agree_prompts++;
        ckv_engine_seq_free(e, seq);
    }
    cr_log_info("greedy: %d of %d prompts agree for their first %d tokens, %d of %d steps "
                "agree; max |logit diff| %.4f",
                agree_prompts, n_fx, GREEDY_CHECK, steps_agree, steps, (double)worst_all);
    cr_expect_geq(steps_agree, MIN_STEP_AGREEMENT * steps, "only %d of %d greedy steps agree",
                  steps_agree, steps);
    cr_expect_geq(agree_prompts, MIN_PROMPTS_AGREE, "only %d of %d prompts agree for %d tokens",
                  agree_prompts, n_fx, GREEDY_CHECK);
    free(logits);
    ckv_engine_close(&e);
}

/* Greedy decoding of n tokens of several sequences in one batch (same prompt). */
static void greedy_batch(ckv_engine_t *e, const int *seqs, int n_seqs, const int32_t *prompt,
                         int n_prompt, int n_tokens, int32_t (*out)[64])
{
    int nv = ckv_engine_info(e)->n_vocab;
    float *logits = malloc((size_t)n_seqs * nv * sizeof(float));
    int32_t tok[8];
    for (int s = 0; s < n_seqs; s++) {
        cr_assert_eq(ckv_engine_prefill(e, seqs[s], prompt, n_prompt, logits, NULL, NULL), 0);
        tok[s] = argmax(logits, nv);
        out[s][0] = tok[s];
    }
    for (int k = 1; k < n_tokens; k++) {
        int rc = ckv_engine_decode(e, seqs, tok, n_seqs, logits);
        cr_assert_eq(rc, 0, "decode: %s", ckv_strerror(rc));
        for (int s = 0; s < n_seqs; s++) {
            tok[s] = argmax(logits + (size_t)s * nv, nv);
            out[s][k] = tok[s];
        }
    }
    free(logits);
}

/*
 * With a budget covering the whole context, every method attends to every token, so it
 * decodes as full attention does. Small sinks and window, so that windows are clustered during
 * the 64 steps, and full_layers 0, so that every layer goes through the method.
 *
 * "As full attention does" cannot mean bit-identical logits: ClusterKV and Quest attend over
 * blocks gathered in cluster or page order, a different summation order, and the 8-bit
 * activation quantization of the next matrix product turns a last-bit difference into a whole
 * quantization step now and then (see LOGIT_TOL). On this prompt full attention's greedy step 8
 * is a near-tie (llama.cpp's own margin is 0.108), and a free-running comparison flips there.
 * So all sequences are fed full attention's token (the same context for every method), and the
 * test asserts, at every one of 64 steps: the same greedy token as full attention, or else a
 * near-tie of full attention's logits (margin below METHOD_TIE; measured flips: margins 0.025
 * and 0.047); and logits within METHOD_TOL of full attention's over the whole vocabulary.
 * That bound is the model's noise floor, measured by perturbing the attention output of full
 * attention by a random relative +-1e-7 (one ulp) up to +-1e-2: every size gives largest logit
 * differences of 0.5 to 1.0 (the 8-bit quantization of the next product turns any change into
 * whole steps), 5e-2 gives 1.0 to 1.5; ClusterKV at full budget measured 1.38 over 64 steps
 * when it attended all clusters through the block kernel, 0 since the KV manager attends with
 * the full-attention kernel when every head's clusters fit the budget. Quest and StreamingLLM
 * at full budget attend through the full-attention kernel too (measured difference 0). The token
 * check is the sharper one: a cluster or page not attended, a wrong position or a window lost when
 * it is clustered changes tokens with clear margins.
 */
#define METHOD_TOL 2.0f
#define METHOD_TIE 0.2f
Test(engine, methods_at_full_budget_equal_full, .timeout = 900)
{
    const char *model = need_model();
    load_fixture();
    const struct fx_prompt *f = &fx[n_fx - 1]; /* the long prompt */
    ckv_engine_t *e = open_engine(model, 4, 512);
    int nv = ckv_engine_info(e)->n_vocab;
    enum ckv_kv_method methods[4] = {CKV_KV_FULL, CKV_KV_CLUSTERKV, CKV_KV_QUEST, CKV_KV_STREAMING};
    int seqs[4];
    for (int i = 0; i < 4; i++) {
        struct ckv_kv_opts kv;
        ckv_kv_opts_default(&kv);
        kv.method = methods[i];
        kv.budget = 1024;
        kv.sinks = 4;
        kv.window = 16;
        kv.tokens_per_cluster = 16;
        kv.full_layers = 0;
        seqs[i] = new_seq(e, &kv);
    }
    float *logits = malloc((size_t)4 * nv * sizeof(float));
    for (int i = 0; i < 4; i++)
        cr_assert_eq(
            ckv_engine_prefill(e, seqs[i], f->ids, f->n_ids, logits + (size_t)i * nv, NULL, NULL),
            0);
    float worst[4] = {0};
    int flips[4] = {0};
    for (int k = 0; k < 64; k++) {
        const float *full = logits;
        int32_t t0 = argmax(full, nv);
        for (int i = 1; i < 4; i++) {
            const float *li = logits + (size_t)i * nv;
            for (int j = 0; j < nv; j++)
                worst[i] = fmaxf(worst[i], fabsf(li[j] - full[j]));
            int32_t ti = argmax(li, nv);
            if (getenv("CKV_TEST_TRACE")) {
                float d = 0;
                for (int j = 0; j < nv; j++)
                    d = fmaxf(d, fabsf(li[j] - full[j]));
                cr_log_info("%s: step %d: max |logit diff| %.4f", ckv_kv_method_name(methods[i]), k,
                            (double)d);
            }
            if (ti != t0) {
                flips[i]++;
                float margin = full[t0] - full[ti];
                cr_log_info("%s: step %d: token %d, full attention %d (its margin %.4f)",
                            ckv_kv_method_name(methods[i]), k, ti, t0, (double)margin);
                cr_expect_leq(margin, METHOD_TIE,
                              "%s: step %d: token %d where full attention chose %d by %.4f",
                              ckv_kv_method_name(methods[i]), k, ti, t0, (double)margin);
            }
        }
        if (k == 63)
            break;
        int32_t tok[4] = {t0, t0, t0, t0};
        int rc = ckv_engine_decode(e, seqs, tok, 4, logits);
        cr_assert_eq(rc, 0, "decode: %s", ckv_strerror(rc));
    }
    for (int i = 1; i < 4; i++) {
        cr_log_info("%s vs full: max |logit diff| %.4f over 64 steps, %d different greedy tokens",
                    ckv_kv_method_name(methods[i]), (double)worst[i], flips[i]);
        cr_expect_leq(worst[i], METHOD_TOL, "%s: logits differ from full by %.4f",
                      ckv_kv_method_name(methods[i]), (double)worst[i]);
    }
    struct ckv_engine_stats st;
    ckv_engine_stats(e, &st);
    cr_expect_eq(st.decode_tokens, 4u * 63u);
    cr_expect_eq(st.prefill_tokens, 4u * (uint64_t)f->n_ids);
    cr_expect_gt(st.kv.clusters_made, 0u, "clusterkv made no clusters");
    cr_expect_gt(st.attn_ms, 0.0);
    cr_expect_gt(st.matmul_ms, 0.0);
    free(logits);
    ckv_engine_close(&e);
}

/* Prefill in chunks of 64 equals one chunk; three sequences decoding in one batch equal each
 * decoding alone (batched matrix products, attention per sequence). The bound 2e-3 allows
 * for another summation order of the attention over several chunks; both are far below the
 * llama.cpp tolerance. */
Test(engine, chunks_and_batches_agree, .timeout = 900)
{
    const char *model = need_model();
    load_fixture();
    const struct fx_prompt *lp = &fx[n_fx - 1];
    ckv_engine_t *e1 = open_engine(model, 3, 512), *e2 = open_engine(model, 3, 64);
    int nv = ckv_engine_info(e1)->n_vocab;
    float *a = malloc((size_t)3 * nv * sizeof(float)), *b = malloc((size_t)3 * nv * sizeof(float));
    int s1 = new_seq(e1, NULL), s2 = new_seq(e2, NULL);
    cr_assert_eq(ckv_engine_prefill(e1, s1, lp->ids, lp->n_ids, a, NULL, NULL), 0);
    cr_assert_eq(ckv_engine_prefill(e2, s2, lp->ids, lp->n_ids, b, NULL, NULL), 0);
    float d = 0;
    for (int i = 0; i < nv; i++)
        d = fmaxf(d, fabsf(a[i] - b[i]));
    cr_expect_leq(d, 2e-3f, "chunked prefill differs by %g", (double)d);
    ckv_engine_seq_free(e1, s1);
    ckv_engine_seq_free(e2, s2);
    ckv_engine_close(&e2);

    /* alone */
    static int32_t alone[3][64], batch[3][64];
    for (int p = 0; p < 3; p++) {
        int s = new_seq(e1, NULL);
        greedy_batch(e1, &s, 1, fx[p].ids, fx[p].n_ids, 12, &alone[p]);
        ckv_engine_seq_free(e1, s);
    }
    /* together: prompts of different lengths, so positions differ within the batch */
    int seqs[3];
    int nv3 = nv;
    for (int p = 0; p < 3; p++) {
        seqs[p] = new_seq(e1, NULL);
        cr_assert_eq(
            ckv_engine_prefill(e1, seqs[p], fx[p].ids, fx[p].n_ids, a + p * nv3, NULL, NULL), 0);
    }
    int32_t tok[3];
    for (int p = 0; p < 3; p++)
        batch[p][0] = tok[p] = argmax(a + p * nv3, nv3);
    for (int k = 1; k < 12; k++) {
        cr_assert_eq(ckv_engine_decode(e1, seqs, tok, 3, a), 0);
        for (int p = 0; p < 3; p++)
            batch[p][k] = tok[p] = argmax(a + p * nv3, nv3);
    }
    for (int p = 0; p < 3; p++)
        for (int k = 0; k < 12; k++)
            cr_expect_eq(batch[p][k], alone[p][k], "prompt %d token %d: batch %d alone %d", p, k,
                         batch[p][k], alone[p][k]);
    free(a);
    free(b);
    ckv_engine_close(&e1);
}

/* Misuse is refused, never a crash. */
Test(engine, bad_calls)
{
    const char *model = need_model();
    ckv_engine_t *e = open_engine(model, 2, 512);
    int nv = ckv_engine_info(e)->n_vocab;
    float *logits = malloc((size_t)2 * nv * sizeof(float));
    int32_t ids[4] = {1, 2, 3, 4}, bad = nv + 5;
    int s = new_seq(e, NULL);
    cr_expect_eq(ckv_engine_decode(e, &s, ids, 1, logits), -EINVAL, "decode before prefill");
    cr_expect_eq(ckv_engine_prefill(e, s, &bad, 1, logits, NULL, NULL), -EINVAL);
    cr_expect_eq(ckv_engine_prefill(e, s, ids, 0, logits, NULL, NULL), -EINVAL);
    cr_expect_eq(ckv_engine_prefill(e, 7, ids, 4, logits, NULL, NULL), -EINVAL);
    cr_assert_eq(ckv_engine_prefill(e, s, ids, 4, logits, NULL, NULL), 0);
    cr_expect_eq(ckv_engine_seq_len(e, s), 4);
    cr_expect_eq(ckv_engine_prefill(e, s, ids, 4, logits, NULL, NULL), -EINVAL, "prefill twice");
    int two[2] = {s, s};
    cr_expect_eq(ckv_engine_decode(e, two, ids, 2, logits), -EINVAL, "same sequence twice");
    cr_expect_eq(ckv_engine_decode(e, &s, &bad, 1, logits), -EINVAL);
    int s2 = new_seq(e, NULL), s3;
    char err[256];
    cr_expect_eq(ckv_engine_seq_new(e, NULL, &s3, err, sizeof(err)), -EBUSY);
    struct ckv_kv_opts kv;
    ckv_kv_opts_default(&kv);
    kv.budget = -3;
    ckv_engine_seq_free(e, s2);
    cr_expect_eq(ckv_engine_seq_new(e, &kv, &s3, err, sizeof(err)), -EINVAL);
    /* a prompt longer than the context */
    int32_t *many = calloc(2000, sizeof(int32_t));
    s2 = new_seq(e, NULL);
    cr_expect_eq(ckv_engine_prefill(e, s2, many, 2000, logits, NULL, NULL), -ENOSPC);
    free(many);
    free(logits);
    ckv_engine_close(&e);
}

/* --dump-qkv: the dump of a layer holds the prompt's K/V (gathered over several prefill
 * chunks) and one record per decode step, in the format ckv_qkv_read() (and so `ckv eval-attn`)
 * reads, with the model's geometry; misuse is refused. */
Test(engine, qkv_dump_reads_back, .timeout = 600)
{
    const char *model = need_model();
    load_fixture();
    const struct fx_prompt *f = &fx[0];
    ckv_engine_t *e = open_engine(model, 1, 16); /* several chunks: the prompt K/V grow */
    const struct ckv_model_info *in = ckv_engine_info(e);
    char dir[512], err[512];
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    int seq = new_seq(e, NULL);
    int layers[2] = {3, in->n_layers - 1};
    cr_assert_eq(ckv_engine_seq_dump_qkv(e, seq, dir, layers, 2, err, sizeof(err)), 0, "%s", err);
    int nv = in->n_vocab;
    float *logits = malloc((size_t)nv * sizeof(float));
    cr_assert_eq(ckv_engine_prefill(e, seq, f->ids, f->n_ids, logits, NULL, NULL), 0);
    int steps = 5;
    for (int k = 0; k < steps; k++) {
        int32_t tok = argmax(logits, nv);
        cr_assert_eq(ckv_engine_decode(e, &seq, &tok, 1, logits), 0);
    }
    ckv_engine_seq_free(e, seq); /* closes the writers */
    for (int i = 0; i < 2; i++) {
        char path[700];
        snprintf(path, sizeof(path), "%s/layer-%02d.qkv", dir, layers[i]);
        struct ckv_qkv q;
        int rc = ckv_qkv_read(path, &q, err, sizeof(err));
        cr_assert_eq(rc, 0, "%s: %s", path, err);
        cr_expect_eq(q.layer, layers[i]);
        cr_expect_eq(q.n_q_heads, in->n_q_heads);
        cr_expect_eq(q.n_kv_heads, in->n_kv_heads);
        cr_expect_eq(q.head_dim, in->head_dim);
        cr_expect_eq(q.n_prompt, f->n_ids);
        cr_expect_eq(q.n_steps, steps);
        cr_expect_eq(q.truncated, 0);
        /* keys are post-RoPE and not all zero */
        double sum = 0;
        const float *k = q.k;
        for (size_t j = 0; j < (size_t)q.n_kv_heads * q.n_ctx * q.head_dim; j++)
            sum += fabsf(k[j]);
        cr_expect_gt(sum, 0.0);
        ckv_qkv_free(&q);
    }
    /* misuse: dumps only on a new sequence, layers in range */
    seq = new_seq(e, NULL);
    int bad = in->n_layers;
    cr_expect_eq(ckv_engine_seq_dump_qkv(e, seq, dir, &bad, 1, err, sizeof(err)), -EINVAL);
    cr_assert_eq(ckv_engine_prefill(e, seq, f->ids, 4, logits, NULL, NULL), 0);
    cr_expect_eq(ckv_engine_seq_dump_qkv(e, seq, dir, layers, 1, err, sizeof(err)), -EINVAL);
    free(logits);
    ckv_engine_close(&e);
    ckv_test_rmrf(dir);
}

/* ClusterKV below the context (budget 128 of 553 prompt tokens, full_layers 2): decoding
 * works through selection and block attention, attends fewer tokens than full attention,
 * makes clusters of the prompt and of the decoded windows, and its greedy tokens (teacher
 * forced with full attention's) mostly stay those of full attention. The agreement bound is
 * loose on purpose (a sparse method may change near-ties); what it catches is a broken recall
 * (garbage attention gives garbage tokens). */
Test(engine, clusterkv_sparse_decodes, .timeout = 900)
{
    const char *model = need_model();
    load_fixture();
    const struct fx_prompt *f = &fx[n_fx - 1];
    ckv_engine_t *e = open_engine(model, 2, 512);
    int nv = ckv_engine_info(e)->n_vocab;
    struct ckv_kv_opts kv;
    ckv_kv_opts_default(&kv);
    kv.method = CKV_KV_FULL;
    int sf = new_seq(e, &kv);
    kv.method = CKV_KV_CLUSTERKV;
    kv.budget = 128;
    kv.sinks = 16;
    kv.window = 32;
    kv.tokens_per_cluster = 32;
    kv.full_layers = 2;
    int sc = new_seq(e, &kv);
    float *logits = malloc((size_t)2 * nv * sizeof(float));
    cr_assert_eq(ckv_engine_prefill(e, sf, f->ids, f->n_ids, logits, NULL, NULL), 0);
    cr_assert_eq(ckv_engine_prefill(e, sc, f->ids, f->n_ids, logits + nv, NULL, NULL), 0);
    ckv_engine_stats_reset(e);
    int seqs[2] = {sf, sc}, agree = 0, steps = 48;
    for (int k = 0; k < steps; k++) {
        int32_t t0 = argmax(logits, nv), t1 = argmax(logits + nv, nv);
        for (int j = 0; j < nv; j++)
            cr_assert(isfinite(logits[nv + j]), "step %d: logit %d not finite", k, j);
        agree += t0 == t1;
        int32_t tok[2] = {t0, t0};
        cr_assert_eq(ckv_engine_decode(e, seqs, tok, 2, logits), 0);
    }
    struct ckv_kv_stats full_st, ckv_st;
    ckv_kvcache_stats(ckv_engine_seq_kv(e, sf), &full_st);
    ckv_kvcache_stats(ckv_engine_seq_kv(e, sc), &ckv_st);
    double full_per_call = (double)full_st.attended_tokens / (double)full_st.decode_attn_calls;
    double ckv_per_call = (double)ckv_st.attended_tokens / (double)ckv_st.decode_attn_calls;
    cr_log_info("clusterkv budget 128: %d of %d greedy tokens as full attention; attended per "
                "call %.0f (full %.0f); clusters made %llu",
                agree, steps, ckv_per_call, full_per_call,
                (unsigned long long)ckv_st.clusters_made);
    cr_expect_lt(ckv_per_call, 0.8 * full_per_call);
    cr_expect_gt(ckv_st.clusters_made, 0u);
    cr_expect_gt(ckv_st.clusters_selected, 0u);
    cr_expect_geq(agree, steps / 2, "only %d of %d tokens as full attention", agree, steps);
    free(logits);
    ckv_engine_close(&e);
}
