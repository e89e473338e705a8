// Internal, data plane: averages that travel in 16 bits (AveragerOptions::wire = bf16 or fp16,
// and ParamSet arrays of bf16/fp16). Each rank computes its terms (x / g, or x times its weight
// factor) in double and rounds them to the 16-bit format once, and MPI_Allreduce sums those with
// hma's op (each addition in f32, rounded back to 16 bits); the result is widened back into the
// arrays (16-bit arrays keep it as is). Half the bytes of f32.
#pragma once

#include <mpi.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "half.hpp"
#include "hma/options.hpp"
#include "transport/host.hpp"

namespace hma::detail {

/// The format as a type, so that conversion loops inline and vectorise.
template <Wire W>
struct Format {
  static std::uint16_t to(float x) { return W == Wire::bf16 ? to_bf16(x) : to_fp16(x); }
  static float from(std::uint16_t h) { return W == Wire::bf16 ? from_bf16(h) : from_fp16(h); }
  static std::uint16_t add(std::uint16_t a, std::uint16_t b) { return to(from(a) + from(b)); }
};

/// Calls fn(Format<W>{}) for the route's 16-bit wire.
template <class F>
decltype(auto) with_format(Wire w, F&& fn) {
  if (w == Wire::bf16) return fn(Format<Wire::bf16>{});
  return fn(Format<Wire::fp16>{});
}

/// The sum op for route.wire on MPI_UINT16_T (made once, freed by MPI_Finalize).
MPI_Op wire_sum_op(Wire w);

/// Blocking: averages both buckets over route.comm in pieces of route.chunk_bytes (of 16-bit
/// elements), with route.post's passes per piece.
void wire_blocking(Bucket<float>& f, Bucket<double>& d, const Route& route);

/// 16-bit buffers (ParamSet arrays of hma::bf16 / hma::fp16), always flat: each rank's values
/// widened to f32, scaled (x / g or the weight factor), rounded back to 16 bits, summed by
/// MPI_Allreduce with the format's op; 16-bit results in place. Blocking: in pieces of
/// route.chunk_bytes. Non-blocking: out of place from the bucket's send copy into its storage,
/// unpacked by the caller's completion (`finish` or unpack()).
void half_blocking(Bucket<bf16>& b, Bucket<fp16>& h, const Route& route);
void start_half(Bucket<bf16>& b, Bucket<fp16>& h, const Route& route, Pending& p);

/// Non-blocking: converts both buckets into `p`'s 16-bit buffers and issues MPI_Iallreduce
/// (out of place); p.finish widens the result back into the arrays.
void start_wire(Bucket<float>& f, Bucket<double>& d, const Route& route, Pending& p);

}  // namespace hma::detail
