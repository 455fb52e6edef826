/*
 * kernels.c -- the public entry points of fastopt.h.
 *
 * Each entry point validates its arguments (NULL buffers, overlapping buffers, hyperparameters),
 * turns the hyperparameters into per-step scalars in double, and hands them to the loop of the
 * active instruction set.  Nothing is written before validation has passed.
 */
#include <math.h>
#include <stdint.h>
#include "internal.h"

static const fo_loops *const fo_active = &fo_loops_baseline;

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

/*
 * No buffer written in place may overlap the gradient or another written buffer: the loops
 * read each element once and write it once, which is only correct for disjoint buffers.
 * written[0..n_written) hold n elements of elem_size bytes; NULL entries are unused buffers.
 */
static int check_overlap(size_t n, size_t elem_size, const void *grad, void *const *written,
                         int n_written)
{
    if (n == 0) return FO_OK;
    if (n > SIZE_MAX / elem_size) return FO_ERR_OVERLAP; /* no two such buffers can be disjoint */
    const uintptr_t bytes = (uintptr_t)(n * elem_size), g = (uintptr_t)grad;
    for (int i = 0; i < n_written; i++) {
        const uintptr_t a = (uintptr_t)written[i];
        if (!a) continue;
        if (a < g + bytes && g < a + bytes) return FO_ERR_OVERLAP;
        for (int j = i + 1; j < n_written; j++) {
            const uintptr_t b = (uintptr_t)written[j];
            if (b && a < b + bytes && b < a + bytes) return FO_ERR_OVERLAP;
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

/* ---- the entry points, once per dtype ------------------------------------------------------ */

#define FO_T float
#define FO_SFX f32
#include "api.inc"
#undef FO_T
#undef FO_SFX

#define FO_T double
#define FO_SFX f64
#include "api.inc"
#undef FO_T
#undef FO_SFX
