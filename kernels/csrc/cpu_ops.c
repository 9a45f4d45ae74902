/* CPU decode kernels for RWKV-4 (float32, contiguous [B, C] rows).
 *
 * 1. Batched matrix-vector products: y[b, o] (+)= sum_i W[o, i] x[b, i].
 *
 * Decode reads every weight once per token, so it is bound by memory bandwidth. This kernel
 * streams four rows of W at a time through AVX2 FMAs (each row read once for all B inputs,
 * while it sits in L1), splits rows across OpenMP threads, and runs several independent
 * products (e.g. the key, value and receptance matrices of a layer) in one parallel region so
 * that threads are woken once per group instead of once per matrix.
 *
 * 2. The element-wise work of a layer fused into a few passes (LayerNorm + token-shift mixes,
 * the WKV step with its receptance gate, relu^2, the gated residual), so that a decode step
 * costs a handful of calls per layer instead of ~40 small torch ops. Each has a torch reference
 * with the same signature in kernels/fused.py.
 */
#include <math.h>
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* rows [o0, o1) of one product; W [O, I] row-major, x [B, I], y [B, O] */
static void rows(const float *W, const float *x, float *y, int64_t O, int64_t I, int64_t B,
                 int64_t o0, int64_t o1, int acc) {
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
        const float *w0 = W + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * I;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= I; i += 8) {
                __m256 xv = _mm256_loadu_ps(xb + i);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
            }
            float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
            for (; i < I; i++) {
                s0 += w0[i] * xb[i]; s1 += w1[i] * xb[i]; s2 += w2[i] * xb[i]; s3 += w3[i] * xb[i];
            }
            float *yb = y + b * O + o;
            if (acc) { yb[0] += s0; yb[1] += s1; yb[2] += s2; yb[3] += s3; }
            else { yb[0] = s0; yb[1] = s1; yb[2] = s2; yb[3] = s3; }
        }
    }
    for (; o < o1; o++) {
        const float *w0 = W + o * I;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * I;
            __m256 a0 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= I; i += 8)
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), _mm256_loadu_ps(xb + i), a0);
            float s0 = hsum(a0);
            for (; i < I; i++) s0 += w0[i] * xb[i];
            y[b * O + o] = acc ? y[b * O + o] + s0 : s0;
        }
    }
}

/* n independent products in one parallel region; each split into row blocks over the threads */
void matvec_group(int64_t n, const float **W, const float **x, float **y, const int64_t *O,
                  const int64_t *I, int64_t B, int64_t nthreads, int64_t acc) {
    #pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t j = 0; j < n; j++) {
            int64_t per = ((O[j] + nt - 1) / nt + 3) / 4 * 4;       /* rows per thread, multiple of 4 */
            int64_t o0 = t * per, o1 = o0 + per < O[j] ? o0 + per : O[j];
            if (o0 < o1) rows(W[j], x[j], y[j], O[j], I[j], B, o0, o1, (int)acc);
        }
    }
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
