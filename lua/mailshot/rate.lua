-- mailshot.rate: sending rate limits that match providers' quotas, enforced without busy-waiting.
--
--   local rate = require "mailshot.rate"
--   local limiter = rate.new { "14/s", "500/24h" }
--   send = function(msg) limiter:acquire(); return relay:send(msg) end
--
-- Rules (README "mailshot.rate"): sliding windows "N/window" (exact: any window of that length
-- holds at most N sends), "pause P every M", "delay D", and rate.custom(fn).  One task at a
-- time (the head of a FIFO queue) waits for the rules; the others are parked behind it.  The
-- head computes the exact moment the rules allow the next send, sleeps until then and checks
-- again; nothing polls.
--
-- History: one ring buffer of the last N send times, N being the largest window limit, shared
-- by every window rule (the k-th most recent send is the one a "k/window" rule looks at).  It
-- grows as sends are made, up to N slots of 16 bytes (a Lua 5.4 array slot), the array growing
-- in powers of two: "50000/day" holds 1 MB once 50,000 messages have been sent (measured).
-- Exactness needs every one of those times; a bucketed count would let bursts through.
--
-- Exact at the receiver: a message reaches the server some time after acquire() returns, and
-- network jitter could bunch two windows' worth together.  So a sender may take a slot with
-- limiter:begin() and give it back with limiter:complete(token) when the server has answered:
-- the slot then counts from the answer's time, and while it is in flight it counts as "now".
-- A window rule lets the k-th send go only when every send up to the (k-limit)-th has been
-- answered, and the latest of those answers is a whole window old.  Any window of the
-- receiver's own clock then holds at most `limit` messages, whatever the network did.

local core = require "mailshot.core"

local M = {}

local DAY = 86400
-- Two times closer than this are the same time: `now + (t - now)` need not give back exactly t
-- in floating point, and we would rather not sleep 1e-16 s.  The clock ticks in milliseconds.
local EPS = 1e-6
-- A restored wall-clock time is moved this much later: os.time() has whole seconds, so the
-- offset between wall and monotonic time is known to 1 s in each process (see restore).
local RESTORE_MARGIN = 1

local UNITS = {
  ms = 0.001,
  s = 1, sec = 1, secs = 1, second = 1, seconds = 1,
  m = 60, min = 60, mins = 60, minute = 60, minutes = 60,
  h = 3600, hr = 3600, hrs = 3600, hour = 3600, hours = 3600,
  d = DAY, day = DAY, days = DAY,
}

local FORMS = '"N/s", "N/min", "N/h", "N/24h", "N/day", "N/500ms", "pause 60s every 500", '
  .. '"delay 200ms", "max 4 connections"'

-- Spec parsing -----------------------------------------------------------------------------

-- "24h" -> 86400, "500ms" -> 0.5, "day" -> 86400 when the number may be left out;
-- nil when `text` is not a duration.
local function duration(text, number_optional)
  local num, unit = text:match("^(%d*%.?%d*)%s*(%a+)$")
  local u = num and UNITS[unit]
  if not u then return nil end
  if num == "" then return number_optional and u or nil end
  local n = tonumber(num)
  if not n or n <= 0 or n == math.huge then return nil end
  if unit == "ms" then return n / 1000 end            -- 200 / 1000 is 0.2; 200 * 0.001 is not
  return n * u
end

-- One rule written as a string -> rule table, or (for "max N connections") nil, N;
-- nil, nil, why for a bad spec.
local function parse_text(text)
  local s = text:lower():match("^%s*(.-)%s*$")
  local n, per = s:match("^(%d+)%s*/%s*(.+)$")
  if not n then n, per = s:match("^(%d+)%s+per%s+(.+)$") end
  if n then
    local limit, window = tonumber(n), duration(per, true)
    if limit < 1 then return nil, nil, "the number of messages must be at least 1" end
    if not window then return nil, nil, ("%q is not a duration (ms, s, min, h, day, e.g. 24h)"):format(per) end
    return { kind = "window", limit = limit, window = window, spec = text }
  end
  local p, every = s:match("^pause%s+(.-)%s+every%s+(%d+)%s*%a*$")
  if p then
    local seconds, m = duration(p), tonumber(every)
    if not seconds then return nil, nil, ("%q is not a duration such as 60s or 5min"):format(p) end
    if m < 1 then return nil, nil, "the pause must come every 1 message or more" end
    return { kind = "pause", seconds = seconds, every = m, spec = text }
  end
  local d = s:match("^delay%s+(.+)$")
  if d then
    local seconds = duration(d)
    if not seconds then return nil, nil, ("%q is not a duration such as 200ms or 2s"):format(d) end
    return { kind = "delay", seconds = seconds, spec = text }
  end
  local c = s:match("^max%s+(%d+)%s+connections?$")
  if c then
    if tonumber(c) < 1 then return nil, nil, "at least 1 connection" end
    return nil, tonumber(c)
  end
  if s:match("^[%d.]+%s*/") then return nil, nil, "the number of messages must be a whole number" end
  return nil, nil, "expected one of " .. FORMS
end

local function positive(x) return type(x) == "number" and x > 0 and x < math.huge end

-- A rule given as a table (from rate.parse or rate.custom, or written by hand) -> a checked copy;
-- nil, why when it is malformed.
local function check_rule(r)
  local k = r.kind
  if k == "window" and math.type(r.limit) == "integer" and r.limit >= 1 and positive(r.window) then
    return { kind = k, limit = r.limit, window = r.window, spec = r.spec or ("%d/%gs"):format(r.limit, r.window) }
  elseif k == "pause" and positive(r.seconds) and math.type(r.every) == "integer" and r.every >= 1 then
    return { kind = k, seconds = r.seconds, every = r.every, spec = r.spec or ("pause %gs every %d"):format(r.seconds, r.every) }
  elseif k == "delay" and positive(r.seconds) then
    return { kind = k, seconds = r.seconds, spec = r.spec or ("delay %gs"):format(r.seconds) }
  elseif k == "custom" and type(r.fn) == "function" then
    return { kind = k, fn = r.fn, spec = r.spec or "custom" }
  end
  return nil, "a rule table needs kind = \"window\" (limit, window), \"pause\" (seconds, every), "
    .. "\"delay\" (seconds) or \"custom\" (fn)"
end

-- spec -> list of rules with a max_connections field; nil, message for a bad spec.
local function parse(spec)
  local items = {}
  local function add(item)
    if type(item) ~= "string" then items[#items + 1] = item; return end
    for part in item:gmatch("[^,;]+") do items[#items + 1] = part:match("^%s*(.-)%s*$") end
  end
  if type(spec) == "string" or (type(spec) == "table" and spec.kind) then
    add(spec)
  elseif type(spec) == "table" then
    for _, item in ipairs(spec) do add(item) end
  else
    return nil, "rate: expected a spec string or a list of rules, got " .. type(spec)
  end
  local out = { max_connections = type(spec) == "table" and spec.max_connections or nil }
  if out.max_connections ~= nil and (math.type(out.max_connections) ~= "integer" or out.max_connections < 1) then
    return nil, "rate: max_connections must be an integer >= 1"
  end
  for _, item in ipairs(items) do
    local rule, conns, why
    if type(item) == "string" then
      rule, conns, why = parse_text(item)
    elseif type(item) == "table" then
      rule, why = check_rule(item)
    else
      why = "a rule must be a string or a table, got " .. type(item)
    end
    if why then
      local shown = type(item) == "table" and ("{ kind = %s }"):format(tostring(item.kind)) or tostring(item)
      return nil, ("rate: bad spec %q: %s"):format(shown, why)
    end
    if conns then
      if out.max_connections then return nil, ("rate: bad spec %q: max connections given twice"):format(item) end
      out.max_connections = conns
    else
      out[#out + 1] = rule
    end
  end
  if #out == 0 and not out.max_connections then return nil, ("rate: empty spec %q"):format(tostring(spec)) end
  return out
end

--- rate.parse(spec) -> { rule, ..., max_connections = n|nil }.  Raises on a bad spec.
function M.parse(spec)
  local rules, err = parse(spec)
  if not rules then error(err, 2) end
  return rules
end

--- rate.custom(fn [, name]) -> a rule: fn(info) -> nil (send) | seconds to wait | false, reason.
function M.custom(fn, name)
  if type(fn) ~= "function" then error("rate.custom: expected a function", 2) end
  return { kind = "custom", fn = fn, spec = name or "custom" }
end

-- The limiter -------------------------------------------------------------------------------

local Limiter = {}
Limiter.__index = Limiter
Limiter.__name = "mailshot.rate"

function Limiter.__tostring(self)
  local specs = {}
  for i, r in ipairs(self.rules) do specs[i] = r.spec end
  return ("rate limiter %s(%s)"):format(self.name and self.name .. " " or "", table.concat(specs, ", "))
end

-- The default sleep: the loop's timers have milliseconds, so round up (never wake early and
-- spin) and sleep at least 1 ms.
local function task_sleep(s)
  core.sleep(math.max(1, math.ceil(s * 1000 - 1e-3)) / 1000)
end

local OPTIONS = { now = "function", sleep = "function", wall = "function", name = "string" }

--- rate.new(spec [, { now, sleep, wall, name }]) -> limiter.  Raises on a bad spec or option.
function M.new(spec, opts)
  local rules, err = parse(spec)
  if not rules then error(err, 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("rate.new: options must be a table", 2) end
  for k, v in pairs(opts) do
    if not OPTIONS[k] then error(("rate.new: unknown option %q"):format(tostring(k)), 2) end
    if type(v) ~= OPTIONS[k] then error(("rate.new: option %q must be a %s"):format(k, OPTIONS[k]), 2) end
  end
  local self = setmetatable({
    name = opts.name, rules = rules, max_connections = rules.max_connections,
    now = opts.now or core.now, sleep = opts.sleep or task_sleep, wall = opts.wall or os.time,
    windows = {}, pauses = {}, delays = {}, customs = {},
    cap = 0, ring = {}, seq = 0, last = nil,        -- the last `cap` send times; seq sends recorded
    count = { total = 0, today = 0, day = 0 }, domains = {},
    queue = {}, qhead = 1, qtail = 0,               -- tasks waiting in acquire, head first
  }, Limiter)
  for _, r in ipairs(rules) do
    local list = self[r.kind .. "s"]
    if r.kind == "window" then
      -- k: sends up to here are folded into latest (their latest answer) or counted in pend
      r = { kind = r.kind, limit = r.limit, window = r.window, spec = r.spec, k = 0, latest = -math.huge, pend = 0 }
      if r.limit > self.cap then self.cap = r.limit end
    end
    list[#list + 1] = r
  end
  self.inflight = {}                                 -- seq -> true while a begin() awaits complete()
  self.start = self.now()
  self.offset = self.wall() - self.start             -- wall = monotonic + offset (to 1 s)
  return self
end

-- The earliest time the window, pause and delay rules allow one more send (may be past).
local function ready_at(self)
  local last = self.last
  if not last then return -math.huge end
  local t = last                                     -- never before the last send: history stays sorted
  for _, w in ipairs(self.windows) do
    local k = self.seq - w.limit + 1                   -- the send that must first leave the window
    while w.k < k do                                   -- fold in the sends that reached that depth
      w.k = w.k + 1
      if self.inflight[w.k] then w.pend = w.pend + 1
      else w.latest = math.max(w.latest, self.ring[(w.k - 1) % self.cap + 1]) end
    end
    if w.pend > 0 then return math.huge end          -- wait for an answer (complete)
    if k >= 1 then t = math.max(t, w.latest + w.window) end
  end
  for _, p in ipairs(self.pauses) do
    if self.count.total % p.every == 0 then t = math.max(t, last + p.seconds) end
  end
  for _, d in ipairs(self.delays) do t = math.max(t, last + d.seconds) end
  return t
end

local function day_of(self, t) return math.max(0, math.floor((t - self.start) / DAY)) end
local function today(c, day) return c.day == day and c.today or 0 end

local function bump(c, day)
  c.today = today(c, day) + 1
  c.day, c.total = day, c.total + 1
end

local function record(self, t, domain)
  self.seq = self.seq + 1
  if self.cap > 0 then self.ring[(self.seq - 1) % self.cap + 1] = t end
  self.last = t
  local day = day_of(self, t)
  bump(self.count, day)
  if domain then
    local c = self.domains[domain]
    if not c then c = { total = 0, today = 0, day = day }; self.domains[domain] = c end
    bump(c, day)
  end
end

local function info(self, now, domain)
  local day = day_of(self, now)
  local c = domain and self.domains[domain] or (domain and { total = 0, today = 0, day = day }) or self.count
  return {
    domain = domain, day = day,
    sent_today = today(c, day), sent_total = c.total,
    limiter_today = today(self.count, day), limiter_total = self.count.total,
    next_day_in = self.start + (day + 1) * DAY - now,
  }
end

-- One look at the rules now: "go", time to record | "wait", seconds | "refuse", reason.
-- Custom rules are asked only once the others allow the send: they see the real moment.
local function check(self, domain)
  local now = self.now()
  local t = ready_at(self)
  if t > now + EPS then return "wait", t - now end
  for _, c in ipairs(self.customs) do
    local w, reason = c.fn(info(self, now, domain))
    if w == false then
      return "refuse", reason ~= nil and tostring(reason) or "refused by rate rule " .. c.spec
    elseif positive(w) then
      return "wait", w
    elseif w ~= nil and w ~= 0 then
      error(("rate rule %s returned %s: expected nil, a number of seconds >= 0, or false, reason")
        :format(c.spec, tostring(w)), 0)
    end
  end
  -- within EPS of t: record t, so the recorded history keeps every window exactly; now is read
  -- again in case a custom rule took time
  return "go", math.max(#self.customs > 0 and self.now() or now, t)
end

-- The head of the queue: wait until the rules allow, then take the slot.
-- -> true, time recorded | false, reason
local function serve(self, domain, pending)
  while true do
    local what, a = check(self, domain)
    if what == "go" then
      record(self, a, domain)
      if pending then self.inflight[self.seq] = true end
      return true, a
    end
    if what == "refuse" then return false, a end
    if a == math.huge then                           -- an answer must come first: complete() wakes us
      local co, is_task = core.current()
      if not is_task then error("rate: waiting for complete() needs a task", 0) end
      self.answer_waiter = co
      core.suspend()
    else
      self.sleep(a)
    end
  end
end

-- The head leaves the queue and hands the turn to the next task.
local function leave(self)
  self.queue[self.qhead] = nil
  self.qhead = self.qhead + 1
  if self.qhead <= self.qtail then
    core.wake(self.queue[self.qhead])
  else
    self.qhead, self.qtail = 1, 0
  end
end

local function check_domain(domain)
  if domain ~= nil and type(domain) ~= "string" then error("rate: domain must be a string", 3) end
end

--- limiter:acquire([domain]) -> seconds waited, time recorded | nil, reason (a custom rule refused).
--- Waits (in a task) until one more send respects every rule, then records it.  FIFO.
function Limiter:acquire(domain)
  return self:take(domain, false)
end

--- limiter:begin([domain]) -> token | nil, reason: like acquire, but the slot counts as busy
--- until limiter:complete(token), and from then on at the time of completion (see the top).
function Limiter:begin(domain)
  local waited, at, token = self:take(domain, true)
  if not waited then return nil, at end
  return token
end

--- limiter:complete(token): the server answered the message sent under this slot.
function Limiter:complete(token)
  if not self.inflight[token] then error("rate: complete: unknown or completed token", 2) end
  self.inflight[token] = nil
  local t = self.now()
  if token > self.seq - self.cap then self.ring[(token - 1) % self.cap + 1] = math.max(t, self.last or t) end
  for _, w in ipairs(self.windows) do
    if token <= w.k then w.pend = w.pend - 1; w.latest = math.max(w.latest, t) end
  end
  local co = self.answer_waiter
  if co then self.answer_waiter = nil; core.wake(co) end
end

function Limiter:take(domain, pending)
  check_domain(domain)
  local t0 = self.now()
  if self.qhead > self.qtail then                    -- nobody waits: we are the head at once
    self.qtail = self.qtail + 1
    self.queue[self.qtail] = true                    -- (nobody will need to wake the head)
  else
    local co, is_task = core.current()
    if not is_task then error("rate: acquire must run in a task (mailshot.spawn)", 2) end
    self.qtail = self.qtail + 1
    self.queue[self.qtail] = co
    core.suspend()                                   -- the task before us wakes us when it is done
  end
  -- Only the head checks and records, so a custom rule that yields cannot let another task
  -- take the slot it saw free.
  local ok, sent, at = pcall(serve, self, domain, pending)
  leave(self)                                        -- even on an error: never strand the others
  if not ok then error(sent, 0) end
  if not sent then return nil, at end
  return math.max(0, at - t0), at, self.seq
end

--- limiter:try([domain]) -> true (slot taken) | false, seconds to wait | nil, reason.
--- Never waits.  While tasks are queued in acquire, it gives way to them.
function Limiter:try(domain)
  check_domain(domain)
  if self.qhead <= self.qtail then
    return false, math.max(0, ready_at(self) - self.now())
  end
  local what, a = check(self, domain)
  if what == "go" then record(self, a, domain); return true end
  if what == "wait" then return false, a end
  return nil, a
end

--- limiter:waiting() -> the number of tasks queued in acquire.
function Limiter:waiting() return self.qtail - self.qhead + 1 end

-- Surviving a restart ------------------------------------------------------------------------

-- A whole number as an integer (a state that went through JSON may bring 12.0 back for 12).
local function int(x) return type(x) == "number" and math.tointeger(x) or nil end

local function copy_counter(c) return { total = int(c.total), today = int(c.today), day = int(c.day) } end

--- limiter:state() -> a plain table (numbers, strings, tables) to store; times in it are
--- wall-clock epoch seconds, since a monotonic clock means nothing in another process.
function Limiter:state()
  local off, sends = self.offset, {}
  local now = self.now()
  for k = math.max(1, self.seq - self.cap + 1), self.seq do
    sends[#sends + 1] = (self.inflight[k] and now or self.ring[(k - 1) % self.cap + 1]) + off
  end
  local specs, domains = {}, {}
  for i, r in ipairs(self.rules) do specs[i] = r.spec end
  for d, c in pairs(self.domains) do domains[d] = copy_counter(c) end
  return {
    version = 1, name = self.name, rules = specs,
    saved = self.now() + off, started = self.start + off, last = self.last and self.last + off,
    sends = sends, count = copy_counter(self.count), domains = domains,
  }
end

local function valid_counter(c)
  return type(c) == "table" and int(c.total) ~= nil and int(c.today) ~= nil and int(c.day) ~= nil
end

local function valid_state(st)
  if type(st) ~= "table" or st.version ~= 1 or type(st.started) ~= "number" or type(st.sends) ~= "table"
    or (st.last ~= nil and type(st.last) ~= "number") or not valid_counter(st.count)
    or type(st.domains) ~= "table" then
    return false
  end
  for _, t in ipairs(st.sends) do if type(t) ~= "number" then return false end end
  for d, c in pairs(st.domains) do if type(d) ~= "string" or not valid_counter(c) then return false end end
  return true
end

--- limiter:restore(state): continue from a state() saved by an earlier run.  Only on a limiter
--- that has not sent yet.  Restored times err late (by up to 2 s), never early.
function Limiter:restore(st)
  if not valid_state(st) then error("rate: restore: not a state made by limiter:state()", 2) end
  if self.count.total > 0 then error("rate: restore: the limiter has already recorded sends", 2) end
  local function mono(w) return w - self.offset + RESTORE_MARGIN end
  local sends = {}
  for i, w in ipairs(st.sends) do sends[i] = mono(w) end
  table.sort(sends)
  self.seq, self.ring, self.last = 0, {}, st.last and mono(st.last)
  if self.cap > 0 then
    for i = math.max(1, #sends - self.cap + 1), #sends do
      self.seq = self.seq + 1
      self.ring[(self.seq - 1) % self.cap + 1] = sends[i]
    end
  end
  if #sends > 0 and (not self.last or sends[#sends] > self.last) then self.last = sends[#sends] end
  for _, w in ipairs(self.windows) do w.k, w.latest, w.pend = 0, -math.huge, 0 end
  self.start = mono(st.started)
  self.count = copy_counter(st.count)
  self.domains = {}
  for d, c in pairs(st.domains) do self.domains[d] = copy_counter(c) end
end

return M
