// The differential test's independent reference (test/test_exactness.cpp): random values that
// are not exactly representable, torch's terms from an MPI_Allgather of every rank's inputs,
// their exact sum and error bound, every order of adding them, and the checks against a result.
// Nothing here calls hma.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "mpi_test.hpp"

namespace hma_test {

template <class T>
std::vector<T> random_values(std::size_t n, int salt) {
  std::mt19937_64 gen(0x5eed + 7919 * static_cast<std::uint64_t>(rank()) + static_cast<std::uint64_t>(salt));
  std::uniform_real_distribution<double> dist(-3.0, 3.0);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(gen) * std::exp2(static_cast<int>(gen() % 9) - 4));
  return v;
}

template <class T>
MPI_Datatype type_of() {
  return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}

// Every value that adding up the g `terms` in some order (any binary tree of additions, in T)
// can give: V(S) over subsets S, splitting S into A (holding S's lowest term) and B. Sorted.
// Reuses its storage (no allocation per element: the sanitizer run counts).
template <class T>
const std::vector<T>& every_order(const T* terms, int g) {
  static thread_local std::vector<std::vector<T>> v;
  const int full = (1 << g) - 1;
  v.resize(static_cast<std::size_t>(full) + 1);
  for (int s = 1; s <= full; ++s) {
    auto& out = v[static_cast<std::size_t>(s)];
    out.clear();
    const int low = s & -s;
    if (s == low) {
      out.push_back(terms[__builtin_ctz(static_cast<unsigned>(s))]);
      continue;
    }
    for (int a = (s - 1) & s; a > 0; a = (a - 1) & s) {
      if ((a & low) == 0) continue;
      for (T x : v[static_cast<std::size_t>(a)])
        for (T y : v[static_cast<std::size_t>(s ^ a)]) out.push_back(x + y);
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
  }
  return v[static_cast<std::size_t>(full)];
}

// The independent reference for the group [first, first + g) holding this rank: torch's terms
// fl(x_r / g) per element (from an MPI_Allgather of the inputs), their exact sum (long double)
// and the bound (g - 1) u sum |terms|.
template <class T>
void reference(const std::vector<T>& mine, int g, std::vector<long double>& sum, std::vector<long double>& bound,
               std::vector<T>& terms, bool reciprocal) {
  const std::size_t n = mine.size();
  std::vector<T> all(n * static_cast<std::size_t>(size()));
  MPI_Allgather(mine.data(), static_cast<int>(n), type_of<T>(), all.data(), static_cast<int>(n), type_of<T>(),
                MPI_COMM_WORLD);
  const int first = rank() / g * g;
  const long double u = std::is_same_v<T, float> ? std::ldexp(1.0L, -24) : std::ldexp(1.0L, -53);
  sum.assign(n, 0.0L);
  bound.assign(n, 0.0L);
  terms.assign(n * static_cast<std::size_t>(g), T(0));  // element i's terms at [i * g, i * g + g)
  for (std::size_t i = 0; i < n; ++i) {
    long double abs = 0;
    for (int r = first; r < first + g; ++r) {
      // torch divides first: x / g on the CPU, x * fl(1/g) for CUDA tensors
      const T x = all[static_cast<std::size_t>(r) * n + i];
      const T term = reciprocal ? x * (T(1) / static_cast<T>(g)) : x / static_cast<T>(g);
      terms[i * static_cast<std::size_t>(g) + static_cast<std::size_t>(r - first)] = term;
      sum[i] += term;
      abs += std::fabs(static_cast<long double>(term));
    }
    bound[i] = (g - 1) * u * abs * 1.0001L + std::numeric_limits<long double>::min();
  }
}

// Promise 1: within the bound, and the same bits on every rank of the group (`why` says where not).
template <class T>
bool some_order_and_same_everywhere(const std::vector<T>& got, const std::vector<long double>& sum,
                                    const std::vector<long double>& bound,
                                    const std::vector<T>& terms, int g, std::string& why) {
  std::size_t sampled = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::fabs(static_cast<long double>(got[i]) - sum[i]) > bound[i]) {
      why = "element " + std::to_string(i) + ": " + std::to_string(static_cast<double>(got[i])) +
            " vs exact " + std::to_string(static_cast<double>(sum[i])) + ", bound " +
            std::to_string(static_cast<double>(bound[i]));
      return false;
    }
    // The orders on a sample (every tree is enumerated: 945 at g = 6, 135135 at g = 8): the
    // first and last `ends` elements and every `every`th; the bound above holds on every element.
    // The group's ranks share the sample out (the same bits on each are checked below), so the
    // sample costs one rank's share whatever g is.
    const std::size_t every = g <= 3 ? 4 : g <= 6 ? 16 : 256, ends = g <= 6 ? 64 : 16;
    if (i % every != 0 && i >= ends && i + ends < got.size()) continue;
    if (sampled++ % static_cast<std::size_t>(g) != static_cast<std::size_t>(rank() % g)) continue;
    const std::vector<T>& ok = every_order(terms.data() + i * static_cast<std::size_t>(g), g);
    if (!std::binary_search(ok.begin(), ok.end(), got[i])) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "element %zu: %.17g is no order's sum of torch's terms (%zu possible)", i,
                    static_cast<double>(got[i]), ok.size());
      why = buf;
      return false;
    }
  }
  // Same bits on every rank of the group: gather the results and compare with the group's first.
  const std::size_t n = got.size();
  std::vector<T> all(n * static_cast<std::size_t>(size()));
  MPI_Allgather(got.data(), static_cast<int>(n), type_of<T>(), all.data(), static_cast<int>(n), type_of<T>(),
                MPI_COMM_WORLD);
  const int first = rank() / g * g;
  if (std::memcmp(all.data() + static_cast<std::size_t>(first) * n, got.data(), n * sizeof(T)) != 0) {
    why = "this rank's bits differ from those of world rank " + std::to_string(first);
    return false;
  }
  return true;
}


}  // namespace hma_test
