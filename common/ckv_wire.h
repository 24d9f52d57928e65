/*
 * Wire helpers: one protobuf-c Envelope (proto/ckv.proto) per ZeroMQ message, with a size limit,
 * over any socket type. Every failure is returned, none is fatal (DESIGN.md, "Wire rules").
 *
 * A message on the wire is zero or more routing frames (ROUTER identities, an empty delimiter
 * when the peer is a REQ socket) followed by one frame holding the packed Envelope.
 * ckv_wire_recv() keeps the routing frames and the request id in a struct ckv_wire_addr so
 * that a reply (or an error reply) goes back to the sender:
 *
 *   struct ckv_wire_addr from;
 *   Ckv__Envelope *req;
 *   int rc = ckv_wire_recv(sock, &from, &req, CKV_WIRE_DEFAULT_MAX_BYTES, 0);
 *   if (rc == 0) { ...handle req...; ckv_wire_free(req); }
 *   else if (ckv_wire_rc_is_peer_fault(rc))
 *       ckv_wire_reply_error(sock, &from, ckv_wire_error_code(rc), "%s", ckv_strerror(rc));
 */
#ifndef CKV_WIRE_H
#define CKV_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ckv.pb-c.h"

#define CKV_PROTOCOL_VERSION 1u
#define CKV_WIRE_DEFAULT_MAX_BYTES (4u << 20) /* 4 MiB: data travels in shared memory */
#define CKV_WIRE_MAX_ROUTE 4                  /* routing frames kept for a reply */
#define CKV_WIRE_MAX_ROUTE_BYTES 256          /* ZeroMQ identities are at most 255 bytes */

/* Where a message came from: caller-owned, filled by ckv_wire_recv(). */
struct ckv_wire_addr {
    int n_route;                                        /* routing frames */
    size_t route_len[CKV_WIRE_MAX_ROUTE];               /* bytes of each */
    uint8_t route[CKV_WIRE_MAX_ROUTE][CKV_WIRE_MAX_ROUTE_BYTES];
    uint64_t request_id;                                /* 0 when the envelope did not decode */
};

/* Sets the limits every clusterkv socket carries: ZMQ_MAXMSGSIZE (max_bytes plus room for
 * routing frames), linger 0 so a dead peer never blocks exit. Returns 0 or -errno. */
int ckv_wire_socket_setup(void *sock, size_t max_bytes);

/* Packs env (its version is set to CKV_PROTOCOL_VERSION) and sends it after the routing
 * frames of `to` (NULL: none). flags: 0 or ZMQ_DONTWAIT. Returns 0, -EAGAIN, or -errno. */
int ckv_wire_send(void *sock, const struct ckv_wire_addr *to, Ckv__Envelope *env, int flags);

/* Receives one message. On 0, *env is a decoded envelope with a known body type, owned by
 * the caller (free with ckv_wire_free()). On error *env is NULL and the code says why:
 *   -EAGAIN              flags had ZMQ_DONTWAIT and nothing was waiting
 *   CKV_ETOOBIG          the envelope frame exceeded max_bytes (not decoded)
 *   CKV_EMALFORMED       the frame did not decode, or the routing frames were too many/long
 *   CKV_EPROTO_VERSION   decoded, but another protocol version (from->request_id is set)
 *   CKV_EUNKNOWN_TYPE    decoded, but no body this build knows (from->request_id is set)
 *   -errno               the socket failed
 * In every case but -EAGAIN and -errno the whole message was consumed and `from` holds the
 * sender's routing frames, so an error reply can be sent. */
int ckv_wire_recv(void *sock, struct ckv_wire_addr *from, Ckv__Envelope **env, size_t max_bytes,
                  int flags);

/* True for the codes of ckv_wire_recv() that are the peer's fault and deserve an Error reply. */
bool ckv_wire_rc_is_peer_fault(int rc);

/* Frees an envelope from ckv_wire_recv() or ckv_wire_request(); NULL is fine. */
void ckv_wire_free(Ckv__Envelope *env);

/* Maps a local return code to the wire's ErrorCode. */
Ckv__ErrorCode ckv_wire_error_code(int rc);

/* Maps a wire ErrorCode back to a local return code (for clients). */
int ckv_wire_error_rc(Ckv__ErrorCode code);

/* Sends an Error envelope to `to` (NULL: no routing frames), echoing to->request_id. */
__attribute__((format(printf, 4, 5))) int ckv_wire_reply_error(void *sock,
                                                               const struct ckv_wire_addr *to,
                                                               Ckv__ErrorCode code,
                                                               const char *fmt, ...);

/* Client side: sends req (a request_id of 0 is replaced by a fresh one) on a DEALER or REQ
 * socket and waits up to timeout_ms for the reply with the same request id; replies with
 * other ids (late answers to earlier requests) are dropped. On 0, *rep is owned by the caller.
 * An Error reply is returned as 0 with (*rep)->body_case == CKV__ENVELOPE__BODY_ERROR.
 * Returns -ETIMEDOUT when nothing matching came in time, or a ckv_wire_recv() code. */
int ckv_wire_request(void *sock, Ckv__Envelope *req, Ckv__Envelope **rep, int timeout_ms,
                     size_t max_bytes);

#endif
