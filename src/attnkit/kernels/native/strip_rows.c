/* Row statistics of one strip of attention scores, fused: attnkit's native CPU helper.
 *
 * attnkit.kernels.stats.strip_forward scores a strip of query rows against every key the rows
 * may see (one BLAS matmul), then calls strip_rows_f32 once per strip. For each row of
 * s (R x W, fp32, -inf where masked) it computes, in passes over the row while the row sits in
 * cache:
 *
 *   m    = max_j s_j                                  (pass 1)
 *   e_j  = exp(s_j - m),  z = sum_j e_j,              (pass 2, e_j overwrites s_j)
 *   u    = sum_j e_j (s_j - m),  lane maxima of e
 *   p_j  = e_j / z                                    (pass 3, in registers; s keeps e)
 *   lse  = m + log z,  scale = 1 / z                  (the caller mixes values by e, then scales)
 *   entropy = -sum_j p_j log p_j = log z - u / z      (log p_j = s_j - m - log z)
 *   mean distance = sum_j p_j |i' - j|                (i' the row's aligned position; pass 3)
 *   band[seg(row)]_j += p_j                           (the row's query segment; pass 3)
 *   top-k: the k largest p_j, largest first, ties to the smaller j     (candidates noted in
 *          pass 3: p_j >= tau, a threshold from the lane maxima)
 *
 * and, once its rows are done, reduces the bands (few rows: one per query segment) into the
 * column sums (the attention each key receives) and the pooled cells (band sums over each key
 * segment). Pass 2 keeps LANES running sums and maxima, lane l holding keys j = l (mod LANES),
 * so the loop needs no horizontal reduction until the row ends, and fp32 sums stay short.
 * Pass 3 only reads the strip: leaving e in place (the weights times z) spares writing the strip
 * back, a pass over memory on long rows, and the caller's e @ v times 1 / z costs bq x Dv.
 *
 * A row with no allowed key (m = -inf) gets e = 0, scale = 0, lse = -inf, entropy = distance = 0 and top-k
 * weights 0. The Python side (kernels/native/__init__.py) compiles this file with the system's C
 * compiler on first use, runs row ranges on PyTorch's thread count, and falls back to PyTorch
 * operations when it cannot build it.
 *
 * exp: exp(t) for t <= 0 as 2^n * e^r, n = round(t / ln 2), |r| <= ln(2) / 2, e^r by its Taylor
 * series to degree 7 (truncation below 6e-9 relative, under a tenth of fp32's unit roundoff), so
 * the loops vectorise without a vector math library. Results below fp32's smallest normal
 * (t < -87.3) are 0, as they are negligible against z >= 1.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define LN2_HI 0.693145751953125f        /* ln 2 split in two so n * LN2_HI is exact */
#define LN2_LO 1.428606765330187e-06f
#define LOG2E 1.4426950408889634f
#define EXP_FLOOR (-87.33654475f)        /* ln(FLT_MIN): below it the result is 0 */

static inline float exp_nonpositive(float t) {
    float x = t < EXP_FLOOR ? EXP_FLOOR : t;           /* also maps -inf to the floor */
    float n = nearbyintf(x * LOG2E);
    float r = (x - n * LN2_HI) - n * LN2_LO;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;                  /* 2^n, n in [-126, 0] */
    return t < EXP_FLOOR ? 0.0f : p * scale.f;
}

/* Insert (w, j) into the descending list (top_w, top_i) of length k if w beats its last entry. */
static inline void topk_insert(float w, int64_t j, float *top_w, int64_t *top_i, int64_t k) {
    if (!(w > top_w[k - 1])) return;
    int64_t pos = k - 1;
    while (pos > 0 && w > top_w[pos - 1]) {
        top_w[pos] = top_w[pos - 1];
        top_i[pos] = top_i[pos - 1];
        pos--;
    }
    top_w[pos] = w;
    top_i[pos] = j;
}

#define LANES 64  /* running sums and maxima per row in pass 2; also the top-k screen's groups */
#define MAX_K 64  /* k <= LANES: the Python side sends larger k to PyTorch's topk */

/* The k-th largest of a[0..n) (1 <= k <= n), by Hoare's selection; reorders a. */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {  /* descending: larger values to the left */
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                float t = a[i]; a[i] = a[j]; a[j] = t;
                i++;
                j--;
            }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else break;  /* between j and i every value equals the pivot */
    }
    return a[target];
}

/* The screen of the top-k: lane l holds the keys j = l (mod LANES) and lane_max[l] their largest
 * weight. The k lanes with the largest maxima hold k entries >= tau, the k-th largest lane
 * maximum, so every entry of the top k is >= tau: one comparison per entry drops the rest. */
static float topk_threshold(float *lane_max, int64_t k) {
    return kth_largest(lane_max, LANES, k);  /* reorders lane_max; lanes past W hold 0 */
}

static void topk_start(int64_t k, float *top_w, int64_t *top_i) {
    for (int64_t t = 0; t < k; t++) {
        top_w[t] = -1.0f;  /* below every weight: the first k candidates fill the list */
        top_i[t] = t;
    }
}

/* Fewer than k positive weights: the rest of the list are zeros, at the smallest indices holding one. */
static void topk_finish(const float *e, float inv, int64_t W, int64_t k, float *top_w, int64_t *top_i) {
    int64_t t = 0;
    while (t < k && top_w[t] >= 0.0f) t++;
    for (int64_t j = 0; t < k && j < W; j++)
        if (e[j] * inv == 0.0f) {
            top_w[t] = 0.0f;
            top_i[t] = j;
            t++;
        }
}

#define MAX_HITS 256  /* vectors of 8 holding a top-k candidate, noted in pass 3; more: a rescan */

/* One row: e = exp(s - m) in place of s (p with store), its statistics, and its weights added to
 * its band row.
 * The row sees keys [a, b) only (causal/window, 0 <= a, b <= W): entries outside are ignored
 * (whatever they hold) and set to e = 0, which is what masking them to -inf would give. */
static void one_row(float *row, int64_t W, int64_t a, int64_t b, float row_pos, int64_t k, float *lse, float *scale,
                    float *entropy, float *distance, float *top_w, int64_t *top_i, float *band, int store) {
    if (b < a) b = a;
    memset(row, 0, (size_t)a * sizeof(float));
    memset(row + b, 0, (size_t)(W - b) * sizeof(float));
    float *s = row + a;  /* the visible keys: strip-local index a + j */
    int64_t full_w = W;
    W = b - a;
    band += a;
    row_pos -= (float)a;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < W; j++) m = s[j] > m ? s[j] : m;
    for (int64_t t = 0; t < k; t++) {
        top_w[t] = 0.0f;
        top_i[t] = t;
    }
    if (m == -INFINITY) {  /* no allowed key: weights 0, nothing added to the band */
        memset(s, 0, (size_t)W * sizeof(float));
        *lse = -INFINITY;
        *scale = 0.0f;
        *entropy = 0.0f;
        *distance = 0.0f;
        return;
    }
    /* pass 2: exponentials, with per-lane sums of e and e (s - m) and per-lane maxima of e */
    float zl[LANES], ul[LANES], ml[LANES];
    for (int l = 0; l < LANES; l++) zl[l] = ul[l] = ml[l] = 0.0f;
    int64_t full = W / LANES * LANES;
    for (int64_t j0 = 0; j0 < full; j0 += LANES) {
        float *x = s + j0;
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            float t = x[l] - m;
            float e = exp_nonpositive(t);
            zl[l] += e;
            ul[l] += e == 0.0f ? 0.0f : e * t;           /* 0 * -inf would be NaN */
            ml[l] = e > ml[l] ? e : ml[l];
            x[l] = e;
        }
    }
    for (int64_t j = full; j < W; j++) {
        int l = (int)(j - full);
        float t = s[j] - m;
        float e = exp_nonpositive(t);
        zl[l] += e;
        ul[l] += e == 0.0f ? 0.0f : e * t;
        ml[l] = e > ml[l] ? e : ml[l];
        s[j] = e;
    }
    double z_sum = 0.0, u_sum = 0.0;
    for (int l = 0; l < LANES; l++) {
        z_sum += zl[l];
        u_sum += ul[l];
    }
    float z = (float)z_sum, u = (float)u_sum;
    /* pass 3: weights, mean distance, the band; the top-k candidates (p >= tau, p > 0) noted on the way */
    float inv = 1.0f / z, d = 0.0f;
    float tau = INFINITY;  /* k = 0: no candidate */
    if (k > 0) {  /* lane maxima of p: x -> x * inv is monotone, so max(e) * inv = max(e * inv) */
        for (int l = 0; l < LANES; l++) ml[l] *= inv;
        tau = topk_threshold(ml, k);
    }
    int64_t j = 0, hits = 0;
    int64_t hit_at[MAX_HITS];
    unsigned hit_bits[MAX_HITS];
#if defined(__AVX2__)
    {
        const __m256 vinv = _mm256_set1_ps(inv), vtau = _mm256_set1_ps(tau), zero = _mm256_setzero_ps();
        const __m256 vpos = _mm256_set1_ps(row_pos), eight = _mm256_set1_ps(8.0f);
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 vj = _mm256_setr_ps(0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f), vd = zero;
        for (; j + 8 <= W; j += 8) {
            __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), vinv);
            if (store) _mm256_storeu_ps(s + j, x);
            _mm256_storeu_ps(band + j, _mm256_add_ps(_mm256_loadu_ps(band + j), x));
            __m256 dist = _mm256_andnot_ps(sign, _mm256_sub_ps(vpos, vj));  /* |i' - j|, exact below 2^24 */
            vd = _mm256_add_ps(vd, _mm256_mul_ps(x, dist));
            vj = _mm256_add_ps(vj, eight);
            unsigned bits = (unsigned)_mm256_movemask_ps(
                _mm256_and_ps(_mm256_cmp_ps(x, vtau, _CMP_GE_OQ), _mm256_cmp_ps(x, zero, _CMP_GT_OQ)));
            if (bits) {
                if (hits < MAX_HITS) {
                    hit_at[hits] = j;
                    hit_bits[hits] = bits;
                }
                hits++;
            }
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, vd);
        for (int l = 0; l < 8; l++) d += lanes[l];
    }
#endif
    for (; j < W; j++) {  /* the tail (all of the row without AVX2) */
        float p = s[j] * inv;
        if (store) s[j] = p;
        band[j] += p;
        d += p * fabsf(row_pos - (float)j);
        if (p >= tau && p > 0.0f) {
            if (hits < MAX_HITS) {
                hit_at[hits] = j;
                hit_bits[hits] = 1u;
            }
            hits++;
        }
    }
    float log_z = logf(z);
    *lse = m + log_z;
    *scale = store ? 1.0f : inv;  /* s holds p itself when stored */
    float to_p = store ? 1.0f : inv;  /* p_j = s_j * to_p from here on */
    float h = log_z - u * inv;
    *entropy = h > 0.0f ? h : 0.0f;
    *distance = d;
    if (k == 0) return;
    topk_start(k, top_w, top_i);
    if (hits > MAX_HITS) {  /* a flat row: many candidates, scanned again */
        for (int64_t jj = 0; jj < W; jj++) {
            float p = s[jj] * to_p;
            if (p >= tau && p > 0.0f) topk_insert(p, a + jj, top_w, top_i, k);
        }
    } else {
        for (int64_t h_ = 0; h_ < hits; h_++)  /* in key order, as the scan would take them */
            for (unsigned bits = hit_bits[h_]; bits; bits &= bits - 1) {
                int64_t jj = hit_at[h_] + __builtin_ctz(bits);
                topk_insert(s[jj] * to_p, a + jj, top_w, top_i, k);
            }
    }
    topk_finish(row, to_p, full_w, k, top_w, top_i);  /* zeros from the whole row, masked keys included */
}

/* Rows [r_begin, r_end) of s (R x W, row-major), overwritten by e = exp(s - m) (the weights
 * times z). Row r is query i = r % rows_per_head of strip g = r / rows_per_head; its aligned
 * position, counted from the strip's first key, is row_pos0 + i, row_seg[i] (0 <= row_seg[i] < nr)
 * its query segment and [key_lo[i], key_hi[i]) (within [0, W]) the keys causal/window let it see:
 * the others are treated as masked whatever s holds there. Outputs at row r: lse[r], scale[r] (1 / z: p = e * scale), entropy[r],
 * distance[r], top_w[r * k ...] and top_i[r * k ...] (key indices from the strip's first key).
 * For the strips g the rows touch: colsum[g * W + j] = sum over those rows of p_j, and
 * cells[(g * nr + a) * nc + c] = sum of p over those rows in query segment a and keys in
 * [key_edges[c], key_edges[c + 1]) (0 = key_edges[0] < ... < key_edges[nc] = W); band
 * (G x nr x W) is scratch, unused when nc = W. With cells NULL no sums are taken (colsum unused)
 * and band needs only W floats; s then gets the weights p themselves (normalised in place,
 * scale = 1), for a caller that sums them. Requires 0 <= k <= min(MAX_K, W). Returns 0, or -1 (writing nothing)
 * when an argument is out of range. The caller runs disjoint row ranges on several threads, each
 * with its own band, colsum and cells (no lock, no global state). */
int strip_rows_f32(float *s, int64_t r_begin, int64_t r_end, int64_t W, int64_t rows_per_head, int64_t row_pos0,
                   const int64_t *key_lo, const int64_t *key_hi, int64_t k, float *lse, float *scale, float *entropy, float *distance, float *top_w, int64_t *top_i,
                   const int64_t *row_seg, int64_t nr, const int64_t *key_edges, int64_t nc, float *band,
                   float *colsum, float *cells) {
    if (W < 1 || rows_per_head < 1 || k < 0 || k > MAX_K || k > W || nr < 1 || nc < 1 || r_begin < 0 ||
        r_end < r_begin)
        return -1;
    if (key_edges[0] != 0 || key_edges[nc] != W) return -1;
    for (int64_t c = 0; c < nc; c++)
        if (key_edges[c + 1] <= key_edges[c]) return -1;
    for (int64_t i = 0; i < rows_per_head; i++)
        if (row_seg[i] < 0 || row_seg[i] >= nr || key_lo[i] < 0 || key_hi[i] > W || key_hi[i] < key_lo[i]) return -1;
    if (r_end == r_begin) return 0;
    int64_t g0 = r_begin / rows_per_head, g1 = (r_end - 1) / rows_per_head + 1;  /* strips touched */
    if (cells == NULL) {  /* no sums: every row adds into one scratch row of band (W floats) */
        for (int64_t r = r_begin; r < r_end; r++) {
            int64_t i = r % rows_per_head;
            one_row(s + r * W, W, key_lo[i], key_hi[i], (float)(row_pos0 + i), k, lse + r, scale + r, entropy + r,
                    distance + r, top_w + r * k, top_i + r * k, band, 1);
        }
        return 0;
    }
    /* A segment per key (nc = W): the bands are the cells, summed in place. */
    float *bands = nc == W ? cells : band;
    memset(bands + g0 * nr * W, 0, (size_t)((g1 - g0) * nr * W) * sizeof(float));
    for (int64_t r = r_begin; r < r_end; r++) {
        int64_t g = r / rows_per_head, i = r % rows_per_head;
        one_row(s + r * W, W, key_lo[i], key_hi[i], (float)(row_pos0 + i), k, lse + r, scale + r, entropy + r,
                distance + r, top_w + r * k, top_i + r * k, bands + (g * nr + row_seg[i]) * W, 0);
    }
    for (int64_t g = g0; g < g1; g++) {
        float *col = colsum + g * W;
        memset(col, 0, (size_t)W * sizeof(float));
        for (int64_t a = 0; a < nr; a++) {
            const float *b = bands + (g * nr + a) * W;
#pragma omp simd
            for (int64_t j = 0; j < W; j++) col[j] += b[j];
            if (nc == W) continue;
            for (int64_t c = 0; c < nc; c++) {
                float cs = 0.0f;
#pragma omp simd reduction(+ : cs)
                for (int64_t j = key_edges[c]; j < key_edges[c + 1]; j++) cs += b[j];
                cells[(g * nr + a) * nc + c] = cs;
            }
        }
    }
    return 0;
}
