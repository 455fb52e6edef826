/*
 * threads.c -- fo_run: one call's tensors, split across threads.
 *
 * The elements of all the call's tensors form one range that the threads claim pieces of from
 * a shared atomic cursor: up to FO_MAX_PIECE elements at first, fewer near the end (guided), so
 * the split is by bytes, not by tensor, a thread that starts late finds less to do, and at the
 * end no thread holds more than a short piece.  Every element is updated independently, so any
 * split, hence any thread count, gives bit-identical results.
 *
 * Who runs the pieces.  In a training loop the step comes right after the forward and backward
 * passes, whose thread pool keeps spinning on the other cores for a while (torch's OpenMP
 * workers ~10 ms here); a thread of our own then has to win a core from them, and mostly does
 * not.  So when the process has GNU OpenMP loaded (torch's libgomp, or any library's), the
 * pieces run in a parallel region of that runtime (GOMP_parallel, its stable entry point), on
 * those same, already spinning workers.  It is looked up among the loaded objects: nothing is
 * linked against it, nothing is loaded.  Linking with -fopenmp instead would load a runtime
 * into every process and, imported before torch, hand torch our libgomp in place of its own.
 * numpy's matmuls leave the same kind of neighbour: OpenBLAS's pthread workers spin ~100 ms
 * after each, without yielding.  So without libgomp, where a pthread OpenBLAS is loaded (with
 * at least the step's thread count and no threads callback set), the pieces run on its
 * workers, through the gotoblas_pthread entry it exports; after a matmul they are the ones
 * awake.  Otherwise (C programs, fewer OpenBLAS threads) the library's own pool runs them.
 * Neither runtime in a forked child: libgomp's workers do not survive fork and a parallel
 * region there can hang.
 *
 * The own pool: workers spin for FO_SPIN_NS after their last piece, polling for the next job
 * and calling sched_yield() between polls so a neighbour waiting for the core gets it, then
 * sleep on a condition variable.  That is 1 ms of a core at most per call, against ~10 ms for
 * libgomp's default and ~100 ms for OpenBLAS's pthread workers on this machine.
 *
 * Whether threads pay is measured, not assumed.  Under a competing load two threads can be
 * slower than one: a worker preempted in the middle of a piece makes the caller wait, a
 * preempted caller makes the call wait.  So every large call's time per element is kept, per
 * span function and storage (each rule, dtype and bfloat16 combination has its own record:
 * their costs per element differ severalfold), for the threaded calls and the calls
 * run alone, and the faster way is used, with the other tried now and then to keep its record
 * current: after FO_MIN_PROBE calls at first, then at intervals that double while the choice
 * holds, up to every FO_MAX_PROBE calls, and shrink back when it changes; and at once after a
 * call slower than the other way's latest, or a threaded call in which the caller waited for a
 * late worker for over a quarter of the call (unless a probe has shown that threads pay even
 * so).  Where threads pay, that costs one call in FO_MAX_PROBE at one-thread speed; where they
 * do not, the faster way is found within a few calls, and probes are frequent only where the
 * two ways are close, so they cost little.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "internal.h"

/* weak: no -ldl needed where dlopen is not in libc (glibc < 2.34); a Python process has it */
#pragma weak dlopen
#pragma weak dlsym

/* Below this many elements a call stays on the calling thread: waking a sleeping worker costs
 * tens of microseconds on a VM, about what a two-buffer rule takes for this many float32 elements. */
#define FO_PARALLEL_MIN ((size_t)131072)
#define FO_MAX_PIECE ((size_t)16384) /* ~0.5 MB of a two-state rule's float32 streams per claim */
#define FO_MIN_PIECE ((size_t)2048)  /* the pieces the end of a call is cut into */
#define FO_MAX_THREADS 256
#define FO_SPIN_NS 1000000L         /* how long an idle worker polls before it sleeps */
#define FO_CALLER_SPIN_NS 20000L    /* how long the caller polls for a late worker before it sleeps */
#define FO_MIN_PROBE 8
#define FO_MAX_PROBE 64
#define FO_VERDICTS 16

typedef struct {
    fo_span_fn span;
    size_t count;
    void *const *const *bufs;
    int n_bufs;
    const size_t *n;
    const fo_call *call;
    size_t total, per_thread_share;
    size_t grain;          /* pieces start at multiples of it within each tensor (fo_run_blocks) */
    _Atomic size_t cursor; /* the next element (of all tensors, in order) to hand out */
    atomic_int slots;      /* workers that may still join */
    pthread_t caller;
    double caller_done;    /* when the caller found nothing left to claim */
    atomic_int caller_cpu; /* where the caller ran its latest piece (-1: unknown) */
    /* a gang (fo_blas_threads): `total` jobs of another library, one per claim, all at once */
    fo_blas_job_fn gang;
    char *gang_data;
    size_t gang_stride;
    int gang_arg;
} job;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    pthread_cond_t idle;    /* pool.busy cleared: a gang waiting for the pool may take it */
    _Atomic(job *) job;     /* the job open to workers, NULL when none */
    atomic_uint generation; /* bumped whenever a job is posted */
    atomic_int inside;      /* workers that may be touching the posted job */
    atomic_int caller_sleeping;
    atomic_int helpers;     /* workers the latest job asked for: only those spin */
    int sleepers, busy, started;
    int gangs_waiting;      /* fo_blas_threads calls waiting on `idle` */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
          .idle = PTHREAD_COND_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER};

/* Whether threads pay, per span function (rule and dtype) and storage; under pool.lock. */
enum { THREADED, ALONE };
typedef struct {
    fo_span_fn span;
    unsigned storage;  /* storage_of(call) */
    double rate[2];    /* seconds per element, averaged over the latest calls of each way */
    int way;           /* the faster way so far */
    int calls_to_probe, interval;
    int confirmed;     /* a probe has confirmed `way` since it was last chosen */
} verdict;
static verdict verdicts[FO_VERDICTS];
static unsigned verdicts_used;

/* a call's storage: 0 unstaged, else each buffer's dtype, the rounding and master weights */
static unsigned storage_of(const fo_call *c)
{
    if (!c || !c->staged) return 0;
    unsigned key = 1u | (unsigned)(c->rounding == FO_ROUND_NEAREST) << 1 | (c->master != NULL) << 2;
    for (int k = 0; k < c->n_bufs && k < FO_MAX_BUFFERS; k++)
        key |= ((unsigned)c->dtype[k] & 3u) << (3 + 2 * k);
    return key;
}

static verdict *verdict_for(fo_span_fn span, unsigned storage)
{
    for (int i = 0; i < FO_VERDICTS; i++)
        if (verdicts[i].span == span && verdicts[i].storage == storage) return &verdicts[i];
    verdict *v = &verdicts[verdicts_used++ % FO_VERDICTS];
    *v = (verdict){.span = span, .storage = storage, .way = THREADED,
                   .calls_to_probe = FO_MIN_PROBE, .interval = FO_MIN_PROBE};
    return v;
}

static int n_threads; /* 0 until first use */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int default_threads(void)
{
    const char *env = getenv("FASTOPT_NUM_THREADS");
    if (env && atoi(env) > 0) return atoi(env) < FO_MAX_THREADS ? atoi(env) : FO_MAX_THREADS;
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set) < FO_MAX_THREADS ? CPU_COUNT(&set) : FO_MAX_THREADS;
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

/* A tensor's length in the cursor's range: rounded up to whole grains, so that every piece,
 * a whole number of grains, starts at a grain boundary of its tensor. */
static inline size_t padded(const job *j, size_t n)
{
    return j->grain > 1 && j->grain != FO_WHOLE_TENSORS ? (n + j->grain - 1) / j->grain * j->grain : n;
}

static void run_piece(const job *j, size_t t, size_t at, size_t n)
{
    void *b[FO_MAX_BUFFERS];
    for (int k = 0; k < j->n_bufs; k++) b[k] = j->bufs[k] ? j->bufs[k][t] : NULL;
    j->span(j->call, b, t, at, n);
}

static int current_cpu(void)
{
#ifdef __linux__
    return sched_getcpu();
#else
    return -1;
#endif
}

/* Claim and run pieces until none are left.  A helper that finds itself on the caller's core
 * (the scheduler woke it there because the other cores were busy, e.g. with another pool's
 * spinning workers) leaves the rest to the caller: two threads taking turns on one core only
 * add their switches to one thread's time. */
static void work(job *j, int is_caller)
{
    size_t t = 0, base = 0; /* base: where tensor t starts in the whole range */
    for (;;) {
        if (is_caller) {
            atomic_store_explicit(&j->caller_cpu, current_cpu(), memory_order_relaxed);
        } else {
            const int cpu = current_cpu();
            if (cpu >= 0 && cpu == atomic_load_explicit(&j->caller_cpu, memory_order_relaxed)) return;
        }
        size_t at = atomic_load_explicit(&j->cursor, memory_order_relaxed), take;
        do {
            if (at >= j->total) return;
            const size_t left = j->total - at;
            size_t piece = left / j->per_thread_share; /* guided: a share of what is left */
            piece = piece > FO_MAX_PIECE ? FO_MAX_PIECE : piece < FO_MIN_PIECE ? FO_MIN_PIECE : piece;
            if (j->grain > 1 && j->grain != FO_WHOLE_TENSORS)
                piece = (piece + j->grain - 1) / j->grain * j->grain;
            take = piece < left ? piece : left;
        } while (!atomic_compare_exchange_weak(&j->cursor, &at, at + take));
        if (j->grain == FO_WHOLE_TENSORS) { /* the tensors that start in the piece, each whole */
            while (t < j->count && base < at) base += j->n[t++];
            for (; t < j->count && base < at + take; base += j->n[t++])
                if (j->n[t]) run_piece(j, t, 0, j->n[t]);
            continue;
        }
        while (take) { /* the piece may cover the end of one tensor and the start of others */
            while (base + padded(j, j->n[t]) <= at) base += padded(j, j->n[t++]);
            const size_t length = padded(j, j->n[t]), off = at - base;
            const size_t here = length - off < take ? length - off : take;
            if (off < j->n[t]) /* (not in the padding) */
                run_piece(j, t, off, j->n[t] - off < here ? j->n[t] - off : here);
            at += here;
            take -= here;
        }
    }
}

/* A gang's jobs, one per claim until none is left.  No thread hands its claim back (as work()
 * does on the caller's core): a job may wait for the others, so each needs its own thread. */
static void gang_work(job *j)
{
    for (;;) {
        const size_t i = atomic_fetch_add(&j->cursor, 1);
        if (i >= j->total) return;
        j->gang((int)i, j->gang_data + i * j->gang_stride, j->gang_arg);
    }
}

/* A thread's share of job j: a gang's jobs, or pieces of a step */
static void take_part(job *j, int is_caller)
{
    if (j->gang)
        gang_work(j);
    else
        work(j, is_caller);
}

static void run_alone(const job *j)
{
    for (size_t t = 0; t < j->count; t++)
        if (j->n[t]) run_piece(j, t, 0, j->n[t]);
}

/* Under pool.lock: the way the next call of `v` runs. */
static int choose(verdict *v)
{
    return --v->calls_to_probe > 0 ? v->way : !v->way;
}

/* Under pool.lock, after a call run `way` took `seconds`, of which the caller spent `waited`
 * waiting for late workers at the end. */
static void record(verdict *v, int way, const job *j, double seconds, double waited)
{
    const double rate = seconds / (double)j->total;
    if (way == v->way) {
        /* probe the other way at once after a call slower than the other way's latest, or
         * (threads) one in which a preempted worker held the caller up, unless a probe has
         * shown that threads pay even so */
        if ((v->rate[!way] > 0 && rate > v->rate[!way]) ||
            (way == THREADED && !v->confirmed && waited > 50e-6 && waited > 0.25 * seconds))
            v->calls_to_probe = 1;
        v->rate[way] = v->rate[way] > 0 ? 0.5 * (v->rate[way] + rate) : rate;
        return;
    }
    v->rate[way] = v->rate[way] > 0 ? 0.5 * (v->rate[way] + rate) : rate;
    /* a probe: switch if the other way is faster by more than the noise of one call */
    if (v->rate[way] < 0.97 * v->rate[v->way]) {
        v->way = way;
        v->interval = FO_MIN_PROBE;
        v->confirmed = 0;
    } else {
        v->interval = v->interval < FO_MAX_PROBE ? 2 * v->interval : FO_MAX_PROBE;
        v->confirmed = 1;
    }
    v->calls_to_probe = v->interval;
}

/* ---- GNU OpenMP, where the process already has it ---------------------------------------- */

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_fn gomp_parallel;
static double gomp_next_look;
static int in_forked_child; /* neither runtime's workers are used there */

#ifdef __linux__
/* Wheels often carry a library under a renamed soname (auditwheel: libgomp-<hash>.so.1,
 * numpy's libscipy_openblas64_-<hash>.so), so the loaded objects are searched by file name;
 * torch's copy is preferred when there are several, since its workers are the ones a
 * training loop keeps spinning. */
typedef struct {
    const char *word;
    char path[PATH_MAX];
} library_search;

static int note_library(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    library_search *search = arg;
    const char *path = info->dlpi_name, *slash = path ? strrchr(path, '/') : NULL;
    const char *file = slash ? slash + 1 : path;
    if (!file || !strstr(file, search->word)) return 0;
    if (!search->path[0] || (strstr(path, "torch") && !strstr(search->path, "torch")))
        snprintf(search->path, PATH_MAX, "%s", path);
    return 0;
}
#endif

/* Under pool.lock: a handle to the loaded library whose file name contains `word` (kept open:
 * never unloaded), NULL if none is. */
static void *find_loaded(const char *word)
{
#if defined(__linux__) && defined(RTLD_NOLOAD)
    if (!dlopen || !dlsym) return NULL;
    static library_search search;
    search.word = word;
    search.path[0] = 0;
    dl_iterate_phdr(note_library, &search);
    return search.path[0] ? dlopen(search.path, RTLD_LAZY | RTLD_NOLOAD) : NULL;
#else
    (void)word;
    return NULL;
#endif
}

/* Under pool.lock.  A library loaded later (import torch after the first step) is noticed at
 * the next look, twice a second at most. */
static gomp_parallel_fn find_gomp(void)
{
    if (gomp_parallel || in_forked_child) return gomp_parallel;
    const double t = now();
    if (t < gomp_next_look) return NULL;
    gomp_next_look = t + 0.5;
    void *lib = find_loaded("libgomp");
    if (lib) gomp_parallel = (gomp_parallel_fn)dlsym(lib, "GOMP_parallel");
    return gomp_parallel;
}

/* ---- OpenBLAS's pthread workers, where the process has them ------------------------------ */

/* gotoblas_pthread(n, fn, arg, stride) runs fn(arg + i * stride) for i < n, the first on the
 * calling thread and the others on OpenBLAS's own workers, and returns when all are done;
 * OpenBLAS exports it (unrenamed even in numpy's wheels) with its thread count and its
 * threads callback. */
typedef int (*openblas_pthread_fn)(int, void *, void *, int);
static struct {
    openblas_pthread_fn run;
    const int *threads;          /* blas_cpu_number */
    void *const *callback;       /* openblas_threads_callback_ (0.3.27 and later) */
    double next_look;
} openblas;

/* Under pool.lock: whether a step of `threads` threads may run on OpenBLAS's workers (caller
 * included); not without OpenBLAS, with fewer OpenBLAS threads than that, or with its threads
 * callback set (share_blas_threads: its parallel parts already run on this pool, which is
 * busy with this very step). */
static int on_openblas_workers(int threads)
{
    if (in_forked_child) return 0;
    if (!openblas.run) {
        const double t = now();
        if (t < openblas.next_look) return 0;
        openblas.next_look = t + 0.5;
        void *lib = find_loaded("openblas");
        if (!lib) return 0;
        openblas.threads = (const int *)dlsym(lib, "blas_cpu_number");
        openblas.callback = (void *const *)dlsym(lib, "openblas_threads_callback_");
        if (openblas.threads) openblas.run = (openblas_pthread_fn)dlsym(lib, "gotoblas_pthread");
        if (!openblas.run) return 0;
    }
    return !(openblas.callback && *openblas.callback) && *openblas.threads >= threads;
}

static void team_body(void *arg)
{
    job *j = arg;
    const int is_caller = pthread_equal(pthread_self(), j->caller);
    work(j, is_caller);
    if (is_caller) j->caller_done = now();
}

/* ---- the own pool -------------------------------------------------------------------------- */

/* Poll for a job newer than `seen` for up to FO_SPIN_NS; 0 if none came. */
static int spin_for_job(unsigned seen)
{
    const double until = now() + 1e-9 * FO_SPIN_NS;
    for (;;) {
        for (int i = 0; i < 256; i++) {
            if (atomic_load_explicit(&pool.generation, memory_order_acquire) != seen) return 1;
            cpu_relax();
        }
        if (now() > until) return 0;
        sched_yield();
    }
}

static void *worker(void *arg)
{
    const int id = (int)(intptr_t)arg;
#ifdef __linux__
    pthread_setname_np(pthread_self(), "fastopt-worker");
#endif
    /* one behind: a worker started for the job just posted (ensure_workers runs before the
     * post) joins it at once rather than wait for the next */
    unsigned seen = atomic_load(&pool.generation) - 1;
    for (;;) {
        /* only the workers the last job used spin; the others (after a lower thread count) sleep */
        if (id >= atomic_load(&pool.helpers) || !spin_for_job(seen)) {
            pthread_mutex_lock(&pool.lock);
            pool.sleepers++;
            while (atomic_load(&pool.generation) == seen || id >= atomic_load(&pool.helpers))
                pthread_cond_wait(&pool.wake, &pool.lock);
            pool.sleepers--;
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load(&pool.generation);
        /* count in before looking at the job: the caller waits for `inside` to drop to 0 after
         * closing the job, so a job seen here stays alive until this worker counts out */
        atomic_fetch_add(&pool.inside, 1);
        job *j = atomic_load(&pool.job);
        if (j && atomic_fetch_sub(&j->slots, 1) > 0) take_part(j, 0);
        if (atomic_fetch_sub(&pool.inside, 1) == 1 && atomic_load(&pool.caller_sleeping)) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return NULL;
}

static void reset_after_fork(void)
{
    /* the child has none of the parent's threads: our pool starts again empty, and libgomp's
     * pool (which still counts its lost workers) is not used at all */
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_cond_init(&pool.idle, NULL);
    atomic_store(&pool.job, NULL);
    atomic_store(&pool.inside, 0);
    atomic_store(&pool.caller_sleeping, 0);
    atomic_store(&pool.helpers, 0);
    pool.sleepers = pool.busy = pool.started = pool.gangs_waiting = 0;
    verdicts_used = 0;
    for (int i = 0; i < FO_VERDICTS; i++) verdicts[i] = (verdict){0};
    in_forked_child = 1;
    gomp_parallel = NULL;
}

/* Under pool.lock. */
static void register_atfork(void)
{
    static int registered;
    if (!registered) {
        pthread_atfork(NULL, NULL, reset_after_fork);
        registered = 1;
    }
}

/* Under pool.lock: the call that held the pool is done with it. */
static void release_pool(void)
{
    pool.busy = 0;
    if (pool.gangs_waiting) pthread_cond_broadcast(&pool.idle);
}

#define FO_WORKER_STACK ((size_t)1 << 20)

/* Under pool.lock: make sure `want` workers exist; returns how many do. */
static int ensure_workers(int want)
{
    while (pool.started < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* a staged per-tensor pass holds its blocks on the stack (~150 KiB for float64): at
         * least 1 MiB, where a C library's default is smaller (musl's 128 KiB) */
        size_t stack = 0;
        if (pthread_attr_getstacksize(&attr, &stack) == 0 && stack < FO_WORKER_STACK)
            pthread_attr_setstacksize(&attr, FO_WORKER_STACK);
        const int failed = pthread_create(&t, &attr, worker, (void *)(intptr_t)pool.started);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.started++;
    }
    return pool.started < want ? pool.started : want;
}

/* Called with pool.lock held and pool.busy set; returns with pool.lock held. */
static void run_on_own_pool(job *j, int helpers)
{
    atomic_store(&pool.helpers, helpers);
    atomic_store(&j->slots, helpers);
    atomic_store(&pool.job, j);
    atomic_fetch_add(&pool.generation, 1);
    if (pool.sleepers) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    take_part(j, 1);
    const double finished = j->caller_done = now();
    atomic_store(&pool.job, NULL); /* no worker joins from here on */
    /* a worker still in a piece: poll for about one short piece's time, then sleep, which
     * frees this core for it (sched_yield would hand it to any other process instead) */
    while (atomic_load(&pool.inside) > 0 && now() < finished + 1e-9 * FO_CALLER_SPIN_NS)
        for (int i = 0; i < 64; i++) cpu_relax();
    pthread_mutex_lock(&pool.lock);
    if (atomic_load(&pool.inside) > 0) {
        atomic_store(&pool.caller_sleeping, 1);
        while (atomic_load(&pool.inside) > 0) pthread_cond_wait(&pool.done, &pool.lock);
        atomic_store(&pool.caller_sleeping, 0);
    }
}

void fo_run(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs, const size_t *n,
            const fo_call *call)
{
    fo_run_blocks(span, count, bufs, n_bufs, n, call, 1);
}

void fo_run_blocks(fo_span_fn span, size_t count, void *const *const *bufs, int n_bufs,
                   const size_t *n, const fo_call *call, size_t grain)
{
    job j = {.span = span, .count = count, .bufs = bufs, .n_bufs = n_bufs, .n = n,
             .call = call, .grain = grain > 1 ? grain : 1};
    for (size_t t = 0; t < count; t++) j.total += padded(&j, n[t]);
    if (j.total < FO_PARALLEL_MIN) {
        run_alone(&j);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    register_atfork();
    if (!n_threads) n_threads = default_threads();
    const size_t pieces = (j.total + FO_MAX_PIECE - 1) / FO_MAX_PIECE;
    const int threads = (size_t)n_threads < pieces ? n_threads : (int)pieces;
    /* one job at a time: a call that finds the pool busy (another thread's step) runs alone */
    if (pool.busy || threads < 2) {
        pthread_mutex_unlock(&pool.lock);
        run_alone(&j);
        return;
    }
    verdict *v = verdict_for(span, storage_of(call));
    const int way = choose(v);
    pool.busy = 1; /* also keeps other callers off `v` until this call's time is in */
    j.per_thread_share = 4 * (size_t)threads;
    const gomp_parallel_fn gomp = way == THREADED ? find_gomp() : NULL;
    const int on_openblas = way == THREADED && !gomp && on_openblas_workers(threads);
    const int helpers = way == THREADED && !gomp && !on_openblas ? ensure_workers(threads - 1) : 0;
    j.caller = pthread_self();
    atomic_store(&j.caller_cpu, current_cpu());
    const double start = now();
    if (gomp) {
        pthread_mutex_unlock(&pool.lock);
        gomp(team_body, &j, (unsigned)threads, 0);
        pthread_mutex_lock(&pool.lock);
    } else if (on_openblas) {
        pthread_mutex_unlock(&pool.lock);
        openblas.run(threads, (void *)team_body, &j, 0); /* every part gets the job */
        pthread_mutex_lock(&pool.lock);
    } else if (helpers > 0) {
        run_on_own_pool(&j, helpers); /* returns with the lock held */
    } else {
        pthread_mutex_unlock(&pool.lock);
        run_alone(&j);
        pthread_mutex_lock(&pool.lock);
    }
    const double end = now();
    /* (the calling thread is always in the team) */
    if (way == ALONE || gomp || on_openblas || helpers > 0)
        record(v, way, &j, end - start, j.caller_done > 0 ? end - j.caller_done : 0);
    release_pool();
    pthread_mutex_unlock(&pool.lock);
}

/* ---- another library's parallel regions on this pool ------------------------------------ */

/* OpenBLAS's threads callback (openblas_set_threads_callback_function, OpenBLAS 0.3.27 and
 * later; fastopt.share_blas_threads() installs it).  A process that runs numpy's matmuls and
 * then a fastopt step otherwise has two pools: OpenBLAS's workers spin for up to ~100 ms after
 * a matmul and hold the cores our workers need.  With this, the matmuls run on our workers, so
 * the step that follows finds them awake, and nothing else spins.  The numjobs jobs of a call
 * may wait for each other (a level-3 call's do), so all run at once: the caller and numjobs - 1
 * workers, one job each; a call that finds the pool busy (another thread's step or matmul)
 * waits for it rather than run its jobs alone. */
void fo_blas_threads(int sync, fo_blas_job_fn dojob, int numjobs, size_t jobdata_stride,
                     void *jobdata, int dojob_arg)
{
    (void)sync; /* always waited for: the jobs' data is the caller's */
    if (numjobs <= 0) return;
    if (numjobs == 1) {
        dojob(0, jobdata, dojob_arg);
        return;
    }
    job j = {.total = (size_t)numjobs, .gang = dojob, .gang_data = jobdata,
             .gang_stride = jobdata_stride, .gang_arg = dojob_arg};
    pthread_mutex_lock(&pool.lock);
    register_atfork();
    pool.gangs_waiting++;
    while (pool.busy) pthread_cond_wait(&pool.idle, &pool.lock);
    pool.gangs_waiting--;
    pool.busy = 1;
    const int helpers = ensure_workers(numjobs - 1);
    j.caller = pthread_self();
    atomic_store(&j.caller_cpu, -1);
    if (helpers > 0) {
        run_on_own_pool(&j, helpers); /* returns with the lock held */
    } else { /* no thread could be started: one after the other is all there is */
        pthread_mutex_unlock(&pool.lock);
        gang_work(&j);
        pthread_mutex_lock(&pool.lock);
    }
    release_pool();
    pthread_mutex_unlock(&pool.lock);
}
