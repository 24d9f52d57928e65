/*
 * Suite "chat": worker/chat.c against llama.cpp's llama_chat_apply_template and the default
 * model's own Jinja template rendered by jinja2, both recorded in
 * tests/fixtures/tokenizer_fixture.txt (with the template text, so no model is needed), plus
 * detection of each family from template texts and refusal of unknown ones.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "ckv_error.h"
#include "ckv_test.h"
#include "gguf.h"
#include "tokenizer.h"

struct chat_case {
    char tmpl[32];
    char source[16];
    bool add_gen;
    int n;
    struct chat_msg msgs[8];
    char *expect;
};

static char *unhex(const char *h)
{
    size_t n = strcmp(h, "-") == 0 ? 0 : strlen(h) / 2;
    char *b = malloc(n + 1);
    cr_assert_not_null(b);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        cr_assert_eq(sscanf(h + 2 * i, "%2x", &v), 1);
        b[i] = (char)v;
    }
    b[n] = 0;
    return b;
}

static struct chat_case cases[256];
static int n_cases;
static char *model_template;

static void load(void)
{
    if (n_cases)
        return;
    char path[1024];
    ckv_test_src_path("tests/fixtures/tokenizer_fixture.txt", path, sizeof(path));
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "fixture %s missing", path);
    static char line[1 << 16], hex[1 << 16];
    while (fgets(line, sizeof(line), f)) {
        if (sscanf(line, "template %65535s", hex) == 1) {
            model_template = unhex(hex);
            continue;
        }
        struct chat_case *c = &cases[n_cases];
        int add;
        if (sscanf(line, "chat %31s %d %15s %d", c->tmpl, &add, c->source, &c->n) != 4)
            continue;
        cr_assert(c->n >= 0 && c->n <= 8);
        c->add_gen = add;
        for (int i = 0; i < c->n; i++) {
            char role[32];
            cr_assert_not_null(fgets(line, sizeof(line), f));
            cr_assert_eq(sscanf(line, "msg %31s %65535s", role, hex), 2);
            c->msgs[i].role = strdup(role);
            c->msgs[i].content = unhex(hex);
        }
        cr_assert_not_null(fgets(line, sizeof(line), f));
        cr_assert_eq(sscanf(line, "expect %65535s", hex), 1);
        c->expect = unhex(hex);
        cr_assert_lt(++n_cases, 256);
    }
    fclose(f);
    cr_assert_not_null(model_template, "fixture has no template line");
}

static char *apply(const struct chat_template *t, const struct chat_case *c)
{
    struct ckv_buf b = {0};
    cr_assert_eq(chat_apply(t, c->msgs, c->n, c->add_gen, &b), 0);
    return b.data ? b.data : strdup("");
}

Test(chat, matches_llamacpp_for_each_named_family)
{
    load();
    int n = 0;
    for (int i = 0; i < n_cases; i++) {
        const struct chat_case *c = &cases[i];
        if (strcmp(c->tmpl, "gguf") == 0)
            continue;
        struct chat_template t;
        char err[256];
        cr_assert_eq(chat_template_by_name(c->tmpl, &t, err, sizeof(err)), 0, "%s", err);
        cr_assert_str_eq(chat_format_name(t.format), c->tmpl);
        char *got = apply(&t, c);
        cr_assert_str_eq(got, c->expect, "template %s, %d messages, add_gen %d", c->tmpl, c->n,
                         c->add_gen);
        free(got);
        chat_template_free(&t);
        n++;
    }
    cr_assert_geq(n, 80, "only %d named-template cases", n);
}

/* The default model's template: detected as ChatML with SmolLM2's default system prompt; the
 * output equals the Jinja rendering, and without the default prompt llama.cpp's output. */
Test(chat, matches_the_default_models_jinja_template)
{
    load();
    struct chat_template t;
    char err[256];
    cr_assert_eq(chat_template_detect(model_template, strlen(model_template), &t, err, sizeof(err)),
                 0, "%s", err);
    cr_assert_eq(t.format, CHAT_FORMAT_CHATML);
    cr_assert_str_eq(t.default_system,
                     "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
    struct chat_template plain = {.format = t.format};
    int n_jinja = 0, n_llama = 0;
    for (int i = 0; i < n_cases; i++) {
        const struct chat_case *c = &cases[i];
        if (strcmp(c->tmpl, "gguf") != 0)
            continue;
        bool jinja = strcmp(c->source, "jinja") == 0;
        char *got = apply(jinja ? &t : &plain, c);
        cr_assert_str_eq(got, c->expect, "%s, %d messages, add_gen %d", c->source, c->n,
                         c->add_gen);
        free(got);
        n_jinja += jinja;
        n_llama += !jinja;
    }
    cr_assert_geq(n_jinja, 8);
    cr_assert_geq(n_llama, 8);
    /* no messages: the Jinja loop never runs, so no default system prompt either */
    struct ckv_buf b = {0};
    cr_assert_eq(chat_apply(&t, NULL, 0, true, &b), 0);
    cr_assert_str_eq(b.data, "<|im_start|>assistant\n");
    ckv_buf_free(&b);
    chat_template_free(&t);
    cr_assert_null(t.default_system);
}

/* Template texts of the families (excerpts with the markers of the real templates). */
Test(chat, detects_each_family_from_its_template)
{
    static const struct {
        const char *tmpl;
        enum chat_format want;
        const char *system; /* default system prompt, or NULL */
    } cases[] = {
        {"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
         "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}",
         CHAT_FORMAT_CHATML, NULL},
        /* Qwen2: the default prompt written with the "\n" escape */
        {"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
         "'\\n'}}{% endfor %}",
         CHAT_FORMAT_CHATML, "You are a helpful assistant."},
        /* a system literal that is not a whole prompt comes first, the prompt later */
        {"{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{% else %}"
         "{{- \"<|im_start|>system\\nYou are \\\"Q\\\", a model.<|im_end|>\\n\" }}",
         CHAT_FORMAT_CHATML, "You are \"Q\", a model."},
        {"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
         "message['content'] | trim + '<|eot_id|>' }}",
         CHAT_FORMAT_LLAMA3, NULL},
        {"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + "
         "' [/INST]' }}{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + content.strip() "
         "+ '\\n<</SYS>>\\n\\n' }}",
         CHAT_FORMAT_LLAMA2_SYS_STRIP, NULL},
        {"{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{{ '<<SYS>>' }}",
         CHAT_FORMAT_LLAMA2_SYS_BOS, NULL},
        {"{{ '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>' }}", CHAT_FORMAT_LLAMA2_SYS, NULL},
        {"{{ '[INST] ' + message['content'] + ' [/INST]' }}", CHAT_FORMAT_LLAMA2, NULL},
        {"{{ '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}{{ '[INST]' }}",
         CHAT_FORMAT_MISTRAL_V7, NULL},
        {"{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n'}}"
         "{{ '<|assistant|>\\n' }}",
         CHAT_FORMAT_PHI3, NULL},
        {"{{ '<|user|>\\n' + message['content'] + eos_token }}{{ '<|endoftext|>' }}",
         CHAT_FORMAT_ZEPHYR, NULL},
        {"{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
         "'<end_of_turn>\\n' }}",
         CHAT_FORMAT_GEMMA, NULL},
        {"llama3", CHAT_FORMAT_LLAMA3, NULL}, /* a family name works as a template */
    };
    for (size_t i = 0; i < CKV_ARRAY_LEN(cases); i++) {
        struct chat_template t;
        char err[256] = "";
        int rc = chat_template_detect(cases[i].tmpl, strlen(cases[i].tmpl), &t, err, sizeof(err));
        cr_assert_eq(rc, 0, "case %zu: %s", i, err);
        cr_assert_eq(t.format, cases[i].want, "case %zu: %s instead of %s", i,
                     chat_format_name(t.format), chat_format_name(cases[i].want));
        if (cases[i].system)
            cr_assert_str_eq(t.default_system ? t.default_system : "(none)", cases[i].system,
                             "case %zu", i);
        else
            cr_assert_null(t.default_system, "case %zu: %s", i, t.default_system);
        chat_template_free(&t);
    }
}

Test(chat, refuses_unknown_templates_with_a_reason)
{
    struct chat_template t;
    char err[256];
    const char *unknown = "{% for m in messages %}{{ m.content }}{% endfor %}";
    cr_assert_eq(chat_template_detect(unknown, strlen(unknown), &t, err, sizeof(err)),
                 CKV_EUNSUPPORTED);
    cr_assert(strstr(err, "not recognised"), "%s", err);
    cr_assert(strstr(err, "chatml"), "%s", err); /* says what can be named instead */
    const char *phi4 = "{{ '<|im_start|>' + role + '<|im_sep|>' }}";
    cr_assert_eq(chat_template_detect(phi4, strlen(phi4), &t, err, sizeof(err)), CKV_EUNSUPPORTED);
    cr_assert(strstr(err, "phi4"), "%s", err);
    const char *glm = "[gMASK]<sop>{{ '<|user|>' }}";
    cr_assert_eq(chat_template_detect(glm, strlen(glm), &t, err, sizeof(err)), CKV_EUNSUPPORTED);
    cr_assert(strstr(err, "chatglm4"), "%s", err);
    cr_assert_eq(chat_template_by_name("vicuna", &t, err, sizeof(err)), CKV_EUNSUPPORTED);
    cr_assert(strstr(err, "vicuna"), "%s", err);
    cr_assert_eq(chat_template_by_name(NULL, &t, err, sizeof(err)), CKV_EUNSUPPORTED);
    cr_assert_eq(chat_template_detect(NULL, 0, &t, err, sizeof(err)), -EINVAL);

    struct chat_template chatml = {.format = CHAT_FORMAT_CHATML};
    struct chat_msg bad[1] = {{"user", NULL}};
    struct ckv_buf b = {0};
    cr_assert_eq(chat_apply(&chatml, bad, 1, true, &b), -EINVAL);
    cr_assert_eq(chat_apply(&chatml, bad, -1, true, &b), -EINVAL);
    cr_assert_eq(b.len, 0);
}

/* A GGUF without tokenizer.chat_template: -ENOENT unless a template is named. */
Test(chat, gguf_without_template_needs_a_name)
{
    struct ckv_test_img m = {0};
    ckv_test_img_header(&m, 3, 0, 0);
    gguf_t *g;
    char err[256];
    cr_assert_eq(gguf_open_mem(m.p, m.len, &g, err, sizeof(err)), 0, "%s", err);
    struct chat_template t;
    cr_assert_eq(chat_template_from_gguf(g, NULL, &t, err, sizeof(err)), -ENOENT);
    cr_assert(strstr(err, "tokenizer.chat_template"), "%s", err);
    cr_assert_eq(chat_template_from_gguf(g, "llama3", &t, err, sizeof(err)), 0);
    cr_assert_eq(t.format, CHAT_FORMAT_LLAMA3);
    gguf_close(&g);
    free(m.p);
}

/* End to end on the default model: its template, applied and encoded with special tokens,
 * gives the ChatML token structure. */
Test(chat, default_model_prompt_encodes_to_chatml_tokens)
{
    const char *path = ckv_test_default_model();
    if (!path) {
        cr_assert_null(getenv("CKV_REQUIRE_MODEL"), "default model missing");
        cr_skip_test("default model not fetched (deploy/fetch-model.sh)");
    }
    gguf_t *g;
    char err[256];
    cr_assert_eq(gguf_open(path, &g, err, sizeof(err)), 0, "%s", err);
    struct chat_template t;
    cr_assert_eq(chat_template_from_gguf(g, NULL, &t, err, sizeof(err)), 0, "%s", err);
    tokenizer_t *tok;
    cr_assert_eq(tokenizer_new_from_gguf(g, &tok, err, sizeof(err)), 0, "%s", err);
    struct chat_msg msgs[] = {{"user", "What is the capital of France?"}};
    struct ckv_buf b = {0};
    cr_assert_eq(chat_apply(&t, msgs, 1, true, &b), 0);
    int32_t *ids;
    int n;
    cr_assert_eq(tokenizer_encode_alloc(tok, b.data, b.len, true, true, &ids, &n), 0);
    int32_t im_start = tokenizer_find(tok, "<|im_start|>", 12);
    int32_t im_end = tokenizer_find(tok, "<|im_end|>", 10);
    int starts = 0, ends = 0;
    for (int i = 0; i < n; i++) {
        starts += ids[i] == im_start;
        ends += ids[i] == im_end;
    }
    cr_assert_eq(ids[0], im_start);
    cr_assert_eq(starts, 3); /* system (default), user, assistant */
    cr_assert_eq(ends, 2);
    cr_assert(tokenizer_is_eog(tok, im_end), "<|im_end|> ends generation");
    free(ids);
    ckv_buf_free(&b);
    tokenizer_destroy(&tok);
    chat_template_free(&t);
    gguf_close(&g);
}
