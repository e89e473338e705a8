#include "transport/allreduce.hpp"

#include <algorithm>

#include "support/timeline.hpp"
#include "transport/elements.hpp"
#include "transport/uses.hpp"

namespace hma::detail {

template <Element T>
void allreduce_piece(Bucket<T>& b, std::size_t lo, std::size_t hi, const Route& route) {
  const Scaler<T> s(route.group, route.weight);
  const std::size_t bytes = (hi - lo) * sizeof(T);
  {
    TimelineScope t("scale+pack", route.level, route.step, bytes, route.group);
    scale_pack(b, lo, hi, s);
  }
  {
    count_use(Use::allreduce_piece);
    TimelineScope t("MPI_Allreduce", route.level, route.step, bytes, route.group);
    check(MPI_Allreduce(MPI_IN_PLACE, b.storage.data() + lo, static_cast<int>(hi - lo),
                        mpi_type<T>(), MPI_SUM, route.comm),
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
