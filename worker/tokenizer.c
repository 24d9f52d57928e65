/*
 * Tokenizer (see tokenizer.h). The reference is llama.cpp's src/llama-vocab.cpp and
 * src/unicode.cpp: where this file makes a choice, it is to produce the same ids as llama.cpp
 * on the same GGUF, and each deliberate difference is said where it is made.
 *
 * Encoding, both kinds:
 *   1. special-token partition: the text is cut at every occurrence of a special token's text,
 *      longest token first (fragments: raw text or one token id);
 *   2. each raw fragment is tokenized on its own:
 *      BPE: sanitize (llama.cpp reads invalid UTF-8 bytes as U+FFFD), split by the
 *           pre-tokenizer regexes (each regex refines the pieces of the previous one; text
 *           between matches is a piece too), map each piece's bytes to GPT-2's printable code
 *           points, merge adjacent symbols lowest merge rank first (leftmost on ties);
 *      SPM: " " -> "▁" (with a leading "▁" when add_space_prefix and the fragment starts the
 *           text or follows a special token), merge adjacent UTF-8 symbols whose concatenation
 *           is a token, highest score first (leftmost on ties), then byte fallback <0xNN> for
 *           symbols that are no token.
 *
 * Data: token texts live in one arena; a hash table maps text -> id; BPE merges are a hash
 * table keyed by (left id, right id) -> (rank, merged id); decoded pieces of every token are
 * precomputed (llama.cpp's token_to_piece cache).
 */
#include "tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "ckv_error.h"
#include "ckv_log.h"

#define PRE_MAX_REGEX 6
#define TOKEN_MAX_LEN (1u << 20) /* a token text longer than 1 MiB is a broken vocabulary */
#define TEXT_MAX_LEN  ((size_t)256 << 20) /* encode input bound: symbol indices are int32 */
#define MAX_MERGES    (1 << 24)           /* ranks are queued as float priorities: exact to 2^24 */

/* ------------------------------------------------------------------------------------------ */
/* pre-tokenizers                                                                              */
/* ------------------------------------------------------------------------------------------ */

/*
 * llama.cpp's regexes per tokenizer.ggml.pre (llm_tokenizer_bpe's constructor), written for
 * PCRE2. Two things are spelled out rather than left to PCRE2:
 *  - whitespace: llama.cpp's \s is Unicode's White_Space property (its unicode_set_whitespace);
 *    PCRE2 10.42's \s with UCP also matches U+180E (White_Space until Unicode 6.3), so \s is
 *    written as this class;
 *  - the GPT-2 regex ends with |\s+ here: llama.cpp runs that regex through a hand-written
 *    matcher (unicode_regex_split_custom_gpt2) which has that alternative; the text between
 *    matches becomes a piece anyway, so this changes nothing but the matcher's work.
 * Capturing groups are written non-capturing (llama.cpp uses std::regex with nosubs).
 */
#define WS_CHARS                                                                                   \
    "\\t-\\r "                                                                                     \
    "\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"
#define RE_S        "[" WS_CHARS "]"
#define RE_NS       "[^" WS_CHARS "]"
#define RE_NOT_SLN  "[^" WS_CHARS "\\p{L}\\p{N}]"
#define RE_CONTRACT "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RE_WS_TAIL  "|" RE_S "*[\\r\\n]+|" RE_S "+(?!" RE_NS ")|" RE_S "+"

/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
#define RE_GPT2                                                                                    \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?" RE_NOT_SLN "+|" RE_S "+(?!" RE_NS ")|" RE_S "+"
/* (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|... */
#define RE_LLAMA3_WITH(num)                                                                        \
    RE_CONTRACT "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|" num "| ?" RE_NOT_SLN "+[\\r\\n]*" RE_WS_TAIL
/* GPT-4o / Tekken: an upper-case run then a lower-case run, llama.cpp's adaptation: a letter
 * that is not a-z counts as upper, one that is not A-Z as lower (non-ASCII letters are both). */
#define RE_UP "(?:(?=\\p{L})[^a-z])"
#define RE_LO "(?:(?=\\p{L})[^A-Z])"
#define RE_GPT4O_WITH(contract, num)                                                               \
    "[^\\r\\n\\p{L}\\p{N}]?" RE_UP "*" RE_LO "+" contract "|[^\\r\\n\\p{L}\\p{N}]?" RE_UP          \
    "+" RE_LO "*" contract "|" num "| ?" RE_NOT_SLN "+[\\r\\n/]*" RE_WS_TAIL

struct pre_def {
    const char *names[12];                /* tokenizer.ggml.pre values, NULL-terminated */
    const char *regex[PRE_MAX_REGEX + 1]; /* applied in order, NULL-terminated */
    bool ignore_merges;                   /* a piece that is a whole token is taken as is */
    bool add_bos;                         /* default of add_bos_token */
};

static const struct pre_def PRE_DEFS[] = {
    {.names = {"default"},
     .regex = {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"}},
    {.names = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
               "lfm2"},
     .regex = {RE_LLAMA3_WITH("\\p{N}{1,3}")},
     .ignore_merges = true,
     .add_bos = true},
    {.names = {"dbrx", "smaug-bpe", "glm4", "chatglm-bpe"},
     .regex = {RE_LLAMA3_WITH("\\p{N}{1,3}")}},
    {.names = {"qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"},
     .regex = {RE_LLAMA3_WITH("\\p{N}")}},
    {.names = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"},
     .regex = {"\\p{N}", RE_GPT2}},
    {.names = {"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
               "mpt", "olmo", "jais", "exaone4"},
     .regex = {RE_GPT2}},
    {.names = {"falcon"}, .regex = {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]"}},
    {.names = {"deepseek-coder"},
     .regex = {"[\\r\\n]", RE_S "?\\p{L}+", RE_S "?\\p{P}+",
               "[\\x{4e00}-\\x{9fa5}\\x{0800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+", "\\p{N}"}},
    {.names = {"poro-chat", "bloom", "gpt3-finnish"},
     .regex = {" ?[^(" WS_CHARS "|.,!?\\x{2026}\\x{3002}\\x{ff0c}\\x{3001}\\x{964}\\x{6d4}"
               "\\x{60c})]+"}},
    {.names = {"gpt-4o", "llama4"}, .regex = {RE_GPT4O_WITH(RE_CONTRACT "?", "\\p{N}{1,3}")}},
    {.names = {"tekken"},
     .regex = {RE_GPT4O_WITH("", "\\p{N}")},
     .ignore_merges = true,
     .add_bos = true},
    {.names = {"seed-coder"},
     .regex = {RE_CONTRACT "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^" WS_CHARS
                           "\\p{L}\\p{N}\\r\\n]+" RE_WS_TAIL}},
};

static const struct pre_def *pre_find(const char *name)
{
    for (size_t i = 0; i < CKV_ARRAY_LEN(PRE_DEFS); i++)
        for (int j = 0; PRE_DEFS[i].names[j]; j++)
            if (strcmp(PRE_DEFS[i].names[j], name) == 0)
                return &PRE_DEFS[i];
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* the tokenizer                                                                               */
/* ------------------------------------------------------------------------------------------ */

struct tok_entry {
    uint32_t text_off, text_len;   /* into tokenizer.text */
    uint32_t piece_off, piece_len; /* into tokenizer.pieces: the decoded bytes */
    float score;
    uint8_t type; /* enum tokenizer_token_type, after the EOG/FIM fix-ups */
    bool eog;
};

struct merge_slot {
    uint64_t key; /* (left id << 32) | right id; UINT64_MAX = empty */
    int32_t rank;
    int32_t result; /* id of the merged token */
};

struct tokenizer {
    enum tokenizer_kind kind;
    char pre_name[64];
    int32_t n_tokens;
    struct tok_entry *tok; /* (n_tokens) */
    char *text;            /* token texts, back to back */
    char *pieces;          /* decoded pieces, back to back */
    uint32_t max_token_len;

    int32_t *text_hash; /* open addressing: id or -1; (text_hash_mask + 1) slots */
    uint64_t text_hash_mask;

    struct merge_slot *merge_hash; /* BPE only; (merge_mask + 1) slots */
    uint64_t merge_mask;

    pcre2_code *re[PRE_MAX_REGEX];
    int n_re;
    bool ignore_merges;

    /* ids of the CONTROL / USER_DEFINED / UNKNOWN tokens, longest text first */
    int32_t *special; /* (n_special) */
    int n_special;

    int32_t bos, eos, eot, eom, unk, pad;
    bool add_bos, add_eos, add_space_prefix;

    /* BPE: byte b <-> code point of GPT-2's bytes_to_unicode; id of the one-symbol token */
    char byte_utf8[256][2];
    uint8_t byte_utf8_len[256];
    int32_t byte_tok[256];
    int16_t cp_byte[324]; /* code point (< 324) -> byte, -1 when not a byte's code point */
    /* SPM: byte fallback token of each byte (<0xNN>, else the one-byte token, else -1) */
    int32_t spm_byte_tok[256];
};

/* FNV-1a, 64 bit: token texts are short and this is not on a hot path worth more. */
static uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static inline const char *tok_text(const tokenizer_t *t, int32_t id)
{
    return t->text + t->tok[id].text_off;
}

int32_t tokenizer_find(const tokenizer_t *t, const char *text, size_t len)
{
    if (len == 0 || len > t->max_token_len)
        return TOKENIZER_NULL;
    for (uint64_t h = hash_bytes(text, len) & t->text_hash_mask;; h = (h + 1) & t->text_hash_mask) {
        int32_t id = t->text_hash[h];
        if (id < 0)
            return TOKENIZER_NULL;
        if (t->tok[id].text_len == len && memcmp(tok_text(t, id), text, len) == 0)
            return id;
    }
}

/* Returns the rank of merging (left, right) and the merged id, or -1. */
static int32_t merge_find(const tokenizer_t *t, int32_t left, int32_t right, int32_t *result)
{
    uint64_t key = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    for (uint64_t h = hash_u64(key) & t->merge_mask;; h = (h + 1) & t->merge_mask) {
        const struct merge_slot *s = &t->merge_hash[h];
        if (s->key == UINT64_MAX)
            return -1;
        if (s->key == key) {
            *result = s->result;
            return s->rank;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* UTF-8                                                                                        */
/* ------------------------------------------------------------------------------------------ */

static size_t utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/*
 * Decodes one code point the way llama.cpp's unicode_cpt_from_utf8 does: lead byte and
 * continuation bytes are checked, overlong forms and surrogates are accepted. Returns the
 * number of bytes used, or 0 for an invalid sequence (llama.cpp then reads one byte as
 * U+FFFD). Code points above U+10FFFF (which make llama.cpp abort) are invalid here.
 */
static size_t utf8_decode_lax(const uint8_t *s, size_t n, uint32_t *cp)
{
    uint8_t b = s[0];
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    if (!(b & 0x40))
        return 0;
    if (!(b & 0x20)) {
        if (n < 2 || (s[1] & 0xc0) != 0x80)
            return 0;
        *cp = ((uint32_t)(b & 0x1f) << 6) | (s[1] & 0x3f);
        return 2;
    }
    if (!(b & 0x10)) {
        if (n < 3 || (s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80)
            return 0;
        *cp = ((uint32_t)(b & 0x0f) << 12) | ((uint32_t)(s[1] & 0x3f) << 6) | (s[2] & 0x3f);
        return 3;
    }
    if (!(b & 0x08)) {
        if (n < 4 || (s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80 || (s[3] & 0xc0) != 0x80)
            return 0;
        uint32_t c = ((uint32_t)(b & 0x07) << 18) | ((uint32_t)(s[1] & 0x3f) << 12) |
                     ((uint32_t)(s[2] & 0x3f) << 6) | (s[3] & 0x3f);
        if (c > 0x10ffff)
            return 0;
        *cp = c;
        return 4;
    }
    return 0;
}

/* Length of a UTF-8 sequence from its lead byte, as llama.cpp's unicode_len_utf8 (1 for
 * continuation bytes, 4 for 0xf0..0xff). */
static size_t utf8_len_lead(uint8_t b)
{
    static const uint8_t lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lookup[b >> 4];
}

/* ------------------------------------------------------------------------------------------ */
/* growable arrays for one encode call                                                         */
/* ------------------------------------------------------------------------------------------ */

struct ivec {
    int32_t *v;
    size_t n, cap;
};

static int ivec_push(struct ivec *a, int32_t x)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        int32_t *v = realloc(a->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = c;
    return 0;
}

/* a piece of text: [off, off + len) of some buffer; token >= 0 for a special token */
struct span {
    size_t off, len;
    int32_t token;
};

struct spans {
    struct span *v;
    size_t n, cap;
};

static int spans_push(struct spans *a, size_t off, size_t len, int32_t token)
{
    if (grow((void **)&a->v, &a->cap, a->n + 1, sizeof(*a->v)) < 0)
        return -ENOMEM;
    a->v[a->n++] = (struct span){off, len, token};
    return 0;
}

/* a symbol of a word being merged: [off, off + len) of the word, linked to its neighbours */
struct sym {
    int32_t prev, next;
    uint32_t off, len;
    int32_t id; /* BPE: the token it is (-1: none); SPM: unused */
};

/* a candidate merge of symbols left and left's next (right) */
struct cand {
    float score; /* SPM: token score (highest first); BPE: -rank (lowest rank first) */
    int32_t left, right;
    int32_t result;   /* BPE: merged id; SPM: merged length in bytes */
    int32_t right_id; /* BPE: the right symbol's id when queued (it changes if it merges) */
};

/* max-heap on (score, -left): the best score, leftmost on ties */
static bool cand_before(const struct cand *a, const struct cand *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

struct heap {
    struct cand *v;
    size_t n, cap;
};

static int heap_push(struct heap *h, struct cand c)
{
    if (grow((void **)&h->v, &h->cap, h->n + 1, sizeof(*h->v)) < 0)
        return -ENOMEM;
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_before(&c, &h->v[p]))
            break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = c;
    return 0;
}

static struct cand heap_pop(struct heap *h)
{
    struct cand top = h->v[0];
    struct cand last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, best = i;
        const struct cand *bc = &last;
        if (l < h->n && cand_before(&h->v[l], bc)) {
            best = l;
            bc = &h->v[l];
        }
        if (r < h->n && cand_before(&h->v[r], bc))
            best = r;
        if (best == i)
            break;
        h->v[i] = h->v[best];
        i = best;
    }
    if (h->n)
        h->v[i] = last;
    return top;
}

/* Scratch of one encode call (encode is reentrant: nothing lives in the tokenizer). */
struct work {
    const tokenizer_t *t;
    struct ivec out;
    struct spans frags, words, words2;
    char *buf; /* sanitized text (BPE) or escaped text (SPM) */
    size_t buf_cap;
    char *shadow; /* BPE: buf with surrogates replaced, for PCRE2 */
    size_t shadow_cap;
    char *enc; /* byte-level encoded word (ignore_merges) */
    size_t enc_cap;
    struct sym *syms;
    size_t syms_cap;
    struct heap heap;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
};

static void work_free(struct work *w)
{
    free(w->out.v);
    free(w->frags.v);
    free(w->words.v);
    free(w->words2.v);
    free(w->buf);
    free(w->shadow);
    free(w->enc);
    free(w->syms);
    free(w->heap.v);
    if (w->md)
        pcre2_match_data_free(w->md);
    if (w->mctx)
        pcre2_match_context_free(w->mctx);
    if (w->jit)
        pcre2_jit_stack_free(w->jit);
}

/* ------------------------------------------------------------------------------------------ */
/* merging, both kinds                                                                          */
/* ------------------------------------------------------------------------------------------ */

/*
 * Queues the merge of symbol left with its right neighbour, if there is one: BPE when the two
 * ids have a merge (priority: lowest rank), SPM when their concatenated text is a token
 * (priority: highest score).
 */
static int add_cand(struct work *w, int32_t left, bool bpe)
{
    struct sym *s = w->syms;
    if (left < 0 || s[left].next < 0)
        return 0;
    int32_t right = s[left].next;
    if (bpe) {
        if (s[left].id < 0 || s[right].id < 0)
            return 0;
        int32_t result;
        int32_t rank = merge_find(w->t, s[left].id, s[right].id, &result);
        if (rank < 0)
            return 0;
        return heap_push(&w->heap, (struct cand){-(float)rank, left, right, result, s[right].id});
    }
    uint32_t n = s[left].len + s[right].len;
    int32_t id = tokenizer_find(w->t, w->buf + s[left].off, n);
    if (id < 0)
        return 0;
    return heap_push(&w->heap, (struct cand){w->t->tok[id].score, left, right, (int32_t)n, -1});
}

/*
 * The merge loop both kinds share: pop the best queued pair, skip it when stale, merge the
 * right symbol into the left one and queue the pairs the merged symbol now forms. A pair is
 * stale when the left symbol was absorbed or absorbed its right neighbour (that one is then
 * empty), or when the right one absorbed its own right neighbour: BPE sees that in its id, SPM
 * in the merged length.
 */
static int merge_run(struct work *w, bool bpe)
{
    struct sym *s = w->syms;
    while (w->heap.n) {
        struct cand c = heap_pop(&w->heap);
        struct sym *l = &s[c.left], *r = &s[c.right];
        if (l->len == 0 || r->len == 0 || l->next != c.right)
            continue;
        if (bpe ? r->id != c.right_id : l->len + r->len != (uint32_t)c.result)
            continue;
        l->len += r->len;
        if (bpe)
            l->id = c.result;
        l->next = r->next;
        if (r->next >= 0)
            s[r->next].prev = c.left;
        r->len = 0;
        if (add_cand(w, l->prev, bpe) < 0 || add_cand(w, c.left, bpe) < 0)
            return -ENOMEM;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* special tokens                                                                              */
/* ------------------------------------------------------------------------------------------ */

/*
 * Cuts the text at special tokens: for each special token, longest first, every raw fragment
 * is split at each occurrence (llama.cpp's tokenizer_st_partition). Control and unknown tokens
 * only when parse_special; user-defined ones always.
 */
static int partition_special(struct work *w, const char *text, size_t len, bool parse_special)
{
    const tokenizer_t *t = w->t;
    w->frags.n = 0;
    if (len == 0)
        return 0;
    if (spans_push(&w->frags, 0, len, -1) < 0)
        return -ENOMEM;

    /* which bytes occur at all: most special tokens can be skipped without a search */
    bool present[256] = {false};
    for (size_t i = 0; i < len; i++)
        present[(uint8_t)text[i]] = true;

    struct spans next = {0};
    for (int s = 0; s < t->n_special; s++) {
        int32_t id = t->special[s];
        const struct tok_entry *e = &t->tok[id];
        if (!parse_special && e->type != TOKENIZER_TOKEN_USER_DEFINED)
            continue;
        const char *st = tok_text(t, id);
        if (e->text_len > len || !present[(uint8_t)st[0]])
            continue;
        next.n = 0;
        bool found = false;
        for (size_t f = 0; f < w->frags.n; f++) {
            struct span fr = w->frags.v[f];
            if (fr.token >= 0 || fr.len < e->text_len) {
                if (spans_push(&next, fr.off, fr.len, fr.token) < 0)
                    goto oom;
                continue;
            }
            size_t pos = fr.off, end = fr.off + fr.len;
            for (;;) {
                const char *m = memmem(text + pos, end - pos, st, e->text_len);
                if (!m)
                    break;
                size_t at = (size_t)(m - text);
                found = true;
                if (at > pos && spans_push(&next, pos, at - pos, -1) < 0)
                    goto oom;
                if (spans_push(&next, at, e->text_len, id) < 0)
                    goto oom;
                pos = at + e->text_len;
            }
            if (pos < end && spans_push(&next, pos, end - pos, -1) < 0)
                goto oom;
        }
        if (found) {
            struct spans tmp = w->frags;
            w->frags = next;
            next = tmp;
        }
    }
    free(next.v);
    return 0;
oom:
    free(next.v);
    return -ENOMEM;
}

/* ------------------------------------------------------------------------------------------ */
/* BPE                                                                                          */
/* ------------------------------------------------------------------------------------------ */

/*
 * Copies a raw fragment into w->buf as llama.cpp's unicode_regex_split sees it: each code point
 * re-encoded from what the lax decoder read (so an overlong form becomes its short form), each
 * invalid byte as U+FFFD. w->shadow gets the same bytes with surrogates (which PCRE2 refuses
 * in UTF-8) replaced by U+E000, a code point of the same length and of no class any
 * pre-tokenizer names, as llama.cpp's tables give surrogates no class either.
 */
static int bpe_sanitize(struct work *w, const char *text, size_t len, size_t *out_len)
{
    if (grow((void **)&w->buf, &w->buf_cap, 3 * len + 1, 1) < 0 ||
        grow((void **)&w->shadow, &w->shadow_cap, 3 * len + 1, 1) < 0)
        return -ENOMEM;
    const uint8_t *s = (const uint8_t *)text;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t n = utf8_decode_lax(s + i, len - i, &cp);
        if (n == 0) {
            cp = 0xfffd;
            n = 1;
        }
        size_t k = utf8_encode(cp, w->buf + o);
        if (cp >= 0xd800 && cp <= 0xdfff)
            utf8_encode(0xe000, w->shadow + o);
        else
            memcpy(w->shadow + o, w->buf + o, k);
        o += k;
        i += n;
    }
    *out_len = o;
    return 0;
}

/* Splits [0, len) of w->shadow by the pre-tokenizer regexes into w->words (offsets into
 * w->buf). Each regex splits every current piece into its matches and the text between them. */
static int bpe_pre_split(struct work *w, size_t len)
{
    const tokenizer_t *t = w->t;
    w->words.n = 0;
    if (len == 0)
        return 0;
    if (spans_push(&w->words, 0, len, -1) < 0)
        return -ENOMEM;
    for (int r = 0; r < t->n_re; r++) {
        w->words2.n = 0;
        for (size_t i = 0; i < w->words.n; i++) {
            const struct span in = w->words.v[i];
            PCRE2_SPTR subj = (PCRE2_SPTR)(w->shadow + in.off);
            size_t start = 0, prev = 0;
            while (start < in.len) {
                int rc =
                    pcre2_match(t->re[r], subj, in.len, start, PCRE2_NO_UTF_CHECK, w->md, w->mctx);
                if (rc == PCRE2_ERROR_NOMATCH)
                    break;
                if (rc < 0) {
                    /* a resource limit on a pathological input: keep the rest as one piece */
                    LOG_WARN("tokenizer: pre-tokenizer regex %d stopped at byte %zu of a %zu-byte "
                             "piece (PCRE2 error %d); the rest stays one piece",
                             r, start, in.len, rc);
                    break;
                }
                const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
                size_t ms = ov[0], me = ov[1];
                if (ms > prev && spans_push(&w->words2, in.off + prev, ms - prev, -1) < 0)
                    return -ENOMEM;
                if (me > ms && spans_push(&w->words2, in.off + ms, me - ms, -1) < 0)
                    return -ENOMEM;
                if (ms > prev || me > ms)
                    prev = me;
                if (me > ms) {
                    start = me;
                } else { /* empty match: step over one code point */
                    start = ms + 1;
                    while (start < in.len && (subj[start] & 0xc0) == 0x80)
                        start++;
                }
            }
            if (prev < in.len && spans_push(&w->words2, in.off + prev, in.len - prev, -1) < 0)
                return -ENOMEM;
        }
        struct spans tmp = w->words;
        w->words = w->words2;
        w->words2 = tmp;
    }
    return 0;
}

/* Emits the token(s) of a BPE symbol that is no token: llama.cpp looks up each byte of its
 * byte-level text as a one-byte token and keeps those it finds. */
static int bpe_emit_unknown(struct work *w, const char *enc, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int32_t id = tokenizer_find(w->t, enc + i, 1);
        if (id >= 0 && ivec_push(&w->out, id) < 0)
            return -ENOMEM;
    }
    return 0;
}

/* Merges one pre-tokenized word (bytes [off, off + len) of w->buf) and emits its ids. */
static int bpe_word(struct work *w, size_t off, size_t len)
{
    const tokenizer_t *t = w->t;
    const uint8_t *b = (const uint8_t *)w->buf + off;

    if (t->ignore_merges) {
        if (grow((void **)&w->enc, &w->enc_cap, 2 * len, 1) < 0)
            return -ENOMEM;
        size_t n = 0;
        for (size_t i = 0; i < len; i++) {
            memcpy(w->enc + n, t->byte_utf8[b[i]], t->byte_utf8_len[b[i]]);
            n += t->byte_utf8_len[b[i]];
        }
        int32_t id = tokenizer_find(t, w->enc, n);
        if (id >= 0)
            return ivec_push(&w->out, id);
    }

    /* one symbol per byte: each byte is one code point of the byte-level alphabet */
    if (grow((void **)&w->syms, &w->syms_cap, len, sizeof(*w->syms)) < 0)
        return -ENOMEM;
    struct sym *s = w->syms;
    for (size_t i = 0; i < len; i++)
        s[i] = (struct sym){(int32_t)i - 1, i + 1 < len ? (int32_t)i + 1 : -1, (uint32_t)i, 1,
                            t->byte_tok[b[i]]};
    w->heap.n = 0;
    for (size_t i = 0; i + 1 < len; i++)
        if (add_cand(w, (int32_t)i, true) < 0)
            return -ENOMEM;

    int rc = merge_run(w, true);
    if (rc < 0)
        return rc;

    for (int32_t i = 0; i >= 0; i = s[i].next) {
        if (s[i].id >= 0) {
            if (ivec_push(&w->out, s[i].id) < 0)
                return -ENOMEM;
            continue;
        }
        /* only unmerged single bytes can be without a token */
        uint8_t byte = b[s[i].off];
        if (bpe_emit_unknown(w, t->byte_utf8[byte], t->byte_utf8_len[byte]) < 0)
            return -ENOMEM;
    }
    return 0;
}

static int bpe_fragment(struct work *w, const char *text, size_t len)
{
    size_t n;
    int rc = bpe_sanitize(w, text, len, &n);
    if (rc < 0)
        return rc;
    rc = bpe_pre_split(w, n);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < w->words.n; i++) {
        rc = bpe_word(w, w->words.v[i].off, w->words.v[i].len);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* SentencePiece                                                                                */
/* ------------------------------------------------------------------------------------------ */

static int spm_fragment(struct work *w, const char *text, size_t len, bool prefix_space)
{
    const tokenizer_t *t = w->t;
    /* escape: every ' ' becomes U+2581 (3 bytes) */
    if (grow((void **)&w->buf, &w->buf_cap, 3 * (len + 1), 1) < 0)
        return -ENOMEM;
    size_t n = 0;
    if (prefix_space) {
        memcpy(w->buf, "\xe2\x96\x81", 3);
        n = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(w->buf + n, "\xe2\x96\x81", 3);
            n += 3;
        } else {
            w->buf[n++] = text[i];
        }
    }

    /* symbols: UTF-8 characters by their lead byte (llama.cpp does not validate here) */
    if (grow((void **)&w->syms, &w->syms_cap, n, sizeof(*w->syms)) < 0)
        return -ENOMEM;
    struct sym *s = w->syms;
    int32_t ns = 0;
    for (size_t off = 0; off < n;) {
        size_t k = utf8_len_lead((uint8_t)w->buf[off]);
        if (k > n - off)
            k = n - off;
        s[ns] = (struct sym){ns - 1, -1, (uint32_t)off, (uint32_t)k, -1};
        if (ns > 0)
            s[ns - 1].next = ns;
        ns++;
        off += k;
    }
    w->heap.n = 0;
    for (int32_t i = 0; i + 1 < ns; i++)
        if (add_cand(w, i, false) < 0)
            return -ENOMEM;

    int rc = merge_run(w, false);
    if (rc < 0)
        return rc;

    for (int32_t i = 0; ns > 0 && i >= 0; i = s[i].next) {
        int32_t id = tokenizer_find(t, w->buf + s[i].off, s[i].len);
        if (id >= 0) {
            if (ivec_push(&w->out, id) < 0)
                return -ENOMEM;
            continue;
        }
        /* byte fallback; llama.cpp aborts when a byte has no token, we use <unk> */
        for (uint32_t j = 0; j < s[i].len; j++) {
            int32_t bt = t->spm_byte_tok[(uint8_t)w->buf[s[i].off + j]];
            if (bt < 0)
                bt = t->unk;
            if (bt >= 0 && ivec_push(&w->out, bt) < 0)
                return -ENOMEM;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* encode                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static int encode(struct work *w, const char *text, size_t len, bool add_special,
                  bool parse_special)
{
    const tokenizer_t *t = w->t;
    int rc;
    if (len > TEXT_MAX_LEN)
        return -E2BIG;
    if (t->kind == TOKENIZER_BPE) {
        w->md = pcre2_match_data_create(1, NULL);
        w->mctx = pcre2_match_context_create(NULL);
        w->jit = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
        if (!w->md || !w->mctx || !w->jit)
            return -ENOMEM;
        pcre2_jit_stack_assign(w->mctx, NULL, w->jit);
    }
    rc = partition_special(w, text, len, parse_special);
    if (rc < 0)
        return rc;
    if (add_special && t->add_bos && (rc = ivec_push(&w->out, t->bos)) < 0)
        return rc;
    bool prev_special = true; /* SPM: a space prefix before the first fragment */
    for (size_t f = 0; f < w->frags.n; f++) {
        const struct span fr = w->frags.v[f];
        if (fr.token >= 0) {
            rc = ivec_push(&w->out, fr.token);
            prev_special = true;
        } else if (t->kind == TOKENIZER_BPE) {
            rc = bpe_fragment(w, text + fr.off, fr.len);
        } else {
            rc = spm_fragment(w, text + fr.off, fr.len, t->add_space_prefix && prev_special);
            prev_special = false;
        }
        if (rc < 0)
            return rc;
    }
    if (add_special && t->add_eos && (rc = ivec_push(&w->out, t->eos)) < 0)
        return rc;
    return 0;
}

int tokenizer_encode(const tokenizer_t *t, const char *text, size_t len, bool add_special,
                     bool parse_special, int32_t *ids, int cap, int *n_ids)
{
    ASSERT(t && n_ids);
    *n_ids = 0;
    if ((!text && len) || cap < 0 || (!ids && cap > 0))
        return -EINVAL;
    struct work w = {.t = t};
    int rc = encode(&w, text, len, add_special, parse_special);
    if (rc == 0 && w.out.n > (size_t)INT32_MAX)
        rc = -EOVERFLOW;
    if (rc == 0) {
        size_t k = CKV_MIN(w.out.n, (size_t)cap);
        if (k)
            memcpy(ids, w.out.v, k * sizeof(*ids));
        *n_ids = (int)w.out.n;
        if (w.out.n > (size_t)cap)
            rc = -ENOSPC;
    }
    work_free(&w);
    return rc;
}

int tokenizer_encode_alloc(const tokenizer_t *t, const char *text, size_t len, bool add_special,
                           bool parse_special, int32_t **ids, int *n_ids)
{
    ASSERT(t && ids && n_ids);
    *ids = NULL;
    *n_ids = 0;
    if (!text && len)
        return -EINVAL;
    struct work w = {.t = t};
    int rc = encode(&w, text, len, add_special, parse_special);
    if (rc == 0 && w.out.n > (size_t)INT32_MAX)
        rc = -EOVERFLOW;
    if (rc == 0 && w.out.n) {
        *ids = w.out.v; /* hand the array over */
        *n_ids = (int)w.out.n;
        w.out.v = NULL;
    }
    work_free(&w);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* decode                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static bool piece_hidden(const tokenizer_t *t, int32_t id, bool render_special)
{
    uint8_t ty = t->tok[id].type;
    return !render_special && (ty == TOKENIZER_TOKEN_CONTROL || ty == TOKENIZER_TOKEN_UNKNOWN);
}

int tokenizer_token_bytes(const tokenizer_t *t, int32_t id, bool render_special, const char **bytes,
                          size_t *len)
{
    ASSERT(t && bytes && len);
    if (id < 0 || id >= t->n_tokens)
        return -EINVAL;
    *bytes = t->pieces + t->tok[id].piece_off;
    *len = piece_hidden(t, id, render_special) ? 0 : t->tok[id].piece_len;
    return 0;
}

int tokenizer_decode(const tokenizer_t *t, const int32_t *ids, int n, bool render_special,
                     struct ckv_buf *out)
{
    ASSERT(t && out);
    if (n < 0 || (!ids && n > 0))
        return -EINVAL;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= t->n_tokens)
            return -EINVAL;
    bool at_start = true; /* same rule as tokenizer_stream_push() */
    for (int i = 0; i < n; i++) {
        const char *p = NULL;
        size_t len = 0;
        tokenizer_token_bytes(t, ids[i], render_special, &p, &len);
        if (at_start && ids[i] != t->bos) { /* the prefix space, if any, is after BOS */
            if (t->add_space_prefix && len && p[0] == ' ') {
                p++;
                len--;
            }
            at_start = false;
        }
        if (len && ckv_buf_append(out, p, len) < 0)
            return -ENOMEM;
    }
    return 0;
}

void tokenizer_stream_init(struct tokenizer_stream *s, const tokenizer_t *t, bool render_special)
{
    ASSERT(s && t);
    memset(s, 0, sizeof(*s));
    s->tok = t;
    s->render_special = render_special;
    s->at_start = true;
}

/* Bytes needed to complete the sequence that starts with b (1..4), or 0 when b cannot start
 * one. Strict UTF-8: no overlong lead bytes (C0, C1), nothing above U+10FFFF (F5..FF). */
static int utf8_seq_len(uint8_t b)
{
    if (b < 0x80)
        return 1;
    if (b >= 0xc2 && b <= 0xdf)
        return 2;
    if (b >= 0xe0 && b <= 0xef)
        return 3;
    if (b >= 0xf0 && b <= 0xf4)
        return 4;
    return 0;
}

/* Whether c can be byte i (1-based) of a sequence starting with lead (RFC 3629 table). */
static bool utf8_cont_ok(uint8_t lead, int i, uint8_t c)
{
    if ((c & 0xc0) != 0x80)
        return false;
    if (i != 1)
        return true;
    switch (lead) {
    case 0xe0: return c >= 0xa0;
    case 0xed: return c <= 0x9f;
    case 0xf0: return c >= 0x90;
    case 0xf4: return c <= 0x8f;
    default: return true;
    }
}

int tokenizer_stream_push(struct tokenizer_stream *s, int32_t id, struct ckv_buf *out)
{
    ASSERT(s && s->tok && out);
    const tokenizer_t *t = s->tok;
    if (id < 0 || id >= t->n_tokens)
        return -EINVAL;
    const char *p = NULL;
    size_t len = 0;
    tokenizer_token_bytes(t, id, s->render_special, &p, &len);
    if (s->at_start && id != t->bos) { /* the prefix space, if any, is after BOS */
        if (t->add_space_prefix && len && p[0] == ' ') {
            p++;
            len--;
        }
        s->at_start = false;
    }
    /* Walk the pending bytes followed by the piece; emit up to the last byte that ends a
     * complete sequence or is invalid, keep the bytes of a sequence still open. */
    uint8_t all_small[4 + 64];
    uint8_t *all = all_small;
    size_t n = s->n_pending + len;
    if (n > sizeof(all_small)) {
        all = malloc(n);
        if (!all)
            return -ENOMEM;
    }
    memcpy(all, s->pending, s->n_pending);
    memcpy(all + s->n_pending, p, len);
    size_t i = 0, emit = 0;
    while (i < n) {
        int k = utf8_seq_len(all[i]);
        if (k == 0) { /* invalid lead: passes through */
            emit = ++i;
            continue;
        }
        int j = 1;
        while (j < k && i + j < n && utf8_cont_ok(all[i], j, all[i + j]))
            j++;
        if (j == k) {
            i += k;
            emit = i;
        } else if (i + j == n) {
            break; /* open sequence at the end: keep it */
        } else {
            i += j; /* broken sequence: its bytes pass through */
            emit = i;
        }
    }
    int rc = 0;
    if (emit && ckv_buf_append(out, all, emit) < 0)
        rc = -ENOMEM;
    if (rc == 0) {
        ASSERT(n - emit <= sizeof(s->pending));
        memmove(s->pending, all + emit, n - emit);
        s->n_pending = (uint8_t)(n - emit);
    }
    if (all != all_small)
        free(all);
    return rc;
}

int tokenizer_stream_flush(struct tokenizer_stream *s, struct ckv_buf *out)
{
    ASSERT(s && out);
    if (s->n_pending && ckv_buf_append(out, s->pending, s->n_pending) < 0)
        return -ENOMEM;
    s->n_pending = 0;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* facts                                                                                        */
/* ------------------------------------------------------------------------------------------ */

int tokenizer_n_vocab(const tokenizer_t *t)
{
    return t->n_tokens;
}
enum tokenizer_kind tokenizer_kind(const tokenizer_t *t)
{
    return t->kind;
}
const char *tokenizer_pre(const tokenizer_t *t)
{
    return t->pre_name;
}
int32_t tokenizer_bos(const tokenizer_t *t)
{
    return t->bos;
}
int32_t tokenizer_eos(const tokenizer_t *t)
{
    return t->eos;
}
int32_t tokenizer_eot(const tokenizer_t *t)
{
    return t->eot;
}
int32_t tokenizer_unk(const tokenizer_t *t)
{
    return t->unk;
}
int32_t tokenizer_pad(const tokenizer_t *t)
{
    return t->pad;
}
bool tokenizer_add_bos(const tokenizer_t *t)
{
    return t->add_bos;
}
bool tokenizer_add_eos(const tokenizer_t *t)
{
    return t->add_eos;
}

bool tokenizer_is_eog(const tokenizer_t *t, int32_t id)
{
    return id >= 0 && id < t->n_tokens && t->tok[id].eog;
}

enum tokenizer_token_type tokenizer_token_type(const tokenizer_t *t, int32_t id)
{
    if (id < 0 || id >= t->n_tokens)
        return TOKENIZER_TOKEN_UNDEFINED;
    return (enum tokenizer_token_type)t->tok[id].type;
}

int tokenizer_token_text(const tokenizer_t *t, int32_t id, const char **text, size_t *len)
{
    if (id < 0 || id >= t->n_tokens)
        return -EINVAL;
    *text = tok_text(t, id);
    *len = t->tok[id].text_len;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* construction                                                                                 */
/* ------------------------------------------------------------------------------------------ */

void tokenizer_vocab_defaults(struct tokenizer_vocab *v)
{
    memset(v, 0, sizeof(*v));
    v->bos_id = v->eos_id = v->unk_id = v->pad_id = TOKENIZER_DEFAULT;
    v->eot_id = v->eom_id = TOKENIZER_DEFAULT;
    v->add_bos = v->add_eos = v->add_space_prefix = -1;
}

void tokenizer_destroy(tokenizer_t **tp)
{
    if (!tp || !*tp)
        return;
    tokenizer_t *t = *tp;
    for (int i = 0; i < t->n_re; i++)
        pcre2_code_free(t->re[i]);
    free(t->tok);
    free(t->text);
    free(t->pieces);
    free(t->text_hash);
    free(t->merge_hash);
    free(t->special);
    free(t);
    *tp = NULL;
}

/* Printable, bounded rendering of a token text for error messages. */
static const char *show(const char *s, size_t n, char *buf, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < cap; i++) {
        uint8_t c = (uint8_t)s[i];
        if (c >= 0x20 && c < 0x7f && c != '\'')
            buf[o++] = (char)c;
        else
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c);
    }
    buf[o < cap ? o : cap - 1] = '\0';
    return buf;
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the 68 others to
 * U+0100.. in byte order. */
static void bpe_byte_map(tokenizer_t *t)
{
    for (int i = 0; i < 324; i++)
        t->cp_byte[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        uint32_t cp = keep ? (uint32_t)b : 256u + (uint32_t)n++;
        t->byte_utf8_len[b] = (uint8_t)utf8_encode(cp, t->byte_utf8[b]);
        t->cp_byte[cp] = (int16_t)b;
    }
}

static int build_text(tokenizer_t *t, const struct tokenizer_vocab *v, char *err, size_t errlen)
{
    size_t total = 0;
    for (int32_t i = 0; i < v->n_tokens; i++) {
        if (!v->tokens[i])
            return ckv_errorf(CKV_EFORMAT, err, errlen, "tokenizer: token %d has no text", i);
        size_t n = v->token_lens ? v->token_lens[i] : strlen(v->tokens[i]);
        if (n > TOKEN_MAX_LEN)
            return ckv_errorf(CKV_EFORMAT, err, errlen, "tokenizer: token %d is %zu bytes long", i,
                              n);
        total += n ? n : 24; /* an empty text becomes "[EMPTY_<id>]" as in llama.cpp */
    }
    t->text = malloc(total + 1);
    if (!t->text)
        return -ENOMEM;
    size_t off = 0;
    for (int32_t i = 0; i < v->n_tokens; i++) {
        size_t n = v->token_lens ? v->token_lens[i] : strlen(v->tokens[i]);
        t->tok[i].text_off = (uint32_t)off;
        if (n == 0) {
            LOG_WARN("tokenizer: empty token at id %d, named [EMPTY_%d]", i, i);
            n = (size_t)snprintf(t->text + off, total + 1 - off, "[EMPTY_%d]", i);
        } else {
            memcpy(t->text + off, v->tokens[i], n);
        }
        if (off + n > UINT32_MAX)
            return ckv_errorf(CKV_EFORMAT, err, errlen, "tokenizer: token texts above 4 GiB");
        t->tok[i].text_len = (uint32_t)n;
        t->max_token_len = CKV_MAX(t->max_token_len, (uint32_t)n);
        off += n;
        t->tok[i].score = v->scores ? v->scores[i] : 0.0f;
        int32_t ty = v->types ? v->types[i] : TOKENIZER_TOKEN_NORMAL;
        if (ty < 0 || ty > TOKENIZER_TOKEN_BYTE)
            ty = TOKENIZER_TOKEN_UNDEFINED; /* llama.cpp: unknown types are "undefined" */
        t->tok[i].type = (uint8_t)ty;
    }

    uint64_t slots = 16;
    while (slots < 2 * (uint64_t)v->n_tokens)
        slots *= 2;
    t->text_hash = malloc(slots * sizeof(*t->text_hash));
    if (!t->text_hash)
        return -ENOMEM;
    memset(t->text_hash, 0xff, slots * sizeof(*t->text_hash));
    t->text_hash_mask = slots - 1;
    for (int32_t i = 0; i < v->n_tokens; i++) {
        const char *s = tok_text(t, i);
        size_t n = t->tok[i].text_len;
        uint64_t h = hash_bytes(s, n) & t->text_hash_mask;
        for (;; h = (h + 1) & t->text_hash_mask) {
            int32_t o = t->text_hash[h];
            if (o < 0)
                break;
            if (t->tok[o].text_len == n && memcmp(tok_text(t, o), s, n) == 0) {
                char buf[80];
                return ckv_errorf(CKV_EFORMAT, err, errlen,
                                  "tokenizer: duplicate token '%s' at ids %d and %d",
                                  show(s, n, buf, sizeof(buf)), o, i);
            }
        }
        t->text_hash[h] = i;
    }
    return 0;
}

static int build_merges(tokenizer_t *t, const struct tokenizer_vocab *v, char *err, size_t errlen)
{
    uint64_t slots = 16;
    while (slots < 2 * (uint64_t)v->n_merges)
        slots *= 2;
    t->merge_hash = malloc(slots * sizeof(*t->merge_hash));
    if (!t->merge_hash)
        return -ENOMEM;
    for (uint64_t i = 0; i < slots; i++)
        t->merge_hash[i].key = UINT64_MAX;
    t->merge_mask = slots - 1;

    int32_t dropped = 0, first_dropped = -1;
    for (int32_t r = 0; r < v->n_merges; r++) {
        if (!v->merges[r])
            return ckv_errorf(CKV_EFORMAT, err, errlen, "tokenizer: merge %d has no text", r);
        const char *m = v->merges[r];
        size_t n = v->merge_lens ? v->merge_lens[r] : strlen(m);
        /* "left right": llama.cpp splits at the first space after the first byte */
        const char *sp = n > 1 ? memchr(m + 1, ' ', n - 1) : NULL;
        int32_t l = -1, rr = -1, res = -1;
        if (sp) {
            size_t ln = (size_t)(sp - m), rn = n - ln - 1;
            l = tokenizer_find(t, m, ln);
            rr = tokenizer_find(t, sp + 1, rn);
            if (l >= 0 && rr >= 0 && ln + rn <= t->max_token_len) {
                char small[256];
                char *cat = ln + rn <= sizeof(small) ? small : malloc(ln + rn);
                if (!cat)
                    return -ENOMEM;
                memcpy(cat, m, ln);
                memcpy(cat + ln, sp + 1, rn);
                res = tokenizer_find(t, cat, ln + rn);
                if (cat != small)
                    free(cat);
            }
        }
        if (l < 0 || rr < 0 || res < 0) {
            /* llama.cpp keys merges by text and would apply one whose parts or result are no
             * token; with ids we cannot, and a valid vocabulary has none such */
            if (dropped++ == 0)
                first_dropped = r;
            continue;
        }
        uint64_t key = ((uint64_t)(uint32_t)l << 32) | (uint32_t)rr;
        uint64_t h = hash_u64(key) & t->merge_mask;
        while (t->merge_hash[h].key != UINT64_MAX && t->merge_hash[h].key != key)
            h = (h + 1) & t->merge_mask;
        if (t->merge_hash[h].key == key)
            continue; /* the first (lowest) rank wins, as llama.cpp's emplace */
        t->merge_hash[h] = (struct merge_slot){key, r, res};
    }
    if (dropped) {
        char buf[80];
        const char *m = v->merges[first_dropped];
        size_t n = v->merge_lens ? v->merge_lens[first_dropped] : strlen(m);
        LOG_WARN("tokenizer: %d of %d merges ignored: a part or the result is no token (first: "
                 "rank %d '%s')",
                 dropped, v->n_merges, first_dropped, show(m, n, buf, sizeof(buf)));
    }
    return 0;
}

static int build_regex(tokenizer_t *t, const struct pre_def *pd, char *err, size_t errlen)
{
    for (int i = 0; pd->regex[i]; i++) {
        int ec;
        PCRE2_SIZE eo;
        pcre2_code *re = pcre2_compile((PCRE2_SPTR)pd->regex[i], PCRE2_ZERO_TERMINATED,
                                       PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &ec, &eo, NULL);
        if (!re) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(ec, msg, sizeof(msg));
            /* our own table is wrong: a bug, but reported, not asserted */
            return ckv_errorf(CKV_EUNSUPPORTED, err, errlen,
                              "tokenizer: pre-tokenizer '%s' regex %d does not compile at %zu: %s",
                              t->pre_name, i, (size_t)eo, (const char *)msg);
        }
        /* JIT where available (much faster); the interpreter otherwise */
        (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
        t->re[t->n_re++] = re;
    }
    return 0;
}

/* Texts llama.cpp uses to find EOT / EOM / FIM tokens and end-of-generation tokens
 * (llama_vocab::impl::load). Each found token is made CONTROL. */
static const char *const EOT_TEXTS[] = {"<|eot_id|>",
                                        "<|im_end|>",
                                        "<|end|>",
                                        "<end_of_turn>",
                                        "<|endoftext|>",
                                        "<|end_of_text|>",
                                        "<EOT>",
                                        "_<EOT>",
                                        "[EOT]",
                                        "<\xef\xbd\x9c"
                                        "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
                                        "<end_of_utterance>",
                                        NULL};
static const char *const FIM_PRE_TEXTS[] = {"<|fim_prefix|>",
                                            "<fim-prefix>",
                                            "<fim_prefix>",
                                            "<\xef\xbd\x9c"
                                            "fim\xe2\x96\x81"
                                            "begin\xef\xbd\x9c>",
                                            "<PRE>",
                                            "\xe2\x96\x81<PRE>",
                                            "<|code_prefix|>",
                                            "<|prefix|>",
                                            NULL};
static const char *const FIM_SUF_TEXTS[] = {"<|fim_suffix|>",
                                            "<fim-suffix>",
                                            "<fim_suffix>",
                                            "<\xef\xbd\x9c"
                                            "fim\xe2\x96\x81hole\xef\xbd\x9c>",
                                            "<SUF>",
                                            "\xe2\x96\x81<SUF>",
                                            "<|code_suffix|>",
                                            "<|suffix|>",
                                            NULL};
static const char *const FIM_MID_TEXTS[] = {"<|fim_middle|>",
                                            "<fim-middle>",
                                            "<fim_middle>",
                                            "<\xef\xbd\x9c"
                                            "fim\xe2\x96\x81"
                                            "end\xef\xbd\x9c>",
                                            "<MID>",
                                            "\xe2\x96\x81<MID>",
                                            "<|code_middle|>",
                                            "<|middle|>",
                                            NULL};
static const char *const FIM_PAD_TEXTS[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>",
                                            "<PAD>",       "[PAD]",     NULL};
static const char *const FIM_REP_TEXTS[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
                                            "<REPO>",       "<reponame>",    NULL};
static const char *const FIM_SEP_TEXTS[] = {"<|file_sep|>", NULL};
static const char *const EOG_TEXTS[] = {"<|eot_id|>",
                                        "<|im_end|>",
                                        "<|end|>",
                                        "<|return|>",
                                        "<|call|>",
                                        "<|flush|>",
                                        "<|calls|>",
                                        "<end_of_turn>",
                                        "<|endoftext|>",
                                        "</s>",
                                        "<|eom_id|>",
                                        "<EOT>",
                                        "_<EOT>",
                                        "[EOT]",
                                        "[EOS]",
                                        "<|end_of_text|>",
                                        "<end_of_utterance>",
                                        "<eos>",
                                        "<turn|>",
                                        "<|tool_response>",
                                        "<\xef\xbd\x9c"
                                        "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
                                        "[e~[",
                                        NULL};

/* Lowest id whose text is in list, or -1. (llama.cpp walks a hash map; where a vocabulary has
 * several candidates its pick is arbitrary, ours is the lowest id.) */
static int32_t find_any(const tokenizer_t *t, const char *const *list)
{
    int32_t best = -1;
    for (int i = 0; list[i]; i++) {
        int32_t id = tokenizer_find(t, list[i], strlen(list[i]));
        if (id >= 0 && (best < 0 || id < best))
            best = id;
    }
    return best;
}

static void make_control(tokenizer_t *t, int32_t id)
{
    if (id >= 0)
        t->tok[id].type = TOKENIZER_TOKEN_CONTROL;
}

static void mark_eog(tokenizer_t *t)
{
    if (t->eot < 0)
        t->eot = find_any(t, EOT_TEXTS);
    make_control(t, t->eot);
    if (t->eom < 0)
        t->eom = tokenizer_find(t, "<|eom_id|>", 10);
    make_control(t, t->eom);
    make_control(t, find_any(t, FIM_PRE_TEXTS));
    make_control(t, find_any(t, FIM_SUF_TEXTS));
    make_control(t, find_any(t, FIM_MID_TEXTS));
    int32_t fim[3] = {find_any(t, FIM_PAD_TEXTS), find_any(t, FIM_REP_TEXTS),
                      find_any(t, FIM_SEP_TEXTS)};
    for (int i = 0; i < 3; i++)
        if (fim[i] >= 0) {
            make_control(t, fim[i]);
            t->tok[fim[i]].eog = true;
        }
    for (int i = 0; EOG_TEXTS[i]; i++) {
        int32_t id = tokenizer_find(t, EOG_TEXTS[i], strlen(EOG_TEXTS[i]));
        if (id >= 0) {
            make_control(t, id);
            t->tok[id].eog = true;
        }
    }
    int32_t always[3] = {t->eos, t->eot, t->eom};
    for (int i = 0; i < 3; i++)
        if (always[i] >= 0)
            t->tok[always[i]].eog = true;
    /* llama.cpp's work-arounds: with <|return|> and <|call|> (or <|calls|> and <|flush|>),
     * <|end|> ends a message, not the generation; with <|tool_response>, </s> is no EOG */
    int32_t ret = tokenizer_find(t, "<|return|>", 10), call = tokenizer_find(t, "<|call|>", 8);
    int32_t calls = tokenizer_find(t, "<|calls|>", 9), flush = tokenizer_find(t, "<|flush|>", 9);
    int32_t end = tokenizer_find(t, "<|end|>", 7);
    if (end >= 0 && ((ret >= 0 && call >= 0) || (calls >= 0 && flush >= 0))) {
        t->tok[end].eog = false;
        t->tok[end].type = TOKENIZER_TOKEN_USER_DEFINED;
    }
    int32_t tool = tokenizer_find(t, "<|tool_response>", 16), s = tokenizer_find(t, "</s>", 4);
    if (tool >= 0 && s >= 0) {
        t->tok[s].eog = false;
        t->tok[s].type = TOKENIZER_TOKEN_NORMAL;
    }
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* "<0xNN>" -> the byte, or -1 */
static int byte_token_value(const char *s, size_t n)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    int hi = hexval(s[3]), lo = hexval(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

/* The decoded bytes of every token (llama.cpp's token_to_piece with special = true). */
static int build_pieces(tokenizer_t *t)
{
    /* a BPE piece is at most as long as its text, an SPM one too ("▁" -> " " shrinks) */
    size_t total = 0;
    for (int32_t i = 0; i < t->n_tokens; i++)
        total += t->tok[i].text_len;
    t->pieces = malloc(total + 1);
    if (!t->pieces)
        return -ENOMEM;
    size_t o = 0;
    for (int32_t i = 0; i < t->n_tokens; i++) {
        struct tok_entry *e = &t->tok[i];
        const char *s = tok_text(t, i);
        size_t n = e->text_len, start = o;
        switch (e->type) {
        case TOKENIZER_TOKEN_CONTROL:
        case TOKENIZER_TOKEN_UNKNOWN:
        case TOKENIZER_TOKEN_USER_DEFINED:
            memcpy(t->pieces + o, s, n);
            o += n;
            break;
        case TOKENIZER_TOKEN_BYTE: {
            int b = byte_token_value(s, n);
            if (b >= 0) {
                t->pieces[o++] = (char)b;
            } else { /* a BYTE token not spelled <0xNN>: keep its text */
                memcpy(t->pieces + o, s, n);
                o += n;
            }
            break;
        }
        case TOKENIZER_TOKEN_NORMAL:
            if (t->kind == TOKENIZER_SPM) {
                for (size_t j = 0; j < n;) {
                    if (j + 3 <= n && memcmp(s + j, "\xe2\x96\x81", 3) == 0) {
                        t->pieces[o++] = ' ';
                        j += 3;
                    } else {
                        t->pieces[o++] = s[j++];
                    }
                }
            } else {
                /* byte-level code points back to bytes; a code point outside the alphabet
                 * is copied as it is (llama.cpp writes "[UNK_BYTE_0x..]" instead) */
                for (size_t j = 0; j < n;) {
                    uint32_t cp;
                    size_t k = utf8_decode_lax((const uint8_t *)s + j, n - j, &cp);
                    if (k == 0)
                        k = 1, cp = 0xfffd;
                    if (cp < 324 && t->cp_byte[cp] >= 0)
                        t->pieces[o++] = (char)t->cp_byte[cp];
                    else {
                        memcpy(t->pieces + o, s + j, k);
                        o += k;
                    }
                    j += k;
                }
            }
            break;
        default: /* UNUSED, UNDEFINED: nothing, as llama.cpp */ break;
        }
        e->piece_off = (uint32_t)start;
        e->piece_len = (uint32_t)(o - start);
    }
    return 0;
}

static int cmp_special(const void *a, const void *b, void *arg)
{
    const tokenizer_t *t = arg;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx = t->tok[x].text_len, ly = t->tok[y].text_len;
    if (lx != ly)
        return lx > ly ? -1 : 1;
    return x < y ? -1 : x > y;
}

static int build_special(tokenizer_t *t)
{
    int n = 0;
    for (int32_t i = 0; i < t->n_tokens; i++) {
        uint8_t ty = t->tok[i].type;
        n += ty == TOKENIZER_TOKEN_CONTROL || ty == TOKENIZER_TOKEN_USER_DEFINED ||
             ty == TOKENIZER_TOKEN_UNKNOWN;
    }
    t->special = malloc((size_t)(n ? n : 1) * sizeof(*t->special));
    if (!t->special)
        return -ENOMEM;
    for (int32_t i = 0; i < t->n_tokens; i++) {
        uint8_t ty = t->tok[i].type;
        if (ty == TOKENIZER_TOKEN_CONTROL || ty == TOKENIZER_TOKEN_USER_DEFINED ||
            ty == TOKENIZER_TOKEN_UNKNOWN)
            t->special[t->n_special++] = i;
    }
    qsort_r(t->special, (size_t)t->n_special, sizeof(*t->special), cmp_special, t);
    return 0;
}

/* A special id from the vocabulary: TOKENIZER_DEFAULT takes def; out of range disables it
 * with a warning (llama.cpp keeps its default then). */
static int32_t special_id(const tokenizer_t *t, const char *what, int32_t v, int32_t def)
{
    if (v == TOKENIZER_DEFAULT)
        v = def;
    if (v >= t->n_tokens || v < TOKENIZER_NULL) {
        LOG_WARN("tokenizer: %s token id %d out of the vocabulary (%d tokens): none", what, v,
                 t->n_tokens);
        v = TOKENIZER_NULL;
    }
    return v;
}

int tokenizer_new(const struct tokenizer_vocab *v, tokenizer_t **out, char *err, size_t errlen)
{
    ASSERT(v && out);
    *out = NULL;
    if (!v->model)
        return ckv_errorf(CKV_EFORMAT, err, errlen,
                          "tokenizer: no model kind (tokenizer.ggml.model)");
    if (v->n_tokens <= 0 || !v->tokens)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tokenizer: empty vocabulary");
    if (v->n_merges < 0 || (v->n_merges > 0 && !v->merges))
        return ckv_errorf(CKV_EFORMAT, err, errlen, "tokenizer: bad merge list");

    tokenizer_t *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    int rc;
    const struct pre_def *pd = NULL;
    if (strcmp(v->model, "gpt2") == 0) {
        t->kind = TOKENIZER_BPE;
        const char *pre = v->pre && *v->pre ? v->pre : "default";
        if (!v->pre || !*v->pre)
            LOG_WARN("tokenizer: no pre-tokenizer named (tokenizer.ggml.pre): using 'default', "
                     "as llama.cpp does; tokenization may differ from the model's training");
        pd = pre_find(pre);
        if (!pd) {
            rc = ckv_errorf(
                CKV_EUNSUPPORTED, err, errlen,
                "tokenizer: unknown pre-tokenizer '%.40s' (tokenizer.ggml.pre); known: "
                "default, gpt-2, llama3, qwen2, smollm, starcoder, falcon, deepseek-coder, "
                "gpt-4o, tekken, seed-coder, bloom and their aliases",
                pre);
            goto err;
        }
        snprintf(t->pre_name, sizeof(t->pre_name), "%s", pre);
    } else if (strcmp(v->model, "llama") == 0) {
        t->kind = TOKENIZER_SPM;
    } else {
        rc = ckv_errorf(CKV_EUNSUPPORTED, err, errlen,
                        "tokenizer: model kind '%.40s' (tokenizer.ggml.model) is not supported; "
                        "supported: gpt2 (byte-level BPE), llama (SentencePiece)",
                        v->model);
        goto err;
    }
    if (v->n_merges > MAX_MERGES) {
        rc = ckv_errorf(CKV_EUNSUPPORTED, err, errlen, "tokenizer: %d merges, at most %d supported",
                        v->n_merges, MAX_MERGES);
        goto err;
    }
    if (t->kind == TOKENIZER_BPE && v->n_merges == 0) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                        "tokenizer: BPE vocabulary without merges "
                        "(tokenizer.ggml.merges)");
        goto err;
    }

    t->n_tokens = v->n_tokens;
    t->tok = calloc((size_t)v->n_tokens, sizeof(*t->tok));
    if (!t->tok) {
        rc = -ENOMEM;
        goto err;
    }
    if ((rc = build_text(t, v, err, errlen)) < 0)
        goto err;

    bool spm = t->kind == TOKENIZER_SPM;
    t->bos = special_id(t, "BOS", v->bos_id, spm ? 1 : TOKENIZER_NULL);
    t->eos = special_id(t, "EOS", v->eos_id, spm ? 2 : TOKENIZER_NULL);
    t->unk = special_id(t, "UNK", v->unk_id, spm ? 0 : TOKENIZER_NULL);
    t->pad = special_id(t, "PAD", v->pad_id, TOKENIZER_NULL);
    t->eot = special_id(t, "EOT", v->eot_id, TOKENIZER_NULL);
    t->eom = special_id(t, "EOM", v->eom_id, TOKENIZER_NULL);
    t->add_bos = v->add_bos >= 0 ? v->add_bos : (spm || (pd && pd->add_bos));
    t->add_eos = v->add_eos >= 0 ? v->add_eos : false;
    t->add_space_prefix = v->add_space_prefix >= 0 ? v->add_space_prefix : spm;
    if (t->add_bos && t->bos < 0) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                        "tokenizer: add_bos_token is true but there is no "
                        "BOS token (tokenizer.ggml.bos_token_id)");
        goto err;
    }
    if (t->add_eos && t->eos < 0) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                        "tokenizer: add_eos_token is true but there is no "
                        "EOS token (tokenizer.ggml.eos_token_id)");
        goto err;
    }

    if (t->kind == TOKENIZER_BPE) {
        bpe_byte_map(t);
        for (int b = 0; b < 256; b++)
            t->byte_tok[b] = tokenizer_find(t, t->byte_utf8[b], t->byte_utf8_len[b]);
        if ((rc = build_merges(t, v, err, errlen)) < 0)
            goto err;
        if ((rc = build_regex(t, pd, err, errlen)) < 0)
            goto err;
        t->ignore_merges = pd->ignore_merges;
    } else {
        for (int b = 0; b < 256; b++) {
            char hex[8];
            snprintf(hex, sizeof(hex), "<0x%02X>", b);
            int32_t id = tokenizer_find(t, hex, 6);
            if (id < 0) {
                char c = (char)b;
                id = tokenizer_find(t, &c, 1);
            }
            t->spm_byte_tok[b] = id;
        }
    }

    mark_eog(t);
    if ((rc = build_pieces(t)) < 0 || (rc = build_special(t)) < 0)
        goto err;
    *out = t;
    return 0;
err:
    if (rc == -ENOMEM)
        ckv_errorf(rc, err, errlen, "tokenizer: out of memory");
    tokenizer_destroy(&t);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* from GGUF                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Reads a string array into (ptr, len) tables; *n = 0 when the key is absent. */
static int gguf_strings(const gguf_t *g, const char *key, const char ***ptrs, uint32_t **lens,
                        int32_t *n, char *err, size_t errlen)
{
    enum gguf_type et;
    uint64_t cnt;
    const void *data;
    *n = 0;
    int rc = gguf_get_arr(g, key, &et, &cnt, &data, err, errlen);
    if (rc == -ENOENT)
        return 0;
    if (rc < 0)
        return rc;
    if (et != GGUF_TYPE_STRING)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': array of %s, expected strings",
                          key, gguf_type_name(et));
    if (cnt > INT32_MAX)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': %llu entries", key,
                          (unsigned long long)cnt);
    *ptrs = malloc((cnt ? cnt : 1) * sizeof(**ptrs));
    *lens = malloc((cnt ? cnt : 1) * sizeof(**lens));
    if (!*ptrs || !*lens)
        return -ENOMEM;
    for (uint64_t i = 0; i < cnt; i++) {
        struct gguf_str s;
        if (gguf_get_arr_str(g, key, i, &s) < 0)
            return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': entry %llu unreadable", key,
                              (unsigned long long)i);
        if (s.len > TOKEN_MAX_LEN)
            return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': entry %llu is %llu bytes",
                              key, (unsigned long long)i, (unsigned long long)s.len);
        (*ptrs)[i] = s.ptr;
        (*lens)[i] = (uint32_t)s.len;
    }
    *n = (int32_t)cnt;
    return 0;
}

/* An optional numeric array of at least n elements of one of two types, copied out. */
static int gguf_numbers(const gguf_t *g, const char *key, int32_t n, bool want_float, void **out,
                        char *err, size_t errlen)
{
    enum gguf_type et;
    uint64_t cnt;
    const void *data;
    *out = NULL;
    int rc = gguf_get_arr(g, key, &et, &cnt, &data, err, errlen);
    if (rc == -ENOENT)
        return 0;
    if (rc < 0)
        return rc;
    if (cnt < (uint64_t)n)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': %llu entries for %d tokens",
                          key, (unsigned long long)cnt, n);
    if (!(et == GGUF_TYPE_FLOAT32 && want_float) && et != GGUF_TYPE_INT32)
        return ckv_errorf(CKV_EFORMAT, err, errlen, "metadata '%s': array of %s, expected %s", key,
                          gguf_type_name(et), want_float ? "float32 or int32" : "int32");
    void *a = malloc((size_t)n * 4 + 4);
    if (!a)
        return -ENOMEM;
    for (int32_t i = 0; i < n; i++) {
        uint32_t raw;
        memcpy(&raw, (const char *)data + (size_t)i * 4, 4); /* may be unaligned */
        if (want_float) {
            float f;
            if (et == GGUF_TYPE_INT32) {
                int32_t k;
                memcpy(&k, &raw, 4);
                f = (float)k;
            } else {
                memcpy(&f, &raw, 4);
            }
            ((float *)a)[i] = f;
        } else {
            memcpy((int32_t *)a + i, &raw, 4);
        }
    }
    *out = a;
    return 0;
}

static int gguf_id(const gguf_t *g, const char *key, int32_t *id, char *err, size_t errlen)
{
    uint32_t v;
    int rc = gguf_get_u32(g, key, &v, err, errlen);
    if (rc == -ENOENT)
        return 0; /* keeps the default */
    if (rc < 0)
        return rc;
    *id = v > INT32_MAX ? INT32_MAX : (int32_t)v; /* out of range: tokenizer_new() warns */
    return 0;
}

static int gguf_flag(const gguf_t *g, const char *key, int *flag, char *err, size_t errlen)
{
    bool b;
    int rc = gguf_get_bool(g, key, &b, err, errlen);
    if (rc == -ENOENT)
        return 0;
    if (rc < 0)
        return rc;
    *flag = b;
    return 0;
}

static char *gguf_cstr(const gguf_t *g, const char *key, int *rc, char *err, size_t errlen)
{
    struct gguf_str s;
    *rc = gguf_get_str(g, key, &s, err, errlen);
    if (*rc < 0)
        return NULL;
    char *c = strndup(s.ptr, s.len);
    if (!c)
        *rc = -ENOMEM;
    return c;
}

int tokenizer_new_from_gguf(const gguf_t *g, tokenizer_t **out, char *err, size_t errlen)
{
    ASSERT(g && out);
    *out = NULL;
    struct tokenizer_vocab v;
    tokenizer_vocab_defaults(&v);
    const char **tokens = NULL, **merges = NULL;
    uint32_t *token_lens = NULL, *merge_lens = NULL;
    float *scores = NULL;
    int32_t *types = NULL;
    char *model = NULL, *pre = NULL;
    int rc;

    model = gguf_cstr(g, "tokenizer.ggml.model", &rc, err, errlen);
    if (rc == -ENOENT) {
        rc =
            ckv_errorf(CKV_EFORMAT, err, errlen, "tokenizer: the GGUF has no tokenizer.ggml.model");
        goto out;
    }
    if (rc < 0)
        goto out;
    pre = gguf_cstr(g, "tokenizer.ggml.pre", &rc, err, errlen);
    if (rc < 0 && rc != -ENOENT)
        goto out;
    if ((rc = gguf_strings(g, "tokenizer.ggml.tokens", &tokens, &token_lens, &v.n_tokens, err,
                           errlen)) < 0)
        goto out;
    if (v.n_tokens == 0) {
        rc = ckv_errorf(CKV_EFORMAT, err, errlen,
                        "tokenizer: the GGUF has no tokenizer.ggml.tokens");
        goto out;
    }
    if ((rc = gguf_strings(g, "tokenizer.ggml.merges", &merges, &merge_lens, &v.n_merges, err,
                           errlen)) < 0 ||
        (rc = gguf_numbers(g, "tokenizer.ggml.scores", v.n_tokens, true, (void **)&scores, err,
                           errlen)) < 0 ||
        (rc = gguf_numbers(g, "tokenizer.ggml.token_type", v.n_tokens, false, (void **)&types, err,
                           errlen)) < 0)
        goto out;
    if ((rc = gguf_id(g, "tokenizer.ggml.bos_token_id", &v.bos_id, err, errlen)) < 0 ||
        (rc = gguf_id(g, "tokenizer.ggml.eos_token_id", &v.eos_id, err, errlen)) < 0 ||
        (rc = gguf_id(g, "tokenizer.ggml.unknown_token_id", &v.unk_id, err, errlen)) < 0 ||
        (rc = gguf_id(g, "tokenizer.ggml.padding_token_id", &v.pad_id, err, errlen)) < 0 ||
        (rc = gguf_id(g, "tokenizer.ggml.eot_token_id", &v.eot_id, err, errlen)) < 0 ||
        (rc = gguf_id(g, "tokenizer.ggml.eom_token_id", &v.eom_id, err, errlen)) < 0 ||
        (rc = gguf_flag(g, "tokenizer.ggml.add_bos_token", &v.add_bos, err, errlen)) < 0 ||
        (rc = gguf_flag(g, "tokenizer.ggml.add_eos_token", &v.add_eos, err, errlen)) < 0 ||
        (rc = gguf_flag(g, "tokenizer.ggml.add_space_prefix", &v.add_space_prefix, err, errlen)) <
            0)
        goto out;

    v.model = model;
    v.pre = pre;
    v.tokens = tokens;
    v.token_lens = token_lens;
    v.merges = merges;
    v.merge_lens = merge_lens;
    v.scores = scores;
    v.types = types;
    rc = tokenizer_new(&v, out, err, errlen);
out:
    if (rc == -ENOMEM)
        ckv_errorf(rc, err, errlen, "tokenizer: out of memory");
    free(model);
    free(pre);
    free(tokens);
    free(token_lens);
    free(merges);
    free(merge_lens);
    free(scores);
    free(types);
    return rc;
}
