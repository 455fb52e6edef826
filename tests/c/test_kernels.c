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
    N_RULES = FO_N_RULES
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
    CHECK(11 == N_RULES, "every rule of FO_RULES has a case here (%d rules)", (int)N_RULES);
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
    test_bf16();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
