/*
 * Chat templates: turning a conversation (role, content messages) into the prompt text an
 * instruct model was trained on. Not a Jinja engine: like llama.cpp's llm_chat_detect_template
 * the family is recognised from marker strings in the GGUF's tokenizer.chat_template, and each
 * family is formatted by code here. What the detection also reads from the template text is
 * a default system prompt written as a literal (SmolLM2's, Qwen2's): it is put first when the
 * conversation does not start with a system message, as the Jinja template would.
 *
 * An unrecognised template is an error (CKV_EUNSUPPORTED naming the reason); the caller can
 * then choose a family by name (chat_template_by_name(), e.g. from a --chat-template option).
 *
 * The output is text with the special tokens spelled out ("<|im_start|>user\n..."): encode it
 * with parse_special = true.
 */
#ifndef CHAT_H
#define CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include "ckv_buf.h"
#include "gguf.h"

/* Families, named as llama.cpp names them (chat_format_name()). */
enum chat_format {
    CHAT_FORMAT_CHATML = 1,       /* "chatml": <|im_start|>role\ncontent<|im_end|>\n */
    CHAT_FORMAT_LLAMA3,           /* "llama3": <|start_header_id|>role<|end_header_id|>\n\n */
    CHAT_FORMAT_LLAMA2,           /* "llama2": [INST] ... [/INST], system as plain text */
    CHAT_FORMAT_LLAMA2_SYS,       /* "llama2-sys": system in <<SYS>> ... <</SYS>> */
    CHAT_FORMAT_LLAMA2_SYS_BOS,   /* "llama2-sys-bos": and <s> before each later [INST] */
    CHAT_FORMAT_LLAMA2_SYS_STRIP, /* "llama2-sys-strip": and contents trimmed */
    CHAT_FORMAT_MISTRAL_V7,       /* "mistral-v7": [SYSTEM_PROMPT] ... [INST] ... [/INST] */
    CHAT_FORMAT_PHI3,             /* "phi3": <|role|>\ncontent<|end|>\n */
    CHAT_FORMAT_ZEPHYR,           /* "zephyr": <|role|>\ncontent<|endoftext|>\n */
    CHAT_FORMAT_GEMMA,            /* "gemma": <start_of_turn>user|model ... <end_of_turn> */
};

struct chat_template {
    enum chat_format format;
    char *default_system; /* owned, NUL-terminated; NULL when the template has none */
};

/* One message; both strings are NUL-terminated and owned by the caller. Roles are the usual
 * "system", "user", "assistant" (others are passed through where the family allows). */
struct chat_msg {
    const char *role;
    const char *content;
};

/* Recognises the family of a Jinja template text (len bytes, need not be NUL-terminated) and
 * its literal default system prompt. On success the caller owns out (chat_template_free()).
 * Returns 0, CKV_EUNSUPPORTED (no family recognised; err says so), -EINVAL or -ENOMEM. */
int chat_template_detect(const char *tmpl, size_t len, struct chat_template *out, char *err,
                         size_t errlen);

/* The family by llama.cpp's name ("chatml", "llama3", "llama2", "llama2-sys", ...), without a
 * default system prompt. Returns 0 or CKV_EUNSUPPORTED (unknown name; err lists the names). */
int chat_template_by_name(const char *name, struct chat_template *out, char *err, size_t errlen);

/* name != NULL: chat_template_by_name(name). Otherwise detects the GGUF's
 * tokenizer.chat_template; -ENOENT when the file has none (err says to name a template). */
int chat_template_from_gguf(const gguf_t *g, const char *name, struct chat_template *out, char *err,
                            size_t errlen);

/* Frees default_system and zeroes the struct. */
void chat_template_free(struct chat_template *t);

/* llama.cpp's name of a family ("chatml", ...); "unknown" for anything else. Static string. */
const char *chat_format_name(enum chat_format f);

/* Appends the prompt for n messages to out; add_gen_prompt appends the opening of the
 * assistant's turn (families whose prompt always ends ready for the model ignore it).
 * Returns 0, -EINVAL (NULL role or content, n < 0) or -ENOMEM. */
int chat_apply(const struct chat_template *t, const struct chat_msg *msgs, int n,
               bool add_gen_prompt, struct ckv_buf *out);

#endif
