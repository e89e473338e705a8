// Internal: one background thread that runs an averager's reductions in submission order, so
// that once start() returns the (faster) blocking reduction overlaps the caller's work.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

namespace hma::detail {

class Worker {
 public:
  Worker();
  ~Worker();  // finishes the queued jobs, then joins
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  /// Queues `job`; jobs run one at a time, in order (MPI needs collectives in the same order on
  /// every rank). The future is ready when the job has run, and holds its exception if it threw.
  std::shared_future<void> submit(std::function<void()> job);
  /// Blocks until no job is queued or running.
  void drain();

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable work_cv_, idle_cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false, busy_ = false;
  std::thread thread_;
};

}  // namespace hma::detail
