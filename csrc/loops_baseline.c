/* The loops for any x86-64 (SSE2) or any other CPU: what the compiler's default target gives. */
#define FO_ISA baseline
#define FO_ISA_NAME "baseline"
#include "loops.inc"
