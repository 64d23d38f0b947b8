/* int4 weight-only matmul for x86 CPUs with AVX512-BF16: out[M, N] = x[M, K] @ W[N, K]^T.
 * (int4_matmul_avx2.c is the same product for CPUs with AVX2 and FMA only, in its own layout.)
 *
 * Built and loaded at run time by kernels/native/int4_native.py (plain C ABI, called through
 * ctypes; no Python or torch headers). The weights are int4 in groups of 32 along K, asymmetric, as
 * kernels/quant.py's Int4Linear quantizes them: w = (q - 8) * scale + zero, q in [0, 15].
 *
 * Why it is faster than torch's _weight_int4pack_mm_for_cpu at decode sizes: a 4-bit weight
 * becomes a bfloat16 through one table lookup (vpermw over 32 words), two weights per byte, and
 * bfloat16 pairs are multiplied and summed into float32 by one vdpbf16ps; the per-group scale and
 * zero are applied once per group of 32 inputs, not per weight:
 *     y[n] = sum_g scale[g, n] * sum_{j in g} (q[n, j] - 8) * x[j]  +  zero[g, n] * sum_{j in g} x[j]
 * (q - 8) is exact in bfloat16 and each product exact in float32, so the inner sums are only
 * rounded by float32 accumulation.
 *
 * Packed layout (int4_native.pack): for each tile of 16 output rows and each group of 32 inputs,
 * a 320-byte record:
 *   8 chunks x 32 bytes of nibbles: chunk c, byte i = 2 * r + e (row r of the tile, e in {0, 1})
 *       low nibble = q[r, 32 g + 4 c + e], high nibble = q[r, 32 g + 4 c + 2 + e];
 *   16 bfloat16 scales (rows 0..15), then 16 bfloat16 zeros.
 * Zero-extending a chunk's 32 bytes to 32 words puts, in word 2r + e, the low nibble (plus one
 * stray bit of the high nibble at bit 4, which the 32-entry table ignores by repeating itself);
 * shifting right by 4 gives the high nibbles. Each is then the [16 rows x 2 inputs] bfloat16 pair
 * matrix that vdpbf16ps multiplies by a broadcast pair of inputs.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16
#define GROUP 32
#define RECORD 320
#define ROWS_PER_PASS 8

__attribute__((target("avx512f,avx512bw,avx512bf16")))
static inline __m512 bf16x16_to_ps(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* One tile (16 output rows) for rows m0 .. m0 + rows - 1 of x, each row's inner sums split over
 * `split` accumulators: a lone row's vdpbf16ps would otherwise wait on its own previous result
 * (several cycles) 16 times per group. Always inlined with constant rows and split, so that each
 * case below compiles to its own fully unrolled loop. */
__attribute__((always_inline, target("avx512f,avx512bw,avx512bf16")))
static inline void tile_pass(const uint16_t *x, int K, const uint8_t *tile, const float *xsum,
                             int m0, const int rows, const int split, float *out, int N, int n0) {
    /* bfloat16 of (i & 15) - 8 for i in [0, 32): bit 4 of an index is a stray bit, ignored. */
    static const uint16_t table_words[32] = {
        0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
        0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
        0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
        0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
    const __m512i table = _mm512_loadu_si512(table_words);
    const int groups = K / GROUP;
    __m512 total[ROWS_PER_PASS];
    for (int m = 0; m < rows; m++) total[m] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *record = tile + (size_t)g * RECORD;
        __m512 part[ROWS_PER_PASS * 4];
        for (int i = 0; i < rows * split; i++) part[i] = _mm512_setzero_ps();
        for (int c = 0; c < 8; c++) {
            __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(record + 32 * c)));
            __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(bytes, table);
            __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
            const int j = g * GROUP + 4 * c; /* inputs j, j+1 (low nibbles) and j+2, j+3 (high) */
            const int s_lo = (2 * (c & 1)) % split, s_hi = (2 * (c & 1) + 1) % split;
            for (int m = 0; m < rows; m++) {
                const uint16_t *xm = x + (size_t)(m0 + m) * K + j;
                int32_t pair01, pair23; /* two bfloat16 inputs each, low word first */
                memcpy(&pair01, xm, 4);
                memcpy(&pair23, xm + 2, 4);
                __m512bh x01 = (__m512bh)_mm512_set1_epi32(pair01);
                __m512bh x23 = (__m512bh)_mm512_set1_epi32(pair23);
                part[m * split + s_lo] = _mm512_dpbf16_ps(part[m * split + s_lo], lo, x01);
                part[m * split + s_hi] = _mm512_dpbf16_ps(part[m * split + s_hi], hi, x23);
            }
        }
        const __m512 scale = bf16x16_to_ps((const uint16_t *)(record + 256));
        const __m512 zero = bf16x16_to_ps((const uint16_t *)(record + 288));
        for (int m = 0; m < rows; m++) {
            __m512 sum = part[m * split];
            for (int i = 1; i < split; i++) sum = _mm512_add_ps(sum, part[m * split + i]);
            total[m] = _mm512_fmadd_ps(sum, scale, total[m]);
            total[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[(size_t)(m0 + m) * groups + g]), total[m]);
        }
    }
    for (int m = 0; m < rows; m++) _mm512_storeu_ps(out + (size_t)(m0 + m) * N + n0, total[m]);
}

__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void tile_rows(const uint16_t *x, int K, const uint8_t *tile, const float *xsum,
                      int m0, int rows, float *out, int N, int n0) {
    switch (rows) {
    case 1: tile_pass(x, K, tile, xsum, m0, 1, 4, out, N, n0); break;
    case 2: tile_pass(x, K, tile, xsum, m0, 2, 2, out, N, n0); break;
    case 3: tile_pass(x, K, tile, xsum, m0, 3, 2, out, N, n0); break;
    case 4: tile_pass(x, K, tile, xsum, m0, 4, 2, out, N, n0); break;
    case 5: tile_pass(x, K, tile, xsum, m0, 5, 1, out, N, n0); break;
    case 6: tile_pass(x, K, tile, xsum, m0, 6, 1, out, N, n0); break;
    case 7: tile_pass(x, K, tile, xsum, m0, 7, 1, out, N, n0); break;
    default: tile_pass(x, K, tile, xsum, m0, 8, 1, out, N, n0); break;
    }
}

/* x: [M, K] row-major, bfloat16 (x_is_float32 = 0) or float32 (1: rounded here to bfloat16, to
 * nearest even as torch's .to(torch.bfloat16) does, which saves the caller a conversion and a
 * tensor per call; unlike torch, subnormal inputs become zero, as vdpbf16ps would treat them anyway); packed: N / 16 tiles of K / 32 records; out: float32 [M, N], of which this
 * call writes the columns of tiles [tile_begin, tile_end) (int4_native splits a large product
 * over threads by tiles). K must be a multiple of 32 and N of 16 (int4_native checks).
 * Returns 0, or -1 if out of memory. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
int petald_int4_matmul_avx512(const void *x_in, int x_is_float32, int M, int K, const uint8_t *packed, int N,
                       int tile_begin, int tile_end, float *out) {
    const int groups = K / GROUP;
    float *xsum = malloc(sizeof(float) * (size_t)M * groups);
    uint16_t *rounded = x_is_float32 ? malloc(sizeof(uint16_t) * (size_t)M * K) : NULL;
    if (xsum == NULL || (x_is_float32 && rounded == NULL)) {
        free(xsum);
        free(rounded);
        return -1;
    }
    if (x_is_float32) {
        const float *xf = x_in;
        for (size_t i = 0; i < (size_t)M * K; i += 16) {
            __m256bh b = _mm512_cvtneps_pbh(_mm512_loadu_ps(xf + i));
            _mm256_storeu_si256((__m256i *)(rounded + i), (__m256i)b);
        }
    }
    const uint16_t *x = x_is_float32 ? rounded : x_in;
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            const uint16_t *xg = x + (size_t)m * K + g * GROUP;
            xsum[(size_t)m * groups + g] =
                _mm512_reduce_add_ps(_mm512_add_ps(bf16x16_to_ps(xg), bf16x16_to_ps(xg + 16)));
        }
    }
    for (int t = tile_begin; t < tile_end; t++) {
        const uint8_t *tile = packed + (size_t)t * groups * RECORD;
        for (int m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
            const int rows = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
            tile_rows(x, K, tile, xsum, m0, rows, out, N, t * TILE);
        }
    }
    free(rounded);
    free(xsum);
    return 0;
}
