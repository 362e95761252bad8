-- test_direct_policy.lua - direct delivery's private-address policy on plans made by hand, with
-- the public addresses the integration tests cannot have (they only have loopback): a mix uses
-- the public ones, refusals are listed, and only a domain out for reasons of policy alone is
-- refused for good.  No network: mailshot.direct.screen works on a plan, dns.address_class on text.
--   MAILSHOT_LUA_PATH=lua ./mailshot exec tests/lua/test_direct_policy.lua
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, eq_deep = check.case, check.eq, check.eq_deep

local direct = require "mailshot.direct"
local dns = require "mailshot.dns"

case("address classes from Lua", function()
  eq(dns.address_class("8.8.8.8"), nil)
  eq(dns.address_class("2001:4860:4860::8888"), nil)
  eq(dns.address_class("127.0.0.1"), "loopback")
  eq(dns.address_class("::ffff:192.168.0.1"), "private (RFC 1918)")
  eq(dns.address_class("fe80::1"), "link-local")
  eq(dns.address_class("mx.example.com"), "not an IP address")
end)

case("a mix keeps the public addresses, in order, and lists the refused ones", function()
  local plan = {
    { host = "mx1.example.com", preference = 10, addresses = { "fd00::1", "192.0.2.10", "93.184.216.34" } },
    { host = "mx2.example.com", preference = 20, addresses = { "10.0.0.5" } },
    { host = "mx3.example.com", preference = 30, addresses = { "2606:2800:220:1::1", "203.0.114.9" } },
  }
  local usable, policy_only = direct.screen(plan, false)
  eq(usable, 3)
  eq(policy_only, false)
  eq_deep(plan[1].addresses, { "93.184.216.34" })
  eq_deep(plan[2].addresses, {})
  eq_deep(plan[3].addresses, { "2606:2800:220:1::1", "203.0.114.9" })
  eq_deep(plan[1].refused, { { address = "fd00::1", why = "unique local (RFC 4193)" },
                             { address = "192.0.2.10", why = "reserved for documentation (RFC 5737)" } })
  eq_deep(direct.refusals(plan), { "mx1.example.com fd00::1 (unique local (RFC 4193))",
    "mx1.example.com 192.0.2.10 (reserved for documentation (RFC 5737))", "mx2.example.com 10.0.0.5 (private (RFC 1918))" })
end)

case("allow_private keeps everything", function()
  local plan = { { host = "mx.example.com", addresses = { "127.0.0.1", "10.0.0.1" } } }
  eq(select(1, direct.screen(plan, true)), 2)
  eq_deep(plan[1].addresses, { "127.0.0.1", "10.0.0.1" })
  eq_deep(plan[1].refused, {})
end)

case("only policy reasons make a refusal final", function()
  -- every host private or an MX naming an IP: final
  local plan = { { host = "mx.example.com", addresses = { "169.254.0.1" } },
                 { host = "10.0.0.1", addresses = {}, error = "MX host 10.0.0.1 is an IP address", error_kind = "mx_literal" } }
  local usable, policy_only = direct.screen(plan, false)
  eq(usable, 0)
  eq(policy_only, true)
  -- one host private, another without an address (a DNS timeout, say): may work later
  plan = { { host = "mx1.example.com", addresses = { "127.0.0.2" } },
           { host = "mx2.example.com", addresses = {}, error = "no answer", error_kind = "noaddress" } }
  usable, policy_only = direct.screen(plan, false)
  eq(usable, 0)
  eq(policy_only, false)
end)

return check.finish("test_direct_policy.lua")
