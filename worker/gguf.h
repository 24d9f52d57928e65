/*
 * GGUF (v2/v3) reader: the model file format of llama.cpp. The file is mmap'ed read-only;
 * metadata and the tensor table are parsed and validated once at open, tensor data stays in
 * the mapping (zero copy).
 *
 * Layout (little-endian): magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv
 * metadata entries (string key, u32 value type, value), then n_tensors tensor infos (string
 * name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset), then padding to
 * `general.alignment` (default 32), then the tensor data; each tensor's offset is relative to
 * the data start and aligned. Strings are u64 length + bytes (not NUL-terminated).
 *
 * Every check is done at open, so that nothing later can read out of bounds: a truncated file,
 * an offset or size outside the file, absurd counts or lengths, an unknown or unsupported type
 * give CKV_EFORMAT / CKV_EUNSUPPORTED and a message naming the problem (and the key or tensor).
 */
#ifndef GGUF_H
#define GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Metadata value types. */
enum gguf_type {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT
};

/* Tensor element types (ggml's numbering). Those this reader accepts are listed in
 * gguf_tensor_type_supported(); others are refused at open with their name. */
enum ggml_type {
    GGML_TYPE_F32 = 0,
    GGML_TYPE_F16 = 1,
    GGML_TYPE_Q4_0 = 2,
    GGML_TYPE_Q4_1 = 3,
    GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q5_1 = 7,
    GGML_TYPE_Q8_0 = 8,
    GGML_TYPE_Q8_1 = 9,
    GGML_TYPE_Q2_K = 10,
    GGML_TYPE_Q3_K = 11,
    GGML_TYPE_Q4_K = 12,
    GGML_TYPE_Q5_K = 13,
    GGML_TYPE_Q6_K = 14,
    GGML_TYPE_Q8_K = 15,
    GGML_TYPE_BF16 = 30,
    GGML_TYPE_COUNT = 40
};

#define GGUF_MAX_DIMS 4

struct gguf_str {
    const char *ptr; /* into the mapping: NOT NUL-terminated */
    uint64_t len;
};

struct gguf_tensor {
    char *name;                /* owned by the gguf_t, NUL-terminated */
    uint32_t n_dims;           /* 1..GGUF_MAX_DIMS */
    uint64_t ne[GGUF_MAX_DIMS]; /* elements per dimension, ne[0] innermost (a row); 1 beyond n_dims */
    enum ggml_type type;
    uint64_t offset;           /* from the data section start */
    uint64_t nbytes;
    const void *data;          /* into the mapping */
};

typedef struct gguf gguf_t;

/* Maps and parses the file at path. On success the caller owns *out (gguf_close()). On failure
 * returns -errno (open/mmap), CKV_EFORMAT or CKV_EUNSUPPORTED with a message in err. */
int gguf_open(const char *path, gguf_t **out, char *err, size_t errlen);

/* Parses a GGUF image held in memory (not copied: it must outlive the gguf_t). For fuzzing and
 * tests. */
int gguf_open_mem(const void *data, size_t size, gguf_t **out, char *err, size_t errlen);

/* Unmaps and frees; NULLs the pointer. NULL is fine. */
void gguf_close(gguf_t **g);

uint32_t gguf_version(const gguf_t *g);
uint64_t gguf_n_kv(const gguf_t *g);
uint64_t gguf_n_tensors(const gguf_t *g);
size_t gguf_file_size(const gguf_t *g);

/* ---- metadata ---- */

/* Index of key, or -1. */
int64_t gguf_find_key(const gguf_t *g, const char *key);
/* Key name of entry i (NUL-terminated, owned by g). */
const char *gguf_key(const gguf_t *g, int64_t i);
enum gguf_type gguf_kv_type(const gguf_t *g, int64_t i);

/* Typed getters by key name. Integer getters accept any integer type whose value fits;
 * gguf_get_f32 accepts FLOAT32 and FLOAT64. Return 0, -ENOENT when the key is absent, or
 * CKV_EFORMAT when its type or value does not fit (err names the key; err may be NULL). */
int gguf_get_u32(const gguf_t *g, const char *key, uint32_t *out, char *err, size_t errlen);
int gguf_get_i64(const gguf_t *g, const char *key, int64_t *out, char *err, size_t errlen);
int gguf_get_f32(const gguf_t *g, const char *key, float *out, char *err, size_t errlen);
int gguf_get_bool(const gguf_t *g, const char *key, bool *out, char *err, size_t errlen);
int gguf_get_str(const gguf_t *g, const char *key, struct gguf_str *out, char *err, size_t errlen);

/* Arrays: element type and count. For numeric element types *data points at the packed
 * little-endian elements in the mapping (possibly unaligned: read with memcpy). For strings use
 * gguf_get_arr_str(). */
int gguf_get_arr(const gguf_t *g, const char *key, enum gguf_type *elem_type, uint64_t *n,
                 const void **data, char *err, size_t errlen);
/* Element i of a string array (i < n checked: CKV_EFORMAT when out of range). */
int gguf_get_arr_str(const gguf_t *g, const char *key, uint64_t i, struct gguf_str *out);

/* ---- tensors ---- */

const struct gguf_tensor *gguf_tensor(const gguf_t *g, uint64_t i);
/* By name; NULL when absent. */
const struct gguf_tensor *gguf_find_tensor(const gguf_t *g, const char *name);

/* ---- types ---- */

const char *gguf_type_name(enum gguf_type t);
const char *ggml_type_name(enum ggml_type t);
/* Elements per quantization block (1 for float types) and bytes per block; 0 for unknown. */
uint32_t ggml_type_block_elems(enum ggml_type t);
uint32_t ggml_type_block_bytes(enum ggml_type t);
/* Bytes of a row of n elements (n a multiple of the block size). */
uint64_t ggml_row_bytes(enum ggml_type t, uint64_t n);
bool gguf_tensor_type_supported(enum ggml_type t);

#endif
