// Beyond torch's averagers: weighted averaging, the outer optimizer, the divergence metric,
// reduced-precision wires, post-local SGD through an averager. Values are random-looking (full
// mantissas, mixed signs and magnitudes), so rounding and order mistakes show. Expected values
// come from an independent reference computed here in long double from every rank's inputs
// (a pure function of the rank); bounds are stated per test. meson runs this file at several
// rank counts and with the reduction, two-level algorithm and progress thread chosen by the
// environment, as a user would.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <cstdlib>
#include <string>
#include <vector>

#include "beyond_model.hpp"
#include "hma/hma.hpp"
#include "mpi_test.hpp"
#include "device/device_backend.hpp"
#include "device/emulation.hpp"
#include "transport/uses.hpp"
#include "half.hpp"

using hma_test::rank;
using hma_test::size;
using hma_test::Set;
using hma_test::first_failing_rank;

namespace {

std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

// Device sets on hma's host emulation backend (device memory is host memory) for one test.
struct EmulatedDevices {
  EmulatedDevices() { hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend()); }
  ~EmulatedDevices() { hma::detail::set_device_backend_for_testing(nullptr); }
  EmulatedDevices(const EmulatedDevices&) = delete;
  EmulatedDevices& operator=(const EmulatedDevices&) = delete;
};

hma::AveragerOptions small_chunks() {
  hma::AveragerOptions o;
  o.chunk_bytes = 256;  // pieces that end inside arrays
  return o;
}

}  // namespace

TEST_CASE("weighted averaging: sum(w x) / sum(w) within the stated bound, same bits everywhere") {
  const int g = size();
  // Rank r weighs r + 1, rank 1 weighs 0 (contributes nothing), fractional weights elsewhere.
  auto weight = [](int r) { return r == 1 ? 0.0 : 0.75 * r + 1.0; };
  for (bool blocking : {true, false})
    for (auto opts : {hma::AveragerOptions{}, small_chunks()}) {
      CAPTURE(blocking, opts.chunk_bytes.value_or(0));
      hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, opts);
      avg.set_weight(weight(rank()));
      REQUIRE(avg.weight() == weight(rank()));
      Set s(1);
      s.fill(rank(), 3);
      if (blocking) {
        REQUIRE(avg.step(s.ps));
      } else {
        auto req = avg.start(s.ps);
        req.wait();
      }
      std::vector<double> w(static_cast<std::size_t>(g));
      for (int r = 0; r < g; ++r) w[static_cast<std::size_t>(r)] = weight(r);
      // Each term w_i x_i / W is rounded once to the element type (u), then g terms are added
      // by MPI in some order (g - 1 roundings): |error| <= (g + 1) u sum |w_i x_i| / W.
      s.require_weighted_mean(w, 3, g + 1);
      REQUIRE_ALL_RANKS(s.same_bits_everywhere(MPI_COMM_WORLD));
    }
}

TEST_CASE("weighted averaging with equal weights is the plain average, bit for bit") {
  for (double w : {1.0, 3.0, 0.125}) {
    hma::PeriodicAverager plain(MPI_COMM_WORLD, 1, 0);
    hma::PeriodicAverager weighted(MPI_COMM_WORLD, 1, 0);
    weighted.set_weight(w);
    Set a(1), b(1);
    a.fill(rank(), 5);
    b.fill(rank(), 5);
    REQUIRE(plain.step(a.ps));
    REQUIRE(weighted.step(b.ps));
    REQUIRE_ALL_RANKS(a.bits() == b.bits());
  }
}

TEST_CASE("weighted averaging on every level of a hierarchy uses each group's own weights") {
  const auto sizes = hma_test::group_sizes();
  std::vector<hma::Level> levels;
  std::int64_t period = 1;
  for (int g : sizes) {
    levels.push_back({period, g});
    period *= 2;
  }
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, levels, 0);
  avg.set_weight(1.0 + (rank() * 5 % 7));
  for (std::size_t l = 0; l < levels.size(); ++l) {
    Set s(2);
    s.fill(rank(), 11 + static_cast<int>(l));
    avg.average(s.ps, l);
    const int g = levels[l].group_size, first = rank() / g * g;
    std::vector<double> w(static_cast<std::size_t>(size()), 0.0);
    for (int r = first; r < first + g; ++r) w[static_cast<std::size_t>(r)] = 1.0 + (r * 5 % 7);
    CAPTURE(l, g);
    s.require_weighted_mean(w, 11 + static_cast<int>(l), g + 1);
    MPI_Comm group;
    MPI_Comm_split(MPI_COMM_WORLD, rank() / g, rank(), &group);
    REQUIRE_ALL_RANKS(s.same_bits_everywhere(group));
    MPI_Comm_free(&group);
  }
}

TEST_CASE("weights near the 2^31 limit: their sum needs more than 64 bits and stays exact", "[np>=2]") {
  // Each weight is about 2^63 quanta of 2^-32: three ranks already sum past 2^64.
  auto weight = [](int r) { return 2147483647.0 - 1000.0 * r; };
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  avg.set_weight(weight(rank()));
  Set s(1);
  s.fill(rank(), 9);
  REQUIRE(avg.step(s.ps));
  std::vector<double> w(static_cast<std::size_t>(size()));
  for (int r = 0; r < size(); ++r) w[static_cast<std::size_t>(r)] = weight(r);
  s.require_weighted_mean(w, 9, size() + 1);
}

TEST_CASE("weights that sum to zero: a clear error on every rank of the group, nothing moved",
          "[np>=2]") {
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  avg.set_weight(0);
  Set s(1);
  s.fill(rank(), 7);
  const auto before = s.bits();
  const std::string msg = message_of([&] { (void)avg.step(s.ps); });
  REQUIRE_ALL_RANKS(msg.find("the weights of the group sum to zero (set_weight); nothing was averaged") !=
                    std::string::npos);
  REQUIRE_ALL_RANKS(msg.find("step 0") != std::string::npos);
  REQUIRE_ALL_RANKS(s.bits() == before);
  // The averager goes on: with weights again, the next step averages.
  avg.set_weight(2);
  REQUIRE_ALL_RANKS(avg.step(s.ps));
}

TEST_CASE("set_weight refuses what it cannot carry, naming the value") {
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  using Catch::Contains;
  for (double bad : {-1.0, std::nan(""), std::numeric_limits<double>::infinity(), 2147483648.0})
    REQUIRE_THAT(message_of([&] { avg.set_weight(bad); }),
                 Contains("set_weight: the weight must be finite, >= 0 and < 2^31, got"));
  hma::AveragerOptions o;
  o.check_every_average = false;
  hma::PeriodicAverager unchecked(MPI_COMM_WORLD, 1, 0, o);
  REQUIRE_THAT(message_of([&] { unchecked.set_weight(2); }),
               Contains("weighted averaging needs the agreement check"));
}

namespace {

// The outer optimizer as the issue and the papers write it (SlowMo; DiLoCo: nesterov), in long
// double: x = anchor - lr d. `a` is the group's average this step.
struct OuterRef {
  double lr, mu;
  bool nesterov;
  bool anchored = false;
  std::vector<long double> anchor, m, tol;
  void step(const std::vector<long double>& a, const std::vector<long double>& spread, double u) {
    if (!anchored) {
      anchor = a;
      m.assign(a.size(), 0);
      tol.assign(a.size(), 0);
      for (std::size_t k = 0; k < a.size(); ++k) tol[k] = 16 * u * spread[k];
      anchored = true;
      return;
    }
    for (std::size_t k = 0; k < a.size(); ++k) {
      const long double delta = anchor[k] - a[k];
      m[k] = mu * m[k] + delta;
      const long double d = nesterov ? delta + mu * m[k] : m[k];
      const long double x = anchor[k] - lr * d;
      // Rounding: the average's own error (spread), then a few operations on numbers no larger
      // than |anchor| + |a| + |m| + |delta|; errors carried from earlier steps add up.
      tol[k] += 16 * u * (spread[k] + std::fabs(anchor[k]) + std::fabs(a[k]) + std::fabs(m[k]) + std::fabs(delta));
      anchor[k] = x;
    }
  }
};

// The plain mean over the world of noise(r, salt, k) as element type T, and sum |x| / g.
template <class T>
void world_mean(int salt, std::size_t k, long double& mean, long double& spread) {
  mean = spread = 0;
  for (int r = 0; r < size(); ++r) {
    const long double x = static_cast<T>(hma_test::noise(r, salt, k));
    mean += x;
    spread += std::fabs(x);
  }
  mean /= size();
  spread /= size();
}

// One outer step of `ref` on the world's mean of the inputs noise(r, salt, k) of set `s` (any set
// with each()), then requires every element of `s` within the reference's bound of its anchor,
// and the same bits on every rank.
template <class S>
void require_outer_step(OuterRef& ref, S& s, int salt, int t) {
  std::vector<long double> a, spread;
  s.each([&](std::size_t k, auto& x) {
    long double mean = 0, sp = 0;
    world_mean<std::remove_reference_t<decltype(x)>>(salt, k, mean, sp);
    a.push_back(mean);
    spread.push_back(sp);
  });
  // One bound for both types would hide f64 mistakes: the unit roundoff per element.
  ref.step(a, spread, 0x1p-24);
  bool ok = true;
  std::string first;
  s.each([&](std::size_t k, auto& x) {
    const long double u_scale = sizeof(x) == 4 ? 1.0L : 0x1p-29L;  // f64: 2^-53 / 2^-24
    const long double err = std::fabs(static_cast<long double>(x) - ref.anchor[k]);
    if (err > ref.tol[k] * u_scale && ok) {
      ok = false;
      first = "step " + std::to_string(t) + " element " + std::to_string(k) + ": got " +
              std::to_string(static_cast<double>(x)) + ", want " + std::to_string(static_cast<double>(ref.anchor[k]));
    }
  });
  INFO(first);
  REQUIRE_ALL_RANKS(ok);
  REQUIRE_ALL_RANKS(hma_test::same_bits_everywhere(s, MPI_COMM_WORLD));
}

// Requires avg.last_divergence() to be step `step`'s, on level 0, the same bits on every rank,
// within 1e-5 relative of max_i ||x_i - mean|| / ||mean|| in long double, x_i the inputs
// noise(i, salt, k) of set `s` (any set with each()), and (with 2+ ranks) a real spread.
template <class S>
void require_divergence(const hma::Averager& avg, S& s, int salt, std::int64_t step) {
  long double mean2 = 0;
  std::vector<long double> dev2(static_cast<std::size_t>(size()), 0);
  s.each([&](std::size_t k, auto& x) {
    using T = std::remove_reference_t<decltype(x)>;
    long double mean = 0, sp = 0;
    world_mean<T>(salt, k, mean, sp);
    mean2 += mean * mean;
    for (int r = 0; r < size(); ++r) {
      const long double d = static_cast<T>(hma_test::noise(r, salt, k)) - mean;
      dev2[static_cast<std::size_t>(r)] += d * d;
    }
  });
  long double worst = 0;
  for (auto d : dev2) worst = std::max(worst, d);
  const double want = static_cast<double>(std::sqrt(worst) / std::sqrt(mean2));
  const auto got = avg.last_divergence();
  REQUIRE_ALL_RANKS(got && got->step == step && got->level == 0);
  INFO("got " << got->value << " want " << want);
  // The mean is rounded (f32 elements): relative 1e-5 of the spread, far below a real spread.
  REQUIRE_ALL_RANKS(std::fabs(got->value - want) <= 1e-5 * (want + 1e-3));
  double mine = got->value, root = mine;
  MPI_Bcast(&root, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  REQUIRE_ALL_RANKS(std::bit_cast<std::uint64_t>(mine) == std::bit_cast<std::uint64_t>(root));
  if (size() > 1) REQUIRE_ALL_RANKS(want > 0.1);  // the ranks' values really differ
}

}  // namespace

TEST_CASE("outer optimizer: SGD with momentum and Nesterov from the anchor, within the stated bound") {
  for (bool nesterov : {false, true})
    for (bool blocking : {true, false}) {
      CAPTURE(nesterov, blocking);
      hma::AveragerOptions o;
      o.outer = hma::OuterOptimizer{0.7, 0.9, nesterov, std::nullopt};
      o.chunk_bytes = 512;
      hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
      Set s(2);
      OuterRef ref{0.7, 0.9, nesterov, false, {}, {}, {}};
      for (int t = 0; t < 5; ++t) {
        s.fill(rank(), 100 + t);  // each step the ranks drift somewhere new
        if (blocking) {
          REQUIRE(avg.step(s.ps));
        } else {
          auto r = avg.start(s.ps);
          r.wait();
        }
        require_outer_step(ref, s, 100 + t, t);
      }
    }
}

TEST_CASE("outer optimizer with lr 1 and momentum 0 is plain averaging, bit for bit") {
  hma::AveragerOptions o;
  o.outer = hma::OuterOptimizer{1.0, 0.0, false, std::nullopt};
  for (std::size_t chunk : {std::size_t{0}, std::size_t{256}}) {
    o.chunk_bytes = chunk;
    hma::AveragerOptions p;
    p.chunk_bytes = chunk;
    hma::PeriodicAverager plain(MPI_COMM_WORLD, 2, 0, p), outer(MPI_COMM_WORLD, 2, 0, o);
    Set a(2), b(2);
    for (int t = 0; t < 7; ++t) {
      a.fill(rank(), 300 + t);
      b.fill(rank(), 300 + t);
      if (t % 3 == 0) {  // also through start/wait
        auto r1 = plain.start(a.ps), r2 = outer.start(b.ps);
        r1.wait();
        r2.wait();
      } else {
        (void)plain.step(a.ps);
        (void)outer.step(b.ps);
      }
      REQUIRE_ALL_RANKS(a.bits() == b.bits());
    }
  }
}

TEST_CASE("outer optimizer: the state is in the checkpoint; a restart continues bit for bit") {
  hma::AveragerOptions o;
  o.outer = hma::OuterOptimizer{0.7, 0.9, true, std::nullopt};
  hma::PeriodicAverager a(MPI_COMM_WORLD, 1, 0, o);
  Set x(1), y(1);
  for (int t = 0; t < 3; ++t) {
    x.fill(rank(), 400 + t);
    (void)a.step(x.ps);
  }
  const std::string text = a.checkpoint();
  REQUIRE(text.find("\nouter level 0 group 0 f32 318 f64 133 layout ") != std::string::npos);
  hma::PeriodicAverager b(MPI_COMM_WORLD, 1, 0, o);
  b.restore(text);
  REQUIRE(b.checkpoint() == text);
  for (int t = 3; t < 6; ++t) {
    x.fill(rank(), 400 + t);
    y.fill(rank(), 400 + t);
    (void)a.step(x.ps);
    (void)b.step(y.ps);
    REQUIRE_ALL_RANKS(x.bits() == y.bits());
  }
  // Damaged state, or state for an averager without an outer optimizer: refused on every rank.
  using Catch::Contains;
  std::string bad = text;
  bad[bad.find("outer-state ") + 20] = '#';
  REQUIRE_THAT(message_of([&] { b.restore(bad); }), Contains("outer optimizer state is damaged"));
  hma::PeriodicAverager none(MPI_COMM_WORLD, 1, 0);
  REQUIRE_THAT(message_of([&] { none.restore(text); }),
               Contains("carries an outer optimizer's state, but this averager has no outer optimizer"));
}

TEST_CASE("outer optimizer: one set per averager; bad options name the value") {
  using Catch::Contains;
  hma::AveragerOptions o;
  o.outer = hma::OuterOptimizer{0.5, 0.5, false, std::nullopt};
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  Set a(1), b(2);
  a.fill(rank(), 1);
  (void)avg.step(a.ps);
  b.fill(rank(), 2);
  const auto before = b.bits();
  const std::string msg = message_of([&] { (void)avg.step(b.ps); });
  REQUIRE_ALL_RANKS(msg.find("holds the state of another set (318 f32 and 133 f64 elements); this set has "
                             "636 f32 and 266 f64 elements") != std::string::npos);
  REQUIRE_ALL_RANKS(b.bits() == before);
  auto refused = [&](hma::OuterOptimizer opt) {
    hma::AveragerOptions x;
    x.outer = opt;
    return message_of([&] { hma::PeriodicAverager bad(MPI_COMM_WORLD, 1, 0, x); });
  };
  REQUIRE_THAT(refused({0, 0, false, std::nullopt}), Contains("lr must be finite and > 0, got 0"));
  REQUIRE_THAT(refused({1, 1, false, std::nullopt}), Contains("momentum must be in [0, 1), got 1"));
  REQUIRE_THAT(refused({1, 0, true, std::nullopt}), Contains("nesterov needs a momentum > 0"));
  REQUIRE_THAT(refused({1, 0, false, 1}), Contains("the outer optimizer's level 1 does not exist"));
  setenv("HMA_OUTER", "lr=0.7,momentum=0.9,nesterov", 1);
  {
    hma::PeriodicAverager from_env(MPI_COMM_WORLD, 8, 0);
    REQUIRE_THAT(from_env.describe(), Contains("outer optimizer at level 0: lr 0.69999999999999996 momentum 0.90000000000000002 nesterov"));
  }
  setenv("HMA_OUTER", "lr=0.7,beta=2", 1);
  REQUIRE_THAT(message_of([&] { hma::PeriodicAverager e(MPI_COMM_WORLD, 8, 0); }),
               Contains("HMA_OUTER='lr=0.7,beta=2': token 'beta=2': unknown"));
  unsetenv("HMA_OUTER");
}

TEST_CASE("divergence: max_i ||x_i - mean|| / ||mean|| of the group, the same on every rank") {
  for (bool blocking : {true, false}) {
    CAPTURE(blocking);
    hma::AveragerOptions o;
    o.divergence = true;
    o.chunk_bytes = 512;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    REQUIRE(!avg.last_divergence());
    Set s(2);
    for (int t = 0; t < 3; ++t) {
      s.fill(rank(), 500 + t);
      if (blocking) {
        (void)avg.step(s.ps);
      } else {
        auto r = avg.start(s.ps);
        r.wait();
      }
      require_divergence(avg, s, 500 + t, t);
    }
  }
}

TEST_CASE("divergence of ranks that agree is zero; without the option there is none") {
  hma::AveragerOptions o;
  o.divergence = true;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  Set s(1);
  s.each([&](std::size_t k, auto& x) { x = static_cast<std::remove_reference_t<decltype(x)>>(std::ldexp(1.0, static_cast<int>(k % 5))); });
  (void)avg.step(s.ps);
  // Equal inputs x average to x exactly only where x / g is exact: powers of two here, and g a
  // power of two.
  if ((size() & (size() - 1)) == 0) REQUIRE_ALL_RANKS(avg.last_divergence()->value == 0);
  else REQUIRE_ALL_RANKS(avg.last_divergence()->value < 1e-7);
  hma::PeriodicAverager off(MPI_COMM_WORLD, 1, 0);
  (void)off.step(s.ps);
  REQUIRE(!off.last_divergence());
}

namespace {

// Round x to a 16-bit format independently of hma's bit tricks: p significant bits, normal
// exponents down to emin, nearest even (the FPU's nearbyint), overflow to infinity above max.
double round_to(double x, int p, int emin, double max_finite) {
  if (std::isnan(x) || x == 0) return x;
  int e = 0;
  (void)std::frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  const int q = std::max(e - 1, emin) - (p - 1);  // spacing 2^q
  const double r = std::ldexp(std::nearbyint(std::ldexp(x, -q)), q);
  const double half_ulp_above = max_finite + std::ldexp(1.0, std::max(e - 1, emin) - p);
  if (std::fabs(x) >= half_ulp_above || std::fabs(r) > max_finite) return std::copysign(INFINITY, x);
  return r;
}

}  // namespace

TEST_CASE("16-bit formats: round trips of every pattern, narrowing against an independent rounding") {
  namespace hd = hma::detail;
  // The cases are split over the ranks (each checks k = rank mod size), counted, and reported
  // once: the first value that disagrees is named.
  const std::uint64_t me = static_cast<std::uint64_t>(rank()), n = static_cast<std::uint64_t>(size());
  std::string first;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok && first.empty()) first = what;
  };
  // Every 16-bit pattern widens and narrows back to itself (NaNs stay NaN).
  for (std::uint32_t h = static_cast<std::uint32_t>(me); h < 65536; h += static_cast<std::uint32_t>(n)) {
    const auto b = static_cast<std::uint16_t>(h);
    const float fb = hd::from_bf16(b), fh = hd::from_fp16(b);
    expect(std::isnan(fb) ? std::isnan(hd::from_bf16(hd::to_bf16(fb))) : hd::to_bf16(fb) == b,
           "bf16 pattern " + std::to_string(h));
    expect(std::isnan(fh) ? std::isnan(hd::from_fp16(hd::to_fp16(fh))) : hd::to_fp16(fh) == b,
           "fp16 pattern " + std::to_string(h));
  }
  // Narrowing agrees with the independent rounding on values of every magnitude, ties included.
  for (std::uint64_t k = me; k < 400000; k += n) {
    const double u = hma_test::noise(static_cast<int>(k % 5), 77, k);
    float x = static_cast<float>(std::ldexp(u, static_cast<int>(k % 60) - 30));
    if (k % 7 == 0) x = std::bit_cast<float>(std::bit_cast<std::uint32_t>(x) & 0xffff8000u);  // bf16 ties
    if (k % 11 == 0) x = std::bit_cast<float>((std::bit_cast<std::uint32_t>(x) & 0xffffe000u) | 0x1000u);  // fp16 ties
    const bool ok = hd::from_bf16(hd::to_bf16(x)) == static_cast<float>(round_to(x, 8, -126, 0x1.fep127)) &&
                    hd::from_fp16(hd::to_fp16(x)) == static_cast<float>(round_to(x, 11, -14, 65504.0));
    if (!ok) expect(false, "float " + std::to_string(x));
  }
  // Doubles narrow in one rounding (to odd through float), not two.
  REQUIRE(hd::from_bf16(hd::to_bf16(hd::to_float_for_16(1 + 0x1p-8 + 0x1p-30))) == 1 + 0x1p-7f);
  REQUIRE(static_cast<float>(1 + 0x1p-8 + 0x1p-30) == 1 + 0x1p-8f);  // the double rounding it avoids
  for (std::uint64_t k = me; k < 200000; k += n) {
    double x = std::ldexp(hma_test::noise(static_cast<int>(k % 3), 78, k), static_cast<int>(k % 80) - 40);
    if (k % 5 == 0) x = std::ldexp(std::nearbyint(std::ldexp(x, 20)) + 0.5, -20) * (1 + 0x1p-40);  // near ties
    const bool ok = hd::from_bf16(hd::to_bf16(hd::to_float_for_16(x))) == static_cast<float>(round_to(x, 8, -126, 0x1.fep127)) &&
                    hd::from_fp16(hd::to_fp16(hd::to_float_for_16(x))) == static_cast<float>(round_to(x, 11, -14, 65504.0));
    if (!ok) expect(false, "double " + std::to_string(x));
  }
  INFO("first disagreement: " << first);
  REQUIRE_ALL_RANKS(first.empty());
  REQUIRE(std::isinf(hd::from_fp16(hd::to_fp16(65520.0f))));
  REQUIRE(hd::from_fp16(hd::to_fp16(65519.0f)) == 65504.0f);
  REQUIRE(std::isinf(hd::from_bf16(hd::to_bf16(3.4e38f))));
}

namespace {

// clang-format off
// Edge cases of the 16-bit conversions, expected bits from torch 1.13 (c10's round to nearest
// even), regenerated with (B: the first column as a Python list):
//   python3 -c 'import torch; B=[...]; [print("{0x%08xu, 0x%04xu, 0x%04xu}," % (b, *(torch.tensor([b - (b >> 31 << 32)], dtype=torch.int32).view(torch.float32).to(t).view(torch.int16).item() & 0xffff for t in (torch.bfloat16, torch.float16)))) for b in B]'
// Every row that is not a NaN also agrees with exact rational rounding (Python's fractions).
// NaN rows keep torch's bits for the record, but torch 1.13 gives bf16 0xffff for every NaN
// (its sign lost): only "NaN in, NaN of the same sign out" is checked there, which is what hma
// keeps (bf16: the input's sign and top 7 payload bits, quieted; fp16: sign | 0x7e00).
struct Narrow16 {
  std::uint32_t in;
  std::uint16_t bf16, fp16;
};
constexpr Narrow16 kNarrow16[] = {
  // NaNs: payload only in the low 16 bits (both signs; 0x7f808000 whose rounding would carry
  // into infinity), only in the low 13 bits (those fp16 drops), payload above them, quiet
  {0x7f800001u, 0xffffu, 0x7e00u}, {0x7f80ffffu, 0xffffu, 0x7e00u}, {0x7f808000u, 0xffffu, 0x7e00u},
  {0x7f807fffu, 0xffffu, 0x7e00u}, {0xff800001u, 0xffffu, 0xfe00u}, {0xff80ffffu, 0xffffu, 0xfe00u},
  {0xff808000u, 0xffffu, 0xfe00u}, {0x7f810000u, 0xffffu, 0x7e00u}, {0x7fa00000u, 0xffffu, 0x7e00u},
  {0x7fc00000u, 0xffffu, 0x7e00u}, {0x7fc00001u, 0xffffu, 0x7e00u}, {0x7fffffffu, 0xffffu, 0x7e00u},
  {0xffc00000u, 0xffffu, 0xfe00u}, {0xffffffffu, 0xffffu, 0xfe00u}, {0x7f801fffu, 0xffffu, 0x7e00u},
  {0xff801fffu, 0xffffu, 0xfe00u},
  // infinities, zeros
  {0x7f800000u, 0x7f80u, 0x7c00u}, {0xff800000u, 0xff80u, 0xfc00u},
  {0x00000000u, 0x0000u, 0x0000u}, {0x80000000u, 0x8000u, 0x8000u},
  // float subnormals: smallest, largest (rounds up to bf16's smallest normal), ties to even
  // (0x8000 -> 0, 0x18000 -> 2), around the tie, exact bf16 subnormal, 2^-126
  {0x00000001u, 0x0000u, 0x0000u}, {0x80000001u, 0x8000u, 0x8000u}, {0x007fffffu, 0x0080u, 0x0000u},
  {0x807fffffu, 0x8080u, 0x8000u}, {0x00007fffu, 0x0000u, 0x0000u}, {0x00008000u, 0x0000u, 0x0000u},
  {0x00008001u, 0x0001u, 0x0000u}, {0x00018000u, 0x0002u, 0x0000u}, {0x00010000u, 0x0001u, 0x0000u},
  {0x80008000u, 0x8000u, 0x8000u}, {0x80018000u, 0x8002u, 0x8000u}, {0x007f8000u, 0x0080u, 0x0000u},
  {0x00800000u, 0x0080u, 0x0000u},
  // bf16 ties (low 16 bits 0x8000) with the kept bit even and odd, both signs, just below and
  // above, a carry into the exponent
  {0x3f800000u, 0x3f80u, 0x3c00u}, {0x3f808000u, 0x3f80u, 0x3c04u}, {0x3f818000u, 0x3f82u, 0x3c0cu},
  {0x3f807fffu, 0x3f80u, 0x3c04u}, {0x3f808001u, 0x3f81u, 0x3c04u}, {0x3f817fffu, 0x3f81u, 0x3c0cu},
  {0xbf808000u, 0xbf80u, 0xbc04u}, {0xbf818000u, 0xbf82u, 0xbc0cu}, {0x3fff8000u, 0x4000u, 0x3ffcu},
  {0x3f7f8000u, 0x3f80u, 0x3bfcu},
  // bf16's largest finite (0x7f7f), around the tie to infinity, FLT_MAX
  {0x7f7f0000u, 0x7f7fu, 0x7c00u}, {0x7f7f7fffu, 0x7f7fu, 0x7c00u}, {0x7f7f8000u, 0x7f80u, 0x7c00u},
  {0x7f7effffu, 0x7f7fu, 0x7c00u}, {0x7f7e8000u, 0x7f7eu, 0x7c00u}, {0x7f7fffffu, 0x7f80u, 0x7c00u},
  {0xff7fffffu, 0xff80u, 0xfc00u}, {0xff7f7fffu, 0xff7fu, 0xfc00u},
  // fp16 ties (low 13 bits 0x1000) with the kept bit even and odd, around them, a carry
  {0x3f801000u, 0x3f80u, 0x3c00u}, {0x3f803000u, 0x3f80u, 0x3c02u}, {0x3f800fffu, 0x3f80u, 0x3c00u},
  {0x3f801001u, 0x3f80u, 0x3c01u}, {0x3f802fffu, 0x3f80u, 0x3c01u}, {0xbf803000u, 0xbf80u, 0xbc02u},
  {0x3ffff000u, 0x4000u, 0x4000u},
  // fp16's top: 65504, 65519.996, 65520 (-> infinity), 65536, negatives, 65512 (tie), 65488
  {0x477fe000u, 0x4780u, 0x7bffu}, {0x477fefffu, 0x4780u, 0x7bffu}, {0x477ff000u, 0x4780u, 0x7c00u},
  {0x47800000u, 0x4780u, 0x7c00u}, {0xc77ff000u, 0xc780u, 0xfc00u}, {0xc77fefffu, 0xc780u, 0xfbffu},
  {0x477fe800u, 0x4780u, 0x7bffu}, {0x477fd000u, 0x4780u, 0x7bfeu},
  // fp16's subnormal range: 2^-14 and just below, 1023, 1022 and 1022.5 (tie) times 2^-24, 2^-24,
  // the 2^-25 tie (-> 0) and around it, 3*2^-26, 3*2^-25 and 5*2^-25 (ties to 2), 2^-26,
  // negatives, 1.25*2^-24, 1023.5*2^-24 (tie to 2^-14)
  {0x38800000u, 0x3880u, 0x0400u}, {0x387fffffu, 0x3880u, 0x0400u}, {0x387fc000u, 0x3880u, 0x03ffu},
  {0x387f8000u, 0x3880u, 0x03feu}, {0x387fa000u, 0x3880u, 0x03feu}, {0x33800000u, 0x3380u, 0x0001u},
  {0x33000000u, 0x3300u, 0x0000u}, {0x33000001u, 0x3300u, 0x0001u}, {0x32ffffffu, 0x3300u, 0x0000u},
  {0x33400000u, 0x3340u, 0x0001u}, {0x33c00000u, 0x33c0u, 0x0002u}, {0x34200000u, 0x3420u, 0x0002u},
  {0x32800000u, 0x3280u, 0x0000u}, {0xb3000000u, 0xb300u, 0x8000u}, {0xb3400000u, 0xb340u, 0x8001u},
  {0x33a00000u, 0x33a0u, 0x0001u}, {0x387fe000u, 0x3880u, 0x0400u},
};

// Widening: 16-bit bits, then torch's float bits from them as bf16 and as fp16, regenerated with
//   python3 -c 'import torch; B=[...]; [print("{0x%04xu, 0x%08xu, 0x%08xu}," % (h, *(torch.tensor([h - (h >> 15 << 16)], dtype=torch.int16).view(t).float().view(torch.int32).item() & 0xffffffff for t in (torch.bfloat16, torch.float16)))) for h in B]'
// torch quiets fp16 NaNs (0x7c01 -> 0x7fc02000), hma keeps the bits (0x7f802000): NaN rows
// check NaN and sign only.
struct Widen16 {
  std::uint16_t in;
  std::uint32_t bf16, fp16;
};
constexpr Widen16 kWiden16[] = {
  {0x0000u, 0x00000000u, 0x00000000u}, {0x8000u, 0x80000000u, 0x80000000u},
  {0x0001u, 0x00010000u, 0x33800000u}, {0x8001u, 0x80010000u, 0xb3800000u},
  {0x007fu, 0x007f0000u, 0x36fe0000u}, {0x0080u, 0x00800000u, 0x37000000u},
  {0x03ffu, 0x03ff0000u, 0x387fc000u}, {0x0400u, 0x04000000u, 0x38800000u},
  {0x3c00u, 0x3c000000u, 0x3f800000u}, {0x3c01u, 0x3c010000u, 0x3f802000u},
  {0x7bffu, 0x7bff0000u, 0x477fe000u}, {0xfbffu, 0xfbff0000u, 0xc77fe000u},
  {0x7f7fu, 0x7f7f0000u, 0x7fefe000u}, {0xff7fu, 0xff7f0000u, 0xffefe000u},
  {0x7c00u, 0x7c000000u, 0x7f800000u}, {0xfc00u, 0xfc000000u, 0xff800000u},
  {0x7f80u, 0x7f800000u, 0x7ff00000u}, {0xff80u, 0xff800000u, 0xfff00000u},
  {0x7c01u, 0x7c010000u, 0x7fc02000u}, {0xfc01u, 0xfc010000u, 0xffc02000u},
  {0x7e00u, 0x7e000000u, 0x7fc00000u}, {0xfe00u, 0xfe000000u, 0xffc00000u},
  {0x7f81u, 0x7f810000u, 0x7ff02000u}, {0xff81u, 0xff810000u, 0xfff02000u},
  {0x7fc0u, 0x7fc00000u, 0x7ff80000u}, {0xffffu, 0xffff0000u, 0xffffe000u},
};

// Doubles through to_float_for_16 (round to odd to float, then to 16 bits): one rounding. Not
// torch's double -> 16 bits: torch 1.13 rounds to float first (two roundings; it gives 0x3f80 for
// the first row and 0x7c00 for 65520 - 2^-30). Expected bits from exact rounding in Python (round()
// of a Fraction rounds half to even; torch only encodes the exact result), regenerated with
// (X: the first column as Python strings, the infinities left out):
//   python3 -c 'import math, torch; from fractions import Fraction as F; X=[...]; [print(s, *(hex(torch.tensor([math.copysign(float(round(F(x) * 2**(p - max(math.frexp(x)[1], lo))) * F(2)**(max(math.frexp(x)[1], lo) - p)), x)]).to(t).view(torch.int16).item() & 0xffff) for p, lo, t in ((8, -125, torch.bfloat16), (11, -13, torch.float16)))) for s in X for x in [float.fromhex(s) if "x" in s else float(s)]]'
// The fp16 column also equals numpy's float64 -> float16 (one rounding).
struct Narrow16d {
  double in;
  std::uint16_t bf16, fp16;
};
constexpr Narrow16d kNarrow16d[] = {
  {0x1.01000004p+0, 0x3f81u, 0x3c04u},       // 1 + 2^-8 + 2^-30: above the bf16 tie
  {0x1.02ffffffffp+0, 0x3f81u, 0x3c0cu},     // 1 + 3*2^-8 - 2^-40: below the bf16 tie
  {0x1.01p+0, 0x3f80u, 0x3c04u},             // 1 + 2^-8: the tie, to even
  {0x1.03p+0, 0x3f82u, 0x3c0cu},             // 1 + 3*2^-8: the tie, to even (up)
  {0x1.0020000001p+0, 0x3f80u, 0x3c01u},     // 1 + 2^-11 + 2^-40: above the fp16 tie
  {0x1.005fffffffp+0, 0x3f80u, 0x3c01u},     // 1 + 3*2^-11 - 2^-40: below the fp16 tie
  {-0x1.0020000001p+0, 0xbf80u, 0xbc01u},
  {0x1.ffdffffffff8p+15, 0x4780u, 0x7bffu},  // 65520 - 2^-30: 65504, not infinity
  {0x1.ffep+15, 0x4780u, 0x7c00u},           // 65520
  {0x1.000000002p-25, 0x3300u, 0x0001u},     // 2^-25 + 2^-60: above the fp16 subnormal tie
  {0x1p-25, 0x3300u, 0x0000u},               // 2^-25: the tie, to 0
  {-0x1.000000002p-25, 0xb300u, 0x8001u},
  {0x1.fefffffffp+127, 0x7f7fu, 0x7c00u},    // below bf16's tie to infinity (float rounds onto it)
  {0x1.ff00000001p+127, 0x7f80u, 0x7c00u},   // above it
  {1e300, 0x7f80u, 0x7c00u}, {-1e300, 0xff80u, 0xfc00u},
  {0x0.0000000000001p-1022, 0x0000u, 0x0000u}, {-0x0.0000000000001p-1022, 0x8000u, 0x8000u},
  {std::numeric_limits<double>::infinity(), 0x7f80u, 0x7c00u},
  {-std::numeric_limits<double>::infinity(), 0xff80u, 0xfc00u},
  {0.0, 0x0000u, 0x0000u}, {-0.0, 0x8000u, 0x8000u},
};
// clang-format on

bool nan16(std::uint16_t h, std::uint16_t exponent) {
  return (h & exponent) == exponent && (h & 0x7fffu & ~exponent) != 0;
}

std::string hex(std::uint64_t v) {
  char s[24];
  std::snprintf(s, sizeof s, "0x%llx", static_cast<unsigned long long>(v));
  return s;
}

}  // namespace

TEST_CASE("16-bit formats: NaN payloads, ties, overflow, subnormals against torch's bits") {
  namespace hd = hma::detail;
  // Every rank checks every row (no collective inside) and the disagreements are reported once.
  std::string bad;
  auto narrowed = [&](const std::string& what, std::uint64_t in, bool in_nan, bool in_neg,
                      std::uint16_t got, std::uint16_t want, std::uint16_t exponent) {
    const bool ok = in_nan ? nan16(got, exponent) && (got >> 15 != 0) == in_neg : got == want;
    if (!ok)
      bad += what + "(" + hex(in) + ") = " + hex(got) + ", want " +
             (in_nan ? "a NaN of that sign" : hex(want)) + "; ";
  };
  for (const auto& r : kNarrow16) {
    const float x = std::bit_cast<float>(r.in);
    const bool nan = std::isnan(x), neg = (r.in >> 31) != 0;
    narrowed("to_bf16", r.in, nan, neg, hd::to_bf16(x), r.bf16, 0x7f80u);
    narrowed("to_fp16", r.in, nan, neg, hd::to_fp16(x), r.fp16, 0x7c00u);
  }
  for (const auto& r : kNarrow16d) {
    const float f = hd::to_float_for_16(r.in);
    const auto in = std::bit_cast<std::uint64_t>(r.in);
    narrowed("to_bf16(to_float_for_16)", in, false, false, hd::to_bf16(f), r.bf16, 0x7f80u);
    narrowed("to_fp16(to_float_for_16)", in, false, false, hd::to_fp16(f), r.fp16, 0x7c00u);
  }
  // Double NaNs (quiet, and one whose payload is only in the low 29 bits that float drops).
  for (std::uint64_t in : {0x7ff8000000000000ull, 0xfff8000000000000ull, 0x7ff0000000000001ull,
                           0xfff00000ffffffffull}) {
    const float f = hd::to_float_for_16(std::bit_cast<double>(in));
    narrowed("to_bf16(to_float_for_16)", in, true, (in >> 63) != 0, hd::to_bf16(f), 0, 0x7f80u);
    narrowed("to_fp16(to_float_for_16)", in, true, (in >> 63) != 0, hd::to_fp16(f), 0, 0x7c00u);
  }
  auto widened = [&](const std::string& what, std::uint16_t in, float got, std::uint32_t want) {
    const float w = std::bit_cast<float>(want);
    const bool ok = std::isnan(w) ? std::isnan(got) && std::signbit(got) == std::signbit(w)
                                  : std::bit_cast<std::uint32_t>(got) == want;
    if (!ok)
      bad += what + "(" + hex(in) + ") = " + hex(std::bit_cast<std::uint32_t>(got)) + ", want " +
             hex(want) + "; ";
  };
  for (const auto& r : kWiden16) {
    widened("from_bf16", r.in, hd::from_bf16(r.in), r.bf16);
    widened("from_fp16", r.in, hd::from_fp16(r.in), r.fp16);
  }
  INFO("disagreements: " << bad);
  REQUIRE_ALL_RANKS(bad.empty());
}

TEST_CASE("16-bit wires: the average within the stated bound, 16-bit values, same bits everywhere") {
  namespace hd = hma::detail;
  const int g = size();
  // On two-level levels (HMA_ALGORITHM=two_level with emulated nodes) also with the stage
  // across nodes forced direction-split (both directions of each link, 16-bit Isend/Irecv).
  const char* alg = std::getenv("HMA_ALGORITHM");
  const char* rpn_env = std::getenv("HMA_RANKS_PER_NODE");
  const int rpn = rpn_env != nullptr ? std::atoi(rpn_env) : 0;
  const bool two_level = alg != nullptr && std::string(alg) == "two_level" && rpn > 0 && size() > rpn &&
                         size() % rpn == 0 && (size() / rpn) % 2 == 0;
  for (hma::Wire w : {hma::Wire::bf16, hma::Wire::fp16})
    for (bool blocking : {true, false})
      for (std::size_t chunk : {std::size_t{0}, std::size_t{100}}) {
        CAPTURE(static_cast<int>(w), blocking, chunk);
        hd::set_split_min_block_for_testing(chunk == 0 ? 0 : 1);  // pieces of 100 B: forced split
        const auto splits = hd::uses(hd::Use::two_level_split);
        hma::AveragerOptions o;
        o.wire = std::vector<hma::Wire>{w};
        o.chunk_bytes = chunk;
        hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
        Set s(3);
        s.fill(rank(), 600);
        const auto used = hd::uses(hd::Use::wire_piece) + hd::uses(hd::Use::wire_start);
        if (blocking) {
          (void)avg.step(s.ps);
        } else {
          auto r = avg.start(s.ps);
          r.wait();
        }
        // g > 1 moved data through the wire (unless the progress thread ran it: still blocking).
        if (g > 1) REQUIRE_ALL_RANKS(hd::uses(hd::Use::wire_piece) + hd::uses(hd::Use::wire_start) > used);
        // The bound (README "Beyond torch's averagers"): with u the format's unit roundoff
        // (bf16 2^-8, fp16 2^-11), |avg - mean| <= g (u + 2^-23) 1.01 sum|x_i| / g + g 2^-25
        // (the last term: fp16's subnormal spacing, 2^-24, half of it per rounding).
        const double u = w == hma::Wire::bf16 ? 0x1p-8 : 0x1p-11;
        bool ok = true, representable = true;
        std::string first;
        s.each([&](std::size_t k, auto& x) {
          using T = std::remove_reference_t<decltype(x)>;
          long double mean = 0, sp = 0;
          world_mean<T>(600, k, mean, sp);
          const long double bound = g * (u + 0x1p-23) * 1.01 * sp + g * 0x1p-25;
          if (std::fabs(x - mean) > bound && ok) {
            ok = false;
            first = "element " + std::to_string(k) + ": got " + std::to_string(static_cast<double>(x)) +
                    ", mean " + std::to_string(static_cast<double>(mean)) + ", bound " + std::to_string(static_cast<double>(bound));
          }
          const float f = static_cast<float>(x);
          const float back = w == hma::Wire::bf16 ? hd::from_bf16(hd::to_bf16(f)) : hd::from_fp16(hd::to_fp16(f));
          if (g > 1) representable = representable && back == f && static_cast<T>(f) == x;
        });
        INFO(first);
        REQUIRE_ALL_RANKS(ok);
        REQUIRE_ALL_RANKS(representable);
        REQUIRE_ALL_RANKS(s.same_bits_everywhere(MPI_COMM_WORLD));
        hd::set_split_min_block_for_testing(0);
        if (two_level && chunk != 0) REQUIRE_ALL_RANKS(hd::uses(hd::Use::two_level_split) > splits);
      }
}

TEST_CASE("16-bit wire per level: exact within the first level, bf16 on the last") {
  const auto sizes = hma_test::group_sizes();
  std::vector<hma::Level> levels;
  std::int64_t period = 1;
  for (int g : sizes) {
    levels.push_back({period, g});
    period *= 2;
  }
  std::vector<hma::Wire> wires(levels.size(), hma::Wire::exact);
  wires.back() = hma::Wire::bf16;
  hma::AveragerOptions o;
  o.wire = wires;
  hma::HierarchicalAverager mixed(MPI_COMM_WORLD, levels, 0, o), plain(MPI_COMM_WORLD, levels, 0);
  Set a(1), b(1);
  for (std::size_t l = 0; l < levels.size(); ++l) {
    a.fill(rank(), 700);
    b.fill(rank(), 700);
    mixed.average(a.ps, l);
    plain.average(b.ps, l);
    const bool last = l + 1 == levels.size();
    CAPTURE(l, levels[l].group_size);
    if (!last || levels[l].group_size == 1) REQUIRE_ALL_RANKS(a.bits() == b.bits());
    else REQUIRE_ALL_RANKS(a.bits() != b.bits());
  }
  REQUIRE_THAT(mixed.describe(), Catch::Contains("level " + std::to_string(levels.size() - 1) + " sends bf16 on the wire"));
}

TEST_CASE("16-bit wire options: one per level or one for all, named errors") {
  using Catch::Contains;
  hma::AveragerOptions o;
  o.wire = std::vector<hma::Wire>{hma::Wire::bf16, hma::Wire::exact};
  REQUIRE_THAT(message_of([&] { hma::PeriodicAverager a(MPI_COMM_WORLD, 1, 0, o); }),
               Contains("the wire (AveragerOptions::wire or HMA_WIRE) lists 2 levels, the schedule has 1"));
  setenv("HMA_WIRE", "bf16,f8", 1);
  REQUIRE_THAT(message_of([&] { hma::PeriodicAverager a(MPI_COMM_WORLD, 1, 0); }),
               Contains("HMA_WIRE='bf16,f8': 'f8' is not exact, bf16 or fp16"));
  setenv("HMA_WIRE", "fp16", 1);
  {
    hma::PeriodicAverager a(MPI_COMM_WORLD, 1, 0);
    REQUIRE_THAT(a.describe(), Contains("level 0 sends fp16 on the wire"));
  }
  unsetenv("HMA_WIRE");
}

TEST_CASE("device sets (emulated): a 16-bit wire is refused on every rank") {
  namespace hd = hma::detail;
  const EmulatedDevices emulated;
  auto device_step = [](hma::Averager& avg) {
    hma::DeviceParamSet ps;
    auto arr = ps.allocate<float>(64);
    (void)arr;
    return message_of([&] { (void)avg.step(ps); });
  };
  hma::AveragerOptions w;
  w.wire = std::vector<hma::Wire>{hma::Wire::bf16};
  hma::PeriodicAverager wire(MPI_COMM_WORLD, 1, 0, w);
  REQUIRE_ALL_RANKS(device_step(wire).find("level 0 sends bf16 on the wire, which is for host ParamSets only") != std::string::npos);
  // Equal weights are the plain average: device sets take them.
  hma::PeriodicAverager equal(MPI_COMM_WORLD, 1, 0);
  equal.set_weight(2);
  REQUIRE_ALL_RANKS(device_step(equal) == "no error");
}

namespace {

// A device set for the emulation backend (device memory is host memory): a zero-copy f32 array,
// a packed f32 array and a packed f64 array of the caller.
struct DevSet {
  // The caller's arrays outlive the set: its destructor completes what its stream still holds
  // (an unpack into them).
  std::vector<float> uf = std::vector<float>(41);
  std::vector<double> ud = std::vector<double>(77);
  hma::DeviceParamSet ps;
  hma::DeviceArray<float> zf;
  DevSet() {
    zf = ps.allocate<float>(300);
    ps.add(uf.data(), uf.size());
    ps.add(ud.data(), ud.size());
  }
  template <class F>
  void each(F&& f) {
    std::size_t k = 0;
    for (std::size_t i = 0; i < zf.size(); ++i) f(k++, zf.data()[i]);
    for (float& x : uf) f(k++, x);
    for (double& x : ud) f(k++, x);
  }
  void fill(int r, int salt) {
    each([&](std::size_t k, auto& x) { x = static_cast<std::remove_reference_t<decltype(x)>>(hma_test::noise(r, salt, k)); });
  }
  std::vector<std::uint64_t> bits() { return hma_test::bits_of(*this); }
};

// The device paths an average can be asked to take: the outer optimizer and the divergence
// metric run on the staged path's host chunks whichever is asked.
enum class DevWay { staged, direct, thread };

hma::AveragerOptions dev_options(DevWay way) {
  hma::AveragerOptions o;
  o.staging_chunk_bytes = 256;  // several chunks per array, chunks across arrays
  o.device_ipc = false;          // the MPI paths (the node transport sums in rank order)
  if (way == DevWay::direct) {
    o.cuda_aware = true;
    o.device_path = hma::DevicePath::direct;
  }
  if (way == DevWay::thread) o.progress = hma::Progress::thread;
  return o;
}

}  // namespace

TEST_CASE("device sets (emulated): the outer optimizer, within the stated bound, on every path") {
  const EmulatedDevices emulated;
  for (DevWay way : {DevWay::staged, DevWay::direct, DevWay::thread})
    for (bool blocking : {true, false}) {
      CAPTURE(static_cast<int>(way), blocking);
      hma::AveragerOptions o = dev_options(way);
      o.outer = hma::OuterOptimizer{0.7, 0.9, true, std::nullopt};
      hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
      DevSet s;
      OuterRef ref{0.7, 0.9, true, false, {}, {}, {}};
      for (int t = 0; t < 5; ++t) {
        s.fill(rank(), 1200 + t);
        if (blocking) {
          REQUIRE(avg.step(s.ps));
        } else {
          auto r = avg.start(s.ps);
          r.wait();
        }
        s.ps.synchronize();
        require_outer_step(ref, s, 1200 + t, t);
      }
      // The state is the host's: in the checkpoint like a host set's.
      REQUIRE(avg.checkpoint().find("\nouter level 0 group 0 f32 341 f64 77 layout ") != std::string::npos);
    }
}

TEST_CASE("device sets (emulated): the outer optimizer with lr 1 and momentum 0 is the staged average, bit for bit") {
  const EmulatedDevices emulated;
  // The host scales as the kernel would: x / g, x * (1/g) (reciprocal; differs from x / g at
  // 3 ranks), or x * w_i / sum(w).
  for (bool weighted : {false, true})
    for (bool reciprocal : {false, true}) {
    CAPTURE(weighted, reciprocal);
    hma::AveragerOptions p = dev_options(DevWay::staged);
    p.device_path = hma::DevicePath::staged;
    if (reciprocal) p.device_division = hma::DeviceDivision::reciprocal;
    hma::AveragerOptions o = p;
    o.outer = hma::OuterOptimizer{1.0, 0.0, false, std::nullopt};
    hma::PeriodicAverager plain(MPI_COMM_WORLD, 1, 0, p), outer(MPI_COMM_WORLD, 1, 0, o);
    if (weighted) {
      plain.set_weight(1 + rank() % 3);
      outer.set_weight(1 + rank() % 3);
    }
    DevSet a, b;
    for (int t = 0; t < 4; ++t) {
      a.fill(rank(), 1300 + t);
      b.fill(rank(), 1300 + t);
      if (t % 2 == 0) {
        (void)plain.step(a.ps);
        (void)outer.step(b.ps);
      } else {
        auto r1 = plain.start(a.ps);
        r1.wait();
        auto r2 = outer.start(b.ps);
        r2.wait();
      }
      a.ps.synchronize();
      b.ps.synchronize();
      REQUIRE_ALL_RANKS(a.bits() == b.bits());
    }
  }
}

TEST_CASE("device sets (emulated): the outer state in the checkpoint; a restart continues bit for bit") {
  const EmulatedDevices emulated;
  hma::AveragerOptions o = dev_options(DevWay::staged);
  o.outer = hma::OuterOptimizer{0.7, 0.9, true, std::nullopt};
  hma::PeriodicAverager a(MPI_COMM_WORLD, 1, 0, o);
  DevSet x, y;
  for (int t = 0; t < 3; ++t) {
    x.fill(rank(), 1800 + t);
    (void)a.step(x.ps);
    x.ps.synchronize();  // the host writes the emulated device memory next
  }
  hma::PeriodicAverager b(MPI_COMM_WORLD, 1, 0, o);
  b.restore(a.checkpoint());
  for (int t = 3; t < 6; ++t) {
    x.fill(rank(), 1800 + t);
    y.fill(rank(), 1800 + t);
    (void)a.step(x.ps);
    auto r = b.start(y.ps);  // also through the polled path
    r.wait();
    x.ps.synchronize();
    y.ps.synchronize();
    REQUIRE_ALL_RANKS(x.bits() == y.bits());
  }
  // A host set of the same shape is another set: refused, naming why.
  hma::PeriodicAverager c(MPI_COMM_WORLD, 1, 0, o);
  DevSet d;
  d.fill(rank(), 1);
  (void)c.step(d.ps);
  hma::ParamSet hs;
  std::vector<float> hf(341);
  std::vector<double> hd(77);
  hs.add(hf);
  hs.add(hd);
  REQUIRE_ALL_RANKS(message_of([&] { (void)c.step(hs); }).find(
                        "this set has 341 f32 and 77 f64 elements in another layout of arrays "
                        "(a host ParamSet and a DeviceParamSet never share one)") != std::string::npos);
  REQUIRE_THAT(c.device_path(), Catch::Contains("; averages at level 0 (the outer optimizer): staged, whatever the above"));
}

TEST_CASE("device sets (emulated): started averages with divergence, interleaved, stay paired across ranks") {
  // start(A), then start(B) on the same averager, with ranks testing A and B different numbers
  // of times: A's divergence maximum must be issued before B's first chunk on every rank (MPI
  // pairs collectives in call order). A wrong order mismatches collectives: the timeout turns
  // a hang into a failure.
  const EmulatedDevices emulated;
  for (DevWay way : {DevWay::staged, DevWay::thread}) {
    CAPTURE(static_cast<int>(way));
    hma::AveragerOptions o = dev_options(way);
    o.divergence = true;
    o.timeout_s = 60;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    DevSet a, b;
    for (int t = 0; t < 4; ++t) {
      a.fill(rank(), 1500 + t);
      b.fill(rank(), 1600 + t);
      auto ra = avg.start(a.ps);
      if (rank() == 0)
        for (int i = 0; i < 50; ++i) (void)ra.test();
      auto rb = avg.start(b.ps);
      if (rank() == 1)
        for (int i = 0; i < 50; ++i) (void)rb.test();
      rb.wait();
      ra.wait();
      a.ps.synchronize();
      b.ps.synchronize();
      bool ok = true;
      auto check = [&](DevSet& s, int salt) {
        s.each([&](std::size_t k, auto& x) {
          using T = std::remove_reference_t<decltype(x)>;
          long double mean = 0, sp = 0;
          world_mean<T>(salt, k, mean, sp);
          const long double u = sizeof(T) == 4 ? 0x1p-24L : 0x1p-53L;
          ok = ok && std::fabs(static_cast<long double>(x) - mean) <= (size() + 1) * u * sp;
        });
      };
      check(a, 1500 + t);
      check(b, 1600 + t);
      REQUIRE_ALL_RANKS(ok);
      // Ranks may complete A and B in either order: the last one is one of the two.
      const auto d = avg.last_divergence();
      REQUIRE_ALL_RANKS(d && (d->step == 2 * t || d->step == 2 * t + 1));
    }
  }
}

TEST_CASE("device sets (emulated): outer optimizer and divergence through a test() loop") {
  const EmulatedDevices emulated;
  hma::AveragerOptions o = dev_options(DevWay::direct);
  o.divergence = true;
  o.outer = hma::OuterOptimizer{0.5, 0.5, false, std::nullopt};
  o.timeout_s = 60;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  DevSet a;
  for (int t = 0; t < 4; ++t) {
    a.fill(rank(), 1900 + t);
    auto r = avg.start(a.ps);
    while (!r.test()) {
    }
    a.ps.synchronize();
    REQUIRE_ALL_RANKS(avg.last_divergence() && avg.last_divergence()->step == t);
  }
}

TEST_CASE("device sets (emulated): the divergence metric on every path, as for host sets") {
  const EmulatedDevices emulated;
  for (DevWay way : {DevWay::staged, DevWay::direct, DevWay::thread})
    for (bool blocking : {true, false}) {
      CAPTURE(static_cast<int>(way), blocking);
      hma::AveragerOptions o = dev_options(way);
      o.divergence = true;
      hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
      DevSet s;
      for (int t = 0; t < 3; ++t) {
        s.fill(rank(), 1400 + t);
        if (blocking) {
          (void)avg.step(s.ps);
        } else {
          auto r = avg.start(s.ps);
          r.wait();
        }
        s.ps.synchronize();
        require_divergence(avg, s, 1400 + t, t);
        // The average itself is still the plain one (the metric only reads).
        bool ok = true;
        s.each([&](std::size_t k, auto& x) {
          using T = std::remove_reference_t<decltype(x)>;
          long double mean = 0, sp = 0;
          world_mean<T>(1400 + t, k, mean, sp);
          const long double u = sizeof(T) == 4 ? 0x1p-24L : 0x1p-53L;
          ok = ok && std::fabs(static_cast<long double>(x) - mean) <= (size() + 1) * u * sp;
        });
        REQUIRE_ALL_RANKS(ok);
      }
    }
}

TEST_CASE("post-local SGD through an averager: world every step before the switch; the switch in checkpoints") {
  const auto sizes = hma_test::group_sizes();
  const int node = sizes.front();  // the smallest group: a level below the world where there is one
  const std::string spec = "post:5," + std::to_string(2) + ":" + std::to_string(node) + ",4:world";
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, spec, 5);
  const std::size_t world = avg.schedule().levels().size() - 1;
  Set s(1);
  for (int t = 0; t < 12; ++t) {
    s.fill(rank(), 800 + t);
    const auto want = t < 5 ? std::optional<std::size_t>(world)
                      : t % 4 == 0 ? std::optional<std::size_t>(world)
                      : t % 2 == 0 ? std::optional<std::size_t>(0)
                                   : std::nullopt;
    REQUIRE(avg.level_now() == want);
    const bool did = avg.step(s.ps);
    REQUIRE_ALL_RANKS(did == want.has_value());
    if (want == world) {
      std::vector<double> w(static_cast<std::size_t>(size()), 1.0);
      s.require_weighted_mean(w, 800 + t, size() + 1);
    }
  }
  REQUIRE_THAT(avg.describe(), Catch::Contains("average at every step before step 5"));
  const std::string text = avg.checkpoint();
  REQUIRE_THAT(text, Catch::Contains(" post 5\n"));
  hma::HierarchicalAverager other(MPI_COMM_WORLD, "post:6," + std::to_string(2) + ":" + std::to_string(node) + ",4:world", 5);
  REQUIRE_THAT(message_of([&] { other.restore(text); }), Catch::Contains("the checkpoint is for schedule"));
}

TEST_CASE("bf16 and fp16 buffers: averaged in f32 arithmetic with 16-bit results, within the bound") {
  const int g = size();
  for (bool blocking : {true, false})
    for (std::size_t chunk : {std::size_t{0}, std::size_t{64}})
      for (bool weighted : {false, true}) {
        CAPTURE(blocking, chunk, weighted);
        hma::AveragerOptions o;
        o.chunk_bytes = chunk;
        hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
        auto weight = [&](int r) { return weighted ? 1.0 + r % 3 : 1.0; };
        avg.set_weight(weight(rank()));
        hma::ParamSet ps;
        auto zb = ps.allocate<hma::bf16>(300);
        std::vector<hma::fp16> uh(200);
        std::vector<hma::bf16> ub(77);
        ps.add(uh);
        ps.add(ub);
        auto f = ps.allocate<float>(10, 1.5f);  // mixed with f32 in one set
        auto in = [](int r, std::size_t k) { return static_cast<float>(hma_test::noise(r, 900, k)); };
        for (std::size_t k = 0; k < zb.size(); ++k) zb[k] = hma::bf16::from(in(rank(), k));
        for (std::size_t k = 0; k < uh.size(); ++k) uh[k] = hma::fp16::from(in(rank(), 300 + k));
        for (std::size_t k = 0; k < ub.size(); ++k) ub[k] = hma::bf16::from(in(rank(), 500 + k));
        REQUIRE(ps.bytes() == (300 + 200 + 77) * 2 + 40);
        REQUIRE(ps.count(hma::Dtype::bf16) == 377);
        REQUIRE_THAT(ps.describe(), Catch::Contains("bf16 377 (zero-copy 300, packed 77), fp16 200 (zero-copy 0, packed 200)"));
        if (blocking) {
          REQUIRE(avg.step(ps));
        } else {
          auto r = avg.start(ps);
          r.wait();
        }
        double W = 0;
        for (int r = 0; r < g; ++r) W += weight(r);
        bool ok = true;
        std::string first;
        auto expect = [&](float got, std::size_t k, bool is_bf16) {
          long double mean = 0, sp = 0;
          for (int r = 0; r < g; ++r) {
            const float x = is_bf16 ? hma::bf16::from(in(r, k)).to_float() : hma::fp16::from(in(r, k)).to_float();
            mean += weight(r) * x;
            sp += std::fabs(weight(r) * x);
          }
          mean /= W;
          sp /= W;
          const double u = is_bf16 ? 0x1p-8 : 0x1p-11;
          const long double bound = (g == 1 ? 0 : g * (u + 0x1p-23) * 1.01) * sp + (g == 1 ? 0 : g * 0x1p-25);
          if (std::fabs(got - mean) > bound && ok) {
            ok = false;
            first = "element " + std::to_string(k) + ": got " + std::to_string(got) + ", mean " +
                    std::to_string(static_cast<double>(mean));
          }
        };
        for (std::size_t k = 0; k < zb.size(); ++k) expect(zb[k].to_float(), k, true);
        for (std::size_t k = 0; k < uh.size(); ++k) expect(uh[k].to_float(), 300 + k, false);
        for (std::size_t k = 0; k < ub.size(); ++k) expect(ub[k].to_float(), 500 + k, true);
        INFO(first);
        REQUIRE_ALL_RANKS(ok);
        REQUIRE_ALL_RANKS(f[3] == 1.5f);  // the f32 array averaged alongside (equal values)
        std::vector<std::uint16_t> bits;
        for (auto x : zb) bits.push_back(x.bits);
        for (auto x : uh) bits.push_back(x.bits);
        for (auto x : ub) bits.push_back(x.bits);
        auto root = bits;
        MPI_Bcast(root.data(), static_cast<int>(root.size()), MPI_UINT16_T, 0, MPI_COMM_WORLD);
        REQUIRE_ALL_RANKS(root == bits);
      }
}

TEST_CASE("bf16 and fp16 buffers: the non-finite guard, layouts that differ, and what they refuse", "[np>=2]") {
  using Catch::Contains;
  {
    hma::AveragerOptions o;
    o.nonfinite = hma::NonFinite::error;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    hma::ParamSet ps;
    auto h = ps.allocate<hma::fp16>(8, hma::fp16::from(1.0f));
    if (rank() == size() - 1) h[5] = hma::fp16::from(70000.0f);  // overflows to infinity
    REQUIRE_THROWS_ALL_RANKS(hma::NonFiniteError, (void)avg.step(ps), "non-finite values (NaN or Inf) on world rank(s) " + std::to_string(size() - 1));
  }
  {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
    hma::ParamSet ps;
    if (rank() == 0) (void)ps.allocate<hma::bf16>(8);
    else (void)ps.allocate<hma::fp16>(8);
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, (void)avg.step(ps), "buffer layout");
  }
  {
    hma::AveragerOptions o;
    o.divergence = true;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    hma::ParamSet ps;
    (void)ps.allocate<hma::bf16>(8);
    REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, (void)avg.step(ps),
                             "the outer optimizer and the divergence metric work on f32 and f64 arrays");
  }
}

TEST_CASE("outer optimizer: ranks that wait at different times still take the same steps", "[np>=2]") {
  // Rank 0 waits for A before starting B, the others start B first: legal (waits are local). An
  // average at the outer level completes the one before it, so all ranks see the same state.
  for (bool same_layout : {true, false}) {
    CAPTURE(same_layout);
    hma::AveragerOptions o;
    o.outer = hma::OuterOptimizer{0.5, 0.5, false, std::nullopt};
    o.timeout_s = 30;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    hma::ParamSet A, B;
    std::vector<float> a(8), b(same_layout ? 8 : 4);
    A.add(a);
    B.add(b);
    for (auto& x : a) x = 1.0f + static_cast<float>(rank());
    for (auto& x : b) x = 10.0f + static_cast<float>(rank());
    std::string msg = "no error";
    try {
      hma::Request ra = avg.start(A);
      if (rank() == 0) ra.wait();
      hma::Request rb = avg.start(B);
      rb.wait();
      ra.wait();
    } catch (const std::exception& e) {
      msg = e.what();
    }
    if (same_layout) {
      REQUIRE_ALL_RANKS(msg == "no error");
      float root = b[0];
      MPI_Bcast(&root, 1, MPI_FLOAT, 0, MPI_COMM_WORLD);
      REQUIRE_ALL_RANKS(root == b[0]);
    } else {
      REQUIRE_ALL_RANKS(msg.find("holds the state of another set") != std::string::npos);
    }
  }
}

TEST_CASE("outer optimizer below the world: each group's state in the checkpoint, restored", "[np_even>=4]") {
  hma::AveragerOptions o;
  o.outer = hma::OuterOptimizer{0.7, 0.9, false, 0};
  hma::HierarchicalAverager a(MPI_COMM_WORLD, {{1, 2}, {4, size()}}, 0, o);
  Set x(1), y(1);
  for (int t = 1; t < 4; ++t) {  // level 0 at steps 1, 2, 3: anchors differ between groups
    a.set_step(t);
    x.fill(rank(), 1000 + t);
    (void)a.step(x.ps);
  }
  const std::string text = a.checkpoint();
  hma::HierarchicalAverager b(MPI_COMM_WORLD, {{1, 2}, {4, size()}}, 0, o);
  REQUIRE_ALL_RANKS(message_of([&] { b.restore(text); }) == "no error");
  // Rank 0's checkpoint restored everywhere (the habit of "rank 0 saves"): the other groups refuse.
  std::string zero = text;
  int len = static_cast<int>(zero.size());
  MPI_Bcast(&len, 1, MPI_INT, 0, MPI_COMM_WORLD);
  zero.resize(static_cast<std::size_t>(len));
  MPI_Bcast(zero.data(), len, MPI_CHAR, 0, MPI_COMM_WORLD);
  hma::HierarchicalAverager c(MPI_COMM_WORLD, {{1, 2}, {4, size()}}, 0, o);
  REQUIRE_ALL_RANKS(message_of([&] { c.restore(zero); }).find("belongs to group 0 of level 0") != std::string::npos);
  a.set_step(5);
  b.set_step(5);
  x.fill(rank(), 1005);
  y.fill(rank(), 1005);
  (void)a.step(x.ps);
  (void)b.step(y.ps);
  REQUIRE_ALL_RANKS(x.bits() == y.bits());
}

TEST_CASE("checkpoint() refuses while an average at the outer level is in flight") {
  hma::AveragerOptions o;
  o.outer = hma::OuterOptimizer{0.7, 0.9, true, std::nullopt};
  // Without the agreement check start() does not wait for the group: rank 0 starts and asks for
  // a checkpoint before the others have started, so its average cannot have completed (a small
  // one may complete inside start() once every rank has started: MPICH does). The others start
  // after the barrier (on another communicator than the averager's); theirs may or may not be
  // done when they ask, and either answer is right.
  o.check_every_average = false;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  Set s(1);
  s.fill(rank(), 1);
  const std::string in_flight = "is still in flight: wait() for it first";
  std::optional<hma::Request> r;
  std::string msg;
  if (rank() == 0) {
    r = avg.start(s.ps);
    msg = message_of([&] { (void)avg.checkpoint(); });
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank() != 0) {
    r = avg.start(s.ps);
    msg = message_of([&] { (void)avg.checkpoint(); });
  }
  r->wait();
  REQUIRE_ALL_RANKS(size() == 1 || msg.find(in_flight) != std::string::npos ||
                    (rank() != 0 && msg == "no error"));
  REQUIRE_ALL_RANKS(message_of([&] { (void)avg.checkpoint(); }) == "no error");
}

TEST_CASE("device sets (emulated): weighted averages, blocking and start/wait, staged and direct") {
  namespace hd = hma::detail;
  const EmulatedDevices emulated;
  const int g = size();
  auto weight = [](int r) { return 1.0 + (r * 3) % 5; };
  double W = 0;
  for (int r = 0; r < g; ++r) W += weight(r);
  for (bool direct : {false, true})
    for (bool blocking : {true, false}) {
      CAPTURE(direct, blocking);
      hma::AveragerOptions o;
      if (direct) {
        o.cuda_aware = true;
        o.device_path = hma::DevicePath::direct;
      }
      hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
      avg.set_weight(weight(rank()));
      hma::DeviceParamSet ps;
      auto f = ps.allocate<float>(300);  // emulation: device memory is host memory
      std::vector<double> u(77);
      ps.add(u.data(), u.size());
      for (std::size_t k = 0; k < f.size(); ++k) f.data()[k] = static_cast<float>(hma_test::noise(rank(), 1100, k));
      for (std::size_t k = 0; k < u.size(); ++k) u[k] = hma_test::noise(rank(), 1100, 300 + k);
      if (blocking) {
        (void)avg.step(ps);
      } else {
        auto r = avg.start(ps);
        r.wait();
      }
      ps.synchronize();
      bool ok = true;
      auto expect = [&](long double got, std::size_t k, bool is_float) {
        long double sum = 0, mag = 0;
        for (int r = 0; r < g; ++r) {
          const long double x = is_float ? static_cast<float>(hma_test::noise(r, 1100, k)) : hma_test::noise(r, 1100, k);
          sum += weight(r) * x;
          mag += std::fabs(weight(r) * x);
        }
        const long double u_ = is_float ? 0x1p-24L : 0x1p-53L;
        ok = ok && std::fabs(got - sum / W) <= (g + 1) * u_ * mag / W;
      };
      for (std::size_t k = 0; k < f.size(); ++k) expect(f.data()[k], k, true);
      for (std::size_t k = 0; k < u.size(); ++k) expect(u[k], 300 + k, false);
      REQUIRE_ALL_RANKS(ok);
    }
}
