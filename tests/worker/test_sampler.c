/*
 * Suite "sampler": worker/sampler.c against what each rule means, computed independently here
 * (softmax by hand, sorted sets): greedy is the argmax, temperature sampling follows the
 * softmax (a frequency test with a stated bound), top-k and top-p never give a token outside
 * their set, a seed reproduces the same tokens, stop tokens and the limit end a generation,
 * and bad options are refused.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"

static struct ckv_sampler make(float temp, int top_k, float top_p, uint64_t seed, int n_vocab)
{
    struct ckv_sampler_opts o;
    ckv_sampler_opts_default(&o);
    o.temperature = temp;
    o.top_k = top_k;
    o.top_p = top_p;
    o.seed = seed;
    struct ckv_sampler s;
    char err[256];
    cr_assert_eq(ckv_sampler_init(&s, &o, n_vocab, err, sizeof(err)), 0, "%s", err);
    return s;
}

Test(sampler, greedy_is_argmax_lowest_id_on_ties)
{
    float l[6] = {0.5f, 3.0f, -1.0f, 3.0f, NAN, 2.9f};
    struct ckv_sampler s = make(0.0f, 0, 1.0f, 1, 6);
    cr_assert_eq(ckv_sampler_sample(&s, l), 1);
    ckv_sampler_free(&s);
    /* top-k 1 is greedy at any temperature */
    s = make(5.0f, 1, 1.0f, 7, 6);
    for (int i = 0; i < 20; i++)
        cr_assert_eq(ckv_sampler_sample(&s, l), 1);
    ckv_sampler_free(&s);
}

/* Frequencies of 20000 draws against the softmax at temperature T: each |f - p| under
 * 4.5 standard deviations of a binomial (sqrt(p(1-p)/N)) plus 1e-3; a wrong temperature
 * (e.g. ignored) moves the largest probability of this example by more than 0.1. */
Test(sampler, temperature_follows_softmax)
{
    enum { V = 5, N = 20000 };
    float l[V] = {1.0f, 2.0f, 0.0f, 2.5f, -1.0f};
    const float T = 0.7f;
    double p[V], sum = 0;
    for (int i = 0; i < V; i++)
        sum += p[i] = exp(l[i] / T);
    for (int i = 0; i < V; i++)
        p[i] /= sum;
    struct ckv_sampler s = make(T, 0, 1.0f, 12345, V);
    int cnt[V] = {0};
    for (int i = 0; i < N; i++) {
        int32_t id = ckv_sampler_sample(&s, l);
        cr_assert(id >= 0 && id < V);
        cnt[id]++;
    }
    for (int i = 0; i < V; i++) {
        double f = (double)cnt[i] / N, sd = sqrt(p[i] * (1 - p[i]) / N);
        cr_expect(fabs(f - p[i]) < 4.5 * sd + 1e-3, "id %d: freq %.4f, softmax %.4f", i, f, p[i]);
    }
    ckv_sampler_free(&s);
}

Test(sampler, top_k_and_top_p_stay_in_their_sets)
{
    enum { V = 100 };
    float l[V];
    for (int i = 0; i < V; i++)
        l[i] = (float)((i * 37) % V) * 0.05f; /* distinct values, shuffled ids */
    /* the 5 largest ids */
    int order[V];
    for (int i = 0; i < V; i++)
        order[i] = i;
    for (int i = 0; i < V; i++)
        for (int j = i + 1; j < V; j++)
            if (l[order[j]] > l[order[i]]) {
                int t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
    struct ckv_sampler s = make(2.0f, 5, 1.0f, 3, V);
    bool seen[V] = {0};
    for (int i = 0; i < 3000; i++) {
        int32_t id = ckv_sampler_sample(&s, l);
        bool in = false;
        for (int j = 0; j < 5; j++)
            in |= order[j] == id;
        cr_assert(in, "top-k 5 gave id %d", id);
        seen[id] = true;
    }
    for (int j = 0; j < 5; j++)
        cr_expect(seen[order[j]], "top-k 5 never gave id %d", order[j]);
    ckv_sampler_free(&s);

    /* top-p: the smallest prefix of the sorted softmax reaching p */
    const float T = 1.0f, P = 0.5f;
    double pr[V], sum = 0;
    for (int i = 0; i < V; i++)
        sum += pr[i] = exp(l[i] / T);
    double acc = 0;
    int nucleus = 0;
    while (acc < P * sum)
        acc += pr[order[nucleus++]];
    s = make(T, 0, P, 4, V);
    memset(seen, 0, sizeof(seen));
    for (int i = 0; i < 5000; i++) {
        int32_t id = ckv_sampler_sample(&s, l);
        bool in = false;
        for (int j = 0; j < nucleus; j++)
            in |= order[j] == id;
        cr_assert(in, "top-p %.2f gave id %d outside the nucleus of %d", P, id, nucleus);
        seen[id] = true;
    }
    for (int j = 0; j < nucleus; j++)
        cr_expect(seen[order[j]], "top-p never gave id %d of the nucleus", order[j]);
    ckv_sampler_free(&s);
}

Test(sampler, seed_reproduces)
{
    enum { V = 1000 };
    float *l = malloc(V * sizeof(float));
    for (int i = 0; i < V; i++)
        l[i] = sinf((float)i) * 3.0f;
    int32_t a[64], b[64], c[64];
    struct ckv_sampler s1 = make(1.0f, 40, 0.9f, 99, V), s2 = make(1.0f, 40, 0.9f, 99, V),
                       s3 = make(1.0f, 40, 0.9f, 100, V);
    for (int i = 0; i < 64; i++) {
        a[i] = ckv_sampler_sample(&s1, l);
        b[i] = ckv_sampler_sample(&s2, l);
        c[i] = ckv_sampler_sample(&s3, l);
    }
    cr_assert_arr_eq(a, b, sizeof(a), "same seed, different tokens");
    cr_assert(memcmp(a, c, sizeof(a)) != 0, "another seed gave the same 64 tokens");
    ckv_sampler_free(&s1);
    ckv_sampler_free(&s2);
    ckv_sampler_free(&s3);
    free(l);
}

Test(sampler, stop_tokens_and_limit)
{
    struct ckv_sampler_opts o;
    ckv_sampler_opts_default(&o);
    o.max_tokens = 3;
    o.stop[0] = 7;
    o.stop[1] = 9;
    o.n_stop = 2;
    struct ckv_sampler s;
    cr_assert_eq(ckv_sampler_init(&s, &o, 10, NULL, 0), 0);
    cr_assert_eq(ckv_sampler_accept(&s, 1), CKV_SAMPLER_GO);
    cr_assert_eq(ckv_sampler_accept(&s, 9), CKV_SAMPLER_STOP);
    cr_assert_eq(ckv_sampler_accept(&s, 2), CKV_SAMPLER_LIMIT);
    ckv_sampler_free(&s);
    o.max_tokens = 0; /* no limit */
    cr_assert_eq(ckv_sampler_init(&s, &o, 10, NULL, 0), 0);
    for (int i = 0; i < 1000; i++)
        cr_assert_eq(ckv_sampler_accept(&s, 1), CKV_SAMPLER_GO);
    ckv_sampler_free(&s);
}

Test(sampler, bad_options)
{
    struct ckv_sampler_opts o;
    struct ckv_sampler s;
    char err[256];
    ckv_sampler_opts_default(&o);
    o.top_p = 0.0f;
    cr_assert_eq(ckv_sampler_init(&s, &o, 10, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "top-p"), "%s", err);
    ckv_sampler_opts_default(&o);
    o.top_k = -1;
    cr_assert_eq(ckv_sampler_init(&s, &o, 10, err, sizeof(err)), -EINVAL);
    ckv_sampler_opts_default(&o);
    o.temperature = INFINITY;
    cr_assert_eq(ckv_sampler_init(&s, &o, 10, err, sizeof(err)), -EINVAL);
    ckv_sampler_opts_default(&o);
    o.n_stop = CKV_SAMPLER_MAX_STOP + 1;
    cr_assert_eq(ckv_sampler_init(&s, &o, 10, err, sizeof(err)), -EINVAL);
    ckv_sampler_opts_default(&o);
    cr_assert_eq(ckv_sampler_init(&s, &o, 0, err, sizeof(err)), -EINVAL);
}
