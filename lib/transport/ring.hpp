// Internal, data plane: hma's ring allreduce over MPI_Sendrecv with the division by the group size
// folded into its additions (no separate scaling, packing or unpacking pass).
#pragma once

#include <mpi.h>

#include <deque>
#include <vector>

#include "transport/elements.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

/// [a, b) of some Runs cut into the ring's messages: every part of a run of at least
/// own_message_bytes() alone, consecutive smaller parts together. The cuts depend only on the
/// layout (the runs' lengths), so ranks with one layout cut one block alike: their messages pair
/// up one to one.
template <Element T>
std::vector<std::pair<std::size_t, std::size_t>> ring_messages(const Runs<T>& x, std::size_t a, std::size_t b) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  const std::size_t own = own_message_bytes();
  std::size_t open = b;  // start of the pending group of small parts (b: none)
  x.each(a, b, [&](T*, std::size_t n, std::size_t off) {
    if (n * sizeof(T) < own) {
      if (open == b) open = off;
      return;
    }
    if (open != b) out.emplace_back(open, off);
    open = b;
    out.emplace_back(off, off + n);
  });
  if (open != b) out.emplace_back(open, b);
  return out;
}

/// One ring step: sends [s0, s1) of `x` to `right` and receives [r0, r1) from `left`, into `x`
/// itself or, with `into` non-null, into into[0, r1 - r0). `split`: the group's layouts agreed
/// (the check compared them), so the messages may follow the runs (ring_messages); else one
/// message each way (an hindexed datatype over the runs where the range spans several).
template <Element T>
void ring_exchange(const Runs<T>& x, std::size_t s0, std::size_t s1, std::size_t r0, std::size_t r1,
                   T* into, int right, int left, MPI_Comm comm, bool split, const char* what) {
  constexpr int kTag = 0x686d;  // hma's communicators carry only hma's traffic
  const auto sends = split ? ring_messages(x, s0, s1) : std::vector<std::pair<std::size_t, std::size_t>>{{s0, s1}};
  const auto recvs = split ? ring_messages(x, r0, r1) : std::vector<std::pair<std::size_t, std::size_t>>{{r0, r1}};
  if (sends.size() > 1 || recvs.size() > 1) count_use(Use::ring_split);
  std::deque<RunsBuffer<T>> bufs;  // alive until every request completes
  std::vector<MPI_Request> reqs;
  reqs.reserve(sends.size() + recvs.size());
  for (const auto& [lo, hi] : recvs) {
    MPI_Request q = MPI_REQUEST_NULL;
    if (into != nullptr) {
      check(MPI_Irecv(into + (lo - r0), static_cast<int>(hi - lo), mpi_type<T>(), left, kTag, comm, &q), what);
    } else {
      const RunsBuffer<T>& r = bufs.emplace_back(x, lo, hi);
      check(MPI_Irecv(r.ptr(), r.count(), r.type(), left, kTag, comm, &q), what);
    }
    reqs.push_back(q);
  }
  for (const auto& [lo, hi] : sends) {
    const RunsBuffer<T>& s = bufs.emplace_back(x, lo, hi);
    MPI_Request q = MPI_REQUEST_NULL;
    check(MPI_Isend(s.ptr(), s.count(), s.type(), right, kTag, comm, &q), what);
    reqs.push_back(q);
  }
  check(MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE), what);
}

/// Averages the logical range [0, N) of `x` over the ranks of `comm` with a ring (reduce-scatter,
/// then allgather) over point-to-point messages, dividing by the group size inside the additions:
/// each element ends as the sum of torch's terms x / g (in the ring's order), with no separate
/// scaling, packing or unpacking pass. `x` holds this rank's UNSCALED values. `tmp` is scratch.
/// Collective over `comm`.
template <Element T>
void ring_average(const Runs<T>& x, MPI_Comm comm, int rank, int n, const Scaler<T>& s,
                  std::vector<T>& tmp, bool split) {
  const std::size_t N = x.N;
  const int right = (rank + 1) % n, left = (rank - 1 + n) % n;
  tmp.resize(N / static_cast<std::size_t>(n) + 1);
  auto blk = [&](int i) { return ring_block(N, n, i); };
  // Reduce-scatter: at step k send block r-k, receive block r-k-1 and add this rank's share.
  for (int k = 0; k < n - 1; ++k) {
    const auto [s0, s1] = blk(rank - k);
    const auto [r0, r1] = blk(rank - k - 1);
    ring_exchange(x, s0, s1, r0, r1, tmp.data(), right, left, comm, split, "ring reduce-scatter");
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
    ring_exchange<T>(x, s0, s1, r0, r1, nullptr, right, left, comm, split, "ring allgather");
  }
}

}  // namespace hma::detail
