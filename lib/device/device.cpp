// DeviceParamSet: device buckets, zero-copy arrays, registered user device arrays.
#include <algorithm>
#include <atomic>
#include <cstdio>

#include "buffer_common.hpp"
#include "support/mpi_library.hpp"
#include "hma/comm.hpp"
#include "hma/local_device.hpp"
#include "device/device_state.hpp"
#include "hma/device.hpp"
#include "hma/error.hpp"

namespace hma {

namespace detail {

void* device_storage(const DeviceBucket* b) noexcept { return b->storage; }

void DeviceState::tables() {
  for (DeviceBucket* b : {&f32, &f64}) {
    if (!b->dirty) continue;
    if (b->table != nullptr) {
      sync_stream();  // the last average's kernels, and the old table's upload, are done
      be->release_segments(b->table);
      b->table = nullptr;
    }
    b->segs.clear();
    if (b->owned > 0) b->segs.push_back(Segment{nullptr, 0, b->owned});
    std::size_t at = b->owned;
    for (auto& u : b->user) {
      u.at = at;
      at += u.n;
      if (u.n > 0) b->segs.push_back(u);
    }
    b->table = be->upload_segments(b->segs, stream);  // ordered before the kernels on `stream`
    b->dirty = false;
  }
}

void DeviceState::unpack_and_record() {
  for (DeviceBucket* b : {&f32, &f64})
    if (b->user_elems > 0) be->unpack(b->dtype, b->storage, b->table, b->segs, b->size(), stream);
  be->record(done, stream);
}

}  // namespace detail

namespace {
std::atomic<std::uint64_t> next_device_id{1};
}

DeviceParamSet::DeviceParamSet(int device) : s_(std::make_unique<detail::DeviceState>()) {
  detail::DeviceBackend* be = detail::device_backend();
  if (be == nullptr) throw Error("hma: DeviceParamSet: device buffers are unavailable: " + device_info().reason);
  std::string why;
  const int n = be->devices(why);
  if (n <= 0) throw Error("hma: DeviceParamSet: device buffers are unavailable: " + why);
  if (device < -1 || device >= n)
    throw InvalidArgument("hma: DeviceParamSet: device " + std::to_string(device) +
                          " does not exist (this process sees " + std::to_string(n) +
                          " device(s): 0.." + std::to_string(n - 1) + ", or -1 for the current one)");
  auto& s = *s_;
  s.be = be;
  s.device = device >= 0 ? device : be->current_device();
  s.id = next_device_id++;
  s.f32.dtype = Dtype::f32;
  s.f64.dtype = Dtype::f64;
  detail::DeviceGuard on_device(be, s.device);  // the caller's current device comes back
  s.stream = be->create_stream();
  s.stream_back = be->create_stream();
  s.ready = be->create_event();
  s.packed = be->create_event();
  s.done = be->create_event();
  s.flag = be->alloc_flag();
}

DeviceParamSet::DeviceParamSet(DeviceParamSet&&) noexcept = default;

DeviceParamSet& DeviceParamSet::operator=(DeviceParamSet&& o) noexcept {
  if (this != &o) {
    DeviceParamSet dying(std::move(*this));
    s_ = std::move(o.s_);
  }
  return *this;
}

DeviceParamSet::~DeviceParamSet() {
  if (!s_) return;
  auto& s = *s_;
  if (!detail::finish_quietly(s.pending)) {
    // MPI or a copy may still write into these buffers: leak them. What is already queued on
    // hma's stream up to the last completed average (its unpack into your arrays) still runs
    // now, so that nothing writes into your arrays after this destructor.
    try {
      detail::DeviceGuard on_device(s.be, s.device);
      s.be->synchronize(s.done);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "hma: ~DeviceParamSet: %s\n", e.what());
    }
    (void)s_.release();
    return;
  }
  std::unique_ptr<detail::DeviceGuard> on_device;
  try {
    on_device = std::make_unique<detail::DeviceGuard>(s.be, s.device);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma: ~DeviceParamSet: %s\n", e.what());
  }
  try {
    s.sync_stream();  // everything on hma's stream, the last table upload included, has run
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hma: ~DeviceParamSet: %s\n", e.what());
  }
  for (detail::DeviceBucket* b : {&s.f32, &s.f64}) {
    if (b->storage != nullptr) {
      if (b->exported) detail::park_exported(s.be, b->storage);  // peers may still map it
      else s.be->release(b->storage);
    }
    if (b->table != nullptr) s.be->release_segments(b->table);
  }
  s.be->destroy_stream(s.stream);
  s.be->destroy_stream(s.stream_back);
  for (detail::Event e : {s.ready, s.packed, s.done}) s.be->destroy_event(e);
  s.be->release_flag(s.flag);
}

detail::DeviceBucket* DeviceParamSet::bucket(Dtype d) noexcept { return &s_->bucket(d); }

void DeviceParamSet::check_mutable(const char* what) const {
  detail::check_not_in_flight(in_flight(), std::string("DeviceParamSet::") + what);
}

namespace {
// Grows the bucket's storage to hold `need` elements, keeping the owned region.
void grow(detail::DeviceState& s, detail::DeviceBucket& b, std::size_t need) {
  if (need <= b.capacity) return;
  const std::size_t cap = std::max(need, b.capacity * 2);
  void* fresh = s.be->alloc(cap * b.elem());
  if (b.storage != nullptr) {
    s.be->synchronize(s.done);  // the last average may still use it
    if (b.owned > 0) {
      s.be->copy(fresh, b.storage, b.owned * b.elem(), s.stream);
      s.sync_stream();
    }
    if (b.exported) detail::park_exported(s.be, b.storage);  // the node transport's peers may map it
    else s.be->release(b.storage);
  }
  b.storage = fresh;
  b.capacity = cap;
  b.exported = false;
}
}  // namespace

std::size_t DeviceParamSet::allocate_bytes(Dtype d, std::size_t n, double init) {
  check_mutable("allocate");
  auto& s = *s_;
  auto& b = s.bucket(d);
  detail::check_buffer_size(n, b.size(), b.elem(), "DeviceParamSet::allocate");
  detail::DeviceGuard on_device(s.be, s.device);
  grow(s, b, b.size() + n);
  const std::size_t offset = b.owned;
  if (n > 0) {
    s.be->fill(d, static_cast<char*>(b.storage) + b.owned * b.elem(), n, init, s.stream);
    s.sync_stream();
  }
  b.owned += n;
  b.dirty = true;
  s.layout.push_back({0, d, n});
  ++s.version;
  return offset;
}

void DeviceParamSet::add_bytes(Dtype d, void* p, std::size_t n) {
  check_mutable("add");
  auto& s = *s_;
  auto& b = s.bucket(d);
  detail::check_buffer_size(n, b.size(), b.elem(), "DeviceParamSet::add");
  if (p == nullptr && n > 0)
    throw InvalidArgument("hma: DeviceParamSet::add: the array has a null data pointer but a non-zero size");
  detail::DeviceGuard on_device(s.be, s.device);
  if (n > 0 && !s.be->maybe_device_pointer(p))
    throw InvalidArgument("hma: DeviceParamSet::add: the pointer is host memory, not device memory "
                          "(use hma::ParamSet for host arrays)");
  if (const int pd = n > 0 ? s.be->pointer_device(p) : -1;
      pd >= 0 && pd != s.device && !s.be->can_access_peer(s.device, pd))
    throw InvalidArgument("hma: DeviceParamSet::add: the array is memory of device " + std::to_string(pd) +
                          ", this set's kernels run on device " + std::to_string(s.device) +
                          ", and device " + std::to_string(s.device) + " has no peer access to device " +
                          std::to_string(pd) + "; register it in a set on device " + std::to_string(pd));
  const std::size_t bytes = n * b.elem();
  if (const auto i = b.user_ranges.overlapping(p, bytes))
    throw InvalidArgument("hma: DeviceParamSet::add: the array overlaps user array #" +
                          std::to_string(*i) + " of the same dtype already registered; each "
                          "element may be averaged once");
  if (detail::overlaps(p, bytes, b.storage, b.capacity * b.elem()))
    throw InvalidArgument("hma: DeviceParamSet::add: the array lies inside hma's own buffer (a "
                          "DeviceArray from allocate() is averaged already; do not add() it)");
  grow(s, b, b.size() + n);
  b.user.push_back(detail::Segment{p, 0, n});
  b.user_ranges.insert(p, bytes, b.user.size() - 1);
  b.user_elems += n;
  b.dirty = true;
  s.layout.push_back({1, d, n});
  ++s.version;
}

std::size_t DeviceParamSet::count(Dtype d) const noexcept {
  return d == Dtype::f32 || d == Dtype::f64 ? s_->bucket(d).size() : 0;  // device sets: no 16-bit arrays
}
std::size_t DeviceParamSet::bytes() const noexcept { return s_->f32.size() * 4 + s_->f64.size() * 8; }
std::size_t DeviceParamSet::arrays() const noexcept { return s_->layout.size(); }
int DeviceParamSet::device() const noexcept { return s_->device; }
bool DeviceParamSet::in_flight() const noexcept { return s_->pending && !s_->pending->done; }

void DeviceParamSet::wait() {
  if (in_flight()) s_->pending->wait();
}

void DeviceParamSet::synchronize() {
  wait();
  detail::DeviceGuard on_device(s_->be, s_->device);
  s_->be->synchronize(s_->done);
}

void DeviceParamSet::set_pending(std::shared_ptr<detail::InFlight> p) noexcept { s_->pending = std::move(p); }

std::uint64_t DeviceParamSet::id() const noexcept { return s_->id; }
std::uint64_t DeviceParamSet::layout_version() const noexcept { return s_->version; }

std::uint64_t DeviceParamSet::layout_fingerprint() const noexcept {
  return detail::layout_fingerprint(s_->layout, 0xDE71CE);
}

std::string DeviceParamSet::describe() const {
  return std::to_string(s_->layout.size()) + " device arrays on device " +
         std::to_string(s_->device) + " (" + s_->be->name() + "): " +
         detail::describe_bucket("f32", s_->f32.owned, s_->f32.user_elems) + ", " +
         detail::describe_bucket("f64", s_->f64.owned, s_->f64.user_elems);
}

int use_local_device(MPI_Comm comm) {
  detail::require_mpi("use_local_device");
  // The split is collective: every rank does it before any rank can fail.
  const int local = Comm::attach(comm).split_shared().rank();
  detail::DeviceBackend* be = detail::device_backend();
  if (be == nullptr) throw Error("hma: use_local_device: device buffers are unavailable: " + device_info().reason);
  std::string why;
  const int n = be->devices(why);
  if (n <= 0) throw Error("hma: use_local_device: device buffers are unavailable: " + why);
  const int d = local % n;
  be->set_device(d);
  return d;
}

}  // namespace hma
