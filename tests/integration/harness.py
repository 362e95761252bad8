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
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

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
        # cleanups run LIFO even when setUp of a subclass or the test fails
        self.addCleanup(self._cleanup_tmp)
        self.addCleanup(self._cleanup_processes)

    def _cleanup_processes(self):
        for srv in reversed(self._servers):
            srv.stop()
        for p in self._procs:
            _kill_group(p, grace=1.0)

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

    def add_secret(self, secret):
        """Declare a string that must never appear in mailshot's argv."""
        self._secrets.add(secret)

    def run_mailshot(self, *args, env=None, timeout=120, input=None, cwd=None,
                     check_sanitizers=True):
        """Run MAILSHOT with args (cwd defaults to self.tmp); return CompletedProcess (text).

        env entries are added to a copy of os.environ (a value of None removes the variable).
        Passwords go in env, never in args: an arg containing a known AUTH password fails the test.
        On timeout the process group is killed and the test fails with the output so far.
        With check_sanitizers, ASan/UBSan reports in stderr fail the test."""
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
        proc = subprocess.Popen([MAILSHOT, *args], cwd=cwd or self.tmp, env=full_env,
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
        return r

    # convenience assertions
    def assertNoServersLeft(self):
        for srv in self._servers:
            srv.stop()
            self.assertIsNotNone(srv.proc.returncode, f"{srv} still running")
            self.assertFalse(process_group_alive(srv.pid), f"process group of {srv} still alive")
