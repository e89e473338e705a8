#!/usr/bin/env bash
# A program whose MPI is not the one hma was built with gets an error naming both libraries at
# averager construction (not an MPI error about an invalid communicator): test/mpi_mismatch.c
# runs once as built (must succeed) and once with the other MPI's library preloaded, which is
# then the MPI of the whole process, as when an Open MPI program (or mpi4py) loads an MPICH-built
# hma. Exit 77 (skip) when the other MPI is not installed.
# Usage: check_mpi_mismatch.sh MPI_IMPL EXE
set -uo pipefail
impl=$1 exe=$2
case "$impl" in
  openmpi) soname=libmpich.so.12 want='MPICH' built='Open MPI' ;;
  mpich) soname=libmpi.so.40 want='Open MPI' built='MPICH' ;;
  *) echo "SKIP: hma was built with an MPI of unknown family ($impl)"; exit 77 ;;
esac
other=$(/sbin/ldconfig -p | awk -v n="$soname" '$1 == n { print $NF; exit }')
out=$(HMA_LOG=off timeout 60 "$exe" 2>&1)
echo "as built: $out"
grep -q '^status 0$' <<<"$out" || { echo "FAIL: the averager was not created with hma's own MPI"; exit 1; }
[ -n "$other" ] && [ -f "$other" ] || { echo "SKIP: the other MPI ($want, $soname) is not installed"; exit 77; }
out=$(HMA_LOG=off LD_PRELOAD=$other timeout 60 "$exe" 2>&1)
echo "with $other preloaded: $out"
grep -q '^status 5$' <<<"$out" || { echo "FAIL: expected HMA_ERR (5)"; exit 1; }
grep -q "^message hma: averager: hma was built with $built [0-9]" <<<"$out" ||
  { echo "FAIL: the message does not name the MPI hma was built with ($built)"; exit 1; }
grep -q "but the MPI library loaded in this process is $want" <<<"$out" ||
  { echo "FAIL: the message does not name the MPI loaded ($want)"; exit 1; }
echo "ok: a foreign MPI is named, with hma's own"
