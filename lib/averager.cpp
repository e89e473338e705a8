#include "hma/averager.hpp"

#include <algorithm>
#include <cstdio>
#include <chrono>
#include <functional>
#include <cmath>
#include <fstream>
#include <sstream>
#include <limits>
#include <thread>

#include "control/agree.hpp"
#include "device/device_path.hpp"
#include "support/env.hpp"
#include "hma/error.hpp"
#include "transport/elements.hpp"
#include "support/log.hpp"
#include "pending.hpp"
#include "support/timeline.hpp"
#include "support/worker.hpp"

namespace hma {

namespace detail {

namespace {

// How a blocking average reduces (see AveragerOptions::reduction).
struct Plan {
  int group = 1;              // group size
  int rank = 0;               // this rank in the group's communicator
  MPI_Comm comm = MPI_COMM_NULL;
  std::size_t chunk = 0;      // elements per piece, 0 = one piece
  Reduction reduction = Reduction::automatic;
  std::size_t ring_min_block = 0;  // automatic: ring when bytes / group reach this
  int level = 0;
  std::int64_t step = 0;
};

// Blocking average of one bucket, in pieces of `plan.chunk` elements, each still in cache while
// it is scaled, reduced and unpacked. A piece goes either through scale + pack + MPI_Allreduce +
// unpack, or through hma's ring, which folds the scaling into its additions and works on the
// user arrays in place (no separate pass at all).
template <Element T>
void average_blocking(Bucket<T>& b, const Plan& plan, std::vector<T>& scratch) {
  const Scaler<T> s(plan.group);
  T* data = b.storage.data();
  const std::size_t piece = std::min(plan.chunk == 0 ? kMaxChunk : plan.chunk, kMaxChunk);
  for (std::size_t lo = 0; lo < b.size(); lo += piece) {
    const std::size_t hi = std::min(lo + piece, b.size());
    const std::size_t bytes = (hi - lo) * sizeof(T);
    const bool ring = plan.reduction == Reduction::ring ||
                      (plan.reduction == Reduction::automatic &&
                       bytes / static_cast<std::size_t>(plan.group) >= plan.ring_min_block);
    if (ring) {  // in place in the owned region and the user arrays: nothing to pack or unpack
      TimelineScope t("ring allreduce (scaling fused)", plan.level, plan.step, bytes, plan.group);
      ring_average(Runs<T>::of(b, lo, hi), plan.comm, plan.rank, plan.group, s, scratch);
      continue;
    }
    {
      TimelineScope t("scale+pack", plan.level, plan.step, bytes, plan.group);
      scale_pack(b, lo, hi, s);
    }
    {
      TimelineScope t("MPI_Allreduce", plan.level, plan.step, bytes, plan.group);
      check(MPI_Allreduce(MPI_IN_PLACE, data + lo, static_cast<int>(hi - lo), mpi_type<T>(),
                          MPI_SUM, plan.comm),
            "MPI_Allreduce(average)");
    }
    if (hi > b.owned) {
      TimelineScope t("unpack", plan.level, plan.step, bytes, plan.group);
      unpack_range(b, lo, hi);
    }
  }
}

// Non-blocking: scale everything into the bucket's send buffer, then start an OUT-of-place
// reduction into the buffer (Open MPI 4.1's libnbc is 2-4x faster out of place than in place at
// >= 1 MiB; the scaling pass writes the copy instead of rewriting in place, so it costs the
// same). Packed user arrays are unpacked on completion.
template <Element T>
void start_bucket(Bucket<T>& b, int group_size, MPI_Comm comm, std::vector<MPI_Request>& reqs) {
  const Scaler<T> s(group_size);
  b.send.resize(b.size());
  T* send = b.send.data();
  T* data = b.storage.data();
  scale_out(b, 0, b.size(), s, send);
  for (std::size_t lo = 0; lo < b.size(); lo += kMaxChunk) {
    const int n = static_cast<int>(std::min(kMaxChunk, b.size() - lo));
    MPI_Request r = MPI_REQUEST_NULL;
    check(MPI_Iallreduce(send + lo, data + lo, n, mpi_type<T>(), MPI_SUM, comm, &r),
          "MPI_Iallreduce(average)");
    reqs.push_back(r);
  }
}

// Two-level average of [lo, hi) pieces (a level whose groups are several whole nodes): reduce-
// scatter within the node, allreduce across nodes between ranks of equal node-local rank, then
// allgather within the node. Only 1/L of the bytes cross the network from each rank. The scaled
// copy into the bucket's send buffer is the only extra pass; the result is copied back in place.
template <Element T>
void two_level_blocking(Bucket<T>& b, const Plan& plan, MPI_Comm intra, MPI_Comm inter, int L) {
  const Scaler<T> s(plan.group);
  const std::size_t piece = std::min(plan.chunk == 0 ? kMaxChunk : plan.chunk, kMaxChunk / 2);
  for (std::size_t lo = 0; lo < b.size(); lo += piece) {
    const std::size_t hi = std::min(lo + piece, b.size()), N = hi - lo;
    const std::size_t blk = (N + static_cast<std::size_t>(L) - 1) / static_cast<std::size_t>(L);
    TimelineScope t("two-level allreduce", plan.level, plan.step, N * sizeof(T), plan.group);
    b.send.resize(blk * static_cast<std::size_t>(L));
    b.recv.resize(blk);
    T* S = b.send.data();
    scale_out(b, lo, hi, s, S);
    std::fill(S + N, S + blk * static_cast<std::size_t>(L), T(0));
    const int c = static_cast<int>(blk);
    check(MPI_Reduce_scatter_block(S, b.recv.data(), c, mpi_type<T>(), MPI_SUM, intra),
          "MPI_Reduce_scatter_block(two-level, within the node)");
    check(MPI_Allreduce(MPI_IN_PLACE, b.recv.data(), c, mpi_type<T>(), MPI_SUM, inter),
          "MPI_Allreduce(two-level, across nodes)");
    check(MPI_Allgather(b.recv.data(), c, mpi_type<T>(), S, c, mpi_type<T>(), intra),
          "MPI_Allgather(two-level, within the node)");
    copy_back(b, lo, hi, S);
  }
}

// The non-blocking two-level average of a whole bucket as three chained stages; the first is
// issued now, the others by complete() as their predecessors finish.
template <Element T>
void start_two_level(Bucket<T>& b, int group, MPI_Comm intra, MPI_Comm inter, int L,
                     std::vector<MPI_Request>& reqs,
                     std::vector<std::function<void(std::vector<MPI_Request>&)>>& later,
                     std::vector<std::function<void()>>& finish) {
  const std::size_t N = b.size();
  if (N == 0) return;
  const std::size_t blk = (N + static_cast<std::size_t>(L) - 1) / static_cast<std::size_t>(L);
  if (blk > static_cast<std::size_t>(std::numeric_limits<int>::max()))
    throw InvalidArgument("hma: two-level average of " + std::to_string(N) +
                          " elements: too large for one non-blocking collective; use "
                          "HMA_ALGORITHM=flat or Progress::thread");
  const Scaler<T> s(group);
  b.send.resize(blk * static_cast<std::size_t>(L));
  b.recv.resize(blk);
  T* S = b.send.data();
  scale_out(b, 0, N, s, S);
  std::fill(S + N, S + blk * static_cast<std::size_t>(L), T(0));
  const int c = static_cast<int>(blk);
  MPI_Request r = MPI_REQUEST_NULL;
  check(MPI_Ireduce_scatter_block(S, b.recv.data(), c, mpi_type<T>(), MPI_SUM, intra, &r),
        "MPI_Ireduce_scatter_block(two-level)");
  reqs.push_back(r);
  Bucket<T>* bp = &b;  // buckets live on the heap: stable while in flight
  later.push_back([bp, c, inter](std::vector<MPI_Request>& q) {
    MPI_Request x = MPI_REQUEST_NULL;
    check(MPI_Iallreduce(MPI_IN_PLACE, bp->recv.data(), c, mpi_type<T>(), MPI_SUM, inter, &x),
          "MPI_Iallreduce(two-level)");
    q.push_back(x);
  });
  later.push_back([bp, c, intra](std::vector<MPI_Request>& q) {
    MPI_Request x = MPI_REQUEST_NULL;
    check(MPI_Iallgather(bp->recv.data(), c, mpi_type<T>(), bp->send.data(), c, mpi_type<T>(),
                         intra, &x),
          "MPI_Iallgather(two-level)");
    q.push_back(x);
  });
  finish.push_back([bp, N] { copy_back(*bp, 0, N, bp->send.data()); });
}

}  // namespace

void unpack(ParamSet& params) {
  unpack_bucket(params.bucket<float>());
  unpack_bucket(params.bucket<double>());
}

namespace {

// World ranks of `comm`, for messages.
std::vector<int> world_ranks_of(MPI_Comm comm) {
  std::vector<int> out;
  MPI_Group g = MPI_GROUP_NULL, w = MPI_GROUP_NULL;
  if (comm == MPI_COMM_NULL || MPI_Comm_group(comm, &g) != MPI_SUCCESS ||
      MPI_Comm_group(MPI_COMM_WORLD, &w) != MPI_SUCCESS)
    return out;
  int n = 0;
  MPI_Group_size(g, &n);
  std::vector<int> mine(static_cast<std::size_t>(n));
  out.resize(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) mine[static_cast<std::size_t>(i)] = i;
  MPI_Group_translate_ranks(g, n, mine.data(), w, out.data());
  MPI_Group_free(&g);
  MPI_Group_free(&w);
  return out;
}

// "0-3,6" from {0,1,2,3,6}.
std::string ranges(const std::vector<int>& r) {
  std::string s;
  for (std::size_t i = 0; i < r.size();) {
    std::size_t j = i;
    while (j + 1 < r.size() && r[j + 1] == r[j] + 1) ++j;
    if (!s.empty()) s += ',';
    s += std::to_string(r[i]);
    if (j > i) {
      s += '-';
      s += std::to_string(r[j]);
    }
    i = j + 1;
  }
  return s;
}

[[noreturn]] void throw_timeout(const Pending& p) {
  const std::vector<int> ranks = world_ranks_of(p.comm);
  char secs[32];
  std::snprintf(secs, sizeof secs, "%g", p.timeout_s);
  throw Timeout("hma: step " + std::to_string(p.step) + ": the average over level " +
                    std::to_string(p.level) + " (group of " + std::to_string(p.group) +
                    " ranks, world ranks " + ranges(ranks) + ", " + std::to_string(p.bytes) +
                    " bytes) did not complete within " + secs +
                    " s (HMA_TIMEOUT_S): a rank of the group is slow, stuck or dead. The "
                    "average is still in flight: wait() again, or end the job",
                p.level, p.step, p.bytes, ranks);
}

}  // namespace

bool complete_requests(Pending& p, bool blocking, std::chrono::steady_clock::time_point deadline);

namespace {
// When a blocking wait on `p` that starts now gives up (never without a timeout).
std::chrono::steady_clock::time_point deadline_of(const Pending& p) {
  if (p.timeout_s <= 0) return std::chrono::steady_clock::time_point::max();
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(
             std::chrono::duration<double>(p.timeout_s));
}
}  // namespace

bool complete(Pending& p, bool blocking) {
  if (p.done) return true;
  TimelineScope t(blocking ? "wait" : "test", static_cast<int>(p.level), p.step, p.bytes, p.group);
  const auto deadline = deadline_of(p);
  if (p.threaded) {
    if (!blocking && p.result.wait_for(std::chrono::seconds(0)) != std::future_status::ready)
      return false;
    if (blocking && p.timeout_s > 0 && p.result.wait_until(deadline) != std::future_status::ready)
      throw_timeout(p);
    p.done = true;  // even if the worker failed: the error is reported once, here
    p.result.get();
    if (p.finish) p.finish();
    return true;
  }
  if (p.drive) {
    if (blocking && p.timeout_s > 0) {
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
    tl->event("in flight", p.t_start, Timeline::now_us(), static_cast<int>(p.level), p.step, p.bytes,
              p.group, 1);
  return true;
}

void finish_issuing(Pending& p) {
  if (p.done || p.threaded) return;
  if (p.drive) {
    if (p.issue_rest) p.issue_rest();
    return;
  }
  const auto deadline = deadline_of(p);
  while (p.next_stage < p.stages.size()) {
    complete_requests(p, true, deadline);
    p.reqs.clear();
    p.stages[p.next_stage++](p.reqs);
  }
}

bool complete_requests(Pending& p, bool blocking,
                       std::chrono::steady_clock::time_point deadline) {
  if (!p.reqs.empty()) {
    const int n = static_cast<int>(p.reqs.size());
    if (blocking && p.timeout_s > 0) {
      int flag = 0;
      while (true) {
        check(MPI_Testall(n, p.reqs.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(average)");
        if (flag) break;
        if (std::chrono::steady_clock::now() >= deadline) throw_timeout(p);
        std::this_thread::yield();
      }
    } else if (blocking) {
      check(MPI_Waitall(n, p.reqs.data(), MPI_STATUSES_IGNORE), "MPI_Waitall(average)");
    } else {
      int flag = 0;
      check(MPI_Testall(n, p.reqs.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(average)");
      if (!flag) return false;
    }
  }
  return true;
}

}  // namespace detail

// ---------------------------------------------------------------- Request

Request& Request::operator=(Request&& other) noexcept {
  if (this != &other) {
    if (active()) {
      try {
        wait();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "hma: error completing an in-flight average in Request::operator=: %s\n",
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
  try {
    wait();
  } catch (const Timeout& e) {
    // Still in flight: the ParamSet that owns the buffers decides what to do when it dies.
    std::fprintf(stderr, "hma: ~Request: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma: error completing an in-flight average in ~Request: %s\n", e.what());
  }
}

void Request::wait() {
  if (pending_) detail::complete(*pending_, true);
}

bool Request::test() { return !pending_ || detail::complete(*pending_, false); }

bool Request::active() const noexcept { return pending_ && !pending_->done; }

// ---------------------------------------------------------------- Averager

Schedule Averager::agreed(MPI_Comm comm, const std::function<Schedule()>& make) {
  detail::require_mpi("averager");
  if (comm == MPI_COMM_NULL) return make();
  std::optional<Schedule> s;
  detail::agree(comm, [&] { s.emplace(make()); });
  return std::move(*s);
}

Averager::Averager(MPI_Comm comm, Schedule schedule, AveragerOptions options)
    : schedule_(std::move(schedule)), hierarchy_(MPI_COMM_NULL, {}) {
  detail::require_mpi("averager");
  if (comm == MPI_COMM_NULL) return;  // not a member: count steps only
  std::vector<int> sizes;
  detail::agree(comm, [&] {
    int size = 0;
    check(MPI_Comm_size(comm, &size), "MPI_Comm_size");
    if (schedule_.world_size() != size)
      throw InvalidArgument("hma: the schedule is for " + std::to_string(schedule_.world_size()) +
                            " ranks but the communicator has " + std::to_string(size));
    check_every_ = options.check_every_average.value_or(detail::env_bool("HMA_CHECK", false));
    chunk_bytes_ = options.chunk_bytes.value_or(static_cast<std::size_t>(detail::env_int(
        "HMA_CHUNK_BYTES", static_cast<int>(AveragerOptions::kDefaultChunkBytes), 0,
        std::numeric_limits<int>::max())));
    reduction_ = options.reduction ? *options.reduction
                                   : detail::env_choice("HMA_REDUCTION", Reduction::automatic,
                                                        {{"auto", Reduction::automatic},
                                                         {"mpi", Reduction::mpi},
                                                         {"ring", Reduction::ring}});
    ring_min_block_bytes_ = static_cast<std::size_t>(detail::env_int(
        "HMA_RING_MIN_BLOCK_BYTES", static_cast<int>(AveragerOptions::kDefaultRingMinBlockBytes), 0,
        std::numeric_limits<int>::max()));
    timeout_s_ = options.timeout_s.value_or(0.0);
    if (!options.timeout_s) {
      const std::string v = detail::env_str("HMA_TIMEOUT_S", "");
      if (!v.empty()) {
        char* end = nullptr;
        timeout_s_ = std::strtod(v.c_str(), &end);
        if (end == v.c_str() || *end != '\0' || !(timeout_s_ >= 0))
          throw InvalidArgument("hma: environment variable HMA_TIMEOUT_S='" + v +
                                "' must be a non-negative number of seconds (0: no timeout)");
      }
    } else if (!(timeout_s_ >= 0)) {
      throw InvalidArgument("hma: AveragerOptions::timeout_s must be >= 0 (0: no timeout), got " +
                            std::to_string(timeout_s_));
    }
    nonfinite_ = options.nonfinite ? *options.nonfinite
                                   : detail::env_choice("HMA_NONFINITE", NonFinite::ignore,
                                                        {{"off", NonFinite::ignore},
                                                         {"throw", NonFinite::error},
                                                         {"skip", NonFinite::skip}});
    algorithm_ = options.algorithm ? *options.algorithm
                                   : detail::env_choice("HMA_ALGORITHM", Algorithm::automatic,
                                                        {{"auto", Algorithm::automatic},
                                                         {"flat", Algorithm::flat},
                                                         {"two_level", Algorithm::two_level}});
    const Progress progress =
        options.progress ? *options.progress
                         : detail::env_choice("HMA_PROGRESS", Progress::poll,
                                              {{"poll", Progress::poll}, {"thread", Progress::thread}});
    if (progress == Progress::thread) {
      int provided = MPI_THREAD_SINGLE;
      check(MPI_Query_thread(&provided), "MPI_Query_thread");
      if (provided < MPI_THREAD_MULTIPLE)
        throw InvalidArgument(
            "hma: progress thread (HMA_PROGRESS=thread or AveragerOptions::progress) needs MPI "
            "initialised with MPI_Init_thread(MPI_THREAD_MULTIPLE); this MPI provides level " +
            std::to_string(provided));
      worker_ = std::make_unique<detail::Worker>();
    }
    detail::DevicePathInputs din = detail::detect_device_inputs();
    din.requested = options.device_path ? *options.device_path
                                        : detail::env_choice("HMA_DEVICE_PATH", DevicePath::automatic,
                                                             {{"auto", DevicePath::automatic},
                                                              {"staged", DevicePath::staged},
                                                              {"direct", DevicePath::direct}});
    if (options.cuda_aware) din.cuda_aware_override = *options.cuda_aware ? 1 : 0;
    else if (!detail::env_str("HMA_CUDA_AWARE", "").empty())
      din.cuda_aware_override = detail::env_bool("HMA_CUDA_AWARE", false) ? 1 : 0;
    din.thread_progress = progress == Progress::thread;
    device_plan_ = std::make_unique<detail::DevicePlan>(detail::choose_device_plan(din));
    staging_chunk_bytes_ = options.staging_chunk_bytes.value_or(static_cast<std::size_t>(
        detail::env_int("HMA_STAGING_CHUNK_BYTES",
                        static_cast<int>(AveragerOptions::kDefaultStagingChunkBytes), 0,
                        std::numeric_limits<int>::max())));
    staging_slots_ = options.staging_slots.value_or(static_cast<std::size_t>(detail::env_int(
        "HMA_STAGING_SLOTS", static_cast<int>(AveragerOptions::kDefaultStagingSlots), 1, 64)));
    if (staging_slots_ < 1 || staging_slots_ > 64)
      throw InvalidArgument("hma: AveragerOptions::staging_slots must be in [1, 64], got " +
                            std::to_string(staging_slots_));
    detail::log_level();  // validates HMA_LOG on every rank
    for (const auto& l : schedule_.levels()) sizes.push_back(l.group_size);
    options.hierarchy.ranks_per_node = detail::ranks_per_node_setting(options.hierarchy.ranks_per_node);
  });
  const std::uint64_t fp[1] = {schedule_.fingerprint()};
  detail::check_same(comm, fp, "the schedule", [this] { return schedule_.to_string(); });
  // Settings that change which collectives an average issues must agree too, or ranks would
  // wait in different calls (a deadlock) or pair different pieces (wrong data).
  const std::uint64_t cfg[] = {chunk_bytes_,
                               static_cast<std::uint64_t>(reduction_),
                               ring_min_block_bytes_,
                               static_cast<std::uint64_t>(algorithm_),
                               worker_ ? 1u : 0u,
                               static_cast<std::uint64_t>(nonfinite_),
                               check_every_ ? 1u : 0u,
                               device_plan_->blocking_direct ? 1u : 0u,
                               static_cast<std::uint64_t>(device_plan_->nonblocking),
                               staging_chunk_bytes_};
  detail::check_same(comm, cfg, "the averaging settings (HMA_* variables or AveragerOptions)", [&] {
    return "chunk bytes " + std::to_string(chunk_bytes_) + ", reduction " +
           std::to_string(static_cast<int>(reduction_)) + ", ring min block " +
           std::to_string(ring_min_block_bytes_) + ", algorithm " +
           std::to_string(static_cast<int>(algorithm_)) + ", progress " +
           (worker_ ? "thread" : "poll") + ", non-finite " +
           std::to_string(static_cast<int>(nonfinite_)) + ", check " +
           (check_every_ ? "on" : "off") + ", " + device_plan_->why + ", staging chunk bytes " +
           std::to_string(staging_chunk_bytes_);
  });
  hierarchy_ = Hierarchy(comm, sizes, options.hierarchy);
  if (hierarchy_.world().rank() == 0) {
    for (const auto& w : schedule_.warnings()) detail::log(detail::LogLevel::warn, w);
    detail::log(detail::LogLevel::info, describe());
  }
}

Averager::Averager(Averager&&) noexcept = default;
Averager& Averager::operator=(Averager&& o) noexcept {
  if (this == &o) return *this;
  finish_all();
  worker_.reset();  // joined before the communicators it uses go
  schedule_ = std::move(o.schedule_);
  hierarchy_ = std::move(o.hierarchy_);
  step_ = o.step_;
  check_every_ = o.check_every_;
  chunk_bytes_ = o.chunk_bytes_;
  reduction_ = o.reduction_;
  timeout_s_ = o.timeout_s_;
  nonfinite_ = o.nonfinite_;
  algorithm_ = o.algorithm_;
  ring_min_block_bytes_ = o.ring_min_block_bytes_;
  scratch_ = std::move(o.scratch_);
  device_plan_ = std::move(o.device_plan_);
  staging_chunk_bytes_ = o.staging_chunk_bytes_;
  staging_slots_ = o.staging_slots_;
  inflight_ = std::move(o.inflight_);
  worker_ = std::move(o.worker_);
  checked_ = std::move(o.checked_);
  return *this;
}

Averager::~Averager() { finish_all(); }

void Averager::finish_all() noexcept {
  // Open MPI 4.1 crashes when a communicator is freed under a pending non-blocking collective
  // (and lazily issued stages need it): complete this averager's averages first.
  for (auto& w : inflight_)
    if (auto p = w.lock(); p && !p->done) {
      try {
        detail::complete(*p, true);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "hma: destroying an averager: completing its in-flight average: %s\n",
                     e.what());
      }
    }
  inflight_.clear();
}

std::optional<std::size_t> Averager::level_now() const noexcept {
  return schedule_.level_at(step_);
}

void Averager::set_step(std::int64_t step) {
  if (step < 0) throw InvalidArgument("hma: set_step: step must be >= 0, got " + std::to_string(step));
  step_ = step;
}



namespace {
template <Element T>
bool all_finite(detail::Bucket<T>& b) {
  bool ok = true;
  detail::for_segments(b, 0, b.size(), [&](std::size_t at, T* user, std::size_t n) {
    const T* x = user != nullptr ? user : b.storage.data() + at;
    for (std::size_t i = 0; i < n; ++i) ok &= std::isfinite(x[i]);
  });
  return ok;
}
}  // namespace

bool Averager::nonfinite_agreed(bool bad_here, const Comm& comm, std::size_t level) {
  const int bad = bad_here ? 1 : 0;
  std::vector<int> flags(static_cast<std::size_t>(comm.size()));
  if (worker_) worker_->drain();  // a collective on the level's communicator
  check(MPI_Allgather(&bad, 1, MPI_INT, flags.data(), 1, MPI_INT, comm.get()),
        "MPI_Allgather(non-finite guard)");
  std::vector<int> group_bad;
  for (std::size_t i = 0; i < flags.size(); ++i)
    if (flags[i]) group_bad.push_back(static_cast<int>(i));
  if (group_bad.empty()) return true;
  const std::vector<int> all = detail::world_ranks_of(comm.get());
  std::vector<int> world;
  for (int r : group_bad) world.push_back(all.at(static_cast<std::size_t>(r)));
  std::string list;
  for (int r : world) list += (list.empty() ? "" : ", ") + std::to_string(r);
  const std::string what = "hma: step " + std::to_string(step_) + ": level " +
                           std::to_string(level) + ": non-finite values (NaN or Inf) on world rank(s) " +
                           list;
  if (nonfinite_ == NonFinite::error)
    throw NonFiniteError(what + "; nothing was averaged (HMA_NONFINITE=throw)", step_, world);
  if (comm.rank() == 0)
    detail::log(detail::LogLevel::warn, what + "; this average is skipped (HMA_NONFINITE=skip)");
  return false;
}

bool Averager::within_shared_memory(std::size_t level) const {
  if (hierarchy_.emulated_nodes() || hierarchy_.num_nodes() <= 1) return true;
  const int rpn = hierarchy_.ranks_per_node();
  return hierarchy_.contiguous_nodes() && rpn > 0 &&
         schedule_.levels()[level].group_size <= rpn && rpn % schedule_.levels()[level].group_size == 0;
}

bool Averager::use_two_level(std::size_t level, std::size_t bytes) const {
  if (hierarchy_.two_level(level) == nullptr) return false;
  switch (algorithm_) {
    case Algorithm::flat:
      return false;
    case Algorithm::two_level:
      return true;
    case Algorithm::automatic:
      break;
  }
  // Emulated nodes share one machine's memory: splitting the reduction buys nothing there.
  return !hierarchy_.emulated_nodes() && bytes >= AveragerOptions::kTwoLevelMinBytes;
}

void Averager::check_layout(ParamSet& params) {
  check_layout(params.id(), params.layout_version(),
               {params.layout_fingerprint(), params.count(Dtype::f32), params.count(Dtype::f64)},
               [&] { return params.describe(); });
}

void Averager::check_layout(DeviceParamSet& params) {
  check_layout(params.id() | (std::uint64_t{1} << 63), params.layout_version(),
               {params.layout_fingerprint(), params.count(Dtype::f32), params.count(Dtype::f64)},
               [&] { return params.describe(); });
}

void Averager::check_layout(std::uint64_t id, std::uint64_t version, std::vector<std::uint64_t> v,
                            const std::function<std::string()>& describe) {
  const auto it = checked_.find(id);
  if (!check_every_ && it != checked_.end() && it->second == version) return;
  settle_issue();
  // The check is a collective on the world communicator: never concurrent with the worker's.
  if (worker_) worker_->drain();
  std::string what = "the buffer layout (ParamSet arrays, sizes and dtypes)";
  if (check_every_) {
    v.push_back(static_cast<std::uint64_t>(step_));
    what = "the step counter or the buffer layout";
  }
  detail::check_same(hierarchy_.world().get(), v, what, [&] {
    return "step " + std::to_string(step_) + ", " + describe();
  });
  checked_[id] = version;
}

std::shared_ptr<detail::Pending> Averager::new_pending(std::size_t level, std::size_t bytes,
                                                       const Comm& comm) {
  std::erase_if(inflight_, [](const std::weak_ptr<detail::Pending>& w) {
    const auto p = w.lock();
    return p == nullptr || p->done;
  });
  auto p = std::make_shared<detail::Pending>();
  inflight_.push_back(p);
  p->level = level;
  p->step = step_;
  p->bytes = bytes;
  p->group = comm.size();
  p->t_start = detail::Timeline::get() != nullptr ? detail::Timeline::now_us() : 0.0;
  p->timeout_s = timeout_s_;
  p->comm = comm.get();
  return p;
}

void Averager::settle_issue() {
  // Only the last lazily issuing average can have collectives left to issue (every start
  // settles the ones before it); for the others this is a no-op.
  for (auto& w : inflight_)
    if (auto p = w.lock()) detail::finish_issuing(*p);
}


bool Averager::scheduled(bool blocking, Request* out, const std::function<void()>& check,
                         const RunFn& run) {
  const auto lvl = level_now();
  if (member() && check_every_) check();  // every rank, averaging at this step or not
  bool did = false;
  try {
    did = member() && lvl && (blocking ? run_blocking(*lvl, run) : run(*lvl, false, out));
  } catch (const Timeout&) {
    ++step_;  // the average was issued and is still in flight: this step is taken
    throw;
  }
  ++step_;
  return did;
}

bool Averager::at_level(std::size_t level, bool blocking, Request* out,
                        const std::function<void()>& check, const RunFn& run) {
  if (!member()) return false;
  (void)hierarchy_.level(level);  // range check
  if (check_every_) check();
  return blocking ? run_blocking(level, run) : run(level, false, out);
}

bool Averager::run_blocking(std::size_t level, const RunFn& run) {
  if (timeout_s_ <= 0) return run(level, true, nullptr);
  // Only a non-blocking average can be abandoned at a deadline: start one and wait for it.
  Request r;
  const bool did = run(level, false, &r);
  try {
    r.wait();
  } catch (const Timeout&) {
    r.detach();  // still in flight in its set: the set's wait() resumes the wait
    throw;
  }
  return did;
}

bool Averager::step(ParamSet& params) {
  return scheduled(true, nullptr, [&] { check_layout(params); },
                   [&](std::size_t l, bool b, Request* o) { return run(params, l, b, o); });
}

Request Averager::start(ParamSet& params) {
  Request r;
  scheduled(false, &r, [&] { check_layout(params); },
            [&](std::size_t l, bool b, Request* o) { return run(params, l, b, o); });
  return r;
}

void Averager::average(ParamSet& params, std::size_t level) {
  at_level(level, true, nullptr, [&] { check_layout(params); },
           [&](std::size_t l, bool b, Request* o) { return run(params, l, b, o); });
}

Request Averager::start_average(ParamSet& params, std::size_t level) {
  Request r;
  at_level(level, false, &r, [&] { check_layout(params); },
           [&](std::size_t l, bool b, Request* o) { return run(params, l, b, o); });
  return r;
}

bool Averager::run(ParamSet& params, std::size_t level, bool blocking, Request* out) {
  settle_issue();
  if (params.in_flight())
    throw Error("hma: step " + std::to_string(step_) +
                ": this ParamSet already has an average in flight; wait() on its Request first");
  if (!check_every_) check_layout(params);
  const Comm& comm = hierarchy_.level(level);
  const int g = comm.size();
  if (nonfinite_ != NonFinite::ignore &&
      !nonfinite_agreed(!all_finite(params.bucket<float>()) || !all_finite(params.bucket<double>()),
                        comm, level)) {
    if (out != nullptr) *out = Request();
    return false;  // skipped on every rank of the group
  }
  if (detail::log_enabled(detail::LogLevel::debug))
    detail::log(detail::LogLevel::debug,
                "rank " + std::to_string(hierarchy_.world_rank()) + " step " +
                    std::to_string(step_) + ": level " + std::to_string(level) + " (group of " +
                    std::to_string(g) + "), " + std::to_string(params.bytes()) + " bytes");
  const Hierarchy::TwoLevel* two = use_two_level(level, params.bytes()) ? hierarchy_.two_level(level) : nullptr;
  const int per_node = hierarchy_.ranks_per_node();
  if (g == 1) {  // averaging over one rank is the identity
    if (out != nullptr) *out = Request(nullptr, level);
    return true;
  }
  auto& f = params.bucket<float>();
  auto& d = params.bucket<double>();
  const int lv = static_cast<int>(level);
  detail::TimelineScope whole(blocking ? "average" : "start", lv, step_, params.bytes(), g);
  // A chunk smaller than one element still means one element per piece (0 = no chunking).
  auto plan = [&](std::size_t elem_size) {
    detail::Plan p;
    p.group = g;
    p.rank = comm.rank();
    p.comm = comm.get();
    p.chunk = chunk_bytes_ == 0 ? 0 : std::max<std::size_t>(1, chunk_bytes_ / elem_size);
    p.reduction = reduction_;
    // auto: hma's ring was measured faster only over shared memory; across real nodes (TCP on
    // the emulated cluster: 1.4-2x slower) Open MPI's own network-aware allreduce wins.
    if (reduction_ == Reduction::automatic && !within_shared_memory(level))
      p.reduction = Reduction::mpi;
    p.ring_min_block = ring_min_block_bytes_;
    p.level = lv;
    p.step = step_;
    return p;
  };
  // The whole blocking average of both buckets. The buckets and scratch live on the heap, so
  // this may also run on the worker thread while the ParamSet or the averager is moved.
  auto body = [&f, &d, pf = plan(sizeof(float)), pd = plan(sizeof(double)), sc = scratch_.get(),
               two, per_node] {
    if (two != nullptr) {
      detail::two_level_blocking(f, pf, two->intra.get(), two->inter.get(), per_node);
      detail::two_level_blocking(d, pd, two->intra.get(), two->inter.get(), per_node);
    } else {
      detail::average_blocking(f, pf, sc->f);
      detail::average_blocking(d, pd, sc->d);
    }
  };
  if (blocking) {
    // With a worker, wait for what it has queued (collectives stay in order), then run here:
    // no hand-off latency for blocking calls.
    if (worker_) worker_->drain();
    body();
    return true;
  }
  auto p = new_pending(level, params.bytes(), comm);
  p->params = &params;
  if (worker_) {
    p->threaded = true;
    p->result = worker_->submit(body);
    params.set_pending(p);
    *out = Request(std::move(p), level);
    return true;
  }
  if (two != nullptr) {
    std::vector<std::function<void(std::vector<MPI_Request>&)>> lf, ld;
    std::vector<std::function<void()>> fin;
    detail::start_two_level(f, g, two->intra.get(), two->inter.get(), per_node, p->reqs, lf, fin);
    detail::start_two_level(d, g, two->intra.get(), two->inter.get(), per_node, p->reqs, ld, fin);
    for (std::size_t k = 0; k < std::max(lf.size(), ld.size()); ++k)
      p->stages.push_back([a = k < lf.size() ? lf[k] : nullptr,
                           b = k < ld.size() ? ld[k] : nullptr](std::vector<MPI_Request>& q) {
        if (a) a(q);
        if (b) b(q);
      });
    p->finish = [fin] {
      for (const auto& fn : fin) fn();
    };
  } else {
    detail::start_bucket(f, g, comm.get(), p->reqs);
    detail::start_bucket(d, g, comm.get(), p->reqs);
  }
  params.set_pending(p);
  *out = Request(std::move(p), level);
  return true;
}

namespace {
constexpr std::string_view kCheckpointMagic = "hma-checkpoint 1";
}

std::string Averager::checkpoint() const {
  char fp[32];
  std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(schedule_.fingerprint()));
  std::string s(kCheckpointMagic);
  s += "\nstep " + std::to_string(step_) + "\nworld " + std::to_string(schedule_.world_size()) +
       "\nfingerprint " + fp + "\nschedule " + schedule_.to_string() + "\n";
  return s;
}

void Averager::restore(std::string_view text) {
  std::int64_t step = -1;
  auto parse = [&] {
    std::istringstream in{std::string(text)};
    std::string line;
    if (!std::getline(in, line) || line != kCheckpointMagic)
      throw InvalidArgument("hma: restore: not an hma checkpoint (first line '" + line +
                            "', expected '" + std::string(kCheckpointMagic) + "')");
    std::string sched, fp;
    long long world = -1, st = -1;
    while (std::getline(in, line)) {
      const auto sp = line.find(' ');
      const std::string key = line.substr(0, sp), val = sp == std::string::npos ? "" : line.substr(sp + 1);
      try {
        if (key == "step") st = std::stoll(val);
        else if (key == "world") world = std::stoll(val);
        else if (key == "fingerprint") fp = val;
        else if (key == "schedule") sched = val;
      } catch (const std::exception&) {
        throw InvalidArgument("hma: restore: checkpoint line '" + line + "' has a bad number");
      }
    }
    if (st < 0 || world < 0 || fp.empty())
      throw InvalidArgument("hma: restore: checkpoint lacks step, world or fingerprint");
    if (world != schedule_.world_size())
      throw InvalidArgument("hma: restore: the checkpoint was written by " + std::to_string(world) +
                            " ranks, this averager has " + std::to_string(schedule_.world_size()));
    char mine[32];
    std::snprintf(mine, sizeof mine, "%016llx", static_cast<unsigned long long>(schedule_.fingerprint()));
    if (fp != mine)
      throw InvalidArgument("hma: restore: the checkpoint is for schedule '" + sched +
                            "' but this averager runs '" + schedule_.to_string() + "'");
    step = st;
  };
  if (!member()) {
    parse();
    step_ = step;
    return;
  }
  settle_issue();
  if (worker_) worker_->drain();
  detail::agree(hierarchy_.world().get(), parse);
  const std::uint64_t v[1] = {static_cast<std::uint64_t>(step)};
  detail::check_same(hierarchy_.world().get(), v, "the restored step",
                     [&] { return "step " + std::to_string(step); });
  step_ = step;
}

void Averager::save_checkpoint(const std::string& path) const {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << checkpoint();
  f.close();
  if (!f) throw Error("hma: save_checkpoint: cannot write '" + path + "'");
}

void Averager::load_checkpoint(const std::string& path) {
  std::string text;
  bool ok = true;
  {
    std::ifstream f(path, std::ios::binary);
    ok = static_cast<bool>(f);
    std::ostringstream ss;
    if (ok) ss << f.rdbuf();
    text = ss.str();
  }
  if (!ok) text = "unreadable file '" + path + "'";  // restore() then fails on every rank
  restore(text);
}

std::string Averager::describe() const {
  if (!member()) return "hma: this rank is outside the averaging group\n";
  std::string s = "hma: model averaging " + schedule_.to_string() + "\n";
  s += hierarchy_.describe();
  const auto& lv = schedule_.levels();
  if (schedule_.kind() == Schedule::Kind::periodic) {
    s += "  all " + std::to_string(lv[0].group_size) + " ranks average parameters every " +
         std::to_string(lv[0].period) + " steps from step " + std::to_string(schedule_.warmup()) +
         "\n";
    s += "  " + device_path() + "\n";
    return s;
  }
  for (std::size_t i = 0; i < lv.size(); ++i) {
    s += "  each group of " + std::to_string(lv[i].group_size) +
         " ranks averages parameters every " + std::to_string(lv[i].period) + " steps" +
         (i + 1 < lv.size() ? ", if no higher level averages" : "") + "\n";
    if (hierarchy_.two_level(i) != nullptr) {
      const bool at_all = algorithm_ != Algorithm::flat &&
                          (algorithm_ == Algorithm::two_level || !hierarchy_.emulated_nodes());
      s += std::string("    algorithm: ") +
           (!at_all ? "flat (HMA_ALGORITHM=flat, or auto on emulated nodes that share memory)"
            : algorithm_ == Algorithm::two_level
                ? "two-level (HMA_ALGORITHM=two_level)"
                : "two-level from 64 KiB (auto), flat below") +
           "\n";
    }
  }
  if (schedule_.warmup() > 0)
    s += "  no averaging before step " + std::to_string(schedule_.warmup()) + "\n";
  s += "  " + device_path() + "\n";
  return s;
}

// ---------------------------------------------------------------- torch-named averagers

namespace {
int size_or_one(MPI_Comm comm) {
  if (comm == MPI_COMM_NULL) return 1;
  int s = 0;
  check(MPI_Comm_size(comm, &s), "MPI_Comm_size");
  return s;
}

// Ranks per node for the 'node' token of a schedule string: from options, HMA_RANKS_PER_NODE,
// or the shared-memory split (0 when nodes differ in size). Collective over comm.
int node_size(MPI_Comm comm, const AveragerOptions& o) {
  int rpn = 0;
  detail::agree(comm, [&] { rpn = detail::ranks_per_node_setting(o.hierarchy.ranks_per_node); });
  if (rpn > 0) return rpn;
  Comm shared = Comm::attach(comm).split_shared();
  const auto [lo, hi] = detail::min_max(comm, shared.size());
  return lo == hi ? lo : 0;
}

MPI_Comm require(MPI_Comm comm) {
  if (comm == MPI_COMM_NULL)
    throw InvalidArgument("hma: HierarchicalAverager: comm is MPI_COMM_NULL; every rank of the "
                          "hierarchy must pass the same (non-null) communicator");
  return comm;
}
}  // namespace

PeriodicAverager::PeriodicAverager(MPI_Comm comm, std::int64_t period, std::int64_t warmup,
                                   AveragerOptions options)
    : Averager(comm,
               agreed(comm, [&] { return Schedule::periodic(period, warmup, size_or_one(comm)); }),
               options) {}

HierarchicalAverager::HierarchicalAverager(MPI_Comm comm, std::vector<Level> levels,
                                           std::int64_t warmup, AveragerOptions options)
    : Averager(comm, agreed(comm, [&] {
                 require(comm);
                 return Schedule::hierarchical(std::move(levels), warmup, size_or_one(comm));
               }),
               options) {}

HierarchicalAverager::HierarchicalAverager(MPI_Comm comm, std::string_view spec,
                                           std::int64_t warmup, AveragerOptions options)
    : Averager(comm, agreed(comm, [&] {
                 require(comm);
                 return Schedule::parse(spec, warmup, size_or_one(comm), node_size(comm, options));
               }),
               options) {}

}  // namespace hma
