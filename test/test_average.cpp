// Averaging: exact values for every level, blocking and non-blocking, zero-copy and packed,
// float and double, at whatever rank count mpirun gives (1, 2, 3, 4, 6, 8; nodes emulated with
// HMA_RANKS_PER_NODE). Expected values are computed from the communicator size; the expected
// level of each step from torch's rule transcribed in torch_schedule.hpp, never from
// hma::Schedule. Tests that need a rank count or a setup say so in a tag, and test/meson.build
// runs them only there: [np>=2], [np=3], [nodes] (HMA_RANKS_PER_NODE giving >= 2 emulated nodes),
// [cluster] (under tools/cluster). Run elsewhere they fail; they never pass without checking.
#include <cstdlib>
#include <numeric>
#include <optional>
#include <thread>
#include <vector>

#include "hma/hma.hpp"
#include "average_model.hpp"
#include "mpi_test.hpp"

using hma_test::rank;
using hma_test::size;
using hma_test::block_mean;
using hma_test::group_sizes;
using hma_test::Mode;
using hma_test::Model;
using hma_test::Plan;
using hma_test::ranks_per_node;
using hma_test::run_schedule;
using hma_test::value;

TEST_CASE("hierarchical averaging is exact on every level, every mode and buffer kind") {
  const auto sizes = group_sizes();
  std::vector<hma::Level> levels;
  std::int64_t period = 1;
  for (int g : sizes) {
    levels.push_back({period, g});
    period *= 3;  // 1, 3, 9, 27: every level gets used within 30 steps
  }
  for (std::int64_t warmup : {0, 4}) {
    for (Mode mode : {Mode::blocking, Mode::start_wait, Mode::start_test}) {
      for (auto [zero_copy, packed] : {std::pair{true, false}, {false, true}, {true, true}}) {
        CAPTURE(warmup, static_cast<int>(mode), zero_copy, packed);
        hma::HierarchicalAverager avg(MPI_COMM_WORLD, levels, warmup);
        Model m(zero_copy, packed);
        int averaged = 0;
        run_schedule(avg, {false, levels, warmup}, m, mode, 30, averaged);
        // periods 1, 3, 9, 27 from step 0 (or 4): every step averages at some level
        REQUIRE_ALL_RANKS(averaged == 30 - static_cast<int>(warmup));
      }
    }
  }
}

TEST_CASE("chunked blocking averages are exact for any chunk size and reduction, across array boundaries") {
  std::vector<hma::Level> levels;
  std::int64_t period = 1;
  for (int g : group_sizes()) {
    levels.push_back({period, g});
    period *= 2;
  }
  // 0: one piece; 4 bytes: one element per piece (also for double); 12, 40, 256: pieces that
  // end inside arrays and span several.
  for (std::size_t chunk : {0, 4, 12, 40, 256}) {
    for (auto [zero_copy, packed] : {std::pair{true, false}, {false, true}, {true, true}}) {
      for (auto reduction : {hma::Reduction::mpi, hma::Reduction::ring, hma::Reduction::automatic}) {
        CAPTURE(chunk, zero_copy, packed, static_cast<int>(reduction));
        hma::AveragerOptions o;
        o.chunk_bytes = chunk;
        o.reduction = reduction;
        hma::HierarchicalAverager avg(MPI_COMM_WORLD, levels, 0, o);
        Model m(zero_copy, packed);
        int averaged = 0;
        run_schedule(avg, {false, levels, 0}, m, Mode::blocking, 9, averaged);
        REQUIRE_ALL_RANKS(averaged == 9);
      }
    }
  }
}

TEST_CASE("average() and start_average() average a level now, outside the schedule") {
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, {{1000, size()}}, 0);
  const std::size_t top = avg.schedule().levels().size() - 1;
  Model m(true, true);
  for (std::int64_t t = 0; t < 3; ++t) {
    m.fill(rank(), t);
    if (t % 2 == 0) {
      avg.average(m.ps, top);
    } else {
      auto r = avg.start_average(m.ps, top);
      r.wait();
    }
    REQUIRE_ALL_RANKS(m.mismatches(rank(), t, size()) == 0);
  }
  REQUIRE_ALL_RANKS(avg.step_count() == 0);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, avg.average(m.ps, 5), "level 5 out of range");
}

TEST_CASE("periodic averaging with warmup is exact") {
  for (Mode mode : {Mode::blocking, Mode::start_wait}) {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 3, 2);
    Model m(true, true);
    int averaged = 0;
    run_schedule(avg, {true, {{3, size()}}, 2}, m, mode, 20, averaged);
    REQUIRE_ALL_RANKS(averaged == 6);  // steps 2, 5, 8, 11, 14, 17
  }
}

TEST_CASE("a schedule string with node and world levels follows the emulated nodes", "[nodes]") {
  const int rpn = ranks_per_node();
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, "2:node,4:world", 0);
  const auto& h = avg.hierarchy();
  REQUIRE_ALL_RANKS(avg.schedule().levels()[0].group_size == rpn && h.emulated_nodes() &&
                    h.ranks_per_node() == rpn && h.num_nodes() == size() / rpn &&
                    h.node_index() == rank() / rpn && h.node().size() == rpn && h.node().rank() == rank() % rpn &&
                    h.inter_node().size() == size() / rpn && h.inter_node().rank() == rank() / rpn);
  Model m(true, false);
  int averaged = 0;
  run_schedule(avg, {false, {{2, rpn}, {4, size()}}, 0}, m, Mode::blocking, 9, averaged);
  REQUIRE_ALL_RANKS(averaged == 5);  // steps 0, 2, 4, 6, 8
}

TEST_CASE("hierarchy: contiguous blocks per level, shared communicators, world duplicated") {
  const auto sizes = group_sizes();
  std::vector<int> with_dup = sizes;
  with_dup.push_back(sizes.front());
  hma::Hierarchy h(MPI_COMM_WORLD, with_dup);
  REQUIRE_ALL_RANKS(h.member() && h.world().size() == size() && h.world().get() != MPI_COMM_WORLD &&
                    h.num_levels() == with_dup.size());
  for (std::size_t i = 0; i < with_dup.size(); ++i) {
    const int g = with_dup[i];
    CAPTURE(i, g);
    REQUIRE_ALL_RANKS(h.level(i).size() == g && h.level(i).rank() == rank() % g);
    // The block really holds ranks [k*g, (k+1)*g): the sum of world ranks over the level.
    int r = rank(), sum = 0;
    MPI_Allreduce(&r, &sum, 1, MPI_INT, MPI_SUM, h.level(i).get());
    const int first = rank() / g * g;
    REQUIRE_ALL_RANKS(sum == g * first + g * (g - 1) / 2);
  }
  REQUIRE(&h.level(0) == &h.level(with_dup.size() - 1));  // equal sizes share one communicator
  REQUIRE(&h.level(sizes.size() - 1) == &h.world());
  REQUIRE_THROWS_AS(h.level(99), hma::InvalidArgument);
  REQUIRE_THAT(h.describe(), Catch::Contains("level 0: "));
}

TEST_CASE("ranks outside a periodic averager's group are untouched", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  MPI_Comm evens = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, rank() % 2 == 0 ? 0 : MPI_UNDEFINED, rank(), &evens);
  {
    hma::PeriodicAverager avg(evens, 2, 0);
    REQUIRE_ALL_RANKS(avg.member() == (rank() % 2 == 0));
    hma::ParamSet ps;
    auto w = ps.allocate<double>(4);
    for (int t = 0; t < 4; ++t) {
      for (std::size_t i = 0; i < 4; ++i) w[i] = value(rank(), t, i);
      const bool did = avg.step(ps);
      REQUIRE_ALL_RANKS(did == (rank() % 2 == 0 && t % 2 == 0));
      const int members = (size() + 1) / 2;
      bool ok = true;
      for (std::size_t i = 0; i < 4; ++i) {
        double want = value(rank(), t, i);
        if (did) {
          double sum = 0;
          for (int m = 0; m < size(); m += 2) sum += value(m, t, i);
          want = sum / members;
        }
        ok = ok && w[i] == want;
      }
      REQUIRE_ALL_RANKS(ok);
    }
    REQUIRE_ALL_RANKS(avg.step_count() == 4);
  }
  if (evens != MPI_COMM_NULL) MPI_Comm_free(&evens);
}

TEST_CASE("set_step restarts the schedule; describe reads like torch's log") {
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, {{2, 1}, {4, size()}}, 1);
  avg.set_step(8);
  REQUIRE(avg.step_count() == 8);
  REQUIRE(avg.level_now() == 1u);
  REQUIRE_THROWS_WITH(avg.set_step(-1), Catch::Contains("step must be between 0 and 2^62 (4611686018427387904), got -1"));
  const std::string d = avg.describe();
  REQUIRE_THAT(d, Catch::Contains("each group of 1 ranks averages parameters every 2 steps, if no higher level averages"));
  REQUIRE_THAT(d, Catch::Contains("each group of " + std::to_string(size()) + " ranks averages parameters every 4 steps"));
  REQUIRE_THAT(d, Catch::Contains("no averaging before step 1"));
}

TEST_CASE("an empty ParamSet and a Request moved around still complete") {
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  hma::ParamSet empty;
  REQUIRE_ALL_RANKS(avg.step(empty));
  hma::ParamSet ps;
  auto w = ps.allocate<float>(8, 2.0f * static_cast<float>(rank()));
  hma::Request r = avg.start(ps);
  hma::Request moved = std::move(r);
  REQUIRE_ALL_RANKS(!r.active());
  moved.wait();
  moved.wait();  // a second wait is a no-op
  const float want = static_cast<float>(size() - 1);  // mean of 2r over r = 0..n-1
  REQUIRE_ALL_RANKS(std::all_of(w.begin(), w.end(), [&](float x) { return x == want; }));
  {
    auto dropped = avg.start(ps);  // destructor waits
  }
  REQUIRE_ALL_RANKS(!ps.in_flight());
  REQUIRE_ALL_RANKS(std::all_of(w.begin(), w.end(), [&](float x) { return x == want; }));
}

TEST_CASE("a ParamSet moved while in flight is completed in its new place", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);  // one rank: nothing is ever in flight
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  hma::ParamSet ps;
  // 4 MiB: large enough that start() cannot already have completed it (MPICH completes small
  // averages inside start()), so the move really happens in flight.
  auto w = ps.allocate<float>(std::size_t{1} << 20, 2.0f * static_cast<float>(rank()));
  auto r2 = avg.start(ps);
  hma::ParamSet ps2 = std::move(ps);
  const bool was_in_flight = ps2.in_flight();
  r2.wait();
  REQUIRE_ALL_RANKS(was_in_flight && !ps2.in_flight());
  const float want = static_cast<float>(size() - 1);
  REQUIRE_ALL_RANKS(std::all_of(w.begin(), w.end(), [&](float x) { return x == want; }));
}

TEST_CASE("a group of 3 divides by 3 before summing, bit for bit as torch does", "[np=3]") {
  REQUIRE_ALL_RANKS(size() == 3);
  // Every rank holds the same values, so any summation order gives the same bits: the result
  // must be fl(fl(x/3) + fl(x/3)) + fl(x/3), which differs from using fl(1/3) * x for many x.
  for (auto reduction : {hma::Reduction::mpi, hma::Reduction::ring}) {
    hma::AveragerOptions o;
    o.reduction = reduction;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    hma::ParamSet ps;
    const std::size_t n = 1000;
    auto f = ps.allocate<float>(n);
    auto d = ps.allocate<double>(n);
    for (std::size_t i = 0; i < n; ++i) {
      f[i] = 1.0f + 0.001f * static_cast<float>(i);
      d[i] = 1.0 + 0.001 * static_cast<double>(i);
    }
    std::vector<float> xf(f.begin(), f.end());
    std::vector<double> xd(d.begin(), d.end());
    REQUIRE_ALL_RANKS(avg.step(ps));
    int bad = 0, discriminating = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const float qf = xf[i] / 3.0f;
      const double qd = xd[i] / 3.0;
      bad += f[i] != (qf + qf) + qf;
      bad += d[i] != (qd + qd) + qd;
      discriminating += (xf[i] * (1.0f / 3.0f)) != qf;
    }
    CAPTURE(static_cast<int>(reduction), discriminating);
    REQUIRE_ALL_RANKS(bad == 0);
    REQUIRE(discriminating > 0);  // the test can tell division from the reciprocal
  }
}

TEST_CASE("two-level averaging across emulated nodes equals the flat result exactly", "[nodes]") {
  const int rpn = ranks_per_node();
  for (auto alg : {hma::Algorithm::two_level, hma::Algorithm::flat, hma::Algorithm::automatic}) {
    for (std::size_t chunk : {std::size_t{0}, std::size_t{40}}) {
      CAPTURE(static_cast<int>(alg), chunk);
      hma::AveragerOptions o;
      o.algorithm = alg;
      o.chunk_bytes = chunk;
      hma::HierarchicalAverager avg(MPI_COMM_WORLD, {{1, rpn}, {2, size()}}, 0, o);
      const auto& h = avg.hierarchy();
      REQUIRE_ALL_RANKS(h.contiguous_nodes() && h.two_level(0) == nullptr &&  // within a node: always flat
                        h.two_level(1) != nullptr &&  // the world spans whole nodes
                        h.two_level(1)->intra.size() == rpn && h.two_level(1)->inter.size() == size() / rpn);
      const std::string d = avg.describe();
      REQUIRE_THAT(d, Catch::Contains(alg == hma::Algorithm::two_level ? "algorithm: two-level (HMA_ALGORITHM=two_level)"
                                                                       : "algorithm: flat"));
      for (Mode mode : {Mode::blocking, Mode::start_wait, Mode::start_test}) {
        Model m(true, true);
        int averaged = 0;
        avg.set_step(0);
        run_schedule(avg, {false, {{1, rpn}, {2, size()}}, 0}, m, mode, 6, averaged);
        REQUIRE_ALL_RANKS(averaged == 6);
      }
    }
  }
}

TEST_CASE("on an emulated cluster (tools/cluster) the node level is the namespace", "[cluster]") {
  const char* expect = std::getenv("HMA_EXPECT_NODES");
  INFO("a [cluster] test runs under tools/cluster with HMA_EXPECT_NODES set (test/meson.build)");
  REQUIRE_ALL_RANKS(expect != nullptr);
  const int nodes = std::atoi(expect), rpn = size() / nodes;
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, "1:node,2:world", 0);
  const auto& h = avg.hierarchy();
  REQUIRE_FALSE(h.emulated_nodes());  // detected through shared memory, not HMA_RANKS_PER_NODE
  REQUIRE_ALL_RANKS(h.num_nodes() == nodes && h.ranks_per_node() == rpn && h.node_index() == rank() / rpn &&
                    h.contiguous_nodes());
  // The ranks of my node are exactly those whose host is mine.
  char host[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  MPI_Get_processor_name(host, &len);
  const std::string mine(host);
  REQUIRE_THAT(mine, Catch::EndsWith("-n" + std::to_string(rank() / rpn)));
  std::vector<char> all(static_cast<std::size_t>(MPI_MAX_PROCESSOR_NAME) * static_cast<std::size_t>(h.node().size()));
  MPI_Allgather(host, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, h.node().get());
  bool same_host = true;
  for (int r = 0; r < h.node().size(); ++r) same_host &= std::string(all.data() + r * MPI_MAX_PROCESSOR_NAME) == mine;
  REQUIRE_ALL_RANKS(same_host && avg.hierarchy().two_level(1) != nullptr);
  Model m(true, true);
  int averaged = 0;
  const Plan plan{false, {{1, rpn}, {2, size()}}, 0};
  run_schedule(avg, plan, m, Mode::blocking, 4, averaged);
  avg.set_step(0);
  run_schedule(avg, plan, m, Mode::start_wait, 4, averaged);
  REQUIRE_ALL_RANKS(averaged == 8);
}

// MPI needs the collectives of a communicator issued in the same order on every rank. The
// chained two-level stages are issued lazily (as test()/wait() find the previous stage done), so
// before any other collective hma settles them: here ranks complete three averages in different
// orders; values stay exact and nothing deadlocks.
TEST_CASE("several ParamSets in flight complete in any order on each rank") {
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  const int g = size();
  std::vector<hma::ParamSet> sets(3);
  std::vector<hma::Array<float>> arr;
  for (std::size_t k = 0; k < sets.size(); ++k) {
    arr.push_back(sets[k].allocate<float>(20000 + 1000 * k));  // >= 64 KiB: two-level where enabled
    for (std::size_t i = 0; i < arr[k].size(); ++i) arr[k][i] = static_cast<float>(value(rank(), static_cast<std::int64_t>(k), i));
  }
  for (int round = 0; round < 2; ++round) {
    std::vector<hma::Request> reqs;
    for (auto& s : sets) reqs.push_back(avg.start_average(s, 0));
    // Rank r waits in a rotated order, testing the others in between.
    for (std::size_t j = 0; j < reqs.size(); ++j) {
      const std::size_t k = (j + static_cast<std::size_t>(rank())) % reqs.size();
      for (auto& r : reqs) (void)r.test();
      reqs[k].wait();
    }
    bool ok = true;
    for (std::size_t k = 0; k < sets.size(); ++k)
      for (std::size_t i = 0; i < arr[k].size(); ++i)
        ok &= arr[k][i] == static_cast<float>(block_mean(rank(), g, static_cast<std::int64_t>(k), i));
    INFO("round " << round);
    REQUIRE_ALL_RANKS(ok);  // the average of equal values is the same values: round 2 too
  }
}

TEST_CASE("two averagers' averages waited for in different orders on different ranks complete",
          "[np>=2]") {
  // Multi-stage averages (two-level, the ring) issue their next collective only when advanced:
  // a rank blocked on averager 1's average must advance averager 2's too, or a rank that waits
  // for 2 first never gets its next stage. A hang fails as hma::Timeout.
  hma::AveragerOptions o;
  o.timeout_s = 30;
  hma::PeriodicAverager one(MPI_COMM_WORLD, 1, 0, o), two(MPI_COMM_WORLD, 1, 0, o);
  const int g = size();
  hma::ParamSet s1, s2;
  auto a1 = s1.allocate<float>(40000);  // >= 64 KiB: two-level where enabled
  auto a2 = s2.allocate<double>(30000);
  for (std::int64_t t = 0; t < 3; ++t) {
    for (std::size_t i = 0; i < a1.size(); ++i) a1[i] = static_cast<float>(value(rank(), t, i));
    for (std::size_t i = 0; i < a2.size(); ++i) a2[i] = value(rank(), t + 50, i);
    auto r1 = one.start(s1);
    auto r2 = two.start(s2);
    if (rank() % 2 == 0) {
      r1.wait();
      r2.wait();
    } else if (t == 2) {
      while (!r2.test()) std::this_thread::yield();  // only test()s the one, then waits the other
      r1.wait();
    } else {
      r2.wait();
      r1.wait();
    }
    bool ok = true;
    for (std::size_t i = 0; i < a1.size(); ++i) ok &= a1[i] == static_cast<float>(block_mean(rank(), g, t, i));
    for (std::size_t i = 0; i < a2.size(); ++i) ok &= a2[i] == block_mean(rank(), g, t + 50, i);
    INFO("t " << t);
    REQUIRE_ALL_RANKS(ok);
  }
}

// Open MPI 4.1 crashes when a communicator is freed under a pending non-blocking collective: an
// averager completes its in-flight averages before it goes.
TEST_CASE("an averager destroyed with averages in flight completes them first") {
  hma::ParamSet ps;
  auto w = ps.allocate<float>(50000);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(value(rank(), 4, i));
  hma::Request r;
  {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
    r = avg.start_average(ps, 0);
  }
  REQUIRE_ALL_RANKS(!r.active());
  r.wait();
  bool ok = true;
  for (std::size_t i = 0; i < w.size(); ++i) ok &= w[i] == static_cast<float>(block_mean(rank(), size(), 4, i));
  REQUIRE_ALL_RANKS(ok);
  // Move assignment completes the assigned-to averager's averages the same way.
  hma::PeriodicAverager a(MPI_COMM_WORLD, 1), b(MPI_COMM_WORLD, 1);
  r = a.start_average(ps, 0);
  a = std::move(b);
  REQUIRE_ALL_RANKS(!r.active());
  REQUIRE_ALL_RANKS(a.step(ps) == true);
}
