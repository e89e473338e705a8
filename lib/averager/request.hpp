// Internal, the averager: driving an average (transport/pending.hpp) from its agreement check to
// its last byte, and what a set hands the averager for one.
#pragma once

#include <functional>
#include <memory>

#include "control/check.hpp"
#include "hma/buffer.hpp"
#include "transport/pending.hpp"

namespace hma::detail {

/// What a set hands the averager for one average (see Averager::issue()).
struct Prepared {
  std::shared_ptr<Pending> p;
  Header header;
  bool nonfinite_here = false;
  std::function<void(std::shared_ptr<Pending>)> attach;  // hangs `p` on its set
};

/// Completes `p`: the agreement check, then the data. Blocking: waits (up to p.timeout_s, then
/// throws hma::Timeout, leaving it resumable); else tests once. Throws hma::MismatchError or
/// hma::NonFiniteError from the check (then done: nothing was moved), hma::Error after
/// MPI_Finalize or when its averager is gone. Returns true when complete. Idempotent.
bool complete(Pending& p, bool blocking);

/// Blocks (up to the deadline, then hma::Timeout) until the agreement check of `p` has completed,
/// then launches its data stage (issues its first collectives). Throws what complete() throws.
void launch_data(Pending& p);

/// Blocks (up to the deadline) until every collective of `p` has been ISSUED (not completed), so
/// that the caller may issue other collectives on the same communicators in the same order on
/// every rank.
void finish_issuing(Pending& p);

/// Keeps `p` (and so its check and requests) alive for the rest of the process: for an average
/// that may still be in flight when its owners die.
void keep_forever(std::shared_ptr<Pending> p) noexcept;

/// Registers `p` as in flight in this process: while a rank blocks on one average, it advances
/// the others (their later stages are issued only when they are advanced; MPI's progress alone
/// does not issue them), so averages waited for in different orders on different ranks complete.
void track(const std::shared_ptr<Pending>& p);

/// True when `spare` may serve a new average and was made fresh (Pending::recycle): nothing but
/// `spare` holds it and it is reusable(). Under the registry's lock, so that no other thread's
/// wait can take it from the registry while it changes.
bool recycle(const std::shared_ptr<Pending>& spare) noexcept;

/// Whether another average than `self` is in flight in this process (then a blocking wait
/// polls, so that it advances them).
bool others_in_flight(const Pending& self);

/// Advances every other average in flight once, without blocking. What one of them throws is
/// kept for its own wait (Pending::deferred), never thrown at this caller.
void progress_others(const Pending& self) noexcept;

/// Advances `p` once without blocking: launches its data stage when its check is done, tests
/// its collectives. True when it is complete. Throws what complete() throws.
bool advance(Pending& p);

/// Copies the packed staging area back into the user arrays of `params`.
void unpack(ParamSet& params);

}  // namespace hma::detail
