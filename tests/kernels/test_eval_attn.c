/*
 * Suite "kernels_eval": `ckv eval-attn` run as a real process on small data, its CSV read
 * back and checked for what must hold whatever the data:
 *   - at a budget covering the whole context every method attends everything: recall 1 and
 *     output error 0 (tolerance 1e-6 / 1e-5: f32 kernels, double accumulation);
 *   - the oracle's recall bounds every other method's at every budget (tolerance 1e-9);
 *   - recall never falls as the budget grows; hit rates are in [0, 1];
 *   - the same data read from a dump gives the same numbers as generated in memory;
 *   - bad input (absent or corrupt dump, bad options) exits non-zero with a message.
 * A window of 5 tokens makes the decode windows get clustered during the 12 steps.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "ckv_qkv.h"
#include "ckv_test.h"
#include "ktest.h"

#define MAX_ROWS 64

struct row {
    char method[32];
    int budget;
    double attended, recall, err, hit_u, hit_t;
};

static char dir[512];

static void setup(void)
{
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
}

static void teardown(void)
{
    ckv_test_rmrf(dir);
}

/* Runs `ckv eval-attn` with the given arguments (NULL-terminated); returns the exit status. */
static int run_eval(const char *log, char *const args[])
{
    char bin[512];
    ckv_test_bin_path("ckv", bin, sizeof(bin));
    char *argv[40] = {bin, "eval-attn"};
    int n = 2;
    for (int i = 0; args[i] && n < 39; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    pid_t pid = ckv_test_spawn(argv, log);
    cr_assert_gt(pid, 0);
    int status;
    cr_assert_eq(ckv_test_wait(pid, 300000, &status), 0, "ckv eval-attn did not finish");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

static int read_csv(const char *path, struct row *rows)
{
    FILE *f = fopen(path, "r");
    cr_assert(f, "no %s", path);
    char line[1024];
    cr_assert(fgets(line, sizeof(line), f));
    cr_assert(strncmp(line, "method,budget,attended_tokens,recall,out_rel_err", 48) == 0);
    int n = 0;
    while (n < MAX_ROWS && fgets(line, sizeof(line), f)) {
        struct row *r = &rows[n];
        char unit[16];
        int got = sscanf(line, "%31[^,],%d,%lf,%lf,%lf,%15[^,],%lf,%lf", r->method, &r->budget,
                         &r->attended, &r->recall, &r->err, unit, &r->hit_u, &r->hit_t);
        cr_assert_eq(got, 8, "bad CSV line: %s", line);
        n++;
    }
    fclose(f);
    return n;
}

static const char *log_text(const char *path)
{
    static char buf[4096];
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;
    buf[n] = 0;
    if (f)
        fclose(f);
    return buf;
}

#define SMALL_ARGS                                                                                 \
    "--n-prompt", "600", "--steps", "12", "--n-q-heads", "8", "--n-kv-heads", "2", "--head-dim",   \
        "64", "--window", "5", "--window-clusters", "2", "--tokens-per-cluster", "40",             \
        "--budgets", "16,64,256,2000", "--hit-r", "4", "--kmeans-iter", "5"

Test(kernels_eval, invariants_and_dump_equals_synthetic, .init = setup, .fini = teardown)
{
    char out1[600], out2[600], log[600], csv[700], dump[600];
    snprintf(out1, sizeof(out1), "%s/syn", dir);
    snprintf(out2, sizeof(out2), "%s/dump", dir);
    snprintf(log, sizeof(log), "%s/log", dir);
    char *a1[] = {"--synthetic", SMALL_ARGS, "--out", out1, NULL};
    cr_assert_eq(run_eval(log, a1), 0, "%s", log_text(log));
    snprintf(csv, sizeof(csv), "%s/eval-attn.csv", out1);
    struct row r1[MAX_ROWS], r2[MAX_ROWS];
    int n = read_csv(csv, r1);
    cr_assert_eq(n, 6 * 4, "6 methods x 4 budgets");
    const struct row *oracle = NULL;
    for (int i = 0; i < n; i++) {
        const struct row *r = &r1[i];
        if (r->budget == 2000) {
            cr_assert(fabs(r->recall - 1.0) < 1e-6, "%s at full budget: recall %g", r->method,
                      r->recall);
            cr_assert(r->err < 1e-5, "%s at full budget: error %g", r->method, r->err);
        }
        if (i % 4) /* rows come budget by budget within a method */
            cr_assert_geq(r->recall, r1[i - 1].recall - 1e-12, "%s recall fell", r->method);
        cr_assert(r->hit_u >= 0 && r->hit_u <= 1 && r->hit_t >= 0 && r->hit_t <= 1);
        if (strcmp(r->method, "oracle") == 0 && r->budget == 16)
            oracle = r;
    }
    cr_assert(oracle);
    for (int i = 0; i < n; i++) {
        const struct row *o = oracle + (r1[i].budget == 16    ? 0
                                        : r1[i].budget == 64  ? 1
                                        : r1[i].budget == 256 ? 2
                                                              : 3);
        cr_assert_leq(r1[i].recall, o->recall + 1e-9, "%s beats the oracle at %d", r1[i].method,
                      r1[i].budget);
    }

    /* the same data through a dump file */
    struct ckv_qkv_synth_params p;
    ckv_qkv_synth_defaults(&p, 8, 2, 64, 600, 12);
    struct ckv_qkv s;
    cr_assert_eq(ckv_qkv_synth(&p, &s), 0);
    snprintf(dump, sizeof(dump), "%s/layer-05.qkv", dir);
    struct ckv_qkv_writer *w;
    cr_assert_eq(ckv_qkv_writer_open(dump, 5, 8, 2, 64, s.dtype, 600, s.k, s.v,
                                     (size_t)s.n_ctx * 64, 64, &w),
                 0);
    uint16_t k[2 * 64], v[2 * 64];
    for (int st = 0; st < 12; st++) {
        for (int h = 0; h < 2; h++) {
            memcpy(k + h * 64, (uint16_t *)s.k + ckv_qkv_kv_index(&s, h, 600 + st), 128);
            memcpy(v + h * 64, (uint16_t *)s.v + ckv_qkv_kv_index(&s, h, 600 + st), 128);
        }
        cr_assert_eq(ckv_qkv_writer_step(w, 600 + st, s.q + (size_t)st * 8 * 64, k, v), 0);
    }
    cr_assert_eq(ckv_qkv_writer_close(&w), 0);
    ckv_qkv_free(&s);
    char *a2[] = {"--dump", dir, SMALL_ARGS, "--out", out2, NULL}; /* a directory of dumps */
    cr_assert_eq(run_eval(log, a2), 0, "%s", log_text(log));
    snprintf(csv, sizeof(csv), "%s/eval-attn.csv", out2);
    cr_assert_eq(read_csv(csv, r2), n);
    for (int i = 0; i < n; i++) {
        cr_assert_str_eq(r1[i].method, r2[i].method);
        cr_assert(r1[i].recall == r2[i].recall && r1[i].err == r2[i].err &&
                      r1[i].hit_u == r2[i].hit_u,
                  "%s %d: synthetic and dump differ", r1[i].method, r1[i].budget);
    }
}

Test(kernels_eval, bad_input_is_a_clear_error, .init = setup, .fini = teardown)
{
    char log[600], path[600], out[600];
    snprintf(log, sizeof(log), "%s/log", dir);
    snprintf(out, sizeof(out), "%s/out", dir);
    snprintf(path, sizeof(path), "%s/missing.qkv", dir);
    char *a1[] = {"--dump", path, "--out", out, NULL};
    cr_assert_eq(run_eval(log, a1), 1);
    cr_assert(strstr(log_text(log), "No such file"), "%s", log_text(log));
    snprintf(path, sizeof(path), "%s/bad.qkv", dir);
    const char *junk = "definitely not a dump, but longer than the 64 bytes of a dump header, "
                       "so that the reader gets as far as the magic";
    cr_assert_eq(ckv_test_write_file(path, junk, strlen(junk)), 0);
    unlink(log);
    char *a2[] = {"--dump", path, "--out", out, NULL};
    cr_assert_eq(run_eval(log, a2), 1);
    cr_assert(strstr(log_text(log), "not a Q/K/V dump"), "%s", log_text(log));
    unlink(log);
    char *a3[] = {"--synthetic", "--budgets", "64,32", NULL};
    cr_assert_eq(run_eval(log, a3), 2);
    cr_assert(strstr(log_text(log), "--budgets"), "%s", log_text(log));
    char *a4[] = {"--synthetic", "--methods", "magic", NULL};
    cr_assert_eq(run_eval(log, a4), 2);
    char *a5[] = {"--budgets", "64", NULL}; /* neither --synthetic nor --dump */
    cr_assert_eq(run_eval(log, a5), 2);
}
