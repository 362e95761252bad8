"""`mailshot run`: campaigns over CSV lists, dry and sent through a real aiosmtpd relay."""
import os
import re
import shutil
import unittest

from tests.integration.harness import (MailshotTestCase, REPO_ROOT, free_port, make_cert, read_report,
                                       write_csv, valgrind_redundant)

PW = "campaign-pw"
EXAMPLE = os.path.join(REPO_ROOT, "scripts", "examples", "newsletter")


class CampaignTests(MailshotTestCase):
    def example_copy(self, rows, header=("email", "first_name")):
        """The example campaign, unchanged, in a temp folder beside a generated recipients.csv."""
        d = self.path("campaign")
        os.makedirs(d)
        for f in ("campaign.lua", "body.txt", "body.html"):
            shutil.copy(os.path.join(EXAMPLE, f), d)
        write_csv(os.path.join(d, "recipients.csv"), list(header), rows)
        return os.path.join(d, "campaign.lua")

    def relay_env(self, srv, password=PW, tls="starttls"):
        cert, _ = make_cert(self.tmp)
        return {"SMTP_SERVER": srv.address, "SMTP_TLS": tls, "SMTP_USER": "news",
                "SMTP_PASSWORD": password, "SMTP_CA_FILE": cert}

    def test_example_sends_1000_personalized_messages_over_starttls_and_auth(self):
        rows = [[f"user{i}@example.com", f"Name{i}"] for i in range(1000)]
        script = self.example_copy(rows)
        srv = self.start_smtpd(tls=True, require_starttls=True, auth={"news": PW}, auth_required=True)
        # run from another folder: files are found next to the script
        p = self.run_mailshot("run", script, "--send", "--report", self.path("report.csv"),
                              env=self.relay_env(srv), timeout=300)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr[-3000:])
        self.assertIn("1000 sent, 0 failed, 0 skipped", p.stdout)
        report = read_report(self.path("report.csv"))
        self.assertEqual(len(report), 1000)
        self.assertEqual({r["status"] for r in report}, {"sent"})
        self.assertEqual(sorted(r["email"] for r in report), sorted(r[0] for r in rows))
        self.assertTrue(all(r["code"] == "250" for r in report))
        msgs = srv.messages()
        self.assertEqual(len(msgs), 1000)
        by_rcpt = {m["rcpt_tos"][0]: m for m in msgs}
        self.assertEqual(set(by_rcpt), {r[0] for r in rows})
        m = by_rcpt["user17@example.com"]
        self.assertEqual(m["mail_from"], "news@acme.example")
        self.assertTrue(m["tls"])
        self.assertEqual(m["auth_user"], "news")
        self.assertEqual(str(m["msg"]["Subject"]), "Hello Name17")
        self.assertEqual(m["msg"].get_content_type(), "multipart/alternative")
        text = m["msg"].get_body(("plain",)).get_content()
        html = m["msg"].get_body(("html",)).get_content()
        self.assertIn("Hello Name17,", text)
        self.assertIn("<p>Hello Name17,</p>", html)
        raw = m["raw"]
        self.assertNotIn(b"\n", raw.replace(b"\r\n", b""), "bare LF in the message")
        # connections were reused: far fewer sessions than messages
        self.assertLessEqual(srv.connections(), 8)
        with open(self.path("report.csv")) as f:
            self.assertNotIn(PW, p.stdout + p.stderr + f.read())

    def test_log_has_the_dialogue_without_the_password_and_progress_lines_on_a_pipe(self):
        rows = [[f"user{i}@example.com", f"N{i}"] for i in range(300)]
        script = self.example_copy(rows)
        srv = self.start_smtpd(tls=True, auth={"news": PW}, delay=["DATA-END:0.002"])
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", "--log", "dialogue.log",
                              "--progress", "0.1", "--concurrency", "2", env=self.relay_env(srv))
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])
        with open(self.path("dialogue.log")) as f:
            log = f.read()
        self.assertNotIn(PW, log)
        self.assertIn("AUTH PLAIN ********", log)
        self.assertRegex(log, r"\d\d:\d\d:\d\d\.\d{3} \[s\d+\] 127\.0\.0\.1 > MAIL FROM:<news@acme\.example>")
        self.assertRegex(log, r"< 250 .*queued")
        progress = [l for l in p.stderr.splitlines() if l.startswith("mailshot: newsletter: ")]
        self.assertTrue(progress, p.stderr)
        self.assertRegex(progress[-1], r"^mailshot: newsletter: \d+/300  sent \d+  failed 0  deferred 0  skipped 0  \d+/s  ETA \S+  conns \d+$")

    def test_live_progress_line_on_a_terminal(self):
        import pty
        import subprocess
        rows = [[f"user{i}@example.com", f"N{i}"] for i in range(200)]
        script = self.example_copy(rows)
        srv = self.start_smtpd(tls=True, auth={"news": PW}, delay=["DATA-END:0.003"])
        master, slave = pty.openpty()
        env = dict(os.environ, **self.relay_env(srv))
        proc = subprocess.Popen(self.mailshot_cmd("run", script, "--send", "--report", self.path("r.csv"), "--concurrency", "2"),
                                stdout=subprocess.PIPE, stderr=slave, env=env, cwd=self.tmp, start_new_session=True)
        self._procs.append(proc)                    # killed when the test ends, should it fail half-way
        os.close(slave)
        chunks = []
        try:
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
        finally:
            out, _ = proc.communicate(timeout=60)
            os.close(master)
        tty = b"".join(chunks).decode(errors="replace")
        self.assertEqual(proc.returncode, 0, tty)
        self.assertIn("\r\x1b[K", tty)                     # rewritten in place
        self.assertRegex(tty, r"newsletter: \d+/200  sent \d+")
        self.assertIn(b"200 sent", out)

    def test_rate_limit_windows_hold_at_the_receiver(self):
        # "50/s" for 150 messages: any second of the server's own timestamps holds at most 50,
        # and the run cannot be faster than the two full windows it needs
        d = self.path("rl")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email"], [[f"r{i}@example.com"] for i in range(150)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write('''
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none", rate = "50/s" }
return mailshot.campaign { recipients = "list.csv", from = "x@example.org", subject = "r", text = "hi",
                           send = relay, concurrency = 16 }
''')
        srv = self.start_smtpd()
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--report", "r.csv",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        stamps = sorted(m["received_at"] for m in srv.messages())
        self.assertEqual(len(stamps), 150)
        busiest, j = 0, 0
        for i in range(len(stamps)):
            while stamps[i] - stamps[j] >= 1.0:
                j += 1
            busiest = max(busiest, i - j + 1)
        self.assertLessEqual(busiest, 50)
        self.assertGreaterEqual(stamps[-1] - stamps[0], 1.9)

    def test_per_domain_rate_and_custom_function(self):
        d = self.path("dr")
        os.makedirs(d)
        rows = [[f"a{i}@slow.example"] for i in range(6)] + [[f"b{i}@fast.example"] for i in range(20)] + [["c@no.example"]]
        write_csv(os.path.join(d, "list.csv"), ["email"], rows)
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write('''
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none" }
return mailshot.campaign { recipients = "list.csv", from = "x@example.org", subject = "r", text = "hi",
  send = relay, concurrency = 8,
  domain_rate = {
    ["slow.example"] = "2/s",
    ["no.example"] = function(info) return false, "warm-up: no.example gets nothing on day " .. info.day end,
  },
}
''')
        srv = self.start_smtpd()
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--report", "r.csv",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        rep = {r["email"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual((rep["c@no.example"]["status"], rep["c@no.example"]["stage"]), ("deferred", "rate"))
        self.assertIn("warm-up", rep["c@no.example"]["response"])
        slow = sorted(m["received_at"] for m in srv.messages() if m["rcpt_tos"][0].endswith("@slow.example"))
        fast = sorted(m["received_at"] for m in srv.messages() if m["rcpt_tos"][0].endswith("@fast.example"))
        self.assertEqual((len(slow), len(fast)), (6, 20))
        self.assertGreaterEqual(slow[-1] - slow[0], 1.9)          # 6 at 2/s: three windows
        self.assertLess(fast[-1] - fast[0], slow[-1] - slow[0])   # the other domain is not held back

    def test_550_on_one_recipient_leaves_the_others_sent(self):
        rows = [["a@example.com", "A"], ["bad@example.com", "B"], ["c@example.com", "C"]]
        script = self.example_copy(rows)
        srv = self.start_smtpd(tls=True, auth={"news": PW},
                               reject_rcpt=[("bad@", 550, "5.1.1 No such user here")])
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=self.relay_env(srv))
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        rep = {r["email"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual(rep["a@example.com"]["status"], "sent")
        self.assertEqual(rep["c@example.com"]["status"], "sent")
        bad = rep["bad@example.com"]
        self.assertEqual((bad["status"], bad["code"], bad["enhanced"], bad["stage"]), ("failed", "550", "5.1.1", "rcpt"))
        self.assertIn("No such user here", bad["response"])
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in srv.messages()), ["a@example.com", "c@example.com"])
        # the failed transaction was reset on the same connection, no "503 sender already specified"
        self.assertIn("RSET", srv.commands())
        self.assertNotIn("503", srv.stderr())

    def test_server_down_fails_every_recipient_as_temporary_connect_errors(self):
        script = self.example_copy([["a@example.com", "A"], ["b@example.com", "B"]])
        env = {"SMTP_SERVER": f"127.0.0.1:{free_port()}", "SMTP_TLS": "starttls"}
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", "--give-up-after", "0", env=env)
        self.assertEqual(p.returncode, 1)
        self.assertIn("2 deferred", p.stdout)
        rep = read_report(self.path("r.csv"))
        self.assertEqual(len(rep), 2)
        for r in rep:
            self.assertEqual((r["status"], r["stage"]), ("deferred", "connect"))
            self.assertIn("Connection refused", r["response"])

    def test_greeting_421_fails_with_the_servers_words(self):
        script = self.example_copy([["a@example.com", "A"]])
        srv = self.start_smtpd(greeting_code=421, greeting_text="4.7.0 Too many connections")
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", "--give-up-after", "0", env=self.relay_env(srv))
        self.assertEqual(p.returncode, 1)
        r = read_report(self.path("r.csv"))[0]
        self.assertEqual((r["status"], r["code"], r["stage"]), ("deferred", "421", "greeting"))
        self.assertIn("Too many connections", r["response"])

    def test_wrong_password_defers_every_message_at_auth(self):
        # not sent, left for --resume once the password is fixed (issue 10 item 5; test_faults
        # HostileServerTests has the many-row case)
        script = self.example_copy([["a@example.com", "A"]])
        srv = self.start_smtpd(tls=True, auth={"news": PW})
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=self.relay_env(srv, password="nope"))
        self.assertEqual(p.returncode, 1)
        r = read_report(self.path("r.csv"))[0]
        self.assertEqual((r["status"], r["code"], r["stage"]), ("deferred", "535", "auth"))
        self.assertEqual(srv.message_count(), 0)

    @valgrind_redundant("test_envelope_injection_in_the_email_column_is_skipped, tests/lua/test_mime.lua")
    def test_csv_value_cannot_add_a_header_or_a_recipient(self):
        evil = "Eve\r\nBcc: victim@example.net\r\nX-Evil: 1"
        rows = [["target@example.com", evil]]
        script = self.example_copy(rows)
        srv = self.start_smtpd(tls=True, auth={"news": PW})
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=self.relay_env(srv))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        (m,) = srv.messages()
        self.assertEqual(m["rcpt_tos"], ["target@example.com"])
        msg = m["msg"]
        self.assertIsNone(msg["Bcc"])
        self.assertIsNone(msg["X-Evil"])
        self.assertEqual(msg.defects, [])
        self.assertIn("Bcc: victim@example.net", str(msg["Subject"]))   # kept as text, on one line
        self.assertEqual(len([k for k in msg.keys() if k.lower() == "subject"]), 1)

    def test_envelope_injection_in_the_email_column_is_skipped(self):
        rows = [['"x\r\nRCPT TO:<y@example.net>"@example.com', "X"], ["a@b@example.com", "Y"], ["ok@example.com", "Z"]]
        script = self.example_copy(rows)
        srv = self.start_smtpd(tls=True, auth={"news": PW})
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=self.relay_env(srv))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        rep = read_report(self.path("r.csv"))
        self.assertEqual([r["status"] for r in sorted(rep, key=lambda r: int(r["line"]))], ["skipped", "skipped", "sent"])
        self.assertEqual([m["rcpt_tos"] for m in srv.messages()], [["ok@example.com"]])
        self.assertNotIn("RCPT TO:<y@example.net>", "\n".join(srv.log_lines()))

    def test_report_cells_that_a_spreadsheet_would_run_as_formulas_get_a_quote_prefix(self):
        # OWASP "CSV injection": a cell starting with = + - @ (TAB, CR) is a formula in a spreadsheet.
        # The report prepends one ' to those and to cells starting with ' (so one ' off gives the raw text).
        rows = [["=sum@example.com", "A"], ["+plus@example.com", "B"], ["-minus@example.com", "C"],
                ["ok1@example.com", "D"], ["ok2@example.com", "E"], ["@at@example.com", "F"],
                ["'quote@example.com", "G"], ["plain@example.com", "H"]]
        replies = {"+plus@example.com": '=HYPERLINK("http://evil.test","x")',
                   "-minus@example.com": "+cmd|' /C calc'!A0",
                   "ok1@example.com": "-2+3 no such user",
                   "ok2@example.com": "@SUM(1+1) mailbox full"}
        script = self.example_copy(rows)
        srv = self.start_smtpd(tls=True, auth={"news": PW},
                               reject_rcpt=[(addr.lstrip("+-"), 550, text) for addr, text in replies.items()])
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=self.relay_env(srv))
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        with open(self.path("r.csv"), newline="", encoding="utf-8") as f:
            raw = f.read()
        rep = {int(r["line"]): r for r in read_report(self.path("r.csv"))}
        self.assertEqual(sorted(rep), list(range(2, 10)))
        emails = [rep[n]["email"] for n in range(2, 10)]
        self.assertEqual(emails, ["'=sum@example.com", "'+plus@example.com", "'-minus@example.com", "ok1@example.com",
                                  "ok2@example.com", "'@at@example.com", "''quote@example.com", "plain@example.com"])
        self.assertEqual([e[1:] if e.startswith("'") else e for e in emails], [r[0] for r in rows], "raw text back")
        self.assertEqual([rep[n]["status"] for n in range(2, 10)],
                         ["sent", "failed", "failed", "failed", "failed", "skipped", "sent", "sent"])
        for n, (addr, text) in zip((3, 4, 5, 6), replies.items()):
            self.assertEqual(rep[n]["response"], "'" + text, addr)
        self.assertTrue(rep[7]["response"].startswith("invalid email address"), rep[7])
        # no cell of the file (CSV-parsed) starts with a formula character
        for r in rep.values():
            for k, v in r.items():
                self.assertNotIn(v[:1], ("=", "+", "-", "@", "\t", "\r"), (k, v))
        self.assertIn('"\'=sum@example.com"', raw)     # quoted as well, as OWASP recommends
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in srv.messages()),
                         ["'quote@example.com", "=sum@example.com", "plain@example.com"])

    def test_starttls_response_injection_is_discarded(self):
        # CVE-2011-0411: the server appends "250 injected" to its STARTTLS reply in plaintext
        script = self.example_copy([["a@example.com", "A"], ["b@example.com", "B"]])
        srv = self.start_smtpd(starttls_inject=True, auth={"news": PW})
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=self.relay_env(srv))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(srv.message_count(), 2)
        self.assertEqual({r["status"] for r in read_report(self.path("r.csv"))}, {"sent"})

    def test_helo_fallback_and_no_pipelining(self):
        script = self.example_copy([["a@example.com", "A"], ["b@example.com", "B"]])
        srv = self.start_smtpd(no_ehlo=True)
        env = {"SMTP_SERVER": srv.address, "SMTP_TLS": "none"}
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=env)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("HELO", srv.commands())
        self.assertEqual(srv.message_count(), 2)

    @valgrind_redundant("test_report_cells_that_a_spreadsheet_would_run_as_formulas_get_a_quote_prefix, "
                        "test_helo_fallback_and_no_pipelining")
    def test_pipelining_groups_mail_rcpt_data_when_offered(self):
        script = self.example_copy([["a@example.com", "A"]])
        srv = self.start_smtpd(tls=True, auth={"news": PW})
        self.run_mailshot("run", script, "--send", "--report", "r.csv", env=self.relay_env(srv))
        entries = [e for e in srv.log_entries() if e["line"].split(" ")[0].upper() in ("MAIL", "RCPT")]
        self.assertTrue(entries and all(e["pipelined"] for e in entries), entries)
        srv2 = self.start_smtpd(tls=True, auth={"news": PW}, no_pipelining=True, reject_unauth_pipelining=True)
        p = self.run_mailshot("run", script, "--send", "--report", "r2.csv", "--force", env=self.relay_env(srv2))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(srv2.message_count(), 1)

    def test_dot_stuffing_and_line_endings_survive_the_trip(self):
        d = self.path("c")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email"], [["a@example.com"]])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write('local mailshot = require "mailshot"\n'
                    'local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none" }\n'
                    'return mailshot.campaign { recipients = "list.csv", from = "x@example.org", subject = "dots",\n'
                    '  text = ".leading dot\\n.\\n..two\\nend", send = relay }\n')   # a relay used as is
        srv = self.start_smtpd()
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--report", "r.csv",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        (m,) = srv.messages()
        self.assertEqual(m["msg"].get_content().replace("\r\n", "\n").rstrip("\n"), ".leading dot\n.\n..two\nend")

    def test_dry_run_writes_parseable_messages_and_sends_nothing(self):
        script = self.example_copy([["a@example.com", "Ann"], ["b@example.com", "Bo"]])
        p = self.run_mailshot("run", script, "--outbox", "out", "--report", "r.csv",
                              env={"SMTP_SERVER": f"127.0.0.1:{free_port()}"})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("2 written to out", p.stdout)
        self.assertIn("dry run", p.stdout)
        files = sorted(os.listdir(self.path("out")))
        self.assertEqual(files, ["000002-a@example.com.eml", "000003-b@example.com.eml"])
        import email
        import email.policy
        with open(self.path("out", files[0]), "rb") as f:
            msg = email.message_from_binary_file(f, policy=email.policy.default)
        self.assertEqual(str(msg["Subject"]), "Hello Ann")
        self.assertEqual(str(msg["To"]), "a@example.com")
        for h in ("Date", "Message-ID", "MIME-Version", "From"):
            self.assertIsNotNone(msg[h], h)
        self.assertEqual({r["status"] for r in read_report(self.path("r.csv"))}, {"written"})

    @valgrind_redundant("test_dry_run_writes_parseable_messages_and_sends_nothing")
    def test_run_help_lists_the_report_columns_and_every_status_the_readme_does(self):
        script = self.example_copy([["a@example.com", "Ann"]])
        p = self.run_mailshot("run", script, "--outbox", "out", "--report", "r.csv",
                              env={"SMTP_SERVER": f"127.0.0.1:{free_port()}"})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        with open(self.path("r.csv")) as f:
            columns = f.readline().strip()          # what the code writes
        self.assertIn(",via,mx,", columns)
        with open(os.path.join(REPO_ROOT, "README.md")) as f:
            readme = f.read()
        self.assertIn(f"columns `{columns}`", readme)
        statuses = re.findall(r"^\| `([a-z-]+)` \|", readme.split("| status | meaning |", 1)[1].split("\n\n", 1)[0], re.M)
        self.assertIn("deferred", statuses)
        for args in (("run", "--help"), ("help", "run")):
            h = self.run_mailshot(*args)
            self.assertEqual(h.returncode, 0, h.stderr)
            text = " ".join(h.stdout.split())
            self.assertIn(columns, text)
            for status in statuses:
                self.assertRegex(text, rf"Status values:.*\b{status}\b")

    def test_bad_rows_are_reported_with_line_numbers_and_the_run_goes_on(self):
        d = self.path("c")
        os.makedirs(d)
        shutil.copy(os.path.join(EXAMPLE, "campaign.lua"), d)
        shutil.copy(os.path.join(EXAMPLE, "body.txt"), d)
        shutil.copy(os.path.join(EXAMPLE, "body.html"), d)
        with open(os.path.join(d, "recipients.csv"), "w") as f:
            f.write("email,first_name\n"
                    "ok1@example.com,One\n"
                    "not-an-address,Two\n"
                    "ok3@example.com,\"Multi\nline\"\n"
                    "bro\"ken@example.com,X\n"
                    "ok5@example.com,Five,extra\n"
                    "missing@example.com,\n"
                    "ok7@example.com,Seven\n"
                    "last@example.com,\"unterminated\nmore\n")
        p = self.run_mailshot("run", os.path.join(d, "campaign.lua"), "--outbox", "out", "--report", "r.csv")
        rep = {int(r["line"]): r for r in read_report(self.path("r.csv"))}
        self.assertEqual(sorted(rep), [2, 3, 4, 6, 7, 8, 9, 10, 11])     # every line accounted for
        status = {n: r["status"] for n, r in rep.items()}
        self.assertEqual(status, {2: "written", 3: "skipped", 4: "written", 6: "skipped", 7: "skipped",
                                  8: "failed", 9: "written", 10: "skipped", 11: "skipped"})
        self.assertIn("invalid email address", rep[3]["response"])
        self.assertIn("recipients.csv line 6: stray quote", rep[6]["response"])
        self.assertIn("recipients.csv line 7: row has 3 fields, header has 2", rep[7]["response"])
        self.assertIn("line 10: unterminated quoted field", rep[10]["response"])
        self.assertIn("line 11: swallowed by the broken record that starts on line 10", rep[11]["response"])
        self.assertEqual(rep[9]["email"], "ok7@example.com")
        missing = rep[8]
        self.assertEqual((missing["email"], missing["stage"]), ("missing@example.com", "render"))
        self.assertIn('template subject: field "first_name" is missing in recipients.csv line 8', missing["response"])
        self.assertIn("3 written to out, 1 failed, 5 skipped", p.stdout)
        self.assertEqual(p.returncode, 1)

    def test_email_column_ignores_case_and_a_missing_one_stops_with_a_suggestion(self):
        # issue 12 item 5: "Email" finds email_field "email"; no match stops once, naming the file,
        # the columns and the nearest one, or the delimiter when the header has no comma
        d = self.path("ci")
        os.makedirs(d)
        script = os.path.join(d, "c.lua")
        with open(script, "w") as f:
            f.write('return require("mailshot").campaign { recipients = "list.csv", from = "Shop <shop@example.org>",'
                    ' subject = "Hi", text = "Hi {{name}}" }\n')
        cases = [("name,Email\nzoe,a@example.com\n", None),
                 ("name,e-mail\nzoe,a@example.com\n", "list.csv: no 'email' column (columns: name, e-mail); did you mean email_field = \"e-mail\"?"),
                 ("name;email\nzoe;a@example.com\n", 'the header has no comma: set delimiter = ";"')]
        for csv_text, message in cases:
            with self.subTest(csv_text=csv_text):
                with open(os.path.join(d, "list.csv"), "w") as f:
                    f.write(csv_text)
                p = self.run_mailshot("run", script, "--outbox", "out", "--report", "r.csv")
                if message is None:
                    self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
                    (r,) = read_report(self.path("r.csv"))
                    self.assertEqual((r["email"], r["status"]), ("a@example.com", "written"))
                else:
                    self.assertNotEqual(p.returncode, 0)
                    self.assertIn(message, p.stderr)
                    self.assertEqual(p.stderr.count("no 'email' column"), 1, p.stderr)

    def test_filter_attachment_helpers_headers_and_semicolon_list(self):
        d = self.path("c")
        os.makedirs(os.path.join(d, "files"))
        with open(os.path.join(d, "list.csv"), "w", encoding="utf-8") as f:
            f.write("\ufeffemail;name;plan\na@example.com;zoé;gold\nb@example.com;bob;free\n")
        pdf = bytes(range(256)) * 40
        with open(os.path.join(d, "files", "offer.pdf"), "wb") as f:
            f.write(pdf)
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write("""
local mailshot = require "mailshot"
return mailshot.campaign {
  recipients = "list.csv", delimiter = ";",
  from = "Shop <shop@example.org>",
  subject = "{{ shout(name) }}, your {{plan}} offer",
  text = "Hi {{ capitalize(name) }}",
  html = "<p>Hi {{name}} &amp; co</p>",
  headers = { ["X-Plan"] = "{{plan}}" },
  attachments = { { path = "files/offer.pdf" } },
  helpers = { shout = function(s) return s:upper() end },
  filter = function(row) if row.plan == "free" then return false, "free plan: no offer" end return true end,
}
""")
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--outbox", "out", "--report", "r.csv")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        rep = {r["email"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual((rep["b@example.com"]["status"], rep["b@example.com"]["response"]), ("skipped", "free plan: no offer"))
        self.assertEqual(rep["a@example.com"]["status"], "written")
        import email
        import email.policy
        with open(rep["a@example.com"]["response"] if os.path.isabs(rep["a@example.com"]["response"])
                  else self.path(rep["a@example.com"]["response"]), "rb") as f:
            msg = email.message_from_binary_file(f, policy=email.policy.default)
        self.assertEqual(str(msg["Subject"]), "ZOé, your gold offer")   # upper() is ASCII-only, as documented
        self.assertEqual(str(msg["X-Plan"]), "gold")
        self.assertEqual(msg.get_content_type(), "multipart/mixed")
        atts = list(msg.iter_attachments())
        self.assertEqual(len(atts), 1)
        self.assertEqual(atts[0].get_filename(), "offer.pdf")
        self.assertEqual(atts[0].get_content_type(), "application/pdf")
        self.assertEqual(atts[0].get_content(), pdf)
        self.assertEqual(msg.get_body(("plain",)).get_content().strip(), "Hi Zoé")
        self.assertEqual(msg.defects, [])

    def test_duplicate_addresses_are_sent_once_and_reported_as_skipped(self):
        rows = [["a@example.com", "A"], ["b@example.com", "B"], ["A@Example.com", "A2"], ["a@example.com", "A3"]]
        script = self.example_copy(rows)
        srv = self.start_smtpd(tls=True, auth={"news": PW})
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=self.relay_env(srv))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        rep = {int(r["line"]): r for r in read_report(self.path("r.csv"))}
        self.assertEqual([rep[i]["status"] for i in (2, 3, 4, 5)], ["sent", "sent", "skipped", "skipped"])
        self.assertIn("duplicate address", rep[4]["response"])
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in srv.messages()), ["a@example.com", "b@example.com"])

    @valgrind_redundant("test_dry_run_writes_parseable_messages_and_sends_nothing, "
                        "test_bad_rows_are_reported_with_line_numbers_and_the_run_goes_on")
    def test_preview_prints_one_message(self):
        script = self.example_copy([["a@example.com", "Ann"], ["b@example.com", "Bo"]])
        p = self.run_mailshot("preview", script, "--row", "3")          # CSV line 3: the second recipient
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("Subject: Hello Bo", p.stdout)
        self.assertIn("To: b@example.com", p.stdout)
        p = self.run_mailshot("preview", script, "--row", "4")
        self.assertEqual(p.returncode, 2)
        self.assertIn("has 3 lines and no recipient row on line 4", p.stderr)

    def test_script_errors_are_reported_with_file_and_line_before_anything_is_sent(self):
        d = self.path("c")
        os.makedirs(d)
        with open(os.path.join(d, "bad.lua"), "w") as f:
            f.write('local mailshot = require "mailshot"\nreturn mailshot.campaign {\n  recipients = "x.csv",\n  text = mailshot.template.file "nope.txt",\n}\n')
        p = self.run_mailshot("run", os.path.join(d, "bad.lua"), "--send")
        self.assertEqual(p.returncode, 2)
        self.assertIn("nope.txt", p.stderr)
        self.assertIn("bad.lua:4", p.stderr)
        with open(os.path.join(d, "syntax.lua"), "w") as f:
            f.write('local x = \nreturn {\n')
        p = self.run_mailshot("run", os.path.join(d, "syntax.lua"))
        self.assertEqual(p.returncode, 2)
        self.assertIn("syntax.lua:", p.stderr)


if __name__ == "__main__":
    unittest.main()
