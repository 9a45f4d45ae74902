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

static void sample_block(const float *x, int64_t i, int64_t V, vf mxv, vf itv, float *w) {
    float buf[VW];
    const float *src = x + i;
    if (i + VW > V) {                                    /* the tail: missing lanes weigh exp(-inf) = 0 */
        for (int j = 0; j < VW; j++) buf[j] = i + j < V ? x[i + j] : -INFINITY;
        src = buf;
    }
    vstore(w, vexp(vmul(vsub(vload(src), mxv), itv)));
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
    for (int64_t k = 0; k < nblk; k++) {
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
