/* Creates an averager over MPI_COMM_WORLD and prints the status and hma_last_error(); run by
 * check_mpi_mismatch.sh once with hma's own MPI and once with the other MPI's library preloaded
 * (a program or mpi4py of another MPI than hma's). */
#include <hma/hma.h>
#include <mpi.h>
#include <stdio.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  hma_averager avg = NULL;
  hma_status s = hma_averager_create_periodic(MPI_COMM_WORLD, 2, 0, NULL, &avg);
  printf("status %d\nmessage %s\n", (int)s, hma_last_error());
  if (s == HMA_OK) hma_averager_free(&avg);
  MPI_Finalize();
  return 0;
}
