#!/usr/bin/python3
"""CPU per message in instructions, not seconds: make bench's international text+HTML campaign (the same
script, bodies and names as scripts/bench.py's throughput section) sent to Postfix's smtp-sink at 64
sessions under valgrind's callgrind, which counts every instruction mailshot runs.  Unlike a rate, the
count hardly moves with the machine's load, so a change's effect is measured even on a busy machine
(two runs of the same build differ by about 0.3%).

Two runs: BENCH_N messages (default 2000) and BENCH_SMALL (100).  Printed: the total instructions over
the messages (start-up included: loading the Lua modules, OpenSSL's context...), and the marginal cost
of one message, (total(N) - total(small)) / (N - small), which leaves start-up out.

  /usr/bin/python3 scripts/bench-instructions.py [MAILSHOT]     (default ./mailshot; ascii=1 in the
                                                               environment for the ASCII names)
Environment: BENCH_N, BENCH_SMALL, MAILSHOT_MALLOC (libc: the Lua state on glibc's malloc; default
mimalloc, as make bench runs it), CALLGRIND_OUT (a folder: keep the callgrind.out files there).
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "scripts", "bench.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

N = int(os.environ.get("BENCH_N", "2000"))
SMALL = int(os.environ.get("BENCH_SMALL", "100"))
INTL = os.environ.get("ascii") != "1"


def instructions(mailshot, work, sink, n, keep):
    """Total instructions (callgrind's Ir) of one campaign run of n messages; checks all were sent."""
    out = os.path.join(keep or work, f"callgrind.out.{n}")
    report = os.path.join(work, f"report-{n}.csv")
    env = dict(os.environ, SINK=sink.address, CONNS="64", LIST=bench.list_path(work, n, INTL), HTML="1",
               TLS="none")
    p = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", mailshot, "run",
                        os.path.join(work, "bench.lua"), "--send", "--force", "--quiet", "--progress", "0",
                        "--report", report], env=env, cwd=work, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"mailshot failed ({p.returncode}): {p.stderr[-1500:]}")
    with open(report) as f:
        sent = sum(1 for line in f if ",sent," in line)
    if sent != n:
        sys.exit(f"{sent} of {n} messages sent (report {report})")
    with open(out) as f:
        for line in f:
            m = re.match(r"(summary|totals): (\d+)", line)
            if m:
                return int(m.group(2))
    sys.exit(f"no totals in {out}")


def main():
    mailshot = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "mailshot"))
    for tool in ("valgrind", "smtp-sink"):
        if not shutil.which(tool):
            sys.exit(f"bench-instructions: {tool} is missing")
    keep = os.environ.get("CALLGRIND_OUT")
    work = tempfile.mkdtemp(prefix="mailshot-instr-")
    try:
        with open(os.path.join(work, "bench.lua"), "w") as f:
            f.write(bench.CAMPAIGN)
        with open(os.path.join(work, "body.txt"), "w") as f:
            f.write(bench.BODY)
        with open(os.path.join(work, "body.html"), "w") as f:
            f.write(bench.HTML)
        for n in (N, SMALL):
            bench.write_list(bench.list_path(work, n, INTL), n, INTL)
        sink = bench.Sink()
        try:
            big = instructions(mailshot, work, sink, N, keep)
            small = instructions(mailshot, work, sink, SMALL, keep)
        finally:
            sink.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'international' if INTL else 'ASCII'} names, text+HTML, 64 sessions to smtp-sink, Lua state on "
          f"{os.environ.get('MAILSHOT_MALLOC') or 'mimalloc'}")
    print(f"  {N} messages: {big:,} instructions, {big / N:,.0f} per message (start-up included)")
    print(f"  marginal: {(big - small) / (N - SMALL):,.0f} per message (runs of {N} and {SMALL}); "
          f"start-up about {small - (big - small) / (N - SMALL) * SMALL:,.0f}")


if __name__ == "__main__":
    main()
