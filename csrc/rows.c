/*
 * rows.c -- sparse rows (fastopt.h, "Sparse rows"): a batch whose gradients are given as rows
 * becomes an ordinary batch of one tensor per touched row, run by the same loops.
 *
 * For each tensor with rows: a stable sort of its indices (LSD radix, positions carried) puts
 * each row's duplicates together in their original order; a row met once uses its gradient row
 * where it lies (no copy), a row met several times gets the sum of its gradient rows, in that
 * order, in a scratch row.  Then the rule's loop runs over the batch whose tensor e is touched
 * row e: its buffers are the tensor's buffers advanced to the row, its gradient the row's
 * (summed) gradient, summed piece by piece by the thread that runs the piece, just before the
 * rule reads it (in cache; threads split the sums with the rows).  Dense
 * tensors of the same batch are entries of that batch as they are.  Every element is still
 * updated independently, from a sum fixed by the indices alone: any thread count gives the same
 * bits.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

static int row_index_size(int index_type)
{
    return index_type == FO_INT32 ? 4 : index_type == FO_INT64 ? 8 : 0;
}

static int64_t row_index(const fo_rows *r, size_t j)
{
    return r->index_type == FO_INT32 ? (int64_t)((const int32_t *)r->indices)[j]
                                     : ((const int64_t *)r->indices)[j];
}

static int disjoint(uintptr_t a, size_t na, uintptr_t b, size_t nb)
{
    return na == 0 || nb == 0 || a + na <= b || b + nb <= a;
}

int fo_check_rows(const fo_rows *r, size_t n, size_t value_size, const void *values,
                  void *const *written, const size_t *written_bytes, int n_written)
{
    const int isize = row_index_size(r->index_type);
    if (!isize) return FO_ERR_DTYPE;
    if (r->nnz == 0) return FO_OK;
    if (r->row_len == 0 || n % r->row_len != 0) return FO_ERR_INDEX;
    if (!values) return FO_ERR_NULL;
    if (r->nnz > SIZE_MAX / r->row_len / value_size) return FO_ERR_INDEX;
    const int64_t n_rows = (int64_t)(n / r->row_len);
    for (size_t j = 0; j < r->nnz; j++) {
        const int64_t i = row_index(r, j);
        if (i < 0 || i >= n_rows) return FO_ERR_INDEX;
    }
    const size_t value_bytes = r->nnz * r->row_len * value_size;
    for (int w = 0; w < n_written; w++) {
        if (!written[w]) return FO_ERR_NULL;
        const uintptr_t a = (uintptr_t)written[w];
        const size_t bytes = written_bytes[w];
        if (!disjoint(a, bytes, (uintptr_t)values, value_bytes) ||
            !disjoint(a, bytes, (uintptr_t)r->indices, r->nnz * (size_t)isize))
            return FO_ERR_OVERLAP;
        for (int v = w + 1; v < n_written; v++)
            if (!disjoint(a, bytes, (uintptr_t)written[v], written_bytes[v]))
                return FO_ERR_OVERLAP;
    }
    return FO_OK;
}

/* ---- coalescing ------------------------------------------------------------------------------ */

#define RADIX_BITS 11
#define RADIX (1u << RADIX_BITS)

/* rows[0..nnz) and pos[0..nnz) sorted by row, stably (equal rows keep their positions' order);
 * tmp_rows / tmp_pos: scratch of nnz each. */
static void sort_rows(size_t nnz, uint64_t n_rows, uint64_t *rows, size_t *pos, uint64_t *tmp_rows,
                      size_t *tmp_pos)
{
    int bits = 0;
    while (bits < 64 && (n_rows - 1) >> bits) bits++;
    for (int shift = 0; shift < bits; shift += RADIX_BITS) {
        size_t count[RADIX] = {0};
        for (size_t j = 0; j < nnz; j++) count[(rows[j] >> shift) & (RADIX - 1)]++;
        size_t at = 0;
        for (unsigned d = 0; d < RADIX; d++) {
            const size_t c = count[d];
            count[d] = at;
            at += c;
        }
        for (size_t j = 0; j < nnz; j++) {
            const size_t to = count[(rows[j] >> shift) & (RADIX - 1)]++;
            tmp_rows[to] = rows[j];
            tmp_pos[to] = pos[j];
        }
        uint64_t *swap_rows = rows;
        rows = tmp_rows;
        tmp_rows = swap_rows;
        size_t *swap_pos = pos;
        pos = tmp_pos;
        tmp_pos = swap_pos;
    }
    if (((bits + RADIX_BITS - 1) / RADIX_BITS) % 2) { /* an odd number of passes: copy back */
        memcpy(tmp_rows, rows, nnz * sizeof *rows);
        memcpy(tmp_pos, pos, nnz * sizeof *pos);
    }
}

/* A hot row's gradient rows lie anywhere in the values (Zipf batches: thousands of them for
 * one row): each is a few cache misses the hardware cannot foresee, so the sums prefetch the
 * gradient row FO_SUM_AHEAD positions on (its first FO_ROW_PREFETCH_BYTES). */
#define FO_SUM_AHEAD 8
#define FO_ROW_PREFETCH_BYTES 512 /* past that, a row streams and the hardware prefetches */
static inline void prefetch_rows(const char *row, size_t bytes, int for_write)
{
    const size_t upto = bytes < FO_ROW_PREFETCH_BYTES ? bytes : FO_ROW_PREFETCH_BYTES;
    for (size_t off = 0; off < upto; off += 64) {
        if (for_write)
            __builtin_prefetch(row + off, 1);
        else
            __builtin_prefetch(row + off, 0);
    }
}

/* The sum of a row's gradient rows (positions p .. end of `values`, rows of row_len), elements
 * [at, at + n), in the order of the positions: out = v[p0]; out += v[p1]; ... */
#define FO_SUM_ROWS(T, name)                                                                   \
    static void name(void *out_, const size_t *p, const size_t *end, const void *values_,      \
                     size_t row_len, size_t at, size_t n)                                      \
    {                                                                                          \
        T *restrict out = (T *)out_ + at;                                                      \
        const T *values = (const T *)values_ + at;                                             \
        for (const size_t *q = p + 1; q < end && q <= p + FO_SUM_AHEAD; q++)                   \
            prefetch_rows((const char *)(values + *q * row_len), n * sizeof(T), 0);            \
        memcpy(out, values + *p * row_len, n * sizeof(T));                                     \
        for (p++; p < end; p++) {                                                              \
            if (p + FO_SUM_AHEAD < end)                                                        \
                prefetch_rows((const char *)(values + p[FO_SUM_AHEAD] * row_len), n * sizeof(T), 0); \
            const T *restrict in = values + *p * row_len;                                      \
            for (size_t i = 0; i < n; i++) out[i] += in[i];                                    \
        }                                                                                      \
    }
FO_SUM_ROWS(float, sum_rows_f32)
FO_SUM_ROWS(double, sum_rows_f64)

/* bfloat16 gradient rows: summed in float32 in the same order, the sum rounded once to
 * nearest even (as loops.inc rounds: subnormals flushed, NaN kept quiet) into a bfloat16 row,
 * so a row's gradient is bfloat16 like every other row's. */
static uint16_t bf16_to_nearest(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float bf16_widen(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static void sum_rows_bf16(void *out_, const size_t *p, const size_t *end, const void *values_,
                          size_t row_len, size_t at, size_t n)
{
    enum { CHUNK = 256 };
    uint16_t *out = (uint16_t *)out_ + at;
    const uint16_t *values = (const uint16_t *)values_ + at;
    for (size_t done = 0; done < n; done += CHUNK) {
        const size_t len = n - done < CHUNK ? n - done : CHUNK;
        float acc[CHUNK];
        const uint16_t *first = values + *p * row_len + done;
        for (size_t i = 0; i < len; i++) acc[i] = bf16_widen(first[i]);
        for (const size_t *q = p + 1; q < end; q++) {
            const uint16_t *in = values + *q * row_len + done;
            for (size_t i = 0; i < len; i++) acc[i] += bf16_widen(in[i]);
        }
        for (size_t i = 0; i < len; i++) out[done + i] = bf16_to_nearest(acc[i]);
    }
}
typedef void (*sum_rows_fn)(void *out, const size_t *p, const size_t *end, const void *values,
                            size_t row_len, size_t at, size_t n);

/* The sum as a pass of its own (when no buffer slot is left for the row batch's entry numbers):
 * entry d is a row met several times; b[0] its scratch row, b[1] .. b[2] the positions of its
 * gradient rows, b[3] the tensor's gradient rows; scalars: the sum function and row length. */
typedef struct {
    sum_rows_fn sum;
    size_t row_len;
} sum_scalars;

static void sum_span(const fo_call *c, void *const *b, size_t t, size_t at, size_t n)
{
    const sum_scalars *s = c->scalars;
    (void)t;
    s->sum(b[0], (const size_t *)b[1], (const size_t *)b[2], b[3], s->row_len, at, n);
}

/* ---- sparse="exact": the steps a row missed ---------------------------------------------------- */

/* A row's catch-up: theta and the coupled buffer mixed by a 2 x 2 matrix, the other buffers
 * scaled; the map of its k missed steps (internal.h, fo_catchup), computed once per row. */
typedef struct {
    double m[4];
    double decay[FO_MAX_BUFFERS];
} row_catchup;

static void mat_mul(double *out, const double *a, const double *b) /* out = a b */
{
    const double r[4] = {a[0] * b[0] + a[1] * b[2], a[0] * b[1] + a[1] * b[3],
                         a[2] * b[0] + a[3] * b[2], a[2] * b[1] + a[3] * b[3]};
    memcpy(out, r, sizeof r);
}

/* The map of `missed` steps (>= 1), the first of them step 1 if from_start. */
static void catchup_power(row_catchup *out, const fo_catchup *c, uint64_t missed, int from_start,
                          int n_bufs)
{
    double power[4] = {1.0, 0.0, 0.0, 1.0}, base[4];
    memcpy(base, c->m, sizeof base);
    uint64_t k = from_start ? missed - 1 : missed;
    for (int b = 0; b < n_bufs; b++) out->decay[b] = 1.0;
    for (uint64_t e = k; e; e >>= 1) { /* power = m^k by squaring */
        if (e & 1) mat_mul(power, power, base);
        mat_mul(base, base, base);
    }
    if (from_start) mat_mul(power, power, c->first); /* step 1 first, then the others */
    memcpy(out->m, power, sizeof power);
    for (int b = 2; b < n_bufs; b++) {
        double f = 1.0, x = c->decay[b];
        for (uint64_t e = missed; e; e >>= 1) {
            if (e & 1) f *= x;
            x *= x;
        }
        out->decay[b] = f;
    }
}

#define FO_CATCH_UP(T, name)                                                                   \
    static void name(void *const *b, size_t at, size_t n, const row_catchup *c, int coupled,   \
                     int n_bufs)                                                               \
    {                                                                                          \
        T *restrict p = (T *)b[0] + at;                                                        \
        if (coupled) {                                                                         \
            T *restrict q = (T *)b[coupled] + at;                                              \
            for (size_t i = 0; i < n; i++) {                                                   \
                const double theta = p[i], x = q[i];                                           \
                p[i] = (T)(c->m[0] * theta + c->m[1] * x);                                     \
                q[i] = (T)(c->m[2] * theta + c->m[3] * x);                                     \
            }                                                                                  \
        } else if (c->m[0] != 1.0) {                                                           \
            for (size_t i = 0; i < n; i++) p[i] = (T)(c->m[0] * p[i]);                         \
        }                                                                                      \
        for (int k = 2; k < n_bufs; k++) {                                                     \
            if (k == coupled || !b[k] || c->decay[k] == 1.0) continue;                          \
            T *restrict x = (T *)b[k] + at;                                                    \
            for (size_t i = 0; i < n; i++) x[i] = (T)(c->decay[k] * x[i]);                     \
        }                                                                                      \
    }
FO_CATCH_UP(float, catch_up_f32)
FO_CATCH_UP(double, catch_up_f64)
typedef void (*catch_up_fn)(void *const *b, size_t at, size_t n, const row_catchup *c,
                            int coupled, int n_bufs);

/* ---- the row batch ---------------------------------------------------------------------------- */

/* Touched rows lie anywhere in their buffers: each row's first cache lines are a miss (and a
 * TLB miss) in every buffer, which the hardware prefetcher cannot foresee.  So the rule's span
 * is wrapped: starting row e, it prefetches row e + FO_ROW_AHEAD, whose buffers it finds in
 * the batch's tables through the entry number that an extra buffer slot carries. */
#define FO_ROW_AHEAD 4

typedef struct {
    fo_span_fn span;
    const fo_call *call;  /* the rule's span's */
    void **const *tables; /* the row batch's buffer tables (NULL: unused buffer) */
    const size_t *sizes;
    int n_bufs;
    size_t entries;
    const size_t *elem; /* per buffer: its element size */
    /* rows met several times: their gradient (b[1], a scratch row) is summed here, piece by
     * piece, just before the rule reads it: sum_of[e] = d + 1 (0: a row met once), the d-th
     * sum's positions sum_tables[1][d] .. [2][d] in the gradient rows sum_tables[3][d] */
    const size_t *sum_of;
    void **const *sum_tables;
    sum_rows_fn sum;
    /* sparse="exact": per entry its catch-up (NULL: none), applied to the piece before the
     * rule's update */
    const row_catchup *const *catchup_of;
    catch_up_fn catch_up;
    int coupled, n_rule_bufs;
} row_ahead;

static void row_ahead_span(const fo_call *c, void *const *b, size_t t, size_t at, size_t n)
{
    const row_ahead *r = c->scalars;
    const size_t e = (size_t)(uintptr_t)b[r->n_bufs];
    if (r->sum_of[e]) {
        const size_t d = r->sum_of[e] - 1;
        r->sum(b[1], (const size_t *)r->sum_tables[1][d], (const size_t *)r->sum_tables[2][d],
               r->sum_tables[3][d], r->sizes[e], at, n);
    }
    if (at == 0 && e + FO_ROW_AHEAD < r->entries) {
        const size_t next = e + FO_ROW_AHEAD;
        for (int k = 0; k < r->n_bufs; k++) /* the gradient (k = 1) is only read */
            if (r->tables[k])
                prefetch_rows(r->tables[k][next], r->sizes[next] * r->elem[k], k != 1);
    }
    if (r->catchup_of && r->catchup_of[e])
        r->catch_up(b, at, n, r->catchup_of[e], r->coupled, r->n_rule_bufs);
    r->span(r->call, b, t, at, n);
}

/* Whether the indices are strictly increasing: then each row is met once, in order. */
static int strictly_increasing(const fo_rows *r)
{
    for (size_t j = 1; j < r->nnz; j++)
        if (row_index(r, j) <= row_index(r, j - 1)) return 0;
    return 1;
}

/* A row rule's dense tensor runs as entries of whole rows, about this many elements each */
#define FO_ROW_CHUNK ((size_t)8192)

/* A row rule's tensors, longest rows first: an entry runs whole on one thread, so a row
 * far longer than the others should start first, not finish last (the order changes no bit). */
typedef struct {
    size_t row_len, t;
} tensor_order;
static int longest_rows_first(const void *a_, const void *b_)
{
    const tensor_order *a = a_, *b = b_;
    if (a->row_len != b->row_len) return a->row_len > b->row_len ? -1 : 1;
    return a->t < b->t ? -1 : a->t > b->t;
}

static size_t rows_per_chunk(size_t row_len)
{
    return row_len == 0 || row_len >= FO_ROW_CHUNK ? 1 : FO_ROW_CHUNK / row_len;
}

static int run_rows(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                    const size_t *n, const fo_rows *rows, const int *dtypes, const fo_call *call,
                    const fo_catchup *catchup, unsigned per_row)
{
    /* each buffer's element size: a row of buffer k is row_len elements of its own type */
    size_t elem[FO_MAX_BUFFERS];
    for (int k = 0; k < n_bufs; k++)
        elem[k] = dtypes[k] == FO_FLOAT64    ? sizeof(double)
                  : dtypes[k] == FO_BFLOAT16 ? sizeof(uint16_t)
                                             : sizeof(float);
    const int compute64 = dtypes[0] == FO_FLOAT64;
    /* a staged call (loops.inc) keys stochastic rounding by parameter index and element index
     * within the parameter, and reads master weights per tensor: per entry here */
    const int staged = call->staged;
    /* sizes: entries of the row batch, sort scratch, rows summed */
    size_t entries = 0, sort_len = 0, most_nnz = 0;
    for (size_t t = 0; t < count; t++) {
        const fo_rows *r = &rows[t];
        if (!r->indices) { /* dense: itself, each of its rows (exact), or chunks of rows */
            if (!r->last_step && !per_row) {
                entries += 1;
                continue;
            }
            const size_t n_rows = n[t] ? n[t] / r->row_len : 0, chunk = rows_per_chunk(r->row_len);
            entries += r->last_step ? n_rows : (n_rows + chunk - 1) / chunk;
            continue;
        }
        entries += r->nnz;   /* at most: one per touched row */
        sort_len += r->nnz;  /* positions kept for the sum pass */
        most_nnz = r->nnz > most_nnz ? r->nnz : most_nnz;
    }
    size_t scratch_elems = 0; /* a summed row takes two gradient rows at least */
    for (size_t t = 0; t < count; t++)
        if (rows[t].indices) scratch_elems += rows[t].nnz / 2 * rows[t].row_len;
    /* one allocation: row batch tables, sizes, sort arrays, summed rows */
    const int ahead = n_bufs < FO_MAX_BUFFERS; /* a slot left for the entry numbers */
    const size_t table_bytes = (size_t)(n_bufs + ahead) * entries * sizeof(void *);
    const size_t bytes = table_bytes + 2 * entries * sizeof(size_t)        /* sizes, sum_of */
                         + 4 * entries * sizeof(void *) + entries * sizeof(size_t) /* sum batch */
                         + sort_len * sizeof(size_t)                      /* sorted positions */
                         + most_nnz * (2 * sizeof(uint64_t) + sizeof(size_t)) /* sort scratch */
                         + scratch_elems * elem[1] + 64
                         + (catchup ? entries * (sizeof(void *) + sizeof(row_catchup)) : 0)
                         + (staged ? entries * (2 * sizeof(uint64_t) + sizeof(float *)) : 0)
                         + (per_row ? entries * sizeof(size_t) + count * sizeof(tensor_order) : 0);
    char *mem = malloc(bytes);
    if (!mem) return FO_ERR_MEMORY;
    char *at = mem;
#define FO_TAKE(type, name, len)                                                               \
    type *name = (type *)at;                                                                   \
    at += (len) * sizeof(type)
    FO_TAKE(void *, table, (size_t)(n_bufs + ahead) * entries);
    FO_TAKE(size_t, sizes, entries);
    FO_TAKE(size_t, sum_of, entries);
    FO_TAKE(void *, sum_table, 4 * entries);
    FO_TAKE(size_t, sum_sizes, entries);
    FO_TAKE(size_t, positions, sort_len);
    FO_TAKE(uint64_t, sort_rows_a, most_nnz);
    FO_TAKE(uint64_t, sort_rows_b, most_nnz);
    FO_TAKE(size_t, sort_pos_b, most_nnz);
    FO_TAKE(const row_catchup *, catchup_of, catchup ? entries : 0);
    FO_TAKE(row_catchup, catchups, catchup ? entries : 0);
    FO_TAKE(uint64_t, index_of, staged ? entries : 0); /* staged: the entry's parameter index, */
    FO_TAKE(uint64_t, first_of, staged ? entries : 0); /* its element 0's index in it, */
    FO_TAKE(float *, master_of, staged && call->master ? entries : 0); /* its master row */
    FO_TAKE(size_t, row_len_of, per_row ? entries : 0); /* a row rule's: its row length */
    FO_TAKE(tensor_order, order, per_row ? count : 0);   /* and its tensors' order */
    at = (char *)(((uintptr_t)at + 63) & ~(uintptr_t)63);
    char *scratch = at;
#undef FO_TAKE
    void **row_bufs[FO_MAX_BUFFERS], **sum_bufs[4];
    for (int k = 0; k < n_bufs + ahead; k++)
        row_bufs[k] = k == n_bufs || bufs[k] ? table + (size_t)k * entries : NULL;
    for (int k = 0; k < 4; k++) sum_bufs[k] = sum_table + (size_t)k * entries;

    /* every buffer of the step; an EMA's (after the rule's) has decay 1: not caught up */
    const int n_rule_bufs = n_bufs;
    size_t e = 0, d = 0, used_pos = 0, used_scratch = 0, n_catchups = 0;
/* entry e is row `row` of tensor t: its catch-up, and its last step now the step's */
#define FO_ROW_CATCHUP(row)                                                                    \
    do {                                                                                       \
        if (!catchup) break;                                                                   \
        catchup_of[e] = NULL;                                                                  \
        if (!r->last_step) break;                                                              \
        const int64_t last = r->last_step[row];                                                \
        if (last < r->step - 1) {                                                              \
            row_catchup *c = &catchups[n_catchups++];                                          \
            catchup_power(c, catchup, (uint64_t)(r->step - 1 - (last > 0 ? last : 0)),         \
                          last <= 0, n_rule_bufs);                                             \
            catchup_of[e] = c;                                                                 \
        }                                                                                      \
        r->last_step[row] = r->step;                                                           \
    } while (0)
/* buffer k of tensor t at row `row`: a row of row_len elements, or one value (per_row) */
#define FO_ROW_AT(k, row)                                                                      \
    ((char *)bufs[k][t] + (size_t)(row) * ((per_row >> (k)) & 1u ? 1 : r->row_len) * elem[k])
/* entry e's row length, for a row rule's span */
#define FO_ROW_LEN()                                                                           \
    do {                                                                                       \
        if (per_row) row_len_of[e] = r->row_len;                                               \
    } while (0)
/* staged: entry e is row `row` of tensor t (row 0 of a dense tensor: the whole of it) */
#define FO_ROW_STAGED(row)                                                                     \
    do {                                                                                       \
        if (!staged) break;                                                                    \
        index_of[e] = call->index ? call->index[t] : (uint64_t)t;                              \
        first_of[e] = (uint64_t)(row) * r->row_len;                                            \
        if (call->master) master_of[e] = call->master[t] + (size_t)(row) * r->row_len;         \
    } while (0)
    if (per_row) {
        for (size_t t = 0; t < count; t++) order[t] = (tensor_order){rows[t].row_len, t};
        qsort(order, count, sizeof *order, longest_rows_first);
    }
    for (size_t i = 0; i < count; i++) {
        const size_t t = per_row ? order[i].t : i;
        const fo_rows *r = &rows[t];
        if (!r->indices && r->last_step) { /* a dense gradient, row by row (exact) */
            for (size_t row = 0; n[t] && row < n[t] / r->row_len; row++) {
                for (int k = 0; k < n_bufs; k++)
                    if (bufs[k]) row_bufs[k][e] = FO_ROW_AT(k, row);
                FO_ROW_LEN();
                FO_ROW_STAGED(row);
                FO_ROW_CATCHUP(row);
                sum_of[e] = 0;
                sizes[e++] = r->row_len;
            }
            continue;
        }
        if (!r->indices && per_row) { /* a row rule's dense tensor: chunks of whole rows */
            const size_t n_rows = n[t] ? n[t] / r->row_len : 0, chunk = rows_per_chunk(r->row_len);
            for (size_t row = 0; row < n_rows; row += chunk) {
                for (int k = 0; k < n_bufs; k++)
                    if (bufs[k]) row_bufs[k][e] = FO_ROW_AT(k, row);
                if (catchup) catchup_of[e] = NULL;
                FO_ROW_LEN();
                FO_ROW_STAGED(row);
                sum_of[e] = 0;
                sizes[e++] = (n_rows - row < chunk ? n_rows - row : chunk) * r->row_len;
            }
            continue;
        }
        if (!r->indices) { /* a dense tensor: itself */
            if (catchup) catchup_of[e] = NULL;
            FO_ROW_STAGED(0);
            for (int k = 0; k < n_bufs; k++)
                if (bufs[k]) row_bufs[k][e] = bufs[k][t];
            sum_of[e] = 0;
            sizes[e++] = n[t];
            continue;
        }
        if (r->nnz == 0) continue;
        const size_t row_bytes = r->row_len * elem[1]; /* a gradient row's */
        char *const values = (char *)bufs[1][t];
        size_t *pos = positions + used_pos;
        used_pos += r->nnz;
        const int sorted = strictly_increasing(r);
        for (size_t j = 0; j < r->nnz; j++) {
            sort_rows_a[j] = (uint64_t)row_index(r, j);
            pos[j] = j;
        }
        if (!sorted)
            sort_rows(r->nnz, (uint64_t)(n[t] / r->row_len), sort_rows_a, pos, sort_rows_b,
                      sort_pos_b);
        for (size_t s = 0; s < r->nnz;) {
            const uint64_t row = sort_rows_a[s];
            size_t end = s + 1;
            while (end < r->nnz && sort_rows_a[end] == row) end++;
            for (int k = 0; k < n_bufs; k++)
                if (bufs[k] && k != 1) row_bufs[k][e] = FO_ROW_AT(k, row);
            FO_ROW_LEN();
            FO_ROW_CATCHUP(row);
            FO_ROW_STAGED(row);
            sum_of[e] = end - s == 1 ? 0 : d + 1;
            if (end - s == 1) {
                row_bufs[1][e] = values + pos[s] * row_bytes;
            } else {
                char *sum = scratch + used_scratch * elem[1];
                used_scratch += r->row_len;
                row_bufs[1][e] = sum;
                sum_bufs[0][d] = sum;
                sum_bufs[1][d] = &pos[s];
                sum_bufs[2][d] = &pos[end];
                sum_bufs[3][d] = values;
                sum_sizes[d++] = r->row_len;
            }
            sizes[e++] = r->row_len;
            s = end;
        }
    }
    const sum_rows_fn sum = dtypes[1] == FO_BFLOAT16 ? sum_rows_bf16
                            : compute64                ? sum_rows_f64
                                                       : sum_rows_f32;
    fo_call row_call; /* staged: the call with the entries' keys and master rows */
    if (staged) {
        row_call = *call;
        row_call.index = index_of;
        row_call.first = first_of;
        row_call.master = call->master ? master_of : NULL;
        call = &row_call;
    }
    /* a row rule's entries each run whole */
    const size_t grain = per_row ? FO_WHOLE_TENSORS : 1;
    if (per_row) {
        row_call = *call;
        row_call.row_len = row_len_of;
        row_call.per_row = per_row;
        call = &row_call;
    }
    if (d && !ahead) {
        /* one row length per sum pass (its scalars): tensors of different row lengths each
         * get their own pass */
        size_t first = 0;
        while (first < d) {
            size_t last = first + 1;
            while (last < d && sum_sizes[last] == sum_sizes[first]) last++;
            const sum_scalars ss = {sum, sum_sizes[first]};
            const fo_call sum_call = {.scalars = &ss, .n_bufs = 4};
            void *const *const part[4] = {sum_bufs[0] + first, sum_bufs[1] + first,
                                          sum_bufs[2] + first, sum_bufs[3] + first};
            fo_run(sum_span, last - first, part, 4, sum_sizes + first, &sum_call);
            first = last;
        }
    }
    if (ahead) {
        for (size_t i = 0; i < e; i++) row_bufs[n_bufs][i] = (void *)(uintptr_t)i;
        const row_ahead r = {span,  call, (void **const *)row_bufs, sizes, n_bufs, e, elem,
                             sum_of, (void **const *)sum_bufs, sum,
                             catchup ? catchup_of : NULL,
                             compute64 ? catch_up_f64 : catch_up_f32,
                             catchup ? catchup->coupled : 0, n_rule_bufs};
        const fo_call ahead_call = {.scalars = &r, .n_bufs = n_bufs + 1};
        fo_run_blocks(row_ahead_span, e, (void *const *const *)row_bufs, n_bufs + 1, sizes,
                      &ahead_call, grain);
    } else {
        fo_run_blocks(span, e, (void *const *const *)row_bufs, n_bufs, sizes, call, grain);
    }
#undef FO_ROW_CATCHUP
#undef FO_ROW_STAGED
#undef FO_ROW_AT
#undef FO_ROW_LEN
    free(mem);
    return FO_OK;
}

int fo_run_rows(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                const size_t *n, const fo_rows *rows, const int *dtypes, const fo_call *call,
                const fo_catchup *catchup)
{
    return run_rows(span, count, bufs, n_bufs, n, rows, dtypes, call, catchup, 0);
}

int fo_run_row_rule(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                    const size_t *n, const fo_rows *rows, const int *dtypes, const fo_call *call,
                    const fo_catchup *catchup, unsigned per_row)
{
    return run_rows(span, count, bufs, n_bufs, n, rows, dtypes, call, catchup, per_row);
}
