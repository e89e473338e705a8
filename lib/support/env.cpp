#include "support/env.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>

#include "hma/error.hpp"

namespace hma::detail {

int env_int(const char* name, int fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::string s(v);
  int out = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  if (ec != std::errc() || p != s.data() + s.size() || out < lo || out > hi)
    throw InvalidArgument(std::string("hma: environment variable ") + name + "='" + s +
                          "' must be an integer in [" + std::to_string(lo) + ", " +
                          std::to_string(hi) + "]");
  return out;
}

void throw_bad_env(const char* name, const std::string& value, const std::string& allowed) {
  throw InvalidArgument(std::string("hma: environment variable ") + name + "='" + value +
                        "' must be " + allowed);
}

std::string env_str(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v == nullptr ? fallback : std::string(v);
}

bool env_bool(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  std::string s(v);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "1" || s == "true" || s == "yes" || s == "on") return true;
  if (s == "0" || s == "false" || s == "no" || s == "off") return false;
  throw InvalidArgument(std::string("hma: environment variable ") + name + "='" + v +
                        "' must be one of 1/0, true/false, yes/no, on/off");
}

}  // namespace hma::detail

