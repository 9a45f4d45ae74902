/* Temperature sampling by inverting the CDF, one row of logits per chunk of the pool
 * (rwkv_kernels/sampling.py: `sample_rows`, whose torch reference defines the result):
 *   w_i = exp((x_i - max_j x_j) * inv_temp),  token = first i with sum_{j<=i} w_j >= u * sum_j w_j.
 * Two passes over the row instead of torch's five (isfinite, softmax, isfinite, cumsum, search):
 * (1) max, and a sum of (x - x) that is NaN exactly when some logit is not finite; (2) w in vector
 * lanes with the vector exp, one float sum per block of VW lanes, blocks added in double. The search
 * walks the block sums in the same order, then the one block's lanes in double. Each row is computed
 * alone: a stream's token does not depend on the other rows. */
typedef struct {
    const float *x;
    int64_t V;
    float inv_temp;
    const double *u;
    int64_t *out;          /* token per row; -1 - (first non-finite index) for a row with one */
} sample_job;

#if VW == 8
/* vexp's value for lanes that are <= 0 or -inf, never NaN (a row's (x - max) / temperature once it is
 * known finite): the same reduction and polynomial (exp_reduced), without the checks for the lanes this
 * never has (above 88.7, NaN), and 2^n as one factor, exact here where n <= 0 (vexp's two factors keep
 * n = 128 finite): the same bits as vexp (tests/test_kernels_cpu.py compares them) in ~3/4 of its work. */
static inline vf weight_exp(vf x) {
    vf lo = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
    vf n, p = exp_reduced(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), &n);
    vf f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    return _mm256_andnot_ps(lo, _mm256_mul_ps(p, f));
}

/* vsum of four vectors at once, each in vsum's order (lanes j and j + 4, then pairs, then halves) */
static inline void vsum4(vf a, vf b, vf c, vf d, float *out) {
    __m128 la = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 lb = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    __m128 lc = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
    __m128 ld = _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
    _mm_storeu_ps(out, _mm_hadd_ps(_mm_hadd_ps(la, lb), _mm_hadd_ps(lc, ld)));
}
#else
static inline vf weight_exp(vf x) { return vexp(x); }
static inline void vsum4(vf a, vf b, vf c, vf d, float *out) {
    out[0] = vsum(a); out[1] = vsum(b); out[2] = vsum(c); out[3] = vsum(d);
}
#endif

/* For tests: out = vexp(x) (variant 0) or weight_exp(x) (variant 1), lane by lane; n a multiple of VW. */
void exp_lanes(const float *x, float *out, int64_t n, int64_t variant) {
    for (int64_t i = 0; i + VW <= n; i += VW)
        vstore(out + i, variant ? weight_exp(vload(x + i)) : vexp(vload(x + i)));
}

static inline vf block_weights(const float *src, vf mxv, vf itv) {
    return weight_exp(vmul(vsub(vload(src), mxv), itv));
}

static void sample_block(const float *x, int64_t i, int64_t V, vf mxv, vf itv, float *w) {
    float buf[VW];
    const float *src = x + i;
    if (i + VW > V) {                                    /* the tail: missing lanes weigh exp(-inf) = 0 */
        for (int j = 0; j < VW; j++) buf[j] = i + j < V ? x[i + j] : -INFINITY;
        src = buf;
    }
    vstore(w, block_weights(src, mxv, itv));
}

static void sample_row(void *ctx, int64_t b) {
    const sample_job *J = ctx;
    const int64_t V = J->V, nblk = (V + VW - 1) / VW;
    const float *x = J->x + b * V;
    vf mv = vset1(-INFINITY), chk = vzero();
    int64_t i = 0;
    for (; i + VW <= V; i += VW) {
        vf v = vload(x + i);
        mv = vmax(mv, v);
        chk = vadd(chk, vsub(v, v));
    }
    float m[VW], mx = -INFINITY, bad = vsum(chk);
    vstore(m, mv);
    for (int j = 0; j < VW; j++) mx = m[j] > mx ? m[j] : mx;
    for (; i < V; i++) {
        mx = x[i] > mx ? x[i] : mx;
        bad += x[i] - x[i];
    }
    if (bad != 0.0f || mx != mx) {                       /* NaN: some logit is NaN or infinite */
        int64_t k = 0;
        while (k < V && isfinite(x[k])) k++;
        J->out[b] = -1 - k;
        return;
    }
    const vf mxv = vset1(mx), itv = vset1(J->inv_temp);
    double *bs = malloc((size_t)nblk * sizeof(double)), total = 0.0;
    float w[VW];
    if (!bs) { J->out[b] = -1 - V; return; }
    int64_t k0 = 0;
    for (; (k0 + 4) * VW <= V; k0 += 4) {               /* four whole blocks at a time: their sums at once */
        const float *p = x + k0 * VW;
        float s[4];
        vsum4(block_weights(p, mxv, itv), block_weights(p + VW, mxv, itv), block_weights(p + 2 * VW, mxv, itv),
              block_weights(p + 3 * VW, mxv, itv), s);
        for (int j = 0; j < 4; j++) {
            bs[k0 + j] = s[j];
            total += s[j];
        }
    }
    for (int64_t k = k0; k < nblk; k++) {
        sample_block(x, k * VW, V, mxv, itv, w);
        float s = vsum(vload(w));
        bs[k] = s;
        total += s;
    }
    const double target = J->u[b] * total;
    double acc = 0.0;
    int64_t k = 0;
    while (k < nblk - 1 && acc + bs[k] < target) acc += bs[k++];
    sample_block(x, k * VW, V, mxv, itv, w);
    int64_t token = -1;
    for (int j = 0; j < VW && k * VW + j < V; j++) {
        if (w[j] > 0.0f) token = k * VW + j;            /* rounding fallback: the block's last positive */
        acc += w[j];
        if (acc >= target && w[j] > 0.0f) break;
    }
    free(bs);
    if (token < 0) {                                     /* rounding at the very end: the first maximum */
        token = 0;
        while (token < V - 1 && x[token] != mx) token++;
    }
    J->out[b] = token;
}

/* logits [B, V] float32 contiguous; u [B] in (0, 1]; out [B]. Rows in parallel on the pool. */
void sample_rows(const float *x, int64_t B, int64_t V, double inv_temp, const double *u, int64_t *out,
                 int64_t nthreads) {
    sample_job job = {x, V, (float)inv_temp, u, out};
    pool_run(sample_row, &job, B, nthreads);
}
