/*
 * Suite "error": error names and the always-on ASSERT.
 */
#include <criterion/criterion.h>
#include <signal.h>

#include "ckv_error.h"

Test(error, names)
{
    cr_assert_str_eq(ckv_strerror(0), "success");
    cr_assert_str_eq(ckv_strerror(-ENOENT), "No such file or directory");
    cr_assert_str_eq(ckv_strerror(CKV_ETOOBIG), "message too large");
    cr_assert_str_eq(ckv_strerror(-99999), "unknown error");
}

Test(error, assert_aborts, .signal = SIGABRT)
{
    int x = 1;
    ASSERT(x == 2);
}
