"""Cluster mode (issue 15) with the other senders: direct delivery (MX lookups through a dnsmasq on
loopback, delivery to SMTP servers on 127.0.0.x, as test_direct does), mailshot.fallback of a relay
and direct delivery or of two relays, and a campaign's own send function.

A row's message may only go out once its in-flight mark is in Redis.  mailshot's own senders get
the mark as a gate (msg.gate) and pass it on to every relay:send they make; direct delivery does so
for each MX host it tries, a fallback for each path; a campaign's own function is called once Redis
has answered.  Two workers share each campaign: every recipient is received exactly once, and the
merged report (`mailshot cluster report`) has every row, with the status counts of `mailshot
cluster status`.  Three cases stop a worker: stalled past its lease (SIGSTOP), a worker whose sender
is a direct sender, or fallback{relay, direct}, must not deliver the rows the other took over
meanwhile, which only the gate stops (the runner hands the message to the sender with the mark,
before Redis refuses it); killed with kill -9 while delivering directly, its rows in flight are
reported, none sent twice.

Black-box, as test_cluster_stall: no Redis key is read or written here.  What is observed: the
receivers (each SMTP server's stored messages and session log), each worker's own report, exit
status and stderr, `mailshot cluster status` and `mailshot cluster report`."""
import collections
import json
import os
import re
import signal

from tests.integration.harness import (free_port, read_report, sanitizer_errors, scaled,
                                       valgrind_redundant, wait_for, write_csv)
from tests.integration import test_cluster

# One script for both workers of a test (one fingerprint); its environment picks the sender:
#   SEND=direct        a direct sender (DOMAIN_RATE: a rate for each recipient domain, which slows
#                      a worker after its rows' marks: they wait in flight for their domain's turn)
#   SEND=relay,direct  mailshot.fallback { relay RELAY, direct sender (DOMAIN_RATE as above) }
#   SEND=relay,relay   mailshot.fallback { relay RELAY, relay RELAY2 }
#   SEND=function      the campaign's own function around relay RELAY (not gated)
CAMPAIGN = r"""
local mailshot = require "mailshot"
-- READY (a worker's): say so in that file, then wait for the file GO: both workers start together
local ready = os.getenv "READY"
if ready then
  io.open(ready, "w"):close()
  local deadline = os.time() + 60
  while os.time() < deadline do
    local go = io.open(os.getenv "GO")
    if go then go:close(); break end
    os.execute "sleep 0.02"
  end
end
local function direct(rate)
  return mailshot.direct_sender { dns = os.getenv "DNS", port = tonumber(os.getenv "MX_PORT"), timeout = 10,
                                  dns_timeout = 2, helo = "mailshot.test", allow_private = true, rate = rate }
end
local function relay(var)
  return mailshot.relay { server = os.getenv(var), tls = "none", timeout = 10 }
end
local mode, send = os.getenv "SEND"
if mode == "direct" then
  send = direct(os.getenv "DOMAIN_RATE")
elseif mode == "relay,direct" then
  send = mailshot.fallback { relay "RELAY", direct() }
elseif mode == "relay,relay" then
  send = mailshot.fallback { relay "RELAY", relay "RELAY2" }
elseif mode == "function" then
  local r = relay "RELAY"
  send = function(msg, row) return r:send(msg) end
else
  error("SEND: " .. tostring(mode))
end
return mailshot.campaign {
  recipients = "list.csv", from = "news@acme.example", subject = "Hi {{name}}", text = "Hello {{name}}",
  send = send, concurrency = 16, cluster = { lease = os.getenv "LEASE" },
}
"""

# Three recipient domains: a.test's MX is the server on 127.0.0.2; b.test's first MX (127.0.0.9)
# is dead, so each of its messages is tried there and then on its second MX, 127.0.0.3, with the
# same gate; c.test's MX is 127.0.0.3 too (another pool of sessions to the same server).
ZONE = {
    "mx": [("a.test", "mx.a.test", 10), ("b.test", "mx1.b.test", 5), ("b.test", "mx2.b.test", 10),
           ("c.test", "mx.c.test", 10)],
    "a": [("mx.a.test", "127.0.0.2"), ("mx1.b.test", "127.0.0.9"), ("mx2.b.test", "127.0.0.3"),
          ("mx.c.test", "127.0.0.3")],
}
DOMAINS = ("a.test", "b.test", "c.test")
MX_OF = {"a.test": "mx.a.test", "b.test": "mx2.b.test", "c.test": "mx.c.test"}
SERVER_OF = {"a.test": "127.0.0.2", "b.test": "127.0.0.3", "c.test": "127.0.0.3"}

TAKEN_OVER = re.compile(r"another worker\b.*\bover\b")

# A worker's rate for each domain: "delay 100ms" lets about 10 messages a second through per domain,
# so its 16 tasks hold rows marked in flight, waiting for their turn, most of the time.
SLOW = "delay 100ms"


class ClusterSenderTests(test_cluster.ClusterCase):
    # -- setting up ------------------------------------------------------------------------------

    def campaign(self, n):
        """The campaign folder's list (n recipients, the three domains in turn) and script."""
        d = self.path("camp")
        os.makedirs(d, exist_ok=True)
        self.emails = [f"u{i}@{DOMAINS[i % 3]}" for i in range(n)]
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [[e, f"N{i}"] for i, e in enumerate(self.emails)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        return os.path.join(d, "c.lua"), self.emails

    def start_mx(self):
        """The MX hosts (127.0.0.2 and 127.0.0.3, one port) and the DNS that names them."""
        self.mx, port = self.start_smtpd_many(["127.0.0.2", "127.0.0.3"])
        dns = self.start_dns(ZONE)
        return {"DNS": dns.address, "MX_PORT": str(port)}

    def mx_received(self):
        """Every recipient the MX hosts stored a message for -> Counter, and where each went."""
        return self.received(self.mx)

    def received(self, servers):
        """Every recipient these SMTP servers stored a message for -> Counter, and where each went."""
        got, where = collections.Counter(), collections.defaultdict(set)
        for srv in servers:
            try:
                names = [f for f in os.listdir(srv.maildir) if f.endswith(".json")]
            except FileNotFoundError:
                continue
            for name in names:
                with open(os.path.join(srv.maildir, name), encoding="utf-8") as f:
                    for rcpt in json.load(f)["rcpt_tos"]:
                        got[rcpt] += 1
                        where[rcpt].add(srv.host)
        return got, where

    def rcpts_offered(self, srv):
        """The recipients of every RCPT command an SMTP server received -> Counter."""
        return collections.Counter(line.split(":", 1)[1].strip().split(" ")[0].strip("<>")
                                   for line in srv.log_lines() if line[:4].upper() == "RCPT")

    # -- running ---------------------------------------------------------------------------------

    def finish(self, proc, name):
        """Wait (bounded) for a worker; exit status 0 and no sanitizer report -> its output."""
        out, err = proc.communicate(timeout=scaled(120, 600))
        self.assertEqual(proc.returncode, 0, f"{name}: {out}{err}")
        self.assertEqual(sanitizer_errors(err), [], f"{name}: {err}")
        return out, err

    def two_workers(self, script, env, smtp="127.0.0.1:1"):
        """w1 and w2 on the campaign, let go together once both have loaded the script (each would
        take the whole campaign if it started that much sooner), both to their end -> their outputs."""
        self.env = env
        go = self.path("go")
        procs = {name: self.worker(script, smtp, self.redis, name, env=dict(env, READY=self.path(f"ready-{name}"), GO=go))
                 for name in ("w1", "w2")}
        wait_for(lambda: all(os.path.exists(self.path(f"ready-{name}")) or p.poll() is not None
                             for name, p in procs.items()), timeout=scaled(30, 120), what="both workers started")
        open(go, "w").close()
        return {name: self.finish(p, name) for name, p in procs.items()}

    # `cluster status` and `cluster report` load the script too: with the workers' environment
    def merged(self, script, redis):
        r = self.run_mailshot("cluster", "report", script, "--cluster", redis.url, "--report", self.path("merged.csv"),
                              env=self.env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return read_report(self.path("merged.csv")), r.stdout

    def status(self, script):
        st = self.run_mailshot("cluster", "status", script, "--cluster", self.redis.url, env=self.env)
        self.assertEqual(st.returncode, 0, st.stdout + st.stderr)
        return st.stdout

    def worker_sent(self, status, name):
        m = re.search(rf"(?m)^  {name} .* sent (\d+)  failed (\d+)  skipped (\d+)  in-flight (\d+)", status)
        self.assertIsNotNone(m, status)
        return [int(x) for x in m.groups()]

    # -- the checks of a campaign every row of which was sent ------------------------------------

    def check_all_sent_once(self, script, emails, got, via):
        """The merged report has every line once, in order, sent via `via`; the receivers got each
        recipient exactly once; each worker's own report holds the rows it did (together: each
        line once) and `cluster status` agrees with them -> the merged rows."""
        n = len(emails)
        rows, text = self.merged(script, self.redis)
        self.assertEqual([int(r["line"]) for r in rows], list(range(2, n + 2)))
        self.assertEqual([r["email"] for r in rows], emails)
        self.assertEqual({(r["status"], r["via"]) for r in rows}, {("sent", via)},
                         [r for r in rows if (r["status"], r["via"]) != ("sent", via)][:5])
        self.assertIn(f"{n} rows: {n} sent, 0 failed, 0 skipped", text)
        self.assertEqual({a: c for a, c in got.items() if c != 1}, {}, "received twice")
        self.assertEqual(sorted(got), sorted(emails), "not received, or received but not in the list")
        st = self.status(script)
        self.assertIn(f"c: {n}/{n} rows final: {n} sent, 0 failed, 0 skipped, 0 in-flight (possibly sent); "
                      "0 deferred; 0 in flight now", st)
        self.assertIn("workers: 0 alive, 0 dead, 2 finished", st)
        lines = collections.Counter()
        for name in ("w1", "w2"):
            own = read_report(self.path(f"{name}.csv"))
            self.assertEqual({r["status"] for r in own} - {"sent"}, set(), own)
            lines.update(r["line"] for r in own)
            self.assertEqual(self.worker_sent(st, name), [len(own), 0, 0, 0])
            self.assertGreater(len(own), 0, f"{name} sent nothing: not a campaign shared by two workers")
        self.assertEqual(sorted(lines.elements(), key=int), [str(i) for i in range(2, n + 2)])
        return rows

    def check_a_stalled_worker_does_not_send_the_rows_another_took_over(self, env, via):
        """As test_cluster_stall, but the stalled worker's sender passes the gate on: the runner hands
        the message to it together with the row's mark, before Redis has answered, so once the mark is
        refused nothing but the gate the message carries keeps it from the receiver."""
        n = 200
        script, emails = self.campaign(n)
        env = self.env = dict(env, LEASE="1s")

        # A alone, slowed by its domains' rate: its tasks hold rows marked in flight, waiting for their
        # domain's turn, and its read-ahead queue is full of rows it only reserved
        a = self.worker(script, "127.0.0.1:1", self.redis, "wA", env=dict(env, DOMAIN_RATE=SLOW))
        self.addCleanup(lambda: a.poll() is None and a.send_signal(signal.SIGCONT))   # never left stopped
        wait_for(lambda: sum(self.mx_received()[0].values()) >= 16 or a.poll() is not None,
                 timeout=scaled(60, 300), what="the MX hosts have some of wA's messages")
        self.assertIsNone(a.poll(), "wA ended before it could be stopped")
        a.send_signal(signal.SIGSTOP)
        self.assertLess(sum(self.mx_received()[0].values()), n - 40, "wA was too far on: nothing left to take over")

        # B: its rows, then A's once A's lease ran out (A is stopped: no heartbeat)
        b = self.worker(script, "127.0.0.1:1", self.redis, "wB", env=env)
        self.finish(b, "wB")
        self.assertIsNone(a.poll(), "wA is stopped: it cannot have ended")
        self.assertRegex(self.status(script), r"(?m)^  wA .* dead\b")
        mine_b = read_report(self.path("wB.csv"))
        self.assertEqual({r["status"] for r in mine_b} - {"sent", "in-flight"}, set(), mine_b)
        b_sent = {r["line"] for r in mine_b if r["status"] == "sent"}
        b_flight = {r["line"] for r in mine_b if r["status"] == "in-flight"}
        for r in mine_b:
            if r["status"] == "in-flight":
                self.assertIn("worker wA", r["response"], r)
        self.assertTrue(b_flight, "wA had no row in flight when stopped: the scenario did not happen")

        # A again: the rows it had marked go out; the ones B took over meanwhile get refused marks, and
        # their messages, handed to the sender with the mark, must not reach a receiver
        a.send_signal(signal.SIGCONT)
        out_a, err_a = self.finish(a, "wA")
        self.assertRegex(err_a, r"worker wA's lease ran out [\d.]+ s before this heartbeat")
        mine_a = read_report(self.path("wA.csv"))
        self.assertEqual({r["status"] for r in mine_a} - {"sent", "not-started"}, set(), mine_a)
        a_sent = {r["line"] for r in mine_a if r["status"] == "sent"}
        a_refused = {r["line"] for r in mine_a if r["status"] == "not-started"}
        self.assertTrue(a_refused, "wA started no row B had taken over: no mark of it was refused")
        for r in mine_a:
            if r["status"] == "not-started":
                self.assertRegex(r["response"], TAKEN_OVER, r)
            else:
                self.assertEqual(r["via"], via, r)
        self.assertIn(f"{len(a_refused)} not started", out_a)
        self.assertLessEqual(a_refused, b_sent)
        self.assertLessEqual(b_flight, a_sent)
        self.assertEqual(a_sent & b_sent, set())

        # the MX hosts: everyone exactly once
        got, _ = self.mx_received()
        self.assertEqual({e: c for e, c in got.items() if c > 1}, {}, "received twice")
        self.assertEqual(sorted(got), sorted(emails))
        rows, _ = self.merged(script, self.redis)
        self.assertEqual([int(r["line"]) for r in rows], list(range(2, n + 2)))
        self.assertEqual({(r["status"], r["via"]) for r in rows}, {("sent", via)},
                         [r for r in rows if r["status"] != "sent"])
        st = self.status(script)
        self.assertIn(f"c: {n}/{n} rows final: {n} sent, 0 failed, 0 skipped, 0 in-flight (possibly sent); "
                      "0 deferred; 0 in flight now", st)
        self.assertEqual(self.worker_sent(st, "wA"), [len(a_sent), 0, 0, 0])
        self.assertEqual(self.worker_sent(st, "wB"), [len(b_sent), 0, 0, 0])

    # -- the cases ------------------------------------------------------------------------------

    @valgrind_redundant("test_direct's test_a_dead_first_mx_and_delivery_by_the_second and test_gate's "
                        "test_a_closed_gate_keeps_the_message_from_the_server_until_another_task_opens_it "
                        "(a gate held on the way to an MX host is a relay send's), test_cluster's cases")
    def test_two_workers_delivering_directly_send_every_row_once(self):
        script, emails = self.campaign(300)
        self.redis = self.start_redis()
        env = dict(self.start_mx(), SEND="direct", LEASE="5s")
        self.two_workers(script, env)
        got, where = self.mx_received()
        rows = self.check_all_sent_once(script, emails, got, "direct")
        # delivered by MX lookup: each domain at its (first live) MX host
        for r in rows:
            domain = r["email"].split("@")[1]
            self.assertEqual(r["mx"], MX_OF[domain], r)
            self.assertEqual(where[r["email"]], {SERVER_OF[domain]}, r)

    @valgrind_redundant("test_direct's test_a_5xx_on_rcpt_is_final_and_does_not_fall_back and "
                        "test_relay_then_direct_when_the_relay_is_down, test_gate's cases, test_cluster's cases")
    def test_two_workers_falling_back_from_a_451_relay_to_direct_delivery_send_every_row_once(self):
        script, emails = self.campaign(300)
        self.redis = self.start_redis()
        relay = self.start_smtpd(reject_rcpt=[("@", 451, "4.7.1 try again later")])
        env = dict(self.start_mx(), SEND="relay,direct", LEASE="5s", RELAY=relay.address)
        self.two_workers(script, env)
        got, where = self.mx_received()
        rows = self.check_all_sent_once(script, emails, got, "direct")
        for r in rows:
            self.assertEqual(r["first_response"], "relay: 451 4.7.1 try again later", r)
            self.assertEqual(where[r["email"]], {SERVER_OF[r["email"].split("@")[1]]}, r)
        # each row was offered to the relay once (its gate open by then), refused there, and only then
        # delivered directly
        self.assertEqual(relay.message_count(), 0)
        self.assertEqual(self.rcpts_offered(relay), collections.Counter(emails))

    @valgrind_redundant("test_relay_down's cases (a relay nothing listens on), test_gate's cases, "
                        "test_cluster's cases")
    def test_two_workers_falling_back_from_a_relay_that_is_down_to_another_send_every_row_once(self):
        script, emails = self.campaign(300)
        self.redis = self.start_redis()
        relay = self.start_smtpd()
        down = f"127.0.0.1:{free_port()}"
        self.two_workers(script, {"SEND": "relay,relay", "LEASE": "5s", "RELAY": down, "RELAY2": relay.address})
        rows = self.check_all_sent_once(script, emails, self.received([relay])[0], "relay")
        for r in rows:
            self.assertTrue(r["first_response"].startswith("relay: "), r)
            self.assertIn("refused", r["first_response"], r)

    @valgrind_redundant("test_cluster's test_a_dead_workers_in_flight_rows_are_reported_and_its_reserved_rows_sent "
                        "(the same C paths; an ungated send function is Lua-side logic)")
    def test_two_workers_with_the_campaigns_own_send_function_send_every_row_once(self):
        script, emails = self.campaign(300)
        self.redis = self.start_redis()
        relay = self.start_smtpd()
        self.two_workers(script, {"SEND": "function", "LEASE": "5s", "RELAY": relay.address})
        self.check_all_sent_once(script, emails, self.received([relay])[0], "relay")

    @valgrind_redundant("test_gate's test_a_send_given_an_already_refused_gate_returns_at_once_and_an_open_gate_"
                        "changes_nothing and test_a_refused_gate_ends_the_waiting_send_unsent_and_the_relay_goes_on, "
                        "test_cluster_stall's case")
    def test_a_stalled_worker_delivering_directly_does_not_deliver_the_rows_another_took_over(self):
        self.redis = self.start_redis()
        self.check_a_stalled_worker_does_not_send_the_rows_another_took_over(
            dict(self.start_mx(), SEND="direct"), "direct")

    @valgrind_redundant("test_gate's test_a_send_given_an_already_refused_gate_returns_at_once_and_an_open_gate_"
                        "changes_nothing, test_direct's test_a_5xx_on_rcpt_is_final_and_does_not_fall_back, "
                        "test_cluster_stall's case")
    def test_a_stalled_worker_falling_back_from_a_relay_to_direct_delivery_does_not_deliver_the_rows_another_took_over(self):
        # each refused row's message meets the relay first (a refused gate: a temporary failure, so the
        # fallback goes on), then the direct sender, with the same refused gate
        self.redis = self.start_redis()
        relay = self.start_smtpd(reject_rcpt=[("@", 451, "4.7.1 try again later")])
        self.check_a_stalled_worker_does_not_send_the_rows_another_took_over(
            dict(self.start_mx(), SEND="relay,direct", RELAY=relay.address), "direct")
        # the relay too was offered each row once: not the ones whose marks were refused
        self.assertEqual(relay.message_count(), 0)
        self.assertEqual(self.rcpts_offered(relay), collections.Counter(self.emails))

    @valgrind_redundant("test_cluster's test_a_dead_workers_in_flight_rows_are_reported_and_its_reserved_rows_sent "
                        "and test_direct's cases (a kill -9 adds no C path)")
    def test_a_worker_killed_while_delivering_directly_leaves_its_in_flight_rows_reported_and_none_sent_twice(self):
        n = 300
        script, emails = self.campaign(n)
        self.redis = self.start_redis()
        env = self.env = dict(self.start_mx(), SEND="direct", LEASE="1s")
        w1 = self.worker(script, "127.0.0.1:1", self.redis, "w1", env=env)
        # w2 slowed by its domains' rate: when killed, its tasks hold rows marked in flight
        w2 = self.worker(script, "127.0.0.1:1", self.redis, "w2", env=dict(env, DOMAIN_RATE=SLOW))

        def w2_under_way():
            if w2.poll() is not None:
                return True
            st = self.run_mailshot("cluster", "status", script, "--cluster", self.redis.url, env=env)
            # exit 1: no worker has started the campaign yet
            self.assertIn(st.returncode, (0, 1), st.stdout + st.stderr)
            m = re.search(r"(?m)^  w2 .* sent (\d+) .* in flight now (\d+)", st.stdout)
            return m and int(m.group(1)) >= 5 and int(m.group(2)) > 0
        wait_for(w2_under_way, timeout=scaled(60, 300), interval=0.1, what="w2 has sent some and holds rows in flight")
        self.assertIsNone(w2.poll(), "w2 ended before it could be killed")
        w2.send_signal(signal.SIGKILL)
        w2.communicate()
        self.finish(w1, "w1")

        rows, text = self.merged(script, self.redis)
        self.assertEqual([int(r["line"]) for r in rows], list(range(2, n + 2)))
        statuses = collections.Counter(r["status"] for r in rows)
        self.assertEqual(set(statuses) - {"sent", "in-flight"}, set(), statuses)
        inflight = [r for r in rows if r["status"] == "in-flight"]
        self.assertTrue(inflight, "w2 had no row in flight when killed: the scenario did not happen")
        for r in inflight:
            self.assertIn("worker w2", r["response"], r)
        got, _ = self.mx_received()
        self.assertEqual({e: c for e, c in got.items() if c > 1}, {}, "received twice")
        for r in rows:
            if r["status"] == "sent":
                self.assertEqual(got[r["email"]], 1, r)
                self.assertEqual(r["via"], "direct", r)
        # an in-flight row was sent by w2 (its outcome not yet in Redis) or is one of its tasks' marked
        # rows it had not sent: at most one a task; the rows it had only reserved were sent by w1
        unsent = [r for r in inflight if got[r["email"]] == 0]
        self.assertLessEqual(len(unsent), 16, unsent)
        self.assertEqual(set(got) - set(emails), set())
        self.assertEqual(len(got), statuses["sent"] + len(inflight) - len(unsent))
        st = self.status(script)
        self.assertIn(f"c: {n}/{n} rows final: {statuses['sent']} sent, 0 failed, 0 skipped, "
                      f"{len(inflight)} in-flight (possibly sent)", st)
        self.assertRegex(st, r"(?m)^  w2 .* dead\b")
        self.assertIn(f"{n} rows: {statuses['sent']} sent", text)
