-- mailshot.outcome: where every recipient's outcome goes: the report (CSV), the journal (when
-- sending) and, for a hard bounce, the campaign's bounces_to file.  Also the one mapping of a
-- sender's result to a report row.

local suppress = require("mailshot.suppress")
local csv_row = require("mailshot.text").csv_row
local util = require("mailshot.util")

local M = {}

-- The report -------------------------------------------------------------------------------

local Report = {}
Report.__index = Report

--- open_report(path, columns) -> report | nil, err: the header is written now.  columns: the
--- report's fields in order (the campaign's REPORT_COLUMNS).
---
--- Rows are written as they complete (a crash leaves a report of everything done so far, and
--- `tail -f` follows the run); close() then rewrites the file in CSV line order.  Memory stays
--- bounded: only where each line's row starts in the file is kept (util.line_index, 8 bytes a
--- line), and the rows are copied in line order to a new file renamed over the report.
function M.open_report(path, columns)
  local f, err = io.open(path, "w")
  if not f then return nil, ("report %s: %s"):format(path, err) end
  f:setvbuf("full", 65536)
  local header = table.concat(columns, ",") .. "\r\n"
  f:write(header)
  return setmetatable({ f = f, path = path, columns = columns, header = header,
                        at = #header, index = util.line_index(), last = 0, ordered = true,
                        counts = { sent = 0, failed = 0, skipped = 0, written = 0, deferred = 0, ["in-flight"] = 0,
                                   ["not-started"] = 0 } }, Report)
end

-- One row: RFC 4180 quoting when a value has a quote, comma or line break, or spaces at either
-- end (a spreadsheet would trim them); text.csv_row does it in C.
function Report:add(r)
  self.counts[r.status] = self.counts[r.status] + 1
  local text = csv_row(r, self.columns)
  local line = math.tointeger(r.line)
  if line and line > 0 and not self.unindexed then
    if line <= self.last then self.ordered = false end
    self.last = line
    self.index:set(line, self.at + 1)                -- 0 is "none" in a line_index
  else
    self.unindexed = true                            -- a row without a line: keep the file as it is
  end
  self.f:write(text, "\r\n")
  self.at = self.at + #text + 2
end

-- Rows are read back through a window of the file held in memory (1 MiB, more for a longer
-- row): the completion order is mostly near the line order, so one read serves many rows, where
-- a seek for every row out of place cost a system call and a refill of the file's 64 KiB buffer
-- (30,000 of them at the end of a 30,000-row cluster run).  RFC 4180 rows end at CRLF outside
-- quotes, and a quoted cell may hold line breaks.
local WINDOW = 1 << 20

local function row_reader(src)
  local find, sub = string.find, string.sub
  local data, from = "", 0
  -- the row at offset rel of the window -> its text | nil (it runs past the window)
  local function row_in(rel)
    local i, quotes = rel, 0
    while true do
      local nl = find(data, "\n", i, true)
      if not nl then return nil end
      local q = find(data, '"', i, true)
      while q and q < nl do quotes = quotes + 1; q = find(data, '"', q + 1, true) end
      if quotes % 2 == 0 then return sub(data, rel, nl) end
      i = nl + 1
    end
  end
  -- the row that starts at byte offset off of the file -> its text | nil (no whole row there)
  return function(off)
    local rel = off - from + 1
    local row = rel >= 1 and rel <= #data and row_in(rel)
    if row then return row end
    local size = WINDOW
    while true do
      if not src:seek("set", off) then return nil end
      data, from = src:read(size) or "", off
      local short = #data < size                 -- the end of the file is in the window
      row = data ~= "" and row_in(1)
      if row then return row end
      if short then return nil end
      size = size * 2                            -- a row longer than the window
    end
  end
end

-- The report rewritten in CSV line order: each line's row copied, by its offset, into a new
-- file (0600, beside the report) renamed over the report.  true | nil, err (the report is then
-- left as written, in completion order).
function Report:reorder()
  local src, err = io.open(self.path, "rb")
  if not src then return nil, err end
  local out, tmp = util.temp_file(self.path)
  if not out then src:close(); return nil, tmp end
  out:setvbuf("full", 65536)
  local ok, werr = out:write(self.header)
  local row_at, index = row_reader(src), self.index
  for n = 1, index:size() do
    local v = ok and index:get(n)
    if v then
      local row = row_at(v - 1)
      if not row then ok, werr = nil, "row of line " .. n .. " not found"; break end
      ok, werr = out:write(row)
    end
  end
  src:close()
  local cok, cerr = out:close()
  if ok and not cok then ok, werr = nil, cerr end
  if ok then ok, werr = os.rename(tmp, self.path) end
  if not ok then os.remove(tmp); return nil, werr end
  return true
end

--- Close the report: rewritten in CSV line order unless it is in that order already.
--- true | nil, err (the report is complete but in completion order).
function Report:close()
  local ok, err = self.f:close()
  if not ok then return nil, err end
  if self.ordered or self.unindexed then return true end
  return self:reorder()
end

-- A result as a report row ------------------------------------------------------------------

local function one_line(s)
  s = tostring(s or "")
  if not s:find("[\r\n]") then return s end       -- the usual reply: no copy
  return (s:gsub("[\r\n]+", " "))
end
M.one_line = one_line

--- Fill report row rep from a sender's result res: status, code, enhanced, stage, via, mx,
--- response, first_response, and temporary/retry for the runner's retry queue.
function M.from_result(rep, res)
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
  rep.first_response = res.first_response and one_line(res.first_response) or nil   -- a fallback's first path
  return rep
end

-- The sink ---------------------------------------------------------------------------------

local Sink = {}
Sink.__index = Sink

--- sink(report, journal, bounces_path, cluster): journal, bounces_path and cluster (a
--- mailshot.cluster: outcomes go to Redis too) may be nil.
function M.sink(report, jrn, bounces_path, cluster)
  return setmetatable({ report = report, journal = jrn, bounces_path = bounces_path, cluster = cluster }, Sink)
end

--- The row's outcome, final (or deferred: --resume retries it).
function Sink:add(rep)
  self.report:add(rep)
  if self.journal then self.journal:outcome(rep, rep.status == "deferred") end
  if self.cluster then self.cluster:settle(rep.status == "deferred" and "D" or "F", rep) end
end

--- Waiting in the retry queue: not sent, so a crash now must not count it in flight.
function Sink:waiting(rep)
  if self.journal then self.journal:outcome(rep, true) end
  if self.cluster then self.cluster:settle("D", rep) end
end

--- The message is about to be handed to the sender.
function Sink:in_flight(line, email)
  if self.journal then self.journal:in_flight(line, email) end
end

--- A hard bounce (5.1.x: no such user or domain): the next campaign skips this address.
--- With a cluster (sink.publish: mailshot.cluster_suppress) every worker learns of it too.
function Sink:bounce(email, res, rep)
  if not (self.bounces_path or self.publish) or res.ok or rep.temporary
     or not tostring(res.enhanced or ""):match("^5%.1%.") then return end
  local reason = ("%s %s %s"):format(res.code or "", res.enhanced, res.message or "")
  if self.bounces_path then
    local ok, err = suppress.append(self.bounces_path, email, reason)
    if not ok then io.stderr:write("mailshot: bounces_to: ", tostring(err), "\n") end
  end
  if self.publish then
    local ok, err = self.publish(email, reason)
    if not ok then io.stderr:write("mailshot: ", tostring(err), "\n") end
  end
end

return M
