/*
 * Error names and the always-on assertion handler.
 */
#include "ckv_error.h"

#include <execinfo.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *ckv_strerror(int rc)
{
    switch (rc) {
    case 0: return "success";
    case CKV_EPROTO_VERSION: return "protocol version mismatch";
    case CKV_EMALFORMED: return "malformed message";
    case CKV_ETOOBIG: return "message too large";
    case CKV_EUNKNOWN_TYPE: return "unknown message type";
    case CKV_ECONFIG: return "bad configuration";
    case CKV_EFORMAT: return "bad file format";
    case CKV_EUNSUPPORTED: return "unsupported";
    case CKV_EREMOTE: return "peer returned an error";
    case CKV_ENODEVICE: return "no usable device";
    default: break;
    }
    if (rc < 0 && rc > -4096)
        return strerror(-rc);
    return "unknown error";
}

int ckv_errorf(int rc, char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

void ckv_assert_fail(const char *expr, const char *file, int line, const char *func)
{
    fprintf(stderr, "ASSERT failed: %s (%s:%d, %s)\n", expr, file, line, func);
    void *frames[32];
    int n = backtrace(frames, 32);
    backtrace_symbols_fd(frames, n, STDERR_FILENO);
    abort();
}
