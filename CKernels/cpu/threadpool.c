/*
 * threadpool.c — one persistent pool of worker threads shared by every CPU kernel.
 *
 * ck_parallel_for splits [0, n) into one contiguous range per participating thread (the caller is one of
 * them) and waits for all. Workers sleep on a condition variable between jobs, after a short spin so that
 * the back-to-back kernels of a model evaluation do not pay a futex wake-up each.
 *
 * Re-entrancy: a call made from inside a task, or while another thread is using the pool, runs serially
 * on the caller. That keeps nested kernels (an attention tile calling the GEMM) and concurrent callers
 * (parallel tests) correct without deadlock.
 */
#define _GNU_SOURCE
#include "ckernels.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_THREADS 256

typedef struct {
    ck_range_fn fn;
    void *ctx;
    int64_t n;
    int parts;                    /* how many ranges this job is split into */
} job_t;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* held by the thread running a job */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond = PTHREAD_COND_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static job_t current_job;
static atomic_uint_fast64_t job_generation;   /* bumped for each job; workers wait for a change */
static atomic_int pending;                    /* workers that have not yet finished the current job */
static atomic_int requested_threads;          /* what ck_set_num_threads asked for */
static int started_workers;                   /* workers alive (grows, never shrinks) */
static _Thread_local int inside_task;

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)(n > MAX_THREADS ? MAX_THREADS : n) : 1;
}

static void run_part(const job_t *job, int part) {
    int64_t chunk = (job->n + job->parts - 1) / job->parts;
    int64_t begin = (int64_t)part * chunk;
    int64_t end = begin + chunk < job->n ? begin + chunk : job->n;
    if (begin < end) job->fn(job->ctx, begin, end);
}

typedef struct {
    int index;            /* worker i runs part i + 1; the caller runs part 0 */
    uint64_t generation;  /* the last job published before this worker existed */
} worker_start_t;

static void *worker_main(void *arg) {
    worker_start_t start = *(worker_start_t *)arg;
    free(arg);
    int index = start.index;
    uint64_t seen = start.generation;
    inside_task = 1;
    for (;;) {
        uint64_t gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&job_generation, memory_order_acquire)) == seen) {
            if (++spins < 20000) continue;
            pthread_mutex_lock(&wake_lock);
            while ((gen = atomic_load_explicit(&job_generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&wake_cond, &wake_lock);
            pthread_mutex_unlock(&wake_lock);
            break;
        }
        seen = gen;
        /* Every worker acknowledges every job, taking part or not, so the caller never publishes the next
         * job while a worker may still be reading this one. */
        if (index + 1 < current_job.parts) run_part(&current_job, index + 1);
        atomic_fetch_sub_explicit(&pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

static void pool_init(void) {
    if (atomic_load(&requested_threads) <= 0) atomic_store(&requested_threads, online_cpus());
}

static void ensure_workers(int threads) {
    while (started_workers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        worker_start_t *start = malloc(sizeof *start);
        if (!start) break;
        *start = (worker_start_t){started_workers, atomic_load(&job_generation)};
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, worker_main, start) != 0) {
            free(start);
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        started_workers++;
    }
}

void ck_set_num_threads(int n) {
    pthread_once(&pool_once, pool_init);
    if (n <= 0) n = online_cpus();
    if (n > MAX_THREADS) n = MAX_THREADS;
    atomic_store(&requested_threads, n);
}

int ck_get_num_threads(void) {
    pthread_once(&pool_once, pool_init);
    return atomic_load(&requested_threads);
}

void ck_parallel_for(int64_t n, int64_t grain, ck_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int threads = ck_get_num_threads();
    int64_t max_parts = (n + grain - 1) / grain;
    int parts = max_parts < threads ? (int)max_parts : threads;
    if (parts <= 1 || inside_task || pthread_mutex_trylock(&pool_lock) != 0) {
        fn(ctx, 0, n);
        return;
    }
    ensure_workers(threads);
    if (parts > started_workers + 1) parts = started_workers + 1;

    current_job = (job_t){fn, ctx, n, parts};
    atomic_store_explicit(&pending, started_workers, memory_order_release);
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add_explicit(&job_generation, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&wake_cond);
    pthread_mutex_unlock(&wake_lock);

    inside_task = 1;
    run_part(&current_job, 0);
    inside_task = 0;
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) { /* spin: ranges are balanced */ }
    pthread_mutex_unlock(&pool_lock);
}
