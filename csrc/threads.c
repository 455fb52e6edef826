/*
 * threads.c -- fo_run: one call's tensors, split across a small pool of the library's threads.
 *
 * The work is cut into pieces of about FO_CHUNK elements that the caller and the workers claim
 * from a shared cursor, so the split is by elements (bytes), not by tensor, and a worker that
 * the OS schedules late simply finds nothing left: the call then costs what one thread costs,
 * it never waits on a sleeping worker.  Workers block on a condition variable, never spin.
 * One job runs at a time; a caller that finds the pool busy (another thread's step) runs its
 * job alone.  Every element is updated independently, so any split gives identical results.
 *
 * On a loaded machine a worker can be preempted in the middle of a piece, and the caller must
 * then wait for the OS to run it again (milliseconds).  When the caller's wait at the end of a
 * job is a large part of the job, the next large calls run on the caller alone, for a number
 * of calls that doubles while this keeps happening (up to FO_MAX_BACKOFF), then threads are
 * tried again: a busy machine costs about single-thread speed, never a collapse.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include "internal.h"

#define FO_CHUNK ((size_t)16384)        /* elements per claimed piece */
/* Below this many elements a call stays on the calling thread: waking a sleeping worker costs
 * tens of microseconds on a VM, about what a two-buffer rule takes for this many float32 elements. */
#define FO_PARALLEL_MIN ((size_t)131072)
#define FO_MAX_THREADS 256
#define FO_MIN_BACKOFF 4
#define FO_MAX_BACKOFF 1024
#define FO_MAX_PIECES 32

typedef struct {
    size_t tensor, at, n;
} piece;

typedef struct {
    fo_span_fn span;
    size_t count;
    void *const *const *bufs;
    int n_bufs;
    const size_t *n;
    const void *scalars;
    size_t tensor, at;  /* the cursor: next element to hand out */
    size_t chunk;       /* elements per claim */
    int free_slots;     /* workers that may still join */
} job;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    job *job;
    int busy;      /* a job is running */
    int in_flight; /* workers inside a job */
    int started;   /* workers created */
    int solo_left; /* large calls still to run on the caller alone (back-off) */
    int backoff;   /* the length of the next back-off */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          0, 0, 0, 0, 0, FO_MIN_BACKOFF};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int n_threads; /* 0 until first use */

static int default_threads(void)
{
    const char *env = getenv("FASTOPT_NUM_THREADS");
    if (env && atoi(env) > 0) return atoi(env) < FO_MAX_THREADS ? atoi(env) : FO_MAX_THREADS;
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int)(online < FO_MAX_THREADS ? online : FO_MAX_THREADS) : 1;
}

int fo_get_num_threads(void)
{
    pthread_mutex_lock(&pool.lock);
    if (!n_threads) n_threads = default_threads();
    const int n = n_threads;
    pthread_mutex_unlock(&pool.lock);
    return n;
}

int fo_set_num_threads(int n)
{
    if (n < 1 || n > FO_MAX_THREADS) return FO_ERR_HYPERPARAM;
    pthread_mutex_lock(&pool.lock);
    n_threads = n;
    pthread_mutex_unlock(&pool.lock);
    return FO_OK;
}

/* Under pool.lock: hand out up to FO_CHUNK elements, possibly from several small tensors. */
static int claim(job *j, piece *out)
{
    int k = 0;
    size_t budget = j->chunk;
    while (j->tensor < j->count && budget > 0 && k < FO_MAX_PIECES) {
        const size_t left = j->n[j->tensor] - j->at;
        const size_t take = left < budget ? left : budget;
        if (take) out[k++] = (piece){j->tensor, j->at, take};
        budget -= take;
        j->at += take;
        if (j->at == j->n[j->tensor]) {
            j->tensor++;
            j->at = 0;
        }
    }
    return k;
}

static void run_piece(const job *j, const piece *p)
{
    void *b[FO_MAX_BUFFERS];
    for (int k = 0; k < j->n_bufs; k++) b[k] = j->bufs[k] ? j->bufs[k][p->tensor] : NULL;
    j->span(b, p->at, p->n, j->scalars);
}

/* Under pool.lock on entry and exit: claim and run pieces until the job is exhausted. */
static void work(job *j)
{
    piece pieces[FO_MAX_PIECES];
    int k;
    while ((k = claim(j, pieces)) > 0) {
        pthread_mutex_unlock(&pool.lock);
        for (int i = 0; i < k; i++) run_piece(j, &pieces[i]);
        pthread_mutex_lock(&pool.lock);
    }
}

static void *worker(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (!pool.job || pool.job->free_slots == 0 || pool.job->tensor >= pool.job->count)
            pthread_cond_wait(&pool.wake, &pool.lock);
        job *j = pool.job;
        j->free_slots--;
        pool.in_flight++;
        work(j);
        if (--pool.in_flight == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static void reset_after_fork(void)
{
    /* the child has no workers; the pool starts again empty */
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.job = NULL;
    pool.busy = pool.in_flight = pool.started = pool.solo_left = 0;
    pool.backoff = FO_MIN_BACKOFF;
}

/* Under pool.lock: make sure `want` workers exist; returns how many do. */
static int ensure_workers(int want)
{
    static int atfork_registered;
    if (!atfork_registered) {
        pthread_atfork(NULL, NULL, reset_after_fork);
        atfork_registered = 1;
    }
    while (pool.started < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, worker, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.started++;
    }
    return pool.started < want ? pool.started : want;
}

void fo_run(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs, const size_t *n,
            const void *scalars)
{
    job j = {span, count, bufs, n_bufs, n, scalars, 0, 0, 0, 0};
    size_t total = 0;
    for (size_t t = 0; t < count; t++) total += n[t];

    int helpers = 0;
    if (total >= FO_PARALLEL_MIN) {
        pthread_mutex_lock(&pool.lock);
        if (!n_threads) n_threads = default_threads();
        if (pool.solo_left > 0 && !pool.busy) pool.solo_left--;
        else if (!pool.busy && n_threads > 1) {
            j.chunk = FO_CHUNK;
            const size_t pieces = (total + j.chunk - 1) / j.chunk;
            const int wanted = (int)((size_t)(n_threads - 1) < pieces - 1 ? (size_t)(n_threads - 1) : pieces - 1);
            helpers = ensure_workers(wanted);
            if (helpers > 0) {
                pool.busy = 1;
                j.free_slots = helpers;
                pool.job = &j;
                pthread_cond_broadcast(&pool.wake);
            }
        }
        if (!helpers) pthread_mutex_unlock(&pool.lock);
    }
    if (!helpers) { /* one thread: straight through, no locking */
        for (size_t t = 0; t < count; t++)
            if (n[t]) run_piece(&j, &(piece){t, 0, n[t]});
        return;
    }
    const double start = now();
    work(&j); /* the caller works too, and alone if no worker wakes in time */
    const double finished = now();
    while (pool.in_flight > 0) pthread_cond_wait(&pool.done, &pool.lock);
    const double waited = now() - finished;
    if (waited > 20e-6 && waited > 0.2 * (finished - start)) { /* a worker was held up */
        pool.solo_left = pool.backoff;
        pool.backoff = pool.backoff < FO_MAX_BACKOFF ? 2 * pool.backoff : FO_MAX_BACKOFF;
    } else {
        pool.backoff = FO_MIN_BACKOFF;
    }
    pool.job = NULL;
    pool.busy = 0;
    pthread_mutex_unlock(&pool.lock);
}
