// Averager::checkpoint()/restore(): the step counter, carried across restarts with the schedule
// it belongs to.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "control/agree.hpp"
#include "hma/averager.hpp"
#include "hma/error.hpp"

namespace hma {

namespace {
constexpr std::string_view kCheckpointMagic = "hma-checkpoint 1";
}

std::string Averager::checkpoint() const {
  char fp[32];
  std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(schedule_.fingerprint()));
  std::string s(kCheckpointMagic);
  s += "\nstep " + std::to_string(step_) + "\nworld " + std::to_string(schedule_.world_size()) +
       "\nfingerprint " + fp + "\nschedule " + schedule_.to_string() + "\n";
  return s;
}

void Averager::restore(std::string_view text) {
  std::int64_t step = -1;
  auto parse = [&] {
    std::istringstream in{std::string(text)};
    std::string line;
    if (!std::getline(in, line) || line != kCheckpointMagic)
      throw InvalidArgument("hma: restore: not an hma checkpoint (first line '" + line +
                            "', expected '" + std::string(kCheckpointMagic) + "')");
    std::string sched, fp;
    long long world = -1, st = -1;
    while (std::getline(in, line)) {
      const auto sp = line.find(' ');
      const std::string key = line.substr(0, sp), val = sp == std::string::npos ? "" : line.substr(sp + 1);
      try {
        if (key == "step") st = std::stoll(val);
        else if (key == "world") world = std::stoll(val);
        else if (key == "fingerprint") fp = val;
        else if (key == "schedule") sched = val;
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
  };
  if (!member()) {
    parse();
    step_ = step;
    return;
  }
  require_usable("restore()");
  settle_issue();
  // On the world level's control communicator: never pairs with a data collective.
  const MPI_Comm ctrl = hierarchy_.control(hierarchy_.num_levels() - 1).get();
  detail::agree(ctrl, parse);
  const std::uint64_t v[1] = {static_cast<std::uint64_t>(step)};
  detail::check_same(ctrl, v, "the restored step",
                     [&] { return "step " + std::to_string(step); });
  step_ = step;
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
