/*
 * Choosing the next token from logits: greedy (temperature 0) or random with temperature,
 * top-k and top-p (nucleus) filtering, in llama.cpp's order (top-k, then top-p over the
 * tempered softmax of what is left). Random draws come from the project's splitmix64 stream
 * (kernels/ckv_rng.h) seeded by the caller: the same seed and logits give the same tokens on
 * every machine. Also the end conditions of a generation: stop tokens and a token limit.
 *
 * A sampler is caller-owned (struct on the stack); init allocates its candidate scratch for a
 * vocabulary, free releases it. One per sequence.
 */
#ifndef CKV_SAMPLER_H
#define CKV_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CKV_SAMPLER_MAX_STOP 64

struct ckv_sampler_opts {
    float temperature; /* <= 0: greedy (argmax, the lowest id on ties); default 0 */
    int top_k;         /* keep the k most likely; 0: all */
    float top_p;       /* keep the smallest set whose probability reaches p; 1: all */
    uint64_t seed;
    int max_tokens;                     /* generation ends after this many tokens; 0: no limit */
    int32_t stop[CKV_SAMPLER_MAX_STOP]; /* stop tokens (end of generation) */
    int n_stop;
};

/* Greedy, no limit, no stop tokens, seed 0. */
void ckv_sampler_opts_default(struct ckv_sampler_opts *o);

struct ckv_sampler_cand {
    int32_t id;
    float logit;
};

struct ckv_sampler {
    struct ckv_sampler_opts o;
    int n_vocab;
    uint64_t rng;                  /* splitmix64 state */
    int n_sampled;                 /* tokens accepted so far */
    struct ckv_sampler_cand *cand; /* (n_vocab) scratch */
};

/* Checks o (temperature finite, top_k >= 0, 0 < top_p <= 1, max_tokens >= 0, n_stop in
 * range) and allocates the scratch. Returns 0, -EINVAL (err says which option) or -ENOMEM. */
int ckv_sampler_init(struct ckv_sampler *s, const struct ckv_sampler_opts *o, int n_vocab,
                     char *err, size_t errlen);
void ckv_sampler_free(struct ckv_sampler *s);

/* The next token from logits (n_vocab) f32. NaN logits are never chosen (all NaN: id 0). */
int32_t ckv_sampler_sample(struct ckv_sampler *s, const float *logits);

enum ckv_sampler_end {
    CKV_SAMPLER_GO = 0,    /* keep generating */
    CKV_SAMPLER_STOP = 1,  /* id is a stop token (not to be shown) */
    CKV_SAMPLER_LIMIT = 2, /* id is the last token allowed (show it) */
};

/* Records that id was generated and says whether generation ends with it. */
enum ckv_sampler_end ckv_sampler_accept(struct ckv_sampler *s, int32_t id);

#endif
