"""hma from Python side by side with torch's own averagers over gloo, on the same tensors.

    PYTHONPATH=build/lib/python mpirun -np N /usr/bin/python3 -m mpi4py bench/bench_python.py \
        [--out FILE.csv] [--sizes 64K,1M,8M,64M] [--min-iters N]

For each size (float32 bytes per rank) and layout (one contiguous tensor, or 100 parameters of
equal size), the median over iterations (slowest rank per iteration) of one average:
- torch: torch.distributed.algorithms.model_averaging's PeriodicModelAverager(period=1) over a
  gloo process group (torch's recipe: cat, divide, all_reduce, rebind each p.data);
- hma.torch: hma.torch.PeriodicModelAverager(period=1).average_parameters(params);
- binding: hma.Averager.step on a ParamSet from Python, and inside it the C++ call alone
  (Averager::step, timed in C++): overhead = binding / C++ - 1;
- floor: mpi4py's MPI_Allreduce (in place) on the same bytes, in one buffer.
Prints a table and writes CSV. Each figure is the same run's, on the same machine.
"""
import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
from mpi4py import MPI
from torch.distributed.algorithms.model_averaging import averagers as torch_averagers

import hma
import hma.torch

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size


def parse_size(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1]] if text[-1] in mult else int(text)


def slowest_median(samples):
    """Per iteration the slowest rank's time, then the median and the (p90-p10)/median spread."""
    gathered = comm.allgather(samples)
    per_iter = [max(g[i] for g in gathered) for i in range(len(samples))]
    med = statistics.median(per_iter)
    q = sorted(per_iter)
    spread = (q[int(0.9 * (len(q) - 1))] - q[int(0.1 * (len(q) - 1))]) / med if med > 0 else 0
    return med, spread


def timed(fn, iters):
    out = []
    for _ in range(iters):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def params_for(nbytes, count):
    n = nbytes // 4 // count
    g = torch.Generator().manual_seed(rank)
    ps = [torch.nn.Parameter(torch.randn(n, generator=g)) for _ in range(count)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    return ps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64K,1M,8M,64M")
    ap.add_argument("--out", default="")
    ap.add_argument("--min-iters", type=int, default=5,
                    help="iterations per figure at least (default 5; up to 50 for small sizes)")
    args = ap.parse_args()
    store = comm.bcast(tempfile.mkdtemp(prefix="hma-bench-gloo-") if rank == 0 else None)
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=rank, world_size=size)
    rows = []
    for nbytes in [parse_size(s) for s in args.sizes.split(",")]:
        iters = max(args.min_iters, min(50, (64 << 20) // nbytes // 4))
        for count in (1, 100):
            # torch (its own tensors: it rebinds p.data)
            tp = params_for(nbytes, count)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ta = torch_averagers.PeriodicModelAverager(period=1)
                ha = hma.torch.PeriodicModelAverager(period=1)
            ta.average_parameters(tp)  # warm-up
            t_torch = slowest_median(timed(lambda: ta.average_parameters(tp), iters))
            hp = params_for(nbytes, count)
            ha.average_parameters(hp)  # registers
            t_hma_torch = slowest_median(timed(lambda: ha.average_parameters(hp), iters))
            # the binding alone, and the C++ call inside it
            bp = params_for(nbytes, count)
            ps = hma.ParamSet()
            for p in bp:
                ps.add(p.detach().numpy())
            avg = hma.PeriodicAverager(comm, 1)
            avg._timed_step(ps)
            inner = []

            def step():
                inner.append(avg._timed_step(ps)[1])

            t_binding = slowest_median(timed(step, iters))
            t_cpp = slowest_median(inner)
            flat = torch.cat([p.detach() for p in bp]).numpy()
            t_mpi = slowest_median(timed(lambda: comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM), iters))
            row = dict(np=size, bytes=nbytes, params=count, iters=iters,
                       torch_gloo_us=t_torch[0] * 1e6, hma_torch_us=t_hma_torch[0] * 1e6,
                       binding_us=t_binding[0] * 1e6, cpp_us=t_cpp[0] * 1e6, mpi_allreduce_us=t_mpi[0] * 1e6,
                       overhead=t_binding[0] / t_cpp[0] - 1, hma_torch_overhead=t_hma_torch[0] / t_cpp[0] - 1,
                       speedup_vs_torch=t_torch[0] / t_hma_torch[0],
                       spread_torch=t_torch[1], spread_hma_torch=t_hma_torch[1])
            rows.append(row)
            del avg, ps
    dist.destroy_process_group()
    if rank == 0:
        shutil.rmtree(store, ignore_errors=True)
        print(f"# bench_python: np {size}, f32, {hma.mpi_library()[:40]}, torch {torch.__version__} gloo, "
              f"hma {hma.version()}; median µs of one average (slowest rank per iteration)")
        print(f"{'bytes':>9} {'params':>6} {'torch':>10} {'hma.torch':>10} {'x faster':>8} {'binding':>10} "
              f"{'C++':>10} {'overhead':>8} {'MPI floor':>10}")
        for r in rows:
            b = r["bytes"]
            label = f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"
            print(f"{label:>9} {r['params']:>6} {r['torch_gloo_us']:>10.1f} {r['hma_torch_us']:>10.1f} "
                  f"{r['speedup_vs_torch']:>8.2f} {r['binding_us']:>10.1f} {r['cpp_us']:>10.1f} "
                  f"{100 * r['overhead']:>7.1f}% {r['mpi_allreduce_us']:>10.1f}")
        print("# x faster = torch / hma.torch; overhead = binding (hma.Averager.step from Python) / the "
              "C++ Averager::step inside it - 1; MPI floor = mpi4py MPI_Allreduce in place on the same bytes")
        if args.out:
            with open(args.out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                w.writeheader()
                w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
