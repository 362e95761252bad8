"""Helpers for mailshot's unittest-based integration tests.

Run from the repo root:
    MAILSHOT=build/asan/mailshot /usr/bin/python3 -m unittest discover -s tests/integration -t . -v

Typical test:

    from tests.integration.harness import MailshotTestCase, write_csv, read_report

    class TestSend(MailshotTestCase):
        def test_one(self):
            srv = self.start_smtpd(tls=True, auth={"user": "secret"})
            csv_path = self.path("list.csv")
            write_csv(csv_path, ["email", "name"], [["a@x.test", "A"]])
            r = self.run_mailshot("send", "--list", csv_path, "--port", str(srv.port),
                                  env={"MAILSHOT_PASSWORD": "secret"})
            self.assertEqual(r.returncode, 0, r.stderr)
            msgs = srv.wait_for_messages(1)
            self.assertEqual(msgs[0]["rcpt_tos"], ["a@x.test"])

Every server a test starts is killed (process group, SIGTERM then SIGKILL) when the test ends,
pass or fail.  Servers listen on 127.0.0.1 (or the 127.0.0.x given as host=) only.

DNS (direct delivery): self.start_dns(zone={...}) runs dnsmasq with a test zone (see start_dnsmasq),
self.start_silent_dns() a server that never answers (rcode="SERVFAIL": one that always fails),
dns_query(address, name, qtype) is a tiny client, and self.start_smtpd_many(["127.0.0.2",
"127.0.0.3"]) starts several SMTP servers ("MX hosts") sharing one port.

Postfix: self.start_postfix(relay_port) runs a private Postfix instance (its own config, queue and data
directories in a temporary folder, listening on 127.0.0.1) that relays everything to the aiosmtpd on
relay_port and delivers mail for its bounce domain (b+anything@bounces.acme.example) into one Maildir:
the real DSNs Postfix writes for the rejections it meets.  It needs root (skipped otherwise).

IMAP/POP3 (bounce mailboxes): start_dovecot(workdir) runs a private dovecot with IMAP, IMAPS, POP3 and
POP3S on free loopback ports (srv.add_user, srv.deliver into a Maildir, srv.imap for the test's own
checks; self.start_dovecot() for one that dies with the test).

Redis: self.start_redis(tls=False, password=None, user=None) runs a private redis-server on a free port of
127.0.0.1 (its own folder, no persistence; TLS-only with a make_ca_and_cert leaf; requirepass, or an ACL user
with the default user off): srv.url, srv.ca_file, srv.cli(*args) (redis-cli, the password through
REDISCLI_AUTH), srv.kill() (SIGKILL), srv.restart() (same port, data kept).

Valgrind (`make valgrind`): with MAILSHOT_VALGRIND=1 every mailshot the tests start (run_mailshot, and
Popen(self.mailshot_cmd(...)) for the ones a test drives itself) runs under valgrind (memcheck, full leak
check) on MAILSHOT, which must then be the plain build (./mailshot, not build/asan/mailshot).  Each run
logs to self.tmp/valgrind/valgrind.PID.log; with -q valgrind writes there only what it reports, so any
non-empty log fails the test with its content: right after run_mailshot, and for every other run when
the test ends (after its processes are stopped).  Exit codes are not used for this: tests check
mailshot's own, and some kill it with SIGKILL.  Under valgrind everything is 20-50x slower: a test picks
its load sizes and waits with scaled(native, under_valgrind), and one that cannot run there is skipped
with skip_under_valgrind(reason).  tests/valgrind.supp holds the suppressions (third-party code only).
valgrind looks for memory errors in the C code, and what it can find depends on which C paths run, not
on which Lua-level behaviour a test checks: a test whose C paths (lines and branches) other tests that do
run under valgrind cover as well is marked valgrind_redundant(reason) and skipped there too, unless
MAILSHOT_VALGRIND_ALL=1 (then every test runs, for a full sweep).  scripts/valgrind-coverage.py shows
that the tests left under valgrind cover every C line and branch the whole suite does.
"""

import atexit
import contextlib
import csv
import email
import email.policy
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SYSTEM_PYTHON = "/usr/bin/python3"
SMTPD = os.path.join(REPO_ROOT, "tests", "servers", "smtpd.py")
MAILSHOT = os.path.abspath(os.environ.get("MAILSHOT", os.path.join(REPO_ROOT, "mailshot")))

# MAILSHOT_VALGRIND=1: run every mailshot under valgrind (see the module docstring)
VALGRIND = os.environ.get("MAILSHOT_VALGRIND", "") not in ("", "0")
VALGRIND_SUPPRESSIONS = os.path.join(REPO_ROOT, "tests", "valgrind.supp")
VALGRIND_ARGS = ("-q", "--leak-check=full", "--errors-for-leak-kinds=definite,indirect",
                 "--show-leak-kinds=definite,indirect", "--error-exitcode=99")

READY_TIMEOUT = 10.0
STOP_GRACE = 3.0

SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",          # UBSan
    "ERROR: ThreadSanitizer",
    "SUMMARY: AddressSanitizer",
    "SUMMARY: UndefinedBehaviorSanitizer",
)


# --------------------------------------------------------------------------- small helpers

@contextlib.contextmanager
def tmpdir(prefix="mailshot-test-"):
    """Context manager: a fresh temporary directory, removed afterwards."""
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def free_port(host="127.0.0.1"):
    """A port that nothing listens on right now (bind to port 0, read it, close)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def read_report(path):
    """A CSV report as a list of dicts (csv.DictReader rows)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path, header, rows, lineterminator="\r\n", encoding="utf-8"):
    """Write a CSV file. rows: sequences (in header order) or dicts keyed by header names."""
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f, lineterminator=lineterminator)
        if header is not None:
            w.writerow(header)
        for row in rows:
            if isinstance(row, dict):
                row = [row.get(h, "") for h in header]
            w.writerow(row)
    return path


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll predicate() until it returns something truthy; return it, or raise AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sanitizer_errors(text):
    """Lines of text that look like ASan/UBSan/LSan reports (empty list if none)."""
    return [ln for ln in (text or "").splitlines() if any(m in ln for m in SANITIZER_MARKERS)]


def _read_text(path):
    """A server's log or stderr as text ("" while the file does not exist yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def scaled(native, under_valgrind):
    """native, or under_valgrind when the tests run under valgrind (MAILSHOT_VALGRIND=1).

    For load sizes (recipients, messages) and for waits that give mailshot time to get somewhere;
    never for a bound a test asserts."""
    return under_valgrind if VALGRIND else native


def skip_under_valgrind(reason):
    """Decorator: skip this test (or class) under MAILSHOT_VALGRIND=1, saying why."""
    return unittest.skipIf(VALGRIND, f"not run under valgrind: {reason}")


# MAILSHOT_VALGRIND_ALL=1: run the valgrind_redundant tests under valgrind too
VALGRIND_ALL = os.environ.get("MAILSHOT_VALGRIND_ALL", "") not in ("", "0")


def valgrind_redundant(reason):
    """Decorator: skip this test under MAILSHOT_VALGRIND=1 (unless MAILSHOT_VALGRIND_ALL=1) because the
    tests that do run there cover its C paths; reason names them (scripts/valgrind-coverage.py checks it).
    For tests that cost seconds under valgrind; the ASan pass (make test) still runs every test."""
    def mark(test):
        test.__valgrind_redundant__ = reason      # for scripts/valgrind-coverage.py
        return unittest.skipIf(VALGRIND and not VALGRIND_ALL,
                               f"not run under valgrind: its C paths are covered there by {reason}")(test)
    return mark


_valgrind_checked = {}


def _valgrind_prefix(log_dir):
    """The valgrind command line that runs MAILSHOT and logs to log_dir/valgrind.PID.log."""
    exe = shutil.which("valgrind")
    if exe is None:
        raise AssertionError("MAILSHOT_VALGRIND=1 but valgrind is not installed (apt-get install valgrind)")
    if MAILSHOT not in _valgrind_checked:      # the ASan runtime and valgrind do not mix
        try:
            with open(MAILSHOT, "rb") as f:
                _valgrind_checked[MAILSHOT] = b"__asan_init" not in f.read()
        except OSError:
            _valgrind_checked[MAILSHOT] = True  # a missing binary is reported by the caller
    if not _valgrind_checked[MAILSHOT]:
        raise AssertionError(f"MAILSHOT_VALGRIND=1 needs the plain build, not an ASan one: "
                             f"MAILSHOT={MAILSHOT} (use MAILSHOT=./mailshot)")
    os.makedirs(log_dir, exist_ok=True)
    # env: the Lua state on the C library's allocator, which memcheck tracks (src/main.c), not mimalloc
    argv = ["env", "MAILSHOT_MALLOC=libc", exe, *VALGRIND_ARGS,
            f"--log-file={os.path.join(log_dir, 'valgrind.%p.log')}"]
    if os.path.exists(VALGRIND_SUPPRESSIONS):
        argv.append(f"--suppressions={VALGRIND_SUPPRESSIONS}")
    return argv


def valgrind_reports(log_dir, pid=None):
    """[(path, text)] of the non-empty valgrind logs in log_dir (only PID's with pid=)."""
    try:
        names = sorted(os.listdir(log_dir))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if not (name.startswith("valgrind.") and name.endswith(".log")):
            continue
        if pid is not None and name != f"valgrind.{pid}.log":
            continue
        path = os.path.join(log_dir, name)
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            out.append((path, text))
    return out


def _kill_group(proc, grace=STOP_GRACE):
    """SIGTERM the process group of proc, wait up to grace, then SIGKILL. Always reaps proc."""
    if proc is None:
        return
    pgid = proc.pid  # started with start_new_session=True: pgid == pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # kill whatever is left in the group (the leader or children it forked)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def process_group_alive(pgid):
    """True if any process is still in process group pgid."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------------- certificates

_cert_cache_dir = None
_cert_lock = threading.Lock()


def _cache_dir():
    global _cert_cache_dir
    if _cert_cache_dir is None:
        _cert_cache_dir = tempfile.mkdtemp(prefix="mailshot-certs-")
        atexit.register(shutil.rmtree, _cert_cache_dir, True)
    return _cert_cache_dir


def _openssl(*args, cwd=None):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{r.stderr}")


def _copy_into(files, dest_dir):
    if dest_dir is None:
        return tuple(files)
    os.makedirs(dest_dir, exist_ok=True)
    out = []
    for f in files:
        d = os.path.join(dest_dir, os.path.basename(f))
        if os.path.abspath(d) != os.path.abspath(f):
            shutil.copyfile(f, d)
        out.append(d)
    return tuple(out)


def make_cert(dir=None, cn="localhost", san="IP:127.0.0.1,DNS:localhost"):
    """Self-signed RSA-2048 certificate (2 days). Returns (cert_path, key_path).

    Generated once per process per (cn, san) and copied into dir (if given)."""
    with _cert_lock:
        tag = f"self-{abs(hash((cn, san))):x}"
        base = os.path.join(_cache_dir(), tag)
        cert, key = base + "-cert.pem", base + "-key.pem"
        if not os.path.exists(cert):
            _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                     "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}",
                     "-keyout", key, "-out", cert)
        return _copy_into([cert, key], dir)


def make_ca_and_cert(dir=None, cn="localhost", san="IP:127.0.0.1,DNS:localhost"):
    """A test CA and a leaf certificate signed by it. Returns (ca_cert, leaf_cert, leaf_key).

    The CA is shared by all leaves of the process; a leaf is generated once per (cn, san).
    Use a different san (e.g. "DNS:wrong.test") for hostname-mismatch tests."""
    with _cert_lock:
        d = _cache_dir()
        ca_cert, ca_key = os.path.join(d, "ca-cert.pem"), os.path.join(d, "ca-key.pem")
        if not os.path.exists(ca_cert):
            _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                     "-subj", "/CN=mailshot test CA",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                     "-keyout", ca_key, "-out", ca_cert)
        tag = f"leaf-{abs(hash((cn, san))):x}"
        leaf_cert = os.path.join(d, tag + "-cert.pem")
        leaf_key = os.path.join(d, tag + "-key.pem")
        if not os.path.exists(leaf_cert):
            csr = os.path.join(d, tag + ".csr")
            ext = os.path.join(d, tag + ".ext")
            with open(ext, "w") as f:
                f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                        "keyUsage=critical,digitalSignature,keyEncipherment\n"
                        "extendedKeyUsage=serverAuth\n")
            _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                     "-keyout", leaf_key, "-out", csr)
            _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
                     "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", leaf_cert)
        return _copy_into([ca_cert, leaf_cert, leaf_key], dir)


# --------------------------------------------------------------------------- SMTP server

class SmtpServer:
    """A running tests/servers/smtpd.py process."""

    def __init__(self, proc, host, port, maildir, stderr_path, args):
        self.proc = proc
        self.pid = proc.pid
        self.host = host
        self.port = port
        self.maildir = maildir
        self.stderr_path = stderr_path
        self.args = args

    def __repr__(self):
        return f"<SmtpServer {self.host}:{self.port} pid={self.pid} maildir={self.maildir}>"

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    def messages(self):
        """Stored messages in arrival order: the envelope json dict plus
        'raw' (bytes exactly as received) and 'msg' (email.message.EmailMessage, policy=default)."""
        out = []
        try:
            names = sorted(f for f in os.listdir(self.maildir) if f.endswith(".json"))
        except FileNotFoundError:
            return out
        for name in names:
            base = os.path.join(self.maildir, name[:-5])
            with open(base + ".json", encoding="utf-8") as f:
                meta = json.load(f)
            with open(base + ".eml", "rb") as f:
                raw = f.read()
            meta["raw"] = raw
            meta["msg"] = email.message_from_bytes(raw, policy=email.policy.default)
            meta["file"] = base + ".eml"
            out.append(meta)
        return out

    def message_count(self):
        try:
            return sum(1 for f in os.listdir(self.maildir) if f.endswith(".json"))
        except FileNotFoundError:
            return 0

    def wait_for_messages(self, n, timeout=10.0):
        """Wait until at least n messages are stored; return messages()."""
        wait_for(lambda: self.message_count() >= n, timeout,
                 what=f"{n} messages in {self.maildir} (have {self.message_count()})")
        return self.messages()

    def log_entries(self):
        """session.log as dicts: {'conn': int, 'tls': bool, 'pipelined': bool, 'line': str}."""
        out = []
        try:
            with open(os.path.join(self.maildir, "session.log"), encoding="utf-8") as f:
                for ln in f:
                    conn, flags, line = ln.rstrip("\n").split("\t", 2)
                    fl = set(flags.split(","))
                    out.append({"conn": int(conn), "tls": "tls" in fl,
                                "pipelined": "pipelined" in fl, "line": line})
        except FileNotFoundError:
            pass
        return out

    def log_lines(self):
        """The command lines received, in order (AUTH data masked as ********)."""
        return [e["line"] for e in self.log_entries()]

    def commands(self):
        """Just the command verbs, upper-cased: ['EHLO', 'STARTTLS', 'EHLO', 'AUTH', 'MAIL', ...]."""
        return [e["line"].split(" ", 1)[0].upper() for e in self.log_entries()]

    def connections(self):
        """Number of SMTP connections that sent at least one line."""
        return len({e["conn"] for e in self.log_entries()})

    def stderr(self):
        return _read_text(self.stderr_path)

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        """Stop the server (SIGTERM, SIGKILL after a grace period). Idempotent. Returns exit code."""
        _kill_group(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


def _smtpd_argv(options, workdir, secrets):
    """Translate start_smtpd keyword options into smtpd.py arguments."""
    opts = dict(options)
    argv = []
    cert = opts.pop("cert", None)        # (cert, key) tuple
    tls = opts.pop("tls", False)
    if cert is None and (tls or opts.get("implicit_tls") or opts.get("require_starttls")
                         or opts.get("starttls_inject")):
        cert = make_cert(workdir)
    if cert is not None:
        argv += ["--tls-cert", cert[0], "--tls-key", cert[1]]
    auth = opts.pop("auth", None)
    if auth:
        if isinstance(auth, dict):
            auth = [f"{u}:{p}" for u, p in auth.items()]
        elif isinstance(auth, str):
            auth = [auth]
        for item in auth:
            if isinstance(item, (tuple, list)):
                item = f"{item[0]}:{item[1]}"
            secrets.add(item.partition(":")[2])
            argv += ["--auth", item]
    auth_require_tls = opts.pop("auth_require_tls", None)
    if auth_require_tls is True:
        argv.append("--auth-require-tls")
    elif auth_require_tls is False:
        argv.append("--no-auth-require-tls")
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, tuple):
                v = ":".join(str(x) for x in v)
            argv += [flag, str(v)]
    return argv


def start_smtpd(workdir, host="127.0.0.1", port=0, maildir=None, ready_timeout=READY_TIMEOUT,
                secrets=None, **options):
    """Start tests/servers/smtpd.py; return a SmtpServer once it printed READY.

    Keyword options map to command-line flags (underscores -> dashes):
      tls=True                 offer STARTTLS with make_cert() (implied by implicit_tls,
                               require_starttls, starttls_inject); cert=(cert, key) to choose one
      auth={"user": "pw"}      or ["user:pw", ...] or ("user", "pw") items
      auth_require_tls=True/False/None(default: on iff STARTTLS offered)
      reject_rcpt=[("bad@", 550, "5.1.1 No such user")]  (tuples are joined with ':')
      greeting_code=421, no_ehlo=True, no_pipelining=True, size=1000, delay=["RCPT:2"], ...
    The caller must stop() it (MailshotTestCase does that for you)."""
    if secrets is None:
        secrets = set()
    if maildir is None:
        maildir = tempfile.mkdtemp(prefix="maildir-", dir=workdir)
    os.makedirs(maildir, exist_ok=True)
    argv = [SYSTEM_PYTHON, SMTPD, "--host", host, "--port", str(port), "--maildir", maildir]
    argv += _smtpd_argv(options, workdir, secrets)
    stderr_path = os.path.join(maildir, "smtpd.stderr")
    with open(stderr_path, "wb") as errf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=workdir)
    srv = SmtpServer(proc, host, None, maildir, stderr_path, argv)
    line = b""
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + ready_timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no READY line within {ready_timeout}s")
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                raise RuntimeError(f"server exited (status {proc.poll()}) before READY")
            line += chunk
        sel.close()
        parts = line.decode().split()
        if len(parts) != 2 or parts[0] != "READY":
            raise RuntimeError(f"unexpected first line {line!r}")
        srv.port = int(parts[1])
    except Exception as e:
        srv.stop()
        raise AssertionError(
            f"smtpd did not come up: {e}\nargv: {argv}\n--- stderr ---\n{srv.stderr()}") from None
    return srv


# --------------------------------------------------------------------------- Postfix (a private instance)

POSTFIX = os.environ.get("POSTFIX", "/usr/sbin/postfix")
POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "bounce", "defer", "trace")

# master.cf of the private instance: only the services this setup uses, every one with chroot = n (the
# 5th column), so no copy of /etc files is needed under the queue directory.  The smtpd line is added
# with the instance's own address.  postlog writes maillog_file (Postfix 3.4+, no syslog needed).
_POSTFIX_MASTER_CF = """\
# service  type       private unpriv chroot wakeup maxproc command
pickup     unix       n       -      n      60     1       pickup
cleanup    unix       n       -      n      -      0       cleanup
qmgr       unix       n       -      n      300    1       qmgr
rewrite    unix       -       -      n      -      -       trivial-rewrite
bounce     unix       -       -      n      -      0       bounce
defer      unix       -       -      n      -      0       bounce
trace      unix       -       -      n      -      0       bounce
verify     unix       -       -      n      -      1       verify
flush      unix       n       -      n      1000?  0       flush
proxymap   unix       -       -      n      -      -       proxymap
proxywrite unix       -       -      n      -      1       proxymap
smtp       unix       -       -      n      -      -       smtp
relay      unix       -       -      n      -      -       smtp
showq      unix       n       -      n      -      -       showq
error      unix       -       -      n      -      -       error
retry      unix       -       -      n      -      -       error
discard    unix       -       -      n      -      -       discard
virtual    unix       -       n      n      -      -       virtual
anvil      unix       -       -      n      -      1       anvil
scache     unix       -       -      n      -      1       scache
postlog    unix-dgram n       -      n      -      1       postlogd
"""


def postfix_main_cf(base, relay_port, bounce_domain="bounces.acme.example", mailboxes=("b",),
                    mailbox_uid=65534, mailbox_gid=65534, extra=None, maildir=None):
    """The main.cf text of a private Postfix instance living in base (see start_postfix).
    maildir: the bounce mailbox (default base/mail/bounces).

    Everything Postfix writes is under base (but the Maildir given as maildir); nothing is looked up in
    DNS and the only next hop is [127.0.0.1]:relay_port.  The parameters are documented in postconf(5)
    (Postfix 3.7)."""
    maildir = (maildir or os.path.join(base, "mail", "bounces")).rstrip("/")
    cf = {
        # the 3.6 defaults, so no "backwards-compatible default setting" warnings in the log
        "compatibility_level": "3.6",
        "config_directory": os.path.join(base, "conf"),
        "queue_directory": os.path.join(base, "queue"),
        "data_directory": os.path.join(base, "data"),
        # postlogd (master.cf "postlog") appends here; the path must start with one of the prefixes
        "maillog_file": os.path.join(base, "maillog"),
        "maillog_file_prefixes": base,
        "myhostname": "mta.acme.example",
        "mydomain": "acme.example",
        "myorigin": "$myhostname",
        # nothing is delivered with local(8): the bounce mailbox is a virtual(8) one below
        "mydestination": "",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_peername_lookup": "no",          # no reverse DNS of the client (127.0.0.1)
        # every non-local message goes to the test's aiosmtpd; "[...]" means: no MX lookup, and with
        # smtp_dns_support_level = disabled the host lookup is "native" (an IP address: no lookup at all)
        "relayhost": f"[127.0.0.1]:{relay_port}",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtp_bind_address": "127.0.0.1",
        "smtp_tls_security_level": "none",
        # the bounce mailbox: b@DOMAIN and b+anything@DOMAIN (recipient_delimiter: virtual(8) looks up
        # user+ext@domain, then user@domain) land in one Maildir (the trailing "/" in the map value);
        # the files belong to mailbox_uid (virtual_minimum_uid is 100: not root, not a system user)
        "virtual_mailbox_domains": bounce_domain,
        "virtual_mailbox_base": os.path.dirname(maildir),
        "virtual_mailbox_maps": "inline:{ " + ", ".join(f"{m}@{bounce_domain}={os.path.basename(maildir)}/"
                                                         for m in mailboxes) + " }",
        "virtual_uid_maps": f"static:{mailbox_uid}",
        "virtual_gid_maps": f"static:{mailbox_gid}",
        "recipient_delimiter": "+",
        # short timers: postconf(5) "maximal_queue_lifetime: Specify 0 when mail delivery should be
        # tried only once", so a 4xx reply (mailbox full) is returned at once as a DSN with Action:
        # failed and the 4.x.x Status, as a real MTA does after days; no delay warnings
        "maximal_queue_lifetime": "0",
        "bounce_queue_lifetime": "0",
        "delay_warning_time": "0",
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "biff": "no",
        "smtputf8_enable": "yes",
    }
    cf.update(extra or {})
    return "".join(f"{k} = {v}\n" for k, v in cf.items())


def live_processes_in_group(pgid):
    """Pids of the processes of process group pgid that still run (not zombies).  A daemon's
    processes are children of init once their parent is gone, and init may reap them seconds later:
    until then kill(-pgid, 0) still finds the group."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(name))
    return out


_postfix_running = set()


def _stop_every_postfix():
    """At exit (a test run interrupted between a start and its cleanup): a Postfix master is a daemon,
    not a child of the test process, so nothing else would stop it."""
    for srv in list(_postfix_running):
        srv.stop()


atexit.register(_stop_every_postfix)


class PostfixServer:
    """A running private Postfix instance (see start_postfix)."""

    def __init__(self, base, port, relay_port, bounce_domain, keep=False, maildir=None):
        self.base = base
        self.keep = keep
        self.config_dir = os.path.join(base, "conf")
        self.queue_dir = os.path.join(base, "queue")
        self.host = "127.0.0.1"
        self.port = port
        self.relay_port = relay_port
        self.bounce_domain = bounce_domain
        # the bounce mailbox (a Maildir; virtual(8) creates it and its cur/ new/ tmp/ when missing)
        self.maildir = maildir or os.path.join(base, "mail", "bounces")
        self.log_path = os.path.join(base, "maillog")
        self.master_pid = None
        self.start_seconds = None
        self.stop_seconds = None

    def __repr__(self):
        return f"<PostfixServer {self.address} pid={self.master_pid} base={self.base}>"

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    def log_text(self):
        """Postfix's log (maillog_file)."""
        return _read_text(self.log_path)

    def postfix(self, *args, timeout=30):
        """Run `postfix -c CONFIG_DIR ARGS...` (CompletedProcess, text)."""
        return subprocess.run([POSTFIX, "-c", self.config_dir, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def bounce_files(self):
        """Paths of the messages delivered to the bounce Maildir (new/ and cur/), oldest first."""
        out = []
        for sub in ("new", "cur"):
            d = os.path.join(self.maildir, sub)
            try:
                out += [os.path.join(d, f) for f in os.listdir(d) if not f.startswith(".")]
            except FileNotFoundError:
                pass
        return sorted(out, key=lambda p: (os.stat(p).st_mtime_ns, p))

    def bounces(self):
        """The bounce mailbox's messages as email.message.EmailMessage (policy=default), with .path."""
        out = []
        for p in self.bounce_files():
            with open(p, "rb") as f:
                m = email.message_from_bytes(f.read(), policy=email.policy.default)
            m.path = p
            out.append(m)
        return out

    def queued(self):
        """Queue files still in Postfix's queues (incoming, active, deferred, the bounce logs, ...)."""
        n = 0
        for q in POSTFIX_QUEUES:
            for _root, _dirs, files in os.walk(os.path.join(self.queue_dir, q)):
                n += len(files)
        return n

    def wait_until_idle(self, timeout=10.0):
        """Wait until every queue is empty: every message relayed, and every DSN it caused written
        (the bounce daemon queues the DSN before the returned message leaves the active queue)."""
        wait_for(lambda: self.queued() == 0, timeout,
                 what=f"Postfix's queue to empty ({self.queued()} files left)\n{self.log_text()[-3000:]}")

    def wait_for_bounces(self, n, timeout=10.0):
        """Wait until the bounce Maildir holds at least n messages; return bounces()."""
        wait_for(lambda: len(self.bounce_files()) >= n, timeout,
                 what=f"{n} messages in {self.maildir} (have {len(self.bounce_files())})\n"
                      f"{self.log_text()[-3000:]}")
        return self.bounces()

    def processes(self):
        """Pids of the instance's live processes (its master's process group, zombies left out)."""
        return [] if self.master_pid is None else live_processes_in_group(self.master_pid)

    def running(self):
        return self.master_pid in self.processes()

    def stop(self):
        """`postfix stop`, wait for the master and its daemons to exit, SIGKILL whatever is left of
        its process group (the master is a session leader: its daemons are in its group), then
        remove the folder.  Idempotent."""
        if self.master_pid is None:
            return
        t0 = time.monotonic()
        if self.running():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.postfix("stop", timeout=10)
            deadline = time.monotonic() + STOP_GRACE
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.02)
        deadline = time.monotonic() + STOP_GRACE
        while self.processes() and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.master_pid, signal.SIGKILL)
            time.sleep(0.02)
        self.stop_seconds = time.monotonic() - t0
        self.master_pid = None
        _postfix_running.discard(self)
        self.remove()

    def remove(self):
        """Remove the instance's folder (not with keep=True).  Only once nothing of it runs."""
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


def start_postfix(workdir, relay_port, bounce_domain="bounces.acme.example", mailboxes=("b",),
                  name=None, extra=None, maildir=None, owner=None, keep=False, attempts=3):
    """Start a private Postfix instance (in a new temporary folder, linked as workdir/NAME when name is
    given); return a PostfixServer once it listens.

    It listens on 127.0.0.1:PORT (a free port) and takes mail from 127.0.0.0/8 without AUTH or TLS;
    mail for bounce_domain to one of mailboxes (local parts; LOCAL+anything too) is delivered into one
    Maildir (server.maildir), everything else is relayed to [127.0.0.1]:relay_port (a test aiosmtpd),
    whose 5xx replies Postfix turns into real DSNs to the envelope sender, and whose 4xx replies too
    (maximal_queue_lifetime = 0: one try).  extra: more main.cf parameters.  maildir: deliver there
    instead (an absolute path, e.g. a dovecot user's Maildir, whose parent owner=(uid, gid) can write;
    the files are owner's, default nobody's).

    Its own config_directory, queue_directory, data_directory, log file and Maildir are in that
    folder (removed by stop() unless keep): `postfix -c DIR start` never reads or writes
    /etc/postfix/main.cf nor the system's queue, and a system Postfix running beside it is not
    affected (its own master.lock, queue and port).
    Postfix needs root (its master and delivery agents switch users): the caller skips otherwise.
    The caller must stop() it (MailshotTestCase does)."""
    import pwd
    if os.geteuid() != 0:
        raise unittest.SkipTest("a private Postfix instance needs root (the master and virtual(8) "
                                "switch users); CI runs the tests as root")
    if not os.access(POSTFIX, os.X_OK):
        raise AssertionError(f"{POSTFIX} not found: apt-get install postfix (make deps does)")
    # The base is a short folder of its own in /tmp, not inside workdir: the `postfix` command reaches
    # postlogd through the absolute path QUEUE/public/postlog, and a Unix socket name is limited to 107
    # bytes ("unix_dgram_connect: unix-domain name too long" otherwise); and the postfix and nobody
    # users must get to it (/tmp is 1777, a TMPDIR may be 0700).  workdir/NAME links to it.
    base = tempfile.mkdtemp(prefix="mailshot-pf-", dir="/tmp")
    if name:
        os.symlink(base, os.path.join(workdir, name))
    os.makedirs(os.path.join(base, "conf"))
    os.makedirs(os.path.join(base, "queue"))     # postfix check creates the queues inside it
    # The daemons run as mail_owner (postfix) and virtual(8) as the mailbox owner: they must get
    # through base (mkdtemp makes it 0700) to their directories; 0711 lets them in without listing it.
    os.chmod(base, 0o711)
    uid, gid = owner or (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    if maildir is None:
        mail = os.path.join(base, "mail")
        os.makedirs(mail)
        os.chown(mail, uid, gid)
    srv = PostfixServer(base, None, relay_port, bounce_domain, keep=keep, maildir=maildir)
    last = ""
    for _ in range(attempts):
        port = free_port()
        with open(os.path.join(base, "conf", "main.cf"), "w") as f:
            f.write(postfix_main_cf(base, relay_port, bounce_domain, mailboxes, uid, gid, extra, maildir))
        with open(os.path.join(base, "conf", "master.cf"), "w") as f:
            f.write(f"127.0.0.1:{port} inet n - n - - smtpd\n" + _POSTFIX_MASTER_CF)
        # Postfix reads a main.cf modified in the last second again and again, 300 ms apart, until it
        # is a second old (in case an editor is still writing it): 1.5 s per start.  Date them back.
        past = time.time() - 10
        for f in ("main.cf", "master.cf"):
            os.utime(os.path.join(base, "conf", f), (past, past))
        srv.port = port
        t0 = time.monotonic()
        # `postfix start` runs `postfix check` (creates the queue and data directories with their
        # owners), then master -w, which returns once the master is up: its listener is bound then
        r = srv.postfix("start")
        if r.returncode == 0:
            with open(os.path.join(base, "queue", "pid", "master.pid")) as f:
                srv.master_pid = int(f.read().split()[0])
            srv.start_seconds = time.monotonic() - t0
            _postfix_running.add(srv)
            return srv
        last = f"exit {r.returncode}\n{r.stdout}{r.stderr}\n--- maillog ---\n{srv.log_text()[-3000:]}"
        if "bind" not in last and "Address already in use" not in last:
            break    # not a port taken meanwhile: trying again will not help
    srv.remove()
    raise AssertionError(f"Postfix did not start in {base}: {last}")


# --------------------------------------------------------------------------- DNS: tiny client

DNSMASQ = os.environ.get("DNSMASQ", "/usr/sbin/dnsmasq")

QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28,
          "SRV": 33, "ANY": 255}
QTYPE_NAMES = {v: k for k, v in QTYPES.items()}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class DnsReply:
    """A parsed DNS response (see dns_query_full)."""

    def __init__(self, id, flags, rcode, question, answers, authority, additional, raw):
        self.id = id
        self.flags = flags
        self.rcode = rcode                # "NOERROR", "NXDOMAIN", ... ("RCODE<n>" if unknown)
        self.question = question          # [(qtype_name, name)]
        self.answers = answers            # [(type_name, owner, ttl, data)]
        self.authority = authority
        self.additional = additional
        self.raw = raw

    @property
    def aa(self):
        return bool(self.flags & 0x0400)

    @property
    def tc(self):
        return bool(self.flags & 0x0200)

    def __repr__(self):
        return (f"<DnsReply {self.rcode} an={self.answers} ns={self.authority} "
                f"ar={self.additional}>")


def _parse_address(address, default_port=53):
    """'127.0.0.1:53', '[::1]:53', '::1', ('127.0.0.1', 53) -> (host, port)."""
    if isinstance(address, (tuple, list)):
        return address[0], int(address[1])
    address = str(address)
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if address.count(":") == 1:
        host, _, port = address.partition(":")
        return host, int(port)
    return address, default_port


def _format_address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dns_encode_name(name):
    import struct
    name = name.rstrip(".")
    out = b""
    if name:
        for label in name.split("."):
            b = label.encode("idna") if not label.isascii() else label.encode("ascii")
            if not 0 < len(b) < 64:
                raise ValueError(f"bad label in {name!r}")
            out += struct.pack("B", len(b)) + b
    return out + b"\0"


def dns_build_query(name, qtype, qid=None, rd=True):
    """Bytes of a one-question query (class IN). qtype: 'MX' or a number."""
    import random
    import struct
    if qid is None:
        qid = random.randrange(65536)
    qt = QTYPES[qtype.upper()] if isinstance(qtype, str) else int(qtype)
    header = struct.pack("!HHHHHH", qid, 0x0100 if rd else 0, 1, 0, 0, 0)
    return header + dns_encode_name(name) + struct.pack("!HH", qt, 1)


def _read_name(msg, off):
    """(name, offset after the name) with compression; the root is returned as '.'."""
    labels = []
    end = None
    seen = 0
    while True:
        if off >= len(msg):
            raise ValueError("name runs past the end of the message")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            seen += 1
            if seen > 64:
                raise ValueError("compression loop")
            continue
        if n & 0xC0:
            raise ValueError("bad label type")
        off += 1
        if n == 0:
            break
        labels.append(msg[off:off + n].decode("ascii", "replace"))
        off += n
    return (".".join(labels) if labels else "."), (end if end is not None else off)


def _parse_rdata(msg, rtype, off, rdlen):
    import socket
    import struct
    rd = msg[off:off + rdlen]
    if rtype == 1 and rdlen == 4:
        return socket.inet_ntop(socket.AF_INET, rd)
    if rtype == 28 and rdlen == 16:
        return socket.inet_ntop(socket.AF_INET6, rd)
    if rtype == 15:
        return struct.unpack("!H", rd[:2])[0], _read_name(msg, off + 2)[0]
    if rtype in (2, 5, 12):
        return _read_name(msg, off)[0]
    if rtype == 16:
        parts, i = [], 0
        while i < len(rd):
            n = rd[i]
            parts.append(rd[i + 1:i + 1 + n].decode("utf-8", "replace"))
            i += 1 + n
        return "".join(parts)
    if rtype == 6:
        mname, o = _read_name(msg, off)
        rname, o = _read_name(msg, o)
        return (mname, rname) + struct.unpack("!IIIII", msg[o:o + 20])
    if rtype == 33:
        prio, weight, port = struct.unpack("!HHH", rd[:6])
        return prio, weight, port, _read_name(msg, off + 6)[0]
    return rd


def dns_parse_message(msg):
    """Parse a DNS message (bytes) into a DnsReply."""
    import struct
    if len(msg) < 12:
        raise ValueError(f"short DNS message ({len(msg)} bytes)")
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
    off = 12
    question = []
    for _ in range(qd):
        name, off = _read_name(msg, off)
        qt, _qc = struct.unpack("!HH", msg[off:off + 4])
        off += 4
        question.append((QTYPE_NAMES.get(qt, str(qt)), name))
    sections = []
    for count in (an, ns, ar):
        recs = []
        for _ in range(count):
            name, off = _read_name(msg, off)
            rtype, _rclass, ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
            off += 10
            if rtype != 41:  # skip OPT pseudo-records
                recs.append((QTYPE_NAMES.get(rtype, str(rtype)), name, ttl,
                             _parse_rdata(msg, rtype, off, rdlen)))
            off += rdlen
        sections.append(recs)
    rc = flags & 0xF
    return DnsReply(qid, flags, RCODES.get(rc, f"RCODE{rc}"), question, *sections, raw=msg)


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("DNS server closed the TCP connection")
        buf += chunk
    return buf


def dns_query_full(address, name, qtype, timeout=2.0, tcp=False):
    """Send one query to address ('IP:PORT', '[::1]:PORT' or (ip, port)); return a DnsReply.

    UDP by default, retried over TCP if the reply is truncated.  Raises TimeoutError (socket.timeout)
    if nothing answers within timeout seconds.  Replies with another id are ignored."""
    import random
    import socket
    import struct
    host, port = _parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    qid = random.randrange(65536)
    query = dns_build_query(name, qtype, qid)
    deadline = time.monotonic() + timeout
    if tcp:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))
            s.sendall(struct.pack("!H", len(query)) + query)
            s.settimeout(max(0.001, deadline - time.monotonic()))
            (n,) = struct.unpack("!H", _recv_exact(s, 2))
            return dns_parse_message(_recv_exact(s, n))
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.send(query)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"no DNS reply from {address} within {timeout}s")
            s.settimeout(left)
            data = s.recv(65535)   # ConnectionRefusedError if nothing listens on the port
            if len(data) >= 2 and struct.unpack("!H", data[:2])[0] == qid:
                break
    reply = dns_parse_message(data)
    if reply.tc:
        return dns_query_full(address, name, qtype, max(0.1, deadline - time.monotonic()), tcp=True)
    return reply


def dns_query(address, name, qtype, timeout=2.0, tcp=False):
    """(rcode, answers) for one query; answers are the answer-section records of type qtype:
        MX   -> (preference, host, ttl)   host without trailing dot; a null MX is (0, '.', ttl)
        A    -> (ip, ttl)    AAAA -> (ip, ttl)  (ip as socket.inet_ntop prints it: '::1')
        TXT  -> (text, ttl)  (character-strings concatenated)
        other types -> (data, ttl)
    rcode is a string: 'NOERROR', 'NXDOMAIN', 'SERVFAIL', 'REFUSED', ...
    NODATA is ('NOERROR', []).  Raises TimeoutError if no reply (see dns_query_full)."""
    reply = dns_query_full(address, name, qtype, timeout=timeout, tcp=tcp)
    want = qtype.upper() if isinstance(qtype, str) else QTYPE_NAMES.get(qtype, str(qtype))
    out = []
    for rtype, _owner, ttl, data in reply.answers:
        if rtype != want:
            continue
        if rtype == "MX":
            out.append((data[0], data[1], ttl))
        else:
            out.append((data, ttl))
    return reply.rcode, out


# --------------------------------------------------------------------------- DNS: dnsmasq

_QUERY_LOG_RE = None
PROBE_NAME = "harness-probe.invalid"    # readiness probe; hidden from DnsServer.queries()


def free_common_port(hosts=("127.0.0.1",), tcp=True, udp=False, attempts=50):
    """A port number that is free (bindable) for TCP and/or UDP on every host in hosts."""
    import socket
    last = None
    for _ in range(attempts):
        socks = []
        try:
            port = 0
            for h in hosts:
                fam = socket.AF_INET6 if ":" in h else socket.AF_INET
                kinds = ([socket.SOCK_STREAM] if tcp else []) + ([socket.SOCK_DGRAM] if udp else [])
                for kind in kinds:
                    s = socket.socket(fam, kind)
                    socks.append(s)
                    s.bind((h, port))
                    port = s.getsockname()[1]
            return port
        except OSError as e:
            last = e
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no port free on all of {hosts}: {last}")


class DnsServer:
    """A running dnsmasq serving a test zone (see start_dnsmasq)."""

    def __init__(self, proc, host, port, workdir, log_path, stderr_path, argv, zone):
        self.proc = proc
        self.pid = proc.pid
        self.host = host
        self.port = port
        self.workdir = workdir
        self.log_path = log_path
        self.stderr_path = stderr_path
        self.argv = argv
        self.zone = zone
        self._query_offset = 0

    def __repr__(self):
        return f"<DnsServer {self.address} pid={self.pid}>"

    @property
    def address(self):
        """'127.0.0.1:PORT' ('[::1]:PORT' for IPv6), the form c-ares' *_ports_csv takes."""
        return _format_address(self.host, self.port)

    def log_text(self):
        return _read_text(self.log_path)

    def stderr(self):
        return _read_text(self.stderr_path)

    def _all_queries(self):
        import re
        global _QUERY_LOG_RE
        if _QUERY_LOG_RE is None:
            _QUERY_LOG_RE = re.compile(r"\bquery\[([^\]]+)\] (\S+) from (\S+)")
        out = []
        for ln in self.log_text().splitlines():
            m = _QUERY_LOG_RE.search(ln)
            if m and m.group(2).rstrip(".").lower() != PROBE_NAME:
                out.append((m.group(1), m.group(2)))
        return out

    def queries(self):
        """[(qtype, name)] received since start (or the last reset_queries()), in order, e.g.
        [('MX', 'a.test'), ('A', 'mx1.a.test')].  Unknown types appear as 'type=NN'.
        The harness' readiness probe is not listed."""
        return self._all_queries()[self._query_offset:]

    def reset_queries(self):
        """Forget the queries seen so far (queries() then lists only later ones)."""
        self._query_offset = len(self._all_queries())

    def wait_for_queries(self, n, timeout=5.0):
        """Wait until queries() has at least n entries; return it."""
        wait_for(lambda: len(self.queries()) >= n, timeout,
                 what=f"{n} DNS queries at {self.address} (have {self.queries()})")
        return self.queries()

    def query(self, name, qtype, **kw):
        """dns_query against this server."""
        return dns_query(self.address, name, qtype, **kw)

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        """Stop dnsmasq (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        _kill_group(self.proc)
        return self.proc.returncode


def _conf_quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _txt_chunks(text):
    """Split text into character-strings of at most 255 bytes (UTF-8)."""
    out, cur = [], ""
    for ch in text:
        if len((cur + ch).encode("utf-8")) > 255:
            out.append(cur)
            cur = ""
        cur += ch
    out.append(cur)
    return out


def dnsmasq_zone_conf(zone):
    """dnsmasq configuration-file lines for a zone dict (see start_dnsmasq)."""
    zone = dict(zone or {})
    lines = []
    ttl = zone.pop("ttl", 300)
    if ttl is not None:
        lines.append(f"local-ttl={int(ttl)}")
    for d in zone.pop("local", ("test", "example", "invalid")):
        lines.append(f"local=/{d.strip('.')}/")
    for dom, addr in zone.pop("forward", ()):
        h, p = _parse_address(addr)
        lines.append(f"server=/{dom.strip('.')}/{h}#{p}")
    for dom, host, pref in zone.pop("mx", ()):
        lines.append(f"mx-host={dom},{host.rstrip('.') or '.'},{int(pref)}")
    for dom in zone.pop("null_mx", ()):
        lines.append(f"mx-host={dom},.,0")
    for key in ("a", "aaaa"):
        for rec in zone.pop(key, ()):
            name, ips = rec[0], rec[1]
            rttl = f",{int(rec[2])}" if len(rec) > 2 and rec[2] is not None else ""
            for ip in ([ips] if isinstance(ips, str) else ips):
                lines.append(f"host-record={name},{ip}{rttl}")
    for name, text in zone.pop("txt", ()):
        texts = [text] if isinstance(text, str) else list(text)
        chunks = [c for t in texts for c in _txt_chunks(t)]
        lines.append(f"txt-record={name}," + ",".join(_conf_quote(c) for c in chunks))
    for alias, target in zone.pop("cname", ()):
        lines.append(f"cname={alias},{target}")
    if zone.get("extra_args") is not None:
        zone.pop("extra_args")
    if zone:
        raise ValueError(f"unknown zone keys: {sorted(zone)}")
    return lines


def start_dnsmasq(workdir, zone=None, port=0, host="127.0.0.1", ready_timeout=READY_TIMEOUT,
                  extra_args=(), attempts=8):
    """Start dnsmasq on host:port serving zone; return a DnsServer once it answers a query.

    zone (dict, every key optional; written to workdir/dnsmasq-zone.conf):
      "mx":      [(domain, host, preference), ...]          mx-host=domain,host,pref
      "null_mx": [domain, ...]                               mx-host=domain,.,0  (RFC 7505)
      "a":       [(name, "127.0.0.2"[, ttl]), ...]           host-record=name,ip[,ttl]
      "aaaa":    [(name, "::1"[, ttl]), ...]                 (ip may also be a list of ips)
      "txt":     [(name, "text" or ["str1", "str2"]), ...]   txt-record=name,"text"  (any text;
                          strings over 255 bytes are split into several character-strings)
      "cname":   [(alias, target), ...]                      cname= (target must be local data)
      "forward": [(domain, "IP:PORT"), ...]                  server=/domain/IP#PORT: queries for
                          names under domain go to that server (e.g. a SilentDnsServer, or one
                          started with rcode="SERVFAIL")
      "ttl":     300      local-ttl: TTL of every answer from local data (default here 300;
                          dnsmasq's own default is 0).  A 3rd element of an "a"/"aaaa" tuple
                          overrides it for that record (MX/TXT/CNAME always use local-ttl).
      "local":   ("test", "example", "invalid")  local=/d/: domains answered from local data only:
                          a name there with no record at all -> NXDOMAIN; a name with some record
                          but none of the asked type -> NODATA (NOERROR, empty answer, no SOA).
                          Names outside these domains without a record of the asked type get
                          REFUSED (there is no upstream).
      "extra_args": [...]  more dnsmasq command-line options, verbatim (same as extra_args=).
    port=0 picks a port free for UDP and TCP (retried if dnsmasq then fails to bind it).
    dnsmasq runs with --no-daemon (no fork, no pid file, no privilege drop: works as root and as
    non-root), in its own process group, logging queries to workdir/dnsmasq-PORT.log.
    The caller must stop() it (MailshotTestCase.start_dns does that for you)."""
    os.makedirs(workdir, exist_ok=True)
    conf_path = os.path.join(workdir, "dnsmasq-zone.conf")
    with open(conf_path, "w", encoding="utf-8") as f:
        f.write("".join(ln + "\n" for ln in dnsmasq_zone_conf(zone)))
    extra = list((zone or {}).get("extra_args", ())) + list(extra_args)
    last_err = ""
    argv = []
    for _ in range(attempts if port == 0 else 1):
        p = port or free_common_port((host,), tcp=True, udp=True)
        log_path = os.path.join(workdir, f"dnsmasq-{p}.log")
        stderr_path = os.path.join(workdir, f"dnsmasq-{p}.stderr")
        argv = [DNSMASQ, "--no-daemon", f"--conf-file={conf_path}", "--pid-file=",
                "--bind-interfaces", f"--listen-address={host}", f"--port={p}",
                "--no-resolv", "--no-hosts", "--no-poll",
                "--log-queries", f"--log-facility={log_path}", *extra]
        with open(stderr_path, "wb") as errf:
            proc = subprocess.Popen(argv, stdout=errf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=workdir)
        srv = DnsServer(proc, host, p, workdir, log_path, stderr_path, argv, zone)
        deadline = time.monotonic() + ready_timeout
        while proc.poll() is None:
            try:
                dns_query(srv.address, PROBE_NAME, "A", timeout=0.2)
                return srv
            except OSError:      # timeout, or connection refused while not yet bound
                pass
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        srv.stop()
        last_err = srv.stderr()
        if "in use" not in last_err.lower():
            break
    with open(conf_path, encoding="utf-8") as f:
        conf = f.read()
    raise AssertionError(f"dnsmasq did not come up on {_format_address(host, port)}\n"
                         f"argv: {argv}\n--- {conf_path} ---\n{conf}--- output ---\n{last_err}")


# --------------------------------------------------------------------------- DNS: silent server

def _dns_error_reply(query, rcode):
    """A reply to query (bytes) with no records and the given rcode ('SERVFAIL' or a number)."""
    import struct
    rc = rcode if isinstance(rcode, int) else {v: k for k, v in RCODES.items()}[rcode.upper()]
    _qid, qflags, qd = struct.unpack("!HHH", query[:6])
    end = 12
    if qd:
        end = _read_name(query, 12)[1] + 4
    flags = 0x8000 | (qflags & 0x7900) | 0x0080 | (rc & 0xF)   # QR, opcode+RD copied, RA
    return query[:2] + struct.pack("!HHHHH", flags, 1 if qd else 0, 0, 0, 0) + query[12:end]


class SilentDnsServer:
    """Receives DNS queries over UDP and TCP and never answers (a background thread).

    With rcode="SERVFAIL" (or "REFUSED", 2, ...) it answers every query at once with that rcode
    and no records instead of staying silent."""

    def __init__(self, host="127.0.0.1", port=0, rcode=None):
        import socket
        self.host = host
        self.rcode = rcode
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        last = None
        for _ in range(20 if port == 0 else 1):
            p = port or free_common_port((host,), tcp=True, udp=True)
            u = socket.socket(fam, socket.SOCK_DGRAM)
            t = socket.socket(fam, socket.SOCK_STREAM)
            try:
                u.bind((host, p))
                t.bind((host, p))
                t.listen(16)
                break
            except OSError as e:
                last = e
                u.close()
                t.close()
        else:
            raise RuntimeError(f"silent DNS server cannot bind {host}:{port}: {last}")
        self.port = p
        self._udp, self._tcp = u, t
        self._lock = threading.Lock()
        self._queries = []          # (transport, qtype, name)
        self._conns = {}
        self._tcp_connections = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"silent-dns-{p}", daemon=True)
        self._thread.start()

    def __repr__(self):
        return f"<SilentDnsServer {self.address}>"

    @property
    def address(self):
        return _format_address(self.host, self.port)

    def _record(self, transport, data):
        """Note one query; return the reply bytes to send (None: stay silent)."""
        import struct
        reply = None
        try:
            q = dns_parse_message(data).question
            qtype, name = q[0] if q else ("?", "?")
            if self.rcode is not None:
                reply = _dns_error_reply(data, self.rcode)
        except (ValueError, IndexError, UnicodeError, struct.error):
            qtype, name = "?", "?"
        with self._lock:
            self._queries.append((transport, qtype, name))
        return reply

    def _run(self):
        import struct
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "listen")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in sel.select():
                    kind = key.data
                    if kind == "stop":
                        return
                    if kind == "udp":
                        try:
                            data, peer = self._udp.recvfrom(65535)
                        except OSError:
                            continue
                        reply = self._record("udp", data)
                        if reply is not None:
                            with contextlib.suppress(OSError):
                                self._udp.sendto(reply, peer)
                    elif kind == "listen":
                        try:
                            c, _ = self._tcp.accept()
                        except OSError:
                            continue
                        c.setblocking(False)
                        self._conns[c] = b""
                        with self._lock:
                            self._tcp_connections += 1
                        sel.register(c, selectors.EVENT_READ, "conn")
                    else:
                        c = key.fileobj
                        try:
                            chunk = c.recv(65535)
                        except OSError:
                            chunk = b""
                        if not chunk:
                            sel.unregister(c)
                            c.close()
                            self._conns.pop(c, None)
                            continue
                        buf = self._conns[c] + chunk
                        while len(buf) >= 2:
                            (n,) = struct.unpack("!H", buf[:2])
                            if len(buf) < 2 + n:
                                break
                            reply = self._record("tcp", buf[2:2 + n])
                            buf = buf[2 + n:]
                            if reply is not None:
                                c.setblocking(True)
                                with contextlib.suppress(OSError):
                                    c.sendall(struct.pack("!H", len(reply)) + reply)
                                c.setblocking(False)
                        self._conns[c] = buf
        finally:
            for c in list(self._conns):
                c.close()
            self._conns.clear()
            sel.close()

    def queries(self):
        """[(qtype, name)] received so far (UDP and TCP), in order."""
        with self._lock:
            return [(qt, n) for _t, qt, n in self._queries]

    def queries_received(self, transport=None):
        """Number of DNS queries received (transport: None for all, 'udp' or 'tcp')."""
        with self._lock:
            return sum(1 for t, _qt, _n in self._queries if transport in (None, t))

    def tcp_connections(self):
        with self._lock:
            return self._tcp_connections

    def wait_for_queries(self, n, timeout=5.0):
        wait_for(lambda: self.queries_received() >= n, timeout,
                 what=f"{n} queries at silent DNS {self.address}")
        return self.queries()

    def running(self):
        return self._thread.is_alive()

    def stop(self):
        """Stop the thread and close the sockets. Idempotent."""
        if self._stop_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            self._thread.join(5)
            for fd in (self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._stop_w = None
            self._udp.close()
            self._tcp.close()


def start_silent_dns(host="127.0.0.1", port=0, rcode=None):
    """A SilentDnsServer on host:port (port 0: free for UDP and TCP). Caller must stop() it.
    rcode="SERVFAIL" makes it answer every query with that rcode instead of staying silent."""
    return SilentDnsServer(host, port, rcode)


# --------------------------------------------------------------------------- several SMTP servers

def start_smtpd_many(workdir, hosts, port=0, attempts=5, **options):
    """Start one smtpd per host in hosts (e.g. 127.0.0.2, 127.0.0.3), all on the same port.

    Returns (servers, port).  port=0 picks one free on all hosts (retried if taken meanwhile).
    Options as for start_smtpd (each server gets its own maildir).  On failure every server
    started here is stopped."""
    hosts = list(hosts)
    last = None
    for _ in range(attempts if port == 0 else 1):
        p = port or free_common_port(hosts, tcp=True)
        servers = []
        try:
            for h in hosts:
                servers.append(start_smtpd(workdir, host=h, port=p, **options))
            return servers, p
        except AssertionError as e:
            last = e
            for s in servers:
                s.stop()
    raise AssertionError(f"could not start smtpd on {hosts} with one port: {last}")


# --------------------------------------------------------------------------- IMAP/POP3 server (dovecot)

DOVECOT = "/usr/sbin/dovecot"


def _dovecot_conf(workdir, ports, cert, key, ssl, mail_uid, mail_gid, internal_user, internal_group, login_user,
                  extra_conf):
    """The text of a private dovecot.conf: everything under workdir, nothing from /etc/dovecot."""
    listeners = {"imap": [], "pop3": []}
    for name, port in ports.items():
        proto = name.rstrip("s")
        ssl_line = "    ssl = yes\n" if name.endswith("s") else ""
        listeners[proto].append(f"  inet_listener {name} {{\n    address = 127.0.0.1\n    port = {port}\n{ssl_line}  }}\n")
    # without root there is no chroot (dovecot's login and anvil processes chroot by default)
    chroot = "" if os.getuid() == 0 else "  chroot =\n"
    ssl_conf = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n" if ssl else "ssl = no\n"
    return (
        f"base_dir = {workdir}/run\n"
        f"state_dir = {workdir}/state\n"
        f"instance_name = mailshot-test-{os.path.basename(workdir)}-{ports['imap']}\n"
        f"log_path = {workdir}/dovecot.log\n"
        f"info_log_path = {workdir}/dovecot.log\n"
        "protocols = imap pop3\n"
        "listen = 127.0.0.1\n"
        + ssl_conf +
        # the client decides whether a password may travel in the clear (mailshot refuses by default)
        "disable_plaintext_auth = no\n"
        "auth_mechanisms = plain login\n"
        "auth_verbose = yes\n"
        "auth_failure_delay = 0\n"        # a wrong-password test need not wait 2 s
        f"default_internal_user = {internal_user}\n"
        f"default_internal_group = {internal_group}\n"
        f"default_login_user = {login_user}\n"
        "first_valid_uid = 1\n"
        "first_valid_gid = 0\n"
        "passdb {\n  driver = passwd-file\n"
        f"  args = scheme=PLAIN username_format=%u {workdir}/users/%u\n}}\n"
        "userdb {\n  driver = passwd-file\n"
        f"  args = username_format=%u {workdir}/users/%u\n"
        f"  default_fields = uid={mail_uid} gid={mail_gid} home={workdir}/home/%u\n}}\n"
        "mail_location = maildir:~/Maildir\n"
        "pop3_uidl_format = %08Xu%08Xv\n"
        # nor the next logins from 127.0.0.1: no auth penalty (it delays them up to 15 s after failures)
        "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n" + chroot + "}\n"
        "service imap-login {\n" + "".join(listeners["imap"]) + chroot + "}\n"
        "service pop3-login {\n" + "".join(listeners["pop3"]) + chroot + "}\n"
        + extra_conf)


class DovecotServer:
    """A private dovecot (IMAP, IMAPS, POP3, POP3S on 127.0.0.1) started by start_dovecot."""

    def __init__(self, proc, workdir, ports, ca_cert, mail_uid, mail_gid, ssl):
        self.proc = proc
        self.pid = proc.pid
        self.workdir = workdir
        self.ports = ports            # {"imap": n, "imaps": n, "pop3": n, "pop3s": n} (no *s without ssl)
        self.ca_cert = ca_cert        # the CA that signed the server's certificate (None without ssl)
        self.mail_uid, self.mail_gid = mail_uid, mail_gid
        self.ssl = ssl
        self.users_dir = os.path.join(workdir, "users")
        self.log_path = os.path.join(workdir, "dovecot.log")

    def __repr__(self):
        return f"<dovecot pid={self.pid} ports={self.ports}>"

    def url(self, scheme="imaps", mailbox="INBOX"):
        """imaps://127.0.0.1:PORT/INBOX (pop3/pop3s: no mailbox)."""
        base = f"{scheme}://127.0.0.1:{self.ports[scheme]}"
        return base + "/" if scheme.startswith("pop3") else f"{base}/{mailbox}"

    def add_user(self, user, password):
        """Add a user: its own passwd-file, users/USER (with one shared file, users appended within
        the same second were refused: dovecot notices a changed passwd-file by its mtime); returns
        the user's Maildir."""
        if not user.replace("-", "").replace("_", "").isalnum():
            raise ValueError("user: letters, digits, - and _ only")
        if ":" in password or "\n" in password:
            raise ValueError("password must not contain ':' or a line break")
        with open(os.path.join(self.users_dir, user), "w", encoding="utf-8") as f:
            f.write(f"{user}:{{PLAIN}}{password}::::::\n")
        home = os.path.join(self.workdir, "home", user)
        maildir = os.path.join(home, "Maildir")
        for d in (home, maildir, *(os.path.join(maildir, s) for s in ("cur", "new", "tmp"))):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chown(d, self.mail_uid, self.mail_gid)
        return maildir

    def maildir(self, user):
        return os.path.join(self.workdir, "home", user, "Maildir")

    def deliver(self, user, raw, seen=False, name=None):
        """Put one message (bytes or str) straight into user's Maildir (new/, or cur/ flagged seen),
        as an MTA's local delivery would; owned by the mail uid.  Returns the file's path."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        md = self.maildir(user)
        _deliver_counter[0] += 1
        base = name or f"{time.time_ns()}.M{_deliver_counter[0]}P{os.getpid()}.mailshot-test"
        tmp = os.path.join(md, "tmp", base)
        with open(tmp, "wb") as f:
            f.write(raw)
        os.chown(tmp, self.mail_uid, self.mail_gid)
        dest = os.path.join(md, "cur", base + ":2,S") if seen else os.path.join(md, "new", base)
        os.rename(tmp, dest)
        return dest

    def imap(self, user, password):
        """A logged-in imaplib client over plain IMAP on loopback (for the tests' own checks);
        the caller logs out (or uses it as a context manager)."""
        import imaplib
        c = imaplib.IMAP4("127.0.0.1", self.ports["imap"], timeout=10)
        c.login(user, password)
        return c

    def log_text(self):
        return _read_text(self.log_path)

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        """Stop dovecot and every process it forked (its process group). Idempotent."""
        _kill_group(self.proc)
        return self.proc.returncode


_deliver_counter = [0]


def _dovecot_users():
    """(internal_user, internal_group, login_user, mail_uid, mail_gid): see start_dovecot."""
    import grp
    import pwd
    if os.getuid() != 0:
        me = pwd.getpwuid(os.getuid()).pw_name
        return me, grp.getgrgid(os.getgid()).gr_name, me, os.getuid(), os.getgid()
    for name in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise AssertionError(f"user {name!r} is missing: install dovecot-core (it creates dovecot and dovenull)")
    try:
        nobody = pwd.getpwnam("nobody")
        return "dovecot", "dovecot", "dovenull", nobody.pw_uid, nobody.pw_gid
    except KeyError:
        raise AssertionError("user 'nobody' is missing: dovecot will not serve mail as root")


def _make_traversable(path):
    """Give others search (x) permission on path and its ancestors that we own: the mail processes
    run as another uid and must reach workdir (mkdtemp makes folders 0700)."""
    path = os.path.abspath(path)
    while True:
        st = os.stat(path)
        if st.st_uid == os.getuid() and not st.st_mode & 0o001:
            os.chmod(path, (st.st_mode & 0o7777) | 0o001)
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def start_dovecot(workdir, ssl=True, ready_timeout=READY_TIMEOUT, attempts=5, extra_conf=""):
    """Start a private dovecot on 127.0.0.1 and return a DovecotServer once every port accepts.

    Four listeners on free ports, srv.ports = {"imap", "imaps", "pop3", "pop3s"} (ssl=False: no
    TLS at all, so no STARTTLS either: only "imap" and "pop3").  Its certificate is a leaf of
    make_ca_and_cert (srv.ca_cert verifies it; IP:127.0.0.1 in its subjectAltName).  Users:
    srv.add_user(name, password) (a passwd-file per user, PLAIN scheme, read at each login: a shared
    server gives each test its own user and Maildir); messages: srv.deliver(user, raw)
    into the Maildir, or IMAP APPEND with srv.imap(user, password).  extra_conf: more dovecot.conf
    lines (e.g. "imap_capability = IMAP4rev1 UIDPLUS" to hide MOVE).

    The recipe (dovecot 2.3, Debian 12): `dovecot -F -c workdir/dovecot.conf`, in its own process
    group, with base_dir, state_dir, the log (workdir/dovecot.log), the passwd-files, homes and
    Maildirs all under workdir, so nothing of /etc/dovecot or /var is used and several run at once.
    As root (CI, these machines): the login processes run as `dovenull` and dovecot's internal ones
    as `dovecot` (both created by the dovecot-core package), and mail is served as `nobody`:
    dovecot refuses uid 0 for mail, so the homes are chowned to nobody and workdir and its
    ancestors get o+x so that uid can reach them.  As another user everything runs as that user
    (default_internal_user/group and default_login_user are that user and its group, and the login
    and anvil processes do not chroot; checked with setpriv as nobody).
    It starts in about 60 ms here (median of 7; the first start of a process also makes the
    certificates, about 1 s): start it per test class, or per test when a test needs its own
    configuration.  stop() kills the process group (the master, its login, auth and mail processes)."""
    workdir = os.path.abspath(workdir)
    for d in ("run", "state", "home", "users"):
        os.makedirs(os.path.join(workdir, d), exist_ok=True)
    internal_user, internal_group, login_user, mail_uid, mail_gid = _dovecot_users()
    if os.getuid() == 0:
        _make_traversable(workdir)
        os.chown(os.path.join(workdir, "home"), mail_uid, mail_gid)
    ca_cert = cert = key = None
    if ssl:
        ca_cert, cert, key = make_ca_and_cert(os.path.join(workdir, "tls"))
    conf_path = os.path.join(workdir, "dovecot.conf")
    last = ""
    for _ in range(attempts):
        names = ("imap", "imaps", "pop3", "pop3s") if ssl else ("imap", "pop3")
        ports = {}
        while len(set(ports.values())) < len(names):
            ports = {n: free_port() for n in names}
        with open(conf_path, "w", encoding="utf-8") as f:
            f.write(_dovecot_conf(workdir, ports, cert, key, ssl, mail_uid, mail_gid,
                                  internal_user, internal_group, login_user, extra_conf))
        stderr_path = os.path.join(workdir, "dovecot.stderr")
        with open(stderr_path, "wb") as errf:
            proc = subprocess.Popen([DOVECOT, "-F", "-c", conf_path], stdout=errf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=workdir)
        srv = DovecotServer(proc, workdir, ports, ca_cert, mail_uid, mail_gid, ssl)
        deadline = time.monotonic() + ready_timeout
        pending = set(ports.values())
        import socket
        while proc.poll() is None and pending and time.monotonic() < deadline:
            for p in list(pending):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", p), timeout=0.2):
                    pending.discard(p)
            if pending:
                time.sleep(0.01)
        if not pending and proc.poll() is None:
            return srv
        srv.stop()
        last = _read_text(stderr_path) + srv.log_text()
        if "in use" not in last.lower():
            break
    raise AssertionError(f"dovecot did not come up (ports {ports})\n--- {conf_path} ---\n"
                         f"{_read_text(conf_path)}--- output and log ---\n{last}")


# --------------------------------------------------------------------------- Redis

REDIS_SERVER = os.environ.get("REDIS_SERVER", "/usr/bin/redis-server")
REDIS_CLI = os.environ.get("REDIS_CLI", "/usr/bin/redis-cli")


class RedisServer:
    """A running private redis-server (start_redis).  .host, .port, .url ("redis://[user@]127.0.0.1:PORT/0",
    "rediss://..." with TLS), .ca_file (TLS: the test CA that signed its certificate), .user, .password,
    .stop(), .kill() (SIGKILL), .restart() (same port, data kept), .cli(*args) -> stdout."""

    def __init__(self, workdir, port, tls, password, user, conf_path):
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port
        self.tls = tls
        self.password = password
        self.user = user
        self.conf_path = conf_path
        self.ca_file = os.path.join(workdir, "tls", "ca-cert.pem") if tls else None
        self.log_path = os.path.join(workdir, "redis.log")
        self.proc = None
        self.pid = None

    def __repr__(self):
        return f"<RedisServer {self.url} pid={self.pid}>"

    @property
    def url(self):
        who = f"{self.user}@" if self.user else ""
        return f"{'rediss' if self.tls else 'redis'}://{who}{self.host}:{self.port}/0"

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    def log_text(self):
        return _read_text(self.log_path)

    def _start(self, ready_timeout=READY_TIMEOUT):
        with open(os.path.join(self.workdir, "redis.stderr"), "ab") as errf:
            self.proc = subprocess.Popen([REDIS_SERVER, self.conf_path], stdout=errf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.workdir)
        self.pid = self.proc.pid
        deadline = time.monotonic() + ready_timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            r = self._cli_run("PING", timeout=2)
            if r.returncode == 0 and r.stdout.strip() == "PONG":   # not LOADING: the data is back too
                return
            time.sleep(0.02)
        out = self.log_text() + _read_text(os.path.join(self.workdir, "redis.stderr"))
        self.stop()
        raise AssertionError(f"redis-server did not come up on {self.address}\n--- output ---\n{out}")

    def _cli_run(self, *args, timeout=10):
        argv = [REDIS_CLI, "-h", self.host, "-p", str(self.port), "--no-auth-warning"]
        if self.tls:
            argv += ["--tls", "--cacert", self.ca_file]
        if self.user:
            argv += ["--user", self.user]
        env = dict(os.environ)
        env.pop("REDISCLI_AUTH", None)
        if self.password:
            env["REDISCLI_AUTH"] = self.password      # never on redis-cli's argv
        return subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True, env=env,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def cli(self, *args, timeout=10):
        """Run redis-cli against this server (password through REDISCLI_AUTH); returns its stdout."""
        r = self._cli_run(*args, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"redis-cli {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r.stdout

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        _kill_group(self.proc)

    def kill(self):
        """SIGKILL: the server dies at once, as on a crash (its clients see their connections reset)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self):
        """Stop (saving the data to its folder's dump.rdb) and start again on the same port."""
        if self.running():
            self.cli("SHUTDOWN", "SAVE")
            self.proc.wait(timeout=10)
        self._start()


def start_redis(workdir, tls=False, password=None, user=None, ready_timeout=READY_TIMEOUT, attempts=5,
                extra_conf=""):
    """Start a private redis-server on 127.0.0.1 and return a RedisServer once it answers PING.

    A free port, its own folder (workdir: redis.conf, redis.log, dump.rdb on restart), protected mode
    on, no persistence (save "", appendonly no) unless extra_conf says otherwise.  tls=True: TLS only
    (tls-port; no plain port), with a leaf of make_ca_and_cert (IP:127.0.0.1 and DNS:localhost):
    srv.ca_file verifies it.  password: requirepass, or with user= an ACL user (every command, every
    key) while the default user is off.  The password is written in the 0600 redis.conf only, never on
    a command line.  The caller must stop() it (MailshotTestCase.start_redis does that for you)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if user and not password:
        raise ValueError("start_redis: user= needs password=")
    conf_path = os.path.join(workdir, "redis.conf")
    last = ""
    for _ in range(attempts):
        port = free_port()
        lines = ["bind 127.0.0.1", "protected-mode yes", f"dir {workdir}", f"logfile {workdir}/redis.log",
                 'save ""', "appendonly no", "daemonize no", "databases 16"]
        if tls:
            ca, cert, key = make_ca_and_cert(os.path.join(workdir, "tls"))
            lines += ["port 0", f"tls-port {port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                      f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
        else:
            lines.append(f"port {port}")
        if user:
            lines += ["user default off", f"user {user} on >{password} ~* &* +@all"]
        elif password:
            lines.append(f"requirepass {password}")
        fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n" + extra_conf + "\n")
        srv = RedisServer(workdir, port, tls, password, user, conf_path)
        try:
            srv._start(ready_timeout)
            return srv
        except AssertionError as e:
            last = str(e)
            if "in use" not in last.lower():
                break
    raise AssertionError(last)


# --------------------------------------------------------------------------- TestCase

class MailshotTestCase(unittest.TestCase):
    """Base class: self.tmp is a fresh directory; servers started here die with the test."""

    keep_tmp = bool(os.environ.get("MAILSHOT_KEEP_TMP"))

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix=f"mailshot-{self._testMethodName}-")
        self._servers = []
        self._procs = []
        self._secrets = set()
        self._valgrind_seen = set()
        # cleanups run LIFO even when setUp of a subclass or the test fails:
        # stop processes, then read their valgrind logs, then remove self.tmp
        self.addCleanup(self._cleanup_tmp)
        if VALGRIND:
            self.addCleanup(self._check_valgrind_logs)
        self.addCleanup(self._cleanup_processes)

    def _cleanup_processes(self):
        for srv in reversed(self._servers):
            srv.stop()
        for p in self._procs:
            _kill_group(p, grace=1.0)

    @property
    def valgrind_log_dir(self):
        return os.path.join(self.tmp, "valgrind")

    def _check_valgrind_logs(self, pid=None, what="a mailshot run of this test"):
        """Fail the test with every non-empty valgrind log not reported yet (pid=: that run's only)."""
        bad = [(p, t) for p, t in valgrind_reports(self.valgrind_log_dir, pid) if p not in self._valgrind_seen]
        if bad:
            self._valgrind_seen.update(p for p, _ in bad)
            self.fail(f"valgrind reported errors in {what}:\n" +
                      "\n".join(f"--- {p} ---\n{t}" for p, t in bad))

    def mailshot_cmd(self, *args):
        """The command list that runs MAILSHOT with args: [MAILSHOT, *args], or under
        MAILSHOT_VALGRIND=1 the same under valgrind, logging to self.tmp/valgrind/ (checked when the
        test ends).  For tests that start mailshot with subprocess.Popen themselves."""
        args = [str(a) for a in args]
        if not VALGRIND:
            return [MAILSHOT, *args]
        return [*_valgrind_prefix(self.valgrind_log_dir), MAILSHOT, *args]

    def _cleanup_tmp(self):
        if self.keep_tmp:
            sys.stderr.write(f"\n[kept {self.tmp}]\n")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *parts):
        """A path inside self.tmp."""
        return os.path.join(self.tmp, *parts)

    def start_smtpd(self, **options):
        """Start a test SMTP server (see harness.start_smtpd for options); returns SmtpServer."""
        srv = start_smtpd(self.tmp, secrets=self._secrets, **options)
        self._servers.append(srv)
        return srv

    def start_smtpd_many(self, hosts, **options):
        """Start one test SMTP server per host, all on the same port (harness.start_smtpd_many).
        Returns (servers, port); the servers die with the test."""
        servers, port = start_smtpd_many(self.tmp, hosts, secrets=self._secrets, **options)
        self._servers.extend(servers)
        return servers, port

    def start_postfix(self, relay_port, **kw):
        """Start a private Postfix instance relaying to 127.0.0.1:relay_port (harness.start_postfix);
        returns PostfixServer.  Its folder is linked as self.tmp/postfix-N; it is stopped (and the folder
        removed, unless MAILSHOT_KEEP_TMP is set) when the test ends."""
        n = sum(1 for s in self._servers if isinstance(s, PostfixServer))
        srv = start_postfix(self.tmp, relay_port, name=f"postfix-{n}", keep=self.keep_tmp, **kw)
        self._servers.append(srv)
        return srv

    def start_dns(self, zone=None, **kw):
        """Start dnsmasq serving zone (see harness.start_dnsmasq); returns DnsServer.
        It runs in self.tmp/dns-N and dies with the test."""
        n = sum(1 for s in self._servers if isinstance(s, DnsServer))
        srv = start_dnsmasq(os.path.join(self.tmp, f"dns-{n}"), zone, **kw)
        self._servers.append(srv)
        return srv

    def start_dovecot(self, **kw):
        """Start a private dovecot (harness.start_dovecot) in self.tmp/dovecot-N; it dies with the test.
        For one server shared by a test class, call harness.start_dovecot in setUpClass instead."""
        n = sum(1 for s in self._servers if isinstance(s, DovecotServer))
        srv = start_dovecot(os.path.join(self.tmp, f"dovecot-{n}"), **kw)
        self._servers.append(srv)
        return srv

    def start_redis(self, **kw):
        """Start a private redis-server (harness.start_redis) in self.tmp/redis-N; it dies with the test.
        A password given here is also declared a secret (never in mailshot's argv)."""
        n = sum(1 for s in self._servers if isinstance(s, RedisServer))
        if kw.get("password"):
            self.add_secret(kw["password"])
        srv = start_redis(os.path.join(self.tmp, f"redis-{n}"), **kw)
        self._servers.append(srv)
        return srv

    def start_silent_dns(self, **kw):
        """A DNS server that receives queries and never answers (SilentDnsServer: .address,
        .queries_received(), .stop()); stopped when the test ends."""
        srv = start_silent_dns(**kw)
        self.addCleanup(srv.stop)
        return srv

    def add_secret(self, secret):
        """Declare a string that must never appear in mailshot's argv."""
        self._secrets.add(secret)

    def run_mailshot(self, *args, env=None, timeout=None, input=None, cwd=None,
                     check_sanitizers=True):
        """Run MAILSHOT with args (cwd defaults to self.tmp); return CompletedProcess (text).

        env entries are added to a copy of os.environ (a value of None removes the variable).
        Passwords go in env, never in args: an arg containing a known AUTH password fails the test.
        On timeout the process group is killed and the test fails with the output so far.
        With check_sanitizers, ASan/UBSan reports in stderr fail the test.  Under MAILSHOT_VALGRIND=1
        anything valgrind reported for this run does.  timeout: 120 s by default, 600 s under valgrind."""
        args = [str(a) for a in args]
        for a in args:
            for s in self._secrets:
                if s and s in a:
                    self.fail(f"a password appears in mailshot's argv ({a!r}); pass it via env")
        if not os.access(MAILSHOT, os.X_OK):
            self.fail(f"mailshot binary not found or not executable: {MAILSHOT} (set MAILSHOT=...)")
        full_env = dict(os.environ)
        full_env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1")
        full_env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = str(v)
        if timeout is None:
            timeout = scaled(120, 600)
        proc = subprocess.Popen(self.mailshot_cmd(*args), cwd=cwd or self.tmp, env=full_env,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self._procs.append(proc)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, grace=0.5)
            out, err = proc.communicate()
            self.fail(f"mailshot {' '.join(args)} timed out after {timeout}s\n"
                      f"--- stdout ---\n{out}\n--- stderr ---\n{err}")
        finally:
            # reap any children it left in its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        r = subprocess.CompletedProcess([MAILSHOT, *args], proc.returncode, out, err)
        if check_sanitizers:
            bad = sanitizer_errors(err)
            if bad:
                self.fail(f"sanitizer report from mailshot {' '.join(args)}:\n{err}")
        if VALGRIND:
            self._check_valgrind_logs(proc.pid, f"mailshot {' '.join(args)}")
        return r

    # convenience assertions
    def assertNoServersLeft(self):
        for srv in self._servers:
            srv.stop()
            self.assertIsNotNone(srv.proc.returncode, f"{srv} still running")
            self.assertFalse(process_group_alive(srv.pid), f"process group of {srv} still alive")
