/*
 * convert.c — storage conversions between f32, f16, bf16 and the integer id types.
 *
 * The f16/bf16 rules (round to nearest even, as torch) are half.h's.
 */
#include "ckernels.h"
#include "half.h"

#include <string.h>

static float load_as_f32(const void *src, int type, int64_t i) {
    switch (type) {
    case CK_F32: return ((const float *)src)[i];
    case CK_F16: return ck_f16_to_f32(((const uint16_t *)src)[i]);
    case CK_BF16: return ck_bf16_to_f32(((const uint16_t *)src)[i]);
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
        case CK_F16: ((uint16_t *)dst)[i] = ck_f32_to_f16(v); break;
        case CK_BF16: ((uint16_t *)dst)[i] = ck_f32_to_bf16(v); break;
        case CK_I32: ((int32_t *)dst)[i] = (int32_t)v; break;
        case CK_I64: ((int64_t *)dst)[i] = (int64_t)v; break;
        }
    }
    return CK_OK;
}
