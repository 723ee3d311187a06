/* The learned update's per-element passes over one bucket of same-shape tensors, fused.
 *
 * A bucket's step reads every element a few times: once to average the features (pass 0), once
 * per hidden NF-layer to average that layer's output (pass k), and once to compute the update
 * and write the parameters and statistics (the last pass). Each pass recomputes, in blocks that
 * stay in cache, the new statistics, the features and every layer up to the one it needs, so no
 * full-size temporary exists, and nothing is written before the last pass (a gradient found
 * non-finite in pass 0 costs nothing but a repeat of pass 0). What the NF-layers add at small
 * size (pooled, neighbour, global and context terms) arrives as broadcast tensors with strides;
 * the means a pass takes leave in REAL buffers. Rows are shared among OpenMP threads (in a
 * PyTorch process, the runtime PyTorch uses), each summing into its own float64 buffers.
 *
 * The same file is compiled once with REAL=float and once with REAL=double. The arithmetic is
 * that of the PyTorch path (nfopt/optim/rule.py, features.py, nn/layer.py), in the same order
 * where it matters, so results agree to rounding.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#ifndef REAL
#define REAL float
#endif
#ifdef REAL_IS_DOUBLE
#define TANH tanh
#define REAL_TINY DBL_MIN
#define EXP exp
#define SQRT sqrt
#define ERF erf
#else
#define TANH tanh_f
#define REAL_TINY FLT_MIN
#define EXP exp_f
#define SQRT sqrtf
#define ERF erff

/* exp and tanh in float to about an ulp, written so that loops calling them vectorize (libm's
 * do not without -ffast-math). exp: Cephes' polynomial on [-ln2/2, ln2/2] times 2^n. */
static inline __attribute__((always_inline)) float exp_f(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return y * scale.f;
}

/* tanh: its Taylor series below |x| = 0.5 (to x^17: error under 1e-8 there), else
 * 1 - 2 / (1 + exp(2|x|)) with the sign of x (no cancellation there). */
static inline __attribute__((always_inline)) float tanh_f(float x) {
    const float a = x < 0 ? -x : x;
    const float z = x * x;
    float p = 6404582.0f / 10854718875.0f;
    p = p * z - 929569.0f / 638512875.0f;
    p = p * z + 21844.0f / 6081075.0f;
    p = p * z - 1382.0f / 155925.0f;
    p = p * z + 62.0f / 2835.0f;
    p = p * z - 17.0f / 315.0f;
    p = p * z + 2.0f / 15.0f;
    p = p * z - 1.0f / 3.0f;
    const float small = x + x * z * p;
    const float large = 1.0f - 2.0f / (1.0f + exp_f(2.0f * (a > 9.0f ? 9.0f : a)));
    return a < 0.5f ? small : (x < 0 ? -large : large);
}
#endif

#define MAX_LAYERS 4
#define MAX_CHANNELS 32
#define MAX_TERMS 8
#define MAX_ACC 8
#define MAX_MOMENTA 8
#define BLOCK 128
#define MAX_PERIOD 16 /* merged lanes: the longest last dim */

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_TANH = 3 };

typedef struct {
    int64_t n[4];             /* canonical shape, padded in front with ones (a contiguous layout) */
    int64_t lane;             /* the dim taken in vectors; rows run over the others */
    int64_t merged;           /* lanes run over dims 2 and 3 together (lane is 2): short last dims */
    int64_t members, threads;
    int64_t momenta, adam_index, n_layers, mode; /* mode 0: features; k < n_layers: layer k-1's
                                                    output; n_layers: the update */
    int64_t activation, flips;
    int64_t gate;             /* the learned part gated by g = e / (e + F·ref) (see `update`) */
    int64_t width[MAX_LAYERS + 1];
    REAL **p, **g, **m, **v;  /* per member */
    const double *member;     /* per member: ok, bc1, bc2, rate (lr * ok * alpha), weight decay,
                                 the gate's F·ref (set after pass 0), the factor c and offset b of
                                 the signal-to-noise gate's q (with that gate) */
    double rates[MAX_MOMENTA];  /* 1 - decay, per momentum */
    double v_rate, eps, sqrt_floor, rms_eps, beta_over_bound, gamma, bound, limit;
    double snr;               /* κ² of the signal-to-noise gate s = ρ² / (ρ² + κ²); 0 without it */
    const REAL *a[MAX_LAYERS];  /* (members?, out, in); the first layer's for unscaled inputs */
    int64_t a_member_stride[MAX_LAYERS];
    const REAL *constant[MAX_LAYERS]; /* (members, out) or null */
    int64_t n_terms[MAX_LAYERS];
    const REAL *term[MAX_LAYERS][MAX_TERMS];
    int64_t term_stride[MAX_LAYERS][MAX_TERMS][6]; /* member, channel, d0..d3 (0: broadcast; 0 or 1
                                                      along the lane dim) */
    int64_t n_acc;
    double *acc[MAX_ACC];     /* (threads, size) sums over (members, channels, kept dims) */
    int64_t acc_size[MAX_ACC];
    int64_t acc_stride[MAX_ACC][6];
    double acc_scale[MAX_ACC];  /* 1 / elements per mean */
    REAL *mean[MAX_ACC];      /* out: the means, (members, channels, kept dims) */
    double *sumsq;            /* pass 0: (threads, members, channels) squared features */
    double *gsum;             /* pass 0: (threads, members) sums of the gradients */
    REAL *inverse_rms;        /* (members, channels): out in pass 0, which scales its means and the
                                 first layer's weights by it in later passes */
    REAL *finite;             /* out, pass 0: (members,) 1 where the gradient is finite */
    double *rootsq;           /* pass 0 with a gate: (threads, members) sums of sqrt(v̂ + ε)²; out in
                                 the first thread's row */
} Pass;

typedef REAL Block[BLOCK];

#ifdef __AVX512F__
#define VBYTES 64
#else
#define VBYTES 32
#endif
#define VL (VBYTES / (int)sizeof(REAL)) /* lanes of a vector */
typedef REAL Vec __attribute__((vector_size(VBYTES)));
#ifdef REAL_IS_DOUBLE
typedef int64_t Mask __attribute__((vector_size(VBYTES)));
#else
typedef int32_t Mask __attribute__((vector_size(VBYTES)));
#endif

static inline __attribute__((always_inline)) Vec vload(const REAL *p) {
    Vec v;
    memcpy(&v, p, sizeof v);
    return v;
}


/* out <- lerp(x, end, w) over a block, by torch.lerp's formula (one of two, chosen by w) so
 * that the results agree with it. */
static inline void lerp(REAL *restrict out, const REAL *restrict x, const REAL *restrict end, REAL w) {
    if (w < (REAL)0.5) {
        for (int64_t k = 0; k < BLOCK; k++) out[k] = x[k] + w * (end[k] - x[k]);
    } else {
        const REAL rest = (REAL)1 - w;
        for (int64_t k = 0; k < BLOCK; k++) out[k] = end[k] - (end[k] - x[k]) * rest;
    }
}

static inline REAL sign(REAL x) { return (REAL)((x > 0) - (x < 0)); }

/* Every loop over a block runs over all BLOCK lanes (a constant trip count vectorizes without
 * remainder code), but for the layers' channel mixing (most of the work), which stops at the
 * vector that holds a row's last lane; lanes past a row's end hold zeros or what they make (or
 * made in an earlier block), and are never stored or summed. */

/* Where a row at canonical index at = (member, d0..d3) (0 along the lane dim) starts in a
 * broadcast tensor with these strides. */
static inline int64_t offset(const int64_t *at, const int64_t *st) {
    return at[0] * st[0] + at[1] * st[2] + at[2] * st[3] + at[3] * st[4] + at[4] * st[5];
}

/* How a broadcast tensor varies along a row's lanes. */
enum { ALONG_NONE = 0, ALONG_FLAT = 1, ALONG_PERIODIC = 2, ALONG_OTHER = 3 };

static inline int along(const Pass *s, const int64_t *st) {
    if (!s->merged) return st[2 + s->lane] == 0 ? ALONG_NONE : ALONG_FLAT; /* unit stride if any */
    const int64_t n2 = s->n[2], n3 = s->n[3], s2 = st[4], s3 = st[5];
    if (s2 == 0 && s3 == 0) return ALONG_NONE;
    if ((n2 == 1 || s2 == n3) && (n3 == 1 || s3 == 1)) return ALONG_FLAT; /* contiguous over dims 2, 3 */
    if (s2 == 0 && s3 == 1) return ALONG_PERIODIC;                    /* by the index along dim 3 */
    return ALONG_OTHER;
}

/* The sum of h[0..len) (h holds a whole block), vectorized: lanes past len are masked, not
 * left to a scalar remainder loop. */
static inline __attribute__((always_inline)) REAL total(const REAL *restrict h, int64_t len) {
    REAL t = 0;
    if (len == BLOCK) {
#pragma omp simd reduction(+ : t)
        for (int64_t k = 0; k < BLOCK; k++) t += h[k];
    } else {
#pragma omp simd reduction(+ : t)
        for (int64_t k = 0; k < BLOCK; k++) t += k < len ? h[k] : (REAL)0;
    }
    return t;
}

/* A row's sums per channel. A block's horizontal sum would be a chain of dependent scalar adds
 * (the compiler keeps their order), costlier than the rest of a features pass; so blocks add
 * lane by lane into REAL vectors, which are summed across lanes into float64 every SPILL_BLOCKS
 * blocks (so that long rows stay accurate) and at the row's end. */
#define SPILL_BLOCKS 16
typedef struct {
    Vec lanes[MAX_CHANNELS];
    double sum[MAX_CHANNELS];
} RowSums;

static void clear_sums(RowSums *r, int64_t channels) {
    memset(r->lanes, 0, sizeof(Vec) * channels);
    memset(r->sum, 0, sizeof(double) * channels);
}

/* r's channel c += h[0..len) of a block (squared where `squares`), lanes past len masked. */
static inline __attribute__((always_inline)) void add_block(RowSums *restrict r, int64_t c, const REAL *restrict h,
                                                            int64_t len, const int squares) {
    Block masked;
    if (len < BLOCK) {
        for (int64_t k = 0; k < BLOCK; k++) masked[k] = k < len ? h[k] : (REAL)0;
        h = masked;
    }
    Vec t = r->lanes[c];
    for (int64_t kv = 0; kv < BLOCK; kv += VL) {
        const Vec x = vload(h + kv);
        t += squares ? x * x : x;
    }
    r->lanes[c] = t;
}

/* The lanes' sums moved into the float64 sums. */
static void spill(RowSums *r, int64_t channels) {
    for (int64_t c = 0; c < channels; c++) {
        double t = 0;
        for (int k = 0; k < VL; k++) t += (double)r->lanes[c][k];
        r->sum[c] += t;
        r->lanes[c] = (Vec){0};
    }
}

/* sum[0..len) += h[0..len) over a whole block, lanes past len masked (they add zero: `sum`
 * has a block's room). */
static inline __attribute__((always_inline)) void add_lanes(REAL *restrict sum, const REAL *restrict h, int64_t len) {
    if (len == BLOCK)
        for (int64_t k = 0; k < BLOCK; k++) sum[k] += h[k];
    else
        for (int64_t k = 0; k < BLOCK; k++) sum[k] += k < len ? h[k] : (REAL)0;
}

/* A thread's running sums along the lane dim, in REAL, added to its float64 sums every
 * FLUSH_ROWS rows (so that they stay accurate whatever the number of rows). */
#define FLUSH_ROWS 32
typedef struct {
    REAL *sums[MAX_ACC]; /* null for sums that the lanes do not index */
    int64_t lo[MAX_ACC], hi[MAX_ACC]; /* the rows' offsets in channel 0 touched since the last flush */
} Partial;

/* Note that a row at `at` touched its run of `length` sums (per channel) in sum t. */
static inline void touched(const Pass *s, Partial *part, int64_t t, const int64_t *at, int64_t length) {
    const int64_t start = offset(at, s->acc_stride[t]);
    if (start < part->lo[t]) part->lo[t] = start;
    if (start + length > part->hi[t]) part->hi[t] = start + length;
}

/* Whether a pass has sums by position in the period (merged lanes only). */
static int periodic_sums(const Pass *s) {
    for (int64_t t = 0; t < s->n_acc; t++)
        if (along(s, s->acc_stride[t]) == ALONG_PERIODIC) return 1;
    return 0;
}

/* Add channels h[c][0..len) of the block at k0 of the row at `at` to every sum. Sums by
 * position in the period share one sum by lane per channel (`fold`; blocks start at a period's
 * start), folded at the row's end (fold_row). Sums that the lanes do not index take the row's
 * totals per channel (`totals`: from the folded period where there is one, else the blocks'),
 * added to the thread's buffers once at the row's end (end_row): the threads' buffers share
 * cache lines, which per-block writes would keep moving between cores. */
static void accumulate(const Pass *s, Partial *part, const REAL *const *h, int64_t channels, int64_t len,
                       const int64_t *at, int64_t k0, int periodic, RowSums *restrict totals, REAL (*fold)[BLOCK]) {
    int have_totals = periodic;
    if (periodic)
        for (int64_t c = 0; c < channels; c++) add_lanes(fold[c], h[c], len);
    for (int64_t t = 0; t < s->n_acc; t++) {
        const int64_t *st = s->acc_stride[t];
        const int how = along(s, st);
        if (how == ALONG_NONE && !have_totals) {
            for (int64_t c = 0; c < channels; c++) add_block(totals, c, h[c], len, 0);
            have_totals = 1;
        }
        if (how != ALONG_FLAT) continue;
        REAL *base = part->sums[t] + offset(at, st) + k0;
        for (int64_t c = 0; c < channels; c++) add_lanes(base + c * st[1], h[c], len);
    }
}

/* A row's periodic sums by lane (a whole number of periods) halved in place until one period is
 * left, added to every sum by position in the period and (their total) to the row's totals, and
 * cleared. */
static void fold_row(const Pass *s, Partial *part, int64_t channels, const int64_t *at, int64_t blen,
                     RowSums *restrict totals, REAL (*fold)[BLOCK]) {
    const int64_t n3 = s->n[3];
    for (int64_t c = 0; c < channels; c++) {
        REAL *restrict q = fold[c];
        for (int64_t periods = blen / n3; periods > 1;) {
            const int64_t half = periods / 2, kept = periods - half;
            for (int64_t k = 0; k < half * n3; k++) q[k] += q[kept * n3 + k];
            periods = kept;
        }
        for (int64_t t = 0; t < s->n_acc; t++) {
            const int64_t *st = s->acc_stride[t];
            if (along(s, st) != ALONG_PERIODIC) continue;
            REAL *out = part->sums[t] + offset(at, st) + c * st[1];
            for (int64_t d = 0; d < n3; d++) out[d] += q[d];
        }
        totals->sum[c] += total(q, n3);
        memset(q, 0, sizeof(REAL) * BLOCK);
    }
}

/* A row's end: its totals added to the thread's buffers of the sums that the lanes do not
 * index, and its runs of the others (n_lane lanes; a period) noted for the flush. */
static void end_row(const Pass *s, Partial *part, RowSums *totals, int64_t channels, const int64_t *at,
                    int64_t n_lane, int64_t thread) {
    spill(totals, channels);
    for (int64_t t = 0; t < s->n_acc; t++) {
        const int64_t *st = s->acc_stride[t];
        const int how = along(s, st);
        if (how != ALONG_NONE) {
            touched(s, part, t, at, how == ALONG_PERIODIC ? s->n[3] : n_lane);
            continue;
        }
        double *base = s->acc[t] + thread * s->acc_size[t] + offset(at, st);
        for (int64_t c = 0; c < channels; c++) base[c * st[1]] += totals->sum[c];
    }
}

/* The partial sums touched since the last flush (all of them: a flush costs what its rows
 * touched, not the size of the sums), added to the thread's float64 sums and cleared. */
static void flush(const Pass *s, Partial *part, int64_t thread) {
    const int64_t channels = s->width[s->mode];
    for (int64_t t = 0; t < s->n_acc; t++) {
        if (!part->sums[t] || part->lo[t] >= part->hi[t]) continue;
        double *acc = s->acc[t] + thread * s->acc_size[t];
        REAL *sums = part->sums[t];
        const int64_t lo = part->lo[t], hi = part->hi[t], cs = s->acc_stride[t][1];
        /* channel c's run is [lo, hi) + c * cs: one run where those overlap */
        const int64_t runs = hi - lo > cs ? 1 : channels, end = hi - lo > cs ? hi + (channels - 1) * cs : hi;
        for (int64_t c = 0; c < runs; c++)
            for (int64_t i = lo + c * cs; i < end + c * cs; i++) {
                acc[i] += sums[i];
                sums[i] = 0;
            }
        part->lo[t] = INT64_MAX, part->hi[t] = 0;
    }
}

/* Copy src[0..len) (elements `stride` apart) into a block, zeros after. `index` holds
 * k * stride for every lane (an indexed loop vectorizes to gathers). */
static inline void load(REAL *restrict dst, const REAL *restrict src, int64_t len, int64_t stride,
                        const int32_t *restrict index) {
    if (stride == 1 && len == BLOCK) {
        for (int64_t k = 0; k < BLOCK; k++) dst[k] = src[k];
        return;
    }
    if (len == BLOCK) {
        for (int64_t k = 0; k < BLOCK; k++) dst[k] = src[index[k]];
        return;
    }
    if (stride == 1)
        for (int64_t k = 0; k < len; k++) dst[k] = src[k];
    else
        for (int64_t k = 0; k < len; k++) dst[k] = src[k * stride];
    memset(dst + len, 0, sizeof(REAL) * (BLOCK - len));
}

static inline void store(REAL *restrict dst, const REAL *restrict src, int64_t len, int64_t stride,
                         const int32_t *restrict index) {
    if (stride == 1 && len == BLOCK)
        for (int64_t k = 0; k < BLOCK; k++) dst[k] = src[k];
    else if (len == BLOCK)
        for (int64_t k = 0; k < BLOCK; k++) dst[index[k]] = src[k];
    else if (stride == 1)
        for (int64_t k = 0; k < len; k++) dst[k] = src[k];
    else
        for (int64_t k = 0; k < len; k++) dst[k * stride] = src[k];
}

static inline __attribute__((always_inline)) Vec activate_lanes(Vec y, const int act) {
    const Vec zero = {0};
    switch (act) {
    case ACT_RELU:
        return (Vec)((Mask)y & (y > zero));
    case ACT_GELU:
        for (int k = 0; k < VL; k++) y[k] = (REAL)0.5 * y[k] * ((REAL)1 + ERF(y[k] * (REAL)0.70710678118654752440));
        return y;
    case ACT_TANH:
        for (int k = 0; k < VL; k++) y[k] = TANH(y[k]);
        return y;
    default:
        return y;
    }
}

static const REAL zeros[BLOCK];

/* A layer as one row of a bucket sees it: its weights (the member's, padded with zero output
 * channels to a whole group), the constant with every broadcast term that is constant along
 * the row folded in, and the rows of the terms that vary along it (zeros past c_out). */
typedef struct {
    int64_t c_in, c_out, group, n_rows;
    REAL w[MAX_CHANNELS][MAX_CHANNELS]; /* [in][out] */
    REAL c0[MAX_CHANNELS];
    const REAL *rows[MAX_TERMS][MAX_CHANNELS];
    int periodic[MAX_TERMS]; /* rows[t] is its period repeated over a block */
} LayerRow;

static void layer_row(const Pass *s, int64_t l, const int64_t *at, LayerRow *lr, REAL (*pattern)[MAX_CHANNELS][BLOCK]) {
    const int64_t c_in = s->width[l], c_out = s->width[l + 1], n3 = s->n[3];
    const int64_t group = c_out <= 2 ? 2 : (c_out <= 4 ? 4 : 8), padded = (c_out + group - 1) / group * group;
    const REAL *a = s->a[l] + at[0] * s->a_member_stride[l];
    lr->c_in = c_in, lr->c_out = c_out, lr->group = group, lr->n_rows = 0;
    for (int64_t o = 0; o < padded; o++) {
        lr->c0[o] = o < c_out && s->constant[l] ? s->constant[l][at[0] * c_out + o] : (REAL)0;
        for (int64_t i = 0; i < (c_in > 8 ? c_in : 8); i++) lr->w[i][o] = o < c_out && i < c_in ? a[o * c_in + i] : (REAL)0;
    }
    for (int64_t t = 0; t < s->n_terms[l]; t++) {
        const int64_t *st = s->term_stride[l][t];
        const REAL *term = s->term[l][t] + offset(at, st);
        const int how = along(s, st), r = (int)lr->n_rows;
        if (how == ALONG_NONE) {
            for (int64_t o = 0; o < c_out; o++) lr->c0[o] += term[o * st[1]];
            continue;
        }
        lr->periodic[r] = how == ALONG_PERIODIC;
        for (int64_t o = 0; o < padded; o++) {
            if (o >= c_out) {
                lr->rows[r][o] = zeros;
            } else if (how == ALONG_PERIODIC) { /* the period repeated over a block, by doubling */
                REAL *q = pattern[r][o];
                for (int64_t d = 0; d < n3; d++) q[d] = term[o * st[1] + d];
                for (int64_t have = n3; have < BLOCK; have *= 2)
                    memcpy(q + have, q, sizeof(REAL) * (have < BLOCK - have ? have : BLOCK - have));
                lr->rows[r][o] = q;
            } else {
                lr->rows[r][o] = term + o * st[1];
            }
        }
        lr->n_rows++;
    }
}

/* Output channels [o0, o0 + G) on a block, G and the activation constants (so that the G sums
 * stay in registers: independent chains of multiply-adds instead of one long one), and so is
 * the number of input channels where it is CI (those past c_in have zero weights). */
static inline __attribute__((always_inline)) void mix(const int G, const int act, const int CI, const LayerRow *lr, int64_t o0,
                                                      const REAL *rows[][MAX_CHANNELS], int64_t span,
                                                      const REAL *const *in, Block *restrict out) {
    for (int64_t kv = 0; kv < span; kv += VL) {
        Vec y[8];
        for (int g = 0; g < G; g++) y[g] = (Vec){0} + lr->c0[o0 + g];
        for (int64_t t = 0; t < lr->n_rows; t++)
            for (int g = 0; g < G; g++) y[g] += vload(rows[t][o0 + g] + kv);
        const int64_t c_in = CI ? CI : lr->c_in;
        for (int64_t i = 0; i < c_in; i++) {
            const Vec x = vload(in[i] + kv);
            for (int g = 0; g < G; g++) y[g] += lr->w[i][o0 + g] * x;
        }
        for (int g = 0; g < G; g++) {
            const Vec h = activate_lanes(y[g], act);
            memcpy(out[o0 + g] + kv, &h, sizeof h);
        }
    }
}

#define MIX_ACT(G, CI)                                                               \
    switch (act) {                                                                   \
    case ACT_RELU: mix(G, ACT_RELU, CI, lr, o0, rows, span, in, out); break;          \
    case ACT_GELU: mix(G, ACT_GELU, CI, lr, o0, rows, span, in, out); break;          \
    case ACT_TANH: mix(G, ACT_TANH, CI, lr, o0, rows, span, in, out); break;          \
    default: mix(G, ACT_NONE, CI, lr, o0, rows, span, in, out); break;                \
    }
#define MIX(G)                 \
    if (lr->c_in == 7) {       \
        MIX_ACT(G, 7)          \
    } else if (lr->c_in <= 8) {\
        MIX_ACT(G, 8)          \
    } else {                   \
        MIX_ACT(G, 0)          \
    }

/* One NF-layer on a block at k0 of a row of n_lane lanes: out = a·in + constant + broadcast
 * terms, then the activation. Output channels past c_out (up to a whole group) are written with
 * junk. */
static void layer(const LayerRow *lr, const REAL *const *in, Block *restrict out, int64_t len, int64_t k0,
                  int64_t n_lane, int64_t act) {
    const REAL *rows[MAX_TERMS][MAX_CHANNELS]; /* each varying term's lanes of this block */
    Block padded[MAX_TERMS][8];
    const int64_t group = lr->group, span = (len + VL - 1) / VL * VL; /* lanes past it are never read */
    for (int64_t o0 = 0; o0 < lr->c_out; o0 += group) {
        for (int64_t t = 0; t < lr->n_rows; t++)
            for (int64_t g = 0; g < group; g++) {
                const REAL *row = lr->rows[t][o0 + g];
                if (row == zeros)
                    rows[t][o0 + g] = zeros;
                else if (lr->periodic[t])
                    rows[t][o0 + g] = row;
                else if (k0 + span > n_lane) { /* the row ends inside this vector: read only up to there */
                    load(padded[t][g], row + k0, len, 1, NULL);
                    rows[t][o0 + g] = padded[t][g];
                } else
                    rows[t][o0 + g] = row + k0;
            }
        if (group == 2) {
            MIX(2)
        } else if (group == 4) {
            MIX(4)
        } else {
            MIX(8)
        }
    }
}

#ifdef REAL_IS_DOUBLE
#define ENTRY nfopt_pass_f64
#else
#define ENTRY nfopt_pass_f32
#endif

/* One row (member, i0, i1, i2) of a pass. */
/* A thread's blocks: features, two hidden layers (alternating) and the new second moment.
 * Zeroed at the start of each pass: channels a layer reads past its inputs (with zero weights)
 * are never written and must hold finite values. */
typedef struct {
    Block x[MAX_CHANNELS], h0[MAX_CHANNELS], h1[MAX_CHANNELS], v;
    REAL (*fold)[BLOCK];                               /* merged lanes: a row's sums by lane, per channel */
    REAL (*pattern)[MAX_TERMS][MAX_CHANNELS][BLOCK];   /* merged lanes: periodic terms of a row */
} Scratch;

/* The calling thread's scratch, made on its first pass and kept (threads are a pool), its
 * first `channels` blocks of each kind cleared for this pass (the periodic sums are cleared by
 * every row that uses them); null where memory ran out. */
static Scratch *thread_scratch(int64_t merged, int64_t channels) {
    static __thread Scratch *scratch;
    if (!scratch && !(scratch = calloc(1, sizeof(Scratch)))) return NULL;
    memset(scratch->x, 0, channels * sizeof(Block));
    memset(scratch->h0, 0, channels * sizeof(Block));
    memset(scratch->h1, 0, channels * sizeof(Block));
    if (merged) {
        if (!scratch->fold) scratch->fold = calloc(MAX_CHANNELS, sizeof *scratch->fold);
        if (!scratch->pattern) scratch->pattern = malloc(MAX_LAYERS * sizeof *scratch->pattern);
        if (!scratch->fold || !scratch->pattern) return NULL;
    }
    return scratch;
}

/* A block's new parameters: the bounded residual on Adam's direction u, gated per element by
 * `gate` where it is not null, scaled, with decoupled weight decay; y0, y1 are the network's
 * outputs. Its own function: inside `row`, the compiler gives up vectorizing it. */
static inline __attribute__((always_inline)) void update_block(const Pass *s, REAL *restrict out, const REAL *restrict p,
                                                               const REAL *restrict y0, const REAL *restrict y1,
                                                               const REAL *restrict u, const REAL *restrict gate,
                                                               REAL rate, REAL wd, const int gated) {
    const REAL bb = (REAL)s->beta_over_bound, gamma = (REAL)s->gamma, bound = (REAL)s->bound, limit = (REAL)s->limit,
               keep = wd != 0 ? (REAL)1 - rate * wd : (REAL)1;
    const int flips = s->flips != 0;
    for (int64_t k = 0; k < BLOCK; k++) {
        REAL deviation = TANH(y0[k] * bb);
        const REAL c = flips ? y1[k] * sign(u[k]) : y1[k];
        REAL e = gamma * c;
        e = e < -limit ? -limit : (e > limit ? limit : e);
        if (gated) deviation *= gate[k], e *= gate[k];
        const REAL step = (u[k] + bound * deviation) * EXP(e);
        out[k] = (wd != 0 ? p[k] * keep : p[k]) + (-rate) * step;
    }
}

static void update(const Pass *s, REAL *restrict out, const REAL *restrict p, const REAL *restrict y0,
                   const REAL *restrict y1, const REAL *restrict u, const REAL *restrict gate, REAL rate, REAL wd) {
    if (gate)
        update_block(s, out, p, y0, y1, u, gate, rate, wd, 1);
    else
        update_block(s, out, p, y0, y1, u, gate, rate, wd, 0);
}

static void row(const Pass *s, Partial *part, Scratch *w, int64_t r, int64_t thread) {
    const int64_t M = s->momenta, L = s->n_layers, C0 = s->width[0], B = s->members, lane = s->lane;
    const int64_t numel = s->n[0] * s->n[1] * s->n[2] * s->n[3], n_lane = s->merged ? s->n[2] * s->n[3] : s->n[lane];
    const int64_t root = M + 2, dir = M + 3; /* channels: p, g, momenta, sqrt(v̂), u */
    const int last = s->mode == L;
    Block *x = w->x, *h0 = w->h0, *h1 = w->h1;
    const REAL *hp[2][MAX_CHANNELS]; /* the layers' outputs as channel pointers */
    for (int64_t c = 0; c < MAX_CHANNELS; c++) hp[0][c] = h0[c], hp[1][c] = h1[c];
    REAL *restrict v = w->v;
    const REAL *u = x[dir]; /* Adam's direction, as the features hold it */
    const REAL fl = (REAL)s->sqrt_floor, eps = (REAL)s->eps;
    /* the row's member and index along every dim but the lane's; its offset in a member's data */
    int64_t at[5] = {0, 0, 0, 0, 0}, q = 0, stride = 1, ls = 1, rest = r;
    for (int64_t d = 3; d >= 0; d--) {
        if (d == lane || (s->merged && d == 3)) {
            if (d == lane && !s->merged) ls = stride; /* merged lanes are contiguous */
        } else {
            at[1 + d] = rest % s->n[d];
            rest /= s->n[d];
            q += at[1 + d] * stride;
        }
        stride *= s->n[d];
    }
    const int64_t b = at[0] = rest;
    const double *mem = s->member + 8 * b;
    const int ok = mem[0] != 0;
    const REAL bc1 = (REAL)mem[1], bc2 = (REAL)mem[2], rate = (REAL)mem[3], wd = (REAL)mem[4];
    const REAL inv_bc1 = (REAL)1 / bc1, inv_bc2 = (REAL)1 / bc2; /* products, not quotients, per element */
    const REAL ok_r = ok ? (REAL)1 : (REAL)0, v_rate = (REAL)s->v_rate * ok_r;
    const int gated = s->gate != 0, gate_sums = gated && s->mode == 0 && s->flips; /* else from sumsq */
    const REAL root0 = SQRT(fl); /* sqrt(v̂ + ε) where v̂ = 0, rounded alike */
    const REAL floor_ref = (REAL)mem[5] > REAL_TINY ? (REAL)mem[5] : REAL_TINY; /* > 0 where F·ref underflows */
    /* the signal-to-noise gate: ρ = c·m / (sqrt(v̂ + ε) + eps) of the last momentum, q = max(ρ² - b, 0),
       s = q / (q + κ²), κ² at least the smallest normal number (never 0/0) */
    const int snr = s->snr > 0 && last;
    const REAL kappa2 = (REAL)s->snr > REAL_TINY ? (REAL)s->snr : REAL_TINY, snr_c = (REAL)mem[6], snr_b = (REAL)mem[7];
    Block gate;
    REAL *P = s->p[b] + q, *G = s->g[b] + q, *Mm = s->m[b] + q, *V = s->v[b] + q;
    int32_t index[BLOCK];
    for (int64_t k = 0; k < BLOCK; k++) index[k] = (int32_t)(k * ls);
    RowSums totals, sumsq, gsum, rootsq; /* sumsq: of the features; gsum: of the gradient; rootsq:
                                            of sqrt(v̂ + ε) before flips, for the gate */
    clear_sums(&totals, s->width[s->mode]);
    if (s->mode == 0) clear_sums(&sumsq, C0), clear_sums(&gsum, 1);
    if (gate_sums) clear_sums(&rootsq, 1);
    LayerRow layers[MAX_LAYERS];
    for (int64_t l = 0; l < L && l < s->mode; l++) layer_row(s, l, at, &layers[l], s->merged ? w->pattern[l] : NULL);
    /* merged lanes: blocks of whole periods, so that every block starts at a period's start */
    const int64_t blen = s->merged ? BLOCK / s->n[3] * s->n[3] : BLOCK;
    const int periodic = s->merged && !last && periodic_sums(s);
    for (int64_t k0 = 0; k0 < n_lane; k0 += blen) {
        if (!last && k0 && k0 / blen % SPILL_BLOCKS == 0) {
            spill(&totals, s->width[s->mode]);
            if (s->mode == 0) spill(&sumsq, C0), spill(&gsum, 1);
            if (gate_sums) spill(&rootsq, 1);
        }
        const int64_t len = n_lane - k0 < blen ? n_lane - k0 : blen, e = k0 * ls;
        /* features: p, g, the new momenta, sqrt(v̂), u; p and g read where they are if they can
           be (unit stride, a whole block inside the member's tensor: lanes past the row's end
           then hold the next row's values, which are never stored or summed), else copied */
        const int direct = ls == 1 && q + e + BLOCK <= numel;
        const REAL *xin[MAX_CHANNELS];
        for (int64_t c = 0; c < MAX_CHANNELS; c++) xin[c] = x[c];
        Block from;
        if (direct)
            xin[0] = P + e;
        else
            load(x[0], P + e, len, ls, index);
        if (!ok)
            memset(x[1], 0, sizeof(Block));
        else if (direct)
            xin[1] = G + e;
        else
            load(x[1], G + e, len, ls, index);
        const REAL *restrict g = xin[1];
        if (s->mode == 0) add_block(&gsum, 0, g, len, 0);
        for (int64_t j = 0; j < M; j++) {
            const REAL *old = Mm + j * numel + e;
            if (!direct) load(from, old, len, ls, index);
            lerp(x[2 + j], direct ? old : from, g, (REAL)s->rates[j] * ok_r);
        }
        if (!direct) load(from, V + e, len, ls, index);
        Block g2;
        for (int64_t k = 0; k < BLOCK; k++) g2[k] = g[k] * g[k];
        lerp(v, direct ? V + e : from, g2, v_rate);
        for (int64_t k = 0; k < BLOCK; k++) {
            x[root][k] = SQRT(v[k] * inv_bc2 + fl);
            x[dir][k] = x[2 + s->adam_index][k] * inv_bc1 / (x[root][k] + eps);
        }
        if (gate_sums) add_block(&rootsq, 0, x[root], len, 1);
        if (gated && last)
            for (int64_t k = 0; k < BLOCK; k++) {
                const REAL e = x[root][k] - root0;
                gate[k] = e / (e + floor_ref);
            }
        if (snr) /* per element: 2 multiplies, 3 adds, 2 divides, 1 max (and 1 multiply with the floor's gate) */
            for (int64_t k = 0; k < BLOCK; k++) {
                const REAL rho = x[1 + M][k] * snr_c / (x[root][k] + eps), excess = rho * rho - snr_b;
                const REAL q = excess > 0 ? excess : 0, f = q / (q + kappa2);
                gate[k] = gated ? gate[k] * f : f;
            }
        if (s->flips)
            for (int64_t k = 0; k < BLOCK; k++) x[root][k] *= sign(u[k]);
        if (s->mode == 0) {
            for (int64_t c = 0; c < C0; c++) add_block(&sumsq, c, xin[c], len, 1);
            accumulate(s, part, xin, C0, len, at, k0, periodic, &totals, w->fold);
            continue;
        }
        /* layers, up to the one this pass needs */
        const REAL *const *in = xin;
        for (int64_t l = 0; l < L && l < s->mode; l++) {
            layer(&layers[l], in, l % 2 == 0 ? h0 : h1, len, k0, n_lane, l < L - 1 ? s->activation : ACT_NONE);
            in = hp[l % 2];
        }
        if (!last) {
            accumulate(s, part, in, s->width[s->mode], len, at, k0, periodic, &totals, w->fold);
            continue;
        }
        /* the update, then the statistics */
        Block out;
        update(s, out, xin[0], in[0], in[1], u, gated || snr ? gate : NULL, rate, wd);
        store(P + e, out, len, ls, index);
        for (int64_t j = 0; j < M; j++) store(Mm + j * numel + e, x[2 + j], len, ls, index);
        store(V + e, v, len, ls, index);
    }
    if (last) return;
    if (periodic) fold_row(s, part, s->width[s->mode], at, blen, &totals, w->fold);
    end_row(s, part, &totals, s->width[s->mode], at, n_lane, thread);
    if (s->mode == 0) {
        spill(&gsum, 1), spill(&sumsq, C0);
        s->gsum[thread * B + b] += gsum.sum[0];
        for (int64_t c = 0; c < C0; c++) s->sumsq[(thread * B + b) * C0 + c] += sumsq.sum[c];
    }
    if (gate_sums) spill(&rootsq, 1), s->rootsq[thread * B + b] += rootsq.sum[0];
}

/* Sum the threads' buffers into the first, in thread order (the same result for any schedule). */
static void reduce(double *buffer, int64_t size, int64_t threads) {
    for (int64_t t = 1; t < threads; t++)
        for (int64_t i = 0; i < size; i++) buffer[i] += buffer[t * size + i];
}

/* One pass over all rows of the bucket. Returns 0, 1 for a pass it cannot take (more channels,
 * layers or momenta than it is compiled for), or 2 where pass 0 found a non-finite gradient
 * (see `finite`), 3 where memory ran out. */
static int run(const Pass *s) {
    const int64_t M = s->momenta, L = s->n_layers, C0 = s->width[0], B = s->members, T = s->threads;
    if (C0 > MAX_CHANNELS || M > MAX_MOMENTA || L > MAX_LAYERS || L < 1 || C0 != M + 4 || T < 1) return 1;
    if (s->n_acc > MAX_ACC || s->mode < 0 || s->mode > L) return 1;
    for (int64_t l = 0; l <= L; l++)
        if (s->width[l] > MAX_CHANNELS || (l < L && s->n_terms[l] > MAX_TERMS)) return 1;
    for (int64_t t = 0; t < s->n_acc; t++) memset(s->acc[t], 0, sizeof(double) * s->acc_size[t] * T);
    if (s->mode == 0) {
        memset(s->sumsq, 0, sizeof(double) * T * B * C0);
        memset(s->gsum, 0, sizeof(double) * T * B);
        if (s->gate) memset(s->rootsq, 0, sizeof(double) * T * B);
    }
    if (s->lane < 0 || s->lane > 3 || (s->merged && (s->lane != 2 || s->n[3] > MAX_PERIOD))) return 1;
    const int64_t per_row = s->merged ? s->n[2] * s->n[3] : s->n[s->lane];
    const int64_t rows = per_row ? B * s->n[0] * s->n[1] * s->n[2] * s->n[3] / per_row : 0;
    for (int64_t t = 0; t < s->n_acc; t++)
        if (along(s, s->acc_stride[t]) == ALONG_OTHER) return 1;
    for (int64_t l = 0; l < L; l++)
        for (int64_t t = 0; t < s->n_terms[l]; t++)
            if (along(s, s->term_stride[l][t]) == ALONG_OTHER) return 1;
    int64_t readable = 8; /* blocks a layer may read: its inputs, padded to 8 */
    for (int64_t l = 0; l <= L; l++)
        if ((s->width[l] + 7) / 8 * 8 > readable) readable = (s->width[l] + 7) / 8 * 8;
    int failed = 0;
#pragma omp parallel num_threads(T) if (T > 1) reduction(| : failed)
    {
        const int64_t thread = omp_get_thread_num();
        Partial part = {0};
        for (int64_t t = 0; t < MAX_ACC; t++) part.lo[t] = INT64_MAX;
        for (int64_t t = 0; t < s->n_acc; t++)
            if (along(s, s->acc_stride[t]) != ALONG_NONE) {
                part.sums[t] = calloc(s->acc_size[t] + BLOCK, sizeof(REAL)); /* room for a block's lanes */
                failed |= part.sums[t] == NULL;
            }
        Scratch *scratch = thread_scratch(s->merged, readable);
        failed |= scratch == NULL;
        int64_t since = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            row(s, &part, scratch, r, thread);
            if (++since == FLUSH_ROWS) {
                flush(s, &part, thread);
                since = 0;
            }
        }
        if (!failed) flush(s, &part, thread);
        for (int64_t t = 0; t < s->n_acc; t++) free(part.sums[t]);
    }
    if (failed) return 3;
    int all = 1;
    if (s->mode == 0) {
        reduce(s->sumsq, B * C0, T);
        reduce(s->gsum, B, T);
        if (s->gate) {
            if (s->flips)
                reduce(s->rootsq, B, T);
            else /* sqrt(v̂ + ε) is a feature that does not flip: its squares are summed already */
                for (int64_t b = 0; b < B; b++) s->rootsq[b] = s->sumsq[b * C0 + M + 2];
        }
        const double n = (double)(s->n[0] * s->n[1] * s->n[2] * s->n[3]);
        for (int64_t b = 0; b < B; b++) {
            for (int64_t c = 0; c < C0; c++)
                s->inverse_rms[b * C0 + c] = (REAL)(1.0 / sqrt(s->sumsq[b * C0 + c] / n + s->rms_eps));
            s->finite[b] = isfinite(s->gsum[b]) ? (REAL)1 : (REAL)0;
            all &= isfinite(s->gsum[b]) != 0;
        }
    }
    /* the means; pass 0's of the features as the first layer reads them, scaled by their inverse
       RMS (a mean is (members, channels, the rest) in memory: the lanes' dim is moved among the rest) */
    const int64_t channels = s->width[s->mode];
    for (int64_t t = 0; t < s->n_acc; t++) {
        reduce(s->acc[t], s->acc_size[t], T);
        const int64_t rest = s->acc_size[t] / (B * channels);
        for (int64_t bc = 0; bc < B * channels; bc++) {
            const double scale = s->acc_scale[t] * (s->mode == 0 ? (double)s->inverse_rms[bc] : 1.0);
            for (int64_t i = bc * rest; i < (bc + 1) * rest; i++) s->mean[t][i] = (REAL)(s->acc[t][i] * scale);
        }
    }
    return all ? 0 : 2;
}

/* One pass over all rows of the bucket (see `run`); later passes take the first layer's weights
 * scaled per member by pass 0's inverse RMS of its inputs. */
int ENTRY(const Pass *s) {
    if (s->mode == 0 || s->n_layers < 1) return run(s);
    const int64_t B = s->members, c_in = s->width[0], c_out = s->width[1];
    REAL *a = malloc(sizeof(REAL) * B * c_out * c_in);
    if (!a) return 3;
    for (int64_t b = 0; b < B; b++)
        for (int64_t o = 0; o < c_out; o++)
            for (int64_t i = 0; i < c_in; i++)
                a[(b * c_out + o) * c_in + i] = s->a[0][b * s->a_member_stride[0] + o * c_in + i] * s->inverse_rms[b * c_in + i];
    Pass scaled = *s;
    scaled.a[0] = a, scaled.a_member_stride[0] = c_out * c_in;
    const int code = run(&scaled);
    free(a);
    return code;
}
