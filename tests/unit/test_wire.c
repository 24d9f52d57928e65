/*
 * Suite "wire": envelopes over real ZeroMQ sockets (ipc:// in a private directory), including
 * malformed, truncated, oversized, wrong-version and unknown-type frames: each gives an error
 * code, the whole message is consumed, and the next good message still gets through.
 */
#include <criterion/criterion.h>
#include <string.h>
#include <zmq.h>

#include "ckv_error.h"
#include "ckv_test.h"
#include "ckv_wire.h"

static char dir[256];
static void *zctx, *server, *client;

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    char ep[512];
    snprintf(ep, sizeof(ep), "ipc://%s/s.sock", dir);
    zctx = zmq_ctx_new();
    server = zmq_socket(zctx, ZMQ_ROUTER);
    client = zmq_socket(zctx, ZMQ_DEALER);
    cr_assert_eq(ckv_wire_socket_setup(server, 4096), 0);
    cr_assert_eq(ckv_wire_socket_setup(client, CKV_WIRE_DEFAULT_MAX_BYTES), 0);
    cr_assert_eq(zmq_bind(server, ep), 0);
    cr_assert_eq(zmq_connect(client, ep), 0);
}

static void teardown(void)
{
    zmq_close(client);
    zmq_close(server);
    zmq_ctx_term(zctx);
    ckv_test_rmrf(dir);
}

TestSuite(wire, .init = setup, .fini = teardown, .timeout = 20);

static int recv_timeout(void *sock, struct ckv_wire_addr *from, Ckv__Envelope **env,
                        size_t max_bytes)
{
    zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, 5000) != 1)
        return -ETIMEDOUT;
    return ckv_wire_recv(sock, from, env, max_bytes, 0);
}

static void send_ping(uint64_t id, uint64_t nonce)
{
    Ckv__Ping ping = CKV__PING__INIT;
    ping.nonce = nonce;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.request_id = id;
    env.body_case = CKV__ENVELOPE__BODY_PING;
    env.ping = &ping;
    cr_assert_eq(ckv_wire_send(client, NULL, &env, 0), 0);
}

/* The server answers one good ping, proving it still works after whatever came before. */
static void expect_good_ping_round_trip(void)
{
    send_ping(77, 1234);
    struct ckv_wire_addr from;
    Ckv__Envelope *req = NULL;
    cr_assert_eq(recv_timeout(server, &from, &req, 4096), 0);
    cr_assert_eq(req->body_case, CKV__ENVELOPE__BODY_PING);
    cr_assert_eq(req->ping->nonce, 1234);
    cr_assert_eq(from.request_id, 77);
    cr_assert_eq(from.n_route, 1, "ROUTER adds the peer identity");
    Ckv__Pong pong = CKV__PONG__INIT;
    pong.nonce = req->ping->nonce + 1;
    Ckv__Envelope rep = CKV__ENVELOPE__INIT;
    rep.request_id = req->request_id;
    rep.body_case = CKV__ENVELOPE__BODY_PONG;
    rep.pong = &pong;
    ckv_wire_free(req);
    cr_assert_eq(ckv_wire_send(server, &from, &rep, 0), 0);
    struct ckv_wire_addr back;
    Ckv__Envelope *got = NULL;
    cr_assert_eq(recv_timeout(client, &back, &got, CKV_WIRE_DEFAULT_MAX_BYTES), 0);
    cr_assert_eq(got->body_case, CKV__ENVELOPE__BODY_PONG);
    cr_assert_eq(got->pong->nonce, 1235);
    cr_assert_eq(got->request_id, 77);
    cr_assert_eq(got->version, CKV_PROTOCOL_VERSION);
    ckv_wire_free(got);
}

/* Sends raw bytes as the envelope frame, expects rc at the server and an Error reply with code
 * at the client. */
static void expect_rejected(const void *bytes, size_t len, size_t max_bytes, int rc_expected,
                            Ckv__ErrorCode code)
{
    cr_assert_eq(zmq_send(client, bytes, len, 0), (int)len);
    struct ckv_wire_addr from;
    Ckv__Envelope *req = (Ckv__Envelope *)1;
    int rc = recv_timeout(server, &from, &req, max_bytes);
    cr_assert_eq(rc, rc_expected, "rc %d (%s)", rc, ckv_strerror(rc));
    cr_assert_null(req);
    cr_assert(ckv_wire_rc_is_peer_fault(rc));
    cr_assert_eq(ckv_wire_reply_error(server, &from, ckv_wire_error_code(rc), "%s",
                                      ckv_strerror(rc)),
                 0);
    struct ckv_wire_addr back;
    Ckv__Envelope *got = NULL;
    cr_assert_eq(recv_timeout(client, &back, &got, CKV_WIRE_DEFAULT_MAX_BYTES), 0);
    cr_assert_eq(got->body_case, CKV__ENVELOPE__BODY_ERROR);
    cr_assert_eq(got->error->code, code);
    cr_assert_str_eq(got->error->message, ckv_strerror(rc));
    ckv_wire_free(got);
}

Test(wire, round_trip)
{
    expect_good_ping_round_trip();
}

Test(wire, malformed_frame)
{
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    expect_rejected(junk, sizeof(junk), 4096, CKV_EMALFORMED, CKV__ERROR_CODE__ERROR_CODE_MALFORMED);
    expect_good_ping_round_trip();
}

Test(wire, truncated_frame)
{
    Ckv__StatsReply sr = CKV__STATS_REPLY__INIT;
    sr.text = "a long enough text to be cut in the middle of its bytes";
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.version = CKV_PROTOCOL_VERSION;
    env.body_case = CKV__ENVELOPE__BODY_STATS_REPLY;
    env.stats_reply = &sr;
    uint8_t buf[256];
    size_t len = ckv__envelope__pack(&env, buf);
    cr_assert_gt(len, 20);
    expect_rejected(buf, len / 2, 4096, CKV_EMALFORMED, CKV__ERROR_CODE__ERROR_CODE_MALFORMED);
    expect_good_ping_round_trip();
}

Test(wire, empty_frame_is_unknown_type)
{
    /* zero bytes decode as an envelope with version 0 */
    expect_rejected("", 0, 4096, CKV_EPROTO_VERSION, CKV__ERROR_CODE__ERROR_CODE_BAD_VERSION);
    expect_good_ping_round_trip();
}

Test(wire, oversized_frame)
{
    /* above the receiver's limit but below the socket's ZMQ_MAXMSGSIZE: answered with an error */
    static uint8_t big[4000];
    memset(big, 0x42, sizeof(big));
    expect_rejected(big, sizeof(big), 1000, CKV_ETOOBIG, CKV__ERROR_CODE__ERROR_CODE_TOO_LARGE);
    expect_good_ping_round_trip();
}

Test(wire, above_socket_limit_drops_the_peer_not_the_server)
{
    /* ZeroMQ closes the connection of a peer that sends more than ZMQ_MAXMSGSIZE; the server
     * keeps serving, and a reconnecting client gets through. */
    static uint8_t huge[64 << 10];
    memset(huge, 0x11, sizeof(huge));
    cr_assert_eq(zmq_send(client, huge, sizeof(huge), 0), (int)sizeof(huge));
    zmq_pollitem_t it = {.socket = server, .events = ZMQ_POLLIN};
    cr_assert_eq(zmq_poll(&it, 1, 300), 0, "oversized message must not be delivered");
    zmq_close(client);
    client = zmq_socket(zctx, ZMQ_DEALER);
    ckv_wire_socket_setup(client, CKV_WIRE_DEFAULT_MAX_BYTES);
    char ep[512];
    snprintf(ep, sizeof(ep), "ipc://%s/s.sock", dir);
    cr_assert_eq(zmq_connect(client, ep), 0);
    expect_good_ping_round_trip();
}

Test(wire, wrong_version)
{
    Ckv__Ping ping = CKV__PING__INIT;
    Ckv__Envelope env = CKV__ENVELOPE__INIT;
    env.version = 99;
    env.request_id = 4242;
    env.body_case = CKV__ENVELOPE__BODY_PING;
    env.ping = &ping;
    uint8_t buf[64];
    size_t len = ckv__envelope__pack(&env, buf);
    cr_assert_eq(zmq_send(client, buf, len, 0), (int)len);
    struct ckv_wire_addr from;
    Ckv__Envelope *req;
    cr_assert_eq(recv_timeout(server, &from, &req, 4096), CKV_EPROTO_VERSION);
    cr_assert_eq(from.request_id, 4242, "request id kept for the error reply");
    expect_good_ping_round_trip();
}

Test(wire, unknown_body_type)
{
    /* version 1, request_id 5, and field 99 (no such body) as a varint */
    const uint8_t bytes[] = {0x08, 0x01, 0x10, 0x05, 0x98, 0x06, 0x01};
    expect_rejected(bytes, sizeof(bytes), 4096, CKV_EUNKNOWN_TYPE,
                    CKV__ERROR_CODE__ERROR_CODE_UNKNOWN_TYPE);
    expect_good_ping_round_trip();
}

Test(wire, too_many_routing_frames)
{
    for (int i = 0; i < 6; i++)
        cr_assert_eq(zmq_send(client, "x", 1, ZMQ_SNDMORE), 1);
    cr_assert_eq(zmq_send(client, "", 0, 0), 0);
    struct ckv_wire_addr from;
    Ckv__Envelope *req;
    cr_assert_eq(recv_timeout(server, &from, &req, 4096), CKV_EMALFORMED);
    expect_good_ping_round_trip();
}

Test(wire, request_times_out_and_skips_stale_replies)
{
    Ckv__Ping ping = CKV__PING__INIT;
    Ckv__Envelope req = CKV__ENVELOPE__INIT;
    req.body_case = CKV__ENVELOPE__BODY_PING;
    req.ping = &ping;
    Ckv__Envelope *rep = NULL;
    cr_assert_eq(ckv_wire_request(client, &req, &rep, 50, CKV_WIRE_DEFAULT_MAX_BYTES), -ETIMEDOUT);
    cr_assert_null(rep);
    uint64_t first_id = req.request_id;
    cr_assert_neq(first_id, 0);

    /* the server answers the first (timed-out) request late, then the second one */
    struct ckv_wire_addr from;
    Ckv__Envelope *in;
    cr_assert_eq(recv_timeout(server, &from, &in, 4096), 0);
    ckv_wire_free(in);
    Ckv__Pong pong = CKV__PONG__INIT;
    Ckv__Envelope late = CKV__ENVELOPE__INIT;
    late.request_id = first_id;
    late.body_case = CKV__ENVELOPE__BODY_PONG;
    late.pong = &pong;
    cr_assert_eq(ckv_wire_send(server, &from, &late, 0), 0);
    Ckv__Envelope fresh = CKV__ENVELOPE__INIT;
    fresh.request_id = first_id + 1000;
    fresh.body_case = CKV__ENVELOPE__BODY_PONG;
    pong.nonce = 9;
    fresh.pong = &pong;
    cr_assert_eq(ckv_wire_send(server, &from, &fresh, 0), 0);

    req.request_id = first_id + 1000;
    cr_assert_eq(ckv_wire_request(client, &req, &rep, 2000, CKV_WIRE_DEFAULT_MAX_BYTES), 0);
    cr_assert_eq(rep->request_id, first_id + 1000);
    cr_assert_eq(rep->pong->nonce, 9);
    ckv_wire_free(rep);
}

Test(wire, error_code_mapping_round_trips)
{
    const int codes[] = {CKV_EPROTO_VERSION, CKV_EMALFORMED, CKV_ETOOBIG, CKV_EUNKNOWN_TYPE,
                         -ENOENT, -ENOSPC, -EBUSY, -ETIMEDOUT, -ECANCELED};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        cr_assert_eq(ckv_wire_error_rc(ckv_wire_error_code(codes[i])), codes[i], "code %d",
                     codes[i]);
}
