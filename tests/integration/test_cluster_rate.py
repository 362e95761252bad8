"""Several `mailshot run --send --cluster` workers sharing rate limits through a real redis-server
(issue 15 item 2): a relay's "200/s" held across three workers at the receiver's clock, a
domain_rate shared by them, and a hard bounce published to the shared suppression list.
test_cluster_suppress.py has the shared suppression list and the Lua-level cases."""
import collections
import os
import subprocess
import unittest

from tests.integration import harness
from tests.integration.harness import MailshotTestCase, read_report, scaled, write_csv

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none", max_connections = 4,
                               rate = os.getenv "RELAY_RATE" ~= "" and os.getenv "RELAY_RATE" or nil }
return mailshot.campaign {
  name = "shared", recipients = "list.csv", from = "news@acme.example", subject = "Hi {{name}}",
  text = "Hello {{name}}", send = relay, concurrency = 8, bounces_to = "bounced.txt",
  %s
}
"""


def max_in_window(times, window):
    """The most times in one interval [t, t + window)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while t - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


class ClusterCase(MailshotTestCase):
    """What the cluster tests share: a Redis, a campaign, workers (no tests of its own)."""

    def redis(self):
        return self.start_redis()

    def campaign(self, rows, extra=""):
        d = self.path("camp")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], rows)
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN % extra)
        return d, os.path.join(d, "c.lua")

    def worker(self, script, redis, name, srv, rate=""):
        proc = subprocess.Popen(self.mailshot_cmd("run", script, "--send", "--cluster", redis.url, "--worker", name,
                                                  "--report", self.path(f"{name}.csv"), "--progress", "0"),
                                cwd=self.tmp, env=dict(os.environ, SMTP_SERVER=srv.address, RELAY_RATE=rate),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._procs.append(proc)
        return proc

    def finish(self, procs, status=(0,)):
        for p in procs:
            out, err = p.communicate(timeout=scaled(120, 900))
            self.assertIn(p.returncode, status, out + err)
            self.assertNotIn("Traceback", err)
            self.assertEqual(harness.sanitizer_errors(err), [], err)

class ClusterRateTests(ClusterCase):
    def test_relay_200_per_s_and_a_domain_rate_hold_across_three_workers_at_the_receiver(self):
        n = scaled(1000, 300)
        slow_n = scaled(75, 40)
        rows = [[f"u{i}@example.com", f"N{i}"] for i in range(n - slow_n - 1)]
        rows += [[f"s{i}@slow.example", f"S{i}"] for i in range(slow_n)]
        rows.insert(n // 2, ["gone@example.com", "G"])
        redis = self.redis()
        srv = self.start_smtpd(reject_rcpt=[("gone@", 550, "5.1.1 No such user")])
        d, script = self.campaign(rows, 'domain_rate = { ["slow.example"] = "30/s" },')
        procs = [self.worker(script, redis, f"w{k}", srv, rate="200/s") for k in range(3)]
        self.finish(procs, (0, 1))                  # 1: the worker that had the bounced recipient
        msgs = srv.messages()
        got = collections.Counter(m["rcpt_tos"][0] for m in msgs)
        self.assertEqual(len(got), n - 1, "every recipient received (but the one refused)")
        self.assertEqual(max(got.values()), 1, "nobody twice")
        stamps = [m["received_at"] for m in msgs]
        most = max_in_window(stamps, 1.0)
        span = max(stamps) - min(stamps)
        per_worker = [sum(1 for r in read_report(self.path(f"w{k}.csv")) if r["status"] == "sent") for k in range(3)]
        slow = [m["received_at"] for m in msgs if m["rcpt_tos"][0].endswith("@slow.example")]
        slow_most = max_in_window(slow, 1.0)
        print(f"\n  {n} messages, 3 workers, relay rate 200/s: at most {most} in one second at the receiver, "
              f"{span:.1f} s from first to last ({n / max(span, 1e-3):.0f}/s); per worker {per_worker}; "
              f"slow.example (30/s): at most {slow_most} in one second")
        # exact within one slot: the receiver's clock is Redis's here (one machine)
        self.assertLessEqual(most, 201)
        # shared: n messages at 200/s fleet-wide take (n - 200) / 200 s at least; three separate
        # limits (600/s) would take a third of that
        self.assertGreaterEqual(span, (n - 200) / 200 * 0.95)
        self.assertTrue(all(c > 0 for c in per_worker), f"every worker sent: {per_worker}")
        # the domain's own limit, shared as well
        self.assertEqual(len(slow), slow_n)
        self.assertLessEqual(slow_most, 31, "slow.example: 30/s across the three workers")
        self.assertGreaterEqual(max(slow) - min(slow), (slow_n - 30) / 30 * 0.95, "one 30/s for all, not three")
        # the limiters' state in Redis, named as README says
        for name in (f"relay {srv.host}:{srv.port}", "domain slow.example"):
            self.assertEqual(redis.cli("EXISTS", f"mailshot:{{shared}}:rate:{name}:meta").strip(), "1", name)
        # the hard bounce went to the shared list (and to its worker's bounces_to file)
        self.assertEqual(redis.cli("SMEMBERS", "mailshot:{shared}:suppress").split(), ["gone@example.com"])
        with open(os.path.join(d, "bounced.txt")) as f:
            self.assertIn("gone@example.com", f.read())


if __name__ == "__main__":
    unittest.main()
