#include "hma/schedule.hpp"

#include <charconv>
#include <limits>

#include "hma/error.hpp"
#include "support/hash.hpp"

namespace hma {

namespace {

[[noreturn]] void bad(const std::string& msg) { throw InvalidArgument("hma: " + msg); }

void check_common(std::int64_t warmup, int world_size) {
  if (world_size < 1) bad("world size must be >= 1, got " + std::to_string(world_size));
  if (warmup < 0) bad("warmup must be non-negative, got " + std::to_string(warmup));
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

template <class T>
bool parse_int(std::string_view s, T& out) {
  if (s.empty()) return false;
  if (s.front() == '+') s.remove_prefix(1);
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size();
}

// splitmix64 step, to fold integers into a hash.
std::uint64_t mix(std::uint64_t h, std::uint64_t v) {
  return detail::splitmix_finish(h + 0x9e3779b97f4a7c15ULL + v);
}

}  // namespace

Schedule Schedule::periodic(std::int64_t period, std::int64_t warmup, int group_size) {
  check_common(warmup, group_size);
  if (period < 1) bad("period must be a positive value, got " + std::to_string(period));
  Schedule s;
  s.kind_ = Kind::periodic;
  s.levels_ = {Level{period, group_size}};
  s.warmup_ = warmup;
  s.world_size_ = group_size;
  if (period == 1)
    s.warnings_.push_back(
        "period is 1: averaging parameters every step costs no less than averaging gradients "
        "every step (plain data parallelism)");
  return s;
}

Schedule Schedule::hierarchical(std::vector<Level> levels, std::int64_t warmup, int world_size) {
  check_common(warmup, world_size);
  if (levels.empty()) bad("hierarchical schedule must have at least one period:group_size level");
  for (std::size_t i = 0; i < levels.size(); ++i) {
    const auto& l = levels[i];
    const std::string at = "level " + std::to_string(i) + " (" + std::to_string(l.period) + ":" +
                           std::to_string(l.group_size) + "): ";
    if (l.period < 1) bad(at + "period must be a positive value, got " + std::to_string(l.period));
    if (i > 0 && l.period <= levels[i - 1].period)
      bad(at + "period " + std::to_string(l.period) + " must be greater than the previous level's " +
          std::to_string(levels[i - 1].period) + " (periods must strictly increase)");
    if (l.group_size < 1)
      bad(at + "group size must be positive, got " + std::to_string(l.group_size));
    if (l.group_size > world_size)
      bad(at + "group size " + std::to_string(l.group_size) + " exceeds the world size " +
          std::to_string(world_size));
    if (world_size % l.group_size != 0)
      bad(at + "group size " + std::to_string(l.group_size) + " does not divide the world size " +
          std::to_string(world_size));
  }
  if (levels.back().group_size != world_size)
    bad("the last level's group size " + std::to_string(levels.back().group_size) +
        " must equal the world size " + std::to_string(world_size) +
        " (the top level averages over all ranks)");
  Schedule s;
  s.kind_ = Kind::hierarchical;
  s.levels_ = std::move(levels);
  s.warmup_ = warmup;
  s.world_size_ = world_size;
  if (s.levels_.back().period == 1)
    s.warnings_.push_back(
        "the largest period is 1: averaging parameters every step costs no less than averaging "
        "gradients every step (plain data parallelism)");
  return s;
}

Schedule Schedule::post_local(Schedule local, std::int64_t switch_step) {
  if (switch_step < 0)
    bad("post-local switch step must be non-negative, got " + std::to_string(switch_step));
  local.switch_ = switch_step;
  if (switch_step > 0 && local.warmup_ > switch_step)
    local.warnings_.push_back("post-local: no averaging from the switch at step " +
                              std::to_string(switch_step) + " until the warmup ends at step " +
                              std::to_string(local.warmup_));
  return local;
}

Schedule Schedule::parse(std::string_view spec, std::int64_t warmup, int world_size,
                         int node_size) {
  const std::string quoted = "schedule \"" + std::string(spec) + "\": ";
  std::string_view rest = trim(spec);
  if (rest.starts_with("post")) {
    const std::size_t comma = rest.find(',');
    const std::string_view tok = trim(rest.substr(0, comma));
    const std::size_t colon = tok.find(':');
    std::int64_t s = 0;
    if (colon == std::string_view::npos || trim(tok.substr(0, colon)) != "post" ||
        !parse_int(trim(tok.substr(colon + 1)), s))
      bad(quoted + "token '" + std::string(tok) + "': expected post:S, S the switch step");
    if (comma == std::string_view::npos)
      bad(quoted + "post:S must be followed by the schedule after the switch, e.g. \"post:" +
          std::to_string(s) + ",8\"");
    if (trim(rest.substr(comma + 1)).starts_with("post"))
      bad(quoted + "post:S may appear once, at the start");
    return post_local(parse(rest.substr(comma + 1), warmup, world_size, node_size), s);
  }
  if (rest.empty()) bad(quoted + "is empty; write \"P\" (periodic) or \"P1:G1,...,Pn:Gn\"");
  if (rest.find(':') == std::string_view::npos && rest.find(',') == std::string_view::npos) {
    std::int64_t p = 0;
    if (!parse_int(rest, p)) bad(quoted + "period '" + std::string(rest) + "' is not an integer");
    return periodic(p, warmup, world_size);
  }
  std::vector<Level> levels;
  std::size_t index = 0;
  while (true) {
    const std::size_t comma = rest.find(',');
    const std::string_view tok = trim(rest.substr(0, comma));
    const std::string at = quoted + "token " + std::to_string(index) + " '" + std::string(tok) + "': ";
    const std::size_t colon = tok.find(':');
    if (tok.empty()) bad(at + "empty level (stray comma?)");
    if (colon == std::string_view::npos) bad(at + "expected period:group_size");
    const std::string_view ps = trim(tok.substr(0, colon)), gs = trim(tok.substr(colon + 1));
    Level l;
    if (!parse_int(ps, l.period)) bad(at + "period '" + std::string(ps) + "' is not an integer");
    if (gs == "world") {
      l.group_size = world_size;
    } else if (gs == "node") {
      if (node_size < 1) bad(at + "group size 'node' needs the ranks per node, which is unknown here");
      l.group_size = node_size;
    } else if (!parse_int(gs, l.group_size)) {
      bad(at + "group size '" + std::string(gs) + "' is not an integer, 'node' or 'world'");
    }
    levels.push_back(l);
    ++index;
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  return hierarchical(std::move(levels), warmup, world_size);
}

std::optional<std::size_t> Schedule::level_at(std::int64_t step) const noexcept {
  if (levels_.empty()) return std::nullopt;
  if (step >= 0 && step < switch_) return levels_.size() - 1;
  if (step < warmup_) return std::nullopt;
  if (kind_ == Kind::periodic) {
    if ((step - warmup_) % levels_[0].period == 0) return 0;
    return std::nullopt;
  }
  for (std::size_t i = levels_.size(); i-- > 0;)
    if (step % levels_[i].period == 0) return i;
  return std::nullopt;
}

std::uint64_t Schedule::fingerprint() const noexcept {
  std::uint64_t h = mix(0x686d61, static_cast<std::uint64_t>(kind_));
  h = mix(h, static_cast<std::uint64_t>(warmup_));
  h = mix(h, static_cast<std::uint64_t>(world_size_));
  for (const auto& l : levels_) {
    h = mix(h, static_cast<std::uint64_t>(l.period));
    h = mix(h, static_cast<std::uint64_t>(l.group_size));
  }
  if (switch_ > 0) h = mix(h, 0x706f7374u + static_cast<std::uint64_t>(switch_));  // "post"
  return h;
}

std::string Schedule::to_string() const {
  std::string s = kind_ == Kind::periodic ? "periodic " : "hierarchical ";
  if (kind_ == Kind::periodic) {
    s += std::to_string(levels_.at(0).period);
  } else {
    for (std::size_t i = 0; i < levels_.size(); ++i) {
      if (i) s += ',';
      s += std::to_string(levels_[i].period) + ":" + std::to_string(levels_[i].group_size);
    }
  }
  s += " warmup " + std::to_string(warmup_) + " world " + std::to_string(world_size_);
  if (switch_ > 0) s += " post " + std::to_string(switch_);
  return s;
}

}  // namespace hma
