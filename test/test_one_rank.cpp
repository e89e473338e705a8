// The divergence matrix, part 2 (issue 25): one rank's mistake. A bad argument on one rank (a
// level out of range, a NULL set through the C API, a device set where the others pass host sets)
// is an error on EVERY rank of the group at once, carried by the agreement check, never a wait
// for HMA_TIMEOUT_S. Also: set_step() is local and bounded, and an averager destroyed after a
// Timeout leaks what its worker thread may still write when a late peer completes the average.
// Needs 2+ ranks: test/meson.build runs it at 2, 3, 4.
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "device/device_backend.hpp"
#include "hma/hma.h"
#include "hma/hma.hpp"
#include "mpi_test.hpp"

using hma_test::rank;
using hma_test::size;
using hma_test::thread_multiple;

namespace {

struct Config {
  bool hierarchical = false;
  bool thread = false;
  [[nodiscard]] std::string name() const {
    return std::string(hierarchical ? "hierarchical" : "flat") + (thread ? ", thread" : ", poll");
  }
};

std::vector<Config> configs() {
  std::vector<Config> out;
  for (bool h : {false, true})
    for (bool t : {false, true})
      if (!t || thread_multiple()) out.push_back({h, t});
  return out;
}

// A long timeout: an error that arrives within a second came from the check, not the timeout.
constexpr double kTimeout = 5;

std::unique_ptr<hma::Averager> make(const Config& c) {
  hma::AveragerOptions o;
  o.timeout_s = kTimeout;
  o.progress = c.thread ? hma::Progress::thread : hma::Progress::poll;
  if (c.hierarchical)
    return std::make_unique<hma::HierarchicalAverager>(
        MPI_COMM_WORLD, std::vector<hma::Level>{{1, size() % 2 == 0 ? 2 : 1}, {2, size()}}, 0, o);
  return std::make_unique<hma::PeriodicAverager>(MPI_COMM_WORLD, 1, 0, o);
}

// What one rank saw: the exception's message (empty: none) and how long the call took.
struct Seen {
  std::string what;
  bool invalid = false;
  double seconds = 0;
};

Seen run(const std::function<void()>& body) {
  Seen s;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    body();
  } catch (const hma::InvalidArgument& e) {
    s.what = e.what();
    s.invalid = true;
  } catch (const std::exception& e) {
    s.what = std::string("other: ") + e.what();
  }
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

// Every rank threw hma::InvalidArgument containing `needle`, within a second.
void require_invalid_everywhere(const Seen& s, const std::string& needle) {
  INFO("rank " << rank() << " after " << s.seconds << " s: " << s.what);
  REQUIRE_ALL_RANKS(s.invalid && s.what.find(needle) != std::string::npos);
  REQUIRE_ALL_RANKS(s.seconds < 1.0);
}

}  // namespace

TEST_CASE("one rank: a level out of range is an error on every rank at once", "[np>=2]") {
  const int bad = size() - 1;
  for (const Config& c : configs()) {
    CAPTURE(c.name());
    auto avg = make(c);
    std::vector<float> v(6, static_cast<float>(6 * rank()));
    hma::ParamSet ps;
    ps.add(v);
    const std::size_t top = avg->schedule().levels().size() - 1;
    for (bool blocking : {true, false}) {
      const std::size_t level = rank() == bad ? 5 : top;
      const Seen s = run([&] {
        if (blocking) avg->average(ps, level);
        else avg->start_average(ps, level).wait();
      });
      require_invalid_everywhere(s, "world rank " + std::to_string(bad) +
                                        " passed an invalid argument: level 5 out of range: this averager has "
                                        "levels 0 to " + std::to_string(top) + "; nothing was averaged");
      REQUIRE_ALL_RANKS(v[0] == static_cast<float>(6 * rank()));  // nothing moved
    }
    // The group goes on: the next average with good arguments works.
    avg->average(ps, top);
    REQUIRE_ALL_RANKS(v[0] == static_cast<float>(3 * (size() - 1)));
  }
}

TEST_CASE("one rank: a NULL set through the C API is an error on every rank at once", "[np>=2]") {
  const int bad = size() - 1;
  hma_options o;
  hma_options_init(&o);
  o.timeout_s = kTimeout;
  hma_averager avg = nullptr;
  REQUIRE(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, &o, &avg) == HMA_OK);
  hma_paramset ps = nullptr;
  REQUIRE(hma_paramset_create(&ps) == HMA_OK);
  std::vector<double> v(4, 6.0 * rank());
  REQUIRE(hma_paramset_add_double(ps, v.data(), v.size()) == HMA_OK);
  hma_paramset mine = rank() == bad ? nullptr : ps;
  const std::vector<std::pair<std::string, std::function<hma_status()>>> calls = {
      {"hma_step", [&] { return hma_step(avg, mine, nullptr); }},
      {"hma_average", [&] { return hma_average(avg, mine, 0); }},
      {"hma_start", [&] {
         hma_request r = nullptr;
         const hma_status st = hma_start(avg, mine, &r);
         if (st == HMA_OK) hma_request_free(&r);
         return st;
       }},
      {"hma_start_average", [&] {
         hma_request r = nullptr;
         const hma_status st = hma_start_average(avg, mine, 0, &r);
         if (st == HMA_OK) hma_request_free(&r);
         return st;
       }},
  };
  for (const auto& [fn, call] : calls) {
    CAPTURE(fn);
    const auto t0 = std::chrono::steady_clock::now();
    const hma_status st = call();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string what = hma_last_error();
    INFO("rank " << rank() << ": status " << st << " after " << secs << " s: " << what);
    REQUIRE_ALL_RANKS(st == HMA_ERR_INVALID_ARGUMENT);
    REQUIRE_ALL_RANKS(what.find("world rank " + std::to_string(bad) + " passed an invalid argument: " + fn +
                                ": ps is NULL") != std::string::npos);
    REQUIRE_ALL_RANKS(secs < 1.0);
  }
  std::int64_t step = -1;
  REQUIRE(hma_step_count(avg, &step) == HMA_OK);
  REQUIRE_ALL_RANKS(step == 0);  // a refused step is not taken, on any rank
  REQUIRE_ALL_RANKS(v[0] == 6.0 * rank());
  REQUIRE(hma_step(avg, ps, nullptr) == HMA_OK);  // all good again
  REQUIRE_ALL_RANKS(v[0] == 3.0 * (size() - 1));
  REQUIRE(hma_paramset_free(&ps) == HMA_OK);
  REQUIRE(hma_averager_free(&avg) == HMA_OK);
}

TEST_CASE("one rank: a device set where the others pass host sets is an error on every rank at once", "[np>=2]") {
  const int odd = size() - 1;
  for (const Config& c : configs()) {
    CAPTURE(c.name());
    auto avg = make(c);
    std::vector<float> v(6, static_cast<float>(rank()));
    hma::ParamSet host;
    host.add(v);
    hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend());
    hma::DeviceParamSet dev;
    hma::detail::set_device_backend_for_testing(nullptr);
    dev.add(v.data(), v.size());
    const auto t0 = std::chrono::steady_clock::now();
    std::string what = "did not throw";
    bool mismatch = false;
    try {
      if (rank() == odd) avg->step(dev);
      else avg->step(host);
    } catch (const hma::MismatchError& e) {
      what = e.what();
      mismatch = true;
    } catch (const std::exception& e) {
      what = e.what();
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    INFO("rank " << rank() << " after " << secs << " s: " << what);
    // The kind of set is part of the check's header: a mismatch named on every rank of the group.
    REQUIRE_ALL_RANKS(mismatch && what.find("a DeviceParamSet on world rank " + std::to_string(odd)) != std::string::npos);
    REQUIRE_ALL_RANKS(secs < 1.0);
  }
}

TEST_CASE("set_step is local, bounded, and checked at the next average", "[np>=2]") {
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  hma::ParamSet ps;
  std::vector<float> v(2, static_cast<float>(rank()));
  ps.add(v);
  // Local: one rank alone sets it (nothing waits), then sets it back.
  if (rank() == 0) {
    avg.set_step(1000);
    avg.set_step(0);
  }
  // The counter can never overflow: steps beyond 2^62 are refused.
  for (std::int64_t bad : {std::numeric_limits<std::int64_t>::max(), hma::kMaxStep + 1, std::int64_t{-1}}) {
    REQUIRE_THROWS_WITH(avg.set_step(bad), Catch::Contains("hma: set_step: step must be between 0 and 2^62 (4611686018427387904), got " +
                                                           std::to_string(bad)));
  }
  REQUIRE(avg.step_count() == 0);
  // At the limit step() refuses to count on: on every rank alike (they hold the same step).
  avg.set_step(hma::kMaxStep);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, avg.step(ps), "the step counter is at hma's limit of 2^62");
  REQUIRE_ALL_RANKS(avg.step_count() == hma::kMaxStep);
  const std::string cp = avg.checkpoint();  // its own checkpoint still reads back
  hma::PeriodicAverager again(MPI_COMM_WORLD, 1, 0);
  again.restore(cp);
  REQUIRE_ALL_RANKS(again.step_count() == hma::kMaxStep);
  // A different step on one rank: the next average fails on every rank, naming both steps.
  avg.set_step(rank() == 0 ? 7 : 8);
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps), "step counter: step 7 on world rank 0, step 8 on world rank");
}

TEST_CASE("an averager destroyed after a Timeout leaks what its worker still writes; a late peer completes safely",
          "[np=2]") {
  // Rank 1's check passes (rank 0 contributed before it timed out), so its progress thread runs
  // the ring and blocks for rank 0's data; rank 1 times out and destroys its averager and set.
  // Only then does rank 0 resume (params.wait()): the ring completes, and rank 1's leaked worker
  // writes into the averager's scratch buffer. That buffer must have been leaked with the worker:
  // freed, ASan (tools/test --sanitize) reports the write, and in a plain build the write lands
  // in the blocks allocated right after the destruction (same sizes: malloc reuses the freed
  // one), whose contents are checked.
  if (!thread_multiple()) FAIL("needs MPI_THREAD_MULTIPLE");
  hma::AveragerOptions o;
  o.timeout_s = 0.3;
  o.progress = hma::Progress::thread;
  o.reduction = hma::Reduction::ring;
  auto avg = std::make_unique<hma::PeriodicAverager>(MPI_COMM_WORLD, 1, 0, o);
  std::vector<float> v(64, static_cast<float>(6 * rank() + 6));
  auto ps = std::make_unique<hma::ParamSet>();
  ps->add(v);
  avg->step(*ps);  // both present: the worker's scratch is sized (33 floats)
  std::fill(v.begin(), v.end(), static_cast<float>(6 * rank() + 6));
  MPI_Barrier(MPI_COMM_WORLD);
  constexpr int kDestroyed = 4201, kDone = 4202;
  bool rank0_timed_out = false, rank1_timed_out = false, sentinels_intact = true;
  if (rank() == 0) {
    try {
      (void)avg->start(*ps);  // rank 1 comes 0.6 s later: Timeout in the check
    } catch (const hma::Timeout&) {
      rank0_timed_out = true;
    }
    MPI_Recv(nullptr, 0, MPI_BYTE, 1, kDestroyed, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    hma_test::wait_through_timeouts(*ps);  // the late peer: completes rank 1's blocked ring
    MPI_Send(nullptr, 0, MPI_BYTE, 1, kDone, MPI_COMM_WORLD);
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds(600));
    hma::Request r = avg->start(*ps);  // rank 0's contribution to the check is there: passes
    try {
      r.wait();  // the worker waits in the ring for rank 0, which is not there
    } catch (const hma::Timeout&) {
      rank1_timed_out = true;
    }
    avg.reset();  // leaks the worker, still blocked in the ring
    // Blocks of the sizes just freed, filled with a sentinel: where the scratch buffer lay.
    std::vector<std::vector<float>> sentinels;
    for (std::size_t n = 1; n <= 80; ++n)
      for (int k = 0; k < 4; ++k) sentinels.emplace_back(n, -1.0f);
    ps.reset();
    MPI_Send(nullptr, 0, MPI_BYTE, 0, kDestroyed, MPI_COMM_WORLD);
    MPI_Recv(nullptr, 0, MPI_BYTE, 0, kDone, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the leaked worker finishes
    for (const auto& s : sentinels)
      for (float x : s) sentinels_intact = sentinels_intact && x == -1.0f;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  REQUIRE_ALL_RANKS(rank() == 0 ? rank0_timed_out : rank1_timed_out);
  REQUIRE_ALL_RANKS(sentinels_intact);
  // The late peer got the true average: rank 1's leaked set still held its data.
  REQUIRE_ALL_RANKS(rank() == 1 || (v[0] == 9.0f && v[63] == 9.0f));
}
