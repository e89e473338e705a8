// Internal, control plane: the agreement check through memory its group shares (README "Small
// averages ride in the check", sixth round). Where every rank of an averager level's group lies
// in one node (real or emulated) and the ranks share memory, its checks exchange no message:
// each rank writes its state (header, flags, weights, payload) into a buffer of its own in a
// region the group maps, and reads every rank's state in group rank order, so that every rank
// combines the same states in the same order (ControlCheck::combine) and gets the same bits.
//
// A rank's slot has kBuffers buffers; check number n uses buffer n % kBuffers, marked with the
// sequence number n + 1 once written (a release store, read with acquire). A rank writes check n
// only once every rank has released check n - kBuffers (finished reading it, or dropped it):
// its acknowledgement per buffer. Checks in flight on one rank (several sets started before
// any is waited for) progress together: testing any of them drives them all (progress()), so a
// rank waiting for one never holds back a write that another rank waits for.
#pragma once

#include <mpi.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace hma::detail {

class ControlCheck;

class ShmChannel {
 public:
  static constexpr std::size_t kBuffers = 4;
  static constexpr int kMaxGroup = 64;  // larger groups check as messages
  /// Collective over `ctrl` when `want` (the same on every rank of its group): a channel on every
  /// rank of the group, or null on every rank (the ranks do not all share memory, or the region
  /// could not be made or mapped on some rank). Without `want`, null and no collective.
  static std::shared_ptr<ShmChannel> make(MPI_Comm ctrl, bool want);
  ShmChannel(const ShmChannel&) = delete;
  ShmChannel& operator=(const ShmChannel&) = delete;
  ~ShmChannel();

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  /// Every rank has released check number - kBuffers (or there was none): this rank may write
  /// check `number` into its buffer.
  [[nodiscard]] bool writable(std::uint64_t number) noexcept;
  /// Writes this rank's state for check `number` (writable(number) held) and marks it written.
  void publish(std::uint64_t number, const std::uint64_t* state, std::size_t words) noexcept;
  /// Rank `r` has written check `number`: its state(r, number) may be read (until this rank
  /// releases the check).
  [[nodiscard]] bool written(int r, std::uint64_t number) noexcept;
  [[nodiscard]] const std::uint64_t* state(int r, std::uint64_t number) const noexcept;
  /// This rank will read check `number` no more.
  void release(std::uint64_t number) noexcept;

  /// The checks started on this rank and not yet complete, driven together.
  void enlist(ControlCheck* c) noexcept;
  void delist(ControlCheck* c) noexcept;
  void progress();

 private:
  ShmChannel() = default;
  [[nodiscard]] std::uint64_t* slot(int r) const noexcept;
  // A buffer's first line: its sequence number, then the writer's releases when it wrote it
  // (which spare most reads of the release lines, another rank's lines, in writable()).
  [[nodiscard]] std::uint64_t* line(int r, std::uint64_t number) const noexcept;
  // The releases this rank has seen of every rank (per buffer), from those lines or read anew.
  std::array<std::array<std::uint64_t, kBuffers>, kMaxGroup> seen_{};
  unsigned char* base_ = nullptr;
  std::size_t bytes_ = 0;
  int rank_ = 0, size_ = 0;
  ControlCheck* head_ = nullptr;
  ControlCheck* tail_ = nullptr;
  // Idle polls (each with a spin-wait hint) before each further one yields the core: a rank
  // that has a core to itself spins a while, one on an oversubscribed host hardly at all.
  static constexpr int kIdlePolls = 1024, kOversubscribedPolls = 8;
  int spin_polls_ = kIdlePolls;
  int idle_ = 0;  // progress() calls in a row that found nothing new
};

inline std::uint64_t load_acquire(const std::uint64_t& w) noexcept {
  return std::atomic_ref<std::uint64_t>(const_cast<std::uint64_t&>(w)).load(std::memory_order_acquire);
}
inline void store_release(std::uint64_t& w, std::uint64_t v) noexcept {
  std::atomic_ref<std::uint64_t>(w).store(v, std::memory_order_release);
}

}  // namespace hma::detail
