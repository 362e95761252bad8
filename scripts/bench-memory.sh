#!/bin/bash
# bench-memory.sh [BINARY] - peak memory (RSS) of a dry run of the example campaign over 2,000 and
# 200,000 generated recipients.  The CSV is read as a stream, so the two should be within a few MB.
# Prints one line per size: rows, seconds, messages/s, peak RSS.
set -euo pipefail
bin=$(realpath "${1:-./mailshot}")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/mailshot-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$here/examples/newsletter/"{campaign.lua,body.txt,body.html} "$work/"
for n in 2000 200000; do
  /usr/bin/python3 - "$work/recipients.csv" "$n" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("email,first_name\n")
    for i in range(int(sys.argv[2])):
        f.write(f"user{i}@example.com,Name{i}\n")
PY
  rm -rf "$work/outbox"
  /usr/bin/python3 - "$bin" "$work" "$n" <<'PY'
import resource, subprocess, sys, time
bin, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.monotonic()
p = subprocess.run([bin, "run", f"{work}/campaign.lua", "--outbox", f"{work}/outbox", "--report", f"{work}/r.csv",
                    "--quiet"], cwd=work)
dt = time.monotonic() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"dry run {n:>7} rows: {dt:6.1f} s, {n / dt:7.0f} msg/s, peak RSS {rss:6.1f} MB, exit {p.returncode}")
PY
done
