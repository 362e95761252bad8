#!/usr/bin/python3
"""mailshot benchmark (make bench): mailshot against Postfix's smtp-sink, side by side with Postfix's
smtp-source, a C load generator that does no templating at all.

For concurrency 1, 8 and 64 it sends N personalized text+HTML messages (a ~1.5 KB body in each, subject,
greeting and the To display name from the CSV) through a relay pointed at smtp-sink twice: with ASCII
names and with international ones (names in Cyrillic, Arabic, CJK, Greek, Hangul, accented Latin... for
two rows in three, and a subject in the recipient's language: RFC 2047 encoded-words in Subject and To,
quoted-printable bodies), and runs `smtp-source -d -s C` with the same count at the international
message's size against the same sink; the three runs interleaved, RUNS times, and the medians printed
side by side with their ratios.  Then: peak RSS at 10,000 and 1,000,000 recipients (and the rate of each), STARTTLS rates
against tests/servers/tls_sink.c (with the sink's own CPU time per message, to show it is not the
bottleneck), the DKIM signing cost, the live progress line's cost (a pseudo-terminal as stderr,
against no progress at all), and the rate limiter over a run at "100/s".

Environment: BENCH_N (default 20000), BENCH_RUNS (3), BENCH_BIG (1000000; 0 skips), BENCH_RATE_SECONDS (60).
Every server listens on 127.0.0.1 only.
"""
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAILSHOT = os.path.join(ROOT, "mailshot")
TLS_SINK = os.path.join(ROOT, "build", "tls_sink")
N = int(os.environ.get("BENCH_N", "20000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
BIG = int(os.environ.get("BENCH_BIG", "1000000"))
RATE_SECONDS = int(os.environ.get("BENCH_RATE_SECONDS", "60"))

BODY = ("Hello {{first_name}},\n\n"
        + "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.\n" * 15
        + "\nBest regards,\nThe Acme team\n")
HTML = ("<html><body><p>Hello {{first_name}},</p>\n"
        + "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.</p>\n" * 14
        + "<p>The Acme team</p></body></html>\n")

CAMPAIGN = """
local mailshot = require "mailshot"
local conns = tonumber(os.getenv "CONNS")
local relay = mailshot.relay {
  server = os.getenv "SINK", tls = os.getenv "TLS" or "none", verify = false,
  max_connections = conns, user = os.getenv "USER_NAME", password = os.getenv "USER_PASSWORD",
}
local rate = os.getenv "RATE"
local key = os.getenv "DKIM_KEY"
return mailshot.campaign {
  recipients = os.getenv "LIST",
  from = "Acme News <news@acme.example>",
  subject = "{{subject}}, {{first_name}}",
  to_name = "{{first_name}} {{last_name}}",
  text = mailshot.template.file "body.txt",
  html = os.getenv "HTML" == "1" and mailshot.template.file "body.html" or nil,
  send = relay,
  concurrency = 3 * conns,       -- pipeline_depth (3) messages per session
  rate = rate and { rate } or nil,
  dkim = key and { domain = "acme.example", selector = "s1", key_file = key,
                   threads = tonumber(os.getenv "DKIM_THREADS") } or nil,
}
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Sink:
    """Postfix's smtp-sink on loopback (PIPELINING, no STARTTLS)."""

    def __init__(self):
        self.port = free_port()
        cmd = ["smtp-sink", "-c", f"127.0.0.1:{self.port}", "1024"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_port(self.port)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait()


# Names as an international list has them: one row in three ASCII, the others in Cyrillic, Arabic,
# CJK, Greek, Hangul, Hebrew, Devanagari, Thai and accented Latin; subjects in the same languages.
INTL_NAMES = [("John", "Smith"), ("Иван", "Петров"), ("José", "García"), ("Mary", "Johnson"),
              ("محمد", "العلي"), ("王", "小明"), ("Peter", "Brown"), ("Γιώργος", "Παπαδόπουλος"),
              ("Ayşe", "Yılmaz"), ("Linda", "Davis"), ("山田", "太郎"), ("François", "Müller"),
              ("James", "Wilson"), ("Ольга", "Смирнова"), ("김", "민준"), ("Anna", "Taylor"),
              ("דוד", "כהן"), ("अमित", "शर्मा"), ("Robert", "Moore"), ("Nguyễn", "Thị Hương"),
              ("สมชาย", "ใจดี")]
INTL_SUBJECTS = ["Наше предложение № {}", "Notre offre n° {} pour vous", "عرضنا رقم {}", "我们的优惠 {}",
                 "Η προσφορά μας {}", "Unser Angebot Nr. {} für Sie", "특별 할인 {}", "Nuestra oferta n.º {}"]


def write_list(path, n, intl=False):
    with open(path, "w") as f:
        f.write("email,first_name,last_name,subject\n")
        for i in range(n):
            if intl:
                first, last = INTL_NAMES[i % len(INTL_NAMES)]
                subject = INTL_SUBJECTS[i % len(INTL_SUBJECTS)].format(i)
                f.write(f"user{i}@example.com,{first},{last},{subject}\n")
            else:
                f.write(f"user{i}@example.com,Name{i},Smith,Our offer number {i}\n")


def list_path(work, n, intl=False):
    return os.path.join(work, f"list-{'intl-' if intl else ''}{n}.csv")


LAST_STDERR = ""                   # of the last run_timed()


def run_timed(cmd, env=None, cwd=None, tty=False):
    """Run cmd; return (wall seconds, peak RSS in MB of that very process, stdout).  With tty, its
    stderr is a pseudo-terminal (mailshot then draws its live progress line there)."""
    import threading
    master = slave = None
    if tty:
        master, slave = os.openpty()
    t = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True,
                         stderr=slave if tty else subprocess.PIPE)
    out_chunks, err_chunks = [], []
    if tty:
        os.close(slave)

        def read_tty(acc=err_chunks):
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:          # EIO: the child closed its end
                    break
                if not chunk:
                    break
                acc.append(chunk.decode(errors="replace"))
            os.close(master)
        readers = [threading.Thread(target=lambda: out_chunks.append(p.stdout.read())),
                   threading.Thread(target=read_tty)]
    else:
        readers = [threading.Thread(target=lambda f=f, acc=acc: acc.append(f.read())) for f, acc in
                   ((p.stdout, out_chunks), (p.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(p.pid, 0)      # this child's own rusage, not the maximum of all children
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    dt = time.monotonic() - t
    out, err = "".join(out_chunks), "".join(err_chunks)
    global LAST_STDERR
    LAST_STDERR = err
    if p.returncode not in (0,):
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {out[-500:]} {err[-1500:]}")
    return dt, usage.ru_maxrss / 1024, out


def mailshot_run(work, sink, conns, n, html=False, tls="none", extra_env=None, live=False, intl=False):
    """One campaign run; live: with its live progress line on a terminal (else none at all); intl: to
    the list with international names."""
    env = dict(os.environ, SINK=sink, CONNS=str(conns), LIST=list_path(work, n, intl),
               HTML="1" if html else "0", TLS=tls)
    env.update(extra_env or {})
    quiet = [] if live else ["--quiet", "--progress", "0"]
    return run_timed([MAILSHOT, "run", os.path.join(work, "bench.lua"), "--send", "--force", *quiet,
                      "--report", os.path.join(work, "report.csv")], env=env, cwd=work, tty=live)


def progress_cost(work, sink):
    """The live progress line (4 refreshes a second on a terminal) against none, runs interleaved."""
    n = 5 * N                      # long enough for the line to be redrawn a dozen times or more
    section(f"progress view: relay to smtp-sink, 64 sessions, {n} messages, median of {max(RUNS, 5)} runs each")
    write_list(os.path.join(work, f"list-{n}.csv"), n)
    quiet, live, redraws = [], [], 0
    for _ in range(max(RUNS, 5)):
        quiet.append(n / mailshot_run(work, sink.address, 64, n)[0])
        dt, _, _ = mailshot_run(work, sink.address, 64, n, live=True)
        live.append(n / dt)
        redraws = LAST_STDERR.count("\r\x1b[K") - 1      # the last one erases the line
    if redraws < 1:
        raise RuntimeError("the live progress line was never drawn: " + LAST_STDERR[-300:])
    q, lv = statistics.median(quiet), statistics.median(live)
    print(f"  no progress     {q:8.0f} msgs/s")
    print(f"  live line       {lv:8.0f} msgs/s  ({(lv / q - 1) * 100:+.1f}%; the last run drew it {redraws} times)")
    os.unlink(os.path.join(work, f"list-{n}.csv"))


def smtp_source(sink, conns, n, size):
    return run_timed(["smtp-source", "-d", "-s", str(conns), "-m", str(n), "-l", str(size),
                      "-f", "news@acme.example", "-t", "user@example.com", sink])


def median_rate(fn, n):
    rates = []
    for _ in range(RUNS):
        dt = fn()[0]
        rates.append(n / dt)
    return statistics.median(rates)


def message_size(work):
    """Mean size of a rendered text+HTML message, ASCII and international ("intl") names, from a dry
    run's outbox of the first 42 rows (two rounds of the names)."""
    sizes = {}
    for intl in (False, True):
        out = os.path.join(work, "outbox-intl" if intl else "outbox-ascii")
        env = dict(os.environ, SINK="127.0.0.1:9", CONNS="1", LIST=list_path(work, 42, intl), HTML="1")
        subprocess.run([MAILSHOT, "run", os.path.join(work, "bench.lua"), "--outbox", out, "--quiet",
                        "--report", os.path.join(work, "dry.csv")], env=env, check=True, capture_output=True)
        files = [os.path.join(out, f) for f in os.listdir(out)]
        sizes["intl" if intl else "ascii"] = round(sum(map(os.path.getsize, files)) / len(files))
    return sizes


def section(title):
    print(f"\n== {title}")
    sys.stdout.flush()


def throughput(work, sink, sizes):
    section(f"relay to smtp-sink: {N} personalized text+HTML messages, ASCII and international names, "
            f"median of {RUNS} runs (msgs/s)")
    print(f"{'conc':>5} {'ascii':>9} {'intl':>9} {'source':>9}   {'ascii/src':>9} {'intl/src':>9} {'intl/ascii':>10}")
    for conns in (1, 8, 64):
        # interleaved runs: a machine that slows down (or speeds up) midway weighs on all three alike
        rates = {"ascii": [], "intl": [], "src": []}
        for _ in range(RUNS):
            rates["ascii"].append(N / mailshot_run(work, sink.address, conns, N, html=True)[0])
            rates["intl"].append(N / mailshot_run(work, sink.address, conns, N, html=True, intl=True)[0])
            rates["src"].append(N / smtp_source(sink.address, conns, N, sizes["intl"])[0])
        ascii, intl, src = (statistics.median(rates[k]) for k in ("ascii", "intl", "src"))
        print(f"{conns:>5} {ascii:>9.0f} {intl:>9.0f} {src:>9.0f}   {ascii / src:>9.2f} {intl / src:>9.2f} "
              f"{intl / ascii:>10.2f}")
        sys.stdout.flush()
    print(f"(source: smtp-source -d -s C -l {sizes['intl']}, the international message's mean size; the ASCII "
          f"one is {sizes['ascii']} bytes; mailshot: C sessions, 3*C messages at once)")


def memory(work, sink):
    section("peak memory, relay to smtp-sink, 64 sessions, text only")
    rows = []
    for n in (10000, BIG):
        if n <= 0:
            continue
        write_list(os.path.join(work, f"list-{n}.csv"), n)
        dt, rss, _ = mailshot_run(work, sink.address, 64, n)
        rows.append((n, dt, rss))
        print(f"{n:>9} recipients: {n / dt:8.0f} msgs/s, peak RSS {rss:6.1f} MB")
        sys.stdout.flush()
        os.unlink(os.path.join(work, f"list-{n}.csv")) if n != N else None
    if len(rows) == 2:
        print(f"rate at {rows[1][0]} vs {rows[0][0]}: {rows[1][0] / rows[1][1] / (rows[0][0] / rows[0][1]) * 100:.0f}%")


def tls(work):
    if not os.access(TLS_SINK, os.X_OK):
        print("(no build/tls_sink: skipped)")
        return
    section(f"STARTTLS + AUTH to tests/servers/tls_sink (OpenSSL), {N} messages, median of {RUNS} runs")
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    for conns in (8, 64):
        rates, cpu = [], []
        for _ in range(RUNS):
            proc = subprocess.Popen([TLS_SINK, "-c", cert, "-k", key, "127.0.0.1:0"], stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)
            port = int(proc.stdout.readline().split()[1])
            dt = mailshot_run(work, f"127.0.0.1:{port}", conns, N, tls="starttls",
                              extra_env={"USER_NAME": "bench", "USER_PASSWORD": "bench"})[0]
            os.killpg(proc.pid, signal.SIGTERM)
            stats = dict(kv.split("=") for kv in proc.stdout.read().split() if "=" in kv)
            proc.wait()
            rates.append(N / dt)
            msgs = int(stats.get("messages", N)) or N
            cpu.append((float(stats.get("cpu_user", 0)) + float(stats.get("cpu_sys", 0))) / msgs * 1e6)
        r = statistics.median(rates)
        c = statistics.median(cpu)
        print(f"{conns:>5} sessions: {r:8.0f} msgs/s; sink CPU {c:.0f} us/msg = {c * r / 1e6 * 100:.0f}% of one core")


def dkim_cost(work, sink):
    """Unsigned against rsa-sha256 and ed25519-sha256 signed on 0 (the event loop itself), 1 and 2 worker
    threads; every configuration once per round, rounds interleaved, medians."""
    runs = max(RUNS, 5)
    section(f"DKIM signing cost: relay to smtp-sink, 64 sessions, {N} messages, median of {runs} interleaved runs")
    keys = {}
    for alg in ("rsa-sha256", "ed25519-sha256"):
        keys[alg] = os.path.join(work, f"{alg}.key")
        if not os.path.exists(keys[alg]):
            subprocess.run([MAILSHOT, "dkim", "keygen", "--selector", "s1", "--domain", "acme.example",
                            "--algorithm", alg, "--out", keys[alg]], check=True, capture_output=True)
    configs = [("unsigned", None, None)] + [(alg, alg, t) for alg in keys for t in (0, 1, 2)]
    rates = {c: [] for c in configs}
    for _ in range(runs):
        for c in configs:
            _, alg, threads = c
            env = {"DKIM_KEY": keys[alg], "DKIM_THREADS": str(threads)} if alg else {}
            rates[c].append(N / mailshot_run(work, sink.address, 64, N, extra_env=env)[0])
    med = {c: statistics.median(r) for c, r in rates.items()}
    base = med[configs[0]]
    print(f"  {'':<16} {'threads':>7} {'msgs/s':>8} {'vs unsigned':>12} {'vs threads=0':>13}")
    print(f"  {'unsigned':<16} {'':>7} {base:8.0f}")
    for c in configs[1:]:
        alg, _, threads = c
        on_loop = med[(alg, alg, 0)]
        print(f"  {alg:<16} {threads:>7} {med[c]:8.0f} {med[c] / base:11.2f}x {med[c] / on_loop:12.2f}x")
    print("  (threads = 0 signs on the event loop, as mailshot did before the signing threads; "
          f"{os.cpu_count()} cores, shared with smtp-sink)")


def rate_limit(work):
    section(f'rate limiter: rate = "100/s" for {RATE_SECONDS} s, receiver timestamps (aiosmtpd)')
    n = 100 * RATE_SECONDS
    write_list(os.path.join(work, f"list-{n}.csv"), n)
    maildir = os.path.join(work, "rate-maildir")
    srv = subprocess.Popen(["/usr/bin/python3", os.path.join(ROOT, "tests", "servers", "smtpd.py"), "--host",
                            "127.0.0.1", "--port", "0", "--maildir", maildir], stdout=subprocess.PIPE, text=True,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    port = int(srv.stdout.readline().split()[1])
    try:
        dt = mailshot_run(work, f"127.0.0.1:{port}", 8, n, extra_env={"RATE": "100/s"})[0]
    finally:
        os.killpg(srv.pid, signal.SIGTERM)
        srv.wait()
    import json
    stamps = sorted(json.load(open(os.path.join(maildir, f)))["received_at"]
                    for f in os.listdir(maildir) if f.endswith(".json"))
    worst, j = 0, 0
    for i in range(len(stamps)):          # the most messages inside any 1-second window
        while stamps[i] - stamps[j] >= 1.0:
            j += 1
        worst = max(worst, i - j + 1)
    print(f"{len(stamps)} messages in {dt:.1f} s; busiest 1-second window: {worst} (limit 100); "
          f"total vs {n}: {(len(stamps) - n) / n * 100:+.2f}%")


def main():
    for tool in ("smtp-sink", "smtp-source"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing (Debian package postfix)")
    work = tempfile.mkdtemp(prefix="mailshot-bench-")
    try:
        with open(os.path.join(work, "bench.lua"), "w") as f:
            f.write(CAMPAIGN)
        with open(os.path.join(work, "body.txt"), "w") as f:
            f.write(BODY)
        with open(os.path.join(work, "body.html"), "w") as f:
            f.write(HTML)
        for intl in (False, True):
            write_list(list_path(work, N, intl), N, intl)
            write_list(list_path(work, 42, intl), 42, intl)
        sizes = message_size(work)
        print(f"mailshot benchmark: {os.cpu_count()} cores, N={N}, {RUNS} runs each")
        sink = Sink()
        try:
            throughput(work, sink, sizes)
            memory(work, sink)
            dkim_cost(work, sink)
            progress_cost(work, sink)
        finally:
            sink.stop()
        tls(work)
        if RATE_SECONDS > 0:
            rate_limit(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
