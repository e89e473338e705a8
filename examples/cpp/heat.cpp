// heat (C++): an ensemble of perturbed 1-D heat-diffusion runs, one member per MPI rank,
// averaged with hma on torch's hierarchical schedule "2:node,6:world" (the ranks of a node
// every 2 steps, all ranks every 6). Each rank then checks its result against a serial
// reference that simulates the whole ensemble itself. The C and Fortran examples compute the
// same. Run: HMA_RANKS_PER_NODE=2 mpirun -np 4 build/examples/heat_cpp
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <hma/hma.hpp>
#include <numbers>
#include <vector>

namespace {

constexpr int N = 64;  // grid points, boundaries fixed at 0
constexpr int Steps = 12;

// Member r starts from sin(pi x) scaled by 1 + 0.1 r.
std::vector<double> initial(int r) {
  std::vector<double> u(N);
  for (int i = 0; i < N; ++i) u[i] = std::sin(std::numbers::pi * i / (N - 1)) * (1 + 0.1 * r);
  return u;
}

// One explicit step, u_i += 0.25 (u_{i-1} - 2 u_i + u_{i+1}), from the old values.
void diffuse(std::vector<double>& u) {
  const std::vector<double> old = u;
  for (int i = 1; i < N - 1; ++i) u[i] = old[i] + 0.25 * (old[i - 1] - 2 * old[i] + old[i + 1]);
}

// All np members serially, averaged torch's way: after the update of step t (from 0), the
// level with the largest period dividing t averages, in contiguous blocks of its group size g,
// as the sum of u / g in rank order.
std::vector<std::vector<double>> reference(int np, int node) {
  std::vector<std::vector<double>> u(np);
  for (int r = 0; r < np; ++r) u[r] = initial(r);
  for (int t = 0; t < Steps; ++t) {
    for (auto& member : u) diffuse(member);
    const int g = t % 6 == 0 ? np : t % 2 == 0 ? node : 0;
    for (int first = 0; g > 0 && first < np; first += g) {
      for (int i = 0; i < N; ++i) {
        double sum = 0;
        for (int r = first; r < first + g; ++r) sum += u[r][i] / g;
        for (int r = first; r < first + g; ++r) u[r][i] = sum;
      }
    }
  }
  return u;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, np = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &np);
  double err = 0;
  try {
    std::vector<double> u = initial(rank);
    hma::ParamSet params;
    // A pointer and a length (params.add(u) takes the vector itself): u stays ours; each average
    // packs it and writes the result back.
    params.add(u.data(), u.size());
    hma::HierarchicalAverager avg(MPI_COMM_WORLD, "2:node,6:world", /*warmup=*/0);
    for (int t = 0; t < Steps; ++t) {
      diffuse(u);
      avg.step(params);  // collective: averages when the schedule says so
    }
    // "node" is HMA_RANKS_PER_NODE (the tests set 2), else the ranks sharing memory.
    const int node = avg.schedule().levels()[0].group_size;
    const std::vector<double> ref = reference(np, node)[rank];
    for (int i = 0; i < N; ++i) err = std::max(err, std::fabs(u[i] - ref[i]));
  } catch (const std::exception& e) {  // hma throws the same error on every rank
    std::fprintf(stderr, "heat (C++): rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  double max_err = 0;
  MPI_Allreduce(&err, &max_err, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  // hma divides first as the reference does, so the terms are equal; MPI may sum them in another
  // order, which moves the last bits: 1e-12 is a generous bound for values of order 1.
  const bool ok = max_err <= 1e-12;
  if (rank == 0)
    std::printf("heat (C++): %d ranks, %d steps, max |u - reference| = %.1e: %s\n", np, Steps,
                max_err, ok ? "ok" : "FAILED");
  MPI_Finalize();
  return ok ? 0 : 1;
}
