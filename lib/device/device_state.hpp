// Internal: the state behind a DeviceParamSet (heap-stable, so in-flight work may point at it).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "device/device_backend.hpp"
#include "device/ipc_peers.hpp"
#include "in_flight.hpp"
#include "device/staging_area.hpp"

namespace hma::detail {

/// One contiguous device buffer of one dtype: [hma-owned arrays | staging for user arrays].
struct DeviceBucket {
  Dtype dtype = Dtype::f32;
  void* storage = nullptr;
  std::size_t capacity = 0;       // elements allocated
  std::size_t owned = 0;          // elements of hma-owned (zero-copy) arrays, at the front
  std::vector<Segment> user;      // user device arrays (their `at` is set by tables())
  IntervalSet user_ranges;        // their bytes: the overlap check at add() in O(log n)
  std::size_t user_elems = 0;
  std::vector<Segment> segs;      // the owned region, then the user arrays: what the kernels walk
  void* table = nullptr;          // segs uploaded for the kernels
  bool dirty = true;
  bool exported = false;          // the node transport's peers mapped storage: never freed
  [[nodiscard]] std::size_t size() const noexcept { return owned + user_elems; }
  [[nodiscard]] std::size_t elem() const noexcept { return dtype_size(dtype); }
};

struct DeviceState {
  DeviceBackend* be = nullptr;
  int device = 0;
  Stream stream = nullptr;       // hma's stream: pack, device->host copies, unpack
  Stream stream_back = nullptr;  // host->device copies of the staged path
  Event ready = nullptr;         // recorded on the caller's stream at the start of an average
  Event packed = nullptr;        // scale+pack done: MPI may read the buffer
  Event done = nullptr;          // unpack done: the average is in the arrays (a wait on it
                                 // before its first record returns at once, in CUDA as in emulation)
  int* flag = nullptr;           // the non-finite scan's answer: one per set (mapped host memory)
  DeviceBucket f32, f64;
  StagingArea staging;
  std::vector<LayoutEntry> layout;
  std::uint64_t version = 0, id = 0;
  std::shared_ptr<InFlight> pending;  // the last average issued on it
  std::vector<std::shared_ptr<IpcPeers>> ipc;  // the node transport's buffers, per averager level

  DeviceBucket& bucket(Dtype d) noexcept { return d == Dtype::f32 ? f32 : f64; }
  /// Rebuilds and uploads the segment tables of changed buckets (waits for the last average's
  /// kernels first: they may still read the old table).
  void tables();
  /// Queues the unpack kernels and records `done` on hma's stream.
  void unpack_and_record();
  /// Blocks the host until everything queued on hma's stream so far has run (set-up work).
  void sync_stream() {
    be->record(done, stream);
    be->synchronize(done);
  }
};

}  // namespace hma::detail
