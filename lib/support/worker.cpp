#include "support/worker.hpp"

#include <memory>

namespace hma::detail {

Worker::Worker() : thread_([this] { loop(); }) {}

Worker::~Worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  thread_.join();
}

std::shared_future<void> Worker::submit(std::function<void()> job) {
  auto done = std::make_shared<std::promise<void>>();
  std::shared_future<void> result = done->get_future().share();
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back([job = std::move(job), done] {
      try {
        job();
        done->set_value();
      } catch (...) {
        done->set_exception(std::current_exception());
      }
    });
  }
  work_cv_.notify_one();
  return result;
}

void Worker::drain() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [this] { return queue_.empty() && !busy_; });
}

void Worker::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    work_cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    std::function<void()> job = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lock.unlock();
    job();
    lock.lock();
    busy_ = false;
    if (queue_.empty()) idle_cv_.notify_all();
  }
}

}  // namespace hma::detail
