// Reliability: timeouts instead of hangs, non-finite guards, checkpoints, and a matrix of bad
// inputs, each raising a clear error on every rank.
#include <chrono>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include "hma/hma.hpp"
#include "mpi_test.hpp"

using hma_test::rank;
using hma_test::size;

namespace {
bool thread_multiple() {
  int provided = 0;
  MPI_Query_thread(&provided);
  return provided >= MPI_THREAD_MULTIPLE;
}
}  // namespace

TEST_CASE("a rank that joins late gives hma::Timeout naming the group, and the wait can resume") {
  if (size() < 2) return;
  std::vector<hma::Progress> modes = {hma::Progress::poll};
  if (thread_multiple()) modes.push_back(hma::Progress::thread);
  for (auto progress : modes) {
    CAPTURE(static_cast<int>(progress));
    hma::AveragerOptions o;
    o.timeout_s = 0.3;
    o.progress = progress;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    hma::ParamSet ps;
    auto w = ps.allocate<double>(1000, 1.0);
    REQUIRE(avg.step(ps));  // step 0, all present: also runs the (blocking) layout check
    std::fill(w.begin(), w.end(), 2.0 * rank());
    const int late = size() - 1;
    int timeouts = 0;
    std::string msg;
    std::vector<int> ranks;
    if (rank() == late) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1200));
      avg.step(ps);  // the others are still waiting for it: completes
    } else {
      try {
        avg.step(ps);
      } catch (const hma::Timeout& e) {
        ++timeouts;
        msg = e.what();
        ranks = e.ranks();
        REQUIRE(e.level() == 0);
        REQUIRE(e.step() == 1);
        REQUIRE(e.bytes() == 8000);
      }
      REQUIRE(ps.in_flight());
      while (ps.in_flight()) {
        try {
          ps.wait();
        } catch (const hma::Timeout&) {
          ++timeouts;
        }
      }
    }
    INFO(msg);
    REQUIRE_ALL_RANKS(rank() == late || timeouts >= 1);
    REQUIRE_ALL_RANKS(rank() == late ||
                      msg.find("step 1: the average over level 0 (group of " + std::to_string(size()) +
                               " ranks, world ranks 0-" + std::to_string(size() - 1) +
                               ", 8000 bytes) did not complete within 0.3 s") != std::string::npos);
    REQUIRE_ALL_RANKS(rank() == late || static_cast<int>(ranks.size()) == size());
    // The late average completed everywhere, with the right values.
    REQUIRE_ALL_RANKS(w[0] == static_cast<double>(size() - 1) && w[999] == w[0]);
    REQUIRE(avg.step_count() == 2);
  }
}

TEST_CASE("a Request waited with a timeout completes normally when everyone is there") {
  hma::AveragerOptions o;
  o.timeout_s = 30;
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, {{1, size()}}, 0, o);
  hma::ParamSet ps;
  std::vector<float> v(300, static_cast<float>(2 * rank()));
  ps.add(v);
  for (int t = 0; t < 3; ++t) {
    std::fill(v.begin(), v.end(), static_cast<float>(2 * rank()));
    if (t == 1) {
      auto r = avg.start(ps);
      r.wait();
    } else {
      REQUIRE(avg.step(ps));
    }
    REQUIRE_ALL_RANKS(v[0] == static_cast<float>(size() - 1) && v[299] == v[0]);
  }
}
