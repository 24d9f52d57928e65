/*
 * A growable byte buffer for building text (stats, config dumps, replies).
 *
 *   struct ckv_buf b = {0};
 *   ckv_buf_printf(&b, "blocks_used:%zu\n", n);
 *   use(b.data, b.len);        // data is always NUL-terminated when len > 0
 *   ckv_buf_free(&b);
 *
 * Allocation failure is sticky: the buffer stops growing and `oom` is set, so a writer can
 * format everything and check once at the end.
 */
#ifndef CKV_BUF_H
#define CKV_BUF_H

#include <stdbool.h>
#include <stddef.h>

struct ckv_buf {
    char *data; /* owned; NUL-terminated */
    size_t len; /* bytes used, excluding the NUL */
    size_t cap; /* bytes allocated */
    bool oom;   /* an append failed for lack of memory */
};

/* Appends len bytes. Returns 0 or -ENOMEM (and sets oom). */
int ckv_buf_append(struct ckv_buf *b, const void *data, size_t len);

/* Appends formatted text. Returns 0 or -ENOMEM. */
__attribute__((format(printf, 2, 3))) int ckv_buf_printf(struct ckv_buf *b, const char *fmt, ...);

/* Appends s[0..n) as a JSON string literal: quotes, backslash escapes for `"` and `\\`, \n,
 * \u00XX for other control bytes; other bytes as they are (UTF-8 passes through). Returns 0 or
 * -ENOMEM. */
int ckv_buf_json_str(struct ckv_buf *b, const char *s, size_t n);

/* Empties the buffer, keeping its memory. */
void ckv_buf_reset(struct ckv_buf *b);

/* Frees the memory and zeroes the struct. */
void ckv_buf_free(struct ckv_buf *b);

#endif
