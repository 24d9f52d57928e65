/*
 * Configuration tables, files and command-line overrides (see ckv_config.h for the format).
 */
#include "ckv_config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckv_error.h"
#include "ckv_log.h"

/* Config files are small; anything bigger is a mistake (a binary passed by accident). */
#define CONFIG_FILE_MAX_BYTES (1u << 20)
#define CONFIG_VALUE_MAX      4096

const struct ckv_config_opt *ckv_config_find(const struct ckv_config_opt *table, const char *name)
{
    for (const struct ckv_config_opt *o = table; o->name; o++)
        if (strcmp(o->name, name) == 0)
            return o;
    return NULL;
}

int ckv_config_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s)
        return -EINVAL;
    const char *p = s;
    if (*p == '-' || *p == '+' || isspace((unsigned char)*p))
        return -EINVAL;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(p, &end, 10);
    if (end == p)
        return -EINVAL;
    if (errno == ERANGE)
        return -ERANGE;
    unsigned shift = 0;
    if (*end) {
        char c = (char)tolower((unsigned char)*end);
        switch (c) {
        case 'k': shift = 10; break;
        case 'm': shift = 20; break;
        case 'g': shift = 30; break;
        case 't': shift = 40; break;
        case 'b':
            shift = 0;
            end--;
            break; /* plain "b" suffix: bytes */
        default: return -EINVAL;
        }
        end++;
        /* accept "k", "kb", "kib" (and "b" alone) */
        if (*end && (strcasecmp(end, "b") == 0 || strcasecmp(end, "ib") == 0))
            end += strlen(end);
        if (*end)
            return -EINVAL;
    }
    if (shift && v > (UINT64_MAX >> shift))
        return -ERANGE;
    *out = (uint64_t)v << shift;
    return 0;
}

static int parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"yes", "true", "on", "1"};
    static const char *const no[] = {"no", "false", "off", "0"};
    for (size_t i = 0; i < CKV_ARRAY_LEN(yes); i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}

/* Parses value for option o into cfg; cfg untouched on error. */
static int opt_set(const struct ckv_config_opt *o, void *cfg, const char *value, char *err,
                   size_t errlen)
{
    char *field = (char *)cfg + o->offset;
    switch (o->type) {
    case CKV_CFG_BOOL: {
        bool b;
        if (parse_bool(value, &b)) {
            ckv_errorf(0, err, errlen, "option '%s': '%s' is not yes/no", o->name, value);
            return CKV_ECONFIG;
        }
        ASSERT(o->size == sizeof(bool));
        *(bool *)field = b;
        return 0;
    }
    case CKV_CFG_INT: {
        errno = 0;
        char *end;
        long long v = strtoll(value, &end, 10);
        if (end == value || *end || errno == ERANGE) {
            ckv_errorf(0, err, errlen, "option '%s': '%s' is not an integer", o->name, value);
            return CKV_ECONFIG;
        }
        if ((double)v < o->min || (double)v > o->max) {
            ckv_errorf(0, err, errlen, "option '%s': %lld is outside [%.0f, %.0f]", o->name, v,
                       o->min, o->max);
            return CKV_ECONFIG;
        }
        ASSERT(o->size == sizeof(int));
        *(int *)field = (int)v;
        return 0;
    }
    case CKV_CFG_SIZE: {
        uint64_t v;
        if (ckv_config_parse_size(value, &v)) {
            ckv_errorf(0, err, errlen, "option '%s': '%s' is not a size (e.g. 4096, 64m, 1g)",
                       o->name, value);
            return CKV_ECONFIG;
        }
        if ((double)v < o->min || (double)v > o->max) {
            ckv_errorf(0, err, errlen, "option '%s': %llu is outside [%.0f, %.0f]", o->name,
                       (unsigned long long)v, o->min, o->max);
            return CKV_ECONFIG;
        }
        ASSERT(o->size == sizeof(uint64_t));
        *(uint64_t *)field = v;
        return 0;
    }
    case CKV_CFG_DOUBLE: {
        errno = 0;
        char *end;
        double v = strtod(value, &end);
        if (end == value || *end || errno == ERANGE || !isfinite(v)) {
            ckv_errorf(0, err, errlen, "option '%s': '%s' is not a number", o->name, value);
            return CKV_ECONFIG;
        }
        if (v < o->min || v > o->max) {
            ckv_errorf(0, err, errlen, "option '%s': %g is outside [%g, %g]", o->name, v, o->min,
                       o->max);
            return CKV_ECONFIG;
        }
        ASSERT(o->size == sizeof(double));
        *(double *)field = v;
        return 0;
    }
    case CKV_CFG_STRING: {
        size_t n = strlen(value);
        if (n >= o->size) {
            ckv_errorf(0, err, errlen, "option '%s': value is %zu bytes, at most %zu allowed",
                       o->name, n, o->size - 1);
            return CKV_ECONFIG;
        }
        memcpy(field, value, n + 1);
        return 0;
    }
    case CKV_CFG_ENUM: {
        ASSERT(o->choices);
        for (int i = 0; o->choices[i]; i++) {
            if (strcasecmp(value, o->choices[i]) == 0) {
                ASSERT(o->size == sizeof(int));
                *(int *)field = i;
                return 0;
            }
        }
        char list[256] = "";
        size_t off = 0;
        for (int i = 0; o->choices[i] && off < sizeof(list); i++)
            off += (size_t)snprintf(list + off, sizeof(list) - off, "%s%s", i ? ", " : "",
                                    o->choices[i]);
        ckv_errorf(0, err, errlen, "option '%s': '%s' is not one of: %s", o->name, value, list);
        return CKV_ECONFIG;
    }
    }
    ASSERT(!"unknown option type");
    return CKV_ECONFIG;
}

int ckv_config_set(const struct ckv_config_opt *table, void *cfg, const char *name,
                   const char *value, char *err, size_t errlen)
{
    const struct ckv_config_opt *o = ckv_config_find(table, name);
    if (!o) {
        ckv_errorf(0, err, errlen, "unknown option '%s'", name);
        return CKV_ECONFIG;
    }
    return opt_set(o, cfg, value, err, errlen);
}

int ckv_config_defaults(const struct ckv_config_opt *table, void *cfg, char *err, size_t errlen)
{
    for (const struct ckv_config_opt *o = table; o->name; o++) {
        int rc = opt_set(o, cfg, o->def ? o->def : "", err, errlen);
        if (rc)
            return rc;
    }
    return 0;
}

/* Splits one line into name and value. Returns 1 when the line holds an option, 0 when it is
 * blank or a comment, CKV_ECONFIG on a syntax error (message in err). */
static int split_line(const char *line, size_t len, char *name, size_t name_cap, char *value,
                      size_t value_cap, char *err, size_t errlen)
{
    size_t i = 0;
    while (i < len && isspace((unsigned char)line[i]))
        i++;
    if (i == len || line[i] == '#')
        return 0;
    size_t n = 0;
    while (i < len && !isspace((unsigned char)line[i])) {
        if (n + 1 >= name_cap) {
            ckv_errorf(0, err, errlen, "option name too long");
            return CKV_ECONFIG;
        }
        name[n++] = line[i++];
    }
    name[n] = '\0';
    while (i < len && isspace((unsigned char)line[i]))
        i++;
    size_t v = 0;
    bool quoted = i < len && line[i] == '"';
    if (quoted) {
        i++;
        bool closed = false;
        while (i < len) {
            char c = line[i++];
            if (c == '"') {
                closed = true;
                break;
            }
            if (c == '\\' && i < len)
                c = line[i++];
            if (v + 1 >= value_cap) {
                ckv_errorf(0, err, errlen, "value of '%s' too long", name);
                return CKV_ECONFIG;
            }
            value[v++] = c;
        }
        if (!closed) {
            ckv_errorf(0, err, errlen, "unterminated quote in value of '%s'", name);
            return CKV_ECONFIG;
        }
        while (i < len && isspace((unsigned char)line[i]))
            i++;
        if (i < len && line[i] != '#') {
            ckv_errorf(0, err, errlen, "text after the quoted value of '%s'", name);
            return CKV_ECONFIG;
        }
    } else {
        size_t end = len;
        while (end > i && isspace((unsigned char)line[end - 1]))
            end--;
        for (; i < end; i++) {
            if (v + 1 >= value_cap) {
                ckv_errorf(0, err, errlen, "value of '%s' too long", name);
                return CKV_ECONFIG;
            }
            value[v++] = line[i];
        }
    }
    value[v] = '\0';
    if (v == 0 && !quoted) {
        ckv_errorf(0, err, errlen, "option '%s' has no value", name);
        return CKV_ECONFIG;
    }
    return 1;
}

int ckv_config_load_text(const struct ckv_config_opt *table, void *cfg, const char *text,
                         size_t len, const char *origin, char *err, size_t errlen)
{
    char name[128];
    char *value = malloc(CONFIG_VALUE_MAX);
    if (!value)
        return -ENOMEM;
    char msg[512];
    int rc = 0;
    size_t pos = 0;
    for (int lineno = 1; pos < len; lineno++) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t line_len = nl ? (size_t)(nl - (text + pos)) : len - pos;
        const char *line = text + pos;
        pos += line_len + (nl ? 1 : 0);
        if (memchr(line, '\0', line_len)) {
            ckv_errorf(0, err, errlen, "%s:%d: NUL byte in config text", origin, lineno);
            rc = CKV_ECONFIG;
            break;
        }
        int s = split_line(line, line_len, name, sizeof(name), value, CONFIG_VALUE_MAX, msg,
                           sizeof(msg));
        if (s == 0)
            continue;
        if (s < 0 || (s = ckv_config_set(table, cfg, name, value, msg, sizeof(msg))) != 0) {
            ckv_errorf(0, err, errlen, "%s:%d: %s", origin, lineno, msg);
            rc = CKV_ECONFIG;
            break;
        }
    }
    free(value);
    return rc;
}

int ckv_config_load_file(const struct ckv_config_opt *table, void *cfg, const char *path, char *err,
                         size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        ckv_errorf(0, err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        ckv_errorf(0, err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        ckv_errorf(0, err, errlen, "%s: not a regular file", path);
        return CKV_ECONFIG;
    }
    if ((uint64_t)st.st_size > CONFIG_FILE_MAX_BYTES) {
        close(fd);
        ckv_errorf(0, err, errlen, "%s: %lld bytes, config files are at most %u", path,
                   (long long)st.st_size, CONFIG_FILE_MAX_BYTES);
        return CKV_ECONFIG;
    }
    size_t len = (size_t)st.st_size;
    char *text = malloc(len + 1);
    if (!text) {
        close(fd);
        return -ENOMEM;
    }
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, text + got, len - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    int rc = ckv_config_load_text(table, cfg, text, got, path, err, errlen);
    free(text);
    return rc;
}

int ckv_config_load(const struct ckv_config_opt *table, void *cfg, int argc, char **argv,
                    char **positional, int max_positional, int *n_positional, char *err,
                    size_t errlen)
{
    int rc = ckv_config_defaults(table, cfg, err, errlen);
    if (rc)
        return rc;
    if (n_positional)
        *n_positional = 0;

    /* The config file first, wherever it appears, so that flags override it. */
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *path = NULL;
        if (strcmp(a, "--") == 0)
            break;
        if (strcmp(a, "--config") == 0 || strcmp(a, "-c") == 0) {
            if (i + 1 >= argc) {
                ckv_errorf(0, err, errlen, "%s needs a file name", a);
                return CKV_ECONFIG;
            }
            path = argv[++i];
        } else if (strncmp(a, "--config=", 9) == 0) {
            path = a + 9;
        }
        if (path && (rc = ckv_config_load_file(table, cfg, path, err, errlen)) != 0)
            return rc;
    }

    bool only_positional = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!only_positional && strcmp(a, "--") == 0) {
            only_positional = true;
            continue;
        }
        if (!only_positional && (strcmp(a, "--config") == 0 || strcmp(a, "-c") == 0)) {
            i++;
            continue;
        }
        if (!only_positional && strncmp(a, "--config=", 9) == 0)
            continue;
        if (only_positional || strncmp(a, "--", 2) != 0) {
            if (!positional || !n_positional || *n_positional >= max_positional) {
                ckv_errorf(0, err, errlen, "unexpected argument '%s'", a);
                return CKV_ECONFIG;
            }
            positional[(*n_positional)++] = argv[i];
            continue;
        }
        char name[128];
        const char *eq = strchr(a + 2, '=');
        size_t nlen = eq ? (size_t)(eq - (a + 2)) : strlen(a + 2);
        if (nlen == 0 || nlen >= sizeof(name)) {
            ckv_errorf(0, err, errlen, "bad option '%s'", a);
            return CKV_ECONFIG;
        }
        memcpy(name, a + 2, nlen);
        name[nlen] = '\0';
        const struct ckv_config_opt *o = ckv_config_find(table, name);
        if (!o) {
            ckv_errorf(0, err, errlen, "unknown option '--%s' (see --help)", name);
            return CKV_ECONFIG;
        }
        const char *value;
        if (eq) {
            value = eq + 1;
        } else if (o->type == CKV_CFG_BOOL &&
                   (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0 ||
                    parse_bool(argv[i + 1], &(bool){0}) != 0)) {
            value = "yes"; /* bare --flag */
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            ckv_errorf(0, err, errlen, "option '--%s' needs a value", name);
            return CKV_ECONFIG;
        }
        if ((rc = opt_set(o, cfg, value, err, errlen)) != 0)
            return rc;
    }
    return 0;
}

/* Formats an option's current value as loadable text. */
static void opt_format(const struct ckv_config_opt *o, const void *cfg, struct ckv_buf *out)
{
    const char *field = (const char *)cfg + o->offset;
    switch (o->type) {
    case CKV_CFG_BOOL: ckv_buf_printf(out, "%s", *(const bool *)field ? "yes" : "no"); break;
    case CKV_CFG_INT: ckv_buf_printf(out, "%d", *(const int *)field); break;
    case CKV_CFG_SIZE: {
        uint64_t v = *(const uint64_t *)field;
        static const char suffix[] = "tgmk";
        for (int i = 0; i < 4; i++) {
            unsigned shift = 40u - 10u * (unsigned)i;
            if (v && (v & ((1ull << shift) - 1)) == 0) {
                ckv_buf_printf(out, "%llu%c", (unsigned long long)(v >> shift), suffix[i]);
                return;
            }
        }
        ckv_buf_printf(out, "%llu", (unsigned long long)v);
        break;
    }
    case CKV_CFG_DOUBLE: ckv_buf_printf(out, "%.17g", *(const double *)field); break;
    case CKV_CFG_ENUM: ckv_buf_printf(out, "%s", o->choices[*(const int *)field]); break;
    case CKV_CFG_STRING: {
        ckv_buf_append(out, "\"", 1);
        for (const char *p = field; *p; p++) {
            if (*p == '"' || *p == '\\')
                ckv_buf_append(out, "\\", 1);
            ckv_buf_append(out, p, 1);
        }
        ckv_buf_append(out, "\"", 1);
        break;
    }
    }
}

void ckv_config_dump(const struct ckv_config_opt *table, const void *cfg, struct ckv_buf *out)
{
    for (const struct ckv_config_opt *o = table; o->name; o++) {
        ckv_buf_printf(out, "%s ", o->name);
        opt_format(o, cfg, out);
        ckv_buf_append(out, "\n", 1);
    }
}

void ckv_config_log(const struct ckv_config_opt *table, const void *cfg)
{
    struct ckv_buf b = {0};
    for (const struct ckv_config_opt *o = table; o->name; o++) {
        ckv_buf_reset(&b);
        opt_format(o, cfg, &b);
        LOG_INFO("config %s %s", o->name, b.data ? b.data : "");
    }
    ckv_buf_free(&b);
}

static const char *type_name(enum ckv_config_type t)
{
    switch (t) {
    case CKV_CFG_BOOL: return "yes|no";
    case CKV_CFG_INT: return "int";
    case CKV_CFG_SIZE: return "size";
    case CKV_CFG_DOUBLE: return "number";
    case CKV_CFG_STRING: return "text";
    case CKV_CFG_ENUM: return "choice";
    }
    return "?";
}

void ckv_config_usage(const struct ckv_config_opt *table, struct ckv_buf *out)
{
    for (const struct ckv_config_opt *o = table; o->name; o++) {
        ckv_buf_printf(out, "  --%-24s %s\n", o->name, o->help ? o->help : "");
        ckv_buf_printf(out, "  %-26s %s, default %s", "", type_name(o->type),
                       o->def && *o->def ? o->def : "(empty)");
        if (o->type == CKV_CFG_INT || o->type == CKV_CFG_SIZE || o->type == CKV_CFG_DOUBLE)
            ckv_buf_printf(out, ", range [%g, %g]", o->min, o->max);
        if (o->type == CKV_CFG_ENUM) {
            ckv_buf_printf(out, ", one of:");
            for (int i = 0; o->choices[i]; i++)
                ckv_buf_printf(out, " %s", o->choices[i]);
        }
        ckv_buf_append(out, "\n", 1);
    }
}
