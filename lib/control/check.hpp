// Internal, control plane: before an average moves any data, every rank of its group agrees that
// they are all in the SAME average (step, kind of call, level, kind of set, buffer layout) and
// votes on non-finite values. One tiny non-blocking MPI_Iallreduce on the level's CONTROL
// communicator (never a data communicator, so it can never pair with a data collective), waited
// for with a deadline. Only when headers differ (or a rank votes non-finite) does a second small
// collective (MPI_Allgather, same communicator) learn who holds what, to name them.
#pragma once

#include <mpi.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace hma::detail {

/// What every rank of the group must hold identically for an average.
struct Header {
  enum Field : std::size_t {
    step, call, level, set,  // call: 0 step()/start(), 1 average()/start_average(); set: 0 host
    fingerprint, arrays, f32_owned, f32_packed, f64_owned, f64_packed,  // the layout
    kFields
  };
  std::array<std::uint64_t, kFields> v{};
};

/// Who the group is, captured once when the average starts so that messages never have to ask
/// a communicator that may be gone.
struct GroupInfo {
  std::size_t level = 0;
  std::int64_t step = 0;
  std::size_t bytes = 0;
  std::vector<int> world_ranks;  // of the group, in group rank order
  /// "level 1 (group of 4 ranks, world ranks 0-3)"
  [[nodiscard]] std::string describe() const;
};

/// "0-3,6" from {0,1,2,3,6}.
std::string rank_ranges(const std::vector<int>& ranks);

/// A point in time on the steady clock `seconds` from now; max() for no limit (0 or infinity),
/// saturating (never overflows) for huge values.
std::chrono::steady_clock::time_point deadline_after(double seconds);

/// The outcome of a completed check.
struct Verdict {
  std::vector<int> nonfinite_ranks;  // world ranks that voted non-finite (empty: none)
};

/// One agreement check. Neither copied nor moved: MPI writes into it while in flight (it lives
/// inside a heap-allocated Pending).
class ControlCheck {
 public:
  ControlCheck() = default;
  ControlCheck(const ControlCheck&) = delete;
  ControlCheck& operator=(const ControlCheck&) = delete;

  /// Non-blocking, collective over `ctrl` (the group's control communicator): issues the check.
  void start(MPI_Comm ctrl, const Header& h, bool nonfinite_here);
  [[nodiscard]] bool started() const noexcept { return ctrl_ != MPI_COMM_NULL; }
  /// True once every rank of the group has contributed (drives MPI progress).
  bool test();
  /// Waits until complete (true) or until `deadline` (false). Yields between polls.
  bool wait_until(std::chrono::steady_clock::time_point deadline);
  /// After completion, on every rank of the group alike: throws hma::MismatchError naming the
  /// differing fields, their values and the world ranks holding each; else the non-finite votes.
  /// May issue one MPI_Allgather on the control communicator (every rank of the group does).
  Verdict resolve(const GroupInfo& who);

 private:
  static constexpr std::size_t K = Header::kFields;
  MPI_Comm ctrl_ = MPI_COMM_NULL;
  Header mine_;
  std::uint64_t bad_ = 0;
  // [v..., ~v..., ~bad] reduced with MPI_MIN: minimum, bitwise-not of maximum, any bad vote.
  std::array<std::uint64_t, 2 * K + 1> in_{}, out_{};
  MPI_Request req_ = MPI_REQUEST_NULL;
  bool complete_ = false;
};

}  // namespace hma::detail
