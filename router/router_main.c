/*
 * ckv-router: the client front door of the served stack (router.h, docs/OPERATIONS.md).
 *
 *   ckv-router [--config FILE] [--name value ...]   serve
 *   ckv-router --help | --dump-config
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
#include "router.h"

static router_t *the_router;

static void on_signal(int sig)
{
    (void)sig;
    if (the_router)
        router_stop(the_router);
}

static int check_config(const void *cfg, char *err, size_t errlen)
{
    return router_config_check(cfg, err, errlen);
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN); /* a closed log pipe or metrics client must not kill the router */
    static struct router_config cfg;
    char err[768];
    static const struct ckv_main_spec spec = {
        .prog = "ckv-router",
        .usage = "usage: ckv-router [--config FILE] [--name value ...]\n"
                 "       ckv-router --dump-config [options]    print the effective config\n\n"
                 "options (config file lines are `name value`; see deploy/router.conf):\n",
        .table = router_config_options,
        .check = check_config,
    };
    int rc = ckv_main_config(&spec, &cfg, NULL, argc, argv);
    if (rc)
        return rc == 1 ? 0 : rc;
    if ((rc = ckv_main_log("ckv-router", cfg.log_level, cfg.log_file)))
        return rc;
    ckv_config_log(router_config_options, &cfg);
    router_t *r;
    if (router_new(&cfg, &r, err, sizeof(err))) {
        LOG_ERROR("%s", err);
        return 1;
    }
    the_router = r;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    rc = router_run(r);
    the_router = NULL;
    router_destroy(&r);
    LOG_INFO("stopped");
    return rc ? 1 : 0;
}
