/* One attention step for single-token (decode) steps, over a paged KV cache, written once for any
 * x86 vector width: decode_attention_avx512.c (AVX512F, 16 floats) and decode_attention_avx2.c
 * (AVX2 and FMA, 8 floats) each define the vector operations below and include this file, which
 * makes their exported function KERNEL_NAME.
 *
 * Built into the same library as int4_matmul.c (kernels/native/native_library.py) and called
 * through ctypes by kernels/native/decode_attention.py. For each of S sessions' one new token it
 * does, in one call, what kernels/step_batch.py otherwise does with about fifteen torch ops per
 * block: rotary position embedding of the token's query and key heads, writing its key and value
 * into the pools, and attention of each query head over that session's keys (grouped-query
 * heads share a key/value head; an optional sliding window). On a decode step of SmolLM2 those ops cost
 * ~65 us per block against ~15 us of arithmetic: the rest is torch's per-op overhead, the
 * gathers of the keys and values into dense tensors, and the padding and mask.
 *
 * Layouts (all row-major, elements of `dtype`: 0 = float32, 1 = bfloat16):
 *   qkv [S, (H + 2 KVH) * D]: the fused projection's output, query heads, then key, then value heads;
 *   cos, sin_signed [S, D]: rotary tables at each token's position (kernels/rotary.py);
 *   k_pool, v_pool [slots, KVH, D];
 *   write_slot [S]: where each token's key and value go;
 *   key_slots [S, longest]: the slots of each session's positions 0 .. lengths[s] - 1 (the rest unread);
 *   out [S, H * D].
 * Arithmetic is float32 throughout; bfloat16 is rounded to nearest even where it is stored.
 * D must be a multiple of 16, and H of KVH: the function refuses other sizes, and lengths outside
 * [1, longest], before it writes anything. decode_attention.py checks the tensors' shapes.
 *
 * The including file defines: W (floats per vector), vec, TARGET (the target attribute), KERNEL_NAME;
 * vload(base, index, bf16) and vstore(base, index, v, bf16) (W elements of float32 or bfloat16),
 * vloadf, vstoref (float32), vzero, vset1, vadd, vsub, vmul, vmax, vfmadd, vfnmadd, vround (to the
 * nearest integer), vscale2(p, n) (p * 2^n, n integral in [-127, 0]), vreduce_add, vreduce_max.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* x * cos + rotate_half(x) * sin, with sin_signed's first half already negated: rotate_half's
 * roll by D / 2 is an index offset. x and the result are float32 [D]. */
static void rotate(const float *x, const float *cos, const float *sin_signed, int D, float *result) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) result[i] = x[i] * cos[i] + x[i + half] * sin_signed[i];
    for (int i = half; i < D; i++) result[i] = x[i] * cos[i] + x[i - half] * sin_signed[i];
}

/* exp of W floats <= 0 (scores minus their maximum), within 3 ulp (2.3e-7 relative, checked over
 * every float in [-87, 0]): exp(x) = 2^n exp(r) with
 * r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] and exp(r) by its Taylor series to r^6 (error < 2e-7). */
TARGET static inline vec vexp(vec x) {
    /* exp(-88) ~ 6e-39: as good as zero beside exp(0) = 1. vmaxps returns its second operand when
     * either is NaN: x goes second, so that a NaN score (a NaN or infinite key or query) stays NaN
     * and reaches the output, as in torch's attention, where the next hop's check refuses it. */
    x = vmax(vset1(-88.0f), x);
    const vec n = vround(vmul(x, vset1(1.44269504f)));
    vec r = vfnmadd(n, vset1(0.693145752f), x); /* ln 2 in two parts (Cody-Waite) */
    r = vfnmadd(n, vset1(1.42860677e-6f), r);
    vec p = vset1(1.0f / 720);
    p = vfmadd(p, r, vset1(1.0f / 120));
    p = vfmadd(p, r, vset1(1.0f / 24));
    p = vfmadd(p, r, vset1(1.0f / 6));
    p = vfmadd(p, r, vset1(0.5f));
    p = vfmadd(p, r, vset1(1.0f));
    p = vfmadd(p, r, vset1(1.0f));
    return vscale2(p, n);
}

TARGET static void to_float(const void *src, size_t index, int D, int bf16, float *dst) {
    for (int d = 0; d < D; d += W) vstoref(dst + d, vload(src, index + d, bf16));
}

TARGET static void from_float(const float *src, void *dst, size_t index, int D, int bf16) {
    for (int d = 0; d < D; d += W) vstore(dst, index + d, vloadf(src + d), bf16);
}

/* Attention of the `group` query heads q [group, D] (float32, rotated) that share one key/value
 * head, over keys [first, length) of one session: out [group, D] float32. scores: [group, stride],
 * stride >= length + W: softmax runs over whole vectors, its lanes past `length` set to -inf (their
 * exponentials, exp(-88) at most, add nothing a float32 sum of at least 1 can hold). */
TARGET static void attend(const float *q, int group, int D, const void *k_pool, const void *v_pool, int KVH, int head,
                          const int64_t *slots, int first, int length, int bf16, float *scores, int stride,
                          float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    for (int j = first; j < length; j++) {
        const size_t row = ((size_t)slots[j] * KVH + head) * D;
        for (int h = 0; h < group; h++) {
            vec acc = vzero();
            for (int d = 0; d < D; d += W) acc = vfmadd(vloadf(q + h * D + d), vload(k_pool, row + d, bf16), acc);
            scores[h * stride + j] = vreduce_add(acc) * scale;
        }
    }
    const int end = first + (length - first + W - 1) / W * W;
    float norm[group];
    for (int h = 0; h < group; h++) { /* softmax's exponentials; its division is done once, on the output */
        float *s = scores + h * stride;
        for (int j = length; j < end; j++) s[j] = -INFINITY;
        vec top = vset1(-INFINITY), total = vzero();
        for (int j = first; j < end; j += W) top = vmax(top, vloadf(s + j));
        const vec most = vset1(vreduce_max(top));
        for (int j = first; j < end; j += W) {
            const vec e = vexp(vsub(vloadf(s + j), most));
            vstoref(s + j, e);
            total = vadd(total, e);
        }
        norm[h] = 1.0f / vreduce_add(total);
        for (int d = 0; d < D; d++) out[h * D + d] = 0.0f;
    }
    for (int j = first; j < length; j++) {
        const size_t row = ((size_t)slots[j] * KVH + head) * D;
        for (int d = 0; d < D; d += W) {
            const vec v = vload(v_pool, row + d, bf16);
            for (int h = 0; h < group; h++) {
                float *o = out + h * D + d;
                vstoref(o, vfmadd(vset1(scores[h * stride + j]), v, vloadf(o)));
            }
        }
    }
    for (int h = 0; h < group; h++)
        for (int d = 0; d < D; d += W) vstoref(out + h * D + d, vmul(vloadf(out + h * D + d), vset1(norm[h])));
}

/* Returns 0; -1 if out of memory; -2, before writing anything, if the sizes do not fit (a length
 * outside [1, longest], heads not a positive multiple of KVH, D not a positive multiple of 16).
 * window: 0 for none, else each token sees its last `window` positions (itself included), as
 * kernels/step_batch.py's masks. */
TARGET int KERNEL_NAME(const void *qkv, int dtype, int S, int H, int KVH, int D, const void *cos,
                       const void *sin_signed, void *k_pool, void *v_pool, const int64_t *write_slot,
                       const int64_t *key_slots, int longest, const int64_t *lengths, int window, void *out) {
    if (KVH < 1 || H < KVH || H % KVH || D < 16 || D % 16 || longest < 1 || window < 0) return -2;
    for (int s = 0; s < S; s++)
        if (lengths[s] < 1 || lengths[s] > longest) return -2;
    const int bf16 = dtype == 1, group = H / KVH, width = (H + 2 * KVH) * D, stride = longest + W;
    /* float32 copies: rotary tables, the heads of one token, one key/value head's outputs, scores */
    float *scratch = malloc(sizeof(float) * ((size_t)(2 + H + 2 + group) * D + (size_t)group * stride));
    if (scratch == NULL) return -1;
    float *c = scratch, *sn = c + D, *heads = sn + D, *x = heads + (size_t)H * D, *y = x + D;
    float *result = y + D, *scores = result + (size_t)group * D;
    for (int s = 0; s < S; s++) {
        const size_t base = (size_t)s * width;
        to_float(cos, (size_t)s * D, D, bf16, c);
        to_float(sin_signed, (size_t)s * D, D, bf16, sn);
        for (int h = 0; h < H; h++) {
            to_float(qkv, base + (size_t)h * D, D, bf16, x);
            rotate(x, c, sn, D, heads + (size_t)h * D);
        }
        for (int h = 0; h < KVH; h++) {
            const size_t slot_row = ((size_t)write_slot[s] * KVH + h) * D;
            to_float(qkv, base + (size_t)(H + h) * D, D, bf16, x);
            rotate(x, c, sn, D, y);
            from_float(y, k_pool, slot_row, D, bf16);
            to_float(qkv, base + (size_t)(H + KVH + h) * D, D, bf16, x);
            from_float(x, v_pool, slot_row, D, bf16);
        }
        const int length = (int)lengths[s];
        const int first = window > 0 && length > window ? length - window : 0;
        for (int h = 0; h < KVH; h++) {
            attend(heads + (size_t)h * group * D, group, D, k_pool, v_pool, KVH, h, key_slots + (size_t)s * longest,
                   first, length, bf16, scores, stride, result);
            for (int g = 0; g < group; g++)
                from_float(result + (size_t)g * D, out, ((size_t)s * H + (size_t)h * group + g) * D, D, bf16);
        }
    }
    free(scratch);
    return 0;
}
