/*
 * Suite "stats": histograms and the key:value / Prometheus renderings.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "ckv_stats.h"

Test(stats, histogram_quantiles)
{
    struct ckv_hist h = {0};
    cr_assert_eq(ckv_hist_quantile(&h, 0.5), 0.0);
    for (uint64_t v = 1; v <= 1000; v++)
        ckv_hist_record(&h, v);
    cr_assert_eq(h.count, 1000);
    cr_assert_eq(h.sum, 500500);
    cr_assert_eq(h.max, 1000);
    /* log2 buckets: the estimate is within a factor of 2 of the true quantile */
    double p50 = ckv_hist_quantile(&h, 0.5), p99 = ckv_hist_quantile(&h, 0.99);
    cr_assert(p50 >= 250 && p50 <= 1000, "p50 %f", p50);
    cr_assert(p99 >= 495 && p99 <= 1001, "p99 %f", p99);
    cr_assert(p99 >= p50);
    struct ckv_hist z = {0};
    ckv_hist_record(&z, 0);
    ckv_hist_merge(&z, &h);
    cr_assert_eq(z.count, 1001);
    cr_assert_eq(z.buckets[0], 1);
    /* huge values land in the last bucket, no overflow */
    ckv_hist_record(&z, UINT64_MAX);
    cr_assert_eq(z.buckets[CKV_HIST_BUCKETS - 1], 1);
}

Test(stats, key_value)
{
    struct ckv_buf out = {0};
    struct ckv_stats_writer w;
    ckv_stats_begin(&w, &out, false, "ckv_test");
    ckv_stats_section(&w, "memory");
    ckv_stats_gauge(&w, "blocks_used", "used", 12);
    ckv_stats_gauge(&w, "ratio", "r", 0.25);
    ckv_stats_section(&w, "stats");
    ckv_stats_counter(&w, "fetches", "f", 3);
    ckv_stats_text(&w, "model", "m", "a\nb");
    cr_assert_str_eq(out.data, "# Memory\nblocks_used:12\nratio:0.25\n\n# Stats\nfetches:3\n"
                               "model:a b\n");
    ckv_buf_free(&out);
}

Test(stats, prometheus)
{
    struct ckv_buf out = {0};
    struct ckv_stats_writer w;
    ckv_stats_begin(&w, &out, true, "ckv_kvstore");
    ckv_stats_section(&w, "memory");
    ckv_stats_counter(&w, "fetches", "fetch requests", 3);
    ckv_stats_counter(&w, "bytes_total", "bytes", 5);
    w.labels = "store=\"s1\"";
    ckv_stats_gauge(&w, "blocks_used", "blocks in use", 7);
    ckv_stats_text(&w, "version", "build", "0.1 \"x\"");
    struct ckv_hist h = {0};
    ckv_hist_record(&h, 0);
    ckv_hist_record(&h, 3);
    ckv_hist_record(&h, 3);
    ckv_stats_hist(&w, "io_latency_us", "latency", &h);
    const char *s = out.data;
    cr_assert(strstr(s, "# TYPE ckv_kvstore_fetches_total counter\nckv_kvstore_fetches_total 3\n"),
              "%s", s);
    cr_assert(strstr(s, "ckv_kvstore_bytes_total 5\n"), "no double _total: %s", s);
    cr_assert(strstr(s, "# TYPE ckv_kvstore_blocks_used gauge\n"
                        "ckv_kvstore_blocks_used{store=\"s1\"} 7\n"), "%s", s);
    cr_assert(strstr(s, "ckv_kvstore_version_info{store=\"s1\",value=\"0.1 \\\"x\\\"\"} 1\n"), "%s",
              s);
    cr_assert(strstr(s, "ckv_kvstore_io_latency_us_bucket{store=\"s1\",le=\"0\"} 1\n"), "%s", s);
    cr_assert(strstr(s, "ckv_kvstore_io_latency_us_bucket{store=\"s1\",le=\"3\"} 3\n"), "%s", s);
    cr_assert(strstr(s, "ckv_kvstore_io_latency_us_bucket{store=\"s1\",le=\"+Inf\"} 3\n"), "%s", s);
    cr_assert(strstr(s, "ckv_kvstore_io_latency_us_sum{store=\"s1\"} 6\n"), "%s", s);
    cr_assert(strstr(s, "ckv_kvstore_io_latency_us_count{store=\"s1\"} 3\n"), "%s", s);
    cr_assert_null(strstr(s, "# Memory"), "sections are not Prometheus");
    ckv_buf_free(&out);
}
