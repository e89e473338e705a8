// Internal: the host emulation backend's stand-in for CUDA IPC. Its "device" memory is shared
// memory (memfd_create + mmap), so other processes of this machine may map it: the handle is
// the owner's pid and descriptor, opened through /proc/<pid>/fd/<fd>. Nothing is named, so a
// process that dies leaves nothing behind.
#pragma once

#include <cstddef>
#include <string>

#include "device/device_backend.hpp"

namespace hma::detail {

/// "emulated:<host>:<device>": one emulated device per machine and index.
std::string emulated_device_id(int device);
/// Shared memory of `bytes` (at least 1), zero-filled.
void* shm_alloc(std::size_t bytes);
/// The handle of memory from shm_alloc() (its base); hma::Error for other memory.
void shm_export(void* p, IpcHandle& h);
/// Maps a peer's buffer.
void* shm_open_peer(const IpcHandle& h, std::size_t bytes);
/// Unmaps memory from shm_alloc() or shm_open_peer(); false when `p` is neither.
bool shm_release(void* p) noexcept;

}  // namespace hma::detail
