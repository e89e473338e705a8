// The values of the device tests (test_device.cpp on the emulation backend, test/gpu/ on a GPU,
// whose fill kernel computes the same formula): multiples of 24 in [-192, 192], so x / g is exact
// for g in {1, 2, 3, 4, 6, 8} and every partial sum of up to 8 of them is exact in float:
// averages are exact whatever order MPI sums in.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hma_test {

/// Element i on rank r at step t.
inline double value(int r, std::int64_t t, std::size_t i) {
  return 24.0 * static_cast<double>((r * 7 + static_cast<std::int64_t>(i) * 3 + t * 5) % 17 - 8);
}

/// The exact average of element i at step t over the contiguous block of g ranks holding r.
inline double block_mean(int r, int g, std::int64_t t, std::size_t i) {
  const int first = r / g * g;
  double sum = 0;
  for (int m = first; m < first + g; ++m) sum += value(m, t, i);
  return sum / g;
}

}  // namespace hma_test
