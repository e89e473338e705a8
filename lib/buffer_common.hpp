// Internal: what ParamSet and DeviceParamSet share: the size check of a registration, the
// layout fingerprint and the per-dtype summary of describe().
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "hma/buffer.hpp"

namespace hma::detail {

/// Throws hma::InvalidArgument ("hma: <who>: N elements of E bytes would make the buffer larger
/// than 2^48 bytes ...") when adding `n` elements of `elem` bytes to a buffer of `have` elements
/// would pass 2^48 bytes: an overflowed size_t or a negative int cast to size_t, caught before
/// an allocation fails somewhere deep.
void check_buffer_size(std::size_t n, std::size_t have, std::size_t elem, const std::string& who);

/// Throws hma::Error "hma: <who> while an average of this set is in flight: wait() on its
/// Request first" when `in_flight`: registering while MPI may still write the buffers.
void check_not_in_flight(bool in_flight, const std::string& who);

/// FNV-1a over the entries (kind, dtype, length, in order), preceded by `marker` when non-zero
/// (device sets use one, so a host set and a device set of equal shape differ).
std::uint64_t layout_fingerprint(std::span<const LayoutEntry> entries, std::uint64_t marker);

/// "f32 1000 (zero-copy 600, packed 400)".
std::string describe_bucket(const char* name, std::size_t owned, std::size_t user);

}  // namespace hma::detail
