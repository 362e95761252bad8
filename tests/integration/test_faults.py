"""A server that misbehaves at every stage costs that message's attempt, never the run: each fault
mode leaves the campaign running to its end with the right outcome for every recipient."""
import os
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


class FaultTests(MailshotTestCase):
    def run_campaign(self, address, n=3, tls="none", give_up=None):
        d = self.path("c")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), ["email"], [[f"f{i}@example.com"] for i in range(n)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
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
