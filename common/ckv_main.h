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

/* Parses argv (argv[0] the program): --help / -h prints `usage` (the lines before the options)
 * and the table's options; --dump-config prints the effective config after loading; a flag
 * named in extra_flags (NULL-terminated, may be NULL) sets bit i of *extra_set and is taken
 * out; everything else goes to ckv_config_load() into cfg, then check (may be NULL).
 * Returns 0 to go on, 1 when main is done (usage or config printed: exit 0), 2 on an error,
 * printed to stderr as "prog: message". */
int ckv_main_config(const char *prog, const char *usage, const struct ckv_config_opt *table,
                    void *cfg, ckv_main_check_fn check, const char *const *extra_flags,
                    unsigned *extra_set, int argc, char **argv);

/* Logging for a daemon: level by name (debug, info, warn, error, off), appended to the file
 * log_file (mode 0600) unless it is empty (stderr). Returns 0, or 2 with the error printed. */
int ckv_main_log(const char *prog, const char *level, const char *log_file);

#endif
