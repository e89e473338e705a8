/* heat (C): an ensemble of perturbed 1-D heat-diffusion runs, one member per MPI rank,
 * averaged with hma on torch's hierarchical schedule "2:node,6:world" (the ranks of a node
 * every 2 steps, all ranks every 6). Each rank then checks its result against a serial
 * reference that simulates the whole ensemble itself. The C++ and Fortran examples compute the
 * same. Run: HMA_RANKS_PER_NODE=2 mpirun -np 4 build/examples/heat_c */
#include <hma/hma.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#define N 64 /* grid points, boundaries fixed at 0 */
#define STEPS 12

/* Every hma call returns a status; a failure is reported on every rank, so abort. */
static void check(hma_status status, const char* what) {
  if (status != HMA_OK) {
    fprintf(stderr, "heat (C): %s failed (status %d): %s\n", what, (int)status, hma_last_error());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
}

/* Member r starts from sin(pi x) scaled by 1 + 0.1 r. */
static void initial(double* u, int r) {
  for (int i = 0; i < N; ++i) u[i] = sin(acos(-1.0) * i / (N - 1)) * (1 + 0.1 * r);
}

/* One explicit step, u_i += 0.25 (u_{i-1} - 2 u_i + u_{i+1}), from the old values. */
static void diffuse(double* u) {
  double old[N];
  for (int i = 0; i < N; ++i) old[i] = u[i];
  for (int i = 1; i < N - 1; ++i) u[i] = old[i] + 0.25 * (old[i - 1] - 2 * old[i] + old[i + 1]);
}

/* hma's "node": HMA_RANKS_PER_NODE (the tests set 2), else the ranks sharing memory. */
static int node_size(void) {
  const char* env = getenv("HMA_RANKS_PER_NODE");
  if (env != NULL && atoi(env) > 0) return atoi(env);
  MPI_Comm shared;
  int n = 0;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &shared);
  MPI_Comm_size(shared, &n);
  MPI_Comm_free(&shared);
  return n;
}

/* All np members serially into u[np][N], averaged torch's way: after the update of step t
 * (from 0), the level with the largest period dividing t averages, in contiguous blocks of its
 * group size g, as the sum of u / g in rank order. */
static void reference(double (*u)[N], int np, int node) {
  for (int r = 0; r < np; ++r) initial(u[r], r);
  for (int t = 0; t < STEPS; ++t) {
    for (int r = 0; r < np; ++r) diffuse(u[r]);
    const int g = t % 6 == 0 ? np : t % 2 == 0 ? node : 0;
    for (int first = 0; g > 0 && first < np; first += g) {
      for (int i = 0; i < N; ++i) {
        double sum = 0;
        for (int r = first; r < first + g; ++r) sum += u[r][i] / g;
        for (int r = first; r < first + g; ++r) u[r][i] = sum;
      }
    }
  }
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, np = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &np);

  double u[N];
  initial(u, rank);
  hma_paramset params;
  hma_averager avg;
  check(hma_paramset_create(&params), "hma_paramset_create");
  check(hma_paramset_add_double(params, u, N), "hma_paramset_add_double"); /* u stays ours */
  check(hma_averager_create(MPI_COMM_WORLD, "2:node,6:world", 0, NULL, &avg),
        "hma_averager_create");
  for (int t = 0; t < STEPS; ++t) {
    diffuse(u);
    check(hma_step(avg, params, NULL), "hma_step"); /* collective: averages when scheduled */
  }
  check(hma_averager_free(&avg), "hma_averager_free");
  check(hma_paramset_free(&params), "hma_paramset_free");

  double(*ref)[N] = malloc(sizeof(double[N]) * (size_t)np);
  reference(ref, np, node_size());
  double err = 0, max_err = 0;
  for (int i = 0; i < N; ++i) err = fmax(err, fabs(u[i] - ref[rank][i]));
  free(ref);
  MPI_Allreduce(&err, &max_err, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  /* hma divides first as the reference does, so the terms are equal; MPI may sum them in another
   * order, which moves the last bits: 1e-12 is a generous bound for values of order 1. */
  const int ok = max_err <= 1e-12;
  if (rank == 0)
    printf("heat (C): %d ranks, %d steps, max |u - reference| = %.1e: %s\n", np, STEPS, max_err,
           ok ? "ok" : "FAILED");
  MPI_Finalize();
  return ok ? 0 : 1;
}
