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

/* One rule's loop over elements [at, at + n) of one tensor whose buffers (param, grad, then the
 * state buffers in the order of the public signature; NULL for unused ones) start at b[]. */
typedef void (*fo_span_fn)(void *const *b, size_t at, size_t n, const void *scalars);

enum { FO_SGD, FO_ADAGRAD, FO_ADADELTA, FO_RMSPROP, FO_ADAM, FO_ADAMAX, FO_NADAM, FO_N_RULES };
enum { FO_F32, FO_F64 };
#define FO_MAX_BUFFERS 5

typedef struct {
    const char *name;
    fo_span_fn span[FO_N_RULES][2];
} fo_loops;

extern const fo_loops fo_loops_baseline;
#if defined(__x86_64__) || defined(__i386__)
#define FO_X86 1
extern const fo_loops fo_loops_avx2;
extern const fo_loops fo_loops_avx512;
#endif

/*
 * Run span over `count` tensors of n[t] elements; bufs[k][t] is buffer k of tensor t (bufs[k]
 * NULL: buffer k unused).  Large jobs are split across the thread pool (threads.c); the
 * result is the same for any split since every element is updated independently.
 */
void fo_run(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
            const size_t *n, const void *scalars);

#endif
