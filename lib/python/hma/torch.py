"""Drop-in replacements for torch.distributed.algorithms.model_averaging's averagers, over hma.

    import hma.torch
    averager = hma.torch.PeriodicModelAverager(period=4, warmup_steps=100)
    for batch in data:
        loss(model(batch)).backward(); opt.step(); opt.zero_grad()
        averager.average_parameters(model.parameters())

Same signatures and schedules as torch's. `process_group` is a torch.distributed ProcessGroup
(its ranks must be MPI.COMM_WORLD's: see communicator()) or an mpi4py communicator (None:
MPI.COMM_WORLD, with or without torch.distributed). Parameters are averaged in place (torch
rebinds each p.data to a slice of one flat tensor). Like torch, only parameters with
a gradient are averaged; `skipped` says how many were left out at the last average (with a
warning whenever that number changes). Parameters are registered with hma once and averaged
through their memory; a parameter whose memory changed (p.data reassigned, .to(), an optimizer
that swaps tensors) is seen by its data_ptr and the set is registered anew (`registrations`
counts them), never averaged through a stale pointer. Keyword options are hma's (weight, outer,
wire, divergence, timeout_s, ...; see hma.PeriodicAverager). CPU tensors of float32, float64,
float16 and bfloat16; CUDA tensors of float32 and float64 (an hma.DeviceParamSet, averaged on
torch's current stream), all parameters of one average on the CPU or all on CUDA.
"""
import warnings

import torch
import torch.distributed as dist
from mpi4py import MPI

import hma

__all__ = ["ModelAverager", "PeriodicModelAverager", "HierarchicalModelAverager", "communicator",
           "get_params_to_average"]


def communicator(process_group):
    """The mpi4py communicator for `process_group`: None or an mpi4py communicator as it is; a
    torch.distributed ProcessGroup as the communicator of the same processes in the same order
    (MPI_Comm_create_group over MPI.COMM_WORLD; MPI.COMM_NULL on a rank outside the group,
    which then only counts steps, as torch's averagers do). Every process must have the same rank
    in torch.distributed as in MPI.COMM_WORLD (init_process_group(rank=MPI.COMM_WORLD.rank,
    world_size=MPI.COMM_WORLD.size)); the members check it together (one all_gather_object over
    the group) and all raise hma.InvalidArgument naming both ranks where it does not hold.
    Collective over the group's members."""
    if process_group is None or isinstance(process_group, MPI.Comm):
        return process_group
    # What dist.new_group returns on a rank outside the new group.
    outside = process_group is dist.GroupMember.NON_GROUP_MEMBER
    if not outside and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"hma.torch: process_group must be a torch.distributed ProcessGroup, an mpi4py "
                        f"MPI.Comm or None (MPI.COMM_WORLD), got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise hma.InvalidArgument("hma.torch: process_group is a torch ProcessGroup, but "
                                  "torch.distributed is not initialised")
    world = MPI.COMM_WORLD
    mine = (dist.get_rank(), dist.get_world_size(), world.rank, world.size)
    outside = outside or dist.get_rank(process_group) < 0
    if outside:  # not a member: only its own ranks can be checked
        table = [mine]
    else:
        ranks = dist.get_process_group_ranks(process_group)
        table = [None] * len(ranks)
        dist.all_gather_object(table, mine, group=process_group)
    for torch_rank, torch_size, mpi_rank, mpi_size in table:
        if torch_rank != mpi_rank or torch_size != mpi_size:
            raise hma.InvalidArgument(
                f"hma.torch: torch.distributed's world rank {torch_rank} (of {torch_size}) is MPI "
                f"world rank {mpi_rank} (of {mpi_size}): hma maps a torch ProcessGroup to MPI "
                f"through equal ranks; initialise torch.distributed with "
                f"rank=MPI.COMM_WORLD.rank, world_size=MPI.COMM_WORLD.size")
    if outside:
        return MPI.COMM_NULL
    group = world.Get_group()
    members = group.Incl(ranks)  # in the group's rank order: group rank i is hma's rank i
    try:
        return world.Create_group(members)
    finally:
        members.Free()
        group.Free()


def _over(process_group, make):
    """make(communicator(process_group)), freeing the communicator made for a torch ProcessGroup
    (the averager holds its own duplicate)."""
    comm = communicator(process_group)
    try:
        return make(comm)
    finally:
        if comm is not process_group and comm != MPI.COMM_NULL:
            comm.Free()


def get_params_to_average(params):
    """torch's utils.get_params_to_average: the parameters (or those of param groups) that have a
    gradient; returns (those, how many were skipped)."""
    chosen, skipped = [], 0
    for param in params:
        if isinstance(param, torch.nn.Parameter):
            group = [param]
        elif isinstance(param, dict):
            group = param["params"]
        else:
            raise NotImplementedError(f"Parameter input of type {type(param)} is not supported")
        for p in group:
            if p.grad is not None:
                chosen.append(p)
            else:
                skipped += 1
    return chosen, skipped


def _array(t):
    if t.device.type != "cpu":
        raise NotImplementedError(
            f"hma.torch: parameters on {t.device} are not supported (CPU and CUDA tensors only)")
    d = t.detach()
    if d.dtype in (torch.float32, torch.float64, torch.float16):
        return d.numpy(), None
    if d.dtype == torch.bfloat16:
        return d.view(torch.int16).numpy(), "bf16"
    raise TypeError(f"hma.torch: a parameter of dtype {d.dtype} cannot be averaged (float32, float64, "
                    f"float16 or bfloat16)")


def _device_set(tensors):
    """CUDA parameters in an hma.DeviceParamSet (on the first one's device), through their
    __cuda_array_interface__; the binding averages them on torch's current stream."""
    elsewhere = sorted({str(t.device) for t in tensors if t.device.type != "cuda"})
    if elsewhere:
        raise hma.InvalidArgument(
            f"hma.torch: parameters on CUDA and on {', '.join(elsewhere)} in one average: hma "
            f"averages host and device memory in separate sets; keep the parameters of one "
            f"averager on one kind of device")
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"hma.torch: a CUDA parameter of dtype {t.dtype} cannot be averaged "
                            f"(float32 or float64 on CUDA)")
    ps = hma.DeviceParamSet(tensors[0].device.index if tensors[0].device.index is not None else -1)
    for t in tensors:
        ps.add(t.detach())
    return ps


class ModelAverager:
    """The common part of hma.torch's averagers: the step counter (`step`, as torch's, settable
    for restarts) and average_parameters()."""

    def __init__(self, averager, process_group, weight=None):
        self.process_group = process_group
        self._avg = averager
        self._key = None
        self._set = None
        self._idle = hma.ParamSet()  # stepped on steps without an average
        self.skipped = 0
        self.registrations = 0
        if weight is not None:
            self._avg.set_weight(weight)

    @property
    def step(self):
        return self._avg.step_count

    @step.setter
    def step(self, value):
        self._avg.set_step(value)

    @property
    def averager(self):
        """The hma.Averager underneath (describe(), checkpoint(), last_divergence(), ...)."""
        return self._avg

    def _params(self, tensors):
        # Memory that moved has a new data_ptr (the old storage is still held by the registered
        # arrays, so no new tensor can reuse its address); numel and dtype catch a view of it.
        key = [(t.data_ptr(), t.numel(), t.dtype, t.device) for t in tensors]
        if key != self._key:
            ps = _device_set(tensors) if any(t.device.type == "cuda" for t in tensors) else None
            if ps is None:
                ps = hma.ParamSet()
                for t in tensors:
                    array, dtype = _array(t)
                    ps.add(array, dtype)
            self._set, self._key = ps, key
            self.registrations += 1
        return self._set

    def average_parameters(self, params):
        """Averages `params` (an iterable of Parameters or of param-group dicts) if this step is
        scheduled, then advances the step; collective over the process group."""
        if self._avg.level_now() is None:
            self._avg.step(self._idle)
            return
        tensors, skipped = get_params_to_average(params)
        if skipped != self.skipped and skipped:
            warnings.warn(f"hma.torch: {skipped} parameters without a gradient are not averaged (as "
                          f"in torch)", stacklevel=2)
        self.skipped = skipped
        self._avg.step(self._params(tensors))


class PeriodicModelAverager(ModelAverager):
    """torch's PeriodicModelAverager(period, warmup_steps=0, process_group=None): averages at
    step s when s >= warmup_steps and (s - warmup_steps) % period == 0."""

    def __init__(self, period, warmup_steps=0, process_group=None, weight=None, **options):
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        if period < 1:
            raise ValueError("Arg ``period`` must be a positive value.")
        if period == 1:
            warnings.warn("When period is 1, no need to use model averaging because the communication "
                          "cost of all-reducing parameters will be no less than the cost of all-reducing "
                          "gradients by DistributedDataParallel in the backward pass. Therefore, only "
                          "DistributedDataParallel should be used for this case.")
        self.warmup_steps = warmup_steps
        self.period = period
        super().__init__(_over(process_group, lambda c: hma.PeriodicAverager(c, period, warmup_steps, **options)),
                         process_group, weight)


class HierarchicalModelAverager(ModelAverager):
    """torch's HierarchicalModelAverager(period_group_size_dict, warmup_steps=0,
    process_group=None): at s >= warmup_steps, averages over the groups of the largest period
    dividing s (contiguous rank blocks). hma also refuses periods that do not increase and
    group sizes that do not divide the world (torch accepts them)."""

    def __init__(self, period_group_size_dict=None, warmup_steps=0, process_group=None, weight=None,
                 **options):
        if not period_group_size_dict:
            raise ValueError("Arg ``period_group_size_dict``` must not be empty.")
        periods = list(period_group_size_dict.keys())
        if periods[0] <= 0:
            raise ValueError("The minimum period in arg ``period_group_size_dict`` must be a positive value.")
        if periods[-1] == 1:
            warnings.warn("When the maximum period in arg ``period_group_size_dict`` is 1, no need to use "
                          "model averaging because the communication cost of all-reducing parameters will "
                          "be no less than the cost of all-reducing gradients by DistributedDataParallel "
                          "in the backward pass. Therefore, only DistributedDataParallel should be used for "
                          "this case.")
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        self.warmup_steps = warmup_steps
        self.period_group_size_dict = dict(period_group_size_dict)
        super().__init__(_over(process_group, self._make(period_group_size_dict, warmup_steps, options)),
                         process_group, weight)

    @staticmethod
    def _make(levels, warmup_steps, options):
        def make(comm):
            if comm == MPI.COMM_NULL:  # torch cannot build one there either (a group size of -1)
                raise hma.InvalidArgument(
                    f"hma.torch: HierarchicalModelAverager: MPI world rank {MPI.COMM_WORLD.rank} is not "
                    f"in process_group: build it only on the group's ranks")
            return hma.HierarchicalAverager(comm, levels, warmup_steps, **options)
        return make
