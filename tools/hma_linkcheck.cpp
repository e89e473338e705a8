// hma-linkcheck: the link between two nodes as MPI sees it, measured before a cluster run is
// trusted. Run with exactly 2 ranks on different nodes (tools/cluster does this):
//   mpirun -np 2 --map-by node build/tools/hma-linkcheck [--expect-bits 1000000000]
// Prints one line: latency (half the round trip of 1 KiB), one-way bandwidth (4 MiB messages),
// and the rate per direction when one process sends and receives 4 MiB at the same time
// (MPI_Sendrecv). With --expect-bits, exit status 1 when the one-way rate is below half of it
// ("far below": the figures would measure the emulation, not the link), and a warning when it
// is more than 10 % away from it.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  double expect = 0;  // bits per second, 0: no expectation
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--expect-bits") == 0 && i + 1 < argc) {
      char* end = nullptr;
      expect = std::strtod(argv[++i], &end);
      if (end == argv[i] || *end != 0 || !(expect > 0)) {
        if (rank == 0) std::fprintf(stderr, "hma-linkcheck: --expect-bits needs a positive number, got %s\n", argv[i]);
        MPI_Finalize();
        return 2;
      }
    } else {
      if (rank == 0) std::fprintf(stderr, "hma-linkcheck: unknown argument %s (usage: [--expect-bits B])\n", argv[i]);
      MPI_Finalize();
      return 2;
    }
  }
  if (size != 2) {
    if (rank == 0) std::fprintf(stderr, "hma-linkcheck: needs exactly 2 ranks (one per node), got %d\n", size);
    MPI_Finalize();
    return 2;
  }
  char name[MPI_MAX_PROCESSOR_NAME] = {}, other[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  MPI_Get_processor_name(name, &len);
  MPI_Sendrecv(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 1 - rank, 0, other, MPI_MAX_PROCESSOR_NAME,
               MPI_CHAR, 1 - rank, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
  const int peer = 1 - rank;
  constexpr std::size_t kSmall = 1024, kBig = std::size_t{4} << 20;
  std::vector<char> a(kBig, 1), b(kBig, 2);
  // Latency: ping-pong of 1 KiB, half the round trip.
  std::vector<double> lat;
  for (int i = 0; i < 60; ++i) {
    const double t0 = MPI_Wtime();
    if (rank == 0) {
      MPI_Send(a.data(), kSmall, MPI_CHAR, peer, 1, MPI_COMM_WORLD);
      MPI_Recv(b.data(), kSmall, MPI_CHAR, peer, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else {
      MPI_Recv(b.data(), kSmall, MPI_CHAR, peer, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      MPI_Send(a.data(), kSmall, MPI_CHAR, peer, 1, MPI_COMM_WORLD);
    }
    if (i >= 10) lat.push_back((MPI_Wtime() - t0) / 2);
  }
  // One way: rank 0 sends 4 MiB, rank 1 answers with 1 byte once it has it.
  std::vector<double> one, both;
  for (int i = 0; i < 7; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    if (rank == 0) {
      MPI_Send(a.data(), kBig, MPI_CHAR, peer, 2, MPI_COMM_WORLD);
      MPI_Recv(b.data(), 1, MPI_CHAR, peer, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else {
      MPI_Recv(b.data(), kBig, MPI_CHAR, peer, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      MPI_Send(a.data(), 1, MPI_CHAR, peer, 3, MPI_COMM_WORLD);
    }
    if (i >= 2) one.push_back(MPI_Wtime() - t0);
  }
  // Both ways at once from one process.
  for (int i = 0; i < 7; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    MPI_Sendrecv(a.data(), kBig, MPI_CHAR, peer, 4, b.data(), kBig, MPI_CHAR, peer, 4, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
    double t = MPI_Wtime() - t0, tmax = 0;
    MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (i >= 2) both.push_back(tmax);
  }
  int rc = 0;
  if (rank == 0) {
    const double l = median(lat) * 1e6, bw = kBig / median(one), bw2 = kBig / median(both);
    std::string verdict;
    if (expect > 0) {
      const double ratio = bw * 8 / expect;
      char buf[160];
      std::snprintf(buf, sizeof buf, ", %.0f %% of the %.3g Gbit/s configured", ratio * 100, expect / 1e9);
      verdict = buf;
      if (ratio < 0.5) {
        verdict += ": FAR BELOW the configured rate; figures from this run would measure the emulation";
        rc = 1;
      } else if (ratio < 0.9 || ratio > 1.1) {
        verdict += ": WARNING, more than 10 % away from the configured rate";
      }
    }
    std::printf("link check %s <-> %s: latency %.1f us (1 KiB, half round trip), one way %.1f MB/s%s; "
                "send+receive at once in one process %.1f MB/s per direction\n",
                name, other, l, bw / 1e6, verdict.c_str(), bw2 / 1e6);
    std::fflush(stdout);
  }
  MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}
