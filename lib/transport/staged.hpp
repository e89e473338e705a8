// Internal: path (c) for device buffers on an MPI that is not CUDA-aware (and for every average
// with the outer optimizer or the divergence metric): the packed device buffer (already scaled,
// or scaled on the host by the `sent` hook) goes through pinned host memory in chunks, pipelined so that copying chunk k+1
// to the host, reducing chunk k on the host and copying chunk k-1 back overlap (the pattern of
// Aluminum's host-transfer backend). Chunk k uses slot k mod S; a slot is a pinned send and
// receive area of `slot_bytes`. Reductions are issued in chunk order on every rank.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <vector>

#include "device/device_backend.hpp"
#include "device/staging_area.hpp"
#include "support/timeline.hpp"

namespace hma::detail {

/// One device buffer to average in place: n elements of dtype d (already divided by the group,
/// unless a ChunkHook scales them on the host).
struct StagedJob {
  void* dev = nullptr;
  std::size_t n = 0;
  Dtype dtype = Dtype::f32;
};

/// The chunks of `jobs` for a chunk size of `chunk_bytes` (at least one element, at most 2^30
/// elements per chunk): job index, first element, count. Pure arithmetic, tested on its own.
struct Chunk {
  std::size_t job = 0, lo = 0, n = 0;
};
std::vector<Chunk> staged_chunks(const std::vector<StagedJob>& jobs, std::size_t chunk_bytes);
/// Bytes of the largest chunk staged_chunks() makes for these jobs (a slot's size).
std::size_t staged_slot_bytes(const std::vector<StagedJob>& jobs, std::size_t chunk_bytes);

/// Host work on a chunk in its pinned slot: `host` holds elements [lo, lo + n) of `dtype`'s job.
using ChunkHook = std::function<void(Dtype dtype, std::size_t lo, std::size_t n, void* host)>;

class StagedPipeline {
 public:
  /// `blocking_mpi`: reduce each chunk with a blocking MPI_Allreduce (the copies of the other
  /// chunks still run meanwhile); else with MPI_Iallreduce advanced by drive(). Device->host
  /// copies run on `to_host`, host->device copies on `to_device`.
  StagedPipeline(DeviceBackend& be, StagingArea& area, std::vector<StagedJob> jobs,
                 std::size_t chunk_bytes, MPI_Comm comm, Stream to_host, Stream to_device,
                 bool blocking_mpi);
  StagedPipeline(const StagedPipeline&) = delete;
  StagedPipeline& operator=(const StagedPipeline&) = delete;
  /// Advances; with `block` returns only when every chunk is back in device memory. True when
  /// complete (the host->device copies have completed).
  bool drive(bool block);
  /// Blocks until every chunk's reduction has been issued (not completed): what MPI's ordering
  /// of collectives needs before another collective may be issued on the communicator. False
  /// when `deadline` passed first (max(): no limit).
  bool issue_all(std::chrono::steady_clock::time_point deadline);
  [[nodiscard]] bool issued_all() const noexcept { return c_mpi_ == chunks_.size(); }
  [[nodiscard]] std::size_t chunks() const noexcept { return chunks_.size(); }
  /// The most chunks that were between their device->host copy and their slot's release at once.
  [[nodiscard]] std::size_t max_in_flight() const noexcept { return max_in_flight_; }
  /// Host passes over each chunk (the outer optimizer, the divergence metric): `sent` on this
  /// rank's values once they reached the host, before their reduction is issued (it may rewrite
  /// them: the scaling); `reduced` on the reduced values before they are copied back.
  void on_host(ChunkHook sent, ChunkHook reduced) {
    sent_ = std::move(sent);
    reduced_ = std::move(reduced);
  }

 private:
  bool step(bool one_mpi);
  void wait_oldest();
  DeviceBackend& be_;
  StagingArea& area_;
  std::vector<StagedJob> jobs_;
  std::vector<Chunk> chunks_;
  MPI_Comm comm_;
  Stream to_host_, to_device_;
  bool blocking_mpi_;
  std::vector<MPI_Request> req_;  // per slot
  ChunkHook sent_, reduced_;
  // Chunks [0, c_in_) were copied to the host, [0, c_mpi_) issued, [0, c_red_) reduced (and
  // their copy back queued), [0, c_free_) back in device memory with their slot free.
  std::size_t c_in_ = 0, c_mpi_ = 0, c_red_ = 0, c_free_ = 0;
  std::size_t max_in_flight_ = 0;
  // HMA_TIMELINE (null: off): per slot, when its chunk's copy to the host, reduction and copy
  // back were issued; each stage becomes an event on track 2 once the host sees it complete.
  Timeline* tl_ = nullptr;
  std::vector<double> t_in_, t_mpi_, t_out_;
  void mark(const char* stage, double t0, const Chunk& c) const noexcept;
};

}  // namespace hma::detail
