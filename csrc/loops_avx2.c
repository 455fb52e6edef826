/* The loops compiled for AVX2 (+FMA available, but -ffp-contract=off keeps a*b+c unfused), and
 * stochastic rounding in AVX2 intrinsics. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#define FO_ISA avx2
#define FO_ISA_NAME "avx2"
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Stochastic rounding (loops.inc's bf16_stochastic and bf16_stochastic_pair, the same bits) for
 * eight elements: gcc -O3's vectorization of the scalar pair function was ~700 lines of
 * assembly, these ~140.  u: float32 bits; r: the 16 random bits added below the bfloat16 mantissa. */
static inline __m128i bf16_stochastic_vector(__m256i u, __m256i r)
{
    const __m256i exponent = _mm256_set1_epi32(0x7f800000), magnitude = _mm256_set1_epi32(0x7fffffff);
    const __m256i subnormal = _mm256_cmpeq_epi32(_mm256_and_si256(u, exponent), _mm256_setzero_si256());
    /* (u & magnitude) is nonnegative, so the signed comparison is the unsigned one */
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, magnitude), exponent);
    const __m256i flushed = _mm256_andnot_si256(_mm256_and_si256(subnormal, magnitude), u);
    __m256i y = _mm256_add_epi32(flushed, r);
    y = _mm256_blendv_epi8(y, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan); /* (u >> 16) | 0x40 */
    y = _mm256_srli_epi32(y, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(y), _mm256_extracti128_si256(y, 1));
}
/* the tail of fewer than eight elements goes through zero-padded copies, by the same formula */
static void bf16_stochastic_avx2(uint16_t *restrict dst, const float *restrict src, size_t n,
                                 const uint32_t *restrict r, int shift)
{
    const __m256i low = _mm256_set1_epi32(0xffff);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(src + i));
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(r + i));
        const __m256i half = shift ? _mm256_srli_epi32(bits, 16) : _mm256_and_si256(bits, low);
        _mm_storeu_si128((__m128i *)(dst + i), bf16_stochastic_vector(u, half));
    }
    if (i < n) {
        float tail_src[8] = {0};
        uint32_t tail_r[8] = {0};
        uint16_t tail_dst[8];
        memcpy(tail_src, src + i, (n - i) * sizeof(float));
        memcpy(tail_r, r + i, (n - i) * sizeof(uint32_t));
        bf16_stochastic_avx2(tail_dst, tail_src, 8, tail_r, shift);
        memcpy(dst + i, tail_dst, (n - i) * sizeof(uint16_t));
    }
}
static void bf16_stochastic_pair_avx2(uint16_t *restrict dst_a, const float *restrict src_a,
                                      uint16_t *restrict dst_b, const float *restrict src_b,
                                      size_t n, const uint32_t *restrict r)
{
    const __m256i low = _mm256_set1_epi32(0xffff);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(r + i));
        const __m256i ua = _mm256_loadu_si256((const __m256i *)(src_a + i));
        const __m256i ub = _mm256_loadu_si256((const __m256i *)(src_b + i));
        _mm_storeu_si128((__m128i *)(dst_a + i), bf16_stochastic_vector(ua, _mm256_and_si256(bits, low)));
        _mm_storeu_si128((__m128i *)(dst_b + i), bf16_stochastic_vector(ub, _mm256_srli_epi32(bits, 16)));
    }
    if (i < n) {
        bf16_stochastic_avx2(dst_a + i, src_a + i, n - i, r + i, 0);
        bf16_stochastic_avx2(dst_b + i, src_b + i, n - i, r + i, 16);
    }
}
/* To nearest, ties to even, is the same rounding with r = 0x7fff + the kept mantissa's lowest
 * bit (u's bit 16: a subnormal u, flushed to its sign, carries nothing either way); gcc's
 * vectorization of loops.inc's scalar version takes ~1.5x the instructions. */
static void bf16_nearest_avx2(uint16_t *restrict dst, const float *restrict src, size_t n)
{
    const __m256i half = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(src + i));
        const __m256i r = _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
        _mm_storeu_si128((__m128i *)(dst + i), bf16_stochastic_vector(u, r));
    }
    if (i < n) {
        float tail_src[8] = {0};
        uint16_t tail_dst[8];
        memcpy(tail_src, src + i, (n - i) * sizeof(float));
        bf16_nearest_avx2(tail_dst, tail_src, 8);
        memcpy(dst + i, tail_dst, (n - i) * sizeof(uint16_t));
    }
}
#define FO_HAVE_STOCHASTIC_ROUNDING
#define FO_HAVE_NEAREST_ROUNDING
#include "loops.inc"
#endif
