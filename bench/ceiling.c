/* The arithmetic ceiling of the decode products' inner loops, one core, operands in L1 (bench/ceiling.py).
 *
 * Each kernel runs the instruction mix of one multi-stream tile of rwkv_kernels/csrc with nothing
 * else: R rows x S streams of accumulators in registers, every weight vector loaded once and used for
 * all S streams, every activation vector loaded once and used for all R rows, over n weights per row,
 * `reps` times. No block scales, no conversion to float, no horizontal sums, no memory beyond L1: what
 * is left is the multiply-add throughput the core gives that mix, the bound no kernel of that form
 * passes. A kernel returns the sum of its accumulators (so the work cannot be optimised away, and a
 * test checks the sum against numpy) and leaves its seconds in *sec.
 *   f32_avx2      float32 weights: 4 rows x 3 streams of 8-lane FMAs (cpu_ops.c's AVX2 tile)
 *   i8_avx2       int8 x int8 exact: 4 rows x 2 streams of sign + maddubs + madd + add per 32 weights
 *                 (the AVX2 loops' form before the XOR; AVX2 has no signed x signed byte multiply)
 *   i8xor_avx2    int8 exact, the several-stream tile's form: 4 x 2 of XOR (w with x's sign mask) +
 *                 maddubs + madd + add per 32 weights (quant_ops.h's AVX2 tile; the caller adds the
 *                 blocks' sums of |x| over negative x, which the loop leaves out)
 *   i8xor_scaled_avx2  i8xor_avx2 plus the int8 format's per-8-block work (convert, scale product, FMA
 *                 into float accumulators), as quant_ops.h's AVX2 tile: the format's bound at many streams
 *   i8pos_avx2    int8 weights x non-negative int8 x (the FFN's value product): 4 x 2 of maddubs + madd +
 *                 add per 32 weights, the sign step left out (quant_ops.h's AVX2 tile where x >= 0)
 *   f32_avx512    float32: 4 rows x 4 streams of 16-lane FMAs (cpu_ops.c's 512-bit tile)
 *   i8_vnni       int8 exact: 4 rows x 4 streams of one vpdpbusd per 64 weights, unsigned offset
 *                 weights (the arithmetic of quant_ops.h's 512-bit loops; their tile is 4 rows x 2 streams)
 * Weights and activations are bytes / floats the caller provides ([R][n] and [S][n], n a multiple of 64).
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

double f32_avx2(const float *w, const float *x, int64_t n, int64_t reps, double *sec) {
    __m256 a[4][3];
    for (int r = 0; r < 4; r++) for (int t = 0; t < 3; t++) a[r][t] = _mm256_setzero_ps();
    const double t0 = now_s();
    for (int64_t k = 0; k < reps; k++)
        for (int64_t i = 0; i < n; i += 8) {
            __m256 xv[3];
            for (int t = 0; t < 3; t++) xv[t] = _mm256_loadu_ps(x + t * n + i);
            for (int r = 0; r < 4; r++) {
                const __m256 wv = _mm256_loadu_ps(w + r * n + i);
                for (int t = 0; t < 3; t++) a[r][t] = _mm256_fmadd_ps(wv, xv[t], a[r][t]);
            }
        }
    *sec = now_s() - t0;
    float out[8];
    double s = 0;
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 3; t++) {
            _mm256_storeu_ps(out, a[r][t]);
            for (int l = 0; l < 8; l++) s += out[l];
        }
    return s;
}

/* xa = |x| (the tile's precomputed unsigned operand). MODE 0: the sign step, vpsignb(w, x); 1 (POS):
 * x >= 0, so xa = x and no sign step; 2: w XOR x (x holding x's sign masks, 0 or -1 per byte), the
 * tiles' form, whose per-block correction is outside the loop. The 8 accumulators are named variables,
 * not an array, so that gcc keeps them all in registers (it spills an array's elements here). */
#define POS (MODE == 1)
#define I8_STEP(acc, wv, t) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a##t, \
        MODE == 1 ? wv : MODE == 2 ? _mm256_xor_si256(wv, x##t) : _mm256_sign_epi8(wv, x##t)), ones))
static inline __attribute__((always_inline)) double i8_mix(const int MODE, const int8_t *w, const int8_t *x,
        const uint8_t *xa, int64_t n, int64_t reps, double *sec) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    const double t0 = now_s();
    for (int64_t k = 0; k < reps; k++)
        for (int64_t i = 0; i < n; i += 32) {
            const __m256i x0 = POS ? ones : _mm256_loadu_si256((const __m256i *)(x + i));
            const __m256i x1 = POS ? ones : _mm256_loadu_si256((const __m256i *)(x + n + i));
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(xa + i)), a1 = _mm256_loadu_si256((const __m256i *)(xa + n + i));
            (void)x0; (void)x1;
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + i));
            I8_STEP(c00, wv, 0); I8_STEP(c01, wv, 1);
            wv = _mm256_loadu_si256((const __m256i *)(w + n + i));
            I8_STEP(c10, wv, 0); I8_STEP(c11, wv, 1);
            wv = _mm256_loadu_si256((const __m256i *)(w + 2 * n + i));
            I8_STEP(c20, wv, 0); I8_STEP(c21, wv, 1);
            wv = _mm256_loadu_si256((const __m256i *)(w + 3 * n + i));
            I8_STEP(c30, wv, 0); I8_STEP(c31, wv, 1);
        }
    *sec = now_s() - t0;
    const __m256i all[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
    int32_t out[8];
    double s = 0;
    for (int k = 0; k < 8; k++) {
        _mm256_storeu_si256((__m256i *)out, all[k]);
        for (int l = 0; l < 8; l++) s += out[l];
    }
    return s;
}

double i8_avx2(const int8_t *w, const int8_t *x, const uint8_t *xa, int64_t n, int64_t reps, double *sec) {
    return i8_mix(0, w, x, xa, n, reps, sec);
}

double i8pos_avx2(const int8_t *w, const uint8_t *xa, int64_t n, int64_t reps, double *sec) {
    return i8_mix(1, w, NULL, xa, n, reps, sec);
}

double i8xor_avx2(const int8_t *w, const int8_t *mask, const uint8_t *xa, int64_t n, int64_t reps, double *sec) {
    return i8_mix(2, w, mask, xa, n, reps, sec);
}
#undef POS

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
double f32_avx512(const float *w, const float *x, int64_t n, int64_t reps, double *sec) {
    __m512 a[4][4];
    for (int r = 0; r < 4; r++) for (int t = 0; t < 4; t++) a[r][t] = _mm512_setzero_ps();
    const double t0 = now_s();
    for (int64_t k = 0; k < reps; k++)
        for (int64_t i = 0; i < n; i += 16) {
            __m512 xv[4];
            for (int t = 0; t < 4; t++) xv[t] = _mm512_loadu_ps(x + t * n + i);
            for (int r = 0; r < 4; r++) {
                const __m512 wv = _mm512_loadu_ps(w + r * n + i);
                for (int t = 0; t < 4; t++) a[r][t] = _mm512_fmadd_ps(wv, xv[t], a[r][t]);
            }
        }
    *sec = now_s() - t0;
    double s = 0;
    for (int r = 0; r < 4; r++) for (int t = 0; t < 4; t++) s += _mm512_reduce_add_ps(a[r][t]);
    return s;
}

/* the unsigned offset form: (w + 128) . x, minus 128 . sum(x) once per row and stream at the end */
double i8_vnni(const int8_t *w, const int8_t *x, int64_t n, int64_t reps, double *sec) {
    const __m512i off = _mm512_set1_epi8((char)0x80);
    __m512i a[4][4];
    for (int r = 0; r < 4; r++) for (int t = 0; t < 4; t++) a[r][t] = _mm512_setzero_si512();
    const double t0 = now_s();
    for (int64_t k = 0; k < reps; k++)
        for (int64_t i = 0; i < n; i += 64) {
            __m512i xv[4];
            for (int t = 0; t < 4; t++) xv[t] = _mm512_loadu_si512(x + t * n + i);
            for (int r = 0; r < 4; r++) {
                const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + r * n + i), off);
                for (int t = 0; t < 4; t++) a[r][t] = _mm512_dpbusd_epi32(a[r][t], wv, xv[t]);
            }
        }
    *sec = now_s() - t0;
    double s = 0;
    for (int t = 0; t < 4; t++) {
        int64_t sx = 0;
        for (int64_t i = 0; i < n; i++) sx += x[t * n + i];
        for (int r = 0; r < 4; r++) s += (double)_mm512_reduce_add_epi32(a[r][t]) - 128.0 * (double)sx * (double)reps;
    }
    return s;
}
#endif

/* i8xor_avx2's loop plus the int8 format's work per 8 blocks, as quant_ops.h's AVX2 tile does it after
 * each 8 steps of 32 bytes (one half group: 8 blocks of each row): per (row, stream) the integer sums
 * converted to float, times the blocks' scale products (the row's float16 scales widened, times the
 * stream's float scales), FMA'd into float accumulators kept in memory (as the tile's are), and the integer
 * sums restarted from the blocks' corrections. The scales are `scale` (1 makes the sum checkable), the
 * corrections 0; both are loaded from memory each time, as in the tile. n: a multiple of 256. So its
 * rate is the most an int8 kernel of the format's float order can reach, where i8xor_avx2 is the mix's. */
#define I8S_STEP(r, t, wv)                                                                               \
    do {                                                                                                 \
        I8_STEP(c[r][t], wv, t);                                                                         \
        __asm__("" : "+x"(c[r][t]));              /* kept in a register, as the tile's (b4560c6) */      \
    } while (0)
double i8xor_scaled_avx2(const int8_t *w, const int8_t *x, const uint8_t *xa, int64_t n, int64_t reps,
                         double scale, double *sec) {
    const int MODE = 2;                           /* I8_STEP's XOR form */
    const __m256i ones = _mm256_set1_epi16(1);
    uint16_t sw[4][8];
    float dx[2][8];
    int32_t corr[2][8] = {{0}};
    float acc[4][2][8] = {{{0}}};
    for (int l = 0; l < 8; l++) {
        for (int r = 0; r < 4; r++) sw[r][l] = _cvtss_sh((float)scale, 0);
        for (int t = 0; t < 2; t++) dx[t][l] = (float)scale;
    }
    __m256i c[4][2];
    const double t0 = now_s();
    for (int64_t k = 0; k < reps; k++)
        for (int64_t i0 = 0; i0 < n; i0 += 256) {
            for (int t = 0; t < 2; t++) {
                const __m256i c0 = _mm256_loadu_si256((const __m256i *)corr[t]);
                for (int r = 0; r < 4; r++) c[r][t] = c0;
            }
            for (int64_t i = i0; i < i0 + 256; i += 32) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + i));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + n + i));
                const __m256i a0 = _mm256_loadu_si256((const __m256i *)(xa + i));
                const __m256i a1 = _mm256_loadu_si256((const __m256i *)(xa + n + i));
                for (int r = 0; r < 4; r++) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * n + i));
                    I8S_STEP(r, 0, wv);
                    I8S_STEP(r, 1, wv);
                }
            }
            for (int r = 0; r < 4; r++) {
                const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sw[r]));
                for (int t = 0; t < 2; t++)
                    _mm256_storeu_ps(acc[r][t], _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[r][t]),
                                                                _mm256_mul_ps(s, _mm256_loadu_ps(dx[t])),
                                                                _mm256_loadu_ps(acc[r][t])));
            }
        }
    *sec = now_s() - t0;
    double total = 0;
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 2; t++)
            for (int l = 0; l < 8; l++) total += acc[r][t][l];
    return total;
}
#undef I8S_STEP
