#include "transport/ipc.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

#include "hma/error.hpp"
#include "support/worker.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

namespace {

constexpr int kIdBytes = 64;

// What one rank says in the exchange.
struct Card {
  IpcHandle buffer;            // one-shot: the two halves; two-shot: the slice
  IpcHandle store_f, store_d;  // two-shot: the set's storage
  std::uint64_t bytes_f = 0, bytes_d = 0;
  char id[kIdBytes] = {};  // device_id()
};

// The handshake: [buffers mapped and current here, f32 elements, f64 elements, averages since
// the exchange, this rank's weight factor's bits (weighted two-shot sums need every rank's),
// the exchange's token (a hash of every rank's handles: which buffers this rank means)].
using Hello = std::array<std::uint64_t, 6>;

std::uint64_t token_of(const void* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (std::size_t i = 0; i < n; ++i) h = (h ^ static_cast<const unsigned char*>(p)[i]) * 1099511628211ULL;
  return h;
}

std::shared_ptr<IpcPeers> entry_for(DeviceState& s, const std::shared_ptr<IpcLevel>& level) {
  std::erase_if(s.ipc, [](const std::shared_ptr<IpcPeers>& e) { return e->owner.expired(); });
  for (auto& e : s.ipc)
    if (e->owner.lock().get() == level.get()) return e;
  auto e = std::make_shared<IpcPeers>();
  e->be = s.be;
  e->owner = std::shared_ptr<const void>(level, level.get());
  s.ipc.push_back(e);
  return e;
}

bool fits(const IpcPeers& e, const DeviceState& s, bool two) {
  return e.exchanged && e.two_shot == two && e.nf == s.f32.size() && e.nd == s.f64.size() &&
         (!two || (e.store_f == s.f32.storage && e.store_d == s.f64.storage));
}

void wait_stream(DeviceState& s) {
  s.be->record(s.packed, s.stream);
  s.be->synchronize(s.packed);
}

// After an exchange (one-shot): this rank's terms (packed into storage) into its exported half
// `par`; the host then waits for them: a peer may read them once this rank has said so.
void export_terms(DeviceState& s, const IpcPeers& e, std::uint64_t par) {
  for (DeviceBucket* b : {&s.f32, &s.f64})
    if (b->size() > 0) s.be->copy(e.at(e.me, par, b->dtype), b->storage, b->size() * b->elem(), s.stream);
  wait_stream(s);
}

// One-shot: every rank's exported half, added in rank order into storage; then the unpack.
void sum_all(DeviceState& s, IpcPeers& e) {
  const std::uint64_t par = e.count % 2;
  const int g = static_cast<int>(e.peer.size());
  for (DeviceBucket* b : {&s.f32, &s.f64}) {
    if (b->size() == 0) continue;
    std::array<const void*, kMaxIpcPeers> src{};
    for (int r = 0; r < g; ++r) src[static_cast<std::size_t>(r)] = e.at(r, par, b->dtype);
    s.be->sum_peers(b->dtype, b->storage, src.data(), g, b->size(), s.stream);
  }
  ++e.count;
  count_use(Use::device_ipc);
  s.unpack_and_record();
}

// Rank r's slice [lo, hi) of a bucket of n elements in slices of l.
std::pair<std::size_t, std::size_t> slice_range(int r, std::size_t n, std::size_t l) {
  const std::size_t lo = std::min(n, static_cast<std::size_t>(r) * l);
  return {lo, std::min(n, lo + l)};
}

// Two-shot, stage 1: this rank's slice of every rank's raw values, scaled as the pack kernel
// would (x / g, x * fl(1/g), or x * w_r / sum w) and added in rank order, into its slice buffer.
// The host waits for it: then no peer's storage is read here any more.
void reduce_slice(DeviceState& s, IpcPeers& e, const std::vector<double>& factor, int group, bool mul) {
  const int g = static_cast<int>(e.peer_slice.size());
  for (DeviceBucket* b : {&s.f32, &s.f64}) {
    if (b->size() == 0) continue;
    const auto& store = b->dtype == Dtype::f32 ? e.peer_f : e.peer_d;
    const auto [lo, hi] = slice_range(e.me, b->size(), b->dtype == Dtype::f32 ? e.lf : e.ld);
    if (hi == lo) continue;
    std::array<const void*, kMaxIpcPeers> src{};
    for (int r = 0; r < g; ++r)
      src[static_cast<std::size_t>(r)] = static_cast<const char*>(store[static_cast<std::size_t>(r)]) + lo * b->elem();
    s.be->sum_terms(b->dtype, e.slice_of(e.me, b->dtype), src.data(), factor.data(), g, hi - lo, group, mul, s.stream);
  }
  wait_stream(s);
}

// Two-shot, stage 2: every rank's reduced slice into storage; then the unpack.
void gather_slices(DeviceState& s, IpcPeers& e) {
  const int g = static_cast<int>(e.peer_slice.size());
  for (DeviceBucket* b : {&s.f32, &s.f64}) {
    if (b->size() == 0) continue;
    for (int r = 0; r < g; ++r) {
      const auto [lo, hi] = slice_range(r, b->size(), b->dtype == Dtype::f32 ? e.lf : e.ld);
      if (hi > lo)
        s.be->copy(static_cast<char*>(b->storage) + lo * b->elem(), e.slice_of(r, b->dtype), (hi - lo) * b->elem(),
                   s.stream);
    }
  }
  ++e.count;
  count_use(Use::device_ipc);
  count_use(Use::device_ipc_two_shot);
  s.unpack_and_record();
}

// The group's verdict: 1 on every rank when `ok` holds on every rank.
bool all_ok(MPI_Comm c, bool ok) {
  int v = ok ? 1 : 0, all = 0;
  check(MPI_Allreduce(&v, &all, 1, MPI_INT, MPI_MIN, c), "MPI_Allreduce(node transport: reach)");
  return all == 1;
}

// New buffers, the handles and device names to every rank, the peers' buffers mapped. False (on
// every rank alike) when some device cannot reach another: then nothing is mapped and this
// rank's buffers are freed. Blocking; every rank is here (the handshake before it completed),
// and no peer reads this rank's old buffers any more (each finished its last average's kernels
// before it joined the handshake).
bool exchange(DeviceState& s, IpcPeers& e, MPI_Comm c, int me, int g, bool two, std::string& why) {
  count_use(Use::device_ipc_exchange);
  const std::size_t nf = s.f32.size(), nd = s.f64.size();
  // This rank's part may fail (no memory, no IPC): it then says so and still joins every
  // collective, so the group decides together.
  Card mine;
  std::string local;
  IpcPeers fresh;
  fresh.be = s.be;
  fresh.two_shot = two;
  fresh.nf = nf;
  fresh.nd = nd;
  try {
    local = s.be->ipc_unsupported(s.device);
    const std::string id = s.be->device_id(s.device);
    std::strncpy(mine.id, id.c_str(), kIdBytes - 1);
    if (local.empty() && two) {
      fresh.lf = (nf + static_cast<std::size_t>(g) - 1) / static_cast<std::size_t>(g);
      fresh.ld = (nd + static_cast<std::size_t>(g) - 1) / static_cast<std::size_t>(g);
      fresh.slice_off_d = IpcPeers::round_up(fresh.lf * sizeof(float));
      fresh.slice_bytes = fresh.slice_off_d + IpcPeers::round_up(fresh.ld * sizeof(double));
      fresh.slice = s.be->alloc_shared(fresh.slice_bytes, mine.buffer);
      fresh.store_f = s.f32.storage;
      fresh.store_d = s.f64.storage;
      if (nf > 0) s.be->export_buffer(s.f32.storage, mine.store_f);
      if (nd > 0) s.be->export_buffer(s.f64.storage, mine.store_d);
      s.f32.exported = s.f32.exported || nf > 0;  // never freed again (see park_exported)
      s.f64.exported = s.f64.exported || nd > 0;
      mine.bytes_f = s.f32.capacity * sizeof(float);
      mine.bytes_d = s.f64.capacity * sizeof(double);
    } else if (local.empty()) {
      fresh.off_d = IpcPeers::round_up(nf * sizeof(float));
      fresh.half = fresh.off_d + IpcPeers::round_up(nd * sizeof(double));
      fresh.mine = s.be->alloc_shared(2 * fresh.half, mine.buffer);
    }
  } catch (const std::exception& x) {
    local = x.what();
  }
  // Peers' old buffers are unmapped before the collective; this rank's old buffers are freed
  // after it, once every peer has unmapped them (CUDA: freeing memory a peer still maps is
  // undefined).
  e.close_peers();
  std::vector<Card> cards(static_cast<std::size_t>(g));
  check(MPI_Allgather(&mine, sizeof(Card), MPI_BYTE, cards.data(), sizeof(Card), MPI_BYTE, c),
        "MPI_Allgather(node transport: handles)");
  e.release();
  e.two_shot = fresh.two_shot;
  e.nf = fresh.nf;
  e.nd = fresh.nd;
  e.lf = fresh.lf;
  e.ld = fresh.ld;
  e.slice_off_d = fresh.slice_off_d;
  e.slice_bytes = fresh.slice_bytes;
  e.off_d = fresh.off_d;
  e.half = fresh.half;
  e.store_f = fresh.store_f;
  e.store_d = fresh.store_d;
  e.mine = std::exchange(fresh.mine, nullptr);
  e.slice = std::exchange(fresh.slice, nullptr);
  bool ok = local.empty();
  if (!ok) why = "world rank " + std::to_string(Comm::world_rank()) + ": " + local;
  for (int r = 0; r < g && ok; ++r) {
    const std::string peer_id(cards[static_cast<std::size_t>(r)].id);
    try {
      if (!s.be->can_reach(s.device, peer_id)) {
        ok = false;
        why = "device " + std::string(mine.id) + " cannot read device " + peer_id +
              " (neither the same device nor peer access)";
      }
    } catch (const std::exception& x) {
      ok = false;
      why = x.what();
    }
  }
  if (all_ok(c, ok)) {
    e.me = me;
    const auto n = static_cast<std::size_t>(g);
    try {
      if (two) {
        e.peer_slice.assign(n, nullptr);
        e.peer_f.assign(n, nullptr);
        e.peer_d.assign(n, nullptr);
        for (std::size_t r = 0; r < n; ++r) {
          const Card& k = cards[r];
          const bool self = static_cast<int>(r) == me;
          e.peer_slice[r] = self ? e.slice : s.be->open_shared(k.buffer, e.slice_bytes);
          if (nf > 0) e.peer_f[r] = self ? s.f32.storage : s.be->open_shared(k.store_f, k.bytes_f);
          if (nd > 0) e.peer_d[r] = self ? s.f64.storage : s.be->open_shared(k.store_d, k.bytes_d);
        }
      } else {
        e.peer.assign(n, nullptr);
        for (std::size_t r = 0; r < n; ++r)
          e.peer[r] = static_cast<int>(r) == me ? e.mine : s.be->open_shared(cards[r].buffer, 2 * e.half);
      }
    } catch (const std::exception& x) {
      ok = false;
      why = x.what();
    }
  } else {
    ok = false;
  }
  if (!all_ok(c, ok)) {
    if (why.empty()) why = "another rank of the group could not use the node transport";
    e.close_peers();
    return false;  // this rank's buffers stay allocated: peers may have mapped them
  }
  e.token = token_of(cards.data(), cards.size() * sizeof(Card));
  e.exchanged = true;
  e.count = 0;
  return true;
}

struct Flow {
  Hello mine{};
  std::vector<Hello> all;
  bool done = false;           // nothing left for the last stage
  std::exception_ptr error;    // a failed stage: the average ends with this error, never as done
};

double factor_of(std::uint64_t bits) {
  double f = 0;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

void start_ipc(DeviceState& s, const IpcRoute& r, Pending& p,
               const std::function<void(DeviceBucket&, void*)>& pack) {
  IpcLevel& level = *r.level;
  if (level.comm.is_null()) {
    // A collective on the level's communicator: what the worker queued there goes first.
    if (r.worker) r.worker->drain();
    level.comm = Comm::attach(r.fallback.comm).dup();
  }
  const MPI_Comm c = level.comm.get();
  const int g = level.comm.size(), me = level.comm.rank();
  auto e = entry_for(s, r.level);
  const std::size_t nf = s.f32.size(), nd = s.f64.size();
  const bool two = nf * sizeof(float) + nd * sizeof(double) >= r.two_shot_from;
  const bool ready = fits(*e, s, two);
  // One-shot: the terms straight into the exported half (or into storage before an exchange).
  // Two-shot: the raw values stay in storage, which the peers read; user arrays are copied in.
  for (DeviceBucket* b : {&s.f32, &s.f64}) {
    if (b->size() == 0) continue;
    if (two) s.be->pack_only(b->dtype, b->storage, b->table, b->segs, b->size(), s.stream);
    else pack(*b, ready ? e->at(e->me, e->count % 2, b->dtype) : b->storage);
  }
  wait_stream(s);  // exported: a peer may read it once the handshake says so
  auto f = std::make_shared<Flow>();
  std::uint64_t wbits = 0;
  std::memcpy(&wbits, &r.fallback.weight_factor, sizeof wbits);
  f->mine = {ready ? 1u : 0u, nf, nd, e->count, wbits, ready ? e->token : 0u};
  f->all.resize(static_cast<std::size_t>(g));
  MPI_Request q = MPI_REQUEST_NULL;
  check(MPI_Iallgather(f->mine.data(), 6, MPI_UINT64_T, f->all.data(), 6, MPI_UINT64_T, c, &q),
        "MPI_Iallgather(node transport: handshake)");
  p.reqs.push_back(q);
  DeviceState* sp = &s;
  p.finish = [sp, f, user = r.fallback.user] {
    if (f->error) std::rethrow_exception(f->error);  // every later wait() says so too
    DeviceGuard on_device(sp->be, sp->device);
    sp->be->stream_wait(user, sp->done);
  };
  const int group = r.fallback.group;
  const bool mul = r.fallback.reciprocal || (group & (group - 1)) == 0;
  auto first = [sp, e, f, r, c, me, g, two, group, mul, pack](std::vector<MPI_Request>& reqs) {
    DeviceGuard on_device(sp->be, sp->device);
    bool go = true;
    for (const auto& a : f->all) {
      if (a[1] != f->mine[1] || a[2] != f->mine[2]) {
        f->done = true;  // nothing more to do: the stage after this one must not sum
        throw Error("hma: the node transport: the ranks of the group hold device sets of different "
                    "sizes (" + std::to_string(a[1]) + " f32 and " + std::to_string(a[2]) +
                    " f64 elements against " + std::to_string(f->mine[1]) + " and " +
                    std::to_string(f->mine[2]) + " here); with HMA_CHECK=0 nothing catches this earlier");
      }
      go = go && a[0] == 1 && a[3] == f->mine[3] && a[5] == f->mine[5];
    }
    if (!go) {
      if (!two && f->mine[0] == 1) {
        // This rank packed into its exported half, which the exchange frees: the terms go to
        // storage first (the fallback reads them there too).
        for (DeviceBucket* b : {&sp->f32, &sp->f64})
          if (b->size() > 0)
            sp->be->copy(b->storage, e->at(e->me, e->count % 2, b->dtype), b->size() * b->elem(), sp->stream);
        wait_stream(*sp);
      }
      std::string why;
      if (!exchange(*sp, *e, c, me, g, two, why)) {
        r.level->off = true;
        r.level->why = why;
        if (two)  // the raw values are in storage: scale them as the MPI paths expect
          for (DeviceBucket* b : {&sp->f32, &sp->f64})
            if (b->size() > 0) pack(*b, b->storage);
        sp->be->record(sp->packed, sp->stream);
        if (r.worker) r.worker->drain();  // its collectives on the level's communicator come first
        average_device(*sp, r.fallback);
        f->done = true;
        return;
      }
      if (!two) {
        export_terms(*sp, *e, 0);
        MPI_Request b = MPI_REQUEST_NULL;  // every rank's terms are exported once this completes
        check(MPI_Ibarrier(c, &b), "MPI_Ibarrier(node transport)");
        reqs.push_back(b);
        return;
      }
      // Two-shot: the raw values were in storage before the handshake; the peers map it now.
    } else if (!two) {
      sum_all(*sp, *e);
      f->done = true;
      return;
    }
    std::vector<double> factor(static_cast<std::size_t>(g));
    for (int k = 0; k < g; ++k) factor[static_cast<std::size_t>(k)] = factor_of(f->all[static_cast<std::size_t>(k)][4]);
    reduce_slice(*sp, *e, factor, group, mul);
    MPI_Request b = MPI_REQUEST_NULL;  // every slice is reduced, and no rank reads storage any more
    check(MPI_Ibarrier(c, &b), "MPI_Ibarrier(node transport: slices)");
    reqs.push_back(b);
  };
  p.stages.push_back([sp, e, f, first](std::vector<MPI_Request>& reqs) {
    try {
      first(reqs);
    } catch (...) {
      // Terminal: this average failed here. The entry is no longer trusted (the next average
      // exchanges anew); stage 2 does nothing and finish rethrows.
      e->exchanged = false;
      f->done = true;
      f->error = std::current_exception();
      throw;
    }
  });
  p.stages.push_back([sp, e, f, two](std::vector<MPI_Request>&) {
    if (f->done) return;
    try {
      DeviceGuard on_device(sp->be, sp->device);
      if (two) gather_slices(*sp, *e);
      else sum_all(*sp, *e);
    } catch (...) {
      e->exchanged = false;
      f->done = true;
      f->error = std::current_exception();
      throw;
    }
  });
}

}  // namespace hma::detail
