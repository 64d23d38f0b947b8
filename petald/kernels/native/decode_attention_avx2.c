/* decode_attention_body.h for CPUs with AVX2 and FMA (no AVX512): 8 floats a vector. */
#include <immintrin.h>
#include <stdint.h>

#define W 8
#define TARGET __attribute__((target("avx2,fma")))
#define KERNEL_NAME petald_decode_attention_avx2
typedef __m256 vec;

#define vloadf _mm256_loadu_ps
#define vstoref _mm256_storeu_ps
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vmax _mm256_max_ps
#define vfmadd _mm256_fmadd_ps
#define vfnmadd _mm256_fnmadd_ps
#define vround(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

/* p * 2^n for integral n in [-127, 0], by building 2^n's exponent bits (2^-127 becomes 0: exp(-88)
 * is already as good as zero). A NaN n gives a NaN p, which stays NaN. */
TARGET static inline vec vscale2(vec p, vec n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

TARGET static inline float vreduce_add(vec v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

TARGET static inline float vreduce_max(vec v) {
    const __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_max_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)));
}

TARGET static inline vec vload(const void *base, size_t index, int bf16) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + index));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)base + index);
}

TARGET static inline void vstore(void *base, size_t index, vec v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)base + index, v);
        return;
    }
    /* Round to nearest even, as torch's .to(torch.bfloat16); NaN stays a (quiet) NaN. */
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    rounded = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded),
                                                   _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
                                                   _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    /* 8 words from 8 dwords: packus works per 128-bit lane, so gather the two lanes' halves. */
    __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
    _mm_storeu_si128((__m128i *)((uint16_t *)base + index), _mm256_castsi256_si128(words));
}

#include "decode_attention_body.h"
