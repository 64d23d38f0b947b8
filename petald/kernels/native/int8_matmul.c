/* int8 weight-only matmul, AVX512F and AVX2 + FMA variants: out[M, N] = x[M, K] @ W[N, K]^T.
 *
 * W = q * scale, q in [-127, 127] per element, one float32 scale per output row (Int8Linear's
 * symmetric per-channel weights). torch's _weight_int8pack_mm takes bfloat16 activations (its
 * float32 path is a scalar loop); here x stays float32: each int8 weight becomes a float exactly
 * (vpmovsxbd, vcvtdq2ps) and is multiplied by x with FMA, so the only rounding is float32
 * accumulation, and the scale is applied once per output at the end.
 *
 * Packed weights (int8_native.pack): N / 16 tiles, each K steps of 16 bytes (q of the tile's 16
 * output rows at one input k) followed by the 16 rows' float32 scales (64 bytes). One step is one
 * 16-byte load: a zmm of 16 floats (AVX512) or two ymm of 8 (AVX2). Rows of x go through a tile
 * ROWS_PER_PASS at a time; a lone row splits its sums over accumulators by k, so that its FMAs do
 * not wait on each other.
 */
#include <immintrin.h>
#include <stdint.h>

#define TILE 16
#define ROWS_PER_PASS 4

__attribute__((always_inline, target("avx512f")))
static inline void pass512(const float *x, int K, const int8_t *tile, int m0, const int rows, const int split,
                           float *out, int N, int n0) {
    __m512 acc[ROWS_PER_PASS * 4];
    for (int i = 0; i < rows * split; i++) acc[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(tile + 16 * k))));
        const int s = k % split;
#pragma GCC unroll 4
        for (int m = 0; m < rows; m++)
            acc[m * split + s] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[(size_t)(m0 + m) * K + k]), acc[m * split + s]);
    }
    const __m512 scale = _mm512_loadu_ps((const float *)(tile + (size_t)TILE * K));
    for (int m = 0; m < rows; m++) {
        __m512 sum = acc[m * split];
        for (int i = 1; i < split; i++) sum = _mm512_add_ps(sum, acc[m * split + i]);
        _mm512_storeu_ps(out + (size_t)(m0 + m) * N + n0, _mm512_mul_ps(sum, scale));
    }
}

__attribute__((always_inline, target("avx2,fma")))
static inline void pass256(const float *x, int K, const int8_t *tile, int m0, const int rows, const int split,
                           float *out, int N, int n0) {
    __m256 lo[ROWS_PER_PASS * 2], hi[ROWS_PER_PASS * 2];
    for (int i = 0; i < rows * split; i++) lo[i] = hi[i] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const int8_t *step = tile + 16 * k;
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)step)));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(step + 8))));
        const int s = k % split;
#pragma GCC unroll 4
        for (int m = 0; m < rows; m++) {
            const __m256 xb = _mm256_broadcast_ss(x + (size_t)(m0 + m) * K + k);
            lo[m * split + s] = _mm256_fmadd_ps(w0, xb, lo[m * split + s]);
            hi[m * split + s] = _mm256_fmadd_ps(w1, xb, hi[m * split + s]);
        }
    }
    const float *scale = (const float *)(tile + (size_t)TILE * K);
    for (int m = 0; m < rows; m++) {
        __m256 a = lo[m * split], b = hi[m * split];
        for (int i = 1; i < split; i++) {
            a = _mm256_add_ps(a, lo[m * split + i]);
            b = _mm256_add_ps(b, hi[m * split + i]);
        }
        float *o = out + (size_t)(m0 + m) * N + n0;
        _mm256_storeu_ps(o, _mm256_mul_ps(a, _mm256_loadu_ps(scale)));
        _mm256_storeu_ps(o + 8, _mm256_mul_ps(b, _mm256_loadu_ps(scale + 8)));
    }
}

/* x: float32 [M, K] row-major; packed: N / 16 tiles of 16 K + 64 bytes; out: float32 [M, N], of which
 * this call writes the columns of tiles [tile_begin, tile_end) (a large product is split over threads
 * by tiles). N must be a multiple of 16 (int8_native checks). Returns 0. */
__attribute__((target("avx512f")))
int petald_int8_matmul_avx512(const float *x, int M, int K, const int8_t *packed, int N, int tile_begin,
                              int tile_end, float *out) {
    for (int t = tile_begin; t < tile_end; t++) {
        const int8_t *tile = packed + (size_t)t * (TILE * (size_t)K + 64);
        for (int m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
            switch (M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS) {
            case 1: pass512(x, K, tile, m0, 1, 4, out, N, t * TILE); break;
            case 2: pass512(x, K, tile, m0, 2, 2, out, N, t * TILE); break;
            case 3: pass512(x, K, tile, m0, 3, 1, out, N, t * TILE); break;
            default: pass512(x, K, tile, m0, 4, 1, out, N, t * TILE); break;
            }
        }
    }
    return 0;
}

__attribute__((target("avx2,fma")))
int petald_int8_matmul_avx2(const float *x, int M, int K, const int8_t *packed, int N, int tile_begin,
                            int tile_end, float *out) {
    for (int t = tile_begin; t < tile_end; t++) {
        const int8_t *tile = packed + (size_t)t * (TILE * (size_t)K + 64);
        for (int m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
            switch (M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS) {
            case 1: pass256(x, K, tile, m0, 1, 2, out, N, t * TILE); break;
            case 2: pass256(x, K, tile, m0, 2, 2, out, N, t * TILE); break;
            case 3: pass256(x, K, tile, m0, 3, 1, out, N, t * TILE); break;
            default: pass256(x, K, tile, m0, 4, 1, out, N, t * TILE); break;
            }
        }
    }
    return 0;
}
