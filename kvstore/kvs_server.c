/*
 * ckv-kvstore's event loop (see kvs_server.h).
 */
#include "kvs_server.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_wire.h"
#include "kvs_store.h"

/* Requests taken from the socket per turn before I/O completions get a look. */
#define BATCH 64

struct server {
    void *sock;
    uint64_t send_failures;
};

static void send_reply(void *arg, const struct ckv_wire_addr *to, Ckv__Envelope *reply)
{
    struct server *srv = arg;
    int rc = ckv_wire_send(srv->sock, to, reply, ZMQ_DONTWAIT);
    if (rc && srv->send_failures++ < 10) /* a peer that went away: nothing to do */
        LOG_WARN("reply to request %llu not sent: %s", (unsigned long long)to->request_id,
                 ckv_strerror(rc));
}

/* Creates dir with mode 0700, or checks that an existing one is ours and private. */
static int run_dir_prepare(const char *dir)
{
    if (mkdir(dir, 0700) == 0)
        return 0;
    if (errno != EEXIST) {
        int rc = -errno;
        LOG_ERROR("run-dir %s: %s", dir, strerror(errno));
        return rc;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        LOG_ERROR("run-dir %s exists and is not a directory", dir);
        return -ENOTDIR;
    }
    if (st.st_uid != geteuid()) {
        LOG_ERROR("run-dir %s belongs to uid %u, not to us (%u)", dir, (unsigned)st.st_uid,
                  (unsigned)geteuid());
        return -EPERM;
    }
    if ((st.st_mode & 0777) != 0700) {
        LOG_WARN("run-dir %s had mode %03o: set to 0700", dir, (unsigned)(st.st_mode & 0777));
        if (chmod(dir, 0700) != 0)
            return -errno;
    }
    return 0;
}

int kvs_server_run(const struct kvs_config *cfg)
{
    int rc = run_dir_prepare(cfg->run_dir);
    if (rc)
        return rc;
    char path[512], lock_path[600], endpoint[600];
    snprintf(path, sizeof(path), "%s/%s", cfg->run_dir, cfg->socket_name);
    snprintf(lock_path, sizeof(lock_path), "%s.lock", path);
    snprintf(endpoint, sizeof(endpoint), "ipc://%s", path);

    /* ZeroMQ would silently take over the socket file of a running store: lock first. */
    int lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0) {
        rc = -errno;
        LOG_ERROR("%s: %s", lock_path, strerror(errno));
        return rc;
    }
    if (flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
        LOG_ERROR("endpoint %s is served by another ckv-kvstore (%s is locked)", endpoint,
                  lock_path);
        close(lock_fd);
        return -EBUSY;
    }

    struct server srv = {0};
    kvs_store_t *store = NULL;
    void *zctx = NULL;
    int sig_fd = -1;
    char err[768];
    rc = kvs_store_new(cfg, send_reply, &srv, &store, err, sizeof(err));
    if (rc) {
        LOG_ERROR("%s", err);
        goto out_lock;
    }

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sig_fd < 0) {
        rc = -errno;
        LOG_ERROR("signalfd: %s", strerror(errno));
        goto out_store;
    }

    zctx = zmq_ctx_new();
    srv.sock = zctx ? zmq_socket(zctx, ZMQ_ROUTER) : NULL;
    if (!srv.sock) {
        rc = -errno;
        LOG_ERROR("zmq socket: %s", zmq_strerror(errno));
        goto out_zmq;
    }
    int hwm = 100000;
    zmq_setsockopt(srv.sock, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(srv.sock, ZMQ_RCVHWM, &hwm, sizeof(hwm));
    if ((rc = ckv_wire_socket_setup(srv.sock, cfg->max_msg_bytes)) != 0) {
        LOG_ERROR("socket options: %s", ckv_strerror(rc));
        goto out_zmq;
    }
    if (zmq_bind(srv.sock, endpoint) != 0) {
        rc = -errno;
        LOG_ERROR("bind %s: %s", endpoint, zmq_strerror(errno));
        goto out_zmq;
    }
    chmod(path, 0600);
    LOG_INFO("ckv-kvstore listening on %s (pid %d)", endpoint, (int)getpid());

    for (;;) {
        zmq_pollitem_t items[3] = {
            {.socket = srv.sock, .events = ZMQ_POLLIN},
            {.fd = sig_fd, .events = ZMQ_POLLIN},
            {.fd = kvs_store_io_fd(store), .events = ZMQ_POLLIN},
        };
        int n_items = kvs_store_io_fd(store) >= 0 ? 3 : 2;
        int n = zmq_poll(items, n_items, kvs_store_timeout_ms(store));
        if (n < 0 && errno != EINTR) {
            rc = -errno;
            LOG_ERROR("zmq_poll: %s", zmq_strerror(errno));
            break;
        }
        if (n > 0 && (items[1].revents & ZMQ_POLLIN)) {
            struct signalfd_siginfo si;
            if (read(sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
                LOG_INFO("signal %u: shutting down", si.ssi_signo);
                rc = 0;
                break;
            }
        }
        for (int i = 0; n > 0 && i < BATCH; i++) {
            struct ckv_wire_addr from;
            Ckv__Envelope *req;
            int r = ckv_wire_recv(srv.sock, &from, &req, cfg->max_msg_bytes, ZMQ_DONTWAIT);
            if (r == -EAGAIN)
                break;
            if (r == 0)
                kvs_store_handle(store, &from, req);
            else if (ckv_wire_rc_is_peer_fault(r))
                kvs_store_reject(store, &from, r);
            else
                LOG_WARN("receive: %s", ckv_strerror(r));
        }
        kvs_store_poll(store);
    }

out_zmq:
    if (srv.sock)
        zmq_close(srv.sock);
    if (zctx)
        zmq_ctx_term(zctx);
    if (sig_fd >= 0)
        close(sig_fd);
    unlink(path);
out_store:
    kvs_store_destroy(&store, rc == 0);
out_lock:
    unlink(lock_path);
    close(lock_fd);
    return rc;
}
