/* Runs Corral's kernel library, built for 64-bit ARM, under emulation (qemu-aarch64), for
   tests/engine/test_arm_kernels.py. Files hold raw little-endian arrays:
       driver isa                              prints corral_q_isa() and corral_int8_isa()
       driver q TYPE M N K THREADS IN OUT      IN: x (M x K fp32), then W's bytes; OUT: y (M x N fp32)
       driver int8 M N K THREADS IN OUT        IN: x, the packed int8 W (N x K), its scales (N fp32); OUT: y
       driver deq TYPE N K IN OUT              IN: W's bytes; OUT: W dequantized (N x K fp32) */

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
    fprintf(stderr, "usage: see the comment at the top of arm_driver.c\n");
    return 2;
}
