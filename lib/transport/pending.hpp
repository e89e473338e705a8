// Internal: the record of one average from its agreement check to its last byte, shared by the
// transports that issue its data stage and the averager that drives it (averager/request.hpp),
// and held by its set as an InFlight (in_flight.hpp). Two stages:
//   1. control: the group's agreement check (control/check.hpp), waited with a deadline;
//   2. data: `launch` issues the transport's collectives (or runs a blocking one), then they are
//      completed (reqs/stages, a device state machine `drive`, or a worker thread's future).
// The data stage is launched only after every rank of the group agreed, so a rank that is
// elsewhere can never pair its collective with this one.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "control/check.hpp"
#include "hma/buffer.hpp"
#include "hma/options.hpp"
#include "in_flight.hpp"

namespace hma::detail {

struct Pending;

// What an average carries besides its check: every field has its default, so that a finished
// average's record can be reset in one assignment (Pending::recycle) and no field is forgotten.
struct PendingState {
  GroupInfo who;               // level, step, bytes, world ranks: captured at start for messages
  double timeout_s = 0;        // 0: wait forever
  bool timed_out = false;      // a wait on it has hit the deadline (a destructor then only tests)
  bool orphaned = false;       // its averager is gone while it was still in flight

  NonFinite nonfinite = NonFinite::ignore;
  bool launched = false;
  bool skipped = false;                  // the group voted non-finite with NonFinite::skip
  Weight weight = Weight{1} << 32;       // this rank's weight (quantised, see control/check.hpp)
  // Non-empty: what this average cannot do (every rank of the group alike: it depends on the
  // level and the kind of set, which the check compares). Thrown as hma::InvalidArgument after a
  // passing check, so the group fails together and nothing moves.
  std::string refusal;
  // Set from the check before the data stage: < 0 the plain average (x / g; also when every
  // weight is equal), else this rank's factor w_i / sum(w) (Route::weight).
  double weight_factor = -1;
  std::function<void(Pending&)> launch;  // the data stage: issues it, or runs it (blocking)
  // Set when the average rides in its check (small host averages): lands the group's sums when
  // the check fused on every rank (control.fused(), equal weights); the data stage is then skipped.
  std::function<void(const ControlCheck&)> land_fused;

  std::vector<MPI_Request> reqs;
  // Multi-stage averages (two-level): when reqs complete, the next stage issues new requests;
  // `finish` runs after the last stage (instead of the plain unpack).
  std::vector<std::function<void(std::vector<MPI_Request>&)>> stages;
  std::size_t next_stage = 0;
  std::function<void()> finish;
  bool threaded = false;            // run by the averager's worker thread, which also unpacks
  std::shared_future<void> result;  // threaded only: ready when done, holds the worker's error
  // Device averages drive their own state machine instead of `reqs`/`stages`: drive(blocking)
  // advances it and returns true when the host side is complete; `finish` then runs (also after
  // a threaded average). Collectives issued lazily must be issued in the same order on every
  // rank: issue_rest(deadline) blocks until all of them are (a no-op once they are), false when
  // the deadline passed first.
  std::function<bool(bool)> drive;
  std::function<bool(std::chrono::steady_clock::time_point)> issue_rest;
  double t_start = 0;  // for the timeline
  // Thrown while another average's wait advanced this one (see track()): complete() throws it.
  std::exception_ptr deferred;
  // Who is missing (control/stall.hpp): the averager's id, the call (0 scheduled, 1 average()),
  // the stall warning's interval (0: off), when the current wait began and its warnings so far.
  std::int64_t averager = 0;
  std::int64_t call = 0;
  double stall_warn_s = 0;
  std::chrono::steady_clock::time_point wait_start{};
  int warnings = 0;
  std::uint64_t polls = 0;  // of the current wait (the first ones spin, see averager/request.cpp)
};

// `params` (kept current when the ParamSet moves) and `done` are InFlight's.
struct Pending final : InFlight, PendingState {
  ControlCheck control;        // not started: checks off (HMA_CHECK=0 and no non-finite guard)

  /// Whether this record may serve a new average (recycle): finished, its check idle, nothing
  /// left in flight, no error kept for a wait, no timeout or orphaning behind it.
  [[nodiscard]] bool reusable() const noexcept;
  /// Back to a fresh record, keeping its buffers' capacity (reusable() must hold).
  void recycle() noexcept;

  // InFlight, implemented by the averager (averager/request.cpp): complete(*this, true), and
  // what a dying set does with an average that may still be in flight.
  void wait() override;
  bool settle() noexcept override;
};

}  // namespace hma::detail
