/*
 * Growable byte buffer (see ckv_buf.h).
 */
#include "ckv_buf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int buf_reserve(struct ckv_buf *b, size_t extra)
{
    if (b->oom)
        return -ENOMEM;
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) {
        b->oom = true;
        return -ENOMEM;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

int ckv_buf_append(struct ckv_buf *b, const void *data, size_t len)
{
    int rc = buf_reserve(b, len);
    if (rc)
        return rc;
    if (len)
        memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
    return 0;
}

int ckv_buf_printf(struct ckv_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -EINVAL;
    int rc = buf_reserve(b, (size_t)n);
    if (rc)
        return rc;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void ckv_buf_reset(struct ckv_buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void ckv_buf_free(struct ckv_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

int ckv_buf_json_str(struct ckv_buf *b, const char *s, size_t n)
{
    ckv_buf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            ckv_buf_printf(b, "\\%c", c);
        else if (c == '\n')
            ckv_buf_append(b, "\\n", 2);
        else if (c < 0x20)
            ckv_buf_printf(b, "\\u%04x", c);
        else
            ckv_buf_append(b, (const char *)&c, 1);
    }
    ckv_buf_append(b, "\"", 1);
    return b->oom ? -ENOMEM : 0;
}
