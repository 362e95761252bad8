"""A server that misbehaves at every stage costs that message's attempt, never the run: each fault
mode leaves the campaign running to its end with the right outcome for every recipient."""
import collections
import os
import re
import socket
import threading
import unittest

from tests.integration.harness import MailshotTestCase, read_report, write_csv

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

    def test_a_broken_tls_handshake_is_a_temporary_failure_of_that_attempt(self):
        srv = self.start_smtpd()                    # plaintext, while the client expects TLS from the first byte
        p, rep = self.run_campaign(srv.address, tls="tls", give_up="0")
        self.assertEqual(p.returncode, 1)
        for r in rep.values():
            self.assertEqual((r["status"], r["stage"]), ("deferred", "tls"), r)

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


if __name__ == "__main__":
    unittest.main()
