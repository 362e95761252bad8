-- mailshot.dns: MX, A, AAAA and TXT lookups for direct delivery, on the event loop (c-ares).
--
-- Answers are cached for their TTL within a run, and concurrent lookups of the same name share
-- one query, so a list with 100,000 gmail.com addresses asks for gmail.com's MX once.  IDN
-- domains are looked up in their A-label (punycode) form.

local core = require "mailshot.core"
local resolver = require "mailshot.resolver"
local idna = require "mailshot.idna"

local M = {
  negative_ttl = 300,   -- seconds an NXDOMAIN/NODATA answer is kept (no SOA minimum is read)
  failure_ttl = 30,     -- seconds a failed lookup (timeout, SERVFAIL, ...) is kept, so one dead server is not asked per recipient
  max_ttl = 86400,
  stats = { queries = 0, cache_hits = 0, shared = 0 },
}

local resolvers = {}   -- server list ("" = system configuration) -> resolver
local cache = {}       -- "TYPE name @servers" -> { expires, records|false, kind, msg }
local pending = {}     -- same key -> list of tasks waiting for the query in flight

-- "IP", "IP:PORT", "[v6]:PORT", "v6", a list of those, or the same separated by commas
-- -> the c-ares csv form
local function server_list(server)
  if server == nil or server == "" then return "" end
  local list = server
  if type(server) == "string" then
    list = {}
    for s in server:gmatch("[^,%s]+") do list[#list + 1] = s end
  end
  local out = {}
  for i, s in ipairs(list) do
    if type(s) ~= "string" then error("dns: server must be a string or a list of strings", 4) end
    local ok = s:match("^%d+%.%d+%.%d+%.%d+$") or s:match("^%d+%.%d+%.%d+%.%d+:%d+$")
      or s:match("^%[[%x:%.]+%]:%d+$") or s:match("^[%x:]+$")
    if not ok then error(("dns: server %q is not IP[:PORT]"):format(s), 4) end
    out[i] = s
  end
  return table.concat(out, ",")
end

local function get_resolver(servers, opts)
  local key = servers .. "|" .. tostring(opts.timeout or "") .. "|" .. tostring(opts.tries or "")
  local r = resolvers[key]
  if not r then
    local err
    r, err = resolver.new { servers = servers ~= "" and servers or nil, timeout = opts.timeout, tries = opts.tries }
    if not r then return nil, err end
    resolvers[key] = r
  end
  return r
end

--- The kinds of failure that say nothing about the name: the question could not be asked, or
--- got no usable answer (a lookup worth repeating later, or with another server).
M.UNANSWERED = { timeout = true, servfail = true, refused = true, connrefused = true, unanswered = true,
                 formerr = true, notimp = true, error = true, cancelled = true }

-- One cached, shared lookup: records | nil, kind, message.  opts.deadline (core.now() time):
-- no answer by then is a "timeout", however many tries c-ares had left.
local function lookup(name, qtype, opts)
  opts = opts or {}
  local servers = server_list(opts.server)
  local key = qtype .. " " .. name .. " @" .. servers
  local now = core.now()
  local c = cache[key]
  if c and c.expires > now then
    M.stats.cache_hits = M.stats.cache_hits + 1
    return c.records or nil, c.kind, c.msg
  end
  local left
  if opts.deadline then
    left = opts.deadline - now
    if left <= 0 then return nil, "timeout", "no answer from the DNS server (timeout) within the time allowed" end
  end
  local waiting = pending[key]
  if waiting then
    M.stats.shared = M.stats.shared + 1
    waiting[#waiting + 1] = core.current()
    return core.suspend()
  end
  local r, err = get_resolver(servers, opts)
  if not r then return nil, "error", err end
  waiting = {}
  pending[key] = waiting
  M.stats.queries = M.stats.queries + 1
  local records, kind, msg = r:query(name, qtype, left and math.min(left, 3600))
  local ttl
  if records then
    ttl = M.max_ttl
    for _, rec in ipairs(records) do ttl = math.min(ttl, rec.ttl) end
  else
    ttl = (kind == "nxdomain" or kind == "nodata") and M.negative_ttl or M.failure_ttl
  end
  cache[key] = { expires = core.now() + ttl, records = records or false, kind = kind, msg = msg }
  pending[key] = nil
  for _, co in ipairs(waiting) do core.wake(co, records, kind, msg) end
  return records, kind, msg
end

local function ascii_name(domain)
  if type(domain) ~= "string" then error("dns: expected a domain name", 3) end
  -- plain ASCII names go as they are (lower-cased): service names such as _dmarc.example or
  -- s1._domainkey.example are not host names, and the host-name rules of IDNA refuse "_"
  if not domain:find("[^%w%.%-_]") and #domain <= 253 and not domain:find("%.%.") and domain ~= "" then
    return (domain:gsub("%.$", "")):lower()
  end
  local ascii, err = idna.to_ascii(domain)
  if not ascii then return nil, err end   -- err names the domain: 'invalid domain "a..b": empty label'
  return ascii
end

-- One sentence naming the name, for each kind of failure.
local function describe(kind, name, msg, qtype)
  if kind == "nxdomain" then return ("%s does not exist (NXDOMAIN)"):format(name) end
  if kind == "nodata" then return ("%s has no %s record"):format(name, qtype) end
  if kind == "timeout" then return ("no answer from the DNS server for %s %s (timeout)"):format(name, qtype) end
  if kind == "servfail" then return ("the DNS server failed (SERVFAIL) on %s %s"):format(name, qtype) end
  if kind == "refused" then return ("the DNS server refused the query for %s %s (REFUSED)"):format(name, qtype) end
  if kind == "connrefused" then
    return ("cannot ask for %s %s: connection to the DNS server refused (nothing listening?)"):format(name, qtype)
  end
  return ("DNS lookup of %s %s failed: %s"):format(name, qtype, msg)
end

--- MX hosts of a domain sorted by preference: { {host, preference, ttl}, ... }
--- or nil, message, kind: nxdomain, nodata, nullmx, badname, or a kind of M.UNANSWERED
--- (timeout, servfail, refused, connrefused, unanswered, formerr, notimp, error).
function M.mx(domain, opts)
  local name, err = ascii_name(domain)
  if not name then return nil, err, "badname" end
  local records, kind, msg = lookup(name, "MX", opts)
  if not records then return nil, describe(kind, name, msg, "MX"), kind end
  local list = {}
  for _, r in ipairs(records) do
    if r.host ~= "" then list[#list + 1] = { host = r.host:lower(), preference = r.preference, ttl = r.ttl } end
  end
  if #list == 0 then   -- RFC 7505: a single MX of "." says the domain accepts no mail
    return nil, ("%s has a null MX: it accepts no mail (RFC 7505)"):format(name), "nullmx"
  end
  table.sort(list, function(a, b)
    if a.preference ~= b.preference then return a.preference < b.preference end
    return a.host < b.host
  end)
  return list
end

local function addresses(qtype)
  return function(name, opts)
    local ascii, err = ascii_name(name)
    if not ascii then return nil, err, "badname" end
    local records, kind, msg = lookup(ascii, qtype, opts)
    if not records then return nil, describe(kind, ascii, msg, qtype), kind end
    local list = {}
    for i, r in ipairs(records) do list[i] = { address = r.address, ttl = r.ttl } end
    return list
  end
end

--- IPv4 / IPv6 addresses: { {address, ttl}, ... } or nil, message, kind.
M.a = addresses("A")
M.aaaa = addresses("AAAA")

--- TXT records (character-strings joined): { {text, ttl}, ... } or nil, message, kind.
function M.txt(name, opts)
  local ascii, err = ascii_name(name)
  if not ascii then return nil, err, "badname" end
  local records, kind, msg = lookup(ascii, "TXT", opts)
  if not records then return nil, describe(kind, ascii, msg, "TXT"), kind end
  return records
end

-- Fisher-Yates over each run of equal preferences (RFC 5321 §5.1: spread the load).
local function shuffle_equal(list)
  local i = 1
  while i <= #list do
    local j = i
    while j < #list and list[j + 1].preference == list[i].preference do j = j + 1 end
    for k = j, i + 1, -1 do
      local r = math.random(i, k)
      list[k], list[r] = list[r], list[k]
    end
    i = j + 1
  end
end

--- Why an address must not be connected to by direct delivery: nil for a global unicast
--- address, else "loopback", "private (RFC 1918)", "link-local", "multicast", ... (C: dns.c).
M.address_class = resolver.address_class

-- An MX host spelt as an IP address ("127.0.0.1", "[10.0.0.1]", "::1"): RFC 5321 §5.1 says MX
-- records name hosts, so such a record is a mistake (or a trick); it is not used, as Exim does
-- by default (allow_mx_to_ip = false).
local function ip_literal(host)
  return host:sub(1, 1) == "[" or resolver.address_class(host) ~= "not an IP address"
end

--- The direct sender's plan for a domain (RFC 5321 §5.1): hosts in the order they are tried,
--- each with its addresses (IPv6 first, then IPv4).
---   { { host, preference, implicit, addresses = { "::1", "127.0.0.2" }, error = "..." }, ... }
--- An MX host given as an IP address gets no addresses and error_kind = "mx_literal".
--- or nil, message, kind when the domain cannot receive mail or the lookup failed.
--- No MX records means the domain's own addresses (an implicit MX).
function M.plan(domain, opts)
  opts = opts or {}
  local name, err = ascii_name(domain)
  if not name then return nil, err, "badname" end
  local hosts, msg, kind = M.mx(name, opts)
  if not hosts then
    if kind ~= "nodata" then return nil, msg, kind end
    hosts = { { host = name, preference = 0, implicit = true } }
  else
    shuffle_equal(hosts)
  end
  local families = opts.families or { "aaaa", "a" }
  for _, h in ipairs(hosts) do
    h.addresses = {}
    local problems, unanswered = {}, nil
    if not h.implicit and ip_literal(h.host) then
      h.error = ("MX host %s is an IP address, not a host name (RFC 5321 section 5.1): not used"):format(h.host)
      h.error_kind = "mx_literal"
      goto next_host
    end
    for _, fam in ipairs(families) do
      local list, aerr, akind = M[fam](h.host, opts)
      if list then
        for _, a in ipairs(list) do h.addresses[#h.addresses + 1] = a.address end
      elseif akind ~= "nodata" then
        problems[#problems + 1] = aerr
        if M.UNANSWERED[akind] then unanswered = unanswered or akind end
      end
    end
    if #h.addresses == 0 then
      h.error = #problems > 0 and table.concat(problems, "; ") or ("%s has no address"):format(h.host)
      h.error_kind = "noaddress"
      h.dns_kind = unanswered   -- the address lookups got no answer (not "no address")
    end
    ::next_host::
  end
  if hosts[1].implicit and #hosts[1].addresses == 0 then
    if hosts[1].dns_kind then   -- no MX, and the address lookups were not answered
      return nil, ("%s has no MX records, and its addresses could not be looked up: %s"):format(name, hosts[1].error),
             hosts[1].dns_kind
    end
    return nil, ("%s has neither MX nor address records"):format(name), "nodata"
  end
  return hosts
end

--- Forget every cached answer (the next lookups ask again).
function M.flush() cache = {} end

return M
