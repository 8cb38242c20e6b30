/* fp32 FMA throughput of one core, with 512-bit (zmm) and 256-bit (ymm) vectors (bench/RESULTS.md §18).

     gcc -O2 -mavx512f -mfma bench/probes/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak

   Twelve independent accumulator chains (more than FMA latency x issue width), each started from its
   own value so that the compiler cannot merge them; prints GFLOP/s (2 FLOPs per lane per FMA). Where
   the zmm figure is no higher than the ymm one, the core runs a 512-bit FMA at the rate of two
   256-bit ones, and AVX-512 code cannot beat an AVX2 GEMM's FMA rate. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAINS 12
/* twelve named accumulators: an array of them would live in memory */
#define STEP(F)                                                                                          \
  a0 = F(a0, x, y), a1 = F(a1, x, y), a2 = F(a2, x, y), a3 = F(a3, x, y), a4 = F(a4, x, y), a5 = F(a5, x, y); \
  a6 = F(a6, x, y), a7 = F(a7, x, y), a8 = F(a8, x, y), a9 = F(a9, x, y), a10 = F(a10, x, y), a11 = F(a11, x, y);
#define START(SET) \
  a0 = SET(seed), a1 = SET(2 * seed), a2 = SET(3 * seed), a3 = SET(4 * seed), a4 = SET(5 * seed), \
  a5 = SET(6 * seed), a6 = SET(7 * seed), a7 = SET(8 * seed), a8 = SET(9 * seed), a9 = SET(10 * seed), \
  a10 = SET(11 * seed), a11 = SET(12 * seed)
#define KEEP(ADD) ADD(ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7))), ADD(ADD(a8, a9), ADD(a10, a11)))

static float ymm_sum(__m256 v) {
  float lanes[8], sum = 0.f;
  _mm256_storeu_ps(lanes, v);
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

/* GFLOP/s of `iters` steps of the twelve chains with vectors of type T (LANES floats) */
#define RATE_FN(NAME, T, LANES, SET1, FMADD, ADD, SUM)                      \
  static double NAME(long iters, float seed) {                             \
    T a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;                    \
    const T x = SET1(1.0000001f), y = SET1(1e-7f);                         \
    START(SET1);                                                           \
    const double t = now();                                                \
    for (long k = 0; k < iters; ++k) {                                     \
      STEP(FMADD)                                                          \
    }                                                                      \
    const double dt = now() - t;                                           \
    if (SUM(KEEP(ADD)) == 12345.f) printf("keeps the chains live\n");     \
    return iters * (double)CHAINS * 2 * LANES / dt / 1e9;                  \
  }

RATE_FN(zmm_rate, __m512, 16, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_reduce_add_ps)
RATE_FN(ymm_rate, __m256, 8, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, ymm_sum)

int main(int argc, char** argv) {
  const long iters = 100000000L + argc; /* not a compile-time constant */
  for (int round = 0; round < 3; ++round)
    printf("round %d: zmm %.1f GFLOP/s, ymm %.1f GFLOP/s (one core, fp32)\n", round, zmm_rate(iters, 0.1f * argc),
           ymm_rate(iters, 0.1f * argc));
  return 0;
}
