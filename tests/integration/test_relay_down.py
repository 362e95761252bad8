"""A relay that is down (issue 12 item 3): the progress line and the summary say which relay fails
and why, and a run whose relay fails before any transaction for a while (the campaign's
stop_when_down) stops early, exit 75, with the command that resumes it; --resume then sends every
recipient exactly once.  Rows that a fallback delivers do not stop the run.  Every relay here is a
real loopback port: one where nothing listens, one that accepts and never greets, a plaintext
aiosmtpd spoken to in implicit TLS; then a real aiosmtpd on the same port for the resume."""
import collections
import os
import re
import socket
import unittest

from tests.integration.harness import MailshotTestCase, free_port, read_report, write_csv, valgrind_redundant

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = os.getenv "SMTP_TLS" or "none",
                               timeout = tonumber(os.getenv "TIMEOUT" or "5"), max_connections = 2 }
local send = relay
if os.getenv "DNS" then
  send = mailshot.fallback { relay, mailshot.direct_sender { dns = os.getenv "DNS", port = tonumber(os.getenv "PORT"),
                                                             tls = "none", timeout = 5, allow_private = true,
                                                             helo = "mailshot.test" } }
end
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi", text = "Hello {{email}}",
  send = send, concurrency = 2, RETRY STOP
}
"""


class RelayDownTests(MailshotTestCase):
    def campaign(self, n, retry="retry = false,", stop="", domain="example.com"):
        d = self.path("c")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), ["email"], [[f"u{i}@{domain}"] for i in range(n)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN.replace("RETRY", retry).replace("STOP", stop))
        return os.path.join(d, "c.lua")

    def run_campaign(self, script, env, *extra):
        p = self.run_mailshot("run", script, "--send", "--report", "r.csv", *extra, env=env)
        return p, read_report(self.path("r.csv"))

    def resume_sends_the_rest_exactly_once(self, script, port, n):
        srv = self.start_smtpd(port=port)
        p, rep = self.run_campaign(script, {"SMTP_SERVER": f"127.0.0.1:{port}"}, "--resume", "--progress", "0")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        sent = collections.Counter(r for m in srv.messages() for r in m["rcpt_tos"])
        self.assertEqual(sent, collections.Counter(f"u{i}@example.com" for i in range(n)))   # each once
        self.assertEqual(sorted((r["email"], r["status"]) for r in rep),
                         sorted((f"u{i}@example.com", "sent") for i in range(n)))

    def assert_stopped(self, p, port, last):
        self.assertEqual(p.returncode, 75, p.stdout + p.stderr)
        told = re.search(rf"^mailshot: relay 127\.0\.0\.1:{port} failed (\d+) times in a row over ([\d.]+) s "
                         rf"\(last: ([^\n]*)\); stopped\. Resume with: mailshot run \S*c\.lua --send --resume "
                         rf"--report r\.csv$", p.stdout, re.M)
        self.assertIsNotNone(told, p.stdout + p.stderr)
        self.assertRegex(told.group(3), last)
        self.assertIn("stopping: no new messages; waiting for the ones in flight", p.stderr)
        return int(told.group(1)), float(told.group(2))

    @valgrind_redundant("test_faults.test_421_mid_session_is_retried_on_a_new_connection, "
                        "tests/lua/test_runtime.lua")
    def test_a_relay_refusing_connections_stops_the_run_and_resume_sends_everyone_once(self):
        port = free_port()                                   # nothing listens there
        n = 20
        script = self.campaign(n, retry='retry = { first = "0.2s", max = "0.3s", give_up_after = "10m" },',
                               stop="stop_when_down = { failures = 5, seconds = 1 },")
        p, rep = self.run_campaign(script, {"SMTP_SERVER": f"127.0.0.1:{port}"}, "--progress", "0")
        count, span = self.assert_stopped(p, port, rf"^cannot connect to 127\.0\.0\.1:{port}: Connection refused$")
        self.assertGreaterEqual(count, 5)
        self.assertGreaterEqual(span, 1.0)
        # every row had failed its first try and was waiting for a retry: reported deferred, not
        # retried for the ten minutes the campaign allows
        self.assertEqual(len(rep), n)
        for r in rep:
            self.assertEqual((r["status"], r["stage"], r["via"]), ("deferred", "connect", "relay"), r)
        self.assertIn(f"relay 127.0.0.1:{port}: {n} deferred; last: cannot connect", p.stdout)
        self.resume_sends_the_rest_exactly_once(script, port, n)

    @valgrind_redundant("test_faults.test_421_mid_session_is_retried_on_a_new_connection, "
                        "test_check.test_starttls_against_an_implicit_tls_port_suggests_tls")
    def test_a_relay_that_never_greets_stops_the_run_before_the_list_is_done(self):
        # a relay that accepts connections and says nothing: each try waits for its timeout,
        # and the rows after the stop are never started
        hung = socket.socket()
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        port = hung.getsockname()[1]
        n = 30
        script = self.campaign(n, stop="stop_when_down = { failures = 3, seconds = 0.5 },")
        try:
            p, rep = self.run_campaign(script, {"SMTP_SERVER": f"127.0.0.1:{port}", "TIMEOUT": "0.4"}, "--progress", "0")
        finally:
            hung.close()
        self.assert_stopped(p, port, r"timed out")
        self.assertEqual(len(rep), n)                         # the report names everyone, and
        started = [r for r in rep if r["status"] != "not-started"]
        self.assertGreater(len(started), 0)
        self.assertLess(len(started), n)                      # the list was not ground through
        for r in started:
            self.assertEqual(r["status"], "deferred", r)
            self.assertIn(r["stage"], ("connect", "greeting"), r)
        self.assertTrue(os.path.exists(self.path("c.journal")))
        self.resume_sends_the_rest_exactly_once(script, port, n)

    @valgrind_redundant("test_examples.test_fallback_example_routes_each_recipient_by_its_rules, "
                        "test_resume.test_sigint_finishes_messages_in_flight_and_says_how_to_resume")
    def test_rows_that_fall_back_to_direct_delivery_do_not_stop_the_run(self):
        srv = self.start_smtpd()
        port = srv.address.rsplit(":", 1)[1]
        dns = self.start_dns({"mx": [("a.test", "mx.a.test", 10)], "a": [("mx.a.test", "127.0.0.1")]})
        down = free_port()
        n = 12
        # the smallest thresholds: every row's relay try fails, yet every row is delivered
        script = self.campaign(n, stop="stop_when_down = { failures = 1, seconds = 0 },", domain="a.test")
        p, rep = self.run_campaign(script, {"SMTP_SERVER": f"127.0.0.1:{down}", "DNS": dns.address, "PORT": port},
                                   "--progress", "0")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertNotIn("stopped", p.stdout + p.stderr)
        self.assertEqual(sorted((r["email"], r["status"], r["via"]) for r in rep),
                         sorted((f"u{i}@a.test", "sent", "direct") for i in range(n)))
        self.assertEqual(srv.message_count(), n)

    @valgrind_redundant("test_faults.test_a_refused_login_still_falls_back_to_the_other_path_when_the_rule_says_so, "
                        "tests/lua/test_runtime.lua")
    def test_the_progress_line_and_the_summary_name_the_failing_relay(self):
        # implicit TLS to a plaintext server: "TLS handshake failed ...", words that name no relay
        srv = self.start_smtpd()
        script = self.campaign(3, retry='retry = { first = "0.1s", max = "0.2s", give_up_after = "1.5s" },')
        p, rep = self.run_campaign(script, {"SMTP_SERVER": srv.address, "SMTP_TLS": "tls"}, "--progress", "0.2")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        relay = re.escape(srv.address)
        progress = [l for l in p.stderr.splitlines() if l.startswith("mailshot: c: ") and "deferred" in l]
        self.assertTrue(progress, p.stderr)
        self.assertRegex(progress[-1], rf"deferred \d+ \(last: relay {relay}: [^;)]*; \d+ in a row\)")
        self.assertRegex(p.stdout, rf"(?m)^mailshot:   relay {relay}: 3 deferred; last: \S")
        self.assertEqual([r["status"] for r in rep], ["deferred"] * 3)

    def test_the_summary_has_a_line_per_relay_with_its_own_reason(self):
        srv = self.start_smtpd(reject_rcpt=[("u5@", 451, "4.2.1 try later")])
        down = free_port()
        d = self.path("c")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email"], [[f"u{i}@example.com"] for i in range(6)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write("""
local mailshot = require "mailshot"
local up = mailshot.relay { server = os.getenv "UP", tls = "none", timeout = 5 }
local down = mailshot.relay { server = os.getenv "DOWN", tls = "none", timeout = 5 }
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi", text = "Hello {{email}}", retry = false,
  concurrency = 1,                   -- in CSV order: u5's 451 is the last temporary failure
  -- odd rows through the relay that is up, even rows through the one that is down
  send = function(msg, row) return (row.email:match("^u%d*[13579]@") and up or down):send(msg) end,
}
""")
        p, rep = self.run_campaign(os.path.join(d, "c.lua"), {"UP": srv.address, "DOWN": f"127.0.0.1:{down}"},
                                   "--progress", "0")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        lines = [l for l in p.stdout.splitlines() if l.startswith("mailshot:   ")]
        self.assertEqual(len(lines), 2, p.stdout)
        self.assertEqual(sorted(lines), sorted([
            f"mailshot:   relay 127.0.0.1:{down}: 3 deferred; last: cannot connect to 127.0.0.1:{down}: Connection refused",
            f"mailshot:   relay {srv.address}: 1 deferred; last: 451 4.2.1 try later"]), p.stdout)
        self.assertEqual(collections.Counter(r["status"] for r in rep), {"sent": 2, "deferred": 4})
        # the run's own line: the last reason with its relay and reply code
        self.assertIn(f"4 deferred (last: relay {srv.address}: 451 4.2.1 try later)", p.stdout)


if __name__ == "__main__":
    unittest.main()
