// The host emulation device backend (for tests on machines without a GPU), the backend switch
// and device_info().
#include "device/device_backend.hpp"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>

#include "device/emulation.hpp"
#include "device/shm.hpp"
#include "device/segments.hpp"
#include "hma/error.hpp"

namespace hma::detail {

namespace {

// A stream: a queue of work that runs late (see device_backend.hpp).
struct EStream {
  std::deque<std::function<void()>> q;
  std::uint64_t enqueued = 0, executed = 0;
};
struct EEvent {
  std::weak_ptr<EStream> s;  // empty: never recorded (complete, as in CUDA); expired: its
  std::uint64_t seq = 0;     // stream was destroyed, which runs all of its work first
};

// The kernels of lib/device_cuda.cu with the same indexing (find_segment, e - at), looked up once
// per run of elements of one segment instead of per element (the unit test checks the lookup
// for every element).
template <class T, class F>
void each_element(const std::vector<Segment>& segs, std::uint64_t from, std::uint64_t total, F&& f) {
  const int n = static_cast<int>(segs.size());
  for (std::uint64_t e = from; e < total;) {
    const Segment& s = segs[static_cast<std::size_t>(find_segment(segs.data(), n, e))];
    const std::uint64_t end = s.at + s.n;
    for (; e < end && e < total; ++e) f(s, e);
  }
}

template <class T>
void scale_pack_t(T* storage, const std::vector<Segment>& segs, std::size_t total, int group,
                  bool reciprocal, double weight, T* out) {
  const T g = static_cast<T>(group), inv = T(1) / g;
  const bool pow2 = reciprocal || (group & (group - 1)) == 0;
  if (segs.empty()) return;
  each_element<T>(segs, 0, total, [&](const Segment& s, std::uint64_t e) {
    const T x = s.user != nullptr ? static_cast<const T*>(s.user)[e - s.at] : storage[e];
    out[e] = weight >= 0 ? static_cast<T>(static_cast<double>(x) * weight) : pow2 ? x * inv : x / g;
  });
}

template <class T>
void unpack_t(const T* storage, const std::vector<Segment>& segs, std::size_t total) {
  if (segs.empty()) return;
  each_element<T>(segs, unpack_start(segs.data(), static_cast<int>(segs.size())), total,
                  [&](const Segment& s, std::uint64_t e) {
                    if (s.user != nullptr) static_cast<T*>(s.user)[e - s.at] = storage[e];
                  });
}

template <class T>
bool nonfinite_t(const T* storage, const std::vector<Segment>& segs, std::size_t total) {
  bool bad = false;
  if (segs.empty()) return false;
  each_element<T>(segs, 0, total, [&](const Segment& s, std::uint64_t e) {
    const T x = s.user != nullptr ? static_cast<const T*>(s.user)[e - s.at] : storage[e];
    bad |= !std::isfinite(x);
  });
  return bad;
}

template <class T>
void sum_t(T* dst, const std::vector<const void*>& src, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    T acc = static_cast<const T*>(src[0])[i];
    for (std::size_t j = 1; j < src.size(); ++j) acc += static_cast<const T*>(src[j])[i];
    dst[i] = acc;
  }
}

// The pack kernel's term for one rank: x * factor (weighted), x * fl(1/g), or x / g.
template <class T>
T term(T x, double factor, T g, T inv, bool mul) {
  return factor >= 0 ? static_cast<T>(static_cast<double>(x) * factor) : mul ? x * inv : x / g;
}

template <class T>
void sum_terms_t(T* dst, const std::vector<const void*>& src, const std::vector<double>& f, std::size_t n,
                 int group, bool mul) {
  const T g = static_cast<T>(group), inv = T(1) / g;
  for (std::size_t i = 0; i < n; ++i) {
    T acc = term(static_cast<const T*>(src[0])[i], f[0], g, inv, mul);
    for (std::size_t j = 1; j < src.size(); ++j) acc += term(static_cast<const T*>(src[j])[i], f[j], g, inv, mul);
    dst[i] = acc;
  }
}

template <class T>
void pack_only_t(T* storage, const std::vector<Segment>& segs, std::uint64_t from, std::size_t total) {
  if (segs.empty()) return;
  each_element<T>(segs, from, total, [&](const Segment& s, std::uint64_t e) {
    if (s.user != nullptr) storage[e] = static_cast<const T*>(s.user)[e - s.at];
  });
}

// The calling thread's current device, as CUDA keeps it per thread.
thread_local int emulated_current = 0;

class HostEmulation final : public DeviceBackend {
 public:
  static constexpr int kDevices = 2;  // so tests can see hma keep the caller's current device
  std::string name() const override { return "host emulation"; }
  int devices(std::string& reason) override {
    reason.clear();
    return kDevices;
  }
  void set_device(int d) override {
    if (d < 0 || d >= kDevices) throw Error("hma: host emulation: no device " + std::to_string(d));
    emulated_current = d;
  }
  int current_device() override { return emulated_current; }
  void* alloc(std::size_t bytes) override {
    void* p = shm_alloc(bytes);  // shared memory: peers of the node transport may map it
    std::lock_guard<std::recursive_mutex> l(mu_);
    owner_[p] = {bytes == 0 ? 1 : bytes, emulated_current};
    return p;
  }
  void release(void* p) noexcept override {
    {
      std::lock_guard<std::recursive_mutex> l(mu_);
      owner_.erase(p);
    }
    (void)shm_release(p);
  }
  void* alloc_pinned(std::size_t bytes) override { return raw(bytes); }
  void release_pinned(void* p) noexcept override { std::free(p); }
  bool maybe_device_pointer(const void*) override { return true; }
  int pointer_device(const void* p) override {
    std::lock_guard<std::recursive_mutex> l(mu_);
    const auto* c = static_cast<const char*>(p);
    for (const auto& [base, info] : owner_)
      if (c >= static_cast<const char*>(base) && c < static_cast<const char*>(base) + info.first)
        return info.second;
    return -1;  // not allocated here (a test's host vector standing in for device memory)
  }
  bool can_access_peer(int device, int peer) override { return device == peer; }
  // IPC: POSIX shared memory, so ranks (processes) on this machine map each other's buffers.
  std::string ipc_unsupported(int) override { return ""; }
  std::string device_id(int device) override { return emulated_device_id(device); }
  bool can_reach(int device, const std::string& id) override { return id == device_id(device); }
  void* alloc_shared(std::size_t bytes, IpcHandle& h) override {
    void* p = shm_alloc(bytes);
    shm_export(p, h);
    return p;
  }
  void export_buffer(void* p, IpcHandle& h) override { shm_export(p, h); }
  void release_shared(void* p) noexcept override { (void)shm_release(p); }
  void* open_shared(const IpcHandle& h, std::size_t bytes) override { return shm_open_peer(h, bytes); }
  void close_shared(void* p) noexcept override { (void)shm_release(p); }
  void sum_terms(Dtype d, void* dst, const void* const* src, const double* factor, int k, std::size_t n,
                 int group, bool mul, Stream s) override {
    std::vector<const void*> v(src, src + k);
    std::vector<double> f(factor, factor + k);
    enqueue(s, [=] {
      if (d == Dtype::f32) sum_terms_t(static_cast<float*>(dst), v, f, n, group, mul);
      else sum_terms_t(static_cast<double*>(dst), v, f, n, group, mul);
    });
  }
  void pack_only(Dtype d, void* storage, void* table, const std::vector<Segment>& segs, std::size_t total,
                 Stream s) override {
    const auto* t = static_cast<const std::vector<Segment>*>(table);
    const std::uint64_t from = unpack_start(segs.data(), static_cast<int>(segs.size()));
    enqueue(s, [=] {
      if (d == Dtype::f32) pack_only_t(static_cast<float*>(storage), *t, from, total);
      else pack_only_t(static_cast<double*>(storage), *t, from, total);
    });
  }
  void sum_peers(Dtype d, void* dst, const void* const* src, int k, std::size_t n, Stream s) override {
    std::vector<const void*> v(src, src + k);
    enqueue(s, [=] {  // reads the peers' buffers when the stream runs it, like a kernel
      if (d == Dtype::f32) sum_t(static_cast<float*>(dst), v, n);
      else sum_t(static_cast<double*>(dst), v, n);
    });
  }
  int* alloc_flag() override { return new int(0); }
  void release_flag(int* f) noexcept override { delete f; }
  Stream create_stream() override {
    std::lock_guard<std::recursive_mutex> l(mu_);
    auto st = std::make_shared<EStream>();
    streams_[st.get()] = st;
    return reinterpret_cast<Stream>(st.get());
  }
  void destroy_stream(Stream s) noexcept override {
    if (default_stream(s)) return;
    std::lock_guard<std::recursive_mutex> l(mu_);
    run_until(*get(s), get(s)->enqueued);
    streams_.erase(reinterpret_cast<EStream*>(s));
  }
  Event create_event() override { return new EEvent; }
  void destroy_event(Event e) noexcept override { delete static_cast<EEvent*>(e); }
  void record(Event e, Stream s) override {
    std::lock_guard<std::recursive_mutex> l(mu_);
    auto* ev = static_cast<EEvent*>(e);
    ev->s = shared(s);
    ev->seq = get(s)->enqueued;
  }
  bool query(Event e) override {
    std::lock_guard<std::recursive_mutex> l(mu_);
    if (fail_queries_ > 0) {
      --fail_queries_;
      throw Error("hma: host emulation: injected failure of an event query (test)");
    }
    auto* ev = static_cast<EEvent*>(e);
    auto st = ev->s.lock();
    if (st == nullptr || st->executed >= ev->seq) return true;
    run_one(*st);  // the "device" makes a little progress per look
    return st->executed >= ev->seq;
  }
  void synchronize(Event e) override {
    std::lock_guard<std::recursive_mutex> l(mu_);
    auto* ev = static_cast<EEvent*>(e);
    if (auto st = ev->s.lock()) run_until(*st, ev->seq);
  }
  void stream_wait(Stream s, Event e) override {
    std::lock_guard<std::recursive_mutex> l(mu_);
    auto* ev = static_cast<EEvent*>(e);
    std::weak_ptr<EStream> other = ev->s;
    const std::uint64_t seq = ev->seq;
    if (other.expired()) return;
    enqueue(s, [this, other, seq] {
      if (auto st = other.lock()) run_until(*st, seq);
    });
  }
  void copy(void* dst, const void* src, std::size_t bytes, Stream s) override {
    enqueue(s, [=] { std::memcpy(dst, src, bytes); });
  }
  void fill(Dtype d, void* storage, std::size_t n, double v, Stream s) override {
    enqueue(s, [=] {
      if (d == Dtype::f32) std::fill_n(static_cast<float*>(storage), n, static_cast<float>(v));
      else std::fill_n(static_cast<double*>(storage), n, v);
    });
  }
  void* upload_segments(const std::vector<Segment>& segs, Stream s) override {
    // Empty until `s` runs the copy: a kernel not ordered after it sees no segments.
    auto* table = new std::vector<Segment>;
    enqueue(s, [table, segs] { *table = segs; });
    return table;
  }
  void release_segments(void* t) noexcept override { delete static_cast<std::vector<Segment>*>(t); }
  void scale_pack(Dtype d, void* storage, void* table, const std::vector<Segment>&,
                  std::size_t total, int group, bool reciprocal, double weight, Stream s, void* out) override {
    const auto* segs = static_cast<const std::vector<Segment>*>(table);  // read at run time, like a kernel
    enqueue(s, [=] {
      if (d == Dtype::f32)
        scale_pack_t(static_cast<float*>(storage), *segs, total, group, reciprocal, weight, static_cast<float*>(out));
      else
        scale_pack_t(static_cast<double*>(storage), *segs, total, group, reciprocal, weight, static_cast<double*>(out));
    });
  }
  void unpack(Dtype d, const void* storage, void* table, const std::vector<Segment>&,
              std::size_t total, Stream s) override {
    const auto* segs = static_cast<const std::vector<Segment>*>(table);
    enqueue(s, [=] {
      if (d == Dtype::f32) unpack_t(static_cast<const float*>(storage), *segs, total);
      else unpack_t(static_cast<const double*>(storage), *segs, total);
    });
  }
  bool any_nonfinite(Dtype d, const void* storage, void* table, const std::vector<Segment>&,
                     std::size_t total, Stream s, int* flag) override {
    const auto* segs = static_cast<const std::vector<Segment>*>(table);
    *flag = 0;
    enqueue(s, [=] {
      const bool bad = d == Dtype::f32 ? nonfinite_t(static_cast<const float*>(storage), *segs, total)
                                       : nonfinite_t(static_cast<const double*>(storage), *segs, total);
      if (bad) *flag = 1;
    });
    run_all(s);
    return *flag != 0;
  }

  void enqueue(Stream s, std::function<void()> fn) {
    std::lock_guard<std::recursive_mutex> l(mu_);
    EStream* st = get(s);
    st->q.push_back(std::move(fn));
    ++st->enqueued;
  }
  void run_all(Stream s) {
    std::lock_guard<std::recursive_mutex> l(mu_);
    run_until(*get(s), get(s)->enqueued);
  }

 private:
  static void* raw(std::size_t bytes) {
    void* p = std::malloc(bytes == 0 ? 1 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  // CUDA's default-stream handles: nullptr, cudaStreamLegacy (1) and cudaStreamPerThread (2),
  // which the Python package passes on from __cuda_array_interface__. One default stream here.
  static bool default_stream(Stream s) {
    const auto v = reinterpret_cast<std::uintptr_t>(s);
    return v == 0 || v == 1 || v == 2;
  }
  EStream* get(Stream s) { return default_stream(s) ? default_.get() : reinterpret_cast<EStream*>(s); }
  std::shared_ptr<EStream> shared(Stream s) {
    if (default_stream(s)) return default_;
    const auto it = streams_.find(reinterpret_cast<EStream*>(s));
    if (it == streams_.end()) throw Error("hma: host emulation: unknown stream");
    return it->second;
  }
  void run_one(EStream& s) {
    if (s.q.empty()) return;
    auto fn = std::move(s.q.front());
    s.q.pop_front();
    fn();
    ++s.executed;
  }
  void run_until(EStream& s, std::uint64_t seq) {
    while (s.executed < seq && !s.q.empty()) run_one(s);
  }
  std::recursive_mutex mu_;
  std::unordered_map<void*, std::pair<std::size_t, int>> owner_;  // alloc(): bytes, device
  std::shared_ptr<EStream> default_ = std::make_shared<EStream>();

 public:
  std::atomic<int> fail_queries_{0};  // tests: the next N query() calls throw
  std::unordered_map<EStream*, std::shared_ptr<EStream>> streams_;
};

HostEmulation& emulation() {
  static HostEmulation e;
  return e;
}

DeviceBackend* chosen = nullptr;

}  // namespace

DeviceBackend* host_emulation_backend() { return &emulation(); }

void emulation_enqueue(Stream s, std::function<void()> fn) { emulation().enqueue(s, std::move(fn)); }
void emulation_run_all(Stream s) { emulation().run_all(s); }
void emulation_fail_queries(int n) { emulation().fail_queries_ = n; }

DeviceBackend* device_backend() { return chosen != nullptr ? chosen : cuda_backend(); }

void set_device_backend_for_testing(DeviceBackend* b) { chosen = b; }

}  // namespace hma::detail

namespace hma {

DeviceInfo device_info() {
  DeviceInfo info;
  detail::DeviceBackend* be = detail::cuda_backend();
  info.built_with_cuda = be != nullptr;
  if (be == nullptr) {
    info.reason = "hma was built without CUDA (meson -Dcuda=disabled, or no CUDA Toolkit / nvcc "
                  "was found when it was configured)";
    return info;
  }
  try {
    info.devices = be->devices(info.reason);
  } catch (const std::exception& e) {
    info.devices = 0;
    info.reason = e.what();
  }
  return info;
}

}  // namespace hma
