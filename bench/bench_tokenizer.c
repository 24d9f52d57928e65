/*
 * ckv-bench-tokenizer: encode / decode speed of worker/tokenizer.c on ~100 KB of English text,
 * against llama.cpp (llama-cpp-python, same GGUF, same text, same CPU) in the same run.
 *
 *   build/bin/ckv-bench-tokenizer [-m MODEL] [--text FILE | --repeat STRING] [--bytes N]
 *                                 [--reps N] [--cpu N] [--no-llamacpp] [--json FILE]
 *
 * The text defaults to the GPL-3 text Debian ships (/usr/share/common-licenses/GPL-3), repeated
 * to --bytes (100 KiB); --text FILE takes a file as it is (or repeated / cut to --bytes given
 * after it), --repeat STRING a string repeated to --bytes (pathological inputs: "a", " "). Both
 * tokenizers run --reps times pinned to --cpu; the table shows medians. llama.cpp is timed inside
 * its Python process around the llama_tokenize call (one ctypes call per repetition: the Python
 * overhead is microseconds against milliseconds), and its ids are hashed so the table can say
 * whether both produced the same ids.
 */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckv_buf.h"
#include "ckv_clock.h"
#include "ckv_error.h"
#include "ckv_log.h"
#include "gguf.h"
#include "tokenizer.h"

#define DEFAULT_TEXT "/usr/share/common-licenses/GPL-3"

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t hash_ids(const int32_t *ids, int n)
{
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < n; i++) {
        char s[16];
        int k = snprintf(s, sizeof(s), "%d,", ids[i]);
        for (int j = 0; j < k; j++)
            h = (h ^ (uint8_t)s[j]) * 1099511628211ull;
    }
    return h;
}

static char *read_text(const char *path, const char *repeat, size_t want, size_t *len)
{
    char *src = NULL;
    size_t n = 0, cap = 0;
    if (repeat) {
        src = strdup(repeat);
        n = strlen(repeat);
        goto have;
    }
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    for (;;) {
        if (n + 65536 > cap) {
            cap = (n + 65536) * 2;
            char *p = realloc(src, cap);
            if (!p) {
                free(src);
                fclose(f);
                return NULL;
            }
            src = p;
        }
        size_t r = fread(src + n, 1, cap - n, f);
        if (r == 0)
            break;
        n += r;
    }
    fclose(f);
have:
    if (n == 0) {
        free(src);
        errno = EINVAL;
        return NULL;
    }
    if (want == 0)
        want = n;
    char *text = malloc(want + 1);
    if (!text) {
        free(src);
        return NULL;
    }
    for (size_t o = 0; o < want; o += n)
        memcpy(text + o, src, CKV_MIN(n, want - o));
    /* do not end inside a UTF-8 sequence */
    while (want > 0 && ((uint8_t)text[want - 1] & 0xc0) == 0x80)
        want--;
    if (want > 0 && (uint8_t)text[want - 1] >= 0xc0)
        want--;
    text[want] = '\0';
    free(src);
    *len = want;
    return text;
}

static const char *PY =
    "import sys, time, ctypes, llama_cpp\n"
    "model, path, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "data = open(path, 'rb').read()\n"
    "llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)\n"
    "v = llm._model.vocab\n"
    "cap = len(data) + 16\n"
    "buf = (llama_cpp.llama_token * cap)()\n"
    "ts = []\n"
    "for _ in range(reps):\n"
    "    t0 = time.perf_counter()\n"
    "    n = llama_cpp.llama_tokenize(v, data, len(data), buf, cap, False, False)\n"
    "    ts.append(time.perf_counter() - t0)\n"
    "ts.sort()\n"
    "h = 1469598103934665603\n"
    "for c in ','.join(str(x) for x in buf[:n]).encode() + (b',' if n else b''):\n"
    "    h = ((h ^ c) * 1099511628211) & 0xFFFFFFFFFFFFFFFF\n"
    "med = ts[len(ts)//2] if len(ts) % 2 else 0.5 * (ts[len(ts)//2-1] + ts[len(ts)//2])\n"
    "print(n, med, '%016x' % h)\n";

/* Runs the llama.cpp timing in python3; 0 on success. */
static int run_llamacpp(const char *model, const char *text_path, int reps, int *n_tokens,
                        double *median_s, uint64_t *hash)
{
    char script[] = "/tmp/ckv-bench-tokenizer-XXXXXX";
    int fd = mkstemp(script);
    if (fd < 0)
        return -errno;
    FILE *f = fdopen(fd, "w");
    fputs(PY, f);
    fclose(f);
    char cmd[4096];
    snprintf(cmd, sizeof(cmd), "python3 '%s' '%s' '%s' %d 2>/dev/null", script, model, text_path,
             reps);
    FILE *p = popen(cmd, "r");
    int rc = -EIO;
    if (p) {
        unsigned long long h;
        if (fscanf(p, "%d %lf %llx", n_tokens, median_s, &h) == 3) {
            *hash = h;
            rc = 0;
        }
        pclose(p);
    }
    unlink(script);
    return rc;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *text_path = DEFAULT_TEXT, *repeat = NULL, *json = NULL;
    size_t want = 100 * 1024;
    int reps = 21, cpu = 0;
    bool llamacpp = true;
    static char default_model[1024];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-m") && v)
            model = v, i++;
        else if (!strcmp(a, "--text") && v)
            text_path = v, i++, want = 0;
        else if (!strcmp(a, "--repeat") && v)
            repeat = v, i++, text_path = "--repeat";
        else if (!strcmp(a, "--bytes") && v)
            want = strtoull(v, NULL, 10), i++;
        else if (!strcmp(a, "--reps") && v)
            reps = atoi(v), i++;
        else if (!strcmp(a, "--cpu") && v)
            cpu = atoi(v), i++;
        else if (!strcmp(a, "--json") && v)
            json = v, i++;
        else if (!strcmp(a, "--no-llamacpp"))
            llamacpp = false;
        else {
            fprintf(stderr,
                    "usage: %s [-m MODEL] [--text FILE | --repeat STRING] [--bytes N] [--reps N] "
                    "[--cpu N] [--no-llamacpp] [--json FILE]\n",
                    argv[0]);
            return 2;
        }
    }
    if (reps < 1)
        reps = 1;
    ckv_log_init("ckv-bench-tokenizer", CKV_LOG_WARN);
    if (!model) {
        const char *home = getenv("HOME");
        snprintf(default_model, sizeof(default_model),
                 "%s/.cache/clusterkv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 home ? home : "/root");
        model = default_model;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        fprintf(stderr, "warning: cannot pin to CPU %d: %s\n", cpu, strerror(errno));

    size_t len = 0;
    char *text = read_text(text_path, repeat, want, &len);
    if (!text) {
        fprintf(stderr, "cannot read %s: %s\n", text_path, strerror(errno));
        return 1;
    }
    /* the exact bytes timed, for the python side */
    char text_file[] = "/tmp/ckv-bench-tokenizer-text-XXXXXX";
    int tfd = mkstemp(text_file);
    if (tfd < 0 || write(tfd, text, len) != (ssize_t)len) {
        fprintf(stderr, "cannot write a temporary text file\n");
        return 1;
    }
    close(tfd);

    char err[512] = "";
    gguf_t *g;
    tokenizer_t *tok;
    uint64_t t0 = ckv_now_ns();
    if (gguf_open(model, &g, err, sizeof(err)) < 0 ||
        tokenizer_new_from_gguf(g, &tok, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s: %s\n", model, err);
        return 1;
    }
    double load_s = ckv_elapsed_s(t0);

    double *enc = malloc((size_t)reps * sizeof(double));
    double *dec = malloc((size_t)reps * sizeof(double));
    int32_t *ids = NULL;
    int n_ids = 0;
    struct ckv_buf out = {0};
    for (int r = 0; r < reps; r++) {
        free(ids);
        t0 = ckv_now_ns();
        int rc = tokenizer_encode_alloc(tok, text, len, false, false, &ids, &n_ids);
        enc[r] = ckv_elapsed_s(t0);
        if (rc < 0) {
            fprintf(stderr, "encode: %s\n", ckv_strerror(rc));
            return 1;
        }
        ckv_buf_reset(&out);
        t0 = ckv_now_ns();
        rc = tokenizer_decode(tok, ids, n_ids, false, &out);
        dec[r] = ckv_elapsed_s(t0);
        if (rc < 0 || out.len != len || memcmp(out.data, text, len) != 0) {
            fprintf(stderr, "decode did not give the text back\n");
            return 1;
        }
    }
    double enc_s = median(enc, reps), dec_s = median(dec, reps);
    uint64_t h = hash_ids(ids, n_ids);

    int ll_n = 0;
    double ll_s = 0;
    uint64_t ll_h = 0;
    bool have_ll = llamacpp && run_llamacpp(model, text_file, reps, &ll_n, &ll_s, &ll_h) == 0;
    unlink(text_file);

    printf("# ckv-bench-tokenizer: %zu bytes of %s%s%s, %d tokens, %d repetitions, CPU %d, "
           "medians\n",
           len, repeat ? "'" : text_path, repeat ? repeat : "", repeat ? "' repeated" : "", n_ids,
           reps, cpu);
    printf("| tokenizer | encode ms | tokens/s | MB/s | decode ms | same ids |\n");
    printf("|---|---:|---:|---:|---:|---|\n");
    printf("| clusterkv (PCRE2 JIT) | %.2f | %.0f | %.1f | %.3f | - |\n", enc_s * 1e3,
           n_ids / enc_s, len / enc_s / 1e6, dec_s * 1e3);
    if (have_ll)
        printf("| llama.cpp (llama-cpp-python) | %.2f | %.0f | %.1f | - | %s |\n", ll_s * 1e3,
               ll_n / ll_s, len / ll_s / 1e6, ll_n == n_ids && ll_h == h ? "yes" : "NO");
    else
        printf("| llama.cpp | not run (%s) | | | | |\n",
               llamacpp ? "python3 -c 'import llama_cpp' failed" : "--no-llamacpp");
    if (have_ll)
        printf("\nencode speed vs llama.cpp: %.2fx\n", ll_s / enc_s);
    printf("tokenizer load (GGUF metadata to ready): %.1f ms\n", load_s * 1e3);
    printf("reproduce: build/bin/ckv-bench-tokenizer");
    for (int i = 1; i < argc; i++)
        printf(" %s", argv[i]);
    printf("\n");

    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            fprintf(stderr, "%s: %s\n", json, strerror(errno));
            return 1;
        }
        fprintf(f,
                "{\"bytes\": %zu, \"tokens\": %d, \"reps\": %d, \"cpu\": %d,\n"
                " \"encode_ms\": %.4f, \"encode_tokens_per_s\": %.0f, \"decode_ms\": %.4f,\n"
                " \"load_ms\": %.2f",
                len, n_ids, reps, cpu, enc_s * 1e3, n_ids / enc_s, dec_s * 1e3, load_s * 1e3);
        if (have_ll)
            fprintf(f,
                    ",\n \"llamacpp_encode_ms\": %.4f, \"llamacpp_tokens_per_s\": %.0f,\n"
                    " \"speedup_vs_llamacpp\": %.3f, \"same_ids_as_llamacpp\": %s",
                    ll_s * 1e3, ll_n / ll_s, ll_s / enc_s,
                    ll_n == n_ids && ll_h == h ? "true" : "false");
        fprintf(f, "}\n");
        fclose(f);
    }
    ckv_buf_free(&out);
    free(ids);
    free(enc);
    free(dec);
    free(text);
    tokenizer_destroy(&tok);
    gguf_close(&g);
    return have_ll && (ll_n != n_ids || ll_h != h) ? 1 : 0;
}
