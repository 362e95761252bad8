"""preview, preflight and run (dry and --send) judge every recipient row by the same rules
(mailshot.classify): an IDN address is sent in its A-label form and is valid for all of them, an
address with a line break and a second RCPT in it is refused by all of them, and suppressed, role,
duplicate and invalid rows are skipped alike."""
import os
import re

from tests.integration.harness import MailshotTestCase, read_report, write_csv, valgrind_redundant

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = os.getenv "SMTP_SERVER" and mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none" }
return mailshot.campaign {
  recipients = "list.csv", from = "News <news@acme.test>", subject = "Hi {{name}}",
  text = "Hello {{name}}", suppress = "unsubscribed.txt", suppress_roles = true, send = relay,
}
"""

INJECTED = "a@good.test>\r\nRCPT TO:<evil@x.test>"

# (email, name, what every command must make of it)
ROWS = [
    ("ann@good.test", "Ann", "send"),
    ("user@bücher.test", "Idn", "send"),            # goes out as user@xn--bcher-kva.test
    ("not an address", "X", "invalid"),
    (INJECTED, "Eve", "invalid"),
    ("gone@good.test", "Gone", "suppressed"),
    ("postmaster@good.test", "Role", "suppressed"),
    ("ANN@good.test", "Dup", "duplicate"),
    ("", "Nobody", "invalid"),
    ("bob@good.test", "Bob", "send"),
]
IDN_ASCII = "user@xn--bcher-kva.test"


class RowRulesTests(MailshotTestCase):
    def setUp(self):
        super().setUp()
        d = self.path("c")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [[e, n] for e, n, _ in ROWS])
        with open(os.path.join(d, "unsubscribed.txt"), "w") as f:
            f.write("gone@good.test\n")
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        self.script = os.path.join(d, "c.lua")
        # the data rows start on line 2; the injected field spans two lines
        self.lines, line = [], 2
        for e, _, _ in ROWS:
            self.lines.append(line)
            line += 1 + e.count("\n")

    def expected(self, what):
        return [self.lines[i] for i, (_, _, w) in enumerate(ROWS) if w == what]

    def recipients(self, rows_sent):
        return sorted(IDN_ASCII if e == "user@bücher.test" else e for e, _, w in ROWS if w == "send")

    @valgrind_redundant("test_examples.test_fallback_example_routes_each_recipient_by_its_rules, "
                        "test_verp.test_relay_mail_from_is_each_rows_signed_return_path")
    def test_preview_preflight_dry_run_and_send_agree_on_every_row(self):
        # preview: the rows run sends render; every other row is refused, saying why
        previewed = []
        for i, (e, _, what) in enumerate(ROWS):
            p = self.run_mailshot("preview", self.script, "--row", str(self.lines[i]))
            if what == "send":
                self.assertEqual(p.returncode, 0, p.stderr)
                to = re.search(r"^To: (.*)$", p.stdout, re.M).group(1).strip()
                previewed.append(to)
            else:
                self.assertEqual(p.returncode, 1, (e, p.stdout, p.stderr))
                self.assertIn("`run` skips this row", p.stderr)
                self.assertNotIn("evil@x.test", p.stdout)
                self.assertEqual(p.stdout, "")
        self.assertEqual(sorted(previewed), self.recipients(ROWS))

        # dry run: written exactly for the rows to send, skipped for the rest
        p = self.run_mailshot("run", self.script, "--outbox", "out", "--report", "dry.csv")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        dry = {int(r["line"]): r for r in read_report(self.path("dry.csv"))}
        self.assertEqual(sorted(dry), self.lines)                   # every row in the report
        self.assertEqual(sorted(n for n, r in dry.items() if r["status"] == "written"), self.expected("send"))
        invalid = sorted(n for n, r in dry.items() if r["response"].startswith(("invalid email address", "no 'email'")))
        self.assertEqual(invalid, self.expected("invalid"))
        self.assertEqual(sorted(n for n, r in dry.items() if r["response"].startswith("duplicate address")),
                         self.expected("duplicate"))
        self.assertEqual(len(os.listdir(self.path("out"))), len(self.expected("send")))

        # --send against a real server: the envelope recipients are those of preview
        srv = self.start_smtpd()
        p = self.run_mailshot("run", self.script, "--send", "--report", "sent.csv", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        sent = {int(r["line"]): r for r in read_report(self.path("sent.csv"))}
        self.assertEqual({n: r["status"] for n, r in sent.items() if r["status"] != "skipped"},
                         {n: "sent" for n in self.expected("send")})
        self.assertEqual({n for n, r in sent.items() if r["status"] == "skipped"},
                         {n for n, r in dry.items() if r["status"] == "skipped"})
        rcpts = sorted(r for m in srv.messages() for r in m["rcpt_tos"])
        self.assertEqual(rcpts, self.recipients(ROWS))
        self.assertNotIn("evil@x.test", rcpts)

        # preflight: the same counts, the same invalid lines, the IDN domain in its A-label form
        dns = self.start_dns({"mx": [("good.test", "mx.good.test", 10), ("xn--bcher-kva.test", "mx.good.test", 10)],
                              "a": [("mx.good.test", "127.0.0.2")]})
        p = self.run_mailshot("preflight", self.script, "--dns", dns.address, "--timeout", "1")
        out = p.stdout
        self.assertIn(f"{len(ROWS)} rows, 2 distinct domains", out)
        self.assertRegex(out, r"\n\s+2\s+good\.test\n")
        self.assertRegex(out, r"\n\s+1\s+xn--bcher-kva\.test\n")
        flagged = sorted(int(n) for n in re.findall(r"list\.csv line (\d+): invalid address", out))
        self.assertEqual(flagged, self.expected("invalid"))
        self.assertIn(f"{len(self.expected('suppressed'))} suppressed addresses will be skipped", out)
        self.assertIn(f"{len(self.expected('duplicate'))} duplicate rows will be skipped", out)

    def test_preflight_counts_the_idn_address_run_sends_and_not_the_injected_one(self):
        dns = self.start_dns({"mx": [("good.test", "mx.good.test", 10), ("xn--bcher-kva.test", "mx.good.test", 10)],
                              "a": [("mx.good.test", "127.0.0.2")]})
        p = self.run_mailshot("preflight", self.script, "--dns", dns.address, "--timeout", "1")
        self.assertNotIn("bücher", p.stdout)                       # not called invalid
        self.assertRegex(p.stdout, r"\n\s+1\s+xn--bcher-kva\.test\n")
        self.assertRegex(p.stdout, r"(?s)list\.csv line 5: invalid address .*: '<' or '>' in address\n")

    def test_campaign_message_refuses_the_injected_row(self):
        # the Lua API: campaign:message() of a row run skips returns nil, why, and no envelope
        with open(self.path("m.lua"), "w") as f:
            f.write("""
local c = dofile(arg[1])
for _, email in ipairs { "a@good.test>\\r\\nRCPT TO:<evil@x.test>", "user@bücher.test" } do
  local m, why, kind = c:message({ email = email, name = "N" }, 2)
  if m then print("TO", table.concat(m.to, ",")) else print("SKIP", kind, why) end
end
""")
        p = self.run_mailshot("exec", self.path("m.lua"), self.script, cwd=self.path("c"))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        lines = p.stdout.splitlines()
        self.assertTrue(lines[0].startswith("SKIP\tinvalid\tinvalid email address"), lines)
        self.assertNotIn("evil", p.stdout)
        self.assertEqual(lines[1], "TO\t" + IDN_ASCII)
