/*
 * Stats rendering: one stats struct per process (STYLE.md rule 14), rendered either as
 * redis-INFO-style `key:value` sections or as Prometheus text format (0.0.4).
 *
 *   struct ckv_buf out = {0};
 *   struct ckv_stats_writer w;
 *   ckv_stats_begin(&w, &out, prometheus, "ckv_kvstore");
 *   ckv_stats_section(&w, "memory");
 *   ckv_stats_gauge(&w, "blocks_used", "blocks of the pool in use", used);
 *   ckv_stats_counter(&w, "fetches", "fetch requests served", st->fetches);
 *   ckv_stats_hist(&w, "io_latency_us", "io_uring completion latency", &st->io_hist);
 *
 * key:value form:   "# Memory\nblocks_used:12\nfetches:3\nio_latency_us_p50:..."
 * Prometheus form:  "# HELP ckv_kvstore_blocks_used ...\n# TYPE ... gauge\n..." with counters
 *                   suffixed _total and histograms as _bucket{le=..}/_sum/_count.
 */
#ifndef CKV_STATS_H
#define CKV_STATS_H

#include <stdbool.h>
#include <stdint.h>

#include "ckv_buf.h"

/* Log2 histogram of non-negative integer values (microseconds, bytes...). Bucket 0 holds
 * value 0, bucket i (i >= 1) holds [2^(i-1), 2^i). Caller-owned; zero it to start. */
#define CKV_HIST_BUCKETS 40
struct ckv_hist {
    uint64_t buckets[CKV_HIST_BUCKETS];
    uint64_t count;
    uint64_t sum;
    uint64_t max;
};

void ckv_hist_record(struct ckv_hist *h, uint64_t value);

/* The q-quantile (0 <= q <= 1), interpolated inside its bucket; 0 when empty. */
double ckv_hist_quantile(const struct ckv_hist *h, double q);

/* Adds src into dst. */
void ckv_hist_merge(struct ckv_hist *dst, const struct ckv_hist *src);

struct ckv_stats_writer {
    struct ckv_buf *out; /* not owned */
    bool prometheus;
    const char *prefix; /* Prometheus metric prefix, e.g. "ckv_kvstore"; not owned */
    const char *labels; /* optional Prometheus labels without braces, e.g. "worker=\"w1\"" */
    int sections;       /* sections opened so far */
};

/* Starts rendering into out (appended to). prefix and labels must outlive the writer. */
void ckv_stats_begin(struct ckv_stats_writer *w, struct ckv_buf *out, bool prometheus,
                     const char *prefix);

/* Opens a `# Name` section (key:value form only; Prometheus ignores sections). */
void ckv_stats_section(struct ckv_stats_writer *w, const char *name);

/* A monotonically increasing count. */
void ckv_stats_counter(struct ckv_stats_writer *w, const char *name, const char *help, uint64_t v);

/* A value that goes up and down. */
void ckv_stats_gauge(struct ckv_stats_writer *w, const char *name, const char *help, double v);

/* A text value (version, model name): key:value only; Prometheus gets `<name>_info{value=..} 1`. */
void ckv_stats_text(struct ckv_stats_writer *w, const char *name, const char *help,
                    const char *value);

/* A histogram: key:value gets count, p50, p90, p99, max; Prometheus a histogram family. */
void ckv_stats_hist(struct ckv_stats_writer *w, const char *name, const char *help,
                    const struct ckv_hist *h);

#endif
