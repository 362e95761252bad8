-- mailshot.preflight: check a campaign before sending it.
--
-- Renders every message (nothing is sent), then looks at what decides whether mail is read:
-- for the From domain, SPF, the DKIM key published at the selector (and whether it matches the
-- campaign's private key), DMARC and the alignment of From with the DKIM domain (SPF at the
-- return_path domain instead when the campaign has one: it is the envelope sender's, and it
-- must receive mail and should align with From); for the list,
-- the recipients per domain, domains that cannot receive mail (NXDOMAIN, null MX, no MX and no
-- address), invalid, suppressed and duplicate rows.  Problems are ranked: "blocking" ones make
-- `mailshot preflight` exit 1.

local core = require("mailshot.core")
local dns = require("mailshot.dns")
local direct = require("mailshot.direct")
local classify = require("mailshot.classify")
local rows = require("mailshot.rows")

local M = {}

local RANK = { blocking = 1, warning = 2, info = 3 }

local function tag_value(record, tag)
  return record:match("[;%s]" .. tag .. "%s*=%s*([^;]*)") or record:match("^" .. tag .. "%s*=%s*([^;]*)")
end

-- The TXT records of name that start with prefix (case-insensitively).
local function txt_with(name, prefix, opts)
  local records, err, kind = dns.txt(name, opts)
  if not records then return nil, err, kind end
  local out = {}
  for _, r in ipairs(records) do
    if r.text:lower():sub(1, #prefix) == prefix then out[#out + 1] = r.text end
  end
  return out
end

-- Relaxed alignment (RFC 7489 §3.1.1), approximated without the public suffix list: the same
-- domain, or one a subdomain of the other.
local function aligned(a, b)
  a, b = a:lower(), b:lower()
  return a == b or a:sub(-(#b + 1)) == "." .. b or b:sub(-(#a + 1)) == "." .. a
end

-- "No record" is an answer; a timeout, SERVFAIL or REFUSED is none: say which it was.
local function unanswered(kind) return dns.UNANSWERED[kind] == true end

local function could_not_ask(add, what, name, err)
  add("blocking", "%s: could not ask for %s (no answer, so nothing is known about the record; try again, or --dns): %s",
      what, name, err)
end

local function check_spf(from_domain, opts, add)
  local spf, err, kind = txt_with(from_domain, "v=spf1", opts)
  if not spf or #spf == 0 then
    if unanswered(kind) then
      could_not_ask(add, "SPF", from_domain .. "'s SPF record", err)
    else
      add("blocking", "SPF: %s publishes no SPF record (v=spf1): receivers cannot tell your servers from forgers", from_domain)
    end
    return
  end
  if #spf > 1 then add("blocking", "SPF: %s publishes %d SPF records; RFC 7208 §3.2 makes that a permanent error", from_domain, #spf) end
  local rec = spf[1]
  local all = rec:match("([%+%-~%?]?)all%s*$")
  if rec:find("%+all") then add("blocking", "SPF: %s ends with +all: anyone may send as you", from_domain)
  elseif all == "?" or not all then add("warning", "SPF: %s has no -all or ~all: it says nothing about other senders (%s)", from_domain, rec)
  else add("info", "SPF: %s: %s", from_domain, rec) end
  if opts.relay_addresses and #opts.relay_addresses > 0 then
    local covered = false
    for _, ip in ipairs(opts.relay_addresses) do
      if rec:find("ip[46]:" .. ip:gsub("%.", "%%."):gsub("%:", "%%:"), 1) then covered = true end
    end
    if not covered and not rec:find("include:") and not rec:find("%sa[%s:/]") and not rec:find("%smx") then
      add("warning", "SPF: the relay's address (%s) is not listed in %s's SPF record", table.concat(opts.relay_addresses, ", "), from_domain)
    elseif not covered then
      add("info", "SPF: the relay's address may be covered through include:, a or mx (not evaluated)")
    end
  end
end

local function check_dkim(c, from_domain, opts, add)
  if not c.signer then
    add("blocking", "DKIM: the campaign does not sign (dkim = { domain, selector, key_file }): bulk mail must be DKIM-signed since 2024")
    return
  end
  local d, s = c.dkim.domain, c.dkim.selector
  local name = s .. "._domainkey." .. d
  local recs, err, kind = txt_with(name, "v=dkim1", opts)
  if not recs and unanswered(kind) then
    could_not_ask(add, "DKIM", "the key at " .. name, err)
  elseif not recs or #recs == 0 then
    -- a key record may leave out v=DKIM1 (RFC 6376 §3.6.1): look for p= too
    local all = dns.txt(name, opts) or {}
    recs = {}
    for _, r in ipairs(all) do if tag_value(r.text, "p") then recs[#recs + 1] = r.text end end
  end
  if not recs then   -- could not ask: said above
  elseif #recs == 0 then
    add("blocking", "DKIM: no key published at %s%s", name, err and (" (" .. err .. ")") or "")
  else
    local want = tag_value(c.signer:dns_record(), "p"):gsub("%s", "")
    local got = (tag_value(recs[1], "p") or ""):gsub("%s", "")
    if got == "" then add("blocking", "DKIM: the key at %s is revoked (empty p=)", name)
    elseif got ~= want then add("blocking", "DKIM: the key published at %s does not match the campaign's private key %s", name, c.dkim.key_file)
    else add("info", "DKIM: the key at %s matches the campaign's private key (%s)", name, c.signer:algorithm()) end
  end
  if not aligned(d, from_domain) then
    add("blocking", "DKIM: the signing domain %s is not aligned with the From domain %s: DMARC will fail", d, from_domain)
  end
end

-- The return_path domain (mailshot.verp): bounces come back to it, so it must receive mail
-- (receivers that check the envelope sender's domain refuse mail from one that cannot), and SPF
-- passes DMARC for these messages only when it is aligned with the From domain.
local function check_return_path(domain, from_domain, opts, add)
  local plan, err, kind = dns.plan(domain, opts)
  if not plan and unanswered(kind) then
    could_not_ask(add, "return_path", domain .. "'s mail servers", err)
  elseif not plan then
    add("blocking", "return_path: %s cannot receive mail (%s): bounces to it would be lost, and receivers that "
        .. "check the envelope sender's domain refuse the messages", domain, err)
  else
    add("info", "return_path: bounces come back to %s (mail server %s); SPF is checked there", domain, plan[1].host)
  end
  if not aligned(domain, from_domain) then
    add("warning", "return_path: %s is not aligned with the From domain %s: SPF cannot pass DMARC for these "
        .. "messages, only an aligned DKIM signature can (use a subdomain of %s)", domain, from_domain, from_domain)
  end
end

local function check_dmarc(from_domain, opts, add)
  local recs, err, kind = txt_with("_dmarc." .. from_domain, "v=dmarc1", opts)
  if not recs and unanswered(kind) then
    could_not_ask(add, "DMARC", "the record at _dmarc." .. from_domain, err)
    return
  end
  if not recs or #recs == 0 then
    add("blocking", "DMARC: no record at _dmarc.%s: Gmail and Yahoo require one from bulk senders", from_domain)
    return
  end
  local p = (tag_value(recs[1], "p") or ""):lower()
  if p == "none" then add("info", "DMARC: policy none at _dmarc.%s (monitoring only)", from_domain)
  elseif p == "quarantine" or p == "reject" then add("info", "DMARC: policy %s at _dmarc.%s", p, from_domain)
  else add("warning", "DMARC: the record at _dmarc.%s has no valid p= tag: %s", from_domain, recs[1]) end
end

--- --connect: an EHLO/STARTTLS probe of each distinct MX host (no MAIL, no RCPT), a few at a
--- time, through relay:check() with opportunistic TLS.
function M.probe(hosts, opts, res, add)
  local smtp = require "mailshot.smtp"
  local keys = {}
  for k in pairs(hosts) do keys[#keys + 1] = k end
  table.sort(keys)
  res.probed = {}
  local next_i, running, me = 1, 0, core.current()
  local function worker()
    while next_i <= #keys do
      local key = keys[next_i]
      next_i = next_i + 1
      local h = hosts[key]
      local relay = smtp.relay { server = h.host .. ":" .. (opts.port or 25), address = h.addresses[1],
                                 tls = "opportunistic", verify = false, timeout = opts.connect_timeout or 10,
                                 helo = opts.helo }
      local info = relay and relay:check()
      if relay then relay:close() end
      res.probed[key] = info
      if not info or not info.ok then
        add("warning", "MX %s (%s): %s", h.host, h.addresses[1], info and info.message or "cannot probe")
      elseif not info.tls then
        add("warning", "MX %s (%s) does not offer STARTTLS: mail to it goes unencrypted", h.host, h.addresses[1])
      else
        add("info", "MX %s (%s): %s, %s", h.host, h.addresses[1], info.tls.version, info.tls.cipher)
      end
    end
    running = running - 1
    if running == 0 then core.wake(me) end
  end
  for _ = 1, math.min(8, #keys) do running = running + 1; core.spawn(worker) end
  if running > 0 then core.suspend() end
end

--- Run the preflight of campaign c.  opts: dns (server), relay_addresses, connect, port,
--- allow_private (direct delivery's policy: without it, MX addresses that are not global
--- unicast are not probed, and a domain whose every mail server is such is reported).  Returns a report:
--- { problems = { {rank, text} ... sorted }, domains = { [d] = n }, rows, invalid, suppressed,
---   duplicates, filtered, render_errors, bad_domains = { [d] = reason }, blocking = n }
function M.run(c, opts)
  opts = opts or {}
  local dopts = { server = opts.dns, timeout = opts.timeout or 3 }
  local problems = {}
  local function add(rank, fmt, ...) problems[#problems + 1] = { rank = rank, text = fmt:format(...) } end
  local res = { domains = {}, rows = 0, invalid = 0, suppressed = 0, duplicates = 0, filtered = 0, render_errors = 0,
                bad_domains = {}, skipped_rows = 0 }
  local reader, err = rows.open_reader(c)
  if not reader then return nil, err end
  -- undeclared, it stops --send; declared, its bad rows are skipped
  if err then add(c.encoding and "warning" or "blocking", "%s", err) end
  local from_domain, envelope_domain = nil, nil
  local first = rows.dedupe()
  while true do
    local row, line, msg = reader:read()
    if row == nil then break end
    if row == false then
      res.skipped_rows = res.skipped_rows + 1
      add("warning", "%s line %d: %s", c.recipients, line, msg)
    else
      -- the order of run: duplicates (mailshot.rows), then classify.row, then render
      res.rows = res.rows + 1
      local raw = row[c.email_field]
      local email, why, kind
      if not first(raw) then
        kind = "duplicate"
      else
        local ok, e, w, k = pcall(classify.row, c, row)
        if ok then email, why, kind = e, w, k else why, kind = tostring(e), "error" end
      end
      if kind == "duplicate" then
        res.duplicates = res.duplicates + 1
      elseif kind == "missing" or kind == "invalid" then
        res.invalid = res.invalid + 1
        if res.invalid <= 5 then
          add("warning", "%s line %d: invalid address %q: %s", c.recipients, line, raw or "", (why:gsub("^invalid email address: ", "")))
        end
      elseif kind == "suppressed" or kind == "role" then
        res.suppressed = res.suppressed + 1
      elseif kind == "filtered" then
        res.filtered = res.filtered + 1
      elseif kind == "error" then
        res.render_errors = res.render_errors + 1
        if res.render_errors <= 5 then add("blocking", "%s line %d: filter: %s", c.recipients, line, why) end
      else
        local domain = email:match("@([^@]+)$")
        res.domains[domain] = (res.domains[domain] or 0) + 1
        local m, merr = c:render(row, line)
        if not m then
          res.render_errors = res.render_errors + 1
          if res.render_errors <= 5 then add("blocking", "%s", merr) end
        elseif not from_domain then
          -- DKIM and DMARC judge the From header's domain; SPF the envelope sender's (MAIL FROM),
          -- which is the return_path domain when the campaign has one
          from_domain = (m.header_from or m.from):match("@([^@]+)$")
          envelope_domain = m.from:match("@([^@]+)$")
        end
      end
    end
  end
  reader:close()
  if res.invalid > 5 then add("warning", "... %d invalid addresses in all", res.invalid) end
  if res.render_errors > 5 then add("blocking", "... %d messages could not be rendered", res.render_errors) end
  if res.suppressed > 0 then add("info", "%d suppressed addresses will be skipped", res.suppressed) end
  if res.duplicates > 0 then add("info", "%d duplicate rows will be skipped", res.duplicates) end
  if res.filtered > 0 then add("info", "%d rows the campaign's filter leaves out will be skipped", res.filtered) end

  -- the recipient domains: every lookup in its own task (the DNS cache shares equal ones)
  local names, pending, me = {}, 0, core.current()
  for d in pairs(res.domains) do names[#names + 1] = d end
  table.sort(names)
  local hosts = {}                                   -- "host address" -> true, for --connect
  local refused = {}                                 -- "host address" -> why, not probed
  res.private_domains = {}                           -- domain -> what direct delivery refuses
  for _, d in ipairs(names) do
    pending = pending + 1
    core.spawn(function()
      local plan, perr, kind = dns.plan(d, dopts)
      if not plan then res.bad_domains[d] = { kind = kind, text = perr }
      else
        -- the same policy as direct delivery: no connection to private or reserved addresses
        local usable, policy_only = direct.screen(plan, opts.allow_private)
        if usable == 0 and policy_only then res.private_domains[d] = table.concat(direct.refusals(plan), "; ") end
        for _, h in ipairs(plan) do
          if h.addresses[1] then hosts[h.host .. " " .. h.addresses[1]] = h end
          for _, r in ipairs(h.refused) do refused[h.host .. " " .. r.address] = r.why end
        end
      end
      pending = pending - 1
      if pending == 0 then core.wake(me) end
    end)
  end
  if pending > 0 then core.suspend() end
  if opts.connect then
    M.probe(hosts, opts, res, add)
    for key, why in pairs(refused) do
      local host, address = key:match("^(%S+) (%S+)$")
      add("warning", "MX %s (%s): not probed: a %s address, which direct delivery refuses (--allow-private probes it)",
          host, address, why)
    end
  end
  for _, d in ipairs(names) do
    local bad = res.bad_domains[d]
    if bad and unanswered(bad.kind) then
      add("warning", "recipients: %d at %s: could not look up its mail servers (no answer, so nothing is known "
          .. "about the domain): %s", res.domains[d], d, bad.text)
    elseif bad then
      add("warning", "recipients: %d at %s, which cannot receive mail: %s", res.domains[d], d, bad.text)
    end
    if res.private_domains[d] then
      add("warning", "recipients: %d at %s, whose every mail server direct delivery refuses (private or reserved "
          .. "addresses; --allow-private accepts them; a relay may still deliver): %s", res.domains[d], d, res.private_domains[d])
    end
  end

  if envelope_domain and envelope_domain:lower() ~= from_domain:lower() then
    check_return_path(envelope_domain, from_domain, dopts, add)
  end
  if from_domain then
    check_spf(envelope_domain or from_domain, { server = opts.dns, timeout = dopts.timeout, relay_addresses = opts.relay_addresses }, add)
    check_dkim(c, from_domain, dopts, add)
    check_dmarc(from_domain, dopts, add)
  else
    add("blocking", "no message could be rendered: nothing to check the From domain of")
  end
  table.sort(problems, function(a, b)
    if RANK[a.rank] ~= RANK[b.rank] then return RANK[a.rank] < RANK[b.rank] end
    return a.text < b.text
  end)
  res.problems, res.blocking, res.from_domain = problems, 0, from_domain
  for _, p in ipairs(problems) do if p.rank == "blocking" then res.blocking = res.blocking + 1 end end
  return res
end

return M
