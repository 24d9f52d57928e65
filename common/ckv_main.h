/*
 * The start of a program's main(), the same for the daemons (ckv-kvstore, ckv-router,
 * ckv-worker; DESIGN.md "Configuration, logs, deployment") and the benchmarks: the command line
 * and the config file into the program's config table, --help and --dump-config, then (for the
 * daemons) logging from the log-level and log-file options.
 */
#ifndef CKV_MAIN_H
#define CKV_MAIN_H

#include <stddef.h>

#include "ckv_config.h"

/* Checks a loaded config beyond the table's bounds: 0 or an error with a message in err. */
typedef int (*ckv_main_check_fn)(const void *cfg, char *err, size_t errlen);

/* What a program's command line is. */
struct ckv_main_spec {
    const char *prog;                   /* for messages: "ckv-router", "ckv run" */
    const char *usage;                  /* the lines --help prints before the options */
    const struct ckv_config_opt *table; /* the options */
    ckv_main_check_fn check;            /* may be NULL */
    const char *const *flags;   /* NULL-terminated bare flags taken out of argv (may be NULL) */
    const char *const *aliases; /* NULL-terminated pairs: short name, its long name ("-p",
                                   "--prompt"); may be NULL */
};

/* Parses argv (argv[0] the program): --help / -h prints the usage and the table's options;
 * --dump-config prints the effective config after loading; flag i of spec->flags sets bit i
 * of *flags_set (may be NULL when there are none); short aliases become their long names;
 * everything else goes to ckv_config_load() into cfg, then spec->check.
 * Returns 0 to go on, 1 when main is done (usage or config printed: exit 0), 2 on an error,
 * printed to stderr as "prog: message". */
int ckv_main_config(const struct ckv_main_spec *spec, void *cfg, unsigned *flags_set, int argc,
                    char **argv);

/* Logging for a daemon: level by name (debug, info, warn, error, off), appended to the file
 * log_file (mode 0600) unless it is empty (stderr). Returns 0, or 2 with the error printed. */
int ckv_main_log(const char *prog, const char *level, const char *log_file);

#endif
