-- test_csv.lua - the mailshot.csv module: open, header, rows keyed by column, line numbers, bad rows,
-- open errors, misuse, closing, and a 200,000-row file.
-- Run: ./mailshot exec tests/lua/test_csv.lua   (data in tests/data/csv/, other files in os.tmpname())

local csv = require "mailshot.csv"

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local DATA = here .. "../data/csv/"

local check = dofile(here .. "check.lua")
local case, eq_deep, checkerr = check.case, check.eq_deep, check.checkerr

local temps = {}

-- A temp file with these bytes; removed at the end.
local function tmpfile (content)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  assert(f:write(content))
  assert(f:close())
  temps[#temps + 1] = path
  return path
end

-- Reads every result up to the end: { {row=..., line=...} | {bad=message, line=...} }.
local function readall (r)
  local out = {}
  while true do
    local row, line, msg = r:read()
    if row == nil then
      assert(line == nil and msg == nil, "read error: " .. tostring(msg))
      return out
    end
    out[#out + 1] = row and { row = row, line = line } or { bad = msg, line = line }
  end
end

-- csv.open must fail with "path: ...msg...".
local function checkopenerr (path, opts, msg)
  local r, err = csv.open(path, opts)
  assert(r == nil, "open succeeded, want: " .. msg)
  assert(err:sub(1, #path + 2) == path .. ": ", "error does not start with the path: " .. err)
  assert(err:find(msg, 1, true), "error \"" .. err .. "\", want one with: " .. msg)
end

---------------------------------------------------------------- cases

case("the header lists the column names, trimmed", function ()
  local r = assert(csv.open(DATA .. "recipients.csv"))
  eq_deep(r:header(), { "email", "first_name", "last name", "note" }, "header")
  local h = r:header()
  h[1] = "changed"
  eq_deep(r:header()[1], "email", "header() returns a copy")
  eq_deep(r:line(), 1, "line after the header")
  eq_deep(r:path(), DATA .. "recipients.csv", "path")
  r:close()
end)

case("rows are tables keyed by column, with the line they start on", function ()
  local r = assert(csv.open(DATA .. "recipients.csv"))
  local all = readall(r)
  eq_deep(all, {
    { line = 2, row = { email = "ann@example.org", first_name = "Ann", ["last name"] = "Lee", note = "" } },
    { line = 3, row = { email = "bob@example.org", first_name = "Bob", ["last name"] = 'O"Brien',
                        note = 'likes "quotes", commas' } },
    { line = 5, row = { email = "carl@example.org", first_name = "Carl", ["last name"] = "Berg",
                        note = "line one\nline two\nline three" } },
    { line = 9, row = { email = "dora@example.org", first_name = "Dora", ["last name"] = "  Ng  ", note = "last" } },
  }, "rows")
  eq_deep(r:line(), 9, "line at the end")
  eq_deep(r:read(), nil, "read after the end")
  r:close()
end)

case("a UTF-8 BOM is ignored; ';' works as a character and by name", function ()
  for _, d in ipairs { ";", "semicolon" } do
    local r = assert(csv.open(DATA .. "semicolon_bom.csv", { delimiter = d }))
    eq_deep(r:header(), { "email", "amount", "city" }, "header")
    eq_deep(readall(r), {
      { line = 2, row = { email = "eve@example.org", amount = "1,50", city = "Paris; France" } },
      { line = 3, row = { email = "finn@example.org", amount = "2", city = "Oslo" } },
    }, "rows with " .. d)
    r:close()
  end
end)

case("tab and comma delimiters by name and as characters", function ()
  for _, d in ipairs { "\t", "tab" } do
    local r = assert(csv.open(DATA .. "tabs.tsv", { delimiter = d }))
    eq_deep(readall(r), {
      { line = 2, row = { email = "gus@example.org", name = "Gus Grey", city = "" } },
      { line = 3, row = { email = "", name = "hal", city = "Rome" } },
    }, "rows with " .. d)
    r:close()
  end
  for _, d in ipairs { ",", "comma" } do
    local r = assert(csv.open(DATA .. "recipients.csv", { delimiter = d }))
    eq_deep(#r:header(), 4, "columns with " .. d)
    r:close()
  end
end)

case("CRLF lines, lone CRs and a last row without newline keep line numbers right", function ()
  local r = assert(csv.open(tmpfile('a,b\r\n1,"x\r\ny"\r\n\r\n2,z\r3,end')))
  eq_deep(readall(r), {
    { line = 2, row = { a = "1", b = "x\r\ny" } },
    { line = 5, row = { a = "2", b = "z" } },
    { line = 6, row = { a = "3", b = "end" } },
  }, "rows")
  eq_deep(r:line(), 6, "lines in the file")
  r:close()
end)

case("a bad row gives false, line, message, and reading goes on", function ()
  local r = assert(csv.open(DATA .. "malformed.csv"))
  eq_deep(readall(r), {
    { line = 2, row = { email = "ivy@example.org", name = "Ivy" } },
    { line = 3, bad = "stray quote in field 2" },
    { line = 4, row = { email = "kim@example.org", name = "Kim" } },
    { line = 5, bad = "unexpected text after the closing quote of field 1" },
    { line = 6, row = { email = "max@example.org", name = "Max" } },
    { line = 7, bad = "row has 3 fields, header has 2" },
    { line = 8, bad = "row has 1 field, header has 2" },
    { line = 9, bad = "unexpected text after the closing quote of field 2 (on line 10)" },
    { line = 11, row = { email = "quinn@example.org", name = "Quinn" } },
  }, "results")
  r:close()
end)

case("a NUL byte makes the row bad", function ()
  local r = assert(csv.open(tmpfile("a,b\n1,x\0y\n2,ok\n")))
  eq_deep(readall(r), {
    { line = 2, bad = "NUL byte in field 2" },
    { line = 3, row = { a = "2", b = "ok" } },
  }, "results")
  r:close()
end)

case("an unterminated quote is one bad row at the end of the file", function ()
  local r = assert(csv.open(tmpfile('a,b\n1,2\n3,"open\n4,5\n')))
  eq_deep(readall(r), {
    { line = 2, row = { a = "1", b = "2" } },
    { line = 3, bad = "unterminated quoted field 2 (runs to the end of the file)" },
  }, "results")
  r:close()
end)

case("a 1 MiB field comes through whole", function ()
  local big = string.rep("0123456789abcdef", 65536)
  local r = assert(csv.open(tmpfile('id,body\n1,"' .. big .. '"\n2,small\n')))
  local row, line = r:read()
  eq_deep(line, 2, "line")
  assert(row.body == big, "1 MiB field differs")
  eq_deep({ r:read() }, { { id = "2", body = "small" }, 3 }, "next row")
  r:close()
end)

case("open failures return nil, 'path: reason'", function ()
  checkopenerr("/nonexistent/recipients.csv", nil, "No such file or directory")
  checkopenerr(DATA .. "empty.csv", nil, "no header row")
  checkopenerr(tmpfile("\n  \n"), nil, "no header row")
  checkopenerr(DATA .. "duplicate_header.csv", nil, 'duplicate column name "email" (columns 1 and 3)')
  checkopenerr(tmpfile("email,,name\n"), nil, "column 2 has an empty name")
  checkopenerr(tmpfile('em"ail,name\n'), nil, "line 1: bad header row: stray quote in field 1")
end)

case("misuse raises", function ()
  local path = DATA .. "recipients.csv"
  checkerr("invalid delimiter 'pipe'", csv.open, path, { delimiter = "pipe" })
  checkerr("invalid delimiter", csv.open, path, { delimiter = "" })
  checkerr("invalid delimiter", csv.open, path, { delimiter = "\n" })
  checkerr("delimiter must be a string", csv.open, path, { delimiter = 44 })
  checkerr("quote must be one character", csv.open, path, { quote = "''" })
  checkerr("delimiter and quote must differ", csv.open, path, { delimiter = "'", quote = "'" })
  checkerr("unknown option 'delimeter'", csv.open, path, { delimeter = ";" })
  checkerr("table expected", csv.open, path, ";")
  checkerr("string expected", csv.open)
  checkerr("mailshot.csv.reader expected", csv.open(path).read, {})
  local r = assert(csv.open(path, { delimiter = "|", quote = "'" }))  -- any single byte will do
  eq_deep(r:header(), { 'email , first_name ,"last name",note' }, "one column: no '|', and '\"' is plain")
  r:close()
end)

case("a closed reader raises on use; close, __gc and <close> are safe", function ()
  local path = DATA .. "recipients.csv"
  local r = assert(csv.open(path))
  eq_deep(tostring(r), "csv reader (" .. path .. ")", "tostring")
  eq_deep(r:close(), true, "close")
  eq_deep(tostring(r), "csv reader (closed)", "tostring when closed")
  for _, m in ipairs { "read", "header", "line", "path", "close" } do
    checkerr("attempt to use a closed csv reader", r[m], r)
  end
  local kept
  do
    local r2 <close> = assert(csv.open(path))
    kept = r2
    assert(r2:read())
  end
  eq_deep(tostring(kept), "csv reader (closed)", "closed at the end of its block")
  do
    local r3 <close> = assert(csv.open(path))
    r3:close()  -- and then __close on a closed reader: quiet
  end
  for _ = 1, 100 do csv.open(path) end  -- left to __gc
  collectgarbage()
  collectgarbage()
end)

case("200,000 rows are all read, with the right last line, in bounded memory", function ()
  local n = 200000
  local lines = { "email,first_name,last_name,code" }
  for i = 1, n do
    lines[#lines + 1] = string.format('user%d@example.org,First%d,"Last, %d",%d', i, i, i, i * 7)
  end
  local path = tmpfile(table.concat(lines, "\n") .. "\n")
  lines = nil
  collectgarbage()
  collectgarbage()
  local kb0 = collectgarbage("count")
  local r = assert(csv.open(path))
  local count, last, peak = 0, 0, 0
  while true do
    local row, line = r:read()
    if not row then
      assert(row == nil and line == nil, "unexpected bad row at line " .. tostring(line))
      break
    end
    count, last = count + 1, line
    if count % 20000 == 0 then
      peak = math.max(peak, collectgarbage("count") - kb0)
    end
  end
  eq_deep(count, n, "rows")
  eq_deep(last, n + 1, "last line")
  eq_deep(r:line(), n + 1, "lines in the file")
  eq_deep(r:read(), nil, "read after the end")
  r:close()
  collectgarbage()
  collectgarbage()
  local after = collectgarbage("count") - kb0
  assert(after < 256, string.format("Lua heap grew by %.0f KiB after reading and collecting", after))
  -- a read keeps nothing: rows are garbage once read, so the heap while reading stays near one
  -- collection cycle's worth (the rate is a benchmark: scripts/bench-lua.lua)
  assert(peak < 64 * 1024, string.format("Lua heap grew by %.0f KiB while reading", peak))
end)

case("a 200,000-column header opens, and a duplicate in it is named (linear check)", function ()
  local names = {}
  for i = 1, 200000 do names[i] = "c" .. i end
  local header = table.concat(names, ",")
  local r = assert(csv.open(tmpfile(header .. "\n" .. header:gsub("c", "v") .. "\n")))
  local h = r:header()
  eq_deep({ #h, h[1], h[200000] }, { 200000, "c1", "c200000" }, "header")
  local row = r:read()
  eq_deep({ row.c1, row.c123456, row.c200000 }, { "v1", "v123456", "v200000" }, "row keyed by column")
  r:close()
  checkopenerr(tmpfile(header .. ",c1\n"), nil, 'duplicate column name "c1" (columns 1 and 200001)')
  checkopenerr(tmpfile("c150000," .. header .. "\n"), nil, 'duplicate column name "c150000" (columns 1 and 150001)')
end)

---------------------------------------------------------------- the address column (mailshot.rows)

case("email column: exact, then ignoring case and spaces; clashes and misses say why", function ()
  local rows = require "mailshot.rows"
  local function open (content, field, delimiter)
    local c = { recipients_path = tmpfile(content), email_field = field or "email", delimiter = delimiter }
    local r, err = rows.open_reader(c)
    if r then r:close() end
    return c, r, err
  end
  local c, r = open("name,Email\nA,a@example.com\n")
  assert(r, "Email matches email"); eq_deep(c.email_field, "Email", "header spelling")
  c, r = open("name, EMAIL \nA,a@example.com\n")
  assert(r, "' EMAIL ' matches email"); eq_deep(c.email_field, "EMAIL", "header spelling (the reader trims names)")
  c, r = open("Email,email\nA,a@example.com\n")
  assert(r, "exact wins"); eq_deep(c.email_field, "email", "exact")
  local _, r2, err = open("Email,EMAIL\nA,a@example.com\n")
  assert(not r2 and err:find("columns 'Email' and 'EMAIL' all match email_field 'email'", 1, true), err)
  _, r2, err = open("name,e-mail\nA,a@example.com\n")
  assert(not r2 and err:find("no 'email' column (columns: name, e-mail); did you mean email_field = \"e-mail\"?", 1, true), err)
  _, r2, err = open("name;email\nA;a@example.com\n")
  assert(not r2 and err:find('the header has no comma: set delimiter = ";"', 1, true), err)
end)

---------------------------------------------------------------- tally

for _, path in ipairs(temps) do os.remove(path) end
return check.finish("test_csv.lua")
