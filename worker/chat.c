/*
 * Chat templates (see chat.h). Detection follows llama.cpp's llm_chat_detect_template
 * (src/llama-chat.cpp): the same marker strings, tested in the same order, so that a template
 * is put in the same family llama.cpp would put it in; families llama.cpp knows but this file
 * does not format are reported by name rather than mistaken for another. The formatting of
 * each family is llama.cpp's llm_chat_apply_template's (tests/worker/test_chat.c compares
 * against its output), plus the literal default system prompt for ChatML templates that have
 * one, which llama.cpp leaves out and the model's Jinja template puts in.
 */
#include "chat.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"

static const struct {
    const char *name;
    enum chat_format format;
} FORMATS[] = {
    {"chatml", CHAT_FORMAT_CHATML},
    {"llama3", CHAT_FORMAT_LLAMA3},
    {"llama2", CHAT_FORMAT_LLAMA2},
    {"llama2-sys", CHAT_FORMAT_LLAMA2_SYS},
    {"llama2-sys-bos", CHAT_FORMAT_LLAMA2_SYS_BOS},
    {"llama2-sys-strip", CHAT_FORMAT_LLAMA2_SYS_STRIP},
    {"mistral-v7", CHAT_FORMAT_MISTRAL_V7},
    {"phi3", CHAT_FORMAT_PHI3},
    {"zephyr", CHAT_FORMAT_ZEPHYR},
    {"gemma", CHAT_FORMAT_GEMMA},
};

const char *chat_format_name(enum chat_format f)
{
    for (size_t i = 0; i < CKV_ARRAY_LEN(FORMATS); i++)
        if (FORMATS[i].format == f)
            return FORMATS[i].name;
    return "unknown";
}

int chat_template_by_name(const char *name, struct chat_template *out, char *err, size_t errlen)
{
    ASSERT(out);
    memset(out, 0, sizeof(*out));
    for (size_t i = 0; name && i < CKV_ARRAY_LEN(FORMATS); i++)
        if (strcmp(FORMATS[i].name, name) == 0) {
            out->format = FORMATS[i].format;
            return 0;
        }
    return ckv_errorf(CKV_EUNSUPPORTED, err, errlen,
                      "chat template '%.40s' unknown; known: chatml, llama3, llama2, llama2-sys, "
                      "llama2-sys-bos, llama2-sys-strip, mistral-v7, phi3, zephyr, gemma",
                      name ? name : "(null)");
}

void chat_template_free(struct chat_template *t)
{
    if (!t)
        return;
    free(t->default_system);
    memset(t, 0, sizeof(*t));
}

/* ---- detection ---- */

struct text {
    const char *p;
    size_t n;
};

static const char *find(struct text t, const char *needle)
{
    return memmem(t.p, t.n, needle, strlen(needle));
}

static bool has(struct text t, const char *needle)
{
    return find(t, needle) != NULL;
}

/*
 * The literal default system prompt of a ChatML template: a string literal of the template
 * that starts with "<|im_start|>system" + newline and holds the whole prompt up to
 * "<|im_end|>", as SmolLM2's and Qwen2's
 *   {{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
 * (the newline may be a real one or the escape "\n"). A literal that stops before
 * "<|im_end|>" (`'<|im_start|>system\n' + message['content']`) is not one. Returns a malloc'ed
 * unescaped copy, NULL when there is none; *oom on allocation failure.
 */
static char *chatml_default_system(struct text t, bool *oom)
{
    static const char open[] = "<|im_start|>system";
    *oom = false;
    for (const char *at = find(t, open); at;) {
        const char *end = t.p + t.n;
        const char *q = at - 1;
        char quote = at > t.p ? *q : 0;
        const char *s = at + strlen(open);
        if ((quote == '\'' || quote == '"') && s < end) {
            if (*s == '\n')
                s++;
            else if (end - s >= 2 && s[0] == '\\' && s[1] == 'n')
                s += 2;
            else
                s = NULL;
        } else {
            s = NULL;
        }
        const char *close = s ? memmem(s, (size_t)(end - s), "<|im_end|>", 10) : NULL;
        if (close && close > s) {
            /* the whole prompt must lie inside the literal: no unescaped closing quote */
            bool inside = true;
            for (const char *c = s; c < close && inside; c++) {
                if (*c == '\\')
                    c++;
                else if (*c == quote)
                    inside = false;
            }
            if (inside) {
                char *out = malloc((size_t)(close - s) + 1);
                if (!out) {
                    *oom = true;
                    return NULL;
                }
                size_t o = 0;
                for (const char *c = s; c < close; c++) {
                    if (*c == '\\' && c + 1 < close) {
                        c++;
                        out[o++] = *c == 'n' ? '\n' : *c == 't' ? '\t' : *c == 'r' ? '\r' : *c;
                    } else {
                        out[o++] = *c;
                    }
                }
                out[o] = '\0';
                return out;
            }
        }
        const char *from = at + 1;
        at = memmem(from, (size_t)(end - from), open, strlen(open));
    }
    return NULL;
}

int chat_template_detect(const char *tmpl, size_t len, struct chat_template *out, char *err,
                         size_t errlen)
{
    ASSERT(out);
    memset(out, 0, sizeof(*out));
    if (!tmpl)
        return -EINVAL;
    struct text t = {tmpl, len};
    /* llama.cpp accepts a family name in place of a template */
    for (size_t i = 0; i < CKV_ARRAY_LEN(FORMATS); i++)
        if (strlen(FORMATS[i].name) == len && memcmp(FORMATS[i].name, tmpl, len) == 0) {
            out->format = FORMATS[i].format;
            return 0;
        }

    const char *other = NULL; /* a family llama.cpp knows and we do not format */
    if (has(t, "<|im_start|>")) {
        if (has(t, "<|im_sep|>"))
            other = "phi4";
        else if (has(t, "<end_of_utterance>"))
            other = "smolvlm";
        else
            out->format = CHAT_FORMAT_CHATML;
    } else if ((len >= 7 && memcmp(tmpl, "mistral", 7) == 0) || has(t, "[INST]")) {
        if (has(t, "[SYSTEM_PROMPT]"))
            out->format = CHAT_FORMAT_MISTRAL_V7;
        else if (has(t, "' [INST] ' + system_message") || has(t, "[AVAILABLE_TOOLS]"))
            other = "mistral-v1/v3";
        else if (has(t, "content.strip()"))
            out->format = CHAT_FORMAT_LLAMA2_SYS_STRIP;
        else if (has(t, "bos_token + '[INST]"))
            out->format = CHAT_FORMAT_LLAMA2_SYS_BOS;
        else if (has(t, "<<SYS>>"))
            out->format = CHAT_FORMAT_LLAMA2_SYS;
        else
            out->format = CHAT_FORMAT_LLAMA2;
    } else if (has(t, "<|assistant|>") && has(t, "<|end|>")) {
        out->format = CHAT_FORMAT_PHI3;
    } else if (has(t, "[gMASK]<sop>")) {
        other = "chatglm4";
    } else if (has(t, "<|assistant|>") && has(t, "<|user|>")) {
        other = has(t, "</s>") ? "falcon3" : "glmedge";
    } else if (has(t, "<|user|>") && has(t, "<|endoftext|>")) {
        out->format = CHAT_FORMAT_ZEPHYR;
    } else if (has(t, "bos_token + message['role']")) {
        other = "monarch";
    } else if (has(t, "<start_of_turn>")) {
        out->format = CHAT_FORMAT_GEMMA;
    } else if (has(t, "<|start_header_id|>") && has(t, "<|end_header_id|>")) {
        /* llama.cpp tests a dozen other families first; none of their markers can be in a
         * Llama-3 template, and we do not format them */
        out->format = CHAT_FORMAT_LLAMA3;
    }
    if (other)
        return ckv_errorf(CKV_EUNSUPPORTED, err, errlen,
                          "chat template looks like llama.cpp's '%s', which this build does not "
                          "format; name a template instead (chatml, llama3, llama2, ...)",
                          other);
    if (!out->format)
        return ckv_errorf(CKV_EUNSUPPORTED, err, errlen,
                          "chat template not recognised (%zu bytes, no known markers such as "
                          "<|im_start|>, [INST], <|start_header_id|>, <start_of_turn>); name a "
                          "template instead (chatml, llama3, llama2, ...)",
                          len);
    if (out->format == CHAT_FORMAT_CHATML) {
        bool oom;
        out->default_system = chatml_default_system(t, &oom);
        if (oom)
            return ckv_errorf(-ENOMEM, err, errlen, "chat template: out of memory");
    }
    return 0;
}

int chat_template_from_gguf(const gguf_t *g, const char *name, struct chat_template *out, char *err,
                            size_t errlen)
{
    ASSERT(g && out);
    memset(out, 0, sizeof(*out));
    if (name)
        return chat_template_by_name(name, out, err, errlen);
    struct gguf_str s;
    int rc = gguf_get_str(g, "tokenizer.chat_template", &s, err, errlen);
    if (rc == -ENOENT)
        return ckv_errorf(-ENOENT, err, errlen,
                          "the model has no chat template (tokenizer.chat_template); name one "
                          "(chatml, llama3, llama2, ...)");
    if (rc < 0)
        return rc;
    return chat_template_detect(s.ptr, s.len, out, err, errlen);
}

/* ---- formatting ---- */

/* llama.cpp's trim(): ASCII white space (isspace in the C locale) off both ends */
static void append_trimmed(struct ckv_buf *b, const char *s)
{
    size_t n = strlen(s), i = 0;
    while (i < n && isspace((unsigned char)s[i]))
        i++;
    while (n > i && isspace((unsigned char)s[n - 1]))
        n--;
    ckv_buf_append(b, s + i, n - i);
}

static void append(struct ckv_buf *b, const char *s)
{
    ckv_buf_append(b, s, strlen(s));
}

static void llama2(const struct chat_template *t, const struct chat_msg *msgs, int n,
                   struct ckv_buf *b)
{
    bool sys = t->format != CHAT_FORMAT_LLAMA2;
    bool bos_inside = t->format == CHAT_FORMAT_LLAMA2_SYS_BOS;
    bool strip = t->format == CHAT_FORMAT_LLAMA2_SYS_STRIP;
    bool inside_turn = true; /* the first [INST] opens right away, without BOS */
    append(b, "[INST] ");
    for (int i = 0; i < n; i++) {
        const char *role = msgs[i].role;
        if (!inside_turn) {
            inside_turn = true;
            append(b, bos_inside ? "<s>[INST] " : "[INST] ");
        }
        bool is_sys = strcmp(role, "system") == 0, is_user = strcmp(role, "user") == 0;
        if (is_sys && sys)
            append(b, "<<SYS>>\n");
        if (strip)
            append_trimmed(b, msgs[i].content);
        else
            append(b, msgs[i].content);
        if (is_sys) {
            append(b, sys ? "\n<</SYS>>\n\n" : "\n");
        } else if (is_user) {
            append(b, " [/INST]");
        } else {
            append(b, "</s>");
            inside_turn = false;
        }
    }
}

static void gemma(const struct chat_msg *msgs, int n, bool add_gen, struct ckv_buf *b)
{
    /* Gemma has no system turn: system texts go in front of the next user turn */
    struct ckv_buf system = {0};
    for (int i = 0; i < n; i++) {
        const char *role = msgs[i].role;
        if (strcmp(role, "system") == 0) {
            append_trimmed(&system, msgs[i].content);
            continue;
        }
        bool model = strcmp(role, "assistant") == 0;
        append(b, "<start_of_turn>");
        append(b, model ? "model" : role);
        append(b, "\n");
        if (system.len && !model) {
            ckv_buf_append(b, system.data, system.len);
            append(b, "\n\n");
            ckv_buf_reset(&system);
        }
        append_trimmed(b, msgs[i].content);
        append(b, "<end_of_turn>\n");
    }
    if (system.oom)
        b->oom = true;
    ckv_buf_free(&system);
    if (add_gen)
        append(b, "<start_of_turn>model\n");
}

int chat_apply(const struct chat_template *t, const struct chat_msg *msgs, int n,
               bool add_gen_prompt, struct ckv_buf *out)
{
    ASSERT(t && out);
    if (n < 0 || (n > 0 && !msgs))
        return -EINVAL;
    for (int i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content)
            return -EINVAL;
    bool oom_before = out->oom;
    out->oom = false;
    switch (t->format) {
    case CHAT_FORMAT_CHATML:
        if (t->default_system && n > 0 && strcmp(msgs[0].role, "system") != 0) {
            append(out, "<|im_start|>system\n");
            append(out, t->default_system);
            append(out, "<|im_end|>\n");
        }
        for (int i = 0; i < n; i++) {
            append(out, "<|im_start|>");
            append(out, msgs[i].role);
            append(out, "\n");
            append(out, msgs[i].content);
            append(out, "<|im_end|>\n");
        }
        if (add_gen_prompt)
            append(out, "<|im_start|>assistant\n");
        break;
    case CHAT_FORMAT_LLAMA3:
        for (int i = 0; i < n; i++) {
            append(out, "<|start_header_id|>");
            append(out, msgs[i].role);
            append(out, "<|end_header_id|>\n\n");
            append_trimmed(out, msgs[i].content);
            append(out, "<|eot_id|>");
        }
        if (add_gen_prompt)
            append(out, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case CHAT_FORMAT_LLAMA2:
    case CHAT_FORMAT_LLAMA2_SYS:
    case CHAT_FORMAT_LLAMA2_SYS_BOS:
    case CHAT_FORMAT_LLAMA2_SYS_STRIP:
        llama2(t, msgs, n, out); /* the prompt ends inside the open [INST] turn */
        break;
    case CHAT_FORMAT_MISTRAL_V7:
        for (int i = 0; i < n; i++) {
            const char *role = msgs[i].role;
            if (strcmp(role, "system") == 0) {
                append(out, "[SYSTEM_PROMPT] ");
                append(out, msgs[i].content);
                append(out, "[/SYSTEM_PROMPT]");
            } else if (strcmp(role, "user") == 0) {
                append(out, "[INST] ");
                append(out, msgs[i].content);
                append(out, "[/INST]");
            } else {
                append(out, " ");
                append(out, msgs[i].content);
                append(out, "</s>");
            }
        }
        break;
    case CHAT_FORMAT_PHI3:
    case CHAT_FORMAT_ZEPHYR:
        for (int i = 0; i < n; i++) {
            append(out, "<|");
            append(out, msgs[i].role);
            append(out, "|>\n");
            append(out, msgs[i].content);
            append(out, t->format == CHAT_FORMAT_PHI3 ? "<|end|>\n" : "<|endoftext|>\n");
        }
        if (add_gen_prompt)
            append(out, "<|assistant|>\n");
        break;
    case CHAT_FORMAT_GEMMA: gemma(msgs, n, add_gen_prompt, out); break;
    default: ASSERT(!"chat_apply: template not initialised");
    }
    bool oom = out->oom;
    out->oom = oom || oom_before;
    return oom ? -ENOMEM : 0;
}
