-- test_mailbox.lua - mailshot.mailbox (the readers of `mailshot bounces`) and the folder functions of
-- mailshot.util: Maildir order, flags and folders; mbox separators, >From unquoting, lines longer than a
-- read chunk, messages over max_bytes; single files; bounces.parse_date.
-- Run: make mailshot && ./mailshot exec tests/lua/test_mailbox.lua
-- Fixture files are written at test time into a fresh folder made from os.tmpname().

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, fails = check.case, check.eq, check.fails
local no_new_globals = check.globals_snapshot()

local mailbox = require "mailshot.mailbox"
local util = require "mailshot.util"

local DIR = os.tmpname()
os.remove(DIR)
assert(os.execute("mkdir -m 700 '" .. DIR .. "'"), "mkdir " .. DIR)

local function write(path, content)
  local f = assert(io.open(path, "wb"))
  assert(f:write(content))
  assert(f:close())
  return path
end

local function all(box)
  local out = {}
  for m in box:messages() do out[#out + 1] = m end
  return out
end

case("util.mkdir, util.stat, util.list_dir", function()
  local d = DIR .. "/folder"
  eq(util.mkdir(d), true)
  local ok, err, exists = util.mkdir(d)
  eq(ok, nil); eq(exists, "exists"); check.contains(err, d)
  eq(util.stat(d), "dir")
  write(d .. "/a", "12345")
  local kind, size = util.stat(d .. "/a")
  eq(kind, "file"); eq(size, 5)
  fails("No such file", util.stat(d .. "/none"))
  local names = util.list_dir(d)
  eq(#names, 1); eq(names[1], "a")
  fails("No such file", util.list_dir(d .. "/none"))
  check.checkerr("NUL", util.stat, "a\0b")
end)

case("seen flags as the Maildir spec writes them", function()
  eq(mailbox._seen_name("123.M1.host"), "123.M1.host:2,S")
  eq(mailbox._seen_name("123.M1.host:2,"), "123.M1.host:2,S")
  eq(mailbox._seen_name("123.M1.host:2,FR"), "123.M1.host:2,FRS")
  eq(mailbox._seen_name("123.M1.host:2,T"), "123.M1.host:2,ST")
  eq(mailbox._seen_name("123.M1.host:2,RS"), "123.M1.host:2,RS")
end)

case("Maildir++ folders: inside a root Maildir, beside a .folder, a path as is", function()
  eq(mailbox._folder_path("/m/Maildir", "Processed"), "/m/Maildir/.Processed")
  eq(mailbox._folder_path("/m/Maildir/", ".Processed"), "/m/Maildir/.Processed")
  eq(mailbox._folder_path("/m/Maildir/.Bounces", "Quarantine"), "/m/Maildir/.Quarantine")
  eq(mailbox._folder_path("/m/Maildir", "/srv/q"), "/srv/q")
end)

case("Maildir: new/ then cur/, dot files skipped, seen, move, quarantine", function()
  local md = DIR .. "/Maildir"
  for _, d in ipairs { md, md .. "/new", md .. "/cur", md .. "/tmp" } do assert(util.mkdir(d)) end
  write(md .. "/new/2.b.host", "Subject: b\n\nb\n")
  write(md .. "/new/1.a.host", "Subject: a\n\na\n")
  write(md .. "/new/.hidden", "x")
  write(md .. "/cur/0.c.host:2,F", "Subject: c\n\nc\n")
  write(md .. "/tmp/9.t.host", "being delivered")
  local box = assert(mailbox.open(md))
  local ms = all(box)
  eq(#ms, 3)
  eq(ms[1].id, "1.a.host"); eq(ms[2].id, "2.b.host"); eq(ms[3].id, "0.c.host")
  eq(ms[1].raw, "Subject: a\n\na\n"); eq(ms[1].size, 14); eq(ms[1].truncated, false)
  assert(box:mark(ms[1], "seen"))
  eq(util.stat(md .. "/cur/1.a.host:2,S"), "file")
  assert(box:mark(ms[2], "move", "Done"))
  eq(util.stat(md .. "/.Done/cur/2.b.host:2,S"), "file")
  eq(util.stat(md .. "/.Done/maildirfolder"), "file")
  assert(box:mark(ms[3], "quarantine"))
  eq(util.stat(md .. "/.Quarantine/cur/0.c.host:2,F"), "file")
  eq(#util.list_dir(md .. "/new"), 1)          -- the dot file only
  box:close()
end)

case("Maildir: a message over max_bytes comes cut, with its real size", function()
  local md = DIR .. "/Big"
  for _, d in ipairs { md, md .. "/new", md .. "/cur", md .. "/tmp" } do assert(util.mkdir(d)) end
  write(md .. "/new/1.big", string.rep("x", 1000))
  local ms = all(assert(mailbox.open(md, { max_bytes = 100 })))
  eq(#ms[1].raw, 100); eq(ms[1].size, 1000); eq(ms[1].truncated, true)
end)

case("a folder that is not a Maildir, a missing source, a bad URL scheme", function()
  fails("not a Maildir", mailbox.open(DIR .. "/folder"))
  fails("No such file", mailbox.open(DIR .. "/none"))
  fails("unsupported URL scheme", mailbox.open("http://example.com/"))
end)

case("mbox: separators after a blank line, >From unquoted, a From line inside a paragraph kept", function()
  local p = write(DIR .. "/box.mbox", table.concat {
    "From a@x Thu Dec  3 10:00:00 2026\n",
    "Subject: one\n\n>From the start\n>>From quoted twice\nFrom inside a paragraph\n\n",
    "From b@x Thu Dec  3 10:01:00 2026\n",
    "Subject: two\n\nlast line without a newline",
  })
  local box = assert(mailbox.open(p))
  local ms = all(box)
  box:close()
  eq(#ms, 2)
  eq(ms[1].raw, "Subject: one\n\nFrom the start\n>From quoted twice\nFrom inside a paragraph\n")
  eq(ms[1].where, p .. ":1")
  eq(ms[2].raw, "Subject: two\n\nlast line without a newline")
  eq(ms[2].where, p .. ":8")
  local ok, note = box:mark(ms[1], "seen")
  eq(ok, true); eq(note, "read-only")
end)

case("mbox: a line longer than a read chunk, a message over max_bytes", function()
  local long = string.rep("y", 200000)
  local p = write(DIR .. "/long.mbox", "From a@x Thu Dec  3 10:00:00 2026\nSubject: long\n\n" .. long
                  .. "\nFrom x\n\nFrom b@x Thu Dec  3 10:01:00 2026\nSubject: after\n\nbody\n")
  local ms = all(assert(mailbox.open(p, { max_bytes = 1000 })))
  eq(#ms, 2)
  eq(#ms[1].raw, 1000); eq(ms[1].truncated, true)
  eq(ms[1].size, #("Subject: long\n\n" .. long .. "\nFrom x\n"))     -- the blank line is the separator's
  eq(ms[2].raw, "Subject: after\n\nbody\n")
  eq(ms[2].where, p .. ":7")                          -- counted in lines, not in chunks
  local ms2 = all(assert(mailbox.open(p)))
  eq(ms2[1].raw, "Subject: long\n\n" .. long .. "\nFrom x\n")   -- "From x" follows no blank line
end)

case("mbox: a message over max_bytes is quarantined whole, unquoted, from the file", function()
  local body = "Subject: big\n\n" .. string.rep("z", 150000) .. "\n>From quoted\nend\n"
  local p = write(DIR .. "/big.mbox", "From a@x Thu Dec  3 10:00:00 2026\n" .. body:gsub("\nFrom", "\n>From")
                  .. "\nFrom b@x Thu Dec  3 10:01:00 2026\nSubject: small\n\nx\n")
  local box = assert(mailbox.open(p, { max_bytes = 1000, quarantine = DIR .. "/bigq" }))
  local ms = all(box)
  eq(#ms, 2); eq(ms[1].truncated, true)
  local ok, where = box:mark(ms[1], "quarantine")
  eq(ok, true)
  local f = assert(io.open(where, "rb")); local copy = f:read("a"); f:close()
  eq(copy, (body:gsub("\n>From", "\nFrom")))
  box:close()
end)

case("a single file; quarantine copies it once into a Maildir", function()
  local p = write(DIR .. "/one.eml", "Subject: one\n\nbody\n")
  local q = DIR .. "/q"
  local box = assert(mailbox.open(p, { quarantine = q }))
  local ms = all(box)
  eq(#ms, 1); eq(ms[1].where, p); eq(ms[1].raw, "Subject: one\n\nbody\n")
  local ok, where = box:mark(ms[1], "quarantine")
  eq(ok, true)
  check.contains(where, q .. "/new/mailshot-")
  assert(box:mark(ms[1], "quarantine"))
  eq(#util.list_dir(q .. "/new"), 1)
  eq(util.stat(p), "file")                            -- never removed
  local f = assert(io.open(where, "rb")); eq(f:read("a"), "Subject: one\n\nbody\n"); f:close()
end)

case("bounces.parse_date", function()
  local pd = require("mailshot.bounces").parse_date
  eq(pd("Thu, 3 Dec 2026 13:20:00 +0000"), 1796256000 + 13 * 3600 + 20 * 60)
  eq(pd("Thu,  3 Dec 2026 14:20:00 +0100 (CET)"), 1796256000 + 13 * 3600 + 20 * 60)
  eq(pd("3 Dec 26 13:20 GMT"), 1796256000 + 13 * 3600 + 20 * 60)
  eq(pd("garbage"), nil)
  eq(pd(nil), nil)
end)

case("bounces: a campaign's recipients indexed by line and address, memory per row", function()
  local n = check.scaled(100000, 2000)
  local csvp = DIR .. "/list.csv"
  local f = assert(io.open(csvp, "wb"))
  f:write("email,name\n")
  for i = 1, n do f:write(string.format("User%06d.Name@Domain%d.example,x\n", i, i % 500)) end
  f:close()
  local c = require("mailshot.campaign").new({ recipients = csvp, from = "a@b.example", text = "x" })
  collectgarbage("collect")
  local before = collectgarbage("count")
  local idx = assert(require("mailshot.bounces")._index_of(c))
  collectgarbage("collect")
  local per = (collectgarbage("count") - before) * 1024 / n
  eq(idx.by_line[2], "user000001.name@domain1.example")
  eq(idx.by_addr["user000002.name@domain2.example"], 3)
  print(string.format("     bounces: a %d-row list indexed in %.0f bytes a row", n, per))
  assert(per < 300, "bytes per row " .. per)
end)

case("the modules write no globals", no_new_globals)

os.execute("rm -rf '" .. DIR .. "'")

return check.finish("test_mailbox.lua")
