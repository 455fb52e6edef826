/* The loops compiled for AVX-512F, with 512-bit vectors; and bfloat16 rounding to nearest with
 * AVX512-BF16's VCVTNEPS2BF16 (kernels.c uses it where the CPU has the extension). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define FO_ISA avx512
#define FO_ISA_NAME "avx512"
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
