// Internal, control plane: which path device buffers take through MPI, and why (see
// hma::DevicePath); decided once per averager and agreed across ranks with the settings.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "hma/options.hpp"

namespace hma::detail {

/// What the choice depends on; detect_device_inputs() reads it from MPI and the environment.
struct DevicePathInputs {
  DevicePath requested = DevicePath::automatic;
  int cuda_aware_override = -1;  // AveragerOptions::cuda_aware / HMA_CUDA_AWARE: -1 unset, 0, 1
  int mpix_query = -1;           // MPIX_Query_cuda_support(): -1 not provided by this MPI, 0, 1
  bool mv2_use_cuda = false;     // MVAPICH2 with MV2_USE_CUDA=1 (it has no MPIX query)
  std::string library;           // MPI_Get_library_version(), first line
  bool thread_progress = false;  // Progress::thread (a worker thread runs the averages)
  /// A calibration's word (HMA_MODEL's device_direct_from_bytes, written by `hma-bench-device
  /// --calibrate`): direct measured faster than staged from this many bytes; 0: no calibration.
  double calibrated_direct_from = 0;
};

/// How start() (non-blocking) moves a device buffer.
enum class DeviceNonblocking {
  iallreduce,     // (a) device pointers to MPI_Iallreduce, advanced by test()/wait()
  thread_direct,  // (b) device pointers to blocking MPI_Allreduce on the progress thread
  staged_poll,    // (c) pinned-host chunks, MPI_Iallreduce each, advanced by test()/wait()
  staged_thread,  // (c) pinned-host chunks, blocking MPI_Allreduce each, on the progress thread
};

struct DevicePlan {
  bool cuda_aware = false;
  /// step()/average() (and start() on the progress thread) hand device pointers to MPI for
  /// averages of at least this many bytes, and stage smaller ones; SIZE_MAX: always staged.
  std::size_t direct_from = SIZE_MAX;
  DeviceNonblocking nonblocking = DeviceNonblocking::staged_poll;
  std::string why;  // one line for the log: the path of each call form and the reason
  bool direct_at(std::size_t bytes) const { return bytes >= direct_from; }
};

/// Pure: the plan for these inputs. Throws hma::InvalidArgument when DevicePath::direct is asked
/// of an MPI that is not (known to be) CUDA-aware.
DevicePlan choose_device_plan(const DevicePathInputs& in);

/// Reads MPIX_Query_cuda_support() (Open MPI's mpi-ext.h) and the MPI library's name. Local.
DevicePathInputs detect_device_inputs();

/// "staged", "direct (MPI_Iallreduce)", ...: short names for describe() and logs.
const char* nonblocking_name(DeviceNonblocking n);

}  // namespace hma::detail
