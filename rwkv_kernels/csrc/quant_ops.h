/* CPU decode kernels for compressed weights (included by cpu_ops.c: one library, one thread pool): y[b, o] (+)= sum_i W[o, i] x[b, i], x and y float32.
 *
 * Decode reads every weight once per token, so it is bound by memory bandwidth: storing weights in
 * fewer bytes is the speed-up, and each kernel converts them in registers and accumulates in fp32.
 *   FMT_F16   W float16 [O, I]: F16C widening (8 or 16 lanes), FMA with x. Both 16-bit formats run
 *             cpu_ops.c's float32 tiles with the weights widened in registers (rows16 below): the
 *             float32 kernel's float order, so its bits on the exactly widened weights.
 *   FMT_BF16  W bfloat16 [O, I]: bf16 -> fp32 is a 16-bit left shift of the integer lanes.
 *   FMT_Q8    W int8 [O, Ip] + float16 scale per block of 32 along i (ggml's Q8_0), Ip = I rounded up
 *             to 32 with zero weights, each row's blocks interleaved in groups of 16 (see "int8
 *             blocks" below). x is quantised per stream to the same blocks (int8 + fp32 scale, round
 *             half to even as torch.round), then each block is an exact integer dot product times
 *             scale_w * scale_x (ggml's vec_dot_q8_0_q8_0): AVX2 has no signed x signed byte
 *             multiply, so |x| (u8) x sign(x)*w (s8) go through maddubs; AVX-512 VNNI does u8 x s8
 *             in one vpdpbusd per 64 weights.
 * The same source is compiled once per instruction set: with -mavx512f/bw/vl/vnni the 512-bit loops
 * are used, otherwise AVX2 (every x86-64-v3 CPU). Python picks the build from the CPU's flags.
 *
 * Every (row, stream) dot product is computed the same way whatever B and the thread count are, so a
 * stream's result is bit-identical however many streams share the batch. Rows are processed 4 at a
 * time (four weight streams in flight; each row read once for all B streams while it sits in L1), in
 * chunks that the threads of rwkv_kernels/csrc/pool.h claim dynamically (no barrier: a thread another
 * process keeps off its core holds nobody up), and a group of products runs as one pool job.
 * Dequantisation for sequence mode runs on OpenMP (torch's pool, like the GEMM that follows).
 */
#ifndef RWKV_QUANT_OPS_H
#define RWKV_QUANT_OPS_H
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include "pool.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { FMT_F32 = 0, FMT_F16 = 1, FMT_BF16 = 2, FMT_Q8 = 3,   /* F32: cpu_ops.c's rows() */
       /* the low-bit formats (rwkv_kernels/lowbit.py): their products run the kernels of lowbit_ops.h
        * (decode_step.h maps these codes to its LB_* layouts); int8 with column scales (FMT_Q8C) runs
        * this file's int8 kernels, its x multiplied by the column scales as it is quantised */
       FMT_Q5_0 = 4, FMT_Q5_0C = 5, FMT_Q4_1 = 6, FMT_Q4_1C = 7, FMT_Q8C = 8, FMT_Q4_K = 9, FMT_Q4_KC = 10, FMT_Q5_K = 11, FMT_Q5_KC = 12 };
/* The enum as data: the format records of rwkv_kernels/formats.py are checked against it when the library
 * loads (format_name(code) for codes 0, 1, ... until NULL). */
static const char *const FMT_NAMES[] = {[FMT_F32] = "float32", [FMT_F16] = "float16", [FMT_BF16] = "bfloat16",
                                        [FMT_Q8] = "int8", [FMT_Q5_0] = "q5_0", [FMT_Q5_0C] = "q5_0+cols",
                                        [FMT_Q4_1] = "q4_1", [FMT_Q4_1C] = "q4_1+cols", [FMT_Q8C] = "int8+cols",
                                        [FMT_Q4_K] = "q4_k", [FMT_Q4_KC] = "q4_k+cols", [FMT_Q5_K] = "q5_k",
                                        [FMT_Q5_KC] = "q5_k+cols"};
const char *format_name(int64_t code) {
    return code >= 0 && code < (int64_t)(sizeof FMT_NAMES / sizeof *FMT_NAMES) ? FMT_NAMES[code] : 0;
}
#define QB 32
/* The 512-bit 16-bit loop's software prefetch distance is pf16_wide below (PF16_HINT, where the 16-bit
 * loops' prefetches land: cpu_ops.c). Decode streams each weight once; with four rows in flight per
 * thread the hardware prefetchers alone left the int8 and 16-bit kernels at ~15 GB/s where float32
 * reached ~23 (Sapphire Rapids, 2 threads, 169m-shaped layers beyond L3). */
/* The 256-bit 16-bit loop prefetches too, each row PF_GROUPS_AVX2 groups of 4 rows ahead but at least
 * this distance (AVX2-only Zen 3, one thread, from DRAM: float16 50277 x 768 11.1-12.1 ms at a fixed
 * 2 KB, 9.4-9.7 ms one group ahead; the row-major int8 loop of the time alike, 6.7-8.5 ms without any,
 * 5.1-5.4 with; two groups ahead or into L2 only measured the same there; on the Zen 4, 2 threads, into L2
 * is 1.2-1.5x faster: PF16_HINT). 0 turns it off (a -D for experiments). */
#ifndef PF_DIST16_AVX2
#define PF_DIST16_AVX2 2048
#endif
/* int8 rows the AVX2 loop walks at once: 1 reads each row start to end (one sequential stream, which
 * the hardware prefetcher follows); 4 interleaves four 768-byte rows and shares the x loads. Zen 3, 169m,
 * 2 threads, `bench.modes --profile --weights int8 --against float32`, builds alternating: int8 at 2.49x
 * and 2.38x float32 with 4, 2.74x and 2.85x with 1. The float order per row is the same either way. */
#ifndef Q8_ROWS_AVX2
#define Q8_ROWS_AVX2 1
#endif
#ifndef PF_GROUPS_AVX2
#define PF_GROUPS_AVX2 1
#endif
/* bytes ahead of the position being read in each row: PF_GROUPS_AVX2 groups of 4 rows ahead (the same
 * position in the row 4 rows on), at least the fixed distance; with short rows (768 int8 weights) a
 * fixed 2 KB ahead in a row lands in the rows the same group is reading anyway */
static inline int64_t pf_ahead(int64_t row_bytes, int64_t dist) {
    int64_t g = PF_GROUPS_AVX2 * 4 * row_bytes;
    return g > dist ? g : dist;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define WIDE 1
#else
#define WIDE 0
#endif

int isa_level(void) { return WIDE ? 512 : 256; }

/* The same choice for the 512-bit loop (set_q8_rows changes it at run time, for tests and experiments; the
 * bits are the same either way): one row at a time on every CPU. 2 threads, `bench.modes --profile
 * --weights int8 --against float32`, builds alternating, on the Zen 4: 169m 2.29x and 2.35x float32 with
 * 4 rows, 2.83x and 3.32x with 1 (1b5: 11.9 and 14.7 int8 tok/s with 4, 17.6 and 18.8 with 1); on an
 * Intel Xeon with AMX and a 480 MB L3 (family 6 model 167, 2026-12-07, `--against-src` a build with the
 * other setting): 1 row 1.02x (169m) and 1.04x, 1.04x (1b5) 4 rows' speed. The Sapphire Rapids measured
 * 3.44x float32 with 4 rows and never ran 1. */
static int q8_rows_wide = 1;
void set_q8_rows(int64_t rows) { q8_rows_wide = rows == 1 ? 1 : 4; }
int64_t get_q8_rows(void) { return WIDE ? q8_rows_wide : Q8_ROWS_AVX2; }

/* The 512-bit 16-bit loop likewise (set_wide16: rows shorter than `one_row_below` bytes walked one at a
 * time, longer ones four at a time; software prefetch distance in bytes, 0 for none; the bits are the
 * same either way). On the Zen 4 (2 threads, 24-96 bfloat16 matrices of one shape from DRAM, GB/s
 * one row / four rows, no prefetch): 3072x768 30 / 16, 2048x2048 30 / 22, 2560x2560 34 / 24,
 * 10240x2560 29 / 24, 4096x4096 19-27 / 22-26, 5120x5120 27 / 28, 2048x8192 23 / 30, 5120x20480
 * 23 / 39; software prefetch 2 KB ahead into L1 lowered every shape by 5-15%. `bench.modes --model
 * rwkv-4-pile-169m --profile --weights bfloat16 --against float32 --repeats 5 --steps 32`: 4 rows
 * prefetching 1.25x and 1.32x float32, 1 row without prefetch 1.98x and 1.98x; since the prefetches go
 * into L2 (PF16_HINT), 8 KB ahead: the same single stream, and tiles of several streams 1.3-1.5x faster.
 * The Sapphire Rapids had measured 4 rows prefetching 2 KB ahead into L1 best (+18%); on an Intel Xeon
 * with AMX and a 480 MB L3 (2026-12-07, `--against-src` a build with that setting), these settings
 * made 169m bfloat16 1.17x and 1.20x faster at one stream (float16 1.15x), 1.10x at 16 streams and
 * 1b5 1.04x; 4 rows with the 8 KB prefetch gave the same as 1 row at 169m. So every CPU uses them. */
static int64_t one_row16_below = 8192;
static int64_t pf16_wide = 8192;
void set_wide16(int64_t one_row_below, int64_t pf_bytes) {
    one_row16_below = one_row_below > 0 ? one_row_below : 0;
    pf16_wide = pf_bytes > 0 ? pf_bytes : 0;
}
int64_t get_wide16_one_row_below(void) { return WIDE ? one_row16_below : 0; }
int64_t get_wide16_pf(void) { return WIDE ? pf16_wide : PF_DIST16_AVX2; }
/* float32 rows below 4 streams (cpu_ops.c's rows()): in the 512-bit build each row is prefetched this many
 * bytes ahead into L2 (set_f32_pf changes it, for tests and experiments): 8 KB, measured on the Zen 4
 * (169m's products at 1 stream 1.14x, 3 streams 1.15x faster; 1b5's 1.02-1.03x) and on the Intel Xeon
 * with AMX (169m 1.02x, 1b5 1.03x: at least no loss); the AVX2 build prefetches 4 rows ahead, at least
 * 2 KB, as its 16-bit loop does. The bits do not depend on it. */
static int64_t pf32_wide = 8192;
void set_f32_pf(int64_t bytes) { pf32_wide = bytes > 0 ? bytes : 0; }
int64_t get_f32_pf(void) { return WIDE ? pf32_wide : -1; }
static int64_t pf_f32_bytes(int64_t I) {
#if WIDE
    (void)I;
    return pf32_wide;
#else
    return PF_DIST16_AVX2 ? pf_ahead(4 * I, PF_DIST16_AVX2) : 0;
#endif
}

/* ---- profile counters (bench.modes --profile), off unless profile_enable(1) -------------------
 * Per product tag (0: products outside decode_layers, e.g. the head; 1 + m: matrix m of decode_step.h):
 * products run, weight bytes read, wall time, activation quantisation, summed chunk time of all threads
 * (work) and the time threads spent in a job without a chunk (idle: hand-offs, waiting for the last
 * chunk), both per thread; a group's wall time is split among its products by their share of the work,
 * so wall = quant + work / threads + idle per product. Element-wise ops and whole steps: decode_step.h. */
#define PROF_TAGS 8
#define PROF_FIELDS 6
enum { PF_PRODUCTS, PF_BYTES, PF_WALL, PF_QUANT, PF_WORK, PF_IDLE };
#define PROF_EW 6                /* decode_step.h's EW_* ops, then the rescale */
static struct {
    _Atomic int on;
    _Atomic int64_t tag[PROF_TAGS][PROF_FIELDS];
    _Atomic int64_t ew[PROF_EW];
    _Atomic int64_t steps, step_ns;      /* decode_layers calls and their wall time */
    _Atomic int next_tid;
} prof;
static __thread int prof_tid = -1;

static inline int prof_on(void) { return atomic_load_explicit(&prof.on, memory_order_relaxed); }
static inline void prof_add(_Atomic int64_t *c, int64_t v) { atomic_fetch_add_explicit(c, v, memory_order_relaxed); }

void profile_enable(int64_t on) {
    atomic_store(&prof.on, 0);
    for (int t = 0; t < PROF_TAGS; t++) for (int f = 0; f < PROF_FIELDS; f++) atomic_store(&prof.tag[t][f], 0);
    for (int e = 0; e < PROF_EW; e++) atomic_store(&prof.ew[e], 0);
    atomic_store(&prof.steps, 0);
    atomic_store(&prof.step_ns, 0);
    atomic_store(&prof.on, (int)on);
}

/* out [PROF_TAGS * PROF_FIELDS + PROF_EW + 2]: the tags' fields, the element-wise ns, steps, step ns. */
int64_t profile_read(int64_t *out) {
    int64_t k = 0;
    for (int t = 0; t < PROF_TAGS; t++) for (int f = 0; f < PROF_FIELDS; f++) out[k++] = atomic_load(&prof.tag[t][f]);
    for (int e = 0; e < PROF_EW; e++) out[k++] = atomic_load(&prof.ew[e]);
    out[k++] = atomic_load(&prof.steps);
    out[k++] = atomic_load(&prof.step_ns);
    return k;
}

/* (16-bit weights are widened by cpu_ops.c's wl_f16 / wl_bf16, for the products and dequantisation alike) */

/* ---- int8 weights x int8-quantised activations ---------------------------------------------- */

/* x [I] -> q [Ip] int8 and d [Ip / 32] float: per block d = amax / 127, q = round(x / d) (half to
 * even: the default rounding of cvtps_epi32 and nearbyintf) */
/* quantize_x of x * col (col NULL: of x); each product x[i] * col[i] is rounded once, as written */
static void quantize_x_col(const float *x, const float *col, int64_t I, int64_t Ip, int8_t *q, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t b0 = 0;
    for (; b0 + QB <= I; b0 += QB) {                   /* whole blocks: 4 vectors of 8 */
        __m256 v0 = _mm256_loadu_ps(x + b0), v1 = _mm256_loadu_ps(x + b0 + 8);
        __m256 v2 = _mm256_loadu_ps(x + b0 + 16), v3 = _mm256_loadu_ps(x + b0 + 24);
        if (col) {
            v0 = _mm256_mul_ps(v0, _mm256_loadu_ps(col + b0));
            v1 = _mm256_mul_ps(v1, _mm256_loadu_ps(col + b0 + 8));
            v2 = _mm256_mul_ps(v2, _mm256_loadu_ps(col + b0 + 16));
            v3 = _mm256_mul_ps(v3, _mm256_loadu_ps(col + b0 + 24));
        }
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h), dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
        d[b0 / QB] = dd;
        __m256 vid = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        __m256i b8 = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b0), _mm256_permutevar8x32_epi32(b8, order));
    }
    for (; b0 < Ip; b0 += QB) {                        /* the last, partial block and the padding */
        float amax = 0.0f;
        for (int64_t i = b0; i < b0 + QB && i < I; i++) amax = fmaxf(amax, fabsf(col ? x[i] * col[i] : x[i]));
        float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
        d[b0 / QB] = dd;
        for (int64_t i = b0; i < b0 + QB; i++)
            q[i] = i < I ? (int8_t)nearbyintf((col ? x[i] * col[i] : x[i]) * id) : 0;
    }
}

static void quantize_x(const float *x, int64_t I, int64_t Ip, int8_t *q, float *d) {
    quantize_x_col(x, NULL, I, Ip, q, d);
}

/* The sum of 8 float lanes in one fixed order, the same in both builds (the int8 kernel's results are
 * identical between them): ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)). */
static inline float hsum8_fixed(__m256 v) {
    __m128 u = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));   /* v_k + v_k+4 */
    u = _mm_add_ps(u, _mm_movehl_ps(u, u));                                           /* u0+u2, u1+u3 */
    return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
}

/* hsum8_fixed of 8 vectors at once, into out[0..7]: the same additions in the same order for each
 * (u = lo + hi, then (u0 + u2) + (u1 + u3)), done on the 8 side by side, so 22 shuffles and adds
 * instead of 48 and 8 scalar stores. */
static inline void hsum8_fixed_x8(const __m256 v[8], float *out) {
    __m256 u[4], z[2];
    for (int k = 0; k < 4; k++)                  /* [u(v_2k) | u(v_2k+1)], u_i = v_i + v_i+4 */
        u[k] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x31));
    for (int k = 0; k < 2; k++)                  /* per half: [u0 + u2, u1 + u3] of two vectors each */
        z[k] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 s = _mm256_add_ps(_mm256_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm256_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* s holds the sums of v0, v2, v4, v6 | v1, v3, v5, v7 */
    _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* ---- int8 blocks (Q8_0), 16 blocks interleaved per group -----------------------------------
 * A row of Ip bytes (nb = Ip / 32 blocks; rwkv_kernels/formats.py: interleave_blocks) is stored as
 * groups of QG = 16 blocks (fewer in a last group, m of them): group G at byte 512 G holds blocks
 * 16G .. 16G + m - 1 as [8][m][4], dword g of block 16G + l (its bytes 4g .. 4g + 3) at byte
 * 4 (g m + l). So the 64-byte load g of a group holds dword g of 16 blocks, one block per 32-bit lane,
 * and 8 vpdpbusd (maddubs + madd in the AVX2 build) leave each lane one block's whole integer dot
 * product: one convert, one scale multiply and one FMA per 16 blocks and stream, where a row-major
 * block needs them per block. x is quantised to the same blocks once per product and stream, and laid
 * out the same way.
 * The float order of a row, the same in both builds, for R rows at once or one, and whatever the
 * number of streams: 16 lane accumulators, lane l taking blocks l, 16 + l, 32 + l, ... in order, each
 * block's exact integer dot converted to float (exact: |dot| <= 32 * 127 * 127 < 2^24) and FMA'd with
 * the block's scale product sw_j * dx_j (rounded to float32 first); then hsum8_fixed(lanes 0-7 +
 * lanes 8-15). Lanes past the last block of a short group add 0 * 0 or are skipped: the same thing,
 * as an accumulator is never -0 (it starts at +0, and a nonzero exact sum of floats, a multiple of
 * 2^-149, cannot round to zero). */
#define QG 16
/* Software prefetch of the int8 loops (both builds): each 64-byte line this many bytes ahead, into L2
 * (_MM_HINT_T1). Zen 4, 2 threads, one 169m decode step's 85 int8 products alternating builds in one
 * process (single stream), 512-bit build: 5.24-5.44 ms with no prefetch or into L1 at 1-8 KB (those were
 * slower still), 4.52 ms with this, against 5.24 ms for the row-major loop of c2a3527 with its 4 KB into
 * L1; 16 streams (the tiles, the first of each 4 rows prefetching): 16.9 -> 16.3 ms. The AVX2 build on
 * the same CPU: 5.36-5.37 ms (4 KB: 5.63-5.68; into L1: 5.19-5.80 against 4.65 in that run; none: 5.40
 * against 4.65) against the row-major loop's 5.83 ms; 16 streams 44.9 -> 35.9 ms. Not measured on an
 * AVX2-only CPU (the Zen 3 chose the row-major loop's prefetch). 0: none (a -D for experiments). */
#ifndef Q8_PF
#define Q8_PF 8192
#endif

/* stream scratch: xq (int8, the row layout above), xa = |xq| (AVX2's unsigned operand), dx [nb] the
 * block scales, corr [nb rounded up to 16]: 512-bit, -128 x (the block's sum of xq) (vpdpbusd's
 * unsigned offset); AVX2, the block's sum of |xq| over its negative xq (the tiles' XOR, see there) */
static inline int64_t q8_corr_len(int64_t nb) { return (nb + QG - 1) / QG * QG; }

/* 8 rows of 8 dwords (src, 32 bytes apart) -> their transpose: dword k of row l to dword l of row k,
 * row k stored at dst + k * dstride (in place where dst = src and dstride = 32: every row is loaded
 * before any is stored). unpack 32, unpack 64, then the 128-bit halves. */
static inline void dw_transpose8(const int8_t *src, int8_t *dst, int64_t dstride) {
    __m256i r[8], t[8];
    for (int l = 0; l < 8; l++) r[l] = _mm256_loadu_si256((const __m256i *)(src + 32 * l));
    for (int k = 0; k < 4; k++) {           /* pairs of rows: dwords (0 1 4 5) and (2 3 6 7) */
        t[2 * k] = _mm256_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm256_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; k++)             /* quads of rows: one dword each per 128-bit lane */
        for (int h = 0; h < 2; h++) {
            r[4 * k + 2 * h] = _mm256_unpacklo_epi64(t[4 * k + h], t[4 * k + 2 + h]);
            r[4 * k + 2 * h + 1] = _mm256_unpackhi_epi64(t[4 * k + h], t[4 * k + 2 + h]);
        }
    /* r[q] for q < 4 holds dwords q (low lane) and q + 4 (high lane) of rows 0-3, r[4 + q] the same of
     * rows 4-7: the two 128-bit halves meet in the transpose's rows q and q + 4 */
    for (int q = 0; q < 4; q++) {
        _mm256_storeu_si256((__m256i *)(dst + q * dstride), _mm256_permute2x128_si256(r[q], r[4 + q], 0x20));
        _mm256_storeu_si256((__m256i *)(dst + (q + 4) * dstride), _mm256_permute2x128_si256(r[q], r[4 + q], 0x31));
    }
}

/* row-major int8 [nb * 32] -> the interleaved layout (for x; the weights are laid out in Python). Each
 * 8 blocks of a group are a dw_transpose8 (block l's dword g to dword g m + l); blocks past the last 8
 * of a group go one dword at a time. Against the dword-at-a-time loop (a scratch harness; Zen 4, AVX2
 * build, one thread, 16 streams): 768 inputs 2.5 -> 0.34 us, 3072 8.5 -> 0.95 us, from 40% of the
 * activation quantisation to 8%; the 16-stream step's quantisation 1.20 -> 0.98 ms (bench.modes). */
static void q8_interleave(const int8_t *src, int8_t *dst, int64_t nb) {
    for (int64_t j0 = 0; j0 < nb; j0 += QG) {
        const int m = nb - j0 >= QG ? QG : (int)(nb - j0);
        const int8_t *s = src + j0 * QB;
        int8_t *d = dst + j0 * QB;
        int l0 = 0;
        for (; l0 + 8 <= m; l0 += 8) dw_transpose8(s + l0 * QB, d + 4 * l0, 4 * m);
        for (int l = l0; l < m; l++)
            for (int g = 0; g < 8; g++) memcpy(d + 4 * (g * m + l), s + l * QB + 4 * g, 4);
    }
}

#if !WIDE
/* the lanes [8h, 8h + 8) of a group's dword g, n of them valid (the others read as 0) */
static inline __m256i q8_load_half(const void *p, int n) {
    if (n >= 8) return _mm256_loadu_si256((const __m256i *)p);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_epi32((const int *)p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}
#endif

/* 512-bit: corr[j] = -128 x (the sum of block j of x), from x in the interleaved layout; 0 past the last block */
static void q8_corrections(const int8_t *xq, int64_t nb, int32_t *corr) {
#if WIDE
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t j0 = 0; j0 < nb; j0 += QG) {
        const int m = nb - j0 >= QG ? QG : (int)(nb - j0);
        const __mmask16 k = (__mmask16)((1u << m) - 1);
        __m512i a = _mm512_setzero_si512();
        for (int g = 0; g < 8; g++) a = _mm512_dpbusd_epi32(a, ones, _mm512_maskz_loadu_epi32(k, xq + j0 * QB + 4 * g * m));
        _mm512_storeu_si512(corr + j0, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(a, 7)));
    }
#else
    /* AVX2: corr[j] = the sum of |x| over block j's negative x. The tiles multiply |x| by w XOR (x's
     * sign mask), which is -w - 1 where x < 0: each block's integer dot comes out short by exactly
     * that sum, so their accumulators start at it (exact integers: the same dot as the sign step) */
    const __m256i zero = _mm256_setzero_si256(), ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int64_t j0 = 0; j0 < nb; j0 += QG) {
        const int m = nb - j0 >= QG ? QG : (int)(nb - j0);
        for (int h = 0; h < 2; h++) {
            const int n = h ? m - 8 : (m >= 8 ? 8 : m);
            __m256i a = zero;
            for (int g = 0; g < 8 && n > 0; g++) {
                const __m256i neg = _mm256_abs_epi8(_mm256_min_epi8(q8_load_half(xq + j0 * QB + 4 * g * m + 32 * h, n), zero));
                a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(neg, ones8), ones16));
            }
            _mm256_storeu_si256((__m256i *)(corr + j0 + 8 * h), a);
        }
    }
#endif
}

#if WIDE
static inline __m512i q8_load(const void *p, const int masked, __mmask16 k) {
    return masked ? _mm512_maskz_loadu_epi32(k, p) : _mm512_loadu_si512(p);
}

/* one group (m blocks from block j0) of R rows . one stream, into acc[r] (see the order above) */
static inline __attribute__((always_inline)) void q8_group_rows(const int R, const int masked, const int m,
        const int8_t *const *w, const uint16_t *const *sw, const int8_t *xq, const int32_t *corr,
        const float *dx, int64_t j0, __m512 *acc) {
    const __mmask16 k = (__mmask16)((1u << m) - 1);
    const __m512i off = _mm512_set1_epi8((char)0x80);
    const int64_t base = j0 * QB;
    __m512i xv[8];
    for (int g = 0; g < 8; g++) xv[g] = q8_load(xq + base + 4 * g * m, masked, k);
    const __m512i cv = q8_load(corr + j0, masked, k);
    const __m512 dxv = masked ? _mm512_maskz_loadu_ps(k, dx + j0) : _mm512_loadu_ps(dx + j0);
    for (int r = 0; r < R; r++) {
        /* sum (w + 128) x - 128 sum x = sum w x (w XOR 0x80 is w + 128, unsigned), in four chains of 2
         * (integer sums: exact in any order) */
        __m512i a[4] = {cv, _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int g = 0; g < 8; g++) {
            if (Q8_PF) _mm_prefetch((const char *)(w[r] + base + 64 * g + Q8_PF), _MM_HINT_T1);
            a[g & 3] = _mm512_dpbusd_epi32(a[g & 3], _mm512_xor_si512(q8_load(w[r] + base + 4 * g * m, masked, k), off), xv[g]);
        }
        const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
        const __m256i s16 = masked ? _mm256_maskz_loadu_epi16(k, sw[r] + j0) : _mm256_loadu_si256((const __m256i *)(sw[r] + j0));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_cvtph_ps(s16), dxv), acc[r]);
    }
}

static inline float q8_reduce(__m512 acc) {
    return hsum8_fixed(_mm256_add_ps(_mm512_castps512_ps256(acc),
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))));
}
#else

/* one group of R rows . one stream in 256-bit halves: lo[r] takes lanes 0-7, hi[r] lanes 8-15. Each
 * row is read in order (both halves of a dword's 64 bytes, then the next dword), its integer dots
 * summed in ah / al, then converted and FMA'd as in the 512-bit build. Each dword is |x| . (w XOR x's
 * sign mask), as in the tiles below, the sums starting at corr: exact for every int8 w, -128 included,
 * where vpsignb's -(-128) would wrap. */
static inline __attribute__((always_inline)) void q8_group_rows(const int R, const int m, const int8_t *const *w,
        const uint16_t *const *sw, const int8_t *xm, const uint8_t *xa, const int32_t *corr, const float *dx,
        int64_t j0, int64_t pf, __m256 *lo, __m256 *hi) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t base = j0 * QB;
    const int n0 = m >= 8 ? 8 : m, n1 = m - 8;          /* valid lanes of each half (n1 <= 0: none) */
    const __m256i c0 = _mm256_loadu_si256((const __m256i *)(corr + j0)), c1 = _mm256_loadu_si256((const __m256i *)(corr + j0 + 8));
    for (int r = 0; r < R; r++) {
        __m256i a0 = c0, a1 = c1;
        for (int g = 0; g < 8; g++) {
            const int64_t at = base + 4 * g * m;
            if (pf) _mm_prefetch((const char *)(w[r] + base + 64 * g) + pf, _MM_HINT_T1);
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(q8_load_half(xa + at, n0),
                     _mm256_xor_si256(q8_load_half(w[r] + at, n0), q8_load_half(xm + at, n0))), ones));
            if (n1 > 0)
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(q8_load_half(xa + at + 32, n1),
                         _mm256_xor_si256(q8_load_half(w[r] + at + 32, n1), q8_load_half(xm + at + 32, n1))), ones));
        }
        for (int h = 0; h < 2; h++) {
            const int n = h ? n1 : n0;
            if (n <= 0) break;    /* lanes 8-15 of a group of <= 8 blocks: 0 * 0 would leave them as they are */
            __m256 cs;
            if (n == 8)
                cs = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sw[r] + j0 + 8 * h))),
                                   _mm256_loadu_ps(dx + j0 + 8 * h));
            else {
                float c[8];
                for (int i = 0; i < 8; i++) c[i] = i < n ? _cvtsh_ss(sw[r][j0 + 8 * h + i]) * dx[j0 + 8 * h + i] : 0.0f;
                cs = _mm256_loadu_ps(c);
            }
            const __m256 f = _mm256_cvtepi32_ps(h ? a1 : a0);
            if (h == 0) lo[r] = _mm256_fmadd_ps(f, cs, lo[r]);
            else hi[r] = _mm256_fmadd_ps(f, cs, hi[r]);
        }
    }
}
#endif

/* R rows (R = 1 or 4) of int8 blocks . one stream's quantised x: the order above */
static inline __attribute__((always_inline)) void dotn_q8(const int R, const int8_t *const *w,
        const uint16_t *const *sw, const int8_t *xq, const uint8_t *xa, const int32_t *corr, const float *dx,
        int64_t nb, int64_t pf, float *out) {
    int64_t j0 = 0;
#if WIDE
    (void)xa; (void)pf;
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (; j0 + QG <= nb; j0 += QG) q8_group_rows(R, 0, QG, w, sw, xq, corr, dx, j0, acc);
    if (j0 < nb) q8_group_rows(R, 1, (int)(nb - j0), w, sw, xq, corr, dx, j0, acc);
    for (int r = 0; r < R; r++) out[r] = q8_reduce(acc[r]);
#else
    __m256 lo[4], hi[4];
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (; j0 + QG <= nb; j0 += QG) q8_group_rows(R, QG, w, sw, xq, xa, corr, dx, j0, pf, lo, hi);
    /* a last group of exactly 8 blocks (169m's rows of 24) with its size known at compile time: plain
     * loads and no per-load tests (the same arithmetic as the general call) */
    if (nb - j0 == QG / 2) q8_group_rows(R, QG / 2, w, sw, xq, xa, corr, dx, j0, pf, lo, hi);
    else if (j0 < nb) q8_group_rows(R, (int)(nb - j0), w, sw, xq, xa, corr, dx, j0, pf, lo, hi);
    for (int r = 0; r < R; r++) out[r] = hsum8_fixed(_mm256_add_ps(lo[r], hi[r]));
#endif
}

static void dot4_q8(const int8_t *const *w, const uint16_t *const *sw, const int8_t *xq, const uint8_t *xa,
                    const int32_t *corr, const float *dx, int64_t nb, int64_t pf, float *out) {
    dotn_q8(4, w, sw, xq, xa, corr, dx, nb, pf, out);
}

/* ---- grouped products -------------------------------------------------------------------- */

typedef struct {
    int64_t fmt, O, I, Ip;      /* Ip: row stride of W in elements (I, or I rounded up to 32 for Q8) */
    const void *W;
    const uint16_t *S;          /* Q8: float16 scales [O, Ip / 32] */
    const float *x;             /* [B, I] */
    float *y;                   /* [B, O] */
    int8_t *xq;                 /* Q8 scratch: [B, Ip] */
    float *dx;                  /* Q8 scratch: [B, Ip / 32] */
    uint8_t *xa;                /* Q8 scratch: |xq| [B, Ip] */
    int32_t *corr;              /* Q8 scratch: [B, q8_corr_len(Ip / 32)] */
    int64_t tag;                /* profile counters: 0, or 1 + the matrix of decode_step.h */
    int64_t xpos;               /* Q8: set by run_products when no stream's xq is negative (AVX2 tiles) */
    int8_t *xm;                 /* Q8 scratch, AVX2, B = 1: xq's sign masks (-1 where xq < 0, else 0) [Ip],
                                 * for the one-stream loop (the tiles, B > 1, compare x with 0 themselves:
                                 * as fast, once per stream for 4 rows; so they are not stored then) */
    const float *col;           /* Q8: NULL, or float32 [I] column scales ("int8+cols"): x col is quantised */
} product;

/* int8 rows r..r+3 (clamped to the last row) . stream b */
static void dot4(const product *p, int64_t r, int64_t b, float *out) {
    int64_t rr[4];
    for (int k = 0; k < 4; k++) rr[k] = r + k < p->O ? r + k : p->O - 1;
    int64_t nb = p->Ip / QB;
    const int8_t *w[4];
    const uint16_t *sw[4];
    for (int k = 0; k < 4; k++) { w[k] = (const int8_t *)p->W + rr[k] * p->Ip; sw[k] = p->S + rr[k] * nb; }
#if WIDE
    const int8_t *xq = p->xq + b * p->Ip;
#else
    const int8_t *xq = p->xm + b * p->Ip;         /* the AVX2 loop reads x's sign masks, not x */
#endif
    const uint8_t *xa = p->xa + b * p->Ip;
    const int32_t *corr = p->corr + b * q8_corr_len(nb);
    const int64_t pf = Q8_PF;
    if (get_q8_rows() == 1)
        for (int k = 0; k < 4; k++) dotn_q8(1, &w[k], &sw[k], xq, xa, corr, p->dx + b * nb, nb, pf, &out[k]);
    else
        dot4_q8(w, sw, xq, xa, corr, p->dx + b * nb, nb, pf, out);
}

#if WIDE
/* Several streams, 512-bit build: 4 rows x S streams (S <= 2) of int8 dots, dword-major: for each
 * dword g of a group, the 4 rows' and the S streams' 64-byte loads are made once each and meet in
 * 4 x S vpdpbusd into 4 x S integer accumulators (8 rows' and streams' loads for 8 multiplies, where
 * one (row, stream) at a time loads one x per multiply). Each (row, stream) gets the arithmetic of
 * dotn_q8 for that row and stream (the same exact block dots, scale products, lanes, order and
 * reduction), so its bits do not depend on the batch. A last group of exactly 8 blocks (169m's rows of
 * 24) is read as 4 loads of dwords (g, g + 1) and folded; its lanes 8-15 would add 0 * 0 (see above). */
static inline __attribute__((always_inline)) void q8_tile_group(const int S, const int masked, const int m,
        const int8_t *const *w, const uint16_t *const *sw, const int8_t *xq, const int32_t *corr, const float *dx,
        int64_t Ip, int64_t nc, int64_t nb, int64_t j0, int pf, const char *pq, __m512 acc[4][2]) {
    const __mmask16 k = (__mmask16)((1u << m) - 1);
    const __m512i off = _mm512_set1_epi8((char)0x80);
    const int64_t base = j0 * QB;
    __m512i a[4][2];
    for (int t = 0; t < S; t++) {
        const __m512i c = q8_load(corr + t * nc + j0, masked, k);
        for (int r = 0; r < 4; r++) a[r][t] = c;
    }
    for (int g = 0; g < 8; g++) {
        if (Q8_PF && pf) for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(w[r] + base + 64 * g + Q8_PF), _MM_HINT_T1);
        if (pq) _mm_prefetch(pq + (j0 / 2 + g) * 64, _MM_HINT_T1);
        __m512i xv[2];
        for (int t = 0; t < S; t++) xv[t] = q8_load(xq + t * Ip + base + 4 * g * m, masked, k);
        for (int r = 0; r < 4; r++) {
            const __m512i wv = _mm512_xor_si512(q8_load(w[r] + base + 4 * g * m, masked, k), off);
            for (int t = 0; t < S; t++) a[r][t] = _mm512_dpbusd_epi32(a[r][t], wv, xv[t]);
        }
    }
    for (int r = 0; r < 4; r++) {
        const __m512 swv = _mm512_cvtph_ps(masked ? _mm256_maskz_loadu_epi16(k, sw[r] + j0)
                                                  : _mm256_loadu_si256((const __m256i *)(sw[r] + j0)));
        for (int t = 0; t < S; t++) {
            const __m512 dxv = masked ? _mm512_maskz_loadu_ps(k, dx + t * nb + j0) : _mm512_loadu_ps(dx + t * nb + j0);
            acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][t]), _mm512_mul_ps(swv, dxv), acc[r][t]);
        }
    }
}

static inline __attribute__((always_inline)) void tile_q8(const int S, const int8_t *const *w,
        const uint16_t *const *sw, const int8_t *xq, const int32_t *corr, const float *dx, int64_t Ip, int64_t nb,
        int pf, const char *pq, float *out) {
    const int64_t nc = q8_corr_len(nb);
    __m512 acc[4][2];
    for (int r = 0; r < 4; r++) for (int t = 0; t < S; t++) acc[r][t] = _mm512_setzero_ps();
    int64_t j0 = 0;
    for (; j0 + QG <= nb; j0 += QG) q8_tile_group(S, 0, QG, w, sw, xq, corr, dx, Ip, nc, nb, j0, pf, pq, acc);
    const int m = (int)(nb - j0);
    if (m != QG / 2) {
        if (m) q8_tile_group(S, 1, m, w, sw, xq, corr, dx, Ip, nc, nb, j0, pf, pq, acc);
        for (int t = 0; t < S; t++) for (int r = 0; r < 4; r++) out[t * 4 + r] = q8_reduce(acc[r][t]);
        return;
    }
    const __m512i off = _mm512_set1_epi8((char)0x80);
    const int64_t base = j0 * QB;
    __m512i a[4][2];
    for (int t = 0; t < S; t++) {
        const __m512i c = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(corr + t * nc + j0)));
        for (int r = 0; r < 4; r++) a[r][t] = c;
    }
    for (int g = 0; g < 4; g++) {             /* lanes 0-7: dword 2g of the 8 blocks; 8-15: dword 2g + 1 */
        __m512i xv[2];
        for (int t = 0; t < S; t++) xv[t] = _mm512_loadu_si512(xq + t * Ip + base + 64 * g);
        for (int r = 0; r < 4; r++) {
            const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w[r] + base + 64 * g), off);
            for (int t = 0; t < S; t++) a[r][t] = _mm512_dpbusd_epi32(a[r][t], wv, xv[t]);
        }
    }
    for (int r = 0; r < 4; r++) {
        const __m256 swv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sw[r] + j0)));
        for (int t = 0; t < S; t++) {
            const __m256i d8 = _mm256_add_epi32(_mm512_castsi512_si256(a[r][t]), _mm512_extracti64x4_epi64(a[r][t], 1));
            const __m256 c = _mm256_mul_ps(swv, _mm256_loadu_ps(dx + t * nb + j0));
            const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d8), c, _mm512_castps512_ps256(acc[r][t]));
            out[t * 4 + r] = hsum8_fixed(_mm256_add_ps(lo, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][t]), 1))));
        }
    }
}

#else
/* Several streams, AVX2 build: 4 rows x S streams (S <= 2), dword-major like the 512-bit tile, each half
 * (lanes 0-7, 8-15) of a group in turn: per dword, the S streams' 32-byte loads once each and each
 * row's once per stream (an XOR's memory operand: 1.02-1.03x against one register per row, which costs
 * a register the chains need) for 4 x S XOR + maddubs + madd. In place of a sign step (vpsignb: slow on AMD, bench.ceiling,
 * and -(-128) wraps) w is XORed with x's sign mask, which gives -w - 1 where x < 0, and the integer
 * accumulators start at corr (the sum of |x| over the block's negative x) to make up the -1s: the same
 * integers. Zen 4, AVX2 build, 169m, 16 streams, against the sign step: the signed products 1.05-1.10x,
 * the step 1.06x (bench.modes --profile --against-src). Each (row, stream) is dotn_q8's arithmetic (the same integers,
 * scale products and FMAs into the same halves, hsum8_fixed(lo + hi)), so its bits do not depend on
 * the batch. POS: no stream's x is negative (run_products checks; the FFN's value product, whose input
 * is a squared ReLU): then |x| = x and maddubs(|x|, w) is the same integer dot without a sign step or
 * XOR, 3 instructions per 32 weights instead of 4. Against the sign step there, AVX2 build on Zen 4, 169m,
 * 16 streams (bench.modes --profile --against-src): the value products 4.99 -> 3.50 ms, the step 1.10x. */
/* half h (lanes 8h .. 8h + 7, n of them valid) of the group of m blocks from block j0, into acc[r][t]. Called
 * with constant n = 8 and m = QG for the full groups, so their loads and offsets are fixed at compile time. */
static inline __attribute__((always_inline)) void tile_q8_half(const int POS, const int S, const int n, const int m,
        const int h, const int8_t *const *w, const uint16_t *const *sw, const int8_t *xq, const uint8_t *xa,
        const int32_t *corr, int64_t nc, const float *dx, int64_t Ip, int64_t nb, int64_t j0, int pf, const char *pq,
        __m256 acc[4][2]) {
    const __m256i ones = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
    const int64_t base = j0 * QB;
    __m256i a[4][2];
    for (int t = 0; t < S; t++) {
        const __m256i c = POS ? zero : _mm256_loadu_si256((const __m256i *)(corr + t * nc + j0 + 8 * h));
        for (int r = 0; r < 4; r++) a[r][t] = c;
    }
    for (int g = 0; g < 8; g++) {
        const int64_t at = base + 4 * g * m + 32 * h;
        if (Q8_PF && pf && h == 0) for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(w[r] + base + 64 * g) + Q8_PF, _MM_HINT_T1);
        if (pq && h == 0) _mm_prefetch(pq + (j0 / 2 + g) * 64, _MM_HINT_T1);
        __m256i sm[2], av[2];               /* x's sign masks (0 or -1 per byte), |x| */
        for (int t = 0; t < S; t++) {
            sm[t] = POS ? zero : _mm256_cmpgt_epi8(zero, q8_load_half(xq + t * Ip + at, n));
            av[t] = q8_load_half(xa + t * Ip + at, n);
        }
        /* |x| . (w XOR mask): w where x >= 0, -w - 1 where x < 0 (corr makes up the -1s); POS: x >= 0,
         * so |x| = x and no mask. |w XOR mask| <= 128, so a pair of products fits maddubs' int16. Each
         * (row, stream) is one chain into its accumulator, and the empty asm pins the accumulator to a
         * register at that point: without it gcc hoists the 8 chains' loads and XORs and spills half the
         * accumulators to the stack every step (Zen 4, AVX2 build, 2 threads, 169m's 85 products: 1.07x at
         * 16 streams, 1.06x at 4, the same bits; bench.products --against-src) */
        for (int r = 0; r < 4; r++) {
            for (int t = 0; t < S; t++) {
                const __m256i wv = q8_load_half(w[r] + at, n);
                __m256i v = _mm256_maddubs_epi16(av[t], POS ? wv : _mm256_xor_si256(wv, sm[t]));
                v = _mm256_madd_epi16(v, ones);
                a[r][t] = _mm256_add_epi32(a[r][t], v);
                __asm__("" : "+x"(a[r][t]));
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < S; t++) {
            __m256 cs;
            if (n == 8)
                cs = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sw[r] + j0 + 8 * h))),
                                   _mm256_loadu_ps(dx + t * nb + j0 + 8 * h));
            else {
                float c[8];
                for (int i = 0; i < 8; i++) c[i] = i < n ? _cvtsh_ss(sw[r][j0 + 8 * h + i]) * dx[t * nb + j0 + 8 * h + i] : 0.0f;
                cs = _mm256_loadu_ps(c);
            }
            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][t]), cs, acc[r][t]);
        }
}

static inline __attribute__((always_inline)) void tile_q8(const int POS, const int S, const int8_t *const *w,
        const uint16_t *const *sw, const int8_t *xq, const uint8_t *xa, const int32_t *corr, const float *dx,
        int64_t Ip, int64_t nb, int pf, const char *pq, float *out) {
    const int64_t nc = q8_corr_len(nb);
    __m256 acc[2][4][2];
    for (int h = 0; h < 2; h++) for (int r = 0; r < 4; r++) for (int t = 0; t < S; t++) acc[h][r][t] = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < nb; j0 += QG) {
        const int m = nb - j0 >= QG ? QG : (int)(nb - j0);
        if (m == QG) {
            tile_q8_half(POS, S, 8, QG, 0, w, sw, xq, xa, corr, nc, dx, Ip, nb, j0, pf, pq, acc[0]);
            tile_q8_half(POS, S, 8, QG, 1, w, sw, xq, xa, corr, nc, dx, Ip, nb, j0, pf, pq, acc[1]);
            continue;
        }
        if (m == QG / 2) {      /* a last group of exactly 8 blocks (169m's rows of 24): sizes known at
                                 * compile time, so plain loads and no per-load tests; the same arithmetic */
            tile_q8_half(POS, S, 8, QG / 2, 0, w, sw, xq, xa, corr, nc, dx, Ip, nb, j0, pf, pq, acc[0]);
            continue;
        }
        for (int h = 0; h < 2; h++) {
            const int n = h ? m - 8 : (m >= 8 ? 8 : m);
            if (n <= 0) break;    /* lanes 8-15 of a group of <= 8 blocks: 0 * 0 would leave them as they are */
            tile_q8_half(POS, S, n, m, h, w, sw, xq, xa, corr, nc, dx, Ip, nb, j0, pf, pq, acc[h]);
        }
    }
    __m256 v[8];
    for (int t = 0; t < 2; t++)
        for (int r = 0; r < 4; r++) v[t * 4 + r] = t < S ? _mm256_add_ps(acc[0][r][t], acc[1][r][t]) : _mm256_setzero_ps();
    hsum8_fixed_x8(v, out);                       /* out [8]: for S = 1 the last 4 are unused */
}
#endif

/* rows [o0, o1) of an int8 product for B >= 2 streams: tiles of 4 rows x Q8_TILE_S, ..., 1 streams */
#ifndef Q8_TILE_S
#define Q8_TILE_S 2
#endif
#if Q8_TILE_S < 1 || Q8_TILE_S > 2
#error "Q8_TILE_S: 1 or 2 streams per tile (tile_q8's accumulators are [4][2])"
#endif
static inline __attribute__((always_inline)) void q8_rows_tiled_(const product *p, int64_t B, int64_t o0, int64_t o1,
                                                                  int acc, const int spread) {
    const int64_t Ip = p->Ip, nb = Ip / QB, nc = q8_corr_len(nb);
    float t[8];
    for (int64_t o = o0; o < o1; o += 4) {
        const char *ahead = spread && o + 8 <= o1 ? (const char *)p->W + (o + 4) * Ip : NULL;
        const int8_t *w[4];
        const uint16_t *sw[4];
        for (int k = 0; k < 4; k++) {
            int64_t r = o + k < p->O ? o + k : p->O - 1;     /* the last rows repeat */
            w[k] = (const int8_t *)p->W + r * Ip;
            sw[k] = p->S + r * nb;
        }
        for (int64_t b = 0; b < B;) {
            const int S = B - b >= Q8_TILE_S ? Q8_TILE_S : (int)(B - b);
            const int k = (int)(b / Q8_TILE_S), pf = !spread && b == 0;
            const char *pq = ahead && k < 4 ? ahead + k * Ip : NULL;
#if WIDE
            const void *xs = p->corr + b * nc;           /* the 512-bit build's offsets; AVX2: |x| */
#else
            const void *xs = p->xa + b * Ip;
#endif
#if WIDE
            if (S == 2) tile_q8(2, w, sw, p->xq + b * Ip, xs, p->dx + b * nb, Ip, nb, pf, pq, t);
            else tile_q8(1, w, sw, p->xq + b * Ip, xs, p->dx + b * nb, Ip, nb, pf, pq, t);
#else       /* the XOR form; where no stream's x is negative (the FFN's value product) neither XOR nor mask */
            const int32_t *cb = p->corr + b * nc;
            if (S == 2 && p->xpos) tile_q8(1, 2, w, sw, p->xq + b * Ip, xs, cb, p->dx + b * nb, Ip, nb, pf, pq, t);
            else if (S == 2) tile_q8(0, 2, w, sw, p->xq + b * Ip, xs, cb, p->dx + b * nb, Ip, nb, pf, pq, t);
            else if (p->xpos) tile_q8(1, 1, w, sw, p->xq + b * Ip, xs, cb, p->dx + b * nb, Ip, nb, pf, pq, t);
            else tile_q8(0, 1, w, sw, p->xq + b * Ip, xs, cb, p->dx + b * nb, Ip, nb, pf, pq, t);
#endif
            for (int u = 0; u < S; u++) {
                float *yo = p->y + (b + u) * p->O;
                for (int64_t r = o; r < o + 4 && r < o1; r++) yo[r] = acc ? yo[r] + t[u * 4 + r - o] : t[u * 4 + r - o];
            }
            b += S;
        }
    }
}
/* The prefetch: with fewer than 4 tiles per block of rows, the first tile prefetches each of its rows
 * Q8_PF bytes ahead; from 4 tiles (8 streams) each of the first 4 prefetches a quarter of the next block,
 * a line per dword step, so the requests are spread over the block's work rather than bunched in its
 * first tile (the float32 tiles' lesson, cpu_ops.c block_pf_rate). The AVX2 build spreads only from 4 to
 * 7 tiles. Intel Xeon (AMX), 2 threads, builds alternating, against the first tile's prefetch at 2 / 4 / 8
 * / 16 / 32 streams: 169m's 85 products, 512-bit 1.00x / 0.99x / 1.04x / 1.11x / 1.03x, AVX2 1.01x / 1.01x /
 * 1.09x / 1.00x / 0.96x; 1b5's at 8 / 16 / 32, 512-bit 1.12x / 1.10x / 1.04x, AVX2 1.09x / 0.99x / 0.95x. */
static void q8_rows_tiled(const product *p, int64_t B, int64_t o0, int64_t o1, int acc) {
    const int64_t tiles = (B + Q8_TILE_S - 1) / Q8_TILE_S;
    if (tiles >= 4 && (WIDE || tiles < 8)) q8_rows_tiled_(p, B, o0, o1, acc, 1);
    else q8_rows_tiled_(p, B, o0, o1, acc, 0);
}

/* rows [o0, o1) of a 16-bit product: cpu_ops.c's float32 tiles with the weights widened in registers
 * (rows_f16 / rows_bf16: the same float order, so the same bits as float32 on the widened weights),
 * each row prefetched `pf` bytes ahead; the 512-bit build walks short rows one at a time at B = 1 (set_wide16).
 * Against the earlier 16-bit loops (two 512-bit accumulators per row, 4 rows x 3 streams), Zen 4, 2
 * threads, 169m's 85 products, builds alternating in one process: bfloat16 1 stream 11.5 -> 11.1 ms,
 * 4 streams 18.3 -> 14.1, 16 streams 34.7 -> 27.8; float16 10.5 -> 9.7, 14.3 -> 12.9, 48.3 -> 43.3;
 * 1b5's bfloat16 1 stream 102.8 -> 95.1, 4 streams 148.3 -> 128.0. The AVX2 build's loop was already
 * this order (at 8 | I: the same bits and speed). */
static void rows16(const product *p, int64_t B, int64_t o0, int64_t o1, int acc) {
#if WIDE
    const int64_t pf = pf16_wide;
    const int one_row = 2 * p->I < one_row16_below;
#else
    const int64_t pf = PF_DIST16_AVX2 ? pf_ahead(2 * p->Ip, PF_DIST16_AVX2) : 0;
    const int one_row = 0;
#endif
    if (p->fmt == FMT_F16) rows_f16((const uint16_t *)p->W, p->Ip, p->x, p->y, p->O, p->I, B, o0, o1, acc, pf, one_row);
    else rows_bf16((const uint16_t *)p->W, p->Ip, p->x, p->y, p->O, p->I, B, o0, o1, acc, pf, one_row);
}

static void qrows(const product *p, int64_t B, int64_t o0, int64_t o1, int acc) {
    if (p->fmt == FMT_F32) {                      /* float32 weights: the batched kernel of cpu_ops.c */
        rows((const float *)p->W, p->x, p->y, p->O, p->I, B, o0, o1, acc);
        return;
    }
    if (p->fmt == FMT_F16 || p->fmt == FMT_BF16) {  /* 16-bit weights: the float32 tiles, widened */
        rows16(p, B, o0, o1, acc);
        return;
    }
    if (B > 1) {                                  /* int8 weights, several streams: tiles */
        q8_rows_tiled(p, B, o0, o1, acc);
        return;
    }
    float s[4];
    for (int64_t o = o0; o < o1; o += 4)
        for (int64_t b = 0; b < B; b++) {
            dot4(p, o, b, s);
            float *yo = p->y + b * p->O;
            for (int64_t r = o; r < o + 4 && r < o1; r++) yo[r] = acc ? yo[r] + s[r - o] : s[r - o];
        }
}

/* Weight bytes per claimed chunk of the pool (whole groups of 4 rows): as lowbit_ops.h's chunks, a
 * product's bytes over CHUNKS_PER_THREAD chunks per thread within [CHUNK_MIN, CHUNK_MAX], and from 8
 * streams on at least CHUNK_MANY (whole blocks to prefetch within). Long chunks let the hardware
 * prefetchers run: each chunk starts new streams. */
#ifndef CHUNK_MIN
#define CHUNK_MIN 32768
#endif
#ifndef CHUNK_MAX
#define CHUNK_MAX 262144
#endif
#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 4
#endif
#ifndef CHUNK_MANY
#define CHUNK_MANY 262144
#endif
#define MAX_GROUP 16

/* Rows per chunk (a multiple of 4, at least 4) of an O-row product of row_bytes bytes a row: its bytes
 * over per_thread chunks per thread, within [lo, hi], and at least at_least. Shared with lowbit_ops.h. */
static int64_t chunk_rows_for(int64_t O, int64_t row_bytes, int64_t nthreads, int64_t per_thread, int64_t lo,
                              int64_t hi, int64_t at_least) {
    int64_t want = O * row_bytes / (per_thread * (nthreads > 0 ? nthreads : 1));
    want = want < lo ? lo : want > hi ? hi : want;
    if (want < at_least) want = at_least;
    int64_t r = want / (row_bytes > 0 ? row_bytes : 1) / 4 * 4;
    return r < 4 ? 4 : r;
}

typedef struct {
    int64_t n, B, acc;
    product ps[MAX_GROUP];
    int64_t chunk_rows[MAX_GROUP];
    int64_t first_chunk[MAX_GROUP + 1];           /* product j owns chunks [first[j], first[j+1]) */
    int prof;                                     /* profiling: chunk time per product, threads used */
    _Atomic int64_t work_ns[MAX_GROUP];
    _Atomic uint64_t threads;
} job_t;

static void chunk_rows_of(void *ctx, int64_t chunk) {
    const job_t *job = ctx;
    int64_t j = 0;
    while (chunk >= job->first_chunk[j + 1]) j++;
    const product *p = &job->ps[j];
    int64_t o0 = (chunk - job->first_chunk[j]) * job->chunk_rows[j];
    int64_t o1 = o0 + job->chunk_rows[j] < p->O ? o0 + job->chunk_rows[j] : p->O;
    if (!job->prof) {
        qrows(p, job->B, o0, o1, (int)job->acc);
        return;
    }
    if (prof_tid < 0) prof_tid = atomic_fetch_add(&prof.next_tid, 1) & 63;
    uint64_t t0 = pool_now_ns();
    qrows(p, job->B, o0, o1, (int)job->acc);
    prof_add((_Atomic int64_t *)&((job_t *)ctx)->work_ns[j], (int64_t)(pool_now_ns() - t0));
    atomic_fetch_or_explicit(&((job_t *)ctx)->threads, (uint64_t)1 << prof_tid, memory_order_relaxed);
}

static int64_t row_bytes_of(const product *p) {
    return p->fmt == FMT_Q8 ? p->Ip + p->Ip / QB * 2 : (p->fmt == FMT_F32 ? 4 : 2) * p->I;
}

/* a job's times -> the counters of its products' tags (see prof): n products with their tags, weight
 * bytes, quantisation ns and summed chunk ns, the mask of threads that ran a chunk, the job's wall ns.
 * Shared by this file's jobs and lowbit_ops.h's. */
static void prof_count_job(int64_t n, const int64_t *tags, const int64_t *bytes, const int64_t *quant_ns,
                           _Atomic int64_t *work_ns, uint64_t threads, int64_t wall_ns) {
    int64_t total = 0;
    for (int64_t j = 0; j < n; j++) total += atomic_load(&work_ns[j]);
    int64_t nthr = __builtin_popcountll(threads);
    if (nthr < 1) nthr = 1;
    double idle = (double)wall_ns * nthr - total;
    for (int64_t j = 0; j < n; j++) {
        _Atomic int64_t *c = prof.tag[tags[j] >= 0 && tags[j] < PROF_TAGS ? tags[j] : 0];
        double share = total > 0 ? (double)atomic_load(&work_ns[j]) / total : 1.0 / n;
        prof_add(&c[PF_PRODUCTS], 1);
        prof_add(&c[PF_BYTES], bytes[j]);
        prof_add(&c[PF_WALL], quant_ns[j] + (int64_t)(wall_ns * share));
        prof_add(&c[PF_QUANT], quant_ns[j]);
        prof_add(&c[PF_WORK], atomic_load(&work_ns[j]) / nthr);
        prof_add(&c[PF_IDLE], (int64_t)(idle * share / nthr));
    }
}

static void prof_job(job_t *job, const int64_t *quant_ns, int64_t wall_ns) {
    int64_t tags[MAX_GROUP], bytes[MAX_GROUP];
    for (int64_t j = 0; j < job->n; j++) {
        tags[j] = job->ps[j].tag;
        bytes[j] = job->ps[j].O * row_bytes_of(&job->ps[j]) + (job->ps[j].col ? job->ps[j].I * (int64_t)sizeof(float) : 0);
    }
    prof_count_job(job->n, tags, bytes, quant_ns, job->work_ns, atomic_load(&job->threads), wall_ns);
}

/* n products (described in ps[0..n-1], n <= MAX_GROUP) as one job of the thread pool (pool.h: chunks
 * claimed dynamically, no barrier): activations quantised first (Q8, by the caller), then chunks of rows. */
static void run_products(int64_t n, const product *ps, int64_t B, int64_t nthreads, int64_t acc) {
    job_t job = {.n = n, .B = B, .acc = acc, .prof = prof_on()};
    int64_t quant_ns[MAX_GROUP] = {0};
    int64_t scratch = 0;
    for (int64_t j = 0; j < n; j++) {
        product *p = &job.ps[j];
        *p = ps[j];
        p->Ip = p->fmt == FMT_Q8 ? (p->I + QB - 1) / QB * QB : p->I;
        if (p->fmt == FMT_Q8)
            scratch += 3 * B * p->Ip + B * (p->Ip / QB) * (int64_t)sizeof(float) + B * q8_corr_len(p->Ip / QB) * 4;
        job.chunk_rows[j] = chunk_rows_for(p->O, row_bytes_of(p), nthreads, CHUNKS_PER_THREAD, CHUNK_MIN, CHUNK_MAX,
                                           B >= 8 ? CHUNK_MANY : 0);
        job.first_chunk[j + 1] = job.first_chunk[j] + (p->O + job.chunk_rows[j] - 1) / job.chunk_rows[j];
    }
    char *buf = scratch ? malloc(scratch) : NULL, *at = buf;
    for (int64_t j = 0; j < n; j++) {
        product *p = &job.ps[j];
        if (p->fmt != FMT_Q8) continue;
        p->dx = (float *)at;
        at += B * (p->Ip / QB) * sizeof(float);
        uint64_t t0 = job.prof ? pool_now_ns() : 0;
        p->xq = (int8_t *)at;
        at += B * p->Ip;
        p->xa = (uint8_t *)at;
        at += B * p->Ip;
        int8_t *rowq = (int8_t *)at;                   /* x quantised in row order, then interleaved */
        at += B * p->Ip;
        const int64_t nb = p->Ip / QB, nc = q8_corr_len(nb);
        p->corr = (int32_t *)at;
        at += B * nc * 4;
        for (int64_t b = 0; b < B; b++) {
            int8_t *q = rowq + b * p->Ip;
            int32_t *c = p->corr + b * nc;
            quantize_x_col(p->x + b * p->I, p->col, p->I, p->Ip, q, p->dx + b * nb);
            q8_interleave(q, p->xq + b * p->Ip, nb);
            q8_corrections(p->xq + b * p->Ip, nb, c);
        }
        __m256i any = _mm256_setzero_si256();            /* the OR of every xq: its sign bits say if one is < 0 */
        p->xm = rowq;                                    /* free now: the sign masks go there */
        for (int64_t i = 0; i < B * p->Ip; i += QB) {    /* |x| and x's sign masks once per stream */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(p->xq + i));
            any = _mm256_or_si256(any, q);
            _mm256_storeu_si256((__m256i *)(p->xa + i), _mm256_abs_epi8(q));
            if (!WIDE && B == 1)                         /* only the one-stream loop reads them */
                _mm256_storeu_si256((__m256i *)(p->xm + i), _mm256_cmpgt_epi8(_mm256_setzero_si256(), q));
        }
        p->xpos = _mm256_movemask_epi8(any) == 0;
        if (job.prof) quant_ns[j] = (int64_t)(pool_now_ns() - t0);
    }
    uint64_t t1 = job.prof ? pool_now_ns() : 0;
    pool_run(chunk_rows_of, &job, job.first_chunk[n], nthreads);
    if (job.prof) prof_job(&job, quant_ns, (int64_t)(pool_now_ns() - t1));
    free(buf);
}

/* n products as one job of the thread pool. Returns 0, or -1 when n is outside 1..MAX_GROUP.
 * dims[3j..3j+2] = (format, O, I); ptrs[4j..4j+3] = (W, scales or NULL, x, y). */
int64_t qmatvec_group(int64_t n, const int64_t *dims, void *const *ptrs, int64_t B, int64_t nthreads, int64_t acc) {
    if (n < 1 || n > MAX_GROUP) return -1;
    product ps[MAX_GROUP];
    for (int64_t j = 0; j < n; j++)
        ps[j] = (product){dims[3 * j], dims[3 * j + 1], dims[3 * j + 2], 0, ptrs[4 * j],
                          (const uint16_t *)ptrs[4 * j + 1], (const float *)ptrs[4 * j + 2],
                          (float *)ptrs[4 * j + 3], NULL, NULL};
    run_products(n, ps, B, nthreads, acc);
    return 0;
}

/* x [B, I] -> int8 [B, Ip] + scales [B, Ip / 32], exposed so tests can check it against torch */
void quantize_rows(const float *x, int64_t B, int64_t I, int64_t Ip, int8_t *q, float *d) {
    for (int64_t b = 0; b < B; b++) quantize_x(x + b * I, I, Ip, q + b * Ip, d + b * (Ip / QB));
}

/* rows [o0, o1) of W -> float32 out [o1 - o0, I] (sequence mode: dequantise, then torch's GEMM) */
void dequantize(int64_t fmt, const void *W, const void *S, float *out, int64_t o0, int64_t o1, int64_t I,
                int64_t Ip, int64_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = o0; o < o1; o++) {
        float *dst = out + (o - o0) * I;
        if (fmt == FMT_Q8) {
            const int8_t *w = (const int8_t *)W + o * Ip;
            const uint16_t *s = (const uint16_t *)S + o * (Ip / QB);
            const int64_t nb = Ip / QB;
            int8_t blk[QB];
            for (int64_t j = 0; j * QB < I; j++) {     /* block j out of its group (see q8_interleave) */
                const int64_t j0 = j / QG * QG;
                const int m = nb - j0 >= QG ? QG : (int)(nb - j0), l = (int)(j - j0);
                for (int g = 0; g < 8; g++) memcpy(blk + 4 * g, w + j0 * QB + 4 * (g * m + l), 4);
                const int64_t i0 = j * QB;
#if WIDE
                if (i0 + QB <= I) {                    /* a whole block: 2 x 16 lanes */
                    __m512 d16 = _mm512_set1_ps(_cvtsh_ss(s[j]));
                    __m256i q = _mm256_loadu_si256((const __m256i *)blk);
                    _mm512_storeu_ps(dst + i0, _mm512_mul_ps(_mm512_cvtepi32_ps(
                        _mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), d16));
                    _mm512_storeu_ps(dst + i0 + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(
                        _mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), d16));
                    continue;
                }
#endif
                __m256 d = _mm256_set1_ps(_cvtsh_ss(s[j]));
                int64_t i = 0;
                for (; i + 8 <= QB && i0 + i + 8 <= I; i += 8) {
                    __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + i)));
                    _mm256_storeu_ps(dst + i0 + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
                }
                for (; i < QB && i0 + i < I; i++) dst[i0 + i] = (float)blk[i] * _cvtsh_ss(s[j]);
            }
        } else {
            const uint16_t *w = (const uint16_t *)W + o * Ip;
            int64_t i = 0;
            for (; i + VW <= I; i += VW) vstore(dst + i, fmt == FMT_F16 ? wl_f16(w + i) : wl_bf16(w + i));
            if (i < I)
                vstore_masked(dst + i, vmask_first(I - i), fmt == FMT_F16 ? wl_f16_tail(w + i, I - i) : wl_bf16_tail(w + i, I - i));
        }
    }
}

#endif
