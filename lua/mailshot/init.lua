-- mailshot: the module campaign scripts require.
--
--   local mailshot = require "mailshot"
--   local relay = mailshot.relay { server = "smtp.example.com:587", user = ..., password = ... }
--   return mailshot.campaign { recipients = "list.csv", from = ..., subject = ..., text = ..., send = ... }
--
-- Everything here is thin: the C modules (mailshot.core, mailshot.smtp, mailshot.csv) do the
-- waiting and the protocol work, the Lua modules (template, mime, campaign) the rest.

local core = require "mailshot.core"
local smtp = require "mailshot.smtp"

local M = {
  version = "0.1.0",
  core = core,
  template = require "mailshot.template",
  mime = require "mailshot.mime",
  csv = require "mailshot.csv",
}

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
  local relay, err = smtp.relay(o)
  if not relay then error("mailshot.relay: " .. err, 2) end
  relays[relay] = true
  return relay
end

--- Close every relay made so far (QUIT their idle sessions).  The runner calls it at the end.
function M.close_relays()
  for r in pairs(relays) do r:close() end
end

-- Campaigns --------------------------------------------------------------------------------

--- Describe a campaign; `mailshot run` runs what the script returns.
function M.campaign(def)
  return require("mailshot.campaign").new(def)
end

return M
