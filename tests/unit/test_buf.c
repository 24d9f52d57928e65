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
