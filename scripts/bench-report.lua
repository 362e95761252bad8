-- bench-report.lua - the report rewritten in CSV order at the end of a run (make bench runs it):
--   ./mailshot exec scripts/bench-report.lua [ROWS]        (default 1,000,000)
-- Rows are added as a concurrent run completes them (each block of 64 lines in reverse order),
-- then close() copies them in line order to a new file.  Prints the seconds of the adds and of
-- the rewrite, and the peak RSS (VmHWM) before and after the rewrite: the rewrite keeps 8 bytes a
-- line, not the rows.  Not a test: it asserts only that the result is in order.
local outcome = require "mailshot.outcome"
local result = require "mailshot.result"

local n = math.tointeger(tonumber(arg and arg[1] or "")) or 1000000
local function hwm()
  local f = io.open("/proc/self/status")
  local kb = f and f:read("a"):match("VmHWM:%s*(%d+)")
  if f then f:close() end
  return (tonumber(kb) or 0) / 1024
end
local path = os.tmpname()
local t0 = os.clock()
local report = assert(outcome.open_report(path, result.REPORT_COLUMNS))
local BLOCK = 64
for base = 2, n + 1, BLOCK do
  for line = math.min(base + BLOCK - 1, n + 1), base, -1 do
    report:add { line = line, email = ("user%d@example.org"):format(line), status = "sent", code = 250,
                 enhanced = "2.0.0", via = "relay", response = "250 2.0.0 Ok: queued as " .. line }
  end
end
local t1 = os.clock()
local before = hwm()
assert(report:close())
local t2 = os.clock()
local f = assert(io.open(path))
f:read("l")
local want = 2
for l in f:lines() do
  assert(tonumber(l:match("^(%d+),")) == want, "out of order")
  want = want + 1
end
f:close()
local size = 0
do local g = io.open(path); size = g:seek("end"); g:close() end
os.remove(path)
assert(want == n + 2)
print(("report of %d rows (%.0f MB): adds %.2f s, rewrite in CSV order %.2f s (%.0f rows/s); peak RSS %.1f MB before the rewrite, %.1f MB after")
  :format(n, size / 1e6, t1 - t0, t2 - t1, n / math.max(t2 - t1, 1e-9), before, hwm()))
