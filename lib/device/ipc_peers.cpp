#include "device/ipc_peers.hpp"

#include <chrono>
#include <deque>
#include <mutex>
#include <utility>

namespace hma::detail {

void park_exported(DeviceBackend* be, void* p) noexcept {
  using clock = std::chrono::steady_clock;
  struct Parked {
    DeviceBackend* be;
    void* p;
    clock::time_point at;
  };
  static std::mutex mu;
  static auto* parked = new std::deque<Parked>;  // reachable to the end: not reported as a leak
  try {
    std::lock_guard<std::mutex> lock(mu);
    const auto now = clock::now();
    const auto grace = std::chrono::duration<double>(kIpcGraceSeconds);
    while (!parked->empty() && now - parked->front().at >= grace) {
      parked->front().be->release_shared(parked->front().p);
      parked->pop_front();
    }
    if (be != nullptr && p != nullptr) parked->push_back(Parked{be, p, now});
  } catch (...) {  // out of memory: the buffer stays allocated, which is safe
  }
}

}  // namespace hma::detail
