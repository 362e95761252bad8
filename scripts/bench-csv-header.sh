#!/bin/bash
# bench-csv-header.sh [BINARY] - time to open a CSV whose header has 60,000, 120,000 and 200,000
# columns (the duplicate-name check must stay linear in the number of columns).  Prints one line per
# size: columns, seconds (median of 3 runs).
set -euo pipefail
bin=$(realpath "${1:-./mailshot}")
work=$(mktemp -d "${TMPDIR:-/tmp}/mailshot-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT
cat > "$work/open.lua" <<'LUA'
local r = assert(require("mailshot.csv").open(arg[1]))
assert(#r:header() == tonumber(arg[2]))
r:close()
LUA
for n in ${BENCH_COLUMNS:-60000 120000 200000}; do
  /usr/bin/python3 - "$work/wide.csv" "$n" <<'PY'
import sys
n = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    f.write(",".join(f"column_{i}" for i in range(n)) + "\n")
PY
  /usr/bin/python3 - "$bin" "$work" "$n" <<'PY'
import statistics, subprocess, sys, time
bin, work, n = sys.argv[1], sys.argv[2], sys.argv[3]
times = []
for _ in range(3):
    t = time.monotonic()
    subprocess.run([bin, "exec", f"{work}/open.lua", f"{work}/wide.csv", n], check=True)
    times.append(time.monotonic() - t)
print(f"header of {int(n):>7} columns: {statistics.median(times):7.2f} s")
PY
done
