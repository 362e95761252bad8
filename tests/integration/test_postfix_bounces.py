"""Real DSNs from a real Postfix: a campaign relayed through a private Postfix instance (started by the
test, harness.start_postfix) to an aiosmtpd that rejects the dead addresses; Postfix returns each
rejection to the envelope sender as an RFC 3464 delivery status notification, delivered into its
bounce Maildir, which is what `mailshot bounces` reads in production."""
import os
import smtplib
import socket

from tests.integration.harness import (MailshotTestCase, live_processes_in_group, read_report,
                                       write_csv)

# the downstream receiver's answers (aiosmtpd --reject-rcpt PATTERN:CODE:TEXT)
DEAD = {"dead1@x.test": "5.1.1 <dead1@x.test>: Recipient address rejected: User unknown",
        "dead2@y.test": "5.1.1 No such mailbox here"}
LIVE = ["live1@x.test", "live2@y.test", "live3@x.test"]

CAMPAIGN = """\
local mailshot = require "mailshot"
return mailshot.campaign {{
  recipients = "recipients.csv",
  from       = "Acme News <{sender}>",
  subject    = "Hello {{{{first_name}}}}",
  text       = "Hello {{{{first_name}}}},\\nthe news.\\n",
  send       = mailshot.relay {{ server = "{relay}", tls = "none" }},{extra}
}}
"""


def delivery_status(msg):
    """(per-message fields, [per-recipient fields]) of a multipart/report DSN, as dicts of str with
    lower-case keys."""
    parts = [p for p in msg.iter_parts() if p.get_content_type() == "message/delivery-status"]
    if len(parts) != 1:
        raise AssertionError(f"{len(parts)} message/delivery-status parts in {msg.path}")
    blocks = parts[0].get_payload()       # the email package parses the field groups as messages
    # a long field is folded (RFC 5322 2.2.3); its value is the unfolded text, blanks run together
    fields = [{k.lower(): " ".join(str(v).split()) for k, v in b.items()} for b in blocks]
    return fields[0], fields[1:]


def returned_message(msg):
    """The original message attached to a DSN (message/rfc822 or text/rfc822-headers), or None."""
    for p in msg.iter_parts():
        if p.get_content_type() == "message/rfc822":
            return p.get_payload()[0]
    return None


class PostfixBounceTests(MailshotTestCase):
    def campaign(self, relay, rows, sender, extra=""):
        d = self.path("campaign")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "recipients.csv"), ["email", "first_name"], rows)
        script = os.path.join(d, "campaign.lua")
        with open(script, "w") as f:
            f.write(CAMPAIGN.format(sender=sender, relay=relay, extra=extra))
        return script

    def test_postfix_writes_one_real_dsn_per_dead_address_and_relays_the_live_ones(self):
        sink = self.start_smtpd(reject_rcpt=[(a, 550, text) for a, text in DEAD.items()])
        # without VERP the bounces go to the From address: Postfix's mailbox for acme.example
        mta = self.start_postfix(sink.port, bounce_domain="acme.example", mailboxes=("news",))
        rows = [[a, a.split("@")[0].title()] for a in ["live1@x.test", "dead1@x.test", "live2@y.test",
                                                       "dead2@y.test", "live3@x.test"]]
        script = self.campaign(mta.address, rows, "news@acme.example")
        r = self.run_mailshot("run", script, "--send", "--report", self.path("report.csv"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr[-3000:])
        # Postfix accepted every message: the dead addresses fail later, downstream
        report = read_report(self.path("report.csv"))
        self.assertEqual({x["email"]: x["status"] for x in report}, {row[0]: "sent" for row in rows})

        mta.wait_until_idle(timeout=10)
        got = sink.messages()
        self.assertEqual(sorted(rcpt for m in got for rcpt in m["rcpt_tos"]), sorted(LIVE))
        self.assertTrue(all(m["mail_from"] == "news@acme.example" for m in got), got)
        self.assertTrue(all("mta.acme.example (Postfix)" in str(m["msg"]["Received"]) for m in got))

        bounces = mta.bounces()
        self.assertEqual(len(bounces), len(DEAD), [b.path for b in bounces])
        seen = {}
        for b in bounces:
            self.assertEqual(b.get_content_type(), "multipart/report")
            self.assertEqual(b.get_param("report-type"), "delivery-status")
            self.assertEqual(b["Delivered-To"], "news@acme.example")
            self.assertEqual(b["Return-Path"], "<>")          # a DSN has the null sender (RFC 3464 2.)
            self.assertRegex(str(b["From"]), r"MAILER-DAEMON@mta\.acme\.example")
            per_msg, per_rcpt = delivery_status(b)
            self.assertEqual(per_msg["reporting-mta"], "dns; mta.acme.example")
            self.assertEqual(len(per_rcpt), 1, per_rcpt)
            rc = per_rcpt[0]
            self.assertEqual(rc["action"], "failed")
            self.assertEqual(rc["status"], "5.1.1")
            addr = rc["final-recipient"].split(";", 1)[1].strip()
            self.assertIn(addr, DEAD)
            self.assertEqual(rc["diagnostic-code"], f"smtp; 550 {DEAD[addr]}")
            self.assertEqual(rc["remote-mta"], "dns; 127.0.0.1")
            orig = returned_message(b)
            self.assertIsNotNone(orig, f"no returned message in {b.path}")
            self.assertEqual(str(orig["To"]), addr)
            self.assertEqual(str(orig["Subject"]), "Hello " + addr.split("@")[0].title())
            seen[addr] = b
        self.assertEqual(set(seen), set(DEAD))


class PostfixHarnessTests(MailshotTestCase):
    """The private Postfix instance itself (harness.start_postfix): this tests the test tooling."""

    def test_private_postfix_delivers_plus_addresses_to_one_maildir_and_leaves_nothing_behind(self):
        def etc_postfix():
            out = {}
            for root, _dirs, files in os.walk("/etc/postfix"):
                for f in files:
                    st = os.lstat(os.path.join(root, f))
                    out[os.path.join(root, f)] = (st.st_mtime_ns, st.st_size, st.st_mode)
            return out
        before = etc_postfix()
        sink = self.start_smtpd()
        mta = self.start_postfix(sink.port)
        self.assertTrue(mta.running())
        with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
            s.ehlo("client.test")
            # the bounce domain: b and b+anything land in the one Maildir, another name is refused
            s.sendmail("x@x.test", ["b+TOKEN@bounces.acme.example"], b"Subject: one\r\n\r\none\r\n")
            s.sendmail("x@x.test", ["b@bounces.acme.example"], b"Subject: two\r\n\r\ntwo\r\n")
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as cm:
                s.sendmail("x@x.test", ["c@bounces.acme.example"], b"Subject: no\r\n\r\nno\r\n")
            self.assertEqual(cm.exception.recipients["c@bounces.acme.example"][0], 550)
            # anything else is relayed to the aiosmtpd
            s.sendmail("x@x.test", ["someone@x.test"], b"Subject: three\r\n\r\nthree\r\n")
        mta.wait_until_idle()
        got = mta.bounces()
        self.assertEqual(sorted(str(m["Subject"]) for m in got), ["one", "two"])
        self.assertEqual(sorted(m["Delivered-To"] for m in got),
                         ["b+TOKEN@bounces.acme.example", "b@bounces.acme.example"])
        self.assertEqual([m["rcpt_tos"] for m in sink.messages()], [["someone@x.test"]])
        self.assertIn("relay=127.0.0.1[127.0.0.1]", mta.log_text())

        pgid, base, port = mta.master_pid, mta.base, mta.port
        mta.stop()
        self.assertEqual(live_processes_in_group(pgid), [], "a Postfix process outlived stop()")
        self.assertFalse(os.path.exists(base))
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        self.assertEqual(etc_postfix(), before, "the private instance changed /etc/postfix")
