# The C API of csrc/fastopt.h for Cython.
#
# Other Cython extensions call the kernels through the functions at the end of this file
# (`from fastopt._kernels cimport adam_f32, fo_adam_params, FO_OK`): they are exported by the
# fastopt._kernels module itself, so a cimporting extension needs fastopt.get_include() on its
# include path and nothing to link.  Each one is nogil and returns a status (FO_OK == 0); the
# `fo_*` names below are the C declarations they forward to (calling those directly would need
# the C sources compiled into your extension).
from libc.stdint cimport int64_t

cdef extern from "fastopt.h" nogil:
    int FO_API_VERSION
    enum fo_status:
        FO_OK
        FO_ERR_NULL
        FO_ERR_HYPERPARAM
        FO_ERR_OVERLAP
    enum fo_convention:
        FO_TEXTBOOK
        FO_TORCH

    const char *fo_strerror(int status)

    ctypedef struct fo_sgd_params:
        double lr, momentum, dampening, weight_decay
        int nesterov, maximize, convention
        int64_t step
    ctypedef struct fo_adagrad_params:
        double lr, eps, weight_decay
        int maximize, convention
    ctypedef struct fo_adadelta_params:
        double lr, rho, eps, weight_decay
        int maximize
    ctypedef struct fo_rmsprop_params:
        double lr, rho, eps, weight_decay, momentum
        int centered, maximize, convention
    ctypedef struct fo_adam_params:
        double lr, beta1, beta2, eps, weight_decay
        int amsgrad, decoupled_weight_decay, maximize, convention
        int64_t step
    ctypedef struct fo_adamax_params:
        double lr, beta1, beta2, eps, weight_decay
        int maximize, convention
        int64_t step
    ctypedef struct fo_nadam_params:
        double lr, beta1, beta2, eps, weight_decay, momentum_decay, mu_product
        int decoupled_weight_decay, maximize, convention
        int64_t step

    int fo_sgd_f32(float *param, const float *grad, float *momentum_buffer, size_t n, const fo_sgd_params *hp)
    int fo_sgd_f64(double *param, const double *grad, double *momentum_buffer, size_t n, const fo_sgd_params *hp)
    int fo_adagrad_f32(float *param, const float *grad, float *sum, size_t n, const fo_adagrad_params *hp)
    int fo_adagrad_f64(double *param, const double *grad, double *sum, size_t n, const fo_adagrad_params *hp)
    int fo_adadelta_f32(float *param, const float *grad, float *square_avg, float *acc_delta, size_t n,
                        const fo_adadelta_params *hp)
    int fo_adadelta_f64(double *param, const double *grad, double *square_avg, double *acc_delta, size_t n,
                        const fo_adadelta_params *hp)
    int fo_rmsprop_f32(float *param, const float *grad, float *square_avg, float *grad_avg,
                       float *momentum_buffer, size_t n, const fo_rmsprop_params *hp)
    int fo_rmsprop_f64(double *param, const double *grad, double *square_avg, double *grad_avg,
                       double *momentum_buffer, size_t n, const fo_rmsprop_params *hp)
    int fo_adam_f32(float *param, const float *grad, float *m, float *v, float *max_v, size_t n,
                    const fo_adam_params *hp)
    int fo_adam_f64(double *param, const double *grad, double *m, double *v, double *max_v, size_t n,
                    const fo_adam_params *hp)
    int fo_adamax_f32(float *param, const float *grad, float *m, float *u, size_t n, const fo_adamax_params *hp)
    int fo_adamax_f64(double *param, const double *grad, double *m, double *u, size_t n, const fo_adamax_params *hp)
    int fo_nadam_f32(float *param, const float *grad, float *m, float *v, size_t n, const fo_nadam_params *hp)
    int fo_nadam_f64(double *param, const double *grad, double *m, double *v, size_t n, const fo_nadam_params *hp)

    int fo_sgd_many_f32(size_t count, float *const *param, const float *const *grad,
                        float *const *momentum_buffer, const size_t *n, const fo_sgd_params *hp)
    int fo_sgd_many_f64(size_t count, double *const *param, const double *const *grad,
                        double *const *momentum_buffer, const size_t *n, const fo_sgd_params *hp)
    int fo_adagrad_many_f32(size_t count, float *const *param, const float *const *grad,
                            float *const *sum, const size_t *n, const fo_adagrad_params *hp)
    int fo_adagrad_many_f64(size_t count, double *const *param, const double *const *grad,
                            double *const *sum, const size_t *n, const fo_adagrad_params *hp)
    int fo_adadelta_many_f32(size_t count, float *const *param, const float *const *grad,
                             float *const *square_avg, float *const *acc_delta, const size_t *n,
                             const fo_adadelta_params *hp)
    int fo_adadelta_many_f64(size_t count, double *const *param, const double *const *grad,
                             double *const *square_avg, double *const *acc_delta, const size_t *n,
                             const fo_adadelta_params *hp)
    int fo_rmsprop_many_f32(size_t count, float *const *param, const float *const *grad,
                            float *const *square_avg, float *const *grad_avg,
                            float *const *momentum_buffer, const size_t *n, const fo_rmsprop_params *hp)
    int fo_rmsprop_many_f64(size_t count, double *const *param, const double *const *grad,
                            double *const *square_avg, double *const *grad_avg,
                            double *const *momentum_buffer, const size_t *n, const fo_rmsprop_params *hp)
    int fo_adam_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m,
                         float *const *v, float *const *max_v, const size_t *n, const fo_adam_params *hp)
    int fo_adam_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m,
                         double *const *v, double *const *max_v, const size_t *n, const fo_adam_params *hp)
    int fo_adamax_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m,
                           float *const *u, const size_t *n, const fo_adamax_params *hp)
    int fo_adamax_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m,
                           double *const *u, const size_t *n, const fo_adamax_params *hp)
    int fo_nadam_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m,
                          float *const *v, const size_t *n, const fo_nadam_params *hp)
    int fo_nadam_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m,
                          double *const *v, const size_t *n, const fo_nadam_params *hp)

    int fo_set_num_threads(int n)
    int fo_get_num_threads()
    const char *fo_isa()
    void fo_stream_f32(float *p, const float *g, float *m, float *v, size_t n)


# ---- the cimport API: fo_<name> without the prefix, exported by fastopt._kernels ----
cdef int sgd_f32(float *param, const float *grad, float *momentum_buffer, size_t n, const fo_sgd_params *hp) noexcept nogil
cdef int sgd_f64(double *param, const double *grad, double *momentum_buffer, size_t n, const fo_sgd_params *hp) noexcept nogil
cdef int adagrad_f32(float *param, const float *grad, float *sum, size_t n, const fo_adagrad_params *hp) noexcept nogil
cdef int adagrad_f64(double *param, const double *grad, double *sum, size_t n, const fo_adagrad_params *hp) noexcept nogil
cdef int adadelta_f32(float *param, const float *grad, float *square_avg, float *acc_delta, size_t n, const fo_adadelta_params *hp) noexcept nogil
cdef int adadelta_f64(double *param, const double *grad, double *square_avg, double *acc_delta, size_t n, const fo_adadelta_params *hp) noexcept nogil
cdef int rmsprop_f32(float *param, const float *grad, float *square_avg, float *grad_avg, float *momentum_buffer, size_t n, const fo_rmsprop_params *hp) noexcept nogil
cdef int rmsprop_f64(double *param, const double *grad, double *square_avg, double *grad_avg, double *momentum_buffer, size_t n, const fo_rmsprop_params *hp) noexcept nogil
cdef int adam_f32(float *param, const float *grad, float *m, float *v, float *max_v, size_t n, const fo_adam_params *hp) noexcept nogil
cdef int adam_f64(double *param, const double *grad, double *m, double *v, double *max_v, size_t n, const fo_adam_params *hp) noexcept nogil
cdef int adamax_f32(float *param, const float *grad, float *m, float *u, size_t n, const fo_adamax_params *hp) noexcept nogil
cdef int adamax_f64(double *param, const double *grad, double *m, double *u, size_t n, const fo_adamax_params *hp) noexcept nogil
cdef int nadam_f32(float *param, const float *grad, float *m, float *v, size_t n, const fo_nadam_params *hp) noexcept nogil
cdef int nadam_f64(double *param, const double *grad, double *m, double *v, size_t n, const fo_nadam_params *hp) noexcept nogil
cdef int sgd_many_f32(size_t count, float *const *param, const float *const *grad, float *const *momentum_buffer, const size_t *n, const fo_sgd_params *hp) noexcept nogil
cdef int sgd_many_f64(size_t count, double *const *param, const double *const *grad, double *const *momentum_buffer, const size_t *n, const fo_sgd_params *hp) noexcept nogil
cdef int adagrad_many_f32(size_t count, float *const *param, const float *const *grad, float *const *sum, const size_t *n, const fo_adagrad_params *hp) noexcept nogil
cdef int adagrad_many_f64(size_t count, double *const *param, const double *const *grad, double *const *sum, const size_t *n, const fo_adagrad_params *hp) noexcept nogil
cdef int adadelta_many_f32(size_t count, float *const *param, const float *const *grad, float *const *square_avg, float *const *acc_delta, const size_t *n, const fo_adadelta_params *hp) noexcept nogil
cdef int adadelta_many_f64(size_t count, double *const *param, const double *const *grad, double *const *square_avg, double *const *acc_delta, const size_t *n, const fo_adadelta_params *hp) noexcept nogil
cdef int rmsprop_many_f32(size_t count, float *const *param, const float *const *grad, float *const *square_avg, float *const *grad_avg, float *const *momentum_buffer, const size_t *n, const fo_rmsprop_params *hp) noexcept nogil
cdef int rmsprop_many_f64(size_t count, double *const *param, const double *const *grad, double *const *square_avg, double *const *grad_avg, double *const *momentum_buffer, const size_t *n, const fo_rmsprop_params *hp) noexcept nogil
cdef int adam_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m, float *const *v, float *const *max_v, const size_t *n, const fo_adam_params *hp) noexcept nogil
cdef int adam_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m, double *const *v, double *const *max_v, const size_t *n, const fo_adam_params *hp) noexcept nogil
cdef int adamax_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m, float *const *u, const size_t *n, const fo_adamax_params *hp) noexcept nogil
cdef int adamax_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m, double *const *u, const size_t *n, const fo_adamax_params *hp) noexcept nogil
cdef int nadam_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m, float *const *v, const size_t *n, const fo_nadam_params *hp) noexcept nogil
cdef int nadam_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m, double *const *v, const size_t *n, const fo_nadam_params *hp) noexcept nogil
