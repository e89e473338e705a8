// Internal: the element loops of an average (scale, pack, unpack) and hma's own ring allreduce
// with the scaling fused into its additions.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "hma/buffer.hpp"
#include "hma/error.hpp"

namespace hma::detail {

// MPI counts are int: reduce buffers larger than this in pieces.
constexpr std::size_t kMaxChunk = std::size_t{1} << 30;

template <Element T>
MPI_Datatype mpi_type() {
  return std::same_as<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}

// torch: flat_params /= group_size before the allreduce. For a power-of-two group size the
// reciprocal is exact, and x * (1/g) == x / g bit for bit, so the cheaper multiply is used.
template <Element T>
struct Scaler {
  T g, inv;
  bool pow2;
  explicit Scaler(int group_size)
      : g(static_cast<T>(group_size)),
        inv(T(1) / static_cast<T>(group_size)),
        pow2((group_size & (group_size - 1)) == 0) {}
  void in_place(T* x, std::size_t n) const {
    if (pow2) {
      for (std::size_t i = 0; i < n; ++i) x[i] *= inv;
    } else {
      for (std::size_t i = 0; i < n; ++i) x[i] /= g;
    }
  }
  void copy(const T* in, T* out, std::size_t n) const {
    if (pow2) {
      for (std::size_t i = 0; i < n; ++i) out[i] = in[i] * inv;
    } else {
      for (std::size_t i = 0; i < n; ++i) out[i] = in[i] / g;
    }
  }
};

// Calls fn(storage offset, user pointer or nullptr, count) for the parts of [lo, hi) of the
// bucket: the owned region (in place, user pointer null) and each packed user array.
template <Element T, class F>
void for_segments(Bucket<T>& b, std::size_t lo, std::size_t hi, F&& fn) {
  if (lo < b.owned) fn(lo, static_cast<T*>(nullptr), std::min(hi, b.owned) - lo);
  std::size_t off = b.owned;
  for (const auto& u : b.user) {
    const std::size_t end = off + u.size();
    if (end > lo && off < hi) {
      const std::size_t from = std::max(off, lo), to = std::min(end, hi);
      fn(from, u.data() + (from - off), to - from);
    }
    off = end;
    if (off >= hi) break;
  }
}

// Scales [lo, hi) of the bucket's buffer, copying packed user arrays in on the way.
template <Element T>
void scale_pack(Bucket<T>& b, std::size_t lo, std::size_t hi, const Scaler<T>& s) {
  T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    if (user == nullptr) s.in_place(data + at, n);
    else s.copy(user, data + at, n);
  });
}

// Copies the packed user arrays of [lo, hi) into the buffer, unscaled (the ring scales later).
template <Element T>
void pack_range(Bucket<T>& b, std::size_t lo, std::size_t hi) {
  T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    if (user != nullptr) std::copy(user, user + n, data + at);
  });
}

// Copies [lo, hi) of the staging area back into the packed user arrays.
template <Element T>
void unpack_range(Bucket<T>& b, std::size_t lo, std::size_t hi) {
  const T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    if (user != nullptr) std::copy(data + at, data + at + n, user);
  });
}

template <Element T>
void unpack_bucket(Bucket<T>& b) {
  unpack_range(b, b.owned, b.size());
}

// The start of block i of n blocks over N elements (sizes differ by at most one).
inline std::size_t block_start(std::size_t N, int n, int i) {
  const std::size_t q = N / static_cast<std::size_t>(n), r = N % static_cast<std::size_t>(n);
  const std::size_t k = static_cast<std::size_t>(i);
  return q * k + std::min(k, r);
}

/// Averages x[0, N) over the ranks of `comm` with a ring (reduce-scatter, then allgather) over
/// point-to-point messages, dividing by the group size inside the additions: each element ends
/// as the sum of every rank's x / g, exactly torch's formula, with no separate scaling pass.
/// `x` holds this rank's UNSCALED values. `tmp` is scratch (resized as needed). Collective.
template <Element T>
void ring_average(T* x, std::size_t N, MPI_Comm comm, int rank, int n, const Scaler<T>& s,
                  std::vector<T>& tmp) {
  const int right = (rank + 1) % n, left = (rank - 1 + n) % n;
  constexpr int kTag = 0x686d;  // hma's communicators carry only hma's traffic
  tmp.resize(N / static_cast<std::size_t>(n) + 1);
  auto blk = [&](int i) {
    i = ((i % n) + n) % n;
    const std::size_t b0 = block_start(N, n, i), b1 = block_start(N, n, i + 1);
    return std::pair<std::size_t, int>(b0, static_cast<int>(b1 - b0));
  };
  // Reduce-scatter: at step k send block r-k, receive block r-k-1 and add this rank's share.
  for (int k = 0; k < n - 1; ++k) {
    const auto [so, sc] = blk(rank - k);
    const auto [ro, rc] = blk(rank - k - 1);
    check(MPI_Sendrecv(x + so, sc, mpi_type<T>(), right, kTag, tmp.data(), rc, mpi_type<T>(), left,
                       kTag, comm, MPI_STATUS_IGNORE),
          "MPI_Sendrecv(ring reduce-scatter)");
    T* mine = x + ro;
    const T* in = tmp.data();
    const std::size_t m = static_cast<std::size_t>(rc);
    if (k == 0) {  // the left neighbour sent its own, unscaled values
      if (s.pow2) {
        for (std::size_t i = 0; i < m; ++i) mine[i] = in[i] * s.inv + mine[i] * s.inv;
      } else {
        for (std::size_t i = 0; i < m; ++i) mine[i] = in[i] / s.g + mine[i] / s.g;
      }
    } else {  // a partial sum of scaled values
      if (s.pow2) {
        for (std::size_t i = 0; i < m; ++i) mine[i] = in[i] + mine[i] * s.inv;
      } else {
        for (std::size_t i = 0; i < m; ++i) mine[i] = in[i] + mine[i] / s.g;
      }
    }
  }
  // Allgather: this rank now owns block r+1; pass the finished blocks around the ring.
  for (int k = 0; k < n - 1; ++k) {
    const auto [so, sc] = blk(rank + 1 - k);
    const auto [ro, rc] = blk(rank - k);
    check(MPI_Sendrecv(x + so, sc, mpi_type<T>(), right, kTag, x + ro, rc, mpi_type<T>(), left,
                       kTag, comm, MPI_STATUS_IGNORE),
          "MPI_Sendrecv(ring allgather)");
  }
}

}  // namespace hma::detail
