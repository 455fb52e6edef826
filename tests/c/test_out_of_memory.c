/* Every entry point that allocates returns FO_ERR_MEMORY when malloc fails (linked with
 * -Wl,--wrap=malloc), and writes nothing.  LAMB and LARS returned FO_ERR_NULL ("a required
 * buffer is NULL"). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fastopt.h"

static int fail_malloc;
void *__real_malloc(size_t size);
void *__wrap_malloc(size_t size) { return fail_malloc ? NULL : __real_malloc(size); }

enum { N = 100 };
static float p[N], g[N], a[N], b[N], before[N];

static int check(const char *name, int status)
{
    const int ok = status == FO_ERR_MEMORY && memcmp(p, before, sizeof p) == 0;
    printf("%s %d %s\n", name, status, ok ? "ok" : "FAILED");
    return ok;
}

int main(void)
{
    for (int i = 0; i < N; i++) p[i] = before[i] = 1.0f, g[i] = 0.5f;
    fo_lamb_params lamb = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-6, .step = 1};
    fo_lars_params lars = {.lr = 1e-3, .momentum = 0.9, .trust_coefficient = 1e-3};
    fo_adafactor_params adafactor = {.lr = 1e-2, .beta2_decay = -0.8, .eps1 = -1, .eps2 = 1e-3,
                                     .d = 1, .step = 1};
    fo_set_num_threads(1);
    (void)fo_isa(); /* (its dispatch set up before malloc fails) */
    fail_malloc = 1;
    int ok = check("lamb", fo_lamb_f32(p, g, a, b, N, &lamb));
    ok &= check("lars", fo_lars_f32(p, g, a, N, &lars));
    ok &= check("adafactor", fo_adafactor_f32(p, g, NULL, NULL, b, N, &adafactor));
    fail_malloc = 0;
    return ok ? 0 : 1;
}
