/*
 * fastmath.h — exp and erfc for the elementwise kernels, written so that compilers vectorise them: no libm
 * call, no branch (every condition is a select). Shared by the softmax (attention.c) and GELU/GEGLU
 * (elementwise.c). A loop over these vectorises only where the target has a vector floor (SSE4.1, AVX2):
 * callers instantiate their loops under a target attribute (see exp_shift_sum_avx2, geglu_rows).
 */
#ifndef PEA_CKERNELS_FASTMATH_H
#define PEA_CKERNELS_FASTMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x): Cephes' expf — x = n·ln2 + r with |r| ≤ ln2/2, a degree-7 polynomial for e^r, then 2^n through
 * the exponent bits. Within 2 ulp of expf over the range that matters; exp(−∞) and anything below −87.3,
 * where expf underflows, give exactly 0; NaN stays NaN. */
/* e^(x − n·ln2) for x within ln2/2 of n·ln2 (ln2 in two parts, so that the reduction is exact enough), as
 * Cephes' degree-7 polynomial: exp_poly's core, a macro so that the 8-lane softmax exp (attention.c) computes
 * it with the same operations; T is float or a vector of floats. */
#define EXP_POLY_REDUCED(T, x, n)                                                                    \
    ({                                                                                              \
        T r_ = (x) - (n) * 0.693359375f;                                                            \
        r_ = r_ - (n) * -2.12194440e-4f;                                                            \
        T y_ = r_ * 1.9875691500e-4f + 1.3981999507e-3f;                                            \
        y_ = y_ * r_ + 8.3334519073e-3f;                                                            \
        y_ = y_ * r_ + 4.1665795894e-2f;                                                            \
        y_ = y_ * r_ + 1.6666665459e-1f;                                                            \
        y_ = y_ * r_ + 5.0000001201e-1f;                                                            \
        y_ * r_ * r_ + r_ + 1.0f;                                                                   \
    })

static inline float exp_poly(float x) {
    const float clamped = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float n = __builtin_floorf(clamped * 1.44269504088896341f + 0.5f);
    const float y = EXP_POLY_REDUCED(float, clamped, n);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.3f ? 0.0f : y * scale;
}

/* erfc(x) with a small relative error everywhere, also deep in the tail where 1 + erf(x) would cancel
 * (GELU needs 1 + erf(v/√2) = erfc(−v/√2) at negative v): the Chebyshev fit of Numerical Recipes §6.2,
 * erfc(z) = t·exp(−z² − 1.26551223 + t·P(t)) with t = 1/(1 + z/2), z = |x| ≥ 0, P of degree 8; fractional
 * error ≤ 1.05e-7 (checked in double against math.erfc over [0, 20]); erfc(−z) = 2 − erfc(z). */
static inline float erfc_poly(float x) {
    const float z = fabsf(x);
    const float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    const float tail = t * exp_poly(-z * z - 1.26551223f + t * p);
    return x < 0.0f ? 2.0f - tail : tail;
}

/* Whether this CPU runs AVX2 and FMA code (the kernels' vectorised variants), asked once. */
static inline int ck_cpu_has_avx2_fma(void) {
#if defined(__x86_64__)
    static int known = -1;
    if (known < 0) known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return known;
#else
    return 0;
#endif
}

#endif
