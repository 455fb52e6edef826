/*
 * kernels.c -- the entry points of fastopt.h: fo_step, and the typed wrappers around it.
 *
 * fo_step validates its arguments (hyperparameters, NULL and overlapping buffers, storage
 * types), lets the rule turn its hyperparameters into per-step scalars in double, once per
 * call, and hands them to the loop of the active instruction set.  Nothing is written before
 * validation has passed.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

/* ---- instruction set, chosen once --------------------------------------------------------- */

static const fo_loops *active_loops;
static fo_bf16_round_fn active_to_nearest;
static const char *active_bf16_path = "integer";
static fo_random_bits_fn active_random_bits = fo_random_bits_portable;
static const char *active_random_path = "portable";
static pthread_once_t active_once = PTHREAD_ONCE_INIT;

static void choose_loops(void)
{
    const fo_loops *best = &fo_loops_baseline;
    fo_bf16_round_fn to_nearest = NULL;
#ifdef FO_X86
    /* FASTOPT_ISA caps the level (baseline, avx2, avx512, avx512bf16) so tests can run every
     * path; avx512bf16 runs the avx512 loops with the bf16 conversion instruction */
    const char *cap = getenv("FASTOPT_ISA");
    const int cap_level = !cap || !*cap                   ? 3
                          : strcmp(cap, "avx512bf16") == 0 ? 3
                          : strcmp(cap, "avx512") == 0     ? 2
                          : strcmp(cap, "avx2") == 0       ? 1
                                                           : 0;
    __builtin_cpu_init();
    if (cap_level >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        best = &fo_loops_avx2;
    /* the generator follows the same cap: baseline runs the portable AES rounds */
    if (cap_level >= 1 && __builtin_cpu_supports("aes")) {
        active_random_bits = fo_random_bits_aesni;
        active_random_path = "aesni";
    }
    if (cap_level >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vaes") &&
        active_random_bits == fo_random_bits_aesni) {
        active_random_bits = fo_random_bits_vaes256;
        active_random_path = "vaes256";
    }
    if (cap_level >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vaes") &&
        active_random_bits == fo_random_bits_vaes256) {
        active_random_bits = fo_random_bits_vaes512;
        active_random_path = "vaes512";
    }
    if (cap_level >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
        best = &fo_loops_avx512;
        if (cap_level >= 3 && __builtin_cpu_supports("avx512bf16")) {
            to_nearest = fo_bf16_nearest_avx512bf16;
            active_bf16_path = "avx512bf16";
        }
    }
#endif
    active_loops = best;
    active_to_nearest = to_nearest ? to_nearest : best->to_nearest;
}

static const fo_loops *fo_active(void)
{
    pthread_once(&active_once, choose_loops);
    return active_loops;
}

const char *fo_isa(void) { return fo_active()->name; }

void fo_round_to_bfloat16(uint16_t *dst, const float *src, size_t n)
{
    fo_active();
    active_to_nearest(dst, src, n);
}

const char *fo_bf16_path(void)
{
    fo_active();
    return active_bf16_path;
}

const char *fo_random_path(void)
{
    fo_active();
    return active_random_path;
}

const char *fo_strerror(int status)
{
    switch (status) {
    case FO_OK: return "ok";
    case FO_ERR_NULL: return "a required buffer or the hyperparameter struct is NULL";
    case FO_ERR_HYPERPARAM: return "a hyperparameter is NaN, infinite or out of range";
    case FO_ERR_OVERLAP: return "a buffer that is written overlaps another buffer";
    case FO_ERR_RULE: return "no such rule";
    case FO_ERR_DTYPE: return "unsupported storage type";
    case FO_ERR_INDEX: return "a row index is negative or out of range, or the rows do not tile the tensor";
    case FO_ERR_MEMORY: return "out of memory";
    default: return "unknown fastopt status";
    }
}

/* ---- what the rules' prepare parts use (rules/<rule>.inc, FO_PART_PREPARE) ------------------ */

static int nonneg(double x) { return x >= 0.0 && isfinite(x); } /* NaN fails */
static int unit_interval(double x) { return x >= 0.0 && x < 1.0; } /* [0, 1), NaN fails */

/* Besides its hyperparameters a prepare part receives the step's gradient multiplier
 * (fo_step_options), which gradient_terms() folds into grad_sign, so every rule gets it by
 * construction; fo_step_with refuses a multiplier other than 1 if a rule did not apply it. */
typedef struct {
    double grad_multiplier;
    int applied;
} fo_gradient_options;
#define FO_PREPARE(rule)                                                                       \
    static int rule##_prepare(const fo_##rule##_params *hp, fo_##rule##_scalars *s,            \
                              unsigned *uses, fo_error *err, fo_gradient_options *gradient_options)
#define FO_REQUIRE(cond, field_name, requirement_text)                                                   \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            err->field = (field_name);                                                          \
            err->requirement = (requirement_text);                                              \
            return FO_ERR_HYPERPARAM;                                                          \
        }                                                                                      \
    } while (0)
#define FO_NONNEG(name) FO_REQUIRE(nonneg(hp->name), #name, "must be finite and >= 0")
#define FO_UNIT(name) FO_REQUIRE(unit_interval(hp->name), #name, "must be in [0, 1)")
#define FO_STEP() FO_REQUIRE(hp->step >= 1, "step", "must be >= 1")
#define FO_CONVENTION()                                                                        \
    FO_REQUIRE(hp->convention == FO_TEXTBOOK || hp->convention == FO_TORCH, "convention",     \
               "must be FO_TEXTBOOK or FO_TORCH")
#define FO_USES(k) (1u << (k)) /* state buffer k is read and written */

/* g = grad_sign * grad + l2 * theta; the decay of decoupled weight decay is the caller's.
 * grad_sign carries the step's gradient multiplier (unscale, clip): |grad_sign| = multiplier. */
static void gradient_terms_scaled(fo_gradient_options *options, int maximize, double weight_decay,
                                  int decoupled, double *grad_sign, double *l2)
{
    options->applied = 1;
    *grad_sign = (maximize ? -1.0 : 1.0) * options->grad_multiplier;
    *l2 = decoupled ? 0.0 : weight_decay;
}
#define gradient_terms(...) gradient_terms_scaled(gradient_options, __VA_ARGS__)

/* A per-tensor pass's last part (internal.h, FO_TENSOR_RULES): the tensor's sums -> its scalar */
#define FO_TENSOR(rule)                                                                        \
    static double rule##_tensor(const fo_##rule##_scalars *s, const double *sums)

/* A rule's catch-up part (internal.h, FO_CATCHUP_RULES): c arrives as the identity map */
#define FO_CATCHUP(rule)                                                                       \
    static int rule##_catchup(const fo_##rule##_params *hp, fo_catchup *c, fo_error *err)
#define FO_NO_CLOSED_FORM(cond, field_name)                                                    \
    FO_REQUIRE(cond, field_name, "has no closed form for the steps a row missed (sparse=\"exact\")")

/* A factored rule's parts (internal.h, FO_FACTORED_RULES): its state's sizes, its passes */
#define FO_STATE_SIZE(rule) static size_t rule##_state_size(int k, size_t n, const fo_rows *rows)
#define FO_FACTORED(rule)                                                                      \
    static int rule##_run(const fo_##rule##_scalars *s, size_t count, void *const *const *bufs, \
                          int n_bufs, const size_t *n, const fo_rows *rows, int which,          \
                          fo_span_fn span, const fo_call *span_call)

#define FO_PART FO_PART_PREPARE
#include "rules/all.inc"
#undef FO_PART

/* ---- the rule table, from FO_RULES --------------------------------------------------------- */

typedef int (*fo_prepare_fn)(const void *hp, void *scalars, unsigned *uses, fo_error *err,
                             fo_gradient_options *gradient_options);

#define FO_TYPE_double FO_FIELD_DOUBLE
#define FO_TYPE_int FO_FIELD_INT
#define FO_TYPE_int64_t FO_FIELD_INT64
#define FO_STRING(x) #x,
#define FO_FIELD_ENTRY(params_type, type, name) {#name, FO_TYPE_##type, offsetof(params_type, name)},
#define FO_RULE_TABLES(rule, ...)                                                              \
    _Static_assert(sizeof(fo_##rule##_scalars) <= FO_MAX_SCALARS, #rule " scalars too large"); \
    static int rule##_prepare_any(const void *hp, void *s, unsigned *uses, fo_error *err,     \
                                  fo_gradient_options *gradient_options)                       \
    {                                                                                          \
        return rule##_prepare((const fo_##rule##_params *)hp, (fo_##rule##_scalars *)s, uses, \
                              err, gradient_options);                                          \
    }                                                                                          \
    static const char *const rule##_state[] = {FO_MAP(FO_STRING, __VA_ARGS__)};               \
    static const fo_field rule##_fields[] = {FO_FIELDS_##rule(FO_FIELD_ENTRY, fo_##rule##_params)};
FO_RULES(FO_RULE_TABLES)

/* bit r: rule r is a row rule (FO_ROW_RULES) */
#define FO_ROW_RULE_BIT(rule) | (1ull << FO_RULE_##rule)
#define FO_ROW_RULE_MASK (0ull FO_ROW_RULES(FO_ROW_RULE_BIT))
_Static_assert(FO_N_RULES <= 64, "FO_ROW_RULE_MASK holds 64 rules");
#define FO_IS_ROW_RULE(rule) ((int)((FO_ROW_RULE_MASK >> (rule)) & 1u))

typedef size_t (*fo_state_size_fn)(int k, size_t n, const fo_rows *rows);
typedef int (*fo_factored_fn)(const void *s, size_t count, void *const *const *bufs, int n_bufs,
                              const size_t *n, const fo_rows *rows, int which, fo_span_fn span,
                              const fo_call *span_call);
#define FO_FACTORED_TABLE(rule)                                                                \
    static int rule##_run_any(const void *s, size_t count, void *const *const *bufs,          \
                              int n_bufs, const size_t *n, const fo_rows *rows, int which,      \
                              fo_span_fn span, const fo_call *span_call)                        \
    {                                                                                          \
        return rule##_run((const fo_##rule##_scalars *)s, count, bufs, n_bufs, n, rows, which, \
                          span, span_call);                                                    \
    }
FO_FACTORED_RULES(FO_FACTORED_TABLE)
#define FO_FACTORED_ENTRY(rule) [FO_RULE_##rule] = {rule##_state_size, rule##_run_any},
static const struct {
    fo_state_size_fn state_size; /* NULL: not a factored rule */
    fo_factored_fn run;
} factored_rules[FO_N_RULES] = {FO_FACTORED_RULES(FO_FACTORED_ENTRY)};
#define FO_FACTORED_BIT(rule) | (1ull << FO_RULE_##rule)
#define FO_IS_FACTORED(rule) ((int)(((0ull FO_FACTORED_RULES(FO_FACTORED_BIT)) >> (rule)) & 1u))

#define FO_COUNT(array) ((int)(sizeof(array) / sizeof *(array)))
#define FO_RULE_ENTRY(rule, ...)                                                               \
    [FO_RULE_##rule] = {{#rule, FO_COUNT(rule##_state), rule##_state,                         \
                         sizeof(fo_##rule##_params), FO_COUNT(rule##_fields), rule##_fields,   \
                         FO_IS_ROW_RULE(FO_RULE_##rule), FO_IS_FACTORED(FO_RULE_##rule)},     \
                        rule##_prepare_any},
static const struct {
    fo_rule_info info;
    fo_prepare_fn prepare;
} rules[FO_N_RULES] = {FO_RULES(FO_RULE_ENTRY)};

typedef double (*fo_tensor_fn)(const void *scalars, const double *sums);
#define FO_TENSOR_TABLE(rule, n_sums, writes)                                                  \
    _Static_assert((n_sums) <= FO_MAX_SUMS, #rule " has too many per-tensor sums");            \
    static double rule##_tensor_any(const void *s, const double *sums)                         \
    {                                                                                          \
        return rule##_tensor((const fo_##rule##_scalars *)s, sums);                            \
    }
FO_TENSOR_RULES(FO_TENSOR_TABLE)
#define FO_TENSOR_ENTRY(rule, n_sums, writes) [FO_RULE_##rule] = {rule##_tensor_any, n_sums, writes},
static const struct {
    fo_tensor_fn scalar; /* NULL: the rule has no per-tensor pass */
    int n_sums;
    unsigned writes; /* the buffers its reduce pass writes (internal.h) */
} tensor_passes[FO_N_RULES] = {FO_TENSOR_RULES(FO_TENSOR_ENTRY)};

typedef int (*fo_catchup_fn)(const void *hp, fo_catchup *c, fo_error *err);
#define FO_CATCHUP_TABLE(rule)                                                                 \
    static int rule##_catchup_any(const void *hp, fo_catchup *c, fo_error *err)                \
    {                                                                                          \
        return rule##_catchup((const fo_##rule##_params *)hp, c, err);                         \
    }
FO_CATCHUP_RULES(FO_CATCHUP_TABLE)
#define FO_CATCHUP_ENTRY(rule) [FO_RULE_##rule] = rule##_catchup_any,
static const fo_catchup_fn catchups[FO_N_RULES] = {FO_CATCHUP_RULES(FO_CATCHUP_ENTRY)};

/* The rule's catch-up map for hp (checked by the rule's prepare part already). */
static int catchup_of(int rule, const void *hp, fo_catchup *c, fo_error *err)
{
    *c = (fo_catchup){0, {1.0, 0.0, 0.0, 1.0}, {1.0, 0.0, 0.0, 1.0}, {0}};
    for (int k = 0; k < FO_MAX_BUFFERS; k++) c->decay[k] = 1.0;
    if (!catchups[rule]) {
        err->field = "rule";
        err->requirement = "has no closed form for the steps a row missed (sparse=\"exact\")";
        return FO_ERR_HYPERPARAM;
    }
    return catchups[rule](hp, c, err);
}

int fo_check_exact(int rule, const void *hp, fo_error *err)
{
    fo_error ignored;
    if (!err) err = &ignored;
    const int status = fo_check(rule, hp, NULL, err);
    if (status != FO_OK) return status;
    fo_catchup c;
    return catchup_of(rule, hp, &c, err);
}

const fo_rule_info *fo_describe(int rule)
{
    return rule >= 0 && rule < FO_N_RULES ? &rules[rule].info : NULL;
}

/* ---- validation ------------------------------------------------------------------------- */

int fo_check(int rule, const void *hp, unsigned *uses, fo_error *err)
{
    fo_error ignored;
    _Alignas(16) unsigned char scalars[FO_MAX_SCALARS];
    unsigned ignored_uses;
    if (!err) err = &ignored;
    if (!uses) uses = &ignored_uses;
    *err = (fo_error){NULL, NULL};
    if (rule < 0 || rule >= FO_N_RULES) return FO_ERR_RULE;
    if (!hp) return FO_ERR_NULL;
    fo_gradient_options unscaled = {1.0, 0};
    return rules[rule].prepare(hp, scalars, uses, err, &unscaled);
}

/*
 * One tensor's buffers: the gradient (read, grad_bytes long) and written[0..n_written), bytes[i]
 * long.  All must be non-NULL when the tensor has elements, and no written buffer may overlap
 * another buffer: the loops read each element once and write it once, which is only correct
 * for disjoint buffers.
 */
static int check_tensor(const void *grad, size_t grad_bytes, void *const *written,
                        const size_t *bytes, int n_written)
{
    if (grad_bytes == 0) return FO_OK;
    if (!grad) return FO_ERR_NULL;
    for (int i = 0; i < n_written; i++)
        if (!written[i]) return FO_ERR_NULL;
    const uintptr_t g = (uintptr_t)grad, g_end = g + (uintptr_t)grad_bytes;
    for (int i = 0; i < n_written; i++) {
        const uintptr_t a = (uintptr_t)written[i], a_end = a + (uintptr_t)bytes[i];
        if (a < g_end && g < a_end) return FO_ERR_OVERLAP;
        for (int j = i + 1; j < n_written; j++) {
            const uintptr_t b = (uintptr_t)written[j], b_end = b + (uintptr_t)bytes[j];
            if (a < b_end && b < a_end) return FO_ERR_OVERLAP;
        }
    }
    return FO_OK;
}

static size_t dtype_size(int dtype)
{
    return dtype == FO_FLOAT64 ? sizeof(double) : dtype == FO_FLOAT32 ? sizeof(float) : sizeof(uint16_t);
}

/* the type a call whose parameters are stored as param_dtype computes in */
static int compute_dtype(int param_dtype)
{
    return param_dtype == FO_FLOAT64 ? FO_FLOAT64 : FO_FLOAT32;
}

/* The storage combinations the loops have (fastopt.h, fo_dtype): buffer k of a call whose
 * parameters are stored as param_dtype. */
static int dtype_allowed(int k, int dtype, int param_dtype)
{
    const int compute = compute_dtype(param_dtype);
    if (k == 0) return dtype == FO_FLOAT32 || dtype == FO_FLOAT64 || dtype == FO_BFLOAT16;
    if (k == 1) return dtype == param_dtype || (param_dtype == FO_FLOAT32 && dtype == FO_BFLOAT16);
    return dtype == compute || dtype == FO_BFLOAT16;
}

/* ---- the generic entry point ---------------------------------------------------------------- */

/*
 * A rule with a per-tensor pass (FO_TENSOR_RULES): the reduce pass over every tensor's blocks
 * (fo_run_blocks: one thread per block, any split), each tensor's block sums added in block
 * order, the tensor's scalar from them, then the update with each tensor's scalar at buffer
 * slot `slot`.  It reads the buffers and writes nothing before the update; it needs memory for
 * the block sums and returns FO_ERR_NULL (err: "memory") without it, having written nothing.
 */
static int run_with_tensor_pass(int rule, int which, size_t count, void *const **bufs, int slot,
                                int n_bufs, const size_t *n, const fo_call *rule_call,
                                fo_span_fn span, const fo_call *span_call, fo_error *err)
{
    const void *rule_scalars = rule_call->scalars;
    fo_call reduce_call = *rule_call;
    reduce_call.n_bufs = slot + 1;
    reduce_call.read_only = ~tensor_passes[rule].writes;
    const int n_sums = tensor_passes[rule].n_sums;
    size_t blocks = 0;
    for (size_t t = 0; t < count; t++) blocks += (n[t] + FO_NORM_BLOCK - 1) / FO_NORM_BLOCK;
    double *sums = malloc((n_sums * blocks + count) * sizeof(double) + count * sizeof(void *));
    if (!sums) {
        err->field = "memory";
        err->requirement = "could not be allocated for the per-tensor sums";
        return FO_ERR_MEMORY;
    }
    double *scalar = sums + n_sums * blocks;
    void **slots = (void **)(scalar + count); /* first each tensor's block sums, then its scalar */
    for (size_t t = 0, at = 0; t < count; at += (n[t] + FO_NORM_BLOCK - 1) / FO_NORM_BLOCK, t++)
        slots[t] = sums + n_sums * at;
    void *const *with_slot[FO_MAX_BUFFERS];
    for (int k = 0; k < n_bufs; k++) with_slot[k] = bufs[k];
    with_slot[slot] = slots;
    fo_run_blocks(fo_active()->reduce[rule][which], count, with_slot, slot + 1, n, &reduce_call,
                  FO_NORM_BLOCK);
    for (size_t t = 0; t < count; t++) {
        double total[FO_MAX_SUMS] = {0};
        const double *block = slots[t];
        for (size_t at = 0; at < n[t]; at += FO_NORM_BLOCK, block += n_sums)
            for (int k = 0; k < n_sums; k++) total[k] += block[k];
        scalar[t] = tensor_passes[rule].scalar(rule_scalars, total);
        slots[t] = &scalar[t];
    }
    fo_run(span, count, with_slot, n_bufs, n, span_call);
    free(sums);
    return FO_OK;
}

int fo_step(int rule, const fo_batch *batch, const void *hp, fo_error *err)
{
    return fo_step_with(rule, batch, hp, NULL, err);
}

static int step_with(int rule, const fo_batch *batch, const void *hp, const fo_step_options *opt,
                     fo_error *err, int buffers_checked);

int fo_step_with(int rule, const fo_batch *batch, const void *hp, const fo_step_options *opt,
                 fo_error *err)
{
    return step_with(rule, batch, hp, opt, err, 0);
}

int fo_step_planned(int rule, const fo_batch *batch, const void *hp, const fo_step_options *opt,
                    fo_error *err)
{
    return step_with(rule, batch, hp, opt, err, 1);
}

/* buffers_checked: the dense tensors' buffers are known not to overlap (fo_step_planned) */
static int step_with(int rule, const fo_batch *batch, const void *hp, const fo_step_options *opt,
                     fo_error *err, int buffers_checked)
{
    fo_error ignored;
    _Alignas(16) unsigned char scalars[FO_MAX_SCALARS];
    unsigned uses = 0;
    if (!err) err = &ignored;
    *err = (fo_error){NULL, NULL};
    if (rule < 0 || rule >= FO_N_RULES) return FO_ERR_RULE;
    if (!batch || !hp) return FO_ERR_NULL;
    fo_gradient_options gradient = {opt ? opt->grad_multiplier : 1.0, 0};
    FO_REQUIRE(nonneg(gradient.grad_multiplier), "grad_multiplier", "must be finite and >= 0");
    FO_REQUIRE(!opt || !opt->ema || (opt->ema_decay >= 0.0 && opt->ema_decay <= 1.0), "ema_decay",
               "must be in [0, 1]");
    const int status = rules[rule].prepare(hp, scalars, &uses, err, &gradient);
    if (status != FO_OK) return status;
    if (batch->rounding != FO_ROUND_STOCHASTIC && batch->rounding != FO_ROUND_NEAREST) {
        *err = (fo_error){"rounding", "must be FO_ROUND_STOCHASTIC or FO_ROUND_NEAREST"};
        return FO_ERR_HYPERPARAM;
    }
    FO_REQUIRE(gradient.applied || gradient.grad_multiplier == 1.0, "grad_multiplier",
               "is not supported by this rule (its prepare part skips gradient_terms)");

    const int n_rule_bufs = 2 + rules[rule].info.n_state;
    const int factored = FO_IS_FACTORED(rule);
    /* a per-tensor pass's slot (each tensor's scalar), or a factored rule's (its tensors'
     * descriptions), after the rule's buffers */
    const int n_own = n_rule_bufs + (tensor_passes[rule].scalar != NULL || factored);
    const int has_ema = opt && opt->ema;
    if (has_ema && n_own >= FO_MAX_BUFFERS) return FO_ERR_RULE;
    const int n_bufs = n_own + has_ema; /* the EMA buffer after the rule's */
    const size_t count = batch->count;
    void *const *bufs[FO_MAX_BUFFERS] = {0};
    int used[FO_MAX_BUFFERS], n_used = 0; /* the buffers this call touches */
    for (int k = 0; k < n_rule_bufs; k++) {
        const int is_used = k < 2 || (uses >> (k - 2)) & 1u;
        bufs[k] = is_used ? batch->buffers[k] : NULL;
        if (is_used) used[n_used++] = k;
    }
    const int param_dtype = batch->dtype[0];
    fo_call call = {.scalars = scalars, .n_bufs = n_bufs, .rounding = batch->rounding,
                    .key = fo_absorb(batch->seed, batch->step), .index = batch->index,
                    .master = batch->master, .n_state = rules[rule].info.n_state};
    for (int i = 0; i < n_used; i++) {
        const int k = used[i], dtype = batch->dtype[k];
        if (!dtype_allowed(k, dtype, param_dtype)) return FO_ERR_DTYPE;
        call.dtype[k] = dtype;
        call.staged |= dtype == FO_BFLOAT16;
    }
    if (batch->master && param_dtype != FO_BFLOAT16) return FO_ERR_DTYPE;
    call.staged |= batch->master != NULL;
    if (has_ema) { /* the compute type or bfloat16, after the rule's buffers */
        bufs[n_own] = opt->ema;
        used[n_used++] = n_own;
        call.dtype[n_own] = opt->ema_bfloat16 ? FO_BFLOAT16 : compute_dtype(param_dtype);
        call.staged |= opt->ema_bfloat16 != 0;
        if (call.staged) { /* in each block of the rule's span (loops.inc) */
            call.ema_buffer = n_own;
            call.ema_decay = opt->ema_decay;
        }
    }
    /* a per-tensor pass's writes are the update's reads (each rounded once, in that pass) */
    call.read_only = tensor_passes[rule].writes;
    /* a row rule's state (one value per row) and a factored rule's (its factors, read by its
     * passes) are kept in the compute type; with other buffers staged, such a rule computes in
     * float (a row rule's rows go through staging rows of FO_ROW_STAGING elements) */
    const int row_rule = FO_IS_ROW_RULE(rule);
    for (int k = 2; (row_rule || factored) && k < n_rule_bufs; k++)
        if (bufs[k] && call.dtype[k] == FO_BFLOAT16) return FO_ERR_DTYPE;
    if (call.staged && (row_rule || factored) && param_dtype == FO_FLOAT64) return FO_ERR_DTYPE;
    if (count == 0) return FO_OK;
    if (!batch->n) return FO_ERR_NULL;
    for (int i = 0; i < n_used; i++)
        if (!bufs[used[i]]) return FO_ERR_NULL;

    int any_rows = 0, exact = 0;
    for (size_t t = 0; t < count; t++) {
        const size_t n = batch->n[t];
        if (n > SIZE_MAX / 8) return FO_ERR_OVERLAP; /* no two such buffers can be disjoint */
        const int has_rows = batch->rows && batch->rows[t].indices;
        /* sparse="exact" with a dense gradient: the tensor's rows one by one (rows.c) */
        const int dense_rows = batch->rows && !has_rows && batch->rows[t].last_step;
        /* rows of row_len elements: a row rule's state has n / row_len values */
        const size_t row_len = batch->rows ? batch->rows[t].row_len : 1;
        if (n && (dense_rows || row_rule) && (row_len == 0 || n % row_len)) return FO_ERR_INDEX;
        FO_REQUIRE(!(call.staged && row_rule && n && row_len > FO_ROW_STAGING), "rows",
                   "of a row rule hold at most " FO_STR(FO_ROW_STAGING) " elements with bfloat16 "
                   "storage or master weights (its staging rows)");
        const fo_rows *layout = batch->rows ? &batch->rows[t] : NULL;
        if (factored && factored_rules[rule].state_size(0, n, layout) == SIZE_MAX)
            return FO_ERR_INDEX;
        if (batch->rows && batch->rows[t].last_step && call.staged)
            return FO_ERR_DTYPE; /* sparse="exact" catches rows up in compute-type storage */
        any_rows |= has_rows || dense_rows;
        exact |= batch->rows && batch->rows[t].last_step != NULL;
        if (buffers_checked && !has_rows)
            continue;
        void *written[FO_MAX_BUFFERS + 1];
        size_t bytes[FO_MAX_BUFFERS + 1];
        int n_written = 0;
        for (int i = 0; i < n_used; i++) {
            const int k = used[i];
            if (k == 1) continue;
            const int is_state = k >= 2 && k < n_rule_bufs;
            /* (a tensor of no elements writes nothing, whatever its row length) */
            const size_t elements = !is_state ? n
                                    : row_rule ? (n ? n / row_len : 0)
                                    : factored ? factored_rules[rule].state_size(k - 2, n, layout)
                                               : n;
            if (factored && is_state && elements == 0) continue; /* unused by this tensor */
            bytes[n_written] = elements * dtype_size(call.dtype[k]);
            written[n_written++] = bufs[k][t];
        }
        if (batch->master) {
            bytes[n_written] = n * sizeof(float);
            written[n_written++] = batch->master[t];
        }
        const int tensor_status =
            has_rows ? fo_check_rows(&batch->rows[t], n, dtype_size(call.dtype[1]), bufs[1][t],
                                     written, bytes, n_written)
                     : check_tensor(bufs[1][t], n * dtype_size(batch->dtype[1]), written, bytes,
                                    n_written);
        if (tensor_status != FO_OK) return tensor_status;
    }
    fo_catchup catchup;
    if (exact) {
        FO_REQUIRE(n_bufs < FO_MAX_BUFFERS, "rows", "have no buffer slot left for sparse=\"exact\"");
        const int status = catchup_of(rule, hp, &catchup, err);
        if (status != FO_OK) return status;
        for (size_t t = 0; t < count; t++)
            FO_REQUIRE(!batch->rows[t].last_step || batch->rows[t].step >= 1, "step",
                       "must be >= 1 with last_step");
    }
    const int which = param_dtype == FO_FLOAT64 ? FO_F64 : FO_F32;
    const fo_span_fn rule_span = fo_active()->span[rule][which];
    call.to_nearest = active_to_nearest;
    call.random_bits = active_random_bits;
    const fo_ema_scalars ema = {rule_span, &call, n_own, has_ema ? opt->ema_decay : 0.0};
    const fo_call ema_call = {.scalars = &ema, .n_bufs = n_bufs};
    const int ema_span = has_ema && !call.ema_buffer; /* (a staged call's: in its blocks) */
    const fo_span_fn span = ema_span ? fo_active()->ema[which] : rule_span;
    const fo_call *span_call = ema_span ? &ema_call : &call;
    if (tensor_passes[rule].scalar || factored) {
        if (any_rows) { /* a norm over the touched rows is not the tensor's */
            err->field = "rows";
            err->requirement = "are not supported by this rule (its norms are per whole tensor)";
            return FO_ERR_RULE;
        }
        if (factored)
            return factored_rules[rule].run(scalars, count, bufs, n_bufs, batch->n, batch->rows,
                                            which, span, span_call);
        return run_with_tensor_pass(rule, which, count, bufs, n_rule_bufs, n_bufs, batch->n,
                                    &call, span, span_call, err);
    }
    if (row_rule) {
        /* every state buffer one value per row: a missed step must leave them as they are */
        for (int k = 2; exact && k < n_rule_bufs; k++)
            FO_REQUIRE(catchup.decay[k] == 1.0 && catchup.coupled != k, "rule",
                       "has no closed form for the steps a row missed (sparse=\"exact\")");
        unsigned per_row = 0;
        for (int k = 2; k < n_rule_bufs; k++) per_row |= 1u << k;
        fo_rows *flat = NULL; /* no rows given: rows of one element */
        if (!batch->rows) {
            flat = calloc(count, sizeof *flat);
            if (!flat) return FO_ERR_MEMORY;
            for (size_t t = 0; t < count; t++) flat[t].row_len = 1;
        }
        const int status = fo_run_row_rule(span, count, bufs, n_bufs, batch->n,
                                           flat ? flat : batch->rows, call.dtype, span_call,
                                           exact ? &catchup : NULL, per_row);
        free(flat);
        return status;
    }
    if (any_rows) /* the touched rows as the batch's tensors (rows.c) */
        return fo_run_rows(span, count, bufs, n_bufs, batch->n, batch->rows, call.dtype, span_call,
                           exact ? &catchup : NULL);
    fo_run(span, count, bufs, n_bufs, batch->n, span_call);
    return FO_OK;
}

/* ---- the reduction pass ------------------------------------------------------------------- */

int fo_norm(const fo_batch *batch, int buffer, double p, double *per_tensor, double *total,
            int *nonfinite, fo_error *err)
{
    fo_error ignored;
    if (!err) err = &ignored;
    *err = (fo_error){NULL, NULL};
    if (!batch || !total || !nonfinite) return FO_ERR_NULL;
    FO_REQUIRE(p >= 0.0, "p", "must be >= 0 (INFINITY: the max norm)"); /* NaN fails */
    if (buffer < 0 || buffer >= FO_MAX_BUFFERS) return FO_ERR_NULL;
    const int dtype = batch->dtype[buffer];
    if (dtype != FO_FLOAT32 && dtype != FO_FLOAT64 && dtype != FO_BFLOAT16) return FO_ERR_DTYPE;
    const size_t count = batch->count;
    void *const *data = batch->buffers[buffer];
    if (count && (!batch->n || !data)) return FO_ERR_NULL;
    size_t blocks = 0;
    for (size_t t = 0; t < count; t++) {
        if (buffer == 1 && batch->rows && batch->rows[t].indices) return FO_ERR_DTYPE; /* dense only */
        if (batch->n[t] && !data[t]) return FO_ERR_NULL;
        blocks += (batch->n[t] + FO_NORM_BLOCK - 1) / FO_NORM_BLOCK;
    }
    /* every check passed: only now are the outputs written (an error writes nothing) */
    if (count == 0) {
        *total = 0.0;
        *nonfinite = 0;
        return FO_OK;
    }
    const fo_norm_scalars s = {p == 2.0 ? FO_NORM_SQUARES : p == 1.0 ? FO_NORM_ABS
                               : isinf(p)  ? FO_NORM_MAX : p == 0.0 ? FO_NORM_NONZERO
                                           : FO_NORM_POWER, p};
    const fo_call call = {.scalars = &s, .n_bufs = 2};
    const fo_span_fn span = dtype == FO_BFLOAT16 ? fo_active()->norm_bf16
                            : fo_active()->norm[dtype == FO_FLOAT64 ? FO_F64 : FO_F32];
    const int is_max = s.kind == FO_NORM_MAX;
    const size_t elem_size = dtype_size(dtype);

    /* every block's (value, x - x sum), then combined in block order: the same order however
     * the blocks were shared out.  Without memory for them, the blocks run here, in order. */
    double *results = malloc(2 * blocks * sizeof(double) + count * sizeof(double *));
    double **out = results ? (double **)(results + 2 * blocks) : NULL;
    double one_block[2];
    if (results) {
        for (size_t t = 0, at = 0; t < count; at += (batch->n[t] + FO_NORM_BLOCK - 1) / FO_NORM_BLOCK, t++)
            out[t] = results + 2 * at;
        void *const *const bufs[2] = {data, (void *const *)out};
        fo_run_blocks(span, count, bufs, 2, batch->n, &call, FO_NORM_BLOCK);
    }
    double sum = 0.0, bad = 0.0;
    for (size_t t = 0; t < count; t++) {
        double tensor = 0.0;
        for (size_t at = 0, k = 0; at < batch->n[t]; at += FO_NORM_BLOCK, k++) {
            const double *r = results ? out[t] + 2 * k : one_block;
            if (!results) {
                void *const b[2] = {(char *)data[t] + at * elem_size, one_block};
                span(&call, b, t, 0, batch->n[t] - at < FO_NORM_BLOCK ? batch->n[t] - at : FO_NORM_BLOCK);
            }
            tensor = !is_max ? tensor + r[0] : (r[0] > tensor || r[0] != r[0]) && tensor == tensor ? r[0] : tensor;
            bad += r[1];
        }
        if (per_tensor) per_tensor[t] = tensor;
        sum = !is_max ? sum + tensor : (tensor > sum || tensor != tensor) && sum == sum ? tensor : sum;
    }
    free(results);
    *total = sum;
    *nonfinite = bad != bad;
    return FO_OK;
}

int fo_scale(const fo_batch *batch, int buffer, double factor)
{
    if (!batch) return FO_ERR_NULL;
    if (buffer < 0 || buffer >= FO_MAX_BUFFERS) return FO_ERR_NULL;
    const int dtype = batch->dtype[buffer];
    if (dtype != FO_FLOAT32 && dtype != FO_FLOAT64) return FO_ERR_DTYPE;
    if (batch->count == 0) return FO_OK;
    if (!batch->n || !batch->buffers[buffer]) return FO_ERR_NULL;
    for (size_t t = 0; t < batch->count; t++) {
        if (buffer == 1 && batch->rows && batch->rows[t].indices) return FO_ERR_DTYPE; /* dense only */
        if (batch->n[t] && !batch->buffers[buffer][t]) return FO_ERR_NULL;
    }
    void *const *const bufs[1] = {batch->buffers[buffer]};
    const fo_call call = {.scalars = &factor, .n_bufs = 1};
    fo_run(fo_active()->scale[dtype == FO_FLOAT64 ? FO_F64 : FO_F32], batch->count, bufs, 1,
           batch->n, &call);
    return FO_OK;
}

/* ---- the typed entry points, from FO_RULES -------------------------------------------------- */

static int typed_step(int rule, int dtype, size_t count, void *const *const *bufs, int n_bufs,
                      const size_t *n, const void *hp)
{
    fo_batch batch = {.count = count, .n = n};
    for (int k = 0; k < n_bufs; k++) {
        batch.buffers[k] = bufs[k];
        batch.dtype[k] = dtype;
    }
    return fo_step(rule, &batch, hp, NULL);
}

/* a single tensor: buffer k is the one-element table holding its pointer */
#define FO_ONE_BUF(name) (void *const *)&name,
#define FO_MANY_BUF(name) (void *const *)name,
#define FO_TYPED_FOR(rule, T, sfx, dtype, ...)                                                 \
    FO_TYPED_SIGNATURE_ONE(rule, T, sfx, __VA_ARGS__)                                          \
    {                                                                                          \
        void *const *const b[] = {(void *const *)&param, (void *const *)&grad,                 \
                                  FO_MAP(FO_ONE_BUF, __VA_ARGS__)};                            \
        return typed_step(FO_RULE_##rule, dtype, 1, b, FO_COUNT(b), &n, hp);                   \
    }                                                                                          \
    FO_TYPED_SIGNATURE_MANY(rule, T, sfx, __VA_ARGS__)                                         \
    {                                                                                          \
        if (count && (!param || !grad)) return FO_ERR_NULL;                                    \
        void *const *const b[] = {(void *const *)param, (void *const *)grad,                   \
                                  FO_MAP(FO_MANY_BUF, __VA_ARGS__)};                           \
        return typed_step(FO_RULE_##rule, dtype, count, b, FO_COUNT(b), n, hp);                \
    }
#define FO_TYPED_DEFINITIONS(rule, ...)                                                        \
    FO_TYPED_FOR(rule, float, f32, FO_FLOAT32, __VA_ARGS__)                                    \
    FO_TYPED_FOR(rule, double, f64, FO_FLOAT64, __VA_ARGS__)
FO_RULES(FO_TYPED_DEFINITIONS)

/* ---- the bandwidth ceiling ------------------------------------------------------------------ */

/* The memory traffic of a rule with two state buffers (read 4 streams, write 3) with trivial
 * arithmetic: what the benchmark compares every rule with, through the same threads. */
static void stream_span(const fo_call *unused, void *const *b, size_t t, size_t at, size_t n)
{
    (void)unused;
    (void)t;
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
    const fo_call call = {.n_bufs = 4};
    fo_run(stream_span, 1, bufs, 4, &n, &call);
}
