/* Memory read bandwidth, measured the way a decode step reads its weights (benchmarks report the share
   of this limit that a decode step reaches: bench/bench.py). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

typedef uint64_t u64x4 __attribute__((vector_size(32))); /* 32-byte loads: AVX2 registers, NEON pairs */

struct read_job {
    const uint8_t *buf;
    int64_t bytes;
    u64x4 sums[64];
};

static void read_part(void *ctx, int part, int parts) {
    struct read_job *j = ctx;
    long long r0, r1;
    corral_split(j->bytes, 4096, part, parts, &r0, &r1);
    u64x4 a = {0}, b = {0};
    for (long long i = r0; i < r1; i += 64) {
        a ^= *(const u64x4 *)(j->buf + i);
        b ^= *(const u64x4 *)(j->buf + i + 32);
    }
    j->sums[part] = a ^ b; /* kept, so the loads are not optimised away */
}

/* GB/s of reading `bytes` (rounded down to 4 KiB) `reps` times with `threads` threads; the best pass. */
double corral_read_bandwidth(int64_t bytes, int threads, int reps) {
    bytes &= ~(int64_t)4095;
    struct read_job *j = aligned_alloc(64, sizeof(struct read_job));
    uint8_t *buf = aligned_alloc(4096, bytes);
    if (j == NULL || buf == NULL) return -1.0;
    memset(buf, 1, bytes);
    j->buf = buf, j->bytes = bytes;
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        corral_parallel(read_part, j, threads);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9, gbps = bytes / s / 1e9;
        best = gbps > best ? gbps : best;
    }
    free(buf), free(j);
    return best;
}
