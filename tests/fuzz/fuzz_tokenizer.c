/*
 * libFuzzer target: the tokenizer (worker/tokenizer.c) on arbitrary bytes. The first input
 * byte picks the vocabulary (the default model's byte-level BPE when it is there, or a small
 * SentencePiece vocabulary built here) and the flags; the rest is encoded. Then the bytes are
 * read as token ids (some out of range) and decoded, whole and streamed.
 *
 * Invariants checked beyond what ASan/UBSan catch: ids are inside the vocabulary, -ENOSPC
 * reports the same count, the streamed text equals the decoded text, and valid UTF-8 without
 * special tokens round-trips.
 *
 *   CKV_MODEL_DIR=~/.cache/clusterkv/models build-fuzz/bin/fuzz-tokenizer -max_total_time=300
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_buf.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "gguf.h"
#include "tokenizer.h"

static tokenizer_t *bpe, *spm;
static bool bpe_byte_ok[256]; /* the byte has a token (SmolLM2 lacks six control bytes, which
                                 llama.cpp drops and so do we: no round trip through them) */

static tokenizer_t *make_spm(void)
{
    static const char *pieces[] = {
        "<unk>", "<s>", "</s>", "\xe2\x96\x81", "\xe2\x96\x81t", "he", "\xe2\x96\x81the", "ll",
        "llo",   "a",   "b",    "ab",           "<tool>"};
    static const int32_t piece_types[] = {2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4};
    enum { N_PIECES = sizeof(pieces) / sizeof(pieces[0]) };
    static char bytes[256][8];
    const char *tokens[N_PIECES + 256];
    float scores[N_PIECES + 256];
    int32_t types[N_PIECES + 256];
    int n = 0;
    for (int i = 0; i < N_PIECES; i++, n++) {
        tokens[n] = pieces[i];
        scores[n] = -(float)i;
        types[n] = piece_types[i];
    }
    for (int b = 0; b < 256; b++, n++) {
        snprintf(bytes[b], sizeof(bytes[b]), "<0x%02X>", b);
        tokens[n] = bytes[b];
        scores[n] = 0;
        types[n] = 6;
    }
    struct tokenizer_vocab v;
    tokenizer_vocab_defaults(&v);
    v.model = "llama";
    v.n_tokens = n;
    v.tokens = tokens;
    v.scores = scores;
    v.types = types;
    tokenizer_t *t = NULL;
    ASSERT(tokenizer_new(&v, &t, NULL, 0) == 0);
    return t;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    ckv_log_init("fuzz-tokenizer", CKV_LOG_ERROR);
    char path[1024];
    const char *dir = getenv("CKV_MODEL_DIR");
    const char *home = getenv("HOME");
    if (dir)
        snprintf(path, sizeof(path), "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    else
        snprintf(path, sizeof(path), "%s/.cache/clusterkv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 home ? home : "/root");
    gguf_t *g = NULL;
    if (gguf_open(path, &g, NULL, 0) == 0) {
        ASSERT(tokenizer_new_from_gguf(g, &bpe, NULL, 0) == 0);
        gguf_close(&g);
        for (int32_t id = 0; id < tokenizer_n_vocab(bpe); id++) {
            const char *p;
            size_t len;
            tokenizer_token_bytes(bpe, id, false, &p, &len);
            if (len == 1)
                bpe_byte_ok[(uint8_t)p[0]] = true;
        }
    } else {
        fprintf(stderr, "fuzz-tokenizer: %s not found, fuzzing the SentencePiece vocabulary only\n",
                path);
    }
    spm = make_spm();
    return 0;
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
        if ((b == 0xe0 && s[i + 1] < 0xa0) || (b == 0xed && s[i + 1] > 0x9f) ||
            (b == 0xf0 && s[i + 1] < 0x90) || (b == 0xf4 && s[i + 1] > 0x8f))
            return false;
        i += k;
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    uint8_t ctl = data[0];
    const tokenizer_t *t = (ctl & 1) && bpe ? bpe : spm;
    bool add = ctl & 2, parse = ctl & 4, render = ctl & 8;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;

    int32_t *ids = NULL;
    int n = 0;
    ASSERT(tokenizer_encode_alloc(t, text, len, add, parse, &ids, &n) == 0);
    for (int i = 0; i < n; i++)
        ASSERT(ids[i] >= 0 && ids[i] < tokenizer_n_vocab(t));
    int32_t few[4];
    int n2 = -1;
    int rc = tokenizer_encode(t, text, len, add, parse, few, 4, &n2);
    ASSERT(n2 == n && (rc == 0) == (n <= 4));
    ASSERT(n == 0 || memcmp(few, ids, (size_t)CKV_MIN(n, 4) * sizeof(*ids)) == 0);

    struct ckv_buf dec = {0}, streamed = {0};
    ASSERT(tokenizer_decode(t, ids, n, render, &dec) == 0);
    bool representable = true;
    for (size_t i = 0; i < len; i++)
        representable &= bpe_byte_ok[data[1 + i]];
    if (!parse && !add && t == bpe && representable && valid_utf8(data + 1, len))
        ASSERT(dec.len == len && (len == 0 || memcmp(dec.data, text, len) == 0));
    struct tokenizer_stream st;
    tokenizer_stream_init(&st, t, render);
    for (int i = 0; i < n; i++)
        ASSERT(tokenizer_stream_push(&st, ids[i], &streamed) == 0);
    ASSERT(tokenizer_stream_flush(&st, &streamed) == 0);
    ASSERT(streamed.len == dec.len && (dec.len == 0 || !memcmp(streamed.data, dec.data, dec.len)));
    free(ids);

    /* the same bytes as ids, 3 bytes each, some out of range */
    int n_raw = (int)(len / 3);
    int32_t *raw = malloc((size_t)(n_raw ? n_raw : 1) * sizeof(*raw));
    for (int i = 0; i < n_raw; i++)
        raw[i] = (int32_t)(data[1 + 3 * i] | data[2 + 3 * i] << 8 | (data[3 + 3 * i] & 1) << 16) -
                 (data[3 + 3 * i] & 2 ? 70000 : 0);
    ckv_buf_reset(&dec);
    bool all_in = true;
    for (int i = 0; i < n_raw; i++)
        all_in &= raw[i] >= 0 && raw[i] < tokenizer_n_vocab(t);
    ASSERT((tokenizer_decode(t, raw, n_raw, render, &dec) == 0) == all_in);
    tokenizer_stream_init(&st, t, render);
    for (int i = 0; i < n_raw; i++) {
        int r = tokenizer_stream_push(&st, raw[i], &streamed);
        ASSERT(r == 0 || r == -EINVAL);
    }
    tokenizer_stream_flush(&st, &streamed);
    free(raw);
    ckv_buf_free(&dec);
    ckv_buf_free(&streamed);
    return 0;
}
