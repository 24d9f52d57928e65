/*
 * Helpers shared by the Criterion suites: temporary run directories, paths of the built
 * binaries and source tree, and real child processes for integration tests (redis's
 * test-server shape: start the daemon on ipc:// endpoints in a private directory, talk to it,
 * stop it).
 */
#ifndef CKV_TEST_H
#define CKV_TEST_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Creates a fresh directory of mode 0700 under $TMPDIR (or /tmp) and writes its path to out.
 * Returns 0 or -errno. */
int ckv_test_tmpdir(char *out, size_t cap);

/* Removes a directory tree (best effort). */
void ckv_test_rmrf(const char *dir);

/* Writes "<bin dir>/<name>" to out: the path of a built program. */
void ckv_test_bin_path(const char *name, char *out, size_t cap);

/* Writes "<source dir>/<rel>" to out. */
void ckv_test_src_path(const char *rel, char *out, size_t cap);

/* Starts argv[0] (a path) with argv; stdout and stderr go to log_path (NULL: /dev/null).
 * Returns the pid, or -errno. */
pid_t ckv_test_spawn(char *const argv[], const char *log_path);

/* Waits up to timeout_ms for pid to exit; *status gets waitpid()'s status. Returns 0, or
 * -ETIMEDOUT (the process still runs). */
int ckv_test_wait(pid_t pid, int timeout_ms, int *status);

/* Sends sig, then waits up to timeout_ms; SIGKILLs it if it is still there. Returns the exit
 * status as waitpid() reports it. */
int ckv_test_stop(pid_t pid, int sig, int timeout_ms);

/* Waits up to timeout_ms for a path (a unix socket, a file) to exist. Returns 0 or -ETIMEDOUT. */
int ckv_test_wait_path(const char *path, int timeout_ms);

/* Writes text to path (created or truncated). Returns 0 or -errno. */
int ckv_test_write_file(const char *path, const char *text, size_t len);

/* Path of the default model (SmolLM2-135M-Instruct.Q4_1.gguf in $CKV_MODEL_DIR, else in
 * ~/.cache/clusterkv/models), or NULL when that file is not there. The string is static.
 * Tests that need the model skip when this is NULL, unless CKV_REQUIRE_MODEL is set:
 *   const char *model = ckv_test_default_model();
 *   if (!model) {
 *       cr_assert_null(getenv("CKV_REQUIRE_MODEL"), "default model missing");
 *       cr_skip_test("default model not fetched (deploy/fetch-model.sh)");
 *   }
 */
const char *ckv_test_default_model(void);

/* Reads a whole file into a malloc'ed, NUL-terminated buffer (*len excludes the NUL).
 * Returns NULL (errno set) on failure. */
char *ckv_test_read_file(const char *path, size_t *len);

/*
 * GGUF images built in memory, for parser and tokenizer tests (little-endian, as GGUF):
 *   struct ckv_test_img m = {0};
 *   ckv_test_img_header(&m, 3, 0, 1);              // version, tensors, metadata entries
 *   ckv_test_img_kv_str(&m, "tokenizer.ggml.model", "llama");
 *   gguf_open_mem(m.p, m.len, ...); ... free(m.p);
 * Appends abort on allocation failure (a test cannot go on without its input).
 */
struct ckv_test_img {
    uint8_t *p; /* owned: free() */
    size_t len, cap;
};
void ckv_test_img_put(struct ckv_test_img *m, const void *data, size_t n);
void ckv_test_img_u32(struct ckv_test_img *m, uint32_t v);
void ckv_test_img_u64(struct ckv_test_img *m, uint64_t v);
/* A GGUF string: u64 length, then the bytes. */
void ckv_test_img_bytes(struct ckv_test_img *m, const void *s, size_t n);
void ckv_test_img_str(struct ckv_test_img *m, const char *s);
/* "GGUF", version, tensor count, metadata count. */
void ckv_test_img_header(struct ckv_test_img *m, uint32_t version, uint64_t n_tensors,
                         uint64_t n_kv);
/* Metadata entries; types are GGUF's numbers (gguf.h enum gguf_type). */
void ckv_test_img_kv_str(struct ckv_test_img *m, const char *key, const char *val);
void ckv_test_img_kv_u32(struct ckv_test_img *m, const char *key, uint32_t val);
/* The head of an array entry: key, ARRAY, element type, count; the caller appends the
 * elements. */
void ckv_test_img_kv_arr(struct ckv_test_img *m, const char *key, uint32_t elem_type, uint64_t n);

#endif
