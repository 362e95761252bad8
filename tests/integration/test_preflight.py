"""`mailshot preflight` against a local DNS server serving SPF, DKIM and DMARC records, right and
wrong: each planted fault is found, and a correct set-up passes."""
import os
import re
import unittest

from tests.integration.harness import MailshotTestCase, skip_under_valgrind, write_csv, valgrind_redundant

CAMPAIGN = """
local mailshot = require "mailshot"
return mailshot.campaign {
  recipients = "list.csv", from = "News <news@" .. os.getenv "FROM_DOMAIN" .. ">", subject = "Hi {{name}}",
  text = "Hello {{name}}", suppress = "unsubscribed.txt",
  dkim = { domain = os.getenv "FROM_DOMAIN", selector = "s1", key_file = os.getenv "KEY" },
  return_path = os.getenv "RP_DOMAIN" and { domain = os.getenv "RP_DOMAIN", secret = "preflight-secret-0123456789" },
}
"""


class PreflightTests(MailshotTestCase):
    def setUp(self):
        super().setUp()
        keys = {}
        for name in ("right", "other"):
            p = self.run_mailshot("dkim", "keygen", "--selector", "s1", "--domain", "acme.test",
                                  "--algorithm", "ed25519-sha256", "--out", f"{name}.key")
            self.assertEqual(p.returncode, 0, p.stderr)
            keys[name] = p.stdout.strip().splitlines()[-1]
        self.key = self.path("right.key")
        self.dns = self.start_dns({
            "mx": [("good.test", "mx.good.test", 10), ("bounces.acme.test", "mx.good.test", 10)],
            "a": [("mx.good.test", "127.0.0.2")],
            "null_mx": ["null.test"],
            "txt": [("acme.test", "v=spf1 ip4:127.0.0.1 -all"), ("bounces.acme.test", "v=spf1 ip4:127.0.0.3 -all"), ("s1._domainkey.acme.test", keys["right"]),
                    ("_dmarc.acme.test", "v=DMARC1; p=reject; rua=mailto:d@acme.test"),
                    ("s1._domainkey.bad.test", keys["other"]), ("bad.test", "some unrelated text")],
        })
        d = self.path("c")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"],
                  [["a@good.test", "A"], ["b@good.test", "B"], ["c@null.test", "C"], ["gone@good.test", "G"],
                   ["not an address", "X"], ["a@good.test", "dup"]])
        with open(os.path.join(d, "unsubscribed.txt"), "w") as f:
            f.write("gone@good.test\n")
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        self.script = os.path.join(d, "c.lua")

    def preflight(self, domain, return_path=None):
        return self.run_mailshot("preflight", self.script, "--dns", self.dns.address, "--timeout", "1",
                                 env={"FROM_DOMAIN": domain, "KEY": self.key, "RP_DOMAIN": return_path})

    def test_a_correct_setup_is_ready_and_the_list_problems_are_reported(self):
        p = self.preflight("acme.test")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        out = p.stdout
        self.assertIn("verdict: ready to send", out)
        self.assertIn("DKIM: the key at s1._domainkey.acme.test matches", out)
        self.assertIn("DMARC: policy reject", out)
        self.assertIn("SPF: acme.test: v=spf1 ip4:127.0.0.1 -all", out)
        self.assertRegex(out, r"recipients: 1 at null\.test, which cannot receive mail: .*null MX")
        self.assertIn('invalid address "not an address"', out)
        self.assertIn("1 suppressed addresses will be skipped", out)
        self.assertIn("1 duplicate rows will be skipped", out)
        self.assertRegex(out, r"\n\s+2\s+good\.test\n")

    def test_a_list_that_is_not_utf8_without_an_encoding_blocks(self):
        with open(self.path("c", "list.csv"), "ab") as f:
            f.write("z@good.test,Zoë\r\n".encode("latin-1"))
        p = self.preflight("acme.test")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"blocking.*list\.csv is not valid UTF-8: line 8, column 'name', byte 0xEB")
        self.assertNotIn("ready to send", p.stdout)

    @valgrind_redundant("test_a_correct_setup_is_ready_and_the_list_problems_are_reported, "
                        "test_direct.test_dns_failures_keep_their_name_in_the_result")
    def test_a_lookup_without_an_answer_is_not_reported_as_no_record(self):
        # SERVFAIL: dnsmasq passes on its upstream's for names under broken.test; REFUSED: dnsmasq's
        # own answer for names outside its zones.  Neither says the record is missing.
        sf = self.start_silent_dns(rcode="SERVFAIL")
        dns = self.start_dns({"forward": [("broken.test", sf.address)], "mx": [("good.test", "mx.good.test", 10)],
                              "a": [("mx.good.test", "127.0.0.2")]})
        d = self.path("c2")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"],
                  [["a@good.test", "A"], ["b@x.broken.test", "B"], ["c@y.other", "C"]])
        open(os.path.join(d, "unsubscribed.txt"), "w").close()
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        for domain, word in (("acme.broken.test", "SERVFAIL"), ("acme.other", "REFUSED")):
            p = self.run_mailshot("preflight", os.path.join(d, "c.lua"), "--dns", dns.address, "--timeout", "1",
                                  env={"FROM_DOMAIN": domain, "KEY": self.key})
            out = p.stdout
            self.assertEqual(p.returncode, 1, out + p.stderr)       # unknown is not ready
            for wrong in ("publishes no SPF record", "no key published", "no record at _dmarc",
                          "x.broken.test, which cannot receive mail", "y.other, which cannot receive mail"):
                self.assertNotIn(wrong, out)
            d_ = re.escape(domain)
            self.assertRegex(out, rf"blocking\s+SPF: could not ask for {d_}'s SPF record .*\({word}\)")
            self.assertRegex(out, rf"blocking\s+DKIM: could not ask for the key at s1\._domainkey\.{d_} .*\({word}\)")
            self.assertRegex(out, rf"blocking\s+DMARC: could not ask for the record at _dmarc\.{d_} .*\({word}\)")
            self.assertRegex(out, r"warning\s+recipients: 1 at x\.broken\.test: could not look up its mail servers .*\(SERVFAIL\)")
            self.assertRegex(out, r"warning\s+recipients: 1 at y\.other: could not look up its mail servers .*\(REFUSED\)")
            self.assertRegex(out, r"\n\s+1\s+x\.broken\.test  \(DNS lookup failed: servfail\)\n")
            self.assertRegex(out, r"\n\s+1\s+good\.test\n")

    def test_connect_probes_each_mx_host_without_mail_or_rcpt(self):
        servers, port = self.start_smtpd_many(["127.0.0.2"], tls=True)
        p = self.run_mailshot("preflight", self.script, "--dns", self.dns.address, "--connect", "--port", str(port),
                              "--allow-private", env={"FROM_DOMAIN": "acme.test", "KEY": self.key})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"info\s+MX mx\.good\.test \(127\.0\.0\.2\): TLSv1\.[23]")
        self.assertNotIn("direct delivery refuses", p.stdout)
        cmds = servers[0].commands()
        self.assertIn("EHLO", cmds)
        self.assertIn("STARTTLS", cmds)
        self.assertNotIn("MAIL", cmds)
        self.assertNotIn("RCPT", cmds)

    @valgrind_redundant("test_a_correct_setup_is_ready_and_the_list_problems_are_reported, "
                        "test_connect_probes_each_mx_host_without_mail_or_rcpt")
    def test_connect_follows_direct_deliverys_private_address_policy(self):
        # without --allow-private the probe does not connect to 127.0.0.2, and says why
        servers, port = self.start_smtpd_many(["127.0.0.2"], tls=True)
        p = self.run_mailshot("preflight", self.script, "--dns", self.dns.address, "--connect", "--port", str(port),
                              env={"FROM_DOMAIN": "acme.test", "KEY": self.key})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"warning\s+MX mx\.good\.test \(127\.0\.0\.2\): not probed: a loopback address, "
                                   r"which direct delivery refuses \(--allow-private probes it\)")
        self.assertRegex(p.stdout, r"warning\s+recipients: 2 at good\.test, whose every mail server direct delivery "
                                   r"refuses .*: mx\.good\.test 127\.0\.0\.2 \(loopback\)")
        self.assertNotIn("TLSv1", p.stdout)
        self.assertEqual(servers[0].connections(), 0)

    @skip_under_valgrind("Lua-only checks; the other preflight cases run the same DNS code under valgrind")
    def test_a_return_path_domain_gets_the_spf_check_and_must_receive_mail(self):
        # SPF is judged at the envelope sender's domain (return_path); DKIM and DMARC at From's
        p = self.preflight("acme.test", return_path="bounces.acme.test")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        out = p.stdout
        self.assertIn("SPF: bounces.acme.test: v=spf1 ip4:127.0.0.3 -all", out)
        self.assertNotIn("SPF: acme.test:", out)
        self.assertIn("return_path: bounces come back to bounces.acme.test (mail server mx.good.test)", out)
        self.assertIn("DKIM: the key at s1._domainkey.acme.test matches", out)
        self.assertIn("DMARC: policy reject at _dmarc.acme.test", out)
        self.assertNotIn("not aligned", out)
        # a return path domain that cannot receive mail, has no SPF record and is not under From's domain
        p = self.preflight("acme.test", return_path="bounces.elsewhere.test")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        out = p.stdout
        self.assertRegex(out, r"blocking.*return_path: bounces\.elsewhere\.test cannot receive mail")
        self.assertRegex(out, r"blocking.*SPF: bounces\.elsewhere\.test publishes no SPF record")
        self.assertRegex(out, r"warning.*return_path: bounces\.elsewhere\.test is not aligned with the From domain acme\.test")
        self.assertIn("DMARC: policy reject at _dmarc.acme.test", out)

    @valgrind_redundant("test_a_correct_setup_is_ready_and_the_list_problems_are_reported, "
                        "test_direct.test_null_mx_and_nxdomain_fail_permanently_without_connecting")
    def test_each_planted_fault_is_found_and_blocks(self):
        p = self.preflight("bad.test")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        out = p.stdout
        self.assertIn("verdict: NOT READY: 3 blocking problems", out)
        blocking = [l for l in out.splitlines() if l.startswith("blocking")]
        self.assertEqual(len(blocking), 3, out)
        self.assertTrue(any("SPF: bad.test publishes no SPF record" in l for l in blocking))
        self.assertTrue(any("does not match the campaign's private key" in l for l in blocking))
        self.assertTrue(any("DMARC: no record at _dmarc.bad.test" in l for l in blocking))
        # blocking problems come first
        first_other = next(i for i, l in enumerate(out.splitlines()) if l.startswith(("warning", "info")))
        last_blocking = max(i for i, l in enumerate(out.splitlines()) if l.startswith("blocking"))
        self.assertLess(last_blocking, first_other)


if __name__ == "__main__":
    unittest.main()
