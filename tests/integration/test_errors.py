"""Typed errors: a failed send says what kind of failure it was (`result.error`), set in C where the
failure happened, never guessed from the words of the message.  Every case is a real server (aiosmtpd,
its fault-injecting mode, dnsmasq), a refused port or a loopback socket that says nothing or nonsense.
Each result's fields are also checked against the one list of them, mailshot.result.FIELDS."""
import json
import socket
import threading
import unittest

from tests.integration.harness import MailshotTestCase, free_port, make_cert, valgrind_redundant

SEND = r'''
local mailshot = require "mailshot"
local FIELDS = require("mailshot.result").FIELDS
local function env(k) local v = os.getenv(k); if v ~= "" then return v end end
local opts = { server = env "SMTP_SERVER", tls = env "SMTP_TLS" or "none", ca_file = env "SMTP_CA_FILE",
               user = env "SMTP_USER", password = env "SMTP_PASSWORD", timeout = tonumber(env "TIMEOUT" or "10"),
               dns = env "DNS", dns_timeout = 1 }
local to = {}
for a in (env "TO" or "rcpt@example.com"):gmatch("[^,]+") do to[#to + 1] = a end
if #to == 1 then to = to[1] end
local r
if env "DIRECT" then
  local d = mailshot.direct_sender { dns = opts.dns, port = tonumber(env "PORT"), timeout = 5, tls = "none",
                                     allow_private = true, helo = "mailshot.test" }
  r = d:send { from = "sender@example.org", to = to, data = "Subject: t\r\n\r\nhello\r\n" }
  d:close()
else
  local relay = mailshot.relay(opts)
  r = relay:send { from = "sender@example.org", to = to, data = "Subject: t\r\n\r\nhello\r\n" }
  relay:close()
end
local known, unknown = {}, {}
for _, k in ipairs(FIELDS) do known[k] = true end
for k in pairs(r) do if not known[k] then unknown[#unknown + 1] = k end end
table.sort(unknown)
local function q(v) return '"' .. tostring(v):gsub('[%c"\\]', "") .. '"' end
print(('{"ok":%s,"error":%s,"stage":%s,"temporary":%s,"code":%d,"defer":%s,"accepted":%s,"unknown":[%s]}'):format(
  tostring(r.ok), r.error and q(r.error) or "null", r.stage and q(r.stage) or "null", tostring(r.temporary),
  r.code, tostring(r.defer == true), tostring(r.accepted or "null"), #unknown > 0 and q(table.concat(unknown, ",")) or ""))
'''


def serve_once(reply):
    """A loopback TCP server for one connection: sends `reply` (None: nothing at all), then keeps
    the connection open until the client goes.  Returns (address, stop)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.settimeout(30)
    done = threading.Event()

    def run():
        try:
            conn, _ = ls.accept()
        except OSError:
            return
        with conn:
            if reply is not None:
                conn.sendall(reply)
            conn.settimeout(0.2)
            for _ in range(300):          # at most 60 s; the client goes long before
                if done.is_set():
                    break
                try:
                    if conn.recv(4096) == b"":
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def stop():
        done.set()
        ls.close()
        t.join(5)
    return f"127.0.0.1:{ls.getsockname()[1]}", stop


class ErrorKindTests(MailshotTestCase):
    def setUp(self):
        super().setUp()
        self.script = self.path("send.lua")
        with open(self.script, "w") as f:
            f.write(SEND)

    def send(self, **env):
        """One send with env; its result, once its fields are checked against the one list."""
        p = self.run_mailshot("exec", self.script, env=env, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        self.assertEqual(r["unknown"], [], f"result fields not in mailshot.result.FIELDS: {r}")
        return r

    def kind(self, r):
        return (r["ok"], r["error"], r["stage"], r["temporary"])

    @valgrind_redundant(
        "test_task_waits.test_a_stray_wake_of_a_task_in_relay_send_is_refused_and_the_send_completes")
    def test_a_delivered_message_has_no_error(self):
        srv = self.start_smtpd()
        r = self.send(SMTP_SERVER=srv.address)
        self.assertEqual(self.kind(r), (True, None, None, False), r)

    @valgrind_redundant("test_relay.test_several_recipients_one_refused, "
                        "test_a_message_over_the_servers_size_is_local_with_the_code_it_would_get")
    def test_a_message_to_several_recipients_has_only_listed_fields(self):
        srv = self.start_smtpd(reject_rcpt=[("gone@", 550, "5.1.1 No such user")])
        r = self.send(SMTP_SERVER=srv.address, TO="ok@example.com,gone@example.com")
        self.assertEqual(self.kind(r) + (r["accepted"],), (True, None, None, False, 1), r)

    @valgrind_redundant("test_resume.test_temporary_failures_are_retried_in_the_run_with_backoff, "
                        "test_a_reply_that_is_not_smtp_is_protocol")
    def test_server_refusals_are_permfail_or_tempfail_by_their_reply_class(self):
        srv = self.start_smtpd(reject_rcpt=[("gone@", 550, "5.1.1 No such user"), ("busy@", 451, "4.3.0 Try later")])
        r = self.send(SMTP_SERVER=srv.address, TO="gone@example.com")
        self.assertEqual(self.kind(r) + (r["code"],), (False, "permfail", "rcpt", False, 550), r)
        r = self.send(SMTP_SERVER=srv.address, TO="busy@example.com")
        self.assertEqual(self.kind(r) + (r["code"],), (False, "tempfail", "rcpt", True, 451), r)

    def test_a_greeting_of_554_is_permfail_at_the_greeting(self):
        srv = self.start_smtpd(greeting_code=554)
        r = self.send(SMTP_SERVER=srv.address)
        self.assertEqual(self.kind(r), (False, "permfail", "greeting", False), r)

    @valgrind_redundant("test_faults.test_a_message_cut_off_mid_body_once_is_sent_again_and_arrives_exactly_once, "
                        "test_relay.test_server_dropping_the_connection_mid_session_is_temporary")
    def test_a_connection_dropped_by_the_server_is_closed(self):
        srv = self.start_smtpd(disconnect_on=["MAIL"])
        r = self.send(SMTP_SERVER=srv.address)
        self.assertEqual(self.kind(r), (False, "closed", "mail", True), r)

    @valgrind_redundant("tests/lua/test_runtime.lua")
    def test_a_refused_port_is_connect(self):
        r = self.send(SMTP_SERVER=f"127.0.0.1:{free_port()}")
        self.assertEqual(self.kind(r), (False, "connect", "connect", True), r)

    @valgrind_redundant("test_faults.test_a_server_dripping_a_reply_byte_by_byte_times_out_within_the_wait, "
                        "test_a_reply_that_is_not_smtp_is_protocol")
    def test_a_silent_server_is_timeout(self):
        address, stop = serve_once(None)
        self.addCleanup(stop)
        r = self.send(SMTP_SERVER=address, TIMEOUT="0.5")
        self.assertEqual(self.kind(r), (False, "timeout", "greeting", True), r)

    def test_a_reply_that_is_not_smtp_is_protocol(self):
        address, stop = serve_once(b"hello, this is not SMTP\r\n")
        self.addCleanup(stop)
        r = self.send(SMTP_SERVER=address)
        self.assertEqual(self.kind(r), (False, "protocol", "greeting", True), r)

    @valgrind_redundant("test_direct.test_starttls_is_used_when_offered_and_not_required_otherwise, "
                        "test_check.test_implicit_tls")
    def test_a_certificate_that_does_not_verify_is_cert_and_final(self):
        srv = self.start_smtpd(implicit_tls=True)      # a self-signed certificate, no ca_file
        r = self.send(SMTP_SERVER=srv.address, SMTP_TLS="tls")
        self.assertEqual(self.kind(r), (False, "cert", "tls", False), r)

    @valgrind_redundant("test_relay.test_server_dropping_the_connection_mid_session_is_temporary, "
                        "test_check.test_implicit_tls_against_a_starttls_port_suggests_starttls")
    def test_a_handshake_that_fails_otherwise_is_tls_and_temporary(self):
        srv = self.start_smtpd()                       # plaintext: no TLS handshake possible
        cert, _ = make_cert(self.tmp)
        r = self.send(SMTP_SERVER=srv.address, SMTP_TLS="tls", SMTP_CA_FILE=cert, TIMEOUT="3")
        self.assertEqual(self.kind(r), (False, "tls", "tls", True), r)

    def test_no_starttls_offered_is_our_own_refusal_local(self):
        srv = self.start_smtpd()
        r = self.send(SMTP_SERVER=srv.address, SMTP_TLS="starttls")
        self.assertEqual(self.kind(r), (False, "local", "starttls", False), r)

    def test_a_message_over_the_servers_size_is_local_with_the_code_it_would_get(self):
        srv = self.start_smtpd(size=10)
        r = self.send(SMTP_SERVER=srv.address)
        self.assertEqual(self.kind(r) + (r["code"],), (False, "local", "mail", False, 552), r)
        self.assertEqual(srv.messages(), [])

    @valgrind_redundant("tests/lua/test_runtime.lua, tests/lua/test_mime.lua")
    def test_an_injected_address_is_invalid_before_any_network(self):
        r = self.send(SMTP_SERVER=f"127.0.0.1:{free_port()}", TO="a@b.example>\r\nRCPT TO:<evil@x.test")
        self.assertEqual(self.kind(r), (False, "invalid", "rcpt", False), r)

    @valgrind_redundant("test_direct.test_relay_then_direct_when_the_relay_is_down, "
                        "test_relay_dns.test_check_resolves_the_relay_with_its_dns_option")
    def test_a_relay_name_that_does_not_resolve_is_dns(self):
        dns = self.start_dns({"a": [("relay.test", "127.0.0.1")]})
        r = self.send(SMTP_SERVER="nosuch.test:25", DNS=dns.address)
        self.assertEqual(self.kind(r), (False, "dns", "connect", True), r)

    @valgrind_redundant("test_campaign.test_wrong_password_defers_every_message_at_auth, "
                        "test_relay.test_auth_login_when_plain_is_not_offered")
    def test_a_refused_login_is_auth_and_deferred(self):
        srv = self.start_smtpd(tls=True, auth={"u": "right-pw"})
        cert, _ = make_cert(self.tmp)
        r = self.send(SMTP_SERVER=srv.address, SMTP_TLS="starttls", SMTP_CA_FILE=cert, SMTP_USER="u",
                      SMTP_PASSWORD="wrong-pw")
        self.assertEqual(self.kind(r) + (r["defer"],), (False, "auth", "auth", True, True), r)

    @valgrind_redundant("test_direct.test_a_5xx_on_rcpt_is_final_and_does_not_fall_back, "
                        "test_row_rules.test_preview_preflight_dry_run_and_send_agree_on_every_row")
    def test_direct_delivery_sets_kinds_too(self):
        srv = self.start_smtpd(reject_rcpt=[("gone@", 550, "5.1.1 No such user")])
        port = srv.address.rsplit(":", 1)[1]
        dns = self.start_dns({"mx": [("a.test", "mx.a.test", 10)], "a": [("mx.a.test", "127.0.0.1")]})
        r = self.send(DIRECT="1", DNS=dns.address, PORT=port, TO="gone@a.test")
        self.assertEqual(self.kind(r), (False, "permfail", "rcpt", False), r)
        r = self.send(DIRECT="1", DNS=dns.address, PORT=port, TO="x@nosuch.test")
        self.assertEqual(self.kind(r), (False, "dns", "dns", False), r)
        r = self.send(DIRECT="1", DNS=dns.address, PORT=port, TO="ok@a.test")
        self.assertEqual(self.kind(r), (True, None, None, False), r)


if __name__ == "__main__":
    unittest.main()
