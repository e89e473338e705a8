#include "control/check.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "hma/error.hpp"
#include "support/hash.hpp"

namespace hma::detail {

std::chrono::steady_clock::time_point deadline_after(double seconds) {
  using clock = std::chrono::steady_clock;
  // Beyond ~30 years the sum would overflow the clock's 64-bit nanoseconds: no limit.
  if (!(seconds > 0) || seconds > 1e9) return clock::time_point::max();
  return clock::now() +
         std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
}

struct CheckChannel {
  MPI_Comm comm = MPI_COMM_NULL;
  std::uint64_t slot = 0;
  std::uint64_t next = 0;
  std::shared_ptr<ShmChannel> shm;  // null: the checks go as messages on comm
};

namespace {

// The check communicators (one per distinct group, kept for the process) and, by control
// communicator, the slot and the next check number of each averager level.
struct Channels {
  std::mutex mu;
  std::map<std::vector<int>, std::pair<MPI_Comm, std::uint64_t>> groups;  // by world ranks: comm, slots used
  std::map<MPI_Comm, CheckChannel> by_control;
};
Channels& channels() {
  static auto* c = new Channels;  // never destroyed: checks may end during static destruction
  return *c;
}

std::vector<int> world_ranks_of(MPI_Comm comm) {
  int n = 0;
  check(MPI_Comm_size(comm, &n), "MPI_Comm_size(check channel)");
  std::vector<int> mine(static_cast<std::size_t>(n)), world(static_cast<std::size_t>(n));
  for (int k = 0; k < n; ++k) mine[static_cast<std::size_t>(k)] = k;
  MPI_Group g = MPI_GROUP_NULL, w = MPI_GROUP_NULL;
  check(MPI_Comm_group(comm, &g), "MPI_Comm_group(check channel)");
  check(MPI_Comm_group(MPI_COMM_WORLD, &w), "MPI_Comm_group(check channel)");
  MPI_Group_translate_ranks(g, n, mine.data(), w, world.data());
  MPI_Group_free(&g);
  MPI_Group_free(&w);
  return world;
}

// Tags: the round (0: the fold in, 1-30: recursive doubling, 31: the fold out), the check's
// number and, where MPI's tags are wide enough (Open MPI and MPICH: 2^28 and more), the slot.
constexpr std::uint64_t kRounds = 32, kNumbers = 2048, kPerSlot = kRounds * kNumbers;
// A slot's tags: check number k's round r has tag base + (k % wrap) * kRounds + r.
struct TagSpace {
  std::uint64_t base = 0, wrap = kNumbers;
};
TagSpace tag_space(std::uint64_t slot) {
  static const std::uint64_t tag_ub = [] {
    void* v = nullptr;
    int found = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &v, &found);
    return found ? static_cast<std::uint64_t>(*static_cast<int*>(v)) : std::uint64_t{32767};
  }();
  const std::uint64_t slots = tag_ub / kPerSlot;
  if (slots >= 2) return TagSpace{(slot % slots) * kPerSlot, kNumbers};
  return TagSpace{0, tag_ub / kRounds};
}

// The layout's fields (the fingerprint, the array count and the element counts) as one word.
std::uint64_t layout_word(const Header& h) {
  std::uint64_t w = 0;
  for (std::size_t f = Header::fingerprint; f < Header::kFields; ++f)
    w = splitmix_finish(w ^ splitmix_finish(h.v[f] + f));
  return w;
}

template <class T>
void add_into(unsigned char* a, const unsigned char* b, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    T x, y;
    std::memcpy(&x, a + i * sizeof(T), sizeof(T));
    std::memcpy(&y, b + i * sizeof(T), sizeof(T));
    x = x + y;
    std::memcpy(a + i * sizeof(T), &x, sizeof(T));
  }
}

}  // namespace

CheckChannels::CheckChannels(const std::vector<MPI_Comm>& controls, const std::vector<bool>& shared) {
  Channels& c = channels();
  for (std::size_t i = 0; i < controls.size(); ++i) {
    const MPI_Comm ctrl = controls[i];
    if (ctrl == MPI_COMM_NULL) continue;
    std::shared_ptr<ShmChannel> shm = ShmChannel::make(ctrl, i < shared.size() && shared[i]);
    const std::vector<int> world = world_ranks_of(ctrl);
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.groups.find(world);
    if (it == c.groups.end()) {  // every rank of the group is here, and none has it yet
      MPI_Comm comm = MPI_COMM_NULL;
      check(MPI_Comm_dup(ctrl, &comm), "MPI_Comm_dup(check channel)");
      MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
      it = c.groups.emplace(world, std::pair{comm, std::uint64_t{0}}).first;
    }
    c.by_control[ctrl] = CheckChannel{it->second.first, it->second.second++, 0, std::move(shm)};
    controls_.push_back(ctrl);
  }
}

CheckChannels::~CheckChannels() {
  Channels& c = channels();
  std::lock_guard<std::mutex> lock(c.mu);
  for (MPI_Comm ctrl : controls_) c.by_control.erase(ctrl);
}

bool CheckChannels::shared_memory(MPI_Comm ctrl) const {
  Channels& c = channels();
  std::lock_guard<std::mutex> lock(c.mu);
  const auto it = c.by_control.find(ctrl);
  return it != c.by_control.end() && it->second.shm != nullptr;
}

ControlCheck::~ControlCheck() {
  if (listed_) {  // dropped unfinished: this rank reads it no more
    shm_->delist(this);
    // Released only if written: writing it took every rank's release of the check its buffer
    // held before, so this never marks an older check of this rank, still listed, as released.
    // (Unwritten, nobody can complete it, so nobody waits to reuse its buffer.)
    if (written_) shm_->release(number_);
    return;
  }
  if (complete_ || !posted_ || shm_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  for (std::size_t i : {kRecv, kRecvSecond})
    if (reqs_[i] != MPI_REQUEST_NULL) {
      MPI_Cancel(&reqs_[i]);
      MPI_Wait(&reqs_[i], MPI_STATUS_IGNORE);
    }
  for (std::size_t i : {kSend, kSendSecond})
    if (reqs_[i] != MPI_REQUEST_NULL) MPI_Request_free(&reqs_[i]);
}

void ControlCheck::reset() noexcept {
  ctrl_ = p2p_ = MPI_COMM_NULL;
  mine_ = Header{};
  bad_ = 0;
  invalid_.clear();
  state_[kCounts] = 0;  // no payload until stage_payload() (start() sizes the state to its counts)
  rounds_ = 0;
  next_ = 0;
  posted_ = false;
  reqs_ = {MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  got_ = 0;
  complete_ = fused_ = false;
  written_ = false;
}

void ControlCheck::reserve() {
  state_.reserve(kInWords);
  if (!in_) in_.reset(new std::uint64_t[kInWords]);
  plan_.reserve(2 * kRounds);
}

std::size_t ControlCheck::payload_words(std::uint64_t counts) const noexcept {
  const std::uint64_t nf = counts >> 32, nd = counts & 0xffffffffu;
  return static_cast<std::size_t>((nf + 1) / 2 + nd);
}

ControlCheck::Payload ControlCheck::stage_payload(std::size_t nf, std::size_t nd) {
  if (nf * sizeof(float) + nd * sizeof(double) > kFusedBytes)
    throw Error("hma: internal: a fused payload larger than the check carries");
  state_[kCounts] = (std::uint64_t{nf} << 32) | nd;
  state_.resize(kWords + payload_words(state_[kCounts]));
  auto* base = reinterpret_cast<unsigned char*>(state_.data() + kWords);
  return Payload{reinterpret_cast<float*>(base), reinterpret_cast<double*>(base + (nf + 1) / 2 * 8)};
}

bool ControlCheck::agreed_plain() const noexcept {
  return complete_ && (state_[kFlags] & (kDiffer | kBad | kInvalid)) == 0 && state_[kWMin] == state_[kWMax] &&
         state_[kWMin] != 0;
}

bool ControlCheck::passed_plain() const noexcept { return agreed_plain() && (state_[kFlags] & kUnfused) == 0; }

const float* ControlCheck::fused_f() const noexcept {
  return reinterpret_cast<const float*>(state_.data() + kWords);
}

const double* ControlCheck::fused_d() const noexcept {
  return reinterpret_cast<const double*>(state_.data() + kWords + ((state_[kCounts] >> 32) + 1) / 2);
}

void ControlCheck::learn(MPI_Comm ctrl) {
  check(MPI_Comm_rank(ctrl, &known_rank_), "MPI_Comm_rank(agreement check)");
  check(MPI_Comm_size(ctrl, &known_size_), "MPI_Comm_size(agreement check)");
  {
    Channels& c = channels();
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.by_control.find(ctrl);
    if (it == c.by_control.end()) throw Error("hma: internal: an agreement check on a level without a check channel");
    channel_ = &it->second;
  }
  const TagSpace t = tag_space(channel_->slot);
  tag_base_ = t.base;
  tag_wrap_ = t.wrap;
  known_ = ctrl;
  // Recursive doubling over the largest power of two p <= n; the first 2 (n - p) ranks fold in
  // pairs first (the even one hands its state to the odd one and gets the result back). The
  // rounds are the same for every check on this communicator; their tags follow the number.
  const int r = known_rank_, n = known_size_;
  int p = 1;
  while (p <= n / 2) p *= 2;
  const int rem = n - p;
  const int last = static_cast<int>(kRounds) - 1;
  plan_.clear();
  int v = r - rem;  // this rank's place among the p
  if (r < 2 * rem) {
    if (r % 2 == 0) {
      plan_.push_back(Round{r + 1, 0, 0, true, false, false});
      plan_.push_back(Round{r + 1, 0, last, false, true, true});
      v = -1;
    } else {
      plan_.push_back(Round{r - 1, 0, 0, false, true, false});
      v = r / 2;
    }
  }
  if (v >= 0) {
    int round = 1;
    for (int mask = 1; mask < p; mask *= 2, ++round) {
      const int u = v ^ mask;
      plan_.push_back(Round{u < rem ? 2 * u + 1 : u + rem, 0, round, true, true, false});
    }
    if (r < 2 * rem) plan_.push_back(Round{r - 1, 0, last, true, false, false});
  }
}

void ControlCheck::start(MPI_Comm ctrl, const Header& h, bool nonfinite_here, Weight weight,
                         std::string_view invalid_here) {
  mine_ = h;
  bad_ = nonfinite_here ? 1 : 0;
  invalid_.assign(invalid_here);
  // The header and the payload the counts announce: a payload of the last check's size is
  // staged over the old one, not zeroed first.
  state_.resize(kWords + payload_words(state_[kCounts]));
  state_[kStep] = h.v[Header::step];
  state_[kWhere] = h.v[Header::call] | h.v[Header::set] << 8 | h.v[Header::level] << 16;
  // The layout's hash, kept for the next check of the same layout (the usual case).
  if (!layout_known_ || !std::equal(layout_key_.begin(), layout_key_.end(), h.v.begin() + Header::fingerprint)) {
    std::copy(h.v.begin() + Header::fingerprint, h.v.end(), layout_key_.begin());
    layout_hash_ = layout_word(h);
    layout_known_ = true;
  }
  state_[kLayout] = layout_hash_;
  state_[kFlags] = (bad_ ? kBad : 0) | (invalid_.empty() ? 0 : kInvalid) | (state_[kCounts] == 0 ? kUnfused : 0);
  state_[kWMin] = state_[kWMax] = weight;
  state_[kSumLo] = weight;
  state_[kSumHi] = 0;
  if (ctrl != known_) learn(ctrl);
  // This averager level's channel: its node stays put until the averager (the only starter of
  // checks on `ctrl`, on the caller's thread) is gone.
  p2p_ = channel_->comm;
  const std::uint64_t number = channel_->next++;
  shm_ = channel_->shm;
  complete_ = fused_ = false;
  ctrl_ = ctrl;
  if (shm_) {
    number_ = number;
    written_ = false;
    next_ = 0;
    posted_ = true;
    shm_->enlist(this);
    shm_->progress();  // written now where its buffer is free
    return;
  }
  const std::uint64_t k = (tag_wrap_ & (tag_wrap_ - 1)) == 0 ? number & (tag_wrap_ - 1) : number % tag_wrap_;
  const int base = static_cast<int>(tag_base_ + k * kRounds);
  for (Round& round : plan_) round.tag = base + round.step;
  rounds_ = plan_.size();
  if (!in_) in_.reset(new std::uint64_t[kInWords]);  // uninitialised: MPI fills what it receives
  next_ = 0;
  posted_ = false;
  (void)test();  // the first messages go out now
}

void ControlCheck::combine(const std::uint64_t* b, std::size_t words, bool payload) {
  std::uint64_t* a = state_.data();
  std::uint64_t flags = a[kFlags] | b[kFlags];
  for (std::size_t i = 0; i < kHeaderWords; ++i)
    if (a[i] != b[i]) flags |= kDiffer;
  a[kWMin] = std::min(a[kWMin], b[kWMin]);
  a[kWMax] = std::max(a[kWMax], b[kWMax]);
  const WeightSum sum = ((WeightSum{a[kSumHi]} << 64) | a[kSumLo]) + ((WeightSum{b[kSumHi]} << 64) | b[kSumLo]);
  a[kSumLo] = static_cast<std::uint64_t>(sum);
  a[kSumHi] = static_cast<std::uint64_t>(sum >> 64);
  if (a[kCounts] != b[kCounts] || words != state_.size()) flags |= kUnfused;
  // The payloads are added only where both sides are in the same average so far.
  if (payload && (flags & (kDiffer | kUnfused | kInvalid)) == 0) {
    const std::size_t nf = a[kCounts] >> 32, nd = a[kCounts] & 0xffffffffu;
    auto* pa = reinterpret_cast<unsigned char*>(a + kWords);
    const auto* pb = reinterpret_cast<const unsigned char*>(b + kWords);
    add_into<float>(pa, pb, nf);
    const std::size_t at = (nf + 1) / 2 * 8;
    add_into<double>(pa + at, pb + at, nd);
  }
  a[kFlags] = flags;
}

bool ControlCheck::test() {
  if (complete_) return true;
  if (shm_) {
    shm_->progress();
    return complete_;
  }
  while (next_ < rounds_) {
    const Round& r = plan_[next_];
    if (!posted_) {
      posted_ = true;  // first: what post() issued before an error is cancelled or freed, never dropped
      post(r);
    }
    // The round's receive and first send in one call (a small send completes at once), then a
    // second fragment's send.
    int flag = 0;
    check(MPI_Testall(2, reqs_.data(), &flag, MPI_STATUSES_IGNORE), "MPI_Testall(agreement check)");
    if (!flag) return false;
    if (reqs_[kSendSecond] != MPI_REQUEST_NULL) {
      check(MPI_Test(&reqs_[kSendSecond], &flag, MPI_STATUS_IGNORE), "MPI_Test(agreement check)");
      if (!flag) return false;
    }
    if (!whole(r)) continue;  // its second fragment is on its way
    apply(r);
    posted_ = false;
    ++next_;
  }
  complete_ = true;
  return true;
}

bool ControlCheck::wait_until(std::chrono::steady_clock::time_point deadline) {
  // A few fast polls first (the usual case: the group is there), then yield the core.
  for (int i = 0; !test(); ++i) {
    if (deadline != std::chrono::steady_clock::time_point::max() && std::chrono::steady_clock::now() >= deadline)
      return false;
    if (i > 1000) std::this_thread::yield();
  }
  return true;
}

}  // namespace hma::detail
