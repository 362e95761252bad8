"""Campaign templates against the CSV: the To display name (to_name) and fields no column has."""
import email
import email.policy
import os

from tests.integration.harness import MailshotTestCase, free_port, write_csv, valgrind_redundant

HOSTILE_ROWS = [
    ["a@example.com", "José", "Núñez"],                     # non-ASCII: RFC 2047 encoded words
    ["b@example.com", "Eve\r\nBcc: x@evil.test", "Smith"],  # CR/LF cannot add a header
    ["c@example.com", "a <evil@x.test>", ""],               # <...> cannot change the address
    ["d@example.com", 'O"Brien, Jr.', "\\x"],               # quotes and specials are quoted
    ["e@example.com", "", ""],                              # empty rendering: a bare address
]


class CampaignFieldTests(MailshotTestCase):
    def campaign(self, header, rows, fields):
        d = self.path("c")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), header, rows)
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write('local mailshot = require "mailshot"\n'
                    'local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none" }\n'
                    'return mailshot.campaign { recipients = "list.csv", from = "News <x@example.org>",\n'
                    f'  send = relay, {fields} }}\n')
        return os.path.join(d, "c.lua")

    def check_to(self, by_rcpt):
        self.assertEqual(set(by_rcpt), {r[0] for r in HOSTILE_ROWS})
        for addr, msg in by_rcpt.items():
            self.assertIsNone(msg["Bcc"], addr)
            self.assertEqual(len(msg.get_all("To")), 1, addr)
            (to,) = msg["To"].addresses
            self.assertEqual(to.addr_spec, addr)
        self.assertEqual(by_rcpt["a@example.com"]["To"].addresses[0].display_name, "José Núñez")
        self.assertIn("=?UTF-8?", by_rcpt["a@example.com"].as_string())
        self.assertIn("Eve", by_rcpt["b@example.com"]["To"].addresses[0].display_name)
        self.assertIn("Smith", by_rcpt["b@example.com"]["To"].addresses[0].display_name)
        self.assertEqual(by_rcpt["c@example.com"]["To"].addresses[0].display_name, "a <evil@x.test>")
        self.assertEqual(by_rcpt["d@example.com"]["To"].addresses[0].display_name, 'O"Brien, Jr. \\x')
        self.assertEqual(str(by_rcpt["e@example.com"]["To"]), "e@example.com")

    @valgrind_redundant("test_csv_encoding.test_latin1_declared_sends_correct_utf8_names, "
                        "test_campaign.test_bad_rows_are_reported_with_line_numbers_and_the_run_goes_on")
    def test_to_name_is_the_display_name_and_never_the_address(self):
        script = self.campaign(["email", "first_name", "last_name"], HOSTILE_ROWS,
                               'subject = "hi", text = "hello", to_name = [[{{first_name|""}} {{last_name|""}}]]')
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        msgs = srv.messages()
        for m in msgs:
            self.assertEqual(len(m["rcpt_tos"]), 1)
        self.check_to({m["rcpt_tos"][0]: m["msg"] for m in msgs})
        # the dry run writes the same To headers
        p = self.run_mailshot("run", script, "--outbox", "out", "--report", "d.csv",
                              env={"SMTP_SERVER": f"127.0.0.1:{free_port()}"})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        by_rcpt = {}
        for name in os.listdir(self.path("out")):
            with open(self.path("out", name), "rb") as f:
                msg = email.message_from_binary_file(f, policy=email.policy.default)
            by_rcpt[msg["To"].addresses[0].addr_spec] = msg
        self.check_to(by_rcpt)

    @valgrind_redundant("test_verp.test_relay_mail_from_is_each_rows_signed_return_path")
    def test_a_field_no_column_has_stops_the_run_before_anything_is_sent(self):
        script = self.campaign(["email", "first_name"], [["a@example.com", "Ann"], ["b@example.com", "Bo"]],
                               'subject = "Hello {{frist_name}}", text = "hi"')
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        err = p.stderr
        self.assertEqual(err.count("frist_name"), 3, err)          # the field, and the two hints
        self.assertIn('subject: template subject uses field "frist_name"', err)
        self.assertIn("(columns: email, first_name)", err)
        self.assertIn('did you mean "first_name"?', err)
        self.assertEqual(srv.message_count(), 0)
        self.assertFalse(os.path.exists(self.path("r.csv")), "the run refuses before creating the report")
        p = self.run_mailshot("run", script, "--outbox", "out", "--report", "d.csv",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn('did you mean "first_name"?', p.stderr)
        self.assertFalse(os.path.exists(self.path("out")))
        p = self.run_mailshot("preflight", script, env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn('uses field "frist_name"', p.stderr)
        # a case-only difference is suggested too; a header template is checked
        script = self.campaign(["email", "First_Name"], [["a@example.com", "Ann"]],
                               'subject = "s", text = "hi", headers = { ["X-Who"] = "{{first_name}}" }')
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn('headers.X-Who: template headers.X-Who uses field "first_name"', p.stderr)
        self.assertIn('did you mean "First_Name"?', p.stderr)
        self.assertEqual(srv.message_count(), 0)

    def test_defaulted_or_guarded_missing_fields_still_run(self):
        script = self.campaign(["email", "first_name"], [["a@example.com", "Ann"]],
                               'subject = [[Hello {{ frist_name | "there" }}]], '
                               'text = "{{#if nick}}Hi {{nick}}{{else}}Hello{{/if}} {{#unless title}}x{{else}}{{title}}{{/unless}}", '
                               'to_name = [[{{ upper(first_name) }}]]')
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        (m,) = srv.messages()
        self.assertEqual(str(m["msg"]["Subject"]), "Hello there")
        self.assertEqual(m["msg"].get_content().strip(), "Hello x")
        self.assertEqual(m["msg"]["To"].addresses[0].display_name, "ANN")
