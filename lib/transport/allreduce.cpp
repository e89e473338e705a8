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
  const std::size_t most = max_count();
  for (std::size_t lo = 0; lo < b.size(); lo += most) {
    const int n = static_cast<int>(std::min(most, b.size() - lo));
    MPI_Request r = MPI_REQUEST_NULL;
    count_use(Use::iallreduce);
    check(MPI_Iallreduce(send + lo, data + lo, n, mpi_type<T>(), MPI_SUM, route.comm, &r),
          "MPI_Iallreduce(average)");
    reqs.push_back(r);
  }
}

template void allreduce_piece(Bucket<float>&, std::size_t, std::size_t, const Route&);
template void allreduce_piece(Bucket<double>&, std::size_t, std::size_t, const Route&);
template void start_allreduce(Bucket<float>&, const Route&, std::vector<MPI_Request>&);
template void start_allreduce(Bucket<double>&, const Route&, std::vector<MPI_Request>&);

}  // namespace hma::detail
