/*
 * ckv-router (DESIGN.md, "The router"): the front door of the served stack. Clients send
 * Generate on a ROUTER socket and get TokenEvents then one Done or Error; workers connect to
 * a second ROUTER socket, register, heartbeat, and receive the Generates the router dispatches
 * (least loaded by outstanding tokens, with session affinity; a bounded queue in front, full
 * -> `overloaded` at once). A PUB socket publishes a StatsSnapshot every second, a small HTTP
 * listener on loopback answers GET /metrics in Prometheus text. Messages: proto/router.proto.
 *
 *   struct router_config cfg;   // router_config_options, ckv_config_load()
 *   router_t *r;
 *   router_new(&cfg, &r, err, sizeof(err));   // binds everything
 *   router_run(r);                            // until router_stop() (a signal handler)
 *   router_destroy(&r);
 */
#ifndef ROUTER_H
#define ROUTER_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#include "ckv_config.h"

struct router_config {
    char run_dir[256];         /* ipc:// endpoints; created with mode 0700 */
    char client_endpoint[512]; /* "": ipc://<run_dir>/router.sock */
    char worker_endpoint[512]; /* "": ipc://<run_dir>/router-workers.sock */
    char pub_endpoint[512];    /* "": ipc://<run_dir>/router-stats.sock */
    char metrics_bind[64];     /* address of the HTTP listener */
    int metrics_port;          /* 0: no listener */
    int queue_max;             /* requests waiting for a worker, at most */
    int queue_timeout_ms;      /* a request waiting longer fails; 0: waits forever */
    int heartbeat_ms;          /* workers heartbeat this often */
    int worker_timeout_ms;     /* a worker silent this long is dead */
    int max_tokens_limit;      /* a Generate asking for more is refused */
    int default_max_tokens;    /* for a Generate with max_tokens 0 */
    int sessions_max;          /* session -> worker bindings remembered */
    int pub_interval_ms;       /* StatsSnapshot period */
    uint64_t max_msg_bytes;    /* every socket's message limit */
    char log_level[16];
    char log_file[PATH_MAX];
};

extern const struct ckv_config_opt router_config_options[];

/* Checks what the table's bounds cannot (endpoints, loopback). Returns 0 or CKV_ECONFIG. */
int router_config_check(const struct router_config *cfg, char *err, size_t errlen);

typedef struct router router_t;

/* Prepares the run directory and binds every socket. *out is owned by the caller
 * (router_destroy()). Returns 0 or a negative error with a message in err. */
int router_new(const struct router_config *cfg, router_t **out, char *err, size_t errlen);

/* Serves until router_stop(). Returns 0, or a negative error when polling fails. */
int router_run(router_t *r);

/* Async-signal-safe: makes router_run() return soon. */
void router_stop(router_t *r);

/* Closes every socket and frees; NULLs *r. */
void router_destroy(router_t **r);

#endif
