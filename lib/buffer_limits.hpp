// Internal: the one size check of ParamSet and DeviceParamSet registrations.
#pragma once

#include <cstddef>
#include <string>

namespace hma::detail {

/// Throws hma::InvalidArgument ("hma: <who>: N elements of E bytes would make the buffer larger
/// than 2^48 bytes ...") when adding `n` elements of `elem` bytes to a buffer of `have` elements
/// would pass 2^48 bytes: an overflowed size_t or a negative int cast to size_t, caught before
/// an allocation fails somewhere deep.
void check_buffer_size(std::size_t n, std::size_t have, std::size_t elem, const std::string& who);

}  // namespace hma::detail
