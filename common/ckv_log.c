/*
 * The process logger (see ckv_log.h for the line format).
 */
#include "ckv_log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

int ckv_log_level_current = CKV_LOG_INFO;
static char log_process_name[64] = "ckv";
static int log_fd = STDERR_FILENO;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};
static const char level_letters[] = "DIWE";

void ckv_log_init(const char *process_name, int level)
{
    if (process_name)
        snprintf(log_process_name, sizeof(log_process_name), "%s", process_name);
    if (level >= CKV_LOG_DEBUG && level <= CKV_LOG_OFF)
        ckv_log_level_current = level;
}

void ckv_log_set_fd(int fd)
{
    log_fd = fd;
}

int ckv_log_level_parse(const char *s, int *level)
{
    if (!s)
        return -EINVAL;
    for (int i = 0; i <= CKV_LOG_OFF; i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *level = i;
            return 0;
        }
    }
    if (strcasecmp(s, "warning") == 0) {
        *level = CKV_LOG_WARN;
        return 0;
    }
    return -EINVAL;
}

const char *ckv_log_level_name(int level)
{
    if (level < CKV_LOG_DEBUG || level > CKV_LOG_OFF)
        return "?";
    return level_names[level];
}

void ckv_log_write(int level, const char *file, int line, const char *fmt, ...)
{
    char buf[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    int lvl = level < CKV_LOG_DEBUG ? CKV_LOG_DEBUG : level > CKV_LOG_ERROR ? CKV_LOG_ERROR : level;

    int n = snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s[%d] %c %s:%d ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, log_process_name, (int)getpid(),
                     level_letters[lvl], base, line);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(buf)) {
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(buf + n, sizeof(buf) - (size_t)n, fmt, ap);
        va_end(ap);
        if (m > 0)
            n += m;
    }
    if ((size_t)n >= sizeof(buf) - 1)
        n = (int)sizeof(buf) - 2; /* truncated: keep the newline */
    buf[n++] = '\n';
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(log_fd, buf + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += w;
    }
}
