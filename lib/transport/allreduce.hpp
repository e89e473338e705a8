// Internal, data plane: torch's recipe. Divide by the group size, then MPI_Allreduce(SUM).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <vector>

#include "transport/host.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

/// Blocking: scale + pack [lo, hi) of the bucket, MPI_Allreduce in place, unpack.
template <Element T>
void allreduce_piece(Bucket<T>& b, std::size_t lo, std::size_t hi, const Route& route);

/// Non-blocking: MPI_Iallreduce(send -> recv) of `n` elements of `elem` bytes, in calls of at most
/// max_count() elements (MPI counts are int), each counted as `use`, into `reqs`.
void iallreduce_pieces(const void* send, void* recv, std::size_t n, std::size_t elem, MPI_Datatype type,
                       MPI_Op op, MPI_Comm comm, Use use, const char* what, std::vector<MPI_Request>& reqs);

/// Non-blocking: scales the whole bucket into its send buffer and starts an OUT-of-place
/// MPI_Iallreduce into the buffer (Open MPI 4.1's libnbc is 2-4x faster out of place than in
/// place at >= 1 MiB). Packed user arrays are unpacked on completion.
template <Element T>
void start_allreduce(Bucket<T>& b, const Route& route, std::vector<MPI_Request>& reqs);

}  // namespace hma::detail
