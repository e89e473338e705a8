#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "gpu_kernels.hpp"

namespace hma_gpu {
namespace {

void ok(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(rc));
}

template <class T>
__global__ void fill_kernel(T* p, std::size_t n, std::size_t first, int r, long long t, long long spin) {
  if (spin > 0) {
    const long long start = clock64();
    while (clock64() - start < spin) {
    }
  }
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const long long k = static_cast<long long>(first + i);
    p[i] = static_cast<T>(24.0 * static_cast<double>((r * 7 + k * 3 + t * 5) % 17 - 8));
  }
}

template <class T>
__global__ void copy_kernel(T* d, const T* s, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) d[i] = s[i];
}

unsigned blocks(std::size_t n) { return static_cast<unsigned>(n / 256 + 1 > 4096 ? 4096 : n / 256 + 1); }

long long cycles(unsigned us) {
  if (us == 0) return 0;
  int dev = 0, khz = 0;
  ok(cudaGetDevice(&dev), "cudaGetDevice");
  ok(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev), "cudaDeviceGetAttribute");
  return static_cast<long long>(khz) * us / 1000;
}

template <class T>
void fill_t(T* p, std::size_t n, std::size_t first, int r, std::int64_t t, hma::Stream s, unsigned us) {
  fill_kernel<T><<<blocks(n), 256, 0, s>>>(p, n, first, r, t, cycles(us));
  ok(cudaGetLastError(), "fill kernel");
}
}  // namespace

void fill_values(float* p, std::size_t n, std::size_t first, int r, std::int64_t t, hma::Stream s, unsigned us) {
  fill_t(p, n, first, r, t, s, us);
}
void fill_values(double* p, std::size_t n, std::size_t first, int r, std::int64_t t, hma::Stream s, unsigned us) {
  fill_t(p, n, first, r, t, s, us);
}
void copy(float* d, const float* src, std::size_t n, hma::Stream s) {
  copy_kernel<float><<<blocks(n), 256, 0, s>>>(d, src, n);
  ok(cudaGetLastError(), "copy kernel");
}
void copy(double* d, const double* src, std::size_t n, hma::Stream s) {
  copy_kernel<double><<<blocks(n), 256, 0, s>>>(d, src, n);
  ok(cudaGetLastError(), "copy kernel");
}

}  // namespace hma_gpu
