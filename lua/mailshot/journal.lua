-- mailshot.journal: the send journal that makes `mailshot run --send --resume` exact.
--
-- An append-only text file next to the report, one record per line:
--
--   mailshot-journal 2 <fingerprint> <campaign>     the header: what the journal belongs to, and
--                                                   its version (below)
--   I <line> <email>                                in flight: written (write(2)) before the
--                                                   message is handed to the network
--   F <line> <email> <status> <code> <enhanced> <stage> <via> <mx> <response> <first_response>
--                                                   a final outcome (sent, failed, skipped), or
--                                                   in-flight: a resumed run did not resend it, and
--                                                   the next --resume still counts it in flight
--   D <line> <email> ... (as F)                     deferred: a temporary failure, retried on resume
--
-- Fields are tab-separated, with \t \n \r \\ escaped (an F or D record has all eleven: one with
-- fewer was torn by a crash, and is ignored).  Version 1 (before first_response) has ten; a
-- journal keeps its version: a version 1 journal is resumed, and written on, as version 1.  A later record for a line supersedes an
-- earlier one.  The in-flight record reaches the kernel before the message reaches the server,
-- (all the marks of one turn of the event loop in one write, before the loop polls again: a
-- message body is only sent on a later turn, after its 354), so a kill -9 at any moment leaves
-- every message that might have been sent marked; outcomes
-- are buffered and written with the next in-flight record, within 0.1 s or once 1,024 wait,
-- and fsync'ed every
-- second (a power cut loses at most that second).  A torn last line (a crash inside write) is
-- closed with a newline on the next open and ignored when read.

local util = require "mailshot.util"
local core = require "mailshot.core"
local tsv_record = require("mailshot.text").tsv_record

local M = {}
local Journal = {}
Journal.__index = Journal

local FIELDS = require("mailshot.result").RECORD   -- a record's fields after kind, line, email
local MAGIC = "mailshot-journal"
local VERSION = 2
-- the fields of each version's records: version 1 had all but the last (first_response)
local VERSION_FIELDS = { [1] = table.move(FIELDS, 1, #FIELDS - 1, 1, {}), [2] = FIELDS }
assert(FIELDS[#FIELDS] == "first_response")

local ESC = { ["\t"] = "\\t", ["\n"] = "\\n", ["\r"] = "\\r", ["\\"] = "\\\\" }
local UNESC = { t = "\t", n = "\n", r = "\r", ["\\"] = "\\" }
local function esc(v) return (tostring(v == nil and "" or v):gsub("[\t\n\r\\]", ESC)) end
local function unesc(v) return (v:gsub("\\(.)", UNESC)) end

local function split(line)
  local out = {}
  for f in (line .. "\t"):gmatch("([^\t]*)\t") do out[#out + 1] = unesc(f) end
  return out
end

-- What --resume keeps of a journal: for each CSV line, where its last record starts in the file
-- and what kind it is, in one integer (offset * 8 + code) of a util.line_index, 8 bytes a line:
-- a million records cost 8 MB, not the gigabyte a Lua table of records would.  The record
-- itself is read again (Previous:record) when the campaign reaches its line.
local CODE_INFLIGHT, CODE_DEFERRED = 1, 2
local CODE_FINAL = { sent = 3, failed = 4, skipped = 5 }
local FINAL_STATUS = { [3] = "sent", [4] = "failed", [5] = "skipped" }
-- An F or D record of a version: kind, line, email, then exactly that version's fields.
local function f_pattern(fields)
  return "^([FD])\t(%d+)\t[^\t]*\t([^\t]*)" .. ("\t[^\t]*"):rep(#fields - 1) .. "$"
end

-- The code of one whole record line, and its CSV line; nil for a torn or foreign line.  An
-- F record of status in-flight (a resumed run that did not resend it) stays in flight: a
-- later --resume --resend-in-flight may still send it.
local function classify(line, pattern)
  local n = line:match("^I\t(%d+)\t[^\t]*$")
  if n then return CODE_INFLIGHT, math.tointeger(n) end
  local kind, m, status = line:match(pattern)
  if not kind then return nil end
  m = math.tointeger(m)
  if kind == "D" then return CODE_DEFERRED, m end
  if status == "in-flight" then return CODE_INFLIGHT, m end
  return CODE_FINAL[status], m
end

local Previous = {}
Previous.__index = Previous

--- The last record of CSV line n: { kind = "I"|"F"|"D", line, email, status, code, ... } or nil.
function Previous:record(n)
  local v = self.index:get(n)
  if not v then return nil end
  local off, code = v >> 3, v & 7
  local f = self.f
  if off ~= self.pos then f:seek("set", off) end     -- records are mostly in line order
  local text = f:read("l")
  self.pos = text and off + #text + 1 or nil
  local t = split(text or "")
  local rec = { kind = code == CODE_INFLIGHT and "I" or code == CODE_DEFERRED and "D" or "F", line = n, email = t[3] }
  for i, k in ipairs(self.fields) do rec[k] = t[3 + i] end
  if code == CODE_INFLIGHT then rec.status = nil end
  return rec
end

function Previous:close()
  if self.f then self.f:close(); self.f = nil end
end

-- Read an existing journal's header (only that when header_only: a run that starts over needs
-- no more), and index the last record of each CSV line up to max_line (no row of the recipients
-- file can start past it; records beyond are not kept).  Counts of the kinds in `counts`.
local function load_journal(path, header_only, max_line)
  local f = io.open(path, "rb")
  if not f then return nil end
  local head = f:read("L") or ""                                   -- "L": a torn header has no "\n"
  local state = setmetatable({ torn = head ~= "" and head:sub(-1) ~= "\n" }, Previous)
  if head == "" or state.torn then f:close(); return state end    -- an empty or header-less file
  local version, fp, name = head:match("^mailshot%-journal (%d+) (%x+) ?(.*)\n$")
  if not fp then f:close(); return nil, ("%s is not a mailshot journal"):format(path) end
  version = math.tointeger(version)
  if not VERSION_FIELDS[version] then
    f:close()
    return nil, ("%s is a journal of version %s, written by a newer mailshot"):format(path, version)
  end
  state.fingerprint, state.name = fp, name
  state.version, state.fields = version, VERSION_FIELDS[version]
  if header_only then f:close(); return state end
  local index = util.line_index(max_line)
  local pattern = f_pattern(state.fields)
  local off = #head
  for l in f:lines("L") do
    if l:byte(-1) ~= 10 then state.torn = true; break end          -- a torn last line: ignored
    local code, n = classify(l:sub(1, -2), pattern)
    if code and n then index:set(n, off * 8 + code) end            -- a later record supersedes
    off = off + #l
  end
  local counts = { final = 0, sent = 0, failed = 0, skipped = 0, inflight = 0, deferred = 0 }
  for n = 1, index:size() do
    local v = index:get(n)
    if v then
      local code = v & 7
      local status = FINAL_STATUS[code]
      if status then
        counts.final, counts[status] = counts.final + 1, counts[status] + 1
      elseif code == CODE_INFLIGHT then counts.inflight = counts.inflight + 1
      else counts.deferred = counts.deferred + 1 end
    end
  end
  f:setvbuf("full", 1 << 16)
  state.f, state.pos, state.index, state.counts = f, nil, index, counts
  return state
end
M.load = load_journal

--- Open (create, or continue) the journal of a campaign.
--- opts: fingerprint, name, resume (continue an existing one: it must exist), force (accept a
--- different fingerprint, or start over), max_line (no CSV row starts past this line: records
--- of lines past it are not kept; e.g. the recipients file's size in bytes).  Returns journal, previous state (or nil) | nil, message.
function M.open(path, opts)
  if opts.resume then
    -- a --resume that finds no journal must not start the campaign again: everyone already
    -- sent to would get a second copy (a mistyped --report, another working folder)
    local f, err, errno = io.open(path, "rb")
    if f then f:close()
    elseif errno == 2 then
      return nil, ("--resume: no journal %s, so nothing to resume and nothing was sent. The journal sits beside "
                   .. "the report (by default NAME-report.csv beside the script; else the first run's --report "
                   .. "FILE): check --report. To start the campaign from the beginning, run it without --resume"):format(path)
    else
      return nil, ("journal %s: %s"):format(path, err)
    end
  end
  local lock, lerr = util.lock(path .. ".lock")
  if not lock then
    return nil, ("campaign %s is already running (%s: %s)"):format(opts.name, path .. ".lock", lerr)
  end
  local previous, err = load_journal(path, not opts.resume, opts.max_line)
  if err then lock:unlock(); return nil, err end
  if previous and previous.fingerprint then
    if not opts.resume and not opts.force then
      lock:unlock()
      return nil, ("%s exists: this campaign was run before; add --resume to continue it, "
                   .. "or --force to start it over (the old journal is kept as %s.old)"):format(path, path)
    end
    if opts.resume and previous.fingerprint ~= opts.fingerprint and not opts.force then
      previous:close()
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
  if not f then
    if previous then previous:close() end
    lock:unlock()
    return nil, ("journal %s: %s"):format(path, ferr)
  end
  f:setvbuf("full", 1 << 16)
  -- records in the journal's own version: a version 1 journal resumed stays version 1
  local j = setmetatable({ f = f, path = path, lock = lock, buf = {}, n = 0, last_sync = core.now(),
                          previous = previous, fields = previous and previous.fields or FIELDS }, Journal)
  j.deferred_flush = function()
    j.flush_queued = false
    if j.f then j:flush() end
  end
  if previous then
    if previous.torn then f:write("\n") end
  else
    f:write(("%s %d %s %s\n"):format(MAGIC, VERSION, opts.fingerprint, esc(opts.name)))
  end
  f:flush()
  return j, previous
end

-- A record: tab-separated fields with \t \n \r \\ escaped (text.tsv_record, in C).
local function record(self, kind, line, email, r)
  return tsv_record(kind, line, email, r, r and self.fields)
end

-- Records wait in a buffer for the next flush; past this many they are written at once: a
-- long run of rows that never wait on the network (skipped, or final in the journal) gives the
-- flushing task no turn, and must not pile up in memory.
local MAX_BUFFERED = 1024

--- The message for this row is about to be sent.  The mark is written (with every other mark
--- of this turn of the loop, in one write) before the loop next polls: the message's body can
--- only go out after its 354 reply, which needs that poll.
function Journal:in_flight(line, email)
  self.n = self.n + 1
  self.buf[self.n] = record(self, "I", line, email)
  if self.n >= MAX_BUFFERED then self:write_buffer() end
  if not self.flush_queued then
    self.flush_queued = true
    core.defer(self.deferred_flush)
  end
end

--- A row's outcome (a report row: status, code, ...); deferred ones are retried on resume.
function Journal:outcome(rep, deferred)
  self.n = self.n + 1
  self.buf[self.n] = record(self, deferred and "D" or "F", rep.line, rep.email, rep)
  if self.n >= MAX_BUFFERED then self:write_buffer() end
end

-- Hand the buffered records to the file's own buffer (64 KiB: it writes when full).
function Journal:write_buffer()
  if self.n > 0 then
    self.f:write(table.concat(self.buf, "", 1, self.n))
    self.buf, self.n = {}, 0
  end
end

--- Write what is buffered (one write), and fsync at most once a second.
function Journal:flush(sync)
  self:write_buffer()
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
  if self.previous then self.previous:close() end
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

return M
