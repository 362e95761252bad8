-- mailshot.outcome: where every recipient's outcome goes: the report (CSV), the journal (when
-- sending) and, for a hard bounce, the campaign's bounces_to file.  Also the one mapping of a
-- sender's result to a report row.

local suppress = require("mailshot.suppress")
local csv_row = require("mailshot.text").csv_row

local M = {}

-- The report -------------------------------------------------------------------------------

local Report = {}
Report.__index = Report

--- open_report(path, columns) -> report | nil, err: the header is written now.  columns: the
--- report's fields in order (the campaign's REPORT_COLUMNS).
function M.open_report(path, columns)
  local f, err = io.open(path, "w")
  if not f then return nil, ("report %s: %s"):format(path, err) end
  f:setvbuf("full", 65536)
  f:write(table.concat(columns, ","), "\r\n")
  return setmetatable({ f = f, path = path, columns = columns,
                        counts = { sent = 0, failed = 0, skipped = 0, written = 0, deferred = 0, ["in-flight"] = 0 } }, Report)
end

-- One row: RFC 4180 quoting when a value has a quote, comma or line break, or spaces at either
-- end (a spreadsheet would trim them); text.csv_row does it in C.
function Report:add(r)
  self.counts[r.status] = self.counts[r.status] + 1
  self.f:write(csv_row(r, self.columns), "\r\n")
end

function Report:close() self.f:close() end

-- A result as a report row ------------------------------------------------------------------

local function one_line(s)
  s = tostring(s or "")
  if not s:find("[\r\n]") then return s end       -- the usual reply: no copy
  return (s:gsub("[\r\n]+", " "))
end
M.one_line = one_line

--- Fill report row rep from a sender's result res: status, code, enhanced, stage, via, mx,
--- response, and temporary/retry for the runner's retry queue.
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
  return rep
end

-- The sink ---------------------------------------------------------------------------------

local Sink = {}
Sink.__index = Sink

--- sink(report, journal, bounces_path): journal and bounces_path may be nil.
function M.sink(report, jrn, bounces_path)
  return setmetatable({ report = report, journal = jrn, bounces_path = bounces_path }, Sink)
end

--- The row's outcome, final (or deferred: --resume retries it).
function Sink:add(rep)
  self.report:add(rep)
  if self.journal then self.journal:outcome(rep, rep.status == "deferred") end
end

--- Waiting in the retry queue: not sent, so a crash now must not count it in flight.
function Sink:waiting(rep)
  if self.journal then self.journal:outcome(rep, true) end
end

--- The message is about to be handed to the sender.
function Sink:in_flight(line, email)
  if self.journal then self.journal:in_flight(line, email) end
end

--- A hard bounce (5.1.x: no such user or domain): the next campaign skips this address.
function Sink:bounce(email, res, rep)
  if not self.bounces_path or res.ok or rep.temporary or not tostring(res.enhanced or ""):match("^5%.1%.") then return end
  local ok, err = suppress.append(self.bounces_path, email, ("%s %s %s"):format(res.code or "", res.enhanced, res.message or ""))
  if not ok then io.stderr:write("mailshot: bounces_to: ", tostring(err), "\n") end
end

return M
