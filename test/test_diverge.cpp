// The divergence matrix: ranks that stop doing the same thing. For each way a rank can diverge
// (a skipped, missing or extra step, a layout change on one rank, steps set apart, an exception
// on one rank, a setting that differs on one rank), in every configuration (flat and
// hierarchical schedule, poll and thread progress, host and emulated device sets, blocking
// step() and start()/wait() alternating), EVERY rank must end with a clear hma error, within a
// bounded time that is far below the test's own limit, never a hang, a crash or silent success.
// Flat schedules average at every step, so the first differing average is a MismatchError on
// every rank; hierarchical ones may leave ranks waiting for different groups, which the
// (short) timeout turns into hma::Timeout. Needs 2+ ranks: test/meson.build runs it at 2, 3, 4.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "control/check.hpp"
#include "control/stall.hpp"
#include "device/device_backend.hpp"
#include "hma/hma.hpp"
#include "mpi_test.hpp"
#include "transport/uses.hpp"

using hma_test::rank;
using hma_test::size;
using hma_test::thread_multiple;

namespace {


struct Config {
  bool hierarchical = false;
  bool thread = false;
  bool device = false;
  [[nodiscard]] std::string name() const {
    return std::string(hierarchical ? "hierarchical" : "flat") + (thread ? ", thread" : ", poll") +
           (device ? ", device (emulated)" : ", host");
  }
};

std::vector<Config> configs() {
  std::vector<Config> out;
  for (bool h : {false, true})
    for (bool t : {false, true})
      for (bool d : {false, true})
        if (!t || thread_multiple()) out.push_back({h, t, d});
  return out;
}

// ranks per "node" of the hierarchical schedule: 2 where the world splits in pairs, else 1.
int node_size() { return size() % 2 == 0 ? 2 : 1; }

// One averager and one set (host or emulated device) of 6 f32 + 3 f64 values, in a config.
struct Rig {
  static constexpr double kTimeout = 0.5;
  Config cfg;
  std::vector<float> f = std::vector<float>(6);  // registered arrays outlive the sets
  std::vector<double> d = std::vector<double>(3);
  std::unique_ptr<hma::Averager> avg;
  std::unique_ptr<hma::ParamSet> host;
  std::unique_ptr<hma::DeviceParamSet> dev;

  explicit Rig(Config c, hma::AveragerOptions o = {}) : cfg(c) {
    if (!o.timeout_s) o.timeout_s = kTimeout;
    o.progress = c.thread ? hma::Progress::thread : hma::Progress::poll;
    if (c.hierarchical)
      avg = std::make_unique<hma::HierarchicalAverager>(
          MPI_COMM_WORLD, std::vector<hma::Level>{{1, node_size()}, {2, size()}}, 0, o);
    else
      avg = std::make_unique<hma::PeriodicAverager>(MPI_COMM_WORLD, 1, 0, o);
    if (c.device) {
      hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend());
      dev = std::make_unique<hma::DeviceParamSet>();
      hma::detail::set_device_backend_for_testing(nullptr);
      dev->add(f.data(), f.size());
      dev->add(d.data(), d.size());
    } else {
      host = std::make_unique<hma::ParamSet>();
      host->add(f);
      host->add(d);
    }
  }
  // One scheduled step: blocking on even steps, start()+wait() on odd ones.
  void step() {
    const bool blocking = avg->step_count() % 2 == 0;
    if (dev) {
      if (blocking) avg->step(*dev);
      else avg->start(*dev).wait();
    } else {
      if (blocking) avg->step(*host);
      else avg->start(*host).wait();
    }
  }
  void average_world() {
    const std::size_t top = avg->schedule().levels().size() - 1;
    if (dev) avg->average(*dev, top);
    else avg->average(*host, top);
  }
  void add_array(std::vector<float>& extra) {
    if (dev) dev->add(extra.data(), extra.size());
    else host->add(extra);
  }
};

struct Outcome {
  std::string error = "none";  // the exception type, or "none"
  std::string what;
  double seconds = 0;
};

// Runs `body` on every rank, catching what it throws; then all ranks meet again (on the test's
// own communicator) for the next case.
Outcome run(const std::function<void()>& body) {
  Outcome o;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    body();
  } catch (const hma::MismatchError& e) {
    o.error = "MismatchError";
    o.what = e.what();
  } catch (const hma::Timeout& e) {
    o.error = "Timeout";
    o.what = e.what();
  } catch (const hma::Error& e) {
    o.error = "Error";
    o.what = e.what();
  } catch (const std::exception& e) {
    o.error = std::string("other: ") + e.what();
    o.what = e.what();
  }
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return o;
}

// Every rank ended with an hma error: MismatchError with `needle` in flat configurations,
// MismatchError or Timeout in hierarchical ones (a rank may wait for another group); in bounded
// time. `own` is the one rank allowed its own (non-hma) exception.
void require_error_everywhere(const Config& c, const Outcome& o, const std::string& needle, int own = -1) {
  INFO(c.name() << ": rank " << rank() << " got " << o.error << " after " << o.seconds << " s: " << o.what);
  if (std::getenv("HMA_DIVERGE_SHOW") != nullptr)  // the error texts, for the docs
    std::printf("[%s] %s: rank %d: %s after %.2f s: %s\n", Catch::getResultCapture().getCurrentTestName().c_str(),
                c.name().c_str(), rank(), o.error.c_str(), o.seconds, o.what.c_str());
  const bool mine = rank() == own && o.error.rfind("other: ", 0) == 0;
  // Flat: the exact field that differs. Hierarchical: which difference a group sees first
  // depends on the levels (a node level of one rank checks nothing), so any mismatch.
  const bool mismatch =
      o.error == "MismatchError" &&
      o.what.find(c.hierarchical ? "the ranks of the group are not in the same average" : needle) !=
          std::string::npos;
  const bool timeout = o.error == "Timeout" && o.what.find("HMA_TIMEOUT_S") != std::string::npos;
  REQUIRE_ALL_RANKS(mine || mismatch || ((c.hierarchical || own >= 0) && timeout));
  REQUIRE_ALL_RANKS(o.seconds < 8 * Rig::kTimeout + 2);
}

constexpr int kIters = 8;

}  // namespace

TEST_CASE("divergence: a rank skips one step() mid-run") {
  for (const Config& c : configs()) {
    const int x = size() - 1;
    Rig rig(c);
    const Outcome o = run([&] {
      for (int it = 0; it < kIters; ++it)
        if (!(rank() == x && it == 3)) rig.step();
      rig.average_world();  // where the lag shows: the step counters alone matched at every average
    });
    require_error_everywhere(c, o, "average()/start_average() on world rank " + std::to_string(x));
  }
}

TEST_CASE("divergence: a rank skips its last step()") {
  for (const Config& c : configs()) {
    Rig rig(c);
    const Outcome o = run([&] {
      for (int it = 0; it < kIters; ++it)
        if (!(rank() == 0 && it == kIters - 1)) rig.step();
      rig.average_world();
    });
    require_error_everywhere(c, o, "average()/start_average() on world rank 0");
  }
}

TEST_CASE("divergence: a rank calls step() once more") {
  for (const Config& c : configs()) {
    const int x = size() / 2;
    Rig rig(c);
    const Outcome o = run([&] {
      for (int it = 0; it < kIters; ++it) {
        rig.step();
        if (rank() == x && it == 2) rig.step();
      }
      rig.average_world();
    });
    require_error_everywhere(c, o, "step()/start() on world rank " + std::to_string(x));
  }
}

TEST_CASE("divergence: one rank changes its layout after the first average") {
  for (const Config& c : configs()) {
    const int x = size() - 1;
    Rig rig(c);
    std::vector<float> extra(5, 1.0f);
    const Outcome o = run([&] {
      rig.step();
      rig.step();
      if (rank() == x) rig.add_array(extra);
      for (int it = 2; it < kIters; ++it) rig.step();
      rig.average_world();
    });
    require_error_everywhere(c, o, "buffer layout: 2 arrays");
  }
}

TEST_CASE("divergence: set_step() and restore() to different values") {
  for (const Config& c : configs()) {
    Rig rig(c);
    const Outcome o = run([&] {
      rig.step();
      if (rank() == 1) rig.avg->set_step(3);
      for (int it = 1; it < kIters; ++it) rig.step();
      rig.average_world();
    });
    require_error_everywhere(c, o, "step counter: step ");
  }
  // restore() checks at once, on every rank: hma::MismatchError from restore() itself.
  for (const Config& c : configs()) {
    Rig rig(c);
    rig.avg->set_step(rank() == 0 ? 10 : 12);
    const std::string text = rig.avg->checkpoint();
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, rig.avg->restore(text), "the restored step or outer optimizer state differs across ranks");
  }
}

TEST_CASE("divergence: an exception on one rank while the others average") {
  for (const Config& c : configs()) {
    const int x = size() - 1;
    const Outcome o = run([&] {
      Rig rig(c);  // unwound on rank x while the others wait for it
      for (int it = 0; it < kIters; ++it) {
        if (rank() == x && it == 3) throw std::runtime_error("the user's own failure on rank x");
        rig.step();
      }
    });
    require_error_everywhere(c, o, "no mismatch expected", x);
  }
}

TEST_CASE("divergence: every setting that differs on one rank is refused at construction") {
  const int x = size() - 1;
  using O = hma::AveragerOptions;
  const std::vector<std::pair<const char*, std::function<void(O&)>>> settings = {
      {"chunk bytes", [](O& o) { o.chunk_bytes = 4096; }},
      {"reduction", [](O& o) { o.reduction = hma::Reduction::ring; }},
      {"algorithm", [](O& o) { o.algorithm = hma::Algorithm::two_level; }},
      {"progress", [](O& o) { o.progress = hma::Progress::thread; }},
      {"non-finite", [](O& o) { o.nonfinite = hma::NonFinite::skip; }},
      {"check", [](O& o) { o.check_every_average = false; }},
      {"timeout", [](O& o) { o.timeout_s = 99; }},
      {"timeout", [](O& o) { o.timeout_s = 0; }},
      {"staging chunk bytes", [](O& o) { o.staging_chunk_bytes = 8192; }},
      {"ranks per node", [](O& o) { o.hierarchy.ranks_per_node = 1; }},
      // Direct instead of staged (a CUDA-aware MPI alone no longer changes auto's choice).
      {"device path", [](O& o) { o.cuda_aware = true; o.device_path = hma::DevicePath::direct; }},
  };
  for (const auto& [name, set] : settings) {
    if (std::string(name) == "progress" && !thread_multiple()) continue;
    CAPTURE(name);
    O o;
    if (rank() == x) set(o);
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, o),
                             "the averaging settings (HMA_* variables or AveragerOptions) differs "
                             "across ranks: rank " + std::to_string(x));
  }
  // The environment too, and ranks per node before anything splits by it (the "node" token of a
  // schedule string needs it first).
  for (const char* var : {"HMA_TIMEOUT_S", "HMA_RANKS_PER_NODE", "HMA_CHECK", "HMA_RING_MIN_BLOCK_BYTES"}) {
    CAPTURE(var);
    struct Unset {  // even when a REQUIRE fails
      const char* v;
      ~Unset() { unsetenv(v); }
    } unset{var};
    const std::string value = std::string(var) == "HMA_CHECK" ? "0" : "1";
    if (rank() == x) setenv(var, value.c_str(), 1);
    const std::string needle = std::string(var) == "HMA_RANKS_PER_NODE" ? "ranks per node" : "settings";
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError,
                             hma::HierarchicalAverager(MPI_COMM_WORLD, "1:node,2:world", 0), needle);
    REQUIRE_THROWS_ALL_RANKS(hma::MismatchError, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0), needle);
  }
}

TEST_CASE("timeouts: inf and huge mean no limit; tiny ones time out and resume; NaN is refused") {
  for (double t : {std::numeric_limits<double>::infinity(), 1e10, 1e300}) {
    for (const Config& c : configs()) {
      CAPTURE(t, c.name());
      hma::AveragerOptions o;
      o.timeout_s = t;
      Rig rig(c, o);
      for (int it = 0; it < 4; ++it) {
        std::fill(rig.f.begin(), rig.f.end(), static_cast<float>(2 * rank() + it));
        std::fill(rig.d.begin(), rig.d.end(), 2.0 * rank() + it);
        if (rig.dev) rig.avg->average(*rig.dev, rig.avg->schedule().levels().size() - 1);
        else rig.avg->average(*rig.host, rig.avg->schedule().levels().size() - 1);
        if (rig.dev) rig.dev->synchronize();
        const double mean = size() - 1 + it;  // the mean of 2r + it, exact in binary
        REQUIRE_ALL_RANKS(rig.f[5] == static_cast<float>(mean) && rig.d[2] == mean);
      }
    }
  }
  // 1e-9 s: a wait almost always times out; every Timeout leaves the average resumable.
  for (const Config& c : configs()) {
    CAPTURE(c.name());
    hma::AveragerOptions o;
    o.timeout_s = 1e-9;
    Rig rig(c, o);
    int timeouts = 0;
    for (int it = 0; it < 4; ++it) {
      std::fill(rig.f.begin(), rig.f.end(), static_cast<float>(2 * rank() + it));
      std::fill(rig.d.begin(), rig.d.end(), 2.0 * rank() + it);
      try {
        if (rig.dev) rig.avg->average(*rig.dev, rig.avg->schedule().levels().size() - 1);
        else rig.avg->average(*rig.host, rig.avg->schedule().levels().size() - 1);
      } catch (const hma::Timeout&) {
        ++timeouts;
      }
      if (rig.dev) timeouts += hma_test::wait_through_timeouts(*rig.dev);
      else timeouts += hma_test::wait_through_timeouts(*rig.host);
      if (rig.dev) rig.dev->synchronize();
      const double mean = size() - 1 + it;
      REQUIRE_ALL_RANKS(rig.f[5] == static_cast<float>(mean) && rig.d[2] == mean);
    }
    (void)timeouts;  // how many depends on timing; the values above are what must hold
  }
  hma::AveragerOptions o;
  o.timeout_s = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, o),
                           "timeout_s must be >= 0 seconds");
  setenv("HMA_TIMEOUT_S", "nan", 1);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0),
                           "HMA_TIMEOUT_S='nan' must be a non-negative number of seconds or inf");
  unsetenv("HMA_TIMEOUT_S");
}

TEST_CASE("after a timeout, destroying the averager and the set waits no second timeout") {
  for (const Config& c : configs()) {
    CAPTURE(c.name());
    hma::AveragerOptions o;
    o.timeout_s = 1.0;
    double destroy_s = 0;
    const Outcome out = run([&] {
      Rig rig(c, o);
      rig.average_world();  // all present
      if (rank() == 0) return;  // rank 0 never comes to the next average
      try {
        rig.average_world();
      } catch (const hma::Timeout&) {
        const auto t0 = std::chrono::steady_clock::now();
        rig.avg.reset();
        rig.host.reset();
        rig.dev.reset();
        destroy_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        throw;
      }
    });
    INFO("rank " << rank() << ": " << out.error << " " << out.what);
    REQUIRE_ALL_RANKS(rank() == 0 ? out.error == "none" : out.error == "Timeout");
    REQUIRE_ALL_RANKS(destroy_s < 0.5);
  }
}

TEST_CASE("a set destroyed after a timeout never starts its data stage, even once its peers arrive",
          "[np>=2]") {
  // Rank 0 times out waiting for the late others, gives up and destroys its set only after they
  // arrived (so rank 0's check is complete by then). Starting the data stage from a dying
  // set would touch arrays that are going away; instead rank 1's started average must time out
  // in its wait, never silently complete with rank 0's data. Poll progress only: with a
  // progress thread the peers' worker would stay blocked in the data collective for good (the
  // case README "Reliability" says no library can bound: end such a job with MPI_Abort).
  //
  // A small set (64 floats) rides in its check (fused): rank 0's terms, copied when it started,
  // are in its first message. Peers whose rounds needed nothing more from rank 0 then complete
  // with the average of every rank's values at start() (a copy: the dying set is never touched);
  // the others time out in the check. Either way, never wrong values. A large set (2048 floats)
  // has a data stage: every peer times out.
  const bool thread = false;
  for (std::size_t n : {std::size_t{64}, std::size_t{2048}}) {
    CAPTURE(n);
    const std::uint64_t fused_before = hma::detail::uses(hma::detail::Use::fused);
    hma::AveragerOptions o;
    o.timeout_s = 0.4;
    o.progress = thread ? hma::Progress::thread : hma::Progress::poll;
    Outcome out;
    std::vector<float> v(n, static_cast<float>(rank()));
    {
      hma::HierarchicalAverager avg(MPI_COMM_WORLD, std::vector<hma::Level>{{1, size()}}, 0, o);
      auto ps = std::make_unique<hma::ParamSet>();
      ps->add(v);
      MPI_Barrier(MPI_COMM_WORLD);
      out = run([&] {
        if (rank() == 0) {
          try {
            (void)avg.start(*ps);
          } catch (const hma::Timeout&) {
            // The others arrive meanwhile; rank 0 keeps making MPI calls (as a program that
            // moves on does), which completes its side of the check in the background.
            const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500);
            while (std::chrono::steady_clock::now() < until) {
              int flag = 0;
              MPI_Iprobe(MPI_ANY_SOURCE, 4242, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
              std::this_thread::sleep_for(std::chrono::milliseconds(1));
            }
            ps.reset();  // gives up: must not start the data stage now that the check completed
            throw;
          }
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(1000));
          auto r = avg.start(*ps);  // rank 0's check contribution is there: passes (2 ranks)
          // Keep waiting past the moment rank 0 destroys its set (1.9 s): rank 0 must never
          // join the data, so this ends in Timeout, not in an average with a dying set.
          const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2500);
          while (true) {
            try {
              r.wait();
              break;
            } catch (const hma::Timeout&) {
              if (std::chrono::steady_clock::now() > until) throw;
            }
          }
        }
      });
      MPI_Barrier(MPI_COMM_WORLD);
    }
    INFO("rank " << rank() << ": " << out.error << ": " << out.what);
    const bool fused = n * sizeof(float) <= hma::detail::kFusedBytes;
    const bool averaged =
        std::all_of(v.begin(), v.end(), [](float x) { return std::fabs(x - (size() - 1) / 2.0f) < 1e-6f; });
    REQUIRE_ALL_RANKS(out.error != "none" || (fused && hma::detail::uses(hma::detail::Use::fused) > fused_before));
    REQUIRE_ALL_RANKS(rank() == 0 ? out.error == "Timeout" && v[0] == 0.0f
                                  : (out.error == "Timeout" && v[0] == static_cast<float>(rank())) ||
                                        (fused && out.error == "none" && averaged));
    // At 2 ranks rank 0's one message is all a peer needs: the fused average completes there.
    REQUIRE_ALL_RANKS(!(fused && size() == 2 && rank() == 1) || out.error == "none");
    // The peers' check completes where rank 0's first message was all it needed (2 ranks), and
    // they then time out in the data; with more ranks the check's later rounds need rank 0,
    // which has left: they time out in the check. Never an average with the dying set.
    REQUIRE_ALL_RANKS(rank() == 0 || out.error == "none" ||
                      out.what.find("did not complete within 0.4 s") != std::string::npos ||
                      (size() > 2 && out.what.find("was not reached by every rank of the group within 0.4 s") !=
                                         std::string::npos));
  }
}

namespace {
std::vector<std::string> g_stalls;  // the stall warnings this rank logged
void capture_stall(const std::string& line) { g_stalls.push_back(line); }
bool any_stall_has(const std::string& a, const std::string& b = "") {
  for (const auto& l : g_stalls)
    if (l.find(a) != std::string::npos && l.find(b) != std::string::npos) return true;
  return false;
}
struct StallHook {
  StallHook() { g_stalls.clear(); hma::detail::set_stall_hook_for_testing(&capture_stall); }
  ~StallHook() { hma::detail::set_stall_hook_for_testing(nullptr); }
};
// A set of 8 f32 values 2r + t, host or emulated device (as `c` says); true when it holds their
// mean over the world.
struct Small {
  std::vector<float> a = std::vector<float>(8);  // registered: outlives the set
  std::unique_ptr<hma::ParamSet> host;
  std::unique_ptr<hma::DeviceParamSet> dev;
  explicit Small(const Config& c = {}) {
    if (c.device) {
      hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend());
      dev = std::make_unique<hma::DeviceParamSet>();
      hma::detail::set_device_backend_for_testing(nullptr);
      dev->add(a.data(), a.size());
    } else {
      host = std::make_unique<hma::ParamSet>();
      host->add(a);
    }
  }
  void fill(int t) { std::fill(a.begin(), a.end(), static_cast<float>(2 * rank() + t)); }
  void step(hma::Averager& avg) {
    if (dev) avg.step(*dev);
    else avg.step(*host);
  }
  void average_world(hma::Averager& avg) {
    const std::size_t top = avg.schedule().levels().size() - 1;
    if (dev) avg.average(*dev, top);
    else avg.average(*host, top);
  }
  void wait_through_timeouts() {
    if (dev) (void)hma_test::wait_through_timeouts(*dev);
    else (void)hma_test::wait_through_timeouts(*host);
  }
  // Exact where the group size is a power of two; else within 1e-6 (each term is divided by the
  // group size, which rounds, and the sum's order follows the communicator's).
  [[nodiscard]] bool averaged(int t) const {
    if (dev) dev->synchronize();
    const float mean = static_cast<float>(size() - 1 + t);
    const float tol = (size() & (size() - 1)) == 0 ? 0.0f : 1e-6f * mean;
    for (float v : a)
      if (!(std::abs(v - mean) <= tol)) return false;
    return true;
  }
};
// The stall matrix: poll and thread progress (where MPI gives MPI_THREAD_MULTIPLE), host and
// emulated device sets; flat schedules unless a case asks for the hierarchical one.
std::vector<Config> stall_configs() {
  std::vector<Config> out;
  for (const Config& c : configs())
    if (!c.hierarchical) out.push_back(c);
  return out;
}
// An averager over `comm` in `c`: periodic 1 (flat), or levels 1:node_size(), 2:world
// (hierarchical).
std::unique_ptr<hma::Averager> averager_in(const Config& c, hma::AveragerOptions o,
                                           MPI_Comm comm = MPI_COMM_WORLD) {
  o.progress = c.thread ? hma::Progress::thread : hma::Progress::poll;
  if (c.hierarchical)
    return std::make_unique<hma::HierarchicalAverager>(
        comm, std::vector<hma::Level>{{1, node_size()}, {2, size()}}, 0, o);
  return std::make_unique<hma::PeriodicAverager>(comm, 1, 0, o);
}
// MPI_COMM_WORLD with its ranks in reverse order: a communicator whose ranks are not the world
// ranks (which the stall lines must name).
struct Reversed {
  MPI_Comm comm = MPI_COMM_NULL;
  Reversed() { MPI_Comm_split(MPI_COMM_WORLD, 0, size() - 1 - rank(), &comm); }
  ~Reversed() { MPI_Comm_free(&comm); }
  Reversed(const Reversed&) = delete;
  Reversed& operator=(const Reversed&) = delete;
};
std::string world_rank(int r) { return "world rank " + std::to_string(r); }
std::string others_than(int x) { return x == 1 ? "world rank 0" : "world ranks 0-" + std::to_string(x - 1); }
// The world ranks a Timeout message says have not reached its average ("Where the group is:
// world ranks 0,2-3 have not reached this average; ..."); empty when it names none.
std::vector<int> missing_in(const std::string& what) {
  const std::string head = "Where the group is: world rank";
  const auto at = what.find(head);
  if (at == std::string::npos) return {};
  const auto from = what.find(' ', at + head.size()), to = what.find(" not reached this average", at);
  if (from == std::string::npos || to == std::string::npos || to < from) return {};
  std::vector<int> out;
  std::string list = what.substr(from + 1, to - from - 1);  // "0,2-3 have"
  list = list.substr(0, list.find(' '));
  for (std::size_t i = 0; i < list.size();) {
    std::size_t end = list.find(',', i);
    if (end == std::string::npos) end = list.size();
    const std::string item = list.substr(i, end - i);
    const auto dash = item.find('-');
    const int lo = std::atoi(item.substr(0, dash).c_str());
    const int hi = dash == std::string::npos ? lo : std::atoi(item.substr(dash + 1).c_str());
    for (int r = lo; r <= hi; ++r) out.push_back(r);
    i = end + 1;
  }
  return out;
}
bool named_missing(const std::string& what, int r) {
  const std::vector<int> m = missing_in(what);
  return std::find(m.begin(), m.end(), r) != m.end();
}
}  // namespace

TEST_CASE("stalls: a rank that sleeps outside hma is named by the waiting ranks, and the wait goes on",
          "[np>=2]") {
  const int x = size() - 1;
  for (const Config& c : stall_configs()) {
    CAPTURE(c.name());
    StallHook hook;
    hma::AveragerOptions o;
    o.stall_warn_s = 0.2;
    o.timeout_s = 60;
    const auto avg = averager_in(c, o);
    Small m(c);
    m.fill(0);
    if (rank() == x) std::this_thread::sleep_for(std::chrono::milliseconds(800));
    m.step(*avg);
    REQUIRE_ALL_RANKS(m.averaged(0));
    INFO((g_stalls.empty() ? std::string("no stall warning") : g_stalls.front()));
    // Rank x did not wait long enough to warn; the others named it, and where they wait.
    const std::string avg_here = "averager " + std::to_string(avg->id()) + " step 0 level 0";
    REQUIRE_ALL_RANKS(rank() == x ? !any_stall_has("has not reached")
                                  : any_stall_has(world_rank(x) + " has not reached this average",
                                                  world_rank(x) + " is outside hma (no answer within 0.05 s"));
    REQUIRE_ALL_RANKS(rank() == x || any_stall_has("HMA_STALL_WARN_S", avg_here + " (the agreement check)"));
  }
}

TEST_CASE("stalls: answers that come after their bound (a loaded machine) still place the ranks that sent them",
          "[np>=3]") {
  StallHook hook;
  // Every rank answers 0.1 s after a query arrives, past the 0.05 s bound: each query's answers
  // come late, during the next one (0.2 s on), which places the waiting ranks by them.
  hma::detail::set_answer_delay_for_testing(0.1);
  struct Undelay {
    ~Undelay() { hma::detail::set_answer_delay_for_testing(0); }
  } undelay;
  const int x = size() - 1;
  hma::AveragerOptions o;
  o.stall_warn_s = 0.2;
  o.timeout_s = 60;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, o);
  Small m;
  m.fill(4);
  if (rank() == x) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  m.step(avg);
  REQUIRE_ALL_RANKS(m.averaged(4));
  INFO((g_stalls.empty() ? std::string("no stall warning") : g_stalls.back()));
  const std::string avg_here = "averager " + std::to_string(avg.id()) + " step 0 level 0 (the agreement check)";
  REQUIRE_ALL_RANKS(rank() == x ||
                    any_stall_has(world_rank(x) + " has not reached this average; " + world_rank(x) +
                                      " is outside hma (no answer within 0.05 s",
                                  "; " + others_than(x) + " wait at " + avg_here));
}

TEST_CASE("stalls: an answer that comes after its query's bound counts only for the next query about the same average",
          "[np>=2]") {
  namespace hd = hma::detail;
  const int x = size() - 1;
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  const std::vector<int> asked{rank(), x};  // each rank asks x only
  const hd::Position at7{avg.id(), 7, 0, 0, 0}, at8{avg.id(), 8, 0, 0, 0};
  // Rank x answers 0.2 s after a query arrives; the others ask with a 0.05 s bound, so its
  // answers (from step 7) always come after it.
  auto serve_as = [&](const hd::Position& where, int ms) {
    hd::update_here(where);
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < until) {
      hd::serve_queries();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    hd::update_here(hd::Position{});
  };
  std::vector<std::string> said;
  if (rank() == x) hd::set_answer_delay_for_testing(0.2);
  for (const auto& [here, pause] : {std::pair{at7, 0}, std::pair{at7, 0}, std::pair{at8, 400}}) {
    if (rank() == x) {
      serve_as(at7, 400);  // answers every query of this round late, from step 7
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(pause));  // x's last answer is in
      said.push_back(hd::where_is_everyone(avg.id(), asked, here, 0.05));
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  hd::set_answer_delay_for_testing(0);
  INFO("first: " << (said.empty() ? "" : said[0]));
  INFO("second: " << (said.size() > 1 ? said[1] : ""));
  INFO("third: " << (said.size() > 2 ? said[2] : ""));
  const std::string out = world_rank(x) + " is outside hma (no answer within 0.05 s";
  // 1: nothing yet. 2: the late answer to query 1, about the same average, places x at step 7.
  // 3: about step 8; the late answer to query 2 (about step 7) is stale: x is outside hma.
  REQUIRE_ALL_RANKS(rank() == x || (said.size() == 3 && said[0].find(out) != std::string::npos &&
                                    said[1].find("every rank of the group is in this average") == 0 &&
                                    said[2].find(out) != std::string::npos));
}

TEST_CASE("stalls: two averagers called in another order on one rank: both sides named, in the warning and the Timeout",
          "[np>=2]") {
  const int x = size() - 1;
  const Reversed reversed;
  // Every configuration over MPI_COMM_WORLD; then poll and host over the reversed world.
  std::vector<std::pair<Config, MPI_Comm>> runs;
  for (const Config& c : stall_configs()) runs.emplace_back(c, MPI_COMM_WORLD);
  runs.emplace_back(Config{}, reversed.comm);
  for (const auto& [c, comm] : runs) {
    CAPTURE(c.name(), comm == MPI_COMM_WORLD ? "MPI_COMM_WORLD" : "its ranks reversed");
    StallHook hook;
    hma::AveragerOptions o;
    o.stall_warn_s = 0.2;
    o.timeout_s = 1;
    const auto a1 = averager_in(c, o, comm);
    const auto a2 = averager_in(c, o, comm);
    const std::string at1 = "averager " + std::to_string(a1->id()) + " step 0 level 0 (the agreement check)";
    const std::string at2 = "averager " + std::to_string(a2->id()) + " step 0 level 0 (the agreement check)";
    REQUIRE_ALL_RANKS(a1->id() > 0 && a2->id() == a1->id() + 1);
    Small s1(c), s2(c);
    s1.fill(1);
    s2.fill(2);
    std::string what;
    try {
      if (rank() == x) s2.step(*a2);
      else s1.step(*a1);
    } catch (const hma::Timeout& e) {
      what = e.what();
    }
    // Every rank has timed out (and asked) before any makes the other call.
    MPI_Barrier(MPI_COMM_WORLD);
    INFO("Timeout: " << what);
    INFO((g_stalls.empty() ? std::string("no stall warning") : g_stalls.front()));
    // Each side names the other and where it is; the Timeout names who has not reached it.
    // (On a loaded machine a rank may miss one answer's bound: some warning names it where it is.)
    REQUIRE_ALL_RANKS(rank() == x ? any_stall_has(" at " + at1 + ";", world_rank(x) + " waits at " + at2)
                                  : any_stall_has(world_rank(x) + " is at " + at2, " at " + at1));
    // The waiting ranks by world rank, in ascending order, whatever the communicator's order.
    REQUIRE_ALL_RANKS(rank() == x ||
                      any_stall_has("; " + others_than(x) + (x == 1 ? " waits at " : " wait at ") + at1));
    // (Ranks that timed out first and left the wait may be missing too by then.)
    REQUIRE_ALL_RANKS(rank() == x ? missing_in(what).size() == static_cast<std::size_t>(x)
                                  : named_missing(what, x));
    // Each side then makes the other's call: both averages complete.
    if (rank() == x) {
      s1.step(*a1);
      s2.wait_through_timeouts();
    } else {
      s1.wait_through_timeouts();
      s2.step(*a2);
    }
    REQUIRE_ALL_RANKS(s1.averaged(1) && s2.averaged(2));
  }
}

TEST_CASE("stalls: a rank that skipped a step() waits in another group than its partners: every side named",
          "[np>=2]") {
  // Levels 1:node_size() and 2:world: step 0 averages over the world, step 1 over the node
  // groups. Every rank calls step() twice and then average() over the world, but rank x skips
  // its second step(). With node groups of 2 ranks in a larger world (even rank counts >= 4),
  // the ranks wait in three places (the hierarchical skip of the matrix above, named): x's node
  // partner p in step 1 at level 0 (for x), x in average() at step 1 (for p), the others in
  // average() at step 2. Where the node groups are one rank (odd counts) or the world (np 2),
  // the ranks meet in one check: a MismatchError on every rank, no wait.
  const int x = size() - 1, p = x - 1;
  const bool stalls = node_size() > 1 && node_size() < size();
  for (Config c : stall_configs()) {
    c.hierarchical = true;
    CAPTURE(c.name());
    StallHook hook;
    hma::AveragerOptions o;
    o.stall_warn_s = 0.2;
    o.timeout_s = 1;
    const auto avg = averager_in(c, o);
    Small m(c);
    m.fill(5);
    const Outcome out = run([&] {
      m.step(*avg);  // step 0: the world
      if (rank() != x) m.step(*avg);  // step 1: the node groups
      m.average_world(*avg);
    });
    MPI_Barrier(MPI_COMM_WORLD);
    INFO("rank " << rank() << ": " << out.error << ": " << out.what);
    INFO((g_stalls.empty() ? std::string("no stall warning") : g_stalls.front()));
    const std::string id = "averager " + std::to_string(avg->id());
    const std::string at_p = id + " step 1 level 0 (the agreement check)";
    const std::string at_x = id + " step 1 level 1 (average()) (the agreement check)";
    const std::string at_others = id + " step 2 level 1 (average()) (the agreement check)";
    if (!stalls) {  // np 2: x's average() meets p's step 1; odd counts: the others' average()
      const std::string field =
          node_size() == size()
              ? "call: step()/start() on " + others_than(x) + ", average()/start_average() on " + world_rank(x)
              : "step counter: step 2 on " + others_than(x) + ", step 1 on " + world_rank(x);
      REQUIRE_ALL_RANKS(out.error == "MismatchError" && out.what.find(field) != std::string::npos);
      continue;
    }
    // Each rank names the ranks of its group that are elsewhere, and where each of them is. (On a
    // loaded machine a rank may miss one answer's bound: some warning names it where it is.)
    const std::string others = p == 1 ? "world rank 0" : "world ranks 0-" + std::to_string(p - 1);
    const std::string both = "world ranks " + std::to_string(p) + "-" + std::to_string(x);
    if (rank() == x)
      REQUIRE_ALL_RANKS(any_stall_has(world_rank(p) + " is at " + at_p + "; " + others + " are at " +
                                      at_others + "; " + world_rank(x) + " waits at " + at_x));
    else if (rank() == p)
      REQUIRE_ALL_RANKS(any_stall_has(world_rank(x) + " has not reached this average; " + world_rank(x) +
                                      " is at " + at_x + "; " + world_rank(p) + " waits at " + at_p));
    else
      REQUIRE_ALL_RANKS(any_stall_has(both + " have not reached this average; " + world_rank(p) + " is at " +
                                      at_p + "; " + world_rank(x) + " is at " + at_x + "; " + others +
                                      " wait at " + at_others));
    // Every rank times out; its Timeout names who has not reached its average (ranks that timed
    // out first and left their wait may be missing too by then). Nothing can resume: x's partner
    // waits for a step() that x never makes (the averager and the set leak what is in flight).
    REQUIRE_ALL_RANKS(out.error == "Timeout" && named_missing(out.what, rank() == p ? x : p));
  }
}

TEST_CASE("stalls: a rank that has left (blocked in MPI elsewhere) is outside hma in the Timeout", "[np>=2]") {
  const int x = size() - 1;
  for (const Config& c : stall_configs()) {
    CAPTURE(c.name());
    StallHook hook;
    hma::AveragerOptions o;
    o.stall_warn_s = 0;  // off: only the Timeout says it
    o.timeout_s = 1;
    const auto avg = averager_in(c, o);
    Small m(c);
    m.fill(3);
    std::string what;
    if (rank() == x) {
      MPI_Barrier(MPI_COMM_WORLD);  // left: waits for the others outside hma
    } else {
      try {
        m.step(*avg);
      } catch (const hma::Timeout& e) {
        what = e.what();
      }
      MPI_Barrier(MPI_COMM_WORLD);
    }
    INFO("Timeout: " << what);
    REQUIRE_ALL_RANKS(g_stalls.empty());
    REQUIRE_ALL_RANKS(rank() == x || what.find(world_rank(x) + " is outside hma (no answer within 0.25 s: computing, "
                                               "blocked elsewhere, or dead)") != std::string::npos);
    // It comes back: the average completes.
    if (rank() == x) m.step(*avg);
    else m.wait_through_timeouts();
    REQUIRE_ALL_RANKS(m.averaged(3));
  }
  // Bad values are refused, naming them.
  hma::AveragerOptions o;
  o.stall_warn_s = -1;
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0, o),
                           "stall_warn_s must be a finite number of seconds >= 0");
  setenv("HMA_STALL_WARN_S", "soon", 1);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, hma::PeriodicAverager(MPI_COMM_WORLD, 1, 0),
                           "HMA_STALL_WARN_S='soon' must be a finite number of seconds >= 0");
  unsetenv("HMA_STALL_WARN_S");
}
