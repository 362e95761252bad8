"""Cluster mode (issue 15): several workers share one campaign through a real redis-server on
loopback.  Three workers and 30,000 recipients, one killed with kill -9 midway and a new one
started: every recipient in the merged report exactly once, nobody received twice; the
fingerprint check; Redis unreachable; Redis killed mid-run; `cluster status` and `cluster
report`; a run without --cluster untouched."""
import collections
import os
import shutil
import signal
import subprocess
import sys
import time

from tests.integration.harness import (MailshotTestCase, free_port, read_report, scaled, skip_under_valgrind,
                                       valgrind_redundant, wait_for, write_csv)

HERE = os.path.dirname(os.path.abspath(__file__))
RCPT_SINK = os.path.join(HERE, "..", "servers", "rcpt_sink.py")

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER" or "127.0.0.1:1", tls = "none", max_connections = 4 }
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi {{name}}", text = "Hello {{name}}",
  send = relay, concurrency = 16, cluster = { lease = "%s", %s }, %s
}
"""


class ClusterCase(MailshotTestCase):
    """What every cluster test module uses: a skip without redis-server, the receiver that logs each
    recipient, workers started in the background, the merged report.  No tests of its own, so that
    the other modules subclass it without running these again."""

    def setUp(self):
        super().setUp()
        if not shutil.which("redis-server"):
            self.skipTest("redis-server is not installed")

    def start_sink(self, softfail=None):
        """The fast receiver that logs every recipient it accepted (tests/servers/rcpt_sink.py); while
        the file softfail exists, addresses soft*@ get 451."""
        log = self.path("received.log")
        proc = subprocess.Popen(["/usr/bin/python3", RCPT_SINK, "0", log] + ([softfail] if softfail else []),
                                stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        self._procs.append(proc)
        self.addCleanup(proc.stdout.close)
        line = proc.stdout.readline().split()
        self.assertEqual(line[:1], ["ready"], "rcpt_sink did not start")
        return f"127.0.0.1:{line[1]}", log

    def received(self, log):
        try:
            with open(log, encoding="utf-8") as f:
                return collections.Counter(f.read().split())
        except FileNotFoundError:
            return collections.Counter()

    def worker(self, script, smtp, redis, name, *extra, env=None):
        e = dict(os.environ, SMTP_SERVER=smtp)
        e.update(env or {})
        proc = subprocess.Popen(self.mailshot_cmd("run", script, "--send", "--cluster", redis.url, "--worker", name,
                                                  "--report", self.path(f"{name}.csv"), "--progress", "0", *extra),
                                cwd=self.tmp, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self._procs.append(proc)
        return proc

    def merged(self, script, redis):
        r = self.run_mailshot("cluster", "report", script, "--cluster", redis.url, "--report", self.path("merged.csv"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return read_report(self.path("merged.csv")), r.stdout


class ClusterTests(ClusterCase):
    lease = "1s"

    def campaign(self, n, extra="", dup=False, cluster=""):
        d = self.path("camp")
        os.makedirs(d, exist_ok=True)
        rows = [[f"u{i}@example.com", f"N{i}"] for i in range(n)]
        if dup:
            rows.append(["u0@example.com", "again"])
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], rows)
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN % (self.lease, cluster, extra))
        return os.path.join(d, "c.lua")

    def done_count(self, redis):
        return int(redis.cli("HLEN", "mailshot:{c}:done").strip() or 0)

    # -------------------------------------------------------------------------------------------

    @skip_under_valgrind("30,000 messages from three workers; the small cases below run under valgrind")
    def test_three_workers_one_killed_every_recipient_reported_once_none_received_twice(self):
        n = int(os.environ.get("CLUSTER_N", 30000))
        script = self.campaign(n)
        redis = self.start_redis()
        smtp, log = self.start_sink()
        procs = {name: self.worker(script, smtp, redis, name) for name in ("w1", "w2", "w3")}
        # kill w2 midway: once a third of the rows are final
        wait_for(lambda: self.done_count(redis) >= n // 3 or any(p.poll() is not None for p in procs.values()),
                 timeout=120, interval=0.05, what="a third of the rows done")
        self.assertIsNone(procs["w2"].poll(), "w2 ended before it could be killed: raise CLUSTER_N")
        procs["w2"].send_signal(signal.SIGKILL)
        procs["w2"].communicate()
        time.sleep(0.3)                 # what w2 wrote before it died still reaches Redis (the kernel sends it)
        killed_at = self.done_count(redis)
        # the lines of the blocks w2 held (its finished blocks are released)
        size = int(redis.cli("HGET", "mailshot:{c}:meta", "block").strip())
        held = redis.cli("HGETALL", "mailshot:{c}:blocks").split()
        held_by_w2 = {str(line) for i in range(0, len(held), 2) if held[i + 1] == "w2"
                      for line in range(int(held[i]) * size, int(held[i]) * size + size) if 2 <= line < n + 2}
        self.assertTrue(held_by_w2, "w2 held no block when it was killed")
        flying = redis.cli("HGETALL", "mailshot:{c}:flight").split()
        flying_w2 = {flying[i] for i in range(0, len(flying), 2) if flying[i + 1] == "w2"}
        self.assertLessEqual(flying_w2, held_by_w2, "a row in flight that w2 did not hold")
        procs["w4"] = self.worker(script, smtp, redis, "w4")
        outs = {}
        for name in ("w1", "w3", "w4"):
            out, err = procs[name].communicate(timeout=300)
            outs[name] = out + err
            self.assertEqual(procs[name].returncode, 0, f"{name}: {out}{err}")
        self.assertLess(killed_at, n, "every row was done before the kill")
        rows, text = self.merged(script, redis)
        # every CSV line once, in line order
        self.assertEqual([int(r["line"]) for r in rows], list(range(2, n + 2)))
        statuses = collections.Counter(r["status"] for r in rows)
        self.assertEqual(set(statuses) - {"sent", "in-flight"}, set(), statuses)
        inflight = [r for r in rows if r["status"] == "in-flight"]
        # the rows w2 had marked in flight when it died, and only those, are the in-flight ones,
        # naming w2; the rows it had only reserved (read ahead, not started) were sent by another
        self.assertEqual({r["line"] for r in inflight}, flying_w2)
        by_line = {r["line"]: r for r in rows}
        for line in held_by_w2 - flying_w2:
            self.assertEqual(by_line[line]["status"], "sent", by_line[line])
        # w2's 16 tasks and the outcomes not yet sent to Redis (sent with each claim batch and
        # every 0.1 s): some tens; loose for a loaded machine
        self.assertLessEqual(len(inflight), 200, "more in flight than w2's tasks")
        for r in inflight:
            self.assertIn("worker w2", r["response"])
        got = self.received(log)
        twice = {a: c for a, c in got.items() if c > 1}
        self.assertEqual(twice, {}, "received twice")
        for r in rows:
            if r["status"] == "sent":
                self.assertEqual(got[r["email"]], 1, r)
        # each survivor's own report holds the rows it did; together with Redis's view of w2's
        local = collections.Counter()
        for name in ("w1", "w3", "w4"):
            for r in read_report(self.path(f"{name}.csv")):
                local[r["line"]] += 1
        self.assertEqual(max(local.values()), 1)
        # the status command agrees
        st = self.run_mailshot("cluster", "status", script, "--cluster", redis.url)
        self.assertEqual(st.returncode, 0, st.stderr)
        self.assertIn(f"{n}/{n} rows final: {statuses['sent']} sent", st.stdout)
        self.assertRegex(st.stdout, r"w2 .* dead")
        print(f"\n[cluster] {n} recipients, 3 workers + 1 after a kill -9: {statuses['sent']} sent, "
              f"{len(inflight)} in-flight (w2 held them), 0 received twice", file=sys.stderr)

    @skip_under_valgrind("a kill -9 and a lease to wait for; Lua-side logic")
    def test_a_dead_workers_retry_queue_is_taken_over_and_sent_once(self):
        script = self.campaign(20, extra='retry = { first = "60s" },')
        with open(os.path.join(os.path.dirname(script), "list.csv"), "a") as f:
            f.write("soft1@example.com,S1\r\nsoft2@example.com,S2\r\n")
        redis = self.start_redis()
        fail = self.path("softfail")
        open(fail, "w").close()
        smtp, log = self.start_sink(softfail=fail)
        p = self.worker(script, smtp, redis, "w1")
        # the 20 sent, the two soft ones waiting in w1's retry queue (a minute away)
        wait_for(lambda: self.done_count(redis) == 20 and redis.cli("HLEN", "mailshot:{c}:retry").strip() == "2",
                 timeout=scaled(30, 120), what="20 done and 2 deferred")
        self.assertIsNone(p.poll())
        p.send_signal(signal.SIGKILL)
        p.communicate()
        os.remove(fail)
        time.sleep(1.2)                                  # w1's lease runs out
        p = self.worker(script, smtp, redis, "w2")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        rows, _ = self.merged(script, redis)
        self.assertEqual(len(rows), 22)
        self.assertEqual({r["status"] for r in rows}, {"sent"}, rows)
        got = self.received(log)
        self.assertEqual(got["soft1@example.com"], 1)
        self.assertEqual(got["soft2@example.com"], 1)
        self.assertEqual(max(got.values()), 1)
        self.assertEqual(sum(got.values()), 22)

    def dead_worker_holding(self, redis, in_flight, blocks):
        """Redis as a worker w0 leaves it when killed: the blocks of lines it held (the campaign's
        blocks are 4 lines: cluster.read_ahead), the lines it had marked in flight, and a lease that
        ran out long ago; the next worker gets the block after them."""
        for b in blocks:
            redis.cli("HSET", "mailshot:{c}:blocks", str(b), "w0")
        redis.cli("SET", "mailshot:{c}:cursor", str(max(blocks) + 1))
        for line in in_flight:
            redis.cli("HSET", "mailshot:{c}:flight", str(line), "w0")
        redis.cli("ZADD", "mailshot:{c}:alive", "0", "w0")
        redis.cli("HSET", "mailshot:{c}:workers", "w0", "running\t0\t")

    def test_a_dead_workers_in_flight_rows_are_reported_and_its_reserved_rows_sent(self):
        script = self.campaign(10, cluster="read_ahead = 4")
        redis = self.start_redis()
        smtp, log = self.start_sink()
        # blocks 0 and 1: lines 2-7 (u0-u5), u1 and u5 in flight; block 2 (u6-u9) goes to w1
        self.dead_worker_holding(redis, in_flight=[3, 7], blocks=[0, 1])
        p = self.worker(script, smtp, redis, "w1")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        rows, _ = self.merged(script, redis)
        by_email = {r["email"]: r for r in rows}
        self.assertEqual(len(rows), 10)
        for e in ("u1@example.com", "u5@example.com"):
            self.assertEqual(by_email[e]["status"], "in-flight", by_email[e])
            self.assertIn("worker w0", by_email[e]["response"])
        got = self.received(log)
        self.assertEqual(got["u1@example.com"] + got["u5@example.com"], 0, "an in-flight row was sent again")
        for e in ("u0@example.com", "u2@example.com", "u6@example.com"):   # w0's not started, so sent; w1's own
            self.assertEqual(by_email[e]["status"], "sent", by_email[e])
            self.assertEqual(got[e], 1)
        self.assertEqual(sum(got.values()), 8)
        self.assertEqual(redis.cli("HLEN", "mailshot:{c}:flight").strip(), "0", "in-flight marks left behind")
        self.assertEqual(redis.cli("HLEN", "mailshot:{c}:blocks").strip(), "0", "blocks left held")

    @valgrind_redundant("its C paths are test_a_dead_workers_in_flight_rows_are_reported_and_its_reserved_rows_sent's")
    def test_a_worker_started_again_under_its_name_takes_what_its_earlier_run_held(self):
        # a fixed name (--worker, cluster.worker) run again after kill -9: its earlier run's blocks are
        # swept like a dead worker's, though the name is alive again
        script = self.campaign(10, cluster="read_ahead = 4")
        redis = self.start_redis()
        smtp, log = self.start_sink()
        self.dead_worker_holding(redis, in_flight=[3, 7], blocks=[0, 1])
        p = self.worker(script, smtp, redis, "w0")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        rows, _ = self.merged(script, redis)
        by_email = {r["email"]: r for r in rows}
        for e in ("u1@example.com", "u5@example.com"):
            self.assertEqual(by_email[e]["status"], "in-flight", by_email[e])
            self.assertIn("worker w0 (earlier run)", by_email[e]["response"])
        got = self.received(log)
        self.assertEqual(got["u1@example.com"] + got["u5@example.com"], 0, "an in-flight row was sent again")
        self.assertEqual(sorted(e for e in got), sorted(f"u{i}@example.com" for i in (0, 2, 3, 4, 6, 7, 8, 9)))
        self.assertEqual(max(got.values()), 1)
        self.assertEqual(redis.cli("HLEN", "mailshot:{c}:blocks").strip(), "0", "blocks left held")

    @valgrind_redundant("Lua-side logic; test_a_dead_workers_in_flight_rows_are_reported_and_its_reserved_rows_sent's C paths")
    def test_a_worker_stopped_by_limit_leaves_the_rows_it_did_not_read_to_the_next(self):
        # --limit stops a worker's reading inside a block (and with the next block asked for ahead):
        # the lines it did not read are sent by the next worker, none lost
        script = self.campaign(40, cluster="read_ahead = 4")
        redis = self.start_redis()
        smtp, log = self.start_sink()
        p = self.worker(script, smtp, redis, "w1", "--limit", "5")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        first = sum(self.received(log).values())
        self.assertLess(first, 40)
        p = self.worker(script, smtp, redis, "w2")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        rows, _ = self.merged(script, redis)
        self.assertEqual([r["status"] for r in rows], ["sent"] * 40, [r for r in rows if r["status"] != "sent"])
        got = self.received(log)
        self.assertEqual(sorted(got), sorted(f"u{i}@example.com" for i in range(40)))
        self.assertEqual(max(got.values()), 1)

    @valgrind_redundant("its C paths are test_a_dead_workers_in_flight_rows_are_reported_and_its_reserved_rows_sent's")
    def test_resend_in_flight_sends_a_dead_workers_in_flight_rows_again(self):
        script = self.campaign(10, cluster="read_ahead = 4")
        redis = self.start_redis()
        smtp, log = self.start_sink()
        self.dead_worker_holding(redis, in_flight=[3, 7], blocks=[0, 1])
        p = self.worker(script, smtp, redis, "w1", "--resend-in-flight")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        rows, _ = self.merged(script, redis)
        self.assertEqual([r["status"] for r in rows], ["sent"] * 10, rows)
        got = self.received(log)
        self.assertEqual(sorted(got), sorted(f"u{i}@example.com" for i in range(10)))
        self.assertEqual(max(got.values()), 1)

    def test_fingerprint_mismatch_is_refused_naming_both(self):
        script = self.campaign(20)
        redis = self.start_redis()
        smtp, log = self.start_sink()
        p = self.worker(script, smtp, redis, "w1")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        stored = redis.cli("HGET", "mailshot:{c}:meta", "fingerprint").strip()
        self.assertRegex(stored, r"^[0-9a-f]{64}$")
        with open(os.path.join(os.path.dirname(script), "list.csv"), "a") as f:
            f.write("late@example.com,Late\r\n")
        before = sum(self.received(log).values())
        p = self.worker(script, smtp, redis, "w2")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 2, out + err)
        self.assertIn("differ from the ones the cluster started with", err)
        self.assertIn(f"in Redis {stored}", err)
        self.assertRegex(err, r"fingerprint here [0-9a-f]{64}")
        self.assertEqual(sum(self.received(log).values()), before, "the refused worker sent something")
        self.assertFalse(os.path.exists(self.path("w2.csv")), "a refused worker wrote a report")

    @skip_under_valgrind("one connection refused; Lua-side logic the two valgrind cases cover")
    def test_redis_unreachable_refuses_to_start(self):
        script = self.campaign(5)
        smtp, log = self.start_sink()
        url = f"redis://127.0.0.1:{free_port()}/0"
        r = self.run_mailshot("run", script, "--send", "--cluster", url, "--report", self.path("r.csv"),
                              env={"SMTP_SERVER": smtp})
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn(f"Redis {url}: cannot connect", r.stderr)
        self.assertEqual(sum(self.received(log).values()), 0)
        self.assertFalse(os.path.exists(self.path("r.csv")))
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(script), "c.journal")))

    @skip_under_valgrind("a timed kill of redis-server mid-run")
    def test_redis_killed_mid_run_stops_finishes_in_flight_and_says_how_to_continue(self):
        n = 1500
        script = self.campaign(n, extra='rate = "1000/s",')
        redis = self.start_redis(extra_conf="appendonly yes\nappendfsync always\n")
        smtp, log = self.start_sink()
        p = self.worker(script, smtp, redis, "w1")
        wait_for(lambda: self.done_count(redis) >= 300 or p.poll() is not None, timeout=60, interval=0.02,
                 what="300 rows done")
        redis.kill()
        out, err = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 75, out + err)
        self.assertIn("Redis lost", err)
        self.assertIn("Redis was lost", out)
        self.assertIn(f"mailshot run {script} --send --cluster {redis.url} --worker w1", out)
        # nothing lost: every message the receiver got is in the worker's report as sent
        got = self.received(log)
        mine = {r["email"]: r["status"] for r in read_report(self.path("w1.csv"))}
        self.assertEqual({a for a in got}, {a for a, s in mine.items() if s == "sent"})
        self.assertLess(len(got), n)
        # Redis back (its append-only file kept what it had): the same command finishes the
        # campaign; the rows whose outcome could not reach Redis are reported in-flight, none sent twice
        redis.restart()                                  # the append-only file brings the data back
        time.sleep(1.2)                                  # w1's lease runs out
        p = self.worker(script, smtp, redis, "w1")
        out, err = p.communicate(timeout=120)
        self.assertIn(p.returncode, (0,), out + err)
        rows, _ = self.merged(script, redis)
        self.assertEqual([int(r["line"]) for r in rows], list(range(2, n + 2)))
        got = self.received(log)
        self.assertEqual({a: c for a, c in got.items() if c > 1}, {})
        self.assertEqual(len(got), sum(1 for r in rows if r["status"] == "sent") + sum(
            1 for r in rows if r["status"] == "in-flight" and got[r["email"]] == 1))

    @skip_under_valgrind("Lua-side logic; the two valgrind cases cover the C paths")
    def test_a_redis_that_forgot_the_campaign_is_not_started_over(self):
        script = self.campaign(3)
        redis = self.start_redis()
        smtp, log = self.start_sink()
        p = self.worker(script, smtp, redis, "w1")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        redis.kill()
        redis.restart()                                  # without persistence: empty
        p = self.worker(script, smtp, redis, "w1")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 2, out + err)
        self.assertIn("has no trace of campaign c", err)
        self.assertIn("--force starts the campaign over", err)
        self.assertEqual(sum(self.received(log).values()), 3)
        p = self.worker(script, smtp, redis, "w1", "--force")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        self.assertEqual(sum(self.received(log).values()), 6)

    def test_status_and_report_of_a_finished_campaign(self):
        script = self.campaign(12, dup=True)
        redis = self.start_redis()
        smtp, log = self.start_sink()
        p = self.worker(script, smtp, redis, "alpha")
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        st = self.run_mailshot("cluster", "status", script, "--cluster", redis.url)
        self.assertEqual(st.returncode, 0, st.stdout + st.stderr)
        self.assertIn("c: 13/13 rows final: 12 sent, 0 failed, 1 skipped, 0 in-flight", st.stdout)
        self.assertIn("workers: 0 alive, 0 dead, 1 finished", st.stdout)
        self.assertRegex(st.stdout, r"alpha +\d+@\S+ +sent 12  failed 0  skipped 1")
        rows, text = self.merged(script, redis)
        self.assertIn("13 rows: 12 sent, 0 failed, 1 skipped", text)
        self.assertEqual([int(r["line"]) for r in rows], list(range(2, 15)))
        # the same columns and the same rows as the run's own report
        own = read_report(self.path("alpha.csv"))
        with open(self.path("merged.csv"), newline="") as f, open(self.path("alpha.csv"), newline="") as g:
            self.assertEqual(f.readline(), g.readline())
        self.assertEqual(rows, own)
        self.assertEqual(rows[-1]["status"], "skipped")
        self.assertIn("duplicate", rows[-1]["response"])
        # a campaign Redis has never seen
        other = self.run_mailshot("cluster", "status", script, "--cluster", redis.url.replace("/0", "/3"))
        self.assertEqual(other.returncode, 1)
        self.assertIn("no such campaign in Redis", other.stdout)

    @skip_under_valgrind("Lua-side logic; the two valgrind cases cover the C paths")
    def test_password_from_the_environment_never_the_url(self):
        script = self.campaign(3)
        redis = self.start_redis(password="s3cret-redis")
        smtp, log = self.start_sink()
        r = self.run_mailshot("run", script, "--send", "--cluster", redis.url, "--report", self.path("r.csv"),
                              env={"SMTP_SERVER": smtp, "MAILSHOT_REDIS_PASSWORD": None})
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn("NOAUTH", r.stderr)
        self.assertIn("MAILSHOT_REDIS_PASSWORD", r.stderr)
        r = self.run_mailshot("run", script, "--send", "--cluster", f"redis://u:pw@127.0.0.1:{redis.port}/0",
                              "--report", self.path("r.csv"), env={"SMTP_SERVER": smtp})
        self.assertEqual(r.returncode, 2)
        self.assertIn("a password in the URL is refused", r.stderr)
        self.assertNotIn(":pw@", r.stderr)
        r = self.run_mailshot("run", script, "--send", "--cluster", redis.url, "--report", self.path("r.csv"),
                              env={"SMTP_SERVER": smtp, "MAILSHOT_REDIS_PASSWORD": "s3cret-redis"})
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(sum(self.received(log).values()), 3)
        self.assertNotIn("s3cret-redis", r.stdout + r.stderr)
        with open(self.path("pw"), "w") as f:
            f.write("s3cret-redis\n")
        st = self.run_mailshot("cluster", "status", script, "--cluster", redis.url, "--redis-password-file",
                               self.path("pw"), env={"MAILSHOT_REDIS_PASSWORD": None})
        self.assertEqual(st.returncode, 0, st.stdout + st.stderr)
        self.assertIn("3 sent", st.stdout)

    @skip_under_valgrind("the TLS client is test_redis's; Lua-side logic here")
    def test_tls_and_an_acl_user(self):
        redis = self.start_redis(tls=True, user="mailer", password="acl-pw-1")
        self.assertTrue(redis.url.startswith("rediss://mailer@127.0.0.1:"))
        script = self.campaign(4, cluster=f'ca_file = "{redis.ca_file}",')
        smtp, log = self.start_sink()
        p = self.worker(script, smtp, redis, "w1", env={"MAILSHOT_REDIS_PASSWORD": "acl-pw-1"})
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 0, out + err)
        self.assertEqual(sum(self.received(log).values()), 4)
        self.assertEqual(redis.cli("HGET", "mailshot:{c}:counts", "sent").strip(), "4")
        # without the CA the certificate does not verify: refused, nothing sent
        script = self.campaign(4)
        p = self.worker(script, smtp, redis, "w2", env={"MAILSHOT_REDIS_PASSWORD": "acl-pw-1"})
        out, err = p.communicate(timeout=scaled(60, 300))
        self.assertEqual(p.returncode, 2, out + err)
        self.assertIn("cannot connect", err)
        self.assertEqual(sum(self.received(log).values()), 4)

    @skip_under_valgrind("the one-machine path every other test file runs under valgrind")
    def test_without_cluster_nothing_changes_and_redis_is_not_used(self):
        script = self.campaign(5)
        redis = self.start_redis()
        smtp, log = self.start_sink()
        r = self.run_mailshot("run", script, "--send", "--report", self.path("r.csv"), env={"SMTP_SERVER": smtp})
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertTrue(os.path.exists(self.path("c.journal")), "the one-machine journal is kept as before")
        self.assertEqual(redis.cli("DBSIZE").strip(), "0")
        self.assertEqual(sum(self.received(log).values()), 5)
        # --resume and --cluster do not go together: the cluster's state is in Redis
        r = self.run_mailshot("run", script, "--send", "--resume", "--cluster", redis.url, "--report", self.path("r.csv"),
                              env={"SMTP_SERVER": smtp})
        self.assertEqual(r.returncode, 2)
        self.assertIn("--resume does not go with --cluster", r.stderr)
