/*
 * Train a linear model y = X w + b by least squares with fastopt's Adam, from C.
 *
 * Build and run (see Makefile):
 *   make -C examples/c && ./examples/c/train_linear
 * The data is generated here from a fixed integer sequence, so the Python test
 * (tests/test_embedding.py) can build the same data and compare with fastopt.Adam.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "fastopt.h"

enum { N = 256, D = 8, STEPS = 300 };

/* A 31-bit linear congruential sequence: the same numbers in C and in the test. */
static unsigned long seed = 12345;
static float next_value(void)
{
    seed = (seed * 1103515245UL + 12345UL) % 2147483648UL;
    return (float)((long)(seed % 2001) - 1000) / 1000.0f;
}

int main(void)
{
    static float X[N][D], y[N];
    float true_w[D], w[D + 1] = {0}; /* w[D] is the bias */
    float m[D + 1] = {0}, v[D + 1] = {0}, grad[D + 1];
    for (int j = 0; j < D; j++) true_w[j] = next_value();
    for (int i = 0; i < N; i++) {
        y[i] = 0.5f;
        for (int j = 0; j < D; j++) {
            X[i][j] = next_value();
            y[i] += X[i][j] * true_w[j];
        }
    }

    fo_adam_params hp = {.lr = 0.05, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                         .convention = FO_TEXTBOOK};
    double loss = 0.0;
    for (int step = 1; step <= STEPS; step++) {
        double g[D + 1] = {0};
        loss = 0.0;
        for (int i = 0; i < N; i++) {
            double err = w[D] - y[i];
            for (int j = 0; j < D; j++) err += (double)X[i][j] * w[j];
            loss += err * err / N;
            for (int j = 0; j < D; j++) g[j] += 2.0 * err * X[i][j] / N;
            g[D] += 2.0 * err / N;
        }
        for (int j = 0; j <= D; j++) grad[j] = (float)g[j];
        hp.step = step;
        const int status = fo_adam_f32(w, grad, m, v, NULL, D + 1, &hp);
        if (status != FO_OK) {
            fprintf(stderr, "fo_adam_f32: %s\n", fo_strerror(status));
            return 1;
        }
    }
    printf("loss %.9g\n", loss);
    for (int j = 0; j <= D; j++) printf("%.9g%c", w[j], j == D ? '\n' : ' ');
    return 0;
}
