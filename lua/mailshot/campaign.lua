-- mailshot.campaign: the campaign description and its runner.
--
-- A campaign reads recipients from a CSV file as a stream, renders each message, and either
-- writes it to an outbox (dry run, the default) or hands it to the campaign's `send` function,
-- up to `concurrency` at once.  Every recipient ends up in the report: sent, failed (with the
-- server's words), skipped (with the reason) or, in a dry run, written.

local core = require "mailshot.core"
local csv = require "mailshot.csv"
local template = require "mailshot.template"
local mime = require "mailshot.mime"
local idna = require "mailshot.idna"
local rate = require "mailshot.rate"
local journal = require "mailshot.journal"
local suppress = require "mailshot.suppress"
local unsubscribe = require "mailshot.unsubscribe"
local util = require "mailshot.util"

local csv_row = require("mailshot.text").csv_row

local M = {}

-- Without a `concurrency`: a relay's sessions each carry pipeline_depth messages, so that many
-- per session keep every pipeline full; anything else (a function, a direct sender) gets 8.
local function default_concurrency(send)
  local stats = send ~= nil and type(send) ~= "function" and send.stats
  local st = type(stats) == "function" and stats(send)
  if type(st) == "table" and st.max_connections and st.pipeline_depth then
    return math.max(1, st.max_connections * math.max(st.pipeline_depth, 1))
  end
  return 8
end
local Campaign = {}
Campaign.__index = Campaign

local FIELDS = {
  recipients = "string", delimiter = "string", from = "any", reply_to = "any", subject = "any",
  text = "any", html = "any", attachments = "table", headers = "table", send = "any",
  filter = "function", concurrency = "number", eightbit = "boolean", helpers = "table",
  email_field = "string", name = "string", cc = "any", rate = "any", domain_rate = "table",
  resend_in_flight = "boolean", retry = "any", on_result = "function", dkim = "table",
  suppress = "any", suppress_roles = "boolean", bounces_to = "string", unsubscribe = "table",
}

local function dirname(path) return path:match("^(.*)/[^/]*$") or "." end

local function resolve(base, path)
  if not base or path:sub(1, 1) == "/" then return path end
  return base .. "/" .. path
end

-- A template-able value: a string (compiled once), a template, or a function of the row.
local function compile(value, name, helpers)
  if value == nil or type(value) == "function" or template.is_template(value) then return value end
  if type(value) == "string" then return template.new(value, { name = name, helpers = helpers }) end
  error(("campaign: '%s' must be a string, a template or a function of the row"):format(name), 3)
end

-- "90s", "5m", "1h", "2d", "500ms" or a number of seconds -> seconds
local UNIT = { ms = 0.001, s = 1, m = 60, min = 60, h = 3600, d = 86400 }
local function seconds(v, what)
  if type(v) == "number" and v >= 0 then return v end
  local n, unit = tostring(v):match("^%s*([%d%.]+)%s*(%a*)%s*$")
  local x = tonumber(n)
  local f = UNIT[unit == "" and "s" or unit]
  if not x or not f then error(("mailshot.campaign: retry.%s: %q is not a duration (90s, 5m, 1h, 2d)"):format(what, tostring(v)), 4) end
  return x * f
end

--- The in-run retry schedule: retry = { first = "1m", max = "30m", give_up_after = "4h" }
--- (the defaults), or false for none (temporary failures are then left to --resume).
function M.retry_config(r)
  if r == false then return false end
  if r ~= nil and type(r) ~= "table" then error("mailshot.campaign: retry must be a table or false", 3) end
  r = r or {}
  for k in pairs(r) do
    if k ~= "first" and k ~= "max" and k ~= "give_up_after" then
      error(("mailshot.campaign: retry: unknown option '%s'"):format(tostring(k)), 3)
    end
  end
  return { first = seconds(r.first or 60, "first"), max = seconds(r.max or 1800, "max"),
           give_up_after = seconds(r.give_up_after or 4 * 3600, "give_up_after") }
end

--- Check a campaign definition (programmer mistakes raise here, before anything is read).
function M.new(def)
  if type(def) ~= "table" then error("mailshot.campaign: expected a table", 3) end
  for k, v in pairs(def) do
    local want = FIELDS[k]
    if not want then error(("mailshot.campaign: unknown option '%s'"):format(tostring(k)), 3) end
    if want ~= "any" and type(v) ~= want then
      error(("mailshot.campaign: option '%s' must be a %s"):format(k, want), 3)
    end
  end
  if not def.recipients then error("mailshot.campaign: 'recipients' (a CSV file) is required", 3) end
  if not def.from then error("mailshot.campaign: 'from' is required", 3) end
  if not def.text and not def.html then error("mailshot.campaign: 'text' or 'html' is required", 3) end
  local send = def.send
  if send ~= nil and type(send) ~= "function" then
    local ok, method = pcall(function() return send.send end)
    if not ok or type(method) ~= "function" then
      error("mailshot.campaign: 'send' must be a function(msg, row) or an object with a :send(msg) method", 3)
    end
  end
  local c = setmetatable({}, Campaign)
  for k, v in pairs(def) do c[k] = v end
  c.base_dir = template.base_dir
  c.recipients_path = resolve(c.base_dir, def.recipients)
  c.concurrency = math.floor(def.concurrency or default_concurrency(def.send))
  if c.concurrency < 1 then error("mailshot.campaign: concurrency must be at least 1", 3) end
  c.email_field = def.email_field or "email"
  c.tpl = {}
  for _, k in ipairs { "from", "reply_to", "cc", "subject", "text", "html" } do
    c.tpl[k] = compile(def[k], k, def.helpers)
  end
  if def.rate ~= nil then
    local spec = type(def.rate) == "function" and rate.custom(def.rate) or def.rate
    c.limiter = rate.new(spec, { name = "campaign", sleep = function(sec) return c:rate_sleep(sec) end })
  end
  c.domain_limiters = {}
  c.retry = M.retry_config(def.retry)
  -- Suppression lists (and the hard-bounce file, when it exists) are read now: a missing list
  -- is an error before anything is sent.
  local lists = def.suppress
  if type(lists) == "string" then lists = { lists } end
  if lists ~= nil and type(lists) ~= "table" then error("mailshot.campaign: suppress must be a file or a list of files", 3) end
  lists = lists and { table.unpack(lists) } or {}
  if def.bounces_to then
    c.bounces_path = resolve(c.base_dir, def.bounces_to)
    local f = io.open(c.bounces_path, "r")
    if f then f:close(); lists[#lists + 1] = def.bounces_to end
  end
  if #lists > 0 then
    local list, err = suppress.load(lists, { base_dir = c.base_dir })
    if not list then error("mailshot.campaign: suppress: " .. tostring(err), 3) end
    for _, w in ipairs(list.warnings or {}) do io.stderr:write("mailshot: suppress: ", w, "\n") end
    c.suppressed = list
  end
  if def.unsubscribe then c.unsub = unsubscribe.new(def.unsubscribe) end
  if def.dkim then
    -- the key is read once, here: a missing, unreadable or wrong-type key stops the script
    -- before any message is sent
    local o = {}
    for k, v in pairs(def.dkim) do o[k] = v end
    if type(o.key_file) == "string" then o.key_file = resolve(c.base_dir, o.key_file) end
    local signer, err = require("mailshot.dkim").signer(o)
    if not signer then error("mailshot.campaign: dkim: " .. tostring(err), 3) end
    c.signer = signer
  end
  c.header_tpl = {}
  for name, value in pairs(def.headers or {}) do c.header_tpl[name] = compile(value, "headers." .. name, def.helpers) end
  return c
end

function M.is_campaign(x) return getmetatable(x) == Campaign end

-- A stop (SIGINT/SIGTERM) must not wait for a quota that frees up tomorrow: rate waits sleep
-- in slices and give up with STOPPED, and the row is left to --resume, untouched.
local STOPPED = setmetatable({}, { __tostring = function() return "stopped while waiting for a rate limit" end })
M.STOPPED = STOPPED

function Campaign:rate_sleep(sec)
  local until_ = core.now() + sec
  while true do
    if self.stopping then error(STOPPED, 0) end
    local left = until_ - core.now()
    if left <= 0 then return end
    core.sleep(math.min(left, 0.5) + 0.0005)            -- the loop's timers tick in milliseconds
  end
end

-- Rate limits: the campaign's own, then the recipient domain's (domain_rate[domain], or
-- domain_rate["*"] as every other domain's own limiter).  Slots are taken with begin() and
-- given back when the server has answered, so the windows hold at the receiver too.
-- -> { {limiter, token}, ... } | nil, reason
local NONE_HELD = {}

function Campaign:begin_rate(email)
  if not self.limiter and not self.domain_rate then return NONE_HELD end   -- the usual case: no per-message work
  local domain = (email:match("@([^@]+)$") or ""):lower()
  local held = {}
  local limiter = self.limiter
  local dr = self.domain_rate
  if dr then
    local l = self.domain_limiters[domain]
    if l == nil then
      local spec = dr[domain] or dr["*"]
      l = spec and rate.new(type(spec) == "function" and rate.custom(spec) or spec,
                            { name = domain, sleep = function(sec) return self:rate_sleep(sec) end }) or false
      local saved = l and self.saved_rates and self.saved_rates["domain " .. domain]
      if saved then pcall(l.restore, l, saved) end
      self.domain_limiters[domain] = l
    end
    for _, lim in ipairs { limiter or false, l } do
      if lim then
        local token, why = lim:begin(domain)
        if not token then self:complete_rate(held); return nil, why end
        held[#held + 1] = { lim, token }
      end
    end
  elseif limiter then
    local token, why = limiter:begin(domain)
    if not token then return nil, why end
    held[1] = { limiter, token }
  end
  return held
end

function Campaign:complete_rate(held)
  for _, h in ipairs(held) do h[1]:complete(h[2]) end
end

-- Rendering --------------------------------------------------------------------------------

-- One options table reused for every render: rendering never yields, so no two renders overlap.
local render_opts = {}

local function render(c, key, tpl, row, label, html)
  if tpl == nil then return nil end
  if type(tpl) == "function" then
    local ok, v, err = pcall(tpl, row)
    if not ok then return nil, ("%s: %s"):format(key, v) end
    if v == nil and err then return nil, ("%s: %s"):format(key, err) end
    return v ~= nil and tostring(v) or nil
  end
  render_opts.html, render_opts.row_label, render_opts.helpers = html, label, c.helpers
  return tpl:render(row, render_opts)
end

local MESSAGE_FIELDS = { "from", "reply_to", "cc", "subject", "text", "html" }

--- Render one row into { data = RFC 5322 text, from = envelope sender, to = {address}, ... }
--- or nil, reason.
function Campaign:message(row, line)
  local label = self.recipients .. " line " .. line
  local m = { to = row[self.email_field], attachments = self.attachments, eightbit = self.eightbit }
  local unsub_headers
  if self.unsub then
    local url
    unsub_headers, url = self.unsub:headers(row, row[self.email_field])
    if not unsub_headers then return nil, "unsubscribe: " .. tostring(url) end
    row.unsubscribe_url = url                 -- for body templates: {{unsubscribe_url}}
  end
  for _, k in ipairs(MESSAGE_FIELDS) do
    local v, err = render(self, k, self.tpl[k], row, label, k == "html")
    if err then return nil, err end
    m[k] = v
  end
  if next(self.header_tpl) then
    m.headers = {}
    for name, tpl in pairs(self.header_tpl) do
      local v, err = render(self, "headers." .. name, tpl, row, label, false)
      if err then return nil, err end
      m.headers[name] = v
    end
  end
  if unsub_headers then
    m.headers = m.headers or {}
    for k, v in pairs(unsub_headers) do m.headers[k] = v end
  end
  local data, info = mime.build(m)
  if not data then return nil, info end
  if self.signer then                 -- once per message, on the final bytes
    local signed, err = self.signer:sign(data)
    if not signed then return nil, "dkim: " .. tostring(err) end
    data = signed
  end
  return {
    data = data, from = info.envelope_from, to = info.recipients, message_id = info.message_id,
    row = row, line = line, email = row[self.email_field],
    eightbit = info.eightbit,         -- mime.build knows the body's class: relay:send need not scan
  }
end

-- The report -------------------------------------------------------------------------------

local REPORT_COLUMNS = require("mailshot.result").REPORT_COLUMNS

local Report = {}
Report.__index = Report

local function open_report(path)
  local f, err = io.open(path, "w")
  if not f then return nil, ("report %s: %s"):format(path, err) end
  f:setvbuf("full", 65536)
  f:write(table.concat(REPORT_COLUMNS, ","), "\r\n")
  return setmetatable({ f = f, path = path, counts = { sent = 0, failed = 0, skipped = 0, written = 0, deferred = 0, ["in-flight"] = 0 } }, Report)
end

-- One row: RFC 4180 quoting when a value has a quote, comma or line break, or spaces at either
-- end (a spreadsheet would trim them); text.csv_row does it in C.
function Report:add(r)
  self.counts[r.status] = self.counts[r.status] + 1
  self.f:write(csv_row(r, REPORT_COLUMNS), "\r\n")
end

function Report:close() self.f:close() end

-- The runner -------------------------------------------------------------------------------

local function safe_name(s)
  return (tostring(s or "x"):gsub("[^%w@%.%-_+]", "_"):sub(1, 80))
end

local function one_line(s)
  s = tostring(s or "")
  if not s:find("[\r\n]") then return s end       -- the usual reply: no copy
  return (s:gsub("[\r\n]+", " "))
end

-- The campaign's send, called under pcall (a named function: no closure per message).
local function call_send(send, msg, row)
  if type(send) == "function" then return send(msg, row) end
  return send:send(msg, row)
end

-- Deliver (or write) one message and return its report row.
local function process(c, opts, row, line)
  local email = row[c.email_field]
  local rep = { line = line, email = email }
  if email and email:find("[\128-\255]") then
    -- an IDN domain goes out in its A-label form (xn--...), which every server takes; a
    -- non-ASCII local part would need SMTPUTF8 and is refused by the check below
    local localpart, domain = idna.split_address(email)
    local ascii = domain and not localpart:find("[\128-\255]") and idna.to_ascii(domain)
    if ascii then email = localpart .. "@" .. ascii; row[c.email_field] = email end
  end
  local ok, why = mime.valid_address(email or "")
  if not email or email == "" then
    rep.status, rep.response = "skipped", ("no '%s' value"):format(c.email_field)
    return rep
  elseif not ok then
    rep.status, rep.response = "skipped", "invalid email address: " .. tostring(why)
    return rep
  end
  local why = c.suppressed and c.suppressed:check(email)
  if not why and c.suppress_roles and suppress.is_role(email) then why = "role address (suppress_roles)" end
  if why then rep.status, rep.response = "skipped", why; return rep end
  if c.filter then
    local keep, reason = c.filter(row)
    if not keep then rep.status, rep.response = "skipped", reason or "filtered out"; return rep end
  end
  local msg, err = c:message(row, line)
  if not msg then rep.status, rep.stage, rep.response = "failed", "render", err; return rep end
  if opts.dry then
    local path = ("%s/%06d-%s.eml"):format(opts.outbox, line, safe_name(email))
    -- a new 0600 file renamed over path: a symlink planted in the outbox is replaced, not followed
    local ok_w, ferr = util.replace_file(path, msg.data)
    if not ok_w then rep.status, rep.stage, rep.response = "failed", "write", ferr; return rep end
    rep.status, rep.response = "written", path
    return rep
  end
  local held, why = c:begin_rate(email)
  if not held then
    -- a rule said no for now (a warm-up quota): left for a later run (--resume), not retried here
    rep.status, rep.stage, rep.response, rep.temporary, rep.retry = "failed", "rate", "rate limit: " .. tostring(why), true, false
    return rep
  end
  if opts.journal_obj then opts.journal_obj:in_flight(line, email) end
  local sent, res = pcall(call_send, c.send, msg, row)
  c:complete_rate(held)
  if not sent then error(res, 0) end
  if type(res) ~= "table" then
    rep.status, rep.stage, rep.response = "failed", "send", "send function returned " .. tostring(res)
    return rep
  end
  if c.on_result then
    -- the campaign's own classification: it may change res (temporary, retry, ok) or return
    -- another result (after trying another path itself)
    local other = c.on_result(res, msg, row)
    if type(other) == "table" then res = other end
  end
  rep.status = res.ok and "sent" or "failed"
  rep.code, rep.enhanced, rep.stage = res.code ~= 0 and res.code or nil, res.enhanced, not res.ok and res.stage or nil
  rep.via, rep.mx = res.via, res.mx
  rep.temporary = res.retry == true or (res.temporary and res.retry ~= false)
  rep.retry = res.retry
  if res.defer and not res.ok then
    -- not sent, and no use trying again within this run (a relay that refused our login):
    -- deferred at once, for --resume
    rep.temporary, rep.retry = true, false
  end
  rep.response = one_line(res.message)
  if c.bounces_path and not res.ok and not rep.temporary and tostring(res.enhanced or ""):match("^5%.1%.") then
    -- a hard bounce (5.1.x: no such user or domain): the next campaign skips this address
    local ok_append, aerr = suppress.append(c.bounces_path, email, ("%s %s %s"):format(res.code or "", res.enhanced, res.message or ""))
    if not ok_append then io.stderr:write("mailshot: bounces_to: ", tostring(aerr), "\n") end
  end
  return rep
end

-- Progress ------------------------------------------------------------------------------

local function fmt_duration(s)
  if not s or s ~= s or s == math.huge then return "--:--" end
  s = math.floor(s + 0.5)
  if s >= 3600 then return ("%d:%02d:%02d"):format(s // 3600, s % 3600 // 60, s % 60) end
  return ("%d:%02d"):format(s // 60, s % 60)
end

--- A task that shows the run's progress until stop() is called: a live line rewritten in
--- place on a terminal (`live`), or a plain line every `interval` seconds.  It only reads
--- counters, so it costs a few microseconds per refresh.
function Campaign:progress_task(report, p)
  local total = p.total
  local started, running = core.now(), true
  local last_t, last_done, rate = started, 0, 0
  local out = io.stderr
  local function line()
    local c = report.counts
    local done = c.sent + c.failed + c.skipped + c.written + c.deferred + c["in-flight"]
    local now = core.now()
    if now - last_t >= 1 or rate == 0 then     -- a rate over the last second or so
      rate = (done - last_done) / math.max(now - last_t, 1e-3)
      last_t, last_done = now, done
    end
    local avg = done / math.max(now - started, 1e-3)
    local eta = total and total > done and avg > 0 and (total - done) / avg or nil
    return ("%s%d%s  sent %d  failed %d  deferred %d  skipped %d  %.0f/s  ETA %s  conns %d"):format(
      self.name and (self.name .. ": ") or "", done, total and ("/" .. total) or "", c.sent, c.failed,
      c.deferred + (p.waiting and p.waiting() or 0), c.skipped, rate, fmt_duration(eta), p.connections and p.connections() or 0)
  end
  core.spawn(function()
    while running do
      core.sleep(p.live and 0.25 or p.interval)
      if not running then break end
      if p.live then out:write("\r\27[K", line()) else out:write("mailshot: ", line(), "\n") end
      out:flush()
    end
  end)
  return { stop = function()
    running = false
    if p.live then out:write("\r\27[K"); out:flush() end
  end }
end

--- Run the campaign.  opts: dry (bool), outbox (dir), report (path), concurrency, quiet, limit.
--- Returns the counts table, or nil, err when the run could not start.
function Campaign:run(opts)
  if not opts.dry and not self.send then return nil, "the campaign has no 'send' function: it can only be run as a dry run" end
  local reader, err = csv.open(self.recipients_path, { delimiter = self.delimiter })
  if not reader then return nil, err end
  local header = reader:header()
  local has_email = false
  for _, h in ipairs(header) do has_email = has_email or h == self.email_field end
  if not has_email then
    reader:close()
    return nil, ("%s: no '%s' column (columns: %s)"):format(self.recipients_path, self.email_field, table.concat(header, ", "))
  end
  if opts.dry then
    local ok, merr = os.execute(("mkdir -p '%s'"):format(opts.outbox:gsub("'", "'\\''")))
    if not ok then reader:close(); return nil, "cannot create outbox " .. opts.outbox .. ": " .. tostring(merr) end
  end
  local jrn, previous
  if opts.journal then
    -- a resume indexes the journal by CSV line, and a line never starts past the file's size
    -- (a line count would miss lines ended by a lone CR)
    local size, f = nil, opts.resume and io.open(self.recipients_path, "rb")
    if f then size = f:seek("end"); f:close() end
    jrn, previous = journal.open(opts.journal, { fingerprint = self:fingerprint(opts.script), name = self.name,
                                                  resume = opts.resume, force = opts.force, max_line = size and size + 1 })
    if not jrn then reader:close(); return nil, previous end
  elseif opts.resume then
    reader:close()
    return nil, "--resume needs --send (dry runs keep no journal)"
  end
  local report, rerr = open_report(opts.report)
  if not report then reader:close(); if jrn then jrn:close() end; return nil, rerr end
  local limiters = opts.relay_limiters or {}
  if self.limiter then limiters["campaign"] = self.limiter end
  if jrn and previous then
    -- daily quotas hold across --resume: the limiters continue from where the last run left them
    self.saved_rates = journal.load_rates(opts.journal .. ".rates")
    for name, l in pairs(limiters) do
      local st = self.saved_rates[name]
      if st then pcall(l.restore, l, st) end
    end
  end
  local function save_rates()
    if not jrn then return end
    local states = {}
    for name, l in pairs(limiters) do states[name] = l:state() end
    for d, l in pairs(self.domain_limiters) do if l then states["domain " .. d] = l:state() end end
    if next(states) then journal.save_rates(opts.journal .. ".rates", states) end
  end
  local started, seen, limit = core.now(), 0, opts.limit
  local resend_in_flight = self.resend_in_flight or opts.resend_in_flight
  local addresses = util.new_set()                    -- each address once per campaign
  local resumed = self:resume_notice(previous, opts)
  local stopping

  -- Record a report row, in the journal too (deferred rows are retried by --resume).
  local function add(rep)
    report:add(rep)
    if jrn then jrn:outcome(rep, rep.status == "deferred") end
  end

  -- Temporary failures wait here for their next try (RFC 5321 §4.5.4.1: retry, with
  -- growing intervals), sorted by due time; the campaign goes on meanwhile.
  local retry, queue = not opts.dry and self.retry, {}
  local function defer(item, rep)
    local now = core.now()
    item.first = item.first or now
    item.attempt = (item.attempt or 1) + 1
    local d = math.min(retry.max, retry.first * 2 ^ (item.attempt - 2))
    d = d / 2 + math.random() * d / 2                    -- jitter: spread the retries of a burst
    if now + d > item.first + retry.give_up_after then return false end
    item.due, item.rep = now + d, rep
    local i = #queue + 1
    while i > 1 and queue[i - 1].due > item.due do queue[i] = queue[i - 1]; i = i - 1 end
    queue[i] = item
    if jrn then jrn:outcome(rep, true) end               -- not sent: a crash now must not count it in flight
    return true
  end
  opts.journal_obj = jrn

  -- The one shared source of rows: tasks take the next row in turn (the loop is one thread).
  -- Rows whose outcome a previous run made final are reported as they were, not sent again.
  local exhausted = false
  local function next_row()
    while not stopping do
      if queue[1] and queue[1].due <= core.now() then
        local item = table.remove(queue, 1)
        return item.row, item.line, item
      end
      local row, line, msg
      if not exhausted and not (limit and seen >= limit) then row, line, msg = reader:read() end
      if row == nil then
        if msg then io.stderr:write("mailshot: ", self.recipients_path, ": ", msg, "\n") end
        exhausted = true
        if not queue[1] then return nil end
        core.sleep(math.min(math.max(queue[1].due - core.now(), 0), 1))   -- the next retry, or a look at stopping
        goto continue
      end
      seen = seen + 1
      local old = previous and previous:record(line)
      local address = row and row[self.email_field]
      local first = not (address and address ~= "") or addresses:add(address:lower())
      if row and old and old.kind == "F" then
        report:add(old)                              -- already in the journal
      elseif row and not first then
        add { line = line, email = address, status = "skipped",
              response = "duplicate address: an earlier row has it (addresses are compared ignoring case)" }
      elseif row and old and old.kind == "I" and not resend_in_flight then
        -- journalled as an F record of status in-flight, which a later --resume still counts in
        -- flight: --resume --resend-in-flight can send it then
        add { line = line, email = old.email, status = "in-flight", stage = "resume",
              response = "possibly sent before the previous run stopped; not sent again (--resend-in-flight sends it)" }
      elseif row then
        return row, line
      else
        add { line = line, status = "skipped", response = ("%s line %d: %s"):format(self.recipients, line, msg) }
      end
      ::continue::
    end
  end

  if opts.progress then opts.progress.waiting = function() return #queue end end
  local progress = opts.progress and self:progress_task(report, opts.progress)
  local script_error_shown = false
  local workers = opts.dry and 1 or (opts.concurrency or self.concurrency)
  local running, main = workers, core.current()
  local failure
  local function traceback_unless_stopped(e) return e == STOPPED and e or debug.traceback(e) end
  local function worker()
    local ok, e = xpcall(function()
      while not failure do
        local row, line, item = next_row()
        if not row then break end
        local ok, rep = xpcall(process, traceback_unless_stopped, self, opts, row, line)
        if not ok and rep == STOPPED then break end        -- not started: --resume takes the row
        if not ok then
          -- an error in the campaign's own code (send, filter, a template function) costs this
          -- recipient, not the run; it is shown once on stderr with its traceback
          if not script_error_shown then io.stderr:write("mailshot: ", tostring(rep), "\n"); script_error_shown = true end
          rep = { line = line, email = row[self.email_field], status = "failed", stage = "script",
                  response = one_line(tostring(rep):match("^[^\n]*")) }
        end
        if rep.status == "failed" and rep.temporary then
          if not (retry and rep.retry ~= false and defer(item or { row = row, line = line }, rep)) then
            rep.status = "deferred"                        -- not delivered: --resume tries again
            add(rep)
          end
        else
          add(rep)
        end
      end
    end, debug.traceback)
    if not ok then failure = failure or e end
    running = running - 1
    if running == 0 then core.wake(main) end
  end
  local flusher_running = jrn ~= nil
  if jrn then   -- outcomes reach the kernel within 0.1 s even when nothing else is sent
    core.spawn(function()
      local ticks = 0
      while flusher_running do
        core.sleep(0.1)
        if flusher_running then
          jrn:flush()
          ticks = ticks + 1
          if ticks % 50 == 0 then save_rates() end     -- quotas survive even a kill -9 (to 5 s)
        end
      end
    end)
  end
  local function finish_files()
    flusher_running = false
    save_rates()
    if progress then progress.stop() end
    reader:close()
    report:close()
    if jrn then jrn:close() end
  end
  if opts.signals then
    -- SIGINT/SIGTERM: take no new recipients, let the messages in flight finish (each bounded
    -- by its own timeouts), then write everything.  A second signal stops at once, with the
    -- journal still consistent (every record is whole, in-flight ones say so).
    core.spawn(function()
      stopping = util.wait_signal()
      self.stopping = true
      io.stderr:write(("\nmailshot: %s: stopping: no new messages; waiting for the ones in flight "
                      .. "(signal again to stop at once)\n"):format(stopping == "INT" and "interrupted" or "terminated"))
      util.wait_signal()
      if jrn then jrn:flush(true) end
      save_rates()
      report.f:flush()
      io.stderr:write("mailshot: stopped at once; the journal marks the messages that were in flight\n")
      util.exit_now(stopping == "INT" and 130 or 143)
    end)
  end
  for _ = 1, workers do core.spawn(worker) end
  core.suspend()
  for _, item in ipairs(queue) do                      -- stopped before their next try
    item.rep.status = "deferred"
    add(item.rep)
  end
  if opts.signals then util.stop_signals() end
  finish_files()
  if failure then error(failure, 0) end
  local counts = report.counts
  counts.total = seen
  counts.seconds = core.now() - started
  counts.stopped = stopping
  counts.resumed = resumed
  return counts
end

--- What ties a journal to this campaign: the recipients file, the script, the templates.
function Campaign:fingerprint(script)
  local parts = { util.sha256_file(self.recipients_path) or "", script and util.sha256_file(script) or "" }
  for _, k in ipairs(MESSAGE_FIELDS) do
    local t = self.tpl[k]
    if type(t) == "table" and t.source then parts[#parts + 1] = util.sha256(t.source) end
  end
  return util.sha256(table.concat(parts, " "))
end

-- What a resumed run says at its start (returned to the caller, who prints it).
function Campaign:resume_notice(previous, opts)
  if not previous then return nil end
  local n = {}
  for k, v in pairs(previous.counts) do n[k] = v end
  n.text = ("resuming %s: %d recipients already final (%d sent, %d failed, %d skipped), %d deferred to retry now, "
            .. "%d in flight when the last run stopped: %s"):format(self.name, n.final, n.sent, n.failed, n.skipped,
            n.deferred, n.inflight, n.inflight == 0 and "none"
            or (self.resend_in_flight or opts.resend_in_flight) and "sent again"
            or "reported as possibly sent, not sent again (add --resend-in-flight to send them again)")
  if opts.notice then opts.notice(n.text) end
  return n
end

return M
