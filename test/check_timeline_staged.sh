#!/usr/bin/env bash
# The staged device path on the timeline: runs test_device's call forms at np 2 on the emulation
# backend (node transport off, 64 KiB staging chunks) with HMA_TIMELINE set, and checks that every
# chunk shows its three stages (copy to the host, reduction, copy back) on track 2, no chunk
# larger than the staging chunk, the stages of one chunk in order.
# Usage: check_timeline_staged.sh MPIRUN MPIRUN_FLAGS... -- TEST_DEVICE
set -euo pipefail
mpirun=$1
shift
flags=()
while [ "$1" != "--" ]; do flags+=("$1"); shift; done
shift
exe=$1
dir=$(mktemp -d /tmp/hma-timeline-staged.XXXXXX)
trap 'rm -rf "$dir"' EXIT
HMA_TIMELINE="$dir/trace.json" HMA_DEVICE_IPC=0 HMA_STAGING_CHUNK_BYTES=65536 HMA_LOG=off \
  "$mpirun" "${flags[@]}" -np 2 "$exe" "device averages: every call form with exact values" >/dev/null
python3 - "$dir/trace.rank0.json" "$dir/trace.rank1.json" <<'PY'
import json, sys
for path in sys.argv[1:]:
    ev = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X" and e["tid"] == 2]
    by = {}
    for e in ev:
        by.setdefault(e["name"], []).append(e)
    d2h, h2d = by.get("staged d2h", []), by.get("staged h2d", [])
    red = by.get("staged allreduce", []) + by.get("staged iallreduce", [])
    assert d2h and len(d2h) == len(h2d) == len(red), {k: len(v) for k, v in by.items()}
    assert by.get("staged allreduce") and by.get("staged iallreduce"), "blocking and start() forms"
    assert all(e["dur"] >= 0 and 0 < e["args"]["bytes"] <= 65536 for e in ev), "bytes/dur"
    assert any(e["args"]["bytes"] == 65536 for e in d2h) and any(e["args"]["bytes"] < 65536 for e in d2h)
    # Chunks of one bucket in order: each stage ends no earlier than the previous stage began.
    key = lambda e: (e["args"]["group_size"], e["args"]["step"])
    first = lambda lst: sorted(lst, key=lambda e: e["ts"])
    for a, b in ((d2h, red), (red, h2d)):
        assert all(x["ts"] <= y["ts"] + y["dur"] + 1e-3 for x, y in zip(first(a), first(b))), "order"
    print(path.rsplit("/", 1)[1], "ok:", {k: len(v) for k, v in sorted(by.items())})
PY
