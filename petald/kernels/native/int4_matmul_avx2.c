/* int4 weight-only matmul for x86 CPUs with AVX2 and FMA (no AVX512): out[M, N] = x[M, K] @ W[N, K]^T.
 *
 * The product int4_matmul.c computes, for the CPUs most volunteers have (Intel before Sapphire
 * Rapids, AMD before Zen 4): same weights (w = (q - 8) * scale + zero, groups of 32 inputs), same
 * records of 16 output rows by 32 inputs (320 bytes), same rounding of x to bfloat16. Only the
 * order of the nibbles in a record differs (int4_native.pack_avx2), so that a nibble becomes a float
 * in two instructions, without a table:
 *   for each half h (rows 8h .. 8h + 7 of the tile) and each block b of 8 inputs, 32 bytes: 8 dwords,
 *   dword r holding q[8h + r, 32 g + 8 b + i] at bits 4i .. 4i + 3 (i = 0 .. 7);
 *   then 16 bfloat16 scales and 16 bfloat16 zeros (rows 0 .. 15), as in int4_matmul.c.
 * Masking a dword vector with 0xF << 4i leaves q * 16^i in each row, which vcvtdq2ps turns into a
 * float exactly; the matching input is stored pre-multiplied by 16^-i (exact: a power of two), so
 * one vfmadd231ps adds q * x for 8 rows (the top nibble, i = 7, is shifted down instead, its input not scaled):
 *     y[n] = sum_g scale[g, n] * sum_{j in g} q[n, j] x[j]  +  (zero[g, n] - 8 scale[g, n]) * sum_{j in g} x[j].
 * q * x is exact in float32 (4 by 8 significant bits), so the inner sums are only rounded by float32
 * accumulation, as in int4_matmul.c.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define TILE 16
#define GROUP 32
#define RECORD 320
#define ROWS_PER_PASS 4

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline __m256 bf16x8_to_ps(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

/* Rows m0 .. m0 + rows - 1 of x times half h of one tile (8 output rows), each row's sums split over
 * `split` accumulators so that a lone row's FMAs do not wait on each other. Always inlined with
 * constant rows and split: each case of half_rows compiles to its own unrolled loop. */
__attribute__((always_inline, target("avx2,fma")))
static inline void half_pass(const float *xs, int K, const uint8_t *tile, const float *xsum, int m0,
                             const int rows, const int split, int h, float *out, int N, int n0) {
    const int groups = K / GROUP;
    __m256 total[ROWS_PER_PASS];
    for (int m = 0; m < rows; m++) total[m] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *record = tile + (size_t)g * RECORD;
        __m256 part[ROWS_PER_PASS * 4];
        for (int i = 0; i < rows * split; i++) part[i] = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int b = 0; b < 4; b++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(record + 32 * (4 * h + b)));
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) {
                /* The top nibble by a shift: masked, it would read as a negative int32. */
                const __m256 w = _mm256_cvtepi32_ps(i == 7 ? _mm256_srli_epi32(v, 28)
                                                           : _mm256_and_si256(v, _mm256_set1_epi32(0xF << (4 * i))));
                const int s = (8 * b + i) % split, j = g * GROUP + 8 * b + i;
#pragma GCC unroll 4
                for (int m = 0; m < rows; m++)
                    part[m * split + s] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(xs + (size_t)(m0 + m) * K + j),
                                                          part[m * split + s]);
            }
        }
        const __m256 scale = bf16x8_to_ps((const uint16_t *)(record + 256) + 8 * h);
        const __m256 zero = bf16x8_to_ps((const uint16_t *)(record + 288) + 8 * h);
        const __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, zero); /* zero - 8 scale */
        for (int m = 0; m < rows; m++) {
            __m256 sum = part[m * split];
            for (int i = 1; i < split; i++) sum = _mm256_add_ps(sum, part[m * split + i]);
            total[m] = _mm256_fmadd_ps(sum, scale, total[m]);
            total[m] = _mm256_fmadd_ps(offset, _mm256_set1_ps(xsum[(size_t)(m0 + m) * groups + g]), total[m]);
        }
    }
    for (int m = 0; m < rows; m++) _mm256_storeu_ps(out + (size_t)(m0 + m) * N + n0 + 8 * h, total[m]);
}

AVX2 static void half_rows(const float *xs, int K, const uint8_t *tile, const float *xsum, int m0, int rows,
                           int h, float *out, int N, int n0) {
    switch (rows) {
    case 1: half_pass(xs, K, tile, xsum, m0, 1, 4, h, out, N, n0); break;
    case 2: half_pass(xs, K, tile, xsum, m0, 2, 2, h, out, N, n0); break;
    case 3: half_pass(xs, K, tile, xsum, m0, 3, 2, h, out, N, n0); break;
    default: half_pass(xs, K, tile, xsum, m0, 4, 2, h, out, N, n0); break;
    }
}

/* x rounded to bfloat16 (to nearest even, as torch's .to(torch.bfloat16); a NaN stays a NaN), as float32. */
AVX2 static inline __m256 round_to_bf16(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32((int)0xFFFF0000u)));
    return _mm256_blendv_ps(rounded, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* Arguments and result as petald_int4_matmul_avx512's (int4_matmul.c), packed in this file's layout. */
AVX2 int petald_int4_matmul_avx2(const void *x_in, int x_is_float32, int M, int K, const uint8_t *packed, int N,
                                 int tile_begin, int tile_end, float *out) {
    const int groups = K / GROUP;
    float *xsum = malloc(sizeof(float) * (size_t)M * groups);
    /* x[m, k] in bfloat16's values, times 16^-(k % 8), but the last of 8 (half_pass shifts that nibble down) */
    float *xs = malloc(sizeof(float) * (size_t)M * K);
    if (xsum == NULL || xs == NULL) {
        free(xsum);
        free(xs);
        return -1;
    }
    const __m256 powers = _mm256_setr_ps(1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f);
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            __m256 sum = _mm256_setzero_ps();
            for (int k = g * GROUP; k < (g + 1) * GROUP; k += 8) {
                const size_t at = (size_t)m * K + k;
                const __m256 v = x_is_float32 ? round_to_bf16(_mm256_loadu_ps((const float *)x_in + at))
                                              : bf16x8_to_ps((const uint16_t *)x_in + at);
                sum = _mm256_add_ps(sum, v);
                _mm256_storeu_ps(xs + at, _mm256_mul_ps(v, powers));
            }
            const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
            const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
            xsum[(size_t)m * groups + g] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
        }
    }
    for (int t = tile_begin; t < tile_end; t++) {
        const uint8_t *tile = packed + (size_t)t * groups * RECORD;
        for (int h = 0; h < 2; h++)
            for (int m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
                const int rows = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
                half_rows(xs, K, tile, xsum, m0, rows, h, out, N, t * TILE);
            }
    }
    free(xs);
    free(xsum);
    return 0;
}
