#include "control/check_shm.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "control/check.hpp"
#include "hma/error.hpp"
#include "support/hash.hpp"

namespace hma::detail {

namespace {

constexpr std::size_t kLine = 64;
constexpr std::size_t kLineWords = kLine / sizeof(std::uint64_t);
constexpr std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }
// A buffer: its sequence number, the writer's releases when it wrote it, then its state: a small
// check's state and its sequence number share lines (the fewer lines a reader pulls from
// another core, the sooner it has them all).
constexpr std::size_t kStateAt = 1 + ShmChannel::kBuffers;
constexpr std::size_t kBufferWords = round_up(kStateAt + ControlCheck::kMaxStateWords, kLineWords);
// A rank's slot: a line of acknowledgements (one word per buffer), then its buffers.
constexpr std::size_t kSlotWords = kLineWords + ShmChannel::kBuffers * kBufferWords;
static_assert(ShmChannel::kBuffers <= kLineWords);

// What the group's first rank offers: its memory, by its process and descriptor, and a cookie
// the others find in it (a rank that maps another process's descriptor by mistake sees none).
struct Offer {
  std::int64_t pid = 0;
  std::int32_t fd = -1;
  std::int32_t ok = 0;
  std::uint64_t dev = 0, ino = 0;  // the file's identity: a reader opens nothing else
  std::uint64_t cookie[2] = {0, 0};
};

// 128 bits that differ between regions: no source here can throw (a rank that threw before the
// broadcast would leave the others waiting in it).
void make_cookie(std::uint64_t (&c)[2], const void* where) {
  const auto t = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  c[0] = splitmix_finish(t ^ (static_cast<std::uint64_t>(getpid()) << 32));
  c[1] = splitmix_finish(c[0] ^ reinterpret_cast<std::uintptr_t>(where));
}

// Maps the file at `path` if it is the one offered (the same device, inode and size; a pid of
// another process, in another namespace, may name anything), else MAP_FAILED.
void* map_offered(const std::string& path, const Offer& o, std::size_t bytes) {
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return MAP_FAILED;
  struct stat st {};
  void* p = MAP_FAILED;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && static_cast<std::uint64_t>(st.st_dev) == o.dev &&
      static_cast<std::uint64_t>(st.st_ino) == o.ino && static_cast<std::size_t>(st.st_size) == bytes)
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p != MAP_FAILED && std::memcmp(p, o.cookie, sizeof o.cookie) != 0) {
    munmap(p, bytes);
    p = MAP_FAILED;
  }
  return p;
}

// More ranks on this host than it has CPUs (the launcher's count of the job's ranks here, else
// this group's): a rank waiting must give its core to the rank it waits for at once.
bool oversubscribed(int group) {
  long local = group;
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"})
    if (const char* s = std::getenv(v); s != nullptr && std::atol(s) > 0) {
      local = std::atol(s);
      break;
    }
  const unsigned cpus = std::thread::hardware_concurrency();
  return cpus > 0 && local > static_cast<long>(cpus);
}

// A spin-wait hint (x86 PAUSE, Arm YIELD): a rank polling a line another core will write leaves
// that core, or its hyperthread sibling, the time to write it.
inline void relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace


std::uint64_t* ShmChannel::slot(int r) const noexcept {
  return reinterpret_cast<std::uint64_t*>(base_ + kLine) + static_cast<std::size_t>(r) * kSlotWords;
}

std::uint64_t* ShmChannel::line(int r, std::uint64_t number) const noexcept {
  return slot(r) + kLineWords + (number % kBuffers) * kBufferWords;
}

const std::uint64_t* ShmChannel::state(int r, std::uint64_t number) const noexcept {
  return line(r, number) + kStateAt;
}

bool ShmChannel::writable(std::uint64_t number) noexcept {
  if (number < kBuffers) return true;
  const std::uint64_t need = number - kBuffers + 1;  // check number - kBuffers released
  const std::size_t k = number % kBuffers;
  for (int r = 0; r < size_; ++r) {
    std::uint64_t& seen = seen_[static_cast<std::size_t>(r)][k];
    if (seen < need) seen = load_acquire(slot(r)[k]);
    if (seen < need) return false;
  }
  return true;
}

void ShmChannel::publish(std::uint64_t number, const std::uint64_t* state, std::size_t words) noexcept {
  std::uint64_t* l = line(rank_, number);
  std::memcpy(l + kStateAt, state, words * sizeof(std::uint64_t));
  for (std::size_t k = 0; k < kBuffers; ++k) l[1 + k] = slot(rank_)[k];
  store_release(l[0], number + 1);
}

bool ShmChannel::written(int r, std::uint64_t number) noexcept {
  const std::uint64_t* l = line(r, number);
  if (load_acquire(l[0]) != number + 1) return false;
  // Its writer's releases then: a reader that releases an acquire, so they are as good as read.
  for (std::size_t k = 0; k < kBuffers; ++k) {
    std::uint64_t& seen = seen_[static_cast<std::size_t>(r)][k];
    seen = std::max(seen, l[1 + k]);
  }
  return true;
}

void ShmChannel::release(std::uint64_t number) noexcept {
  std::uint64_t& ack = slot(rank_)[number % kBuffers];
  if (ack < number + 1) store_release(ack, number + 1);
}

std::shared_ptr<ShmChannel> ShmChannel::make(MPI_Comm ctrl, bool want) {
  if (!want || ctrl == MPI_COMM_NULL) return nullptr;
  int rank = 0, size = 0;
  check(MPI_Comm_rank(ctrl, &rank), "MPI_Comm_rank(agreement check, shared memory)");
  check(MPI_Comm_size(ctrl, &size), "MPI_Comm_size(agreement check, shared memory)");
  if (size < 2 || size > kMaxGroup) return nullptr;
  {  // every rank of the group on one node (then every rank finds the group's size)
    MPI_Comm node = MPI_COMM_NULL;
    check(MPI_Comm_split_type(ctrl, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
          "MPI_Comm_split_type(agreement check, shared memory)");
    int n = 0;
    MPI_Comm_size(node, &n);
    MPI_Comm_free(&node);
    if (n != size) return nullptr;
  }
  const std::size_t bytes = kLine + static_cast<std::size_t>(size) * kSlotWords * sizeof(std::uint64_t);
  Offer offer;
  void* p = MAP_FAILED;
  if (rank == 0) {
    offer.pid = getpid();
    offer.fd = memfd_create("hma-check", MFD_CLOEXEC);
    struct stat st {};
    if (offer.fd >= 0 && ftruncate(offer.fd, static_cast<off_t>(bytes)) == 0 && fstat(offer.fd, &st) == 0)
      p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, offer.fd, 0);
    if (p != MAP_FAILED) {
      make_cookie(offer.cookie, p);
      std::memcpy(p, offer.cookie, sizeof offer.cookie);
      offer.dev = static_cast<std::uint64_t>(st.st_dev);
      offer.ino = static_cast<std::uint64_t>(st.st_ino);
      offer.ok = 1;
    }
  }
  int rc = MPI_Bcast(&offer, sizeof offer, MPI_BYTE, 0, ctrl);
  if (rc == MPI_SUCCESS && rank != 0 && offer.ok)
    p = map_offered("/proc/" + std::to_string(offer.pid) + "/fd/" + std::to_string(offer.fd), offer, bytes);
  int all = p != MAP_FAILED ? 1 : 0;
  if (rc == MPI_SUCCESS) rc = MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_INT, MPI_MIN, ctrl);
  if (rank == 0 && offer.fd >= 0) close(offer.fd);  // every rank has mapped it, or given up
  if (rc != MPI_SUCCESS || !all) {
    if (p != MAP_FAILED) munmap(p, bytes);
    check(rc, "MPI_Bcast/MPI_Allreduce(agreement check, shared memory)");
    return nullptr;
  }
  std::shared_ptr<ShmChannel> ch;
  try {
    ch = std::shared_ptr<ShmChannel>(new ShmChannel);
  } catch (...) {
    munmap(p, bytes);
    throw;
  }
  ch->rank_ = rank;
  ch->size_ = size;
  ch->bytes_ = bytes;
  ch->base_ = static_cast<unsigned char*>(p);
  ch->spin_polls_ = oversubscribed(size) ? kOversubscribedPolls : kIdlePolls;
  return ch;
}

ShmChannel::~ShmChannel() {
  if (base_ != nullptr) munmap(base_, bytes_);
}

void ShmChannel::enlist(ControlCheck* c) noexcept {
  c->shm_prev_ = tail_;
  c->shm_next_ = nullptr;
  (tail_ != nullptr ? tail_->shm_next_ : head_) = c;
  tail_ = c;
  c->listed_ = true;
}

void ShmChannel::delist(ControlCheck* c) noexcept {
  (c->shm_prev_ != nullptr ? c->shm_prev_->shm_next_ : head_) = c->shm_next_;
  (c->shm_next_ != nullptr ? c->shm_next_->shm_prev_ : tail_) = c->shm_prev_;
  c->shm_prev_ = c->shm_next_ = nullptr;
  c->listed_ = false;
}

void ShmChannel::progress() {
  bool moved = false;
  for (ControlCheck* c = head_; c != nullptr;) {
    ControlCheck* next = c->shm_next_;
    const bool was_written = c->written_;
    const std::size_t seen = c->next_;
    if (c->shm_step()) {
      delist(c);
      moved = true;
    } else {
      moved = moved || c->written_ != was_written || c->next_ != seen;
    }
    c = next;
  }
  // Nothing came: after a few such polls, each one yields the core, as an MPI library's progress
  // does when idle and oversubscribed (a rank spinning here would keep the rank it waits for,
  // on the same core, from ever writing; the emulated cluster runs 4-8 ranks on 2 cores).
  idle_ = moved ? 0 : std::min(idle_ + 1, spin_polls_ + 1);  // (saturating: waits may be long)
  if (idle_ > spin_polls_) {
    std::this_thread::yield();
  } else if (!moved) {
    relax();
  }
}

namespace {

// The sum the checks as messages compute (recursive doubling: the first 2 rem ranks' terms
// paired, then a balanced tree over the p = g - rem values in order), element by element from
// every rank's terms in place: the same bits as they give, whichever transport a level uses.
template <class T>
void tree_sum(unsigned char* out, const unsigned char* const* src, std::size_t at, int g, std::size_t n) {
  int p = 1;
  while (p <= g / 2) p *= 2;
  const int rem = g - p;
  constexpr std::size_t kBlock = 32;
  T stack[8][kBlock];  // one partial sum per tree level (p <= 64)
  int height[8];
  // Element i of a rank's terms of this type (`at` bytes into its payload).
  const auto term = [at](const unsigned char* payload, std::size_t i) {
    T v;
    std::memcpy(&v, payload + at + i * sizeof(T), sizeof(T));
    return v;
  };
  out += at;
  if (g == 2) {  // one addition per element
    for (std::size_t i = 0; i < n; ++i) {
      const T x = term(src[0], i) + term(src[1], i);
      std::memcpy(out + i * sizeof(T), &x, sizeof(T));
    }
    return;
  }
  for (std::size_t lo = 0; lo < n; lo += kBlock) {
    const std::size_t m = std::min(kBlock, n - lo);
    int top = 0;
    for (int v = 0; v < p; ++v) {
      T* t = stack[top];
      if (v < rem) {
        for (std::size_t i = 0; i < m; ++i) t[i] = term(src[2 * v], lo + i) + term(src[2 * v + 1], lo + i);
      } else {
        for (std::size_t i = 0; i < m; ++i) t[i] = term(src[v + rem], lo + i);
      }
      height[top++] = 0;
      for (; top >= 2 && height[top - 1] == height[top - 2]; --top) {
        for (std::size_t i = 0; i < m; ++i) stack[top - 2][i] += stack[top - 1][i];
        ++height[top - 2];
      }
    }
    std::memcpy(out + lo * sizeof(T), stack[0], m * sizeof(T));
  }
}

}  // namespace

bool ControlCheck::shm_step() {
  ShmChannel& ch = *shm_;
  if (!written_) {
    if (!ch.writable(number_)) return false;
    ch.publish(number_, state_.data(), state_.size());
    written_ = true;
  }
  const int g = ch.size();
  for (; next_ < static_cast<std::size_t>(g); ++next_)  // next_: the ranks found written
    if (!ch.written(static_cast<int>(next_), number_)) return false;
  // Every rank's header folded in (flags, weights: the same whatever the order), then, where
  // every rank carries the same counts and header, the terms summed in recursive doubling's tree.
  std::array<const unsigned char*, ShmChannel::kMaxGroup> terms{};
  for (int r = 0; r < g; ++r) {
    const std::uint64_t* st = ch.state(r, number_);
    const std::size_t words = kWords + payload_words(st[kCounts]);
    if (words > kInWords) throw Error("hma: internal: an agreement check state larger than any check writes");
    if (r == 0) {
      state_.assign(st, st + words);
    } else {
      combine(st, words, false);
    }
    terms[static_cast<std::size_t>(r)] = reinterpret_cast<const unsigned char*>(st + kWords);
  }
  if ((state_[kFlags] & (kDiffer | kUnfused | kInvalid)) == 0 && g > 1) {
    const std::size_t nf = state_[kCounts] >> 32, nd = state_[kCounts] & 0xffffffffu;
    auto* out = reinterpret_cast<unsigned char*>(state_.data() + kWords);
    tree_sum<float>(out, terms.data(), 0, g, nf);
    tree_sum<double>(out, terms.data(), (nf + 1) / 2 * 8, g, nd);
  }
  complete_ = true;
  ch.release(number_);
  return true;
}

}  // namespace hma::detail
