-- mailshot.sender: the one seam between a message and whatever sends it.
--
-- A sender is a relay, a direct sender, anything with :send(msg, row), or a function(msg, row).
-- Rate limits are applied here and only here: the campaign's own limiter and its recipient
-- domain's, a relay's `rate`, a direct sender's per-domain limiter all go through `limited`,
-- which takes a slot in each limiter in order (begin), sends, and gives the slots back when
-- the server has answered (complete), so the windows hold at the receiver too.  A limiter that
-- says no gives the one failure result every sender returns (see `failure`).

local M = {}

--- Call a sender: sender(msg, row) for a function, sender:send(msg, row) for an object.
function M.call(send, msg, row)
  if type(send) == "function" then return send(msg, row) end
  return send:send(msg, row)
end

--- The failure result of a sender (the fields of a relay's result): ok = false, code 0; kind is
--- the result's `error` (the kinds of the C client's results).  extra: more fields (via,
--- domain, attempts...).
function M.failure(kind, message, temporary, stage, extra)
  local r = { ok = false, code = 0, message = message, temporary = temporary, stage = stage, error = kind }
  for k, v in pairs(extra or {}) do r[k] = v end
  return r
end

local NONE = {}

--- limited(limiters, key, extra, fn, ...) -> fn(...)'s result, or the failure result of a
--- limiter that refused (stage "rate", temporary, with extra's fields) and that limiter.  limiters: a list of
--- rate limiters (false entries are skipped); key: the recipient domain, for per-domain rules.
--- Slots are held while fn runs and given back even when it raises (the error goes on).
function M.limited(limiters, key, extra, fn, ...)
  if limiters == NONE or #limiters == 0 then return fn(...) end      -- no per-message work
  local held = {}
  for _, lim in ipairs(limiters) do
    if lim then
      local token, why = lim:begin(key)
      if not token then
        for _, h in ipairs(held) do h[1]:complete(h[2]) end
        return M.failure("rate", "rate limit: " .. tostring(why), true, "rate", extra), lim
      end
      held[#held + 1] = { lim, token }
    end
  end
  local ok, result = pcall(fn, ...)
  for _, h in ipairs(held) do h[1]:complete(h[2]) end
  if not ok then error(result, 0) end
  return result
end

M.NONE = NONE

-- A relay with a `rate`: the C relay's methods, with send going through `limited`.
local Limited = {}
Limited.__index = Limited
Limited.__tostring = function(self) return tostring(self.relay) end

function Limited:send(msg, ...)
  local relay = self.relay
  return M.limited(self.limiters, nil, self.extra, relay.send, relay, msg, ...)
end
function Limited:check(...) return self.relay:check(...) end
function Limited:close(...) return self.relay:close(...) end
function Limited:stats(...) return self.relay:stats(...) end

local by_limiter = setmetatable({}, { __mode = "k" })   -- limiter -> its limited relay

--- A relay whose sends wait for limiter first (relay: the C object, unchanged).
function M.limited_relay(relay, limiter)
  -- a refusal names the relay as its results do (result.relay: "host:port")
  local extra = { via = "relay", relay = tostring(relay):match("^relay %((.*)%)$") }
  local limited = setmetatable({ relay = relay, limiter = limiter, limiters = { limiter }, extra = extra }, Limited)
  by_limiter[limiter] = limited
  return limited
end

--- share(limiter, other) -> other: the limited relay of `limiter` now waits for `other` instead
--- (a cluster run's shared limiter for the relay's `rate`: mailshot.cluster_rate).
function M.share(limiter, other)
  local limited = by_limiter[limiter]
  if limited then
    limited.limiter, limited.limiters = other, { other }
    by_limiter[other] = limited
  end
  return other
end

-- Senders that hand the message table, unchanged, to relay:send (mailshot's own relays, direct
-- senders, rate-limited relays, fallbacks of those): a gate in msg.gate holds their message back
-- until it opens (a cluster worker's in-flight mark, mailshot.cluster).  Any other sender (a
-- campaign's own function) is only called once the gate is open.
local passes = setmetatable({}, { __mode = "k" })

--- Record that `send` passes msg.gate on -> send.
function M.passes_gate(send)
  passes[send] = true
  return send
end

--- Does `send` pass msg.gate on to every relay:send it makes?
function M.gated(send)
  if passes[send] then return true end
  return getmetatable(send) == Limited and M.gated(send.relay)
end

--- unwrap(send) -> what to call, its own limiter (nil for any other sender).  The runner takes
--- a limited relay's limiter into its own list, so a message passes `limited` once.
function M.unwrap(send)
  if getmetatable(send) == Limited then return send.relay, send.limiter end
  return send
end

return M
