// The link between two ranks as MPI sees it, for hma-linkcheck and hma-model calibrate: one
// measurement, so the link check and the cost model's calibration report the same figures.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace hma_tools {

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Median over `reps` (after 2 untimed) of the slowest rank's time of fn(), each after a barrier.
/// Collective over `comm`.
template <class F>
double timed(MPI_Comm comm, int reps, F fn) {
  std::vector<double> t;
  for (int i = 0; i < reps + 2; ++i) {
    MPI_Barrier(comm);
    const double t0 = MPI_Wtime();
    fn();
    double d = MPI_Wtime() - t0, mx = 0;
    MPI_Allreduce(&d, &mx, 1, MPI_DOUBLE, MPI_MAX, comm);
    if (i >= 2) t.push_back(mx);
  }
  return median(t);
}

struct LinkFigures {
  double latency_s = 0;    // half the round trip of 1 KiB
  double one_way_Bps = 0;  // 4 MiB sent one way (the receiver answers with 1 byte)
  double two_way_Bps = 0;  // 4 MiB each way at once from one process (MPI_Sendrecv), per direction
};

/// Collective over `comm`: ranks `a` and `b` measure the link between them, the others only
/// join the timing collectives. Every rank gets the figures.
inline LinkFigures measure_link(MPI_Comm comm, int a, int b) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  const bool pair = rank == a || rank == b;
  const int peer = rank == a ? b : a;
  constexpr std::size_t kSmall = 1024, kBig = std::size_t{4} << 20;
  std::vector<char> x(kBig, 1), y(kBig, 2);
  auto send = [&](std::size_t n, int tag) { MPI_Send(x.data(), static_cast<int>(n), MPI_CHAR, peer, tag, comm); };
  auto recv = [&](std::size_t n, int tag) {
    MPI_Recv(y.data(), static_cast<int>(n), MPI_CHAR, peer, tag, comm, MPI_STATUS_IGNORE);
  };
  LinkFigures f;
  f.latency_s = timed(comm, 30, [&] {
    if (rank == a) send(kSmall, 1), recv(kSmall, 1);
    else if (rank == b) recv(kSmall, 1), send(kSmall, 1);
  }) / 2;
  f.one_way_Bps = kBig / timed(comm, 5, [&] {
    if (rank == a) send(kBig, 2), recv(1, 3);
    else if (rank == b) recv(kBig, 2), send(1, 3);
  });
  f.two_way_Bps = kBig / timed(comm, 5, [&] {
    if (pair)
      MPI_Sendrecv(x.data(), static_cast<int>(kBig), MPI_CHAR, peer, 4, y.data(), static_cast<int>(kBig), MPI_CHAR,
                   peer, 4, comm, MPI_STATUS_IGNORE);
  });
  return f;
}

}  // namespace hma_tools
