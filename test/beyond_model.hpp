// A parameter set for test_beyond.cpp with random-looking values (full mantissas, both signs,
// magnitudes over several binades) and a long-double reference for weighted means.
#pragma once

#include <mpi.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "average_model.hpp"
#include "hma/hma.hpp"
#include "mpi_test.hpp"

namespace hma_test {

/// Element k of rank r for `salt`: a pure function, so every rank can compute every rank's input.
inline double noise(int r, int salt, std::size_t k) {
  std::uint64_t z = (static_cast<std::uint64_t>(r) << 40) ^ (static_cast<std::uint64_t>(salt) << 20) ^ k;
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  const double u = static_cast<double>(z >> 11) * 0x1p-53;  // [0, 1)
  const double mag = std::ldexp(0.5 + u, static_cast<int>(z % 7) - 3);
  return (z & 1) ? -mag : mag;
}

/// The bits of every element of `s` (any set with each()), in order.
template <class S>
std::vector<std::uint64_t> bits_of(S& s) {
  std::vector<std::uint64_t> out;
  s.each([&](std::size_t, auto& x) {
    if constexpr (sizeof(x) == 4) out.push_back(std::bit_cast<std::uint32_t>(x));
    else out.push_back(std::bit_cast<std::uint64_t>(x));
  });
  return out;
}

/// Collective: true when every rank of `comm` holds the same bits in `s` as its rank 0.
template <class S>
bool same_bits_everywhere(S& s, MPI_Comm comm) {
  auto mine = bits_of(s), root = mine;
  MPI_Bcast(root.data(), static_cast<int>(root.size()), MPI_UINT64_T, 0, comm);
  return mine == root;
}

/// One zero-copy float array, one packed float array, one packed double array.
struct Set {
  std::vector<float> uf;
  std::vector<double> ud;
  hma::ParamSet ps;
  hma::Array<float> wf;
  explicit Set(std::size_t scale) : uf(61 * scale), ud(133 * scale) {
    wf = ps.allocate<float>(257 * scale);
    ps.add(uf);
    ps.add(ud);
  }
  std::size_t count() const { return wf.size() + uf.size() + ud.size(); }
  /// Calls f(element k as a double, is_float, reference to set it) for every element in order.
  template <class F>
  void each(F&& f) {
    std::size_t k = 0;
    for (float& x : wf) f(k++, x);
    for (float& x : uf) f(k++, x);
    for (double& x : ud) f(k++, x);
  }
  void fill(int r, int salt) {
    each([&](std::size_t k, auto& x) { x = static_cast<std::remove_reference_t<decltype(x)>>(noise(r, salt, k)); });
  }
  std::vector<std::uint64_t> bits() { return bits_of(*this); }
  /// Collective: true when every rank of `comm` holds the same bits as its rank 0.
  bool same_bits_everywhere(MPI_Comm comm) { return hma_test::same_bits_everywhere(*this, comm); }
  /// Requires (on every rank) each element within `terms` * u * sum|w_r x_r| / W of the exact
  /// sum_r w_r x_r / W (long double), x_r = (T)noise(r, salt, k), u the element type's unit
  /// roundoff. Ranks with weight 0 take no part.
  void require_weighted_mean(const std::vector<double>& w, int salt, int terms) {
    long double W = 0;
    for (double v : w) W += v;
    bool ok = true;
    std::string first;
    each([&](std::size_t k, auto& x) {
      using T = std::remove_reference_t<decltype(x)>;
      long double sum = 0, mag = 0;
      for (std::size_t r = 0; r < w.size(); ++r) {
        if (w[r] == 0) continue;
        const long double t = static_cast<long double>(w[r]) * static_cast<T>(noise(static_cast<int>(r), salt, k));
        sum += t;
        mag += std::fabs(t);
      }
      const long double exact = sum / W, bound = terms * (std::numeric_limits<T>::epsilon() / 2) * mag / W;
      if (std::fabs(static_cast<long double>(x) - exact) > bound && ok) {
        ok = false;
        first = "element " + std::to_string(k) + ": got " + std::to_string(static_cast<double>(x)) +
                ", exact " + std::to_string(static_cast<double>(exact)) + ", bound " +
                std::to_string(static_cast<double>(bound));
      }
    });
    INFO(first);
    REQUIRE_ALL_RANKS(ok);
  }
};

}  // namespace hma_test
