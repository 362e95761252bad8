"""A server that misbehaves at every stage costs that message's attempt, never the run: each fault
mode leaves the campaign running to its end with the right outcome for every recipient."""
import collections
import os
import re
import socket
import threading
import time
import unittest

from tests.integration.harness import (MailshotTestCase, make_cert, read_report, scaled, write_csv,
                                       valgrind_redundant)

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = os.getenv "SMTP_TLS" or "none",
                               timeout = 2, max_connections = 2 }
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi", text = "Hello {{email}}",
  send = relay, concurrency = 4, retry = { first = "0.2s", max = "0.5s", give_up_after = "3s" },
}
"""

# The same campaign with a message of about 4.5 KB: long enough for a server to drop the
# connection in the middle of it (smtpd.py --disconnect-on DATA-BODY).
FILLER = "All work and no play makes Jack a dull boy."
LONG_CAMPAIGN = CAMPAIGN.replace('text = "Hello {{email}}"',
                                 f'text = "Hello {{{{email}}}}\\n" .. ("{FILLER}\\n"):rep(100)')
assert LONG_CAMPAIGN != CAMPAIGN
BODY_DROP_AFTER = 1000     # bytes of the message the server takes before dropping the connection
# what mailshot reports when the connection goes away while it sends the message or waits for
# the reply to the final dot (EOF or a reset, depending on what the server had read)
DROPPED_MID_MESSAGE = (r"^connection (closed by the server|lost) while "
                       r"(waiting for the message reply|sending)")


class FaultTests(MailshotTestCase):
    def run_campaign(self, address, n=3, tls="none", give_up=None, campaign=CAMPAIGN):
        d = self.path("c")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), ["email"], [[f"f{i}@example.com"] for i in range(n)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(campaign)
        args = ["run", os.path.join(d, "c.lua"), "--send", "--force", "--report", "r.csv"]
        if give_up:
            args += ["--give-up-after", give_up]
        p = self.run_mailshot(*args, env={"SMTP_SERVER": address, "SMTP_TLS": tls}, timeout=60)
        return p, {r["email"]: r for r in read_report(self.path("r.csv"))}

    def test_a_dropped_connection_at_each_stage_defers_every_message_and_the_run_ends(self):
        for stage, expect in (("GREETING", "greeting"), ("EHLO", "ehlo"), ("MAIL", "mail"), ("RCPT", "rcpt"),
                              ("DATA", "data"), ("DATA-END", "message")):
            with self.subTest(stage=stage):
                srv = self.start_smtpd(disconnect_on=[stage])
                p, rep = self.run_campaign(srv.address, give_up="0")
                self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
                self.assertEqual(len(rep), 3)
                for r in rep.values():
                    self.assertEqual(r["status"], "deferred", r)
                    self.assertEqual(r["stage"], expect, r)
                    self.assertIn("closed by the server", r["response"])
                srv.stop()

    def body_drops(self, srv):
        """The byte counts at which smtpd.py dropped a connection in the middle of a message."""
        return [int(n) for n in re.findall(r"disconnecting on DATA-BODY after (\d+) bytes", srv.stderr())]

    def rcpt_counts(self, srv):
        return collections.Counter(ln.split(":", 1)[1].strip(" <>") for ln in srv.log_lines()
                                   if ln.upper().startswith("RCPT TO:"))

    @valgrind_redundant("test_a_message_cut_off_mid_body_once_is_sent_again_and_arrives_exactly_once, "
                        "test_resume.test_a_second_run_of_the_same_campaign_is_refused")
    def test_a_connection_dropped_in_the_middle_of_the_message_defers_that_recipient_only(self):
        # every attempt to send f1's message loses the connection after 1000 of its ~4.5 KB
        srv = self.start_smtpd(disconnect_on=["DATA-BODY"], disconnect_after_bytes=BODY_DROP_AFTER,
                               disconnect_rcpt=["f1@"])
        p, rep = self.run_campaign(srv.address, give_up="1s", campaign=LONG_CAMPAIGN)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertEqual(len(rep), 3)
        f1 = rep.pop("f1@example.com")
        self.assertEqual((f1["status"], f1["stage"], f1["code"]), ("deferred", "message", ""), f1)
        self.assertRegex(f1["response"], DROPPED_MID_MESSAGE)
        for r in rep.values():                      # the others are delivered, once each
            self.assertEqual(r["status"], "sent", r)
        got = sorted(m["rcpt_tos"][0] for m in srv.messages())
        self.assertEqual(got, ["f0@example.com", "f2@example.com"])
        for m in srv.messages():
            self.assertGreater(m["size"], 4000)     # so 1000 bytes in is well inside the message
        drops = self.body_drops(srv)
        self.assertGreaterEqual(len(drops), 2, srv.stderr())    # retried within the second
        for n in drops:                             # mid-message: past 1000 bytes, short of ~4.5 KB
            self.assertTrue(BODY_DROP_AFTER <= n < 2000, drops)
        # every attempt at f1 was cut off; f0 and f2 were offered once and never retried
        self.assertEqual(self.rcpt_counts(srv),
                         {"f0@example.com": 1, "f1@example.com": len(drops), "f2@example.com": 1})

    def test_a_message_cut_off_mid_body_once_is_sent_again_and_arrives_exactly_once(self):
        srv = self.start_smtpd(disconnect_on=["DATA-BODY"], disconnect_times=1)   # the first body only
        p, rep = self.run_campaign(srv.address, campaign=LONG_CAMPAIGN)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual({e: r["status"] for e, r in rep.items()},
                         {f"f{i}@example.com": "sent" for i in range(3)})
        drops = self.body_drops(srv)
        self.assertEqual(len(drops), 1, srv.stderr())
        self.assertTrue(200 <= drops[0] < 1000, drops)   # --disconnect-after-bytes defaults to 200
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in srv.messages()), sorted(rep))
        # the recipient whose message was cut off was offered twice, the others once
        self.assertEqual(sorted(self.rcpt_counts(srv).values()), [1, 1, 2])
        self.assertEqual(srv.commands().count("DATA"), 4)

    def test_421_mid_session_is_retried_on_a_new_connection(self):
        srv = self.start_smtpd(max_messages=1)      # the 2nd MAIL on a connection gets 421, then it closes
        p, rep = self.run_campaign(srv.address, n=6)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual({r["status"] for r in rep.values()}, {"sent"})
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in srv.messages()), sorted(rep))
        self.assertNotIn("503", "\n".join(srv.log_lines()))

    @valgrind_redundant("test_a_refused_login_still_falls_back_to_the_other_path_when_the_rule_says_so, "
                        "test_check.test_implicit_tls_against_a_starttls_port_suggests_starttls")
    def test_a_broken_tls_handshake_is_a_temporary_failure_of_that_attempt(self):
        srv = self.start_smtpd()                    # plaintext, while the client expects TLS from the first byte
        p, rep = self.run_campaign(srv.address, tls="tls", give_up="0")
        self.assertEqual(p.returncode, 1)
        for r in rep.values():
            self.assertEqual((r["status"], r["stage"]), ("deferred", "tls"), r)

    @valgrind_redundant("test_a_dropped_connection_at_each_stage_defers_every_message_and_the_run_ends, "
                        "tests/unit/test_smtp_proto.c")
    def test_garbage_and_over_long_lines_are_protocol_errors(self):
        for payload in (b"HELLO THERE\r\n", b"220-" + b"x" * 70000 + b"\r\n", b"\x00\xff\xfe garbage\n"):
            with self.subTest(payload=payload[:12]):
                lsock = socket.socket()
                lsock.bind(("127.0.0.1", 0))
                lsock.listen(16)
                stop = threading.Event()

                def serve():
                    lsock.settimeout(0.2)
                    while not stop.is_set():
                        try:
                            c, _ = lsock.accept()
                        except OSError:
                            continue
                        try:
                            c.sendall(payload)
                            c.recv(1024)
                        except OSError:
                            pass
                        c.close()
                t = threading.Thread(target=serve, daemon=True)
                t.start()
                try:
                    p, rep = self.run_campaign(f"127.0.0.1:{lsock.getsockname()[1]}", give_up="0")
                finally:
                    stop.set()
                    t.join()
                    lsock.close()
                self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
                self.assertEqual(len(rep), 3)
                for r in rep.values():
                    self.assertEqual((r["status"], r["stage"]), ("deferred", "greeting"), r)
                    self.assertRegex(r["response"], "protocol error|closed by the server")


# A campaign that logs in (issue 10 items 5 and 13): the password comes from the environment.
AUTH_CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", ca_file = os.getenv "SMTP_CA_FILE",
                               user = "news", password = os.getenv "SMTP_PASSWORD", timeout = 5,
                               max_connections = 4 }
local send = relay
if os.getenv "FALLBACK" then
  -- relay, then another path (a function standing for direct delivery) when the rule says so
  send = mailshot.fallback { relay, function(msg)
    return { ok = true, code = 250, message = "delivered by the other path", via = "other" }
  end }
end
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi", text = "Hello {{email}}",
  send = send, concurrency = 8, retry = { first = "0.1s", max = "0.2s", give_up_after = "3s" },
}
"""

# One relay:send, timed, for the hostile-reply tests (items 6 and 8).
SEND_ONE = r"""
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = os.getenv "SMTP_TLS",
                               ca_file = os.getenv "SMTP_CA_FILE", user = os.getenv "SMTP_USER",
                               password = os.getenv "SMTP_PASSWORD", timeout = tonumber(os.getenv "TIMEOUT") }
local r = relay:send { from = "s@example.org", to = "r@example.com", data = "Subject: t\n\nhi\n" }
print(("ok=%s stage=%s message=%s"):format(tostring(r.ok), tostring(r.stage), tostring(r.message)))
"""

GOOD_PW, BAD_PW = "right-horse-battery", "wrong-horse-battery"


class HostileServerTests(MailshotTestCase):
    """Issue 10 items 5, 6, 8, 13: a refused login, a dripping server, a huge EHLO reply, forged
    log lines."""

    def campaign(self, n, text=AUTH_CAMPAIGN):
        d = self.path("c")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), ["email"], [[f"u{i}@example.com"] for i in range(n)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(text)
        return os.path.join(d, "c.lua")

    def send_one(self, srv, **env):
        script = self.path("one.lua")
        with open(script, "w") as f:
            f.write(SEND_ONE)
        cert, _ = make_cert(self.tmp)
        e = {"SMTP_SERVER": srv.address, "SMTP_CA_FILE": cert, "SMTP_TLS": "none", "TIMEOUT": "10"}
        e.update(env)
        t0 = time.monotonic()
        p = self.run_mailshot("exec", script, env=e, timeout=scaled(120, 300))
        elapsed = time.monotonic() - t0
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        m = re.search(r"^ok=(\w+) stage=(\S+) message=(.*)$", p.stdout, re.M)
        self.assertIsNotNone(m, p.stdout)
        return m.group(1) == "true", m.group(2), m.group(3), elapsed

    def auth_attempts(self, srv):
        return sum(1 for ln in srv.log_lines() if ln.upper().startswith("AUTH "))

    # ---- item 5: a refused login stops the relay's logins

    @valgrind_redundant("test_the_log_attributes_every_line_and_escapes_injected_bytes, "
                        "test_a_refused_login_still_falls_back_to_the_other_path_when_the_rule_says_so")
    def test_a_wrong_password_costs_at_most_one_login_per_connection_and_the_rows_wait_for_resume(self):
        n = scaled(60, 50)
        srv = self.start_smtpd(tls=True, auth={"news": GOOD_PW})
        script = self.campaign(n)
        cert, _ = make_cert(self.tmp)
        env = {"SMTP_SERVER": srv.address, "SMTP_CA_FILE": cert, "SMTP_PASSWORD": BAD_PW}
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", env=env, timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 1, p.stderr[-3000:])
        rep = read_report(self.path("r.csv"))
        self.assertEqual(sorted(r["email"] for r in rep), sorted(f"u{i}@example.com" for i in range(n)))
        for r in rep:
            self.assertEqual((r["status"], r["stage"]), ("deferred", "auth"), r)
            self.assertIn("535", r["response"])
            self.assertIn("Authentication credentials invalid", r["response"])   # the server's words
            self.assertIn("no further login was attempted", r["response"])
        # max_connections = 4: at most one failed login per connection that was open at the time
        attempts = self.auth_attempts(srv)
        self.assertGreaterEqual(attempts, 1)
        self.assertLessEqual(attempts, 4, srv.log_lines())
        self.assertEqual(srv.message_count(), 0)
        said = [l for l in p.stderr.splitlines() if "refused our login" in l]
        self.assertEqual(len(said), 1, p.stderr[-3000:])
        self.assertRegex(said[0], r"^mailshot: relay 127\.0\.0\.1:\d+ refused our login \(535 5\.7\.8 .*\): "
                                  r"no further logins this run; fix the credentials, then run again with --resume$")
        self.assertNotIn(BAD_PW, p.stdout + p.stderr)
        # fixed password, --resume: every deferred row is sent now
        env["SMTP_PASSWORD"] = GOOD_PW
        p = self.run_mailshot("run", script, "--send", "--resume", "--report", "r.csv", env=env,
                              timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        rep = read_report(self.path("r.csv"))
        self.assertEqual([r["status"] for r in rep], ["sent"] * n)
        self.assertEqual(srv.message_count(), n)

    def test_a_refused_login_still_falls_back_to_the_other_path_when_the_rule_says_so(self):
        srv = self.start_smtpd(tls=True, auth={"news": GOOD_PW})
        script = self.campaign(20)
        cert, _ = make_cert(self.tmp)
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", timeout=scaled(60, 300),
                              env={"SMTP_SERVER": srv.address, "SMTP_CA_FILE": cert, "SMTP_PASSWORD": BAD_PW,
                                   "FALLBACK": "1"})
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        rep = read_report(self.path("r.csv"))
        self.assertEqual(len(rep), 20)
        for r in rep:
            self.assertEqual((r["status"], r["via"]), ("sent", "other"), r)
        self.assertLessEqual(self.auth_attempts(srv), 4, srv.log_lines())
        self.assertEqual(sum("refused our login" in l for l in p.stderr.splitlines()), 1, p.stderr)

    # ---- item 6: a reply must be complete within the timeout

    def test_a_server_dripping_a_reply_byte_by_byte_times_out_within_the_wait(self):
        # greeting ~36 bytes at 1 byte/s (~36 s); EHLO reply ~1.6 KB at 10 bytes/s (~160 s)
        for what, drip, extra, stage in (("GREETING", "GREETING:1000", {}, "greeting"),
                                         ("EHLO", "EHLO:100", {"ehlo_padding": 20}, "ehlo")):
            with self.subTest(what=what):
                srv = self.start_smtpd(drip=[drip], **extra)
                ok, st, msg, elapsed = self.send_one(srv, TIMEOUT="2")
                self.assertFalse(ok, msg)
                self.assertEqual(st, stage, msg)
                self.assertRegex(msg, rf"^timed out after 2 s waiting for the {stage} reply \(\d+ bytes of it came")
                self.assertLess(elapsed, scaled(15, 60), msg)
                self.assertIn("dripping", srv.stderr())      # the drip really ran
                srv.stop()

    # ---- item 8: a long EHLO reply keeps its capabilities

    def test_an_ehlo_reply_of_several_kilobytes_keeps_starttls_and_auth(self):
        srv = self.start_smtpd(tls=True, auth={"news": GOOD_PW}, ehlo_padding=100)   # ~7.6 KB
        ok, st, msg, _ = self.send_one(srv, SMTP_TLS="starttls", SMTP_USER="news", SMTP_PASSWORD=GOOD_PW)
        self.assertTrue(ok, f"{st}: {msg}")
        (m,) = srv.messages()
        self.assertTrue(m["tls"])
        self.assertEqual(m["auth_user"], "news")

    def test_an_ehlo_reply_beyond_our_bounds_fails_closed(self):
        srv = self.start_smtpd(tls=True, ehlo_padding=1100)                           # > 1000 lines, ~80 KB
        ok, st, msg, _ = self.send_one(srv, SMTP_TLS="starttls")
        self.assertFalse(ok, msg)
        self.assertEqual(st, "ehlo", msg)
        self.assertRegex(msg, r"^protocol error: reply (has more than 1000 lines|longer than 65536 octets)")
        self.assertEqual(srv.message_count(), 0)

    # ---- item 13: the dialogue log cannot be forged, and tells sessions apart

    def test_the_log_attributes_every_line_and_escapes_injected_bytes(self):
        # a greeting whose continuation lines look like our own log lines, with CR and ESC inside
        inject = r"> AUTH PLAIN Zm9yZ2Vk\n[s99] 127.0.0.1 > QUIT\rx\n\x1b[31mred\x1b[0m"
        srv = self.start_smtpd(tls=True, auth={"news": GOOD_PW}, greeting_lines=inject,
                               delay=["DATA-END:0.1"])
        script = self.campaign(12)
        cert, _ = make_cert(self.tmp)
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", "--log", "d.log",
                              timeout=scaled(60, 300),
                              env={"SMTP_SERVER": srv.address, "SMTP_CA_FILE": cert, "SMTP_PASSWORD": GOOD_PW})
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        with open(self.path("d.log"), "rb") as f:
            raw = f.read()
        self.assertNotIn(b"\x1b", raw)
        self.assertNotIn(b"\r", raw)
        self.assertNotIn(GOOD_PW.encode(), raw)
        line_re = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \[s(\d+)\] 127\.0\.0\.1 (>|<|--|!!) (.*)$")
        sessions = collections.defaultdict(list)
        for ln in raw.decode("ascii").split("\n")[:-1]:
            m = line_re.match(ln)
            self.assertIsNotNone(m, ln)
            sessions[int(m.group(1))].append((m.group(2), m.group(3)))
        # one id per connection the server saw, several at once (concurrency 8, max_connections 4)
        self.assertGreaterEqual(len(sessions), 2, list(sessions))
        self.assertEqual(len(sessions), srv.connections())
        ours = re.compile(r"^(EHLO \S+|STARTTLS|AUTH PLAIN \*{8}|MAIL FROM:<[^>]*>.*|RCPT TO:<[^>]*>|DATA|"
                          r"\[message: \d+ bytes\]|RSET|QUIT)$")
        for sid, lines in sessions.items():
            for d, text in lines:
                if d == ">":
                    self.assertRegex(text, ours, f"[s{sid}] a client line that we never sent")
            theirs = [t for d, t in lines if d == "<"]
            # the forged lines arrive as the server's, escaped, each on its own "<" line
            self.assertIn(r"220-> AUTH PLAIN Zm9yZ2Vk", theirs)
            self.assertIn(r"220-[s99] 127.0.0.1 > QUIT\x0Dx", theirs)
            self.assertIn(r"220-\x1B[31mred\x1B[0m", theirs)
            self.assertEqual(sum(t == "AUTH PLAIN ********" for d, t in lines if d == ">"), 1)


if __name__ == "__main__":
    unittest.main()
