/*
 * Suite "eval": the model-free logic of `ckv eval` (tools/eval_core.c) against independent
 * references: NLL and perplexity from logits (a direct softmax in long double), option
 * lists, method names, the retrieval prompts (where the needle sits, what the answer and the
 * expected continuation are) and the answer parsing. With the default model the prompts are
 * tokenized to their target length (skipped without it unless CKV_REQUIRE_MODEL is set).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_test.h"
#include "eval_core.h"
#include "gguf.h"
#include "tokenizer.h"

/* -log p[target] by the textbook formula, in long double (no max subtraction: the test
 * logits are small enough). */
static double ref_nll(const float *l, int n, int target)
{
    long double s = 0;
    for (int i = 0; i < n; i++)
        s += expl((long double)l[i]);
    return (double)-logl(expl((long double)l[target]) / s);
}

Test(eval, nll_matches_softmax)
{
    enum { V = 1000 };
    static float l[V];
    uint64_t st = 7;
    for (int i = 0; i < V; i++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        l[i] = (float)((int)(st >> 40) % 2000) / 200.0f - 5.0f; /* [-5, 5) */
    }
    for (int t = 0; t < V; t += 97)
        cr_assert_float_eq(ckv_eval_nll(l, V, t), ref_nll(l, V, t), 1e-9, "target %d", t);
    /* uniform: log V */
    for (int i = 0; i < V; i++)
        l[i] = 3.0f;
    cr_assert_float_eq(ckv_eval_nll(l, V, 5), log((double)V), 1e-12);
    /* large logits do not overflow: one of 1e4 above the rest */
    l[7] = 1e4f;
    cr_assert_float_eq(ckv_eval_nll(l, V, 7), 0.0, 1e-12);
    cr_assert(ckv_eval_nll(l, V, 8) > 9000);
    cr_assert_eq(ckv_eval_argmax(l, V), 7);
    /* bad input: NAN, not a crash */
    cr_assert(isnan(ckv_eval_nll(l, V, V)));
    cr_assert(isnan(ckv_eval_nll(l, V, -1)));
    l[3] = NAN;
    cr_assert(isnan(ckv_eval_nll(l, V, 7)));
    cr_assert_eq(ckv_eval_argmax(l, 0), -1);
}

Test(eval, ppl_is_exp_mean_nll)
{
    struct ckv_eval_ppl p = {0};
    cr_assert(isnan(ckv_eval_ppl_value(&p)));
    ckv_eval_ppl_add(&p, log(2.0));
    ckv_eval_ppl_add(&p, log(8.0));
    cr_assert_float_eq(ckv_eval_ppl_value(&p), 4.0, 1e-12); /* geometric mean of 2 and 8 */
    /* a run of logits: perplexity of a uniform model over V is V */
    float l[50];
    for (int i = 0; i < 50; i++)
        l[i] = 0.25f;
    struct ckv_eval_ppl q = {0};
    for (int t = 0; t < 20; t++)
        ckv_eval_ppl_add(&q, ckv_eval_nll(l, 50, t));
    cr_assert_float_eq(ckv_eval_ppl_value(&q), 50.0, 1e-9);
}

Test(eval, lists)
{
    int v[4], n;
    double d[4];
    cr_assert_eq(ckv_eval_parse_ints("128,256,512", 1, 1 << 20, v, 4, &n), 0);
    cr_assert_eq(n, 3);
    cr_assert_eq(v[2], 512);
    cr_assert_neq(ckv_eval_parse_ints("128,,256", 1, 1 << 20, v, 4, &n), 0);
    cr_assert_neq(ckv_eval_parse_ints("128,", 1, 1 << 20, v, 4, &n), 0);
    cr_assert_neq(ckv_eval_parse_ints("0", 1, 1 << 20, v, 4, &n), 0);
    cr_assert_neq(ckv_eval_parse_ints("1,2,3,4,5", 1, 10, v, 4, &n), 0);
    cr_assert_neq(ckv_eval_parse_ints("12x", 1, 100, v, 4, &n), 0);
    cr_assert_neq(ckv_eval_parse_ints("", 1, 100, v, 4, &n), 0);
    cr_assert_eq(ckv_eval_parse_doubles("0.1,0.5,1", 0, 1, d, 4, &n), 0);
    cr_assert_eq(n, 3);
    cr_assert_float_eq(d[1], 0.5, 1e-15);
    cr_assert_neq(ckv_eval_parse_doubles("1.5", 0, 1, d, 4, &n), 0);
    cr_assert_neq(ckv_eval_parse_doubles("nan", 0, 1, d, 4, &n), 0);
}

Test(eval, methods)
{
    struct ckv_eval_method m[8];
    int n;
    char err[256];
    cr_assert_eq(ckv_eval_methods_parse("full,clusterkv-q,clusterkv-kv,quest,streaming", m, 8, &n,
                                        err, sizeof(err)),
                 0);
    cr_assert_eq(n, 5);
    cr_assert_eq(m[1].method, CKV_KV_CLUSTERKV);
    cr_assert_eq(m[1].select_mode, CKV_SELECT_PER_QHEAD);
    cr_assert_eq(m[2].select_mode, CKV_SELECT_KVHEAD_MAX);
    cr_assert_eq(m[3].method, CKV_KV_QUEST);
    cr_assert_eq(m[4].method, CKV_KV_STREAMING);
    cr_assert_eq(ckv_eval_method_parse("clusterkv", &m[0]), 0);
    cr_assert_eq(m[0].select_mode, -1);
    cr_assert_neq(ckv_eval_methods_parse("full,h2o", m, 8, &n, err, sizeof(err)), 0);
    cr_assert_not_null(strstr(err, "h2o"));
}

/* Position of the needle in the filler, as a share of the filler sentences before it. */
static double needle_depth(const char *text, const char *needle, const char *filler)
{
    const char *at = strstr(text, needle);
    cr_assert_not_null(at);
    int before = 0, total = 0;
    for (const char *p = strstr(text, filler); p; p = strstr(p + 1, filler)) {
        total++;
        before += p < at;
    }
    return total ? (double)before / total : 0;
}

Test(eval, passkey_text)
{
    struct ckv_buf p = {0};
    char ans[16];
    const char *filler = "The grass is green.";
    const double depths[] = {0, 0.25, 0.5, 1};
    for (int i = 0; i < 4; i++) {
        struct ckv_eval_needle nd = {.task = CKV_EVAL_PASSKEY, .depth = depths[i], .seed = 3};
        cr_assert_eq(ckv_eval_needle_text(&nd, 40, &p, NULL, ans, sizeof(ans)), 0);
        cr_assert_eq(strlen(ans), 5);
        char needle[64];
        snprintf(needle, sizeof(needle), "The pass key is %s. Remember it. %s is the pass key.",
                 ans, ans);
        cr_assert_float_eq(needle_depth(p.data, needle, filler), depths[i], 1e-9);
        /* asked at the very end, and the key appears nowhere else */
        const char *q = "What is the pass key? The pass key is";
        cr_assert_eq(strcmp(p.data + p.len - strlen(q), q), 0);
        int n_ans = 0;
        for (const char *c = strstr(p.data, ans); c; c = strstr(c + 1, ans))
            n_ans++;
        cr_assert_eq(n_ans, 2);
    }
    /* different seeds, different keys */
    char a2[16];
    struct ckv_eval_needle nd = {.task = CKV_EVAL_PASSKEY, .depth = 0.5, .seed = 4};
    cr_assert_eq(ckv_eval_needle_text(&nd, 4, &p, NULL, a2, sizeof(a2)), 0);
    cr_assert_str_neq(a2, ans);
    nd.depth = 1.5;
    cr_assert_eq(ckv_eval_needle_text(&nd, 4, &p, NULL, a2, sizeof(a2)), -EINVAL);
    ckv_buf_free(&p);
}

Test(eval, copy_text)
{
    struct ckv_buf p = {0}, f = {0};
    struct ckv_eval_needle nd = {.task = CKV_EVAL_COPY, .depth = 0.3, .seed = 11};
    cr_assert_eq(ckv_eval_needle_text(&nd, 20, &p, &f, NULL, 0), 0);
    /* full = prompt + the rest of the list */
    cr_assert(f.len > p.len);
    cr_assert_eq(memcmp(f.data, p.data, p.len), 0);
    const char *list = strstr(p.data, "The list of words is:");
    cr_assert_not_null(list);
    list += strlen("The list of words is:");
    /* the prompt repeats the first CKV_EVAL_COPY_SHOWN words; prompt + continuation = the
     * list */
    const char *tail = strstr(p.data, "The list was:") + strlen("The list was:");
    char listed[512];
    snprintf(listed, sizeof(listed), "%.*s", (int)(strchr(list, '.') - list), list);
    cr_assert_eq(strncmp(listed, tail, strlen(tail)), 0); /* the first words, repeated */
    cr_assert_str_eq(f.data + (tail - p.data), listed);
    int words = 0;
    for (const char *c = listed; *c; c++)
        words += *c == ' ';
    cr_assert_eq(words, CKV_EVAL_COPY_WORDS);
    /* copy needs `full` */
    cr_assert_eq(ckv_eval_needle_text(&nd, 20, &p, NULL, NULL, 0), -EINVAL);
    ckv_buf_free(&p);
    ckv_buf_free(&f);
}

Test(eval, first_number)
{
    char out[16];
    cr_assert_eq(ckv_eval_first_number(" 71432. Remember", 16, out, sizeof(out)), 5);
    cr_assert_str_eq(out, "71432");
    cr_assert_eq(ckv_eval_first_number("is 123 and 456", 14, out, sizeof(out)), 3);
    cr_assert_str_eq(out, "123");
    cr_assert_eq(ckv_eval_first_number("none", 4, out, sizeof(out)), 0);
    cr_assert_str_eq(out, "");
    cr_assert_eq(ckv_eval_first_number("12345678", 8, out, 4), 8); /* truncated, counted */
    cr_assert_str_eq(out, "123");
    cr_assert_eq(ckv_eval_first_number("99", 1, out, sizeof(out)), 1); /* len bounds it */
    cr_assert_str_eq(out, "9");
}

Test(eval, json)
{
    struct ckv_buf b = {0};
    int first = 1;
    ckv_buf_printf(&b, "{");
    ckv_eval_json_num(&b, &first, "ppl_full", 12.5);
    ckv_eval_json_num(&b, &first, "recall", NAN);
    ckv_buf_printf(&b, "\n}");
    cr_assert_str_eq(b.data, "{\n  \"ppl_full\": 12.5,\n  \"recall\": null\n}");
    ckv_buf_free(&b);
}

/* With the model's tokenizer: prompts reach their target length, the copy task's
 * continuation is the listed words. */
Test(eval, prompts_tokenized, .timeout = 60)
{
    const char *model = ckv_test_default_model();
    if (!model) {
        cr_assert_null(getenv("CKV_REQUIRE_MODEL"), "default model missing");
        cr_skip_test("default model not fetched (deploy/fetch-model.sh)");
    }
    gguf_t *g = NULL;
    tokenizer_t *tok = NULL;
    char err[256];
    cr_assert_eq(gguf_open(model, &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(tokenizer_new_from_gguf(g, &tok, err, sizeof(err)), 0, "%s", err);
    const int targets[] = {512, 2048, 4000};
    for (int t = 0; t < 3; t++)
        for (int task = 0; task < 2; task++) {
            struct ckv_eval_needle nd = {.task = task, .depth = 0.5, .seed = 1};
            struct ckv_eval_prompt pr;
            cr_assert_eq(ckv_eval_needle_prompt(tok, &nd, targets[t], &pr, err, sizeof(err)), 0,
                         "%s", err);
            /* as close as a filler sentence (about 25 tokens) allows */
            cr_assert(pr.n <= targets[t] && pr.n > targets[t] - 40, "%d for %d", pr.n, targets[t]);
            if (task == CKV_EVAL_COPY) {
                cr_assert_geq(pr.n_expect, CKV_EVAL_COPY_WORDS - CKV_EVAL_COPY_SHOWN);
                struct ckv_buf txt = {0};
                cr_assert_eq(tokenizer_decode(tok, pr.expect, pr.n_expect, false, &txt), 0);
                int words = 0;
                for (size_t i = 0; i < txt.len; i++)
                    words += txt.data[i] == ' ';
                cr_assert_eq(words, CKV_EVAL_COPY_WORDS - CKV_EVAL_COPY_SHOWN, "'%s'", txt.data);
                ckv_buf_free(&txt);
            } else {
                struct ckv_buf txt = {0};
                cr_assert_eq(tokenizer_decode(tok, pr.tokens, pr.n, false, &txt), 0);
                cr_assert_not_null(strstr(txt.data, pr.answer));
                ckv_buf_free(&txt);
            }
            ckv_eval_prompt_free(&pr);
        }
    struct ckv_eval_prompt pr;
    struct ckv_eval_needle nd = {.task = CKV_EVAL_PASSKEY, .depth = 0.5, .seed = 1};
    cr_assert_eq(ckv_eval_needle_prompt(tok, &nd, 20, &pr, err, sizeof(err)), -EINVAL);
    tokenizer_destroy(&tok);
    gguf_close(&g);
}

/* ---- `ckv eval` as a process, on the model (skipped without it) ---- */

#include <sys/wait.h>

static int run_ckv_eval(const char *log, char *const args[])
{
    char bin[512];
    ckv_test_bin_path("ckv", bin, sizeof(bin));
    char *argv[48] = {bin, "eval"};
    int n = 2;
    for (int i = 0; args[i] && n < 47; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    pid_t pid = ckv_test_spawn(argv, log);
    cr_assert_gt(pid, 0);
    int status;
    cr_assert_eq(ckv_test_wait(pid, 600000, &status), 0, "ckv eval did not finish");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
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

struct ppl_row {
    char method[32];
    int budget;
    long tokens;
    double nll, ppl, rel, top1;
};

static int read_ppl_csv(const char *path, struct ppl_row *rows, int cap)
{
    FILE *f = fopen(path, "r");
    cr_assert(f, "no %s", path);
    char line[1024];
    cr_assert(fgets(line, sizeof(line), f));
    int n = 0;
    while (n < cap && fgets(line, sizeof(line), f)) {
        struct ppl_row *r = &rows[n++];
        /* doc,method,budget,variant,prefill,tokens,mean_nll,ppl,ppl_rel_full,top1,... */
        int got = sscanf(line, "%*[^,],%31[^,],%d,,%*d,%ld,%lf,%lf,%lf,%lf", r->method, &r->budget,
                         &r->tokens, &r->nll, &r->ppl, &r->rel, &r->top1);
        cr_assert_eq(got, 7, "bad CSV line: %s", line);
    }
    fclose(f);
    return n;
}

/* Perplexity of a short text: at a budget above the context every method attends every
 * token, so its perplexity is full attention's; ppl = exp(mean NLL); a tiny budget changes
 * the numbers but keeps them finite. */
Test(eval, ppl_run_invariants, .timeout = 900)
{
    need_model();
    char dir[512], doc[600], out[600], log[600], csv[700], json[700];
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    snprintf(doc, sizeof(doc), "%s/doc.txt", dir);
    snprintf(out, sizeof(out), "%s/out", dir);
    snprintf(log, sizeof(log), "%s/log", dir);
    snprintf(json, sizeof(json), "%s/out.json", dir);
    const char *text =
        "The GNU General Public License is a free, copyleft license for software and other "
        "kinds of works. The licenses for most software and other practical works are designed "
        "to take away your freedom to share and change the works. By contrast, the GNU General "
        "Public License is intended to guarantee your freedom to share and change all versions "
        "of a program--to make sure it remains free software for all its users. We, the Free "
        "Software Foundation, use the GNU General Public License for most of our software; it "
        "applies also to any other work released this way by its authors.";
    cr_assert_eq(ckv_test_write_file(doc, text, strlen(text)), 0);
    /* the engine's default KV options: with other sinks or windows ClusterKV at a budget
     * above the context differs from full attention (docs/EVALUATION.md, "Findings") */
    char *a[] = {"ppl",
                 "--docs",
                 doc,
                 "--ppl-prefill",
                 "24",
                 "--methods",
                 "clusterkv,clusterkv-q,quest,streaming",
                 "--budgets",
                 "8,4096",
                 "--threads",
                 "1",
                 "--out",
                 out,
                 "--json",
                 json,
                 NULL};
    cr_assert_eq(run_ckv_eval(log, a), 0, "ckv eval ppl failed: see %s", log);
    snprintf(csv, sizeof(csv), "%s/ppl.csv", out);
    struct ppl_row r[16];
    int n = read_ppl_csv(csv, r, 16);
    cr_assert_eq(n, 1 + 4 * 2, "full + 4 methods x 2 budgets");
    cr_assert_str_eq(r[0].method, "full");
    cr_assert_gt(r[0].tokens, 50);
    for (int i = 0; i < n; i++) {
        cr_assert_eq(r[i].tokens, r[0].tokens);
        cr_assert(r[i].ppl > 1 && r[i].ppl < 49152, "%s: ppl %g", r[i].method, r[i].ppl);
        cr_assert_float_eq(r[i].ppl, exp(r[i].nll), 1e-3 * r[i].ppl);
        cr_assert(r[i].top1 >= 0 && r[i].top1 <= 1);
        if (r[i].budget == 4096)
            cr_assert(fabs(r[i].rel) < 1e-3, "%s b4096: %+g vs full", r[i].method, r[i].rel);
    }
    /* the JSON carries the headline keys */
    size_t len;
    char *js = ckv_test_read_file(json, &len);
    cr_assert_not_null(js);
    cr_assert_not_null(strstr(js, "\"ppl_full\":"));
    cr_assert_not_null(strstr(js, "\"ppl_clusterkv_b8\":"));
    cr_assert_not_null(strstr(js, "\"ppl_quest_b4096\":"));
    free(js);
    ckv_test_rmrf(dir);
}

/* Bad options exit with status 2 and a message, without loading anything. */
Test(eval, bad_options)
{
    char dir[512], log[600];
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    snprintf(log, sizeof(log), "%s/log", dir);
    char *a1[] = {"ppl", "--methods", "h2o", NULL};
    cr_assert_eq(run_ckv_eval(log, a1), 2);
    char *a2[] = {"ppl", "--budgets", "0,1", NULL};
    cr_assert_eq(run_ckv_eval(log, a2), 2);
    char *a3[] = {"nonsense", NULL};
    cr_assert_eq(run_ckv_eval(log, a3), 2);
    ckv_test_rmrf(dir);
}
