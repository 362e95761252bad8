-- test_rate.lua - mailshot.rate: spec parsing, exact sliding windows, pauses, delays, custom
-- (warm-up) rules, state/restore, and FIFO among tasks on the real scheduler.
--   MAILSHOT_LUA_PATH=lua ./mailshot exec tests/lua/test_rate.lua
-- Most cases run on a fake clock (deterministic, instant); the scheduler cases take ~0.5 s.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, checkerr, near = check.case, check.checkerr, check.near   -- checkerr: plain substring

local mailshot = require "mailshot"
local rate = require "mailshot.rate"

-- A fake clock: sleep advances it at once and is logged, so a test sees every wait.
local function fake_clock(t)
  local c = { t = t or 0, sleeps = {} }
  c.now = function() return c.t end
  c.sleep = function(s)
    assert(s > 0, "slept " .. tostring(s))
    c.sleeps[#c.sleeps + 1] = s
    c.t = c.t + s
  end
  c.wall = function() return 1.7e9 + c.t end
  return c
end
local function limiter(spec, c) return rate.new(spec, { now = c.now, sleep = c.sleep, wall = c.wall }) end

-- The most times that fall in one window [t, t + w) (times sorted; `tol` absorbs float noise).
local function max_in_window(times, w, tol)
  local best, j = 0, 1
  for i = 1, #times do
    while times[i] - times[j] >= w - (tol or 1e-9) do j = j + 1 end
    best = math.max(best, i - j + 1)
  end
  return best
end

-- Parsing -------------------------------------------------------------------------------------

case("every documented spec form parses to its numbers", function()
  local function one(spec) local r = rate.parse(spec); assert(#r == 1, spec); return r[1] end
  local windows = {
    ["14/s"] = { 14, 1 }, ["100/min"] = { 100, 60 }, ["3000/h"] = { 3000, 3600 }, ["3000/hour"] = { 3000, 3600 },
    ["500/24h"] = { 500, 86400 }, ["50000/day"] = { 50000, 86400 }, ["50000/d"] = { 50000, 86400 },
    ["10/5s"] = { 10, 5 }, ["1/500ms"] = { 1, 0.5 }, ["2/1.5sec"] = { 2, 1.5 }, ["100 per minute"] = { 100, 60 },
    [" 7 / 2m "] = { 7, 120 }, ["20/10MIN"] = { 20, 600 },
  }
  for spec, want in pairs(windows) do
    local r = one(spec)
    assert(r.kind == "window" and r.limit == want[1] and math.abs(r.window - want[2]) < 1e-12, spec)
    assert(r.spec == spec:match("^%s*(.-)%s*$"), "keeps the text for messages")
  end
  local p = one("pause 60s every 500")
  assert(p.kind == "pause" and p.seconds == 60 and p.every == 500)
  p = one("pause 1.5min every 20 messages")
  assert(p.kind == "pause" and p.seconds == 90 and p.every == 20)
  local d = one("delay 200ms")
  assert(d.kind == "delay" and math.abs(d.seconds - 0.2) < 1e-12)
  local r = rate.parse("max 4 connections")
  assert(#r == 0 and r.max_connections == 4)
end)

case("a list, a comma-separated string and rule tables combine", function()
  local r = rate.parse { "14/s", "500/24h", "max 4 connections", { kind = "delay", seconds = 0.1 } }
  assert(#r == 3 and r[1].limit == 14 and r[2].window == 86400 and r[3].kind == "delay" and r.max_connections == 4)
  assert(r[3].spec == "delay 0.1s", r[3].spec)
  local s = rate.parse("14/s, 500/24h; delay 100ms")
  assert(#s == 3 and s[1].limit == 14 and s[2].limit == 500 and s[3].seconds == 0.1)
  assert(s[2].spec == "500/24h", "each part keeps its own text")
  assert(#rate.parse { "14/s, 500/24h", "delay 1s" } == 3, "a list item may hold several rules")
  local again = rate.parse(r)                         -- parse's output is a spec too
  assert(#again == 3 and again.max_connections == 4 and again[2].spec == "500/24h")
  local c = rate.parse(rate.custom(function() end, "warm-up"))
  assert(#c == 1 and c[1].kind == "custom" and c[1].spec == "warm-up")
  local l = rate.new { "2/s", "max 3 connections" }
  assert(l.max_connections == 3)
  assert(tostring(rate.new("14/s, 500/24h", { name = "relay smtp.x" })) == "rate limiter relay smtp.x (14/s, 500/24h)")
end)

case("a bad spec raises an error that names it", function()
  checkerr('bad spec "14/fortnight"', rate.parse, "14/fortnight")
  checkerr('bad spec "14"', rate.parse, "14")
  checkerr('bad spec "0/s"', rate.parse, "0/s")
  checkerr('bad spec "1.5/s": the number of messages must be a whole number', rate.parse, "1.5/s")
  checkerr('bad spec "max 0 connections": at least 1', rate.parse, "max 0 connections")
  checkerr('bad spec "10/0s"', rate.parse, "10/0s")
  checkerr('bad spec "pause 60 every 500"', rate.parse, "pause 60 every 500")
  checkerr('bad spec "delay -1s"', rate.parse, "delay -1s")
  checkerr('bad spec "delay"', rate.parse, "delay")
  checkerr('bad spec "100/s and more"', rate.parse, { "14/s", "100/s and more" })
  checkerr("max connections given twice", rate.parse, "max 2 connections, max 3 connections")
  checkerr("empty spec", rate.parse, "")
  checkerr('bad spec "{ kind = window }": a rule table needs kind', rate.parse, { { kind = "window", limit = 0, window = 1 } })
  checkerr("got number", rate.parse, 42)
  checkerr("expected a function", rate.custom, "not a function")
  checkerr('bad spec "14/fortnight"', rate.new, "14/fortnight")
  checkerr('unknown option "clock"', rate.new, "1/s", { clock = os.time })
  checkerr('option "now" must be a function', rate.new, "1/s", { now = 5 })
end)

-- Windows on a fake clock -----------------------------------------------------------------------

case("100/s lets 100 through at t=0; the 101st waits exactly until the first leaves the window", function()
  local c = fake_clock()
  local l = limiter("100/s", c)
  for i = 1, 100 do
    local waited, at = l:acquire()
    assert(waited == 0 and at == 0, "send " .. i .. " waited")
  end
  assert(c.t == 0 and #c.sleeps == 0)
  local waited, at = l:acquire()
  near(waited, 1.0, "waited")
  near(at, 1.0, "recorded at")
  near(c.t, 1.0, "clock")
  assert(#c.sleeps == 1, "one sleep to the exact moment, no polling: " .. #c.sleeps)
  assert(l:acquire() == 0, "the second slot left the window at the same moment")
end)

case("in irregular traffic no 1-second window holds more than 100, and nobody waits longer than needed", function()
  local c = fake_clock()
  local l = limiter("100/s", c)
  local seed, times = 7, {}
  local function rnd() seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648 end
  for i = 1, 3000 do
    if rnd() < 0.3 then c.t = c.t + rnd() * 0.05 end  -- bursts and lulls
    local arrival = c.t
    l:acquire()
    times[i] = c.t
    local due = times[i - 100] and math.max(arrival, times[i - 100] + 1) or arrival
    near(times[i], due, "send " .. i)
  end
  assert(max_in_window(times, 1) == 100, "max in a 1 s window: " .. max_in_window(times, 1))
  assert(#c.sleeps < 3000, "sleeps only when it must: " .. #c.sleeps)
end)

case("14/s and 500/24h together: the daily quota stops the 501st until the first is a day old", function()
  local c = fake_clock()
  local l = limiter({ "14/s", "500/24h" }, c)
  local times = {}
  for i = 1, 528 do l:acquire(); times[i] = c.t end
  near(times[14], 0); near(times[15], 1)
  near(times[500], 35, "500th")                       -- 14 per second: 499 // 14 = 35
  near(times[501], 86400, "501st")
  near(times[514], 86400); near(times[515], 86401)
  assert(max_in_window(times, 1) <= 14 and max_in_window(times, 86400) <= 500)
  assert(#c.sleeps == 37, "one sleep per second step plus one for the day: " .. #c.sleeps)
end)

case("pause 60s every 500: a pause after each 500th message, none after a long enough lull", function()
  local c = fake_clock()
  local l = limiter("pause 60s every 500", c)
  local times = {}
  for i = 1, 1001 do l:acquire(); times[i] = c.t end
  near(times[500], 0); near(times[501], 60); near(times[1000], 60); near(times[1001], 120)
  local c2 = fake_clock()
  local l2 = limiter("pause 10s every 2", c2)
  l2:acquire(); l2:acquire()
  c2.t = 15                                            -- idle for longer than the pause
  assert(l2:acquire() == 0 and #c2.sleeps == 0)
end)

case("delay 200ms spaces messages; an idle caller does not wait", function()
  local c = fake_clock()
  local l = limiter("delay 200ms", c)
  for i = 1, 5 do l:acquire(); near(c.t, (i - 1) * 0.2, "send " .. i) end
  c.t = c.t + 1
  assert(l:acquire() == 0)
  local w = l:acquire()
  near(w, 0.2, "waited")
end)

case("try takes a free slot or says how long to wait, without waiting", function()
  local c = fake_clock()
  local l = limiter("2/s", c)
  assert(l:try() == true and l:try() == true)
  c.t = 0.25
  local ok, wait = l:try()
  assert(ok == false); near(wait, 0.75, "wait")
  assert(#c.sleeps == 0)
  c.t = 1
  assert(l:try() == true)
  assert(l:acquire() == 0, "the second slot of t=0 is free at t=1 too")
  ok, wait = l:try()
  assert(ok == false); near(wait, 1, "wait")
end)

case("a limiter with only max connections never waits", function()
  local c = fake_clock()
  local l = limiter("max 2 connections", c)
  for _ = 1, 1000 do assert(l:acquire() == 0) end
  assert(l.max_connections == 2 and #c.sleeps == 0)
end)

-- Custom rules ----------------------------------------------------------------------------------

-- The warm-up schedule shown in the README: 100 messages to the domain on day one, doubling daily.
local function warm_up(info)
  local quota = 100 * 2 ^ info.day
  if info.sent_today >= quota then return info.next_day_in end
end

case("a warm-up rule: 100 on day one, 200 on day two, waiting for the next day in between", function()
  local c = fake_clock()
  local l = limiter({ "10/s", rate.custom(warm_up, "warm-up") }, c)
  local per_day = {}
  for _ = 1, 450 do
    l:acquire("x.test")
    local day = math.floor(c.t / 86400)
    per_day[day] = (per_day[day] or 0) + 1
  end
  assert(per_day[0] == 100 and per_day[1] == 200 and per_day[2] == 150, ("%s %s %s"):format(per_day[0], per_day[1], per_day[2]))
  near(c.t, 2 * 86400 + 14, "10/s still applies within the day")
end)

case("a custom rule may refuse; the info it gets counts per domain and per limiter", function()
  local c = fake_clock()
  local seen
  local l = limiter(rate.custom(function(info)
    seen = info
    if info.domain == "cold.test" and info.sent_today >= 2 then return false, "cold.test: warm-up quota used up" end
  end), c)
  assert(l:acquire("cold.test") == 0 and l:acquire("cold.test") == 0 and l:acquire("hot.test") == 0)
  local w, reason = l:acquire("cold.test")
  assert(w == nil and reason == "cold.test: warm-up quota used up", tostring(reason))
  assert(seen.sent_today == 2 and seen.sent_total == 2 and seen.limiter_today == 3 and seen.limiter_total == 3)
  assert(seen.day == 0 and seen.next_day_in == 86400)
  local ok, why = l:try("cold.test")
  assert(ok == nil and why:find("quota"))
  assert(l:acquire("hot.test") == 0, "other domains go on")
  assert(l:acquire() == 0)
  assert(seen.domain == nil and seen.sent_total == 4, "without a domain, the counts are the limiter's")
  c.t = 86400 + 5
  assert(l:acquire("cold.test") == 0, "a new day")
  assert(seen.day == 1 and seen.sent_today == 0 and seen.sent_total == 2)
  near(seen.next_day_in, 86400 - 5)
end)

case("a custom rule's bad answer or error is raised", function()
  local c = fake_clock()
  checkerr("returned yes", function() limiter(rate.custom(function() return "yes" end), c):acquire() end)
  checkerr("returned -1", function() limiter(rate.custom(function() return -1 end), c):acquire() end)
  local l = limiter(rate.custom(function() error("oops") end), c)
  checkerr("oops", l.acquire, l)
  checkerr("domain must be a string", l.acquire, l, 42)
  assert(l:waiting() == 0, "the failed head left the queue")
end)

-- State and restore ---------------------------------------------------------------------------

-- Proves the state is plain data: write it as Lua source, read it back.
local function serialize(v)
  if type(v) == "table" then
    local parts = {}
    for k, x in pairs(v) do parts[#parts + 1] = "[" .. serialize(k) .. "]=" .. serialize(x) end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif type(v) == "number" then return math.type(v) == "integer" and tostring(v) or ("%.17g"):format(v)
  elseif type(v) == "string" then return ("%q"):format(v)
  elseif type(v) == "boolean" then return tostring(v)
  end
  error("not serializable: " .. type(v))
end

case("state/restore carries a daily quota over a restart with a new monotonic clock", function()
  local c = fake_clock(1000)
  local wall0 = 1.7e9
  c.wall = function() return wall0 + (c.t - 1000) end
  local l = limiter("500/24h", c)
  for _ = 1, 500 do l:acquire(); c.t = c.t + 7 end    -- the day's 500 in under an hour
  local st = l:state()
  local text = serialize(st)
  local back = load("return " .. text)()
  assert(#back.sends == 500 and back.sends[1] >= wall0 and back.sends[1] < wall0 + 1, "epoch seconds: " .. back.sends[1])
  -- a restart an hour after the first send: monotonic time starts again from 50
  local c2 = fake_clock(50)
  c2.wall = function() return wall0 + 3600 + (c2.t - 50) end
  local l2 = limiter("500/24h", c2)
  l2:restore(back)
  local ok, wait = l2:try()
  assert(ok == false and wait >= 86400 - 3600 and wait <= 86400 - 3600 + 2, "wait " .. tostring(wait))
  local waited = l2:acquire()
  assert(waited >= 82800 and waited <= 82802, waited)
  local st2 = l2:state()
  assert(st2.count.total == 501 and st2.started <= wall0 + 2 and st2.started >= wall0)
end)

case("the warm-up day and counts survive a restore", function()
  local c = fake_clock()
  local l = limiter(rate.custom(warm_up), c)
  c.t = 86400 + 10                                     -- day 1: quota 200
  for _ = 1, 150 do l:acquire("x.test") end
  local c2 = fake_clock(3)
  c2.wall = function() return 1.7e9 + 86400 + 20 + c2.t end
  local l2 = limiter(rate.custom(warm_up), c2)
  l2:restore(l:state())
  for _ = 1, 50 do assert(l2:acquire("x.test") == 0) end
  local w = l2:acquire("x.test")                       -- the 201st of day 1 waits for day 2
  assert(w > 86400 - 40 and w < 86400, w)
end)

case("restore refuses a foreign table or a limiter in use", function()
  local c = fake_clock()
  local l = limiter("1/s", c)
  checkerr("not a state", l.restore, l, { version = 2 })
  checkerr("not a state", l.restore, l, { version = 1, started = 0, sends = { "x" }, count = { total = 0, today = 0, day = 0 }, domains = {} })
  local st = l:state()
  l:acquire()
  checkerr("already recorded", l.restore, l, st)
end)

-- The real scheduler ------------------------------------------------------------------------------

case("tasks are served first come, first served, and 50/0.2s holds in real time", function()
  local l = rate.new("50/0.2s")
  local arrived, served, recorded, times, tasks = {}, {}, {}, {}, {}
  local t0 = mailshot.now()
  for i = 1, 130 do
    tasks[i] = mailshot.spawn(function()
      mailshot.sleep((i * 7 % 13) / 1000)              -- arrive in another order than spawned
      arrived[#arrived + 1] = i
      local _, at = l:acquire()
      served[#served + 1] = i
      recorded[#recorded + 1] = at
      times[#times + 1] = mailshot.now()
    end)
  end
  for i = 1, 130 do assert(tasks[i]:join()) end
  assert(table.concat(arrived, ",") == table.concat(served, ","), "not FIFO")
  assert(table.concat(arrived, ","):sub(1, 4) ~= "1,2,", "the arrival order was shuffled")
  -- The history the limiter recorded is exact; what the tasks read after acquire returned may
  -- be the next clock tick (1 ms) for some and not others.
  assert(max_in_window(recorded, 0.2) <= 50, "max in 0.2 s: " .. max_in_window(recorded, 0.2))
  -- (under valgrind a task may be resumed several ms after its turn: a wider margin there)
  local lag = check.scaled(0.0011, 0.02)
  assert(max_in_window(times, 0.2 - lag) <= 50, "seen by the tasks: " .. max_in_window(times, 0.2 - lag))
  local took = mailshot.now() - t0
  assert(took >= 0.4 and took < 1.0, "took " .. took)  -- 130 = 50 + 50 + 30: two waits of 0.2 s
end)

case("try gives way to queued tasks; an error in one waiter does not strand the others", function()
  local n = 0
  local l = rate.new { "1/50ms", rate.custom(function() n = n + 1; if n == 3 then error("rule broke") end end) }
  local tasks, results = {}, {}
  for i = 1, 5 do
    tasks[i] = mailshot.spawn(function() return l:acquire() end)
  end
  mailshot.sleep(0.01)
  assert(l:waiting() >= 3, "waiting " .. l:waiting())
  assert(l:try() == false, "try does not jump the queue")
  for i = 1, 5 do results[i] = { tasks[i]:join() } end
  assert(results[1][1] == true and results[2][1] == true)
  assert(results[3][1] == nil and results[3][2]:find("rule broke"))
  assert(results[4][1] == true and results[5][1] == true and l:waiting() == 0)
end)

case("begin/complete: a slot counts until the answer, then from the answer's time", function()
  local mailshot = require "mailshot"
  local core = require "mailshot.core"
  local l = rate.new("2/0.2s")
  local t0 = core.now()
  local a, b = l:begin(), l:begin()                -- two slots at once: both in flight
  assert(a and b and a ~= b)
  local third_at
  local task = mailshot.spawn(function() assert(l:begin()); third_at = core.now() - t0 end)
  core.sleep(0.3)                                  -- the window is long past, but a and b are in flight
  assert(third_at == nil, "a third send went while two were in flight")
  l:complete(a)                                    -- answered at ~0.3 s: the third may go at ~0.5 s
  task:join()
  assert(third_at >= 0.49 and third_at < 0.9, "third at " .. tostring(third_at))
  l:complete(b)
  checkerr("unknown or completed token", l.complete, l, a)
end)

-- The one sender seam ---------------------------------------------------------------------------

case("sender.limited: every limiter in order, slots back after the send, one failure result", function()
  local sender = require "mailshot.sender"
  local c = fake_clock()
  local a, b = limiter("1/h", c), limiter("5/h", c)
  local calls = 0
  local function send(msg) calls = calls + 1; return { ok = true, code = 250, message = msg } end
  local res, refused = sender.limited({ a, false, b }, "x.test", nil, send, "m1")
  assert(res.ok and res.message == "m1" and not refused and calls == 1)
  -- a refuses now (1/h with a pause of 0 would wait: a quota does not): use a custom "no"
  local no = rate.new(rate.custom(function() return false, "warm-up quota" end), { now = c.now, sleep = c.sleep })
  res, refused = sender.limited({ b, no }, "x.test", { via = "relay" }, send, "m2")
  assert(refused == no and calls == 1, "a refusal does not send; the refusing limiter is named")
  assert(res.ok == false and res.code == 0 and res.stage == "rate" and res.error == "rate" and res.temporary == true
         and res.via == "relay")
  assert(res.message:find("warm-up quota", 1, true), res.message)
  -- b's slot taken before the refusal was given back, and an error in the send gives its slots back too
  local boom = function() error("boom", 0) end
  local ok, err = pcall(sender.limited, { b }, "x.test", nil, boom)
  assert(not ok and err == "boom")
  assert(next(b.inflight) == nil, "a slot is still held")
end)

case("relays: no C method table to patch; a relay with a rate is a wrapped object", function()
  assert(require("mailshot.smtp").methods == nil, "smtp.methods is exported")
  local r = mailshot.relay { server = "127.0.0.1:9", tls = "none", rate = "10/s" }
  assert(tostring(r):find("relay (127.0.0.1:9)", 1, true), tostring(r))
  assert(type(r:stats()) == "table" and r.limiter)
  local n = 0
  for name in pairs(mailshot.relay_limiters()) do n = n + 1; assert(name:find("^relay relay %(")) end
  assert(n >= 1)
  r:close()
end)

return check.finish("test_rate.lua")
