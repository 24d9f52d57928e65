/*
 * ckv-kvstore: the pinned shared-memory cluster store with io_uring spill (docs/KVSTORE.md).
 *
 *   ckv-kvstore [--config FILE] [--name value ...]   serve
 *   ckv-kvstore --cleanup [--config FILE] ...        remove a stale segment and spill file
 *   ckv-kvstore --help | --dump-config
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "kvs_config.h"
#include "kvs_server.h"
#include "kvs_store.h"

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN); /* a closed log pipe must not kill the store */
    bool cleanup = false, dump = false;
    char *args[argc > 0 ? argc : 1];
    int n = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(kvs_config_options, &u);
            printf("usage: ckv-kvstore [--config FILE] [--name value ...]\n"
                   "       ckv-kvstore --cleanup [same options]   remove a stale segment and "
                   "spill file\n"
                   "       ckv-kvstore --dump-config [options]    print the effective config\n\n"
                   "options (config file lines are `name value`; see deploy/kvstore.conf):\n%s",
                   u.data ? u.data : "");
            ckv_buf_free(&u);
            return 0;
        }
        if (strcmp(argv[i], "--cleanup") == 0)
            cleanup = true;
        else if (strcmp(argv[i], "--dump-config") == 0)
            dump = true;
        else
            args[n++] = argv[i];
    }
    struct kvs_config cfg;
    char err[512];
    if (ckv_config_load(kvs_config_options, &cfg, n, args, NULL, 0, NULL, err, sizeof(err)) ||
        kvs_config_check(&cfg, err, sizeof(err))) {
        fprintf(stderr, "ckv-kvstore: %s\n", err);
        return 2;
    }
    int level;
    if (ckv_log_level_parse(cfg.log_level, &level)) {
        fprintf(stderr, "ckv-kvstore: log-level '%s': debug, info, warn, error or off\n",
                cfg.log_level);
        return 2;
    }
    ckv_log_init("ckv-kvstore", level);
    if (cfg.log_file[0]) {
        int fd = open(cfg.log_file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd < 0) {
            fprintf(stderr, "ckv-kvstore: log-file %s: %s\n", cfg.log_file, strerror(errno));
            return 2;
        }
        ckv_log_set_fd(fd);
    }
    if (dump) {
        struct ckv_buf b = {0};
        ckv_config_dump(kvs_config_options, &cfg, &b);
        fputs(b.data ? b.data : "", stdout);
        ckv_buf_free(&b);
        return 0;
    }
    if (cleanup) {
        int rc = kvs_store_cleanup(&cfg, err, sizeof(err));
        if (rc)
            LOG_ERROR("cleanup: %s", err);
        else
            LOG_INFO("cleanup: %s", err);
        return rc ? 1 : 0;
    }
    ckv_config_log(kvs_config_options, &cfg);
    return kvs_server_run(&cfg) == 0 ? 0 : 1;
}
