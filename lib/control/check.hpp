// Internal, control plane: before an average moves any data, every rank of its group agrees that
// they are all in the SAME average (step, kind of call, level, kind of set, buffer layout) and
// votes on non-finite values. One exchange by recursive doubling (point-to-point messages, log2 g
// rounds, driven by test()) on the level's CONTROL communicator (never a data communicator, so it
// can never pair with a data collective), waited for with a deadline. Its messages are tagged
// with the check's number on that communicator, so checks pair up in call order across ranks,
// as collectives do. Only when headers differ (or a rank votes non-finite) does a small
// collective (MPI_Allgather, same communicator) learn who holds what, to name them.
//
// A small average can ride along (fused): each rank adds its terms x/g (at most kFusedBytes)
// to its message, and every round adds the partner's payload to its own where both carry the
// same counts and the same header so far. When the check passes on every rank with every rank's
// payload summed (fused()), the sums are the average and no data collective follows; otherwise
// the payload is ignored and the average moves as usual. Every rank gets the same bits (each
// round's two partners add the same two numbers).
//
// Where the group lies in one node and its ranks can map memory together, the same states go
// through that memory instead of messages (check_shm.hpp: each rank writes its state, then
// reads every rank's), combined to the same verdict and, for a payload, to the same sums in the
// same tree as recursive doubling: the level's transport changes nothing but the time.
#pragma once

#include <mpi.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "control/check_shm.hpp"

namespace hma::detail {

/// What every rank of the group must hold identically for an average.
struct Header {
  enum Field : std::size_t {
    step, call, level, set,  // call: 0 step()/start(), 1 average()/start_average(); set: 0 host
    fingerprint, arrays, f32_owned, f32_packed, f64_owned, f64_packed,  // the layout
    kFields
  };
  std::array<std::uint64_t, kFields> v{};
};

/// Who the group is, captured once when the average starts so that messages never have to ask
/// a communicator that may be gone.
struct GroupInfo {
  std::size_t level = 0;
  std::int64_t step = 0;
  std::size_t bytes = 0;
  std::vector<int> world_ranks;  // of the group, in group rank order
  /// "level 1 (group of 4 ranks, world ranks 0-3)"
  [[nodiscard]] std::string describe() const;
};

/// "0-3,6" from {0,1,2,3,6}.
std::string rank_ranges(const std::vector<int>& ranks);

/// A point in time on the steady clock `seconds` from now; max() for no limit (0 or infinity),
/// saturating (never overflows) for huge values.
std::chrono::steady_clock::time_point deadline_after(double seconds);

/// Weighted averaging: a rank's weight as carried by the check, a multiple of 2^-32 in
/// [0, 2^31) held as an integer (the group's sum is then exact and the same on every rank,
/// whatever order MPI adds in).
using Weight = std::uint64_t;
__extension__ typedef unsigned __int128 WeightSum;
constexpr double kWeightUnit = 4294967296.0;  // 2^32 quanta per unit of weight
constexpr double kWeightLimit = 2147483648.0;  // weights must be below 2^31

/// The outcome of a completed check.
struct Verdict {
  std::vector<int> nonfinite_ranks;  // world ranks that voted non-finite (empty: none)
  Weight weight_min = 0, weight_max = 0;  // over the group
  WeightSum weight_sum = 0;       // exact
};

/// Where an averager's checks travel, one per level (made at its construction, collective over
/// each level's group; dropped with the averager). A check's messages go point-to-point on a
/// communicator per distinct group of ranks, made by the first averager over that group and kept
/// for the process: never freed, so that a message of an abandoned check (after a timeout) can
/// never land on a communicator that reuses its context. Each averager level has a slot among
/// those over its group, and its checks are numbered in call order: the tags say both.
/// Where `shared[i]` (the same on every rank of the group: the group lies in one node), the
/// checks on controls[i] go through memory the group shares instead, if its ranks can map it
/// (check_shm.hpp).
struct CheckChannels {
  CheckChannels(const std::vector<MPI_Comm>& controls, const std::vector<bool>& shared);
  ~CheckChannels();
  /// The checks on `ctrl` (one of the controls) go through shared memory.
  [[nodiscard]] bool shared_memory(MPI_Comm ctrl) const;
  CheckChannels(const CheckChannels&) = delete;
  CheckChannels& operator=(const CheckChannels&) = delete;

 private:
  std::vector<MPI_Comm> controls_;
};

struct CheckChannel;  // one averager level's: its check communicator, slot and next number

/// Payload bytes a check message carries in its first fragment: with the header it stays within
/// the eager limit of shared-memory transports (Open MPI's vader: 4 KiB with its own header).
constexpr std::size_t kFragmentBytes = 3840;
/// Largest payload carried by the check (bytes of f32 and f64 terms): two fragments, each within
/// that eager limit, the second sent at once behind the first (the receiver learns from the
/// first fragment's header that a second one follows).
constexpr std::size_t kFusedBytes = 2 * kFragmentBytes;

/// One agreement check. Neither copied nor moved: MPI reads and writes its buffers while in
/// flight (it lives inside a heap-allocated Pending).
class ControlCheck {
 public:
  /// Words of the largest state a check exchanges (header and payload; ShmChannel's buffers).
  static constexpr std::size_t kMaxStateWords = 16 + kFusedBytes / 8;
  ControlCheck() = default;
  ControlCheck(const ControlCheck&) = delete;
  ControlCheck& operator=(const ControlCheck&) = delete;
  /// An exchange left unfinished (a timeout, then the set or averager gone): its receive is
  /// cancelled, its send left to MPI (eager: already copied out).
  ~ControlCheck();

  /// Before start(): room for a payload of nf floats then nd doubles (nf * 4 + nd * 8 <=
  /// kFusedBytes), for the caller to fill with this rank's terms.
  struct Payload {
    float* f = nullptr;
    double* d = nullptr;
  };
  Payload stage_payload(std::size_t nf, std::size_t nd);

  /// Non-blocking, collective over `ctrl` (the group's control communicator): issues the check.
  /// `weight`: this rank's weight in the group's sum (weighted averaging; 2^32 = weight 1).
  /// `invalid_here` non-empty: this rank's arguments are bad (the reason, without "hma: "); the
  /// check then fails with it on every rank of the group (resolve()).
  void start(MPI_Comm ctrl, const Header& h, bool nonfinite_here, Weight weight, std::string_view invalid_here = {});
  [[nodiscard]] bool started() const noexcept { return ctrl_ != MPI_COMM_NULL; }
  /// True when no message of it is in flight (never started, or complete).
  [[nodiscard]] bool idle() const noexcept { return complete_ || !posted_; }
  /// Back to a check never started, keeping its buffers (idle() must hold).
  void reset() noexcept;
  /// Allocates now what any check of any payload will need, so that none allocates later.
  void reserve();
  /// True once every rank of the group has contributed (drives the exchange: call it to progress).
  bool test();
  /// Waits until complete (true) or until `deadline` (false). Yields between polls.
  bool wait_until(std::chrono::steady_clock::time_point deadline);
  /// After completion, on every rank of the group alike: throws hma::InvalidArgument when a rank
  /// started it invalid (naming the lowest such world rank and its reason, and the others);
  /// else hma::MismatchError naming the differing fields, their values and the world ranks
  /// holding each; else the non-finite votes.
  /// May issue one MPI_Allgather on the control communicator (every rank of the group does).
  Verdict resolve(const GroupInfo& who);
  /// After resolve(): every rank carried a payload of the same counts, all of them summed (the
  /// same on every rank of the group). The sums, in the staged order:
  [[nodiscard]] bool fused() const noexcept { return fused_; }
  /// Complete, and resolve() would find nothing to name or vote on and every rank's payload
  /// summed with equal non-zero weights: the sums are the average (the lean path's test, the
  /// same on every rank of the group; no collective).
  [[nodiscard]] bool passed_plain() const noexcept;
  /// The same without a payload: complete, nothing to name or vote on, equal non-zero weights
  /// (a lean average whose data moves after the check).
  [[nodiscard]] bool agreed_plain() const noexcept;
  [[nodiscard]] const float* fused_f() const noexcept;
  [[nodiscard]] const double* fused_d() const noexcept;

 private:
  static constexpr std::size_t K = Header::kFields;
  // The state exchanged, 9 words: [the header compacted (the step; call, kind of set and level;
  // the layout's fields as one 64-bit hash: two layouts that differ pass as one with probability
  // 2^-64), flags, weight min, weight max, weight sum lo, hi, payload counts (f32 << 32 | f64)],
  // then the payload (the f32 terms padded to 8 bytes, the f64 terms). Small messages stay
  // small: a shared-memory MPI sends up to 256 bytes inline (Open MPI's vader), and a message
  // within that costs half of one beyond it. resolve() gathers the full headers.
  enum : std::size_t { kStep, kWhere, kLayout, kFlags, kWMin, kWMax, kSumLo, kSumHi, kCounts, kWords };
  static constexpr std::size_t kHeaderWords = kFlags;  // compared word by word
  static constexpr std::uint64_t kDiffer = 1, kBad = 2, kInvalid = 4, kUnfused = 8;  // flags
  struct Round {
    int peer = -1;
    int tag = 0;   // this check's: its number's base tag + step
    int step = 0;  // 0: the fold in, 1-30: recursive doubling, 31: the fold out
    bool send = false, recv = false;
    bool take = false;  // the received state replaces this rank's (the fold's last message)
  };
  /// Learns this rank's place in `ctrl`, its channel and the rounds of its checks.
  void learn(MPI_Comm ctrl);
  void post(const Round& r);
  /// After a receive completed: true when the message is whole, else posts the receive of its
  /// second fragment.
  bool whole(const Round& r);
  void apply(const Round& r);
  /// Folds a state of `words` words (another rank's, or several ranks' combined) into this one.
  /// `payload`: its terms added too, where both carry the same counts and header so far.
  void combine(const std::uint64_t* b, std::size_t words, bool payload = true);
  /// Through shared memory (ShmChannel::progress()): writes this rank's state once its buffer is
  /// free, then combines every rank's in group rank order as they come; true once complete.
  bool shm_step();
  friend class ShmChannel;
  [[nodiscard]] std::size_t payload_words(std::uint64_t counts) const noexcept;

  MPI_Comm ctrl_ = MPI_COMM_NULL;  // the level's control communicator (resolve's collectives)
  // This rank's place in the last control communicator started on (a record serves one
  // averager, whose communicators outlive it): asked of MPI once, kept by reset().
  MPI_Comm known_ = MPI_COMM_NULL;
  int known_rank_ = 0, known_size_ = 0;
  CheckChannel* channel_ = nullptr;
  std::uint64_t tag_base_ = 0, tag_wrap_ = 1;  // its slot's tags (check.cpp: TagSpace)
  MPI_Comm p2p_ = MPI_COMM_NULL;   // the group's check communicator (the exchange)
  Header mine_;
  // The layout fields of the last check started and their hash (layout_word()).
  std::array<std::uint64_t, Header::kFields - Header::fingerprint> layout_key_{};
  std::uint64_t layout_hash_ = 0;
  bool layout_known_ = false;
  std::uint64_t bad_ = 0;
  std::string invalid_;  // this rank's reason, empty when its arguments are fine
  static constexpr std::size_t kInWords = kWords + kFusedBytes / 8 + 1;  // the largest message
  static_assert(kInWords <= kMaxStateWords);
  static constexpr std::size_t kFirstWords = kWords + kFragmentBytes / 8;  // its first fragment
  // Open MPI's ob1 sends a message of up to 256 bytes inline (pml_ob1_isend.c, without a
  // request); a larger one costs about 0.2 us more on shared memory (np 2, this VM).
  static constexpr std::size_t kInlineWords = 256 / 8;
  /// Words of a message of `words` words that go in its first fragment (the rest in a second,
  /// sent at once behind it): all up to kInlineWords; kInlineWords up to twice that (two
  /// inline messages); else up to kFirstWords.
  static std::size_t first_fragment(std::size_t words) noexcept;
  std::vector<std::uint64_t> state_ = std::vector<std::uint64_t>(kWords);
  std::unique_ptr<std::uint64_t[]> in_;
  std::vector<Round> plan_;  // for known_, kept by reset()
  std::size_t rounds_ = 0;   // of this check: plan_.size() once started, else 0
  std::size_t next_ = 0;
  bool posted_ = false;
  // The round's receive (of the first fragment, then of the second), its send of the first
  // fragment, of the second (if any), and the second fragment's receive posted early (if any).
  static constexpr std::size_t kRecv = 0, kSend = 1, kSendSecond = 2, kRecvSecond = 3;
  std::array<MPI_Request, 4> reqs_{MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  std::size_t early_at_ = 0;  // where the early receive puts its fragment
  std::size_t got_ = 0;  // words of the round's message, once its first fragment came (else 0)
  bool complete_ = false;
  bool fused_ = false;
  // Through shared memory (null: messages): the channel, this check's number on it, whether its
  // state is written (next_ is then the next group rank to combine), its place in the channel's
  // list of checks in flight.
  std::shared_ptr<ShmChannel> shm_;
  std::uint64_t number_ = 0;
  bool written_ = false;
  bool listed_ = false;
  ControlCheck* shm_prev_ = nullptr;
  ControlCheck* shm_next_ = nullptr;
};

}  // namespace hma::detail
