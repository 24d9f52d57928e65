/*
 * ckv-bench-engine: prefill and decode speed of the whole engine (worker/engine.h) on a real
 * GGUF model, full attention against ClusterKV, at several contexts and batch sizes, and
 * llama.cpp (llama-cpp-python) on the same GGUF, the same prompts and the same thread count in
 * the same run (issue 4's benchmark). Prints a table and the command that reproduces it;
 * --json FILE writes every figure.
 *
 *   build/bin/ckv-bench-engine                  512/2k/8k x batch 1/8: ~15 min of a quiet
 *                                               2-core machine (16 prefills of 8k tokens)
 *   build/bin/ckv-bench-engine --quick          512 and 2k, batch 1: 16 s (QUICK_* below)
 *   build/bin/ckv-bench-engine --json out.json
 *
 * Method. Prompts are real text (Debian's GPL-3 text, repeated), tokenized once by our
 * tokenizer; sequence s of a batch starts `stride` tokens after sequence s - 1, so the
 * sequences of a batch differ. Per context, for each method every sequence of the largest
 * batch is prefilled (timed one by one: prefill tok/s at batch B is B * prompt over the summed
 * times, the engine prefills one sequence at a time), and llama.cpp prefills its own (one
 * llama.cpp context per batch size). Then, per batch size, all engines decode greedily:
 * `warmup` untimed steps, then `rounds` rounds in which each engine in turn (the order rotating)
 * makes decode/rounds timed steps, so that all engines see the same machine: on a shared
 * 2-core VM its speed drifts by 2x within a minute. Batch 1 decodes sequence 0 of the same
 * prefilled set, batch B the first B. Decode tok/s = B * timed steps / their summed wall time
 * (the call from tokens in to logits out; argmax and bookkeeping are outside), so a step that
 * clusters a full window is counted where it happens.
 *
 * llama.cpp runs in a python3 child (bench/bench_engine_llamacpp.py --serve, driven line by
 * line over pipes): same thread count, its defaults otherwise (f16 KV, no flash attention, one
 * KV stream per sequence). Its batch-B prefill costs B full prefills, so by default it runs
 * batch > 1 only up to --llamacpp-batch-max-ctx (512) and batch 1 at every context.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "engine.h"
#include "kvcache.h"
#include "tokenizer.h"

#ifndef CKV_BENCH_ENGINE_PY
#define CKV_BENCH_ENGINE_PY "bench/bench_engine_llamacpp.py"
#endif

#define MAX_CTX   8
#define MAX_B     4
#define MAX_METH  4
#define MAX_ENG   (MAX_METH + 1) /* our methods, then llama.cpp */
#define MAX_SEQS  16             /* per method: the largest batch */
#define MAX_STEPS 1024           /* timed decode steps per cell */
#define MAX_GEN   (2 * MAX_STEPS + 8)

/* --quick: what fits in under a minute on the 2-core VM (see docs/BENCHMARKS.md). */
#define QUICK_CONTEXTS  "512,2048"
#define QUICK_BATCHES   "1"
#define QUICK_DECODE    8
#define QUICK_ROUNDS    2
#define QUICK_LLAMA_MAX 512

extern char **environ;

struct bench_cfg {
    bool quick;
    char json[512];
    char model[1024];
    char text[1024];
    char contexts[128];
    char batches[64];
    char methods[128];
    int budget;
    int decode;
    int rounds;
    int warmup;
    int threads;
    int stride;
    bool llamacpp;
    int llamacpp_max_ctx;
    int llamacpp_batch_max_ctx;
    bool flash_attn;
    int omp_wait;
    char python[256];
    char script[1024];
};

static const char *const omp_wait_names[] = {"default", "passive", "active", NULL};

static const struct ckv_config_opt bench_options[] = {
    CKV_OPT_BOOL(struct bench_cfg, quick, "quick", "no",
                 "contexts " QUICK_CONTEXTS ", batch " QUICK_BATCHES
                 ", fewer steps, llama.cpp at 512 only: under 60 s"),
    CKV_OPT_STRING(struct bench_cfg, json, "json", "", "write every figure to this JSON file"),
    CKV_OPT_STRING(struct bench_cfg, model, "model", "",
                   "GGUF model; default SmolLM2-135M-Instruct.Q4_1.gguf in $CKV_MODEL_DIR or "
                   "~/.cache/clusterkv/models"),
    CKV_OPT_STRING(struct bench_cfg, text, "text", "/usr/share/common-licenses/GPL-3",
                   "prompt text, repeated to the context"),
    CKV_OPT_STRING(struct bench_cfg, contexts, "contexts", "512,2048,8192",
                   "prompt tokens per sequence, comma-separated"),
    CKV_OPT_STRING(struct bench_cfg, batches, "batches", "1,8",
                   "batch sizes (sequences decoded together), comma-separated"),
    CKV_OPT_STRING(struct bench_cfg, methods, "methods", "full,clusterkv",
                   "KV methods, comma-separated; speedups are against full"),
    CKV_OPT_INT(struct bench_cfg, budget, "budget", "512", 16, 1 << 20,
                "token budget of clusterkv, quest and streaming"),
    CKV_OPT_INT(struct bench_cfg, decode, "decode", "32", 1, MAX_STEPS,
                "timed decode steps per engine and batch size"),
    CKV_OPT_INT(struct bench_cfg, rounds, "rounds", "4", 1, 64,
                "the timed steps are split into this many rounds, engines alternating"),
    CKV_OPT_INT(struct bench_cfg, warmup, "warmup", "2", 0, 64, "untimed decode steps first"),
    CKV_OPT_INT(struct bench_cfg, threads, "threads", "0", 0, 1024,
                "CPU threads of both engines; 0: one per online core"),
    CKV_OPT_INT(struct bench_cfg, stride, "stride", "1031", 1, 1 << 20,
                "prompt tokens between the starts of a batch's sequences"),
    CKV_OPT_BOOL(struct bench_cfg, llamacpp, "llamacpp", "yes",
                 "measure llama.cpp (llama-cpp-python) in the same run"),
    CKV_OPT_INT(struct bench_cfg, llamacpp_max_ctx, "llamacpp-max-ctx", "1048576", 1, 1 << 22,
                "llama.cpp only at contexts up to this"),
    CKV_OPT_INT(struct bench_cfg, llamacpp_batch_max_ctx, "llamacpp-batch-max-ctx", "512", 0,
                1 << 22, "llama.cpp batches > 1 only at contexts up to this"),
    CKV_OPT_BOOL(struct bench_cfg, flash_attn, "llamacpp-flash-attn", "no",
                 "turn llama.cpp's flash attention on (its default is off)"),
    CKV_OPT_ENUM(struct bench_cfg, omp_wait, "llamacpp-omp-wait", "default", omp_wait_names,
                 "OMP_WAIT_POLICY of llama.cpp's OpenMP threads (default: as inherited, "
                 "libgomp spins briefly; passive: slower on idle cores, faster on busy ones)"),
    CKV_OPT_STRING(struct bench_cfg, python, "python", "python3", "Python with llama_cpp"),
    CKV_OPT_STRING(struct bench_cfg, script, "llamacpp-script", CKV_BENCH_ENGINE_PY,
                   "llama.cpp's side"),
    CKV_OPT_END,
};

/* One (context, batch, engine) figure. */
struct cell {
    bool prefilled, decoded;
    double prefill_s;          /* summed over the batch's sequences */
    double step_ms[MAX_STEPS]; /* timed decode steps */
    int n_steps;
    double attn_ms, matmul_ms; /* ours: engine stats over the timed steps */
    uint64_t attended_tokens, attn_calls, clusters_made, cache_hits, cache_misses;
    double kmeans_ms, select_ms, fetch_ms, kv_attn_ms; /* the KV manager's share of attn_ms */
};

struct engine_gen { /* sequence 0's greedy tokens at batch 1: prefill's, then every step's */
    int32_t tok[MAX_GEN];
    int n;
};

static struct cell cells[MAX_CTX][MAX_B][MAX_ENG];
static struct engine_gen gens[MAX_CTX][MAX_ENG];

static int parse_list(const char *s, int *out, int cap, int lo, int hi)
{
    int n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < lo || v > hi || n == cap || (*end && *end != ','))
            return -EINVAL;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n ? n : -EINVAL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(const double *v, int n)
{
    if (n == 0)
        return 0;
    double *c = malloc((size_t)n * sizeof(double));
    if (!c)
        return 0;
    memcpy(c, v, (size_t)n * sizeof(double));
    qsort(c, (size_t)n, sizeof(double), cmp_double);
    double m = n % 2 ? c[n / 2] : 0.5 * (c[n / 2 - 1] + c[n / 2]);
    free(c);
    return m;
}

/* Engine stats are differences of running sums: -0.000 and tiny negatives become 0. */
static double nonneg(double x)
{
    return x > 0 ? x : 0;
}

static double sum(const double *v, int n)
{
    double s = 0;
    for (int i = 0; i < n; i++)
        s += v[i];
    return s;
}

static void ctx_label(int n, char *buf, size_t len)
{
    if (n >= 1024 && n % 1024 == 0)
        snprintf(buf, len, "%dk", n / 1024);
    else
        snprintf(buf, len, "%d", n);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static int32_t argmax(const float *x, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* ---- the prompt tokens ---- */

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    struct ckv_buf b = {0};
    char chunk[65536];
    size_t r;
    while ((r = fread(chunk, 1, sizeof(chunk), f)) > 0)
        ckv_buf_append(&b, chunk, r);
    fclose(f);
    if (b.oom || b.len == 0) {
        ckv_buf_free(&b);
        errno = b.oom ? ENOMEM : EINVAL;
        return NULL;
    }
    *len = b.len;
    return b.data;
}

/* At least `need` token ids of the text repeated (caller frees *ids). The whole repeated text
 * is tokenized at once, so pieces across the repetitions' seams are as the tokenizer makes them. */
static int prompt_tokens(const tokenizer_t *tok, const char *path, int need, int32_t **ids, int *n)
{
    size_t len;
    char *text = read_file(path, &len);
    if (!text)
        return -errno;
    int rc = 0;
    /* English runs ~4.5 bytes a token; start there and double until there are enough */
    for (size_t reps = (size_t)need * 5 / len + 1;; reps *= 2) {
        char *big = malloc(reps * len);
        if (!big) {
            rc = -ENOMEM;
            break;
        }
        for (size_t i = 0; i < reps; i++)
            memcpy(big + i * len, text, len);
        rc = tokenizer_encode_alloc(tok, big, reps * len, false, false, ids, n);
        free(big);
        if (rc < 0 || *n >= need)
            break;
        free(*ids);
        *ids = NULL;
    }
    free(text);
    return rc < 0 ? rc : 0;
}

/* ---- llama.cpp, a python3 child driven over pipes ---- */

struct llama_proc {
    pid_t pid;
    FILE *in;  /* its stdin: commands */
    FILE *out; /* its stdout: one JSON reply per line */
    char *line;
    size_t cap;
};

static int llama_start(struct llama_proc *p, const struct bench_cfg *cfg, const char *model,
                       const char *ids_path, int threads)
{
    int to[2] = {-1, -1}, from[2] = {-1, -1};
    if (pipe2(to, O_CLOEXEC) < 0 || pipe2(from, O_CLOEXEC) < 0) {
        int rc = -errno;
        close(to[0]), close(to[1]);
        return rc;
    }
    char thr[16], stride[16];
    snprintf(thr, sizeof(thr), "%d", threads);
    snprintf(stride, sizeof(stride), "%d", cfg->stride);
    char *argv[] = {(char *)cfg->python,
                    "-u",
                    (char *)cfg->script,
                    "--serve",
                    "--model",
                    (char *)model,
                    "--tokens",
                    (char *)ids_path,
                    "--threads",
                    thr,
                    "--stride",
                    stride,
                    cfg->flash_attn ? "--flash-attn" : NULL,
                    NULL};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, to[0], 0); /* dup2 clears O_CLOEXEC on 0 and 1 */
    posix_spawn_file_actions_adddup2(&fa, from[1], 1);
    /* llama.cpp's ggml synchronises its threads with OpenMP barriers, hundreds per token:
     * spinning ones (libgomp spins a while before it sleeps) are fastest on idle cores and
     * collapse on cores shared with other processes (1.4 s per decode step at load 16),
     * passive ones the other way round (3.4x slower on idle cores); --llamacpp-omp-wait
     * picks, for the child only */
    char **env = environ;
    char **env_own = NULL;
    if (cfg->omp_wait > 0) {
        size_t n = 0;
        while (environ[n])
            n++;
        env_own = calloc(n + 2, sizeof(char *));
        if (!env_own) {
            posix_spawn_file_actions_destroy(&fa);
            close(to[0]), close(to[1]), close(from[0]), close(from[1]);
            return -ENOMEM;
        }
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (strncmp(environ[i], "OMP_WAIT_POLICY=", 16) != 0)
                env_own[k++] = environ[i];
        env_own[k] = cfg->omp_wait == 1 ? "OMP_WAIT_POLICY=PASSIVE" : "OMP_WAIT_POLICY=ACTIVE";
        env = env_own;
    }
    int rc = -posix_spawnp(&p->pid, cfg->python, &fa, NULL, argv, env);
    free(env_own);
    posix_spawn_file_actions_destroy(&fa);
    close(to[0]);
    close(from[1]);
    if (rc < 0) {
        close(to[1]);
        close(from[0]);
        return rc;
    }
    p->in = fdopen(to[1], "w");
    p->out = fdopen(from[0], "r");
    p->line = NULL;
    p->cap = 0;
    return p->in && p->out ? 0 : -ENOMEM;
}

static void llama_stop(struct llama_proc *p)
{
    if (!p->pid)
        return;
    fputs("quit\n", p->in);
    fclose(p->in); /* EOF also ends it */
    fclose(p->out);
    waitpid(p->pid, NULL, 0);
    free(p->line);
    memset(p, 0, sizeof(*p));
}

/* Sends one command and reads its reply into p->line. 0, or -EIO (the error printed). */
__attribute__((format(printf, 2, 3))) static int llama_cmd(struct llama_proc *p, const char *fmt,
                                                           ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(p->in, fmt, ap);
    va_end(ap);
    if (fflush(p->in) != 0 || getline(&p->line, &p->cap, p->out) < 0) {
        fprintf(stderr, "ckv-bench-engine: the llama.cpp side ended (python3 with llama_cpp "
                        "missing? its message is above)\n");
        return -EIO;
    }
    if (!strstr(p->line, "\"ok\": true")) {
        fprintf(stderr, "ckv-bench-engine: llama.cpp: %s", p->line);
        return -EIO;
    }
    return 0;
}

/* The numbers of `"key": [a, b, ...]` or `"key": a` in a flat JSON line; the count, up to cap. */
static int json_numbers(const char *line, const char *key, double *out, int cap)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\":", key);
    const char *s = strstr(line, pat);
    if (!s)
        return 0;
    s += strlen(pat);
    while (*s == ' ')
        s++;
    bool list = *s == '[';
    if (list)
        s++;
    int n = 0;
    while (n < cap) {
        char *end;
        double v = strtod(s, &end);
        if (end == s)
            break;
        out[n++] = v;
        s = end;
        while (*s == ' ')
            s++;
        if (!list || *s != ',')
            break;
        s++;
    }
    return n;
}

/* ---- our engine ---- */

struct progress {
    const char *what;
    int seq, n_seqs;
};

static void on_progress(void *arg, int done, int total)
{
    const struct progress *pr = arg;
    fprintf(stderr, "\r  %s: sequence %d/%d: %d/%d tokens", pr->what, pr->seq + 1, pr->n_seqs, done,
            total);
}

/* n steps of one engine method over seqs[0..B); records the timed ones into c (NULL: untimed)
 * and sequence 0's tokens into g (NULL: not recorded). */
static int ours_decode(ckv_engine_t *e, const int *seqs, int32_t *next, int B, float *logits,
                       int n_vocab, int n, struct cell *c, struct engine_gen *g)
{
    for (int i = 0; i < n; i++) {
        ckv_engine_stats_reset(e);
        uint64_t t0 = ckv_now_ns();
        int rc = ckv_engine_decode(e, seqs, next, B, logits);
        double ms = (double)(ckv_now_ns() - t0) / 1e6;
        if (rc < 0)
            return rc;
        if (c && c->n_steps < MAX_STEPS) {
            struct ckv_engine_stats st;
            ckv_engine_stats(e, &st);
            c->step_ms[c->n_steps++] = ms;
            c->attn_ms += st.attn_ms;
            c->matmul_ms += st.matmul_ms;
            c->attended_tokens += st.kv.attended_tokens;
            c->attn_calls += st.kv.decode_attn_calls;
            c->clusters_made += st.kv.clusters_made;
            c->kmeans_ms += st.kv.kmeans_ms;
            c->select_ms += st.kv.select_ms;
            c->fetch_ms += st.kv.fetch_ms;
            c->kv_attn_ms += st.kv.attn_ms;
            c->cache_hits += st.kv.cache_hits;
            c->cache_misses += st.kv.cache_misses;
            c->decoded = true;
        }
        for (int s = 0; s < B; s++)
            next[s] = argmax(logits + (size_t)s * n_vocab, n_vocab);
        if (g && g->n < MAX_GEN)
            g->tok[g->n++] = next[0];
    }
    return 0;
}

/* n steps of llama.cpp's batch B; same recording as ours_decode. */
static int llama_decode(struct llama_proc *p, int B, int n, struct cell *c, struct engine_gen *g)
{
    int rc = llama_cmd(p, "decode %d %d\n", B, n);
    if (rc < 0)
        return rc;
    double *v = malloc(sizeof(double) * (size_t)n);
    if (!v)
        return -ENOMEM;
    int k = json_numbers(p->line, "ms", v, n);
    if (c)
        for (int i = 0; i < k && c->n_steps < MAX_STEPS; i++) {
            c->step_ms[c->n_steps++] = v[i];
            c->decoded = true;
        }
    k = json_numbers(p->line, "tokens", v, n);
    for (int i = 0; g && i < k && g->n < MAX_GEN; i++)
        g->tok[g->n++] = (int32_t)v[i];
    free(v);
    return 0;
}

/* ---- report ---- */

struct run {
    const struct bench_cfg *cfg;
    int contexts[MAX_CTX], n_ctx;
    int batches[MAX_B], n_b;
    enum ckv_kv_method methods[MAX_METH];
    int n_meth, full; /* index of full among methods, -1 if absent */
    bool llama_ctx[MAX_CTX];
    const char *engine_names[MAX_ENG];
    int n_eng;
    int threads;
    char backend[128];
    char model_name[256];
    struct ckv_buf cmd;
    double total_s;
};

static double prefill_tps(const struct cell *c, int B, int prompt)
{
    return c->prefilled && c->prefill_s > 0 ? (double)B * prompt / c->prefill_s : 0;
}

static double decode_tps(const struct cell *c, int B)
{
    double s = sum(c->step_ms, c->n_steps);
    return c->decoded && s > 0 ? 1000.0 * B * c->n_steps / s : 0;
}

/* Length of the common prefix of two token lists. */
static int common_prefix(const struct engine_gen *a, const struct engine_gen *b, int *compared)
{
    int n = CKV_MIN(a->n, b->n), i = 0;
    while (i < n && a->tok[i] == b->tok[i])
        i++;
    *compared = n;
    return i;
}

struct target {
    const char *key;
    double goal;
};

/* s as a JSON string literal (common/ckv_buf.h) written to f. */
static void json_str(FILE *f, const char *s)
{
    struct ckv_buf b = {0};
    ckv_buf_json_str(&b, s, strlen(s));
    fputs(b.data ? b.data : "\"\"", f);
    ckv_buf_free(&b);
}

/* A headline figure of the JSON file and the report. */
struct figure {
    char key[80];
    double v;
};

/* The ratios measured: decode_speedup_<ctx>_b<B> (clusterkv over full decode tok/s; other
 * methods as decode_speedup_<method>_<ctx>_b<B>), decode_vs_llamacpp_<ctx> (full over
 * llama.cpp at batch 1; _b<B> for larger batches, _<method> for other methods),
 * prefill_vs_llamacpp_<ctx> (full over llama.cpp, batch 1). Returns the count. */
static int headline_figures(const struct run *r, struct figure *out, int cap)
{
    int k = 0;
    const int L = r->n_meth;
    for (int ci = 0; ci < r->n_ctx; ci++) {
        char lab[16];
        ctx_label(r->contexts[ci], lab, sizeof(lab));
        for (int bi = 0; bi < r->n_b; bi++) {
            const int B = r->batches[bi], n = r->contexts[ci];
            const struct cell *row = cells[ci][bi];
            char bs[16] = "";
            if (B > 1)
                snprintf(bs, sizeof(bs), "_b%d", B);
            double full = r->full >= 0 ? decode_tps(&row[r->full], B) : 0;
            double llama = decode_tps(&row[L], B);
            for (int m = 0; m < r->n_meth && k < cap; m++) {
                double d = decode_tps(&row[m], B);
                if (m != r->full && d > 0 && full > 0) {
                    if (r->methods[m] == CKV_KV_CLUSTERKV)
                        snprintf(out[k].key, sizeof(out[k].key), "decode_speedup_%s_b%d", lab, B);
                    else
                        snprintf(out[k].key, sizeof(out[k].key), "decode_speedup_%s_%s_b%d",
                                 r->engine_names[m], lab, B);
                    out[k++].v = d / full;
                }
                if (d > 0 && llama > 0 && k < cap) {
                    snprintf(out[k].key, sizeof(out[k].key), "decode_vs_llamacpp%s%s_%s%s",
                             m == r->full ? "" : "_", m == r->full ? "" : r->engine_names[m], lab,
                             bs);
                    out[k++].v = d / llama;
                }
            }
            double pf = r->full >= 0 ? prefill_tps(&row[r->full], B, n) : 0;
            double pl = prefill_tps(&row[L], B, n);
            if (B == 1 && pf > 0 && pl > 0 && k < cap) {
                snprintf(out[k].key, sizeof(out[k].key), "prefill_vs_llamacpp_%s", lab);
                out[k++].v = pf / pl;
            }
        }
    }
    return k;
}

static const struct target targets[] = {
    {"decode_speedup_8k_b1", 1.5},   /* ClusterKV decode at 8k, batch 1, over full attention */
    {"decode_speedup_8k_b8", 2.5},   /* the same at batch 8 */
    {"decode_vs_llamacpp_512", 0.8}, /* full attention at 512, batch 1, over llama.cpp */
};
#define N_TARGETS (int)(sizeof(targets) / sizeof(targets[0]))

static double figure_find(const struct figure *f, int n, const char *key)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(f[i].key, key))
            return f[i].v;
    return 0;
}

static void print_report(const struct run *r)
{
    const int L = r->n_meth; /* llama.cpp's engine index */
    printf("\n%s, %s (llama.cpp: %d threads); prompt: %s; ClusterKV budget %d; %d timed decode "
           "steps in %d rounds after %d warm-up\n\n",
           r->model_name, r->backend, r->threads, r->cfg->text, r->cfg->budget, r->cfg->decode,
           r->cfg->rounds, r->cfg->warmup);
    printf("| context | batch | engine | prefill tok/s | decode tok/s | step ms p50 | decode vs "
           "full | decode vs llama.cpp | attention share |\n");
    printf("|---:|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for (int ci = 0; ci < r->n_ctx; ci++)
        for (int bi = 0; bi < r->n_b; bi++) {
            int B = r->batches[bi], n = r->contexts[ci];
            const struct cell *row = cells[ci][bi];
            double full = r->full >= 0 ? decode_tps(&row[r->full], B) : 0;
            double llama = decode_tps(&row[L], B);
            for (int ei = 0; ei < r->n_eng; ei++) {
                const struct cell *c = &row[ei];
                if (!c->prefilled && !c->decoded)
                    continue;
                double d = decode_tps(c, B);
                printf("| %d | %d | %s | %.0f | %.1f | %.2f | ", n, B, r->engine_names[ei],
                       prefill_tps(c, B, n), d, median(c->step_ms, c->n_steps));
                if (full > 0 && ei != r->full)
                    printf("%.2fx | ", d / full);
                else
                    printf("- | ");
                if (llama > 0 && ei != L)
                    printf("%.2fx | ", d / llama);
                else
                    printf("- | ");
                double eng_ms = sum(c->step_ms, c->n_steps);
                if (ei < L && eng_ms > 0)
                    printf("%.0f%% |\n", 100.0 * c->attn_ms / eng_ms);
                else
                    printf("- |\n");
            }
        }
    printf("\n");
    for (int ci = 0; ci < r->n_ctx; ci++)
        if (r->full >= 0 && r->llama_ctx[ci] && gens[ci][L].n > 0) {
            int cmp;
            int same = common_prefix(&gens[ci][r->full], &gens[ci][L], &cmp);
            printf("context %d: greedy tokens of sequence 0, full attention vs llama.cpp: the "
                   "first %d of %d agree\n",
                   r->contexts[ci], same, cmp);
        }
    struct figure figs[256];
    int n_figs = headline_figures(r, figs, 256);
    printf("\n");
    for (int i = 0; i < n_figs; i++)
        printf("%s = %.2f\n", figs[i].key, figs[i].v);
    printf("\n");
    for (int t = 0; t < N_TARGETS; t++) {
        double v = figure_find(figs, n_figs, targets[t].key);
        if (v > 0)
            printf("target %s >= %.1f: %.2f, %s\n", targets[t].key, targets[t].goal, v,
                   v >= targets[t].goal ? "met" : "MISSED");
        else
            printf("target %s >= %.1f: not measured in this run\n", targets[t].key,
                   targets[t].goal);
    }
}

static int write_json(const struct run *r, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    const int L = r->n_meth;
    fprintf(f, "{\n  \"bench\": \"ckv-bench-engine\",\n  \"command\": ");
    json_str(f, r->cmd.data);
    fprintf(f, ",\n  \"model\": ");
    json_str(f, r->model_name);
    fprintf(f, ",\n  \"backend\": ");
    json_str(f, r->backend);
    fprintf(f,
            ",\n  \"n_threads\": %d,\n  \"budget\": %d,\n  \"decode_steps\": %d,\n  "
            "\"rounds\": %d,\n  \"warmup_steps\": %d,\n  \"quick\": %s,\n  \"total_s\": %.1f,\n",
            r->threads, r->cfg->budget, r->cfg->decode, r->cfg->rounds, r->cfg->warmup,
            r->cfg->quick ? "true" : "false", r->total_s);
    struct figure figs[256];
    int n_figs = headline_figures(r, figs, 256);
    for (int i = 0; i < n_figs; i++)
        fprintf(f, "  \"%s\": %.3f,\n", figs[i].key, figs[i].v);
    for (int ci = 0; ci < r->n_ctx; ci++)
        if (r->full >= 0 && gens[ci][L].n > 0) {
            char lab[16];
            ctx_label(r->contexts[ci], lab, sizeof(lab));
            int cmp, same = common_prefix(&gens[ci][r->full], &gens[ci][L], &cmp);
            fprintf(f, "  \"greedy_agree_%s\": %d,\n  \"greedy_compared_%s\": %d,\n", lab, same,
                    lab, cmp);
        }
    fprintf(f, "  \"targets\": {");
    for (int t = 0; t < N_TARGETS; t++) {
        double v = figure_find(figs, n_figs, targets[t].key);
        fprintf(f, "%s\n    \"%s\": {\"goal\": %.2f, \"value\": %.3f, \"met\": %s}", t ? "," : "",
                targets[t].key, targets[t].goal, v,
                v <= 0 ? "null" : (v >= targets[t].goal ? "true" : "false"));
    }
    fprintf(f, "\n  },\n  \"results\": [");
    bool first = true;
    for (int ci = 0; ci < r->n_ctx; ci++)
        for (int bi = 0; bi < r->n_b; bi++)
            for (int ei = 0; ei < r->n_eng; ei++) {
                const struct cell *c = &cells[ci][bi][ei];
                int B = r->batches[bi], n = r->contexts[ci];
                if (!c->prefilled && !c->decoded)
                    continue;
                double eng_ms = sum(c->step_ms, c->n_steps);
                fprintf(f,
                        "%s\n    {\"context\": %d, \"batch\": %d, \"engine\": \"%s\", "
                        "\"prefill_tps\": %.2f, \"prefill_s\": %.3f, \"decode_tps\": %.3f, "
                        "\"decode_steps\": %d, \"step_ms_p50\": %.3f, \"step_ms_mean\": %.3f",
                        first ? "" : ",", n, B, r->engine_names[ei], prefill_tps(c, B, n),
                        c->prefill_s, decode_tps(c, B), c->n_steps, median(c->step_ms, c->n_steps),
                        c->n_steps ? eng_ms / c->n_steps : 0);
                if (ei < L && c->n_steps)
                    fprintf(f,
                            ", \"attn_ms_per_step\": %.3f, \"matmul_ms_per_step\": %.3f, "
                            "\"attn_share\": %.4f, \"attended_tokens_per_call\": %.1f, "
                            "\"kv_select_ms_per_step\": %.3f, \"kv_fetch_ms_per_step\": %.3f, "
                            "\"kv_attn_ms_per_step\": %.3f, \"cache_hits\": %llu, "
                            "\"cache_misses\": %llu, \"clusters_made\": %llu, "
                            "\"kmeans_ms\": %.3f",
                            c->attn_ms / c->n_steps, c->matmul_ms / c->n_steps,
                            eng_ms > 0 ? c->attn_ms / eng_ms : 0,
                            c->attn_calls ? (double)c->attended_tokens / c->attn_calls : 0,
                            nonneg(c->select_ms / c->n_steps), nonneg(c->fetch_ms / c->n_steps),
                            nonneg(c->kv_attn_ms / c->n_steps), (unsigned long long)c->cache_hits,
                            (unsigned long long)c->cache_misses,
                            (unsigned long long)c->clusters_made, nonneg(c->kmeans_ms));
                fprintf(f, "}");
                first = false;
            }
    fprintf(f, "\n  ]\n}\n");
    return fclose(f) ? -errno : 0;
}

/* ---- one context ---- */

static int run_context(struct run *r, ckv_engine_t *e, struct llama_proc *lp, int ci,
                       const int32_t *ids, float *logits)
{
    const struct bench_cfg *cfg = r->cfg;
    const int n = r->contexts[ci], L = r->n_meth;
    const int n_vocab = ckv_engine_info(e)->n_vocab;
    int Bmax = 0;
    for (int bi = 0; bi < r->n_b; bi++)
        Bmax = CKV_MAX(Bmax, r->batches[bi]);
    int seqs[MAX_METH][MAX_SEQS];
    int32_t next[MAX_METH][MAX_SEQS];
    double pre_s[MAX_METH][MAX_SEQS];
    for (int m = 0; m < r->n_meth; m++)
        for (int s = 0; s < Bmax; s++)
            seqs[m][s] = -1;
    char err[512];
    int rc = 0;

    /* prefill: ours, method by method, then llama.cpp per batch size */
    for (int m = 0; m < r->n_meth && rc == 0; m++) {
        struct ckv_kv_opts kv;
        ckv_kv_opts_default(&kv);
        kv.method = r->methods[m];
        kv.budget = cfg->budget;
        char what[64];
        snprintf(what, sizeof(what), "context %d, %s", n, r->engine_names[m]);
        for (int s = 0; s < Bmax && rc == 0; s++) {
            if ((rc = ckv_engine_seq_new(e, &kv, &seqs[m][s], err, sizeof(err))) < 0) {
                fprintf(stderr, "\nckv-bench-engine: new sequence: %s\n", err);
                break;
            }
            struct progress pr = {what, s, Bmax};
            uint64_t t0 = ckv_now_ns();
            rc = ckv_engine_prefill(e, seqs[m][s], ids + (size_t)s * cfg->stride, n, logits,
                                    on_progress, &pr);
            pre_s[m][s] = ckv_elapsed_s(t0);
            if (rc < 0) {
                fprintf(stderr, "\nckv-bench-engine: prefill: %s\n", ckv_strerror(rc));
                break;
            }
            next[m][s] = argmax(logits, n_vocab);
            fprintf(stderr, " in %.2f s (%.0f tok/s)\n", pre_s[m][s], n / pre_s[m][s]);
            if (s == 0)
                gens[ci][m].tok[gens[ci][m].n++] = next[m][0];
        }
        for (int bi = 0; bi < r->n_b && rc == 0; bi++) {
            struct cell *c = &cells[ci][bi][m];
            c->prefilled = true;
            c->prefill_s = sum(pre_s[m], r->batches[bi]);
        }
    }
    bool llama_b[MAX_B] = {false};
    for (int bi = 0; bi < r->n_b && rc == 0 && r->llama_ctx[ci]; bi++) {
        int B = r->batches[bi];
        if (B > 1 && n > cfg->llamacpp_batch_max_ctx)
            continue;
        if (llama_cmd(lp, "open %d %d\n", B, n) < 0) {
            fprintf(stderr, "ckv-bench-engine: going on without llama.cpp at context %d\n", n);
            r->llama_ctx[ci] = false;
            break;
        }
        double v;
        struct cell *c = &cells[ci][bi][L];
        if (json_numbers(lp->line, "prefill_s", &v, 1) == 1) {
            c->prefilled = true;
            c->prefill_s = v;
        }
        if (B == 1 && json_numbers(lp->line, "first", &v, 1) == 1)
            gens[ci][L].tok[gens[ci][L].n++] = (int32_t)v;
        llama_b[bi] = true;
    }

    /* decode: per batch size, warm-up, then rounds with the engines alternating */
    for (int bi = 0; bi < r->n_b && rc == 0; bi++) {
        const int B = r->batches[bi];
        bool on[MAX_ENG];
        for (int ei = 0; ei < r->n_eng; ei++)
            on[ei] = ei < L || (llama_b[bi] && r->llama_ctx[ci]);
        fprintf(stderr, "  context %d, batch %d: decoding", n, B);
        for (int round = -1; round < cfg->rounds && rc == 0; round++) {
            /* round -1: the warm-up; then decode/rounds steps each, the rest in round 0 */
            int steps = round < 0 ? cfg->warmup
                                  : cfg->decode / cfg->rounds +
                                        (round == 0 ? cfg->decode % cfg->rounds : 0);
            if (steps == 0)
                continue;
            for (int k = 0; k < r->n_eng && rc == 0; k++) {
                int ei = (k + CKV_MAX(round, 0)) % r->n_eng; /* rotate the order */
                if (!on[ei])
                    continue;
                struct cell *c = round < 0 ? NULL : &cells[ci][bi][ei];
                struct engine_gen *g = B == 1 ? &gens[ci][ei] : NULL;
                if (ei < L) {
                    rc = ours_decode(e, seqs[ei], next[ei], B, logits, n_vocab, steps, c, g);
                    if (rc < 0)
                        fprintf(stderr, "\nckv-bench-engine: decode (%s, batch %d): %s\n",
                                r->engine_names[ei], B, ckv_strerror(rc));
                } else if (llama_decode(lp, B, steps, c, g) < 0) {
                    fprintf(stderr, "ckv-bench-engine: going on without llama.cpp\n");
                    on[ei] = false;
                }
                /* let the engine's worker threads go idle before the next one runs: idle
                 * OpenMP threads spin for a while after a parallel region */
                sleep_ms(10);
            }
            fprintf(stderr, ".");
        }
        fprintf(stderr, "\n");
    }

    for (int m = 0; m < r->n_meth; m++)
        for (int s = 0; s < Bmax; s++)
            if (seqs[m][s] >= 0)
                ckv_engine_seq_free(e, seqs[m][s]);
    for (int bi = 0; bi < r->n_b; bi++)
        if (llama_b[bi] && r->llama_ctx[ci])
            llama_cmd(lp, "close %d\n", r->batches[bi]);
    return rc;
}

int main(int argc, char **argv)
{
    ckv_log_init("ckv-bench-engine", CKV_LOG_WARN);
    signal(SIGPIPE, SIG_IGN); /* a dead llama.cpp child is an error reply, not a signal */
    static struct bench_cfg cfg;
    char err[512];
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(bench_options, &u);
            printf("usage: ckv-bench-engine [options]\n%s", u.data);
            ckv_buf_free(&u);
            return 0;
        }
    if (ckv_config_load(bench_options, &cfg, argc - 1, argv + 1, NULL, 0, NULL, err, sizeof(err))) {
        fprintf(stderr, "ckv-bench-engine: %s\n", err);
        return 2;
    }
    if (cfg.quick) {
        snprintf(cfg.contexts, sizeof(cfg.contexts), "%s", QUICK_CONTEXTS);
        snprintf(cfg.batches, sizeof(cfg.batches), "%s", QUICK_BATCHES);
        cfg.decode = QUICK_DECODE;
        cfg.rounds = QUICK_ROUNDS;
        cfg.llamacpp_max_ctx = CKV_MIN(cfg.llamacpp_max_ctx, QUICK_LLAMA_MAX);
    }
    static struct run r;
    r.cfg = &cfg;
    r.full = -1;
    r.n_ctx = parse_list(cfg.contexts, r.contexts, MAX_CTX, 1, 1 << 22);
    r.n_b = parse_list(cfg.batches, r.batches, MAX_B, 1, MAX_SEQS);
    if (r.n_ctx < 0 || r.n_b < 0) {
        fprintf(stderr,
                "ckv-bench-engine: --contexts and --batches take positive integers "
                "separated by commas (at most %d and %d; batches up to %d)\n",
                MAX_CTX, MAX_B, MAX_SEQS);
        return 2;
    }
    {
        char list[sizeof(cfg.methods)];
        snprintf(list, sizeof(list), "%s", cfg.methods);
        char *save = NULL;
        for (char *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            if (r.n_meth == MAX_METH || ckv_kv_method_parse(t, &r.methods[r.n_meth]) < 0) {
                fprintf(stderr,
                        "ckv-bench-engine: --methods: '%s' (at most %d of full, "
                        "clusterkv, quest, streaming)\n",
                        t, MAX_METH);
                return 2;
            }
            r.engine_names[r.n_meth] = ckv_kv_method_name(r.methods[r.n_meth]);
            if (r.methods[r.n_meth] == CKV_KV_FULL)
                r.full = r.n_meth;
            r.n_meth++;
        }
        if (r.n_meth == 0) {
            fprintf(stderr, "ckv-bench-engine: --methods is empty\n");
            return 2;
        }
    }
    r.engine_names[r.n_meth] = "llama.cpp";
    r.n_eng = r.n_meth + (cfg.llamacpp ? 1 : 0);
    if (cfg.rounds > cfg.decode)
        cfg.rounds = cfg.decode;
    for (int i = 0; i < argc; i++)
        ckv_buf_printf(&r.cmd, "%s%s", i ? " " : "", i ? argv[i] : "build/bin/ckv-bench-engine");

    char model_buf[1024];
    const char *model =
        cfg.model[0] ? cfg.model : ckv_engine_default_model(model_buf, sizeof(model_buf));
    int Bmax = 0, nmax = 0;
    for (int i = 0; i < r.n_b; i++)
        Bmax = CKV_MAX(Bmax, r.batches[i]);
    for (int i = 0; i < r.n_ctx; i++)
        nmax = CKV_MAX(nmax, r.contexts[i]);

    struct ckv_engine_opts eo;
    ckv_engine_opts_default(&eo);
    eo.model_path = model;
    eo.n_threads = cfg.threads;
    eo.max_seqs = r.n_meth * Bmax;
    /* sequence 0 decodes at every batch size */
    eo.max_ctx = nmax + r.n_b * (cfg.warmup + cfg.decode) + 16;
    ckv_engine_t *e = NULL;
    uint64_t t_start = ckv_now_ns();
    int rc = ckv_engine_open(&eo, &e, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "ckv-bench-engine: %s\n", err);
        return 1;
    }
    const struct ckv_model_info *info = ckv_engine_info(e);
    r.threads = ckv_ctx_n_threads(ckv_engine_ctx(e));
    snprintf(r.backend, sizeof(r.backend), "%s", ckv_ctx_describe(ckv_engine_ctx(e)));
    snprintf(r.model_name, sizeof(r.model_name), "%s (%s, %s)", info->name, info->arch,
             info->weight_type ? info->weight_type : "?");

    int32_t *ids = NULL;
    int n_ids = 0;
    int need = nmax + (Bmax - 1) * cfg.stride;
    if ((rc = prompt_tokens(ckv_engine_tokenizer(e), cfg.text, need, &ids, &n_ids)) < 0) {
        fprintf(stderr, "ckv-bench-engine: %s: %s\n", cfg.text, ckv_strerror(rc));
        ckv_engine_close(&e);
        return 1;
    }
    float *logits = malloc(sizeof(float) * (size_t)Bmax * info->n_vocab);
    char ids_path[] = "/tmp/ckv-bench-engine-ids-XXXXXX";
    struct llama_proc lp = {0};
    if (cfg.llamacpp) {
        int fd = mkstemp(ids_path);
        FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
        for (int i = 0; f && i < n_ids; i++)
            fprintf(f, "%d%c", ids[i], i % 32 == 31 ? '\n' : ' ');
        if (!f || fclose(f) != 0 || llama_start(&lp, &cfg, model, ids_path, r.threads) < 0) {
            fprintf(stderr,
                    "ckv-bench-engine: cannot start the llama.cpp side (%s %s): "
                    "going on without it\n",
                    cfg.python, cfg.script);
            cfg.llamacpp = false;
            r.n_eng = r.n_meth;
        }
    }
    for (int ci = 0; ci < r.n_ctx; ci++)
        r.llama_ctx[ci] = cfg.llamacpp && r.contexts[ci] <= cfg.llamacpp_max_ctx;
    fprintf(stderr, "ckv-bench-engine: %s, %s; %d prompt tokens of %s\n", r.model_name, r.backend,
            n_ids, cfg.text);

    for (int ci = 0; ci < r.n_ctx && rc == 0 && logits; ci++)
        rc = run_context(&r, e, &lp, ci, ids, logits);
    if (!logits)
        rc = -ENOMEM;
    r.total_s = ckv_elapsed_s(t_start);
    if (lp.pid)
        llama_stop(&lp);
    if (cfg.llamacpp)
        unlink(ids_path);
    if (rc == 0) {
        print_report(&r);
        printf("\nreproduce with:\n  %s\n(%.1f s in all)\n", r.cmd.data, r.total_s);
        if (cfg.json[0] && (rc = write_json(&r, cfg.json)) < 0)
            fprintf(stderr, "ckv-bench-engine: %s: %s\n", cfg.json, ckv_strerror(rc));
    } else {
        fprintf(stderr, "ckv-bench-engine: %s\n", ckv_strerror(rc));
    }
    free(logits);
    free(ids);
    ckv_buf_free(&r.cmd);
    ckv_engine_close(&e);
    return rc ? 1 : 0;
}
