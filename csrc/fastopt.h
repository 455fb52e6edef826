/*
 * fastopt.h -- public C API of fastopt's in-place optimizer kernels.
 *
 * Every function updates contiguous buffers of n elements in place, in one pass over memory,
 * without allocating.  The math of each rule lives once in csrc/rules/<rule>.inc and is
 * instantiated for float (_f32) and double (_f64).  Per-step scalars (bias corrections, step
 * sizes) are computed once per call in double.
 *
 * Conventions.  `convention` selects between the textbook formulas (Ruder's overview, the
 * default, FO_TEXTBOOK) and PyTorch's (FO_TORCH): momentum with dampening and lr outside the
 * buffer, eps outside the square root for Adagrad/RMSprop, eps inside the max for AdaMax,
 * AMSGrad's max over the uncorrected v, NAdam's momentum-decay schedule.  The exact equations
 * are at the top of each csrc/rules/<rule>.inc and in the README.
 *
 * Errors.  A function validates its arguments before it writes anything and returns a status:
 * FO_OK, or FO_ERR_* with every buffer untouched.  It never crashes on NULL pointers with n > 0,
 * invalid hyperparameters or overlapping buffers; it does not check that buffers hold n elements.
 */
#ifndef FASTOPT_H
#define FASTOPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FO_API_VERSION 1

enum fo_status {
    FO_OK = 0,
    FO_ERR_NULL = 1,       /* a required buffer is NULL while n > 0 */
    FO_ERR_HYPERPARAM = 2, /* a hyperparameter is NaN, infinite or out of its range */
    FO_ERR_OVERLAP = 3     /* a buffer that is written overlaps another buffer of the call */
};

enum fo_convention { FO_TEXTBOOK = 0, FO_TORCH = 1 };

/* Human-readable text for a status code (static storage, never NULL). */
const char *fo_strerror(int status);

/* Fields common to every rule: g <- (maximize ? -g : g) + weight_decay * theta (L2),
 * except where a rule decouples the decay. */

typedef struct {
    double lr, momentum, dampening, weight_decay;
    int nesterov, maximize, convention;
    int64_t step; /* FO_TORCH only: on step 1 the buffer is seeded with g (torch's clone) */
} fo_sgd_params;

typedef struct {
    double lr, eps, weight_decay;
    int maximize, convention; /* FO_TORCH: eps outside the square root */
} fo_adagrad_params;

typedef struct {
    double lr, rho, eps, weight_decay;
    int maximize;
} fo_adadelta_params;

typedef struct {
    double lr, rho, eps, weight_decay, momentum;
    int centered, maximize, convention; /* FO_TORCH: eps outside the square root */
} fo_rmsprop_params;

typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    int amsgrad, decoupled_weight_decay, maximize, convention;
    int64_t step; /* 1 on the first update */
} fo_adam_params;

typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    int maximize, convention; /* FO_TORCH: u <- max(beta2 u, |g| + eps), no eps in the division */
    int64_t step;
} fo_adamax_params;

typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    double momentum_decay; /* FO_TORCH only (psi) */
    double mu_product;     /* FO_TORCH only: prod_{i<=step} mu_i, kept by the caller */
    int decoupled_weight_decay, maximize, convention;
    int64_t step;
} fo_nadam_params;

/* momentum_buffer may be NULL when momentum == 0. */
int fo_sgd_f32(float *param, const float *grad, float *momentum_buffer, size_t n, const fo_sgd_params *hp);
int fo_sgd_f64(double *param, const double *grad, double *momentum_buffer, size_t n, const fo_sgd_params *hp);

int fo_adagrad_f32(float *param, const float *grad, float *sum, size_t n, const fo_adagrad_params *hp);
int fo_adagrad_f64(double *param, const double *grad, double *sum, size_t n, const fo_adagrad_params *hp);

int fo_adadelta_f32(float *param, const float *grad, float *square_avg, float *acc_delta, size_t n,
                    const fo_adadelta_params *hp);
int fo_adadelta_f64(double *param, const double *grad, double *square_avg, double *acc_delta, size_t n,
                    const fo_adadelta_params *hp);

/* grad_avg may be NULL unless centered; momentum_buffer may be NULL when momentum == 0. */
int fo_rmsprop_f32(float *param, const float *grad, float *square_avg, float *grad_avg,
                   float *momentum_buffer, size_t n, const fo_rmsprop_params *hp);
int fo_rmsprop_f64(double *param, const double *grad, double *square_avg, double *grad_avg,
                   double *momentum_buffer, size_t n, const fo_rmsprop_params *hp);

/* max_v may be NULL unless amsgrad. */
int fo_adam_f32(float *param, const float *grad, float *m, float *v, float *max_v, size_t n,
                const fo_adam_params *hp);
int fo_adam_f64(double *param, const double *grad, double *m, double *v, double *max_v, size_t n,
                const fo_adam_params *hp);

int fo_adamax_f32(float *param, const float *grad, float *m, float *u, size_t n, const fo_adamax_params *hp);
int fo_adamax_f64(double *param, const double *grad, double *m, double *u, size_t n, const fo_adamax_params *hp);

int fo_nadam_f32(float *param, const float *grad, float *m, float *v, size_t n, const fo_nadam_params *hp);
int fo_nadam_f64(double *param, const double *grad, double *m, double *v, size_t n, const fo_nadam_params *hp);

/*
 * Many tensors in one call, sharing one set of hyperparameters (a parameter group): count
 * tensors, tensor t having n[t] elements at param[t], grad[t], ...  The work is split across
 * threads by elements, not by tensor.  Each tensor's buffers are checked as in the
 * single-tensor call; overlaps between different tensors' buffers are not checked.
 */
int fo_sgd_many_f32(size_t count, float *const *param, const float *const *grad,
                    float *const *momentum_buffer, const size_t *n, const fo_sgd_params *hp);
int fo_sgd_many_f64(size_t count, double *const *param, const double *const *grad,
                    double *const *momentum_buffer, const size_t *n, const fo_sgd_params *hp);
int fo_adagrad_many_f32(size_t count, float *const *param, const float *const *grad,
                        float *const *sum, const size_t *n, const fo_adagrad_params *hp);
int fo_adagrad_many_f64(size_t count, double *const *param, const double *const *grad,
                        double *const *sum, const size_t *n, const fo_adagrad_params *hp);
int fo_adadelta_many_f32(size_t count, float *const *param, const float *const *grad,
                         float *const *square_avg, float *const *acc_delta, const size_t *n,
                         const fo_adadelta_params *hp);
int fo_adadelta_many_f64(size_t count, double *const *param, const double *const *grad,
                         double *const *square_avg, double *const *acc_delta, const size_t *n,
                         const fo_adadelta_params *hp);
int fo_rmsprop_many_f32(size_t count, float *const *param, const float *const *grad,
                        float *const *square_avg, float *const *grad_avg,
                        float *const *momentum_buffer, const size_t *n, const fo_rmsprop_params *hp);
int fo_rmsprop_many_f64(size_t count, double *const *param, const double *const *grad,
                        double *const *square_avg, double *const *grad_avg,
                        double *const *momentum_buffer, const size_t *n, const fo_rmsprop_params *hp);
int fo_adam_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m,
                     float *const *v, float *const *max_v, const size_t *n, const fo_adam_params *hp);
int fo_adam_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m,
                     double *const *v, double *const *max_v, const size_t *n, const fo_adam_params *hp);
int fo_adamax_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m,
                       float *const *u, const size_t *n, const fo_adamax_params *hp);
int fo_adamax_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m,
                       double *const *u, const size_t *n, const fo_adamax_params *hp);
int fo_nadam_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m,
                      float *const *v, const size_t *n, const fo_nadam_params *hp);
int fo_nadam_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m,
                      double *const *v, const size_t *n, const fo_nadam_params *hp);

/* Threads used by a large call (default: FASTOPT_NUM_THREADS, else the CPUs this process may
 * use).  Calls under 131072 elements run on the calling thread.  Results never depend on it. */
int fo_set_num_threads(int n); /* FO_ERR_HYPERPARAM unless 1 <= n <= 256 */
int fo_get_num_threads(void);

/* The instruction set the loops were compiled for and chosen at first use: "baseline", "avx2"
 * or "avx512".  The environment variable FASTOPT_ISA caps it (read once). */
const char *fo_isa(void);

/* p += g; m += g; v += g over n floats: Adam's 7 streams of memory traffic with no arithmetic to
 * speak of, through the same threads.  The benchmark's bandwidth ceiling. */
void fo_stream_f32(float *p, const float *g, float *m, float *v, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* FASTOPT_H */
