/*
 * fastopt.h -- public C API of fastopt's in-place optimizer kernels.
 *
 * Every call updates contiguous buffers in place, in one pass over memory, without
 * allocating.  The math of each rule lives once, in csrc/rules/<rule>.inc, beside the
 * computation of its per-step scalars (done once per call, in double); it is instantiated for
 * float and double and for every instruction set.
 *
 * Two ways in, one engine:
 *   - fo_step(rule, batch, hyperparameters, error): the generic entry.  A batch is any number
 *     of tensors sharing one set of hyperparameters, each with the rule's buffers.
 *   - the typed entries fo_<rule>_f32 / _f64 (one tensor) and fo_<rule>_many_f32 / _f64 (many),
 *     generated from the rule list below; they fill a batch and call fo_step.
 *
 * Conventions.  `convention` selects between the textbook formulas (Ruder's overview, the
 * default, FO_TEXTBOOK) and PyTorch's (FO_TORCH): momentum with dampening and lr outside the
 * buffer, eps outside the square root for Adagrad/RMSprop, eps inside the max for AdaMax,
 * AMSGrad's max over the uncorrected v, NAdam's momentum-decay schedule.  The exact equations
 * are at the top of each csrc/rules/<rule>.inc and in the README.
 *
 * Errors.  A call validates its arguments before it writes anything and returns a status:
 * FO_OK, or FO_ERR_* with every buffer untouched.  It never crashes on NULL pointers with n > 0,
 * invalid hyperparameters or overlapping buffers; it does not check that buffers hold n
 * elements.  fo_step and fo_check also say which hyperparameter is wrong (fo_error).
 */
#ifndef FASTOPT_H
#define FASTOPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FO_API_VERSION 8 /* 6: fo_blas_threads; 7: fo_step_options.ema_bfloat16, fo_norm of bfloat16;
                            8: fo_random_path, FO_ROW_STAGING, row rules with bfloat16 parameters,
                               gradients and master weights */

/* ---- the rules -----------------------------------------------------------------------------
 * X(rule, state buffers...): each rule's name and its state buffers, in the order of its
 * typed entry points.  This list generates the rule ids (FO_RULE_<rule>), the typed entry
 * points and the kernel tables; each rule's hyperparameter fields are FO_FIELDS_<rule> below.
 */
#define FO_RULES(X)                                                                            \
    X(sgd, momentum_buffer)                                                                    \
    X(adagrad, sum)                                                                            \
    X(adadelta, square_avg, acc_delta)                                                         \
    X(rmsprop, square_avg, grad_avg, momentum_buffer)                                          \
    X(adam, m, v, max_v)                                                                       \
    X(adamax, m, u)                                                                            \
    X(nadam, m, v)                                                                             \
    X(lion, m)                                                                                 \
    X(radam, m, v)                                                                             \
    X(rprop, prev, step_size)                                                                  \
    X(asgd, ax)                                                                                \
    X(lamb, m, v)                                                                              \
    X(lars, momentum_buffer)                                                                   \
    X(rowwise_adagrad, sum)                                                                    \
    X(adafactor, row_var, col_var, variance)

/* Every rule starts from g = (maximize ? -grad : grad) + weight_decay * theta (L2), except
 * where a rule decouples the decay.  F(c, type, name) per field of fo_<rule>_params (c: context
 * that F passes on, for the generators). */
#define FO_FIELDS_sgd(F, c)                                                                       \
    F(c, double, lr) F(c, double, momentum) F(c, double, dampening) F(c, double, weight_decay)             \
    F(c, int, nesterov) F(c, int, maximize) F(c, int, convention)                                       \
    F(c, int64_t, step) /* FO_TORCH only: on step 1 the buffer is seeded with g (torch's clone) */
#define FO_FIELDS_adagrad(F, c)                                                                   \
    F(c, double, lr) F(c, double, eps) F(c, double, weight_decay)                                       \
    F(c, int, maximize) F(c, int, convention) /* FO_TORCH: eps outside the square root */
#define FO_FIELDS_adadelta(F, c)                                                                  \
    F(c, double, lr) F(c, double, rho) F(c, double, eps) F(c, double, weight_decay) F(c, int, maximize)
#define FO_FIELDS_rmsprop(F, c)                                                                   \
    F(c, double, lr) F(c, double, rho) F(c, double, eps) F(c, double, weight_decay) F(c, double, momentum)    \
    F(c, int, centered) F(c, int, maximize) F(c, int, convention) /* FO_TORCH: eps outside the root */
#define FO_FIELDS_adam(F, c)                                                                      \
    F(c, double, lr) F(c, double, beta1) F(c, double, beta2) F(c, double, eps) F(c, double, weight_decay)     \
    F(c, int, amsgrad) F(c, int, decoupled_weight_decay) F(c, int, maximize) F(c, int, convention)         \
    F(c, int64_t, step) /* 1 on the first update */
#define FO_FIELDS_adamax(F, c)                                                                    \
    F(c, double, lr) F(c, double, beta1) F(c, double, beta2) F(c, double, eps) F(c, double, weight_decay)     \
    F(c, int, maximize) F(c, int, convention) /* FO_TORCH: u <- max(beta2 u, |g| + eps) */          \
    F(c, int64_t, step)
#define FO_FIELDS_nadam(F, c)                                                                     \
    F(c, double, lr) F(c, double, beta1) F(c, double, beta2) F(c, double, eps) F(c, double, weight_decay)     \
    F(c, double, momentum_decay) /* FO_TORCH only (psi) */                                        \
    F(c, double, mu_product)     /* FO_TORCH only: prod_{i<=step} mu_i, kept by the caller */     \
    F(c, int, decoupled_weight_decay) F(c, int, maximize) F(c, int, convention) F(c, int64_t, step)
#define FO_FIELDS_lion(F, c) /* decay decoupled; no step: Lion has no bias correction */          \
    F(c, double, lr) F(c, double, beta1) F(c, double, beta2) F(c, double, weight_decay) F(c, int, maximize)
#define FO_FIELDS_radam(F, c)                                                                     \
    F(c, double, lr) F(c, double, beta1) F(c, double, beta2) F(c, double, eps) F(c, double, weight_decay)     \
    F(c, int, decoupled_weight_decay) F(c, int, maximize) F(c, int64_t, step)
#define FO_FIELDS_rprop(F, c) /* no L2 term (torch's Rprop has none) */                          \
    F(c, double, lr) /* the initial step_size: checked, the caller fills the buffer with it */    \
    F(c, double, eta_minus) F(c, double, eta_plus) F(c, double, step_size_min)                     \
    F(c, double, step_size_max) F(c, int, maximize)
#define FO_FIELDS_asgd(F, c)                                                                      \
    F(c, double, lr) F(c, double, lambd) F(c, double, alpha) F(c, double, t0) F(c, double, weight_decay) \
    F(c, double, eta) F(c, double, mu) /* FO_TORCH only: the step's eta and mu, kept by the caller */ \
    F(c, int, maximize) F(c, int, convention) F(c, int64_t, step)
/* LAMB and LARS: per-tensor trust ratios from a pass over the tensor before the update (two
 * passes over memory; norms in double, in a fixed order: the same bits for any thread count) */
#define FO_FIELDS_lamb(F, c) /* the decay is inside the direction r */                           \
    F(c, double, lr) F(c, double, beta1) F(c, double, beta2) F(c, double, eps) F(c, double, weight_decay)     \
    F(c, int, maximize) F(c, int64_t, step)
#define FO_FIELDS_lars(F, c)                                                                      \
    F(c, double, lr) F(c, double, momentum) F(c, double, weight_decay)                             \
    F(c, double, trust_coefficient) F(c, int, maximize)
/* Row rules (fo_rule_info.per_row): each state buffer holds one value per row.  Tensor t is
 * n[t] / row_len rows of row_len elements, row_len = batch->rows[t].row_len when batch->rows is
 * set (indices NULL for a dense gradient), else 1 (a flat buffer is rows of one element, as the
 * typed entries take it); its state buffers hold n[t] / row_len values.  row_len must divide
 * n[t] (FO_ERR_INDEX).  The state buffers are stored in the compute type (bfloat16:
 * FO_ERR_DTYPE); bfloat16 parameters (float32 compute: float64 parameters with a bfloat16 EMA
 * get FO_ERR_DTYPE), bfloat16 gradients of float32 parameters and master weights are staged a
 * group of whole rows at a time, rows of at most FO_ROW_STAGING elements (longer rows:
 * FO_ERR_HYPERPARAM, err->field "rows"). */
#define FO_ROW_STAGING 4096
#define FO_FIELDS_rowwise_adagrad(F, c)                                                           \
    F(c, double, lr) F(c, double, eps) F(c, double, weight_decay) F(c, int, maximize)
/* Factored rules (fo_rule_info.factored): a tensor is a vector, or matrices of matrix_rows x
 * row_len elements (batch->rows[t], indices NULL; without batch->rows every tensor is a
 * vector).  Adafactor: row_var holds one value per matrix row, col_var one per matrix column
 * (both NULL for a vector), variance one per element of a vector (NULL for matrices).  Its
 * per-tensor norms and row and column sums take passes before the update (in double, in an
 * order fixed by the shapes: the same bits for any thread count); gradients given by rows and
 * bfloat16 storage: FO_ERR_RULE, FO_ERR_DTYPE. */
#define FO_FIELDS_adafactor(F, c) /* torch.optim.Adafactor's; the decay is decoupled */         \
    F(c, double, lr) F(c, double, beta2_decay) F(c, double, eps1) F(c, double, eps2)              \
    F(c, double, d) F(c, double, weight_decay) F(c, int, maximize) F(c, int64_t, step)

/* ---- status, conventions, storage types ---------------------------------------------------- */

enum fo_status {
    FO_OK = 0,
    FO_ERR_NULL = 1,       /* a required buffer is NULL while n > 0 */
    FO_ERR_HYPERPARAM = 2, /* a hyperparameter is NaN, infinite or out of its range */
    FO_ERR_OVERLAP = 3,    /* a buffer that is written overlaps another buffer of the call */
    FO_ERR_RULE = 4,       /* no such rule */
    FO_ERR_DTYPE = 5,      /* a storage type (or combination) the kernels do not have */
    FO_ERR_INDEX = 6,      /* a row index out of range, or rows that do not tile the tensor */
    FO_ERR_MEMORY = 7      /* no memory for a row batch's tables */
};

enum fo_convention { FO_TEXTBOOK = 0, FO_TORCH = 1 };

/* How a buffer is stored.  The kernels compute in double for float64 parameters and in float
 * otherwise; only the loads and stores change.  FO_BFLOAT16: uint16_t holding the upper half of
 * an IEEE float32 (a float32 is its bits << 16).  Allowed: parameters of any of the three;
 * gradients of the parameter's type, or bfloat16 for float32 parameters; state buffers of the
 * compute type (float32, or float64 for float64 parameters) or bfloat16, each on its own. */
enum fo_dtype { FO_FLOAT32 = 0, FO_FLOAT64 = 1, FO_BFLOAT16 = 2 };

/* How a value is written to a bfloat16 buffer (fo_batch.rounding).  u = the float32's bits
 * (a double result is first rounded to float32), with float32 subnormals flushed to signed zero
 * as AVX512-BF16's conversion does; a NaN becomes the quiet NaN (u >> 16) | 0x40.  Otherwise
 *   FO_ROUND_STOCHASTIC:  (u + r) >> 16,  r uniform in [0, 2^16) from the keyed generator
 *                         (README "bfloat16 storage"), so E[result] = the value;
 *   FO_ROUND_NEAREST:     (u + 0x7fff + ((u >> 16) & 1)) >> 16   (to nearest, ties to even). */
enum fo_rounding { FO_ROUND_STOCHASTIC = 0, FO_ROUND_NEAREST = 1 };

#define FO_MAX_BUFFERS 8 /* param, grad, and up to six state buffers */

#define FO_RULE_ID_(rule, ...) FO_RULE_##rule,
enum fo_rule { FO_RULES(FO_RULE_ID_) FO_N_RULES };
#undef FO_RULE_ID_

#define FO_FIELD_(c, type, name) type name;
#define FO_PARAMS_STRUCT_(rule, ...) typedef struct { FO_FIELDS_##rule(FO_FIELD_, ~) } fo_##rule##_params;
FO_RULES(FO_PARAMS_STRUCT_)
#undef FO_PARAMS_STRUCT_
#undef FO_FIELD_

/* Human-readable text for a status code (static storage, never NULL). */
const char *fo_strerror(int status);

/* What fo_step / fo_check found wrong: the hyperparameter's field name and the rule it broke
 * (both static strings), or NULLs when the status has nothing to do with hyperparameters. */
typedef struct {
    const char *field, *requirement;
} fo_error;

/* ---- the generic entry point --------------------------------------------------------------- */

/*
 * `count` tensors, tensor t having n[t] elements; buffers[k][t] is buffer k of tensor t: k = 0
 * the parameter, 1 its gradient (read only), 2.. the rule's state buffers in FO_RULES order.
 * buffers[k] may be NULL for a state buffer the hyperparameters leave unused (AMSGrad's max_v
 * without amsgrad).  dtype[k] is buffer k's storage (fo_dtype; the combinations allowed are
 * listed there).  The work is split across threads by elements, not by tensor.
 * Each tensor's buffers must not overlap one another; overlaps between different tensors'
 * buffers are not checked (the Python layer does it once).
 *
 * bfloat16 storage (the fields after dtype; all zero: stochastic rounding, seed 0, step 0):
 * master[t], if master is not NULL, is a float32 copy of tensor t's bfloat16 parameter: the rule
 * updates it and the parameter is written from it, rounded to nearest, in the same pass.  Every
 * other bfloat16 write is rounded as `rounding` says; stochastic rounding's random bits are
 * fixed by (seed, index[t] (t when index is NULL), step, the element's index in its tensor, the
 * buffer k), so results do not depend on threads, instruction set or the tensors' order.
 */
typedef struct fo_rows fo_rows;
typedef struct {
    size_t count;
    const size_t *n;
    void *const *buffers[FO_MAX_BUFFERS];
    int dtype[FO_MAX_BUFFERS];
    const fo_rows *rows; /* NULL (every gradient dense), or one entry per tensor: see below */
    float *const *master;  /* per tensor: float32 master weights, or NULL for none */
    int rounding;          /* fo_rounding */
    uint64_t seed, step;   /* key the random bits (step: the update being made, 1 first) */
    const uint64_t *index; /* per tensor: its index among the optimizer's parameters */
} fo_batch;

/*
 * Sparse rows.  When batch->rows is set and rows[t].indices is not NULL, tensor t's gradient
 * is given by rows: the tensor is viewed as n[t] / row_len rows of row_len elements, and
 * buffers[1][t] holds nnz gradient rows (nnz x row_len, the batch's storage type), row j
 * belonging to row indices[j] (FO_INT32 or FO_INT64, any order, duplicates allowed).
 * Duplicates are summed in the order they appear in `indices` (a stable sort by row, then a
 * sum in that order), so the result depends neither on the thread count nor on how the
 * duplicates are interleaved with other rows.  Then every touched row takes one step of the
 * rule with its summed gradient, exactly as a dense step over that row would (same loop, same
 * per-step scalars); untouched rows and their state are not read or written ("lazy").
 * Any storage (bfloat16 buffers, master weights) works with rows: each buffer's row is
 * row_len elements of its own type, stochastic rounding is keyed by the element's index in
 * the tensor (row x row_len + e), so a row is written bit for bit as a dense step writes it;
 * bfloat16 gradient rows met several times are summed in float32 and rounded once to nearest.
 * last_step (sparse="exact") with bfloat16 storage or master weights: FO_ERR_DTYPE.
 * Validation: 0 <= indices[j] < n[t] / row_len, row_len > 0 dividing n[t] (FO_ERR_INDEX),
 * the gradient rows and the indices overlapping no written buffer (FO_ERR_OVERLAP).
 */
enum fo_index_type { FO_INT32 = 0, FO_INT64 = 1 };
struct fo_rows {
    const void *indices; /* nnz row indices; NULL: this tensor's gradient is dense */
    int index_type;      /* fo_index_type */
    size_t nnz;          /* gradient rows */
    size_t row_len;      /* elements per row */
    /* sparse="exact": NULL ("lazy"), or per row of the tensor the step that last updated it
     * (0: none), read and written by the call.  Before a touched row's update, the steps it
     * missed (last_step[row] + 1 .. step - 1) are applied to it with a zero gradient, in
     * closed form (the rule's catch-up map: see fo_check_exact), and last_step[row] becomes
     * `step`.  With last_step set and indices NULL, every row is touched by a dense gradient
     * (row_len must still divide n[t]). */
    int64_t *last_step;
    int64_t step; /* this step's number (>= 1), with last_step */
    /* factored rules (fo_rule_info.factored) only: rows per matrix; the tensor is n / (matrix_rows
     * row_len) matrices of matrix_rows rows of row_len elements.  0: the tensor is a vector. */
    size_t matrix_rows;
};

/* One step of `rule` over `batch`; hp points to the rule's fo_<rule>_params.  err may be NULL. */
int fo_step(int rule, const fo_batch *batch, const void *hp, fo_error *err);

/* Whether `rule` with these hyperparameters has a closed form for the steps a row missed
 * (fo_rows.last_step): FO_OK, or FO_ERR_HYPERPARAM with err naming the hyperparameter that
 * rules it out (field "rule" when the rule has none at all).  Each rule's file documents its
 * catch-up map (FO_CATCHUP). */
int fo_check_exact(int rule, const void *hp, fo_error *err);

/* Validate hyperparameters only: FO_OK, with bit k of *uses set when they use state buffer k
 * (uses may be NULL), or FO_ERR_HYPERPARAM with err filled. */
int fo_check(int rule, const void *hp, unsigned *uses, fo_error *err);

/* ---- a step's options, the reduction pass ----------------------------------------------------
 * A training step is at most two passes over the gradients: fo_norm (a reduction: their norm,
 * whether any is inf/NaN), then fo_step_with, whose options fold the unscale/clip factor into
 * the rule's per-step scalars and update an EMA of the weights in the same pass.
 */
typedef struct {
    /* every rule starts from g = grad_multiplier * grad (then maximize, weight decay), through
     * the one helper every rule's prepare part uses: 1.0 leaves the gradient as it is; it must
     * be finite and >= 0 (unscaling by 1/scale and clipping by the factor of a global norm) */
    double grad_multiplier;
    /* NULL, or per tensor an EMA buffer updated after the rule, in the same pass:
     *   ema <- ema_decay * ema + (1 - ema_decay) * theta  (0 <= decay <= 1)
     * computed as the rule (float32, float64 for float64 parameters; theta the master copy
     * with master weights), stored in the compute type, or in bfloat16 where ema_bfloat16 is
     * nonzero (rounded as the batch's other bfloat16 writes, with its own stream of random
     * bits: README, "bfloat16 storage") */
    void *const *ema;
    double ema_decay;
    int ema_bfloat16;
} fo_step_options;

/* fo_step with options (NULL: fo_step itself).  A refused option is named in err like a
 * hyperparameter ("grad_multiplier", "ema_decay"). */
int fo_step_with(int rule, const fo_batch *batch, const void *hp, const fo_step_options *opt,
                 fo_error *err);

/*
 * The reduction pass: over buffer `buffer` (0 the parameters, 1 the gradients, ...) of every
 * tensor of `batch`, with the buffer's storage type (float32, float64 or bfloat16, whose
 * values are exactly float32's: the same results as over a float32 copy), computed in double:
 *   p > 0 finite:  sum |x|^p         (p = 2: the sum of squares; p = 1: the sum of |x|)
 *   p = INFINITY:  max |x|           (NaN if any element is NaN)
 *   p = 0:         the count of nonzero elements
 * per tensor (per_tensor[t], may be NULL) and over all tensors (*total: the sum of the
 * per-tensor sums in tensor order, their max for p = INFINITY); *nonfinite = 1 if any element
 * is inf or NaN, else 0.  The summation order is fixed (blocks of FO_NORM_BLOCK elements,
 * FO_NORM_LANES interleaved partial sums inside a block combined pairwise, blocks in order),
 * so results are bit-identical for any thread count and instruction set.  The norm itself is
 * total^(1/p) (torch's composition of per-tensor norms for p = 0 and p = INFINITY aside).
 * FO_ERR_HYPERPARAM (err->field "p") for p < 0 or NaN; FO_ERR_DTYPE, FO_ERR_NULL as fo_step
 * (FO_ERR_DTYPE too for gradients given as rows: buffer 1 must be dense here).  On an error
 * nothing is written: not *total, *nonfinite nor per_tensor.
 */
#define FO_NORM_BLOCK 4096
#define FO_NORM_LANES 32
int fo_norm(const fo_batch *batch, int buffer, double p, double *per_tensor, double *total,
            int *nonfinite, fo_error *err);

/* Buffer `buffer` of every tensor of `batch` multiplied in place by `factor` (rounded to the
 * storage type first), through the same threads: clipping outside a step.  Any factor is taken,
 * as torch's mul_ takes it: x * factor in IEEE arithmetic, so a NaN factor makes every element
 * NaN, a negative one flips signs, and one past float's range rounds to inf for float32
 * storage.  Checking it is the caller's part: torch's clip_grad_norm_ multiplies by whatever
 * factor it computed (NaN from a NaN norm, when error_if_nonfinite is off), and
 * fastopt.torch.clip_grad_norm_ matches it through this call.  FO_ERR_DTYPE, FO_ERR_NULL as
 * fo_norm, with nothing written. */
int fo_scale(const fo_batch *batch, int buffer, double factor);

/* ---- what each rule is, for bindings --------------------------------------------------------- */

enum fo_field_type { FO_FIELD_DOUBLE = 0, FO_FIELD_INT = 1, FO_FIELD_INT64 = 2 };
typedef struct {
    const char *name;
    int type; /* fo_field_type */
    size_t offset;
} fo_field;

typedef struct {
    const char *name;          /* "adam" */
    int n_state;               /* state buffers */
    const char *const *state;  /* their names, in order */
    size_t params_size;        /* sizeof(fo_<rule>_params) */
    int n_fields;
    const fo_field *fields;    /* the fields of fo_<rule>_params, in order */
    int per_row;               /* 1: a row rule (its state buffers hold one value per row) */
    int factored;              /* 1: a factored rule (its state is sized by fo_rows.matrix_rows) */
} fo_rule_info;

/* The description of rule `rule` (0 <= rule < FO_N_RULES), or NULL. */
const fo_rule_info *fo_describe(int rule);

/* ---- the typed entry points ------------------------------------------------------------------
 * For each X(rule, s1, s2, ...) of FO_RULES:
 *   int fo_<rule>_f32(float *param, const float *grad, float *s1, float *s2, ..., size_t n,
 *                     const fo_<rule>_params *hp);
 *   int fo_<rule>_many_f32(size_t count, float *const *param, const float *const *grad,
 *                          float *const *s1, ..., const size_t *n, const fo_<rule>_params *hp);
 * and the same with double for _f64.  For example
 *   int fo_adam_f32(float *param, const float *grad, float *m, float *v, float *max_v, size_t n,
 *                   const fo_adam_params *hp);     (max_v may be NULL unless amsgrad)
 * Optional buffers may be NULL when the options leave them unused: SGD's momentum_buffer when
 * momentum == 0, RMSprop's grad_avg unless centered and momentum_buffer when momentum == 0,
 * Adam's max_v unless amsgrad.  Rprop's step_size must start at lr (the caller fills it).
 */
#define FO_NARGS_(...) FO_NARGS_PICK_(__VA_ARGS__, 6, 5, 4, 3, 2, 1, 0)
#define FO_NARGS_PICK_(a1, a2, a3, a4, a5, a6, n, ...) n
#define FO_CAT2_(a, b) a##b
#define FO_CAT2(a, b) FO_CAT2_(a, b)
/* FO_MAP(m, x1, x2, ...) -> m(x1) m(x2) ... (up to six) */
#define FO_MAP(m, ...) FO_CAT2(FO_MAP_, FO_NARGS_(__VA_ARGS__))(m, __VA_ARGS__)
#define FO_MAP_1(m, a) m(a)
#define FO_MAP_2(m, a, ...) m(a) FO_MAP_1(m, __VA_ARGS__)
#define FO_MAP_3(m, a, ...) m(a) FO_MAP_2(m, __VA_ARGS__)
#define FO_MAP_4(m, a, ...) m(a) FO_MAP_3(m, __VA_ARGS__)
#define FO_MAP_5(m, a, ...) m(a) FO_MAP_4(m, __VA_ARGS__)
#define FO_MAP_6(m, a, ...) m(a) FO_MAP_5(m, __VA_ARGS__)

#define FO_ONE_ARG_float(name) float *name,
#define FO_ONE_ARG_double(name) double *name,
#define FO_MANY_ARG_float(name) float *const *name,
#define FO_MANY_ARG_double(name) double *const *name,
#define FO_TYPED_SIGNATURE_ONE(rule, T, sfx, ...)                                              \
    int fo_##rule##_##sfx(T *param, const T *grad, FO_MAP(FO_ONE_ARG_##T, __VA_ARGS__) size_t n, \
                          const fo_##rule##_params *hp)
#define FO_TYPED_SIGNATURE_MANY(rule, T, sfx, ...)                                             \
    int fo_##rule##_many_##sfx(size_t count, T *const *param, const T *const *grad,            \
                               FO_MAP(FO_MANY_ARG_##T, __VA_ARGS__) const size_t *n,           \
                               const fo_##rule##_params *hp)
#define FO_TYPED_DECLARATIONS_(rule, ...)                                                      \
    FO_TYPED_SIGNATURE_ONE(rule, float, f32, __VA_ARGS__);                                     \
    FO_TYPED_SIGNATURE_ONE(rule, double, f64, __VA_ARGS__);                                    \
    FO_TYPED_SIGNATURE_MANY(rule, float, f32, __VA_ARGS__);                                    \
    FO_TYPED_SIGNATURE_MANY(rule, double, f64, __VA_ARGS__);
FO_RULES(FO_TYPED_DECLARATIONS_)
#undef FO_TYPED_DECLARATIONS_

/* ---- threads, instruction set, the bandwidth ceiling ----------------------------------------- */

/* Threads used by a large call (default: FASTOPT_NUM_THREADS, else the CPUs this process may
 * use).  Calls under 131072 elements run on the calling thread.  Results never depend on it. */
int fo_set_num_threads(int n); /* FO_ERR_HYPERPARAM unless 1 <= n <= 256 */
int fo_get_num_threads(void);

/* Runs another library's parallel regions on fastopt's threads: OpenBLAS's threads callback
 * (openblas_set_threads_callback_function(fo_blas_threads), OpenBLAS >= 0.3.27), so a
 * process that alternates matmuls and steps keeps one pool of threads, awake for both.  Runs
 * dojob(i, (char *)jobdata + i * jobdata_stride, dojob_arg) for every i < numjobs, each job on
 * its own thread (they may wait for each other), and returns when all are done.  Not where
 * threads run LAPACK at once: under any threads callback, OpenBLAS 0.3.31's parallel LU
 * factorization hangs when two threads factor at the same time (README, "in a training loop"). */
typedef void (*fo_blas_job_fn)(int i, void *jobdata, int arg);
void fo_blas_threads(int sync, fo_blas_job_fn dojob, int numjobs, size_t jobdata_stride,
                     void *jobdata, int dojob_arg);

/* The instruction set the loops were compiled for and chosen at first use: "baseline", "avx2"
 * or "avx512".  The environment variable FASTOPT_ISA caps it (read once): baseline, avx2,
 * avx512 or avx512bf16 (the default: everything the CPU has). */
const char *fo_isa(void);

/* How bfloat16 values are rounded to nearest: "avx512bf16" (the VCVTNEPS2BF16 instruction) or
 * "integer" (shifts and adds, every other CPU), identical bits.  FASTOPT_ISA=avx512 caps it at
 * "integer"; FASTOPT_ISA=avx512bf16 (or unset) allows the instruction where the CPU has it. */
const char *fo_bf16_path(void);

/* How stochastic rounding's random bits (ARS-7: seven AES rounds, README "The random bits") are
 * computed: "vaes512" or "vaes256" (VAES on 512- or 256-bit vectors), "aesni" (AES-NI) or
 * "portable" (C), identical bits.  FASTOPT_ISA caps it as the loops: baseline runs "portable",
 * avx2 at most "vaes256". */
const char *fo_random_path(void);

/* p += g; m += g; v += g over n floats: Adam's 7 streams of memory traffic with no arithmetic to
 * speak of, through the same threads.  The benchmark's bandwidth ceiling. */
void fo_stream_f32(float *p, const float *g, float *m, float *v, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* FASTOPT_H */
