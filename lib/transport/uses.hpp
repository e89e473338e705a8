// Internal, data plane: how often each way of moving bytes ran in this process, so tests can
// assert that a mode really took the path it names (and how many MPI calls it split into), not
// just that the values came out right. Relaxed atomic counters: free next to an MPI call.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hma::detail {

enum class Use : int {
  allreduce_piece,    // divide + blocking MPI_Allreduce, per call
  ring_piece,         // hma's ring (blocking), per piece
  ring_split,         // ... a step of it whose messages followed the arrays (ring_messages), per step
  two_level_piece,    // two-level blocking (reduce-scatter, allreduce, allgather), per piece
  two_level_split,    // ... whose across-nodes stage was direction-split (exchange or ring), per piece
  iallreduce,         // non-blocking flat MPI_Iallreduce, per call
  two_level_start,    // non-blocking two-level, per average
  device_direct,      // device pointers to MPI (blocking or on the worker), per call
  device_iallreduce,  // device pointers to MPI_Iallreduce, per call
  device_staged,      // the staged pipeline, per average
  device_ipc,         // the node transport's sum on the device, per set average
  device_ipc_exchange,  // the node transport's exchange of handles, per set and layout
  device_ipc_two_shot,  // ... of which the two-shot sum (reduce-scatter + all-gather), per average
  device_ipc_two_level,  // ... of which two-level (this rank's slice across nodes), per average
  wire_piece,         // a 16-bit wire's blocking MPI_Allreduce, per piece
  wire_start,         // a 16-bit wire's MPI_Iallreduce, per call
  fused,              // a small average carried by its agreement check (no data collective), per average
  lean,               // ... of which the lean path (averager/lean.cpp) completed it alone, per average
  pair_mean,          // an allreduce_piece of two ranks whose MPI reduction took the mean, per call
  lean_check,         // a blocking host average whose check the lean path completed, its data after, per average
  count_
};

void count_use(Use u) noexcept;

/// Tests: a block size (bytes per rank) from which two-level across an even number of nodes
/// sums direction-split, instead of the cost model's choice (0: the model decides).
std::size_t split_min_block_override() noexcept;
void set_split_min_block_for_testing(std::size_t bytes) noexcept;
std::uint64_t uses(Use u) noexcept;

/// The ring: runs of at least this many bytes travel as messages of their own (ring.hpp,
/// kOwnMessageBytes unless a test lowered it; the same value on every rank, between averages).
std::size_t own_message_bytes() noexcept;
/// 0 restores kOwnMessageBytes.
void set_own_message_bytes_for_testing(std::size_t bytes) noexcept;

}  // namespace hma::detail
