/*
 * Envelope framing over ZeroMQ (see ckv_wire.h).
 */
#include "ckv_wire.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

#include "ckv_clock.h"
#include "ckv_error.h"
#include "ckv_log.h"

int ckv_wire_socket_setup(void *sock, size_t max_bytes)
{
    int64_t limit = (int64_t)max_bytes + 1024; /* larger than any envelope we accept */
    int linger = 0;
    if (zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &limit, sizeof(limit)) != 0)
        return -errno;
    if (zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger)) != 0)
        return -errno;
    return 0;
}

int ckv_wire_send(void *sock, const struct ckv_wire_addr *to, Ckv__Envelope *env, int flags)
{
    env->version = CKV_PROTOCOL_VERSION;
    for (int i = 0; to && i < to->n_route; i++) {
        if (zmq_send(sock, to->route[i], to->route_len[i], flags | ZMQ_SNDMORE) < 0)
            return -errno;
    }
    size_t len = ckv__envelope__get_packed_size(env);
    zmq_msg_t msg;
    if (zmq_msg_init_size(&msg, len) != 0)
        return -errno;
    size_t packed = ckv__envelope__pack(env, zmq_msg_data(&msg));
    ASSERT(packed == len);
    if (zmq_msg_send(&msg, sock, flags) < 0) {
        int e = errno;
        zmq_msg_close(&msg);
        return -e;
    }
    return 0;
}

/* Reads and discards the remaining frames of a multi-part message. */
static void drain(void *sock)
{
    int more = 1;
    size_t sz = sizeof(more);
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &sz) == 0 && more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, 0) < 0) {
            zmq_msg_close(&m);
            return;
        }
        zmq_msg_close(&m);
    }
}

int ckv_wire_recv(void *sock, struct ckv_wire_addr *from, Ckv__Envelope **env, size_t max_bytes,
                  int flags)
{
    *env = NULL;
    from->n_route = 0;
    from->request_id = 0;
    bool bad_route = false;
    zmq_msg_t msg;
    for (;;) {
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, sock, flags) < 0) {
            int e = errno;
            zmq_msg_close(&msg);
            if (from->n_route > 0 || bad_route) /* died mid-message: should not happen */
                return CKV_EMALFORMED;
            return -e;
        }
        flags &= ~ZMQ_DONTWAIT; /* the rest of a message is already here */
        if (!zmq_msg_more(&msg))
            break;
        size_t len = zmq_msg_size(&msg);
        if (from->n_route >= CKV_WIRE_MAX_ROUTE || len > CKV_WIRE_MAX_ROUTE_BYTES) {
            bad_route = true;
        } else {
            memcpy(from->route[from->n_route], zmq_msg_data(&msg), len);
            from->route_len[from->n_route++] = len;
        }
        zmq_msg_close(&msg);
    }
    /* msg is the last frame: the envelope. */
    int rc = 0;
    size_t len = zmq_msg_size(&msg);
    if (bad_route) {
        rc = CKV_EMALFORMED;
    } else if (len > max_bytes) {
        rc = CKV_ETOOBIG;
    } else {
        Ckv__Envelope *e = ckv__envelope__unpack(NULL, len, zmq_msg_data(&msg));
        if (!e) {
            rc = CKV_EMALFORMED;
        } else {
            from->request_id = e->request_id;
            if (e->version != CKV_PROTOCOL_VERSION) {
                rc = CKV_EPROTO_VERSION;
            } else if (e->body_case == CKV__ENVELOPE__BODY__NOT_SET) {
                rc = CKV_EUNKNOWN_TYPE;
            } else {
                *env = e;
                e = NULL;
            }
            if (e)
                ckv__envelope__free_unpacked(e, NULL);
        }
    }
    zmq_msg_close(&msg);
    drain(sock);
    return rc;
}

bool ckv_wire_rc_is_peer_fault(int rc)
{
    return rc == CKV_ETOOBIG || rc == CKV_EMALFORMED || rc == CKV_EPROTO_VERSION ||
           rc == CKV_EUNKNOWN_TYPE;
}

void ckv_wire_free(Ckv__Envelope *env)
{
    if (env)
        ckv__envelope__free_unpacked(env, NULL);
}

Ckv__ErrorCode ckv_wire_error_code(int rc)
{
    switch (rc) {
    case CKV_EPROTO_VERSION: return CKV__ERROR_CODE__ERROR_CODE_BAD_VERSION;
    case CKV_EMALFORMED: return CKV__ERROR_CODE__ERROR_CODE_MALFORMED;
    case CKV_ETOOBIG: return CKV__ERROR_CODE__ERROR_CODE_TOO_LARGE;
    case CKV_EUNKNOWN_TYPE: return CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE;
    case -EINVAL:
    case -ERANGE:
    case -EPROTO: return CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST;
    case -ENOENT: return CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND;
    case -ENOSPC:
    case -ENOMEM: return CKV__ERROR_CODE__ERROR_CODE_NO_SPACE;
    case -EBUSY:
    case -EAGAIN: return CKV__ERROR_CODE__ERROR_CODE_OVERLOADED;
    case -ECONNRESET:
    case -EHOSTUNREACH: return CKV__ERROR_CODE__ERROR_CODE_UNAVAILABLE;
    case -ECANCELED: return CKV__ERROR_CODE__ERROR_CODE_CANCELLED;
    case -ETIMEDOUT: return CKV__ERROR_CODE__ERROR_CODE_TIMEOUT;
    default: return CKV__ERROR_CODE__ERROR_CODE_INTERNAL;
    }
}

int ckv_wire_error_rc(Ckv__ErrorCode code)
{
    switch (code) {
    case CKV__ERROR_CODE__ERROR_CODE_BAD_VERSION: return CKV_EPROTO_VERSION;
    case CKV__ERROR_CODE__ERROR_CODE_MALFORMED: return CKV_EMALFORMED;
    case CKV__ERROR_CODE__ERROR_CODE_TOO_LARGE: return CKV_ETOOBIG;
    case CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE: return CKV_EUNKNOWN_TYPE;
    case CKV__ERROR_CODE__ERROR_CODE_BAD_REQUEST: return -EINVAL;
    case CKV__ERROR_CODE__ERROR_CODE_NOT_FOUND: return -ENOENT;
    case CKV__ERROR_CODE__ERROR_CODE_NO_SPACE: return -ENOSPC;
    case CKV__ERROR_CODE__ERROR_CODE_OVERLOADED: return -EBUSY;
    case CKV__ERROR_CODE__ERROR_CODE_UNAVAILABLE: return -EHOSTUNREACH;
    case CKV__ERROR_CODE__ERROR_CODE_CANCELLED: return -ECANCELED;
    case CKV__ERROR_CODE__ERROR_CODE_TIMEOUT: return -ETIMEDOUT;
    default: return CKV_EREMOTE;
    }
}

int ckv_wire_reply_error(void *sock, const struct ckv_wire_addr *to, Ckv__ErrorCode code,
                         const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    Ckv__Error err = CKV__ERROR__INIT;
    err.code = code;
    err.message = text;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.request_id = to ? to->request_id : 0;
    env.body_case = CKV__ENVELOPE__BODY_ERROR;
    env.error = &err;
    return ckv_wire_send(sock, to, &env, ZMQ_DONTWAIT);
}

static uint64_t next_request_id(void)
{
    static uint64_t counter;
    if (counter == 0)
        counter = (ckv_now_ns() << 16) | 1u; /* distinct across restarts of a client */
    return ++counter;
}

int ckv_wire_request(void *sock, Ckv__Envelope *req, Ckv__Envelope **rep, int timeout_ms,
                     size_t max_bytes)
{
    *rep = NULL;
    if (req->request_id == 0)
        req->request_id = next_request_id();
    int rc = ckv_wire_send(sock, NULL, req, 0);
    if (rc)
        return rc;
    uint64_t deadline = ckv_now_ms() + (uint64_t)(timeout_ms < 0 ? 0 : timeout_ms);
    for (;;) {
        uint64_t now = ckv_now_ms();
        if (now >= deadline)
            return -ETIMEDOUT;
        zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN};
        int n = zmq_poll(&item, 1, (long)(deadline - now));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -ETIMEDOUT;
        struct ckv_wire_addr from;
        Ckv__Envelope *env;
        rc = ckv_wire_recv(sock, &from, &env, max_bytes, ZMQ_DONTWAIT);
        if (rc == -EAGAIN)
            continue;
        if (rc && from.request_id != req->request_id)
            continue; /* a broken late reply to someone else: ignore */
        if (rc)
            return rc;
        if (env->request_id != req->request_id) {
            LOG_DEBUG("dropping stale reply %llu (waiting for %llu)",
                      (unsigned long long)env->request_id, (unsigned long long)req->request_id);
            ckv_wire_free(env);
            continue;
        }
        *rep = env;
        return 0;
    }
}
