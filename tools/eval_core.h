/*
 * The logic of `ckv eval` that does not need a model run (tools/cmd_eval.c drives the engine):
 * negative log-likelihood and perplexity from logits, the method variants the evaluation
 * compares, comma-separated option lists, and the retrieval prompts (passkey and the copy
 * task) with their answer checks. Library ckv_eval, tested by tests/tools/test_eval.c.
 */
#ifndef CKV_EVAL_CORE_H
#define CKV_EVAL_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "ckv_buf.h"
#include "kvcache.h"
#include "tokenizer.h"

/* ---- perplexity ---- */

/* -log softmax(logits)[target], in double with the max subtracted (so large logits neither
 * overflow nor lose the target's share). NAN when target is out of range or a logit is not
 * finite. */
double ckv_eval_nll(const float *logits, int n_vocab, int32_t target);

/* Index of the largest logit (the first of equal ones); -1 when n_vocab < 1. */
int32_t ckv_eval_argmax(const float *logits, int n_vocab);

/* Accumulated NLL of a run: perplexity = exp(mean NLL). */
struct ckv_eval_ppl {
    double nll_sum;
    long n;
};
void ckv_eval_ppl_add(struct ckv_eval_ppl *p, double nll);
/* exp(nll_sum / n); NAN when n == 0. */
double ckv_eval_ppl_value(const struct ckv_eval_ppl *p);

/* ---- option lists ---- */

/* "128,256,512" -> out[0..*n). Each value in [lo, hi]; -EINVAL on a bad or empty list, more
 * than cap values, or a value out of bounds. */
int ckv_eval_parse_ints(const char *s, int lo, int hi, int *out, int cap, int *n);
/* "0.1,0.5" as above, values in [lo, hi]. */
int ckv_eval_parse_doubles(const char *s, double lo, double hi, double *out, int cap, int *n);

/* ---- the compared methods ---- */

/* A method as the evaluation names it: the KV method and, for ClusterKV, the GQA selection
 * mode (select_mode < 0: the engine's default). */
struct ckv_eval_method {
    char name[24];
    enum ckv_kv_method method;
    int select_mode; /* enum ckv_select_mode, or -1 */
};

/* Names: full, clusterkv (the engine's default selection mode), clusterkv-q (per query
 * head, the authors'), clusterkv-kv (per KV head, max over the group), clusterkv-kvsum (per
 * KV head, sum), quest, streaming. Returns 0 or -EINVAL. */
int ckv_eval_method_parse(const char *name, struct ckv_eval_method *out);

/* A comma-separated list of the names above; -EINVAL (err names the bad one). */
int ckv_eval_methods_parse(const char *s, struct ckv_eval_method *out, int cap, int *n, char *err,
                           size_t errlen);

/* ---- retrieval prompts ---- */

enum ckv_eval_task {
    CKV_EVAL_PASSKEY = 0, /* a 5-digit pass key hidden in filler text, asked for at the end */
    CKV_EVAL_COPY = 1,    /* a list of random words hidden in filler text; at the end its
                             first words are repeated and the model must continue the list */
};

/* "passkey", "copy"; parse returns -EINVAL for other names. */
const char *ckv_eval_task_name(enum ckv_eval_task t);
int ckv_eval_task_parse(const char *s, enum ckv_eval_task *out);

#define CKV_EVAL_COPY_WORDS 24 /* words in the hidden list */
#define CKV_EVAL_COPY_SHOWN 4  /* of which the prompt repeats the first ones */

struct ckv_eval_needle {
    enum ckv_eval_task task;
    double depth;  /* where the needle sits in the filler: 0 the start, 1 the end */
    uint64_t seed; /* chooses the pass key / the words */
};

/* The text of a retrieval prompt with n_filler filler sentences. prompt gets what the model
 * reads; full (copy task; may be NULL for passkey) the prompt followed by the rest of the
 * list, whose tokens after the prompt's are the expected continuation; answer the pass key
 * digits (passkey task; "" for copy). Returns 0, -EINVAL or -ENOMEM. */
int ckv_eval_needle_text(const struct ckv_eval_needle *nd, int n_filler, struct ckv_buf *prompt,
                         struct ckv_buf *full, char *answer, size_t answer_cap);

/* A tokenized retrieval prompt. */
struct ckv_eval_prompt {
    int32_t *tokens; /* (n) the prompt; owned */
    int n;
    char answer[16]; /* passkey: the digits to find */
    int32_t *expect; /* copy: (n_expect) the continuation the model should predict; owned */
    int n_expect;
};

/* Builds the prompt of at most target_tokens tokens (the most filler that fits) for nd with
 * tok. Returns 0, -EINVAL (target too small for the fixed text: err says how small), or
 * CKV_EFORMAT when the tokenization of the continuation does not extend the prompt's. */
int ckv_eval_needle_prompt(const tokenizer_t *tok, const struct ckv_eval_needle *nd,
                           int target_tokens, struct ckv_eval_prompt *out, char *err,
                           size_t errlen);
void ckv_eval_prompt_free(struct ckv_eval_prompt *p);

/* Writes the first run of decimal digits in text[0..len) to out (NUL-terminated, truncated
 * to cap - 1). Returns the digit count (0: none). */
int ckv_eval_first_number(const char *text, size_t len, char *out, size_t cap);

/* ---- JSON ---- */

/* Appends `"key": value` to a flat JSON object being built in b (the caller writes "{" and
 * "}"); non-finite values are written as null. first: no comma before. */
void ckv_eval_json_num(struct ckv_buf *b, int *first, const char *key, double value);

#endif
