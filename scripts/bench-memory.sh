#!/bin/bash
# bench-memory.sh [BINARY] - peak memory (RSS) of a dry run of the example campaign over 2,000 and
# 200,000 generated recipients.  The CSV is read as a stream, so the two should be within a few MB.
# Prints one line per size: rows, seconds, messages/s, peak RSS.  Then the same for the send
# journal: a --send run of RESUME_N (default 1,000,000) skipped rows, and its --resume.
# DRY_SIZES="" skips the dry runs.
set -euo pipefail
bin=$(realpath "${1:-./mailshot}")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/mailshot-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$here/examples/newsletter/"{campaign.lua,body.txt,body.html} "$work/"
for n in ${DRY_SIZES-2000 200000}; do
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

# The send journal at scale (--send, but no message is sent: the relay, 127.0.0.1:9, is never
# reached).  RESUME_N rows (default 1,000,000):
#   skipped rows  every row has an invalid address, so each is reported and journalled
#                 "skipped" without the runner ever waiting on the network;
#   resume        --resume --force of that finished run: every row is final in the journal
#                 and is copied into the new report (--force: the bench's script changes).
n=${RESUME_N:-1000000}
cat > "$work/journal.lua" <<'LUA'
local mailshot = require "mailshot"
return mailshot.campaign {
  recipients = "big.csv", from = "news@acme.example", subject = "Hi", text = "Hello",
  send = mailshot.relay { server = "127.0.0.1:9", tls = "none" },
}
LUA
/usr/bin/python3 - "$work/big.csv" "$n" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("email,name\n")
    for i in range(int(sys.argv[2])):
        f.write(f"not-an-address-{i},N{i}\n")
PY
for mode in skipped resume; do
  /usr/bin/python3 - "$bin" "$work" "$n" "$mode" <<'PY'
import resource, subprocess, sys, time
bin, work, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
extra = ["--resume", "--force"] if mode == "resume" else []
t = time.monotonic()
p = subprocess.run([bin, "run", f"{work}/journal.lua", "--send", "--report", f"{work}/j.csv", "--quiet",
                    "--progress", "0", *extra], cwd=work, stdout=subprocess.DEVNULL)
dt = time.monotonic() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
with open(f"{work}/journal.journal", "rb") as f:
    records = sum(1 for _ in f) - 1
with open(f"{work}/j.csv", "rb") as f:
    rows = sum(1 for _ in f) - 1
what = f"{n} skipped rows" if mode == "skipped" else f"resume, {records}-record journal"
print(f"--send, {what}: {dt:6.1f} s, peak RSS {rss:6.1f} MB, {rows} report rows, exit {p.returncode}")
PY
done
