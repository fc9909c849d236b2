/* Decode attention over WiCore's paged KV pool, reading each key and value in place.
 *
 * One query row per sequence (a decode step): row r attends the keys at positions
 * [start[r], end[r]) of its sequence, found through its block table (the pool's row for
 * position p is table[p / block_size] * block_size + p % block_size). A task is a row and a
 * range of its KV heads; its keys are taken up to PART positions at a time (fewer when the task
 * has many query heads: their scores stay within SCORE_FLOATS):
 *
 *   scores   every query head of the task against the part's keys, W keys at a time (W dot
 *            products, then one transpose-and-add tree), into a small buffer; each slot's K
 *            row (the task's heads side by side) read whole, a block's rows one run of memory;
 *   softmax  each query head's scores of the part at once, in vectors: maximum, exp, sum,
 *            folded into its running maximum and sum (its value sums rescaled once a part);
 *   values   the weighted sum of the part's values, block by block and head by head, the sums
 *            of up to GT query heads x 4 vectors of the head dimension held in registers.
 *
 * So every key and value is read from where it lies, nothing is copied out of the pool, and no
 * work per key is scalar. The previous version folded each W keys into the running softmax with
 * scalar loops and kept its accumulators in memory; on SmolLM2's shapes (16 rows, 9 query heads
 * over 3 KV heads of 64, 2 threads, AMD EPYC Zen 4) this one takes 74-80 us a call at 160 keys a
 * row in cache (was 139-152) and 2.6-3.5 ms at 2,048 from memory (was 4.0-6.3). From memory it
 * reads ~15 GB/s, a third of what a plain sequential read gets there: the pool's 16-slot blocks
 * lie anywhere, and software prefetching one or more runs ahead measured no better.
 *
 * Written with GCC's vector extensions, W floats a vector, and built on the machine that runs it
 * (wicore.worker.native: -O3 -march=native), so the vectors are that CPU's widest.
 *
 * Output: out [rows, heads, dim] and, when lse is not NULL, the log-sum-exp of each head's
 * scores [rows, heads] (-inf for an empty range, whose output is zero), so that the caller can
 * merge this with attention over other keys (a shared prefix).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Vector width W: 16 floats where the build machine has AVX-512 (it is built with -march=native
 * where it runs), 8 elsewhere. KEYS = W keys are scored together. */
#ifdef __AVX512F__
#define W 16
#else
#define W 8
#endif
#define KEYS W
#define MAX_GROUP 16
#define MAX_HEADS 256
#define MAX_DIM 256
#define INLINE static inline __attribute__((always_inline))

typedef float vec __attribute__((vector_size(W * 4)));
typedef int32_t veci __attribute__((vector_size(W * 4)));
typedef uint16_t vech __attribute__((vector_size(W * 2)));

INLINE vec splat(float x) { return x - (vec){0}; }

INLINE vec load_f32(const float *p) {
    vec x;
    memcpy(&x, p, sizeof x);
    return x;
}

INLINE vec load_bf16(const uint16_t *p) {
    vech h;
    memcpy(&h, p, sizeof h);
    return (vec)(__builtin_convertvector(h, veci) << 16);
}

INLINE vec load(const void *pool, int bf16, int64_t at) {
    return bf16 ? load_bf16((const uint16_t *)pool + at) : load_f32((const float *)pool + at);
}

INLINE vec choose(veci mask, vec a, vec b) { return (vec)(((veci)a & mask) | ((veci)b & ~mask)); }

/* exp(x) for x <= 0: 2^n * p(r) with |r| <= ln2/2, p of degree 6 (relative error ~2e-7, as
 * expf); 0 below -87 (and for -inf). */
INLINE vec exp_nonpos(vec x) {
    veci tiny = x < splat(-87.0f);
    x = choose(tiny, splat(-87.0f), x);
    vec n = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
    vec r = x - n * splat(0.693145751953125f) - n * splat(1.428606765330187045e-06f);
    vec p = splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    vec scale = (vec)((__builtin_convertvector(n, veci) + 127) << 23);
    return choose(tiny, splat(0.0f), p * scale);
}

/* Lane j of the result: the sum of the W lanes of part[j] (a transpose-and-add tree). */
INLINE vec sum_lanes(vec part[KEYS]) {
#if W == 8
    const veci lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    const veci lo2 = {0, 1, 4, 5, 8, 9, 12, 13}, hi2 = {2, 3, 6, 7, 10, 11, 14, 15};
    const veci lo1 = {0, 2, 4, 6, 8, 10, 12, 14}, hi1 = {1, 3, 5, 7, 9, 11, 13, 15};
    vec b[4], c[2];
    for (int i = 0; i < 4; i++)
        b[i] = __builtin_shuffle(part[2 * i], part[2 * i + 1], lo4) +
               __builtin_shuffle(part[2 * i], part[2 * i + 1], hi4);
#else
    const veci lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const veci hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const veci lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const veci hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const veci lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const veci hi2 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const veci lo1 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const veci hi1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    vec a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = __builtin_shuffle(part[2 * i], part[2 * i + 1], lo8) +
               __builtin_shuffle(part[2 * i], part[2 * i + 1], hi8);
    for (int i = 0; i < 4; i++)
        b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo4) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi4);
#endif
    for (int i = 0; i < 2; i++)
        c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo2) + __builtin_shuffle(b[2 * i], b[2 * i + 1], hi2);
    return __builtin_shuffle(c[0], c[1], lo1) + __builtin_shuffle(c[0], c[1], hi1);
}

/* Asks the memory for the keys and values at positions [pos, pos + W) (`width` elements of each slot
 * from `offset`: the task's heads, side by side) while the current ones are scored: a decode step's
 * K/V were last touched a whole step ago and are rarely in a cache. */
INLINE void prefetch_keys(const void *k_pool, const void *v_pool, int bf16, const int64_t *table, int pos,
                          int end, int block_size, int64_t kv_stride, int64_t offset, int width) {
    int off = pos % block_size;
    int n = block_size - off;
    n = n < end - pos ? n : end - pos;
    n = n < KEYS ? n : KEYS;
    int64_t first = (table[pos / block_size] * block_size + off) * kv_stride + offset;
    int item = bf16 ? 2 : 4;
    for (int j = 0; j < n; j++) {
        const char *k = (const char *)k_pool + (first + j * kv_stride) * item;
        const char *v = (const char *)v_pool + (first + j * kv_stride) * item;
        for (int byte = 0; byte < width * item; byte += 64) {
            __builtin_prefetch(k + byte);
            __builtin_prefetch(v + byte, 0, 2); /* to L2: read after the part's scores */
        }
    }
}

#define PART 128 /* keys per part at most: scored, then their softmax, then their values */
#define SCORE_FLOATS 8192 /* the part's scores, all query heads of a task (32 KB: L1) */
#define GT 4 /* query heads whose value accumulators are held in registers together */

/* The run of positions [pos, pos + n) that lies in one block and in [pos, end), at most `most`. */
INLINE int run_at(const int64_t *table, int pos, int end, int block_size, int most, int64_t *slot) {
    int off = pos % block_size;
    int n = block_size - off;
    n = n < end - pos ? n : end - pos;
    n = n < most ? n : most;
    *slot = table[pos / block_size] * block_size + off;
    return n;
}

/* scores[g][i] = q[g] . key(p0 + i) for every query head g of the task (qv [hq][chunks], scaled),
 * i < p1 - p0, W keys at a time and every head of those keys in turn: each slot's K row (the task's
 * heads side by side) is read whole, and a block's rows are one run of memory. */
INLINE void score_part(const vec *qv, const void *k_pool, const void *v_pool, int bf16, const int64_t *table,
                       int p0, int p1, int end, int block_size, int64_t kv_stride, int64_t base, int nh,
                       int group, const int chunks, int srow, float *scores) {
    for (int pos = p0; pos < p1;) {
        int64_t slot;
        int n = run_at(table, pos, p1, block_size, KEYS, &slot);
        if (pos + n < end)
            prefetch_keys(k_pool, v_pool, bf16, table, pos + n, end, block_size, kv_stride, base, nh * chunks * W);
        for (int h = 0; h < nh; h++) {
            int64_t first = slot * kv_stride + base + (int64_t)h * chunks * W;
            for (int g = h * group; g < (h + 1) * group; g++) {
                /* W keys always, the last one repeated past n: no branch, so that W independent dot
                 * products are in flight (scores past n are overwritten by the next run or masked). */
                vec part[KEYS];
                for (int j = 0; j < KEYS; j++) {
                    int64_t at = first + (j < n ? j : n - 1) * kv_stride;
                    vec s = qv[g * chunks] * load(k_pool, bf16, at);
                    for (int c = 1; c < chunks; c++) s += qv[g * chunks + c] * load(k_pool, bf16, at + c * W);
                    part[j] = s;
                }
                vec summed = sum_lanes(part);
                memcpy(scores + g * srow + (pos - p0), &summed, sizeof summed);
            }
        }
        pos += n;
    }
}

INLINE float max_lanes(vec x) {
    float lanes[W], top = -INFINITY;
    memcpy(lanes, &x, sizeof lanes);
    for (int i = 0; i < W; i++) top = lanes[i] > top ? lanes[i] : top;
    return top;
}

INLINE float add_lanes(vec x) {
    float lanes[W], total = 0.0f;
    memcpy(lanes, &x, sizeof lanes);
    for (int i = 0; i < W; i++) total += lanes[i];
    return total;
}

/* Turns one query head's n scores into exp(score - new maximum) in place and folds them into the
 * running maximum *m and sum *l; returns the factor the accumulated values must be scaled by. */
INLINE float softmax_part(float *row, int n, float *m, float *l) {
    int padded = (n + W - 1) / W * W;
    for (int j = n; j < padded; j++) row[j] = -INFINITY;
    vec top = splat(-INFINITY);
    for (int j = 0; j < padded; j += W) {
        vec x = load_f32(row + j);
        top = choose(x > top, x, top);
    }
    float peak = max_lanes(top);
    peak = *m > peak ? *m : peak;
    vec sum = splat(0.0f);
    for (int j = 0; j < padded; j += W) {
        vec p = exp_nonpos(load_f32(row + j) - splat(peak));
        memcpy(row + j, &p, sizeof p);
        sum += p;
    }
    float correction = *m == -INFINITY ? 0.0f : expf(*m - peak);
    *l = *l * correction + add_lanes(sum);
    *m = peak;
    return correction;
}

/* acc[g][c0 .. c0 + CW) += sum over j < n of weights[g][j] * value row j [c0 .. c0 + CW), for query
 * heads g0 .. g0 + GT of one KV head (those past g1 repeat the last one's work, not stored); the
 * value rows from `first`, kv_stride apart. */
INLINE void add_values(const void *v_pool, int bf16, int64_t first, int n, int64_t kv_stride,
                       const float *weights, int srow, int g0, int g1, int c0, const int CW, const int chunks,
                       vec *acc) {
    int gs[GT];
    for (int i = 0; i < GT; i++) gs[i] = g0 + i < g1 ? g0 + i : g1 - 1;
    vec a[GT][4]; /* CW <= 4, a constant: fixed sizes, so that a and v live in registers */
    for (int i = 0; i < GT; i++)
        for (int c = 0; c < CW; c++) a[i][c] = acc[gs[i] * chunks + c0 + c];
    first += (int64_t)c0 * W;
    for (int j = 0; j < n; j++) {
        vec v[4];
        for (int c = 0; c < CW; c++) v[c] = load(v_pool, bf16, first + j * kv_stride + c * W);
        for (int i = 0; i < GT; i++) {
            vec p = splat(weights[gs[i] * srow + j]);
            for (int c = 0; c < CW; c++) a[i][c] += p * v[c];
        }
    }
    for (int i = 0; i < GT && g0 + i < g1; i++)
        for (int c = 0; c < CW; c++) acc[gs[i] * chunks + c0 + c] = a[i][c];
}

/* One row's KV heads [h0, h1): q [heads][dim] fp32 of those heads' query heads (group each); the
 * keys at positions [start, end). */
INLINE void attend(const float *q, const void *k_pool, const void *v_pool, const int bf16,
                   const int64_t *table, int start, int end, int block_size, int64_t kv_stride, int h0,
                   int h1, int group, const int chunks, float scale, float *out, float *lse) {
    int nh = h1 - h0, hq = nh * group;
    int64_t base = (int64_t)h0 * chunks * W;
    /* Each query head's scores of a part (W more: a run of W may overrun it), all in SCORE_FLOATS. */
    int part = (SCORE_FLOATS / hq - W) / W * W;
    part = part > PART ? PART : part < W ? W : part;
    int srow = part + W;
    vec acc[hq * chunks], qv[hq * chunks];
    float m[hq], l[hq], scores[SCORE_FLOATS > hq * 2 * W ? SCORE_FLOATS : hq * 2 * W];
    for (int i = 0; i < hq * chunks; i++) {
        qv[i] = load_f32(q + i * W) * splat(scale);
        acc[i] = splat(0.0f);
    }
    for (int g = 0; g < hq; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int p0 = start; p0 < end; p0 += part) {
        int p1 = end - p0 < part ? end : p0 + part;
        score_part(qv, k_pool, v_pool, bf16, table, p0, p1, end, block_size, kv_stride, base, nh, group, chunks,
                   srow, scores);
        for (int g = 0; g < hq; g++) {
            float correction = softmax_part(scores + g * srow, p1 - p0, &m[g], &l[g]);
            if (correction != 1.0f)
                for (int c = 0; c < chunks; c++) acc[g * chunks + c] *= splat(correction);
        }
        /* Block by block, every head of each value row in turn (rows read whole, as the keys). */
        for (int pos = p0; pos < p1;) {
            int64_t slot;
            int n = run_at(table, pos, p1, block_size, block_size, &slot);
            for (int h = 0; h < nh; h++) {
                int64_t first = slot * kv_stride + base + (int64_t)h * chunks * W;
                const float *weights = scores + (pos - p0);
                for (int g0 = h * group; g0 < (h + 1) * group; g0 += GT)
                    for (int c0 = 0; c0 < chunks;) { /* CW a constant in each call: registers */
                        if (chunks - c0 >= 4) {
                            add_values(v_pool, bf16, first, n, kv_stride, weights, srow, g0, (h + 1) * group, c0,
                                       4, chunks, acc);
                            c0 += 4;
                        } else if (chunks - c0 >= 2) {
                            add_values(v_pool, bf16, first, n, kv_stride, weights, srow, g0, (h + 1) * group, c0,
                                       2, chunks, acc);
                            c0 += 2;
                        } else {
                            add_values(v_pool, bf16, first, n, kv_stride, weights, srow, g0, (h + 1) * group, c0,
                                       1, chunks, acc);
                            c0 += 1;
                        }
                    }
            }
            pos += n;
        }
    }
    for (int g = 0; g < hq; g++) {
        float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int c = 0; c < chunks; c++) {
            vec o = acc[g * chunks + c] * splat(inv);
            memcpy(out + (g * chunks + c) * W, &o, sizeof o);
        }
        if (lse) lse[g] = l[g] > 0.0f ? m[g] + logf(l[g]) : -INFINITY;
    }
}

/* Query heads per KV head, or 0 for sizes the kernels do not take (dim not a multiple of W or above
 * 256, more than 16 query heads per KV head or 256 in all). */
static int query_group(int heads, int kv_heads, int dim, int block_size) {
    int group = kv_heads > 0 ? heads / kv_heads : 0;
    if (group < 1 || group > MAX_GROUP || heads > MAX_HEADS || group * kv_heads != heads || dim % W ||
        dim > MAX_DIM || block_size < 1)
        return 0;
    return group;
}

/* q, out [rows, heads, dim] fp32; k_pool, v_pool [slots, kv_heads, dim], fp32 (bf16 = 0) or bf16
 * (bf16 = 1); tables [rows, table_stride] int64 block ids; starts, ends [rows] int64; window > 0
 * also hides keys `window` or more positions before the row's last key (end - 1).
 * Returns 0, or -1 for sizes this kernel does not take (dim not a multiple of W or above 256,
 * more than 16 query heads per KV head or 256 in all). */
int wicore_paged_decode(const float *q, const void *k_pool, const void *v_pool, int bf16,
                        const int64_t *tables, int64_t table_stride, const int64_t *starts,
                        const int64_t *ends, int rows, int heads, int kv_heads, int dim, int block_size,
                        int window, float scale, float *out, float *lse, int threads) {
    int group = query_group(heads, kv_heads, dim, block_size), chunks = dim / W;
    if (!group) return -1;
    int64_t kv_stride = (int64_t)kv_heads * dim;
    /* A task per row (all its KV heads: whole slot rows read) when there are rows enough to keep
     * every thread busy; otherwise a task per (row, KV head). */
    int split = rows >= 2 * threads ? 1 : kv_heads;
    int tasks = rows * split, per_task = kv_heads / split;
#pragma omp parallel for schedule(static) num_threads(threads) if (tasks > 1)
    for (int t = 0; t < tasks; t++) {
        int r = t / split, h0 = (t % split) * per_task;
        int start = (int)starts[r], end = (int)ends[r];
        if (window > 0 && end - window > start) start = end - window;
        int64_t at = ((int64_t)r * heads + (int64_t)h0 * group) * dim;
        const int64_t *table = tables + (int64_t)r * table_stride;
        float *row_lse = lse ? lse + (int64_t)r * heads + (int64_t)h0 * group : 0;
        /* The element type and the head dimension constants in each call (loops unrolled, no test per
         * load); other head dimensions (a multiple of W) through the general one. */
#define ATTEND(BF16, CHUNKS)                                                                                   \
    attend(q + at, k_pool, v_pool, BF16, table, start, end, block_size, kv_stride, h0, h0 + per_task, group, \
           CHUNKS, scale, out + at, row_lse)
#define ATTEND_DIMS(BF16)                                                                                      \
    switch (chunks) {                                                                                          \
    case 64 / W: ATTEND(BF16, 64 / W); break;                                                                  \
    case 128 / W: ATTEND(BF16, 128 / W); break;                                                                \
    case 256 / W: ATTEND(BF16, 256 / W); break;                                                                \
    default: ATTEND(BF16, chunks);                                                                             \
    }
        if (bf16)
            ATTEND_DIMS(1)
        else
            ATTEND_DIMS(0)
    }
    return 0;
}

/* ---- A shared prefix, once for every sequence that holds it (cascade attention) ----
 *
 * Sequences that share their leading blocks (prefix-cache hits of one prompt) attend those blocks
 * together: for each KV head, the queries of every member and every query head of that KV head are
 * the rows of one small GEMM-shaped attention against the prefix, so each prefix key and value is
 * read once a step for all of them, not once per sequence. The rows' result is then merged, by
 * log-sum-exp, into what the per-sequence kernel above computed over each one's own keys.
 *
 * Rows are kept transposed (a vector holds W rows), so that no key or value is ever transposed:
 *
 *   scores   St[key][rows] = K . Qt: each key's elements broadcast from where it lies in the pool
 *            against W rows of queries at a time, a tile of PTK keys x PRV row vectors in registers;
 *   softmax  column-wise, every op across W rows at once (running maximum and sum per row);
 *   values   Ot[dim][rows] += V^T . St: each value element broadcast against W rows of weights, a
 *            tile of PTK dimensions x PRV row vectors in registers.
 *
 * A task is a KV head, at most PROWS rows of it and a range of the prefix's keys (split so that
 * every thread has work); each keeps its running sums apart, and all are merged at the end. */

#define PCHUNK 64             /* prefix keys scored, then weighed, at a time */
#define PROWS (8 * W)         /* rows (member, query head) per task at most */
#define PTK (W == 16 ? 8 : 4) /* keys (scores) or dimensions (values) in a register tile */
#define PRV 3                 /* row vectors in a register tile */
_Static_assert(PCHUNK % PTK == 0 && W % PTK == 0, "a chunk's keys and a head's dimensions are whole tiles");

INLINE float scalar_at(const void *pool, const int BF16, int64_t at) {
    if (BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)pool)[at] << 16;
        float x;
        memcpy(&x, &bits, sizeof x);
        return x;
    }
    return ((const float *)pool)[at];
}

/* St[j][rv0 .. rv0 + RV) for keys j0 .. j0 + PTK: Qt [dim][rp] (rp rows, padded), koff each key's
 * first element in the pool. */
INLINE void prefix_scores(const float *qt, int rp, const void *k_pool, const int BF16, const int64_t *koff,
                          int j0, int rv0, const int RV, int dim, float *st) {
    vec acc[PTK][PRV];
    for (int t = 0; t < PTK; t++)
        for (int r = 0; r < RV; r++) acc[t][r] = splat(0.0f);
    for (int d = 0; d < dim; d++) {
        vec qv[PRV];
        for (int r = 0; r < RV; r++) qv[r] = load_f32(qt + (int64_t)d * rp + (rv0 + r) * W);
        for (int t = 0; t < PTK; t++) {
            vec k = splat(scalar_at(k_pool, BF16, koff[j0 + t] + d));
            for (int r = 0; r < RV; r++) acc[t][r] += k * qv[r];
        }
    }
    for (int t = 0; t < PTK; t++)
        for (int r = 0; r < RV; r++) memcpy(st + (int64_t)(j0 + t) * rp + (rv0 + r) * W, &acc[t][r], sizeof(vec));
}

/* Ot[d0 .. d0 + PTK][rv0 .. rv0 + RV) += sum over j < n of value(j)[d] * St[j][rows]. */
INLINE void prefix_values(const float *st, int rp, const void *v_pool, const int BF16, const int64_t *koff, int n,
                          int d0, int rv0, const int RV, float *ot) {
    vec acc[PTK][PRV];
    for (int t = 0; t < PTK; t++)
        for (int r = 0; r < RV; r++) acc[t][r] = load_f32(ot + (int64_t)(d0 + t) * rp + (rv0 + r) * W);
    for (int j = 0; j < n; j++) {
        vec p[PRV];
        for (int r = 0; r < RV; r++) p[r] = load_f32(st + (int64_t)j * rp + (rv0 + r) * W);
        for (int t = 0; t < PTK; t++) {
            vec v = splat(scalar_at(v_pool, BF16, koff[j] + d0 + t));
            for (int r = 0; r < RV; r++) acc[t][r] += v * p[r];
        }
    }
    for (int t = 0; t < PTK; t++)
        for (int r = 0; r < RV; r++) memcpy(ot + (int64_t)(d0 + t) * rp + (rv0 + r) * W, &acc[t][r], sizeof(vec));
}

/* Every row vector of a tile call, PRV at a time and the rest one by one (RV a constant in each). */
#define ROW_TILES(rvs, CALL)                                                                                   \
    do {                                                                                                       \
        int rv0_ = 0;                                                                                          \
        for (; rv0_ + PRV <= (rvs); rv0_ += PRV) CALL(rv0_, PRV);                                              \
        for (; rv0_ < (rvs); rv0_++) CALL(rv0_, 1);                                                            \
    } while (0)

/* offsets[j]: where the key at prefix position c0 + j starts in the pool (block blocks[p / block_size],
 * slot p % block_size, then `head` elements in), for the chunk's keys before p1; past them, the last
 * one again (scored, never weighed). Walks the blocks: no division per key. */
INLINE void chunk_offsets(const int64_t *blocks, int block_size, int64_t kv_stride, int64_t head, int c0, int p1,
                          int64_t *offsets) {
    int n = p1 - c0 < PCHUNK ? p1 - c0 : PCHUNK;
    int block = c0 / block_size, slot = c0 % block_size;
    for (int j = 0; j < n; j++) {
        offsets[j] = (blocks[block] * block_size + slot) * kv_stride + head;
        if (++slot == block_size) {
            slot = 0;
            block++;
        }
    }
    for (int j = n; j < PCHUNK; j++) offsets[j] = offsets[n - 1];
}

/* One task: the keys at prefix positions [p0, p1) (slot of position p: blocks[p / block_size] *
 * block_size + p % block_size) of KV head h for rp rows (padded to vectors), their scaled queries
 * in qt [dim][rp]; lo [rp]: each row's first visible position (its sliding window). Leaves the
 * unnormalised sums in ot [dim][rp] and each row's running maximum and sum in m, l [rp]. */
static void prefix_task(const float *qt, int rp, const float *lo, int window, const void *k_pool,
                        const void *v_pool, const int BF16, const int64_t *blocks, int block_size, int64_t kv_stride,
                        int h, int dim, int p0, int p1, float *st, float *ot, float *m, float *l) {
    int rvs = rp / W;
    int64_t offsets[2][PCHUNK]; /* each key's first element in the pool: this chunk's, the next one's */
    for (int i = 0; i < dim * rp; i++) ot[i] = 0.0f;
    for (int i = 0; i < rp; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    int item = BF16 ? 2 : 4;
    chunk_offsets(blocks, block_size, kv_stride, (int64_t)h * dim, p0, p1, offsets[0]);
    for (int c0 = p0, c = 0; c0 < p1; c0 += PCHUNK, c ^= 1) {
        int n = p1 - c0 < PCHUNK ? p1 - c0 : PCHUNK;
        const int64_t *koff = offsets[c];
        /* The next chunk's keys and values, asked of the memory while this one is computed: the
         * prefix was last read a layer's step ago, and its rows lie kv_stride apart, in scattered blocks. */
        if (c0 + PCHUNK < p1) {
            int64_t *next = offsets[c ^ 1];
            chunk_offsets(blocks, block_size, kv_stride, (int64_t)h * dim, c0 + PCHUNK, p1, next);
            for (int j = 0; j < PCHUNK && c0 + PCHUNK + j < p1; j++)
                for (int byte = 0; byte < dim * item; byte += 64) {
                    __builtin_prefetch((const char *)k_pool + next[j] * item + byte);
                    __builtin_prefetch((const char *)v_pool + next[j] * item + byte, 0, 2);
                }
        }
        for (int j0 = 0; j0 < PCHUNK; j0 += PTK) {
#define SCORES(rv0, RV) prefix_scores(qt, rp, k_pool, BF16, koff, j0, rv0, RV, dim, st)
            ROW_TILES(rvs, SCORES);
#undef SCORES
        }
        for (int rv = 0; rv < rvs; rv++) {
            vec top = splat(-INFINITY), first = splat(0.0f);
            if (window > 0) first = load_f32(lo + rv * W);
            for (int j = 0; j < n; j++) {
                vec s = load_f32(st + (int64_t)j * rp + rv * W);
                if (window > 0) {
                    s = choose(splat((float)(c0 + j)) < first, splat(-INFINITY), s);
                    memcpy(st + (int64_t)j * rp + rv * W, &s, sizeof s);
                }
                top = choose(s > top, s, top);
            }
            vec old = load_f32(m + rv * W);
            vec peak = choose(old > top, old, top);
            vec safe = choose(peak == splat(-INFINITY), splat(0.0f), peak);
            vec correction = exp_nonpos(old - safe), sum = splat(0.0f);
            for (int j = 0; j < n; j++) {
                vec p = exp_nonpos(load_f32(st + (int64_t)j * rp + rv * W) - safe);
                memcpy(st + (int64_t)j * rp + rv * W, &p, sizeof p);
                sum += p;
            }
            vec total = load_f32(l + rv * W) * correction + sum;
            memcpy(l + rv * W, &total, sizeof total);
            memcpy(m + rv * W, &peak, sizeof peak);
            for (int d = 0; d < dim; d++) {
                vec o = load_f32(ot + (int64_t)d * rp + rv * W) * correction;
                memcpy(ot + (int64_t)d * rp + rv * W, &o, sizeof o);
            }
        }
        for (int d0 = 0; d0 < dim; d0 += PTK) {
#define VALUES(rv0, RV) prefix_values(st, rp, v_pool, BF16, koff, n, d0, rv0, RV, ot)
            ROW_TILES(rvs, VALUES);
#undef VALUES
        }
    }
}

/* A task's part of the scratch, rp rows (padded): its queries qt [dim][rp], sums ot [dim][rp], a
 * chunk's scores st [PCHUNK][rp], running maximum m, sum l and first visible position lo [rp]. */
struct prefix_scratch {
    float *qt, *ot, *st, *m, *l, *lo;
};

INLINE struct prefix_scratch task_scratch(float *at, int dim, int rp) {
    struct prefix_scratch t;
    t.qt = at;
    t.ot = t.qt + (int64_t)dim * rp;
    t.st = t.ot + (int64_t)dim * rp;
    t.m = t.st + (int64_t)PCHUNK * rp;
    t.l = t.m + rp;
    t.lo = t.l + rp;
    return t;
}

/* Merges each group's shared prefix into a decode step's own-keys attention, in place.
 *
 * q, out [rows, heads, dim] fp32 and lse [rows, heads]: the step's rotated queries, and the per-sequence
 * kernel's output over each row's own keys with its log-sum-exp (wicore_paged_decode's). Group g's
 * members are the rows members[member_offsets[g] .. member_offsets[g + 1]), sharing the prefix blocks
 * blocks[block_offsets[g] .. block_offsets[g + 1]) (positions 0 .. its length); k_pool, v_pool as
 * wicore_paged_decode's; ends [rows]: each row's key count (its query is at ends - 1, for `window`).
 * Returns 0, -1 for sizes the kernel does not take (as wicore_paged_decode), -2 if out of memory. */
int wicore_prefix_decode(const float *q, const void *k_pool, const void *v_pool, int bf16, int groups,
                         const int64_t *member_offsets, const int64_t *members, const int64_t *block_offsets,
                         const int64_t *blocks, const int64_t *ends, int heads, int kv_heads, int dim,
                         int block_size, int window, float scale, float *out, float *lse, int threads) {
    int group = query_group(heads, kv_heads, dim, block_size);
    if (!group) return -1;
    int64_t kv_stride = (int64_t)kv_heads * dim;
    for (int g = 0; g < groups; g++) {
        const int64_t *member = members + member_offsets[g], *prefix = blocks + block_offsets[g];
        int count = (int)(member_offsets[g + 1] - member_offsets[g]);
        int keys = (int)(block_offsets[g + 1] - block_offsets[g]) * block_size;
        int rows = count * group; /* row i: member i / group, query head h * group + i % group */
        if (rows == 0 || keys == 0) continue;
        int row_blocks = (rows + PROWS - 1) / PROWS, chunks = (keys + PCHUNK - 1) / PCHUNK;
        int base = kv_heads * row_blocks;
        int splits = (2 * threads + base - 1) / base;
        splits = splits > chunks ? chunks : splits;
        int tasks = base * splits, rp_most = row_blocks > 1 ? PROWS : (rows + W - 1) / W * W;
        int64_t per_task = (int64_t)rp_most * (2 * dim + PCHUNK + 3);
        float *scratch = malloc((size_t)(tasks * per_task) * sizeof(float));
        if (!scratch) return -2;
#pragma omp parallel num_threads(threads) if (tasks > 1)
        {
#pragma omp for schedule(static)
            for (int t = 0; t < tasks; t++) {
                int h = t / (row_blocks * splits), rb = t / splits % row_blocks, s = t % splits;
                int r0 = rb * PROWS, nr = rows - r0 < PROWS ? rows - r0 : PROWS, rp = (nr + W - 1) / W * W;
                struct prefix_scratch x = task_scratch(scratch + t * per_task, dim, rp);
                float *qt = x.qt, *lo = x.lo;
                for (int i = 0; i < rp; i++) {
                    int row = r0 + (i < nr ? i : nr - 1); /* padding: the last row again, never read */
                    int64_t r = member[row / group];
                    const float *qrow = q + (r * heads + (int64_t)h * group + row % group) * dim;
                    for (int d = 0; d < dim; d++) qt[(int64_t)d * rp + i] = qrow[d] * scale;
                    lo[i] = (float)(ends[r] - window);
                }
                int p0 = (int)((int64_t)chunks * s / splits) * PCHUNK;
                int p1 = (int)((int64_t)chunks * (s + 1) / splits) * PCHUNK;
                p1 = p1 < keys ? p1 : keys;
                if (bf16)
                    prefix_task(qt, rp, lo, window, k_pool, v_pool, 1, prefix, block_size, kv_stride, h, dim, p0,
                                p1, x.st, x.ot, x.m, x.l);
                else
                    prefix_task(qt, rp, lo, window, k_pool, v_pool, 0, prefix, block_size, kv_stride, h, dim, p0,
                                p1, x.st, x.ot, x.m, x.l);
            }
            /* Each (KV head, row): its own part and every split of the prefix, by log-sum-exp. */
#pragma omp for schedule(static)
            for (int item = 0; item < kv_heads * rows; item++) {
                int h = item / rows, row = item % rows, rb = row / PROWS, i = row % PROWS;
                int nr = rows - rb * PROWS < PROWS ? rows - rb * PROWS : PROWS, rp = (nr + W - 1) / W * W;
                int64_t r = member[row / group], head = (int64_t)h * group + row % group;
                float *o = out + (r * heads + head) * dim, own = lse[r * heads + head];
                float *first = scratch + (int64_t)(h * row_blocks + rb) * splits * per_task, top = own;
                for (int s = 0; s < splits; s++) {
                    struct prefix_scratch x = task_scratch(first + s * per_task, dim, rp);
                    if (x.l[i] > 0.0f && x.m[i] + logf(x.l[i]) > top) top = x.m[i] + logf(x.l[i]);
                }
                if (top == -INFINITY) continue; /* no key at all: stays empty */
                float w = own == -INFINITY ? 0.0f : expf(own - top), total = w;
                for (int d = 0; d < dim; d++) o[d] *= w;
                for (int s = 0; s < splits; s++) {
                    struct prefix_scratch x = task_scratch(first + s * per_task, dim, rp);
                    if (!(x.l[i] > 0.0f)) continue;
                    float e = expf(x.m[i] - top);
                    total += x.l[i] * e;
                    for (int d = 0; d < dim; d++) o[d] += x.ot[(int64_t)d * rp + i] * e;
                }
                for (int d = 0; d < dim; d++) o[d] /= total;
                lse[r * heads + head] = top + logf(total);
            }
        }
        free(scratch);
    }
    return 0;
}
