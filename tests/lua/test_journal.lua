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
  local p = write("resume.journal", "mailshot-journal 1 ab c\nI\t2\ta@example.com\nF\t3\tb@example.com\tsent\t250\nI\t4\t")
  local previous = open(p, { fingerprint = "ab", name = "c", resume = true })
  eq(previous.fingerprint, "ab")
  eq(previous.records[2].kind, "I")
  eq(previous.records[3].status, "sent")
  eq(previous.records[4], nil, "the torn line")
  eq(previous.torn, true)
end)

case("a file that is not a journal is refused, not overwritten", function()
  local p = write("other.journal", "hello\n")
  local j, err = journal.open(p, { fingerprint = "ab", name = "c", force = true })
  eq(j, nil)
  check.contains(err, "not a mailshot journal")
end)

os.execute("rm -rf '" .. DIR .. "'")
return check.finish("test_journal.lua")
