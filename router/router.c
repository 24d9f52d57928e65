/*
 * ckv-router's event loop (router.h): one thread, one zmq_poll over the client socket, the
 * worker socket and the metrics listener, and two timers (worker liveness, stats snapshot) --
 * the zguide load-balancing broker's shape with a queue in front.
 *
 * A request is a job: QUEUED (waiting for a worker), DISPATCHED (sent, nothing back yet) or
 * STREAMING (at least one token relayed). Each job carries the client's routing frames and
 * request id; the worker sees the router's own job id, so that ids chosen by different clients
 * never collide on a worker. A worker that stops heart-beating is dead: its DISPATCHED jobs go
 * back to the head of the queue (nothing reached the client, so running them elsewhere is
 * invisible), its STREAMING jobs end with an Error UNAVAILABLE naming the worker and the
 * cause. Late messages of a job that moved or ended are dropped.
 *
 * Every client input is checked before it changes anything; a bad one gets an Error reply and
 * a log line. Client sends never block (ZMQ_DONTWAIT with ROUTER_MANDATORY): a client that is
 * gone (EHOSTUNREACH) or not reading (EAGAIN past a large high-water mark) has its job
 * cancelled on the worker.
 */
#include "router.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_stats.h"
#include "ckv_wire.h"

#define C struct router_config
const struct ckv_config_opt router_config_options[] = {
    CKV_OPT_STRING(C, run_dir, "run-dir", "/tmp/ckv",
                   "directory of the ipc:// endpoints (mode 0700, created if missing)"),
    CKV_OPT_STRING(C, client_endpoint, "client-endpoint", "",
                   "clients connect here; empty: ipc://<run-dir>/router.sock"),
    CKV_OPT_STRING(C, worker_endpoint, "worker-endpoint", "",
                   "workers connect here; empty: ipc://<run-dir>/router-workers.sock"),
    CKV_OPT_STRING(C, pub_endpoint, "stats-endpoint", "",
                   "PUB socket of the stats snapshots; empty: ipc://<run-dir>/router-stats.sock"),
    CKV_OPT_STRING(C, metrics_bind, "metrics-bind", "127.0.0.1",
                   "address of the GET /metrics listener (loopback only)"),
    CKV_OPT_INT(C, metrics_port, "metrics-port", "0", 0, 65535,
                "TCP port of the GET /metrics listener; 0: none"),
    CKV_OPT_INT(C, queue_max, "queue-max", "256", 0, 1 << 20,
                "requests waiting for a worker, at most; more are answered `overloaded`"),
    CKV_OPT_INT(C, queue_timeout_ms, "queue-timeout-ms", "60000", 0, 86400000,
                "a request waiting longer than this for a worker fails (TIMEOUT); 0: no limit"),
    CKV_OPT_INT(C, heartbeat_ms, "heartbeat-ms", "500", 10, 60000,
                "workers send a heartbeat this often"),
    CKV_OPT_INT(C, worker_timeout_ms, "worker-timeout-ms", "3000", 50, 600000,
                "a worker silent this long is dead"),
    CKV_OPT_INT(C, max_tokens_limit, "max-tokens-limit", "32768", 1, 1 << 24,
                "a request asking for more tokens is refused"),
    CKV_OPT_INT(C, default_max_tokens, "default-max-tokens", "256", 1, 1 << 24,
                "tokens generated when a request does not say"),
    CKV_OPT_INT(C, sessions_max, "sessions-max", "4096", 1, 1 << 20,
                "session -> worker bindings remembered (the oldest is forgotten first)"),
    CKV_OPT_INT(C, pub_interval_ms, "stats-interval-ms", "1000", 50, 600000,
                "period of the stats snapshots on the PUB socket"),
    CKV_OPT_SIZE(C, max_msg_bytes, "max-msg-size", "4m", 4096, 1ull << 30,
                 "largest message accepted on any socket"),
    CKV_OPT_STRING(C, log_level, "log-level", "info", "debug, info, warn, error or off"),
    CKV_OPT_STRING(C, log_file, "log-file", "", "append logs to this file; empty: stderr"),
    CKV_OPT_END,
};
#undef C

/* tcp:// binds are refused unless the host is loopback: a public bind needs CURVE keys
 * (DESIGN.md "Wire rules"), which this build does not configure. */
static int endpoint_check(const char *what, const char *ep, char *err, size_t errlen)
{
    if (!*ep || strncmp(ep, "ipc://", 6) == 0 || strncmp(ep, "inproc://", 9) == 0)
        return 0;
    if (strncmp(ep, "tcp://", 6) == 0) {
        const char *h = ep + 6;
        if (strncmp(h, "127.", 4) == 0 || strncmp(h, "localhost:", 10) == 0 ||
            strncmp(h, "[::1]:", 6) == 0)
            return 0;
        return ckv_errorf(CKV_ECONFIG, err, errlen,
                          "%s %s: a non-loopback tcp bind needs CURVE keys, which this build "
                          "does not configure; bind to 127.0.0.1 or use ipc://",
                          what, ep);
    }
    return ckv_errorf(CKV_ECONFIG, err, errlen, "%s %s: expected ipc://PATH or tcp://HOST:PORT",
                      what, ep);
}

int router_config_check(const struct router_config *cfg, char *err, size_t errlen)
{
    int rc;
    if ((rc = endpoint_check("client-endpoint", cfg->client_endpoint, err, errlen)) ||
        (rc = endpoint_check("worker-endpoint", cfg->worker_endpoint, err, errlen)) ||
        (rc = endpoint_check("stats-endpoint", cfg->pub_endpoint, err, errlen)))
        return rc;
    struct in_addr a;
    if (inet_pton(AF_INET, cfg->metrics_bind, &a) != 1)
        return ckv_errorf(CKV_ECONFIG, err, errlen, "metrics-bind %s: not an IPv4 address",
                          cfg->metrics_bind);
    if ((ntohl(a.s_addr) >> 24) != 127)
        return ckv_errorf(CKV_ECONFIG, err, errlen,
                          "metrics-bind %s: the metrics listener binds to loopback only",
                          cfg->metrics_bind);
    return 0;
}

/* ---- state ---- */

enum job_state { JOB_QUEUED, JOB_DISPATCHED, JOB_STREAMING };

struct worker;

struct job {
    struct job *next;
    uint64_t id;    /* the router's id, seen by the worker */
    uint64_t order; /* arrival order: the queue is served oldest first */
    enum job_state state;
    struct ckv_wire_addr client; /* routing frames and the client's request id */
    Ckv__Envelope *req;          /* owned: the Generate as received */
    struct worker *w;            /* DISPATCHED, STREAMING */
    uint32_t max_tokens, generated, prompt_tokens;
    uint64_t t_recv_us, t_dispatch_us, t_first_us, t_last_us;
};

struct worker {
    struct worker *next;
    struct ckv_wire_addr addr; /* routing frames to reach it */
    char name[64], model[128], kv_method[32];
    uint32_t capacity, running;
    uint64_t registered_ms, last_seen_ms;
    Ckv__WorkerHeartbeat hb; /* last heartbeat's numbers (no pointers inside) */
};

struct session {
    char id[128];
    char worker[64];
    uint64_t used_ms;
};

/* Seconds histogram with vLLM's bucket bounds, for Prometheus. */
static const double sec_bounds[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,
                                    0.5,   0.75,  1.0,  2.5,  5.0,  7.5,  10.0, 20.0, 40.0};
#define N_SEC_BOUNDS (sizeof(sec_bounds) / sizeof(sec_bounds[0]))
struct sec_hist {
    uint64_t b[N_SEC_BOUNDS]; /* non-cumulative */
    uint64_t count;
    double sum;
};

struct router_stats {
    uint64_t requests, done, failed, rejected, cancelled, bad_frames, bad_requests;
    uint64_t redispatched, lost_midstream, workers_registered, workers_lost, clients_gone;
    uint64_t prompt_tokens, generation_tokens;
    uint64_t finished_length, finished_stop, finished_other;
    struct ckv_hist ttft_us, itl_us, e2e_us, queue_us; /* key:value quantiles */
    struct sec_hist ttft_s, itl_s, e2e_s, queue_s;     /* Prometheus */
    uint64_t tokens_last_pub;
};

struct router {
    struct router_config cfg;
    void *zctx, *clients, *workers, *pub;
    int metrics_fd;
    char client_ep[600], worker_ep[600], pub_ep[600];
    struct job *jobs;
    struct worker *ws;
    struct session *sessions;
    int n_sessions;
    uint64_t next_job_id, next_order;
    uint64_t t_start_ms, next_pub_ms, last_pub_ms;
    double tok_s;
    struct router_stats st;
    volatile sig_atomic_t stop;
};

static void sec_hist_record(struct sec_hist *h, double s)
{
    size_t i = 0;
    while (i < N_SEC_BOUNDS && s > sec_bounds[i])
        i++;
    if (i < N_SEC_BOUNDS)
        h->b[i]++;
    h->count++;
    h->sum += s;
}

static void record_us(struct ckv_hist *h, struct sec_hist *s, uint64_t us)
{
    ckv_hist_record(h, us);
    sec_hist_record(s, (double)us / 1e6);
}

/* ---- run directory ---- */

static int run_dir_prepare(const char *dir, char *err, size_t errlen)
{
    if (mkdir(dir, 0700) == 0)
        return 0;
    if (errno != EEXIST)
        return ckv_errorf(-errno, err, errlen, "run-dir %s: %s", dir, strerror(errno));
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return ckv_errorf(-ENOTDIR, err, errlen, "run-dir %s: not a directory", dir);
    if (st.st_uid != geteuid())
        return ckv_errorf(-EPERM, err, errlen, "run-dir %s: owned by another user", dir);
    if ((st.st_mode & 0777) != 0700) {
        LOG_WARN("run-dir %s had mode %03o: set to 0700", dir, (unsigned)(st.st_mode & 0777));
        if (chmod(dir, 0700) != 0)
            return ckv_errorf(-errno, err, errlen, "run-dir %s: chmod: %s", dir, strerror(errno));
    }
    return 0;
}

static int bind_sock(router_t *r, void **sock, int type, const char *ep, char *err, size_t errlen)
{
    *sock = zmq_socket(r->zctx, type);
    if (!*sock)
        return ckv_errorf(-errno, err, errlen, "zmq_socket: %s", zmq_strerror(errno));
    int rc = ckv_wire_socket_setup(*sock, r->cfg.max_msg_bytes);
    if (rc)
        return ckv_errorf(rc, err, errlen, "socket setup: %s", ckv_strerror(rc));
    if (type == ZMQ_ROUTER) {
        int one = 1, hwm = 100000;
        /* unroutable sends fail (EHOSTUNREACH) instead of vanishing: a gone client is seen */
        zmq_setsockopt(*sock, ZMQ_ROUTER_MANDATORY, &one, sizeof(one));
        zmq_setsockopt(*sock, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    }
    if (strncmp(ep, "ipc://", 6) == 0)
        unlink(ep + 6); /* a socket file left by a killed router is no sign of life */
    if (zmq_bind(*sock, ep) != 0)
        return ckv_errorf(-errno, err, errlen, "bind %s: %s", ep, zmq_strerror(errno));
    if (strncmp(ep, "ipc://", 6) == 0)
        chmod(ep + 6, 0600);
    return 0;
}

static int metrics_listen(router_t *r, char *err, size_t errlen)
{
    r->metrics_fd = -1;
    if (r->cfg.metrics_port == 0)
        return 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ckv_errorf(-errno, err, errlen, "metrics socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)r->cfg.metrics_port)};
    inet_pton(AF_INET, r->cfg.metrics_bind, &a.sin_addr);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(fd, 16) != 0) {
        int e = errno;
        close(fd);
        return ckv_errorf(-e, err, errlen, "metrics listener %s:%d: %s", r->cfg.metrics_bind,
                          r->cfg.metrics_port, strerror(e));
    }
    r->metrics_fd = fd;
    return 0;
}

int router_new(const struct router_config *cfg, router_t **out, char *err, size_t errlen)
{
    *out = NULL;
    router_t *r = calloc(1, sizeof(*r));
    if (!r)
        return ckv_errorf(-ENOMEM, err, errlen, "out of memory");
    r->cfg = *cfg;
    r->metrics_fd = -1;
    r->next_job_id = 1;
    r->sessions = calloc((size_t)cfg->sessions_max, sizeof(*r->sessions));
    int rc = -ENOMEM;
    if (!r->sessions) {
        ckv_errorf(rc, err, errlen, "out of memory");
        goto err;
    }
    if ((rc = run_dir_prepare(cfg->run_dir, err, errlen)))
        goto err;
#define EP(dst, given, file)                                                                       \
    snprintf(dst, sizeof(dst), "%s", *(given) ? (given) : "");                                     \
    if (!*(given))                                                                                 \
        snprintf(dst, sizeof(dst), "ipc://%s/%s", cfg->run_dir, file);
    EP(r->client_ep, cfg->client_endpoint, "router.sock");
    EP(r->worker_ep, cfg->worker_endpoint, "router-workers.sock");
    EP(r->pub_ep, cfg->pub_endpoint, "router-stats.sock");
#undef EP
    r->zctx = zmq_ctx_new();
    if (!r->zctx) {
        rc = ckv_errorf(-errno, err, errlen, "zmq_ctx_new: %s", zmq_strerror(errno));
        goto err;
    }
    if ((rc = bind_sock(r, &r->workers, ZMQ_ROUTER, r->worker_ep, err, errlen)) ||
        (rc = bind_sock(r, &r->pub, ZMQ_PUB, r->pub_ep, err, errlen)) ||
        (rc = metrics_listen(r, err, errlen)) ||
        /* the client socket last: its file appearing means the router is ready */
        (rc = bind_sock(r, &r->clients, ZMQ_ROUTER, r->client_ep, err, errlen)))
        goto err;
    r->t_start_ms = ckv_now_ms();
    r->next_pub_ms = r->t_start_ms + (uint64_t)cfg->pub_interval_ms;
    r->last_pub_ms = r->t_start_ms;
    LOG_INFO("clients on %s, workers on %s, stats on %s, metrics %s:%d", r->client_ep, r->worker_ep,
             r->pub_ep, cfg->metrics_port ? cfg->metrics_bind : "off", cfg->metrics_port);
    *out = r;
    return 0;
err:
    router_destroy(&r);
    return rc;
}

void router_stop(router_t *r)
{
    r->stop = 1;
}

static void job_free(struct job *j)
{
    ckv_wire_free(j->req);
    free(j);
}

void router_destroy(router_t **rp)
{
    router_t *r = *rp;
    if (!r)
        return;
    while (r->jobs) {
        struct job *j = r->jobs;
        r->jobs = j->next;
        job_free(j);
    }
    while (r->ws) {
        struct worker *w = r->ws;
        r->ws = w->next;
        free(w);
    }
    if (r->clients)
        zmq_close(r->clients);
    if (r->workers)
        zmq_close(r->workers);
    if (r->pub)
        zmq_close(r->pub);
    if (r->zctx)
        zmq_ctx_term(r->zctx);
    if (r->metrics_fd >= 0)
        close(r->metrics_fd);
    const char *eps[] = {r->client_ep, r->worker_ep, r->pub_ep};
    for (size_t i = 0; i < CKV_ARRAY_LEN(eps); i++)
        if (strncmp(eps[i], "ipc://", 6) == 0)
            unlink(eps[i] + 6);
    free(r->sessions);
    free(r);
    *rp = NULL;
}

/* ---- lookups ---- */

static bool same_route(const struct ckv_wire_addr *a, const struct ckv_wire_addr *b)
{
    if (a->n_route != b->n_route)
        return false;
    for (int i = 0; i < a->n_route; i++)
        if (a->route_len[i] != b->route_len[i] || memcmp(a->route[i], b->route[i], a->route_len[i]))
            return false;
    return true;
}

static struct worker *worker_by_addr(router_t *r, const struct ckv_wire_addr *a)
{
    for (struct worker *w = r->ws; w; w = w->next)
        if (same_route(&w->addr, a))
            return w;
    return NULL;
}

static struct job *job_by_id(router_t *r, uint64_t id)
{
    for (struct job *j = r->jobs; j; j = j->next)
        if (j->id == id)
            return j;
    return NULL;
}

static struct job *job_by_client(router_t *r, const struct ckv_wire_addr *from)
{
    for (struct job *j = r->jobs; j; j = j->next)
        if (j->client.request_id == from->request_id && same_route(&j->client, from))
            return j;
    return NULL;
}

static int n_queued(router_t *r)
{
    int n = 0;
    for (struct job *j = r->jobs; j; j = j->next)
        n += j->state == JOB_QUEUED;
    return n;
}

static uint64_t outstanding(router_t *r, const struct worker *w)
{
    uint64_t n = 0;
    for (struct job *j = r->jobs; j; j = j->next)
        if (j->w == w && j->state != JOB_QUEUED)
            n += j->max_tokens > j->generated ? j->max_tokens - j->generated : 0;
    return n;
}

/* ---- sending ---- */

static void job_unlink(router_t *r, struct job *j)
{
    for (struct job **p = &r->jobs; *p; p = &(*p)->next) {
        if (*p == j) {
            *p = j->next;
            break;
        }
    }
    if (j->w && j->w->running > 0)
        j->w->running--;
}

static void send_cancel(router_t *r, struct job *j)
{
    if (!j->w || j->state == JOB_QUEUED)
        return;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Cancel c = CKV__CANCEL__INIT;
    env.request_id = j->id;
    env.body_case = CKV__ENVELOPE__BODY_CANCEL;
    env.cancel = &c;
    int rc = ckv_wire_send(r->workers, &j->w->addr, &env, ZMQ_DONTWAIT);
    if (rc)
        LOG_DEBUG("cancel of job %llu to %s: %s", (unsigned long long)j->id, j->w->name,
                  ckv_strerror(rc));
}

/* Sends env to the job's client (request id set). A client that is gone or not reading has
 * its job cancelled and ended: returns -EPIPE then (j is freed). */
static int to_client(router_t *r, struct job *j, Ckv__Envelope *env)
{
    env->request_id = j->client.request_id;
    int rc = ckv_wire_send(r->clients, &j->client, env, ZMQ_DONTWAIT);
    if (rc == 0)
        return 0;
    LOG_WARN("client of request %llu unreachable (%s): cancelling it",
             (unsigned long long)j->client.request_id, ckv_strerror(rc));
    r->st.clients_gone++;
    send_cancel(r, j);
    job_unlink(r, j);
    job_free(j);
    return -EPIPE;
}

/* Ends a job with an Error to its client (and a Cancel to its worker when cancel is set). */
__attribute__((format(printf, 5, 6))) static void
job_fail(router_t *r, struct job *j, Ckv__ErrorCode code, bool cancel, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (cancel)
        send_cancel(r, j);
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Error e = CKV__ERROR__INIT;
    e.code = code;
    e.message = msg;
    env.body_case = CKV__ENVELOPE__BODY_ERROR;
    env.error = &e;
    if (code == CKV__ERROR_CODE__ERROR_CODE_CANCELLED)
        r->st.cancelled++;
    else
        r->st.failed++;
    job_unlink(r, j);
    env.request_id = j->client.request_id;
    int rc = ckv_wire_send(r->clients, &j->client, &env, ZMQ_DONTWAIT);
    if (rc)
        LOG_DEBUG("error reply to a gone client: %s", ckv_strerror(rc));
    job_free(j);
}

/* ---- sessions ---- */

static struct session *session_find(router_t *r, const char *id)
{
    for (int i = 0; i < r->n_sessions; i++)
        if (strcmp(r->sessions[i].id, id) == 0)
            return &r->sessions[i];
    return NULL;
}

static void session_bind(router_t *r, const char *id, const char *worker)
{
    struct session *s = session_find(r, id);
    if (!s) {
        if (r->n_sessions < r->cfg.sessions_max) {
            s = &r->sessions[r->n_sessions++];
        } else { /* forget the least recently used */
            s = &r->sessions[0];
            for (int i = 1; i < r->n_sessions; i++)
                if (r->sessions[i].used_ms < s->used_ms)
                    s = &r->sessions[i];
        }
        snprintf(s->id, sizeof(s->id), "%s", id);
    }
    snprintf(s->worker, sizeof(s->worker), "%s", worker);
    s->used_ms = ckv_now_ms();
}

/* ---- dispatch ---- */

/* The worker for j: its session's worker when that one has room, else the least loaded by
 * outstanding tokens among those with room; NULL when every worker is full. */
static struct worker *pick(router_t *r, const struct job *j)
{
    const char *sid = j->req->generate->session_id;
    if (sid && *sid) {
        struct session *s = session_find(r, sid);
        if (s)
            for (struct worker *w = r->ws; w; w = w->next)
                if (strcmp(w->name, s->worker) == 0 && w->running < w->capacity)
                    return w;
    }
    struct worker *best = NULL;
    uint64_t best_load = 0;
    for (struct worker *w = r->ws; w; w = w->next) {
        if (w->running >= w->capacity)
            continue;
        uint64_t load = outstanding(r, w);
        if (!best || load < best_load) {
            best = w;
            best_load = load;
        }
    }
    return best;
}

static void dispatch(router_t *r)
{
    for (;;) {
        struct job *oldest = NULL;
        for (struct job *j = r->jobs; j; j = j->next)
            if (j->state == JOB_QUEUED && (!oldest || j->order < oldest->order))
                oldest = j;
        if (!oldest)
            return;
        struct worker *w = pick(r, oldest);
        if (!w)
            return;
        struct job *j = oldest;
        j->req->request_id = j->id;
        int rc = ckv_wire_send(r->workers, &w->addr, j->req, ZMQ_DONTWAIT);
        if (rc) {
            /* the worker's pipe is gone or full: it will be declared dead by its silence */
            LOG_WARN("dispatch of job %llu to %s: %s", (unsigned long long)j->id, w->name,
                     ckv_strerror(rc));
            w->running = w->capacity; /* no more to it until it heartbeats */
            continue;
        }
        j->state = JOB_DISPATCHED;
        j->w = w;
        j->t_dispatch_us = ckv_now_us();
        w->running++;
        const char *sid = j->req->generate->session_id;
        if (sid && *sid)
            session_bind(r, sid, w->name);
        LOG_DEBUG("job %llu (client request %llu) -> %s", (unsigned long long)j->id,
                  (unsigned long long)j->client.request_id, w->name);
    }
}

/* The worker is dead (cause says why): DISPATCHED jobs go back to the queue, STREAMING ones
 * fail with an error naming it. */
static void worker_lost(router_t *r, struct worker *w, const char *cause)
{
    LOG_WARN("worker %s lost: %s", w->name, cause);
    r->st.workers_lost++;
    for (struct job *j = r->jobs, *next; j; j = next) {
        next = j->next;
        if (j->w != w)
            continue;
        if (j->state == JOB_DISPATCHED) {
            j->state = JOB_QUEUED;
            j->w = NULL;
            r->st.redispatched++;
            LOG_INFO("job %llu re-queued (it had not started on %s)", (unsigned long long)j->id,
                     w->name);
        } else if (j->state == JOB_STREAMING) {
            r->st.lost_midstream++;
            j->w = NULL; /* nothing to cancel: the worker is gone */
            job_fail(r, j, CKV__ERROR_CODE__ERROR_CODE_UNAVAILABLE, false,
                     "worker %s died mid-stream after %u tokens: %s", w->name, j->generated, cause);
        }
    }
    for (struct worker **p = &r->ws; *p; p = &(*p)->next) {
        if (*p == w) {
            *p = w->next;
            break;
        }
    }
    free(w);
}

/* ---- client messages ---- */

static void reply_error(void *sock, const struct ckv_wire_addr *to, Ckv__ErrorCode code,
                        const char *msg)
{
    int rc = ckv_wire_reply_error(sock, to, code, "%s", msg);
    if (rc)
        LOG_DEBUG("error reply: %s", ckv_strerror(rc));
}

static bool bad_float(float v, float lo, float hi)
{
    return !isfinite(v) || v < lo || v > hi;
}

/* Takes ownership of env. */
static void on_generate(router_t *r, const struct ckv_wire_addr *from, Ckv__Envelope *env)
{
    const Ckv__Generate *g = env->generate;
    char msg[256] = "";
    if (env->request_id == 0)
        snprintf(msg, sizeof(msg), "generate: request_id 0 (choose a non-zero id)");
    else if ((!g->prompt || !*g->prompt) && g->n_token_ids == 0)
        snprintf(msg, sizeof(msg), "generate: empty prompt (no text and no token ids)");
    else if (g->max_tokens > (uint32_t)r->cfg.max_tokens_limit)
        snprintf(msg, sizeof(msg), "generate: max_tokens %u above the limit %d", g->max_tokens,
                 r->cfg.max_tokens_limit);
    else if (bad_float(g->temperature, 0, 100) || bad_float(g->top_p, 0, 1))
        snprintf(msg, sizeof(msg), "generate: temperature must be in [0, 100], top_p in [0, 1]");
    else if (g->session_id && strlen(g->session_id) >= sizeof(((struct session *)0)->id))
        snprintf(msg, sizeof(msg), "generate: session_id longer than %zu bytes",
                 sizeof(((struct session *)0)->id) - 1);
    else if (job_by_client(r, from))
        snprintf(msg, sizeof(msg), "generate: request %llu is already running for this client",
                 (unsigned long long)env->request_id);
    if (*msg) {
        r->st.bad_requests++;
        LOG_INFO("bad request from a client: %s", msg);
        reply_error(r->clients, from, CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST, msg);
        ckv_wire_free(env);
        return;
    }
    r->st.requests++;
    /* room now (a worker with a free slot and nobody ahead), or room in the queue */
    bool ahead = n_queued(r) > 0;
    bool free_slot = false;
    for (struct worker *w = r->ws; w; w = w->next)
        free_slot |= w->running < w->capacity;
    if ((ahead || !free_slot) && n_queued(r) >= r->cfg.queue_max) {
        r->st.rejected++;
        char m[160];
        snprintf(m, sizeof(m), "overloaded: %d requests waiting (queue-max %d), %s", n_queued(r),
                 r->cfg.queue_max, r->ws ? "every worker busy" : "no worker registered");
        reply_error(r->clients, from, CKV__ERROR_CODE__ERROR_CODE_OVERLOADED, m);
        ckv_wire_free(env);
        return;
    }
    struct job *j = calloc(1, sizeof(*j));
    if (!j) {
        reply_error(r->clients, from, CKV__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
        ckv_wire_free(env);
        return;
    }
    j->id = r->next_job_id++;
    j->order = r->next_order++;
    j->state = JOB_QUEUED;
    j->client = *from;
    j->req = env;
    if (env->generate->max_tokens == 0)
        env->generate->max_tokens = (uint32_t)r->cfg.default_max_tokens;
    j->max_tokens = env->generate->max_tokens;
    j->t_recv_us = ckv_now_us();
    j->next = r->jobs;
    r->jobs = j;
    dispatch(r);
}

static void on_cancel(router_t *r, const struct ckv_wire_addr *from)
{
    struct job *j = job_by_client(r, from);
    if (!j)
        return; /* finished already, or never was: nothing to do */
    LOG_DEBUG("client cancelled request %llu", (unsigned long long)from->request_id);
    job_fail(r, j, CKV__ERROR_CODE__ERROR_CODE_CANCELLED, true, "cancelled by the client");
    dispatch(r);
}

static void render_stats(router_t *r, bool prometheus, struct ckv_buf *out);

static void on_client(router_t *r)
{
    for (int n = 0; n < 256; n++) {
        struct ckv_wire_addr from;
        Ckv__Envelope *env;
        int rc = ckv_wire_recv(r->clients, &from, &env, r->cfg.max_msg_bytes, ZMQ_DONTWAIT);
        if (rc == -EAGAIN)
            return;
        if (rc) {
            if (ckv_wire_rc_is_peer_fault(rc)) {
                r->st.bad_frames++;
                LOG_INFO("bad frame from a client: %s", ckv_strerror(rc));
                ckv_wire_reply_error(r->clients, &from, ckv_wire_error_code(rc), "%s",
                                     ckv_strerror(rc));
                continue;
            }
            LOG_ERROR("client socket: %s", ckv_strerror(rc));
            return;
        }
        switch (env->body_case) {
        case CKV__ENVELOPE__BODY_GENERATE: on_generate(r, &from, env); continue;
        case CKV__ENVELOPE__BODY_CANCEL: on_cancel(r, &from); break;
        case CKV__ENVELOPE__BODY_STATS_REQUEST: {
            struct ckv_buf b = {0};
            render_stats(r, env->stats_request->prometheus, &b);
            Ckv__Envelope rep = CKV__ENVELOPE__INIT;
            Ckv__StatsReply sr = CKV__STATS_REPLY__INIT;
            sr.text = b.data ? b.data : "";
            rep.request_id = env->request_id;
            rep.body_case = CKV__ENVELOPE__BODY_STATS_REPLY;
            rep.stats_reply = &sr;
            ckv_wire_send(r->clients, &from, &rep, ZMQ_DONTWAIT);
            ckv_buf_free(&b);
            break;
        }
        case CKV__ENVELOPE__BODY_PING: {
            Ckv__Envelope rep = CKV__ENVELOPE__INIT;
            Ckv__Pong p = CKV__PONG__INIT;
            p.nonce = env->ping->nonce;
            rep.request_id = env->request_id;
            rep.body_case = CKV__ENVELOPE__BODY_PONG;
            rep.pong = &p;
            ckv_wire_send(r->clients, &from, &rep, ZMQ_DONTWAIT);
            break;
        }
        default:
            r->st.bad_frames++;
            LOG_INFO("client sent message type %d, not a client request", (int)env->body_case);
            reply_error(r->clients, &from, CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE,
                        "not a client request (Generate, Cancel, StatsRequest or Ping)");
        }
        ckv_wire_free(env);
    }
}

/* ---- worker messages ---- */

static void on_register(router_t *r, const struct ckv_wire_addr *from, const Ckv__WorkerRegister *m)
{
    if (!m->name || !*m->name || m->capacity == 0) {
        reply_error(r->workers, from, CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST,
                    "register: a name and a capacity >= 1 are required");
        return;
    }
    /* the same name (a restarted worker) or the same connection replaces the old entry */
    for (struct worker *w = r->ws, *next; w; w = next) {
        next = w->next;
        if (strcmp(w->name, m->name) == 0 || same_route(&w->addr, from))
            worker_lost(r, w, "it registered again (restarted)");
    }
    struct worker *w = calloc(1, sizeof(*w));
    if (!w) {
        reply_error(r->workers, from, CKV__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
        return;
    }
    w->addr = *from;
    snprintf(w->name, sizeof(w->name), "%s", m->name);
    snprintf(w->model, sizeof(w->model), "%s", m->model ? m->model : "");
    snprintf(w->kv_method, sizeof(w->kv_method), "%s", m->kv_method ? m->kv_method : "");
    w->capacity = m->capacity;
    w->registered_ms = w->last_seen_ms = ckv_now_ms();
    Ckv__WorkerHeartbeat hb = CKV__WORKER_HEARTBEAT__INIT;
    w->hb = hb;
    w->next = r->ws;
    r->ws = w;
    r->st.workers_registered++;
    LOG_INFO("worker %s registered: model %s, capacity %u, method %s", w->name, w->model,
             w->capacity, w->kv_method);
    Ckv__Envelope rep = CKV__ENVELOPE__INIT;
    Ckv__WorkerRegisterReply rr = CKV__WORKER_REGISTER_REPLY__INIT;
    rr.heartbeat_ms = (uint32_t)r->cfg.heartbeat_ms;
    rep.request_id = from->request_id;
    rep.body_case = CKV__ENVELOPE__BODY_WORKER_REGISTER_REPLY;
    rep.worker_register_reply = &rr;
    ckv_wire_send(r->workers, from, &rep, ZMQ_DONTWAIT);
    dispatch(r);
}

static void on_token(router_t *r, struct job *j, Ckv__Envelope *env)
{
    uint64_t now = ckv_now_us();
    if (j->state != JOB_STREAMING) {
        j->state = JOB_STREAMING;
        j->t_first_us = now;
        record_us(&r->st.ttft_us, &r->st.ttft_s, now - j->t_recv_us);
    } else {
        record_us(&r->st.itl_us, &r->st.itl_s, now - j->t_last_us);
    }
    j->t_last_us = now;
    j->generated++;
    r->st.generation_tokens++;
    to_client(r, j, env);
}

static void on_done(router_t *r, struct job *j, const Ckv__Done *d)
{
    uint64_t now = ckv_now_us();
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    Ckv__Done o = CKV__DONE__INIT;
    o.prompt_tokens = d->prompt_tokens;
    o.generated_tokens = d->generated_tokens;
    o.finish_reason = d->finish_reason;
    o.prefill_ms = d->prefill_ms;
    o.decode_ms = d->decode_ms;
    o.text = d->text;
    o.queue_ms = (double)(j->t_dispatch_us - j->t_recv_us) / 1e3;
    o.ttft_ms = j->t_first_us ? (double)(j->t_first_us - j->t_recv_us) / 1e3 : 0;
    o.total_ms = (double)(now - j->t_recv_us) / 1e3;
    o.worker = j->w->name;
    env.body_case = CKV__ENVELOPE__BODY_DONE;
    env.done = &o;
    r->st.done++;
    r->st.prompt_tokens += d->prompt_tokens;
    if (d->finish_reason && strcmp(d->finish_reason, "length") == 0)
        r->st.finished_length++;
    else if (d->finish_reason && strcmp(d->finish_reason, "stop") == 0)
        r->st.finished_stop++;
    else
        r->st.finished_other++;
    record_us(&r->st.e2e_us, &r->st.e2e_s, now - j->t_recv_us);
    record_us(&r->st.queue_us, &r->st.queue_s, j->t_dispatch_us - j->t_recv_us);
    if (to_client(r, j, &env) == 0) {
        job_unlink(r, j);
        job_free(j);
    }
}

static void on_worker(router_t *r)
{
    for (int n = 0; n < 1024; n++) {
        struct ckv_wire_addr from;
        Ckv__Envelope *env;
        int rc = ckv_wire_recv(r->workers, &from, &env, r->cfg.max_msg_bytes, ZMQ_DONTWAIT);
        if (rc == -EAGAIN)
            return;
        if (rc) {
            if (ckv_wire_rc_is_peer_fault(rc)) {
                LOG_WARN("bad frame from a worker: %s", ckv_strerror(rc));
                ckv_wire_reply_error(r->workers, &from, ckv_wire_error_code(rc), "%s",
                                     ckv_strerror(rc));
                continue;
            }
            LOG_ERROR("worker socket: %s", ckv_strerror(rc));
            return;
        }
        if (env->body_case == CKV__ENVELOPE__BODY_WORKER_REGISTER) {
            on_register(r, &from, env->worker_register);
            ckv_wire_free(env);
            continue;
        }
        struct worker *w = worker_by_addr(r, &from);
        if (!w) {
            /* a worker we declared dead, or the router restarted: it must register again */
            if (env->body_case == CKV__ENVELOPE__BODY_WORKER_HEARTBEAT)
                reply_error(r->workers, &from, CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND,
                            "unknown worker: register again");
            ckv_wire_free(env);
            continue;
        }
        w->last_seen_ms = ckv_now_ms();
        struct job *j = NULL;
        switch (env->body_case) {
        case CKV__ENVELOPE__BODY_WORKER_HEARTBEAT: {
            Ckv__WorkerHeartbeat *h = env->worker_heartbeat;
            w->hb = *h;
            w->hb.base.unknown_fields = NULL;
            w->hb.base.n_unknown_fields = 0;
            /* a worker we stopped sending to (a failed send) is given work again */
            uint32_t mine = 0;
            for (struct job *q = r->jobs; q; q = q->next)
                mine += q->w == w;
            w->running = mine;
            break;
        }
        case CKV__ENVELOPE__BODY_TOKEN_EVENT:
        case CKV__ENVELOPE__BODY_DONE:
        case CKV__ENVELOPE__BODY_ERROR:
            j = job_by_id(r, env->request_id);
            if (!j || j->w != w) {
                LOG_DEBUG("late message %d of job %llu from %s dropped", (int)env->body_case,
                          (unsigned long long)env->request_id, w->name);
                break;
            }
            if (env->body_case == CKV__ENVELOPE__BODY_TOKEN_EVENT) {
                on_token(r, j, env);
            } else if (env->body_case == CKV__ENVELOPE__BODY_DONE) {
                on_done(r, j, env->done);
                dispatch(r);
            } else if (env->error->code == CKV__ERROR_CODE__ERROR_CODE_OVERLOADED &&
                       j->state == JOB_DISPATCHED) {
                /* the worker had no room after all: back to the head of the queue */
                j->state = JOB_QUEUED;
                j->w = NULL;
                if (w->running)
                    w->running--;
                w->running = w->capacity; /* until its next heartbeat */
                dispatch(r);
            } else {
                job_fail(r, j, env->error->code, false, "worker %s: %s", w->name,
                         env->error->message ? env->error->message : "");
                dispatch(r);
            }
            break;
        case CKV__ENVELOPE__BODY_PONG: break;
        default: LOG_WARN("worker %s sent message type %d", w->name, (int)env->body_case);
        }
        ckv_wire_free(env);
    }
}

/* ---- liveness ---- */

static void check_workers(router_t *r)
{
    uint64_t now = ckv_now_ms();
    if (r->cfg.queue_timeout_ms > 0) {
        uint64_t now_us = ckv_now_us(), limit_us = (uint64_t)r->cfg.queue_timeout_ms * 1000;
        for (struct job *j = r->jobs, *next; j; j = next) {
            next = j->next;
            if (j->state == JOB_QUEUED && now_us - j->t_recv_us > limit_us)
                job_fail(r, j, CKV__ERROR_CODE__ERROR_CODE_TIMEOUT, false,
                         "no worker took the request within %d ms (queue-timeout-ms; %s)",
                         r->cfg.queue_timeout_ms,
                         r->ws ? "every worker busy" : "no worker registered");
        }
    }
    for (struct worker *w = r->ws, *next; w; w = next) {
        next = w->next;
        uint64_t silent = now - w->last_seen_ms;
        if (silent > (uint64_t)r->cfg.worker_timeout_ms) {
            char cause[160];
            snprintf(cause, sizeof(cause), "no heartbeat for %.1f s (worker-timeout-ms %d)",
                     (double)silent / 1e3, r->cfg.worker_timeout_ms);
            worker_lost(r, w, cause);
        }
    }
    dispatch(r);
}

/* ---- stats ---- */

static void render_sec_hist(struct ckv_buf *b, const char *name, const char *help,
                            const struct sec_hist *h)
{
    ckv_buf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (size_t i = 0; i < N_SEC_BOUNDS; i++) {
        cum += h->b[i];
        ckv_buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, sec_bounds[i],
                       (unsigned long long)cum);
    }
    ckv_buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
                   (unsigned long long)h->count, name, h->sum, name, (unsigned long long)h->count);
}

static int n_running(router_t *r)
{
    int n = 0;
    for (struct job *j = r->jobs; j; j = j->next)
        n += j->state != JOB_QUEUED;
    return n;
}

static void render_prometheus(router_t *r, struct ckv_buf *b)
{
    const struct router_stats *s = &r->st;
    /* vLLM's names (vllm: -> ckv:) where one exists */
    ckv_buf_printf(b,
                   "# HELP ckv:num_requests_running Requests on workers.\n"
                   "# TYPE ckv:num_requests_running gauge\nckv:num_requests_running %d\n",
                   n_running(r));
    ckv_buf_printf(b,
                   "# HELP ckv:num_requests_waiting Requests queued in the router.\n"
                   "# TYPE ckv:num_requests_waiting gauge\nckv:num_requests_waiting %d\n",
                   n_queued(r));
    ckv_buf_printf(b,
                   "# HELP ckv:prompt_tokens_total Prompt tokens of finished requests.\n"
                   "# TYPE ckv:prompt_tokens_total counter\nckv:prompt_tokens_total %llu\n",
                   (unsigned long long)s->prompt_tokens);
    ckv_buf_printf(b,
                   "# HELP ckv:generation_tokens_total Tokens relayed to clients.\n"
                   "# TYPE ckv:generation_tokens_total counter\n"
                   "ckv:generation_tokens_total %llu\n",
                   (unsigned long long)s->generation_tokens);
    ckv_buf_printf(b,
                   "# HELP ckv:request_success_total Requests finished, by reason.\n"
                   "# TYPE ckv:request_success_total counter\n"
                   "ckv:request_success_total{finished_reason=\"length\"} %llu\n"
                   "ckv:request_success_total{finished_reason=\"stop\"} %llu\n"
                   "ckv:request_success_total{finished_reason=\"other\"} %llu\n",
                   (unsigned long long)s->finished_length, (unsigned long long)s->finished_stop,
                   (unsigned long long)s->finished_other);
    render_sec_hist(b, "ckv:time_to_first_token_seconds",
                    "Time to first token (router: request received -> first token sent).",
                    &s->ttft_s);
    render_sec_hist(b, "ckv:inter_token_latency_seconds", "Time between tokens of a request.",
                    &s->itl_s);
    render_sec_hist(b, "ckv:e2e_request_latency_seconds", "Request received -> Done sent.",
                    &s->e2e_s);
    render_sec_hist(b, "ckv:request_queue_time_seconds", "Time waiting for a worker.", &s->queue_s);
    ckv_buf_printf(b, "# HELP ckv:kv_cache_usage_perc Live sequences / capacity, per worker.\n"
                      "# TYPE ckv:kv_cache_usage_perc gauge\n");
    for (struct worker *w = r->ws; w; w = w->next)
        ckv_buf_printf(b, "ckv:kv_cache_usage_perc{worker=\"%s\"} %.4f\n", w->name, w->hb.kv_usage);
    ckv_buf_printf(b, "# HELP ckv:kv_cache_hits_total Cluster cache hits, per worker.\n"
                      "# TYPE ckv:kv_cache_hits_total counter\n");
    for (struct worker *w = r->ws; w; w = w->next)
        ckv_buf_printf(b, "ckv:kv_cache_hits_total{worker=\"%s\"} %llu\n", w->name,
                       (unsigned long long)w->hb.kv_cache_hits);
    ckv_buf_printf(b, "# HELP ckv:kv_cache_misses_total Cluster cache misses, per worker.\n"
                      "# TYPE ckv:kv_cache_misses_total counter\n");
    for (struct worker *w = r->ws; w; w = w->next)
        ckv_buf_printf(b, "ckv:kv_cache_misses_total{worker=\"%s\"} %llu\n", w->name,
                       (unsigned long long)w->hb.kv_cache_misses);
    ckv_buf_printf(b, "# HELP ckv:kv_store_usage_perc Blocks in use / pool of the worker's "
                      "ckv-kvstore.\n# TYPE ckv:kv_store_usage_perc gauge\n");
    for (struct worker *w = r->ws; w; w = w->next)
        if (w->hb.store_blocks_total)
            ckv_buf_printf(b, "ckv:kv_store_usage_perc{worker=\"%s\"} %.4f\n", w->name,
                           (double)w->hb.store_blocks_used / (double)w->hb.store_blocks_total);
    /* the router's own */
    struct ckv_stats_writer sw;
    ckv_stats_begin(&sw, b, true, "ckv_router");
    ckv_stats_counter(&sw, "requests", "Generate requests accepted", s->requests);
    ckv_stats_counter(&sw, "requests_failed", "requests ended with an Error", s->failed);
    ckv_stats_counter(&sw, "requests_rejected", "requests refused: overloaded", s->rejected);
    ckv_stats_counter(&sw, "requests_cancelled", "requests cancelled by clients", s->cancelled);
    ckv_stats_counter(&sw, "requests_redispatched", "requests moved off a dead worker",
                      s->redispatched);
    ckv_stats_counter(&sw, "bad_frames", "malformed or unexpected client frames", s->bad_frames);
    ckv_stats_counter(&sw, "workers_lost", "workers declared dead", s->workers_lost);
    int alive = 0;
    for (struct worker *w = r->ws; w; w = w->next)
        alive++;
    ckv_stats_gauge(&sw, "workers", "workers registered and alive", alive);
}

static void render_stats(router_t *r, bool prometheus, struct ckv_buf *b)
{
    if (prometheus) {
        render_prometheus(r, b);
        return;
    }
    const struct router_stats *s = &r->st;
    struct ckv_stats_writer sw;
    ckv_stats_begin(&sw, b, false, "ckv_router");
    ckv_stats_section(&sw, "Router");
    ckv_stats_gauge(&sw, "uptime_s", "", (double)(ckv_now_ms() - r->t_start_ms) / 1e3);
    ckv_stats_text(&sw, "client_endpoint", "", r->client_ep);
    ckv_stats_text(&sw, "worker_endpoint", "", r->worker_ep);
    ckv_stats_text(&sw, "stats_endpoint", "", r->pub_ep);
    ckv_stats_section(&sw, "Requests");
    ckv_stats_gauge(&sw, "waiting", "", n_queued(r));
    ckv_stats_gauge(&sw, "running", "", n_running(r));
    ckv_stats_counter(&sw, "requests", "", s->requests);
    ckv_stats_counter(&sw, "done", "", s->done);
    ckv_stats_counter(&sw, "failed", "", s->failed);
    ckv_stats_counter(&sw, "rejected", "", s->rejected);
    ckv_stats_counter(&sw, "cancelled", "", s->cancelled);
    ckv_stats_counter(&sw, "redispatched", "", s->redispatched);
    ckv_stats_counter(&sw, "lost_midstream", "", s->lost_midstream);
    ckv_stats_counter(&sw, "clients_gone", "", s->clients_gone);
    ckv_stats_counter(&sw, "bad_frames", "", s->bad_frames);
    ckv_stats_counter(&sw, "bad_requests", "", s->bad_requests);
    ckv_stats_counter(&sw, "prompt_tokens", "", s->prompt_tokens);
    ckv_stats_counter(&sw, "generation_tokens", "", s->generation_tokens);
    ckv_stats_gauge(&sw, "tok_s", "", r->tok_s);
    ckv_stats_section(&sw, "Latency");
    ckv_stats_hist(&sw, "ttft_us", "", &s->ttft_us);
    ckv_stats_hist(&sw, "itl_us", "", &s->itl_us);
    ckv_stats_hist(&sw, "e2e_us", "", &s->e2e_us);
    ckv_stats_hist(&sw, "queue_us", "", &s->queue_us);
    ckv_stats_section(&sw, "Workers");
    int n = 0;
    for (struct worker *w = r->ws; w; w = w->next)
        n++;
    ckv_stats_gauge(&sw, "workers", "", n);
    ckv_stats_counter(&sw, "workers_registered", "", s->workers_registered);
    ckv_stats_counter(&sw, "workers_lost", "", s->workers_lost);
    for (struct worker *w = r->ws; w; w = w->next)
        ckv_buf_printf(
            b,
            "worker_%s:model=%s,capacity=%u,running=%u,outstanding_tokens=%llu,"
            "tokens=%llu,requests_done=%llu,decode_tok_s=%.1f,kv_cache_hits=%llu,"
            "kv_cache_misses=%llu,store_blocks_used=%llu,store_blocks_total=%llu,"
            "heartbeat_age_s=%.2f\n",
            w->name, w->model, w->capacity, w->running, (unsigned long long)outstanding(r, w),
            (unsigned long long)w->hb.tokens_generated, (unsigned long long)w->hb.requests_done,
            w->hb.decode_tok_s, (unsigned long long)w->hb.kv_cache_hits,
            (unsigned long long)w->hb.kv_cache_misses, (unsigned long long)w->hb.store_blocks_used,
            (unsigned long long)w->hb.store_blocks_total,
            (double)(ckv_now_ms() - w->last_seen_ms) / 1e3);
}

static void publish(router_t *r)
{
    uint64_t now = ckv_now_ms();
    double dt = (double)(now - r->last_pub_ms) / 1e3;
    r->tok_s = dt > 0 ? (double)(r->st.generation_tokens - r->st.tokens_last_pub) / dt : 0;
    r->st.tokens_last_pub = r->st.generation_tokens;
    r->last_pub_ms = now;
    int nw = 0;
    for (struct worker *w = r->ws; w; w = w->next)
        nw++;
    Ckv__WorkerInfo *infos = calloc((size_t)nw + 1, sizeof(*infos));
    Ckv__WorkerInfo **ptrs = calloc((size_t)nw + 1, sizeof(*ptrs));
    if (!infos || !ptrs) {
        free(infos);
        free(ptrs);
        return;
    }
    int i = 0;
    for (struct worker *w = r->ws; w; w = w->next, i++) {
        Ckv__WorkerInfo wi = CKV__WORKER_INFO__INIT;
        wi.name = w->name;
        wi.model = w->model;
        wi.alive = true;
        wi.capacity = w->capacity;
        wi.running = w->running;
        wi.outstanding_tokens = outstanding(r, w);
        wi.tokens_generated = w->hb.tokens_generated;
        wi.requests_done = w->hb.requests_done;
        wi.decode_tok_s = w->hb.decode_tok_s;
        wi.kv_cache_hits = w->hb.kv_cache_hits;
        wi.kv_cache_misses = w->hb.kv_cache_misses;
        wi.heartbeat_age_s = (double)(now - w->last_seen_ms) / 1e3;
        wi.store_blocks_used = w->hb.store_blocks_used;
        wi.store_blocks_total = w->hb.store_blocks_total;
        wi.store_clusters_spilled = w->hb.store_clusters_spilled;
        infos[i] = wi;
        ptrs[i] = &infos[i];
    }
    Ckv__StatsSnapshot s = CKV__STATS_SNAPSHOT__INIT;
    s.uptime_s = (double)(now - r->t_start_ms) / 1e3;
    s.waiting = (uint32_t)n_queued(r);
    s.running = (uint32_t)n_running(r);
    s.requests_total = r->st.requests;
    s.requests_done = r->st.done;
    s.requests_failed = r->st.failed;
    s.requests_rejected = r->st.rejected;
    s.generation_tokens = r->st.generation_tokens;
    s.prompt_tokens = r->st.prompt_tokens;
    s.ttft_p50_ms = ckv_hist_quantile(&r->st.ttft_us, 0.5) / 1e3;
    s.itl_p50_ms = ckv_hist_quantile(&r->st.itl_us, 0.5) / 1e3;
    s.tok_s = r->tok_s;
    s.n_workers = (size_t)nw;
    s.workers = ptrs;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.body_case = CKV__ENVELOPE__BODY_STATS_SNAPSHOT;
    env.stats_snapshot = &s;
    ckv_wire_send(r->pub, NULL, &env, ZMQ_DONTWAIT);
    free(infos);
    free(ptrs);
}

/* ---- GET /metrics ---- */

/* One connection: read the request line (bounded wait: the listener is on loopback and
 * scrapers send at once), answer, close. */
static void serve_metrics(router_t *r)
{
    int fd = accept4(r->metrics_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return;
    char req[2048];
    size_t got = 0;
    uint64_t deadline = ckv_now_ms() + 500;
    while (got < sizeof(req) - 1) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int64_t left = (int64_t)deadline - (int64_t)ckv_now_ms();
        if (left <= 0 || poll(&p, 1, (int)left) <= 0)
            break;
        ssize_t n = read(fd, req + got, sizeof(req) - 1 - got);
        if (n <= 0)
            break;
        got += (size_t)n;
        req[got] = 0;
        if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
            break;
    }
    req[got] = 0;
    struct ckv_buf body = {0}, head = {0};
    const char *status = "200 OK";
    if (strncmp(req, "GET /metrics", 12) == 0) {
        render_stats(r, true, &body);
    } else if (strncmp(req, "GET / ", 6) == 0) {
        ckv_buf_printf(&body, "ckv-router: metrics at /metrics\n");
    } else {
        status = strncmp(req, "GET ", 4) == 0 ? "404 Not Found" : "405 Method Not Allowed";
        ckv_buf_printf(&body, "%s\n", status);
    }
    ckv_buf_printf(&head,
                   "HTTP/1.0 %s\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                   "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                   status, body.len);
    struct iovec_like {
        const char *p;
        size_t n;
    } parts[2] = {{head.data, head.len}, {body.data, body.len}};
    for (int i = 0; i < 2; i++) {
        size_t off = 0;
        while (off < parts[i].n) {
            ssize_t n = send(fd, parts[i].p + off, parts[i].n - off, MSG_NOSIGNAL);
            if (n <= 0)
                break;
            off += (size_t)n;
        }
    }
    close(fd);
    ckv_buf_free(&head);
    ckv_buf_free(&body);
}

/* ---- loop ---- */

int router_run(router_t *r)
{
    uint64_t next_check = ckv_now_ms() + 100;
    while (!r->stop) {
        zmq_pollitem_t items[3] = {
            {.socket = r->clients, .events = ZMQ_POLLIN},
            {.socket = r->workers, .events = ZMQ_POLLIN},
            {.socket = NULL, .fd = r->metrics_fd, .events = ZMQ_POLLIN},
        };
        int n_items = r->metrics_fd >= 0 ? 3 : 2;
        uint64_t now = ckv_now_ms();
        uint64_t wake = CKV_MIN(next_check, r->next_pub_ms);
        long timeout = wake > now ? (long)(wake - now) : 0;
        int rc = zmq_poll(items, n_items, timeout);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            LOG_ERROR("zmq_poll: %s", zmq_strerror(errno));
            return -errno;
        }
        /* workers first: their Done frees the slots the new requests want */
        if (items[1].revents & ZMQ_POLLIN)
            on_worker(r);
        if (items[0].revents & ZMQ_POLLIN)
            on_client(r);
        if (n_items == 3 && (items[2].revents & ZMQ_POLLIN))
            serve_metrics(r);
        now = ckv_now_ms();
        if (now >= next_check) {
            check_workers(r);
            next_check = now + 100;
        }
        if (now >= r->next_pub_ms) {
            publish(r);
            r->next_pub_ms = now + (uint64_t)r->cfg.pub_interval_ms;
        }
    }
    LOG_INFO("stopping: %d requests waiting and %d running are failed", n_queued(r), n_running(r));
    while (r->jobs)
        job_fail(r, r->jobs, CKV__ERROR_CODE__ERROR_CODE_UNAVAILABLE, true,
                 "the router is stopping");
    return 0;
}
