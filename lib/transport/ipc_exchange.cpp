#include "transport/ipc_exchange.hpp"

#include <cstring>
#include <exception>
#include <string>
#include <utility>

#include "hma/comm.hpp"
#include "hma/error.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

namespace {

std::uint64_t token_of(const void* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (std::size_t i = 0; i < n; ++i) h = (h ^ static_cast<const unsigned char*>(p)[i]) * 1099511628211ULL;
  return h;
}

}  // namespace

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
static void vote(Flow& f, MPI_Comm c, bool ok, std::vector<MPI_Request>& reqs) {
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

}  // namespace hma::detail
