"""Bounce mailboxes over IMAP(S) and POP3(S) (lua/mailshot/mailbox_curl.lua, src/l_mailfetch.c, through
libcurl), against a real dovecot on loopback (harness.start_dovecot), driven through the Lua API with
`mailshot exec`."""
import os
import secrets
import shutil
import tempfile
import unittest

from tests.integration.harness import (MailshotTestCase, process_group_alive, skip_under_valgrind, start_dovecot,
                                       wait_for,
                                       valgrind_redundant)

DRIVER = r"""
local mc = require "mailshot.mailbox_curl"
local url, action, folder, outdir = arg[1], arg[2], arg[3], arg[4]
local opts = { user = os.getenv("BOX_USER"), ca_file = os.getenv("BOX_CA"),
               allow_plaintext = os.getenv("BOX_PLAIN") == "1", all = os.getenv("BOX_ALL") == "1",
               max_bytes = math.tointeger(tonumber(os.getenv("BOX_MAX") or "")),
               timeout = tonumber(os.getenv("BOX_TIMEOUT") or ""),
               list_window = math.tointeger(tonumber(os.getenv("BOX_WINDOW") or "")) }
local box, err = mc.open(url, opts)
if not box then print("open-error\t" .. err) return 3 end
print("count\t" .. box:count())
if os.getenv("BOX_LIST_ONLY") then box:close() return 0 end
local n = 0
for m in box:messages() do
  n = n + 1
  if m.raw then
    local f = assert(io.open(outdir .. "/" .. m.id .. ".eml", "wb"))
    f:write(m.raw)
    f:close()
  end
  print(table.concat({ "msg", tostring(m.id), tostring(m.size), m.where, m.raw and "raw" or "-",
                       m.too_big and "too_big" or "-", m.error or "-" }, "\t"))
  if action ~= "none" then
    local ok, merr = box:mark(m, action, folder)
    print("mark\t" .. tostring(m.id) .. "\t" .. tostring(ok) .. "\t" .. tostring(merr))
  end
  if n == 1 and os.getenv("BOX_AFTER_FIRST") then os.execute(os.getenv("BOX_AFTER_FIRST")) end
end
if box.failed then print("failed\t" .. box.failed) end
box:close()
return 0
"""

# The binding's own cap, below the listing's check: a fetch that turns out bigger than allowed is cut off
RAWCAP = r"""
local mailfetch = require "mailshot.mailfetch"
local h = assert(mailfetch.new{ user = os.getenv("BOX_USER"), password = os.getenv("MAILSHOT_IMAP_PASSWORD"),
                                ca_file = os.getenv("BOX_CA") })
local body, err, kind, size, partial = h:perform(arg[1], nil, math.tointeger(tonumber(arg[2])))
print(tostring(body and #body), err, kind, size, partial and #partial)
h:close()
"""


def message(subject, body="A bounce body.\r\n", size=None):
    text = (f"From: MAILER-DAEMON@mx.example.com\r\nTo: b+tok@bounces.example.com\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{secrets.token_hex(6)}@mx.example.com>\r\n\r\n{body}")
    if size:
        line = "x" * 76 + "\r\n"
        text += line * ((size - len(text)) // len(line) + 1)
    return text.encode()


class MailboxTests(MailshotTestCase):
    """One dovecot for the class (it starts in tens of ms, but certificates and all); every test has its
    own user, so its own Maildir."""

    @classmethod
    def setUpClass(cls):
        cls.server_dir = tempfile.mkdtemp(prefix="mailshot-dovecot-")
        cls.addClassCleanup(shutil.rmtree, cls.server_dir, True)
        cls.srv = start_dovecot(cls.server_dir)
        cls.addClassCleanup(cls.srv.stop)

    def setUp(self):
        super().setUp()
        self.user = f"u{secrets.token_hex(4)}"
        self.password = f"pw-{secrets.token_hex(8)}"
        self.add_secret(self.password)
        self.srv.add_user(self.user, self.password)
        self.driver = self.path("driver.lua")
        with open(self.driver, "w") as f:
            f.write(DRIVER)
        self.out = self.path("out")
        os.makedirs(self.out)

    def run_box(self, url, action="none", folder="-", password=None, ca=True, srv=None, **env):
        srv = srv or self.srv
        e = {"BOX_USER": self.user, "MAILSHOT_IMAP_PASSWORD": password or self.password,
             "BOX_CA": srv.ca_cert if ca and srv.ca_cert else None}
        e.update({k: str(v) for k, v in env.items()})
        r = self.run_mailshot("exec", self.driver, url, action, folder, self.out, env=e)
        # whatever happened, the password is nowhere in what mailshot said
        self.assertNotIn(e["MAILSHOT_IMAP_PASSWORD"], r.stdout + r.stderr)
        lines = [ln.split("\t") for ln in r.stdout.splitlines()]
        return r, lines

    def msgs(self, lines):
        return [ln for ln in lines if ln[0] == "msg"]

    def flags(self, mailbox="INBOX", srv=None):
        """{uid: flags string} of a mailbox, read with Python's imaplib."""
        c = (srv or self.srv).imap(self.user, self.password)
        try:
            typ, _ = c.select(mailbox, readonly=True)
            self.assertEqual(typ, "OK", mailbox)
            typ, data = c.uid("FETCH", "1:*", "(FLAGS)")
            out = {}
            for item in data:
                if item:
                    text = item.decode()
                    uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
                    out[uid] = text.split("FLAGS (")[1].split(")")[0]
            return out
        finally:
            c.logout()

    @valgrind_redundant("test_pop3s_lists_and_fetches_and_deletes_nothing")
    def test_imaps_lists_unseen_and_fetches_without_marking_seen(self):
        a, b, seen = message("one"), message("two"), message("already read")
        self.srv.deliver(self.user, a)
        self.srv.deliver(self.user, seen, seen=True)
        self.srv.deliver(self.user, b)
        r, lines = self.run_box(self.srv.url("imaps"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(["count", "2"], lines)
        got = self.msgs(lines)
        self.assertEqual([m[1] for m in got], ["1", "3"], got)     # UID order, the seen one left out
        port = self.srv.ports["imaps"]
        self.assertEqual(got[0][3], f"imaps://127.0.0.1:{port}/INBOX uid 1")
        for m, raw in zip(got, (a, b)):
            self.assertEqual(m[2], str(len(raw)))
            with open(os.path.join(self.out, m[1] + ".eml"), "rb") as f:
                self.assertEqual(f.read(), raw)
        # reading marked nothing seen
        flags = self.flags()
        self.assertNotIn("\\Seen", flags[1])
        self.assertNotIn("\\Seen", flags[3])
        self.assertIn("\\Seen", flags[2])
        # the same two again on the next run
        r, lines = self.run_box(self.srv.url("imaps"))
        self.assertEqual([m[1] for m in self.msgs(lines)], ["1", "3"])
        # all: the seen one too
        r, lines = self.run_box(self.srv.url("imaps"), BOX_ALL=1)
        self.assertEqual([m[1] for m in self.msgs(lines)], ["1", "2", "3"])

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_the_listing_goes_a_window_at_a_time(self):
        # libcurl refuses more than 300 kB of untagged lines for one command (about 300 messages of
        # FETCH 1:*): the listing asks for a window of messages at a time; here windows of 2
        raws = [message(f"m{i}") for i in range(5)]
        for i, raw in enumerate(raws):
            self.srv.deliver(self.user, raw, seen=(i == 2))
        r, lines = self.run_box(self.srv.url("imaps"), BOX_WINDOW=2)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual([m[1] for m in self.msgs(lines)], ["1", "2", "4", "5"])
        r, lines = self.run_box(self.srv.url("imaps"), BOX_WINDOW=2, BOX_ALL=1)
        self.assertEqual([m[1] for m in self.msgs(lines)], ["1", "2", "3", "4", "5"])
        self.assertEqual([m[2] for m in self.msgs(lines)], [str(len(raw)) for raw in raws])

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_a_mailbox_of_400_messages_is_listed_whole(self):
        # one FETCH 1:* for all of them failed at about 300 ("Too large response headers")
        for i in range(400):
            self.srv.deliver(self.user, message(f"m{i}"))
        for scheme in ("imaps", "pop3s"):
            r, lines = self.run_box(self.srv.url(scheme), BOX_LIST_ONLY=1)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertEqual(lines, [["count", "400"]])

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_mark_seen_then_the_next_run_lists_nothing(self):
        self.srv.deliver(self.user, message("one"))
        self.srv.deliver(self.user, message("two"))
        r, lines = self.run_box(self.srv.url("imaps"), "seen")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual([ln for ln in lines if ln[0] == "mark"],
                         [["mark", "1", "true", "nil"], ["mark", "2", "true", "nil"]])
        self.assertTrue(all("\\Seen" in f for f in self.flags().values()), self.flags())
        r, lines = self.run_box(self.srv.url("imaps"))
        self.assertIn(["count", "0"], lines)
        self.assertEqual(self.msgs(lines), [])

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_move_creates_the_folder_and_moves_each_message(self):
        for s in ("one", "two"):
            self.srv.deliver(self.user, message(s))
        r, lines = self.run_box(self.srv.url("imaps"), "move", "Processed")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual([ln[2] for ln in lines if ln[0] == "mark"], ["true", "true"], lines)
        self.assertEqual(self.flags("INBOX"), {})
        self.assertEqual(len(self.flags("Processed")), 2)
        # an existing folder is reused
        self.srv.deliver(self.user, message("three"))
        r, lines = self.run_box(self.srv.url("imaps"), "quarantine", "Processed")
        self.assertEqual([ln[2] for ln in lines if ln[0] == "mark"], ["true"], lines)
        self.assertEqual(len(self.flags("Processed")), 3)

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_move_without_MOVE_expunges_only_that_uid(self):
        srv = self.start_dovecot(extra_conf="imap_capability = IMAP4rev1 LITERAL+ UIDPLUS\n")
        srv.add_user(self.user, self.password)
        srv.deliver(self.user, message("bounce"))
        srv.deliver(self.user, message("someone else's deleted"))
        c = srv.imap(self.user, self.password)
        c.select("INBOX")
        c.uid("STORE", "2", "+FLAGS", "(\\Deleted)")
        c.logout()
        r, lines = self.run_box(srv.url("imaps"), "move", "Done", srv=srv)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual([m[1] for m in self.msgs(lines)], ["1"])      # the \Deleted one is not listed
        self.assertEqual([ln[2] for ln in lines if ln[0] == "mark"], ["true"], lines)
        self.assertEqual(list(self.flags("INBOX", srv)), [2])           # UID EXPUNGE 1 only
        self.assertEqual(len(self.flags("Done", srv)), 1)

    def test_pop3s_lists_and_fetches_and_deletes_nothing(self):
        a, b = message("one"), message("two")
        self.srv.deliver(self.user, a)
        self.srv.deliver(self.user, b)
        r, lines = self.run_box(self.srv.url("pop3s"), "seen")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        got = self.msgs(lines)
        self.assertEqual(len(got), 2, lines)
        for m, raw in zip(got, (a, b)):
            self.assertRegex(m[1], r"^[0-9a-f]{16}$")                  # the UIDL
            self.assertEqual(m[3], f"pop3s://127.0.0.1:{self.srv.ports['pop3s']} uidl {m[1]}")
            with open(os.path.join(self.out, m[1] + ".eml"), "rb") as f:
                self.assertEqual(f.read(), raw)
        self.assertEqual([ln[2] for ln in lines if ln[0] == "mark"], ["true", "true"])
        # POP3 has no folders: a move is refused, and nothing is ever deleted
        r, lines = self.run_box(self.srv.url("pop3s"), "move", "Processed")
        marks = [ln for ln in lines if ln[0] == "mark"]
        self.assertEqual([ln[2] for ln in marks], ["nil", "nil"])
        self.assertIn("POP3 has no folders", marks[0][3])
        self.assertEqual(len(self.flags()), 2)

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_wrong_password_is_a_clear_error_without_the_password(self):
        wrong = f"wrong-{secrets.token_hex(6)}"
        errs = {}
        for scheme in ("imaps", "pop3s"):
            r, lines = self.run_box(self.srv.url(scheme), password=wrong)
            self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
            errs[scheme] = err = lines[0][1]
            self.assertTrue(err.startswith(self.srv.url(scheme).rstrip("/") + ": login refused"), err)
            self.assertNotIn(wrong, r.stdout + r.stderr)
            self.assertNotIn(self.password, r.stdout + r.stderr)
        self.assertIn("(server: ", errs["imaps"])                            # the server's own words
        self.assertIn("AUTHENTICATIONFAILED", errs["imaps"])

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_missing_mailbox_says_so_with_the_servers_words(self):
        r, lines = self.run_box(self.srv.url("imaps", "NoSuchBox"))
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        err = lines[0][1]
        self.assertTrue(err.startswith(self.srv.url("imaps", "NoSuchBox") + ": cannot open the mailbox"), err)
        self.assertIn("NO Mailbox doesn't exist: NoSuchBox", err)      # not the LOGOUT's "OK" that followed
        self.assertNotIn("login refused", err)

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_unknown_ca_is_a_certificate_error_and_sends_no_password(self):
        self.srv.deliver(self.user, message("one"))
        other_ca = self.path("other")
        # a CA of another process: not the one that signed dovecot's certificate
        os.makedirs(other_ca)
        from tests.integration.harness import _openssl
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                 "-subj", "/CN=other CA",
                 "-keyout", os.path.join(other_ca, "key.pem"), "-out", os.path.join(other_ca, "ca.pem"))
        for scheme in ("imaps", "imap", "pop3s"):
            r, lines = self.run_box(self.srv.url(scheme), ca=False, BOX_CA=os.path.join(other_ca, "ca.pem"))
            self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
            self.assertIn("TLS failed", lines[0][1])
            self.assertRegex(lines[0][1], r"(?i)certificate")
        # without --ca-file: the system's CAs do not know the test CA either
        r, lines = self.run_box(self.srv.url("imaps"), ca=False)
        self.assertRegex(lines[0][1], r"TLS failed.*(?i:certificate)")
        self.assertNotIn(f"Login: user=<{self.user}>", self.srv.log_text())  # no login: no password sent

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_message_over_the_size_cap_comes_truncated_with_its_real_size(self):
        small, big = message("small"), message("big", size=300_000)
        self.srv.deliver(self.user, big)
        self.srv.deliver(self.user, small)
        for scheme in ("imaps", "pop3s"):
            for name in os.listdir(self.out):
                os.remove(os.path.join(self.out, name))
            r, lines = self.run_box(self.srv.url(scheme), BOX_MAX=100_000)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            got = self.msgs(lines)
            self.assertEqual(len(got), 2, lines)
            self.assertEqual(got[0][2], str(len(big)))                      # its real size
            self.assertEqual(got[0][4:7], ["raw", "too_big", "-"])
            with open(os.path.join(self.out, got[0][1] + ".eml"), "rb") as f:
                self.assertEqual(f.read(), big[:100_000])                   # only the first 100000 bytes
            self.assertEqual(got[1][4:7], ["raw", "-", "-"])                # the next one still comes whole
            with open(os.path.join(self.out, got[1][1] + ".eml"), "rb") as f:
                self.assertEqual(f.read(), small)
            if scheme == "imaps":       # (dovecot's POP3 RETR sets \Seen itself: checked before it)
                self.assertNotIn("\\Seen", self.flags()[1])                  # the partial fetch is read-only too
        # and the binding stops a transfer that goes past the cap
        rawcap = self.path("rawcap.lua")
        with open(rawcap, "w") as f:
            f.write(RAWCAP)
        r = self.run_mailshot("exec", rawcap, self.srv.url("imaps") + ";UID=1", "5000",
                              env={"BOX_USER": self.user, "MAILSHOT_IMAP_PASSWORD": self.password,
                                   "BOX_CA": self.srv.ca_cert})
        self.assertEqual(r.stdout.split("\t"), ["nil", "over the limit of 5000 bytes", "too-big", str(len(big)), "5000\n"])

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_imap_uses_starttls_and_verifies_the_certificate(self):
        raw = message("one")
        self.srv.deliver(self.user, raw)
        for scheme in ("imap", "pop3"):
            r, lines = self.run_box(self.srv.url(scheme))
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertEqual(len(self.msgs(lines)), 1, lines)
        logins = [ln for ln in self.srv.log_text().splitlines() if f"Login: user=<{self.user}>" in ln]
        self.assertEqual(len(logins), 2, logins)
        self.assertTrue(all("TLS" in ln for ln in logins), logins)          # dovecot: "..., TLS, session=..."

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_plaintext_is_refused_unless_allowed(self):
        srv = self.start_dovecot(ssl=False)
        srv.add_user(self.user, self.password)
        srv.deliver(self.user, message("one"))
        for scheme in ("imap", "pop3"):
            r, lines = self.run_box(srv.url(scheme), srv=srv)
            self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
            self.assertIn("does not offer STARTTLS", lines[0][1])
        self.assertNotIn("Login: user=", srv.log_text())                     # no password was sent
        for scheme in ("imap", "pop3"):
            r, lines = self.run_box(srv.url(scheme), srv=srv, BOX_PLAIN=1)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertEqual(len(self.msgs(lines)), 1, lines)

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_a_server_that_never_answers_times_out(self):
        import socket
        import time
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)                       # accepts (the kernel does), never greets
            port = listener.getsockname()[1]
            for scheme in ("imap", "pop3s"):         # no greeting; no TLS handshake
                url = f"{scheme}://127.0.0.1:{port}/" + ("INBOX" if scheme.startswith("imap") else "")
                t = time.monotonic()
                r, lines = self.run_box(url, BOX_TIMEOUT=1)
                self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
                self.assertIn(f"{url.rstrip('/')}: timed out", lines[0][1])
                self.assertLess(time.monotonic() - t, 30)   # generous: the timeout is 1 s

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_dovecot_stops_with_all_its_processes(self):
        srv = self.start_dovecot()
        srv.add_user(self.user, self.password)
        c = srv.imap(self.user, self.password)          # a logged-in session: a mail process running
        c.select("INBOX")
        self.assertTrue(process_group_alive(srv.pid))
        srv.stop()
        # (SIGKILLed children are reaped by init a moment later)
        wait_for(lambda: not process_group_alive(srv.pid), timeout=5, what="dovecot's processes to be gone")
        c.shutdown()

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_a_dropped_connection_is_reopened_and_reading_still_marks_nothing_seen(self):
        # curl reconnects by itself and SELECTs (read-write) before fetching: that fetch sets \Seen,
        # which mailbox_curl undoes; POP3 lists again in the new session (numbers may change)
        for s in ("one", "two", "three"):
            self.srv.deliver(self.user, message(s))
        kick = f"doveadm -c {self.srv.workdir}/dovecot.conf kick {self.user} >/dev/null; sleep 0.3"
        for scheme in ("imaps", "pop3s"):
            r, lines = self.run_box(self.srv.url(scheme), BOX_AFTER_FIRST=kick)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            got = self.msgs(lines)
            self.assertEqual([m[4] for m in got], ["raw"] * 3, lines)
            self.assertNotIn("failed", [ln[0] for ln in lines])
            if scheme == "imaps":       # (dovecot's POP3 RETR sets \Seen itself: checked before it)
                self.assertEqual([f for f in self.flags().values() if "\\Seen" in f], [], self.flags())
        self.assertGreaterEqual(self.srv.log_text().count(f"Login: user=<{self.user}>"), 4)   # 2 a run

    @skip_under_valgrind("two cases (IMAP and POP3 listing and fetching) are enough there")
    def test_url_with_a_password_is_refused_and_not_echoed(self):
        url = f"imaps://{self.user}:{self.password}@127.0.0.1:{self.srv.ports['imaps']}/INBOX"
        script = self.path("url.lua")
        with open(script, "w") as f:
            f.write('local box, err = require("mailshot.mailbox_curl").open(os.getenv("BOX_URL"), '
                    '{ password = "x" }) print(box, err)')
        r = self.run_mailshot("exec", script, env={"BOX_URL": url})
        self.assertIn("a password in the URL is refused", r.stdout)
        self.assertNotIn(self.password, r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main()
