"""The shared suppression list of a cluster run through a real redis-server (issue 15 item 3): a
bounce processed elsewhere (`mailshot bounces --cluster`) stops the running workers sending to it;
and the Lua-level cases of mailshot.cluster_rate and mailshot.cluster_suppress
(tests/lua/cluster_share_redis.lua)."""
import os

from tests.integration.harness import REPO_ROOT, free_port, read_report, skip_under_valgrind, wait_for
from tests.integration.test_bounces import dsn
from tests.integration.test_cluster_rate import ClusterCase


class ClusterSuppressTests(ClusterCase):
    @skip_under_valgrind("timing-driven; test_cluster_rate runs the cluster code under valgrind")
    def test_a_bounce_processed_elsewhere_stops_the_running_workers_sending_to_it(self):
        n = 80
        rows = [[f"u{i}@example.com", f"N{i}"] for i in range(n)]
        redis = self.redis()
        srv = self.start_smtpd()
        # 4 s for the two workers together; a row is classified before it waits for the rate (16
        # tasks), so the last row is classified ~3 s in: the bounce must be in Redis before that
        d, script = self.campaign(rows, 'rate = "20/s",')
        procs = [self.worker(script, redis, f"w{k}", srv) for k in range(2)]
        wait_for(lambda: len(srv.messages()) >= 5, timeout=30, what="the workers to start sending")
        # u79 (the last row) bounced on another host: `mailshot bounces --cluster` publishes it
        box = self.path("bounce.eml")
        with open(box, "w") as f:
            f.write(dsn("u79@example.com", n=1))
        # its own bounces_to file: a host that is not one of the workers
        p = self.run_mailshot("bounces", box, "--campaign", script, "--cluster", redis.url,
                              "--report", self.path("b.csv"), env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("suppress", p.stdout)
        sent_before = len(srv.messages())
        self.assertLess(sent_before, 45, "the bounce came in early enough (else the machine is too slow for this test)")
        self.finish(procs)
        got = {m["rcpt_tos"][0] for m in srv.messages()}
        self.assertNotIn("u79@example.com", got)
        self.assertEqual(len(got), n - 1)
        reps = {r["email"]: r for k in range(2) for r in read_report(self.path(f"w{k}.csv"))}
        self.assertEqual(reps["u79@example.com"]["status"], "skipped")
        self.assertEqual(reps["u79@example.com"]["response"], "suppressed: shared suppression list")
        # a Redis that cannot be reached: nothing is read, exit status 1
        p = self.run_mailshot("bounces", box, "--campaign", script, "--cluster", f"redis://127.0.0.1:{free_port()}/0",
                              "--report", self.path("b2.csv"), env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("cannot connect", p.stderr)
        self.assertFalse(os.path.exists(self.path("b2.csv")))
        # --cluster needs the campaign that names the list
        p = self.run_mailshot("bounces", box, "--suppress", self.path("x.txt"), "--cluster", redis.url)
        self.assertEqual(p.returncode, 2)
        self.assertIn("--cluster goes with --campaign", p.stderr)

    @skip_under_valgrind("timing assertions (leases, waits) in the Lua cases")
    def test_lua_cases_against_redis(self):
        redis = self.redis()
        p = self.run_mailshot("exec", os.path.join(REPO_ROOT, "tests", "lua", "cluster_share_redis.lua"),
                              redis.host, redis.port)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("0 failed", p.stdout)
        print("\n" + p.stdout.strip())



if __name__ == "__main__":
    import unittest
    unittest.main()
