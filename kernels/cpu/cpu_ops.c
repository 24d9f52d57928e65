/*
 * The CPU backend's dense ops (ops.h): matrix products against float and quantized weights,
 * embedding lookup, RMSNorm, RoPE, SwiGLU, adds. Every op is threaded on the context's pool
 * over output rows (matmul) or chunks of elements; the matmul micro-kernels are per ISA
 * (portable here, cpu_ops_avx2.c, cpu_ops_avx512.c), chosen by the context's ISA.
 *
 * Matmul layout. Quantized weights: the activation rows are quantized once per call to
 * struct cpu_q8 blocks (shared by all threads, identical bytes on every ISA), then each task
 * owns a range of weight rows and walks it in slices of at most MM_W_BYTES (kept in L2); for
 * each slice the activation rows go by in tiles of at most MM_X_BYTES (kept in L1), and the
 * micro-kernel reuses every weight block across the tile's rows. For decode (n <= a tile) that
 * is exactly one pass over the weights whatever n is: what makes a batch of 8 tokens cost
 * little more than one. Float weights: the same walk over the f32 activation rows.
 *
 * Float weights with a prompt-sized batch: OpenBLAS or our kernel? Measured (AMD EPYC Zen 4,
 * AVX-512, one thread, f32 weight in cache, fastest of 300 calls, 2026-12-06; ours with
 * CKV_OPS_BLAS=0):
 *     576x576   n=8    ours 88 GFLOP/s   OpenBLAS sgemm 88
 *               n=16        75                    74
 *               n=32        74                    82  (1.11x)
 *               n=64        74                    94  (1.28x)
 *               n=128       73                   100  (1.37x)
 *     128x576   n=512       73                   104  (1.41x)
 *     64x1536   n=512       75                    99  (1.33x)
 * so f32 weights with n >= 32 go to cblas_sgemm (when the build found OpenBLAS, on the avx2 and
 * avx512 ISAs), our kernel below that. OpenBLAS packs both operands into cache-sized panels,
 * which a kernel reading rows in place does not; below ~32 rows there is nothing to amortise
 * the packing over and the product is bound by the weight's bytes anyway. OpenBLAS runs
 * single-threaded inside our pool's tasks (one task per thread, each a range of output
 * columns): its own thread pool would compete with ours for the same cores. f16/bf16 weights
 * stay on our kernel at every size (sgemm would need the weight converted to f32 first, twice
 * its bytes; OpenBLAS has no f16 x f32 product), and so do the quantized types, which are the
 * ones GGUF models use for matrices (the default model: Q4_1, and Q8_0 for the embedding /
 * output head).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_half.h"
#include "cpu_backend.h"
#include "cpu_ops.h"

#ifdef CKV_HAVE_OPENBLAS
#include <cblas.h>
#include <pthread.h>
void openblas_set_num_threads(int n);
#endif

#define MM_X_BYTES  (24u << 10)  /* activation tile: stays in L1 (32-48 KiB) beside a weight row */
#define MM_W_BYTES  (256u << 10) /* weight slice: stays in L2 while the activation tiles pass */
#define MM_MIN_ROWS 16           /* fewest weight rows per task: pool overhead stays small */
#define EW_CHUNK    (16u << 10)  /* elements per task of the element-wise ops */

/* ---- scalar definitions ---- */

static inline float bf16_to_f32(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

void cpu_ops_dequant_row(enum ckv_wtype t, const void *row, int cols, float *out)
{
    int nb = cols / CPU_QK;
    switch (t) {
    case CKV_W_F32: memcpy(out, row, (size_t)cols * sizeof(float)); return;
    case CKV_W_F16:
        for (int i = 0; i < cols; i++)
            out[i] = ckv_half_to_f32(((const uint16_t *)row)[i]);
        return;
    case CKV_W_BF16:
        for (int i = 0; i < cols; i++)
            out[i] = bf16_to_f32(((const uint16_t *)row)[i]);
        return;
    case CKV_W_Q8_0:
        for (int b = 0; b < nb; b++) {
            const struct cpu_blk_q8_0 *blk = (const struct cpu_blk_q8_0 *)row + b;
            float d = ckv_half_to_f32(blk->d);
            for (int j = 0; j < CPU_QK; j++)
                out[b * CPU_QK + j] = d * (float)blk->q[j];
        }
        return;
    case CKV_W_Q4_0:
        for (int b = 0; b < nb; b++) {
            const struct cpu_blk_q4_0 *blk = (const struct cpu_blk_q4_0 *)row + b;
            float d = ckv_half_to_f32(blk->d);
            for (int j = 0; j < CPU_QK / 2; j++) {
                out[b * CPU_QK + j] = d * (float)((blk->qs[j] & 0xf) - 8);
                out[b * CPU_QK + j + 16] = d * (float)((blk->qs[j] >> 4) - 8);
            }
        }
        return;
    case CKV_W_Q4_1:
        for (int b = 0; b < nb; b++) {
            const struct cpu_blk_q4_1 *blk = (const struct cpu_blk_q4_1 *)row + b;
            float d = ckv_half_to_f32(blk->d), m = ckv_half_to_f32(blk->m);
            for (int j = 0; j < CPU_QK / 2; j++) {
                out[b * CPU_QK + j] = d * (float)(blk->qs[j] & 0xf) + m;
                out[b * CPU_QK + j + 16] = d * (float)(blk->qs[j] >> 4) + m;
            }
        }
        return;
    }
}

static inline int is_quant(enum ckv_wtype t)
{
    return t == CKV_W_Q4_0 || t == CKV_W_Q4_1 || t == CKV_W_Q8_0;
}

/* 1.5 * 2^23: adding and subtracting it rounds a float of magnitude < 2^22 to an integer,
 * to nearest even in the default rounding mode (nearbyintf's result, without its libm call,
 * and vectorisable). */
#define ROUND_MAGIC 12582912.0f

/* A block scale or sum rounded to f16 as llama.cpp stores it (nearest even); a value beyond
 * f16's range stays f32, where llama.cpp's would become inf and poison the product. */
static inline float round_f16(float v)
{
    float r = ckv_half_to_f32(ckv_half_from_f32(v));
    return isinf(r) && !isinf(v) ? v : r;
}

/* Quantizes one row of cols (a multiple of 32) f32 values to cols/32 blocks, bit for bit as
 * llama.cpp's x86 SIMD quantize_row_q8_0/q8_1 do: the codes come from the f32 reciprocal
 * (q = round(x * (127/max|x|)), ties to even), then d = max|x|/127 is computed in f32 and
 * stored rounded to f16, and s = d * sum(q) is computed from the unrounded f32 d and rounded
 * to f16. The f16 rounding does not feed back into the codes; it moves only the scale the
 * integer sums are multiplied by, but SmolLM2's outlier activations make that visible in the
 * logits (docs in ops.h). NaN quantizes to 0 rather than to an undefined integer. */
static void quantize_row_q8(const float *x, int cols, struct cpu_q8 *out)
{
    for (int b = 0; b < cols / CPU_QK; b++) {
        const float *xb = x + b * CPU_QK;
        float amax = 0.0f;
        for (int j = 0; j < CPU_QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        float qf[CPU_QK];
        for (int j = 0; j < CPU_QK; j++) {
            float v = xb[j] * id;
            v = v > 127.0f ? 127.0f : v;
            v = v < -127.0f ? -127.0f : v;
            v = v == v ? v : 0.0f;
            qf[j] = (v + ROUND_MAGIC) - ROUND_MAGIC;
        }
        int sum = 0;
        for (int j = 0; j < CPU_QK; j++) {
            out[b].q[j] = (int8_t)(int)qf[j];
            sum += (int)qf[j];
        }
        float d = amax / 127.0f;
        out[b].d = round_f16(d);
        out[b].s = round_f16(d * (float)sum);
    }
}

/* ---- portable micro-kernel ---- */

static float dot_f32_portable(const float *w, const float *x, int cols)
{
    float s[8] = {0};
    int j = 0;
    for (; j + 8 <= cols; j += 8)
        for (int k = 0; k < 8; k++)
            s[k] += w[j + k] * x[j + k];
    for (; j < cols; j++)
        s[0] += w[j] * x[j];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static float dot_q_portable(enum ckv_wtype t, const void *w, const struct cpu_q8 *x, int nb)
{
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const int8_t *q = x[b].q;
        int isum = 0;
        if (t == CKV_W_Q8_0) {
            const struct cpu_blk_q8_0 *blk = (const struct cpu_blk_q8_0 *)w + b;
            for (int j = 0; j < CPU_QK; j++)
                isum += blk->q[j] * q[j];
            acc += ckv_half_to_f32(blk->d) * x[b].d * (float)isum;
        } else if (t == CKV_W_Q4_0) {
            const struct cpu_blk_q4_0 *blk = (const struct cpu_blk_q4_0 *)w + b;
            for (int j = 0; j < CPU_QK / 2; j++)
                isum += ((blk->qs[j] & 0xf) - 8) * q[j] + ((blk->qs[j] >> 4) - 8) * q[j + 16];
            acc += ckv_half_to_f32(blk->d) * x[b].d * (float)isum;
        } else {
            const struct cpu_blk_q4_1 *blk = (const struct cpu_blk_q4_1 *)w + b;
            for (int j = 0; j < CPU_QK / 2; j++)
                isum += (blk->qs[j] & 0xf) * q[j] + (blk->qs[j] >> 4) * q[j + 16];
            acc +=
                ckv_half_to_f32(blk->d) * x[b].d * (float)isum + ckv_half_to_f32(blk->m) * x[b].s;
        }
    }
    return acc;
}

static void mm_portable(enum ckv_wtype t, const void *w, size_t row_bytes, int n_w, const void *x,
                        size_t x_stride, int n_x, int cols, float *y, size_t ldy)
{
    float buf[256]; /* a float row in pieces, converted once for all activation rows */
    for (int r = 0; r < n_w; r++) {
        const char *wr = (const char *)w + (size_t)r * row_bytes;
        if (is_quant(t)) {
            for (int i = 0; i < n_x; i++) {
                const struct cpu_q8 *xi =
                    (const struct cpu_q8 *)((const char *)x + (size_t)i * x_stride);
                y[(size_t)i * ldy + r] = dot_q_portable(t, wr, xi, cols / CPU_QK);
            }
            continue;
        }
        for (int i = 0; i < n_x; i++)
            y[(size_t)i * ldy + r] = 0.0f;
        for (int c0 = 0; c0 < cols; c0 += 256) {
            int nc = cols - c0 < 256 ? cols - c0 : 256;
            const float *wf;
            if (t == CKV_W_F32) {
                wf = (const float *)wr + c0;
            } else {
                size_t esz = 2;
                cpu_ops_dequant_row(t, wr + (size_t)c0 * esz, nc, buf);
                wf = buf;
            }
            for (int i = 0; i < n_x; i++) {
                const float *xi = (const float *)((const char *)x + (size_t)i * x_stride) + c0;
                y[(size_t)i * ldy + r] += dot_f32_portable(wf, xi, nc);
            }
        }
    }
}

const cpu_mm_fn cpu_ops_mm_portable = mm_portable;

/* ---- matmul ---- */

struct mm_job {
    cpu_mm_fn mm;
    enum ckv_wtype t;
    const char *w;
    size_t row_bytes;
    int rows, cols;
    const char *x; /* f32 rows, or the quantized copy */
    size_t x_stride;
    int n;
    float *y;
    int rows_per_task;
    int w_slice, x_tile; /* rows */
    int x_panel;         /* activation rows per pass over the task's weights */
    /* quantization tasks */
    const float *xf;
    struct cpu_q8 *xq;
    int q_rows_per_task;
};

static void mm_task(void *arg, int task, int tid)
{
    (void)tid;
    const struct mm_job *j = arg;
    int r0 = task * j->rows_per_task;
    int r1 = CKV_MIN(r0 + j->rows_per_task, j->rows);
    for (int p0 = 0; p0 < j->n; p0 += j->x_panel) {
        int p1 = CKV_MIN(p0 + j->x_panel, j->n);
        for (int rs = r0; rs < r1; rs += j->w_slice) {
            int nw = CKV_MIN(j->w_slice, r1 - rs);
            for (int i0 = p0; i0 < p1; i0 += j->x_tile) {
                int nx = CKV_MIN(j->x_tile, p1 - i0);
                j->mm(j->t, j->w + (size_t)rs * j->row_bytes, j->row_bytes, nw,
                      j->x + (size_t)i0 * j->x_stride, j->x_stride, nx, j->cols,
                      j->y + (size_t)i0 * j->rows + rs, (size_t)j->rows);
            }
        }
    }
}

static void quant_task(void *arg, int task, int tid)
{
    (void)tid;
    const struct mm_job *j = arg;
    int i0 = task * j->q_rows_per_task;
    int i1 = CKV_MIN(i0 + j->q_rows_per_task, j->n);
    int nb = j->cols / CPU_QK;
    for (int i = i0; i < i1; i++)
        quantize_row_q8(j->xf + (size_t)i * j->cols, j->cols, j->xq + (size_t)i * nb);
}

#ifdef CKV_HAVE_OPENBLAS
/* f32 weights and at least this many activation rows go to OpenBLAS (see the file comment). */
#define MM_BLAS_MIN_N 32

/* One task's rows through cblas_sgemm: y[:, r0:r1] = x . W[r0:r1]^T. */
static void blas_task(void *arg, int task, int tid)
{
    (void)tid;
    const struct mm_job *j = arg;
    int r0 = task * j->rows_per_task;
    int nr = CKV_MIN(j->rows_per_task, j->rows - r0);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->n, nr, j->cols, 1.0f,
                (const float *)j->x, j->cols, (const float *)(j->w + (size_t)r0 * j->row_bytes),
                (int)(j->row_bytes / sizeof(float)), 0.0f, j->y + r0, j->rows);
}

/* OpenBLAS runs single-threaded inside our pool's tasks: its own threads would compete with
 * the pool's (which spin between jobs) for the same cores. Process-wide, set once. */
static int blas_on = 1;

static void blas_init(void)
{
    openblas_set_num_threads(1);
    const char *e = getenv("CKV_OPS_BLAS"); /* "0": our kernel for every size (comparisons) */
    blas_on = !(e && strcmp(e, "0") == 0);
}

static int use_blas(const struct cpu_backend *cb, const struct ckv_weight *w, int n)
{
    /* not on the portable ISA: OpenBLAS picks its own instructions, and the portable context
     * promises to run none beyond the baseline (valgrind) */
    return cb->isa != CKV_ISA_PORTABLE && w->type == CKV_W_F32 && n >= MM_BLAS_MIN_N &&
           w->row_bytes % sizeof(float) == 0 && w->row_bytes / sizeof(float) <= INT32_MAX &&
           (size_t)w->rows * n <= INT32_MAX;
}
#endif

static cpu_mm_fn mm_of(const struct cpu_backend *cb)
{
    cpu_mm_fn f = cb->isa == CKV_ISA_AVX512 ? cpu_ops_mm_avx512
                  : cb->isa == CKV_ISA_AVX2 ? cpu_ops_mm_avx2
                                            : NULL;
    return f ? f : cpu_ops_mm_portable;
}

int cpu_matmul(struct ckv_ctx *ctx, const struct ckv_weight *w, const float *x, int n, float *y)
{
    struct cpu_backend *cb = cpu_of(ctx);
    struct mm_job j = {
        .mm = mm_of(cb),
        .t = w->type,
        .w = w->data,
        .row_bytes = w->row_bytes,
        .rows = w->rows,
        .cols = w->cols,
        .n = n,
        .y = y,
    };
    struct cpu_q8 *xq = NULL;
    if (is_quant(w->type)) {
        size_t nb = (size_t)w->cols / CPU_QK;
        xq = aligned_alloc(64, cpu_align64((size_t)n * nb * sizeof(*xq)));
        if (!xq)
            return -ENOMEM;
        j.xf = x;
        j.xq = xq;
        /* about 64 KiB of activations per task, so a prompt quantizes on every thread */
        j.q_rows_per_task = CKV_MAX(1, (int)((64u << 10) / ((size_t)w->cols * sizeof(float))));
        cpu_pool_run(cb->pool, (n + j.q_rows_per_task - 1) / j.q_rows_per_task, quant_task, &j);
        j.x = (const char *)xq;
        j.x_stride = nb * sizeof(*xq);
    } else {
        j.x = (const char *)x;
        j.x_stride = (size_t)w->cols * sizeof(float);
    }
    /* whole groups of 4 activation rows: the kernels' register tiles are 4 rows wide, and a
     * ragged tile end falls back to their one-row path for every weight row */
    j.x_tile = (int)CKV_MAX((size_t)4, MM_X_BYTES / j.x_stride & ~(size_t)3);
    j.w_slice = (int)CKV_MAX((size_t)1, MM_W_BYTES / w->row_bytes);
    /* and a prompt goes by in panels of activation rows that fit L2 beside
     * the weight slice, so that neither streams from L3 once per pass of the other */
    j.x_panel = (int)CKV_MAX((size_t)j.x_tile, MM_W_BYTES / j.x_stride / j.x_tile * j.x_tile);
    /* Enough tasks that two or three per thread balance a noisy machine, none too small. */
    int n_threads = cb->n_threads;
    int per = (w->rows + 4 * n_threads - 1) / (4 * n_threads);
    per = CKV_MAX(per, MM_MIN_ROWS);
    per = (per + 3) & ~3; /* whole groups of 4 rows for the SIMD kernels */
    j.rows_per_task = per;
#ifdef CKV_HAVE_OPENBLAS
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (use_blas(cb, w, n) && (pthread_once(&once, blas_init), blas_on)) {
        /* one sgemm per thread: OpenBLAS blocks its own loops, more calls only add packing */
        j.rows_per_task = (w->rows + n_threads - 1) / n_threads;
        cpu_pool_run(cb->pool, (w->rows + j.rows_per_task - 1) / j.rows_per_task, blas_task, &j);
        return 0;
    }
#endif
    cpu_pool_run(cb->pool, (w->rows + per - 1) / per, mm_task, &j);
    free(xq);
    return 0;
}

/* ---- embedding lookup ---- */

struct rows_job {
    const struct ckv_weight *w;
    const int32_t *ids;
    float *out;
};

static void rows_task(void *arg, int task, int tid)
{
    (void)tid;
    const struct rows_job *j = arg;
    const struct ckv_weight *w = j->w;
    cpu_ops_dequant_row(w->type, (const char *)w->data + (size_t)j->ids[task] * w->row_bytes,
                        w->cols, j->out + (size_t)task * w->cols);
}

int cpu_get_rows(struct ckv_ctx *ctx, const struct ckv_weight *w, const int32_t *ids, int n,
                 float *out)
{
    struct rows_job j = {w, ids, out};
    cpu_pool_run(cpu_of(ctx)->pool, n, rows_task, &j);
    return 0;
}

/* ---- RMSNorm ---- */

struct norm_job {
    const float *x, *weight;
    float *out;
    int n, dim, rows_per_task;
    float eps;
};

static void norm_task(void *arg, int task, int tid)
{
    (void)tid;
    const struct norm_job *j = arg;
    int i1 = CKV_MIN((task + 1) * j->rows_per_task, j->n);
    for (int i = task * j->rows_per_task; i < i1; i++) {
        const float *x = j->x + (size_t)i * j->dim;
        float *o = j->out + (size_t)i * j->dim;
        /* the sum of squares in f64 as ggml does: no cancellation, and dim terms of f32 would
         * lose low bits over a 4096-wide row */
        double ss = 0.0;
        for (int k = 0; k < j->dim; k++)
            ss += (double)x[k] * x[k];
        float scale = (float)(1.0 / sqrt(ss / j->dim + (double)j->eps));
        for (int k = 0; k < j->dim; k++)
            o[k] = x[k] * scale * j->weight[k];
    }
}

int cpu_rmsnorm(struct ckv_ctx *ctx, const float *x, const float *weight, int n, int dim, float eps,
                float *out)
{
    struct norm_job j = {x, weight, out, n, dim, 0, eps};
    j.rows_per_task = CKV_MAX(1, (int)(EW_CHUNK / (unsigned)dim));
    cpu_pool_run(cpu_of(ctx)->pool, (n + j.rows_per_task - 1) / j.rows_per_task, norm_task, &j);
    return 0;
}

/* ---- RoPE ---- */

struct rope_job {
    float *x;
    const int32_t *pos;
    const struct ckv_rope_params *p;
    const double *inv_freq; /* (n_rot / 2): theta^(-2i/n_rot) / factor_i */
    int n, n_heads, head_dim;
    struct cpu_backend *cb;
};

static void rope_task(void *arg, int task, int tid)
{
    const struct rope_job *j = arg;
    int half = j->p->n_rot / 2;
    float *cs = cpu_scratch(j->cb, tid), *sn = cs + half;
    double pos = (double)j->pos[task] * (double)j->p->freq_scale;
    for (int k = 0; k < half; k++) {
        double a = pos * j->inv_freq[k];
        cs[k] = (float)cos(a);
        sn[k] = (float)sin(a);
    }
    /* NORM pairs (2k, 2k+1); NEOX pairs (k, k + n_rot/2) */
    int stride = j->p->style == CKV_ROPE_NORM ? 2 : 1;
    int other = j->p->style == CKV_ROPE_NORM ? 1 : half;
    for (int h = 0; h < j->n_heads; h++) {
        float *v = j->x + ((size_t)task * j->n_heads + h) * j->head_dim;
        for (int k = 0; k < half; k++) {
            float *a = v + k * stride, *b = a + other;
            float x0 = *a, x1 = *b;
            *a = x0 * cs[k] - x1 * sn[k];
            *b = x0 * sn[k] + x1 * cs[k];
        }
    }
}

int cpu_rope(struct ckv_ctx *ctx, float *x, int n, int n_heads, int head_dim, const int32_t *pos,
             const struct ckv_rope_params *p)
{
    struct cpu_backend *cb = cpu_of(ctx);
    int half = p->n_rot / 2;
    double *inv_freq = malloc((size_t)half * sizeof(double));
    if (!inv_freq)
        return -ENOMEM;
    int rc = cpu_scratch_reserve(cb, (size_t)p->n_rot * sizeof(float));
    if (rc) {
        free(inv_freq);
        return rc;
    }
    for (int k = 0; k < half; k++)
        inv_freq[k] = pow((double)p->theta, -2.0 * k / p->n_rot) /
                      (p->freq_factors ? (double)p->freq_factors[k] : 1.0);
    struct rope_job j = {x, pos, p, inv_freq, n, n_heads, head_dim, cb};
    cpu_pool_run(cb->pool, n, rope_task, &j);
    free(inv_freq);
    return 0;
}

/* ---- element-wise ---- */

struct ew_job {
    const float *a, *b;
    float *out;
    size_t n;
    int dim; /* add_bias: row length; 0 otherwise */
    int op;  /* 0 swiglu, 1 add, 2 add_bias */
};

static void ew_task(void *arg, int task, int tid)
{
    (void)tid;
    const struct ew_job *j = arg;
    size_t i0 = (size_t)task * EW_CHUNK, i1 = CKV_MIN(i0 + EW_CHUNK, j->n);
    if (j->op == 0) {
        for (size_t i = i0; i < i1; i++) {
            float g = j->a[i];
            j->out[i] = g / (1.0f + expf(-g)) * j->b[i];
        }
    } else if (j->op == 1) {
        for (size_t i = i0; i < i1; i++)
            j->out[i] += j->b[i];
    } else {
        for (size_t i = i0; i < i1; i++)
            j->out[i] += j->b[i % (size_t)j->dim];
    }
}

static int ew_run(struct ckv_ctx *ctx, struct ew_job *j)
{
    size_t n_tasks = (j->n + EW_CHUNK - 1) / EW_CHUNK;
    if (n_tasks > INT32_MAX)
        return -EINVAL;
    cpu_pool_run(cpu_of(ctx)->pool, (int)n_tasks, ew_task, j);
    return 0;
}

int cpu_swiglu(struct ckv_ctx *ctx, const float *gate, const float *up, size_t n, float *out)
{
    struct ew_job j = {gate, up, out, n, 0, 0};
    return ew_run(ctx, &j);
}

int cpu_add(struct ckv_ctx *ctx, float *x, const float *y, size_t n)
{
    struct ew_job j = {NULL, y, x, n, 0, 1};
    return ew_run(ctx, &j);
}

int cpu_add_bias(struct ckv_ctx *ctx, float *x, const float *bias, int n, int dim)
{
    struct ew_job j = {NULL, bias, x, (size_t)n * dim, dim, 2};
    return ew_run(ctx, &j);
}
