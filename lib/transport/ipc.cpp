#include "transport/ipc.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

#include "hma/error.hpp"
#include "transport/ipc_exchange.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

namespace {

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
