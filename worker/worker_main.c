/*
 * ckv-worker: one engine (engine.h) serving the router (DESIGN.md "Processes", "Decode step on
 * a worker"; messages in proto/router.proto; docs/OPERATIONS.md).
 *
 *   ckv-worker [--config FILE] [--name value ...]   serve
 *   ckv-worker --help | --dump-config
 *
 * Two threads joined by an inproc PAIR pipe:
 * - the I/O thread (main) owns the router socket: registers, heartbeats on time whatever the
 *   engine is doing (one forward pass can take longer than the router's timeout on a busy
 *   CPU), answers stats, and relays messages between the router and the pipe;
 * - the compute thread owns the engine, one loop (redis's shape): read what came through the
 *   pipe (Generate, Cancel), admit waiting requests into free sequence slots (prefill, first
 *   token), run one decode step over every active sequence together (continuous batching: a
 *   request joins or leaves the batch between steps), stream a TokenEvent per token, end each
 *   request with one Done or Error. A prefill runs to completion before the next step.
 * What the heartbeats and stats report, the compute thread publishes into a snapshot under a
 * mutex after every step.
 *
 * The clusters of ClusterKV go to ckv-kvstore when kvstore-endpoint is set (block_store_kvs.c),
 * to a private in-memory store otherwise. A bad request is answered with an Error naming the
 * problem; the worker never exits on input.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "block_store.h"
#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_config.h"
#include "ckv_main.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_stats.h"
#include "ckv_wire.h"
#include "engine.h"
#include "sampler.h"

struct worker_config {
    char model[PATH_MAX];
    char name[64];
    char run_dir[256];
    char router_endpoint[512];
    char stats_endpoint[512];
    char kvstore_endpoint[512];
    int kvstore_timeout_ms;
    int threads, max_seqs, max_ctx, prefill_chunk;
    int queue_max;
    int default_max_tokens;
    int heartbeat_ms;
    int method, select;
    int budget, sinks, window, tokens_per_cluster, full_layers, cache_blocks;
    uint64_t max_msg_bytes;
    char log_level[16];
    char log_file[PATH_MAX];
};

#define C struct worker_config
static const struct ckv_config_opt worker_options[] = {
    CKV_OPT_STRING(C, model, "model", "",
                   "GGUF model; empty: the default model of deploy/fetch-model.sh"),
    CKV_OPT_STRING(C, name, "name", "", "unique name at the router; empty: worker-<pid>"),
    CKV_OPT_STRING(C, run_dir, "run-dir", "/tmp/ckv", "directory of the ipc:// endpoints"),
    CKV_OPT_STRING(C, router_endpoint, "router-endpoint", "",
                   "the router's worker socket; empty: ipc://<run-dir>/router-workers.sock"),
    CKV_OPT_STRING(C, stats_endpoint, "stats-endpoint", "",
                   "bind a socket answering StatsRequest here (ckv stats); empty: none"),
    CKV_OPT_STRING(C, kvstore_endpoint, "kvstore-endpoint", "",
                   "ckv-kvstore socket, e.g. ipc:///tmp/ckv/kvstore.sock; empty: in-memory store"),
    CKV_OPT_INT(C, kvstore_timeout_ms, "kvstore-timeout-ms", "5000", 10, 600000,
                "a store request without an answer after this fails"),
    CKV_OPT_INT(C, threads, "threads", "0", 0, 1024, "CPU threads; 0: one per core"),
    CKV_OPT_INT(C, max_seqs, "max-seqs", "4", 1, 1024,
                "sequences decoded together (the capacity told to the router)"),
    CKV_OPT_INT(C, max_ctx, "max-ctx", "4096", 0, 1 << 24,
                "tokens per sequence (prompt + generated); 0: the model's training context"),
    CKV_OPT_INT(C, prefill_chunk, "prefill-chunk", "512", 1, 65536,
                "prompt tokens per forward pass"),
    CKV_OPT_INT(C, queue_max, "queue-max", "16", 0, 1 << 20,
                "requests waiting here for a free slot; more are answered `overloaded`"),
    CKV_OPT_INT(C, default_max_tokens, "default-max-tokens", "256", 1, 1 << 24,
                "tokens generated when a request does not say"),
    CKV_OPT_INT(C, heartbeat_ms, "heartbeat-ms", "500", 10, 60000,
                "heartbeat period until the router says its own"),
    CKV_OPT_ENUM(C, method, "method", "clusterkv", ckv_kv_method_names,
                 "default KV method: full, clusterkv, quest, streaming"),
    CKV_OPT_INT(C, budget, "budget", "1024", 1, 1 << 24,
                "default tokens attended per selection unit"),
    CKV_OPT_INT(C, sinks, "sinks", "16", 0, 4096, "attention sink tokens"),
    CKV_OPT_INT(C, window, "window", "320", 1, 65536, "recent window (clustered when full)"),
    CKV_OPT_INT(C, tokens_per_cluster, "tokens-per-cluster", "80", 1, 1 << 20,
                "prompt tokens per cluster"),
    CKV_OPT_INT(C, full_layers, "full-layers", "2", 0, 1024,
                "first layers always use full attention"),
    CKV_OPT_INT(C, cache_blocks, "cache-blocks", "0", 0, 1 << 30,
                "cluster cache per sequence, in blocks (misses go to the store); 0: unbounded"),
    CKV_OPT_ENUM(C, select, "select", "kvhead-sum", ckv_select_mode_names,
                 "GQA selection unit: per-qhead, kvhead-max, kvhead-sum"),
    CKV_OPT_SIZE(C, max_msg_bytes, "max-msg-size", "4m", 4096, 1ull << 30,
                 "largest message accepted from the router"),
    CKV_OPT_STRING(C, log_level, "log-level", "info", "debug, info, warn, error or off"),
    CKV_OPT_STRING(C, log_file, "log-file", "", "append logs to this file; empty: stderr"),
    CKV_OPT_END,
};
#undef C

/* One request, from its Generate to its Done or Error. */
struct req {
    struct req *next;
    uint64_t job_id;    /* the router's id */
    Ckv__Envelope *gen; /* owned until admitted */
    int seq;            /* engine slot; -1 while waiting */
    int n_prompt;
    struct ckv_sampler smp;
    bool smp_live;
    struct tokenizer_stream ts;
    int32_t next_token; /* fed to the next decode step */
    int generated;
    uint32_t max_tokens;
    bool no_text;
    uint64_t t_admit_us, t_first_us;
    double prefill_ms;
};

struct worker {
    struct worker_config cfg;
    ckv_engine_t *e;
    const struct ckv_model_info *info;
    const tokenizer_t *tok;
    struct ckv_block_store *store;    /* NULL: the engine's in-memory one */
    void *zctx, *router, *stats_sock; /* I/O thread */
    void *pipe_io, *pipe_cpu;         /* inproc PAIR: the I/O end, the compute end */
    char router_ep[600];
    struct req *waiting; /* FIFO */
    struct req *active;
    int n_waiting, n_active;
    float *logits; /* (max_seqs, n_vocab) */
    int *seqs;
    int32_t *tokens;
    bool registered; /* I/O thread */
    uint64_t next_hb_ms, last_register_ms, register_id;
    int hb_ms;
    pthread_mutex_t mu; /* guards snap */
    struct snapshot {
        int n_active, n_waiting;
        uint64_t outstanding, tokens_generated, prompt_tokens, requests_done, requests_failed;
        uint64_t bad_requests, cancelled, steps;
        double tok_s;
        struct ckv_engine_stats es;
        bool have_ks;
        struct ckv_block_store_kvs_stats ks;
        uint64_t store_blocks_used, store_blocks_total, store_clusters_spilled;
    } snap;
    uint64_t store_polled_ms; /* compute thread: last read of the store's own stats */
    uint64_t store_blocks_used, store_blocks_total, store_clusters_spilled;
    atomic_bool compute_done;
    /* counters */
    uint64_t tokens_generated, prompt_tokens, requests_done, requests_failed, bad_requests;
    uint64_t cancelled, steps;
    double tok_s; /* exponential average of the decode speed */
    uint64_t t_start_ms;
    volatile sig_atomic_t stop;
};

static struct worker *the_worker;

static void on_signal(int sig)
{
    (void)sig;
    if (the_worker)
        the_worker->stop = 1;
}

/* ---- sending to the router ---- */

/* Compute thread: to the router through the pipe. */
static void send_env(struct worker *w, Ckv__Envelope *env)
{
    int rc = ckv_wire_send(w->pipe_cpu, NULL, env, 0);
    if (rc)
        LOG_WARN("send to the I/O thread (type %d): %s", (int)env->body_case, ckv_strerror(rc));
}

/* I/O thread: straight to the router. The DEALER queues while the router is away (up to its
 * high-water mark); a send that would block is dropped: the router sees a silent worker, not
 * a hang here. */
static void send_router(struct worker *w, Ckv__Envelope *env)
{
    int rc = ckv_wire_send(w->router, NULL, env, ZMQ_DONTWAIT);
    if (rc)
        LOG_WARN("send to the router (type %d): %s", (int)env->body_case, ckv_strerror(rc));
}

/* I/O thread: to the compute thread. */
static void send_pipe_io(struct worker *w, Ckv__Envelope *env)
{
    int rc = ckv_wire_send(w->pipe_io, NULL, env, 0);
    if (rc)
        LOG_ERROR("send to the compute thread: %s", ckv_strerror(rc));
}

__attribute__((format(printf, 4, 5))) static void
send_error(struct worker *w, uint64_t job_id, Ckv__ErrorCode code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Error e = CKV__ERROR__INIT;
    e.code = code;
    e.message = msg;
    env.request_id = job_id;
    env.body_case = CKV__ENVELOPE__BODY_ERROR;
    env.error = &e;
    send_env(w, &env);
}

static void send_register(struct worker *w)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__WorkerRegister m = CKV__WORKER_REGISTER__INIT;
    m.name = w->cfg.name;
    m.model = (char *)w->info->name;
    m.capacity = (uint32_t)w->cfg.max_seqs;
    m.n_vocab = (uint32_t)w->info->n_vocab;
    m.kv_method = (char *)ckv_kv_method_names[w->cfg.method];
    env.request_id = ++w->register_id;
    env.body_case = CKV__ENVELOPE__BODY_WORKER_REGISTER;
    env.worker_register = &m;
    send_router(w, &env);
    w->last_register_ms = ckv_now_ms();
}

static uint64_t outstanding(struct worker *w)
{
    uint64_t n = 0;
    for (struct req *r = w->active; r; r = r->next)
        n += r->max_tokens > (uint32_t)r->generated ? r->max_tokens - (uint32_t)r->generated : 0;
    for (struct req *r = w->waiting; r; r = r->next)
        n += r->max_tokens;
    return n;
}

/* The value of "name:value" at a line start of key:value stats text; 0 when absent. */
static uint64_t stat_u64(const char *text, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (strncmp(p, name, n) == 0 && p[n] == ':')
            return strtoull(p + n + 1, NULL, 10);
    return 0;
}

/* Compute thread: what the I/O thread reports, after every step. */
static void publish(struct worker *w)
{
    struct snapshot s = {0};
    s.n_active = w->n_active;
    s.n_waiting = w->n_waiting;
    s.outstanding = outstanding(w);
    s.tokens_generated = w->tokens_generated;
    s.prompt_tokens = w->prompt_tokens;
    s.requests_done = w->requests_done;
    s.requests_failed = w->requests_failed;
    s.bad_requests = w->bad_requests;
    s.cancelled = w->cancelled;
    s.steps = w->steps;
    s.tok_s = w->tok_s;
    ckv_engine_stats(w->e, &s.es);
    s.have_ks = w->store && ckv_block_store_kvs_stats(w->store, &s.ks) == 0;
    /* the store's occupancy, once a second (one round trip to it) */
    uint64_t now = ckv_now_ms();
    if (s.have_ks && now - w->store_polled_ms >= 1000) {
        struct ckv_buf b = {0};
        if (ckv_block_store_kvs_store_stats(w->store, false, &b) == 0 && b.data) {
            w->store_blocks_used = stat_u64(b.data, "blocks_used");
            w->store_blocks_total = stat_u64(b.data, "blocks_total");
            w->store_clusters_spilled = stat_u64(b.data, "clusters_spilled");
        }
        ckv_buf_free(&b);
        w->store_polled_ms = now;
    }
    s.store_blocks_used = w->store_blocks_used;
    s.store_blocks_total = w->store_blocks_total;
    s.store_clusters_spilled = w->store_clusters_spilled;
    pthread_mutex_lock(&w->mu);
    w->snap = s;
    pthread_mutex_unlock(&w->mu);
}

static void send_heartbeat(struct worker *w)
{
    pthread_mutex_lock(&w->mu);
    struct snapshot s = w->snap;
    pthread_mutex_unlock(&w->mu);
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__WorkerHeartbeat h = CKV__WORKER_HEARTBEAT__INIT;
    h.active = (uint32_t)s.n_active;
    h.outstanding_tokens = s.outstanding;
    h.tokens_generated = s.tokens_generated;
    h.requests_done = s.requests_done;
    h.decode_tok_s = s.tok_s;
    h.kv_cache_hits = s.es.kv.cache_hits;
    h.kv_cache_misses = s.es.kv.cache_misses;
    h.prompt_tokens = s.prompt_tokens;
    h.kv_usage = (double)s.n_active / w->cfg.max_seqs;
    h.store_blocks_used = s.store_blocks_used;
    h.store_blocks_total = s.store_blocks_total;
    h.store_clusters_spilled = s.store_clusters_spilled;
    env.body_case = CKV__ENVELOPE__BODY_WORKER_HEARTBEAT;
    env.worker_heartbeat = &h;
    send_router(w, &env);
    w->next_hb_ms = ckv_now_ms() + (uint64_t)w->hb_ms;
}

static void heartbeat_if_due(struct worker *w)
{
    uint64_t now = ckv_now_ms();
    if (!w->registered) {
        if (now - w->last_register_ms >= 1000)
            send_register(w);
        return;
    }
    if (now >= w->next_hb_ms)
        send_heartbeat(w);
}

/* ---- requests ---- */

static void req_free(struct worker *w, struct req *r)
{
    if (r->seq >= 0)
        ckv_engine_seq_free(w->e, r->seq);
    if (r->smp_live)
        ckv_sampler_free(&r->smp);
    ckv_wire_free(r->gen);
    free(r);
}

static void list_remove(struct req **head, struct req *r)
{
    for (struct req **p = head; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            return;
        }
}

static void end_active(struct worker *w, struct req *r)
{
    list_remove(&w->active, r);
    w->n_active--;
    req_free(w, r);
}

static void send_done(struct worker *w, struct req *r, const char *reason)
{
    struct ckv_buf rest = {0};
    tokenizer_stream_flush(&r->ts, &rest);
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Done d = CKV__DONE__INIT;
    d.prompt_tokens = (uint32_t)r->n_prompt;
    d.generated_tokens = (uint32_t)r->generated;
    d.finish_reason = (char *)reason;
    d.prefill_ms = r->prefill_ms;
    d.decode_ms = r->t_first_us ? (double)(ckv_now_us() - r->t_first_us) / 1e3 : 0;
    if (!r->no_text && rest.len) {
        d.text.data = (uint8_t *)rest.data;
        d.text.len = rest.len;
    }
    env.request_id = r->job_id;
    env.body_case = CKV__ENVELOPE__BODY_DONE;
    env.done = &d;
    send_env(w, &env);
    ckv_buf_free(&rest);
    w->requests_done++;
    LOG_DEBUG("job %llu done: %d prompt + %d generated tokens (%s)", (unsigned long long)r->job_id,
              r->n_prompt, r->generated, reason);
}

/* Takes a sampled token: ends the request (Done) or streams the token. Returns true when the
 * request goes on. */
static bool take_token(struct worker *w, struct req *r, int32_t id)
{
    enum ckv_sampler_end end = ckv_sampler_accept(&r->smp, id);
    if (tokenizer_is_eog(w->tok, id)) {
        send_done(w, r, "stop");
        return false;
    }
    if (!r->t_first_us)
        r->t_first_us = ckv_now_us();
    r->generated++;
    w->tokens_generated++;
    struct ckv_buf piece = {0};
    if (!r->no_text)
        tokenizer_stream_push(&r->ts, id, &piece);
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__TokenEvent t = CKV__TOKEN_EVENT__INIT;
    t.token_id = id;
    t.index = (uint32_t)(r->generated - 1);
    t.text.data = (uint8_t *)piece.data;
    t.text.len = piece.len;
    env.request_id = r->job_id;
    env.body_case = CKV__ENVELOPE__BODY_TOKEN_EVENT;
    env.token_event = &t;
    send_env(w, &env);
    ckv_buf_free(&piece);
    if (end != CKV_SAMPLER_GO) {
        send_done(w, r, (uint32_t)r->generated >= r->max_tokens ? "length" : "context");
        return false;
    }
    r->next_token = id;
    return true;
}

/* Checks a Generate and turns it into prompt tokens. Returns 0, or a negative code with the
 * reason in err (the request is then answered BAD_REQUEST). *ids is malloc'ed. */
static int prepare_prompt(struct worker *w, const Ckv__Generate *g, int32_t **ids, int *n,
                          char *err, size_t errlen)
{
    *ids = NULL;
    *n = 0;
    if (g->n_token_ids > 0) {
        if (g->chat)
            return ckv_errorf(-EINVAL, err, errlen, "chat needs a text prompt, not token ids");
        *ids = malloc(g->n_token_ids * sizeof(int32_t));
        if (!*ids)
            return ckv_errorf(-ENOMEM, err, errlen, "out of memory");
        for (size_t i = 0; i < g->n_token_ids; i++) {
            if (g->token_ids[i] < 0 || g->token_ids[i] >= w->info->n_vocab) {
                free(*ids);
                *ids = NULL;
                return ckv_errorf(-EINVAL, err, errlen, "token id %d at %zu outside [0, %d)",
                                  g->token_ids[i], i, w->info->n_vocab);
            }
            (*ids)[i] = g->token_ids[i];
        }
        *n = (int)g->n_token_ids;
        return 0;
    }
    const char *text = g->prompt ? g->prompt : "";
    struct ckv_buf b = {0};
    if (g->chat) {
        const struct chat_template *ct;
        if (ckv_engine_chat_template(w->e, &ct) < 0)
            return ckv_errorf(-EINVAL, err, errlen,
                              "the model has no chat template: send "
                              "chat = false");
        struct chat_msg msg = {.role = "user", .content = text};
        if (chat_apply(ct, &msg, 1, true, &b) < 0 || b.oom) {
            ckv_buf_free(&b);
            return ckv_errorf(-ENOMEM, err, errlen, "chat template: out of memory");
        }
        text = b.data ? b.data : "";
    }
    int rc = tokenizer_encode_alloc(w->tok, text, strlen(text), true, g->chat, ids, n);
    ckv_buf_free(&b);
    if (rc < 0)
        return ckv_errorf(rc, err, errlen, "tokenizing the prompt: %s", ckv_strerror(rc));
    if (*n == 0)
        return ckv_errorf(-EINVAL, err, errlen, "the prompt is empty");
    return 0;
}

/* Progress of a long prefill: the slot shows as taken in the stats meanwhile. */
static void on_progress(void *arg, int done, int total)
{
    (void)done;
    (void)total;
    publish(arg);
}

/* Moves a waiting request into a free slot: prefill, first token. One prefill per loop
 * iteration: the sequences already decoding get a step between two prefills instead of
 * waiting for every newcomer's prompt (smoother inter-token latency, a little later first
 * tokens for the third and later newcomers). Refused requests do not count. */
static void admit(struct worker *w)
{
    int prefills = 0;
    while (w->waiting && w->n_active < w->cfg.max_seqs && !w->stop && prefills == 0) {
        struct req *r = w->waiting;
        w->waiting = r->next;
        w->n_waiting--;
        r->next = NULL;
        const Ckv__Generate *g = r->gen->generate;
        char err[512] = "";
        int32_t *ids = NULL;
        int n = 0, rc;
        struct ckv_kv_opts kv;
        if ((rc = prepare_prompt(w, g, &ids, &n, err, sizeof(err))) < 0)
            goto bad;
        int max_ctx = w->cfg.max_ctx > 0 ? w->cfg.max_ctx : w->info->n_ctx_train;
        if (n >= max_ctx) {
            rc = ckv_errorf(-EINVAL, err, sizeof(err),
                            "the prompt has %d tokens, a sequence holds %d (max-ctx)", n, max_ctx);
            goto bad;
        }
        ckv_kv_opts_default(&kv);
        kv.method = (enum ckv_kv_method)w->cfg.method;
        kv.select_mode = (enum ckv_select_mode)w->cfg.select;
        kv.budget = w->cfg.budget;
        kv.sinks = w->cfg.sinks;
        kv.window = w->cfg.window;
        kv.tokens_per_cluster = w->cfg.tokens_per_cluster;
        kv.full_layers = w->cfg.full_layers;
        kv.cache_blocks = w->cfg.cache_blocks;
        if (g->method && *g->method && ckv_kv_method_parse(g->method, &kv.method) < 0) {
            rc = ckv_errorf(-EINVAL, err, sizeof(err),
                            "method '%s': full, clusterkv, quest or streaming", g->method);
            goto bad;
        }
        if (g->budget)
            kv.budget = (int)CKV_MIN(g->budget, (uint32_t)INT_MAX);
        struct ckv_sampler_opts so;
        ckv_sampler_opts_default(&so);
        so.temperature = g->temperature;
        so.top_k = (int)CKV_MIN(g->top_k, (uint32_t)INT_MAX);
        so.top_p = g->top_p > 0 ? g->top_p : 1.0f;
        so.seed = g->seed;
        r->max_tokens = g->max_tokens ? g->max_tokens : (uint32_t)w->cfg.default_max_tokens;
        so.max_tokens = (int)CKV_MIN(r->max_tokens, (uint32_t)(max_ctx - n));
        if ((rc = ckv_sampler_init(&r->smp, &so, w->info->n_vocab, err, sizeof(err))) < 0)
            goto bad;
        r->smp_live = true;
        if ((rc = ckv_engine_seq_new(w->e, &kv, &r->seq, err, sizeof(err))) < 0) {
            r->seq = -1;
            goto bad;
        }
        r->no_text = g->no_text;
        tokenizer_stream_init(&r->ts, w->tok, false);
        r->n_prompt = n;
        r->t_admit_us = ckv_now_us();
        /* the slot counts as taken during the prefill (heartbeats report it) */
        r->next = w->active;
        w->active = r;
        w->n_active++;
        prefills++;
        rc = ckv_engine_prefill(w->e, r->seq, ids, n, w->logits, on_progress, w);
        free(ids);
        ids = NULL;
        ckv_wire_free(r->gen);
        r->gen = NULL;
        if (rc < 0) {
            LOG_ERROR("job %llu: prefill of %d tokens: %s", (unsigned long long)r->job_id, n,
                      ckv_strerror(rc));
            send_error(w, r->job_id, CKV__ERROR_CODE__ERROR_CODE_INTERNAL, "prefill: %s",
                       ckv_strerror(rc));
            w->requests_failed++;
            end_active(w, r);
            continue;
        }
        r->prefill_ms = (double)(ckv_now_us() - r->t_admit_us) / 1e3;
        w->prompt_tokens += (uint64_t)n;
        if (!take_token(w, r, ckv_sampler_sample(&r->smp, w->logits)))
            end_active(w, r);
        continue;
    bad:
        free(ids);
        w->bad_requests++;
        LOG_INFO("job %llu refused: %s", (unsigned long long)r->job_id, err);
        send_error(w, r->job_id,
                   rc == -EINVAL ? CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST
                                 : CKV__ERROR_CODE__ERROR_CODE_INTERNAL,
                   "%s", err);
        req_free(w, r);
    }
}

/* One decode step over every active sequence. */
static void step(struct worker *w)
{
    if (w->n_active == 0)
        return;
    int n = 0;
    for (struct req *r = w->active; r; r = r->next) {
        w->seqs[n] = r->seq;
        w->tokens[n] = r->next_token;
        n++;
    }
    uint64_t t0 = ckv_now_us();
    int rc = ckv_engine_decode(w->e, w->seqs, w->tokens, n, w->logits);
    if (rc < 0) {
        LOG_ERROR("decode step of %d sequences: %s", n, ckv_strerror(rc));
        while (w->active) {
            struct req *r = w->active;
            send_error(w, r->job_id, CKV__ERROR_CODE__ERROR_CODE_INTERNAL, "decode: %s",
                       ckv_strerror(rc));
            w->requests_failed++;
            end_active(w, r);
        }
        return;
    }
    double dt = (double)(ckv_now_us() - t0) / 1e6;
    if (dt > 0)
        w->tok_s = w->steps ? 0.9 * w->tok_s + 0.1 * (n / dt) : n / dt;
    w->steps++;
    int i = 0;
    for (struct req *r = w->active, *next; r; r = next, i++) {
        next = r->next;
        const float *lg = w->logits + (size_t)i * (size_t)w->info->n_vocab;
        if (!take_token(w, r, ckv_sampler_sample(&r->smp, lg)))
            end_active(w, r);
    }
}

static struct req *find_req(struct req *head, uint64_t job_id)
{
    for (struct req *r = head; r; r = r->next)
        if (r->job_id == job_id)
            return r;
    return NULL;
}

/* ---- messages from the router ---- */

static void on_generate(struct worker *w, Ckv__Envelope *env)
{
    uint64_t id = env->request_id;
    if (find_req(w->active, id) || find_req(w->waiting, id)) {
        send_error(w, id, CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST, "job %llu is already here",
                   (unsigned long long)id);
        ckv_wire_free(env);
        return;
    }
    if (w->n_active >= w->cfg.max_seqs && w->n_waiting >= w->cfg.queue_max) {
        send_error(w, id, CKV__ERROR_CODE__ERROR_CODE_OVERLOADED,
                   "worker %s: %d sequences busy and %d waiting", w->cfg.name, w->n_active,
                   w->n_waiting);
        ckv_wire_free(env);
        return;
    }
    struct req *r = calloc(1, sizeof(*r));
    if (!r) {
        send_error(w, id, CKV__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
        ckv_wire_free(env);
        return;
    }
    r->job_id = id;
    r->gen = env;
    r->seq = -1;
    r->max_tokens =
        env->generate->max_tokens ? env->generate->max_tokens : (uint32_t)w->cfg.default_max_tokens;
    struct req **p = &w->waiting;
    while (*p)
        p = &(*p)->next;
    *p = r;
    w->n_waiting++;
}

static void on_cancel(struct worker *w, uint64_t id)
{
    struct req *r = find_req(w->waiting, id);
    if (r) {
        list_remove(&w->waiting, r);
        w->n_waiting--;
        req_free(w, r);
        w->cancelled++;
        return;
    }
    if ((r = find_req(w->active, id))) {
        LOG_DEBUG("job %llu cancelled after %d tokens", (unsigned long long)id, r->generated);
        end_active(w, r);
        w->cancelled++;
    }
}

/* Compute thread: what the I/O thread relayed from the router. */
static void on_pipe(struct worker *w)
{
    for (int n = 0; n < 256; n++) {
        struct ckv_wire_addr from;
        Ckv__Envelope *env;
        int rc = ckv_wire_recv(w->pipe_cpu, &from, &env, w->cfg.max_msg_bytes, ZMQ_DONTWAIT);
        if (rc == -EAGAIN)
            return;
        if (rc) {
            LOG_ERROR("pipe: %s", ckv_strerror(rc));
            return;
        }
        switch (env->body_case) {
        case CKV__ENVELOPE__BODY_GENERATE: on_generate(w, env); continue; /* owned there */
        case CKV__ENVELOPE__BODY_CANCEL: on_cancel(w, env->request_id); break;
        case CKV__ENVELOPE__BODY_ERROR:
            /* the router forgot us (the I/O thread registers again): the jobs it had given
             * us are gone on its side */
            while (w->active)
                end_active(w, w->active);
            while (w->waiting) {
                struct req *r = w->waiting;
                w->waiting = r->next;
                req_free(w, r);
            }
            w->n_waiting = 0;
            break;
        default:
            send_error(w, env->request_id, CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE,
                       "the worker does not handle message type %d", (int)env->body_case);
        }
        ckv_wire_free(env);
    }
}

/* I/O thread: messages from the router; requests go on to the compute thread. */
static void on_router(struct worker *w)
{
    for (int n = 0; n < 256; n++) {
        struct ckv_wire_addr from;
        Ckv__Envelope *env;
        int rc = ckv_wire_recv(w->router, &from, &env, w->cfg.max_msg_bytes, ZMQ_DONTWAIT);
        if (rc == -EAGAIN)
            return;
        if (rc) {
            LOG_WARN("bad frame from the router: %s", ckv_strerror(rc));
            if (!ckv_wire_rc_is_peer_fault(rc))
                return;
            if (from.request_id)
                ckv_wire_reply_error(w->router, NULL, ckv_wire_error_code(rc), "%s",
                                     ckv_strerror(rc));
            continue;
        }
        switch (env->body_case) {
        case CKV__ENVELOPE__BODY_GENERATE:
        case CKV__ENVELOPE__BODY_CANCEL: send_pipe_io(w, env); break;
        case CKV__ENVELOPE__BODY_WORKER_REGISTER_REPLY:
            if (!w->registered)
                LOG_INFO("registered at %s as %s", w->router_ep, w->cfg.name);
            w->registered = true;
            if (env->worker_register_reply->heartbeat_ms)
                w->hb_ms = (int)env->worker_register_reply->heartbeat_ms;
            w->next_hb_ms = ckv_now_ms() + (uint64_t)w->hb_ms;
            break;
        case CKV__ENVELOPE__BODY_ERROR:
            if (env->error->code == CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND) {
                LOG_WARN("the router does not know this worker: registering again");
                w->registered = false;
                send_pipe_io(w, env); /* the compute thread drops its jobs */
                send_register(w);
            } else {
                LOG_WARN("router error: %s", env->error->message ? env->error->message : "");
            }
            break;
        case CKV__ENVELOPE__BODY_PING: {
            Ckv__Envelope rep = CKV__ENVELOPE__INIT;
            Ckv__Pong p = CKV__PONG__INIT;
            p.nonce = env->ping->nonce;
            rep.request_id = env->request_id;
            rep.body_case = CKV__ENVELOPE__BODY_PONG;
            rep.pong = &p;
            send_router(w, &rep);
            break;
        }
        default: {
            LOG_WARN("router sent message type %d", (int)env->body_case);
            Ckv__Envelope rep = CKV__ENVELOPE__INIT;
            Ckv__Error e = CKV__ERROR__INIT;
            e.code = CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE;
            e.message = "the worker does not handle this message type";
            rep.request_id = env->request_id;
            rep.body_case = CKV__ENVELOPE__BODY_ERROR;
            rep.error = &e;
            send_router(w, &rep);
        }
        }
        ckv_wire_free(env);
    }
}

/* I/O thread: the compute thread's messages go to the router as they are (no decoding). */
static void on_pipe_io(struct worker *w)
{
    for (int n = 0; n < 1024; n++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, w->pipe_io, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        if (zmq_msg_send(&m, w->router, ZMQ_DONTWAIT) < 0) {
            LOG_WARN("send to the router: %s", zmq_strerror(errno));
            zmq_msg_close(&m);
        }
    }
}

/* ---- stats ---- */

/* I/O thread: from the compute thread's last snapshot. */
static void render_stats(struct worker *w, bool prometheus, struct ckv_buf *b)
{
    pthread_mutex_lock(&w->mu);
    struct snapshot s = w->snap;
    pthread_mutex_unlock(&w->mu);
    struct ckv_stats_writer sw;
    ckv_stats_begin(&sw, b, prometheus, "ckv_worker");
    ckv_stats_section(&sw, "Worker");
    ckv_stats_text(&sw, "name", "worker name", w->cfg.name);
    ckv_stats_text(&sw, "model", "model name", w->info->name);
    ckv_stats_gauge(&sw, "uptime_s", "seconds since start",
                    (double)(ckv_now_ms() - w->t_start_ms) / 1e3);
    ckv_stats_gauge(&sw, "registered", "1 when the router knows this worker", w->registered);
    ckv_stats_section(&sw, "Requests");
    ckv_stats_gauge(&sw, "active", "sequences being generated", s.n_active);
    ckv_stats_gauge(&sw, "waiting", "requests waiting for a slot", s.n_waiting);
    ckv_stats_gauge(&sw, "capacity", "sequences at once", w->cfg.max_seqs);
    ckv_stats_counter(&sw, "requests_done", "requests finished", s.requests_done);
    ckv_stats_counter(&sw, "requests_failed", "requests ended by an error", s.requests_failed);
    ckv_stats_counter(&sw, "bad_requests", "requests refused as malformed", s.bad_requests);
    ckv_stats_counter(&sw, "cancelled", "requests cancelled", s.cancelled);
    ckv_stats_counter(&sw, "tokens_generated", "tokens generated", s.tokens_generated);
    ckv_stats_counter(&sw, "prompt_tokens", "prompt tokens prefilled", s.prompt_tokens);
    ckv_stats_section(&sw, "Engine");
    ckv_stats_counter(&sw, "decode_steps", "batched decode steps", s.es.decode_steps);
    ckv_stats_gauge(&sw, "decode_tok_s", "recent decode speed, all sequences", s.tok_s);
    ckv_stats_gauge(&sw, "prefill_ms", "time in prefill", s.es.prefill_ms);
    ckv_stats_gauge(&sw, "decode_ms", "time in decode", s.es.decode_ms);
    ckv_stats_gauge(&sw, "attn_ms", "time in attention", s.es.attn_ms);
    ckv_stats_counter(&sw, "kv_cache_hits", "cluster cache hits", s.es.kv.cache_hits);
    ckv_stats_counter(&sw, "kv_cache_misses", "cluster cache misses", s.es.kv.cache_misses);
    ckv_stats_counter(&sw, "clusters_made", "clusters made by k-means", s.es.kv.clusters_made);
    if (s.have_ks) {
        ckv_stats_section(&sw, "Kvstore");
        ckv_stats_counter(&sw, "store_puts", "put calls", s.ks.puts);
        ckv_stats_counter(&sw, "store_clusters_put", "clusters written", s.ks.clusters_put);
        ckv_stats_counter(&sw, "store_gets", "get calls", s.ks.gets);
        ckv_stats_counter(&sw, "store_clusters_got", "clusters read", s.ks.clusters_got);
        ckv_stats_counter(&sw, "store_errors", "failed store calls", s.ks.errors);
        ckv_stats_gauge(&sw, "store_blocks_used", "blocks in use in the store (all workers)",
                        (double)s.store_blocks_used);
        ckv_stats_gauge(&sw, "store_blocks_total", "blocks of the store's pool",
                        (double)s.store_blocks_total);
    }
}

static void on_stats_sock(struct worker *w)
{
    for (int n = 0; n < 64; n++) {
        struct ckv_wire_addr from;
        Ckv__Envelope *env;
        int rc = ckv_wire_recv(w->stats_sock, &from, &env, 65536, ZMQ_DONTWAIT);
        if (rc == -EAGAIN)
            return;
        if (rc) {
            if (ckv_wire_rc_is_peer_fault(rc))
                ckv_wire_reply_error(w->stats_sock, &from, ckv_wire_error_code(rc), "%s",
                                     ckv_strerror(rc));
            continue;
        }
        if (env->body_case != CKV__ENVELOPE__BODY_STATS_REQUEST) {
            ckv_wire_reply_error(w->stats_sock, &from, CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE,
                                 "this socket answers StatsRequest only");
        } else {
            struct ckv_buf b = {0};
            render_stats(w, env->stats_request->prometheus, &b);
            Ckv__Envelope rep = CKV__ENVELOPE__INIT;
            Ckv__StatsReply sr = CKV__STATS_REPLY__INIT;
            sr.text = b.data ? b.data : "";
            rep.request_id = env->request_id;
            rep.body_case = CKV__ENVELOPE__BODY_STATS_REPLY;
            rep.stats_reply = &sr;
            ckv_wire_send(w->stats_sock, &from, &rep, ZMQ_DONTWAIT);
            ckv_buf_free(&b);
        }
        ckv_wire_free(env);
    }
}

/* ---- setup and loop ---- */

static int worker_open(struct worker *w, char *err, size_t errlen)
{
    struct worker_config *cfg = &w->cfg;
    int rc;
    if (!cfg->model[0])
        ckv_engine_default_model(cfg->model, sizeof(cfg->model));
    if (!cfg->name[0])
        snprintf(cfg->name, sizeof(cfg->name), "worker-%d", (int)getpid());
    if (cfg->router_endpoint[0])
        snprintf(w->router_ep, sizeof(w->router_ep), "%s", cfg->router_endpoint);
    else
        snprintf(w->router_ep, sizeof(w->router_ep), "ipc://%s/router-workers.sock", cfg->run_dir);
    if (cfg->kvstore_endpoint[0]) {
        char name[96];
        snprintf(name, sizeof(name), "ckv-worker %s", cfg->name);
        if ((rc = ckv_block_store_kvs_new(cfg->kvstore_endpoint, name, cfg->kvstore_timeout_ms, 0,
                                          &w->store, err, errlen)) < 0)
            return rc;
        LOG_INFO("clusters go to ckv-kvstore at %s", cfg->kvstore_endpoint);
    }
    struct ckv_engine_opts eo;
    ckv_engine_opts_default(&eo);
    eo.model_path = cfg->model;
    eo.n_threads = cfg->threads;
    eo.max_seqs = cfg->max_seqs;
    eo.max_ctx = cfg->max_ctx;
    eo.prefill_chunk = cfg->prefill_chunk;
    eo.kv.method = (enum ckv_kv_method)cfg->method;
    eo.kv.select_mode = (enum ckv_select_mode)cfg->select;
    eo.kv.budget = cfg->budget;
    eo.kv.sinks = cfg->sinks;
    eo.kv.window = cfg->window;
    eo.kv.tokens_per_cluster = cfg->tokens_per_cluster;
    eo.kv.full_layers = cfg->full_layers;
    eo.kv.cache_blocks = cfg->cache_blocks;
    eo.store = w->store;
    if ((rc = ckv_engine_open(&eo, &w->e, err, errlen)) < 0)
        return rc;
    w->info = ckv_engine_info(w->e);
    w->tok = ckv_engine_tokenizer(w->e);
    size_t bb = ckv_block_bytes(w->info->head_dim, eo.kv.dtype);
    if (w->store && w->store->block_bytes != bb)
        return ckv_errorf(-EINVAL, err, errlen,
                          "ckv-kvstore at %s has %zu-byte blocks, %s needs %zu (head_dim %d): "
                          "start the store with --head-dim %d",
                          cfg->kvstore_endpoint, w->store->block_bytes, w->info->name, bb,
                          w->info->head_dim, w->info->head_dim);
    w->logits = malloc((size_t)cfg->max_seqs * (size_t)w->info->n_vocab * sizeof(float));
    w->seqs = malloc((size_t)cfg->max_seqs * sizeof(int));
    w->tokens = malloc((size_t)cfg->max_seqs * sizeof(int32_t));
    if (!w->logits || !w->seqs || !w->tokens)
        return ckv_errorf(-ENOMEM, err, errlen, "out of memory");
    LOG_INFO("model %s (%s, %d layers, %s), %s, %d sequences, method %s", w->info->name,
             w->info->arch, w->info->n_layers, w->info->weight_type,
             ckv_ctx_describe(ckv_engine_ctx(w->e)), cfg->max_seqs,
             ckv_kv_method_names[cfg->method]);

    w->zctx = zmq_ctx_new();
    w->pipe_io = zmq_socket(w->zctx, ZMQ_PAIR);
    w->pipe_cpu = zmq_socket(w->zctx, ZMQ_PAIR);
    if (!w->pipe_io || !w->pipe_cpu || zmq_bind(w->pipe_io, "inproc://worker-pipe") != 0 ||
        zmq_connect(w->pipe_cpu, "inproc://worker-pipe") != 0)
        return ckv_errorf(-EIO, err, errlen, "inproc pipe: %s", zmq_strerror(errno));
    int big = 0; /* no high-water mark on the pipe: the threads never drop each other's work */
    zmq_setsockopt(w->pipe_io, ZMQ_SNDHWM, &big, sizeof(big));
    zmq_setsockopt(w->pipe_io, ZMQ_RCVHWM, &big, sizeof(big));
    zmq_setsockopt(w->pipe_cpu, ZMQ_SNDHWM, &big, sizeof(big));
    zmq_setsockopt(w->pipe_cpu, ZMQ_RCVHWM, &big, sizeof(big));
    w->router = zmq_socket(w->zctx, ZMQ_DEALER);
    if (!w->router)
        return ckv_errorf(-errno, err, errlen, "zmq_socket: %s", zmq_strerror(errno));
    if ((rc = ckv_wire_socket_setup(w->router, cfg->max_msg_bytes)) < 0)
        return ckv_errorf(rc, err, errlen, "socket setup: %s", ckv_strerror(rc));
    int hwm = 100000;
    zmq_setsockopt(w->router, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    if (zmq_connect(w->router, w->router_ep) != 0)
        return ckv_errorf(-errno, err, errlen, "connect %s: %s", w->router_ep, zmq_strerror(errno));
    if (cfg->stats_endpoint[0]) {
        w->stats_sock = zmq_socket(w->zctx, ZMQ_ROUTER);
        if (!w->stats_sock || ckv_wire_socket_setup(w->stats_sock, 65536) < 0)
            return ckv_errorf(-EIO, err, errlen, "stats socket: %s", zmq_strerror(errno));
        if (strncmp(cfg->stats_endpoint, "ipc://", 6) == 0)
            unlink(cfg->stats_endpoint + 6);
        if (zmq_bind(w->stats_sock, cfg->stats_endpoint) != 0)
            return ckv_errorf(-errno, err, errlen, "bind %s: %s", cfg->stats_endpoint,
                              zmq_strerror(errno));
        if (strncmp(cfg->stats_endpoint, "ipc://", 6) == 0)
            chmod(cfg->stats_endpoint + 6, 0600);
    }
    w->hb_ms = cfg->heartbeat_ms;
    w->t_start_ms = ckv_now_ms();
    publish(w);
    return 0;
}

static void worker_close(struct worker *w)
{
    while (w->active)
        end_active(w, w->active);
    while (w->waiting) {
        struct req *r = w->waiting;
        w->waiting = r->next;
        req_free(w, r);
    }
    void **socks[] = {&w->router, &w->stats_sock, &w->pipe_io, &w->pipe_cpu};
    for (size_t i = 0; i < CKV_ARRAY_LEN(socks); i++)
        if (*socks[i]) {
            zmq_close(*socks[i]);
            *socks[i] = NULL;
        }
    if (w->cfg.stats_endpoint[0] && strncmp(w->cfg.stats_endpoint, "ipc://", 6) == 0)
        unlink(w->cfg.stats_endpoint + 6);
    if (w->zctx)
        zmq_ctx_term(w->zctx);
    ckv_engine_close(&w->e);
    ckv_block_store_destroy(&w->store); /* after the engine: its sequences drop into it */
    free(w->logits);
    free(w->seqs);
    free(w->tokens);
}

/* The compute thread: the engine's loop until stop, then every request fails. */
static void *compute_main(void *arg)
{
    struct worker *w = arg;
    while (!w->stop) {
        bool busy = w->n_active > 0 || (w->waiting && w->n_active < w->cfg.max_seqs);
        zmq_pollitem_t it = {.socket = w->pipe_cpu, .events = ZMQ_POLLIN};
        int rc = zmq_poll(&it, 1, busy ? 0 : 100);
        if (rc < 0 && errno != EINTR) {
            LOG_ERROR("zmq_poll (compute): %s", zmq_strerror(errno));
            break;
        }
        if (rc > 0)
            on_pipe(w);
        admit(w);
        step(w);
        publish(w);
    }
    LOG_INFO("stopping: %d active and %d waiting requests fail", w->n_active, w->n_waiting);
    while (w->active) {
        send_error(w, w->active->job_id, CKV__ERROR_CODE__ERROR_CODE_UNAVAILABLE,
                   "worker %s is stopping", w->cfg.name);
        end_active(w, w->active);
    }
    while (w->waiting) {
        struct req *r = w->waiting;
        w->waiting = r->next;
        send_error(w, r->job_id, CKV__ERROR_CODE__ERROR_CODE_UNAVAILABLE, "worker %s is stopping",
                   w->cfg.name);
        req_free(w, r);
    }
    w->n_waiting = 0;
    atomic_store(&w->compute_done, true);
    return NULL;
}

/* The I/O thread's loop: router, pipe, stats socket, heartbeats. Runs until the compute
 * thread has finished (after stop), so that its last errors reach the router. */
static int worker_run(struct worker *w)
{
    pthread_t th;
    int rc = pthread_create(&th, NULL, compute_main, w);
    if (rc) {
        LOG_ERROR("compute thread: %s", strerror(rc));
        return -rc;
    }
    send_register(w);
    while (!atomic_load(&w->compute_done)) {
        zmq_pollitem_t items[3] = {
            {.socket = w->router, .events = ZMQ_POLLIN},
            {.socket = w->pipe_io, .events = ZMQ_POLLIN},
            {.socket = w->stats_sock, .events = ZMQ_POLLIN},
        };
        int n_items = w->stats_sock ? 3 : 2;
        uint64_t now = ckv_now_ms();
        uint64_t wake = w->registered ? w->next_hb_ms : w->last_register_ms + 1000;
        long timeout = wake > now ? (long)(wake - now) : 0;
        if (w->stop) /* waiting for the compute thread: look often */
            timeout = CKV_MIN(timeout, 20);
        rc = zmq_poll(items, n_items, timeout);
        if (rc < 0 && errno != EINTR) {
            LOG_ERROR("zmq_poll: %s", zmq_strerror(errno));
            w->stop = 1;
            break;
        }
        if (rc > 0) {
            if (items[0].revents & ZMQ_POLLIN)
                on_router(w);
            if (items[1].revents & ZMQ_POLLIN)
                on_pipe_io(w);
            if (n_items > 2 && (items[2].revents & ZMQ_POLLIN))
                on_stats_sock(w);
        }
        heartbeat_if_due(w);
    }
    pthread_join(th, NULL);
    on_pipe_io(w); /* the compute thread's last words */
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    static struct worker w;
    static const struct ckv_main_spec spec = {
        .prog = "ckv-worker",
        .usage = "usage: ckv-worker [--config FILE] [--name value ...]\n"
                 "       ckv-worker --dump-config [options]    print the effective config\n\n"
                 "options (config file lines are `name value`; see deploy/worker.conf):\n",
        .table = worker_options,
    };
    int rc = ckv_main_config(&spec, &w.cfg, NULL, argc, argv);
    if (rc)
        return rc == 1 ? 0 : rc;
    if ((rc = ckv_main_log("ckv-worker", w.cfg.log_level, w.cfg.log_file)))
        return rc;
    ckv_config_log(worker_options, &w.cfg);
    pthread_mutex_init(&w.mu, NULL);
    the_worker = &w;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    char err[1024];
    rc = worker_open(&w, err, sizeof(err));
    if (rc < 0) {
        LOG_ERROR("%s", err);
        worker_close(&w);
        return 1;
    }
    rc = worker_run(&w);
    worker_close(&w);
    LOG_INFO("stopped");
    return rc ? 1 : 0;
}
