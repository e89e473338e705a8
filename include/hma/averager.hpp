// hma/averager.hpp: drives the step counter and averages a ParamSet on the scheduled level.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "hma/buffer.hpp"
#include "hma/device.hpp"
#include "hma/hierarchy.hpp"
#include "hma/options.hpp"
#include "hma/schedule.hpp"

namespace hma {

namespace detail {
struct Pending;
struct Prepared;
struct DevicePlan;
struct OuterState;
struct DivergenceLog;
class Post;
class Worker;
struct IpcLevel;
struct Diagnostics;
struct CheckChannels;
struct Scratch;
struct Header;
struct Route;
}  // namespace detail


/// The handle of a started, non-blocking average. Move-only.
/// `wait()` completes it (the ParamSet then holds the average; packed user arrays are written
/// back); `test()` completes it if it can without blocking. The destructor of a Request whose
/// average is still in flight WAITS for it: MPI forbids dropping or cancelling a started
/// collective, so hma never does. A Request for a step where this rank does not average is
/// empty: `active()` is false and wait/test return at once.
/// Errors: hma::Error if MPI fails. Not thread safe.
class [[nodiscard]] Request {
 public:
  Request() noexcept = default;
  Request(Request&& other) noexcept : pending_(std::move(other.pending_)), level_(other.level_) {
    other.level_.reset();
  }
  Request& operator=(Request&& other) noexcept;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  ~Request();

  /// Blocks until the average is complete. Calling it again is a no-op. With a timeout set on
  /// the averager, throws hma::Timeout past it; the average stays in flight and wait() may be
  /// called again.
  void wait();
  /// Non-blocking: drives MPI progress; true when the average is complete (then as after wait()).
  bool test();
  /// True while started and not yet completed.
  [[nodiscard]] bool active() const noexcept;
  /// The level being averaged, or nullopt for an empty request.
  [[nodiscard]] std::optional<std::size_t> level() const noexcept { return level_; }

 private:
  friend class Averager;
  Request(std::shared_ptr<detail::Pending> p, std::size_t level) noexcept
      : pending_(std::move(p)), level_(level) {}
  // Lets go of the average without waiting (it stays in flight in its ParamSet).
  void detach() noexcept { pending_.reset(); }
  std::shared_ptr<detail::Pending> pending_;
  std::optional<std::size_t> level_;
};

/// Averages a ParamSet over the level its Schedule picks at each step, like torch's
/// `average_parameters` (divide by the group size, then allreduce SUM, then unpack), and counts
/// steps. Construction is collective over `comm`: it duplicates `comm`, builds the hierarchy
/// (MPI_Comm_split per level) and checks that all ranks hold the same schedule and the same
/// settings that decide which collectives an average issues (chunk sizes, reduction,
/// algorithm, progress, non-finite guard, check, timeout, ranks per node, device path),
/// throwing hma::MismatchError on every rank if not. `step()` and `start()` are collective over
/// the ranks of the chosen level's group; every rank of `comm` must call them in the same order
/// and with sets of the same layout: the agreement check (AveragerOptions::check_every_average,
/// on by default) verifies it before any data moves.
/// The caller owns MPI: MPI must be initialised before and finalised after the Averager's life;
/// any use after MPI_Finalize throws hma::Error (destructors then do nothing).
/// Destroying (or assigning to) an averager first completes the averages it started that are
/// still in flight (their collectives run on its communicators), waiting at most one timeout;
/// one that already timed out is only tested, and if still in flight its communicators are
/// leaked rather than freed under MPI. Not thread safe.
class Averager {
 public:
  /// `schedule.world_size()` must equal the size of `comm`.
  Averager(MPI_Comm comm, Schedule schedule, AveragerOptions options = {});
  Averager(Averager&&) noexcept;
  Averager& operator=(Averager&&) noexcept;
  ~Averager();

  /// Blocking. Averages `params` if the schedule says so at the current step, then advances the
  /// step counter. Returns true if this rank averaged. On an exception the step does not advance,
  /// except after hma::Timeout: the average was issued and is still in flight (the step counts),
  /// and `params.wait()` keeps waiting for it.
  bool step(ParamSet& params);
  /// Non-blocking form of step(): waits until every rank of the group has reached this average
  /// (the agreement check, up to the timeout; hma::Timeout or hma::MismatchError as for step()),
  /// then starts moving the data and advances the step counter; the data movement overlaps your
  /// work. Do not touch `params` until the Request completes. With Progress::poll this is an
  /// out-of-place MPI_Iallreduce from a scaled copy (faster than in place on Open MPI 4.1; the
  /// ParamSet keeps that copy, so it holds twice its bytes); with Progress::thread the worker
  /// thread runs the blocking path. Throws hma::Error if `params` already has an average in
  /// flight.
  [[nodiscard]] Request start(ParamSet& params);

  /// Blocking: averages `params` over level `level` now, outside the schedule; the step counter
  /// is untouched (e.g. a final world average at the end of training). Collective over the
  /// level's group, on every rank of the averager. Throws hma::InvalidArgument for a bad level.
  void average(ParamSet& params, std::size_t level);
  /// Non-blocking form of average(params, level).
  [[nodiscard]] Request start_average(ParamSet& params, std::size_t level);

  /// Device buffers: as step()/start()/average()/start_average() above, for a DeviceParamSet.
  /// `stream` is the CUDA stream whose work produced the data: hma records an event on it and
  /// waits for that event only (never cudaDeviceSynchronize) before reading the buffers. When
  /// the blocking call returns, or the Request's wait()/test() completes, `stream` is ordered
  /// after the result (cudaStreamWaitEvent): later work on it sees the average without any
  /// host synchronisation; host code that reads the arrays calls params.synchronize() first.
  /// The path through MPI (direct or staged) is this averager's DevicePath choice. `stream` must
  /// belong to the set's device (nullptr: that device's legacy stream); hma makes the set's
  /// device current inside the call and restores the caller's current device before returning.
  bool step(DeviceParamSet& params, Stream stream = nullptr);
  [[nodiscard]] Request start(DeviceParamSet& params, Stream stream = nullptr);
  void average(DeviceParamSet& params, std::size_t level, Stream stream = nullptr);
  [[nodiscard]] Request start_average(DeviceParamSet& params, std::size_t level,
                                      Stream stream = nullptr);
  /// The path device buffers take through MPI and why, one line (also in describe()).
  [[nodiscard]] std::string device_path() const;

  /// Weighted averaging: this rank's weight in the averages that follow (default 1; local, not
  /// collective; keep it until you change it). Each average then gives
  /// sum_i(w_i x_i) / sum_i(w_i) over its group, in the same single reduction of the data: the
  /// weights travel in the agreement check, summed exactly (as multiples of 2^-32, so weights are
  /// rounded to those). Each rank scales its terms by w_i / sum(w) in double, rounded once to the
  /// element type; when all weights of the group are equal the average is the plain one, bit for
  /// bit. A group whose weights sum to zero throws hma::InvalidArgument on every rank of it and
  /// averages nothing. Host and device sets alike (a device set's pack kernel multiplies by the
  /// factor in double). Throws
  /// hma::InvalidArgument for a weight that is not finite, negative or >= 2^31, and when the
  /// agreement check is off (it carries the weights).
  void set_weight(double weight);
  /// This rank's weight (as rounded to a multiple of 2^-32).
  [[nodiscard]] double weight() const noexcept;

  /// With AveragerOptions::divergence: the spread measured at the last average of this averager
  /// that has completed on this rank (blocking, a Request's wait/test, or with Progress::thread
  /// the worker, possibly before wait()); an average's value is the same on every rank of its
  /// group, but with several started averages in flight ranks may complete them in different
  /// orders (compare Divergence::step). Also logged (HMA_LOG=info, by the group's first rank).
  /// nullopt before the first one, and always without the option. Sets without bf16/fp16
  /// arrays, host or device.
  ///
  /// Cost for start() without the progress thread: the metric's maximum is the average's last
  /// collective and needs all of its data, so the next average issued on this averager (any
  /// level) first waits until this one's data has completed (with the timeout).
  [[nodiscard]] std::optional<Divergence> last_divergence() const;

  /// The level that averages at the current step (nullopt: none).
  [[nodiscard]] std::optional<std::size_t> level_now() const noexcept;
  [[nodiscard]] std::int64_t step_count() const noexcept { return step_; }
  /// Sets this rank's step counter (a restart). Local, not collective, and it waits for
  /// nothing: set the same step on every rank. The next average's agreement check compares the
  /// step counters of its group and throws hma::MismatchError on every rank of it if they differ.
  /// Throws hma::InvalidArgument for a step below 0 or above kMaxStep (2^62); step()/start() at
  /// kMaxStep throw hma::InvalidArgument rather than count past it (the counter never overflows).
  void set_step(std::int64_t step);
  [[nodiscard]] const Schedule& schedule() const noexcept { return schedule_; }
  [[nodiscard]] const Hierarchy& hierarchy() const noexcept { return hierarchy_; }
  /// False on a rank outside the averager's communicator (a null comm): it never averages.
  [[nodiscard]] bool member() const noexcept { return hierarchy_.member(); }
  /// The averager's state as text: the step counter, the schedule and its fingerprint, the
  /// world size; with an outer optimizer that has anchored, its state too (anchor and momentum,
  /// base64: about 2.7 bytes of text per byte of the set). Save it with your model; see restore().
  [[nodiscard]] std::string checkpoint() const;
  /// Collective: sets the step counter (and the outer optimizer's state: from the checkpoint, or
  /// reset to "not anchored" when it carries none) from checkpoint() text. Throws
  /// hma::InvalidArgument on every rank when the text is not an hma checkpoint, was written for
  /// another schedule or world size (naming both), carries outer state this averager has no
  /// optimizer for (or for another level), or that state is damaged; hma::MismatchError when
  /// ranks restored different steps or outer states.
  void restore(std::string_view checkpoint);
  /// checkpoint() to a file / restore() from one (hma::Error when the file cannot be written
  /// or read).
  void save_checkpoint(const std::string& path) const;
  void load_checkpoint(const std::string& path);

  /// The torch-style log of the hierarchy: which group averages how often.
  [[nodiscard]] std::string describe() const;
  /// This averager's id in stall warnings and hma::Timeout messages ("averager 2 step 5 level
  /// 0"): 1, 2, ... in the order this process constructed averagers (equal on every rank when
  /// every rank constructs the same averagers in the same order). 0 for a moved-from averager.
  [[nodiscard]] std::int64_t id() const noexcept;

  /// For bindings (the C API uses it for a NULL set): collective like the call it stands for,
  /// average(level) or, with nullopt, step()/start(). Takes part in that average's agreement check
  /// as "invalid here" with `reason` (without "hma: "), so that every rank of the group throws
  /// the same hma::InvalidArgument at once, naming this rank and the reason, and nothing is
  /// averaged. An out-of-range level joins the check of the world level (the last). Throws
  /// locally when no average is due at this step or the check is off (HMA_CHECK=0); hma::Timeout
  /// when the group does not arrive. Always throws.
  [[noreturn]] void refuse(std::optional<std::size_t> level, const std::string& reason);

 protected:
  // Builds the schedule with `make` on every rank of comm; if it throws anywhere, throws
  // everywhere (no rank is left waiting in a collective). `make` gets a duplicate of comm for
  // any collective it needs: hma's agreement never runs on the caller's communicator.
  static Schedule agreed(MPI_Comm comm, const std::function<Schedule(MPI_Comm ctrl)>& make);

 private:
  // What a set (host or device) hands the orchestrator for one average: the pending average
  // with its data launch, the header its group must agree on, its non-finite vote, and how to
  // hang the average on the set. See lib/averager/averager.cpp.
  // (a reference to the caller's lambda, valid for the call it is passed to: no std::function
  // to build per average)
  class Prepare {
   public:
    template <class F>
    Prepare(const F& f) noexcept  // NOLINT: converts from any such callable
        : obj_(&f), fn_([](const void* o, std::size_t l, bool b, bool s) { return (*static_cast<const F*>(o))(l, b, s); }) {}
    detail::Prepared operator()(std::size_t level, bool blocking, bool scheduled) const;

   private:
    const void* obj_;
    detail::Prepared (*fn_)(const void*, std::size_t, bool, bool);
  };
  // step()/start() and average()/start_average() for either kind of set.
  // `lean`: the host set of a blocking call, which may take the lean path (lean()).
  bool scheduled(bool blocking, Request* out, const Prepare& prepare, ParamSet* lean = nullptr);
  bool at_level(std::size_t level, bool blocking, Request* out, const Prepare& prepare,
                ParamSet* lean = nullptr);
  // A blocking host average without the general path's record keeping (lib/averager/lean.cpp):
  // its sums land from its agreement check, or its data moves right after it; nullopt when it
  // does not apply, else what step()/average() return (a check still open after a few polls,
  // or one that did not pass plainly, is handed to the general path, which completes it).
  std::optional<bool> lean(ParamSet& params, std::size_t level, bool scheduled);
  // Per level, fixed at construction by the settings (lean.cpp): the largest host set whose
  // f32/f64 terms ride in its agreement check (0: none; prepare_host stages them), whether its
  // blocking host averages take the lean path, the level's group size and control
  // communicator (owned by hierarchy_).
  struct SmallLimits {
    std::size_t fused = 0;
    bool lean = false;
    int group = 0;
    MPI_Comm control = MPI_COMM_NULL;
  };
  void init_small_limits();
  // The control stage, then the data stage: blocking (out null) or started into *out.
  bool issue(detail::Prepared job, std::size_t level, bool blocking, Request* out);
  // prepare(...), with an hma::InvalidArgument it throws turned into refuse(): the group hears.
  detail::Prepared prepared(const Prepare& prepare, std::size_t level, bool blocking, bool scheduled);
  // `started`: a record whose agreement check the lean path already started (its land_fused set).
  detail::Prepared prepare_host(ParamSet& params, std::size_t level, bool blocking, bool scheduled,
                                std::shared_ptr<detail::Pending> started = nullptr);
  // How a host set's data moves at `level` (group > 1), with `post` after the sum (or none).
  detail::Route host_route(const ParamSet& params, std::size_t level, detail::Post* post) const;
  // What every rank of the group must hold alike for an average of a host set.
  [[nodiscard]] detail::Header host_header(ParamSet& params, std::size_t level, bool scheduled) const;
  detail::Prepared prepare_device(DeviceParamSet& params, std::size_t level, bool blocking,
                                  bool scheduled, Stream stream);
  // MPI needs collectives on a communicator in the same order on every rank: before issuing
  // any, make sure every average in flight that issues lazily (after its check, chained
  // two-level stages, device paths) has issued all of its own.
  void settle_issue();
  // The outer optimizer and divergence work of an average, host or device set (null: none);
  // sets p.refusal when the outer state belongs to another layout.
  std::shared_ptr<detail::Post> make_post(const std::shared_ptr<detail::Pending>& p, std::uint64_t layout,
                                          std::size_t nf, std::size_t nd);
  // An average at the outer optimizer's level first completes the previous one there: its
  // update of the optimizer's state must be in before the next average reads it, alike on all
  // ranks.
  void settle_outer(std::size_t level);
  // This rank's group at the outer optimizer's level (contiguous blocks of its group size).
  [[nodiscard]] std::size_t outer_group() const;
  // Unlists the finished averages from inflight_ (before one of their records is recycled).
  void drop_finished();
  // A new pending average of `bytes` at `level` (registered in inflight_); `started`: the lean
  // path's record, taken as it is (its check in flight) instead of a new or recycled one.
  std::shared_ptr<detail::Pending> new_pending(std::size_t level, std::size_t bytes,
                                               std::shared_ptr<detail::Pending> started = nullptr);
  // Throws hma::Error naming `who` unless MPI is usable and this averager was not abandoned.
  void require_usable(const char* who) const;
  // Completes every average still in flight (destructor, move assignment); after a timeout it
  // only tests, and leaks the communicators of what is still in flight.
  void finish_all() noexcept;
  bool use_two_level(std::size_t level, std::size_t bytes) const;
  // auto: the smallest size from which the cost model predicts two-level faster than flat at
  // `level` (SIZE_MAX: never), for groups of whole nodes.
  std::size_t two_level_from(std::size_t level) const;
  // True when every group of `level` lies inside one (detected) node, or nodes are emulated.
  bool within_shared_memory(std::size_t level) const;
  // True when every group of `level` lies inside one node, detected or emulated.
  bool within_one_node(std::size_t level) const;
  // Empty when the node transport may average device sets at `level`, else why not.
  std::string ipc_why(std::size_t level) const;
  std::string algorithm_line(std::size_t level) const;

  Schedule schedule_;
  Hierarchy hierarchy_;
  std::int64_t step_ = 0;
  std::uint64_t weight_ = std::uint64_t{1} << 32;  // set_weight(): in 2^-32 units
  detail::Settings settings_;
  std::unique_ptr<detail::Scratch> scratch_;  // the ring's receive buffers (transport/host.hpp)
  std::unique_ptr<detail::DevicePlan> device_plan_;
  // Per level: the node transport for device sets (null where it does not apply; see ipc_why()).
  std::vector<std::shared_ptr<detail::IpcLevel>> ipc_;
  std::shared_ptr<detail::OuterState> outer_;          // AveragerOptions::outer
  std::shared_ptr<detail::DivergenceLog> divergence_;  // AveragerOptions::divergence
  std::vector<std::weak_ptr<detail::Pending>> inflight_;  // see finish_all(), settle_issue()
  // The record of the last average, reused by the next one when nothing else holds it any more
  // and it is finished (Pending::reusable): a small average then allocates nothing for it.
  std::shared_ptr<detail::Pending> spare_;
  // The lean path's record: only its check is used while it serves that path, so it stays fresh
  // for a handover to the general path (which sets its fields; recycled once done).
  std::shared_ptr<detail::Pending> lean_;
  std::vector<SmallLimits> small_;  // by level (empty on a non-member)
  std::shared_ptr<detail::Diagnostics> diag_;  // id() and "where are you?" (control/stall.hpp)
  std::shared_ptr<detail::CheckChannels> checks_;  // where its agreement checks travel (control/check.hpp)
  std::unique_ptr<detail::Worker> worker_;  // Progress::thread only; declared last: joined first
};

/// torch's PeriodicModelAverager: averages over all of `comm` every `period` steps after
/// `warmup` steps. A rank whose `comm` is MPI_COMM_NULL is outside the group: it only counts
/// steps (torch: "ranks not in the process group do nothing").
class PeriodicAverager : public Averager {
 public:
  PeriodicAverager(MPI_Comm comm, std::int64_t period, std::int64_t warmup = 0,
                   AveragerOptions options = {});
};

/// torch's HierarchicalModelAverager: `levels` are (period, group size) with periods strictly
/// increasing and the last group size equal to the size of `comm`.
class HierarchicalAverager : public Averager {
 public:
  HierarchicalAverager(MPI_Comm comm, std::vector<Level> levels, std::int64_t warmup = 0,
                       AveragerOptions options = {});
  /// Levels from a string, see Schedule::parse ("2:node,8:world" is allowed).
  HierarchicalAverager(MPI_Comm comm, std::string_view spec, std::int64_t warmup = 0,
                       AveragerOptions options = {});
};

}  // namespace hma
