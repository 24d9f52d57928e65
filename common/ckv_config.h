/*
 * Configuration: one table per process (STYLE.md rule 13), a config file, command-line
 * overrides, bounds checks, and a dump of the effective config.
 *
 * A process describes its options once:
 *
 *   struct kvs_config { uint64_t segment_bytes; int lease_ms; char run_dir[256]; };
 *   static const struct ckv_config_opt kvs_options[] = {
 *       CKV_OPT_SIZE(struct kvs_config, segment_bytes, "segment-size", "1g", 1 << 20, 1ull << 40,
 *                    "bytes of the shared-memory block pool"),
 *       CKV_OPT_INT(struct kvs_config, lease_ms, "lease-ms", "5000", 10, 600000,
 *                   "read leases expire after this many milliseconds"),
 *       CKV_OPT_STRING(struct kvs_config, run_dir, "run-dir", "/tmp/ckv", "ipc endpoints"),
 *       CKV_OPT_END,
 *   };
 *
 * and loads it with ckv_config_load(): defaults, then the file named by `--config FILE`
 * (or `-c FILE`), then every `--name value` / `--name=value` override, in that order.
 *
 * File format (redis.conf style): one `name value` per line; `#` starts a comment line;
 * blank lines ignored; a value with spaces is written in double quotes ("a b", with \" and \\
 * escapes). Values: BOOL yes/no/true/false/on/off/1/0; INT decimal; SIZE an integer with an
 * optional k/m/g/t suffix (binary units: 1k = 1024; "kb", "kib", "mb", ... also accepted);
 * DOUBLE decimal; ENUM one of the listed names; STRING any text up to the field's size - 1.
 * Every error names the file, line and option.
 */
#ifndef CKV_CONFIG_H
#define CKV_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ckv_buf.h"

enum ckv_config_type {
    CKV_CFG_BOOL,   /* bool */
    CKV_CFG_INT,    /* int */
    CKV_CFG_SIZE,   /* uint64_t, bytes or counts, with k/m/g/t suffixes */
    CKV_CFG_DOUBLE, /* double */
    CKV_CFG_STRING, /* char[size] */
    CKV_CFG_ENUM,   /* int: index into choices */
};

struct ckv_config_opt {
    const char *name; /* as written in files and after "--" on the command line */
    enum ckv_config_type type;
    size_t offset;              /* offsetof(struct, field) */
    size_t size;                /* sizeof(field) */
    const char *def;            /* default value, as text */
    double min, max;            /* inclusive bounds for INT, SIZE, DOUBLE */
    const char *const *choices; /* ENUM: NULL-terminated names */
    const char *help;           /* one line */
};

#define CKV_OPT_(st, field, nm, ty, df, lo, hi, ch, hp)                                            \
    {                                                                                              \
        .name = (nm), .type = (ty), .offset = offsetof(st, field),                                 \
        .size = sizeof(((st *)0)->field), .def = (df), .min = (lo), .max = (hi), .choices = (ch),  \
        .help = (hp)                                                                               \
    }
#define CKV_OPT_BOOL(st, f, nm, df, hp) CKV_OPT_(st, f, nm, CKV_CFG_BOOL, df, 0, 1, NULL, hp)
#define CKV_OPT_INT(st, f, nm, df, lo, hi, hp) CKV_OPT_(st, f, nm, CKV_CFG_INT, df, lo, hi, NULL, hp)
#define CKV_OPT_SIZE(st, f, nm, df, lo, hi, hp)                                                    \
    CKV_OPT_(st, f, nm, CKV_CFG_SIZE, df, lo, hi, NULL, hp)
#define CKV_OPT_DOUBLE(st, f, nm, df, lo, hi, hp)                                                  \
    CKV_OPT_(st, f, nm, CKV_CFG_DOUBLE, df, lo, hi, NULL, hp)
#define CKV_OPT_STRING(st, f, nm, df, hp) CKV_OPT_(st, f, nm, CKV_CFG_STRING, df, 0, 0, NULL, hp)
#define CKV_OPT_ENUM(st, f, nm, df, ch, hp) CKV_OPT_(st, f, nm, CKV_CFG_ENUM, df, 0, 0, ch, hp)
#define CKV_OPT_END                                                                                \
    {                                                                                              \
        .name = NULL                                                                               \
    }

/* Sets every option of `table` in `cfg` to its default. Returns 0, or CKV_ECONFIG when a
 * default does not parse (a bug in the table; the message says which). */
int ckv_config_defaults(const struct ckv_config_opt *table, void *cfg, char *err, size_t errlen);

/* Sets one option from text. Returns 0, or CKV_ECONFIG with a message in err: unknown name,
 * bad value, out of bounds. cfg is unchanged on error. */
int ckv_config_set(const struct ckv_config_opt *table, void *cfg, const char *name,
                   const char *value, char *err, size_t errlen);

/* Applies a config file. Returns 0, -errno when the file cannot be read, or CKV_ECONFIG with
 * "path:line: message" in err. Options before the bad line stay applied. */
int ckv_config_load_file(const struct ckv_config_opt *table, void *cfg, const char *path,
                         char *err, size_t errlen);

/* Applies a config text held in memory (same format as a file; `origin` names it in errors). */
int ckv_config_load_text(const struct ckv_config_opt *table, void *cfg, const char *text,
                         size_t len, const char *origin, char *err, size_t errlen);

/* Defaults, then `--config FILE` / `-c FILE` if present, then every other `--name value` or
 * `--name=value` of argv[0..argc) (argv[0] is NOT skipped: pass argc-1, argv+1 for main's
 * arguments). A bare `--flag` sets a BOOL option to yes. Non-option arguments are collected in
 * positional[0..*n_positional) up to max_positional (pointers into argv); more is an error.
 * positional may be NULL when none are accepted. Returns 0 or a negative code with err set. */
int ckv_config_load(const struct ckv_config_opt *table, void *cfg, int argc, char **argv,
                    char **positional, int max_positional, int *n_positional, char *err,
                    size_t errlen);

/* Writes the effective config as a loadable config file: "name value" lines. */
void ckv_config_dump(const struct ckv_config_opt *table, const void *cfg, struct ckv_buf *out);

/* Logs the effective config, one INFO line per option. */
void ckv_config_log(const struct ckv_config_opt *table, const void *cfg);

/* Writes usage text: every option with its type, default, bounds and help. */
void ckv_config_usage(const struct ckv_config_opt *table, struct ckv_buf *out);

/* Looks an option up by name; NULL when unknown. */
const struct ckv_config_opt *ckv_config_find(const struct ckv_config_opt *table,
                                             const char *name);

/* Parses a SIZE value ("64m", "1g", "4096"). Returns 0 or -EINVAL / -ERANGE. */
int ckv_config_parse_size(const char *s, uint64_t *out);

#endif
