-- test_suppress.lua - mailshot.suppress: text and CSV lists, matching rules (case, IDN, domains),
-- comments, malformed lines, append with hostile reasons, role addresses, memory per entry.
-- Run: make mailshot && ./mailshot exec tests/lua/test_suppress.lua
--      (or MAILSHOT_LUA_PATH=lua ./mailshot exec tests/lua/test_suppress.lua to test the tree)
-- Fixture files are written at test time into a fresh folder made from os.tmpname().

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, checkerr = check.case, check.eq, check.checkerr
local fails = check.fails   -- fails(part, v, err): v is nil and err contains part
local no_new_globals = check.globals_snapshot()

local suppress = require "mailshot.suppress"

-- One temporary folder for every fixture, removed at the end.
local DIR = os.tmpname()
os.remove(DIR)
assert(os.execute("mkdir -m 700 '" .. DIR .. "'"), "mkdir " .. DIR)

local function write(name, content)
  local f = assert(io.open(DIR .. "/" .. name, "wb"))
  assert(f:write(content))
  assert(f:close())
  return DIR .. "/" .. name
end

local function read(name)
  local f = assert(io.open(DIR .. "/" .. name, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local U = utf8.char

---------------------------------------------------------------- text files

write("bounced.txt", table.concat({
  "# hard bounces, kept by hand",          -- 1
  "",                                       -- 2
  "Ann@Example.NET",                        -- 3
  "bob@example.net   # 2026-11-02 550 5.1.1 user unknown",   -- 4
  "@spamtrap.example",                      -- 5
  "blocked.example",                        -- 6
  "   ",                                    -- 7
  "a#b@hash.example",                       -- 8: "#" inside an address is not a comment
  "not an address",                         -- 9: malformed
  "x@bad_domain.example",                   -- 10: malformed (underscore)
  "carol@example.net\r",                    -- 11: CRLF line
  "\t# indented comment",                   -- 12
  "@B" .. U(0xFC) .. "cher.example",        -- 13: IDN domain, U-label, capital
  "dave@xn--mnchen-3ya.de",                 -- 14: IDN address, A-label
  "ann@example.net",                        -- 15: duplicate of line 3
}, "\n") .. "\n")

case("a text file loads addresses and both domain forms; comments and blank lines are skipped", function()
  local list = assert(suppress.load({ "bounced.txt" }, { base_dir = DIR }))
  eq(list.count, 8, "entries")
  eq(list:check("ann@example.net"), "suppressed: bounced.txt line 3")
  eq(list:check("bob@example.net"), "suppressed: bounced.txt line 4")
  eq(list:check("anyone@spamtrap.example"), "suppressed domain spamtrap.example (bounced.txt line 5)")
  eq(list:check("x@blocked.example"), "suppressed domain blocked.example (bounced.txt line 6)")
  eq(list:check("carol@example.net"), "suppressed: bounced.txt line 11")
  eq(list:check("erin@example.net"), nil, "an address not listed")
end)

case("a # inside an address is part of it; a # after a space starts a comment", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR }))
  eq(list:check("a#b@hash.example"), "suppressed: bounced.txt line 8")
  eq(list:check("a@hash.example"), nil)
end)

case("a malformed line is a warning with file:line, and the rest of the file still loads", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR }))
  eq(list.malformed, 2, "malformed count")
  eq(#list.warnings, 2, "warnings")
  assert(list.warnings[1]:find("^bounced.txt:9: malformed entry \"not an address\""), list.warnings[1])
  assert(list.warnings[2]:find("^bounced.txt:10: malformed entry \"x@bad_domain.example\""), list.warnings[2])
  assert(list:check("dave@xn--mnchen-3ya.de"), "line 14, after the bad lines, is loaded")
end)

case("the first occurrence of an entry is the one the reason names", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR }))
  eq(list:check("ANN@example.net"), "suppressed: bounced.txt line 3")
end)

case("local parts match case-insensitively by default", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR }))
  eq(list:check("ANN@EXAMPLE.NET"), "suppressed: bounced.txt line 3")
  eq(list:check("Bob@Example.Net"), "suppressed: bounced.txt line 4")
end)

case("case_sensitive_local = true: the local part must match exactly, the domain still does not care", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR, case_sensitive_local = true }))
  eq(list:check("Ann@example.net"), "suppressed: bounced.txt line 3")
  eq(list:check("Ann@EXAMPLE.net"), "suppressed: bounced.txt line 3")
  eq(list:check("ann@example.net"), "suppressed: bounced.txt line 15", "the lower-case duplicate is its own entry")
  eq(list:check("BOB@example.net"), nil)
end)

case("a domain entry matches that domain only, not its subdomains or parents", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR }))
  eq(list:check("x@BLOCKED.example."), "suppressed domain blocked.example (bounced.txt line 6)", "case and final dot")
  eq(list:check("x@mail.blocked.example"), nil)
  eq(list:check("x@example"), nil)
end)

case("IDN: U-label and A-label forms match each other; the reason shows the domain in Unicode", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR }))
  local want = "suppressed domain b" .. U(0xFC) .. "cher.example (bounced.txt line 13)"
  eq(list:check("x@xn--bcher-kva.example"), want, "A-label address, U-label entry")
  eq(list:check("x@B" .. U(0xDC) .. "CHER.example"), want, "upper-case U-label address")
  eq(list:check("Dave@M" .. U(0xFC) .. "nchen.de"), "suppressed: bounced.txt line 14", "U-label address, A-label entry")
  eq(list:check("dave@XN--MNCHEN-3YA.DE"), "suppressed: bounced.txt line 14")
end)

case("check: an unparseable address is simply not suppressed", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR }))
  eq(list:check("no-at-sign"), nil)
  eq(list:check(""), nil)
  eq(list:check("x@" .. "\255"), nil)
  eq(list:check("  ann@example.net  "), "suppressed: bounced.txt line 3", "surrounding spaces are trimmed")
end)

case("a UTF-8 byte order mark at the start of a text file is ignored", function()
  write("bom.txt", "\239\187\191first@example.org\n")
  local list = assert(suppress.load("bom.txt", { base_dir = DIR }))
  eq(list:check("first@example.org"), "suppressed: bom.txt line 1")
end)

---------------------------------------------------------------- CSV files

write("unsubscribed.csv", table.concat({
  "date,email,source",                          -- 1
  "2026-10-01,Frank@Example.COM,link",          -- 2
  "2026-10-02,,link",                           -- 3: empty cell: no entry, no warning
  '2026-10-03,"grace@example.com",reply',       -- 4
  '2026-10-04,bad"quote@x.example,link',        -- 5: bad CSV row
  "2026-10-05,heidi@example.com,link,extra",    -- 6: bad CSV row (4 fields)
  "2026-10-06,@whole.example,manual",           -- 7
  "2026-10-07,not valid,manual",                -- 8: malformed entry
  "2026-10-08,ivan@example.com,link",           -- 9
}, "\r\n") .. "\r\n")

case("a CSV file gives its email column; empty cells are no entries", function()
  local list = assert(suppress.load({ "unsubscribed.csv" }, { base_dir = DIR }))
  eq(list:check("frank@example.com"), "suppressed: unsubscribed.csv line 2")
  eq(list:check("grace@example.com"), "suppressed: unsubscribed.csv line 4")
  eq(list:check("x@whole.example"), "suppressed domain whole.example (unsubscribed.csv line 7)")
  eq(list:check("ivan@example.com"), "suppressed: unsubscribed.csv line 9", "rows after bad ones load")
  eq(list.count, 4, "entries")
end)

case("bad CSV rows and malformed cells are warnings with file:line", function()
  local list = assert(suppress.load("unsubscribed.csv", { base_dir = DIR }))
  eq(#list.warnings, 3, "warnings: " .. table.concat(list.warnings, " | "))
  assert(list.warnings[1]:find("^unsubscribed.csv:5: bad CSV row skipped: stray quote"), list.warnings[1])
  assert(list.warnings[2]:find("^unsubscribed.csv:6: bad CSV row skipped: row has 4 fields"), list.warnings[2])
  assert(list.warnings[3]:find("^unsubscribed.csv:8: malformed entry \"not valid\""), list.warnings[3])
end)

case("column option: a CSV column of domains works, and a delimiter can be given", function()
  write("domains.CSV", "domain;note\nExample.ORG;all of it\n@" .. U(0x43F, 0x440, 0x438, 0x43C, 0x435, 0x440) .. ".example;idn\n")
  local list = assert(suppress.load("domains.CSV", { base_dir = DIR, column = "domain", delimiter = ";" }))
  eq(list:check("anyone@example.org"), "suppressed domain example.org (domains.CSV line 2)")
  eq(list:check("x@xn--e1afmkfd.example"),
     "suppressed domain " .. U(0x43F, 0x440, 0x438, 0x43C, 0x435, 0x440) .. ".example (domains.CSV line 3)")
end)

case("a CSV file without the column is an error naming the file and its columns", function()
  fails('unsubscribed.csv: no column "mail" (columns: date, email, source)',
        suppress.load("unsubscribed.csv", { base_dir = DIR, column = "mail" }))
end)

case("text and CSV files load together; each reason names its own file", function()
  local list = assert(suppress.load({ "unsubscribed.csv", "bounced.txt" }, { base_dir = DIR }))
  eq(list:check("frank@example.com"), "suppressed: unsubscribed.csv line 2")
  eq(list:check("bob@example.net"), "suppressed: bounced.txt line 4")
  eq(#list.warnings, 5)
  eq(tostring(list), "suppression list (12 entries from unsubscribed.csv, bounced.txt)")
end)

---------------------------------------------------------------- files and options

case("a missing file is an error naming it (the other files are not enough)", function()
  fails(DIR .. "/nope.txt: No such file or directory", suppress.load({ "bounced.txt", "nope.txt" }, { base_dir = DIR }))
  fails(DIR .. "/nope.csv: No such file or directory", suppress.load({ "nope.csv" }, { base_dir = DIR }))
end)

case("absolute paths ignore base_dir; relative ones without base_dir are relative to the current folder", function()
  local list = assert(suppress.load(DIR .. "/bounced.txt", { base_dir = "/nonexistent" }))
  eq(list:check("bob@example.net"), "suppressed: " .. DIR .. "/bounced.txt line 4")
  fails("No such file", suppress.load("surely-not-here-" .. os.time() .. ".txt"))
end)

case("an empty list of files is an empty list", function()
  local list = assert(suppress.load({}))
  eq(list.count, 0)
  eq(list:check("a@b.example"), nil)
end)

case("wrong arguments and options raise", function()
  checkerr("expected a path or a list of paths", suppress.load, 42)
  checkerr("unknown option colum", suppress.load, {}, { colum = "email" })
  checkerr("option case_sensitive_local must be a boolean", suppress.load, {}, { case_sensitive_local = "yes" })
  checkerr("file 1 is not a string", suppress.load, { true })
  local list = suppress.new()
  checkerr("list:check: expected a string", list.check, list, nil)
  checkerr("is_role: expected a string", suppress.is_role, {})
end)

case("list:add adds an entry during a run; its reason names the source", function()
  local list = assert(suppress.load("bounced.txt", { base_dir = DIR }))
  assert(list:add("Zed@Example.net", "this run's bounces"))
  assert(list:add("@later.example", "this run's bounces"))
  eq(list:check("zed@example.net"), "suppressed: this run's bounces")
  eq(list:check("q@later.example"), "suppressed domain later.example (this run's bounces)")
  fails("malformed entry", list:add("two words@example.net"))
  eq(#list.files, 2, "one source added once")
end)

---------------------------------------------------------------- append

case("append creates the file and writes 'address  # date reason' that load reads back", function()
  assert(suppress.append("new-bounces.txt", "Kim@Example.org", "550 5.1.1 user unknown", { base_dir = DIR }))
  assert(suppress.append(DIR .. "/new-bounces.txt", "lee@example.org"))
  local date = os.date("%Y-%m-%d")
  eq(read("new-bounces.txt"), "Kim@Example.org  # " .. date .. " 550 5.1.1 user unknown\n"
                              .. "lee@example.org  # " .. date .. "\n")
  local list = assert(suppress.load("new-bounces.txt", { base_dir = DIR }))
  eq(list:check("kim@example.org"), "suppressed: new-bounces.txt line 1")
  eq(list:check("lee@example.org"), "suppressed: new-bounces.txt line 2")
  eq(#list.warnings, 0)
end)

case("append: a hostile reason (CR, LF, NUL, U+2028, a fake entry) stays on one comment line", function()
  local hostile = "550 nope\r\nvictim@example.com\nother@example.com\0\r" .. U(0x2028) .. "x" .. U(0x85) .. "y\t\tz"
  assert(suppress.append("hostile.txt", "mallory@example.org", hostile, { base_dir = DIR }))
  local text = read("hostile.txt")
  local _, lines = text:gsub("\n", "")
  eq(lines, 1, "lines written")
  eq(text, "mallory@example.org  # " .. os.date("%Y-%m-%d")
           .. " 550 nope victim@example.com other@example.com x y z\n")
  local list = assert(suppress.load("hostile.txt", { base_dir = DIR }))
  eq(list.count, 1)
  eq(list:check("victim@example.com"), nil, "the injected address is not an entry")
end)

case("append: a very long reason is cut on a UTF-8 boundary", function()
  assert(suppress.append("long.txt", "long@example.org", string.rep(U(0x20AC), 200), { base_dir = DIR }))
  local text = read("long.txt")
  assert(#text < 400, "line length " .. #text)
  assert(utf8.len(text), "valid UTF-8")
  assert(text:find("%.%.%.\n$"), "ends with ...")
end)

case("append to a file whose last line has no newline starts a new line", function()
  write("no-newline.txt", "first@example.org")
  assert(suppress.append("no-newline.txt", "second@example.org", "x", { base_dir = DIR }))
  local list = assert(suppress.load("no-newline.txt", { base_dir = DIR }))
  eq(list:check("first@example.org"), "suppressed: no-newline.txt line 1")
  eq(list:check("second@example.org"), "suppressed: no-newline.txt line 2")
end)

case("append refuses an address load could not read back, and writes nothing", function()
  fails("cannot store", suppress.append("refused.txt", "a@b.example\nc@d.example", "x", { base_dir = DIR }))
  fails("cannot store", suppress.append("refused.txt", "two words@b.example", "x", { base_dir = DIR }))
  fails("a line starting with # is a comment", suppress.append("refused.txt", "#tag@b.example", "x", { base_dir = DIR }))
  fails("cannot store", suppress.append("refused.txt", "x@bad_domain.example", "x", { base_dir = DIR }))
  eq(io.open(DIR .. "/refused.txt"), nil, "no file created")
  fails("No such file or directory", suppress.append(DIR .. "/no/such/dir/f.txt", "a@b.example", "x"))
  checkerr("reason must be a string", suppress.append, "x.txt", "a@b.example", 550)
end)

---------------------------------------------------------------- role addresses

case("role addresses: RFC 2142 names, system and no-reply accounts, any case, with a +tag", function()
  for _, a in ipairs { "postmaster@x.example", "ABUSE@x.example", "hostmaster@x.example",
                       "webmaster@x.example", "noreply@x.example", "no-reply@x.example",
                       "Mailer-Daemon@x.example", "root@x.example", "admin@x.example",
                       "abuse+reports@x.example", "do-not-reply@x.example", "security@x.example" } do
    assert(suppress.is_role(a), a .. " should be a role address")
  end
  for _, a in ipairs { "info@x.example", "sales@x.example", "support@x.example", "ann@x.example",
                       "postmaster", "@x.example", "administrators@x.example", "root.beer@x.example" } do
    assert(not suppress.is_role(a), a .. " should not be a role address")
  end
end)

case("suppress.roles can be changed", function()
  suppress.roles.info = true
  assert(suppress.is_role("info@x.example"))
  suppress.roles.info = nil
  assert(not suppress.is_role("info@x.example"))
end)

---------------------------------------------------------------- memory

case("memory: 100,000 entries (bytes per entry printed; bounded at 250)", function()
  local lines, octets = {}, 0
  for i = 1, 100000 do
    lines[i] = string.format("user%06d.name@domain%d.example", i, i % 500)
    octets = octets + #lines[i]
  end
  write("big.txt", table.concat(lines, "\n") .. "\n")
  lines = nil
  collectgarbage("collect")
  local before = collectgarbage("count")
  local t0 = os.clock()
  local list = assert(suppress.load("big.txt", { base_dir = DIR }))
  local dt = os.clock() - t0
  collectgarbage("collect")
  local per = (collectgarbage("count") - before) * 1024 / list.count
  eq(list.count, 100000)
  local nc = check.scaled(100000, 5000)          -- every entry natively; a sample under valgrind
  local t1 = os.clock()
  for i = 1, nc do
    assert(list:check(string.format("User%06d.Name@Domain%d.example", i, i % 500)))
  end
  local dc = os.clock() - t1
  print(string.format("     suppress: 100000 entries (avg %d-octet address): %.0f bytes each, "
                      .. "load %.2fs, %d checks %.2fs", octets // 100000, per, dt, nc, dc))
  assert(per < 250, "bytes per entry " .. per)
end)

case("the module writes no globals", no_new_globals)

os.execute("rm -rf '" .. DIR .. "'")

return check.finish("test_suppress.lua")
