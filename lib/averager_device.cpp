// The Averager's device-buffer paths (see hma::DevicePath and lib/device_path.cpp):
//   direct blocking       pack kernel -> event wait -> MPI_Allreduce(device) -> unpack kernel
//   (a) iallreduce        pack kernel -> (event polled) MPI_Iallreduce(device) -> unpack kernel
//   (b) thread_direct     the direct blocking path on the progress thread
//   (c) staged            pack kernel -> StagedPipeline (pinned host chunks) -> unpack kernel,
//                         blocking, polled (MPI_Iallreduce per chunk) or on the progress thread
// Every path starts by recording an event on the caller's stream and making hma's stream wait
// for it, and ends by recording `done` on hma's stream and making the caller's stream wait for
// it: no host synchronisation of the caller's stream, never cudaDeviceSynchronize.
#include <algorithm>
#include <future>

#include "device/device_path.hpp"
#include "device/device_state.hpp"
#include "hma/averager.hpp"
#include "hma/error.hpp"
#include "transport/elements.hpp"
#include "support/log.hpp"
#include "pending.hpp"
#include "transport/staged.hpp"
#include "support/timeline.hpp"
#include "support/worker.hpp"

namespace hma {

namespace {

std::vector<detail::StagedJob> jobs_of(detail::DeviceState& s) {
  std::vector<detail::StagedJob> jobs;
  for (detail::DeviceBucket* b : {&s.f32, &s.f64})
    if (b->size() > 0) jobs.push_back(detail::StagedJob{b->storage, b->size(), b->dtype});
  return jobs;
}

// Calls fn(device pointer, count, MPI type) for each piece of the set's buckets that one MPI
// call can take: the staged chunks with no chunking (at most 2^30 elements each).
template <class F>
void each_piece(detail::DeviceState& s, F&& fn) {
  const auto jobs = jobs_of(s);
  for (const auto& c : detail::staged_chunks(jobs, 0)) {
    const auto& j = jobs[c.job];
    fn(static_cast<char*>(j.dev) + c.lo * dtype_size(j.dtype), static_cast<int>(c.n),
       detail::mpi_type(j.dtype));
  }
}

// Device pointers straight to a (CUDA-aware) blocking MPI_Allreduce, in place.
void allreduce_direct(detail::DeviceState& s, MPI_Comm comm) {
  each_piece(s, [&](void* p, int n, MPI_Datatype t) {
    check(MPI_Allreduce(MPI_IN_PLACE, p, n, t, MPI_SUM, comm), "MPI_Allreduce(device buffer)");
  });
}

// The staged pipeline over the set's buckets, with its pinned slots ready.
std::shared_ptr<detail::StagedPipeline> staged(detail::DeviceState& s, std::size_t chunk_bytes,
                                               std::size_t slots, MPI_Comm comm, bool blocking_mpi) {
  auto jobs = jobs_of(s);
  s.staging.ensure(s.be, slots, detail::staged_slot_bytes(jobs, chunk_bytes));
  return std::make_shared<detail::StagedPipeline>(*s.be, s.staging, std::move(jobs), chunk_bytes,
                                                  comm, s.stream, s.stream_back, blocking_mpi);
}

}  // namespace

std::string Averager::device_path() const {
  if (!device_plan_) return "device buffers: this rank is outside the averaging group";
  return device_plan_->why;
}

bool Averager::step(DeviceParamSet& params, Stream stream) {
  return scheduled(true, nullptr, [&] { check_layout(params); },
                   [&](std::size_t l, bool b, Request* o) { return run_device(params, l, b, stream, o); });
}

Request Averager::start(DeviceParamSet& params, Stream stream) {
  Request r;
  scheduled(false, &r, [&] { check_layout(params); },
            [&](std::size_t l, bool b, Request* o) { return run_device(params, l, b, stream, o); });
  return r;
}

void Averager::average(DeviceParamSet& params, std::size_t level, Stream stream) {
  at_level(level, true, nullptr, [&] { check_layout(params); },
           [&](std::size_t l, bool b, Request* o) { return run_device(params, l, b, stream, o); });
}

Request Averager::start_average(DeviceParamSet& params, std::size_t level, Stream stream) {
  Request r;
  at_level(level, false, &r, [&] { check_layout(params); },
           [&](std::size_t l, bool b, Request* o) { return run_device(params, l, b, stream, o); });
  return r;
}

bool Averager::run_device(DeviceParamSet& params, std::size_t level, bool blocking, Stream user,
                          Request* out) {
  settle_issue();
  if (params.in_flight())
    throw Error("hma: step " + std::to_string(step_) +
                ": this DeviceParamSet already has an average in flight; wait() on its Request first");
  detail::DeviceState& s = params.state();
  s.be->set_device(s.device);
  if (!check_every_) check_layout(params);
  const Comm& comm = hierarchy_.level(level);
  const int g = comm.size();
  const int lv = static_cast<int>(level);
  // Everything hma does to the buffers comes after the caller's work on `user`.
  s.be->record(s.ready, user);
  s.be->stream_wait(s.stream, s.ready);
  s.tables();
  if (nonfinite_ != NonFinite::ignore) {
    bool bad = false;
    for (detail::DeviceBucket* b : {&s.f32, &s.f64})
      if (b->size() > 0)
        bad |= s.be->any_nonfinite(b->dtype, b->storage, b->table, b->segs, b->size(), s.stream);
    if (!nonfinite_agreed(bad, comm, level)) {
      if (out != nullptr) *out = Request();
      return false;
    }
  }
  if (g == 1) {  // the identity: nothing to move, the caller's stream is ordered already
    if (out != nullptr) *out = Request(nullptr, level);
    return true;
  }
  detail::TimelineScope whole(blocking ? "device average" : "device start", lv, step_, params.bytes(), g);
  for (detail::DeviceBucket* b : {&s.f32, &s.f64})
    if (b->size() > 0) s.be->scale_pack(b->dtype, b->storage, b->table, b->segs, b->size(), g, s.stream);
  s.be->record(s.packed, s.stream);
  const detail::DevicePlan& plan = *device_plan_;
  const MPI_Comm c = comm.get();
  detail::DeviceState* sp = &s;  // heap-stable: the set may move while the average is in flight
  if (blocking) {
    if (worker_) worker_->drain();
    if (plan.blocking_direct) {
      s.be->synchronize(s.packed);
      allreduce_direct(s, c);
    } else {
      staged(s, staging_chunk_bytes_, staging_slots_, c, true)->drive(true);
    }
    s.unpack_and_record();
    s.be->stream_wait(user, s.done);
    return true;
  }
  auto p = new_pending(level, params.bytes(), comm);
  p->finish = [sp, user] { sp->be->stream_wait(user, sp->done); };
  switch (plan.nonblocking) {
    case detail::DeviceNonblocking::thread_direct:
    case detail::DeviceNonblocking::staged_thread: {
      if (!worker_) throw Error("hma: internal: a progress-thread device path without a worker");
      const bool direct = plan.nonblocking == detail::DeviceNonblocking::thread_direct;
      std::shared_ptr<detail::StagedPipeline> pipe;
      if (!direct) pipe = staged(s, staging_chunk_bytes_, staging_slots_, c, true);
      p->threaded = true;
      p->result = worker_->submit([sp, c, direct, pipe] {
        sp->be->set_device(sp->device);
        if (direct) {
          sp->be->synchronize(sp->packed);
          allreduce_direct(*sp, c);
        } else {
          pipe->drive(true);
        }
        sp->unpack_and_record();
      });
      break;
    }
    case detail::DeviceNonblocking::iallreduce: {
      // Issued once the pack kernel is done (polled: start() does not block on the device).
      struct State {
        bool issued = false;
        std::vector<MPI_Request> reqs;
      };
      auto st = std::make_shared<State>();
      auto issue = [sp, c, st] {
        each_piece(*sp, [&](void* p, int n, MPI_Datatype t) {
          MPI_Request r = MPI_REQUEST_NULL;
          check(MPI_Iallreduce(MPI_IN_PLACE, p, n, t, MPI_SUM, c, &r), "MPI_Iallreduce(device buffer)");
          st->reqs.push_back(r);
        });
        st->issued = true;
      };
      p->issue_rest = [sp, st, issue] {
        if (st->issued) return;
        sp->be->synchronize(sp->packed);
        issue();
      };
      p->drive = [sp, st, issue](bool block) {
        sp->be->set_device(sp->device);
        if (!st->issued) {
          if (block) sp->be->synchronize(sp->packed);
          else if (!sp->be->query(sp->packed)) return false;
          issue();
        }
        const int n = static_cast<int>(st->reqs.size());
        if (block) {
          check(MPI_Waitall(n, st->reqs.data(), MPI_STATUSES_IGNORE), "MPI_Waitall(device buffer)");
        } else {
          int flag = 0;
          check(MPI_Testall(n, st->reqs.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(device buffer)");
          if (!flag) return false;
        }
        sp->unpack_and_record();
        return true;
      };
      break;
    }
    case detail::DeviceNonblocking::staged_poll: {
      auto pipe = staged(s, staging_chunk_bytes_, staging_slots_, c, false);
      p->issue_rest = [pipe] { pipe->issue_all(); };
      p->drive = [sp, pipe](bool block) {
        sp->be->set_device(sp->device);
        if (!pipe->drive(block)) return false;
        sp->unpack_and_record();
        return true;
      };
      break;
    }
  }
  params.set_pending(p);
  *out = Request(std::move(p), level);
  // Start moving at once (the first chunks' copies, or the reduction if the pack is done).
  if (out->pending_->drive) (void)out->test();
  return true;
}

}  // namespace hma
