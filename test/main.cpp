// The one Catch2 main of hma's MPI tests: MPI_Init_thread, run, MPI_Finalize. Rank 0 reports to
// the console; the other ranks write a compact report that is printed only if that rank failed.
// MPI is initialised with MPI_THREAD_MULTIPLE (for HMA_PROGRESS=thread) unless
// HMA_TEST_THREAD_LEVEL=single asks for plain MPI_Init.
// A failure that the ranks did not agree on (a plain REQUIRE or an exception on some ranks, not
// REQUIRE_ALL_RANKS) would leave the other ranks waiting in their next collective: such a
// failure is printed at once, naming the rank, and the job is ended with MPI_Abort.
#define CATCH_CONFIG_RUNNER
#include <mpi.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

// Ends the job at the first failure only this rank may have seen. REQUIRE_ALL_RANKS fails on
// every rank together (its final check is `hma_bad_ == -1`): those failures run on normally.
struct AbortOnLoneFailure : Catch::TestEventListenerBase {
  using TestEventListenerBase::TestEventListenerBase;
  std::string test_case;
  void testCaseStarting(Catch::TestCaseInfo const& info) override { test_case = info.name; }
  bool assertionEnded(Catch::AssertionStats const& s) override {
    const Catch::AssertionResult& r = s.assertionResult;
    if (r.isOk() || r.getExpression() == "hma_bad_ == -1") return true;
    // A signal (mpirun's SIGTERM after another rank aborted): this process is ending anyway.
    if (r.getResultType() == Catch::ResultWas::FatalErrorCondition) return true;
    int rank = 0, size = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    std::ostringstream out;
    out << "\n==== rank " << rank << " of " << size << ": a failure the other ranks did not agree on; "
        << "ending the job (MPI_Abort) instead of leaving them waiting ====\n"
        << "test case: " << test_case << "\n"
        << r.getSourceInfo().file << ":" << r.getSourceInfo().line << ": ";
    if (r.hasExpression())
      out << r.getExpressionInMacro() << " with expansion " << r.getExpandedExpression();
    if (r.hasMessage()) out << " " << r.getMessage();
    out << "\n";
    for (const auto& m : s.infoMessages) out << "  with: " << m.message << "\n";
    std::cerr << out.str() << std::flush;
    MPI_Abort(MPI_COMM_WORLD, 3);
    return true;
  }
};
CATCH_REGISTER_LISTENER(AbortOnLoneFailure)

}  // namespace

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
