// Internal, for tests: drive the host emulation backend's streams (see device_backend.hpp).
#pragma once

#include <functional>

#include "hma/device.hpp"

namespace hma::detail {

/// Queues `fn` on emulated stream `s` (nullptr: the default stream): it runs late, like a kernel.
void emulation_enqueue(Stream s, std::function<void()> fn);
/// Runs everything queued on emulated stream `s` (like cudaStreamSynchronize).
void emulation_run_all(Stream s);
/// Fault injection: the next `n` event queries throw hma::Error (an error in the middle of a
/// device average, with MPI work possibly in flight).
void emulation_fail_queries(int n);

}  // namespace hma::detail
