// Internal: a Chrome-trace timeline of hma's averaging events, enabled by HMA_TIMELINE=path.
// Each rank writes its own file at exit: path with ".rank<N>" before the extension (or "%r" in
// the path replaced by the rank). tools/timeline-merge joins them into one trace for Perfetto
// or chrome://tracing.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hma::detail {

class Timeline {
 public:
  /// The process's timeline, or nullptr when HMA_TIMELINE is unset (the common, free case).
  static Timeline* get() noexcept;
  /// Microseconds on a clock shared by all processes of one machine (CLOCK_MONOTONIC).
  static double now_us() noexcept;
  /// Records a complete event [t0, t1] on track `tid` (0: the caller's calls, 1: averages in
  /// flight).
  void event(const char* name, double t0, double t1, int level, std::int64_t step,
             std::size_t bytes, int group, int tid = 0) noexcept;
};

/// Records [t0, now] on scope exit when the timeline is on.
class TimelineScope {
 public:
  TimelineScope(const char* name, int level, std::int64_t step, std::size_t bytes, int group) noexcept
      : tl_(Timeline::get()), name_(name), level_(level), step_(step), bytes_(bytes), group_(group) {
    if (tl_ != nullptr) t0_ = Timeline::now_us();
  }
  ~TimelineScope() {
    if (tl_ != nullptr) tl_->event(name_, t0_, Timeline::now_us(), level_, step_, bytes_, group_);
  }
  TimelineScope(const TimelineScope&) = delete;
  TimelineScope& operator=(const TimelineScope&) = delete;

 private:
  Timeline* tl_;
  const char* name_;
  int level_;
  std::int64_t step_;
  std::size_t bytes_;
  int group_;
  double t0_ = 0;
};

}  // namespace hma::detail
