# The C API of csrc/fastopt.h for Cython.
#
# Other Cython extensions call the kernels through the functions at the end of this file
# (`from fastopt._kernels cimport adam_f32, fo_adam_params, FO_OK`): `step` is exported by the
# fastopt._kernels module itself and the typed functions are inline wrappers around it, so a
# cimporting extension needs fastopt.get_include() on its include path and nothing to link.
# Each one is nogil and returns a status (FO_OK == 0).  The `fo_*` names are the C
# declarations (calling those directly would need the C sources compiled into your extension).
from libc.stdint cimport int64_t, uint64_t

cdef extern from "fastopt.h" nogil:
    int FO_API_VERSION
    int FO_MAX_BUFFERS
    enum fo_status:
        FO_OK
        FO_ERR_NULL
        FO_ERR_HYPERPARAM
        FO_ERR_OVERLAP
        FO_ERR_RULE
        FO_ERR_DTYPE
        FO_ERR_INDEX
        FO_ERR_MEMORY
    enum fo_convention:
        FO_TEXTBOOK
        FO_TORCH
    enum fo_dtype:
        FO_FLOAT32
        FO_FLOAT64
        FO_BFLOAT16
    enum fo_rounding:
        FO_ROUND_STOCHASTIC
        FO_ROUND_NEAREST
    enum fo_field_type:
        FO_FIELD_DOUBLE
        FO_FIELD_INT
        FO_FIELD_INT64
    enum fo_rule:
        FO_RULE_sgd
        FO_RULE_adagrad
        FO_RULE_adadelta
        FO_RULE_rmsprop
        FO_RULE_adam
        FO_RULE_adamax
        FO_RULE_nadam
        FO_RULE_lion
        FO_RULE_radam
        FO_RULE_rprop
        FO_RULE_asgd
        FO_RULE_lamb
        FO_RULE_lars
        FO_RULE_rowwise_adagrad
        FO_RULE_adafactor
        FO_N_RULES

    const char *fo_strerror(int status)

    ctypedef struct fo_error:
        const char *field
        const char *requirement
    enum fo_index_type:
        FO_INT32
        FO_INT64
    ctypedef struct fo_rows:
        const void *indices
        int index_type
        size_t nnz
        size_t row_len
        int64_t *last_step
        int64_t step
        size_t matrix_rows
    ctypedef struct fo_batch:
        size_t count
        const size_t *n
        void **buffers[8]
        int dtype[8]
        const fo_rows *rows
        float **master
        int rounding
        uint64_t seed, step
        const uint64_t *index
    ctypedef struct fo_field:
        const char *name
        int type
        size_t offset
    ctypedef struct fo_rule_info:
        const char *name
        int n_state
        const char *const *state
        size_t params_size
        int n_fields
        const fo_field *fields
        int per_row
        int factored

    int fo_step(int rule, const fo_batch *batch, const void *hp, fo_error *err)
    ctypedef struct fo_step_options:
        double grad_multiplier
        void **ema
        double ema_decay
        int ema_bfloat16
    int fo_step_with(int rule, const fo_batch *batch, const void *hp, const fo_step_options *opt,
                     fo_error *err)
    int FO_NORM_BLOCK
    int FO_ROW_STAGING
    int fo_norm(const fo_batch *batch, int buffer, double p, double *per_tensor, double *total,
                int *nonfinite, fo_error *err)
    int fo_scale(const fo_batch *batch, int buffer, double factor)
    int fo_check(int rule, const void *hp, unsigned *uses, fo_error *err)
    int fo_check_exact(int rule, const void *hp, fo_error *err)
    const fo_rule_info *fo_describe(int rule)

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
    ctypedef struct fo_lion_params:
        double lr, beta1, beta2, weight_decay
        int maximize
    ctypedef struct fo_radam_params:
        double lr, beta1, beta2, eps, weight_decay
        int decoupled_weight_decay, maximize
        int64_t step
    ctypedef struct fo_rprop_params:
        double lr, eta_minus, eta_plus, step_size_min, step_size_max
        int maximize
    ctypedef struct fo_asgd_params:
        double lr, lambd, alpha, t0, weight_decay, eta, mu
        int maximize, convention
        int64_t step
    ctypedef struct fo_lamb_params:
        double lr, beta1, beta2, eps, weight_decay
        int maximize
        int64_t step
    ctypedef struct fo_lars_params:
        double lr, momentum, weight_decay, trust_coefficient
        int maximize
    ctypedef struct fo_rowwise_adagrad_params:
        double lr, eps, weight_decay
        int maximize
    ctypedef struct fo_adafactor_params:
        double lr, beta2_decay, eps1, eps2, d, weight_decay
        int maximize
        int64_t step


    int fo_set_num_threads(int n)
    int fo_get_num_threads()
    ctypedef void (*fo_blas_job_fn)(int i, void *jobdata, int arg)
    void fo_blas_threads(int sync, fo_blas_job_fn dojob, int numjobs, size_t jobdata_stride,
                         void *jobdata, int dojob_arg)
    const char *fo_isa()
    const char *fo_bf16_path()
    const char *fo_random_path()
    void fo_stream_f32(float *p, const float *g, float *m, float *v, size_t n)


# ---- the cimport API, exported by fastopt._kernels ----
# step(rule, batch, hp, err): fo_step; the typed functions below wrap it like fastopt.h's.
cdef int step(int rule, const fo_batch *batch, const void *hp, fo_error *err) noexcept nogil

cdef inline void plain_batch(fo_batch *b, size_t count, const size_t *n, void ***bufs, int n_bufs,
                             int dtype, const fo_rows *rows) noexcept nogil:
    """A batch whose buffers share one storage type, without bfloat16 options: buffer k is
    bufs[k] for k < n_bufs (NULL: unused), rows NULL for dense gradients."""
    cdef int k
    b.master = NULL
    b.rounding = FO_ROUND_STOCHASTIC
    b.seed = 0
    b.step = 0
    b.index = NULL
    b.count = count
    b.n = n
    b.rows = rows
    for k in range(8):
        b.buffers[k] = bufs[k] if k < n_bufs else NULL
        b.dtype[k] = dtype

cdef inline int _typed_rows(int rule, int dtype, size_t count, void ***bufs, int n_bufs,
                            const size_t *n, const fo_rows *rows, const void *hp) noexcept nogil:
    cdef fo_batch b
    plain_batch(&b, count, n, bufs, n_bufs, dtype, rows)
    return step(rule, &b, hp, NULL)

cdef inline int _typed(int rule, int dtype, size_t count, void ***bufs, int n_bufs,
                       const size_t *n, const void *hp) noexcept nogil:
    return _typed_rows(rule, dtype, count, bufs, n_bufs, n, NULL, hp)

cdef inline int sgd_f32(float *param, const float *grad, float *momentum_buffer, size_t n, const fo_sgd_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&momentum_buffer]
    return _typed(FO_RULE_sgd, FO_FLOAT32, 1, b, 3, &n, hp)

cdef inline int sgd_many_f32(size_t count, float **param, const float **grad, float **momentum_buffer, const size_t *n, const fo_sgd_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>momentum_buffer]
    return _typed(FO_RULE_sgd, FO_FLOAT32, count, b, 3, n, hp)

cdef inline int sgd_f64(double *param, const double *grad, double *momentum_buffer, size_t n, const fo_sgd_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&momentum_buffer]
    return _typed(FO_RULE_sgd, FO_FLOAT64, 1, b, 3, &n, hp)

cdef inline int sgd_many_f64(size_t count, double **param, const double **grad, double **momentum_buffer, const size_t *n, const fo_sgd_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>momentum_buffer]
    return _typed(FO_RULE_sgd, FO_FLOAT64, count, b, 3, n, hp)

cdef inline int adagrad_f32(float *param, const float *grad, float *sum, size_t n, const fo_adagrad_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&sum]
    return _typed(FO_RULE_adagrad, FO_FLOAT32, 1, b, 3, &n, hp)

cdef inline int adagrad_many_f32(size_t count, float **param, const float **grad, float **sum, const size_t *n, const fo_adagrad_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>sum]
    return _typed(FO_RULE_adagrad, FO_FLOAT32, count, b, 3, n, hp)

cdef inline int adagrad_f64(double *param, const double *grad, double *sum, size_t n, const fo_adagrad_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&sum]
    return _typed(FO_RULE_adagrad, FO_FLOAT64, 1, b, 3, &n, hp)

cdef inline int adagrad_many_f64(size_t count, double **param, const double **grad, double **sum, const size_t *n, const fo_adagrad_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>sum]
    return _typed(FO_RULE_adagrad, FO_FLOAT64, count, b, 3, n, hp)

cdef inline int adadelta_f32(float *param, const float *grad, float *square_avg, float *acc_delta, size_t n, const fo_adadelta_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&square_avg, <void **>&acc_delta]
    return _typed(FO_RULE_adadelta, FO_FLOAT32, 1, b, 4, &n, hp)

cdef inline int adadelta_many_f32(size_t count, float **param, const float **grad, float **square_avg, float **acc_delta, const size_t *n, const fo_adadelta_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>square_avg, <void **>acc_delta]
    return _typed(FO_RULE_adadelta, FO_FLOAT32, count, b, 4, n, hp)

cdef inline int adadelta_f64(double *param, const double *grad, double *square_avg, double *acc_delta, size_t n, const fo_adadelta_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&square_avg, <void **>&acc_delta]
    return _typed(FO_RULE_adadelta, FO_FLOAT64, 1, b, 4, &n, hp)

cdef inline int adadelta_many_f64(size_t count, double **param, const double **grad, double **square_avg, double **acc_delta, const size_t *n, const fo_adadelta_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>square_avg, <void **>acc_delta]
    return _typed(FO_RULE_adadelta, FO_FLOAT64, count, b, 4, n, hp)

cdef inline int rmsprop_f32(float *param, const float *grad, float *square_avg, float *grad_avg, float *momentum_buffer, size_t n, const fo_rmsprop_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>&param, <void **>&grad, <void **>&square_avg, <void **>&grad_avg, <void **>&momentum_buffer]
    return _typed(FO_RULE_rmsprop, FO_FLOAT32, 1, b, 5, &n, hp)

cdef inline int rmsprop_many_f32(size_t count, float **param, const float **grad, float **square_avg, float **grad_avg, float **momentum_buffer, const size_t *n, const fo_rmsprop_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>param, <void **>grad, <void **>square_avg, <void **>grad_avg, <void **>momentum_buffer]
    return _typed(FO_RULE_rmsprop, FO_FLOAT32, count, b, 5, n, hp)

cdef inline int rmsprop_f64(double *param, const double *grad, double *square_avg, double *grad_avg, double *momentum_buffer, size_t n, const fo_rmsprop_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>&param, <void **>&grad, <void **>&square_avg, <void **>&grad_avg, <void **>&momentum_buffer]
    return _typed(FO_RULE_rmsprop, FO_FLOAT64, 1, b, 5, &n, hp)

cdef inline int rmsprop_many_f64(size_t count, double **param, const double **grad, double **square_avg, double **grad_avg, double **momentum_buffer, const size_t *n, const fo_rmsprop_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>param, <void **>grad, <void **>square_avg, <void **>grad_avg, <void **>momentum_buffer]
    return _typed(FO_RULE_rmsprop, FO_FLOAT64, count, b, 5, n, hp)

cdef inline int adam_f32(float *param, const float *grad, float *m, float *v, float *max_v, size_t n, const fo_adam_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&v, <void **>&max_v]
    return _typed(FO_RULE_adam, FO_FLOAT32, 1, b, 5, &n, hp)

cdef inline int adam_many_f32(size_t count, float **param, const float **grad, float **m, float **v, float **max_v, const size_t *n, const fo_adam_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>v, <void **>max_v]
    return _typed(FO_RULE_adam, FO_FLOAT32, count, b, 5, n, hp)

cdef inline int adam_f64(double *param, const double *grad, double *m, double *v, double *max_v, size_t n, const fo_adam_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&v, <void **>&max_v]
    return _typed(FO_RULE_adam, FO_FLOAT64, 1, b, 5, &n, hp)

cdef inline int adam_many_f64(size_t count, double **param, const double **grad, double **m, double **v, double **max_v, const size_t *n, const fo_adam_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>v, <void **>max_v]
    return _typed(FO_RULE_adam, FO_FLOAT64, count, b, 5, n, hp)

cdef inline int adamax_f32(float *param, const float *grad, float *m, float *u, size_t n, const fo_adamax_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&u]
    return _typed(FO_RULE_adamax, FO_FLOAT32, 1, b, 4, &n, hp)

cdef inline int adamax_many_f32(size_t count, float **param, const float **grad, float **m, float **u, const size_t *n, const fo_adamax_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>u]
    return _typed(FO_RULE_adamax, FO_FLOAT32, count, b, 4, n, hp)

cdef inline int adamax_f64(double *param, const double *grad, double *m, double *u, size_t n, const fo_adamax_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&u]
    return _typed(FO_RULE_adamax, FO_FLOAT64, 1, b, 4, &n, hp)

cdef inline int adamax_many_f64(size_t count, double **param, const double **grad, double **m, double **u, const size_t *n, const fo_adamax_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>u]
    return _typed(FO_RULE_adamax, FO_FLOAT64, count, b, 4, n, hp)

cdef inline int nadam_f32(float *param, const float *grad, float *m, float *v, size_t n, const fo_nadam_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&v]
    return _typed(FO_RULE_nadam, FO_FLOAT32, 1, b, 4, &n, hp)

cdef inline int nadam_many_f32(size_t count, float **param, const float **grad, float **m, float **v, const size_t *n, const fo_nadam_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>v]
    return _typed(FO_RULE_nadam, FO_FLOAT32, count, b, 4, n, hp)

cdef inline int nadam_f64(double *param, const double *grad, double *m, double *v, size_t n, const fo_nadam_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&v]
    return _typed(FO_RULE_nadam, FO_FLOAT64, 1, b, 4, &n, hp)

cdef inline int nadam_many_f64(size_t count, double **param, const double **grad, double **m, double **v, const size_t *n, const fo_nadam_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>v]
    return _typed(FO_RULE_nadam, FO_FLOAT64, count, b, 4, n, hp)

cdef inline int lion_f32(float *param, const float *grad, float *m, size_t n, const fo_lion_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m]
    return _typed(FO_RULE_lion, FO_FLOAT32, 1, b, 3, &n, hp)

cdef inline int lion_many_f32(size_t count, float **param, const float **grad, float **m, const size_t *n, const fo_lion_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>m]
    return _typed(FO_RULE_lion, FO_FLOAT32, count, b, 3, n, hp)

cdef inline int lion_f64(double *param, const double *grad, double *m, size_t n, const fo_lion_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m]
    return _typed(FO_RULE_lion, FO_FLOAT64, 1, b, 3, &n, hp)

cdef inline int lion_many_f64(size_t count, double **param, const double **grad, double **m, const size_t *n, const fo_lion_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>m]
    return _typed(FO_RULE_lion, FO_FLOAT64, count, b, 3, n, hp)

cdef inline int radam_f32(float *param, const float *grad, float *m, float *v, size_t n, const fo_radam_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&v]
    return _typed(FO_RULE_radam, FO_FLOAT32, 1, b, 4, &n, hp)

cdef inline int radam_many_f32(size_t count, float **param, const float **grad, float **m, float **v, const size_t *n, const fo_radam_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>v]
    return _typed(FO_RULE_radam, FO_FLOAT32, count, b, 4, n, hp)

cdef inline int radam_f64(double *param, const double *grad, double *m, double *v, size_t n, const fo_radam_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&v]
    return _typed(FO_RULE_radam, FO_FLOAT64, 1, b, 4, &n, hp)

cdef inline int radam_many_f64(size_t count, double **param, const double **grad, double **m, double **v, const size_t *n, const fo_radam_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>v]
    return _typed(FO_RULE_radam, FO_FLOAT64, count, b, 4, n, hp)

cdef inline int rprop_f32(float *param, const float *grad, float *prev, float *step_size, size_t n, const fo_rprop_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&prev, <void **>&step_size]
    return _typed(FO_RULE_rprop, FO_FLOAT32, 1, b, 4, &n, hp)

cdef inline int rprop_many_f32(size_t count, float **param, const float **grad, float **prev, float **step_size, const size_t *n, const fo_rprop_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>prev, <void **>step_size]
    return _typed(FO_RULE_rprop, FO_FLOAT32, count, b, 4, n, hp)

cdef inline int rprop_f64(double *param, const double *grad, double *prev, double *step_size, size_t n, const fo_rprop_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&prev, <void **>&step_size]
    return _typed(FO_RULE_rprop, FO_FLOAT64, 1, b, 4, &n, hp)

cdef inline int rprop_many_f64(size_t count, double **param, const double **grad, double **prev, double **step_size, const size_t *n, const fo_rprop_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>prev, <void **>step_size]
    return _typed(FO_RULE_rprop, FO_FLOAT64, count, b, 4, n, hp)

cdef inline int asgd_f32(float *param, const float *grad, float *ax, size_t n, const fo_asgd_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&ax]
    return _typed(FO_RULE_asgd, FO_FLOAT32, 1, b, 3, &n, hp)

cdef inline int asgd_many_f32(size_t count, float **param, const float **grad, float **ax, const size_t *n, const fo_asgd_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>ax]
    return _typed(FO_RULE_asgd, FO_FLOAT32, count, b, 3, n, hp)

cdef inline int asgd_f64(double *param, const double *grad, double *ax, size_t n, const fo_asgd_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&ax]
    return _typed(FO_RULE_asgd, FO_FLOAT64, 1, b, 3, &n, hp)

cdef inline int asgd_many_f64(size_t count, double **param, const double **grad, double **ax, const size_t *n, const fo_asgd_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>ax]
    return _typed(FO_RULE_asgd, FO_FLOAT64, count, b, 3, n, hp)

cdef inline int lamb_f32(float *param, const float *grad, float *m, float *v, size_t n, const fo_lamb_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&v]
    return _typed(FO_RULE_lamb, FO_FLOAT32, 1, b, 4, &n, hp)

cdef inline int lamb_many_f32(size_t count, float **param, const float **grad, float **m, float **v, const size_t *n, const fo_lamb_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>v]
    return _typed(FO_RULE_lamb, FO_FLOAT32, count, b, 4, n, hp)

cdef inline int lamb_f64(double *param, const double *grad, double *m, double *v, size_t n, const fo_lamb_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>&param, <void **>&grad, <void **>&m, <void **>&v]
    return _typed(FO_RULE_lamb, FO_FLOAT64, 1, b, 4, &n, hp)

cdef inline int lamb_many_f64(size_t count, double **param, const double **grad, double **m, double **v, const size_t *n, const fo_lamb_params *hp) noexcept nogil:
    cdef void **b[4]
    b[:] = [<void **>param, <void **>grad, <void **>m, <void **>v]
    return _typed(FO_RULE_lamb, FO_FLOAT64, count, b, 4, n, hp)

cdef inline int lars_f32(float *param, const float *grad, float *momentum_buffer, size_t n, const fo_lars_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&momentum_buffer]
    return _typed(FO_RULE_lars, FO_FLOAT32, 1, b, 3, &n, hp)

cdef inline int lars_many_f32(size_t count, float **param, const float **grad, float **momentum_buffer, const size_t *n, const fo_lars_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>momentum_buffer]
    return _typed(FO_RULE_lars, FO_FLOAT32, count, b, 3, n, hp)

cdef inline int lars_f64(double *param, const double *grad, double *momentum_buffer, size_t n, const fo_lars_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&momentum_buffer]
    return _typed(FO_RULE_lars, FO_FLOAT64, 1, b, 3, &n, hp)

cdef inline int lars_many_f64(size_t count, double **param, const double **grad, double **momentum_buffer, const size_t *n, const fo_lars_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>momentum_buffer]
    return _typed(FO_RULE_lars, FO_FLOAT64, count, b, 3, n, hp)

cdef inline int rowwise_adagrad_f32(float *param, const float *grad, float *sum, size_t n, const fo_rowwise_adagrad_params *hp) noexcept nogil:
    # rows of one element (fastopt.h, row rules); rows of more: _typed_rows with fo_rows
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&sum]
    return _typed(FO_RULE_rowwise_adagrad, FO_FLOAT32, 1, b, 3, &n, hp)

cdef inline int rowwise_adagrad_many_f32(size_t count, float **param, const float **grad, float **sum, const size_t *n, const fo_rowwise_adagrad_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>sum]
    return _typed(FO_RULE_rowwise_adagrad, FO_FLOAT32, count, b, 3, n, hp)

cdef inline int rowwise_adagrad_f64(double *param, const double *grad, double *sum, size_t n, const fo_rowwise_adagrad_params *hp) noexcept nogil:
    # rows of one element (fastopt.h, row rules); rows of more: _typed_rows with fo_rows
    cdef void **b[3]
    b[:] = [<void **>&param, <void **>&grad, <void **>&sum]
    return _typed(FO_RULE_rowwise_adagrad, FO_FLOAT64, 1, b, 3, &n, hp)

cdef inline int rowwise_adagrad_many_f64(size_t count, double **param, const double **grad, double **sum, const size_t *n, const fo_rowwise_adagrad_params *hp) noexcept nogil:
    cdef void **b[3]
    b[:] = [<void **>param, <void **>grad, <void **>sum]
    return _typed(FO_RULE_rowwise_adagrad, FO_FLOAT64, count, b, 3, n, hp)

cdef inline int adafactor_f32(float *param, const float *grad, float *row_var, float *col_var, float *variance, size_t n, const fo_adafactor_params *hp) noexcept nogil:
    # a vector (fastopt.h, factored rules); matrices: _typed_rows with fo_rows.matrix_rows
    cdef void **b[5]
    b[:] = [<void **>&param, <void **>&grad, <void **>&row_var, <void **>&col_var, <void **>&variance]
    return _typed(FO_RULE_adafactor, FO_FLOAT32, 1, b, 5, &n, hp)

cdef inline int adafactor_many_f32(size_t count, float **param, const float **grad, float **row_var, float **col_var, float **variance, const size_t *n, const fo_adafactor_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>param, <void **>grad, <void **>row_var, <void **>col_var, <void **>variance]
    return _typed(FO_RULE_adafactor, FO_FLOAT32, count, b, 5, n, hp)

cdef inline int adafactor_f64(double *param, const double *grad, double *row_var, double *col_var, double *variance, size_t n, const fo_adafactor_params *hp) noexcept nogil:
    # a vector (fastopt.h, factored rules); matrices: _typed_rows with fo_rows.matrix_rows
    cdef void **b[5]
    b[:] = [<void **>&param, <void **>&grad, <void **>&row_var, <void **>&col_var, <void **>&variance]
    return _typed(FO_RULE_adafactor, FO_FLOAT64, 1, b, 5, &n, hp)

cdef inline int adafactor_many_f64(size_t count, double **param, const double **grad, double **row_var, double **col_var, double **variance, const size_t *n, const fo_adafactor_params *hp) noexcept nogil:
    cdef void **b[5]
    b[:] = [<void **>param, <void **>grad, <void **>row_var, <void **>col_var, <void **>variance]
    return _typed(FO_RULE_adafactor, FO_FLOAT64, count, b, 5, n, hp)
