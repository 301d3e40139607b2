/* Weight-only int8 matrix-vector products for the CPU decode step (AVX2 + FMA, OpenMP).

   y (M, N) = x (M, K) @ (w (N, K) * scales (N,)[:, None])^T, everything fp32 but w.

   Decode reads every weight once per token, so its speed is memory bandwidth. The weights are stored
   packed: blocks of ROWS output rows, and within a block 16-column chunks of each row one after the
   other, shape (N / ROWS, K / 16, ROWS, 16). A block is then one sequential stream the prefetcher
   follows, where ROWS separate rows would be ROWS short streams. Each int8 is widened to fp32 and
   multiplied by x with an FMA; x is read once per block for all ROWS rows. Built and loaded by
   corral/engine/cpu_kernels.py, which also packs the weights. */

#include <immintrin.h>
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

/* N % ROWS == 0 and K % CHUNK == 0 (the caller checks). */
void corral_int8_matvec(const float *x, const int8_t *packed, const float *scales, float *y,
                        int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t blocks = N / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *block = packed + b * ROWS * K;
        for (int64_t m = 0; m < M; m++) {  /* M is small (decode): the block stays in cache across m */
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
