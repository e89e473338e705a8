// Internal, data plane: hma's ring allreduce over MPI_Sendrecv with the division by the group size
// folded into its additions (no separate scaling, packing or unpacking pass).
#pragma once

#include <mpi.h>

#include <vector>

#include "transport/elements.hpp"

namespace hma::detail {

/// Averages the logical range [0, N) of `x` over the ranks of `comm` with a ring (reduce-scatter,
/// then allgather) over point-to-point messages, dividing by the group size inside the additions:
/// each element ends as the sum of torch's terms x / g (in the ring's order), with no separate
/// scaling, packing or unpacking pass. `x` holds this rank's UNSCALED values. `tmp` is scratch.
/// Collective over `comm`.
template <Element T>
void ring_average(const Runs<T>& x, MPI_Comm comm, int rank, int n, const Scaler<T>& s,
                  std::vector<T>& tmp) {
  const std::size_t N = x.N;
  const int right = (rank + 1) % n, left = (rank - 1 + n) % n;
  constexpr int kTag = 0x686d;  // hma's communicators carry only hma's traffic
  tmp.resize(N / static_cast<std::size_t>(n) + 1);
  auto blk = [&](int i) { return ring_block(N, n, i); };
  // Reduce-scatter: at step k send block r-k, receive block r-k-1 and add this rank's share.
  for (int k = 0; k < n - 1; ++k) {
    const auto [s0, s1] = blk(rank - k);
    const auto [r0, r1] = blk(rank - k - 1);
    {
      const RunsBuffer<T> send(x, s0, s1);
      check(MPI_Sendrecv(send.ptr(), send.count(), send.type(), right, kTag, tmp.data(),
                         static_cast<int>(r1 - r0), mpi_type<T>(), left, kTag, comm,
                         MPI_STATUS_IGNORE),
            "MPI_Sendrecv(ring reduce-scatter)");
    }
    const bool first = k == 0;  // the left neighbour sent its own, unscaled values
    x.each(r0, r1, [&](T* mine, std::size_t m, std::size_t off) {
      const T* in = tmp.data() + (off - r0);
      if (s.pow2) {
        if (first) {
          for (std::size_t i = 0; i < m; ++i) mine[i] = in[i] * s.inv + mine[i] * s.inv;
        } else {
          for (std::size_t i = 0; i < m; ++i) mine[i] = in[i] + mine[i] * s.inv;
        }
      } else {
        if (first) {
          for (std::size_t i = 0; i < m; ++i) mine[i] = in[i] / s.g + mine[i] / s.g;
        } else {
          for (std::size_t i = 0; i < m; ++i) mine[i] = in[i] + mine[i] / s.g;
        }
      }
    });
  }
  // Allgather: this rank now owns block r+1; pass the finished blocks around the ring.
  for (int k = 0; k < n - 1; ++k) {
    const auto [s0, s1] = blk(rank + 1 - k);
    const auto [r0, r1] = blk(rank - k);
    const RunsBuffer<T> send(x, s0, s1), recv(x, r0, r1);
    check(MPI_Sendrecv(send.ptr(), send.count(), send.type(), right, kTag, recv.ptr(), recv.count(),
                       recv.type(), left, kTag, comm, MPI_STATUS_IGNORE),
          "MPI_Sendrecv(ring allgather)");
  }
}

}  // namespace hma::detail
