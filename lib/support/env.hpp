// Internal: reading hma's environment variables with clear errors.
#pragma once

#include <initializer_list>
#include <string>
#include <utility>

namespace hma::detail {

/// The integer value of env variable `name`, or `fallback` when unset or empty. Throws
/// hma::InvalidArgument naming the variable when it is not an integer in [lo, hi].
int env_int(const char* name, int fallback, int lo, int hi);
/// The string value of `name`, or `fallback` when unset.
std::string env_str(const char* name, const std::string& fallback);
/// Boolean: 1/0, true/false, yes/no, on/off (any case); throws otherwise.
bool env_bool(const char* name, bool fallback);

[[noreturn]] void throw_bad_env(const char* name, const std::string& value,
                                const std::string& allowed);

/// The value of `name` looked up in `choices`; `fallback` when unset or empty. Throws
/// hma::InvalidArgument "... HMA_X='v' must be a, b or c" for anything else.
template <class E>
E env_choice(const char* name, E fallback,
             std::initializer_list<std::pair<const char*, E>> choices) {
  const std::string v = env_str(name, "");
  if (v.empty()) return fallback;
  std::string allowed;
  std::size_t i = 0;
  for (const auto& [text, value] : choices) {
    if (v == text) return value;
    allowed += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + std::string(text);
    ++i;
  }
  throw_bad_env(name, v, allowed);
}

}  // namespace hma::detail
