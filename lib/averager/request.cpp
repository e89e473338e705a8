// A started average from its agreement check to its last byte (see request.hpp); what lives
// beyond one wait (other averages in flight, dying sets, Request) is in averager/live.cpp.
#include <algorithm>
#include <cstdio>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "hma/averager.hpp"
#include "hma/error.hpp"
#include "control/stall.hpp"
#include "averager/request.hpp"
#include "support/mpi_static.hpp"
#include "support/log.hpp"
#include "support/timeline.hpp"
#include "transport/elements.hpp"

namespace hma::detail {

namespace {

Position position_of(const Pending& p) {
  return Position{p.averager, p.who.step, static_cast<std::int64_t>(p.who.level), p.call, p.launched ? 1 : 0};
}

// Composed from what the average captured when it started, and where the group's ranks say
// they are.
[[noreturn]] void throw_timeout(Pending& p) {
  p.timed_out = true;
  char secs[32];
  std::snprintf(secs, sizeof secs, "%g", p.timeout_s);
  const std::string what =
      p.launched ? "did not complete within " + std::string(secs) +
                       " s (HMA_TIMEOUT_S): a rank of the group is slow, stuck or dead"
                 : "was not reached by every rank of the group within " + std::string(secs) +
                       " s (HMA_TIMEOUT_S): a rank is slow, stuck or dead, or called step()/"
                       "average() a different number of times (its data has not moved)";
  // Where every rank of the group is (asked now, answers awaited at most 1 s or a quarter of the
  // timeout).
  std::string where;
  try {
    where = where_is_everyone(p.averager, p.who.world_ranks, position_of(p), std::min(1.0, p.timeout_s / 4));
  } catch (...) {
    where.clear();  // out of memory: the message without it
  }
  throw Timeout("hma: step " + std::to_string(p.who.step) + ": the average over " +
                    p.who.describe() + ", " + std::to_string(p.who.bytes) + " bytes, " + what +
                    ". It is still pending: wait() on it again, or end the job" +
                    (where.empty() ? "" : ". Where the group is: " + where),
                p.who.level, p.who.step, p.who.bytes, p.who.world_ranks);
}

bool complete_data(Pending& p, bool blocking, std::chrono::steady_clock::time_point deadline);

// Whether a blocking wait on `p` polls (instead of blocking inside MPI): always for an
// averager's average (it serves "where are you?" and warns of a stall), and whenever another
// average is in flight (it advances them).
bool polls(const Pending& p) { return p.averager != 0 || others_in_flight(p); }

using Clock = std::chrono::steady_clock;

Clock::duration seconds(double s) { return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s)); }

// A wait shorter than this costs nothing more than its own polls: only after it does a wait
// advance the other averages, answer "where are you?" and count towards the stall warning.
constexpr auto kQuietWait = std::chrono::milliseconds(1);

// True when `p`'s current wait (or run of test()s) has lasted kQuietWait; starts its clock.
bool waited_long(Pending& p, Clock::time_point now) {
  if (p.wait_start == Clock::time_point{}) {
    p.wait_start = now;
    return false;
  }
  return now - p.wait_start >= kQuietWait;
}

// Polls between two reads of the clock: a read costs about as much as a poll (tens of ns on a
// VM), and a small average completes within a few polls.
constexpr int kPollsPerClock = 16;

// One poll of a blocking wait on `p` that found it incomplete: a few fast polls first (the usual
// case: the group is there), then it yields the core each time (oversubscribed ranks, and the
// emulated cluster, need idle ranks to); after kQuietWait it also advances the other averages,
// answers the queries and warns of a stall. True when `deadline` has passed (the clock is read
// every kPollsPerClock polls).
bool poll(Pending& p, Clock::time_point deadline) {
  if (++p.polls > 100) std::this_thread::yield();
  if (p.polls % kPollsPerClock != 0) return false;
  const auto now = Clock::now();
  if (now >= deadline) return true;
  if (!waited_long(p, now)) return false;
  progress_others(p);
  update_here(position_of(p));
  serve_queries();
  if (p.stall_warn_s > 0 && now - p.wait_start >= seconds(p.stall_warn_s) * (p.warnings + 1)) {
    ++p.warnings;
    char secs[32];
    std::snprintf(secs, sizeof secs, "%g", p.stall_warn_s);
    try {
      const std::string where =
          where_is_everyone(p.averager, p.who.world_ranks, position_of(p), std::min(1.0, p.stall_warn_s / 4));
      report_stall("hma: warning: stall: step " + std::to_string(p.who.step) + ": the average over " +
                   p.who.describe() + " has waited another " + secs + " s (HMA_STALL_WARN_S; the wait goes on): " +
                   where);
    } catch (...) {
      // out of memory: no warning this time
    }
  }
  return false;
}

// One test() of `p` that did not complete it: after a while, the other averages and the queries.
void poll_test(Pending& p) {
  if (!waited_long(p, Clock::now())) return;
  progress_others(p);
  serve_queries();
}

// What the group does with non-finite votes; every rank of the group decides alike.
bool proceed_after(const Verdict& v, const Pending& p) {
  if (v.nonfinite_ranks.empty() || p.nonfinite == NonFinite::ignore) return true;
  std::string list;
  for (int r : v.nonfinite_ranks) list += (list.empty() ? "" : ", ") + std::to_string(r);
  const std::string what = "hma: step " + std::to_string(p.who.step) + ": level " +
                           std::to_string(p.who.level) +
                           ": non-finite values (NaN or Inf) on world rank(s) " + list;
  if (p.nonfinite == NonFinite::error)
    throw NonFiniteError(what + "; nothing was averaged (HMA_NONFINITE=throw)", p.who.step,
                         v.nonfinite_ranks);
  if (p.who.world_ranks.empty() || p.who.world_ranks.front() == Comm::world_rank())
    log(LogLevel::warn, what + "; this average is skipped (HMA_NONFINITE=skip)");
  return false;
}

// The factor this rank's data is scaled by (see Pending::weight_factor); every rank of the group
// sees the same weights, so every rank decides alike.
double weight_factor(const Verdict& v, const Pending& p) {
  if (v.weight_min == v.weight_max && v.weight_min != 0) return -1;  // equal weights: plain
  if (v.weight_sum == 0)
    throw InvalidArgument("hma: step " + std::to_string(p.who.step) + ": the average over " +
                          p.who.describe() + ": the weights of the group sum to zero (set_weight); "
                          "nothing was averaged");
  return static_cast<double>(p.weight) / static_cast<double>(v.weight_sum);
}

// Stage 1 -> stage 2: completes the agreement check and launches the data. False while the check
// is still open (non-blocking). A failed check or launch ends the average (done).
bool launch(Pending& p, bool blocking, std::chrono::steady_clock::time_point deadline) {
  if (p.launched) return true;
  if (p.control.started()) {
    if (blocking && polls(p)) {
      while (!p.control.test()) {
        if (poll(p, deadline)) throw_timeout(p);
      }
    } else if (blocking) {
      if (!p.control.wait_until(deadline)) throw_timeout(p);
    } else if (!p.control.test()) {
      return false;
    }
  }
  try {
    bool go = true;
    if (p.control.started()) {
      const Verdict v = p.control.resolve(p.who);
      go = proceed_after(v, p);
      if (go) p.weight_factor = weight_factor(v, p);
    }
    if (go && !p.refusal.empty()) throw InvalidArgument(p.refusal);
    p.launched = true;
    if (!go) {
      p.done = p.skipped = true;
      return true;
    }
    if (p.land_fused && p.control.fused() && p.weight_factor < 0) {
      p.land_fused(p.control);  // the check carried the whole average
      p.done = true;
      if (auto* tl = Timeline::get()) {
        const double now = Timeline::now_us();
        const int g = static_cast<int>(p.who.world_ranks.size()), level = static_cast<int>(p.who.level);
        tl->event("fused (in the check)", p.t_start, now, level, p.who.step, p.who.bytes, g, 1);
        tl->event("in flight", p.t_start, now, level, p.who.step, p.who.bytes, g, 1);
      }
      return true;
    }
  } catch (...) {
    p.done = true;  // none of its data moved: the set may be used and freed again
    throw;
  }
  try {
    p.launch(p);
  } catch (...) {
    // Whatever it issued before failing stays in flight: complete() and settle() finish
    // those requests; with none issued, nothing is in flight.
    if (p.reqs.empty() && !p.threaded && !p.drive) p.done = true;
    throw;
  }
  return true;
}

bool complete_requests(Pending& p, bool blocking, std::chrono::steady_clock::time_point deadline) {
  if (p.reqs.empty()) return true;
  const int n = static_cast<int>(p.reqs.size());
  if (blocking && (deadline != std::chrono::steady_clock::time_point::max() || polls(p))) {
    int flag = 0;
    while (true) {
      check(MPI_Testall(n, p.reqs.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(average)");
      if (flag) return true;
      if (poll(p, deadline)) throw_timeout(p);
    }
  }
  if (blocking) {
    check(MPI_Waitall(n, p.reqs.data(), MPI_STATUSES_IGNORE), "MPI_Waitall(average)");
    return true;
  }
  int flag = 0;
  check(MPI_Testall(n, p.reqs.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(average)");
  return flag != 0;
}

// A blocking wait on `p` begins: this rank answers "where are you?" with this average meanwhile
// (`here`, for the wait's scope), and the stall warning and the polls count from now.
void begin_wait(Pending& p, std::optional<Waiting>& here) {
  if (p.averager == 0) return;
  here.emplace(position_of(p));
  p.wait_start = {};
  p.warnings = 0;
  p.polls = 0;
}

void require_usable(const Pending& p) {
  if (p.orphaned)
    throw Error("hma: step " + std::to_string(p.who.step) + ": the set or the averager of this "
                "average (" + p.who.describe() + ") was destroyed while it was still in flight "
                "(after a timeout or an error); it can never complete");
  if (mpi_finalized())
    throw Error("hma: step " + std::to_string(p.who.step) + ": waiting on an average (" +
                p.who.describe() + ") after MPI_Finalize: it can never complete");
}

}  // namespace

void launch_data(Pending& p) {
  if (p.done) return;
  std::optional<Waiting> here;
  begin_wait(p, here);
  require_usable(p);
  (void)launch(p, true, deadline_after(p.timeout_s));
}

bool complete(Pending& p, bool blocking) {
  std::optional<Waiting> here;
  if (blocking) begin_wait(p, here);
  if (p.deferred) {  // thrown while another wait advanced it: reported here, once
    auto e = std::exchange(p.deferred, nullptr);
    std::rethrow_exception(e);
  }
  if (p.done) return true;
  require_usable(p);
  // One deadline for the whole wait: the check and the data share it.
  const auto deadline = deadline_after(p.timeout_s);
  if (!launch(p, blocking, deadline)) {
    poll_test(p);  // a rank that only test()s this one still moves the others
    return false;
  }
  if (p.done) return true;  // skipped, or run to the end by a blocking launch
  TimelineScope t(blocking ? "wait" : "test", static_cast<int>(p.who.level), p.who.step,
                  p.who.bytes, static_cast<int>(p.who.world_ranks.size()));
  if (complete_data(p, blocking, deadline)) return true;
  poll_test(p);
  return false;
}

namespace {
bool complete_data(Pending& p, bool blocking, std::chrono::steady_clock::time_point deadline) {
  if (p.threaded) {
    if (!blocking && p.result.wait_for(std::chrono::seconds(0)) != std::future_status::ready)
      return false;
    if (blocking && polls(p)) {
      // Asleep on the worker's result between polls (it wakes at once when the result is in):
      // a spinning waiter would take the core from the worker and the other ranks.
      while (p.result.wait_for(std::chrono::microseconds(200)) != std::future_status::ready) {
        if (poll(p, deadline)) throw_timeout(p);
      }
    } else if (blocking && deadline != std::chrono::steady_clock::time_point::max() &&
               p.result.wait_until(deadline) != std::future_status::ready) {
      throw_timeout(p);
    }
    p.done = true;  // even if the worker failed: the error is reported once, here
    p.result.get();
    if (p.finish) p.finish();
    return true;
  }
  if (p.drive) {
    if (blocking && (deadline != std::chrono::steady_clock::time_point::max() || polls(p))) {
      while (!p.drive(false)) {
        if (poll(p, deadline)) throw_timeout(p);
      }
    } else if (!p.drive(blocking)) {
      return false;
    }
  } else {
    while (true) {
      if (!complete_requests(p, blocking, deadline)) return false;
      if (p.next_stage >= p.stages.size()) break;
      p.reqs.clear();
      p.stages[p.next_stage++](p.reqs);  // issue the next stage's collective
      if (p.drive || p.threaded) {
        // The stage handed the rest of the average to another path (the node transport's
        // fallback): that path completes it.
        p.stages.clear();
        p.next_stage = 0;
        return complete_data(p, blocking, deadline);
      }
    }
  }
  p.done = true;
  if (p.finish) p.finish();
  else if (p.params != nullptr) unpack(*p.params);
  if (auto* tl = Timeline::get())
    tl->event("in flight", p.t_start, Timeline::now_us(), static_cast<int>(p.who.level),
              p.who.step, p.who.bytes, static_cast<int>(p.who.world_ranks.size()), 1);
  return true;
}
}  // namespace

bool advance(Pending& p) {
  const auto never = std::chrono::steady_clock::time_point::max();
  return launch(p, false, never) && (p.done || complete_data(p, false, never));
}

void finish_issuing(Pending& p) {
  if (p.done) return;
  std::optional<Waiting> here;
  begin_wait(p, here);
  require_usable(p);
  const auto deadline = deadline_after(p.timeout_s);
  launch(p, true, deadline);
  if (p.done || p.threaded) return;
  if (p.drive) {
    if (p.issue_rest && !p.issue_rest(deadline)) throw_timeout(p);
    return;
  }
  while (p.next_stage < p.stages.size()) {
    complete_requests(p, true, deadline);
    p.reqs.clear();
    p.stages[p.next_stage++](p.reqs);
    if (p.drive || p.threaded) {  // handed over (see complete_data)
      p.stages.clear();
      p.next_stage = 0;
      if (p.drive && p.issue_rest && !p.issue_rest(deadline)) throw_timeout(p);
      return;
    }
  }
}

void unpack(ParamSet& params) {
  unpack_bucket(params.bucket<float>());
  unpack_bucket(params.bucket<double>());
  unpack_bucket(params.bucket<bf16>());
  unpack_bucket(params.bucket<fp16>());
}

}  // namespace hma::detail
