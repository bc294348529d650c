// __half for the host emulation: IEEE binary16 storage, conversions rounded to nearest even as the
// hardware does (NaN becomes CUDA's canonical 0x7fff).
#pragma once

#include <stdint.h>
#include <string.h>

#include "vector_types.h"

namespace freedit_emu {

inline unsigned short float_to_half_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u, mag = u & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return 0x7FFFu;                          // NaN
  if (mag >= 0x47800000u) return static_cast<unsigned short>(sign | 0x7C00u);  // >= 2^16: infinity
  if (mag >= 0x38800000u) {                                       // normal half (>= 2^-14)
    uint32_t h = ((((mag >> 23) - 112u) << 10) | ((mag & 0x7FFFFFu) >> 13));
    const uint32_t rest = mag & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;      // a carry may reach infinity: right
    return static_cast<unsigned short>(sign | h);
  }
  if (mag <= 0x33000000u) return static_cast<unsigned short>(sign);  // <= 2^-25 rounds to (signed) zero
  const uint32_t mant = (mag & 0x7FFFFFu) | 0x800000u, shift = 126u - (mag >> 23);  // subnormal half
  uint32_t h = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (h & 1u))) ++h;
  return static_cast<unsigned short>(sign | h);
}

inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, u;
  if (exponent == 0x1Fu) {
    u = sign | 0x7F800000u | (mant << 13);
  } else if (exponent == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exponent = 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exponent;
      }
      u = sign | ((exponent + 112u) << 23) | ((mant & 0x3FFu) << 13);
    }
  } else {
    u = sign | ((exponent + 112u) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace freedit_emu

struct __half_raw {
  unsigned short x;
};

struct __half {
  unsigned short __x;
  __half() = default;
  __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(freedit_emu::float_to_half_bits(f)) {}
  __half(double d) : __x(freedit_emu::float_to_half_bits(static_cast<float>(d))) {}
  operator float() const { return freedit_emu::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __half2 {
  __half x, y;
};

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return freedit_emu::half_bits_to_float(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) { return __half(__half_raw{bits}); }
inline __half2 __float2half2_rn(float f) { return __half2{__half(f), __half(f)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
