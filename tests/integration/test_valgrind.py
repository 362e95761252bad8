"""The plain (non-ASan) build under valgrind: a dry run, a STARTTLS+AUTH send with a failure, a check.
Any memory error or leak makes valgrind exit 99."""
import os
import shutil
import subprocess
import unittest

from tests.integration.harness import (MailshotTestCase, REPO_ROOT, VALGRIND_ARGS, make_cert, read_report,
                                       skip_under_valgrind, write_csv)

PLAIN = os.path.abspath(os.environ.get("MAILSHOT_PLAIN", os.path.join(REPO_ROOT, "mailshot")))
VALGRIND = shutil.which("valgrind")
PW = "vg-pw"


@unittest.skipUnless(VALGRIND and os.access(PLAIN, os.X_OK), "valgrind or the plain build is missing")
@skip_under_valgrind("redundant: MAILSHOT_VALGRIND=1 runs every test's mailshot under valgrind already")
class ValgrindTests(MailshotTestCase):
    def vg(self, *args, env=None):
        e = dict(os.environ)
        e.update(env or {})
        cmd = [VALGRIND, *VALGRIND_ARGS, PLAIN, *args]      # the flags make valgrind uses too
        return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=self.tmp, timeout=300)

    def test_dry_run_send_and_check_are_clean(self):
        d = self.path("c")
        shutil.copytree(os.path.join(REPO_ROOT, "scripts", "examples", "newsletter"), d)
        write_csv(os.path.join(d, "recipients.csv"), ["email", "first_name"],
                  [[f"u{i}@example.com", f"N{i}"] for i in range(20)] + [["bad@example.com", "B"], ["nope", "X"]])
        p = self.vg("run", os.path.join(d, "campaign.lua"), "--outbox", "out", "--report", "dry.csv")
        self.assertEqual(p.returncode, 0, p.stderr[-4000:])
        cert, _ = make_cert(self.tmp)
        srv = self.start_smtpd(tls=True, auth={"news": PW}, reject_rcpt=[("bad@", 550, "5.1.1 unknown")])
        env = {"SMTP_SERVER": srv.address, "SMTP_USER": "news", "SMTP_PASSWORD": PW, "SMTP_CA_FILE": cert}
        p = self.vg("run", os.path.join(d, "campaign.lua"), "--send", "--report", "sent.csv", env=env)
        self.assertEqual(p.returncode, 1, p.stderr[-4000:])     # one 550: exit 1, not 99
        statuses = sorted(r["status"] for r in read_report(self.path("sent.csv")))
        self.assertEqual(statuses.count("sent"), 20)
        self.assertEqual(statuses.count("failed"), 1)
        self.assertEqual(statuses.count("skipped"), 1)
        p = self.vg("check", srv.address, "--user", "news", "--ca-file", cert, env={"MAILSHOT_PASSWORD": PW})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr[-4000:])
        p = self.vg("check", srv.address, "--user", "news", "--ca-file", cert, env={"MAILSHOT_PASSWORD": "bad"})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr[-4000:])


if __name__ == "__main__":
    unittest.main()
