/* Runs Corral's kernel library, built for 64-bit ARM, under emulation (qemu-aarch64), for
   tests/engine/test_arm_kernels.py. Files hold raw little-endian arrays:
       driver isa                              prints corral_q_isa() and corral_int8_isa()
       driver q TYPE M N K THREADS IN OUT      IN: x (M x K fp32), then W's bytes; OUT: y (M x N fp32)
       driver int8 M N K THREADS IN OUT        IN: x, the packed int8 W (N x K), its scales (N fp32); OUT: y
       driver deq TYPE N K IN OUT              IN: W's bytes; OUT: W dequantized (N x K fp32)
       driver decode IN OUT                    one corral_decode_step; IN as test_arm_kernels.py's
                                               decode_input() writes it, OUT: the logits (B x vocab fp32) */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../corral/engine/kernels/kernels.h"

const char *corral_int8_isa(void);

static void *slurp(const char *path, size_t bytes) {
    FILE *f = fopen(path, "rb");
    void *buf = malloc(bytes ? bytes : 1);
    if (!f || !buf || fread(buf, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path);
        exit(2);
    }
    fclose(f);
    return buf;
}

static void spill(const char *path, const void *buf, size_t bytes) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
    fclose(f);
}

static size_t row_bytes(int type, int64_t K) {
    const int base = type & 0xFF;
    return (size_t)(K / 32) * (base == 8 ? 34 : base == 3 ? 20 : 18);
}

/* The decode step's input, read in order: 16 int64 (n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab,
   rope_len, n_slots, block_size, kv_f16, B, max_blocks, weight type, threads, unused), eps (double), then per
   layer attn_norm, ffn_norm (dim fp32 each) and wq wk wv wo w1 w3 w2 (fp32 or blocks), the final norm, the
   output head, the rope table, cache_k, cache_v, x (B x dim), positions (B int64), tables (B x max_blocks int32). */
static const uint8_t *take(const uint8_t **cursor, size_t bytes) {
    const uint8_t *p = *cursor;
    *cursor += bytes;
    return p;
}

static corral_linear linear(const uint8_t **cursor, int64_t type, int64_t n, int64_t k) {
    corral_linear l = {type, n, k, NULL, NULL};
    l.w = take(cursor, type == 0 ? (size_t)(n * k) * 4 : (size_t)n * row_bytes((int)type, k));
    return l;
}

static int decode(const char *in_path, const char *out_path) {
    FILE *f = fopen(in_path, "rb");
    if (!f) return 2;
    fseek(f, 0, SEEK_END);
    const size_t size = (size_t)ftell(f);
    fclose(f);
    const uint8_t *cursor = slurp(in_path, size);
    const int64_t *h = (const int64_t *)take(&cursor, 16 * 8);
    corral_model m = {h[0], h[1], h[2], h[3], h[4], h[5], h[6]};
    memcpy(&m.eps, take(&cursor, 8), 8);
    const int64_t B = h[11], max_blocks = h[12], type = h[13], threads = h[14], dim = m.dim, hd = m.head_dim;
    m.rope_len = h[7], m.n_slots = h[8], m.block_size = h[9], m.kv_f16 = h[10];
    corral_layer *layers = calloc((size_t)m.n_layers, sizeof(corral_layer));
    for (int64_t l = 0; l < m.n_layers; l++) {
        layers[l].attn_norm = (const float *)take(&cursor, dim * 4);
        layers[l].ffn_norm = (const float *)take(&cursor, dim * 4);
        layers[l].wq = linear(&cursor, type, m.n_heads * hd, dim);
        layers[l].wk = linear(&cursor, type, m.n_kv_heads * hd, dim);
        layers[l].wv = linear(&cursor, type, m.n_kv_heads * hd, dim);
        layers[l].wo = linear(&cursor, type, dim, m.n_heads * hd);
        layers[l].w1 = linear(&cursor, type, m.hidden, dim);
        layers[l].w3 = linear(&cursor, type, m.hidden, dim);
        layers[l].w2 = linear(&cursor, type, dim, m.hidden);
    }
    m.layers = layers;
    m.norm = (const float *)take(&cursor, dim * 4);
    m.output = linear(&cursor, type, m.vocab, dim);
    m.rope = (const float *)take(&cursor, (size_t)(m.rope_len * hd) * 4);
    const size_t cache = (size_t)(m.n_layers * m.n_slots * m.n_kv_heads * hd) * (m.kv_f16 ? 2 : 4);
    m.cache_k = (void *)take(&cursor, cache);
    m.cache_v = (void *)take(&cursor, cache);
    float *x = (float *)take(&cursor, (size_t)(B * dim) * 4);
    const int64_t *positions = (const int64_t *)take(&cursor, (size_t)B * 8);
    const int32_t *tables = (const int32_t *)take(&cursor, (size_t)(B * max_blocks) * 4);
    float *logits = malloc((size_t)(B * m.vocab) * 4);
    if (corral_decode_step(&m, B, x, positions, tables, max_blocks, logits, (int)threads) != 0) return 3;
    spill(out_path, logits, (size_t)(B * m.vocab) * 4);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "isa")) {
        printf("%s %s\n", corral_q_isa(), corral_int8_isa());
        return 0;
    }
    if (argc == 9 && !strcmp(argv[1], "q")) {
        const int type = atoi(argv[2]), threads = atoi(argv[6]);
        const int64_t M = atoll(argv[3]), N = atoll(argv[4]), K = atoll(argv[5]);
        const size_t xb = (size_t)(M * K) * 4, wb = (size_t)N * row_bytes(type, K);
        uint8_t *in = slurp(argv[7], xb + wb);
        float *y = malloc((size_t)(M * N) * 4);
        corral_q_matvec(type, (const float *)in, in + xb, y, M, N, K, threads);
        spill(argv[8], y, (size_t)(M * N) * 4);
        return 0;
    }
    if (argc == 8 && !strcmp(argv[1], "int8")) {
        const int64_t M = atoll(argv[2]), N = atoll(argv[3]), K = atoll(argv[4]);
        const int threads = atoi(argv[5]);
        const size_t xb = (size_t)(M * K) * 4, wb = (size_t)(N * K);
        uint8_t *in = slurp(argv[6], xb + wb + (size_t)N * 4);
        float *y = malloc((size_t)(M * N) * 4);
        corral_int8_matvec((const float *)in, (const int8_t *)(in + xb), (const float *)(in + xb + wb), y, M, N, K,
                           threads);
        spill(argv[7], y, (size_t)(M * N) * 4);
        return 0;
    }
    if (argc == 7 && !strcmp(argv[1], "deq")) {
        const int type = atoi(argv[2]);
        const int64_t N = atoll(argv[3]), K = atoll(argv[4]);
        uint8_t *in = slurp(argv[5], (size_t)N * row_bytes(type, K));
        float *out = malloc((size_t)(N * K) * 4);
        corral_q_dequantize_rows(type, in, out, N, K);
        spill(argv[6], out, (size_t)(N * K) * 4);
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "decode")) return decode(argv[2], argv[3]);
    fprintf(stderr, "usage: see the comment at the top of arm_driver.c\n");
    return 2;
}
