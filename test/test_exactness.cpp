// What hma promises about rounding, checked on random values that are NOT exactly representable
// (different on every rank) against a reference computed independently: MPI_Allgather of the
// inputs, then torch's terms x_r / g (divided first, in the dtype) summed in long double.
//   1. Every mode: each element is EXACTLY torch's terms fl(x_r / g) (divided first, in the
//      dtype: doubles are never rounded through float) added up in SOME order, i.e. the value of
//      some binary tree of additions over them (checked by enumerating every tree's value, on
//      a sample of elements: the ends and every 4th or 16th), so
//      within (g - 1) * u * sum_r |x_r / g| of their exact sum (u = 2^-24 f32, 2^-53 f64, also
//      checked); and the same bits on every rank of the group.
//   2. HMA_REDUCTION=mpi with HMA_CHUNK_BYTES=0, flat (one divide, then one MPI_Allreduce per
//      dtype): bit for bit what torch's recipe gives with the same MPI, i.e. the test's own
//      divide + MPI_Allreduce on a copy.
//   3. A group of 2: every mode gives exactly fl(x_0/2 + x_1/2) (two terms have one order).
//   4. Device sets with DeviceDivision::reciprocal: the same with torch-on-CUDA's terms
//      x_r * fl(1/g) (which differ from x_r / g in about a third of the elements at g = 3, 6):
//      each division rule passes only against its own terms.
// Run at np 2, 3, 4, 5, 6 (test/meson.build).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "device/device_backend.hpp"
#include "hma/hma.hpp"
#include "mpi_test.hpp"

using hma_test::rank;
using hma_test::size;
using hma_test::thread_multiple;

namespace {

constexpr std::size_t kF = 40009, kD = 20011;  // odd sizes: uneven blocks and chunks

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
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::fabs(static_cast<long double>(got[i]) - sum[i]) > bound[i]) {
      why = "element " + std::to_string(i) + ": " + std::to_string(static_cast<double>(got[i])) +
            " vs exact " + std::to_string(static_cast<double>(sum[i])) + ", bound " +
            std::to_string(static_cast<double>(bound[i]));
      return false;
    }
    // The orders on a sample (every tree is enumerated: 945 at g = 6): the first and last 64
    // elements and every 16th (every 4th up to g = 3); the bound above holds on every element.
    if (i % (g <= 3 ? 4 : 16) != 0 && i >= 64 && i + 64 < got.size()) continue;
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

struct Mode {
  const char* name;
  hma::AveragerOptions options;
  bool start = false;         // start()/wait() instead of blocking
  bool scattered = false;     // packed user arrays instead of zero-copy ones
  bool device = false;        // emulated device set
  int node = 0;               // emulated ranks per node for two-level (0: flat)
  bool bitwise_mpi = false;   // promise 2
  bool reciprocal = false;    // device division x * fl(1/g) (torch on CUDA) instead of x / g
};

std::vector<Mode> modes() {
  std::vector<Mode> m;
  auto opt = [](hma::Reduction r, std::size_t chunk) {
    hma::AveragerOptions o;
    o.reduction = r;
    o.chunk_bytes = chunk;
    return o;
  };
  m.push_back({"mpi, one piece (torch's recipe)", opt(hma::Reduction::mpi, 0), false, false, false, 0, true});
  m.push_back({"mpi, one piece, packed arrays", opt(hma::Reduction::mpi, 0), false, true, false, 0, true});
  m.push_back({"mpi, 4 KiB pieces", opt(hma::Reduction::mpi, 4096)});
  m.push_back({"ring", opt(hma::Reduction::ring, 0)});
  m.push_back({"ring, 8 KiB pieces, packed arrays", opt(hma::Reduction::ring, 8192), false, true});
  m.push_back({"auto (default)", hma::AveragerOptions{}});
  m.push_back({"start/wait (MPI_Iallreduce)", hma::AveragerOptions{}, true});
  m.push_back({"start/wait, packed arrays", hma::AveragerOptions{}, true, true});
  if (thread_multiple()) {
    hma::AveragerOptions t;
    t.progress = hma::Progress::thread;
    m.push_back({"progress thread, start/wait", t, true});
  }
  hma::AveragerOptions staged;
  staged.staging_chunk_bytes = 4096;
  m.push_back({"device (emulated), staged 4 KiB chunks", staged, false, false, true});
  m.push_back({"device (emulated), staged, start/wait", staged, true, false, true});
  hma::AveragerOptions recip = staged;
  recip.device_division = hma::DeviceDivision::reciprocal;
  m.push_back({"device (emulated), reciprocal division (torch on CUDA)", recip, false, false, true, 0, false, true});
  m.push_back({"device (emulated), reciprocal division, start/wait", recip, true, false, true, 0, false, true});
  for (int node : {2, 3}) {
    if (size() % node != 0 || size() / node < 2) continue;
    hma::AveragerOptions two;
    two.algorithm = hma::Algorithm::two_level;
    two.hierarchy.ranks_per_node = node;
    m.push_back({node == 2 ? "two-level, nodes of 2" : "two-level, nodes of 3", two, false, false, false, node});
    m.push_back({node == 2 ? "two-level start/wait, nodes of 2" : "two-level start/wait, nodes of 3", two, true,
                 false, false, node});
  }
  return m;
}

}  // namespace

TEST_CASE("random values: every mode within its bound of torch's terms, the same on every rank; "
          "torch's recipe bit for bit") {
  const int g = size();
  for (const Mode& mode : modes()) {
    CAPTURE(mode.name, g);
    const std::vector<float> f0 = random_values<float>(kF, 1);
    const std::vector<double> d0 = random_values<double>(kD, 2);
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, mode.options);
    std::vector<float> f = f0;
    std::vector<double> d = d0;
    if (mode.device) {
      hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend());
      hma::DeviceParamSet ps;
      hma::detail::set_device_backend_for_testing(nullptr);
      ps.add(f.data(), f.size());
      ps.add(d.data(), d.size());
      if (mode.start) avg.start_average(ps, 0).wait();
      else avg.average(ps, 0);
      ps.synchronize();
    } else {
      hma::ParamSet ps;
      hma::Array<float> wf;
      hma::Array<double> wd;
      if (mode.scattered) {
        ps.add(f);
        ps.add(d);
      } else {
        wf = ps.allocate<float>(kF);
        wd = ps.allocate<double>(kD);
        std::copy(f0.begin(), f0.end(), wf.begin());
        std::copy(d0.begin(), d0.end(), wd.begin());
      }
      if (mode.start) avg.start_average(ps, 0).wait();
      else avg.average(ps, 0);
      if (!mode.scattered) {
        std::copy(wf.begin(), wf.end(), f.begin());
        std::copy(wd.begin(), wd.end(), d.begin());
      }
    }
    std::vector<long double> sf, bf, sd, bd;
    std::vector<float> tf_terms;
    std::vector<double> td_terms;
    reference(f0, g, sf, bf, tf_terms, mode.reciprocal);
    reference(d0, g, sd, bd, td_terms, mode.reciprocal);
    std::string why_f, why_d;
    const bool ok_f = some_order_and_same_everywhere(f, sf, bf, tf_terms, g, why_f);
    const bool ok_d = some_order_and_same_everywhere(d, sd, bd, td_terms, g, why_d);
    INFO("f32: " << why_f << "; f64: " << why_d);
    REQUIRE_ALL_RANKS(ok_f && ok_d);
    // Promise 3: two terms have one order.
    if (g == 2) {
      bool exact = true;
      for (std::size_t i = 0; i < kF; ++i) exact = exact && f[i] == static_cast<float>(sf[i]);
      for (std::size_t i = 0; i < kD; ++i) exact = exact && d[i] == static_cast<double>(sd[i]);
      REQUIRE_ALL_RANKS(exact);
    }
    // Promise 2: torch's recipe, done here by hand with the same MPI.
    if (mode.bitwise_mpi) {
      std::vector<float> tf(f0);
      std::vector<double> td(d0);
      for (auto& x : tf) x /= static_cast<float>(g);
      for (auto& x : td) x /= static_cast<double>(g);
      MPI_Allreduce(MPI_IN_PLACE, tf.data(), static_cast<int>(kF), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      MPI_Allreduce(MPI_IN_PLACE, td.data(), static_cast<int>(kD), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
      REQUIRE_ALL_RANKS(std::memcmp(tf.data(), f.data(), kF * sizeof(float)) == 0 &&
                        std::memcmp(td.data(), d.data(), kD * sizeof(double)) == 0);
    }
  }
}
