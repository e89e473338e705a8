// hma/buffer.hpp: the contiguous per-dtype buffers that hma averages.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <ranges>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace hma {

/// bfloat16 and IEEE half precision (binary16) elements, as bit patterns (the layout of
/// torch.bfloat16 / torch.float16 and CUDA's __nv_bfloat16 / __half). A ParamSet averages them
/// with f32 arithmetic and 16-bit results (README "Beyond torch's averagers"). Conversions
/// round to nearest even; fp16 overflows (|x| >= 65520) to infinity.
struct bf16 {
  std::uint16_t bits = 0;
  [[nodiscard]] static bf16 from(float x) noexcept;
  [[nodiscard]] float to_float() const noexcept;
  friend bool operator==(bf16, bf16) = default;
};
struct fp16 {
  std::uint16_t bits = 0;
  [[nodiscard]] static fp16 from(float x) noexcept;
  [[nodiscard]] float to_float() const noexcept;
  friend bool operator==(fp16, fp16) = default;
};

/// Element types hma averages. Each has its own bucket: mixed dtypes are never promoted
/// (unlike torch.cat in torch's average_parameters, which would upcast). Device sets hold f32
/// and f64 only.
enum class Dtype : std::uint8_t { f32 = 0, f64 = 1, bf16 = 2, fp16 = 3 };
inline constexpr std::size_t kNumDtypes = 4;

/// The types hma computes in (every transport): f32 and f64.
template <class T>
concept Element = std::same_as<T, float> || std::same_as<T, double>;
/// The 16-bit types a ParamSet stores.
template <class T>
concept Half = std::same_as<T, bf16> || std::same_as<T, fp16>;
/// Every type a ParamSet stores.
template <class T>
concept Storable = Element<T> || Half<T>;

template <Storable T>
constexpr Dtype dtype_of() noexcept {
  if constexpr (std::same_as<T, float>) return Dtype::f32;
  else if constexpr (std::same_as<T, double>) return Dtype::f64;
  else if constexpr (std::same_as<T, bf16>) return Dtype::bf16;
  else return Dtype::fp16;
}
/// A writable array ParamSet::add takes whole, whose elements are Storable:
/// - a contiguous range (`std::ranges::contiguous_range` and sized: std::vector, std::array,
///   std::span, a C array, ...), or
/// - a sized random-access range with a `data()` member (an Eigen 3.4 vector or segment, whose
///   iterators are not contiguous ones): add() checks at run time that element i lies at
///   data() + i, and refuses a strided one (an Eigen matrix row) with hma::InvalidArgument.
/// Ranges of const elements are not accepted (hma writes the average back), nor temporaries
/// that own their elements (a std::vector returned by value: hma keeps the address); views that
/// do not own them (std::span) may be temporaries.
template <class R>
concept AddableRange =
    std::ranges::random_access_range<R> && std::ranges::sized_range<R> &&
    Storable<std::ranges::range_value_t<R>> &&
    std::same_as<std::ranges::range_reference_t<R>, std::ranges::range_value_t<R>&> &&
    (std::ranges::contiguous_range<R> ||
     requires(R& r) {
       { r.data() } -> std::same_as<std::ranges::range_value_t<R>*>;
     }) &&
    (std::is_lvalue_reference_v<R> || std::ranges::borrowed_range<R>);

[[nodiscard]] const char* dtype_name(Dtype d) noexcept;
[[nodiscard]] std::size_t dtype_size(Dtype d) noexcept;

namespace detail {
struct InFlight;
/// True when the byte ranges [a, a + abytes) and [b, b + bbytes) share a byte (empty ranges
/// never do).
inline bool overlaps(const void* a, std::size_t abytes, const void* b, std::size_t bbytes) noexcept {
  const auto x = reinterpret_cast<std::uintptr_t>(a), y = reinterpret_cast<std::uintptr_t>(b);
  return abytes > 0 && bbytes > 0 && x < y + bbytes && y < x + abytes;
}
/// The byte ranges of the arrays registered so far, disjoint, sorted by start: an overlap test
/// and an insertion each cost O(log n), so registering n arrays costs O(n log n).
class IntervalSet {
 public:
  /// The index given to the registered range that shares a byte with [p, p + bytes), if any
  /// (empty ranges never overlap).
  [[nodiscard]] std::optional<std::size_t> overlapping(const void* p, std::size_t bytes) const {
    if (bytes == 0) return std::nullopt;
    const auto x = reinterpret_cast<std::uintptr_t>(p);
    // The range with the greatest start below our end has the greatest end of those that start
    // below it (the ranges are disjoint): it is the only one that can reach past x.
    auto it = starts_.lower_bound(x + bytes);
    if (it == starts_.begin()) return std::nullopt;
    --it;
    if (it->second.end > x) return it->second.index;
    return std::nullopt;
  }
  /// Records [p, p + bytes) as range `index`; it must not overlap a registered one.
  void insert(const void* p, std::size_t bytes, std::size_t index) {
    if (bytes == 0) return;
    const auto x = reinterpret_cast<std::uintptr_t>(p);
    starts_.emplace(x, Range{x + bytes, index});
  }

 private:
  struct Range {
    std::uintptr_t end;
    std::size_t index;
  };
  std::map<std::uintptr_t, Range> starts_;
};
/// One registered array of a ParamSet or DeviceParamSet, for the layout fingerprint.
struct LayoutEntry {
  std::uint8_t kind;  // 0 owned (zero-copy), 1 user (packed)
  Dtype dtype;
  std::size_t n;
};
/// Where layout fingerprints start (FNV-1a's offset basis).
inline constexpr std::uint64_t kLayoutSeed = 0xcbf29ce484222325ULL;
/// One contiguous buffer of one dtype: [hma-owned arrays | staging for user arrays].
template <Storable T>
struct Bucket {
  std::vector<T> storage;
  std::size_t owned = 0;                // elements of hma-owned (zero-copy) arrays, at the front
  std::vector<std::span<T>> user;       // user arrays packed into storage[owned ...]
  IntervalSet user_ranges;              // their bytes, for the overlap check at registration
  std::size_t user_elems = 0;
  std::vector<T> send;                  // poll-mode start(): the scaled copy MPI sends from
  std::vector<T> recv;                  // two-level: this rank's reduced block
  [[nodiscard]] std::size_t size() const noexcept { return owned + user_elems; }
};
}  // namespace detail

/// A handle to an array that lives inside hma's contiguous buffer (zero-copy mode): averaging
/// reads and writes it in place, with no packing. The handle stays valid for the ParamSet's
/// life (also when the ParamSet is moved); the raw pointer from `data()` or `span()` is only
/// valid until the next `allocate()` or `add()` of the same dtype on that ParamSet, which may
/// move the storage.
template <Storable T>
class Array {
 public:
  Array() = default;
  [[nodiscard]] T* data() const noexcept {
    return bucket_ != nullptr ? bucket_->storage.data() + offset_ : nullptr;
  }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::span<T> span() const noexcept { return {data(), size_}; }
  T& operator[](std::size_t i) const noexcept { return data()[i]; }
  T* begin() const noexcept { return data(); }
  T* end() const noexcept { return data() + size_; }

 private:
  friend class ParamSet;
  Array(detail::Bucket<T>* b, std::size_t off, std::size_t n) : bucket_(b), offset_(off), size_(n) {}
  detail::Bucket<T>* bucket_ = nullptr;
  std::size_t offset_ = 0, size_ = 0;
};

/// The set of arrays one averager averages together: the model's parameters, a simulation's
/// state. Two ways to register arrays, freely mixed:
/// - `allocate<T>(n)`: zero-copy. hma owns the memory; you compute in place through the Array.
/// - `add(std::span<T>)`: pack/unpack. Your memory stays yours; each average copies it into
///   hma's buffer (dividing by the group size on the way), reduces, and copies the result back.
/// Each dtype is one contiguous buffer and one MPI reduction per average.
/// Every rank must register the same arrays (sizes, dtypes, kinds, order): the averager checks
/// this collectively at the first average after any change and throws hma::MismatchError.
/// Not thread safe. Registering while an average is in flight throws hma::Error.
class ParamSet {
 public:
  ParamSet();
  ParamSet(ParamSet&&) noexcept;
  ParamSet& operator=(ParamSet&&) noexcept;
  ParamSet(const ParamSet&) = delete;
  ParamSet& operator=(const ParamSet&) = delete;
  ~ParamSet();

  /// Zero-copy: a new hma-owned array of `n` elements, each set to `init`. T: float, double,
  /// hma::bf16 or hma::fp16.
  template <Storable T>
  Array<T> allocate(std::size_t n, T init = T{});
  /// Pack/unpack: registers the caller's array; it must outlive the ParamSet's averages. Throws
  /// hma::InvalidArgument for a null pointer with n > 0, or an array that overlaps one already
  /// registered (or hma's own buffer).
  template <Storable T>
  void add(std::span<T> user) { add(user.data(), user.size()); }
  /// The same, for `n` elements at `data` (a Kokkos host View: `add(v.data(), v.size())`).
  template <Storable T>
  void add(T* data, std::size_t n);
  template <Storable T>
  void add(std::vector<T>& user) { add(user.data(), user.size()); }
  /// The same, for any AddableRange (std::array, a C array, an Eigen vector, ...). A const
  /// range, or a temporary that owns its elements, does not compile.
  template <class R>
    requires AddableRange<R&&>
  void add(R&& range);

  /// Elements of dtype `d` (owned plus user), i.e. the length of that contiguous buffer.
  [[nodiscard]] std::size_t count(Dtype d) const noexcept;
  /// Bytes averaged per average, all dtypes.
  [[nodiscard]] std::size_t bytes() const noexcept;
  /// Number of registered arrays, all kinds.
  [[nodiscard]] std::size_t arrays() const noexcept { return layout_.size(); }
  /// True while a non-blocking average on this set has not been completed. Destroying a ParamSet
  /// with an average in flight first waits for that average (MPI still writes its buffer).
  [[nodiscard]] bool in_flight() const noexcept;
  /// Completes this set's in-flight average, if any (after step() threw hma::Timeout, this keeps
  /// waiting; it may throw hma::Timeout again). A no-op when nothing is in flight.
  void wait();
  /// Unique per ParamSet in this process (kept when moved).
  [[nodiscard]] std::uint64_t id() const noexcept { return id_; }
  /// Hash of the layout (per array: kind, dtype, length, in order); equal on all ranks.
  [[nodiscard]] std::uint64_t layout_fingerprint() const noexcept;
  /// Incremented by every allocate/add.
  [[nodiscard]] std::uint64_t layout_version() const noexcept { return version_; }
  /// Human summary, e.g. "3 arrays: f32 1000 (zero-copy 1000, packed 0), f64 0".
  [[nodiscard]] std::string describe() const;

  /// Elements of the 16-bit types (bf16 and fp16), which averages handle apart from f32/f64.
  [[nodiscard]] std::size_t count16() const noexcept { return b16_->size() + h16_->size(); }

  // Used by the averager; not for users.
  template <Storable T>
  detail::Bucket<T>& bucket() noexcept;
  void set_pending(std::shared_ptr<detail::InFlight> p) noexcept;
  void drop_finished() noexcept;  // lets go of a finished average's record

 private:
  void check_mutable(const char* what) const;
  // A new array in the layout: its entry, the fingerprint folded over it, the version.
  void record(detail::LayoutEntry e);
  // Throws hma::InvalidArgument when a bucket would exceed 2^48 bytes (an overflowed size_t,
  // a negative int cast to size_t, ...), instead of std::length_error deep in std::vector.
  static void check_size(std::size_t n, std::size_t have, std::size_t elem, const char* what);
  // Throws hma::InvalidArgument if [p, p + bytes) overlaps a registered user array or hma's own
  // buffer: averaging it twice would silently give wrong values.
  template <Storable T>
  void check_no_overlap(const T* p, std::size_t bytes, const detail::IntervalSet& user,
                        const std::vector<T>& storage) const {
    if (const auto i = user.overlapping(p, bytes)) overlap_error(*i);
    if (detail::overlaps(p, bytes, storage.data(), storage.size() * sizeof(T)))
      overlap_error(static_cast<std::size_t>(-1));
  }
  [[noreturn]] static void overlap_error(std::size_t index);
  [[noreturn]] static void throw_null_span();
  [[noreturn]] static void throw_not_contiguous(std::size_t i, std::size_t n);
  std::unique_ptr<detail::Bucket<float>> f32_;
  std::unique_ptr<detail::Bucket<double>> f64_;
  std::unique_ptr<detail::Bucket<bf16>> b16_;
  std::unique_ptr<detail::Bucket<fp16>> h16_;
  std::vector<detail::LayoutEntry> layout_;
  std::uint64_t fingerprint_ = detail::kLayoutSeed;  // of layout_, kept as it grows
  std::uint64_t version_ = 0;
  std::uint64_t id_ = 0;
  std::shared_ptr<detail::InFlight> pending_;
};

template <>
inline detail::Bucket<float>& ParamSet::bucket<float>() noexcept { return *f32_; }
template <>
inline detail::Bucket<double>& ParamSet::bucket<double>() noexcept { return *f64_; }
template <>
inline detail::Bucket<bf16>& ParamSet::bucket<bf16>() noexcept { return *b16_; }
template <>
inline detail::Bucket<fp16>& ParamSet::bucket<fp16>() noexcept { return *h16_; }

template <Storable T>
Array<T> ParamSet::allocate(std::size_t n, T init) {
  check_mutable("allocate");
  auto& b = bucket<T>();
  check_size(n, b.size(), sizeof(T), "allocate");
  const std::size_t off = b.owned;
  b.storage.resize(b.owned + n + b.user_elems);
  std::fill(b.storage.begin() + static_cast<std::ptrdiff_t>(off),
            b.storage.begin() + static_cast<std::ptrdiff_t>(off + n), init);
  b.owned += n;
  record(detail::LayoutEntry{0, dtype_of<T>(), n});
  return Array<T>(&b, off, n);
}

template <Storable T>
void ParamSet::add(T* data, std::size_t n) {
  check_mutable("add");
  auto& b = bucket<T>();
  check_size(n, b.size(), sizeof(T), "add");
  if (data == nullptr && n != 0)
    throw_null_span();
  const std::span<T> user(data, n);
  check_no_overlap(user.data(), user.size_bytes(), b.user_ranges, b.storage);
  b.user.push_back(user);
  b.user_ranges.insert(user.data(), user.size_bytes(), b.user.size() - 1);
  b.user_elems += user.size();
  b.storage.resize(b.owned + b.user_elems);
  record(detail::LayoutEntry{1, dtype_of<T>(), user.size()});
}

template <class R>
  requires AddableRange<R&&>
void ParamSet::add(R&& range) {
  using T = std::ranges::range_value_t<R>;
  const std::size_t n = static_cast<std::size_t>(std::ranges::size(range));
  T* data = nullptr;
  if constexpr (std::ranges::contiguous_range<R>) {
    data = std::ranges::data(range);
  } else {
    // Random access with data(): the elements must lie one after the other from data().
    data = range.data();
    auto it = std::ranges::begin(range);
    for (std::size_t i = 0; i < n; ++i, ++it)
      if (std::addressof(*it) != data + i) throw_not_contiguous(i, n);
  }
  add(data, n);
}

}  // namespace hma
