/*
 * Stats rendering in key:value and Prometheus text format (see ckv_stats.h).
 */
#include "ckv_stats.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ckv_error.h"

static int bucket_of(uint64_t v)
{
    if (v == 0)
        return 0;
    int b = 64 - __builtin_clzll(v); /* v in [2^(b-1), 2^b) */
    return b >= CKV_HIST_BUCKETS ? CKV_HIST_BUCKETS - 1 : b;
}

/* Inclusive lower and exclusive upper bound of bucket i. */
static double bucket_lo(int i)
{
    return i == 0 ? 0.0 : ldexp(1.0, i - 1);
}

static double bucket_hi(int i)
{
    return i == 0 ? 1.0 : ldexp(1.0, i);
}

void ckv_hist_record(struct ckv_hist *h, uint64_t value)
{
    h->buckets[bucket_of(value)]++;
    h->count++;
    h->sum += value;
    if (value > h->max)
        h->max = value;
}

double ckv_hist_quantile(const struct ckv_hist *h, double q)
{
    if (h->count == 0)
        return 0.0;
    if (q < 0)
        q = 0;
    if (q > 1)
        q = 1;
    double rank = q * (double)h->count;
    uint64_t seen = 0;
    for (int i = 0; i < CKV_HIST_BUCKETS; i++) {
        uint64_t c = h->buckets[i];
        if (c && (double)(seen + c) >= rank) {
            double frac = c ? (rank - (double)seen) / (double)c : 0.0;
            double lo = bucket_lo(i), hi = bucket_hi(i);
            if (hi > (double)h->max + 1.0)
                hi = (double)h->max + 1.0; /* the top bucket ends at the largest value seen */
            if (hi < lo)
                hi = lo;
            return lo + frac * (hi - lo);
        }
        seen += c;
    }
    return (double)h->max;
}

void ckv_hist_merge(struct ckv_hist *dst, const struct ckv_hist *src)
{
    for (int i = 0; i < CKV_HIST_BUCKETS; i++)
        dst->buckets[i] += src->buckets[i];
    dst->count += src->count;
    dst->sum += src->sum;
    if (src->max > dst->max)
        dst->max = src->max;
}

void ckv_stats_begin(struct ckv_stats_writer *w, struct ckv_buf *out, bool prometheus,
                     const char *prefix)
{
    memset(w, 0, sizeof(*w));
    w->out = out;
    w->prometheus = prometheus;
    w->prefix = prefix ? prefix : "ckv";
}

void ckv_stats_section(struct ckv_stats_writer *w, const char *name)
{
    if (w->prometheus)
        return;
    if (w->sections++)
        ckv_buf_append(w->out, "\n", 1);
    char title[64];
    snprintf(title, sizeof(title), "%s", name);
    title[0] = (char)toupper((unsigned char)title[0]);
    ckv_buf_printf(w->out, "# %s\n", title);
}

static void prom_meta(struct ckv_stats_writer *w, const char *name, const char *suffix,
                      const char *help, const char *type)
{
    ckv_buf_printf(w->out, "# HELP %s_%s%s %s\n# TYPE %s_%s%s %s\n", w->prefix, name, suffix,
                   help ? help : name, w->prefix, name, suffix, type);
}

/* "{labels}" or "" */
static void prom_labels(struct ckv_stats_writer *w, const char *extra)
{
    bool have = w->labels && *w->labels;
    if (!have && !extra)
        return;
    ckv_buf_printf(w->out, "{%s%s%s}", have ? w->labels : "", have && extra ? "," : "",
                   extra ? extra : "");
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

void ckv_stats_counter(struct ckv_stats_writer *w, const char *name, const char *help, uint64_t v)
{
    if (!w->prometheus) {
        ckv_buf_printf(w->out, "%s:%llu\n", name, (unsigned long long)v);
        return;
    }
    const char *suffix = ends_with(name, "_total") ? "" : "_total";
    prom_meta(w, name, suffix, help, "counter");
    ckv_buf_printf(w->out, "%s_%s%s", w->prefix, name, suffix);
    prom_labels(w, NULL);
    ckv_buf_printf(w->out, " %llu\n", (unsigned long long)v);
}

static void print_number(struct ckv_buf *out, double v)
{
    if (v == floor(v) && fabs(v) < 9e15)
        ckv_buf_printf(out, "%.0f", v);
    else
        ckv_buf_printf(out, "%.6g", v);
}

void ckv_stats_gauge(struct ckv_stats_writer *w, const char *name, const char *help, double v)
{
    if (!w->prometheus) {
        ckv_buf_printf(w->out, "%s:", name);
        print_number(w->out, v);
        ckv_buf_append(w->out, "\n", 1);
        return;
    }
    prom_meta(w, name, "", help, "gauge");
    ckv_buf_printf(w->out, "%s_%s", w->prefix, name);
    prom_labels(w, NULL);
    ckv_buf_append(w->out, " ", 1);
    print_number(w->out, v);
    ckv_buf_append(w->out, "\n", 1);
}

void ckv_stats_text(struct ckv_stats_writer *w, const char *name, const char *help,
                    const char *value)
{
    if (!w->prometheus) {
        /* key:value lines cannot hold newlines; replace them */
        ckv_buf_printf(w->out, "%s:", name);
        for (const char *p = value; p && *p; p++)
            ckv_buf_append(w->out, (*p == '\n' || *p == '\r') ? " " : p, 1);
        ckv_buf_append(w->out, "\n", 1);
        return;
    }
    prom_meta(w, name, "_info", help, "gauge");
    struct ckv_buf label = {0};
    ckv_buf_printf(&label, "value=\"");
    for (const char *p = value; p && *p; p++) {
        if (*p == '\\' || *p == '"')
            ckv_buf_append(&label, "\\", 1);
        if (*p == '\n')
            ckv_buf_append(&label, "\\n", 2);
        else
            ckv_buf_append(&label, p, 1);
    }
    ckv_buf_append(&label, "\"", 1);
    ckv_buf_printf(w->out, "%s_%s_info", w->prefix, name);
    prom_labels(w, label.data);
    ckv_buf_printf(w->out, " 1\n");
    ckv_buf_free(&label);
}

void ckv_stats_hist(struct ckv_stats_writer *w, const char *name, const char *help,
                    const struct ckv_hist *h)
{
    if (!w->prometheus) {
        ckv_buf_printf(w->out, "%s_count:%llu\n", name, (unsigned long long)h->count);
        ckv_buf_printf(w->out, "%s_p50:%.1f\n%s_p90:%.1f\n%s_p99:%.1f\n%s_max:%llu\n", name,
                       ckv_hist_quantile(h, 0.5), name, ckv_hist_quantile(h, 0.9), name,
                       ckv_hist_quantile(h, 0.99), name, (unsigned long long)h->max);
        return;
    }
    prom_meta(w, name, "", help, "histogram");
    int last = 0;
    for (int i = 0; i < CKV_HIST_BUCKETS; i++)
        if (h->buckets[i])
            last = i;
    uint64_t cum = 0;
    char le[48];
    for (int i = 0; i <= last; i++) {
        cum += h->buckets[i];
        /* values are integers: bucket i holds v < 2^i, i.e. v <= 2^i - 1 */
        snprintf(le, sizeof(le), "le=\"%.0f\"", bucket_hi(i) - 1.0);
        ckv_buf_printf(w->out, "%s_%s_bucket", w->prefix, name);
        prom_labels(w, le);
        ckv_buf_printf(w->out, " %llu\n", (unsigned long long)cum);
    }
    ckv_buf_printf(w->out, "%s_%s_bucket", w->prefix, name);
    prom_labels(w, "le=\"+Inf\"");
    ckv_buf_printf(w->out, " %llu\n%s_%s_sum", (unsigned long long)h->count, w->prefix, name);
    prom_labels(w, NULL);
    ckv_buf_printf(w->out, " %llu\n%s_%s_count", (unsigned long long)h->sum, w->prefix, name);
    prom_labels(w, NULL);
    ckv_buf_printf(w->out, " %llu\n", (unsigned long long)h->count);
}
