/* Weight-only int8 matrix-vector products for the CPU decode step (AVX2 + FMA; AVX-512 where the CPU has it).

   y (M, N) = x (M, K) @ (w (N, K) * scales (N,)[:, None])^T, everything fp32 but w.

   Decode reads every weight once per token, so its speed is memory bandwidth. The weights are stored
   packed: blocks of ROWS output rows, and within a block 16-column chunks of each row one after the
   other, shape (N / ROWS, K / 16, ROWS, 16). A block is then one sequential stream the prefetcher
   follows, where ROWS separate rows would be ROWS short streams. Each int8 is widened to fp32 and
   multiplied by x with an FMA; x is read once per block for all ROWS rows. Built and loaded by
   corral/engine/cpu_kernels.py, which also packs the weights.

   Threads: the kernels' shared pool (pool.c), output blocks split between the parts. On ARM the same
   layout runs through NEON (four 4-lane FMAs per chunk and row of x). */

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#else
#error "int8.c needs AVX2 (x86) or NEON (aarch64)"
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define ROWS 4
#define CHUNK 16

int corral_int8_rows(void) { return ROWS; }
int corral_int8_chunk(void) { return CHUNK; }

#ifdef __aarch64__
/* NEON: a chunk of 16 int8 weights widened to 4 x 4 floats once for up to two rows of x. */
static void blocks_neon(const float *x, const int8_t *packed, const float *scales, float *y, int64_t M, int64_t N,
                        int64_t K, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const int8_t *block = packed + b * ROWS * K;
        for (int64_t m = 0; m < M; m += 2) {
            const int two = m + 1 < M;
            const float *xa = x + m * K, *xb = two ? xa + K : xa;
            float32x4_t a[ROWS], c[ROWS];
            for (int r = 0; r < ROWS; r++) a[r] = c[r] = vdupq_n_f32(0.0f);
            const int8_t *p = block;
            for (int64_t k = 0; k < K; k += CHUNK, p += CHUNK * ROWS) {
                float32x4_t xav[4], xbv[4];
                for (int i = 0; i < 4; i++) xav[i] = vld1q_f32(xa + k + 4 * i), xbv[i] = vld1q_f32(xb + k + 4 * i);
                for (int r = 0; r < ROWS; r++) {
                    const int8x16_t q = vld1q_s8(p + CHUNK * r);
                    const int16x8_t lo = vmovl_s8(vget_low_s8(q)), hi = vmovl_high_s8(q);
                    const float32x4_t w[4] = {vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
                                              vcvtq_f32_s32(vmovl_high_s16(lo)),
                                              vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
                                              vcvtq_f32_s32(vmovl_high_s16(hi))};
                    for (int i = 0; i < 4; i++) {
                        a[r] = vfmaq_f32(a[r], w[i], xav[i]);
                        c[r] = vfmaq_f32(c[r], w[i], xbv[i]);
                    }
                }
            }
            float *ya = y + m * N + b * ROWS;
            for (int r = 0; r < ROWS; r++) {
                ya[r] = vaddvq_f32(a[r]) * scales[b * ROWS + r];
                if (two) ya[N + r] = vaddvq_f32(c[r]) * scales[b * ROWS + r];
            }
        }
    }
}

const char *corral_int8_isa(void) { return "neon"; }

void corral_int8_matvec_blocks(const float *x, const int8_t *packed, const float *scales, float *y, int64_t M,
                               int64_t N, int64_t K, int64_t b0, int64_t b1) {
    blocks_neon(x, packed, scales, y, M, N, K, b0, b1);
}

#else /* x86: AVX2, and AVX-512 where the CPU has it */

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

/* AVX-512: a chunk of 16 weights is one vector (one widening, one FMA per row of x, where AVX2 takes two
   of each), widened once for up to four rows of x (a batched decode step: at 8 rows this path is bound by
   its FMAs, and a widening per pair of rows cost 10% more). Same layout, same order over the chunks; lane
   sums of 16 instead of 8, so the last bits differ from the AVX2 path's. A row's sums are the same chain
   whether it goes in a group of 4, 2 or alone. */
#define AVX512 __attribute__((target("avx512f")))

AVX512 static inline __m512 widen16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* Rows m .. m + MR - 1 of x against output block b (MR a constant wherever this is inlined: 4, 2 or 1). */
AVX512 static inline __attribute__((always_inline)) void tile_avx512(const int MR, const float *x, const int8_t *block,
                                                                     const float *scales, float *y, int64_t m,
                                                                     int64_t N, int64_t K, int64_t b) {
    __m512 acc[4][ROWS];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_setzero_ps();
    const int8_t *p = block;
    for (int64_t k = 0; k < K; k += CHUNK, p += CHUNK * ROWS) {
        __m512 xv[4];
        for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_ps(x + (m + i) * K + k);
        _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);
        for (int r = 0; r < ROWS; r++) {
            const __m512 w = widen16(p + CHUNK * r);
            for (int i = 0; i < MR; i++) acc[i][r] = _mm512_fmadd_ps(w, xv[i], acc[i][r]);
        }
    }
    for (int i = 0; i < MR; i++) {
        float *yi = y + (m + i) * N + b * ROWS;
        for (int r = 0; r < ROWS; r++) yi[r] = _mm512_reduce_add_ps(acc[i][r]) * scales[b * ROWS + r];
    }
}

AVX512 static void blocks_avx512(const float *x, const int8_t *packed, const float *scales, float *y, int64_t M,
                                 int64_t N, int64_t K, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const int8_t *block = packed + b * ROWS * K;
        int64_t m = 0;
        for (; m + 3 < M; m += 4) tile_avx512(4, x, block, scales, y, m, N, K, b); /* 32 registers: 16 sums */
        for (; m + 1 < M; m += 2) tile_avx512(2, x, block, scales, y, m, N, K, b);
        for (; m < M; m++) tile_avx512(1, x, block, scales, y, m, N, K, b);
    }
}

/* "avx512" where the CPU has AVX-512F, else "avx2"; CORRAL_CPU_ISA=avx2 (or scalar) caps it, as in qblock.c. */
static int use_avx512(void) {
    static int chosen = -1; /* a race only computes the same value twice */
    if (chosen < 0) {
        const char *cap = getenv("CORRAL_CPU_ISA");
        __builtin_cpu_init();
        chosen = __builtin_cpu_supports("avx512f") && !(cap && (!strcmp(cap, "avx2") || !strcmp(cap, "scalar")));
    }
    return chosen;
}

const char *corral_int8_isa(void) { return use_avx512() ? "avx512" : "avx2"; }

static void blocks_avx2(const float *x, const int8_t *packed, const float *scales, float *y, int64_t M, int64_t N,
                        int64_t K, int64_t b0, int64_t b1);

/* Output blocks b0..b1-1 of y = x @ W^T. */
void corral_int8_matvec_blocks(const float *x, const int8_t *packed, const float *scales, float *y, int64_t M,
                               int64_t N, int64_t K, int64_t b0, int64_t b1) {
    if (use_avx512()) blocks_avx512(x, packed, scales, y, M, N, K, b0, b1);
    else blocks_avx2(x, packed, scales, y, M, N, K, b0, b1);
}

/* AVX2. Rows of x go two at a time (a batch of decode tokens): each int8 weight is widened once and used
   for both, which halves the widening work of a batched step. */
static void blocks_avx2(const float *x, const int8_t *packed, const float *scales, float *y, int64_t M, int64_t N,
                        int64_t K, int64_t b0, int64_t b1) {
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

#endif

/* --- threaded entry -------------------------------------------------------------------------------- */

struct int8_job {
    const float *x;
    const int8_t *packed;
    const float *scales;
    float *y;
    int64_t M, N, K;
};

static void int8_part(void *ctx, int part, int parts) {
    struct int8_job *j = ctx;
    long long b0, b1;
    corral_split(j->N / ROWS, 1, part, parts, &b0, &b1);
    if (b0 < b1) corral_int8_matvec_blocks(j->x, j->packed, j->scales, j->y, j->M, j->N, j->K, b0, b1);
}

/* N % ROWS == 0 and K % CHUNK == 0 (the caller checks). */
void corral_int8_matvec(const float *x, const int8_t *packed, const float *scales, float *y,
                        int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t blocks = N / ROWS;
    if (blocks < 2 * threads) threads = 1;
    struct int8_job j = {x, packed, scales, y, M, N, K};
    corral_parallel(int8_part, &j, threads);
}
