-- mailshot: the module campaign scripts require.
--
--   local mailshot = require "mailshot"
--   local relay = mailshot.relay { server = "smtp.example.com:587", user = ..., password = ... }
--   return mailshot.campaign { recipients = "list.csv", from = ..., subject = ..., text = ..., send = ... }
--
-- Everything here is thin: the C modules (mailshot.core, mailshot.smtp, mailshot.csv) do the
-- waiting and the protocol work, the Lua modules (template, mime, campaign) the rest.

local core = require("mailshot.core")
local smtp = require("mailshot.smtp")

local M = {
  version = core.version,           -- the Makefile's VERSION, through C
  core = core,
  template = require "mailshot.template",
  mime = require "mailshot.mime",
  csv = require "mailshot.csv",
  dns = require "mailshot.dns",
  idna = require "mailshot.idna",
  rate = require "mailshot.rate",
  hooks = require "mailshot.hooks",
  bounce = require "mailshot.bounce",
}
local direct = require("mailshot.direct")

-- Tasks ------------------------------------------------------------------------------------

local Task = {}
Task.__index = Task

--- Start fn(...) as a new task (a coroutine on the event loop); returns a task handle.
function M.spawn(fn, ...)
  if type(fn) ~= "function" then error("mailshot.spawn: expected a function", 2) end
  local task = setmetatable({ done = false, waiters = {} }, Task)
  local args = table.pack(...)
  task.thread = core.spawn(function()
    local res = table.pack(xpcall(fn, debug.traceback, table.unpack(args, 1, args.n)))
    task.done, task.ok = true, res[1]
    if res[1] then
      task.results = table.pack(table.unpack(res, 2, res.n))
    else
      task.err = res[2]
      if #task.waiters == 0 then io.stderr:write("mailshot: task failed: ", tostring(res[2]), "\n") end
    end
    for _, w in ipairs(task.waiters) do core.wake(w) end
  end)
  return task
end

--- Wait for the task to end: true, its results... or nil, its error.
function Task:join()
  if not self.done then
    self.waiters[#self.waiters + 1] = core.current()
    core.suspend()
  end
  if self.ok then return true, table.unpack(self.results, 1, self.results.n) end
  return nil, self.err
end

M.sleep = core.sleep
M.now = core.now

-- Relays -----------------------------------------------------------------------------------

local relays = setmetatable({}, { __mode = "k" })   -- to close politely at the end of a run
local directs = setmetatable({}, { __mode = "k" })

-- Per-relay rate limits: a relay with a `rate` is the C relay behind mailshot.sender's one
-- limiter seam (the C object itself is never changed).
local sender = require("mailshot.sender")
local relay_limits = setmetatable({}, { __mode = "k" })   -- limited relay -> its limiter

local function read_secret_file(path)
  local f, err = io.open(path, "r")
  if not f then error("relay: password_file: " .. err, 3) end
  local s = f:read("a")
  f:close()
  return (s:gsub("[\r\n]+$", ""))
end

--- An SMTP relay (see the README for every option).  Passwords come from the script
--- (typically os.getenv) or `password_file`; never from the command line.
function M.relay(opts)
  if type(opts) ~= "table" then error("mailshot.relay: expected a table of options", 2) end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  if o.user == "" then o.user = nil end
  if o.password_file then o.password = read_secret_file(o.password_file); o.password_file = nil end
  if o.ca_file == "" then o.ca_file = nil end
  if o.tls == "" then o.tls = nil end
  if o.dns == "" then o.dns = nil end
  if type(o.dns) == "table" then o.dns = table.concat(o.dns, ",") end   -- as direct_sender's dns
  local limits = o.rate
  o.rate = nil
  local rules = limits and M.rate.parse(limits)
  if rules and rules.max_connections and not o.max_connections then o.max_connections = rules.max_connections end
  local relay, err = smtp.relay(o)
  if not relay then error("mailshot.relay: " .. err, 2) end
  relays[relay] = true
  sender.passes_gate(relay)
  if rules and #rules > 0 then
    local limited = sender.limited_relay(relay, M.rate.new(rules, { name = "relay " .. tostring(relay) }))
    relay_limits[limited] = limited.limiter
    return limited
  end
  return relay
end

--- Close every relay and direct sender made so far (QUIT their idle sessions).  The runner
--- calls it at the end of a run.
function M.close_relays()
  for r in pairs(relays) do r:close() end
  for d in pairs(directs) do d:close() end
end

--- Every rate limiter of the relays made so far, by name (the runner keeps their state across
--- --resume).
function M.relay_limiters()
  local out = {}
  for relay, limiter in pairs(relay_limits) do out["relay " .. tostring(relay)] = limiter end
  return out
end

--- Open SMTP sessions across every relay and direct sender (for the progress view).
function M.connections()
  local n = 0
  for r in pairs(relays) do n = n + r:stats().connections end
  for d in pairs(directs) do
    for _, r in pairs(d.pools) do n = n + r:stats().connections end
  end
  return n
end

-- Direct delivery and fallback rules ---------------------------------------------------------

--- A direct sender (see the README): `sender:send(msg)` delivers to the recipient domain's MX hosts.
function M.direct_sender(opts)
  local d = direct.new(opts)
  directs[d] = true
  return sender.passes_gate(d)
end

local direct_by_options = {}

-- A stable key for an options table, so that mailshot.direct(msg, opts) with equal options
-- shares one sender (and so its DNS cache and sessions).
local function options_key(opts)
  local keys = {}
  for k, v in pairs(opts) do keys[#keys + 1] = tostring(k) .. "=" .. (type(v) == "table" and table.concat(v, ",") or tostring(v)) end
  table.sort(keys)
  return table.concat(keys, ";")
end

--- Deliver one message directly: mailshot.direct(msg, { dns = "IP[:PORT]", ... }) -> result
function M.direct(msg, opts)
  opts = opts or {}
  local key = options_key(opts)
  local d = direct_by_options[key]
  if not d then d = M.direct_sender(opts); direct_by_options[key] = d end
  return d:send(msg)
end

-- Stages where nothing was said about the recipient: another path may well succeed.
local NO_VERDICT = { connect = true, tls = true, greeting = true, ehlo = true, helo = true, starttls = true,
                     auth = true, dns = true }

--- The default fallback condition: a temporary failure, or a failure before the server said
--- anything about the message.  Never after a 5xx to MAIL, RCPT or the message itself.
function M.should_fall_back(result)
  if result.ok then return false end
  if result.dns == "nxdomain" or result.dns == "nullmx" then return false end
  return result.temporary == true or NO_VERDICT[result.stage] == true
end

--- A result's answer in one line, naming its path: "relay: 451 4.7.1 greylisted" (the code and
--- the enhanced code are added when the message does not start with them: a relay's message is
--- the reply's text alone).  What a fallback keeps of the first path.
function M.answer(result)
  local msg = tostring(result.message or ""):gsub("[\r\n]+", " ")
  local code = math.tointeger(result.code)
  if code and code ~= 0 and not msg:find("^" .. code) then
    local enhanced = type(result.enhanced) == "string" and result.enhanced ~= "" and result.enhanced
    if enhanced and msg:sub(1, #enhanced) ~= enhanced then msg = enhanced .. " " .. msg end
    msg = code .. " " .. msg
  end
  return ("%s: %s"):format(result.via or "sender", msg)
end

--- Try senders in order: mailshot.fallback{ relay, mailshot.direct_sender{ dns = "..." } }
--- (the brief's "relay, then direct on error"), or the other way round.  A sender is a relay,
--- a direct sender, anything with :send(msg), or a function(msg, row).  opts.when(result)
--- decides whether to try the next one (default mailshot.should_fall_back).  The result is
--- the last sender's, with `fallback` listing every try { via, relay, ok, code, enhanced, message,
--- error, stage }, and, when more than one was tried, `first_response`: the first one's answer (M.answer).
function M.fallback(senders, opts)
  if type(senders) ~= "table" or #senders < 1 then error("mailshot.fallback: expected a list of senders", 2) end
  for i, s in ipairs(senders) do
    if type(s) ~= "function" and not (type(s) == "table" or type(s) == "userdata") then
      error(("mailshot.fallback: sender %d is not a function or an object with :send"):format(i), 2)
    end
  end
  local when = (opts and opts.when) or M.should_fall_back
  local gated = true
  for _, s in ipairs(senders) do gated = gated and sender.gated(s) end
  local function fallback(msg, row)
    local tries, result = {}, nil
    for i, s in ipairs(senders) do
      result = sender.call(s, msg, row)
      -- relay, error and stage: the run's relay-down rule sees a relay that failed before a fallback
      tries[#tries + 1] = { via = result.via, relay = result.relay, ok = result.ok, code = result.code,
                            enhanced = result.enhanced, message = result.message, error = result.error,
                            stage = result.stage }
      if result.ok or i == #senders or not when(result) then break end
    end
    result.fallback = tries
    if #tries > 1 then result.first_response = M.answer(tries[1]) end
    return result
  end
  if gated then sender.passes_gate(fallback) end
  return fallback
end

-- Campaigns --------------------------------------------------------------------------------

--- Describe a campaign; `mailshot run` runs what the script returns.
--- Relative paths are resolved against def.base_dir (nil: the current directory).
function M.campaign(def)
  return require("mailshot.campaign").new(def)
end

--- The mailshot module as a campaign script in folder dir sees it: mailshot.campaign and
--- mailshot.template.file resolve relative paths against dir (`mailshot run` loads scripts
--- with it, so a script's files sit beside it).  script: the script's path, whose file name
--- without .lua is the campaign's default name.  -> mailshot view, template view
function M.for_folder(dir, script)
  local name = script and (script:match("([^/]+)%.lua$") or script:match("([^/]+)$")) or nil
  local campaign = require "mailshot.campaign"
  local tpl = setmetatable({
    file = function(path, opts)
      local o = type(opts) == "string" and { name = opts } or {}
      for k, v in pairs(type(opts) == "table" and opts or {}) do o[k] = v end
      if o.base_dir == nil then o.base_dir = dir end
      return M.template.file(path, o)        -- a tail call: its errors name the script's line
    end,
  }, { __index = M.template })
  local view = setmetatable({
    template = tpl,
    campaign = function(def) return campaign.new(def, dir, name) end,
  }, { __index = M })
  return view, tpl
end

return M
