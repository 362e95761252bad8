"""Files that hold personal data: outbox writes never follow a symlink planted in the outbox, report,
journal, log and outbox files are created 0600 (folders 0700) whatever the umask, and a running
mailshot (a relay password in memory) can write no core dump."""
import contextlib
import glob
import os
import resource
import shutil
import stat
import subprocess

from tests.integration.harness import (MailshotTestCase, REPO_ROOT, make_cert, read_report, scaled, wait_for,
                                       write_csv, valgrind_redundant)

PW = "private-files-pw"
EXAMPLE = os.path.join(REPO_ROOT, "scripts", "examples", "newsletter")


@contextlib.contextmanager
def umask(mask):
    """Run the block (and the mailshot it starts) under this umask, the usual 022 by default."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


class PrivateFilesTests(MailshotTestCase):
    def example_copy(self, n):
        d = self.path("campaign")
        os.makedirs(d)
        for f in ("campaign.lua", "body.txt", "body.html"):
            shutil.copy(os.path.join(EXAMPLE, f), d)
        write_csv(os.path.join(d, "recipients.csv"), ["email", "first_name"],
                  [[f"user{i}@example.com", f"N{i}"] for i in range(n)])
        return os.path.join(d, "campaign.lua")

    def relay_env(self, srv):
        cert, _ = make_cert(self.tmp)
        return {"SMTP_SERVER": srv.address, "SMTP_TLS": "starttls", "SMTP_USER": "news", "SMTP_PASSWORD": PW,
                "SMTP_CA_FILE": cert}

    def test_dry_run_replaces_a_symlink_planted_in_the_outbox_instead_of_writing_through_it(self):
        script = self.example_copy(3)
        out = self.path("outbox")
        os.makedirs(out)
        victim = self.path("victim.txt")
        with open(victim, "w") as f:
            f.write("precious\n")
        dangling = self.path("created-through-the-link")
        os.symlink(victim, os.path.join(out, "000002-user0@example.com.eml"))     # an existing file
        os.symlink(dangling, os.path.join(out, "000003-user1@example.com.eml"))   # a file it would create
        with open(os.path.join(out, "000004-user2@example.com.eml"), "w") as f:   # a previous run's file
            f.write("stale\n")
        p = self.run_mailshot("run", script, "--outbox", out, "--report", "r.csv")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        with open(victim) as f:
            self.assertEqual(f.read(), "precious\n")
        self.assertFalse(os.path.lexists(dangling))
        self.assertEqual(sorted(os.listdir(out)), ["000002-user0@example.com.eml", "000003-user1@example.com.eml",
                                                   "000004-user2@example.com.eml"])   # no temp file left
        for i, name in enumerate(sorted(os.listdir(out))):
            path = os.path.join(out, name)
            self.assertTrue(stat.S_ISREG(os.lstat(path).st_mode), f"{name} is not a regular file")
            with open(path, "rb") as f:
                data = f.read()
            self.assertIn(f"To: user{i}@example.com".encode(), data)
            self.assertIn(f"Hello N{i}".encode(), data)
        self.assertEqual([r["status"] for r in read_report(self.path("r.csv"))], ["written"] * 3)

    def test_an_outbox_name_it_cannot_replace_fails_the_row_and_leaves_no_temp_file(self):
        script = self.example_copy(2)
        out = self.path("outbox")
        os.makedirs(os.path.join(out, "000002-user0@example.com.eml"))    # a folder where the file goes
        p = self.run_mailshot("run", script, "--outbox", out, "--report", "r.csv")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        rows = read_report(self.path("r.csv"))
        self.assertEqual([(r["status"], r["stage"]) for r in rows], [("failed", "write"), ("written", "")])
        self.assertIn("000002-user0@example.com.eml: Is a directory", rows[0]["response"])
        self.assertEqual(sorted(os.listdir(out)), ["000002-user0@example.com.eml", "000003-user1@example.com.eml"])

    @valgrind_redundant("test_campaign.test_log_has_the_dialogue_without_the_password_and_progress_lines_on_a_pipe, "
                        "test_postfix_bounces.test_done_when_maildir")
    def test_report_journal_log_and_outbox_are_created_0600_under_umask_022(self):
        script = self.example_copy(5)
        with umask(0o022):
            p = self.run_mailshot("run", script, "--outbox", "out", "--report", "dry.csv")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(mode(self.path("dry.csv")), 0o600)
        self.assertEqual(mode(self.path("out")), 0o700)
        emls = glob.glob(self.path("out", "*.eml"))
        self.assertEqual(len(emls), 5)
        self.assertEqual({mode(e) for e in emls}, {0o600})

        srv = self.start_smtpd(tls=True, auth={"news": PW})
        with umask(0o022):
            p = self.run_mailshot("run", script, "--send", "--report", "sent.csv", "--log", "dialogue.log",
                                  env=self.relay_env(srv))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(srv.message_count(), 5)
        journals = glob.glob(os.path.join(self.tmp, "**", "*.journal"), recursive=True)
        self.assertTrue(journals, "no journal found")
        files = [self.path("sent.csv"), self.path("dialogue.log"), *journals]
        self.assertEqual({f: mode(f) for f in files}, {f: 0o600 for f in files})

    @valgrind_redundant("test_campaign.test_live_progress_line_on_a_terminal, "
                        "test_campaign.test_wrong_password_defers_every_message_at_auth")
    def test_a_running_mailshot_can_write_no_core_dump(self):
        script = self.example_copy(2)
        srv = self.start_smtpd(tls=True, auth={"news": PW}, delay=[f"GREETING:{scaled(2, 5)}"])
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        if hard == 0:
            self.skipTest("core dumps are already off here (hard limit 0)")

        def allow_cores():                  # the parent's soft limit may be 0 already: raise it
            resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
        env = dict(os.environ, **self.relay_env(srv))
        proc = subprocess.Popen(self.mailshot_cmd("run", script, "--send", "--report", self.path("r.csv"),
                                                  "--progress", "0"),
                                cwd=self.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=allow_cores)
        self._procs.append(proc)

        def report_open():                  # then main() has run (under valgrind it takes a while)
            self.assertIsNone(proc.poll(), "mailshot ended early")
            fds = f"/proc/{proc.pid}/fd"
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                return any(os.readlink(os.path.join(fds, fd)).endswith("/r.csv") for fd in os.listdir(fds))
        wait_for(report_open, timeout=scaled(10, 60), what="mailshot to open its report")
        with open(f"/proc/{proc.pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max core file size"))
        self.assertIsNone(proc.poll(), "mailshot ended before its limits were read")
        self.assertRegex(line, r"^Max core file size\s+0\s+0\s+bytes")
        out, err = proc.communicate(timeout=scaled(60, 300))
        self.assertEqual(proc.returncode, 0, out + err)
        self.assertEqual(srv.message_count(), 2)
