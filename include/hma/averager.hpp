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
struct Scratch {  // the ring's receive buffers; on the heap so a worker job can keep using them
  std::vector<float> f;
  std::vector<double> d;
};
}  // namespace detail

/// How a started (non-blocking) average makes progress.
enum class Progress {
  /// MPI_Iallreduce; it advances inside MPI calls only (Open MPI has no progress thread):
  /// call Request::test() from your compute loop, or it all happens in wait().
  poll,
  /// A background thread of the averager runs the blocking, chunked MPI_Allreduce, so once
  /// start() returns (after the group's agreement check) the reduction overlaps your work with
  /// no polling. Needs MPI initialised
  /// with MPI_Init_thread(MPI_THREAD_MULTIPLE). Blocking step()/average() go through the same
  /// thread, in order.
  thread,
};

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

/// How a blocking average (and a progress-thread one) reduces a buffer.
enum class Reduction {
  /// ring when the level's groups lie inside one node (shared memory) and each rank's block of a
  /// piece (piece bytes / group size) has at least HMA_RING_MIN_BLOCK_BYTES (default
  /// kDefaultRingMinBlockBytes), else mpi. Measured on Open MPI 4.1: over shared memory the ring
  /// wins on large blocks and loses on small ones; across nodes (TCP) Open MPI's allreduce wins.
  automatic,
  /// Divide by the group size in one pass, then MPI_Allreduce(SUM) in place: torch's recipe
  /// (with chunk_bytes 0, bit for bit; in pieces, MPI may add in another order per piece).
  mpi,
  /// hma's ring allreduce over MPI_Sendrecv (reduce-scatter, then allgather) with the division
  /// folded into its additions: the same terms x / g as torch's recipe, added in the ring's
  /// order (other bits than one MPI_Allreduce for some elements at 3+ ranks; see README
  /// "Exactness"), without the extra pass over the buffer.
  ring,
};

/// What to do when a buffer about to be averaged holds a NaN or an infinity.
enum class NonFinite {
  ignore,  ///< average it (torch's behaviour; the NaN spreads to the whole group)
  error,   ///< throw hma::NonFiniteError on every rank of the group, naming the ranks
  skip,    ///< skip this average on every rank of the group (logged as a warning)
};

/// How a level whose groups span several whole nodes reduces.
enum class Algorithm {
  /// On real (detected) nodes: two_level for the sizes where hma's cost model predicts it faster
  /// than flat (HMA_MODEL names a calibration from `hma-model calibrate`; else defaults for a
  /// 10 Gbit/s TCP network); describe() says from which size. Flat on emulated nodes
  /// (HMA_RANKS_PER_NODE), which share one machine's memory.
  automatic,
  /// One allreduce over the whole group.
  flat,
  /// Reduce-scatter within each node, allreduce across nodes (ranks of equal node-local rank),
  /// allgather within the node: each rank sends only 1/L of the bytes across nodes.
  two_level,
};

/// How device buffers (DeviceParamSet) go through MPI. Chosen once per averager, logged at
/// construction (HMA_LOG=info) and shown by describe(). See README "Device buffers".
enum class DevicePath {
  /// direct where the MPI is CUDA-aware (blocking calls: MPI_Allreduce on device pointers;
  /// start(): MPI_Allreduce on the progress thread with Progress::thread, MPI_Iallreduce only on
  /// MVAPICH2, else staged), staged elsewhere (Debian's Open MPI is not CUDA-aware).
  automatic,
  /// Always through pinned host memory in chunks, pipelined (copies overlap the reductions).
  staged,
  /// Always device pointers to MPI, also MPI_Iallreduce for start() with Progress::poll (Open
  /// MPI documents no CUDA support in non-blocking collectives: opt in only where you know it
  /// works). Needs a CUDA-aware MPI (hma::InvalidArgument otherwise).
  direct,
};

/// How a device set's pack kernel divides by the group size (host sets always divide: x / g).
enum class DeviceDivision {
  /// x / g in IEEE arithmetic, as torch does on the CPU and hma's host path: device and host
  /// averages have the same terms. (For a power-of-two g computed as x * (1/g): the same bits.)
  divide,
  /// x * fl(1/g), as torch does for CUDA tensors (ATen's div_true_kernel_cuda multiplies by the
  /// reciprocal computed on the host, "may lose one bit"): about a third of the elements differ
  /// from x / g by one ulp for g = 3, 6, 12, 24. Choose it to match torch on GPUs bit for bit.
  reciprocal,
};

/// How a level's average travels (AveragerOptions::wire).
enum class Wire {
  /// The set's own element types (f32, f64): the average torch computes.
  exact,
  /// bfloat16 on the wire: each rank's scaled terms rounded to bf16 (8 significant bits), summed
  /// by MPI with hma's op (each addition in f32, its result rounded to bf16), the result widened
  /// back. Half the bytes of f32 (a quarter of f64; f64 values are rounded to 16 bits directly).
  /// See README "Beyond torch's averagers" for the error bound.
  bf16,
  /// IEEE half precision on the wire (11 significant bits, largest finite 65504: larger values
  /// become infinities), otherwise as bf16.
  fp16,
};

/// An outer optimizer at one level (SlowMo; DiLoCo uses nesterov, lr 0.7, momentum 0.9): instead
/// of replacing the parameters by the group's average `a`, treats delta = anchor - a as a
/// pseudo-gradient, anchor being the parameters after the previous average at this level, and
/// steps SGD with momentum from the anchor:
///   m = momentum * m + delta;  d = nesterov ? delta + momentum * m : m;  x = anchor - lr * d
/// (computed as x = a - (lr * d - delta), so lr 1 and momentum 0 give x = a bit for bit wherever
/// delta is finite; an infinite delta (an average that overflowed) gives NaN, and a NaN or
/// infinity in the anchor or momentum stays there, as in any optimizer's state); then anchor = x. The first average at the level only sets anchor = a and m = 0 (the ranks'
/// parameters differ before it; every rank of the group holds the same anchor after it). State
/// (anchor, m: one copy of the set each, per element type) lives in the averager, belongs to the
/// first set averaged at the level, and is part of checkpoint(). An average at this level first
/// completes the previous one there (its update must be in before the next reads the state, on
/// every rank alike). Host ParamSets with f32/f64 arrays only.
struct OuterOptimizer {
  double lr = 1;         ///< outer learning rate, > 0 and finite
  double momentum = 0;   ///< in [0, 1)
  bool nesterov = false; ///< Nesterov momentum (needs momentum > 0, as in torch)
  /// The level it applies at; nullopt: the last (world) level.
  std::optional<std::size_t> level;
};

struct AveragerOptions {
  HierarchyOptions hierarchy;
  /// The agreement check (default ON): before an average moves any data, every rank of its group
  /// confirms, in one tiny non-blocking collective on a control communicator of its own, that
  /// they are all at the same step, in the same kind of call (step()/start() or
  /// average()/start_average()), at the same level, with the same kind of set and buffer layout;
  /// it is waited for with the timeout. A mismatch throws hma::MismatchError on every rank of the
  /// group naming the ranks and both values; a rank that never arrives gives hma::Timeout.
  /// false (HMA_CHECK=0) skips it: UNSAFE, a rank that diverges then hangs its group or mixes
  /// data of different steps. nullopt: the environment variable HMA_CHECK, default on.
  std::optional<bool> check_every_average;
  /// Blocking averages scale and reduce the buffer in pieces of this many bytes (0: one piece),
  /// so that each piece is still in cache when MPI reads it. MPI may add a piece in another
  /// order than the whole buffer (README "Exactness"). The blocking two-level average pipelines
  /// its own pieces, at most 1 MiB and at most this size (0 sets no cap there). nullopt: the
  /// environment variable HMA_CHUNK_BYTES, else the default kDefaultChunkBytes.
  std::optional<std::size_t> chunk_bytes;
  static constexpr std::size_t kDefaultChunkBytes = std::size_t{4} << 20;
  /// nullopt: the environment variable HMA_PROGRESS (poll or thread), default poll.
  std::optional<Progress> progress;
  /// Seconds a wait may last before it throws hma::Timeout naming the level, step, bytes and
  /// ranks of the group: the wait for every rank of the group to reach an average (the
  /// agreement check) and, for a started average, Request::wait(). The blocking data collective
  /// of step()/average() that follows a passed check runs as a plain blocking MPI call (every
  /// rank is there). 0 or infinity: no limit; NaN and negative values are refused. nullopt: the
  /// environment variable HMA_TIMEOUT_S ("inf" allowed), default kDefaultTimeoutS (30 minutes,
  /// as torch's process groups). Must agree across ranks (checked at construction).
  std::optional<double> timeout_s;
  static constexpr double kDefaultTimeoutS = 1800;
  /// Non-finite guard: scans the local buffers (one pass) and votes in the agreement check, so a
  /// group never averages on some ranks and not on others. nullopt: the environment variable
  /// HMA_NONFINITE (off, throw, skip), default off.
  std::optional<NonFinite> nonfinite;
  /// nullopt: the environment variable HMA_ALGORITHM (auto, flat or two_level), default auto.
  /// Levels within one node, or whose groups are not whole nodes, are always flat.
  std::optional<Algorithm> algorithm;
  /// nullopt: the environment variable HMA_REDUCTION (auto, mpi or ring), default auto.
  std::optional<Reduction> reduction;
  static constexpr std::size_t kDefaultRingMinBlockBytes = std::size_t{64} << 10;
  /// nullopt: the environment variable HMA_DEVICE_PATH (auto, staged or direct), default auto.
  std::optional<DevicePath> device_path;
  /// Whether the MPI accepts device pointers. nullopt: the environment variable HMA_CUDA_AWARE
  /// (0 or 1), else MPIX_Query_cuda_support() where the MPI has it (Open MPI), else
  /// MV2_USE_CUDA=1 on MVAPICH2, else false.
  std::optional<bool> cuda_aware;
  /// The staged path's chunk: bytes copied and reduced at a time (0: one chunk per dtype).
  /// nullopt: HMA_STAGING_CHUNK_BYTES, default kDefaultStagingChunkBytes.
  std::optional<std::size_t> staging_chunk_bytes;
  static constexpr std::size_t kDefaultStagingChunkBytes = std::size_t{4} << 20;
  /// The staged path's pinned slots (chunks in flight at once, 1..64); each holds 2 chunks.
  /// nullopt: HMA_STAGING_SLOTS, default kDefaultStagingSlots.
  std::optional<std::size_t> staging_slots;
  static constexpr std::size_t kDefaultStagingSlots = 3;
  /// nullopt: the environment variable HMA_DEVICE_DIVISION (divide or reciprocal), default divide.
  std::optional<DeviceDivision> device_division;
  /// The outer optimizer. nullopt: the environment variable HMA_OUTER, e.g.
  /// "lr=0.7,momentum=0.9,nesterov" (keys lr, momentum, nesterov, level), default none.
  std::optional<OuterOptimizer> outer;
  /// The divergence metric at each average (see Averager::last_divergence()), over sets of f32
  /// and f64 arrays (an average of a set with bf16/fp16 arrays throws hma::InvalidArgument on
  /// every rank of its group while this is on; so does one at an outer optimizer's level): costs one copy of
  /// the set's values taken on the way (per piece, in cache, in blocking flat averages), one
  /// pass after the average and one MPI_Allreduce of one double on the level's communicator.
  /// nullopt: the environment variable HMA_DIVERGENCE (0 or 1), default off.
  std::optional<bool> divergence;
  /// Per level: how its average travels (exact, bf16, fp16); one entry for every level, or one
  /// entry for all. On a flat level MPI_Allreduce sums the 16-bit terms (never hma's ring); on a
  /// two-level one only the stage across nodes is 16-bit (blocking and start() alike).
  /// Host ParamSets only (a DeviceParamSet averaged at such a level throws hma::InvalidArgument).
  /// nullopt: the environment variable HMA_WIRE ("exact,bf16": per level; "bf16": all),
  /// default exact.
  std::optional<std::vector<Wire>> wire;
};

/// The group's spread at one average: max over its ranks i of ||x_i - mean|| / ||mean||, the
/// norms over every element of the set (both element types), x_i the rank's values as they went
/// in, mean the average (weighted, where weights differ). 0 when all ranks held the same values;
/// +infinity when the mean is zero and the values were not.
struct Divergence {
  std::size_t level = 0;
  std::int64_t step = 0;  ///< the step counter of the average
  double value = 0;
};

namespace detail {
/// The cost model's link parameters (control/model.hpp): defaults, or a calibration file named
/// by HMA_MODEL (written by `hma-model calibrate`).
struct LinkModel {
  double inter_alpha_us = 20;        // across nodes: per message
  double inter_bytes_per_s = 1.25e9;  // across nodes: one way, one process (10 Gbit/s)
  double inter_duplex = 0.5;         // rate each way when one process sends and receives at once
  double intra_alpha_us = 5;         // within a node: a reduce-scatter + allgather pair
  double intra_bytes_per_s = 2e9;    // ... bytes of the buffer per second
  double flat_bytes_per_s = 0.625e9; // MPI_Allreduce over the group: bytes per node across
};

/// The outer optimizer as resolved (enabled false: none); level SIZE_MAX: the last level.
struct OuterSettings {
  bool enabled = false;
  double lr = 1, momentum = 0;
  bool nesterov = false;
  std::size_t level = SIZE_MAX;
};

/// The options resolved against the environment on one rank (control/settings.cpp), then
/// checked to agree across ranks.
struct Settings {
  bool check = true;
  std::size_t chunk_bytes = AveragerOptions::kDefaultChunkBytes;
  Reduction reduction = Reduction::automatic;
  std::size_t ring_min_block_bytes = AveragerOptions::kDefaultRingMinBlockBytes;
  double timeout_s = AveragerOptions::kDefaultTimeoutS;  // 0: no limit
  NonFinite nonfinite = NonFinite::ignore;
  Algorithm algorithm = Algorithm::automatic;
  Progress progress = Progress::poll;
  std::size_t staging_chunk_bytes = AveragerOptions::kDefaultStagingChunkBytes;
  std::size_t staging_slots = AveragerOptions::kDefaultStagingSlots;
  int ranks_per_node = 0;
  DeviceDivision device_division = DeviceDivision::divide;
  LinkModel model;
  std::string model_source = "defaults";  // "defaults" or the HMA_MODEL file
  OuterSettings outer;
  bool divergence = false;
  std::vector<Wire> wire;  // per level once the averager is built (empty before: all exact)
};
}  // namespace detail

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
  /// the worker, possibly before wait()), the same on every rank of its group; also logged
  /// (HMA_LOG=info, by the group's first rank). nullopt before the first one, and always without
  /// the option. Host ParamSets without bf16/fp16 arrays only.
  [[nodiscard]] std::optional<Divergence> last_divergence() const;

  /// The level that averages at the current step (nullopt: none).
  [[nodiscard]] std::optional<std::size_t> level_now() const noexcept;
  [[nodiscard]] std::int64_t step_count() const noexcept { return step_; }
  /// Sets the step counter (restart from a checkpoint). Must be set to the same value on all
  /// ranks. Throws hma::InvalidArgument for a negative step.
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

 protected:
  // Builds the schedule with `make` on every rank of comm; if it throws anywhere, throws
  // everywhere (no rank is left waiting in a collective). `make` gets a duplicate of comm for
  // any collective it needs: hma's agreement never runs on the caller's communicator.
  static Schedule agreed(MPI_Comm comm, const std::function<Schedule(MPI_Comm ctrl)>& make);

 private:
  // What a set (host or device) hands the orchestrator for one average: the pending average
  // with its data launch, the header its group must agree on, its non-finite vote, and how to
  // hang the average on the set. See lib/averager.cpp.
  using Prepare = std::function<detail::Prepared(std::size_t level, bool blocking, bool scheduled)>;
  // step()/start() and average()/start_average() for either kind of set.
  bool scheduled(bool blocking, Request* out, const Prepare& prepare);
  bool at_level(std::size_t level, bool blocking, Request* out, const Prepare& prepare);
  // The control stage, then the data stage: blocking (out null) or started into *out.
  bool issue(detail::Prepared job, std::size_t level, bool blocking, Request* out);
  detail::Prepared prepare_host(ParamSet& params, std::size_t level, bool blocking, bool scheduled);
  detail::Prepared prepare_device(DeviceParamSet& params, std::size_t level, bool blocking,
                                  bool scheduled, Stream stream);
  // MPI needs collectives on a communicator in the same order on every rank: before issuing
  // any, make sure every average in flight that issues lazily (after its check, chained
  // two-level stages, device paths) has issued all of its own.
  void settle_issue();
  // The outer optimizer and divergence work of a host average (null: none); sets p.refusal
  // when the outer state belongs to another layout.
  std::shared_ptr<detail::Post> make_post(const std::shared_ptr<detail::Pending>& p, std::uint64_t layout,
                                          std::size_t nf, std::size_t nd);
  // An average at the outer optimizer's level first completes the previous one there: its
  // update of the optimizer's state must be in before the next average reads it, alike on all
  // ranks.
  void settle_outer(std::size_t level);
  // This rank's group at the outer optimizer's level (contiguous blocks of its group size).
  [[nodiscard]] std::size_t outer_group() const;
  // A new pending average of `bytes` at `level` (registered in inflight_).
  std::shared_ptr<detail::Pending> new_pending(std::size_t level, std::size_t bytes);
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
  std::string algorithm_line(std::size_t level) const;

  Schedule schedule_;
  Hierarchy hierarchy_;
  std::int64_t step_ = 0;
  std::uint64_t weight_ = std::uint64_t{1} << 32;  // set_weight(): in 2^-32 units
  detail::Settings settings_;
  std::unique_ptr<detail::Scratch> scratch_ = std::make_unique<detail::Scratch>();
  std::unique_ptr<detail::DevicePlan> device_plan_;
  std::shared_ptr<detail::OuterState> outer_;          // AveragerOptions::outer
  std::shared_ptr<detail::DivergenceLog> divergence_;  // AveragerOptions::divergence
  std::vector<std::weak_ptr<detail::Pending>> inflight_;  // see finish_all(), settle_issue()
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
