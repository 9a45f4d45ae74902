/* CPU kernels for RWKV-4 (float32, contiguous rows), built once per instruction set: rwkv_kernels/cpu_c.py
 * compiles this file with -mavx2 -mfma -mf16c, and with -mavx512f ... as well where the CPU has it.
 *
 * Decode (token mode):
 * 1. Batched matrix-vector products: y[b, o] (+)= sum_i W[o, i] x[b, i], for any number of streams B.
 *    Decode reads every weight once per token, so it is bound by memory bandwidth: rows of W are
 *    streamed four at a time and each block of four rows serves all B inputs while it sits in
 *    L1/L2, so the weights are read from memory once per call whatever B is. Several independent
 *    products (a layer's key, value and receptance) run as one job of the thread pool (pool.h):
 *    row chunks claimed dynamically, no barrier, so a thread that another process keeps off its
 *    core does not stall the token.
 *    Tiles: 4 rows x 4 streams of accumulators on AVX-512 (32 registers), 4 x 3 on AVX2 (16 registers:
 *    12 accumulators, 3 x vectors, 1 w vector), then 4 x 2 and 4 x 1 for the streams left over.
 *    The same tiles run float16 and bfloat16 weights, each widened exactly in registers (rows_f16,
 *    rows_bf16; quant_ops.h's rows16), so a 16-bit product has the float32 product's bits on its widened weights.
 *    Batch invariance: each (row, stream) dot product is one fixed instruction sequence (vector FMAs
 *    over the full blocks of the row, one masked block for the rest, one horizontal sum), the same
 *    whatever B is, whichever thread computes it and however the rows are chunked; so a stream's
 *    logits are bit-identical alone or in a batch.
 * 2. The element-wise work of a layer fused into a few passes (LayerNorm + token-shift mixes, the
 *    WKV step with its receptance gate, relu^2, the gated residual), each with a torch reference of
 *    the same signature in rwkv_kernels/fused.py.
 * Prefill (sequence mode):
 * 3. The WKV recurrence over a sequence (wkv_seq): blocks of neighbouring channels (one vector each)
 *    claimed from the library's pool, time walked with the state in registers. (A short prompt
 *    chunk's products run on this pool too, through item 1; long prompts' products are torch GEMMs.)
 */
#include <math.h>
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

#include "pool.h"


#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
typedef __mmask16 vmask;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vmask vmask_first(int64_t n) { return (vmask)((1u << n) - 1u); }
static inline vf vload_masked(const float *p, vmask m) { return _mm512_maskz_loadu_ps(m, p); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#else
#define VW 8
typedef __m256 vf;
typedef __m256i vmask;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vmask vmask_first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vload_masked(const float *p, vmask m) { return _mm256_maskload_ps(p, m); }
static inline float vsum(vf v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}
#endif

/* ---- element-wise helpers: exp in vectors (both widths) ------------------------------------
 * vexp: e^x for float32 lanes, |relative error| < 2 ulp on [-87.3, 88.7] (Cody-Waite reduction
 * x = n ln2 + r, degree-6 polynomial on |r| <= ln2/2); 0 below, +inf above, NaN stays NaN. */
#if defined(__AVX512F__)
static inline void vstore(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline void vstore_masked(float *p, vmask m, vf v) { _mm512_mask_storeu_ps(p, m, v); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vexp(vf x) {
    __mmask16 lo = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
    __mmask16 hi = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72283f), _CMP_GT_OQ);
    /* below the bound the lane is 0 (lo); computing it from the bound keeps scalef's n >= -126, as
     * from x itself scalef makes subnormals or underflows there, ~9x a call on an Intel Xeon (AMX)
     * (max(bound, x) is x for NaN and for every x at or above the bound: the same bits there) */
    vf xc = _mm512_max_ps(_mm512_set1_ps(-87.33654f), x);
    vf n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    vf p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    vf y = _mm512_scalef_ps(p, n);                               /* p * 2^n, exact */
    y = _mm512_mask_mov_ps(y, lo, _mm512_setzero_ps());
    return _mm512_mask_mov_ps(y, hi, _mm512_set1_ps(INFINITY));
}
#else
static inline void vstore(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline void vstore_masked(float *p, vmask m, vf v) { _mm256_maskstore_ps(p, m, v); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
/* e^xc = 2^n p for xc within [-87.34, 88.73]: n (an integer, as a float) and p, by the Cody-Waite
 * reduction xc = n ln2 + r and the degree-6 polynomial (vexp, and the sampler's weight_exp in sample.h) */
static inline vf exp_reduced(vf xc, vf *n_out) {
    vf n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    vf p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    *n_out = n;
    return _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
}
static inline vf vexp(vf x) {
    vf lo = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
    vf hi = _mm256_cmp_ps(x, _mm256_set1_ps(88.72283f), _CMP_GT_OQ);
    vf n, p = exp_reduced(_mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.72283f)), &n);
    /* 2^n in two steps (n in [-126, 128]: 2^(n/2) twice keeps each factor a normal float) */
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    vf f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
    vf f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
    vf y = _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), lo);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), hi);
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));     /* NaN in, NaN out */
}
#endif

/* n lanes (n >= VW: a whole vector) at p: a plain load or store for whole vectors, the masked form only
 * for a tail. AMD's AVX2 masked store (vmaskmovps) is microcoded and slow even with every lane set: on
 * Zen 4 the element-wise kernels ran 1.4x faster without it (wkv_step_gated, 16 streams x 768
 * channels, one thread: 63 -> 45 us). The lanes' values are the same either way. */
static inline vf vload_n(const float *p, int64_t n) { return n >= VW ? vload(p) : vload_masked(p, vmask_first(n)); }
static inline void vstore_n(float *p, int64_t n, vf v) {
    if (n >= VW) vstore(p, v);
    else vstore_masked(p, vmask_first(n), v);
}

#define PF_AHEAD 1                /* rows_*(): prefetch the block of 4 rows this many blocks ahead */
/* Where the 16-bit products' software prefetches land: L2. Zen 4, 2 threads, 169m's 85 products alternating
 * builds in one process, into L1 -> into L2: AVX2 build 1 stream 12.0 -> 8.6 ms, 4 streams 15.4 -> 10.3,
 * 16 streams 31.5 -> 26.0 (1b5's: 1 stream 43.8 -> 33.4, 4 streams 59.1 -> 50.3); the 512-bit build,
 * prefetching 8 KB ahead (set_wide16), 4 streams 17.7 -> 11.6, 16 streams 37.7 -> 29.4, 1 stream the same.
 * The bits do not depend on it. */
#ifndef PF16_HINT
#define PF16_HINT _MM_HINT_T1
#endif

/* One vector step of weights, widened to float32 (exact: every float16 and bfloat16 value is a float32
 * value); _tail: the first n < VW of them, the other lanes +0.0 (the zero lanes of a masked load). */
static inline vf wl_f32(const float *p) { return vload(p); }
static inline vf wl_f32_tail(const float *p, int64_t n) { return vload_masked(p, vmask_first(n)); }
#if defined(__AVX512F__)
static inline vf wl_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf wl_f16_tail(const uint16_t *p, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), p));
}
static inline vf wl_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf wl_bf16_tail(const uint16_t *p, int64_t n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), p)), 16));
}
#else
static inline vf wl_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
/* bfloat16 on AVX2: the 8 values broadcast to both lanes, then one pshufb puts value j in the high half of
 * dword j (zeros below), where zero-extension and a shift took two operations; the same bits. Zen 4, AVX2
 * build, 169m's 85 products, builds alternating: 16 streams 32.3 -> 28.6 ms, 1-4 streams 1.04-1.05x;
 * 1b5's 1.01-1.04x (the 512-bit build measured no change from the same idea with vpermw, so it keeps
 * vpmovzxwd + vpslld). */
static inline vf wl_bf16(const uint16_t *p) {
    const __m256i m = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,
                                       -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)), m));
}
static inline vf wl_f16_tail(const uint16_t *p, int64_t n) {      /* AVX2 has no 16-bit masked load */
    uint16_t t[8] = {0};
    for (int64_t k = 0; k < n; k++) t[k] = p[k];
    return wl_f16(t);
}
static inline vf wl_bf16_tail(const uint16_t *p, int64_t n) {
    uint16_t t[8] = {0};
    for (int64_t k = 0; k < n; k++) t[k] = p[k];
    return wl_bf16(t);
}
#endif

/* R rows (of W, row stride Iw) x S streams (of x, stride I) of dot products, into y (row stride O).
 * Every (row, stream) pair follows the same instruction sequence whatever R and S are, and whatever the
 * weight type: one accumulator, a vector FMA per full block of VW inputs, one block of the rest with
 * zero lanes, one horizontal sum. A 16-bit weight is widened exactly before its FMA, so a 16-bit product
 * is bit for bit the float32 product of its widened weights. Prefetch: `pk` cache lines of the block of
 * rows to come at `pf` per vector step (see rows_f32()), and/or each row's line `pfd` bytes ahead once
 * per 64 bytes of the row. */
#define DOT_TILE(NAME, WT, WL, WL_TAIL)                                                              \
static inline __attribute__((always_inline)) void NAME(const int R, const int S, const WT *w, int64_t Iw, \
        const float *x, float *y, int64_t I, int64_t O, int acc, const char *pf, int pk, int64_t pfd) { \
    vf a[4][4];                                                                                      \
    for (int r = 0; r < R; r++) for (int s = 0; s < S; s++) a[r][s] = vzero();                      \
    int64_t i = 0;                                                                                   \
    for (; i + VW <= I; i += VW) {                                                                   \
        if (pf) {                                                                                    \
            if (pk > 0) for (int j = 0; j < pk; j++) _mm_prefetch(pf + (i / VW * pk + j) * 64, _MM_HINT_T1); \
            else if ((i / VW) % -pk == 0) _mm_prefetch(pf + (i / VW / -pk) * 64, _MM_HINT_T1);        \
        }                                                                                            \
        if (pfd && ((i * (int64_t)sizeof(WT)) & 63) == 0)                                             \
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + r * Iw + i) + pfd, PF16_HINT); \
        vf xv[4];                                                                                    \
        for (int s = 0; s < S; s++) xv[s] = vload(x + s * I + i);                                    \
        for (int r = 0; r < R; r++) {                                                                \
            vf wv = WL(w + r * Iw + i);                                                              \
            for (int s = 0; s < S; s++) a[r][s] = vfma(wv, xv[s], a[r][s]);                          \
        }                                                                                            \
    }                                                                                                \
    if (i < I) {                                                                                     \
        vmask m = vmask_first(I - i);                                                                \
        vf xv[4];                                                                                    \
        for (int s = 0; s < S; s++) xv[s] = vload_masked(x + s * I + i, m);                          \
        for (int r = 0; r < R; r++) {                                                                \
            vf wv = WL_TAIL(w + r * Iw + i, I - i);                                                  \
            for (int s = 0; s < S; s++) a[r][s] = vfma(wv, xv[s], a[r][s]);                          \
        }                                                                                            \
    }                                                                                                \
    for (int s = 0; s < S; s++)                                                                      \
        for (int r = 0; r < R; r++) {                                                                \
            float d = vsum(a[r][s]);                                                                 \
            y[s * O + r] = acc ? y[s * O + r] + d : d;                                               \
        }                                                                                            \
}
DOT_TILE(tile_w32, float, wl_f32, wl_f32_tail)
DOT_TILE(tile_w16h, uint16_t, wl_f16, wl_f16_tail)
DOT_TILE(tile_w16b, uint16_t, wl_bf16, wl_bf16_tail)

/* The block prefetch's rate: pk > 0 lines of the next block per vector step of each tile, or pk < 0 one
 * line every -pk vector steps, so that the block's tiles together prefetch the next block once (4 rows x
 * VW weights are 4 * VW * wbytes / 64 lines per vector step; AVX2 float32: 2). Before, every build
 * prefetched ceil(4 / tiles) lines per step: twice the block in the AVX2 build, and from 17 streams
 * several blocks in both. Intel Xeon (AMX), 169m's 85 products, 2 threads, builds alternating, this rate
 * against that one at 4 / 6 / 8 / 12 / 16 / 32 streams: AVX2 1.09x / 1.12x / 1.16x / 1.10x / 1.16x /
 * 1.19x, 512-bit the same up to 16 streams and 1.13x at 32. A prefetch of twice the block, or of half
 * of it, was 1.03-1.19x slower in both builds (the half 0.99x at 4 streams in the 512-bit build); the
 * block two blocks ahead 1.00-1.03x slower. Each rate has its own copy of the loop (ROWS), the line count
 * a constant there: as a run-time value it cost the AVX2 4 x 3 loop ~20 instructions of address
 * arithmetic (an imul, an inner loop) per 12 FMAs, against 7 (the same A/B, 4 / 8 / 16 streams: AVX2
 * 1.06x / 1.09x / 1.07x, 512-bit 1.03x / 1.09x / 1.01x; one thread, a 768x768 product in L2 at 16 streams
 * 37 -> 43 G multiply-adds/s). Rates of one line every 4 or more steps all run the every-4 copy. */
static int block_pf_rate(int64_t tiles, int64_t wbytes) {
    const int64_t need = 4 * VW * wbytes / 64;
    if (tiles <= need) return (int)((need + tiles - 1) / tiles);
    return tiles / need == 1 ? 1 : -(int)(tiles / need);
}

/* rows [o0, o1) of one product for all B streams; W [O, I] row stride Iw, x [B, I], y [B, O].
 * Prefetch: below 4 streams each row `pfd` bytes ahead (the first tile of each block of rows); from 4
 * streams the next block of rows (below), for every weight type. 16-bit weights had kept the per-row
 * prefetch at every B; the block prefetch at block_pf_rate's rate against it (Intel Xeon (AMX), 169m's
 * 85 products, 2 threads, builds alternating, 4 / 8 / 16 / 32 streams): bfloat16 AVX2 1.14x / 1.19x /
 * 1.22x / 1.14x, 512-bit 1.11x / 1.21x / 1.18x / 1.11x; float16 within 0.04 of those; 1b5's bfloat16 at
 * 4 / 16 streams 1.05x / 1.09x (AVX2), 1.02x / 1.14x (512-bit). one_row: B = 1 walks the rows one at a
 * time (16-bit rows under set_wide16's length). */
#define ROWS(NAME, WT, TILE, ROW16)                                                                  \
static inline __attribute__((always_inline)) void NAME##_blocks(const WT *W, int64_t Iw, const float *x, \
        float *y, int64_t O, int64_t I, int64_t B, int64_t o0, int64_t o1, int acc, int64_t pd, const int pk) { \
    int64_t o = o0;                                                                                  \
    for (; o + 4 <= o1; o += 4) {                                                                    \
        int64_t b = 0;                                                                               \
        const char *pf = pk != 0 && o + 4 * (PF_AHEAD + 1) <= o1                                     \
                         ? (const char *)(W + (o + 4 * PF_AHEAD) * Iw) : NULL;                       \
        const int64_t step = 64 * (pk > 0 ? (I / VW) * pk : (I / VW - pk - 1) / -pk);  /* bytes per tile */ \
        for (; b + TILE_S <= B; b += TILE_S, pf = pf ? pf + step : NULL)                             \
            TILE(4, TILE_S, W + o * Iw, Iw, x + b * I, y + b * O + o, I, O, acc, pf, pk, b == 0 ? pd : 0); \
        for (; b + 2 <= B; b += 2, pf = pf ? pf + step : NULL)                                       \
            TILE(4, 2, W + o * Iw, Iw, x + b * I, y + b * O + o, I, O, acc, pf, pk, b == 0 ? pd : 0); \
        if (b < B) TILE(4, 1, W + o * Iw, Iw, x + b * I, y + b * O + o, I, O, acc, pf, pk, b == 0 ? pd : 0); \
    }                                                                                                \
    for (; o < o1; o++)                                                                              \
        for (int64_t b = 0; b < B; b++) TILE(1, 1, W + o * Iw, Iw, x + b * I, y + b * O + o, I, O, acc, NULL, 0, 0); \
}                                                                                                    \
static void NAME(const WT *W, int64_t Iw, const float *x, float *y, int64_t O, int64_t I, int64_t B, \
                 int64_t o0, int64_t o1, int acc, int64_t pfd, int one_row) {                        \
    const int64_t pd = B < 4 ? pfd : 0;                                                              \
    if (ROW16 && one_row && B == 1) {                                                                \
        for (int64_t o = o0; o < o1; o++) TILE(1, 1, W + o * Iw, Iw, x, y + o, I, O, acc, NULL, 0, pd); \
        return;                                                                                      \
    }                                                                                                \
    /* one copy of the loop per prefetch form (block_pf_rate), so none has a run-time count in it */ \
    const int pk = B < 4 ? 0 : block_pf_rate(TILES_OF(B), sizeof(WT));                              \
    if (pd) NAME##_blocks(W, Iw, x, y, O, I, B, o0, o1, acc, pd, 0);                                 \
    else if (pk >= 3) NAME##_blocks(W, Iw, x, y, O, I, B, o0, o1, acc, 0, 4);                        \
    else if (pk == 2) NAME##_blocks(W, Iw, x, y, O, I, B, o0, o1, acc, 0, 2);                        \
    else if (pk == 1) NAME##_blocks(W, Iw, x, y, O, I, B, o0, o1, acc, 0, 1);                        \
    else if (pk == -2) NAME##_blocks(W, Iw, x, y, O, I, B, o0, o1, acc, 0, -2);                      \
    else if (pk == -3) NAME##_blocks(W, Iw, x, y, O, I, B, o0, o1, acc, 0, -3);                      \
    else if (pk <= -4) NAME##_blocks(W, Iw, x, y, O, I, B, o0, o1, acc, 0, -4);                      \
    else NAME##_blocks(W, Iw, x, y, O, I, B, o0, o1, acc, 0, 0);                                     \
}
/* with several streams each block of 4 rows is computed on for a while: the block PF_AHEAD blocks
 * ahead (within this chunk) is prefetched meanwhile, spread over the block's tiles, a line or a
 * few per vector step, so memory requests stay in flight while the core computes; into L2 (longer
 * ahead of use). Measured on 169m, 16 streams, 2 threads, against the first tile prefetching the
 * next block into L1: 37 vs 42-50 ms per step (with the larger chunks of run_products at >= 8
 * streams). Into L2 from 4 streams rather than from 8 (Zen 4, 169m's 85 products, builds
 * alternating): 4-6 streams 1.12-1.25x in both builds, 8 and 16 unchanged. From 1 or 2 streams it
 * helped 169m but slowed 1b5's single stream by 1.2x, so fewer than 4 streams prefetch each row ahead
 * instead, as the 16-bit loops do (pf_f32_bytes; set_f32_pf in the 512-bit build): 169m's 85 products at
 * 1 stream 1.14-1.15x faster in both builds, 1b5's 1.01-1.03x; the same from 8 streams on was 0.87-0.93x. */
#if defined(__AVX512F__)          /* 32 vector registers: 4 rows x 4 streams of accumulators fit */
#define TILE_S 4
#define TILES_OF(B) ((B) / 4 + ((B) % 4) / 2 + ((B) % 2))
#else             /* 16 registers: 4 rows x 3 streams of accumulators, 3 x vectors and one w vector */
#define TILE_S 3
#define TILES_OF(B) ((B) / 3 + ((B) % 3) / 2 + ((B) % 3) % 2)
#endif
ROWS(rows_f32, float, tile_w32, 0)
ROWS(rows_f16, uint16_t, tile_w16h, 1)
ROWS(rows_bf16, uint16_t, tile_w16b, 1)

static int64_t pf_f32_bytes(int64_t I);      /* quant_ops.h: how far ahead rows of I floats are prefetched */

static void rows(const float *W, const float *x, float *y, int64_t O, int64_t I, int64_t B,
                 int64_t o0, int64_t o1, int acc) {
    rows_f32(W, I, x, y, O, I, B, o0, o1, acc, B < 4 ? pf_f32_bytes(I) : 0, 0);
}

/* xx = LayerNorm(x); out_j = shift + mix_j * (xx - shift) for each mix; then shift = xx.
 * Mean and variance are accumulated in double (per vector lane, then across lanes). */
void ln_shift_mix(const float *x, const float *ln_w, const float *ln_b, double eps, float *shift,
                  int64_t n_mix, const float **mix, float **out, int64_t B, int64_t C) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * C;
        double mean = 0.0, var = 0.0;
#if defined(__AVX512F__)
        __m512d s0 = _mm512_setzero_pd(), s1 = s0;
        int64_t c = 0;
        for (; c + 16 <= C; c += 16) {
            __m512 v = _mm512_loadu_ps(xb + c);
            s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
            s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
        }
        mean = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
        for (; c < C; c++) mean += xb[c];
        mean /= C;
        __m512d m8 = _mm512_set1_pd(mean), q0 = _mm512_setzero_pd(), q1 = q0;
        for (c = 0; c + 16 <= C; c += 16) {
            __m512 v = _mm512_loadu_ps(xb + c);
            __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), m8);
            __m512d d1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))), m8);
            q0 = _mm512_add_pd(q0, _mm512_mul_pd(d0, d0));
            q1 = _mm512_add_pd(q1, _mm512_mul_pd(d1, d1));
        }
        var = _mm512_reduce_add_pd(_mm512_add_pd(q0, q1));
        for (; c < C; c++) { double d = xb[c] - mean; var += d * d; }
#else
        __m256d s0 = _mm256_setzero_pd(), s1 = s0;
        int64_t c = 0;
        for (; c + 8 <= C; c += 8) {
            __m256 v = _mm256_loadu_ps(xb + c);
            s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
            s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
        }
        double t[4];
        _mm256_storeu_pd(t, _mm256_add_pd(s0, s1));
        mean = (t[0] + t[1]) + (t[2] + t[3]);
        for (; c < C; c++) mean += xb[c];
        mean /= C;
        __m256d m4 = _mm256_set1_pd(mean), q0 = _mm256_setzero_pd(), q1 = q0;
        for (c = 0; c + 8 <= C; c += 8) {
            __m256 v = _mm256_loadu_ps(xb + c);
            __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), m4);
            __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), m4);
            q0 = _mm256_add_pd(q0, _mm256_mul_pd(d0, d0));
            q1 = _mm256_add_pd(q1, _mm256_mul_pd(d1, d1));
        }
        _mm256_storeu_pd(t, _mm256_add_pd(q0, q1));
        var = (t[0] + t[1]) + (t[2] + t[3]);
        for (; c < C; c++) { double d = xb[c] - mean; var += d * d; }
#endif
        float rstd = (float)(1.0 / sqrt(var / C + eps)), m = (float)mean;
        float *sb = shift + b * C;
        vf vm = vset1(m), vr = vset1(rstd);
        for (c = 0; c < C; c += VW) {
            const int64_t n = C - c;
            vf xx = vadd(vmul(vmul(vsub(vload_n(xb + c, n), vm), vr), vload_n(ln_w + c, n)), vload_n(ln_b + c, n));
            vf sv = vload_n(sb + c, n), d = vsub(xx, sv);
            for (int64_t j = 0; j < n_mix; j++)
                vstore_n(out[j] + b * C + c, n, vadd(sv, vmul(vload_n(mix[j] + c, n), d)));
            vstore_n(sb + c, n, xx);
        }
    }
}

/* One WKV token in the running-max form (see rwkv_kernels/wkv_reference.py), gated by the receptance:
 * out = sigmoid(r) * wkv; the state (a, b, p) is updated in place. w, u: [C]; the rest [B, C]. */
void wkv_step_gated(const float *w, const float *u, const float *r, const float *k, const float *v,
                    float *a, float *b, float *p, float *out, int64_t B, int64_t C) {
    const vf one = vset1(1.0f), zero = vset1(0.0f);
    for (int64_t bi = 0; bi < B; bi++)
        for (int64_t c = 0; c < C; c += VW) {
            const int64_t n = C - c, i = bi * C + c;
            vf kk = vload_n(k + i, n), vv = vload_n(v + i, n), aa = vload_n(a + i, n);
            vf bb = vload_n(b + i, n), pp = vload_n(p + i, n);
            vf uk = vadd(vload_n(u + c, n), kk);
            vf q = vmax(uk, pp);
            vf e1 = vexp(vsub(pp, q)), e2 = vexp(vsub(uk, q));
            vf y = vdiv(vadd(vmul(e1, aa), vmul(e2, vv)), vadd(vmul(e1, bb), e2));
            vf sig = vadd(one, vexp(vsub(zero, vload_n(r + i, n))));
            vstore_n(out + i, n, vdiv(y, sig));
            vf wp = vadd(pp, vload_n(w + c, n));
            q = vmax(kk, wp);
            e1 = vexp(vsub(wp, q));
            e2 = vexp(vsub(kk, q));
            vstore_n(a + i, n, vadd(vmul(e1, aa), vmul(e2, vv)));
            vstore_n(b + i, n, vadd(vmul(e1, bb), e2));
            vstore_n(p + i, n, q);
        }
}

/* k = relu(k)^2, in place */
void relu_square(float *k, int64_t n) {
    const vf zero = vset1(0.0f);
    for (int64_t i = 0; i < n; i += VW) {
        vf t = vmax(vload_n(k + i, n - i), zero);
        vstore_n(k + i, n - i, vmul(t, t));
    }
}

/* x += sigmoid(r) * v, in place */
void add_gated(float *x, const float *r, const float *v, int64_t n) {
    const vf one = vset1(1.0f), zero = vset1(0.0f);
    for (int64_t i = 0; i < n; i += VW) {
        vf sig = vadd(one, vexp(vsub(zero, vload_n(r + i, n - i))));
        vstore_n(x + i, n - i, vadd(vload_n(x + i, n - i), vdiv(vload_n(v + i, n - i), sig)));
    }
}

/* WKV over a sequence (running-max form, see rwkv_kernels/wkv_reference.py): k, v, y [B, T, C];
 * state a, b, p [B, C] updated in place. Channels are independent: a vector of VW neighbouring
 * channels of one stream per chunk of the library's pool (each channel's recurrence is the scalar one,
 * in vector lanes; k, v, y rows of one time step are contiguous across channels). On the pool rather
 * than OpenMP: an OpenMP team's threads spin after the scan and took a core from the products that
 * follow it (a 16-token prompt chunk: 66 ms per 169m forward with the scan on OpenMP, 45 ms with
 * OpenMP threads not spinning). */
typedef struct {
    const float *w, *u, *k, *v;
    float *y, *a, *b, *p;
    int64_t T, C, nblk;
} wkv_seq_job;

static void wkv_seq_chunk(void *ctx, int64_t job) {
    const wkv_seq_job *J = ctx;
    const int64_t T = J->T, C = J->C;
    int64_t bi = job / J->nblk, c0 = (job % J->nblk) * VW, o = bi * C + c0;
    const int64_t n = C - c0;
    vf aa = vload_n(J->a + o, n), bb = vload_n(J->b + o, n), pp = vload_n(J->p + o, n);
    vf ww = vload_n(J->w + c0, n), uu = vload_n(J->u + c0, n);
    const float *kb = J->k + bi * T * C + c0, *vb = J->v + bi * T * C + c0;
    float *yb = J->y + bi * T * C + c0;
    for (int64_t t = 0; t < T; t++) {
        vf kk = vload_n(kb + t * C, n), vv = vload_n(vb + t * C, n);
        vf uk = vadd(uu, kk);
        vf q = vmax(uk, pp);
        vf e1 = vexp(vsub(pp, q)), e2 = vexp(vsub(uk, q));
        vstore_n(yb + t * C, n, vdiv(vadd(vmul(e1, aa), vmul(e2, vv)), vadd(vmul(e1, bb), e2)));
        vf wp = vadd(pp, ww);
        q = vmax(kk, wp);
        e1 = vexp(vsub(wp, q));
        e2 = vexp(vsub(kk, q));
        aa = vadd(vmul(e1, aa), vmul(e2, vv));
        bb = vadd(vmul(e1, bb), e2);
        pp = q;
    }
    vstore_n(J->a + o, n, aa);
    vstore_n(J->b + o, n, bb);
    vstore_n(J->p + o, n, pp);
}

void wkv_seq(const float *w, const float *u, const float *k, const float *v, float *y,
             float *a, float *b, float *p, int64_t B, int64_t T, int64_t C, int64_t nthreads) {
    wkv_seq_job job = {w, u, k, v, y, a, b, p, T, C, (C + VW - 1) / VW};
    pool_run(wkv_seq_chunk, &job, B * job.nblk, nthreads);
}

/* The kernels for 16-bit and int8 weights (rwkv_kernels/quant.py) live in the same library, so every
 * decode product runs on one thread pool. */
#include "quant_ops.h"
#include "lowbit_ops.h"   /* 5- and 4-bit block formats, int8 with column scales (rwkv_kernels/lowbit.py) */

/* Temperature sampling of rows of logits (rwkv_kernels/sampling.py). */
#include "sample.h"

/* A whole decode step through a run of layers in one call (rwkv_kernels/decode.py). */
#include "decode_step.h"

/* Test hook for the pool's stall policy (tests/test_decode.py): one job of n chunks on nthreads; the
 * first chunk a worker thread (not the caller) runs sleeps sleep_us first, as if preempted while holding
 * it. on_caller[i] = 1 if the caller ran chunk i. Returns how many stalls the pool has counted so far. */
typedef struct { pthread_t caller; int64_t sleep_us; _Atomic int slept; int64_t *on_caller; } probe_ctx;

static void probe_chunk(void *ctx, int64_t i) {
    probe_ctx *c = ctx;
    int caller = pthread_equal(pthread_self(), c->caller);
    if (!caller && c->sleep_us > 0 && atomic_exchange(&c->slept, 1) == 0) usleep((useconds_t)c->sleep_us);
    c->on_caller[i] = caller;
    for (volatile int k = 0; k < 20000; k++) {}        /* a few microseconds of work */
}

int64_t pool_probe(int64_t n, int64_t nthreads, int64_t sleep_us, int64_t *on_caller) {
    probe_ctx c = {.caller = pthread_self(), .sleep_us = sleep_us, .on_caller = on_caller};
    pool_run(probe_chunk, &c, n, nthreads);
    return pool_stalls();
}

/* Forget the stall history (tests): the next job uses the threads again. */
void pool_reset_stalls(void) { pool.solo_until = 0; pool.solo_ns = 0; pool.last_stall = 0; }

/* n float32 products y_j (+)= x_j W_j^T (x_j [B, I_j], W_j [O_j, I_j], y_j [B, O_j]) as one job of the
 * thread pool: the generic job of quant_ops.h with format F32 (rows() above does the rows). Returns 0,
 * or -1 when n is outside 1..MAX_GROUP (callers split). */
int64_t matvec_group(int64_t n, const float **W, const float **x, float **y, const int64_t *O,
                     const int64_t *I, int64_t B, int64_t nthreads, int64_t acc) {
    if (n < 1 || n > MAX_GROUP) return -1;
    product ps[MAX_GROUP];
    for (int64_t j = 0; j < n; j++)
        ps[j] = (product){FMT_F32, O[j], I[j], 0, W[j], NULL, x[j], y[j], NULL, NULL};
    run_products(n, ps, B, nthreads, acc);
    return 0;
}

int64_t matvec_max_group(void) { return MAX_GROUP; }
