#!/usr/bin/python3
"""`mailshot bounces` figures (make bench): messages per second over a Maildir of DSNs, and the peak memory
(max RSS) for 50 MB messages in a Maildir, an mbox and on standard input, which must stay near the
--max-bytes cap (10 MiB by default) plus the interpreter, whatever the message's size.  Prints figures;
asserts nothing about speed (shared machines).

    /usr/bin/python3 scripts/bench-bounces.py [MAILSHOT]   (default ./mailshot)
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.integration.test_bounces import dsn, maildir  # noqa: E402  (the tests' DSN writer)

MAILSHOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "mailshot"))


def run(args, stdin=None):
    """Run mailshot under /usr/bin/time (a child of this big Python process would inherit its peak RSS
    in ru_maxrss: Linux keeps the high-water mark across exec); -> (seconds, max RSS in MiB)."""
    out = tempfile.mktemp(prefix="mailshot-bench-time-")
    t = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out, MAILSHOT, *args], stdin=stdin,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    s = time.monotonic() - t
    if p.returncode not in (0, 1):
        sys.exit(f"mailshot {' '.join(args)} failed: {p.stderr.decode(errors='replace')}")
    with open(out) as f:
        kb = int(f.read().split()[-1])
    os.remove(out)
    return s, kb / 1024


def main():
    d = tempfile.mkdtemp(prefix="mailshot-bench-bounces-")
    try:
        n = 2000
        maildir(os.path.join(d, "many"), [dsn(f"u{i}@example.org", "4.2.2" if i % 2 else "5.1.1", n=i)
                                          for i in range(n)])
        s, rss = run(["bounces", os.path.join(d, "many"), "--suppress", os.path.join(d, "s1.txt"),
                      "--report", os.path.join(d, "r1.csv")])
        print(f"bounces: {n} DSNs in a Maildir: {s:.2f} s, {n / s:.0f} messages/s, max RSS {rss:.0f} MiB")

        big = dsn("big@example.org", n=1).replace("<orig.1@acme.example>\n\n",
                                                  "<orig.1@acme.example>\n\n" + ("x" * 999 + "\n") * 50000, 1)
        junk = "Subject: junk\nFrom: MAILER-DAEMON@x.example\n\n" + ("y" * 999 + "\n") * 50000
        maildir(os.path.join(d, "big"), [big, junk])
        maildir(os.path.join(d, "big2"), [big, junk])
        s, rss = run(["bounces", os.path.join(d, "big"), "--suppress", os.path.join(d, "s2.txt"),
                      "--report", os.path.join(d, "r2.csv")])
        print(f"bounces: Maildir, a 50 MB DSN and a 50 MB unreadable message: {s:.2f} s, max RSS {rss:.0f} MiB")
        mbox = os.path.join(d, "big.mbox")
        with open(mbox, "w") as f:
            f.write("From a Thu Dec  3 10:00:00 2026\n" + big + "\nFrom b Thu Dec  3 10:00:00 2026\n" + junk)
        s, rss = run(["bounces", mbox, "--suppress", os.path.join(d, "s3.txt"), "--report", os.path.join(d, "r3.csv")])
        print(f"bounces: mbox, the same two messages: {s:.2f} s, max RSS {rss:.0f} MiB")
        eml = os.path.join(d, "junk.eml")
        with open(eml, "w") as f:
            f.write(junk)
        with open(eml, "rb") as f:
            s, rss = run(["bounces", "-", "--suppress", os.path.join(d, "s4.txt"),
                          "--report", os.path.join(d, "r4.csv")], stdin=f)
        print(f"bounces: stdin, the 50 MB unreadable message (spooled, quarantined whole): {s:.2f} s, "
              f"max RSS {rss:.0f} MiB")
        s, rss = run(["bounces", os.path.join(d, "big2"), "--suppress", os.path.join(d, "s5.txt"),
                      "--report", os.path.join(d, "r5.csv"), "--max-bytes", "1048576"])
        print(f"bounces: Maildir with --max-bytes 1048576: {s:.2f} s, max RSS {rss:.0f} MiB")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
