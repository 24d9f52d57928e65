/*
 * Suite "buf": the growable buffer.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "ckv_buf.h"

Test(buf, grows_and_stays_terminated)
{
    struct ckv_buf b = {0};
    for (int i = 0; i < 1000; i++)
        cr_assert_eq(ckv_buf_printf(&b, "%d,", i), 0);
    cr_assert_eq(b.len, strlen(b.data));
    cr_assert(strncmp(b.data, "0,1,2,", 6) == 0);
    cr_assert(strstr(b.data, ",999,"));
    ckv_buf_reset(&b);
    cr_assert_eq(b.len, 0);
    cr_assert_str_eq(b.data, "");
    cr_assert_eq(ckv_buf_append(&b, "ab\0c", 4), 0);
    cr_assert_eq(b.len, 4);
    cr_assert_eq(memcmp(b.data, "ab\0c", 5), 0);
    ckv_buf_free(&b);
    cr_assert_null(b.data);
}

/* JSON string literals: quotes and backslashes escaped, control bytes as \n or \u00XX, UTF-8
 * and embedded NULs (as \u0000) within the given length. */
Test(buf, json_string_escapes)
{
    struct ckv_buf b = {0};
    const char in[] = "a\"b\\c\nd\t\x01 \xc3\xa9\0z";
    cr_assert_eq(ckv_buf_json_str(&b, in, sizeof(in) - 1), 0);
    cr_assert_str_eq(b.data, "\"a\\\"b\\\\c\\nd\\u0009\\u0001 \xc3\xa9\\u0000z\"");
    ckv_buf_reset(&b);
    cr_assert_eq(ckv_buf_json_str(&b, "", 0), 0);
    cr_assert_str_eq(b.data, "\"\"");
    ckv_buf_free(&b);
}
