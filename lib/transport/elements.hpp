// Internal, data plane: the element loops of an average (scale, pack, unpack) and the views the
// transports reduce (Runs, RunsBuffer).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

#include "hma/buffer.hpp"
#include "hma/error.hpp"

namespace hma::detail {

// MPI counts are int: every transport reduces buffers of more than max_count() elements in
// pieces of at most that many (2^30). Tests lower it (set_max_count_for_testing, the same value
// on every rank, between averages) to run that splitting on small buffers.
constexpr std::size_t kMaxCount = std::size_t{1} << 30;
std::size_t max_count();
/// 0 restores 2^30.
void set_max_count_for_testing(std::size_t n);

// hma's ring sends runs of at least this many bytes as messages of their own (ring.hpp):
// contiguous, so shared-memory transports copy them once, process to process; smaller runs
// travel together. Tests lower it (set_own_message_bytes_for_testing in uses.hpp).
constexpr std::size_t kOwnMessageBytes = std::size_t{32} << 10;

// Elements per piece for pieces of `chunk_bytes` (0: one piece) of `elem_size`-byte elements:
// at least one, at most `most` (the count limit, or less).
inline std::size_t piece_elems(std::size_t chunk_bytes, std::size_t elem_size, std::size_t most) {
  const std::size_t want = chunk_bytes == 0 ? most : std::max<std::size_t>(1, chunk_bytes / elem_size);
  return std::max<std::size_t>(1, std::min(want, most));
}

template <Element T>
MPI_Datatype mpi_type() {
  return std::same_as<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}
inline MPI_Datatype mpi_type(Dtype d) {
  switch (d) {
    case Dtype::f32: return mpi_type<float>();
    case Dtype::f64: return mpi_type<double>();
    default: return MPI_UINT16_T;  // bf16 / fp16 bit patterns (summed with hma's op, never MPI_SUM)
  }
}

// torch: flat_params /= group_size before the allreduce. For a power-of-two group size the
// reciprocal is exact, and x * (1/g) == x / g bit for bit, so the cheaper multiply is used.
// Weighted averaging (weight >= 0): x * (w_i / sum w) instead, multiplied in double and rounded
// once to T.
template <Element T>
struct Scaler {
  T g, inv;
  bool pow2;
  double weight = -1;
  explicit Scaler(int group_size, double weight_factor = -1)
      : g(static_cast<T>(group_size)),
        inv(T(1) / static_cast<T>(group_size)),
        pow2((group_size & (group_size - 1)) == 0),
        weight(weight_factor) {}
  void in_place(T* x, std::size_t n) const {
    if (weight >= 0) {
      for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(static_cast<double>(x[i]) * weight);
    } else if (pow2) {
      for (std::size_t i = 0; i < n; ++i) x[i] *= inv;
    } else {
      for (std::size_t i = 0; i < n; ++i) x[i] /= g;
    }
  }
  void copy(const T* in, T* out, std::size_t n) const {
    if (weight >= 0) {
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<double>(in[i]) * weight);
    } else if (pow2) {
      for (std::size_t i = 0; i < n; ++i) out[i] = in[i] * inv;
    } else {
      for (std::size_t i = 0; i < n; ++i) out[i] = in[i] / g;
    }
  }
};

// Calls fn(storage offset, user pointer or nullptr, count) for the parts of [lo, hi) of the
// bucket: the owned region (in place, user pointer null) and each packed user array.
template <Storable T, class F>
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

// Copies the packed user arrays' part of [lo, hi) into the bucket's buffer, unscaled.
template <Storable T>
void pack_range(Bucket<T>& b, std::size_t lo, std::size_t hi) {
  T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    if (user != nullptr) std::copy(user, user + n, data + at);
  });
}

// Writes [lo, hi) of the bucket (owned region or user arrays), scaled, to out[0, hi - lo): the
// send side of an out-of-place reduction.
template <Element T>
void scale_out(Bucket<T>& b, std::size_t lo, std::size_t hi, const Scaler<T>& s, T* out) {
  T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    s.copy(user != nullptr ? user : data + at, out + (at - lo), n);
  });
}

// Copies in[0, hi - lo) back into [lo, hi) of the bucket (owned region or user arrays).
template <Element T>
void copy_back(Bucket<T>& b, std::size_t lo, std::size_t hi, const T* in) {
  T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    std::copy(in + (at - lo), in + (at - lo) + n, user != nullptr ? user : data + at);
  });
}

// Copies [lo, hi) of the staging area back into the packed user arrays.
template <Storable T>
void unpack_range(Bucket<T>& b, std::size_t lo, std::size_t hi) {
  const T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    if (user != nullptr) std::copy(data + at, data + at + n, user);
  });
}

template <Storable T>
void unpack_bucket(Bucket<T>& b) {
  unpack_range(b, b.owned, b.size());
}

// The start of block i of n blocks over N elements (sizes differ by at most one).
inline std::size_t block_start(std::size_t N, int n, int i) {
  const std::size_t q = N / static_cast<std::size_t>(n), r = N % static_cast<std::size_t>(n);
  const std::size_t k = static_cast<std::size_t>(i);
  return q * k + std::min(k, r);
}

/// A ring's block i of [0, N) split into n blocks, i taken modulo n (a ring step's r - k may be
/// negative): [begin, end).
inline std::pair<std::size_t, std::size_t> ring_block(std::size_t N, int n, int i) {
  i = ((i % n) + n) % n;
  return {block_start(N, n, i), block_start(N, n, i + 1)};
}

/// The memory of a logical range [0, N) of a bucket as an ordered list of contiguous runs: the
/// owned region in hma's buffer, then the user arrays themselves. The ring reads and writes them
/// in place, so packed arrays need no copy into hma's buffer and back.
template <Element T>
struct Runs {
  std::vector<T*> ptr;
  std::vector<std::size_t> len, start;  // start: logical offset of each run
  std::size_t N = 0;

  static Runs of(Bucket<T>& b, std::size_t lo, std::size_t hi) {
    Runs r;
    T* data = b.storage.data();
    for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
      if (n == 0) return;
      r.ptr.push_back(user != nullptr ? user : data + at);
      r.len.push_back(n);
      r.start.push_back(r.N);
      r.N += n;
    });
    return r;
  }
  /// Calls fn(pointer, count, logical offset) for the parts of the runs inside [a, b).
  template <class F>
  void each(std::size_t a, std::size_t b, F&& fn) const {
    if (a >= b) return;
    std::size_t i = static_cast<std::size_t>(std::upper_bound(start.begin(), start.end(), a) - start.begin()) - 1;
    for (; i < ptr.size() && start[i] < b; ++i) {
      const std::size_t from = std::max(a, start[i]), to = std::min(b, start[i] + len[i]);
      fn(ptr[i] + (from - start[i]), to - from, from);
    }
  }
};

/// An MPI buffer for the logical range [a, b) of some Runs: a plain pointer when the range is one
/// run, else MPI_BOTTOM with an hindexed datatype over the runs (freed by the destructor).
template <Element T>
class RunsBuffer {
 public:
  RunsBuffer(const Runs<T>& r, std::size_t a, std::size_t b) {
    std::vector<int> lens;
    std::vector<MPI_Aint> displs;
    T* first = nullptr;
    r.each(a, b, [&](T* p, std::size_t n, std::size_t) {
      if (first == nullptr) first = p;
      MPI_Aint addr = 0;
      check(MPI_Get_address(p, &addr), "MPI_Get_address");
      lens.push_back(static_cast<int>(n));
      displs.push_back(addr);
    });
    if (lens.size() <= 1) {
      ptr_ = first;
      count_ = lens.empty() ? 0 : lens[0];
      type_ = mpi_type<T>();
      return;
    }
    check(MPI_Type_create_hindexed(static_cast<int>(lens.size()), lens.data(), displs.data(),
                                   mpi_type<T>(), &type_),
          "MPI_Type_create_hindexed");
    check(MPI_Type_commit(&type_), "MPI_Type_commit");
    owned_ = true;
    ptr_ = MPI_BOTTOM;
    count_ = 1;
  }
  ~RunsBuffer() {
    if (owned_) MPI_Type_free(&type_);
  }
  RunsBuffer(const RunsBuffer&) = delete;
  RunsBuffer& operator=(const RunsBuffer&) = delete;
  void* ptr() const { return ptr_; }
  int count() const { return count_; }
  MPI_Datatype type() const { return type_; }

 private:
  void* ptr_ = nullptr;
  int count_ = 0;
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
  bool owned_ = false;
};

}  // namespace hma::detail
