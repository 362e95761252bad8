#!/bin/bash
# bench-memory.sh [BINARY] - peak memory (RSS) of a dry run of the example campaign over 2,000 and
# 200,000 generated recipients.  The CSV is read as a stream, so the two should be within a few MB.
# Prints one line per size: rows, seconds, messages/s, peak RSS.  Then the same for the send
# journal: a --send run of RESUME_N (default 1,000,000) skipped rows, and its --resume.  Last, a DKIM-signed
# international --send to Postfix's smtp-sink: INTL_N (default 1,000,000; 0 skips) recipients whose names
# mix scripts, signed with INTL_DKIM (rsa-sha256, the slow signer that keeps the signing queue fullest, or
# ed25519-sha256) on the default signing threads.
# DRY_SIZES="" skips the dry runs; RESUME_N=0 the journal runs.
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
if [ "$n" -gt 0 ]; then
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
fi

# 1,000,000 international recipients, DKIM on, sent to smtp-sink at 64 sessions (192 messages in flight):
# the CSV is read as a stream, each message is rendered (RFC 2047 subject and To:, quoted-printable text and
# HTML), signed on the worker threads and sent; nothing may grow with the number of recipients.
n=${INTL_N:-1000000}
alg=${INTL_DKIM:-rsa-sha256}
if [ "$n" -gt 0 ]; then
  if ! command -v smtp-sink >/dev/null; then echo "international --send: skipped (no smtp-sink: Debian package postfix)"; exit 0; fi
  cat > "$work/intl.lua" <<'LUA'
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SINK", tls = "none", max_connections = 64 }
return mailshot.campaign {
  recipients = "intl.csv", from = "Acme Nachrichten <news@acme.example>",
  subject = "Ihr Angebot, {{first_name}}: 20 % Rabatt für Sie", to_name = "{{first_name}} {{last_name}}",
  text = mailshot.template.file "body.txt", html = mailshot.template.file "body.html",
  dkim = { domain = "acme.example", selector = "s1", key_file = "dkim.key" },
  send = relay,
}
LUA
  "$bin" dkim keygen --selector s1 --domain acme.example --algorithm "$alg" --out "$work/dkim.key" >/dev/null
  /usr/bin/python3 - "$work/intl.csv" "$n" <<'PY'
import sys
# half the names are not ASCII: Cyrillic, Arabic, CJK, Greek, Devanagari, accented Latin
first = ["Anna", "John", "Maria", "Peter", "Zoë", "José", "Дмитрий", "Ольга", "محمد", "فاطمة", "王芳", "李伟",
         "Γιώργος", "प्रिया", "Łukasz", "Ærøskøbing"]
last = ["Smith", "Müller", "Иванов", "الحسن", "陈", "Παπαδόπουλος", "शर्मा", "Nowak"]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    f.write("email,first_name,last_name\n")
    for i in range(int(sys.argv[2])):
        f.write(f"user{i}@example.com,{first[i % len(first)]},{last[i % len(last)]}\n")
PY
  port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  user=(); [ "$(id -u)" = 0 ] && user=(-u nobody)
  smtp-sink "${user[@]}" -c "127.0.0.1:$port" 1024 >/dev/null 2>&1 &
  sink=$!
  trap 'kill $sink 2>/dev/null; rm -rf "$work"' EXIT
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  /usr/bin/python3 - "$bin" "$work" "$n" "$alg" "127.0.0.1:$port" <<'PY'
import os, subprocess, sys, time
bin, work, n, alg, sink = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
t = time.monotonic()
p = subprocess.Popen([bin, "run", f"{work}/intl.lua", "--send", "--report", f"{work}/intl-report.csv", "--quiet",
                      "--progress", "0"], cwd=work, env=dict(os.environ, SINK=sink), stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
dt = time.monotonic() - t
with open(f"{work}/intl-report.csv", "rb") as f:
    sent = sum(1 for line in f if b",sent," in line)
print(f"--send, {n} international recipients, DKIM {alg}: {dt:6.1f} s, {n / dt:7.0f} msg/s, "
      f"peak RSS {usage.ru_maxrss / 1024:6.1f} MB, {sent} sent, exit {os.waitstatus_to_exitcode(status)}")
PY
fi
