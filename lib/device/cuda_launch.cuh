// Internal: what the CUDA backend's two files share (lib/device/device_cuda.cu, the backend;
// lib/device/device_cuda_ipc.cu, the node transport's kernels): errors, the segment record,
// kernel launches, and the node transport's launchers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "device/device_backend.hpp"
#include "hma/error.hpp"

namespace hma::detail {

inline void cu(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();  // hma's own error: not left for the caller's next check
    throw Error(std::string("hma: CUDA: ") + what + ": " + cudaGetErrorName(rc) + ": " +
                cudaGetErrorString(rc));
  }
}

struct DevSeg {
  void* user;
  std::uint64_t at, n;
};

constexpr int kThreads = 256;
inline unsigned blocks_for(std::uint64_t n) {
  const std::uint64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : b > 65535 * 8 ? 65535 * 8 : b);
}

// Launches `kernel` with `args` (pointers to arguments of exactly the kernel's parameter types)
// and reports THIS launch's error only: cudaLaunchKernel returns its own status, where
// cudaGetLastError() after a <<<>>> launch would also return the caller's earlier errors.
inline void launch(const void* kernel, unsigned blocks, void** args, cudaStream_t s, const char* what) {
  const cudaError_t rc = cudaLaunchKernel(kernel, dim3(blocks), dim3(kThreads), args, 0, s);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();  // the error is hma's own: do not leave it for the caller
    cu(rc, what);
  }
}

/// The node transport (see DeviceBackend::sum_peers, sum_terms, pack_only).
void launch_sum_peers(Dtype d, void* dst, const void* const* src, int k, std::size_t n, cudaStream_t s);
void launch_sum_terms(Dtype d, void* dst, const void* const* src, const double* factor, int k, std::size_t n,
                      int group, bool mul, cudaStream_t s);
/// The kernel that copies a bucket's user arrays into its storage, unscaled.
const void* pack_only_kernel_for(Dtype d);

}  // namespace hma::detail
