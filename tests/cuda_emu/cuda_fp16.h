// CPU emulation of __half (tests only): IEEE binary16 through GCC's _Float16.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return float(f);
}
inline __half __float2half(float v) {
  const _Float16 f = _Float16(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
