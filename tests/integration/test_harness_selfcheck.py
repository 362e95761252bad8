"""Self-check of the test SMTP server (tests/servers/smtpd.py) and harness, using Python's
smtplib as the client.  This tests our test tooling, not mailshot."""

import os
import smtplib
import socket
import ssl
import time

from unittest import mock

from tests.integration import harness
from tests.integration.harness import (
    MailshotTestCase, free_port, make_ca_and_cert, make_cert, process_group_alive, read_report,
    write_csv,
)

MSG = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hello\r\n\r\n.leading dot\r\nbody \xc3\xa9\r\n"


def client_ctx(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx


class SelfCheck(MailshotTestCase):
    def tearDown(self):
        self.assertNoServersLeft()
        super().tearDown()

    def session_log(self, srv):
        with open(os.path.join(srv.maildir, "session.log"), encoding="utf-8") as f:
            return f.read()

    def smtp(self, srv, **kw):
        s = smtplib.SMTP(srv.host, srv.port, timeout=10, **kw)
        self.addCleanup(s.close)
        return s

    def test_starttls_auth_plain_delivers(self):
        cert, key = make_cert(self.tmp)
        srv = self.start_smtpd(cert=(cert, key), auth={"alice": "s3cret"})
        s = self.smtp(srv)
        s.ehlo("client.test")
        self.assertTrue(s.has_extn("starttls"))
        self.assertFalse(s.has_extn("auth"), "AUTH must not be offered before TLS")
        self.assertTrue(s.has_extn("pipelining"))
        self.assertTrue(s.has_extn("8bitmime"))
        s.starttls(context=client_ctx(cert))
        s.ehlo("client.test")
        self.assertIn("PLAIN", s.esmtp_features["auth"])
        s.user, s.password = "alice", "s3cret"
        code, _ = s.auth("PLAIN", s.auth_plain, initial_response_ok=True)  # AUTH PLAIN <b64>
        self.assertEqual(code, 235)
        refused = s.sendmail("a@x.test", ["b@y.test", "c@z.test"], MSG,
                             mail_options=["BODY=8BITMIME"])
        self.assertEqual(refused, {})
        s.quit()
        (m,) = srv.wait_for_messages(1)
        self.assertEqual(m["mail_from"], "a@x.test")
        self.assertEqual(m["rcpt_tos"], ["b@y.test", "c@z.test"])
        self.assertIn("BODY=8BITMIME", m["mail_options"])
        self.assertTrue(m["tls"])
        self.assertEqual(m["auth_user"], "alice")
        self.assertEqual(m["peer"][0], "127.0.0.1")
        # raw: dot-unstuffed, CRLF kept, no terminating ".\r\n"
        self.assertEqual(m["raw"], MSG)
        self.assertEqual(m["msg"]["subject"], "hello")
        lines = srv.log_lines()
        self.assertIn("AUTH PLAIN ********", lines)
        self.assertNotIn("s3cret", self.session_log(srv))
        ents = srv.log_entries()
        self.assertFalse(ents[0]["tls"])
        self.assertTrue(ents[-1]["tls"])
        self.assertEqual(srv.commands()[:4], ["EHLO", "STARTTLS", "EHLO", "AUTH"])

    def test_auth_login_and_wrong_password(self):
        cert, key = make_cert(self.tmp)
        srv = self.start_smtpd(cert=(cert, key), auth=["bob:pw1"])
        s = self.smtp(srv)
        s.starttls(context=client_ctx(cert))
        with self.assertRaises(smtplib.SMTPAuthenticationError) as cm:
            s.login("bob", "wrong")
        self.assertEqual(cm.exception.smtp_code, 535)
        s.user, s.password = "bob", "pw1"
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        self.assertEqual(code, 235)
        s.quit()
        self.assertIn("********", srv.log_lines())  # LOGIN continuation lines masked
        log = self.session_log(srv)
        self.assertNotIn("pw1", log)
        self.assertNotIn("wrong", log)

    def test_require_starttls_refuses_mail(self):
        srv = self.start_smtpd(require_starttls=True)
        s = self.smtp(srv)
        s.ehlo()
        code, _ = s.mail("a@x.test")
        self.assertEqual(code, 530)
        s.quit()
        self.assertEqual(srv.message_count(), 0)

    def test_auth_required_and_plaintext_auth(self):
        srv = self.start_smtpd(auth={"u": "p"}, auth_required=True, auth_require_tls=False)
        s = self.smtp(srv)
        s.ehlo()
        self.assertTrue(s.has_extn("auth"))
        self.assertEqual(s.mail("a@x.test")[0], 530)
        s.login("u", "p")
        s.sendmail("a@x.test", ["b@y.test"], MSG)
        s.quit()
        self.assertEqual(srv.wait_for_messages(1)[0]["auth_user"], "u")

    def test_greeting_421(self):
        srv = self.start_smtpd(greeting_code=421)
        with self.assertRaises(smtplib.SMTPConnectError) as cm:
            smtplib.SMTP(srv.host, srv.port, timeout=10)
        self.assertEqual(cm.exception.smtp_code, 421)

    def test_reject_one_rcpt_among_several(self):
        srv = self.start_smtpd(reject_rcpt=[("bad@", 550, "5.1.1 No such user"),
                                            ("later@", 451, "4.3.0 Try later")])
        s = self.smtp(srv)
        refused = s.sendmail("a@x.test", ["ok1@y.test", "bad@y.test", "later@y.test",
                                          "ok2@y.test"], MSG)
        self.assertEqual(refused, {"bad@y.test": (550, b"5.1.1 No such user"),
                                   "later@y.test": (451, b"4.3.0 Try later")})
        s.quit()
        (m,) = srv.wait_for_messages(1)
        self.assertEqual(m["rcpt_tos"], ["ok1@y.test", "ok2@y.test"])

    def test_reject_data_from(self):
        srv = self.start_smtpd(reject_data_from=["spam@:554:5.7.1 Content rejected"])
        s = self.smtp(srv)
        with self.assertRaises(smtplib.SMTPDataError) as cm:
            s.sendmail("spam@x.test", ["b@y.test"], MSG)
        self.assertEqual(cm.exception.smtp_code, 554)
        s.sendmail("ham@x.test", ["b@y.test"], MSG)
        s.quit()
        self.assertEqual([m["mail_from"] for m in srv.wait_for_messages(1)], ["ham@x.test"])

    def test_no_ehlo_falls_back_to_helo(self):
        srv = self.start_smtpd(no_ehlo=True)
        s = self.smtp(srv)
        code, _ = s.ehlo()
        self.assertEqual(code, 502)
        code, _ = s.helo("client.test")
        self.assertEqual(code, 250)
        s.sendmail("a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nhi\r\n")
        s.quit()
        (m,) = srv.wait_for_messages(1)
        self.assertFalse(m["esmtp"])
        self.assertEqual(m["helo"], "client.test")

    def test_no_pipelining_no_8bitmime(self):
        srv = self.start_smtpd(no_pipelining=True, no_8bitmime=True)
        s = self.smtp(srv)
        s.ehlo()
        self.assertFalse(s.has_extn("pipelining"))
        self.assertFalse(s.has_extn("8bitmime"))
        self.assertEqual(s.mail("a@x.test", ["BODY=8BITMIME"])[0], 555)
        s.quit()

    def test_pipelined_commands_are_flagged(self):
        srv = self.start_smtpd(reject_unauth_pipelining=False)
        with socket.create_connection((srv.host, srv.port), timeout=10) as c:
            f = c.makefile("rb")
            f.readline()
            c.sendall(b"EHLO c.test\r\n")
            while f.readline()[3:4] == b"-":
                pass
            c.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            replies = [f.readline()[:3] for _ in range(3)]
            self.assertEqual(replies, [b"250", b"250", b"354"])
            c.sendall(b"Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n")
            self.assertEqual(f.readline()[:3], b"250")
            self.assertEqual(f.readline()[:3], b"221")
        ents = srv.log_entries()
        by = {e["line"].split()[0].upper(): e["pipelined"] for e in ents}
        self.assertEqual(by, {"EHLO": False, "MAIL": True, "RCPT": True, "DATA": False,
                              "QUIT": False})

    def test_reject_unauth_pipelining(self):
        srv = self.start_smtpd(no_pipelining=True, reject_unauth_pipelining=True)
        with socket.create_connection((srv.host, srv.port), timeout=10) as c:
            f = c.makefile("rb")
            f.readline()
            c.sendall(b"EHLO c.test\r\n")
            while f.readline()[3:4] == b"-":
                pass
            c.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
            self.assertEqual(f.readline()[:3], b"503")

    def test_starttls_inject(self):
        cert, key = make_cert(self.tmp)
        srv = self.start_smtpd(cert=(cert, key), starttls_inject=True)
        with socket.create_connection((srv.host, srv.port), timeout=10) as raw:
            buf = b""
            def read_until(marker):
                nonlocal buf
                while marker not in buf:
                    chunk = raw.recv(4096)
                    self.assertTrue(chunk, f"EOF; got {buf!r}")
                    buf += chunk
            read_until(b"\r\n")                    # greeting
            buf = b""
            raw.sendall(b"EHLO c.test\r\n")
            read_until(b"250 HELP\r\n")
            buf = b""
            raw.sendall(b"STARTTLS\r\n")
            read_until(b"250 injected\r\n")
            self.assertEqual(buf, b"220 Ready to start TLS\r\n250 injected\r\n")
            tls = client_ctx(cert).wrap_socket(raw, server_hostname="localhost")
            with tls:
                f = tls.makefile("rb")
                tls.sendall(b"EHLO c.test\r\n")
                lines = []
                while True:
                    ln = f.readline()
                    lines.append(ln)
                    if ln[3:4] != b"-":
                        break
                self.assertTrue(lines[0].startswith(b"250-"), lines)
                self.assertNotIn(b"250-STARTTLS\r\n", lines)
                tls.sendall(b"QUIT\r\n")
                self.assertEqual(f.readline()[:3], b"221")

    def test_implicit_tls(self):
        ca, leaf, key = make_ca_and_cert(self.tmp)
        srv = self.start_smtpd(cert=(leaf, key), implicit_tls=True, auth={"u": "p"})
        s = smtplib.SMTP_SSL(srv.host, srv.port, timeout=10, context=client_ctx(ca))
        self.addCleanup(s.close)
        s.ehlo()
        self.assertFalse(s.has_extn("starttls"))
        s.login("u", "p")
        s.sendmail("a@x.test", ["b@y.test"], MSG)
        s.quit()
        (m,) = srv.wait_for_messages(1)
        self.assertTrue(m["tls"])
        self.assertEqual(m["auth_user"], "u")
        self.assertTrue(all(e["tls"] for e in srv.log_entries()))

    def test_untrusted_cert_rejected_by_verifying_client(self):
        _ca, leaf, key = make_ca_and_cert(self.tmp, san="DNS:wrong.test")
        srv = self.start_smtpd(cert=(leaf, key))
        s = self.smtp(srv)
        with self.assertRaises(ssl.SSLCertVerificationError):
            s.starttls(context=client_ctx(_ca))  # hostname 127.0.0.1 not in SAN

    def test_stop_is_clean_and_free_port_is_closed(self):
        srv = self.start_smtpd()
        self.assertEqual(srv.stop(), 0)
        self.assertFalse(process_group_alive(srv.pid))
        port = free_port()
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

    def test_second_address_and_bad_startup(self):
        srv = self.start_smtpd(host="127.0.0.2")
        s = smtplib.SMTP("127.0.0.2", srv.port, timeout=10)
        s.sendmail("a@x.test", ["b@y.test"], MSG)
        s.quit()
        self.assertEqual(srv.wait_for_messages(1)[0]["local"], ["127.0.0.2", srv.port])
        t0 = time.monotonic()
        with self.assertRaises(AssertionError) as cm:   # port already taken -> clear failure
            self.start_smtpd(host="127.0.0.2", port=srv.port)
        self.assertIn("stderr", str(cm.exception))
        self.assertLess(time.monotonic() - t0, 10)

    def test_misc_options(self):
        srv = self.start_smtpd(disconnect_on=["RCPT"])
        s = self.smtp(srv)
        s.ehlo()
        s.mail("a@x.test")
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            s.rcpt("b@y.test")

        srv = self.start_smtpd(disconnect_on=["DATA-END"], delay=["GREETING:0.3"])
        t0 = time.monotonic()
        s = self.smtp(srv)
        self.assertGreaterEqual(time.monotonic() - t0, 0.25)
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            s.sendmail("a@x.test", ["b@y.test"], MSG)
        self.assertEqual(srv.message_count(), 0)

        srv = self.start_smtpd(max_messages=1, reject_mail_from=[("evil@", 553, "5.7.1 no")],
                               reject_data_content=["VIRUS:554:5.7.1 infected"], size=1000,
                               no_smtputf8=True)
        s = self.smtp(srv)
        s.ehlo()
        self.assertEqual(s.esmtp_features["size"], "1000")
        self.assertFalse(s.has_extn("smtputf8"))
        self.assertEqual(s.mail("evil@x.test")[0], 553)
        with self.assertRaises(smtplib.SMTPDataError):
            s.sendmail("a@x.test", ["b@y.test"], b"Subject: VIRUS\r\n\r\nx\r\n")
        with self.assertRaises(smtplib.SMTPSenderRefused):   # SIZE=2000 > 1000
            s.sendmail("a@x.test", ["b@y.test"], b"x" * 2000)
        s.sendmail("a@x.test", ["b@y.test"], MSG)
        with self.assertRaises(smtplib.SMTPSenderRefused) as cm:
            s.sendmail("a@x.test", ["b@y.test"], MSG)
        self.assertEqual(cm.exception.smtp_code, 421)
        self.assertEqual(srv.message_count(), 1)
        self.assertEqual(srv.connections(), 1)

    def test_run_mailshot_guards(self):
        fake = self.path("fake-mailshot")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\n"
                    "case \"$1\" in\n"
                    "  sleep) exec sleep 30;;\n"
                    "  asan) echo '==1==ERROR: AddressSanitizer: heap-use-after-free' >&2;;\n"
                    "  *) echo \"args:$*\"; echo \"pw:$SMTP_PASSWORD\"; cat;;\n"
                    "esac\n")
        os.chmod(fake, 0o755)
        with mock.patch.object(harness, "MAILSHOT", fake):
            srv = self.start_smtpd(auth={"u": "topsecret"}, auth_require_tls=False)
            r = self.run_mailshot("send", "--port", srv.port, env={"SMTP_PASSWORD": "topsecret"},
                                  input="stdin-data")
            self.assertEqual(r.returncode, 0)
            self.assertEqual(r.stdout, f"args:send --port {srv.port}\npw:topsecret\nstdin-data")
            with self.assertRaisesRegex(AssertionError, "password appears"):
                self.run_mailshot("--password", "topsecret")
            with self.assertRaisesRegex(AssertionError, "sanitizer report"):
                self.run_mailshot("asan")
            t0 = time.monotonic()
            with self.assertRaisesRegex(AssertionError, "timed out"):
                self.run_mailshot("sleep", timeout=0.5)
            self.assertLess(time.monotonic() - t0, 5)
            self.assertFalse(process_group_alive(self._procs[-1].pid))

    def test_valgrind_logs_fail_the_test_once_with_their_content(self):
        # what MAILSHOT_VALGRIND=1 relies on: valgrind -q creates every log, and writes only reports
        d = self.valgrind_log_dir
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "valgrind.100.log"), "w").close()
        self._check_valgrind_logs()                 # empty: nothing to say
        with open(os.path.join(d, "valgrind.101.log"), "w") as f:
            f.write("==101== Conditional jump or move depends on uninitialised value(s)\n")
        self._check_valgrind_logs(pid=100)          # another run's log is not this run's
        with self.assertRaisesRegex(AssertionError, r"(?s)valgrind reported errors.*valgrind\.101\.log.*uninitialised"):
            self._check_valgrind_logs()
        self._check_valgrind_logs()                 # reported once: not again when the test ends
        cmd = self.mailshot_cmd("run", 1)
        self.assertEqual(cmd[-3:], [harness.MAILSHOT, "run", "1"])
        if harness.VALGRIND:
            # the Lua state on the C library's allocator under valgrind (src/main.c: memcheck tracks it)
            self.assertEqual(cmd[:2], ["env", "MAILSHOT_MALLOC=libc"], cmd)
            self.assertTrue(os.path.basename(cmd[2]) == "valgrind" and "--leak-check=full" in cmd, cmd)
            self.assertIn(f"--log-file={d}/valgrind.%p.log", cmd)
        else:
            self.assertEqual(cmd, [harness.MAILSHOT, "run", "1"])

    def test_csv_helpers(self):
        p = self.path("l.csv")
        write_csv(p, ["email", "name"], [["a@x.test", "Ann, \"A\""], {"email": "b@y.test"}])
        self.assertEqual(read_report(p), [{"email": "a@x.test", "name": 'Ann, "A"'},
                                          {"email": "b@y.test", "name": ""}])
