/*
 * Token sampling (sampler.h). Random sampling works on a candidate list: every id whose
 * tempered logit is within CUTOFF of the largest (the others have probability below e^-30
 * relative to the best: even 10^6 of them weigh under 1e-7 in all, below float resolution of
 * the cumulative sum), then top-k, sort, top-p, and one uniform draw over what is left.
 * Pruning first keeps the sort small (tens to thousands of ids instead of the vocabulary).
 */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_error.h"
#include "ckv_rng.h"

#define CUTOFF 30.0f

void ckv_sampler_opts_default(struct ckv_sampler_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->temperature = 0.0f;
    o->top_k = 0;
    o->top_p = 1.0f;
}

int ckv_sampler_init(struct ckv_sampler *s, const struct ckv_sampler_opts *o, int n_vocab,
                     char *err, size_t errlen)
{
    memset(s, 0, sizeof(*s));
    if (n_vocab < 1)
        return ckv_errorf(-EINVAL, err, errlen, "sampler: vocabulary of %d tokens", n_vocab);
    if (!isfinite(o->temperature))
        return ckv_errorf(-EINVAL, err, errlen, "sampler: temperature must be finite");
    if (o->top_k < 0)
        return ckv_errorf(-EINVAL, err, errlen, "sampler: top-k %d < 0", o->top_k);
    if (!(o->top_p > 0.0f && o->top_p <= 1.0f))
        return ckv_errorf(-EINVAL, err, errlen, "sampler: top-p %g not in (0, 1]",
                          (double)o->top_p);
    if (o->max_tokens < 0)
        return ckv_errorf(-EINVAL, err, errlen, "sampler: max tokens %d < 0", o->max_tokens);
    if (o->n_stop < 0 || o->n_stop > CKV_SAMPLER_MAX_STOP)
        return ckv_errorf(-EINVAL, err, errlen, "sampler: %d stop tokens (at most %d)", o->n_stop,
                          CKV_SAMPLER_MAX_STOP);
    s->cand = malloc((size_t)n_vocab * sizeof(*s->cand));
    if (!s->cand)
        return -ENOMEM;
    s->o = *o;
    s->n_vocab = n_vocab;
    s->rng = o->seed;
    return 0;
}

void ckv_sampler_free(struct ckv_sampler *s)
{
    free(s->cand);
    s->cand = NULL;
}

static int32_t argmax(const float *x, int n)
{
    int32_t best = 0;
    float bv = -INFINITY;
    for (int i = 0; i < n; i++)
        if (x[i] > bv) { /* NaN compares false: never chosen */
            bv = x[i];
            best = i;
        }
    return best;
}

/* Descending logit, then ascending id: a total order, so the result does not depend on the
 * sort's stability. */
static int cand_cmp(const void *a, const void *b)
{
    const struct ckv_sampler_cand *x = a, *y = b;
    if (x->logit != y->logit)
        return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

int32_t ckv_sampler_sample(struct ckv_sampler *s, const float *logits)
{
    int32_t best = argmax(logits, s->n_vocab);
    if (s->o.temperature <= 0.0f || s->o.top_k == 1 || !isfinite(logits[best]))
        return best;
    float inv_t = 1.0f / s->o.temperature;
    float lmax = logits[best] * inv_t;
    int n = 0;
    for (int i = 0; i < s->n_vocab; i++) {
        float l = logits[i] * inv_t;
        if (l >= lmax - CUTOFF) { /* NaN fails too */
            s->cand[n].id = i;
            s->cand[n].logit = l;
            n++;
        }
    }
    qsort(s->cand, (size_t)n, sizeof(*s->cand), cand_cmp);
    if (s->o.top_k > 0 && s->o.top_k < n)
        n = s->o.top_k;
    /* Probabilities relative to the best (which is 1), then the nucleus. */
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += exp((double)(s->cand[i].logit - lmax));
    if (s->o.top_p < 1.0f) {
        double need = (double)s->o.top_p * sum, acc = 0.0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            acc += exp((double)(s->cand[i].logit - lmax));
            if (acc >= need) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
        sum = acc; /* the kept mass (the total when nothing was cut) */
    }
    double u = ckv_rng_uniform(&s->rng) * sum, acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += exp((double)(s->cand[i].logit - lmax));
        if (u < acc)
            return s->cand[i].id;
    }
    return s->cand[n - 1].id; /* u rounded up to the total */
}

enum ckv_sampler_end ckv_sampler_accept(struct ckv_sampler *s, int32_t id)
{
    s->n_sampled++;
    for (int i = 0; i < s->o.n_stop; i++)
        if (s->o.stop[i] == id)
            return CKV_SAMPLER_STOP;
    if (s->o.max_tokens > 0 && s->n_sampled >= s->o.max_tokens)
        return CKV_SAMPLER_LIMIT;
    return CKV_SAMPLER_GO;
}
