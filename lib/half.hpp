// Internal, core: the 16-bit formats' conversions (bf16, fp16), shared by the sets' element types
// (hma/buffer.hpp) and the 16-bit wires (transport/wire.hpp).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace hma::detail {

/// Round to nearest even; NaN stays NaN, overflow gives infinity (fp16: |x| >= 65520).
std::uint16_t to_bf16(float x);
std::uint16_t to_fp16(float x);
float from_bf16(std::uint16_t h);
float from_fp16(std::uint16_t h);

/// `x` rounded to float to odd (truncated, the last bit set when inexact): rounding that float to
/// bf16 or fp16 (both at least 2 bits shorter) then rounds `x` itself correctly, with no double
/// rounding.
inline float round_to_odd(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) == x || x != x) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(f) | 1u);
}
/// An element as the float a 16-bit format is rounded from.
inline float to_float_for_16(float x) { return x; }
inline float to_float_for_16(double x) { return round_to_odd(x); }

}  // namespace hma::detail
