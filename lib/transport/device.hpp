// Internal, data plane: how the bytes of a DeviceParamSet move once its pack kernel is queued
// (event `packed`): device pointers straight to a CUDA-aware MPI (direct), or pinned host chunks
// (transport/staged.hpp). Both end with the unpack kernels and the `done` event on hma's stream,
// which the caller's stream then waits for. See hma::DevicePath for which path runs when.
#pragma once

#include <mpi.h>

#include <cstddef>

#include "control/device_path.hpp"
#include "device/device_state.hpp"
#include "transport/pending.hpp"

namespace hma::detail {

class Post;
class Worker;

struct DeviceRoute {
  MPI_Comm comm = MPI_COMM_NULL;
  const DevicePlan* plan = nullptr;
  std::size_t staging_chunk_bytes = 0;
  std::size_t staging_slots = 1;
  Stream user = nullptr;  // ordered after the result
  // Non-null: the outer optimizer or the divergence metric runs on the host, so the average
  // takes the staged path whatever the plan says. The pack kernel then only packs (it did not
  // scale): the host scales each chunk in its slot, by `group` (or `weight_factor` >= 0; x * 1/g
  // with `reciprocal`), after the post has kept the inputs.
  Post* post = nullptr;
  int group = 1;
  bool reciprocal = false;
  double weight_factor = -1;
};

/// Blocking: through MPI, unpacked, `done` recorded and waited for by route.user.
void average_device(DeviceState& s, const DeviceRoute& route);

/// Non-blocking: sets up `p` (a device state machine advanced by test()/wait(), or a job on
/// `worker`) per route.plan->nonblocking, and starts moving at once where it can.
void start_device(DeviceState& s, const DeviceRoute& route, Pending& p, Worker* worker);

}  // namespace hma::detail
