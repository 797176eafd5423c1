/* Attention of a few query rows over ranges of a stored K/V cache, read in place.
 *
 * Squeezed attention reads the selected clusters of a cluster-ordered cache: a list of contiguous key
 * ranges per kv head. Gathering them into one buffer for SDPA reads the selected rows, writes a copy and
 * reads the copy again; this kernel streams each range once, in blocks of BLOCK keys, with an online
 * (flash) softmax in fp32, and returns each row's output and log-sum-exp so the caller merges the
 * document part with the tail's.
 *
 * Shapes: Hkv kv heads, R query rows per kv head (the G query heads of the group times N queries),
 * T stored tokens, D head dim, Q ranges in all.
 *   query       [Hkv, R, D] fp32, already multiplied by the softmax scaling
 *   keys/values [Hkv, T, D] bf16 (as uint16) or fp32, contiguous
 *   round_probs 1 = round the probabilities that weigh the values to bf16 (what torch's bf16 kernel does)
 *   starts/ends [Q] int64, ranges of head h at range_offsets[h] .. range_offsets[h+1]
 *   row_mask    [Q, R] uint8 (1 = the row reads this range) or NULL (every row reads every range)
 *   out         [Hkv, R, D] fp32, the softmax-weighted values (0 for a row that read nothing)
 *   lse         [Hkv, R] fp32, log-sum-exp of the row's scaled logits (EMPTY_LSE for a row that read nothing)
 *
 * Built with -ffast-math, so nothing here may produce an infinity: "minus infinity" is NEG_BIG.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64
#define MAX_DIM 256
#define MAX_ROWS 512
#define NEG_BIG (-1e30f)
#define EMPTY_LSE (-1e30f)

static void bf16_to_f32(const uint16_t *src, float *dst, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; i++) {
        uint32_t bits = (uint32_t)src[i] << 16;
        float value;
        memcpy(&value, &bits, sizeof value);
        dst[i] = value;
    }
}

/* `count` floats of `base` (bf16 or fp32) from element `at`: converted into `scratch` for bf16, in place for fp32. */
static inline const float *as_f32(const void *base, int is_bf16, int64_t at, int64_t count, float *scratch) {
    if (!is_bf16) return (const float *)base + at;
    bf16_to_f32((const uint16_t *)base + at, scratch, count);
    return scratch;
}

/* Round to the nearest bf16 (ties to even), kept as a float. */
static inline float round_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* q . k over dim floats, summed in fp32. */
static inline float dot_f32(const float *q, const float *k, int64_t dim) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < dim; d++) dot += q[d] * k[d];
    return dot;
}

/* Divide each row's weighted value sum by its softmax sum and write its log-sum-exp (EMPTY_LSE, zeros for a row
 * that read nothing). */
static void finish_rows(float *acc, const float *row_max, const float *row_sum, int64_t rows, int64_t dim,
                        float *lse) {
    for (int64_t r = 0; r < rows; r++) {
        float *a = acc + r * dim;
        if (row_sum[r] > 0.0f) {
            const float inverse = 1.0f / row_sum[r];
            for (int64_t d = 0; d < dim; d++) a[d] *= inverse;
            lse[r] = row_max[r] + logf(row_sum[r]);
        } else {
            lse[r] = EMPTY_LSE;
        }
    }
}

/* One block of n keys: update every active row's running max, sum and weighted value sum. With round_probs the
 * probabilities that weigh the values are rounded to bf16 first, as torch's bf16 flash kernel does (its sums
 * stay fp32), so a bf16 cache gets the dense path's rounding. */
static void attend_block(const float *query, const uint8_t *active, int64_t rows, int64_t dim, const float *keys,
                         const float *values, int64_t n, int round_probs, float *row_max, float *row_sum,
                         float *acc) {
    float probs[BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        if (active && !active[r]) continue;
        const float *q = query + r * dim;
        float block_max = row_max[r];
        for (int64_t j = 0; j < n; j++) {
            const float *k = keys + j * dim;
            const float dot = dot_f32(q, k, dim);
            probs[j] = dot;
            block_max = dot > block_max ? dot : block_max;
        }
        float *a = acc + r * dim;
        if (block_max > row_max[r]) {
            float scale = expf(row_max[r] - block_max);
            row_sum[r] *= scale;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) a[d] *= scale;
            row_max[r] = block_max;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) {
            probs[j] = expf(probs[j] - block_max);
            sum += probs[j];
        }
        row_sum[r] += sum;
        if (round_probs) {
#pragma omp simd
            for (int64_t j = 0; j < n; j++) probs[j] = round_to_bf16(probs[j]);
        }
        for (int64_t j = 0; j < n; j++) {
            const float p = probs[j];
            const float *v = values + j * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) a[d] += p * v[d];
        }
    }
}

/* Returns 0, or -1 when rows or dim exceed the kernel's fixed buffers (the caller checks first). */
int range_attention(const float *query, const void *keys, const void *values, int keys_are_bf16, int round_probs,
                    const int64_t *starts, const int64_t *ends, const int64_t *range_offsets,
                    const uint8_t *row_mask, int64_t num_kv_heads, int64_t rows, int64_t num_tokens, int64_t dim,
                    float *out, float *lse) {
    if (rows > MAX_ROWS || dim > MAX_DIM) return -1;
    /* Per thread, off the stack (130 KB): the service calls this from worker threads. */
    static _Thread_local float key_block[BLOCK * MAX_DIM], value_block[BLOCK * MAX_DIM];
    static _Thread_local float row_max[MAX_ROWS], row_sum[MAX_ROWS];
    for (int64_t h = 0; h < num_kv_heads; h++) {
        const float *q = query + h * rows * dim;
        float *acc = out + h * rows * dim;
        memset(acc, 0, sizeof(float) * rows * dim);
        for (int64_t r = 0; r < rows; r++) {
            row_max[r] = NEG_BIG;
            row_sum[r] = 0.0f;
        }
        const int64_t head_base = h * num_tokens * dim;
        for (int64_t i = range_offsets[h]; i < range_offsets[h + 1]; i++) {
            const uint8_t *active = row_mask ? row_mask + i * rows : NULL;
            for (int64_t start = starts[i]; start < ends[i]; start += BLOCK) {
                const int64_t n = ends[i] - start < BLOCK ? ends[i] - start : BLOCK;
                const int64_t at = head_base + start * dim;
                const float *k = as_f32(keys, keys_are_bf16, at, n * dim, key_block);
                const float *v = as_f32(values, keys_are_bf16, at, n * dim, value_block);
                attend_block(q, active, rows, dim, k, v, n, round_probs, row_max, row_sum, acc);
            }
        }
        finish_rows(acc, row_max, row_sum, rows, dim, lse + h * rows);
    }
    return 0;
}

/* Centroid logits: logits[h, r, c] = query[h, r] . centroids[h, c] for query [Hkv, R, D] fp32 (already scaled)
 * and centroids [Hkv, C, D] bf16 (as uint16) or fp32. Reading bf16 centroids halves the bytes of this
 * memory-bound pass; the dot products stay fp32. */
void centroid_logits(const float *query, const void *centroids, int is_bf16, int64_t num_kv_heads, int64_t rows,
                     int64_t num_clusters, int64_t dim, float *logits) {
    float row[MAX_DIM];
    for (int64_t h = 0; h < num_kv_heads; h++) {
        const float *q = query + h * rows * dim;
        float *out = logits + h * rows * num_clusters;
        for (int64_t c = 0; c < num_clusters; c++) {
            const float *centroid = as_f32(centroids, is_bf16, (h * num_clusters + c) * dim, dim, row);
            for (int64_t r = 0; r < rows; r++) {
                out[r * num_clusters + c] = dot_f32(q + r * dim, centroid, dim);
            }
        }
    }
}

/* acc[r] = sum_j w[r, j] * means[j] for one kv head's weights w [R, C] and means [C, D] (bf16 or fp32), skipping
 * the clusters whose weight is below skip_below in every row. */
static void add_weighted_means(const float *w, const void *means, int is_bf16, int64_t means_at, int64_t rows,
                               int64_t num_clusters, int64_t dim, float skip_below, float *acc) {
    float row[MAX_DIM];
    memset(acc, 0, sizeof(float) * rows * dim);
    for (int64_t c = 0; c < num_clusters; c++) {
        float largest = 0.0f;
        for (int64_t r = 0; r < rows; r++) {
            const float weight = w[r * num_clusters + c];
            largest = weight > largest ? weight : largest;
        }
        if (largest < skip_below) continue;
        const float *mean = as_f32(means, is_bf16, means_at + c * dim, dim, row);
        for (int64_t r = 0; r < rows; r++) {
            const float p = w[r * num_clusters + c];
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) acc[r * dim + d] += p * mean[d];
        }
    }
}

/* out[h, r] = sum_c weights[h, r, c] * means[h, c] for weights [Hkv, R, C] fp32 and means [Hkv, C, D] bf16 or
 * fp32. A cluster whose weight is below `skip_below` for every row is not read: with weights that sum to 1 per
 * row, that changes each output by at most C * skip_below times the largest mean. */
void weighted_means(const float *weights, const void *means, int is_bf16, int64_t num_kv_heads, int64_t rows,
                    int64_t num_clusters, int64_t dim, float skip_below, float *out) {
    for (int64_t h = 0; h < num_kv_heads; h++)
        add_weighted_means(weights + h * rows * num_clusters, means, is_bf16, h * num_clusters * dim, rows,
                           num_clusters, dim, skip_below, out + h * rows * dim);
}

/* cutoff[r] = threshold + log sum_j N_j exp(logit[r, j]) for the rows of one kv head (see select_ranges). The sizes
 * are fp32: converting int64 to float in the exp loop made it six times slower (AVX2 has no such conversion). */
static void row_cutoffs(const float *head_logits, const float *head_sizes, float threshold, int64_t rows,
                        int64_t num_clusters, float *cutoff) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = head_logits + r * num_clusters;
        float top = NEG_BIG;
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < num_clusters; j++) {
            const float logit = head_sizes[j] > 0.0f ? row[j] : NEG_BIG;
            top = logit > top ? logit : top;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < num_clusters; j++)
            sum += head_sizes[j] > 0.0f ? head_sizes[j] * expf(row[j] - top) : 0.0f;
        cutoff[r] = threshold + top + logf(sum);
    }
}

/* Whether each query n reads non-empty cluster j (reads[n]): some head of its group is at or above its cutoff, or
 * the cluster is pinned. Returns how many queries read it. */
static int64_t cluster_readers(const float *head_logits, const float *cutoff, int always, int64_t group,
                               int64_t queries, int64_t num_clusters, int64_t j, uint8_t *reads) {
    int64_t readers = 0;
    for (int64_t n = 0; n < queries; n++) {
        int read = always;
        for (int64_t g = 0; g < group && !read; g++) {
            const int64_t r = g * queries + n;
            read = head_logits[r * num_clusters + j] >= cutoff[r];
        }
        reads[n] = (uint8_t)read;
        readers += read;
    }
    return readers;
}

/* The threshold rule (kvcache.selection.ThresholdRule, flat lookup) straight from centroid logits to key ranges.
 * For kv head h and query row r (rows g*N + n: the G heads of query n), with N_j the cluster sizes,
 *   cutoff[r] = threshold[h] + log sum_j N_j exp(logit[r, j]),
 * so logit[r, j] >= cutoff[r] is log S_j >= threshold. Query n reads a non-empty cluster j when some head g of its
 * group has logit[g*N + n, j] >= cutoff[g*N + n], or when j is pinned. For each head, in cluster order, every
 * cluster some query reads becomes one range offsets[j] .. offsets[j+1]; with row_mask, mask[q, g*N + n] says
 * whether query n reads range q (every head g of its group alike).
 *   logits [Hkv, G*N, C] fp32, thresholds [Hkv] fp32, sizes [Hkv, C] fp32, offsets [Hkv, C+1] int64,
 *   pinned [Hkv, C] uint8 or NULL; out: starts / ends [Hkv*C], range_offsets [Hkv+1], row_mask [Hkv*C, G*N]
 *   or NULL (then N must be 1), range_pinned [Hkv*C] or NULL (1 = the range's cluster is pinned), range_clusters
 *   [Hkv*C] or NULL (the range's cluster), counts [2] = keys
 *   read (the union over queries) and keys selected (summed over queries). Returns the number of ranges, or -1 when
 *   G*N exceeds MAX_ROWS. */
int64_t select_ranges(const float *logits, const float *thresholds, const float *sizes, const int64_t *offsets,
                      const uint8_t *pinned, int64_t num_kv_heads, int64_t group, int64_t queries,
                      int64_t num_clusters, int64_t *starts, int64_t *ends, int64_t *range_offsets, uint8_t *row_mask,
                      uint8_t *range_pinned, int64_t *range_clusters, int64_t *counts) {
    const int64_t rows = group * queries;
    if (rows > MAX_ROWS || (!row_mask && queries != 1)) return -1;
    static _Thread_local float cutoff[MAX_ROWS];
    static _Thread_local uint8_t reads[MAX_ROWS];
    int64_t count = 0;
    counts[0] = counts[1] = 0;
    range_offsets[0] = 0;
    for (int64_t h = 0; h < num_kv_heads; h++) {
        const float *head_logits = logits + h * rows * num_clusters;
        const float *head_sizes = sizes + h * num_clusters;
        const int64_t *head_offsets = offsets + h * (num_clusters + 1);
        row_cutoffs(head_logits, head_sizes, thresholds[h], rows, num_clusters, cutoff);
        for (int64_t j = 0; j < num_clusters; j++) {
            if (head_sizes[j] == 0.0f) continue;
            const int always = pinned && pinned[h * num_clusters + j];
            const int64_t readers = cluster_readers(head_logits, cutoff, always, group, queries, num_clusters, j, reads);
            if (readers == 0) continue;
            starts[count] = head_offsets[j];
            ends[count] = head_offsets[j + 1];
            if (range_pinned) range_pinned[count] = (uint8_t)always;
            if (range_clusters) range_clusters[count] = j;
            if (row_mask)
                for (int64_t g = 0; g < group; g++) memcpy(row_mask + count * rows + g * queries, reads, queries);
            counts[0] += ends[count] - starts[count];
            counts[1] += readers * (ends[count] - starts[count]);
            count++;
        }
        range_offsets[h + 1] = count;
    }
    return count;
}

/* Growable per-thread scratch: the two-stage kernel's logits and scores scale with the candidate keys. */
static void *scratch(void **buffer, int64_t *capacity, int64_t bytes) {
    if (bytes > *capacity) {
        void *grown = realloc(*buffer, (size_t)bytes);
        if (!grown) return NULL;
        *buffer = grown;
        *capacity = bytes;
    }
    return *buffer;
}

/* The estimate of the clusters a query does not read (kvcache.squeezed_attention's estimate_rest), under the same
 * threshold rule as select_ranges: for row r (rows g*N + n), every non-empty cluster j that query n does not read
 * counts as N_j keys at logit[r, j] holding the cluster's mean value,
 *   lse[r] = log sum_j N_j exp(logit[r, j]),   out[r] = sum_j N_j exp(logit[r, j] - lse[r]) means[h, j],
 * sums over the unread clusters only (lse = EMPTY_LSE and out = 0 for a row that reads every cluster). A cluster
 * weighing below skip_below in every row is not read, as in weighted_means.
 *   logits [Hkv, G*N, C] fp32, thresholds [Hkv], sizes [Hkv, C] fp32, pinned [Hkv, C] uint8 or NULL, means
 *   [Hkv, C, D] bf16 (as uint16) or fp32; out [Hkv, G*N, D] fp32, lse [Hkv, G*N] fp32. Returns 0, -1 when G*N
 *   exceeds MAX_ROWS or D exceeds MAX_DIM, -2 when its scratch cannot be allocated. */
int rest_estimate(const float *logits, const float *thresholds, const float *sizes, const uint8_t *pinned,
                  const void *means, int is_bf16, int64_t num_kv_heads, int64_t group, int64_t queries,
                  int64_t num_clusters, int64_t dim, float skip_below, float *out, float *lse) {
    const int64_t rows = group * queries;
    if (rows > MAX_ROWS || dim > MAX_DIM) return -1;
    static _Thread_local float cutoff[MAX_ROWS];
    static _Thread_local void *weight_buffer, *read_buffer;
    static _Thread_local int64_t weight_capacity, read_capacity;
    float *weights = scratch(&weight_buffer, &weight_capacity, (int64_t)sizeof(float) * (rows * num_clusters + 1));
    uint8_t *read = scratch(&read_buffer, &read_capacity, num_clusters + 1);
    if (!weights || !read) return -2;
    for (int64_t h = 0; h < num_kv_heads; h++) {
        const float *head_logits = logits + h * rows * num_clusters;
        const float *head_sizes = sizes + h * num_clusters;
        const uint8_t *head_pinned = pinned ? pinned + h * num_clusters : NULL;
        row_cutoffs(head_logits, head_sizes, thresholds[h], rows, num_clusters, cutoff);
        /* Pass 1, per query: the clusters it reads (or empty ones); then each of its rows' weights over the others. */
        for (int64_t n = 0; n < queries; n++) {
            for (int64_t j = 0; j < num_clusters; j++)
                read[j] = head_sizes[j] == 0.0f || (head_pinned && head_pinned[j]);
            for (int64_t g = 0; g < group; g++) {
                const float *row = head_logits + (g * queries + n) * num_clusters, cut = cutoff[g * queries + n];
#pragma omp simd
                for (int64_t j = 0; j < num_clusters; j++) read[j] |= row[j] >= cut;
            }
            for (int64_t g = 0; g < group; g++) {
                const int64_t r = g * queries + n;
                const float *row = head_logits + r * num_clusters;
                float *weight = weights + r * num_clusters, top = NEG_BIG, total = 0.0f;
#pragma omp simd reduction(max : top)
                for (int64_t j = 0; j < num_clusters; j++) {
                    weight[j] = read[j] ? NEG_BIG : row[j];
                    top = weight[j] > top ? weight[j] : top;
                }
#pragma omp simd reduction(+ : total)
                for (int64_t j = 0; j < num_clusters; j++) {
                    weight[j] = weight[j] > NEG_BIG ? head_sizes[j] * expf(weight[j] - top) : 0.0f;
                    total += weight[j];
                }
                const float scale = total > 0.0f ? 1.0f / total : 0.0f;
#pragma omp simd
                for (int64_t j = 0; j < num_clusters; j++) weight[j] *= scale;
                lse[h * rows + r] = total > 0.0f ? top + logf(total) : EMPTY_LSE;
            }
        }
        /* Pass 2: the normalised weights times the mean values, skipping the clusters no row weighs. */
        add_weighted_means(weights, means, is_bf16, h * num_clusters * dim, rows, num_clusters, dim, skip_below,
                           out + h * rows * dim);
    }
    return 0;
}

/* The value a[k] would hold if a[0..n-1] were sorted in descending order (quickselect; reorders a). */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
        const float pivot = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));  /* median of 3 */
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                const float swap = a[i];
                a[i++] = a[j];
                a[j--] = swap;
            }
        }
        if (k <= j) hi = j;       /* a[lo..j] >= pivot */
        else if (k >= i) lo = i;  /* a[i..hi] <= pivot */
        else return pivot;        /* a[j+1..i-1] == pivot */
    }
    return a[k];
}

/* The value of rank k (0 = largest) among a[0..n-1], exactly. For long arrays a strided sample brackets it, one pass
 * copies the values inside the bracket into `band`, and the quickselect runs over those only (about one pass over
 * a instead of several); when the bracket misses, over all of a. */
static float rank_value(float *a, int64_t n, int64_t k, float *band) {
    enum { SAMPLE = 1024, SLACK = 48 };
    if (n < 8 * SAMPLE) return kth_largest(a, n, k);
    float sample[SAMPLE];
    const int64_t stride = n / SAMPLE;
    for (int64_t i = 0; i < SAMPLE; i++) sample[i] = a[i * stride];
    const int64_t rank = k * SAMPLE / n;
    const float high = rank < SLACK ? 3e38f : kth_largest(sample, SAMPLE, rank - SLACK);
    const float low = rank + SLACK >= SAMPLE ? -3e38f : kth_largest(sample, SAMPLE, rank + SLACK);
    int64_t above = 0, inside = 0;
    for (int64_t i = 0; i < n; i++) { /* branchless: which side a value falls on is a coin toss near the cutoff */
        const float value = a[i];
        band[inside] = value;
        inside += value >= low && value <= high;
        above += value > high;
    }
    if (above <= k && k < above + inside) return kth_largest(band, inside, k - above);
    return kth_largest(a, n, k);
}

/* Two-stage squeezed attention: the ranges (clusters above a generous threshold) are candidates, and each query
 * attends to the `keep` candidate keys with the highest logit over the heads of its group, plus every key of a
 * pinned range, which it always keeps (sinks, recent window). Pass 1 reads the candidates' keys once and stores
 * every row's logits; a quickselect per query finds its cutoff; pass 2 reads the values of the kept keys only.
 * With means, the candidates a query drops still count, at their exact logit, holding their cluster's mean value
 * (the softmax runs over every candidate); without, the softmax runs over the kept keys alone. Single keys chosen
 * by q.k hold far more of the attention mass than whole clusters chosen by centroid for the same values read.
 * Shapes as range_attention, with rows r = g*N + n (G = rows / queries heads of query n) and
 *   range_pinned [Q] uint8 or NULL: 1 = every key of the range is kept by the rows that read it;
 *   means [Hkv, C, D] (the dtype of values) and range_clusters [Q] int64: each range's cluster, or both NULL;
 *   counts [3]: keys whose K was read (union over queries), keys whose V was read (kept by some query),
 *   keys kept summed over queries.
 * Returns 0, -1 when rows or dim exceed the fixed buffers, -2 when scratch memory cannot be had. */
int refined_attention(const float *query, const void *keys, const void *values, int keys_are_bf16, int round_probs,
                      const int64_t *starts, const int64_t *ends, const int64_t *range_offsets,
                      const uint8_t *row_mask, const uint8_t *range_pinned, const void *means,
                      const int64_t *range_clusters, int64_t num_clusters, int64_t num_kv_heads, int64_t queries,
                      int64_t rows, int64_t num_tokens, int64_t dim, int64_t keep, float *out, float *lse,
                      int64_t *counts) {
    if (rows > MAX_ROWS || dim > MAX_DIM || queries < 1 || rows % queries) return -1;
    static _Thread_local float key_block[BLOCK * MAX_DIM], value_row[MAX_DIM];
    static _Thread_local float row_max[MAX_ROWS], row_sum[MAX_ROWS];
    static _Thread_local void *logit_buffer, *score_buffer, *kept_buffer, *index_buffer, *weight_buffer;
    static _Thread_local int64_t logit_capacity, score_capacity, kept_capacity, index_capacity, weight_capacity;
    const int64_t group = rows / queries;
    const float pinned_score = 1e30f, unread = NEG_BIG;
    counts[0] = counts[1] = counts[2] = 0;
    for (int64_t h = 0; h < num_kv_heads; h++) {
        const float *q = query + h * rows * dim;
        float *acc = out + h * rows * dim;
        const int64_t head_base = h * num_tokens * dim;
        int64_t total = 0;
        for (int64_t i = range_offsets[h]; i < range_offsets[h + 1]; i++) total += ends[i] - starts[i];
        float *logits = scratch(&logit_buffer, &logit_capacity, (int64_t)sizeof(float) * (rows * total + 1));
        float *score = scratch(&score_buffer, &score_capacity, (int64_t)sizeof(float) * (3 * total + 1));
        uint8_t *kept = scratch(&kept_buffer, &kept_capacity, queries * total + 1);
        int64_t *kept_positions = scratch(&index_buffer, &index_capacity, (int64_t)sizeof(int64_t) * (2 * total + 1));
        if (!logits || !score || !kept || !kept_positions) return -2;
        float *pool = score + total, *band = score + 2 * total;
        int64_t *kept_index = kept_positions + total;

        /* Pass 1: every row's logit for every candidate key it reads (unread: NEG_BIG). */
        int64_t m = 0;
        for (int64_t i = range_offsets[h]; i < range_offsets[h + 1]; i++) {
            const uint8_t *active = row_mask ? row_mask + i * rows : NULL;
            for (int64_t start = starts[i]; start < ends[i]; start += BLOCK) {
                const int64_t n = ends[i] - start < BLOCK ? ends[i] - start : BLOCK;
                const float *k = as_f32(keys, keys_are_bf16, head_base + start * dim, n * dim, key_block);
                for (int64_t r = 0; r < rows; r++) {
                    float *row = logits + r * total + m;
                    if (active && !active[r]) {
                        for (int64_t j = 0; j < n; j++) row[j] = unread;
                        continue;
                    }
                    const float *qr = q + r * dim;
                    for (int64_t j = 0; j < n; j++) row[j] = dot_f32(qr, k + j * dim, dim);
                }
                m += n;
            }
        }
        counts[0] += total;

        /* Per query: score = max logit over its group's heads, pinned keys first; keep the `keep` best. */
        for (int64_t n = 0; n < queries; n++) {
            memcpy(score, logits + n * total, sizeof(float) * total);
            for (int64_t g = 1; g < group; g++) {
                const float *row = logits + (g * queries + n) * total;
#pragma omp simd
                for (m = 0; m < total; m++) score[m] = row[m] > score[m] ? row[m] : score[m];
            }
            m = 0;
            for (int64_t i = range_offsets[h]; i < range_offsets[h + 1]; m += ends[i] - starts[i], i++) {
                if (!range_pinned || !range_pinned[i]) continue;
                for (int64_t j = m; j < m + ends[i] - starts[i]; j++) score[j] = score[j] > unread ? pinned_score : unread;
            }
            int64_t available = 0;
            for (m = 0; m < total; m++) {
                pool[available] = score[m];
                available += score[m] > unread;
            }
            const float cutoff = available > keep && keep > 0 ? rank_value(pool, available, keep - 1, band) : unread / 2;
            uint8_t *kept_n = kept + n * total;
#pragma omp simd
            for (m = 0; m < total; m++) kept_n[m] = score[m] > unread && score[m] >= cutoff;
        }

        /* The keys some query keeps, in candidate order, and where they are stored. */
        int64_t num_kept = 0;
        m = 0;
        for (int64_t i = range_offsets[h]; i < range_offsets[h + 1]; i++) {
            for (int64_t position = starts[i]; position < ends[i]; position++, m++) {
                int64_t keepers = 0;
                for (int64_t n = 0; n < queries; n++) keepers += kept[n * total + m];
                counts[2] += keepers;
                kept_positions[num_kept] = position;
                kept_index[num_kept] = m;
                num_kept += keepers > 0;
            }
        }
        counts[1] += num_kept;

        /* Pass 2: each row's exact softmax (in place: logits become probabilities) over its kept keys, or with means
         * over every candidate it reads, the dropped ones weighing their cluster's mean value; then the values of
         * the kept keys. */
        const int estimate_dropped = means && range_clusters;
        for (int64_t r = 0; r < rows; r++) {
            float *row = logits + r * total;
            const uint8_t *kept_n = kept + (r % queries) * total;
            float top = NEG_BIG, sum = 0.0f;
            if (estimate_dropped) {
#pragma omp simd reduction(max : top)
                for (m = 0; m < total; m++) top = row[m] > top ? row[m] : top;
#pragma omp simd reduction(+ : sum)
                for (m = 0; m < total; m++) {
                    row[m] = row[m] > unread ? expf(row[m] - top) : 0.0f;
                    sum += row[m];
                }
            } else {
#pragma omp simd reduction(max : top)
                for (m = 0; m < total; m++) top = kept_n[m] && row[m] > top ? row[m] : top;
#pragma omp simd reduction(+ : sum)
                for (m = 0; m < total; m++) {
                    row[m] = kept_n[m] ? expf(row[m] - top) : 0.0f;
                    sum += row[m];
                }
            }
            row_max[r] = top;
            row_sum[r] = sum;
        }
        memset(acc, 0, sizeof(float) * rows * dim);
        if (estimate_dropped) { /* per range: the dropped keys' probability times the cluster's mean value */
            const int64_t first = range_offsets[h], num_ranges = range_offsets[h + 1] - first;
            float *weights = scratch(&weight_buffer, &weight_capacity, (int64_t)sizeof(float) * (rows * num_ranges + 1));
            if (!weights) return -2;
            for (int64_t r = 0; r < rows; r++) {
                float *row = logits + r * total;
                const uint8_t *kept_n = kept + (r % queries) * total;
#pragma omp simd
                for (m = 0; m < total; m++) { /* split: the dropped probabilities aside, the kept ones stay */
                    pool[m] = kept_n[m] ? 0.0f : row[m];
                    row[m] = kept_n[m] ? row[m] : 0.0f;
                }
                m = 0;
                for (int64_t i = 0; i < num_ranges; i++) { /* ranges are short (a cluster): a plain sum */
                    float weight = 0.0f;
                    for (const int64_t end = m + ends[first + i] - starts[first + i]; m < end; m++) weight += pool[m];
                    weights[i * rows + r] = weight;
                }
            }
            for (int64_t i = 0; i < num_ranges; i++) {
                const float *weight = weights + i * rows;
                int any = 0;
                for (int64_t r = 0; r < rows; r++) any |= weight[r] > 0.0f;
                if (!any) continue;
                const int64_t at = (h * num_clusters + range_clusters[first + i]) * dim;
                const float *mean = as_f32(means, keys_are_bf16, at, dim, value_row);
                for (int64_t r = 0; r < rows; r++) {
                    float *a = acc + r * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; d++) a[d] += weight[r] * mean[d];
                }
            }
        }
        if (round_probs) {
            for (int64_t r = 0; r < rows; r++) {
                float *row = logits + r * total;
#pragma omp simd
                for (m = 0; m < total; m++) row[m] = round_to_bf16(row[m]);
            }
        }
        for (int64_t c = 0; c < num_kept; c++) {
            const float *v = as_f32(values, keys_are_bf16, head_base + kept_positions[c] * dim, dim, value_row);
            for (int64_t r = 0; r < rows; r++) {
                const float p = logits[r * total + kept_index[c]];
                float *a = acc + r * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) a[d] += p * v[d];
            }
        }
        finish_rows(acc, row_max, row_sum, rows, dim, lse + h * rows);
    }
    return 0;
}

/* Exact attention of a few query rows (decode steps, tree nodes) over a whole dense cache.
 *
 * A row's result is a fixed function of the keys it sees, taken in cache order: a first pass stores every logit
 * and each row's max; a second takes exp(logit - max), adds it to the row's sum and weighs the values, both one
 * key after another. Keys a row does not see add exact zeros. So a row's bits depend neither on the other rows,
 * nor on where the keys it does not see sit, nor on block boundaries: a tree node gets exactly what the decode
 * step of its path gets, and in bf16 the speculative engine's output equals plain decoding.
 * Pass 1 puts rows on the vector lanes, LANES at a time: with AMX one tile product scores 16 keys (a logit is a
 * dot product over the dims, so it stays a function of its own query and key), else 4 keys a step with
 * AVX512-BF16 pairs or fp32 FMAs. Pass 2 puts the dims on the lanes: a row costs dim/16 FMAs per key, or half as
 * many vdpbf16ps where that instruction adds a pair's two products in order (the same sums; `pairs_allowed` = 0
 * keeps the FMAs). With AMX
 * and bf16 probabilities, tiles weigh the values of a row's first keys, in whole 64-key blocks up to a bound
 * set by how many keys the row sees (and its first hole): tiles add keys in pairs, so the pairs must be the
 * same ones in a tree node and in the decode step of its path, and a node sees the prefix unbroken, then its
 * ancestors. Its later keys go one after another as above.
 *
 *   query        [Hkv, R, D] in the dtype of the keys, unscaled (logits are multiplied by `scaling`); rows g*N + n
 *                (head g, query n)
 *   keys/values  element (h, t, d) at h*head_stride + t*dim + d, bf16 (as uint16) or fp32; keys 0..length-1
 *   mask         [N, mask_stride] uint8 (1 = query n sees key t), or NULL: every row sees every key
 *   out          [Hkv, R, D] fp32, normalised (zeros for a row that sees nothing)
 * Returns 0, -1 when rows or dim exceed the fixed buffers or dim is not a multiple of 8, -2 when scratch memory
 * cannot be had. */
#define LANES 16

/* s[i][l] = q_l . k_i for 4 keys and one group of LANES rows: qt is [dim, lanes] fp32 at the group. */
static inline void logits4_f32(const float *qt, int64_t lanes, const float *key_row[4], int64_t dim,
                               float s[4][LANES]) {
    for (int64_t i = 0; i < 4; i++)
        for (int64_t l = 0; l < LANES; l++) s[i][l] = 0.0f;
    for (int64_t d = 0; d < dim; d++) {
        const float *qd = qt + d * lanes;
        for (int64_t i = 0; i < 4; i++) {
            const float kd = key_row[i][d];
#pragma omp simd
            for (int64_t l = 0; l < LANES; l++) s[i][l] += kd * qd[l];
        }
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_BF16_DOT 1
/* The same from bf16 pairs (vdpbf16ps: products exact in fp32, summed a dim pair at a time): qt is [pairs, lanes]
 * pairs of the rows' queries, key_row[i] the key's pairs. Reads the keys in place, with no conversion pass. */
static inline void logits4_bf16(const uint32_t *qt, int64_t lanes, const uint32_t *key_row[4], int64_t pairs,
                                float s[4][LANES]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t p = 0; p < pairs; p++) {
        const __m512bh q = (__m512bh)_mm512_loadu_si512(qt + p * lanes);
        a0 = _mm512_dpbf16_ps(a0, q, (__m512bh)_mm512_set1_epi32((int)key_row[0][p]));
        a1 = _mm512_dpbf16_ps(a1, q, (__m512bh)_mm512_set1_epi32((int)key_row[1][p]));
        a2 = _mm512_dpbf16_ps(a2, q, (__m512bh)_mm512_set1_epi32((int)key_row[2][p]));
        a3 = _mm512_dpbf16_ps(a3, q, (__m512bh)_mm512_set1_epi32((int)key_row[3][p]));
    }
    _mm512_storeu_ps(s[0], a0);
    _mm512_storeu_ps(s[1], a1);
    _mm512_storeu_ps(s[2], a2);
    _mm512_storeu_ps(s[3], a3);
}
#else
#define HAVE_BF16_DOT 0
static inline void logits4_bf16(const uint32_t *qt, int64_t lanes, const uint32_t *key_row[4], int64_t pairs,
                                float s[4][LANES]) {
    (void)qt, (void)lanes, (void)key_row, (void)pairs, (void)s;
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands out the tile registers only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA). */
static int amx_permitted(void) {
    static _Thread_local int state; /* 0 not asked yet, 1 granted, -1 refused */
    if (!state) state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return state > 0;
}

/* Every tile 64 bytes wide. Pass 1 (value_rows 0): 16 rows each, 0-3 the logits of 64 keys for 16 rows [16 keys,
 * 16 rows] fp32 each, 4-5 keys [16 keys, 32 dims] bf16, 6 the queries' pairs [16 pairs, 16 rows]. The values
 * (weigh_values_amx): 0-3 outputs [value_rows rows, 16 dims] fp32, 4 probabilities [value_rows rows, 16 key pairs],
 * 5-6 values [16 key pairs, 16 dims]; a decode step's 3 rows then pay for 3 rows, not 16. */
static void configure_tiles(int value_rows) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } config = {0};
    config.palette = 1;
    for (int i = 0; i < 8; i++) config.colsb[i] = 64, config.rows[i] = value_rows && i < 5 ? value_rows : 16;
    _tile_loadconfig(&config);
}

/* Raw logits q_l . k_t of 64 keys (rows of `key_rows`, `dim` bf16 apart) for one group of LANES rows (qt as for
 * logits4_bf16, at the group), into logits[t * lanes + l]: four accumulators in flight, 32 dims per product. */
static inline void logits64_amx(const uint16_t *key_rows, int64_t dim, const uint32_t *qt, int64_t lanes,
                                float *logits) {
    const int64_t stride = dim * 2, block = 16 * dim;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < dim / 32; k++) {
        const uint16_t *at = key_rows + k * 32;
        _tile_loadd(6, qt + k * 16 * lanes, lanes * 4);
        _tile_loadd(4, at, stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(5, at + block, stride);
        _tile_dpbf16ps(1, 5, 6);
        _tile_loadd(4, at + 2 * block, stride);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(5, at + 3 * block, stride);
        _tile_dpbf16ps(3, 5, 6);
    }
    _tile_stored(0, logits, lanes * 4);
    _tile_stored(1, logits + 16 * lanes, lanes * 4);
    _tile_stored(2, logits + 32 * lanes, lanes * 4);
    _tile_stored(3, logits + 48 * lanes, lanes * 4);
}
#else
#define HAVE_AMX 0
#endif

/* Key t's scaled logits for one group of LANES rows (NEG_BIG where unseen), and the rows' running max. */
static inline void store_logits(const float *s, float scaling, int64_t t, int64_t open, const uint8_t *seen,
                                int64_t lanes, int64_t lane, float *logits, float *row_max) {
    float *row = logits + t * lanes + lane, *top = row_max + lane;
    if (t < open) {
#pragma omp simd
        for (int64_t l = 0; l < LANES; l++) {
            const float value = s[l] * scaling;
            row[l] = value;
            top[l] = value > top[l] ? value : top[l];
        }
    } else {
        const uint8_t *visible = seen + (t - open) * lanes + lane;
#pragma omp simd
        for (int64_t l = 0; l < LANES; l++) {
            const float value = visible[l] ? s[l] * scaling : NEG_BIG;
            row[l] = value;
            top[l] = value > top[l] ? value : top[l];
        }
    }
}

#if defined(__AVX512F__)
/* exp(x) for x <= 0 to about 2 ulp (Cephes' expf polynomial on x - n ln 2, then times 2^n); below -87 it is
 * exp(-87), still a normal float. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* Pass 2's weights for n keys: p[j, r] = exp(logit[j, r] - max[r]) (0 where unseen), added to each row's sum one
 * key after another, then rounded to bf16 with round_probs. */
static void key_probs(const float *logits, int64_t n, int64_t lanes, const float *row_max, float *row_sum,
                      int round_probs, float *probs) {
#if defined(__AVX512F__)
    for (int64_t r = 0; r < lanes; r += LANES) {
        const __m512 top = _mm512_loadu_ps(row_max + r), floor = _mm512_set1_ps(NEG_BIG / 2);
        __m512 sum = _mm512_loadu_ps(row_sum + r);
        for (int64_t j = 0; j < n; j++) {
            const __m512 x = _mm512_loadu_ps(logits + j * lanes + r);
            const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, floor, _CMP_GT_OQ), exp512(_mm512_sub_ps(x, top)));
            sum = _mm512_add_ps(sum, e);
            __m512i bits = _mm512_castps_si512(e);
            if (round_probs) { /* round to nearest bf16, ties to even, as round_to_bf16 */
                const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
                bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
                bits = _mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFFF0000u));
            }
            _mm512_storeu_ps(probs + j * lanes + r, _mm512_castsi512_ps(bits));
        }
        _mm512_storeu_ps(row_sum + r, sum);
    }
#else
    for (int64_t j = 0; j < n; j++) {
        const float *row = logits + j * lanes;
        float *p = probs + j * lanes;
#pragma omp simd
        for (int64_t r = 0; r < lanes; r++) {
            const float e = row[r] > NEG_BIG / 2 ? expf(row[r] - row_max[r]) : 0.0f;
            row_sum[r] += e;
            p[r] = round_probs ? round_to_bf16(e) : e;
        }
    }
#endif
}

/* acc[r] += p[j, r] * v[j] for 4 rows r0.. (acc [rows, dim]) over n keys, one key after another: v is [n, dim],
 * bf16 (as uint16, widened in registers) or fp32. */
static void weigh_values(const float *probs, int64_t lanes, int64_t r0, const void *v, int is_bf16, int64_t n,
                         int64_t dim, float *acc) {
#if defined(__AVX512F__)
    if (dim % 64 == 0) { /* 4 rows x 64 dims of accumulators in registers */
        for (int64_t d0 = 0; d0 < dim; d0 += 64) {
            __m512 a[4][4], x[4];
            for (int r = 0; r < 4; r++)
                for (int w = 0; w < 4; w++) a[r][w] = _mm512_loadu_ps(acc + (r0 + r) * dim + d0 + 16 * w);
            for (int64_t j = 0; j < n; j++) {
                const float *pj = probs + j * lanes + r0;
                for (int w = 0; w < 4; w++) {
                    const int64_t at = j * dim + d0 + 16 * w;
                    x[w] = is_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                         _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)v + at))), 16))
                                   : _mm512_loadu_ps((const float *)v + at);
                }
                for (int r = 0; r < 4; r++) {
                    const __m512 p = _mm512_set1_ps(pj[r]);
                    for (int w = 0; w < 4; w++) a[r][w] = _mm512_fmadd_ps(x[w], p, a[r][w]);
                }
            }
            for (int r = 0; r < 4; r++)
                for (int w = 0; w < 4; w++) _mm512_storeu_ps(acc + (r0 + r) * dim + d0 + 16 * w, a[r][w]);
        }
        return;
    }
#endif
    float block[BLOCK * MAX_DIM];
    const float *vf = as_f32(v, is_bf16, 0, n * dim, block);
    for (int64_t r = r0; r < r0 + 4; r++) {
        float *a = acc + r * dim;
        for (int64_t j = 0; j < n; j++) {
            const float p = probs[j * lanes + r], *vj = vf + j * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) a[d] += p * vj[d];
        }
    }
}

#if HAVE_BF16_DOT
/* Whether vdpbf16ps adds its two products one after the other, the odd (high) slot first, each add rounded: then
 * a pair of keys (earlier key in the high slot) sums exactly as two FMAs in cache order. The SDM specifies that
 * order; a CPU that fuses the two adds (caught by the first probe) or takes the low slot first (the second) keeps
 * the FMA path. Checked once per process. */
static int bf16_pairs_in_order(void) {
    static int known = -1;
    if (known < 0) {
        volatile uint32_t tiny = 0x39803980u, mixed = 0xBF803980u, ones = 0x3F803980u; /* 2^-12 | 2^-12 etc. */
        const __m512 one = _mm512_set1_ps(1.0f);
        /* 1 + 2^-24 + 2^-24: 1 when each add rounds (ties to even), 1 + 2^-23 when fused */
        const __m512 a = _mm512_dpbf16_ps(one, (__m512bh)_mm512_set1_epi32((int)tiny),
                                          (__m512bh)_mm512_set1_epi32((int)tiny));
        /* 1 + (-1 * 1) + 2^-24: 2^-24 high slot first, 0 low slot first */
        const __m512 b = _mm512_dpbf16_ps(one, (__m512bh)_mm512_set1_epi32((int)mixed),
                                          (__m512bh)_mm512_set1_epi32((int)ones));
        known = _mm512_cvtss_f32(a) == 1.0f && _mm512_cvtss_f32(b) == 0x1p-24f;
    }
    return known;
}

/* weigh_values for every row at once from bf16 pairs of keys (round_probs: the probabilities are bf16 already):
 * per pair (j, j+1), one vdpbf16ps adds p[j] v[j] and then p[j+1] v[j+1] to 16 dims of a row, half the
 * instructions of two FMAs and with the same sums (bf16_pairs_in_order). The pairs are built once per block,
 * not once per group of 4 rows: values as [pairs, dim] (v[j] high, v[j+1] low), probabilities as [pairs, lanes]. */
static void weigh_value_pairs(const float *probs, int64_t lanes, int64_t rows, const uint16_t *v, int64_t n,
                              int64_t dim, float *acc) {
    static _Thread_local uint32_t value_pairs[BLOCK / 2 * MAX_DIM], prob_pairs[BLOCK / 2 * MAX_ROWS];
    const int64_t count = (n + 1) / 2;
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t i = 0; i < count; i++) {
        const int second = 2 * i + 1 < n;
        for (int64_t l = 0; l < lanes; l += LANES) {
            const __m512i first = _mm512_and_si512(_mm512_loadu_si512(probs + 2 * i * lanes + l), high);
            const __m512i next = second ? _mm512_srli_epi32(_mm512_loadu_si512(probs + (2 * i + 1) * lanes + l), 16)
                                        : _mm512_setzero_si512();
            _mm512_storeu_si512(prob_pairs + i * lanes + l, _mm512_or_si512(first, next));
        }
        for (int64_t d = 0; d < dim; d += 16) {
            const __m512i first = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + 2 * i * dim + d)));
            const __m512i next = second ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                              (const __m256i *)(v + (2 * i + 1) * dim + d)))
                                        : _mm512_setzero_si512();
            _mm512_storeu_si512(value_pairs + i * dim + d, _mm512_or_si512(_mm512_slli_epi32(first, 16), next));
        }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4)
        for (int64_t d0 = 0; d0 < dim; d0 += 64) { /* 4 rows x 64 dims of accumulators in registers */
            __m512 a[4][4];
            for (int r = 0; r < 4; r++)
                for (int w = 0; w < 4; w++) a[r][w] = _mm512_loadu_ps(acc + (r0 + r) * dim + d0 + 16 * w);
            for (int64_t i = 0; i < count; i++) {
                __m512bh x[4];
                for (int w = 0; w < 4; w++) x[w] = (__m512bh)_mm512_loadu_si512(value_pairs + i * dim + d0 + 16 * w);
                for (int r = 0; r < 4; r++) {
                    const __m512bh p = (__m512bh)_mm512_set1_epi32((int)prob_pairs[i * lanes + r0 + r]);
                    for (int w = 0; w < 4; w++) a[r][w] = _mm512_dpbf16_ps(a[r][w], p, x[w]);
                }
            }
            for (int r = 0; r < 4; r++)
                for (int w = 0; w < 4; w++) _mm512_storeu_ps(acc + (r0 + r) * dim + d0 + 16 * w, a[r][w]);
        }
}
#endif

/* 1 where cache_attention weighs bf16 values by pairs of keys (weigh_value_pairs), else 0. */
int value_pairs_supported(void) {
#if HAVE_BF16_DOT
    return bf16_pairs_in_order();
#else
    return 0;
#endif
}

#if HAVE_AMX && defined(__AVX512BW__)
#define HAVE_AMX_VALUES 1
#define SPAN 128 /* keys whose values are interleaved at a time, for every lane group */

/* The values of 32 keys as the tiles' B operand, 16 dims a tile: vnni[(slab * 16 + pair) * 32 + 2 i + k] is
 * v[(2 pair + k) * dim + 16 slab + i], the two keys of a pair side by side. */
static void interleave_values(const uint16_t *v, int64_t dim, uint16_t *vnni) {
    static const uint16_t low_index[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                           8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i low = _mm512_loadu_si512(low_index), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int64_t pair = 0; pair < 16; pair++) {
        const uint16_t *even = v + 2 * pair * dim, *odd = even + dim;
        for (int64_t d = 0; d < dim; d += 32) {
            const __m512i a = _mm512_loadu_si512(even + d), b = _mm512_loadu_si512(odd + d);
            _mm512_storeu_si512(vnni + ((d / 16) * 16 + pair) * 32, _mm512_permutex2var_epi16(a, low, b));
            _mm512_storeu_si512(vnni + ((d / 16 + 1) * 16 + pair) * 32, _mm512_permutex2var_epi16(a, high, b));
        }
    }
}

/* Transpose 16 x 16 32-bit words in registers. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2)
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    for (int i = 0; i < 16; i += 4) { /* r[4i + m], 128-bit lane j: column 4j + m of rows 4i..4i+3 */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int m = 0; m < 4; m++) {
        const __m512i x0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44), x1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
        const __m512i x2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
        const __m512i x3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
        t[m] = _mm512_shuffle_i32x4(x0, x2, 0x88), t[4 + m] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
        t[8 + m] = _mm512_shuffle_i32x4(x1, x3, 0x88), t[12 + m] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* The bf16 probabilities of 32 keys for one lane group as the tiles' A operand: word a[l * 16 + pair] holds keys
 * 2 pair (low half) and 2 pair + 1 of lane l; lanes without a bit in `keep` get zeros. probs is key-major at the
 * group, its floats already rounded to bf16, so their high halves are the bf16 bits. */
static void pack_probs(const float *probs, int64_t lanes, __mmask16 keep, uint32_t *a) {
    __m512i r[16];
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int p = 0; p < 16; p++) {
        const __m512i even = _mm512_castps_si512(_mm512_loadu_ps(probs + 2 * p * lanes));
        const __m512i odd = _mm512_castps_si512(_mm512_loadu_ps(probs + (2 * p + 1) * lanes));
        r[p] = _mm512_maskz_or_epi32(keep, _mm512_srli_epi32(even, 16), _mm512_and_si512(odd, high));
    }
    transpose16(r);
    for (int l = 0; l < 16; l++) _mm512_storeu_si512(a + l * 16, r[l]);
}

/* acc[16 rows, dim] (one lane group, row stride dim) += P V over `chunks` chunks of 32 keys: a_tiles from
 * pack_probs, vnni from interleave_values, one 32 * dim block per chunk. 64 dims at a time in tiles 0-3. */
static void weigh_values_amx(const uint32_t *a_tiles, const uint16_t *vnni, int64_t chunks, int64_t dim,
                             float *acc) {
    const int64_t stride = dim * 4;
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        _tile_loadd(0, acc + d0, stride);
        _tile_loadd(1, acc + d0 + 16, stride);
        _tile_loadd(2, acc + d0 + 32, stride);
        _tile_loadd(3, acc + d0 + 48, stride);
        for (int64_t c = 0; c < chunks; c++) {
            const uint16_t *b = vnni + c * 32 * dim + (d0 / 16) * 512;
            _tile_loadd(4, a_tiles + c * 256, 64);
            _tile_loadd(5, b, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, b + 512, 64);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(5, b + 1024, 64);
            _tile_dpbf16ps(2, 4, 5);
            _tile_loadd(6, b + 1536, 64);
            _tile_dpbf16ps(3, 4, 6);
        }
        _tile_stored(0, acc + d0, stride);
        _tile_stored(1, acc + d0 + 16, stride);
        _tile_stored(2, acc + d0 + 32, stride);
        _tile_stored(3, acc + d0 + 48, stride);
    }
}

/* Pass 2 over keys [0, bmax) with tiles: row r takes keys [0, bound[r]) from the tiles (whole 64-key blocks,
 * zeros past its bound) and keys [bound[r], bmax) from weigh_values, so its sum stays a function of its own
 * keys. The probabilities are written over the logits. */
static void values_prefix_amx(float *logits, int64_t lanes, int64_t rows, const int32_t *bound, int64_t bmax,
                              const uint16_t *v, int64_t dim, const float *row_max, float *row_sum, float *acc) {
    static _Thread_local uint16_t vnni[SPAN * MAX_DIM];
    static _Thread_local uint32_t a_tiles[SPAN / 32 * 256];
    for (int64_t span = 0; span < bmax; span += SPAN) {
        const int64_t n = bmax - span < SPAN ? bmax - span : SPAN;
        key_probs(logits + span * lanes, n, lanes, row_max, row_sum, 1, logits + span * lanes);
        for (int64_t c = 0; c < n / 32; c++) interleave_values(v + (span + 32 * c) * dim, dim, vnni + c * 32 * dim);
        for (int64_t g = 0; g < lanes; g += LANES) {
            const __m512i lane_bound = _mm512_loadu_si512(bound + g);
            const int64_t top = _mm512_reduce_max_epi32(lane_bound);
            const int64_t chunks = ((top - span < n ? top - span : n) + 31) / 32;
            if (chunks <= 0) continue;
            for (int64_t c = 0; c < chunks; c++) {
                const __mmask16 keep = _mm512_cmpgt_epi32_mask(lane_bound, _mm512_set1_epi32((int)(span + 32 * c)));
                pack_probs(logits + (span + 32 * c) * lanes + g, lanes, keep, a_tiles + c * 256);
            }
            weigh_values_amx(a_tiles, vnni, chunks, dim, acc + g * dim);
        }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        int64_t start = bmax;
        for (int64_t r = r0; r < r0 + 4; r++) start = bound[r] < start ? bound[r] : start;
        for (int64_t r = r0; r < r0 + 4; r++) /* the tiles took these */
            for (int64_t t = start; t < bound[r]; t++) logits[t * lanes + r] = 0.0f;
        for (int64_t t = start; t < bmax; t += BLOCK) {
            const int64_t m = bmax - t < BLOCK ? bmax - t : BLOCK;
            weigh_values(logits + t * lanes, lanes, r0, v + t * dim, 1, m, dim, acc);
        }
    }
}
#else
#define HAVE_AMX_VALUES 0
#endif

int cache_attention(const void *query, float scaling, const void *keys, const void *values, int is_bf16,
                    int round_probs, int pairs_allowed, int64_t head_stride, int64_t num_kv_heads, int64_t rows,
                    int64_t queries, int64_t length, int64_t dim, const uint8_t *mask, int64_t mask_stride,
                    float *out) {
    if (rows > MAX_ROWS || dim > MAX_DIM || dim % 8 || queries < 1 || rows % queries) return -1;
    static _Thread_local void *logit_buffer, *seen_buffer, *lane_buffer;
    static _Thread_local int64_t logit_capacity, seen_capacity, lane_capacity;
    static _Thread_local float key_block[BLOCK * MAX_DIM], zeros[MAX_DIM];
    static _Thread_local float row_max[MAX_ROWS], row_sum[MAX_ROWS];
    const int64_t lanes = (rows + LANES - 1) / LANES * LANES;
    float *query_t = scratch(&lane_buffer, &lane_capacity, (int64_t)sizeof(float) * lanes * (2 * dim + BLOCK));
    if (!query_t) return -2;
    float *acc = query_t + dim * lanes, *probs = acc + dim * lanes; /* [D, lanes], [lanes, D], [BLOCK, lanes] */
#if HAVE_AMX
    const int amx = is_bf16 && dim % 32 == 0 && amx_permitted();
#else
    const int amx = 0;
#endif
    const int pairs = is_bf16 && (HAVE_BF16_DOT || amx); /* queries as bf16 pairs, keys read in place */
    /* Keys before `open` are seen by every query; past it, seen[(t - open) * lanes + r] says (0 for padding lanes).
     * With value tiles, rows weigh keys [0, bound) of their values with them: whole 64-key blocks, ending 64 keys
     * before a row's last key and at its first hole, so a tree node (prefix, then its ancestors) gets the bound of
     * the decode step of its path. Lanes past the rows take the largest. */
    static _Thread_local int32_t bound[MAX_ROWS];
    const int tile_values = HAVE_AMX_VALUES && amx && round_probs && dim % 64 == 0;
#if HAVE_BF16_DOT
    /* with value tiles, keys past a row's bound must sum as the tiles' prefix code expects: FMAs (weigh_values) */
    const int value_pairs = pairs_allowed && is_bf16 && round_probs && !tile_values && dim % 64 == 0 &&
                            bf16_pairs_in_order();
#endif
    int64_t open = length, bmax = 0;
    for (int64_t n = 0; n < queries && (mask || tile_values); n++) {
        const uint8_t *row = mask ? mask + n * mask_stride : NULL;
        const void *first = row ? memchr(row, 0, (size_t)length) : NULL;
        const int64_t hole = first ? (const uint8_t *)first - row : length;
        open = hole < open ? hole : open;
        if (!tile_values) continue;
        int64_t count = hole;
        for (int64_t t = hole; t < length; t++) count += row[t] != 0;
        int64_t b = count > 64 ? (count - 65) / 64 * 64 : 0;
        b = b < hole / 64 * 64 ? b : hole / 64 * 64;
        for (int64_t r = n; r < rows; r += queries) bound[r] = (int32_t)b;
        bmax = b > bmax ? b : bmax;
    }
    for (int64_t r = rows; r < lanes && tile_values; r++) bound[r] = (int32_t)bmax;
    uint8_t *seen = scratch(&seen_buffer, &seen_capacity, (length - open) * lanes + 1);
    /* whole tiles of 64 keys */
    float *logits = scratch(&logit_buffer, &logit_capacity, (int64_t)sizeof(float) * ((length + 64) * lanes));
    if (!seen || !logits) return -2;
    for (int64_t t = open; t < length; t++) {
        uint8_t *s = seen + (t - open) * lanes;
        for (int64_t r = 0; r < lanes; r++) s[r] = r < rows && mask[(r % queries) * mask_stride + t];
    }
    for (int64_t h = 0; h < num_kv_heads; h++) {
        if (pairs) { /* [D/2, lanes] pairs (q[2p] in the low half), as vdpbf16ps and the tiles want them */
            const uint32_t *q = (const uint32_t *)query + h * rows * dim / 2;
            uint32_t *qt = (uint32_t *)query_t;
            for (int64_t p = 0; p < dim / 2; p++)
                for (int64_t r = 0; r < lanes; r++) qt[p * lanes + r] = r < rows ? q[r * dim / 2 + p] : 0u;
        } else { /* [D, lanes] fp32 (a bf16 query converted, where the CPU has no bf16 dot product) */
            float row[MAX_DIM];
            for (int64_t r = 0; r < lanes; r++) {
                const float *q = r < rows ? as_f32(query, is_bf16, (h * rows + r) * dim, dim, row) : zeros;
                for (int64_t d = 0; d < dim; d++) query_t[d * lanes + r] = q[d];
            }
        }
        for (int64_t r = 0; r < lanes; r++) row_max[r] = NEG_BIG, row_sum[r] = 0.0f;
        memset(acc, 0, sizeof(float) * dim * lanes);
        const int64_t base = h * head_stride;

        /* Pass 1: logits[t, r] = q_r . k_t * scaling (NEG_BIG where unseen), and each row's max. */
#if HAVE_AMX
        if (amx) { /* tiles write raw logits 64 keys at a time (zero keys past the end), then scale, mask and max */
            static _Thread_local uint16_t key_tail[64 * MAX_DIM];
            configure_tiles(0);
            for (int64_t start = 0; start < length; start += 64) {
                const int64_t n = length - start < 64 ? length - start : 64;
                const uint16_t *key_rows = (const uint16_t *)keys + base + start * dim;
                if (n < 64) {
                    memset(key_tail, 0, sizeof(uint16_t) * 64 * dim);
                    memcpy(key_tail, key_rows, sizeof(uint16_t) * n * dim);
                    key_rows = key_tail;
                }
                for (int64_t lane = 0; lane < lanes; lane += LANES)
                    logits64_amx(key_rows, dim, (const uint32_t *)query_t + lane, lanes, logits + start * lanes + lane);
                for (int64_t i = 0; i < n; i++)
                    for (int64_t lane = 0; lane < lanes; lane += LANES) {
                        float *raw = logits + (start + i) * lanes + lane;
                        store_logits(raw, scaling, start + i, open, seen, lanes, lane, logits, row_max);
                    }
            }
        } else
#endif
        for (int64_t start = 0; start < length; start += BLOCK) {
            const int64_t n = length - start < BLOCK ? length - start : BLOCK;
            const float *k = pairs ? NULL : as_f32(keys, is_bf16, base + start * dim, n * dim, key_block);
            for (int64_t lane = 0; lane < lanes; lane += LANES) {
                for (int64_t j = 0; j < n; j += 4) {
                    float s[4][LANES];
                    const int64_t m = n - j < 4 ? n - j : 4;
                    if (pairs) {
                        const uint32_t *key_row[4];
                        for (int64_t i = 0; i < 4; i++)
                            key_row[i] = i < m ? (const uint32_t *)keys + (base + (start + j + i) * dim) / 2
                                               : (const uint32_t *)zeros;
                        logits4_bf16((const uint32_t *)query_t + lane, lanes, key_row, dim / 2, s);
                    } else {
                        const float *key_row[4];
                        for (int64_t i = 0; i < 4; i++) key_row[i] = i < m ? k + (j + i) * dim : zeros;
                        logits4_f32(query_t + lane, lanes, key_row, dim, s);
                    }
                    for (int64_t i = 0; i < m; i++)
                        store_logits(s[i], scaling, start + j + i, open, seen, lanes, lane, logits, row_max);
                }
            }
        }

        /* Pass 2, one key after another: p = exp(logit - max) into the sums, (bf16-rounded) p into the values. */
#if HAVE_AMX_VALUES
        if (bmax) {
            configure_tiles(rows < LANES ? (int)rows : LANES);
            values_prefix_amx(logits, lanes, rows, bound, bmax, (const uint16_t *)values + base, dim, row_max, row_sum,
                              acc);
        }
#endif
        for (int64_t start = bmax; start < length; start += BLOCK) {
            const int64_t n = length - start < BLOCK ? length - start : BLOCK;
            const void *v = is_bf16 ? (const void *)((const uint16_t *)values + base + start * dim)
                                    : (const void *)((const float *)values + base + start * dim);
            key_probs(logits + start * lanes, n, lanes, row_max, row_sum, round_probs, probs);
#if HAVE_BF16_DOT
            if (value_pairs) {
                weigh_value_pairs(probs, lanes, rows, (const uint16_t *)v, n, dim, acc);
                continue;
            }
#endif
            for (int64_t r0 = 0; r0 < rows; r0 += 4) weigh_values(probs, lanes, r0, v, is_bf16, n, dim, acc);
        }
        float *o = out + h * rows * dim;
        for (int64_t r = 0; r < rows; r++) {
            const float inverse = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
            for (int64_t d = 0; d < dim; d++) o[r * dim + d] = acc[r * dim + d] * inverse;
        }
    }
#if HAVE_AMX
    if (amx) _tile_release();
#endif
    return 0;
}
