"""hma.DeviceParamSet over __cuda_array_interface__, and hma.torch with CUDA parameters, on
libhma's host emulation backend (there is no GPU here): "device" arrays are numpy memory behind
a small class exposing the interface (the emulation takes host memory as user device arrays, as
the C++ tests pass std::vector data), and each emulated stream is a queue that runs LATE, so an
average that does not wait on the right stream reads stale values. Run with
`python3 -m mpi4py` at any rank count. Values against an independent reference: exact means of
values whose sums are exact, and random values against their exact sum in rationals within
README "Exactness"'s bound."""
import types
from fractions import Fraction

import numpy as np
import torch
from mpi4py import MPI

import hma
import hma.torch
from hma import _hma

from harness import check, comm, finish, rank, size  # noqa: E402


def raises(exc, text, fn, what):
    try:
        fn()
    except exc as e:
        check(text in str(e), f"{what}: message {str(e)!r} lacks {text!r}")
        return
    except Exception as e:  # noqa: BLE001
        check(False, f"{what}: {type(e).__name__}: {e} (wanted {exc.__name__})")
        return
    check(False, f"{what}: accepted")


def values(step, r, n, scale=12):
    """Order-proof values: multiples of 12 (x / g exact for g in 1..4, sums exact)."""
    i = np.arange(n)
    return (scale * ((i * 7 + r * 5 + step * 3) % 11 - 5)).astype(np.float64)


def expect_mean(step, n):
    return sum(values(step, r, n) / size for r in range(size))


class CudaArray:
    """__cuda_array_interface__ (version 3 unless told) over a numpy array's memory."""

    def __init__(self, a, version=3, stream=None, readonly=False, typestr=None, mask=None):
        self.a, self.version, self.stream = a, version, stream
        self.readonly, self.typestr, self.mask = readonly, typestr, mask

    @property
    def __cuda_array_interface__(self):
        a = self.a
        d = {"shape": a.shape, "typestr": self.typestr or a.dtype.str, "data": (a.ctypes.data, self.readonly),
             "strides": None if a.flags.c_contiguous else a.strides, "version": self.version}
        if self.version >= 3:
            d["stream"] = self.stream
        if self.mask is not None:
            d["mask"] = self.mask
        return d


# ---- 0. without a device (this build): a clear error; then the emulation for the rest
raises(hma.Error, "hma: DeviceParamSet: device buffers are unavailable: ", hma.DeviceParamSet, "no device")
_hma._use_emulation_for_testing(True)

# ---- 1. exact means, f32 and f64, C-contiguous and Fortran-order arrays, torch's schedule
a32 = np.zeros(1000, dtype=np.float32)
a64 = np.zeros((7, 9), dtype=np.float64)
f64 = np.zeros((5, 4), dtype=np.float64, order="F")   # dense, not C: strides given
ps = hma.DeviceParamSet()
for x in (a32, a64, f64):
    ps.add(CudaArray(x))
check(ps.arrays == 3 and ps.bytes == 1000 * 4 + 63 * 8 + 20 * 8, f"arrays {ps.arrays}, bytes {ps.bytes}")
check("(host emulation): f32 1000 (zero-copy 0, packed 1000), f64 83" in ps.describe(), ps.describe())
avg = hma.PeriodicAverager(comm, 2, 1)


def fill(s):
    a32[:] = values(s, rank, 1000)
    a64[:] = values(s, rank, 63).reshape(7, 9)
    f64[:] = values(s, rank, 20).reshape(5, 4)


def expect(s, due, what):
    want = (lambda n: expect_mean(s, n)) if due else (lambda n: values(s, rank, n))
    check(np.array_equal(a32, want(1000)), f"{what}: f32")
    check(np.array_equal(a64, want(63).reshape(7, 9)), f"{what}: f64")
    check(np.array_equal(f64, want(20).reshape(5, 4)), f"{what}: f64 Fortran order")


for s in range(6):
    fill(s)
    averaged = avg.step(ps)
    ps.synchronize()
    due = s >= 1 and (s - 1) % 2 == 0
    check(averaged == due, f"step {s}: averaged {averaged}, torch's rule {due}")
    expect(s, due, f"step {s}")
fill(6)
avg.average(ps, 0)
ps.synchronize()
expect(6, True, "average(level 0)")
fill(7)
req = avg.start_average(ps, 0)
req.wait()
ps.synchronize()
expect(7, True, "start_average/wait")
check(avg.step_count == 6, f"step_count {avg.step_count}")

# ---- 2. random values: within (g - 1)·u·Σ|x_r/g| of the exact sum of torch's terms fl(x_r/g)
rng = np.random.default_rng(1234 + rank)
for dt, u in ((np.float32, Fraction(1, 2**24)), (np.float64, Fraction(1, 2**53))):
    x = (rng.standard_normal(300) * 3.7).astype(dt)
    everyone = comm.allgather(x.copy())
    rs = hma.DeviceParamSet()
    rs.add(CudaArray(x))
    avg.average(rs, 0)
    rs.synchronize()
    terms = [e / dt(size) for e in everyone]   # fl(x_r / g) in the element type
    for i in range(x.size):
        exact = sum(Fraction(float(t[i])) for t in terms)
        bound = (size - 1) * u * sum(abs(Fraction(float(t[i]))) for t in terms)
        err = abs(Fraction(float(x[i])) - exact)
        check(err <= bound, f"{dt.__name__} element {i}: error {float(err)} > bound {float(bound)}")
    if size == 2:
        check(np.array_equal(x, terms[0] + terms[1]), f"{dt.__name__}: not fl(x0/2 + x1/2) at 2 ranks")
    check(all(np.array_equal(x, o) for o in comm.allgather(x)), f"{dt.__name__}: other bits on other ranks")

# ---- 3. the caller's stream: a late copy on it must land before hma reads the arrays, and work
# queued on it after the average must see the result (no synchronize)
n = 64


def on_stream(setup, run, stream, s, what):
    """`setup(dst)` registers dst in a set; `run(set)` averages it; the copy into dst is queued on
    `stream` first, a copy out of dst after; both run when `stream` runs."""
    dst = np.zeros(n, dtype=np.float32)
    src = values(s, rank, n).astype(np.float32)
    out = np.full(n, -1, dtype=np.float32)
    st = hma.DeviceParamSet()
    setup(st, dst)
    _hma._emulation_copy(stream, dst.ctypes.data, src.ctypes.data, src.nbytes)
    check(np.all(dst == 0), f"{what}: the emulated copy ran early")
    run(st)
    _hma._emulation_copy(stream, out.ctypes.data, dst.ctypes.data, dst.nbytes)
    _hma._emulation_run_all(stream)
    check(np.array_equal(out, expect_mean(s, n)), f"{what}: work on the stream after the average did not "
                                                   f"see it")
    st.synchronize()
    check(np.array_equal(dst, expect_mean(s, n)), f"{what}: the average")


S = _hma._emulation_stream()
S2 = _hma._emulation_stream()
on_stream(lambda st, d: st.add(CudaArray(d, stream=S)), lambda st: avg.average(st, 0), S, 10,
          "interface stream")
on_stream(lambda st, d: st.add(CudaArray(d, stream=S)), lambda st: avg.start_average(st, 0).wait(), S, 11,
          "interface stream, start_average")
on_stream(lambda st, d: st.add(CudaArray(d, stream=1)), lambda st: avg.average(st, 0), 0, 12,
          "interface stream 1 (legacy default)")
on_stream(lambda st, d: st.add(CudaArray(d, version=2)), lambda st: avg.average(st, 0), 0, 13,
          "no stream named: the default stream")
on_stream(lambda st, d: st.add(CudaArray(d, stream=S)),
          lambda st: avg.average(st, 0, stream=types.SimpleNamespace(cuda_stream=S2)), S2, 14,
          "stream= (an object with .cuda_stream) over the interface's")
on_stream(lambda st, d: st.add(CudaArray(d, version=2)), lambda st: avg.start_average(st, 0, stream=S2).wait(),
          S2, 15, "stream= (an int), start_average")
raises(TypeError, "hma: stream must be an int (a cudaStream_t's value) or have .cuda_stream",
       lambda: avg.average(ps, 0, stream="S"), "stream='S'")


# torch tensors (torch 1.13 exports interface v2, no stream): torch's current stream on the
# set's device. A CPU tensor standing in for a CUDA one: it says so and exposes the interface.
class FakeCudaTensor(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return torch.device("cuda", 0)

    @property
    def __cuda_array_interface__(self):
        typestr = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2"}[self.dtype]
        return {"shape": tuple(self.shape), "typestr": typestr, "data": (self.data_ptr(), False),
                "strides": None, "version": 2}


class FakeCudaParameter(torch.nn.Parameter):
    @property
    def device(self):
        return torch.device("cuda", 0)

    def detach(self):
        return torch.Tensor._make_subclass(FakeCudaTensor, super().detach())


S3 = _hma._emulation_stream()
asked = []


def current_stream(device=None):
    asked.append(device)
    return types.SimpleNamespace(cuda_stream=S3)


torch.cuda.current_stream = current_stream
on_stream(lambda st, d: st.add(torch.Tensor._make_subclass(FakeCudaTensor, torch.from_numpy(d))),
          lambda st: avg.average(st, 0), S3, 16, "a torch tensor: torch's current stream")
check(asked == [0], f"torch.cuda.current_stream asked for devices {asked}, not [0]")

# ---- 4. refusals, with their messages; a refused array leaves the set as it was
rs = hma.DeviceParamSet()
good = np.zeros(8, dtype=np.float32)
rs.add(CudaArray(good, stream=S))
raises(ValueError, "hma: DeviceParamSet.add: the array is read-only (__cuda_array_interface__ data[1])",
       lambda: rs.add(CudaArray(np.zeros(4, np.float32), readonly=True)), "read-only")
strided = np.zeros(16, dtype=np.float32)[::2]
raises(ValueError, "the array is not contiguous (shape (8,), strides (8,) bytes)",
       lambda: rs.add(CudaArray(strided)), "strided")
raises(ValueError, "the array is not contiguous (shape (3, 2), strides (24, 4) bytes)",
       lambda: rs.add(CudaArray(np.zeros((3, 6), np.float32)[:, :2])), "2-D slice")
raises(TypeError, "arrays of type '<f2' cannot be averaged on the device: float32 ('<f4') or float64 ('<f8')",
       lambda: rs.add(CudaArray(np.zeros(4, np.float16))), "float16")
raises(TypeError, "arrays of type '<i4' cannot be averaged on the device",
       lambda: rs.add(CudaArray(np.zeros(4, np.int32))), "int32")
raises(ValueError, "__cuda_array_interface__ version 1 is not supported (2 or 3)",
       lambda: rs.add(CudaArray(np.zeros(4, np.float32), version=1)), "version 1")
raises(ValueError, "the array has a mask",
       lambda: rs.add(CudaArray(np.zeros(4, np.float32), mask=object())), "mask")
raises(ValueError, "names stream 0, which the interface disallows",
       lambda: rs.add(CudaArray(np.zeros(4, np.float32), stream=0)), "stream 0")
raises(ValueError, f"names stream {S2}, the arrays registered before stream {S}: an average waits on one stream",
       lambda: rs.add(CudaArray(np.zeros(4, np.float32), stream=S2)), "two streams")
raises(TypeError, "a ndarray has no __cuda_array_interface__", lambda: rs.add(np.zeros(4, np.float32)), "numpy")


class DLPackOnly:   # DLPack is not taken: an object with only __dlpack__ is refused
    def __dlpack__(self, stream=None):
        return np.zeros(4, np.float32).__dlpack__()

    def __dlpack_device__(self):
        return (2, 0)


raises(TypeError, "a DLPackOnly has no __cuda_array_interface__", lambda: rs.add(DLPackOnly()), "DLPack only")
raises(ValueError, "overlaps user array #0", lambda: rs.add(CudaArray(good[2:6])), "overlap")
check(rs.arrays == 1 and rs.bytes == 32, f"after the refusals: {rs.arrays} arrays, {rs.bytes} bytes")

# ---- 5. hma.torch: CUDA parameters go to a DeviceParamSet on torch's current stream
w1 = np.zeros(40, dtype=np.float32)
w2 = np.zeros((3, 5), dtype=np.float64)
p1 = FakeCudaParameter(torch.from_numpy(w1))
p2 = FakeCudaParameter(torch.from_numpy(w2))
p3 = FakeCudaParameter(torch.zeros(4))   # no gradient: skipped
for p in (p1, p2):
    p.grad = torch.zeros(p.shape, dtype=p.dtype)
averager = hma.torch.PeriodicModelAverager(period=2, warmup_steps=0)
asked.clear()
for s in range(4):
    src1, src2 = values(20 + s, rank, 40).astype(np.float32), values(30 + s, rank, 15)
    _hma._emulation_copy(S3, w1.ctypes.data, src1.ctypes.data, src1.nbytes)   # "torch's kernels"
    _hma._emulation_copy(S3, w2.ctypes.data, src2.ctypes.data, src2.nbytes)
    averager.average_parameters([p1, p2, p3])
    _hma._emulation_run_all(S3)   # torch's later work on its stream sees the result
    due = s % 2 == 0
    check(np.array_equal(w1, expect_mean(20 + s, 40) if due else src1), f"hma.torch step {s}: f32 parameter")
    check(np.array_equal(w2.reshape(-1), expect_mean(30 + s, 15) if due else src2), f"hma.torch step {s}: f64")
check(isinstance(averager._set, hma.DeviceParamSet), f"hma.torch registered a {type(averager._set).__name__}")
check(averager.registrations == 1 and averager.skipped == 1,
      f"registrations {averager.registrations}, skipped {averager.skipped}")
check(asked and set(asked) == {0}, f"hma.torch: torch.cuda.current_stream asked for {asked}")
# torch re-allocates p1: registered anew, averaged in the new memory, the old one left alone
w1b = np.zeros(40, dtype=np.float32)
p1.data = torch.from_numpy(w1b)
w1[:] = 7
w1b[:] = values(40, rank, 40)
averager.average_parameters([p1, p2, p3])   # step 4: due
_hma._emulation_run_all(S3)
check(averager.registrations == 2, f"after p1.data = ...: registrations {averager.registrations}")
check(np.array_equal(w1b, expect_mean(40, 40)), "re-allocated parameter: not averaged in its new memory")
check(np.all(w1 == 7), "re-allocated parameter: its old memory was written")
averager.average_parameters([p1, p2])   # step 5: not due
cpu = torch.nn.Parameter(torch.zeros(3))
cpu.grad = torch.zeros(3)
raises(hma.InvalidArgument, "hma.torch: parameters on CUDA and on cpu in one average: hma averages host and "
       "device memory in separate sets", lambda: averager.average_parameters([p1, cpu]), "CPU and CUDA mixed")
half = FakeCudaParameter(torch.zeros(4, dtype=torch.float16))
half.grad = torch.zeros(4, dtype=torch.float16)
raises(TypeError, "hma.torch: a CUDA parameter of dtype torch.float16 cannot be averaged (float32 or float64 "
       "on CUDA)", lambda: averager.average_parameters([p1, half]), "CUDA float16")
check(averager.step == 6, f"hma.torch step {averager.step} after refusals")

for st in (S, S2, S3):
    _hma._emulation_destroy_stream(st)
finish("test_cuda_array")
