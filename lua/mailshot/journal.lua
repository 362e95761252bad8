-- mailshot.journal: the send journal that makes `mailshot run --send --resume` exact.
--
-- An append-only text file next to the report, one record per line:
--
--   mailshot-journal 1 <fingerprint> <campaign>     the header: what the journal belongs to
--   I <line> <email>                                in flight: written (write(2)) before the
--                                                   message is handed to the network
--   F <line> <email> <status> <code> <enhanced> <stage> <via> <mx> <response>
--                                                   a final outcome (sent, failed, skipped,
--                                                   in-flight = possibly sent)
--   D <line> <email> ... (as F)                     deferred: a temporary failure, retried on resume
--
-- Fields are tab-separated, with \t \n \r \\ escaped.  A later record for a line supersedes an
-- earlier one.  The in-flight record reaches the kernel before the message reaches the server,
-- (all the marks of one turn of the event loop in one write, before the loop polls again: a
-- message body is only sent on a later turn, after its 354), so a kill -9 at any moment leaves
-- every message that might have been sent marked; outcomes
-- are buffered and written with the next in-flight record or within 0.1 s, and fsync'ed every
-- second (a power cut loses at most that second).  A torn last line (a crash inside write) is
-- closed with a newline on the next open and ignored when read.

local util = require "mailshot.util"
local core = require "mailshot.core"
local tsv_record = require("mailshot.text").tsv_record

local M = {}
local Journal = {}
Journal.__index = Journal

local FIELDS = { "status", "code", "enhanced", "stage", "via", "mx", "response" }
local MAGIC = "mailshot-journal"

local ESC = { ["\t"] = "\\t", ["\n"] = "\\n", ["\r"] = "\\r", ["\\"] = "\\\\" }
local UNESC = { t = "\t", n = "\n", r = "\r", ["\\"] = "\\" }
local function esc(v) return (tostring(v == nil and "" or v):gsub("[\t\n\r\\]", ESC)) end
local function unesc(v) return (v:gsub("\\(.)", UNESC)) end

local function split(line)
  local out = {}
  for f in (line .. "\t"):gmatch("([^\t]*)\t") do out[#out + 1] = unesc(f) end
  return out
end

-- Read an existing journal: header fields and the last record of each line (only the header
-- when header_only: a run that starts over needs no more, and a big journal costs time).
local function load_journal(path, header_only)
  local f = io.open(path, "rb")
  if not f then return nil end
  local data = header_only and (f:read("L") or "") or f:read("a")   -- "L": a torn header has no "\n"
  f:close()
  local state = { records = {}, torn = data ~= "" and data:sub(-1) ~= "\n" }
  local first = true
  for line in data:gmatch("([^\n]*)\n") do
    if first then
      local fp, name = line:match("^mailshot%-journal 1 (%x+) ?(.*)$")
      if not fp then return nil, ("%s is not a mailshot journal"):format(path) end
      state.fingerprint, state.name, first = fp, name, false
    else
      local t = split(line)
      local kind, n = t[1], math.tointeger(tonumber(t[2]))
      if n and (kind == "I" or kind == "F" or kind == "D") then
        local rec = { kind = kind, line = n, email = t[3] }
        for i, k in ipairs(FIELDS) do rec[k] = t[3 + i] end
        state.records[n] = rec
      end   -- anything else is a torn or foreign line: ignored
    end
  end
  if first then state.fingerprint = nil end   -- an empty or header-less file
  return state
end
M.load = load_journal

--- Open (create, or continue) the journal of a campaign.
--- opts: fingerprint, name, resume (continue an existing one), force (accept a different
--- fingerprint, or start over).  Returns journal, previous state (or nil) | nil, message.
function M.open(path, opts)
  local lock, lerr = util.lock(path .. ".lock")
  if not lock then
    return nil, ("campaign %s is already running (%s: %s)"):format(opts.name, path .. ".lock", lerr)
  end
  local previous, err = load_journal(path, not opts.resume)
  if err then lock:unlock(); return nil, err end
  if previous and previous.fingerprint then
    if not opts.resume and not opts.force then
      lock:unlock()
      return nil, ("%s exists: this campaign was run before; add --resume to continue it, "
                   .. "or --force to start it over (the old journal is kept as %s.old)"):format(path, path)
    end
    if opts.resume and previous.fingerprint ~= opts.fingerprint and not opts.force then
      lock:unlock()
      return nil, ("the recipients file or the templates changed since the journal %s was written; "
                   .. "--resume would match rows by their line numbers and could skip or repeat people. "
                   .. "Use --force to resume anyway"):format(path)
    end
    if not opts.resume then
      os.rename(path, path .. ".old")
      previous = nil
    end
  else
    previous = nil
  end
  local f, ferr = io.open(path, "ab")
  if not f then lock:unlock(); return nil, ("journal %s: %s"):format(path, ferr) end
  f:setvbuf("full", 1 << 16)
  local j = setmetatable({ f = f, path = path, lock = lock, buf = {}, n = 0, last_sync = core.now() }, Journal)
  j.deferred_flush = function()
    j.flush_queued = false
    if j.f then j:flush() end
  end
  if previous then
    if previous.torn then f:write("\n") end
  else
    f:write(("%s 1 %s %s\n"):format(MAGIC, opts.fingerprint, esc(opts.name)))
  end
  f:flush()
  return j, previous
end

-- A record: tab-separated fields with \t \n \r \\ escaped (text.tsv_record, in C).
local function record(kind, line, email, r)
  return tsv_record(kind, line, email, r, r and FIELDS)
end

--- The message for this row is about to be sent.  The mark is written (with every other mark
--- of this turn of the loop, in one write) before the loop next polls: the message's body can
--- only go out after its 354 reply, which needs that poll.
function Journal:in_flight(line, email)
  self.n = self.n + 1
  self.buf[self.n] = record("I", line, email)
  if not self.flush_queued then
    self.flush_queued = true
    core.defer(self.deferred_flush)
  end
end

--- A row's outcome (a report row: status, code, ...); deferred ones are retried on resume.
function Journal:outcome(rep, deferred)
  self.n = self.n + 1
  self.buf[self.n] = record(deferred and "D" or "F", rep.line, rep.email, rep)
end

--- Write what is buffered (one write), and fsync at most once a second.
function Journal:flush(sync)
  if self.n > 0 then
    self.f:write(table.concat(self.buf, "", 1, self.n))
    self.buf, self.n = {}, 0
  end
  local now = core.now()
  if sync or now - self.last_sync >= 1 then
    util.fsync(self.f)
    self.last_sync = now
  else
    self.f:flush()
  end
end

function Journal:close()
  if not self.f then return end
  self:flush(true)
  self.f:close()
  self.f = nil
  self.lock:unlock()
end

-- Rate limiter states beside the journal (NAME.journal.rates), so daily quotas hold across
-- --resume: a Lua table literal, written whole to a temporary file and renamed over the old.
local function serialize(v, out)
  local t = type(v)
  if t == "table" then
    out[#out + 1] = "{"
    for k, x in pairs(v) do
      out[#out + 1] = "["
      serialize(k, out)
      out[#out + 1] = "]="
      serialize(x, out)
      out[#out + 1] = ","
    end
    out[#out + 1] = "}"
  elseif t == "string" then out[#out + 1] = ("%q"):format(v)
  elseif t == "number" then out[#out + 1] = math.type(v) == "integer" and tostring(v) or ("%.17g"):format(v)
  elseif t == "boolean" then out[#out + 1] = tostring(v)
  else out[#out + 1] = "nil" end
end

function M.save_rates(path, states)
  local out = { "return " }
  serialize(states, out)
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "w")
  if not f then return nil, err end
  f:write(table.concat(out), "\n")
  util.fsync(f)
  f:close()
  return os.rename(tmp, path)
end

function M.load_rates(path)
  local f = io.open(path, "r")
  if not f then return {} end
  local src = f:read("a")
  f:close()
  local chunk = load(src, "=" .. path, "t", {})      -- data only: an empty environment
  local ok, states = pcall(chunk or function() end)
  return ok and type(states) == "table" and states or {}
end

M.FIELDS = FIELDS
return M
