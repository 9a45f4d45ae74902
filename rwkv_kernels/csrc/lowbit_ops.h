/* CPU kernels for the 5- and 4-bit block weight formats of rwkv_kernels/lowbit.py (int8 with per-column
 * scales passes through to quant_ops.h): y[b, o] (+)= sum_i W[o, i] x[b, i], x and y float32. Included by cpu_ops.c
 * (one library, one thread pool: pool.h); every name here starts with lb_ or lowbit_.
 *
 * Formats (codes as rwkv_kernels/lowbit.py's SPECS), blocks of 32 along i; rows padded with zero weights
 * to Ip = I rounded up to the format's group (64 for 4 bits, 256 for 5 and the super-block formats, 32
 * for int8+cols):
 *   LB_Q4_0 40, LB_Q4_1 41, LB_Q5_0 50, LB_Q5_1 51: qs uint8 [O, Ip / 2], blocks in pairs, 32 bytes
 *            per pair: byte k = element k of the first block (low nibble) | element k of the second
 *            (high nibble); qh uint8 [O, Ip / 8] (5-bit): 32 bytes per 8 blocks, bit b of byte k = the
 *            5th bit of element k of block b; d float16 [O, Ip / 32] (signed for "_0"), m float16
 *            [O, Ip / 32] ("_1" only); w = d q + m, with m = -2^(bits-1) d for the "_0" formats.
 *   LB_Q4_K 44: qs uint8 [O, Ip / 2], rows padded to super-blocks of 8 blocks (256 weights), 128 bytes per
 *            super-block: 4 chunks of 32 bytes, byte 4l + i of chunk c = weight 8c + i of block l (low
 *            nibble) | weight 8c + 4 + i (high nibble), so that 32-bit lane l holds block l; in d's place 16
 *            bytes per super-block (the same 2 bytes per block): float16 D, Dmin, then byte k (k < 8) =
 *            sc_k | (mn_k & 3) << 6, then nibble k of the last 4 bytes (low first) = mn_k >> 2, with 6-bit
 *            sc and mn; block k's d = D sc_k, m = -Dmin mn_k (both exact in float32): w = d q + m.
 *   LB_Q5_K 54: LB_Q4_K's nibbles and scales with 5-bit values (q up to 31), plus qh uint8 [O, Ip / 8]:
 *            a 32-byte plane per super-block, bit 2c + h of byte 4l + i = the 5th bit of the weight whose
 *            nibble is byte 4l + i of chunk c (h = 0: low nibble, weight 8c + i of block l; h = 1: high).
 *   LB_Q8 8: int8+cols, int8 values in quant_ops.h's interleaved layout [O, Ip] and float16 d [O, Ip / 32]:
 *            lowbit_matvec_group and lowbit_dequantize hand it to quant_ops.h's int8 kernels.
 *   col:     NULL, or float32 [I] powers of two: x is multiplied by col before it is quantised (the
 *            outlier treatment; the matrix stored is W diag(1/col)).
 *
 * Decode (AVX2; the AVX-512 build the same with VNNI's vpdpbusd for maddubs + madd and a masked add
 * for the 5th bits, the same bits): x col is quantised per stream to int8 blocks of 32 (d_x = amax / 127, round half to
 * even, as rwkv_kernels/quant.py's quantize_rows_reference), with each block's integer sum s. One 32-byte
 * load and and / shift / and give a pair of blocks as bytes (5-bit: plus an and, a shift and an or
 * per block from the 8-block bit plane), maddubs multiplies them (unsigned) with x's bytes (signed),
 * madd sums to int32, and one FMA adds the block's exact integer dot times d * d_x; the offset
 * m * d_x * s is accumulated apart, 8 blocks per FMA. The layouts were chosen for this: with ggml's
 * (16 nibble bytes per block, 4 bytes of 5th bits expanded by shuffle/compare) the 4-bit kernel ran
 * ~30% and the 5-bit ~65% slower per weight on the Zen 3 (docs/lowbit_choice.md). The super-block
 * formats (LB_Q4_K, LB_Q5_K: lb_ktile) interleave 8 blocks per load instead, so each 32-bit lane sums one
 * block over the super-block and one convert and FMA serve 8 blocks; their weights are quantised here
 * too (lowbit_quantize_k: a small search per block, the same bits as the float32 torch reference).
 * Every (row, stream) result is the same instruction sequence whatever B, the rows around it and the
 * thread count are, so a stream's outputs are bit-identical however many streams share the batch.
 * Sequence mode: lowbit_dequantize (rows -> float32, then torch's GEMM), on OpenMP like quant_ops.h.
 */
#ifndef RWKV_LOWBIT_OPS_H
#define RWKV_LOWBIT_OPS_H
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "pool.h"

enum { LB_Q8 = 8, LB_Q4_0 = 40, LB_Q4_1 = 41, LB_Q4_K = 44, LB_Q5_0 = 50, LB_Q5_1 = 51, LB_Q5_K = 54 };
#define LB_QB 32
#define LB_MAX_GROUP 16
/* Weight bytes per claimed chunk of the pool (whole groups of 4 rows): a product's bytes over
 * LB_CHUNKS_PER_THREAD chunks per thread, within [LB_CHUNK_MIN, LB_CHUNK_MAX]. Long chunks let the
 * hardware prefetchers run (each chunk starts new streams, and the two threads' chunks interleave);
 * on the Zen 4, 1b5-shaped products, 2 threads: 32 KB chunks streamed 22 GB/s, 128-256 KB ones 27-29
 * (float32 reads 37 there). Enough chunks per thread remain that a thread that loses its core leaves
 * only a short tail to the others (pool.h). */
#ifndef LB_CHUNK_MIN
#define LB_CHUNK_MIN 32768
#endif
#ifndef LB_CHUNK_MAX
#define LB_CHUNK_MAX 262144
#endif
#ifndef LB_CHUNKS_PER_THREAD
#define LB_CHUNKS_PER_THREAD 4
#endif

static inline int lb_bits(int64_t fmt) { return (int)(fmt / 10); }
static inline int lb_is_k(int64_t fmt) { return fmt == LB_Q4_K || fmt == LB_Q5_K; }
static inline int lb_has_min(int64_t fmt) { return fmt == LB_Q4_1 || fmt == LB_Q5_1 || lb_is_k(fmt); }
/* rows are padded to this many weights: pairs of blocks, 8 blocks with 5th-bit planes or super-blocks */
static inline int64_t lb_group(int64_t fmt) {
    return lb_bits(fmt) == 5 || lb_is_k(fmt) ? 8 * LB_QB : 2 * LB_QB;
}
static inline int64_t lb_padded(int64_t fmt, int64_t I) { return (I + lb_group(fmt) - 1) / lb_group(fmt) * lb_group(fmt); }
static inline int lb_known(int64_t fmt) {
    return fmt == LB_Q4_0 || fmt == LB_Q4_1 || lb_is_k(fmt) || fmt == LB_Q5_0 || fmt == LB_Q5_1;
}

typedef struct {
    int64_t fmt, O, I, Ip;
    const uint8_t *qs;          /* nibbles */
    const uint8_t *qh;          /* 5-bit: the 5th-bit planes [O, Ip / 8] */
    const uint16_t *d, *m;      /* LB_Q4_K, LB_Q5_K: d holds the super-blocks' scales, m is unused */
    const float *col;
    const float *x;             /* [B, I] */
    float *y;                   /* [B, O] */
    int8_t *xq;                 /* scratch [B, Ip] */
    float *dx, *sx;             /* scratch [B, Ip / 32]: x's block scales, and d_x * (integer block sum) */
    int64_t tag;                /* the profile's product tag (quant_ops.h's prof): 0 outside decode_layers */
} lb_product;

static inline float lb_hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* LB_Q4_K, LB_Q5_K: one super-block's 16 bytes -> its 8 blocks' d = D sc_k and Dmin mn_k (the offset m = -Dmin mn_k)
 * as vectors, exact in float32 (11-bit float16 mantissas times 6-bit integers) */
static inline void lb_k_scales(const uint16_t *sb, __m256 *dv, __m256 *mv) {
    const uint8_t *b = (const uint8_t *)sb;
    int32_t high;
    memcpy(&high, b + 12, 4);
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 4)));   /* sc | (mn & 3) << 6 */
    const __m256i sc = _mm256_and_si256(w, _mm256_set1_epi32(63));
    const __m256i mh = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(high), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                        _mm256_set1_epi32(15));
    const __m256i mn = _mm256_or_si256(_mm256_srli_epi32(w, 6), _mm256_slli_epi32(mh, 2));
    *dv = _mm256_mul_ps(_mm256_cvtph_ps(_mm_set1_epi16((short)sb[0])), _mm256_cvtepi32_ps(sc));
    *mv = _mm256_mul_ps(_mm256_cvtph_ps(_mm_set1_epi16((short)sb[1])), _mm256_cvtepi32_ps(mn));
}

/* the same for block k of the super-block, as scalars (the dequantiser) */
static inline void lb_k_scale(const uint16_t *sb, int k, float *d, float *m) {
    const uint8_t *b = (const uint8_t *)sb;
    int sc = b[4 + k] & 63, mn = (b[4 + k] >> 6) | (((b[12 + k / 2] >> (4 * (k % 2))) & 15) << 2);
    *d = _cvtsh_ss(sb[0]) * (float)sc;
    *m = -_cvtsh_ss(sb[1]) * (float)mn;
}

/* LB_Q4_K, LB_Q5_K: x's int8 blocks in the nibbles' order: per super-block, dword k (bytes 4k..4k+3) of block l
 * moves to dword 8k + l, so that chunk c's low (high) nibbles meet x's dwords 16c + 0..7 (8..15). */
static void lb_k_interleave_x(int8_t *q, int64_t Ip) {
    for (int64_t s0 = 0; s0 < Ip; s0 += 8 * LB_QB) dw_transpose8(q + s0, q + s0, 32);
}

/* ---- activations ---------------------------------------------------------------------------- */

/* x [I] (times col) -> q [Ip] int8, d [Ip / 32] = amax / 127, s [Ip / 32] = d * sum(q) per block:
 * quant_ops.h's quantize_x_col (round half to even, as rwkv_kernels/quant.py's quantize_rows_reference),
 * then each block's exact integer sum */
static void lb_quantize_x(const float *x, const float *col, int64_t I, int64_t Ip, int8_t *q, float *d, float *s) {
    quantize_x_col(x, col, I, Ip, q, d);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int64_t b0 = 0; b0 < Ip; b0 += LB_QB) {
        __m256i v = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(q + b0))), ones16);
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
        s[b0 / LB_QB] = d[b0 / LB_QB] * (float)_mm_cvtsi128_si32(h);
    }
}

/* ---- blocks of weights as bytes --------------------------------------------------------------- */

/* bytes of 8 blocks' 5th-bit plane, for block b of the eight: 0x10 where the bit is set */
static inline __m256i lb_high(__m256i plane, const int b) {
    __m256i bit = _mm256_and_si256(plane, _mm256_set1_epi8((char)(1 << b)));
    return b < 4 ? _mm256_slli_epi16(bit, 4 - b) : b > 4 ? _mm256_srli_epi16(bit, b - 4) : bit;
}

/* nibbles q (bytes 0..15) with block b's 5th bits from the plane set: q | lb_high(plane, b); with
 * AVX-512 BW + VL one test into a mask and one masked add (the bit is clear in q) */
static inline __m256i lb_with_high(__m256i q, __m256i plane, const int b) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_mask_add_epi8(q, _mm256_test_epi8_mask(plane, _mm256_set1_epi8((char)(1 << b))), q,
                                _mm256_set1_epi8(0x10));
#else
    return _mm256_or_si256(q, lb_high(plane, b));
#endif
}

/* the exact integer dot of 32 weight bytes with x's 32 bytes, summed into 8 int32 lanes (lane k: bytes
 * 4k..4k+3) -> float. AVX2: maddubs (pairs to int16) then madd (pairs of those to int32); no pair
 * saturates int16 (|x| <= 127, weights <= 31 unsigned or |w| <= 127 with x's sign moved onto |w|'s
 * partner), so the lanes are the exact sums, and AVX-512 VNNI's vpdpbusd (the same 4 bytes per int32
 * lane, in one instruction) gives the same integers: the two builds return the same bits. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LB_VNNI 1
static inline __m256i lb_idot(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
#else
#define LB_VNNI 0
static inline __m256i lb_idot(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif

static inline __m256 lb_dot_u8(__m256i q, __m256i xv) { return _mm256_cvtepi32_ps(lb_idot(q, xv)); }

/* acc + the exact integer dot per int32 lane (the same integers in both builds, as lb_idot) */
static inline __m256i lb_idot_acc(__m256i acc, __m256i u, __m256i s) {
#if LB_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, lb_idot(u, s));
#endif
}

/* R rows . one stream's quantised x, for one format FMT (a constant: each format's loop is compiled
 * on its own). Row r: sum over blocks of dot * (d * d_x), plus offset_scale * sum over blocks of
 * m' * s_x (m' = m, or d for the "_0" formats: offset_scale = -2^(bits-1)). Blocks go 8 at a time
 * (their d * d_x and offsets as vectors; the nibbles one pair of blocks per load), then the tail
 * (pairs) with scalar scales. */
static inline __attribute__((always_inline)) void lb_dotn(const int R, const int64_t FMT, const lb_product *p,
        const int64_t *rr, const int8_t *xq, const float *dx, const float *sx, float *out) {
    const int64_t nb = p->Ip / LB_QB;
    const int has_min = lb_has_min(FMT), five = lb_bits(FMT) == 5;
    const int64_t row_bytes = p->Ip / 2;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const uint8_t *qs[4], *qh[4];
    const uint16_t *d[4], *m[4];
    __m256 acc[4], off[4];
    float offs[4];
    for (int r = 0; r < R; r++) {
        qs[r] = p->qs + rr[r] * row_bytes;
        qh[r] = five ? (const uint8_t *)p->qh + rr[r] * (p->Ip / 8) : NULL;
        d[r] = p->d + rr[r] * nb;
        m[r] = has_min ? p->m + rr[r] * nb : d[r];
        acc[r] = off[r] = _mm256_setzero_ps();
        offs[r] = 0.0f;
    }
    int64_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        float ds[4][8];
        __m256 dxv = _mm256_loadu_ps(dx + j), sxv = _mm256_loadu_ps(sx + j);
        __m256i plane[4];
        for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(ds[r], _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d[r] + j))), dxv));
            off[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m[r] + j))), sxv, off[r]);
            if (five) plane[r] = _mm256_loadu_si256((const __m256i *)(qh[r] + j * 4));
        }
#pragma GCC unroll 4
        for (int k = 0; k < 8; k += 2) {
            __m256i xa = _mm256_loadu_si256((const __m256i *)(xq + (j + k) * LB_QB));
            __m256i xb = _mm256_loadu_si256((const __m256i *)(xq + (j + k + 1) * LB_QB));
            for (int r = 0; r < R; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs[r] + (j + k) * (LB_QB / 2)));
                __m256i a = _mm256_and_si256(v, low4), b = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                if (five) {
                    a = lb_with_high(a, plane[r], k);
                    b = lb_with_high(b, plane[r], k + 1);
                }
                acc[r] = _mm256_fmadd_ps(lb_dot_u8(a, xa), _mm256_broadcast_ss(&ds[r][k]), acc[r]);
                acc[r] = _mm256_fmadd_ps(lb_dot_u8(b, xb), _mm256_broadcast_ss(&ds[r][k + 1]), acc[r]);
            }
        }
    }
    /* the tail: 5-bit rows have none (a multiple of 8 blocks); 4-bit rows end in pairs */
    for (; j < nb; j += 2) {
        for (int h = 0; h < 2; h++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (j + h) * LB_QB));
            for (int r = 0; r < R; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs[r] + j * (LB_QB / 2)));
                __m256 dot = lb_dot_u8(_mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, low4), xv);
                offs[r] = fmaf(_cvtsh_ss(m[r][j + h]), sx[j + h], offs[r]);
                acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(_cvtsh_ss(d[r][j + h]) * dx[j + h]), acc[r]);
            }
        }
    }
    const float scale = has_min ? 1.0f : -(float)(1 << (lb_bits(FMT) - 1));
    for (int r = 0; r < R; r++)
        out[r] = lb_hsum(acc[r]) + scale * (lb_hsum(off[r]) + offs[r]);
}

static void lb_dot4(const lb_product *p, const int64_t *rr, const int8_t *xq, const float *dx, const float *sx, float *out) {
    switch (p->fmt) {
    case LB_Q4_0: lb_dotn(4, LB_Q4_0, p, rr, xq, dx, sx, out); break;
    case LB_Q4_1: lb_dotn(4, LB_Q4_1, p, rr, xq, dx, sx, out); break;
    case LB_Q5_0: lb_dotn(4, LB_Q5_0, p, rr, xq, dx, sx, out); break;
    case LB_Q5_1: lb_dotn(4, LB_Q5_1, p, rr, xq, dx, sx, out); break;
    }
}

#ifndef LB_ROWS
#define LB_ROWS 1
#endif
/* Software prefetch of each row's bytes LB_PF ahead (LB_PF_HINT: into L1 or L2). The AVX2 build keeps
 * 1 KB into L1, measured on the Zen 3 (44f381b). The 512-bit build prefetches 8 KB ahead into L2, as its
 * int8 loop does (Q8_PF): on the Zen 4 (2 threads, products from DRAM, builds alternating) q4_k rows of
 * 5120 (14B) went 7.3-7.5 -> 5.4-5.7 ms per layer, q5_0 7.6 -> 6.8; rows of 2048 q4_k 4.0 -> 3.7, q5_0
 * unchanged; rows of 768 within the noise. */
#if defined(__AVX512F__)
#define LB_PF_DEFAULT 8192
#define LB_PF_HINT_DEFAULT _MM_HINT_T1
#else
#define LB_PF_DEFAULT 1024
#define LB_PF_HINT_DEFAULT _MM_HINT_T0
#endif
#ifndef LB_PF_HINT
#define LB_PF_HINT LB_PF_HINT_DEFAULT
#endif
#ifndef LB_PF
#define LB_PF LB_PF_DEFAULT
#endif

/* One row x S streams (S <= LB_TILE_S; one stream: S = 1). Per stream the blocks go in pairs into two
 * accumulators (block a, block b of each pair) so that no FMA waits on the one before it, the offsets
 * apart; the row's bytes LB_PF ahead are prefetched. The row's bytes are loaded and unpacked (nibbles,
 * 5th bits) once for the S
 * streams; each stream has its own scales d * d_x, offsets and accumulators, and its instruction
 * sequence is the same whatever S is, so its bits do not depend on the batch. out[t] for stream t. */
static inline __attribute__((always_inline)) void lb_tile1(const int S, const int64_t FMT, const lb_product *p,
        int64_t row, const int8_t *xq, const float *dx, const float *sx, float *out) {
    const int64_t Ip = p->Ip, nb = Ip / LB_QB;
    const int has_min = lb_has_min(FMT), five = lb_bits(FMT) == 5;
    const uint8_t *qs = p->qs + row * (Ip / 2);
    const uint8_t *qh = five ? p->qh + row * (Ip / 8) : NULL;
    const uint16_t *d = p->d + row * nb, *m = has_min ? p->m + row * nb : d;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 ea[4], eb[4], off[4];
    float offs[4];
    for (int t = 0; t < S; t++) { ea[t] = eb[t] = off[t] = _mm256_setzero_ps(); offs[t] = 0.0f; }
    int64_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        float ds[4][8] __attribute__((aligned(32)));
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + j)));
        for (int t = 0; t < S; t++)
            _mm256_store_ps(ds[t], _mm256_mul_ps(dv, _mm256_loadu_ps(dx + t * nb + j)));
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + j)));
        for (int t = 0; t < S; t++) off[t] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(sx + t * nb + j), off[t]);
        __m256i plane = five ? _mm256_loadu_si256((const __m256i *)(qh + j * 4)) : _mm256_setzero_si256();
        if (LB_PF) {
            _mm_prefetch((const char *)(qs + j * (LB_QB / 2)) + LB_PF, LB_PF_HINT);
            _mm_prefetch((const char *)(qs + j * (LB_QB / 2)) + LB_PF + 64, LB_PF_HINT);
            if (five) _mm_prefetch((const char *)(qh + j * 4) + LB_PF / 4, LB_PF_HINT);
        }
#pragma GCC unroll 4
        for (int k = 0; k < 8; k += 2) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + (j + k) * (LB_QB / 2)));
            __m256i a = _mm256_and_si256(v, low4), b = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            if (five) {
                a = lb_with_high(a, plane, k);
                b = lb_with_high(b, plane, k + 1);
            }
            for (int t = 0; t < S; t++) {
                __m256i xa = _mm256_loadu_si256((const __m256i *)(xq + t * Ip + (j + k) * LB_QB));
                __m256i xb = _mm256_loadu_si256((const __m256i *)(xq + t * Ip + (j + k + 1) * LB_QB));
                ea[t] = _mm256_fmadd_ps(lb_dot_u8(a, xa), _mm256_broadcast_ss(&ds[t][k]), ea[t]);
                eb[t] = _mm256_fmadd_ps(lb_dot_u8(b, xb), _mm256_broadcast_ss(&ds[t][k + 1]), eb[t]);
            }
        }
    }
    for (; j < nb; j += 2) {                    /* 4-bit rows end in pairs; 5-bit rows have no tail */
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + j * (LB_QB / 2)));
        for (int h = 0; h < 2; h++) {
            __m256i q = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, low4);
            for (int t = 0; t < S; t++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + t * Ip + (j + h) * LB_QB));
                __m256 dot = lb_dot_u8(q, xv);
                offs[t] = fmaf(_cvtsh_ss(m[j + h]), sx[t * nb + j + h], offs[t]);
                __m256 sc = _mm256_set1_ps(_cvtsh_ss(d[j + h]) * dx[t * nb + j + h]);
                if (h) eb[t] = _mm256_fmadd_ps(dot, sc, eb[t]);
                else ea[t] = _mm256_fmadd_ps(dot, sc, ea[t]);
            }
        }
    }
    const float scale = has_min ? 1.0f : -(float)(1 << (lb_bits(FMT) - 1));
    for (int t = 0; t < S; t++) out[t] = lb_hsum(_mm256_add_ps(ea[t], eb[t])) + scale * (lb_hsum(off[t]) + offs[t]);
}

#ifndef LB_KTILE_S
#define LB_KTILE_S 4
#endif
#if LB_KTILE_S < 1 || LB_KTILE_S > 8
#error "LB_KTILE_S: 1 to 8 streams per q4_k tile"
#endif
/* LB_Q4_K, LB_Q5_K (FIVE): one row x S streams (S <= LB_KTILE_S), x interleaved as the nibbles (lb_k_interleave_x). Per super-block
 * of 8 blocks, 4 chunks of 32 bytes: lane l of a chunk (bytes 4l..4l+3) holds 8 weights of block l, and
 * two dpbusd (AVX2: maddubs + madd + add) per chunk and stream leave lane l block l's exact integer dot
 * after the 4 chunks; then one convert and one FMA with the 8 blocks' d d_x add the super-block, and one
 * FNMADD its offsets (Dmin mn d_x s). The chunks are loaded and unpacked once for the S streams; each
 * stream's sequence is the same whatever S is (batch invariant). out[t] = hsum(acc) + hsum(off). */
static inline __attribute__((always_inline)) void lb_ktile(const int S, const int FIVE, const lb_product *p,
        int64_t row, const int8_t *xq, const float *dx, const float *sx, float *out) {
    const int64_t Ip = p->Ip, nb = Ip / LB_QB;
    const uint8_t *qs = p->qs + row * (Ip / 2);
    const uint8_t *qh = FIVE ? p->qh + row * (Ip / 8) : NULL;
    const uint16_t *sb = p->d + row * nb;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc[LB_KTILE_S], off[LB_KTILE_S];
    for (int t = 0; t < S; t++) acc[t] = off[t] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j += 8) {
        const uint8_t *w = qs + j * (LB_QB / 2);
        if (LB_PF) {
            _mm_prefetch((const char *)w + LB_PF, LB_PF_HINT);
            _mm_prefetch((const char *)w + LB_PF + 64, LB_PF_HINT);
        }
        __m256 dv, mv;
        lb_k_scales(sb + j, &dv, &mv);
        __m256i isum[LB_KTILE_S];
        for (int t = 0; t < S; t++) isum[t] = _mm256_setzero_si256();
        const __m256i plane = FIVE ? _mm256_loadu_si256((const __m256i *)(qh + j * 4)) : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * c));
            __m256i a = _mm256_and_si256(v, low4), b = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            if (FIVE) {                         /* bits 2c and 2c + 1 of the plane: one and, shift, or each */
                a = lb_with_high(a, plane, 2 * c);
                b = lb_with_high(b, plane, 2 * c + 1);
            }
            for (int t = 0; t < S; t++) {
                const int8_t *x = xq + t * Ip + j * LB_QB + 64 * c;
                isum[t] = lb_idot_acc(isum[t], a, _mm256_loadu_si256((const __m256i *)x));
                isum[t] = lb_idot_acc(isum[t], b, _mm256_loadu_si256((const __m256i *)(x + 32)));
                /* pins the stream's sum to a register here: without it gcc interleaves the streams' chains
                 * and spills their sums each chunk (AVX2 build, Zen 4, 169m, 16 streams, the whole step:
                 * q4_k and q5_k 1.12x, the 512-bit build 1.00x, the same logits; bench.modes --against-src) */
                __asm__("" : "+x"(isum[t]));
            }
        }
        for (int t = 0; t < S; t++) {
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(dv, _mm256_loadu_ps(dx + t * nb + j)), acc[t]);
            off[t] = _mm256_fnmadd_ps(mv, _mm256_loadu_ps(sx + t * nb + j), off[t]);
        }
    }
    for (int t = 0; t < S; t++) out[t] = lb_hsum(acc[t]) + lb_hsum(off[t]);
}

#ifndef LB_TILE_S
#define LB_TILE_S 4
#endif
#if LB_TILE_S < 1 || LB_TILE_S > 4
#error "LB_TILE_S: 1 to 4 streams per tile (lb_tile1's accumulators are [4])"
#endif
#define LB_TILE_CASES(FMT)                                                                   \
    switch (S) {                                                                             \
    case 4: lb_tile1(4, FMT, p, o, xq, dx, sx, t); break;                                    \
    case 3: lb_tile1(3, FMT, p, o, xq, dx, sx, t); break;                                    \
    case 2: lb_tile1(2, FMT, p, o, xq, dx, sx, t); break;                                    \
    default: lb_tile1(1, FMT, p, o, xq, dx, sx, t); break;                                   \
    }

/* S never exceeds LB_KTILE_S: the cases above it are dead, and clamping their S keeps the compiler from
 * warning about accumulator arrays that are LB_KTILE_S long */
#define LB_KS(n) ((n) < LB_KTILE_S ? (n) : LB_KTILE_S)
#define LB_KTILE_CASES(FIVE)                                                                 \
    switch (S) {                                                                             \
    case 8: lb_ktile(LB_KS(8), FIVE, p, o, xq, dx, sx, t); break;                            \
    case 7: lb_ktile(LB_KS(7), FIVE, p, o, xq, dx, sx, t); break;                            \
    case 6: lb_ktile(LB_KS(6), FIVE, p, o, xq, dx, sx, t); break;                            \
    case 5: lb_ktile(LB_KS(5), FIVE, p, o, xq, dx, sx, t); break;                            \
    case 4: lb_ktile(LB_KS(4), FIVE, p, o, xq, dx, sx, t); break;                            \
    case 3: lb_ktile(LB_KS(3), FIVE, p, o, xq, dx, sx, t); break;                            \
    case 2: lb_ktile(LB_KS(2), FIVE, p, o, xq, dx, sx, t); break;                            \
    default: lb_ktile(1, FIVE, p, o, xq, dx, sx, t); break;                                  \
    }

/* rows [o0, o1) one at a time, for the B streams in tiles of LB_TILE_S (LB_KTILE_S), ..., 1 streams */
static void lb_rows_tiled(const lb_product *p, int64_t B, int64_t o0, int64_t o1, int acc) {
    const int64_t nb = p->Ip / LB_QB;
    float t[8];
    const int64_t tile = lb_is_k(p->fmt) ? LB_KTILE_S : LB_TILE_S;
    for (int64_t o = o0; o < o1; o++)
        for (int64_t b = 0; b < B;) {
            const int S = B - b >= tile ? (int)tile : (int)(B - b);
            const int8_t *xq = p->xq + b * p->Ip;
            const float *dx = p->dx + b * nb, *sx = p->sx + b * nb;
            switch (p->fmt) {
            case LB_Q4_0: LB_TILE_CASES(LB_Q4_0) break;
            case LB_Q4_1: LB_TILE_CASES(LB_Q4_1) break;
            case LB_Q4_K: LB_KTILE_CASES(0) break;
            case LB_Q5_K: LB_KTILE_CASES(1) break;
            case LB_Q5_0: LB_TILE_CASES(LB_Q5_0) break;
            default: LB_TILE_CASES(LB_Q5_1) break;
            }
            for (int u = 0; u < S; u++) {
                float *yo = p->y + (b + u) * p->O;
                yo[o] = acc ? yo[o] + t[u] : t[u];
            }
            b += S;
        }
}

static void lb_rows(const lb_product *p, int64_t B, int64_t o0, int64_t o1, int acc) {
    if (LB_ROWS == 1 || lb_is_k(p->fmt)) { lb_rows_tiled(p, B, o0, o1, acc); return; }
    const int64_t nb = p->Ip / LB_QB;
    float s[4];
    for (int64_t o = o0; o < o1; o += 4) {
        int64_t rr[4];
        for (int k = 0; k < 4; k++) rr[k] = o + k < p->O ? o + k : p->O - 1;   /* the last rows repeat */
        for (int64_t b = 0; b < B; b++) {
            lb_dot4(p, rr, p->xq + b * p->Ip, p->dx + b * nb, p->sx + b * nb, s);
            float *yo = p->y + b * p->O;
            for (int64_t r = o; r < o + 4 && r < o1; r++) yo[r] = acc ? yo[r] + s[r - o] : s[r - o];
        }
    }
}

/* ---- grouped products on the pool ---------------------------------------------------------- */

typedef struct {
    int64_t n, B, acc, prof;
    lb_product ps[LB_MAX_GROUP];
    int64_t chunk_rows[LB_MAX_GROUP];
    int64_t first_chunk[LB_MAX_GROUP + 1];          /* product j owns chunks [first[j], first[j+1]) */
    _Atomic int64_t work_ns[LB_MAX_GROUP];          /* the profile's per-product chunk time, all threads */
    _Atomic uint64_t threads;                       /* the profile's threads that ran a chunk */
} lb_job;

static void lb_chunk(void *ctx, int64_t chunk) {
    const lb_job *job = ctx;
    int64_t j = 0;
    while (chunk >= job->first_chunk[j + 1]) j++;
    const lb_product *p = &job->ps[j];
    int64_t o0 = (chunk - job->first_chunk[j]) * job->chunk_rows[j];
    int64_t o1 = o0 + job->chunk_rows[j] < p->O ? o0 + job->chunk_rows[j] : p->O;
    if (!job->prof) {
        lb_rows(p, job->B, o0, o1, (int)job->acc);
        return;
    }
    if (prof_tid < 0) prof_tid = atomic_fetch_add(&prof.next_tid, 1) & 63;
    uint64_t t0 = pool_now_ns();
    lb_rows(p, job->B, o0, o1, (int)job->acc);
    prof_add((_Atomic int64_t *)&((lb_job *)ctx)->work_ns[j], (int64_t)(pool_now_ns() - t0));
    atomic_fetch_or_explicit(&((lb_job *)ctx)->threads, (uint64_t)1 << prof_tid, memory_order_relaxed);
}

static int64_t lb_row_bytes(const lb_product *p) {
    int64_t nb = p->Ip / LB_QB;
    return p->Ip / 2 + nb * (2 + 2 * (lb_has_min(p->fmt) && !lb_is_k(p->fmt))) + (p->qh != NULL) * p->Ip / 8;
}

/* a job's times -> quant_ops.h's profile counters of its products' tags */
static void lb_prof_job(lb_job *job, const int64_t *quant_ns, int64_t wall_ns) {
    int64_t tags[LB_MAX_GROUP], bytes[LB_MAX_GROUP];
    for (int64_t j = 0; j < job->n; j++) {
        const lb_product *p = &job->ps[j];
        tags[j] = p->tag;
        bytes[j] = p->O * lb_row_bytes(p) + (p->col ? p->I * (int64_t)sizeof(float) : 0);
    }
    prof_count_job(job->n, tags, bytes, quant_ns, job->work_ns, atomic_load(&job->threads), wall_ns);
}

/* n products as one job of the thread pool; x quantised first (on the caller). 0, -1 for a bad
 * argument (n outside 1..LB_MAX_GROUP, an unknown format), -2 when scratch cannot be allocated. */
static int64_t lb_run_products(int64_t n, lb_product *ps, int64_t B, int64_t nthreads, int64_t acc) {
    if (n < 1 || n > LB_MAX_GROUP) return -1;
    lb_job job = {.n = n, .B = B, .acc = acc, .prof = prof_on()};
    int64_t quant_ns[LB_MAX_GROUP] = {0};
    int64_t scratch = 0;
    for (int64_t j = 0; j < n; j++) {
        lb_product *p = &job.ps[j];
        *p = ps[j];
        if (!lb_known(p->fmt)) return -1;
        p->Ip = lb_padded(p->fmt, p->I);
        scratch += B * p->Ip + 2 * B * (p->Ip / LB_QB) * (int64_t)sizeof(float);
        job.chunk_rows[j] = chunk_rows_for(p->O, lb_row_bytes(p), nthreads, LB_CHUNKS_PER_THREAD, LB_CHUNK_MIN,
                                           LB_CHUNK_MAX, 0);
        job.first_chunk[j + 1] = job.first_chunk[j] + (p->O + job.chunk_rows[j] - 1) / job.chunk_rows[j];
    }
    char *buf = malloc(scratch), *at = buf;
    if (buf == NULL) return -2;
    for (int64_t j = 0; j < n; j++) {
        lb_product *p = &job.ps[j];
        int64_t nb = p->Ip / LB_QB;
        p->dx = (float *)at;
        p->sx = p->dx + B * nb;
        at += 2 * B * nb * sizeof(float);
        p->xq = (int8_t *)at;
        at += B * p->Ip;
        uint64_t t0 = job.prof ? pool_now_ns() : 0;
        for (int64_t b = 0; b < B; b++) {
            lb_quantize_x(p->x + b * p->I, p->col, p->I, p->Ip, p->xq + b * p->Ip, p->dx + b * nb, p->sx + b * nb);
            if (lb_is_k(p->fmt)) lb_k_interleave_x(p->xq + b * p->Ip, p->Ip);
        }
        if (job.prof) quant_ns[j] = (int64_t)(pool_now_ns() - t0);
    }
    uint64_t t1 = job.prof ? pool_now_ns() : 0;
    pool_run(lb_chunk, &job, job.first_chunk[n], nthreads);
    if (job.prof) lb_prof_job(&job, quant_ns, (int64_t)(pool_now_ns() - t1));
    free(buf);
    return 0;
}

/* dims[3j..3j+2] = (format, O, I); ptrs[7j..7j+6] = (qs, qh, d, m, col, x, y), NULL where absent.
 * LB_Q8 (int8+cols: int8 values in quant_ops.h's interleaved layout, float16 scales, col) runs quant_ops.h's
 * int8 kernels, x times col quantised (the decode step does the same, decode_step.h). */
int64_t lowbit_matvec_group(int64_t n, const int64_t *dims, void *const *ptrs, int64_t B, int64_t nthreads, int64_t acc) {
    if (n < 1 || n > LB_MAX_GROUP) return -1;
    lb_product ps[LB_MAX_GROUP];
    product q8[LB_MAX_GROUP];
    int64_t nl = 0, n8 = 0;
    for (int64_t j = 0; j < n; j++) {
        void *const *q = ptrs + 7 * j;
        if (dims[3 * j] == LB_Q8) {
            q8[n8++] = (product){.fmt = FMT_Q8, .O = dims[3 * j + 1], .I = dims[3 * j + 2], .W = q[0],
                                 .S = (const uint16_t *)q[2], .x = (const float *)q[5], .y = (float *)q[6],
                                 .col = (const float *)q[4]};
            continue;
        }
        ps[nl++] = (lb_product){.fmt = dims[3 * j], .O = dims[3 * j + 1], .I = dims[3 * j + 2], .qs = q[0], .qh = q[1],
                                .d = q[2], .m = q[3], .col = q[4], .x = q[5], .y = q[6]};
    }
    if (n8) run_products(n8, q8, B, nthreads, acc);
    return nl ? lb_run_products(nl, ps, B, nthreads, acc) : 0;
}

/* x [B, I] -> q [B, Ip], d and s [B, Ip / 32]: exposed so tests can check it against torch */
void lowbit_quantize_rows(const float *x, const float *col, int64_t B, int64_t I, int64_t Ip, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < B; b++)
        lb_quantize_x(x + b * I, col, I, Ip, q + b * Ip, d + b * (Ip / LB_QB), s + b * (Ip / LB_QB));
}

/* ---- quantising q4_k and q5_k (rwkv_kernels/lowbit.py's _quantize_rows_k_reference, the same bits) */

#define LB_K_TOP 63                 /* 6-bit scales and mins */
#define LB_K_SEARCH 3               /* steps of sc and of mn tried below the covering ones: 0, -1, -2 */

/* v (finite, > 0) -> the float16 bits of the smallest float16 >= max(v, 2^-14) */
static inline uint16_t lb_f16_at_least(float v) {
    if (!(v >= 6.103515625e-05f)) v = 6.103515625e-05f;
    uint16_t h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (_cvtsh_ss(h) < v) h++;
    return h;
}

static inline __m256 lb_clamp(__m256 v, float lo, float hi) {
    return _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(hi)), _mm256_set1_ps(lo));
}

static inline __m256 lb_k_levels(__m256 w, __m256 m, __m256 d, float levels) {
    return lb_clamp(_mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(w, m), d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), 0.0f, levels);
}

/* one super-block, wt[i * 8 + l] = weight i of block l (float32) -> its 128 nibble bytes, 32 bytes of
 * 5th bits (qh, 5-bit only: levels = 31, else NULL and 15) and 16 scale bytes. Per block lo = min(min w,
 * 0), hi = max w; Dmin = f16_at_least(max(-lo) / 63), mn0 = ceil(-lo / Dmin); D = f16_at_least(max(max(hi
 * + Dmin mn0, 0) / levels) / 63). Then per block the pairs mn = mn0 - a, sc = ceil(max(hi + Dmin mn, 0) /
 * levels / D) - b (a, b = 0, 1, 2; clamped to [0, 63] and [1, 63]) are tried in that order, and the first
 * with the least sum (i = 0..31 in order, float32) of ((q d + m) - w)^2 is kept, q = clamp(round((w - m)
 * / d), 0, levels), d = D sc, m = -(Dmin mn). Returns 0, or -1 when D or Dmin does not fit a float16.
 * Each lane is one block, so every operation is the reference's, element for element. */
static int lb_k_quantize_super(const float *wt, float levels, uint8_t *qs, uint8_t *qh, uint8_t *sb) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(-INFINITY);
    for (int i = 0; i < LB_QB; i++) {
        __m256 v = _mm256_loadu_ps(wt + 8 * i);
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
    }
    float lanes[8], big = 0.0f;
    _mm256_storeu_ps(lanes, _mm256_sub_ps(_mm256_setzero_ps(), lo));
    for (int l = 0; l < 8; l++) big = lanes[l] > big ? lanes[l] : big;
    const uint16_t hdmin = lb_f16_at_least(big / (float)LB_K_TOP);
    const __m256 dm = _mm256_set1_ps(_cvtsh_ss(hdmin)), zero = _mm256_setzero_ps();
    const __m256 mn0 = lb_clamp(_mm256_ceil_ps(_mm256_div_ps(_mm256_sub_ps(zero, lo), dm)), 0.0f, (float)LB_K_TOP);
    _mm256_storeu_ps(lanes, _mm256_div_ps(_mm256_max_ps(_mm256_add_ps(hi, _mm256_mul_ps(dm, mn0)), zero), _mm256_set1_ps(levels)));
    big = 0.0f;
    for (int l = 0; l < 8; l++) big = lanes[l] > big ? lanes[l] : big;
    const uint16_t hD = lb_f16_at_least(big / (float)LB_K_TOP);
    if ((hD & 0x7C00) == 0x7C00 || (hdmin & 0x7C00) == 0x7C00) return -1;
    const __m256 D = _mm256_set1_ps(_cvtsh_ss(hD));
    __m256 best = _mm256_set1_ps(INFINITY), bsc = zero, bmn = zero;
    for (int a = 0; a < LB_K_SEARCH; a++) {
        const __m256 mn = lb_clamp(_mm256_sub_ps(mn0, _mm256_set1_ps((float)a)), 0.0f, (float)LB_K_TOP);
        const __m256 m = _mm256_sub_ps(zero, _mm256_mul_ps(dm, mn));
        const __m256 need = _mm256_div_ps(_mm256_max_ps(_mm256_sub_ps(hi, m), zero), _mm256_set1_ps(levels));
        const __m256 sc0 = lb_clamp(_mm256_ceil_ps(_mm256_div_ps(need, D)), 1.0f, (float)LB_K_TOP);
        for (int b = 0; b < LB_K_SEARCH; b++) {
            const __m256 sc = lb_clamp(_mm256_sub_ps(sc0, _mm256_set1_ps((float)b)), 1.0f, (float)LB_K_TOP);
            const __m256 d = _mm256_mul_ps(D, sc);
            __m256 err = zero;
            for (int i = 0; i < LB_QB; i++) {
                const __m256 w = _mm256_loadu_ps(wt + 8 * i);
                const __m256 e = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(lb_k_levels(w, m, d, levels), d), m), w);
                err = _mm256_add_ps(err, _mm256_mul_ps(e, e));
            }
            const __m256 better = _mm256_cmp_ps(err, best, _CMP_LT_OQ);
            best = _mm256_blendv_ps(best, err, better);
            bsc = _mm256_blendv_ps(bsc, sc, better);
            bmn = _mm256_blendv_ps(bmn, mn, better);
        }
    }
    const __m256 d = _mm256_mul_ps(D, bsc), m = _mm256_sub_ps(zero, _mm256_mul_ps(dm, bmn));
    float q[LB_QB][8], scf[8], mnf[8];
    for (int i = 0; i < LB_QB; i++) _mm256_storeu_ps(q[i], lb_k_levels(_mm256_loadu_ps(wt + 8 * i), m, d, levels));
    _mm256_storeu_ps(scf, bsc);
    _mm256_storeu_ps(mnf, bmn);
    for (int c = 0; c < 4; c++)                 /* byte 4l + i of chunk c: weights 8c + i | 8c + 4 + i << 4 */
        for (int l = 0; l < 8; l++)
            for (int i = 0; i < 4; i++)
                qs[32 * c + 4 * l + i] = (uint8_t)(((int)q[8 * c + i][l] & 15) | ((int)q[8 * c + 4 + i][l] & 15) << 4);
    if (qh)                                     /* byte 4l + i, bit 2c + h: the 5th bit of weight 8c + 4h + i of block l */
        for (int l = 0; l < 8; l++)
            for (int i = 0; i < 4; i++) {
                int bits = 0;
                for (int c = 0; c < 4; c++)
                    for (int h = 0; h < 2; h++) bits |= ((int)q[8 * c + 4 * h + i][l] >> 4 & 1) << (2 * c + h);
                qh[4 * l + i] = (uint8_t)bits;
            }
    memcpy(sb, &hD, 2);
    memcpy(sb + 2, &hdmin, 2);
    for (int l = 0; l < 8; l++) {
        int sc = (int)scf[l], mn = (int)mnf[l];
        sb[4 + l] = (uint8_t)(sc | (mn & 3) << 6);
        if (l % 2 == 0) sb[12 + l / 2] = (uint8_t)(mn >> 2);
        else sb[12 + l / 2] |= (uint8_t)((mn >> 2) << 4);
    }
    return 0;
}

/* float32 rows W [O, I] (finite) -> q4_k (bits 4) or q5_k (bits 5) nibbles qs [O, Ip / 2], 5th bits qh
 * [O, Ip / 8] (q5_k; else NULL) and scales sb [O, Ip / 16], rows padded with zeros to Ip (a multiple of
 * 256). Returns 0, -1 when a scale does not fit a float16, -2 for bits other than 4 and 5. */
int64_t lowbit_quantize_k(const float *W, int64_t O, int64_t I, int64_t Ip, int64_t bits, uint8_t *QS, uint8_t *QH,
                          uint8_t *SB, int64_t nthreads) {
    if ((bits != 4 && bits != 5) || (bits == 5) != (QH != NULL)) return -2;
    const float levels = (float)((1 << bits) - 1);
    int64_t bad = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(|: bad)
    for (int64_t o = 0; o < O; o++) {
        float wt[8 * LB_QB];
        for (int64_t s0 = 0; s0 < Ip; s0 += 8 * LB_QB) {
            for (int l = 0; l < 8; l++)
                for (int i = 0; i < LB_QB; i++) {
                    int64_t at = s0 + l * LB_QB + i;
                    wt[8 * i + l] = at < I ? W[o * I + at] : 0.0f;
                }
            bad |= lb_k_quantize_super(wt, levels, QS + o * (Ip / 2) + s0 / 2, QH ? QH + o * (Ip / 8) + s0 / 8 : NULL,
                                       SB + o * (Ip / 16) + s0 / 16) != 0;
        }
    }
    return bad ? -1 : 0;
}

/* rows [o0, o1) of the stored matrix (without col) -> float32 out [o1 - o0, I]: fl(d q + m) */
void lowbit_dequantize(int64_t fmt, const uint8_t *QS, const uint8_t *QH, const uint16_t *D, const uint16_t *M,
                       float *out, int64_t o0, int64_t o1, int64_t I, int64_t nthreads) {
    if (fmt == LB_Q8) {                     /* int8+cols: quant_ops.h's layout, its dequantisation */
        dequantize(FMT_Q8, QS, D, out, o0, o1, I, (I + LB_QB - 1) / LB_QB * LB_QB, nthreads);
        return;
    }
    const int64_t Ip = lb_padded(fmt, I), nb = Ip / LB_QB;
    const int has_min = lb_has_min(fmt);
    const float half = (float)(1 << (lb_bits(fmt) - 1));
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = o0; o < o1; o++) {
        float *dst = out + (o - o0) * I;
        for (int64_t j = 0; j < nb; j++) {
            float dd, mm;
            if (lb_is_k(fmt)) {
                lb_k_scale(D + o * nb + j / 8 * 8, (int)(j % 8), &dd, &mm);
            } else {
                dd = _cvtsh_ss(D[o * nb + j]);
                mm = has_min ? _cvtsh_ss(M[o * nb + j]) : -half * dd;
            }
            uint8_t q[LB_QB];
            if (lb_is_k(fmt)) {       /* weight 8c + 4h + i of block l: chunk c, byte 4l + i, nibble h */
                const uint8_t *sbk = QS + o * (Ip / 2) + (j / 8) * 4 * LB_QB;
                const uint8_t *hk = QH ? QH + o * (Ip / 8) + (j / 8) * LB_QB : NULL;   /* 5th bits: byte 4l + i, bit 2c + h */
                for (int i = 0; i < LB_QB; i++) {
                    q[i] = (sbk[LB_QB * (i / 8) + 4 * (j % 8) + i % 4] >> (4 * ((i / 4) % 2))) & 15;
                    if (hk) q[i] |= ((hk[4 * (j % 8) + i % 4] >> (2 * (i / 8) + (i / 4) % 2)) & 1) << 4;
                }
            } else {
                __m256i v = _mm256_loadu_si256((const __m256i *)(QS + o * (Ip / 2) + (j / 2) * LB_QB));
                v = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
                if (QH) {
                    __m256i plane = _mm256_loadu_si256((const __m256i *)(QH + o * (Ip / 8) + (j / 8) * LB_QB));
                    __m256i bit = _mm256_set1_epi8((char)(1 << (j % 8)));
                    v = _mm256_or_si256(v, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(plane, bit), bit),
                                                            _mm256_set1_epi8(0x10)));
                }
                _mm256_storeu_si256((__m256i *)q, v);
            }
            int64_t i0 = j * LB_QB, k = 0;
            if (i0 + LB_QB <= I) {
                __m256 vd = _mm256_set1_ps(dd), vm = _mm256_set1_ps(mm);
                for (; k < LB_QB; k += 8) {
                    __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k))));
                    _mm256_storeu_ps(dst + i0 + k, _mm256_add_ps(_mm256_mul_ps(qf, vd), vm));
                }
            }
            for (; k < LB_QB && i0 + k < I; k++)
                dst[i0 + k] = (float)q[k] * dd + mm;
        }
    }
}

#endif
