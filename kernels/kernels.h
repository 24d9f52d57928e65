/*
 * The backend-neutral kernel API: ClusterKV clustering, selection and attention, the
 * baselines' selection rules, and the memory they work on (ALGORITHM.md, DESIGN.md).
 *
 * Every kernel runs on a context (ckv_ctx_t): one backend instance (CPU, or one CUDA device)
 * with its stream, threads and scratch. All array arguments are *device* pointers of that
 * context's backend (host memory for the CPU backend, device memory for CUDA), allocated with
 * ckv_dev_alloc() or pointing into memory the backend registered. Kernels may run
 * asynchronously on the context's stream: results are visible to the host after
 * ckv_copy_d2h() (which synchronises) or ckv_ctx_sync(). Host-side outputs are only ever
 * scalar counts, named `*_host`, and a kernel that writes one synchronises first.
 *
 * Shapes are written (dim0, dim1, ...), row-major, innermost last. Strides are in elements.
 * Keys are post-RoPE. KV is f16 (default) or f32; queries, centroids and outputs are f32;
 * every dot product and softmax accumulates in f32.
 *
 * Return values: 0, or a negative errno (-EINVAL for a bad argument, -ENOMEM, -ENOSPC when
 * an output capacity is too small) or CKV_ENODEVICE/CKV_EUNSUPPORTED (common/ckv_error.h).
 * A kernel that returns an error has written nothing the caller may rely on.
 *
 * The KV block (DESIGN.md, "Data model"): CKV_BLOCK_TOKENS tokens of one (sequence, layer, KV
 * head): K rows (16, head_dim) then V rows (16, head_dim), in the KV dtype. A block pool is an
 * array of blocks; a slot index names one: pool + slot * ckv_block_bytes(head_dim, dtype).
 */
#ifndef CKV_KERNELS_H
#define CKV_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define CKV_BLOCK_TOKENS 16

/* Largest head_dim the kernels accept (larger is -EINVAL). */
#define CKV_MAX_HEAD_DIM 512

enum ckv_dtype {
    CKV_DTYPE_F32 = 0,
    CKV_DTYPE_F16 = 1, /* IEEE half, stored as uint16_t */
};

/* Bytes of one element / one block. 0 for an unknown dtype. */
size_t ckv_dtype_size(enum ckv_dtype dt);
size_t ckv_block_bytes(int head_dim, enum ckv_dtype dt);

/* "f32" / "f16"; "?" for an unknown dtype. */
const char *ckv_dtype_name(enum ckv_dtype dt);

/* ------------------------------------------------------------------------------------------
 * Contexts and memory
 * ------------------------------------------------------------------------------------------ */

enum ckv_backend_kind {
    CKV_BACKEND_CPU = 0,
    CKV_BACKEND_CUDA = 1,
};

/* CPU instruction set used by the CPU backend. AUTO picks the best the machine has; the
 * environment variable CKV_CPU_ISA=portable|avx2|avx512 overrides AUTO (valgrind cannot run
 * AVX-512: run it with CKV_CPU_ISA=portable). Forcing an ISA the CPU lacks is -ENOTSUP. */
enum ckv_cpu_isa {
    CKV_ISA_AUTO = 0,
    CKV_ISA_PORTABLE = 1,
    CKV_ISA_AVX2 = 2,   /* AVX2 + FMA + F16C */
    CKV_ISA_AVX512 = 3, /* AVX-512 F/BW/VL */
};

/* True when this CPU (and OS) can run the ISA; AUTO and PORTABLE always are. */
int ckv_cpu_isa_supported(enum ckv_cpu_isa isa);

/* "auto", "portable", "avx2", "avx512"; "?" otherwise. */
const char *ckv_cpu_isa_name(enum ckv_cpu_isa isa);

struct ckv_ctx_opts {
    enum ckv_backend_kind backend;
    int device;             /* CUDA device ordinal; ignored on CPU */
    int n_threads;          /* CPU worker threads; 0: one per online core */
    enum ckv_cpu_isa isa;   /* CPU only */
};

typedef struct ckv_ctx ckv_ctx_t;

/* Creates a context. CKV_ENODEVICE when CUDA is asked for and no device is usable (or the
 * build has no CUDA backend). The caller owns *out; free it with ckv_ctx_destroy(). A context
 * serves one host thread at a time (its scratch and stream are shared by its kernels). */
int ckv_ctx_new(const struct ckv_ctx_opts *opts, ckv_ctx_t **out);

/* Destroys the context and NULLs the pointer; NULL is fine. */
void ckv_ctx_destroy(ckv_ctx_t **ctx);

/* The backend and ISA in use, e.g. "cpu avx512 2 threads" or "cuda:0 NVIDIA H100". Static
 * storage inside the context. */
const char *ckv_ctx_describe(const ckv_ctx_t *ctx);

enum ckv_backend_kind ckv_ctx_backend(const ckv_ctx_t *ctx);

/* The ISA a CPU context resolved AUTO to (CKV_ISA_AUTO for a CUDA context). */
enum ckv_cpu_isa ckv_ctx_cpu_isa(const ckv_ctx_t *ctx);

/* CPU worker threads of a CPU context (the calling thread included); 0 for CUDA. The CPU
 * backend starts them lazily, at the first kernel that uses more than one: a process may fork
 * (Criterion does) after ckv_ctx_new() but not between a kernel call and using the context in
 * the child. */
int ckv_ctx_n_threads(const ckv_ctx_t *ctx);

/* True when a CUDA device is usable in this build and on this machine. */
int ckv_cuda_available(void);

/* Waits until every kernel queued on ctx has finished. */
int ckv_ctx_sync(ckv_ctx_t *ctx);

/* Device memory, 64-byte aligned (256 on CUDA). The caller owns *ptr and frees it with
 * ckv_dev_free() on the same context. */
int ckv_dev_alloc(ckv_ctx_t *ctx, size_t bytes, void **ptr);
void ckv_dev_free(ckv_ctx_t *ctx, void *ptr);

/* Copies. h2d and d2d are queued on the stream; d2h synchronises before returning. */
int ckv_copy_h2d(ckv_ctx_t *ctx, void *dst_dev, const void *src_host, size_t bytes);
int ckv_copy_d2h(ckv_ctx_t *ctx, void *dst_host, const void *src_dev, size_t bytes);
int ckv_copy_d2d(ckv_ctx_t *ctx, void *dst_dev, const void *src_dev, size_t bytes);

/* Converts n elements from src (src_dt) to dst (dst_dt), both device buffers that do not
 * overlap: f32 -> f16 rounds to nearest even (overflow gives inf, NaN stays NaN), f16 -> f32 is
 * exact, equal dtypes copy. Queued on the stream like ckv_copy_d2d(). The engine uses it to
 * store f32 K/V rows in an f16 cache. */
int ckv_convert(ckv_ctx_t *ctx, void *dst_dev, enum ckv_dtype dst_dt, const void *src_dev,
                enum ckv_dtype src_dt, size_t n);

/* ------------------------------------------------------------------------------------------
 * Clustering (ALGORITHM.md section 1 and 2)
 * ------------------------------------------------------------------------------------------ */

struct ckv_kmeans_params {
    int n_clusters; /* requested C >= 1; more than n_tokens is clamped to n_tokens */
    int max_iter;   /* >= 1; default 20 */
    float tol;      /* stop when fewer than tol * n_tokens labels change; default 0.001 */
    uint64_t seed;  /* k-means++ initialisation is a pure function of (keys, seed) */
};

/* CSR output of one (layer, KV head)'s clustering, caller-allocated device buffers sized for
 * the requested n_clusters (after clamping) and n_tokens. */
struct ckv_kmeans_out {
    float *centroids;  /* (cap, head_dim) f32: mean of the raw (unnormalised) member keys */
    int32_t *sizes;    /* (cap): members per cluster, all >= 1 */
    int32_t *offsets;  /* (cap + 1): cluster c owns members[offsets[c] .. offsets[c+1]) */
    int32_t *members;  /* (n_tokens): pos_base + row, grouped by cluster, ascending within one */
};

/* Cosine k-means over keys (n_tokens rows of head_dim at row_stride elements apart, dtype):
 * k-means++ init from seed, assignment argmax_c dot(k/|k|, c/|c|), up to max_iter iterations,
 * empty clusters removed after the last one (so *n_clusters_host <= requested). The same
 * function clusters a decode window into a few new clusters. n_iter_host may be NULL.
 * Synchronises (writes host counts). */
int ckv_kmeans(ckv_ctx_t *ctx, const void *keys, enum ckv_dtype dtype, int n_tokens, int head_dim,
               size_t row_stride, int32_t pos_base, const struct ckv_kmeans_params *params,
               struct ckv_kmeans_out *out, int *n_clusters_host, int *n_iter_host);

/* Copies rows of K and V into blocks: rows[i] (an index into k and v, each row at
 * token_stride elements apart) goes to token i % 16 of block slots[i / 16] of the pool.
 * The unused tail of the last block is zeroed. n_rows >= 1. */
int ckv_pack_blocks(ckv_ctx_t *ctx, const void *k, const void *v, enum ckv_dtype dtype,
                    int head_dim, size_t token_stride, const int32_t *rows, int n_rows,
                    void *pool, const int32_t *slots);

/* ------------------------------------------------------------------------------------------
 * Selection (ALGORITHM.md section 3)
 * ------------------------------------------------------------------------------------------ */

/* GQA selection unit. PER_QHEAD: every query head selects for itself (n_units = n_q_heads).
 * KVHEAD_MAX / KVHEAD_SUM: one selection per KV head (n_units = n_kv_heads) scored by the
 * max / sum over the group's query heads of q . centroid. Query head i belongs to KV head
 * i / (n_q_heads / n_kv_heads). */
enum ckv_select_mode {
    CKV_SELECT_PER_QHEAD = 0,
    CKV_SELECT_KVHEAD_MAX = 1,
    CKV_SELECT_KVHEAD_SUM = 2,
};

struct ckv_select_args {
    int n_q_heads, n_kv_heads, head_dim;
    enum ckv_select_mode mode;
    const float *q;               /* (n_q_heads, head_dim) f32 */
    const float *centroids;       /* (n_clusters_total, head_dim) f32, KV head by KV head */
    const int32_t *sizes;         /* (n_clusters_total) tokens per cluster, >= 1 (a size of 0
                                     is accepted and never selected; < 0 is -EINVAL) */
    const int32_t *head_offsets;  /* (n_kv_heads + 1): KV head h owns clusters
                                     [head_offsets[h], head_offsets[h+1]) */
    int n_clusters_total;         /* head_offsets[n_kv_heads] */
    int budget;                   /* B >= 1 tokens per unit */
    int max_selected;             /* capacity per unit: >= min(B, clusters of any head) */
    /* outputs, device, per unit u: */
    int32_t *sel_clusters;  /* (n_units, max_selected): global cluster indices, best first,
                               ties broken by the lower index */
    int32_t *sel_count;     /* (n_units) clusters selected */
    int32_t *sel_last_take; /* (n_units) tokens taken from the last one (1..its size; 0 when
                               sel_count is 0, i.e. the head has no non-empty cluster) */
    float *scores;          /* optional (n_units, n_clusters_total) scores of the unit's own
                               KV head's clusters at their global index; NULL: not written */
    /* Optional, added: the centroids rounded to f16 (ckv_convert), same shape. When set they
     * are read instead of `centroids` (which may then be NULL): half the bytes of the step's
     * scoring, scores within ~1e-3 relative of the f32 ones (ckv eval-attn measures recall). */
    const uint16_t *centroids_f16;
};

/* Scores every cluster with the raw dot product q . centroid, ranks them correctly (any number
 * of clusters), takes them best-first until their sizes reach B and truncates the last so
 * exactly min(B, tokens of the head) tokens are taken. */
int ckv_select_clusters(ckv_ctx_t *ctx, const struct ckv_select_args *a);

/* Quest (ALGORITHM.md section 6): per 16-token page the element-wise min and max of its keys.
 * keys: (n_tokens, head_dim) at row_stride; outputs (ceil(n_tokens/16), head_dim) f32; a
 * partial last page bounds only its tokens. */
int ckv_quest_page_bounds(ckv_ctx_t *ctx, const void *keys, enum ckv_dtype dtype, int n_tokens,
                          int head_dim, size_t row_stride, float *page_min, float *page_max);

struct ckv_quest_args {
    int n_q_heads, n_kv_heads, head_dim;
    enum ckv_select_mode mode;    /* same units as ckv_select_args */
    const float *q;               /* (n_q_heads, head_dim) f32 */
    const float *page_min;        /* (n_kv_heads, n_pages, head_dim) f32 */
    const float *page_max;        /* (n_kv_heads, n_pages, head_dim) f32 */
    int n_pages;
    int n_select;                 /* pages per unit, >= 1; the last page is always one of them */
    int32_t *sel_pages;           /* (n_units, n_select) page indices, best first */
    int32_t *sel_count;           /* (n_units) = min(n_select, n_pages) */
};

/* Page score sum_i max(q_i * M_i, q_i * m_i); top n_select pages, the last page forced in:
 * when it does not rank among the top n_select it replaces the worst of them (so it comes
 * last). Ties go to the lower page index. */
int ckv_quest_select(ckv_ctx_t *ctx, const struct ckv_quest_args *a);

/* Oracle: per query head the `budget` tokens of largest true attention weight (q . k, which
 * orders the same as softmax). k: (n_kv_heads, n_ctx, head_dim) at the given strides.
 * sel_tokens (n_q_heads, budget) in descending weight; budget > n_ctx is -EINVAL. */
int ckv_oracle_topk(ckv_ctx_t *ctx, const float *q, const void *k, enum ckv_dtype dtype,
                    int n_q_heads, int n_kv_heads, int head_dim, int n_ctx, size_t head_stride,
                    size_t token_stride, int budget, int32_t *sel_tokens);

/* ------------------------------------------------------------------------------------------
 * Attention (ALGORITHM.md section 4). Scale 1/sqrt(head_dim) when scale is 0.
 * ------------------------------------------------------------------------------------------ */

/* Decode attention of one sequence over a contiguous KV cache. Query head i reads KV head
 * i / (n_q_heads / n_kv_heads). k, v: element (h, t, d) at h*head_stride + t*token_stride + d.
 * out: (n_q_heads, head_dim) f32. lse: optional (n_q_heads) log-sum-exp of the scaled scores. */
struct ckv_attn_full_args {
    int n_q_heads, n_kv_heads, head_dim, n_ctx;
    const float *q;
    const void *k, *v;
    enum ckv_dtype dtype;
    size_t head_stride, token_stride;
    float scale;
    float *out;
    float *lse;
};
int ckv_attn_decode_full(ckv_ctx_t *ctx, const struct ckv_attn_full_args *a);

/* A reference to n_tokens (1..16) leading tokens of one pool block. */
struct ckv_block_ref {
    int32_t slot;
    int32_t n_tokens;
};

/* Decode attention of one sequence over lists of blocks: the sparse path (sinks + selected
 * clusters + window, each as blocks) and, with every block listed, full attention.
 * List l serves query heads [l * heads_per_list, (l + 1) * heads_per_list), so
 * heads_per_list = 1 gives per-query-head selections and heads_per_list = group size one
 * selection per KV head. Exact softmax with an fp32 online softmax; an empty list gives a
 * zero output (and lse = -inf). */
struct ckv_attn_blocks_args {
    int n_q_heads, head_dim;
    int n_lists, heads_per_list;   /* n_q_heads == n_lists * heads_per_list */
    const float *q;                /* (n_q_heads, head_dim) f32 */
    const void *pool;              /* block pool */
    enum ckv_dtype dtype;
    const struct ckv_block_ref *refs;  /* every list's refs, list after list */
    const int32_t *list_offsets;       /* (n_lists + 1) into refs */
    float scale;
    float *out;                    /* (n_q_heads, head_dim) f32 */
    float *lse;                    /* optional (n_q_heads) */
};
int ckv_attn_decode_blocks(ckv_ctx_t *ctx, const struct ckv_attn_blocks_args *a);

/* Causal attention of a prefill chunk: n_new query tokens at positions pos0 .. pos0+n_new-1
 * attend to KV tokens 0 .. their own position (k, v hold at least pos0 + n_new tokens, laid
 * out as in ckv_attn_full_args). q, out: (n_new, n_q_heads, head_dim) f32. */
struct ckv_attn_prefill_args {
    int n_q_heads, n_kv_heads, head_dim;
    int n_new, pos0;
    const float *q;
    const void *k, *v;
    enum ckv_dtype dtype;
    size_t head_stride, token_stride;
    float scale;
    float *out;
};
int ckv_attn_prefill(ckv_ctx_t *ctx, const struct ckv_attn_prefill_args *a);

#endif
