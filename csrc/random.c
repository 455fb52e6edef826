/*
 * random.c -- stochastic rounding's random bits: ARS-7 (Salmon et al., "Parallel random numbers:
 * as easy as 1, 2, 3", SC 2011), a counter-based generator of AES rounds with a Weyl key
 * schedule, from the same paper as Philox.  Five rounds already pass TestU01's BigCrush; seven
 * (Random123's default) keep a margin, as Philox's ten do over its seven.
 *
 *   rk_0 = (lo: key, hi: 0);  rk_i = rk_{i-1} + (0x9e3779b97f4a7c15, 0xbb67ae8584caa73b)
 *   (each 64-bit half added mod 2^64);  x = the 128-bit counter block (lo 32 bits: counter)
 *   x ^= rk_0;  x = aesenc(x, rk_i) for i = 1..6;  x = aesenclast(x, rk_7)
 *
 * (aesenc and aesenclast as the x86 instructions: ShiftRows, SubBytes, MixColumns but in the
 * last, then XOR with the round key; bytes in memory order.)  Its four little-endian 32-bit
 * words are words 4 counter + 0..3 of the stream.  One AES instruction per round serves four
 * elements (eight with VAES on 256-bit vectors, sixteen on 512-bit ones): a fraction of the
 * multiply hash it replaced.  Four implementations give the same bits; kernels.c picks one per CPU and
 * FASTOPT_ISA (the baseline level runs the portable one, so tests reach every path).
 */
#include <pthread.h>
#include "internal.h"

#define WEYL_LO 0x9e3779b97f4a7c15ull
#define WEYL_HI 0xbb67ae8584caa73bull
#define ROUNDS 7

/* ---- portable: the state as four little-endian column words, MixColumns by table ---------- */

/* mix_table[r][x]: the column word (row i in byte i) that MixColumns makes of S(x) alone in
 * row r: (2 S, S, S, 3 S) for row 0, rotated left by 8 r bits for row r */
static uint8_t sbox[256];
static uint32_t mix_table[4][256];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static uint8_t gf_times2(uint8_t a) { return (uint8_t)((a << 1) ^ ((a >> 7) * 0x1b)); }
static uint8_t gf_multiply(uint8_t a, uint8_t b)
{
    uint8_t product = 0;
    for (; b; b >>= 1, a = gf_times2(a))
        if (b & 1) product ^= a;
    return product;
}
static uint8_t rotl8(uint8_t x, int r) { return (uint8_t)((x << r) | (x >> (8 - r))); }
static uint32_t rotl32(uint32_t x, int r) { return r ? (x << r) | (x >> (32 - r)) : x; }

/* AES's S-box from its definition: the inverse in GF(2^8) (0 for 0), then the affine map */
static void build_tables(void)
{
    for (int x = 0; x < 256; x++) {
        uint8_t inverse = 0;
        for (int y = 1; y < 256 && x; y++)
            if (gf_multiply((uint8_t)x, (uint8_t)y) == 1) inverse = (uint8_t)y;
        const uint8_t s = inverse ^ rotl8(inverse, 1) ^ rotl8(inverse, 2) ^ rotl8(inverse, 3) ^
                          rotl8(inverse, 4) ^ 0x63;
        const uint8_t s2 = gf_times2(s);
        sbox[x] = s;
        const uint32_t row0 = (uint32_t)s2 | (uint32_t)s << 8 | (uint32_t)s << 16 | (uint32_t)(s2 ^ s) << 24;
        for (int r = 0; r < 4; r++) mix_table[r][x] = rotl32(row0, 8 * r);
    }
}

/* one round on four column words (row r in byte r): column c of the result takes row r from
 * column c + r (ShiftRows), each byte through the S-box, then MixColumns unless last */
static inline __attribute__((always_inline)) void aes_round(uint32_t col[4], const uint32_t rk[4],
                                                             const int last)
{
    uint32_t out[4];
    for (int c = 0; c < 4; c++) {
        uint32_t x = rk[c];
        for (int r = 0; r < 4; r++) {
            const uint8_t in = (uint8_t)(col[(c + r) & 3] >> (8 * r));
            x ^= last ? (uint32_t)sbox[in] << (8 * r) : mix_table[r][in];
        }
        out[c] = x;
    }
    for (int c = 0; c < 4; c++) col[c] = out[c];
}

void fo_random_bits_portable(uint32_t *out, uint32_t counter, size_t n_blocks, uint64_t key)
{
    pthread_once(&tables_once, build_tables);
    uint32_t rk[ROUNDS + 1][4];
    uint64_t lo = key, hi = 0;
    for (int i = 0; i <= ROUNDS; i++, lo += WEYL_LO, hi += WEYL_HI) {
        rk[i][0] = (uint32_t)lo, rk[i][1] = (uint32_t)(lo >> 32);
        rk[i][2] = (uint32_t)hi, rk[i][3] = (uint32_t)(hi >> 32);
    }
    for (size_t j = 0; j < n_blocks; j++) {
        uint32_t col[4] = {(counter + (uint32_t)j) ^ rk[0][0], rk[0][1], rk[0][2], rk[0][3]};
        for (int i = 1; i < ROUNDS; i++) aes_round(col, rk[i], 0);
        aes_round(col, rk[ROUNDS], 1);
        for (int c = 0; c < 4; c++) out[4 * j + c] = col[c];
    }
}

#ifdef FO_X86
#include <immintrin.h>

/* the Weyl key schedule rk_0 .. rk_ROUNDS, one 128-bit key each (the vector paths broadcast it) */
static inline void round_keys(__m128i rk[ROUNDS + 1], uint64_t key)
{
    const __m128i weyl = _mm_set_epi64x((long long)WEYL_HI, (long long)WEYL_LO);
    rk[0] = _mm_set_epi64x(0, (long long)key);
    for (int i = 1; i <= ROUNDS; i++) rk[i] = _mm_add_epi64(rk[i - 1], weyl);
}

/* ---- AES-NI: four blocks in flight (an AESENC's latency is several cycles) ------------------ */

/* Blocks [0, n_blocks) from counter.  Always inlined, so the VAES paths' tails run it in their
 * own VEX encoding: a call into this file's SSE-encoded function with the upper halves of the
 * vector registers still dirty (gcc emits no vzeroupper before a tail call) took ~130 ns a call
 * on an AMD EPYC (Zen 3), four times the 256 elements' generation. */
__attribute__((target("aes"))) static inline __attribute__((always_inline)) void
aes_blocks(uint32_t *out, uint32_t counter, size_t n_blocks, const __m128i rk[ROUNDS + 1])
{
    size_t j = 0;
    for (; j + 4 <= n_blocks; j += 4) {
        __m128i x[4];
        for (int b = 0; b < 4; b++)
            x[b] = _mm_xor_si128(_mm_cvtsi32_si128((int)(counter + (uint32_t)(j + b))), rk[0]);
        for (int i = 1; i < ROUNDS; i++)
            for (int b = 0; b < 4; b++) x[b] = _mm_aesenc_si128(x[b], rk[i]);
        for (int b = 0; b < 4; b++)
            _mm_storeu_si128((__m128i *)(out + 4 * (j + b)), _mm_aesenclast_si128(x[b], rk[ROUNDS]));
    }
    for (; j < n_blocks; j++) {
        __m128i x = _mm_xor_si128(_mm_cvtsi32_si128((int)(counter + (uint32_t)j)), rk[0]);
        for (int i = 1; i < ROUNDS; i++) x = _mm_aesenc_si128(x, rk[i]);
        _mm_storeu_si128((__m128i *)(out + 4 * j), _mm_aesenclast_si128(x, rk[ROUNDS]));
    }
}

__attribute__((target("aes"))) void fo_random_bits_aesni(uint32_t *out, uint32_t counter,
                                                                 size_t n_blocks, uint64_t key)
{
    __m128i rk[ROUNDS + 1];
    round_keys(rk, key);
    aes_blocks(out, counter, n_blocks, rk);
}

/* ---- VAES on 256-bit vectors (AVX2 CPUs with VAES): two blocks per instruction, four vectors
 * in flight -------------------------------------------------------------------------------- */

__attribute__((target("avx2,vaes,aes"))) void
fo_random_bits_vaes256(uint32_t *out, uint32_t counter, size_t n_blocks, uint64_t key)
{
    __m128i keys[ROUNDS + 1];
    __m256i rk[ROUNDS + 1];
    round_keys(keys, key);
    for (int i = 0; i <= ROUNDS; i++) rk[i] = _mm256_broadcastsi128_si256(keys[i]);
    /* 128-bit lane b holds counter + b in its lowest word */
    __m256i ctr = _mm256_set_epi32(0, 0, 0, (int)(counter + 1u), 0, 0, 0, (int)counter);
    const __m256i two = _mm256_set_epi32(0, 0, 0, 2, 0, 0, 0, 2);
    size_t j = 0;
    for (; j + 8 <= n_blocks; j += 8) {
        __m256i x[4];
        for (int b = 0; b < 4; b++, ctr = _mm256_add_epi32(ctr, two)) x[b] = _mm256_xor_si256(ctr, rk[0]);
        for (int i = 1; i < ROUNDS; i++)
            for (int b = 0; b < 4; b++) x[b] = _mm256_aesenc_epi128(x[b], rk[i]);
        for (int b = 0; b < 4; b++)
            _mm256_storeu_si256((__m256i *)(out + 4 * j + 8 * b), _mm256_aesenclast_epi128(x[b], rk[ROUNDS]));
    }
    aes_blocks(out + 4 * j, counter + (uint32_t)j, n_blocks - j, keys);
}

/* ---- VAES on 512-bit vectors: four blocks per instruction, two vectors in flight ------------ */

__attribute__((target("avx512f,vaes,aes"))) void
fo_random_bits_vaes512(uint32_t *out, uint32_t counter, size_t n_blocks, uint64_t key)
{
    __m128i keys[ROUNDS + 1];
    __m512i rk[ROUNDS + 1];
    round_keys(keys, key);
    for (int i = 0; i <= ROUNDS; i++) rk[i] = _mm512_broadcast_i32x4(keys[i]);
    /* 128-bit lane b holds counter + b in its lowest word */
    __m512i ctr = _mm512_add_epi32(_mm512_set1_epi32((int)counter),
                                   _mm512_set_epi32(0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0));
    ctr = _mm512_maskz_mov_epi32(0x1111, ctr);
    const __m512i four = _mm512_maskz_set1_epi32(0x1111, 4), eight = _mm512_add_epi32(four, four);
    size_t j = 0;
    for (; j + 8 <= n_blocks; j += 8, ctr = _mm512_add_epi32(ctr, eight)) {
        __m512i x0 = _mm512_xor_si512(ctr, rk[0]);
        __m512i x1 = _mm512_xor_si512(_mm512_add_epi32(ctr, four), rk[0]);
        for (int i = 1; i < ROUNDS; i++) {
            x0 = _mm512_aesenc_epi128(x0, rk[i]);
            x1 = _mm512_aesenc_epi128(x1, rk[i]);
        }
        _mm512_storeu_si512(out + 4 * j, _mm512_aesenclast_epi128(x0, rk[ROUNDS]));
        _mm512_storeu_si512(out + 4 * j + 16, _mm512_aesenclast_epi128(x1, rk[ROUNDS]));
    }
    aes_blocks(out + 4 * j, counter + (uint32_t)j, n_blocks - j, keys);
}
#endif
