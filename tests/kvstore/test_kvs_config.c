/*
 * Suite "kvs_config": ckv-kvstore's option table and its commented mirror deploy/kvstore.conf
 * (every option there, every value the default), and the checks beyond the table's bounds.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_test.h"
#include "kvs_config.h"

Test(kvs_config, example_file_lists_every_option_with_its_default)
{
    char path[512], err[512];
    ckv_test_src_path("deploy/kvstore.conf", path, sizeof(path));
    struct kvs_config def, file;
    cr_assert_eq(ckv_config_defaults(kvs_config_options, &def, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(ckv_config_defaults(kvs_config_options, &file, err, sizeof(err)), 0);
    cr_assert_eq(ckv_config_load_file(kvs_config_options, &file, path, err, sizeof(err)), 0, "%s",
                 err);
    struct ckv_buf a = {0}, b = {0};
    ckv_config_dump(kvs_config_options, &def, &a);
    ckv_config_dump(kvs_config_options, &file, &b);
    cr_assert_str_eq(a.data, b.data, "deploy/kvstore.conf sets non-default values");
    /* every option is written out in the file (not only defaulted) */
    FILE *f = fopen(path, "r");
    cr_assert(f);
    static char text[1 << 16];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[n] = '\0';
    for (const struct ckv_config_opt *o = kvs_config_options; o->name; o++) {
        char line[128];
        snprintf(line, sizeof(line), "\n%s ", o->name);
        cr_assert(strstr(text, line), "deploy/kvstore.conf lacks a line for %s", o->name);
    }
    ckv_buf_free(&a);
    ckv_buf_free(&b);
}

Test(kvs_config, checks_beyond_the_bounds)
{
    struct kvs_config c;
    char err[512];
    cr_assert_eq(ckv_config_defaults(kvs_config_options, &c, err, sizeof(err)), 0);
    cr_assert_eq(kvs_config_check(&c, err, sizeof(err)), 0, "%s", err);
    struct kvs_config bad = c;
    bad.low_watermark = 0.95;
    cr_assert_eq(kvs_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "low-watermark"), "%s", err);
    bad = c;
    bad.head_dim = 60;
    cr_assert_eq(kvs_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "multiple of 8"), "%s", err);
    bad = c;
    snprintf(bad.segment_name, sizeof(bad.segment_name), "no-slash");
    cr_assert_eq(kvs_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    bad = c;
    snprintf(bad.socket_name, sizeof(bad.socket_name), "a/b");
    cr_assert_eq(kvs_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    bad = c;
    memset(bad.run_dir, 'x', 120);
    bad.run_dir[120] = '\0';
    cr_assert_eq(kvs_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "unix socket"), "%s", err);
    bad = c;
    snprintf(bad.spill_file, sizeof(bad.spill_file), "/tmp/x");
    bad.spill_bytes = 100;
    cr_assert_eq(kvs_config_check(&bad, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "spill-size"), "%s", err);
    bad = c;
    cr_assert_neq(ckv_config_set(kvs_config_options, &bad, "io-depth", "16", err, sizeof(err)), 0,
                  "queue depth below 32 is refused");
}
