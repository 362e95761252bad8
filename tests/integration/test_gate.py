"""smtp.gate: a send held in its relay's line until someone else says it may go (issue 15).

A cluster worker's message may only reach a server once Redis has the row's in-flight mark
(mailshot.cluster: Cluster:mark returns the gate).  relay:send{..., gate = g} waits in the relay's
line without a session while g is closed; g:open() lets it take its turn, g:refuse(why) ends it
unsent.  Each test runs a Lua script (`mailshot exec`) against a real SMTP server on loopback: the
script itself looks at what the server has logged (its session.log, one line per command received)
and at the relay's stats at the moment it opens or refuses the gate, and prints that, so the order
"nothing reached the server, then the gate opened, then the message arrived" is observed, not
inferred from clocks."""
import os
import unittest

from tests.integration.harness import MailshotTestCase, scaled

# How long a held send is kept waiting: a send that ignored its gate would be done well within it
# (a loopback transaction takes milliseconds, a few hundred under valgrind).
HOLD = scaled(0.5, 3.0)
# The bound of every wait in the scripts.
BOUND = scaled(20, 120)

PRELUDE = r"""
local mailshot = require "mailshot"
local smtp = require "mailshot.smtp"
local sender = require "mailshot.sender"
local core = mailshot.core
local HOLD, BOUND = tonumber(os.getenv "HOLD"), tonumber(os.getenv "BOUND")

local function msg(to, gate)
  return { from = "from@example.org", to = to, data = "Subject: gate\r\n\r\nfor " .. to .. "\r\n", gate = gate }
end
local function relay_to(server, opts)
  local o = { server = os.getenv(server or "SMTP_SERVER"), tls = "none", timeout = 30 }
  for k, v in pairs(opts or {}) do o[k] = v end
  return mailshot.relay(o)
end
-- what the server has received so far: its session log (a line per command line)
local function server_log(dir)
  local f = io.open((os.getenv(dir or "MAILDIR")) .. "/session.log")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end
local function seen(dir) return select(2, server_log(dir):gsub("\n", "")) end
-- wait (bounded) until cond() holds
local function wait_until(cond, what)
  local t0 = core.now()
  while not cond() do
    if core.now() - t0 > BOUND then error("timed out waiting for " .. what, 2) end
    core.sleep(0.01)
  end
end
-- a task's end, waited for (bounded) -> what its join gives
local function join(task, what)
  wait_until(function() return task.done end, what or "a task")
  return task:join()
end
-- one line of the script's report: key, then the values, tab-separated
local function out(key, ...)
  local t = table.pack(...)
  for i = 1, t.n do t[i] = tostring(t[i]):gsub("\n", " | ") end
  print(key .. "\t" .. table.concat(t, "\t", 1, t.n))
end
"""


class GateTests(MailshotTestCase):
    def exec_script(self, body, env=None):
        path = self.path("script.lua")
        with open(path, "w") as f:
            f.write(PRELUDE + body)
        e = {"HOLD": HOLD, "BOUND": BOUND}
        e.update(env or {})
        p = self.run_mailshot("exec", path, env=e)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertNotIn("task failed", p.stderr)
        report = {}
        for line in p.stdout.splitlines():
            key, _, rest = line.partition("\t")
            report[key] = rest.split("\t") if rest else []
        return report, p

    def smtpd(self, **kw):
        srv = self.start_smtpd(**kw)
        return srv, {"SMTP_SERVER": srv.address, "MAILDIR": srv.maildir}

    def rcpts(self, srv):
        return [m["rcpt_tos"] for m in srv.messages()]

    def test_a_closed_gate_keeps_the_message_from_the_server_until_another_task_opens_it(self):
        srv, env = self.smtpd()
        r, _ = self.exec_script(r"""
local relay = relay_to()
local g = smtp.gate()
local res, t_res, t_open
local sending = mailshot.spawn(function()
  res = relay:send(msg("held@example.com", g))
  t_res = core.now()
end)
local opener = mailshot.spawn(function()
  core.sleep(HOLD)
  -- the send waits in line, without a session: nothing of it has reached the server
  local st = relay:stats()
  out("at_open", g:state(), st.connections, st.waiting, seen(), type(res))
  t_open = core.now()
  g:open()
  out("opened", g:state(), g:wait())
end)
assert(join(opener))
assert(join(sending))
out("result", res.ok, res.code, res.stage, t_res >= t_open)
out("after", relay:stats().waiting, seen() > 0)
""", env)
        self.assertEqual(r["at_open"], ["closed", "0", "1", "0", "nil"], r)
        self.assertEqual(r["opened"], ["open", "true"], r)
        self.assertEqual(r["result"], ["true", "250", "nil", "true"], r)
        self.assertEqual(r["after"], ["0", "true"], r)
        self.assertEqual(self.rcpts(srv), [["held@example.com"]])
        self.assertIn("RCPT TO:<held@example.com>", srv.log_lines())
        self.assertEqual(srv.connections(), 1)

    def test_a_refused_gate_ends_the_waiting_send_unsent_and_the_relay_goes_on(self):
        srv, env = self.smtpd()
        r, _ = self.exec_script(r"""
local relay = relay_to(nil, { max_connections = 1 })
-- a session is up and idle: the refused send must not disturb it
assert(relay:send(msg("before@example.com")).ok)
local before = seen()
local g = smtp.gate()
local res, watched
local sending = mailshot.spawn(function() res = relay:send(msg("refused@example.com", g)) end)
local watcher = mailshot.spawn(function() watched = table.pack(g:wait()) end)
wait_until(function() return relay:stats().waiting == 1 end, "the send in line")
core.sleep(HOLD)
out("at_refuse", g:state(), relay:stats().connections, seen() - before, type(res))
g:refuse("another worker took this row over")
assert(join(sending))
assert(join(watcher))
out("result", res.ok, res.stage, res.error, res.temporary, res.code, res.message, res.via, res.relay == tostring(relay):match("%((.*)%)"))
out("watched", watched.n, watched[1], watched[2])
out("state", g:state())
out("waiting", relay:stats().waiting, seen() - before)
-- the same relay, the same session: the next send goes through
local nxt = relay:send(msg("next@example.com"))
out("next", nxt.ok, nxt.code, relay:stats().connections)
""", env)
        self.assertEqual(r["at_refuse"], ["closed", "1", "0", "nil"], r)
        self.assertEqual(r["result"], ["false", "gate", "local", "true", "0", "not sent: another worker took this row over",
                                       "relay", "true"], r)
        self.assertEqual(r["watched"], ["2", "false", "another worker took this row over"], r)
        self.assertEqual(r["state"], ["refused", "another worker took this row over"], r)
        self.assertEqual(r["waiting"], ["0", "0"], r)
        self.assertEqual(r["next"], ["true", "250", "1"], r)
        self.assertEqual(self.rcpts(srv), [["before@example.com"], ["next@example.com"]])
        self.assertFalse([l for l in srv.log_lines() if "refused@" in l], srv.log_lines())
        self.assertEqual(srv.connections(), 1)

    def test_a_send_given_an_already_refused_gate_returns_at_once_and_an_open_gate_changes_nothing(self):
        srv, env = self.smtpd()
        r, _ = self.exec_script(r"""
local relay = relay_to()
local g = smtp.gate()
g:refuse("Redis is lost")
local t0 = core.now()
local res = relay:send(msg("refused@example.com", g))
out("refused", res.ok, res.stage, res.temporary, res.message, core.now() - t0 < 0.5)
-- it does not even wait: the same from a plain coroutine, where a send that waits raises
local co = coroutine.wrap(function() return relay:send(msg("refused@example.com", g)) end)
local ok, res2 = pcall(co)
out("no_task", ok, ok and res2.stage or res2)
local ok3, err3 = pcall(coroutine.wrap(function() return relay:send(msg("ungated@example.com")) end))
out("no_task_ungated", ok3, tostring(err3):find("task", 1, true) ~= nil)
local st = relay:stats()
out("nothing", st.connections, st.waiting, seen())
local open = smtp.gate()
open:open()
local sent = relay:send(msg("open@example.com", open))
out("open", sent.ok, sent.code, open:state())
""", env)
        self.assertEqual(r["refused"], ["false", "gate", "true", "not sent: Redis is lost", "true"], r)
        self.assertEqual(r["no_task"], ["true", "gate"], r)
        self.assertEqual(r["no_task_ungated"], ["false", "true"], r)
        self.assertEqual(r["nothing"], ["0", "0", "0"], r)
        self.assertEqual(r["open"], ["true", "250", "open"], r)
        self.assertEqual(self.rcpts(srv), [["open@example.com"]])

    def test_a_held_send_first_in_line_does_not_block_an_ungated_send_behind_it(self):
        # max_connections = 1: the held send is first in line, the relay has no session yet
        srv, env = self.smtpd()
        r, _ = self.exec_script(r"""
local relay = relay_to(nil, { max_connections = 1 })
local g = smtp.gate()
local held, free
local th = mailshot.spawn(function() held = relay:send(msg("held@example.com", g)) end)
wait_until(function() return relay:stats().waiting == 1 end, "the held send in line")
local tf = mailshot.spawn(function() free = relay:send(msg("free@example.com")) end)
wait_until(function() return free ~= nil end, "the ungated send")
out("free", free.ok, g:state(), type(held), relay:stats().waiting, relay:stats().connections)
core.sleep(HOLD)
out("still", type(held), relay:stats().waiting)
g:open()
assert(join(th))
assert(join(tf))
out("held", held.ok, relay:stats().connections, relay:stats().waiting)
""", env)
        self.assertEqual(r["free"], ["true", "closed", "nil", "1", "1"], r)
        self.assertEqual(r["still"], ["nil", "1"], r)
        self.assertEqual(r["held"], ["true", "1", "0"], r)
        self.assertEqual(self.rcpts(srv), [["free@example.com"], ["held@example.com"]])
        self.assertEqual(srv.connections(), 1)      # the opened send took the idle session

    def test_a_held_send_lets_the_send_behind_it_take_the_session_when_it_frees(self):
        # max_connections = 1 and no pipelining: the session is busy (a slow end of DATA), the held
        # send and then an ungated one wait in line; when the session frees, the ungated one takes it
        slow = scaled(0.5, 2.0)
        srv, env = self.smtpd(delay=[f"DATA-END:{slow}"])
        r, _ = self.exec_script(r"""
local relay = relay_to(nil, { max_connections = 1, pipeline_depth = 0 })
local g = smtp.gate()
local busy, held, free
local tb = mailshot.spawn(function() busy = relay:send(msg("busy@example.com")) end)
wait_until(function() return relay:stats().connections == 1 end, "the busy session")
local th = mailshot.spawn(function() held = relay:send(msg("held@example.com", g)) end)
wait_until(function() return relay:stats().waiting == 1 end, "the held send in line")
local tf = mailshot.spawn(function() free = relay:send(msg("free@example.com")) end)
wait_until(function() return relay:stats().waiting == 2 end, "the ungated send in line")
out("queued", type(busy), type(held), type(free))
wait_until(function() return free ~= nil end, "the ungated send")
out("free", busy.ok, free.ok, g:state(), type(held), relay:stats().waiting)
g:open()
assert(join(th))
out("held", held.ok, relay:stats().connections)
assert(join(tb))
assert(join(tf))
""", env)
        self.assertEqual(r["queued"], ["nil", "nil", "nil"], r)
        self.assertEqual(r["free"], ["true", "true", "closed", "nil", "1"], r)
        self.assertEqual(r["held"], ["true", "1"], r)
        self.assertEqual(self.rcpts(srv), [["busy@example.com"], ["free@example.com"], ["held@example.com"]])
        self.assertEqual(srv.connections(), 1)

    def test_gate_wait_state_misuse_and_collection(self):
        r, p = self.exec_script(r"""
-- wait: true after open, false and why after refuse, from tasks, while another task decides
local g1, g2 = smtp.gate(), smtp.gate()
local w1, w2
local t1 = mailshot.spawn(function() w1 = table.pack(g1:wait()) end)
local t2 = mailshot.spawn(function() w2 = table.pack(g2:wait()) end)
core.sleep(0.05)
out("before", type(w1), type(w2), g1:state(), g2:state())
local second = mailshot.spawn(function() return pcall(g1.wait, g1) end)
out("second_waiter", join(second))
mailshot.spawn(function() core.sleep(0.05); g1:open(); g2:refuse("lease ran out") end)
assert(join(t1))
assert(join(t2))
out("w1", w1.n, w1[1])
out("w2", w2.n, w2[1], w2[2])
out("states", g1:state(), g2:state())
-- decided gates answer at once, even outside a task
out("again", coroutine.wrap(function() return g1:wait() end)())
out("again2", coroutine.wrap(function() return g2:wait() end)())
-- a closed gate cannot be waited on outside a task
out("outside", pcall(coroutine.wrap(function() return smtp.gate():wait() end)))
-- deciding twice is the programmer's mistake: an error
out("open_twice", pcall(g1.open, g1))
out("refuse_open", pcall(g1.refuse, g1, "x"))
out("open_refused", pcall(g2.open, g2))
out("refuse_twice", pcall(g2.refuse, g2, "y"))
out("still", g1:state(), g2:state())
local g3 = smtp.gate()
g3:refuse()
out("default_why", g3:state())
out("not_a_gate", pcall(g3.open, {}))
-- collection: gates nothing holds any more, closed, open and refused, and one a waiter left
for i = 1, 200 do
  local g = smtp.gate()
  if i % 3 == 1 then g:open() elseif i % 3 == 2 then g:refuse(("why %d"):format(i)) end
end
g1, g2, g3, t1, t2, second = nil, nil, nil, nil, nil, nil
for _ = 1, 3 do collectgarbage("collect"); core.sleep(0.01) end
out("collected", "ok")
""")
        self.assertEqual(r["before"], ["nil", "nil", "closed", "closed"], r)
        self.assertEqual(r["second_waiter"][:2], ["true", "false"], r)
        self.assertIn("gate:wait(): another task already waits on this gate", r["second_waiter"][2])
        self.assertEqual(r["w1"], ["1", "true"], r)
        self.assertEqual(r["w2"], ["2", "false", "lease ran out"], r)
        self.assertEqual(r["states"], ["open", "refused", "lease ran out"], r)
        self.assertEqual(r["again"], ["true"], r)
        self.assertEqual(r["again2"], ["false", "lease ran out"], r)
        self.assertEqual(r["outside"][0], "false", r)
        self.assertIn("task", r["outside"][1])
        self.assertEqual(r["open_twice"][0], "false", r)
        self.assertIn("gate:open(): the gate was already opened", r["open_twice"][1])
        self.assertEqual(r["refuse_open"][0], "false", r)
        self.assertIn("gate:refuse(): the gate was already opened", r["refuse_open"][1])
        self.assertEqual(r["open_refused"][0], "false", r)
        self.assertIn("gate:open(): the gate was already refused", r["open_refused"][1])
        self.assertEqual(r["refuse_twice"][0], "false", r)
        self.assertIn("gate:refuse(): the gate was already refused", r["refuse_twice"][1])
        self.assertEqual(r["still"], ["open", "refused", "lease ran out"], r)
        self.assertEqual(r["default_why"], ["refused", "refused"], r)
        self.assertEqual(r["not_a_gate"][0], "false", r)
        self.assertIn("mailshot.gate expected", r["not_a_gate"][1])
        self.assertEqual(r["collected"], ["ok"], r)

    def test_a_gate_holds_one_send_and_must_be_a_gate(self):
        # a second send given a gate that already holds one is refused with an error: the gate
        # wakes only the send it holds, so the second one used to stay in line for ever once the
        # gate was refused, and, no longer held, it wedged every later send on its relay
        srv, env = self.smtpd()
        r, _ = self.exec_script(r"""
local relay = relay_to(nil, { max_connections = 1 })
local g = smtp.gate()
local first
local t1 = mailshot.spawn(function() first = relay:send(msg("one@example.com", g)) end)
wait_until(function() return relay:stats().waiting == 1 end, "the held send")
local t2 = mailshot.spawn(function() return pcall(relay.send, relay, msg("two@example.com", g)) end)
out("second", join(t2))
out("bad", pcall(relay.send, relay, msg("bad@example.com", {})))
out("waiting", relay:stats().waiting)
g:refuse("no")
assert(join(t1))
out("first", first.ok, first.stage)
-- nothing is left in line: a later send goes out
local nxt
local t3 = mailshot.spawn(function() nxt = relay:send(msg("next@example.com")) end)
wait_until(function() return nxt ~= nil end, "the next send")
out("next", nxt.ok, relay:stats().waiting)
-- a gate decided, then given to a second send: refused or open, as any such gate
local g2 = smtp.gate()
local a, b
mailshot.spawn(function() a = relay:send(msg("a@example.com", g2)) end)
wait_until(function() return relay:stats().waiting == 1 end, "the held send")
g2:open()
wait_until(function() return a ~= nil end, "the opened send")
b = relay:send(msg("b@example.com", g2))
out("reuse", a.ok, b.ok)
""", env)
        self.assertEqual(r["second"][:2], ["true", "false"], r)
        self.assertIn("this gate already holds a send", r["second"][2])
        self.assertEqual(r["bad"][0], "false", r)
        self.assertIn("message field 'gate' must be a gate", r["bad"][1])
        self.assertEqual(r["waiting"], ["1"], r)
        self.assertEqual(r["first"], ["false", "gate"], r)
        self.assertEqual(r["next"], ["true", "0"], r)
        self.assertEqual(r["reuse"], ["true", "true"], r)
        self.assertEqual(self.rcpts(srv), [["next@example.com"], ["a@example.com"], ["b@example.com"]])

    def test_sends_still_held_at_exit_are_freed_cleanly(self):
        # the script ends with sends held by gates nobody opens, and a task in g:wait(): the
        # relay's and the gates' finalizers run in both orders (a gate made before its relay is
        # finalized after it); a sanitizer or valgrind report fails the test
        srv, env = self.smtpd()
        r, _ = self.exec_script(r"""
local early = smtp.gate()
local relay = relay_to()
local late = smtp.gate()
mailshot.spawn(function() relay:send(msg("early@example.com", early)) end)
mailshot.spawn(function() relay:send(msg("late@example.com", late)) end)
mailshot.spawn(function() late:wait() end)
local refused = smtp.gate()
mailshot.spawn(function() relay:send(msg("refused@example.com", refused)) end)
wait_until(function() return relay:stats().waiting == 3 end, "the held sends")
refused:refuse("x")
refused = nil
collectgarbage("collect")
out("waiting", relay:stats().waiting, seen())
""", env)
        self.assertEqual(r["waiting"], ["2", "0"], r)
        self.assertEqual(srv.message_count(), 0)
        self.assertEqual(srv.log_lines(), [])

    def test_mailshots_own_senders_pass_the_gate_on_and_a_campaigns_function_is_not_gated(self):
        # a fallback whose first relay answers 451 to MAIL: after the gate opens it falls back to
        # the second; while it is closed neither server sees anything
        first, env1 = self.smtpd(reject_mail_from=[("from@", 451, "4.3.0 try later")])
        second, env2 = self.smtpd()
        env = {"SMTP_SERVER": first.address, "MAILDIR": first.maildir,
               "SMTP_SERVER2": second.address, "MAILDIR2": second.maildir}
        r, _ = self.exec_script(r"""
local relay, relay2 = relay_to(), relay_to("SMTP_SERVER2")
local limited = relay_to("SMTP_SERVER2", { rate = "1000/s" })
local fb = mailshot.fallback { relay, relay2 }
out("gated", sender.gated(relay), sender.gated(fb), sender.gated(limited),
    sender.gated(mailshot.fallback { relay, limited }), sender.gated(mailshot.direct_sender { dns = "127.0.0.1:9" }))
out("not_gated", sender.gated(function() end), sender.gated(mailshot.fallback { relay, function() end }),
    sender.gated({ send = function() end }))

-- through the fallback
local g = smtp.gate()
local res
local t = mailshot.spawn(function() res = sender.call(fb, msg("fb@example.com", g), {}) end)
core.sleep(HOLD)
out("fb_held", type(res), relay:stats().waiting, relay:stats().connections, relay2:stats().connections,
    seen(), seen("MAILDIR2"))
g:open()
assert(join(t))
out("fb_result", res.ok, #res.fallback, res.fallback[1].code, res.relay == os.getenv "SMTP_SERVER2")

-- through the rate-limited relay
local before2 = seen("MAILDIR2")
local gl = smtp.gate()
local lres
local tl = mailshot.spawn(function() lres = limited:send(msg("limited@example.com", gl)) end)
core.sleep(HOLD)
out("limited_held", type(lres), limited:stats().waiting, limited:stats().connections, seen("MAILDIR2") - before2)
gl:open()
assert(join(tl))
out("limited_result", lres.ok, lres.code)

-- a refused gate through the fallback: nothing goes anywhere
local before1, before2b = seen(), seen("MAILDIR2")
local gr = smtp.gate()
local rres
local tr = mailshot.spawn(function() rres = fb(msg("never@example.com", gr), {}) end)
wait_until(function() return relay:stats().waiting == 1 end, "the held send")
gr:refuse("no mark")
assert(join(tr))
out("fb_refused", rres.ok, rres.stage, rres.message, seen() - before1, seen("MAILDIR2") - before2b)
""", env)
        self.assertEqual(r["gated"], ["true"] * 5, r)
        self.assertEqual(r["not_gated"], ["false"] * 3, r)
        self.assertEqual(r["fb_held"], ["nil", "1", "0", "0", "0", "0"], r)
        self.assertEqual(r["fb_result"], ["true", "2", "451", "true"], r)
        self.assertEqual(r["limited_held"], ["nil", "1", "0", "0"], r)
        self.assertEqual(r["limited_result"], ["true", "250"], r)
        self.assertEqual(r["fb_refused"], ["false", "gate", "not sent: no mark", "0", "0"], r)
        self.assertEqual(self.rcpts(first), [])
        self.assertEqual(self.rcpts(second), [["fb@example.com"], ["limited@example.com"]])
        self.assertFalse([l for l in first.log_lines() + second.log_lines() if "never@" in l])


if __name__ == "__main__":
    unittest.main()
