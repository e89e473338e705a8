// Internal, data plane: the two-level average of a level whose groups are several whole nodes:
// reduce-scatter within the node, allreduce across nodes between ranks of equal node-local rank,
// allgather within the node. Only 1/L of the bytes cross the network from each rank.
#pragma once

#include <cstddef>

#include "control/model.hpp"  // two_level_piece_bytes
#include "transport/host.hpp"

namespace hma::detail {

/// Blocking, pipelined in pieces of two_level_piece_bytes().
template <Element T>
void two_level_blocking(Bucket<T>& b, const Route& route);

/// Non-blocking: chained stages per bucket (reduce-scatter in the node; across nodes one
/// MPI_Iallreduce or the direction split's Isend/Irecv steps; with a 16-bit wire a widening step;
/// allgather in the node); the first is issued now, the others by complete() as their
/// predecessors finish (Pending::stages); the result is copied back last.
void start_two_level(Bucket<float>& f, Bucket<double>& d, const Route& route, Pending& p);

}  // namespace hma::detail
