/* Decode attention over WiCore's paged KV pool, reading each key and value in place.
 *
 * One query row per sequence (a decode step): row r attends the keys at positions
 * [start[r], end[r]) of its sequence, found through its block table (the pool's row for
 * position p is table[p / block_size] * block_size + p % block_size). Each (row, KV head) is
 * one task: its `group` query heads are scored against W keys at a time, then folded into
 * a running softmax (maximum, sum, weighted values), so every key and value is read once, from
 * where it lies, and nothing is copied out of the pool.
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

INLINE vec select(veci mask, vec a, vec b) { return (vec)(((veci)a & mask) | ((veci)b & ~mask)); }

/* exp(x) for x <= 0: 2^n * p(r) with |r| <= ln2/2, p of degree 6 (relative error ~2e-7, as
 * expf); 0 below -87 (and for -inf). */
INLINE vec exp_nonpos(vec x) {
    veci tiny = x < splat(-87.0f);
    x = select(tiny, splat(-87.0f), x);
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
    return select(tiny, splat(0.0f), p * scale);
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

/* Asks the memory for the keys and values that positions [pos, pos + W) will read (`width` floats
 * of each slot from `offset`) while the current ones are scored: a decode step's K/V were last
 * touched a whole step ago and are rarely in a cache. */
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
            __builtin_prefetch(v + byte);
        }
    }
}

/* One row's KV heads [h0, h1): q [heads][dim] fp32 of those heads' query heads (group each); the
 * keys at positions [start, end). Per W positions, every KV head in turn: its slots' K/V lie side
 * by side, so a task over all of a row's heads reads each slot's K/V row whole. */
INLINE void attend(const float *q, const void *k_pool, const void *v_pool, int bf16, const int64_t *table,
                   int start, int end, int block_size, int64_t kv_stride, int h0, int h1, int group,
                   int chunks, float scale, float *out, float *lse) {
    int dim = chunks * W, hq = (h1 - h0) * group;
    vec qv[hq][chunks], acc[hq][chunks];
    float m[hq], l[hq], probs[hq][KEYS];
    for (int g = 0; g < hq; g++) {
        for (int c = 0; c < chunks; c++) {
            qv[g][c] = load_f32(q + (g * chunks + c) * W) * splat(scale);
            acc[g][c] = splat(0.0f);
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int pos = start; pos < end;) {
        int off = pos % block_size;
        int n = block_size - off;
        n = n < end - pos ? n : end - pos;
        n = n < KEYS ? n : KEYS;
        int64_t slot = table[pos / block_size] * block_size + off;
        if (pos + n < end)
            prefetch_keys(k_pool, v_pool, bf16, table, pos + n, end, block_size, kv_stride, (int64_t)h0 * dim,
                          (h1 - h0) * dim);
        for (int h = h0; h < h1; h++) {
            int64_t first = slot * kv_stride + (int64_t)h * dim;
            int g0 = (h - h0) * group;
            for (int g = g0; g < g0 + group; g++) {
                vec part[KEYS];
                for (int j = 0; j < KEYS; j++) {
                    vec s = splat(0.0f);
                    if (j < n)
                        for (int c = 0; c < chunks; c++)
                            s += qv[g][c] * load(k_pool, bf16, first + j * kv_stride + c * W);
                    part[j] = s;
                }
                float scores[KEYS];
                vec summed = sum_lanes(part);
                memcpy(scores, &summed, sizeof scores);
                float top = m[g];
                for (int j = 0; j < n; j++) top = scores[j] > top ? scores[j] : top;
                for (int j = n; j < KEYS; j++) scores[j] = -INFINITY;
                memcpy(&summed, scores, sizeof scores);
                vec p = exp_nonpos(summed - splat(top));
                memcpy(probs[g], &p, sizeof p);
                float sum = 0.0f;
                for (int j = 0; j < n; j++) sum += probs[g][j];
                float correction = m[g] == -INFINITY ? 0.0f : expf(m[g] - top);
                l[g] = l[g] * correction + sum;
                m[g] = top;
                if (correction != 1.0f)
                    for (int c = 0; c < chunks; c++) acc[g][c] *= splat(correction);
            }
            for (int c = 0; c < chunks; c++) {
                for (int g = g0; g < g0 + group; g++) {
                    vec even = acc[g][c], odd = splat(0.0f);
                    int j = 0;
                    for (; j + 1 < n; j += 2) {
                        even += splat(probs[g][j]) * load(v_pool, bf16, first + j * kv_stride + c * W);
                        odd += splat(probs[g][j + 1]) * load(v_pool, bf16, first + (j + 1) * kv_stride + c * W);
                    }
                    if (j < n) even += splat(probs[g][j]) * load(v_pool, bf16, first + j * kv_stride + c * W);
                    acc[g][c] = even + odd;
                }
            }
        }
        pos += n;
    }
    for (int g = 0; g < hq; g++) {
        float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int c = 0; c < chunks; c++) {
            vec o = acc[g][c] * splat(inv);
            memcpy(out + (g * chunks + c) * W, &o, sizeof o);
        }
        if (lse) lse[g] = l[g] > 0.0f ? m[g] + logf(l[g]) : -INFINITY;
    }
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
    int group = kv_heads > 0 ? heads / kv_heads : 0;
    int chunks = dim / W;
    if (group < 1 || group > MAX_GROUP || heads > MAX_HEADS || group * kv_heads != heads || dim % W || dim > MAX_DIM ||
        block_size < 1)
        return -1;
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
        attend(q + at, k_pool, v_pool, bf16, tables + (int64_t)r * table_stride, start, end, block_size,
               kv_stride, h0, h0 + per_task, group, chunks, scale, out + at,
               lse ? lse + (int64_t)r * heads + (int64_t)h0 * group : 0);
    }
    return 0;
}
