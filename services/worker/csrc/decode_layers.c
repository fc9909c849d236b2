/* Every decoder layer of a decode step in one call (Llama-architecture models, fp32):
 *
 *     per layer:  x = add_rms_norm(h, delta);  qkv = x @ Wqkv (+ b);  q, k = rope(q, k)
 *                 pool[layer][slots] = k, v;  a = paged_decode(q) merged with prefix_decode(q)
 *                 x = add_rms_norm(h, a @ Wo);  delta = down(silu(gate(x)) * up(x))
 *     h += delta
 *
 * the same arithmetic as wicore.worker.decoder.Decoder runs through torch, in the same order, with
 * the same kernels: the linear layers through WiCore's few-rows kernel (linear.c) or MKL's sgemm
 * exactly as torch calls it (`x @ W.T` and `W @ x.T`), the norms through norm.c, attention through
 * paged_attention.c (each reached through a pointer the caller passes: each kernel stays in its own
 * library), and what is left in between (the rotation, the K/V writes, silu(gate) * up) here, each
 * written as the same elementwise operations torch performs. Between those kernels a step through
 * torch spends ~70 small operations a layer (views, copies, the rotation's cat, the wrappers):
 * about 10 ms of a 30-45 ms batch-1 step on the 2-core machines measured.
 *
 * No fused multiply-add in this file: torch computes q*cos - rotate(q)*sin as separate products,
 * and a contracted one would differ in the last bit.
 */
#pragma GCC optimize("fp-contract=off")
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
typedef int32_t veci __attribute__((vector_size(W * 4)));

INLINE vec load(const float *p) {
    vec x;
    memcpy(&x, p, sizeof x);
    return x;
}

INLINE void store(float *p, vec x) { memcpy(p, &x, sizeof x); }

typedef int (*linear_fn)(const float *x, const void *weight, int bf16, const float *bias, float *y, int rows,
                         int in, int out, int threads);
typedef void (*norm_fn)(float *h, const float *delta, const float *weight, float *x, int rows, int dim, float eps,
                        int threads);
typedef int (*attend_fn)(const float *q, const void *k_pool, const void *v_pool, int bf16, const int64_t *tables,
                         int64_t table_stride, const int64_t *starts, const int64_t *ends, int rows, int heads,
                         int kv_heads, int dim, int block_size, int window, float scale, float *out, float *lse,
                         int threads);
typedef int (*prefix_fn)(const float *q, const void *k_pool, const void *v_pool, int bf16, int groups,
                         const int64_t *member_offsets, const int64_t *members, const int64_t *block_offsets,
                         const int64_t *blocks, const int64_t *ends, int heads, int kv_heads, int dim,
                         int block_size, int window, float scale, float *out, float *lse, int threads);
/* BLAS's Fortran sgemm (MKL's, inside torch), column-major. */
typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

/* A step's shared prefixes, as wicore_prefix_decode takes them (wicore.worker.cascade.PrefixTables). */
struct wicore_prefixes {
    int groups;
    const int64_t *member_offsets, *members, *block_offsets, *blocks;
};

enum { NATIVE = 0, MKL = 1, MKL_WT = 2 }; /* wicore.worker.cpu_kernels.Kernel */

struct wicore_linear {
    const float *weight; /* [out, in], for MKL; NULL where not kept */
    const float *packed; /* linear.c's layout, for the native kernel; NULL where not kept */
    const float *bias;   /* [out] or NULL */
    int in, out;
};

struct wicore_layer {
    const float *input_norm, *post_norm;
    struct wicore_linear qkv, o, gate_up, down; /* q, k, v joined; gate, up joined */
    int window;                                 /* sliding window, 0: none */
};

struct wicore_model {
    int layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    linear_fn linear;
    norm_fn norm;
    attend_fn attend;
    prefix_fn prefix; /* paged_attention.c's wicore_prefix_decode */
    sgemm_fn sgemm; /* NULL where torch's BLAS was not found */
    const struct wicore_layer *layer;
};

/* y [rows, out] = x [rows, in] @ W.T (+ bias) through `kernel`, as cpu_kernels.CpuLinear.multiply
 * does it; tmp: 2 * rows * out + 2 * in floats. */
static int linear(const struct wicore_model *m, int kernel, const struct wicore_linear *l, const float *x,
                  float *y, int rows, float *tmp, int threads) {
    const float one = 1.0f, zero = 0.0f;
    if (kernel == NATIVE) return m->linear(x, l->packed, 0, l->bias, y, rows, l->in, l->out, threads);
    if (!m->sgemm) return -1;
    if (kernel == MKL) { /* F.linear: addmm, the bias copied into y first (beta = 1) */
        for (int r = 0; r < rows && l->bias; r++) memcpy(y + (int64_t)r * l->out, l->bias, l->out * sizeof(float));
        m->sgemm("T", "N", &l->out, &rows, &l->in, &one, l->weight, &l->in, x, &l->in, l->bias ? &one : &zero, y,
                 &l->out);
        return 0;
    }
    /* W @ x.T, one row doubled (a GEMM, not a GEMV), then transposed, the bias added after */
    int n = rows == 1 ? 2 : rows;
    if (rows == 1) {
        memcpy(tmp, x, l->in * sizeof(float));
        memcpy(tmp + l->in, x, l->in * sizeof(float));
        x = tmp;
    }
    float *z = tmp + 2 * l->in; /* [out, n] */
    m->sgemm("T", "N", &n, &l->out, &l->in, &one, x, &l->in, l->weight, &l->in, &zero, z, &n);
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < l->out; o++)
            y[(int64_t)r * l->out + o] = z[(int64_t)o * n + r] + (l->bias ? l->bias[o] : 0.0f);
    return 0;
}

/* decoder.rope on one head: (x1*c - x2*s, x2*c + x1*s), c and s the first halves of cos and sin. */
static void rope(const float *x, const float *cos, const float *sin, int dim, float *out) {
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half], c = cos[i], s = sin[i];
        float a = x1 * c, b = x2 * s, e = x2 * c, f = x1 * s;
        out[i] = a - b;
        out[i + half] = e + f;
    }
}

/* What lies between the q/k/v and output projections of layer l: qkv [rows, (heads + 2 kv_heads) *
 * head_dim], the joint projection's output -> q rotated into q [rows, heads, head_dim], k rotated and v
 * written to the pool at slots, and attn [rows, heads, head_dim] = paged_decode(q) over each row's own
 * keys (lse its [rows, heads] log-sum-exp), each shared prefix in `prefixes` (NULL: none) attended
 * once for its members and merged in. The other arguments as wicore_decode_layers'. Returns the
 * first failing kernel's status. */
int wicore_decode_attend(const struct wicore_model *m, int l, const float *qkv, int rows, const float *cos,
                         const float *sin, const int64_t *slots, float *keys, float *values, int block_size,
                         const int64_t *tables, int64_t table_stride, const int64_t *starts, const int64_t *ends,
                         const struct wicore_prefixes *prefixes, float *q, float *attn, float *lse, int threads) {
    int d = m->head_dim, q_width = m->heads * d, kv_width = m->kv_heads * d, qkv_width = q_width + 2 * kv_width;
    for (int r = 0; r < rows; r++) {
        const float *row = qkv + (int64_t)r * qkv_width, *c = cos + (int64_t)r * d, *s = sin + (int64_t)r * d;
        float *k_slot = keys + slots[r] * kv_width, *v_slot = values + slots[r] * kv_width;
        for (int head = 0; head < m->heads; head++) rope(row + head * d, c, s, d, q + (int64_t)r * q_width + head * d);
        for (int head = 0; head < m->kv_heads; head++) rope(row + q_width + head * d, c, s, d, k_slot + head * d);
        memcpy(v_slot, row + q_width + kv_width, kv_width * sizeof(float));
    }
    int window = m->layer[l].window;
    int status = m->attend(q, keys, values, 0, tables, table_stride, starts, ends, rows, m->heads, m->kv_heads, d,
                           block_size, window, m->scale, attn, lse, threads);
    if (status || !prefixes || prefixes->groups == 0) return status;
    return m->prefix(q, keys, values, 0, prefixes->groups, prefixes->member_offsets, prefixes->members,
                     prefixes->block_offsets, prefixes->blocks, ends, m->heads, m->kv_heads, d, block_size, window,
                     m->scale, attn, lse, threads);
}

/* e^x in vectors: x = n ln2 + r, e^r by Cephes' expf polynomial, 2^n into the exponent; within 2 ulp
 * of libm's expf between -87 and 88 (torch's own vectorised exp differs from libm's in the last bit
 * as well), e^-87 below (1 + e^x is then 1, as with the exact value), inf above. */
INLINE vec exp_vec(vec x) {
    const vec zero = {0.0f}, lo = zero - 87.0f, hi = zero + 88.0f, shift = zero + 12582912.0f; /* 1.5 * 2^23 */
    veci below = x < lo, above = x > hi;
    x = (vec)(((veci)x & ~below) | ((veci)lo & below));
    x = (vec)(((veci)x & ~above) | ((veci)hi & above));
    vec t = x * 1.44269504088896341f + shift; /* n in the low mantissa bits */
    vec n = t - shift;
    vec r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vec y = p * (r * r) + r + 1.0f;
    veci exponent = ((veci)t - 0x4B400000) << 23;
    const veci inf = (veci){0} + 0x7F800000;
    return (vec)((((veci)y + exponent) & ~above) | (inf & above)); /* overflow: inf, as expf */
}

/* act [rows, inter] = silu(gate) * up for gate_up [rows, 2 * inter] (gate, then up, per row), silu
 * as torch computes it: gate / (1 + e^-gate). */
void wicore_silu_mul(const float *gate_up, int rows, int inter, float *act) {
    for (int r = 0; r < rows; r++) {
        const float *g = gate_up + (int64_t)r * 2 * inter, *u = g + inter;
        float *a = act + (int64_t)r * inter;
        int i = 0;
        for (; i + W <= inter; i += W) {
            vec gate = load(g + i);
            store(a + i, gate / (1.0f + exp_vec(-gate)) * load(u + i));
        }
        for (; i < inter; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* h [rows, hidden] fp32, the embeddings in, the hidden state after the last layer out (in place).
 * cos, sin [rows, head_dim]: each row's rotation; slots [rows]: where each row's K/V goes in every
 * layer's pool; keys[l], values[l]: layer l's pool [slots, kv_heads, head_dim] fp32; tables
 * [rows, table_stride], starts, ends [rows]: paged_decode's (one query per row; starts after a shared
 * prefix); prefixes: the shared prefixes (wicore_prefix_decode's), or NULL. scratch: floats as
 * wicore_decode_scratch says. Returns 0, or the first failing kernel's nonzero status. */
int wicore_decode_layers(const struct wicore_model *m, int kernel, float *h, int rows, const float *cos,
                         const float *sin, const int64_t *slots, float *const *keys, float *const *values,
                         int block_size, const int64_t *tables, int64_t table_stride, const int64_t *starts,
                         const int64_t *ends, const struct wicore_prefixes *prefixes, float *scratch, int threads) {
    int d = m->head_dim, hidden = m->hidden, inter = m->intermediate;
    int q_width = m->heads * d, kv_width = m->kv_heads * d, qkv_width = q_width + 2 * kv_width;
    float *x = scratch;                        /* [rows, hidden] the normed input of a linear layer */
    float *delta = x + rows * hidden;          /* [rows, hidden] a sublayer's output, not yet added */
    float *qkv = delta + rows * hidden;        /* [rows, qkv_width] */
    float *q = qkv + rows * qkv_width;         /* [rows, heads, d] rotated */
    float *attn = q + rows * q_width;          /* [rows, heads, d] */
    float *lse = attn + rows * q_width;        /* [rows, heads] */
    float *gate_up = lse + rows * m->heads;    /* [rows, 2 * inter] */
    float *act = gate_up + rows * 2 * inter;   /* [rows, inter] */
    float *tmp = act + rows * inter;           /* linear()'s */
    int status;
    for (int l = 0; l < m->layers; l++) {
        const struct wicore_layer *layer = &m->layer[l];
        m->norm(h, l ? delta : NULL, layer->input_norm, x, rows, hidden, m->eps, threads);
        if ((status = linear(m, kernel, &layer->qkv, x, qkv, rows, tmp, threads))) return status;
        status = wicore_decode_attend(m, l, qkv, rows, cos, sin, slots, keys[l], values[l], block_size, tables,
                                      table_stride, starts, ends, prefixes, q, attn, lse, threads);
        if (status) return status;
        if ((status = linear(m, kernel, &layer->o, attn, delta, rows, tmp, threads))) return status;
        m->norm(h, delta, layer->post_norm, x, rows, hidden, m->eps, threads);
        if ((status = linear(m, kernel, &layer->gate_up, x, gate_up, rows, tmp, threads))) return status;
        wicore_silu_mul(gate_up, rows, inter, act);
        if ((status = linear(m, kernel, &layer->down, act, delta, rows, tmp, threads))) return status;
    }
    for (int64_t i = 0; i < (int64_t)rows * hidden; i++) h[i] += delta[i];
    return 0;
}

/* The floats of scratch wicore_decode_layers needs for `rows` rows. */
int64_t wicore_decode_scratch(const struct wicore_model *m, int rows) {
    int64_t widest = 0;
    for (int l = 0; l < m->layers; l++) {
        const struct wicore_linear *all[] = {&m->layer[l].qkv, &m->layer[l].o, &m->layer[l].gate_up, &m->layer[l].down};
        for (int i = 0; i < 4; i++) {
            int64_t need = 2 * (int64_t)rows * all[i]->out + 2 * all[i]->in;
            if (need > widest) widest = need;
        }
    }
    int64_t q_width = (int64_t)m->heads * m->head_dim, kv_width = (int64_t)m->kv_heads * m->head_dim;
    return rows * (2 * (int64_t)m->hidden + q_width + 2 * kv_width + 2 * q_width + m->heads + 3 * (int64_t)m->intermediate) +
           widest;
}
