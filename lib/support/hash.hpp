// Internal: splitmix64's finaliser, a bijective 64-bit mixer, for the hashes that fold integers
// (a schedule's fingerprint, the check's layout word).
#pragma once

#include <cstdint>

namespace hma::detail {

inline std::uint64_t splitmix_finish(std::uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace hma::detail
