#!/usr/bin/env bash
# A failure that only one rank sees must end the whole job at once, naming that rank, never leave
# the other ranks waiting in their next collective (test/main.cpp's listener). Runs the hidden
# test "[.lone_failure]" (fails on the last rank only, then the others enter MPI_Barrier) at np 3.
# Usage: check_lone_failure.sh MPIRUN MPIRUN_FLAGS... -- TEST_BINARY
set -uo pipefail
mpirun=$1
shift
flags=()
while [ "$1" != "--" ]; do flags+=("$1"); shift; done
shift
exe=$1
out=$(mktemp /tmp/hma-lone.XXXXXX)
trap 'rm -f "$out"' EXIT
start=$(date +%s)
timeout 60 "$mpirun" "${flags[@]}" -np 3 "$exe" '[.lone_failure]' >"$out" 2>&1
rc=$?
took=$(( $(date +%s) - start ))
cat "$out"
if [ "$rc" -eq 0 ]; then echo "FAIL: the job passed although rank 2 failed"; exit 1; fi
if [ "$rc" -eq 124 ]; then echo "FAIL: the job hung (killed after 60 s)"; exit 1; fi
grep -q "rank 2 of 3: a failure the other ranks did not agree on" "$out" ||
  { echo "FAIL: no message naming rank 2"; exit 1; }
grep -q "the last rank fails alone" "$out" || { echo "FAIL: the failed check is not shown"; exit 1; }
echo "ok: the job ended with exit status $rc after ${took} s, naming rank 2"
