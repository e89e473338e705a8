// Small averages (issue 23): after the first, an average of a small host set allocates once in
// hma, the closure of its data stage (its record is recycled, README "Small averages ride in the
// check"; 7 allocations before), and recycled
// records still give the exact average and still catch a rank that changed its layout.
#include <atomic>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "hma/hma.hpp"
#include "mpi_test.hpp"
#include "transport/uses.hpp"

namespace {
std::atomic<long> g_news{0};
}

// Every C++ allocation of this process is counted (MPI's own, in C, are not). Not under
// AddressSanitizer, whose own operator new the runtime may still call (the count is then not
// checked; the values are).
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kCounted = false;
#else
constexpr bool kCounted = true;
void* operator new(std::size_t n) {
  g_news.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
#endif

using hma_test::rank;
using hma_test::size;

namespace {
// An averager of the world every step whose waits end after 30 s (a mismatch the check missed
// would hang, not pass).
hma::PeriodicAverager every_step() {
  hma::AveragerOptions o;
  o.timeout_s = 30;
  return hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, o);
}

// One average of `ps` at level 0 must end on every rank in an hma::MismatchError naming the
// buffer layout and world rank 1.
void require_layout_mismatch_of_rank1(hma::Averager& avg, hma::ParamSet& ps) {
  std::string what;
  try {
    avg.average(ps, 0);
  } catch (const hma::MismatchError& e) {
    what = e.what();
  }
  CAPTURE(what);
  REQUIRE_ALL_RANKS(what.find("buffer layout") != std::string::npos);
  REQUIRE_ALL_RANKS(what.find("world rank 1") != std::string::npos);
}
}  // namespace

TEST_CASE("a small host average allocates once after the first, and stays exact", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  const int g = size();
  // 16 floats: one message per round; 1500 (6000 bytes): the check's two fragments.
  for (const auto& [check, n] : {std::pair{true, 16}, {false, 16}, {true, 1500}}) {
    CAPTURE(check, n);
    const std::uint64_t fused_before = hma::detail::uses(hma::detail::Use::fused);
    hma::AveragerOptions o;
    o.check_every_average = check;
    hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
    hma::ParamSet ps;
    auto w = ps.allocate<float>(static_cast<std::size_t>(n), 0.0f);
    auto fill = [&] {  // terms x / g exact: the average is g (g + 1) / 2 + g i exactly
      for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(g * (rank() + 1) + static_cast<int>(i) * g);
    };
    fill();
    avg.average(ps, 0);  // the first average makes the record
    fill();
    {
      auto r = avg.start_average(ps, 0);
      r.wait();
    }
    bool exact = true;
    long blocking = -1;
    const long before = g_news.load();
    for (int k = 0; k < 50; ++k) {
      fill();
      if (k < 25) {
        avg.average(ps, 0);
      } else {
        auto r = avg.start_average(ps, 0);
        r.wait();
      }
      if (k == 24) blocking = g_news.load() - before;
      for (std::size_t i = 0; i < w.size(); ++i)
        exact = exact && w[i] == static_cast<float>(g * (g + 1) / 2 + g * static_cast<int>(i));
    }
    const long allocations = g_news.load() - before;
    CAPTURE(blocking, allocations);
    REQUIRE_ALL_RANKS(exact);
    REQUIRE_ALL_RANKS(!kCounted || (blocking <= 25 && allocations <= 50));  // one per average, start/wait too
    // Checked, every one of the 52 averages rode in its check (the values summed on the way).
    REQUIRE_ALL_RANKS(!check || hma::detail::uses(hma::detail::Use::fused) - fused_before == 52);
  }
}

TEST_CASE("a recycled record still catches a rank whose layout changed", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::PeriodicAverager avg = every_step();
  hma::ParamSet ps;
  (void)ps.allocate<double>(4, 1.0);
  for (int k = 0; k < 3; ++k) avg.average(ps, 0);
  if (rank() == 1) (void)ps.allocate<double>(1, 1.0);  // one more array on rank 1 only
  require_layout_mismatch_of_rank1(avg, ps);
}

TEST_CASE("a payload in two fragments against one in one fragment: a layout mismatch, no hang", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::PeriodicAverager avg = every_step();
  hma::ParamSet ps;
  // 1000 floats (4000 bytes: two fragments) on rank 1, 900 (one) elsewhere.
  auto x = ps.allocate<float>(rank() == 1 ? 1000 : 900, static_cast<float>(rank() + 1));
  require_layout_mismatch_of_rank1(avg, ps);
  REQUIRE_ALL_RANKS(x[0] == static_cast<float>(rank() + 1));  // nothing averaged
  // The check channel stays in step: the next average of one layout everywhere is exact.
  hma::ParamSet same;
  auto y = same.allocate<float>(1000, static_cast<float>(size() * (rank() + 1)));
  avg.average(same, 0);
  REQUIRE_ALL_RANKS(y[999] == static_cast<float>(size() * (size() + 1) / 2));
}

TEST_CASE("arrays of the same sizes in another order are another layout", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  hma::PeriodicAverager avg = every_step();
  hma::ParamSet ps;
  const std::size_t a = rank() == 1 ? 5 : 3, b = rank() == 1 ? 3 : 5;  // same counts, same arrays
  auto x = ps.allocate<double>(a, 1.0);
  auto y = ps.allocate<double>(b, 2.0);
  require_layout_mismatch_of_rank1(avg, ps);
  REQUIRE_ALL_RANKS(x[0] == 1.0);  // nothing averaged
  REQUIRE_ALL_RANKS(y[0] == 2.0);
}
