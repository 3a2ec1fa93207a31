/*
 * emu_half.h — __half and __nv_bfloat16 for the SIMT emulator (included by the stand-in cuda_fp16.h and
 * cuda_bf16.h). Storage is the IEEE binary16 / bfloat16 bit pattern; arithmetic is done in f32 (or f64
 * for fma) and rounded once, which gives the correctly rounded f16/bf16 result as the GPU's instructions
 * do. Conversions from f32 round to nearest-even unless the name says otherwise (_rz, _rd, _ru); a NaN
 * becomes the canonical 0x7FFF, as CUDA's conversions produce.
 */
#ifndef PEA_EMU_HALF_H
#define PEA_EMU_HALF_H

#include "cuda_emu.h"

namespace pea_emu {

enum { RN = 0, RZ = 1, RD = 2, RU = 3 };

/* Round the f32 `f` to binary16 with the given rounding mode. */
static inline unsigned short f32_to_f16_bits(float f, int mode) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = x >> 31, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;
    if (ax == 0x7f800000u) return (unsigned short)((sign << 15) | 0x7c00u);
    uint32_t e = ax >> 23, m = ax & 0x7fffffu;
    uint64_t q, rem, half;
    if (e >= 113) { /* |f| ≥ 2^-14: a normal half, unless it overflows */
        uint32_t he = e - 112;
        if (he >= 31) { /* |f| ≥ 2^16: infinity, or the largest finite half when rounding toward zero */
            bool away = mode == RN || (mode == RU && !sign) || (mode == RD && sign);
            return (unsigned short)((sign << 15) | (away ? 0x7c00u : 0x7bffu));
        }
        q = ((uint64_t)he << 10) | (m >> 13);
        rem = m & 0x1fffu;
        half = 0x1000u;
    } else { /* a subnormal half (units of 2^-24), or zero */
        uint64_t mant = e ? (m | 0x800000u) : m;
        uint32_t shift = 126 - (e ? e : 1);
        if (shift > 40) shift = 40;
        q = mant >> shift;
        rem = mant & ((1ull << shift) - 1);
        half = 1ull << (shift - 1);
    }
    bool inc = false;
    if (mode == RN) inc = rem > half || (rem == half && (q & 1));
    else if (mode == RU) inc = !sign && rem != 0;
    else if (mode == RD) inc = sign && rem != 0;
    q += inc; /* a carry moves into the exponent, up to infinity (0x7c00) */
    return (unsigned short)((sign << 15) | (uint32_t)q);
}

static inline float f16_bits_to_f32(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t x;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-08f; /* m · 2^-24, exact */
        memcpy(&x, &v, 4);
        x |= sign;
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* Round the f32 `f` to bfloat16 (the top 16 bits of an f32) with the given rounding mode. */
static inline unsigned short f32_to_bf16_bits(float f, int mode) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    uint32_t sign = x >> 31, q = x >> 16, rem = x & 0xffffu;
    if ((x & 0x7fffffffu) == 0x7f800000u) return (unsigned short)q;
    bool inc = false;
    if (mode == RN) inc = rem > 0x8000u || (rem == 0x8000u && (q & 1));
    else if (mode == RU) inc = !sign && rem != 0;
    else if (mode == RD) inc = sign && rem != 0;
    return (unsigned short)(q + inc);
}

static inline float bf16_bits_to_f32(unsigned short b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

} // namespace pea_emu

/* ---------------------------------------------------------------------------------------------------- */
/* __half                                                                                                */

struct __half_raw {
    unsigned short x;
};

struct __half {
    unsigned short __x;
    __half() = default;
    __half(__half_raw r) : __x(r.x) {}
    __half(float f) : __x(pea_emu::f32_to_f16_bits(f, pea_emu::RN)) {}
    __half(double d) : __x(pea_emu::f32_to_f16_bits((float)d, pea_emu::RN)) {}
    __half(int i) : __x(pea_emu::f32_to_f16_bits((float)i, pea_emu::RN)) {}
    __half(unsigned int i) : __x(pea_emu::f32_to_f16_bits((float)i, pea_emu::RN)) {}
    __half(long long i) : __x(pea_emu::f32_to_f16_bits((float)i, pea_emu::RN)) {}
    __half(unsigned long long i) : __x(pea_emu::f32_to_f16_bits((float)i, pea_emu::RN)) {}
    operator float() const { return pea_emu::f16_bits_to_f32(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
    __half &operator=(__half_raw r) { __x = r.x; return *this; }
};
typedef __half half;

struct __align__(4) __half2 {
    __half x, y;
};
typedef __half2 half2;

static inline __half pea_emu_mkhalf(unsigned short b) { __half h; h.__x = b; return h; }

static inline __half __float2half(float f) { return pea_emu_mkhalf(pea_emu::f32_to_f16_bits(f, pea_emu::RN)); }
static inline __half __float2half_rn(float f) { return pea_emu_mkhalf(pea_emu::f32_to_f16_bits(f, pea_emu::RN)); }
static inline __half __float2half_rz(float f) { return pea_emu_mkhalf(pea_emu::f32_to_f16_bits(f, pea_emu::RZ)); }
static inline __half __float2half_rd(float f) { return pea_emu_mkhalf(pea_emu::f32_to_f16_bits(f, pea_emu::RD)); }
static inline __half __float2half_ru(float f) { return pea_emu_mkhalf(pea_emu::f32_to_f16_bits(f, pea_emu::RU)); }
static inline float __half2float(__half h) { return pea_emu::f16_bits_to_f32(h.__x); }
static inline __half __int2half_rn(int i) { return __float2half_rn((float)i); }
static inline int __half2int_rn(__half h) { return (int)nearbyintf(__half2float(h)); }
static inline int __half2int_rz(__half h) { return (int)truncf(__half2float(h)); }
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }
static inline short __half_as_short(__half h) { return (short)h.__x; }
static inline __half __ushort_as_half(unsigned short b) { return pea_emu_mkhalf(b); }
static inline __half __short_as_half(short b) { return pea_emu_mkhalf((unsigned short)b); }

static inline __half __hadd(__half a, __half b) { return __float2half(__half2float(a) + __half2float(b)); }
static inline __half __hsub(__half a, __half b) { return __float2half(__half2float(a) - __half2float(b)); }
static inline __half __hmul(__half a, __half b) { return __float2half(__half2float(a) * __half2float(b)); }
static inline __half __hdiv(__half a, __half b) { return __float2half(__half2float(a) / __half2float(b)); }
static inline __half __hfma(__half a, __half b, __half c) {
    return __float2half((float)fma((double)__half2float(a), (double)__half2float(b), (double)__half2float(c)));
}
static inline __half __hneg(__half a) { return pea_emu_mkhalf(a.__x ^ 0x8000u); }
static inline __half __habs(__half a) { return pea_emu_mkhalf(a.__x & 0x7fffu); }
static inline __half __hmax(__half a, __half b) { return __float2half(fmaxf(__half2float(a), __half2float(b))); }
static inline __half __hmin(__half a, __half b) { return __float2half(fminf(__half2float(a), __half2float(b))); }
static inline bool __heq(__half a, __half b) { return __half2float(a) == __half2float(b); }
static inline bool __hne(__half a, __half b) { return __half2float(a) != __half2float(b); }
static inline bool __hlt(__half a, __half b) { return __half2float(a) < __half2float(b); }
static inline bool __hle(__half a, __half b) { return __half2float(a) <= __half2float(b); }
static inline bool __hgt(__half a, __half b) { return __half2float(a) > __half2float(b); }
static inline bool __hge(__half a, __half b) { return __half2float(a) >= __half2float(b); }
static inline bool __hisnan(__half a) { return (a.__x & 0x7fffu) > 0x7c00u; }
static inline int __hisinf(__half a) { return (a.__x & 0x7fffu) == 0x7c00u ? ((a.__x & 0x8000u) ? -1 : 1) : 0; }
static inline __half hexp(__half a) { return __float2half(expf(__half2float(a))); }
static inline __half hlog(__half a) { return __float2half(logf(__half2float(a))); }
static inline __half hsqrt(__half a) { return __float2half(sqrtf(__half2float(a))); }
static inline __half hrsqrt(__half a) { return __float2half(1.0f / sqrtf(__half2float(a))); }
static inline __half hrcp(__half a) { return __float2half(1.0f / __half2float(a)); }

static inline __half operator+(__half a, __half b) { return __hadd(a, b); }
static inline __half operator-(__half a, __half b) { return __hsub(a, b); }
static inline __half operator*(__half a, __half b) { return __hmul(a, b); }
static inline __half operator/(__half a, __half b) { return __hdiv(a, b); }
static inline __half operator-(__half a) { return __hneg(a); }
static inline __half operator+(__half a) { return a; }
static inline __half &operator+=(__half &a, __half b) { return a = __hadd(a, b); }
static inline __half &operator-=(__half &a, __half b) { return a = __hsub(a, b); }
static inline __half &operator*=(__half &a, __half b) { return a = __hmul(a, b); }
static inline __half &operator/=(__half &a, __half b) { return a = __hdiv(a, b); }
static inline bool operator==(__half a, __half b) { return __heq(a, b); }
static inline bool operator!=(__half a, __half b) { return __hne(a, b); }
static inline bool operator<(__half a, __half b) { return __hlt(a, b); }
static inline bool operator<=(__half a, __half b) { return __hle(a, b); }
static inline bool operator>(__half a, __half b) { return __hgt(a, b); }
static inline bool operator>=(__half a, __half b) { return __hge(a, b); }

static inline __half2 make_half2(__half x, __half y) { __half2 r; r.x = x; r.y = y; return r; }
static inline __half2 __halves2half2(__half lo, __half hi) { return make_half2(lo, hi); }
static inline __half2 __floats2half2_rn(float a, float b) { return make_half2(__float2half(a), __float2half(b)); }
static inline __half2 __float2half2_rn(float a) { return make_half2(__float2half(a), __float2half(a)); }
static inline __half2 __float22half2_rn(float2 f) { return make_half2(__float2half(f.x), __float2half(f.y)); }
static inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
static inline __half __low2half(__half2 h) { return h.x; }
static inline __half __high2half(__half2 h) { return h.y; }
static inline float __low2float(__half2 h) { return __half2float(h.x); }
static inline float __high2float(__half2 h) { return __half2float(h.y); }
static inline __half2 __hadd2(__half2 a, __half2 b) { return make_half2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }
static inline __half2 __hsub2(__half2 a, __half2 b) { return make_half2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }
static inline __half2 __hmul2(__half2 a, __half2 b) { return make_half2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }
static inline __half2 __h2div(__half2 a, __half2 b) { return make_half2(__hdiv(a.x, b.x), __hdiv(a.y, b.y)); }
static inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return make_half2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
static inline __half2 __hneg2(__half2 a) { return make_half2(__hneg(a.x), __hneg(a.y)); }
static inline __half2 operator+(__half2 a, __half2 b) { return __hadd2(a, b); }
static inline __half2 operator-(__half2 a, __half2 b) { return __hsub2(a, b); }
static inline __half2 operator*(__half2 a, __half2 b) { return __hmul2(a, b); }

static inline __half atomicAdd(__half *a, __half v) {
    unsigned short *p = reinterpret_cast<unsigned short *>(a);
    unsigned short old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, __hadd(__ushort_as_half(old), v).__x, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return __ushort_as_half(old);
}
static inline __half2 atomicAdd(__half2 *a, __half2 v) {
    return pea_emu::atomic_update<__half2, uint32_t>(a, [v](__half2 o) { return __hadd2(o, v); });
}

/* ---------------------------------------------------------------------------------------------------- */
/* __nv_bfloat16                                                                                         */

struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(pea_emu::f32_to_bf16_bits(f, pea_emu::RN)) {}
    __nv_bfloat16(double d) : __x(pea_emu::f32_to_bf16_bits((float)d, pea_emu::RN)) {}
    __nv_bfloat16(int i) : __x(pea_emu::f32_to_bf16_bits((float)i, pea_emu::RN)) {}
    __nv_bfloat16(unsigned int i) : __x(pea_emu::f32_to_bf16_bits((float)i, pea_emu::RN)) {}
    __nv_bfloat16(long long i) : __x(pea_emu::f32_to_bf16_bits((float)i, pea_emu::RN)) {}
    __nv_bfloat16(unsigned long long i) : __x(pea_emu::f32_to_bf16_bits((float)i, pea_emu::RN)) {}
    operator float() const { return pea_emu::bf16_bits_to_f32(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
    __nv_bfloat16 &operator=(__nv_bfloat16_raw r) { __x = r.x; return *this; }
};
typedef __nv_bfloat16 nv_bfloat16;

struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat162 nv_bfloat162;

static inline __nv_bfloat16 pea_emu_mkbf16(unsigned short b) { __nv_bfloat16 h; h.__x = b; return h; }

static inline __nv_bfloat16 __float2bfloat16(float f) { return pea_emu_mkbf16(pea_emu::f32_to_bf16_bits(f, pea_emu::RN)); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return pea_emu_mkbf16(pea_emu::f32_to_bf16_bits(f, pea_emu::RN)); }
static inline __nv_bfloat16 __float2bfloat16_rz(float f) { return pea_emu_mkbf16(pea_emu::f32_to_bf16_bits(f, pea_emu::RZ)); }
static inline __nv_bfloat16 __float2bfloat16_rd(float f) { return pea_emu_mkbf16(pea_emu::f32_to_bf16_bits(f, pea_emu::RD)); }
static inline __nv_bfloat16 __float2bfloat16_ru(float f) { return pea_emu_mkbf16(pea_emu::f32_to_bf16_bits(f, pea_emu::RU)); }
static inline float __bfloat162float(__nv_bfloat16 h) { return pea_emu::bf16_bits_to_f32(h.__x); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return pea_emu_mkbf16(b); }
static inline __nv_bfloat16 __short_as_bfloat16(short b) { return pea_emu_mkbf16((unsigned short)b); }

static inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(__bfloat162float(a) + __bfloat162float(b)); }
static inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(__bfloat162float(a) - __bfloat162float(b)); }
static inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(__bfloat162float(a) * __bfloat162float(b)); }
static inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(__bfloat162float(a) / __bfloat162float(b)); }
static inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __float2bfloat16((float)fma((double)__bfloat162float(a), (double)__bfloat162float(b), (double)__bfloat162float(c)));
}
static inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return pea_emu_mkbf16(a.__x ^ 0x8000u); }
static inline __nv_bfloat16 __habs(__nv_bfloat16 a) { return pea_emu_mkbf16(a.__x & 0x7fffu); }
static inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(fmaxf(__bfloat162float(a), __bfloat162float(b))); }
static inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(fminf(__bfloat162float(a), __bfloat162float(b))); }
static inline bool __heq(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) == __bfloat162float(b); }
static inline bool __hne(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) != __bfloat162float(b); }
static inline bool __hlt(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) < __bfloat162float(b); }
static inline bool __hle(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) <= __bfloat162float(b); }
static inline bool __hgt(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) > __bfloat162float(b); }
static inline bool __hge(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) >= __bfloat162float(b); }
static inline bool __hisnan(__nv_bfloat16 a) { return (a.__x & 0x7fffu) > 0x7f80u; }
static inline __nv_bfloat16 hexp(__nv_bfloat16 a) { return __float2bfloat16(expf(__bfloat162float(a))); }
static inline __nv_bfloat16 hsqrt(__nv_bfloat16 a) { return __float2bfloat16(sqrtf(__bfloat162float(a))); }
static inline __nv_bfloat16 hrsqrt(__nv_bfloat16 a) { return __float2bfloat16(1.0f / sqrtf(__bfloat162float(a))); }

static inline __nv_bfloat16 operator+(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }
static inline __nv_bfloat16 operator-(__nv_bfloat16 a, __nv_bfloat16 b) { return __hsub(a, b); }
static inline __nv_bfloat16 operator*(__nv_bfloat16 a, __nv_bfloat16 b) { return __hmul(a, b); }
static inline __nv_bfloat16 operator/(__nv_bfloat16 a, __nv_bfloat16 b) { return __hdiv(a, b); }
static inline __nv_bfloat16 operator-(__nv_bfloat16 a) { return __hneg(a); }
static inline __nv_bfloat16 operator+(__nv_bfloat16 a) { return a; }
static inline __nv_bfloat16 &operator+=(__nv_bfloat16 &a, __nv_bfloat16 b) { return a = __hadd(a, b); }
static inline __nv_bfloat16 &operator-=(__nv_bfloat16 &a, __nv_bfloat16 b) { return a = __hsub(a, b); }
static inline __nv_bfloat16 &operator*=(__nv_bfloat16 &a, __nv_bfloat16 b) { return a = __hmul(a, b); }
static inline __nv_bfloat16 &operator/=(__nv_bfloat16 &a, __nv_bfloat16 b) { return a = __hdiv(a, b); }
static inline bool operator==(__nv_bfloat16 a, __nv_bfloat16 b) { return __heq(a, b); }
static inline bool operator!=(__nv_bfloat16 a, __nv_bfloat16 b) { return __hne(a, b); }
static inline bool operator<(__nv_bfloat16 a, __nv_bfloat16 b) { return __hlt(a, b); }
static inline bool operator<=(__nv_bfloat16 a, __nv_bfloat16 b) { return __hle(a, b); }
static inline bool operator>(__nv_bfloat16 a, __nv_bfloat16 b) { return __hgt(a, b); }
static inline bool operator>=(__nv_bfloat16 a, __nv_bfloat16 b) { return __hge(a, b); }

static inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) { __nv_bfloat162 r; r.x = x; r.y = y; return r; }
static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return make_bfloat162(lo, hi); }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return make_bfloat162(__float2bfloat16(a), __float2bfloat16(b)); }
static inline __nv_bfloat162 __float2bfloat162_rn(float a) { return make_bfloat162(__float2bfloat16(a), __float2bfloat16(a)); }
static inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return make_bfloat162(__float2bfloat16(f.x), __float2bfloat16(f.y)); }
static inline float2 __bfloat1622float2(__nv_bfloat162 h) { return make_float2(__bfloat162float(h.x), __bfloat162float(h.y)); }
static inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
static inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
static inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
static inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
static inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return make_bfloat162(__hadd(a.x, b.x), __hadd(a.y, b.y)); }
static inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) { return make_bfloat162(__hsub(a.x, b.x), __hsub(a.y, b.y)); }
static inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return make_bfloat162(__hmul(a.x, b.x), __hmul(a.y, b.y)); }
static inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
    return make_bfloat162(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
static inline __nv_bfloat162 operator+(__nv_bfloat162 a, __nv_bfloat162 b) { return __hadd2(a, b); }
static inline __nv_bfloat162 operator-(__nv_bfloat162 a, __nv_bfloat162 b) { return __hsub2(a, b); }
static inline __nv_bfloat162 operator*(__nv_bfloat162 a, __nv_bfloat162 b) { return __hmul2(a, b); }

static inline __nv_bfloat16 atomicAdd(__nv_bfloat16 *a, __nv_bfloat16 v) {
    unsigned short *p = reinterpret_cast<unsigned short *>(a);
    unsigned short old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, __hadd(__ushort_as_bfloat16(old), v).__x, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return __ushort_as_bfloat16(old);
}
static inline __nv_bfloat162 atomicAdd(__nv_bfloat162 *a, __nv_bfloat162 v) {
    return pea_emu::atomic_update<__nv_bfloat162, uint32_t>(a, [v](__nv_bfloat162 o) { return __hadd2(o, v); });
}

#endif /* PEA_EMU_HALF_H */
