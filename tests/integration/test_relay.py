"""relay:send details against a real server: AUTH LOGIN, SIZE, 8BITMIME, timeouts, several recipients.
Each test is a small Lua file run by `mailshot exec`, which prints the result fields it got."""
import json
import os
import unittest

from tests.integration.harness import MailshotTestCase, make_cert, valgrind_redundant

PW = "relay-pw"

SEND = r'''
local mailshot = require "mailshot"
local relay = mailshot.relay {
  server = os.getenv "SMTP_SERVER", tls = os.getenv "SMTP_TLS" or "starttls", ca_file = os.getenv "SMTP_CA_FILE",
  user = os.getenv "SMTP_USER", password = os.getenv "SMTP_PASSWORD", timeout = tonumber(os.getenv "TIMEOUT" or "10"),
  source = os.getenv "SOURCE",
}
local to = {}
for a in (os.getenv "TO" or "rcpt@example.com"):gmatch("[^,]+") do to[#to + 1] = a end
local data = os.getenv "DATA" or "Subject: test\r\n\r\nhello\r\n"
local eightbit = ({ ["true"] = true, ["false"] = false })[os.getenv "EIGHTBIT" or ""]
local r = relay:send { from = "sender@example.org", to = #to == 1 and to[1] or to, data = data, eightbit = eightbit }
local function esc(s) return '"' .. tostring(s):gsub('[%c"\\]', function(c) return ("\\u%04x"):format(c:byte()) end) .. '"' end
local parts = {}
for _, k in ipairs { "ok", "code", "enhanced", "message", "temporary", "stage", "accepted" } do
  local v = r[k]
  if v ~= nil then parts[#parts + 1] = esc(k) .. ":" .. (type(v) == "string" and esc(v) or tostring(v)) end
end
if r.recipients then
  local rs = {}
  for _, x in ipairs(r.recipients) do rs[#rs + 1] = ('{"address":%s,"ok":%s,"code":%d}'):format(esc(x.address), tostring(x.ok), x.code) end
  parts[#parts + 1] = '"recipients":[' .. table.concat(rs, ",") .. "]"
end
print("{" .. table.concat(parts, ",") .. "}")
'''


class RelayTests(MailshotTestCase):
    def send(self, srv, **env):
        script = self.path("send.lua")
        with open(script, "w") as f:
            f.write(SEND)
        cert, _ = make_cert(self.tmp)
        e = {"SMTP_SERVER": srv.address, "SMTP_CA_FILE": cert}
        e.update(env)
        p = self.run_mailshot("exec", script, env=e)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def test_auth_login_when_plain_is_not_offered(self):
        srv = self.start_smtpd(tls=True, auth={"u": PW}, auth_exclude=["PLAIN"])
        r = self.send(srv, SMTP_USER="u", SMTP_PASSWORD=PW)
        self.assertTrue(r["ok"], r)
        (m,) = srv.messages()
        self.assertEqual(m["auth_user"], "u")
        self.assertIn("AUTH LOGIN", "\n".join(srv.log_lines()))

    @valgrind_redundant("test_8bit_message_declares_8bitmime_and_fails_clearly_without_it, "
                        "test_several_recipients_one_refused")
    def test_message_over_the_servers_size_limit_fails_before_data(self):
        srv = self.start_smtpd(size=1000, tls=True)
        r = self.send(srv, DATA="Subject: big\r\n\r\n" + ("x" * 70 + "\r\n") * 30)
        self.assertEqual((r["ok"], r["stage"], r["code"], r["temporary"]), (False, "mail", 552, False), r)
        self.assertIn("exceeds the server's limit of 1000", r["message"])
        self.assertNotIn("MAIL", srv.commands())
        small = self.send(srv)
        self.assertTrue(small["ok"], small)
        self.assertTrue(any("SIZE=" in o for o in srv.messages()[0]["mail_options"]))

    def test_8bit_message_declares_8bitmime_and_fails_clearly_without_it(self):
        data = "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n"
        srv = self.start_smtpd(tls=True)
        r = self.send(srv, DATA=data)
        self.assertTrue(r["ok"], r)
        self.assertIn("BODY=8BITMIME", srv.messages()[0]["mail_options"])
        self.assertIn("Grüße".encode(), srv.messages()[0]["raw"])
        srv2 = self.start_smtpd(tls=True, no_8bitmime=True)
        r = self.send(srv2, DATA=data)
        self.assertEqual((r["ok"], r["stage"], r["temporary"]), (False, "mail", False), r)
        self.assertIn("8BITMIME", r["message"])
        self.assertEqual(srv2.message_count(), 0)

    @valgrind_redundant("test_several_recipients_one_refused, "
                        "test_8bit_message_declares_8bitmime_and_fails_clearly_without_it")
    def test_the_messages_eightbit_field_decides_body_8bitmime_without_a_scan(self):
        # mime.build's info.eightbit, carried by the campaign's message: trusted, not scanned again
        srv = self.start_smtpd(tls=True)
        self.assertTrue(self.send(srv, EIGHTBIT="true")["ok"])
        self.assertIn("BODY=8BITMIME", srv.messages()[0]["mail_options"])
        self.assertTrue(self.send(srv, EIGHTBIT="false")["ok"])
        self.assertNotIn("BODY=8BITMIME", srv.messages()[1]["mail_options"])
        # without the field the data is scanned, as before
        self.assertTrue(self.send(srv, DATA="Subject: x\r\n\r\nGr\u00fc\u00dfe\r\n")["ok"])
        self.assertIn("BODY=8BITMIME", srv.messages()[2]["mail_options"])

    def test_a_campaigns_message_carries_mime_builds_8bit_class(self):
        script = self.path("m.lua")
        with open(script, "w") as f:
            f.write(r"""
local mailshot = require "mailshot"
for _, eightbit in ipairs { true, false } do
  local c = mailshot.campaign { recipients = "r.csv", from = "a@example.com", subject = "s", eightbit = eightbit,
                                text = "Gr\195\188\195\159e {{email}}", send = function() end }
  local msg = assert(c:message({ email = "b@example.org" }, 2))
  print(tostring(msg.eightbit), msg.data:find("[\128-\255]") ~= nil)
end
""")
        p = self.run_mailshot("exec", script)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.split(), ["true", "true", "false", "false"])

    @valgrind_redundant("test_server_dropping_the_connection_mid_session_is_temporary, "
                        "test_each_wait_can_have_its_own_timeout")
    def test_a_stalled_server_costs_a_timeout_not_a_hang(self):
        srv = self.start_smtpd(tls=True, delay=["RCPT:5"])
        r = self.send(srv, TIMEOUT="1")
        self.assertEqual((r["ok"], r["temporary"], r["code"]), (False, True, 0), r)
        self.assertIn("timed out after 1 s", r["message"])
        self.assertIn(r["stage"], ("mail", "rcpt"))

    def test_source_address_is_the_one_the_server_sees(self):
        srv = self.start_smtpd(tls=True)
        r = self.send(srv, SOURCE="127.0.0.5")
        self.assertTrue(r["ok"], r)
        self.assertEqual(srv.messages()[0]["peer"][0], "127.0.0.5")

    def test_next_message_is_pipelined_behind_the_final_dot_on_one_connection(self):
        srv = self.start_smtpd(tls=True)
        script = self.path("two.lua")
        with open(script, "w") as f:
            f.write("""
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", ca_file = os.getenv "SMTP_CA_FILE",
                               max_connections = 1, trace = true }
local tasks = {}
for w = 1, 2 do
  tasks[w] = mailshot.spawn(function()
    for i = 1, 5 do
      local r = relay:send { from = "s@example.org", to = ("w%d-%d@example.com"):format(w, i), data = "Subject: p\\n\\nhi\\n" }
      assert(r.ok, r.message)
    end
  end)
end
for w = 1, 2 do assert(tasks[w]:join()) end
""")
        from tests.integration.harness import make_cert
        cert, _ = make_cert(self.tmp)
        p = self.run_mailshot("exec", script, env={"SMTP_SERVER": srv.address, "SMTP_CA_FILE": cert})
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        self.assertEqual(srv.message_count(), 10)
        self.assertEqual(srv.connections(), 1)
        # client trace: a message's body, then the next MAIL before the reply to the first dot
        # trace lines: "[sN] PEER DIR TEXT"
        lines = [l.split(" ", 3)[2:] for l in p.stderr.splitlines() if " > " in l or " < " in l]
        overlapped = 0
        for i, (d, text) in enumerate(lines):
            if d == ">" and text.startswith("[message:"):
                rest = lines[i + 1:]
                nxt = next((j for j, (d2, t2) in enumerate(rest) if d2 == ">" and t2.startswith("MAIL FROM")), None)
                reply = next((j for j, (d2, t2) in enumerate(rest) if d2 == "<" and "queued" in t2), None)
                if nxt is not None and reply is not None and nxt < reply:
                    overlapped += 1
        self.assertGreaterEqual(overlapped, 4, "\n".join(" ".join(l) for l in lines[:60]))

    def test_each_wait_can_have_its_own_timeout(self):
        script = self.path("t.lua")
        with open(script, "w") as f:
            f.write("""
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none", timeout = 30,
                               timeouts = { command = tonumber(os.getenv "CMD"), data_end = tonumber(os.getenv "END") } }
local r = relay:send { from = "s@example.org", to = "r@example.com", data = "Subject: t\\n\\nhi\\n" }
print(r.ok, r.stage, r.message)
""")
        slow_rcpt = self.start_smtpd(delay=["RCPT:3"])
        p = self.run_mailshot("exec", script, env={"SMTP_SERVER": slow_rcpt.address, "CMD": "0.5", "END": "20"})
        self.assertIn("false\trcpt\ttimed out after 0.5 s waiting for the rcpt reply", p.stdout)
        slow_end = self.start_smtpd(delay=["DATA-END:2"])
        p = self.run_mailshot("exec", script, env={"SMTP_SERVER": slow_end.address, "CMD": "1", "END": "0.5"})
        self.assertIn("false\tmessage\ttimed out after 0.5 s waiting for the message reply", p.stdout)
        p = self.run_mailshot("exec", script, env={"SMTP_SERVER": slow_end.address, "CMD": "0.5", "END": "10"})
        self.assertTrue(p.stdout.startswith("true"), p.stdout)      # a long end of DATA is fine when allowed

    def test_several_recipients_one_refused(self):
        srv = self.start_smtpd(tls=True, reject_rcpt=[("no@", 550, "5.1.1 unknown")])
        r = self.send(srv, TO="a@example.com,no@example.com,b@example.com")
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["accepted"], 2)
        self.assertEqual([(x["address"], x["ok"], x["code"]) for x in r["recipients"]],
                         [("a@example.com", True, 250), ("no@example.com", False, 550), ("b@example.com", True, 250)])
        (m,) = srv.messages()
        self.assertEqual(m["rcpt_tos"], ["a@example.com", "b@example.com"])

    def test_all_recipients_refused_with_pipelining_reports_the_refusal(self):
        srv = self.start_smtpd(tls=True, reject_rcpt=[("no@", 550, "5.1.1 unknown user")])
        r = self.send(srv, TO="no@example.com")
        self.assertEqual((r["ok"], r["stage"], r["code"], r["enhanced"]), (False, "rcpt", 550, "5.1.1"), r)
        self.assertIn("unknown user", r["message"])
        self.assertEqual(srv.message_count(), 0)

    def test_data_refused_after_the_dot(self):
        srv = self.start_smtpd(tls=True, reject_data_from=[("sender@", 554, "5.7.1 spam detected")])
        r = self.send(srv)
        self.assertEqual((r["ok"], r["stage"], r["code"], r["temporary"]), (False, "message", 554, False), r)
        self.assertIn("spam detected", r["message"])

    def test_server_dropping_the_connection_mid_session_is_temporary(self):
        srv = self.start_smtpd(tls=True, disconnect_on=["DATA"])
        r = self.send(srv)
        self.assertEqual((r["ok"], r["temporary"]), (False, True), r)
        self.assertIn("closed by the server while waiting for the data reply", r["message"])
        self.assertEqual(r["stage"], "data")


if __name__ == "__main__":
    unittest.main()
