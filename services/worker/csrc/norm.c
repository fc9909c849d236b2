/* The residual sum and RMS norm between a decoder's sublayers, in one pass:
 *
 *     h += delta            (when delta is not NULL; fp32, the same sum torch computes)
 *     x  = h / sqrt(mean(h^2) + eps) * weight
 *
 * torch's rms_norm runs as about eight operations on CPU (~20 us each on a 576-wide row, most
 * of it dispatch); a decode step has two per layer. fp32 only. Rows in parallel (OpenMP) when
 * there are many (a prefill); a decode step's few rows on the calling thread.
 * Built with wicore.worker.native like paged_attention.c.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define W 16
#else
#define W 8
#endif
#define INLINE static inline __attribute__((always_inline))

typedef float vec __attribute__((vector_size(W * 4)));

INLINE vec load(const float *p) {
    vec x;
    memcpy(&x, p, sizeof x);
    return x;
}

INLINE void store(float *p, vec x) { memcpy(p, &x, sizeof x); }

INLINE void one_row(float *h, const float *delta, const float *weight, float *x, int dim, float eps) {
    vec squares = {0};
    int i = 0;
    for (; i + W <= dim; i += W) {
        vec v = load(h + i);
        if (delta) {
            v += load(delta + i);
            store(h + i, v);
        }
        squares += v * v;
    }
    float sum = 0.0f;
    for (int lane = 0; lane < W; lane++) sum += squares[lane];
    for (; i < dim; i++) {
        if (delta) h[i] += delta[i];
        sum += h[i] * h[i];
    }
    float inv = 1.0f / sqrtf(sum / (float)dim + eps);
    for (i = 0; i + W <= dim; i += W) store(x + i, load(h + i) * inv * load(weight + i));
    for (; i < dim; i++) x[i] = h[i] * inv * weight[i];
}

/* h, x [rows, dim] fp32 contiguous; delta [rows, dim] or NULL; weight [dim]. */
void wicore_add_rms_norm(float *h, const float *delta, const float *weight, float *x, int rows, int dim,
                         float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows >= 64)
    for (int r = 0; r < rows; r++)
        one_row(h + (int64_t)r * dim, delta ? delta + (int64_t)r * dim : 0, weight, x + (int64_t)r * dim, dim,
                eps);
}
