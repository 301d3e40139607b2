/* The decode step of a Llama text model in one call: B sequences, one new token each.

   The eager model (corral/models/llama.py) spends most of a small model's decode step between
   operators: ~450 of them per token at 135M parameters, 10-20 us of Python and dispatch each. This
   file runs the same arithmetic as Transformer.forward on the engine's flat batch, for the case the
   engine meets on every step after the prompts, "every sequence adds one token", and reads the same
   tensors: the model's weights where they are (fp32, Corral's packed int8, GGUF's Q8_0 / Q4_0 / Q4_1
   blocks) and the engine's paged KV cache through each sequence's block table. corral/engine/native.py
   fills the structs (kernels.h) from a loaded model and checks the result against the eager model.

   Per layer:  h = rmsnorm(x) -> q, k, v (one parallel call) -> rope -> k, v into the cache ->
               attention over each sequence's own blocks -> x += wo(att) ->
               h = rmsnorm(x) -> w1, w3 (one parallel call) -> x += w2(silu(w1 h) * w3 h)
   then logits = output(rmsnorm(x)). Matrix products and attention run on the kernels' thread pool;
   the elementwise rest is small (B x dim) and stays on the calling thread.

   The vector code works on 8 floats at a time (f8 below): AVX on x86, a pair of NEON vectors on 64-bit
   ARM, with the same operations in the same order (fused multiply-adds where they fuse), so the two give
   the same numbers up to the kernels' own summation orders. */

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* --- 8 floats at a time ------------------------------------------------------------------------------- */

#if defined(__AVX2__)
#include <immintrin.h>
typedef __m256 f8;
static inline f8 f8_zero(void) { return _mm256_setzero_ps(); }
static inline f8 f8_set1(float v) { return _mm256_set1_ps(v); }
static inline f8 f8_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void f8_store(float *p, f8 v) { _mm256_storeu_ps(p, v); }
static inline f8 f8_add(f8 a, f8 b) { return _mm256_add_ps(a, b); }
static inline f8 f8_sub(f8 a, f8 b) { return _mm256_sub_ps(a, b); }
static inline f8 f8_mul(f8 a, f8 b) { return _mm256_mul_ps(a, b); }
static inline f8 f8_div(f8 a, f8 b) { return _mm256_div_ps(a, b); }
static inline f8 f8_fma(f8 a, f8 b, f8 c) { return _mm256_fmadd_ps(a, b, c); } /* a b + c, rounded once */
static inline f8 f8_fnma(f8 a, f8 b, f8 c) { return _mm256_fnmadd_ps(a, b, c); } /* c - a b, rounded once */
static inline f8 f8_min(f8 a, f8 b) { return _mm256_min_ps(a, b); }
static inline f8 f8_max(f8 a, f8 b) { return _mm256_max_ps(a, b); }
static inline f8 f8_round(f8 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^n for whole n (as floats) in the exponent field */
static inline f8 f8_pow2i(f8 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline f8 f8_load_half(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline void f8_store_half(uint16_t *p, f8 v) { /* nearest-even, as torch's .half() */
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static inline float f8_hsum(f8 v) { /* (v0 + v4 + v2 + v6) + (v1 + v5 + v3 + v7) */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#elif defined(__aarch64__)
#include <arm_neon.h>
typedef struct {
    float32x4_t lo, hi;
} f8;
#define F8_MAP(a, b, op) ((f8){op((a).lo, (b).lo), op((a).hi, (b).hi)})
static inline f8 f8_zero(void) { return (f8){vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; }
static inline f8 f8_set1(float v) { return (f8){vdupq_n_f32(v), vdupq_n_f32(v)}; }
static inline f8 f8_load(const float *p) { return (f8){vld1q_f32(p), vld1q_f32(p + 4)}; }
static inline void f8_store(float *p, f8 v) { vst1q_f32(p, v.lo), vst1q_f32(p + 4, v.hi); }
static inline f8 f8_add(f8 a, f8 b) { return F8_MAP(a, b, vaddq_f32); }
static inline f8 f8_sub(f8 a, f8 b) { return F8_MAP(a, b, vsubq_f32); }
static inline f8 f8_mul(f8 a, f8 b) { return F8_MAP(a, b, vmulq_f32); }
static inline f8 f8_div(f8 a, f8 b) { return F8_MAP(a, b, vdivq_f32); }
static inline f8 f8_fma(f8 a, f8 b, f8 c) { return (f8){vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
static inline f8 f8_fnma(f8 a, f8 b, f8 c) { return (f8){vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi)}; }
static inline f8 f8_min(f8 a, f8 b) { return F8_MAP(a, b, vminq_f32); }
static inline f8 f8_max(f8 a, f8 b) { return F8_MAP(a, b, vmaxq_f32); }
static inline f8 f8_round(f8 a) { return (f8){vrndnq_f32(a.lo), vrndnq_f32(a.hi)}; }
static inline f8 f8_pow2i(f8 n) {
    const int32x4_t bias = vdupq_n_s32(127);
    return (f8){vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.lo), bias), 23)),
                vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.hi), bias), 23))};
}
static inline f8 f8_load_half(const uint16_t *p) {
    return (f8){vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))), vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4)))};
}
static inline void f8_store_half(uint16_t *p, f8 v) { /* nearest-even (the default rounding mode) */
    vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v.lo)));
    vst1_u16(p + 4, vreinterpret_u16_f16(vcvt_f16_f32(v.hi)));
}
static inline float f8_hsum(f8 v) { /* the AVX order */
    const float32x4_t s = vaddq_f32(v.lo, v.hi);
    const float32x2_t t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
}
#else
#error "decode.c needs AVX2 (x86) or NEON (aarch64)"
#endif

enum { W_F32 = 0, W_INT8 = 1, W_Q4_0 = 2, W_Q4_1 = 3, W_Q8_0 = 8, W_X8 = 0x100, W_A16 = 0x200 }; /* block types:
    GGML's numbers; | W_X8: the 4-bit blocks interleaved by 8 rows, | W_A16: with 16-bit activations (qblock.c) */

/* The block kernels live in qblock.c; weak, so the library still loads (fp32 and int8 only) without it. */
extern size_t corral_q_act_bytes(int type, int64_t M, int64_t K) __attribute__((weak));
extern void corral_q_prepare(int type, const float *x, void *act, int64_t M, int64_t K) __attribute__((weak));
extern void corral_q_matvec_rows(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N,
                                 int64_t K, int64_t n0, int64_t n1) __attribute__((weak));
extern int corral_q_row_align(int type) __attribute__((weak));

/* corral_linear, corral_layer, corral_model: kernels.h */

int corral_decode_abi(void) { return 2; } /* bumped when the structs change; native.py checks it */

int corral_decode_supports(int64_t type) {
    if (type == W_F32 || type == W_INT8) return 1;
    if (type == W_Q4_0 || type == W_Q4_1 || type == W_Q8_0 || type == (W_Q4_0 | W_X8) || type == (W_Q4_1 | W_X8) ||
        type == (W_Q4_0 | W_A16) || type == (W_Q4_1 | W_A16))
        return corral_q_matvec_rows != NULL;
    return 0;
}

/* --- matrix products ------------------------------------------------------------------------------ */

static inline float dot(const float *a, const float *b, int64_t n) {
    f8 s0 = f8_zero(), s1 = f8_zero();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = f8_fma(f8_load(a + i), f8_load(b + i), s0);
        s1 = f8_fma(f8_load(a + i + 8), f8_load(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = f8_fma(f8_load(a + i), f8_load(b + i), s0);
    float s = f8_hsum(f8_add(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* e^x for 8 floats (Cephes' polynomial, ~1e-7 relative error), for softmax and SiLU. */
static inline f8 exp8(f8 x) {
    x = f8_min(f8_max(x, f8_set1(-87.3365f)), f8_set1(88.3763f));
    const f8 n = f8_round(f8_mul(x, f8_set1(1.44269504088896341f)));
    f8 r = f8_fnma(n, f8_set1(0.693359375f), x); /* x - n ln 2, in two parts */
    r = f8_fnma(n, f8_set1(-2.12194440e-4f), r);
    f8 y = f8_set1(1.9875691500e-4f);
    y = f8_fma(y, r, f8_set1(1.3981999507e-3f));
    y = f8_fma(y, r, f8_set1(8.3334519073e-3f));
    y = f8_fma(y, r, f8_set1(4.1665795894e-2f));
    y = f8_fma(y, r, f8_set1(1.6666665459e-1f));
    y = f8_fma(y, r, f8_set1(5.0000001201e-1f));
    y = f8_fma(y, f8_mul(r, r), f8_add(r, f8_set1(1.0f)));
    return f8_mul(y, f8_pow2i(n));
}

/* fp32 weights, output columns n0..n1-1; each weight row is read once from memory for all M inputs. */
static void f32_rows(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K,
                     int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) y[m * N + n] = dot(x + m * K, w + n * K, K);
}

typedef struct {
    const corral_linear *lin;
    const float *x;
    const void *act; /* the block kernels' prepared x */
    float *y;
} product;

typedef struct {
    int n;
    int64_t M;
    product p[3];
    int64_t pieces;     /* rows of each product, in this many pieces */
    atomic_llong next;  /* the next piece to take, over all products */
} products;

#define PIECES_PER_THREAD 4

static int64_t row_align(const corral_linear *lin) {
    if (lin->type == W_INT8) return 4;
    if (lin->type == W_F32) return 1;
    return corral_q_row_align((int)lin->type);
}

/* The parts take pieces of the products' rows from a shared counter, a few pieces per thread: a part whose
   core is slowed (another process, another VM on the host) takes fewer, where a fixed share would make
   the whole step wait for it. Each row is computed alone, so who takes it does not change its bits. */
static void products_part(void *ctx, int part, int parts) {
    products *job = ctx;
    (void)part, (void)parts;
    for (;;) {
        const long long t = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (t >= job->n * job->pieces) return;
        const product *p = &job->p[t / job->pieces];
        const corral_linear *l = p->lin;
        long long r0, r1;
        corral_split(l->n, row_align(l), (int)(t % job->pieces), (int)job->pieces, &r0, &r1);
        if (r0 >= r1) continue;
        if (l->type == W_F32)
            f32_rows(p->x, l->w, p->y, job->M, l->n, l->k, r0, r1);
        else if (l->type == W_INT8)
            corral_int8_matvec_blocks(p->x, l->w, l->scales, p->y, job->M, l->n, l->k, r0 / 4, r1 / 4);
        else
            corral_q_matvec_rows((int)l->type, p->act, l->w, p->y, job->M, l->n, l->k, r0, r1);
    }
}

/* y_i = x @ W_i^T for up to three weights sharing one input. act: scratch for the block kernels. */
static void run_products(products *job, void *act, size_t act_size, int threads) {
    char *a = act;
    for (int i = 0; i < job->n; i++) {
        product *p = &job->p[i];
        int64_t type = p->lin->type;
        if (type == W_F32 || type == W_INT8) continue;
        if (i > 0 && job->p[i - 1].lin->type == type && job->p[i - 1].x == p->x) {
            p->act = job->p[i - 1].act; /* same input, same preparation */
            continue;
        }
        size_t need = corral_q_act_bytes((int)type, job->M, p->lin->k);
        if (need > act_size) abort(); /* sized by the caller for the largest input */
        corral_q_prepare((int)type, p->x, a, job->M, p->lin->k);
        p->act = a;
        a += need, act_size -= need;
    }
    job->pieces = threads > 1 ? (int64_t)threads * PIECES_PER_THREAD : 1;
    atomic_init(&job->next, 0);
    corral_parallel(products_part, job, threads);
}

/* --- attention ------------------------------------------------------------------------------------ */

typedef struct {
    const corral_model *m;
    int64_t layer, B, max_blocks, splits;
    const int64_t *positions;
    const int32_t *tables;
    const float *q;  /* (B, n_heads, hd), roped */
    float *partial;  /* per task: group x (max, sum, hd weighted values) */
    float *scores;   /* per part: group x span */
    int64_t span;    /* positions per split */
    atomic_llong next; /* the next task to take (as products_part) */
} attention_job;

static inline int64_t slot_of(const int32_t *table, int64_t pos, int64_t bs) {
    return (int64_t)table[pos / bs] * bs + pos % bs;
}

/* Keys and values of one position are a short row (hd values) every n_kv_heads * hd values: the hardware
   prefetcher does not run far enough ahead on such strides, so each position asks for a later one's row.
   The cache holds fp32 or fp16 (half the bytes to read; converted 8 at a time: F16C, or NEON's fcvtl). */
#define AHEAD 8
#define SPAN 256 /* positions per attention task */
static inline void prefetch_row(const char *row, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(row + i, 0, 3);
}

static inline f8 load_kv(const char *row, int64_t i, int f16) {
    return f16 ? f8_load_half((const uint16_t *)row + i) : f8_load((const float *)row + i);
}

#define PARTIAL(j, task) ((j)->partial + (task) * ((j)->m->n_heads / (j)->m->n_kv_heads) * ((j)->m->head_dim + 2))

/* One task: the query heads of sequence b that share kv head g, over positions [p0, p1) of its context.
   It leaves, per head, the running max, the sum of exponentials and the exp-weighted sum of values, which
   attention_combine merges across the splits (flash-decoding): a long context is then spread over all
   threads even for one sequence. */
static void attend(const attention_job *j, int64_t b, int64_t g, int64_t p0, int64_t p1, float *scores,
                   float *out) {
    const corral_model *m = j->m;
    const int64_t hd = m->head_dim, kv = m->n_kv_heads, group = m->n_heads / kv, n = p1 - p0, bs = m->block_size;
    const int f16 = (int)m->kv_f16;
    const int64_t es = f16 ? 2 : 4, row_bytes = hd * es; /* bytes of one value, of one head's row */
    const int32_t *table = j->tables + b * j->max_blocks;
    const int64_t layer_off = j->layer * m->n_slots * kv * hd * es;
    const char *ck = (const char *)m->cache_k + layer_off, *cv = (const char *)m->cache_v + layer_off;
    int64_t slots[SPAN]; /* the span's cache slots, found once (a division per position costs more than its dot) */
    for (int64_t p = p0, blk = p0 / bs, off = p0 % bs; p < p1; p++) {
        slots[p - p0] = (int64_t)table[blk] * bs + off;
        if (++off == bs) off = 0, blk++;
    }
#define ROW(base, p) ((base) + (slots[(p) - p0] * kv + g) * row_bytes)
    const float scale = 1.0f / sqrtf((float)hd);
    const float *q = j->q + (b * m->n_heads + g * group) * hd;
    /* Scores: two positions and up to 4 heads of the group at a time, so 8 independent sums are in flight
       and each chunk of a key is loaded (and converted) once for every head. */
    for (int64_t p = p0; p < p1; p += 2) {
        const int two = p + 1 < p1;
        const char *k0 = ROW(ck, p), *k1 = two ? ROW(ck, p + 1) : k0;
        if (p + AHEAD < p1) prefetch_row(ROW(ck, p + AHEAD), row_bytes);
        if (p + 1 + AHEAD < p1) prefetch_row(ROW(ck, p + 1 + AHEAD), row_bytes);
        for (int64_t h0 = 0; h0 < group; h0 += 4) {
            /* four heads always (a missing one repeats the first, its sums unused): plain variables that stay
               in registers */
            const int64_t nh = group - h0 < 4 ? group - h0 : 4;
            const float *q0 = q + h0 * hd, *q1 = q0 + (nh > 1) * hd, *q2 = q0 + (nh > 2) * 2 * hd,
                        *q3 = q0 + (nh > 3) * 3 * hd;
            f8 a0 = f8_zero(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
            for (int64_t d = 0; d < hd; d += 8) {
                const f8 x0 = load_kv(k0, d, f16), x1 = load_kv(k1, d, f16);
                f8 w = f8_load(q0 + d);
                a0 = f8_fma(w, x0, a0), c0 = f8_fma(w, x1, c0);
                w = f8_load(q1 + d);
                a1 = f8_fma(w, x0, a1), c1 = f8_fma(w, x1, c1);
                w = f8_load(q2 + d);
                a2 = f8_fma(w, x0, a2), c2 = f8_fma(w, x1, c2);
                w = f8_load(q3 + d);
                a3 = f8_fma(w, x0, a3), c3 = f8_fma(w, x1, c3);
            }
            const f8 a[4] = {a0, a1, a2, a3}, c[4] = {c0, c1, c2, c3};
            for (int h = 0; h < nh; h++) {
                scores[(h0 + h) * n + p - p0] = f8_hsum(a[h]) * scale;
                if (two) scores[(h0 + h) * n + p + 1 - p0] = f8_hsum(c[h]) * scale;
            }
        }
    }
    for (int64_t h = 0; h < group; h++) {
        float *sc = scores + h * n, mx = -INFINITY;
        for (int64_t i = 0; i < n; i++) mx = sc[i] > mx ? sc[i] : mx;
        int64_t i = 0;
        f8 acc = f8_zero();
        for (; i + 8 <= n; i += 8) {
            const f8 e = exp8(f8_sub(f8_load(sc + i), f8_set1(mx)));
            f8_store(sc + i, e);
            acc = f8_add(acc, e);
        }
        float sum = f8_hsum(acc);
        for (; i < n; i++) sum += (sc[i] = expf(sc[i] - mx));
        float *o = out + h * (hd + 2);
        o[0] = mx, o[1] = sum;
    }
    /* out_h += sum_p score_h,p v_p, eight values of v at a time over every position: each head's sums stay
       in registers (the span's rows stay in cache between the passes). */
    for (int64_t h0 = 0; h0 < group; h0 += 4) {
        const int64_t nh = group - h0 < 4 ? group - h0 : 4;
        const float *s0 = scores + h0 * n - p0, *s1 = s0 + (nh > 1) * n, *s2 = s0 + (nh > 2) * 2 * n,
                    *s3 = s0 + (nh > 3) * 3 * n;
        for (int64_t d = 0; d < hd; d += 8) {
            f8 a0 = f8_zero(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t p = p0; p < p1; p++) {
                if (d == 0 && h0 == 0 && p + AHEAD < p1) prefetch_row(ROW(cv, p + AHEAD), row_bytes);
                const f8 vd = load_kv(ROW(cv, p), d, f16);
                a0 = f8_fma(f8_set1(s0[p]), vd, a0);
                a1 = f8_fma(f8_set1(s1[p]), vd, a1);
                a2 = f8_fma(f8_set1(s2[p]), vd, a2);
                a3 = f8_fma(f8_set1(s3[p]), vd, a3);
            }
            const f8 a[4] = {a0, a1, a2, a3};
            for (int h = 0; h < nh; h++) f8_store(out + (h0 + h) * (hd + 2) + 2 + d, a[h]);
        }
    }
#undef ROW
}

static void attention_part(void *ctx, int part, int parts) {
    attention_job *j = ctx;
    const int64_t kv = j->m->n_kv_heads, S = j->splits;
    (void)parts;
    for (;;) {
        const long long t = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (t >= j->B * kv * S) return;
        const int64_t b = t / (kv * S), g = (t / S) % kv, s = t % S, ctx_len = j->positions[b] + 1;
        const int64_t p0 = s * j->span < ctx_len ? s * j->span : ctx_len;
        const int64_t p1 = p0 + j->span < ctx_len ? p0 + j->span : ctx_len;
        float *out = PARTIAL(j, t);
        if (p0 >= p1) { /* an empty split (a shorter sequence of the batch) */
            for (int64_t h = 0; h < j->m->n_heads / kv; h++) out[h * (j->m->head_dim + 2) + 1] = 0.0f;
            continue;
        }
        attend(j, b, g, p0, p1, j->scores + part * (j->m->n_heads / kv) * j->span, out);
    }
}

/* Merge each head's splits: out = sum_s e^(max_s - max) v_s / sum_s e^(max_s - max) sum_s. */
static void attention_combine(const attention_job *j, float *out) {
    const int64_t kv = j->m->n_kv_heads, group = j->m->n_heads / kv, hd = j->m->head_dim, S = j->splits;
    for (int64_t b = 0; b < j->B; b++)
        for (int64_t g = 0; g < kv; g++)
            for (int64_t h = 0; h < group; h++) {
                float mx = -INFINITY, total = 0.0f;
                for (int64_t s = 0; s < S; s++) {
                    const float *o = PARTIAL(j, (b * kv + g) * S + s) + h * (hd + 2);
                    if (o[1] > 0.0f && o[0] > mx) mx = o[0];
                }
                float *dst = out + (b * j->m->n_heads + g * group + h) * hd;
                memset(dst, 0, hd * sizeof(float));
                for (int64_t s = 0; s < S; s++) {
                    const float *o = PARTIAL(j, (b * kv + g) * S + s) + h * (hd + 2);
                    if (o[1] <= 0.0f) continue;
                    const float w = expf(o[0] - mx);
                    total += w * o[1];
                    for (int64_t d = 0; d < hd; d++) dst[d] += w * o[2 + d];
                }
                const float inv = 1.0f / total;
                for (int64_t d = 0; d < hd; d++) dst[d] *= inv;
            }
}

/* --- the elementwise rest ------------------------------------------------------------------------- */

static void rmsnorm(const float *x, const float *weight, float *out, int64_t B, int64_t dim, float eps) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * dim;
        float ss = dot(xb, xb, dim) / (float)dim;
        float r = 1.0f / sqrtf(ss + eps);
        for (int64_t i = 0; i < dim; i++) out[b * dim + i] = xb[i] * r * weight[i];
    }
}

/* g = silu(g) * u = g / (1 + e^-g) * u */
static void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const f8 x = f8_load(g + i);
        const f8 den = f8_add(f8_set1(1.0f), exp8(f8_sub(f8_zero(), x)));
        f8_store(g + i, f8_mul(f8_div(x, den), f8_load(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Rotate the interleaved pairs (x[2i], x[2i+1]) of each head by its position's angle, as apply_rope. */
static void rope(float *x, int64_t B, int64_t heads, int64_t hd, const float *table, const int64_t *positions) {
    for (int64_t b = 0; b < B; b++) {
        const float *cs = table + positions[b] * hd;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (b * heads + h) * hd;
            for (int64_t i = 0; i < hd / 2; i++) {
                float c = cs[2 * i], s = cs[2 * i + 1], a = v[2 * i], d = v[2 * i + 1];
                v[2 * i] = a * c - d * s;
                v[2 * i + 1] = a * s + d * c;
            }
        }
    }
}

/* n values into the cache at element `at`: copied, or rounded to fp16 (nearest-even, as torch's .half()). */
static void store_kv(const corral_model *m, void *cache, int64_t at, const float *src, int64_t n) {
    if (!m->kv_f16) {
        memcpy((float *)cache + at, src, n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)cache + at;
    for (int64_t i = 0; i < n; i += 8) /* n = n_kv_heads * head_dim, a multiple of 8 (native.py checks) */
        f8_store_half(dst + i, f8_load(src + i));
}

/* --- the step ------------------------------------------------------------------------------------- */

/* x (B, dim): the new tokens' embeddings (overwritten). positions (B,): each token's position; tables
   (B, max_blocks): each sequence's block table (its new token's slot included). logits (B, vocab).
   Returns 0, or -1 when a weight type has no kernel here or a position is outside the rope table. */
int corral_decode_step(const corral_model *m, int64_t B, float *x, const int64_t *positions,
                       const int32_t *tables, int64_t max_blocks, float *logits, int threads) {
    const int64_t dim = m->dim, H = m->n_heads, KV = m->n_kv_heads, hd = m->head_dim, F = m->hidden;
    const float eps = (float)m->eps;
    for (int64_t b = 0; b < B; b++)
        if (positions[b] < 0 || positions[b] >= m->rope_len || positions[b] >= max_blocks * m->block_size) return -1;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const corral_linear *ls = &m->layers[l].wq;
        for (int i = 0; i < 7; i++)
            if (!corral_decode_supports(ls[i].type)) return -1;
    }
    if (!corral_decode_supports(m->output.type)) return -1;

    size_t act_size = 0; /* room for three preparations of the widest input, whatever their types */
    for (int t = W_Q4_0; corral_q_act_bytes != NULL && t <= W_Q8_0; t++) {
        if (t != W_Q4_0 && t != W_Q4_1 && t != W_Q8_0) continue;
        size_t need = 3 * corral_q_act_bytes(t, B, dim > F ? dim : F);
        act_size = need > act_size ? need : act_size;
    }
    float *h = malloc(B * dim * sizeof(float)), *q = malloc(B * H * hd * sizeof(float));
    float *k = malloc(B * KV * hd * sizeof(float)), *v = malloc(B * KV * hd * sizeof(float));
    float *att = malloc(B * H * hd * sizeof(float)), *g = malloc(B * F * sizeof(float));
    float *u = malloc(B * F * sizeof(float));
    void *act = act_size ? malloc(act_size) : NULL;
    /* Attention tasks: each (sequence, kv head) pair over its context in splits of SPAN positions. The
       split points depend on nothing but the position, so a sequence's result is the same bits whatever
       else is in the batch (greedy outputs of a batch equal the same requests alone; speculative
       verification equals single steps). */
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = positions[b] + 1 > longest ? positions[b] + 1 : longest;
    const int n_threads = threads > 0 ? threads : 1;
    const int64_t span = SPAN, splits = (longest + SPAN - 1) / SPAN;
    float *scores = malloc(n_threads * (H / KV) * span * sizeof(float));
    float *partial = malloc(B * KV * splits * (H / KV) * (hd + 2) * sizeof(float));
    if (!h || !q || !k || !v || !att || !g || !u || !scores || !partial || (act_size && !act)) abort();

    for (int64_t l = 0; l < m->n_layers; l++) {
        const corral_layer *L = &m->layers[l];
        rmsnorm(x, L->attn_norm, h, B, dim, eps);
        products qkv = {3, B, {{&L->wq, h, NULL, q}, {&L->wk, h, NULL, k}, {&L->wv, h, NULL, v}}};
        run_products(&qkv, act, act_size, threads);
        rope(q, B, H, hd, m->rope, positions);
        rope(k, B, KV, hd, m->rope, positions);
        for (int64_t b = 0; b < B; b++) {
            int64_t at = (l * m->n_slots + slot_of(tables + b * max_blocks, positions[b], m->block_size)) * KV * hd;
            store_kv(m, m->cache_k, at, k + b * KV * hd, KV * hd);
            store_kv(m, m->cache_v, at, v + b * KV * hd, KV * hd);
        }
        attention_job aj = {m, l, B, max_blocks, splits, positions, tables, q, partial, scores, span};
        atomic_init(&aj.next, 0);
        corral_parallel(attention_part, &aj, B * KV * splits >= n_threads ? n_threads : (int)(B * KV * splits));
        attention_combine(&aj, att);
        products o = {1, B, {{&L->wo, att, NULL, h}}};
        run_products(&o, act, act_size, threads);
        for (int64_t i = 0; i < B * dim; i++) x[i] += h[i];

        rmsnorm(x, L->ffn_norm, h, B, dim, eps);
        products up = {2, B, {{&L->w1, h, NULL, g}, {&L->w3, h, NULL, u}}};
        run_products(&up, act, act_size, threads);
        silu_mul(g, u, B * F);
        products down = {1, B, {{&L->w2, g, NULL, h}}};
        run_products(&down, act, act_size, threads);
        for (int64_t i = 0; i < B * dim; i++) x[i] += h[i];
    }
    rmsnorm(x, m->norm, h, B, dim, eps);
    products head = {1, B, {{&m->output, h, NULL, logits}}};
    run_products(&head, act, act_size, threads);
    free(h), free(q), free(k), free(v), free(att), free(g), free(u), free(act), free(scores), free(partial);
    return 0;
}

