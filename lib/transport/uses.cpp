// The data plane's process-wide state: the MPI count limit every transport splits by
// (elements.hpp) and the counters of which transport ran (uses.hpp).
#include "transport/uses.hpp"

#include <algorithm>
#include <atomic>

#include "transport/elements.hpp"

namespace hma::detail {

namespace {
std::atomic<std::size_t> g_max_count{kMaxCount};
std::atomic<std::uint64_t> g_uses[static_cast<int>(Use::count_)];
std::atomic<std::size_t> g_split_min{0};
std::atomic<std::size_t> g_own_message{0};
}  // namespace

void count_use(Use u) noexcept { g_uses[static_cast<int>(u)].fetch_add(1, std::memory_order_relaxed); }
std::uint64_t uses(Use u) noexcept { return g_uses[static_cast<int>(u)].load(std::memory_order_relaxed); }

std::size_t split_min_block_override() noexcept { return g_split_min.load(std::memory_order_relaxed); }
void set_split_min_block_for_testing(std::size_t bytes) noexcept {
  g_split_min.store(bytes, std::memory_order_relaxed);
}

std::size_t own_message_bytes() noexcept {
  const std::size_t b = g_own_message.load(std::memory_order_relaxed);
  return b == 0 ? kOwnMessageBytes : b;
}
void set_own_message_bytes_for_testing(std::size_t bytes) noexcept {
  g_own_message.store(bytes, std::memory_order_relaxed);
}

std::size_t max_count() { return g_max_count.load(std::memory_order_relaxed); }
void set_max_count_for_testing(std::size_t n) {
  g_max_count.store(n == 0 ? kMaxCount : std::min(n, kMaxCount), std::memory_order_relaxed);
}

}  // namespace hma::detail
