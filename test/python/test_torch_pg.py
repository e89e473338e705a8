"""hma.torch over torch.distributed ProcessGroups (gloo), against torch's own averagers on the same
data with the same process group and against the mean computed here from every rank's inputs, at
any rank count (run with `python3 -m mpi4py`):
- the world group, the even ranks, the odd ranks and ranks 1.. (3 ranks at np 4): periodic
  averaging, bit for bit with torch on order-proof values (multiples of 60: x/g is exact for
  every group size here) and on random values in groups of 2 or fewer, within twice the
  README's bound (g-1) u sum|x/g| in larger groups; a rank outside the group changes nothing
  and only counts steps, as torch's;
- the hierarchical averager over the world group (against torch's) and over ranks 1.. (against
  the mean: hma's groups are contiguous blocks of the process group's ranks, [1, 2] and [3, 4]
  at np 5; refused with
  hma.InvalidArgument on a rank outside the group, where torch's cannot be built either);
- torch ranks that are not MPI.COMM_WORLD's (torch.distributed initialised again with the ranks
  reversed): every rank raises hma.InvalidArgument naming a torch rank and its MPI rank, also a
  rank whose own ranks agree (the middle one at odd sizes), with no hang;
- a process_group of another type (TypeError) and a ProcessGroup after torch.distributed was
  destroyed (hma.InvalidArgument)."""
import shutil
import tempfile

import torch
import torch.distributed as dist
from mpi4py import MPI
from torch.distributed.algorithms.model_averaging import averagers as torch_averagers
from torch.distributed.algorithms.model_averaging import hierarchical_model_averager as torch_hier

import hma.torch

from harness import check, comm, finish, rank, size  # noqa: E402

SHAPES = [(4, 6), (4,), (9,)]


def init(store, ranks_of):
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=ranks_of(rank),
                            world_size=size)


def inputs(step, r, random):
    g = torch.Generator().manual_seed(7919 * step + r)
    if random:
        return [torch.randn(s, generator=g) for s in SHAPES]
    return [60.0 * torch.randint(-20, 21, s, generator=g).float() for s in SHAPES]


def params(step, random):
    ps = [torch.nn.Parameter(v) for v in inputs(step, rank, random)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    return ps


def expected(step, members, averaged, random):
    """The mean over `members` of their inputs (float64) and the bound allowed around it."""
    if not averaged:
        return [(v.double(), 0.0) for v in inputs(step, rank, random)]
    g = len(members)
    per_rank = [inputs(step, r, random) for r in members]
    out = []
    for i in range(len(SHAPES)):
        xs = [vals[i].double() for vals in per_rank]
        mean = sum(xs) / g
        out.append((mean, 2 * (g - 1) * 2.0 ** -24 * sum((x / g).abs() for x in xs) if random else 0.0))
    return out


def compare(ph, pt, ref, exact_with_torch, what):
    for i, (h, t, (mean, bound)) in enumerate(zip(ph, pt, ref)):
        h, t = h.detach(), t.detach()
        if exact_with_torch:
            check(torch.equal(h, t), f"{what}: parameter {i} differs from torch's")
        else:
            check(bool(((h.double() - t.double()).abs() <= 2 * bound).all()),
                  f"{what}: parameter {i} beyond twice the bound from torch's")
        check(bool(((h.double() - mean).abs() <= bound).all()), f"{what}: parameter {i} is not the mean")


def schedule_of(levels, warmup, step):
    """torch's hierarchical schedule: the group size averaged at `step`, or None."""
    if step < warmup:
        return None
    for period in sorted(levels, reverse=True):
        if step % period == 0:
            return levels[period]
    return None


def blocks(members, g):
    """hma's (and torch's) groups of size g: contiguous blocks of the process group's ranks."""
    i = members.index(rank)
    return members[i - i % g:i - i % g + g]


store = comm.bcast(tempfile.mkdtemp(prefix="hma-pg-") if rank == 0 else None)
init(store, lambda r: r)
groups = [("world", dist.group.WORLD, list(range(size)))]
for name, members in [("evens", list(range(0, size, 2))), ("odds", list(range(1, size, 2))),
                      ("ranks 1..", list(range(1, size)))]:
    groups.append((name, dist.new_group(members), members))  # every rank creates every group

# periodic averaging over each group (period 2 after 1 step: averages at 1, 3, 5)
for name, pg, members in groups:
    for random in (False, True):
        what = f"periodic over {name} {members} random={random}"
        ah = hma.torch.PeriodicModelAverager(period=2, warmup_steps=1, process_group=pg)
        at = torch_averagers.PeriodicModelAverager(period=2, warmup_steps=1, process_group=pg)
        check(ah.process_group is pg, f"{what}: process_group is not the one given")
        check(ah.averager.member == (rank in members), f"{what}: member is {ah.averager.member}")
        for step in range(6):
            averaged = rank in members and step >= 1 and (step - 1) % 2 == 0
            ph, pt = params(step, random), params(step, random)
            ah.average_parameters(ph)
            at.average_parameters(pt)
            check(ah.step == at.step == step + 1, f"{what}: step {ah.step}, torch's {at.step}")
            compare(ph, pt, expected(step, members, averaged, random), not random or len(members) <= 2,
                    f"{what} step {step}")


def torch_hierarchical(levels, pg):
    # torch 1.13's dist.new_subgroups refuses to run without CUDA, a guard only (see test_torch.py)
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        return torch_hier.HierarchicalModelAverager(levels, warmup_steps=1, process_group=pg)
    finally:
        torch.cuda.is_available = available


# hierarchical over the world group, against torch's (groups of 2 or 1 every 2 steps, all every 4)
levels = {2: 2 if size % 2 == 0 else 1, 4: size}
ah = hma.torch.HierarchicalModelAverager(levels, warmup_steps=1, process_group=dist.group.WORLD)
at = torch_hierarchical(levels, dist.group.WORLD)
for step in range(9):
    g = schedule_of(levels, 1, step)
    ph, pt = params(step, False), params(step, False)
    ah.average_parameters(ph)
    at.average_parameters(pt)
    ref = expected(step, blocks(list(range(size)), g) if g else [rank], g is not None, False)
    compare(ph, pt, ref, True, f"hierarchical over the world group step {step}")

# hierarchical over ranks 1.. (torch 1.13's subgroups ignore the process group: against the mean)
name, pg, members = groups[3]
if len(members) >= 2:
    sub = {2: 2 if len(members) % 2 == 0 else 1, 4: len(members)}
    if rank not in members:  # torch's cannot be built there either (ValueError: size -1)
        try:
            hma.torch.HierarchicalModelAverager(sub, warmup_steps=1, process_group=pg)
            check(False, f"hierarchical over {name} built outside the group")
        except hma.InvalidArgument as e:
            check(f"MPI world rank {rank} is not in process_group" in str(e), f"outside: {e}")
    for step in range(9) if rank in members else []:
        if step == 0:
            ah = hma.torch.HierarchicalModelAverager(sub, warmup_steps=1, process_group=pg)
        g = schedule_of(sub, 1, step)
        ph = params(step, True)
        ah.average_parameters(ph)
        ref = expected(step, blocks(members, g) if g else [rank], g is not None, True)
        compare(ph, ph, ref, True, f"hierarchical over {name} {members} step {step}")
        check(ah.step == step + 1, f"hierarchical over {name}: step {ah.step}")

# a process_group of another type
try:
    hma.torch.PeriodicModelAverager(period=2, process_group="world")
    check(False, "a str process_group was accepted")
except TypeError as e:
    check("must be a torch.distributed ProcessGroup, an mpi4py MPI.Comm or None" in str(e), f"type: {e}")

# torch ranks that are not MPI's: torch.distributed again, with the ranks reversed
dist.destroy_process_group()
old = groups[0][1]
try:
    hma.torch.PeriodicModelAverager(period=2, process_group=old)
    check(False, "a ProcessGroup accepted after torch.distributed was destroyed")
except hma.InvalidArgument as e:
    check("torch.distributed is not initialised" in str(e), f"not initialised: {e}")
comm.Barrier()
store2 = comm.bcast(tempfile.mkdtemp(prefix="hma-pg-") if rank == 0 else None)
init(store2, lambda r: size - 1 - r)
if size > 1:
    try:
        hma.torch.PeriodicModelAverager(period=2, process_group=dist.group.WORLD)
        check(False, "torch ranks reversed from MPI's were accepted")
    except hma.InvalidArgument as e:
        msg = str(e)
        # the first mismatching member in torch's group order: torch rank 0 is MPI rank size-1
        want = f"torch.distributed's world rank 0 (of {size}) is MPI world rank {size - 1} (of {size})"
        check(want in msg and "rank=MPI.COMM_WORLD.rank" in msg, f"reversed ranks: {msg}")
dist.destroy_process_group()

comm.Barrier()
if rank == 0:
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(store2, ignore_errors=True)
finish("test_torch_pg")
