// view (Kokkos): hma averages Kokkos host Views as they are, with ParamSet::add(v.data(),
// v.size()): a 2-D state View and a 1-D weight View, one member per MPI rank, averaged over all
// ranks on torch's hierarchical schedule "2:node,4:world"; each rank checks every element
// against the mean it computes itself. Debian 12's Kokkos (Trilinos 13.2, Serial only) is used
// without its CMake package (which points at /usr/lib/include): headers from
// /usr/include/trilinos, -ltrilinos_kokkoscore (examples/meson.build).
// Run: HMA_RANKS_PER_NODE=2 mpirun -np 4 build/examples/view_kokkos
#include <mpi.h>

#include <Kokkos_Core.hpp>
#include <cstdio>
#include <hma/hma.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Kokkos::initialize(argc, argv);
  int rank = 0, np = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &np);
  long wrong = 0;
  try {
    // LayoutRight host Views are contiguous (span_is_contiguous()): hma reads and writes them
    // in place. A strided View (LayoutStride, a subview of columns) is not: copy it first.
    Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace> state("state", 8, 5);
    Kokkos::View<float*, Kokkos::HostSpace> w("w", 10);
    // Integers: every mean is exact. Element k of the state on rank r: np * (r + k % 16).
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 5; ++j) state(i, j) = np * (rank + (i * 5 + j) % 16);
    for (int k = 0; k < 10; ++k) w(k) = static_cast<float>(np * (rank + k));
    hma::ParamSet params;
    if (!state.span_is_contiguous() || !w.span_is_contiguous()) throw std::logic_error("not contiguous");
    params.add(state.data(), state.size());
    params.add(w.data(), w.size());
    hma::HierarchicalAverager avg(MPI_COMM_WORLD, "2:node,4:world", /*warmup=*/0);
    for (int t = 0; t < 4; ++t) avg.step(params);  // step 0 averages over the world (period 4)
    // After the world average at step 0 every rank holds the world mean; node averages at
    // steps 2 keep it (all ranks equal). Mean of np * (r + c) over r: np * c + np * (np - 1) / 2.
    const double base = np * (np - 1) / 2.0;
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 5; ++j) wrong += state(i, j) != np * ((i * 5 + j) % 16) + base;
    for (int k = 0; k < 10; ++k) wrong += w(k) != static_cast<float>(np * k + base);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  long all = 0;
  MPI_Allreduce(&wrong, &all, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) std::printf("view_kokkos (np %d): %s\n", np, all == 0 ? "ok" : "WRONG");
  Kokkos::finalize();
  MPI_Finalize();
  return all == 0 ? 0 : 1;
}
