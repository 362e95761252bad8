#!/usr/bin/python3
"""mailshot.redis figures (make bench): calls per second from 64 tasks sharing one connection (each task
SETs then GETs its own keys, the calls pipelined automatically), plain and TLS, beside redis-benchmark's
figure for the same mix (64 clients, pipelines of 16) when it is installed.  A private redis-server
(tests/integration/harness.py start_redis).  Prints figures (medians of BENCH_RUNS runs); asserts nothing
about speed (shared machines).

    /usr/bin/python3 scripts/bench-redis.py [MAILSHOT]   (default ./mailshot; BENCH_REDIS_CALLS, BENCH_RUNS)
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.integration.harness import start_redis  # noqa: E402

MAILSHOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "mailshot"))
CALLS = int(os.environ.get("BENCH_REDIS_CALLS", "200000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
TASKS = 64

LUA = r'''
local redis, core = require "mailshot.redis", require "mailshot.core"
local calls, tasks = tonumber(os.getenv("CALLS")), tonumber(os.getenv("TASKS"))
local c = assert(redis.connect{ port = tonumber(os.getenv("PORT")), tls = os.getenv("CA") ~= nil,
                                ca_file = os.getenv("CA"), timeout = 60 })
local per, done = calls // tasks // 2, 0
local t0 = core.now()
for t = 1, tasks do
  core.spawn(function()
    for i = 1, per do
      local k = "bench:" .. t .. ":" .. (i % 100)
      assert(c:call("SET", k, i) == "OK")
      assert(c:call("GET", k) == tostring(i))
    end
    done = done + 1
  end)
end
while done < tasks do core.sleep(0.001) end
local s = core.now() - t0
local st = c:stats()
print(("%d %.6f %d"):format(st.requests, s, st.writes))
'''


def mailshot_rate(srv, tls):
    env = dict(os.environ, PORT=str(srv.port), CALLS=str(CALLS), TASKS=str(TASKS))
    if tls:
        env["CA"] = srv.ca_file
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA)
    try:
        p = subprocess.run([MAILSHOT, "exec", f.name], env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        raise SystemExit(f"mailshot exec failed:\n{p.stdout}{p.stderr}")
    requests, seconds, writes = p.stdout.split()
    return int(requests) / float(seconds), int(requests) / int(writes)


def redis_benchmark_rate(srv, tls):
    exe = shutil.which("redis-benchmark")
    if not exe:
        return None
    argv = [exe, "-h", srv.host, "-p", str(srv.port), "-c", str(TASKS), "-P", "16", "-n", str(CALLS // 2),
            "-t", "set,get", "-q"]
    if tls:
        argv += ["--tls", "--cacert", srv.ca_file]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    rates = [float(line.split(":")[1].split()[0]) for line in p.stdout.replace("\r", "\n").splitlines()
             if line.startswith(("SET:", "GET:")) and "requests per second" in line]
    return statistics.mean(rates) if len(rates) == 2 else None


def main():
    print(f"mailshot.redis: {TASKS} tasks on one connection, SET then GET of their own keys, {CALLS} calls a run, "
          f"median of {RUNS}")
    for tls in (False, True):
        work = tempfile.mkdtemp(prefix="mailshot-bench-redis-")
        srv = start_redis(work, tls=tls)
        try:
            ours = [mailshot_rate(srv, tls) for _ in range(RUNS)]
            rate = statistics.median(r for r, _ in ours)
            batch = statistics.median(b for _, b in ours)
            ref = redis_benchmark_rate(srv, tls)
            label = "TLS  " if tls else "plain"
            line = f"  {label}: {rate:10,.0f} calls/s ({batch:.0f} calls per write)"
            if ref:
                line += f"; redis-benchmark -c {TASKS} -P 16, SET/GET mean: {ref:10,.0f} requests/s"
            print(line, flush=True)
        finally:
            srv.stop()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
