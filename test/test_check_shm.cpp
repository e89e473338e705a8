// The agreement check through shared memory (lib/control/check_shm.cpp): which levels use it
// (describe()), and what only it can get wrong: more checks in flight than a rank's buffers,
// waited for in another order on every rank (a rank waiting for one must still write the
// others, or the group hangs). HMA_CHECK_SHM=0 runs this file too, as messages. Everything else
// (exact values, mismatches, late ranks, timeouts) runs through it in the other test files.
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "hma/hma.hpp"
#include "control/check.hpp"
#include "mpi_test.hpp"

using hma_test::rank;
using hma_test::size;

namespace {
bool shm_allowed() {
  const char* v = std::getenv("HMA_CHECK_SHM");
  return v == nullptr || std::string(v) != "0";
}
int ranks_per_node() {
  const char* v = std::getenv("HMA_RANKS_PER_NODE");
  return v == nullptr ? 0 : std::atoi(v);
}
hma::AveragerOptions opts(double timeout_s = 30) {
  hma::AveragerOptions o;
  o.timeout_s = timeout_s;
  return o;
}
}  // namespace

TEST_CASE("a group in one node checks through shared memory, one across nodes as messages", "[np>=2]") {
  const int g = size(), rpn = ranks_per_node();
  hma::PeriodicAverager world(MPI_COMM_WORLD, 1, 0, opts());
  const std::string d = world.describe();
  CAPTURE(d);
  const bool one_node = rpn == 0 || rpn >= g;
  const char* expect = shm_allowed() && one_node ? "level 0 through shared memory" : "level 0 as messages";
  REQUIRE_ALL_RANKS(d.find(expect) != std::string::npos);
  if (rpn > 0 && rpn < g && g % rpn == 0) {  // emulated nodes: the node level in one, the world across
    hma::HierarchicalAverager h(MPI_COMM_WORLD, {{1, rpn}, {2, g}}, 0, opts());
    const std::string e = h.describe();
    CAPTURE(e);
    REQUIRE_ALL_RANKS(e.find(shm_allowed() ? "level 0 through shared memory" : "level 0 as messages") !=
                      std::string::npos);
    REQUIRE_ALL_RANKS(e.find("level 1 as messages") != std::string::npos);
  }
}

TEST_CASE("more checks in flight than a rank's buffers, completed in another order on every rank", "[np>=2]") {
  // An averager completes each check before it starts the next one at that level (start()
  // returns once its group agreed, or throws Timeout and starts nothing more until that one is
  // through), so checks pile up on one channel only after abandoned ones, or through the check's
  // own interface, driven here directly: rank 0 starts 11 checks with a payload, then the others
  // do (through shared memory a rank writes only ShmChannel::kBuffers of them at once; the rest
  // as the group releases buffers), then each tests them in its own order. A wait that drove
  // only its own check would hang the group; a write into a buffer not yet released would be
  // read as another check.
  using hma::detail::ControlCheck;
  const int g = size(), r = rank();
  MPI_Comm ctrl = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &ctrl);
  {
    // Through shared memory, or (HMA_CHECK_SHM=0, emulated nodes) as messages: the same test.
    const bool shared = shm_allowed() && ranks_per_node() == 0;
    hma::detail::CheckChannels channels({ctrl}, {shared});
    REQUIRE_ALL_RANKS(channels.shared_memory(ctrl) == shared);
    constexpr int kChecks = 11;
    constexpr std::size_t kTerms = 3;
    std::vector<std::unique_ptr<ControlCheck>> checks;
    if (r != 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));  // rank 0 starts all first
    for (int i = 0; i < kChecks; ++i) {
      checks.push_back(std::make_unique<ControlCheck>());
      ControlCheck& c = *checks.back();
      c.reserve();
      const ControlCheck::Payload p = c.stage_payload(kTerms, 0);
      for (std::size_t j = 0; j < kTerms; ++j) p.f[j] = static_cast<float>((r + 1) * (i + 1) + static_cast<int>(j));
      hma::detail::Header h;
      h.v[hma::detail::Header::step] = static_cast<std::uint64_t>(i);
      c.start(ctrl, h, false, hma::detail::Weight{1} << 32);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    bool stuck = false;
    // As messages, a check's rounds advance only while it is tested: every rank tests in start
    // order, as the averager does.
    for (int k = 0; k < kChecks; ++k) {
      const int i = !shared ? k : r == 0 ? kChecks - 1 - k : (k + kChecks / 2) % kChecks;
      while (!checks[static_cast<std::size_t>(i)]->test() && !stuck) {
        stuck = std::chrono::steady_clock::now() > deadline;
        std::this_thread::yield();
      }
    }
    REQUIRE_ALL_RANKS(!stuck);
    bool ok = true;
    hma::detail::GroupInfo who;
    for (int w = 0; w < g; ++w) who.world_ranks.push_back(w);
    for (int i = 0; i < kChecks; ++i) {
      ControlCheck& c = *checks[static_cast<std::size_t>(i)];
      (void)c.resolve(who);
      ok = ok && c.passed_plain() && c.fused();
      // sum over ranks of (r + 1)(i + 1) + j: exact integers
      for (std::size_t j = 0; ok && j < kTerms; ++j)
        ok = c.fused_f()[j] == static_cast<float>((i + 1) * g * (g + 1) / 2 + g * static_cast<int>(j));
    }
    REQUIRE_ALL_RANKS(ok);
  }
  MPI_Comm_free(&ctrl);
}
