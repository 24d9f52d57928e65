/*
 * Tokenizer: text <-> token ids for the vocabularies GGUF files carry, with llama.cpp's
 * semantics (its token ids are what the tests compare against, see tests/worker/test_tokenizer.c).
 *
 * Two vocabulary kinds (`tokenizer.ggml.model`):
 *  - "gpt2": byte-level BPE. Text is split by the pre-tokenizer regexes that
 *    `tokenizer.ggml.pre` names (PCRE2, UTF-8 + Unicode properties), each piece's bytes are
 *    mapped to printable code points (GPT-2's bytes_to_unicode) and merged by merge rank.
 *  - "llama": SentencePiece-style BPE. Spaces become U+2581 "▁", a "▁" is put before the text
 *    (add_space_prefix), adjacent symbols merge by token score, and what no token covers falls
 *    back to byte tokens <0xNN>.
 * Special tokens (types CONTROL, USER_DEFINED, UNKNOWN) are cut out of the text before
 * either: user-defined ones always, control ones only when the caller asks (parse_special),
 * longest first, as llama.cpp does.
 *
 * A tokenizer is immutable after construction: every function taking a const tokenizer_t is
 * safe to call from several threads at once. It keeps no reference into the GGUF it came from.
 *
 *   tokenizer_t *tok;
 *   if (tokenizer_new_from_gguf(g, &tok, err, sizeof(err)) < 0) ...
 *   int32_t ids[256]; int n;
 *   rc = tokenizer_encode(tok, text, len, true, false, ids, 256, &n);   // -ENOSPC: n = needed
 *   struct tokenizer_stream st; tokenizer_stream_init(&st, tok, false);
 *   for each generated id: tokenizer_stream_push(&st, id, &buf) -> print buf (whole UTF-8 only)
 *   tokenizer_destroy(&tok);
 */
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ckv_buf.h"
#include "gguf.h"

typedef struct tokenizer tokenizer_t;

/* "no such token" (a missing BOS, an unknown text). */
#define TOKENIZER_NULL (-1)
/* tokenizer_vocab ids: "the model kind's default" (SentencePiece: BOS 1, EOS 2, UNK 0, as
 * llama.cpp; byte-level BPE: none). */
#define TOKENIZER_DEFAULT (-2)

enum tokenizer_kind {
    TOKENIZER_BPE = 1, /* "gpt2": byte-level BPE */
    TOKENIZER_SPM = 2, /* "llama": SentencePiece-style BPE with byte fallback */
};

/* Token types as GGUF stores them in tokenizer.ggml.token_type (llama.cpp's numbering). */
enum tokenizer_token_type {
    TOKENIZER_TOKEN_UNDEFINED = 0,
    TOKENIZER_TOKEN_NORMAL = 1,
    TOKENIZER_TOKEN_UNKNOWN = 2,
    TOKENIZER_TOKEN_CONTROL = 3,
    TOKENIZER_TOKEN_USER_DEFINED = 4,
    TOKENIZER_TOKEN_UNUSED = 5,
    TOKENIZER_TOKEN_BYTE = 6,
};

/*
 * A vocabulary as plain arrays, for tokenizer_new(): what a GGUF holds under tokenizer.ggml.*,
 * or what a test builds by hand. Nothing is kept: the arrays may be freed after the call.
 * Fill it with tokenizer_vocab_defaults() first, then set what you have.
 */
struct tokenizer_vocab {
    const char *model; /* "gpt2" or "llama" (required) */
    const char *pre;   /* gpt2 pre-tokenizer name (tokenizer.ggml.pre); NULL: "default" + warning */
    int32_t n_tokens;
    const char *const *tokens;  /* (n_tokens) token texts as the vocabulary spells them */
    const uint32_t *token_lens; /* (n_tokens) byte lengths, or NULL: tokens are NUL-terminated */
    const float *scores;        /* (n_tokens) SentencePiece scores, or NULL: all 0 */
    const int32_t *types;       /* (n_tokens) enum tokenizer_token_type, or NULL: all NORMAL */
    int32_t n_merges;
    const char *const *merges;  /* (n_merges) "left right", rank = index (gpt2 only) */
    const uint32_t *merge_lens; /* (n_merges) byte lengths, or NULL: NUL-terminated */
    /* special ids: an id, TOKENIZER_NULL (none) or TOKENIZER_DEFAULT; an id out of range is
     * dropped with a warning (llama.cpp does the same) */
    int32_t bos_id, eos_id, unk_id, pad_id, eot_id, eom_id;
    /* -1: the model kind's / pre-tokenizer's default (llama.cpp's), 0 / 1: as given */
    int add_bos, add_eos, add_space_prefix;
};

/* Sets every field to "absent / default": ids TOKENIZER_DEFAULT, flags -1, pointers NULL. */
void tokenizer_vocab_defaults(struct tokenizer_vocab *v);

/* Builds a tokenizer from plain arrays. On success the caller owns *out (tokenizer_destroy()).
 * Returns 0, CKV_EFORMAT (unusable vocabulary: empty, a duplicate token text, BPE without
 * merges, add_bos / add_eos without that token), CKV_EUNSUPPORTED (a model kind or
 * pre-tokenizer this build does not know: never guessed) or -ENOMEM, with a message naming the
 * problem in err (err may be NULL). Merges whose parts or result are no token are ignored with
 * one warning (a valid vocabulary has none). */
int tokenizer_new(const struct tokenizer_vocab *v, tokenizer_t **out, char *err, size_t errlen);

/* Builds a tokenizer from a GGUF's tokenizer.ggml.* metadata (model, pre, tokens, scores,
 * token_type, merges, bos/eos/unknown/padding/eot/eom_token_id, add_bos_token, add_eos_token,
 * add_space_prefix). Copies what it needs: g may be closed afterwards. Errors as
 * tokenizer_new(), plus CKV_EFORMAT naming the key when a key is missing or mistyped. */
int tokenizer_new_from_gguf(const gguf_t *g, tokenizer_t **out, char *err, size_t errlen);

/* Frees the tokenizer and NULLs the pointer. NULL is fine. */
void tokenizer_destroy(tokenizer_t **t);

/*
 * Encodes len bytes of text (any bytes: invalid UTF-8 is tokenized as llama.cpp does, each
 * invalid byte read as U+FFFD; a byte the byte-level vocabulary has no token for is dropped, as
 * llama.cpp drops it: SmolLM2 lacks 0x04 0x06 0x13 0x14 0x16 0x1d). add_special: add BOS / EOS as
 * the vocabulary says (tokenizer_add_bos() / tokenizer_add_eos()). parse_special: recognise control
 * tokens such as
 * "<|im_start|>" in the text (user-defined tokens are always recognised).
 * Writes at most cap ids to ids (ids may be NULL when cap is 0) and the full count to *n_ids.
 * Returns 0, -ENOSPC when the ids did not fit (then *n_ids is the count needed), -EINVAL on
 * NULL text with len > 0 or cap < 0, -E2BIG for text above 256 MiB, -ENOMEM.
 */
int tokenizer_encode(const tokenizer_t *t, const char *text, size_t len, bool add_special,
                     bool parse_special, int32_t *ids, int cap, int *n_ids);

/* As tokenizer_encode(), into a malloc'ed array the caller frees (*ids is NULL when *n_ids is
 * 0). Returns 0, -EINVAL, -E2BIG or -ENOMEM. */
int tokenizer_encode_alloc(const tokenizer_t *t, const char *text, size_t len, bool add_special,
                           bool parse_special, int32_t **ids, int *n_ids);

/*
 * The bytes a token stands for (llama.cpp's token_to_piece): byte-level BPE text mapped back to
 * bytes, "▁" back to spaces, <0xNN> to its byte. Control and unknown tokens give their text
 * when render_special and nothing otherwise; unused tokens give nothing. The bytes are owned by
 * t (not NUL-terminated); a piece may be a partial UTF-8 sequence.
 * Returns 0 or -EINVAL (id out of range).
 */
int tokenizer_token_bytes(const tokenizer_t *t, int32_t id, bool render_special, const char **bytes,
                          size_t *len);

/* Appends the text of n ids to out: the concatenated pieces, without the space the encoder
 * put before the text of a SentencePiece vocabulary (so decode(encode(x)) == x for valid
 * UTF-8 x whose bytes all have tokens). Returns 0, -EINVAL (an id out of range; nothing
 * appended) or -ENOMEM. */
int tokenizer_decode(const tokenizer_t *t, const int32_t *ids, int n, bool render_special,
                     struct ckv_buf *out);

/*
 * Streaming decode for generation: push ids one at a time; each push appends to out only
 * complete UTF-8 sequences and keeps the bytes of a sequence still incomplete (at most 3) for
 * the next push. Bytes that cannot start or continue a valid sequence are passed through as
 * they are, so the concatenated output of every push plus the final flush equals
 * tokenizer_decode() of the same ids, byte for byte. Caller-owned, no allocation of its own.
 */
struct tokenizer_stream {
    const tokenizer_t *tok;
    bool render_special;
    bool at_start;      /* no text piece seen yet (SentencePiece: strip the prefix space) */
    uint8_t pending[4]; /* bytes of an incomplete UTF-8 sequence */
    uint8_t n_pending;
};

void tokenizer_stream_init(struct tokenizer_stream *s, const tokenizer_t *t, bool render_special);
/* Returns 0, -EINVAL (id out of range: nothing changes) or -ENOMEM. */
int tokenizer_stream_push(struct tokenizer_stream *s, int32_t id, struct ckv_buf *out);
/* Appends what is still pending (an incomplete sequence at the end of generation) and resets
 * the pending bytes. Returns 0 or -ENOMEM. */
int tokenizer_stream_flush(struct tokenizer_stream *s, struct ckv_buf *out);

/* ---- vocabulary facts ---- */

int tokenizer_n_vocab(const tokenizer_t *t);
enum tokenizer_kind tokenizer_kind(const tokenizer_t *t);
/* The pre-tokenizer in use ("smollm", "llama3", ...; "" for SentencePiece). Owned by t. */
const char *tokenizer_pre(const tokenizer_t *t);
/* Special ids, TOKENIZER_NULL when the vocabulary has none. */
int32_t tokenizer_bos(const tokenizer_t *t);
int32_t tokenizer_eos(const tokenizer_t *t);
int32_t tokenizer_eot(const tokenizer_t *t);
int32_t tokenizer_unk(const tokenizer_t *t);
int32_t tokenizer_pad(const tokenizer_t *t);
bool tokenizer_add_bos(const tokenizer_t *t);
bool tokenizer_add_eos(const tokenizer_t *t);
/* End of generation: eos, eot, eom and the tokens llama.cpp treats so by their text
 * (<|im_end|>, <|eot_id|>, <|endoftext|>, <end_of_turn>, FIM repo/sep/pad...). False for ids
 * out of range. */
bool tokenizer_is_eog(const tokenizer_t *t, int32_t id);
/* The token's type after llama.cpp's fix-ups (EOG / FIM texts are made CONTROL), or
 * TOKENIZER_TOKEN_UNDEFINED for ids out of range. */
enum tokenizer_token_type tokenizer_token_type(const tokenizer_t *t, int32_t id);
/* The token's text as the vocabulary spells it (owned by t, not NUL-terminated); -EINVAL for
 * ids out of range. */
int tokenizer_token_text(const tokenizer_t *t, int32_t id, const char **text, size_t *len);
/* Id of the token spelled exactly text[0..len), or TOKENIZER_NULL. */
int32_t tokenizer_find(const tokenizer_t *t, const char *text, size_t len);

#endif
