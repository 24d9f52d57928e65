/*
 * The model-free logic of `ckv eval`: NLL and perplexity from logits, option lists, the
 * method variants, and the retrieval prompts. See eval_core.h.
 */
#include "eval_core.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_rng.h"

/* ---- perplexity ---- */

double ckv_eval_nll(const float *logits, int n_vocab, int32_t target)
{
    if (!logits || n_vocab < 1 || target < 0 || target >= n_vocab)
        return NAN;
    double mx = -INFINITY;
    for (int i = 0; i < n_vocab; i++) {
        if (!isfinite(logits[i]))
            return NAN;
        if (logits[i] > mx)
            mx = logits[i];
    }
    double s = 0;
    for (int i = 0; i < n_vocab; i++)
        s += exp((double)logits[i] - mx);
    return log(s) - ((double)logits[target] - mx);
}

int32_t ckv_eval_argmax(const float *logits, int n_vocab)
{
    if (!logits || n_vocab < 1)
        return -1;
    int32_t best = 0;
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > logits[best])
            best = i;
    return best;
}

void ckv_eval_ppl_add(struct ckv_eval_ppl *p, double nll)
{
    p->nll_sum += nll;
    p->n++;
}

double ckv_eval_ppl_value(const struct ckv_eval_ppl *p)
{
    return p->n > 0 ? exp(p->nll_sum / (double)p->n) : NAN;
}

/* ---- option lists ---- */

int ckv_eval_parse_ints(const char *s, int lo, int hi, int *out, int cap, int *n)
{
    *n = 0;
    if (!s || !*s)
        return -EINVAL;
    while (*s) {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < lo || v > hi || *n == cap || (*end && *end != ','))
            return -EINVAL;
        out[(*n)++] = (int)v;
        s = *end ? end + 1 : end;
        if (*end && !*s)
            return -EINVAL; /* trailing comma */
    }
    return 0;
}

int ckv_eval_parse_doubles(const char *s, double lo, double hi, double *out, int cap, int *n)
{
    *n = 0;
    if (!s || !*s)
        return -EINVAL;
    while (*s) {
        char *end;
        double v = strtod(s, &end);
        if (end == s || !(v >= lo && v <= hi) || *n == cap || (*end && *end != ','))
            return -EINVAL;
        out[(*n)++] = v;
        s = *end ? end + 1 : end;
        if (*end && !*s)
            return -EINVAL;
    }
    return 0;
}

/* ---- methods ---- */

static const struct ckv_eval_method eval_methods[] = {
    {"full", CKV_KV_FULL, -1},
    {"clusterkv", CKV_KV_CLUSTERKV, -1},
    {"clusterkv-q", CKV_KV_CLUSTERKV, CKV_SELECT_PER_QHEAD},
    {"clusterkv-kv", CKV_KV_CLUSTERKV, CKV_SELECT_KVHEAD_MAX},
    {"clusterkv-kvsum", CKV_KV_CLUSTERKV, CKV_SELECT_KVHEAD_SUM},
    {"quest", CKV_KV_QUEST, -1},
    {"streaming", CKV_KV_STREAMING, -1},
};

int ckv_eval_method_parse(const char *name, struct ckv_eval_method *out)
{
    for (size_t i = 0; i < sizeof(eval_methods) / sizeof(eval_methods[0]); i++)
        if (strcmp(name, eval_methods[i].name) == 0) {
            *out = eval_methods[i];
            return 0;
        }
    return -EINVAL;
}

int ckv_eval_methods_parse(const char *s, struct ckv_eval_method *out, int cap, int *n, char *err,
                           size_t errlen)
{
    char buf[512];
    *n = 0;
    if (snprintf(buf, sizeof(buf), "%s", s) >= (int)sizeof(buf))
        return ckv_errorf(-EINVAL, err, errlen, "method list too long");
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (*n == cap)
            return ckv_errorf(-EINVAL, err, errlen, "more than %d methods", cap);
        if (ckv_eval_method_parse(t, &out[*n]))
            return ckv_errorf(-EINVAL, err, errlen,
                              "unknown method '%s' (full, clusterkv, clusterkv-q, clusterkv-kv, "
                              "clusterkv-kvsum, quest, streaming)",
                              t);
        (*n)++;
    }
    return *n ? 0 : ckv_errorf(-EINVAL, err, errlen, "empty method list");
}

/* ---- retrieval prompts ---- */

const char *ckv_eval_task_name(enum ckv_eval_task t)
{
    return t == CKV_EVAL_PASSKEY ? "passkey" : t == CKV_EVAL_COPY ? "copy" : "?";
}

int ckv_eval_task_parse(const char *s, enum ckv_eval_task *out)
{
    if (strcmp(s, "passkey") == 0)
        *out = CKV_EVAL_PASSKEY;
    else if (strcmp(s, "copy") == 0)
        *out = CKV_EVAL_COPY;
    else
        return -EINVAL;
    return 0;
}

/* The passkey prompt of the long-context literature (Mohtashami and Jaggi's landmark
 * attention test): irrelevant sentences repeated, the key stated once. */
static const char passkey_intro[] =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n";
static const char passkey_filler[] =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
static const char passkey_question[] = "\n\nWhat is the pass key? The pass key is";

/* The copy task: words a small model cannot guess from context, so continuing the list needs
 * the list itself (an induction-head copy over a long distance). Common words, each one token
 * after a space in BPE vocabularies of English. */
static const char *const copy_words[] = {
    "apple",  "river",  "stone",  "garden", "window", "yellow", "silver", "candle", "forest",
    "butter", "pencil", "rabbit", "castle", "engine", "guitar", "planet", "pocket", "rocket",
    "shadow", "tunnel", "violin", "wallet", "anchor", "basket", "bottle", "bridge", "carpet",
    "circle", "cotton", "desert", "dragon", "finger", "flower", "hammer", "island", "jacket",
    "kitten", "ladder", "magnet", "market", "meadow", "mirror", "monkey", "needle", "orange",
    "pepper", "pillow", "rubber", "saddle", "spider", "statue", "summer", "ticket", "tomato",
    "turtle", "valley", "winter", "doctor", "farmer", "letter", "coffee", "cheese", "cookie",
    "jungle", "lemon",  "horse",  "chair",  "table",  "cloud",  "train",  "truck",  "piano",
    "tiger",  "zebra",  "ocean",  "sugar",  "bread",  "glass",  "metal",  "paper",  "plant",
    "queen",  "king",   "music",  "radio",  "storm",  "snake",  "sheep",  "mouse",  "shirt",
};
#define N_COPY_WORDS ((int)(sizeof(copy_words) / sizeof(copy_words[0])))
static const char copy_intro[] =
    "Below is a long text. Somewhere in it there is a list of words. Remember the list: at "
    "the end you will have to repeat it.\n\n";
static const char copy_question[] = "\n\nRepeat the list of words. The list was:";

int ckv_eval_needle_text(const struct ckv_eval_needle *nd, int n_filler, struct ckv_buf *prompt,
                         struct ckv_buf *full, char *answer, size_t answer_cap)
{
    if (!nd || !prompt || n_filler < 0 || !(nd->depth >= 0 && nd->depth <= 1) ||
        (nd->task != CKV_EVAL_PASSKEY && nd->task != CKV_EVAL_COPY) ||
        (nd->task == CKV_EVAL_COPY && !full))
        return -EINVAL;
    uint64_t rng = nd->seed * 0x9E3779B97F4A7C15ull + 12345;
    int at = (int)lround(nd->depth * n_filler);
    char needle[512];
    int words[CKV_EVAL_COPY_WORDS];
    if (answer && answer_cap)
        answer[0] = 0;
    if (nd->task == CKV_EVAL_PASSKEY) {
        int key = 10000 + (int)(ckv_rng_next(&rng) % 90000);
        snprintf(needle, sizeof(needle), "The pass key is %d. Remember it. %d is the pass key. ",
                 key, key);
        if (answer && answer_cap)
            snprintf(answer, answer_cap, "%d", key);
    } else {
        /* distinct words: a repeated word would make the continuation ambiguous */
        int n = 0;
        while (n < CKV_EVAL_COPY_WORDS) {
            int w = (int)(ckv_rng_next(&rng) % N_COPY_WORDS), dup = 0;
            for (int j = 0; j < n; j++)
                dup |= words[j] == w;
            if (!dup)
                words[n++] = w;
        }
        size_t o = (size_t)snprintf(needle, sizeof(needle), "The list of words is:");
        for (int i = 0; i < CKV_EVAL_COPY_WORDS; i++)
            o += (size_t)snprintf(needle + o, sizeof(needle) - o, " %s", copy_words[words[i]]);
        snprintf(needle + o, sizeof(needle) - o, ". ");
    }
    ckv_buf_reset(prompt);
    ckv_buf_printf(prompt, "%s", nd->task == CKV_EVAL_PASSKEY ? passkey_intro : copy_intro);
    for (int i = 0; i <= n_filler; i++) {
        if (i == at)
            ckv_buf_printf(prompt, "%s", needle);
        if (i < n_filler)
            ckv_buf_printf(prompt, "%s", passkey_filler);
    }
    if (nd->task == CKV_EVAL_PASSKEY) {
        ckv_buf_printf(prompt, "%s", passkey_question);
    } else {
        ckv_buf_printf(prompt, "%s", copy_question);
        for (int i = 0; i < CKV_EVAL_COPY_SHOWN; i++)
            ckv_buf_printf(prompt, " %s", copy_words[words[i]]);
        ckv_buf_reset(full);
        ckv_buf_append(full, prompt->data, prompt->len);
        for (int i = CKV_EVAL_COPY_SHOWN; i < CKV_EVAL_COPY_WORDS; i++)
            ckv_buf_printf(full, " %s", copy_words[words[i]]);
        if (full->oom)
            return -ENOMEM;
    }
    return prompt->oom ? -ENOMEM : 0;
}

void ckv_eval_prompt_free(struct ckv_eval_prompt *p)
{
    free(p->tokens);
    free(p->expect);
    memset(p, 0, sizeof(*p));
}

/* Tokenizes the prompt of n_filler sentences (and the copy task's continuation). */
static int needle_tokens(const tokenizer_t *tok, const struct ckv_eval_needle *nd, int n_filler,
                         struct ckv_eval_prompt *out, char *err, size_t errlen)
{
    struct ckv_buf prompt = {0}, full = {0};
    int32_t *ft = NULL;
    int nf = 0;
    ckv_eval_prompt_free(out);
    int rc = ckv_eval_needle_text(nd, n_filler, &prompt, &full, out->answer, sizeof(out->answer));
    if (!rc)
        rc = tokenizer_encode_alloc(tok, prompt.data, prompt.len, true, false, &out->tokens,
                                    &out->n);
    if (!rc && nd->task == CKV_EVAL_COPY) {
        rc = tokenizer_encode_alloc(tok, full.data, full.len, true, false, &ft, &nf);
        /* the continuation is what follows the prompt's tokens: the prompt must tokenize
         * as a prefix of the full text (it does when words start with a space) */
        if (!rc && (nf <= out->n || memcmp(ft, out->tokens, sizeof(int32_t) * out->n) != 0))
            rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                            "copy task: the prompt's tokens are not a prefix of the listed "
                            "words' tokens with this tokenizer");
        if (!rc) {
            out->n_expect = nf - out->n;
            out->expect = malloc(sizeof(int32_t) * out->n_expect);
            if (!out->expect)
                rc = -ENOMEM;
            else
                memcpy(out->expect, ft + out->n, sizeof(int32_t) * out->n_expect);
        }
    }
    if (rc && rc != CKV_EFORMAT)
        ckv_errorf(rc, err, errlen, "retrieval prompt: %s", ckv_strerror(rc));
    free(ft);
    ckv_buf_free(&prompt);
    ckv_buf_free(&full);
    return rc;
}

int ckv_eval_needle_prompt(const tokenizer_t *tok, const struct ckv_eval_needle *nd,
                           int target_tokens, struct ckv_eval_prompt *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    /* the token count grows linearly with the filler: measure 0 and 8 sentences, solve for
     * the count, then step down until it fits (joins at sentence boundaries may merge) */
    int rc = needle_tokens(tok, nd, 0, out, err, errlen);
    if (rc)
        return rc;
    int n0 = out->n;
    if (n0 + 8 > target_tokens) {
        ckv_eval_prompt_free(out);
        return ckv_errorf(-EINVAL, err, errlen,
                          "retrieval prompt: %d tokens is too short (the fixed text alone takes "
                          "%d)",
                          target_tokens, n0);
    }
    if ((rc = needle_tokens(tok, nd, 8, out, err, errlen)))
        return rc;
    double per = (out->n - n0) / 8.0;
    int k = (int)((target_tokens - n0) / per) + 1;
    for (;;) {
        if ((rc = needle_tokens(tok, nd, k, out, err, errlen)))
            return rc;
        if (out->n <= target_tokens || k == 0)
            break;
        k--;
    }
    return 0;
}

int ckv_eval_first_number(const char *text, size_t len, char *out, size_t cap)
{
    size_t i = 0, n = 0;
    while (i < len && !(text[i] >= '0' && text[i] <= '9'))
        i++;
    for (; i < len && text[i] >= '0' && text[i] <= '9'; i++, n++)
        if (cap && n + 1 < cap)
            out[n] = text[i];
    if (cap)
        out[n + 1 < cap ? n : cap - 1] = 0;
    return (int)n;
}

/* ---- JSON ---- */

void ckv_eval_json_num(struct ckv_buf *b, int *first, const char *key, double value)
{
    ckv_buf_printf(b, "%s\n  \"%s\": ", *first ? "" : ",", key);
    if (isfinite(value))
        ckv_buf_printf(b, "%.6g", value);
    else
        ckv_buf_printf(b, "null");
    *first = 0;
}
