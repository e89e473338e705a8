// Averager::checkpoint()/restore(): the step counter, carried across restarts with the schedule
// it belongs to.
#include <cstdio>
#include <cstring>
#include <optional>
#include <vector>
#include <fstream>
#include <functional>
#include <sstream>

#include "control/agree.hpp"
#include "hma/averager.hpp"
#include "hma/error.hpp"
#include "pending.hpp"
#include "transport/post.hpp"

namespace hma {

namespace {
constexpr std::string_view kCheckpointMagic = "hma-checkpoint 1";

constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void append_base64(std::string& out, const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
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
}  // namespace

std::string Averager::checkpoint() const {
  char fp[32];
  std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(schedule_.fingerprint()));
  std::string s(kCheckpointMagic);
  s += "\nstep " + std::to_string(step_) + "\nworld " + std::to_string(schedule_.world_size()) +
       "\nfingerprint " + fp + "\nschedule " + schedule_.to_string() + "\n";
  if (outer_) {
    if (auto q = outer_->last.lock(); q && !q->done)
      throw Error("hma: checkpoint(): an average at the outer optimizer's level (step " +
                  std::to_string(q->who.step) + ") is still in flight: wait() for it first, its "
                  "update of the optimizer's state is part of the checkpoint");
  }
  if (outer_ && outer_->anchored) {
    // The outer optimizer's state, which every rank of its group holds alike: anchor and
    // momentum, f32 then f64, as base64 of their bytes (the checkpoint stays one line of text each).
    const auto& o = *outer_;
    std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(o.fingerprint));
    // Below the world each group of the level has its own state: the group is part of it.
    s += "outer level " + std::to_string(o.opt.level) + " group " + std::to_string(outer_group()) +
         " f32 " + std::to_string(o.anchor_f.size()) + " f64 " + std::to_string(o.anchor_d.size()) +
         " layout " + fp + "\nouter-state ";
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
  }
  return s;
}

void Averager::restore(std::string_view text) {
  std::int64_t step = -1;
  std::optional<detail::OuterState> outer;  // from the checkpoint, if it carries one
  std::uint64_t outer_hash = 0;
  auto parse = [&] {
    std::istringstream in{std::string(text)};
    std::string line;
    if (!std::getline(in, line) || line != kCheckpointMagic)
      throw InvalidArgument("hma: restore: not an hma checkpoint (first line '" + line +
                            "', expected '" + std::string(kCheckpointMagic) + "')");
    std::string sched, fp, outer_line, outer_state;
    long long world = -1, st = -1;
    while (std::getline(in, line)) {
      const auto sp = line.find(' ');
      const std::string key = line.substr(0, sp), val = sp == std::string::npos ? "" : line.substr(sp + 1);
      try {
        if (key == "step") st = std::stoll(val);
        else if (key == "world") world = std::stoll(val);
        else if (key == "fingerprint") fp = val;
        else if (key == "schedule") sched = val;
        else if (key == "outer") outer_line = val;
        else if (key == "outer-state") outer_state = val;
      } catch (const std::exception&) {
        throw InvalidArgument("hma: restore: checkpoint line '" + line + "' has a bad number");
      }
    }
    if (st < 0 || world < 0 || fp.empty())
      throw InvalidArgument("hma: restore: checkpoint lacks step, world or fingerprint");
    if (world != schedule_.world_size())
      throw InvalidArgument("hma: restore: the checkpoint was written by " + std::to_string(world) +
                            " ranks, this averager has " + std::to_string(schedule_.world_size()));
    char mine[32];
    std::snprintf(mine, sizeof mine, "%016llx", static_cast<unsigned long long>(schedule_.fingerprint()));
    if (fp != mine)
      throw InvalidArgument("hma: restore: the checkpoint is for schedule '" + sched +
                            "' but this averager runs '" + schedule_.to_string() + "'");
    step = st;
    outer.reset();
    if (outer_line.empty()) return;
    outer_hash = std::hash<std::string>{}(outer_line + outer_state);
    if (!outer_)
      throw InvalidArgument("hma: restore: the checkpoint carries an outer optimizer's state, but "
                            "this averager has no outer optimizer (AveragerOptions::outer, HMA_OUTER)");
    unsigned long long lvl = 0, grp = 0, nf = 0, nd = 0, layout = 0;
    if (std::sscanf(outer_line.c_str(), "level %llu group %llu f32 %llu f64 %llu layout %llx", &lvl, &grp,
                    &nf, &nd, &layout) != 5)
      throw InvalidArgument("hma: restore: checkpoint line 'outer " + outer_line + "' is malformed");
    if (lvl != outer_->opt.level)
      throw InvalidArgument("hma: restore: the checkpoint's outer optimizer is at level " +
                            std::to_string(lvl) + ", this averager's at level " +
                            std::to_string(outer_->opt.level));
    if (grp != outer_group())
      throw InvalidArgument("hma: restore: the checkpoint's outer optimizer state belongs to group " +
                            std::to_string(grp) + " of level " + std::to_string(lvl) + ", this rank is in group " +
                            std::to_string(outer_group()) +
                            ": below the world each group has its own state; restore each rank from a "
                            "checkpoint written in its own group");
    std::vector<unsigned char> bytes;
    const std::size_t want = 2 * (nf * sizeof(float) + nd * sizeof(double));
    if (!decode_base64(outer_state, bytes) || bytes.size() != want)
      throw InvalidArgument("hma: restore: the checkpoint's outer optimizer state is damaged (" +
                            std::to_string(bytes.size()) + " bytes decoded, " +
                            std::to_string(want) + " expected)");
    auto& o = outer.emplace();
    o.opt = outer_->opt;
    o.anchored = true;
    o.fingerprint = layout;
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
  };
  // The outer optimizer restarts from the checkpoint's state, or from scratch without one.
  auto adopt = [&] {
    if (!outer_) return;
    if (outer) *outer_ = std::move(*outer);
    else outer_->anchored = false;
  };
  if (!member()) {
    parse();
    step_ = step;
    adopt();
    return;
  }
  require_usable("restore()");
  settle_issue();
  if (outer_) settle_outer(outer_->opt.level);  // no update of the state may land after the restore
  // On the world level's control communicator: never pairs with a data collective.
  const MPI_Comm ctrl = hierarchy_.control(hierarchy_.num_levels() - 1).get();
  detail::agree(ctrl, parse);
  const std::uint64_t v[2] = {static_cast<std::uint64_t>(step), outer ? 1u : 0u};
  detail::check_same(ctrl, v, "the restored step or outer optimizer state", [&] {
    return "step " + std::to_string(step) + (outer ? ", outer state" : ", no outer state");
  });
  if (outer) {
    // The state is the same within each group of the optimizer's level (groups differ below
    // the world): compared there, on that level's control communicator.
    const std::uint64_t h[1] = {outer_hash};
    detail::check_same(hierarchy_.control(outer_->opt.level).get(), h, "the restored outer optimizer state", [&] {
      char t[24];
      std::snprintf(t, sizeof t, "%016llx", static_cast<unsigned long long>(outer_hash));
      return std::string("state hash ") + t;
    });
  }
  step_ = step;
  adopt();
}

void Averager::save_checkpoint(const std::string& path) const {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << checkpoint();
  f.close();
  if (!f) throw Error("hma: save_checkpoint: cannot write '" + path + "'");
}

void Averager::load_checkpoint(const std::string& path) {
  std::string text;
  bool ok = true;
  {
    std::ifstream f(path, std::ios::binary);
    ok = static_cast<bool>(f);
    std::ostringstream ss;
    if (ok) ss << f.rdbuf();
    text = ss.str();
  }
  if (!ok) text = "unreadable file '" + path + "'";  // restore() then fails on every rank
  restore(text);
}

}  // namespace hma
