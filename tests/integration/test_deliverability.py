"""Suppression lists, role addresses, hard bounces written for the next campaign, and one-click
unsubscribe headers (RFC 8058) with the link in the body, through a real server."""
import os
import unittest

from tests.integration.harness import MailshotTestCase, read_report, write_csv, valgrind_redundant

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none" }
return mailshot.campaign {
  recipients = "list.csv", from = "Acme <news@acme.example>", subject = "News for {{name}}",
  text = "Hello {{name}}\\nUnsubscribe: {{unsubscribe_url}}\\n",
  suppress = { "unsubscribed.csv", "blocked.txt" }, suppress_roles = true, bounces_to = "bounced.txt",
  unsubscribe = { url = "https://acme.example/u/{{token}}", mailto = "unsub@acme.example",
                  secret = "0123456789abcdef-test-secret" },
  send = relay,
}
"""


class DeliverabilityTests(MailshotTestCase):
    @valgrind_redundant(
        "test_campaign.test_report_cells_that_a_spreadsheet_would_run_as_formulas_get_a_quote_prefix, "
        "test_verp.test_relay_mail_from_is_each_rows_signed_return_path")
    def test_suppressed_roles_bounces_and_unsubscribe(self):
        d = self.path("c")
        os.makedirs(d)
        rows = [["ok@example.com", "Ok"], ["Gone@Example.com", "Gone"], ["x@blocked.example", "X"],
                ["postmaster@example.com", "P"], ["nouser@example.com", "N"], ["amp@example.com", "A & B"]]
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], rows)
        write_csv(os.path.join(d, "unsubscribed.csv"), ["email", "date"], [["gone@example.com", "2026-01-01"]])
        with open(os.path.join(d, "blocked.txt"), "w") as f:
            f.write("# whole domains\n@blocked.example\n")
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        srv = self.start_smtpd(reject_rcpt=[("nouser@", 550, "5.1.1 no such user")])
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--report", "r.csv",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)    # the 550
        rep = {r["email"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual(rep["Gone@Example.com"]["status"], "skipped")
        self.assertIn("unsubscribed.csv", rep["Gone@Example.com"]["response"])
        self.assertEqual(rep["x@blocked.example"]["status"], "skipped")
        self.assertIn("blocked.txt", rep["x@blocked.example"]["response"])
        self.assertEqual(rep["postmaster@example.com"]["status"], "skipped")
        self.assertIn("role address", rep["postmaster@example.com"]["response"])
        self.assertEqual(rep["nouser@example.com"]["status"], "failed")
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in srv.messages()), ["amp@example.com", "ok@example.com"])
        for m in srv.messages():
            msg = m["msg"]
            lu = str(msg["List-Unsubscribe"])
            self.assertRegex(lu, r"^<https://acme\.example/u/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+>, <mailto:unsub@acme\.example\?subject=")
            self.assertEqual(str(msg["List-Unsubscribe-Post"]), "List-Unsubscribe=One-Click")
            url = lu[1:lu.index(">")]
            self.assertIn("Unsubscribe: " + url, msg.get_content())
        # the hard bounce is written for next time, and the next run skips it
        with open(os.path.join(d, "bounced.txt")) as f:
            self.assertIn("nouser@example.com", f.read())
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--force", "--report", "r2.csv",
                              env={"SMTP_SERVER": srv.address})
        rep2 = {r["email"]: r for r in read_report(self.path("r2.csv"))}
        self.assertEqual(rep2["nouser@example.com"]["status"], "skipped")
        self.assertIn("bounced.txt", rep2["nouser@example.com"]["response"])

    def test_a_missing_suppression_file_stops_the_script_before_sending(self):
        d = self.path("c")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [["ok@example.com", "Ok"]])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        srv = self.start_smtpd()
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--report", "r.csv",
                              env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 2)
        self.assertIn("unsubscribed.csv", p.stderr)
        self.assertEqual(srv.connections(), 0)


if __name__ == "__main__":
    unittest.main()
