/*
 * ckv-kvstore's event loop (redis ae style, one thread): zmq_poll over the ROUTER socket, the
 * io_uring completion eventfd and a signalfd, with the store's next deadline as the timeout.
 * The loop never blocks on the disk: I/O goes through the ring and requests that wait for it
 * are answered from kvs_store_poll() when it completes.
 */
#ifndef KVS_SERVER_H
#define KVS_SERVER_H

#include "kvs_config.h"

/* Creates the run directory (mode 0700), takes the endpoint lock, opens the store, binds
 * ipc://<run-dir>/<socket> and serves until SIGTERM or SIGINT; then removes the segment and
 * the endpoint. Returns 0 after an orderly exit, or a negative code (message logged) when
 * start-up failed. */
int kvs_server_run(const struct kvs_config *cfg);

#endif
