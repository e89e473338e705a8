// hma/device.hpp: averaging buffers that live in CUDA device memory.
//
// A DeviceParamSet is the device twin of ParamSet: one contiguous device buffer per dtype,
// zero-copy arrays that hma allocates (`allocate<T>(n)`) and your own device arrays (`add()`),
// packed and unpacked by ONE kernel launch per dtype however many arrays there are, with the
// division by the group size folded into the pack. The Averager's step()/start()/average()
// overloads that take a DeviceParamSet and a CUDA stream move it through MPI on one of three
// paths (see DevicePath and README "Device buffers"), chosen per MPI at construction and logged:
//   direct  device pointers straight to MPI (needs a CUDA-aware MPI)
//   staged  chunks copied through pinned host memory, pipelined with the host reductions
// This header needs no CUDA header: hma::Stream is cudaStream_t.
// Built without CUDA (meson -Dcuda=disabled, or no CUDA Toolkit found), everything here still
// compiles and links; constructing a DeviceParamSet then throws hma::Error saying so, and
// device_info() says why.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "hma/buffer.hpp"

struct CUstream_st;  // CUDA's own declaration: cudaStream_t is CUstream_st*

namespace hma {

/// A CUDA stream (cudaStream_t). nullptr is the legacy default stream.
using Stream = CUstream_st*;

/// What this process can do with device buffers. Never throws.
struct DeviceInfo {
  bool built_with_cuda = false;  ///< hma was compiled with its CUDA parts
  int devices = 0;               ///< CUDA devices visible to this process
  std::string reason;            ///< why device buffers are unavailable (empty when they are)
  [[nodiscard]] bool available() const noexcept { return built_with_cuda && devices > 0; }
};
[[nodiscard]] DeviceInfo device_info();

namespace detail {
struct DeviceBucket;
struct DeviceState;
struct InFlight;
void* device_storage(const DeviceBucket* b) noexcept;
}  // namespace detail

/// A handle to an array inside a DeviceParamSet's device buffer (zero-copy). `data()` is a
/// DEVICE pointer: use it in your kernels, never dereference it on the host. The handle stays
/// valid for the set's life; the raw pointer only until the next allocate()/add() of the same
/// dtype (which may move the buffer).
template <Element T>
class DeviceArray {
 public:
  DeviceArray() = default;
  [[nodiscard]] T* data() const noexcept {
    return bucket_ != nullptr ? static_cast<T*>(detail::device_storage(bucket_)) + offset_ : nullptr;
  }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t size_bytes() const noexcept { return size_ * sizeof(T); }

 private:
  friend class DeviceParamSet;
  DeviceArray(detail::DeviceBucket* b, std::size_t off, std::size_t n) : bucket_(b), offset_(off), size_(n) {}
  detail::DeviceBucket* bucket_ = nullptr;
  std::size_t offset_ = 0, size_ = 0;
};

/// The device arrays one averager averages together. Two ways to register arrays, freely mixed:
/// - `allocate<T>(n)`: zero-copy. hma owns the device memory; compute in place through
///   DeviceArray::data().
/// - `add(T* device_ptr, n)`: your device memory stays yours; each average packs it (scaled) into
///   hma's buffer with one kernel and unpacks the result with another.
/// Every rank must register the same arrays (sizes, dtypes, kinds, order): checked collectively
/// at the first average after a change (hma::MismatchError). Registering while an average is in
/// flight throws hma::Error. Not thread safe. Memory is allocated on `device` (or the device
/// current at construction); hma makes that device current in its own calls.
/// Construction throws hma::Error when hma was built without CUDA or no device is visible (the
/// message says which; see device_info()). Initialise MPI before constructing one. A moved-from
/// DeviceParamSet may only be destroyed or assigned to.
class DeviceParamSet {
 public:
  /// `device`: CUDA device ordinal, or -1 for the device current in this thread.
  explicit DeviceParamSet(int device = -1);
  DeviceParamSet(DeviceParamSet&&) noexcept;
  DeviceParamSet& operator=(DeviceParamSet&&) noexcept;
  DeviceParamSet(const DeviceParamSet&) = delete;
  DeviceParamSet& operator=(const DeviceParamSet&) = delete;
  /// Waits for an in-flight average first (MPI and the copies still use the buffers).
  ~DeviceParamSet();

  /// Zero-copy: a new device array of `n` elements, each set to `init` (done when this returns).
  template <Element T>
  DeviceArray<T> allocate(std::size_t n, T init = T(0));
  /// Pack/unpack: registers your device array of `n` elements (it must outlive the set's
  /// averages). Throws hma::InvalidArgument for a null pointer with n > 0, host memory (when
  /// CUDA can tell), or an overlap with an array already registered.
  template <Element T>
  void add(T* device_ptr, std::size_t n);

  [[nodiscard]] std::size_t count(Dtype d) const noexcept;
  [[nodiscard]] std::size_t bytes() const noexcept;
  [[nodiscard]] std::size_t arrays() const noexcept;
  [[nodiscard]] int device() const noexcept;
  /// True while a non-blocking average of this set has not completed on the host side.
  [[nodiscard]] bool in_flight() const noexcept;
  /// Completes this set's in-flight average, if any (like Request::wait()).
  void wait();
  /// Blocks the HOST until the last average's results are in the device arrays (an event wait
  /// on hma's stream, never cudaDeviceSynchronize). Your streams are already ordered after it
  /// by wait(); call this only when host code reads the arrays.
  void synchronize();
  [[nodiscard]] std::uint64_t id() const noexcept;
  [[nodiscard]] std::uint64_t layout_fingerprint() const noexcept;
  [[nodiscard]] std::uint64_t layout_version() const noexcept;
  /// E.g. "2 device arrays on device 0: f32 1000 (zero-copy 1000, packed 0), f64 0 (...)".
  [[nodiscard]] std::string describe() const;

  // Used by the averager; not for users.
  detail::DeviceState& state() noexcept { return *s_; }
  void set_pending(std::shared_ptr<detail::InFlight> p) noexcept;

 private:
  void check_mutable(const char* what) const;
  // Returns the new array's offset in its bucket.
  std::size_t allocate_bytes(Dtype d, std::size_t n, double init);
  void add_bytes(Dtype d, void* p, std::size_t n);
  detail::DeviceBucket* bucket(Dtype d) noexcept;
  std::unique_ptr<detail::DeviceState> s_;
};

template <Element T>
DeviceArray<T> DeviceParamSet::allocate(std::size_t n, T init) {
  const std::size_t off = allocate_bytes(dtype_of<T>(), n, static_cast<double>(init));
  return DeviceArray<T>(bucket(dtype_of<T>()), off, n);
}

template <Element T>
void DeviceParamSet::add(T* device_ptr, std::size_t n) {
  add_bytes(dtype_of<T>(), device_ptr, n);
}

}  // namespace hma
