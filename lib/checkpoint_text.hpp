// Internal: the text of an averager's checkpoint (Averager::checkpoint()/restore()), written and
// read with no MPI and no averager, so that a fuzzer can drive the reader on its own
// (test/fuzz/fuzz_checkpoint.cpp). The reader never trusts a number: every size is computed with
// checked arithmetic and compared with the decoded bytes before anything is copied.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hma::detail {

/// The outer optimizer's state in a checkpoint: anchor and momentum, f32 then f64.
struct CheckpointOuter {
  std::uint64_t level = 0, group = 0, layout = 0;
  std::vector<float> anchor_f, m_f;
  std::vector<double> anchor_d, m_d;
};

/// What a checkpoint carries.
struct CheckpointText {
  std::int64_t step = 0;           // 0 .. kMaxStep
  std::int64_t world = 0;          // >= 1
  std::uint64_t fingerprint = 0;   // of the schedule
  std::string schedule;            // its text, for messages
  std::optional<CheckpointOuter> outer;
  std::uint64_t outer_hash = 0;    // of the outer lines' text: compared across a group
};

/// The checkpoint as text: "hma-checkpoint 1", then one "key value" line each.
std::string format_checkpoint(const CheckpointText& c);

/// Reads checkpoint text. Lines end in LF or CRLF. Throws hma::InvalidArgument naming the line
/// and what is wrong: not a checkpoint, a missing or repeated line, a number with junk or out of
/// range (a negative step named as such), an outer state whose sizes overflow or do not match its
/// bytes. Never reads or allocates beyond what the text holds.
CheckpointText parse_checkpoint(std::string_view text);

/// What the restoring averager expects of a checkpoint.
struct CheckpointExpect {
  std::int64_t world = 0;
  std::uint64_t fingerprint = 0;
  std::string schedule;                      // for messages
  std::optional<std::uint64_t> outer_level;  // nullopt: no outer optimizer
  std::uint64_t outer_group = 0;
};

/// Throws hma::InvalidArgument, naming both, when `c` was written for another world size,
/// schedule, or outer optimizer (level, group), or carries outer state `e` has no optimizer for.
void check_checkpoint(const CheckpointText& c, const CheckpointExpect& e);

}  // namespace hma::detail
