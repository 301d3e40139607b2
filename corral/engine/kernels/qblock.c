/* GGML's block types Q8_0, Q4_0 and Q4_1, and the matrix products of the CPU decode step on them.

   The layouts are GGUF's, bit for bit, so a GGUF tensor's bytes are used as they are. A weight (N, K)
   is N rows of K / 32 blocks; in a block, element j < 16 is the low nibble of qs[j] and element j + 16
   its high nibble:
       Q8_0 (type 8)  34 bytes: fp16 d, int8 q[32]             w = q * d
       Q4_0 (type 2)  18 bytes: fp16 d, uint8 qs[16]           w = (nibble - 8) * d
       Q4_1 (type 3)  20 bytes: fp16 d, fp16 m, uint8 qs[16]   w = nibble * d + m
   (the type numbers are GGML's).

   y (M, N) = x (M, K) @ W^T for the few rows of a decode step (and, in the interleaved layouts below, for
   prompts too: the byte products beat a dequantized fp32 GEMM there). As in llama.cpp, each row of x is
   quantized once per call into blocks of 32 integers with an fp32 scale (corral_q_prepare), so that a
   weight block times an activation block is an integer dot product, converted and scaled once per
   block. For Q8_0 weights the activations are int16 (madd_epi16): with int8 the rounding of the
   activations moved SmolLM2's logits by up to ~1 against the dequantized float model, and two paths
   that differ by float noise (a cached decode and a full forward) by ~0.03 in a log-probability; with
   int16 that is ~250 times smaller, and the 8-bit product is memory-bound either way. For the 4-bit
   types they are int8 (|q| <= 127), as llama.cpp's Q8_0 activations: their kernel is compute-bound at
   one row and a byte product halves its work, while the weights' own 4-bit error dwarfs the
   activations' (bench/activation_quality.py: SmolLM2 top-1 agreement with fp32 72.4% -> 71.8%, KL
   0.307 -> 0.306). The 4-bit nibbles are used unsigned and the offset comes in through the activation
   block's sum:
       sum_j (u_j d + m) dx q_j = d dx dot(u, q) + m (dx sum_j q_j)
   so Q4_0 is Q4_1 with m = -8 d. A 4-bit type | A16 (in GGUF's layout) keeps 16-bit activations, for
   results within ~2e-5 of the float product (CORRAL_Q4_ACTIVATION_BITS=16 in qblock.py).

   Four output rows go together: their four 8-lane integer sums fold with two hadds into one vector
   [r0 r1 r2 r3 | r0 r1 r2 r3] (each half a part of each row's sum), which is converted, scaled and
   accumulated at once instead of four times. The rows of x go MT at a time through each unpacked
   weight block (MT_VNNI on the AVX-512 path, whose 32 vector registers hold twice the accumulators: a
   decode step of 8 sequences unpacks each block once, not twice), so the weights come from memory once
   per call whatever M. A row of y gets the same arithmetic in the same order whatever M, the tile it
   falls in and the number of threads: a sequence's logits do not depend on what else is in its batch.

   Code paths, chosen at run time and reported by corral_q_isa():
       "avx512vnni"  the AVX2 code with vpdpwssd (two madd_epi16 and their sum in two instructions) and,
                     for the interleaved types, vpdpbusd
       "avx2"        AVX2 + FMA + F16C, which the whole x86 library is compiled for
       "neon-dotprod" (64-bit ARM) the interleaved types with sdot by lane (vdotq_laneq_s32): the same
                     integers and float steps as the AVX paths, bit for bit; the GGUF layout as "neon"
       "neon"        (64-bit ARM, e.g. a Cortex-A53 without dotprod) the GGUF layout with vmlal_s16; the
                     interleaved types in the scalar code
       "scalar"      plain C, the reference for any other CPU

   Prepared activations (corral_q_act_bytes bytes; opaque to callers but for the tests), block-major:
       int16 q[K/32][M][32]   the quantized values, |q| <= 32767 (Q8_0) or 127 (4-bit types)
       float d[K/32][M]       their scales, max|x| / 32767 or max|x| / 127
       float s[K/32][M]       d * sum(q), for the 4-bit types' offset term
   (for the interleaved types below, each q[b][m] slot starts with the same values as int8 q[32]).

   Interleaved 4-bit layouts (type | X8, Corral's own; the engine repacks a model's GGUF blocks into them
   in place, same bytes in all). Above, every block ends in a horizontal fold and gathers four scattered
   fp16 scales: at one row of x that is most of the work, and the 4-bit product ran at 50-60% of the
   memory bandwidth. Here 8 output rows go together, block by block: for rows 8g .. 8g+7 and block b,
       Q4_0|X8  144 bytes: fp16 d[8], then 4 x 32 bytes of nibbles
       Q4_1|X8  160 bytes: fp16 d[8], fp16 m[8], then 4 x 32 bytes of nibbles
   where byte 4i + t of the j-th 32 is row i's qs[4j + t] (its elements 4j + t and 4j + t + 16). One
   vector of nibbles then holds 4 elements of each of the 8 rows, a vpmaddubsw of it against 4 values of
   x broadcast gives each row's products in its own lanes, and the block's 8 sums land one per lane: no
   fold, and the scales are one load (with AVX-512 VNNI, vpdpbusd makes the byte products and adds them
   into int32 in one instruction). The group of 8 rows occupies exactly their 8 rows' bytes, so a slice
   of rows 8g .. 8h is still a slice of the tensor. */

#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef __aarch64__
#include <arm_neon.h>
#include <sys/auxv.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define QK 32 /* elements per block */
#define R 4   /* output rows per pass */
#define MT 4  /* rows of x per pass */
#define MT_VNNI 8 /* rows of x per pass on the AVX-512 path (32 vector registers) */
#define G 8   /* rows per group of the interleaved layouts */

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, X8 = 0x100, A16 = 0x200 };

static inline int block_bytes(int type) {
    return type == Q8_0 ? 34 : type == Q4_1 || type == (Q4_1 | X8) ? 20 : type == Q4_0 || type == (Q4_0 | X8) ? 18 : 0;
}

/* IEEE half -> float, without F16C (the scalar path's). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400)) man <<= 1, exp--;
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t load16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}

/* --- prepared activations --------------------------------------------------------------------------- */

#define QMAX16 32767.0f /* the activations of Q8_0 weights */
#define QMAX8 127.0f    /* those of the 4-bit types */

typedef struct {
    int16_t *q;
    float *d, *s;
} acts;

static acts act_view(const void *act, int64_t M, int64_t K) {
    int64_t n = K / QK * M;
    acts a;
    a.q = (int16_t *)act;
    a.d = (float *)(a.q + n * QK);
    a.s = a.d + n;
    return a;
}

size_t corral_q_act_bytes(int type, int64_t M, int64_t K) {
    (void)type; /* one layout for every type */
    size_t blocks = (size_t)(K / QK) * (size_t)M;
    return (blocks * (QK * sizeof(int16_t) + 2 * sizeof(float)) + 63) & ~(size_t)63;
}

/* 32 floats -> 32 int16 q = round(x / d), d = max|x| / qmax (rounding to nearest even), and d * sum(q). */
static void quantize_block(const float *x, const float qmax, int16_t *q, float *d_out, float *s_out) {
#ifdef __AVX2__
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / qmax, id = d != 0.0f ? 1.0f / d : 0.0f;
    __m256i n[4];
    __m256 total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        total = _mm256_add_ps(total, r);
        n[i] = _mm256_cvtps_epi32(r);
    }
    /* packs works within 128-bit lanes: the permute puts the 64-bit groups back in order */
    for (int i = 0; i < 2; i++) {
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(n[2 * i], n[2 * i + 1]), 0xD8);
        _mm256_storeu_si256((__m256i *)(q + 16 * i), packed);
    }
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    *d_out = d;
    *s_out = d * _mm_cvtss_f32(t);
#else
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / qmax, id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int j = 0; j < QK; j++) {
        q[j] = (int16_t)nearbyintf(x[j] * id);
        sum += q[j];
    }
    *d_out = d;
    *s_out = d * (float)sum;
#endif
}

/* q (int16, |q| <= 127) -> int8, in place: the interleaved kernels' operands. */
static void narrow_block(int16_t *q) {
    int16_t v[QK];
    memcpy(v, q, sizeof v);
    int8_t *q8 = (int8_t *)q;
    for (int j = 0; j < QK; j++) q8[j] = (int8_t)v[j];
}

void corral_q_prepare(int type, const float *x, void *act, int64_t M, int64_t K) {
    const int64_t nb = K / QK;
    const float qmax = (type & ~X8) == Q8_0 || (type & A16) ? QMAX16 : QMAX8;
    acts a = act_view(act, M, K);
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t j = b * M + m;
            quantize_block(x + m * K + b * QK, qmax, a.q + j * QK, a.d + j, a.s + j);
            if (type & X8) narrow_block(a.q + j * QK);
        }
}

/* --- the scalar path (the reference) ----------------------------------------------------------------- */

/* A block's 32 weights (Q8_0's q, the 4-bit types' unsigned nibbles) . 32 prepared activations. */
static int32_t block_dot(int type, const uint8_t *blk, const int16_t *q) {
    int32_t dot = 0;
    if (type == Q8_0) {
        for (int j = 0; j < QK; j++) dot += (int8_t)blk[2 + j] * q[j];
    } else {
        const uint8_t *qs = blk + (type == Q4_1 ? 4 : 2);
        for (int j = 0; j < QK / 2; j++) dot += (qs[j] & 0x0F) * q[j] + (qs[j] >> 4) * q[j + QK / 2];
    }
    return dot;
}

#ifdef __aarch64__
/* block_dot with NEON: the 32 weights widened to int16 and multiplied into int32 lanes (vmlal_s16). */
static int32_t block_dot_neon(int type, const uint8_t *blk, const int16_t *q) {
    int16x8_t wv[4];
    if (type == Q8_0) {
        const int8x16_t lo = vld1q_s8((const int8_t *)blk + 2), hi = vld1q_s8((const int8_t *)blk + 18);
        wv[0] = vmovl_s8(vget_low_s8(lo)), wv[1] = vmovl_s8(vget_high_s8(lo));
        wv[2] = vmovl_s8(vget_low_s8(hi)), wv[3] = vmovl_s8(vget_high_s8(hi));
    } else { /* byte j: element j in the low nibble, j + 16 in the high one */
        const uint8x16_t v = vld1q_u8(blk + (type == Q4_1 ? 4 : 2));
        const uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(v, 4);
        wv[0] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo)));
        wv[1] = vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(lo)));
        wv[2] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi)));
        wv[3] = vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(hi)));
    }
    int32x4_t acc = vdupq_n_s32(0);
    for (int i = 0; i < 4; i++) {
        const int16x8_t xv = vld1q_s16(q + 8 * i);
        acc = vmlal_s16(acc, vget_low_s16(wv[i]), vget_low_s16(xv));
        acc = vmlal_high_s16(acc, wv[i], xv);
    }
    return vaddvq_s32(acc);
}
#endif

/* One output row and one row of x at a time, a block's integer dot product at a time (neon: with NEON;
   a constant, so each caller gets its own copy of the loop). */
static inline void rows_gguf(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N,
                             int64_t K, int64_t n0, int64_t n1, const int neon) {
    const int64_t nb = K / QK, row = nb * block_bytes(type);
    acts a = act_view(act, M, K);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = w + n * row + b * block_bytes(type);
                const int16_t *q = a.q + (b * M + m) * QK;
                const float dx = a.d[b * M + m], dw = half_to_float(load16(blk));
#ifdef __aarch64__
                const int32_t dot = neon ? block_dot_neon(type, blk, q) : block_dot(type, blk, q);
#else
                (void)neon;
                const int32_t dot = block_dot(type, blk, q);
#endif
                if (type == Q8_0) {
                    sum += dw * dx * (float)dot;
                } else {
                    const float mw = type == Q4_1 ? half_to_float(load16(blk + 2)) : -8.0f * dw;
                    sum += dw * dx * (float)dot + mw * a.s[b * M + m];
                }
            }
            y[m * N + n] = sum;
        }
}

static void rows_scalar(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                        int64_t n0, int64_t n1) {
    rows_gguf(type, act, w, y, M, N, K, n0, n1, 0);
}

/* Where element e of row i (of 8) of an interleaved block lies: byte 4i + t of the j-th 32 bytes of nibbles
   (e = 4j + t, or 16 + 4j + t in the high nibble). */
static inline int x8_nibble(const uint8_t *qs, int i, int e) {
    const int low = e < QK / 2, f = low ? e : e - QK / 2;
    const uint8_t byte = qs[32 * (f / 4) + 4 * i + f % 4];
    return low ? byte & 0x0F : byte >> 4;
}

static inline int x8_header(int type) { return (type & ~X8) == Q4_1 ? 4 * G : 2 * G; }

static void rows_scalar_x8(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                           int64_t n0, int64_t n1) {
    const int64_t nb = K / QK, group = G * block_bytes(type);
    const int header = x8_header(type);
    acts a = act_view(act, M, K);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            const int i = (int)(n % G);
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = w + (n / G) * nb * group + b * group;
                const int8_t *q = (const int8_t *)(a.q + (b * M + m) * QK);
                int32_t dot = 0;
                for (int e = 0; e < QK; e++) dot += x8_nibble(blk + header, i, e) * q[e];
                const float dw = half_to_float(load16(blk + 2 * i)), dx = a.d[b * M + m], s = a.s[b * M + m];
                const float mw = header == 4 * G ? half_to_float(load16(blk + 2 * G + 2 * i)) : -8.0f * dw;
                sum += dw * dx * (float)dot + mw * s;
            }
            y[m * N + n] = sum;
        }
}

/* --- AVX2 and AVX-512 VNNI ---------------------------------------------------------------------------- */

#ifdef __AVX2__
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* w . x for 32 int16 each (two halves) -> 8 int32, each the sum of 4 products. No overflow: |w| <= 128,
   |x| <= 32767, and the later folds add at most 16 products (< 2^27). */
static ALWAYS_INLINE __m256i dot_avx2(const __m256i w[2], __m256i x0, __m256i x1) {
    return _mm256_add_epi32(_mm256_madd_epi16(w[0], x0), _mm256_madd_epi16(w[1], x1));
}

VNNI_TARGET static inline __m256i dot_vnni(const __m256i w[2], __m256i x0, __m256i x1) {
    return _mm256_dpwssd_epi32(_mm256_madd_epi16(w[0], x0), w[1], x1);
}

/* 4 elements of x (int8) broadcast against 4 nibbles of each of the 8 rows, for the low and the high nibbles,
   summed into each row's int32 lane. */
VNNI_TARGET static inline __m256i dpbusd_x8(__m256i acc, __m256i lo, __m256i hi, const int8_t *x) {
    int32_t x0, x1;
    memcpy(&x0, x, 4), memcpy(&x1, x + QK / 2, 4);
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, lo, _mm256_set1_epi32(x0)), hi, _mm256_set1_epi32(x1));
}

/* A block's 32 weights (as integers: Q8_0's q, the 4-bit types' unsigned nibbles) -> 2 x 16 int16. */
static ALWAYS_INLINE void widen(const int type, const uint8_t *blk, __m256i out[2]) {
    if (type == Q8_0) {
        out[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
        out[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));
    } else {
        const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + (type == Q4_1 ? 4 : 2))));
        out[0] = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F)); /* elements 0..15: low nibbles */
        out[1] = _mm256_srli_epi16(bytes, 4);                       /* elements 16..31: high nibbles */
    }
}

/* The fp16 scale d at the start of the R rows' blocks -> 4 floats. */
static ALWAYS_INLINE __m128 scales4(const uint8_t *const p[R]) {
    uint64_t h = 0;
    for (int r = 0; r < R; r++) h |= (uint64_t)load16(p[r]) << (16 * r);
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
}

/* Q4_1's d and m of the R rows' blocks (4 bytes each) in one conversion -> [d0 d1 d2 d3 m0 m1 m2 m3]. */
static ALWAYS_INLINE __m256 scales_mins4(const uint8_t *const p[R]) {
    uint32_t v[R];
    for (int r = 0; r < R; r++) memcpy(&v[r], p[r], 4);
    const __m128i lo = _mm_cvtsi64_si128((long long)(v[0] | (uint64_t)v[1] << 32));
    const __m128i hi = _mm_cvtsi64_si128((long long)(v[2] | (uint64_t)v[3] << 32));
    const __m256 dm = _mm256_cvtph_ps(_mm_unpacklo_epi64(lo, hi)); /* d0 m0 d1 m1 d2 m2 d3 m3 */
    return _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

/* Output rows n .. n + nvalid - 1 (w[] holds R row pointers; the tail repeats the last row) for rows
   m0 .. m0 + mt - 1 of x. type, vnni and mt are constants wherever this is inlined. */
static ALWAYS_INLINE void tile(const int type, const int vnni, const int mt, acts a, const uint8_t *const w[R],
                               int64_t nb, int64_t M, int64_t m0, float *y, int64_t N, int64_t n, int nvalid) {
    const int bytes = block_bytes(type);
    const int64_t next_group = R * nb * bytes; /* from a row to the same row of the next R */
    __m256 acc[MT_VNNI];
    for (int i = 0; i < mt; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p[R];
        for (int r = 0; r < R; r++) p[r] = w[r] + b * bytes;
        /* Short rows (K = 576: 10 cache lines) are too short for the hardware prefetcher to pick up four
           streams in time; fetching the next group's block meanwhile doubled Q8_0's speed there. */
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(p[r] + next_group), _MM_HINT_T0);
        __m256 dw, mw = _mm256_setzero_ps(); /* [d0 d1 d2 d3 | d0 d1 d2 d3], [m0 m1 m2 m3 | 0 0 0 0] */
        if (type == Q4_1) {
            const __m256 dm = scales_mins4(p);
            dw = _mm256_permute2f128_ps(dm, dm, 0x00);
            mw = _mm256_permute2f128_ps(dm, dm, 0x81); /* m in one half only: the halves are summed at the end */
        } else {
            const __m128 d4 = scales4(p);
            dw = _mm256_set_m128(d4, d4);
            if (type == Q4_0) mw = _mm256_set_m128(_mm_setzero_ps(), _mm_mul_ps(d4, _mm_set1_ps(-8.0f)));
        }
        __m256i wv[R][2];
        for (int r = 0; r < R; r++) widen(type, p[r], wv[r]);
        for (int i = 0; i < mt; i++) {
            const int64_t j = b * M + m0 + i;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(a.q + j * QK));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(a.q + j * QK + 16));
            __m256i s[R];
            for (int r = 0; r < R; r++) s[r] = vnni ? dot_vnni(wv[r], x0, x1) : dot_avx2(wv[r], x0, x1);
            const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
            const __m256 scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(a.d + j));
            if (type == Q8_0) {
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[i]);
            } else { /* one add on the loop-carried chain, not two FMAs (latency bound at M = 1 otherwise) */
                const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), scale);
                acc[i] = _mm256_add_ps(acc[i], _mm256_fmadd_ps(mw, _mm256_broadcast_ss(a.s + j), t));
            }
        }
    }
    for (int i = 0; i < mt; i++) {
        const __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
        float *out = y + (m0 + i) * N + n;
        if (nvalid == R)
            _mm_storeu_ps(out, t);
        else /* the lanes of the rows that exist */
            _mm_maskstore_ps(out, _mm_cmpgt_epi32(_mm_set1_epi32(nvalid), _mm_setr_epi32(0, 1, 2, 3)), t);
    }
}

static ALWAYS_INLINE void rows_simd(const int type, const int vnni, const void *act, const uint8_t *w, float *y,
                                    int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const int64_t nb = K / QK, row = nb * block_bytes(type);
    const acts a = act_view(act, M, K);
    for (int64_t n = n0; n < n1; n += R) {
        const int nvalid = n1 - n < R ? (int)(n1 - n) : R;
        const uint8_t *wr[R];
        for (int r = 0; r < R; r++) wr[r] = w + (n + (r < nvalid ? r : nvalid - 1)) * row;
        int64_t m = 0;
        if (vnni)
            for (; m + MT_VNNI <= M; m += MT_VNNI) tile(type, vnni, MT_VNNI, a, wr, nb, M, m, y, N, n, nvalid);
        for (; m + MT <= M; m += MT) tile(type, vnni, MT, a, wr, nb, M, m, y, N, n, nvalid);
        switch (M - m) {
        case 3: tile(type, vnni, 3, a, wr, nb, M, m, y, N, n, nvalid); break;
        case 2: tile(type, vnni, 2, a, wr, nb, M, m, y, N, n, nvalid); break;
        case 1: tile(type, vnni, 1, a, wr, nb, M, m, y, N, n, nvalid); break;
        }
    }
}

/* Interleaved group g (output rows 8g .. 8g + 7, one per lane) for rows m0 .. m0 + mt - 1 of x. Per block,
   4 elements of every row against 4 values of x broadcast, 8 times: vpmaddubsw (nibble x int8 -> int16
   pairs, |sum of 8| <= 8 x 2 x 15 x 127 < 2^15) and one vpmaddwd, or with VNNI vpdpbusd straight into
   int32; the same integers either way. */
static ALWAYS_INLINE void tile_x8(const int type, const int vnni, const int mt, acts a, const uint8_t *w, int64_t nb,
                                  int64_t M, int64_t m0, float *y, int64_t N, int64_t g) {
    const int q41 = type == (Q4_1 | X8), header = x8_header(type), bytes = G * block_bytes(type);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const uint8_t *p = w + g * nb * bytes;
    __m256 acc[MT_VNNI];
    for (int i = 0; i < mt; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, p += bytes) {
        for (int c = 0; c < bytes; c += 64) _mm_prefetch((const char *)(p + 4 * bytes + c), _MM_HINT_T0);
        __m256i lo[4], hi[4]; /* per 32 bytes: 4 elements of each row (low nibbles), and 4 more (high) */
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + header + 32 * j));
            lo[j] = _mm256_and_si256(v, m4);
            hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        const __m256 mw = q41 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * G)))
                              : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
        for (int i = 0; i < mt; i++) {
            const int64_t jx = b * M + m0 + i;
            const int8_t *xq = (const int8_t *)(a.q + jx * QK);
            __m256i dot;
            if (vnni) {
                dot = _mm256_setzero_si256();
                for (int j = 0; j < 4; j++) dot = dpbusd_x8(dot, lo[j], hi[j], xq + 4 * j);
            } else {
                __m256i s = _mm256_setzero_si256();
                for (int j = 0; j < 4; j++) {
                    int32_t x0, x1; /* 4 values of x: elements 4j.. (low nibbles) and 16 + 4j.. (high) */
                    memcpy(&x0, xq + 4 * j, 4), memcpy(&x1, xq + QK / 2 + 4 * j, 4);
                    s = _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], _mm256_set1_epi32(x0)),
                                                             _mm256_maddubs_epi16(hi[j], _mm256_set1_epi32(x1))));
                }
                dot = _mm256_madd_epi16(s, ones);
            }
            const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(a.d + jx));
            acc[i] = _mm256_fmadd_ps(dw, t, _mm256_fmadd_ps(mw, _mm256_broadcast_ss(a.s + jx), acc[i]));
        }
    }
    for (int i = 0; i < mt; i++) _mm256_storeu_ps(y + (m0 + i) * N + G * g, acc[i]);
}

static ALWAYS_INLINE void rows_simd_x8(const int type, const int vnni, const void *act, const uint8_t *w, float *y,
                                       int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const int64_t nb = K / QK;
    const acts a = act_view(act, M, K);
    for (int64_t g = n0 / G; g < n1 / G; g++) {
        int64_t m = 0;
        if (vnni)
            for (; m + MT_VNNI <= M; m += MT_VNNI) tile_x8(type, vnni, MT_VNNI, a, w, nb, M, m, y, N, g);
        for (; m + MT <= M; m += MT) tile_x8(type, vnni, MT, a, w, nb, M, m, y, N, g);
        switch (M - m) {
        case 3: tile_x8(type, vnni, 3, a, w, nb, M, m, y, N, g); break;
        case 2: tile_x8(type, vnni, 2, a, w, nb, M, m, y, N, g); break;
        case 1: tile_x8(type, vnni, 1, a, w, nb, M, m, y, N, g); break;
        }
    }
}

static void rows_avx2(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                      int64_t n0, int64_t n1) {
    if (type == Q4_0) rows_simd(Q4_0, 0, act, w, y, M, N, K, n0, n1);
    else if (type == Q4_1) rows_simd(Q4_1, 0, act, w, y, M, N, K, n0, n1);
    else if (type == Q8_0) rows_simd(Q8_0, 0, act, w, y, M, N, K, n0, n1);
    else if (type == (Q4_0 | X8)) rows_simd_x8(Q4_0 | X8, 0, act, w, y, M, N, K, n0, n1);
    else if (type == (Q4_1 | X8)) rows_simd_x8(Q4_1 | X8, 0, act, w, y, M, N, K, n0, n1);
}

VNNI_TARGET static void rows_vnni(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N,
                                  int64_t K, int64_t n0, int64_t n1) {
    if (type == Q4_0) rows_simd(Q4_0, 1, act, w, y, M, N, K, n0, n1);
    else if (type == Q4_1) rows_simd(Q4_1, 1, act, w, y, M, N, K, n0, n1);
    else if (type == Q8_0) rows_simd(Q8_0, 1, act, w, y, M, N, K, n0, n1);
    else if (type == (Q4_0 | X8)) rows_simd_x8(Q4_0 | X8, 1, act, w, y, M, N, K, n0, n1);
    else if (type == (Q4_1 | X8)) rows_simd_x8(Q4_1 | X8, 1, act, w, y, M, N, K, n0, n1);
}
#endif

/* --- ARM: NEON, and the dot-product instructions (ARMv8.2 dotprod, most phones since 2018) ---------------- */

#ifdef __aarch64__
#define DOTPROD_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))

/* The GGUF layout: the scalar loop with NEON's block dot (the same integers; the same float steps as the
   scalar path). */
static void rows_neon(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                      int64_t n0, int64_t n1) {
    rows_gguf(type, act, w, y, M, N, K, n0, n1, 1);
}

/* The interleaved layouts with int8 activations, as tile_x8: a 16-byte vector holds 4 elements of each of 4
   rows, and sdot by lane (vdotq_laneq_s32) multiplies them with 4 values of x into each row's int32 lane;
   two vectors cover the group's 8 rows. The integers and every float step are the AVX paths', in the same
   order (fused multiply-adds where they fuse), so the results are bit-identical to an x86 machine's. */
DOTPROD_TARGET static void rows_dotprod_x8(int type, const void *act, const uint8_t *w, float *y, int64_t M,
                                           int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const int64_t nb = K / QK, bytes = G * block_bytes(type);
    const int q41 = type == (Q4_1 | X8), header = x8_header(type);
    const acts a = act_view(act, M, K);
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    for (int64_t g = n0 / G; g < n1 / G; g++)
        for (int64_t m = 0; m < M; m++) {
            float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0; /* rows 0-3, 4-7 of the group */
            const uint8_t *p = w + g * nb * bytes;
            for (int64_t b = 0; b < nb; b++, p += bytes) {
                const int64_t jx = b * M + m;
                const int8_t *xq = (const int8_t *)(a.q + jx * QK);
                const int8x16_t xl = vld1q_s8(xq), xh = vld1q_s8(xq + QK / 2);
                int32x4_t d0 = vdupq_n_s32(0), d1 = d0;
#define CHUNK_J(j)                                                                                              \
    {                                                                                                           \
        const uint8x16_t v0 = vld1q_u8(p + header + 32 * (j)), v1 = vld1q_u8(p + header + 32 * (j) + 16);      \
        d0 = vdotq_laneq_s32(d0, vreinterpretq_s8_u8(vandq_u8(v0, m4)), xl, j);                                \
        d0 = vdotq_laneq_s32(d0, vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), xh, j);                               \
        d1 = vdotq_laneq_s32(d1, vreinterpretq_s8_u8(vandq_u8(v1, m4)), xl, j);                                \
        d1 = vdotq_laneq_s32(d1, vreinterpretq_s8_u8(vshrq_n_u8(v1, 4)), xh, j);                               \
    }
                CHUNK_J(0) CHUNK_J(1) CHUNK_J(2) CHUNK_J(3)
#undef CHUNK_J
                const float16x8_t dh = vreinterpretq_f16_u8(vld1q_u8(p));
                const float32x4_t dw0 = vcvt_f32_f16(vget_low_f16(dh)), dw1 = vcvt_high_f32_f16(dh);
                float32x4_t mw0, mw1;
                if (q41) {
                    const float16x8_t mh = vreinterpretq_f16_u8(vld1q_u8(p + 2 * G));
                    mw0 = vcvt_f32_f16(vget_low_f16(mh)), mw1 = vcvt_high_f32_f16(mh);
                } else {
                    mw0 = vmulq_n_f32(dw0, -8.0f), mw1 = vmulq_n_f32(dw1, -8.0f);
                }
                const float dx = a.d[jx], sx = a.s[jx];
                const float32x4_t t0 = vmulq_n_f32(vcvtq_f32_s32(d0), dx), t1 = vmulq_n_f32(vcvtq_f32_s32(d1), dx);
                acc0 = vfmaq_f32(vfmaq_f32(acc0, mw0, vdupq_n_f32(sx)), dw0, t0);
                acc1 = vfmaq_f32(vfmaq_f32(acc1, mw1, vdupq_n_f32(sx)), dw1, t1);
            }
            vst1q_f32(y + m * N + G * g, acc0);
            vst1q_f32(y + m * N + G * g + 4, acc1);
        }
}
#endif

/* --- dispatch ------------------------------------------------------------------------------------------ */

/* This architecture's code paths, worst to best: isa() is an index into PATHS. */
#if defined(__AVX2__)
static const char *const PATHS[] = {"scalar", "avx2", "avx512vnni"};
enum { ISA_SCALAR, ISA_AVX2, ISA_VNNI };
#elif defined(__aarch64__)
static const char *const PATHS[] = {"scalar", "neon", "neon-dotprod"};
enum { ISA_SCALAR, ISA_NEON, ISA_DOTPROD };
#else
static const char *const PATHS[] = {"scalar"};
enum { ISA_SCALAR };
#endif

static int isa(void) {
    static int chosen = -1; /* a race only computes the same value twice */
    if (chosen < 0) {
        int best = ISA_SCALAR;
#if defined(__AVX2__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = ISA_AVX2;
        if (best == ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
            best = ISA_VNNI;
#elif defined(__aarch64__)
        best = ISA_NEON; /* part of every ARMv8-A CPU */
        if (getauxval(AT_HWCAP) & (1UL << 20)) best = ISA_DOTPROD; /* HWCAP_ASIMDDP */
#endif
        /* CORRAL_CPU_ISA=<a path below the best> caps the choice (to compare the paths on one CPU; tests) */
        const char *cap = getenv("CORRAL_CPU_ISA");
        for (int i = 0; cap && i < best; i++)
            if (!strcmp(cap, PATHS[i])) best = i;
        chosen = best;
    }
    return chosen;
}

const char *corral_q_isa(void) { return PATHS[isa()]; }

int corral_q_row_align(int type) { return type & X8 ? G : R; }

void corral_q_matvec_rows(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                          int64_t n0, int64_t n1) {
    if ((type & A16) && (type & X8)) abort(); /* 16-bit activations take the GGUF layout's code */
    type &= ~A16; /* prepared as 16 bits: the same integer code does the rest */
    if (block_bytes(type) == 0 || n0 >= n1) return;
    if ((type & X8) && (N % G || n0 % G || n1 % G)) abort(); /* whole groups only (the callers ensure it) */
#if defined(__AVX2__)
    if (isa() == ISA_VNNI) return rows_vnni(type, act, w, y, M, N, K, n0, n1);
    if (isa() == ISA_AVX2) return rows_avx2(type, act, w, y, M, N, K, n0, n1);
#elif defined(__aarch64__)
    if ((type & X8) && isa() == ISA_DOTPROD) return rows_dotprod_x8(type, act, w, y, M, N, K, n0, n1);
    if (!(type & X8) && isa() >= ISA_NEON) return rows_neon(type, act, w, y, M, N, K, n0, n1);
#endif
    if (type & X8) return rows_scalar_x8(type, act, w, y, M, N, K, n0, n1);
    rows_scalar(type, act, w, y, M, N, K, n0, n1);
}

/* --- the whole product through the shared pool -------------------------------------------------------- */

struct q_job {
    int type;
    const void *act;
    const uint8_t *w;
    float *y;
    int64_t M, N, K;
};

static void q_part(void *ctx, int part, int parts) {
    const struct q_job *j = ctx;
    long long n0, n1;
    corral_split(j->N, corral_q_row_align(j->type), part, parts, &n0, &n1);
    if (part == parts - 1) n1 = j->N; /* the rows past the last multiple of the alignment */
    corral_q_matvec_rows(j->type, j->act, j->w, j->y, j->M, j->N, j->K, n0, n1);
}

void corral_q_matvec(int type, const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                     int threads) {
    static __thread void *scratch; /* the calling thread's prepared activations, grown as needed */
    static __thread size_t capacity;
    const size_t need = corral_q_act_bytes(type, M, K);
    if (need > capacity) {
        free(scratch);
        scratch = aligned_alloc(64, need);
        capacity = scratch ? need : 0;
        if (!scratch) abort();
    }
    corral_q_prepare(type, x, scratch, M, K);
    if (N / corral_q_row_align(type) < 2 * threads) threads = 1;
    struct q_job j = {type, scratch, w, y, M, N, K};
    corral_parallel(q_part, &j, threads);
}

/* --- dequantization ------------------------------------------------------------------------------------ */

/* Bit for bit gguf.quants.dequantize: Q8_0 q * d, Q4_0 (nibble - 8) * d, and Q4_1 nibble * d + m with
   the product rounded before the sum (the compiler would fuse the two into an FMA: hence the empty asm
   between them). The prefill path dequantizes a chunk of rows at a time with this. */
void corral_q_dequantize(int type, const uint8_t *w, float *out, int64_t n_elements) {
    const int bytes = block_bytes(type);
    if (bytes == 0 || (type & X8)) return; /* the interleaved layouts: corral_q_dequantize_rows */
    for (int64_t b = 0; b < n_elements / QK; b++, w += bytes, out += QK) {
        const float d = half_to_float(load16(w));
#ifdef __AVX2__
        const __m256 dv = _mm256_set1_ps(d);
        __m256i q[4]; /* the block's 32 values as int32, 8 at a time */
        if (type == Q8_0) {
            for (int i = 0; i < 4; i++) q[i] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + 2 + 8 * i)));
        } else { /* bytes 0..7 and 8..15: elements 0..15 in their low nibbles, 16..31 in their high ones */
            const uint8_t *qs = w + (type == Q4_1 ? 4 : 2);
            for (int i = 0; i < 2; i++) {
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * i)));
                q[i] = _mm256_and_si256(b, _mm256_set1_epi32(0x0F));
                q[i + 2] = _mm256_srli_epi32(b, 4);
            }
            if (type == Q4_0)
                for (int i = 0; i < 4; i++) q[i] = _mm256_sub_epi32(q[i], _mm256_set1_epi32(8));
        }
        const __m256 mv = _mm256_set1_ps(type == Q4_1 ? half_to_float(load16(w + 2)) : 0.0f);
        for (int i = 0; i < 4; i++) {
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(q[i]), dv);
            if (type == Q4_1) {
                __asm__("" : "+x"(v));
                v = _mm256_add_ps(v, mv);
            }
            _mm256_storeu_ps(out + 8 * i, v);
        }
#else
        if (type == Q8_0) {
            for (int j = 0; j < QK; j++) out[j] = (float)(int8_t)w[2 + j] * d;
            continue;
        }
        const float m = type == Q4_1 ? half_to_float(load16(w + 2)) : 0.0f;
        const uint8_t *qs = w + (type == Q4_1 ? 4 : 2);
        for (int j = 0; j < QK; j++) {
            const int u = j < QK / 2 ? qs[j] & 0x0F : qs[j - QK / 2] >> 4;
            volatile float v = (float)(type == Q4_0 ? u - 8 : u) * d;
            out[j] = type == Q4_1 ? v + m : v;
        }
#endif
    }
}

/* Rows of either layout -> (N, K) floats, the same numbers as corral_q_dequantize on the GGUF blocks: each
   interleaved group of G rows is put back into GGUF's order in a small buffer, then dequantized in one call. */
void corral_q_dequantize_rows(int type, const uint8_t *w, float *out, int64_t N, int64_t K) {
    if (!(type & X8)) return corral_q_dequantize(type, w, out, N * K);
    const int base = type & ~X8, bytes = block_bytes(type), header = x8_header(type);
    const int64_t nb = K / QK;
    uint8_t *rows = malloc((size_t)(G * nb * bytes)); /* G rows of GGUF blocks */
    if (!rows) abort();
    for (int64_t g = 0; g < N / G; g++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + (g * nb + b) * G * bytes;
            for (int i = 0; i < G; i++) {
                uint8_t *gguf = rows + (i * nb + b) * bytes;
                memcpy(gguf, blk + 2 * i, 2);
                if (base == Q4_1) memcpy(gguf + 2, blk + 2 * G + 2 * i, 2);
                uint8_t *qs = gguf + bytes - QK / 2;
                for (int j = 0; j < 4; j++) memcpy(qs + 4 * j, blk + header + 32 * j + 4 * i, 4);
            }
        }
        corral_q_dequantize(base, rows, out + G * g * K, G * K);
    }
    free(rows);
}
