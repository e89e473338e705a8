#include "checkpoint_text.hpp"

#include <charconv>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>

#include "hma/error.hpp"
#include "hma/schedule.hpp"

namespace hma::detail {

namespace {
constexpr std::string_view kMagic = "hma-checkpoint 1";

constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void append_base64(std::string& out, const unsigned char* p, std::size_t n) {
  std::size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    const unsigned v = (p[i] << 16) | (p[i + 1] << 8) | p[i + 2];
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += kB64[v & 63];
  }
  if (i < n) {
    const unsigned v = (p[i] << 16) | (i + 1 < n ? p[i + 1] << 8 : 0);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += i + 1 < n ? kB64[(v >> 6) & 63] : '=';
    out += '=';
  }
}

// Decodes base64 text; false on a character outside the alphabet or a bad length.
bool decode_base64(std::string_view in, std::vector<unsigned char>& out) {
  if (in.size() % 4 != 0) return false;
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  out.clear();
  out.reserve(in.size() / 4 * 3);
  for (std::size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = in[i + static_cast<std::size_t>(k)];
      if (c == '=' && i + 4 == in.size() && k >= 2) {
        v[k] = 0;
        ++pad;
      } else if ((v[k] = val(c)) < 0 || pad > 0) {
        return false;
      }
    }
    const unsigned x = (static_cast<unsigned>(v[0]) << 18) | (static_cast<unsigned>(v[1]) << 12) |
                       (static_cast<unsigned>(v[2]) << 6) | static_cast<unsigned>(v[3]);
    out.push_back(static_cast<unsigned char>(x >> 16));
    if (pad < 2) out.push_back(static_cast<unsigned char>((x >> 8) & 255));
    if (pad < 1) out.push_back(static_cast<unsigned char>(x & 255));
  }
  return true;
}

// A line for a message: at most 80 characters, control characters shown as '?'.
std::string shown(std::string_view line, std::size_t max = 80) {
  std::string s(line.substr(0, max));
  for (char& c : s)
    if (static_cast<unsigned char>(c) < 32 || c == 127) c = '?';
  return line.size() > max ? s + "..." : s;
}

[[noreturn]] void bad(const std::string& what) { throw InvalidArgument("hma: restore: " + what); }

// Strict decimal (or, with base 16, hexadecimal) digits: no '+', space or trailing junk; a '-'
// only parses into a signed T (the caller names negatives).
template <class T>
T number(std::string_view s, std::string_view line, int base = 10) {
  T v{};
  const char* end = s.data() + s.size();
  const bool digits = !s.empty() && s.front() != '+' && s.front() != ' ';
  const auto [ptr, ec] = digits ? std::from_chars(s.data(), end, v, base) : std::from_chars_result{s.data(), std::errc::invalid_argument};
  if (ec == std::errc::result_out_of_range)
    bad("checkpoint line '" + shown(line) + "': the number '" + shown(s) + "' is out of range");
  if (ec != std::errc{} || ptr != end)
    bad("checkpoint line '" + shown(line) + "': '" + shown(s) + "' is not a" +
        (base == 16 ? " hexadecimal" : "n integer") + " number (digits only)");
  return v;
}

std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, bool& overflow) {
  std::uint64_t r = 0;
  overflow |= __builtin_mul_overflow(a, b, &r);
  return r;
}

std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, bool& overflow) {
  std::uint64_t r = 0;
  overflow |= __builtin_add_overflow(a, b, &r);
  return r;
}

// "level L group G f32 NF f64 ND layout HEX"
CheckpointOuter parse_outer(std::string_view val, std::string_view state, std::string_view line) {
  std::vector<std::string_view> tok;
  for (std::size_t at = 0; at <= val.size();) {
    const std::size_t sp = std::min(val.find(' ', at), val.size());
    tok.push_back(val.substr(at, sp - at));
    at = sp + 1;
  }
  if (tok.size() != 10 || tok[0] != "level" || tok[2] != "group" || tok[4] != "f32" || tok[6] != "f64" ||
      tok[8] != "layout")
    bad("checkpoint line '" + shown(line) + "' is malformed (expected 'outer level L group G f32 N f64 N layout HEX')");
  CheckpointOuter o;
  o.level = number<std::uint64_t>(tok[1], line);
  o.group = number<std::uint64_t>(tok[3], line);
  const auto nf = number<std::uint64_t>(tok[5], line);
  const auto nd = number<std::uint64_t>(tok[7], line);
  o.layout = number<std::uint64_t>(tok[9], line, 16);
  // Anchor and momentum of each: 2 * (nf * 4 + nd * 8) bytes, checked (it must not wrap).
  bool overflow = false;
  const std::uint64_t want = checked_mul(
      2, checked_add(checked_mul(nf, sizeof(float), overflow), checked_mul(nd, sizeof(double), overflow), overflow),
      overflow);
  if (overflow)
    bad("checkpoint line '" + shown(line) + "': " + std::to_string(nf) + " f32 and " + std::to_string(nd) +
        " f64 elements are more bytes than a size can hold: the outer optimizer state is damaged");
  // Base64 holds 3 bytes per 4 characters: refuse a size the text cannot hold before decoding.
  std::vector<unsigned char> bytes;
  if (want > state.size() / 4 * 3 || !decode_base64(state, bytes) || bytes.size() != want)
    bad("the checkpoint's outer optimizer state is damaged (" +
        (bytes.empty() && want > state.size() / 4 * 3 ? std::to_string(state.size()) + " characters of base64"
                                                       : std::to_string(bytes.size()) + " bytes decoded") +
        ", " + std::to_string(want) + " bytes expected for " + std::to_string(nf) + " f32 and " +
        std::to_string(nd) + " f64 elements)");
  const unsigned char* at = bytes.data();
  auto take = [&](auto& v, std::size_t n) {
    v.resize(n);
    if (n == 0) return;  // an empty vector's data() may be null: memcpy must not see it
    std::memcpy(v.data(), at, n * sizeof(v[0]));
    at += n * sizeof(v[0]);
  };
  take(o.anchor_f, nf);
  take(o.m_f, nf);
  take(o.anchor_d, nd);
  take(o.m_d, nd);
  return o;
}

}  // namespace

std::string format_checkpoint(const CheckpointText& c) {
  char fp[32];
  std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(c.fingerprint));
  std::string s(kMagic);
  s += "\nstep " + std::to_string(c.step) + "\nworld " + std::to_string(c.world) + "\nfingerprint " + fp +
       "\nschedule " + c.schedule + "\n";
  if (!c.outer) return s;
  const auto& o = *c.outer;
  std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(o.layout));
  s += "outer level " + std::to_string(o.level) + " group " + std::to_string(o.group) + " f32 " +
       std::to_string(o.anchor_f.size()) + " f64 " + std::to_string(o.anchor_d.size()) + " layout " + fp +
       "\nouter-state ";
  std::vector<unsigned char> bytes;
  auto put = [&](const auto& v) {
    const auto* b = reinterpret_cast<const unsigned char*>(v.data());
    bytes.insert(bytes.end(), b, b + v.size() * sizeof(v[0]));
  };
  put(o.anchor_f);
  put(o.m_f);
  put(o.anchor_d);
  put(o.m_d);
  append_base64(s, bytes.data(), bytes.size());
  s += "\n";
  return s;
}

CheckpointText parse_checkpoint(std::string_view text) {
  // Lines end in LF; a CR before it (a file edited on Windows) is dropped.
  std::vector<std::string_view> lines;
  for (std::size_t at = 0; at < text.size();) {
    std::size_t nl = text.find('\n', at);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view l = text.substr(at, nl - at);
    if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
    lines.push_back(l);
    at = nl + 1;
  }
  if (lines.empty() || lines[0] != kMagic)
    bad("not an hma checkpoint (first line '" + shown(lines.empty() ? "" : lines[0]) + "', expected '" +
        std::string(kMagic) + "')");
  std::map<std::string_view, std::string_view> fields, line_of;
  for (std::size_t i = 1; i < lines.size(); ++i) {
    const std::string_view l = lines[i];
    if (l.empty()) continue;
    const std::size_t sp = l.find(' ');
    const std::string_view key = l.substr(0, sp), val = sp == std::string_view::npos ? "" : l.substr(sp + 1);
    if (key != "step" && key != "world" && key != "fingerprint" && key != "schedule" && key != "outer" &&
        key != "outer-state")
      continue;  // unknown keys: from a later version, ignored
    if (!fields.emplace(key, val).second) bad("checkpoint line '" + std::string(key) + "' appears twice");
    line_of[key] = l;
  }
  CheckpointText c;
  if (fields.count("step")) {
    const std::string_view step = fields["step"];
    if (step.size() > 1 && step.front() == '-' && step[1] >= '0' && step[1] <= '9')
      bad("checkpoint line '" + shown(line_of["step"]) + "': the step is negative; steps count from 0");
    c.step = number<std::int64_t>(step, line_of["step"]);
    if (c.step > kMaxStep)
      bad("checkpoint line '" + shown(line_of["step"]) + "': the step is beyond hma's limit of 2^62 (" +
          std::to_string(kMaxStep) + ")");
  }
  if (fields.count("world")) {
    c.world = number<std::int64_t>(fields["world"], line_of["world"]);
    if (c.world < 1) bad("checkpoint line '" + shown(line_of["world"]) + "': the world size must be at least 1");
  }
  if (fields.count("fingerprint")) {
    const std::string_view fp = fields["fingerprint"];
    if (fp.size() > 16) bad("checkpoint line '" + shown(line_of["fingerprint"]) + "': more than 16 hexadecimal digits");
    c.fingerprint = number<std::uint64_t>(fp, line_of["fingerprint"], 16);
  }
  for (const char* k : {"step", "world", "fingerprint"})
    if (!fields.count(k)) bad(std::string("checkpoint lacks its '") + k + "' line");
  c.schedule = std::string(fields["schedule"]);
  const bool has_outer = fields.count("outer") != 0, has_state = fields.count("outer-state") != 0;
  if (has_outer != has_state)
    bad(std::string("checkpoint has an '") + (has_outer ? "outer" : "outer-state") + "' line but no '" +
        (has_outer ? "outer-state" : "outer") + "' line: the outer optimizer state is damaged");
  if (has_outer) {
    const std::string_view val = fields["outer"], state = fields["outer-state"];
    c.outer = parse_outer(val, state, line_of["outer"]);
    std::string both(val);
    both += state;
    c.outer_hash = std::hash<std::string>{}(both);
  }
  return c;
}

void check_checkpoint(const CheckpointText& c, const CheckpointExpect& e) {
  if (c.world != e.world)
    bad("the checkpoint was written by " + std::to_string(c.world) + " ranks, this averager has " +
        std::to_string(e.world));
  if (c.fingerprint != e.fingerprint)
    bad("the checkpoint is for schedule '" + shown(c.schedule, 400) + "' but this averager runs '" + e.schedule + "'");
  if (!c.outer) return;
  if (!e.outer_level)
    bad("the checkpoint carries an outer optimizer's state, but this averager has no outer optimizer "
        "(AveragerOptions::outer, HMA_OUTER)");
  const auto& o = *c.outer;
  if (o.level != *e.outer_level)
    bad("the checkpoint's outer optimizer is at level " + std::to_string(o.level) + ", this averager's at level " +
        std::to_string(*e.outer_level));
  if (o.group != e.outer_group)
    bad("the checkpoint's outer optimizer state belongs to group " + std::to_string(o.group) + " of level " +
        std::to_string(o.level) + ", this rank is in group " + std::to_string(e.outer_group) +
        ": below the world each group has its own state; restore each rank from a checkpoint written in "
        "its own group");
}

}  // namespace hma::detail
