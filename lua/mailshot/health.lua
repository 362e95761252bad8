-- mailshot.health: how each path of a run is doing, and when a relay counts as down.
--
-- A path is where a send's result came from: a relay (result.relay, "host:port", set in
-- src/l_smtp.c), direct delivery, or the campaign's own send function.  For each path the run
-- keeps the rows it left failed or deferred and its last failure's reason: the progress line and
-- the end-of-run summary show them ("relay smtp.example.com:587: 40 deferred; last: ...").
--
-- The relay-down rule (the campaign's `stop_when_down = { failures = 20, seconds = 60 }`): a
-- relay is down when `failures` sends through it in a row failed before a transaction (see
-- down_failure; a row retried in the run counts once per try), the first and the last of them at
-- least `seconds` apart, with no row in between delivered through it or after it (a fallback that
-- delivers the row resets the count: the run is still delivering).  A failed send counts only
-- when its row was not delivered any other way: the row ends deferred (or waits for a retry), or
-- the relay's own failure is its final outcome.  When the relay's failures are permanent (a certificate that does not verify, our own
-- refusal to send the password in plaintext...), each row costs a recipient, not a delay, so
-- `failures` of them are enough, however fast they came.  Direct delivery is never "down": its
-- failures are per recipient domain.

local core = require("mailshot.core")

local M = {}

M.DEFAULT = { failures = 20, seconds = 60 }

-- result.error kinds that say the relay could not be used at all
local DOWN_KINDS = { dns = true, connect = true, tls = true, cert = true, auth = true }
-- ...and these, when they happened before MAIL (the session never got to a message)
local BEFORE_TRANSACTION = { connect = true, tls = true, greeting = true, ehlo = true, helo = true,
                             starttls = true, auth = true }
local DOWN_BEFORE_TRANSACTION = { timeout = true, closed = true, protocol = true, ["local"] = true }

--- Is t (a relay's result, or an entry of a fallback result's `fallback` list) a failure that
--- says the relay is unusable: no DNS answer for its name, no connection, a failed TLS handshake
--- or certificate, a refused login (error `auth`), or a timeout, a closed connection, a broken
--- protocol or our own refusal (no STARTTLS, no AUTH in common) before the transaction?  A 4xx or
--- 5xx reply is not: the relay is up and answering.
function M.down_failure(t)
  if type(t) ~= "table" or t.ok or type(t.relay) ~= "string" then return false end
  return DOWN_KINDS[t.error] == true
         or (BEFORE_TRANSACTION[t.stage] == true and DOWN_BEFORE_TRANSACTION[t.error] == true)
end

local function one_line(s, max)
  s = tostring(s or "?"):gsub("%s+", " ")
  if #s > max then s = s:sub(1, max - 3) .. "..." end
  return s
end

-- A failure's reason: the server's reply with its code ("451 4.2.1 try later"), or our words.
local function reason(t)
  local words = tostring(t.message or "?")
  local code = math.tointeger(t.code)
  if code and code > 0 and not words:find("^" .. code) then
    words = ("%d %s%s"):format(code, t.enhanced and (t.enhanced .. " ") or "", words)
  end
  return one_line(words, 160)
end

--- The path a result came from: "relay HOST:PORT", "direct delivery", "relay" (a relay's rate
--- limit, which names no relay) or "send function".
function M.path_of(res)
  if type(res.relay) == "string" then return "relay " .. res.relay end
  if res.via == "direct" then return "direct delivery" end
  if res.via == "relay" then return "relay" end
  return "send function"
end

local Health = {}
Health.__index = Health

--- health.new(rule [, clock]): rule = { failures = n, seconds = s }, or false for no stop;
--- clock: the time source (core.now; tests give their own).
function M.new(rule, clock)
  return setmetatable({ rule = rule, now = clock or core.now, paths = {}, order = {}, streaks = {},
                        down = nil }, Health)
end

function Health:path(name)
  local p = self.paths[name]
  if not p then
    p = { name = name, deferred = 0, failed = 0 }
    self.paths[name] = p
    self.order[#self.order + 1] = p
  end
  return p
end

--- A send's result res, mapped to report row rep (outcome.from_result: rep.temporary says
--- whether the row waits for another try).  Notes its path in rep (rep.path, rep.relay), the
--- path's last failure, and the relay-down streaks; sets self.down = { relay, count, seconds,
--- reason, text } the first time a relay is down.
function Health:result(res, rep)
  local name = M.path_of(res)
  rep.path, rep.relay = name, res.relay
  if not res.ok then
    local p = self:path(name)
    local why = reason(res)
    p.last = why
    if rep.temporary then p.last_temporary = why end
  end
  if self.rule then self:track(res, rep) end
end

function Health:track(res, rep)
  local tries = type(res.fallback) == "table" and #res.fallback > 0 and res.fallback or { res }
  local now = self.now()
  for i, t in ipairs(tries) do
    local relay = type(t) == "table" and t.relay
    if type(relay) == "string" then
      if M.down_failure(t) and not res.ok and (rep.temporary or i == #tries) then
        local s = self.streaks[relay]
        if not s then s = { count = 0, permanent = 0, first = now }; self.streaks[relay] = s end
        s.count, s.last, s.reason = s.count + 1, now, reason(t)
        if not rep.temporary then s.permanent = s.permanent + 1 end
        self:judge(relay, s)
      else
        self.streaks[relay] = nil          -- delivered (this way or another), or the relay answered
      end
    end
  end
end

function Health:judge(relay, s)
  local rule = self.rule
  if self.down or s.count < rule.failures then return end
  local span = s.last - s.first
  if span < rule.seconds and s.permanent < rule.failures then return end
  self.down = { relay = relay, count = s.count, seconds = span, reason = s.reason,
                text = ("relay %s failed %d times in a row over %s s (last: %s)"):format(
                  relay, s.count, span < 10 and ("%.1f"):format(span) or ("%.0f"):format(span), s.reason) }
end

--- A row's final outcome (its report row, status failed or deferred): counted for its path.
function Health:final(rep)
  if not rep.path or (rep.status ~= "deferred" and rep.status ~= "failed") then return end
  local p = self:path(rep.path)
  p[rep.status] = p[rep.status] + 1
end

--- For the progress line: the relay failing the longest run of rows right now (two or more),
--- as "REASON; N in a row" (REASON cut to `max` characters), or nil.
function Health:progress(max)
  local worst, name
  for relay, s in pairs(self.streaks) do
    if s.count >= 2 and (not worst or s.count > worst.count) then worst, name = s, relay end
  end
  if not worst then return nil end
  local why = worst.reason
  if not why:find(name, 1, true) then why = ("relay %s: %s"):format(name, why) end
  return ("%s; %d in a row"):format(one_line(why, max or 60), worst.count)
end

--- One line per path that left rows failed or deferred, in the order the paths first failed:
--- "relay HOST:PORT: 40 deferred, 2 failed; last: REASON".
function Health:summary()
  local out = {}
  for _, p in ipairs(self.order) do
    if p.deferred + p.failed > 0 then
      local n = {}
      if p.deferred > 0 then n[#n + 1] = ("%d deferred"):format(p.deferred) end
      if p.failed > 0 then n[#n + 1] = ("%d failed"):format(p.failed) end
      out[#out + 1] = ("%s: %s; last: %s"):format(p.name, table.concat(n, ", "),
                                                   p.deferred > 0 and p.last_temporary or p.last or "?")
    end
  end
  return out
end

return M
