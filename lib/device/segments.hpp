// Internal: the element -> segment lookup of hma's pack/unpack kernels, shared by the CUDA
// kernels (lib/device_cuda.cu) and the host emulation backend, so that the emulation runs the
// kernels' exact indexing and the tests without a GPU check it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HMA_HOST_DEVICE __host__ __device__
#else
#define HMA_HOST_DEVICE
#endif

namespace hma::detail {

/// The index of the segment holding logical element `e`: segments are sorted by `at`, cover
/// [0, total) without gaps and have n > 0; the answer is the last one with at <= e.
template <class Seg>
HMA_HOST_DEVICE inline int find_segment(const Seg* segs, int nsegs, std::uint64_t e) {
  int lo = 0, hi = nsegs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (static_cast<std::uint64_t>(segs[mid].at) <= e) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/// The first element unpack touches: user arrays follow the owned region (segment 0 when its
/// `user` is null).
template <class Seg>
HMA_HOST_DEVICE inline std::uint64_t unpack_start(const Seg* segs, int nsegs) {
  return nsegs == 0 || segs[0].user != nullptr ? 0 : static_cast<std::uint64_t>(segs[0].n);
}

}  // namespace hma::detail
