/* For tests on machines with fewer cores than ranks, under MPICH only (test harness, never linked
 * into hma): LD_PRELOADed into each rank, it yields the processor whenever UCX's progress call
 * finds nothing to do. MPICH 4.0 (Debian's ch4:ucx) busy-polls without yielding, so with more
 * ranks than cores every collective waits for a scheduler tick: measured on 2 cores, 1000
 * MPI_Allreduce of one int took 4.9 ms each at 3 ranks, 8.4 us with this (MPICH's own
 * MPIR_CVAR_POLLS_BEFORE_YIELD=1 changed nothing). Open MPI yields on its own when
 * oversubscribed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sched.h>

typedef unsigned (*progress_fn)(void*);

unsigned ucp_worker_progress(void* worker) {
  static progress_fn real;
  if (real == 0) real = (progress_fn)dlsym(RTLD_NEXT, "ucp_worker_progress");
  const unsigned n = real(worker);
  if (n == 0) sched_yield();
  return n;
}
