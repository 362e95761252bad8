-- test_dkim_pool.lua - DKIM signing on worker threads (dkim = { threads = N }): from many tasks at
-- once every signature is the very bytes the same key makes on the main thread (RSA PKCS#1 v1.5 and
-- Ed25519 are deterministic), the loop runs other tasks while the workers sign, more tasks than the
-- pool has slots wait in line, a signer closed while jobs are out, and the option's checks (a
-- program that ends while jobs are out: tests/integration/test_campaign_dkim.py).  Run by `mailshot exec` (the chunk is a task itself); `make tsan` runs it under
-- ThreadSanitizer (DKIM_POOL_N sets the number of messages).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, checkerr = check.case, check.eq, check.checkerr

local mailshot = require "mailshot"
local core = mailshot.core
local dkim = require "mailshot.dkim"

local N = tonumber(os.getenv "DKIM_POOL_N") or check.scaled(600, 60)
local T = 1700000000

local function keyfile(alg, bits)
  local pem = assert(dkim.keygen { algorithm = alg, bits = bits })
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(pem)
  f:close()
  return path
end

local keys = { ["rsa-sha256"] = keyfile("rsa-sha256", 1024), ["ed25519-sha256"] = keyfile("ed25519-sha256") }

local function signer(alg, threads, extra)
  local o = { domain = "acme.example", selector = "s1", key_file = keys[alg], threads = threads }
  for k, v in pairs(extra or {}) do o[k] = v end
  return assert(dkim.signer(o))
end

-- Messages of different sizes and shapes (LF and CRLF, 8-bit, long lines), one per index.
local function message(i)
  local body = {}
  for j = 1, i % 40 do body[j] = ("line %d of message %d, Grüße %s"):format(j, i, ("x"):rep(i % 97)) end
  local eol = i % 3 == 0 and "\n" or "\r\n"
  return table.concat({ "From: News <news@acme.example>", ("To: user%d@example.com"):format(i),
                        ("Subject: offer %d"):format(i), "", table.concat(body, eol) }, eol)
end

-- Runs f(i) for i = 1..n over `tasks` tasks at once; returns when all are done.
local function each_in_tasks(n, tasks, f)
  local next_i, left, me = 0, tasks, core.current()
  for _ = 1, tasks do
    core.spawn(function()
      while next_i < n do
        next_i = next_i + 1
        f(next_i)
      end
      left = left - 1
      if left == 0 then core.wake(me) end
    end)
  end
  core.suspend()
end

for _, alg in ipairs { "rsa-sha256", "ed25519-sha256" } do
  case(alg .. ": many tasks at once on 2 threads sign exactly what the main thread signs", function()
    local pool, inline = signer(alg, 2), signer(alg, 0)
    local got, bad = 0, {}
    each_in_tasks(N, 50, function(i)
      local m = message(i)
      local signed = assert(pool:sign(m, T + i))
      local header = assert(pool:header(m, T + i))
      if signed ~= inline:sign(m, T + i) or header ~= inline:header(m, T + i) then bad[#bad + 1] = i end
      got = got + 1
    end)
    eq(got, N, "messages signed")
    eq(#bad, 0, "signatures that differ from the main thread's: " .. table.concat(bad, " ", 1, math.min(#bad, 10)))
  end)
end

case("errors come back from the workers as nil, err", function()
  local s = signer("ed25519-sha256", 2)
  local r = {}
  each_in_tasks(20, 10, function(i)
    local v, err = s:sign(i % 2 == 0 and "Subject: no from\r\n\r\nbody" or "no header line\r\n\r\nbody", T)
    r[#r + 1] = tostring(v) .. " " .. tostring(err)
  end)
  eq(#r, 20)
  for _, x in ipairs(r) do
    assert(x:find("^nil the message has no From:") or x:find("^nil header line 1 is not a header field"), x)
  end
end)

case("the loop runs other tasks while the workers sign; threads = 0 signs on the loop", function()
  -- a task counts the turns of the loop while another signs: only signing off the loop lets it run
  local function turns_while_signing(s)
    local done, turns = false, 0
    local ticker = mailshot.spawn(function()
      while not done do turns = turns + 1; core.sleep(0) end
    end)
    core.sleep(0)                                          -- let the ticker start
    local start = turns
    for i = 1, 20 do assert(s:sign(message(i), T)) end
    local during = turns - start
    done = true
    ticker:join()
    return during
  end
  -- while a task waits on a worker, the ticker is ready or its 0 s timer due: it runs about once
  -- per signature (not exactly: under load a worker can finish before the loop next polls, and
  -- that wait ends in the turn it began, so half of them is the bound); signing on the loop
  -- never yields, so it never runs
  local off, on = turns_while_signing(signer("rsa-sha256", 1)), turns_while_signing(signer("rsa-sha256", 0))
  assert(off >= 10, "the loop turned " .. off .. " times during 20 signatures on a worker")
  eq(on, 0, "turns of the loop while threads = 0 signed")
end)

case("more tasks than slots wait in line and all get their signature (1 thread: 32 slots)", function()
  local s, inline = signer("ed25519-sha256", 1), signer("ed25519-sha256", 0)
  local ok, n = 0, 500
  local me, left = core.current(), n
  for i = 1, n do                                          -- 500 tasks sign at the same moment
    core.spawn(function()
      if s:sign(message(i), T) == inline:sign(message(i), T) then ok = ok + 1 end
      left = left - 1
      if left == 0 then core.wake(me) end
    end)
  end
  core.suspend()
  eq(ok, n)
end)

case("a signer closed while tasks wait on it: each gets its message or nil, err, none hangs", function()
  local s = signer("rsa-sha256", 1)
  local signed, closed, other, left, me = 0, 0, {}, 100, core.current()
  for i = 1, 100 do
    core.spawn(function()
      local v, err = s:sign(message(i), T)
      if v then signed = signed + 1
      elseif tostring(err):find("closed while the message waited", 1, true) then closed = closed + 1
      else other[#other + 1] = tostring(err) end
      left = left - 1
      if left == 0 then core.wake(me) end
    end)
  end
  core.sleep(0)                                            -- every task has handed in its job
  getmetatable(s).__close(s)
  core.suspend()
  eq(#other, 0, table.concat(other, "; "))
  eq(signed + closed, 100)
  assert(closed > 0, "no job was still waiting when the signer closed (signed " .. signed .. ")")
  checkerr("attempt to use a closed dkim signer", s.sign, s, message(1))
end)

case("threads: an integer from 0 to 64, checked when the signer is made", function()
  for _, bad in ipairs { -1, 65, 1.5, "2", true } do
    checkerr("threads must be an integer from 0 (sign on the main thread) to 64", signer, "ed25519-sha256", bad)
  end
  for _, good in ipairs { 0, 1, 64 } do assert(signer("ed25519-sha256", good)) end
  -- dkim.sign takes it too
  local o = { domain = "acme.example", selector = "s1", key_file = keys["ed25519-sha256"], threads = 1 }
  assert(dkim.sign(message(3), o):find("^DKIM%-Signature: v=1; a=ed25519%-sha256;"))
  o.threads = 99
  checkerr("threads must be an integer", dkim.sign, message(3), o)
end)

for _, path in pairs(keys) do os.remove(path) end
return check.finish("test_dkim_pool.lua")
