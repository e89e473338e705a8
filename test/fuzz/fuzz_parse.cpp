// libFuzzer target for hma's parsers: schedule strings (Schedule::parse) and the environment
// variable parsers. Bad input must raise hma::InvalidArgument, nothing else; good input must
// give a valid schedule whose canonical text parses back to the same schedule.
// Built and run by tools/fuzz (clang); test/fuzz/replay.cpp replays the corpus in every test run.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "support/env.hpp"
#include "hma/error.hpp"
#include "hma/schedule.hpp"

namespace {
[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_parse: invariant broken: %s\n", what);
  std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 3) return 0;
  const int world = 1 + data[0] % 64, node = data[1] % 17;
  const std::int64_t warmup = static_cast<std::int64_t>(data[2] % 12) - 2;
  const std::string text(reinterpret_cast<const char*>(data + 3), size - 3);
  try {
    const hma::Schedule s = hma::Schedule::parse(text, warmup, world, node);
    // Invariants of a valid schedule.
    if (s.levels().empty() || s.warmup() < 0 || s.world_size() != world) fail("basic fields");
    for (std::size_t i = 0; i < s.levels().size(); ++i) {
      const auto& l = s.levels()[i];
      if (l.period < 1 || l.group_size < 1 || world % l.group_size != 0) fail("level");
      if (i > 0 && l.period <= s.levels()[i - 1].period) fail("periods ascend");
    }
    if (s.levels().back().group_size != world) fail("last level is the world");
    // Canonical text round trip: "periodic P warmup W world N" / "hierarchical L warmup W world N".
    const std::string canon = s.to_string();
    const std::string body = canon.substr(canon.find(' ') + 1, canon.find(" warmup") - canon.find(' ') - 1);
    if (!(hma::Schedule::parse(body, warmup, world) == s)) fail("round trip");
    for (std::int64_t step : {0, 1, 2, 7, 64, 1000}) {
      const auto l = s.level_at(step);
      if (l && *l >= s.levels().size()) fail("level_at in range");
      if (step < warmup && l) fail("no average before warmup");
    }
  } catch (const hma::InvalidArgument&) {
  }
  // The environment parsers, fed the same text.
  if (text.find('\0') == std::string::npos) {
    setenv("HMA_FUZZ_VALUE", text.c_str(), 1);
    try {
      const int v = hma::detail::env_int("HMA_FUZZ_VALUE", -7, -5, 1000);
      if (v != -7 && (v < -5 || v > 1000)) fail("env_int range");
    } catch (const hma::InvalidArgument&) {
    }
    try {
      (void)hma::detail::env_bool("HMA_FUZZ_VALUE", false);
    } catch (const hma::InvalidArgument&) {
    }
  }
  return 0;
}
