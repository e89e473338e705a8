// Small averages (issue 23): a blocking average of a small host set takes the lean path
// (lib/averager/lean.cpp) and allocates nothing after the first; start/wait and unchecked ones
// allocate once in hma, the closure of their data stage (their record is recycled, README
// "Small averages ride in the check"; 7 allocations before). Recycled records and the lean path
// still give the exact average and still catch a rank that changed its layout; a check the lean
// path hands to the general wait (a late rank, unequal weights) completes there.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <new>
#include <string>
#include <thread>
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

TEST_CASE("a small host average allocates nothing (blocking, lean) or once after the first, and stays exact",
          "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  const int g = size();
  // 16 floats: one message per round; 1500 (6000 bytes): the check's two fragments.
  for (const auto& [check, n] : {std::pair{true, 16}, {false, 16}, {true, 1500}}) {
    CAPTURE(check, n);
    const std::uint64_t fused_before = hma::detail::uses(hma::detail::Use::fused);
    std::uint64_t lean = 0;
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
    const std::uint64_t lean_before = hma::detail::uses(hma::detail::Use::lean);
    for (int k = 0; k < 50; ++k) {
      fill();
      if (k == 25) lean = hma::detail::uses(hma::detail::Use::lean) - lean_before;
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
    CAPTURE(blocking, allocations, lean);
    REQUIRE_ALL_RANKS(exact);
    // Checked, the blocking ones went the lean way, allocating nothing, or were handed over to
    // the general wait, which allocates its data stage's closure (and once a registry's slot).
    // At np 2 the rank that arrives last usually finds its partner's message there and lands
    // lean (on a loaded machine or under the sanitizers both may hand over: at least one lands
    // lean; more ranks on 2 cores may all hand over: only counted).
    long group_lean = static_cast<long>(lean);
    MPI_Allreduce(MPI_IN_PLACE, &group_lean, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    REQUIRE_ALL_RANKS(!check || size() > 2 || group_lean >= 1);
    REQUIRE_ALL_RANKS(check || lean == 0);
    // Unchecked: one per average, start/wait too.
    const long handed = 25 - static_cast<long>(lean);
    REQUIRE_ALL_RANKS(!kCounted || !check || (blocking <= 2 * handed && allocations <= 25 + 2 * handed));
    REQUIRE_ALL_RANKS(!kCounted || check || (blocking <= 25 && allocations <= 50));
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

TEST_CASE("a late rank: the lean path hands its open check to the general wait, still fused and exact",
          "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  const int g = size();
  hma::PeriodicAverager avg = every_step();
  hma::ParamSet ps;
  auto x = ps.allocate<double>(5, 0.0);
  for (int k = 0; k < 3; ++k) {
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = g * (rank() + 1.0) + static_cast<double>(i);
    const std::uint64_t lean = hma::detail::uses(hma::detail::Use::lean);
    const std::uint64_t fused = hma::detail::uses(hma::detail::Use::fused);
    if (rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    avg.average(ps, 0);
    bool exact = true;
    for (std::size_t i = 0; i < x.size(); ++i) exact = exact && x[i] == g * (g + 1) / 2.0 + static_cast<double>(i);
    REQUIRE_ALL_RANKS(exact);
    REQUIRE_ALL_RANKS(hma::detail::uses(hma::detail::Use::fused) - fused == 1);  // still in the check
    // The ranks that waited 50 ms for rank 0 handed over; rank 0 found everyone there.
    REQUIRE_ALL_RANKS(rank() == 0 || hma::detail::uses(hma::detail::Use::lean) == lean);
  }
}

TEST_CASE("unequal weights: the lean path hands over, and the weighted average moves as data", "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  const int g = size();
  hma::PeriodicAverager avg = every_step();
  avg.set_weight(rank() + 1.0);
  hma::ParamSet ps;
  auto x = ps.allocate<float>(8, static_cast<float>(rank() + 1));
  const std::uint64_t lean = hma::detail::uses(hma::detail::Use::lean);
  const std::uint64_t fused = hma::detail::uses(hma::detail::Use::fused);
  avg.average(ps, 0);
  // sum (r + 1)^2 / sum (r + 1) over r < g = (2g + 1) / 3
  const double want = (2.0 * g + 1.0) / 3.0;
  CAPTURE(x[0], want);
  REQUIRE_ALL_RANKS(std::abs(x[0] - want) <= 1e-6 * want);
  REQUIRE_ALL_RANKS(x[7] == x[0]);
  REQUIRE_ALL_RANKS(hma::detail::uses(hma::detail::Use::lean) == lean);
  REQUIRE_ALL_RANKS(hma::detail::uses(hma::detail::Use::fused) == fused);
}

TEST_CASE("a larger blocking average: the lean path completes its check, the data moves after it, exact",
          "[np>=2]") {
  REQUIRE_ALL_RANKS(size() >= 2);
  const int g = size();
  hma::PeriodicAverager avg = every_step();
  hma::ParamSet ps;
  // 4096 floats (16 KiB, too large for the check) owned, 300 doubles packed from a user array.
  auto w = ps.allocate<float>(4096, 0.0f);
  std::vector<double> u(300);
  ps.add(std::span<double>(u));
  auto fill = [&] {  // terms x / g exact: the average is g (g + 1) / 2 + g i exactly
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(g * (rank() + 1) + g * static_cast<int>(i % 1000));
    for (std::size_t i = 0; i < u.size(); ++i) u[i] = g * (rank() + 1.0) + g * static_cast<double>(i);
  };
  auto exact = [&] {
    bool ok = true;
    for (std::size_t i = 0; i < w.size(); ++i)
      ok = ok && w[i] == static_cast<float>(g * (g + 1) / 2 + g * static_cast<int>(i % 1000));
    for (std::size_t i = 0; i < u.size(); ++i) ok = ok && u[i] == g * (g + 1) / 2.0 + g * static_cast<double>(i);
    return ok;
  };
  const std::uint64_t checked = hma::detail::uses(hma::detail::Use::lean_check);
  const std::uint64_t fused = hma::detail::uses(hma::detail::Use::fused);
  bool all_exact = true;
  for (int k = 0; k < 20; ++k) {
    fill();
    if (k % 2 == 0) avg.average(ps, 0);
    else (void)avg.step(ps);
    all_exact = all_exact && exact();
  }
  REQUIRE_ALL_RANKS(all_exact);
  REQUIRE_ALL_RANKS(hma::detail::uses(hma::detail::Use::fused) == fused);  // never in the check
  // As for small sets: at np 2 the rank that arrives last finds its partner's message there.
  long group_checked = static_cast<long>(hma::detail::uses(hma::detail::Use::lean_check) - checked);
  MPI_Allreduce(MPI_IN_PLACE, &group_checked, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
  CAPTURE(group_checked);
  REQUIRE_ALL_RANKS(size() > 2 || group_checked >= 1);
  // A late rank: the others hand their open check over, and the average is still exact.
  for (int k = 0; k < 2; ++k) {
    fill();
    const std::uint64_t before = hma::detail::uses(hma::detail::Use::lean_check);
    if (rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    avg.average(ps, 0);
    REQUIRE_ALL_RANKS(exact());
    REQUIRE_ALL_RANKS(rank() == 0 || hma::detail::uses(hma::detail::Use::lean_check) == before);
  }
  // Unequal weights: handed over, weighted.
  avg.set_weight(rank() + 1.0);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(rank() + 1);
  const std::uint64_t before = hma::detail::uses(hma::detail::Use::lean_check);
  avg.average(ps, 0);
  const double want = (2.0 * g + 1.0) / 3.0;  // sum (r + 1)^2 / sum (r + 1)
  CAPTURE(w[0], w[4095], want);
  // (MPI's reduction may add the ranks' terms in another order per segment: a rounding apart)
  REQUIRE_ALL_RANKS(std::abs(w[0] - want) <= 1e-6 * want && std::abs(w[4095] - want) <= 1e-6 * want);
  REQUIRE_ALL_RANKS(hma::detail::uses(hma::detail::Use::lean_check) == before);
  avg.set_weight(1.0);
  // A layout mismatch of a larger set: named on every rank, nothing averaged.
  hma::ParamSet bad;
  auto x = bad.allocate<float>(rank() == 1 ? 4000 : 4096, static_cast<float>(rank() + 1));
  require_layout_mismatch_of_rank1(avg, bad);
  REQUIRE_ALL_RANKS(x[0] == static_cast<float>(rank() + 1));
}
