// Internal: hma's log, to stderr, filtered by HMA_LOG=off|warn|info|debug (default warn).
#pragma once

#include <string>

namespace hma::detail {

enum class LogLevel { off = 0, warn = 1, info = 2, debug = 3 };

/// The level from HMA_LOG, read once; throws hma::InvalidArgument for an unknown value.
LogLevel log_level();
bool log_enabled(LogLevel l);
/// Writes "hma: <msg>" (or the message as is when it already starts with "hma:") to stderr.
void log(LogLevel l, const std::string& msg);

}  // namespace hma::detail
