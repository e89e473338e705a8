// Averager set-up and lifetime: settings agreed across ranks, the hierarchy, moves, and the
// destructor that never frees a communicator under a collective; torch-named averagers.
#include <algorithm>
#include <cstdio>

#include "control/agree.hpp"
#include "control/device_path.hpp"
#include "control/model.hpp"
#include "control/settings.hpp"
#include "control/stall.hpp"
#include "hma/averager.hpp"
#include "hma/error.hpp"
#include "averager/request.hpp"
#include "support/mpi_library.hpp"
#include "support/mpi_static.hpp"
#include "support/log.hpp"
#include "support/keep.hpp"
#include "support/worker.hpp"
#include "transport/host.hpp"
#include "transport/ipc.hpp"
#include "transport/post.hpp"

namespace hma {

Schedule Averager::agreed(MPI_Comm comm, const std::function<Schedule(MPI_Comm)>& make) {
  std::optional<Schedule> s;
  detail::agree_on_duplicate(comm, [&](MPI_Comm ctrl) { s.emplace(make(ctrl)); });
  return std::move(*s);
}

Averager::Averager(MPI_Comm comm, Schedule schedule, AveragerOptions options)
    : schedule_(std::move(schedule)),
      hierarchy_(MPI_COMM_NULL, {}),
      scratch_(std::make_unique<detail::Scratch>()) {
  detail::require_mpi("averager");
  if (comm == MPI_COMM_NULL) return;  // not a member: count steps only
  // Construction's agreement runs on a duplicate: the caller's communicator sees only the dups.
  const Comm ctrl = Comm::attach(comm).dup();
  std::vector<int> sizes;
  detail::agree(ctrl.get(), [&] {
    int size = 0;
    check(MPI_Comm_size(comm, &size), "MPI_Comm_size");
    if (schedule_.world_size() != size)
      throw InvalidArgument("hma: the schedule is for " + std::to_string(schedule_.world_size()) +
                            " ranks but the communicator has " + std::to_string(size));
    settings_ = detail::resolve_settings(options);
    device_plan_ = std::make_unique<detail::DevicePlan>(detail::resolve_device_plan(options, settings_));
    for (const auto& l : schedule_.levels()) sizes.push_back(l.group_size);
    const std::size_t levels = sizes.size();
    if (settings_.outer.enabled) {
      if (settings_.outer.level == SIZE_MAX) settings_.outer.level = levels - 1;
      if (settings_.outer.level >= levels)
        throw InvalidArgument("hma: the outer optimizer's level " + std::to_string(settings_.outer.level) +
                              " does not exist: the schedule has levels 0 to " + std::to_string(levels - 1));
    }
    auto& w = settings_.wire;
    if (w.size() == 1) w.assign(levels, w[0]);
    if (w.empty()) w.assign(levels, Wire::exact);
    if (w.size() != levels)
      throw InvalidArgument("hma: the wire (AveragerOptions::wire or HMA_WIRE) lists " +
                            std::to_string(w.size()) + " levels, the schedule has " +
                            std::to_string(levels) + ": give one per level, or one for all");
  });
  const std::uint64_t fp[1] = {schedule_.fingerprint()};
  detail::check_same(ctrl.get(), fp, "the schedule", [this] { return schedule_.to_string(); });
  // Settings that change which collectives an average issues, or how long ranks wait, must agree
  // before the first collective that depends on them (ranks per node: before any split).
  detail::check_settings(ctrl.get(), settings_, *device_plan_);
  hierarchy_ = Hierarchy(comm, sizes, HierarchyOptions{settings_.ranks_per_node});
  diag_ = std::make_shared<detail::Diagnostics>(detail::next_averager_id(), hierarchy_.world().get(),
                                                schedule_.to_string());
  {
    std::vector<MPI_Comm> controls;
    std::vector<bool> shared;  // the level's group lies in one node: its checks through shared memory
    for (std::size_t i = 0; hierarchy_.member() && i < sizes.size(); ++i)
      if (const MPI_Comm c = hierarchy_.control(i).get();
          c != MPI_COMM_NULL && std::find(controls.begin(), controls.end(), c) == controls.end()) {
        controls.push_back(c);
        shared.push_back(settings_.check_shm && (settings_.check || settings_.nonfinite != NonFinite::ignore) &&
                         within_one_node(i));
      }
    checks_ = std::make_shared<detail::CheckChannels>(controls, shared);
  }
  if (settings_.outer.enabled) {
    outer_ = std::make_shared<detail::OuterState>();
    outer_->opt = settings_.outer;
  }
  if (settings_.divergence) divergence_ = std::make_shared<detail::DivergenceLog>();
  if (settings_.progress == Progress::thread) worker_ = std::make_unique<detail::Worker>();
  ipc_.resize(sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i)
    if (ipc_why(i).empty()) {
      // Its own communicator, made here where every rank is (collective): made lazily, inside
      // one average's progress, it would wait for ranks that progress another average first.
      ipc_[i] = std::make_shared<detail::IpcLevel>();
      if (const auto* t = hierarchy_.two_level(i); t != nullptr) {  // several whole nodes
        ipc_[i]->comm = t->intra.dup();
        ipc_[i]->whole = hierarchy_.level(i).dup();
        ipc_[i]->across = t->inter.dup();
      } else {
        ipc_[i]->comm = hierarchy_.level(i).dup();
      }
    }
  init_small_limits();
  if (hierarchy_.world().rank() == 0) {
    for (const auto& w : schedule_.warnings()) detail::log(detail::LogLevel::warn, w);
    detail::log(detail::LogLevel::info, describe());
  }
}

Averager::Averager(Averager&&) noexcept = default;
Averager& Averager::operator=(Averager&& o) noexcept {
  if (this == &o) return *this;
  finish_all();
  worker_.reset();  // joined before the communicators it uses go
  schedule_ = std::move(o.schedule_);
  hierarchy_ = std::move(o.hierarchy_);
  step_ = o.step_;
  weight_ = o.weight_;
  outer_ = std::move(o.outer_);
  divergence_ = std::move(o.divergence_);
  settings_ = o.settings_;
  scratch_ = std::move(o.scratch_);
  device_plan_ = std::move(o.device_plan_);
  ipc_ = std::move(o.ipc_);
  inflight_ = std::move(o.inflight_);
  spare_ = std::move(o.spare_);
  lean_ = std::move(o.lean_);
  small_ = std::move(o.small_);
  diag_ = std::move(o.diag_);
  checks_ = std::move(o.checks_);
  worker_ = std::move(o.worker_);
  return *this;
}

Averager::~Averager() { finish_all(); }

void Averager::finish_all() noexcept {
  if (detail::mpi_finalized()) {
    // Nothing can be completed or freed any more; the sets' averages can never complete.
    for (auto& w : inflight_)
      if (auto p = w.lock(); p && !p->done) {
        p->orphaned = true;
        detail::keep_forever(p);
      }
    inflight_.clear();
    hierarchy_.abandon();
    return;
  }
  // Open MPI 4.1 crashes when a communicator is freed under a pending non-blocking collective
  // (and lazily issued stages need it): complete this averager's averages first, waiting at
  // most one timeout, and only testing those that already timed out.
  bool leaked = false, gave_up = false;
  for (auto& w : inflight_) {
    auto p = w.lock();
    if (!p || p->done) continue;
    try {
      // Never launch a data stage here (its set may be going too); wait for a launched one at
      // most one timeout in all: after the first that does not finish, only test.
      if (p->launched) (void)detail::complete(*p, !p->timed_out && !gave_up);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "hma: destroying an averager: completing its in-flight average: %s\n",
                   e.what());
    }
    if (!p->done) {
      p->orphaned = true;
      detail::keep_forever(p);
      leaked = gave_up = true;
    }
  }
  inflight_.clear();
  if (leaked) {
    std::fprintf(stderr, "hma: destroying an averager with an average still in flight (a rank never "
                 "arrived): its communicators are leaked, not freed under MPI\n");
    // Its worker thread may be blocked for good in that average's MPI call: joining it would
    // hang this destructor. Leaked on purpose, like the communicators it uses, and so is all that
    // its job (or a started device average) may still write or read when a late peer completes
    // that call: the scratch buffers, the device plan, the two-level routes (abandon()).
    (void)worker_.release();
    detail::keep_alive_forever(std::move(scratch_));
    detail::keep_alive_forever(std::move(device_plan_));
    hierarchy_.abandon();
    for (auto& l : ipc_)
      if (l) l->comm.release();
  }
}

// Which algorithm level i's groups use, and why two-level is impossible where it was asked for.
std::string Averager::algorithm_line(std::size_t i) const {
  const Algorithm a = settings_.algorithm;
  const int g = schedule_.levels()[i].group_size, L = hierarchy_.ranks_per_node();
  if (hierarchy_.two_level(i) == nullptr) {
    if (a != Algorithm::two_level || g <= 1) return "";
    if (L > 0 && hierarchy_.contiguous_nodes() && g <= L) return "";  // within a node: flat is the way
    const std::string why = L == 0 ? "the nodes have unequal numbers of ranks"
                            : !hierarchy_.contiguous_nodes() ? "the nodes are not contiguous blocks of ranks"
                                                             : "a group of " + std::to_string(g) + " is not a whole number of nodes of " +
                                           std::to_string(L);
    return "    algorithm: flat: HMA_ALGORITHM=two_level needs groups of several whole nodes of equal "
           "size in contiguous rank blocks, but " + why + "\n";
  }
  const bool at_all = a != Algorithm::flat && (a == Algorithm::two_level || !hierarchy_.emulated_nodes());
  std::string chosen;
  if (!at_all) {
    chosen = "flat (HMA_ALGORITHM=flat, or auto on emulated nodes that share memory)";
  } else if (a == Algorithm::two_level) {
    chosen = "two-level (HMA_ALGORITHM=two_level)";
  } else {
    const std::size_t from = two_level_from(i);
    chosen = from == SIZE_MAX ? "flat at every size (auto"
             : from == 0      ? "two-level at every size (auto"
                              : "two-level from " + detail::format_bytes(from) + " (auto";
    chosen += ", cost model: " + settings_.model_source + ")" + (from != SIZE_MAX && from != 0 ? ", flat below" : "");
  }
  return "    algorithm: " + chosen + "\n";
}

std::int64_t Averager::id() const noexcept { return diag_ ? diag_->id : 0; }

std::string Averager::describe() const {
  if (!member()) return "hma: this rank is outside the averaging group\n";
  std::string s = "hma: model averaging " + schedule_.to_string() + "\n";
  s += hierarchy_.describe();
  const auto& lv = schedule_.levels();
  if (schedule_.kind() == Schedule::Kind::periodic) {
    s += "  all " + std::to_string(lv[0].group_size) + " ranks average parameters every " +
         std::to_string(lv[0].period) + " steps from step " + std::to_string(schedule_.warmup()) +
         "\n";
    s += algorithm_line(0);
  } else {
    for (std::size_t i = 0; i < lv.size(); ++i) {
      s += "  each group of " + std::to_string(lv[i].group_size) +
           " ranks averages parameters every " + std::to_string(lv[i].period) + " steps" +
           (i + 1 < lv.size() ? ", if no higher level averages" : "") + "\n";
      s += algorithm_line(i);
    }
    if (schedule_.warmup() > 0)
      s += "  no averaging before step " + std::to_string(schedule_.warmup()) + "\n";
  }
  if (settings_.outer.enabled)
    s += "  outer optimizer at level " + std::to_string(settings_.outer.level) + ": " +
         detail::outer_text(settings_.outer) + " (host sets)\n";
  for (std::size_t i = 0; i < settings_.wire.size(); ++i)
    if (settings_.wire[i] != Wire::exact)
      s += "  level " + std::to_string(i) + " sends " + detail::wire_text({settings_.wire[i]}) +
           " on the wire (f32 additions; two-level: across nodes only, exact within)\n";
  if (settings_.divergence) s += "  divergence measured at every average (host sets)\n";
  if (schedule_.post_local_switch() > 0)
    s += "  post-local SGD: all " + std::to_string(schedule_.world_size()) +
         " ranks average at every step before step " +
         std::to_string(schedule_.post_local_switch()) + ", the levels above from then on\n";
  char secs[32];
  std::snprintf(secs, sizeof secs, "%g s", settings_.timeout_s);
  s += std::string("  agreement check before each average: ") +
       (settings_.check ? "on" : "OFF (HMA_CHECK=0: unsafe)") + "; timeout " +
       (settings_.timeout_s > 0 && settings_.timeout_s <= 1e9 ? secs : "none");
  for (std::size_t i = 0; settings_.check && hierarchy_.member() && i < lv.size(); ++i)
    s += std::string(i == 0 ? "; " : ", ") + "level " + std::to_string(i) +
         (checks_->shared_memory(hierarchy_.control(i).get()) ? " through shared memory" : " as messages");
  s += "\n";
  s += "  " + device_path() + "\n";
  return s;
}

// ---------------------------------------------------------------- torch-named averagers

namespace {
int size_or_one(MPI_Comm comm) {
  if (comm == MPI_COMM_NULL) return 1;
  int s = 0;
  check(MPI_Comm_size(comm, &s), "MPI_Comm_size");
  return s;
}

// Ranks per node for the 'node' token of a schedule string: from options, HMA_RANKS_PER_NODE,
// or the shared-memory split (0 when nodes differ in size). Collective over comm; the setting
// is agreed before the split that depends on it.
int node_size(MPI_Comm comm, const AveragerOptions& o) {
  const int rpn = detail::agreed_ranks_per_node(comm, o.hierarchy.ranks_per_node);
  if (rpn > 0) return rpn;
  Comm shared = Comm::attach(comm).split_shared();
  const auto [lo, hi] = detail::min_max(comm, shared.size());
  return lo == hi ? lo : 0;
}

MPI_Comm require(MPI_Comm comm) {
  if (comm == MPI_COMM_NULL)
    throw InvalidArgument("hma: HierarchicalAverager: comm is MPI_COMM_NULL; every rank of the "
                          "hierarchy must pass the same (non-null) communicator");
  return comm;
}
}  // namespace

PeriodicAverager::PeriodicAverager(MPI_Comm comm, std::int64_t period, std::int64_t warmup,
                                   AveragerOptions options)
    : Averager(comm,
               agreed(comm, [&](MPI_Comm c) { return Schedule::periodic(period, warmup, size_or_one(c)); }),
               options) {}

HierarchicalAverager::HierarchicalAverager(MPI_Comm comm, std::vector<Level> levels,
                                           std::int64_t warmup, AveragerOptions options)
    : Averager(comm, agreed(comm, [&](MPI_Comm c) {
                 require(c);
                 return Schedule::hierarchical(std::move(levels), warmup, size_or_one(c));
               }),
               options) {}

HierarchicalAverager::HierarchicalAverager(MPI_Comm comm, std::string_view spec,
                                           std::int64_t warmup, AveragerOptions options)
    : Averager(comm, agreed(comm, [&](MPI_Comm c) {
                 require(c);
                 return Schedule::parse(spec, warmup, size_or_one(c), node_size(c, options));
               }),
               options) {}

}  // namespace hma
