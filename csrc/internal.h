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

#include <stdint.h>
#include "fastopt.h"

#define FO_CAT_(a, b) a##_##b
#define FO_CAT(a, b) FO_CAT_(a, b)
#define FO_STR_(x) #x
#define FO_STR(x) FO_STR_(x)

#define FO_PART_TYPES 1
#define FO_PART_PREPARE 2
#define FO_PART_LOOP 3

#define FO_PART FO_PART_TYPES
#include "rules/all.inc"
#undef FO_PART

/* Room for any rule's scalars (checked at compile time in kernels.c). */
#define FO_MAX_SCALARS 256

/* What every span of one call shares: the rule's scalars and how each buffer is stored. */
typedef void (*fo_bf16_round_fn)(uint16_t *dst, const float *src, size_t n);
typedef void (*fo_random_bits_fn)(uint32_t *out, uint32_t counter, size_t n_blocks, uint64_t key);
typedef struct {
    const void *scalars;
    int n_bufs;
    int dtype[FO_MAX_BUFFERS];
    int staged;                  /* some buffer is bfloat16 (or master weights): blocks go
                                    through float/double staging arrays (loops.inc) */
    int rounding;                /* fo_rounding */
    uint64_t key;                /* fo_absorb(seed, step) */
    const uint64_t *index;       /* per tensor: its parameter index, NULL for 0, 1, ... */
    float *const *master;        /* per tensor, or NULL */
    const uint64_t *first;       /* per tensor: the index of its element 0 in its parameter,
                                    which keys stochastic rounding (a touched row's: row x
                                    row_len, rows.c); NULL for 0 */
    fo_bf16_round_fn to_nearest; /* float32 -> bfloat16, to nearest even (chosen per CPU) */
    fo_random_bits_fn random_bits; /* stochastic rounding's generator (chosen per CPU) */
    /* a staged call's EMA of the weights (fo_step_with): its buffer (0: none), updated in each
     * block right after the rule, from the staged parameter (or master); unstaged calls take
     * the EMA through the ema span instead */
    int ema_buffer;
    double ema_decay;
    unsigned read_only; /* bit k: a staged span leaves buffer k as it is (reads it only) */
    int n_state;        /* the rule's state buffers (stochastic rounding's streams: fo_stream) */
    /* row rules (FO_ROW_RULES): per tensor its row length, and the buffers (bit k: buffer k)
     * that hold one value per row; a span then covers whole rows (rows.c) */
    const size_t *row_len;
    unsigned per_row;
} fo_call;

/* One rule's loop over elements [at, at + n) of tensor t, whose buffers (param, grad, then the
 * state buffers in FO_RULES order; NULL for unused ones) start at b[]. */
typedef void (*fo_span_fn)(const fo_call *c, void *const *b, size_t t, size_t at, size_t n);

enum { FO_F32, FO_F64 };

/* The reduction pass reads this many blocks side by side, and the scaling pass (fo_scale) walks
 * this many parts of its piece: one memory stream each. */
#define FO_NORM_STREAMS 4

/* The reduction pass (fo_norm): what to accumulate over each block of FO_NORM_BLOCK elements. */
enum { FO_NORM_SQUARES, FO_NORM_ABS, FO_NORM_MAX, FO_NORM_NONZERO, FO_NORM_POWER };
typedef struct {
    int kind;
    double p; /* FO_NORM_POWER's exponent */
} fo_norm_scalars;

/* The step's EMA of the weights, after the rule, on the same span of elements (fo_step_with). */
typedef struct {
    fo_span_fn rule_span;
    const fo_call *rule_call;
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
 * writes: the buffers (bit k: buffer k) the reduce pass writes, which the update only reads:
 * with bfloat16 storage each is rounded once, by the pass that computed it.
 */
#define FO_TENSOR_RULES(X) X(lamb, 2, 1u << 2 | 1u << 3) X(lars, 2, 0u)

/*
 * Row rules (fastopt.h, fo_rule_info.per_row): a per-row reduction, then the row's update, in
 * one span over whole rows.  Their state buffers hold one value per row, so they always run
 * as a row batch (rows.c): a touched row, or a dense tensor's whole rows in chunks, per entry,
 * each entry run whole by one thread (the same bits for any thread count); the rule's loop
 * (FO_ROW_SPAN) takes the entry's row length after n.  Their state buffers are stored in the
 * compute type; bfloat16 parameters and gradients are staged whole rows at a time.
 */
#define FO_ROW_RULES(X) X(rowwise_adagrad)

/*
 * Factored rules (fastopt.h, fo_rule_info.factored): state sized by each tensor's layout
 * (fo_rows.matrix_rows and row_len) and passes over tiles before the update.  The rule's prepare
 * part has FO_STATE_SIZE (each state buffer's elements for a layout, SIZE_MAX: a layout the
 * rule does not take) and FO_FACTORED (the passes, then the update span through fo_run, with
 * the tensors' descriptions at the buffer slot after the rule's); its loop part the spans of
 * fo_loops.factored.  Compute-type storage only; no gradients given by rows.
 */
#define FO_FACTORED_RULES(X) X(adafactor)
#define FO_FACTORED_PASSES 3
#define FO_MAX_SUMS 2

/* sparse="exact" (fastopt.h, fo_rows.last_step): the rules whose steps with a zero gradient
 * have a closed form (FO_CATCHUP_RULES, listed in rules/all.inc) each have a catch-up part,
 * FO_CATCHUP(rule) in their prepare part, that fills the map below from the hyperparameters
 * (or refuses them).  A missed step is linear in
 * the parameter and its state: theta and one coupled buffer b mix by a 2 x 2 matrix, the other
 * buffers are multiplied by a factor; k missed steps are that map's k-th power. */
typedef struct {
    int coupled;                  /* the buffer slot (>= 2) mixed with theta, 0: none */
    double m[4];                  /* one missed step: theta <- m0 theta + m1 b; b <- m2 theta + m3 b */
    double first[4];              /* the same for step 1 (torch seeds its momentum there) */
    double decay[FO_MAX_BUFFERS]; /* one missed step: buffer k <- decay[k] buffer k */
} fo_catchup;

typedef struct {
    const char *name;
    fo_span_fn span[FO_N_RULES][2];
    fo_bf16_round_fn to_nearest; /* integer arithmetic, compiled for this instruction set */
    /* float32 -> bfloat16 stochastically, adding r[i]'s low (shift 0) or high (shift 16) half;
     * and two buffers from one word each (loops.inc: what a staged span's writes use) */
    void (*stochastic)(uint16_t *dst, const float *src, size_t n, const uint32_t *r, int shift);
    void (*stochastic_pair)(uint16_t *dst_a, const float *src_a, uint16_t *dst_b,
                            const float *src_b, size_t n, const uint32_t *r);
    /* per-tensor passes (FO_TENSOR_RULES; NULL for the other rules): b[slot] is the tensor's
     * (double *) results, n_sums per block; `at` a multiple of FO_NORM_BLOCK */
    fo_span_fn reduce[FO_N_RULES][2];
    /* factored rules' passes (FO_FACTORED_RULES): spans over entries that the rule defines */
    fo_span_fn factored[FO_N_RULES][2][FO_FACTORED_PASSES];
    /* the reduction: b[0] the buffer, b[1] the tensor's (double *) results, two per block
     * (value, and a sum of x - x: NaN iff an element is inf or NaN); `at` a multiple of
     * FO_NORM_BLOCK (fo_run_blocks) */
    fo_span_fn norm[2];
    fo_span_fn norm_bf16; /* the norm over bfloat16 buffers (widened to float: exact) */
    fo_span_fn ema[2];   /* the rule's span, then the EMA (scalars: fo_ema_scalars) */
    fo_span_fn scale[2]; /* b[0] *= factor (scalars: one double) */
} fo_loops;

/* ---- the keyed generator of stochastic rounding's bits ------------------------------------
 * A 64-bit key absorbs seed, step, parameter index, buffer pair q and the element index's upper
 * 32 bits (SplitMix64's finalizer after each); the 32-bit word of element e is then word
 * lo32(e) of ARS-7's stream under that key (random.c: word w of counter w / 4), and the written
 * buffers' streams s take its low 16 bits if s is even, its high 16 bits if s is odd, from the
 * word of pair q = s / 2: one word for two streams.  The rule's state buffers
 * are streams 0 .. n_state - 1 (buffer k: stream k - 2), the parameter stream n_state, the
 * EMA stream n_state + 1 (the gradient is never written): a rule's first two state buffers
 * share a word, and so do the parameter and a rule's only state buffer.
 * Every value depends only on these inputs, never on how the work is split. */
static inline int fo_stream(const fo_call *c, int k)
{
    return k == 0 ? c->n_state : (k == c->ema_buffer && k) ? c->n_state + 1 : k - 2;
}
static inline uint64_t fo_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}
static inline uint64_t fo_absorb(uint64_t key, uint64_t x)
{
    return fo_mix64((key ^ x) + 0x9e3779b97f4a7c15ull);
}
/* out[0 .. 4 n_blocks) = ARS-7's words 4 counter .. 4 (counter + n_blocks) - 1 under key
 * (random.c; counter + n_blocks <= 2^30) */
void fo_random_bits_portable(uint32_t *out, uint32_t counter, size_t n_blocks, uint64_t key);
/* the key of buffer pair q of tensor t for elements [hi << 32, (hi + 1) << 32) */
static inline uint64_t fo_block_key(const fo_call *c, size_t t, int q, uint64_t hi)
{
    const uint64_t index = c->index ? c->index[t] : (uint64_t)t;
    return fo_absorb(fo_absorb(fo_absorb(c->key, index), (uint64_t)q), hi);
}

extern const fo_loops fo_loops_baseline;
#if defined(__x86_64__) || defined(__i386__)
#define FO_X86 1
extern const fo_loops fo_loops_avx2;
extern const fo_loops fo_loops_avx512;
void fo_bf16_nearest_avx512bf16(uint16_t *dst, const float *src, size_t n);
void fo_random_bits_aesni(uint32_t *out, uint32_t counter, size_t n_blocks, uint64_t key);
void fo_random_bits_vaes256(uint32_t *out, uint32_t counter, size_t n_blocks, uint64_t key);
void fo_random_bits_vaes512(uint32_t *out, uint32_t counter, size_t n_blocks, uint64_t key);
#endif

/*
 * Run span over `count` tensors of n[t] elements; bufs[k][t] is buffer k of tensor t (bufs[k]
 * NULL: buffer k unused).  Large jobs are split across the thread pool (threads.c); the
 * result is the same for any split since every element is updated independently.
 */
void fo_run(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
            const size_t *n, const fo_call *call);
/* fo_run whose spans start at multiples of `grain` within each tensor (and cover whole grains,
 * the tensor's last one aside): blocks that each one thread sums, for fixed-order reductions.
 * grain FO_WHOLE_TENSORS: every tensor is one span (a row rule's entries, rows.c), run by the
 * thread whose piece of the range holds its first element. */
#define FO_WHOLE_TENSORS ((size_t)-1)
void fo_run_blocks(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                   const size_t *n, const fo_call *call, size_t grain);

/* Sparse rows (rows.c): check tensor t's rows (its n elements, its gradient rows at `values`,
 * the written buffers), then run `span` over the batch of touched rows and dense tensors. */
int fo_check_rows(const fo_rows *rows, size_t n, size_t value_size, const void *values,
                  void *const *written, const size_t *written_bytes, int n_written);
/* dtypes: each buffer's storage type (fo_dtype; buffer 0 the parameter's); a staged call's
 * (bfloat16 buffers, master weights) spans get their tensor's parameter index, master row and
 * element offset per touched row, so a row rounds as the dense step would round it. */
int fo_run_rows(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                const size_t *n, const fo_rows *rows, const int *dtypes, const fo_call *call,
                const fo_catchup *catchup);
/* A row rule's batch (FO_ROW_RULES): fo_run_rows with the buffers of mask `per_row` holding one
 * value per row, dense tensors run as chunks of whole rows, and every entry run whole. */
int fo_run_row_rule(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                    const size_t *n, const fo_rows *rows, const int *dtypes, const fo_call *call,
                    const fo_catchup *catchup, unsigned per_row);

/* float32 -> bfloat16 to nearest even, subnormals flushed: the rounding of every staged store
 * (a bfloat16 copy made outside a step, e.g. an EMA's first value, rounds as a step would).
 * Not part of the public API. */
void fo_round_to_bfloat16(uint16_t *dst, const float *src, size_t n);

/* fo_step_with for a batch whose dense tensors' buffers the caller has checked already (a
 * planned step: the buffers a checked step used, each gradient checked against every written
 * buffer): their per-tensor overlap checks are skipped.  Not part of the public API. */
int fo_step_planned(int rule, const fo_batch *batch, const void *hp, const fo_step_options *opt,
                    fo_error *err);

#endif
