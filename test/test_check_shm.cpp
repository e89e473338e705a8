// The agreement check through shared memory (lib/control/check_shm.cpp): which levels use it
// (describe()), and what only it can get wrong: more checks in flight than a rank's buffers,
// waited for in another order on every rank (a rank waiting for one must still write the
// others, or the group hangs). HMA_CHECK_SHM=0 runs this file too, as messages. Everything else
// (exact values, mismatches, late ranks, timeouts) runs through it in the other test files.
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "hma/hma.hpp"
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

TEST_CASE("more checks in flight than a rank's buffers, waited for in another order on every rank", "[np>=2]") {
  const int g = size(), r = rank();
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0, opts());
  // Sets of 3 floats (their terms ride in the check) and of 3000 (the data moves after it).
  for (const std::size_t n : {std::size_t{3}, std::size_t{3000}}) {
    CAPTURE(n);
    constexpr int kSets = 11;  // more than ShmChannel::kBuffers, several times over
    std::vector<std::unique_ptr<hma::ParamSet>> sets;
    std::vector<hma::Array<float>> arrays;
    for (int i = 0; i < kSets; ++i) {
      sets.push_back(std::make_unique<hma::ParamSet>());
      // x_r = g (r + 1) (i + 1): the terms x_r / g and their sum are exact integers.
      arrays.push_back(sets.back()->allocate<float>(n, static_cast<float>(g * (r + 1) * (i + 1))));
    }
    for (int round = 0; round < 3; ++round) {
      std::vector<hma::Request> reqs;
      for (int i = 0; i < kSets; ++i) reqs.push_back(avg.start_average(*sets[static_cast<std::size_t>(i)], 0));
      // Rank 0 waits from the last, rank 1 from the middle, the others test all in turn.
      if (r == 0) {
        for (int i = kSets - 1; i >= 0; --i) reqs[static_cast<std::size_t>(i)].wait();
      } else if (r == 1) {
        for (int k = 0; k < kSets; ++k) reqs[static_cast<std::size_t>((k + kSets / 2) % kSets)].wait();
      } else {
        for (bool all = false; !all;) {
          all = true;
          for (auto& q : reqs) all = q.test() && all;
          std::this_thread::yield();
        }
      }
      bool ok = true;
      for (int i = 0; i < kSets; ++i) {
        const float want = static_cast<float>((i + 1) * g * (g + 1) / 2);
        for (float v : arrays[static_cast<std::size_t>(i)].span()) ok = ok && v == want;
      }
      CAPTURE(round);
      REQUIRE_ALL_RANKS(ok);
      // Back to distinct values for the next round.
      for (int i = 0; i < kSets; ++i)
        for (float& v : arrays[static_cast<std::size_t>(i)].span()) v = static_cast<float>(g * (r + 1) * (i + 1));
    }
  }
}
