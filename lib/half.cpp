#include "half.hpp"

#include <bit>
#include <cmath>

namespace hma::detail {

std::uint16_t to_bf16(float x) {
  std::uint32_t b = std::bit_cast<std::uint32_t>(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((b >> 16) | 0x40u);  // quiet NaN
  b += 0x7fffu + ((b >> 16) & 1u);  // round to nearest even; a carry may give infinity, rightly
  return static_cast<std::uint16_t>(b >> 16);
}

float from_bf16(std::uint16_t h) { return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }

std::uint16_t to_fp16(float x) {
  const std::uint32_t b = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: infinity
  if (a < 0x38800000u) {
    // Below 2^-14: a multiple of 2^-24 (subnormal), rounded to nearest even by the FPU.
    const float m = std::nearbyint(std::bit_cast<float>(a) * 0x1p24f);
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(m));  // 1024: the smallest normal
  }
  std::uint32_t r = a - (112u << 23);  // exponent bias 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);      // round the 23-bit mantissa to 10 bits, nearest even
  return static_cast<std::uint16_t>(sign | (r >> 13));
}

float from_fp16(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 0x1p-24f;
    return sign ? -v : v;
  }
  if (e == 31) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

}  // namespace hma::detail
