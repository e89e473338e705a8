// hma-linkcheck: the link between two nodes as MPI sees it, measured before a cluster run is
// trusted. Run with exactly 2 ranks on different nodes (tools/cluster does this):
//   mpirun -np 2 --map-by node build/tools/hma-linkcheck [--expect-bits 1000000000]
// Prints one line: latency (half the round trip of 1 KiB), one-way bandwidth (4 MiB messages),
// and the rate per direction when one process sends and receives 4 MiB at the same time
// (MPI_Sendrecv). With --expect-bits, exit status 1 when the one-way rate is below half of it
// ("far below": the figures would measure the emulation, not the link), and a warning when it
// is more than 10 % away from it.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "link_measure.hpp"


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
  const hma_tools::LinkFigures link = hma_tools::measure_link(MPI_COMM_WORLD, 0, 1);
  int rc = 0;
  if (rank == 0) {
    const double l = link.latency_s * 1e6, bw = link.one_way_Bps, bw2 = link.two_way_Bps;
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
