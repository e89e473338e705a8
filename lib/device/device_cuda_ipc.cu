// The CUDA kernels of the node transport (lib/transport/ipc.cpp): the one-shot sum of every
// rank's terms, the two-shot slice sum of every rank's raw values, and the unscaled pack.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "device/cuda_launch.cuh"
#include "device/segments.hpp"

namespace hma::detail {

namespace {

// The node transport's sum: every rank's terms, read through CUDA IPC, added in rank order.
struct PeerPtrs {
  const void* p[kMaxIpcPeers];
};

template <class T, class V, int W>
__global__ void sum_peers_kernel(T* dst, PeerPtrs src, int k, std::uint64_t n) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  const std::uint64_t first = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::uint64_t nv = n / W;  // whole vectors (every buffer is 256-byte aligned)
  for (std::uint64_t i = first; i < nv; i += stride) {
    V acc = static_cast<const V*>(src.p[0])[i];
    for (int j = 1; j < k; ++j) {
      const V x = static_cast<const V*>(src.p[j])[i];
      if constexpr (W == 4) {
        acc.x += x.x;
        acc.y += x.y;
        acc.z += x.z;
        acc.w += x.w;
      } else if constexpr (W == 2) {
        acc.x += x.x;
        acc.y += x.y;
      } else {
        acc += x;
      }
    }
    reinterpret_cast<V*>(dst)[i] = acc;
  }
  for (std::uint64_t e = nv * W + first; e < n; e += stride) {  // the tail
    T acc = static_cast<const T*>(src.p[0])[e];
    for (int j = 1; j < k; ++j) acc += static_cast<const T*>(src.p[j])[e];
    dst[e] = acc;
  }
}

// The two-shot sum: each rank's slice of every rank's raw values, scaled as the pack kernel
// scales them (same terms, same bits), added in rank order.
struct PeerFactors {
  double f[kMaxIpcPeers];
};

template <class T>
__device__ T term(T x, double factor, T g, T inv, bool mul) {
  return factor >= 0 ? static_cast<T>(static_cast<double>(x) * factor) : mul ? x * inv : x / g;
}

template <class T>
__global__ void sum_terms_kernel(T* dst, PeerPtrs src, PeerFactors f, int k, std::uint64_t n, T g, T inv,
                                 bool mul) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t i = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    T acc = term(static_cast<const T*>(src.p[0])[i], f.f[0], g, inv, mul);
    for (int j = 1; j < k; ++j) acc += term(static_cast<const T*>(src.p[j])[i], f.f[j], g, inv, mul);
    dst[i] = acc;
  }
}

// The user arrays into storage, unscaled (the owned front is left alone).
template <class T>
__global__ void pack_only_kernel(T* storage, const DevSeg* segs, int nsegs, std::uint64_t from, std::uint64_t total) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t e = from + static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       e < total; e += stride) {
    const DevSeg s = segs[find_segment(segs, nsegs, e)];
    if (s.user != nullptr) storage[e] = static_cast<const T*>(s.user)[e - s.at];
  }
}

}  // namespace

void launch_sum_terms(Dtype d, void* dst, const void* const* src, const double* factor, int k, std::size_t n,
                      int group, bool mul, cudaStream_t s) {
  if (n == 0) return;
  if (k < 1 || k > kMaxIpcPeers) throw Error("hma: internal: sum_terms over " + std::to_string(k) + " buffers");
  PeerPtrs p{};
  PeerFactors f{};
  for (int j = 0; j < k; ++j) {
    p.p[j] = src[j];
    f.f[j] = factor[j];
  }
  std::uint64_t count = n;
  if (d == Dtype::f32) {
    float g = static_cast<float>(group), inv = 1.0f / g;
    void* args[] = {&dst, &p, &f, &k, &count, &g, &inv, &mul};
    launch(reinterpret_cast<const void*>(&sum_terms_kernel<float>), blocks_for(n), args, s, "slice sum kernel launch");
  } else {
    double g = group, inv = 1.0 / g;
    void* args[] = {&dst, &p, &f, &k, &count, &g, &inv, &mul};
    launch(reinterpret_cast<const void*>(&sum_terms_kernel<double>), blocks_for(n), args, s, "slice sum kernel launch");
  }
}

void launch_sum_peers(Dtype d, void* dst, const void* const* src, int k, std::size_t n, cudaStream_t s) {
  if (n == 0) return;
  if (k < 1 || k > kMaxIpcPeers) throw Error("hma: internal: sum_peers over " + std::to_string(k) + " buffers");
  PeerPtrs p{};
  for (int j = 0; j < k; ++j) p.p[j] = src[j];
  std::uint64_t count = n;
  void* args[] = {&dst, &p, &k, &count};
  const bool f32 = d == Dtype::f32;
  const void* kern = f32 ? reinterpret_cast<const void*>(&sum_peers_kernel<float, float4, 4>)
                         : reinterpret_cast<const void*>(&sum_peers_kernel<double, double2, 2>);
  const std::uint64_t vec = f32 ? (n + 3) / 4 : (n + 1) / 2;
  // A few waves of blocks: each thread strides over several vectors.
  const std::uint64_t b = (vec + kThreads - 1) / kThreads;
  launch(kern, static_cast<unsigned>(b < 1 ? 1 : b > 132 * 16 ? 132 * 16 : b), args, s, "peer sum kernel launch");
}

const void* pack_only_kernel_for(Dtype d) {
  return d == Dtype::f32 ? reinterpret_cast<const void*>(&pack_only_kernel<float>)
                         : reinterpret_cast<const void*>(&pack_only_kernel<double>);
}

}  // namespace hma::detail
