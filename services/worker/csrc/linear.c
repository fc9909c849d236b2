/* A linear layer's few rows (a decode step's: one per running sequence) against its plain weight:
 * y [rows, out] = x [rows, in] @ weight [out, in].T (+ bias).
 *
 * At one or two rows the step's cost is reading the weight, and this kernel only streams it:
 * both threads walk their half of the output features, each weight row read once, in order,
 * and multiplied by every input row while it is in registers. MKL's GEMV at one row runs on one
 * core; its GEMM at two rows reaches about 60 % of the read bandwidth that a sum over memory
 * does on the machines measured (cpu_kernels.py says which kernel wins where: tune() times this
 * one beside MKL's and oneDNN's).
 *
 * fp32 activations; a fp32 or bf16 weight (bf16 = 1: converted as it is read, fp32 sums).
 * Built with wicore.worker.native like paged_attention.c (-O3 -march=native, OpenMP).
 */
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define W 16
#else
#define W 8
#endif
#define MAX_ROWS 4
#define FEATURES 4 /* output features per unit of work */
#define INLINE static inline __attribute__((always_inline))

typedef float vec __attribute__((vector_size(W * 4)));
typedef int32_t veci __attribute__((vector_size(W * 4)));
typedef uint16_t vech __attribute__((vector_size(W * 2)));

INLINE vec load_f32(const float *p) {
    vec x;
    memcpy(&x, p, sizeof x);
    return x;
}

INLINE vec load_weight(const void *w, int bf16, int64_t at) {
    if (!bf16) return load_f32((const float *)w + at);
    vech h;
    memcpy(&h, (const uint16_t *)w + at, sizeof h);
    return (vec)(__builtin_convertvector(h, veci) << 16);
}

/* The sum of v's lanes, halving the vector each step (a tree: no chain of W dependent adds). */
INLINE float sum_lanes(vec v) {
#if W == 16
    const veci high8 = {8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15};
    const veci high4 = {4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7};
    const veci high2 = {2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3};
    const veci high1 = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    v += __builtin_shuffle(v, high8);
#else
    const veci high4 = {4, 5, 6, 7, 4, 5, 6, 7};
    const veci high2 = {2, 3, 2, 3, 2, 3, 2, 3};
    const veci high1 = {1, 1, 1, 1, 1, 1, 1, 1};
#endif
    v += __builtin_shuffle(v, high4);
    v += __builtin_shuffle(v, high2);
    v += __builtin_shuffle(v, high1);
    return v[0];
}

/* Returns 0, or -1 when rows > 4 or `in` is not a multiple of the vector width. */
int wicore_linear_rows(const float *x, const void *weight, int bf16, const float *bias, float *y, int rows,
                       int in, int out, int threads) {
    if (rows < 1 || rows > MAX_ROWS || in % W) return -1;
    int units = (out + FEATURES - 1) / FEATURES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int unit = 0; unit < units; unit++) {
        int first = unit * FEATURES;
        int last = first + FEATURES < out ? first + FEATURES : out;
        for (int o = first; o < last; o++) {
            int64_t row = (int64_t)o * in;
            vec even[MAX_ROWS], odd[MAX_ROWS];
            for (int r = 0; r < rows; r++) even[r] = odd[r] = (vec){0};
            int i = 0;
            for (; i + 2 * W <= in; i += 2 * W) {
                vec a = load_weight(weight, bf16, row + i), b = load_weight(weight, bf16, row + i + W);
                for (int r = 0; r < rows; r++) {
                    even[r] += a * load_f32(x + (int64_t)r * in + i);
                    odd[r] += b * load_f32(x + (int64_t)r * in + i + W);
                }
            }
            if (i < in) {
                vec a = load_weight(weight, bf16, row + i);
                for (int r = 0; r < rows; r++) even[r] += a * load_f32(x + (int64_t)r * in + i);
            }
            for (int r = 0; r < rows; r++)
                y[(int64_t)r * out + o] = sum_lanes(even[r] + odd[r]) + (bias ? bias[o] : 0.0f);
        }
    }
    return 0;
}
