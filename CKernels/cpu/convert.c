/*
 * convert.c — storage conversions between f32, f16, bf16 and the integer id types.
 *
 * f32 → f16 and f32 → bf16 round to nearest, ties to even, as torch's .half() and .bfloat16() do;
 * overflow gives ±inf, NaN stays a (quiet) NaN. f16 subnormals are handled exactly both ways.
 */
#include "ckernels.h"

#include <math.h>
#include <string.h>

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000 | (man << 13));           /* inf / NaN */
    if (exp == 0) {                                                                   /* zero / subnormal */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

static uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t abs = u & 0x7fffffff;
    if (abs >= 0x7f800000) return sign | 0x7c00 | (abs > 0x7f800000 ? 0x200 : 0);  /* inf / NaN */
    if (abs >= 0x477ff000) return sign | 0x7c00;            /* ≥ 65520 rounds to inf */
    if (abs < 0x38800000) {                                  /* below the smallest normal f16, 2^-14 */
        /* subnormal: value / 2^-24, rounded to nearest even by the FPU's default mode */
        float scaled = f32_from_bits(abs) * 0x1p24f;
        return sign | (uint16_t)nearbyintf(scaled);
    }
    uint32_t rounded = abs + 0xfff + ((abs >> 13) & 1);      /* round to nearest even at bit 13 */
    return sign | (uint16_t)((rounded - (112u << 23)) >> 13);
}

static float bf16_to_f32(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }

static uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);          /* quiet NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static float load_as_f32(const void *src, int type, int64_t i) {
    switch (type) {
    case CK_F32: return ((const float *)src)[i];
    case CK_F16: return f16_to_f32(((const uint16_t *)src)[i]);
    case CK_BF16: return bf16_to_f32(((const uint16_t *)src)[i]);
    case CK_I32: return (float)((const int32_t *)src)[i];
    case CK_I64: return (float)((const int64_t *)src)[i];
    }
    return 0;
}

static int64_t type_size(int type) {
    switch (type) {
    case CK_F32: case CK_I32: return 4;
    case CK_F16: case CK_BF16: return 2;
    case CK_I64: return 8;
    }
    return 0;
}

int ck_convert(const void *src, int src_type, void *dst, int dst_type, int64_t n) {
    if (type_size(src_type) == 0 || type_size(dst_type) == 0) return CK_EINVAL;
    if (src_type == dst_type) {
        memmove(dst, src, (size_t)(n * type_size(src_type)));
        return CK_OK;
    }
    /* Integer ↔ integer conversions keep the value exactly; everything else goes through f32. */
    if (src_type == CK_I64 && dst_type == CK_I32) {
        for (int64_t i = 0; i < n; i++) ((int32_t *)dst)[i] = (int32_t)((const int64_t *)src)[i];
        return CK_OK;
    }
    if (src_type == CK_I32 && dst_type == CK_I64) {
        for (int64_t i = 0; i < n; i++) ((int64_t *)dst)[i] = ((const int32_t *)src)[i];
        return CK_OK;
    }
    for (int64_t i = 0; i < n; i++) {
        float v = load_as_f32(src, src_type, i);
        switch (dst_type) {
        case CK_F32: ((float *)dst)[i] = v; break;
        case CK_F16: ((uint16_t *)dst)[i] = f32_to_f16(v); break;
        case CK_BF16: ((uint16_t *)dst)[i] = f32_to_bf16(v); break;
        case CK_I32: ((int32_t *)dst)[i] = (int32_t)v; break;
        case CK_I64: ((int64_t *)dst)[i] = (int64_t)v; break;
        }
    }
    return CK_OK;
}
