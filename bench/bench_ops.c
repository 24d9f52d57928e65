/*
 * ckv-bench-ops: ckv_matmul at the default model's shapes (SmolLM2-135M: hidden 576, FFN 1536,
 * vocab 49152) per weight type and batch size, on the CPU backend, against the memcpy
 * bandwidth of the same machine in the same run. Prints a table and the command that
 * reproduces it; --json FILE writes every figure.
 *
 *   build/bin/ckv-bench-ops                        types q4_1,q4_0,q8_0,f16,f32; n 1,8,512
 *   build/bin/ckv-bench-ops --quick                q4_1 and f32, n 1 and 8, no 49152 rows
 *   build/bin/ckv-bench-ops --isa portable --json out.json
 *
 * Method. Shapes are rows x cols of the weight (output x input): 576x576 (attention q/o),
 * 1536x576 (FFN gate/up), 576x1536 (FFN down), 49152x576 (the output head). Each figure
 * cycles through enough copies of the weight to exceed 64 MiB (more than the L3), so every
 * call reads its weight from DRAM as the forward pass does (30 layers of weights do not fit
 * any cache). The figure is the median over the timed calls (at least --reps calls and
 * --min-ms of them). GFLOP/s counts 2 * rows * cols * n; GB/s counts the weight bytes read
 * once per call (the activations are small or reused from cache). memcpy GB/s: bytes copied per
 * second by as many threads as the context has (each byte is read once and written once).
 *
 * With CKV_BENCH_OPENBLAS (the build defines it when OpenBLAS is found), f32 rows also show
 * cblas_sgemm on the same data with OpenBLAS's own threads (as many as the context's). Note
 * that ckv_matmul itself hands f32 products of 32+ rows to OpenBLAS (one thread per pool
 * task, kernels/cpu/cpu_ops.c says why); CKV_OPS_BLAS=0 in the environment keeps them on our
 * kernel, to compare the two.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_config.h"
#include "ckv_main.h"
#include "ckv_error.h"
#include "ckv_half.h"
#include "ckv_log.h"
#include "kernels.h"
#include "ops.h"

#ifdef CKV_BENCH_OPENBLAS
#include <cblas.h>
void openblas_set_num_threads(int n);
#endif

#define COLD_BYTES (64u << 20)
#define MAX_LIST   16
#define MAX_ROWS   256

static const char *const isa_names[] = {"auto", "portable", "avx2", "avx512", NULL};

struct bench_cfg {
    bool quick;
    char json[512];
    char types[128];
    char batches[128];
    char shapes[256];
    int reps;
    int min_ms;
    int threads;
    int isa;
};

static const struct ckv_config_opt bench_options[] = {
    CKV_OPT_BOOL(struct bench_cfg, quick, "quick", "no",
                 "types q4_1,f32, batches 1,8, shapes without the 49152-row head"),
    CKV_OPT_STRING(struct bench_cfg, json, "json", "", "write every figure to this JSON file"),
    CKV_OPT_STRING(struct bench_cfg, types, "types", "q4_1,q4_0,q8_0,f16,f32",
                   "weight types, comma-separated (f32 f16 bf16 q4_0 q4_1 q8_0)"),
    CKV_OPT_STRING(struct bench_cfg, batches, "batches", "1,8,512",
                   "activation rows per call, comma-separated"),
    CKV_OPT_STRING(struct bench_cfg, shapes, "shapes", "576x576,1536x576,576x1536,49152x576",
                   "weight shapes rows x cols, comma-separated"),
    CKV_OPT_INT(struct bench_cfg, reps, "reps", "15", 1, 100000,
                "timed calls per figure, at least"),
    CKV_OPT_INT(struct bench_cfg, min_ms, "min-ms", "200", 0, 100000,
                "timed milliseconds per figure, at least"),
    CKV_OPT_INT(struct bench_cfg, threads, "threads", "0", 0, 1024, "CPU threads; 0: all cores"),
    CKV_OPT_ENUM(struct bench_cfg, isa, "isa", "auto", isa_names, "CPU ISA"),
    CKV_OPT_END,
};

struct row {
    int type, rows, cols, n;
    double ms, gflops, gbs, bw_fraction;
    double blas_ms; /* f32 only, with OpenBLAS; 0 otherwise */
};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* ---- memcpy bandwidth ---- */

struct bw_job {
    char *dst;
    const char *src;
    size_t bytes;
};

static void *bw_thread(void *arg)
{
    struct bw_job *j = arg;
    memcpy(j->dst, j->src, j->bytes);
    return NULL;
}

/* Bytes copied per second by n_threads threads over 256 MiB, best of 5. */
static double memcpy_gbs(int n_threads)
{
    size_t bytes = (size_t)256 << 20;
    char *a = malloc(bytes), *b = malloc(bytes);
    if (!a || !b) {
        free(a);
        free(b);
        return 0;
    }
    memset(a, 1, bytes);
    memset(b, 2, bytes);
    n_threads = CKV_MAX(1, CKV_MIN(n_threads, 64));
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        pthread_t th[64];
        struct bw_job jobs[64];
        size_t per = bytes / (size_t)n_threads & ~(size_t)63;
        uint64_t t0 = ckv_now_ns();
        for (int i = 0; i < n_threads; i++) {
            jobs[i] = (struct bw_job){b + i * per, a + i * per, per};
            pthread_create(&th[i], NULL, bw_thread, &jobs[i]);
        }
        for (int i = 0; i < n_threads; i++)
            pthread_join(th[i], NULL);
        double gbs = (double)(per * n_threads) / ((double)(ckv_now_ns() - t0) * 1e-9) * 1e-9;
        best = gbs > best ? gbs : best;
    }
    free(a);
    free(b);
    return best;
}

/* ---- weights ---- */

static uint64_t rng_state = 88172645463325252ull;

static uint64_t rng_next(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static float rng_float(void) /* [-1, 1) */
{
    return (float)(rng_next() >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

/* Fills one weight of type t with plausible values: random codes, small f16 scales. */
static void fill_weight(int t, char *p, int rows, int cols, size_t row_bytes)
{
    for (int r = 0; r < rows; r++) {
        char *row = p + (size_t)r * row_bytes;
        if (t == CKV_W_F32) {
            for (int j = 0; j < cols; j++)
                ((float *)row)[j] = 0.05f * rng_float();
        } else if (t == CKV_W_F16 || t == CKV_W_BF16) {
            for (int j = 0; j < cols; j++) {
                float v = 0.05f * rng_float();
                uint32_t u;
                memcpy(&u, &v, 4);
                ((uint16_t *)row)[j] = t == CKV_W_F16 ? ckv_half_from_f32(v) : (uint16_t)(u >> 16);
            }
        } else {
            for (size_t b = 0; b < row_bytes; b++)
                row[b] = (char)rng_next();
            size_t bb = ckv_wtype_row_bytes(t, 32);
            for (int b = 0; b < cols / 32; b++) { /* sane f16 scale and offset */
                uint16_t d = ckv_half_from_f32(0.01f + 0.001f * rng_float());
                uint16_t m = ckv_half_from_f32(-0.08f);
                memcpy(row + b * bb, &d, 2);
                if (t == CKV_W_Q4_1)
                    memcpy(row + b * bb + 2, &m, 2);
            }
        }
    }
}

static int parse_list(const char *s, int *out, int cap)
{
    int n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > (1 << 22) || n == cap)
            return -EINVAL;
        out[n++] = (int)v;
        if (*end && *end != ',')
            return -EINVAL;
        s = *end == ',' ? end + 1 : end;
    }
    return n ? n : -EINVAL;
}

static int parse_types(const char *s, int *out, int cap)
{
    static const int all[] = {CKV_W_F32, CKV_W_F16, CKV_W_BF16, CKV_W_Q4_0, CKV_W_Q4_1, CKV_W_Q8_0};
    int n = 0;
    while (*s) {
        size_t len = strcspn(s, ",");
        int found = -1;
        for (size_t i = 0; i < CKV_ARRAY_LEN(all); i++)
            if (strlen(ckv_wtype_name(all[i])) == len && !strncmp(s, ckv_wtype_name(all[i]), len))
                found = all[i];
        if (found < 0 || n == cap)
            return -EINVAL;
        out[n++] = found;
        s += len + (s[len] == ',');
    }
    return n ? n : -EINVAL;
}

static int parse_shapes(const char *s, int *rows, int *cols, int cap)
{
    int n = 0;
    while (*s) {
        int r, c, used;
        if (sscanf(s, "%dx%d%n", &r, &c, &used) != 2 || r < 1 || c < 1 || n == cap)
            return -EINVAL;
        rows[n] = r;
        cols[n++] = c;
        s += used;
        if (*s && *s != ',')
            return -EINVAL;
        s += *s == ',';
    }
    return n ? n : -EINVAL;
}

/* ---- one figure ---- */

static int run_one(ckv_ctx_t *ctx, const struct bench_cfg *cfg, int t, int rows, int cols, int n,
                   struct row *out)
{
    size_t rb = ckv_wtype_row_bytes(t, cols);
    if (!rb)
        return -EINVAL;
    size_t wbytes = rb * (size_t)rows;
    int copies = (int)CKV_MAX((size_t)1, (COLD_BYTES + wbytes - 1) / wbytes);
    char *w = malloc(wbytes * (size_t)copies);
    float *x = malloc(sizeof(float) * (size_t)n * cols);
    float *y = malloc(sizeof(float) * (size_t)n * rows);
    int cap = cfg->reps + 100000;
    double *times = malloc(sizeof(double) * (size_t)cap);
    int rc = w && x && y && times ? 0 : -ENOMEM;
    if (rc)
        goto out;
    fill_weight(t, w, rows, cols, rb);
    for (int c = 1; c < copies; c++)
        memcpy(w + (size_t)c * wbytes, w, wbytes);
    for (size_t i = 0; i < (size_t)n * cols; i++)
        x[i] = rng_float();
    struct ckv_weight W = {t, rows, cols, rb, w};
    rc = ckv_matmul(ctx, &W, x, n, y); /* warm-up: threads awake, pages touched */
    int k = 0;
    uint64_t start = ckv_now_ns();
    while (rc == 0 && k < cap &&
           (k < cfg->reps || (double)(ckv_now_ns() - start) * 1e-6 < cfg->min_ms)) {
        W.data = w + (size_t)(k % copies) * wbytes;
        uint64_t t0 = ckv_now_ns();
        rc = ckv_matmul(ctx, &W, x, n, y);
        times[k++] = (double)(ckv_now_ns() - t0) * 1e-6;
    }
    if (rc)
        goto out;
    *out = (struct row){t, rows, cols, n, median(times, k), 0, 0, 0, 0};
    out->gflops = 2.0 * rows * cols * (double)n / (out->ms * 1e-3) * 1e-9;
    out->gbs = (double)wbytes / (out->ms * 1e-3) * 1e-9;
#ifdef CKV_BENCH_OPENBLAS
    if (t == CKV_W_F32) {
        openblas_set_num_threads(ckv_ctx_n_threads(ctx));
        k = 0;
        start = ckv_now_ns();
        while (k < cap && (k < cfg->reps || (double)(ckv_now_ns() - start) * 1e-6 < cfg->min_ms)) {
            const float *wc = (const float *)(w + (size_t)(k % copies) * wbytes);
            uint64_t t0 = ckv_now_ns();
            /* y (n, rows) = x (n, cols) . W^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, cols, 1.0f, x, cols, wc,
                        cols, 0.0f, y, rows);
            times[k++] = (double)(ckv_now_ns() - t0) * 1e-6;
        }
        out->blas_ms = median(times, k);
        openblas_set_num_threads(1); /* what ckv_matmul's own OpenBLAS path expects */
    }
#endif
out:
    free(w);
    free(x);
    free(y);
    free(times);
    return rc;
}

static int write_json(const char *path, const struct row *rows, int n_rows, const char *describe,
                      const char *command, double bw)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    fprintf(f, "{\n  \"bench\": \"ckv-bench-ops\",\n  \"backend\": \"%s\",\n", describe);
    fprintf(f, "  \"command\": \"%s\",\n  \"memcpy_gbs\": %.3f,\n  \"matmul\": [\n", command, bw);
    for (int i = 0; i < n_rows; i++) {
        const struct row *r = &rows[i];
        fprintf(f,
                "    {\"type\": \"%s\", \"rows\": %d, \"cols\": %d, \"n\": %d, \"ms\": %.5f, "
                "\"gflops\": %.3f, \"weight_gbs\": %.3f, \"memcpy_fraction\": %.4f",
                ckv_wtype_name(r->type), r->rows, r->cols, r->n, r->ms, r->gflops, r->gbs,
                r->bw_fraction);
        if (r->blas_ms > 0)
            fprintf(f, ", \"openblas_ms\": %.5f, \"openblas_gflops\": %.3f", r->blas_ms,
                    2.0 * r->rows * r->cols * (double)r->n / (r->blas_ms * 1e-3) * 1e-9);
        fprintf(f, "}%s\n", i + 1 < n_rows ? "," : "");
    }
    fprintf(f, "  ]\n}\n");
    return fclose(f) ? -errno : 0;
}

int main(int argc, char **argv)
{
    ckv_log_init("ckv-bench-ops", CKV_LOG_WARN);
    struct bench_cfg cfg;
    static const struct ckv_main_spec spec = {
        .prog = "ckv-bench-ops",
        .usage = "usage: ckv-bench-ops [options]\n",
        .table = bench_options,
    };
    int rc = ckv_main_config(&spec, &cfg, NULL, argc, argv);
    if (rc)
        return rc == 1 ? 0 : rc;
    int types[MAX_LIST], batches[MAX_LIST], srows[MAX_LIST], scols[MAX_LIST];
    int nt = parse_types(cfg.quick ? "q4_1,f32" : cfg.types, types, MAX_LIST);
    int nb = parse_list(cfg.quick ? "1,8" : cfg.batches, batches, MAX_LIST);
    int ns =
        parse_shapes(cfg.quick ? "576x576,1536x576,576x1536" : cfg.shapes, srows, scols, MAX_LIST);
    if (nt < 0 || nb < 0 || ns < 0) {
        fprintf(stderr, "ckv-bench-ops: bad --types, --batches or --shapes (see --help)\n");
        return 2;
    }
    struct ckv_buf cmd = {0};
    for (int i = 0; i < argc; i++)
        ckv_buf_printf(&cmd, "%s%s", i ? " " : "", i ? argv[i] : "build/bin/ckv-bench-ops");
    struct ckv_ctx_opts o = {
        .backend = CKV_BACKEND_CPU, .n_threads = cfg.threads, .isa = (enum ckv_cpu_isa)cfg.isa};
    ckv_ctx_t *ctx = NULL;
    rc = ckv_ctx_new(&o, &ctx);
    if (rc) {
        fprintf(stderr, "ckv-bench-ops: cpu context: %s\n", ckv_strerror(rc));
        return 1;
    }
    double bw = memcpy_gbs(ckv_ctx_n_threads(ctx));
    static struct row rows[MAX_ROWS];
    int n_rows = 0;
    uint64_t t0 = ckv_now_ns();
    printf("%s; memcpy %.2f GB/s (bytes copied per second)\n\n", ckv_ctx_describe(ctx), bw);
    printf("| type | rows x cols | n | ms | GFLOP/s | weight GB/s | of memcpy |%s\n",
#ifdef CKV_BENCH_OPENBLAS
           " OpenBLAS ms | OpenBLAS GFLOP/s |"
#else
           ""
#endif
    );
    printf("|---|---|---|---|---|---|---|%s\n",
#ifdef CKV_BENCH_OPENBLAS
           "---|---|"
#else
           ""
#endif
    );
    for (int ti = 0; ti < nt && rc == 0; ti++)
        for (int si = 0; si < ns && rc == 0; si++)
            for (int bi = 0; bi < nb && rc == 0 && n_rows < MAX_ROWS; bi++) {
                struct row *r = &rows[n_rows];
                rc = run_one(ctx, &cfg, types[ti], srows[si], scols[si], batches[bi], r);
                if (rc)
                    break;
                r->bw_fraction = bw > 0 ? r->gbs / bw : 0;
                n_rows++;
                printf("| %s | %dx%d | %d | %.4f | %.2f | %.2f | %.2f |", ckv_wtype_name(r->type),
                       r->rows, r->cols, r->n, r->ms, r->gflops, r->gbs, r->bw_fraction);
                if (r->blas_ms > 0)
                    printf(" %.4f | %.2f |", r->blas_ms,
                           2.0 * r->rows * r->cols * (double)r->n / (r->blas_ms * 1e-3) * 1e-9);
                else if (r->type == CKV_W_F32)
                    printf(" | |");
                printf("\n");
                fflush(stdout);
            }
    if (rc) {
        fprintf(stderr, "ckv-bench-ops: %s\n", ckv_strerror(rc));
    } else {
        printf("\nmedians of the timed calls, weights cycled through >= 64 MiB of copies (cold);"
               " reproduce with:\n  %s\n(%.1f s in all)\n",
               cmd.data, ckv_elapsed_s(t0));
        if (cfg.json[0]) {
            rc = write_json(cfg.json, rows, n_rows, ckv_ctx_describe(ctx), cmd.data, bw);
            if (rc)
                fprintf(stderr, "ckv-bench-ops: %s: %s\n", cfg.json, ckv_strerror(rc));
        }
    }
    ckv_buf_free(&cmd);
    ckv_ctx_destroy(&ctx);
    return rc ? 1 : 0;
}
