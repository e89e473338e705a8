#include "transport/allreduce.hpp"

#include <algorithm>

#include "support/mpi_static.hpp"
#include "support/timeline.hpp"
#include "transport/elements.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

namespace {
// The mean of a pair, x / 2 + y / 2 per element, as MPI's reduction: with two ranks every
// allreduce applies its operation once per element, to the two ranks' own values (MPI knows no
// identity of a user operation to start from), so this is the divide-then-sum of torch's
// average bit for bit (x * 0.5 is x / 2 exactly; a + b is b + a), without the pass that
// divides. Commutative.
template <Element T>
void pair_mean(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* __restrict a = static_cast<const T*>(in);  // MPI's two buffers never overlap
  T* __restrict b = static_cast<T*>(inout);
  const std::size_t n = static_cast<std::size_t>(*len);
  // Each half rounded on its own, then added: never fused into a multiply-add (FP_CONTRACT
  // off for compilers that contract within an expression; GCC's -std=c++20 never contracts).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
  for (std::size_t i = 0; i < n; ++i) {
    const T x = a[i] * T(0.5);
    const T y = b[i] * T(0.5);
    b[i] = x + y;
  }
}

template <Element T>
MPI_Op pair_mean_op() {
  static const MPI_Op op = [] {
    MPI_Op o = MPI_OP_NULL;
    check(MPI_Op_create(&pair_mean<T>, 1, &o), "MPI_Op_create(pair mean)");
    free_at_finalize(o, MPI_DATATYPE_NULL);
    return o;
  }();
  return op;
}
}  // namespace

template <Element T>
void allreduce_piece(Bucket<T>& b, std::size_t lo, std::size_t hi, const Route& route) {
  const std::size_t bytes = (hi - lo) * sizeof(T);
  // Two ranks, unweighted: MPI's reduction takes the mean (pair_mean); the packed arrays are
  // copied in unscaled.
  const bool pair = route.group == 2 && route.weight < 0;
  {
    TimelineScope t("scale+pack", route.level, route.step, bytes, route.group);
    if (pair) pack_range(b, lo, hi);
    else scale_pack(b, lo, hi, Scaler<T>(route.group, route.weight));
  }
  {
    count_use(Use::allreduce_piece);
    if (pair) count_use(Use::pair_mean);
    TimelineScope t("MPI_Allreduce", route.level, route.step, bytes, route.group);
    check(MPI_Allreduce(MPI_IN_PLACE, b.storage.data() + lo, static_cast<int>(hi - lo), mpi_type<T>(),
                        pair ? pair_mean_op<T>() : MPI_SUM, route.comm),
          "MPI_Allreduce(average)");
  }
  if (hi > b.owned) {
    TimelineScope t("unpack", route.level, route.step, bytes, route.group);
    unpack_range(b, lo, hi);
  }
}

template <Element T>
void start_allreduce(Bucket<T>& b, const Route& route, std::vector<MPI_Request>& reqs) {
  const Scaler<T> s(route.group, route.weight);
  b.send.resize(b.size());
  T* send = b.send.data();
  T* data = b.storage.data();
  scale_out(b, 0, b.size(), s, send);
  iallreduce_pieces(send, data, b.size(), sizeof(T), mpi_type<T>(), MPI_SUM, route.comm, Use::iallreduce,
                    "MPI_Iallreduce(average)", reqs);
}

void iallreduce_pieces(const void* send, void* recv, std::size_t n, std::size_t elem, MPI_Datatype type,
                       MPI_Op op, MPI_Comm comm, Use use, const char* what, std::vector<MPI_Request>& reqs) {
  const auto* s = static_cast<const char*>(send);
  auto* r = static_cast<char*>(recv);
  const std::size_t most = max_count();
  for (std::size_t lo = 0; lo < n; lo += most) {
    const int count = static_cast<int>(std::min(most, n - lo));
    MPI_Request q = MPI_REQUEST_NULL;
    count_use(use);
    check(MPI_Iallreduce(s + lo * elem, r + lo * elem, count, type, op, comm, &q), what);
    reqs.push_back(q);
  }
}

template void allreduce_piece(Bucket<float>&, std::size_t, std::size_t, const Route&);
template void allreduce_piece(Bucket<double>&, std::size_t, std::size_t, const Route&);
template void start_allreduce(Bucket<float>&, const Route&, std::vector<MPI_Request>&);
template void start_allreduce(Bucket<double>&, const Route&, std::vector<MPI_Request>&);

}  // namespace hma::detail
