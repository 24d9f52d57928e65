/*
 * ckv-bench-kvstore: ckv-kvstore's fetch latency and its spill / restore throughput against
 * fio running the same I/O pattern on the same file system, in the same run.
 *
 *   build/bin/ckv-bench-kvstore [--quick] [--json FILE] [--dir DIR] [--head-dim 128]
 *                               [--io-depth 64] [--iters N] [--reps N]
 *
 * Fetch latency: a real ckv-kvstore (pinned to CPU 0) holds 32 resident clusters of 64 tokens;
 * the client (pinned to CPU 0 too, "same core", or to CPU 1, "split") fetches 1 or 32 of them
 * per request, folding the release of the previous lease into each fetch as a worker does
 * (one round trip per layer). Each sample is one kvs_client_fetch_release() call; a ping round
 * trip is the floor ZeroMQ sets.
 *
 * Spill: the segment is filled to 88% with clusters of 64 tokens, then one reservation as
 * large as that makes the store spill what it lacks, 76% of the segment, at once
 * (least-recently-fetched first, io_uring, io-depth block writes in flight; watermarks set
 * out of the way so that nothing else spills). The figure is the bytes spilled over the wall
 * time of that reserve call, which is answered when the last of them is written. Restore: the
 * reservation is aborted and every spilled cluster is fetched back, 32 clusters per request in
 * write order; the figure is the bytes restored over the wall time of the fetch loop. Both patterns
 * are sequential block-sized I/O over the spill file, at io-depth; fio runs exactly that (bs =
 * block size, iodepth = io-depth, ioengine io_uring, O_DIRECT when the store used it, same
 * directory, the same number of bytes, pinned to the store's CPU), and the ratios are ours
 * over fio's.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_shm.h"
#include "kvs_client.h"

struct opts {
    bool quick;
    char json[512];
    char dir[256];
    int head_dim;
    int io_depth;
    int iters;
    int reps;
    char store_bin[512];
};

static const struct ckv_config_opt bench_options[] = {
    CKV_OPT_BOOL(struct opts, quick, "quick", "no", "small sizes, under a minute"),
    CKV_OPT_STRING(struct opts, json, "json", "", "also write the results as JSON to this file"),
    CKV_OPT_STRING(struct opts, dir, "dir", "/var/tmp",
                   "where the run directory, spill file and fio file go (one file system)"),
    CKV_OPT_INT(struct opts, head_dim, "head-dim", "128", 8, 1024,
                "block geometry: 128 gives 8 KiB f16 blocks"),
    CKV_OPT_INT(struct opts, io_depth, "io-depth", "64", 32, 4096, "store and fio queue depth"),
    CKV_OPT_INT(struct opts, iters, "iters", "0", 0, 10000000,
                "fetches per latency case (0: 2000 quick, 20000 otherwise)"),
    CKV_OPT_INT(struct opts, reps, "reps", "0", 0, 16,
                "repetitions of the throughput runs, medians reported (0: 3 quick, 5 otherwise)"),
    CKV_OPT_STRING(struct opts, store_bin, "store", "",
                   "ckv-kvstore binary (default: next to this program)"),
    CKV_OPT_END,
};

static struct opts o;
static char run_dir[512], spill_path[600], log_path[600], endpoint[700], sock_path[600];
static char seg_name[64];
static pid_t store_pid = -1;

/* ---------------------------------------------------------------- processes ------------- */

static void pin_self(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        fprintf(stderr, "bench: sched_setaffinity(cpu %d): %s\n", cpu, strerror(errno));
}

/* Starts argv pinned to cpu (every thread it will make inherits the mask). */
static pid_t spawn_pinned(char *const argv[], int cpu, const char *out_path)
{
    pid_t pid = fork();
    if (pid == 0) {
        pin_self(cpu);
        int fd = open(out_path ? out_path : "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static void stop_store(void)
{
    if (store_pid <= 0)
        return;
    kill(store_pid, SIGTERM); /* orderly: the store removes its segment */
    int status;
    waitpid(store_pid, &status, 0);
    store_pid = -1;
}

static void on_signal(int sig)
{
    if (store_pid > 0)
        kill(store_pid, SIGTERM);
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Starts ckv-kvstore on CPU 0 with pool_mib of segment and spill_mib of spill file. With
 * demand_only, the watermarks are out of the way: the store spills only when a request needs
 * the room, so a spill can be timed by the request that caused it. */
static void start_store(uint64_t pool_mib, uint64_t spill_mib, bool demand_only)
{
    char pool[32], spill[32], hd[16], depth[16];
    snprintf(pool, sizeof(pool), "%llum", (unsigned long long)pool_mib);
    snprintf(spill, sizeof(spill), "%llum", (unsigned long long)spill_mib);
    snprintf(hd, sizeof(hd), "%d", o.head_dim);
    snprintf(depth, sizeof(depth), "%d", o.io_depth);
    /* clang-format off */
    char *argv[] = {o.store_bin, "--run-dir", run_dir, "--segment-name", seg_name,
                    "--segment-size", pool, "--head-dim", hd,
                    "--spill-file", spill_path, "--spill-size", spill, "--io-depth", depth,
                    "--log-file", log_path, "--mlock", getuid() == 0 ? "yes" : "no",
                    "--lease-ms", "60000", "--reserve-ms", "600000", "--io-wait-ms", "600000",
                    "--max-cluster-tokens", "65536",
                    "--high-watermark", demand_only ? "1.0" : "0.9",
                    "--low-watermark", demand_only ? "0.95" : "0.8", NULL};
    /* clang-format on */
    unlink(sock_path);
    store_pid = spawn_pinned(argv, 0, NULL);
    for (int i = 0; i < 30000 && access(sock_path, F_OK) != 0; i++) {
        int status;
        if (waitpid(store_pid, &status, WNOHANG) == store_pid) {
            fprintf(stderr, "bench: ckv-kvstore exited at start; see %s\n", log_path);
            exit(1);
        }
        usleep(1000);
    }
}

static kvs_client_t *connect_client(void)
{
    kvs_client_t *c = NULL;
    int rc = kvs_client_new(endpoint, "bench", 600000, &c);
    if (rc) {
        fprintf(stderr, "bench: connect %s: %s\n", endpoint, ckv_strerror(rc));
        stop_store();
        exit(1);
    }
    return c;
}

static void die_rc(kvs_client_t *c, const char *what, int rc)
{
    fprintf(stderr, "bench: %s: %s (%s)\n", what, ckv_strerror(rc), kvs_client_last_error(c));
    stop_store();
    exit(1);
}

static double stat_value(kvs_client_t *c, const char *name)
{
    struct ckv_buf b = {0};
    if (kvs_client_stats(c, false, &b) || !b.data)
        return -1;
    char needle[96];
    snprintf(needle, sizeof(needle), "\n%s:", name);
    const char *p = strstr(b.data, needle);
    double v = p ? strtod(p + strlen(needle), NULL) : -1;
    ckv_buf_free(&b);
    return v;
}

/* ---------------------------------------------------------------- latency --------------- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double quantile(double *v, int n, double q)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    int i = (int)ceil(q * n) - 1;
    return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

struct lat {
    double p50, p99;
};

static void fill_cluster(uint8_t *const *blocks, uint32_t n, uint32_t bytes, uint32_t seed)
{
    for (uint32_t j = 0; j < n; j++)
        memset(blocks[j], (int)((seed + j) & 0xff), bytes);
}

/* Fetch round trips of n clusters (of 32 stored), release folded in; and ping round trips. */
static struct lat measure_fetch(kvs_client_t *c, const struct kvs_key *keys, size_t n, int iters)
{
    double *t = malloc(sizeof(double) * (size_t)iters);
    uint64_t lease = 0;
    struct kvs_blocks b;
    for (int i = -iters / 10; i < iters; i++) { /* a tenth as warm-up */
        const struct kvs_key *k = keys + (n == 1 ? (size_t)((i + iters) % 32) : 0);
        uint64_t t0 = ckv_now_ns();
        int rc = kvs_client_fetch_release(c, k, n, lease, &b);
        uint64_t t1 = ckv_now_ns();
        if (rc)
            die_rc(c, "fetch", rc);
        lease = b.id;
        if (i >= 0)
            t[i] = (double)(t1 - t0) / 1000.0;
    }
    kvs_client_release(c, lease);
    struct lat l = {quantile(t, iters, 0.5), quantile(t, iters, 0.99)};
    free(t);
    return l;
}

/* The floor: round trips of a request the store answers at once without touching anything
 * (a release of a lease that does not exist). */
static struct lat measure_ping(kvs_client_t *c, int iters)
{
    double *t = malloc(sizeof(double) * (size_t)iters);
    for (int i = -iters / 10; i < iters; i++) {
        uint64_t t0 = ckv_now_ns();
        int rc = kvs_client_release(c, 1);
        uint64_t t1 = ckv_now_ns();
        if (rc != -ENOENT)
            die_rc(c, "release round trip", rc);
        if (i >= 0)
            t[i] = (double)(t1 - t0) / 1000.0;
    }
    struct lat l = {quantile(t, iters, 0.5), quantile(t, iters, 0.99)};
    free(t);
    return l;
}

/* ---------------------------------------------------------------- throughput ------------ */

struct tput {
    double spill_mbps, restore_mbps;           /* wall time */
    double spill_busy_mbps, restore_busy_mbps; /* time with I/O in flight */
    double bytes_spilled, bytes_restored;
    bool direct;
};

#define MIB (1024.0 * 1024.0)

/* One spill + restore run on a fresh store of pool_mib. */
static struct tput run_spill_restore(uint64_t pool_mib)
{
    struct tput r = {0};
    start_store(pool_mib, pool_mib * 2, true);
    pin_self(1);
    kvs_client_t *c = connect_client();
    const struct kvs_geometry *g = kvs_client_geometry(c);
    uint32_t bb = g->block_bytes;
    /* A: clusters of 64 tokens (4 blocks) up to 88% of the pool: below the high watermark */
    size_t per_cluster = 4;
    size_t n_a = (size_t)(0.88 * (double)g->n_blocks) / per_cluster;
    struct kvs_key *keys = calloc(n_a, sizeof(*keys));
    uint32_t *ntok = calloc(n_a, sizeof(*ntok));
    for (size_t i = 0; i < n_a; i++) {
        keys[i] = (struct kvs_key){.seq_uid = 1,
                                   .layer = (uint32_t)(i / 256),
                                   .kv_head = 0,
                                   .cluster_id = (uint32_t)(i % 256)};
        ntok[i] = 64;
    }
    struct kvs_blocks b;
    for (size_t i = 0; i < n_a; i += 256) {
        size_t n = n_a - i < 256 ? n_a - i : 256;
        int rc = kvs_client_reserve(c, keys + i, ntok + i, n, &b);
        if (rc)
            die_rc(c, "reserve A", rc);
        for (size_t k = 0; k < n; k++)
            fill_cluster(b.block + b.first[k], b.n_blocks[k], bb, (uint32_t)(i + k));
        if ((rc = kvs_client_commit(c, b.id, NULL)))
            die_rc(c, "commit A", rc);
    }
    if (stat_value(c, "spills") != 0)
        fprintf(stderr, "bench: note: the fill already spilled %g clusters\n",
                stat_value(c, "spills"));
    double sp0 = stat_value(c, "bytes_spilled"), busy0 = stat_value(c, "spill_busy_us");

    /* B: one reservation as large as A: the store spills A to make room, then answers */
    size_t b_clusters = (n_a * per_cluster + 63) / 64;
    struct kvs_key *bk = calloc(b_clusters, sizeof(*bk));
    uint32_t *bn = calloc(b_clusters, sizeof(*bn));
    for (size_t i = 0; i < b_clusters; i++) {
        bk[i] = (struct kvs_key){.seq_uid = 2, .cluster_id = (uint32_t)i};
        bn[i] = 64 * 16; /* 64 blocks */
    }
    uint64_t t0 = ckv_now_ns();
    int rc = kvs_client_reserve(c, bk, bn, b_clusters, &b);
    uint64_t t1 = ckv_now_ns();
    if (rc)
        die_rc(c, "reserve B", rc);
    r.bytes_spilled = stat_value(c, "bytes_spilled") - sp0;
    double busy = stat_value(c, "spill_busy_us") - busy0;
    r.spill_mbps = r.bytes_spilled / MIB / ((double)(t1 - t0) / 1e9);
    r.spill_busy_mbps = busy > 0 ? r.bytes_spilled / MIB / (busy / 1e6) : 0;
    r.direct = stat_value(c, "direct_io") == 1;

    if ((rc = kvs_client_abort(c, b.id)))
        die_rc(c, "abort B", rc);

    /* restore: fetch A back, 32 clusters per request, in write order */
    double re0 = stat_value(c, "bytes_restored"), rbusy0 = stat_value(c, "restore_busy_us");
    uint64_t lease = 0;
    t0 = ckv_now_ns();
    for (size_t i = 0; i + 32 <= n_a; i += 32) {
        if ((rc = kvs_client_fetch_release(c, keys + i, 32, lease, &b)))
            die_rc(c, "fetch A", rc);
        lease = b.id;
    }
    t1 = ckv_now_ns();
    kvs_client_release(c, lease);
    r.bytes_restored = stat_value(c, "bytes_restored") - re0;
    double rbusy = stat_value(c, "restore_busy_us") - rbusy0;
    r.restore_mbps = r.bytes_restored / MIB / ((double)(t1 - t0) / 1e9);
    r.restore_busy_mbps = rbusy > 0 ? r.bytes_restored / MIB / (rbusy / 1e6) : 0;
    if (stat_value(c, "restore_errors") != 0 || stat_value(c, "spill_errors") != 0) {
        fprintf(stderr, "bench: I/O errors; see %s\n", log_path);
        stop_store();
        exit(1);
    }
    kvs_client_destroy(&c);
    stop_store();
    free(keys);
    free(ntok);
    free(bk);
    free(bn);
    return r;
}

/* Runs fio with the pattern; returns MiB/s, or -1 when fio is missing or failed. */
static double run_fio(const char *rw, uint64_t bytes, uint32_t bs, bool direct)
{
    char file[700], out[700], size[32], bsz[32], depth[32], dir_flag[16];
    snprintf(file, sizeof(file), "%s/fio.dat", run_dir);
    snprintf(out, sizeof(out), "%s/fio-%s.json", run_dir, rw);
    snprintf(size, sizeof(size), "--size=%llu", (unsigned long long)(bytes / bs * bs));
    snprintf(bsz, sizeof(bsz), "--bs=%u", bs);
    snprintf(depth, sizeof(depth), "--iodepth=%d", o.io_depth);
    snprintf(dir_flag, sizeof(dir_flag), "--direct=%d", direct ? 1 : 0);
    char fname[720], oname[720];
    snprintf(fname, sizeof(fname), "--filename=%s", file);
    snprintf(oname, sizeof(oname), "--output=%s", out);
    char rwf[32];
    snprintf(rwf, sizeof(rwf), "--rw=%s", rw);
    /* clang-format off */
    char *argv[] = {"fio", "--name=kvs", fname, rwf, bsz, depth, dir_flag, size,
                    "--ioengine=io_uring", "--fallocate=native", "--output-format=json", oname,
                    NULL};
    /* clang-format on */
    pid_t pid = spawn_pinned(argv, 0, NULL);
    int status;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return -1;
    FILE *f = fopen(out, "r");
    if (!f)
        return -1;
    static char text[1 << 20];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[n] = '\0';
    const char *sec = strstr(text, strcmp(rw, "write") == 0 ? "\"write\" :" : "\"read\" :");
    const char *bw = sec ? strstr(sec, "\"bw_bytes\" :") : NULL;
    if (!bw)
        return -1;
    return strtod(bw + strlen("\"bw_bytes\" :"), NULL) / MIB;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---------------------------------------------------------------- main ------------------ */

static void json_num(FILE *f, const char *k, double v, bool last)
{
    if (isfinite(v))
        fprintf(f, "  \"%s\": %.3f%s\n", k, v, last ? "" : ",");
    else
        fprintf(f, "  \"%s\": null%s\n", k, last ? "" : ",");
}

int main(int argc, char **argv)
{
    char err[512];
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0) {
            struct ckv_buf u = {0};
            ckv_config_usage(bench_options, &u);
            printf("usage: ckv-bench-kvstore [options]\n%s", u.data);
            return 0;
        }
    if (ckv_config_load(bench_options, &o, argc - 1, argv + 1, NULL, 0, NULL, err, sizeof(err))) {
        fprintf(stderr, "ckv-bench-kvstore: %s\n", err);
        return 2;
    }
    ckv_log_init("ckv-bench-kvstore", CKV_LOG_WARN);
    if (!o.iters)
        o.iters = o.quick ? 2000 : 20000;
    if (!o.reps)
        o.reps = o.quick ? 3 : 5;
    uint64_t pool_mib = o.quick ? 64 : 512;
    if (!o.store_bin[0]) {
        char self[400];
        ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
        self[n > 0 ? n : 0] = '\0';
        char *slash = strrchr(self, '/');
        if (slash)
            *slash = '\0';
        snprintf(o.store_bin, sizeof(o.store_bin), "%s/ckv-kvstore", self);
    }
    if (sysconf(_SC_NPROCESSORS_ONLN) < 2)
        fprintf(stderr, "bench: one CPU: the split placement shares it\n");
    snprintf(run_dir, sizeof(run_dir), "%s/ckv-bench-kvstore-%d", o.dir, (int)getpid());
    if (mkdir(run_dir, 0700) != 0) {
        fprintf(stderr, "bench: mkdir %s: %s\n", run_dir, strerror(errno));
        return 1;
    }
    snprintf(spill_path, sizeof(spill_path), "%s/spill", run_dir);
    snprintf(log_path, sizeof(log_path), "%s/kvstore.log", run_dir);
    snprintf(sock_path, sizeof(sock_path), "%s/kvstore.sock", run_dir);
    snprintf(endpoint, sizeof(endpoint), "ipc://%s", sock_path);
    snprintf(seg_name, sizeof(seg_name), "/ckv-bench-%d", (int)getpid());
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    /* ---- latency ---- */
    start_store(64, 64, false);
    struct lat f1[2], f32[2], rt[2];
    uint32_t block_bytes = 0;
    for (int placement = 0; placement < 2; placement++) {
        pin_self(placement == 0 ? 0 : 1); /* before the client's ZeroMQ threads exist */
        kvs_client_t *c = connect_client();
        block_bytes = kvs_client_geometry(c)->block_bytes;
        struct kvs_key keys[32];
        uint32_t ntok[32];
        for (uint32_t i = 0; i < 32; i++) {
            keys[i] = (struct kvs_key){.seq_uid = 7, .layer = 1, .kv_head = i % 4, .cluster_id = i};
            ntok[i] = 64;
        }
        if (placement == 0) {
            struct kvs_blocks b;
            int rc = kvs_client_reserve(c, keys, ntok, 32, &b);
            if (rc)
                die_rc(c, "reserve", rc);
            for (int k = 0; k < 32; k++)
                fill_cluster(b.block + b.first[k], b.n_blocks[k], block_bytes, (uint32_t)k);
            if ((rc = kvs_client_commit(c, b.id, NULL)))
                die_rc(c, "commit", rc);
        }
        rt[placement] = measure_ping(c, o.iters);
        f1[placement] = measure_fetch(c, keys, 1, o.iters);
        f32[placement] = measure_fetch(c, keys, 32, o.iters);
        kvs_client_destroy(&c);
    }
    stop_store();

    /* ---- throughput, against fio: back to back in each repetition, the order alternating,
     * ratios taken within a repetition (the disk's speed drifts between them) ---- */
    double sp[16], re[16], spb[16], reb[16], fw[16], fr[16], rsp[16], rre[16];
    double bytes_sp = 0, bytes_re = 0;
    bool direct = true;
    int reps = o.reps > 16 ? 16 : o.reps;
    char fio_file[700];
    snprintf(fio_file, sizeof(fio_file), "%s/fio.dat", run_dir);
    for (int i = 0; i < reps; i++) {
        struct tput t = {0};
        for (int step = 0; step < 2; step++) {
            if ((step == 0) == (i % 2 == 0)) {
                t = run_spill_restore(pool_mib);
                unlink(spill_path);
                bytes_sp = t.bytes_spilled;
                bytes_re = t.bytes_restored;
                direct = t.direct;
            } else {
                /* fio needs the sizes: the first repetition runs the store first */
                fw[i] = run_fio("write", (uint64_t)(bytes_sp ? bytes_sp : 0.76 * pool_mib * MIB),
                                block_bytes, direct);
                fr[i] = run_fio("read", (uint64_t)(bytes_re ? bytes_re : 0.76 * pool_mib * MIB),
                                block_bytes, direct);
                unlink(fio_file);
            }
        }
        sp[i] = t.spill_mbps;
        re[i] = t.restore_mbps;
        spb[i] = t.spill_busy_mbps;
        reb[i] = t.restore_busy_mbps;
        rsp[i] = fw[i] > 0 ? sp[i] / fw[i] : NAN;
        rre[i] = fr[i] > 0 ? re[i] / fr[i] : NAN;
        fprintf(stderr, "rep %d: spill %.0f vs fio %.0f MiB/s, restore %.0f vs fio %.0f MiB/s\n", i,
                sp[i], fw[i], re[i], fr[i]);
    }
    double spill = median(sp, reps), restore = median(re, reps);
    double spill_busy = median(spb, reps), restore_busy = median(reb, reps);
    double fio_w = median(fw, reps), fio_r = median(fr, reps);
    bool have_fio = fio_w > 0 && fio_r > 0;
    double spill_ratio = have_fio ? median(rsp, reps) : NAN;
    double restore_ratio = have_fio ? median(rre, reps) : NAN;

    printf("ckv-kvstore benchmark (%s; blocks of %u bytes = 16 tokens x head_dim %d x K,V x f16;"
           " io-depth %d; %s; spill file in %s)\n\n",
           o.quick ? "quick" : "full", block_bytes, o.head_dim, o.io_depth,
           direct ? "O_DIRECT" : "buffered", o.dir);
    printf("| fetch round trip (release folded in), us | p50 same core | p99 same core "
           "| p50 split | p99 split |\n|---|---|---|---|---|\n");
    printf("| 1 cluster (4 blocks) | %.1f | %.1f | %.1f | %.1f |\n", f1[0].p50, f1[0].p99,
           f1[1].p50, f1[1].p99);
    printf("| 32 clusters (128 blocks) | %.1f | %.1f | %.1f | %.1f |\n", f32[0].p50, f32[0].p99,
           f32[1].p50, f32[1].p99);
    printf("| floor: an empty request (refused release) | %.1f | %.1f | %.1f | %.1f |\n\n",
           rt[0].p50, rt[0].p99, rt[1].p50, rt[1].p99);
    printf("| throughput, MiB/s (median of %d repetitions) | ckv-kvstore | fio, same pattern "
           "| ratio (median of the per-repetition ratios) |\n|---|---|---|---|\n",
           reps);
    printf("| spill: %.0f MiB, sequential %u-byte writes | %.0f | %.0f | %.2f |\n", bytes_sp / MIB,
           block_bytes, spill, fio_w, spill_ratio);
    printf("| restore: %.0f MiB, sequential %u-byte reads | %.0f | %.0f | %.2f |\n", bytes_re / MIB,
           block_bytes, restore, fio_r, restore_ratio);
    printf("| (spill, time with writes in flight only) | %.0f | | |\n", spill_busy);
    printf("| (restore, time with reads in flight only) | %.0f | | |\n\n", restore_busy);
    if (!have_fio)
        printf("fio was not found or failed (deploy/install-deps.sh --bench installs it): no "
               "ratios\n\n");
    printf("reproduce: build/bin/ckv-bench-kvstore%s --head-dim %d --io-depth %d --dir %s\n",
           o.quick ? " --quick" : "", o.head_dim, o.io_depth, o.dir);

    if (o.json[0]) {
        FILE *f = fopen(o.json, "w");
        if (!f) {
            fprintf(stderr, "bench: %s: %s\n", o.json, strerror(errno));
            return 1;
        }
        fprintf(f, "{\n  \"bench\": \"kvstore\",\n  \"quick\": %s,\n  \"direct_io\": %s,\n",
                o.quick ? "true" : "false", direct ? "true" : "false");
        json_num(f, "block_bytes", block_bytes, false);
        json_num(f, "io_depth", o.io_depth, false);
        json_num(f, "iters", o.iters, false);
        json_num(f, "reps", reps, false);
        json_num(f, "fetch1_p50_us", f1[0].p50, false);
        json_num(f, "fetch1_p99_us", f1[0].p99, false);
        json_num(f, "fetch32_p50_us", f32[0].p50, false);
        json_num(f, "fetch32_p99_us", f32[0].p99, false);
        json_num(f, "fetch1_split_p50_us", f1[1].p50, false);
        json_num(f, "fetch1_split_p99_us", f1[1].p99, false);
        json_num(f, "fetch32_split_p50_us", f32[1].p50, false);
        json_num(f, "fetch32_split_p99_us", f32[1].p99, false);
        json_num(f, "empty_rtt_p50_us", rt[0].p50, false);
        json_num(f, "empty_rtt_split_p50_us", rt[1].p50, false);
        json_num(f, "spill_MiBps", spill, false);
        json_num(f, "spill_busy_MiBps", spill_busy, false);
        json_num(f, "fio_write_MiBps", have_fio ? fio_w : NAN, false);
        json_num(f, "spill_vs_fio", spill_ratio, false);
        json_num(f, "restore_MiBps", restore, false);
        json_num(f, "restore_busy_MiBps", restore_busy, false);
        json_num(f, "fio_read_MiBps", have_fio ? fio_r : NAN, false);
        json_num(f, "restore_vs_fio", restore_ratio, false);
        json_num(f, "bytes_spilled", bytes_sp, false);
        json_num(f, "bytes_restored", bytes_re, true);
        fprintf(f, "}\n");
        fclose(f);
    }
    const char *leftovers[] = {"kvstore.log", "fio-write.json", "fio-read.json", "kvstore.sock",
                               "kvstore.sock.lock"};
    for (size_t i = 0; i < sizeof(leftovers) / sizeof(leftovers[0]); i++) {
        char path[700];
        snprintf(path, sizeof(path), "%s/%s", run_dir, leftovers[i]);
        unlink(path);
    }
    rmdir(run_dir);
    return 0;
}
