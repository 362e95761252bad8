-- mailshot.hooks: ready-made reply hooks for a campaign's on_result.
--
--   on_result = mailshot.hooks.chain(
--     mailshot.hooks.policy_blocks_are_final,             -- 4.7.x: retrying will not help
--     mailshot.hooks.retry_when("5%.%d%.%d.*try again"))  -- a receiver that says 5xx but means 4xx
--
-- Without on_result the server's own reply class decides (2xx sent, 4xx retried, 5xx final),
-- which is what RFC 5321 asks of a client; these hooks are the common exceptions.

local M = {}

--- 4.7.x (policy: blocked, rate-limited for reputation, DMARC/SPF trouble) becomes final: the
--- same message retried in a few minutes meets the same policy.
function M.policy_blocks_are_final(result)
  if not result.ok and result.temporary and tostring(result.enhanced or ""):match("^4%.7%.") then
    result.temporary = false
    result.retry = false
  end
end

--- A 5xx whose text matches a Lua pattern is retried like a 4xx (a misconfigured receiver that
--- answers 5xx to a greylisting check, say).
function M.retry_when(pattern)
  if type(pattern) ~= "string" then error("hooks.retry_when: expected a Lua pattern", 2) end
  return function(result)
    if not result.ok and not result.temporary and tostring(result.message or ""):find(pattern) then
      result.retry = true
    end
  end
end

--- Run hooks in order; the first that returns a table replaces the result for the next ones.
function M.chain(...)
  local list = table.pack(...)
  for i = 1, list.n do
    if type(list[i]) ~= "function" then error(("hooks.chain: argument %d is not a function"):format(i), 2) end
  end
  return function(result, msg, row)
    for i = 1, list.n do
      local other = list[i](result, msg, row)
      if type(other) == "table" then result = other end
    end
    return result
  end
end

return M
