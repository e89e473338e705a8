// Internal: the pinned host slots of the staged path (lib/transport/staged.hpp), kept by a
// DeviceParamSet between averages. Device layer: the set owns it; the transport uses it.
#pragma once

#include <cstddef>
#include <vector>

#include "device/device_backend.hpp"

namespace hma::detail {

/// Pinned host slots and their events, kept by a DeviceParamSet between averages.
struct StagingArea {
  DeviceBackend* be = nullptr;
  void* host = nullptr;  // slots * 2 * slot_bytes
  std::size_t slots = 0, slot_bytes = 0;
  std::vector<Event> in, out;  // per slot: device->host copy done, host->device copy done
  StagingArea() = default;
  StagingArea(const StagingArea&) = delete;
  StagingArea& operator=(const StagingArea&) = delete;
  ~StagingArea();
  /// Makes room for `slots` slots of `slot_bytes` (reallocates only to grow).
  void ensure(DeviceBackend* backend, std::size_t slots, std::size_t slot_bytes);
  [[nodiscard]] char* send(std::size_t slot) const;
  [[nodiscard]] char* recv(std::size_t slot) const;
};

}  // namespace hma::detail
