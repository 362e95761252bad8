-- Tests for mailshot.mime.  Messages are parsed back by Python's email
-- package (tests/lua/mime_check.py) and checked on what a reader sees.
--   cd /work/main && lua5.4 tests/lua/test_mime.lua
--   ./mailshot exec tests/lua/test_mime.lua
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path

local HERE = (debug and debug.getinfo(1, "S").source:match("^@(.*/)")) or "tests/lua/"
local check = dofile(HERE .. "check.lua")
local case, eq, contains, checkerr = check.case, check.eq, check.contains, check.checkerr
local no_new_globals = check.globals_snapshot()

local mime = require "mailshot.mime"

local PYTHON = "/usr/bin/python3"
local CHECKER = HERE .. "mime_check.py"

-- fails(parts, m): mime.build(m) returns nil and a message containing parts.
local function fails(parts, m) return check.fails(parts, mime.build(m)) end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Lua-side checks every message passes: CRLF only, lines <= 998 octets.
local function check_raw(data)
  local stripped = data:gsub("\r\n", "")
  assert(not stripped:find("[\r\n]"), "bare CR or LF in message")
  assert(data:sub(-2) == "\r\n", "message does not end with CRLF")
  for line in data:gmatch("([^\r]*)\r\n") do
    assert(#line <= 998, "line of " .. #line .. " octets")
  end
  -- headers we write fold within 78; extra (X-) headers may hold a long
  -- word that can't be encoded (up to 998)
  local head, current = data:match("^(.-\r\n)\r\n"), nil
  for line in head:gmatch("([^\r]*)\r\n") do
    current = line:match("^([^ \t:]+):") or current
    assert(#line <= 78 or current:find("^X%-"), "header line over 78: " .. line)
  end
end

-- parse(data) -> table of the checker's facts (see mime_check.py); asserts
-- the message parsed, has no defects and passes check_raw.
local function parse(data, allow_defects)
  check_raw(data)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  local p = assert(io.popen(PYTHON .. " " .. shell_quote(CHECKER) .. " " .. shell_quote(path)))
  local r = {}
  for line in p:lines() do
    local k, hex = line:match("^(%S+) (%x*)$")
    assert(k, "bad checker line: " .. line)
    r[k] = hex:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
  end
  p:close()
  os.remove(path)
  assert(r["raw.size"], "the checker printed nothing (is " .. PYTHON .. " there?)")
  assert(not r.error, r.error)
  eq(r["raw.bare_lf"], "0", "bare LF")
  eq(r["raw.bare_cr"], "0", "bare CR")
  assert(tonumber(r["raw.max_line"]) <= 998, "line over 998")
  if not allow_defects then
    eq(r.defects, "0", "defects (" .. tostring(r["defect.1"]) .. ")")
  end
  return r
end

local function lf(s) return (s:gsub("\r\n", "\n")) end

local function unbase64(s)
  local A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  local bits = s:gsub("=", ""):gsub(".", function(c)
    local v = A:find(c, 1, true) - 1
    local t = {}
    for i = 5, 0, -1 do t[#t + 1] = (v >> i) & 1 end
    return table.concat(t)
  end)
  bits = bits:sub(1, #bits - #bits % 8)            -- padding bits
  return (bits:gsub("%d%d%d%d%d%d%d%d", function(b) return string.char(tonumber(b, 2)) end))
end

-- rfc2047(s): decode UTF-8 encoded-words the RFC way: unfold, and drop the
-- blanks between adjacent encoded-words (RFC 2047 6.2).
local function rfc2047(s)
  s = s:gsub("\r\n([ \t])", "%1"):gsub("(%?=)[ \t]+(=%?)", "%1%2")
  return (s:gsub("=%?UTF%-8%?([BQ])%?([^?]*)%?=", function(enc, text)
    if enc == "B" then return unbase64(text) end
    return (text:gsub("_", " "):gsub("=(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
  end))
end

-- raw_header(data, name) -> the header's raw value, continuation lines included.
local function raw_header(data, name)
  return data:match("\r\n" .. name .. ": (.-)\r\n%S") or data:match("^" .. name .. ": (.-)\r\n%S")
end

local function squash(s) return (s:gsub("%s+", " ")) end


-- base(extra) -> a valid message table with extra's fields over it;
-- NONE in extra removes a field.
local NONE = {}
local function base(extra)
  local m = { from = "Sender <sender@example.com>", to = "rcpt@example.org",
              subject = "Hello", text = "Hi there\n" }
  for k, v in pairs(extra or {}) do
    if v == NONE then m[k] = nil else m[k] = v end
  end
  return m
end

local function build_ok(m)
  local data, info = mime.build(m)
  if not data then error("build failed: " .. tostring(info), 2) end
  return data, info
end

---------------------------------------------------------------- bodies

case("text only: one text/plain part, UTF-8, 7bit for short ASCII", function()
  local data = build_ok(base())
  local r = parse(data)
  eq(r.parts, "1")
  eq(r["part.1.type"], "text/plain")
  eq(r["part.1.charset"], "utf-8")
  eq(r["part.1.cte"], "7bit")
  eq(lf(r["part.1.text"]), "Hi there\n")
  eq(r["h.mime-version"], "1.0")
end)

case("headers come in order: Date, From, To, Subject, Message-ID, MIME-Version, Content-*", function()
  local r = parse(build_ok(base()))
  eq(r.hnames, "Date,From,To,Subject,Message-ID,MIME-Version,Content-Type,Content-Transfer-Encoding")
end)

case("html only: one text/html part", function()
  local r = parse(build_ok(base({ text = NONE, html = "<p>Hi</p>\n" })))
  eq(r.parts, "1")
  eq(r["part.1.type"], "text/html")
  eq(lf(r["part.1.text"]), "<p>Hi</p>\n")
end)

case("text and html: multipart/alternative, text first", function()
  local r = parse(build_ok(base({ html = "<p>Hi</p>" })))
  eq(r.parts, "3")
  eq(r["part.1.type"], "multipart/alternative")
  eq(r["part.2.type"], "text/plain")
  eq(r["part.3.type"], "text/html")
  eq(lf(r["part.2.text"]), "Hi there\n")
  eq(r["part.3.text"], "<p>Hi</p>")
end)

case("any line ending in bodies becomes CRLF", function()
  local data = build_ok(base({ text = "a\nb\rc\r\nd\n\n\re", html = "x\ry\n" }))
  local r = parse(data)
  eq(r["part.2.text"], "a\r\nb\r\nc\r\nd\r\n\r\n\r\ne")
  eq(r["part.3.text"], "x\r\ny\r\n")
end)

case("non-ASCII text goes quoted-printable and round-trips", function()
  local text = "Grüße, Zoë! 日本語 🎉\nline two = x \n"
  local r = parse(build_ok(base({ text = text })))
  eq(r["part.1.cte"], "quoted-printable")
  eq(lf(r["part.1.text"]), text)
end)

case("eightbit = true sends non-ASCII text as 8bit and says so in info", function()
  local text = "Grüße, Zoë!\n"
  local data, info = build_ok(base({ text = text, eightbit = true }))
  local r = parse(data)
  eq(r["part.1.cte"], "8bit")
  eq(lf(r["part.1.text"]), text)
  eq(info.eightbit, true)
  local _, info2 = build_ok(base({ eightbit = true }))
  eq(info2.eightbit, false, "ASCII stays 7bit")
end)

case("lines over 998 octets go quoted-printable, even with eightbit", function()
  local long = string.rep("abcdefghij", 150)            -- 1500 octets
  for _, eight in ipairs({ false, true }) do
    local text = "short\n" .. long .. "\n" .. long .. "é\n"
    local data = build_ok(base({ text = text, eightbit = eight }))
    local r = parse(data)
    eq(r["part.1.cte"], "quoted-printable")
    eq(lf(r["part.1.text"]), text)
    for line in data:gmatch("([^\r]*)\r\n") do assert(#line <= 76, "QP line over 76") end
  end
end)

case("a NUL in a body forces quoted-printable", function()
  local r = parse(build_ok(base({ text = "a\0b\n" })))
  eq(r["part.1.cte"], "quoted-printable")
  eq(r["raw.nul"], "0")
  eq(lf(r["part.1.text"]), "a\0b\n")
end)

case("trailing spaces and = survive quoted-printable", function()
  local text = "é end with space \ntab\t\n= sign =3D\n"
  local r = parse(build_ok(base({ text = text })))
  eq(lf(r["part.1.text"]), text)
end)

case("a body line equal to the boundary cannot end the part", function()
  -- Same seed twice: the second build draws the same first boundary, finds
  -- it in the (7bit) text and must draw another.
  math.randomseed(4242)
  local first = build_ok(base({ html = "<p>x</p>" }))
  local b1 = first:match('boundary="([^"]+)"')
  assert(b1, "no boundary")
  local text = "before\n--" .. b1 .. "\nContent-Type: text/html\n\nevil\n--" .. b1 .. "--\nafter\n"
  math.randomseed(4242)
  local data = build_ok(base({ text = text, html = "<p>x</p>" }))
  math.randomseed()
  local b2 = data:match('boundary="([^"]+)"')
  assert(b2 ~= b1, "the clashing boundary was used")
  local r = parse(data)
  eq(r.parts, "3")
  eq(r["part.2.cte"], "7bit")
  eq(lf(r["part.2.text"]), text)
  eq(r["part.3.text"], "<p>x</p>")
end)

case("boundary-like lines in every part, with attachments", function()
  local evil = "--=_ms_000000000000000000000000\n--=_ms_000000000000000000000000--\n"
  local r = parse(build_ok(base({ text = evil, html = evil,
    attachments = { { data = evil, filename = "e.txt" } } })))
  eq(r.parts, "5")
  eq(lf(r["part.3.text"]), evil)
  eq(lf(r["part.4.text"]), evil)
  eq(r["part.5.payload"], evil)
end)

-- body_of(data) -> the raw body of a one-part message, and its CTE.
local function body_of(data)
  return data:match("\r\n\r\n(.*)$"), data:match("\r\nContent%-Transfer%-Encoding: ([%w-]+)\r\n")
end

case("lines of exactly 998 octets stay 7bit, 999 go quoted-printable, wherever they are", function()
  local l998, l999 = string.rep("a", 998), string.rep("b", 999)
  local short = string.rep("s\n", 20)                   -- short lines first: the other scan
  local prose = string.rep(string.rep("w", 69) .. "\n", 30)
  for _, eol in ipairs({ "\n", "\r\n", "\r" }) do
    for _, c in ipairs({
      { l998, "7bit" }, { l999, "quoted-printable" },
      { l998 .. eol, "7bit" }, { l999 .. eol, "quoted-printable" },
      { "x" .. eol .. l998 .. eol .. "y", "7bit" }, { "x" .. eol .. l999 .. eol .. "y", "quoted-printable" },
      { prose .. l998, "7bit" }, { prose .. l999, "quoted-printable" },
      { prose .. l998 .. eol .. prose, "7bit" }, { prose .. l999 .. eol .. prose, "quoted-printable" },
      { short .. l998 .. eol .. "z", "7bit" }, { short .. l999 .. eol .. "z", "quoted-printable" },
      { short .. l998, "7bit" }, { short .. l999, "quoted-printable" },
      { string.rep(l998 .. eol, 5), "7bit" }, { string.rep(l998 .. eol, 5) .. l999, "quoted-printable" },
    }) do
      local text = c[1]:gsub("\n", eol)
      local data = build_ok(base({ text = text }))
      check_raw(data)
      local body, cte = body_of(data)
      eq(cte, c[2], "CTE for a text of " .. #text .. " octets")
      if cte == "7bit" then
        eq(body, (text:gsub("\r\n?", "\n"):gsub("\n", "\r\n"):gsub("([^\n])$", "%1\r\n")))
      end
    end
  end
  -- the message ends with CRLF: read back, a text without a final line break has one
  local r = parse(build_ok(base({ text = short .. l999 .. "\nz" })))
  eq(lf(r["part.1.text"]), short .. l999 .. "\nz\n")
end)

case("bare CR, CRLF and LF line endings all become CRLF in a 7bit body", function()
  for _, c in ipairs({
    { "a\rb\r", "a\r\nb\r\n" }, { "a\r\rb", "a\r\n\r\nb\r\n" }, { "\r", "\r\n" }, { "\n", "\r\n" },
    { "\r\n", "\r\n" }, { "\n\r", "\r\n\r\n" }, { "\r\r\n", "\r\n\r\n" }, { "a\r\nb\nc\rd", "a\r\nb\r\nc\r\nd\r\n" },
    { "\n\n\n", "\r\n\r\n\r\n" }, { string.rep("x\r", 40), string.rep("x\r\n", 40) },
    { string.rep("x\n", 40) .. "end", string.rep("x\r\n", 40) .. "end\r\n" },
  }) do
    local body, cte = body_of(build_ok(base({ text = c[1] })))
    eq(cte, "7bit")
    eq(body, c[2], string.format("body for %q", c[1]))
  end
end)

case("a text without a final line break gets one CRLF at the end of the message, no more", function()
  local data = build_ok(base({ text = "one\ntwo" }))
  eq(body_of(data), "one\r\ntwo\r\n")
  eq(lf(parse(data)["part.1.text"]), "one\ntwo\n")
  eq(body_of(build_ok(base({ text = "one\ntwo\n" }))), "one\r\ntwo\r\n")
end)

case("an empty text is an empty body after the blank line", function()
  local data = build_ok(base({ text = "" }))
  eq(data:sub(-4), "\r\n\r\n")
  eq(body_of(data), "")
  local r = parse(build_ok(base({ text = "", html = "" })))
  eq(r["part.2.payload"], "")
  eq(r["part.3.payload"], "")
end)

case("8bit bodies follow the same line rules as 7bit ones", function()
  local body, cte = body_of(build_ok(base({ text = "é\rü\n" .. string.rep("x", 996) .. "é", eightbit = true })))
  eq(cte, "8bit")
  eq(body, "é\r\nü\r\n" .. string.rep("x", 996) .. "é\r\n")
  body, cte = body_of(build_ok(base({ text = string.rep("x", 998) .. "é", eightbit = true })))
  eq(cte, "quoted-printable", "999 octets")
end)

case("what build remembers between messages never leaks into the next one", function()
  -- sender, subject, date and attachment encodings are kept from message to message
  local function from_of(data) return parse(data)["addr.from.1.address"] end
  eq(from_of(build_ok(base({ from = "A <a@example.com>" }))), "a@example.com")
  eq(from_of(build_ok(base({ from = "B <b@example.com>" }))), "b@example.com")
  eq(from_of(build_ok(base({ from = "A <a@example.com>" }))), "a@example.com")
  fails("invalid address", base({ from = "A <a@-example.com>" }))
  fails("invalid address", base({ from = "A <a@-example.com>" }))
  local t = { name = "T", address = "t@example.com" }
  eq(from_of(build_ok(base({ from = t }))), "t@example.com")
  t.address = "u@example.com"                      -- tables are read again
  eq(from_of(build_ok(base({ from = t }))), "u@example.com")
  for _, s in ipairs({ "one", "two", "one", "Grüße", "one" }) do
    eq(parse(build_ok(base({ subject = s })))["h.subject"], s)
  end
  for _, d in ipairs({ 0, 86400, 0 }) do
    eq(parse(build_ok(base({ date = d })))["h.date"], mime.date(d))
  end
  for _, blob in ipairs({ "abc", "abd", ("abc"):rep(1), "", "abd" .. "" }) do
    local r = parse(build_ok(base({ attachments = { { data = blob, filename = "b.bin" } } })))
    eq(r["part.3.payload"], blob)
  end
  for _, c in ipairs({ { "text/x-a", "text/x-a" }, { "text/x-b", "text/x-b" }, { nil, "text/plain" },
                       { "text/x-a", "text/x-a" } }) do
    local r = parse(build_ok(base({ attachments = { { data = "d", filename = "dir/a.txt", content_type = c[1] } } })))
    eq(r["part.3.type"], c[2])
    eq(r["part.3.filename"], "a.txt")
  end
  checkerr("content_type must be type/subtype", mime.build,
           base({ attachments = { { data = "d", filename = "dir/a.txt", content_type = "text" } } }))
  -- a domain found invalid stays invalid, one found valid stays valid
  for _ = 1, 2 do
    assert(not mime.valid_address("x@b-.example.com"))
    assert(mime.valid_address("x@b.example.com"))
  end
end)

case("Message-ID and boundaries have their documented shapes", function()
  for _ = 1, 50 do
    local data, info = build_ok(base({ html = "<p>x</p>" }))
    assert(info.message_id:find("^<%d+%.%x%x%x%x%x%x%x%x%.%x+@example%.com>$"), info.message_id)
    assert(not info.message_id:find("%u"), "lower case hex")
    assert(data:match('boundary="(=_ms_[0-9a-f]+)"'):len() == 5 + 24, "24 hex digits")
  end
end)

---------------------------------------------------------------- attachments

local function all_bytes(n)
  local t = {}
  for i = 1, n do t[i] = string.char((i * 7 + i // 256) % 256) end
  return table.concat(t)
end

case("attachments: multipart/mixed around the body, base64, bytes round-trip", function()
  local blob = all_bytes(10000)
  local data = build_ok(base({ html = "<p>Hi</p>",
    attachments = { { data = blob, filename = "blob.bin" }, { data = "", filename = "empty.txt" } } }))
  local r = parse(data)
  eq(r["part.1.type"], "multipart/mixed")
  eq(r["part.2.type"], "multipart/alternative")
  eq(r["part.3.type"], "text/plain")
  eq(r["part.4.type"], "text/html")
  eq(r["part.5.type"], "application/octet-stream")
  eq(r["part.5.cte"], "base64")
  eq(r["part.5.disposition"], "attachment")
  eq(r["part.5.filename"], "blob.bin")
  eq(r["part.5.payload"], blob)
  eq(r["part.6.filename"], "empty.txt")
  eq(r["part.6.payload"], "")
end)

case("attachments from a path, relative to the message's base_dir, type from the extension", function()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. shell_quote(dir)))
  local blob = all_bytes(3001)
  for _, name in ipairs({ "a.pdf", "b.PNG", "c.jpg", "d.jpeg", "e.gif", "f.txt", "g.csv",
                          "h.html", "i.zip", "j.ics", "k.xyz", "noext" }) do
    local f = assert(io.open(dir .. "/" .. name, "wb")); f:write(blob); f:close()
  end
  assert(mime.base_dir == nil, "no module global: the folder is the message's")
  local ok, data, info = pcall(mime.build, base({ base_dir = dir, attachments = {
    { path = "a.pdf" }, { path = "b.PNG" }, { path = "c.jpg" }, { path = "d.jpeg" },
    { path = "e.gif" }, { path = "f.txt" }, { path = "g.csv" }, { path = "h.html" },
    { path = "i.zip" }, { path = "j.ics" }, { path = "k.xyz" }, { path = "noext" },
    { path = dir .. "/a.pdf", filename = "renamed.pdf", content_type = "application/x-custom" },
  } }))
  assert(ok, data); assert(data, info)
  local r = parse(data)
  local want = { "application/pdf", "image/png", "image/jpeg", "image/jpeg", "image/gif",
                 "text/plain", "text/csv", "text/html", "application/zip", "text/calendar",
                 "application/octet-stream", "application/octet-stream", "application/x-custom" }
  for i, ct in ipairs(want) do
    local p = "part." .. (i + 2) .. "."
    eq(r[p .. "type"], ct, "type of attachment " .. i)
    eq(r[p .. "payload"], blob, "bytes of attachment " .. i)
  end
  eq(r["part.3.filename"], "a.pdf")
  eq(r["part.15.filename"], "renamed.pdf")
  os.execute("rm -rf " .. shell_quote(dir))
end)

case("a missing attachment file is nil, \"attachment <path>: <reason>\"", function()
  fails({ "attachment /nonexistent/mailshot/x.pdf: ", "No such file" },
        base({ attachments = { { path = "/nonexistent/mailshot/x.pdf" } } }))
end)

case("attachment filenames: non-ASCII, long, quotes, directories stripped", function()
  local long = string.rep("Überweisung_", 12) .. ".pdf"
  local r = parse(build_ok(base({ attachments = {
    { data = "1", filename = "Rechnung März.pdf" },
    { data = "2", filename = long },
    { data = "3", filename = 'C:\\Users\\ann\\Report.doc' },
    { data = "4", filename = "../../etc/passwd" },
    { data = "5", filename = "evil\r\nContent-Type: text-html.txt" },
    { data = "6", filename = 'say "hi".txt' },
  } })))
  eq(r["part.3.filename"], "Rechnung März.pdf")
  eq(r["part.3.type"], "application/pdf")
  eq(r["part.4.filename"], long)
  eq(r["part.5.filename"], "Report.doc", "backslash is a directory separator")
  eq(r["part.6.filename"], "passwd")
  eq(r["part.7.filename"], "evil Content-Type: text-html.txt")
  eq(r["part.7.type"], "text/plain")
  eq(r["part.7.payload"], "5")
  eq(r["part.8.filename"], 'say "hi".txt')
end)

case("bad attachment entries are programmer errors", function()
  checkerr("needs a path or data", mime.build, base({ attachments = { {} } }))
  checkerr("needs a filename", mime.build, base({ attachments = { { data = "x" } } }))
  checkerr("content_type must be type/subtype", mime.build,
           base({ attachments = { { data = "x", filename = "a", content_type = "text/plain\r\nX: y" } } }))
  checkerr("must be a table", mime.build, base({ attachments = { "a.pdf" } }))
end)

---------------------------------------------------------------- headers

case("a non-ASCII subject round-trips as RFC 2047 words of at most 75 chars", function()
  local subjects = {
    "Grüße aus Köln",
    string.rep("日本語のメール件名です", 8),
    string.rep("🎉 party ", 20) .. "!",
    string.rep("ü", 200),
    "mixed ASCII and one é at the end of a rather long subject line that must fold",
    string.rep("x", 300),                               -- one long word
    "=?UTF-8?B?Zm9v?= looks encoded",
  }
  for _, s in ipairs(subjects) do
    local data = build_ok(base({ subject = s }))
    local r = parse(data)
    eq(r["h.subject"], s)
    eq(rfc2047(raw_header(data, "Subject")), s)
    for w in data:gmatch("=%?UTF%-8%?[BQ]%?[^?]*%?=") do
      assert(#w <= 75, "encoded-word of " .. #w .. " chars")
    end
  end
end)

case("encoded-words never split a UTF-8 sequence", function()
  for n = 1, 40 do
    local s = string.rep("a", n) .. string.rep("€🎉", 30)
    local enc = mime.encode_header(s)
    local words = 0
    for w in enc:gmatch("=%?UTF%-8%?B%?([^?]*)%?=") do
      words = words + 1
      assert(utf8.len(unbase64(w)), "B word is not valid UTF-8 on its own")
    end
    assert(words > 1, "expected several B words")
    local data = build_ok(base({ subject = s }))
    for w in data:gmatch("=%?UTF%-8%?Q%?([^?]*)%?=") do
      local raw = w:gsub("_", " "):gsub("=(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
      assert(utf8.len(raw), "Q word is not valid UTF-8 on its own")
    end
    for w in data:gmatch("=%?UTF%-8%?B%?([^?]*)%?=") do
      assert(#w % 4 == 0, "B word length")
    end
    if n % 10 == 0 then eq(parse(data)["h.subject"], s) end
  end
end)

case("invalid UTF-8 in header values becomes U+FFFD (no parser defects)", function()
  local r = parse(build_ok(base({ subject = "a\255b\195", from = { name = "Z\128\128", address = "z@example.com" },
                                  headers = { ["X-A"] = "\254" } })))
  eq(r["h.subject"], "a\u{FFFD}b\u{FFFD}")
  eq(r["addr.from.1.name"], "Z\u{FFFD}\u{FFFD}")
  eq(r["h.x-a"], "\u{FFFD}")
end)

case("non-ASCII and special display names round-trip", function()
  local names = { "Zoë Müller", "Doe, John", string.rep("Zoë Müller-Lüdenscheidt ", 6), 'Say "hi" \\ there', "O'Brien", "a.b.c",
                  "日本 太郎", string.rep("Long Name ", 12), "(comment) <x> [y]: z;" }
  for _, n in ipairs(names) do
    local data = build_ok(base({ from = { name = n, address = "from@example.com" },
                                 to = { n .. " <rcpt@example.org>" } }))
    local r = parse(data)
    local want = n:gsub("^%s+", ""):gsub("%s+$", "")
    if n:find("[\128-\255]") then
      -- RFC 2047 reading: exact.  Python's phrase parser keeps the blank
      -- between two encoded-words (RFC 2047 6.2 says drop it), so a name
      -- spread over several words comes back with doubled spaces there.
      eq(rfc2047(raw_header(data, "From")), want .. " <from@example.com>", "RFC 2047 from")
      eq(squash(r["addr.from.1.name"]), squash(want), "from name")
      if #n < 40 then eq(r["addr.from.1.name"], want, "short name, one encoded-word") end
      eq(squash(r["addr.to.1.name"]), squash(want), "to name")
    else
      eq(r["addr.from.1.name"], want, "from name")
      eq(r["addr.to.1.name"], want, "to name")
    end
    eq(r["addr.from.1.address"], "from@example.com")
    eq(r["addr.to.1.address"], "rcpt@example.org")
  end
end)

case("quoted display names in strings are unquoted", function()
  local r = parse(build_ok(base({ to = '"Doe, John" <john@example.org>' })))
  eq(r["addr.to.1.name"], "Doe, John")
end)

case("to, cc and reply_to take lists; no Bcc header is written", function()
  local data, info = build_ok(base({
    to = { "a@example.org", { name = "B", address = "b@example.org" }, "C <c@example.org>" },
    cc = "D <d@example.org>", reply_to = "replies@example.com",
    bcc = { "hidden@example.net", "A@EXAMPLE.ORG" } }))
  local r = parse(data)
  eq(r["addr.to.1.address"], "a@example.org")
  eq(r["addr.to.2.name"], "B")
  eq(r["addr.to.3.address"], "c@example.org")
  eq(r["addr.cc.1.address"], "d@example.org")
  eq(r["addr.reply-to.1.address"], "replies@example.com")
  eq(r["hcount.bcc"], nil)
  assert(not data:find("hidden"), "bcc address leaked into the message")
  eq(table.concat(info.recipients, " "),
     "a@example.org b@example.org c@example.org d@example.org hidden@example.net")
end)

case("CR/LF in a subject cannot add a header (Bcc injection)", function()
  for _, evil in ipairs({ "Hi\r\nBcc: victim@x", "Hi\nBcc: victim@x", "Hi\rBcc: victim@x",
                          "Hi\r\n\r\nBcc: victim@x", "Hi\0Bcc: victim@x", "Hi\r\n Bcc: victim@x" }) do
    for _, s in ipairs({ evil, "Grüße " .. evil }) do
      local data = build_ok(base({ subject = s }))
      local r = parse(data)
      eq(r["hcount.bcc"], nil, "Bcc header")
      eq(r["hcount.subject"], "1")
      local want = s:gsub("[ \t]*[\r\n%z]+[ \t]*", " ")
      eq(r["h.subject"], want)
      assert(not data:find("\nBcc", 1, true))
    end
  end
end)

case("CR/LF in display names cannot add a header", function()
  local evil = "Eve\r\nBcc: victim@x\r\n\r\n<html>"
  local data = build_ok(base({ from = { name = evil, address = "eve@example.com" },
                               to = { { name = "Zoë" .. evil, address = "z@example.org" } },
                               cc = evil:gsub("<html>", "") .. " <cc@example.org>" }))
  local r = parse(data)
  eq(r["hcount.bcc"], nil)
  eq(r["addr.from.1.name"], "Eve Bcc: victim@x <html>")
  eq(r["addr.to.1.name"], "ZoëEve Bcc: victim@x <html>")
  eq(r["addr.cc.1.address"], "cc@example.org")
  eq(r["addr.to.1.address"], "z@example.org")
  eq(r.parts, "1")
end)

case("CR/LF in an address makes it invalid", function()
  fails("invalid address", base({ to = "victim@x\r\nBcc: other@y" }))
  fails("invalid address", base({ to = "Eve <eve@example.org>\r\nBcc: other@y" }))
  fails("invalid address", base({ to = { address = "eve@example.org\r\nBcc: x@y" } }))
  fails("invalid address", base({ from = "a@b\0c" }))
  fails("invalid address", base({ cc = { "ok@example.org", "bad\n@x" } }))
end)

case("CR/LF in extra header values cannot add a header", function()
  local r = parse(build_ok(base({ headers = { ["X-Campaign"] = "spring\r\nBcc: victim@x",
                                              { "X-Tag", "a\nb\rc" } } })))
  eq(r["hcount.bcc"], nil)
  eq(r["h.x-campaign"], "spring Bcc: victim@x")
  eq(r["h.x-tag"], "a b c")
end)

case("extra headers: map and list forms, folded, non-ASCII encoded", function()
  local long = {}
  for i = 1, 30 do long[i] = "<https://example.com/u/" .. i .. ">" end
  local data = build_ok(base({ headers = {
    { "List-Unsubscribe", table.concat(long, ", ") },
    { "X-Note", "Grüße" },
    ["X-Campaign"] = "spring", ["X-Count"] = 3,
  } }))
  local r = parse(data)
  eq(r["h.list-unsubscribe"], table.concat(long, ", "))
  eq(r["h.x-note"], "Grüße")
  eq(r["h.x-campaign"], "spring")
  eq(r["h.x-count"], "3")
end)

case("an extra header value with a word over 998 octets is refused", function()
  fails("header X-Long", base({ headers = { ["X-Long"] = string.rep("a", 1200) } }))
end)

case("bad or reserved extra header names are programmer errors", function()
  for _, n in ipairs({ "X Bad", "X:Y", "X\r\nBcc", "", "Ümlaut" }) do
    checkerr("bad header name", mime.build, base({ headers = { [n] = "v" } }))
  end
  for _, n in ipairs({ "From", "bcc", "Content-Type", "MIME-Version", "Subject", "Message-ID" }) do
    checkerr("is written by mime.build", mime.build, base({ headers = { { n, "v" } } }))
  end
  checkerr("value must be a string", mime.build, base({ headers = { ["X-A"] = {} } }))
end)

case("Date: default now in RFC 5322 form, numbers are times, English names", function()
  local r = parse(build_ok(base()))
  assert(r["h.date"]:find("^%u%l%l, %d%d %u%l%l %d%d%d%d %d%d:%d%d:%d%d %+0000$"), r["h.date"])
  r = parse(build_ok(base({ date = 0 })))
  eq(r["h.date"], "Thu, 01 Jan 1970 00:00:00 +0000")
  eq(mime.date(1700000000), "Tue, 14 Nov 2023 22:13:20 +0000")
  r = parse(build_ok(base({ date = "Mon, 01 Jan 2024 10:00:00 +0100" })))
  eq(r["h.date"], "Mon, 01 Jan 2024 10:00:00 +0100")
end)

case("Message-ID: generated from the From domain and unique in a run", function()
  local seen = {}
  for _ = 1, 2000 do
    local _, info = build_ok(base())
    assert(info.message_id:find("^<[%w.]+@example%.com>$"), info.message_id)
    assert(not seen[info.message_id], "duplicate message id")
    seen[info.message_id] = true
  end
end)

case("Message-ID: given ids are used, bracketed, and validated", function()
  local data, info = build_ok(base({ message_id = "abc.123@example.com" }))
  eq(info.message_id, "<abc.123@example.com>")
  eq(parse(data)["h.message-id"], "<abc.123@example.com>")
  fails("invalid message_id", base({ message_id = "no at sign" }))
  fails("invalid message_id", base({ message_id = "<a@b>\r\nBcc: x@y" }))
end)

case("info: message_id, size, envelope_from, recipients", function()
  local data, info = build_ok(base({ to = { "A <a@example.org>", "b@example.org" },
                                     cc = { "c@example.org", "a@example.org" } }))
  eq(info.size, #data)
  eq(info.envelope_from, "sender@example.com")
  eq(table.concat(info.recipients, ","), "a@example.org,b@example.org,c@example.org")
  assert(data:find("Message-ID: " .. info.message_id, 1, true))
end)

case("fuzz: hostile header and body values never add headers or defects", function()
  local alphabet = { "\r", "\n", "\r\n", "\0", " ", "\t", ":", "Bcc: v@x", "=?", "?=", "\"",
                     "\\", "<", ">", "@", ",", ";", "é", "日", "🎉", "\255", "\128", "--",
                     "=_ms_", "a", "Z", "9", "_", "=", "\r\n\r\n", "\r\n.\r\n", string.rep("w", 90) }
  local function hostile(n)
    local t = {}
    for i = 1, n do t[i] = alphabet[math.random(#alphabet)] end
    return table.concat(t)
  end
  math.randomseed(2024)
  for _ = 1, 30 do
    local subject, name, hv = hostile(math.random(1, 40)), hostile(math.random(1, 20)), hostile(math.random(1, 30))
    local body = hostile(math.random(1, 200))
    local data = build_ok(base({ subject = subject, from = { name = name, address = "f@example.com" },
                                 text = body, html = hostile(50), headers = { ["X-Fuzz"] = hv },
                                 attachments = { { data = body, filename = hostile(10) } } }))
    local r = parse(data)
    eq(r["hcount.bcc"], nil)
    eq(r["hcount.subject"], "1")
    eq(r["hcount.x-fuzz"], "1")
    eq(r.parts, "5")
    local function unfold(v)
      v = v:gsub("[ \t]*[\r\n%z]+[ \t]*", " "):gsub("^[ \t]+", ""):gsub("[ \t]+$", "")
      local out, pos = {}, 1
      while true do                      -- invalid UTF-8 -> U+FFFD
        local ok, bad = utf8.len(v, pos)
        if ok then out[#out + 1] = v:sub(pos) break end
        out[#out + 1] = v:sub(pos, bad - 1) .. "\u{FFFD}"
        pos = bad + 1
      end
      return table.concat(out)
    end
    eq(rfc2047(raw_header(data, "Subject")), unfold(subject), "subject")
    eq(r["part.5.payload"], body, "attachment")
  end
  math.randomseed()
end)

---------------------------------------------------------------- bad input

case("bad addresses give nil, \"invalid address ...\"", function()
  fails("invalid address", base({ to = "not an address" }))
  fails("invalid address", base({ to = "" }))
  fails("invalid address", base({ from = "a@@b" }))
  fails("no to address", base({ to = {} }))
  fails("no from address", base({ from = NONE }))
  fails("no to address", base({ to = NONE }))
end)

case("wrong types and a missing body are programmer errors", function()
  checkerr("needs text or html", mime.build, base({ text = NONE }))
  checkerr("subject must be a string", mime.build, base({ subject = 12 }))
  checkerr("expected a table", mime.build, "x")
  checkerr("expected an address string or table", mime.build, base({ to = 5 }))
end)

case("an empty text body still builds", function()
  local r = parse(build_ok(base({ text = "" })))
  eq(r["part.1.payload"], "")
end)

---------------------------------------------------------------- helpers

case("mime.base64 matches RFC 4648 vectors and wraps at 76", function()
  local v = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==",
              fooba = "Zm9vYmE=", foobar = "Zm9vYmFy" }
  for k, want in pairs(v) do eq(mime.base64(k), want, "base64(" .. k .. ")") end
  for _, n in ipairs({ 56, 57, 58, 113, 114, 1000 }) do
    local e = mime.base64(string.rep("\255", n))
    for line in (e .. "\r\n"):gmatch("(.-)\r\n") do assert(#line <= 76) end
    eq(#e:gsub("\r\n", ""), 4 * ((n + 2) // 3), "length for " .. n)
  end
end)

case("mime.base64 round-trips every length up to 300 and every byte value", function()
  for n = 0, 300 do
    local t = {}
    for i = 1, n do t[i] = string.char((i * 37 + n) % 256) end
    local s = table.concat(t)
    local e = mime.base64(s)
    eq(unbase64((e:gsub("\r\n", ""))), s, "length " .. n)
    local lines = 0
    for line in (e .. "\r\n"):gmatch("(.-)\r\n") do
      lines = lines + 1
      assert(#line <= 76 and (#line == 76 or line == e:match("([^\n]*)$")), "only the last line is short")
    end
    eq(lines, math.max(1, (4 * ((n + 2) // 3) + 75) // 76), "lines for " .. n)
  end
end)

case("mime.qp: blanks at the end of a line, CR line endings, escapes near a soft break", function()
  eq(mime.qp("a \rb\t\r\n c "), "a=20\r\nb=09\r\n c=20")
  eq(mime.qp(""), "")
  eq(mime.qp("\n"), "\r\n")
  local long = string.rep("x", 80) .. " "
  local e = mime.qp(long)
  eq(e, string.rep("x", 75) .. "=\r\n" .. string.rep("x", 5) .. "=20")
  for n = 72, 78 do
    local s = string.rep("a", n) .. "===é \t"
    local enc = mime.qp(s .. "\n" .. s)
    for line in (enc .. "\r\n"):gmatch("(.-)\r\n") do assert(#line <= 76) end
    local decoded = enc:gsub("=\r\n", ""):gsub("=(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    eq(decoded, s .. "\r\n" .. s)
  end
end)

case("addresses: the usual forms and the unusual ones give the same kind of answer", function()
  local ok = {
    ["Who<who@x.y>"] = { "Who", "who@x.y" }, ["W\t<w@x.y>"] = { "W", "w@x.y" },
    ["Dr. Who <who@tardis.co.uk>"] = { "Dr. Who", "who@tardis.co.uk" },
    ["A.B+c@EXAMPLE.ORG"] = { nil, "A.B+c@EXAMPLE.ORG" },
    ["R <" .. string.rep("a", 64) .. "@b.c>"] = { "R", string.rep("a", 64) .. "@b.c" },
    ["x@" .. string.rep("d", 63) .. ".com"] = { nil, "x@" .. string.rep("d", 63) .. ".com" },
    ["o'neil@example.ie"] = { nil, "o'neil@example.ie" }, ["a@b"] = { nil, "a@b" },
    ["Ann <a-.b@c.d>"] = { "Ann", "a-.b@c.d" }, ["Ann \"Q\" <q@x.y>"] = { 'Ann "Q"', "q@x.y" },
  }
  for s, want in pairs(ok) do
    local a, err = mime.parse_address(s)
    assert(a, s .. ": " .. tostring(err))
    eq(a.name, want[1], "name of " .. s)
    eq(a.address, want[2], "address of " .. s)
  end
  for _, s in ipairs({ "R <" .. string.rep("a", 65) .. "@b.c>", "x@" .. string.rep("d", 64) .. ".com",
                       "a..b@c", "a.@b", ".a@b", "a@b..c", "a@b-.c", "a@-b.c", "a@b.c.", "A <a@b.-c>" }) do
    local a, err = mime.parse_address(s)
    assert(not a, s .. " accepted")
    contains(err, "invalid address")
  end
end)

case("mime.qp encodes =, trailing space, 8-bit bytes and soft-breaks at 76", function()
  eq(mime.qp("a=b"), "a=3Db")
  eq(mime.qp("end \nx\t"), "end=20\r\nx=09")
  eq(mime.qp("é"), "=C3=A9")
  eq(mime.qp("a\r\nb\rc\n"), "a\r\nb\r\nc\r\n")
  for n = 70, 80 do
    local s = string.rep("a", n) .. "é" .. string.rep("=", 10)
    local e = mime.qp(s)
    for line in (e .. "\r\n"):gmatch("(.-)\r\n") do
      assert(#line <= 76, "QP line over 76")
      assert(not line:find("=.?$") or line:sub(-1) == "=" or line:find("=%x%x$"), "split escape: " .. line)
    end
    local decoded = e:gsub("=\r\n", ""):gsub("=(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    eq(decoded, s)
  end
end)

case("mime.encode_header leaves plain ASCII alone and unfolds CR/LF", function()
  eq(mime.encode_header("Hello world"), "Hello world")
  eq(mime.encode_header("Hello\r\n world\n"), "Hello world")
  local e = mime.encode_header("Grüße")
  assert(e:find("^=%?UTF%-8%?[BQ]%?.*%?=$"), e)
  assert(not mime.encode_header("a\r\nb\0c é"):find("[\r\n%z]"))
end)

case("mime.parse_address accepts the usual forms", function()
  local a = assert(mime.parse_address("Ann Lee <ann@example.com>"))
  eq(a.name, "Ann Lee"); eq(a.address, "ann@example.com")
  a = assert(mime.parse_address("ann@example.com"))
  eq(a.name, nil); eq(a.address, "ann@example.com")
  a = assert(mime.parse_address("<ann@example.com>"))
  eq(a.name, nil); eq(a.address, "ann@example.com")
  a = assert(mime.parse_address('"Lee, \\"Ann\\"" <ann@example.com>'))
  eq(a.name, 'Lee, "Ann"')
  a = assert(mime.parse_address("  Ann  < ann@example.com >  "))
  eq(a.name, "Ann"); eq(a.address, "ann@example.com")
  local none, err = mime.parse_address("Ann <ann at example.com>")
  eq(none, nil); contains(err, "invalid address")
end)

case("mime.valid_address checks local@domain", function()
  for _, good in ipairs({ "a@b", "first.last+tag@sub.example.com", "x_y-z@a-b.c0", "o'neil@example.ie",
                          "!#$%&'*+/=?^_`{|}~-@example.com" }) do
    local ok, why = mime.valid_address(good)
    assert(ok, good .. ": " .. tostring(why))
  end
  local bad = {
    -- the reasons of the one rule set (smtp_addr_ok in C, then what a header can carry)
    [""] = "empty", ["ab"] = "no '@'", ["a@b@c"] = "more than one '@'", ["@b"] = "empty local part",
    ["a@"] = "empty domain", ["a b@c"] = "space", ["a@b\r\n"] = "CR or LF", ["<a@b>"] = "'<' or '>'",
    ["a@b>"] = "'<' or '>'", [".a@b"] = "dot", ["a..b@c"] = "dot", ["a@b..c"] = "empty label",
    ["a@-b.c"] = "domain label", ["a@b-.c"] = "domain label", ["a@b_c.d"] = "domain label",
    ["ü@b"] = "non-ASCII", ["a@b\0"] = "NUL", [string.rep("a", 65) .. "@b"] = "64",
    ['"a"@b'] = "local part", ["a@b.com>\r\nRCPT TO:<evil@x.test>"] = "'<' or '>'",
  }
  for addr, why in pairs(bad) do
    local ok, reason = mime.valid_address(addr)
    assert(not ok, string.format("%q accepted", addr))
    contains(reason, why)
  end
end)

---------------------------------------------------------------- performance & hygiene

case("many builds in a row with an attachment: each message is whole and its own", function()
  -- (the build rate is a benchmark: tests/lua/bench_mime.lua, scripts/bench-lua.lua)
  local blob = all_bytes(100000)
  local n = check.scaled(100, 10)
  local ids, attachment = {}, nil
  for i = 1, n do
    local data, info = build_ok(base({ to = "Recipient " .. i .. " <r" .. i .. "@example.org>",
                                       subject = "Grüße Nummer " .. i, html = "<p>Hallo " .. i .. "</p>",
                                       attachments = { { data = blob, filename = "report.pdf" } } }))
    eq(info.size, #data)
    check.eq_deep(info.recipients, { "r" .. i .. "@example.org" })
    assert(not ids[info.message_id], "message id used twice: " .. info.message_id)
    ids[info.message_id] = true
    contains(data, "<r" .. i .. "@example.org>")
    contains(data, "Hallo " .. i .. "<")
    -- the attachment's encoded form is the same in every message (nothing carried over)
    local att = data:match('filename="report.pdf"\r\nContent%-Transfer%-Encoding: base64\r\n\r\n(.-)\r\n%-%-')
    assert(att and #att > 100000 * 4 / 3, "attachment part not found")
    attachment = attachment or att
    assert(att == attachment, "attachment differs in message " .. i)
    if i == 1 or i == n then
      local r = parse(data)
      eq(r["h.subject"], "Grüße Nummer " .. i)
      eq(r["part.5.payload"], blob)
    end
  end
end)

case("the module writes no globals", no_new_globals)

return check.finish("test_mime.lua")
