// The CUDA backend (see device_backend.hpp): device memory, pinned host memory, streams, events
// and hma's three kernels (scale+pack, unpack, non-finite scan), one launch each however many
// arrays a bucket holds. Built with nvcc only when the CUDA Toolkit is found (meson -Dcuda).
// Kernels use IEEE division (no fast math): x / g rounds exactly as on the host, so device and
// host averages have the same terms (and the same bits where MPI adds them in the same order).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "device/device_backend.hpp"
#include "hma/error.hpp"
#include "device/segments.hpp"
#include "device/cuda_launch.cuh"

namespace hma::detail {

namespace {

template <class T, bool Pow2>
__global__ void scale_pack_kernel(const T* storage, const DevSeg* segs, int nsegs, std::uint64_t total,
                                  T g, T inv, T* out) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t e = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const DevSeg s = segs[find_segment(segs, nsegs, e)];
    const T x = s.user != nullptr ? static_cast<const T*>(s.user)[e - s.at] : storage[e];
    out[e] = Pow2 ? x * inv : x / g;
  }
}

// Weighted averaging: x * (w_i / sum w), multiplied in double and rounded once (as the host).
template <class T>
__global__ void scale_pack_weighted_kernel(const T* storage, const DevSeg* segs, int nsegs, std::uint64_t total,
                                           double weight, T* out) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t e = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const DevSeg s = segs[find_segment(segs, nsegs, e)];
    const T x = s.user != nullptr ? static_cast<const T*>(s.user)[e - s.at] : storage[e];
    out[e] = static_cast<T>(static_cast<double>(x) * weight);
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

struct Table {
  DevSeg* dev = nullptr;     // device copy, read by the kernels
  DevSeg* pinned = nullptr;  // host staging of the upload (freed with the table)
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
  int pointer_device(const void* p) override {
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
      (void)cudaGetLastError();
      return -1;
    }
    return a.type == cudaMemoryTypeDevice ? a.device : -1;  // managed memory: any device
  }
  bool can_access_peer(int device, int peer) override {
    if (device == peer) return true;
    int can = 0;
    cu(cudaDeviceCanAccessPeer(&can, device, peer), "cudaDeviceCanAccessPeer");
    if (!can) return false;
    // Kernels on `device` read the array: peer access must be enabled there (once per context).
    DeviceGuard g(this, device);
    const cudaError_t rc = cudaDeviceEnablePeerAccess(peer, 0);
    if (rc == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();  // hma's own, harmless
      return true;
    }
    if (rc == cudaErrorTooManyPeers) {
      (void)cudaGetLastError();
      return false;
    }
    cu(rc, "cudaDeviceEnablePeerAccess");
    return true;
  }
  std::string ipc_unsupported(int device) override {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrIpcEventSupport, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return "cudaDeviceGetAttribute failed for device " + std::to_string(device);
    }
    return v != 0 ? "" : "device " + std::to_string(device) + " does not support CUDA IPC";
  }
  std::string device_id(int device) override {
    char id[32] = {};
    cu(cudaDeviceGetPCIBusId(id, sizeof id, device), "cudaDeviceGetPCIBusId");
    return id;
  }
  bool can_reach(int device, const std::string& id) override {
    int peer = -1;
    if (cudaDeviceGetByPCIBusId(&peer, id.c_str()) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;  // not visible in this process
    }
    return can_access_peer(device, peer);
  }
  void* alloc_shared(std::size_t bytes, IpcHandle& h) override {
    static_assert(sizeof(cudaIpcMemHandle_t) <= sizeof h.bytes);
    void* p = alloc(bytes);
    cudaIpcMemHandle_t m{};
    const cudaError_t rc = cudaIpcGetMemHandle(&m, p);
    if (rc != cudaSuccess) {
      release(p);
      cu(rc, "cudaIpcGetMemHandle");
    }
    std::memcpy(h.bytes, &m, sizeof m);
    return p;
  }
  void release_shared(void* p) noexcept override { release(p); }
  void export_buffer(void* p, IpcHandle& h) override {
    cudaIpcMemHandle_t m{};
    cu(cudaIpcGetMemHandle(&m, p), "cudaIpcGetMemHandle");
    std::memcpy(h.bytes, &m, sizeof m);
  }
  void pack_only(Dtype d, void* storage, void* table, const std::vector<Segment>& segs, std::size_t total,
                 Stream s) override {
    over_user_segments(pack_only_kernel_for(d), storage, table, segs, total, s, "pack kernel launch");
  }
  void sum_terms(Dtype d, void* dst, const void* const* src, const double* factor, int k, std::size_t n,
                 int group, bool mul, Stream s) override {
    launch_sum_terms(d, dst, src, factor, k, n, group, mul, s);
  }
  void sum_peers(Dtype d, void* dst, const void* const* src, int k, std::size_t n, Stream s) override {
    launch_sum_peers(d, dst, src, k, n, s);
  }
  void* open_shared(const IpcHandle& h, std::size_t) override {
    cudaIpcMemHandle_t m{};
    std::memcpy(&m, h.bytes, sizeof m);
    void* p = nullptr;
    cu(cudaIpcOpenMemHandle(&p, m, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
    return p;
  }
  void close_shared(void* p) noexcept override {
    if (p != nullptr) (void)cudaIpcCloseMemHandle(p);
  }
  int* alloc_flag() override {
    int* f = nullptr;  // mapped, portable pinned memory: written by kernels on any device
    cu(cudaHostAlloc(reinterpret_cast<void**>(&f), sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable),
       "cudaHostAlloc(non-finite flag)");
    *f = 0;
    return f;
  }
  void release_flag(int* f) noexcept override {
    if (f != nullptr) (void)cudaFreeHost(f);
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
    if (rc == cudaErrorNotReady) {
      (void)cudaGetLastError();  // polling is hma's business, not an error for the caller
      return false;
    }
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
    std::uint64_t count = n;
    if (d == Dtype::f32) {
      float* ptr = static_cast<float*>(p);
      float value = static_cast<float>(v);
      void* args[] = {&ptr, &count, &value};
      launch(reinterpret_cast<const void*>(&fill_kernel<float>), blocks_for(n), args, s, "fill kernel launch");
    } else {
      double* ptr = static_cast<double*>(p);
      double value = v;
      void* args[] = {&ptr, &count, &value};
      launch(reinterpret_cast<const void*>(&fill_kernel<double>), blocks_for(n), args, s, "fill kernel launch");
    }
  }
  void* upload_segments(const std::vector<Segment>& segs, Stream s) override {
    auto* t = new Table;
    t->n = static_cast<int>(segs.size());
    if (segs.empty()) return t;
    const std::size_t bytes = segs.size() * sizeof(DevSeg);
    try {
      // Pinned staging + an async copy ON hma's stream: ordered before the kernels queued there
      // after it (a pageable cudaMemcpy on the legacy stream may return before the DMA lands
      // and does not order against non-blocking streams).
      cu(cudaMallocHost(reinterpret_cast<void**>(&t->pinned), bytes), "cudaMallocHost(segment table)");
      for (std::size_t i = 0; i < segs.size(); ++i) t->pinned[i] = DevSeg{segs[i].user, segs[i].at, segs[i].n};
      cu(cudaMalloc(reinterpret_cast<void**>(&t->dev), bytes), "cudaMalloc(segment table)");
      cu(cudaMemcpyAsync(t->dev, t->pinned, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(s)),
         "cudaMemcpyAsync(segment table)");
    } catch (...) {
      release_segments(t);
      throw;
    }
    return t;
  }
  void release_segments(void* table) noexcept override {
    auto* t = static_cast<Table*>(table);
    if (t == nullptr) return;
    if (t->dev != nullptr) (void)cudaFree(t->dev);
    if (t->pinned != nullptr) (void)cudaFreeHost(t->pinned);
    delete t;
  }
  void scale_pack(Dtype d, void* storage, void* table, const std::vector<Segment>&, std::size_t total,
                  int group, bool reciprocal, double weight, Stream s, void* out) override {
    const auto* t = static_cast<Table*>(table);
    if (total == 0 || t->n == 0) return;
    if (weight >= 0) {
      const DevSeg* dev = t->dev;
      int n = t->n;
      std::uint64_t count = total;
      void* src = storage;
      void* args[] = {&src, &dev, &n, &count, &weight, &out};
      const void* k = d == Dtype::f32 ? reinterpret_cast<const void*>(&scale_pack_weighted_kernel<float>)
                                      : reinterpret_cast<const void*>(&scale_pack_weighted_kernel<double>);
      launch(k, blocks_for(total), args, s, "weighted scale+pack kernel launch");
      return;
    }
    // x * fl(1/g): for a power-of-two g the same bits as x / g; always, when asked (torch on CUDA).
    const bool mul = reciprocal || (group & (group - 1)) == 0;
    if (d == Dtype::f32) scale_pack_as<float>(storage, t, total, group, mul, s, out);
    else scale_pack_as<double>(storage, t, total, group, mul, s, out);
  }
  void unpack(Dtype d, const void* storage, void* table, const std::vector<Segment>& segs,
              std::size_t total, Stream s) override {
    over_user_segments(d == Dtype::f32 ? reinterpret_cast<const void*>(&unpack_kernel<float>)
                                       : reinterpret_cast<const void*>(&unpack_kernel<double>),
                       const_cast<void*>(storage), table, segs, total, s, "unpack kernel launch");
  }
  bool any_nonfinite(Dtype d, const void* storage, void* table, const std::vector<Segment>&,
                     std::size_t total, Stream s, int* flag) override {
    const auto* t = static_cast<Table*>(table);
    if (total == 0 || t->n == 0) return false;
    *flag = 0;  // the set's own flag: no other set or thread writes it
    const DevSeg* dev = t->dev;
    int n = t->n;
    std::uint64_t count = total;
    const void* src = storage;
    void* args[] = {&src, &dev, &n, &count, &flag};
    const void* k = d == Dtype::f32 ? reinterpret_cast<const void*>(&nonfinite_kernel<float>)
                                    : reinterpret_cast<const void*>(&nonfinite_kernel<double>);
    launch(k, blocks_for(total), args, s, "non-finite kernel launch");
    cudaEvent_t e = nullptr;
    cu(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    cudaError_t rc = cudaEventRecord(e, s);
    if (rc == cudaSuccess) rc = cudaEventSynchronize(e);
    (void)cudaEventDestroy(e);
    cu(rc, "cudaEventSynchronize(non-finite scan)");
    return *static_cast<volatile int*>(flag) != 0;
  }

 private:
  // Launches `kernel` (storage, segments, count, from, end) over the user arrays' part of a
  // bucket: the elements from the first user segment on (unpack and pack_only).
  void over_user_segments(const void* kernel, void* storage, void* table, const std::vector<Segment>& segs,
                          std::size_t total, Stream s, const char* what) {
    const auto* t = static_cast<Table*>(table);
    std::uint64_t from = unpack_start(segs.data(), static_cast<int>(segs.size()));
    if (total <= from || t->n == 0) return;
    const DevSeg* dev = t->dev;
    int n = t->n;
    std::uint64_t end = total;
    void* args[] = {&storage, &dev, &n, &from, &end};
    launch(kernel, blocks_for(total - from), args, s, what);
  }
  template <class T>
  void scale_pack_as(void* storage, const Table* t, std::size_t total, int group, bool mul, Stream s, void* out) {
    const T* src = static_cast<const T*>(storage);
    T* dst = static_cast<T*>(out);
    const DevSeg* dev = t->dev;
    int n = t->n;
    std::uint64_t count = total;
    T g = static_cast<T>(group), inv = T(1) / g;
    void* args[] = {&src, &dev, &n, &count, &g, &inv, &dst};
    const void* k = mul ? reinterpret_cast<const void*>(&scale_pack_kernel<T, true>)
                        : reinterpret_cast<const void*>(&scale_pack_kernel<T, false>);
    launch(k, blocks_for(total), args, s, "scale+pack kernel launch");
  }
};

}  // namespace

DeviceBackend* cuda_backend() {
  static Cuda c;
  return &c;
}

}  // namespace hma::detail
