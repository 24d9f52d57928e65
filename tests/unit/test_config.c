/*
 * Suite "config": the config table, files, command-line overrides and the dump.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_test.h"

struct tcfg {
    bool flag;
    int workers;
    uint64_t segment;
    double ratio;
    char name[16];
    int mode;
};

static const char *const modes[] = {"fast", "safe", NULL};

static const struct ckv_config_opt table[] = {
    CKV_OPT_BOOL(struct tcfg, flag, "flag", "no", "a switch"),
    CKV_OPT_INT(struct tcfg, workers, "workers", "4", 1, 64, "worker count"),
    CKV_OPT_SIZE(struct tcfg, segment, "segment-size", "64m", 4096, 1ull << 40, "bytes"),
    CKV_OPT_DOUBLE(struct tcfg, ratio, "ratio", "0.9", 0.0, 1.0, "a fraction"),
    CKV_OPT_STRING(struct tcfg, name, "name", "store", "a name"),
    CKV_OPT_ENUM(struct tcfg, mode, "mode", "safe", modes, "a choice"),
    CKV_OPT_END,
};

static char dir[256];

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
}

static void teardown(void)
{
    ckv_test_rmrf(dir);
}

TestSuite(config, .init = setup, .fini = teardown);

Test(config, defaults)
{
    struct tcfg c;
    char err[256];
    memset(&c, 0xff, sizeof(c));
    cr_assert_eq(ckv_config_defaults(table, &c, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(c.flag, false);
    cr_assert_eq(c.workers, 4);
    cr_assert_eq(c.segment, 64ull << 20);
    cr_assert_float_eq(c.ratio, 0.9, 1e-12);
    cr_assert_str_eq(c.name, "store");
    cr_assert_eq(c.mode, 1);
}

Test(config, sizes)
{
    uint64_t v;
    cr_assert_eq(ckv_config_parse_size("4096", &v), 0);
    cr_assert_eq(v, 4096);
    cr_assert_eq(ckv_config_parse_size("64m", &v), 0);
    cr_assert_eq(v, 64ull << 20);
    cr_assert_eq(ckv_config_parse_size("1GB", &v), 0);
    cr_assert_eq(v, 1ull << 30);
    cr_assert_eq(ckv_config_parse_size("2kib", &v), 0);
    cr_assert_eq(v, 2048);
    cr_assert_eq(ckv_config_parse_size("3t", &v), 0);
    cr_assert_eq(v, 3ull << 40);
    cr_assert_neq(ckv_config_parse_size("", &v), 0);
    cr_assert_neq(ckv_config_parse_size("-1", &v), 0);
    cr_assert_neq(ckv_config_parse_size("12q", &v), 0);
    cr_assert_neq(ckv_config_parse_size("1mx", &v), 0);
    cr_assert_neq(ckv_config_parse_size("99999999999999999999", &v), 0);
    cr_assert_neq(ckv_config_parse_size("99999999999t", &v), 0);
}

Test(config, file_then_flags_override)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/t.conf", dir);
    const char *text = "# comment\n\n  workers 8\nsegment-size 1g\nname \"a \\\"b\\\"\"  # trailing\n"
                       "mode FAST\nflag yes\n";
    cr_assert_eq(ckv_test_write_file(path, text, strlen(text)), 0);
    char *argv[] = {"--workers", "16", "--config", path, "--ratio=0.5", "--flag", "no"};
    struct tcfg c;
    char err[256] = "";
    int rc = ckv_config_load(table, &c, 7, argv, NULL, 0, NULL, err, sizeof(err));
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_eq(c.workers, 16, "command line wins over the file");
    cr_assert_eq(c.segment, 1ull << 30);
    cr_assert_str_eq(c.name, "a \"b\"");
    cr_assert_eq(c.mode, 0);
    cr_assert_float_eq(c.ratio, 0.5, 1e-12);
    cr_assert_eq(c.flag, false);
}

Test(config, bare_bool_flag_and_positionals)
{
    char *argv[] = {"run", "--flag", "--workers", "2", "extra"};
    char *pos[2];
    int npos = 0;
    struct tcfg c;
    char err[256] = "";
    cr_assert_eq(ckv_config_load(table, &c, 5, argv, pos, 2, &npos, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(c.flag, true);
    cr_assert_eq(c.workers, 2);
    cr_assert_eq(npos, 2);
    cr_assert_str_eq(pos[0], "run");
    cr_assert_str_eq(pos[1], "extra");
    /* positionals refused when none are accepted */
    cr_assert_eq(ckv_config_load(table, &c, 5, argv, NULL, 0, NULL, err, sizeof(err)),
                 CKV_ECONFIG);
    cr_assert(strstr(err, "unexpected argument 'run'"), "%s", err);
}

/* Each malformed file gives CKV_ECONFIG and a message naming the line and the problem. */
Test(config, malformed_files)
{
    static const struct {
        const char *text;
        const char *expect;
    } cases[] = {
        {"workers 4\nbogus 1\n", ":2: unknown option 'bogus'"},
        {"workers\n", ":1: option 'workers' has no value"},
        {"workers four\n", "not an integer"},
        {"workers 65\n", "outside [1, 64]"},
        {"workers 0\n", "outside [1, 64]"},
        {"workers 99999999999999999999\n", "not an integer"},
        {"segment-size 1x\n", "not a size"},
        {"segment-size 1k\n", "outside"},
        {"ratio 1.5\n", "outside"},
        {"ratio nan\n", "not a number"},
        {"flag maybe\n", "not yes/no"},
        {"mode turbo\n", "not one of: fast, safe"},
        {"name \"unterminated\n", "unterminated quote"},
        {"name \"x\" y\n", "text after the quoted value"},
        {"name 0123456789abcdef\n", "at most 15 allowed"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct tcfg c;
        char err[256] = "";
        ckv_config_defaults(table, &c, err, sizeof(err));
        int rc = ckv_config_load_text(table, &c, cases[i].text, strlen(cases[i].text), "t.conf",
                                      err, sizeof(err));
        cr_assert_eq(rc, CKV_ECONFIG, "case %zu accepted", i);
        cr_assert(strstr(err, cases[i].expect), "case %zu: got '%s', want '%s'", i, err,
                  cases[i].expect);
        cr_assert(strncmp(err, "t.conf:", 7) == 0, "case %zu: no location in '%s'", i, err);
    }
}

Test(config, binary_and_missing_files)
{
    struct tcfg c;
    char err[256] = "";
    char path[512];
    snprintf(path, sizeof(path), "%s/bin.conf", dir);
    const char bin[] = "workers 4\n\0\x01\x02garbage\n";
    cr_assert_eq(ckv_test_write_file(path, bin, sizeof(bin)), 0);
    ckv_config_defaults(table, &c, err, sizeof(err));
    cr_assert_eq(ckv_config_load_file(table, &c, path, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "NUL byte"), "%s", err);

    snprintf(path, sizeof(path), "%s/none.conf", dir);
    cr_assert_eq(ckv_config_load_file(table, &c, path, err, sizeof(err)), -ENOENT);
    cr_assert(strstr(err, "No such file"), "%s", err);

    cr_assert_eq(ckv_config_load_file(table, &c, dir, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "not a regular file"), "%s", err);
}

Test(config, bad_command_lines)
{
    struct tcfg c;
    char err[256];
    char *a1[] = {"--nope", "1"};
    cr_assert_eq(ckv_config_load(table, &c, 2, a1, NULL, 0, NULL, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "unknown option '--nope'"), "%s", err);
    char *a2[] = {"--workers"};
    cr_assert_eq(ckv_config_load(table, &c, 1, a2, NULL, 0, NULL, err, sizeof(err)), CKV_ECONFIG);
    cr_assert(strstr(err, "needs a value"), "%s", err);
    char *a3[] = {"--config"};
    cr_assert_eq(ckv_config_load(table, &c, 1, a3, NULL, 0, NULL, err, sizeof(err)), CKV_ECONFIG);
    char *a4[] = {"--workers=1000"};
    cr_assert_eq(ckv_config_load(table, &c, 1, a4, NULL, 0, NULL, err, sizeof(err)), CKV_ECONFIG);
    char *a5[] = {"--"};
    cr_assert_eq(ckv_config_load(table, &c, 1, a5, NULL, 0, NULL, err, sizeof(err)), 0);
}

/* The dump is a config file that loads back to the same values. */
Test(config, dump_round_trips)
{
    struct tcfg a, b;
    char err[256] = "";
    char *argv[] = {"--workers", "7", "--segment-size", "12345", "--ratio", "0.125",
                    "--name", "x \"y\"", "--mode", "fast", "--flag"};
    cr_assert_eq(ckv_config_load(table, &a, 11, argv, NULL, 0, NULL, err, sizeof(err)), 0, "%s",
                 err);
    struct ckv_buf out = {0};
    ckv_config_dump(table, &a, &out);
    cr_assert(strstr(out.data, "workers 7\n"), "%s", out.data);
    cr_assert(strstr(out.data, "mode fast\n"), "%s", out.data);
    ckv_config_defaults(table, &b, err, sizeof(err));
    cr_assert_eq(ckv_config_load_text(table, &b, out.data, out.len, "dump", err, sizeof(err)), 0,
                 "%s", err);
    cr_assert_eq(memcmp(&a.flag, &b.flag, sizeof(bool)), 0);
    cr_assert_eq(a.workers, b.workers);
    cr_assert_eq(a.segment, b.segment);
    cr_assert_eq(a.ratio, b.ratio);
    cr_assert_str_eq(a.name, b.name);
    cr_assert_eq(a.mode, b.mode);
    ckv_buf_free(&out);

    struct ckv_buf usage = {0};
    ckv_config_usage(table, &usage);
    cr_assert(strstr(usage.data, "--segment-size"));
    cr_assert(strstr(usage.data, "one of: fast safe"));
    ckv_buf_free(&usage);
}
