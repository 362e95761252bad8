#!/usr/bin/python3
"""The cost of cluster mode (make bench): the same campaign sent to Postfix's smtp-sink by one mailshot
without --cluster, by one with --cluster (a private redis-server on loopback), and by three workers with
--cluster together; RUNS times interleaved, the medians printed with their ratios.

The target (issue 15): three workers on this machine together within 10% of one worker's rate, the
machine being the limit (three workers, Redis and the sink share its cores: three workers cannot be
faster than one here, and must not be much slower).

The last line runs the three with cluster.read_ahead 16 x the concurrency: blocks of that many lines
(the default is 1.5 x the concurrency), so fewer calls to hand them out, and longer stretches of the file
that each worker skips; a worker killed with kill -9 leaves its blocks' unsent rows to the others, so the
size costs nothing then.

Environment: BENCH_CLUSTER_N (recipients, default 30000), BENCH_RUNS (3), BENCH_CONCURRENCY (24).
Every server listens on 127.0.0.1 only.
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAILSHOT = os.path.join(ROOT, "mailshot")
N = int(os.environ.get("BENCH_CLUSTER_N", "30000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "24"))

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SINK", tls = "none", max_connections = 4 }
return mailshot.campaign {
  recipients = "list.csv", from = "Acme News <news@acme.example>", subject = "Hello {{name}}",
  text = "Hello {{name}},\\n\\n" .. ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\\n"):rep(20),
  send = relay, concurrency = %d, name = os.getenv "NAME",
  cluster = { read_ahead = tonumber(os.getenv "READ_AHEAD") },
}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port}")


def run_workers(d, sink, redis_url, n_workers, tag, read_ahead=None):
    """n_workers mailshot processes at once (no --cluster when redis_url is None) -> msgs/s overall."""
    procs = []
    env = dict(os.environ, SINK=sink, NAME=tag)
    if read_ahead:
        env["READ_AHEAD"] = str(read_ahead)
    t0 = time.monotonic()
    for i in range(n_workers):
        argv = [MAILSHOT, "run", os.path.join(d, "c.lua"), "--send", "--progress", "0",
                "--report", os.path.join(d, f"{tag}-w{i}.csv")]
        if redis_url:
            argv += ["--cluster", redis_url, "--worker", f"w{i}"]
        else:
            argv += ["--force"]
        procs.append(subprocess.Popen(argv, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"mailshot failed ({p.returncode}):\n{out}")
    return N / (time.monotonic() - t0)


def main():
    for tool in ("smtp-sink", "redis-server"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (apt-get install postfix redis-server)")
    d = tempfile.mkdtemp(prefix="mailshot-bench-cluster-")
    procs = []
    try:
        with open(os.path.join(d, "list.csv"), "w") as f:
            f.write("email,name\n")
            for i in range(N):
                f.write(f"user{i}@example.com,Name {i}\n")
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN % CONCURRENCY)
        sink_port, redis_port = free_port(), free_port()
        procs.append(subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "1000"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", d],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(sink_port)
        wait_port(redis_port)
        sink, url = f"127.0.0.1:{sink_port}", f"redis://127.0.0.1:{redis_port}/0"
        big = 16 * CONCURRENCY
        rates = {"one, no cluster": [], "one, --cluster": [], "three, --cluster": [],
                 f"three, read_ahead {big}": []}
        for r in range(RUNS):
            rates["one, no cluster"].append(run_workers(d, sink, None, 1, f"plain{r}"))
            rates["one, --cluster"].append(run_workers(d, sink, url, 1, f"one{r}"))
            rates["three, --cluster"].append(run_workers(d, sink, url, 3, f"three{r}"))
            rates[f"three, read_ahead {big}"].append(run_workers(d, sink, url, 3, f"big{r}", read_ahead=big))
        base = statistics.median(rates["one, no cluster"])
        print(f"mailshot cluster overhead: {N} recipients to smtp-sink, concurrency {CONCURRENCY}, "
              f"median of {RUNS} runs ({os.cpu_count()} cores)")
        for name, rs in rates.items():
            m = statistics.median(rs)
            print(f"  {name:22s} {m:8.0f} msgs/s   ({m / base:5.2f} x one without cluster)   runs: "
                  + " ".join(f"{x:.0f}" for x in rs))
        three = statistics.median(rates["three, --cluster"])
        one = statistics.median(rates["one, --cluster"])
        for what, ref in (("one --cluster worker", one), ("one process without --cluster", base)):
            verdict = "within" if three >= 0.9 * ref else "NOT within"
            print(f"  three workers together: {three / ref:.2f} x {what}: {verdict} the 10% target")
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
