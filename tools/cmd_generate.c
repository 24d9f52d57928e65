/*
 * ckv generate: one request through a running stack (ckv-router -> ckv-worker): sends a
 * Generate, prints the text as it streams, then the timings (time to first token, speed,
 * where the time went). Ctrl-C cancels the request on the worker.
 *
 *   ckv generate [--router ENDPOINT] -p PROMPT [--chat] [-n MAX_TOKENS]
 *                [--temp T --top-k K --top-p P --seed S] [--method M --budget B]
 *                [--session ID] [--json] [--timeout-ms MS]
 *
 * Exit status: 0 after Done, 1 after an Error (its code and message on stderr), 2 for bad
 * options, 3 when the router did not answer in time, 130 when cancelled.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_cmds.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_main.h"
#include "ckv_wire.h"

struct gen_cfg {
    char router[512];
    char prompt[65536];
    bool chat, json;
    int max_tokens;
    double temp, top_p;
    int top_k, seed;
    char method[32];
    int budget;
    char session[128];
    int timeout_ms;
};

static const struct ckv_config_opt gen_options[] = {
    CKV_OPT_STRING(struct gen_cfg, router, "router", "ipc:///tmp/ckv/router.sock",
                   "the router's client endpoint"),
    CKV_OPT_STRING(struct gen_cfg, prompt, "prompt", "", "prompt text (-p)"),
    CKV_OPT_BOOL(struct gen_cfg, chat, "chat", "no",
                 "wrap the prompt in the model's chat template"),
    CKV_OPT_INT(struct gen_cfg, max_tokens, "max-tokens", "128", 1, 1 << 24,
                "tokens to generate at most (-n)"),
    CKV_OPT_DOUBLE(struct gen_cfg, temp, "temp", "0", 0, 100, "temperature; 0: greedy"),
    CKV_OPT_INT(struct gen_cfg, top_k, "top-k", "0", 0, 1 << 24, "top-k; 0: off"),
    CKV_OPT_DOUBLE(struct gen_cfg, top_p, "top-p", "1", 0.0001, 1, "top-p; 1: off"),
    CKV_OPT_INT(struct gen_cfg, seed, "seed", "1", 0, 2147483647, "sampling seed"),
    CKV_OPT_STRING(struct gen_cfg, method, "method", "",
                   "KV method (full, clusterkv, quest, streaming); empty: the worker's"),
    CKV_OPT_INT(struct gen_cfg, budget, "budget", "0", 0, 1 << 24,
                "tokens attended per selection unit; 0: the worker's"),
    CKV_OPT_STRING(struct gen_cfg, session, "session", "",
                   "session id: the requests of a session go to one worker"),
    CKV_OPT_BOOL(struct gen_cfg, json, "json", "no",
                 "print the text and timings as one JSON object on stdout"),
    CKV_OPT_INT(struct gen_cfg, timeout_ms, "timeout-ms", "120000", 1, 86400000,
                "give up when nothing arrives for this long"),
    CKV_OPT_END,
};

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void send_cancel(void *sock, uint64_t id)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Cancel c = CKV__CANCEL__INIT;
    env.request_id = id;
    env.body_case = CKV__ENVELOPE__BODY_CANCEL;
    env.cancel = &c;
    ckv_wire_send(sock, NULL, &env, 0);
}

int ckv_cmd_generate(int argc, char **argv)
{
    static struct gen_cfg cfg;
    static const char *const aliases[] = {"-p", "--prompt", "-n", "--max-tokens", NULL};
    static const struct ckv_main_spec spec = {
        .prog = "ckv generate",
        .usage = "usage: ckv generate [--router ENDPOINT] -p PROMPT [-n MAX_TOKENS] [options]\n"
                 "  -p PROMPT = --prompt, -n N = --max-tokens\n",
        .table = gen_options,
        .aliases = aliases,
    };
    int rc = ckv_main_config(&spec, &cfg, NULL, argc, argv);
    if (rc)
        return rc == 1 ? 0 : rc;
    if (!cfg.prompt[0]) {
        fprintf(stderr, "ckv generate: a prompt is required (-p TEXT)\n");
        return 2;
    }

    void *zctx = zmq_ctx_new();
    void *sock = zmq_socket(zctx, ZMQ_DEALER);
    if ((rc = ckv_wire_socket_setup(sock, CKV_WIRE_DEFAULT_MAX_BYTES)) < 0 ||
        zmq_connect(sock, cfg.router) != 0) {
        fprintf(stderr, "ckv generate: %s: %s\n", cfg.router,
                rc < 0 ? ckv_strerror(rc) : zmq_strerror(errno));
        zmq_close(sock);
        zmq_ctx_term(zctx);
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_sigint};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);

    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Generate g = CKV__GENERATE__INIT;
    g.prompt = cfg.prompt;
    g.chat = cfg.chat;
    g.max_tokens = (uint32_t)cfg.max_tokens;
    g.temperature = (float)cfg.temp;
    g.top_k = (uint32_t)cfg.top_k;
    g.top_p = (float)cfg.top_p;
    g.seed = (uint64_t)cfg.seed;
    g.method = cfg.method;
    g.budget = (uint32_t)cfg.budget;
    g.session_id = cfg.session;
    uint64_t id = (ckv_wall_ms() << 16) ^ (uint64_t)getpid();
    if (id == 0)
        id = 1;
    env.request_id = id;
    env.body_case = CKV__ENVELOPE__BODY_GENERATE;
    env.generate = &g;
    uint64_t t0 = ckv_now_us(), t_first = 0;
    int status = 3;
    if ((rc = ckv_wire_send(sock, NULL, &env, 0)) < 0) {
        fprintf(stderr, "ckv generate: send: %s\n", ckv_strerror(rc));
        goto out;
    }
    struct ckv_buf text = {0};
    int n_tokens = 0;
    bool cancelled = false;
    uint64_t last = ckv_now_ms();
    for (;;) {
        if (interrupted && !cancelled) {
            send_cancel(sock, id);
            cancelled = true;
            last = ckv_now_ms();
        }
        zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLIN};
        int pr = zmq_poll(&it, 1, 200);
        if (pr < 0 && errno != EINTR)
            break;
        if (pr <= 0) {
            uint64_t limit = cancelled ? 2000 : (uint64_t)cfg.timeout_ms;
            if (ckv_now_ms() - last > limit) {
                fprintf(stderr, "\nckv generate: nothing from %s for %llu ms\n", cfg.router,
                        (unsigned long long)limit);
                status = cancelled ? 130 : 3;
                break;
            }
            continue;
        }
        struct ckv_wire_addr from;
        Ckv__Envelope *rep;
        rc = ckv_wire_recv(sock, &from, &rep, CKV_WIRE_DEFAULT_MAX_BYTES, ZMQ_DONTWAIT);
        if (rc == -EAGAIN)
            continue;
        if (rc) {
            fprintf(stderr, "\nckv generate: bad reply: %s\n", ckv_strerror(rc));
            status = 1;
            break;
        }
        last = ckv_now_ms();
        if (rep->request_id != id) {
            ckv_wire_free(rep);
            continue;
        }
        if (rep->body_case == CKV__ENVELOPE__BODY_TOKEN_EVENT) {
            if (!t_first)
                t_first = ckv_now_us();
            n_tokens++;
            ProtobufCBinaryData *p = &rep->token_event->text;
            ckv_buf_append(&text, p->data, p->len);
            if (!cfg.json && p->len) {
                fwrite(p->data, 1, p->len, stdout);
                fflush(stdout);
            }
            ckv_wire_free(rep);
            continue;
        }
        if (rep->body_case == CKV__ENVELOPE__BODY_DONE) {
            const Ckv__Done *d = rep->done;
            ckv_buf_append(&text, d->text.data, d->text.len);
            double total_ms = (double)(ckv_now_us() - t0) / 1e3;
            double ttft_ms = t_first ? (double)(t_first - t0) / 1e3 : 0;
            double tok_s = d->decode_ms > 0 && d->generated_tokens > 1
                               ? (d->generated_tokens - 1) * 1e3 / d->decode_ms
                               : 0;
            if (cfg.json) {
                struct ckv_buf j = {0};
                ckv_buf_printf(&j, "{\"text\": ");
                ckv_buf_json_str(&j, text.data ? text.data : "", text.len);
                ckv_buf_printf(&j,
                               ", \"prompt_tokens\": %u, \"generated_tokens\": %u, "
                               "\"finish_reason\": \"%s\", \"worker\": ",
                               d->prompt_tokens, d->generated_tokens,
                               d->finish_reason ? d->finish_reason : "");
                ckv_buf_json_str(&j, d->worker ? d->worker : "", d->worker ? strlen(d->worker) : 0);
                ckv_buf_printf(&j,
                               ", \"ttft_ms\": %.3f, \"total_ms\": %.3f, \"queue_ms\": %.3f, "
                               "\"prefill_ms\": %.3f, \"decode_ms\": %.3f, "
                               "\"router_ttft_ms\": %.3f, \"decode_tok_s\": %.2f}\n",
                               ttft_ms, total_ms, d->queue_ms, d->prefill_ms, d->decode_ms,
                               d->ttft_ms, tok_s);
                fwrite(j.data, 1, j.len, stdout);
                ckv_buf_free(&j);
            } else {
                if (d->text.len) /* data is NULL when empty */
                    fwrite(d->text.data, 1, d->text.len, stdout);
                fputc('\n', stdout);
                fprintf(stderr,
                        "\n%u prompt + %u generated tokens (%s) on %s\n"
                        "time to first token %.1f ms (queue %.1f, prefill %.1f), decode %.1f "
                        "ms, %.1f tokens/s, total %.1f ms\n",
                        d->prompt_tokens, d->generated_tokens,
                        d->finish_reason ? d->finish_reason : "", d->worker ? d->worker : "?",
                        ttft_ms, d->queue_ms, d->prefill_ms, d->decode_ms, tok_s, total_ms);
            }
            status = 0;
        } else if (rep->body_case == CKV__ENVELOPE__BODY_ERROR) {
            bool was_cancel = rep->error->code == CKV__ERROR_CODE__ERROR_CODE_CANCELLED;
            fprintf(stderr, "%sckv generate: error %d: %s\n", n_tokens ? "\n" : "",
                    (int)rep->error->code, rep->error->message ? rep->error->message : "");
            status = was_cancel ? 130 : 1;
        } else {
            fprintf(stderr, "ckv generate: unexpected message type %d\n", (int)rep->body_case);
            status = 1;
        }
        ckv_wire_free(rep);
        break;
    }
    ckv_buf_free(&text);
out:
    zmq_close(sock);
    zmq_ctx_term(zctx);
    return status;
}
