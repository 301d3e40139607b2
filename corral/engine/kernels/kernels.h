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

#endif
