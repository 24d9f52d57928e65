/*
 * ckv top: a live table of the served stack, from the StatsSnapshot the router publishes on
 * its PUB socket every second: requests waiting and running, throughput, latency, and one row
 * per worker.
 *
 *   ckv top [--stats ENDPOINT] [--once] [--timeout-ms MS]
 *
 * --once prints one snapshot and exits (0, or 1 when none came within the timeout).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_cmds.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_wire.h"

struct top_cfg {
    char stats[512];
    bool once;
    int timeout_ms;
};

static const struct ckv_config_opt top_options[] = {
    CKV_OPT_STRING(struct top_cfg, stats, "stats", "ipc:///tmp/ckv/router-stats.sock",
                   "the router's stats PUB endpoint"),
    CKV_OPT_BOOL(struct top_cfg, once, "once", "no", "print one snapshot and exit"),
    CKV_OPT_INT(struct top_cfg, timeout_ms, "timeout-ms", "5000", 1, 86400000,
                "give up when no snapshot comes for this long"),
    CKV_OPT_END,
};

static volatile sig_atomic_t stop;

static void on_sigint(int sig)
{
    (void)sig;
    stop = 1;
}

static void print_snapshot(const Ckv__StatsSnapshot *s, bool clear)
{
    if (clear)
        fputs("\033[H\033[2J", stdout);
    printf("ckv-router up %.0f s   waiting %u   running %u   %.1f tokens/s\n", s->uptime_s,
           s->waiting, s->running, s->tok_s);
    printf("requests %llu  done %llu  failed %llu  rejected %llu   tokens: prompt %llu, "
           "generated %llu\n",
           (unsigned long long)s->requests_total, (unsigned long long)s->requests_done,
           (unsigned long long)s->requests_failed, (unsigned long long)s->requests_rejected,
           (unsigned long long)s->prompt_tokens, (unsigned long long)s->generation_tokens);
    printf("time to first token p50 %.1f ms   inter-token latency p50 %.1f ms\n\n", s->ttft_p50_ms,
           s->itl_p50_ms);
    printf("%-20s %-24s %4s %4s %8s %10s %8s %9s %9s %7s %8s\n", "WORKER", "MODEL", "CAP", "RUN",
           "OUTST", "TOKENS", "DONE", "TOK/S", "KV-HIT%", "STORE%", "HB-AGE");
    for (size_t i = 0; i < s->n_workers; i++) {
        const Ckv__WorkerInfo *w = s->workers[i];
        uint64_t q = w->kv_cache_hits + w->kv_cache_misses;
        char hit[16];
        if (q)
            snprintf(hit, sizeof(hit), "%.1f", 100.0 * (double)w->kv_cache_hits / (double)q);
        else
            snprintf(hit, sizeof(hit), "-");
        char store[16];
        if (w->store_blocks_total)
            snprintf(store, sizeof(store), "%.1f",
                     100.0 * (double)w->store_blocks_used / (double)w->store_blocks_total);
        else
            snprintf(store, sizeof(store), "-");
        printf("%-20.20s %-24.24s %4u %4u %8llu %10llu %8llu %9.1f %9s %7s %7.1fs\n", w->name,
               w->model, w->capacity, w->running, (unsigned long long)w->outstanding_tokens,
               (unsigned long long)w->tokens_generated, (unsigned long long)w->requests_done,
               w->decode_tok_s, hit, store, w->heartbeat_age_s);
    }
    if (s->n_workers == 0)
        printf("(no worker registered)\n");
    fflush(stdout);
}

int ckv_cmd_top(int argc, char **argv)
{
    struct top_cfg cfg;
    char err[512];
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(top_options, &u);
            printf("usage: ckv top [--stats ENDPOINT] [--once]\n%s", u.data ? u.data : "");
            ckv_buf_free(&u);
            return 0;
        }
    if (ckv_config_load(top_options, &cfg, argc - 1, argv + 1, NULL, 0, NULL, err, sizeof(err))) {
        fprintf(stderr, "ckv top: %s\n", err);
        return 2;
    }
    void *zctx = zmq_ctx_new();
    void *sock = zmq_socket(zctx, ZMQ_SUB);
    int rc = ckv_wire_socket_setup(sock, CKV_WIRE_DEFAULT_MAX_BYTES);
    if (rc == 0 &&
        (zmq_setsockopt(sock, ZMQ_SUBSCRIBE, "", 0) != 0 || zmq_connect(sock, cfg.stats) != 0))
        rc = -errno;
    if (rc) {
        fprintf(stderr, "ckv top: %s: %s\n", cfg.stats, ckv_strerror(rc));
        zmq_close(sock);
        zmq_ctx_term(zctx);
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_sigint};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    int status = 1;
    uint64_t last = ckv_now_ms();
    bool tty = isatty(STDOUT_FILENO);
    while (!stop) {
        zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLIN};
        int pr = zmq_poll(&it, 1, 200);
        if (pr < 0 && errno != EINTR)
            break;
        if (pr <= 0) {
            if (ckv_now_ms() - last > (uint64_t)cfg.timeout_ms) {
                fprintf(stderr, "ckv top: no snapshot from %s for %d ms (is ckv-router running?)\n",
                        cfg.stats, cfg.timeout_ms);
                status = 1;
                break;
            }
            continue;
        }
        struct ckv_wire_addr from;
        Ckv__Envelope *env;
        rc = ckv_wire_recv(sock, &from, &env, CKV_WIRE_DEFAULT_MAX_BYTES, ZMQ_DONTWAIT);
        if (rc)
            continue;
        if (env->body_case == CKV__ENVELOPE__BODY_STATS_SNAPSHOT) {
            last = ckv_now_ms();
            print_snapshot(env->stats_snapshot, tty && !cfg.once);
            status = 0;
            if (cfg.once) {
                ckv_wire_free(env);
                break;
            }
        }
        ckv_wire_free(env);
    }
    if (stop)
        status = 0;
    zmq_close(sock);
    zmq_ctx_term(zctx);
    return status;
}
