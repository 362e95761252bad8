-- mailshot.direct: delivery straight to each recipient domain's mail servers (RFC 5321 §5).
--
-- For a message: look the domain's MX hosts up (mailshot.dns.plan: preference order, equal
-- preferences shuffled, IPv6 then IPv4 addresses, implicit MX, null MX), then try them in turn.
-- A host that refuses the connection, times out, or answers 4xx/5xx before the transaction
-- (greeting, EHLO, TLS) is skipped for the next one; once a host has answered MAIL, RCPT or DATA,
-- its answer is the outcome (a 5xx is permanent; a 4xx is temporary and is not tried elsewhere,
-- as MTAs do).  Sessions to a host are pooled (one relay object per host and address), and a
-- domain gets at most `max_per_domain` connections at a time.
--
-- Private addresses: a recipient domain's DNS decides where direct delivery connects, so a list
-- with an address at a hostile (or broken) domain could make mailshot deliver to this machine or
-- the local network (an MX whose address is 127.0.0.1 or 10.0.0.5).  By default no connection
-- goes to an address that is not global unicast (loopback, RFC 1918, link-local, CGNAT,
-- multicast, reserved...: dns.address_class); `allow_private = true` allows them (tests, an
-- internal network).  A domain whose every mail server is refused fails permanently at stage
-- "dns" (result.dns = "private"); a mix uses the public ones.  `user@localhost` (RFC 6761: this
-- machine, not an internet domain) is refused the same way, and with allow_private goes to ::1
-- then 127.0.0.1 without DNS.  Address literals (`user@[192.0.2.1]`) are never delivered to, and
-- an MX record naming an IP address instead of a host is not used (dns.plan).

local core = require("mailshot.core")
local smtp = require("mailshot.smtp")
local dns = require("mailshot.dns")
local idna = require("mailshot.idna")
local rate = require("mailshot.rate")
local sender = require("mailshot.sender")

local M = {}
local Direct = {}
Direct.__index = Direct

local TLS_MODES = {
  opportunistic = { tls = "opportunistic", verify = false },   -- STARTTLS when offered, unverified, as MTAs do
  require = { tls = "starttls", verify = false },             -- fail without TLS
  verify = { tls = "starttls", verify = true },               -- TLS with a certificate valid for the MX name
  none = { tls = "none", verify = false },
}

-- Stages where the host never took part in a transaction: try the next one.
local BEFORE_TRANSACTION = { connect = true, tls = true, greeting = true, ehlo = true, helo = true, starttls = true }

local OPTIONS = { dns = true, helo = true, port = true, source = true, timeout = true, tls = true,
                  max_per_domain = true, ca_file = true, dns_timeout = true, trace = true, rate = true,
                  domain_rate = true, timeouts = true, allow_private = true }

--- A direct sender: `sender:send(msg)` -> result (a relay's result plus via, mx, address, attempts).
function M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("mailshot.direct_sender: expected a table of options", 3) end
  for k in pairs(opts) do
    if not OPTIONS[k] then error(("mailshot.direct_sender: unknown option '%s'"):format(tostring(k)), 3) end
  end
  local mode = TLS_MODES[opts.tls or "opportunistic"]
  if not mode then error("mailshot.direct_sender: tls must be \"opportunistic\", \"require\", \"verify\" or \"none\"", 3) end
  if opts.allow_private ~= nil and type(opts.allow_private) ~= "boolean" then
    error("mailshot.direct_sender: allow_private must be true or false", 3)
  end
  local port = math.tointeger(opts.port or 25)
  if not port or port < 1 or port > 65535 then error("mailshot.direct_sender: port must be 1..65535", 3) end
  return setmetatable({
    via = "direct",
    opts = opts,
    mode = mode,
    port = port,
    dns_opts = { server = opts.dns, timeout = opts.dns_timeout },
    allow_private = opts.allow_private == true,
    max_per_domain = opts.max_per_domain or 2,
    pools = {},        -- "host|address|tls" -> relay
    domains = {},      -- domain -> { active = n, waiting = { threads } }
    limiters = {},     -- domain -> rate limiter
    rate = opts.rate and rate.parse(opts.rate),
    domain_rate = opts.domain_rate,
  }, Direct)
end

function Direct:pool(host, address, mode)
  local key = host .. "|" .. address .. "|" .. mode.tls
  local relay = self.pools[key]
  if not relay then
    local server = host:find(":", 1, true) and ("[" .. host .. "]") or host
    local err
    relay, err = smtp.relay {
      server = server .. ":" .. self.port, address = address, tls = mode.tls, verify = mode.verify,
      ca_file = self.opts.ca_file, helo = self.opts.helo, timeout = self.opts.timeout or 60,
      timeouts = self.opts.timeouts,
      source = self.opts.source, max_connections = self.max_per_domain, trace = self.opts.trace,
    }
    if not relay then error("direct delivery: " .. err, 0) end
    self.pools[key] = relay
  end
  return relay
end

-- Each domain's rate limiter: domain_rate[domain] when given, else `rate` (each domain gets
-- its own limiter with that spec), else none.
function Direct:limiter(domain)
  local l = self.limiters[domain]
  if l == nil then
    local spec = self.domain_rate and self.domain_rate[domain] or self.rate
    l = spec and rate.new(spec, { name = "direct " .. domain }) or false
    self.limiters[domain] = l
  end
  return l or nil
end

-- Per-domain connection cap: a counting semaphore over core.suspend/wake.
function Direct:acquire(domain)
  local d = self.domains[domain]
  if not d then d = { active = 0, waiting = {} }; self.domains[domain] = d end
  if d.active >= self.max_per_domain then
    d.waiting[#d.waiting + 1] = core.current()
    core.suspend()          -- the releaser hands its slot over: active stays the same
  else
    d.active = d.active + 1
  end
end

function Direct:release(domain)
  local d = self.domains[domain]
  local next_task = table.remove(d.waiting, 1)
  if next_task then core.wake(next_task) else d.active = d.active - 1 end
end

local function recipients_of(msg)
  local to = msg.to
  if type(to) == "string" then return { to } end
  if type(to) ~= "table" or #to == 0 then error("direct delivery: msg.to must be an address or a list", 3) end
  return to
end

-- A failure of direct delivery itself; kind is the result's `error` (as the C client's, src/smtp.h).
local function failure(kind, message, temporary, stage, extra)
  local r = sender.failure(kind, message, temporary, stage, extra)
  r.via, r.attempts = "direct", r.attempts or {}
  return r
end

-- Try one host address; with opportunistic TLS a failed handshake is retried in plaintext,
-- as MTAs do (a broken TLS stack should not stop the mail).
function Direct:try(msg, host, address, attempts)
  local r = self:pool(host, address, self.mode):send(msg)
  attempts[#attempts + 1] = { host = host, address = address, ok = r.ok, code = r.code, enhanced = r.enhanced,
                              message = r.message, stage = r.stage, error = r.error }
  if not r.ok and r.stage == "tls" and self.mode.tls == "opportunistic" then
    r = self:pool(host, address, TLS_MODES.none):send(msg)
    attempts[#attempts + 1] = { host = host, address = address, ok = r.ok, code = r.code, enhanced = r.enhanced,
                                message = r.message, stage = r.stage, error = r.error, plaintext = true }
  end
  return r
end

local ALLOW_HINT = "set allow_private = true in the direct sender's options to allow them"

--- The private-address policy applied to a plan (in place): each host's addresses that are not
--- global unicast move from `addresses` to `refused` = { { address, why }, ... }, unless
--- allow_private.  Returns the number of addresses left to try, and whether every host is out
--- for a reason of policy (refused addresses, or an MX given as an IP address): then the
--- domain cannot be delivered to directly, now or later.
function M.screen(plan, allow_private)
  local usable, policy_only = 0, true
  for _, h in ipairs(plan) do
    h.refused = {}
    if not allow_private then
      local keep = {}
      for _, a in ipairs(h.addresses or {}) do
        local why = dns.address_class(a)
        if why then h.refused[#h.refused + 1] = { address = a, why = why } else keep[#keep + 1] = a end
      end
      h.addresses = keep
    end
    usable = usable + #h.addresses
    if #h.addresses > 0 or (#h.refused == 0 and h.error_kind ~= "mx_literal") then policy_only = false end
  end
  return usable, policy_only
end

--- "mx1.a.test 127.0.0.3 (loopback)" for each refused address of a screened plan.
function M.refusals(plan)
  local out = {}
  for _, h in ipairs(plan) do
    for _, r in ipairs(h.refused or {}) do out[#out + 1] = ("%s %s (%s)"):format(h.host, r.address, r.why) end
    if h.error_kind == "mx_literal" then out[#out + 1] = h.error end
  end
  return out
end

local function refused_attempts(h, attempts)
  for _, r in ipairs(h.refused or {}) do
    attempts[#attempts + 1] = { host = h.host, address = r.address, ok = false, code = 0, stage = "dns",
      message = ("refused %s (%s): direct delivery does not connect to private or reserved addresses"):format(r.address, r.why) }
  end
end

-- RFC 6761 §6.3: "localhost" and names under it are this machine, not an internet domain.
local function is_localhost(domain)
  return domain == "localhost" or domain:sub(-10) == ".localhost"
end

-- The hosts to try for domain: { plan } or nil, failure result.
function Direct:plan(domain)
  if is_localhost(domain) then
    if not self.allow_private then
      return nil, failure("dns", ("%s is this machine, not an internet mail domain (RFC 6761): direct delivery refuses it; %s"):format(
        domain, (ALLOW_HINT:gsub("them$", "it"))), false, "dns", { dns = "localhost", domain = domain })
    end
    return { { host = domain, preference = 0, implicit = true, addresses = { "::1", "127.0.0.1" } } }
  end
  local plan, err, kind = dns.plan(domain, self.dns_opts)
  if not plan then
    -- result.dns is the lookup's kind (mailshot.dns): nxdomain, nullmx, nodata and badname say
    -- the domain cannot receive mail; timeout, servfail, refused, connrefused... only that the
    -- DNS server gave no answer, which may come later
    local permanent = kind == "nxdomain" or kind == "nullmx" or kind == "nodata" or kind == "badname"
    return nil, failure("dns", err, not permanent, "dns", { dns = kind, domain = domain })
  end
  local usable, policy_only = M.screen(plan, self.allow_private)
  if usable == 0 and policy_only then
    local attempts = {}
    for _, h in ipairs(plan) do
      refused_attempts(h, attempts)
      if h.error_kind == "mx_literal" then
        attempts[#attempts + 1] = { host = h.host, ok = false, code = 0, message = h.error, stage = "dns" }
      end
    end
    local private = false
    for _, a in ipairs(attempts) do private = private or a.address ~= nil end
    local msg = ("direct delivery refuses every mail server of %s: %s"):format(domain, table.concat(M.refusals(plan), "; "))
    if private then msg = msg .. ("; private and reserved addresses are not on the internet (%s)"):format(ALLOW_HINT) end
    return nil, failure("dns", msg, false, "dns", { dns = private and "private" or "mx_literal", domain = domain, attempts = attempts })
  end
  return plan
end

--- Deliver msg ({ from, to, data }) to the recipient domain's mail servers.
function Direct:send(msg)
  local rcpts = recipients_of(msg)
  local domain
  for _, a in ipairs(rcpts) do
    if type(a) == "string" and a:find("@%[[^@]*%]$") then
      return failure("dns", ("%s: the domain is an address literal; direct delivery only delivers to domain names"):format(a),
                     false, "dns", { dns = "literal" })
    end
    local d, err = idna.address_domain_ascii(a)
    if not d then return failure("invalid", ("invalid recipient %s: %s"):format(a, err), false, "rcpt") end
    d = d:lower()
    if domain and d ~= domain then
      return failure("invalid", "direct delivery takes one recipient domain per message (" .. domain .. ", " .. d .. ")", false, "rcpt")
    end
    domain = d
  end
  local plan, refusal = self:plan(domain)
  if not plan then return refusal end
  local limiter = self:limiter(domain)
  local result = sender.limited(limiter and { limiter } or sender.NONE, domain,
                                { via = "direct", domain = domain, attempts = {} }, self.deliver, self, msg, plan, domain)
  return result
end

-- Try the plan's hosts in turn, within the domain's connection cap.
function Direct:deliver(msg, plan, domain)
  self:acquire(domain)
  local ok, result = pcall(function()
    local attempts, last = {}, nil
    for _, h in ipairs(plan) do
      refused_attempts(h, attempts)
      if h.error then
        attempts[#attempts + 1] = { host = h.host, ok = false, code = 0, message = h.error, stage = "dns" }
      end
      for _, address in ipairs(h.addresses) do
        local r = self:try(msg, h.host, address, attempts)
        last = r
        r.mx, r.address = h.host, address
        if r.ok or not (BEFORE_TRANSACTION[r.stage] or (r.code == 0 and r.temporary) or r.code == 421) then
          r.via, r.attempts, r.domain, r.relay = "direct", attempts, domain, nil   -- no relay: an MX host
          return r
        end
      end
    end
    -- every host failed before a transaction: worth another try later
    local r = last or failure("connect", ("no mail server of %s could be reached"):format(domain), true, "connect")
    r.ok, r.temporary, r.via, r.attempts, r.domain, r.relay = false, true, "direct", attempts, domain, nil
    r.mx, r.address = nil, nil
    if #plan > 1 or #(plan[1].addresses) > 1 then
      r.message = ("all %d mail servers of %s failed; last: %s"):format(#attempts, domain, r.message or "?")
    end
    return r
  end)
  self:release(domain)
  if not ok then error(result, 0) end
  return result
end

--- QUIT the pooled sessions.
function Direct:close()
  for _, relay in pairs(self.pools) do relay:close() end
end

M.Direct = Direct
return M
