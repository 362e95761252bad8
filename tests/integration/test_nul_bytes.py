"""Text with an embedded NUL byte is refused where it crosses into C (issue 10, item 11).

C takes addresses, host names, options and paths as NUL-terminated strings: "b@example.com\\0evil"
used to be sent as RCPT TO:<b@example.com>, a message to an address nobody gave.  Now an envelope
address with a NUL is this message's permanent failure (a refusal before any network, like any
bad envelope), a relay or resolver option with one is an error, and a DNS name with one is
nil, "error", message; the servers see nothing."""
import unittest

from tests.integration.harness import MailshotTestCase


class NulByteTests(MailshotTestCase):
    def exec_script(self, body, env=None):
        path = self.path("script.lua")
        with open(path, "w") as f:
            f.write('local mailshot = require "mailshot"\n' + body)
        return self.run_mailshot("exec", path, env=env)

    def test_an_address_with_a_nul_byte_is_refused_and_nothing_is_sent(self):
        srv = self.start_smtpd()
        p = self.exec_script(r"""
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none", timeout = 10 }
local data = "Subject: x\r\n\r\nhi\r\n"
for _, msg in ipairs {
  { from = "a@example.com", to = "b@example.com\0evil", data = data },
  { from = "a@example.com", to = { "c@example.com", "d@example.com\0" }, data = data },
  { from = "a@example.com\0evil", to = "e@example.com", data = data },
} do
  local res = relay:send(msg)
  print("result:", tostring(res.ok), res.stage, tostring(res.temporary), res.message)
end
relay:close()
""", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("result:")]
        self.assertEqual(len(lines), 3, p.stdout)
        for ln, stage, who in zip(lines, ("rcpt", "rcpt", "mail"), ("recipient", "recipient", "sender")):
            self.assertRegex(ln, rf"^result:\s+false\s+{stage}\s+false\s+invalid {who} address: "
                                 r"it contains a NUL byte$")
        self.assertEqual(srv.connections(), 0, srv.log_lines())
        self.assertEqual(srv.message_count(), 0)

    def test_relay_options_with_a_nul_byte_are_an_error(self):
        srv = self.start_smtpd()
        p = self.exec_script(r"""
local server = os.getenv "SMTP_SERVER"
for _, opts in ipairs {
  { server = server .. "\0evil", tls = "none" },
  { server = server, tls = "none", helo = "client.example.com\0evil" },
  { server = server, tls = "none", user = "u", password = "secret\0more" },
  { server = server, tls = "none\0" },
} do
  local ok, err = pcall(mailshot.relay, opts)
  print("relay:", tostring(ok), err)
end
local ok, err = pcall(mailshot.relay, { server = server, tls = "none", helo = ("h"):rep(300) })
print("long helo:", tostring(ok), err)
""", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("relay:")]
        self.assertEqual(len(lines), 4, p.stdout)
        for ln, opt in zip(lines, ("server", "helo", "password", "tls")):
            self.assertRegex(ln, rf"^relay:\s+false\s+.*option '{opt}' must not contain a NUL byte")
        self.assertNotIn("secret", p.stdout)
        self.assertRegex(p.stdout, r"long helo:\s+false\s+.*option 'helo' is too long \(at most 255 bytes\)")
        self.assertEqual(srv.connections(), 0)

    def test_a_dns_name_with_a_nul_byte_is_refused_without_a_query(self):
        dns = self.start_dns(zone={"mx": [("a.test", "mx1.a.test", 10)]})
        p = self.exec_script(r"""
local resolver = require "mailshot.resolver"
local r = assert(resolver.new { servers = os.getenv "DNS_SERVER", timeout = 2, tries = 1 })
print("query:", r:query("a.test\0.evil.test", "MX"))
print("servers:", pcall(resolver.new, { servers = os.getenv "DNS_SERVER" .. "\0" }))
r:close()
""", env={"DNS_SERVER": dns.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"query:\s+nil\s+error\s+invalid name: it contains a NUL byte")
        self.assertRegex(p.stdout, r"servers:\s+false\s+.*option 'servers' must not contain a NUL byte")
        self.assertEqual(dns.queries(), [])


if __name__ == "__main__":
    unittest.main()
