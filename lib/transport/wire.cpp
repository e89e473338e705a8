#include "transport/wire.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <memory>

#include "support/mpi_static.hpp"
#include "support/timeline.hpp"
#include "transport/allreduce.hpp"
#include "transport/elements.hpp"
#include "transport/post.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

namespace {

template <Wire W>
void sum16(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const std::uint16_t*>(in);
  auto* b = static_cast<std::uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = Format<W>::add(a[i], b[i]);
}

MPI_Op make_op(MPI_User_function* fn) {
  MPI_Op op = MPI_OP_NULL;
  check(MPI_Op_create(fn, 1, &op), "MPI_Op_create(16-bit sum)");
  free_at_finalize(op, MPI_DATATYPE_NULL);
  return op;
}

// A rank's term x / g (or x * its weight factor) computed in double and rounded to 16 bits once
// (to odd through float), as the README's bound assumes.
inline double term(double x, const Route& route) {
  return route.weight >= 0 ? x * route.weight : x / static_cast<double>(route.group);
}

// [lo, hi) of the bucket as 16-bit terms into out[0, hi - lo).
template <class F, Element T>
void narrow(Bucket<T>& b, std::size_t lo, std::size_t hi, const Route& route, F, std::uint16_t* out) {
  const T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, const T* user, std::size_t n) {
    const T* x = user != nullptr ? user : data + at;
    std::uint16_t* o = out + (at - lo);
    for (std::size_t i = 0; i < n; ++i) o[i] = F::to(round_to_odd(term(static_cast<double>(x[i]), route)));
  });
}

// in[0, hi - lo) widened into [lo, hi) of the bucket (owned region and user arrays).
template <class F, Element T>
void widen(Bucket<T>& b, std::size_t lo, std::size_t hi, F, const std::uint16_t* in) {
  T* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, T* user, std::size_t n) {
    T* x = user != nullptr ? user : data + at;
    const std::uint16_t* w = in + (at - lo);
    for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(F::from(w[i]));
  });
}

template <class F, Element T>
void blocking_bucket(Bucket<T>& b, const Route& route, F c) {
  const MPI_Op op = wire_sum_op(route.wire);
  const std::size_t piece = piece_elems(route.chunk_bytes, sizeof(std::uint16_t), max_count());
  std::vector<std::uint16_t> buf(std::min(piece, b.size()));
  for (std::size_t lo = 0; lo < b.size(); lo += piece) {
    const std::size_t hi = std::min(lo + piece, b.size());
    if (route.post) route.post->before(b, lo, hi);
    narrow(b, lo, hi, route, c, buf.data());
    {
      count_use(Use::wire_piece);
      TimelineScope t("MPI_Allreduce (16-bit wire)", route.level, route.step, (hi - lo) * 2, route.group);
      check(MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(hi - lo), MPI_UINT16_T, op, route.comm),
            "MPI_Allreduce(average, 16-bit wire)");
    }
    widen(b, lo, hi, c, buf.data());
    if (route.post) route.post->after(b, lo, hi);
  }
}

template <class F, Element T>
void start_bucket(Bucket<T>& b, const Route& route, F c, Pending& p, std::vector<std::uint16_t>& send,
                  std::vector<std::uint16_t>& recv) {
  const std::size_t N = b.size();
  send.resize(N);
  recv.resize(N);
  narrow(b, 0, N, route, c, send.data());
  iallreduce_pieces(send.data(), recv.data(), N, 2, MPI_UINT16_T, wire_sum_op(route.wire), route.comm,
                    Use::wire_start, "MPI_Iallreduce(average, 16-bit wire)", p.reqs);
}

template <Half H>
constexpr Wire kWireOf = std::same_as<H, bf16> ? Wire::bf16 : Wire::fp16;
template <Half H>
using FormatOf = Format<kWireOf<H>>;

// [lo, hi) of a 16-bit bucket as 16-bit terms (widened, scaled in double, rounded once) into
// out[0, hi - lo).
template <Half H>
void narrow_half(Bucket<H>& b, std::size_t lo, std::size_t hi, const Route& route, H* out) {
  using F = FormatOf<H>;
  const H* data = b.storage.data();
  for_segments(b, lo, hi, [&](std::size_t at, const H* user, std::size_t n) {
    const H* x = user != nullptr ? user : data + at;
    H* o = out + (at - lo);
    for (std::size_t i = 0; i < n; ++i) o[i].bits = F::to(round_to_odd(term(F::from(x[i].bits), route)));
  });
}

template <Half H>
void half_bucket(Bucket<H>& b, const Route& route) {
  if (b.size() == 0) return;
  const MPI_Op op = wire_sum_op(kWireOf<H>);
  const std::size_t piece = piece_elems(route.chunk_bytes, sizeof(H), max_count());
  for (std::size_t lo = 0; lo < b.size(); lo += piece) {
    const std::size_t hi = std::min(lo + piece, b.size());
    narrow_half(b, lo, hi, route, b.storage.data() + lo);
    {
      count_use(Use::wire_piece);
      TimelineScope t("MPI_Allreduce (16-bit buffer)", route.level, route.step, (hi - lo) * 2, route.group);
      check(MPI_Allreduce(MPI_IN_PLACE, b.storage.data() + lo, static_cast<int>(hi - lo), MPI_UINT16_T, op,
                          route.comm),
            "MPI_Allreduce(average, 16-bit buffer)");
    }
    unpack_range(b, lo, hi);
  }
}

template <Half H>
void start_half_bucket(Bucket<H>& b, const Route& route, Pending& p) {
  const std::size_t N = b.size();
  if (N == 0) return;
  b.send.resize(N);
  narrow_half(b, 0, N, route, b.send.data());
  iallreduce_pieces(b.send.data(), b.storage.data(), N, sizeof(H), MPI_UINT16_T, wire_sum_op(kWireOf<H>),
                    route.comm, Use::wire_start, "MPI_Iallreduce(average, 16-bit buffer)", p.reqs);
}

}  // namespace

void half_blocking(Bucket<bf16>& b, Bucket<fp16>& h, const Route& route) {
  half_bucket(b, route);
  half_bucket(h, route);
}

void start_half(Bucket<bf16>& b, Bucket<fp16>& h, const Route& route, Pending& p) {
  start_half_bucket(b, route, p);
  start_half_bucket(h, route, p);
}

MPI_Op wire_sum_op(Wire w) {
  static const MPI_Op bf16 = make_op(&sum16<Wire::bf16>);
  static const MPI_Op fp16 = make_op(&sum16<Wire::fp16>);
  return w == Wire::bf16 ? bf16 : fp16;
}

void wire_blocking(Bucket<float>& f, Bucket<double>& d, const Route& route) {
  with_format(route.wire, [&](auto c) {
    blocking_bucket(f, route, c);
    blocking_bucket(d, route, c);
  });
}

void start_wire(Bucket<float>& f, Bucket<double>& d, const Route& route, Pending& p) {
  // The 16-bit buffers live as long as the pending average.
  auto bufs = std::make_shared<std::vector<std::uint16_t>[]>(4);
  with_format(route.wire, [&](auto c) {
    start_bucket(f, route, c, p, bufs[0], bufs[1]);
    start_bucket(d, route, c, p, bufs[2], bufs[3]);
    p.finish = [bufs, fp = &f, dp = &d, c] {
      widen(*fp, 0, fp->size(), c, bufs[1].data());
      widen(*dp, 0, dp->size(), c, bufs[3].data());
    };
  });
}

}  // namespace hma::detail
