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

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN); /* a closed log pipe or metrics client must not kill the router */
    bool dump = false;
    char *args[argc > 0 ? argc : 1];
    int n = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(router_config_options, &u);
            printf("usage: ckv-router [--config FILE] [--name value ...]\n"
                   "       ckv-router --dump-config [options]    print the effective config\n\n"
                   "options (config file lines are `name value`; see deploy/stack.conf):\n%s",
                   u.data ? u.data : "");
            ckv_buf_free(&u);
            return 0;
        }
        if (strcmp(argv[i], "--dump-config") == 0)
            dump = true;
        else
            args[n++] = argv[i];
    }
    static struct router_config cfg;
    char err[768];
    if (ckv_config_load(router_config_options, &cfg, n, args, NULL, 0, NULL, err, sizeof(err)) ||
        router_config_check(&cfg, err, sizeof(err))) {
        fprintf(stderr, "ckv-router: %s\n", err);
        return 2;
    }
    if (dump) {
        struct ckv_buf b = {0};
        ckv_config_dump(router_config_options, &cfg, &b);
        fputs(b.data ? b.data : "", stdout);
        ckv_buf_free(&b);
        return 0;
    }
    int level;
    if (ckv_log_level_parse(cfg.log_level, &level)) {
        fprintf(stderr, "ckv-router: log-level '%s': debug, info, warn, error or off\n",
                cfg.log_level);
        return 2;
    }
    ckv_log_init("ckv-router", level);
    if (cfg.log_file[0]) {
        int fd = open(cfg.log_file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd < 0) {
            fprintf(stderr, "ckv-router: log-file %s: %s\n", cfg.log_file, strerror(errno));
            return 2;
        }
        ckv_log_set_fd(fd);
    }
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
    int rc = router_run(r);
    the_router = NULL;
    router_destroy(&r);
    LOG_INFO("stopped");
    return rc ? 1 : 0;
}
