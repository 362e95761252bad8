"""The report as a complete picture (issue 12 item 4): written in CSV line order at the end of a
run (rows are still written as they complete), a row for every line a broken quote swallowed,
every recipient after a graceful stop (the unsent ones `not-started`, sent by --resume), the first
path's answer of a message that fell back, and `preview --row N` numbered like the report's
`line`."""
import collections
import os
import signal
import subprocess

from tests.integration.harness import (MailshotTestCase, read_report, scaled, wait_for, write_csv,
                                       valgrind_redundant)

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER" or "127.0.0.1:9", tls = "none", max_connections = 8 }
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi {{name}}", text = "Hello {{name}}",
  send = relay, concurrency = tonumber(os.getenv "CONCURRENCY" or "8"),
}
"""

# Relay first; when the relay's answer says so, another path (a function standing for direct
# delivery) takes the message.
FALLBACK_CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none", max_connections = 2 }
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi {{name}}", text = "Hello {{name}}",
  send = mailshot.fallback { relay, function(msg)
    return { ok = true, code = 250, message = "delivered by the other path", via = "other" }
  end }, concurrency = 2, retry = false,
}
"""

# A recipients file with a legit multi-line field (lines 2-3), a quote that closes too late
# (line 5 runs to line 7) and a quote never closed (line 9 runs to the end, line 10).
BROKEN = ('email,name\n'
          'h@example.com,"Hal\nJr."\n'
          'a@example.com,Ann\n'
          'b@example.com,"Bob\n'
          'c@example.com,Cy\n'
          'd@example.com,"Di"\n'
          'e@example.com,Eve\n'
          'f@example.com,"Fay\n'
          'g@example.com,Gus\n')


def raw_lines(path):
    """The report's `line` column in file order."""
    return [int(r["line"]) for r in read_report(path)]


class ReportTests(MailshotTestCase):
    def campaign(self, rows=None, text=None, name="c", script=CAMPAIGN):
        d = self.path(name)
        os.makedirs(d, exist_ok=True)
        if text is not None:
            with open(os.path.join(d, "list.csv"), "w", newline="") as f:
                f.write(text)
        else:
            write_csv(os.path.join(d, "list.csv"), ["email", "name"], rows)
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(script)
        return os.path.join(d, "c.lua")

    def start_run(self, script, srv, *extra, env=None):
        e = dict(os.environ, SMTP_SERVER=srv.address, **(env or {}))
        proc = subprocess.Popen(self.mailshot_cmd("run", script, "--send", "--report", self.path("r.csv"),
                                                  "--progress", "0", *extra),
                                cwd=self.tmp, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self._procs.append(proc)
        return proc

    # ---- a) CSV order

    @valgrind_redundant("test_verp.test_relay_mail_from_is_each_rows_signed_return_path, "
                        "test_campaign.test_example_sends_1000_personalized_messages_over_starttls_and_auth")
    def test_the_report_ends_in_csv_order_although_rows_complete_out_of_order(self):
        # the last row is skipped at once while the others wait for the server's answer
        rows = [[f"u{i}@example.com", f"N{i}"] for i in range(5)] + [["not-an-address", "X"], ["u0@example.com", "D"]]
        script = self.campaign(rows)
        srv = self.start_smtpd(delay=["DATA-END:0.3"])
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(raw_lines(self.path("r.csv")), list(range(2, 9)))
        rep = read_report(self.path("r.csv"))
        self.assertEqual([r["status"] for r in rep], ["sent"] * 5 + ["skipped"] * 2)
        self.assertEqual(rep[0]["email"], "u0@example.com")
        self.assertIn("duplicate", rep[6]["response"])
        self.assertEqual([f for f in os.listdir(self.tmp) if ".tmp-" in f], [])     # no temporary file left

    # ---- b) a broken quote's lines

    def test_every_line_a_broken_quote_swallowed_has_a_row(self):
        script = self.campaign(text=BROKEN)
        p = self.run_mailshot("run", script, "--outbox", "out", "--report", "r.csv")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        rep = {int(r["line"]): r for r in read_report(self.path("r.csv"))}
        # line 3 belongs to the legit record of line 2; every other data line has its row
        self.assertEqual(sorted(rep), [2, 4, 5, 6, 7, 8, 9, 10])
        self.assertEqual({n for n, r in rep.items() if r["status"] == "written"}, {2, 4, 8})
        self.assertIn("after the closing quote", rep[5]["response"])
        self.assertIn("unterminated quoted field", rep[9]["response"])
        for n, start in ((6, 5), (7, 5), (10, 9)):
            self.assertEqual(rep[n]["status"], "skipped")
            self.assertIn(f"line {n}: swallowed by the broken record that starts on line {start}", rep[n]["response"])
        self.assertIn("8 recipients", p.stdout)

    # ---- e) preview --row N is the report's line

    @valgrind_redundant("test_every_line_a_broken_quote_swallowed_has_a_row")
    def test_preview_row_is_the_csv_line_of_the_report(self):
        script = self.campaign(text=BROKEN)
        p = self.run_mailshot("run", script, "--outbox", "out", "--report", "r.csv")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        rep = {r["email"]: int(r["line"]) for r in read_report(self.path("r.csv")) if r["email"]}
        for email in ("h@example.com", "a@example.com", "e@example.com"):
            p = self.run_mailshot("preview", script, "--row", str(rep[email]))
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn(f"To: {email}", p.stdout)
        p = self.run_mailshot("preview", script)                      # default: the first recipient
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("To: h@example.com", p.stdout)
        for row, status, words in (("1", 2, "line 1 is the header"),
                                   ("3", 2, "line 3 is inside the record that starts on line 2"),
                                   ("5", 1, "line 5: `run` skips this row: unexpected text"),
                                   ("6", 1, "swallowed by the broken record that starts on line 5"),
                                   ("11", 2, "has 10 lines")):
            with self.subTest(row=row):
                p = self.run_mailshot("preview", script, "--row", row)
                self.assertEqual(p.returncode, status, p.stdout + p.stderr)
                self.assertIn(words, p.stderr)
                self.assertEqual(p.stdout, "")

    # ---- c) a graceful stop: every recipient in the report

    def test_after_sigint_the_report_names_everyone_and_resume_sends_the_not_started_once(self):
        n = scaled(40, 20)
        script = self.campaign([[f"u{i}@example.com", f"N{i}"] for i in range(n)] + [["bad", "B"]])
        srv = self.start_smtpd(delay=["DATA-END:0.2"])
        proc = self.start_run(script, srv, env={"CONCURRENCY": "2"})
        wait_for(lambda: srv.message_count() >= 2, timeout=scaled(20, 120), what="the first messages")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=scaled(60, 300))
        self.assertEqual(proc.returncode, 130, out + err)
        self.assertIn("not started", out)
        first = read_report(self.path("r.csv"))
        self.assertEqual([int(r["line"]) for r in first], list(range(2, n + 3)))     # everyone, in order
        status = collections.Counter(r["status"] for r in first)
        self.assertEqual(set(status), {"sent", "not-started"}, status)    # the bad row was not reached either
        self.assertGreater(status["not-started"], 1)
        self.assertIn("stopped before this row", [r for r in first if r["status"] == "not-started"][0]["response"])
        sent_before = {r["email"] for r in first if r["status"] == "sent"}
        self.assertEqual(set(m["rcpt_tos"][0] for m in srv.messages()), sent_before)
        # --resume sends exactly the not-started ones, once each
        proc = self.start_run(script, srv, "--resume")
        out, err = proc.communicate(timeout=scaled(120, 600))
        self.assertEqual(proc.returncode, 0, out + err)
        second = read_report(self.path("r.csv"))
        self.assertEqual([int(r["line"]) for r in second], list(range(2, n + 3)))
        self.assertEqual(collections.Counter(r["status"] for r in second), {"sent": n, "skipped": 1})
        got = collections.Counter(m["rcpt_tos"][0] for m in srv.messages())
        self.assertEqual((len(got), max(got.values())), (n, 1))

    # ---- d) a fallback keeps the first path's answer

    @valgrind_redundant("test_resume.test_temporary_failures_are_retried_in_the_run_with_backoff, "
                        "test_campaign.test_wrong_password_defers_every_message_at_auth")
    def test_a_message_that_fell_back_keeps_the_first_answer_and_an_old_journal_still_resumes(self):
        rows = [["ok1@example.com", "A"], ["fb1@example.com", "B"], ["ok2@example.com", "C"], ["fb2@example.com", "D"]]
        script = self.campaign(rows, script=FALLBACK_CAMPAIGN)
        srv = self.start_smtpd(reject_rcpt=[("fb", 451, "4.7.1 greylisted, try later")])
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        with open(self.path("r.csv"), newline="") as f:
            self.assertEqual(f.readline().strip(), "line,email,status,code,enhanced,stage,via,mx,response,first_response")
        rep = {r["email"]: r for r in read_report(self.path("r.csv"))}
        for e in ("fb1@example.com", "fb2@example.com"):
            self.assertEqual((rep[e]["status"], rep[e]["via"], rep[e]["response"]),
                             ("sent", "other", "delivered by the other path"))
            self.assertRegex(rep[e]["first_response"], r"^relay: 451 .*greylisted, try later")
        for e in ("ok1@example.com", "ok2@example.com"):
            self.assertEqual((rep[e]["status"], rep[e]["via"], rep[e]["first_response"]), ("sent", "relay", ""))
        journal = self.path("c.journal")
        with open(journal) as f:
            lines = f.read().splitlines()
        self.assertTrue(lines[0].startswith("mailshot-journal 2 "), lines[0])
        self.assertIn("relay: 451", [ln for ln in lines if "fb1@" in ln and ln.startswith("F")][0])
        # the same journal as a version 1 mailshot wrote it (no first_response), the last row unsent
        old = [lines[0].replace("mailshot-journal 2 ", "mailshot-journal 1 ", 1)]
        for ln in lines[1:]:
            f = ln.split("\t")
            if f[1] == "5":
                continue
            old.append("\t".join(f[:-1]) if f[0] in ("F", "D") else ln)
        with open(journal, "w") as f:
            f.write("\n".join(old) + "\n")
        before = srv.message_count()
        p = self.run_mailshot("run", script, "--send", "--resume", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("3 recipients already final", p.stdout)
        self.assertEqual(srv.message_count(), before)         # fb2 went by the other path; nothing resent
        rep = {r["email"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual({e: r["status"] for e, r in rep.items()}, {e: "sent" for e, _ in rows})
        self.assertEqual((rep["fb1@example.com"]["via"], rep["fb1@example.com"]["first_response"]), ("other", ""))
        self.assertRegex(rep["fb2@example.com"]["first_response"], r"^relay: 451 ")
        with open(journal) as f:
            lines = f.read().splitlines()
        self.assertTrue(lines[0].startswith("mailshot-journal 1 "))   # it keeps its version ...
        self.assertEqual(len(lines[-1].split("\t")), 10, lines[-1])   # ... and its records' fields
        p = self.run_mailshot("run", script, "--send", "--resume", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("4 recipients already final", p.stdout)
