// Internal: keeps an object alive for the rest of the process, reachable from a static so that
// leak checkers do not report it. For memory that MPI, or a worker thread leaked on purpose, may
// still write after its owner is gone (an average still in flight after a Timeout).
#pragma once

#include <memory>
#include <mutex>
#include <vector>

namespace hma::detail {

template <class T>
void keep_alive_forever(std::unique_ptr<T> p) noexcept {
  if (!p) return;
  static auto* kept = new std::vector<std::shared_ptr<void>>;
  static std::mutex mu;
  try {
    std::shared_ptr<void> s(std::move(p));
    std::lock_guard<std::mutex> lock(mu);
    kept->push_back(std::move(s));
  } catch (...) {
    (void)p.release();  // out of memory: leak it plainly
  }
}

}  // namespace hma::detail
