#!/usr/bin/env bash
# `pip install .` as the README says, into a fresh virtual environment over Debian's Python
# (--system-site-packages: its meson-python, numpy, mpi4py and torch), then that hma, not the
# build tree's, runs an average under mpirun at np 2 with numpy and with hma.torch, against the
# mean computed here. The wheel must hold the package only (hma/, its dist-info): no libhma, no
# headers; the extension needs no libhma.so. Compiles the whole library once (about 2 minutes on
# 2 cores at -j1). Skips (77) when a module is missing or mpi4py uses another MPI than this build.
# Env: HMA_PIP_JOBS (default: the number of cores) is ninja's -j inside pip.
# Usage: check_pip.sh PYTHON SOURCE_DIR MPI_IMPL MPIRUN MPIRUN_FLAGS...
set -uo pipefail
py=$1 src=$(cd "$2" && pwd) impl=$3 mpirun=$4
shift 4
unset PYTHONPATH
for m in mesonpy:mesonpy numpy:numpy mpi4py:mpi4py torch:torch ensurepip:venv; do
  "$py" -c "import ${m%:*}" 2>/dev/null ||
    { echo "SKIP: $py cannot import ${m%:*} (tools/bootstrap installs python3-${m#*:})"; exit 77; }
done
theirs=$("$py" -c 'import mpi4py; mpi4py.rc.initialize = False
from mpi4py import MPI; print(MPI.Get_library_version().replace(chr(0), "").splitlines()[0])')
case "$theirs" in *"Open MPI"*) fam=openmpi ;; *MPICH*) fam=mpich ;; *) fam=other ;; esac
[ "$fam" = "$impl" ] || { echo "SKIP: mpi4py uses $fam, this build $impl (pip builds with mpi4py's)"; exit 77; }
work=$(mktemp -d /tmp/hma-pip.XXXXXX)
trap 'rm -rf "$work"' EXIT
say() { printf '\n$ %s\n' "$*"; }

say "$py" -m venv --system-site-packages V
"$py" -m venv --system-site-packages "$work/v" || exit 1
# --no-index: the dependencies are Debian's (a missing one fails here instead of downloading).
say V/bin/pip install --no-build-isolation --no-index SOURCE
start=$SECONDS
timeout 1200 "$work/v/bin/pip" install --no-build-isolation --no-index \
  --config-settings=compile-args=-j"${HMA_PIP_JOBS:-$(nproc)}" "$src" >"$work/pip.log" 2>&1 ||
  { tail -60 "$work/pip.log"; echo "FAIL: pip install"; exit 1; }
grep -E '^(Successfully|Created wheel)' "$work/pip.log"
echo "pip install took $((SECONDS - start)) s"

site=$("$work/v/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
record=$(ls "$site"/hma-*.dist-info/RECORD) || { echo "FAIL: no hma dist-info in $site"; exit 1; }
others=$(cut -d, -f1 "$record" | grep -v -E '^(hma/|hma-[0-9.]+\.dist-info/)')
[ -z "$others" ] || { echo "FAIL: the wheel holds more than the package:"; echo "$others"; exit 1; }
for f in hma/__init__.py hma/torch.py; do
  grep -q "^$f," "$record" || { echo "FAIL: $f is not in the wheel"; exit 1; }
done
ext=$(ls "$site"/hma/_hma.*.so) || { echo "FAIL: no extension in the wheel"; exit 1; }
if readelf -d "$ext" | grep -q 'NEEDED.*libhma'; then
  echo "FAIL: the extension needs libhma.so (the wheel links it statically)"; readelf -d "$ext"; exit 1
fi
echo "the wheel: $(cut -d, -f1 "$record" | grep -c '^hma/') files under hma/, the extension without libhma.so"

cat >"$work/tiny.py" <<'PY'
import os
import sys

import numpy as np
import torch
from mpi4py import MPI

import hma
import hma.torch

comm = MPI.COMM_WORLD
venv = sys.argv[1]
assert hma.__file__.startswith(venv), f"hma imported from {hma.__file__}, not the venv {venv}"
n = comm.size
mean = sum(range(n)) / n  # rank r holds r + 12 k: the mean is exact
x = np.arange(1000, dtype=np.float32) * 12 + comm.rank
params = hma.ParamSet()
params.add(x)
hma.PeriodicAverager(comm, period=2).step(params)  # step 0: averages
ok = bool((x == np.arange(1000, dtype=np.float32) * 12 + mean).all())
p = torch.nn.Parameter(torch.full((7, 3), 12.0 * comm.rank, dtype=torch.float64))
p.grad = torch.zeros_like(p)
hma.torch.PeriodicModelAverager(period=2).average_parameters([p])
ok = ok and bool((p.data == 12.0 * mean).all())
ok = comm.allreduce(int(ok), op=MPI.MIN) == 1
if comm.rank == 0:
    print(f"hma {hma.__version__} from {os.path.dirname(hma.__file__)} at {n} ranks: "
          f"{'ok' if ok else 'WRONG'}", flush=True)
sys.exit(0 if ok else 1)
PY
say mpirun -np 2 V/bin/python -m mpi4py tiny.py
cd "$work" || exit 1
timeout 120 "$mpirun" "$@" -np 2 "$work/v/bin/python" -m mpi4py tiny.py "$work/v" |
  tee "$work/run.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] && grep -q ": ok$" "$work/run.txt" || { echo "FAIL: the installed hma's average (rc $rc)"; exit 1; }
