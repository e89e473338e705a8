#include "transport/staged.hpp"

#include <chrono>
#include <thread>

#include <algorithm>

#include "hma/error.hpp"
#include "transport/elements.hpp"

namespace hma::detail {

std::vector<Chunk> staged_chunks(const std::vector<StagedJob>& jobs, std::size_t chunk_bytes) {
  std::vector<Chunk> out;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    const std::size_t n = jobs[j].n;
    if (n == 0) continue;
    const std::size_t per = piece_elems(chunk_bytes, dtype_size(jobs[j].dtype), max_count());
    for (std::size_t lo = 0; lo < n; lo += per) out.push_back(Chunk{j, lo, std::min(per, n - lo)});
  }
  return out;
}

std::size_t staged_slot_bytes(const std::vector<StagedJob>& jobs, std::size_t chunk_bytes) {
  std::size_t most = 0;
  for (const Chunk& c : staged_chunks(jobs, chunk_bytes))
    most = std::max(most, c.n * dtype_size(jobs[c.job].dtype));
  return most;
}

StagedPipeline::StagedPipeline(DeviceBackend& be, StagingArea& area, std::vector<StagedJob> jobs,
                               std::size_t chunk_bytes, MPI_Comm comm, Stream to_host,
                               Stream to_device, bool blocking_mpi)
    : be_(be),
      area_(area),
      jobs_(std::move(jobs)),
      chunks_(staged_chunks(jobs_, chunk_bytes)),
      comm_(comm),
      to_host_(to_host),
      to_device_(to_device),
      blocking_mpi_(blocking_mpi) {
  if (area_.slots == 0 || area_.slot_bytes < staged_slot_bytes(jobs_, chunk_bytes))
    throw Error("hma: internal: staging area too small for the pipeline");
  req_.assign(area_.slots, MPI_REQUEST_NULL);
  tl_ = Timeline::get();
  if (tl_ != nullptr) {
    t_in_.assign(area_.slots, 0);
    t_mpi_.assign(area_.slots, 0);
    t_out_.assign(area_.slots, 0);
  }
}

void StagedPipeline::mark(const char* stage, double t0, const Chunk& c) const noexcept {
  tl_->event(stage, t0, Timeline::now_us(), -1, static_cast<std::int64_t>(c.lo), c.n * dtype_size(jobs_[c.job].dtype),
             static_cast<int>(c.job), 2);
}

bool StagedPipeline::step(bool one_mpi) {
  const std::size_t S = area_.slots, N = chunks_.size();
  bool progress = false;
  auto dev = [&](const Chunk& c) {
    return static_cast<char*>(jobs_[c.job].dev) + c.lo * dtype_size(jobs_[c.job].dtype);
  };
  auto bytes = [&](const Chunk& c) { return c.n * dtype_size(jobs_[c.job].dtype); };
  // 1. Copy chunks to the host while slots are free.
  while (c_in_ < N && c_in_ - c_free_ < S) {
    const Chunk& c = chunks_[c_in_];
    const std::size_t s = c_in_ % S;
    if (tl_ != nullptr) t_in_[s] = Timeline::now_us();
    be_.copy(area_.send(s), dev(c), bytes(c), to_host_);
    be_.record(area_.in[s], to_host_);
    ++c_in_;
    max_in_flight_ = std::max(max_in_flight_, c_in_ - c_free_);
    progress = true;
  }
  // 2. Reduce, in chunk order, the chunks whose copy to the host has completed.
  while (c_mpi_ < c_in_ && be_.query(area_.in[c_mpi_ % S])) {
    const Chunk& c = chunks_[c_mpi_];
    const std::size_t s = c_mpi_ % S;
    const MPI_Datatype t = mpi_type(jobs_[c.job].dtype);
    if (tl_ != nullptr) {
      mark("staged d2h", t_in_[s], c);
      t_mpi_[s] = Timeline::now_us();
    }
    if (sent_) sent_(jobs_[c.job].dtype, c.lo, c.n, area_.send(s));
    if (blocking_mpi_) {
      check(MPI_Allreduce(area_.send(s), area_.recv(s), static_cast<int>(c.n), t, MPI_SUM, comm_),
            "MPI_Allreduce(staged chunk)");
      if (tl_ != nullptr) mark("staged allreduce", t_mpi_[s], c);
    } else {
      check(MPI_Iallreduce(area_.send(s), area_.recv(s), static_cast<int>(c.n), t, MPI_SUM, comm_,
                           &req_[s]),
            "MPI_Iallreduce(staged chunk)");
    }
    ++c_mpi_;
    progress = true;
    if (one_mpi && blocking_mpi_) break;  // queue this chunk's copy back before the next one
  }
  // 3. Copy reduced chunks back, in order.
  while (c_red_ < c_mpi_) {
    const std::size_t s = c_red_ % S;
    int done = 1;
    if (req_[s] != MPI_REQUEST_NULL) check(MPI_Test(&req_[s], &done, MPI_STATUS_IGNORE), "MPI_Test(staged chunk)");
    if (!done) break;
    const Chunk& c = chunks_[c_red_];
    if (tl_ != nullptr) {
      if (!blocking_mpi_) mark("staged iallreduce", t_mpi_[s], c);
      t_out_[s] = Timeline::now_us();
    }
    if (reduced_) reduced_(jobs_[c.job].dtype, c.lo, c.n, area_.recv(s));
    be_.copy(dev(c), area_.recv(s), bytes(c), to_device_);
    be_.record(area_.out[s], to_device_);
    ++c_red_;
    progress = true;
  }
  // 4. A slot is free again once its chunk is back in device memory.
  while (c_free_ < c_red_ && be_.query(area_.out[c_free_ % S])) {
    if (tl_ != nullptr) mark("staged h2d", t_out_[c_free_ % S], chunks_[c_free_]);
    ++c_free_;
    progress = true;
  }
  return progress;
}

// Nothing moved: block on the oldest unfinished thing of the pipeline.
void StagedPipeline::wait_oldest() {
  const std::size_t S = area_.slots;
  if (c_free_ < c_red_) {
    be_.synchronize(area_.out[c_free_ % S]);
  } else if (c_red_ < c_mpi_) {
    check(MPI_Wait(&req_[c_red_ % S], MPI_STATUS_IGNORE), "MPI_Wait(staged chunk)");
  } else if (c_mpi_ < c_in_) {
    be_.synchronize(area_.in[c_mpi_ % S]);
  }
}

bool StagedPipeline::drive(bool block) {
  while (true) {
    const bool progress = step(true);
    if (c_free_ == chunks_.size()) return true;
    if (!progress) {
      if (!block) return false;
      wait_oldest();
    }
  }
}

bool StagedPipeline::issue_all(std::chrono::steady_clock::time_point deadline) {
  const bool forever = deadline == std::chrono::steady_clock::time_point::max();
  while (!issued_all()) {
    if (step(true)) continue;
    if (forever) {
      wait_oldest();
    } else {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::yield();
    }
  }
  return true;
}

}  // namespace hma::detail
