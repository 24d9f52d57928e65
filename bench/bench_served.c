/*
 * ckv-bench-served: latency and throughput of a running served stack (ckv-router +
 * ckv-worker) under a fixed number of concurrent requests, as a client sees them.
 *
 *   deploy/stack.sh start
 *   build/bin/ckv-bench-served [--router ipc:///tmp/ckv/router.sock] [--requests 8]
 *                              [--concurrency 1,4] [--max-tokens 64] [--prompt TEXT]
 *                              [--chat] [--method M] [--json FILE]
 *
 * For each concurrency level C, `requests` greedy Generates of the same prompt are sent from
 * one DEALER socket, C in flight at a time (a new one as soon as one ends). Per request: time
 * to first token (send -> first TokenEvent), inter-token gaps, end-to-end time; per level:
 * tokens delivered over the wall time of the level. Prints a table, the medians, and the
 * command; --json writes the same as one object.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_wire.h"

struct bench_cfg {
    char router[512];
    int requests, max_tokens;
    char concurrency[128];
    char prompt[4096];
    bool chat;
    char method[32];
    char json[512];
};

static const struct ckv_config_opt bench_options[] = {
    CKV_OPT_STRING(struct bench_cfg, router, "router", "ipc:///tmp/ckv/router.sock",
                   "the router's client endpoint"),
    CKV_OPT_INT(struct bench_cfg, requests, "requests", "8", 1, 100000, "requests per level"),
    CKV_OPT_STRING(struct bench_cfg, concurrency, "concurrency", "1,4",
                   "comma-separated levels of requests in flight"),
    CKV_OPT_INT(struct bench_cfg, max_tokens, "max-tokens", "64", 1, 1 << 20, "tokens per request"),
    CKV_OPT_STRING(struct bench_cfg, prompt, "prompt",
                   "Explain in a few sentences why the sky is blue, for a curious ten-year-old.",
                   "prompt text"),
    CKV_OPT_BOOL(struct bench_cfg, chat, "chat", "yes", "wrap the prompt in the chat template"),
    CKV_OPT_STRING(struct bench_cfg, method, "method", "", "KV method; empty: the worker's"),
    CKV_OPT_STRING(struct bench_cfg, json, "json", "", "also write the results to this file"),
    CKV_OPT_END,
};

struct req_stat {
    uint64_t t_send, t_first, t_last, t_end;
    int tokens;
    bool failed;
};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    if (n == 0)
        return 0;
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static double pct(double *v, int n, double q)
{
    if (n == 0)
        return 0;
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    int i = (int)(q * (n - 1) + 0.5);
    return v[i];
}

static int send_one(void *s, const struct bench_cfg *cfg, uint64_t id)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Generate g = CKV__GENERATE__INIT;
    g.prompt = (char *)cfg->prompt;
    g.chat = cfg->chat;
    g.max_tokens = (uint32_t)cfg->max_tokens;
    g.method = (char *)cfg->method;
    env.request_id = id;
    env.body_case = CKV__ENVELOPE__BODY_GENERATE;
    env.generate = &g;
    return ckv_wire_send(s, NULL, &env, 0);
}

/* One level; returns 0 and fills the summary, or an error. */
static int run_level(void *s, const struct bench_cfg *cfg, int conc, uint64_t id_base,
                     struct ckv_buf *json, bool first_level)
{
    int n = cfg->requests;
    struct req_stat *st = calloc((size_t)n, sizeof(*st));
    double *gaps = malloc((size_t)n * (size_t)cfg->max_tokens * sizeof(double));
    double *ttft = malloc((size_t)n * sizeof(double)), *e2e = malloc((size_t)n * sizeof(double));
    if (!st || !gaps || !ttft || !e2e)
        return -ENOMEM;
    int n_gaps = 0, sent = 0, ended = 0, failed = 0;
    uint64_t t0 = ckv_now_us();
    while (ended < n) {
        while (sent < n && sent - ended < conc) {
            st[sent].t_send = ckv_now_us();
            int rc = send_one(s, cfg, id_base + (uint64_t)sent);
            if (rc)
                return rc;
            sent++;
        }
        zmq_pollitem_t it = {.socket = s, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 120000) <= 0) {
            fprintf(stderr, "ckv-bench-served: nothing from %s for 120 s\n", cfg->router);
            return -ETIMEDOUT;
        }
        struct ckv_wire_addr from;
        Ckv__Envelope *e;
        int rc = ckv_wire_recv(s, &from, &e, CKV_WIRE_DEFAULT_MAX_BYTES, 0);
        if (rc)
            return rc;
        uint64_t k = e->request_id - id_base;
        if (e->request_id < id_base || k >= (uint64_t)n) {
            ckv_wire_free(e);
            continue;
        }
        struct req_stat *r = &st[k];
        uint64_t now = ckv_now_us();
        if (e->body_case == CKV__ENVELOPE__BODY_TOKEN_EVENT) {
            if (r->tokens == 0)
                r->t_first = now;
            else
                gaps[n_gaps++] = (double)(now - r->t_last) / 1e3;
            r->t_last = now;
            r->tokens++;
        } else {
            if (e->body_case == CKV__ENVELOPE__BODY_ERROR) {
                fprintf(stderr, "request %llu: error %d: %s\n", (unsigned long long)k,
                        (int)e->error->code, e->error->message);
                r->failed = true;
                failed++;
            }
            r->t_end = now;
            ended++;
        }
        ckv_wire_free(e);
    }
    double wall_s = (double)(ckv_now_us() - t0) / 1e6;
    int tokens = 0, n_ok = 0;
    for (int i = 0; i < n; i++) {
        tokens += st[i].tokens;
        if (!st[i].failed && st[i].tokens) {
            ttft[n_ok] = (double)(st[i].t_first - st[i].t_send) / 1e3;
            e2e[n_ok] = (double)(st[i].t_end - st[i].t_send) / 1e3;
            n_ok++;
        }
    }
    double tok_s = tokens / wall_s;
    double ttft50 = median(ttft, n_ok), ttft90 = pct(ttft, n_ok, 0.9);
    double itl50 = median(gaps, n_gaps), itl90 = pct(gaps, n_gaps, 0.9);
    double e2e50 = median(e2e, n_ok);
    printf("%11d %8d %7d %9.1f %10.1f %10.1f %9.1f %9.1f %10.1f\n", conc, n, failed, tok_s, ttft50,
           ttft90, itl50, itl90, e2e50);
    ckv_buf_printf(json,
                   "%s\n    {\"concurrency\": %d, \"requests\": %d, \"failed\": %d, "
                   "\"tokens\": %d, \"wall_s\": %.3f, \"tok_s\": %.2f, \"ttft_ms_p50\": %.2f, "
                   "\"ttft_ms_p90\": %.2f, \"itl_ms_p50\": %.2f, \"itl_ms_p90\": %.2f, "
                   "\"e2e_ms_p50\": %.2f}",
                   first_level ? "" : ",", conc, n, failed, tokens, wall_s, tok_s, ttft50, ttft90,
                   itl50, itl90, e2e50);
    free(st);
    free(gaps);
    free(ttft);
    free(e2e);
    return 0;
}

int main(int argc, char **argv)
{
    static struct bench_cfg cfg;
    char err[512];
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(bench_options, &u);
            printf("usage: ckv-bench-served [options] (a stack must be running)\n%s",
                   u.data ? u.data : "");
            ckv_buf_free(&u);
            return 0;
        }
    if (ckv_config_load(bench_options, &cfg, argc - 1, argv + 1, NULL, 0, NULL, err, sizeof(err))) {
        fprintf(stderr, "ckv-bench-served: %s\n", err);
        return 2;
    }
    void *zctx = zmq_ctx_new();
    void *s = zmq_socket(zctx, ZMQ_DEALER);
    if (ckv_wire_socket_setup(s, CKV_WIRE_DEFAULT_MAX_BYTES) || zmq_connect(s, cfg.router)) {
        fprintf(stderr, "ckv-bench-served: %s: %s\n", cfg.router, zmq_strerror(errno));
        return 2;
    }
    printf("ckv-bench-served: %d requests of %d tokens per level, prompt %zu chars%s, router %s\n",
           cfg.requests, cfg.max_tokens, strlen(cfg.prompt), cfg.chat ? " (chat)" : "", cfg.router);
    printf("%11s %8s %7s %9s %10s %10s %9s %9s %10s\n", "concurrency", "requests", "failed",
           "tok/s", "ttft p50", "ttft p90", "itl p50", "itl p90", "e2e p50");
    struct ckv_buf json = {0};
    ckv_buf_printf(&json,
                   "{\"bench\": \"served\", \"router\": \"%s\", \"requests\": %d, "
                   "\"max_tokens\": %d, \"levels\": [",
                   cfg.router, cfg.requests, cfg.max_tokens);
    int status = 0;
    uint64_t id_base = (ckv_wall_ms() << 20) | 1;
    bool first = true;
    for (char *p = cfg.concurrency; *p;) {
        char *end;
        long c = strtol(p, &end, 10);
        if (end == p || c < 1 || c > 10000) {
            fprintf(stderr, "ckv-bench-served: --concurrency %s: expected numbers like 1,4\n",
                    cfg.concurrency);
            return 2;
        }
        int rc = run_level(s, &cfg, (int)c, id_base, &json, first);
        if (rc) {
            fprintf(stderr, "ckv-bench-served: %s\n", ckv_strerror(rc));
            status = 1;
            break;
        }
        first = false;
        id_base += (uint64_t)cfg.requests;
        p = *end == ',' ? end + 1 : end;
    }
    ckv_buf_printf(&json, "\n  ]}\n");
    printf("(times in ms; tok/s = tokens delivered over the level's wall time)\n"
           "command: build/bin/ckv-bench-served --router %s --requests %d --concurrency %s "
           "--max-tokens %d%s%s%s\n",
           cfg.router, cfg.requests, cfg.concurrency, cfg.max_tokens, cfg.chat ? "" : " --chat no",
           cfg.method[0] ? " --method " : "", cfg.method);
    if (cfg.json[0]) {
        FILE *f = fopen(cfg.json, "w");
        if (!f || fwrite(json.data, 1, json.len, f) != json.len) {
            fprintf(stderr, "ckv-bench-served: %s: %s\n", cfg.json, strerror(errno));
            status = 1;
        }
        if (f)
            fclose(f);
    }
    ckv_buf_free(&json);
    zmq_close(s);
    zmq_ctx_term(zctx);
    return status;
}
