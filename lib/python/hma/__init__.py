"""hma: hierarchical model averaging over MPI, from Python.

    from mpi4py import MPI
    import numpy as np, hma

    x = np.ones(1000, dtype=np.float32)        # your array: averaged in place
    params = hma.ParamSet()
    params.add(x)
    avg = hma.HierarchicalAverager(MPI.COMM_WORLD, {2: "node", 8: "world"})
    for step in range(16):
        ...                                     # advance x
        avg.step(params)                        # collective; averages when the schedule says so

Communicators are mpi4py's (importing this package imports mpi4py.MPI, which initialises MPI
as mpi4py always does; hma never initialises MPI itself). Arrays are any writable buffer
(numpy, torch CPU tensors through .numpy()): dense ones averaged where they are, strided ones
through a staging copy. CUDA arrays (anything with __cuda_array_interface__ version 2 or 3:
CuPy, Numba, torch CUDA tensors) go in a DeviceParamSet, float32/float64, dense, averaged in place
on the caller's stream (avg.step(params, stream=None): the stream the arrays' interface named,
else torch's current stream for torch tensors, else the default stream; call
params.synchronize() before host code reads them). hma.torch has drop-in replacements for
torch's model averagers.
Options are keywords (timeout_s, chunk_bytes, check, divergence, ranks_per_node, progress,
reduction, algorithm, nonfinite, wire, outer), as AveragerOptions in C++.
"""
from mpi4py import MPI

from ._hma import (  # noqa: F401
    Averager,
    DeviceParamSet,
    Error,
    InvalidArgument,
    MismatchError,
    NonFiniteError,
    ParamSet,
    Request,
    Timeout,
    mpi_built,
    mpi_library,
    version,
)
from . import _hma

__version__ = version()


def mpi_family(text):
    """The MPI family a version text names: 'Open MPI', 'MPICH' (and its ABI: MVAPICH, Intel
    MPI) or None."""
    if "Open MPI" in text:
        return "Open MPI"
    if any(m in text for m in ("MPICH", "MVAPICH", "Intel(R) MPI")):
        return "MPICH"
    return None


def check_mpi(library=None):
    """Raises hma.Error naming both libraries when mpi4py's MPI (MPI.Get_library_version(), or
    `library`) is of another family than the MPI hma was built with: their communicators cannot
    be exchanged."""
    theirs = (library if library is not None else MPI.Get_library_version()).strip().splitlines()[0]
    built = mpi_built()
    if mpi_family(theirs) and mpi_family(built) and mpi_family(theirs) != mpi_family(built):
        raise Error(
            f"hma: hma was built with {built}, but mpi4py uses {theirs.rstrip(', ')}: build hma "
            f"with mpi4py's MPI (meson -Dmpi=openmpi or -Dmpi=mpich), or use an mpi4py built "
            f"against hma's MPI")


def _handle(comm):
    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(
            f"hma: the communicator must be an mpi4py MPI.Comm (or None for MPI.COMM_WORLD), got "
            f"{type(comm).__name__}")
    check_mpi()
    return comm.py2f()


def PeriodicAverager(comm=None, period=1, warmup=0, **options):
    """torch's PeriodicModelAverager over `comm` (None: MPI.COMM_WORLD): averages at step s when
    s >= warmup and (s - warmup) % period == 0. Collective over comm."""
    return _hma.periodic(_handle(comm), period, warmup, **options)


def HierarchicalAverager(comm, levels, warmup=0, **options):
    """torch's HierarchicalModelAverager over `comm` (None: MPI.COMM_WORLD). `levels`: torch's
    {period: group_size} dict (in order; group sizes may be 'node' or 'world'), a list of
    (period, group_size), or hma's text "2:node,8:world". Collective over comm."""
    if isinstance(levels, dict):
        levels = list(levels.items())
    if not isinstance(levels, str) and any(isinstance(g, str) for _, g in levels):
        levels = ",".join(f"{p}:{g}" for p, g in levels)
    return _hma.hierarchical(_handle(comm), levels, warmup, **options)
