#!/usr/bin/env bash
# Runs a test of the Python package hma (test/python/) under mpirun with `python3 -m mpi4py`
# (an exception on one rank aborts the job), or, for `mismatch`, checks that hma names both MPIs
# when mpi4py's is another than hma's (Debian's mpi4py is Open MPI's: an MPICH build of hma).
# Exit 77 (skip) with the reason when a module is missing, for the value tests when mpi4py uses
# another MPI than this build, and for `mismatch` when it uses the same.
# Usage: check_python.sh PYTHON PYTHONPATH MPI_IMPL numpy|torch|torch_pg|cuda_array|mismatch NP SCRIPT MPIRUN FLAGS...
set -uo pipefail
py=$1 pp=$2 impl=$3 mode=$4 np=$5 script=$6 mpirun=$7
shift 7
export PYTHONPATH=$pp${PYTHONPATH:+:$PYTHONPATH}
mods="numpy mpi4py"
case "$mode" in torch* | cuda_array) mods="$mods torch" ;; esac
for m in $mods; do
  "$py" -c "import $m" 2>/dev/null || { echo "SKIP: $py cannot import $m (tools/bootstrap installs python3-$m)"; exit 77; }
done
# mpi4py's MPI without initialising it.
theirs=$("$py" -c 'import mpi4py; mpi4py.rc.initialize = False
from mpi4py import MPI; print(MPI.Get_library_version().replace(chr(0), "").splitlines()[0])')
case "$theirs" in *"Open MPI"*) fam=openmpi ;; *MPICH*) fam=mpich ;; *) fam=other ;; esac
echo "mpi4py: $theirs; hma: $impl"
if [ "$mode" != mismatch ]; then
  [ "$fam" = "$impl" ] || { echo "SKIP: mpi4py uses $fam, this hma $impl (python_mpi_mismatch checks the error)"; exit 77; }
  exec timeout 300 "$mpirun" "$@" -np "$np" "$py" -m mpi4py "$script"
fi
# Only where mpi4py's MPI is another than hma's: preloading the other MPI under mpi4py (built
# against hma's) crashes mpi4py itself, before hma is reached. The check's logic is tested at
# every rank count by test_numpy.py (hma.check_mpi) and the library's by test mpi_mismatch.
[ "$fam" != "$impl" ] || { echo "SKIP: mpi4py uses hma's MPI ($impl): no mismatch to show here"; exit 77; }
out=$(HMA_LOG=off timeout 60 "$py" -c '
import hma
try:
    hma.PeriodicAverager(None, 2)
    print("created")
except hma.Error as e:
    print("hma.Error:", e)
' 2>&1)
echo "$out"
grep -q "^hma.Error: hma: hma was built with $(case $impl in openmpi) echo 'Open MPI';; *) echo MPICH;; esac) [0-9]" <<<"$out" ||
  { echo "FAIL: no hma.Error naming the MPI hma was built with"; exit 1; }
grep -q "but mpi4py uses $(case $fam in openmpi) echo 'Open MPI';; *) echo MPICH;; esac)" <<<"$out" ||
  { echo "FAIL: the error does not name mpi4py's MPI"; exit 1; }
echo "ok: mpi4py's other MPI is named, with hma's own"
