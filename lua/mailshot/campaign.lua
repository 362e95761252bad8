-- mailshot.campaign: the campaign description and its runner.
--
-- A campaign reads recipients from a CSV file as a stream, renders each message, and either
-- writes it to an outbox (dry run, the default) or hands it to the campaign's `send` function,
-- up to `concurrency` at once.  Every recipient ends up in the report: sent, failed (with the
-- server's words), skipped (with the reason) or, in a dry run, written.

local template = require("mailshot.template")
local mime = require("mailshot.mime")
local rate = require("mailshot.rate")
local suppress = require("mailshot.suppress")
local unsubscribe = require("mailshot.unsubscribe")
local verp = require("mailshot.verp")
local util = require("mailshot.util")
local classify = require("mailshot.classify")
local paths = require("mailshot.path")
local nearest_column = require("mailshot.rows").nearest_column

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
  recipients = "string", delimiter = "string", encoding = "string", from = "any", reply_to = "any", subject = "any",
  text = "any", html = "any", attachments = "table", headers = "table", send = "any",
  filter = "function", concurrency = "number", eightbit = "boolean", helpers = "table",
  email_field = "string", name = "string", cc = "any", rate = "any", domain_rate = "table",
  resend_in_flight = "boolean", retry = "any", on_result = "function", dkim = "table", base_dir = "string",
  to_name = "any", suppress = "any", suppress_roles = "boolean", bounces_to = "string", unsubscribe = "table",
  stop_when_down = "any", return_path = "table",
}
-- mailshot bounces: on_bounce(b) -> a class ("hard", "soft", ...) or nil for bounce.classify's (bounces.lua)
FIELDS.on_bounce = "function"
-- several machines sharing the campaign through Redis (mailshot.cluster): { url, password_file, ca_file, key, lease, worker }
FIELDS.cluster = "table"

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
  if not x or not f then error(("mailshot.campaign: %s: %q is not a duration (90s, 5m, 1h, 2d)"):format(what, tostring(v)), 4) end
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
  return { first = seconds(r.first or 60, "retry.first"), max = seconds(r.max or 1800, "retry.max"),
           give_up_after = seconds(r.give_up_after or 4 * 3600, "retry.give_up_after") }
end

--- When a relay counts as down and the run stops (mailshot.health): stop_when_down =
--- { failures = 20, seconds = 60 } (the defaults; either may be left out), or false for never.
function M.stop_config(v)
  if v == false then return false end
  if v ~= nil and type(v) ~= "table" then error("mailshot.campaign: stop_when_down must be a table or false", 3) end
  v = v or {}
  for k in pairs(v) do
    if k ~= "failures" and k ~= "seconds" then
      error(("mailshot.campaign: stop_when_down: unknown option '%s'"):format(tostring(k)), 3)
    end
  end
  local n = v.failures or 20
  if math.type(n) ~= "integer" or n < 1 then
    error("mailshot.campaign: stop_when_down.failures must be a whole number of at least 1", 3)
  end
  return { failures = n, seconds = seconds(v.seconds or 60, "stop_when_down.seconds") }
end

-- return_path = { domain, secret | secret_file, campaign, prefix } -> a mailshot.verp object.
-- The campaign id defaults to the campaign's name (its `name`, else the script's file name
-- without .lua): `mailshot bounces` loads the same script and so gets the same id.
local function return_path(def, c, name)
  local o = {}
  for k, v in pairs(def.return_path) do o[k] = v end
  if type(o.secret_file) == "string" then o.secret_file = paths.resolve(o.secret_file, c.base_dir) end
  if o.campaign == nil then o.campaign = name end
  if o.campaign == nil then
    error("mailshot.campaign: return_path: give it campaign = \"<id>\" (or give the campaign a name): "
          .. "a campaign made outside `mailshot run` has no script name to default to", 4)
  end
  local ok, v = pcall(verp.new, o)
  if not ok then error("mailshot.campaign: return_path: " .. tostring(v):gsub("^verp: ", ""), 4) end
  return v
end

--- Check a campaign definition (programmer mistakes raise here, before anything is read).
--- Relative paths are resolved against def.base_dir, else base_dir (mailshot.campaign gives
--- the folder of the script that calls it), else the current directory.  name: the campaign's
--- name when def has none (mailshot run: the script's file name without .lua).
function M.new(def, base_dir, name)
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
  c.base_dir = def.base_dir or base_dir
  c.name = def.name or name
  c.recipients_path = paths.resolve(def.recipients, c.base_dir)
  c.concurrency = math.floor(def.concurrency or default_concurrency(def.send))
  if c.concurrency < 1 then error("mailshot.campaign: concurrency must be at least 1", 3) end
  c.email_field = def.email_field or "email"
  if def.encoding then
    c.encoding = require("mailshot.csv").encoding(def.encoding)
    if not c.encoding then
      error(("mailshot.campaign: encoding '%s' is not one of \"utf-8\", \"latin-1\", \"windows-1252\", \"iso-8859-15\""):format(def.encoding), 3)
    end
  end
  c.tpl = {}
  for _, k in ipairs { "from", "reply_to", "cc", "subject", "text", "html", "to_name" } do
    c.tpl[k] = compile(def[k], k, def.helpers)
  end
  -- a bad rate spec is an error now; each run makes its own limiters (mailshot.run)
  if def.rate ~= nil then rate.new(type(def.rate) == "function" and rate.custom(def.rate) or def.rate) end
  if def.cluster then require("mailshot.cluster").check_campaign_option(def.cluster) end
  c.retry = M.retry_config(def.retry)
  c.stop_when_down = M.stop_config(def.stop_when_down)
  -- Suppression lists (and the hard-bounce file, when it exists) are read now: a missing list
  -- is an error before anything is sent.
  local lists = def.suppress
  if type(lists) == "string" then lists = { lists } end
  if lists ~= nil and type(lists) ~= "table" then error("mailshot.campaign: suppress must be a file or a list of files", 3) end
  lists = lists and { table.unpack(lists) } or {}
  if def.bounces_to then
    c.bounces_path = paths.resolve(def.bounces_to, c.base_dir)
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
  if def.return_path then c.verp = return_path(def, c, c.name) end
  if def.dkim then
    -- the key is read once, here: a missing, unreadable or wrong-type key stops the script
    -- before any message is sent
    local o = {}
    for k, v in pairs(def.dkim) do o[k] = v end
    if type(o.key_file) == "string" then o.key_file = paths.resolve(o.key_file, c.base_dir) end
    local signer, err = require("mailshot.dkim").signer(o)
    if not signer then error("mailshot.campaign: dkim: " .. tostring(err), 3) end
    c.signer = signer
  end
  c.header_tpl = {}
  for name, value in pairs(def.headers or {}) do c.header_tpl[name] = compile(value, "headers." .. name, def.helpers) end
  return c
end

function M.is_campaign(x) return getmetatable(x) == Campaign end

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

--- Check the templates' fields against the CSV header before anything is sent: a field no
--- column has (without a default, outside a section on that field) would fail every row, so
--- it stops the run here with one message.  Fields the runner adds (unsubscribe_url) count as
--- columns; a function template is the campaign's own code and is not checked.
--- -> true | nil, message
function Campaign:check_fields(header)
  local have = {}
  for _, h in ipairs(header) do have[h] = true end
  if self.unsub then have.unsubscribe_url = true end
  local names = {}
  for k in pairs(self.tpl) do names[#names + 1] = k end
  for k in pairs(self.header_tpl) do names[#names + 1] = "headers." .. k end
  table.sort(names)
  for _, k in ipairs(names) do
    local tpl = self.tpl[k] or self.header_tpl[k:match("^headers%.(.*)$") or ""]
    if template.is_template(tpl) then
      for _, f in ipairs(tpl:required_fields()) do
        if not have[f] then
          local near = nearest_column(f, header)
          return nil, ('%s: template %s uses field "%s", which %s has no column for (columns: %s)%s; '
                       .. 'give it a default ({{ %s | "" }}) or guard it ({{#if %s}}...{{/if}})'):format(
            k, tpl.name, f, self.recipients, table.concat(header, ", "),
            near and (' - did you mean "' .. near .. '"?') or "", f, f)
        end
      end
    end
  end
  return true
end

--- The message of one row: classify.row (the row may be skipped: nil, reason, kind), then
--- render.  What `preview` shows and what `run` sends.
function Campaign:message(row, line)
  local email, why, kind = classify.row(self, row)
  if not email then return nil, why, kind end
  return self:render(row, line)
end

--- Render one classified row into { data = RFC 5322 text, from = envelope sender, to =
--- {address}, ... } or nil, reason: templates, mime.build, the DKIM signature.
function Campaign:render(row, line)
  local label = self.recipients .. " line " .. line
  local m = { to = row[self.email_field], attachments = self.attachments, eightbit = self.eightbit,
              base_dir = self.base_dir }
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
  if self.tpl.to_name then
    -- only the display name is templated: the address is always the classified row's
    local name, err = render(self, "to_name", self.tpl.to_name, row, label, false)
    if err then return nil, err end
    if name and name:find("%S") then m.to = { name = name, address = m.to } end
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
  local email = row[self.email_field]
  return {
    -- the envelope sender: From's address, or the row's own signed return path (return_path)
    data = data, from = self.verp and self.verp:address(line, email) or info.envelope_from,
    header_from = info.envelope_from,         -- From's address: the DKIM/DMARC domain (preflight)
    to = info.recipients, message_id = info.message_id, row = row, line = line, email = email,
    eightbit = info.eightbit,         -- mime.build knows the body's class: relay:send need not scan
  }
end

-- The report -------------------------------------------------------------------------------

local REPORT_COLUMNS = require("mailshot.result").REPORT_COLUMNS

-- Running ----------------------------------------------------------------------------------

local run = require("mailshot.run")
M.STOPPED = run.STOPPED

--- Run the campaign.  opts: dry (bool), outbox (dir), report (path), concurrency, quiet, limit,
--- journal, resume, force, resend_in_flight, relay_limiters, progress, signals, notice.
--- Returns the counts table, or nil, err when the run could not start.
function Campaign:run(opts)
  local r, err = run.new(self, opts, REPORT_COLUMNS)
  if not r then return nil, err end
  return r:go()
end

--- What ties a journal to this campaign: the recipients file, the script, the templates.
function Campaign:fingerprint(script)
  local parts = { util.sha256_file(self.recipients_path) or "", script and util.sha256_file(script) or "" }
  for _, k in ipairs { "from", "reply_to", "cc", "subject", "text", "html", "to_name" } do
    local t = self.tpl[k]
    if type(t) == "table" and t.source then parts[#parts + 1] = util.sha256(t.source) end
  end
  return util.sha256(table.concat(parts, " "))
end

return M
