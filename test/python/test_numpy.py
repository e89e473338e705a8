"""hma's Python package with numpy and mpi4py, at any rank count (run with `python3 -m mpi4py`, so
an exception on one rank aborts the job). Values against an independent reference: each rank's
inputs are known to every rank (a function of rank and step, or allgathered), torch's terms
x / g are formed in numpy and added in rank order, or with MPI_Allreduce through mpi4py for
torch's recipe. The expected schedule is torch's rule written out here, not hma's."""

import numpy as np
from mpi4py import MPI

import hma

from harness import check, comm, finish, rank, size  # noqa: E402


def torch_periodic(s, period, warmup):  # torch's PeriodicModelAverager
    return s >= warmup and (s - warmup) % period == 0


def torch_hierarchical(s, levels, warmup):  # HierarchicalModelAverager: the group size or None
    if s < warmup:
        return None
    for period, g in reversed(levels):
        if s % period == 0:
            return g
    return None


def values(step, r, n, scale=12):
    """Order-proof values: multiples of 12 (x / g exact for g in 1..4, sums exact)."""
    i = np.arange(n)
    return (scale * ((i * 7 + r * 5 + step * 3) % 11 - 5)).astype(np.float64)


def expect_mean(step, g, n, scale=12):
    first = rank // g * g
    return sum(values(step, r, n, scale) / g for r in range(first, first + g))


# ---- 1. order-proof values, every kind of array, torch's periodic schedule
a32 = np.zeros(1000, dtype=np.float32)                      # dense
a64 = np.zeros((7, 9), dtype=np.float64, order="F")         # dense, Fortran order
base = np.full(3 * 50, -1.0, dtype=np.float32)
strided = base[::3]                                          # packed through a staging copy
a16 = np.zeros(64, dtype=np.float16)                         # fp16 (small multiples of 12: exact)
ps = hma.ParamSet()
for x in (a32, a64, strided, a16):
    ps.add(x)
check(ps.arrays == 4 and ps.strided == 1, f"arrays {ps.arrays}, strided {ps.strided}")
check(ps.bytes == 1000 * 4 + 63 * 8 + 50 * 4 + 64 * 2, f"bytes {ps.bytes}")
period, warmup = 2, 1
avg = hma.PeriodicAverager(comm, period, warmup)
for s in range(6):
    a32[:] = values(s, rank, 1000)
    a64.T.reshape(-1)[:] = values(s, rank, 63)
    strided[:] = values(s, rank, 50)
    a16[:] = values(s, rank, 64, scale=12) / 12 * 3   # multiples of 12 / 4 = 3 (fp16-exact)
    averaged = avg.step(ps)
    due = torch_periodic(s, period, warmup)
    check(averaged == due, f"periodic step {s}: averaged {averaged}, torch's rule {due}")
    g = size if due else 1
    check(np.array_equal(a32, expect_mean(s, g, 1000) if due else values(s, rank, 1000)), f"a32 step {s}")
    check(np.array_equal(a64.T.reshape(-1), expect_mean(s, g, 63) if due else values(s, rank, 63)),
          f"a64 (Fortran order) step {s}")
    check(np.array_equal(strided, expect_mean(s, g, 50) if due else values(s, rank, 50)), f"strided step {s}")
    check(np.all(base.reshape(50, 3)[:, 1:] == -1), f"strided step {s}: the gaps were written")
    check(np.array_equal(a16, (expect_mean(s, g, 64) if due else values(s, rank, 64)) / 12 * 3), f"fp16 step {s}")
check(avg.step_count == 6, f"step_count {avg.step_count}")

# ---- 2. torch's hierarchical schedule, dict form, contiguous groups
sub = 2 if size % 2 == 0 else 1
levels = [(2, sub), (3, size)] if size > 1 else [(2, 1), (3, 1)]
hier = hma.HierarchicalAverager(comm, dict(levels), warmup=2)
x = np.zeros(100, dtype=np.float64)
hp = hma.ParamSet()
hp.add(x)
for s in range(8):
    x[:] = values(s, rank, 100)
    g = torch_hierarchical(s, levels, 2)
    averaged = hier.step(hp)
    check(averaged == (g is not None), f"hierarchical step {s}: averaged {averaged}, torch's group {g}")
    check(np.array_equal(x, expect_mean(s, g, 100) if g else values(s, rank, 100)), f"hierarchical step {s} values")

# ---- 3. random values, torch's recipe through mpi4py (divide, MPI_Allreduce SUM): bit for bit
#         with reduction='mpi' and one piece (README "Exactness")
rng = np.random.default_rng(1234 + rank)
r1 = rng.standard_normal(3000).astype(np.float32)
r2 = rng.standard_normal((10, 30)).astype(np.float32)
r3 = rng.standard_normal(500)
ins = [r1.copy(), r2.copy(), r3.copy()]
rp = hma.ParamSet()
for x in (r1, r2, r3):
    rp.add(x)
exact = hma.PeriodicAverager(comm, 1, reduction="mpi", chunk_bytes=0)
exact.step(rp)
f32 = np.concatenate([ins[0], ins[1].reshape(-1)]) / np.float32(size)
f64 = ins[2] / size
comm.Allreduce(MPI.IN_PLACE, f32, op=MPI.SUM)
comm.Allreduce(MPI.IN_PLACE, f64, op=MPI.SUM)
check(np.array_equal(np.concatenate([r1, r2.reshape(-1)]), f32), "reduction=mpi: f32 not torch's recipe bit for bit")
check(np.array_equal(r3, f64), "reduction=mpi: f64 not torch's recipe bit for bit")

# ---- 4. random values, default options (blocking and start/wait): within the README's bound of
#         the exact sum of the terms, the same bits on every rank; at 2 ranks exactly fl(x0/2 + x1/2)
for mode in ("blocking", "start"):
    y = rng.standard_normal(5000).astype(np.float32)
    terms = np.array(comm.allgather(y)) / np.float32(size)      # fl(x_r / g), rank order
    yp = hma.ParamSet()
    yp.add(y)
    dflt = hma.PeriodicAverager(None, 1)
    if mode == "blocking":
        dflt.step(yp)
    else:
        req = dflt.start(yp)
        check(yp.in_flight or not req.active, "start: in_flight")
        req.wait()
        check(not yp.in_flight, "start: still in flight after wait")
    exact_sum = terms.astype(np.float64).sum(axis=0)
    bound = (size - 1) * 2.0 ** -24 * np.abs(terms.astype(np.float64)).sum(axis=0)
    check(np.all(np.abs(y - exact_sum) <= bound), f"{mode}: outside (g-1) u sum|x/g|")
    if size == 2:
        check(np.array_equal(y, terms[0] + terms[1]), f"{mode}: not fl(x0/2 + x1/2) at 2 ranks")
    everyone = comm.allgather(y.tobytes())
    check(all(b == everyone[0] for b in everyone), f"{mode}: ranks hold different bits")

# ---- 5. a strided array through start()/test(): scattered back when the request completes
base2 = np.zeros((40, 2), dtype=np.float64)
col = base2[:, 1]
sp = hma.ParamSet()
sp.add(col)
col[:] = values(0, rank, 40)
req = hma.PeriodicAverager(comm, 1).start(sp)
while not req.test():
    pass
check(np.array_equal(col, expect_mean(0, size, 40)), "start/test: strided array not written back")
check(np.all(base2[:, 0] == 0), "start/test: the other column was written")

# ---- 6. errors, each message checked
try:
    hma.ParamSet().add(np.zeros(4, dtype=np.int32))
    check(False, "int32 array accepted")
except TypeError as e:
    check("cannot be averaged" in str(e) and "float32" in str(e), f"int32 message: {e}")
ro = np.zeros(4, dtype=np.float32)
ro.flags.writeable = False
try:
    hma.ParamSet().add(ro)
    check(False, "read-only array accepted")
except ValueError as e:
    check("the array is read-only: hma writes each average into it" in str(e), f"read-only message: {e}")
try:
    hma.PeriodicAverager(comm, 2, colour="red")
    check(False, "unknown option accepted")
except TypeError as e:
    check("unknown option 'colour'" in str(e), f"unknown option message: {e}")
try:
    hma.PeriodicAverager(comm, 2, reduction="fast")
    check(False, "bad reduction accepted")
except ValueError as e:
    check("reduction must be one of 'auto', 'mpi', 'ring', got 'fast'" in str(e), f"reduction message: {e}")
try:
    hma.PeriodicAverager("world", 2)
    check(False, "a str communicator accepted")
except TypeError as e:
    check("mpi4py MPI.Comm" in str(e), f"communicator message: {e}")
try:
    hma.PeriodicAverager(comm, 0)
    check(False, "period 0 accepted")
except hma.InvalidArgument as e:
    check("period" in str(e), f"period 0 message: {e}")
if size > 1:  # ranks with different layouts: hma.MismatchError on every rank
    bad = hma.ParamSet()
    bad.add(np.zeros(10 + (rank == size - 1), dtype=np.float32))
    try:
        hma.PeriodicAverager(comm, 1).step(bad)
        check(False, "layout mismatch not detected")
    except hma.MismatchError as e:
        check("layout" in str(e) and "rank" in str(e), f"mismatch message: {e}")

# ---- 7. the MPI check: mpi4py's MPI against the one hma was built with
built = hma.mpi_built()
check(hma.mpi_family(built) == hma.mpi_family(MPI.Get_library_version()),
      f"this test runs with hma's MPI: built {built}, mpi4py {MPI.Get_library_version()[:40]}")
other = "MPICH Version:\t4.0.2\nMPICH Release date: ..." if "Open MPI" in built else "Open MPI v4.1.4, package: Debian"
try:
    hma.check_mpi(other)
    check(False, "a foreign MPI was not refused")
except hma.Error as e:
    check(f"hma was built with {built}" in str(e) and other.splitlines()[0].rstrip(", ") in str(e),
          f"foreign MPI message: {e}")

# ---- 8. hma's extras as keywords reach the C++ options (order-proof values: exact results)
xs = [values(9, r, 64) for r in range(size)]
mean = expect_mean(9, size, 64)
z = values(9, rank, 64).astype(np.float32)
zp = hma.ParamSet()
zp.add(z)
div = hma.PeriodicAverager(comm, 1, divergence=True, timeout_s=60)
check(div.last_divergence() is None, "divergence before any average")
div.step(zp)
check(np.array_equal(z, mean), "divergence=True: not the average")
d = div.last_divergence()
ref = max(np.linalg.norm(x - mean) for x in xs) / np.linalg.norm(mean)
check(d is not None and abs(d[0] - ref) <= 1e-6 * ref and d[1] == 0 and d[2] == 0,
      f"last_divergence {d}, expected ({ref}, 0, 0)")
z[:] = values(9, rank, 64)
hma.PeriodicAverager(comm, 1, wire="bf16").step(zp)  # small multiples of 12: exact in bf16
check(np.array_equal(z, mean), "wire='bf16': not the average of values exact in bf16")
outer = hma.PeriodicAverager(comm, 1, outer={"lr": 1.0})  # lr 1, no momentum: the plain average
for s in (9, 10):
    z[:] = values(s, rank, 64)
    outer.step(zp)
    check(np.array_equal(z, expect_mean(s, size, 64)), f"outer lr=1 step {s}: not the average")
try:
    hma.PeriodicAverager(comm, 1, wire=["bf16", "exact"])
    check(False, "two wires for one level accepted")
except hma.InvalidArgument as e:
    check("lists 2 levels, the schedule has 1" in str(e), f"wire message: {e}")

finish("test_numpy")
