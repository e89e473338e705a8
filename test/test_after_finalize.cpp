// Every use of hma after MPI_Finalize is a clear hma::Error or a silent no-op, never an MPI
// abort: step/start/average/restore throw, a Request started before MPI_Finalize throws from
// wait()/test(), and every destructor (request, averager, host and device sets) is silent.
// Not a Catch2 test: Catch2's main finalises MPI itself. Exit 0 when all hold.
#include <mpi.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>

#include "device/device_backend.hpp"
#include "hma/hma.hpp"

namespace {
int failures = 0;
void expect_error(const char* what, const std::function<void()>& fn, const std::string& needle) {
  std::string got = "no exception";
  bool ok = false;
  try {
    fn();
  } catch (const hma::Error& e) {
    got = e.what();
    ok = got.find(needle) != std::string::npos;
  } catch (const std::exception& e) {
    got = std::string("wrong type: ") + e.what();
  }
  std::printf("%s %s: %s\n", ok ? "ok  " : "FAIL", what, got.c_str());
  if (!ok) ++failures;
}
}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  // argv[1] == "thread": the progress thread (its job completed before MPI_Finalize: a worker
  // must not be inside MPI then), else poll with a Request still in flight at MPI_Finalize.
  const bool thread = argc > 1 && std::string(argv[1]) == "thread";
  if (thread && provided < MPI_THREAD_MULTIPLE) {
    std::printf("SKIP: MPI_THREAD_MULTIPLE not provided\n");
    MPI_Finalize();
    return 77;
  }
  hma::AveragerOptions o;
  o.progress = thread ? hma::Progress::thread : hma::Progress::poll;
  auto avg = std::make_unique<hma::PeriodicAverager>(MPI_COMM_WORLD, 1, 0, o);
  auto ps = std::make_unique<hma::ParamSet>();
  auto w = ps->allocate<float>(8, static_cast<float>(2 * rank));
  hma::detail::set_device_backend_for_testing(hma::detail::host_emulation_backend());
  auto dps = std::make_unique<hma::DeviceParamSet>();
  hma::detail::set_device_backend_for_testing(nullptr);
  (void)dps->allocate<double>(4, 1.0);
  avg->step(*ps);  // all well before MPI_Finalize
  if (w[0] != static_cast<float>(size - 1)) {
    std::printf("FAIL the average before MPI_Finalize: %g\n", static_cast<double>(w[0]));
    ++failures;
  }
  auto other = std::make_unique<hma::ParamSet>();
  (void)other->allocate<double>(4, 1.0);
  auto req = std::make_unique<hma::Request>(avg->start(*other));
  if (thread)
    while (!req->test()) {
    }
  // start() may complete the average at once (its peer had already posted: MPICH, often): then
  // nothing is in flight here and wait() after MPI_Finalize is the no-op below.
  const bool in_flight = other->in_flight();
  MPI_Barrier(MPI_COMM_WORLD);
  MPI_Finalize();
  std::printf("-- after MPI_Finalize, %s progress (rank %d)\n", thread ? "thread" : "poll", rank);
  const std::string fin = "finalised";
  expect_error("step()", [&] { avg->step(*ps); }, fin);
  expect_error("start()", [&] { (void)avg->start(*ps); }, fin);
  expect_error("average()", [&] { avg->average(*ps, 0); }, fin);
  expect_error("step(DeviceParamSet)", [&] { avg->step(*dps); }, fin);
  expect_error("restore()", [&] { avg->restore(avg->checkpoint()); }, fin);
  if (!thread && size > 1 && in_flight) {
    expect_error("a Request started before MPI_Finalize: wait()", [&] { req->wait(); },
                 "after MPI_Finalize");
    expect_error("ParamSet::wait()", [&] { other->wait(); }, "after MPI_Finalize");
  } else {
    // Nothing was in flight (a group of one completes at once; the thread's job was waited;
    // start() completed it): wait() is a silent no-op.
    req->wait();
    other->wait();
    std::printf("ok   wait() on a completed average after MPI_Finalize: a no-op\n");
  }
  // Destructors: silent, no MPI call.
  req.reset();
  other.reset();
  ps.reset();
  dps.reset();
  avg.reset();
  std::printf("ok   destructors after MPI_Finalize returned (rank %d)\n", rank);
  return failures == 0 ? 0 : 1;
}
