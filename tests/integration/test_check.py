"""`mailshot check HOST:PORT`: the relay test connection, against a real aiosmtpd server."""
import os
import re
import unittest

from tests.integration.harness import (MailshotTestCase, free_port, make_cert, make_ca_and_cert,
                                       valgrind_redundant)

PW = "s3cret-pw"


class CheckTests(MailshotTestCase):
    def check(self, *args, password=PW, **kw):
        env = {"MAILSHOT_PASSWORD": password} if password is not None else {"MAILSHOT_PASSWORD": None}
        return self.run_mailshot("check", *args, env=env, **kw)

    def test_working_starttls_relay_reports_greeting_caps_tls_and_auth(self):
        cert, _ = make_cert(self.tmp)
        srv = self.start_smtpd(tls=True, auth={"alice": PW}, require_starttls=True)
        p = self.check(srv.address, "--user", "alice", "--ca-file", cert)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        out = p.stdout
        self.assertIn("greeting      220 smtpd.test", out)
        self.assertRegex(out, r"capabilities .*AUTH LOGIN PLAIN")  # as advertised after TLS
        self.assertRegex(out, r"tls\s+TLSv1\.[23], \S+")
        self.assertRegex(out, r"certificate\s+.*CN\s*=\s*localhost \(verified\)")
        self.assertIn("auth          succeeded as alice (PLAIN)", out)
        self.assertIn("result        OK", out)
        self.assertNotIn(PW, out + p.stderr)
        # it really authenticated over TLS and said goodbye
        self.assertIn("QUIT", srv.commands())
        self.assertIn("AUTH", srv.commands())

    def test_wrong_password_fails_with_the_servers_535(self):
        cert, _ = make_cert(self.tmp)
        srv = self.start_smtpd(tls=True, auth={"alice": PW})
        p = self.check(srv.address, "--user", "alice", "--ca-file", cert, password="wrong")
        self.assertEqual(p.returncode, 1)
        last = p.stdout.strip().splitlines()[-1]
        self.assertRegex(last, r"^result\s+FAILED at auth: 535 5\.7\.8 ")
        self.assertIn("auth          failed as alice", p.stdout)
        self.assertNotIn("wrong", p.stdout + p.stderr)

    def test_wrong_password_still_describes_the_tls_that_was_up(self):
        # TLS came up before AUTH failed: its version, cipher and certificate must be shown
        cert, _ = make_cert(self.tmp)
        srv = self.start_smtpd(tls=True, auth={"alice": PW}, require_starttls=True)
        p = self.check(srv.address, "--user", "alice", "--ca-file", cert, password="wrong")
        self.assertEqual(p.returncode, 1, p.stdout)
        self.assertRegex(p.stdout, r"tls\s+TLSv1\.[23], \S+")
        self.assertRegex(p.stdout, r"certificate\s+\S.*CN\s*=\s*localhost \(verified\)")
        self.assertNotRegex(p.stdout, r"tls\s+, ")

    def test_refused_port_reports_later_steps_as_not_tried(self):
        port = free_port()
        p = self.check(f"127.0.0.1:{port}", "--user", "alice")
        self.assertEqual(p.returncode, 1)
        self.assertNotIn("failed as alice", p.stdout)
        self.assertRegex(p.stdout, r"(?m)^auth\s+not tried$")
        self.assertRegex(p.stdout, r"(?m)^tls\s+not tried$")
        self.assertRegex(p.stdout, r"(?m)^greeting\s+not tried$")

    @valgrind_redundant("test_wrong_password_still_describes_the_tls_that_was_up, "
                        "test_self_signed_certificate_is_refused_by_default")
    def test_certificate_failure_does_not_claim_auth_failed(self):
        srv = self.start_smtpd(tls=True, auth={"alice": PW})
        p = self.check(srv.address, "--user", "alice")
        self.assertEqual(p.returncode, 1)
        self.assertIn("FAILED at tls: certificate verification failed", p.stdout)
        self.assertNotIn("failed as alice", p.stdout)
        self.assertRegex(p.stdout, r"(?m)^auth\s+not tried$")
        self.assertNotIn("AUTH", srv.commands())

    def test_untested_tls_and_auth_are_said_and_warned_about(self):
        # the server offers STARTTLS and AUTH, --tls none and no --user test neither: no plain "ready"
        srv = self.start_smtpd(tls=True, auth={"alice": PW}, auth_required=True, auth_require_tls=False)
        p = self.check(srv.address, "--tls", "none", password=None)
        self.assertEqual(p.returncode, 0, p.stdout)
        out = p.stdout
        self.assertNotIn("ready to send", out)
        last = out.strip().splitlines()[-1]
        self.assertRegex(last, r"^result\s+OK as far as tested: connected, EHLO ok; TLS not tested \(--tls none\); "
                               r"AUTH not tested \(no --user\)$")
        self.assertRegex(out, r"(?m)^warning\s+the server offers STARTTLS")
        self.assertRegex(out, r"(?m)^warning\s+the server offers AUTH")

    def test_implicit_tls_against_a_starttls_port_suggests_starttls(self):
        srv = self.start_smtpd(tls=True)
        p = self.check(srv.address, "--tls", "tls", "--insecure", password=None)
        self.assertEqual(p.returncode, 1, p.stdout)
        self.assertIn("FAILED at tls:", p.stdout)
        self.assertRegex(p.stdout, r"(?m)^hint\s+.*try --tls starttls")

    def test_starttls_against_an_implicit_tls_port_suggests_tls(self):
        srv = self.start_smtpd(implicit_tls=True)
        p = self.check(srv.address, "--timeout", "2", "--insecure", password=None)
        self.assertEqual(p.returncode, 1, p.stdout)
        self.assertIn("FAILED at greeting:", p.stdout)
        self.assertRegex(p.stdout, r"(?m)^hint\s+.*try --tls tls")

    def test_allow_plaintext_auth_flag_authenticates_without_tls(self):
        srv = self.start_smtpd(auth={"alice": PW}, auth_require_tls=False)
        p = self.check(srv.address, "--tls", "none", "--user", "alice", "--allow-plaintext-auth")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("auth          succeeded as alice", p.stdout)
        self.assertIn("AUTH", srv.commands())
        self.assertNotIn(PW, p.stdout + p.stderr)

    def test_closed_port_fails_at_connect_with_the_reason(self):
        port = free_port()
        p = self.check(f"127.0.0.1:{port}", password=None)
        self.assertEqual(p.returncode, 1)
        self.assertRegex(p.stdout.strip().splitlines()[-1],
                         rf"FAILED at connect: cannot connect to 127\.0\.0\.1:{port}: Connection refused")

    def test_self_signed_certificate_is_refused_by_default(self):
        srv = self.start_smtpd(tls=True)
        p = self.check(srv.address, password=None)
        self.assertEqual(p.returncode, 1)
        self.assertIn("FAILED at tls: certificate verification failed", p.stdout)

    def test_insecure_accepts_it_and_says_not_verified(self):
        srv = self.start_smtpd(tls=True)
        p = self.check(srv.address, "--insecure", password=None)
        self.assertEqual(p.returncode, 0, p.stdout)
        self.assertIn("NOT verified", p.stdout)

    @valgrind_redundant("test_wrong_password_still_describes_the_tls_that_was_up, "
                        "test_direct.test_starttls_is_used_when_offered_and_not_required_otherwise")
    def test_certificate_for_another_name_is_refused(self):
        ca, leaf, key = make_ca_and_cert(self.tmp, san="DNS:wrong.test")
        srv = self.start_smtpd(cert=(leaf, key))
        p = self.check(srv.address, "--ca-file", ca, password=None)
        self.assertEqual(p.returncode, 1)
        self.assertIn("certificate verification failed", p.stdout)
        ca2, leaf2, key2 = make_ca_and_cert(self.tmp)
        srv2 = self.start_smtpd(cert=(leaf2, key2))
        p = self.check(srv2.address, "--ca-file", ca2, password=None)
        self.assertEqual(p.returncode, 0, p.stdout)

    def test_implicit_tls(self):
        cert, _ = make_cert(self.tmp)
        srv = self.start_smtpd(implicit_tls=True, auth={"bob": PW})
        p = self.check(srv.address, "--tls", "tls", "--user", "bob", "--ca-file", cert)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("succeeded as bob", p.stdout)

    def test_starttls_required_but_not_offered_is_an_error_not_a_downgrade(self):
        srv = self.start_smtpd()
        p = self.check(srv.address, password=None)
        self.assertEqual(p.returncode, 1)
        self.assertIn("FAILED at starttls: the server does not offer STARTTLS", p.stdout)
        self.assertNotIn("MAIL", srv.commands())

    def test_password_is_never_sent_in_plaintext(self):
        srv = self.start_smtpd(auth={"alice": PW}, auth_require_tls=False)
        p = self.check(srv.address, "--tls", "none", "--user", "alice")
        self.assertEqual(p.returncode, 1)
        self.assertIn("refusing to send the password over an unencrypted connection", p.stdout)
        self.assertNotIn("AUTH", srv.commands())

    def test_greeting_421_is_reported_with_the_servers_words(self):
        srv = self.start_smtpd(greeting_code=421, greeting_text="4.3.2 Too busy, try later")
        p = self.check(srv.address, "--tls", "none", password=None)
        self.assertEqual(p.returncode, 1)
        self.assertIn("FAILED at greeting: 421", p.stdout)
        self.assertIn("Too busy", p.stdout)

    def test_password_on_the_command_line_is_refused(self):
        p = self.run_mailshot("check", "127.0.0.1:25", "--password", "x")
        self.assertEqual(p.returncode, 2)
        self.assertIn("passwords are not taken from the command line", p.stderr)

    @valgrind_redundant("test_version_is_the_makefiles_in_cli_lua_and_c")
    def test_help_and_version(self):
        p = self.run_mailshot("check", "--help")
        self.assertEqual(p.returncode, 0)
        for opt in ("--tls", "--user", "--password-file", "--ca-file", "--insecure", "MAILSHOT_PASSWORD"):
            self.assertIn(opt, p.stdout)
        p = self.run_mailshot("--version")
        self.assertRegex(p.stdout, r"^mailshot \d+\.\d+\.\d+")
        p = self.run_mailshot("--help")
        for cmd in ("run", "preview", "check", "exec"):
            self.assertIn(f"  {cmd} ", p.stdout)
        p = self.run_mailshot("frobnicate")
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown command", p.stderr)

    def test_version_is_the_makefiles_in_cli_lua_and_c(self):
        # one source of truth: the Makefile's VERSION, compiled into C (mailshot.core.version)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, "Makefile")) as f:
            version = re.search(r"^VERSION\s*:?=\s*(\S+)", f.read(), re.M).group(1)
        p = self.run_mailshot("--version")
        self.assertEqual(p.stdout.strip(), f"mailshot {version}")
        script = self.path("v.lua")
        with open(script, "w") as f:
            f.write('local m = require "mailshot"; print(m.version, m.core.version)')
        p = self.run_mailshot("exec", script)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.split(), [version, version])


if __name__ == "__main__":
    unittest.main()
