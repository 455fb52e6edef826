/*
 * The C kernels' own tests: every rule x dtype over sizes 0..3001 and unaligned pointers, the
 * many-tensor entry points against the single ones, thread counts, and every error status.
 * Buffers are allocated at their exact size, so under -fsanitize=address any read or write past
 * an end is reported.  Built and run by tests/test_embedding.py (plain and sanitized).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fastopt.h"

static int passed, failed;
#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (cond) passed++;                                                                    \
        else {                                                                                 \
            failed++;                                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                               \
            fprintf(stderr, __VA_ARGS__);                                                      \
            fputc('\n', stderr);                                                               \
        }                                                                                      \
    } while (0)

/* the header's rule ids (FO_RULES); a rule without a case below fails test_rule_table */
enum {
    SGD = FO_RULE_sgd, ADAGRAD = FO_RULE_adagrad, ADADELTA = FO_RULE_adadelta,
    RMSPROP = FO_RULE_rmsprop, ADAM = FO_RULE_adam, ADAMAX = FO_RULE_adamax, NADAM = FO_RULE_nadam,
    LION = FO_RULE_lion, RADAM = FO_RULE_radam, RPROP = FO_RULE_rprop, ASGD = FO_RULE_asgd,
    LAMB = FO_RULE_lamb, LARS = FO_RULE_lars, ROWWISE = FO_RULE_rowwise_adagrad,
    ADAFACTOR = FO_RULE_adafactor, N_RULES = FO_N_RULES
};
#define RULE_NAMES(rule) (fo_describe(rule)->name)
enum { N_BUFS = 5 }; /* param, grad, up to three state buffers */
#define RPROP_LR 0.01 /* Rprop's step_size buffer starts at lr */

static unsigned long lcg = 1;
static double uniform(void)
{
    lcg = lcg * 6364136223846793005UL + 1442695040888963407UL;
    return (double)(lcg >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

/* Every option that changes a loop is on: nesterov, centered + momentum, amsgrad, decoupled. */
static fo_sgd_params sgd_hp(int64_t t) { return (fo_sgd_params){.lr = 0.1, .momentum = 0.9, .nesterov = 1, .weight_decay = 0.01, .step = t}; }
static fo_adagrad_params adagrad_hp(void) { return (fo_adagrad_params){.lr = 0.1, .eps = 1e-8}; }
static fo_adadelta_params adadelta_hp(void) { return (fo_adadelta_params){.lr = 1.0, .rho = 0.9, .eps = 1e-6}; }
static fo_rmsprop_params rmsprop_hp(void) { return (fo_rmsprop_params){.lr = 0.01, .rho = 0.9, .eps = 1e-8, .momentum = 0.5, .centered = 1}; }
static fo_adam_params adam_hp(int64_t t) { return (fo_adam_params){.lr = 0.01, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.1, .amsgrad = 1, .decoupled_weight_decay = 1, .step = t}; }
static fo_adamax_params adamax_hp(int64_t t) { return (fo_adamax_params){.lr = 0.01, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .step = t}; }
static fo_nadam_params nadam_hp(int64_t t) { return (fo_nadam_params){.lr = 0.01, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .maximize = 1, .step = t}; }
static fo_lion_params lion_hp(void) { return (fo_lion_params){.lr = 0.01, .beta1 = 0.9, .beta2 = 0.99, .weight_decay = 0.1}; }
/* beta2 = 0.5: rho_t > 5 from step 1, the rectified branch */
static fo_radam_params radam_hp(int64_t t) { return (fo_radam_params){.lr = 0.01, .beta1 = 0.9, .beta2 = 0.5, .eps = 1e-8, .weight_decay = 0.1, .decoupled_weight_decay = 1, .step = t}; }
static fo_rprop_params rprop_hp(void) { return (fo_rprop_params){.lr = RPROP_LR, .eta_minus = 0.5, .eta_plus = 1.2, .step_size_min = 1e-6, .step_size_max = 50}; }
/* t0 = 0: mu is 1 on steps 1 and 2 (ax copied), 1/2 on step 3 (averaged) */
static fo_lamb_params lamb_hp(int64_t t) { return (fo_lamb_params){.lr = 0.01, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-6, .weight_decay = 0.1, .step = t}; }
static fo_lars_params lars_hp(void) { return (fo_lars_params){.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .trust_coefficient = 0.01}; }
/* without rows: rows of one element (fastopt.h, row rules) */
static fo_rowwise_adagrad_params rowwise_hp(void) { return (fo_rowwise_adagrad_params){.lr = 0.1, .eps = 1e-8, .weight_decay = 0.01}; }
static fo_adafactor_params adafactor_hp(int64_t t) { return (fo_adafactor_params){.lr = 0.01, .beta2_decay = -0.8, .eps1 = -1.0, .eps2 = 1e-3, .d = 1.0, .weight_decay = 0.1, .step = t}; }
static fo_asgd_params asgd_hp(int64_t t) { return (fo_asgd_params){.lr = 0.01, .lambd = 1e-4, .alpha = 0.75, .t0 = 0, .weight_decay = 0.01, .step = t}; }

#define T float
#define SFX f32
#include "test_kernels.inc"
#undef T
#undef SFX
#define T double
#define SFX f64
#include "test_kernels.inc"
#undef T
#undef SFX

#include "test_bf16.inc"

static void test_errors(void)
{
    float p[8] = {1, 2, 3, 4, 5, 6, 7, 8}, g[8] = {1, 1, 1, 1, 1, 1, 1, 1}, m[8] = {0}, v[8] = {0};
    float before[8];
    memcpy(before, p, sizeof p);
    fo_adam_params hp = adam_hp(1);
    hp.amsgrad = 0;
    CHECK(fo_adam_f32(p, g, m, v, NULL, 8, NULL) == FO_ERR_NULL, "NULL hp");
    CHECK(fo_adam_f32(NULL, g, m, v, NULL, 8, &hp) == FO_ERR_NULL, "NULL param");
    CHECK(fo_adam_f32(p, NULL, m, v, NULL, 8, &hp) == FO_ERR_NULL, "NULL grad");
    CHECK(fo_adam_f32(p, g, NULL, v, NULL, 8, &hp) == FO_ERR_NULL, "NULL m");
    CHECK(fo_adam_f32(NULL, NULL, NULL, NULL, NULL, 0, &hp) == FO_OK, "NULL with n == 0");
    hp.amsgrad = 1;
    CHECK(fo_adam_f32(p, g, m, v, NULL, 8, &hp) == FO_ERR_NULL, "amsgrad without max_v");
    hp.amsgrad = 0;
    CHECK(fo_adam_f32(p, p, m, v, NULL, 8, &hp) == FO_ERR_OVERLAP, "grad is param");
    CHECK(fo_adam_f32(p, g, m, m, NULL, 8, &hp) == FO_ERR_OVERLAP, "m is v");
    CHECK(fo_adam_f32(p + 1, g, p, v, NULL, 7, &hp) == FO_ERR_OVERLAP, "partial overlap");
    CHECK(fo_adam_f32(p, g, m, v, v, 8, &hp) == FO_OK, "an unused max_v may alias anything");
    memcpy(p, before, sizeof p);
    memset(m, 0, sizeof m);
    memset(v, 0, sizeof v);
    const double bad[][2] = {{-1.0, 0}, {NAN, 0}, {INFINITY, 0}};
    for (int k = 0; k < 3; k++) {
        hp = adam_hp(1);
        hp.lr = bad[k][0];
        CHECK(fo_adam_f32(p, g, m, v, m + 0, 8, &hp) != FO_OK, "bad lr %g", bad[k][0]);
    }
    hp = adam_hp(1);
    hp.beta1 = 1.0;
    CHECK(fo_adam_f32(p, g, m, v, NULL, 8, &hp) == FO_ERR_HYPERPARAM, "beta1 = 1");
    hp = adam_hp(0);
    CHECK(fo_adam_f32(p, g, m, v, NULL, 8, &hp) == FO_ERR_HYPERPARAM, "step 0");
    hp = adam_hp(1);
    hp.convention = 7;
    CHECK(fo_adam_f32(p, g, m, v, NULL, 8, &hp) == FO_ERR_HYPERPARAM, "unknown convention");
    fo_sgd_params s = sgd_hp(1);
    s.momentum = 0.0;
    CHECK(fo_sgd_f32(p, g, NULL, 8, &s) == FO_ERR_HYPERPARAM, "nesterov without momentum");
    fo_rmsprop_params r = rmsprop_hp();
    r.rho = 1.0;
    CHECK(fo_rmsprop_f32(p, g, m, v, NULL, 8, &r) == FO_ERR_HYPERPARAM, "rho = 1");
    CHECK(memcmp(p, before, sizeof p) == 0, "a failed call wrote a parameter");
    for (int i = 0; i < 8; i++) CHECK(m[i] == 0 && v[i] == 0, "a failed call wrote state");
    CHECK(fo_set_num_threads(0) == FO_ERR_HYPERPARAM, "0 threads");
    CHECK(strcmp(fo_strerror(FO_ERR_OVERLAP), fo_strerror(FO_OK)) != 0, "strerror");
    printf("isa %s, %d threads\n", fo_isa(), fo_get_num_threads());
}

/* The generic entry: the rule table, errors that name the field, storage types, rule ids. */
static void test_generic(void)
{
    CHECK(15 == N_RULES, "every rule of FO_RULES has a case here (%d rules)", (int)N_RULES);
    for (int rule = 0; rule < N_RULES; rule++) {
        const fo_rule_info *info = fo_describe(rule);
        CHECK(info && info->n_state >= 1 && info->n_fields >= 3, "fo_describe(%d)", rule);
    }
    CHECK(fo_describe(N_RULES) == NULL && fo_describe(-1) == NULL, "fo_describe out of range");
    fo_adam_params hp = adam_hp(1);
    fo_error err;
    unsigned uses = 0;
    CHECK(fo_check(FO_RULE_adam, &hp, &uses, &err) == FO_OK && uses == 7u, "adam uses m, v, max_v");
    hp.beta2 = 1.5;
    CHECK(fo_check(FO_RULE_adam, &hp, &uses, &err) == FO_ERR_HYPERPARAM &&
              strcmp(err.field, "beta2") == 0 && strstr(err.requirement, "[0, 1)"),
          "fo_check names beta2");
    hp.beta2 = 0.999;
    float p[4] = {1, 2, 3, 4}, g[4] = {1, 1, 1, 1}, m[4] = {0}, v[4] = {0}, vmax[4] = {0};
    float *pp = p, *mp = m, *vp = v, *vmaxp = vmax;
    const float *gp = g;
    size_t n = 4;
    fo_batch batch = {1, &n, {(void *const *)&pp, (void *const *)&gp, (void *const *)&mp,
                              (void *const *)&vp, (void *const *)&vmaxp}, {0}};
    batch.dtype[3] = FO_FLOAT64;
    CHECK(fo_step(FO_RULE_adam, &batch, &hp, &err) == FO_ERR_DTYPE, "mixed storage types refused");
    CHECK(p[0] == 1 && m[0] == 0, "a refused call wrote nothing");
    batch.dtype[3] = FO_FLOAT32;
    CHECK(fo_step(FO_N_RULES, &batch, &hp, &err) == FO_ERR_RULE, "unknown rule");
    CHECK(fo_step(FO_RULE_adam, &batch, &hp, &err) == FO_OK && p[0] < 1, "fo_step steps");
}

/* The step's options: the reduction pass (fo_norm: thread counts, per tensor, inf/NaN, norm
 * types), the gradient multiplier every rule folds in, the EMA, and their refusals. */
/* A row rule with rows of several elements (fastopt.h, row rules): its state one value per row,
 * against the formula in double; refusals. */
static void test_row_rule(void)
{
    enum { ROWS = 5, LEN = 7, N = ROWS * LEN };
    /* param, grad and sum in one allocation, the sum right after the grad: disjoint */
    float *mem = malloc((2 * N + ROWS) * sizeof(float));
    float *p = mem, *g = mem + N, *sum = mem + 2 * N;
    double ref[N], G[ROWS] = {0};
    lcg = 11;
    for (int i = 0; i < N; i++) ref[i] = p[i] = (float)uniform();
    for (int r = 0; r < ROWS; r++) sum[r] = 0;
    const fo_rowwise_adagrad_params hp = rowwise_hp();
    fo_rows rows = {.row_len = LEN};
    size_t n = N;
    void *bp = p, *bg = g, *bs = sum;
    fo_batch batch = {.count = 1, .n = &n, .buffers = {&bp, &bg, &bs}, .rows = &rows};
    for (int step = 0; step < 3; step++) {
        for (int i = 0; i < N; i++) g[i] = (float)uniform();
        CHECK(fo_step(FO_RULE_rowwise_adagrad, &batch, &hp, NULL) == FO_OK, "row rule status");
        for (int r = 0; r < ROWS; r++) {
            double squares = 0;
            for (int e = 0; e < LEN; e++) {
                const double x = g[r * LEN + e] + hp.weight_decay * ref[r * LEN + e];
                squares += x * x;
            }
            G[r] += squares / LEN;
            for (int e = 0; e < LEN; e++) {
                const double x = g[r * LEN + e] + hp.weight_decay * ref[r * LEN + e];
                ref[r * LEN + e] -= hp.lr * x / (sqrt(G[r]) + hp.eps);
            }
        }
    }
    double worst = 0;
    for (int i = 0; i < N; i++) worst = fmax(worst, fabs(p[i] - ref[i]));
    for (int r = 0; r < ROWS; r++) worst = fmax(worst, fabs(sum[r] - G[r]) / G[r]);
    CHECK(worst < 1e-5, "row rule vs the formula: %g", worst);
    float before[N];
    memcpy(before, p, sizeof before);
    rows.row_len = 6; /* does not divide 35 */
    CHECK(fo_step(FO_RULE_rowwise_adagrad, &batch, &hp, NULL) == FO_ERR_INDEX, "row_len 6 of 35");
    rows.row_len = LEN;
    bs = g + N - 2; /* the sum overlapping the grad's last elements */
    CHECK(fo_step(FO_RULE_rowwise_adagrad, &batch, &hp, NULL) == FO_ERR_OVERLAP, "sum on grad");
    bs = sum;
    batch.dtype[2] = FO_BFLOAT16;
    CHECK(fo_step(FO_RULE_rowwise_adagrad, &batch, &hp, NULL) == FO_ERR_DTYPE, "bfloat16 sum");
    CHECK(memcmp(before, p, sizeof before) == 0, "a refused row rule call wrote");
    CHECK(fo_describe(FO_RULE_rowwise_adagrad)->per_row == 1 && fo_describe(FO_RULE_adagrad)->per_row == 0,
          "fo_rule_info.per_row");
    free(mem);
}

/* A factored rule (fastopt.h, Adafactor): matrices given by fo_rows, against the formula in
 * double; one tile and many (a split matrix), the same bits for 1 and 3 threads; refusals. */
static void factored_reference(double *p, const float *g, double *R, double *C, size_t B,
                               size_t r, size_t c, const fo_adafactor_params *hp)
{
    const size_t n = B * r * c;
    const double eps1 = 1.1920928955078125e-07, t = (double)hp->step, w = pow(t, hp->beta2_decay);
    const double rho = fmin(hp->lr, 1.0 / sqrt(t));
    double pp = 0, uu = 0;
    for (size_t i = 0; i < n; i++) pp += p[i] * p[i];
    const double alpha = fmax(hp->eps2, sqrt(pp / (double)n)) * rho;
    double *u = malloc(n * sizeof(double));
    for (size_t m = 0; m < B; m++) {
        double mean = 0;
        for (size_t i = 0; i < r; i++) {
            double s = 0;
            for (size_t j = 0; j < c; j++) s += (double)g[(m * r + i) * c + j] * g[(m * r + i) * c + j];
            R[m * r + i] += w * (s / (double)c - R[m * r + i]);
            mean += R[m * r + i] / (double)r;
        }
        for (size_t j = 0; j < c; j++) {
            double s = 0;
            for (size_t i = 0; i < r; i++) s += (double)g[(m * r + i) * c + j] * g[(m * r + i) * c + j];
            C[m * c + j] += w * (s / (double)r - C[m * c + j]);
        }
        for (size_t i = 0; i < r; i++)
            for (size_t j = 0; j < c; j++) {
                const size_t e = (m * r + i) * c + j;
                const double v = R[m * r + i] * C[m * c + j] / fmax(mean, eps1);
                u[e] = g[e] / sqrt(fmax(v, eps1 * eps1));
                uu += u[e] * u[e];
            }
    }
    const double denom = fmax(1.0, sqrt(uu / (double)n) / hp->d);
    for (size_t i = 0; i < n; i++) p[i] = p[i] * (1 - hp->lr * hp->weight_decay) - alpha / denom * u[i];
    free(u);
}

static void test_factored(void)
{
    /* 3 matrices of 4 x 5 (tiles of whole matrices), 300 x 5000 (split into tiles) */
    static const size_t shapes[][3] = {{3, 4, 5}, {1, 300, 5000}};
    for (int k = 0; k < 2; k++) {
        const size_t B = shapes[k][0], r = shapes[k][1], c = shapes[k][2], n = B * r * c;
        float *p = malloc(n * sizeof(float)), *g = malloc(n * sizeof(float));
        float *R = calloc(B * r, sizeof(float)), *C = calloc(B * c, sizeof(float));
        double *ref = malloc(n * sizeof(double)), *Rd = calloc(B * r, sizeof(double));
        double *Cd = calloc(B * c, sizeof(double));
        lcg = 5;
        for (size_t i = 0; i < n; i++) ref[i] = p[i] = (float)uniform();
        fo_rows rows = {.row_len = c, .matrix_rows = r};
        size_t count_n = n;
        void *bp = p, *bg = g, *br = R, *bc = C, *bv = NULL;
        fo_batch batch = {.count = 1, .n = &count_n, .buffers = {&bp, &bg, &br, &bc, &bv}, .rows = &rows};
        float *first = NULL;
        for (int64_t t = 1; t <= 3; t++) {
            for (size_t i = 0; i < n; i++) g[i] = (float)uniform();
            const fo_adafactor_params hp = adafactor_hp(t);
            factored_reference(ref, g, Rd, Cd, B, r, c, &hp);
            fo_set_num_threads(t == 3 ? 3 : 1);
            if (t == 3) { /* the last step on one thread first, from a copy, then on three */
                first = malloc(n * sizeof(float));
                float *R1 = malloc(B * r * sizeof(float)), *C1 = malloc(B * c * sizeof(float));
                memcpy(first, p, n * sizeof(float));
                memcpy(R1, R, B * r * sizeof(float));
                memcpy(C1, C, B * c * sizeof(float));
                void *fp = first, *fr = R1, *fc = C1;
                fo_batch one = batch;
                one.buffers[0] = (void *const *)&fp;
                one.buffers[2] = (void *const *)&fr;
                one.buffers[3] = (void *const *)&fc;
                fo_set_num_threads(1);
                CHECK(fo_step(FO_RULE_adafactor, &one, &hp, NULL) == FO_OK, "factored, 1 thread");
                fo_set_num_threads(3);
                free(R1);
                free(C1);
            }
            CHECK(fo_step(FO_RULE_adafactor, &batch, &hp, NULL) == FO_OK, "factored status");
        }
        fo_set_num_threads(2);
        CHECK(memcmp(first, p, n * sizeof(float)) == 0, "factored %zux%zu: 1 thread == 3 threads", r, c);
        double worst = 0;
        for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs(p[i] - ref[i]));
        for (size_t i = 0; i < B * r; i++) worst = fmax(worst, fabs(R[i] - Rd[i]) / Rd[i]);
        for (size_t j = 0; j < B * c; j++) worst = fmax(worst, fabs(C[j] - Cd[j]) / Cd[j]);
        CHECK(worst < 2e-5, "factored %zux%zu vs the formula: %g", r, c, worst);
        float *before = malloc(n * sizeof(float));
        memcpy(before, p, n * sizeof(float));
        const fo_adafactor_params hp = adafactor_hp(4);
        rows.matrix_rows = r + 1; /* matrices that do not tile the tensor */
        CHECK(fo_step(FO_RULE_adafactor, &batch, &hp, NULL) == FO_ERR_INDEX, "factored: bad layout");
        rows.matrix_rows = r;
        bc = NULL;
        CHECK(fo_step(FO_RULE_adafactor, &batch, &hp, NULL) == FO_ERR_NULL, "factored: no col_var");
        bc = g;
        CHECK(fo_step(FO_RULE_adafactor, &batch, &hp, NULL) == FO_ERR_OVERLAP, "col_var on grad");
        bc = C;
        batch.dtype[2] = FO_BFLOAT16;
        CHECK(fo_step(FO_RULE_adafactor, &batch, &hp, NULL) == FO_ERR_DTYPE, "bfloat16 row_var");
        CHECK(memcmp(before, p, n * sizeof(float)) == 0, "a refused factored call wrote");
        free(before);
        free(first);
        free(p), free(g), free(R), free(C), free(ref), free(Rd), free(Cd);
    }
    CHECK(fo_describe(FO_RULE_adafactor)->factored == 1 && fo_describe(FO_RULE_adam)->factored == 0,
          "fo_rule_info.factored");
}

static void test_step_options(void)
{
    enum { A = 5000, B = 150001, C = 3 };
    static float a[A], b[B], c[C];
    for (int i = 0; i < A; i++) a[i] = (float)uniform();
    for (int i = 0; i < B; i++) b[i] = (float)uniform();
    for (int i = 0; i < C; i++) c[i] = (float)uniform();
    float *data[3] = {a, b, c};
    size_t n[3] = {A, B, C};
    fo_batch batch = {3, n, {NULL, (void *const *)data}, {FO_FLOAT32, FO_FLOAT32}};
    double expected[3] = {0, 0, 0};
    for (int t = 0; t < 3; t++)
        for (size_t i = 0; i < n[t]; i++) expected[t] += (double)data[t][i] * (double)data[t][i];
    double first = 0, per[3];
    int nonfinite = 1;
    const int before = fo_get_num_threads(), threads[] = {1, 2, 8};
    for (int k = 0; k < 3; k++) {
        fo_set_num_threads(threads[k]);
        double total = -1;
        CHECK(fo_norm(&batch, 1, 2.0, per, &total, &nonfinite, NULL) == FO_OK && !nonfinite, "fo_norm");
        if (k == 0) first = total;
        CHECK(total == first, "the total is the same for %d threads", threads[k]);
        for (int t = 0; t < 3; t++)
            CHECK(fabs(per[t] - expected[t]) <= 1e-12 * expected[t], "tensor %d's sum of squares", t);
    }
    fo_set_num_threads(before);
    double total, max_abs = 0;
    for (size_t i = 0; i < B; i++) max_abs = fabs(b[i]) > max_abs ? fabs(b[i]) : max_abs;
    CHECK(fo_norm(&batch, 1, INFINITY, per, &total, &nonfinite, NULL) == FO_OK && per[1] == max_abs,
          "the max norm");
    b[777] = NAN;
    CHECK(fo_norm(&batch, 1, 2.0, NULL, &total, &nonfinite, NULL) == FO_OK && nonfinite, "NaN found");
    CHECK(fo_norm(&batch, 1, INFINITY, NULL, &total, &nonfinite, NULL) == FO_OK && nonfinite &&
              isnan(total), "NaN in the max");
    b[777] = INFINITY;
    CHECK(fo_norm(&batch, 1, 1.0, NULL, &total, &nonfinite, NULL) == FO_OK && nonfinite &&
              isinf(total), "inf found");
    fo_error err;
    CHECK(fo_norm(&batch, 1, -1.0, NULL, &total, &nonfinite, &err) == FO_ERR_HYPERPARAM &&
              strcmp(err.field, "p") == 0, "a negative p is refused");

    /* the multiplier: every rule's step with it equals the step on pre-multiplied gradients */
    double p1[4] = {1, 2, 3, 4}, p2[4] = {1, 2, 3, 4}, g[4] = {0.5, -1, 2, 0.25}, g2[4];
    double m1[4] = {0}, v1[4] = {0}, m2[4] = {0}, v2[4] = {0}, ema[4] = {1, 2, 3, 4};
    for (int i = 0; i < 4; i++) g2[i] = 0.25 * g[i];
    fo_adam_params hp = adam_hp(1);
    hp.amsgrad = 0;
    CHECK(fo_adam_f64(p2, g2, m2, v2, NULL, 4, &hp) == FO_OK, "adam");
    double *pp = p1, *mp = m1, *vp = v1, *ep = ema;
    const double *gp = g;
    size_t four = 4;
    fo_batch one = {1, &four, {(void *const *)&pp, (void *const *)&gp, (void *const *)&mp,
                               (void *const *)&vp}, {FO_FLOAT64, FO_FLOAT64, FO_FLOAT64, FO_FLOAT64}};
    fo_step_options opt = {0.25, (void *const *)&ep, 0.9};
    CHECK(fo_step_with(FO_RULE_adam, &one, &hp, &opt, NULL) == FO_OK, "fo_step_with");
    CHECK(memcmp(p1, p2, sizeof p1) == 0 && memcmp(m1, m2, sizeof m1) == 0, "multiplier folded in");
    for (int i = 0; i < 4; i++)
        CHECK(ema[i] == 0.9 * (i + 1.0) + (1.0 - 0.9) * p1[i], "ema %d", i);
    opt.grad_multiplier = NAN;
    CHECK(fo_step_with(FO_RULE_adam, &one, &hp, &opt, &err) == FO_ERR_HYPERPARAM &&
              strcmp(err.field, "grad_multiplier") == 0, "a NaN multiplier is refused");
    opt.grad_multiplier = 1.0;
    opt.ema_decay = 1.5;
    CHECK(fo_step_with(FO_RULE_adam, &one, &hp, &opt, &err) == FO_ERR_HYPERPARAM &&
              strcmp(err.field, "ema_decay") == 0, "an ema_decay above 1 is refused");
    CHECK(memcmp(p1, p2, sizeof p1) == 0, "a refused call wrote nothing");
}

/* fo_norm's errors write none of its outputs (it zeroed *total and *nonfinite before its
 * NULL checks); fo_scale's contract (fastopt.h): any factor, as IEEE multiplication gives it. */
static void test_norm_and_scale_contracts(void)
{
    float x[3] = {1, -2, 4};
    float *xp = x;
    size_t three = 3;
    const fo_batch batch = {1, &three, {NULL, (void *const *)&xp}, {FO_FLOAT32, FO_FLOAT32}};
    fo_rows rows = {.row_len = 1};
    const int64_t idx[1] = {0};
    rows.indices = idx;
    rows.index_type = FO_INT64;
    rows.nnz = 1;
    struct { const char *what; fo_batch b; int buffer; double p; int status; } refused[] = {
        {"n NULL", batch, 1, 2.0, FO_ERR_NULL}, {"buffer table NULL", batch, 1, 2.0, FO_ERR_NULL},
        {"tensor pointer NULL", batch, 1, 2.0, FO_ERR_NULL}, {"p NaN", batch, 1, NAN, FO_ERR_HYPERPARAM},
        {"buffer 9", batch, 9, 2.0, FO_ERR_NULL}, {"rows", batch, 1, 2.0, FO_ERR_DTYPE}};
    const void *none = NULL;
    refused[0].b.n = NULL;
    refused[1].b.buffers[1] = NULL;
    refused[2].b.buffers[1] = (void *const *)&none;
    refused[5].b.rows = &rows;
    for (size_t k = 0; k < sizeof refused / sizeof *refused; k++) {
        double total = -7, per[1] = {-7};
        int nonfinite = -7;
        CHECK(fo_norm(&refused[k].b, refused[k].buffer, refused[k].p, per, &total, &nonfinite,
                      NULL) == refused[k].status, "fo_norm, %s: status", refused[k].what);
        CHECK(total == -7 && nonfinite == -7 && per[0] == -7, "fo_norm, %s: nothing written",
              refused[k].what);
        if (refused[k].status != FO_ERR_HYPERPARAM) /* (fo_scale has no p) */
            CHECK(fo_scale(&refused[k].b, refused[k].buffer, 2.0) == refused[k].status &&
                      x[0] == 1 && x[1] == -2 && x[2] == 4, "fo_scale, %s: nothing written",
                  refused[k].what);
    }
    /* bfloat16 gradients: fo_norm reads them (the sums of a float32 copy); fo_scale refuses */
    uint16_t h[3] = {0x3f80, 0xc000, 0x4080}; /* 1, -2, 4 */
    uint16_t *hp = h;
    fo_batch bf = batch;
    bf.buffers[1] = (void *const *)&hp;
    bf.dtype[1] = FO_BFLOAT16;
    double per32[1], per16[1], total32, total16;
    int nonfinite32, nonfinite16;
    CHECK(fo_norm(&batch, 1, 2.0, per32, &total32, &nonfinite32, NULL) == FO_OK &&
              fo_norm(&bf, 1, 2.0, per16, &total16, &nonfinite16, NULL) == FO_OK &&
              total16 == 21.0 && total32 == 21.0 && per16[0] == 21.0 && !nonfinite16,
          "fo_norm of bfloat16: the float32 copy's sum of squares");
    CHECK(fo_scale(&bf, 1, 2.0) == FO_ERR_DTYPE && h[0] == 0x3f80 && h[1] == 0xc000 &&
              h[2] == 0x4080, "fo_scale of bfloat16: refused, nothing written");
    double total = -7;
    int nonfinite = -7;
    const fo_batch empty = {0};
    CHECK(fo_norm(&empty, 1, 2.0, NULL, &total, &nonfinite, NULL) == FO_OK && total == 0 &&
              nonfinite == 0, "fo_norm of no tensors: 0, finite");
    CHECK(fo_scale(&batch, 1, -2.0) == FO_OK && x[0] == -2 && x[1] == 4 && x[2] == -8,
          "a negative factor flips signs");
    CHECK(fo_scale(&batch, 1, 1e300) == FO_OK && isinf(x[0]) && x[0] < 0 && x[1] > 0,
          "a factor past float's range rounds to inf");
    CHECK(fo_scale(&batch, 1, 0.0) == FO_OK && isnan(x[0]) && isnan(x[1]), "inf * 0 is NaN");
    x[0] = 1, x[1] = -2, x[2] = 4;
    CHECK(fo_scale(&batch, 1, NAN) == FO_OK && isnan(x[0]) && isnan(x[1]) && isnan(x[2]),
          "a NaN factor makes every element NaN (torch's clip with a NaN norm)");
    x[0] = 1, x[1] = -2, x[2] = 4;
    CHECK(fo_scale(&batch, 1, INFINITY) == FO_OK && x[0] == INFINITY && x[1] == -INFINITY,
          "an infinite factor");
}

/* Sparse rows (fo_batch.rows): the touched rows step exactly as a dense call over each row
 * with its summed gradient; bad indices refused with nothing written; any thread count and
 * either index type give the same bits. */
static void rows_case(int threads, int wide, size_t n_rows, size_t row_len, size_t nnz,
                      float *p, float *m, float *v, const int64_t *idx64, const float *values)
{
    int32_t *idx32 = malloc(nnz * sizeof *idx32);
    for (size_t j = 0; j < nnz; j++) idx32[j] = (int32_t)idx64[j];
    const size_t n = n_rows * row_len;
    const float *gp = values;
    float *pp = p, *mp = m, *vp = v, *none = NULL;
    fo_rows rows = {wide ? (const void *)idx64 : (const void *)idx32, wide ? FO_INT64 : FO_INT32,
                    nnz, row_len};
    fo_batch batch = {1, &n, {(void *const *)&pp, (void *const *)&gp, (void *const *)&mp,
                              (void *const *)&vp, (void *const *)&none}, {0}, &rows};
    fo_adam_params hp = adam_hp(3);
    hp.amsgrad = 0;
    fo_set_num_threads(threads);
    CHECK(fo_step(FO_RULE_adam, &batch, &hp, NULL) == FO_OK, "rows step");
    free(idx32);
}

static void test_rows(void)
{
    enum { ROWS = 6, LEN = 3, NNZ = 5 };
    const int64_t idx[NNZ] = {4, 1, 4, 0, 4};
    float values[NNZ * LEN], p[ROWS * LEN], m[ROWS * LEN], v[ROWS * LEN];
    float rp[ROWS * LEN], rm[ROWS * LEN], rv[ROWS * LEN];
    for (int i = 0; i < NNZ * LEN; i++) values[i] = (float)uniform();
    for (int i = 0; i < ROWS * LEN; i++) {
        rp[i] = p[i] = (float)uniform();
        rm[i] = m[i] = (float)uniform() * 0.1f;
        rv[i] = v[i] = (float)fabs(uniform()) * 0.1f;
    }
    rows_case(1, 1, ROWS, LEN, NNZ, p, m, v, idx, values);
    /* the reference: each touched row alone, its gradient summed in index order */
    const int touched[] = {0, 1, 4};
    for (int k = 0; k < 3; k++) {
        const int r = touched[k];
        float g[LEN] = {0};
        int first = 1;
        for (int j = 0; j < NNZ; j++)
            if (idx[j] == r)
                for (int e = 0; e < LEN; e++) {
                    g[e] = first ? values[j * LEN + e] : g[e] + values[j * LEN + e];
                    if (e == LEN - 1) first = 0;
                }
        fo_adam_params hp = adam_hp(3);
        hp.amsgrad = 0;
        fo_adam_f32(rp + r * LEN, g, rm + r * LEN, rv + r * LEN, NULL, LEN, &hp);
    }
    CHECK(memcmp(p, rp, sizeof p) == 0 && memcmp(m, rm, sizeof m) == 0 &&
              memcmp(v, rv, sizeof v) == 0,
          "rows: touched rows as dense steps of their summed gradient, the rest untouched");

    /* refused: an index out of range, a negative one, rows that do not tile the tensor */
    float before[ROWS * LEN];
    memcpy(before, p, sizeof p);
    const int64_t bad[3] = {0, ROWS, 1}, negative[2] = {2, -1};
    const size_t n = ROWS * LEN;
    const float *gp = values;
    float *pp = p, *mp = m, *vp = v, *none = NULL;
    fo_rows rows = {bad, FO_INT64, 3, LEN};
    fo_batch batch = {1, &n, {(void *const *)&pp, (void *const *)&gp, (void *const *)&mp,
                              (void *const *)&vp, (void *const *)&none}, {0}, &rows};
    fo_adam_params hp = adam_hp(4);
    hp.amsgrad = 0;
    CHECK(fo_step(FO_RULE_adam, &batch, &hp, NULL) == FO_ERR_INDEX, "row index out of range");
    rows.indices = negative;
    rows.nnz = 2;
    CHECK(fo_step(FO_RULE_adam, &batch, &hp, NULL) == FO_ERR_INDEX, "negative row index");
    rows.indices = idx;
    rows.row_len = 4;
    CHECK(fo_step(FO_RULE_adam, &batch, &hp, NULL) == FO_ERR_INDEX, "rows must tile the tensor");
    rows.row_len = LEN;
    rows.index_type = 7;
    CHECK(fo_step(FO_RULE_adam, &batch, &hp, NULL) == FO_ERR_DTYPE, "unknown index type");
    CHECK(memcmp(p, before, sizeof p) == 0, "refused row steps wrote nothing");

    /* threads and index types: a step large enough to be split (rows and sums) */
    const size_t big_rows = 4096, big_len = 96, big_nnz = 9000, big_n = big_rows * big_len;
    int64_t *big_idx = malloc(big_nnz * sizeof *big_idx);
    float *big_values = malloc(big_nnz * big_len * sizeof(float));
    float *state[3][3];
    for (size_t j = 0; j < big_nnz; j++) big_idx[j] = (int64_t)((uniform() + 1.0) * 0.5 * 4095.99);
    for (size_t i = 0; i < big_nnz * big_len; i++) big_values[i] = (float)uniform();
    for (int run = 0; run < 3; run++)
        for (int b = 0; b < 3; b++) {
            state[run][b] = malloc(big_n * sizeof(float));
            for (size_t i = 0; i < big_n; i++) state[run][b][i] = b == 2 ? 0.01f : 0.5f;
        }
    const int threads[3] = {1, 4, 2}, wide[3] = {1, 1, 0};
    for (int run = 0; run < 3; run++)
        rows_case(threads[run], wide[run], big_rows, big_len, big_nnz, state[run][0],
                  state[run][1], state[run][2], big_idx, big_values);
    for (int run = 1; run < 3; run++)
        CHECK(memcmp(state[0][0], state[run][0], big_n * sizeof(float)) == 0 &&
                  memcmp(state[0][1], state[run][1], big_n * sizeof(float)) == 0,
              "rows: the same bits for %d threads, int%d indices", threads[run],
              wide[run] ? 64 : 32);
    for (int run = 0; run < 3; run++)
        for (int b = 0; b < 3; b++) free(state[run][b]);
    free(big_idx);
    free(big_values);
    fo_set_num_threads(2);
}

/* sparse="exact" (fo_rows.last_step): torch's SGD with momentum, dampening and weight decay
 * (its buffer seeded on step 1, which rows that missed step 1 catch up with the seeding map),
 * against the dense run with zero gradients on the untouched rows; a rule without a closed
 * form refused with nothing written. */
static void test_rows_exact(void)
{
    enum { ROWS = 5, LEN = 2, STEPS = 40 };
    double p[ROWS * LEN], b[ROWS * LEN], rp[ROWS * LEN], rb[ROWS * LEN];
    int64_t last[ROWS] = {0};
    for (int i = 0; i < ROWS * LEN; i++) {
        rp[i] = p[i] = uniform();
        rb[i] = b[i] = 0.0;
    }
    double worst = 0.0;
    int skipped_step_one = 0;
    for (int64_t t = 1; t <= STEPS; t++) {
        int64_t idx[ROWS];
        double values[ROWS * LEN], dense[ROWS * LEN] = {0};
        size_t nnz = 0;
        for (int r = 0; r < ROWS; r++) {
            if ((t * 7 + r * 3) % 9 >= 3 && !(r == 0 && t == 1)) continue; /* rows sit out */
            idx[nnz] = r;
            for (int e = 0; e < LEN; e++)
                dense[r * LEN + e] = values[nnz * LEN + e] = uniform();
            nnz++;
        }
        if (t == 1) skipped_step_one = nnz < ROWS;
        fo_sgd_params hp = {.lr = 0.1, .momentum = 0.9, .dampening = 0.3, .weight_decay = 0.05,
                            .convention = FO_TORCH, .step = t};
        const size_t n = ROWS * LEN;
        const double *gp = values;
        double *pp = p, *bp = b;
        fo_rows rows = {idx, FO_INT64, nnz, LEN, last, t};
        fo_batch batch = {1, &n, {(void *const *)&pp, (void *const *)&gp, (void *const *)&bp},
                          {FO_FLOAT64, FO_FLOAT64, FO_FLOAT64}, &rows};
        CHECK(fo_step(FO_RULE_sgd, &batch, &hp, NULL) == FO_OK, "exact rows step %d", (int)t);
        fo_sgd_f64(rp, dense, rb, n, &hp);
        for (size_t j = 0; j < nnz; j++)
            for (int e = 0; e < LEN; e++) {
                const size_t i = (size_t)idx[j] * LEN + e;
                worst = fmax(worst, fabs(p[i] - rp[i]) + fabs(b[i] - rb[i]));
            }
    }
    CHECK(skipped_step_one && worst < 1e-13,
          "exact rows: the dense run with zero gradients elsewhere (off by %g)", worst);
    /* no closed form: refused before anything is written */
    float fp[4] = {1, 2, 3, 4}, fm[4] = {0}, fu[4] = {0}, fg[2] = {1, 1}, keep[4];
    memcpy(keep, fp, sizeof fp);
    int64_t fidx[1] = {1}, flast[2] = {0, 0};
    const size_t fn = 4;
    const float *fgp = fg;
    float *fpp = fp, *fmp = fm, *fup = fu;
    fo_rows frows = {fidx, FO_INT64, 1, 2, flast, 1};
    fo_batch fbatch = {1, &fn, {(void *const *)&fpp, (void *const *)&fgp, (void *const *)&fmp,
                                (void *const *)&fup}, {0}, &frows};
    fo_adamax_params ahp = adamax_hp(1);
    fo_error err;
    CHECK(fo_step(FO_RULE_adamax, &fbatch, &ahp, &err) == FO_ERR_HYPERPARAM &&
              strcmp(err.field, "rule") == 0 && memcmp(fp, keep, sizeof fp) == 0 &&
              flast[1] == 0,
          "exact rows: a rule without a closed form refused, nothing written");
    CHECK(fo_check_exact(FO_RULE_adamax, &ahp, NULL) == FO_ERR_HYPERPARAM, "fo_check_exact");
}

int main(void)
{
    static const size_t sizes[] = {0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129,
                                   1000, 1023, 1025, 3001};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++)
        for (int rule = 0; rule < N_RULES; rule++) {
            test_sizes_f32(rule, sizes[k]);
            test_sizes_f64(rule, sizes[k]);
        }
    for (int rule = 0; rule < N_RULES; rule++) {
        test_threads_f32(rule, 300001);
        test_threads_f64(rule, 200003);
    }
    test_errors();
    test_generic();
    test_row_rule();
    test_factored();
    test_step_options();
    test_norm_and_scale_contracts();
    test_rows_exact();
    test_rows();
    test_bf16();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
