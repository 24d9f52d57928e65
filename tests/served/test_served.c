/*
 * Suite "served": the served stack as real processes over real sockets, in a private run
 * directory (mode 0700). Two kinds of tests:
 *
 * - Router only, with scripted fake workers (raw DEALER sockets speaking router.proto): the
 *   wire rules (malformed frames, bad versions, bad requests, wrong message types get an Error,
 *   the router keeps serving), the bounded queue (`overloaded` at once), re-dispatch of a
 *   request whose worker died before starting it, the error naming the cause when it dies
 *   mid-stream, cancel reaching the worker, stats and GET /metrics. No model needed.
 * - With ckv-worker and the default model (skipped without it unless CKV_REQUIRE_MODEL=1):
 *   greedy output through router -> worker equals the engine run in this process, two
 *   concurrent requests, and kill -9 of the worker mid-stream.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include "ckv_clock.h"
#include "ckv_error.h"
#include "ckv_shm.h"
#include "ckv_test.h"
#include "ckv_wire.h"

#include "engine.h"

static char dir[256], client_ep[300], worker_ep[300], stats_ep[300];
static pid_t pids[4];
static int n_pids;
static void *zctx;
static void *socks[16]; /* closed by teardown: zmq_ctx_term waits for every socket */
static int n_socks;
static int metrics_port;
static char kvs_seg[64]; /* the store's segment of a test that starts one */

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    snprintf(client_ep, sizeof(client_ep), "ipc://%s/router.sock", dir);
    snprintf(worker_ep, sizeof(worker_ep), "ipc://%s/router-workers.sock", dir);
    snprintf(stats_ep, sizeof(stats_ep), "ipc://%s/router-stats.sock", dir);
    n_pids = 0;
    n_socks = 0;
    zctx = zmq_ctx_new();
    metrics_port = 20000 + (int)(getpid() % 20000);
}

static void teardown(void)
{
    for (int i = 0; i < n_pids; i++)
        if (pids[i] > 0)
            ckv_test_stop(pids[i], SIGKILL, 2000);
    for (int i = 0; i < n_socks; i++)
        zmq_close(socks[i]);
    if (kvs_seg[0]) /* SIGKILL leaves the segment behind */
        ckv_shm_unlink(kvs_seg);
    kvs_seg[0] = 0;
    zmq_ctx_term(zctx);
    if (getenv("CKV_TEST_KEEP")) /* the logs of a failed run */
        fprintf(stderr, "served: kept %s\n", dir);
    else
        ckv_test_rmrf(dir);
}

TestSuite(served, .init = setup, .fini = teardown, .timeout = 120);

static pid_t spawn(char **argv, const char *log)
{
    char log_path[400];
    snprintf(log_path, sizeof(log_path), "%s/%s", dir, log);
    pid_t pid = ckv_test_spawn(argv, log_path);
    cr_assert_gt(pid, 0);
    pids[n_pids++] = pid;
    return pid;
}

/* The router with a 3 s worker timeout (tests of dead workers pass a shorter one; the last
 * value of an option wins); extra options appended. */
static void start_router(const char *const *extra)
{
    char bin[512], port[16];
    ckv_test_bin_path("ckv-router", bin, sizeof(bin));
    snprintf(port, sizeof(port), "%d", metrics_port);
    char *argv[32] = {bin,   "--run-dir",           dir,    "--heartbeat-ms",
                      "200", "--worker-timeout-ms", "3000", "--metrics-port",
                      port,  "--log-level",         "debug"};
    int n = 11;
    for (int i = 0; extra && extra[i]; i++)
        argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    spawn(argv, "router.log");
    char sock[400];
    snprintf(sock, sizeof(sock), "%s/router.sock", dir);
    cr_assert_eq(ckv_test_wait_path(sock, 10000), 0, "ckv-router did not come up");
}

static void *connect_sock(int type, const char *ep)
{
    void *s = zmq_socket(zctx, type);
    cr_assert(s);
    cr_assert_eq(ckv_wire_socket_setup(s, CKV_WIRE_DEFAULT_MAX_BYTES), 0);
    cr_assert_eq(zmq_connect(s, ep), 0);
    cr_assert_lt(n_socks, 16);
    socks[n_socks++] = s;
    return s;
}

static void close_sock(void *s)
{
    for (int i = 0; i < n_socks; i++)
        if (socks[i] == s) {
            zmq_close(s);
            socks[i] = socks[--n_socks];
            return;
        }
}

/* Receives one envelope within timeout_ms (NULL when none). */
static Ckv__Envelope *recv_env(void *s, int timeout_ms)
{
    zmq_pollitem_t it = {.socket = s, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, timeout_ms) <= 0)
        return NULL;
    struct ckv_wire_addr from;
    Ckv__Envelope *env = NULL;
    int rc = ckv_wire_recv(s, &from, &env, CKV_WIRE_DEFAULT_MAX_BYTES, 0);
    cr_assert_eq(rc, 0, "recv: %s", ckv_strerror(rc));
    return env;
}

static void send_generate(void *s, uint64_t id, const char *prompt, uint32_t max_tokens,
                          const char *session)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Generate g = CKV__GENERATE__INIT;
    g.prompt = (char *)prompt;
    g.max_tokens = max_tokens;
    g.session_id = (char *)(session ? session : "");
    env.request_id = id;
    env.body_case = CKV__ENVELOPE__BODY_GENERATE;
    env.generate = &g;
    cr_assert_eq(ckv_wire_send(s, NULL, &env, 0), 0);
}

static void send_body(void *s, uint64_t id, Ckv__Envelope *env)
{
    env->request_id = id;
    cr_assert_eq(ckv_wire_send(s, NULL, env, 0), 0);
}

/* What a client saw of one request. */
struct result {
    int32_t ids[512];
    int n;
    char text[8192];
    size_t text_len;
    int end; /* CKV__ENVELOPE__BODY_DONE or _ERROR; 0: nothing in time */
    int error_code;
    char message[512];
    char worker[64];
    uint32_t prompt_tokens, generated;
    uint64_t t_first_us, t_done_us;
};

/* Collects events of the requests ids[0..n) on s until each ended (or timeout_ms passed). */
static void collect(void *s, const uint64_t *ids, struct result *res, int n, int timeout_ms)
{
    uint64_t deadline = ckv_now_ms() + (uint64_t)timeout_ms;
    int open = n;
    while (open > 0 && ckv_now_ms() < deadline) {
        Ckv__Envelope *e = recv_env(s, 100);
        if (!e)
            continue;
        int k = -1;
        for (int i = 0; i < n; i++)
            if (ids[i] == e->request_id)
                k = i;
        cr_assert_geq(k, 0, "reply to unknown request %llu", (unsigned long long)e->request_id);
        struct result *r = &res[k];
        cr_assert_eq(r->end, 0, "message after the end of request %llu",
                     (unsigned long long)ids[k]);
        if (e->body_case == CKV__ENVELOPE__BODY_TOKEN_EVENT) {
            cr_assert_eq(e->token_event->index, (uint32_t)r->n);
            cr_assert_lt(r->n, 512);
            if (!r->n)
                r->t_first_us = ckv_now_us();
            r->ids[r->n++] = e->token_event->token_id;
            if (e->token_event->text.len) /* data is NULL when empty */
                memcpy(r->text + r->text_len, e->token_event->text.data, e->token_event->text.len);
            r->text_len += e->token_event->text.len;
        } else if (e->body_case == CKV__ENVELOPE__BODY_DONE) {
            r->end = e->body_case;
            r->prompt_tokens = e->done->prompt_tokens;
            r->generated = e->done->generated_tokens;
            snprintf(r->worker, sizeof(r->worker), "%s", e->done->worker);
            if (e->done->text.len)
                memcpy(r->text + r->text_len, e->done->text.data, e->done->text.len);
            r->text_len += e->done->text.len;
            r->t_done_us = ckv_now_us();
            open--;
        } else if (e->body_case == CKV__ENVELOPE__BODY_ERROR) {
            r->end = e->body_case;
            r->error_code = e->error->code;
            snprintf(r->message, sizeof(r->message), "%s", e->error->message);
            open--;
        } else {
            cr_assert_fail("unexpected message type %d", (int)e->body_case);
        }
        ckv_wire_free(e);
    }
}

static Ckv__Envelope *expect_error(void *s, int code)
{
    Ckv__Envelope *e = recv_env(s, 5000);
    cr_assert_not_null(e, "no reply");
    cr_assert_eq(e->body_case, CKV__ENVELOPE__BODY_ERROR, "got type %d, not an Error",
                 (int)e->body_case);
    cr_assert_eq((int)e->error->code, code, "error %d (%s), expected %d", (int)e->error->code,
                 e->error->message, code);
    return e;
}

/* The router still answers (replies to earlier requests on s are skipped). */
static void ping(void *s)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Ping p = CKV__PING__INIT;
    p.nonce = 42;
    env.body_case = CKV__ENVELOPE__BODY_PING;
    env.ping = &p;
    send_body(s, 99, &env);
    uint64_t deadline = ckv_now_ms() + 5000;
    while (ckv_now_ms() < deadline) {
        Ckv__Envelope *e = recv_env(s, 100);
        if (!e)
            continue;
        bool pong = e->body_case == CKV__ENVELOPE__BODY_PONG && e->pong->nonce == 42;
        ckv_wire_free(e);
        if (pong)
            return;
    }
    cr_assert_fail("no pong: the router is gone");
}

/* ---- a scripted worker ---- */

static void *fake_worker(const char *name, uint32_t capacity)
{
    void *w = connect_sock(ZMQ_DEALER, worker_ep);
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__WorkerRegister m = CKV__WORKER_REGISTER__INIT;
    m.name = (char *)name;
    m.model = "fake";
    m.capacity = capacity;
    env.body_case = CKV__ENVELOPE__BODY_WORKER_REGISTER;
    env.worker_register = &m;
    send_body(w, 1, &env);
    Ckv__Envelope *r = recv_env(w, 5000);
    cr_assert_not_null(r, "no register reply");
    cr_assert_eq(r->body_case, CKV__ENVELOPE__BODY_WORKER_REGISTER_REPLY);
    cr_assert_eq(r->worker_register_reply->heartbeat_ms, 200);
    ckv_wire_free(r);
    return w;
}

static void fake_heartbeat(void *w)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__WorkerHeartbeat h = CKV__WORKER_HEARTBEAT__INIT;
    env.body_case = CKV__ENVELOPE__BODY_WORKER_HEARTBEAT;
    env.worker_heartbeat = &h;
    send_body(w, 0, &env);
}

/* Waits for the next message of a type on a fake worker, heart-beating meanwhile. */
static Ckv__Envelope *fake_expect(void *w, int body, int timeout_ms)
{
    uint64_t deadline = ckv_now_ms() + (uint64_t)timeout_ms;
    while (ckv_now_ms() < deadline) {
        fake_heartbeat(w);
        Ckv__Envelope *e = recv_env(w, 100);
        if (!e)
            continue;
        cr_assert_eq(e->body_case, body, "worker got type %d, expected %d", (int)e->body_case,
                     body);
        return e;
    }
    cr_assert_fail("the worker got no message of type %d", body);
    return NULL;
}

static void fake_token(void *w, uint64_t job, int32_t id, uint32_t index, const char *text)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__TokenEvent t = CKV__TOKEN_EVENT__INIT;
    t.token_id = id;
    t.index = index;
    t.text.data = (uint8_t *)text;
    t.text.len = strlen(text);
    env.body_case = CKV__ENVELOPE__BODY_TOKEN_EVENT;
    env.token_event = &t;
    send_body(w, job, &env);
}

static void fake_done(void *w, uint64_t job, uint32_t n)
{
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Done d = CKV__DONE__INIT;
    d.generated_tokens = n;
    d.prompt_tokens = 3;
    d.finish_reason = "length";
    env.body_case = CKV__ENVELOPE__BODY_DONE;
    env.done = &d;
    send_body(w, job, &env);
}

/* ---- router-only tests ---- */

Test(served, malformed_frames_get_errors)
{
    start_router(NULL);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    /* bytes that are no protobuf */
    cr_assert_eq(zmq_send(c, "\xff\xff\xff garbage", 12, 0), 12);
    ckv_wire_free(expect_error(c, CKV__ERROR_CODE__ERROR_CODE_MALFORMED));
    /* another protocol version */
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Ping p = CKV__PING__INIT;
    env.body_case = CKV__ENVELOPE__BODY_PING;
    env.ping = &p;
    env.version = 77;
    env.request_id = 5;
    uint8_t buf[64];
    size_t len = ckv__envelope__pack(&env, buf);
    cr_assert_eq(zmq_send(c, buf, len, 0), (int)len);
    Ckv__Envelope *e = expect_error(c, CKV__ERROR_CODE__ERROR_CODE_BAD_VERSION);
    cr_assert_eq(e->request_id, 5);
    ckv_wire_free(e);
    /* a worker's message on the client socket */
    Ckv__Envelope t = CKV__ENVELOPE__INIT;
    Ckv__TokenEvent te = CKV__TOKEN_EVENT__INIT;
    t.body_case = CKV__ENVELOPE__BODY_TOKEN_EVENT;
    t.token_event = &te;
    send_body(c, 6, &t);
    ckv_wire_free(expect_error(c, CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE));
    /* bad requests: empty prompt, id 0, max_tokens above the limit, bad top_p */
    send_generate(c, 7, "", 4, NULL);
    e = expect_error(c, CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST);
    cr_assert(strstr(e->error->message, "empty prompt"), "%s", e->error->message);
    ckv_wire_free(e);
    send_generate(c, 0, "hello", 4, NULL);
    ckv_wire_free(expect_error(c, CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST));
    send_generate(c, 8, "hello", 1u << 30, NULL);
    e = expect_error(c, CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST);
    cr_assert(strstr(e->error->message, "max_tokens"), "%s", e->error->message);
    ckv_wire_free(e);
    /* an empty frame decodes as version 0 */
    cr_assert_eq(zmq_send(c, "", 0, 0), 0);
    ckv_wire_free(expect_error(c, CKV__ERROR_CODE__ERROR_CODE_BAD_VERSION));
    ping(c);
    /* the stats count them */
    Ckv__Envelope sr = CKV__ENVELOPE__INIT;
    Ckv__StatsRequest sq = CKV__STATS_REQUEST__INIT;
    sr.body_case = CKV__ENVELOPE__BODY_STATS_REQUEST;
    sr.stats_request = &sq;
    send_body(c, 10, &sr);
    e = recv_env(c, 5000);
    cr_assert_not_null(e);
    cr_assert_eq(e->body_case, CKV__ENVELOPE__BODY_STATS_REPLY);
    cr_assert(strstr(e->stats_reply->text, "\nbad_frames:4\n"), "%s", e->stats_reply->text);
    cr_assert(strstr(e->stats_reply->text, "\nbad_requests:3\n"), "%s", e->stats_reply->text);
    ckv_wire_free(e);
}

Test(served, overloaded_queue_answers_at_once)
{
    const char *extra[] = {"--queue-max", "1", "--queue-timeout-ms", "1500", NULL};
    start_router(extra);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    send_generate(c, 1, "first", 4, NULL); /* no worker: waits in the queue */
    send_generate(c, 2, "second", 4, NULL);
    uint64_t t0 = ckv_now_ms();
    Ckv__Envelope *e = expect_error(c, CKV__ERROR_CODE__ERROR_CODE_OVERLOADED);
    cr_assert_eq(e->request_id, 2);
    cr_assert_lt(ckv_now_ms() - t0, 2000, "overloaded came late");
    cr_assert(strstr(e->error->message, "overloaded"), "%s", e->error->message);
    ckv_wire_free(e);
    /* a request queued too long fails with TIMEOUT */
    send_generate(c, 5, "late", 1, NULL);
    ckv_wire_free(expect_error(c, CKV__ERROR_CODE__ERROR_CODE_OVERLOADED)); /* 1 is queued */
    uint64_t ids0[1] = {1};
    static struct result r0;
    memset(&r0, 0, sizeof(r0));
    collect(c, ids0, &r0, 1, 5000);
    cr_assert_eq(r0.end, CKV__ENVELOPE__BODY_ERROR);
    cr_assert_eq(r0.error_code, CKV__ERROR_CODE__ERROR_CODE_TIMEOUT, "%s", r0.message);
    cr_assert(strstr(r0.message, "no worker registered"), "%s", r0.message);
    send_generate(c, 1, "first", 4, NULL); /* queued again, same id: allowed once it ended */
    /* a worker arrives: the queued request runs */
    void *w = fake_worker("fw", 1);
    Ckv__Envelope *g = fake_expect(w, CKV__ENVELOPE__BODY_GENERATE, 5000);
    cr_assert_str_eq(g->generate->prompt, "first");
    uint64_t job = g->request_id;
    ckv_wire_free(g);
    fake_token(w, job, 11, 0, "a");
    fake_done(w, job, 1);
    uint64_t ids[1] = {1};
    static struct result r;
    memset(&r, 0, sizeof(r));
    collect(c, ids, &r, 1, 5000);
    cr_assert_eq(r.end, CKV__ENVELOPE__BODY_DONE);
    cr_assert_eq(r.n, 1);
    cr_assert_eq(r.ids[0], 11);
    cr_assert_str_eq(r.worker, "fw");
}

Test(served, dead_worker_redispatch_and_midstream_error)
{
    const char *fast[] = {"--worker-timeout-ms", "1000", NULL};
    start_router(fast);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    void *w1 = fake_worker("w1", 2);
    send_generate(c, 1, "a", 4, NULL);
    send_generate(c, 2, "b", 4, NULL);
    Ckv__Envelope *g1 = fake_expect(w1, CKV__ENVELOPE__BODY_GENERATE, 5000);
    Ckv__Envelope *g2 = fake_expect(w1, CKV__ENVELOPE__BODY_GENERATE, 5000);
    /* start one of them (a token reaches the client), then fall silent */
    uint64_t started = g1->request_id, unstarted = g2->request_id;
    bool first_is_a = strcmp(g1->generate->prompt, "a") == 0;
    ckv_wire_free(g1);
    ckv_wire_free(g2);
    fake_token(w1, started, 5, 0, "x");
    /* a second worker, alive: the unstarted request moves to it */
    void *w2 = fake_worker("w2", 2);
    uint64_t ids[2] = {1, 2};
    static struct result res[2];
    memset(res, 0, sizeof(res));
    int k_started = first_is_a ? 0 : 1;
    Ckv__Envelope *moved = fake_expect(w2, CKV__ENVELOPE__BODY_GENERATE, 5000);
    cr_assert_str_eq(moved->generate->prompt, first_is_a ? "b" : "a");
    fake_token(w2, moved->request_id, 7, 0, "y");
    fake_done(w2, moved->request_id, 1);
    ckv_wire_free(moved);
    (void)unstarted;
    collect(c, ids, res, 2, 5000);
    cr_assert_eq(res[k_started].end, CKV__ENVELOPE__BODY_ERROR);
    cr_assert_eq(res[k_started].error_code, CKV__ERROR_CODE__ERROR_CODE_UNAVAILABLE);
    cr_assert(strstr(res[k_started].message, "w1") && strstr(res[k_started].message, "heartbeat"),
              "message does not name the worker and the cause: %s", res[k_started].message);
    cr_assert_eq(res[k_started].n, 1);
    cr_assert_eq(res[1 - k_started].end, CKV__ENVELOPE__BODY_DONE);
    cr_assert_str_eq(res[1 - k_started].worker, "w2");
    cr_assert_eq(res[1 - k_started].ids[0], 7);
    /* w1 comes back: the router no longer knows it and says so */
    fake_heartbeat(w1);
    Ckv__Envelope *e = recv_env(w1, 3000);
    while (e && e->body_case != CKV__ENVELOPE__BODY_ERROR) {
        ckv_wire_free(e);
        e = recv_env(w1, 3000);
    }
    cr_assert_not_null(e);
    cr_assert_eq(e->error->code, CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND);
    ckv_wire_free(e);
}

Test(served, cancel_reaches_the_worker)
{
    start_router(NULL);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    void *w = fake_worker("w", 1);
    send_generate(c, 3, "long", 100, NULL);
    Ckv__Envelope *g = fake_expect(w, CKV__ENVELOPE__BODY_GENERATE, 5000);
    uint64_t job = g->request_id;
    ckv_wire_free(g);
    fake_token(w, job, 1, 0, "t");
    Ckv__Envelope ce = CKV__ENVELOPE__INIT;
    Ckv__Cancel cc = CKV__CANCEL__INIT;
    ce.body_case = CKV__ENVELOPE__BODY_CANCEL;
    ce.cancel = &cc;
    send_body(c, 3, &ce);
    uint64_t ids[1] = {3};
    static struct result r;
    memset(&r, 0, sizeof(r));
    collect(c, ids, &r, 1, 5000);
    cr_assert_eq(r.end, CKV__ENVELOPE__BODY_ERROR);
    cr_assert_eq(r.error_code, CKV__ERROR_CODE__ERROR_CODE_CANCELLED);
    Ckv__Envelope *x = fake_expect(w, CKV__ENVELOPE__BODY_CANCEL, 5000);
    cr_assert_eq(x->request_id, job);
    ckv_wire_free(x);
    /* late tokens of the cancelled job are dropped; the slot is free for the next request */
    fake_token(w, job, 2, 1, "u");
    send_generate(c, 4, "next", 1, "s1");
    g = fake_expect(w, CKV__ENVELOPE__BODY_GENERATE, 5000);
    cr_assert_str_eq(g->generate->prompt, "next");
    fake_done(w, g->request_id, 0);
    ckv_wire_free(g);
    uint64_t ids2[1] = {4};
    struct result r2 = {0};
    collect(c, ids2, &r2, 1, 5000);
    cr_assert_eq(r2.end, CKV__ENVELOPE__BODY_DONE);
    cr_assert_eq(r2.n, 0);
}

/* GET path on the metrics listener; returns the body (static). */
static const char *http_get(const char *path)
{
    static char buf[65536];
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)metrics_port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0, "connect to /metrics");
    char req[256];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n", path);
    cr_assert_eq(write(fd, req, (size_t)n), n);
    size_t got = 0;
    ssize_t k;
    while (got < sizeof(buf) - 1 && (k = read(fd, buf + got, sizeof(buf) - 1 - got)) > 0)
        got += (size_t)k;
    buf[got] = 0;
    close(fd);
    return buf;
}

Test(served, stats_pub_and_metrics)
{
    const char *extra[] = {"--stats-interval-ms", "100", NULL};
    start_router(extra);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    void *w = fake_worker("wm", 3);
    send_generate(c, 1, "p", 2, NULL);
    Ckv__Envelope *g = fake_expect(w, CKV__ENVELOPE__BODY_GENERATE, 5000);
    fake_token(w, g->request_id, 1, 0, "a");
    fake_token(w, g->request_id, 2, 1, "b");
    fake_done(w, g->request_id, 2);
    ckv_wire_free(g);
    uint64_t ids[1] = {1};
    static struct result r;
    memset(&r, 0, sizeof(r));
    collect(c, ids, &r, 1, 5000);
    cr_assert_eq(r.end, CKV__ENVELOPE__BODY_DONE);
    cr_assert_eq(r.text_len, 2);
    cr_assert_eq(memcmp(r.text, "ab", 2), 0);
    const char *m = http_get("/metrics");
    cr_assert(strstr(m, "HTTP/1.0 200 OK"), "%s", m);
    cr_assert(strstr(m, "\nckv:generation_tokens_total 2\n"), "%s", m);
    cr_assert(strstr(m, "\nckv:prompt_tokens_total 3\n"), "%s", m);
    cr_assert(strstr(m, "\nckv:time_to_first_token_seconds_count 1\n"), "%s", m);
    cr_assert(strstr(m, "\nckv:inter_token_latency_seconds_count 1\n"), "%s", m);
    cr_assert(strstr(m, "ckv:request_success_total{finished_reason=\"length\"} 1\n"), "%s", m);
    cr_assert(strstr(http_get("/nope"), "404"));
    /* a snapshot on the PUB socket lists the worker */
    void *sub = connect_sock(ZMQ_SUB, stats_ep);
    cr_assert_eq(zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0), 0);
    Ckv__Envelope *s = NULL;
    for (int i = 0; i < 50 && !s; i++) {
        fake_heartbeat(w);
        s = recv_env(sub, 100);
    }
    cr_assert_not_null(s, "no snapshot");
    cr_assert_eq(s->body_case, CKV__ENVELOPE__BODY_STATS_SNAPSHOT);
    cr_assert_eq(s->stats_snapshot->generation_tokens, 2);
    cr_assert_eq(s->stats_snapshot->requests_done, 1);
    cr_assert_eq(s->stats_snapshot->n_workers, 1);
    cr_assert_str_eq(s->stats_snapshot->workers[0]->name, "wm");
    cr_assert_eq(s->stats_snapshot->workers[0]->capacity, 3);
    ckv_wire_free(s);
}

/* ---- with the real worker and the default model ---- */

static const char *need_model(void)
{
    const char *model = ckv_test_default_model();
    if (!model) {
        cr_assert_null(getenv("CKV_REQUIRE_MODEL"), "default model missing");
        cr_skip_test("default model not fetched (deploy/fetch-model.sh)");
    }
    return model;
}

/* ckv-worker on the model with method full unless extra says otherwise (extra wins). */
static pid_t start_worker(const char *model, const char *name, const char *const *extra)
{
    char bin[512];
    ckv_test_bin_path("ckv-worker", bin, sizeof(bin));
    char *argv[40] = {bin,        "--run-dir",  dir,         "--model",     (char *)model,
                      "--name",   (char *)name, "--threads", "2",           "--max-seqs",
                      "2",        "--max-ctx",  "256",       "--log-level", "debug",
                      "--method", "full"};
    int n = 17;
    for (int i = 0; extra && extra[i]; i++)
        argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    char log[80];
    snprintf(log, sizeof(log), "%s.log", name);
    return spawn(argv, log);
}

/* Waits until the router lists n workers (stats reply), on a socket of its own so that a
 * late reply never reaches the caller's. c is unused (kept for the call sites). */
static void wait_workers(void *c, int n)
{
    (void)c;
    char want[32];
    snprintf(want, sizeof(want), "\nworkers:%d\n", n);
    void *s = connect_sock(ZMQ_DEALER, client_ep);
    for (int i = 0; i < 300; i++) {
        Ckv__Envelope sr = CKV__ENVELOPE__INIT;
        Ckv__StatsRequest sq = CKV__STATS_REQUEST__INIT;
        sr.body_case = CKV__ENVELOPE__BODY_STATS_REQUEST;
        sr.stats_request = &sq;
        send_body(s, 1000 + (uint64_t)i, &sr);
        Ckv__Envelope *e = recv_env(s, 2000);
        bool ok = e && e->body_case == CKV__ENVELOPE__BODY_STATS_REPLY &&
                  strstr(e->stats_reply->text, want);
        ckv_wire_free(e);
        if (ok) {
            close_sock(s);
            return;
        }
        usleep(100000);
    }
    cr_assert_fail("the router never listed %d workers", n);
}

/* Greedy generation in this process: the same steps as ckv-worker (prompt with BOS, argmax,
 * stop at an end-of-generation token). */
static int reference_kv(const char *model, const struct ckv_kv_opts *kv, const char *prompt,
                        int max_tokens, int32_t *out)
{
    struct ckv_engine_opts o;
    ckv_engine_opts_default(&o);
    o.model_path = model;
    o.n_threads = 2;
    o.max_seqs = 1;
    o.max_ctx = 256;
    o.kv = *kv;
    ckv_engine_t *e = NULL;
    char err[512];
    cr_assert_eq(ckv_engine_open(&o, &e, err, sizeof(err)), 0, "%s", err);
    const struct ckv_model_info *in = ckv_engine_info(e);
    const tokenizer_t *tok = ckv_engine_tokenizer(e);
    int32_t *ids = NULL;
    int n = 0;
    cr_assert_eq(tokenizer_encode_alloc(tok, prompt, strlen(prompt), true, false, &ids, &n), 0);
    int seq;
    cr_assert_eq(ckv_engine_seq_new(e, NULL, &seq, err, sizeof(err)), 0, "%s", err);
    float *logits = malloc((size_t)in->n_vocab * sizeof(float));
    cr_assert_eq(ckv_engine_prefill(e, seq, ids, n, logits, NULL, NULL), 0);
    int got = 0;
    for (;;) {
        int32_t best = 0;
        for (int32_t v = 1; v < in->n_vocab; v++)
            if (logits[v] > logits[best])
                best = v;
        if (tokenizer_is_eog(tok, best))
            break;
        out[got++] = best;
        if (got == max_tokens)
            break;
        cr_assert_eq(ckv_engine_decode(e, &seq, &best, 1, logits), 0);
    }
    free(logits);
    free(ids);
    ckv_engine_seq_free(e, seq);
    ckv_engine_close(&e);
    return got;
}

static int reference(const char *model, const char *prompt, int max_tokens, int32_t *out)
{
    struct ckv_kv_opts kv;
    ckv_kv_opts_default(&kv);
    kv.method = CKV_KV_FULL;
    return reference_kv(model, &kv, prompt, max_tokens, out);
}

static const char *const prompts[2] = {"The capital of France is",
                                       "def fibonacci(n):\n    \"\"\"Return the"};

Test(served, greedy_matches_engine_and_concurrent)
{
    const char *model = need_model();
    start_router(NULL);
    start_worker(model, "w0", NULL);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    wait_workers(c, 1);
    int32_t ref[2][16];
    int n_ref[2];
    for (int p = 0; p < 2; p++)
        n_ref[p] = reference(model, prompts[p], 8, ref[p]);
    /* one request */
    send_generate(c, 1, prompts[0], 8, NULL);
    uint64_t id1[1] = {1};
    static struct result one;
    memset(&one, 0, sizeof(one));
    collect(c, id1, &one, 1, 60000);
    cr_assert_eq(one.end, CKV__ENVELOPE__BODY_DONE, "%s", one.message);
    cr_assert_eq(one.n, n_ref[0]);
    cr_assert_eq(one.generated, (uint32_t)n_ref[0]);
    for (int i = 0; i < one.n; i++)
        cr_assert_eq(one.ids[i], ref[0][i], "token %d: %d, in-process %d", i, one.ids[i],
                     ref[0][i]);
    cr_assert_gt(one.text_len, 0);
    /* two at once, on two client sockets: batched on the worker, each as if alone */
    void *c2 = connect_sock(ZMQ_DEALER, client_ep);
    send_generate(c, 2, prompts[0], 8, NULL);
    send_generate(c2, 3, prompts[1], 8, NULL);
    uint64_t id2[1] = {2}, id3[1] = {3};
    struct result r2 = {0}, r3 = {0};
    collect(c, id2, &r2, 1, 60000);
    collect(c2, id3, &r3, 1, 60000);
    cr_assert_eq(r2.end, CKV__ENVELOPE__BODY_DONE, "%s", r2.message);
    cr_assert_eq(r3.end, CKV__ENVELOPE__BODY_DONE, "%s", r3.message);
    cr_assert_eq(r2.n, n_ref[0]);
    cr_assert_eq(r3.n, n_ref[1]);
    for (int i = 0; i < r2.n; i++)
        cr_assert_eq(r2.ids[i], ref[0][i], "request 2 token %d", i);
    for (int i = 0; i < r3.n; i++)
        cr_assert_eq(r3.ids[i], ref[1][i], "request 3 token %d", i);
    cr_assert_eq(r2.text_len, one.text_len);
    cr_assert_eq(memcmp(r2.text, one.text, one.text_len), 0);
    /* a request the worker refuses comes back as an Error, and the worker goes on */
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Generate g = CKV__GENERATE__INIT;
    int32_t bad_ids[2] = {1, 1 << 30};
    g.token_ids = bad_ids;
    g.n_token_ids = 2;
    g.max_tokens = 2;
    env.body_case = CKV__ENVELOPE__BODY_GENERATE;
    env.generate = &g;
    send_body(c, 4, &env);
    uint64_t id4[1] = {4};
    struct result r4 = {0};
    collect(c, id4, &r4, 1, 10000);
    cr_assert_eq(r4.end, CKV__ENVELOPE__BODY_ERROR);
    cr_assert_eq(r4.error_code, CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST, "%s", r4.message);
    cr_assert(strstr(r4.message, "token id"), "%s", r4.message);
    ping(c);
    send_generate(c, 5, prompts[0], 2, NULL);
    uint64_t id5[1] = {5};
    struct result r5 = {0};
    collect(c, id5, &r5, 1, 60000);
    cr_assert_eq(r5.end, CKV__ENVELOPE__BODY_DONE, "%s", r5.message);
    cr_assert_eq(r5.ids[0], ref[0][0]);
}

Test(served, worker_killed_midstream)
{
    const char *model = need_model();
    const char *fast[] = {"--worker-timeout-ms", "1000", NULL};
    start_router(fast);
    pid_t wpid = start_worker(model, "victim", NULL);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    wait_workers(c, 1);
    send_generate(c, 1, prompts[0], 200, NULL);
    /* the first token, then kill -9 */
    Ckv__Envelope *e = recv_env(c, 60000);
    cr_assert_not_null(e, "no first token");
    cr_assert_eq(e->body_case, CKV__ENVELOPE__BODY_TOKEN_EVENT, "got type %d (%s)",
                 (int)e->body_case,
                 e->body_case == CKV__ENVELOPE__BODY_ERROR ? e->error->message : "");
    ckv_wire_free(e);
    kill(wpid, SIGKILL);
    uint64_t t0 = ckv_now_ms();
    uint64_t ids[1] = {1};
    static struct result r;
    memset(&r, 0, sizeof(r));
    collect(c, ids, &r, 1, 10000);
    cr_assert_eq(r.end, CKV__ENVELOPE__BODY_ERROR, "no error after the worker died");
    cr_assert_eq(r.error_code, CKV__ERROR_CODE__ERROR_CODE_UNAVAILABLE);
    cr_assert(strstr(r.message, "victim") && strstr(r.message, "died mid-stream"),
              "message does not name the worker and the cause: %s", r.message);
    cr_assert_lt(ckv_now_ms() - t0, 5000, "the error took too long");
    ping(c);
}

/* A stats value ("name:value" at a line start) of a daemon's key:value stats; -1 if absent. */
static double daemon_stat(const char *endpoint, const char *name)
{
    void *s = connect_sock(ZMQ_DEALER, endpoint);
    Ckv__Envelope sr = CKV__ENVELOPE__INIT;
    Ckv__StatsRequest sq = CKV__STATS_REQUEST__INIT;
    sr.body_case = CKV__ENVELOPE__BODY_STATS_REQUEST;
    sr.stats_request = &sq;
    send_body(s, 77, &sr);
    Ckv__Envelope *e = recv_env(s, 5000);
    cr_assert_not_null(e, "no stats from %s", endpoint);
    cr_assert_eq(e->body_case, CKV__ENVELOPE__BODY_STATS_REPLY);
    char needle[96];
    snprintf(needle, sizeof(needle), "\n%s:", name);
    const char *p = strstr(e->stats_reply->text, needle);
    double v = p ? strtod(p + strlen(needle), NULL) : -1;
    ckv_wire_free(e);
    close_sock(s);
    return v;
}

Test(served, clusterkv_through_kvstore_matches_engine)
{
    const char *model = need_model();
    /* the store, with the model's block geometry (head_dim 64) and a segment of its own */
    char bin[512], seg[64], kvs_ep[420], sock[400], wstats[300];
    ckv_test_bin_path("ckv-kvstore", bin, sizeof(bin));
    snprintf(seg, sizeof(seg), "/ckv-test-served-%d", (int)getpid());
    snprintf(kvs_seg, sizeof(kvs_seg), "%s", seg);
    char *kargv[] = {bin,   "--run-dir",  dir,  "--segment-name", seg,  "--segment-size",
                     "16m", "--head-dim", "64", "--mlock",        "no", "--spill-size",
                     "0",   NULL};
    spawn(kargv, "kvstore.log");
    snprintf(sock, sizeof(sock), "%s/kvstore.sock", dir);
    cr_assert_eq(ckv_test_wait_path(sock, 10000), 0, "ckv-kvstore did not come up");
    snprintf(kvs_ep, sizeof(kvs_ep), "ipc://%s", sock);
    snprintf(wstats, sizeof(wstats), "ipc://%s/worker-stats.sock", dir);
    start_router(NULL);
    /* ClusterKV with a small budget, window and cluster cache: prompt clusters go to the store
     * after prefill, decode steps select among them and fetch the misses back */
    const char *extra[] = {"--method",
                           "clusterkv",
                           "--budget",
                           "32",
                           "--sinks",
                           "4",
                           "--window",
                           "16",
                           "--tokens-per-cluster",
                           "8",
                           "--cache-blocks",
                           "4",
                           "--kvstore-endpoint",
                           kvs_ep,
                           "--stats-endpoint",
                           wstats,
                           NULL};
    start_worker(model, "wk", extra);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    wait_workers(c, 1);
    const char *prompt =
        "Alice keeps the red key in the blue box. Bob keeps the green key under the mat. "
        "Carol keeps the yellow key in her coat. Dave keeps the black key in the drawer. "
        "Erin keeps the white key on the shelf. Frank keeps the gold key in his shoe. "
        "Question: where does Carol keep her key? Answer: Carol keeps the yellow key";
    struct ckv_kv_opts kv;
    ckv_kv_opts_default(&kv);
    kv.method = CKV_KV_CLUSTERKV;
    kv.budget = 32;
    kv.sinks = 4;
    kv.window = 16;
    kv.tokens_per_cluster = 8;
    kv.cache_blocks = 4;
    int32_t ref[16];
    int n_ref = reference_kv(model, &kv, prompt, 8, ref);
    send_generate(c, 1, prompt, 8, NULL);
    uint64_t ids[1] = {1};
    static struct result r;
    memset(&r, 0, sizeof(r));
    collect(c, ids, &r, 1, 60000);
    cr_assert_eq(r.end, CKV__ENVELOPE__BODY_DONE, "%s", r.message);
    cr_assert_gt(r.prompt_tokens, 64);
    cr_assert_eq(r.n, n_ref);
    for (int i = 0; i < r.n; i++)
        cr_assert_eq(r.ids[i], ref[i], "token %d: %d, in-process %d", i, r.ids[i], ref[i]);
    /* the clusters went through the store both ways */
    cr_assert_gt(daemon_stat(wstats, "store_clusters_put"), 0);
    cr_assert_gt(daemon_stat(wstats, "store_clusters_got"), 0);
    cr_assert_eq(daemon_stat(wstats, "store_errors"), 0);
    cr_assert_eq(daemon_stat(wstats, "store_blocks_total"), 4096); /* 16 MiB of 4 KiB blocks */
    cr_assert_gt(daemon_stat(kvs_ep, "commit_clusters"), 0);
    /* the sequence ended: its clusters are dropped from the store (right after the Done) */
    double left = -1;
    for (int i = 0; i < 50 && left != 0; i++) {
        left = daemon_stat(kvs_ep, "clusters_resident");
        if (left != 0)
            usleep(20000);
    }
    cr_assert_eq(left, 0, "%.0f clusters left in the store", left);
    ckv_shm_unlink(seg);
}

Test(served, session_affinity_and_client_disconnect)
{
    start_router(NULL);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    void *wa = fake_worker("wa", 2), *wb = fake_worker("wb", 2);
    /* a session's first request goes somewhere; its second follows it although the other
     * worker is idle (least loaded) */
    send_generate(c, 1, "s-first", 50, "sess");
    void *first = NULL, *other = NULL;
    Ckv__Envelope *g = NULL;
    for (int i = 0; i < 50 && !g; i++) {
        fake_heartbeat(wa);
        fake_heartbeat(wb);
        if ((g = recv_env(wa, 50)))
            first = wa, other = wb;
        else if ((g = recv_env(wb, 50)))
            first = wb, other = wa;
    }
    cr_assert_not_null(g, "the first request reached no worker");
    uint64_t job1 = g->request_id;
    ckv_wire_free(g);
    send_generate(c, 2, "s-second", 5, "sess");
    g = fake_expect(first, CKV__ENVELOPE__BODY_GENERATE, 5000);
    cr_assert_str_eq(g->generate->prompt, "s-second");
    uint64_t job2 = g->request_id;
    ckv_wire_free(g);
    cr_assert_null(recv_env(other, 200), "the other worker got a message");
    /* without a session, the least loaded (the other, idle) worker */
    send_generate(c, 3, "free", 5, NULL);
    g = fake_expect(other, CKV__ENVELOPE__BODY_GENERATE, 5000);
    cr_assert_str_eq(g->generate->prompt, "free");
    ckv_wire_free(g);
    /* the client goes away mid-stream: the next token's relay fails and the router cancels
     * the jobs on the worker */
    fake_token(first, job1, 1, 0, "a");
    close_sock(c);
    usleep(200000); /* the router's pipe to the client closes */
    fake_token(first, job1, 2, 1, "b");
    Ckv__Envelope *x = fake_expect(first, CKV__ENVELOPE__BODY_CANCEL, 5000);
    cr_assert_eq(x->request_id, job1);
    ckv_wire_free(x);
    (void)job2;
    /* long session ids are refused */
    void *c2 = connect_sock(ZMQ_DEALER, client_ep);
    char long_id[300];
    memset(long_id, 'x', sizeof(long_id) - 1);
    long_id[sizeof(long_id) - 1] = 0;
    send_generate(c2, 9, "p", 1, long_id);
    ckv_wire_free(expect_error(c2, CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST));
}

/* Runs `ckv args...` (no wait); its output goes to <dir>/<log>. */
static pid_t spawn_ckv(const char *log, char **args)
{
    char bin[512];
    ckv_test_bin_path("ckv", bin, sizeof(bin));
    char *argv[16] = {bin};
    int n = 1;
    for (int i = 0; args[i]; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return spawn(argv, log);
}

/* A child that was waited for is no longer the teardown's to kill. */
static void forget(pid_t pid)
{
    for (int i = 0; i < n_pids; i++)
        if (pids[i] == pid)
            pids[i] = 0;
}

static char *read_log(const char *log)
{
    char path[400];
    snprintf(path, sizeof(path), "%s/%s", dir, log);
    size_t len;
    char *t = ckv_test_read_file(path, &len);
    cr_assert_not_null(t, "no %s", path);
    return t;
}

/* Waits up to 10 s for a child while the fake worker w keeps heart-beating. */
static int wait_beating(pid_t pid, void *w, int *status)
{
    for (int i = 0; i < 200; i++) {
        fake_heartbeat(w);
        if (ckv_test_wait(pid, 50, status) == 0)
            return 0;
    }
    return -ETIMEDOUT;
}

Test(served, cli_generate_and_top)
{
    const char *extra[] = {"--stats-interval-ms", "100", NULL};
    start_router(extra);
    void *w = fake_worker("cli-w", 1);
    pid_t gen = spawn_ckv("gen.out", (char *[]){"generate", "--router", client_ep, "-p", "hi", "-n",
                                                "2", "--json", NULL});
    Ckv__Envelope *g = fake_expect(w, CKV__ENVELOPE__BODY_GENERATE, 5000);
    cr_assert_str_eq(g->generate->prompt, "hi");
    cr_assert_eq(g->generate->max_tokens, 2);
    fake_token(w, g->request_id, 7, 0, "Hel");
    fake_token(w, g->request_id, 8, 1, "lo\n");
    fake_done(w, g->request_id, 2);
    ckv_wire_free(g);
    int status;
    cr_assert_eq(wait_beating(gen, w, &status), 0, "ckv generate did not finish");
    forget(gen);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "ckv generate status %d", status);
    char *out = read_log("gen.out");
    cr_assert(strstr(out, "\"text\": \"Hello\\n\""), "%s", out);
    cr_assert(strstr(out, "\"generated_tokens\": 2"), "%s", out);
    cr_assert(strstr(out, "\"worker\": \"cli-w\""), "%s", out);
    free(out);
    /* an error ends it with status 1 and the message */
    gen = spawn_ckv("gen2.out", (char *[]){"generate", "--router", client_ep, "-p", "x", NULL});
    g = fake_expect(w, CKV__ENVELOPE__BODY_GENERATE, 5000);
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Error e = CKV__ERROR__INIT;
    e.code = CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST;
    e.message = "no such thing";
    env.body_case = CKV__ENVELOPE__BODY_ERROR;
    env.error = &e;
    send_body(w, g->request_id, &env);
    ckv_wire_free(g);
    cr_assert_eq(wait_beating(gen, w, &status), 0);
    forget(gen);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "ckv generate status %d", status);
    out = read_log("gen2.out");
    cr_assert(strstr(out, "no such thing"), "%s", out);
    free(out);
    /* ckv top --once: one snapshot with the worker's row */
    fake_heartbeat(w);
    pid_t top = spawn_ckv("top.out", (char *[]){"top", "--stats", stats_ep, "--once", NULL});
    int rc_wait = -1;
    for (int i = 0; i < 100 && rc_wait != 0; i++) {
        fake_heartbeat(w);
        rc_wait = ckv_test_wait(top, 50, &status);
    }
    cr_assert_eq(rc_wait, 0, "ckv top --once did not exit");
    forget(top);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "ckv top status %d", status);
    out = read_log("top.out");
    cr_assert(strstr(out, "cli-w"), "%s", out);
    cr_assert(strstr(out, "requests 2  done 1  failed 1"), "%s", out);
    free(out);
}

Test(served, router_restart_workers_register_again)
{
    const char *model = need_model();
    start_router(NULL);
    start_worker(model, "phoenix", NULL);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    wait_workers(c, 1);
    /* kill -9 the router, start another on the same endpoints */
    pid_t old = pids[0];
    kill(old, SIGKILL);
    cr_assert_eq(ckv_test_wait(old, 5000, NULL), 0);
    forget(old);
    char sock[400];
    snprintf(sock, sizeof(sock), "%s/router.sock", dir);
    unlink(sock);
    start_router(NULL);
    /* the worker's next heartbeat is answered NOT_FOUND: it registers again */
    wait_workers(c, 1);
    send_generate(c, 1, prompts[0], 2, NULL);
    uint64_t ids[1] = {1};
    static struct result r;
    memset(&r, 0, sizeof(r));
    collect(c, ids, &r, 1, 60000);
    cr_assert_eq(r.end, CKV__ENVELOPE__BODY_DONE, "%s", r.message);
    cr_assert_str_eq(r.worker, "phoenix");
}

Test(served, mutated_frames_never_take_the_router_down)
{
    start_router(NULL);
    void *c = connect_sock(ZMQ_DEALER, client_ep);
    void *w = fake_worker("fz", 4);
    /* a valid Generate and a valid Cancel, packed, then bytes flipped, cut and extended */
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Generate g = CKV__GENERATE__INIT;
    int32_t toks[3] = {1, 2, 3};
    g.prompt = "mutate me";
    g.token_ids = toks;
    g.n_token_ids = 3;
    g.max_tokens = 3;
    g.session_id = "s";
    g.method = "clusterkv";
    env.version = CKV_PROTOCOL_VERSION;
    env.request_id = 1;
    env.body_case = CKV__ENVELOPE__BODY_GENERATE;
    env.generate = &g;
    uint8_t base[256], buf[300];
    size_t len = ckv__envelope__pack(&env, base);
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    int replies = 0;
    for (int i = 0; i < 400; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        memcpy(buf, base, len);
        size_t n = len;
        switch (rng % 4) {
        case 0: buf[(rng >> 8) % n] ^= (uint8_t)(1u << ((rng >> 16) % 8)); break;
        case 1: n = (rng >> 8) % n; break;
        case 2: buf[(rng >> 8) % n] = (uint8_t)(rng >> 24); break;
        case 3:
            for (size_t k = 0; k < 20; k++)
                buf[n++] = (uint8_t)(rng >> (k % 56));
            break;
        }
        cr_assert_geq(zmq_send(c, buf, n, 0), 0);
        /* drain what came back (errors, or a stream when the mutation is still valid) */
        Ckv__Envelope *e;
        while ((e = recv_env(c, 0))) {
            replies++;
            ckv_wire_free(e);
        }
        while ((e = recv_env(w, 0))) { /* the fake worker ends whatever reached it */
            if (e->body_case == CKV__ENVELOPE__BODY_GENERATE)
                fake_done(w, e->request_id, 0);
            ckv_wire_free(e);
        }
        if (i % 50 == 0)
            fake_heartbeat(w);
    }
    for (Ckv__Envelope *e; (e = recv_env(c, 300));) {
        replies++;
        ckv_wire_free(e);
    }
    ping(c);
    /* most mutations are refused with an Error; some still decode into a valid request */
    cr_assert_gt(replies, 100, "only %d replies to 400 mutated frames", replies);
}
