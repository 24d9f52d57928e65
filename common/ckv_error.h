/*
 * Errors and assertions shared by every clusterkv module.
 *
 * Convention (STYLE.md rule 5): a function that can fail returns int, 0 on success and a
 * negative value on failure: either a negative errno (-EINVAL, -ENOMEM, ...) or one of the
 * negative CKV_E* codes below for failures errno has no word for. ckv_strerror() names both.
 *
 * ASSERT() is always on, in release builds too: it is for bugs (a broken invariant), never for
 * bad input. Bad input returns an error (STYLE.md rule 7).
 */
#ifndef CKV_ERROR_H
#define CKV_ERROR_H

#include <errno.h>
#include <stddef.h>

/* Module codes, all below -4095 so that they never collide with a negative errno. */
enum {
    CKV_EBASE = -5000,
    CKV_EPROTO_VERSION = -5001, /* peer speaks another protocol version */
    CKV_EMALFORMED = -5002,     /* bytes did not decode */
    CKV_ETOOBIG = -5003,        /* message or file above a size limit */
    CKV_EUNKNOWN_TYPE = -5004,  /* message type not known or not handled here */
    CKV_ECONFIG = -5005,        /* bad configuration value or file */
    CKV_EFORMAT = -5006,        /* bad file format (GGUF, dumps) */
    CKV_EUNSUPPORTED = -5007,   /* valid input this build cannot handle */
    CKV_EREMOTE = -5008,        /* the peer answered with an Error message */
    CKV_ENODEVICE = -5009,      /* no usable GPU for the requested backend */
};

/* Names a return code: strerror() for a negative errno, the module message otherwise.
 * Returns a static string; never NULL. */
const char *ckv_strerror(int rc);

/* Writes a formatted message to err (when err is not NULL and errlen > 0; truncated to fit)
 * and returns rc, for the `return ckv_errorf(CKV_EFORMAT, err, errlen, "...", ...)` of
 * functions that report what went wrong in a caller's buffer. */
__attribute__((format(printf, 4, 5))) int ckv_errorf(int rc, char *err, size_t errlen,
                                                     const char *fmt, ...);

/* Prints "ASSERT failed: expr (file:line, func)" with a backtrace to stderr and aborts. */
__attribute__((noreturn, cold)) void ckv_assert_fail(const char *expr, const char *file, int line,
                                                     const char *func);

#define ASSERT(expr)                                                                               \
    do {                                                                                           \
        if (__builtin_expect(!(expr), 0))                                                          \
            ckv_assert_fail(#expr, __FILE__, __LINE__, __func__);                                  \
    } while (0)

#define CKV_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define CKV_MIN(a, b) ((a) < (b) ? (a) : (b))
#define CKV_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
