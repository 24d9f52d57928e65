/*
 * Test helpers (see ckv_test.h).
 */
#include "ckv_test.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int ckv_test_tmpdir(char *out, size_t cap)
{
    const char *base = getenv("TMPDIR");
    if (!base || !*base)
        base = "/tmp";
    snprintf(out, cap, "%s/ckv-test-XXXXXX", base);
    if (!mkdtemp(out))
        return -errno;
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

void ckv_test_rmrf(const char *dir)
{
    if (dir && *dir)
        nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

void ckv_test_bin_path(const char *name, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s", CKV_BIN_DIR, name);
}

void ckv_test_src_path(const char *rel, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s", CKV_SOURCE_DIR, rel);
}

pid_t ckv_test_spawn(char *const argv[], const char *log_path)
{
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        int fd = open(log_path ? log_path : "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int ckv_test_wait(pid_t pid, int timeout_ms, int *status)
{
    for (int waited = 0;; waited += 5) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid)
            return 0;
        if (r < 0)
            return -errno;
        if (waited >= timeout_ms)
            return -ETIMEDOUT;
        sleep_ms(5);
    }
}

int ckv_test_stop(pid_t pid, int sig, int timeout_ms)
{
    int status = 0;
    kill(pid, sig);
    if (ckv_test_wait(pid, timeout_ms, &status) == -ETIMEDOUT) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    return status;
}

int ckv_test_wait_path(const char *path, int timeout_ms)
{
    for (int waited = 0;; waited += 5) {
        if (access(path, F_OK) == 0)
            return 0;
        if (waited >= timeout_ms)
            return -ETIMEDOUT;
        sleep_ms(5);
    }
}

int ckv_test_write_file(const char *path, const char *text, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return -errno;
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w <= 0) {
            int e = errno;
            close(fd);
            return -e;
        }
        off += (size_t)w;
    }
    close(fd);
    return 0;
}

const char *ckv_test_default_model(void)
{
    static char path[1024];
    const char *dir = getenv("CKV_MODEL_DIR");
    const char *home = getenv("HOME");
    if (dir && *dir)
        snprintf(path, sizeof(path), "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    else
        snprintf(path, sizeof(path), "%s/.cache/clusterkv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 home && *home ? home : "/root");
    return access(path, R_OK) == 0 ? path : NULL;
}

char *ckv_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap = (n + 4096 + 1) * 2;
            char *b = realloc(buf, cap);
            if (!b) {
                free(buf);
                fclose(f);
                errno = ENOMEM;
                return NULL;
            }
            buf = b;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        errno = EIO;
        return NULL;
    }
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}

void ckv_test_img_put(struct ckv_test_img *m, const void *data, size_t n)
{
    if (m->len + n > m->cap) {
        m->cap = (m->len + n) * 2 + 64;
        m->p = realloc(m->p, m->cap);
        if (!m->p)
            abort();
    }
    memcpy(m->p + m->len, data, n);
    m->len += n;
}

void ckv_test_img_u32(struct ckv_test_img *m, uint32_t v)
{
    ckv_test_img_put(m, &v, 4);
}
void ckv_test_img_u64(struct ckv_test_img *m, uint64_t v)
{
    ckv_test_img_put(m, &v, 8);
}

void ckv_test_img_bytes(struct ckv_test_img *m, const void *s, size_t n)
{
    ckv_test_img_u64(m, n);
    ckv_test_img_put(m, s, n);
}

void ckv_test_img_str(struct ckv_test_img *m, const char *s)
{
    ckv_test_img_bytes(m, s, strlen(s));
}

void ckv_test_img_header(struct ckv_test_img *m, uint32_t version, uint64_t n_tensors,
                         uint64_t n_kv)
{
    ckv_test_img_put(m, "GGUF", 4);
    ckv_test_img_u32(m, version);
    ckv_test_img_u64(m, n_tensors);
    ckv_test_img_u64(m, n_kv);
}

enum { IMG_UINT32 = 4, IMG_STRING = 8, IMG_ARRAY = 9 }; /* GGUF's type numbers */

void ckv_test_img_kv_str(struct ckv_test_img *m, const char *key, const char *val)
{
    ckv_test_img_str(m, key);
    ckv_test_img_u32(m, IMG_STRING);
    ckv_test_img_str(m, val);
}

void ckv_test_img_kv_u32(struct ckv_test_img *m, const char *key, uint32_t val)
{
    ckv_test_img_str(m, key);
    ckv_test_img_u32(m, IMG_UINT32);
    ckv_test_img_u32(m, val);
}

void ckv_test_img_kv_arr(struct ckv_test_img *m, const char *key, uint32_t elem_type, uint64_t n)
{
    ckv_test_img_str(m, key);
    ckv_test_img_u32(m, IMG_ARRAY);
    ckv_test_img_u32(m, elem_type);
    ckv_test_img_u64(m, n);
}
