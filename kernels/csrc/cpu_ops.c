/* CPU kernels for RWKV-4 (float32, contiguous rows), built once per instruction set: kernels/cpu_c.py
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
 *    Batch invariance: each (row, stream) dot product is one fixed instruction sequence (vector FMAs
 *    over the full blocks of the row, one masked block for the rest, one horizontal sum), the same
 *    whatever B is, whichever thread computes it and however the rows are chunked; so a stream's
 *    logits are bit-identical alone or in a batch.
 * 2. The element-wise work of a layer fused into a few passes (LayerNorm + token-shift mixes, the
 *    WKV step with its receptance gate, relu^2, the gated residual), each with a torch reference of
 *    the same signature in kernels/fused.py.
 * Prefill (sequence mode):
 * 3. The WKV recurrence over a sequence (wkv_seq): channels split over torch's OpenMP threads (the
 *    products of a prompt are torch GEMMs on that same pool), time walked with the state in registers.
 */
#include <math.h>
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

#include "pool.h"

#define MATVEC_MAX_GROUP 8           /* products in one matvec_group call */
#define MATVEC_CHUNK_BYTES 65536     /* weight bytes per claimed chunk (whole blocks of 4 rows) */

int64_t matvec_max_group(void) { return MATVEC_MAX_GROUP; }

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

/* R rows (of W, stride I) x S streams (of x, stride I) of dot products, into y (row stride O).
 * Every (row, stream) pair follows the same instruction sequence whatever R and S are. */
static inline __attribute__((always_inline)) void dot_tile(const int R, const int S, const float *w,
        const float *x, float *y, int64_t I, int64_t O, int acc) {
    vf a[4][2];
    for (int r = 0; r < R; r++) for (int s = 0; s < S; s++) a[r][s] = vzero();
    int64_t i = 0;
    for (; i + VW <= I; i += VW) {
        vf xv[2];
        for (int s = 0; s < S; s++) xv[s] = vload(x + s * I + i);
        for (int r = 0; r < R; r++) {
            vf wv = vload(w + r * I + i);
            for (int s = 0; s < S; s++) a[r][s] = vfma(wv, xv[s], a[r][s]);
        }
    }
    if (i < I) {
        vmask m = vmask_first(I - i);
        vf xv[2];
        for (int s = 0; s < S; s++) xv[s] = vload_masked(x + s * I + i, m);
        for (int r = 0; r < R; r++) {
            vf wv = vload_masked(w + r * I + i, m);
            for (int s = 0; s < S; s++) a[r][s] = vfma(wv, xv[s], a[r][s]);
        }
    }
    for (int s = 0; s < S; s++)
        for (int r = 0; r < R; r++) {
            float d = vsum(a[r][s]);
            y[s * O + r] = acc ? y[s * O + r] + d : d;
        }
}

/* rows [o0, o1) of one product for all B streams; W [O, I] row-major, x [B, I], y [B, O] */
static void rows(const float *W, const float *x, float *y, int64_t O, int64_t I, int64_t B,
                 int64_t o0, int64_t o1, int acc) {
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
        int64_t b = 0;
        for (; b + 2 <= B; b += 2) dot_tile(4, 2, W + o * I, x + b * I, y + b * O + o, I, O, acc);
        if (b < B) dot_tile(4, 1, W + o * I, x + b * I, y + b * O + o, I, O, acc);
    }
    for (; o < o1; o++)
        for (int64_t b = 0; b < B; b++) dot_tile(1, 1, W + o * I, x + b * I, y + b * O + o, I, O, acc);
}

typedef struct {
    int64_t B, acc;
    const float **W, **x;
    float **y;
    const int64_t *O, *I;
    int64_t chunk_rows[MATVEC_MAX_GROUP];
    int64_t first_chunk[MATVEC_MAX_GROUP + 1];    /* product j owns chunks [first[j], first[j+1]) */
} matvec_job;

static void matvec_chunk(void *ctx, int64_t chunk) {
    const matvec_job *job = ctx;
    int64_t j = 0;
    while (chunk >= job->first_chunk[j + 1]) j++;
    int64_t o0 = (chunk - job->first_chunk[j]) * job->chunk_rows[j];
    int64_t o1 = o0 + job->chunk_rows[j] < job->O[j] ? o0 + job->chunk_rows[j] : job->O[j];
    rows(job->W[j], job->x[j], job->y[j], job->O[j], job->I[j], job->B, o0, o1, (int)job->acc);
}

/* n independent products y_j (+)= x_j W_j^T (x_j [B, I_j], W_j [O_j, I_j], y_j [B, O_j]) as one job
 * of the thread pool. Returns 0, or -1 when n is outside 1..MATVEC_MAX_GROUP (callers split). */
int64_t matvec_group(int64_t n, const float **W, const float **x, float **y, const int64_t *O,
                     const int64_t *I, int64_t B, int64_t nthreads, int64_t acc) {
    if (n < 1 || n > MATVEC_MAX_GROUP) return -1;
    matvec_job job = {.B = B, .acc = acc, .W = W, .x = x, .y = y, .O = O, .I = I};
    for (int64_t j = 0; j < n; j++) {
        int64_t r = MATVEC_CHUNK_BYTES / ((I[j] > 0 ? I[j] : 1) * (int64_t)sizeof(float)) / 4 * 4;
        job.chunk_rows[j] = r < 4 ? 4 : r;
        job.first_chunk[j + 1] = job.first_chunk[j] + (O[j] + job.chunk_rows[j] - 1) / job.chunk_rows[j];
    }
    pool_run(matvec_chunk, &job, job.first_chunk[n], nthreads);
    return 0;
}

/* xx = LayerNorm(x); out_j = shift + mix_j * (xx - shift) for each mix; then shift = xx. */
void ln_shift_mix(const float *x, const float *ln_w, const float *ln_b, double eps, float *shift,
                  int64_t n_mix, const float **mix, float **out, int64_t B, int64_t C) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * C;
        double mean = 0.0, var = 0.0;
        for (int64_t c = 0; c < C; c++) mean += xb[c];
        mean /= C;
        for (int64_t c = 0; c < C; c++) { double d = xb[c] - mean; var += d * d; }
        float rstd = (float)(1.0 / sqrt(var / C + eps)), m = (float)mean;
        float *sb = shift + b * C;
        for (int64_t c = 0; c < C; c++) {
            float xx = (xb[c] - m) * rstd * ln_w[c] + ln_b[c];
            float d = xx - sb[c];
            for (int64_t j = 0; j < n_mix; j++) out[j][b * C + c] = sb[c] + mix[j][c] * d;
            sb[c] = xx;
        }
    }
}

/* One WKV token in the running-max form (see kernels/wkv_reference.py), gated by the receptance:
 * out = sigmoid(r) * wkv; the state (a, b, p) is updated in place. w, u: [C]; the rest [B, C]. */
void wkv_step_gated(const float *w, const float *u, const float *r, const float *k, const float *v,
                    float *a, float *b, float *p, float *out, int64_t B, int64_t C) {
    for (int64_t i = 0; i < B * C; i++) {
        int64_t c = i % C;
        float kk = k[i], vv = v[i], aa = a[i], bb = b[i], pp = p[i];
        float uk = u[c] + kk;
        float q = pp > uk ? pp : uk;
        float e1 = expf(pp - q), e2 = expf(uk - q);
        float y = (e1 * aa + e2 * vv) / (e1 * bb + e2);
        out[i] = y / (1.0f + expf(-r[i]));
        float wp = pp + w[c];
        q = wp > kk ? wp : kk;
        e1 = expf(wp - q); e2 = expf(kk - q);
        a[i] = e1 * aa + e2 * vv;
        b[i] = e1 * bb + e2;
        p[i] = q;
    }
}

/* k = relu(k)^2, in place */
void relu_square(float *k, int64_t n) {
    for (int64_t i = 0; i < n; i++) { float t = k[i] > 0.0f ? k[i] : 0.0f; k[i] = t * t; }
}

/* x += sigmoid(r) * v, in place */
void add_gated(float *x, const float *r, const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += v[i] / (1.0f + expf(-r[i]));
}

/* WKV over a sequence (running-max form, see kernels/wkv_reference.py): k, v, y [B, T, C];
 * state a, b, p [B, C] updated in place. Channels are independent: split over threads. */
void wkv_seq(const float *w, const float *u, const float *k, const float *v, float *y,
             float *a, float *b, float *p, int64_t B, int64_t T, int64_t C, int64_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bc = 0; bc < B * C; bc++) {
        int64_t bi = bc / C, c = bc % C;
        float aa = a[bc], bb = b[bc], pp = p[bc], ww = w[c], uu = u[c];
        const float *kb = k + bi * T * C + c, *vb = v + bi * T * C + c;
        float *yb = y + bi * T * C + c;
        for (int64_t t = 0; t < T; t++) {
            float kk = kb[t * C], vv = vb[t * C];
            float uk = uu + kk;
            float q = pp > uk ? pp : uk;
            float e1 = expf(pp - q), e2 = expf(uk - q);
            yb[t * C] = (e1 * aa + e2 * vv) / (e1 * bb + e2);
            float wp = pp + ww;
            q = wp > kk ? wp : kk;
            e1 = expf(wp - q); e2 = expf(kk - q);
            aa = e1 * aa + e2 * vv;
            bb = e1 * bb + e2;
            pp = q;
        }
        a[bc] = aa; b[bc] = bb; p[bc] = pp;
    }
}

/* The kernels for 16-bit and int8 weights (kernels/quant.py) live in the same library, so every
 * decode product runs on one thread pool. */
#include "quant_ops.h"
