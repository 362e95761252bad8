"""Direct delivery: MX lookups through a real DNS server (dnsmasq) on loopback, delivery to real SMTP
servers on 127.0.0.x, fallback rules both ways, and `mailshot mx`."""
import collections
import json
import os
import unittest

from tests.integration.harness import MailshotTestCase, free_port, read_report, write_csv, valgrind_redundant

SEND = r'''
local mailshot = require "mailshot"
local direct = mailshot.direct_sender {
  dns = os.getenv "DNS", port = tonumber(os.getenv "PORT"), timeout = 3, dns_timeout = 0.5,
  helo = "mailshot.test", tls = os.getenv "TLS",
  -- every test MX is on 127.0.0.x; ALLOW_PRIVATE=0 leaves the option out: the default
  allow_private = os.getenv "ALLOW_PRIVATE" ~= "0" or nil,
}
local relay = os.getenv "RELAY" and mailshot.relay { server = os.getenv "RELAY", tls = "none", timeout = 3 }
local send = direct
if os.getenv "ORDER" == "direct,relay" then send = mailshot.fallback { direct, relay } end
if os.getenv "ORDER" == "relay,direct" then send = mailshot.fallback { relay, direct } end
local out = {}
for to in os.getenv("TO"):gmatch("[^,]+") do
  local msg = { from = "sender@acme.example", to = to, data = "Subject: direct\r\n\r\nhello " .. to .. "\r\n" }
  local r = type(send) == "function" and send(msg) or send:send(msg)
  local attempts = {}
  for i, a in ipairs(r.attempts or {}) do attempts[i] = { a.host or "", a.address or "", a.code or 0, a.stage or "" } end
  local tries = {}
  for i, t in ipairs(r.fallback or {}) do tries[i] = t.via end
  out[#out + 1] = { to = to, ok = r.ok, code = r.code, stage = r.stage or "", temporary = r.temporary,
                    via = r.via, mx = r.mx or "", address = r.address or "", dns = r.dns or "",
                    message = r.message, attempts = attempts, tries = tries }
end
-- a tiny JSON writer: enough for the fields above
local function enc(v)
  local t = type(v)
  if t == "table" then
    if #v > 0 or next(v) == nil then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = enc(x) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local parts = {}
    for k, x in pairs(v) do parts[#parts + 1] = enc(tostring(k)) .. ":" .. enc(x) end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif t == "string" then
    return '"' .. v:gsub('[%c"\\]', function(c) return ("\\u%04x"):format(c:byte()) end) .. '"'
  end
  return tostring(v)
end
print(enc(out))
'''


class DirectTests(MailshotTestCase):
    def setUp(self):
        super().setUp()
        # 127.0.0.2/.3 accept mail, .5 answers 421 at the greeting, .6 refuses bad@ with 550,
        # .7 offers STARTTLS; nothing listens on .9 (a dead MX)
        self.servers, self.port = self.start_smtpd_many(["127.0.0.2", "127.0.0.3"])
        self.greet421 = self.start_smtpd(host="127.0.0.5", port=self.port, greeting_code=421,
                                         greeting_text="4.3.2 busy")
        self.picky = self.start_smtpd(host="127.0.0.6", port=self.port, reject_rcpt=[("bad@", 550, "5.1.1 no such user")])
        self.tls = self.start_smtpd(host="127.0.0.7", port=self.port, tls=True)
        self.dns = self.start_dns({
            "mx": [("a.test", "mx1.a.test", 10), ("a.test", "mx2.a.test", 20),
                   ("dead.test", "mx1.dead.test", 10), ("dead.test", "mx2.dead.test", 20),
                   ("busy.test", "mx1.busy.test", 5), ("busy.test", "mx2.busy.test", 50),
                   ("picky.test", "mx.picky.test", 10), ("tls.test", "mx.tls.test", 10),
                   ("alldead.test", "mx.alldead.test", 10), ("xn--bcher-kva.test", "mx1.a.test", 10),
                   ("lit.test", "127.0.0.2", 10), ("lit.test", "[127.0.0.3]", 20)],
            "a": [("mx1.a.test", "127.0.0.3"), ("mx2.a.test", "127.0.0.2"),
                  ("mx1.dead.test", "127.0.0.9"), ("mx2.dead.test", "127.0.0.3"),
                  ("mx1.busy.test", "127.0.0.5"), ("mx2.busy.test", "127.0.0.2"),
                  ("mx.picky.test", "127.0.0.6"), ("mx.tls.test", "127.0.0.7"),
                  ("mx.alldead.test", "127.0.0.9"), ("implicit.test", "127.0.0.2"),
                  ("127.0.0.2", "127.0.0.2")],
            "null_mx": ["null.test"],
        })

    def send(self, to, **env):
        script = self.path("send.lua")
        with open(script, "w") as f:
            f.write(SEND)
        e = {"DNS": self.dns.address, "PORT": str(self.port), "TO": ",".join(to)}
        e.update(env)
        p = self.run_mailshot("exec", script, env=e, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        return {r["to"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])}

    def landed(self, srv):
        return [m["rcpt_tos"][0] for m in srv.messages()]

    def test_preference_order_is_followed(self):
        r = self.send(["x@a.test"])["x@a.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual((r["via"], r["mx"], r["address"]), ("direct", "mx1.a.test", "127.0.0.3"))
        self.assertEqual(self.landed(self.servers[1]), ["x@a.test"])
        self.assertEqual(self.landed(self.servers[0]), [])

    def test_a_dead_first_mx_and_delivery_by_the_second(self):
        r = self.send(["y@dead.test"])["y@dead.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["mx"], "mx2.dead.test")
        self.assertEqual([a[:2] + [a[3]] for a in r["attempts"]],
                         [["mx1.dead.test", "127.0.0.9", "connect"], ["mx2.dead.test", "127.0.0.3", ""]])
        self.assertEqual(self.landed(self.servers[1]), ["y@dead.test"])

    def test_implicit_mx_uses_the_domains_own_address(self):
        r = self.send(["z@implicit.test"])["z@implicit.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual((r["mx"], r["address"]), ("implicit.test", "127.0.0.2"))

    def test_null_mx_and_nxdomain_fail_permanently_without_connecting(self):
        res = self.send(["a@null.test", "b@nope.test"])
        for to, kind in (("a@null.test", "nullmx"), ("b@nope.test", "nxdomain")):
            r = res[to]
            self.assertEqual((r["ok"], r["temporary"], r["stage"], r["dns"]), (False, False, "dns", kind), r)
            self.assertEqual(r["attempts"], [])
        self.assertIn("null MX", res["a@null.test"]["message"])
        self.assertIn("NXDOMAIN", res["b@nope.test"]["message"])
        self.assertEqual(sum(s.connections() for s in self.servers), 0)

    def test_a_421_greeting_moves_on_to_the_next_mx(self):
        r = self.send(["q@busy.test"])["q@busy.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["attempts"][0][2:], [421, "greeting"])
        self.assertEqual(r["mx"], "mx2.busy.test")

    def test_a_5xx_on_rcpt_is_final_and_does_not_fall_back(self):
        relay = self.start_smtpd()
        res = self.send(["bad@picky.test", "good@picky.test"], RELAY=relay.address, ORDER="direct,relay")
        bad = res["bad@picky.test"]
        self.assertEqual((bad["ok"], bad["code"], bad["stage"], bad["temporary"]), (False, 550, "rcpt", False), bad)
        self.assertEqual(bad["tries"], ["direct"])
        self.assertTrue(res["good@picky.test"]["ok"])
        self.assertEqual(relay.message_count(), 0)

    @valgrind_redundant("test_row_rules.test_preview_preflight_dry_run_and_send_agree_on_every_row, "
                        "test_ipv6_addresses_come_first_and_a_dns_server_list_is_tried_in_turn")
    def test_dns_timeout_is_temporary_and_falls_back_to_the_relay(self):
        silent = self.start_silent_dns()
        relay = self.start_smtpd()
        res = self.send(["t@a.test"], DNS=silent.address)
        r = res["t@a.test"]
        self.assertEqual((r["ok"], r["temporary"], r["stage"], r["dns"]), (False, True, "dns", "timeout"), r)
        res = self.send(["t@a.test"], DNS=silent.address, RELAY=relay.address, ORDER="direct,relay")
        r = res["t@a.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual((r["via"], r["tries"]), ("relay", ["direct", "relay"]))
        self.assertEqual(self.landed(relay), ["t@a.test"])

    def test_dns_failures_keep_their_name_in_the_result(self):
        # SERVFAIL (from a server that answers it), REFUSED (dnsmasq, for a name outside its
        # zones) and nothing listening: each its own `dns` word and message, temporary, and
        # not "timeout"
        sf = self.start_silent_dns(rcode="SERVFAIL")
        cases = [(sf.address, "s@a.test", "servfail", "the DNS server failed (SERVFAIL) on a.test MX"),
                 (self.dns.address, "r@x.other", "refused", "the DNS server refused the query for x.other MX (REFUSED)"),
                 (f"127.0.0.1:{free_port()}", "c@a.test", "connrefused",
                  "cannot ask for a.test MX: connection to the DNS server refused (nothing listening?)")]
        for dns, to, word, message in cases:
            r = self.send([to], DNS=dns)[to]
            self.assertEqual((r["ok"], r["temporary"], r["stage"], r["dns"]), (False, True, "dns", word), r)
            self.assertEqual(r["message"], message)
        self.assertEqual(sum(s.connections() for s in self.servers), 0)

    def test_relay_then_direct_when_the_relay_is_down(self):
        res = self.send(["u@a.test"], RELAY=f"127.0.0.1:{free_port()}", ORDER="relay,direct")
        r = res["u@a.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual((r["via"], r["tries"]), ("direct", ["relay", "direct"]))

    @valgrind_redundant("test_relay_then_direct_when_the_relay_is_down, "
                        "test_relay_down.test_the_summary_has_a_line_per_relay_with_its_own_reason")
    def test_direct_then_relay_when_every_mx_is_dead(self):
        relay = self.start_smtpd()
        res = self.send(["v@alldead.test"], RELAY=relay.address, ORDER="direct,relay")
        r = res["v@alldead.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["tries"], ["direct", "relay"])
        self.assertEqual(self.landed(relay), ["v@alldead.test"])

    def test_starttls_is_used_when_offered_and_not_required_otherwise(self):
        res = self.send(["w@tls.test", "w@a.test"])
        self.assertTrue(res["w@tls.test"]["ok"] and res["w@a.test"]["ok"], res)
        self.assertTrue(self.tls.messages()[0]["tls"])
        self.assertFalse(self.servers[1].messages()[0]["tls"])
        res = self.send(["w2@a.test"], TLS="require")
        r = res["w2@a.test"]
        self.assertFalse(r["ok"])
        self.assertIn("STARTTLS", r["message"])
        res = self.send(["w3@tls.test"], TLS="verify")    # a self-signed certificate does not verify
        self.assertFalse(res["w3@tls.test"]["ok"])
        self.assertIn("certificate verification failed", res["w3@tls.test"]["message"])

    def test_ipv6_addresses_come_first_and_a_dns_server_list_is_tried_in_turn(self):
        v6 = self.start_smtpd(host="::1", port=self.port)
        dns = self.start_dns({"mx": [("six.test", "mx.six.test", 10)],
                              "a": [("mx.six.test", "127.0.0.2")], "aaaa": [("mx.six.test", "::1")]})
        silent = self.start_silent_dns()
        # the first server never answers: c-ares moves on to the second
        r = self.send(["s@six.test"], DNS=f"{silent.address},{dns.address}")["s@six.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["address"], "::1")
        self.assertEqual([m["rcpt_tos"][0] for m in v6.messages()], ["s@six.test"])
        self.assertGreaterEqual(silent.queries_received(), 1)
        v6.stop()                                   # IPv6 gone: the IPv4 address of the same host is next
        r = self.send(["t@six.test"], DNS=dns.address)["t@six.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual([a[1] for a in r["attempts"]], ["::1", "127.0.0.2"])

    def test_private_addresses_are_refused_unless_allowed(self):
        res = self.send(["p@a.test", "q@implicit.test"], ALLOW_PRIVATE="0")
        r = res["p@a.test"]
        self.assertEqual((r["ok"], r["temporary"], r["stage"], r["dns"], r["code"]), (False, False, "dns", "private", 0), r)
        self.assertIn("direct delivery refuses every mail server of a.test", r["message"])
        self.assertIn("mx1.a.test 127.0.0.3 (loopback)", r["message"])
        self.assertIn("mx2.a.test 127.0.0.2 (loopback)", r["message"])
        self.assertIn("allow_private = true", r["message"])
        self.assertEqual([a[:2] + [a[3]] for a in r["attempts"]],
                         [["mx1.a.test", "127.0.0.3", "dns"], ["mx2.a.test", "127.0.0.2", "dns"]])
        r = res["q@implicit.test"]                 # no MX: the domain's own (private) address
        self.assertEqual((r["ok"], r["temporary"], r["dns"]), (False, False, "private"), r)
        self.assertIn("implicit.test 127.0.0.2 (loopback)", r["message"])
        self.assertEqual(sum(s.connections() for s in self.servers), 0)
        # allowed: delivered as before
        r = self.send(["p@a.test"], ALLOW_PRIVATE="1")["p@a.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual(self.landed(self.servers[1]), ["p@a.test"])

    def test_a_campaign_reports_private_only_domains_as_failed_at_dns(self):
        camp = self.path("camp")
        os.makedirs(camp)
        write_csv(os.path.join(camp, "list.csv"), ["email"], [["r1@a.test"], ["r2@a.test"]])
        with open(os.path.join(camp, "c.lua"), "w") as f:
            f.write('''local mailshot = require "mailshot"
return mailshot.campaign { recipients = "list.csv", from = "news@acme.example", subject = "Hi", text = "Hello",
  send = mailshot.direct_sender { dns = os.getenv "DNS", port = tonumber(os.getenv "PORT"), timeout = 3 } }
''')
        p = self.run_mailshot("run", os.path.join(camp, "c.lua"), "--send", "--report", "r.csv",
                              env={"DNS": self.dns.address, "PORT": str(self.port)})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        rep = read_report(self.path("r.csv"))
        self.assertEqual([(r["email"], r["status"], r["stage"], r["via"]) for r in rep],
                         [("r1@a.test", "failed", "dns", "direct"), ("r2@a.test", "failed", "dns", "direct")])
        for r in rep:
            self.assertIn("mx1.a.test 127.0.0.3 (loopback)", r["response"])
            self.assertIn("allow_private = true", r["response"])
        self.assertEqual(sum(s.connections() for s in self.servers), 0)

    @valgrind_redundant("test_row_rules.test_preview_preflight_dry_run_and_send_agree_on_every_row, "
                        "test_a_421_greeting_moves_on_to_the_next_mx")
    def test_private_refusal_falls_back_to_the_relay(self):
        # a relay has its own policy and may well deliver to an internal domain
        relay = self.start_smtpd()
        r = self.send(["f@a.test"], ALLOW_PRIVATE="0", RELAY=relay.address, ORDER="direct,relay")["f@a.test"]
        self.assertTrue(r["ok"], r)
        self.assertEqual((r["via"], r["tries"]), ("relay", ["direct", "relay"]))

    def test_localhost_and_address_literals_are_refused(self):
        local = self.start_smtpd(host="127.0.0.1", port=self.port)
        res = self.send(["x@localhost", "y@mail.localhost", "z@[127.0.0.1]", "w@[IPv6:::1]"], ALLOW_PRIVATE="0")
        for to in ("x@localhost", "y@mail.localhost"):
            r = res[to]
            self.assertEqual((r["ok"], r["temporary"], r["stage"], r["dns"]), (False, False, "dns", "localhost"), r)
            self.assertIn("not an internet mail domain", r["message"])
            self.assertIn("allow_private = true", r["message"])
        for to in ("z@[127.0.0.1]", "w@[IPv6:::1]"):
            r = res[to]
            self.assertEqual((r["ok"], r["temporary"], r["stage"], r["dns"]), (False, False, "dns", "literal"), r)
            self.assertIn("address literal", r["message"])
        self.assertEqual(local.connections(), 0)
        self.assertEqual([q for q in self.dns.queries() if "localhost" in q[1]], [])   # never asked DNS
        # allowed: localhost is this machine (::1, then 127.0.0.1), without DNS; literals stay refused
        res = self.send(["x@localhost", "z@[127.0.0.1]"], ALLOW_PRIVATE="1")
        self.assertTrue(res["x@localhost"]["ok"], res["x@localhost"])
        self.assertEqual((res["x@localhost"]["mx"], res["x@localhost"]["address"]), ("localhost", "127.0.0.1"))
        self.assertEqual([m["rcpt_tos"][0] for m in local.messages()], ["x@localhost"])
        self.assertEqual(res["z@[127.0.0.1]"]["dns"], "literal")
        self.assertEqual([q for q in self.dns.queries() if "localhost" in q[1]], [])

    @valgrind_redundant("test_a_campaign_reports_private_only_domains_as_failed_at_dns, "
                        "test_dns_answers.test_the_most_preferred_of_many_mx_records_is_kept")
    def test_an_mx_naming_an_ip_address_is_not_used(self):
        # lit.test's MX records are "127.0.0.2" and "[127.0.0.3]": not host names (RFC 5321
        # 5.1), even though a record for the name "127.0.0.2" exists; refused even when private
        # addresses are allowed, and for good
        for allow in ("0", "1"):
            r = self.send(["l@lit.test"], ALLOW_PRIVATE=allow)["l@lit.test"]
            self.assertEqual((r["ok"], r["temporary"], r["stage"], r["dns"]), (False, False, "dns", "mx_literal"), r)
            self.assertIn("MX host 127.0.0.2 is an IP address, not a host name", r["message"])
            self.assertIn("MX host [127.0.0.3] is an IP address", r["message"])
        self.assertEqual(sum(s.connections() for s in self.servers), 0)
        self.assertNotIn(("A", "127.0.0.2"), self.dns.queries())
        p = self.run_mailshot("mx", "lit.test", "--dns", self.dns.address, "--timeout", "0.5")
        self.assertEqual(p.returncode, 1, p.stdout)
        self.assertIn("MX host 127.0.0.2 is an IP address", p.stdout)

    @valgrind_redundant("test_row_rules.test_preview_preflight_dry_run_and_send_agree_on_every_row, "
                        "test_dns_answers.test_mx_timeout_is_the_whole_commands_budget")
    def test_mx_command_says_what_it_found(self):
        def mx(domain, dns=None):
            return self.run_mailshot("mx", domain, "--dns", dns or self.dns.address, "--timeout", "0.5")
        p = mx("a.test")
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = p.stdout.splitlines()
        self.assertIn("a.test: 2 MX hosts, tried in this order:", lines[0])
        self.assertRegex(lines[1], r"^\s+10\s+mx1\.a\.test\s+127\.0\.0\.3$")
        self.assertRegex(lines[2], r"^\s+20\s+mx2\.a\.test\s+127\.0\.0\.2$")
        p = mx("null.test")
        self.assertEqual(p.returncode, 1)
        self.assertIn("null.test: null MX: this domain accepts no mail", p.stdout)
        p = mx("implicit.test")
        self.assertEqual(p.returncode, 0)
        self.assertIn("no MX records; mail goes to the domain's own address", p.stdout)
        self.assertIn("127.0.0.2", p.stdout)
        p = mx("nope.test")
        self.assertEqual(p.returncode, 1)
        self.assertIn("the domain does not exist (NXDOMAIN)", p.stdout)
        p = mx("BÜCHER.test")                      # an IDN domain is looked up in its A-label form
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("mx1.a.test", p.stdout)
        self.assertIn(("MX", "xn--bcher-kva.test"), self.dns.queries())
        silent = self.start_silent_dns()
        p = mx("a.test", silent.address)
        self.assertEqual(p.returncode, 1)
        self.assertIn("no answer from the DNS server (timeout)", p.stdout)

    @valgrind_redundant("test_examples.test_fallback_example_routes_each_recipient_by_its_rules, "
                        "test_resume.test_sigint_finishes_messages_in_flight_and_says_how_to_resume")
    def test_campaign_of_1000_over_20_domains(self):
        # 20 domains: 16 good (half of them with a dead first MX), one null MX, one NXDOMAIN,
        # one whose every MX is dead (falls back to the relay), one with a picky MX (550 for bad@)
        zone = {"mx": [], "a": [("mx.dead.any", "127.0.0.9")], "null_mx": ["null.test"]}
        good = [f"d{i}.test" for i in range(16)]
        for i, d in enumerate(good):
            if i % 2:
                zone["mx"] += [(d, "mx.dead.any", 5), (d, f"mx.{d}", 10)]
            else:
                zone["mx"] += [(d, f"mx.{d}", 10)]
            zone["a"].append((f"mx.{d}", ["127.0.0.2", "127.0.0.3"][i % 2]))
        zone["mx"] += [("gone.test", "mx.dead.any", 10), ("picky.test", "mx.picky.test", 10)]
        zone["a"].append(("mx.picky.test", "127.0.0.6"))
        dns = self.start_dns(zone)
        relay = self.start_smtpd()
        domains = good + ["null.test", "nope.test", "gone.test", "picky.test"]
        rows = []
        for i in range(1000):
            d = domains[i % 20]
            local = "bad" if d == "picky.test" and i % 40 == 19 else f"user{i}"
            rows.append([f"{local}@{d}", f"N{i}"])
        camp = self.path("camp")
        os.makedirs(camp)
        write_csv(os.path.join(camp, "list.csv"), ["email", "name"], rows)
        with open(os.path.join(camp, "direct.lua"), "w") as f:
            f.write('''
local mailshot = require "mailshot"
local direct = mailshot.direct_sender { dns = os.getenv "DNS", port = tonumber(os.getenv "PORT"), timeout = 5,
                                        helo = "mailshot.test", allow_private = true }
local relay = mailshot.relay { server = os.getenv "RELAY", tls = "none" }
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi {{name}}", text = "Hello {{name}}",
  send = mailshot.fallback { direct, relay }, concurrency = 32,
}
''')
        p = self.run_mailshot("run", os.path.join(camp, "direct.lua"), "--send", "--report", "r.csv",
                              env={"DNS": dns.address, "PORT": str(self.port), "RELAY": relay.address}, timeout=300)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr[-2000:])   # null MX, NXDOMAIN, 550s failed
        rep = read_report(self.path("r.csv"))
        self.assertEqual(len(rep), 1000)
        by = collections.defaultdict(list)
        for r in rep:
            by[r["email"].split("@")[1]].append(r)
        for d in good:
            self.assertEqual({(r["status"], r["via"]) for r in by[d]}, {("sent", "direct")}, d)
            self.assertEqual({r["mx"] for r in by[d]}, {f"mx.{d}"})
        self.assertEqual({(r["status"], r["stage"]) for r in by["null.test"]}, {("failed", "dns")})
        self.assertEqual({(r["status"], r["stage"]) for r in by["nope.test"]}, {("failed", "dns")})
        self.assertEqual({(r["status"], r["via"]) for r in by["gone.test"]}, {("sent", "relay")})
        picky = {r["email"]: r for r in by["picky.test"]}
        bad_rows = [r for r in by["picky.test"] if r["email"].startswith("bad@")]
        self.assertEqual(sorted(r["status"] for r in bad_rows), ["failed"] + ["skipped"] * (len(bad_rows) - 1))
        self.assertEqual({r["code"] for r in bad_rows if r["status"] == "failed"}, {"550"})   # once; then duplicates
        self.assertEqual({r["status"] for e, r in picky.items() if not e.startswith("bad@")}, {"sent"})
        # the relay got exactly the all-dead domain's messages; every message landed once
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in relay.messages()), sorted(r["email"] for r in by["gone.test"]))
        delivered = [m["rcpt_tos"][0] for s in self.servers + [self.picky] for m in s.messages()]
        self.assertEqual(len(delivered), len(set(delivered)))
        self.assertEqual(len(delivered), 16 * 50 + len([e for e in picky if not e.startswith("bad@")]))
        # each domain's MX was asked once, whatever the concurrency
        mx_queries = collections.Counter(name for qtype, name in dns.queries() if qtype == "MX")
        self.assertEqual(set(mx_queries.values()), {1}, mx_queries)
        self.assertEqual(set(mx_queries), set(domains))


if __name__ == "__main__":
    unittest.main()
