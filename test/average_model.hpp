// The averaging tests' model (test/test_average.cpp): order-proof values (multiples of 6), a
// ParamSet with zero-copy and packed arrays of both dtypes, the schedule the test configured,
// and run_schedule(), which steps an averager and checks every step's level (from torch's rule,
// torch_schedule.hpp) and every value on every rank.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "hma/hma.hpp"
#include "mpi_test.hpp"
#include "torch_schedule.hpp"

namespace hma_test {


// Value of element i on rank r at step t: a multiple of 6 in [-48, 48], so x / g is exact for
// g in {1, 2, 3, 4, 6, 8} and every partial sum is exact in float: averages are exact whatever
// order MPI sums in.
inline double value(int r, std::int64_t t, std::size_t i) {
  return 6.0 * static_cast<double>((r * 7 + static_cast<std::int64_t>(i) * 3 + t * 5) % 17 - 8);
}

// The exact average of element i at step t over the contiguous block of g ranks holding r.
inline double block_mean(int r, int g, std::int64_t t, std::size_t i) {
  const int first = r / g * g;
  double sum = 0;
  for (int m = first; m < first + g; ++m) sum += value(m, t, i);
  return sum / g;
}

// Powers of two below the world size, then the world: the levels a test schedule uses.
inline std::vector<int> group_sizes() {
  std::vector<int> g;
  for (int s = 2; s < size(); s *= 2)
    if (size() % s == 0) g.push_back(s);
  g.push_back(size());
  return g;
}

enum class Mode { blocking, start_wait, start_test };

// What the test configured: the schedule's kind, levels and warmup, as the test wrote them.
struct Plan {
  bool periodic;
  std::vector<hma::Level> levels;
  std::int64_t warmup;
  std::vector<std::optional<std::size_t>> torch(std::int64_t steps) const {
    std::vector<std::int64_t> periods;
    for (const auto& l : levels) periods.push_back(l.period);
    return hma_test::torch_levels(periodic, periods, warmup, steps);
  }
};

// The emulated ranks per node of this run (HMA_RANKS_PER_NODE), for the [nodes] tests.
inline int ranks_per_node() {
  const int rpn = std::getenv("HMA_RANKS_PER_NODE") ? std::atoi(std::getenv("HMA_RANKS_PER_NODE")) : 0;
  INFO("a [nodes] test needs HMA_RANKS_PER_NODE giving at least two emulated nodes (test/meson.build)");
  REQUIRE_ALL_RANKS(rpn > 0 && rpn < size() && size() % rpn == 0);
  return rpn;
}

// Arrays of several kinds and both dtypes in one ParamSet.
struct Model {
  hma::ParamSet ps;
  hma::Array<float> wf;   // zero-copy
  hma::Array<double> wd;  // zero-copy
  std::vector<float> uf1, uf2;
  std::vector<double> ud;
  explicit Model(bool zero_copy, bool packed) {
    if (zero_copy) {
      wf = ps.allocate<float>(37);
      wd = ps.allocate<double>(5);
    }
    if (packed) {
      uf1.resize(3);
      uf2.resize(64);
      ud.resize(11);
      ps.add(std::span<float>(uf1));
      ps.add(uf2);
      ps.add(ud);
    }
  }
  // Calls fn(element value reference, index within a global numbering) over every element.
  template <class F>
  void each(F&& fn) {
    std::size_t k = 0;
    for (auto& x : wf) fn(x, k++);
    for (auto& x : wd) fn(x, k++);
    for (auto& x : uf1) fn(x, k++);
    for (auto& x : uf2) fn(x, k++);
    for (auto& x : ud) fn(x, k++);
  }
  void fill(int r, std::int64_t t) {
    each([&](auto& x, std::size_t i) { x = static_cast<std::remove_reference_t<decltype(x)>>(value(r, t, i)); });
  }
  // Number of elements that differ from the expected value (exact comparison).
  int mismatches(int r, std::int64_t t, std::optional<int> group) {
    int bad = 0;
    each([&](auto& x, std::size_t i) {
      const double want = group ? block_mean(r, *group, t, i) : value(r, t, i);
      bad += static_cast<double>(x) != want;
    });
    return bad;
  }
};

inline void run_schedule(hma::Averager& avg, const Plan& plan, Model& m, Mode mode, std::int64_t steps, int& averaged) {
  const auto want = plan.torch(avg.step_count() + steps);
  for (std::int64_t k = 0; k < steps; ++k) {
    const std::int64_t t = avg.step_count();
    m.fill(rank(), t);
    const std::optional<std::size_t> lvl = want[static_cast<std::size_t>(t)];
    const std::optional<int> g = lvl ? std::optional<int>(plan.levels[*lvl].group_size) : std::nullopt;
    CAPTURE(t, lvl, static_cast<int>(mode));
    REQUIRE_ALL_RANKS(avg.level_now() == lvl);
    if (mode == Mode::blocking) {
      REQUIRE_ALL_RANKS(avg.step(m.ps) == lvl.has_value());
    } else {
      auto req = avg.start(m.ps);
      const bool active = req.active(), right_level = req.level() == lvl;
      if (mode == Mode::start_wait) {
        req.wait();
      } else {
        while (!req.test()) {
        }
      }
      INFO("active at start " << active << ", right level " << right_level << ", active after " << req.active()
                               << ", in flight after " << m.ps.in_flight());
      // A step without an average (or over one rank) gives an empty request; one with an average
      // may already be complete when start() returns (MPICH often finishes small ones there).
      REQUIRE_ALL_RANKS((!active || (g.has_value() && *g > 1)) && right_level && !req.active() && !m.ps.in_flight());
    }
    REQUIRE_ALL_RANKS(avg.step_count() == t + 1);
    averaged += lvl.has_value();
    REQUIRE_ALL_RANKS(m.mismatches(rank(), t, g) == 0);
  }
}


}  // namespace hma_test
