// Internal: the state of a started average, shared by its Request and its ParamSet.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "hma/buffer.hpp"

namespace hma::detail {

struct Pending {
  ParamSet* params = nullptr;  // kept current when the ParamSet moves
  std::vector<MPI_Request> reqs;
  bool done = false;
  std::size_t level = 0;
  std::int64_t step = 0;
  std::size_t bytes = 0;
  int group = 0;
  double t_start = 0;  // for the timeline
  double timeout_s = 0;             // 0: wait forever
  MPI_Comm comm = MPI_COMM_NULL;     // the group's communicator, to name its ranks in a Timeout
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
  // rank: issue_rest() blocks until all of them are (a no-op once they are).
  std::function<bool(bool)> drive;
  std::function<void()> issue_rest;
};

/// Completes `p` (blocking: waits, up to p.timeout_s when set, then throws hma::Timeout; else
/// tests once), then unpacks the user arrays and marks it done. Returns true when complete.
/// Idempotent.
bool complete(Pending& p, bool blocking);

/// Blocks until every collective of `p` has been ISSUED (not completed), so that the caller may
/// issue other collectives on the same communicators in the same order on every rank.
void finish_issuing(Pending& p);

/// Completes an in-flight average before its buffers go away (a destructor cannot throw).
/// Returns false when it is still in flight (it timed out): the buffers must then be leaked.
bool finish_quietly(const std::shared_ptr<Pending>& p) noexcept;

/// Copies the packed staging area back into the user arrays of `params`.
void unpack(ParamSet& params);

}  // namespace hma::detail
