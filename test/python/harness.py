"""What every test of the Python package shares: the world, the failures so far, check(), and
finish(), which ends the test on every rank with the group's verdict."""
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"rank {rank}: FAIL {what}", flush=True)


def finish(name):
    n = comm.allreduce(len(failures))
    if rank == 0:
        print(f"{name} at {size} ranks: {'ok' if n == 0 else f'{n} failures'}", flush=True)
    sys.exit(1 if n else 0)
