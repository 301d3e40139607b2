/* What each file of Corral's CPU kernel library offers the others (all compiled into one library). */
#ifndef CORRAL_KERNELS_H
#define CORRAL_KERNELS_H

#include <stdint.h>

#include "pool.h"

/* int8.c: int8 weights with one scale per output row, in the packed layout (N / 4, K / 16, 4, 16). */
void corral_int8_matvec_blocks(const float *x, const int8_t *packed, const float *scales, float *y,
                               int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1);
void corral_int8_matvec(const float *x, const int8_t *packed, const float *scales, float *y,
                        int64_t M, int64_t N, int64_t K, int threads);

/* qblock.c: GGML's Q4_0 (type 2), Q4_1 (3) and Q8_0 (8) blocks, y (M, N) = x (M, K) @ W^T with W (N, K)
   as N rows of K / 32 blocks, and the 4-bit types interleaved by 8 rows (type | 0x100). prepare quantizes
   x once (into act_bytes of scratch, single-threaded); matvec_rows computes output columns n0..n1-1
   (n0 a multiple of row_align(type)) from the prepared x. */
size_t corral_q_act_bytes(int type, int64_t M, int64_t K);
void corral_q_prepare(int type, const float *x, void *act, int64_t M, int64_t K);
void corral_q_matvec_rows(int type, const void *act, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                          int64_t n0, int64_t n1);
int corral_q_row_align(int type);
void corral_q_matvec(int type, const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                     int threads);
void corral_q_dequantize(int type, const uint8_t *w, float *out, int64_t n_elements);
void corral_q_dequantize_rows(int type, const uint8_t *w, float *out, int64_t N, int64_t K);
const char *corral_q_isa(void);

/* decode.c: the decode step of a Llama text model, B sequences one new token each (corral/engine/native.py
   fills these structs from a loaded model). */
typedef struct {
    int64_t type, n, k;   /* y (M, n) = x (M, k) @ W^T */
    const void *w;        /* fp32 (n, k); int8 packed (n/4, k/16, 4, 16); blocks: n rows of k/32 blocks, or
                             groups of 8 rows interleaved (qblock.c) */
    const float *scales;  /* int8: one per output row; otherwise unused */
} corral_linear;

typedef struct {
    const float *attn_norm, *ffn_norm;
    corral_linear wq, wk, wv, wo, w1, w3, w2;
} corral_layer;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab;
    double eps;
    const corral_layer *layers;
    const float *norm;
    corral_linear output;
    const float *rope;                /* (rope_len, head_dim / 2, 2): cos, sin of each position */
    int64_t rope_len;
    void *cache_k, *cache_v;          /* (n_layers, n_slots, n_kv_heads, head_dim), fp32 or fp16 */
    int64_t n_slots, block_size;
    int64_t kv_f16;                   /* 1: the cache holds fp16 (IEEE half, as torch.float16) */
} corral_model;

int corral_decode_abi(void);
int corral_decode_supports(int64_t type);
int corral_decode_step(const corral_model *m, int64_t B, float *x, const int64_t *positions, const int32_t *tables,
                       int64_t max_blocks, float *logits, int threads);

#endif
