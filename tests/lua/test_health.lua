-- test_health.lua - mailshot.health: the relay-down rule of a run (stop_when_down) and the per-path
-- tallies of the progress line and the summary, on results as relay:send, direct delivery and
-- mailshot.fallback give them, with a clock of the test's own.
-- (A run stopped by a relay that is down, and its --resume, are tested end to end in
-- tests/integration/test_relay_down.py.)
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, contains, checkerr = check.case, check.eq, check.contains, check.checkerr

local health = require "mailshot.health"
local campaign = require "mailshot.campaign"

local RELAY = "smtp.example.com:587"

local function refused(relay)
  return { ok = false, code = 0, temporary = true, stage = "connect", error = "connect", via = "relay",
           relay = relay or RELAY, message = "cannot connect to " .. (relay or RELAY) .. ": Connection refused" }
end
local function sent(relay) return { ok = true, code = 250, via = "relay", relay = relay or RELAY, message = "2.0.0 OK" } end

-- A health tracker with a clock the test moves; send(res) maps res as the runner does.
local function tracker(rule)
  local t = { now = 0 }
  t.h = health.new(rule, function() return t.now end)
  function t.send(res, temporary)
    local rep = { temporary = temporary == nil and (not res.ok and res.temporary) or temporary or false }
    t.h:result(res, rep)
    return rep
  end
  return t
end

case("the default rule: 20 failures in a row are not enough before 60 s have passed", function()
  local t = tracker(campaign.stop_config(nil))
  eq(t.h.rule.failures, 20, "default failures")
  eq(t.h.rule.seconds, 60, "default seconds")
  for i = 1, 100 do t.now = i * 0.5; t.send(refused()) end      -- 100 failures over 49.5 s
  eq(t.h.down, nil, "down before 60 s")
  t.now = 61.2
  t.send(refused())
  eq(t.h.down and t.h.down.relay, RELAY, "down after 60 s")
  eq(t.h.down.count, 101, "count")
  contains(t.h.down.text, "relay " .. RELAY .. " failed 101 times in a row over 61 s" ..
           " (last: cannot connect to " .. RELAY .. ": Connection refused)")
end)

case("a long outage with few sends: the time alone is not enough either", function()
  local t = tracker(campaign.stop_config(nil))
  for i = 1, 19 do t.now = i * 10; t.send(refused()) end        -- 19 failures over 180 s
  eq(t.h.down, nil, "19 failures")
  t.now = 200
  t.send(refused())
  eq(t.h.down and t.h.down.count, 20, "the 20th")
end)

case("a relay that recovers: one success starts the count again", function()
  local t = tracker({ failures = 3, seconds = 10 })
  t.now = 0; t.send(refused()); t.send(refused())
  t.now = 5; t.send(sent())
  t.now = 12; t.send(refused()); t.send(refused())
  eq(t.h.down, nil, "reset by the success (4 failures over 12 s without it)")
  t.now = 20; t.send(refused())
  eq(t.h.down, nil, "3 in a row, but only over 8 s since the success")
  t.now = 22; t.send(refused())
  eq(t.h.down and t.h.down.count, 4, "down once 10 s passed")
end)

case("a 4xx or 5xx reply means the relay is up", function()
  local t = tracker({ failures = 2, seconds = 0 })
  t.send(refused())
  t.send({ ok = false, code = 451, temporary = true, stage = "rcpt", error = "tempfail", via = "relay", relay = RELAY,
           message = "4.2.1 try later" })
  t.send(refused())
  eq(t.h.down, nil, "the 451 reset the count")
  t.send({ ok = false, code = 421, temporary = true, stage = "greeting", error = "tempfail", via = "relay",
           relay = RELAY, message = "busy" })
  t.send(refused())
  eq(t.h.down, nil, "a 421 greeting is an answer too")
  t.send({ ok = false, code = 0, temporary = true, stage = "greeting", error = "timeout", via = "relay", relay = RELAY,
           message = "timed out" })
  eq(t.h.down and t.h.down.count, 2, "a greeting that never came counts")
end)

case("each relay has its own count", function()
  local t = tracker({ failures = 3, seconds = 0 })
  local other = "backup.example.com:25"
  t.send(refused()); t.send(refused(other)); t.send(refused())
  t.send(sent(other)); t.send(refused(other))
  eq(t.h.down, nil, "2 and 1")
  t.send(refused())
  eq(t.h.down and t.h.down.relay, RELAY, "the first relay is down")
end)

case("rows delivered by a fallback do not count; rows the fallback could not deliver do", function()
  local t = tracker({ failures = 2, seconds = 0 })
  local function fell_back(last)
    local r = refused()
    last.fallback = { { via = "relay", relay = RELAY, ok = false, code = 0, message = r.message, error = "connect",
                        stage = "connect" },
                      { via = last.via, ok = last.ok, code = last.code, message = last.message, error = last.error,
                        stage = last.stage } }
    return last
  end
  for _ = 1, 5 do t.send(fell_back({ ok = true, code = 250, via = "direct", message = "OK" })) end
  eq(t.h.down, nil, "delivered directly")
  -- the other path refused the recipient for good: a verdict, not a relay problem
  t.send(fell_back({ ok = false, code = 550, temporary = false, stage = "rcpt", error = "permfail", via = "direct",
                     message = "5.1.1 no such user" }))
  t.send(fell_back({ ok = false, code = 550, temporary = false, stage = "rcpt", error = "permfail", via = "direct",
                     message = "5.1.1 no such user" }))
  eq(t.h.down, nil, "permanent verdicts elsewhere")
  -- the other path failed too, for now: the rows end deferred
  local function direct_down()
    return fell_back({ ok = false, code = 0, temporary = true, stage = "connect", error = "connect", via = "direct",
                       message = "no mail server of a.test could be reached" })
  end
  t.send(direct_down())
  t.send(direct_down())
  eq(t.h.down and t.h.down.relay, RELAY, "deferred rows count")
end)

case("permanent failures (a certificate) need only the count, not the time", function()
  local t = tracker({ failures = 3, seconds = 60 })
  local cert = { ok = false, code = 0, temporary = false, stage = "tls", error = "cert", via = "relay", relay = RELAY,
                 message = "certificate verify failed" }
  t.send(cert); t.send(cert)
  eq(t.h.down, nil, "2")
  t.send(cert)
  eq(t.h.down and t.h.down.count, 3, "each one cost a recipient: 3 are enough")
end)

case("a refused login (error auth, deferred) counts like a refused connection", function()
  local t = tracker({ failures = 2, seconds = 1 })
  local auth = { ok = false, code = 535, temporary = true, defer = true, stage = "auth", error = "auth", via = "relay",
                 relay = RELAY, message = "not sent: relay refused our login" }
  t.now = 0; t.send(auth); t.send(auth)
  eq(t.h.down, nil, "not yet 1 s")
  t.now = 1; t.send(auth)
  eq(t.h.down and t.h.down.count, 3, "down")
end)

case("direct delivery and send functions are never down; false turns the rule off", function()
  local t = tracker({ failures = 1, seconds = 0 })
  t.send({ ok = false, code = 0, temporary = true, stage = "connect", error = "connect", via = "direct",
           message = "no mail server of a.test could be reached" })
  t.send({ ok = false, code = 0, temporary = true, stage = "connect", error = "connect", message = "mine" })
  eq(t.h.down, nil, "not relays")
  local off = tracker(campaign.stop_config(false))
  for i = 1, 1000 do off.now = i; off.send(refused()) end
  eq(off.h.down, nil, "stop_when_down = false")
end)

case("the progress reason names the relay failing the longest run of sends", function()
  local t = tracker({ failures = 100, seconds = 100 })
  eq(t.h:progress(60), nil, "nothing failing")
  local other = "backup.example.com:25"
  t.send({ ok = false, code = 0, temporary = true, stage = "tls", error = "tls", via = "relay", relay = other,
           message = "TLS handshake failed: wrong version number" })
  eq(t.h:progress(60), nil, "one failure is not a run")
  t.send({ ok = false, code = 0, temporary = true, stage = "tls", error = "tls", via = "relay", relay = other,
           message = "TLS handshake failed: wrong version number" })
  eq(t.h:progress(60), "relay backup.example.com:25: TLS handshake failed: wrong ...; 2 in a row", "tls")
  for _ = 1, 3 do t.send(refused()) end
  eq(t.h:progress(80), "cannot connect to smtp.example.com:587: Connection refused; 3 in a row", "the longer run")
end)

case("the summary: one line per path that left rows failed or deferred, with its last reason", function()
  local t = tracker(false)
  local function final(res, status)
    local rep = t.send(res)
    rep.status = status
    t.h:final(rep)
  end
  final(refused(), "deferred")
  final(refused(), "deferred")
  final({ ok = false, code = 550, temporary = false, stage = "rcpt", error = "permfail", via = "relay", relay = RELAY,
          message = "5.1.1 no such\r\nuser" }, "failed")
  final(sent(), "sent")
  final(sent("backup.example.com:25"), "sent")
  final({ ok = false, code = 550, enhanced = "5.1.1", temporary = false, stage = "rcpt", error = "permfail",
          via = "relay", relay = "backup.example.com:25", message = "no such\r\nuser" }, "failed")
  final({ ok = false, code = 0, temporary = true, stage = "connect", error = "connect", via = "direct",
          message = "all 2 mail servers of a.test failed" }, "deferred")
  check.eq_deep(t.h:summary(), {
    "relay smtp.example.com:587: 2 deferred, 1 failed; last: cannot connect to smtp.example.com:587: Connection refused",
    "relay backup.example.com:25: 1 failed; last: 550 5.1.1 no such user",
    "direct delivery: 1 deferred; last: all 2 mail servers of a.test failed",
  }, "summary")
end)

case("stop_when_down is checked when the campaign is made", function()
  checkerr("stop_when_down must be a table or false", campaign.stop_config, true)
  checkerr("unknown option 'failure'", campaign.stop_config, { failure = 3 })
  checkerr("stop_when_down.failures must be a whole number", campaign.stop_config, { failures = 0 })
  checkerr("stop_when_down.failures must be a whole number", campaign.stop_config, { failures = 2.5 })
  checkerr("stop_when_down.seconds: \"soon\" is not a duration", campaign.stop_config, { seconds = "soon" })
  check.eq_deep(campaign.stop_config({ failures = 5, seconds = "2m" }), { failures = 5, seconds = 120 }, "2m")
  check.eq_deep(campaign.stop_config({ seconds = 0 }), { failures = 20, seconds = 0 }, "failures default")
end)

return check.finish("test_health.lua")
