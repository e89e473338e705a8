// The one Catch2 main of hma's MPI tests: MPI_Init_thread, run, MPI_Finalize. Rank 0 reports to
// the console; the other ranks write a compact report that is printed only if that rank failed.
// MPI is initialised with MPI_THREAD_MULTIPLE (for HMA_PROGRESS=thread) unless
// HMA_TEST_THREAD_LEVEL=single asks for plain MPI_Init.
#define CATCH_CONFIG_RUNNER
#include <mpi.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <unistd.h>

#ifdef HMA_TEST_NEEDS_GPU
#include "hma/device.hpp"
#include "hma/local_device.hpp"
#endif

int main(int argc, char** argv) {
  const char* level = std::getenv("HMA_TEST_THREAD_LEVEL");
  if (level != nullptr && std::string(level) == "single") {
    MPI_Init(&argc, &argv);
  } else {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
#ifdef HMA_TEST_NEEDS_GPU
  // A GPU test binary: without a usable device on every rank, say why and report SKIP (77),
  // never a pass.
  {
    const hma::DeviceInfo info = hma::device_info();
    int ok = info.available() ? 1 : 0, all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all) {
      if (rank == 0 || !ok)
        std::printf("SKIP (rank %d): the GPU tests need a CUDA device: %s\n", rank,
                    ok ? "another rank has none" : info.reason.c_str());
      std::fflush(stdout);
      MPI_Finalize();
      return 77;
    }
    // One GPU per rank on multi-GPU nodes: node-local rank modulo the devices it sees.
    (void)hma::use_local_device(MPI_COMM_WORLD);
  }
#endif
  std::vector<std::string> args(argv, argv + argc);
  std::string report;
  if (rank != 0) {
    report = "/tmp/hma-test-" + std::to_string(getpid()) + ".txt";
    args.insert(args.end(), {"--reporter", "compact", "--out", report});
  }
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  const int failed = Catch::Session().run(static_cast<int>(cargs.size()), cargs.data());
  if (rank != 0) {
    if (failed) {
      std::ifstream in(report);
      std::cerr << "---- rank " << rank << " report ----\n" << in.rdbuf() << std::flush;
    }
    std::remove(report.c_str());
  }
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any ? 1 : 0;
}
