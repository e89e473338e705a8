// Internal: reading hma's environment variables with clear errors.
#pragma once

#include <string>

namespace hma::detail {

/// The integer value of env variable `name`, or `fallback` when unset or empty. Throws
/// hma::InvalidArgument naming the variable when it is not an integer in [lo, hi].
int env_int(const char* name, int fallback, int lo, int hi);
/// The string value of `name`, or `fallback` when unset.
std::string env_str(const char* name, const std::string& fallback);
/// Boolean: 1/0, true/false, yes/no, on/off (any case); throws otherwise.
bool env_bool(const char* name, bool fallback);

}  // namespace hma::detail
