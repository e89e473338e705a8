// Helpers for Catch2 tests that run under mpirun. Every check here is collective: it passes or
// fails on all ranks together, so one rank's failure never leaves the others hanging in a
// collective.
#pragma once

#include <mpi.h>

#include <catch2/catch.hpp>
#include <sstream>
#include <string>

#include "hma/error.hpp"

namespace hma_test {

inline int rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int size() {
  int s = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

/// True when MPI was initialised with MPI_THREAD_MULTIPLE (needed by Progress::thread).
inline bool thread_multiple() {
  int provided = 0;
  MPI_Query_thread(&provided);
  return provided >= MPI_THREAD_MULTIPLE;
}

/// Collective: the lowest rank where `ok` is false, or -1 if it is true everywhere.
inline int first_failing_rank(bool ok) {
  int mine = ok ? size() : rank(), first = 0;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return first == size() ? -1 : first;
}

/// Waits for the in-flight average of `set` (a ParamSet or DeviceParamSet) past any number of
/// hma::Timeout; returns how many it saw.
template <class Set>
int wait_through_timeouts(Set& set) {
  int timeouts = 0;
  while (set.in_flight()) {
    try {
      set.wait();
    } catch (const hma::Timeout&) {
      ++timeouts;
    }
  }
  return timeouts;
}

}  // namespace hma_test

/// REQUIRE that `cond` holds on every rank; fails on all ranks, naming the first failing one.
#define REQUIRE_ALL_RANKS(cond)                                                     \
  do {                                                                              \
    const bool hma_cond_ = static_cast<bool>(cond);                                 \
    const int hma_bad_ = hma_test::first_failing_rank(hma_cond_);                   \
    INFO("condition: " #cond "; holds on this rank (" << hma_test::rank()           \
                                                       << "): " << hma_cond_          \
                                                       << "; first failing rank: " \
                                                       << hma_bad_);                \
    REQUIRE(hma_bad_ == -1);                                                        \
  } while (0)

/// REQUIRE that `expr` throws exception type E on every rank, with `needle` in its message.
#define REQUIRE_THROWS_ALL_RANKS(E, expr, needle)                            \
  do {                                                                       \
    std::string hma_msg_ = "did not throw";                                  \
    bool hma_thrown_ok_ = false;                                               \
    try {                                                                    \
      (void)(expr);                                                          \
    } catch (const E& hma_e_) {                                              \
      hma_msg_ = hma_e_.what();                                              \
      hma_thrown_ok_ = hma_msg_.find(needle) != std::string::npos;                  \
    } catch (const std::exception& hma_e_) {                                 \
      hma_msg_ = std::string("wrong exception type: ") + hma_e_.what();      \
    }                                                                        \
    INFO("expected " #E " containing \"" << needle << "\"; got: " << hma_msg_); \
    REQUIRE_ALL_RANKS(hma_thrown_ok_);                                              \
  } while (0)
