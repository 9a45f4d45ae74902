/* A small thread pool for the decode products: chunks claimed dynamically, no barrier.
 *
 *     pool_run(fn, ctx, n_chunks, n_threads);   // runs fn(ctx, 0 .. n_chunks-1)
 *
 * Why not an OpenMP parallel region: decode runs ~50 short regions per token, and a region ends
 * with a barrier that waits for every thread. On a machine where another process holds a core, one
 * of our threads is often not running; with a static row split every region then waits for it, and
 * its spinning partner burns the time slice it needs. Here:
 *   - the caller works too, and chunks are claimed one at a time from an atomic counter, so a thread
 *     that is not running simply claims nothing;
 *   - the caller waits only for chunks another thread has actually claimed (a few microseconds of
 *     work each), never for a thread that has not woken up; it polls for POOL_CALLER_SPIN_NS, then
 *     sleeps on a futex, so that if the thread holding the last chunk was preempted, the caller's
 *     core goes idle and the scheduler can move that thread onto it;
 *   - idle workers poll for the next job for POOL_SPIN_NS (the gap between two products of one
 *     token), yielding their core whenever another thread wants it, then sleep on a futex: a passive
 *     wait between tokens and whenever decode stops.
 *   - a worker that another process takes off its core while it holds a chunk still stalls the caller
 *     (for up to a scheduler time slice, milliseconds). When a wait for claimed chunks lasts over
 *     POOL_STALL_NS twice within POOL_BUSY_WINDOW_NS, a core is evidently busy with something else:
 *     jobs then run on the caller alone for a while (the worker sleeps, leaving the other core to the
 *     competing process): 50 ms, doubling up to 800 ms while stalls recur right after, after which
 *     threads are tried again. A lone stall (a page fault, a hypervisor taking the vCPU for a moment)
 *     changes nothing. On a quiet machine no wait gets near that bound.
 * The claim word packs (epoch << 32 | chunks left), so a worker that wakes late cannot claim a chunk
 * of a newer job with an older job's arguments; it reads the job only after a successful claim.
 * One pool per shared library that includes this header (static state). Linux only (futex).
 */
#ifndef RWKV_POOL_H
#define RWKV_POOL_H

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define POOL_MAX_WORKERS 63          /* threads besides the caller */
#define POOL_SPIN_NS 200000          /* how long an idle worker polls for the next job before it sleeps */
#define POOL_CALLER_SPIN_NS 100000   /* how long the caller polls for claimed chunks before it sleeps:
                                      * a chunk is microseconds of work, so on a quiet machine the caller
                                      * never sleeps (waking a sleeping thread can take longer in a VM) */
#define POOL_STALL_NS 400000         /* a wait this long for claimed chunks: the worker lost its core */
#define POOL_SOLO_MIN_NS 50000000    /* then run jobs alone 50 ms before trying threads again, */
#define POOL_SOLO_MAX_NS 800000000   /* doubling (up to 800 ms) while stalls keep coming back */
#define POOL_BUSY_WINDOW_NS 100000000  /* two stalls this close together: a busy core */

typedef void (*pool_fn)(void *ctx, int64_t chunk);

static struct {
    _Atomic uint64_t claim;          /* epoch << 32 | chunks not yet claimed */
    _Atomic uint32_t epoch;          /* futex word: bumped once per job */
    _Atomic uint32_t done;           /* futex word: chunks finished in the current job */
    _Atomic int caller_sleeping;
    _Atomic int sleepers;
    _Atomic int n_workers;           /* how many workers the current job wants */
    pool_fn fn;
    void *ctx;
    int64_t n_chunks;
    int started;                     /* worker threads created so far */
    uint64_t solo_until;             /* pool_now_ns() before which jobs run on the caller alone */
    uint64_t solo_ns;                /* length of the last solo period */
    uint64_t last_stall;             /* pool_now_ns() at the last stall */
    uint64_t stalls;                 /* waits over POOL_STALL_NS so far (pool_stalls()) */
    pthread_mutex_t lock;            /* one job at a time; a second caller runs its job alone */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static inline uint64_t pool_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Claim and run chunks of job `epoch` until none is left (or a newer job started). */
static void pool_work(uint32_t epoch) {
    uint64_t c = atomic_load_explicit(&pool.claim, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(c >> 32) != epoch || (uint32_t)c == 0) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &c, c - 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;                                  /* c now holds the current value */
        int64_t n = pool.n_chunks;
        pool.fn(pool.ctx, n - (int64_t)(uint32_t)c);
        if (atomic_fetch_add(&pool.done, 1) + 1 == (uint32_t)n && atomic_load(&pool.caller_sleeping))
            syscall(SYS_futex, &pool.done, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        c = atomic_load_explicit(&pool.claim, memory_order_acquire);
    }
}

static uint32_t pool_wait_for_job(uint32_t last) {
    uint64_t until = pool_now_ns() + POOL_SPIN_NS;
    for (int i = 0;; i++) {
        uint32_t e = atomic_load_explicit(&pool.epoch, memory_order_acquire);
        if (e != last) return e;
        _mm_pause();
        if ((i & 15) == 15) {
            sched_yield();                             /* cheap when nothing else wants this core */
            if (pool_now_ns() > until) break;
        }
    }
    for (;;) {
        atomic_fetch_add(&pool.sleepers, 1);
        uint32_t e = atomic_load(&pool.epoch);
        if (e == last) syscall(SYS_futex, &pool.epoch, FUTEX_WAIT_PRIVATE, last, NULL, NULL, 0);
        atomic_fetch_sub(&pool.sleepers, 1);
        e = atomic_load_explicit(&pool.epoch, memory_order_acquire);
        if (e != last) return e;
    }
}

static void *pool_worker(void *arg) {
    int id = (int)(intptr_t)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);           /* signals belong to the interpreter */
    uint32_t epoch = atomic_load(&pool.epoch);
    for (;;) {
        epoch = pool_wait_for_job(epoch);
        if (id < atomic_load_explicit(&pool.n_workers, memory_order_relaxed)) pool_work(epoch);
    }
    return NULL;
}

static void pool_after_fork_in_child(void) {
    pool.started = 0;                                  /* the workers did not survive the fork */
    pthread_mutex_init(&pool.lock, NULL);
}

static void pool_start_workers(int want) {
    if (want > POOL_MAX_WORKERS) want = POOL_MAX_WORKERS;
    if (pool.started == 0) pthread_atfork(NULL, NULL, pool_after_fork_in_child);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (; pool.started < want; pool.started++) {
        pthread_t t;
        if (pthread_create(&t, &attr, pool_worker, (void *)(intptr_t)pool.started)) break;
    }
    pthread_attr_destroy(&attr);
}

/* Every chunk is claimed: wait for the ones other threads are still running. */
static void pool_wait_done(uint32_t n) {
    if (atomic_load_explicit(&pool.done, memory_order_acquire) == n) return;
    uint64_t start = pool_now_ns(), until = start + POOL_CALLER_SPIN_NS;
    for (int i = 0; atomic_load_explicit(&pool.done, memory_order_acquire) != n; i++) {
        if ((i & 63) != 63 || pool_now_ns() < until) {
            _mm_pause();
            continue;
        }
        atomic_store(&pool.caller_sleeping, 1);
        uint32_t d = atomic_load(&pool.done);
        if (d != n) syscall(SYS_futex, &pool.done, FUTEX_WAIT_PRIVATE, d, NULL, NULL, 0);
        atomic_store(&pool.caller_sleeping, 0);
    }
    uint64_t end = pool_now_ns();
    if (end - start > POOL_STALL_NS) {
        pool.stalls++;
        /* one stall alone (a page fault, the hypervisor taking the vCPU a moment) is not a busy core:
         * only a second stall within POOL_BUSY_WINDOW_NS of the first switches to the caller alone */
        if (pool.last_stall && end - pool.last_stall < POOL_BUSY_WINDOW_NS) {
            /* busy again right after the last solo period: the competitor is still there */
            int again = pool.solo_until && end < pool.solo_until + POOL_BUSY_WINDOW_NS;
            pool.solo_ns = again ? 2 * pool.solo_ns : POOL_SOLO_MIN_NS;
            if (pool.solo_ns > POOL_SOLO_MAX_NS) pool.solo_ns = POOL_SOLO_MAX_NS;
            pool.solo_until = end + pool.solo_ns;
        }
        pool.last_stall = end;
    }
}

/* How many times a wait for claimed chunks exceeded POOL_STALL_NS (the pool then ran alone a while). */
int64_t pool_stalls(void) { return (int64_t)pool.stalls; }

static void pool_run_alone(pool_fn fn, void *ctx, int64_t n_chunks) {
    for (int64_t i = 0; i < n_chunks; i++) fn(ctx, i);
}

static void pool_run(pool_fn fn, void *ctx, int64_t n_chunks, int64_t n_threads) {
    if (n_threads <= 1 || n_chunks <= 1 || n_chunks >= ((int64_t)1 << 32) ||
        pthread_mutex_trylock(&pool.lock)) {
        pool_run_alone(fn, ctx, n_chunks);
        return;
    }
    if (pool.solo_until && pool_now_ns() < pool.solo_until) {   /* a core is busy elsewhere: alone */
        pthread_mutex_unlock(&pool.lock);
        pool_run_alone(fn, ctx, n_chunks);
        return;
    }
    int workers = (int)(n_threads - 1 < POOL_MAX_WORKERS ? n_threads - 1 : POOL_MAX_WORKERS);
    if (pool.started < workers) pool_start_workers(workers);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_chunks = n_chunks;
    atomic_store_explicit(&pool.n_workers, workers, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    uint32_t epoch = atomic_load_explicit(&pool.epoch, memory_order_relaxed) + 1;
    atomic_store_explicit(&pool.claim, ((uint64_t)epoch << 32) | (uint64_t)n_chunks, memory_order_release);
    atomic_store(&pool.epoch, epoch);                  /* seq_cst: pairs with sleepers++ */
    if (atomic_load(&pool.sleepers) > 0)
        syscall(SYS_futex, &pool.epoch, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    pool_work(epoch);
    pool_wait_done((uint32_t)n_chunks);
    pthread_mutex_unlock(&pool.lock);
}

#endif
