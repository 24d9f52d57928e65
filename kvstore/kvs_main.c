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
#include "ckv_main.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "kvs_config.h"
#include "kvs_server.h"
#include "kvs_store.h"

static int check_config(const void *cfg, char *err, size_t errlen)
{
    return kvs_config_check(cfg, err, errlen);
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN); /* a closed log pipe must not kill the store */
    static const char *const flags[] = {"--cleanup", NULL};
    unsigned set = 0;
    struct kvs_config cfg;
    char err[512];
    static const struct ckv_main_spec spec = {
        .prog = "ckv-kvstore",
        .usage = "usage: ckv-kvstore [--config FILE] [--name value ...]\n"
                 "       ckv-kvstore --cleanup [same options]   remove a stale segment and spill "
                 "file\n"
                 "       ckv-kvstore --dump-config [options]    print the effective config\n\n"
                 "options (config file lines are `name value`; see deploy/kvstore.conf):\n",
        .table = kvs_config_options,
        .check = check_config,
        .flags = flags,
    };
    int rc = ckv_main_config(&spec, &cfg, &set, argc, argv);
    if (rc)
        return rc == 1 ? 0 : rc;
    if ((rc = ckv_main_log("ckv-kvstore", cfg.log_level, cfg.log_file)))
        return rc;
    bool cleanup = set & 1u;
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
