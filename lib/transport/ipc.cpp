#include "transport/ipc.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

#include "hma/error.hpp"
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

// One average's state across its stages. The exchange, when one is needed, runs as
// non-blocking collectives between stages like the rest: a blocking collective inside one
// average's progress would wait for ranks that progress another average (of another averager)
// first, and neither would ever get there.
struct Flow {
  Hello mine{};
  std::vector<Hello> all;
  bool done = false;           // nothing left for the last stage
  std::exception_ptr error;    // a failed stage: the average ends with this error, never as done
  // The exchange (see begin_exchange):
  bool exchanging = false;
  Card card;                   // this rank's
  std::vector<Card> cards;     // every rank's
  IpcPeers fresh;              // the new buffers until the handles are out
  std::string why;             // why this rank cannot take part ("" if it can)
  int ok = 0, all_ok = 0;      // the group's verdict (MPI_MIN)
  bool crossing = false;       // two-level: this rank's slice is on its way across nodes
};

// The exchange, part 1: new buffers and this rank's card, the peers' old buffers unmapped, the
// cards to every rank (MPI_Iallgather). This rank's part may fail (no memory, no IPC): it then
// says so and still joins every collective, so the group decides together. Every rank is here
// (the handshake completed), and no peer reads this rank's old buffers any more (each finished
// its last average's kernels before it joined the handshake).
void begin_exchange(DeviceState& s, IpcPeers& e, Flow& f, MPI_Comm c, int g, bool two,
                    std::vector<MPI_Request>& reqs) {
  count_use(Use::device_ipc_exchange);
  const std::size_t nf = s.f32.size(), nd = s.f64.size();
  Card& mine = f.card;
  IpcPeers& fresh = f.fresh;
  fresh.be = s.be;
  fresh.two_shot = two;
  fresh.nf = nf;
  fresh.nd = nd;
  try {
    f.why = s.be->ipc_unsupported(s.device);
    const std::string id = s.be->device_id(s.device);
    std::strncpy(mine.id, id.c_str(), kIdBytes - 1);
    if (f.why.empty() && two) {
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
    } else if (f.why.empty()) {
      fresh.off_d = IpcPeers::round_up(nf * sizeof(float));
      fresh.half = fresh.off_d + IpcPeers::round_up(nd * sizeof(double));
      fresh.mine = s.be->alloc_shared(2 * fresh.half, mine.buffer);
    }
  } catch (const std::exception& x) {
    f.why = x.what();
  }
  if (!f.why.empty()) f.why = "world rank " + std::to_string(Comm::world_rank()) + ": " + f.why;
  // Peers' old buffers are unmapped before the collective; this rank's old buffers are freed
  // after it, once every peer has unmapped them (CUDA: freeing memory a peer still maps is
  // undefined).
  e.exchanged = false;
  e.close_peers();
  f.cards.resize(static_cast<std::size_t>(g));
  MPI_Request q = MPI_REQUEST_NULL;
  check(MPI_Iallgather(&mine, sizeof(Card), MPI_BYTE, f.cards.data(), sizeof(Card), MPI_BYTE, c, &q),
        "MPI_Iallgather(node transport: handles)");
  reqs.push_back(q);
  f.exchanging = true;
}

// The group's verdict on `f.ok` (MPI_MIN into f.all_ok), issued into `reqs`.
void vote(Flow& f, MPI_Comm c, bool ok, std::vector<MPI_Request>& reqs) {
  f.ok = ok ? 1 : 0;
  MPI_Request q = MPI_REQUEST_NULL;
  check(MPI_Iallreduce(&f.ok, &f.all_ok, 1, MPI_INT, MPI_MIN, c, &q), "MPI_Iallreduce(node transport: reach)");
  reqs.push_back(q);
}

// Part 2, every card in: the new buffers adopted (the old ones freed: every peer has unmapped
// them), whether this rank reaches every rank's device, voted.
void reach(DeviceState& s, IpcPeers& e, Flow& f, MPI_Comm c, int g, std::vector<MPI_Request>& reqs) {
  e.release();
  IpcPeers& fresh = f.fresh;
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
  bool ok = f.why.empty();
  for (int r = 0; r < g && ok; ++r) {
    const std::string peer_id(f.cards[static_cast<std::size_t>(r)].id);
    try {
      if (!s.be->can_reach(s.device, peer_id)) {
        ok = false;
        f.why = "device " + std::string(f.card.id) + " cannot read device " + peer_id +
                " (neither the same device nor peer access)";
      }
    } catch (const std::exception& x) {
      ok = false;
      f.why = x.what();
    }
  }
  vote(f, c, ok, reqs);
}

// Part 3, every rank reaches every other: the peers' buffers mapped, voted.
void map_peers(DeviceState& s, IpcPeers& e, Flow& f, MPI_Comm c, int me, int g, std::vector<MPI_Request>& reqs) {
  bool ok = f.all_ok == 1;
  if (ok) {
    e.me = me;
    const auto n = static_cast<std::size_t>(g);
    const bool two = e.two_shot;
    const std::size_t nf = e.nf, nd = e.nd;
    try {
      if (two) {
        e.peer_slice.assign(n, nullptr);
        e.peer_f.assign(n, nullptr);
        e.peer_d.assign(n, nullptr);
        for (std::size_t r = 0; r < n; ++r) {
          const Card& k = f.cards[r];
          const bool self = static_cast<int>(r) == me;
          e.peer_slice[r] = self ? e.slice : s.be->open_shared(k.buffer, e.slice_bytes);
          if (nf > 0) e.peer_f[r] = self ? s.f32.storage : s.be->open_shared(k.store_f, k.bytes_f);
          if (nd > 0) e.peer_d[r] = self ? s.f64.storage : s.be->open_shared(k.store_d, k.bytes_d);
        }
      } else {
        e.peer.assign(n, nullptr);
        for (std::size_t r = 0; r < n; ++r)
          e.peer[r] = static_cast<int>(r) == me ? e.mine : s.be->open_shared(f.cards[r].buffer, 2 * e.half);
      }
    } catch (const std::exception& x) {
      ok = false;
      f.why = x.what();
    }
  }
  vote(f, c, ok, reqs);
}

// Part 4: true when the group may use the node transport (the exchange is complete); false on
// every rank alike when some rank cannot: nothing stays mapped, and this rank's buffers stay
// allocated (peers may have mapped them).
bool conclude_exchange(IpcPeers& e, Flow& f) {
  f.exchanging = false;
  if (f.all_ok != 1) {
    if (f.why.empty()) f.why = "another rank of the group could not use the node transport";
    e.close_peers();
    return false;
  }
  e.token = token_of(f.cards.data(), f.cards.size() * sizeof(Card));
  e.exchanged = true;
  e.count = 0;
  return true;
}

// Two-level, after reduce_slice: this rank's reduced slice (its node's sum) to pinned host
// memory, and its sum over the nodes (MPI_Iallreduce on `across`, in place) issued into `reqs`.
// Every rank of `across` holds the same slice index of a set of the same sizes: the counts
// agree.
void cross(DeviceState& s, IpcPeers& e, MPI_Comm across, std::vector<MPI_Request>& reqs) {
  if (e.host_bytes < e.slice_bytes) {
    if (e.host != nullptr) s.be->release_pinned(e.host);
    e.host = nullptr;
    e.host_bytes = 0;
    e.host = s.be->alloc_pinned(e.slice_bytes);
    e.host_bytes = e.slice_bytes;
  }
  s.be->copy(e.host, e.slice, e.slice_bytes, s.stream);
  wait_stream(s);
  for (DeviceBucket* b : {&s.f32, &s.f64}) {
    if (b->size() == 0) continue;
    const bool f32 = b->dtype == Dtype::f32;
    const auto [lo, hi] = slice_range(e.me, b->size(), f32 ? e.lf : e.ld);
    if (hi == lo) continue;
    if (hi - lo > static_cast<std::size_t>(INT32_MAX))
      throw Error("hma: the node transport: a slice of " + std::to_string(hi - lo) +
                  " elements is more than one MPI call carries");
    MPI_Request q = MPI_REQUEST_NULL;
    check(MPI_Iallreduce(MPI_IN_PLACE, static_cast<char*>(e.host) + (f32 ? 0 : e.slice_off_d),
                         static_cast<int>(hi - lo), f32 ? MPI_FLOAT : MPI_DOUBLE, MPI_SUM, across, &q),
          "MPI_Iallreduce(node transport: this rank's slice across nodes)");
    reqs.push_back(q);
  }
}

// Two-level, the slice summed over the nodes: back into this rank's exported slice; the host
// waits for it (a peer gathers it once the barrier after this says so).
void cross_back(DeviceState& s, IpcPeers& e) {
  s.be->copy(e.slice, e.host, e.slice_bytes, s.stream);
  wait_stream(s);
  count_use(Use::device_ipc_two_level);
}

double factor_of(std::uint64_t bits) {
  double f = 0;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

void start_ipc(DeviceState& s, const IpcRoute& r, Pending& p,
               const std::function<void(DeviceBucket&, void*)>& pack) {
  IpcLevel& level = *r.level;
  if (level.comm.is_null()) throw Error("hma: internal: the node transport's communicator was not made");
  const MPI_Comm c = level.comm.get();  // this node's ranks of the group
  const int g = level.comm.size(), me = level.comm.rank();
  // The hello and the votes: over the whole group (two-level: every node decides alike), where
  // this node's ranks are `g` contiguous ranks from `off`.
  const MPI_Comm hc = level.control();
  const int hg = level.two_level() ? level.whole.size() : g;
  const int off = level.two_level() ? level.whole.rank() - me : 0;
  const MPI_Comm across = level.two_level() ? level.across.get() : MPI_COMM_NULL;
  auto e = entry_for(s, r.level);
  const std::size_t nf = s.f32.size(), nd = s.f64.size();
  // Two-level moves slices across nodes: always the two-shot sum.
  const bool two = level.two_level() || nf * sizeof(float) + nd * sizeof(double) >= r.two_shot_from;
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
  f->all.resize(static_cast<std::size_t>(hg));
  MPI_Request q = MPI_REQUEST_NULL;
  check(MPI_Iallgather(f->mine.data(), 6, MPI_UINT64_T, f->all.data(), 6, MPI_UINT64_T, hc, &q),
        "MPI_Iallgather(node transport: handshake)");
  p.reqs.push_back(q);
  DeviceState* sp = &s;
  Pending* pp = &p;  // heap-stable, like the state: it outlives its stages
  p.finish = [sp, f, user = r.fallback.user] {
    if (f->error) std::rethrow_exception(f->error);  // every later wait() says so too
    DeviceGuard on_device(sp->be, sp->device);
    sp->be->stream_wait(user, sp->done);
  };
  const int group = r.fallback.group;
  const bool mul = r.fallback.reciprocal || (group & (group - 1)) == 0;
  // The sum once the group's buffers are mapped: one-shot exports this rank's terms and waits
  // for every rank's (the last stage sums); two-shot reduces this rank's slice and waits for
  // every slice (the last stage gathers).
  auto sum_after = [sp, e, f, c, g, off, across, two, group, mul](bool exported, std::vector<MPI_Request>& reqs) {
    if (!two && exported) {
      sum_all(*sp, *e);
      f->done = true;
      return;
    }
    MPI_Request b = MPI_REQUEST_NULL;
    if (!two) {
      export_terms(*sp, *e, 0);
      check(MPI_Ibarrier(c, &b), "MPI_Ibarrier(node transport)");  // every rank's terms exported
    } else {
      std::vector<double> factor(static_cast<std::size_t>(g));
      for (int k = 0; k < g; ++k)
        factor[static_cast<std::size_t>(k)] = factor_of(f->all[static_cast<std::size_t>(off + k)][4]);
      reduce_slice(*sp, *e, factor, group, mul);
      if (across != MPI_COMM_NULL) {  // the slice across nodes first; the barrier after it
        cross(*sp, *e, across, reqs);
        f->crossing = true;
        return;
      }
      // Every slice is reduced, and no rank reads storage any more.
      check(MPI_Ibarrier(c, &b), "MPI_Ibarrier(node transport: slices)");
    }
    reqs.push_back(b);
  };
  // Stage 1, the handshake in: sum, or begin the exchange.
  auto hello = [sp, e, f, c, g, off, two, pack, sum_after](std::vector<MPI_Request>& reqs) {
    for (const auto& a : f->all)
      if (a[1] != f->mine[1] || a[2] != f->mine[2])
        throw Error("hma: the node transport: the ranks of the group hold device sets of different "
                    "sizes (" + std::to_string(a[1]) + " f32 and " + std::to_string(a[2]) +
                    " f64 elements against " + std::to_string(f->mine[1]) + " and " +
                    std::to_string(f->mine[2]) + " here); with HMA_CHECK=0 nothing catches this earlier");
    // Every rank's buffers mapped and current (the token: this node's exchange; each node has
    // its own), in the same average since the exchange.
    bool go = true;
    for (std::size_t k = 0; k < f->all.size(); ++k) {
      const auto& a = f->all[k];
      const bool node = static_cast<int>(k) >= off && static_cast<int>(k) < off + g;
      go = go && a[0] == 1 && a[3] == f->mine[3] && (!node || a[5] == f->mine[5]);
    }
    if (go) {
      sum_after(true, reqs);
      return;
    }
    if (!two && f->mine[0] == 1) {
      // This rank packed into its exported half, which the exchange frees: the terms go to
      // storage first (the fallback reads them there too).
      for (DeviceBucket* b : {&sp->f32, &sp->f64})
        if (b->size() > 0)
          sp->be->copy(b->storage, e->at(e->me, e->count % 2, b->dtype), b->size() * b->elem(), sp->stream);
      wait_stream(*sp);
    }
    begin_exchange(*sp, *e, *f, c, g, two, reqs);
  };
  // Stages 2-4, only while exchanging: reach, map, then sum (or hand over to the fallback).
  auto reach_stage = [sp, e, f, hc, g](std::vector<MPI_Request>& reqs) {
    if (f->exchanging) reach(*sp, *e, *f, hc, g, reqs);
  };
  auto map_stage = [sp, e, f, hc, me, g](std::vector<MPI_Request>& reqs) {
    if (f->exchanging) map_peers(*sp, *e, *f, hc, me, g, reqs);
  };
  auto settle = [sp, pp, e, f, r, two, pack, sum_after](std::vector<MPI_Request>& reqs) {
    if (!f->exchanging) return;
    if (conclude_exchange(*e, *f)) {
      sum_after(false, reqs);
      return;
    }
    // The devices cannot reach each other: off at this level for good, on every rank alike;
    // this average hands over to the staged or direct path (it replaces this average's stages,
    // see complete()).
    r.level->off = true;
    r.level->why = f->why;
    if (two)  // the raw values are in storage: scale them as the MPI paths expect
      for (DeviceBucket* b : {&sp->f32, &sp->f64})
        if (b->size() > 0) pack(*b, b->storage);
    sp->be->record(sp->packed, sp->stream);
    f->done = true;
    start_device(*sp, r.fallback, *pp, r.worker);
  };
  // Stage 5, two-level: the slice summed over the nodes back on the device, then the barrier
  // before the gather.
  auto back = [sp, e, f, c](std::vector<MPI_Request>& reqs) {
    if (!f->crossing) return;
    f->crossing = false;
    cross_back(*sp, *e);
    MPI_Request b = MPI_REQUEST_NULL;  // every slice is final, and no rank reads storage any more
    check(MPI_Ibarrier(c, &b), "MPI_Ibarrier(node transport: slices)");
    reqs.push_back(b);
  };
  // Stage 6: the sum (one-shot after an exchange) or the gather (two-shot).
  auto last = [sp, e, f, two](std::vector<MPI_Request>&) {
    if (f->done) return;
    DeviceGuard on_device(sp->be, sp->device);
    if (two) gather_slices(*sp, *e);
    else sum_all(*sp, *e);
  };
  using Stage = std::function<void(std::vector<MPI_Request>&)>;
  for (Stage st : {Stage(hello), Stage(reach_stage), Stage(map_stage), Stage(settle), Stage(back), Stage(last)}) {
    p.stages.push_back([sp, e, f, st = std::move(st)](std::vector<MPI_Request>& reqs) {
      if (f->error) return;
      try {
        DeviceGuard on_device(sp->be, sp->device);
        st(reqs);
      } catch (...) {
        // Terminal: this average failed here. The entry is no longer trusted (the next average
        // exchanges anew); the later stages do nothing and finish rethrows.
        e->exchanged = false;
        f->exchanging = false;
        f->done = true;
        f->error = std::current_exception();
        throw;
      }
    });
  }
}

}  // namespace hma::detail
