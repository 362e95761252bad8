"""Run test commands a few at a time and report each one whole.

    /usr/bin/python3 tests/run_jobs.py [-j N] [--logs DIR] [--first NAME,...] COMMAND...

Each COMMAND is a shell command (a test module, a Lua test file, a unit test binary).  At most N run at
once; a free slot takes the next command, so a long module does not hold back a half of the list as a
fixed split would.  Commands whose text contains a name given with --first start before the others
(the slowest ones: started last, they would finish last, alone).  Each command's output goes to its own
log in DIR and is printed whole when the command fails; a passing one prints one line with its time.
At the end: the slowest commands, and the exit status is 1 if any command failed.

Why: the valgrind pass is CPU-bound but the integration tests also wait on servers and timers, so 3
commands at once on 2 cores keep both busy.  Every test has its own folder, servers and ports, so
commands share nothing.
"""

import argparse
import os
import re
import subprocess
import sys
import time


def short(command):
    """What the command runs: its last word (a module, a Lua file, a binary)."""
    return command.split()[-1]


def log_name(command):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", command).strip("_")[-120:] + ".log"


def summary_of(path):
    """The 'Ran N tests' / 'OK' lines of a unittest log, else the log's last line (a Lua test's or a unit
    test's count, a fuzz run's DONE line), or ''."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    ran = re.findall(r"^Ran \d+ tests? in [\d.]+s$", text, re.M)
    status = re.findall(r"^(OK.*|FAILED.*)$", text, re.M)
    if ran or status:
        return "; ".join(ran[-1:] + status[-1:])
    last = text.strip().splitlines()[-1:] or [""]
    return last[0][:100]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", type=int, default=2)
    ap.add_argument("--logs", default="build/jobs")
    ap.add_argument("--first", default="", help="comma-separated names of commands to start first")
    ap.add_argument("commands", nargs="+")
    args = ap.parse_args()
    os.makedirs(args.logs, exist_ok=True)

    first = [n for n in args.first.split(",") if n]
    rank = lambda c: next((i for i, n in enumerate(first) if re.search(re.escape(n) + r"(?!\w)", c)), len(first))
    pending = sorted(args.commands, key=rank)        # stable: the given order otherwise
    running, done, failed = {}, [], []
    started_all = time.monotonic()
    while pending or running:
        while pending and len(running) < args.j:
            cmd = pending.pop(0)
            path = os.path.join(args.logs, log_name(short(cmd)))
            out = open(path, "w")
            proc = subprocess.Popen(cmd, shell=True, stdout=out, stderr=subprocess.STDOUT)
            running[proc.pid] = (proc, cmd, path, out, time.monotonic())
        pid, status = os.wait()
        if pid not in running:
            continue
        proc, cmd, path, out, t0 = running.pop(pid)
        out.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        secs = time.monotonic() - t0
        done.append((secs, cmd))
        if proc.returncode == 0:
            print(f"pass {secs:6.1f}s  {short(cmd)}  ({summary_of(path)})", flush=True)
        else:
            failed.append(cmd)
            print(f"FAIL {secs:6.1f}s  {cmd}  (exit {proc.returncode}; log {path}):", flush=True)
            with open(path, errors="replace") as f:
                sys.stdout.write(f.read())
            print(f"---- end of {short(cmd)}", flush=True)
    total = time.monotonic() - started_all
    print(f"{len(done)} commands in {total:.0f}s, {args.j} at once; slowest:")
    for secs, cmd in sorted(done, reverse=True)[:5]:
        print(f"  {secs:6.1f}s  {short(cmd)}")
    if failed:
        print(f"{len(failed)} failed: " + ", ".join(map(short, failed)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
