#include "hma/buffer.hpp"

#include <atomic>
#include <cstdio>
#include <utility>

#include "hma/error.hpp"
#include "buffer_common.hpp"
#include "half.hpp"
#include "in_flight.hpp"

namespace hma {

const char* dtype_name(Dtype d) noexcept {
  switch (d) {
    case Dtype::f32: return "f32";
    case Dtype::f64: return "f64";
    case Dtype::bf16: return "bf16";
    case Dtype::fp16: return "fp16";
  }
  return "?";
}
std::size_t dtype_size(Dtype d) noexcept {
  switch (d) {
    case Dtype::f32: return 4;
    case Dtype::f64: return 8;
    case Dtype::bf16:
    case Dtype::fp16: return 2;
  }
  return 0;
}

bf16 bf16::from(float x) noexcept { return bf16{detail::to_bf16(x)}; }
float bf16::to_float() const noexcept { return detail::from_bf16(bits); }
fp16 fp16::from(float x) noexcept { return fp16{detail::to_fp16(x)}; }
float fp16::to_float() const noexcept { return detail::from_fp16(bits); }

namespace {
std::atomic<std::uint64_t> next_id{1};
}  // namespace


using detail::finish_quietly;

ParamSet::ParamSet()
    : f32_(std::make_unique<detail::Bucket<float>>()),
      f64_(std::make_unique<detail::Bucket<double>>()),
      b16_(std::make_unique<detail::Bucket<bf16>>()),
      h16_(std::make_unique<detail::Bucket<fp16>>()),
      id_(next_id++) {}

ParamSet::ParamSet(ParamSet&& o) noexcept
    : f32_(std::move(o.f32_)),
      f64_(std::move(o.f64_)),
      b16_(std::move(o.b16_)),
      h16_(std::move(o.h16_)),
      layout_(std::move(o.layout_)),
      fingerprint_(std::exchange(o.fingerprint_, detail::kLayoutSeed)),
      version_(o.version_),
      id_(o.id_),
      pending_(std::move(o.pending_)) {
  if (pending_) pending_->params = this;
  o.f32_ = std::make_unique<detail::Bucket<float>>();
  o.f64_ = std::make_unique<detail::Bucket<double>>();
  o.b16_ = std::make_unique<detail::Bucket<bf16>>();
  o.h16_ = std::make_unique<detail::Bucket<fp16>>();
  o.id_ = next_id++;
}

ParamSet& ParamSet::operator=(ParamSet&& o) noexcept {
  if (this == &o) return *this;
  if (!finish_quietly(pending_)) {
    (void)f32_.release();
    (void)f64_.release();
    (void)b16_.release();
    (void)h16_.release();
  }
  f32_ = std::move(o.f32_);
  f64_ = std::move(o.f64_);
  b16_ = std::move(o.b16_);
  h16_ = std::move(o.h16_);
  layout_ = std::move(o.layout_);
  fingerprint_ = std::exchange(o.fingerprint_, detail::kLayoutSeed);
  version_ = o.version_;
  id_ = o.id_;
  pending_ = std::move(o.pending_);
  if (pending_) pending_->params = this;
  o.f32_ = std::make_unique<detail::Bucket<float>>();
  o.f64_ = std::make_unique<detail::Bucket<double>>();
  o.b16_ = std::make_unique<detail::Bucket<bf16>>();
  o.h16_ = std::make_unique<detail::Bucket<fp16>>();
  o.layout_.clear();
  o.id_ = next_id++;
  return *this;
}

ParamSet::~ParamSet() {
  if (!finish_quietly(pending_)) {
    (void)f32_.release();  // deliberately leaked: see InFlight::settle
    (void)f64_.release();
    (void)b16_.release();
    (void)h16_.release();
  }
}

void ParamSet::wait() {
  if (pending_ && !pending_->done) pending_->wait();
}

bool ParamSet::in_flight() const noexcept { return pending_ && !pending_->done; }

void ParamSet::set_pending(std::shared_ptr<detail::InFlight> p) noexcept { pending_ = std::move(p); }

void ParamSet::drop_finished() noexcept {
  if (pending_ && pending_->done) pending_.reset();
}

void detail::check_not_in_flight(bool in_flight, const std::string& who) {
  if (in_flight)
    throw Error("hma: " + who + " while an average of this set is in flight: wait() on its Request first");
}

void ParamSet::check_mutable(const char* what) const {
  detail::check_not_in_flight(in_flight(), std::string("ParamSet::") + what);
}

void detail::check_buffer_size(std::size_t n, std::size_t have, std::size_t elem, const std::string& who) {
  constexpr std::size_t kMaxBytes = std::size_t{1} << 48;
  if (n > kMaxBytes / elem || have + n > kMaxBytes / elem)
    throw InvalidArgument("hma: " + who + ": " + std::to_string(n) + " elements of " +
                          std::to_string(elem) +
                          " bytes would make the buffer larger than 2^48 bytes (a negative size "
                          "converted to size_t?)");
}

void ParamSet::check_size(std::size_t n, std::size_t have, std::size_t elem, const char* what) {
  detail::check_buffer_size(n, have, elem, std::string("ParamSet::") + what);
}

void ParamSet::throw_null_span() {
  throw InvalidArgument("hma: ParamSet::add: the array has a null data pointer but a non-zero size");
}

void ParamSet::throw_not_contiguous(std::size_t i, std::size_t n) {
  throw InvalidArgument("hma: ParamSet::add: the range (" + std::to_string(n) +
                        " elements) is not contiguous: element " + std::to_string(i) +
                        " does not lie at data() + " + std::to_string(i) +
                        " (a strided view, e.g. a matrix row?); pass contiguous memory, hma "
                        "averages it in place");
}

void ParamSet::overlap_error(std::size_t index) {
  if (index == static_cast<std::size_t>(-1))
    throw InvalidArgument("hma: ParamSet::add: the array lies inside hma's own buffer (an Array "
                          "from allocate() is averaged already; do not add() it)");
  throw InvalidArgument("hma: ParamSet::add: the array overlaps user array #" +
                        std::to_string(index) +
                        " of the same dtype already registered; each element may be averaged once");
}

std::size_t ParamSet::count(Dtype d) const noexcept {
  switch (d) {
    case Dtype::f32: return f32_->size();
    case Dtype::f64: return f64_->size();
    case Dtype::bf16: return b16_->size();
    case Dtype::fp16: return h16_->size();
  }
  return 0;
}

std::size_t ParamSet::bytes() const noexcept {
  return f32_->size() * 4 + f64_->size() * 8 + (b16_->size() + h16_->size()) * 2;
}

namespace {
std::uint64_t fold_word(std::uint64_t h, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= 0x100000001b3ULL;
  }
  return h;
}

std::uint64_t fold_layout(std::uint64_t h, const detail::LayoutEntry& e) noexcept {
  h = fold_word(h, e.kind);
  h = fold_word(h, static_cast<std::uint64_t>(e.dtype));
  return fold_word(h, e.n);
}
}  // namespace

std::uint64_t detail::layout_fingerprint(std::span<const LayoutEntry> entries, std::uint64_t marker) {
  std::uint64_t h = kLayoutSeed;
  if (marker != 0) h = fold_word(h, marker);
  for (const auto& e : entries) h = fold_layout(h, e);
  return h;
}

void ParamSet::record(detail::LayoutEntry e) {
  layout_.push_back(e);
  fingerprint_ = fold_layout(fingerprint_, e);
  ++version_;
}

std::string detail::describe_bucket(const char* name, std::size_t owned, std::size_t user) {
  return std::string(name) + " " + std::to_string(owned + user) + " (zero-copy " +
         std::to_string(owned) + ", packed " + std::to_string(user) + ")";
}

std::uint64_t ParamSet::layout_fingerprint() const noexcept { return fingerprint_; }

std::string ParamSet::describe() const {
  std::string s = std::to_string(layout_.size()) + " arrays: " +
                  detail::describe_bucket("f32", f32_->owned, f32_->user_elems) + ", " +
                  detail::describe_bucket("f64", f64_->owned, f64_->user_elems);
  if (b16_->size() > 0) s += ", " + detail::describe_bucket("bf16", b16_->owned, b16_->user_elems);
  if (h16_->size() > 0) s += ", " + detail::describe_bucket("fp16", h16_->owned, h16_->user_elems);
  return s;
}

}  // namespace hma
