// Reliability: timeouts instead of hangs, non-finite guards, checkpoints, and a matrix of bad
// inputs, each raising a clear error on every rank.
#include <chrono>
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

#include "hma/hma.hpp"
#include "mpi_test.hpp"

using hma_test::rank;
using hma_test::size;
using hma_test::thread_multiple;

TEST_CASE("a rank that joins late gives hma::Timeout naming the group, and the wait can resume", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
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
    REQUIRE(avg.step(ps));  // step 0, all present
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
      timeouts += hma_test::wait_through_timeouts(ps);
    }
    INFO(msg);
    REQUIRE_ALL_RANKS(rank() == late || timeouts >= 1);
    REQUIRE_ALL_RANKS(rank() == late ||
                      msg.find("step 1: the average over level 0 (group of " + std::to_string(size()) +
                               " ranks, world ranks 0-" + std::to_string(size() - 1) +
                               "), 8000 bytes, was not reached by every rank of the group within "
                               "0.3 s") != std::string::npos);
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

TEST_CASE("non-finite guard: throw names the ranks, skip skips on every rank of the group") {
  const int bad_rank = size() - 1;
  for (auto policy : {hma::NonFinite::error, hma::NonFinite::skip, hma::NonFinite::ignore}) {
    CAPTURE(static_cast<int>(policy));
    hma::AveragerOptions o;
    o.nonfinite = policy;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    hma::ParamSet ps;
    auto w = ps.allocate<float>(16, static_cast<float>(2 * rank()));
    std::vector<double> u(4, 2.0 * rank());
    ps.add(u);
    if (rank() == bad_rank) u[2] = std::numeric_limits<double>::quiet_NaN();
    const float before = w[0];
    if (policy == hma::NonFinite::error) {
      REQUIRE_THROWS_ALL_RANKS(hma::NonFiniteError, avg.step(ps),
                               "step 0: level 0: non-finite values (NaN or Inf) on world rank(s) " +
                                   std::to_string(bad_rank) + "; nothing was averaged");
      REQUIRE_ALL_RANKS(w[0] == before);  // nobody averaged
    } else if (policy == hma::NonFinite::skip) {
      REQUIRE_ALL_RANKS(!avg.step(ps));
      REQUIRE_ALL_RANKS(w[0] == before);
      u[2] = 2.0 * rank();  // fixed: the next step averages
      REQUIRE_ALL_RANKS(avg.step(ps));
      REQUIRE_ALL_RANKS(w[0] == static_cast<float>(size() - 1));
    } else {
      REQUIRE(avg.step(ps));  // torch's behaviour: the NaN spreads
      REQUIRE_ALL_RANKS(size() == 1 ? std::isnan(u[2]) : std::isnan(u[2]) && w[0] == static_cast<float>(size() - 1));
    }
  }
  // Infinity counts too, and in the non-blocking path.
  hma::AveragerOptions o;
  o.nonfinite = hma::NonFinite::error;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  hma::ParamSet ps;
  auto w = ps.allocate<double>(4, 1.0);
  if (rank() == 0) w[3] = -std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_ALL_RANKS(hma::NonFiniteError, avg.start(ps), "world rank(s) 0;");
}

TEST_CASE("checkpoint and restore the averager's step; foreign checkpoints are refused") {
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, {{2, 1}, {8, size()}}, 3);
  hma::ParamSet ps;
  (void)ps.allocate<float>(4);
  for (int t = 0; t < 13; ++t) avg.step(ps);
  const std::string cp = avg.checkpoint();
  REQUIRE_THAT(cp, Catch::StartsWith("hma-checkpoint 1\nstep 13\nworld " + std::to_string(size())));
  hma::HierarchicalAverager again(MPI_COMM_WORLD, {{2, 1}, {8, size()}}, 3);
  again.restore(cp);
  REQUIRE(again.step_count() == 13);
  REQUIRE(again.level_now() == avg.level_now());
  // Through a file.
  const std::string path = "/tmp/hma-test-checkpoint-" + std::to_string(rank()) + ".txt";
  avg.save_checkpoint(path);
  hma::HierarchicalAverager third(MPI_COMM_WORLD, {{2, 1}, {8, size()}}, 3);
  third.load_checkpoint(path);
  REQUIRE(third.step_count() == 13);
  std::remove(path.c_str());
  // Foreign checkpoints.
  hma::HierarchicalAverager other(MPI_COMM_WORLD, {{4, size()}}, 0);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, other.restore(cp),
                           "the checkpoint is for schedule 'hierarchical 2:1,8:" + std::to_string(size()) +
                               " warmup 3 world " + std::to_string(size()) + "' but this averager runs 'hierarchical 4:");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, other.restore("hello\nstep 3\n"), "not an hma checkpoint");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, other.restore("hma-checkpoint 1\nstep x\nworld 1\n"), "'x' is not an integer number");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, other.restore("hma-checkpoint 1\nworld 1\n"), "lacks its 'step' line");
  std::string wrong_world = cp;
  wrong_world.replace(wrong_world.find("world "), 6 + std::to_string(size()).size(), "world 1000");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, again.restore(wrong_world), "written by 1000 ranks, this averager has");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, other.load_checkpoint("/nonexistent/cp.txt"), "unreadable file '/nonexistent/cp.txt'");
  // One rank restoring another step is caught.
  if (size() > 1) {
    hma::HierarchicalAverager avg2(MPI_COMM_WORLD, {{2, 1}, {8, size()}}, 3);
    avg2.set_step(rank() == 1 ? 5 : 13);
    const std::string mine = avg2.checkpoint();
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, again.restore(mine), "the restored step or outer optimizer state differs across ranks: rank 1 has step 5");
  }
  REQUIRE(again.step_count() == 13);  // unchanged by the failed restores
}

TEST_CASE("hostile checkpoints: refused on every rank with the reason, never a crash (issue 25)") {
  hma::AveragerOptions o;
  o.outer = hma::OuterOptimizer{0.7, 0.9, true, std::nullopt};
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  hma::ParamSet ps;
  auto w = ps.allocate<float>(2, static_cast<float>(rank()));
  (void)avg.step(ps);
  const std::string cp = avg.checkpoint();  // step 1, with the outer state of 2 f32
  const std::size_t at = cp.find("\nouter level 0 group 0 f32 2 f64 0 layout ");
  REQUIRE(at != std::string::npos);
  const std::string head = cp.substr(0, at + 1);  // through the schedule line
  const std::string layout = cp.substr(cp.find(" layout ", at) + 8, 16);
  auto outer = [&](const std::string& sizes, const std::string& state) {
    return head + "outer level 0 group 0 " + sizes + " layout " + layout + "\nouter-state " + state + "\n";
  };
  struct Case {
    std::string text, needle;
  };
  const std::vector<Case> cases = {
      // 2 * (2*4 + (2^60-1)*8) wraps to 0 in 64 bits: refused before any copy.
      {outer("f32 2 f64 1152921504606846975", ""), "f32 and 1152921504606846975 f64 elements are more bytes than a size can hold"},
      // 24 bytes announced, 8 given.
      {outer("f32 3 f64 0", "AAAAAAAAAAA="), "outer optimizer state is damaged (12 characters of base64, 24 bytes expected for 3 f32 and 0 f64 elements)"},
      {outer("f32 4000000000 f64 0", "AAAA"), "(4 characters of base64, 32000000000 bytes expected"},
      {outer("f32 1 f64 0", "AAAAAAAAAAAA"), "(9 bytes decoded, 8 bytes expected"},
      {outer("f32 -1 f64 0", ""), "'-1' is not an integer number (digits only)"},
      {outer("f32 2 f64 0 extra", ""), "is malformed (expected 'outer level L group G f32 N f64 N layout HEX')"},
      {head + "outer level 0 group 0 f32 2 f64 0 layout " + layout + "\n", "has an 'outer' line but no 'outer-state' line"},
      {std::string(cp).replace(cp.find("step 1"), 6, "step 12abc"), "checkpoint line 'step 12abc': '12abc' is not an integer number"},
      {std::string(cp).replace(cp.find("step 1"), 6, "step -3"), "checkpoint line 'step -3': the step is negative; steps count from 0"},
      {std::string(cp).replace(cp.find("step 1"), 6, "step 4611686018427387905"), "the step is beyond hma's limit of 2^62"},
      {std::string(cp).replace(cp.find("step 1"), 6, "step 99999999999999999999"), "is out of range"},
      {std::string(cp).replace(cp.find("step 1"), 6, "step +1"), "'+1' is not an integer number"},
      {cp + "step 2\n", "checkpoint line 'step' appears twice"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.text);
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, avg.restore(c.text), c.needle);
    REQUIRE_ALL_RANKS(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(1));
    REQUIRE_ALL_RANKS(avg.step_count() == 1);  // untouched
  }
  // CRLF line ends (a file edited on Windows) read as LF: the same step and outer state.
  std::string crlf;
  for (char ch : cp) crlf += ch == '\n' ? std::string("\r\n") : std::string(1, ch);
  hma::PeriodicAverager again(MPI_COMM_WORLD, 1, 0, o);
  again.restore(crlf);
  REQUIRE_ALL_RANKS(again.checkpoint() == cp);
  // Only this rank's text is hostile: every rank still fails together, naming it.
  if (size() > 1) {
    const std::string mine = rank() == size() - 1 ? cases[0].text : cp;
    REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, again.restore(mine), "more bytes than a size can hold");
  }
  (void)w;
}

TEST_CASE("registration: 10^5 arrays, overlaps found from either side (issue 25: O(n log n))") {
  // One vector cut into 10^5 one-element arrays, registered in a shuffled order; then averaged.
  constexpr std::size_t n = 100000;
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = 6.0 * rank() + static_cast<double>(i % 7);
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = (i * 7919) % n;  // 7919 is prime: a permutation
  hma::ParamSet ps;
  for (std::size_t i : order) ps.add(std::span<double>(v.data() + i, 1));
  REQUIRE(ps.arrays() == n);
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  REQUIRE(avg.step(ps));
  const double mean = 3.0 * (size() - 1);  // the mean of 6 * rank: exact
  bool all = true;
  for (std::size_t i = 0; i < n; ++i) all = all && v[i] == mean + static_cast<double>(i % 7);
  REQUIRE_ALL_RANKS(all);
  // Every way to overlap an array already there, among many others; adjacent arrays are fine.
  std::vector<float> f(100);
  hma::ParamSet q;
  for (std::size_t i = 0; i < 100; i += 10)
    if (i != 40) q.add(std::span<float>(f.data() + i, 5));  // [i, i + 5) for i = 0, 10, ..., 90 but 40
  q.add(std::span<float>(f.data() + 45, 5));    // [45, 50): touches [40..45) nothing, ends at 50
  q.add(std::span<float>(f.data() + 50, 0));    // empty: never overlaps
  q.add(std::span<float>(f.data() + 5, 5));     // [5, 10): adjacent on both sides
  auto refused = [&](std::size_t from, std::size_t len) {
    try {
      q.add(std::span<float>(f.data() + from, len));
    } catch (const hma::InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  // Arrays: #0 [0, 5), #1 [10, 15), ..., #3 [30, 35), #4 [50, 55), ..., #8 [90, 95), #9 [45, 50),
  // #10 empty, #11 [5, 10).
  REQUIRE_THAT(refused(48, 4), Catch::Contains("overlaps user array #4"));  // the end of #9 and into #4
  REQUIRE_THAT(refused(52, 1), Catch::Contains("overlaps user array #4"));  // inside #4
  REQUIRE_THAT(refused(58, 3), Catch::Contains("overlaps user array #5"));  // starts before #5, ends inside
  REQUIRE_THAT(refused(1, 98), Catch::Contains("overlaps user array #"));   // contains many
  REQUIRE_THAT(refused(3, 1), Catch::Contains("overlaps user array #0"));   // inside the first
  REQUIRE(refused(40, 5) == "accepted");                                     // the gap [40, 45)
}

TEST_CASE("bad-input matrix: every case raises a clear error on every rank, none hangs") {
  struct Case {
    const char* what;
    std::function<void()> fn;
    std::string needle;
  };
  const int n = size();
  const std::string N = std::to_string(n);
  auto hier = [](std::string spec, std::int64_t warmup = 0) {
    return [spec, warmup] { hma::HierarchicalAverager a(MPI_COMM_WORLD, spec, warmup); };
  };
  auto with_env = [](const char* var, const char* val) {
    return [var, val] {
      setenv(var, val, 1);
      try {
        hma::PeriodicAverager a(MPI_COMM_WORLD, 2, 0);
      } catch (...) {
        unsetenv(var);
        throw;
      }
      unsetenv(var);
    };
  };
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  hma::ParamSet busy;
  (void)busy.allocate<double>(8);
  std::vector<Case> cases = {
      // schedule strings, through the collective constructor
      {"empty schedule", hier(""), "is empty"},
      {"blank schedule", hier("   "), "is empty"},
      {"period not a number", hier("x"), "period 'x' is not an integer"},
      {"period zero", hier("0"), "period must be a positive value, got 0"},
      {"negative period", hier("-4"), "got -4"},
      {"group not a number", hier("2:abc"), "group size 'abc' is not an integer"},
      {"missing colon", hier("2:1,8"), "expected period:group_size"},
      {"stray comma", hier("2:1,," + N), "empty level"},
      {"trailing comma", hier("2:1,"), "empty level"},
      {"unordered periods", hier("4:1,2:" + N), "periods must strictly increase"},
      {"equal periods", hier("4:1,4:" + N), "periods must strictly increase"},
      {"zero group", hier("2:0,4:" + N), "group size must be positive, got 0"},
      {"group beyond world", hier("2:" + std::to_string(2 * n) + ",4:" + N), "exceeds the world size"},
      {"last level not world", hier(n == 1 ? "2:1,4:2" : "2:1,4:1", 0), n == 1 ? "exceeds the world size" : "must equal the world size"},
      {"negative warmup", hier("2:" + N, -1), "warmup must be non-negative, got -1"},
      {"period overflow", hier("99999999999999999999:" + N), "is not an integer"},
      {"misspelt node", hier("2:nodes,4:world"), "group size 'nodes' is not an integer, 'node' or 'world'"},
      // averager construction
      {"periodic period 0", [] { hma::PeriodicAverager a(MPI_COMM_WORLD, 0, 0); }, "period must be a positive value"},
      {"periodic negative warmup", [] { hma::PeriodicAverager a(MPI_COMM_WORLD, 2, -3); }, "got -3"},
      {"schedule for another world", [n] { hma::Averager a(MPI_COMM_WORLD, hma::Schedule::periodic(2, 0, n + 1)); }, "but the communicator has"},
      {"hierarchical on a null comm", [] { hma::HierarchicalAverager a(MPI_COMM_NULL, "2:1", 0); }, "comm is MPI_COMM_NULL"},
      {"empty level list", [] { hma::HierarchicalAverager a(MPI_COMM_WORLD, std::vector<hma::Level>{}, 0); }, "at least one period:group_size"},
      {"negative timeout", [] { hma::AveragerOptions o; o.timeout_s = -1; hma::PeriodicAverager a(MPI_COMM_WORLD, 2, 0, o); }, "timeout_s must be >= 0"},
      // environment
      {"HMA_RANKS_PER_NODE text", with_env("HMA_RANKS_PER_NODE", "four"), "HMA_RANKS_PER_NODE='four'"},
      {"HMA_RANKS_PER_NODE too big", with_env("HMA_RANKS_PER_NODE", "100000"), "HMA_RANKS_PER_NODE='100000'"},
      {"HMA_CHECK", with_env("HMA_CHECK", "sometimes"), "HMA_CHECK='sometimes'"},
      {"HMA_LOG", with_env("HMA_LOG", "loud"), "HMA_LOG='loud'"},
      {"HMA_PROGRESS", with_env("HMA_PROGRESS", "fast"), "HMA_PROGRESS='fast'"},
      {"HMA_REDUCTION", with_env("HMA_REDUCTION", "tree"), "HMA_REDUCTION='tree'"},
      {"HMA_NONFINITE", with_env("HMA_NONFINITE", "maybe"), "HMA_NONFINITE='maybe'"},
      {"HMA_TIMEOUT_S", with_env("HMA_TIMEOUT_S", "soon"), "HMA_TIMEOUT_S='soon'"},
      {"HMA_TIMEOUT_S negative", with_env("HMA_TIMEOUT_S", "-2"), "HMA_TIMEOUT_S='-2'"},
      {"HMA_CHUNK_BYTES", with_env("HMA_CHUNK_BYTES", "-1"), "HMA_CHUNK_BYTES='-1'"},
      // buffers and calls
      {"huge allocate", [] { hma::ParamSet p; (void)p.allocate<double>(static_cast<std::size_t>(-1)); }, "larger than 2^48 bytes"},
      {"negative size as span", [] { hma::ParamSet p; std::vector<float> v(1); p.add(std::span<float>(v.data(), static_cast<std::size_t>(-8))); }, "larger than 2^48 bytes"},
      {"null span", [] { hma::ParamSet p; p.add(std::span<float>(static_cast<float*>(nullptr), 4)); }, "null data pointer"},
      {"duplicate array", [] { hma::ParamSet p; std::vector<float> v(4); p.add(v); p.add(v); }, "overlaps user array #0"},
      {"level out of range", [&] { avg.average(busy, 3); }, "level 3 out of range"},
      {"start_average level out of range", [&] { auto r = avg.start_average(busy, 7); }, "level 7 out of range"},
      {"negative set_step", [&] { avg.set_step(-5); }, "step must be between 0 and 2^62 (4611686018427387904), got -5"},
      {"restore garbage", [&] { avg.restore("garbage"); }, "not an hma checkpoint"},
  };
  for (const auto& c : cases) {
    std::string msg = "did not throw";
    bool ok = false;
    try {
      c.fn();
    } catch (const std::exception& e) {
      msg = e.what();
      ok = msg.find(c.needle) != std::string::npos && msg.rfind("hma: ", 0) == 0;
    }
    INFO("case: " << c.what << "; expected \"" << c.needle << "\"; got: " << msg);
    REQUIRE_ALL_RANKS(ok);
  }
  if (rank() == 0) std::printf("bad-input matrix: %zu cases, each raised a clear error on all %d ranks\n", cases.size(), n);
}

TEST_CASE("misuse of an in-flight request raises a clear error on every rank", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);  // with one rank nothing is ever in flight
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  hma::ParamSet busy;
  // 8 MiB: start() cannot already have completed it (MPICH completes small averages there).
  auto w = busy.allocate<double>(std::size_t{1} << 20, static_cast<double>(2 * rank()));
  auto r = avg.start(busy);
  REQUIRE_THROWS_ALL_RANKS(hma::Error, avg.start(busy), "already has an average in flight");
  REQUIRE_THROWS_ALL_RANKS(hma::Error, busy.allocate<double>(1), "while an average of this set is in flight");
  r.wait();
  r.wait();  // a second wait is a no-op, not an error
  const double want = static_cast<double>(size() - 1);  // the mean of 2r over r = 0..n-1
  REQUIRE_ALL_RANKS(std::all_of(w.begin(), w.end(), [&](double x) { return x == want; }));
}
