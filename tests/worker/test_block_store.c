/*
 * The in-process block store (worker/block_store_mem.c): put/get byte-exact, the error codes
 * of block_store.h, and that a failed call changes nothing.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block_store.h"

#define BB 256 /* block bytes of these tests */

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(seed * 131u + i * 7u + (i >> 8));
}

static struct ckv_cluster_key key(uint64_t seq, int l, int h, int c)
{
    return (struct ckv_cluster_key){seq, l, h, c};
}

Test(block_store, put_get_byte_exact)
{
    struct ckv_block_store *s = NULL;
    cr_assert_eq(ckv_block_store_mem_new(BB, 0, &s), 0);
    enum { N = 200 };
    struct ckv_cluster_key keys[N];
    int32_t nb[N];
    unsigned char *data[N];
    for (int i = 0; i < N; i++) {
        keys[i] = key(7, i % 5, i % 3, i);
        nb[i] = 1 + i % 4;
        data[i] = malloc((size_t)nb[i] * BB);
        fill(data[i], (size_t)nb[i] * BB, (unsigned)i);
    }
    /* two puts (one layer each in real use), enough to rehash the table */
    cr_assert_eq(ckv_block_store_put(s, keys, nb, (const void *const *)data, N / 2), 0);
    cr_assert_eq(ckv_block_store_put(s, keys + N / 2, nb + N / 2,
                                     (const void *const *)(data + N / 2), N - N / 2),
                 0);
    /* get in another order, all in one call */
    struct ckv_cluster_key gk[N];
    void *dst[N];
    int32_t got[N];
    for (int i = 0; i < N; i++) {
        int j = (i * 37) % N;
        gk[i] = keys[j];
        dst[i] = calloc(4, BB);
    }
    cr_assert_eq(ckv_block_store_get(s, gk, dst, got, N), 0);
    for (int i = 0; i < N; i++) {
        int j = (i * 37) % N;
        cr_assert_eq(got[i], nb[j]);
        cr_assert_eq(memcmp(dst[i], data[j], (size_t)nb[j] * BB), 0, "cluster %d differs", j);
    }
    struct ckv_block_store_mem_stats st;
    cr_assert_eq(ckv_block_store_mem_stats(s, &st), 0);
    cr_assert_eq(st.clusters, N);
    cr_assert_eq(st.puts, 2);
    cr_assert_eq(st.gets, 1);
    for (int i = 0; i < N; i++) {
        free(data[i]);
        free(dst[i]);
    }
    ckv_block_store_destroy(&s);
    cr_assert_null(s);
}

Test(block_store, errors_change_nothing)
{
    struct ckv_block_store *s = NULL;
    cr_assert_eq(ckv_block_store_mem_new(BB, 4 * BB, &s), 0);
    unsigned char a[3 * BB], b[2 * BB], out[4 * BB];
    fill(a, sizeof(a), 1);
    fill(b, sizeof(b), 2);
    struct ckv_cluster_key k1 = key(1, 0, 0, 0), k2 = key(1, 0, 0, 1), k3 = key(2, 3, 1, 0);
    const void *pa[] = {a}, *pb[] = {b};
    int32_t n3 = 3, n2 = 2, n1 = 1;
    cr_assert_eq(ckv_block_store_put(s, &k1, &n3, pa, 1), 0);
    /* written twice */
    cr_assert_eq(ckv_block_store_put(s, &k1, &n1, pb, 1), -EEXIST);
    /* the same key twice in one call: nothing stored */
    struct ckv_cluster_key dup[] = {k3, k3};
    const void *pd[] = {b, b};
    int32_t nd[] = {1, 1};
    cr_assert_eq(ckv_block_store_put(s, dup, nd, pd, 2), -EEXIST);
    /* 3 + 2 blocks > 4 */
    cr_assert_eq(ckv_block_store_put(s, &k2, &n2, pb, 1), -ENOSPC);
    /* a call that would overflow stores none of its clusters */
    struct ckv_cluster_key two[] = {k3, k2};
    const void *p2[] = {b, b};
    int32_t nn[] = {1, 1};
    cr_assert_eq(ckv_block_store_put(s, two, nn, p2, 2), -ENOSPC);
    void *d[] = {out};
    int32_t got = 0;
    cr_assert_eq(ckv_block_store_get(s, &k3, d, &got, 1), -ENOENT);
    cr_assert_eq(ckv_block_store_get(s, &k2, d, &got, 1), -ENOENT);
    /* a get naming one unknown cluster copies nothing */
    memset(out, 0xee, sizeof(out));
    struct ckv_cluster_key gk[] = {k1, k2};
    unsigned char out2[BB];
    void *d2[] = {out, out2};
    int32_t g2[2];
    cr_assert_eq(ckv_block_store_get(s, gk, d2, g2, 2), -ENOENT);
    cr_assert_eq(out[0], 0xee);
    /* the one that fits */
    cr_assert_eq(ckv_block_store_put(s, &k3, &n1, pb, 1), 0);
    cr_assert_eq(ckv_block_store_get(s, &k1, d, &got, 1), 0);
    cr_assert_eq(got, 3);
    cr_assert_eq(memcmp(out, a, 3 * BB), 0);
    /* bad arguments */
    int32_t n0 = 0;
    cr_assert_eq(ckv_block_store_put(s, &k2, &n0, pb, 1), -EINVAL);
    cr_assert_eq(ckv_block_store_mem_new(0, 0, &(struct ckv_block_store *){NULL}), -EINVAL);
    ckv_block_store_destroy(&s);
}

Test(block_store, drop_frees_one_sequence)
{
    struct ckv_block_store *s = NULL;
    cr_assert_eq(ckv_block_store_mem_new(BB, 3 * BB, &s), 0);
    unsigned char a[2 * BB], out[2 * BB];
    fill(a, sizeof(a), 3);
    struct ckv_cluster_key k[] = {key(10, 0, 0, 0), key(11, 0, 0, 0)};
    const void *p[] = {a, a};
    int32_t n[] = {2, 1};
    cr_assert_eq(ckv_block_store_put(s, k, n, p, 2), 0);
    cr_assert_eq(ckv_block_store_drop(s, 10), 0);
    void *d[] = {out};
    int32_t got;
    cr_assert_eq(ckv_block_store_get(s, &k[0], d, &got, 1), -ENOENT);
    cr_assert_eq(ckv_block_store_get(s, &k[1], d, &got, 1), 0);
    cr_assert_eq(got, 1);
    cr_assert_eq(memcmp(out, a, BB), 0);
    /* its bytes are free again: 2 more blocks fit */
    struct ckv_cluster_key k2 = key(10, 0, 0, 0);
    cr_assert_eq(ckv_block_store_put(s, &k2, &n[0], p, 1), 0);
    struct ckv_block_store_mem_stats st;
    cr_assert_eq(ckv_block_store_mem_stats(s, &st), 0);
    cr_assert_eq(st.clusters, 2);
    cr_assert_eq(st.blocks, 3);
    cr_assert_eq(st.drops, 1);
    ckv_block_store_destroy(&s);
}
