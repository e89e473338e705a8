// The host transports behind one interface: which way a host average's bytes move.
#include "transport/host.hpp"

#include <algorithm>

#include "support/timeline.hpp"
#include "transport/allreduce.hpp"
#include "transport/elements.hpp"
#include "transport/ring.hpp"
#include "transport/two_level.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

namespace {

// Blocking average of one bucket in pieces of route.chunk_bytes, each still in cache while it is
// scaled, reduced and unpacked: through hma's ring (in place in the owned region and the user
// arrays, scaling fused) or through divide + MPI_Allreduce, chosen per piece.
template <Element T>
void flat_blocking(Bucket<T>& b, const Route& route, std::vector<T>& scratch) {
  const std::size_t piece = piece_elems(route.chunk_bytes, sizeof(T), max_count());
  for (std::size_t lo = 0; lo < b.size(); lo += piece) {
    const std::size_t hi = std::min(lo + piece, b.size());
    const std::size_t bytes = (hi - lo) * sizeof(T);
    const bool ring = route.reduction == Reduction::ring ||
                      (route.reduction == Reduction::automatic &&
                       bytes / static_cast<std::size_t>(route.group) >= route.ring_min_block);
    if (!ring) {
      allreduce_piece(b, lo, hi, route);
      continue;
    }
    count_use(Use::ring_piece);
    TimelineScope t("ring allreduce (scaling fused)", route.level, route.step, bytes, route.group);
    const Runs<T> runs = Runs<T>::of(b, lo, hi);
    if (route.weight >= 0) {
      // The ring folds one division by g into its additions (the same for every term); weights
      // differ per rank, so each rank scales its own terms first and the ring only adds.
      const Scaler<T> w(route.group, route.weight);
      runs.each(0, runs.N, [&](T* p, std::size_t n, std::size_t) { w.in_place(p, n); });
      ring_average(runs, route.comm, route.rank, route.group, Scaler<T>(1), scratch);
    } else {
      ring_average(runs, route.comm, route.rank, route.group, Scaler<T>(route.group), scratch);
    }
  }
}

}  // namespace

void average_host(Bucket<float>& f, Bucket<double>& d, const Route& route, Scratch& scratch) {
  if (route.two != nullptr) {
    two_level_blocking(f, route);
    two_level_blocking(d, route);
  } else {
    flat_blocking(f, route, scratch.f);
    flat_blocking(d, route, scratch.d);
  }
}

void start_host(Bucket<float>& f, Bucket<double>& d, const Route& route, Pending& p) {
  if (route.two != nullptr) {
    start_two_level(f, d, route, p);
  } else {
    start_allreduce(f, route, p.reqs);
    start_allreduce(d, route, p.reqs);
  }
}

}  // namespace hma::detail
