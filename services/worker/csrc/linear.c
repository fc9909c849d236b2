/* A linear layer's few rows (a decode step's: one per running sequence) against its weight, packed
 * for this kernel: y [rows, out] = x [rows, in] @ weight [out, in].T (+ bias).
 *
 * A decode step's cost is reading the weights, and its few rows leave libraries' GEMMs far from
 * that: MKL runs one row as a GEMV on one core, oneDNN's packed kernels reach a third to a half of
 * the read bandwidth at 16 rows. Here the weight is stored in blocks of NB = 2 vectors of output
 * features, each block [in][NB] contiguous (wicore.worker.native.RowsLinear.pack), so that a block
 * is one sequential read; both threads walk their half of the blocks, and for each input feature i
 * the block's two vectors of weights are multiplied by x[r, i] (broadcast) for up to GROUP rows at
 * once: 2 * GROUP sums in registers, no horizontal sums, every weight read from memory once (rows
 * beyond a group read the block again, from cache).
 *
 * Measured over SmolLM2's linear layers (538 MB, 2 threads, Intel Xeon with AVX-512): 1 row 32 ms
 * (MKL 37, oneDNN 45), 16 rows 55 ms (oneDNN 66). cpu_kernels.tune measures it beside MKL's and
 * oneDNN's on each machine.
 *
 * fp32 activations; a fp32 or bf16 weight (bf16 = 1: converted as it is read, fp32 sums).
 * Built with wicore.worker.native like paged_attention.c (-O3 -march=native, OpenMP).
 */
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define W 16
#define GROUP 12 /* rows a pass: 24 of 32 vector registers hold sums */
#else
#define W 8
#define GROUP 6 /* of 16 */
#endif
#define NB (2 * W) /* output features a block */
/* Input features ahead whose weights are prefetched (8 KB of fp32 with AVX-512): the hardware's own
 * prefetching alone left the 16-row case ~15 % slower here (measured). */
#define AHEAD 64
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

/* out [R, NB] = x [R rows, stride in] @ block [in][NB]; R a constant in each instance, so that the
 * sums stay in registers. */
#define PASS(R)                                                                                          \
    static void pass_##R(const float *x, int in, const void *block, int bf16, float *out) {             \
        vec low[R], high[R];                                                                             \
        for (int r = 0; r < R; r++) low[r] = high[r] = (vec){0};                                         \
        const char *ahead = (const char *)block + (int64_t)AHEAD * NB * (bf16 ? 2 : 4);                  \
        for (int i = 0; i < in; i++) {                                                                   \
            const char *next = ahead + (int64_t)i * NB * (bf16 ? 2 : 4);                                 \
            __builtin_prefetch(next);                                                                    \
            __builtin_prefetch(next + 64);                                                               \
            vec a = load_weight(block, bf16, (int64_t)i * NB), b = load_weight(block, bf16, (int64_t)i * NB + W); \
            for (int r = 0; r < R; r++) {                                                                \
                float s = x[(int64_t)r * in + i];                                                        \
                low[r] += a * s;                                                                         \
                high[r] += b * s;                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++) {                                                                    \
            memcpy(out + r * NB, &low[r], sizeof(vec));                                                  \
            memcpy(out + r * NB + W, &high[r], sizeof(vec));                                             \
        }                                                                                                \
    }

PASS(1)
PASS(2)
PASS(3)
PASS(4)
PASS(5)
PASS(6)
#if GROUP > 6
PASS(7)
PASS(8)
PASS(9)
PASS(10)
PASS(11)
PASS(12)
#endif

typedef void (*pass_fn)(const float *, int, const void *, int, float *);
static const pass_fn passes[GROUP + 1] = {0,      pass_1, pass_2, pass_3, pass_4, pass_5, pass_6,
#if GROUP > 6
                                          pass_7, pass_8, pass_9, pass_10, pass_11, pass_12
#endif
};

/* Output features a block: the packed layout's NB. */
int wicore_linear_block(void) { return NB; }

/* packed [ceil(out / NB)][in][NB] (the last block's padding features zero); returns 0, or -1 for
 * rows < 1. */
int wicore_linear_rows(const float *x, const void *packed, int bf16, const float *bias, float *y, int rows,
                       int in, int out, int threads) {
    if (rows < 1) return -1;
    int blocks = (out + NB - 1) / NB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        const char *block = (const char *)packed + (int64_t)b * in * NB * (bf16 ? 2 : 4);
        int first = b * NB, width = out - first < NB ? out - first : NB;
        float part[GROUP * NB];
        for (int r0 = 0; r0 < rows; r0 += GROUP) {
            int n = rows - r0 < GROUP ? rows - r0 : GROUP;
            passes[n](x + (int64_t)r0 * in, in, block, bf16, part);
            for (int r = 0; r < n; r++) {
                float *dst = y + (int64_t)(r0 + r) * out + first;
                for (int j = 0; j < width; j++) dst[j] = part[r * NB + j] + (bias ? bias[first + j] : 0.0f);
            }
        }
    }
    return 0;
}
