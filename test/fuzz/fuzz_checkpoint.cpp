// libFuzzer target for the text that Averager::restore() reads (lib/checkpoint_text.cpp): bad
// text must raise hma::InvalidArgument, nothing else, and never read out of bounds; good text
// must give a checkpoint within hma's limits that writes back and reads again to the same values,
// and that check_checkpoint() accepts for its own world and schedule and refuses for another.
// Built and run by tools/fuzz (clang, ASan + UBSan); test/fuzz/replay.cpp replays
// test/fuzz/corpus_checkpoint in every test run.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "checkpoint_text.hpp"
#include "hma/error.hpp"
#include "hma/schedule.hpp"

namespace {
[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_checkpoint: invariant broken: %s\n", what);
  std::abort();
}

template <class V>
bool same_bits(const V& a, const V& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace hma::detail;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  CheckpointText c;
  try {
    c = parse_checkpoint(text);
  } catch (const hma::InvalidArgument&) {
    return 0;
  }
  if (c.step < 0 || c.step > hma::kMaxStep || c.world < 1) fail("step or world out of range");
  if (c.outer) {
    const auto& o = *c.outer;
    if (o.anchor_f.size() != o.m_f.size() || o.anchor_d.size() != o.m_d.size()) fail("anchor and momentum sizes");
  }
  // Written back, it reads again to the same values.
  const CheckpointText d = parse_checkpoint(format_checkpoint(c));
  if (d.step != c.step || d.world != c.world || d.fingerprint != c.fingerprint || d.outer.has_value() != c.outer.has_value())
    fail("round trip");
  if (c.outer) {
    const auto &a = *c.outer, &b = *d.outer;
    if (a.level != b.level || a.group != b.group || a.layout != b.layout || !same_bits(a.anchor_f, b.anchor_f) ||
        !same_bits(a.m_f, b.m_f) || !same_bits(a.anchor_d, b.anchor_d) || !same_bits(a.m_d, b.m_d))
      fail("round trip of the outer state");
  }
  // Accepted by an averager it fits; refused, with InvalidArgument, by one it does not.
  CheckpointExpect e;
  e.world = c.world;
  e.fingerprint = c.fingerprint;
  e.schedule = "fuzzed";
  if (c.outer) {
    e.outer_level = c.outer->level;
    e.outer_group = c.outer->group;
  }
  check_checkpoint(c, e);
  for (int k = 0; k < 3; ++k) {
    CheckpointExpect other = e;
    if (k == 0) other.world = c.world == 1 ? 2 : 1;
    if (k == 1) other.fingerprint = ~c.fingerprint;
    if (k == 2) {
      if (!c.outer) break;
      other.outer_level.reset();
    }
    try {
      check_checkpoint(c, other);
      fail("a foreign checkpoint accepted");
    } catch (const hma::InvalidArgument&) {
    }
  }
  return 0;
}
