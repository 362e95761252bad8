"""Recipient lists that are not UTF-8: refused or warned about without an encoding, converted with one."""
import os

from tests.integration.harness import MailshotTestCase, free_port, read_report, valgrind_redundant

HEADER = "email,first_name,last_name\r\n"


class CsvEncodingTests(MailshotTestCase):
    def campaign(self, data, fields=""):
        d = self.path("c")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "list.csv"), "wb") as f:
            f.write(data)
        with open(os.path.join(d, "c.lua"), "w", encoding="utf-8") as f:
            f.write('local mailshot = require "mailshot"\n'
                    'local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none" }\n'
                    'return mailshot.campaign { recipients = "list.csv", from = "News <x@example.org>",\n'
                    '  send = relay, subject = "Hallo {{first_name}}", text = "Liebe(r) {{first_name}} {{last_name}}",\n'
                    f'  to_name = "{{{{first_name}}}} {{{{last_name}}}}", {fields} }}\n')
        return os.path.join(d, "c.lua")

    def latin1_list(self):
        return (HEADER + "ann@example.com,Ann,Smith\r\n"
                "zoe@example.com,Zoë,Müller\r\n"
                "nandu@example.com,Ñandú,Ibáñez\r\n"
                "anna@bücher.test,Anna,Groß\r\n").encode("latin-1")

    def by_rcpt(self, srv):
        msgs = srv.messages()
        for m in msgs:
            self.assertEqual(len(m["rcpt_tos"]), 1)
        return {m["rcpt_tos"][0]: m["msg"] for m in msgs}

    @valgrind_redundant("test_row_rules.test_preview_preflight_dry_run_and_send_agree_on_every_row, "
                        "test_preflight.test_a_list_that_is_not_utf8_without_an_encoding_blocks")
    def test_a_latin1_list_without_encoding_is_refused_by_send_and_skipped_by_a_dry_run(self):
        script = self.campaign(self.latin1_list())
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        err = p.stderr
        # the file, the first bad line, its column and byte offset, how many lines, what to declare
        offset = len((HEADER + "ann@example.com,Ann,Smith\r\nzoe@example.com,Zo").encode())
        self.assertIn("list.csv is not valid UTF-8: line 3, column 'first_name', byte 0xEB at offset %d (3 lines in all)"
                      % offset, err)
        self.assertIn('encoding = "latin-1"', err)
        self.assertIn('encoding = "windows-1252"', err)
        self.assertIn("not sending", err)
        self.assertEqual(srv.message_count(), 0)
        self.assertFalse(os.path.exists(self.path("r.csv")), "refused before the report is created")

        # the dry run warns, and skips those rows (every one in the report) instead of writing mojibake
        p = self.run_mailshot("run", script, "--outbox", "out", "--report", "d.csv",
                              env={"SMTP_SERVER": f"127.0.0.1:{free_port()}"})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("warning: ", p.stderr)
        self.assertIn("line 3, column 'first_name'", p.stderr)
        rep = {r["line"]: r for r in read_report(self.path("d.csv"))}
        self.assertEqual(sorted(rep), ["2", "3", "4", "5"])
        self.assertEqual(rep["2"]["status"], "written")
        for line, field in (("3", "field 2 (first_name)"), ("4", "field 2 (first_name)"), ("5", "field 1 (email)")):
            self.assertEqual(rep[line]["status"], "skipped", rep[line])
            self.assertIn("line %s: %s is not valid utf-8" % (line, field), rep[line]["response"])
        self.assertEqual(len(os.listdir(self.path("out"))), 1)

    @valgrind_redundant("test_latin1_declared_sends_correct_utf8_names, "
                        "test_preflight.test_a_list_that_is_not_utf8_without_an_encoding_blocks")
    def test_preview_warns_and_shows_the_converted_row(self):
        script = self.campaign(self.latin1_list())
        p = self.run_mailshot("preview", script, env={"SMTP_SERVER": f"127.0.0.1:{free_port()}"})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("warning: ", p.stderr)
        self.assertIn("is not valid UTF-8: line 3, column 'first_name'", p.stderr)
        script = self.campaign(self.latin1_list(), 'encoding = "latin-1"')
        p = self.run_mailshot("preview", script, "--row", "3", env={"SMTP_SERVER": f"127.0.0.1:{free_port()}"})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(p.stderr, "")
        self.assertIn("Subject: =?UTF-8?", p.stdout)
        self.assertIn("Liebe(r) Zo=C3=AB M=C3=BCller", p.stdout)

    def test_latin1_declared_sends_correct_utf8_names(self):
        script = self.campaign(self.latin1_list(), 'encoding = "latin-1"')
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertNotIn("warning", p.stderr)
        got = self.by_rcpt(srv)
        # the converted address goes through IDNA like any UTF-8 one
        self.assertEqual(set(got), {"ann@example.com", "zoe@example.com", "nandu@example.com",
                                    "anna@xn--bcher-kva.test"})
        for addr, first, last in (("zoe@example.com", "Zoë", "Müller"), ("nandu@example.com", "Ñandú", "Ibáñez"),
                                  ("anna@xn--bcher-kva.test", "Anna", "Groß")):
            msg = got[addr]
            self.assertEqual(msg["To"].addresses[0].display_name, f"{first} {last}")
            self.assertEqual(msg["Subject"], f"Hallo {first}")
            self.assertEqual(msg.get_content().strip(), f"Liebe(r) {first} {last}")
        rep = {r["line"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual([rep[k]["status"] for k in sorted(rep)], ["sent"] * 4)
        self.assertEqual(rep["5"]["email"], "anna@bücher.test")     # the report has the row's UTF-8

    @valgrind_redundant("test_latin1_declared_sends_correct_utf8_names, "
                        "test_preflight.test_a_list_that_is_not_utf8_without_an_encoding_blocks")
    def test_windows_1252_curly_quotes_and_euro_and_an_undefined_byte(self):
        data = (HEADER + "ann@example.com,“Ann”,O’Brien – 5 €\r\n").encode("cp1252") \
            + b"bob@example.com,Bob,Bad\x81Byte\r\n" \
            + "eve@example.com,Œdipe,Šimon\r\n".encode("cp1252")
        script = self.campaign(data, 'encoding = "windows-1252"')
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        # declared: the run goes on, and says which rows it skips
        self.assertIn("1 line is not valid windows-1252 (first: line 3, column 'last_name', byte 0x81 at offset", p.stderr)
        got = self.by_rcpt(srv)
        self.assertEqual(set(got), {"ann@example.com", "eve@example.com"})
        self.assertEqual(got["ann@example.com"]["To"].addresses[0].display_name, "“Ann” O’Brien – 5 €")
        self.assertEqual(got["ann@example.com"]["Subject"], "Hallo “Ann”")
        self.assertEqual(got["eve@example.com"].get_content().strip(), "Liebe(r) Œdipe Šimon")
        rep = {r["line"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual(rep["3"]["status"], "skipped")
        self.assertIn("line 3: field 3 (last_name) is not valid windows-1252: byte 0x81 at byte 4 of the field",
                      rep["3"]["response"])

    def test_an_unknown_encoding_stops_the_script(self):
        script = self.campaign(self.latin1_list(), 'encoding = "ebcdic"')
        p = self.run_mailshot("run", script, "--outbox", "out", "--report", "d.csv",
                              env={"SMTP_SERVER": f"127.0.0.1:{free_port()}"})
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn("encoding 'ebcdic' is not one of", p.stderr)
