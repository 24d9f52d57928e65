/*
 * Suite "log": line format and level filtering.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <regex.h>
#include <string.h>
#include <unistd.h>

#include "ckv_log.h"

Test(log, format_and_levels)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    ckv_log_init("ckv-test", CKV_LOG_INFO);
    ckv_log_set_fd(p[1]);
    LOG_DEBUG("hidden %d", 1);
    LOG_INFO("visible %d", 2);
    LOG_ERROR("bad %s", "thing");
    ckv_log_set_fd(STDERR_FILENO);
    close(p[1]);
    char buf[1024] = {0};
    ssize_t n = read(p[0], buf, sizeof(buf) - 1);
    close(p[0]);
    cr_assert_gt(n, 0);
    cr_assert_null(strstr(buf, "hidden"), "debug line written at info level");
    regex_t re;
    cr_assert_eq(regcomp(&re,
                         "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}\\.[0-9]{3}Z ckv-test\\[[0-9]+\\] I "
                         "test_log\\.c:[0-9]+ visible 2\n"
                         "[^\n]* E test_log\\.c:[0-9]+ bad thing\n$",
                         REG_EXTENDED),
                 0);
    cr_assert_eq(regexec(&re, buf, 0, NULL, 0), 0, "got: %s", buf);
    regfree(&re);
}

Test(log, level_names)
{
    int l = -1;
    cr_assert_eq(ckv_log_level_parse("WARNING", &l), 0);
    cr_assert_eq(l, CKV_LOG_WARN);
    cr_assert_eq(ckv_log_level_parse("debug", &l), 0);
    cr_assert_eq(l, CKV_LOG_DEBUG);
    cr_assert_eq(ckv_log_level_parse("loud", &l), -EINVAL);
    cr_assert_str_eq(ckv_log_level_name(CKV_LOG_ERROR), "error");
}

Test(log, long_lines_are_truncated_not_overflowed)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    ckv_log_set_fd(p[1]);
    static char big[8192];
    memset(big, 'x', sizeof(big) - 1);
    LOG_WARN("%s", big);
    ckv_log_set_fd(STDERR_FILENO);
    close(p[1]);
    static char buf[16384];
    ssize_t n = read(p[0], buf, sizeof(buf));
    close(p[0]);
    cr_assert(n > 1000 && n <= 2048, "line of %zd bytes", n);
    cr_assert_eq(buf[n - 1], '\n');
}
