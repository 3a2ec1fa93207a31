/*
 * convert.c — storage conversions between f32, f16, bf16 and the integer id types.
 *
 * The f16/bf16 rules (round to nearest even, as torch) are half.h's.
 */
#include "ckernels.h"
#include "half.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static int64_t type_size(int type) {
    switch (type) {
    case CK_F32: case CK_I32: return 4;
    case CK_F16: case CK_BF16: return 2;
    case CK_I64: return 8;
    }
    return 0;
}

/* f32 → any type, one loop per destination. */
static void narrow_from_f32(const float *x, void *dst, int dst_type, int64_t n) {
    switch (dst_type) {
    case CK_F32: memmove(dst, x, (size_t)n * 4); break;
    case CK_F16: for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = ck_f32_to_f16(x[i]); break;
    case CK_BF16: for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = ck_f32_to_bf16(x[i]); break;
    case CK_I32: for (int64_t i = 0; i < n; i++) ((int32_t *)dst)[i] = (int32_t)x[i]; break;
    case CK_I64: for (int64_t i = 0; i < n; i++) ((int64_t *)dst)[i] = (int64_t)x[i]; break;
    }
}

/* Every f16 value widened (256 KB), built on first use; NULL when out of memory. */
static float *f16_values;
static pthread_once_t f16_values_once = PTHREAD_ONCE_INIT;

static void build_f16_values(void) {
    float *table = malloc(65536 * sizeof(float));
    if (!table) return;
    for (uint32_t h = 0; h < 65536; h++) table[h] = ck_f16_to_f32((uint16_t)h);
    f16_values = table;
}

static const float *f16_table(void) {
    pthread_once(&f16_values_once, build_f16_values);
    return f16_values;
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
    /* One loop per (source, destination) pair, so the type dispatch is outside the loop. An f16 source is read
     * through a table of its 65536 values (built once from ck_f16_to_f32): the exact scalar rule, without its
     * branches per element. */
    switch (src_type) {
    case CK_F32: narrow_from_f32((const float *)src, dst, dst_type, n); break;
    case CK_F16: {
        const float *table = f16_table();
        if (!table) return CK_ENOMEM;
        const uint16_t *h = src;
        switch (dst_type) {
        case CK_F32: for (int64_t i = 0; i < n; i++) ((float *)dst)[i] = table[h[i]]; break;
        case CK_BF16: for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = ck_f32_to_bf16(table[h[i]]); break;
        case CK_I32: for (int64_t i = 0; i < n; i++) ((int32_t *)dst)[i] = (int32_t)table[h[i]]; break;
        case CK_I64: for (int64_t i = 0; i < n; i++) ((int64_t *)dst)[i] = (int64_t)table[h[i]]; break;
        }
        break;
    }
    case CK_BF16: {
        const uint16_t *b = src;
        switch (dst_type) {
        case CK_F32: for (int64_t i = 0; i < n; i++) ((float *)dst)[i] = ck_bf16_to_f32(b[i]); break;
        case CK_F16: for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = ck_f32_to_f16(ck_bf16_to_f32(b[i])); break;
        case CK_I32: for (int64_t i = 0; i < n; i++) ((int32_t *)dst)[i] = (int32_t)ck_bf16_to_f32(b[i]); break;
        case CK_I64: for (int64_t i = 0; i < n; i++) ((int64_t *)dst)[i] = (int64_t)ck_bf16_to_f32(b[i]); break;
        }
        break;
    }
    case CK_I32:
        for (int64_t i = 0; i < n; i++) {
            float v = (float)((const int32_t *)src)[i];
            narrow_from_f32(&v, (char *)dst + i * type_size(dst_type), dst_type, 1);
        }
        break;
    case CK_I64:
        for (int64_t i = 0; i < n; i++) {
            float v = (float)((const int64_t *)src)[i];
            narrow_from_f32(&v, (char *)dst + i * type_size(dst_type), dst_type, 1);
        }
        break;
    }
    return CK_OK;
}
