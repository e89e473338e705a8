// Internal, data plane: how the bytes of a host ParamSet move. Every host transport sits behind
// these two calls; only lib/transport/ calls MPI data collectives.
//   divide + MPI_Allreduce ....... transport/allreduce.cpp  (torch's recipe)
//   hma's ring, division fused ... transport/ring.hpp
//   two-level across nodes ....... transport/two_level.cpp
//   16-bit wire (bf16, fp16) ..... transport/wire.cpp
//   outer optimizer, divergence .. transport/post.cpp (passes around any of the above)
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>

#include <vector>

#include "hma/buffer.hpp"
#include "hma/hierarchy.hpp"
#include "hma/options.hpp"
#include "transport/pending.hpp"

namespace hma::detail {

class Post;

/// The ring's receive buffers: on the heap (owned by the averager), so a worker job can keep
/// using them.
struct Scratch {
  std::vector<float> f;
  std::vector<double> d;
};

/// Where and how one average moves: the group's data communicator and the chosen algorithm.
struct Route {
  MPI_Comm comm = MPI_COMM_NULL;  // the level's data communicator
  int group = 1;                  // its size
  int rank = 0;                   // this rank in it
  std::size_t chunk_bytes = 0;    // blocking: pieces of this many bytes (0: one piece)
  Reduction reduction = Reduction::mpi;  // automatic: ring where a piece's block >= ring_min_block
  std::size_t ring_min_block = 0;
  // The agreement check compared the group's layouts before this average: the ring's messages
  // may follow the arrays (ring_messages), every rank cutting them alike.
  bool layout_agreed = false;
  const Hierarchy::TwoLevel* two = nullptr;  // non-null: two-level over these
  int per_node = 0;                          // two-level: ranks per node
  // two-level across an even number of nodes: pieces of at least this many bytes are summed
  // direction-split, smaller ones with MPI_Allreduce (the cost model's choice)
  std::size_t split_min_piece = SIZE_MAX;
  // Weighted averaging: < 0 divide by the group size (torch), else multiply by this factor
  // (w_i / sum of the group's weights), in double.
  double weight = -1;
  Wire wire = Wire::exact;  // bf16/fp16: flat levels sum 16-bit terms (wire.cpp); two-level ones
                            // send 16 bits across nodes only (two_level.cpp)
  Post* post = nullptr;  // the outer optimizer and the divergence metric of this average, if any
  int level = 0;                             // for the timeline
  std::int64_t step = 0;
  [[nodiscard]] Route weighted(double factor) const {
    Route r = *this;
    r.weight = factor;
    return r;
  }
};

/// A host set's buckets.
struct HostBuckets {
  Bucket<float>* f;
  Bucket<double>* d;
  Bucket<bf16>* b;
  Bucket<fp16>* h;
};

/// Blocking: averages the buckets over route.comm (on return the arrays hold the average).
void average_host(const HostBuckets& s, const Route& route, Scratch& scratch);

/// Non-blocking: issues the collectives of an average of the buckets into `p` (its requests,
/// later stages and finishing step). Throws hma::InvalidArgument when a piece is too large for
/// one non-blocking collective.
void start_host(const HostBuckets& s, const Route& route, Pending& p);

/// A small average carried by its agreement check (control/check.hpp): stages this rank's terms
/// (x / group, as the flat average divides) of the f32 and f64 buckets as the check's payload.
/// Returns what lands the group's sums in the arrays when the check fused, to run then.
std::function<void(const ControlCheck&)> stage_fused(const HostBuckets& s, int group, ControlCheck& c);
/// The same in two calls, for the lean path: stage_fused_terms() stages, land_fused() lands;
/// fused_lander() is land_fused() on these buckets, to run later (what stage_fused() returns).
void stage_fused_terms(const HostBuckets& s, int group, ControlCheck& c);
void land_fused(const HostBuckets& s, const ControlCheck& done);
std::function<void(const ControlCheck&)> fused_lander(const HostBuckets& s);

}  // namespace hma::detail
