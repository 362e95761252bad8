-- Direct delivery with fallback rules of your own, in plain Lua.
--
--   DNS_SERVER=9.9.9.9 SMTP_SERVER=smtp.example.com:587 SMTP_USER=me SMTP_PASSWORD=... \
--     mailshot run scripts/examples/fallback/campaign.lua --send
--
-- The rules (change them as you like, they are just Lua):
--   * the big webmail domains refuse mail sent straight from home or office connections, so
--     hotmail.com and friends always go through the relay;
--   * everyone else is delivered directly to their own mail servers first;
--   * after a temporary failure (a 4xx, a dead server, no DNS answer) the domain is tried again
--     once, later, and only then through the relay;
--   * after a permanent failure (a 5xx: "no such user") nothing else is tried.
-- The ready-made rules are one line each:  send = mailshot.fallback { relay, direct }  (relay,
-- then direct on error) or  mailshot.fallback { direct, relay }  (direct, then relay).
local mailshot = require "mailshot"

local relay = mailshot.relay {
  server   = os.getenv "SMTP_SERVER" or "127.0.0.1:2525",
  tls      = os.getenv "SMTP_TLS" or "starttls",
  user     = os.getenv "SMTP_USER",
  password = os.getenv "SMTP_PASSWORD",
  ca_file  = os.getenv "SMTP_CA_FILE",
}

local direct = mailshot.direct_sender {
  dns  = os.getenv "DNS_SERVER",                 -- nil: the system's resolvers
  port = tonumber(os.getenv "DIRECT_PORT" or "25"),
  -- mail servers on private addresses (127.x, 10.x, 192.168.x, ...) are refused unless allowed:
  -- the tests' servers are on 127.0.0.x
  allow_private = os.getenv "DIRECT_ALLOW_PRIVATE" == "1",
}

local RELAY_ONLY = { ["hotmail.com"] = true, ["outlook.com"] = true, ["live.com"] = true, ["msn.com"] = true }
for d in (os.getenv "RELAY_ONLY_DOMAINS" or ""):gmatch("[^,%s]+") do RELAY_ONLY[d:lower()] = true end

local RETRY_AFTER = tonumber(os.getenv "RETRY_AFTER" or "60")   -- seconds before trying a domain again

local function send(msg)
  local domain = msg.email:match("@([^@]+)$"):lower()
  if RELAY_ONLY[domain] then return relay:send(msg) end
  local r = direct:send(msg)
  if r.ok or not r.temporary then return r end      -- delivered, or refused for good: done
  local first = mailshot.answer(r)                  -- the report's first_response column keeps it
  mailshot.sleep(RETRY_AFTER)                       -- this task waits; the others go on
  r = direct:send(msg)
  if not (r.ok or not r.temporary) then r = relay:send(msg) end
  r.first_response = first
  return r
end

return mailshot.campaign {
  name       = "fallback",          -- reports and journal: fallback-report.csv, fallback.journal
  recipients = "recipients.csv",
  from       = "Acme News <news@acme.example>",
  subject    = "Hello {{ first_name | \"there\" }}",
  text       = "Hello {{ first_name | \"there\" }},\n\nThis month at Acme: nothing but good news.\n",
  send       = send,
  concurrency = 16,
}
