"""Campaign `return_path` (mailshot.verp): each message's MAIL FROM, as a real aiosmtpd receives it
through a relay, direct delivery and a fallback, is b+TOKEN@domain; the token decodes to the row's
CSV line and verifies with its address, by an independent computation here (Python's hmac and
base64) and by mailshot itself loading the campaign script as `mailshot bounces` does."""
import base64
import hashlib
import hmac
import json
import os
import unittest

from tests.integration.harness import (MailshotTestCase, free_port, read_report, skip_under_valgrind,
                                       write_csv)

SECRET = "verp-test-secret-0123456789"
DOMAIN = "bounces.acme.test"

SCRIPT = r'''
local mailshot = require "mailshot"
local relay = os.getenv "RELAY" and mailshot.relay { server = os.getenv "RELAY", tls = "none", timeout = 5 }
local send = relay
if os.getenv "DNS" then
  local direct = mailshot.direct_sender { dns = os.getenv "DNS", port = tonumber(os.getenv "PORT"), timeout = 5,
                                          helo = "mailshot.test", allow_private = true }
  send = relay and mailshot.fallback { relay, direct } or direct
end
return mailshot.campaign {
  recipients = "list.csv",
  from       = "Acme News <news@acme.example>",
  subject    = "Hello {{name}}",
  text       = "Hello {{name}}",
  return_path = { domain = "bounces.acme.test", secret = os.getenv "BOUNCE_SECRET" },   -- campaign: the script's name
  send       = send,
}
'''

# Decode MAIL FROM addresses with the campaign's own verp object, the way `mailshot bounces`
# does: load the script (mailshot.for_folder, as `mailshot run` loads it), decode, find the
# address on the token's CSV line (rows.emails_at), verify.  Prints one JSON object per input.
DECODE = r'''
local mailshot = require "mailshot"
local rows = require "mailshot.rows"
local script = arg[1]
local view = mailshot.for_folder(script:match("^(.*)/[^/]*$") or ".", script)
local env = setmetatable({ require = function(n) return n == "mailshot" and view or require(n) end }, { __index = _G })
local c = assert(loadfile(script, "t", env))()
local decoded = {}
for i = 2, #arg do
  local d, why = c.verp:decode(arg[i])
  decoded[i] = d or why
end
local lines = {}
for _, d in pairs(decoded) do if type(d) == "table" then lines[#lines + 1] = d.line end end
local emails = assert(rows.emails_at(c, lines))
for i = 2, #arg do
  local d = decoded[i]
  if type(d) == "table" then
    local email = emails[d.line]
    local ok, why = c.verp:verify(d, email)
    local wrong = c.verp:verify(d, "someone.else@example.net")
    print(('{"in": "%s", "line": %d, "email": "%s", "ok": %s, "why": "%s", "wrong": %s, "campaign": "%s"}'):format(
      arg[i], d.line, email or "", tostring(ok == true), tostring(why), tostring(wrong == true), d.campaign))
  else
    print(('{"in": "%s", "why": "%s"}'):format(arg[i], d))
  end
end
'''


def py_token(secret, campaign, line, email):
    """The token, computed from its description in README.md (mailshot.verp), not from the Lua code."""
    def h(m):
        return hmac.new(secret.encode(), m.encode(), hashlib.sha256).digest()
    local, _, dom = email.rpartition("@")
    email = local.lower() + "@" + dom.encode("idna").decode().lower()
    tag = base64.b32encode(h("mailshot verp campaign\n" + campaign)[:3]).decode().lower()[:4]
    mask = int.from_bytes(h("mailshot verp line\n" + campaign)[:5], "big")
    masked = base64.b32encode((line ^ mask).to_bytes(5, "big")).decode().lower()
    mac = base64.b32encode(h(f"mailshot verp\n{campaign}\n{line}\n{email}")[:10]).decode().lower()
    return tag + masked + mac


def py_address(line, email, campaign="spring"):
    return f"b+{py_token(SECRET, campaign, line, email)}@{DOMAIN}"


# A list whose rows do not start on consecutive lines: a blank line, a quoted field over two
# lines, a row `run` skips; mixed case and an IDN domain.
LIST = ("email,name\r\n"
        "ann@example.net,Ann\r\n"                 # 2
        "\r\n"                                    # 3
        "Bob.Smith@Example.NET,\"Bob\r\nSmith\"\r\n"   # 4-5
        "not-an-address,Nobody\r\n"               # 6: skipped
        "carol@bücher.example,Carol\r\n"          # 7
        "dave@a.test,Dave\r\n")                   # 8


class VerpTests(MailshotTestCase):
    def campaign(self, script=SCRIPT, name="spring.lua"):
        d = self.path("c")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "list.csv"), "w", encoding="utf-8", newline="") as f:
            f.write(LIST)
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(script)
        return path

    def decode(self, script, addresses):
        dec = self.path("decode.lua")
        with open(dec, "w") as f:
            f.write(DECODE)
        p = self.run_mailshot("exec", dec, script, *addresses, env={"BOUNCE_SECRET": SECRET, "RELAY": "127.0.0.1:9"})
        self.assertEqual(p.returncode, 0, p.stderr)
        return [json.loads(l) for l in p.stdout.splitlines()]

    def check_received(self, msgs, report, script):
        sent = {r["line"]: r["email"] for r in report if r["status"] == "sent"}
        self.assertEqual(sorted(sent), ["2", "4", "7", "8"], report)
        self.assertEqual(len(msgs), 4)
        by_rcpt = {m["rcpt_tos"][0].lower(): m for m in msgs}
        want = {}
        for line, email in sent.items():
            local, _, dom = email.rpartition("@")
            rcpt = (local + "@" + dom.encode("idna").decode()).lower()
            m = by_rcpt[rcpt]
            # the envelope sender is this row's signed return path; the From header is unchanged
            self.assertEqual(m["mail_from"], py_address(int(line), email), (line, email))
            self.assertEqual(str(m["msg"]["From"]), "Acme News <news@acme.example>")
            self.assertNotIn(b"Return-Path", m["raw"])
            local_part = m["mail_from"].split("@")[0]
            self.assertLessEqual(len(local_part), 64)
            self.assertRegex(local_part, r"^b\+[a-z2-7]{28}$")
            want[m["mail_from"]] = (int(line), email)
        # mailshot decodes each received MAIL FROM back to its line and address, any case
        got = self.decode(script, [a.upper() for a in want] + [
            "b+" + "a" * 28 + "@" + DOMAIN,                   # not this campaign's tag
            py_address(2, "ann@example.net", campaign="autumn"),
            "b+x@" + DOMAIN, "b+" + "a" * 28 + "@elsewhere.test"])
        for g in got[:len(want)]:
            line, email = want[g["in"].lower()]
            self.assertEqual((g["line"], g["email"], g["ok"], g["wrong"], g["campaign"]),
                             (line, email, True, False, "spring"), g)
        self.assertEqual([g["why"] for g in got[len(want):]],
                         ["another campaign", "another campaign", "malformed token", "not ours"])

    def test_relay_mail_from_is_each_rows_signed_return_path(self):
        script = self.campaign()
        srv = self.start_smtpd()
        p = self.run_mailshot("run", script, "--send", "--report", self.path("report.csv"),
                              env={"RELAY": srv.address, "BOUNCE_SECRET": SECRET})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        report = read_report(self.path("report.csv"))
        self.assertEqual(len(report), 5)             # every row: 4 sent, the bad address skipped
        self.assertEqual([r["status"] for r in report if r["line"] == "6"], ["skipped"])
        self.check_received(srv.wait_for_messages(4), report, script)
        with open(self.path("report.csv"), encoding="utf-8") as f:
            self.assertNotIn(SECRET, p.stdout + p.stderr + f.read())

    @skip_under_valgrind("the relay case above covers the same code")
    def test_fallback_and_direct_delivery_use_the_return_path_too(self):
        # the relay is down (nothing listens): the fallback delivers directly to each domain's MX
        servers, port = self.start_smtpd_many(["127.0.0.2"])
        dns = self.start_dns({
            "mx": [("example.net", "mx.example.net", 10), ("xn--bcher-kva.example", "mx.example.net", 10),
                   ("a.test", "mx.example.net", 10)],
            "a": [("mx.example.net", "127.0.0.2")],
        })
        script = self.campaign()
        p = self.run_mailshot("run", script, "--send", "--report", self.path("report.csv"),
                              env={"RELAY": f"127.0.0.1:{free_port()}", "DNS": dns.address, "PORT": str(port),
                                   "BOUNCE_SECRET": SECRET})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        report = read_report(self.path("report.csv"))
        self.assertEqual({r["via"] for r in report if r["status"] == "sent"}, {"direct"}, report)
        self.check_received(servers[0].wait_for_messages(4), report, script)

    @skip_under_valgrind("no network; the option's checks are in tests/lua/test_verp.lua")
    def test_dry_run_outbox_and_preview_show_the_return_path(self):
        script = self.campaign()
        p = self.run_mailshot("run", script, "--outbox", self.path("out"), "--report", self.path("r.csv"),
                              env={"BOUNCE_SECRET": SECRET})
        self.assertEqual(p.returncode, 0, p.stderr)
        files = sorted(os.listdir(self.path("out")))
        self.assertEqual(len(files), 4, files)
        for name in files:
            line = int(name.split("-")[0])
            with open(self.path("out", name), "rb") as f:
                first, rest = f.read().split(b"\r\n", 1)
            email = name.split("-", 1)[1][:-4]
            self.assertEqual(first.decode(), f"Return-Path: <{py_address(line, email)}>", name)
            self.assertTrue(rest.startswith(b"Date: "), rest[:40])
        p = self.run_mailshot("preview", script, "--row", "4", env={"BOUNCE_SECRET": SECRET})
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.splitlines()[0], f"Return-Path: <{py_address(4, 'bob.smith@example.net')}>")

    @skip_under_valgrind("no network; the option's checks are in tests/lua/test_verp.lua")
    def test_a_missing_or_bad_return_path_stops_the_script_before_anything_is_sent(self):
        srv = self.start_smtpd()
        script = self.campaign()
        p = self.run_mailshot("run", script, "--send", env={"RELAY": srv.address, "BOUNCE_SECRET": None})
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertIn("return_path: no secret (is BOUNCE_SECRET in the environment?)", p.stderr)
        self.assertIn("never on the command line", p.stderr)
        p = self.run_mailshot("run", script, "--send", env={"RELAY": srv.address, "BOUNCE_SECRET": "short"})
        self.assertEqual(p.returncode, 2)
        self.assertIn("return_path: secret is 5 octets; use at least 16", p.stderr)
        bad = self.campaign(SCRIPT.replace('domain = "bounces.acme.test"', 'domian = "bounces.acme.test"'), "bad.lua")
        p = self.run_mailshot("run", bad, "--send", env={"RELAY": srv.address, "BOUNCE_SECRET": SECRET})
        self.assertEqual(p.returncode, 2)
        self.assertIn("return_path: unknown option 'domian'", p.stderr)
        self.assertEqual(srv.message_count(), 0)
        self.assertFalse(os.path.exists(self.path("c", "spring-report.csv")))


if __name__ == "__main__":
    unittest.main()
