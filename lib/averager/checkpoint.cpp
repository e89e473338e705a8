// Averager::checkpoint()/restore(): the step counter, carried across restarts with the schedule
// it belongs to.
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>

#include "checkpoint_text.hpp"
#include "control/agree.hpp"
#include "hma/averager.hpp"
#include "hma/error.hpp"
#include "averager/request.hpp"
#include "transport/post.hpp"

namespace hma {

std::string Averager::checkpoint() const {
  detail::CheckpointText c;
  c.step = step_;
  c.world = schedule_.world_size();
  c.fingerprint = schedule_.fingerprint();
  c.schedule = schedule_.to_string();
  if (outer_) {
    if (auto q = outer_->last.lock(); q && !q->done)
      throw Error("hma: checkpoint(): an average at the outer optimizer's level (step " +
                  std::to_string(q->who.step) + ") is still in flight: wait() for it first, its "
                  "update of the optimizer's state is part of the checkpoint");
  }
  if (outer_ && outer_->anchored) {
    // The outer optimizer's state, which every rank of its group holds alike (below the world
    // each group of the level has its own state: the group is part of it).
    const auto& o = *outer_;
    c.outer = detail::CheckpointOuter{o.opt.level, outer_group(), o.fingerprint, o.anchor_f, o.m_f, o.anchor_d, o.m_d};
  }
  return detail::format_checkpoint(c);
}

void Averager::restore(std::string_view text) {
  std::int64_t step = -1;
  std::optional<detail::OuterState> outer;  // from the checkpoint, if it carries one
  std::uint64_t outer_hash = 0;
  auto parse = [&] {
    detail::CheckpointText c = detail::parse_checkpoint(text);
    detail::CheckpointExpect e;
    e.world = schedule_.world_size();
    e.fingerprint = schedule_.fingerprint();
    e.schedule = schedule_.to_string();
    if (outer_) e.outer_level = outer_->opt.level;
    e.outer_group = outer_group();
    detail::check_checkpoint(c, e);
    step = c.step;
    outer.reset();
    outer_hash = c.outer_hash;
    if (!c.outer) return;
    auto& o = outer.emplace();
    o.opt = outer_->opt;
    o.anchored = true;
    o.fingerprint = c.outer->layout;
    o.anchor_f = std::move(c.outer->anchor_f);
    o.m_f = std::move(c.outer->m_f);
    o.anchor_d = std::move(c.outer->anchor_d);
    o.m_d = std::move(c.outer->m_d);
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
