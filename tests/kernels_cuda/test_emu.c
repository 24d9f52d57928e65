/*
 * Suite "cuda_emu": runs build/bin/ckv-tests-cuda-emu, the CUDA backend's suites
 * (test_cuda_*.c) linked with the backend built for the CPU emulation of CUDA
 * (kernels/cuda/emu/), as a child process, and asserts that every one of its tests passed. So
 * one ckv-tests run (README command 2, CI) executes the CUDA kernels' logic even on a machine
 * without a GPU. Its output is in the log named on failure. Skipped when the build has no
 * emulation (-DCKV_CUDA_EMU=OFF).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ckv_test.h"

Test(cuda_emu, cuda_suites_pass_on_the_emulation, .timeout = 600)
{
    char bin[512], dir[256], log[600];
    ckv_test_bin_path("ckv-tests-cuda-emu", bin, sizeof(bin));
    if (access(bin, X_OK) != 0)
        cr_skip_test("%s not built (CKV_CUDA_EMU=OFF)", bin);
    cr_assert_eq(ckv_test_tmpdir(dir, sizeof(dir)), 0);
    snprintf(log, sizeof(log), "%s/cuda-emu.log", dir);
    /* this test runs in a Criterion (boxfort) worker: its map variable would make the child
     * runner believe it is a worker too */
    unsetenv("BXFI_MAP");
    char *argv[] = {bin, "--jobs", "1", NULL};
    pid_t pid = ckv_test_spawn(argv, log);
    cr_assert_gt(pid, 0);
    int status = 0;
    cr_assert_eq(ckv_test_wait(pid, 590 * 1000, &status), 0, "ckv-tests-cuda-emu still runs");
    /* the runner's summary: every test passed, none skipped (the emulation has a device) */
    FILE *f = fopen(log, "r");
    cr_assert(f);
    char line[512], summary[512] = "";
    while (fgets(line, sizeof(line), f))
        if (strstr(line, "Synthesis:"))
            snprintf(summary, sizeof(summary), "%s", line);
    fclose(f);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "ckv-tests-cuda-emu failed: %s(log %s)", summary, log);
    cr_assert(strstr(summary, "Failing: 0 | Crashing: 0"), "%s", summary);
    int tested = 0, passing = -1;
    const char *t = strstr(summary, "Tested: "), *p = strstr(summary, "Passing: ");
    cr_assert(t && p, "no summary in %s", log);
    tested = atoi(t + 8), passing = atoi(p + 9);
    cr_assert(tested > 0 && passing == tested, "%s", summary);
    ckv_test_rmrf(dir);
}
