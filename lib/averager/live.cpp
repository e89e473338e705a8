// What lives beyond one wait: the averages in flight in this process (a rank blocked on one
// advances the others), the averages of dying sets (kept alive while MPI may still use them), and
// Request. The waits themselves are averager/request.cpp.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <mutex>
#include <vector>

#include "averager/request.hpp"
#include "hma/averager.hpp"
#include "support/mpi_static.hpp"

namespace hma::detail {

namespace {

// Every average in flight in this process, so that a rank blocked on one keeps the others
// moving. MPI progresses every non-blocking collective whichever one a rank waits for; hma's
// averages of several stages (two-level, the node transport, the staged pipeline) issue their
// next collective only when they are advanced. Without this, rank A waiting for average 1 and
// rank B waiting for average 2 (of two averagers) would each wait for a stage the other never
// issues. Safe for the order of collectives: of one averager's averages only the last can have
// collectives left to issue (every start settles the ones before it), so each communicator's
// collectives are issued in one order on every rank, whichever wait advances them.
struct Live {
  std::mutex mu;
  std::vector<std::weak_ptr<Pending>> all;
};

Live& live() {
  static auto* l = new Live;  // never destroyed: Requests may outlive static destruction
  return *l;
}

thread_local bool in_progress_others = false;

// Drops the finished and the gone (the caller holds l.mu).
void prune(Live& l) {
  std::erase_if(l.all, [](const std::weak_ptr<Pending>& w) {
    auto q = w.lock();
    return q == nullptr || q->done;
  });
}

}  // namespace

// Whether another average than `self` is in flight here (then a blocking wait polls).
bool others_in_flight(const Pending& self) {
  if (in_progress_others) return false;
  Live& l = live();
  std::lock_guard<std::mutex> lock(l.mu);
  for (const auto& w : l.all)
    if (auto q = w.lock(); q && q.get() != &self && !q->done && !q->orphaned) return true;
  return false;
}

// Advances every other average in flight once, without blocking. What one of them throws is
// kept for its own wait (Pending::deferred), never thrown at this caller.
void progress_others(const Pending& self) noexcept {
  if (in_progress_others) return;
  std::vector<std::shared_ptr<Pending>> others;
  try {
    Live& l = live();
    std::lock_guard<std::mutex> lock(l.mu);
    prune(l);
    for (const auto& w : l.all)
      if (auto q = w.lock(); q && q.get() != &self && !q->orphaned && !q->deferred) others.push_back(std::move(q));
  } catch (...) {
    return;  // out of memory: this wait still completes its own average
  }
  in_progress_others = true;
  for (const auto& q : others) {
    if (q->done || q->threaded) continue;  // a worker's average moves by itself
    try {
      (void)advance(*q);
    } catch (...) {
      q->deferred = std::current_exception();
    }
  }
  in_progress_others = false;
}

void track(const std::shared_ptr<Pending>& p) {
  Live& l = live();
  std::lock_guard<std::mutex> lock(l.mu);
  prune(l);
  // A recycled record (Pending::recycle) may still be listed from its last average.
  for (const auto& w : l.all)
    if (!w.owner_before(p) && !p.owner_before(w)) return;
  l.all.push_back(p);
}

bool recycle(const std::shared_ptr<Pending>& spare) noexcept {
  if (!spare) return false;
  Live& l = live();
  std::lock_guard<std::mutex> lock(l.mu);
  if (spare.use_count() != 1 || !spare->reusable()) return false;
  prune(l);  // unlists it (done): a fresh record is listed again when it starts (track)
  spare->recycle();
  return true;
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

bool Pending::reusable() const noexcept {
  return done && !timed_out && !orphaned && !deferred && control.idle() &&
         std::all_of(reqs.begin(), reqs.end(), [](MPI_Request q) { return q == MPI_REQUEST_NULL; });
}

void Pending::recycle() noexcept {
  static const PendingState fresh{};
  static_cast<PendingState&>(*this) = fresh;  // copied, not moved: the vectors keep their capacity
  control.reset();
  params = nullptr;
  done = false;
}

void Pending::wait() { (void)complete(*this, true); }

bool Pending::settle() noexcept {
  if (done) return true;
  if (mpi_finalized()) return true;  // MPI is gone: it can no longer write anywhere
  try {
    // Never launch the data stage of a dying set (it would read and write arrays that are about
    // to go); finish one already launched, looking only once after a timeout (never a second
    // timeout).
    if (launched && !orphaned) (void)complete(*this, !timed_out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma: completing the in-flight average of a dying set: %s\n", e.what());
  }
  params = nullptr;
  if (!done) {
    orphaned = true;  // a Request that outlives the set can no longer complete it
    std::fprintf(stderr, "hma: a dying set's average (step %lld, %s) is still in flight; its "
                 "buffers are leaked so MPI cannot write into freed memory\n",
                 static_cast<long long>(who.step), who.describe().c_str());
    keep_forever(std::static_pointer_cast<Pending>(shared_from_this()));
  }
  return done;
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
  // After a timeout, or once MPI or the averager is gone, the set decides (see Pending::settle).
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
