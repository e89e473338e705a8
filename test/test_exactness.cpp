// What hma promises about rounding, checked on random values that are NOT exactly representable
// (different on every rank) against a reference computed independently: MPI_Allgather of the
// inputs, then torch's terms x_r / g (divided first, in the dtype) summed in long double.
//   1. Every mode: each element is EXACTLY torch's terms fl(x_r / g) (divided first, in the
//      dtype: doubles are never rounded through float) added up in SOME order, i.e. the value of
//      some binary tree of additions over them (checked by enumerating every tree's value, on
//      a sample of elements: the ends and every 4th or 16th), so
//      within (g - 1) * u * sum_r |x_r / g| of their exact sum (u = 2^-24 f32, 2^-53 f64, also
//      checked); and the same bits on every rank of the group.
//   2. HMA_REDUCTION=mpi with HMA_CHUNK_BYTES=0, flat (one divide, then one MPI_Allreduce per
//      dtype): bit for bit what torch's recipe gives with the same MPI, i.e. the test's own
//      divide + MPI_Allreduce on a copy.
//   3. A group of 2: every mode gives exactly fl(x_0/2 + x_1/2) (two terms have one order).
//   4. Device sets with DeviceDivision::reciprocal: the same with torch-on-CUDA's terms
//      x_r * fl(1/g) (which differ from x_r / g in about a third of the elements at g = 3, 6):
//      each division rule passes only against its own terms.
// Run at np 2, 3, 4, 5, 6 and 8, and on the emulated cluster (test/meson.build); the reference
// lives in differential.hpp.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "control/check.hpp"
#include "device/device_backend.hpp"
#include "transport/elements.hpp"
#include "transport/uses.hpp"
#include "hma/hma.hpp"
#include "differential.hpp"
#include "mpi_test.hpp"

// The modes are designated initializers that leave the rest to the members' defaults: g++ 12
// warns about each omitted member although the defaults are the point.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

using hma_test::rank;
using hma_test::size;
using hma_test::thread_multiple;
using hma_test::random_values;
using hma_test::reference;
using hma_test::some_order_and_same_everywhere;

namespace {

constexpr std::size_t kF = 40009, kD = 20011;  // odd sizes: uneven blocks and chunks

using hma::detail::Use;

struct Mode {
  std::string name;
  hma::AveragerOptions options;
  bool start = false;         // start()/wait() instead of blocking
  bool scattered = false;     // packed user arrays instead of zero-copy ones
  bool device = false;        // emulated device set
  int group = 0;              // 0: the world (PeriodicAverager); else level 0 of a hierarchy
  std::size_t max_count = 0;  // a lowered MPI count limit: the 2^30-element split on small buffers
  bool bitwise_mpi = false;   // promise 2
  bool reciprocal = false;    // device division x * fl(1/g) (torch on CUDA) instead of x / g
  std::optional<Use> path;    // the transport the mode must take (unset: left to auto)
  std::int64_t calls = 1;     // how many times (per process), where the path is set
  std::string describe;       // a text describe() must hold
  std::size_t split_min = 0;  // two-level: a lowered direction-split threshold (0: the default)
  std::int64_t splits = -1;   // two-level: pieces that must take the direction split (-1: unchecked)
  std::size_t nf = kF, nd = kD;  // elements of each dtype
  // scattered: each dtype's values as many arrays of these sizes in turn (empty: one array each)
  std::vector<std::size_t> cuts;
  std::size_t own_message = 0;  // the ring: a lowered own-message size in bytes (0: the default)
  int ring_splits = -1;         // -1: not asserted; 0: no ring step split its messages; 1: some did
};
// A set small enough to ride in the agreement check's first fragment (3836 bytes of at most
// 3840), and one that needs its second (7660 bytes of at most 7680).
constexpr std::size_t kSmallF = 601, kSmallD = 179;
static_assert(kSmallF * 4 + kSmallD * 8 <= hma::detail::kFragmentBytes);
constexpr std::size_t kTwoF = 1201, kTwoD = 357;
static_assert(kTwoF * 4 + kTwoD * 8 > hma::detail::kFragmentBytes && kTwoF * 4 + kTwoD * 8 <= hma::detail::kFusedBytes);
// One whose message (72 header bytes, the f32 terms padded to 8 bytes, the f64 terms) is just
// over the 256 bytes an MPI sends inline: it goes as two inline fragments of 256 and 48 bytes,
// the f64 terms across the cut (ControlCheck::first_fragment).
constexpr std::size_t kInlineF = 17, kInlineD = 20;
static_assert(72 + (kInlineF + 1) / 2 * 8 + kInlineD * 8 > 256 && 72 + (kInlineF + 1) / 2 * 8 + kInlineD * 8 <= 512);

std::int64_t pieces(std::size_t n, std::size_t per) { return static_cast<std::int64_t>((n + per - 1) / per); }
// Pieces of both buckets for a piece size in bytes.
std::int64_t pieces_bytes(std::size_t bytes) { return pieces(kF, bytes / 4) + pieces(kD, bytes / 8); }

// On tools/cluster: how the ranks were placed (HMA_EXPECT_LAYOUT: blocks, the default; scattered,
// round-robin over the nodes; unequal, nodes with different numbers of ranks).
std::string cluster_layout() {
  const char* l = std::getenv("HMA_EXPECT_LAYOUT");
  return l == nullptr ? "blocks" : l;
}

std::vector<Mode> modes() {
  std::vector<Mode> m;
  auto opt = [](hma::Reduction r, std::size_t chunk) {
    hma::AveragerOptions o;
    o.reduction = r;
    o.chunk_bytes = chunk;
    return o;
  };
  auto add = [&](Mode x) { m.push_back(std::move(x)); };
  const auto mpi0 = opt(hma::Reduction::mpi, 0), ring0 = opt(hma::Reduction::ring, 0);
  add({.name = "mpi, one piece (torch's recipe)", .options = mpi0, .bitwise_mpi = true,
       .path = Use::allreduce_piece, .calls = 2});
  add({.name = "mpi, one piece, packed arrays", .options = mpi0, .scattered = true, .bitwise_mpi = true,
       .path = Use::allreduce_piece, .calls = 2});
  add({.name = "mpi, 4 KiB pieces", .options = opt(hma::Reduction::mpi, 4096), .path = Use::allreduce_piece,
       .calls = pieces_bytes(4096)});
  add({.name = "mpi, 4 KiB pieces, packed arrays", .options = opt(hma::Reduction::mpi, 4096), .scattered = true,
       .path = Use::allreduce_piece, .calls = pieces_bytes(4096)});
  add({.name = "mpi, count limit 1000 (the 2^30 split)", .options = mpi0, .max_count = 1000,
       .path = Use::allreduce_piece, .calls = pieces(kF, 1000) + pieces(kD, 1000)});
  add({.name = "ring", .options = ring0, .path = Use::ring_piece, .calls = 2});
  add({.name = "ring, packed arrays", .options = ring0, .scattered = true, .path = Use::ring_piece, .calls = 2});
  add({.name = "ring, 8 KiB pieces, packed arrays", .options = opt(hma::Reduction::ring, 8192), .scattered = true,
       .path = Use::ring_piece, .calls = pieces_bytes(8192)});
  // Many arrays of mixed sizes: the ring's messages follow them (a run of at least the
  // own-message size alone, the smaller ones between together) where the check agreed on the
  // layout; without the check, one message per step.
  const std::vector<std::size_t> mixed{700, 3, 90, 257, 1, 1500, 40};
  add({.name = "ring, many packed arrays: messages follow the arrays", .options = ring0, .scattered = true,
       .path = Use::ring_piece, .calls = 2, .cuts = mixed, .own_message = 1024, .ring_splits = 1});
  hma::AveragerOptions ring_unchecked = ring0;
  ring_unchecked.check_every_average = false;
  add({.name = "ring, many packed arrays, unchecked: one message per step", .options = ring_unchecked,
       .scattered = true, .path = Use::ring_piece, .calls = 2, .cuts = mixed, .own_message = 1024,
       .ring_splits = 0});
  add({.name = "ring, count limit 1000", .options = ring0, .max_count = 1000, .path = Use::ring_piece,
       .calls = pieces(kF, 1000) + pieces(kD, 1000)});
  add({.name = "auto (default)", .options = {}});
  add({.name = "start/wait (MPI_Iallreduce)", .options = {}, .start = true, .path = Use::iallreduce, .calls = 2});
  // Small sets: carried by the agreement check (recursive doubling, every rank's terms summed on
  // the way), unless HMA_REDUCTION=mpi asks for MPI_Allreduce's own order.
  add({.name = "small: fused in the check", .options = {}, .path = Use::fused, .nf = kSmallF, .nd = kSmallD});
  add({.name = "small: fused, packed arrays", .options = {}, .scattered = true, .path = Use::fused,
       .nf = kSmallF, .nd = kSmallD});
  add({.name = "small: fused, start/wait", .options = {}, .start = true, .path = Use::fused, .nf = kSmallF,
       .nd = kSmallD});
  add({.name = "small: fused in two fragments", .options = {}, .path = Use::fused, .nf = kTwoF, .nd = kTwoD});
  add({.name = "small: fused in two inline fragments", .options = {}, .path = Use::fused, .nf = kInlineF,
       .nd = kInlineD});
  add({.name = "small: fused in two inline fragments, packed, start/wait", .options = {}, .start = true,
       .scattered = true, .path = Use::fused, .nf = kInlineF, .nd = kInlineD});
  add({.name = "small: fused in two fragments, packed, start/wait", .options = {}, .start = true, .scattered = true,
       .path = Use::fused, .nf = kTwoF, .nd = kTwoD});
  add({.name = "small: mpi, one piece (torch's recipe, not fused)", .options = mpi0, .bitwise_mpi = true,
       .path = Use::allreduce_piece, .calls = 2, .nf = kSmallF, .nd = kSmallD});
  add({.name = "start/wait, packed arrays", .options = {}, .start = true, .scattered = true, .path = Use::iallreduce,
       .calls = 2});
  add({.name = "start/wait, count limit 1000", .options = {}, .start = true, .max_count = 1000,
       .path = Use::iallreduce, .calls = pieces(kF, 1000) + pieces(kD, 1000)});
  if (thread_multiple()) {
    hma::AveragerOptions t = mpi0;
    t.progress = hma::Progress::thread;
    add({.name = "progress thread, blocking", .options = t, .path = Use::allreduce_piece, .calls = 2});
    add({.name = "progress thread, start/wait", .options = t, .start = true, .path = Use::allreduce_piece,
         .calls = 2});
    hma::AveragerOptions tr = ring0;
    tr.progress = hma::Progress::thread;
    add({.name = "progress thread, ring, start/wait, packed", .options = tr, .start = true, .scattered = true,
         .path = Use::ring_piece, .calls = 2});
  }
  hma::AveragerOptions staged;
  staged.staging_chunk_bytes = 4096;
  staged.device_ipc = false;  // the MPI paths; the node transport has modes of its own below
  add({.name = "device (emulated), staged 4 KiB chunks", .options = staged, .device = true,
       .path = Use::device_staged});
  add({.name = "device (emulated), staged, start/wait", .options = staged, .start = true, .device = true,
       .path = Use::device_staged});
  hma::AveragerOptions whole;
  whole.staging_chunk_bytes = 0;
  whole.device_ipc = false;
  add({.name = "device (emulated), staged whole buckets, count limit 1000", .options = whole, .device = true,
       .max_count = 1000, .path = Use::device_staged});
  hma::AveragerOptions direct;
  direct.cuda_aware = true;
  direct.device_path = hma::DevicePath::direct;
  direct.device_ipc = false;
  add({.name = "device (emulated), direct (CUDA-aware MPI_Allreduce), count limit 1000", .options = direct,
       .device = true, .max_count = 1000, .path = Use::device_direct,
       .calls = pieces(kF, 1000) + pieces(kD, 1000)});
  add({.name = "device (emulated), direct MPI_Iallreduce, start/wait", .options = direct, .start = true,
       .device = true, .path = Use::device_iallreduce, .calls = 2});
  hma::AveragerOptions recip = staged;
  recip.device_division = hma::DeviceDivision::reciprocal;
  add({.name = "device (emulated), reciprocal division (torch on CUDA)", .options = recip, .device = true,
       .reciprocal = true, .path = Use::device_staged});
  add({.name = "device (emulated), reciprocal division, start/wait", .options = recip, .start = true,
       .device = true, .reciprocal = true, .path = Use::device_staged});
  // The node transport, where every rank is on one node (not on the emulated cluster): each rank
  // adds all ranks' terms on the "device", in rank order.
  const bool one_node = [] {
    MPI_Comm node = MPI_COMM_NULL;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    int n = 0;
    MPI_Comm_size(node, &n);
    MPI_Comm_free(&node);
    return n == size() && std::getenv("HMA_RANKS_PER_NODE") == nullptr;
  }();
  if (one_node) add({.name = "device (emulated), node transport", .options = {}, .device = true, .path = Use::device_ipc});
  if (one_node) add({.name = "device (emulated), node transport, start/wait", .options = {}, .start = true, .device = true,
       .path = Use::device_ipc});
  hma::AveragerOptions recip_ipc;
  recip_ipc.device_division = hma::DeviceDivision::reciprocal;
  if (one_node) add({.name = "device (emulated), node transport, reciprocal division", .options = recip_ipc, .device = true,
       .reciprocal = true, .path = Use::device_ipc});

  // Two-level over emulated nodes of 2, 3 and 4 ranks: groups of several whole nodes.
  for (int node : {2, 3, 4}) {
    if (size() % node != 0 || size() / node < 2) continue;
    const std::string of = ", nodes of " + std::to_string(node);
    hma::AveragerOptions two;
    two.algorithm = hma::Algorithm::two_level;
    two.hierarchy.ranks_per_node = node;
    two.chunk_bytes = 0;
    const std::string says = "algorithm: two-level (HMA_ALGORITHM=two_level)";
    // Across an even number of nodes, blocks >= 64 KiB are summed direction-split (an exchange
    // at 2 nodes, a ring at 4): at nodes of 2 both buckets' blocks (80 KiB) are; smaller ones,
    // and odd numbers of nodes, go to MPI_Allreduce.
    const bool even_nodes = (size() / node) % 2 == 0;
    add({.name = "two-level" + of, .options = two, .path = Use::two_level_piece, .calls = 2, .describe = says,
         .splits = even_nodes && node == 2 ? 2 : 0});
    add({.name = "two-level, packed arrays" + of, .options = two, .scattered = true, .path = Use::two_level_piece,
         .calls = 2, .describe = says});
    add({.name = "two-level start/wait" + of, .options = two, .start = true, .path = Use::two_level_start,
         .describe = says, .splits = even_nodes && node == 2 ? 2 : 0});
    add({.name = "two-level start/wait, packed arrays" + of, .options = two, .start = true, .scattered = true,
         .path = Use::two_level_start, .describe = says, .splits = even_nodes && node == 2 ? 2 : 0});
    // The non-blocking direction split (exchange at 2 nodes, ring at 4) for every bucket.
    add({.name = "two-level start/wait, direction split" + of, .options = two, .start = true,
         .path = Use::two_level_start, .describe = says, .split_min = 1, .splits = even_nodes ? 2 : 0});
    hma::AveragerOptions chunked = two;
    chunked.chunk_bytes = 8192;
    add({.name = "two-level, 8 KiB pieces" + of, .options = chunked, .path = Use::two_level_piece,
         .calls = pieces_bytes(8192), .describe = says, .splits = 0});
    // The pipeline with every piece's across-nodes stage direction-split (threshold lowered).
    add({.name = "two-level, 8 KiB pieces, direction split" + of, .options = chunked, .path = Use::two_level_piece,
         .calls = pieces_bytes(8192), .describe = says, .split_min = 1,
         .splits = even_nodes ? pieces_bytes(8192) : 0});
    add({.name = "two-level, count limit 1000" + of, .options = two, .max_count = 1000,
         .path = Use::two_level_piece, .calls = pieces(kF, 500) + pieces(kD, 500), .describe = says});
    if (thread_multiple()) {
      hma::AveragerOptions t = two;
      t.progress = hma::Progress::thread;
      add({.name = "two-level, progress thread, start/wait" + of, .options = t, .start = true,
           .path = Use::two_level_piece, .calls = 2, .describe = says});
    }
    // The automatic choice: flat on emulated nodes (they share one machine's memory).
    hma::AveragerOptions au;
    au.hierarchy.ranks_per_node = node;
    au.reduction = hma::Reduction::mpi;
    au.chunk_bytes = 0;
    add({.name = "auto algorithm on emulated nodes: flat" + of, .options = au, .path = Use::allreduce_piece,
         .calls = 2, .describe = "algorithm: flat (HMA_ALGORITHM=flat, or auto on emulated nodes"});
  }
  // Two-level asked for where a group is not a whole number of nodes (groups of 3 on nodes of
  // 2 at 6 ranks): flat, and describe() says why.
  if (size() == 6) {
    hma::AveragerOptions two;
    two.algorithm = hma::Algorithm::two_level;
    two.hierarchy.ranks_per_node = 2;
    two.reduction = hma::Reduction::mpi;
    two.chunk_bytes = 0;
    add({.name = "two-level asked, groups of 3 on nodes of 2: flat", .options = two, .group = 3,
         .path = Use::allreduce_piece, .calls = 2,
         .describe = "but a group of 3 is not a whole number of nodes of 2"});
  }

  // Real nodes (tools/cluster: one network namespace per node, TCP between them), found through
  // shared memory, not emulated. In contiguous blocks of equal nodes the automatic choice takes
  // two-level (the cost model's choice); on unequal or round-robin nodes (HMA_EXPECT_LAYOUT) two-level is
  // impossible: flat, and describe() says why where two-level was asked for.
  if (std::getenv("HMA_EXPECT_NODES") != nullptr) {
    const std::string layout = cluster_layout();
    const char* model = std::getenv("HMA_MODEL");
    if (layout == "blocks" && model != nullptr) {
      // A calibration where MPI_Allreduce moves bytes 1000x faster than the link: auto follows
      // the model and stays flat (the `two-level` modes above force it and still run).
      const std::string flat = std::string("algorithm: flat at every size (auto, cost model: ") + model + ")";
      add({.name = "real nodes, auto under a calibration that favours flat", .options = mpi0,
           .path = Use::allreduce_piece, .calls = 2, .describe = flat});
    } else if (layout == "blocks") {
      // The cost model's defaults predict two-level faster across 2 nodes of 2 from 128 KiB (the
      // direction split's floor, 64 KiB per rank); this average is 320 KiB.
      const std::string auto_two = "algorithm: two-level from 128 KiB (auto, cost model: defaults), flat below";
      add({.name = "real nodes, auto: two-level", .options = {}, .path = Use::two_level_piece, .calls = 2,
           .describe = auto_two});
      add({.name = "real nodes, auto, start/wait: two-level", .options = {}, .start = true,
           .path = Use::two_level_start, .describe = auto_two});
      add({.name = "real nodes, auto, packed arrays: two-level", .options = {}, .scattered = true,
           .path = Use::two_level_piece, .calls = 2, .describe = auto_two});
    } else {
      hma::AveragerOptions two = mpi0;
      two.algorithm = hma::Algorithm::two_level;
      const std::string why = layout == "unequal" ? "but the nodes have unequal numbers of ranks"
                                                  : "but the nodes are not contiguous blocks of ranks";
      add({.name = "real " + layout + " nodes, two-level asked: flat", .options = two,
           .path = Use::allreduce_piece, .calls = 2, .describe = why});
      add({.name = "real " + layout + " nodes, two-level asked, start/wait: flat", .options = two, .start = true,
           .path = Use::iallreduce, .calls = 2, .describe = why});
      add({.name = "real " + layout + " nodes, auto: flat", .options = mpi0, .path = Use::allreduce_piece,
           .calls = 2});
    }
    hma::AveragerOptions flat;
    flat.algorithm = hma::Algorithm::flat;
    add({.name = "real nodes, flat (auto reduction across nodes: MPI's own)", .options = flat,
         .path = Use::allreduce_piece, .calls = 2, .describe = layout == "blocks" ? "algorithm: flat" : ""});
    hma::AveragerOptions fring = ring0;
    fring.algorithm = hma::Algorithm::flat;
    add({.name = "real nodes, flat ring", .options = fring, .path = Use::ring_piece, .calls = 2});
    // The other modes name flat paths: keep them flat across the real nodes too.
    for (Mode& x : m)
      if (!x.options.algorithm && x.name.rfind("real ", 0) != 0) x.options.algorithm = hma::Algorithm::flat;
  }

  // Groups below the world: level 0 of a hierarchy in contiguous blocks of 2 and 3 ranks (and
  // of two nodes of 2, two-level, at 8 ranks).
  for (int g : {2, 3}) {
    if (size() % g != 0 || g >= size()) continue;
    const std::string of = ", groups of " + std::to_string(g);
    add({.name = "mpi" + of, .options = mpi0, .group = g, .path = Use::allreduce_piece, .calls = 2});
    add({.name = "ring, packed arrays" + of, .options = ring0, .scattered = true, .group = g,
         .path = Use::ring_piece, .calls = 2});
    add({.name = "start/wait" + of, .options = {}, .start = true, .group = g, .path = Use::iallreduce, .calls = 2});
    add({.name = "small: fused" + of, .options = {}, .group = g, .path = Use::fused, .nf = kSmallF, .nd = kSmallD});
    add({.name = "device (emulated), staged" + of, .options = staged, .device = true, .group = g,
         .path = Use::device_staged});
    if (one_node) add({.name = "device (emulated), node transport" + of, .options = {}, .device = true, .group = g,
         .path = Use::device_ipc});
  }
  if (size() % 4 == 0 && size() > 4) {
    hma::AveragerOptions two;
    two.algorithm = hma::Algorithm::two_level;
    two.hierarchy.ranks_per_node = 2;
    add({.name = "two-level, groups of 4 (two nodes of 2)", .options = two, .group = 4,
         .path = Use::two_level_piece, .calls = 2});
    add({.name = "two-level start/wait, groups of 4 (two nodes of 2)", .options = two, .start = true, .group = 4,
         .path = Use::two_level_start});
  }
  return m;
}

// `v` into `ps` as arrays of sizes cuts[0], cuts[1], ... in turn (the last one shorter), or as one.
template <class T>
void add_cut(hma::ParamSet& ps, std::vector<T>& v, const std::vector<std::size_t>& cuts) {
  if (cuts.empty()) {
    ps.add(v);
    return;
  }
  for (std::size_t at = 0, i = 0; at < v.size(); at += cuts[i % cuts.size()], ++i)
    ps.add(v.data() + at, std::min(cuts[i % cuts.size()], v.size() - at));
}

std::vector<std::uint64_t> use_counts() {
  std::vector<std::uint64_t> c;
  for (int u = 0; u < static_cast<int>(Use::count_); ++u) c.push_back(hma::detail::uses(static_cast<Use>(u)));
  return c;
}

}  // namespace

TEST_CASE("random values: every path within its bound of torch's terms, the same on every rank; "
          "torch's recipe bit for bit") {
  for (const Mode& mode : modes()) {
    const int g = mode.group ? mode.group : size();
    CAPTURE(mode.name, g);
    const std::size_t nf = mode.nf, nd = mode.nd;
    const std::vector<float> f0 = random_values<float>(nf, 1);
    const std::vector<double> d0 = random_values<double>(nd, 2);
    std::unique_ptr<hma::Averager> avg;
    if (mode.group) avg = std::make_unique<hma::HierarchicalAverager>(
                        MPI_COMM_WORLD, std::vector<hma::Level>{{1, g}, {2, size()}}, 0, mode.options);
    else avg = std::make_unique<hma::PeriodicAverager>(MPI_COMM_WORLD, 1, 0, mode.options);
    const std::string said = avg->describe();
    INFO(said);
    REQUIRE_ALL_RANKS(said.find(mode.describe) != std::string::npos);
    hma::detail::set_max_count_for_testing(mode.max_count);
    hma::detail::set_split_min_block_for_testing(mode.split_min);
    hma::detail::set_own_message_bytes_for_testing(mode.own_message);
    const std::vector<std::uint64_t> before = use_counts();
    std::vector<float> f = f0;
    std::vector<double> d = d0;
    if (mode.device) {
      hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend());
      hma::DeviceParamSet ps;
      hma::detail::set_device_backend_for_testing(nullptr);
      ps.add(f.data(), f.size());
      ps.add(d.data(), d.size());
      if (mode.start) avg->start_average(ps, 0).wait();
      else avg->average(ps, 0);
      ps.synchronize();
    } else {
      hma::ParamSet ps;
      hma::Array<float> wf;
      hma::Array<double> wd;
      if (mode.scattered) {
        add_cut(ps, f, mode.cuts);
        add_cut(ps, d, mode.cuts);
      } else {
        wf = ps.allocate<float>(nf);
        wd = ps.allocate<double>(nd);
        std::copy(f0.begin(), f0.end(), wf.begin());
        std::copy(d0.begin(), d0.end(), wd.begin());
      }
      if (mode.start) avg->start_average(ps, 0).wait();
      else avg->average(ps, 0);
      if (!mode.scattered) {
        std::copy(wf.begin(), wf.end(), f.begin());
        std::copy(wd.begin(), wd.end(), d.begin());
      }
    }
    hma::detail::set_max_count_for_testing(0);
    hma::detail::set_split_min_block_for_testing(0);
    hma::detail::set_own_message_bytes_for_testing(0);
    const std::vector<std::uint64_t> after = use_counts();
    if (mode.ring_splits >= 0) {
      const auto split = after[static_cast<std::size_t>(Use::ring_split)] -
                         before[static_cast<std::size_t>(Use::ring_split)];
      INFO("ring steps with their messages split: " << split);
      REQUIRE_ALL_RANKS((split > 0) == (mode.ring_splits == 1));
    }
    if (mode.splits >= 0) {
      const auto split = static_cast<std::int64_t>(after[static_cast<std::size_t>(Use::two_level_split)] -
                                                   before[static_cast<std::size_t>(Use::two_level_split)]);
      INFO("direction-split exchange ran " << split << " times, expected " << mode.splits);
      REQUIRE_ALL_RANKS(split == mode.splits);
    }
    // The mode really took its path, split into the expected number of MPI calls.
    if (mode.path) {
      const auto took = static_cast<std::int64_t>(after[static_cast<std::size_t>(*mode.path)] -
                                                  before[static_cast<std::size_t>(*mode.path)]);
      INFO("path " << static_cast<int>(*mode.path) << " ran " << took << " times, expected " << mode.calls);
      REQUIRE_ALL_RANKS(took == mode.calls);
      // Of two ranks, MPI's reduction takes the mean itself (no pass divides); never of more.
      if (*mode.path == Use::allreduce_piece) {
        const auto pair = static_cast<std::int64_t>(after[static_cast<std::size_t>(Use::pair_mean)] -
                                                    before[static_cast<std::size_t>(Use::pair_mean)]);
        INFO("the pair mean ran " << pair << " times");
        REQUIRE_ALL_RANKS(pair == (g == 2 ? mode.calls : 0));
      }
    }
    // The inputs are the same in every mode: one reference per group size and division.
    struct Reference {
      std::vector<long double> sf, bf, sd, bd;
      std::vector<float> tf_terms;
      std::vector<double> td_terms;
    };
    static std::map<std::tuple<int, bool, std::size_t>, Reference> references;
    const auto [at, fresh] = references.try_emplace({g, mode.reciprocal, nf});
    Reference& ref = at->second;
    if (fresh) {
      reference(f0, g, ref.sf, ref.bf, ref.tf_terms, mode.reciprocal);
      reference(d0, g, ref.sd, ref.bd, ref.td_terms, mode.reciprocal);
    }
    const auto& [sf, bf, sd, bd, tf_terms, td_terms] = ref;
    std::string why_f, why_d;
    const bool ok_f = some_order_and_same_everywhere(f, sf, bf, tf_terms, g, why_f);
    const bool ok_d = some_order_and_same_everywhere(d, sd, bd, td_terms, g, why_d);
    INFO("f32: " << why_f << "; f64: " << why_d);
    REQUIRE_ALL_RANKS(ok_f && ok_d);
    // Promise 3: two terms have one order.
    if (g == 2) {
      bool exact = true;
      for (std::size_t i = 0; i < nf; ++i) exact = exact && f[i] == static_cast<float>(sf[i]);
      for (std::size_t i = 0; i < nd; ++i) exact = exact && d[i] == static_cast<double>(sd[i]);
      REQUIRE_ALL_RANKS(exact);
    }
    // Promise 2: torch's recipe, done here by hand with the same MPI.
    if (mode.bitwise_mpi) {
      std::vector<float> tf(f0);
      std::vector<double> td(d0);
      for (auto& x : tf) x /= static_cast<float>(g);
      for (auto& x : td) x /= static_cast<double>(g);
      MPI_Allreduce(MPI_IN_PLACE, tf.data(), static_cast<int>(nf), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      MPI_Allreduce(MPI_IN_PLACE, td.data(), static_cast<int>(nd), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
      REQUIRE_ALL_RANKS(std::memcmp(tf.data(), f.data(), nf * sizeof(float)) == 0 &&
                        std::memcmp(td.data(), d.data(), nd * sizeof(double)) == 0);
    }
  }
}

TEST_CASE("on the emulated cluster the hierarchy sees the nodes as the ranks were placed", "[cluster]") {
  const char* expect = std::getenv("HMA_EXPECT_NODES");
  INFO("a [cluster] test runs under tools/cluster with HMA_EXPECT_NODES set (test/meson.build)");
  REQUIRE_ALL_RANKS(expect != nullptr);
  const int nodes = std::atoi(expect);
  const std::string layout = cluster_layout();
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1, 0);
  const auto& h = avg.hierarchy();
  INFO("layout " << layout << ": " << h.describe());
  REQUIRE_ALL_RANKS(!h.emulated_nodes() && h.num_nodes() == nodes);
  if (layout == "blocks") {
    const int rpn = size() / nodes;
    REQUIRE_ALL_RANKS(h.ranks_per_node() == rpn && h.contiguous_nodes() && h.node_index() == rank() / rpn &&
                      h.two_level(0) != nullptr);
  } else if (layout == "scattered") {  // node k holds ranks k, k + nodes, ...
    REQUIRE_ALL_RANKS(h.ranks_per_node() == size() / nodes && !h.contiguous_nodes() &&
                      h.node_index() == rank() % nodes && h.two_level(0) == nullptr);
    REQUIRE_THAT(h.describe(), Catch::Contains("ranks, not in contiguous rank blocks"));
  } else {
    REQUIRE_ALL_RANKS(layout == "unequal");
    REQUIRE_ALL_RANKS(h.ranks_per_node() == 0 && !h.contiguous_nodes() && h.two_level(0) == nullptr);
    REQUIRE_THAT(h.describe(), Catch::Contains("node(s) of unequal sizes"));
  }
}
