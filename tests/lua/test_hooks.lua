-- test_hooks.lua - the ready-made on_result hooks.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case = check.case

local hooks = require "mailshot.hooks"

case("a 4.7.x policy block becomes final, other 4xx stay temporary", function()
  local r = { ok = false, code = 450, enhanced = "4.7.1", temporary = true, message = "blocked" }
  hooks.policy_blocks_are_final(r)
  assert(r.temporary == false and r.retry == false)
  local g = { ok = false, code = 451, enhanced = "4.2.0", temporary = true, message = "busy" }
  hooks.policy_blocks_are_final(g)
  assert(g.temporary == true and g.retry == nil)
end)

case("retry_when retries a matching 5xx only", function()
  local hook = hooks.retry_when("try again later")
  local r = { ok = false, code = 550, temporary = false, message = "Greylisted, please try again later" }
  hook(r)
  assert(r.retry == true)
  local n = { ok = false, code = 550, temporary = false, message = "No such user" }
  hook(n)
  assert(n.retry == nil)
  assert(not pcall(hooks.retry_when, 42))
end)

case("chain runs every hook and lets one replace the result", function()
  local seen = {}
  local h = hooks.chain(function(r) seen[#seen + 1] = r.code end,
                        function() return { ok = true, code = 250 } end,
                        function(r) seen[#seen + 1] = r.code end)
  local out = h({ ok = false, code = 550 })
  assert(out.ok and seen[1] == 550 and seen[2] == 250)
  assert(not pcall(hooks.chain, "x"))
end)

return check.finish("test_hooks.lua")
