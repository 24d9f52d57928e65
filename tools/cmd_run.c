/*
 * ckv run: the embedded mode (DESIGN.md): one process loads a GGUF model, prefills a prompt,
 * decodes with the chosen KV method (ClusterKV by default) and streams the text, then prints
 * the speed (prefill and decode tokens/s) and the share of time spent in attention.
 *
 *   ckv run [-m MODEL] [-p PROMPT | --prompt-file F] [--chat] [-n MAX_TOKENS]
 *           [--temp T --top-k K --top-p P --seed S] [--method M --budget B ...]
 *           [--threads N] [--dump-qkv DIR --dump-layers LIST] [--json]
 *
 * Without -m the default model is read from the model cache that deploy/fetch-model.sh fills
 * (nothing downloads at run time). Without -p a default prompt is used, with the chat template.
 */
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_cmds.h"
#include "ckv_config.h"
#include "ckv_error.h"
#include "ckv_main.h"
#include "ckv_log.h"
#include "engine.h"
#include "sampler.h"

#define DEFAULT_PROMPT "Explain in a few sentences why the sky is blue, for a curious ten-year-old."

struct run_cfg {
    char model[PATH_MAX];
    char prompt[65536];
    char prompt_file[PATH_MAX];
    bool chat, json;
    int max_tokens;
    double temp, top_p;
    int top_k, seed;
    int method, select;
    int budget, sinks, window, tokens_per_cluster, full_layers;
    int threads, max_ctx, prefill_chunk;
    char dump_qkv[PATH_MAX];
    char dump_layers[1024];
};

static const struct ckv_config_opt run_options[] = {
    CKV_OPT_STRING(struct run_cfg, model, "model", "",
                   "GGUF model (-m); default: the cache of deploy/fetch-model.sh"),
    CKV_OPT_STRING(struct run_cfg, prompt, "prompt", "", "prompt text (-p); default: a question"),
    CKV_OPT_STRING(struct run_cfg, prompt_file, "prompt-file", "", "read the prompt from a file"),
    CKV_OPT_BOOL(struct run_cfg, chat, "chat", "no",
                 "wrap the prompt in the model's chat template (always without -p)"),
    CKV_OPT_INT(struct run_cfg, max_tokens, "max-tokens", "128", 1, 1 << 24,
                "tokens to generate at most (-n)"),
    CKV_OPT_DOUBLE(struct run_cfg, temp, "temp", "0", 0, 100, "temperature; 0: greedy"),
    CKV_OPT_INT(struct run_cfg, top_k, "top-k", "0", 0, 1 << 24, "top-k; 0: off"),
    CKV_OPT_DOUBLE(struct run_cfg, top_p, "top-p", "1", 0.0001, 1, "top-p; 1: off"),
    CKV_OPT_INT(struct run_cfg, seed, "seed", "1", 0, INT_MAX, "sampling seed"),
    CKV_OPT_ENUM(struct run_cfg, method, "method", "clusterkv", ckv_kv_method_names,
                 "KV method: full, clusterkv, quest, streaming"),
    CKV_OPT_INT(struct run_cfg, budget, "budget", "1024", 1, 1 << 24,
                "tokens attended per selection unit (clusterkv, quest, streaming)"),
    CKV_OPT_INT(struct run_cfg, sinks, "sinks", "16", 0, 4096, "attention sink tokens"),
    CKV_OPT_INT(struct run_cfg, window, "window", "320", 1, 65536,
                "recent window (clusterkv: clustered when full)"),
    CKV_OPT_INT(struct run_cfg, tokens_per_cluster, "tokens-per-cluster", "80", 1, 1 << 20,
                "prompt tokens per cluster"),
    CKV_OPT_INT(struct run_cfg, full_layers, "full-layers", "2", 0, 1024,
                "first layers always use full attention"),
    CKV_OPT_ENUM(struct run_cfg, select, "select", "kvhead-sum", ckv_select_mode_names,
                 "GQA selection unit: per-qhead, kvhead-max, kvhead-sum"),
    CKV_OPT_INT(struct run_cfg, threads, "threads", "0", 0, 1024, "CPU threads; 0: one per core"),
    CKV_OPT_INT(struct run_cfg, max_ctx, "max-ctx", "0", 0, 1 << 24,
                "tokens per sequence; 0: the model's training context"),
    CKV_OPT_INT(struct run_cfg, prefill_chunk, "prefill-chunk", "512", 1, 65536,
                "prompt tokens per forward pass"),
    CKV_OPT_STRING(struct run_cfg, dump_qkv, "dump-qkv", "",
                   "write Q/K/V of the dumped layers to DIR/layer-LL.qkv (ckv eval-attn)"),
    CKV_OPT_STRING(struct run_cfg, dump_layers, "dump-layers", "",
                   "layers to dump, e.g. 2,10,20 or 2-29; default: every layer >= full-layers"),
    CKV_OPT_BOOL(struct run_cfg, json, "json", "no",
                 "print the text and statistics as one JSON object on stdout"),
    CKV_OPT_END,
};

/* "2,5,10-12" into layers (sorted as given, duplicates refused); every layer >= from when
 * empty. Returns the count or -1. */
static int parse_layers(const char *s, int n_layers, int from, int *out)
{
    int n = 0;
    if (!*s) {
        for (int l = from; l < n_layers; l++)
            out[n++] = l;
        return n;
    }
    const char *p = s;
    while (*p) {
        char *end;
        long a = strtol(p, &end, 10), b = a;
        if (end == p)
            return -1;
        if (*end == '-') {
            p = end + 1;
            b = strtol(p, &end, 10);
            if (end == p)
                return -1;
        }
        if (a < 0 || b >= n_layers || a > b)
            return -1;
        for (long l = a; l <= b; l++) {
            for (int j = 0; j < n; j++)
                if (out[j] == l)
                    return -1;
            out[n++] = (int)l;
        }
        if (*end == ',')
            end++;
        else if (*end)
            return -1;
        p = end;
    }
    return n;
}

struct progress {
    bool show, tty;
    uint64_t t0;
};

static void on_progress(void *arg, int done, int total)
{
    struct progress *p = arg;
    if (!p->show)
        return;
    /* one line rewritten in place on a terminal, one line per chunk in a log */
    double s = ckv_elapsed_s(p->t0);
    fprintf(stderr, "%sprefill: %d / %d tokens, %.1f s, %.0f tokens/s%s", p->tty ? "\r" : "", done,
            total, s, s > 0 ? done / s : 0.0, p->tty && done < total ? "" : "\n");
    fflush(stderr);
}

int ckv_cmd_run(int argc, char **argv)
{
    static struct run_cfg cfg; /* large (the prompt): not on the stack */
    static const char *const aliases[] = {"-m", "--model",      "-p", "--prompt",
                                          "-n", "--max-tokens", NULL};
    static const struct ckv_main_spec spec = {
        .prog = "ckv run",
        .usage = "usage: ckv run [-m MODEL] [-p PROMPT] [--chat] [-n MAX_TOKENS] [options]\n"
                 "  -m MODEL = --model, -p PROMPT = --prompt, -n N = --max-tokens\n",
        .table = run_options,
        .aliases = aliases,
    };
    char err[1024];
    int rc = ckv_main_config(&spec, &cfg, NULL, argc, argv);
    if (rc)
        return rc == 1 ? 0 : rc;
    ckv_log_init("ckv", CKV_LOG_WARN);

    bool model_given = cfg.model[0] != 0;
    if (!model_given)
        ckv_engine_default_model(cfg.model, sizeof(cfg.model));
    if (access(cfg.model, R_OK) != 0) {
        if (model_given)
            fprintf(stderr, "ckv run: %s: %s\n", cfg.model, strerror(errno));
        else
            fprintf(stderr,
                    "ckv run: the default model %s is not there (%s): fetch it once with "
                    "deploy/fetch-model.sh, or give a GGUF with -m\n",
                    cfg.model, strerror(errno));
        return 1;
    }

    /* The prompt: -p, --prompt-file, or the default (a question, in the chat template). */
    char *prompt_text = NULL;
    size_t prompt_len = 0;
    if (cfg.prompt_file[0]) {
        FILE *f = fopen(cfg.prompt_file, "rb");
        struct ckv_buf b = {0};
        if (!f) {
            fprintf(stderr, "ckv run: %s: %s\n", cfg.prompt_file, strerror(errno));
            return 1;
        }
        char tmp[65536];
        size_t got;
        while ((got = fread(tmp, 1, sizeof(tmp), f)) > 0)
            ckv_buf_append(&b, tmp, got);
        fclose(f);
        if (b.oom)
            return 1;
        prompt_text = b.data ? b.data : strdup("");
        prompt_len = b.len;
    } else if (cfg.prompt[0]) {
        prompt_text = strdup(cfg.prompt);
        prompt_len = strlen(cfg.prompt);
    } else {
        prompt_text = strdup(DEFAULT_PROMPT);
        prompt_len = strlen(DEFAULT_PROMPT);
        cfg.chat = true;
    }
    if (!prompt_text)
        return 1;

    struct ckv_engine_opts eo;
    ckv_engine_opts_default(&eo);
    eo.model_path = cfg.model;
    eo.n_threads = cfg.threads;
    eo.max_seqs = 1;
    eo.max_ctx = cfg.max_ctx;
    eo.prefill_chunk = cfg.prefill_chunk;
    eo.kv.method = (enum ckv_kv_method)cfg.method;
    eo.kv.select_mode = (enum ckv_select_mode)cfg.select;
    eo.kv.budget = cfg.budget;
    eo.kv.sinks = cfg.sinks;
    eo.kv.window = cfg.window;
    eo.kv.tokens_per_cluster = cfg.tokens_per_cluster;
    eo.kv.full_layers = cfg.full_layers;

    ckv_engine_t *e = NULL;
    int32_t *ids = NULL;
    float *logits = NULL;
    struct ckv_buf text = {0}, out = {0};
    int status = 1, seq = -1;
    if ((rc = ckv_engine_open(&eo, &e, err, sizeof(err))) < 0) {
        fprintf(stderr, "ckv run: %s\n", err);
        goto done;
    }
    const struct ckv_model_info *info = ckv_engine_info(e);
    const tokenizer_t *tok = ckv_engine_tokenizer(e);

    if (cfg.chat) {
        const struct chat_template *ct;
        if (ckv_engine_chat_template(e, &ct) < 0) {
            fprintf(stderr, "ckv run: %s has no chat template: run without --chat\n", cfg.model);
            goto done;
        }
        struct chat_msg msg = {.role = "user", .content = prompt_text};
        if (chat_apply(ct, &msg, 1, true, &text) < 0 || text.oom)
            goto done;
    } else {
        ckv_buf_append(&text, prompt_text, prompt_len);
    }
    int n_ids = 0;
    if ((rc = tokenizer_encode_alloc(tok, text.data ? text.data : "", text.len, true, cfg.chat,
                                     &ids, &n_ids)) < 0) {
        fprintf(stderr, "ckv run: tokenizing the prompt: %s\n", ckv_strerror(rc));
        goto done;
    }
    if (n_ids == 0) {
        fprintf(stderr, "ckv run: the prompt is empty\n");
        goto done;
    }
    int max_ctx = cfg.max_ctx > 0 ? cfg.max_ctx : info->n_ctx_train;
    if (n_ids >= max_ctx) {
        fprintf(stderr, "ckv run: the prompt has %d tokens, the context holds %d (--max-ctx)\n",
                n_ids, max_ctx);
        goto done;
    }
    if ((rc = ckv_engine_seq_new(e, NULL, &seq, err, sizeof(err))) < 0) {
        fprintf(stderr, "ckv run: %s\n", err);
        goto done;
    }
    if (cfg.dump_qkv[0]) {
        int layers[1024];
        int nl = parse_layers(cfg.dump_layers, info->n_layers,
                              CKV_MIN(cfg.full_layers, info->n_layers - 1), layers);
        if (nl <= 0) {
            fprintf(stderr, "ckv run: --dump-layers '%s': expected layers in [0, %d) as 2,5,7-9\n",
                    cfg.dump_layers, info->n_layers);
            goto done;
        }
        if (ckv_engine_seq_dump_qkv(e, seq, cfg.dump_qkv, layers, nl, err, sizeof(err)) < 0) {
            fprintf(stderr, "ckv run: %s\n", err);
            goto done;
        }
    }

    struct ckv_sampler_opts so;
    ckv_sampler_opts_default(&so);
    so.temperature = (float)cfg.temp;
    so.top_k = cfg.top_k;
    so.top_p = (float)cfg.top_p;
    so.seed = (uint64_t)cfg.seed;
    so.max_tokens = CKV_MIN(cfg.max_tokens, max_ctx - n_ids);
    struct ckv_sampler smp;
    if (ckv_sampler_init(&smp, &so, info->n_vocab, err, sizeof(err)) < 0) {
        fprintf(stderr, "ckv run: %s\n", err);
        goto done;
    }
    logits = malloc((size_t)info->n_vocab * sizeof(float));
    if (!logits)
        goto done_smp;

    fprintf(stderr, "ckv run: %s (%s, %d layers, %s), %s, method %s, prompt %d tokens\n",
            info->name, info->arch, info->n_layers, info->weight_type,
            ckv_ctx_describe(ckv_engine_ctx(e)), ckv_kv_method_name(eo.kv.method), n_ids);
    struct progress pg = {
        .show = n_ids > cfg.prefill_chunk, .tty = isatty(2) == 1, .t0 = ckv_now_ns()};
    if ((rc = ckv_engine_prefill(e, seq, ids, n_ids, logits, on_progress, &pg)) < 0) {
        fprintf(stderr, "ckv run: prefill: %s\n", ckv_strerror(rc));
        goto done_smp;
    }
    struct ckv_engine_stats after_prefill;
    ckv_engine_stats(e, &after_prefill);

    struct tokenizer_stream ts;
    tokenizer_stream_init(&ts, tok, false);
    int generated = 0;
    const char *end_reason = "max tokens";
    for (;;) {
        int32_t id = ckv_sampler_sample(&smp, logits);
        enum ckv_sampler_end end = ckv_sampler_accept(&smp, id);
        if (tokenizer_is_eog(tok, id)) {
            end_reason = "end of generation token";
            break;
        }
        generated++;
        size_t before = out.len;
        tokenizer_stream_push(&ts, id, &out);
        if (!cfg.json && out.len > before) {
            fwrite(out.data + before, 1, out.len - before, stdout);
            fflush(stdout);
        }
        if (end != CKV_SAMPLER_GO) {
            if (generated >= cfg.max_tokens)
                end_reason = "max tokens";
            else
                end_reason = "context full";
            break;
        }
        if ((rc = ckv_engine_decode(e, &seq, &id, 1, logits)) < 0) {
            fprintf(stderr, "\nckv run: decode: %s\n", ckv_strerror(rc));
            goto done_smp;
        }
    }
    size_t before = out.len;
    tokenizer_stream_flush(&ts, &out);
    if (!cfg.json) {
        fwrite(out.data + before, 1, out.len - before, stdout);
        fputc('\n', stdout);
        fflush(stdout);
    }

    struct ckv_engine_stats st;
    ckv_engine_stats(e, &st);
    double pre_tps = st.prefill_ms > 0 ? (double)st.prefill_tokens * 1e3 / st.prefill_ms : 0;
    double dec_tps = st.decode_ms > 0 ? (double)st.decode_tokens * 1e3 / st.decode_ms : 0;
    double pre_attn =
        after_prefill.prefill_ms > 0 ? 100.0 * after_prefill.attn_ms / after_prefill.prefill_ms : 0;
    double dec_attn_ms = st.attn_ms - after_prefill.attn_ms;
    double dec_attn = st.decode_ms > 0 ? 100.0 * dec_attn_ms / st.decode_ms : 0;
    double all_ms = st.prefill_ms + st.decode_ms;
    double attn_share = all_ms > 0 ? 100.0 * st.attn_ms / all_ms : 0;
    double mm_share = all_ms > 0 ? 100.0 * st.matmul_ms / all_ms : 0;
    if (cfg.json) {
        struct ckv_buf j = {0};
        ckv_buf_printf(&j, "{\"model\": ");
        ckv_buf_json_str(&j, info->name, strlen(info->name));
        ckv_buf_printf(&j,
                       ", \"method\": \"%s\", \"prompt_tokens\": %d, "
                       "\"generated_tokens\": %d, \"end\": \"%s\", \"text\": ",
                       ckv_kv_method_name(eo.kv.method), n_ids, generated, end_reason);
        ckv_buf_json_str(&j, out.data ? out.data : "", out.len);
        ckv_buf_printf(&j,
                       ", \"prefill_ms\": %.3f, \"decode_ms\": %.3f, \"prefill_tok_s\": %.2f, "
                       "\"decode_tok_s\": %.2f, \"attn_ms\": %.3f, \"matmul_ms\": %.3f, "
                       "\"attn_share\": %.4f, \"prefill_attn_share\": %.4f, "
                       "\"decode_attn_share\": %.4f, \"matmul_share\": %.4f, "
                       "\"decode_attended_tokens\": %llu, \"clusters_made\": %llu, "
                       "\"threads\": %d}\n",
                       st.prefill_ms, st.decode_ms, pre_tps, dec_tps, st.attn_ms, st.matmul_ms,
                       attn_share / 100, pre_attn / 100, dec_attn / 100, mm_share / 100,
                       (unsigned long long)st.kv.attended_tokens,
                       (unsigned long long)st.kv.clusters_made,
                       ckv_ctx_n_threads(ckv_engine_ctx(e)));
        fwrite(j.data, 1, j.len, stdout);
        ckv_buf_free(&j);
    } else {
        fprintf(stderr,
                "\nprefill: %llu tokens in %.1f ms, %.1f tokens/s (attention %.1f%%)\n"
                "decode:  %d tokens in %.1f ms, %.1f tokens/s (attention %.1f%%)\n"
                "time in attention %.1f%%, in matrix products %.1f%% (stopped: %s)\n",
                (unsigned long long)st.prefill_tokens, st.prefill_ms, pre_tps, pre_attn,
                (int)st.decode_tokens, st.decode_ms, dec_tps, dec_attn, attn_share, mm_share,
                end_reason);
    }
    status = 0;
done_smp:
    ckv_sampler_free(&smp);
done:
    if (seq >= 0)
        ckv_engine_seq_free(e, seq);
    ckv_engine_close(&e);
    free(logits);
    free(ids);
    free(prompt_text);
    ckv_buf_free(&text);
    ckv_buf_free(&out);
    return status;
}
