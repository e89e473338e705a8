// Internal: what hma needs from a device runtime, behind one interface, so that the device
// paths (packing, scaling, events, the staged pipeline, the direct paths) are one code base
// with two implementations:
//  - the CUDA backend (lib/device_cuda.cu, built with nvcc when the CUDA Toolkit is found);
//  - the host emulation backend (lib/device_backend.cpp): "device" memory is host memory and
//    each stream is a queue that runs its work LATE (one operation per event query, everything
//    up to an event on synchronize), so code that reads a buffer before its copy's event
//    completed reads stale data and fails the tests. It lets every device path run, and be
//    checked value by value, on machines without a GPU. Tests select it; users never do.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "hma/buffer.hpp"
#include "hma/device.hpp"

namespace hma::detail {

using Event = void*;

/// What another process needs to map an exportable device buffer (alloc_shared()): a CUDA IPC
/// memory handle (64 bytes), or the emulation's shared-memory name. Plain bytes, sent by MPI.
struct IpcHandle {
  unsigned char bytes[96] = {};
};

/// The most ranks whose buffers one sum_peers() launch reads.
constexpr int kMaxIpcPeers = 16;

/// One part of a bucket's logical range [at, at + n): `user` is a registered device array that
/// is packed to / unpacked from storage[at, at + n), or nullptr for hma's own (owned) region.
struct Segment {
  void* user = nullptr;
  std::size_t at = 0;
  std::size_t n = 0;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  [[nodiscard]] virtual std::string name() const = 0;
  /// Devices visible; 0 and `reason` set when none can be used.
  virtual int devices(std::string& reason) = 0;
  /// Makes `device` current in the calling thread.
  virtual void set_device(int device) = 0;
  virtual int current_device() = 0;
  virtual void* alloc(std::size_t bytes) = 0;  // device memory
  virtual void release(void* p) noexcept = 0;
  virtual void* alloc_pinned(std::size_t bytes) = 0;  // page-locked host memory
  virtual void release_pinned(void* p) noexcept = 0;
  /// False when `p` is known to be host memory (used to refuse host pointers in add()).
  virtual bool maybe_device_pointer(const void* p) = 0;
  /// The device whose memory `p` is, or -1 when it cannot tell (or it is not device memory).
  virtual int pointer_device(const void* p) = 0;
  /// True when kernels running on `device` may access memory of `peer` (peer access enabled).
  virtual bool can_access_peer(int device, int peer) = 0;
  virtual Stream create_stream() = 0;
  virtual void destroy_stream(Stream s) noexcept = 0;
  virtual Event create_event() = 0;
  virtual void destroy_event(Event e) noexcept = 0;
  virtual void record(Event e, Stream s) = 0;
  /// True when the work before the event's record has completed. Never blocks.
  virtual bool query(Event e) = 0;
  /// Blocks the calling host thread until the event completes (never the whole device).
  virtual void synchronize(Event e) = 0;
  /// Work queued on `s` after this waits for the event.
  virtual void stream_wait(Stream s, Event e) = 0;
  /// Asynchronous copy on `s`, any direction (device, pinned host).
  virtual void copy(void* dst, const void* src, std::size_t bytes, Stream s) = 0;
  /// storage[0, n) = value, on `s`.
  virtual void fill(Dtype d, void* storage, std::size_t n, double value, Stream s) = 0;
  /// The segment table of a bucket, uploaded once per layout (device memory for CUDA), ON `s`:
  /// ordered before the kernels later queued on `s` that read it (for CUDA: from pinned staging
  /// with cudaMemcpyAsync; the emulation fills the table only when `s` runs that far, so a
  /// kernel on another stream reads an empty table). Release only once `s` has passed it.
  virtual void* upload_segments(const std::vector<Segment>& segs, Stream s) = 0;
  virtual void release_segments(void* table) noexcept = 0;
  /// ONE launch on `s`: for every segment, out[at + i] = src[i] / group (src = the user array,
  /// or storage itself for the owned region; `out` is storage, or another buffer of `total`
  /// elements: the node transport packs straight into its exported buffer). `reciprocal` false: x / g (torch on the CPU; for a
  /// power-of-two g computed as x * (1 / g), the same bits); true: x * fl(1 / g) for every g
  /// (torch on CUDA: ATen multiplies by the reciprocal computed on the host). `weight` >= 0
  /// (weighted averaging): x * weight instead, multiplied in double and rounded once, as the host
  /// path does.
  virtual void scale_pack(Dtype d, void* storage, void* table, const std::vector<Segment>& segs,
                          std::size_t total, int group, bool reciprocal, double weight, Stream s,
                          void* out) = 0;
  /// ONE launch on `s`: for every user segment, user[i] = storage[at + i].
  virtual void unpack(Dtype d, const void* storage, void* table, const std::vector<Segment>& segs,
                      std::size_t total, Stream s) = 0;
  /// Non-finite scan of the segments' source values (user arrays, owned region), on `s`, into
  /// `flag` (the set's own, from alloc_flag()); the host waits for the answer (an event wait).
  virtual bool any_nonfinite(Dtype d, const void* storage, void* table,
                             const std::vector<Segment>& segs, std::size_t total, Stream s,
                             int* flag) = 0;
  // --- The node transport (lib/transport/ipc.cpp): buffers shared between processes. ---
  /// Empty when buffers of `device` can be shared with other processes, else why not.
  virtual std::string ipc_unsupported(int device) = 0;
  /// Who `device` is, the same string in every process that sees it (CUDA: its PCI bus id).
  virtual std::string device_id(int device) = 0;
  /// True when kernels on `device` of this process can read memory of the device named `id`
  /// (the same device, or peer access, enabled here).
  virtual bool can_reach(int device, const std::string& id) = 0;
  /// Device memory of the current device that other processes may map, and its handle.
  virtual void* alloc_shared(std::size_t bytes, IpcHandle& h) = 0;
  virtual void release_shared(void* p) noexcept = 0;
  /// The handle of memory from alloc() (its base address), for other processes to map.
  virtual void export_buffer(void* p, IpcHandle& h) = 0;
  /// Maps a peer's buffer (never this process's own: CUDA refuses that).
  virtual void* open_shared(const IpcHandle& h, std::size_t bytes) = 0;
  virtual void close_shared(void* p) noexcept = 0;
  /// ONE launch on `s`: dst[i] = ((src[0][i] + src[1][i]) + ...) + src[k-1][i] for i < n, in the
  /// dtype's arithmetic, always in this order (so every rank computes the same bits).
  virtual void sum_peers(Dtype d, void* dst, const void* const* src, int k, std::size_t n, Stream s) = 0;
  /// ONE launch on `s`: dst[i] = t_0(src[0][i]) + ... + t_{k-1}(src[k-1][i]) for i < n, in this
  /// order, with the pack kernel's terms: t_r(x) = x * factor[r] in double, rounded once, where
  /// factor[r] >= 0 (weights), else x * fl(1/group) with `mul`, else x / group.
  virtual void sum_terms(Dtype d, void* dst, const void* const* src, const double* factor, int k,
                         std::size_t n, int group, bool mul, Stream s) = 0;
  /// ONE launch on `s`: the user arrays' values into storage, unscaled; the owned region (the
  /// front of storage) is not touched.
  virtual void pack_only(Dtype d, void* storage, void* table, const std::vector<Segment>& segs,
                         std::size_t total, Stream s) = 0;

  /// A host flag kernels of any device can set (mapped pinned memory for CUDA); one per set.
  virtual int* alloc_flag() = 0;
  virtual void release_flag(int* flag) noexcept = 0;
};

/// Makes `device` current for the calling thread for its lifetime and restores the device that
/// was current before (hma never leaves the caller on another device).
class DeviceGuard {
 public:
  DeviceGuard(DeviceBackend* be, int device) : be_(be), prev_(be->current_device()) {
    if (prev_ != device) be_->set_device(device);
    else be_ = nullptr;  // nothing to restore
  }
  ~DeviceGuard() {
    if (be_ == nullptr) return;
    try {
      be_->set_device(prev_);
    } catch (...) {  // a destructor must not throw; the device stays as it is
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  DeviceBackend* be_;
  int prev_;
};

/// The CUDA backend, or nullptr when hma was built without CUDA.
DeviceBackend* cuda_backend();
/// The host emulation backend (tests).
DeviceBackend* host_emulation_backend();
/// The backend new DeviceParamSets use: the CUDA one unless a test chose another.
DeviceBackend* device_backend();
/// Tests: make new DeviceParamSets use `b` (nullptr: back to the default). Not thread safe.
void set_device_backend_for_testing(DeviceBackend* b);

}  // namespace hma::detail
