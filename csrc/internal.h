/*
 * internal.h -- what the public entry points (kernels.c) share with the loops (loops*.c).
 *
 * The entry points validate the arguments and turn hyperparameters into per-step scalars, in
 * double, once per call; a loop receives only those scalars and streams over the buffers.  The
 * loops are compiled once per instruction set, and fo_loops is one such build's table.
 */
#ifndef FASTOPT_INTERNAL_H
#define FASTOPT_INTERNAL_H

#include "fastopt.h"

#define FO_CAT_(a, b) a##_##b
#define FO_CAT(a, b) FO_CAT_(a, b)

/* Every rule starts from g = grad_sign * grad + l2 * theta. */
typedef struct {
    double grad_sign, l2;
    double buffer_decay, buffer_grad_coef; /* b <- buffer_decay b + buffer_grad_coef g */
    double momentum, direct_grad_coef;     /* nesterov: d = momentum b + direct_grad_coef g */
    double step_scale;                 /* theta <- theta - step_scale * d */
    int has_buffer, nesterov;
} fo_sgd_scalars;

typedef struct {
    double grad_sign, l2, lr, eps_inside, eps_outside;
} fo_adagrad_scalars;

typedef struct {
    double grad_sign, l2, lr, rho, one_minus_rho, eps;
} fo_adadelta_scalars;

typedef struct {
    double grad_sign, l2, lr, rho, one_minus_rho, eps_inside, eps_outside, momentum;
    int centered, has_momentum;
} fo_rmsprop_scalars;

typedef struct {
    double grad_sign, l2, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
    double step_size;   /* lr / (1 - beta1^t) */
    double max_scale;   /* what v is scaled by before the AMSGrad max */
    double denom_scale; /* what sqrt(max or v) is scaled by before eps is added */
    double eps;
    int amsgrad;
} fo_adam_scalars;

typedef struct {
    double grad_sign, l2, beta1, one_minus_beta1, beta2, step_size, eps_inside_max, eps_outside;
} fo_adamax_scalars;

typedef struct {
    double grad_sign, l2, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
    double denom_scale, eps, grad_coef, momentum_coef;
} fo_nadam_scalars;

#define FO_LOOP_TYPES(T, SFX)                                                                  \
    void (*FO_CAT(sgd, SFX))(T *, const T *, T *, size_t, const fo_sgd_scalars *);             \
    void (*FO_CAT(adagrad, SFX))(T *, const T *, T *, size_t, const fo_adagrad_scalars *);     \
    void (*FO_CAT(adadelta, SFX))(T *, const T *, T *, T *, size_t, const fo_adadelta_scalars *); \
    void (*FO_CAT(rmsprop, SFX))(T *, const T *, T *, T *, T *, size_t, const fo_rmsprop_scalars *); \
    void (*FO_CAT(adam, SFX))(T *, const T *, T *, T *, T *, size_t, const fo_adam_scalars *);  \
    void (*FO_CAT(adamax, SFX))(T *, const T *, T *, T *, size_t, const fo_adamax_scalars *);  \
    void (*FO_CAT(nadam, SFX))(T *, const T *, T *, T *, size_t, const fo_nadam_scalars *);

typedef struct {
    const char *name;
    FO_LOOP_TYPES(float, f32)
    FO_LOOP_TYPES(double, f64)
} fo_loops;

extern const fo_loops fo_loops_baseline;

#endif
