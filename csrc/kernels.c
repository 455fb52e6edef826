/*
 * kernels.c -- the public entry points of fastopt.h.
 *
 * Each entry point validates its arguments (NULL buffers, overlapping buffers, hyperparameters),
 * turns the hyperparameters into per-step scalars in double, and hands them to the loop of the
 * active instruction set.  Nothing is written before validation has passed.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

/* ---- instruction set, chosen once --------------------------------------------------------- */

static const fo_loops *active_loops;
static pthread_once_t active_once = PTHREAD_ONCE_INIT;

static void choose_loops(void)
{
    const fo_loops *best = &fo_loops_baseline;
#ifdef FO_X86
    /* FASTOPT_ISA caps the level (baseline, avx2, avx512) so tests can run every path */
    const char *cap = getenv("FASTOPT_ISA");
    const int cap_level = !cap || !*cap               ? 2
                          : strcmp(cap, "avx512") == 0 ? 2
                          : strcmp(cap, "avx2") == 0   ? 1
                                                       : 0;
    __builtin_cpu_init();
    if (cap_level >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        best = &fo_loops_avx2;
    if (cap_level >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        best = &fo_loops_avx512;
#endif
    active_loops = best;
}

static const fo_loops *fo_active(void)
{
    pthread_once(&active_once, choose_loops);
    return active_loops;
}

const char *fo_isa(void) { return fo_active()->name; }

const char *fo_strerror(int status)
{
    switch (status) {
    case FO_OK: return "ok";
    case FO_ERR_NULL: return "a required buffer or the hyperparameter struct is NULL";
    case FO_ERR_HYPERPARAM: return "a hyperparameter is NaN, infinite or out of range";
    case FO_ERR_OVERLAP: return "a buffer that is written overlaps another buffer";
    default: return "unknown fastopt status";
    }
}

/* ---- validation ------------------------------------------------------------------------- */

static int nonneg(double x) { return x >= 0.0 && isfinite(x); } /* NaN fails */
static int unit_interval(double x) { return x >= 0.0 && x < 1.0; } /* [0, 1), NaN fails */
static int convention_ok(int c) { return c == FO_TEXTBOOK || c == FO_TORCH; }

/* Marks, in check_tensor's list, a buffer that the call's options leave unused. */
static char unused_marker;
#define FO_UNUSED ((void *)&unused_marker)

/*
 * One tensor's buffers: the gradient (read) and written[0..n_written), n elements of elem_size
 * bytes each (FO_UNUSED entries are skipped).  All must be non-NULL when n > 0, and no written
 * buffer may overlap another buffer: the loops read each element once and write it once,
 * which is only correct for disjoint buffers.
 */
static int check_tensor(size_t n, size_t elem_size, const void *grad, void *const *written,
                        int n_written)
{
    if (n == 0) return FO_OK;
    if (!grad) return FO_ERR_NULL;
    for (int i = 0; i < n_written; i++)
        if (!written[i]) return FO_ERR_NULL;
    if (n > SIZE_MAX / elem_size) return FO_ERR_OVERLAP; /* no two such buffers can be disjoint */
    const uintptr_t bytes = (uintptr_t)(n * elem_size), g = (uintptr_t)grad;
    for (int i = 0; i < n_written; i++) {
        const uintptr_t a = (uintptr_t)written[i];
        if (written[i] == FO_UNUSED) continue;
        if (a < g + bytes && g < a + bytes) return FO_ERR_OVERLAP;
        for (int j = i + 1; j < n_written; j++) {
            const uintptr_t b = (uintptr_t)written[j];
            if (written[j] != FO_UNUSED && a < b + bytes && b < a + bytes) return FO_ERR_OVERLAP;
        }
    }
    return FO_OK;
}

/* g = grad_sign * grad + l2 * theta; the decay of decoupled weight decay is the caller's. */
static void gradient_terms(int maximize, double weight_decay, int decoupled, double *grad_sign,
                           double *l2)
{
    *grad_sign = maximize ? -1.0 : 1.0;
    *l2 = decoupled ? 0.0 : weight_decay;
}

/* ---- per-rule scalars --------------------------------------------------------------------- */

static int sgd_scalars(const fo_sgd_params *hp, fo_sgd_scalars *s)
{
    if (!nonneg(hp->lr) || !nonneg(hp->momentum) || !nonneg(hp->weight_decay) ||
        !(hp->dampening >= 0.0 && hp->dampening <= 1.0) || !convention_ok(hp->convention) ||
        (hp->nesterov && !(hp->momentum > 0.0)) ||
        (hp->convention == FO_TORCH && hp->momentum > 0.0 &&
         (hp->step < 1 || (hp->nesterov && hp->dampening != 0.0))))
        return FO_ERR_HYPERPARAM;
    gradient_terms(hp->maximize, hp->weight_decay, 0, &s->grad_sign, &s->l2);
    s->has_buffer = hp->momentum > 0.0;
    s->nesterov = hp->nesterov != 0;
    s->momentum = s->buffer_decay = hp->momentum;
    if (hp->convention == FO_TORCH) {
        const int seed = hp->step == 1; /* torch clones g into its new buffer on the first step */
        s->buffer_decay = seed ? 0.0 : hp->momentum;
        s->buffer_grad_coef = seed ? 1.0 : 1.0 - hp->dampening;
        s->direct_grad_coef = 1.0;
        s->step_scale = hp->lr;
    } else {
        s->buffer_grad_coef = hp->lr;
        s->direct_grad_coef = hp->lr;
        s->step_scale = 1.0;
    }
    return FO_OK;
}

static int adagrad_scalars(const fo_adagrad_params *hp, fo_adagrad_scalars *s)
{
    if (!nonneg(hp->lr) || !nonneg(hp->eps) || !nonneg(hp->weight_decay) ||
        !convention_ok(hp->convention))
        return FO_ERR_HYPERPARAM;
    gradient_terms(hp->maximize, hp->weight_decay, 0, &s->grad_sign, &s->l2);
    s->lr = hp->lr;
    s->eps_inside = hp->convention == FO_TORCH ? 0.0 : hp->eps;
    s->eps_outside = hp->convention == FO_TORCH ? hp->eps : 0.0;
    return FO_OK;
}

static int adadelta_scalars(const fo_adadelta_params *hp, fo_adadelta_scalars *s)
{
    if (!nonneg(hp->lr) || !unit_interval(hp->rho) || !nonneg(hp->eps) ||
        !nonneg(hp->weight_decay))
        return FO_ERR_HYPERPARAM;
    gradient_terms(hp->maximize, hp->weight_decay, 0, &s->grad_sign, &s->l2);
    s->lr = hp->lr;
    s->rho = hp->rho;
    s->one_minus_rho = 1.0 - hp->rho;
    s->eps = hp->eps;
    return FO_OK;
}

static int rmsprop_scalars(const fo_rmsprop_params *hp, fo_rmsprop_scalars *s)
{
    if (!nonneg(hp->lr) || !unit_interval(hp->rho) || !nonneg(hp->eps) ||
        !nonneg(hp->weight_decay) || !nonneg(hp->momentum) || !convention_ok(hp->convention))
        return FO_ERR_HYPERPARAM;
    gradient_terms(hp->maximize, hp->weight_decay, 0, &s->grad_sign, &s->l2);
    s->lr = hp->lr;
    s->rho = hp->rho;
    s->one_minus_rho = 1.0 - hp->rho;
    s->eps_inside = hp->convention == FO_TORCH ? 0.0 : hp->eps;
    s->eps_outside = hp->convention == FO_TORCH ? hp->eps : 0.0;
    s->momentum = hp->momentum;
    s->centered = hp->centered != 0;
    s->has_momentum = hp->momentum > 0.0;
    return FO_OK;
}

static int adam_scalars(const fo_adam_params *hp, fo_adam_scalars *s)
{
    if (!nonneg(hp->lr) || !unit_interval(hp->beta1) || !unit_interval(hp->beta2) ||
        !nonneg(hp->eps) || !nonneg(hp->weight_decay) || hp->step < 1 ||
        !convention_ok(hp->convention))
        return FO_ERR_HYPERPARAM;
    const int decoupled = hp->decoupled_weight_decay != 0;
    gradient_terms(hp->maximize, hp->weight_decay, decoupled, &s->grad_sign, &s->l2);
    /* scalars in double, as torch's fused Adam does, so both dtypes see the same schedule */
    const double bias1 = 1.0 - pow(hp->beta1, (double)hp->step);
    const double bias2 = 1.0 - pow(hp->beta2, (double)hp->step);
    s->decay = decoupled ? 1.0 - hp->lr * hp->weight_decay : 1.0;
    s->beta1 = hp->beta1;
    s->one_minus_beta1 = 1.0 - hp->beta1;
    s->beta2 = hp->beta2;
    s->one_minus_beta2 = 1.0 - hp->beta2;
    s->step_size = hp->lr / bias1;
    s->eps = hp->eps;
    s->amsgrad = hp->amsgrad != 0;
    const int max_of_vhat = s->amsgrad && hp->convention == FO_TEXTBOOK;
    s->max_scale = max_of_vhat ? 1.0 / bias2 : 1.0;
    s->denom_scale = max_of_vhat ? 1.0 : 1.0 / sqrt(bias2);
    return FO_OK;
}

static int adamax_scalars(const fo_adamax_params *hp, fo_adamax_scalars *s)
{
    if (!nonneg(hp->lr) || !unit_interval(hp->beta1) || !unit_interval(hp->beta2) ||
        !nonneg(hp->eps) || !nonneg(hp->weight_decay) || hp->step < 1 ||
        !convention_ok(hp->convention))
        return FO_ERR_HYPERPARAM;
    gradient_terms(hp->maximize, hp->weight_decay, 0, &s->grad_sign, &s->l2);
    s->beta1 = hp->beta1;
    s->one_minus_beta1 = 1.0 - hp->beta1;
    s->beta2 = hp->beta2;
    s->step_size = hp->lr / (1.0 - pow(hp->beta1, (double)hp->step));
    s->eps_inside_max = hp->convention == FO_TORCH ? hp->eps : 0.0;
    s->eps_outside = hp->convention == FO_TORCH ? 0.0 : hp->eps;
    return FO_OK;
}

static int nadam_scalars(const fo_nadam_params *hp, fo_nadam_scalars *s)
{
    if (!nonneg(hp->lr) || !unit_interval(hp->beta1) || !unit_interval(hp->beta2) ||
        !nonneg(hp->eps) || !nonneg(hp->weight_decay) || hp->step < 1 ||
        !convention_ok(hp->convention) ||
        (hp->convention == FO_TORCH &&
         (!nonneg(hp->momentum_decay) || !unit_interval(hp->mu_product))))
        return FO_ERR_HYPERPARAM;
    const int decoupled = hp->decoupled_weight_decay != 0;
    gradient_terms(hp->maximize, hp->weight_decay, decoupled, &s->grad_sign, &s->l2);
    const double t = (double)hp->step;
    const double bias1 = 1.0 - pow(hp->beta1, t);
    s->decay = decoupled ? 1.0 - hp->lr * hp->weight_decay : 1.0;
    s->beta1 = hp->beta1;
    s->one_minus_beta1 = 1.0 - hp->beta1;
    s->beta2 = hp->beta2;
    s->one_minus_beta2 = 1.0 - hp->beta2;
    s->denom_scale = 1.0 / sqrt(1.0 - pow(hp->beta2, t));
    s->eps = hp->eps;
    if (hp->convention == FO_TORCH) {
        const double mu = hp->beta1 * (1.0 - 0.5 * pow(0.96, t * hp->momentum_decay));
        const double mu_next = hp->beta1 * (1.0 - 0.5 * pow(0.96, (t + 1.0) * hp->momentum_decay));
        s->grad_coef = hp->lr * (1.0 - mu) / (1.0 - hp->mu_product);
        s->momentum_coef = hp->lr * mu_next / (1.0 - hp->mu_product * mu_next);
    } else {
        s->grad_coef = hp->lr * (1.0 - hp->beta1) / bias1;
        s->momentum_coef = hp->lr * hp->beta1 / bias1;
    }
    return FO_OK;
}

/* ---- the bandwidth ceiling ------------------------------------------------------------------ */

/* Adam's memory traffic (read 4 streams, write 3) with trivial arithmetic: what the benchmark
 * compares every rule with, through the same threads. */
static void stream_span(void *const *b, size_t at, size_t n, const void *unused)
{
    (void)unused;
    float *restrict p = (float *)b[0] + at, *restrict m = (float *)b[2] + at,
                    *restrict v = (float *)b[3] + at;
    const float *restrict g = (const float *)b[1] + at;
    for (size_t i = 0; i < n; i++) {
        const float x = g[i];
        p[i] += x;
        m[i] += x;
        v[i] += x;
    }
}

void fo_stream_f32(float *p, const float *g, float *m, float *v, size_t n)
{
    void *const *const bufs[] = {(void *const *)&p, (void *const *)&g, (void *const *)&m,
                                 (void *const *)&v};
    fo_run(stream_span, 1, bufs, 4, &n, NULL);
}

/* ---- the entry points, once per dtype ------------------------------------------------------ */

#define FO_T float
#define FO_SFX f32
#define FO_DTYPE FO_F32
#include "api.inc"
#undef FO_T
#undef FO_SFX
#undef FO_DTYPE

#define FO_T double
#define FO_SFX f64
#define FO_DTYPE FO_F64
#include "api.inc"
#undef FO_T
#undef FO_SFX
#undef FO_DTYPE
