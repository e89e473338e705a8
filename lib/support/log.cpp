#include "support/log.hpp"

#include <cstdio>

#include "support/env.hpp"
#include "hma/error.hpp"

namespace hma::detail {

LogLevel log_level() {
  return env_choice("HMA_LOG", LogLevel::warn,
                    {{"off", LogLevel::off},
                     {"warn", LogLevel::warn},
                     {"info", LogLevel::info},
                     {"debug", LogLevel::debug}});
}

bool log_enabled(LogLevel l) {
  static const LogLevel current = [] {
    try {
      return log_level();
    } catch (const InvalidArgument&) {
      return LogLevel::warn;  // reported by the Averager's constructor on every rank
    }
  }();
  return l != LogLevel::off && static_cast<int>(l) <= static_cast<int>(current);
}

void log(LogLevel l, const std::string& msg) {
  if (!log_enabled(l)) return;
  const char* tag = l == LogLevel::warn ? "warning: " : "";
  std::string text = msg.rfind("hma:", 0) == 0 ? msg : "hma: " + std::string(tag) + msg;
  if (!text.empty() && text.back() != '\n') text += '\n';
  std::fputs(text.c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace hma::detail
