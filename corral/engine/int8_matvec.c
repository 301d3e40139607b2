/* Weight-only int8 matrix-vector products for the CPU decode step (AVX2 + FMA, own thread pool).

   y (M, N) = x (M, K) @ (w (N, K) * scales (N,)[:, None])^T, everything fp32 but w.

   Decode reads every weight once per token, so its speed is memory bandwidth. The weights are stored
   packed: blocks of ROWS output rows, and within a block 16-column chunks of each row one after the
   other, shape (N / ROWS, K / 16, ROWS, 16). A block is then one sequential stream the prefetcher
   follows, where ROWS separate rows would be ROWS short streams. Each int8 is widened to fp32 and
   multiplied by x with an FMA; x is read once per block for all ROWS rows. Built and loaded by
   corral/engine/cpu_kernels.py, which also packs the weights.

   Threads: a small pool of its own, not OpenMP. A decode step makes hundreds of short calls (tens of
   microseconds each) from the engine's loop thread, which is not the process's first thread; libgomp
   throttles its workers' spinning as soon as more than one thread has ever run a parallel region (the
   loader, the engine, torch's own ops), so each call then paid a futex wake-up of ~70 us, and a
   decode step took 2.3x as long as on the main thread. Here the workers spin for a short while after
   each call (the next one comes within microseconds inside a step) and then sleep on a condition
   variable, so an idle engine holds no core. One caller at a time uses the pool; a concurrent caller
   (a second model's engine) computes on its own thread instead of waiting. */

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#define ROWS 4
#define CHUNK 16

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 int8 at p -> 8 fp32 */
static inline __m256 widen(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

int corral_int8_rows(void) { return ROWS; }
int corral_int8_chunk(void) { return CHUNK; }

/* Output blocks b0..b1-1 of y = x @ W^T. Rows of x go two at a time (a batch of decode tokens): each
   int8 weight is widened once and used for both, which halves the widening work of a batched step. */
static void matvec_blocks(const float *x, const int8_t *packed, const float *scales, float *y,
                          int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const int8_t *block = packed + b * ROWS * K;
        int64_t m = 0;
        for (; m + 1 < M; m += 2) {  /* the block stays in cache across the rows of x */
            const float *xa = x + m * K, *xb = xa + K;
            __m256 a[ROWS], c[ROWS];
            for (int r = 0; r < ROWS; r++) a[r] = c[r] = _mm256_setzero_ps();
            const int8_t *p = block;
            for (int64_t k = 0; k < K; k += CHUNK, p += CHUNK * ROWS) {
                __m256 xa0 = _mm256_loadu_ps(xa + k), xa1 = _mm256_loadu_ps(xa + k + 8);
                __m256 xb0 = _mm256_loadu_ps(xb + k), xb1 = _mm256_loadu_ps(xb + k + 8);
                _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);
                for (int r = 0; r < ROWS; r++) {
                    __m256 w0 = widen(p + CHUNK * r), w1 = widen(p + CHUNK * r + 8);
                    a[r] = _mm256_fmadd_ps(w0, xa0, a[r]);
                    a[r] = _mm256_fmadd_ps(w1, xa1, a[r]);
                    c[r] = _mm256_fmadd_ps(w0, xb0, c[r]);
                    c[r] = _mm256_fmadd_ps(w1, xb1, c[r]);
                }
            }
            float *ya = y + m * N + b * ROWS, *yb = ya + N;
            for (int r = 0; r < ROWS; r++) {
                ya[r] = hsum(a[r]) * scales[b * ROWS + r];
                yb[r] = hsum(c[r]) * scales[b * ROWS + r];
            }
        }
        for (; m < M; m++) {  /* the last row of an odd batch, or the one row of a single decode */
            const float *xm = x + m * K;
            __m256 acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
            const int8_t *p = block;
            for (int64_t k = 0; k < K; k += CHUNK, p += CHUNK * ROWS) {
                __m256 x0 = _mm256_loadu_ps(xm + k), x1 = _mm256_loadu_ps(xm + k + 8);
                _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);
                for (int r = 0; r < ROWS; r++) {
                    acc[r] = _mm256_fmadd_ps(widen(p + CHUNK * r), x0, acc[r]);
                    acc[r] = _mm256_fmadd_ps(widen(p + CHUNK * r + 8), x1, acc[r]);
                }
            }
            float *ym = y + m * N + b * ROWS;
            for (int r = 0; r < ROWS; r++) ym[r] = hsum(acc[r]) * scales[b * ROWS + r];
        }
    }
}

/* --- the thread pool ------------------------------------------------------------------------------ */

#define MAX_THREADS 64
#define SPIN_ROUNDS 20000 /* ~0.1-0.5 ms of _mm_pause before a worker sleeps */

static struct {
    const float *x;
    const int8_t *packed;
    const float *scales;
    float *y;
    int64_t M, N, K;
    int parts;
} job;

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one caller at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static atomic_long generation; /* bumped once per call */
static atomic_int remaining;   /* workers that have not finished the current call */
static int n_workers;

static void run_part(int part) {
    int64_t blocks = job.N / ROWS, per = (blocks + job.parts - 1) / job.parts;
    int64_t b0 = part * per, b1 = b0 + per < blocks ? b0 + per : blocks;
    if (b0 < b1) matvec_blocks(job.x, job.packed, job.scales, job.y, job.M, job.N, job.K, b0, b1);
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg; /* 1..n_workers; the caller is part 0 */
    long seen = 0;
    for (;;) {
        long g;
        int spins = 0;
        while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&wake_lock);
            while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&wake, &wake_lock);
            pthread_mutex_unlock(&wake_lock);
            break;
        }
        seen = g;
        if (id < job.parts) run_part(id);
        atomic_fetch_sub_explicit(&remaining, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* N % ROWS == 0 and K % CHUNK == 0 (the caller checks). */
void corral_int8_matvec(const float *x, const int8_t *packed, const float *scales, float *y,
                        int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t blocks = N / ROWS;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1 || blocks < 2 * threads || pthread_mutex_trylock(&call_lock) != 0) {
        matvec_blocks(x, packed, scales, y, M, N, K, 0, blocks);
        return;
    }
    while (n_workers < threads - 1) { /* started on first use, kept for the process's life */
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(n_workers + 1)) != 0) break;
        pthread_detach(t);
        n_workers++;
    }
    job.x = x, job.packed = packed, job.scales = scales, job.y = y, job.M = M, job.N = N, job.K = K;
    job.parts = threads < n_workers + 1 ? threads : n_workers + 1;
    atomic_store_explicit(&remaining, n_workers, memory_order_release);
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&wake_lock);
    run_part(0);
    for (int spins = 0; atomic_load_explicit(&remaining, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_ROUNDS) _mm_pause();
        else sched_yield(); /* a worker lost its core: let it run */
    }
    pthread_mutex_unlock(&call_lock);
}
