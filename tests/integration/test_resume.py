"""The send journal: kill -9 and resume (nothing lost, nothing sent twice), graceful stop, the
campaign lock, changed inputs, torn journal lines, deferred recipients retried on resume."""
import collections
import os
import random
import re
import signal
import subprocess
import time
import unittest

from tests.integration.harness import (MailshotTestCase, read_report, scaled, wait_for, write_csv,
                                       valgrind_redundant)

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none", max_connections = 4 }
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi {{name}}", text = "Hello {{name}}",
  send = relay, concurrency = 8,
}
"""


class ResumeTests(MailshotTestCase):
    def campaign(self, n, name="camp"):
        d = self.path(name)
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [[f"u{i}@example.com", f"N{i}"] for i in range(n)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        return os.path.join(d, "c.lua")

    def start_run(self, script, srv, *extra):
        proc = subprocess.Popen(self.mailshot_cmd("run", script, "--send", "--report", self.path("r.csv"), "--progress", "0", *extra),
                                cwd=self.tmp, env=dict(os.environ, SMTP_SERVER=srv.address),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._procs.append(proc)            # killed when the test ends, should it fail half-way
        return proc

    def wait_running(self, proc):
        """Wait until proc has the campaign's journal open: it holds the campaign's lock, and its
        SIGINT/SIGTERM handling is set up a moment later (under valgrind, start-up takes a second)."""
        def journal_open():
            if proc.poll() is not None:
                raise AssertionError(f"mailshot ended early, status {proc.returncode}")
            fds = f"/proc/{proc.pid}/fd"
            try:
                links = [os.readlink(os.path.join(fds, fd)) for fd in os.listdir(fds)]
            except (FileNotFoundError, ProcessLookupError):
                return False
            return any(ln.endswith(".journal") for ln in links)
        wait_for(journal_open, timeout=scaled(10, 60), what="mailshot to open its journal")

    def received(self, srv):
        return collections.Counter(m["rcpt_tos"][0] for m in srv.messages())

    @valgrind_redundant("test_sigint_finishes_messages_in_flight_and_says_how_to_resume, tests/lua/test_journal.lua")
    def test_kill_9_at_random_points_then_resume_sends_everyone_exactly_once(self):
        n = int(os.environ.get("CRASH_N", scaled(20000, 1500)))     # valgrind: 1500 (aiosmtpd alone needs 1.5 s+)
        script = self.campaign(n)
        srv = self.start_smtpd()
        rnd = random.Random(1234)
        kills = 0
        proc = self.start_run(script, srv)
        for attempt in range(4):
            # killed only once it has its journal: a run killed before that has sent nothing, and
            # --resume rightly refuses to start a campaign that has no journal
            try:
                self.wait_running(proc)
            except AssertionError:
                break                               # it ended: finished before this kill
            time.sleep(rnd.uniform(*scaled((0.5, 3.0), (0.3, 2.8))))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
            proc = self.start_run(script, srv, "--resume")
        out, err = proc.communicate(timeout=600)
        self.assertIn(proc.returncode, (0, 1), out + err)
        self.assertGreaterEqual(kills, 1, "the run ended before any kill: raise CRASH_N")
        rep = read_report(self.path("r.csv"))
        self.assertEqual(len(rep), n)
        self.assertEqual(sorted(int(r["line"]) for r in rep), list(range(2, n + 2)))
        status = collections.Counter(r["status"] for r in rep)
        self.assertEqual(set(status) - {"sent", "in-flight"}, set(), status)
        got = self.received(srv)
        in_flight = {r["email"] for r in rep if r["status"] == "in-flight"}
        duplicates = {a: c for a, c in got.items() if c > 1}
        self.assertEqual(duplicates, {})                                  # nothing sent twice
        for r in rep:
            if r["status"] == "sent":
                self.assertEqual(got[r["email"]], 1, r)                   # nothing lost
        lost_in_flight = sum(1 for a in in_flight if got[a] == 0)
        self.assertLessEqual(len(in_flight), kills * 8)                   # at most what was in flight
        print(f"\n[crash test] {n} recipients, {kills} kill -9, {len(in_flight)} reported in flight "
              f"({len(in_flight) - lost_in_flight} of them had in fact arrived), 0 duplicates")

    def test_temporary_failures_are_retried_in_the_run_with_backoff(self):
        d = self.path("rt")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [[f"g{i}@example.com", "G"] for i in range(6)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN.replace("concurrency = 8,", "concurrency = 8, retry = { first = '0.3s', max = '1s', give_up_after = '20s' },"))
        # greylisting: 451 the first time for g1 and g3, then 250; g5 always 450 (gives up); g4 550 (never retried)
        srv = self.start_smtpd(reject_rcpt_once=[("g1@", 451, "4.7.1 greylisted"), ("g3@", 451, "4.7.1 greylisted")],
                               reject_rcpt=[("g4@", 550, "5.1.1 no"), ("g5@", 450, "4.2.0 busy")])
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--report", "r.csv", "--give-up-after", "2s",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        rep = {r["email"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual({e: r["status"] for e, r in rep.items()},
                         {"g0@example.com": "sent", "g1@example.com": "sent", "g2@example.com": "sent",
                          "g3@example.com": "sent", "g4@example.com": "failed", "g5@example.com": "deferred"})
        self.assertEqual(rep["g5@example.com"]["code"], "450")
        rcpts = [l for l in srv.log_lines() if l.upper().startswith("RCPT")]
        self.assertEqual(sum(1 for l in rcpts if "g4@" in l), 1)        # a 5xx is never retried
        self.assertGreaterEqual(sum(1 for l in rcpts if "g5@" in l), 2)  # retried until the give-up time
        self.assertLessEqual(sum(1 for l in rcpts if "g5@" in l), 6)     # with growing intervals, not in a loop
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in srv.messages()),
                         ["g0@example.com", "g1@example.com", "g2@example.com", "g3@example.com"])

    def test_sigint_finishes_messages_in_flight_and_says_how_to_resume(self):
        n = scaled(3000, 1000)                      # valgrind: stopped once the first message arrives
        script = self.campaign(n)
        srv = self.start_smtpd(delay=["DATA-END:0.002"])
        proc = self.start_run(script, srv)
        time.sleep(1.0)
        # under valgrind, that second may be all start-up: stop it once it sends
        wait_for(lambda: srv.message_count() > 0, timeout=scaled(10, 60), what="the first message")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, out + err)
        self.assertIn("--resume", out)
        self.assertIn("stopping", err)
        first = read_report(self.path("r.csv"))
        self.assertEqual(len(first), n)                                 # every recipient, the unsent ones not-started
        sent = sum(1 for r in first if r["status"] == "sent")
        self.assertTrue(0 < sent < n, sent)
        self.assertEqual({r["status"] for r in first}, {"sent", "not-started"})   # in-flight ones finished
        proc = self.start_run(script, srv, "--resume")
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 0, out + err)
        self.assertIn(f"resuming c: {sent} recipients already final", out)
        self.assertEqual(len(read_report(self.path("r.csv"))), n)
        got = self.received(srv)
        self.assertEqual((len(got), max(got.values())), (n, 1))

    @valgrind_redundant("test_sigint_finishes_messages_in_flight_and_says_how_to_resume, "
                        "test_a_second_run_of_the_same_campaign_is_refused")
    def test_a_daily_quota_holds_across_resume_and_a_stop_does_not_wait_for_it(self):
        d = self.path("q")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [[f"q{i}@example.com", "Q"] for i in range(5)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN.replace("concurrency = 8,", "concurrency = 8, rate = '2/day',"))
        srv = self.start_smtpd()
        for run in range(2):
            proc = self.start_run(os.path.join(d, "c.lua"), srv, *(["--resume"] if run else []))
            self.wait_running(proc)
            time.sleep(scaled(1.5, 4.0))            # the quota is used up: the others wait for tomorrow
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)  # ... but a stop does not wait for it
            self.assertEqual(proc.returncode, 130, out + err)
            self.assertEqual(srv.message_count(), 2, f"run {run}: the daily quota was not kept")
        self.assertTrue(os.path.exists(self.path("c.journal.rates")))
        rep = read_report(self.path("r.csv"))
        # the rest: not started, in the report only (the journal leaves them for a later --resume)
        self.assertEqual(sorted(r["status"] for r in rep), ["not-started"] * 3 + ["sent", "sent"])

    def test_a_second_run_of_the_same_campaign_is_refused(self):
        n = scaled(200, 400)
        script = self.campaign(n)
        # 0.1 s a message, 8 at once: 2.5 s (5 s under valgrind) of sending, so the first run is still
        # running when the second one (slow to start under valgrind on a busy machine) takes the lock
        srv = self.start_smtpd(delay=["DATA-END:0.1"])
        proc = self.start_run(script, srv)
        time.sleep(0.5)
        self.wait_running(proc)
        p = self.run_mailshot("run", script, "--send", "--resume", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2)
        self.assertIn("already running", p.stderr)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, out + err)
        # finished: running it again would send everyone a second copy
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2)
        self.assertIn("--resume", p.stderr)
        self.assertEqual(srv.message_count(), n)

    @valgrind_redundant("test_temporary_failures_are_retried_in_the_run_with_backoff, "
                        "test_a_second_run_of_the_same_campaign_is_refused")
    def test_changed_recipients_are_refused_without_force_and_torn_lines_are_ignored(self):
        script = self.campaign(50)
        srv = self.start_smtpd(reject_rcpt=[("u7@", 451, "4.2.1 try later")])
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", "--give-up-after", "0",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 1)
        journal = self.path("c.journal")
        self.assertTrue(os.path.exists(journal))
        with open(journal, "a") as f:
            f.write("F\t9")                      # a record torn by a crash in the middle of write
        srv.stop()
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--resume", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("49 recipients already final", p.stdout)
        self.assertIn("1 deferred to retry now", p.stdout)
        self.assertEqual([m["rcpt_tos"] for m in srv.messages()], [["u7@example.com"]])
        rep = {r["email"]: r["status"] for r in read_report(self.path("r.csv"))}
        self.assertEqual(set(rep.values()), {"sent"})
        with open(os.path.join(os.path.dirname(script), "list.csv"), "a") as f:
            f.write("new@example.com,New\r\n")
        p = self.run_mailshot("run", script, "--send", "--resume", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2)
        self.assertIn("changed since the journal", p.stderr)
        p = self.run_mailshot("run", script, "--send", "--resume", "--force", "--report", "r.csv",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual([m["rcpt_tos"] for m in srv.messages()], [["u7@example.com"], ["new@example.com"]])

    @valgrind_redundant("test_temporary_failures_are_retried_in_the_run_with_backoff, "
                        "test_sigint_finishes_messages_in_flight_and_says_how_to_resume")
    def test_resume_from_another_folder_finds_the_journal_beside_the_script(self):
        # (also the summary's reason for a deferral: its first run is the one that test needed)
        script = self.campaign(6)
        here = os.path.dirname(script)
        srv = self.start_smtpd(reject_rcpt=[("u3@", 451, "4.2.1 try later")])
        # the first run, from the script's folder, without --report: u3 stays deferred
        p = self.run_mailshot("run", "c.lua", "--send", "--give-up-after", "0", "--progress", "0",
                              env={"SMTP_SERVER": srv.address}, cwd=here)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        # issue 12 item 3: "deferred 1" alone hides a relay's reason; the summary names the last one
        summary = [l for l in p.stdout.splitlines() if "1 deferred" in l]
        self.assertTrue(summary, p.stdout + p.stderr)
        self.assertRegex(summary[0], r"1 deferred \(last: [^)]*try later\)")
        self.assertTrue(os.path.exists(os.path.join(here, "c.journal")))
        self.assertEqual(srv.message_count(), 5)
        srv.stop()
        srv = self.start_smtpd()
        other = self.path("elsewhere")
        os.makedirs(other)
        # the same campaign resumed from another folder: only u3 is sent, nobody gets a second copy
        p = self.run_mailshot("run", script, "--send", "--resume", "--progress", "0",
                              env={"SMTP_SERVER": srv.address}, cwd=other)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("5 recipients already final", p.stdout)
        self.assertEqual([m["rcpt_tos"] for m in srv.messages()], [["u3@example.com"]])
        self.assertEqual(os.listdir(other), [])                     # nothing written in the working folder
        rep = read_report(os.path.join(here, "c-report.csv"))
        self.assertEqual(sorted((r["email"], r["status"]) for r in rep),
                         [(f"u{i}@example.com", "sent") for i in range(6)])

    @valgrind_redundant("test_a_second_run_of_the_same_campaign_is_refused")
    def test_resume_without_a_journal_refuses_and_sends_nothing(self):
        script = self.campaign(5)
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        srv.stop()
        srv = self.start_smtpd()
        os.makedirs(self.path("typo"))
        # a --report in a mistyped folder (a typo in its name only keeps the folder: the journal,
        # NAME.journal beside it, is found, and the new report gets every row)
        for report in (os.path.join("typo", "r.csv"), os.path.join("nofolder", "r.csv")):
            with self.subTest(report=report):
                p = self.run_mailshot("run", script, "--send", "--resume", "--report", report,
                                      env={"SMTP_SERVER": srv.address})
                self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
                journal = os.path.join(os.path.dirname(report) or ".", "c.journal")
                self.assertIn(f"--resume: no journal {journal}", p.stderr)
                self.assertIn("nothing was sent", p.stderr)
                self.assertIn("run it without --resume", p.stderr)
                self.assertFalse(os.path.exists(self.path(report)))
        self.assertEqual(os.listdir(self.path("typo")), [])            # not even a lock file
        self.assertEqual(srv.message_count(), 0)
        self.assertEqual(srv.connections(), 0)

    def summary(self, out):
        """The run's last line, as {status: count} (and "total")."""
        m = re.search(r": (\d+) recipients: (\d+) sent, (\d+) failed, (\d+) skipped(?:, (\d+) deferred)?"
                      r"(?:, (\d+) possibly sent)? in ", out)
        self.assertIsNotNone(m, out)
        keys = ("total", "sent", "failed", "skipped", "deferred", "in-flight")
        return {k: int(v or 0) for k, v in zip(keys, m.groups())}

    @valgrind_redundant("test_a_second_run_of_the_same_campaign_is_refused")
    def test_kill_9_with_messages_in_flight_then_resend_in_flight_sends_them_once(self):
        n = 20
        script = self.campaign(n)
        hung = self.start_smtpd(delay=["DATA-END:3600"])    # takes the messages, never answers the dot
        proc = self.start_run(script, hung)
        wait_for(lambda: sum(1 for l in hung.log_lines() if l.upper().startswith("DATA")) >= 2,
                 timeout=scaled(20, 90), what="messages sent and waiting for their reply")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        self.assertEqual(hung.message_count(), 0)
        hung.stop()
        srv = self.start_smtpd()
        # a plain --resume: the in-flight ones are reported possibly sent, and the advice names the flag
        proc = self.start_run(script, srv, "--resume")
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 0, out + err)
        self.assertRegex(out, r"resuming c: 0 recipients already final .* (\d+) in flight when the last run "
                              r"stopped: reported as possibly sent, not sent again \(add --resend-in-flight")
        counts = self.summary(out)
        in_flight = {r["email"] for r in read_report(self.path("r.csv")) if r["status"] == "in-flight"}
        self.assertTrue(2 <= len(in_flight) <= 8, in_flight)
        self.assertEqual(counts, {"total": n, "sent": n - len(in_flight), "failed": 0, "skipped": 0,
                                  "deferred": 0, "in-flight": len(in_flight)})
        self.assertEqual(set(self.received(srv)), {f"u{i}@example.com" for i in range(n)} - in_flight)
        # --resume --force (same inputs) does not turn them final: they stay possibly sent, unsent
        proc = self.start_run(script, srv, "--resume", "--force")
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 0, out + err)
        self.assertIn(f"{n - len(in_flight)} recipients already final ({n - len(in_flight)} sent, 0 failed, "
                      f"0 skipped), 0 deferred to retry now, {len(in_flight)} in flight", out)
        self.assertEqual(self.summary(out)["in-flight"], len(in_flight))
        self.assertEqual(srv.message_count(), n - len(in_flight))
        # --resend-in-flight: the same campaign (no change to the script), they are sent once each
        proc = self.start_run(script, srv, "--resume", "--resend-in-flight")
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 0, out + err)
        self.assertIn(f"{len(in_flight)} in flight when the last run stopped: sent again", out)
        self.assertEqual(self.summary(out), {"total": n, "sent": n, "failed": 0, "skipped": 0, "deferred": 0,
                                             "in-flight": 0})
        rep = read_report(self.path("r.csv"))
        self.assertEqual(sorted(int(r["line"]) for r in rep), list(range(2, n + 2)))   # each one once
        self.assertEqual({r["status"] for r in rep}, {"sent"})
        self.assertEqual(self.received(srv), collections.Counter(f"u{i}@example.com" for i in range(n)))
        # and a later --resume has nothing left to send
        proc = self.start_run(script, srv, "--resume", "--resend-in-flight")
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 0, out + err)
        self.assertIn(f"{n} recipients already final ({n} sent", out)
        self.assertEqual(srv.message_count(), n)

    def test_resend_in_flight_needs_resume(self):
        script = self.campaign(2)
        p = self.run_mailshot("run", script, "--send", "--resend-in-flight", "--report", "r.csv")
        self.assertEqual(p.returncode, 2)
        self.assertIn("--resend-in-flight goes with --send --resume", p.stderr)
        self.assertFalse(os.path.exists(self.path("r.csv")))


if __name__ == "__main__":
    unittest.main()
