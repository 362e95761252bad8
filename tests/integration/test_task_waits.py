"""A task parked in a C primitive owns its wake-up (issue 10, item 10).

core.wake on a task waiting in relay:send, a DNS query or util.wait_signal used to resume it at
once; the task then ended and was collected, and the primitive's completion later pushed its
results onto the freed thread (heap-use-after-free under ASan).  Now core.wake refuses such a
task with a clear error, the task stays parked until its own completion resumes it, and the
thread stays anchored while the C side holds it.  Each script runs a full collection while the
completion is still on its way, so a regression is a sanitizer report (or a valgrind error)."""
import os
import re
import unittest

from tests.integration.harness import MailshotTestCase, scaled

PRELUDE = r"""
local mailshot = require "mailshot"
local core = mailshot.core
-- wait (bounded) until cond() holds
local function wait_until(cond, seconds)
  local t0 = core.now()
  while not cond() do
    if core.now() - t0 > seconds then error("timed out waiting", 2) end
    core.sleep(0.02)
  end
end
-- a stray wake of t: must be refused; prints what happened
local function stray_wake(t)
  local ok, err = pcall(core.wake, t, "stray")
  print("wake:", ok and "accepted" or "refused", ok and "" or err)
  if ok then return end   -- (a task already woken: resuming it as well would only blur the report)
  local ok2, err2 = pcall(coroutine.resume, t, "stray")
  print("resume:", ok2 and "accepted" or "refused", ok2 and "" or err2)
end
-- full collections, letting the other tasks run in between (a woken task ends, then is freed)
local function collect() for _ = 1, 3 do core.sleep(0.01); collectgarbage("collect") end end
"""


class TaskWaitTests(MailshotTestCase):
    def exec_script(self, body, env=None, timeout=None):
        path = self.path("script.lua")
        with open(path, "w") as f:
            f.write(PRELUDE + body)
        return self.run_mailshot("exec", path, env=env, timeout=timeout)

    def parked_query(self, timeout, rest):
        """A silent DNS server, and a script whose task t is parked in r:query (its answer goes to
        got) with `timeout` seconds to wait, then `rest`: (the server, the finished process)."""
        dns = self.start_silent_dns()
        p = self.exec_script(f"""
local resolver = require "mailshot.resolver"
local r = assert(resolver.new {{ servers = os.getenv "DNS_SERVER", timeout = {timeout}, tries = 1 }})
local got
local t = core.spawn(function() got = table.pack(r:query("mx.example.com", "MX")) end)
core.sleep(0.1)
""" + rest, env={"DNS_SERVER": dns.address})
        return dns, p

    def assertRefused(self, out, what):
        self.assertRegex(out, r"wake:\s+refused\s+.*core\.wake: the task is waiting in " + re.escape(what)
                         + "; only its completion can wake it")
        self.assertRegex(out, r"resume:\s+refused\s+.*resumed by its scheduler only")

    def test_a_stray_wake_of_a_task_in_relay_send_is_refused_and_the_send_completes(self):
        # the greeting comes late: the task is parked in relay:send while the script tries to
        # wake it and collects garbage; then the message goes through and the task gets its result
        delay = scaled(1.0, 3.0)
        srv = self.start_smtpd(delay=[f"GREETING:{delay}"])
        p = self.exec_script(r"""
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none", timeout = 30 }
local result
local t = core.spawn(function()
  result = relay:send { from = "a@example.com", to = "b@example.com", data = "Subject: x\r\n\r\nhi\r\n" }
end)
core.sleep(0.2)                     -- the task runs and parks in relay:send
stray_wake(t)
t = nil
collect()
-- wait for the send's own result (a stray "stray" is not one): the reply must have come
wait_until(function() return type(result) == "table" end, 60)
print("result:", type(result) == "table" and tostring(result.ok) or tostring(result), result.code)
collect()
relay:close()
""", env={"SMTP_SERVER": srv.address})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRefused(p.stdout, "relay:send")
        self.assertRegex(p.stdout, r"result:\s+true\s+250")
        self.assertEqual(srv.wait_for_messages(1)[0]["rcpt_tos"], ["b@example.com"])

    def test_a_stray_wake_of_a_task_in_a_dns_query_is_refused_and_the_answer_is_its_own(self):
        # a server that never answers: the query ends with a timeout after the stray wake and
        # the collection; the task gets that timeout, not the stray values
        dns, p = self.parked_query(0.5, r"""
stray_wake(t)
t = nil
collect()
-- wait for the query's own answer (a stray "stray" is not one): the timeout must have come
wait_until(function() return got ~= nil and got[1] ~= "stray" end, 30)
print("answer:", tostring(got[1]), tostring(got[2]))
collect()
r:close()
""")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRefused(p.stdout, "resolver:query")
        self.assertRegex(p.stdout, r"answer:\s+nil\s+timeout")
        self.assertGreaterEqual(len(dns.queries()), 1)

    def test_closing_the_resolver_under_a_parked_query_wakes_its_task_with_cancelled(self):
        # the query's only completion is the cancellation: the task gets it (it used to stay
        # parked for ever), and a collection before and after touches nothing freed
        dns, p = self.parked_query(5, r"""
t = nil                             -- only the C side holds the parked task
collect()
r:close()
wait_until(function() return got ~= nil end, 30)
collect()
print("answer:", tostring(got[1]), got[2], got[3])
""")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"answer:\s+nil\s+cancelled\s+the resolver was closed")

    def test_a_stray_wake_of_a_task_waiting_for_a_signal_is_refused_and_the_signal_wakes_it(self):
        p = self.exec_script(r"""
local util = require "mailshot.util"
local got
local t = core.spawn(function() got = util.wait_signal() end)
core.sleep(0.1)
stray_wake(t)
t = nil
collect()
local pid = io.open("/proc/self/stat"):read("l"):match("^(%d+)")
assert(os.execute("kill -TERM " .. pid))
wait_until(function() return got == "TERM" end, 30)   -- the signal itself, read from the loop
print("signal:", got)
util.stop_signals()
""")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRefused(p.stdout, "util.wait_signal")
        self.assertRegex(p.stdout, r"signal:\s+TERM")


if __name__ == "__main__":
    unittest.main()
