// The CUDA backend (see device_backend.hpp): device memory, pinned host memory, streams, events
// and hma's three kernels (scale+pack, unpack, non-finite scan), one launch each however many
// arrays a bucket holds. Built with nvcc only when the CUDA Toolkit is found (meson -Dcuda).
// Kernels use IEEE division (no fast math): x / g rounds exactly as on the host, so device and
// host averages have the same terms (and the same bits where MPI adds them in the same order).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "device/device_backend.hpp"
#include "hma/error.hpp"
#include "device/segments.hpp"

namespace hma::detail {

namespace {

void cu(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess)
    throw Error(std::string("hma: CUDA: ") + what + ": " + cudaGetErrorName(rc) + ": " +
                cudaGetErrorString(rc));
}

struct DevSeg {
  void* user;
  std::uint64_t at, n;
};

template <class T, bool Pow2>
__global__ void scale_pack_kernel(T* storage, const DevSeg* segs, int nsegs, std::uint64_t total,
                                  T g, T inv) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t e = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const DevSeg s = segs[find_segment(segs, nsegs, e)];
    const T x = s.user != nullptr ? static_cast<const T*>(s.user)[e - s.at] : storage[e];
    storage[e] = Pow2 ? x * inv : x / g;
  }
}

template <class T>
__global__ void unpack_kernel(const T* storage, const DevSeg* segs, int nsegs, std::uint64_t from,
                              std::uint64_t total) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t e = from + static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       e < total; e += stride) {
    const DevSeg s = segs[find_segment(segs, nsegs, e)];
    if (s.user != nullptr) static_cast<T*>(s.user)[e - s.at] = storage[e];
  }
}

template <class T>
__global__ void fill_kernel(T* p, std::uint64_t n, T v) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t i = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    p[i] = v;
}

template <class T>
__global__ void nonfinite_kernel(const T* storage, const DevSeg* segs, int nsegs,
                                 std::uint64_t total, int* flag) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (std::uint64_t e = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const DevSeg s = segs[find_segment(segs, nsegs, e)];
    const T x = s.user != nullptr ? static_cast<const T*>(s.user)[e - s.at] : storage[e];
    bad |= !isfinite(x);
  }
  if (bad) atomicOr(flag, 1);
}

constexpr int kThreads = 256;
unsigned blocks_for(std::uint64_t n) {
  const std::uint64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : b > 65535 * 8 ? 65535 * 8 : b);
}

struct Table {
  DevSeg* dev = nullptr;
  int n = 0;
};

class Cuda final : public DeviceBackend {
 public:
  std::string name() const override { return "CUDA"; }
  int devices(std::string& reason) override {
    int n = 0;
    const cudaError_t rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess) {
      reason = std::string("no usable CUDA device: cudaGetDeviceCount: ") + cudaGetErrorName(rc) +
               ": " + cudaGetErrorString(rc);
      (void)cudaGetLastError();
      return 0;
    }
    reason = n == 0 ? "no CUDA device is visible (cudaGetDeviceCount = 0)" : "";
    return n;
  }
  void set_device(int d) override { cu(cudaSetDevice(d), "cudaSetDevice"); }
  int current_device() override {
    int d = 0;
    cu(cudaGetDevice(&d), "cudaGetDevice");
    return d;
  }
  void* alloc(std::size_t bytes) override {
    void* p = nullptr;
    cu(cudaMalloc(&p, bytes == 0 ? 1 : bytes), "cudaMalloc");
    return p;
  }
  void release(void* p) noexcept override { (void)cudaFree(p); }
  void* alloc_pinned(std::size_t bytes) override {
    void* p = nullptr;
    cu(cudaMallocHost(&p, bytes == 0 ? 1 : bytes), "cudaMallocHost");
    return p;
  }
  void release_pinned(void* p) noexcept override { (void)cudaFreeHost(p); }
  bool maybe_device_pointer(const void* p) override {
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
      (void)cudaGetLastError();
      return true;  // cannot tell
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
  }
  Stream create_stream() override {
    cudaStream_t s = nullptr;
    cu(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    return s;
  }
  void destroy_stream(Stream s) noexcept override {
    if (s != nullptr) (void)cudaStreamDestroy(s);
  }
  Event create_event() override {
    cudaEvent_t e = nullptr;
    cu(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return e;
  }
  void destroy_event(Event e) noexcept override { (void)cudaEventDestroy(static_cast<cudaEvent_t>(e)); }
  void record(Event e, Stream s) override { cu(cudaEventRecord(static_cast<cudaEvent_t>(e), s), "cudaEventRecord"); }
  bool query(Event e) override {
    const cudaError_t rc = cudaEventQuery(static_cast<cudaEvent_t>(e));
    if (rc == cudaErrorNotReady) return false;
    cu(rc, "cudaEventQuery");
    return true;
  }
  void synchronize(Event e) override {
    cu(cudaEventSynchronize(static_cast<cudaEvent_t>(e)), "cudaEventSynchronize");
  }
  void stream_wait(Stream s, Event e) override {
    cu(cudaStreamWaitEvent(s, static_cast<cudaEvent_t>(e), 0), "cudaStreamWaitEvent");
  }
  void copy(void* dst, const void* src, std::size_t bytes, Stream s) override {
    cu(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync");
  }
  void fill(Dtype d, void* p, std::size_t n, double v, Stream s) override {
    if (n == 0) return;
    if (d == Dtype::f32)
      fill_kernel<float><<<blocks_for(n), kThreads, 0, s>>>(static_cast<float*>(p), n, static_cast<float>(v));
    else
      fill_kernel<double><<<blocks_for(n), kThreads, 0, s>>>(static_cast<double*>(p), n, v);
    cu(cudaGetLastError(), "fill kernel launch");
  }
  void* upload_segments(const std::vector<Segment>& segs) override {
    std::vector<DevSeg> h;
    h.reserve(segs.size());
    for (const auto& s : segs) h.push_back(DevSeg{s.user, s.at, s.n});
    auto* t = new Table;
    t->n = static_cast<int>(h.size());
    if (!h.empty()) {
      try {
        cu(cudaMalloc(&t->dev, h.size() * sizeof(DevSeg)), "cudaMalloc(segment table)");
        cu(cudaMemcpy(t->dev, h.data(), h.size() * sizeof(DevSeg), cudaMemcpyHostToDevice),
           "cudaMemcpy(segment table)");
      } catch (...) {
        release_segments(t);
        throw;
      }
    }
    return t;
  }
  void release_segments(void* table) noexcept override {
    auto* t = static_cast<Table*>(table);
    if (t == nullptr) return;
    if (t->dev != nullptr) (void)cudaFree(t->dev);
    delete t;
  }
  void scale_pack(Dtype d, void* storage, void* table, const std::vector<Segment>&, std::size_t total,
                  int group, Stream s) override {
    const auto* t = static_cast<Table*>(table);
    if (total == 0 || t->n == 0) return;
    const bool pow2 = (group & (group - 1)) == 0;
    const unsigned b = blocks_for(total);
    if (d == Dtype::f32) {
      const float g = static_cast<float>(group), inv = 1.0f / g;
      if (pow2) scale_pack_kernel<float, true><<<b, kThreads, 0, s>>>(static_cast<float*>(storage), t->dev, t->n, total, g, inv);
      else scale_pack_kernel<float, false><<<b, kThreads, 0, s>>>(static_cast<float*>(storage), t->dev, t->n, total, g, inv);
    } else {
      const double g = static_cast<double>(group), inv = 1.0 / g;
      if (pow2) scale_pack_kernel<double, true><<<b, kThreads, 0, s>>>(static_cast<double*>(storage), t->dev, t->n, total, g, inv);
      else scale_pack_kernel<double, false><<<b, kThreads, 0, s>>>(static_cast<double*>(storage), t->dev, t->n, total, g, inv);
    }
    cu(cudaGetLastError(), "scale+pack kernel launch");
  }
  void unpack(Dtype d, const void* storage, void* table, const std::vector<Segment>& segs,
              std::size_t total, Stream s) override {
    const auto* t = static_cast<Table*>(table);
    const std::uint64_t from = unpack_start(segs.data(), static_cast<int>(segs.size()));
    if (total <= from || t->n == 0) return;
    if (d == Dtype::f32)
      unpack_kernel<float><<<blocks_for(total - from), kThreads, 0, s>>>(static_cast<const float*>(storage), t->dev, t->n, from, total);
    else
      unpack_kernel<double><<<blocks_for(total - from), kThreads, 0, s>>>(static_cast<const double*>(storage), t->dev, t->n, from, total);
    cu(cudaGetLastError(), "unpack kernel launch");
  }
  bool any_nonfinite(Dtype d, const void* storage, void* table, const std::vector<Segment>&,
                     std::size_t total, Stream s) override {
    const auto* t = static_cast<Table*>(table);
    if (total == 0 || t->n == 0) return false;
    if (host_flag_ == nullptr)  // mapped, portable pinned memory: written by kernels on any device
      cu(cudaHostAlloc(reinterpret_cast<void**>(&host_flag_), sizeof(int),
                       cudaHostAllocMapped | cudaHostAllocPortable),
         "cudaHostAlloc(non-finite flag)");
    *host_flag_ = 0;
    if (d == Dtype::f32)
      nonfinite_kernel<float><<<blocks_for(total), kThreads, 0, s>>>(static_cast<const float*>(storage), t->dev, t->n, total, host_flag_);
    else
      nonfinite_kernel<double><<<blocks_for(total), kThreads, 0, s>>>(static_cast<const double*>(storage), t->dev, t->n, total, host_flag_);
    cu(cudaGetLastError(), "non-finite kernel launch");
    cudaEvent_t e = nullptr;
    cu(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    cudaError_t rc = cudaEventRecord(e, s);
    if (rc == cudaSuccess) rc = cudaEventSynchronize(e);
    (void)cudaEventDestroy(e);
    cu(rc, "cudaEventSynchronize(non-finite scan)");
    return *static_cast<volatile int*>(host_flag_) != 0;
  }

 private:
  int* host_flag_ = nullptr;  // one per process: used by the calling thread of an average only
};

}  // namespace

DeviceBackend* cuda_backend() {
  static Cuda c;
  return &c;
}

}  // namespace hma::detail
