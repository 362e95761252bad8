"""Real DSNs from a real Postfix: a campaign relayed through a private Postfix instance (started by the
test, harness.start_postfix) to an aiosmtpd that rejects the dead addresses; Postfix returns each
rejection to the envelope sender as an RFC 3464 delivery status notification, delivered into its
bounce Maildir, which is what `mailshot bounces` reads in production."""
import email.message
import email.policy
import email.utils
import os
import smtplib
import socket

from tests.integration.harness import (MailshotTestCase, live_processes_in_group, read_report,
                                       skip_under_valgrind, start_dovecot, write_csv)

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


def etc_postfix():
    """The system Postfix's configuration: {path: (mtime, size, mode)}."""
    out = {}
    for root, _dirs, files in os.walk("/etc/postfix"):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_mtime_ns, st.st_size, st.st_mode)
    return out


class PostfixBounceTests(MailshotTestCase):
    def campaign(self, relay, rows, sender, extra=""):
        d = self.path("campaign")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "recipients.csv"), ["email", "first_name"], rows)
        script = os.path.join(d, "campaign.lua")
        with open(script, "w") as f:
            f.write(CAMPAIGN.format(sender=sender, relay=relay, extra=extra))
        return script

    @skip_under_valgrind("mailshot run --send through Postfix runs under valgrind in test_done_when_maildir")
    def test_postfix_writes_real_dsns_and_bounces_matches_them_by_address_without_verp(self):
        """One failed DSN per dead address and a delay warning for a busy mailbox, all real Postfix
        output; without a VERP return path `mailshot bounces` ties them to the campaign by the DSN's
        Final-Recipient, found in the campaign's list."""
        before = etc_postfix()
        sink = self.start_smtpd(reject_rcpt=[(a, 550, text) for a, text in DEAD.items()]
                                + [("busy@y.test", 452, "4.2.2 Mailbox full, try again later")])
        # without VERP the bounces go to the From address: Postfix's mailbox for acme.example.  This
        # instance keeps a deferred message (an hour) and warns its sender after a second in the queue:
        # the warning goes out at the first retry (queue_run_delay, minimal_backoff_time: 1 s)
        mta = self.start_postfix(sink.port, bounce_domain="acme.example", mailboxes=("news",),
                                 extra={"maximal_queue_lifetime": "1h", "delay_warning_time": "1s"})
        emails = ["live1@x.test", "dead1@x.test", "live2@y.test", "busy@y.test", "dead2@y.test", "live3@x.test"]
        rows = [[a, a.split("@")[0].title()] for a in emails]
        script = self.campaign(mta.address, rows, "news@acme.example", extra='\n  bounces_to = "bounced.txt",')
        r = self.run_mailshot("run", script, "--send", "--report", self.path("report.csv"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr[-3000:])
        # Postfix accepted every message: the dead addresses fail later, downstream
        report = read_report(self.path("report.csv"))
        self.assertEqual({x["email"]: x["status"] for x in report}, {a: "sent" for a in emails})

        bounces = mta.wait_for_bounces(len(DEAD) + 1, timeout=15)
        got = sink.wait_for_messages(len(LIVE))
        self.assertEqual(sorted(rcpt for m in got for rcpt in m["rcpt_tos"]), sorted(LIVE))
        self.assertTrue(all(m["mail_from"] == "news@acme.example" for m in got), got)
        self.assertTrue(all("mta.acme.example (Postfix)" in str(m["msg"]["Received"]) for m in got))

        self.assertEqual(len(bounces), len(DEAD) + 1, [b.path for b in bounces])
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
            addr = rc["final-recipient"].split(";", 1)[1].strip()
            if addr == "busy@y.test":
                self.assertEqual((rc["action"], rc["status"]), ("delayed", "4.2.2"))
                self.assertEqual(str(b["Subject"]), "Delayed Mail (still being retried)")
                self.assertEqual(rc["diagnostic-code"], "smtp; 452 4.2.2 Mailbox full, try again later")
            else:
                self.assertEqual((rc["action"], rc["status"]), ("failed", "5.1.1"))
                self.assertIn(addr, DEAD)
                self.assertEqual(rc["diagnostic-code"], f"smtp; 550 {DEAD[addr]}")
            self.assertEqual(rc["remote-mta"], "dns; 127.0.0.1")
            orig = returned_message(b)
            if orig is not None:        # a delay warning carries the headers only (text/rfc822-headers)
                self.assertEqual(str(orig["To"]), addr)
                self.assertEqual(str(orig["Subject"]), "Hello " + addr.split("@")[0].title())
            seen[addr] = b
        self.assertEqual(set(seen), {*DEAD, "busy@y.test"})

        r = self.run_mailshot("bounces", mta.maildir, "--campaign", script, "--report", self.path("b.csv"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        bounced = self.path("campaign", "bounced.txt")
        self.assertEqual(sorted(entries(bounced)), sorted(DEAD))
        actions = {x["address"]: (x["line"], x["class"], x["action"]) for x in read_report(self.path("b.csv"))}
        self.assertEqual(actions, {"dead1@x.test": ("3", "hard", "suppress"), "dead2@y.test": ("6", "hard", "suppress"),
                                   "busy@y.test": ("5", "soft", "count 1 of 3")})

        # the instance stops whole, leaves nothing behind and never touched the system's Postfix
        pgid, base, port = mta.master_pid, mta.base, mta.port
        mta.stop()
        self.assertEqual(live_processes_in_group(pgid), [], "a Postfix process outlived stop()")
        self.assertFalse(os.path.exists(base))
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        self.assertEqual(etc_postfix(), before, "the private instance changed /etc/postfix")


def entries(path):
    """The addresses of a suppression file, in order (comments and blank lines left out)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip() and not line.lstrip().startswith("#")]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


SECRET = "postfix-e2e-secret-0123456789"
VERP = """
  name        = "spring",
  bounces_to  = "bounced.txt",
  return_path = {{ domain = "bounces.acme.example", secret = os.getenv "BOUNCE_SECRET" }},"""
# the list of the end-to-end tests: live, dead (550 5.1.1 downstream) and a full mailbox (452 4.2.2)
E2E_ROWS = ["live1@x.test", "dead1@x.test", "full@y.test", "live2@y.test", "dead2@y.test", "live3@x.test"]
E2E_DEAD = {"dead1@x.test": "5.1.1 <dead1@x.test>: Recipient address rejected: User unknown",
            "dead2@y.test": "5.1.1 No such mailbox here"}
E2E_FULL = {"full@y.test": "4.2.2 Mailbox full, try again later"}


class PostfixDoneWhenTests(MailshotTestCase):
    """Issue 14's "Done when": a campaign with a VERP return path sent through Postfix to a list with
    dead addresses; `mailshot bounces` over Postfix's own bounce mailbox suppresses exactly the dead
    addresses, and the next run of the campaign skips them."""

    env = {"BOUNCE_SECRET": SECRET}

    def send_campaign(self, maildir=None, owner=None, rows=E2E_ROWS):
        """The downstream aiosmtpd, the private Postfix relaying to it, the campaign sent through it
        (all accepted by Postfix), and Postfix idle again: every DSN written.  -> (sink, mta, script)."""
        rejects = [(a, 550, t) for a, t in E2E_DEAD.items()] + [(a, 452, t) for a, t in E2E_FULL.items()]
        sink = self.start_smtpd(reject_rcpt=rejects)
        mta = self.start_postfix(sink.port, maildir=maildir, owner=owner)
        d = self.path("campaign")
        os.makedirs(d)
        write_csv(os.path.join(d, "recipients.csv"), ["email", "first_name"],
                  [[a, a.split("@")[0].title()] for a in rows])
        script = os.path.join(d, "campaign.lua")
        with open(script, "w") as f:
            f.write(CAMPAIGN.format(sender="news@acme.example", relay=mta.address, extra=VERP.format()))
        r = self.run_mailshot("run", script, "--send", "--report", self.path("sent.csv"), env=self.env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr[-3000:])
        self.assertEqual({x["email"]: x["status"] for x in read_report(self.path("sent.csv"))},
                         {a: "sent" for a in rows})
        mta.wait_until_idle(timeout=10)
        got = sink.messages()
        live = [a for a in rows if a not in E2E_DEAD and a not in E2E_FULL]
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in got), sorted(live))
        # every message left with its own VERP envelope sender (Postfix keeps MAIL FROM)
        senders = [m["mail_from"] for m in got]
        self.assertEqual(len(set(senders)), len(senders))
        self.assertTrue(all(s.startswith("b+") and s.endswith("@bounces.acme.example") for s in senders))
        return sink, mta, os.path.join(d, "bounced.txt"), script

    def check_dsns(self, mta):
        """Postfix's DSNs: one per dead address and one for the full mailbox, each delivered to the
        VERP address of its message, multipart/report with the real status."""
        bounces = mta.bounces()
        status = {}
        for b in bounces:
            self.assertEqual(b.get_param("report-type"), "delivery-status")
            self.assertRegex(b["Delivered-To"], r"^b\+[a-z2-7]{28}@bounces\.acme\.example$")
            _, per_rcpt = delivery_status(b)
            self.assertEqual(len(per_rcpt), 1)
            status[per_rcpt[0]["final-recipient"].split(";", 1)[1].strip()] = (
                per_rcpt[0]["action"], per_rcpt[0]["status"])
        self.assertEqual(status, {"dead1@x.test": ("failed", "5.1.1"), "dead2@y.test": ("failed", "5.1.1"),
                                  "full@y.test": ("failed", "4.2.2")})
        self.assertEqual(len(set(b["Delivered-To"] for b in bounces)), 3)

    def check_bounces_report(self, report, where_prefix):
        rows = {r["address"]: r for r in read_report(report)}
        self.assertEqual(set(rows), set(E2E_DEAD) | set(E2E_FULL), rows)
        for a in E2E_DEAD:
            self.assertEqual((rows[a]["class"], rows[a]["status"], rows[a]["action"]), ("hard", "5.1.1", "suppress"))
            self.assertEqual(rows[a]["campaign"], "spring")
            self.assertEqual(rows[a]["line"], str(E2E_ROWS.index(a) + 2))    # the header is line 1
            self.assertIn(E2E_DEAD[a].split(" ", 1)[1], rows[a]["diagnostic"])
        full = rows["full@y.test"]
        self.assertEqual((full["class"], full["status"], full["action"]), ("soft", "4.2.2", "count 1 of 3"))
        self.assertTrue(all(r["where"].startswith(where_prefix) for r in rows.values()), rows)

    def check_next_run_skips_the_dead(self, script):
        r = self.run_mailshot("run", script, "--outbox", self.path("outbox"), "--report", self.path("next.csv"),
                              env=self.env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr[-3000:])
        run = {x["email"]: x for x in read_report(self.path("next.csv"))}
        self.assertEqual(sorted(a for a, x in run.items() if x["status"] == "skipped"), sorted(E2E_DEAD))
        for a in E2E_DEAD:
            self.assertIn("suppressed: bounced.txt", run[a]["response"])
        self.assertEqual(sorted(a for a, x in run.items() if x["status"] == "written"),
                         sorted(a for a in E2E_ROWS if a not in E2E_DEAD))

    def test_done_when_maildir(self):
        sink, mta, bounced, script = self.send_campaign()
        self.check_dsns(mta)
        self.assertFalse(os.path.exists(bounced))     # nothing failed while sending: Postfix took it all

        r = self.run_mailshot("bounces", mta.maildir, "--campaign", script, "--report", self.path("b1.csv"),
                              env=self.env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(sorted(entries(bounced)), sorted(E2E_DEAD))
        self.check_bounces_report(self.path("b1.csv"), mta.maildir)
        with open(bounced + ".state") as f:
            soft = [line.split("\t")[1] for line in f if line.startswith("soft\t")]
        self.assertEqual(soft, ["full@y.test"])
        # every DSN processed is marked seen (cur/, :2,S); none deleted
        self.assertEqual(len(mta.bounce_files()), 3)
        self.assertTrue(all("/cur/" in p and p.endswith(":2,S") for p in mta.bounce_files()), mta.bounce_files())

        self.check_next_run_skips_the_dead(script)

        # a second pass over the same mailbox changes nothing
        before = (read_bytes(bounced), read_bytes(bounced + ".state"), sorted(mta.bounce_files()))
        r = self.run_mailshot("bounces", mta.maildir, "--campaign", script, "--report", self.path("b2.csv"),
                              env=self.env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual((read_bytes(bounced), read_bytes(bounced + ".state"), sorted(mta.bounce_files())), before)
        self.assertEqual(sorted((x["address"], x["action"]) for x in read_report(self.path("b2.csv"))),
                         [("dead1@x.test", "already suppressed"), ("dead2@y.test", "already suppressed"),
                          ("full@y.test", "already counted (1 of 3)")])

    @skip_under_valgrind("the same mailshot paths as test_done_when_maildir, which runs under valgrind")
    def test_done_when_a_complaint_suppresses_at_once_and_a_vacation_reply_nothing(self):
        """An RFC 5965 abuse report from a feedback loop and an RFC 3834 vacation reply, both arriving
        at Postfix's bounce mailbox through its SMTP server like the DSNs."""
        sink, mta, bounced, script = self.send_campaign()
        by_rcpt = {m["rcpt_tos"][0]: m for m in sink.messages()}
        away, complainer = by_rcpt["live2@y.test"], by_rcpt["live3@x.test"]
        # the vacation reply goes to the envelope sender (RFC 3834 section 4), from the null sender
        vacation = (f"From: Live2 <live2@y.test>\r\nTo: {away['mail_from']}\r\n"
                    f"Subject: Out of office: {away['msg']['Subject']}\r\nAuto-Submitted: auto-replied\r\n"
                    f"In-Reply-To: {away['msg']['Message-ID']}\r\nDate: {email.utils.formatdate()}\r\n"
                    f"Message-ID: <vacation.1@y.test>\r\n\r\nI am out of the office until Monday.\r\n")
        # the feedback loop's report goes to the plain bounce address; the token is in the reported
        # message's Return-Path, which the complainer's provider added when it delivered it
        arf = email.message.EmailMessage()
        arf["From"] = "Feedback Loop <fbl@isp.example>"
        arf["To"] = "b@bounces.acme.example"
        arf["Subject"] = "FW: complaint about a message from news@acme.example"
        arf["Date"] = email.utils.formatdate()
        arf["Message-ID"] = "<arf.1@isp.example>"
        arf.set_content("This is an email abuse report for a message received from 127.0.0.1.\n")
        arf.make_mixed()
        report = email.message.Message()
        report.set_type("message/feedback-report")
        report.set_payload("Feedback-Type: abuse\r\nUser-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n"
                           f"Original-Mail-From: <{complainer['mail_from']}>\r\n"
                           f"Original-Rcpt-To: <live3@x.test>\r\nReported-Domain: acme.example\r\n")
        arf.attach(report)
        original = email.message_from_bytes(f"Return-Path: <{complainer['mail_from']}>\r\n".encode()
                                            + complainer["raw"], policy=email.policy.SMTP)
        arf.add_attachment(original)
        arf.replace_header("Content-Type", arf.get_content_type().replace("mixed", "report"))
        arf.set_param("report-type", "feedback-report")
        with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
            s.sendmail("", [away["mail_from"]], vacation.encode())
            s.sendmail("fbl@isp.example", ["b@bounces.acme.example"], arf.as_bytes(policy=email.policy.SMTP))
        mta.wait_until_idle(timeout=10)
        self.assertEqual(len(mta.bounce_files()), 5)

        r = self.run_mailshot("bounces", mta.maildir, "--campaign", script, "--report", self.path("b.csv"),
                              env=self.env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(sorted(entries(bounced)), sorted([*E2E_DEAD, "live3@x.test"]))
        rows = {x["address"]: x for x in read_report(self.path("b.csv"))}
        self.assertEqual((rows["live3@x.test"]["kind"], rows["live3@x.test"]["class"],
                          rows["live3@x.test"]["action"]), ("arf", "complaint", "suppress"))
        self.assertEqual(rows["live3@x.test"]["line"], str(E2E_ROWS.index("live3@x.test") + 2))
        self.assertEqual((rows["live2@y.test"]["class"], rows["live2@y.test"]["action"]),
                         ("autoreply", "ignored (autoreply)"))
        self.assertEqual(rows["full@y.test"]["action"], "count 1 of 3")

        r = self.run_mailshot("run", script, "--outbox", self.path("outbox"), "--report", self.path("next.csv"),
                              env=self.env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr[-3000:])
        run = {x["email"]: x["status"] for x in read_report(self.path("next.csv"))}
        self.assertEqual(sorted(a for a, st in run.items() if st == "skipped"),
                         sorted([*E2E_DEAD, "live3@x.test"]))
        self.assertEqual(run["live2@y.test"], "written")

    @skip_under_valgrind("the libcurl binding runs under valgrind in test_mailbox_imap; the Maildir case here")
    def test_done_when_imaps(self):
        """The same over IMAPS: Postfix delivers its DSNs into the Maildir a private dovecot serves, and
        `mailshot bounces imaps://...` reads them there (TLS verified, the password from the environment)."""
        import secrets
        import shutil
        import tempfile
        # a short folder: dovecot's Unix sockets live in it, and a socket path is at most 107 octets
        server_dir = tempfile.mkdtemp(prefix="ms-dc-")
        self.addCleanup(shutil.rmtree, server_dir, True)
        imap = start_dovecot(server_dir)
        self.addCleanup(imap.stop)
        user, password = "bounces", f"pw-{secrets.token_hex(8)}"
        self.add_secret(password)
        box = imap.add_user(user, password)
        sink, mta, bounced, script = self.send_campaign(maildir=box, owner=(imap.mail_uid, imap.mail_gid))
        self.check_dsns(mta)

        args = (imap.url("imaps", "INBOX"), "--campaign", script, "--user", user, "--ca-file", imap.ca_cert)
        env = {**self.env, "MAILSHOT_IMAP_PASSWORD": password}
        r = self.run_mailshot("bounces", *args, "--report", self.path("b1.csv"), env=env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(sorted(entries(bounced)), sorted(E2E_DEAD))
        self.check_bounces_report(self.path("b1.csv"), f"imaps://127.0.0.1:{imap.ports['imaps']}/")
        with imap.imap(user, password) as c:
            c.select("INBOX", readonly=True)
            _, unseen = c.search(None, "UNSEEN")
            _, everything = c.search(None, "ALL")
        self.assertEqual((len(everything[0].split()), unseen[0].split()), (3, []))   # seen, none deleted

        self.check_next_run_skips_the_dead(script)

        # a second pass: IMAP reads what is not seen yet, so nothing; nothing changes
        before = (read_bytes(bounced), read_bytes(bounced + ".state"))
        r = self.run_mailshot("bounces", *args, "--report", self.path("b2.csv"), env=env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual((read_bytes(bounced), read_bytes(bounced + ".state")), before)
        self.assertEqual(read_report(self.path("b2.csv")), [])
