-- mailshot.bounces: the `mailshot bounces` command's work.  Reads mailboxes (mailshot.mailbox),
-- parses and classifies each message (mailshot.bounce), ties it to a campaign and a recipient,
-- and acts: suppress (hard bounces and complaints at once, soft bounces after N in D days),
-- count, ignore, quarantine; one report row per address (or per message without one).
--
--   local summary = bounces.run {
--     sources = { "Maildir", "-" }, campaigns = { c1, c2 }, suppress = nil | "file",
--     report = "bounces-report.csv", dry_run = false, move_to = nil, quarantine = nil,
--     soft_limit = 3, soft_days = 7, max_bytes = 10 MB, mailbox = { user =, password_file =, ca_file = },
--     say = function(line) end, warn = function(line) end }
--
-- Decisions (README "mailshot bounces" says the same):
-- * Matching.  First a VERP token (campaign.verp: mailshot.verp) in the address the bounce came
--   to (b.envelope_candidates) or in the original's Return-Path: decoded and verified against
--   the address on that CSV line (or, when the list changed since, against the DSN's recipient).
--   A token that does not verify is "forged token", one of a campaign not given "another
--   campaign": reported, never acted on, the message left where it is.  Without a token, the
--   DSN's Final-Recipient / Original-Recipient (an ARF report's Original-Rcpt-To, the original's
--   To) is looked up in each campaign's recipient list; a Message-ID is not used, because
--   mailshot's Message-IDs are random and neither the report nor the journal keeps them.  With
--   no --campaign at all (only --suppress), every bounced address is taken as is.
-- * Thresholds (as listmonk): hard and complaint suppress at once; soft suppresses on the
--   soft_limit-th soft bounce within soft_days days (dated by the bounce's Date header, else the
--   time it is read); policy blocks (5.7.x: the sender's reputation or content, not the
--   address) and auto-replies never suppress; unknown and unparsed messages are quarantined,
--   never deleted, never suppressed.
-- * State: FILE.state beside the suppression file FILE holds the soft bounces counted (address,
--   time, key of the message) and, for POP3 (no flags on the server), the message ids already
--   processed.  Entries older than soft_days (POP3 ids: 90 days) are dropped when it is written,
--   atomically (a new 0600 file renamed over it) and under a lock (FILE.state.lock).
-- * Idempotence: a soft bounce is counted once per (message, address) key, however often the
--   mailbox is read; an address already in the suppression file is "already suppressed" and
--   not appended again; a quarantine copy of a read-only source is named after the message.

local bounce = require("mailshot.bounce")
local mailbox = require("mailshot.mailbox")
local suppress = require("mailshot.suppress")
local util = require("mailshot.util")
local text = require("mailshot.text")

local find, format, gsub, lower, match, sub = string.find, string.format, string.gsub, string.lower,
  string.match, string.sub

local M = {}

M.COLUMNS = { "source", "where", "message_id", "kind", "address", "campaign", "line", "class", "rule",
              "status", "diagnostic", "action" }
M.SOFT_LIMIT = 3
M.SOFT_DAYS = 7
local SEEN_DAYS = 90            -- POP3 message ids kept this long
local CLASSES = {}
for _, c in ipairs(bounce.CLASSES) do CLASSES[c] = true end

---------------------------------------------------------------- dates

local MONTHS = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6, jul = 7, aug = 8, sep = 9, oct = 10,
                 nov = 11, dec = 12 }

-- days since 1970-01-01 of a civil date (H. Hinnant's algorithm)
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

-- An RFC 5322 date ("Thu, 3 Dec 2026 13:20:00 +0000") -> Unix time | nil
function M.parse_date(s)
  if type(s) ~= "string" then return nil end
  local d, mon, y, hh, mm, rest = match(s, "(%d%d?)%s+(%a%a%a)%a*%s+(%d%d%d?%d?)%s+(%d%d?):(%d%d)(.*)$")
  if not d then return nil end
  local m = MONTHS[lower(mon)]
  if not m then return nil end
  y = tonumber(y)
  if y < 50 then y = y + 2000 elseif y < 1000 then y = y + 1900 end
  local ss = tonumber(match(rest, "^:(%d%d)")) or 0
  local sign, zh, zm = match(rest, "([+-])(%d%d)(%d%d)")
  local off = 0
  if sign then off = (tonumber(zh) * 60 + tonumber(zm)) * 60 * (sign == "-" and -1 or 1) end
  return days_from_civil(y, m, tonumber(d)) * 86400 + tonumber(hh) * 3600 + tonumber(mm) * 60 + ss - off
end

---------------------------------------------------------------- the state file

local State = {}
State.__index = State

local function new_state(path)
  return setmetatable({ path = path, soft = {}, keys = {}, seen = {}, changed = false }, State)
end

-- Lines: "soft\tADDRESS\tTIME\tKEY" and "seen\tSOURCE\tID\tTIME"; "#" comments.  A line that is
-- not one of these is dropped (and the file rewritten without it).
local function load_state(path)
  local st = new_state(path)
  local f = io.open(path, "rb")
  if not f then return st end
  for line in f:lines() do
    local kind, a, b, c = match(line, "^(%a+)\t([^\t]*)\t([^\t]*)\t([^\t]*)$")
    if kind == "soft" and tonumber(b) then
      local list = st.soft[a] or {}
      st.soft[a] = list
      list[#list + 1] = { t = tonumber(b), key = c }
      st.keys[c] = true
    elseif kind == "seen" and tonumber(c) then
      st.seen[a] = st.seen[a] or {}
      st.seen[a][b] = tonumber(c)
    end
  end
  f:close()
  return st
end

-- The soft bounces of address within [now - days, now]
function State:soft_count(address, now, days)
  local n = 0
  for _, e in ipairs(self.soft[address] or {}) do
    if e.t > now - days * 86400 then n = n + 1 end
  end
  return n
end

function State:add_soft(address, t, key)
  local list = self.soft[address] or {}
  self.soft[address] = list
  list[#list + 1] = { t = t, key = key }
  self.keys[key] = true
  self.changed = true
end

function State:forget(address)
  if self.soft[address] then self.soft[address] = nil; self.changed = true end
end

function State:save(now, days)
  local out = { "# mailshot bounces: soft bounces counted (soft, address, time, message key) and POP3 messages",
                "# processed (seen, source, id, time); entries older than the period are dropped" }
  local addrs = {}
  for a in pairs(self.soft) do addrs[#addrs + 1] = a end
  table.sort(addrs)
  for _, a in ipairs(addrs) do
    for _, e in ipairs(self.soft[a]) do
      if e.t > now - days * 86400 then out[#out + 1] = format("soft\t%s\t%d\t%s", a, e.t, e.key) end
    end
  end
  local srcs = {}
  for s in pairs(self.seen) do srcs[#srcs + 1] = s end
  table.sort(srcs)
  for _, s in ipairs(srcs) do
    local ids = {}
    for id, t in pairs(self.seen[s]) do if t > now - SEEN_DAYS * 86400 then ids[#ids + 1] = id end end
    table.sort(ids)
    for _, id in ipairs(ids) do out[#out + 1] = format("seen\t%s\t%s\t%d", s, id, self.seen[s][id]) end
  end
  return util.replace_file(self.path, table.concat(out, "\n") .. "\n")
end

---------------------------------------------------------------- campaigns' recipients

-- The campaign's CSV read once, when a bounce first needs it: line -> address and address ->
-- first line, the address lower-cased (one string for both tables; suppression and the VERP MAC
-- ignore case).  About 130 bytes a row (tests/lua/test_mailbox.lua prints the figure).
local function index_of(c)
  if c._bounce_index ~= nil then return c._bounce_index or nil, c._bounce_index_err end
  local rows = require("mailshot.rows")
  local reader, err = rows.open_reader(c)
  if not reader then
    c._bounce_index, c._bounce_index_err = false, err      -- said once, not once per message
    return nil, err
  end
  local by_line, by_addr = {}, {}
  while true do
    local row, line = reader:read()
    if row == nil then break end
    local email = row and row[c.email_field]
    if email and email ~= "" then
      local k = lower(match(email, "^%s*(.-)%s*$"))
      by_line[line] = k
      if not by_addr[k] then by_addr[k] = line end
    end
  end
  reader:close()
  c._bounce_index = { by_line = by_line, by_addr = by_addr }
  return c._bounce_index
end

-- One-line text for the report and reasons
local function one_line(s, max)
  s = gsub(tostring(s or ""), "[%c]", " ")
  s = gsub(s, "%s+", " ")
  s = match(s, "^%s*(.-)%s*$")
  if max and #s > max then s = sub(s, 1, max) .. "..." end
  return s
end

---------------------------------------------------------------- the run

local Run = {}
Run.__index = Run

local function key_of(b, raw, address)
  local base = b.message_id and ("mid:" .. b.message_id) or ("raw:" .. util.sha256(sub(raw or "", 1, 65536)))
  return sub(util.sha256(base .. "\n" .. lower(address or "")), 1, 32)
end

function Run:count(what, name)
  local t = self.counts[what]
  t[name] = (t[name] or 0) + 1
end

-- The suppression file of a campaign (or of --suppress), its list and its state, opened once.
function Run:target(c)
  local path = self.opts.suppress or (c and c.bounces_path)
  if not path then return nil end
  local t = self.targets[path]
  if t then return t end
  local list
  if util.stat(path) then
    local err
    list, err = suppress.load(path)
    if not list then return nil, err end
  else
    list = suppress.new()
  end
  t = { path = path, list = list, state = nil }
  if not self.opts.dry_run then
    local lock, lerr = util.lock(path .. ".state.lock")
    if not lock then return nil, path .. ".state.lock: " .. tostring(lerr) end
    t.lock = lock
  end
  t.state = load_state(path .. ".state")
  self.targets[path] = t
  self.target_order[#self.target_order + 1] = t
  return t
end

-- VERP: -> { c, line, email } | nil, problem ("forged token", "another campaign") | nil
function Run:verp_match(b, addresses)
  local cands = {}
  for _, a in ipairs(b.envelope_candidates or {}) do cands[#cands + 1] = a end
  if b.envelope_to then cands[#cands + 1] = b.envelope_to end
  if b.original and b.original.return_path then cands[#cands + 1] = b.original.return_path end
  local problem
  for _, c in ipairs(self.campaigns) do
    local v = c.verp
    if v then
      for _, cand in ipairs(cands) do
        local ok, d, why = pcall(v.decode, v, cand)
        if ok and d then
          local idx = index_of(c)
          local tried = {}
          local email = idx and idx.by_line[d.line]
          if email then tried[#tried + 1] = email end
          for _, a in ipairs(addresses) do tried[#tried + 1] = a end
          for _, e in ipairs(tried) do
            local vok, good = pcall(v.verify, v, d, e)
            if vok and good then return { c = c, line = d.line, email = e, verp = true } end
          end
          problem = "forged token"
        elseif ok and why == "malformed token" then
          problem = problem or "forged token"
        elseif ok and why == "another campaign" then
          problem = problem or "another campaign"
        end
      end
    end
  end
  return nil, problem
end

-- Without VERP: the address in one of the campaigns' lists -> { c, line, email } | nil
function Run:address_match(address)
  if not address or address == "" then return nil end
  if #self.campaigns == 0 then return { c = nil, line = nil, email = address } end
  for _, c in ipairs(self.campaigns) do
    local idx, err = index_of(c)
    if not idx then
      if not c._bounce_warned then
        c._bounce_warned = true
        self.warn(format("%s: cannot read the recipients: %s", c.name or "campaign", tostring(err)))
      end
    else
      local line = idx.by_addr[lower(address)]
      if line then return { c = c, line = line, email = idx.by_line[line] or address } end
    end
  end
  return nil
end

-- The campaign's on_bounce(b) may override the class -> class, rule
function Run:campaign_class(c, b, r, class, rule, m)
  if not (c and c.on_bounce) then return class, rule end
  b.recipient, b.address, b.class, b.rule = r, m.email, class, rule
  b.campaign, b.line = c.name, m.line
  local ok, v = pcall(c.on_bounce, b)
  if not ok then
    self.warn(format("%s: on_bounce failed: %s", c.name or "campaign", one_line(v, 300)))
    return "unknown", "on_bounce error"
  end
  if v == nil then return class, rule end
  if not CLASSES[v] then
    self.warn(format("%s: on_bounce returned %q, not a class (%s)", c.name or "campaign", tostring(v),
                     table.concat(bounce.CLASSES, ", ")))
    return "unknown", "on_bounce error"
  end
  return v, "on_bounce"
end

local function reason_text(class, r, b, m, extra)
  local parts = { class == "complaint" and "complaint" or (class .. " bounce") }
  if extra then parts[#parts + 1] = extra end
  if r and r.status then parts[#parts + 1] = r.status end
  if r and r.diagnostic then parts[#parts + 1] = one_line(r.diagnostic, 200) end
  if class == "complaint" and b.feedback then
    parts[#parts + 1] = "feedback " .. tostring(b.feedback.type or "abuse")
    if b.feedback.user_agent then parts[#parts + 1] = "from " .. one_line(b.feedback.user_agent, 60) end
  end
  if m.c then parts[#parts + 1] = format("(campaign %s line %s)", m.c.name or "?", tostring(m.line)) end
  return table.concat(parts, " ")
end

local function would(dry, s) return dry and ("would " .. s) or s end

-- A campaign run by a cluster (opts.publish: --cluster, or the campaign's cluster.url): the
-- address goes to its shared suppression list too (mailshot.cluster_suppress), so the workers
-- sending it now skip it.  A failure is reported; the file has the address anyway.
function Run:publish(m, reason)
  if not (self.opts.publish and m.c) then return end
  local ok, err = self.opts.publish(m.c, m.email, reason)
  if not ok then self.warn(tostring(err)); self.failed = true end
end

-- Acts on one matched address -> action text, message disposition ("done" | "quarantine")
function Run:act(b, r, class, m, key, bounce_time)
  local dry = self.opts.dry_run
  if class == "autoreply" then return "ignored (autoreply)", "done", "ignored" end
  if class == "policy" then
    return "not suppressed (policy block: the sender's problem, not the address's)", "done", "not suppressed"
  end
  if class == "unknown" then return would(dry, "quarantine"), "quarantine", would(dry, "quarantined") end
  if type(m.email) ~= "string" or m.email == "" or find(m.email, "[%c%s]") then
    -- nothing a bounce says may add a line to the state or the suppression file
    return "not acted on: the address is empty or has spaces or control characters", "keep", "not acted on"
  end
  local t, err = self:target(m.c)
  if not t then
    if err then self.warn(err); self.failed = true; return "error: " .. err, "keep", "error" end
    return "error: no suppression file (give --suppress or set bounces_to in the campaign)", "keep", "error"
  end
  if t.list:check(m.email) then
    t.state:forget(lower(m.email))
    -- suppressed here before, perhaps without --cluster: the running workers learn it now
    if (class == "hard" or class == "complaint") and not dry then self:publish(m, reason_text(class, r, b, m)) end
    return "already suppressed", "done", "already suppressed"
  end
  local function suppress_now(extra)
    local reason = reason_text(class, r, b, m, extra)
    if not dry then
      local ok, aerr = suppress.append(t.path, m.email, reason)
      if not ok then self.warn(aerr); self.failed = true; return "error: " .. aerr, "keep", "error" end
      self:publish(m, reason)
    end
    t.list:add(m.email, t.path)
    t.state:forget(lower(m.email))
    return would(dry, "suppress"), "done", would(dry, "suppressed")
  end
  if class == "hard" or class == "complaint" then return suppress_now() end
  -- soft
  local a = lower(m.email)
  local limit, days = self.opts.soft_limit, self.opts.soft_days
  if t.state.keys[key] then
    return format("already counted (%d of %d)", t.state:soft_count(a, self.now, days), limit), "done", "already counted"
  end
  if bounce_time <= self.now - days * 86400 then
    return format("not counted (older than %g days)", days), "done", "not counted"
  end
  t.state:add_soft(a, bounce_time, key)
  local n = t.state:soft_count(a, self.now, days)
  if n >= limit then
    local action, disp, tally = suppress_now(format("%d times in %g days", n, days))
    return action .. format(" (soft %d of %d)", n, limit), disp, tally
  end
  return would(dry, format("count %d of %d", n, limit)), "done", would(dry, "counted")
end

-- The addresses a bounce names, with the recipient each is classified by.
local function named(b)
  local out = {}
  if b.kind == "dsn" or b.kind == "guessed" then
    for _, r in ipairs(b.recipients or {}) do
      out[#out + 1] = { r = r, address = r.address or r.original, alt = r.original }
    end
  elseif b.kind == "arf" then
    local fb = b.feedback or {}
    local a = fb.original_rcpt_to or (b.original and b.original.to)
    out[1] = { r = nil, address = a }
  elseif b.kind == "autoreply" then
    out[1] = { r = nil, address = b.from }
  end
  return out
end

local DELIVERED = { delivered = true, relayed = true, expanded = true }

-- One message -> report rows written; its disposition: "done" (mark seen / move), "quarantine",
-- "keep" (leave it where it is)
function Run:message(box, src, msg)
  local dry = self.opts.dry_run
  local b
  if msg.raw == nil then
    b = { kind = "unparsed", error = msg.error or "could not be read", recipients = {} }
  else
    b = bounce.parse(msg.raw, { max_bytes = self.opts.max_bytes })
    if msg.truncated and (b.kind == "unparsed" or b.kind == "other") then
      b.kind, b.error = "unparsed", format("%d bytes, over the %d read (--max-bytes)", msg.size, self.opts.max_bytes)
    end
  end
  local base = { source = src, where = msg.where, message_id = one_line(b.message_id, 200), kind = b.kind }
  local rows = {}
  local function row(t)
    for k, v in pairs(base) do if t[k] == nil then t[k] = v end end
    rows[#rows + 1] = t
    return t
  end
  local disposition = "keep"
  local function dispose(d)
    if d == "quarantine" or disposition == "quarantine" then disposition = "quarantine"
    elseif d == "done" then disposition = "done" end
  end
  local bounce_time = M.parse_date(b.date)
  if not bounce_time or bounce_time > self.now then bounce_time = self.now end

  if b.kind == "unparsed" then
    row { class = "unknown", rule = "unparsed", diagnostic = one_line(b.error, 300), action = would(dry, "quarantine"),
          tally = would(dry, "quarantined") }
    self:count("class", "unknown")
    dispose("quarantine")
  elseif b.kind == "other" then
    row { action = "not a bounce (left in place)", tally = "left (not a bounce)" }
    self:count("class", "not a bounce")
  else
    local items = named(b)
    local addresses = {}
    for _, it in ipairs(items) do
      if it.address then addresses[#addresses + 1] = it.address end
      if it.alt and it.alt ~= it.address then addresses[#addresses + 1] = it.alt end
    end
    local vm, problem = self:verp_match(b, addresses)
    if vm then
      -- a VERP token names one recipient: the one the DSN says failed (or the message itself)
      local r = bounce.main_recipient(b)
      for _, it in ipairs(items) do
        if it.r and lower(it.address or "") == lower(vm.email) then r = it.r end
      end
      items = { { r = r, address = vm.email, m = vm } }
    elseif problem then
      local r = bounce.main_recipient(b)
      row { address = one_line(r and r.address or (items[1] and items[1].address), 200),
            status = r and r.status, diagnostic = one_line(r and r.diagnostic, 300),
            action = problem == "forged token" and "forged token (not acted on; left in place)"
                     or "not ours: another campaign's token (left in place)",
            tally = problem == "forged token" and "forged token" or "not ours" }
      items = {}
    end
    if #items == 0 and not problem then
      row { diagnostic = "no address named", class = "unknown", action = would(dry, "quarantine"),
            tally = would(dry, "quarantined") }
      self:count("class", "unknown")
      dispose("quarantine")
    end
    for _, it in ipairs(items) do
      local r = it.r
      if r and DELIVERED[r.action] then
        row { address = one_line(it.address, 200), status = r.status, action = "ignored (delivered: " .. r.action .. ")",
              tally = "ignored" }
        dispose("done")
      else
        local class, rule = bounce.classify(b, nil, r)
        local m = it.m or self:address_match(it.address) or (it.alt and self:address_match(it.alt))
        if class == "autoreply" and not m then m = { email = it.address } end
        local fields = { address = one_line(it.address, 200), status = r and r.status,
                         diagnostic = one_line(r and r.diagnostic, 300) }
        if not m then
          fields.class, fields.rule, fields.action = class, rule, "not ours (no campaign lists the address; left in place)"
          fields.tally = "not ours"
          self:count("class", class)
          row(fields)
        else
          class, rule = self:campaign_class(m.c, b, r, class, rule, m)
          local key = key_of(b, msg.raw, m.email)
          local action, d, tally = self:act(b, r, class, m, key, bounce_time)
          fields.tally = tally
          fields.address = one_line(m.email, 200)
          fields.campaign = m.c and m.c.name or ""
          fields.line = m.line and tostring(m.line) or ""
          fields.class, fields.rule, fields.action = class, rule, action
          row(fields)
          self:count("class", class)
          dispose(d)
        end
      end
    end
  end

  -- what happens to the message itself
  local note
  if not dry and disposition ~= "keep" then
    local how, folder
    if disposition == "quarantine" then how, folder = "quarantine", self.opts.quarantine
    elseif self.opts.move_to then how, folder = "move", self.opts.move_to
    else how = "seen" end
    local pop3 = box.u and box.u.proto == "pop3"
    if pop3 then how, folder = "seen", nil end     -- POP3 has no folders: every message stays on the server
    local ok, err = box:mark(msg, how, folder)
    if not ok then
      note = format("; %s failed: %s", how, one_line(err, 200))
      self.warn(format("%s: %s: %s", msg.where or src, how, one_line(err, 200)))
      self.failed = true
    elseif how == "quarantine" and type(err) == "string" then
      note = "; copy: " .. err
    end
    if ok and pop3 then
      self:remember_pop3(src, msg.id)
      if disposition == "quarantine" then note = "; left on the POP3 server (no folders)" end
    end
  end
  for _, t in ipairs(rows) do
    if note and t.action then t.action = t.action .. note end
    if t.tally then self:count("action", t.tally) end
    self.report:write(text.csv_row(t, M.COLUMNS), "\n")
  end
  self.messages = self.messages + 1
end

function Run:remember_pop3(src, id)
  -- POP3 marks nothing on the server: the ids processed are kept in the state of the first
  -- campaign's suppression file (or --suppress's)
  local t = self:target(self.campaigns[1])
  if not t then return end
  t.state.seen[src] = t.state.seen[src] or {}
  t.state.seen[src][id] = self.now
  t.state.changed = true
end

function Run:source(src)
  local mopts = { max_bytes = self.opts.max_bytes, move_to = self.opts.move_to, quarantine = self.opts.quarantine }
  for k, v in pairs(self.opts.mailbox or {}) do mopts[k] = v end
  if not mopts.quarantine then
    -- read-only sources copy what they quarantine into a Maildir beside the suppression file
    local first = self.opts.suppress or (self.campaigns[1] and self.campaigns[1].bounces_path)
    if first then mopts.copy_to = first .. ".quarantine" end
  end
  if find(lower(src), "^pop3s?://") then
    local t = self:target(self.campaigns[1])
    mopts.skip = t and t.state.seen[src] or nil
  end
  local box, err = mailbox.open(src, mopts)
  if not box then
    self.warn(err)
    self.failed = true
    self.failed_sources = self.failed_sources + 1
    return
  end
  local each = box.messages or box.each
  local ok, ierr = pcall(function()
    for msg in each(box) do self:message(box, src, msg) end
  end)
  if not ok then
    self.warn(format("%s: %s", src, one_line(ierr, 500)))
    self.failed = true
    self.failed_sources = self.failed_sources + 1
  elseif box.failed then
    self.warn(format("%s: %s", src, one_line(box.failed, 500)))
    self.failed = true
  end
  box:close()
end

local function sorted_counts(t)
  local names = {}
  for k in pairs(t) do names[#names + 1] = k end
  table.sort(names)
  local out = {}
  for _, k in ipairs(names) do out[#out + 1] = format("%d %s", t[k], k) end
  return #out > 0 and table.concat(out, ", ") or "none"
end

M._index_of = index_of                     -- for tests

-- bounces.run(opts) -> summary { messages, counts = { class = {}, action = {} }, failed } | nil, err
function M.run(opts)
  local self = setmetatable({
    opts = opts, campaigns = opts.campaigns or {}, targets = {}, target_order = {},
    counts = { class = {}, action = {} }, messages = 0, failed = false, failed_sources = 0,
    now = opts.now or os.time(), warn = opts.warn or function(s) io.stderr:write("mailshot: ", s, "\n") end,
  }, Run)
  opts.soft_limit = opts.soft_limit or M.SOFT_LIMIT
  opts.soft_days = opts.soft_days or M.SOFT_DAYS
  opts.max_bytes = opts.max_bytes or mailbox.MAX_BYTES
  -- a list that cannot be read would make every bounce "not ours": stop before reading anything
  for _, c in ipairs(self.campaigns) do
    local idx, err = index_of(c)
    if not idx then return nil, format("%s: %s", c.name or "campaign", tostring(err)) end
  end
  local report_path = opts.report or "bounces-report.csv"
  local f, tmp = util.temp_file(report_path)
  if not f then return nil, "--report: " .. tostring(tmp) end
  self.report = f
  f:write(table.concat(M.COLUMNS, ","), "\n")
  for _, src in ipairs(opts.sources) do self:source(src) end
  local ok, err = f:close()
  if ok then ok, err = os.rename(tmp, report_path) end
  if not ok then os.remove(tmp); self.warn(report_path .. ": " .. tostring(err)); self.failed = true end
  if not opts.dry_run then
    for _, t in ipairs(self.target_order) do
      if t.state.changed or util.stat(t.state.path) then
        local sok, serr = t.state:save(self.now, opts.soft_days)
        if not sok then self.warn(serr); self.failed = true end
      end
      if t.lock then t.lock:unlock() end
    end
  end
  return {
    messages = self.messages, counts = self.counts, failed = self.failed, failed_sources = self.failed_sources,
    report = report_path,
    text = format("%d message%s from %d source%s: %s; actions: %s; report: %s%s", self.messages,
                  self.messages == 1 and "" or "s", #opts.sources, #opts.sources == 1 and "" or "s",
                  sorted_counts(self.counts.class), sorted_counts(self.counts.action), report_path,
                  opts.dry_run and " (dry run: nothing was changed)" or ""),
  }
end

return M
