"""Drop-in replacements for torch.distributed.algorithms.model_averaging's averagers, over hma.

    import hma.torch
    averager = hma.torch.PeriodicModelAverager(period=4, warmup_steps=100)
    for batch in data:
        loss(model(batch)).backward(); opt.step(); opt.zero_grad()
        averager.average_parameters(model.parameters())

Same signatures and schedules as torch's, with two differences: `process_group` is an mpi4py
communicator (None: MPI.COMM_WORLD), not a torch ProcessGroup, and parameters are averaged in
place (torch rebinds each p.data to a slice of one flat tensor). Like torch, only parameters with
a gradient are averaged; `skipped` says how many were left out at the last average (with a
warning whenever that number changes). Parameters are registered with hma once and averaged
through their memory; a parameter whose memory changed (p.data reassigned, .to(), an optimizer
that swaps tensors) is seen by its data_ptr and the set is registered anew (`registrations`
counts them), never averaged through a stale pointer. Keyword options are hma's (weight, outer,
wire, divergence, timeout_s, ...; see hma.PeriodicAverager). CPU tensors of float32, float64,
float16 and bfloat16.
"""
import warnings

import torch

import hma

__all__ = ["ModelAverager", "PeriodicModelAverager", "HierarchicalModelAverager", "get_params_to_average"]


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
            f"hma.torch: parameters on {t.device} are not supported by this binding yet (CPU "
            f"tensors only)")
    d = t.detach()
    if d.dtype in (torch.float32, torch.float64, torch.float16):
        return d.numpy(), None
    if d.dtype == torch.bfloat16:
        return d.view(torch.int16).numpy(), "bf16"
    raise TypeError(f"hma.torch: a parameter of dtype {d.dtype} cannot be averaged (float32, float64, "
                    f"float16 or bfloat16)")


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
        key = [(t.data_ptr(), t.numel(), t.dtype) for t in tensors]
        if key != self._key:
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
        super().__init__(hma.PeriodicAverager(process_group, period, warmup_steps, **options),
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
        super().__init__(hma.HierarchicalAverager(process_group, period_group_size_dict, warmup_steps,
                                                  **options), process_group, weight)
