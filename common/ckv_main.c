/* The start of a program's main(): see ckv_main.h. */
#include "ckv_main.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "ckv_buf.h"
#include "ckv_log.h"

int ckv_main_config(const struct ckv_main_spec *spec, void *cfg, unsigned *flags_set, int argc,
                    char **argv)
{
    bool dump = false;
    char *args[argc > 0 ? argc : 1];
    int n = 0;
    if (flags_set)
        *flags_set = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(spec->table, &u);
            printf("%s%s", spec->usage, u.data ? u.data : "");
            ckv_buf_free(&u);
            return 1;
        }
        if (strcmp(argv[i], "--dump-config") == 0) {
            dump = true;
            continue;
        }
        int flag = -1;
        for (int f = 0; spec->flags && spec->flags[f]; f++)
            if (strcmp(argv[i], spec->flags[f]) == 0)
                flag = f;
        if (flag >= 0) {
            if (flags_set)
                *flags_set |= 1u << flag;
            continue;
        }
        args[n] = argv[i];
        for (int a = 0; spec->aliases && spec->aliases[a]; a += 2)
            if (strcmp(argv[i], spec->aliases[a]) == 0)
                args[n] = (char *)spec->aliases[a + 1];
        n++;
    }
    char err[1024];
    if (ckv_config_load(spec->table, cfg, n, args, NULL, 0, NULL, err, sizeof(err)) ||
        (spec->check && spec->check(cfg, err, sizeof(err)))) {
        fprintf(stderr, "%s: %s\n", spec->prog, err);
        return 2;
    }
    if (dump) {
        struct ckv_buf b = {0};
        ckv_config_dump(spec->table, cfg, &b);
        fputs(b.data ? b.data : "", stdout);
        ckv_buf_free(&b);
        return 1;
    }
    return 0;
}

int ckv_main_log(const char *prog, const char *level, const char *log_file)
{
    int lv;
    if (ckv_log_level_parse(level, &lv)) {
        fprintf(stderr, "%s: log-level '%s': debug, info, warn, error or off\n", prog, level);
        return 2;
    }
    ckv_log_init(prog, lv);
    if (log_file && log_file[0]) {
        int fd = open(log_file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd < 0) {
            fprintf(stderr, "%s: log-file %s: %s\n", prog, log_file, strerror(errno));
            return 2;
        }
        ckv_log_set_fd(fd);
    }
    return 0;
}
