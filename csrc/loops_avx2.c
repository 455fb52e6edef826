/* The loops compiled for AVX2 (+FMA available, but -ffp-contract=off keeps a*b+c unfused). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#define FO_ISA avx2
#define FO_ISA_NAME "avx2"
#include "loops.inc"
#endif
