#include "transport/two_level.hpp"

#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "hma/error.hpp"
#include "support/timeline.hpp"
#include "transport/elements.hpp"
#include "transport/uses.hpp"
#include "transport/wire.hpp"

namespace hma::detail {

namespace {

// The across-nodes stage when the group spans two nodes: each pair of ranks of equal node-local
// rank sums its block with one transfer each way, and the directions are split by node-local
// rank (half the pairs send node A -> B first, the other half B -> A) so that both directions
// of every node's link carry data in both phases while no process sends and receives at once.
// Measured on the emulated cluster (Open MPI 4.1, TCP, 1 Gbit/s): a process that sends and
// receives large messages at the same time moves them at half the link rate, one that only
// sends or only receives at the full rate; an MPI_Sendrecv exchange of 2 MiB per pair took
// 47-62 ms, this one 35.5 ms (the wire bound is 35.2 ms). The sum is computed once, on the
// receiving side, and sent back: both nodes hold the same bits.
// E: the element on the wire (T, or 16 bits with a 16-bit wire), `add` its addition.
template <class E, class Add>
void sum_across_two_nodes(E* x, std::size_t n, const Route& route, E* tmp, MPI_Datatype type, Add add) {
  const MPI_Comm inter = route.two->inter.get();
  const int me = route.two->inter.rank(), peer = 1 - me;
  const bool sends_first = (route.two->intra.rank() % 2 == 0) == (me == 0);
  const int c = static_cast<int>(n);
  constexpr int kTag = 0x686e;  // hma's communicators carry only hma's traffic
  if (sends_first) {
    check(MPI_Send(x, c, type, peer, kTag, inter), "MPI_Send(two-level, across nodes)");
    check(MPI_Recv(x, c, type, peer, kTag, inter, MPI_STATUS_IGNORE),
          "MPI_Recv(two-level, across nodes)");
  } else {
    check(MPI_Recv(tmp, c, type, peer, kTag, inter, MPI_STATUS_IGNORE),
          "MPI_Recv(two-level, across nodes)");
    for (std::size_t i = 0; i < n; ++i) x[i] = add(tmp[i], x[i]);
    check(MPI_Send(x, c, type, peer, kTag, inter), "MPI_Send(two-level, across nodes)");
  }
}

// The same idea across an even number N >= 4 of nodes: a ring over the ranks of equal node-local
// rank (reduce-scatter, then allgather, N - 1 steps each), every step in two phases. A rank on
// an even node sends first and then receives, one on an odd node the other way round, swapped
// for odd node-local ranks: in each phase every process only sends or only receives, and half
// the processes of every node send while the other half receive. Each node's link carries
// 2 (N - 1) / N of the bytes each way, the bound for an allreduce across N nodes. Every block is
// summed in ring order once and then passed around: all ranks hold the same bits.
template <class E, class Add>
void sum_across_even_nodes(E* x, std::size_t n, const Route& route, E* tmp, MPI_Datatype type, Add add) {
  const MPI_Comm inter = route.two->inter.get();
  const int N = route.two->inter.size(), me = route.two->inter.rank();
  const int right = (me + 1) % N, left = (me + N - 1) % N;
  const bool sends_first = (me % 2 == 0) == (route.two->intra.rank() % 2 == 0);
  constexpr int kTag = 0x686f;
  auto blk = [&](int i) { return ring_block(n, N, i); };
  auto step = [&](const E* out, std::size_t out_n, E* in, std::size_t in_n) {
    auto snd = [&] {
      check(MPI_Send(out, static_cast<int>(out_n), type, right, kTag, inter),
            "MPI_Send(two-level ring, across nodes)");
    };
    auto rcv = [&] {
      check(MPI_Recv(in, static_cast<int>(in_n), type, left, kTag, inter, MPI_STATUS_IGNORE),
            "MPI_Recv(two-level ring, across nodes)");
    };
    if (sends_first) {
      snd();
      rcv();
    } else {
      rcv();
      snd();
    }
  };
  for (int k = 0; k < N - 1; ++k) {  // reduce-scatter: send block me-k, add block me-k-1
    const auto [s0, s1] = blk(me - k);
    const auto [r0, r1] = blk(me - k - 1);
    step(x + s0, s1 - s0, tmp, r1 - r0);
    for (std::size_t i = r0; i < r1; ++i) x[i] = add(tmp[i - r0], x[i]);
  }
  for (int k = 0; k < N - 1; ++k) {  // allgather: this rank owns block me+1
    const auto [s0, s1] = blk(me + 1 - k);
    const auto [r0, r1] = blk(me - k);
    step(x + s0, s1 - s0, x + r0, r1 - r0);
  }
}

// A 16-bit wire across nodes: the node's exact partial sums (this rank's block) rounded to 16
// bits, summed across the nodes in 16 bits (each addition in f32: direction-split as for exact
// blocks, or MPI_Allreduce with hma's op), widened back. Within the node everything stays exact.
bool split_across(const Route& route, std::size_t piece_bytes, std::size_t block_bytes);

template <Element T>
void sum_across_16(T* x, std::size_t n, const Route& route, std::vector<std::uint16_t>& buf) {
  buf.resize(2 * n);
  std::uint16_t* h = buf.data();
  with_format(route.wire, [&](auto f) {
    using F = decltype(f);
    for (std::size_t i = 0; i < n; ++i) h[i] = F::to(to_float_for_16(x[i]));
    count_use(Use::wire_piece);
    if (split_across(route, n * static_cast<std::size_t>(route.per_node) * 2, n * 2)) {
      count_use(Use::two_level_split);
      const auto plus = [](std::uint16_t a, std::uint16_t c) { return F::add(a, c); };
      if (route.two->inter.size() == 2) sum_across_two_nodes(h, n, route, h + n, MPI_UINT16_T, plus);
      else sum_across_even_nodes(h, n, route, h + n, MPI_UINT16_T, plus);
    } else {
      check(MPI_Allreduce(MPI_IN_PLACE, h, static_cast<int>(n), MPI_UINT16_T, wire_sum_op(route.wire),
                          route.two->inter.get()),
            "MPI_Allreduce(two-level, across nodes, 16-bit wire)");
    }
    for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(F::from(h[i]));
  });
}

// Whether a piece of `piece_bytes` (blocks of `block_bytes` per rank) sums across nodes
// direction-split: an even number of nodes, and the cost model's threshold (or the tests').
bool split_across(const Route& route, std::size_t piece_bytes, std::size_t block_bytes) {
  const std::size_t forced = split_min_block_override();
  return route.two->inter.size() % 2 == 0 &&
         (forced != 0 ? block_bytes >= forced : piece_bytes >= route.split_min_piece);
}

}  // namespace

// Blocking, pipelined over pieces: while piece p crosses the network (blocking point-to-point
// or MPI_Allreduce, whose progress also drives the non-blocking collectives in flight), the
// reduce-scatter of piece p+1 and the allgather of piece p-1 run within the node. Three slots
// of scratch rotate; the collectives on the node's communicator are issued in the same order on
// every rank (RS 0, RS 1, AG 0, RS 2, AG 1, ...).
template <Element T>
void two_level_blocking(Bucket<T>& b, const Route& route) {
  const Scaler<T> s(route.group, route.weight);
  const MPI_Comm intra = route.two->intra.get(), inter = route.two->inter.get();
  const std::size_t L = static_cast<std::size_t>(route.per_node);
  const std::size_t total = b.size();
  if (total == 0) return;
  const std::size_t piece =
      piece_elems(two_level_piece_bytes(total * sizeof(T), route.chunk_bytes), sizeof(T), max_count() / 2);
  const int nodes = route.two->inter.size();
  const std::size_t P = (total + piece - 1) / piece;
  const std::size_t bmax = (std::min(piece, total) + L - 1) / L;  // the largest block
  constexpr std::size_t kSlots = 3;
  const std::size_t sstride = bmax * (L + 1);  // a slot: L blocks + what the node across sends
  b.send.resize(sstride * std::min(P, kSlots));
  b.recv.resize(bmax * std::min(P, kSlots));
  struct Slot {
    std::size_t lo = 0, hi = 0, blk = 0;
    MPI_Request rs = MPI_REQUEST_NULL, ag = MPI_REQUEST_NULL;
  };
  Slot slot[kSlots];
  std::vector<std::uint16_t> wire16;  // a 16-bit wire's block and scratch
  auto S = [&](std::size_t p) { return b.send.data() + (p % kSlots) * sstride; };
  auto R = [&](std::size_t p) { return b.recv.data() + (p % kSlots) * bmax; };
  auto start_rs = [&](std::size_t p) {
    Slot& q = slot[p % kSlots];
    q.lo = p * piece;
    q.hi = std::min(q.lo + piece, total);
    q.blk = (q.hi - q.lo + L - 1) / L;
    count_use(Use::two_level_piece);
    scale_out(b, q.lo, q.hi, s, S(p));
    std::fill(S(p) + (q.hi - q.lo), S(p) + q.blk * L, T(0));
    check(MPI_Ireduce_scatter_block(S(p), R(p), static_cast<int>(q.blk), mpi_type<T>(), MPI_SUM,
                                    intra, &q.rs),
          "MPI_Ireduce_scatter_block(two-level, within the node)");
  };
  auto finish_ag = [&](std::size_t p) {
    Slot& q = slot[p % kSlots];
    {
      TimelineScope st("allgather within the node (wait)", route.level, route.step,
                       (q.hi - q.lo) * sizeof(T), route.group);
      check(MPI_Wait(&q.ag, MPI_STATUS_IGNORE), "MPI_Iallgather(two-level, within the node)");
    }
    copy_back(b, q.lo, q.hi, S(p));
  };
  TimelineScope t("two-level allreduce", route.level, route.step, total * sizeof(T), route.group);
  start_rs(0);
  for (std::size_t p = 0; p < P; ++p) {
    Slot& q = slot[p % kSlots];
    if (p + 1 < P) {
      if (p + 1 >= kSlots) finish_ag(p + 1 - kSlots);  // the slot piece p+1 reuses
      start_rs(p + 1);
    }
    {
      TimelineScope st("reduce-scatter within the node (wait)", route.level, route.step,
                       (q.hi - q.lo) * sizeof(T), route.group);
      check(MPI_Wait(&q.rs, MPI_STATUS_IGNORE), "MPI_Ireduce_scatter_block(two-level, within the node)");
    }
    {
      TimelineScope st("sum across nodes", route.level, route.step, q.blk * sizeof(T), route.group);
      if (route.wire != Wire::exact) {
        sum_across_16(R(p), q.blk, route, wire16);
      } else if (split_across(route, (q.hi - q.lo) * sizeof(T), q.blk * sizeof(T))) {
        count_use(Use::two_level_split);
        const auto plus = [](T a, T c) { return a + c; };
        if (nodes == 2) sum_across_two_nodes(R(p), q.blk, route, S(p) + q.blk * L, mpi_type<T>(), plus);
        else sum_across_even_nodes(R(p), q.blk, route, S(p) + q.blk * L, mpi_type<T>(), plus);
      } else {
        check(MPI_Allreduce(MPI_IN_PLACE, R(p), static_cast<int>(q.blk), mpi_type<T>(), MPI_SUM, inter),
              "MPI_Allreduce(two-level, across nodes)");
      }
    }
    check(MPI_Iallgather(R(p), static_cast<int>(q.blk), mpi_type<T>(), S(p), static_cast<int>(q.blk),
                         mpi_type<T>(), intra, &q.ag),
          "MPI_Iallgather(two-level, within the node)");
  }
  for (std::size_t p = P > kSlots ? P - kSlots : 0; p < P; ++p) finish_ag(p);
}

template void two_level_blocking(Bucket<float>&, const Route&);
template void two_level_blocking(Bucket<double>&, const Route&);

namespace {

using Stage = std::function<void(std::vector<MPI_Request>&)>;

// The across-nodes stages of a non-blocking two-level average on `blk` elements at `x` (the
// rank's block: T, or 16 bits with a 16-bit wire), appended to `later`: MPI_Iallreduce on the
// nodes' communicator, or the direction split of the blocking path (sum_across_two_nodes,
// sum_across_even_nodes) as a chain of stages, one Isend or Irecv each; additions of what
// arrived (into `tmp`) run when the next stage is issued, through `pending`.
template <class E, class Add>
void across_stages(E* x, E* tmp, MPI_Datatype type, MPI_Op op, Add add, std::size_t blk, bool split,
                   const Route& route, const std::shared_ptr<std::function<void()>>& pending,
                   std::vector<Stage>& later) {
  const MPI_Comm inter = route.two->inter.get();
  const int nodes = route.two->inter.size();
  if (!split) {
    later.push_back([x, type, op, blk, inter, pending](std::vector<MPI_Request>& q) {
      if (*pending) std::exchange(*pending, nullptr)();
      MPI_Request r = MPI_REQUEST_NULL;
      check(MPI_Iallreduce(MPI_IN_PLACE, x, static_cast<int>(blk), type, op, inter, &r),
            "MPI_Iallreduce(two-level)");
      q.push_back(r);
    });
    return;
  }
  count_use(Use::two_level_split);
  const int me = route.two->inter.rank();
  const bool sends_first = (me % 2 == 0) == (route.two->intra.rank() % 2 == 0);
  const int right = (me + 1) % nodes, left = (me + nodes - 1) % nodes;
  constexpr int kTag = 0x6870;
  auto send = [=](std::size_t at, std::size_t n, int to) -> Stage {
    return [=](std::vector<MPI_Request>& q) {
      if (*pending) std::exchange(*pending, nullptr)();
      MPI_Request r = MPI_REQUEST_NULL;
      check(MPI_Isend(x + at, static_cast<int>(n), type, to, kTag, inter, &r),
            "MPI_Isend(two-level, across nodes)");
      q.push_back(r);
    };
  };
  // Receives n elements from `from` into tmp (add: then adds them into x[at, at+n) before the
  // next stage) or straight into x[at, at+n).
  auto recv = [=](std::size_t at, std::size_t n, int from, bool sum) -> Stage {
    return [=](std::vector<MPI_Request>& q) {
      if (*pending) std::exchange(*pending, nullptr)();
      MPI_Request r = MPI_REQUEST_NULL;
      check(MPI_Irecv(sum ? tmp : x + at, static_cast<int>(n), type, from, kTag, inter, &r),
            "MPI_Irecv(two-level, across nodes)");
      q.push_back(r);
      if (sum)
        *pending = [=] {
          for (std::size_t i = 0; i < n; ++i) x[at + i] = add(tmp[i], x[at + i]);
        };
    };
  };
  auto step = [&](Stage out, Stage in) {
    later.push_back(sends_first ? out : in);
    later.push_back(sends_first ? in : out);
  };
  if (nodes == 2) {
    // The receiving side adds and sends the sum back; the sending side receives it in place.
    step(send(0, blk, 1 - me), recv(0, blk, 1 - me, !sends_first));
  } else {
    auto sub = [&](int i) { return ring_block(blk, nodes, i); };
    for (int k = 0; k < nodes - 1; ++k) {  // reduce-scatter
      const auto [s0, s1] = sub(me - k);
      const auto [r0, r1] = sub(me - k - 1);
      step(send(s0, s1 - s0, right), recv(r0, r1 - r0, left, true));
    }
    for (int k = 0; k < nodes - 1; ++k) {  // allgather
      const auto [s0, s1] = sub(me + 1 - k);
      const auto [r0, r1] = sub(me - k);
      step(send(s0, s1 - s0, right), recv(r0, r1 - r0, left, false));
    }
  }
}

// One bucket's stages: the first issued now into `reqs`, the next two returned in `later`.
template <Element T>
void stages_of(Bucket<T>& b, const Route& route, std::vector<MPI_Request>& reqs,
               std::vector<Stage>& later, std::vector<std::function<void()>>& finish) {
  const std::size_t N = b.size(), L = static_cast<std::size_t>(route.per_node);
  if (N == 0) return;
  const std::size_t blk = (N + L - 1) / L;
  const MPI_Comm intra = route.two->intra.get();
  const Scaler<T> s(route.group, route.weight);
  // A 16-bit wire crosses with 2-byte elements: the split threshold is in those bytes (as in
  // the blocking path's sum_across_16).
  const std::size_t wire_elem = route.wire == Wire::exact ? sizeof(T) : 2;
  const bool split = split_across(route, N * wire_elem, blk * wire_elem);
  b.send.resize(blk * (split ? L + 1 : L));  // split: the last block holds what arrives from across
  b.recv.resize(blk);
  T* S = b.send.data();
  scale_out(b, 0, N, s, S);
  std::fill(S + N, S + blk * L, T(0));
  const int c = static_cast<int>(blk);
  MPI_Request r = MPI_REQUEST_NULL;
  check(MPI_Ireduce_scatter_block(S, b.recv.data(), c, mpi_type<T>(), MPI_SUM, intra, &r),
        "MPI_Ireduce_scatter_block(two-level)");
  reqs.push_back(r);
  Bucket<T>* bp = &b;  // buckets live on the heap: stable while in flight
  auto pending = std::make_shared<std::function<void()>>();  // work owed before the next stage
  if (route.wire == Wire::exact) {
    across_stages(b.recv.data(), S + blk * L, mpi_type<T>(), MPI_SUM, [](T a, T x) { return a + x; },
                  blk, split, route, pending, later);
  } else {
    // A 16-bit wire: this rank's block of the node's exact sum is rounded to 16 bits before the
    // first stage across and widened back before the allgather (blocking: sum_across_16).
    with_format(route.wire, [&](auto fmt) {
      using F = decltype(fmt);
      auto h = std::make_shared<std::vector<std::uint16_t>>(2 * blk);
      std::uint16_t* H = h->data();
      T* R = b.recv.data();
      *pending = [H, R, blk] {
        for (std::size_t i = 0; i < blk; ++i) H[i] = F::to(to_float_for_16(R[i]));
      };
      count_use(Use::wire_start);
      across_stages(H, H + blk, MPI_UINT16_T, wire_sum_op(route.wire),
                    [](std::uint16_t a, std::uint16_t x) { return F::add(a, x); }, blk, split, route,
                    pending, later);
      later.push_back([h, H, R, blk, pending](std::vector<MPI_Request>&) {
        if (*pending) std::exchange(*pending, nullptr)();
        for (std::size_t i = 0; i < blk; ++i) R[i] = static_cast<T>(F::from(H[i]));
      });
    });
  }
  later.push_back([bp, c, intra, pending](std::vector<MPI_Request>& q) {
    if (*pending) std::exchange(*pending, nullptr)();
    MPI_Request x = MPI_REQUEST_NULL;
    check(MPI_Iallgather(bp->recv.data(), c, mpi_type<T>(), bp->send.data(), c, mpi_type<T>(),
                         intra, &x),
          "MPI_Iallgather(two-level)");
    q.push_back(x);
  });
  finish.push_back([bp, N] { copy_back(*bp, 0, N, bp->send.data()); });
}

}  // namespace

void start_two_level(Bucket<float>& f, Bucket<double>& d, const Route& route, Pending& p) {
  // Both buckets are checked before anything is issued: a refusal after the f32 stage went out
  // would leave a collective in flight that no one completes.
  const std::size_t L = static_cast<std::size_t>(route.per_node);
  for (const std::size_t N : {f.size(), d.size()})
    if ((N + L - 1) / L > static_cast<std::size_t>(std::numeric_limits<int>::max()))
      throw InvalidArgument("hma: two-level average of " + std::to_string(N) +
                            " elements: too large for one non-blocking collective; use "
                            "HMA_ALGORITHM=flat or Progress::thread");
  count_use(Use::two_level_start);
  std::vector<Stage> lf, ld;
  std::vector<std::function<void()>> fin;
  stages_of(f, route, p.reqs, lf, fin);
  stages_of(d, route, p.reqs, ld, fin);
  for (std::size_t k = 0; k < std::max(lf.size(), ld.size()); ++k)
    p.stages.push_back([a = k < lf.size() ? lf[k] : nullptr,
                        b = k < ld.size() ? ld[k] : nullptr](std::vector<MPI_Request>& q) {
      if (a) a(q);
      if (b) b(q);
    });
  p.finish = [fin] {
    for (const auto& fn : fin) fn();
  };
}

}  // namespace hma::detail
