#include "transport/device.hpp"

#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "hma/error.hpp"
#include "support/mpi_static.hpp"
#include "support/worker.hpp"
#include "transport/elements.hpp"
#include "transport/post.hpp"
#include "transport/staged.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

namespace {

// The bytes one average of the set moves (the plan's size threshold for device pointers).
std::size_t bytes_of(const DeviceState& s) { return s.f32.size() * s.f32.elem() + s.f64.size() * s.f64.elem(); }

std::vector<StagedJob> jobs_of(DeviceState& s) {
  std::vector<StagedJob> jobs;
  for (DeviceBucket* b : {&s.f32, &s.f64})
    if (b->size() > 0) jobs.push_back(StagedJob{b->storage, b->size(), b->dtype});
  return jobs;
}

// Calls fn(device pointer, count, MPI type) for each piece of the set's buckets that one MPI
// call can take: the staged chunks with no chunking (at most 2^30 elements each).
template <class F>
void each_piece(DeviceState& s, F&& fn) {
  const auto jobs = jobs_of(s);
  for (const auto& c : staged_chunks(jobs, 0)) {
    const auto& j = jobs[c.job];
    fn(static_cast<char*>(j.dev) + c.lo * dtype_size(j.dtype), static_cast<int>(c.n), mpi_type(j.dtype));
  }
}

// Device pointers straight to a (CUDA-aware) blocking MPI_Allreduce, in place.
void allreduce_direct(DeviceState& s, MPI_Comm comm) {
  each_piece(s, [&](void* p, int n, MPI_Datatype t) {
    count_use(Use::device_direct);
    check(MPI_Allreduce(MPI_IN_PLACE, p, n, t, MPI_SUM, comm), "MPI_Allreduce(device buffer)");
  });
}

// The staged pipeline over the set's buckets, with its pinned slots ready; with a post, its
// passes (and the scaling the pack kernel left out) on the host chunks.
std::shared_ptr<StagedPipeline> staged(DeviceState& s, const DeviceRoute& r, bool blocking_mpi) {
  count_use(Use::device_staged);
  auto jobs = jobs_of(s);
  s.staging.ensure(s.be, r.staging_slots, staged_slot_bytes(jobs, r.staging_chunk_bytes));
  auto pipe = std::make_shared<StagedPipeline>(*s.be, s.staging, std::move(jobs), r.staging_chunk_bytes,
                                               r.comm, s.stream, s.stream_back, blocking_mpi);
  if (Post* post = r.post) {
    auto typed = [](auto&& fn) {
      return [fn](Dtype d, std::size_t lo, std::size_t n, void* x) {
        if (d == Dtype::f32) fn(static_cast<float*>(x), lo, n);
        else fn(static_cast<double*>(x), lo, n);
      };
    };
    pipe->on_host(typed([post, r](auto* x, std::size_t lo, std::size_t n) {
                    using T = std::remove_pointer_t<decltype(x)>;
                    post->before_packed(x, lo, n);
                    Scaler<T> scale(r.group, r.weight_factor);
                    scale.pow2 = scale.pow2 || r.reciprocal;  // x * (1/g), as the kernel would
                    scale.in_place(x, n);
                  }),
                  typed([post](auto* x, std::size_t lo, std::size_t n) { post->after_packed(x, lo, n); }));
  }
  return pipe;
}

}  // namespace

void average_device(DeviceState& s, const DeviceRoute& r) {
  if (r.plan->direct_at(bytes_of(s)) && r.post == nullptr) {
    s.be->synchronize(s.packed);
    allreduce_direct(s, r.comm);
  } else {
    staged(s, r, true)->drive(true);
  }
  s.unpack_and_record();
  if (r.post) r.post->conclude(r.comm);
  s.be->stream_wait(r.user, s.done);
}

void start_device(DeviceState& s, const DeviceRoute& r, Pending& p, Worker* worker) {
  DeviceState* sp = &s;  // heap-stable: the set may move while the average is in flight
  const MPI_Comm c = r.comm;
  p.finish = [sp, user = r.user] {
    DeviceGuard on_device(sp->be, sp->device);  // a null `user` means this device's stream
    sp->be->stream_wait(user, sp->done);
  };
  DeviceNonblocking how = r.plan->nonblocking;
  if (r.post != nullptr)  // its passes run on the host chunks
    how = worker != nullptr ? DeviceNonblocking::staged_thread : DeviceNonblocking::staged_poll;
  else if (how == DeviceNonblocking::thread_direct && !r.plan->direct_at(bytes_of(s)))
    how = DeviceNonblocking::staged_thread;  // below the calibrated size: staged wins
  switch (how) {
    case DeviceNonblocking::thread_direct:
    case DeviceNonblocking::staged_thread: {
      if (worker == nullptr) throw Error("hma: internal: a progress-thread device path without a worker");
      const bool direct = how == DeviceNonblocking::thread_direct;
      std::shared_ptr<StagedPipeline> pipe;
      if (!direct) pipe = staged(s, r, true);
      p.threaded = true;
      p.result = worker->submit([sp, c, direct, pipe, post = r.post] {
        if (mpi_finalized()) throw Error("hma: a queued device average did not run: MPI is already finalised");
        // hma's own thread: set the device, never restore (a restore to device 0 would create
        // a context there for nothing).
        sp->be->set_device(sp->device);
        if (direct) {
          sp->be->synchronize(sp->packed);
          allreduce_direct(*sp, c);
        } else {
          pipe->drive(true);
        }
        sp->unpack_and_record();
        if (post) post->conclude(c);
      });
      return;
    }
    case DeviceNonblocking::iallreduce: {
      // Issued once the pack kernel is done (polled: start() does not block on the device).
      struct State {
        bool issued = false;
        std::vector<MPI_Request> reqs;
      };
      auto st = std::make_shared<State>();
      auto issue = [sp, c, st] {
        each_piece(*sp, [&](void* ptr, int n, MPI_Datatype t) {
          MPI_Request q = MPI_REQUEST_NULL;
          count_use(Use::device_iallreduce);
          check(MPI_Iallreduce(MPI_IN_PLACE, ptr, n, t, MPI_SUM, c, &q), "MPI_Iallreduce(device buffer)");
          st->reqs.push_back(q);
        });
        st->issued = true;
      };
      p.issue_rest = [sp, st, issue](std::chrono::steady_clock::time_point) {
        if (st->issued) return true;
        DeviceGuard on_device(sp->be, sp->device);  // a CUDA-aware MPI may use the current device
        sp->be->synchronize(sp->packed);  // the device's own work: bounded
        issue();
        return true;
      };
      p.drive = [sp, st, issue](bool block) {
        DeviceGuard on_device(sp->be, sp->device);
        if (!st->issued) {
          if (block) sp->be->synchronize(sp->packed);
          else if (!sp->be->query(sp->packed)) return false;
          issue();
        }
        const int n = static_cast<int>(st->reqs.size());
        int flag = 1;
        if (block) check(MPI_Waitall(n, st->reqs.data(), MPI_STATUSES_IGNORE), "MPI_Waitall(device buffer)");
        else check(MPI_Testall(n, st->reqs.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(device buffer)");
        if (!flag) return false;
        sp->unpack_and_record();
        return true;
      };
      break;
    }
    case DeviceNonblocking::staged_poll: {
      auto pipe = staged(s, r, false);
      // With a post: once every chunk is back, its pass is complete and the divergence maximum
      // (the average's last collective) is issued; its result is recorded when that completes.
      struct State {
        bool landed = false;
        std::vector<MPI_Request> reqs;
      };
      auto st = std::make_shared<State>();
      auto land = [sp, st, c, post = r.post] {
        sp->unpack_and_record();
        st->landed = true;
        if (post) post->start_conclude(c, st->reqs);
      };
      p.issue_rest = [sp, pipe, st, land, post = r.post](std::chrono::steady_clock::time_point deadline) {
        DeviceGuard on_device(sp->be, sp->device);
        if (!pipe->issue_all(deadline)) return false;
        if (post == nullptr || !post->measures() || st->landed) return true;
        // The maximum needs every chunk's pass: drive to the end, then issue it.
        const bool forever = deadline == std::chrono::steady_clock::time_point::max();
        while (!pipe->drive(forever)) {
          if (std::chrono::steady_clock::now() >= deadline) return false;
          std::this_thread::yield();
        }
        land();
        return true;
      };
      p.drive = [sp, pipe, st, land, post = r.post](bool block) {
        DeviceGuard on_device(sp->be, sp->device);
        if (!st->landed) {
          if (!pipe->drive(block)) return false;
          land();
        }
        if (!st->reqs.empty()) {
          const int n = static_cast<int>(st->reqs.size());
          int flag = 1;
          if (block) check(MPI_Waitall(n, st->reqs.data(), MPI_STATUSES_IGNORE), "MPI_Waitall(divergence)");
          else check(MPI_Testall(n, st->reqs.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(divergence)");
          if (!flag) return false;
          st->reqs.clear();
        }
        if (post) post->record();
        return true;
      };
      break;
    }
  }
}

}  // namespace hma::detail
