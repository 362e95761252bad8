-- test_runtime.lua - tasks on the event loop: spawn, join, sleep, suspend/wake, errors, relay
-- option checking.  Run by `mailshot exec` (it runs as a task itself).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, checkerr_match = check.case, check.checkerr_match

local mailshot = require "mailshot"
local core = mailshot.core

case("sleeping tasks wake in deadline order, concurrently", function()
  local order, t0 = {}, mailshot.now()
  local tasks = {}
  for _, d in ipairs { 0.06, 0.02, 0.04 } do
    tasks[#tasks + 1] = mailshot.spawn(function() mailshot.sleep(d); order[#order + 1] = d end)
  end
  for _, t in ipairs(tasks) do assert(t:join()) end
  assert(order[1] == 0.02 and order[2] == 0.04 and order[3] == 0.06, table.concat(order, ","))
  local took = mailshot.now() - t0
  assert(took < 0.5, "the sleeps ran one after the other: " .. took)   -- generous: 0.06 if concurrent
end)

case("join returns the task's results", function()
  local t = mailshot.spawn(function(a, b) return a + b, "x" end, 2, 3)
  local ok, sum, x = t:join()
  assert(ok == true and sum == 5 and x == "x")
  local ok2, s2 = t:join()                       -- joining a finished task again
  assert(ok2 and s2 == 5)
end)

case("an error in a task comes back from join, the runtime goes on", function()
  local t = mailshot.spawn(function() error("boom") end)
  local ok, err = t:join()
  assert(ok == nil and err:find("boom"), tostring(err))
end)

case("sleep(0) lets the other tasks run", function()
  local log = {}
  local a = mailshot.spawn(function() for i = 1, 3 do log[#log + 1] = "a" .. i; mailshot.sleep(0) end end)
  local b = mailshot.spawn(function() for i = 1, 3 do log[#log + 1] = "b" .. i; mailshot.sleep(0) end end)
  a:join(); b:join()
  assert(table.concat(log, " ") == "a1 b1 a2 b2 a3 b3", table.concat(log, " "))
end)

case("suspend and wake pass values", function()
  local me = core.current()
  mailshot.spawn(function() core.wake(me, "hello", 42) end)
  local s, n = core.suspend()
  assert(s == "hello" and n == 42)
end)

case("a task sleeping is woken by its timer only: core.wake and coroutine.resume are refused", function()
  local steps = {}
  local t = core.spawn(function()
    core.sleep(0.2)
    steps[#steps + 1] = "slept"
    steps[#steps + 1] = "suspend:" .. tostring(core.suspend())   -- the sleep's timer must not end this
  end)
  mailshot.sleep(0.05)
  checkerr_match("waiting in core%.sleep; only its completion can wake it", core.wake, t, "stray")
  checkerr_match("resumed by its scheduler only", coroutine.resume, t, "stray")
  checkerr_match("resumed by its scheduler only", coroutine.close, t)
  mailshot.sleep(0.4)                              -- the timer fired long ago
  assert(table.concat(steps, " ") == "slept", table.concat(steps, " "))
  core.wake(t, "mine")
  mailshot.sleep(0)
  assert(table.concat(steps, " ") == "slept suspend:mine", table.concat(steps, " "))
end)

case("a task parked in core.suspend takes one wake-up: a second core.wake is refused", function()
  local got = {}
  local t = core.spawn(function()
    got[#got + 1] = core.suspend()
    core.sleep(0.05)                               -- a second wake would cut this short
    got[#got + 1] = "slept"
  end)
  mailshot.sleep(0)
  core.wake(t, "first")
  checkerr_match("task is not suspended", core.wake, t, "second")
  mailshot.sleep(0.2)
  assert(table.concat(got, " ") == "first slept", table.concat(got, " "))
  checkerr_match("not a task", core.wake, t)       -- it ended
  local co = coroutine.create(function() coroutine.yield() end)
  coroutine.resume(co)
  checkerr_match("not a task", core.wake, co)      -- a coroutine of one's own is not the scheduler's
  assert(coroutine.resume(co))                     -- and coroutine.resume still works on it
end)

case("10,000 tasks run at once", function()
  local n, tasks = 0, {}
  for i = 1, 10000 do tasks[i] = mailshot.spawn(function() mailshot.sleep(0.001); n = n + 1 end) end
  for i = 1, 10000 do tasks[i]:join() end
  assert(n == 10000)
end)

case("waiting outside a task is refused with a clear error", function()
  local co = coroutine.create(function() return pcall(mailshot.sleep, 0) end)
  local _, ok, err = coroutine.resume(co)
  assert(ok == false and err:find("coroutine of your own"), tostring(err))
  checkerr_match("must run inside a task", function() return table.sort({ 2, 1 }, function() mailshot.sleep(0) end) end)
end)

case("relay options are checked when the relay is made", function()
  checkerr_match("'server'", mailshot.relay, {})
  checkerr_match("not host:port", mailshot.relay, { server = "example.com:notaport" })
  checkerr_match("'tls' must be", mailshot.relay, { server = "127.0.0.1:25", tls = "maybe" })
  checkerr_match("'password' is not", mailshot.relay, { server = "127.0.0.1:25", user = "u" })
  checkerr_match("timeout", mailshot.relay, { server = "127.0.0.1:25", timeout = -1 })
  checkerr_match("helo", mailshot.relay, { server = "127.0.0.1:25", helo = "two words" })
  local r = mailshot.relay { server = "127.0.0.1:2525", tls = "none" }
  assert(tostring(r) == "relay (127.0.0.1:2525)", tostring(r))
  r:close()
end)

case("a bad envelope is refused before any network", function()
  local r = mailshot.relay { server = "127.0.0.1:9", tls = "none" }
  local res = r:send { from = "a@example.com", to = "x\r\nRCPT TO:<y@example.com>", data = "Subject: x\r\n\r\n" }
  assert(res.ok == false and res.stage == "rcpt" and res.temporary == false, res.message)
  assert(res.message:find("CR or LF"), res.message)
  res = r:send { from = "a@b@example.com", to = "x@example.com", data = "" }
  assert(res.ok == false and res.stage == "mail", res.message)
  assert(r:stats().connections == 0)
end)

case("numbers in 'to' are an error naming the field (they were a use after free)", function()
  local r = mailshot.relay { server = "127.0.0.1:9", tls = "none" }
  -- fresh numbers each time: each one converted to a new string that only the stack held; with
  -- a thousand of them a collection ran before the first one was read
  local errs = {}
  -- an incremental collector that never pauses, in steps of 1 KB: cycles end (and free what
  -- nothing holds) in the middle of the conversions
  collectgarbage()
  local mode = collectgarbage("incremental", 0, 1000, 10)
  for k = 1, 100 do
    local to = {}
    for i = 1, 1000 do to[i] = k * 1000000 + i end
    local ok, err = pcall(r.send, r, { from = "a@example.com", to = to, data = "x" })
    errs[k] = not ok and err or "no error"
  end
  collectgarbage(mode)
  for k = 1, 100 do
    assert(tostring(errs[k]):find("message field 'to'[1] must be a string (got number)", 1, true), errs[k])
  end
  checkerr_match("'to'%[2%] must be a string %(got number%)", r.send, r,
                 { from = "a@example.com", to = { "b@example.com", 12 }, data = "x" })
  checkerr_match("message field 'to' must be a string or a list", r.send, r, { from = "a@example.com", to = 12, data = "x" })
  checkerr_match("message field 'from' must be a string", r.send, r, { from = 12, to = "b@example.com", data = "x" })
  assert(r:stats().connections == 0)
end)

case("paths and DKIM options with a NUL byte are an error, not cut short", function()
  local csv, util, dkim = require "mailshot.csv", require "mailshot.util", require "mailshot.dkim"
  checkerr_match("must not contain a NUL byte", csv.open, "list.csv\0.txt")
  checkerr_match("must not contain a NUL byte", csv.count_lines, "list.csv\0.txt")
  checkerr_match("must not contain a NUL byte", util.sha256_file, "/etc/hostname\0x")
  checkerr_match("must not contain a NUL byte", util.write_secret, "/tmp/x\0y", "data")
  checkerr_match("must not contain a NUL byte", require("mailshot.smtp").log, "/tmp/x\0y")
  checkerr_match("domain must not contain a NUL byte", dkim.signer,
                 { domain = "example.com\0evil", selector = "s", key_file = "k.pem" })
  checkerr_match("a name must not contain a NUL byte", dkim.signer,
                 { domain = "example.com", selector = "s", key_file = "k.pem", headers = { "From\0x" } })
end)

case("a closed port is a temporary connect failure", function()
  local r = mailshot.relay { server = "127.0.0.1:9", tls = "none", timeout = 5 }
  local res = r:send { from = "a@example.com", to = "x@example.com", data = "Subject: x\r\n\r\nhi\r\n" }
  assert(res.ok == false and res.stage == "connect" and res.temporary == true, res.message)
  assert(res.message:find("refused"), res.message)
end)

case("a campaign's default concurrency fills its relay's pipelines; explicit values win", function()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p '" .. dir .. "'"))
  local f = assert(io.open(dir .. "/r.csv", "w"))
  f:write("email\nx@example.com\n")
  f:close()
  local function campaign(send, concurrency)
    return mailshot.campaign { recipients = dir .. "/r.csv", from = "a@example.com", subject = "s", text = "t",
                               send = send, concurrency = concurrency }
  end
  local r = mailshot.relay { server = "127.0.0.1:9", tls = "none" }
  local st = r:stats()
  assert(st.max_connections == 8 and st.pipeline_depth == 3, "defaults 8 x 3")
  assert(campaign(r).concurrency == 24, campaign(r).concurrency)
  local small = mailshot.relay { server = "127.0.0.1:9", tls = "none", max_connections = 2, pipeline_depth = 0 }
  assert(campaign(small).concurrency == 2, campaign(small).concurrency)
  assert(campaign(r, 5).concurrency == 5, "explicit")
  assert(campaign(function() end).concurrency == 8, "a function")
  os.execute("rm -rf '" .. dir .. "'")
end)

return check.finish("test_runtime.lua")
