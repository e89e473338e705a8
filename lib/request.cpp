// A started average from its agreement check to its last byte (see pending.hpp), and Request.
#include <cstdio>
#include <mutex>
#include <thread>

#include "hma/averager.hpp"
#include "hma/error.hpp"
#include "pending.hpp"
#include "support/log.hpp"
#include "support/timeline.hpp"
#include "transport/elements.hpp"

namespace hma::detail {

bool mpi_finalized() noexcept {
  int fin = 0;
  MPI_Finalized(&fin);
  return fin != 0;
}

namespace {

// Composed only from what the average captured when it started.
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
  throw Timeout("hma: step " + std::to_string(p.who.step) + ": the average over " +
                    p.who.describe() + ", " + std::to_string(p.who.bytes) + " bytes, " + what +
                    ". It is still pending: wait() on it again, or end the job",
                p.who.level, p.who.step, p.who.bytes, p.who.world_ranks);
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
    if (blocking) {
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
  } catch (...) {
    p.done = true;  // none of its data moved: the set may be used and freed again
    throw;
  }
  try {
    p.launch(p);
  } catch (...) {
    // Whatever it issued before failing stays in flight: complete() and finish_quietly() finish
    // those requests; with none issued, nothing is in flight.
    if (p.reqs.empty() && !p.threaded && !p.drive) p.done = true;
    throw;
  }
  return true;
}

bool complete_requests(Pending& p, bool blocking, std::chrono::steady_clock::time_point deadline) {
  if (p.reqs.empty()) return true;
  const int n = static_cast<int>(p.reqs.size());
  if (blocking && deadline != std::chrono::steady_clock::time_point::max()) {
    int flag = 0;
    while (true) {
      check(MPI_Testall(n, p.reqs.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(average)");
      if (flag) return true;
      if (std::chrono::steady_clock::now() >= deadline) throw_timeout(p);
      std::this_thread::yield();
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
  require_usable(p);
  (void)launch(p, true, deadline_after(p.timeout_s));
}

bool complete(Pending& p, bool blocking) {
  if (p.done) return true;
  require_usable(p);
  // One deadline for the whole wait: the check and the data share it.
  const auto deadline = deadline_after(p.timeout_s);
  if (!launch(p, blocking, deadline)) return false;
  if (p.done) return true;  // skipped, or run to the end by a blocking launch
  TimelineScope t(blocking ? "wait" : "test", static_cast<int>(p.who.level), p.who.step,
                  p.who.bytes, static_cast<int>(p.who.world_ranks.size()));
  if (p.threaded) {
    if (!blocking && p.result.wait_for(std::chrono::seconds(0)) != std::future_status::ready)
      return false;
    if (blocking && deadline != std::chrono::steady_clock::time_point::max() &&
        p.result.wait_until(deadline) != std::future_status::ready)
      throw_timeout(p);
    p.done = true;  // even if the worker failed: the error is reported once, here
    p.result.get();
    if (p.finish) p.finish();
    return true;
  }
  if (p.drive) {
    if (blocking && deadline != std::chrono::steady_clock::time_point::max()) {
      while (!p.drive(false)) {
        if (std::chrono::steady_clock::now() >= deadline) throw_timeout(p);
        std::this_thread::yield();
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

void finish_issuing(Pending& p) {
  if (p.done) return;
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
  }
}

void keep_forever(std::shared_ptr<Pending> p) noexcept {
  // MPI may still write into its control check, its requests and its buffers: never free them.
  // Reachable from a static, so leak checkers do not report it.
  static auto* graveyard = new std::vector<std::shared_ptr<Pending>>;
  static std::mutex mu;
  try {
    std::lock_guard<std::mutex> lock(mu);
    graveyard->push_back(std::move(p));
  } catch (...) {
    (void)new std::shared_ptr<Pending>(std::move(p));  // out of memory: leak it another way
  }
}

bool finish_quietly(const std::shared_ptr<Pending>& p) noexcept {
  if (!p || p->done) return true;
  if (mpi_finalized()) return true;  // MPI is gone: it can no longer write anywhere
  try {
    // Never launch the data stage of a dying set (it would read and write arrays that are about
    // to go); finish one already launched, looking only once after a timeout (never a second
    // timeout).
    if (p->launched && !p->orphaned) (void)complete(*p, !p->timed_out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma: completing the in-flight average of a dying set: %s\n", e.what());
  }
  p->params = nullptr;
  if (!p->done) {
    p->orphaned = true;  // a Request that outlives the set can no longer complete it
    std::fprintf(stderr, "hma: a dying set's average (step %lld, %s) is still in flight; its "
                 "buffers are leaked so MPI cannot write into freed memory\n",
                 static_cast<long long>(p->who.step), p->who.describe().c_str());
    keep_forever(p);
  }
  return p->done;
}

void unpack(ParamSet& params) {
  unpack_bucket(params.bucket<float>());
  unpack_bucket(params.bucket<double>());
  unpack_bucket(params.bucket<bf16>());
  unpack_bucket(params.bucket<fp16>());
}

}  // namespace hma::detail

namespace hma {

Request& Request::operator=(Request&& other) noexcept {
  if (this != &other) {
    if (active() && !pending_->timed_out && !pending_->orphaned && !detail::mpi_finalized()) {
      try {
        wait();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "hma: Request::operator=: completing an in-flight average: %s\n",
                     e.what());
      }
    }
    pending_ = std::move(other.pending_);
    level_ = other.level_;
    other.level_.reset();
  }
  return *this;
}

Request::~Request() {
  if (!active()) return;
  // After a timeout, or once MPI or the averager is gone, the set decides (see finish_quietly).
  if (pending_->timed_out || pending_->orphaned || detail::mpi_finalized()) return;
  try {
    wait();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma: ~Request: completing an in-flight average: %s\n", e.what());
  }
}

void Request::wait() {
  if (pending_) detail::complete(*pending_, true);
}

bool Request::test() { return !pending_ || detail::complete(*pending_, false); }

bool Request::active() const noexcept { return pending_ && !pending_->done; }

}  // namespace hma
