/* Row statistics of one strip of attention scores, fused: attnkit's native CPU helper.
 *
 * attnkit.kernels.stats.strip_forward scores a strip of query rows against every key the rows
 * may see (one BLAS matmul), then calls strip_rows_f32 once per strip. For each row of
 * s (R x W, fp32, -inf where masked) it computes, in three passes over the row while the row
 * sits in cache:
 *
 *   m    = max_j s_j                                  (pass 1)
 *   e_j  = exp(s_j - m),  z = sum_j e_j,              (pass 2, e_j overwrites s_j)
 *   u    = sum_j e_j (s_j - m)
 *   p_j  = e_j / z                                    (pass 3, p_j overwrites e_j)
 *   lse  = m + log z
 *   entropy = -sum_j p_j log p_j = log z - u / z      (log p_j = s_j - m - log z)
 *   mean distance = sum_j p_j |i' - j|                (i' the row's aligned position)
 *   top-k: the k largest p_j, largest first, ties to the smaller j     (a screen by chunk maxima)
 *
 * A row with no allowed key (m = -inf) gets p = 0, lse = -inf, entropy = distance = 0 and top-k
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

#define TOPK_CHUNK 64  /* keys per chunk of the top-k screen (halved for short rows) */
#define MAX_K 64       /* the Python side sends larger k to PyTorch's topk */

#define MAX_CHUNKS 8192  /* chunk maxima kept on the stack (rows up to 512K keys); longer rows skip the screen */

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

/* The k largest entries of p (W >= k entries, all >= 0), largest first, ties to the smaller index.
 *
 * Screen: cut the row into chunks of TOPK_CHUNK keys (fewer on short rows). The k chunks with the
 * largest maxima hold k entries >= tau, the k-th largest chunk maximum, so every entry of the top k
 * is >= tau: chunks whose maximum is below tau are skipped whole, and in the others entries below
 * tau are dropped by one comparison. Weights of 0 (masked keys) enter only when fewer than k
 * entries are positive, at the smallest such indices. */
static void row_topk(const float *p, int64_t W, int64_t k, float *top_w, int64_t *top_i) {
    int64_t chunk = TOPK_CHUNK;
    while (chunk > 4 && W < 2 * k * chunk) chunk /= 2;  /* short rows: smaller chunks, at least 2k of them */
    int64_t n = (W + chunk - 1) / chunk;
    float cmax[MAX_CHUNKS], sel[MAX_CHUNKS];
    float tau = 0.0f;
    int screened = n >= k && n <= MAX_CHUNKS;
    if (screened) {
        for (int64_t c = 0; c < n; c++) {
            int64_t j0 = c * chunk, j1 = j0 + chunk < W ? j0 + chunk : W;
            float cm = 0.0f;
#pragma omp simd reduction(max : cm)
            for (int64_t j = j0; j < j1; j++) cm = p[j] > cm ? p[j] : cm;
            cmax[c] = cm;
            sel[c] = cm;
        }
        tau = kth_largest(sel, n, k);
    }
    for (int64_t t = 0; t < k; t++) {
        top_w[t] = -1.0f;  /* below every weight: the first k candidates fill the list */
        top_i[t] = t;
    }
    for (int64_t c = 0; c < n; c++) {  /* in key order, so equal weights keep the smaller index */
        if (screened && (cmax[c] < tau || cmax[c] == 0.0f)) continue;
        int64_t j0 = c * chunk, j1 = j0 + chunk < W ? j0 + chunk : W;
        int64_t j = j0;
#if defined(__AVX2__)
        /* eight comparisons at a time; only positive entries at or above tau go to the list */
        __m256 vtau = _mm256_set1_ps(tau), zero = _mm256_setzero_ps();
        for (; j + 8 <= j1; j += 8) {
            __m256 x = _mm256_loadu_ps(p + j);
            unsigned bits = (unsigned)_mm256_movemask_ps(
                _mm256_and_ps(_mm256_cmp_ps(x, vtau, _CMP_GE_OQ), _mm256_cmp_ps(x, zero, _CMP_GT_OQ)));
            while (bits) {
                int b = __builtin_ctz(bits);
                topk_insert(p[j + b], j + b, top_w, top_i, k);
                bits &= bits - 1;
            }
        }
#endif
        for (; j < j1; j++)
            if (p[j] >= tau && p[j] > 0.0f) topk_insert(p[j], j, top_w, top_i, k);
    }
    /* fewer than k positive weights: the rest are zeros, at the smallest indices holding one */
    int64_t t = 0;
    while (t < k && top_w[t] >= 0.0f) t++;
    for (int64_t j = 0; t < k && j < W; j++)
        if (p[j] == 0.0f) {
            top_w[t] = 0.0f;
            top_i[t] = j;
            t++;
        }
}

static void one_row(float *s, int64_t W, float row_pos, int64_t k, float *lse, float *entropy,
                    float *distance, float *top_w, int64_t *top_i) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < W; j++) m = s[j] > m ? s[j] : m;
    for (int64_t t = 0; t < k; t++) {
        top_w[t] = 0.0f;
        top_i[t] = t;
    }
    if (m == -INFINITY) {
        memset(s, 0, (size_t)W * sizeof(float));
        *lse = -INFINITY;
        *entropy = 0.0f;
        *distance = 0.0f;
        return;
    }
    float z = 0.0f, u = 0.0f;
#pragma omp simd reduction(+ : z, u)
    for (int64_t j = 0; j < W; j++) {
        float t = s[j] - m;
        float e = exp_nonpositive(t);
        z += e;
        u += e == 0.0f ? 0.0f : e * t;                   /* 0 * -inf would be NaN */
        s[j] = e;
    }
    float inv = 1.0f / z, d = 0.0f;
#pragma omp simd reduction(+ : d)
    for (int64_t j = 0; j < W; j++) {
        float p = s[j] * inv;
        s[j] = p;
        d += p * fabsf(row_pos - (float)j);
    }
    float log_z = logf(z);
    *lse = m + log_z;
    float h = log_z - u * inv;
    *entropy = h > 0.0f ? h : 0.0f;
    *distance = d;
    if (k > 0) row_topk(s, W, k, top_w, top_i);
}

/* Rows [r_begin, r_end) of s (R x W, row-major), overwritten by the weights. Row r is query
 * (r % rows_per_head) of its head's strip; its aligned position, counted from the strip's first
 * key, is row_pos0 + (r % rows_per_head). Outputs at row r: lse[r], entropy[r], distance[r],
 * top_w[r * k ...] and top_i[r * k ...] (key indices from the strip's first key). Requires k <= W.
 * The caller runs disjoint row ranges on several threads (it holds no lock and no global state). */
void strip_rows_f32(float *s, int64_t r_begin, int64_t r_end, int64_t W, int64_t rows_per_head, int64_t row_pos0,
                    int64_t k, float *lse, float *entropy, float *distance, float *top_w, int64_t *top_i) {
    for (int64_t r = r_begin; r < r_end; r++) {
        float row_pos = (float)(row_pos0 + r % rows_per_head);
        one_row(s + r * W, W, row_pos, k, lse + r, entropy + r, distance + r, top_w + r * k, top_i + r * k);
    }
}
