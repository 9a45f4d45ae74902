/* One decode step (token mode) through a run of RWKV-4 layers in a single call: included by cpu_ops.c.
 *
 * Why: a decode step of 169m is ~90 small operations; called one by one from Python each costs
 * tens of microseconds of interpreter and tensor bookkeeping, which added up to more time than
 * reading the int8 weights. Here a whole step is one call: per layer the same kernels the per-op
 * path uses (ln_shift_mix, the grouped products of quant_ops.h / rows(), wkv_step_gated,
 * relu_square, add_gated), in the same order, so the result is bit-identical to the per-op path
 * (rwkv_kernels/decode.py: `decode_layers` with the "composed" implementation; tested). Four products
 * per layer run as jobs of the thread pool (pool.h); so does the element-wise work for 4 or more
 * streams (one chunk per stream), else it runs on the caller.
 *
 * Layout of one layer in the flat arrays built by rwkv_kernels/decode.py (DECODE_PTRS pointers, DECODE_DIMS
 * int64 per layer):
 *   ptrs[0..10]  float32 [C] vectors: ln1_w, ln1_b, att_mix_k, att_mix_v, att_mix_r, att_w, att_u,
 *                ln2_w, ln2_b, ffn_mix_k, ffn_mix_r
 *   ptrs[11 + 5m .. 15 + 5m]: the parts of matrix m (NULL where the format has none), in the order
 *                att_receptance, att_key, att_value, att_output, ffn_receptance, ffn_key, ffn_value:
 *                values, scales, then (low-bit formats, lowbit_ops.h) the 5th-bit planes, the minimums
 *                and the column scales
 * The products of the low-bit formats run lowbit_ops.h's kernels (the same calls the per-op path makes
 * through rwkv_kernels/lowbit.py), the others quant_ops.h's.
 *   dims[3m..3m+2]: (format code, rows O, columns I) of matrix m
 * The state tensors are (n_layers, B, C) float32, contiguous; x (B, C) float32 is updated in place.
 *
 * decode_token is a whole model's token step in the same one call: the embedding rows of the tokens
 * (widened from 16 bits where the table is), decode_layers, the final LayerNorm (ln_shift_mix with no
 * mixes: its LayerNorm alone) and the head's product, the same kernels the per-op path runs
 * (rwkv_kernels/decode.py: `decode_token`, "composed"), so the logits have the same bits. Why: between
 * the layers' call and the head's, the per-op path ran ~10 tensor operations in Python; right after a
 * step has streamed the weights through the caches they cost 0.5-1 ms a token (Zen 4: 169m bfloat16
 * 10.5 -> 9.4 ms a token with the calls alone).
 */
#ifndef RWKV_DECODE_STEP_H
#define RWKV_DECODE_STEP_H

#define DECODE_VECS 11
#define DECODE_MATS 7
#define DECODE_PARTS 5
#define DECODE_PTRS (DECODE_VECS + DECODE_PARTS * DECODE_MATS)
#define DECODE_DIMS (3 * DECODE_MATS)

enum { M_ATT_R, M_ATT_K, M_ATT_V, M_ATT_O, M_FFN_R, M_FFN_K, M_FFN_V };

int64_t decode_layout(int64_t which) { return which == 0 ? DECODE_PTRS : DECODE_DIMS; }

static inline product decode_product(void *const *P, const int64_t *D, int m, const float *x, float *y) {
    return (product){.fmt = D[3 * m], .O = D[3 * m + 1], .I = D[3 * m + 2], .W = P[DECODE_VECS + DECODE_PARTS * m],
                     .S = (const uint16_t *)P[DECODE_VECS + DECODE_PARTS * m + 1], .x = x, .y = y, .tag = 1 + m};
}

/* the LB_* layout of lowbit_ops.h that runs a format's products, or -1 (quant_ops.h runs them) */
static inline int64_t decode_lowbit_layout(int64_t fmt) {
    switch (fmt) {
    case FMT_Q5_0: case FMT_Q5_0C: return LB_Q5_0;
    case FMT_Q4_1: case FMT_Q4_1C: return LB_Q4_1;
    case FMT_Q4_K: case FMT_Q4_KC: return LB_Q4_K;
    case FMT_Q5_K: case FMT_Q5_KC: return LB_Q5_K;
    default: return -1;
    }
}

/* n products (n <= 3) as pool jobs, parts[j] the DECODE_PARTS pointers of product j: the low-bit ones
 * through lowbit_ops.h, the rest through quant_ops.h, int8+cols as int8 with its column scales (each
 * product's result is the same whichever job it is in). Returns 0, or -1 when the low-bit kernels'
 * scratch cannot be allocated. */
static int64_t run_decode_products(int n, const product *ps, void *const *const *parts, int64_t B,
                                   int64_t nthreads, int64_t acc) {
    product plain[3];
    lb_product low[3];
    int np = 0, nl = 0;
    for (int j = 0; j < n; j++) {
        int64_t layout = decode_lowbit_layout(ps[j].fmt);
        void *const *q = parts[j];
        if (layout < 0) {
            plain[np] = ps[j];
            if (ps[j].fmt == FMT_Q8C) {
                plain[np].fmt = FMT_Q8;
                plain[np].col = (const float *)q[4];
            }
            np++;
            continue;
        }
        low[nl++] = (lb_product){.fmt = layout, .O = ps[j].O, .I = ps[j].I, .qs = q[0], .d = q[1], .qh = q[2],
                                 .m = q[3], .col = q[4], .x = ps[j].x, .y = ps[j].y, .tag = ps[j].tag};
    }
    if (np) run_products(np, plain, B, nthreads, acc);
    if (nl && lb_run_products(nl, low, B, nthreads, acc) != 0) return -1;
    return 0;
}

/* n products of one layer (their tags name the matrices of P) */
static int64_t decode_products(int n, const product *ps, void *const *P, const int64_t *D, int64_t B,
                               int64_t nthreads, int64_t acc) {
    void *const *parts[3];
    for (int j = 0; j < n; j++) parts[j] = P + DECODE_VECS + DECODE_PARTS * (ps[j].tag - 1);
    (void)D;
    return run_decode_products(n, ps, parts, B, nthreads, acc);
}

/* The element-wise work of a layer for several streams runs as a pool job, one chunk per stream
 * (each op is independent across streams, so the result is the same as one call over all of them).
 * With T tokens per stream (sequence_layers) a stream's chunk does its tokens in order, each token the
 * work of one decode step: the token shift and the WKV state carried from one to the next. */
enum { EW_LN_ATT, EW_WKV, EW_LN_FFN, EW_RELU, EW_GATE };
typedef struct {
    int op;
    void *const *P;
    float *x, *shift, *kx, *vx, *rx, *r, *k, *v, *y, *fk, *a, *b, *p;
    int64_t C, F, T;
    double eps;
} ew_job;

static void ew_stream(void *ctx, int64_t s) {
    const ew_job *e = ctx;
    const float *const *V = (const float *const *)e->P;
    const int64_t so = s * e->C;                       /* the stream's row of the state */
    for (int64_t t = 0; t < e->T; t++) {
        const int64_t row = s * e->T + t, o = row * e->C;    /* token t of stream s: its row of x */
        switch (e->op) {
        case EW_LN_ATT: {
            const float *mix[3] = {V[2], V[3], V[4]};
            float *out[3] = {e->kx + o, e->vx + o, e->rx + o};
            ln_shift_mix(e->x + o, V[0], V[1], e->eps, e->shift + so, 3, mix, out, 1, e->C);
            break;
        }
        case EW_WKV:
            wkv_step_gated(V[5], V[6], e->r + o, e->k + o, e->v + o, e->a + so, e->b + so, e->p + so, e->y + o, 1, e->C);
            break;
        case EW_LN_FFN: {
            const float *mix[2] = {V[9], V[10]};
            float *out[2] = {e->kx + o, e->rx + o};
            ln_shift_mix(e->x + o, V[7], V[8], e->eps, e->shift + so, 2, mix, out, 1, e->C);
            break;
        }
        case EW_RELU:
            relu_square(e->fk + row * e->F, e->F);
            break;
        case EW_GATE:
            add_gated(e->x + o, e->r + o, e->v + o, e->C);
            break;
        }
    }
}

#define EW_PARALLEL_MIN_STREAMS 4    /* below this the element-wise work runs on the caller */

static void ew_run(ew_job *e, int op, int64_t B, int64_t nthreads) {
    e->op = op;
    uint64_t t0 = prof_on() ? pool_now_ns() : 0;
    if (B >= EW_PARALLEL_MIN_STREAMS) pool_run(ew_stream, e, B, nthreads);
    else for (int64_t s = 0; s < B; s++) ew_stream(e, s);
    if (t0) prof_add(&prof.ew[op], (int64_t)(pool_now_ns() - t0));
}

/* T tokens of each of B streams through the layers: x [B * T, C] (stream-major), the state [n_layers, B,
 * C]. Each token gets exactly the work of a decode step in its stream's order (the element-wise ops
 * per token, the products over all B * T rows, whose rows are computed alone), so the result is that of
 * T decode steps bit for bit. Returns 0, or -1 if the scratch memory cannot be allocated (nothing is
 * changed then). */
static int64_t run_layers(int64_t n_layers, const int64_t *dims, void *const *ptrs, float *x, float *att_x,
                          float *att_a, float *att_b, float *att_p, float *ffn_x, int64_t B, int64_t T, int64_t C,
                          int64_t F, double eps, int64_t rescale_every, int64_t layer0, int64_t nthreads) {
    const int64_t BC = B * C, R = B * T, RC = R * C;
    const uint64_t t_step = prof_on() ? pool_now_ns() : 0;
    float *buf = malloc(sizeof(float) * (size_t)(7 * RC + R * F));
    if (buf == NULL) return -1;
    float *kx = buf, *vx = kx + RC, *rx = vx + RC, *r = rx + RC, *k = r + RC, *v = k + RC, *y = v + RC;
    float *fk = y + RC;                                        /* [B * T, F] */
    for (int64_t j = 0; j < n_layers; j++) {
        void *const *P = ptrs + j * DECODE_PTRS;
        const int64_t *D = dims + j * DECODE_DIMS;
        ew_job e = {.P = P, .x = x, .kx = kx, .vx = vx, .rx = rx, .r = r, .k = k, .v = v, .y = y, .fk = fk,
                    .a = att_a + j * BC, .b = att_b + j * BC, .p = att_p + j * BC, .C = C, .F = F, .T = T,
                    .eps = eps};

        /* attention: r, k, v = products of the token-shift mixes; x += (sigmoid(r) * wkv) W_o^T */
        e.shift = att_x + j * BC;
        ew_run(&e, EW_LN_ATT, B, nthreads);
        product g3[3] = {decode_product(P, D, M_ATT_R, rx, r), decode_product(P, D, M_ATT_K, kx, k),
                         decode_product(P, D, M_ATT_V, vx, v)};
        if (decode_products(3, g3, P, D, R, nthreads, 0)) { free(buf); return -1; }
        ew_run(&e, EW_WKV, B, nthreads);
        product o = decode_product(P, D, M_ATT_O, y, x);
        if (decode_products(1, &o, P, D, R, nthreads, 1)) { free(buf); return -1; }

        /* channel mix: x += sigmoid(x_r W_r^T) * (relu(x_k W_k^T)^2 W_v^T) */
        e.shift = ffn_x + j * BC;
        ew_run(&e, EW_LN_FFN, B, nthreads);
        product g2[2] = {decode_product(P, D, M_FFN_R, rx, r), decode_product(P, D, M_FFN_K, kx, fk)};
        if (decode_products(2, g2, P, D, R, nthreads, 0)) { free(buf); return -1; }
        ew_run(&e, EW_RELU, B, nthreads);
        product fv = decode_product(P, D, M_FFN_V, fk, v);
        if (decode_products(1, &fv, P, D, R, nthreads, 0)) { free(buf); return -1; }
        ew_run(&e, EW_GATE, B, nthreads);
        if (rescale_every > 0 && (layer0 + j + 1) % rescale_every == 0) {
            uint64_t t0 = prof_on() ? pool_now_ns() : 0;
            for (int64_t i = 0; i < RC; i++) x[i] *= 0.5f;
            if (t0) prof_add(&prof.ew[PROF_EW - 1], (int64_t)(pool_now_ns() - t0));
        }
    }
    free(buf);
    if (t_step) {
        prof_add(&prof.steps, 1);
        prof_add(&prof.step_ns, (int64_t)(pool_now_ns() - t_step));
    }
    return 0;
}

/* One decode step: one token per stream, x [B, C] updated in place. */
int64_t decode_layers(int64_t n_layers, const int64_t *dims, void *const *ptrs, float *x, float *att_x,
                      float *att_a, float *att_b, float *att_p, float *ffn_x, int64_t B, int64_t C, int64_t F,
                      double eps, int64_t rescale_every, int64_t layer0, int64_t nthreads) {
    return run_layers(n_layers, dims, ptrs, x, att_x, att_a, att_b, att_p, ffn_x, B, 1, C, F, eps, rescale_every,
                      layer0, nthreads);
}

/* T tokens per stream (a short prompt chunk, sequence mode), x [B * T, C] updated in place: the same as T
 * decode_layers calls, token by token, with the products of all B * T rows in one job per group. */
int64_t sequence_layers(int64_t n_layers, const int64_t *dims, void *const *ptrs, float *x, float *att_x,
                        float *att_a, float *att_b, float *att_p, float *ffn_x, int64_t B, int64_t T, int64_t C,
                        int64_t F, double eps, int64_t rescale_every, int64_t layer0, int64_t nthreads) {
    return run_layers(n_layers, dims, ptrs, x, att_x, att_a, att_b, att_p, ffn_x, B, T, C, F, eps, rescale_every,
                      layer0, nthreads);
}

/* float32 -> a 16-bit float format and back, as torch rounds (to nearest, ties to even); FMT_F32: x */
static inline float round_to_fmt(float x, int64_t fmt) {
    if (fmt == FMT_F16) return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (fmt == FMT_BF16) {
        uint32_t u;
        memcpy(&u, &x, 4);
        u = (x != x) ? 0x7FC00000u : ((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
        memcpy(&x, &u, 4);
    }
    return x;
}

/* element c of row r of a [*, C] table of a float format, widened exactly */
static inline float table_at(const void *t, int64_t fmt, int64_t i) {
    if (fmt == FMT_F32) return ((const float *)t)[i];
    uint16_t h = ((const uint16_t *)t)[i];
    if (fmt == FMT_F16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int is_float_fmt(int64_t fmt) { return fmt == FMT_F32 || fmt == FMT_F16 || fmt == FMT_BF16; }

/* A whole model's token step (see the top). tokens [B] int64. The embedding, by emb_dims[0]:
 *   0: a table emb_ptrs[0] [V, C] of format emb_dims[1] (FMT_F32, FMT_F16 or FMT_BF16), rows widened;
 *   1: rwkv_engine's lazily normalised table: row = LayerNorm(round(raw row, pack)) with emb_ptrs[1..2]
 *      the weight and bias and emb_eps, rounded to pack (emb_dims[2]) and widened, where the raw table
 *      emb_ptrs[0] [V, C] has format emb_dims[1] (the same arithmetic as the Python lookup: the same
 *      LayerNorm kernel, torch's roundings);
 *   2: x_given [B, C] float32 holds the rows already (a table the caller looks up itself).
 * x_given, when not NULL, is the residual stream (updated in place). ln_w, ln_b [C] the final LayerNorm;
 * head_dims (format code, V, C) and head_ptrs (its DECODE_PARTS parts) the head; logits [B, V] float32.
 * Returns 0; -1 if the scratch memory cannot be allocated; -2 if a token is outside [0, V); -3 if the
 * embedding is not one of the above (nothing is changed for -2 and -3). */
int64_t decode_token(int64_t n_layers, const int64_t *dims, void *const *ptrs, const int64_t *tokens,
                     const int64_t *emb_dims, void *const *emb_ptrs, double emb_eps, float *x_given,
                     const float *ln_w, const float *ln_b, const int64_t *head_dims, void *const *head_ptrs,
                     float *logits, float *att_x, float *att_a, float *att_b, float *att_p, float *ffn_x, int64_t B,
                     int64_t C, int64_t F, double eps, int64_t rescale_every, int64_t layer0, int64_t nthreads) {
    const int64_t V = head_dims[1], mode = emb_dims[0], raw = emb_dims[1], pack = emb_dims[2];
    if (mode < 0 || mode > 2 || (mode < 2 && !is_float_fmt(raw)) || (mode == 1 && !is_float_fmt(pack))
        || (mode == 2 && x_given == NULL))
        return -3;
    for (int64_t b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= V) return -2;
    float *buf = malloc(sizeof(float) * (size_t)((x_given == NULL ? 2 : 1) * B * C));
    if (buf == NULL) return -1;
    float *xn = buf, *x = x_given != NULL ? x_given : buf + B * C;
    for (int64_t b = 0; b < B && mode < 2; b++) {      /* the embedding rows */
        float *xb = x + b * C;
        const int64_t at = tokens[b] * C;
        if (mode == 0) {
            for (int64_t c = 0; c < C; c++) xb[c] = table_at(emb_ptrs[0], raw, at + c);
            continue;
        }
        for (int64_t c = 0; c < C; c++) xn[c] = round_to_fmt(table_at(emb_ptrs[0], raw, at + c), pack);
        ln_shift_mix(xn, (const float *)emb_ptrs[1], (const float *)emb_ptrs[2], emb_eps, xb, 0, NULL, NULL, 1, C);
        for (int64_t c = 0; c < C; c++) xb[c] = round_to_fmt(xb[c], pack);
    }
    int64_t rc = decode_layers(n_layers, dims, ptrs, x, att_x, att_a, att_b, att_p, ffn_x, B, C, F, eps,
                               rescale_every, layer0, nthreads);
    if (rc == 0) {
        ln_shift_mix(x, ln_w, ln_b, eps, xn, 0, NULL, NULL, B, C);
        product h = {.fmt = head_dims[0], .O = V, .I = head_dims[2], .W = head_ptrs[0],
                     .S = (const uint16_t *)head_ptrs[1], .x = xn, .y = logits, .tag = 0};
        rc = run_decode_products(1, &h, &head_ptrs, B, nthreads, 0);
    }
    free(buf);
    return rc;
}

#endif
