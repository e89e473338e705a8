#!/usr/bin/env bash
# Runs the demo at np 2 with HMA_TIMELINE set, merges the per-rank traces and checks them:
# valid Chrome-trace JSON, one process per rank, averaging events with level, step and bytes.
# Usage: check_timeline.sh MPIRUN MPIRUN_FLAGS... -- DEMO MERGE
set -euo pipefail
mpirun=$1
shift
flags=()
while [ "$1" != "--" ]; do flags+=("$1"); shift; done
shift
demo=$1 merge=$2
dir=$(mktemp -d /tmp/hma-timeline.XXXXXX)
trap 'rm -rf "$dir"' EXIT
# Twice: as it runs (the demo's small sets ride in the agreement check: fused), and with the
# check off (HMA_CHECK=0: the data stage's own start and wait).
for mode in fused unfused; do
  rm -f "$dir"/*.json
  check=1
  [ "$mode" = unfused ] && check=0
  HMA_CHECK=$check HMA_TIMELINE="$dir/trace.json" HMA_RANKS_PER_NODE=1 "$mpirun" "${flags[@]}" -np 2 "$demo" \
    --steps 8 --schedule 2:1,4:2 --nonblocking >/dev/null
  ls "$dir"
  "$merge" "$dir/all.json" "$dir/trace.rank0.json" "$dir/trace.rank1.json"
  python3 - "$dir/all.json" "$mode" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
unfused = sys.argv[2] == "unfused"
ev = [e for e in t["traceEvents"] if e.get("ph") == "X"]
pids = sorted({e["pid"] for e in ev})
assert pids == [0, 1], pids
names = {e["name"] for e in ev}
need = ("in flight", "start", "wait") if unfused else ("in flight", "fused (in the check)")
for n in need:
    assert n in names, (n, names)
steps = sorted({e["args"]["step"] for e in ev if e["name"] in ("start", "fused (in the check)") and e["pid"] == 0})
assert steps == [0, 4, 8], steps  # 2:1,4:2: steps 2 and 6 average over one rank, which is free
world = [e for e in ev if e["name"] == "in flight" and e["args"]["group_size"] == 2]
assert {e["args"]["step"] for e in world} == {0, 4, 8}, world
assert all(e["dur"] >= 0 and e["args"]["bytes"] == 16 * 8 + 4 for e in ev), "bytes/dur"
print("timeline ok:", len(ev), "events,", sorted(names))
PY
done
