/*
 * Suite "tokenizer": worker/tokenizer.c against llama.cpp's token ids, recorded by
 * tests/fixtures/make_tokenizer_fixture.py into tests/fixtures/tokenizer_fixture.txt (this
 * suite only compares), plus round trips, streaming decode, the plain-array and GGUF
 * construction paths, and refusal of bad vocabularies. Tests on the default model skip when it
 * is absent (CKV_REQUIRE_MODEL=1 makes that a failure).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_log.h"
#include "ckv_test.h"
#include "gguf.h"
#include "tokenizer.h"

/* ------------------------------------------------------------------------------------------ */
/* the fixture                                                                                  */
/* ------------------------------------------------------------------------------------------ */

struct fx_case {
    char pre[32]; /* pre-tokenizer, or "spm" */
    bool add, parse;
    uint8_t *text;
    size_t len;
    int32_t *ids;
    int n_ids;
};

struct fx_spm_token {
    uint8_t *text;
    size_t len;
    float score;
    int32_t type;
};

struct fixture {
    int vocab, bos, eos;
    int32_t eog[64];
    int n_eog;
    uint64_t pieces_hash;
    struct fx_case *cases;
    int n_cases;
    struct fx_spm_token *spm;
    int n_spm;
};

static uint8_t *unhex(const char *h, size_t *len)
{
    if (strcmp(h, "-") == 0) {
        *len = 0;
        return calloc(1, 1);
    }
    size_t n = strlen(h) / 2;
    uint8_t *b = malloc(n + 1);
    cr_assert_not_null(b);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        cr_assert_eq(sscanf(h + 2 * i, "%2x", &v), 1, "bad hex %s", h);
        b[i] = (uint8_t)v;
    }
    b[n] = 0;
    *len = n;
    return b;
}

static int32_t *parse_ids(char *s, int *n)
{
    int cap = 16;
    int32_t *v = malloc((size_t)cap * sizeof(*v));
    *n = 0;
    for (char *tok = strtok(s, " \n"); tok; tok = strtok(NULL, " \n")) {
        if (strcmp(tok, "-") == 0)
            continue;
        if (*n == cap) {
            cap *= 2;
            v = realloc(v, (size_t)cap * sizeof(*v));
        }
        v[(*n)++] = (int32_t)strtol(tok, NULL, 10);
    }
    return v;
}

static struct fixture *fixture_load(void)
{
    static struct fixture fx;
    if (fx.vocab)
        return &fx;
    char path[1024];
    ckv_test_src_path("tests/fixtures/tokenizer_fixture.txt", path, sizeof(path));
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "fixture %s missing", path);
    static char line[1 << 16];
    int cap_cases = 0;
    while (fgets(line, sizeof(line), f)) {
        cr_assert(strchr(line, '\n'), "fixture line too long");
        char kw[32];
        if (line[0] == '#' || sscanf(line, "%31s", kw) != 1)
            continue;
        char *rest = line + strlen(kw);
        if (strcmp(kw, "vocab") == 0) {
            fx.vocab = atoi(rest);
        } else if (strcmp(kw, "bos") == 0) {
            fx.bos = atoi(rest);
        } else if (strcmp(kw, "eos") == 0) {
            fx.eos = atoi(rest);
        } else if (strcmp(kw, "eog") == 0) {
            int32_t *v = parse_ids(rest, &fx.n_eog);
            cr_assert_leq(fx.n_eog, 64);
            memcpy(fx.eog, v, (size_t)fx.n_eog * sizeof(*v));
            free(v);
        } else if (strcmp(kw, "pieces_fnv1a64") == 0) {
            fx.pieces_hash = strtoull(rest, NULL, 16);
        } else if (strcmp(kw, "case") == 0 || strcmp(kw, "spm_case") == 0) {
            if (fx.n_cases == cap_cases) {
                cap_cases = cap_cases ? 2 * cap_cases : 256;
                fx.cases = realloc(fx.cases, (size_t)cap_cases * sizeof(*fx.cases));
            }
            struct fx_case *c = &fx.cases[fx.n_cases++];
            memset(c, 0, sizeof(*c));
            char hex[1 << 15];
            int add, parse;
            if (kw[0] == 's') {
                strcpy(c->pre, "spm");
                cr_assert_eq(sscanf(rest, "%d %d %32767s", &add, &parse, hex), 3);
            } else {
                cr_assert_eq(sscanf(rest, "%31s %d %d %32767s", c->pre, &add, &parse, hex), 4);
            }
            c->add = add;
            c->parse = parse;
            c->text = unhex(hex, &c->len);
            cr_assert_not_null(fgets(line, sizeof(line), f));
            cr_assert_eq(strncmp(line, "ids", 3), 0, "'ids' expected after a case");
            c->ids = parse_ids(line + 3, &c->n_ids);
        } else if (strcmp(kw, "spm_token") == 0) {
            fx.spm = realloc(fx.spm, (size_t)(fx.n_spm + 1) * sizeof(*fx.spm));
            struct fx_spm_token *s = &fx.spm[fx.n_spm++];
            char hex[256];
            cr_assert_eq(sscanf(rest, "%255s %f %d", hex, &s->score, &s->type), 3);
            s->text = unhex(hex, &s->len);
        }
    }
    fclose(f);
    cr_assert_gt(fx.vocab, 0, "fixture without vocab line");
    return &fx;
}

static const char *show_bytes(const uint8_t *p, size_t n)
{
    static char buf[400];
    size_t o = 0;
    for (size_t i = 0; i < n && o + 8 < sizeof(buf); i++)
        o += (size_t)snprintf(buf + o, sizeof(buf) - o,
                              p[i] >= 0x20 && p[i] < 0x7f ? "%c" : "\\x%02x", p[i]);
    buf[o] = 0;
    return buf;
}

/* Encodes and compares; returns true on a match, and describes the first difference. */
static bool same_ids(const tokenizer_t *t, const struct fx_case *c)
{
    int32_t *ids;
    int n;
    int rc = tokenizer_encode_alloc(t, (const char *)c->text, c->len, c->add, c->parse, &ids, &n);
    cr_assert_eq(rc, 0, "encode: %s", ckv_strerror(rc));
    int k = 0;
    while (k < n && k < c->n_ids && ids[k] == c->ids[k])
        k++;
    bool ok = n == c->n_ids && k == n;
    if (!ok)
        cr_log_error("pre %s add %d parse %d text '%s': %d ids vs llama.cpp's %d, first "
                     "difference at %d: %d vs %d",
                     c->pre, c->add, c->parse, show_bytes(c->text, c->len), n, c->n_ids, k,
                     k < n ? ids[k] : -1, k < c->n_ids ? c->ids[k] : -1);
    free(ids);
    return ok;
}

static bool valid_utf8(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint8_t b = s[i];
        size_t k = b < 0x80                 ? 1
                   : b >= 0xc2 && b <= 0xdf ? 2
                   : b >= 0xe0 && b <= 0xef ? 3
                   : b >= 0xf0 && b <= 0xf4 ? 4
                                            : 0;
        if (!k || i + k > n)
            return false;
        for (size_t j = 1; j < k; j++)
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
        uint32_t cp = k == 1   ? b
                      : k == 2 ? (b & 0x1fu) << 6 | (s[i + 1] & 0x3fu)
                      : k == 3 ? (b & 0x0fu) << 12 | (s[i + 1] & 0x3fu) << 6 | (s[i + 2] & 0x3fu)
                               : (b & 0x07u) << 18 | (s[i + 1] & 0x3fu) << 12 |
                                     (s[i + 2] & 0x3fu) << 6 | (s[i + 3] & 0x3fu);
        if ((k == 2 && cp < 0x80) || (k == 3 && cp < 0x800) || (k == 4 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k;
    }
    return true;
}

/* ------------------------------------------------------------------------------------------ */
/* the default model                                                                            */
/* ------------------------------------------------------------------------------------------ */

static gguf_t *model_gguf;
static tokenizer_t *model_tok;

static void open_model(void)
{
    ckv_log_init("ckv-tests", CKV_LOG_ERROR);
    const char *path = ckv_test_default_model();
    if (!path) {
        cr_assert_null(getenv("CKV_REQUIRE_MODEL"), "default model missing");
        cr_skip_test("default model not fetched (deploy/fetch-model.sh)");
    }
    char err[512] = "";
    cr_assert_eq(gguf_open(path, &model_gguf, err, sizeof(err)), 0, "%s", err);
    int rc = tokenizer_new_from_gguf(model_gguf, &model_tok, err, sizeof(err));
    cr_assert_eq(rc, 0, "tokenizer: %s (%s)", err, ckv_strerror(rc));
}

/* Whether every byte of text has a token of its own in t (a byte without one is dropped by
 * the encoder, as by llama.cpp, so such a text cannot round-trip). */
static bool representable(const tokenizer_t *t, const uint8_t *text, size_t len)
{
    bool ok[256] = {false};
    for (int32_t id = 0; id < tokenizer_n_vocab(t); id++) {
        const char *p;
        size_t n;
        tokenizer_token_bytes(t, id, false, &p, &n);
        if (n == 1)
            ok[(uint8_t)p[0]] = true;
    }
    for (size_t i = 0; i < len; i++)
        if (!ok[text[i]])
            return false;
    return true;
}

static void close_model(void)
{
    tokenizer_destroy(&model_tok);
    gguf_close(&model_gguf);
}

TestSuite(tokenizer);

Test(tokenizer, matches_llamacpp_on_the_default_model, .init = open_model, .fini = close_model)
{
    struct fixture *fx = fixture_load();
    int n = 0, bad = 0;
    for (int i = 0; i < fx->n_cases; i++) {
        if (strcmp(fx->cases[i].pre, "smollm") != 0)
            continue;
        n++;
        bad += !same_ids(model_tok, &fx->cases[i]);
    }
    cr_assert_gt(n, 100, "fixture has only %d cases", n);
    cr_assert_eq(bad, 0, "%d of %d texts tokenized differently from llama.cpp", bad, n);
}

Test(tokenizer, vocabulary_facts_match_llamacpp, .init = open_model, .fini = close_model)
{
    struct fixture *fx = fixture_load();
    cr_assert_eq(tokenizer_n_vocab(model_tok), fx->vocab);
    cr_assert_eq(tokenizer_bos(model_tok), fx->bos);
    cr_assert_eq(tokenizer_eos(model_tok), fx->eos);
    cr_assert_eq(tokenizer_kind(model_tok), TOKENIZER_BPE);
    cr_assert_str_eq(tokenizer_pre(model_tok), "smollm");
    cr_assert_not(tokenizer_add_bos(model_tok)); /* add_bos_token false in the GGUF */
    int k = 0;
    for (int32_t id = 0; id < fx->vocab; id++) {
        bool want = k < fx->n_eog && fx->eog[k] == id;
        k += want;
        cr_assert_eq(tokenizer_is_eog(model_tok, id), want, "is_eog(%d)", id);
    }
    cr_assert_not(tokenizer_is_eog(model_tok, -1));
    cr_assert_not(tokenizer_is_eog(model_tok, fx->vocab));
    /* every token's decoded bytes, as llama.cpp's token_to_piece(special = true) */
    uint64_t h = 1469598103934665603ull;
    for (int32_t id = 0; id < fx->vocab; id++) {
        const char *p;
        size_t len;
        cr_assert_eq(tokenizer_token_bytes(model_tok, id, true, &p, &len), 0);
        uint8_t hdr[4] = {(uint8_t)len, (uint8_t)(len >> 8), (uint8_t)(len >> 16),
                          (uint8_t)(len >> 24)};
        for (int j = 0; j < 4; j++)
            h = (h ^ hdr[j]) * 1099511628211ull;
        for (size_t j = 0; j < len; j++)
            h = (h ^ (uint8_t)p[j]) * 1099511628211ull;
    }
    cr_assert_eq(h, fx->pieces_hash, "decoded pieces differ from llama.cpp's");
    /* control tokens are not rendered unless asked */
    const char *p;
    size_t len;
    int32_t im_end = tokenizer_find(model_tok, "<|im_end|>", 10);
    cr_assert_eq(im_end, 2);
    cr_assert_eq(tokenizer_token_bytes(model_tok, im_end, false, &p, &len), 0);
    cr_assert_eq(len, 0);
    cr_assert_eq(tokenizer_token_bytes(model_tok, im_end, true, &p, &len), 0);
    cr_assert_eq(len, 10);
    cr_assert_eq(tokenizer_token_bytes(model_tok, fx->vocab, true, &p, &len), -EINVAL);
    cr_assert_eq(tokenizer_token_type(model_tok, im_end), TOKENIZER_TOKEN_CONTROL);
}

/* The default model's vocabulary through tokenizer_new() with another pre-tokenizer: the same
 * vocabulary the fixture script wrote to GGUFs with that tokenizer.ggml.pre for llama.cpp. */
static tokenizer_t *model_with_pre(const char *pre)
{
    struct tokenizer_vocab v;
    tokenizer_vocab_defaults(&v);
    enum gguf_type et;
    uint64_t n_tok, n_merge;
    const void *data;
    cr_assert_eq(gguf_get_arr(model_gguf, "tokenizer.ggml.tokens", &et, &n_tok, &data, NULL, 0), 0);
    cr_assert_eq(gguf_get_arr(model_gguf, "tokenizer.ggml.merges", &et, &n_merge, &data, NULL, 0),
                 0);
    const char **tokens = malloc(n_tok * sizeof(*tokens));
    uint32_t *token_lens = malloc(n_tok * sizeof(*token_lens));
    const char **merges = malloc(n_merge * sizeof(*merges));
    uint32_t *merge_lens = malloc(n_merge * sizeof(*merge_lens));
    int32_t *types = malloc(n_tok * sizeof(*types));
    for (uint64_t i = 0; i < n_tok; i++) {
        struct gguf_str s;
        cr_assert_eq(gguf_get_arr_str(model_gguf, "tokenizer.ggml.tokens", i, &s), 0);
        tokens[i] = s.ptr;
        token_lens[i] = (uint32_t)s.len;
    }
    for (uint64_t i = 0; i < n_merge; i++) {
        struct gguf_str s;
        cr_assert_eq(gguf_get_arr_str(model_gguf, "tokenizer.ggml.merges", i, &s), 0);
        merges[i] = s.ptr;
        merge_lens[i] = (uint32_t)s.len;
    }
    cr_assert_eq(gguf_get_arr(model_gguf, "tokenizer.ggml.token_type", &et, &n_tok, &data, NULL, 0),
                 0);
    memcpy(types, data, n_tok * sizeof(*types));
    v.model = "gpt2";
    v.pre = pre;
    v.n_tokens = (int32_t)n_tok;
    v.tokens = tokens;
    v.token_lens = token_lens;
    v.types = types;
    v.n_merges = (int32_t)n_merge;
    v.merges = merges;
    v.merge_lens = merge_lens;
    v.bos_id = 1;
    v.eos_id = 2;
    v.unk_id = 0;
    v.pad_id = 2;
    v.add_bos = 0;
    v.add_space_prefix = 0;
    tokenizer_t *t = NULL;
    char err[256] = "";
    int rc = tokenizer_new(&v, &t, err, sizeof(err));
    cr_assert_eq(rc, 0, "pre %s: %s", pre, err);
    free(tokens);
    free(token_lens);
    free(merges);
    free(merge_lens);
    free(types);
    return t;
}

Test(tokenizer, matches_llamacpp_with_other_pre_tokenizers, .init = open_model, .fini = close_model)
{
    struct fixture *fx = fixture_load();
    char done[32][32];
    int n_pre = 0, n = 0, bad = 0;
    for (int i = 0; i < fx->n_cases; i++) {
        const char *pre = fx->cases[i].pre;
        if (strcmp(pre, "smollm") == 0 || strcmp(pre, "spm") == 0)
            continue;
        bool seen = false;
        for (int j = 0; j < n_pre; j++)
            seen |= strcmp(done[j], pre) == 0;
        if (seen)
            continue;
        cr_assert_lt(n_pre, 32);
        snprintf(done[n_pre++], sizeof(done[0]), "%s", pre);
        tokenizer_t *t = model_with_pre(pre);
        int bad_pre = 0;
        for (int j = i; j < fx->n_cases; j++) {
            if (strcmp(fx->cases[j].pre, pre) != 0)
                continue;
            n++;
            bad_pre += !same_ids(t, &fx->cases[j]);
        }
        if (bad_pre)
            cr_log_error("pre-tokenizer %s: %d texts differ", pre, bad_pre);
        bad += bad_pre;
        tokenizer_destroy(&t);
    }
    cr_assert_geq(n_pre, 10, "fixture covers only %d pre-tokenizers", n_pre);
    cr_assert_eq(bad, 0, "%d of %d (pre-tokenizer, text) pairs differ from llama.cpp", bad, n);
}

/* decode(encode(x)) == x for every valid UTF-8 text of the fixture, plain and with special
 * tokens parsed and rendered */
Test(tokenizer, round_trips_valid_utf8, .init = open_model, .fini = close_model)
{
    struct fixture *fx = fixture_load();
    int n = 0, dropped = 0;
    for (int i = 0; i < fx->n_cases; i++) {
        const struct fx_case *c = &fx->cases[i];
        if (strcmp(c->pre, "smollm") != 0 || !valid_utf8(c->text, c->len))
            continue;
        if (!representable(model_tok, c->text, c->len)) {
            dropped++;
            continue;
        }
        int32_t *ids;
        int n_ids;
        cr_assert_eq(tokenizer_encode_alloc(model_tok, (const char *)c->text, c->len, c->add,
                                            c->parse, &ids, &n_ids),
                     0);
        struct ckv_buf b = {0};
        cr_assert_eq(tokenizer_decode(model_tok, ids, n_ids, c->parse, &b), 0);
        cr_assert_eq(b.len, c->len, "'%s' came back %zu bytes long", show_bytes(c->text, c->len),
                     b.len);
        cr_assert(c->len == 0 || memcmp(b.data, c->text, c->len) == 0, "'%s' came back as '%s'",
                  show_bytes(c->text, c->len), show_bytes((uint8_t *)b.data, b.len));
        ckv_buf_free(&b);
        free(ids);
        n++;
    }
    cr_assert_gt(n, 80);
    cr_assert_gt(dropped, 0, "the fixture has a text with bytes SmolLM2 has no token for");
}

/* Random valid UTF-8 from a mix of scripts round-trips too. */
Test(tokenizer, round_trips_random_unicode, .init = open_model, .fini = close_model)
{
    static const uint32_t pool[] = {
        ' ',    ' ',    ' ',    '\n',   '\t',     'a',     'e',     'z',     'Q',    '0',   '7',
        '.',    '\'',   's',    '!',    0xe9,     0x436,   0x3b1,   0x5d0,   0x627,  0x915, 0x94d,
        0x4e2d, 0x65e5, 0x30ab, 0xac00, 0xe01,    0x1f389, 0x1f44d, 0x1f3fd, 0x200d, 0xa0,  0x3000,
        0x85,   0x2028, 0x301,  0xfeff, 0x10ffff, 0xe000,  0x660,   0xb2};
    srand(12345);
    for (int iter = 0; iter < 300; iter++) {
        char text[512];
        size_t len = 0;
        int n_cp = rand() % 100;
        for (int i = 0; i < n_cp; i++) {
            uint32_t cp = pool[(size_t)rand() % CKV_ARRAY_LEN(pool)];
            char *o = text + len;
            if (cp < 0x80) {
                o[0] = (char)cp;
                len += 1;
            } else if (cp < 0x800) {
                o[0] = (char)(0xc0 | cp >> 6);
                o[1] = (char)(0x80 | (cp & 0x3f));
                len += 2;
            } else if (cp < 0x10000) {
                o[0] = (char)(0xe0 | cp >> 12);
                o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
                o[2] = (char)(0x80 | (cp & 0x3f));
                len += 3;
            } else {
                o[0] = (char)(0xf0 | cp >> 18);
                o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
                o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
                o[3] = (char)(0x80 | (cp & 0x3f));
                len += 4;
            }
        }
        int32_t *ids;
        int n_ids;
        cr_assert_eq(tokenizer_encode_alloc(model_tok, text, len, false, false, &ids, &n_ids), 0);
        struct ckv_buf b = {0};
        cr_assert_eq(tokenizer_decode(model_tok, ids, n_ids, false, &b), 0);
        cr_assert(b.len == len && (len == 0 || memcmp(b.data, text, len) == 0),
                  "'%s' does not round-trip", show_bytes((uint8_t *)text, len));
        ckv_buf_free(&b);
        free(ids);
    }
}

/* Streaming: every chunk is whole UTF-8 (for valid input), and the chunks add up to the
 * decoded text. */
Test(tokenizer, streams_whole_utf8_sequences, .init = open_model, .fini = close_model)
{
    struct fixture *fx = fixture_load();
    int split_seen = 0;
    for (int i = 0; i < fx->n_cases; i++) {
        const struct fx_case *c = &fx->cases[i];
        if (strcmp(c->pre, "smollm") != 0)
            continue;
        bool valid = valid_utf8(c->text, c->len);
        struct tokenizer_stream st;
        tokenizer_stream_init(&st, model_tok, c->parse);
        struct ckv_buf all = {0}, chunk = {0}, whole = {0};
        for (int k = 0; k < c->n_ids; k++) {
            ckv_buf_reset(&chunk);
            cr_assert_eq(tokenizer_stream_push(&st, c->ids[k], &chunk), 0);
            if (valid)
                cr_assert(valid_utf8((uint8_t *)chunk.data, chunk.len),
                          "chunk %d of '%s' is not whole UTF-8", k, show_bytes(c->text, c->len));
            const char *p;
            size_t len;
            tokenizer_token_bytes(model_tok, c->ids[k], c->parse, &p, &len);
            split_seen += len && !valid_utf8((const uint8_t *)p, len) && valid;
            ckv_buf_append(&all, chunk.data, chunk.len);
        }
        ckv_buf_reset(&chunk);
        cr_assert_eq(tokenizer_stream_flush(&st, &chunk), 0);
        ckv_buf_append(&all, chunk.data, chunk.len);
        cr_assert_eq(tokenizer_decode(model_tok, c->ids, c->n_ids, c->parse, &whole), 0);
        cr_assert(
            all.len == whole.len && (all.len == 0 || memcmp(all.data, whole.data, all.len) == 0),
            "streamed text of '%s' differs from the decoded text", show_bytes(c->text, c->len));
        ckv_buf_free(&all);
        ckv_buf_free(&chunk);
        ckv_buf_free(&whole);
    }
    /* the fixture must contain tokens that end inside a UTF-8 sequence, or this proved nothing */
    cr_assert_gt(split_seen, 5, "no token piece split a UTF-8 sequence");
}

Test(tokenizer, stream_holds_partial_bytes_until_complete, .init = open_model, .fini = close_model)
{
    /* byte tokens: each piece is one byte of "€" (e2 82 ac) then "x" */
    const uint8_t seq[4] = {0xe2, 0x82, 0xac, 'x'};
    int32_t bytes[4] = {-1, -1, -1, -1};
    for (int32_t id = 0; id < tokenizer_n_vocab(model_tok); id++) {
        const char *p;
        size_t len;
        tokenizer_token_bytes(model_tok, id, false, &p, &len);
        for (int i = 0; i < 4; i++)
            if (len == 1 && (uint8_t)p[0] == seq[i])
                bytes[i] = id;
    }
    for (int i = 0; i < 4; i++)
        cr_assert_geq(bytes[i], 0, "no token for byte %02x", seq[i]);
    struct tokenizer_stream st;
    tokenizer_stream_init(&st, model_tok, false);
    struct ckv_buf out = {0};
    cr_assert_eq(tokenizer_stream_push(&st, bytes[0], &out), 0);
    cr_assert_eq(out.len, 0);
    cr_assert_eq(tokenizer_stream_push(&st, bytes[1], &out), 0);
    cr_assert_eq(out.len, 0);
    cr_assert_eq(tokenizer_stream_push(&st, bytes[2], &out), 0);
    cr_assert_eq(out.len, 3);
    cr_assert_eq(memcmp(out.data, "\xe2\x82\xac", 3), 0);
    cr_assert_eq(tokenizer_stream_push(&st, bytes[3], &out), 0);
    cr_assert_str_eq(out.data, "\xe2\x82\xac"
                               "x");
    /* an incomplete sequence at the end comes out at flush */
    ckv_buf_reset(&out);
    cr_assert_eq(tokenizer_stream_push(&st, bytes[0], &out), 0);
    cr_assert_eq(out.len, 0);
    cr_assert_eq(tokenizer_stream_flush(&st, &out), 0);
    cr_assert_eq(out.len, 1);
    /* a sequence broken by another byte passes through as it is */
    ckv_buf_reset(&out);
    tokenizer_stream_push(&st, bytes[0], &out);
    tokenizer_stream_push(&st, bytes[3], &out);
    cr_assert_eq(out.len, 2);
    cr_assert_eq(memcmp(out.data, "\xe2x", 2), 0);
    cr_assert_eq(tokenizer_stream_push(&st, -1, &out), -EINVAL);
    ckv_buf_free(&out);
}

Test(tokenizer, special_tokens_only_when_asked, .init = open_model, .fini = close_model)
{
    const char *text = "<|im_start|>user";
    int32_t ids[16];
    int n;
    cr_assert_eq(tokenizer_encode(model_tok, text, strlen(text), false, true, ids, 16, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(tokenizer_encode(model_tok, text, strlen(text), false, false, ids, 16, &n), 0);
    cr_assert_gt(n, 2);
    for (int i = 0; i < n; i++)
        cr_assert_neq(tokenizer_token_type(model_tok, ids[i]), TOKENIZER_TOKEN_CONTROL);
}

Test(tokenizer, reports_enospc_with_the_count, .init = open_model, .fini = close_model)
{
    const char *text = "one two three four five six";
    int32_t all[64], few[3];
    int n_all, n;
    cr_assert_eq(tokenizer_encode(model_tok, text, strlen(text), false, false, all, 64, &n_all), 0);
    cr_assert_gt(n_all, 3);
    cr_assert_eq(tokenizer_encode(model_tok, text, strlen(text), false, false, few, 3, &n),
                 -ENOSPC);
    cr_assert_eq(n, n_all);
    cr_assert_eq(memcmp(few, all, sizeof(few)), 0);
    cr_assert_eq(tokenizer_encode(model_tok, text, strlen(text), false, false, NULL, 0, &n),
                 -ENOSPC);
    cr_assert_eq(n, n_all);
    cr_assert_eq(tokenizer_encode(model_tok, NULL, 3, false, false, all, 64, &n), -EINVAL);
    cr_assert_eq(tokenizer_encode(model_tok, NULL, 0, false, false, all, 64, &n), 0);
    cr_assert_eq(n, 0);
    int32_t bad[2] = {5, 1 << 30};
    struct ckv_buf b = {0};
    cr_assert_eq(tokenizer_decode(model_tok, bad, 2, false, &b), -EINVAL);
    cr_assert_eq(b.len, 0);
}

/* Arbitrary bytes never crash and give ids inside the vocabulary (CI's stand-in for the
 * libFuzzer target tests/fuzz/fuzz_tokenizer.c). */
Test(tokenizer, survives_random_bytes, .init = open_model, .fini = close_model)
{
    static const uint8_t pool[] = {'a',  ' ',  '\n', '1',  '\'', '<',  '|',  '>',
                                   0x80, 0xbf, 0xc0, 0xc3, 0xe2, 0xed, 0xa0, 0xf0,
                                   0xf4, 0xf5, 0x90, 0xff, 0x00, 0x9f, 0x8e};
    srand(7);
    for (int iter = 0; iter < 2000; iter++) {
        uint8_t text[300];
        size_t len = (size_t)(rand() % 300);
        for (size_t i = 0; i < len; i++)
            text[i] = rand() % 3 ? pool[(size_t)rand() % sizeof(pool)] : (uint8_t)rand();
        int32_t *ids;
        int n;
        cr_assert_eq(
            tokenizer_encode_alloc(model_tok, (char *)text, len, iter & 1, iter & 2, &ids, &n), 0);
        for (int i = 0; i < n; i++)
            cr_assert(ids[i] >= 0 && ids[i] < tokenizer_n_vocab(model_tok));
        struct ckv_buf b = {0};
        cr_assert_eq(tokenizer_decode(model_tok, ids, n, true, &b), 0);
        if (valid_utf8(text, len) && !(iter & 2) && representable(model_tok, text, len))
            cr_assert(b.len == len && (len == 0 || memcmp(b.data, text, len) == 0));
        ckv_buf_free(&b);
        free(ids);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* SentencePiece                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* The fixture's SPM vocabulary as plain arrays. */
static tokenizer_t *spm_from_arrays(struct fixture *fx)
{
    cr_assert_gt(fx->n_spm, 259);
    const char **tokens = malloc((size_t)fx->n_spm * sizeof(*tokens));
    uint32_t *lens = malloc((size_t)fx->n_spm * sizeof(*lens));
    float *scores = malloc((size_t)fx->n_spm * sizeof(*scores));
    int32_t *types = malloc((size_t)fx->n_spm * sizeof(*types));
    for (int i = 0; i < fx->n_spm; i++) {
        tokens[i] = (const char *)fx->spm[i].text;
        lens[i] = (uint32_t)fx->spm[i].len;
        scores[i] = fx->spm[i].score;
        types[i] = fx->spm[i].type;
    }
    struct tokenizer_vocab v;
    tokenizer_vocab_defaults(&v); /* SentencePiece defaults: BOS 1, EOS 2, UNK 0, add BOS */
    v.model = "llama";
    v.n_tokens = fx->n_spm;
    v.tokens = tokens;
    v.token_lens = lens;
    v.scores = scores;
    v.types = types;
    tokenizer_t *t = NULL;
    char err[256] = "";
    cr_assert_eq(tokenizer_new(&v, &t, err, sizeof(err)), 0, "%s", err);
    free(tokens);
    free(lens);
    free(scores);
    free(types);
    return t;
}

static struct ckv_test_img spm_image(struct fixture *fx)
{
    struct ckv_test_img m = {0};
    ckv_test_img_header(&m, 3, 0, 4);
    ckv_test_img_kv_str(&m, "tokenizer.ggml.model", "llama");
    ckv_test_img_kv_arr(&m, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, (uint64_t)fx->n_spm);
    for (int i = 0; i < fx->n_spm; i++)
        ckv_test_img_bytes(&m, fx->spm[i].text, fx->spm[i].len);
    ckv_test_img_kv_arr(&m, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, (uint64_t)fx->n_spm);
    for (int i = 0; i < fx->n_spm; i++)
        ckv_test_img_put(&m, &fx->spm[i].score, 4);
    ckv_test_img_kv_arr(&m, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, (uint64_t)fx->n_spm);
    for (int i = 0; i < fx->n_spm; i++)
        ckv_test_img_put(&m, &fx->spm[i].type, 4);
    return m;
}

Test(tokenizer, sentencepiece_matches_llamacpp)
{
    ckv_log_init("ckv-tests", CKV_LOG_ERROR);
    struct fixture *fx = fixture_load();
    tokenizer_t *arrays = spm_from_arrays(fx);
    struct ckv_test_img m = spm_image(fx);
    gguf_t *g;
    char err[256] = "";
    cr_assert_eq(gguf_open_mem(m.p, m.len, &g, err, sizeof(err)), 0, "%s", err);
    tokenizer_t *from_gguf = NULL;
    cr_assert_eq(tokenizer_new_from_gguf(g, &from_gguf, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(tokenizer_kind(from_gguf), TOKENIZER_SPM);
    cr_assert(tokenizer_add_bos(from_gguf));
    cr_assert_eq(tokenizer_bos(from_gguf), 1);
    cr_assert_eq(tokenizer_unk(from_gguf), 0);
    int n = 0, bad = 0;
    for (int i = 0; i < fx->n_cases; i++) {
        if (strcmp(fx->cases[i].pre, "spm") != 0)
            continue;
        n++;
        bad += !same_ids(arrays, &fx->cases[i]);
        bad += !same_ids(from_gguf, &fx->cases[i]);
    }
    cr_assert_gt(n, 30);
    cr_assert_eq(bad, 0, "%d SentencePiece encodings differ from llama.cpp", bad);

    /* round trip, incl. byte fallback ("©" has no token: <0xC2><0xA9>) */
    const char *texts[] = {"hello world", "  two  spaces ", "h\xc3\xa9llo \xc2\xa9 \xe6\x97\xa5",
                           "x\ny", ""};
    for (size_t i = 0; i < CKV_ARRAY_LEN(texts); i++) {
        int32_t *ids;
        int k;
        cr_assert_eq(
            tokenizer_encode_alloc(from_gguf, texts[i], strlen(texts[i]), true, false, &ids, &k),
            0);
        cr_assert_geq(k, 1);
        cr_assert_eq(ids[0], 1, "BOS first");
        struct ckv_buf b = {0};
        cr_assert_eq(tokenizer_decode(from_gguf, ids, k, false, &b), 0);
        cr_assert_str_eq(b.len ? b.data : "", texts[i]);
        /* the stream strips the prefix space the same way */
        struct tokenizer_stream st;
        tokenizer_stream_init(&st, from_gguf, false);
        struct ckv_buf s = {0};
        for (int j = 0; j < k; j++)
            cr_assert_eq(tokenizer_stream_push(&st, ids[j], &s), 0);
        tokenizer_stream_flush(&st, &s);
        cr_assert_str_eq(s.len ? s.data : "", texts[i]);
        ckv_buf_free(&b);
        ckv_buf_free(&s);
        free(ids);
    }
    tokenizer_destroy(&arrays);
    tokenizer_destroy(&from_gguf);
    cr_assert_null(from_gguf);
    gguf_close(&g);
    free(m.p);
}

/* ------------------------------------------------------------------------------------------ */
/* refusals                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static int try_vocab(struct tokenizer_vocab *v, char *err, size_t errlen)
{
    tokenizer_t *t = NULL;
    int rc = tokenizer_new(v, &t, err, errlen);
    if (rc == 0)
        tokenizer_destroy(&t);
    else
        cr_assert_null(t);
    return rc;
}

Test(tokenizer, refuses_bad_vocabularies)
{
    ckv_log_init("ckv-tests", CKV_LOG_OFF);
    const char *tokens[] = {"a", "b", "ab", "a"};
    const char *merges[] = {"a b"};
    struct tokenizer_vocab v;
    char err[256];

    tokenizer_vocab_defaults(&v);
    v.model = "gpt2";
    v.pre = "gpt-2";
    v.n_tokens = 3;
    v.tokens = tokens;
    v.n_merges = 1;
    v.merges = merges;
    cr_assert_eq(try_vocab(&v, err, sizeof(err)), 0, "%s", err);

    v.pre = "no-such-pre";
    cr_assert_eq(try_vocab(&v, err, sizeof(err)), CKV_EUNSUPPORTED);
    cr_assert(strstr(err, "no-such-pre"), "%s", err);
    cr_assert(strstr(err, "pre-tokenizer"), "%s", err);

    v.pre = "gpt-2";
    v.model = "bert";
    cr_assert_eq(try_vocab(&v, err, sizeof(err)), CKV_EUNSUPPORTED);
    cr_assert(strstr(err, "bert"), "%s", err);

    v.model = "gpt2";
    v.n_tokens = 4; /* "a" twice */
    cr_assert_eq(try_vocab(&v, err, sizeof(err)), CKV_EFORMAT);
    cr_assert(strstr(err, "duplicate token 'a' at ids 0 and 3"), "%s", err);

    v.n_tokens = 3;
    v.n_merges = 0;
    cr_assert_eq(try_vocab(&v, err, sizeof(err)), CKV_EFORMAT);
    cr_assert(strstr(err, "merges"), "%s", err);

    v.n_merges = 1;
    v.add_bos = 1; /* no BOS id */
    cr_assert_eq(try_vocab(&v, err, sizeof(err)), CKV_EFORMAT);
    cr_assert(strstr(err, "BOS"), "%s", err);

    v.add_bos = 0;
    v.bos_id = 99; /* out of range: disabled with a warning, not fatal */
    tokenizer_t *t = NULL;
    cr_assert_eq(tokenizer_new(&v, &t, err, sizeof(err)), 0);
    cr_assert_eq(tokenizer_bos(t), TOKENIZER_NULL);
    /* the tiny vocabulary merges "a"+"b" */
    int32_t ids[8];
    int n;
    cr_assert_eq(tokenizer_encode(t, "ab", 2, false, false, ids, 8, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(ids[0], 2);
    tokenizer_destroy(&t);

    v.n_tokens = 0;
    cr_assert_eq(try_vocab(&v, err, sizeof(err)), CKV_EFORMAT);
    v.model = NULL;
    cr_assert_eq(try_vocab(&v, err, sizeof(err)), CKV_EFORMAT);
}

Test(tokenizer, refuses_bad_gguf_metadata)
{
    ckv_log_init("ckv-tests", CKV_LOG_OFF);
    char err[256];
    gguf_t *g;
    tokenizer_t *t = NULL;

    struct ckv_test_img m = {0}; /* no tokenizer.ggml.model */
    ckv_test_img_header(&m, 3, 0, 1);
    ckv_test_img_kv_u32(&m, "general.alignment", 32);
    cr_assert_eq(gguf_open_mem(m.p, m.len, &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(tokenizer_new_from_gguf(g, &t, err, sizeof(err)), CKV_EFORMAT);
    cr_assert(strstr(err, "tokenizer.ggml.model"), "%s", err);
    gguf_close(&g);
    free(m.p);

    m = (struct ckv_test_img){0}; /* tokens of the wrong type */
    ckv_test_img_header(&m, 3, 0, 2);
    ckv_test_img_kv_str(&m, "tokenizer.ggml.model", "llama");
    ckv_test_img_kv_arr(&m, "tokenizer.ggml.tokens", GGUF_TYPE_UINT32, 2);
    ckv_test_img_u32(&m, 1);
    ckv_test_img_u32(&m, 2);
    cr_assert_eq(gguf_open_mem(m.p, m.len, &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(tokenizer_new_from_gguf(g, &t, err, sizeof(err)), CKV_EFORMAT);
    cr_assert(strstr(err, "tokenizer.ggml.tokens"), "%s", err);
    gguf_close(&g);
    free(m.p);

    m = (struct ckv_test_img){0}; /* fewer scores than tokens */
    ckv_test_img_header(&m, 3, 0, 3);
    ckv_test_img_kv_str(&m, "tokenizer.ggml.model", "llama");
    ckv_test_img_kv_arr(&m, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, 2);
    ckv_test_img_str(&m, "x");
    ckv_test_img_str(&m, "y");
    ckv_test_img_kv_arr(&m, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, 1);
    ckv_test_img_u32(&m, 0);
    cr_assert_eq(gguf_open_mem(m.p, m.len, &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(tokenizer_new_from_gguf(g, &t, err, sizeof(err)), CKV_EFORMAT);
    cr_assert(strstr(err, "tokenizer.ggml.scores"), "%s", err);
    gguf_close(&g);
    free(m.p);

    m = (struct ckv_test_img){0}; /* gpt2 with an unknown pre-tokenizer */
    ckv_test_img_header(&m, 3, 0, 4);
    ckv_test_img_kv_str(&m, "tokenizer.ggml.model", "gpt2");
    ckv_test_img_kv_str(&m, "tokenizer.ggml.pre", "mystery-9000");
    ckv_test_img_kv_arr(&m, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, 2);
    ckv_test_img_str(&m, "x");
    ckv_test_img_str(&m, "y");
    ckv_test_img_kv_arr(&m, "tokenizer.ggml.merges", GGUF_TYPE_STRING, 1);
    ckv_test_img_str(&m, "x y");
    cr_assert_eq(gguf_open_mem(m.p, m.len, &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(tokenizer_new_from_gguf(g, &t, err, sizeof(err)), CKV_EUNSUPPORTED);
    cr_assert(strstr(err, "mystery-9000"), "%s", err);
    cr_assert_null(t);
    gguf_close(&g);
    free(m.p);
}
