/* The loops compiled for AVX-512F, with 512-bit vectors. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define FO_ISA avx512
#define FO_ISA_NAME "avx512"
#include "loops.inc"
#endif
