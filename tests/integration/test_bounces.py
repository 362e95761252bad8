"""`mailshot bounces` (issue 14, items 2-4): Maildir, mbox, .eml and stdin sources; hard bounces and
complaints suppressed at once, soft ones on the Nth within the period, auto-replies and policy blocks
never; what cannot be read quarantined and never deleted; --dry-run changes nothing; a second pass over
the same mailbox changes nothing more; and the next `mailshot run` of the campaign skips the suppressed
addresses.  The DSNs are written here in Postfix's format (tests/data/bounces/ has the corpus the
parser is tested with)."""
import email.utils
import os
import stat
import time

from tests.integration.harness import (MailshotTestCase, read_report, skip_under_valgrind, write_csv,
                                       valgrind_redundant)

CAMPAIGN = """
local mailshot = require "mailshot"
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi", text = "Hello {{email}}",
  bounces_to = "bounced.txt",
  %s
}
"""

ADDRESSES = ["hard@example.org", "soft2@example.org", "soft3@example.org", "complain@example.org",
             "away@example.org", "live@example.org", "policy@example.org"]


def now_date(offset=0):
    return email.utils.formatdate(time.time() + offset, usegmt=True)


def dsn(rcpt, status="5.1.1", diag=None, action="failed", to="bounces@acme.example", date=None, n=0,
        return_path="bounces@acme.example"):
    """A DSN as Postfix writes it (multipart/report; report-type=delivery-status)."""
    diag = diag or f"550 {status} <{rcpt}>: Recipient address rejected: User unknown"
    b = f"B{n}.{abs(hash((rcpt, status, n))) % 10**8}/mx.acme.example"
    return (f"Return-Path: <>\nX-Original-To: {to}\nDelivered-To: {to}\n"
            f"Date: {date or now_date()}\nFrom: MAILER-DAEMON@mx.acme.example (Mail Delivery System)\n"
            f"Subject: Undelivered Mail Returned to Sender\nTo: {to}\nAuto-Submitted: auto-replied\n"
            f"MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status;\n"
            f"\tboundary=\"{b}\"\nMessage-Id: <dsn{n}.{abs(hash((rcpt, status)))}@mx.acme.example>\n\n"
            f"This is a MIME-encapsulated message.\n\n--{b}\nContent-Type: text/plain; charset=us-ascii\n\n"
            f"The mail system\n\n<{rcpt}>: host mx.example.org said: {diag}\n\n"
            f"--{b}\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.acme.example\n\n"
            f"Final-Recipient: rfc822; {rcpt}\nOriginal-Recipient: rfc822;{rcpt}\nAction: {action}\n"
            f"Status: {status}\nRemote-MTA: dns; mx.example.org\nDiagnostic-Code: smtp; {diag}\n\n"
            f"--{b}\nContent-Type: text/rfc822-headers\n\nReturn-Path: <{return_path}>\n"
            f"From: Acme News <news@acme.example>\nTo: {rcpt}\nSubject: Hi\n"
            f"Message-ID: <orig.{n}@acme.example>\n\n--{b}--\n")


def arf(rcpt, to="bounces@acme.example", return_path="bounces@acme.example"):
    """An RFC 5965 abuse report."""
    b = "arf-boundary-1"
    return (f"Return-Path: <fbl@isp.example>\nX-Original-To: {to}\nDelivered-To: {to}\nDate: {now_date()}\n"
            f"From: fbl@isp.example\nTo: {to}\nSubject: Complaint\nMessage-ID: <arf.{rcpt}@isp.example>\n"
            f"MIME-Version: 1.0\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"{b}\"\n\n"
            f"--{b}\nContent-Type: text/plain\n\nThis is an abuse report.\n\n"
            f"--{b}\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nUser-Agent: ISP-FBL/1.0\n"
            f"Version: 1\nOriginal-Mail-From: <{return_path}>\nOriginal-Rcpt-To: <{rcpt}>\n\n"
            f"--{b}\nContent-Type: message/rfc822\n\nReturn-Path: <{return_path}>\n"
            f"From: news@acme.example\nTo: {rcpt}\nSubject: Hi\nMessage-ID: <orig.arf@acme.example>\n\nHello\n\n"
            f"--{b}--\n")


def vacation(frm, to="bounces@acme.example"):
    return (f"Return-Path: <>\nDelivered-To: {to}\nDate: {now_date()}\nFrom: {frm}\nTo: {to}\n"
            f"Subject: Out of office: Hi\nAuto-Submitted: auto-replied\nMessage-ID: <vac.{frm}>\n\n"
            f"I am away until Monday.\n")


def person(to="bounces@acme.example"):
    return (f"From: Someone <someone@example.net>\nTo: {to}\nDate: {now_date()}\nSubject: question\n"
            f"Message-ID: <person.1@example.net>\n\nHello, can you tell me about your newsletter?\n")


def garbled(to="bounces@acme.example"):
    """Looks like a bounce (MAILER-DAEMON, a bounce subject) but names no recipient and no status."""
    return (f"Return-Path: <>\nDelivered-To: {to}\nDate: {now_date()}\n"
            f"From: MAILER-DAEMON@mx.acme.example\nTo: {to}\nSubject: Undelivered Mail Returned to Sender\n"
            f"Message-ID: <garbled.1@mx.acme.example>\nContent-Type: multipart/report; boundary=\"nope\"\n\n"
            f"\x00\x01 binary junk \xff without any boundary\n")


def maildir(path, messages):
    """A Maildir with the messages in new/ (as an MTA delivers them); -> {name: content}."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    names = {}
    for i, m in enumerate(messages):
        name = f"17647{i:05d}.M{i}P1.mx"
        with open(os.path.join(path, "new", name), "w", encoding="utf-8", errors="surrogateescape",
                  newline="") as f:
            f.write(m)
        names[name] = m
    return names


def listing(path):
    """Every message file under path (Maildir++'s empty maildirfolder marker left out): {relative path: bytes}."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            if f == "maildirfolder":
                continue
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def entries(path):
    """The addresses of a suppression file, in order."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip() and not line.startswith("#")]


class BouncesTests(MailshotTestCase):
    def campaign(self, extra=""):
        d = self.path("camp")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), ["email"], [[a] for a in ADDRESSES])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN % extra)
        return d, os.path.join(d, "c.lua")

    def standard_box(self):
        """A Maildir with one message of each kind."""
        return maildir(self.path("Maildir"), [
            dsn("hard@example.org", n=1),
            dsn("soft2@example.org", "4.2.2", "452 4.2.2 Mailbox full", action="delayed", n=2),
            dsn("soft2@example.org", "4.2.2", "452 4.2.2 Mailbox full", action="delayed", n=3),
            dsn("soft3@example.org", "4.2.2", "452 4.2.2 Mailbox full", action="delayed", n=4),
            dsn("soft3@example.org", "4.2.2", "452 4.2.2 Mailbox full", action="delayed", n=5),
            dsn("soft3@example.org", "5.2.2", "552 5.2.2 Mailbox full", n=6),
            arf("complain@example.org"),
            vacation("away@example.org"),
            dsn("policy@example.org", "5.7.1", "554 5.7.1 Message rejected as spam", n=7),
            person(),
            garbled(),
            dsn("stranger@example.org", n=8),
        ])

    def bounces(self, *args, **kw):
        p = self.run_mailshot("bounces", *args, **kw)
        self.assertNotIn("Traceback", p.stderr)
        return p

    @valgrind_redundant("test_postfix_bounces.test_done_when_maildir, tests/lua/test_mime.lua")
    def test_maildir_suppresses_counts_ignores_quarantines_and_is_idempotent(self):
        d, script = self.campaign()
        names = self.standard_box()
        box = self.path("Maildir")
        report = self.path("r1.csv")
        p = self.bounces(box, "--campaign", script, "--report", report)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        bounced = os.path.join(d, "bounced.txt")
        # hard and complaint at once, soft on the third (5.2.2 counts as soft), nothing else
        self.assertEqual(sorted(entries(bounced)), ["complain@example.org", "hard@example.org", "soft3@example.org"])
        with open(bounced) as f:
            text = f.read()
        self.assertIn("hard bounce 5.1.1", text)
        self.assertIn("complaint", text)
        self.assertIn("3 times in 7 days", text)
        rows = read_report(report)
        by = {}
        for r in rows:
            by.setdefault(r["address"], []).append(r)
        self.assertEqual(by["hard@example.org"][0]["action"], "suppress")
        self.assertEqual(by["hard@example.org"][0]["class"], "hard")
        self.assertEqual(by["hard@example.org"][0]["campaign"], "c")
        self.assertEqual(by["hard@example.org"][0]["line"], "2")
        self.assertEqual([r["action"] for r in by["soft2@example.org"]], ["count 1 of 3", "count 2 of 3"])
        self.assertEqual([r["action"] for r in by["soft3@example.org"]],
                         ["count 1 of 3", "count 2 of 3", "suppress (soft 3 of 3)"])
        self.assertEqual(by["complain@example.org"][0]["class"], "complaint")
        self.assertEqual(by["away@example.org"][0]["action"], "ignored (autoreply)")
        self.assertEqual(by["policy@example.org"][0]["class"], "policy")
        self.assertTrue(by["policy@example.org"][0]["action"].startswith("not suppressed"))
        self.assertTrue(by["stranger@example.org"][0]["action"].startswith("not ours"))
        kinds = [r["kind"] for r in rows]
        self.assertIn("other", kinds)
        unparsed = [r for r in rows if r["kind"] == "unparsed"]
        self.assertEqual(len(unparsed), 1)
        self.assertEqual(unparsed[0]["action"], "quarantine")
        self.assertEqual(len(rows), 12, rows)    # one row per message here
        # the counts are in the state file beside the suppression file, private
        state = bounced + ".state"
        st = os.stat(state)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        with open(state) as f:
            soft_lines = [line for line in f if line.startswith("soft\t")]
        self.assertEqual([line.split("\t")[1] for line in soft_lines], ["soft2@example.org"] * 2)
        # the mailbox: processed messages seen in cur/, the person's message and the stranger's
        # bounce untouched in new/, the garbled one in .Quarantine; nothing deleted
        after = listing(box)
        self.assertEqual(len(after), len(names))
        self.assertEqual(sorted(after.values()), sorted(m.encode("utf-8", "surrogateescape") for m in names.values()))
        new = [k for k in after if k.startswith("new/")]
        self.assertEqual(len(new), 2)
        self.assertTrue(any(b"someone@example.net" in after[k] for k in new))
        self.assertTrue(any(b"stranger@example.org" in after[k] for k in new))
        quarantined = [k for k in after if k.startswith(".Quarantine/")]
        self.assertEqual(len(quarantined), 1)
        self.assertIn(b"binary junk", after[quarantined[0]])
        self.assertTrue(all(k.endswith(":2,S") for k in after if k.startswith("cur/")))
        self.assertEqual(len([k for k in after if k.startswith("cur/")]), 9)
        self.assertRegex(p.stdout, r"mailshot bounces: 12 messages from 1 source: .*3 suppress")

        # a second pass over the same mailbox (the messages now in cur/) changes nothing more
        with open(state) as f:
            before_state = f.read()
        report2 = self.path("r2.csv")
        p = self.bounces(box, "--campaign", script, "--report", report2)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(sorted(entries(bounced)), ["complain@example.org", "hard@example.org", "soft3@example.org"])
        with open(state) as f:
            self.assertEqual(f.read(), before_state)
        actions = {(r["address"], r["action"]) for r in read_report(report2)}
        self.assertIn(("hard@example.org", "already suppressed"), actions)
        self.assertIn(("soft2@example.org", "already counted (2 of 3)"), actions)
        self.assertEqual(listing(box), after)

        # the next run of the campaign skips the suppressed addresses
        p = self.run_mailshot("run", script, "--outbox", self.path("outbox"), "--report", self.path("run.csv"))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        run = {r["email"]: r for r in read_report(self.path("run.csv"))}
        for a in ("hard@example.org", "soft3@example.org", "complain@example.org"):
            self.assertEqual(run[a]["status"], "skipped", run[a])
            self.assertIn("suppressed: bounced.txt", run[a]["response"])
        for a in ("soft2@example.org", "away@example.org", "live@example.org", "policy@example.org"):
            self.assertEqual(run[a]["status"], "written", run[a])

    @skip_under_valgrind("the same Lua paths as the Maildir test, which runs under valgrind")
    def test_dry_run_changes_nothing(self):
        d, script = self.campaign()
        self.standard_box()
        box = self.path("Maildir")
        before = listing(box)
        p = self.bounces(box, "--campaign", script, "--report", self.path("r.csv"), "--dry-run")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("dry run: nothing was changed", p.stdout)
        self.assertEqual(listing(box), before)
        self.assertEqual(sorted(os.listdir(d)), ["c.lua", "list.csv"])
        actions = [(r["address"], r["action"]) for r in read_report(self.path("r.csv"))]
        self.assertIn(("hard@example.org", "would suppress"), actions)
        self.assertIn(("soft3@example.org", "would suppress (soft 3 of 3)"), actions)
        self.assertIn(("soft2@example.org", "would count 2 of 3"), actions)
        self.assertIn(("", "would quarantine"), actions)

    def test_mbox_eml_and_stdin_sources_without_a_campaign(self):
        supp = self.path("supp", "bounced.txt")
        os.makedirs(os.path.dirname(supp))
        # an mbox (mboxrd: a body line "From " is quoted ">From "), left exactly as it was
        body = vacation("away@example.org").replace("I am away", "From here on I am away")
        mbox = ("From MAILER-DAEMON Thu Dec  3 10:15:02 2026\n" + dsn("a@example.org", n=1) + "\n"
                "From someone Thu Dec  3 10:16:02 2026\n" + body.replace("\nFrom here", "\n>From here") + "\n"
                "From MAILER-DAEMON Thu Dec  3 10:17:02 2026\n" + garbled() + "\n")
        mbox_path = self.path("bounces.mbox")
        with open(mbox_path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(mbox)
        with open(mbox_path, "rb") as f:
            before = f.read()
        eml = self.path("one.eml")
        with open(eml, "w") as f:
            f.write(arf("b@example.org"))
        p = self.bounces(mbox_path, eml, "-", "--suppress", supp, "--report", self.path("r.csv"),
                         input=dsn("c@example.org", "5.1.2", "550 5.1.2 Host unknown", n=3))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(entries(supp), ["a@example.org", "b@example.org", "c@example.org"])
        with open(mbox_path, "rb") as f:
            self.assertEqual(f.read(), before)
        rows = read_report(self.path("r.csv"))
        where = {r["address"]: r["where"] for r in rows if r["address"]}
        self.assertEqual(where["a@example.org"], mbox_path + ":1")
        self.assertEqual(where["b@example.org"], eml)
        self.assertEqual(where["c@example.org"], "stdin")
        self.assertEqual([r["action"] for r in rows if r["address"] == "away@example.org"], ["ignored (autoreply)"])
        # the unparsed message from the read-only mbox: a copy in the quarantine Maildir beside the file
        q = listing(supp + ".quarantine")
        self.assertEqual(len(q), 1, q)
        self.assertIn(b"binary junk", list(q.values())[0])
        # a second pass: nothing new, no second copy
        p = self.bounces(mbox_path, eml, "--suppress", supp, "--report", self.path("r2.csv"))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(entries(supp), ["a@example.org", "b@example.org", "c@example.org"])
        self.assertEqual(len(listing(supp + ".quarantine")), 1)

    @skip_under_valgrind("2 MB messages through the Lua parser: minutes under valgrind")
    def test_a_message_over_the_cap_is_parsed_from_its_start_or_quarantined(self):
        supp = self.path("bounced.txt")
        # a DSN followed by 2 MB of returned message: its start is enough
        big_dsn = dsn("big@example.org", n=1).replace("<orig.1@acme.example>\n\n",
                                                      "<orig.1@acme.example>\n\n" + ("x" * 999 + "\n") * 2000, 1)
        big_junk = "Subject: junk\nFrom: MAILER-DAEMON@x.example\n\n" + ("y" * 999 + "\n") * 2000
        box = self.path("Maildir")
        maildir(box, [big_dsn, big_junk])
        p = self.bounces(box, "--suppress", supp, "--report", self.path("r.csv"), "--max-bytes", "65536")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(entries(supp), ["big@example.org"])
        rows = read_report(self.path("r.csv"))
        junk = [r for r in rows if r["kind"] == "unparsed"]
        self.assertEqual(len(junk), 1, rows)
        self.assertIn("over the 65536 read", junk[0]["diagnostic"])
        q = listing(os.path.join(box, ".Quarantine"))
        self.assertEqual(len(q), 1)
        self.assertEqual(len(list(q.values())[0]), len(big_junk))     # whole, not cut

    @skip_under_valgrind("argument checks: Lua only")
    def test_usage_errors_and_a_failed_source(self):
        d, script = self.campaign()
        p = self.bounces(self.path("nothing"))
        self.assertEqual(p.returncode, 2)
        self.assertIn("--suppress", p.stderr)
        with open(self.path("nb.lua"), "w") as f:
            f.write(CAMPAIGN.replace('bounces_to = "bounced.txt",', "") % "")
        write_csv(self.path("list.csv"), ["email"], [["a@example.org"]])
        p = self.bounces(self.path("x"), "--campaign", self.path("nb.lua"))
        self.assertEqual(p.returncode, 2)
        self.assertIn("nb.lua has no bounces_to", p.stderr)
        p = self.bounces(self.path("x"), "--suppress", self.path("s.txt"), "--soft-limit", "0")
        self.assertEqual(p.returncode, 2)
        p = self.bounces("imaps://127.0.0.1/INBOX", "--suppress", self.path("s.txt"), "--password", "pw")
        self.assertEqual(p.returncode, 2)
        self.assertIn("passwords are not taken from the command line", p.stderr)
        p = self.bounces(self.path("x"), "--suppress", self.path("s.txt"), "--report", self.path("no", "r.csv"))
        self.assertEqual(p.returncode, 2)
        self.assertIn(self.path("no", "r.csv"), p.stderr)
        # a campaign whose recipients file is gone: nothing could be matched, so nothing is read (exit 2, named)
        os.rename(os.path.join(d, "list.csv"), os.path.join(d, "list.old"))
        p = self.bounces(self.path("x"), "--campaign", script)
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn(os.path.join(d, "list.csv"), p.stderr)
        os.rename(os.path.join(d, "list.old"), os.path.join(d, "list.csv"))
        # a missing source fails (exit 1, named) and the next one is still read
        box = self.path("Maildir")
        maildir(box, [dsn("hard@example.org", n=1)])
        p = self.bounces(self.path("missing"), box, "--campaign", script, "--report", self.path("r.csv"))
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn(self.path("missing"), p.stderr)
        self.assertEqual(entries(os.path.join(d, "bounced.txt")), ["hard@example.org"])

    @skip_under_valgrind("renames: Lua only")
    def test_move_to_and_quarantine_folders(self):
        """--move-to: processed messages go to the Maildir++ folder beside the source folder, flagged seen;
        --quarantine names the quarantine folder; the rest stays."""
        root = self.path("Maildir")
        maildir(root, [])
        box = os.path.join(root, ".Bounces")
        maildir(box, [dsn("hard@example.org", n=1), garbled(), person()])
        supp = self.path("bounced.txt")
        p = self.bounces(box, "--suppress", supp, "--report", self.path("r.csv"), "--move-to", "Done",
                         "--quarantine", "Bad")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        after = listing(root)
        self.assertEqual(len([k for k in after if k.startswith(".Done/cur/") and k.endswith(":2,S")]), 1)
        self.assertEqual(len([k for k in after if k.startswith(".Bad/new/")]), 1)
        self.assertEqual([k for k in after if k.startswith(".Bounces/")], [k for k in after if "Bounces/new/" in k])
        self.assertEqual(len(after), 3)
        self.assertTrue(os.path.exists(os.path.join(root, ".Done", "maildirfolder")))

    @skip_under_valgrind("the on_bounce call is Lua only")
    def test_on_bounce_overrides_the_class(self):
        d, script = self.campaign('on_bounce = function(b) if b.class == "policy" then return "hard" end end,')
        box = self.path("Maildir")
        maildir(box, [dsn("policy@example.org", "5.7.1", "554 5.7.1 Message rejected as spam", n=7)])
        p = self.bounces(box, "--campaign", script, "--report", self.path("r.csv"))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(entries(os.path.join(d, "bounced.txt")), ["policy@example.org"])
        row = read_report(self.path("r.csv"))[0]
        self.assertEqual((row["class"], row["rule"]), ("hard", "on_bounce"))


VERP_CAMPAIGN = """
local mailshot = require "mailshot"
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi", text = "Hello",
  bounces_to = "bounced.txt", name = "spring",
  return_path = { domain = "bounces.acme.example", secret = "0123456789abcdef0123", campaign = "spring" },
}
"""

VERP_ADDRESSES = """
local verp = require "mailshot.verp"
local v = verp.new { domain = "bounces.acme.example", secret = "0123456789abcdef0123", campaign = arg[1] }
for i = 2, #arg, 2 do print(v:address(tonumber(arg[i]), arg[i + 1])) end
"""


class VerpBouncesTests(MailshotTestCase):
    @skip_under_valgrind("VERP decoding is Lua (tests/lua/test_verp.lua runs under valgrind)")
    def test_verp_token_matches_forged_and_foreign_tokens_are_never_acted_on(self):
        d = self.path("camp")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email"], [[a] for a in ADDRESSES])
        script = os.path.join(d, "c.lua")
        with open(script, "w") as f:
            f.write(VERP_CAMPAIGN)
        gen = self.path("gen.lua")
        with open(gen, "w") as f:
            f.write(VERP_ADDRESSES)
        p = self.run_mailshot("exec", gen, "spring", "2", "hard@example.org", "8", "policy@example.org",
                              "7", "live@example.org")
        self.assertEqual(p.returncode, 0, p.stderr)
        hard_rp, policy_rp, live_rp = p.stdout.split()
        p = self.run_mailshot("exec", gen, "autumn", "7", "live@example.org")
        other_rp = p.stdout.strip()
        # forged: live@'s token with one MAC character changed (decodes, does not verify)
        local, dom = live_rp.split("@")
        forged_rp = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + dom
        box = self.path("Maildir")
        maildir(box, [
            # the DSN names an address the list does not have (an alias rewrote it): the token decides
            dsn("alias-of-hard@example.org", n=1, to=hard_rp),
            # the token in the original's Return-Path only (the bounce came to a plain address)
            dsn("rewritten@example.org", "5.1.1", n=2, return_path=policy_rp),
            dsn("live@example.org", n=3, to=forged_rp),
            dsn("live@example.org", n=4, to=other_rp),
        ])
        report = self.path("r.csv")
        p = self.run_mailshot("bounces", box, "--campaign", script, "--report", report)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(entries(os.path.join(d, "bounced.txt")), ["hard@example.org", "policy@example.org"])
        rows = read_report(report)
        self.assertEqual([(r["address"], r["line"], r["action"]) for r in rows[:2]],
                         [("hard@example.org", "2", "suppress"), ("policy@example.org", "8", "suppress")])
        self.assertTrue(rows[2]["action"].startswith("forged token"), rows[2])
        self.assertTrue(rows[3]["action"].startswith("not ours: another campaign"), rows[3])
        # never acted on: still in new/, unmarked
        self.assertEqual(len([k for k in listing(box) if k.startswith("new/")]), 2)
        self.assertRegex(p.stdout, r"1 forged token")


class ImapBouncesTests(MailshotTestCase):
    @skip_under_valgrind("the libcurl binding runs under valgrind in test_mailbox_imap")
    def test_imaps(self):
        """An IMAPS mailbox: processed messages marked seen, the unreadable one moved to Quarantine, the
        person's message left unread; the password from the environment.  (A short name: dovecot's unix
        sockets live under the test's folder, and a socket path is at most 107 octets.)"""
        import secrets
        import shutil
        import tempfile
        from tests.integration.harness import start_dovecot
        server_dir = tempfile.mkdtemp(prefix="ms-dc-")
        self.addCleanup(shutil.rmtree, server_dir, True)
        srv = start_dovecot(server_dir)
        self.addCleanup(srv.stop)
        user, password = f"u{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
        self.add_secret(password)
        srv.add_user(user, password)
        for m in (dsn("hard@example.org", n=1), person(), garbled(),
                  dsn("soft2@example.org", "4.2.2", "452 4.2.2 Mailbox full", action="delayed", n=2)):
            srv.deliver(user, m.encode("utf-8", "surrogateescape"))
        supp = self.path("bounced.txt")
        url = f"imaps://127.0.0.1:{srv.ports['imaps']}/INBOX"
        args = (url, "--suppress", supp, "--user", user, "--ca-file", srv.ca_cert, "--report", self.path("r.csv"))
        p = self.run_mailshot("bounces", *args, env={"MAILSHOT_IMAP_PASSWORD": password})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(entries(supp), ["hard@example.org"])
        rows = read_report(self.path("r.csv"))
        self.assertEqual([r["action"] for r in rows],
                         ["suppress", "not a bounce (left in place)", "quarantine", "count 1 of 3"])
        self.assertTrue(all(r["where"].startswith("imaps://127.0.0.1") for r in rows), rows)
        with srv.imap(user, password) as c:
            c.select("INBOX", readonly=True)
            _, unseen = c.search(None, "UNSEEN")
            _, all_ = c.search(None, "ALL")
            self.assertEqual(len(all_[0].split()), 3)         # the garbled one moved out
            self.assertEqual(len(unseen[0].split()), 1)       # the person's message stays unread
            c.select("Quarantine", readonly=True)
            _, q = c.search(None, "ALL")
            self.assertEqual(len(q[0].split()), 1)
        # a second run reads only what is not seen: the person's message, left again
        p = self.run_mailshot("bounces", *args, env={"MAILSHOT_IMAP_PASSWORD": password})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual([r["action"] for r in read_report(self.path("r.csv"))], ["not a bounce (left in place)"])
        # without the password: a clear error, exit 1
        p = self.run_mailshot("bounces", *args, env={"MAILSHOT_IMAP_PASSWORD": None})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("MAILSHOT_IMAP_PASSWORD", p.stderr)

    @skip_under_valgrind("the libcurl binding runs under valgrind in test_mailbox_imap")
    def test_pop3s(self):
        """POP3 has no flags or folders: nothing changes on the server, and the ids processed are kept in
        the state file, so a second run reads only what is new."""
        import secrets
        import shutil
        import tempfile
        from tests.integration.harness import start_dovecot
        server_dir = tempfile.mkdtemp(prefix="ms-dc-")
        self.addCleanup(shutil.rmtree, server_dir, True)
        srv = start_dovecot(server_dir)
        self.addCleanup(srv.stop)
        user, password = f"u{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
        self.add_secret(password)
        srv.add_user(user, password)
        for m in (dsn("hard@example.org", n=1), garbled(),
                  dsn("soft2@example.org", "4.2.2", "452 4.2.2 Mailbox full", action="delayed", n=2)):
            srv.deliver(user, m.encode("utf-8", "surrogateescape"))
        supp = self.path("bounced.txt")
        url = f"pop3s://127.0.0.1:{srv.ports['pop3s']}/"
        args = (url, "--suppress", supp, "--user", user, "--ca-file", srv.ca_cert, "--report", self.path("r.csv"))
        p = self.run_mailshot("bounces", *args, env={"MAILSHOT_IMAP_PASSWORD": password})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(entries(supp), ["hard@example.org"])
        self.assertEqual([r["action"] for r in read_report(self.path("r.csv"))],
                         ["suppress", "quarantine; left on the POP3 server (no folders)", "count 1 of 3"])
        with open(supp + ".state") as f:
            self.assertEqual(len([line for line in f if line.startswith("seen\t")]), 3)
        srv.deliver(user, dsn("soft3@example.org", "4.2.2", "452 4.2.2 Mailbox full", action="delayed", n=3))
        p = self.run_mailshot("bounces", *args, env={"MAILSHOT_IMAP_PASSWORD": password})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual([(r["address"], r["action"]) for r in read_report(self.path("r.csv"))],
                         [("soft3@example.org", "count 1 of 3")])
        self.assertEqual(len(os.listdir(os.path.join(srv.maildir(user), "new"))) +
                         len(os.listdir(os.path.join(srv.maildir(user), "cur"))), 4)


    @skip_under_valgrind("the libcurl binding runs under valgrind in test_mailbox_imap")
    def test_plaintext_and_unverified_servers_need_their_flag(self):
        """imap:// to a server without STARTTLS is refused before any password is sent, unless
        --allow-plaintext; an imaps:// server whose CA is not trusted is refused, unless --insecure."""
        import secrets
        import shutil
        import tempfile
        from tests.integration.harness import start_dovecot
        user, password = f"u{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
        self.add_secret(password)
        env = {"MAILSHOT_IMAP_PASSWORD": password}
        supp = self.path("bounced.txt")
        for ssl in (False, True):
            server_dir = tempfile.mkdtemp(prefix="ms-dc-")
            self.addCleanup(shutil.rmtree, server_dir, True)
            srv = start_dovecot(server_dir, ssl=ssl)
            self.addCleanup(srv.stop)
            srv.add_user(user, password)
            srv.deliver(user, dsn("hard@example.org", n=1).encode())
            if ssl:
                url, flag, words = f"imaps://127.0.0.1:{srv.ports['imaps']}/INBOX", "--insecure", "certificate"
            else:
                url, flag, words = f"imap://127.0.0.1:{srv.ports['imap']}/INBOX", "--allow-plaintext", "STARTTLS"
            args = (url, "--suppress", supp, "--user", user, "--report", self.path("r.csv"))
            p = self.run_mailshot("bounces", *args, env=env)
            self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
            self.assertIn(words, p.stderr)
            self.assertNotIn("Login: user=", srv.log_text())      # refused before the password was sent
            self.assertEqual(entries(supp), [])
            p = self.run_mailshot("bounces", *args, flag, env=env)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertEqual(entries(supp), ["hard@example.org"])
            os.unlink(supp)


class CorpusTests(MailshotTestCase):
    @skip_under_valgrind("45 messages through the Lua parser; the parser's own tests cover the corpus")
    def test_the_bounce_corpus_as_a_maildir(self):
        """tests/data/bounces/ (real formats of MTAs and providers, vacations, hostile input) as one Maildir,
        every address taken as is (--suppress, no campaign): every message is in the report; auto-replies,
        policy blocks, successful deliveries, not-spam reports and people's messages suppress nothing;
        unreadable ones are quarantined; no message is lost."""
        import glob
        import shutil
        corpus = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "data", "bounces", "*.eml")))
        self.assertGreaterEqual(len(corpus), 40)
        box = self.path("Maildir")
        maildir(box, [])
        for f in corpus:
            shutil.copy(f, os.path.join(box, "new", os.path.basename(f)))
        supp = self.path("bounced.txt")
        p = self.run_mailshot("bounces", box, "--suppress", supp, "--report", self.path("r.csv"))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        rows = read_report(self.path("r.csv"))
        by_file = {}
        for r in rows:
            by_file.setdefault(os.path.basename(r["where"]), []).append(r)
        self.assertEqual(sorted(by_file), sorted(os.path.basename(f) for f in corpus))
        suppressed = set(entries(supp))
        for name, rs in by_file.items():
            with self.subTest(message=name):
                if name.startswith(("vacation-", "policy-", "human-", "read-receipt", "dsn-delivered", "arf-not-spam")):
                    self.assertFalse(any(r["action"].startswith("suppress") for r in rs), rs)
                if name.startswith("vacation-"):
                    self.assertEqual([r["action"] for r in rs], ["ignored (autoreply)"])
        for name in ("postfix-user-unknown.eml", "sendmail-user-unknown.eml", "gmail-dsn.eml", "rfc5965-b2-abuse.eml"):
            self.assertTrue({r["address"] for r in by_file[name]} <= suppressed, by_file[name])
        for name in ("hostile-binary-garbage.eml", "hostile-nested-50.eml"):
            self.assertEqual(by_file[name][0]["action"], "quarantine")
            self.assertTrue(os.path.exists(os.path.join(box, ".Quarantine", "new", name)))
        self.assertEqual(len(listing(box)), len(corpus))
