// Internal, for tests: drive the host emulation backend's streams (see device_backend.hpp).
#pragma once

#include <functional>

#include "hma/device.hpp"

namespace hma::detail {

/// Queues `fn` on emulated stream `s` (nullptr: the default stream): it runs late, like a kernel.
void emulation_enqueue(Stream s, std::function<void()> fn);
/// Runs everything queued on emulated stream `s` (like cudaStreamSynchronize).
void emulation_run_all(Stream s);

}  // namespace hma::detail
