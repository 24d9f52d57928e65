/*
 * ckv eval: does ClusterKV keep the model's quality, and does it beat Quest and StreamingLLM?
 * End-to-end measurements on a real model through the engine (worker/engine.h), each printing
 * a table and writing CSV and PNG plots (gnuplot) under --out:
 *
 *   ckv eval ppl        perplexity of long real documents: the first window is prefilled,
 *                       every later token is decoded through the method (teacher forcing)
 *   ckv eval retrieval  passkey retrieval at several contexts and depths; full attention is
 *                       measured first, and when it cannot find the key the methods are
 *                       compared on the copy task (continue a list of random words seen
 *                       earlier in the context)
 *   ckv eval agree      agreement of greedy decoding with full attention over --steps steps
 *   ckv eval attn       Q/K/V of a full-attention run dumped in-process
 *                       (ckv_engine_seq_dump_qkv), measured by `ckv eval-attn` in-process, for
 *                       all dumped layers together and per layer: attention recall, output
 *                       error, cluster hit rate
 *   ckv eval sweep      ClusterKV parameters at one budget (tokens per cluster, k-means
 *                       iterations, window, sinks, GQA selection mode): attention recall on
 *                       the attn dumps (cheap), and perplexity (--sweep-ppl, a model run)
 *   ckv eval all        all of the above
 *
 * Every method of a comparison decodes the same tokens as one sequence of one batch
 * (ckv_engine_decode), so the matrix products are shared and the numbers come from one run.
 * --quick (with --json FILE) is the short check: perplexity on a 3k-token window of the GPL
 * and attention recall on a short dump, in under two minutes on two cores.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_cmds.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "engine.h"
#include "eval_core.h"

#define MAX_CFGS    64
#define MAX_LIST    16
#define MAX_GEN     256
#define MAX_DOCS    4
#define DEFAULT_DOC "/usr/share/common-licenses/GPL-3"

struct eval_opts {
    char model[512];
    char out[512];
    char json[512];
    bool quick;
    char methods[256];
    char budgets[128];
    char ctx[128];
    char depths[128];
    char docs[1024];
    int task; /* index into task_names */
    char sweep_methods[256];
    char attn_layers[128];
    int ppl_prefill, ppl_max_tokens, steps, gen_tokens, trials, threads, batch, sweep_budget;
    int sweep_tokens, attn_ctx, attn_steps, agree_ctx;
    char sweep_dump[512];
    bool attn_reuse;
    bool sweep_ppl;
    int sinks, window, tokens_per_cluster, window_clusters, kmeans_iters, full_layers;
    char select_mode[16];
};

static const char *const task_names[] = {"auto", "passkey", "copy", "both", NULL};

static const struct ckv_config_opt eval_options[] = {
    CKV_OPT_STRING(
        struct eval_opts, model, "model", "",
        "GGUF model (default: $CKV_MODEL_DIR or ~/.cache/clusterkv/models/" CKV_DEFAULT_MODEL_FILE
        ")"),
    CKV_OPT_STRING(struct eval_opts, out, "out", "out/eval", "directory for CSV, plots, dumps"),
    CKV_OPT_STRING(struct eval_opts, json, "json", "", "also write the headline numbers here"),
    CKV_OPT_BOOL(struct eval_opts, quick, "quick", "no", "the short run (under 2 minutes)"),
    CKV_OPT_STRING(struct eval_opts, methods, "methods", "clusterkv,clusterkv-q,quest,streaming",
                   "methods compared with full attention: clusterkv (engine default selection), "
                   "clusterkv-q, clusterkv-kv, clusterkv-kvsum, quest, streaming"),
    CKV_OPT_STRING(struct eval_opts, budgets, "budgets", "128,256,512,1024", "token budgets"),
    CKV_OPT_STRING(struct eval_opts, ctx, "ctx", "2048,4096,8192",
                   "retrieval: prompt lengths in tokens"),
    CKV_OPT_STRING(struct eval_opts, depths, "depths", "0.1,0.3,0.5,0.7,0.9",
                   "retrieval: needle depths (0 start .. 1 end of the filler)"),
    CKV_OPT_STRING(struct eval_opts, docs, "docs",
                   DEFAULT_DOC ",/usr/lib/python3.11/pydoc_data/topics.py",
                   "ppl/agree: documents, comma-separated"),
    CKV_OPT_ENUM(struct eval_opts, task, "task", "auto", task_names,
                 "retrieval: auto (passkey, and the copy task when full attention fails it), "
                 "passkey, copy, both"),
    CKV_OPT_INT(struct eval_opts, ppl_prefill, "ppl-prefill", "1024", 16, 1 << 20,
                "ppl: tokens prefilled (the first window); the rest is decoded"),
    CKV_OPT_INT(struct eval_opts, ppl_max_tokens, "ppl-tokens", "8192", 64, 1 << 20,
                "ppl: tokens per document at most (the model's context bounds it too)"),
    CKV_OPT_INT(struct eval_opts, steps, "steps", "128", 1, MAX_GEN, "agree: greedy steps"),
    CKV_OPT_INT(struct eval_opts, agree_ctx, "agree-ctx", "6144", 64, 1 << 20,
                "agree: prompt tokens taken from each document"),
    CKV_OPT_INT(struct eval_opts, gen_tokens, "gen-tokens", "8", 1, 64,
                "retrieval: tokens generated for the pass key"),
    CKV_OPT_INT(struct eval_opts, trials, "trials", "1", 1, 100,
                "retrieval: prompts (pass keys) per context and depth"),
    CKV_OPT_INT(struct eval_opts, threads, "threads", "0", 0, 1024, "CPU threads; 0: all"),
    CKV_OPT_INT(struct eval_opts, batch, "batch", "8", 1, 64, "sequences decoded per batch"),
    CKV_OPT_INT(struct eval_opts, sweep_budget, "sweep-budget", "256", 1, 1 << 20,
                "sweep: the budget"),
    CKV_OPT_INT(struct eval_opts, sweep_tokens, "sweep-tokens", "3072", 64, 1 << 20,
                "sweep: tokens of the first document"),
    CKV_OPT_STRING(struct eval_opts, sweep_methods, "sweep-base", "clusterkv",
                   "sweep: the ClusterKV variant the parameters are varied on"),
    CKV_OPT_STRING(struct eval_opts, sweep_dump, "sweep-dump", "",
                   "sweep: Q/K/V dumps for the recall sweep (default: OUT/qkv of `ckv eval attn`)"),
    CKV_OPT_BOOL(struct eval_opts, sweep_ppl, "sweep-ppl", "yes",
                 "sweep: also by perplexity (the model run; the recall sweep reads dumps only)"),
    CKV_OPT_STRING(struct eval_opts, attn_layers, "attn-layers", "2,8,15,22,29",
                   "attn: layers to dump"),
    CKV_OPT_BOOL(struct eval_opts, attn_reuse, "attn-reuse", "no",
                 "attn: measure the dumps already in OUT/qkv instead of making new ones"),
    CKV_OPT_INT(struct eval_opts, attn_ctx, "attn-ctx", "6144", 64, 1 << 20,
                "attn: prompt tokens of the dumped run"),
    CKV_OPT_INT(struct eval_opts, attn_steps, "attn-steps", "64", 1, MAX_GEN,
                "attn: decode steps dumped"),
    CKV_OPT_INT(struct eval_opts, sinks, "sinks", "-1", -1, 1 << 20, "ClusterKV/streaming: sinks"),
    CKV_OPT_INT(struct eval_opts, window, "window", "-1", -1, 1 << 20, "ClusterKV: window"),
    CKV_OPT_INT(struct eval_opts, tokens_per_cluster, "tokens-per-cluster", "-1", -1, 1 << 20,
                "ClusterKV: prompt tokens per cluster"),
    CKV_OPT_INT(struct eval_opts, window_clusters, "window-clusters", "-1", -1, 1 << 20,
                "ClusterKV: clusters per window"),
    CKV_OPT_INT(struct eval_opts, kmeans_iters, "kmeans-iters", "-1", -1, 10000,
                "ClusterKV: k-means iterations"),
    CKV_OPT_INT(struct eval_opts, full_layers, "full-layers", "-1", -1, 1024,
                "first layers in full attention"),
    CKV_OPT_STRING(struct eval_opts, select_mode, "select-mode", "",
                   "selection mode of 'clusterkv' (default: the engine's)"),
    CKV_OPT_END,
};

/* One compared configuration: a method at a budget, with its KV options. */
struct run_cfg {
    char method[24];  /* the eval method name (eval_core.h) */
    char variant[48]; /* sweep: what was changed ("tokens-per-cluster=40"), else "" */
    int budget;       /* 0 for full attention */
    struct ckv_kv_opts kv;
};

/* What one sequence produced. */
struct seq_result {
    struct ckv_eval_ppl ppl; /* NLL of the forced tokens */
    int n_match;             /* forced tokens that were the argmax */
    int32_t gen[MAX_GEN];    /* greedy tokens after the forced ones */
    int n_gen;
    float *nll; /* (n_forced) per position when asked, owned */
    struct ckv_kv_stats kv;
};

/* A prompt, then n_forced tokens fed whatever the model predicts (teacher forcing: their
 * NLL and top-1 hits are counted), then n_free greedy tokens. */
struct job {
    const int32_t *prompt;
    int n_prompt;
    const int32_t *forced;
    int n_forced;
    int n_free;
    int keep_nll;
    const char *what;
    const char *dump_dir; /* attn: Q/K/V of dump_layers written here (first sequence) */
    const int *dump_layers;
    int n_dump_layers;
};

struct eval {
    struct eval_opts o;
    ckv_engine_t *e;
    const tokenizer_t *tok;
    int n_vocab, max_ctx;
    float *logits; /* (batch, n_vocab) */
    struct ckv_kv_opts kv_default;
    struct ckv_buf json;
    int json_first;
    struct ckv_eval_method methods[MAX_LIST];
    int n_methods;
    int budgets[MAX_LIST], n_budgets;
};

/* ---- files and plots ---- */

static int mkdir_p(const char *dir)
{
    char p[512];
    snprintf(p, sizeof(p), "%s", dir);
    for (char *c = p + 1; *c; c++)
        if (*c == '/') {
            *c = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST)
                return -errno;
            *c = '/';
        }
    return mkdir(p, 0755) != 0 && errno != EEXIST ? -errno : 0;
}

static FILE *out_open(const struct eval *E, const char *name, char *path, size_t cap)
{
    snprintf(path, cap, "%s/%s", E->o.out, name);
    FILE *f = fopen(path, "w");
    if (!f)
        fprintf(stderr, "ckv eval: %s: %s\n", path, strerror(errno));
    return f;
}

/* A gnuplot script plotting column ycol against xcol of csv, one line per value of column
 * scol (series[]), only rows where column fcol equals fval (fcol 0: all rows); refs are
 * horizontal lines (full attention). Runs gnuplot when it is installed. */
struct plot {
    const char *name, *csv, *title, *xlabel, *ylabel;
    int xcol, ycol, scol, fcol;
    const char *fval;
    const char *series[MAX_CFGS];
    int n_series;
    const char *ref_name[4];
    double ref[4];
    int n_ref;
    int logx;
};

static void plot_write(const struct eval *E, const struct plot *p)
{
    char gp[700], png[700];
    snprintf(gp, sizeof(gp), "%s/%s.gp", E->o.out, p->name);
    snprintf(png, sizeof(png), "%s/%s.png", E->o.out, p->name);
    FILE *f = fopen(gp, "w");
    if (!f) {
        fprintf(stderr, "ckv eval: %s: %s\n", gp, strerror(errno));
        return;
    }
    fprintf(f, "# written by ckv eval: gnuplot %s\n", gp);
    fprintf(f, "set terminal pngcairo size 900,600 noenhanced\nset output '%s'\n", png);
    fprintf(f, "set datafile separator ','\nset key outside right\nset grid\n");
    if (p->logx)
        fprintf(f, "set logscale x 2\n");
    fprintf(f, "set title \"%s\"\nset xlabel '%s'\nset ylabel '%s'\nplot ", p->title, p->xlabel,
            p->ylabel);
    int first = 1;
    /* rows are selected by awk rather than by gnuplot's `cond ? $x : NaN`, which breaks the
     * line at every row of another series when series are interleaved in the file */
    for (int i = 0; i < p->n_series; i++) {
        char cond[200] = "";
        if (p->fcol)
            snprintf(cond, sizeof(cond), " && $%d==\\\"%s\\\"", p->fcol, p->fval);
        fprintf(f,
                "%s\"< awk -F, '$%d==\\\"%s\\\"%s' %s/%s\" using %d:%d with linespoints lw 2 "
                "title '%s'",
                first ? "" : ", \\\n     ", p->scol, p->series[i], cond, E->o.out, p->csv, p->xcol,
                p->ycol, p->series[i]);
        first = 0;
    }
    for (int i = 0; i < p->n_ref; i++) {
        if (!isfinite(p->ref[i]))
            continue;
        fprintf(f, "%s%.6g with lines dt 2 lw 2 title '%s'", first ? "" : ", \\\n     ", p->ref[i],
                p->ref_name[i]);
        first = 0;
    }
    fprintf(f, "\n");
    fclose(f);
    if (system("command -v gnuplot >/dev/null 2>&1") != 0) {
        fprintf(stderr, "ckv eval: gnuplot not found: run 'gnuplot %s' for the PNG\n", gp);
        return;
    }
    char cmd[800];
    snprintf(cmd, sizeof(cmd), "gnuplot '%s'", gp);
    if (system(cmd) == 0)
        printf("wrote %s\n", png);
    else
        fprintf(stderr, "ckv eval: gnuplot failed on %s\n", gp);
}

/* ---- configurations ---- */

/* The KV options of a method at a budget: the engine's defaults, the command's overrides. */
static int cfg_make(const struct eval *E, const struct ckv_eval_method *m, int budget,
                    struct run_cfg *c)
{
    memset(c, 0, sizeof(*c));
    snprintf(c->method, sizeof(c->method), "%s", m->name);
    c->kv = E->kv_default;
    c->kv.method = m->method;
    c->budget = m->method == CKV_KV_FULL ? 0 : budget;
    if (budget > 0)
        c->kv.budget = budget;
    const struct eval_opts *o = &E->o;
    if (o->sinks >= 0)
        c->kv.sinks = o->sinks;
    if (o->window >= 0)
        c->kv.window = o->window;
    if (o->tokens_per_cluster >= 0)
        c->kv.tokens_per_cluster = o->tokens_per_cluster;
    if (o->window_clusters >= 0)
        c->kv.window_clusters = o->window_clusters;
    if (o->kmeans_iters >= 0)
        c->kv.kmeans_iters = o->kmeans_iters;
    if (o->full_layers >= 0)
        c->kv.full_layers = o->full_layers;
    if (m->select_mode >= 0)
        c->kv.select_mode = (enum ckv_select_mode)m->select_mode;
    else if (o->select_mode[0] && m->method == CKV_KV_CLUSTERKV) {
        enum ckv_select_mode sm;
        if (ckv_select_mode_parse(o->select_mode, &sm)) {
            fprintf(stderr, "ckv eval: --select-mode %s: per-qhead, kvhead-max or kvhead-sum\n",
                    o->select_mode);
            return -EINVAL;
        }
        c->kv.select_mode = sm;
    }
    char err[256];
    if (ckv_kv_opts_check(&c->kv, err, sizeof(err))) {
        fprintf(stderr, "ckv eval: %s b%d: %s\n", m->name, budget, err);
        return -EINVAL;
    }
    return 0;
}

/* full, then every method at every budget. */
static int cfgs_standard(const struct eval *E, struct run_cfg *cfgs, int *n)
{
    struct ckv_eval_method full;
    ckv_eval_method_parse("full", &full);
    *n = 0;
    int rc = cfg_make(E, &full, 0, &cfgs[(*n)++]);
    for (int m = 0; !rc && m < E->n_methods; m++) {
        if (E->methods[m].method == CKV_KV_FULL)
            continue;
        for (int b = 0; !rc && b < E->n_budgets && *n < MAX_CFGS; b++)
            rc = cfg_make(E, &E->methods[m], E->budgets[b], &cfgs[(*n)++]);
    }
    return rc;
}

/* A JSON key: prefix_method_bBUDGET with '-' -> '_' ("ppl_clusterkv_q_b512"). */
static void json_key(char *key, size_t cap, const char *prefix, const char *method, int budget)
{
    if (budget)
        snprintf(key, cap, "%s_%s_b%d", prefix, method, budget);
    else
        snprintf(key, cap, "%s_%s", prefix, method);
    for (char *c = key; *c; c++)
        if (*c == '-')
            *c = '_';
}

static double hit_rate(const struct ckv_kv_stats *s)
{
    uint64_t all = s->cache_hits + s->cache_misses;
    return all ? (double)s->cache_hits / (double)all : NAN;
}

/* ---- running configurations side by side ---- */

static void progress_print(const char *what, int done, int total, uint64_t t0)
{
    double s = ckv_elapsed_s(t0);
    fprintf(stderr, "\r  %s: %d/%d (%.0f s, %.0f s left)   ", what, done, total, s,
            done ? s * (total - done) / done : 0.0);
}

/* Runs job j for every configuration, batch by batch; res[i] gets configuration i's result.
 * Returns 0 or the engine's error (printed). */
static int run_job(struct eval *E, const struct job *j, const struct run_cfg *cfgs, int n_cfg,
                   struct seq_result *res)
{
    const int V = E->n_vocab, total = j->n_forced + j->n_free;
    if (j->n_prompt + total > E->max_ctx || j->n_free > MAX_GEN || total < 1) {
        fprintf(stderr, "ckv eval: %s: %d + %d tokens exceed the context %d\n", j->what,
                j->n_prompt, total, E->max_ctx);
        return -EINVAL;
    }
    memset(res, 0, sizeof(*res) * n_cfg);
    int rc = 0;
    for (int b0 = 0; !rc && b0 < n_cfg; b0 += E->o.batch) {
        int nb = CKV_MIN(E->o.batch, n_cfg - b0), seqs[64], n_live = 0;
        int32_t next[64];
        uint64_t t0 = ckv_now_ns();
        char err[256];
        for (int i = 0; !rc && i < nb; i++) {
            rc = ckv_engine_seq_new(E->e, &cfgs[b0 + i].kv, &seqs[i], err, sizeof(err));
            if (rc) {
                fprintf(stderr, "ckv eval: %s: new sequence: %s\n", j->what, err);
                break;
            }
            n_live++;
            if (j->dump_dir && b0 + i == 0 &&
                ckv_engine_seq_dump_qkv(E->e, seqs[i], j->dump_dir, j->dump_layers,
                                        j->n_dump_layers, err, sizeof(err)) < 0) {
                fprintf(stderr, "ckv eval: %s: --dump-qkv: %s\n", j->what, err);
                rc = -EIO;
                break;
            }
            if (j->keep_nll && !(res[b0 + i].nll = calloc(j->n_forced, sizeof(float))))
                rc = -ENOMEM;
            if (!rc)
                rc = ckv_engine_prefill(E->e, seqs[i], j->prompt, j->n_prompt,
                                        E->logits + (size_t)i * V, NULL, NULL);
            if (rc)
                fprintf(stderr, "ckv eval: %s: prefill: %s\n", j->what, ckv_strerror(rc));
        }
        for (int s = 0; !rc && s < total; s++) {
            for (int i = 0; i < nb; i++) {
                const float *L = E->logits + (size_t)i * V;
                struct seq_result *r = &res[b0 + i];
                int32_t am = ckv_eval_argmax(L, V);
                if (s < j->n_forced) {
                    double nll = ckv_eval_nll(L, V, j->forced[s]);
                    ckv_eval_ppl_add(&r->ppl, nll);
                    if (r->nll)
                        r->nll[s] = (float)nll;
                    r->n_match += am == j->forced[s];
                    next[i] = j->forced[s];
                } else {
                    r->gen[r->n_gen++] = am;
                    next[i] = am;
                }
            }
            if (s == total - 1)
                break;
            rc = ckv_engine_decode(E->e, seqs, next, nb, E->logits);
            if (rc)
                fprintf(stderr, "\nckv eval: %s: decode: %s\n", j->what, ckv_strerror(rc));
            if (total >= 256 && (s + 1) % 256 == 0)
                progress_print(j->what, s + 1, total, t0);
        }
        if (total >= 256)
            fprintf(stderr, "\r  %s: %d sequences, %d + %d tokens, %.1f s%30s\n", j->what, nb,
                    j->n_prompt, total, ckv_elapsed_s(t0), "");
        for (int i = 0; i < n_live; i++) {
            ckv_kvcache_stats(ckv_engine_seq_kv(E->e, seqs[i]), &res[b0 + i].kv);
            ckv_engine_seq_free(E->e, seqs[i]);
        }
    }
    return rc;
}

static void results_free(struct seq_result *res, int n)
{
    for (int i = 0; i < n; i++)
        free(res[i].nll), res[i].nll = NULL;
}

/* ---- documents ---- */

struct doc {
    char path[512], name[64];
    int32_t *tokens;
    int n;
};

static int docs_load(struct eval *E, struct doc *docs, int *n_docs, int max_tokens)
{
    char buf[1024];
    snprintf(buf, sizeof(buf), "%s", E->o.docs);
    *n_docs = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t && *n_docs < MAX_DOCS;
         t = strtok_r(NULL, ",", &save)) {
        struct doc *d = &docs[*n_docs];
        memset(d, 0, sizeof(*d));
        snprintf(d->path, sizeof(d->path), "%s", t);
        const char *base = strrchr(t, '/') ? strrchr(t, '/') + 1 : t;
        snprintf(d->name, sizeof(d->name), "%s", base);
        FILE *f = fopen(t, "rb");
        if (!f) {
            fprintf(stderr, "ckv eval: document %s: %s\n", t, strerror(errno));
            return -errno;
        }
        struct ckv_buf text = {0};
        char chunk[65536];
        size_t k;
        while ((k = fread(chunk, 1, sizeof(chunk), f)) > 0 && text.len < (1u << 24))
            ckv_buf_append(&text, chunk, k);
        fclose(f);
        int rc = tokenizer_encode_alloc(E->tok, text.data ? text.data : "", text.len, true, false,
                                        &d->tokens, &d->n);
        ckv_buf_free(&text);
        if (rc) {
            fprintf(stderr, "ckv eval: document %s: %s\n", t, ckv_strerror(rc));
            return rc;
        }
        int full_n = d->n;
        if (d->n > max_tokens)
            d->n = max_tokens;
        if (d->n > E->max_ctx)
            d->n = E->max_ctx;
        fprintf(stderr, "document %s: %d tokens, %d used\n", d->name, full_n, d->n);
        (*n_docs)++;
    }
    return *n_docs ? 0 : -EINVAL;
}

static void docs_free(struct doc *docs, int n)
{
    for (int i = 0; i < n; i++)
        free(docs[i].tokens);
}

/* ---- ppl ---- */

/* Perplexity of docs under every configuration; writes ppl.csv, ppl-position.csv and the
 * plots, prints the table. prefix names the files ("ppl", "sweep"). */
static int ppl_run(struct eval *E, const char *prefix, struct doc *docs, int n_docs,
                   struct run_cfg *cfgs, int n_cfg, int json_all)
{
    char path[700], lbl[128], key[128];
    snprintf(lbl, sizeof(lbl), "%s.csv", prefix);
    FILE *f = out_open(E, lbl, path, sizeof(path));
    snprintf(lbl, sizeof(lbl), "%s-position.csv", prefix);
    char ppath[700];
    FILE *fp = out_open(E, lbl, ppath, sizeof(ppath));
    if (!f || !fp) {
        if (f)
            fclose(f);
        if (fp)
            fclose(fp);
        return -EIO;
    }
    fprintf(f, "doc,method,budget,variant,prefill,tokens,mean_nll,ppl,ppl_rel_full,top1_agree_"
               "truth,cache_hit_rate,attended_per_call\n");
    fprintf(fp, "doc,method,budget,variant,position,ppl\n");
    struct seq_result *res = calloc(n_cfg, sizeof(*res));
    double *sum_rel = calloc(n_cfg, sizeof(double)), *sum_ppl = calloc(n_cfg, sizeof(double));
    double full_ppl[MAX_DOCS];
    int rc = res && sum_rel && sum_ppl ? 0 : -ENOMEM, done_docs = 0;
    for (int d = 0; !rc && d < n_docs; d++) {
        int P = CKV_MIN(E->o.ppl_prefill, docs[d].n - 2);
        struct job j = {.prompt = docs[d].tokens,
                        .n_prompt = P,
                        .forced = docs[d].tokens + P,
                        .n_forced = docs[d].n - P,
                        .keep_nll = 1,
                        .what = docs[d].name};
        printf("\n%s: %s, %d tokens, the first %d prefilled, %d decoded through the method\n\n",
               prefix, docs[d].name, docs[d].n, P, docs[d].n - P);
        if ((rc = run_job(E, &j, cfgs, n_cfg, res)))
            break;
        double full = ckv_eval_ppl_value(&res[0].ppl); /* cfgs[0] is full attention */
        full_ppl[d] = full;
        printf("| method | budget | %sppl | vs full | top-1 = text | cache hit rate | attended "
               "|\n|---|---|%s---|---|---|---|---|\n",
               cfgs[0].variant[0] || n_cfg > 1 ? "variant | " : "", "---|");
        for (int i = 0; i < n_cfg; i++) {
            const struct seq_result *r = &res[i];
            double ppl = ckv_eval_ppl_value(&r->ppl), rel = ppl / full - 1;
            double hr = hit_rate(&r->kv);
            double att = r->kv.decode_attn_calls
                             ? (double)r->kv.attended_tokens / (double)r->kv.decode_attn_calls
                             : NAN;
            fprintf(f, "%s,%s,%d,%s,%d,%ld,%.6f,%.5f,%.6f,%.5f,%.4f,%.1f\n", docs[d].name,
                    cfgs[i].method, cfgs[i].budget, cfgs[i].variant, P, r->ppl.n,
                    r->ppl.nll_sum / r->ppl.n, ppl, rel, (double)r->n_match / r->ppl.n, hr, att);
            char hr_s[16] = "-"; /* no cluster lookups (full, quest, streaming) */
            if (!isnan(hr))
                snprintf(hr_s, sizeof(hr_s), "%.3f", hr);
            printf("| %s | %d | %s | %.4f | %+.2f%% | %.4f | %s | %.0f |\n", cfgs[i].method,
                   cfgs[i].budget, cfgs[i].variant[0] ? cfgs[i].variant : "-", ppl, 100 * rel,
                   (double)r->n_match / r->ppl.n, hr_s, att);
            sum_rel[i] += rel;
            sum_ppl[i] += log(ppl);
            /* perplexity by position, in slices of 512 tokens */
            for (int s0 = 0; s0 < j.n_forced; s0 += 512) {
                int s1 = CKV_MIN(s0 + 512, j.n_forced);
                double sum = 0;
                for (int s = s0; s < s1; s++)
                    sum += r->nll[s];
                fprintf(fp, "%s,%s,%d,%s,%d,%.5f\n", docs[d].name, cfgs[i].method, cfgs[i].budget,
                        cfgs[i].variant, P + s1, exp(sum / (s1 - s0)));
            }
        }
        results_free(res, n_cfg);
        fflush(f);
        fflush(fp);
        done_docs++;
    }
    fclose(f);
    fclose(fp);
    if (!rc && done_docs) {
        printf("\nwrote %s and %s\n", path, ppath);
        /* the headline: geometric mean over documents */
        for (int i = 0; i < n_cfg && json_all; i++) {
            json_key(key, sizeof(key), prefix, cfgs[i].method, cfgs[i].budget);
            ckv_eval_json_num(&E->json, &E->json_first, key, exp(sum_ppl[i] / done_docs));
            if (cfgs[i].kv.method == CKV_KV_CLUSTERKV) {
                json_key(key, sizeof(key), "cache_hit", cfgs[i].method, cfgs[i].budget);
                ckv_eval_json_num(&E->json, &E->json_first, key, hit_rate(&res[i].kv));
            }
        }
        /* plots: ppl against budget per method (full as a line), per document */
        for (int d = 0; d < done_docs && strcmp(prefix, "ppl") == 0; d++) {
            struct plot p = {.csv = "ppl.csv",
                             .xcol = 3,
                             .ycol = 8,
                             .scol = 2,
                             .fcol = 1,
                             .fval = docs[d].name,
                             .xlabel = "token budget",
                             .ylabel = "perplexity",
                             .logx = 1};
            char name[128], title[256];
            snprintf(name, sizeof(name), "ppl-%d", d);
            snprintf(title, sizeof(title), "Perplexity of %s (%d tokens, first %d prefilled)",
                     docs[d].name, docs[d].n, CKV_MIN(E->o.ppl_prefill, docs[d].n - 2));
            p.name = name;
            p.title = title;
            for (int m = 0; m < E->n_methods; m++)
                if (E->methods[m].method != CKV_KV_FULL)
                    p.series[p.n_series++] = E->methods[m].name;
            p.ref_name[0] = "full";
            p.ref[0] = full_ppl[d];
            p.n_ref = 1;
            plot_write(E, &p);
        }
    }
    free(res), free(sum_rel), free(sum_ppl);
    return rc;
}

static int cmd_ppl(struct eval *E)
{
    struct doc docs[MAX_DOCS];
    int n_docs = 0;
    int rc = docs_load(E, docs, &n_docs, E->o.ppl_max_tokens);
    struct run_cfg cfgs[MAX_CFGS];
    int n_cfg = 0;
    if (!rc)
        rc = cfgs_standard(E, cfgs, &n_cfg);
    if (!rc)
        rc = ppl_run(E, "ppl", docs, n_docs, cfgs, n_cfg, 1);
    docs_free(docs, n_docs);
    return rc;
}

/* ---- retrieval ---- */

/* One task over contexts x depths x trials for cfgs; writes retrieval-TASK.csv, prints the
 * accuracy table, adds JSON keys and returns full attention's accuracy in *full_acc. */
static int retrieval_task(struct eval *E, enum ckv_eval_task task, const struct run_cfg *cfgs,
                          int n_cfg, double *full_acc)
{
    int ctxs[MAX_LIST], n_ctx;
    double depths[MAX_LIST];
    int n_depth;
    if (ckv_eval_parse_ints(E->o.ctx, 64, 1 << 20, ctxs, MAX_LIST, &n_ctx) ||
        ckv_eval_parse_doubles(E->o.depths, 0, 1, depths, MAX_LIST, &n_depth)) {
        fprintf(stderr, "ckv eval: --ctx takes token counts, --depths values in [0, 1]\n");
        return -EINVAL;
    }
    const char *tname = ckv_eval_task_name(task);
    char path[700], name[64], err[256], key[128];
    snprintf(name, sizeof(name), "retrieval-%s.csv", tname);
    FILE *f = out_open(E, name, path, sizeof(path));
    if (!f)
        return -EIO;
    fprintf(f, "task,ctx,depth,trial,method,budget,score,expected,output\n");
    /* score sums per (ctx, cfg) */
    double *score = calloc((size_t)n_ctx * n_cfg, sizeof(double));
    struct seq_result *res = calloc(n_cfg, sizeof(*res));
    int rc = score && res ? 0 : -ENOMEM, n_per_ctx = n_depth * E->o.trials;
    uint64_t t0 = ckv_now_ns();
    printf("\nretrieval (%s): contexts %s, depths %s, %d trial(s) each, %d configurations\n", tname,
           E->o.ctx, E->o.depths, E->o.trials, n_cfg);
    for (int c = 0; !rc && c < n_ctx; c++) {
        for (int dd = 0; !rc && dd < n_depth; dd++) {
            for (int t = 0; !rc && t < E->o.trials; t++) {
                struct ckv_eval_needle nd = {
                    .task = task, .depth = depths[dd], .seed = (uint64_t)(c * 1000 + dd * 10 + t)};
                struct ckv_eval_prompt pr;
                int gen = task == CKV_EVAL_PASSKEY ? E->o.gen_tokens : 0;
                int target = CKV_MIN(ctxs[c], E->max_ctx) - gen - 24;
                rc = ckv_eval_needle_prompt(E->tok, &nd, target, &pr, err, sizeof(err));
                if (rc) {
                    fprintf(stderr, "ckv eval: %s\n", err);
                    break;
                }
                char what[96];
                snprintf(what, sizeof(what), "%s ctx %d depth %.2f", tname, ctxs[c], depths[dd]);
                struct job j = {.prompt = pr.tokens,
                                .n_prompt = pr.n,
                                .forced = pr.expect,
                                .n_forced = pr.n_expect,
                                .n_free = gen,
                                .what = what};
                uint64_t t1 = ckv_now_ns();
                rc = run_job(E, &j, cfgs, n_cfg, res);
                for (int i = 0; !rc && i < n_cfg; i++) {
                    double s;
                    struct ckv_buf txt = {0};
                    char num[32] = "";
                    if (task == CKV_EVAL_PASSKEY) {
                        tokenizer_decode(E->tok, res[i].gen, res[i].n_gen, false, &txt);
                        ckv_eval_first_number(txt.data ? txt.data : "", txt.len, num, sizeof(num));
                        s = strcmp(num, pr.answer) == 0;
                    } else {
                        s = (double)res[i].n_match / pr.n_expect;
                        snprintf(num, sizeof(num), "%d/%d", res[i].n_match, pr.n_expect);
                    }
                    score[(size_t)c * n_cfg + i] += s;
                    fprintf(f, "%s,%d,%.2f,%d,%s,%d,%.4f,%s,%s\n", tname, ctxs[c], depths[dd], t,
                            cfgs[i].method, cfgs[i].budget, s,
                            task == CKV_EVAL_PASSKEY ? pr.answer : "-", num);
                    ckv_buf_free(&txt);
                }
                fflush(f);
                fprintf(stderr, "  %s: %d tokens, %.1f s (total %.0f s)\n", what, pr.n,
                        ckv_elapsed_s(t1), ckv_elapsed_s(t0));
                ckv_eval_prompt_free(&pr);
            }
        }
    }
    fclose(f);
    if (!rc) {
        printf("\n%s accuracy (%s), mean over %d depths x %d trials\n\n| method | budget |", tname,
               task == CKV_EVAL_PASSKEY ? "share of pass keys found"
                                        : "share of list "
                                          "tokens predicted",
               n_depth, E->o.trials);
        for (int c = 0; c < n_ctx; c++)
            printf(" ctx %d |", ctxs[c]);
        printf(" mean |\n|---|---|");
        for (int c = 0; c <= n_ctx; c++)
            printf("---|");
        printf("\n");
        /* a summary CSV for the plot */
        snprintf(name, sizeof(name), "retrieval-%s-summary.csv", tname);
        char spath[700];
        FILE *fs = out_open(E, name, spath, sizeof(spath));
        if (fs)
            fprintf(fs, "task,method,budget,ctx,accuracy\n");
        for (int i = 0; i < n_cfg; i++) {
            printf("| %s | %d |", cfgs[i].method, cfgs[i].budget);
            double all = 0;
            for (int c = 0; c < n_ctx; c++) {
                double a = score[(size_t)c * n_cfg + i] / n_per_ctx;
                all += a;
                printf(" %.2f |", a);
                if (fs)
                    fprintf(fs, "%s,%s,%d,%d,%.4f\n", tname, cfgs[i].method, cfgs[i].budget,
                            ctxs[c], a);
            }
            all /= n_ctx;
            if (fs)
                fprintf(fs, "%s,%s,%d,all,%.4f\n", tname, cfgs[i].method, cfgs[i].budget, all);
            printf(" %.2f |\n", all);
            json_key(key, sizeof(key), task == CKV_EVAL_PASSKEY ? "passkey" : "copy",
                     cfgs[i].method, cfgs[i].budget);
            ckv_eval_json_num(&E->json, &E->json_first, key, all);
            if (i == 0)
                *full_acc = all;
        }
        if (fs)
            fclose(fs);
        printf("\nwrote %s\n", path);
        if (n_cfg > 1) {
            struct plot p = {.csv = name,
                             .xcol = 3,
                             .ycol = 5,
                             .scol = 2,
                             .fcol = 4,
                             .fval = "all",
                             .xlabel = "token budget",
                             .ylabel = "accuracy (mean over contexts and depths)",
                             .logx = 1};
            char pname[64], title[200];
            snprintf(pname, sizeof(pname), "retrieval-%s", tname);
            snprintf(title, sizeof(title), "%s retrieval, contexts %s", tname, E->o.ctx);
            p.name = pname;
            p.title = title;
            for (int m = 0; m < E->n_methods; m++)
                if (E->methods[m].method != CKV_KV_FULL)
                    p.series[p.n_series++] = E->methods[m].name;
            p.ref_name[0] = "full";
            p.ref[0] = *full_acc;
            p.n_ref = 1;
            plot_write(E, &p);
        }
    }
    free(score);
    free(res);
    return rc;
}

static int cmd_retrieval(struct eval *E)
{
    struct run_cfg cfgs[MAX_CFGS];
    int n_cfg = 0, rc = cfgs_standard(E, cfgs, &n_cfg);
    double full_acc = 0;
    enum { T_AUTO, T_PASSKEY, T_COPY, T_BOTH } t = E->o.task;
    if (rc)
        return rc;
    if (t == T_PASSKEY || t == T_BOTH)
        rc = retrieval_task(E, CKV_EVAL_PASSKEY, cfgs, n_cfg, &full_acc);
    if (!rc && t == T_AUTO) {
        /* full attention first: compare the methods on the pass key only if the model can
         * find it */
        rc = retrieval_task(E, CKV_EVAL_PASSKEY, cfgs, 1, &full_acc);
        if (!rc && full_acc >= 0.8) {
            printf("full attention finds %.0f%% of the pass keys: methods compared on it\n",
                   100 * full_acc);
            rc = retrieval_task(E, CKV_EVAL_PASSKEY, cfgs, n_cfg, &full_acc);
        } else if (!rc) {
            printf("full attention finds only %.0f%% of the pass keys: methods compared on the "
                   "copy task\n",
                   100 * full_acc);
            t = T_COPY;
        }
    }
    if (!rc && (t == T_COPY || t == T_BOTH))
        rc = retrieval_task(E, CKV_EVAL_COPY, cfgs, n_cfg, &full_acc);
    return rc;
}

/* ---- agreement ---- */

static int cmd_agree(struct eval *E)
{
    struct doc docs[MAX_DOCS];
    int n_docs = 0, n_cfg = 0;
    int rc = docs_load(E, docs, &n_docs, E->o.agree_ctx);
    struct run_cfg cfgs[MAX_CFGS];
    if (!rc)
        rc = cfgs_standard(E, cfgs, &n_cfg);
    char path[700], key[128];
    FILE *f = rc ? NULL : out_open(E, "agree.csv", path, sizeof(path));
    if (!rc && !f)
        rc = -EIO;
    struct seq_result *res = calloc(MAX_CFGS, sizeof(*res));
    double *agree = calloc(MAX_CFGS, sizeof(double)), *prefix = calloc(MAX_CFGS, sizeof(double));
    if (!rc && (!res || !agree || !prefix))
        rc = -ENOMEM;
    if (f)
        fprintf(f, "doc,prompt,method,budget,steps,agree,first_divergence\n");
    for (int d = 0; !rc && d < n_docs; d++) {
        int n = CKV_MIN(docs[d].n, E->max_ctx - E->o.steps);
        struct job j = {
            .prompt = docs[d].tokens, .n_prompt = n, .n_free = E->o.steps, .what = docs[d].name};
        if ((rc = run_job(E, &j, cfgs, n_cfg, res)))
            break;
        for (int i = 0; i < n_cfg; i++) {
            int same = 0, first = -1;
            for (int s = 0; s < E->o.steps; s++) {
                if (res[i].gen[s] == res[0].gen[s])
                    same++;
                else if (first < 0)
                    first = s;
            }
            if (first < 0)
                first = E->o.steps;
            agree[i] += (double)same / E->o.steps / n_docs;
            prefix[i] += (double)first / n_docs;
            fprintf(f, "%s,%d,%s,%d,%d,%.4f,%d\n", docs[d].name, n, cfgs[i].method, cfgs[i].budget,
                    E->o.steps, (double)same / E->o.steps, first);
        }
        fflush(f);
        fprintf(stderr, "  agree %s: %d-token prompt done\n", docs[d].name, n);
    }
    if (f)
        fclose(f);
    if (!rc) {
        printf("\nagreement of greedy decoding with full attention: %d steps after prompts of "
               "%d tokens of %d documents\n\n| method | budget | identical tokens | identical "
               "prefix (steps) |\n|---|---|---|---|\n",
               E->o.steps, E->o.agree_ctx, n_docs);
        FILE *fs = out_open(E, "agree-summary.csv", path, sizeof(path));
        if (fs)
            fprintf(fs, "method,budget,agree,prefix\n");
        for (int i = 0; i < n_cfg; i++) {
            printf("| %s | %d | %.3f | %.1f |\n", cfgs[i].method, cfgs[i].budget, agree[i],
                   prefix[i]);
            if (fs)
                fprintf(fs, "%s,%d,%.4f,%.2f\n", cfgs[i].method, cfgs[i].budget, agree[i],
                        prefix[i]);
            if (i > 0) {
                json_key(key, sizeof(key), "agree", cfgs[i].method, cfgs[i].budget);
                ckv_eval_json_num(&E->json, &E->json_first, key, agree[i]);
            }
        }
        if (fs) {
            fclose(fs);
            struct plot p = {.name = "agree",
                             .csv = "agree-summary.csv",
                             .title = "Greedy decoding: share of tokens identical to full "
                                      "attention's",
                             .xlabel = "token budget",
                             .ylabel = "identical tokens",
                             .xcol = 2,
                             .ycol = 3,
                             .scol = 1,
                             .logx = 1};
            for (int m = 0; m < E->n_methods; m++)
                if (E->methods[m].method != CKV_KV_FULL)
                    p.series[p.n_series++] = E->methods[m].name;
            plot_write(E, &p);
        }
    }
    free(res), free(agree), free(prefix);
    docs_free(docs, n_docs);
    return rc;
}

/* ---- attention recall on real Q/K/V ---- */

/* Reads eval-attn.csv: adds recall_METHOD_bB and attn_err_... for every row. */
static int attn_read_csv(struct eval *E, const char *csv)
{
    FILE *f = fopen(csv, "r");
    if (!f) {
        fprintf(stderr, "ckv eval: %s: %s\n", csv, strerror(errno));
        return -errno;
    }
    char line[1024], key[128];
    const char *dflt = E->kv_default.select_mode == CKV_SELECT_PER_QHEAD    ? "clusterkv-q"
                       : E->kv_default.select_mode == CKV_SELECT_KVHEAD_MAX ? "clusterkv-kv"
                                                                            : "clusterkv-kvsum";
    if (!fgets(line, sizeof(line), f)) {
        fclose(f);
        return -EINVAL;
    }
    while (fgets(line, sizeof(line), f)) {
        char method[64];
        int budget;
        double att, recall, err, hit_u;
        if (sscanf(line, "%63[^,],%d,%lf,%lf,%lf,%*[^,],%lf", method, &budget, &att, &recall, &err,
                   &hit_u) != 6)
            continue;
        json_key(key, sizeof(key), "recall", method, budget);
        ckv_eval_json_num(&E->json, &E->json_first, key, recall);
        json_key(key, sizeof(key), "attn_err", method, budget);
        ckv_eval_json_num(&E->json, &E->json_first, key, err);
        if (strcmp(method, dflt) == 0) {
            json_key(key, sizeof(key), "recall", "clusterkv", budget);
            ckv_eval_json_num(&E->json, &E->json_first, key, recall);
        }
    }
    fclose(f);
    return 0;
}

/* Runs `ckv eval-attn` in-process with its table and plot output silenced (stdout to
 * /dev/null). Returns its exit status. */
static int eval_attn_quiet(char **argv, int argc)
{
    fflush(stdout);
    int saved = dup(STDOUT_FILENO);
    FILE *null = fopen("/dev/null", "w");
    if (saved >= 0 && null)
        dup2(fileno(null), STDOUT_FILENO);
    int st = ckv_cmd_eval_attn(argc, argv);
    fflush(stdout);
    if (saved >= 0) {
        dup2(saved, STDOUT_FILENO);
        close(saved);
    }
    if (null)
        fclose(null);
    return st;
}

/* Dumps Q/K/V of a full-attention run (greedy, --attn-steps steps after the first
 * --attn-ctx tokens of the first document; the engine's own dump, docs/QKV_DUMP.md), then
 * runs `ckv eval-attn` in-process on the dumps with the engine's ClusterKV parameters. */
static int cmd_attn(struct eval *E, const char *budgets)
{
    char dump[600], outdir[600], cmd[1300];
    snprintf(dump, sizeof(dump), "%s/qkv", E->o.out);
    snprintf(outdir, sizeof(outdir), "%s/attn", E->o.out);
    int rc = mkdir_p(dump);
    if (!rc)
        rc = mkdir_p(outdir);
    if (rc) {
        fprintf(stderr, "ckv eval: %s: %s\n", dump, strerror(-rc));
        return rc;
    }
    int layers[64], n_layers;
    if (ckv_eval_parse_ints(E->o.attn_layers, 0, ckv_engine_info(E->e)->n_layers - 1, layers, 64,
                            &n_layers)) {
        fprintf(stderr, "ckv eval: --attn-layers: layer indices below %d\n",
                ckv_engine_info(E->e)->n_layers);
        return -EINVAL;
    }
    if (E->o.attn_reuse)
        goto measure;
    /* old dumps would be averaged in */
    snprintf(cmd, sizeof(cmd), "rm -f '%s'/layer-*.qkv", dump);
    if (system(cmd) != 0)
        fprintf(stderr, "ckv eval: could not clear %s\n", dump);
    struct doc docs[MAX_DOCS];
    int n_docs = 0;
    if ((rc = docs_load(E, docs, &n_docs, E->o.attn_ctx)))
        return rc;
    struct run_cfg full;
    struct ckv_eval_method mf;
    ckv_eval_method_parse("full", &mf);
    struct seq_result *res = calloc(1, sizeof(*res));
    rc = res ? cfg_make(E, &mf, 0, &full) : -ENOMEM;
    struct job j = {.prompt = docs[0].tokens,
                    .n_prompt = CKV_MIN(docs[0].n, E->max_ctx - E->o.attn_steps),
                    .n_free = CKV_MIN(E->o.attn_steps, MAX_GEN),
                    .what = "attn dump",
                    .dump_dir = dump,
                    .dump_layers = layers,
                    .n_dump_layers = n_layers};
    uint64_t t0 = ckv_now_ns();
    if (!rc)
        rc = run_job(E, &j, &full, 1, res);
    free(res);
    docs_free(docs, n_docs);
    if (rc)
        return rc;
    fprintf(stderr, "attn: dumped layers %s of %s (%d + %d tokens) in %.1f s\n", E->o.attn_layers,
            docs[0].name, j.n_prompt, j.n_free, ckv_elapsed_s(t0));
measure:;
    /* ckv eval-attn in-process, with the engine's ClusterKV parameters */
    char a_sinks[16], a_window[16], a_tpc[16], a_wc[16], a_it[16], a_th[16];
    struct run_cfg c;
    struct ckv_eval_method m;
    ckv_eval_method_parse("clusterkv", &m);
    if ((rc = cfg_make(E, &m, 256, &c)))
        return rc;
    snprintf(a_sinks, sizeof(a_sinks), "%d", c.kv.sinks);
    snprintf(a_window, sizeof(a_window), "%d", c.kv.window);
    snprintf(a_tpc, sizeof(a_tpc), "%d", c.kv.tokens_per_cluster);
    snprintf(a_wc, sizeof(a_wc), "%d", c.kv.window_clusters);
    snprintf(a_it, sizeof(a_it), "%d", c.kv.kmeans_iters);
    snprintf(a_th, sizeof(a_th), "%d", E->o.threads);
    char b_arg[128];
    snprintf(b_arg, sizeof(b_arg), "%s", budgets);
    char *argv[] = {"eval-attn", "--dump",
                    dump,        "--out",
                    outdir,      "--budgets",
                    b_arg,       "--sinks",
                    a_sinks,     "--window",
                    a_window,    "--tokens-per-cluster",
                    a_tpc,       "--window-clusters",
                    a_wc,        "--kmeans-iter",
                    a_it,        "--threads",
                    a_th,        NULL};
    fflush(stdout);
    int st = ckv_cmd_eval_attn((int)(sizeof(argv) / sizeof(argv[0])) - 1, argv);
    fflush(stdout);
    if (st != 0)
        return -EIO;
    char csv[700];
    snprintf(csv, sizeof(csv), "%s/eval-attn.csv", outdir);
    if ((rc = attn_read_csv(E, csv)))
        return rc;
    /* per layer: eval-attn on each dump file alone */
    char path[700];
    FILE *f = out_open(E, "attn-layers.csv", path, sizeof(path));
    if (!f)
        return -EIO;
    fprintf(f, "layer,method,budget,recall,out_rel_err,hit_rate_units\n");
    printf("\nper layer (recall / output error at each budget of --budgets)\n\n| layer | method |"
           " recall | output rel. error | hit rate (units) |\n|---|---|---|---|---|\n");
    for (int i = 0; i < n_layers; i++) {
        char file[700], lout[640], line[1024];
        snprintf(file, sizeof(file), "%s/layer-%02d.qkv", dump, layers[i]);
        snprintf(lout, sizeof(lout), "%s/layer-%02d", outdir, layers[i]);
        if (access(file, R_OK) != 0 || mkdir_p(lout) != 0)
            continue;
        argv[2] = file;
        argv[4] = lout;
        if (eval_attn_quiet(argv, (int)(sizeof(argv) / sizeof(argv[0])) - 1) != 0) {
            fclose(f);
            return -EIO;
        }
        snprintf(csv, sizeof(csv), "%s/eval-attn.csv", lout);
        FILE *c = fopen(csv, "r");
        char cur[64] = "";
        while (c && fgets(line, sizeof(line), c)) {
            char method[64];
            int b;
            double att, r, err, hu;
            if (sscanf(line, "%63[^,],%d,%lf,%lf,%lf,%*[^,],%lf", method, &b, &att, &r, &err,
                       &hu) != 6)
                continue;
            fprintf(f, "%d,%s,%d,%.6f,%.6f,%.4f\n", layers[i], method, b, r, err, hu);
            if (strcmp(cur, method) != 0) {
                if (cur[0])
                    printf(" |\n");
                printf("| %d | %s |", layers[i], method);
                snprintf(cur, sizeof(cur), "%s", method);
            }
            printf(" b%d %.3f / %.3f / %.2f", b, r, err, hu);
        }
        if (cur[0])
            printf(" |\n");
        if (c)
            fclose(c);
        fflush(stdout);
    }
    fclose(f);
    printf("\nwrote %s\n", path);
    return 0;
}

/* ---- parameter sweep ---- */

/* The recall sweep: attention recall at the sweep budget on real Q/K/V dumps, one ClusterKV
 * parameter varied at a time around the engine's defaults (ckv eval-attn replays the
 * selection on the dumps: no model run). Writes sweep-recall.csv and a plot per parameter. */
static int sweep_recall(struct eval *E, const char *dump, const struct run_cfg *def)
{
    static const char *const params[] = {"tokens-per-cluster", "kmeans-iter", "window", "sinks"};
    static const int values[4][5] = {
        {20, 40, 80, 160, 320}, {1, 5, 10, 20, 50}, {64, 160, 320, 640, 0}, {0, 4, 16, 64, 0}};
    const int n_values[4] = {5, 5, 4, 4};
    char path[700], outdir[700], budget[16], th[16];
    FILE *f = out_open(E, "sweep-recall.csv", path, sizeof(path));
    if (!f)
        return -EIO;
    fprintf(f, "param,value,method,budget,recall,out_rel_err,hit_rate_units\n");
    snprintf(budget, sizeof(budget), "%d", E->o.sweep_budget);
    snprintf(th, sizeof(th), "%d", E->o.threads);
    printf("\nrecall sweep on the dumps in %s at budget %s (ckv eval-attn; one parameter "
           "varied, the others at the defaults)\n\n| parameter | value | clusterkv-q | "
           "clusterkv-kv | clusterkv-kvsum | quest | hit rate (kvsum) |\n"
           "|---|---|---|---|---|---|---|\n",
           dump, budget);
    int rc = 0;
    for (int p = 0; !rc && p < 4; p++) {
        for (int v = 0; !rc && v < n_values[p]; v++) {
            int val[4] = {def->kv.tokens_per_cluster, def->kv.kmeans_iters, def->kv.window,
                          def->kv.sinks};
            val[p] = values[p][v];
            char a[4][16], wc[16];
            for (int k = 0; k < 4; k++)
                snprintf(a[k], sizeof(a[k]), "%d", val[k]);
            snprintf(wc, sizeof(wc), "%d", def->kv.window_clusters);
            snprintf(outdir, sizeof(outdir), "%s/sweep-attn/%s-%d", E->o.out, params[p],
                     values[p][v]);
            if ((rc = mkdir_p(outdir)))
                break;
            char *argv[] = {"eval-attn",
                            "--dump",
                            (char *)dump,
                            "--out",
                            outdir,
                            "--budgets",
                            budget,
                            "--methods",
                            "clusterkv-q,clusterkv-kv,clusterkv-kvsum,quest",
                            "--tokens-per-cluster",
                            a[0],
                            "--kmeans-iter",
                            a[1],
                            "--window",
                            a[2],
                            "--sinks",
                            a[3],
                            "--window-clusters",
                            wc,
                            "--threads",
                            th,
                            NULL};
            uint64_t t0 = ckv_now_ns();
            if (eval_attn_quiet(argv, (int)(sizeof(argv) / sizeof(argv[0])) - 1) != 0) {
                rc = -EIO;
                break;
            }
            char csv[800], line[1024];
            snprintf(csv, sizeof(csv), "%s/eval-attn.csv", outdir);
            FILE *c = fopen(csv, "r");
            double rec[4] = {NAN, NAN, NAN, NAN}, hit = NAN;
            static const char *const ms[] = {"clusterkv-q", "clusterkv-kv", "clusterkv-kvsum",
                                             "quest"};
            while (c && fgets(line, sizeof(line), c)) {
                char method[64];
                int b;
                double att, r, err, hu;
                if (sscanf(line, "%63[^,],%d,%lf,%lf,%lf,%*[^,],%lf", method, &b, &att, &r, &err,
                           &hu) != 6)
                    continue;
                for (int m = 0; m < 4; m++)
                    if (strcmp(method, ms[m]) == 0) {
                        rec[m] = r;
                        if (m == 2)
                            hit = hu;
                    }
                fprintf(f, "%s,%d,%s,%d,%.6f,%.6f,%.4f\n", params[p], values[p][v], method, b, r,
                        err, hu);
            }
            if (c)
                fclose(c);
            fflush(f);
            printf("| %s | %d | %.4f | %.4f | %.4f | %.4f | %.3f |\n", params[p], values[p][v],
                   rec[0], rec[1], rec[2], rec[3], hit);
            fflush(stdout);
            fprintf(stderr, "  sweep %s=%d: %.1f s\n", params[p], values[p][v], ckv_elapsed_s(t0));
        }
    }
    fclose(f);
    if (rc)
        return rc;
    printf("\nwrote %s\n", path);
    for (int p = 0; p < 4; p++) {
        struct plot pl = {.csv = "sweep-recall.csv",
                          .xcol = 2,
                          .ycol = 5,
                          .scol = 3,
                          .fcol = 1,
                          .fval = params[p],
                          .xlabel = params[p],
                          .ylabel = "attention recall",
                          .series = {"clusterkv-q", "clusterkv-kv", "clusterkv-kvsum", "quest"},
                          .n_series = 4,
                          .logx = p < 2};
        char name[64], title[160];
        snprintf(name, sizeof(name), "sweep-recall-%s", params[p]);
        snprintf(title, sizeof(title), "Attention recall at budget %d against %s",
                 E->o.sweep_budget, params[p]);
        pl.name = name;
        pl.title = title;
        plot_write(E, &pl);
    }
    return 0;
}

static int cmd_sweep(struct eval *E)
{
    struct doc docs[MAX_DOCS];
    int n_docs = 0;
    int rc = docs_load(E, docs, &n_docs, E->o.sweep_tokens);
    if (rc)
        return rc;
    struct run_cfg cfgs[MAX_CFGS];
    int n = 0;
    struct ckv_eval_method full, base, quest;
    ckv_eval_method_parse("full", &full);
    ckv_eval_method_parse("quest", &quest);
    if (ckv_eval_method_parse(E->o.sweep_methods, &base) || base.method != CKV_KV_CLUSTERKV) {
        fprintf(stderr, "ckv eval: --sweep-base: a clusterkv variant\n");
        docs_free(docs, n_docs);
        return -EINVAL;
    }
    const int B = E->o.sweep_budget;
    rc = cfg_make(E, &full, 0, &cfgs[n++]);
    if (!rc)
        rc = cfg_make(E, &quest, B, &cfgs[n++]);
    if (!rc)
        rc = cfg_make(E, &base, B, &cfgs[n]);
    struct run_cfg def = cfgs[n];
    snprintf(cfgs[n++].variant, sizeof(def.variant), "default");
    /* one parameter at a time around the defaults */
    static const int tpc[] = {20, 40, 160}, iters[] = {1, 5, 50}, win[] = {64, 160, 640},
                     sinks[] = {0, 4, 64};
    for (int i = 0; !rc && i < 3; i++) {
        struct run_cfg *c;
        c = &cfgs[n++], *c = def, c->kv.tokens_per_cluster = tpc[i];
        snprintf(c->variant, sizeof(c->variant), "tokens-per-cluster=%d", tpc[i]);
        c = &cfgs[n++], *c = def, c->kv.kmeans_iters = iters[i];
        snprintf(c->variant, sizeof(c->variant), "kmeans-iters=%d", iters[i]);
        c = &cfgs[n++], *c = def, c->kv.window = win[i];
        snprintf(c->variant, sizeof(c->variant), "window=%d", win[i]);
        c = &cfgs[n++], *c = def, c->kv.sinks = sinks[i];
        snprintf(c->variant, sizeof(c->variant), "sinks=%d", sinks[i]);
    }
    for (int sm = 0; !rc && sm < 3; sm++) {
        if ((int)def.kv.select_mode == sm)
            continue;
        struct run_cfg *c = &cfgs[n++];
        *c = def;
        c->kv.select_mode = (enum ckv_select_mode)sm;
        snprintf(c->variant, sizeof(c->variant), "select-mode=%s",
                 ckv_select_mode_name((enum ckv_select_mode)sm));
    }
    char err[256];
    for (int i = 0; !rc && i < n; i++)
        if (ckv_kv_opts_check(&cfgs[i].kv, err, sizeof(err))) {
            fprintf(stderr, "ckv eval: sweep %s: %s\n", cfgs[i].variant, err);
            rc = -EINVAL;
        }
    char dump[600];
    struct stat st;
    if (E->o.sweep_dump[0])
        snprintf(dump, sizeof(dump), "%s", E->o.sweep_dump);
    else
        snprintf(dump, sizeof(dump), "%s/qkv", E->o.out);
    if (!rc && stat(dump, &st) == 0)
        rc = sweep_recall(E, dump, &def);
    else if (!rc)
        fprintf(stderr,
                "ckv eval: sweep: no dumps in %s (run ckv eval attn first): recall "
                "sweep skipped\n",
                dump);
    if (!rc && E->o.sweep_ppl)
        rc = ppl_run(E, "sweep", docs, 1, cfgs, n, 0);
    if (!rc) {
        /* the sweep's JSON: ppl relative to the default variant */
        printf("\n(default: sinks %d, window %d, tokens per cluster %d, window clusters %d, "
               "k-means iterations %d, selection %s)\n",
               def.kv.sinks, def.kv.window, def.kv.tokens_per_cluster, def.kv.window_clusters,
               def.kv.kmeans_iters, ckv_select_mode_name(def.kv.select_mode));
    }
    docs_free(docs, n_docs);
    return rc;
}

/* ---- quick ---- */

/* The short run: ppl of the first 3072 tokens of the first document (1024 prefilled) under
 * full, clusterkv b512 and quest b512, and attention recall on a short dump at budget 256. */
static int cmd_quick(struct eval *E)
{
    struct doc docs[MAX_DOCS];
    int n_docs = 0;
    int rc = docs_load(E, docs, &n_docs, E->o.ppl_max_tokens);
    if (rc)
        return rc;
    struct run_cfg cfgs[4];
    struct ckv_eval_method m;
    int n = 0;
    const char *names[] = {"full", "clusterkv", "quest"};
    for (int i = 0; !rc && i < 3; i++) {
        ckv_eval_method_parse(names[i], &m);
        rc = cfg_make(E, &m, 512, &cfgs[n++]);
    }
    if (!rc)
        rc = ppl_run(E, "ppl", docs, 1, cfgs, n, 1);
    docs_free(docs, n_docs);
    if (!rc)
        rc = cmd_attn(E, "256");
    return rc;
}

/* ---- main ---- */

static void usage(void)
{
    struct ckv_buf u = {0};
    ckv_config_usage(eval_options, &u);
    printf("usage: ckv eval ppl|retrieval|agree|attn|sweep|all [options]\n"
           "       ckv eval --quick [--json FILE]\n%s",
           u.data ? u.data : "");
    ckv_buf_free(&u);
}

int ckv_cmd_eval(int argc, char **argv)
{
    static struct eval E;
    char err[512], *pos[2];
    int n_pos = 0;
    memset(&E, 0, sizeof(E));
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage();
            return 0;
        }
    if (ckv_config_load(eval_options, &E.o, argc - 1, argv + 1, pos, 2, &n_pos, err, sizeof(err))) {
        fprintf(stderr, "ckv eval: %s\n", err);
        return 2;
    }
    const char *sub = n_pos ? pos[0] : (E.o.quick ? "quick" : NULL);
    static const char *const subs[] = {"ppl",   "retrieval", "agree", "attn",
                                       "sweep", "all",       "quick"};
    int known = 0;
    for (size_t i = 0; sub && i < sizeof(subs) / sizeof(subs[0]); i++)
        known |= strcmp(sub, subs[i]) == 0;
    if (!known || n_pos > 1) {
        usage();
        return 2;
    }
    if (E.o.quick && strcmp(sub, "all") == 0)
        sub = "quick";
    if (!E.o.model[0])
        ckv_engine_default_model(E.o.model, sizeof(E.o.model));
    if (ckv_eval_methods_parse(E.o.methods, E.methods, MAX_LIST, &E.n_methods, err, sizeof(err))) {
        fprintf(stderr, "ckv eval: --methods: %s\n", err);
        return 2;
    }
    if (ckv_eval_parse_ints(E.o.budgets, 1, 1 << 20, E.budgets, MAX_LIST, &E.n_budgets)) {
        fprintf(stderr, "ckv eval: --budgets: positive token counts, comma-separated\n");
        return 2;
    }
    int rc = mkdir_p(E.o.out);
    if (rc) {
        fprintf(stderr, "ckv eval: --out %s: %s\n", E.o.out, strerror(-rc));
        return 1;
    }
    if (E.o.quick) {
        E.o.ppl_max_tokens = CKV_MIN(E.o.ppl_max_tokens, 3072);
        E.o.attn_ctx = CKV_MIN(E.o.attn_ctx, 2048);
        E.o.attn_steps = CKV_MIN(E.o.attn_steps, 32);
        if (strcmp(E.o.attn_layers, "2,8,15,22,29") == 0)
            snprintf(E.o.attn_layers, sizeof(E.o.attn_layers), "8,22");
    }
    ckv_log_init("ckv", CKV_LOG_WARN);
    struct ckv_engine_opts eo;
    ckv_engine_opts_default(&eo);
    eo.model_path = E.o.model;
    eo.n_threads = E.o.threads;
    eo.max_seqs = E.o.batch;
    uint64_t t0 = ckv_now_ns();
    if ((rc = ckv_engine_open(&eo, &E.e, err, sizeof(err)))) {
        fprintf(stderr, "ckv eval: %s\n", err);
        return 1;
    }
    E.tok = ckv_engine_tokenizer(E.e);
    E.n_vocab = ckv_engine_info(E.e)->n_vocab;
    E.max_ctx = eo.max_ctx > 0 ? eo.max_ctx : ckv_engine_info(E.e)->n_ctx_train;
    E.kv_default = eo.kv;
    E.logits = malloc(sizeof(float) * (size_t)E.o.batch * (E.n_vocab ? E.n_vocab : 1));
    if (!E.logits) {
        ckv_engine_close(&E.e);
        return 1;
    }
    const struct ckv_model_info *mi = ckv_engine_info(E.e);
    printf("ckv eval %s: %s (%d layers, %d/%d heads, context %d), %s\n", sub, mi->name,
           mi->n_layers, mi->n_q_heads, mi->n_kv_heads, mi->n_ctx_train,
           ckv_ctx_describe(ckv_engine_ctx(E.e)));
    ckv_buf_printf(&E.json, "{");
    E.json_first = 1;
    int all = strcmp(sub, "all") == 0;
    if (strcmp(sub, "quick") == 0)
        rc = cmd_quick(&E);
    if (!rc && (all || strcmp(sub, "ppl") == 0))
        rc = cmd_ppl(&E);
    if (!rc && (all || strcmp(sub, "retrieval") == 0))
        rc = cmd_retrieval(&E);
    if (!rc && (all || strcmp(sub, "agree") == 0))
        rc = cmd_agree(&E);
    if (!rc && (all || strcmp(sub, "attn") == 0)) {
        char b[128];
        snprintf(b, sizeof(b), "%s", E.o.budgets);
        rc = cmd_attn(&E, b);
    }
    if (!rc && (all || strcmp(sub, "sweep") == 0))
        rc = cmd_sweep(&E);
    /* CPU time too: on a shared machine the wall time says little about the run's cost */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_s = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 +
                   (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
    ckv_eval_json_num(&E.json, &E.json_first, "seconds", ckv_elapsed_s(t0));
    ckv_eval_json_num(&E.json, &E.json_first, "cpu_seconds", cpu_s);
    ckv_buf_printf(&E.json, "\n}\n");
    printf("\nckv eval %s: %.1f s (%.1f s of CPU)\n", sub, ckv_elapsed_s(t0), cpu_s);
    if (!rc && E.o.json[0]) {
        FILE *f = fopen(E.o.json, "w");
        if (!f || fwrite(E.json.data, 1, E.json.len, f) != E.json.len) {
            fprintf(stderr, "ckv eval: --json %s: %s\n", E.o.json, strerror(errno));
            rc = -EIO;
        } else {
            printf("wrote %s\n", E.o.json);
        }
        if (f)
            fclose(f);
    }
    ckv_buf_free(&E.json);
    free(E.logits);
    ckv_engine_close(&E.e);
    return rc ? 1 : 0;
}
