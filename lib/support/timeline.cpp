#include "support/timeline.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "support/mpi_static.hpp"

namespace hma::detail {

namespace {

struct Event {
  const char* name;
  double t0, t1;
  int level;
  std::int64_t step;
  std::size_t bytes;
  int group, tid;
};

constexpr std::size_t kMaxEvents = 2'000'000;  // ~100 MB of JSON; later events are dropped

class Recorder {
 public:
  explicit Recorder(std::string path) : path_(std::move(path)) { events_.reserve(4096); }
  ~Recorder() { write(); }
  void add(const Event& e) {
    std::lock_guard<std::mutex> lock(mu_);
    if (rank_ < 0) rank_ = mpi_world_rank();
    if (events_.size() < kMaxEvents) events_.push_back(e);
    else ++dropped_;
  }

 private:
  std::string file_name() const {
    std::string p = path_;
    const std::string r = std::to_string(rank_ < 0 ? 0 : rank_);
    if (auto at = p.find("%r"); at != std::string::npos) return p.replace(at, 2, r);
    const auto slash = p.find_last_of('/');
    const auto dot = p.find_last_of('.');
    if (dot != std::string::npos && (slash == std::string::npos || dot > slash))
      return p.substr(0, dot) + ".rank" + r + p.substr(dot);
    return p + ".rank" + r;
  }
  void write() {
    if (events_.empty()) return;
    const std::string name = file_name();
    std::FILE* f = std::fopen(name.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "hma: cannot write HMA_TIMELINE file %s\n", name.c_str());
      return;
    }
    const int pid = rank_ < 0 ? 0 : rank_;
    std::fprintf(f, "{\"displayTimeUnit\": \"ms\", \"traceEvents\": [\n");
    std::fprintf(f, "{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": %d, \"args\": {\"name\": \"rank %d\"}},\n", pid, pid);
    std::fprintf(f, "{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": 0, \"args\": {\"name\": \"calls\"}},\n", pid);
    std::fprintf(f, "{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": 1, \"args\": {\"name\": \"in flight\"}},\n", pid);
    std::fprintf(f, "{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": 2, \"args\": {\"name\": \"staged chunks (level -1; step: first element, group: bucket)\"}}", pid);
    for (const auto& e : events_)
      std::fprintf(f,
                   ",\n{\"name\": \"%s\", \"cat\": \"hma\", \"ph\": \"X\", \"pid\": %d, \"tid\": %d, "
                   "\"ts\": %.3f, \"dur\": %.3f, \"args\": {\"level\": %d, \"step\": %lld, "
                   "\"bytes\": %zu, \"group_size\": %d}}",
                   e.name, pid, e.tid, e.t0, e.t1 - e.t0, e.level, static_cast<long long>(e.step),
                   e.bytes, e.group);
    std::fprintf(f, "\n]}\n");
    std::fclose(f);
    if (dropped_ > 0)
      std::fprintf(stderr, "hma: timeline %s: %zu events dropped past %zu\n", name.c_str(), dropped_,
                   kMaxEvents);
  }
  std::string path_;
  std::vector<Event> events_;
  std::size_t dropped_ = 0;
  int rank_ = -1;
  std::mutex mu_;
};

Recorder* recorder() {
  static Recorder* r = [] () -> Recorder* {
    const char* p = std::getenv("HMA_TIMELINE");
    if (p == nullptr || *p == '\0') return nullptr;
    static Recorder rec(p);  // written when the process exits
    return &rec;
  }();
  return r;
}

}  // namespace

Timeline* Timeline::get() noexcept {
  // The Timeline object carries no state of its own: a non-null pointer means "recording".
  static Timeline t;
  return recorder() != nullptr ? &t : nullptr;
}

double Timeline::now_us() noexcept {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Timeline::event(const char* name, double t0, double t1, int level, std::int64_t step,
                     std::size_t bytes, int group, int tid) noexcept {
  try {
    recorder()->add(Event{name, t0, t1, level, step, bytes, group, tid});
  } catch (...) {
    // Out of memory while recording: drop the event; timing data must never break averaging.
  }
}

}  // namespace hma::detail
