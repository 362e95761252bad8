-- mailshot.cluster_rate: a rate limiter shared by every worker of a cluster run (issue 15).
--
--   local cluster_rate = require "mailshot.cluster_rate"
--   local lim = cluster_rate.new(cl, "relay 10.0.0.1:587", "200/s", { sleep = ... })
--   local token = lim:begin(domain) ... lim:complete(token)        -- as a mailshot.rate limiter
--
-- The state of the rules lives in Redis under cl:key("rate:" .. name) (and ":pending",
-- ":meta"), changed only by one Lua script (SCRIPT below), so that a check and a reservation
-- are one atomic step for the whole fleet.  Times are Redis's own (TIME inside the script) and
-- the script answers with relative delays: the workers' clocks need not agree with Redis's or
-- each other's.
--
-- The windows ("N/W"): a sliding log.  A slot is "pending" from the moment the script grants it
-- until the worker reports its message answered (complete), then "done" at the time Redis
-- learns of the answer.  A slot is granted at Redis time g only when, for every window rule,
--     done slots with a time in (g - W, g]  +  pending slots  +  1  <=  N.
-- Every message of a receiver's window [a, a + W) was granted before or at the time it arrived,
-- and answered after: take the one granted last (at g <= its arrival < a + W); every other one
-- was granted before it and was then either still pending or done at a time >= a > g - W, so
-- the script counted it.  So at most N messages reach the receiver in any window of length W,
-- measured on Redis's clock (the receiver's, give or take the clocks' difference: "exact within
-- one slot").  Everything late only makes it stricter: a slot held unused counts as pending.
-- An answer is reported with its age (seconds since the worker had it, by the worker's monotonic
-- clock: a duration, no clock need agree), and counts from Redis's now minus that age: never
-- before the worker had the answer, since the call itself takes time.  So an answer may wait for
-- the next call without costing anything: until reported the slot counts as pending, which is as
-- much as "done" counts while the report comes within the window.
--
-- Local batching: the task at the head of a process's queue asks for a batch of slots, the number
-- the tightest window allows in BATCH_SECONDS (at least 1, at most a quarter of the window's N),
-- in one script call; the slots it does not take are handed to the next tasks in the queue
-- without asking Redis again.  Answers are kept and sent with the next call, or by a small task
-- within a quarter of the shortest window (FLUSH_MIN to FLUSH_MAX).  A slot reserved but never used (its task stopped) is given back
-- ("release"): it was counted as pending all along, so it never let the fleet exceed a limit.
--
-- A worker that dies holds its pending slots: each has a lease (LEASE seconds, renewed by the
-- worker while it holds the slot); an expired pending slot becomes a done slot at its lease's
-- end, so a dead worker's messages keep counting until then, never less.
--
-- What is shared and what stays per process (README "Shared rate limits"):
--   "N/W" windows, "delay D" and "pause P every M": shared (the whole fleet is one sender to the
--     receiver).  "delay" and "pause" count grants: a pause starts when the Mth slot is granted.
--   "max N connections": per process (connections are each worker's own).
--   rate.custom(fn): per process (a Lua function cannot run in Redis): it is asked first, with this
--     worker's own counts (sent_today, ...), by a local mailshot.rate limiter holding only the
--     custom rules; the shared slot is taken once it allows the message.

local core = require("mailshot.core")
local rate = require("mailshot.rate")

local M = {}

-- A batch covers about this much of the tightest window's rate, BATCH_MAX slots at most.
local BATCH_SECONDS, BATCH_MAX = 0.05, 1000
-- A pending slot's lease in Redis (seconds); the keeper task renews held slots every LEASE / 3.
local LEASE = 30
-- Answers not sent along with a reservation go out within a quarter of the shortest window,
-- but at least FLUSH_MIN and at most FLUSH_MAX seconds after the first of them.
local FLUSH_MIN, FLUSH_MAX = 0.005, 0.25
-- When pending slots alone fill a window, nothing tells us when they complete: ask again after
-- this long (or the window's length, when shorter).
local POLL = 0.05
-- Slots reserved and not taken are given back after this long.
local IDLE = 0.25

-- The script.  KEYS: done (zset id -> completion time), pending (zset id -> lease deadline),
-- meta (hash: seq, total, last, gen).  ARGV: want, lease, rules ("w N W p P M d D" tokens),
-- answered ("id age id age ..."), released ids, renewed ids (space-separated), seed ("gen age age
-- ..." or ""), worker.  -> { first id, count, wait (seconds, a string), gen }
M.SCRIPT = [[
local done, pend, meta = KEYS[1], KEYS[2], KEYS[3]
local want, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call("TIME")
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function f(x) return string.format("%.6f", x) end
local windows, pauses, delays, maxw = {}, {}, {}, 0
do
  local tok = {}
  for s in string.gmatch(ARGV[3], "%S+") do tok[#tok + 1] = s end
  local i = 1
  while i <= #tok do
    local k, a, b = tok[i], tonumber(tok[i + 1]), tonumber(tok[i + 2])
    if k == "w" then windows[#windows + 1] = { a, b }; if b > maxw then maxw = b end; i = i + 3
    elseif k == "p" then pauses[#pauses + 1] = { a, b }; i = i + 3
    elseif k == "d" then delays[#delays + 1] = a; i = i + 2
    else return redis.error_reply("rate script: bad rule " .. tostring(k)) end
  end
end
local gen = redis.call("HGET", meta, "gen")
if not gen then gen = t[1] .. "." .. t[2]; redis.call("HSET", meta, "gen", gen) end
-- answered messages ("id age ..."): done at now - age (when the lease ran out first: at the
-- later of the two)
do
  local id
  for s in string.gmatch(ARGV[4], "%S+") do
    if not id then id = s
    else
      local at = f(now - tonumber(s))
      if redis.call("ZREM", pend, id) == 1 then redis.call("ZADD", done, at, id)
      else redis.call("ZADD", done, "XX", "GT", at, id) end
      id = nil
    end
  end
end
for id in string.gmatch(ARGV[5], "%S+") do
  if redis.call("ZREM", pend, id) == 1 then redis.call("HINCRBY", meta, "total", -1) end
end
for id in string.gmatch(ARGV[6], "%S+") do redis.call("ZADD", pend, "XX", f(now + lease), id) end
-- a restored history (limiter:restore) for a Redis that has not seen it: ages -> times
do
  local sgen, n = nil, 0
  for s in string.gmatch(ARGV[7], "%S+") do
    if not sgen then sgen = s
    elseif sgen ~= gen then
      n = n + 1
      redis.call("ZADD", done, "NX", f(now - tonumber(s)), "r:" .. sgen .. ":" .. ARGV[8] .. ":" .. n)
    end
  end
end
-- leases run out: those slots count as answered at their lease's end
local expired = redis.call("ZRANGEBYSCORE", pend, "-inf", f(now), "WITHSCORES")
for i = 1, #expired, 2 do redis.call("ZADD", done, expired[i + 1], expired[i]) end
if #expired > 0 then redis.call("ZREMRANGEBYSCORE", pend, "-inf", f(now)) end
if maxw > 0 then redis.call("ZREMRANGEBYSCORE", done, "-inf", "(" .. f(now - maxw)) end
local k, wait = want, 0
local npend = redis.call("ZCARD", pend)
for _, w in ipairs(windows) do
  local n, win = w[1], w[2]
  local ndone = redis.call("ZCOUNT", done, "(" .. f(now - win), "+inf")
  local free = n - ndone - npend
  if free < k then k = math.max(free, 0) end
  if free <= 0 then
    local leave = 1 - free                 -- slots that must leave the window for one to be free
    local w1
    if leave <= ndone then
      local r = redis.call("ZRANGEBYSCORE", done, "(" .. f(now - win), "+inf", "WITHSCORES", "LIMIT", leave - 1, 1)
      w1 = tonumber(r[2]) + win - now
    else
      w1 = math.min(win, ]] .. POLL .. [[)
    end
    if w1 > wait then wait = w1 end
  end
end
local total = tonumber(redis.call("HGET", meta, "total") or "0")
local last = tonumber(redis.call("HGET", meta, "last") or "")
for _, d in ipairs(delays) do
  if last and last + d > now then k = 0; wait = math.max(wait, last + d - now) end
  if k > 1 then k = 1 end
end
for _, p in ipairs(pauses) do
  local every = p[2]
  if total > 0 and total % every == 0 and last and last + p[1] > now then
    k = 0; wait = math.max(wait, last + p[1] - now)
  end
  local room = every - total % every
  if k > room then k = room end
end
local first = 0
if k > 0 then
  local seq = redis.call("HINCRBY", meta, "seq", k)
  first = seq - k + 1
  local args = {}
  for id = first, seq do
    args[#args + 1] = f(now + lease); args[#args + 1] = id
    if #args >= 1000 or id == seq then redis.call("ZADD", pend, unpack(args)); args = {} end
  end
  redis.call("HINCRBY", meta, "total", k)
  redis.call("HSET", meta, "last", f(now))
  wait = 0
end
local ttl = math.floor((maxw + lease + 3600) * 1000)
redis.call("PEXPIRE", done, ttl); redis.call("PEXPIRE", pend, ttl); redis.call("PEXPIRE", meta, ttl)
return { first, k, f(wait), gen }
]]

-- rules (from rate.parse) -> the script's rule string, the batch size, the local custom rules
local function encode(rules)
  local parts, batch, customs = {}, math.huge, {}
  for _, r in ipairs(rules) do
    if r.kind == "window" then
      parts[#parts + 1] = ("w %d %.17g"):format(r.limit, r.window)
      -- never more than a quarter of the window: one worker must not take all of it
      local b = math.min(math.floor(r.limit * BATCH_SECONDS / r.window), r.limit // 4)
      batch = math.min(batch, math.max(1, b))
    elseif r.kind == "pause" then
      parts[#parts + 1] = ("p %.17g %d"):format(r.seconds, r.every)
    elseif r.kind == "delay" then
      parts[#parts + 1] = ("d %.17g"):format(r.seconds)
      batch = 1
    else
      customs[#customs + 1] = r
    end
  end
  if batch == math.huge then batch = 1 end
  batch = math.min(batch, BATCH_MAX)
  return table.concat(parts, " "), batch, customs
end

local Limiter = {}
Limiter.__index = Limiter
Limiter.__name = "mailshot.cluster_rate"

function Limiter.__tostring(self)
  local specs = {}
  for i, r in ipairs(self.rules) do specs[i] = r.spec end
  return ("shared rate limiter %s(%s)"):format(self.name and self.name .. " " or "", table.concat(specs, ", "))
end

local function task_sleep(s) core.sleep(math.max(1, math.ceil(s * 1000 - 1e-3)) / 1000) end

local OPTIONS = { sleep = "function", name = "string", script = "table", lease = "number", batch = "number",
                  now = "function" }

--- cluster_rate.new(cl, name, spec [, { sleep, name, lease, batch }]) -> limiter.
--- cl: a mailshot.cluster connection (cl.redis, cl:key); name: the limiter's name in Redis (the
--- same name on every worker is the same limiter).  Raises on a bad spec or option.
function M.new(cl, name, spec, opts)
  if type(cl) ~= "table" or not cl.redis or type(cl.key) ~= "function" then
    error("cluster_rate.new: expected a cluster connection (mailshot.cluster)", 2)
  end
  if type(name) ~= "string" or name == "" then error("cluster_rate.new: the limiter needs a name", 2) end
  if type(spec) == "function" then spec = rate.custom(spec) end
  local ok, rules = pcall(rate.parse, spec)
  if not ok then error(rules, 2) end
  opts = opts or {}
  for k, v in pairs(opts) do
    if not OPTIONS[k] then error(("cluster_rate.new: unknown option %q"):format(tostring(k)), 2) end
    if type(v) ~= OPTIONS[k] then error(("cluster_rate.new: option %q must be a %s"):format(k, OPTIONS[k]), 2) end
  end
  local encoded, batch, customs = encode(rules)
  local sleep = opts.sleep or task_sleep
  local base = cl:key("rate:" .. name)
  local self = setmetatable({
    cl = cl, name = opts.name or name, rules = rules, max_connections = rules.max_connections,
    encoded = encoded, batch = math.max(1, math.floor(opts.batch or batch)), lease = opts.lease or LEASE,
    keys = { base, base .. ":pending", base .. ":meta" },
    script = opts.script or M.script(), sleep = sleep, now = opts.now or core.now,
    stash = {}, inflight = {},      -- slots reserved not yet taken; taken, not answered
    completed = {}, released = {},            -- ids to report with the next call
    queue = {}, qhead = 1, qtail = 0,
    sends = {}, cap = 0, count = 0, offset = os.time() - core.now(),
  }, Limiter)
  local shortest = math.huge
  for _, r in ipairs(rules) do
    if r.kind == "window" then
      if r.limit > self.cap then self.cap = r.limit end
      shortest = math.min(shortest, r.window)
    end
  end
  self.flush_delay = math.max(FLUSH_MIN, math.min(FLUSH_MAX, shortest / 4))
  if #customs > 0 then
    self.customs = rate.new(customs, { name = self.name, sleep = sleep })
  end
  return self
end

-- The script object: cluster.script when the cluster module has it.
function M.script()
  if not M._script then
    local okc, cluster = pcall(require, "mailshot.cluster")
    if not (okc and type(cluster) == "table" and cluster.script) then
      error("cluster_rate: mailshot.cluster.script is not available", 2)
    end
    M._script = cluster.script(M.SCRIPT)
  end
  return M._script
end

local function ids(list)
  if #list == 0 then return "" end
  local s = table.concat(list, " ")
  for i = #list, 1, -1 do list[i] = nil end
  return s
end

-- One script call: reserve up to `want` slots, report what is pending locally.
-- -> first id, count, wait | nil, err
function Limiter:call(want)
  local seed = self.seed or ""
  local renew = self.renew_ids or ""
  self.seed, self.renew_ids = nil, nil
  local completed, released = "", ids(self.released)
  local list = self.completed
  if #list > 0 then
    local now, parts = self.now(), {}
    for i, c in ipairs(list) do
      parts[#parts + 1] = ("%d %.6f"):format(c[1], math.max(0, now - c[2]))
      list[i] = nil
    end
    completed = table.concat(parts, " ")
  end
  local r, err = self.script:run(self.cl.redis, self.keys,
                                 { want, self.lease, self.encoded, completed, released, renew, seed,
                                   self.cl.worker or "worker" })
  if not r then
    -- the answers and slots given back in this call are lost with it: those slots stay pending
    -- until their leases end (stricter, never looser)
    return nil, ("shared rate limit %s: %s"):format(self.name, tostring(err))
  end
  self.gen = r[4]
  return math.tointeger(r[1]), math.tointeger(r[2]), tonumber(r[3])
end

-- Answers (and slots given back) go to Redis within flush_delay: with the next reservation, or
-- by this small task.  A failed call loses nothing that matters: those slots stay pending
-- until their lease ends, which only makes the limit stricter.
local function schedule_flush(self)
  if self.flush_pending or self.closed then return end
  self.flush_pending = true
  core.spawn(function()
    core.sleep(self.flush_delay)
    self.flush_pending = false
    if not self.closed and (#self.completed > 0 or #self.released > 0) then self:call(0) end
  end)
end

-- Slots reserved and not taken within IDLE (their tasks stopped, or fewer came than the batch)
-- are given back.
local function schedule_release(self)
  if self.release_pending or self.closed then return end
  self.release_pending = true
  core.spawn(function()
    while not self.closed and #self.stash > 0 do
      local left = self.stash_at + IDLE - self.now()
      if left <= 0 and self.qhead > self.qtail then
        for i = #self.stash, 1, -1 do self.released[#self.released + 1] = self.stash[i]; self.stash[i] = nil end
        self:call(0)                                 -- at once: other workers may be waiting for them
        break
      end
      core.sleep(math.max(left, 0.01))
    end
    self.release_pending = false
  end)
end

-- The keeper: while this process holds slots (taken or reserved), their leases are renewed
-- every lease / 3, so only a dead worker's slots ever expire.
local function keeper(self)
  while not self.closed do
    core.sleep(self.lease / 3)
    if self.closed then break end
    local renew = {}
    for id in pairs(self.inflight) do renew[#renew + 1] = id end
    for _, id in ipairs(self.stash) do renew[#renew + 1] = id end
    if #renew == 0 then break end
    self.renew_ids = table.concat(renew, " ")
    self:call(0)
  end
  self.keeping = false
end

local function keep(self)
  if not self.keeping and not self.closed then
    self.keeping = true
    core.spawn(keeper, self)
  end
end

-- The head of the queue: a slot from the stash, or from Redis: a whole batch, the slots the
-- head does not take going to the tasks behind it.  -> id | nil, err
local function serve(self)
  while true do
    local id = table.remove(self.stash)
    if id then return id end
    local first, n, wait = self:call(self.batch)
    if not first then return nil, n end
    if n > 0 then
      for i = first + n - 1, first + 1, -1 do self.stash[#self.stash + 1] = i end
      self.stash_at = self.now()
      keep(self)
      if #self.stash > 0 then schedule_release(self) end
      return first
    end
    self.sleep(math.max(wait, 0.001))
  end
end

local function leave(self)
  self.queue[self.qhead] = nil
  self.qhead = self.qhead + 1
  if self.qhead <= self.qtail then core.wake(self.queue[self.qhead])
  else self.qhead, self.qtail = 1, 0 end
end

-- A shared slot, in FIFO order among this process's tasks.  -> id | nil, err
local function take_shared(self)
  if self.closed then error("cluster_rate: the limiter is closed", 0) end
  if self.encoded == "" then                         -- only custom rules: nothing to share
    self.local_seq = (self.local_seq or 0) - 1
    return self.local_seq
  end
  if self.qhead > self.qtail then
    self.qtail = self.qtail + 1
    self.queue[self.qtail] = true
  else
    local co, is_task = core.current()
    if not is_task then error("rate: acquire must run in a task (mailshot.spawn)", 0) end
    self.qtail = self.qtail + 1
    self.queue[self.qtail] = co
    core.suspend()
  end
  local ok, id, err = pcall(serve, self)
  leave(self)
  if not ok then error(id, 0) end
  return id, err
end

local function check_domain(domain)
  if domain ~= nil and type(domain) ~= "string" then error("rate: domain must be a string", 3) end
end

--- limiter:begin([domain]) -> token | nil, reason: a slot of the shared rules (and of this
--- process's custom rules), busy until limiter:complete(token).
function Limiter:begin(domain)
  check_domain(domain)
  local t0 = self.now()
  local id, err
  local ctoken
  if self.customs then
    local why
    ctoken, why = self.customs:begin(domain)
    if not ctoken then return nil, why end
  end
  local ok
  ok, id, err = pcall(take_shared, self)
  if not (ok and id) then
    if ctoken then self.customs:complete(ctoken) end
    if not ok then error(id, 0) end                 -- a stop (mailshot.run's STOPPED) goes on
    return nil, err
  end
  self.inflight[id] = ctoken or true
  self.waited = self.now() - t0
  return id
end

--- limiter:complete(token): the server answered the message sent under this slot.
function Limiter:complete(token)
  local c = self.inflight[token]
  if not c then error("rate: complete: unknown or completed token", 2) end
  self.inflight[token] = nil
  if c ~= true then self.customs:complete(c) end
  if token > 0 then self.completed[#self.completed + 1] = { token, self.now() } end
  -- this worker's own sends, for state()
  self.count = self.count + 1
  if self.cap > 0 then self.sends[(self.count - 1) % self.cap + 1] = self.now() end
  if token > 0 then schedule_flush(self) end
end

--- limiter:acquire([domain]) -> seconds waited, time | nil, reason.  The slot counts as answered
--- at once (use begin/complete to count from the server's answer).
function Limiter:acquire(domain)
  local id, why = self:begin(domain)
  if not id then return nil, why end
  self:complete(id)
  return self.waited, self.now()
end

function Limiter:take(domain, pending)
  if pending then
    local id, why = self:begin(domain)
    if not id then return nil, why end
    return self.waited, self.now(), id
  end
  return self:acquire(domain)
end

--- limiter:try([domain]) -> true | false, seconds | nil, reason.  Never waits: only a slot this
--- process already reserved can be taken (the next begin/acquire asks Redis).
function Limiter:try(domain)
  check_domain(domain)
  if self.qhead <= self.qtail or #self.stash == 0 then return false, POLL end
  if self.customs then
    local ok, w = self.customs:try(domain)
    if not ok then return ok, w end
  end
  local id = table.remove(self.stash)
  self.inflight[id] = true
  self:complete(id)
  return true
end

--- limiter:waiting() -> the number of tasks of this process queued for a slot.
function Limiter:waiting() return self.qtail - self.qhead + 1 end

--- limiter:flush() -> true | nil, err: report completions and give back reserved slots now
--- (yields).  close() does it at the end of a run.
function Limiter:flush()
  for i = #self.stash, 1, -1 do self.released[#self.released + 1] = self.stash[i]; self.stash[i] = nil end
  if #self.completed == 0 and #self.released == 0 and not self.seed then return true end
  local first, err = self:call(0)
  if not first then return nil, err end
  return true
end

--- limiter:close() -> true | nil, err: flush, then no more slots.
function Limiter:close()
  if self.closed then return true end
  local ok, err = self:flush()
  self.closed = true
  return ok, err
end

-- Surviving a restart ------------------------------------------------------------------------

--- limiter:state() -> a state as mailshot.rate's (wall-clock times of this worker's own last
--- sends, its custom rules' counts) plus cluster_gen, the generation of the Redis state.
function Limiter:state()
  local st = self.customs and self.customs:state() or {
    version = 1, count = { total = 0, today = 0, day = 0 }, domains = {}, started = self.offset + core.now(),
  }
  local sends = {}
  for k = math.max(1, self.count - self.cap + 1), self.count do
    sends[#sends + 1] = self.sends[(k - 1) % self.cap + 1] + self.offset
  end
  local specs = {}
  for i, r in ipairs(self.rules) do specs[i] = r.spec end
  st.name, st.rules, st.sends, st.saved = self.name, specs, sends, self.now() + self.offset
  st.last = sends[#sends] or st.last
  st.cluster_gen = self.gen
  return st
end

--- limiter:restore(state): a Redis that does not hold this limiter's history (restarted, or
--- another one) gets this worker's saved sends with the next call; a Redis that does (the same
--- generation) is left alone.  Times go as ages by this machine's wall clock (the one that
--- saved them), 1 s younger (os.time has whole seconds: a send counts late, never early).
function Limiter:restore(st)
  if type(st) ~= "table" or st.version ~= 1 or type(st.sends) ~= "table" then
    error("rate: restore: not a state made by limiter:state()", 2)
  end
  if self.count > 0 then error("rate: restore: the limiter has already recorded sends", 2) end
  if self.customs then pcall(self.customs.restore, self.customs, st) end
  local wall = os.time()
  local parts = { tostring(st.cluster_gen or "none") }
  for _, t in ipairs(st.sends) do
    if type(t) == "number" then parts[#parts + 1] = ("%.6f"):format(math.max(0, wall - t - 1)) end
  end
  if #parts > 1 then self.seed = table.concat(parts, " ") end
end

return M
