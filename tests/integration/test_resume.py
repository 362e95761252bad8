"""The send journal: kill -9 and resume (nothing lost, nothing sent twice), graceful stop, the
campaign lock, changed inputs, torn journal lines, deferred recipients retried on resume."""
import collections
import os
import random
import signal
import subprocess
import time
import unittest

from tests.integration.harness import MailshotTestCase, read_report, scaled, wait_for, write_csv

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

    def test_kill_9_at_random_points_then_resume_sends_everyone_exactly_once(self):
        n = int(os.environ.get("CRASH_N", scaled(20000, 3000)))     # valgrind: 3000 (15 s there)
        script = self.campaign(n)
        srv = self.start_smtpd()
        rnd = random.Random(1234)
        kills = 0
        proc = self.start_run(script, srv)
        for attempt in range(4):
            time.sleep(rnd.uniform(*scaled((0.5, 3.0), (1.0, 3.5))))   # valgrind: ~0.7 s to start up
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
        self.assertTrue(0 < len(first) < n, len(first))
        self.assertEqual({r["status"] for r in first}, {"sent"})        # in-flight ones finished
        proc = self.start_run(script, srv, "--resume")
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 0, out + err)
        self.assertIn(f"resuming c: {len(first)} recipients already final", out)
        self.assertEqual(len(read_report(self.path("r.csv"))), n)
        got = self.received(srv)
        self.assertEqual((len(got), max(got.values())), (n, 1))

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
        self.assertEqual(sorted(r["status"] for r in rep), ["sent", "sent"])   # the rest: untouched, for later

    def test_a_second_run_of_the_same_campaign_is_refused(self):
        n = scaled(200, 400)                        # valgrind: still running when the second one starts
        script = self.campaign(n)
        srv = self.start_smtpd(delay=["DATA-END:0.02"])
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


if __name__ == "__main__":
    unittest.main()
