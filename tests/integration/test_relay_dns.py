"""A relay given by host name is resolved on the event loop (c-ares), not with a blocking
getaddrinfo: through the relay's own `dns` server when given, /etc/hosts first; a lookup that
never gets an answer holds up nobody else and ends with a clear DNS error."""
import json
import unittest

from tests.integration.harness import MailshotTestCase, valgrind_redundant

SEND = r'''
local mailshot = require "mailshot"
local events = {}
local function relay(server)
  return mailshot.relay { server = server, tls = "none", timeout = 5, dns = os.getenv "DNS", dns_timeout = 0.5 }
end
local function send(r, to)
  return r:send { from = "a@acme.example", to = to, data = "Subject: t\r\n\r\nhello\r\n" }
end
local slow
if os.getenv "SLOW" then
  -- a relay whose name the DNS server never answers for: its task waits in the background
  slow = mailshot.spawn(function()
    local r = send(relay(os.getenv "SLOW"), "slow@acme.example")
    events[#events + 1] = { what = "slow", ok = r.ok, stage = r.stage, message = r.message }
  end)
end
local fast = relay(os.getenv "FAST")
for i = 1, tonumber(os.getenv "N" or "1") do
  local r = send(fast, ("fast%d@acme.example"):format(i))
  events[#events + 1] = { what = "fast", ok = r.ok, stage = r.stage, message = r.message }
end
if slow then slow:join() end
local out = {}
for i, e in ipairs(events) do
  out[i] = ('{"what":"%s","ok":%s,"stage":"%s","message":"%s"}'):format(e.what, tostring(e.ok), e.stage or "",
    (e.message or ""):gsub('[%c"\\]', ""))
end
print("[" .. table.concat(out, ",") .. "]")
'''


class RelayDnsTests(MailshotTestCase):
    def setUp(self):
        super().setUp()
        self.smtpd = self.start_smtpd()                       # 127.0.0.1
        self.port = self.smtpd.address.rsplit(":", 1)[1]
        self.dns = self.start_dns({"a": [("relay.test", "127.0.0.1")]})

    def send(self, **env):
        script = self.path("send.lua")
        with open(script, "w") as f:
            f.write(SEND)
        p = self.run_mailshot("exec", script, env=env, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def test_a_relay_given_by_name_is_resolved_through_its_dns_server(self):
        events = self.send(DNS=self.dns.address, FAST=f"relay.test:{self.port}", N="2")
        self.assertEqual([(e["what"], e["ok"]) for e in events], [("fast", True), ("fast", True)], events)
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in self.smtpd.messages()),
                         ["fast1@acme.example", "fast2@acme.example"])
        self.assertIn(("A", "relay.test"), self.dns.queries())
        # /etc/hosts still comes first: localhost needs no DNS server at all
        events = self.send(DNS=self.dns.address, FAST=f"localhost:{self.port}")
        self.assertTrue(events[0]["ok"], events)
        self.assertNotIn("localhost", [name for _, name in self.dns.queries()])

    @valgrind_redundant("test_examples.test_fallback_example_routes_each_recipient_by_its_rules, "
                        "test_check_resolves_the_relay_with_its_dns_option")
    def test_a_lookup_that_hangs_holds_up_no_other_session_and_fails_clearly(self):
        silent = self.start_silent_dns()
        # the slow relay's name goes to a DNS server that never answers; the other relay is an
        # IP address and sends its 5 messages while that lookup waits
        events = self.send(DNS=silent.address, SLOW=f"stuck.test:{self.port}", FAST=self.smtpd.address, N="5")
        self.assertEqual([e["what"] for e in events], ["fast"] * 5 + ["slow"], events)
        self.assertTrue(all(e["ok"] for e in events[:5]), events)
        slow = events[5]
        self.assertEqual((slow["ok"], slow["stage"]), (False, "connect"), slow)
        self.assertEqual(slow["message"], "cannot resolve stuck.test: no answer from the DNS server (timeout)")
        self.assertGreaterEqual(silent.queries_received(), 1)
        self.assertEqual(len(self.smtpd.messages()), 5)

    def test_check_resolves_the_relay_with_its_dns_option(self):
        p = self.run_mailshot("check", f"relay.test:{self.port}", "--tls", "none", "--dns", self.dns.address,
                              "--timeout", "5")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("result        OK", p.stdout)
        self.assertRegex(p.stdout, r"server\s+relay\.test:\d+ \(127\.0\.0\.1\)")
        p = self.run_mailshot("check", f"nope.test:{self.port}", "--tls", "none", "--dns", self.dns.address,
                              "--timeout", "5")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("FAILED at connect: cannot resolve nope.test: no such host (NXDOMAIN)", p.stdout)
        p = self.run_mailshot("check", f"relay.test:{self.port}", "--dns", "not-an-ip")
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn("bad DNS server list", p.stderr)


if __name__ == "__main__":
    unittest.main()
