// hma/options.hpp: how an Averager averages (AveragerOptions and its choices), what it measures
// (Divergence), and the settings it resolves from them. Included by hma/averager.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "hma/hierarchy.hpp"

namespace hma {

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
  /// "Exactness"), without the extra pass over the buffer. In place on packed arrays too: where
  /// the agreement check compared the layouts (check on), every part of an array of at least
  /// 32 KiB in a ring step travels as a message of its own (one copy, process to process,
  /// through shared memory), the smaller arrays between together; without the check, one
  /// message per step.
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
  /// staged, except where device pointers are known to pay: MVAPICH2 with MV2_USE_CUDA=1 (it
  /// reduces on the device), and a CUDA-aware MPI from the size a device calibration measured
  /// direct faster (HMA_MODEL's device_direct_from_bytes, `hma-bench-device --calibrate`). A
  /// CUDA-aware Open MPI alone is not enough: its coll/cuda reduces on the host, 4-5x slower
  /// than staged on an H200. Direct means blocking calls: MPI_Allreduce on device pointers;
  /// start(): MPI_Allreduce on the progress thread with Progress::thread, MPI_Iallreduce only on
  /// MVAPICH2, else staged.
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
/// every rank alike). Sets of f32/f64 arrays: host ParamSets in the average's own passes; a
/// DeviceParamSet through the staged path whatever DevicePath says (the state stays in host
/// memory, the update runs on each chunk in its pinned host slot before it goes back). An
/// average at the level that fails part way (an MPI error) may leave the state partly updated:
/// restore() a checkpoint before going on.
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
  /// Seconds a wait inside hma lasts before the waiting rank logs a stall warning (and again
  /// every as many seconds; the wait goes on): it asks the ranks of the group where they are and
  /// names those that have not reached this average, each with its averager (Averager::id()),
  /// step, level and call, or "outside hma" when a rank does not answer within 1 s or a quarter
  /// of the threshold, if shorter (computing, blocked elsewhere, or dead). hma::Timeout messages carry the same facts. Nothing is sent
  /// before a wait passes it. 0: no warning. nullopt: the environment variable HMA_STALL_WARN_S,
  /// default kDefaultStallWarnS. May differ across ranks.
  std::optional<double> stall_warn_s;
  static constexpr double kDefaultStallWarnS = 60;
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
  /// The node transport for DeviceParamSets: at a level whose groups each lie in one node (at
  /// most 16 ranks), the group averages on the device, each rank reading its peers' terms
  /// through CUDA IPC (README "Device buffers: the node transport"), instead of the staged or
  /// direct path. Where the group's devices cannot reach each other (neither the same device nor
  /// peer access), the group turns it off at that level on its first average there, and
  /// device_path() says why. Averages with the outer optimizer or the divergence metric stay
  /// staged. At a level of several whole nodes averaged two-level (Algorithm), the node stages
  /// run on the device and only each rank's slice crosses nodes (README "Two-level device
  /// sets"). nullopt: the environment variable HMA_DEVICE_IPC (0 or 1), default on.
  std::optional<bool> device_ipc;
  /// The outer optimizer. nullopt: the environment variable HMA_OUTER, e.g.
  /// "lr=0.7,momentum=0.9,nesterov" (keys lr, momentum, nesterov, level), default none.
  std::optional<OuterOptimizer> outer;
  /// The divergence metric at each average (see Averager::last_divergence()), over sets of f32
  /// and f64 arrays (an average of a set with bf16/fp16 arrays throws hma::InvalidArgument on
  /// every rank of its group while this is on; so does one at an outer optimizer's level): costs one copy of
  /// the set's values taken on the way (per piece, in cache, in blocking flat averages), one
  /// pass after the average and one MPI_Allreduce of one double on the level's communicator.
  /// A DeviceParamSet is then averaged through the staged path (the copy and the passes on its
  /// host chunks), whatever DevicePath says.
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
  /// Device buffers: direct (device pointers to a CUDA-aware MPI) measured faster than staged
  /// from this many bytes (`hma-bench-device --calibrate`); 0: not calibrated, auto stages.
  double device_direct_from_bytes = 0;
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
  double stall_warn_s = AveragerOptions::kDefaultStallWarnS;  // 0: off
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
  bool device_ipc = true;
  bool check_shm = true;  // HMA_CHECK_SHM: a group in one node checks through shared memory
  // The node transport's two-shot sum from this many bytes of a set (HMA_IPC_TWO_SHOT_BYTES).
  // Default: never, until it is measured on a GPU (it is tested on the emulation backend only).
  std::size_t ipc_two_shot_bytes = kDefaultIpcTwoShotBytes;
  static constexpr std::size_t kDefaultIpcTwoShotBytes = SIZE_MAX;
  std::vector<Wire> wire;  // per level once the averager is built (empty before: all exact)
};
}  // namespace detail

}  // namespace hma
