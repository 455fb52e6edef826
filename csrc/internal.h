/*
 * internal.h -- what the generic entry point (kernels.c) shares with the loops (loops*.c).
 *
 * Each rule file csrc/rules/<rule>.inc has three parts, included where they are needed:
 *   FO_PART_TYPES    its per-step scalars struct, fo_<rule>_scalars (here, for everyone)
 *   FO_PART_PREPARE  <rule>_prepare(): validate the hyperparameters, compute the scalars in
 *                    double once per call, say which state buffers the options use (kernels.c)
 *   FO_PART_LOOP     the loop over elements, for the FO_T / FO_SFX / FO_ISA that loops.inc
 *                    defines (once per dtype and instruction set)
 * so a loop receives only the scalars and streams over the buffers.
 */
#ifndef FASTOPT_INTERNAL_H
#define FASTOPT_INTERNAL_H

#include "fastopt.h"

#define FO_CAT_(a, b) a##_##b
#define FO_CAT(a, b) FO_CAT_(a, b)

#define FO_PART_TYPES 1
#define FO_PART_PREPARE 2
#define FO_PART_LOOP 3

#define FO_PART FO_PART_TYPES
#include "rules/all.inc"
#undef FO_PART

/* Room for any rule's scalars (checked at compile time in kernels.c). */
#define FO_MAX_SCALARS 256

/* One rule's loop over elements [at, at + n) of one tensor whose buffers (param, grad, then the
 * state buffers in FO_RULES order; NULL for unused ones) start at b[]. */
typedef void (*fo_span_fn)(void *const *b, size_t at, size_t n, const void *scalars);

enum { FO_F32, FO_F64 };

/* The reduction pass (fo_norm): what to accumulate over each block of FO_NORM_BLOCK elements. */
enum { FO_NORM_SQUARES, FO_NORM_ABS, FO_NORM_MAX, FO_NORM_NONZERO, FO_NORM_POWER };
typedef struct {
    int kind;
    double p; /* FO_NORM_POWER's exponent */
} fo_norm_scalars;

/* The step's EMA of the weights, after the rule, on the same span of elements (fo_step_with). */
typedef struct {
    fo_span_fn rule_span;
    const void *rule_scalars;
    int ema_buffer; /* where the EMA buffer is among the span's buffers */
    double decay;
} fo_ema_scalars;

/*
 * Rules with a per-tensor pass before their update (LAMB's and LARS's trust ratios), as
 * X(rule, n_sums).  The pass is the reduction pass's scheme (blocks of FO_NORM_BLOCK elements
 * shared out by fo_run_blocks, FO_NORM_LANES lanes combined pairwise, blocks added in order):
 * the rule's reduce span sums n_sums terms per element in double, fo_step adds each tensor's
 * blocks in order and the rule's tensor part (FO_TENSOR, in its prepare part) turns the sums
 * into one scalar per tensor, which the update span reads at the buffer slot after the rule's
 * state buffers (FO_TENSOR_SCALAR).  The same bits for any thread count and instruction set.
 */
#define FO_TENSOR_RULES(X) X(lamb, 2) X(lars, 2)
#define FO_MAX_SUMS 2

typedef struct {
    const char *name;
    fo_span_fn span[FO_N_RULES][2];
    /* per-tensor passes (FO_TENSOR_RULES; NULL for the other rules): b[slot] is the tensor's
     * (double *) results, n_sums per block; `at` a multiple of FO_NORM_BLOCK */
    fo_span_fn reduce[FO_N_RULES][2];
    /* the reduction: b[0] the buffer, b[1] the tensor's (double *) results, two per block
     * (value, and a sum of x - x: NaN iff an element is inf or NaN); `at` a multiple of
     * FO_NORM_BLOCK (fo_run_blocks) */
    fo_span_fn norm[2];
    fo_span_fn ema[2];   /* the rule's span, then the EMA (scalars: fo_ema_scalars) */
    fo_span_fn scale[2]; /* b[0] *= factor (scalars: one double) */
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
/* fo_run whose spans start at multiples of `grain` within each tensor (and cover whole grains,
 * the tensor's last one aside): blocks that each one thread sums, for fixed-order reductions. */
void fo_run_blocks(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                   const size_t *n, const void *scalars, size_t grain);

/* Sparse rows (rows.c): check tensor t's rows (its n elements, its gradient rows at `values`,
 * the written buffers), then run `span` over the batch of touched rows and dense tensors. */
int fo_check_rows(const fo_rows *rows, size_t n, size_t elem_size, const void *values,
                  void *const *written, int n_written);
int fo_run_rows(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                const size_t *n, const fo_rows *rows, int dtype, const void *scalars);

#endif
