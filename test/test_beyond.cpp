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
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "beyond_model.hpp"
#include "hma/hma.hpp"
#include "mpi_test.hpp"

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
  }
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
