/*
 * Plain scalar references of every kernel of kernels.h (STYLE.md rule 11): straightforward
 * loops in double precision over HOST memory, written for obviousness, never for speed. The
 * tests compare every backend and ISA against them with a stated tolerance; the evaluation
 * (ckv eval-attn) uses them as the ground truth of attention.
 *
 * Arguments are the kernels' own (same structs, same shapes), minus the context; pointers
 * the kernel reads as device memory are host pointers here. Each returns 0 or -EINVAL (the
 * references check only what they need to run safely; the kernels' checks are the contract).
 */
#ifndef CKV_REF_H
#define CKV_REF_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* Element i of a row of dtype dt, as double. */
double ckv_ref_elem(const void *row, enum ckv_dtype dt, size_t i);

/* Softmax attention of one query (head_dim, f32) over n chosen tokens (token indices into k
 * and v, rows token_stride elements apart): out (head_dim) and optionally lse. n == 0 gives a
 * zero output and lse = -inf. scale 0 means 1/sqrt(head_dim). */
int ckv_ref_attn_tokens(const float *q, const void *k, const void *v, enum ckv_dtype dtype,
                        int head_dim, size_t token_stride, const int32_t *tokens, int n,
                        float scale, float *out, float *lse);

int ckv_ref_attn_decode_full(const struct ckv_attn_full_args *a);
int ckv_ref_attn_decode_blocks(const struct ckv_attn_blocks_args *a);
int ckv_ref_attn_prefill(const struct ckv_attn_prefill_args *a);

int ckv_ref_pack_blocks(const void *k, const void *v, enum ckv_dtype dtype, int head_dim,
                        size_t token_stride, const int32_t *rows, int n_rows, void *pool,
                        const int32_t *slots);

/* The same algorithm as ckv_kmeans (k-means++ from the same splitmix64 stream over the unit
 * keys rounded to f16, spherical Lloyd iterations, empty clusters dropped, raw-mean
 * centroids), in double precision. */
int ckv_ref_kmeans(const void *keys, enum ckv_dtype dtype, int n_tokens, int head_dim,
                   size_t row_stride, int32_t pos_base, const struct ckv_kmeans_params *params,
                   struct ckv_kmeans_out *out, int *n_clusters_host, int *n_iter_host);

/* Scores every cluster (double), sorts them all (ties: lower index), takes them to the
 * budget. Writes the same outputs as ckv_select_clusters; scores, when asked for, as f32. */
int ckv_ref_select_clusters(const struct ckv_select_args *a);

int ckv_ref_quest_page_bounds(const void *keys, enum ckv_dtype dtype, int n_tokens, int head_dim,
                              size_t row_stride, float *page_min, float *page_max);
int ckv_ref_quest_select(const struct ckv_quest_args *a);
int ckv_ref_oracle_topk(const float *q, const void *k, enum ckv_dtype dtype, int n_q_heads,
                        int n_kv_heads, int head_dim, int n_ctx, size_t head_stride,
                        size_t token_stride, int budget, int32_t *sel_tokens);

#endif
