// Bad input and cross-rank disagreement: a clear exception on EVERY rank, never a hang.
// Run at np 1, 2, 4, 8; tests tagged [np>=2] are filtered out at np 1 (test/meson.build).
#include <cstdlib>
#include <vector>

#include "hma/hma.hpp"
#include "mpi_test.hpp"

using hma_test::rank;
using hma_test::size;

TEST_CASE("a bad argument on one rank throws on every rank, naming that rank", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  const std::int64_t period = rank() == 1 ? 0 : 2;
  try {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, period, 0);
    REQUIRE_ALL_RANKS(false);
  } catch (const hma::InvalidArgument& e) {
    const std::string m = e.what();
    INFO(m);
    if (rank() == 1) REQUIRE_ALL_RANKS(m.find("period must be a positive value, got 0") != std::string::npos);
    else REQUIRE_ALL_RANKS(m.find("rank 1 failed: hma: period must be a positive value, got 0") != std::string::npos);
  }
}

TEST_CASE("different schedules on different ranks are detected, not deadlocked", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  const std::int64_t period = rank() == size() - 1 ? 5 : 4;
  try {
    hma::HierarchicalAverager avg(MPI_COMM_WORLD, {{period, size()}}, 0);
    REQUIRE_ALL_RANKS(false);
  } catch (const hma::MismatchError& e) {
    const std::string m = e.what();
    INFO(m);
    REQUIRE_ALL_RANKS(e.rank() == size() - 1);
    REQUIRE_ALL_RANKS(m.find("the schedule differs across ranks: rank " + std::to_string(size() - 1) +
                             " has hierarchical 5:" + std::to_string(size()) +
                             " warmup 0 world " + std::to_string(size()) + ", rank 0 has hierarchical 4:") !=
                      std::string::npos);
  }
  // Warmup alone differing is a different schedule too.
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError,
                           hma::PeriodicAverager(MPI_COMM_WORLD, 2, rank() == 1 ? 1 : 0),
                           "rank 1 has periodic 2 warmup 1");
}

TEST_CASE("buffer layouts that differ across ranks are detected at the first average", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  SECTION("size") {
    hma::ParamSet ps;
    (void)ps.allocate<float>(rank() == 1 ? 11 : 10);
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps),
                             "buffer layout: 1 arrays: f32 10 (zero-copy 10, packed 0), f64 0");
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps), "1 arrays: f32 11 (zero-copy 11, packed 0)");
    REQUIRE(avg.step_count() == 0);  // a failed step does not advance
  }
  SECTION("dtype") {
    hma::ParamSet ps;
    std::vector<float> f(8);
    std::vector<double> d(8);
    if (rank() == 1) ps.add(d);
    else ps.add(f);
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps),
                             "1 arrays: f32 0 (zero-copy 0, packed 0), f64 8 (zero-copy 0, packed 8)");
  }
  SECTION("same total, different split into arrays") {
    hma::ParamSet ps;
    std::vector<float> a(rank() == 1 ? 3 : 5), b(rank() == 1 ? 5 : 3);
    ps.add(a);
    ps.add(b);
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps), "buffer layout: 2 arrays: f32 8 (zero-copy 0, packed 8)");
  }
  SECTION("zero-copy vs packed") {
    hma::ParamSet ps;
    std::vector<float> a(4);
    if (rank() == 1) ps.add(a);
    else (void)ps.allocate<float>(4);
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.start(ps), "1 arrays: f32 4 (zero-copy 0, packed 4)");
  }
  SECTION("a layout changed on one rank after a good first average") {
    hma::ParamSet ps;
    std::vector<double> a(4, 1.0);
    ps.add(a);
    REQUIRE(avg.step(ps));
    std::vector<double> extra(2, 1.0);
    if (rank() == 0) ps.add(extra);
    else {
      std::vector<double> other(3, 1.0);
      ps.add(other);
      REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps), "buffer layout: 2 arrays");
      return;
    }
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps), "buffer layout: 2 arrays");
  }
}

TEST_CASE("the agreement check (on by default) catches step counters that drift apart", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::HierarchicalAverager avg(MPI_COMM_WORLD, {{1, size()}}, 0);
  hma::ParamSet ps;
  (void)ps.allocate<float>(4);
  REQUIRE(avg.step(ps));  // step 0 averages; all agree
  if (rank() == 1) avg.set_step(5);
  // Rank 1 averages at step 5 while the others are at step 1: caught before any data moves.
  std::string others = " 0";  // world ranks at step 1, as the message lists them
  if (size() == 3) others = "s 0,2";
  if (size() > 3) others = "s 0,2-" + std::to_string(size() - 1);
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, avg.step(ps),
                           "step counter: step 1 on world rank" + others + ", step 5 on world rank 1");
  REQUIRE_ALL_RANKS(avg.step_count() == (rank() == 1 ? 5 : 1));  // a refused step does not advance
}

TEST_CASE("misuse of requests and buffers") {
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  hma::ParamSet ps;
  // 8 MiB: start() cannot already have completed it (MPICH completes small averages there).
  const std::size_t n = std::size_t{1} << 20;
  auto w = ps.allocate<double>(n, 1.0);
  auto r = avg.start(ps);
  const bool active = r.active();
  REQUIRE_ALL_RANKS(active == (size() > 1));
  if (active) {
    REQUIRE_THROWS_ALL_RANKS(hma::Error, avg.start(ps), "already has an average in flight");
    REQUIRE_THROWS_ALL_RANKS(hma::Error, avg.step(ps), "already has an average in flight");
    REQUIRE_THROWS_ALL_RANKS(hma::Error, ps.allocate<double>(1), "ParamSet::allocate while an average of this set is in flight");
    std::vector<double> v(2);
    REQUIRE_THROWS_ALL_RANKS(hma::Error, ps.add(v), "ParamSet::add while an average");
  }
  r.wait();
  REQUIRE(avg.step_count() == 1);  // the failed calls did not advance the counter
  REQUIRE_ALL_RANKS(w[0] == 1.0 && w[n - 1] == 1.0);
}

TEST_CASE("wrong world size, null communicator, bad environment") {
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument,
                           hma::Averager(MPI_COMM_WORLD, hma::Schedule::periodic(2, 0, size() + 1)),
                           "the schedule is for " + std::to_string(size() + 1) + " ranks but the communicator has " + std::to_string(size()));
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::HierarchicalAverager(MPI_COMM_NULL, "2:1", 0),
                           "comm is MPI_COMM_NULL");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::HierarchicalAverager(MPI_COMM_WORLD, "2:3x", 0),
                           "group size '3x' is not an integer");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::HierarchicalAverager(MPI_COMM_WORLD, "2:world,1:world", 0),
                           "periods must strictly increase");
  const char* old = std::getenv("HMA_RANKS_PER_NODE");
  const std::string saved = old ? old : "";
  // Only rank 0 has a bad value: every rank must still throw.
  if (rank() == 0) setenv("HMA_RANKS_PER_NODE", "abc", 1);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 2, 0),
                           "HMA_RANKS_PER_NODE='abc' must be an integer");
  if (size() % 3 != 0) {
    setenv("HMA_RANKS_PER_NODE", "3", 1);
    REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 2, 0),
                             (size() > 3 ? "must be between 1 and the MPI_COMM_WORLD size " + std::to_string(size()) +
                                               " and divide it"
                                         : "HMA_RANKS_PER_NODE='3' must be an integer in [0, " +
                                               std::to_string(size()) + "]"));
  }
  if (rank() == 0) setenv("HMA_CHECK", "maybe", 1);
  unsetenv("HMA_RANKS_PER_NODE");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 2, 0), "HMA_CHECK='maybe'");
  unsetenv("HMA_CHECK");
  if (!saved.empty()) setenv("HMA_RANKS_PER_NODE", saved.c_str(), 1);
}

TEST_CASE("the progress thread needs MPI_THREAD_MULTIPLE, and says so") {
  int provided = 0;
  MPI_Query_thread(&provided);
  hma::AveragerOptions o;
  o.progress = hma::Progress::thread;
  if (provided < MPI_THREAD_MULTIPLE) {
    REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 2, 0, o),
                             "needs MPI initialised with MPI_Init_thread(MPI_THREAD_MULTIPLE)");
  } else {
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 2, 0, o);
    hma::ParamSet ps;
    auto w = ps.allocate<double>(3, static_cast<double>(2 * rank()));
    REQUIRE(avg.step(ps));
    REQUIRE_ALL_RANKS(w[0] == static_cast<double>(size() - 1) && w[2] == w[0]);
  }
  if (rank() == 0) setenv("HMA_PROGRESS", "threads", 1);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 2, 0),
                           "HMA_PROGRESS='threads' must be poll or thread");
  unsetenv("HMA_PROGRESS");
}

TEST_CASE("overlapping or duplicate arrays are refused when registered") {
  hma::ParamSet ps;
  std::vector<float> a(10), b(10);
  ps.add(a);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, ps.add(a), "overlaps user array #0");
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, ps.add(std::span<float>(a).subspan(5, 2)),
                           "overlaps user array #0");
  ps.add(b);
  auto w = ps.allocate<float>(4);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, ps.add(w.span()), "inside hma's own buffer");
  std::vector<double> c(3);
  ps.add(c);  // another dtype, another bucket: fine
  REQUIRE(ps.arrays() == 4);
  REQUIRE(ps.count(hma::Dtype::f32) == 24);
}

// A rank with another chunk size would reduce different pieces than the others (wrong data or a
// deadlock); another non-finite setting would leave it out of the guard's collective.
TEST_CASE("averaging settings that differ across ranks are detected at construction", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::AveragerOptions chunk;
  if (rank() == size() - 1) chunk.chunk_bytes = 12345;
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, chunk),
                           "the averaging settings");
  hma::AveragerOptions guard;
  if (rank() == 0) guard.nonfinite = hma::NonFinite::skip;
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, guard),
                           "non-finite");
  setenv("HMA_REDUCTION", rank() == 0 ? "ring" : "mpi", 1);
  REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, hma::PeriodicAverager(MPI_COMM_WORLD, 1), "rank 1");
  unsetenv("HMA_REDUCTION");
}

// Hidden (run only by test/check_lone_failure.sh): a plain REQUIRE that fails on one rank only,
// before a collective the other ranks enter. The test main must end the job, not hang.
TEST_CASE("a failure on one rank ends the job", "[.lone_failure]") {
  INFO("the last rank fails alone");
  REQUIRE(rank() != size() - 1);
  MPI_Barrier(MPI_COMM_WORLD);
}
