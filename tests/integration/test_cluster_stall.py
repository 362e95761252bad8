"""Cluster mode (issue 15): a worker stalled past its lease (SIGSTOP here; a long GC pause or a VM
freeze alike) must not send the rows another worker took over meanwhile.

Black-box on purpose (the cluster's Redis data model is being rewritten): no Redis key is read or
written here.  What is observed: the receiver's log (tests/servers/rcpt_sink.py), each worker's own
report, its exit status and stderr, `mailshot cluster status` and `mailshot cluster report`."""
import collections
import os
import re
import signal

from tests.integration.harness import read_report, scaled, wait_for, write_csv
from tests.integration import test_cluster

# The same campaign for both workers (one fingerprint), but with SEND_PAUSE in its environment a
# worker waits that long in its send function, after the row's in-flight mark and before the relay:
# all its tasks then hold rows in flight, and its read-ahead queue stays full of rows it only reserved.
CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER" or "127.0.0.1:1", tls = "none", max_connections = 4 }
local pause = tonumber(os.getenv "SEND_PAUSE" or "0")
local send = relay
if pause > 0 then
  send = function(msg, row) mailshot.sleep(pause); return relay:send(msg, row) end
end
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi {{name}}", text = "Hello {{name}}",
  send = send, concurrency = 16, cluster = { lease = "1s" },
}
"""

TAKEN_OVER = re.compile(r"another worker\b.*\bover\b")


class ClusterStallTests(test_cluster.ClusterCase):
    def campaign(self, n):
        d = self.path("camp")
        os.makedirs(d, exist_ok=True)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [[f"u{i}@example.com", f"N{i}"] for i in range(n)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        return os.path.join(d, "c.lua")

    def status(self, script, redis):
        st = self.run_mailshot("cluster", "status", script, "--cluster", redis.url)
        self.assertEqual(st.returncode, 0, st.stdout + st.stderr)
        return st.stdout

    # runs under valgrind too: the only test where the loop's epoll_wait returns EINTR (SIGSTOP, SIGCONT)
    def test_a_stalled_worker_does_not_send_the_rows_another_took_over(self):
        n = 200
        script = self.campaign(n)
        redis = self.start_redis()
        smtp, log = self.start_sink()
        emails = {f"u{i}@example.com" for i in range(n)}

        # A alone, slow: 16 rows in flight at a time (0.5 s each), up to 24 more reserved ahead
        a = self.worker(script, smtp, redis, "wA", env={"SEND_PAUSE": "0.5"})
        self.addCleanup(lambda: a.poll() is None and a.send_signal(signal.SIGCONT))   # never left stopped
        wait_for(lambda: sum(self.received(log).values()) >= 16 or a.poll() is not None,
                 timeout=scaled(60, 300), what="the receiver has some of wA's messages")
        self.assertIsNone(a.poll(), "wA ended before it could be stopped")
        a.send_signal(signal.SIGSTOP)
        before_stop = sum(self.received(log).values())
        self.assertLess(before_stop, n - 40, "wA was too far on when stopped: nothing left to take over")

        # B: its pass, then A's rows once A's lease ran out (A is stopped: no heartbeat)
        b = self.worker(script, smtp, redis, "wB")
        out_b, err_b = b.communicate(timeout=scaled(120, 600))
        self.assertEqual(b.returncode, 0, out_b + err_b)
        self.assertIsNone(a.poll(), "wA is stopped: it cannot have ended")
        # B could finish only with A's rows taken over, so A's lease has run out: status says A is dead
        self.assertRegex(self.status(script, redis), r"(?m)^  wA .* dead\b")
        mine_b = read_report(self.path("wB.csv"))
        b_status = collections.Counter(r["status"] for r in mine_b)
        self.assertEqual(set(b_status) - {"sent", "in-flight"}, set(), mine_b)
        b_sent = {r["line"] for r in mine_b if r["status"] == "sent"}
        b_flight = {r["line"] for r in mine_b if r["status"] == "in-flight"}
        for r in mine_b:
            if r["status"] == "in-flight":
                self.assertIn("worker wA", r["response"], r)
        self.assertTrue(b_flight, "wA had no row in flight when stopped: the scenario did not happen")

        # A again: its in-flight messages may complete; the rows B took over must not go out from A
        a.send_signal(signal.SIGCONT)
        out_a, err_a = a.communicate(timeout=scaled(60, 300))
        # exit 0: A failed nothing and deferred nothing; every row it did not send has its outcome from
        # the worker that took it over (its own report says not-started, which asks nothing of anyone)
        self.assertEqual(a.returncode, 0, out_a + err_a)
        self.assertRegex(err_a, r"worker wA's lease ran out [\d.]+ s before this heartbeat")
        mine_a = read_report(self.path("wA.csv"))
        a_status = collections.Counter(r["status"] for r in mine_a)
        self.assertEqual(set(a_status) - {"sent", "not-started"}, set(), mine_a)
        a_sent = {r["line"] for r in mine_a if r["status"] == "sent"}
        a_refused = {r["line"] for r in mine_a if r["status"] == "not-started"}
        self.assertTrue(a_refused, "wA started no row B had taken over: the refused in-flight mark was not reached")
        for r in mine_a:
            if r["status"] == "not-started":
                self.assertRegex(r["response"], TAKEN_OVER, r)
        self.assertNotIn("deferred", out_a)
        self.assertIn(f"{len(a_refused)} not started", out_a)

        # each row B took over and A then refused was sent by B; each row A had in flight (B reported
        # it in-flight) A completed; no row sent by both
        self.assertLessEqual(a_refused, b_sent)
        self.assertLessEqual(b_flight, a_sent)
        self.assertEqual(a_sent & b_sent, set())
        self.assertEqual(len(mine_a), len({r["line"] for r in mine_a}), "a line twice in wA's report")
        self.assertEqual(len(mine_b), len({r["line"] for r in mine_b}), "a line twice in wB's report")

        # the receiver: everyone exactly once (B resent nothing A had in flight)
        got = self.received(log)
        self.assertEqual({a_: c for a_, c in got.items() if c > 1}, {}, "received twice")
        self.assertEqual(set(got), emails)

        # Redis: every line once, in order, final; A's outcomes replaced B's in-flight records, and
        # A settled nothing for the rows it refused (the counts are each worker's sent rows)
        rows, _ = self.merged(script, redis)
        self.assertEqual([int(r["line"]) for r in rows], list(range(2, n + 2)))
        self.assertEqual({r["status"] for r in rows}, {"sent"}, [r for r in rows if r["status"] != "sent"])
        st = self.status(script, redis)
        self.assertIn(f"c: {n}/{n} rows final: {n} sent, 0 failed, 0 skipped, 0 in-flight (possibly sent); "
                      "0 deferred; 0 in flight now", st)
        self.assertIn("workers: 0 alive, 0 dead, 2 finished", st)
        self.assertRegex(st, rf"(?m)^  wA .* sent {len(a_sent)}  failed 0  skipped 0  in-flight 0  in flight now 0  blocks 0 ")
        self.assertRegex(st, rf"(?m)^  wB .* sent {len(b_sent)}  failed 0  skipped 0  in-flight 0  in flight now 0  blocks 0 ")
