/*
 * half.h — f16 and bf16 ↔ f32, shared by the conversions (convert.c) and the GEMM's widening pack (gemm.c).
 *
 * Widening (f16/bf16 → f32) is exact. Narrowing rounds to nearest, ties to even, as torch's .half() and
 * .bfloat16() do; overflow gives ±inf, NaN stays a (quiet) NaN. f16 subnormals are handled exactly both ways.
 */
#ifndef PEA_CKERNELS_HALF_H
#define PEA_CKERNELS_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t ck_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float ck_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float ck_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return ck_f32_from_bits(sign | 0x7f800000 | (man << 13));        /* inf / NaN */
    if (exp == 0) {                                                                   /* zero / subnormal */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return ck_f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t ck_f32_to_f16(float f) {
    uint32_t u = ck_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t abs = u & 0x7fffffff;
    if (abs >= 0x7f800000) return sign | 0x7c00 | (abs > 0x7f800000 ? 0x200 : 0);  /* inf / NaN */
    if (abs >= 0x477ff000) return sign | 0x7c00;            /* ≥ 65520 rounds to inf */
    if (abs < 0x38800000) {                                  /* below the smallest normal f16, 2^-14 */
        /* subnormal: value / 2^-24, rounded to nearest even by the FPU's default mode */
        float scaled = ck_f32_from_bits(abs) * 0x1p24f;
        return sign | (uint16_t)nearbyintf(scaled);
    }
    uint32_t rounded = abs + 0xfff + ((abs >> 13) & 1);      /* round to nearest even at bit 13 */
    return sign | (uint16_t)((rounded - (112u << 23)) >> 13);
}

static inline float ck_bf16_to_f32(uint16_t b) { return ck_f32_from_bits((uint32_t)b << 16); }

static inline uint16_t ck_f32_to_bf16(float f) {
    uint32_t u = ck_f32_bits(f);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);          /* quiet NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#endif
