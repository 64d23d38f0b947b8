/* decode_attention_body.h for CPUs with AVX512F: 16 floats a vector. */
#include <immintrin.h>
#include <stdint.h>

#define W 16
#define TARGET __attribute__((target("avx512f")))
#define KERNEL_NAME petald_decode_attention_avx512
typedef __m512 vec;

#define vloadf _mm512_loadu_ps
#define vstoref _mm512_storeu_ps
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vmax _mm512_max_ps
#define vfmadd _mm512_fmadd_ps
#define vfnmadd _mm512_fnmadd_ps
#define vreduce_add _mm512_reduce_add_ps
#define vreduce_max _mm512_reduce_max_ps
#define vround(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vscale2 _mm512_scalef_ps

TARGET static inline vec vload(const void *base, size_t index, int bf16) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + index);
}

TARGET static inline void vstore(void *base, size_t index, vec v, int bf16) {
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

#include "decode_attention_body.h"
