/*
 * The process logger: one per process (STYLE.md rule 14).
 *
 *   ckv_log_init("ckv-kvstore", CKV_LOG_INFO);
 *   LOG_INFO("segment %s: %zu blocks", name, n);
 *
 * Each line: UTC timestamp with milliseconds, process name and pid, level letter, source
 * location, message. Example:
 *   2026-11-23T20:47:26.123Z ckv-kvstore[4242] I kvs_server.c:88 listening on ipc://...
 * The level is checked before any formatting, so a disabled LOG_DEBUG costs one compare.
 * Lines are written with one write() so concurrent processes sharing a file do not interleave.
 */
#ifndef CKV_LOG_H
#define CKV_LOG_H

enum ckv_log_level {
    CKV_LOG_DEBUG = 0,
    CKV_LOG_INFO = 1,
    CKV_LOG_WARN = 2,
    CKV_LOG_ERROR = 3,
    CKV_LOG_OFF = 4,
};

extern int ckv_log_level_current;

/* Sets the process name (copied) and the minimum level. Logs go to stderr until
 * ckv_log_set_fd() points them elsewhere. Safe to call again. */
void ckv_log_init(const char *process_name, int level);

/* Sends log lines to fd (not owned; the caller keeps it open while logging). */
void ckv_log_set_fd(int fd);

/* Parses "debug", "info", "warn"/"warning", "error", "off". Returns 0 or -EINVAL. */
int ckv_log_level_parse(const char *s, int *level);

/* Name of a level ("debug", ...). */
const char *ckv_log_level_name(int level);

__attribute__((format(printf, 4, 5))) void ckv_log_write(int level, const char *file, int line,
                                                         const char *fmt, ...);

#define CKV_LOG_AT(lvl, ...)                                                                       \
    do {                                                                                           \
        if ((lvl) >= ckv_log_level_current)                                                        \
            ckv_log_write((lvl), __FILE__, __LINE__, __VA_ARGS__);                                 \
    } while (0)

#define LOG_DEBUG(...) CKV_LOG_AT(CKV_LOG_DEBUG, __VA_ARGS__)
#define LOG_INFO(...) CKV_LOG_AT(CKV_LOG_INFO, __VA_ARGS__)
#define LOG_WARN(...) CKV_LOG_AT(CKV_LOG_WARN, __VA_ARGS__)
#define LOG_ERROR(...) CKV_LOG_AT(CKV_LOG_ERROR, __VA_ARGS__)

#endif
