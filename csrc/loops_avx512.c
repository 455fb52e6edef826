/* The loops compiled for AVX-512F, with 512-bit vectors; and bfloat16 rounding to nearest with
 * AVX512-BF16's VCVTNEPS2BF16 (kernels.c uses it where the CPU has the extension). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define FO_ISA avx512
#define FO_ISA_NAME "avx512"
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

/* Stochastic rounding (loops.inc's bf16_stochastic and bf16_stochastic_pair, the same bits) in
 * intrinsics: the compiler's vectorization of the scalar formula took about twice the
 * instructions.  u: float32 bits; r: the 16 random bits added below the bfloat16 mantissa. */
static inline __m256i bf16_stochastic_vector(__m512i u, __m512i r)
{
    const __m512i exponent = _mm512_set1_epi32(0x7f800000);
    const __mmask16 subnormal = _mm512_testn_epi32_mask(u, exponent);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_epi32(u, _mm512_set1_epi32(0x7fffffff)),
                                                  exponent);
    const __m512i flushed = _mm512_mask_and_epi32(u, subnormal, u, _mm512_set1_epi32((int)0x80000000u));
    __m512i y = _mm512_add_epi32(flushed, r);
    y = _mm512_mask_or_epi32(y, nan, u, _mm512_set1_epi32(0x00400000)); /* (u >> 16) | 0x40 */
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(y, 16));
}
static void bf16_stochastic_avx512(uint16_t *restrict dst, const float *restrict src, size_t n,
                                   const uint32_t *restrict r, int shift)
{
    const __m512i low = _mm512_set1_epi32(0xffff);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        const __m512i u = _mm512_maskz_loadu_epi32(m, src + i);
        const __m512i bits = _mm512_maskz_loadu_epi32(m, r + i);
        const __m512i half = shift ? _mm512_srli_epi32(bits, 16) : _mm512_and_epi32(bits, low);
        _mm256_mask_storeu_epi16(dst + i, m, bf16_stochastic_vector(u, half));
    }
}
static void bf16_stochastic_pair_avx512(uint16_t *restrict dst_a, const float *restrict src_a,
                                        uint16_t *restrict dst_b, const float *restrict src_b,
                                        size_t n, const uint32_t *restrict r)
{
    const __m512i low = _mm512_set1_epi32(0xffff);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        const __m512i bits = _mm512_maskz_loadu_epi32(m, r + i);
        const __m512i ua = _mm512_maskz_loadu_epi32(m, src_a + i);
        const __m512i ub = _mm512_maskz_loadu_epi32(m, src_b + i);
        _mm256_mask_storeu_epi16(dst_a + i, m, bf16_stochastic_vector(ua, _mm512_and_epi32(bits, low)));
        _mm256_mask_storeu_epi16(dst_b + i, m, bf16_stochastic_vector(ub, _mm512_srli_epi32(bits, 16)));
    }
}
#define FO_HAVE_STOCHASTIC_ROUNDING
#include "loops.inc"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512bf16")
#include <immintrin.h>
/* Same bits as the integer bf16_nearest: the instruction rounds to nearest even, flushes
 * subnormal inputs to signed zero and quiets NaNs as (u >> 16) | 0x40 (checked exhaustively
 * over all 2^32 inputs when this was written; tests/c compares the two paths). */
void fo_bf16_nearest_avx512bf16(uint16_t *dst, const float *src, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256bh r = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)r);
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        const __m256bh r = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
        _mm256_mask_storeu_epi16(dst + i, m, (__m256i)r);
    }
}
#pragma GCC pop_options
#endif
