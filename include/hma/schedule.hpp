// hma/schedule.hpp: which level averages at which step. Pure: no MPI, no state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hma {

/// The largest step counter hma holds (2^62): set_step() and restore() refuse larger steps, and
/// step()/start() refuse to count past it, so the counter can never overflow.
inline constexpr std::int64_t kMaxStep = std::int64_t{1} << 62;

/// One level of a hierarchy: every `period` steps, average within contiguous blocks of
/// `group_size` ranks, [k*g, (k+1)*g).
struct Level {
  std::int64_t period = 0;
  int group_size = 0;
  friend bool operator==(const Level&, const Level&) = default;
};

/// PyTorch's model-averaging schedules, reproduced exactly.
///
/// - periodic (PeriodicModelAverager): averages over the whole group at step s when
///   s >= warmup and (s - warmup) % period == 0.
/// - hierarchical (HierarchicalModelAverager): at s >= warmup, averages over the level with the
///   LARGEST period p such that s % p == 0 (absolute step, not s - warmup); none if no period
///   divides s.
///
/// Validation follows torch's checks and adds what torch misses: periods must be positive and
/// strictly increasing (torch silently never uses a level listed after a larger period), each
/// group size must divide the world size, the last one must equal it. A largest period of 1 is
/// legal but gives a warning (see `warnings()`), as in torch. All errors throw
/// hma::InvalidArgument naming the level, the value and the rule.
class Schedule {
 public:
  enum class Kind { periodic, hierarchical };

  /// PeriodicModelAverager(period, warmup) over a group of `group_size` ranks.
  static Schedule periodic(std::int64_t period, std::int64_t warmup, int group_size);
  /// HierarchicalModelAverager({period: group_size, ...}, warmup) over `world_size` ranks.
  static Schedule hierarchical(std::vector<Level> levels, std::int64_t warmup, int world_size);
  /// Parses a schedule string:
  ///   "P"                      periodic every P steps over the world (PeriodicModelAverager);
  ///   "P1:G1,P2:G2,...,Pn:Gn"  hierarchical levels, periods ascending, Gn = world size.
  /// A group size may be written `node` (the ranks per node, `node_size`, must then be > 0) or
  /// `world`. Spaces around tokens are ignored. Errors quote the offending token.
  ///   "post:S,<schedule>"     post-local SGD: the world averages at every step before step S,
  ///                            then <schedule> (either form above) takes over; see post_local().
  static Schedule parse(std::string_view spec, std::int64_t warmup, int world_size,
                        int node_size = 0);
  /// Post-local SGD (torch's post_localSGD_hook + averager): `local` with a first phase in which
  /// the world (the last level) averages at EVERY step s < `switch_step`; from `switch_step` on,
  /// `local`'s own rule. torch allreduces gradients in that phase, hma averages the parameters
  /// after each step (the same model for plain SGD from one start, up to rounding). torch's
  /// default (post_local_gradient_allreduce=True) also allreduces gradients within the node at
  /// every step after the switch: write that as a node level of period 1, "post:S,1:node,P:world". Pass a warmup
  /// of `switch_step` to `local` as torch does (a smaller one changes nothing before the switch;
  /// a larger one leaves steps without averaging after it, with a warning). switch_step 0: no
  /// first phase. The switch is part of to_string(), fingerprint() and so of checkpoints.
  /// Throws hma::InvalidArgument for a negative switch_step.
  static Schedule post_local(Schedule local, std::int64_t switch_step);

  /// The level that averages at `step`, or nullopt when no averaging happens. Never throws.
  [[nodiscard]] std::optional<std::size_t> level_at(std::int64_t step) const noexcept;

  [[nodiscard]] Kind kind() const noexcept { return kind_; }
  [[nodiscard]] const std::vector<Level>& levels() const noexcept { return levels_; }
  [[nodiscard]] std::int64_t warmup() const noexcept { return warmup_; }
  [[nodiscard]] int world_size() const noexcept { return world_size_; }
  /// The post-local switch step (0: none): before it the world averages at every step.
  [[nodiscard]] std::int64_t post_local_switch() const noexcept { return switch_; }
  /// Non-fatal remarks made at validation (e.g. "largest period is 1"), torch's warnings.
  [[nodiscard]] const std::vector<std::string>& warnings() const noexcept { return warnings_; }
  /// A 64-bit hash of kind, warmup, world size and levels: equal schedules, equal fingerprints.
  [[nodiscard]] std::uint64_t fingerprint() const noexcept;
  /// Canonical text, e.g. "hierarchical 2:4,8:8 warmup 0 world 8" (post-local: "... post 100"
  /// at the end); parse() of the levels part (prefixed with "post:100," for a post-local one)
  /// gives the schedule back.
  [[nodiscard]] std::string to_string() const;

  friend bool operator==(const Schedule&, const Schedule&) = default;

 private:
  Schedule() = default;
  Kind kind_ = Kind::periodic;
  std::vector<Level> levels_;
  std::int64_t warmup_ = 0;
  int world_size_ = 0;
  std::int64_t switch_ = 0;  // post-local: the world averages at every step before it
  std::vector<std::string> warnings_;
};

}  // namespace hma
