/*
 * libFuzzer target: the GGUF parser (worker/gguf.c) on arbitrary bytes. Every accepted image
 * must have all tensor data inside the input; ASan/UBSan catch the rest.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "ckv_error.h"
#include "gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    gguf_t *g = NULL;
    char err[256];
    if (gguf_open_mem(data, size, &g, err, sizeof(err)) != 0)
        return 0;
    for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
        const struct gguf_tensor *t = gguf_tensor(g, i);
        ASSERT((const uint8_t *)t->data >= data);
        ASSERT((const uint8_t *)t->data + t->nbytes <= data + size);
    }
    for (uint64_t i = 0; i < gguf_n_kv(g); i++) {
        const char *key = gguf_key(g, (int64_t)i);
        struct gguf_str s;
        uint32_t u;
        float f;
        gguf_get_str(g, key, &s, NULL, 0);
        gguf_get_u32(g, key, &u, NULL, 0);
        gguf_get_f32(g, key, &f, NULL, 0);
        if (gguf_kv_type(g, (int64_t)i) == GGUF_TYPE_ARRAY)
            gguf_get_arr_str(g, key, 0, &s);
    }
    gguf_close(&g);
    return 0;
}
