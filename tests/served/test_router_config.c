/*
 * Suite "served_config": the example config files of the served stack list every option with
 * its default (deploy/router.conf against the router's table, deploy/worker.conf against
 * `ckv-worker --dump-config`), and the router's checks beyond the table's bounds (tcp binds
 * and the metrics listener stay on loopback).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_test.h"
#include "router.h"

TestSuite(served_config, .timeout = 60);

static char *read_src(const char *rel)
{
    char path[512];
    ckv_test_src_path(rel, path, sizeof(path));
    size_t len;
    char *text = ckv_test_read_file(path, &len);
    cr_assert_not_null(text, "cannot read %s", path);
    return text;
}

Test(served_config, router_conf_lists_every_option_with_its_default)
{
    char path[512], err[512];
    ckv_test_src_path("deploy/router.conf", path, sizeof(path));
    static struct router_config def, file;
    cr_assert_eq(ckv_config_defaults(router_config_options, &def, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(ckv_config_defaults(router_config_options, &file, err, sizeof(err)), 0);
    cr_assert_eq(ckv_config_load_file(router_config_options, &file, path, err, sizeof(err)), 0,
                 "%s", err);
    struct ckv_buf a = {0}, b = {0};
    ckv_config_dump(router_config_options, &def, &a);
    ckv_config_dump(router_config_options, &file, &b);
    cr_assert_str_eq(a.data, b.data, "deploy/router.conf sets non-default values");
    char *text = read_src("deploy/router.conf");
    for (const struct ckv_config_opt *o = router_config_options; o->name; o++) {
        char line[128];
        snprintf(line, sizeof(line), "\n%s ", o->name);
        cr_assert(strstr(text, line), "deploy/router.conf lacks a line for %s", o->name);
    }
    free(text);
    ckv_buf_free(&a);
    ckv_buf_free(&b);
}

/* Runs ckv-worker with args and returns what it printed (malloc'ed). */
static char *worker_output(char *const *args)
{
    char dir[256], bin[512], out[400];
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    ckv_test_bin_path("ckv-worker", bin, sizeof(bin));
    snprintf(out, sizeof(out), "%s/out", dir);
    char *argv[8] = {bin};
    int n = 1;
    for (int i = 0; args[i]; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    pid_t pid = ckv_test_spawn(argv, out);
    cr_assert_gt(pid, 0);
    int status;
    cr_assert_eq(ckv_test_wait(pid, 20000, &status), 0);
    size_t len;
    char *text = ckv_test_read_file(out, &len);
    cr_assert_not_null(text);
    ckv_test_rmrf(dir);
    return text;
}

Test(served_config, worker_conf_lists_every_option_with_its_default)
{
    char path[512];
    ckv_test_src_path("deploy/worker.conf", path, sizeof(path));
    char *def = worker_output((char *[]){"--dump-config", NULL});
    char *file = worker_output((char *[]){"--config", path, "--dump-config", NULL});
    cr_assert_gt(strlen(def), 100, "%s", def);
    cr_assert_str_eq(def, file, "deploy/worker.conf sets non-default values");
    char *text = read_src("deploy/worker.conf");
    for (char *line = def; *line;) {
        char *nl = strchr(line, '\n');
        char name[128];
        size_t len = strcspn(line, " ");
        snprintf(name, sizeof(name), "\n%.*s ", (int)len, line);
        cr_assert(strstr(text, name), "deploy/worker.conf lacks a line for%s", name);
        if (!nl)
            break;
        line = nl + 1;
    }
    free(text);
    free(def);
    free(file);
}

Test(served_config, binds_stay_on_loopback)
{
    static struct router_config c;
    char err[512];
    cr_assert_eq(ckv_config_defaults(router_config_options, &c, err, sizeof(err)), 0);
    cr_assert_eq(router_config_check(&c, err, sizeof(err)), 0, "%s", err);
    struct router_config bad = c;
    snprintf(bad.client_endpoint, sizeof(bad.client_endpoint), "tcp://0.0.0.0:5555");
    cr_assert_eq(router_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "CURVE"), "%s", err);
    bad = c;
    snprintf(bad.worker_endpoint, sizeof(bad.worker_endpoint), "tcp://127.0.0.1:5556");
    cr_assert_eq(router_config_check(&bad, err, sizeof(err)), 0, "%s", err);
    bad = c;
    snprintf(bad.pub_endpoint, sizeof(bad.pub_endpoint), "udp://x");
    cr_assert_eq(router_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    bad = c;
    snprintf(bad.metrics_bind, sizeof(bad.metrics_bind), "10.0.0.1");
    cr_assert_eq(router_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "loopback"), "%s", err);
}
