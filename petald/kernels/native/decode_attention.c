/* One attention step for single-token (decode) steps, over a paged KV cache, on x86 CPUs with AVX512F.
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
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int petald_attention_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

__attribute__((target("avx512f")))
static inline __m512 load16(const void *base, size_t index, int bf16) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + index);
}

__attribute__((target("avx512f")))
static inline void store16(void *base, size_t index, __m512 v, int bf16) {
    if (!bf16) {
        _mm512_storeu_ps((float *)base + index, v);
        return;
    }
    /* Round to nearest even, as torch's .to(torch.bfloat16); NaN stays a (quiet) NaN. */
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256((__m256i *)((uint16_t *)base + index), _mm512_cvtepi32_epi16(rounded));
}

/* x * cos + rotate_half(x) * sin, with sin_signed's first half already negated: rotate_half's
 * roll by D / 2 is an index offset. x and the result are float32 [D]. */
static void rotate(const float *x, const float *cos, const float *sin_signed, int D, float *result) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) result[i] = x[i] * cos[i] + x[i + half] * sin_signed[i];
    for (int i = half; i < D; i++) result[i] = x[i] * cos[i] + x[i - half] * sin_signed[i];
}

/* exp of 16 floats <= 0 (scores minus their maximum), within 3 ulp (2.3e-7 relative, checked over
 * every float in [-87, 0]): exp(x) = 2^n exp(r) with
 * r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] and exp(r) by its Taylor series to r^6 (error < 2e-7). */
__attribute__((target("avx512f")))
static inline __m512 exp16(__m512 x) {
    /* exp(-88) ~ 6e-39: as good as zero beside exp(0) = 1. vmaxps returns its second operand when
     * either is NaN: x goes second, so that a NaN score (a NaN or infinite key or query) stays NaN
     * and reaches the output, as in torch's attention, where the next hop's check refuses it. */
    x = _mm512_max_ps(_mm512_set1_ps(-88.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln 2 in two parts (Cody-Waite) */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f")))
static void to_float(const void *src, size_t index, int D, int bf16, float *dst) {
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, load16(src, index + d, bf16));
}

__attribute__((target("avx512f")))
static void from_float(const float *src, void *dst, size_t index, int D, int bf16) {
    for (int d = 0; d < D; d += 16) store16(dst, index + d, _mm512_loadu_ps(src + d), bf16);
}

/* Attention of the `group` query heads q [group, D] (float32, rotated) that share one key/value
 * head, over keys [first, length) of one session: out [group, D] float32. scores: [group, length]. */
__attribute__((target("avx512f")))
static void attend(const float *q, int group, int D, const void *k_pool, const void *v_pool, int KVH, int head,
                   const int64_t *slots, int first, int length, int bf16, float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    for (int j = first; j < length; j++) {
        const size_t row = ((size_t)slots[j] * KVH + head) * D;
        for (int h = 0; h < group; h++) {
            __m512 acc = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + d), load16(k_pool, row + d, bf16), acc);
            scores[h * length + j] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    float norm[group];
    for (int h = 0; h < group; h++) { /* softmax's exponentials; its division is done once, on the output */
        float *s = scores + h * length;
        __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
        for (int j = first; j < length; j += 16) {
            const __mmask16 valid = length - j >= 16 ? 0xFFFF : (__mmask16)((1u << (length - j)) - 1);
            top = _mm512_mask_max_ps(top, valid, top, _mm512_maskz_loadu_ps(valid, s + j));
        }
        const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        for (int j = first; j < length; j += 16) {
            const __mmask16 valid = length - j >= 16 ? 0xFFFF : (__mmask16)((1u << (length - j)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + j), most));
            _mm512_mask_storeu_ps(s + j, valid, e);
            total = _mm512_mask_add_ps(total, valid, total, e);
        }
        norm[h] = 1.0f / _mm512_reduce_add_ps(total);
        for (int d = 0; d < D; d++) out[h * D + d] = 0.0f;
    }
    for (int j = first; j < length; j++) {
        const size_t row = ((size_t)slots[j] * KVH + head) * D;
        for (int d = 0; d < D; d += 16) {
            const __m512 v = load16(v_pool, row + d, bf16);
            for (int h = 0; h < group; h++) {
                float *o = out + h * D + d;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_set1_ps(scores[h * length + j]), v, _mm512_loadu_ps(o)));
            }
        }
    }
    for (int h = 0; h < group; h++)
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(out + h * D + d, _mm512_mul_ps(_mm512_loadu_ps(out + h * D + d), _mm512_set1_ps(norm[h])));
}

/* Returns 0; -1 if out of memory; -2, before writing anything, if the sizes do not fit (a length
 * outside [1, longest], heads not a positive multiple of KVH, D not a positive multiple of 16).
 * window: 0 for none, else each token sees its last `window` positions (itself included), as
 * kernels/step_batch.py's masks. */
__attribute__((target("avx512f")))
int petald_decode_attention(const void *qkv, int dtype, int S, int H, int KVH, int D, const void *cos,
                            const void *sin_signed, void *k_pool, void *v_pool, const int64_t *write_slot,
                            const int64_t *key_slots, int longest, const int64_t *lengths, int window, void *out) {
    if (KVH < 1 || H < KVH || H % KVH || D < 16 || D % 16 || longest < 1 || window < 0) return -2;
    for (int s = 0; s < S; s++)
        if (lengths[s] < 1 || lengths[s] > longest) return -2;
    const int bf16 = dtype == 1, group = H / KVH, width = (H + 2 * KVH) * D;
    /* float32 copies: rotary tables, the heads of one token, one key/value head's outputs, scores */
    float *scratch = malloc(sizeof(float) * ((size_t)(2 + H + 2 + group) * D + (size_t)group * longest));
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
                   first, length, bf16, scores, result);
            for (int g = 0; g < group; g++)
                from_float(result + (size_t)g * D, out, ((size_t)s * H + (size_t)h * group + g) * D, D, bf16);
        }
    }
    free(scratch);
    return 0;
}
