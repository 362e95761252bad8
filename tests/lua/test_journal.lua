-- test_journal.lua - mailshot.journal: opening an existing journal to start over (--force) or to
-- continue it (--resume), whatever state the last run left the file in.
-- (The journal's crash safety is tested end to end in tests/integration/test_resume.py.)
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq = check.case, check.eq

local journal = require "mailshot.journal"

local DIR = os.tmpname()
os.remove(DIR)
assert(os.execute("mkdir -p '" .. DIR .. "'"))

local function write(name, data)
  local f = assert(io.open(DIR .. "/" .. name, "wb"))
  f:write(data)
  f:close()
  return DIR .. "/" .. name
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function open(path, opts)
  local j, previous = journal.open(path, opts)
  assert(j, previous)
  j:close()
  j.lock:unlock()
  if previous then previous.f = assert(io.open(path, "rb")) end   -- read again after the close
  return previous
end

case("--force starts over whatever the old file holds: empty, a torn header, a whole journal", function()
  local empty = write("empty.journal", "")
  eq(open(empty, { fingerprint = "ab", name = "c", force = true }), nil, "previous of an empty journal")
  local torn = write("torn.journal", "mailshot-jour")
  eq(open(torn, { fingerprint = "ab", name = "c", force = true }), nil, "previous of a torn header")
  local whole = write("whole.journal", "mailshot-journal 1 ab c\nI\t2\ta@example.com\n")
  eq(open(whole, { fingerprint = "ab", name = "c", force = true }), nil, "previous when starting over")
  assert(exists(whole .. ".old"), "the old journal is kept as .old")
end)

case("a run without --resume or --force refuses a journal from an earlier run", function()
  local p = write("again.journal", "mailshot-journal 1 ab c\n")
  local j, err = journal.open(p, { fingerprint = "ab", name = "c" })
  eq(j, nil)
  check.contains(err, "--resume")
end)

case("--resume reads every record, a torn last line ignored", function()
  local p = write("resume.journal", "mailshot-journal 1 ab c\nI\t2\ta@example.com\n"
                  .. "F\t3\tb@example.com\tsent\t250\t2.0.0\t\trelay\t\tok\\tqueued\nI\t4\t")
  local previous = open(p, { fingerprint = "ab", name = "c", resume = true })
  eq(previous.fingerprint, "ab")
  eq(previous:record(2).kind, "I")
  eq(previous:record(2).email, "a@example.com")
  eq(previous:record(3).status, "sent")
  eq(previous:record(3).response, "ok\tqueued")
  eq(previous:record(4), nil, "the torn line")
  eq(previous.torn, true)
end)

case("--resume keeps the last record of each line; torn and foreign lines are ignored", function()
  local F = function(n, status, resp)
    return ("F\t%d\tu%d@example.com\t%s\t250\t\t\t\t\t%s\n"):format(n, n, status, resp or "")
  end
  local p = write("many.journal", "mailshot-journal 1 ab c\n"
                  .. "I\t2\tu2@example.com\nI\t3\tu3@example.com\nI\t4\tu4@example.com\n"
                  .. F(3, "sent", "first") .. F(2, "failed") .. "D\t5\tu5@example.com\tdeferred\t451\t\t\t\t\t\n"
                  .. F(3, "sent", "second")
                  .. "F\t6\tu6@example.com\tsen\n"            -- torn in a write, closed by the next open
                  .. "F\t7\tu7@example.com\tsent\t25\n"       -- likewise: fields missing
                  .. "X\t8\tu8@example.com\n"
                  .. F(4, "in-flight", "possibly sent")           -- a resumed run that did not resend it
                  .. F(99, "sent"))                               -- past the recipients file's lines
  local previous = open(p, { fingerprint = "ab", name = "c", resume = true, max_line = 10 })
  eq(previous:record(1), nil)
  eq(previous:record(2).status, "failed")
  eq(previous:record(3).response, "second")
  eq(previous:record(4).kind, "I", "an in-flight outcome stays in flight")
  eq(previous:record(5).kind, "D")
  for n = 6, 8 do eq(previous:record(n), nil, "line " .. n) end
  eq(previous:record(99), nil, "a line past the file")
  eq(previous:record(3).response, "second", "read again after a seek")
  local c = previous.counts
  eq(table.concat({ c.final, c.sent, c.failed, c.skipped, c.inflight, c.deferred }, " "), "2 1 1 0 1 1")
  previous:close()
end)

case("version 2 records keep first_response; version 1 ones (without it) still resume; a newer version is refused", function()
  local p = write("v2.journal", "mailshot-journal 2 ab c\n"
                  .. "F\t2\ta@example.com\tsent\t250\t\t\tother\t\tok\trelay: 451 later\n"
                  .. "F\t3\tb@example.com\tsent\t250\t\t\trelay\t\tok\n")    -- 10 fields: torn, in version 2
  local previous = open(p, { fingerprint = "ab", name = "c", resume = true })
  eq(previous.version, 2)
  eq(previous:record(2).first_response, "relay: 451 later")
  eq(previous:record(3), nil, "a version 2 record without its last field")
  previous:close()
  p = write("v1.journal", "mailshot-journal 1 ab c\nF\t3\tb@example.com\tsent\t250\t\t\trelay\t\tok\n")
  local j, prev = journal.open(p, { fingerprint = "ab", name = "c", resume = true })
  assert(j, prev)
  eq(prev:record(3).response, "ok")
  eq(prev:record(3).first_response, nil)
  j:outcome({ line = 4, email = "c@example.com", status = "sent", code = 250, response = "ok", first_response = "x" })
  j:close()
  local f = assert(io.open(p, "rb"))
  local text = f:read("a")
  f:close()
  check.contains(text, "F\t4\tc@example.com\tsent\t250\t\t\t\t\tok\n", "written as version 1: no 11th field")
  p = write("v3.journal", "mailshot-journal 3 ab c\n")
  local j3, err = journal.open(p, { fingerprint = "ab", name = "c", resume = true })
  eq(j3, nil)
  check.contains(err, "newer mailshot")
end)

case("util.line_index grows to the highest line set, never past its limit", function()
  local ix = require("mailshot.util").line_index(5000)
  eq(ix:size(), 0)
  eq(ix:get(1), nil)
  eq(ix:set(3, 30), true)
  eq(ix:set(4999, 49990), true)
  eq(ix:set(5001, 1), false, "past the limit")
  eq(ix:set(0, 1), false)
  eq(ix:get(3), 30)
  eq(ix:get(4999), 49990)
  eq(ix:get(4998), nil, "never set")
  eq(ix:get(5001), nil)
  eq(ix:size(), 4999, "grown to the highest line set")
  local many = {}
  for n = 2, 3000 do many[#many + 1] = ("I\t%d\tu%d@example.com\n"):format(n, n) end
  local p = write("big.journal", "mailshot-journal 1 ab c\n" .. table.concat(many) .. "I\t100000\tfar@example.com\n")
  local previous = open(p, { fingerprint = "ab", name = "c", resume = true, max_line = 4000 })
  eq(previous:record(2999).email, "u2999@example.com")
  eq(previous:record(100000), nil, "past max_line")
  eq(previous.counts.inflight, 2999)
  previous:close()
end)

case("--resume without a journal is refused, and leaves nothing behind", function()
  local p = DIR .. "/missing.journal"
  local j, err = journal.open(p, { fingerprint = "ab", name = "c", resume = true })
  eq(j, nil)
  check.contains(err, "no journal " .. p)
  check.contains(err, "without --resume")
  eq(exists(p), false)
  eq(exists(p .. ".lock"), false)
end)

case("a file that is not a journal is refused, not overwritten", function()
  local p = write("other.journal", "hello\n")
  local j, err = journal.open(p, { fingerprint = "ab", name = "c", force = true })
  eq(j, nil)
  check.contains(err, "not a mailshot journal")
end)

os.execute("rm -rf '" .. DIR .. "'")
return check.finish("test_journal.lua")
