// The lean path of a blocking host average: step() or average() of a host set (README "Small
// averages ride in the check", fourth and fifth rounds). It sends the same check messages as the
// general path (averager.cpp, request.cpp) without its record keeping (a record registered with
// the averager and the process, the set's pending average, the stall registry, the deadline):
// when the check completes within a few polls and passes plainly (every header equal, no vote,
// equal weights, and for a set that rides in it every payload summed), the group's sums land
// (Use::lean), or the data moves at once by the general path's blocking route (Use::lean_check).
// Otherwise (a rank still on its way, a mismatch, unequal weights, another payload) the check in
// flight is handed to the general path, which completes it exactly as if it had started it:
// its timeout, stall warnings and errors are the general path's. Every rank of the group decides
// alike where it matters (after a complete check, on the same flags), and a rank that hands
// over only waits longer, so ranks on either path pair up.
#include <algorithm>
#include <memory>
#include <optional>

#include "averager/request.hpp"
#include "hma/averager.hpp"
#include "support/log.hpp"
#include "support/timeline.hpp"
#include "transport/host.hpp"
#include "transport/post.hpp"
#include "transport/uses.hpp"

namespace hma {

namespace {
// Polls before a check still open goes to the general wait: a group that is there answers
// within a few (one round per doubling of the group).
constexpr int kLeanPolls = 64;

// A record for the lean path whose check will never allocate.
std::shared_ptr<detail::Pending> lean_record() {
  auto p = std::make_shared<detail::Pending>();
  p->control.reserve();
  return p;
}
}  // namespace

void Averager::init_small_limits() {
  small_.assign(hierarchy_.member() ? hierarchy_.num_levels() : 0, SmallLimits{});
  for (std::size_t level = 0; level < small_.size(); ++level) {
    SmallLimits& s = small_[level];
    s.group = static_cast<int>(hierarchy_.world_ranks(level).size());
    s.control = hierarchy_.control(level).get();
    // Nothing after the sum (outer optimizer, divergence metric).
    const bool plain = !divergence_ && !(outer_ && outer_->opt.level == level);
    // What rides in the check: the flat exact average (the same terms and one order of additions
    // per element; HMA_REDUCTION=mpi keeps the MPI library's own order), checked or voted on,
    // below the size from which two-level pays.
    std::size_t fused = detail::kFusedBytes;
    if ((!settings_.check && settings_.nonfinite == NonFinite::ignore) || settings_.wire[level] != Wire::exact ||
        settings_.reduction != Reduction::automatic || !plain)
      fused = 0;
    if (hierarchy_.two_level(level) != nullptr) {
      if (settings_.algorithm == Algorithm::two_level) fused = 0;
      if (settings_.algorithm == Algorithm::automatic && !hierarchy_.emulated_nodes()) {
        const std::size_t from = two_level_from(level);  // use_two_level() from this size on
        fused = std::min(fused, from == 0 ? 0 : from - 1);
      }
    }
    s.fused = fused;
    // The lean path: checked, no vote (its scan would cost more than the path saves), nothing
    // after the sum, a group of several ranks, nothing recorded per average (timeline, debug
    // log), and no progress thread (whose queue the data would have to wait for).
    s.lean = settings_.check && settings_.nonfinite == NonFinite::ignore && plain && s.group > 1 &&
             !worker_ && detail::Timeline::get() == nullptr && !detail::log_enabled(detail::LogLevel::debug);
  }
}

std::optional<bool> Averager::lean(ParamSet& params, std::size_t level, bool scheduled) {
  const SmallLimits& small = small_[level];
  const std::size_t bytes = params.bytes();
  if (!small.lean || bytes == 0 || params.in_flight()) return std::nullopt;
  // Its terms ride in the check (the sums land from it), or the check goes alone and the data
  // moves after it as on the general path.
  const bool fused = bytes <= small.fused && params.count16() == 0;
  // A record the general path finished after a handover (only it sets done) is made fresh again
  // (Pending::recycle); one another holder still has (a timeout left it on its set) or whose
  // check is still open (an MPI error left it so) stays theirs: this path takes a new one.
  if (lean_ && lean_->done) {
    drop_finished();  // settle_issue() must not find it listed once fresh
    if (!detail::recycle(lean_)) lean_.reset();
  }
  if (!lean_ || lean_.use_count() != 1 || !lean_->control.idle()) lean_ = lean_record();
  detail::ControlCheck& check = lean_->control;
  check.reset();
  const detail::HostBuckets terms{&params.bucket<float>(), &params.bucket<double>(), nullptr, nullptr};
  if (fused) detail::stage_fused_terms(terms, small.group, check);
  check.start(small.control, host_header(params, level, scheduled), false, weight_);
  bool complete = check.test();
  for (int i = 1; i < kLeanPolls && !complete; ++i) complete = check.test();
  if (complete && fused && check.passed_plain()) {
    detail::land_fused(terms, check);
    detail::count_use(detail::Use::lean);
    return true;
  }
  if (complete && !fused && check.agreed_plain()) {
    // The group agreed, with equal weights: the data moves as the general path's blocking
    // launch moves it (no worker queue to wait for: s.lean).
    detail::count_use(detail::Use::lean_check);
    const detail::HostBuckets all{terms.f, terms.d, &params.bucket<bf16>(), &params.bucket<fp16>()};
    detail::average_host(all, host_route(params, level, nullptr), *scratch_);
    return true;
  }
  // The general path takes the record as it is, its check in flight or complete (lean_ keeps
  // it, for the next lean average once it is done).
  if (fused) lean_->land_fused = detail::fused_lander(terms);
  return issue(prepare_host(params, level, true, scheduled, lean_), level, true, nullptr);
}

}  // namespace hma
