/* Corral's CPU kernels share one thread pool (pool.c): a decode step makes hundreds of short parallel
   calls, and two pools that both spin would fight over the same cores. */
#ifndef CORRAL_POOL_H
#define CORRAL_POOL_H

/* One part of a parallel call: fn(ctx, part, parts) for part = 0 .. parts - 1, part 0 on the caller. */
typedef void (*corral_task_fn)(void *ctx, int part, int parts);

/* Run fn over `threads` parts (fewer if the pool could not start them) and return when all are done.
   One caller at a time uses the pool; a concurrent caller runs fn(ctx, 0, 1) on its own thread. */
void corral_parallel(corral_task_fn fn, void *ctx, int threads);

/* Rows [*r0, *r1) of `n` rows in units of `align`, for part `part` of `parts`; the part with the last
   unit also takes the rows after it that do not fill a unit. */
static inline void corral_split(long long n, long long align, int part, int parts, long long *r0, long long *r1) {
    long long units = n / align, per = (units + parts - 1) / parts;
    long long u0 = part * per, u1 = u0 + per < units ? u0 + per : units;
    if (u0 > u1) u0 = u1;
    *r0 = u0 * align, *r1 = u1 * align;
    if (u1 == units && (u0 < u1 || (units == 0 && part == 0))) *r1 = n;
}

#endif
