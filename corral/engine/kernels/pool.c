/* The thread pool of Corral's CPU kernels, not OpenMP.

   A decode step makes hundreds of short calls (tens of microseconds each) from the engine's loop
   thread, which is not the process's first thread; libgomp throttles its workers' spinning as soon as
   more than one thread has ever run a parallel region (the loader, the engine, torch's own ops), so
   each call then paid a futex wake-up of ~70 us, and a decode step took 2.3x as long as on the main
   thread. Here the workers spin for a short while after each call (the next one comes within
   microseconds inside a step) and then sleep on a condition variable, so an idle engine holds no core.
   While spinning they yield the core every few hundred rounds: when another process wants the core,
   it gets it (a pure busy-wait would keep it from running and make the caller wait for both). */

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "pool.h"

#define MAX_THREADS 64
#define SPIN_ROUNDS 20000 /* ~0.1-0.5 ms of _mm_pause before a worker sleeps */
#define YIELD_EVERY 256

static struct {
    corral_task_fn fn;
    void *ctx;
    int parts;
} job;

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one caller at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static atomic_long generation; /* bumped once per call */
static atomic_int remaining;   /* workers that have not finished the current call */
static int n_workers;

static inline void pause_cpu(void) { /* a spin-wait hint to the core */
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static inline void relax(int spins) {
    if (spins % YIELD_EVERY == YIELD_EVERY - 1) sched_yield();
    else pause_cpu();
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg; /* 1..n_workers; the caller is part 0 */
    long seen = 0;
    for (;;) {
        long g;
        int spins = 0;
        while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                relax(spins);
                continue;
            }
            pthread_mutex_lock(&wake_lock);
            while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&wake, &wake_lock);
            pthread_mutex_unlock(&wake_lock);
            break;
        }
        seen = g;
        if (id < job.parts) job.fn(job.ctx, id, job.parts);
        atomic_fetch_sub_explicit(&remaining, 1, memory_order_acq_rel);
    }
    return NULL;
}

void corral_parallel(corral_task_fn fn, void *ctx, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1 || pthread_mutex_trylock(&call_lock) != 0) {
        fn(ctx, 0, 1);
        return;
    }
    while (n_workers < threads - 1) { /* started on first use, kept for the process's life */
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(n_workers + 1)) != 0) break;
        pthread_detach(t);
        n_workers++;
    }
    job.fn = fn, job.ctx = ctx;
    job.parts = threads < n_workers + 1 ? threads : n_workers + 1;
    atomic_store_explicit(&remaining, n_workers, memory_order_release);
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&wake_lock);
    fn(ctx, 0, job.parts);
    for (int spins = 0; atomic_load_explicit(&remaining, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_ROUNDS) relax(spins);
        else sched_yield(); /* a worker lost its core: let it run */
    }
    pthread_mutex_unlock(&call_lock);
}
