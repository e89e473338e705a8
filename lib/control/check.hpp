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

/// Weighted averaging: a rank's weight as carried by the check, a multiple of 2^-32 in
/// [0, 2^31) held as an integer (the group's sum is then exact and the same on every rank,
/// whatever order MPI adds in).
using Weight = std::uint64_t;
__extension__ typedef unsigned __int128 WeightSum;
constexpr double kWeightUnit = 4294967296.0;  // 2^32 quanta per unit of weight
constexpr double kWeightLimit = 2147483648.0;  // weights must be below 2^31

/// The outcome of a completed check.
struct Verdict {
  std::vector<int> nonfinite_ranks;  // world ranks that voted non-finite (empty: none)
  Weight weight_min = 0, weight_max = 0;  // over the group
  WeightSum weight_sum = 0;       // exact
};

/// One agreement check. Neither copied nor moved: MPI writes into it while in flight (it lives
/// inside a heap-allocated Pending).
class ControlCheck {
 public:
  ControlCheck() = default;
  ControlCheck(const ControlCheck&) = delete;
  ControlCheck& operator=(const ControlCheck&) = delete;

  /// Non-blocking, collective over `ctrl` (the group's control communicator): issues the check.
  /// `weight`: this rank's weight in the group's sum (weighted averaging; 2^32 = weight 1).
  /// `invalid_here` non-empty: this rank's arguments are bad (the reason, without "hma: "); the
  /// check then fails with it on every rank of the group (resolve()).
  void start(MPI_Comm ctrl, const Header& h, bool nonfinite_here, Weight weight, std::string invalid_here = {});
  [[nodiscard]] bool started() const noexcept { return ctrl_ != MPI_COMM_NULL; }
  /// True once every rank of the group has contributed (drives MPI progress).
  bool test();
  /// Waits until complete (true) or until `deadline` (false). Yields between polls.
  bool wait_until(std::chrono::steady_clock::time_point deadline);
  /// After completion, on every rank of the group alike: throws hma::InvalidArgument when a rank
  /// started it invalid (naming the lowest such world rank and its reason, and the others);
  /// else hma::MismatchError naming the differing fields, their values and the world ranks
  /// holding each; else the non-finite votes.
  /// May issue one MPI_Allgather on the control communicator (every rank of the group does).
  Verdict resolve(const GroupInfo& who);

 private:
  static constexpr std::size_t K = Header::kFields;
  MPI_Comm ctrl_ = MPI_COMM_NULL;
  Header mine_;
  std::uint64_t bad_ = 0;
  std::string invalid_;  // this rank's reason, empty when its arguments are fine
  // [v..., ~v..., ~bad, ~invalid, w, ~w, sum lo, sum hi]: the first 2K + 4 reduced with min
  // (minimum, bitwise-not of maximum, any bad vote, any invalid rank, weight range), the last two
  // as one 128-bit sum of the weights, in one MPI_Iallreduce with hma's own op (check.cpp).
  static constexpr std::size_t kMin = 2 * K + 4, kAll = kMin + 2;
  std::array<std::uint64_t, kAll> in_{}, out_{};
  MPI_Request req_ = MPI_REQUEST_NULL;
  bool complete_ = false;
};

}  // namespace hma::detail
