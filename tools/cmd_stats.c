/*
 * ckv stats: asks a running daemon for its stats over its ZeroMQ endpoint and prints them.
 *
 *   ckv stats --endpoint ipc:///run/ckv/kvstore.sock [--prometheus] [--timeout-ms 2000]
 */
#include <stdio.h>
#include <string.h>
#include <zmq.h>

#include "ckv_cmds.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_wire.h"

struct stats_cfg {
    char endpoint[512];
    bool prometheus;
    int timeout_ms;
};

static const struct ckv_config_opt stats_options[] = {
    CKV_OPT_STRING(struct stats_cfg, endpoint, "endpoint", "",
                   "the daemon's endpoint, e.g. ipc:///tmp/ckv/kvstore.sock"),
    CKV_OPT_BOOL(struct stats_cfg, prometheus, "prometheus", "no",
                 "Prometheus text format instead of key:value"),
    CKV_OPT_INT(struct stats_cfg, timeout_ms, "timeout-ms", "2000", 1, 600000,
                "give up after this long"),
    CKV_OPT_END,
};

int ckv_cmd_stats(int argc, char **argv)
{
    struct stats_cfg cfg;
    char err[512];
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(stats_options, &u);
            printf("usage: ckv stats --endpoint ENDPOINT [options]\n%s", u.data);
            ckv_buf_free(&u);
            return 0;
        }
    }
    if (ckv_config_load(stats_options, &cfg, argc - 1, argv + 1, NULL, 0, NULL, err,
                        sizeof(err))) {
        fprintf(stderr, "ckv stats: %s\n", err);
        return 2;
    }
    if (!cfg.endpoint[0]) {
        fprintf(stderr, "ckv stats: --endpoint is required\n");
        return 2;
    }
    void *zctx = zmq_ctx_new();
    void *sock = zmq_socket(zctx, ZMQ_DEALER);
    int rc = ckv_wire_socket_setup(sock, CKV_WIRE_DEFAULT_MAX_BYTES);
    if (rc == 0 && zmq_connect(sock, cfg.endpoint) != 0)
        rc = -errno;
    Ckv__Envelope *rep = NULL;
    if (rc == 0) {
        Ckv__StatsRequest sr = CKV__STATS_REQUEST__INIT;
        sr.prometheus = cfg.prometheus;
        Ckv__Envelope req = CKV__ENVELOPE__INIT;
        req.body_case = CKV__ENVELOPE__BODY_STATS_REQUEST;
        req.stats_request = &sr;
        rc = ckv_wire_request(sock, &req, &rep, cfg.timeout_ms, CKV_WIRE_DEFAULT_MAX_BYTES);
    }
    int status = 0;
    if (rc) {
        fprintf(stderr, "ckv stats: %s: %s\n", cfg.endpoint, ckv_strerror(rc));
        status = 1;
    } else if (rep->body_case == CKV__ENVELOPE__BODY_ERROR) {
        fprintf(stderr, "ckv stats: %s: %s\n", cfg.endpoint, rep->error->message);
        status = 1;
    } else if (rep->body_case != CKV__ENVELOPE__BODY_STATS_REPLY) {
        fprintf(stderr, "ckv stats: %s: unexpected reply type %d\n", cfg.endpoint,
                (int)rep->body_case);
        status = 1;
    } else {
        fputs(rep->stats_reply->text, stdout);
    }
    ckv_wire_free(rep);
    zmq_close(sock);
    zmq_ctx_term(zctx);
    return status;
}
