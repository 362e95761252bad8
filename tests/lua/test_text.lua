-- test_text.lua - mailshot.text, the C string primitives behind the MIME builder, the report and
-- the journal: each is checked against a plain Lua reference implementation of the same rule, on
-- hand-picked edge cases and on random strings made of the bytes that matter (CR, LF, quote,
-- comma, tab, backslash, space, NUL, 8-bit).
-- Run: make mailshot && ./mailshot exec tests/lua/test_text.lua

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq = check.case, check.eq

local text = require "mailshot.text"

-- References: the Lua code these primitives replaced (mime.lua's crlf + lines_fit, the report's
-- csv_field, the journal's esc).
local function ref_crlf(s, max_line)
  local r = s:gsub("([^\r\n]*)\r?\n?", "%1\r\n")
  local b = s:byte(-1)
  if not (b == 10 or b == 13) then r = r:sub(1, -3) end
  if max_line then
    for line in (r .. "\r\n"):gmatch("(.-)\r\n") do
      if #line > max_line then return nil end
    end
  end
  return r
end

local function ref_csv_field(v)
  if v == nil then return "" end
  v = tostring(v)
  if v:find("^[=+%-@\t\r']") then return '"\'' .. v:gsub('"', '""') .. '"' end
  if v:find('[",\r\n]') or v:find("^%s") or v:find("%s$") then return '"' .. v:gsub('"', '""') .. '"' end
  return v
end

local ESC = { ["\t"] = "\\t", ["\n"] = "\\n", ["\r"] = "\\r", ["\\"] = "\\\\" }
local function ref_esc(v) return (tostring(v == nil and "" or v):gsub("[\t\n\r\\]", ESC)) end

local ALPHABET = { "\r", "\n", "\r\n", "a", "b", " ", '"', ",", "\t", "\\", "\0", "\195\169", "xyz",
                   "=", "+", "-", "@", "'" }
local function random_string(max_parts)
  local t = {}
  for i = 1, math.random(0, max_parts) do t[i] = ALPHABET[math.random(#ALPHABET)] end
  return table.concat(t)
end

case("crlf: every kind of line break becomes CRLF", function()
  eq(text.crlf("a\nb"), "a\r\nb")
  eq(text.crlf("a\rb\r"), "a\r\nb\r\n")
  eq(text.crlf("x\r\r\ny"), "x\r\n\r\ny")
  eq(text.crlf("\n\n"), "\r\n\r\n")
  eq(text.crlf("\n\r"), "\r\n\r\n")
  eq(text.crlf(""), "")
  eq(text.crlf("no break"), "no break")
end)

case("crlf: a string already in CRLF form comes back as the same string", function()
  local s = "line one\r\nline two\r\n"
  eq(text.crlf(s), s)
  eq(text.crlf(s, 998), s)
end)

case("crlf: a line over max_line gives nil, the line break not counted", function()
  local ten = string.rep("x", 10)
  eq(text.crlf(ten .. "\nab", 10), ten .. "\r\nab")
  eq(text.crlf(ten .. "x\nab", 10), nil)
  eq(text.crlf("ab\r\n" .. ten .. "x", 10), nil, "last line")
  eq(text.crlf("ab\r\n" .. ten, 10), "ab\r\n" .. ten)
  eq(text.crlf(ten .. "\r\n", 10), ten .. "\r\n")
  eq(text.crlf(ten .. "x\r\n", 10), nil, "a CRLF line")
end)

case("crlf agrees with the Lua reference on 20,000 random strings", function()
  math.randomseed(7)
  for i = 1, 20000 do
    local s = random_string(40)
    local max = (i % 3 == 0) and math.random(0, 12) or nil
    local got, want = text.crlf(s, max), ref_crlf(s, max)
    if got ~= want then
      error(string.format("crlf(%q, %s): expected %q, got %q", s, tostring(max), tostring(want), tostring(got)))
    end
  end
end)

case("kind: 7bit, 8bit, nul, at every position of a word", function()
  eq(text.kind(""), "7bit")
  eq(text.kind("plain ascii text, long enough for several words"), "7bit")
  for len = 1, 20 do
    for pos = 1, len do
      local before, after = string.rep("a", pos - 1), string.rep("b", len - pos)
      eq(text.kind(before .. "\0" .. after), "nul", "NUL at " .. pos .. "/" .. len)
      eq(text.kind(before .. "\200" .. after), "8bit", "0x80 at " .. pos .. "/" .. len)
      eq(text.kind(before .. "\255" .. after), "8bit", "0xFF at " .. pos .. "/" .. len)
      eq(text.kind(before .. "\127" .. after), "7bit", "0x7F at " .. pos .. "/" .. len)
    end
  end
  eq(text.kind("\195\169t\195\169\0"), "nul", "NUL wins over 8-bit")
end)

case("kind agrees with the Lua reference on 20,000 random strings", function()
  math.randomseed(17)
  for _ = 1, 20000 do
    local s = random_string(30)
    local want = s:find("\0", 1, true) and "nul" or s:find("[\128-\255]") and "8bit" or "7bit"
    eq(text.kind(s), want, ("kind(%q)"):format(s))
    -- first_8bit: 7bit exactly when it is; past a byte over 127, "8bit" whatever follows
    local high, nul = s:find("[\128-\255]"), s:find("\0", 1, true)
    eq(text.kind(s, true), (high and not (nul and nul < high)) and "8bit" or want, ("kind(%q, true)"):format(s))
  end
end)

case("csv_row: quoting as RFC 4180, nil empty, numbers as tostring", function()
  local keys = { "a", "b", "c", "d", "e", "f", "g" }
  eq(text.csv_row({ a = 1, b = "x,y", c = 'say "hi"', d = nil, e = " lead", f = "trail\t", g = "a\nb" }, keys),
     '1,"x,y","say ""hi""",," lead","trail\t","a\nb"')
  eq(text.csv_row({}, { "a" }), "")
  eq(text.csv_row({ a = true, b = 2.5 }, { "a", "b" }), "true,2.5")
end)

case("csv_row: formula cells (= + - @ TAB CR) and cells starting with ' get one ' prepended", function()
  local keys = { "a", "b", "c", "d", "e", "f", "g", "h", "i" }
  eq(text.csv_row({ a = "=1+2", b = "+x", c = "-5", d = "@SUM(A1)", e = "\t=x", f = "\r=x", g = "'quoted",
                    h = '=HYPERLINK("http://a.test","x")', i = -3 }, keys),
     [["'=1+2","'+x","'-5","'@SUM(A1)","']] .. "\t=x" .. [[","']] .. "\r=x" .. [[","''quoted",]]
       .. [["'=HYPERLINK(""http://a.test"",""x"")","'-3"]])
  eq(text.csv_row({ a = "a=b", b = "x-", c = " =x", d = "", e = "\0=" }, { "a", "b", "c", "d", "e" }),
     'a=b,x-," =x",,\0=', "only the first character counts")
end)

case("csv_row agrees with the Lua reference on 5,000 random rows", function()
  math.randomseed(11)
  local keys = { "line", "email", "status", "response" }
  for _ = 1, 5000 do
    local r = { line = math.random(1, 1e6), email = random_string(8), status = random_string(3),
                response = math.random() < 0.2 and nil or random_string(20) }
    local want = {}
    for i, k in ipairs(keys) do want[i] = ref_csv_field(r[k]) end
    eq(text.csv_row(r, keys), table.concat(want, ","), "row")
  end
end)

case("tsv_record: escapes, nil fields, the short form", function()
  eq(text.tsv_record("I", 12, "a@b"), "I\t12\ta@b\n")
  eq(text.tsv_record("F", 3, "x\ty", { status = "sent", code = 250, response = "a\\b\r\nc" },
                     { "status", "code", "enhanced", "response" }),
     "F\t3\tx\\ty\tsent\t250\t\ta\\\\b\\r\\nc\n")
  eq(text.tsv_record("D", 4, nil, {}, { "status" }), "D\t4\t\t\n")
end)

case("tsv_record agrees with the Lua reference on 5,000 random records", function()
  math.randomseed(13)
  local keys = { "status", "code", "response" }
  for _ = 1, 5000 do
    local email, r = random_string(6), { status = random_string(3), code = math.random(200, 599), response = random_string(20) }
    local want = { "F", "42", ref_esc(email) }
    for _, k in ipairs(keys) do want[#want + 1] = ref_esc(r[k]) end
    eq(text.tsv_record("F", 42, email, r, keys), table.concat(want, "\t") .. "\n", "record")
  end
end)

-- Values of every kind a report row or a journal record may hold, short and long (past the 1 KB
-- the C code writes on its stack): integers at both ends of their range, floats, booleans, nil.
local function random_value()
  local r = math.random(10)
  if r == 1 then return nil
  elseif r == 2 then return math.random(-1e6, 1e6)
  elseif r == 3 then return ({ math.mininteger, math.maxinteger, 0, -1, 10, 250, 550 })[math.random(7)]
  elseif r == 4 then return ({ 2.5, -0.0, 1e300, 1 / 0, 0.1 })[math.random(5)]
  elseif r == 5 then return math.random() < 0.5
  elseif r == 6 then return random_string(400)
  end
  return random_string(12)
end

case("csv_row and tsv_record agree with the Lua references on 5,000 rows of mixed values", function()
  math.randomseed(23)
  local keys = { "a", "b", "c", "d", "e", "f" }
  for _ = 1, 5000 do
    local r = {}
    for _, k in ipairs(keys) do r[k] = random_value() end
    local want = {}
    for i, k in ipairs(keys) do want[i] = ref_csv_field(r[k]) end
    eq(text.csv_row(r, keys), table.concat(want, ","), "row")
    local line, email = random_value(), random_value()
    want = { "F", ref_esc(line), ref_esc(email) }
    for _, k in ipairs(keys) do want[#want + 1] = ref_esc(r[k]) end
    eq(text.tsv_record("F", line, email, r, keys), table.concat(want, "\t") .. "\n", "record")
    eq(text.tsv_record("I", line, email), ("I\t%s\t%s\n"):format(ref_esc(line), ref_esc(email)), "short record")
  end
end)

case("message_id and boundary write what mime.lua's Lua code wrote (HEX2 table lookups, %x)", function()
  local HEX2 = {}
  for i = 0, 255 do HEX2[i] = ("%02x"):format(i) end
  local function ref_id(prefix, r, counter, domain)
    return prefix .. HEX2[r >> 56] .. HEX2[r >> 48 & 255] .. HEX2[r >> 40 & 255]
           .. HEX2[r >> 32 & 255] .. "." .. ("%x"):format(counter) .. HEX2[r >> 24 & 255]
           .. HEX2[r >> 16 & 255] .. HEX2[r >> 8 & 255] .. HEX2[r & 255] .. "@" .. domain .. ">"
  end
  local function ref_boundary(r, q)
    return "=_ms_" .. HEX2[r >> 56] .. HEX2[r >> 48 & 255] .. HEX2[r >> 40 & 255]
           .. HEX2[r >> 32 & 255] .. HEX2[r >> 24 & 255] .. HEX2[r >> 16 & 255]
           .. HEX2[r >> 8 & 255] .. HEX2[r & 255] .. HEX2[q >> 24 & 255]
           .. HEX2[q >> 16 & 255] .. HEX2[q >> 8 & 255] .. HEX2[q & 255]
  end
  math.randomseed(29)
  local counters = { 1, 9, 15, 16, 255, 256, 4095, 65536, 0x7fffffff, math.maxinteger }
  for i = 1, 20000 do
    local r, q = math.random(0), math.random(0)
    local counter = counters[i % #counters + 1] + (i % 3 == 0 and math.random(0, 1000) or 0)
    if counter < 0 then counter = i end
    eq(text.message_id("<1764770000.", r, counter, "acme.example"), ref_id("<1764770000.", r, counter, "acme.example"))
    eq(text.boundary(r, q), ref_boundary(r, q))
  end
  eq(text.message_id("<1.", 0, 1, "x"), "<1.00000000.100000000@x>")
  eq(text.boundary(-1, -1), "=_ms_ffffffffffffffffffffffff")
end)

case("fast_address takes what mime.lua's address pattern took, and gives its domain", function()
  local PATTERN = "^[a-z0-9A-Z_+%-][a-z0-9.A-Z_+%-]*[a-z0-9A-Z_+%-]@([a-z0-9.A-Z%-]+)$"
  local PARTS = { "a", "Z", "0", "_", "+", "-", ".", "@", "x.y", "user", "example.com", " ", "\0", "\195\169",
                  "<", ">", "\"", "!", "~", "@@", ".." }
  math.randomseed(31)
  for _ = 1, 30000 do
    local t = {}
    for i = 1, math.random(0, 8) do t[i] = PARTS[math.random(#PARTS)] end
    local s = table.concat(t)
    eq(text.fast_address(s), s:match(PATTERN), ("fast_address(%q)"):format(s))
  end
  for _, s in ipairs { "ab@c", "a@b", "a.b@c", ".ab@c", "ab.@c", "ab@", "@ab", "ab@c@d", "a-b+c_d@x-y.z", "ab@c d" } do
    eq(text.fast_address(s), s:match(PATTERN), s)
  end
end)

case("address_ok is the SMTP client's own check (smtp_addr_ok), reasons and all", function()
  for _, good in ipairs { "a@b", "first.last+tag@sub.example.com", "x@xn--bcher-kva.example", '"a b"@x.test' } do
    local ok, why = text.address_ok(good)
    assert(ok == true and why == nil, good .. ": " .. tostring(why))
  end
  for addr, want in pairs { [""] = "empty address", ["ab"] = "no '@'", ["a@b\r\nRCPT TO:<e@x>"] = "CR or LF",
                            ["a@b.com>\r\nRCPT TO:<evil@x.test>"] = "'<' or '>'", ["a@b\0c"] = "NUL" } do
    local ok, why = text.address_ok(addr)
    assert(ok == false and why:find(want, 1, true), ("%q: %s"):format(addr, tostring(why)))
  end
  assert(not pcall(text.address_ok, {}), "address_ok({})")
end)

case("wrong argument types are programmer errors", function()
  assert(not pcall(text.crlf, {}), "crlf({})")
  assert(not pcall(text.csv_row, "x", {}), "csv_row('x')")
  assert(not pcall(text.tsv_record, "F", 1, "e", "not a table", {}), "tsv_record with a string row")
end)

case("text.crlf and DKIM signing make the same CRLF lines (one normaliser, bytebuf_crlf)", function()
  local dkim = require "mailshot.dkim"
  local pem = assert(dkim.keygen { algorithm = "ed25519-sha256" })
  local key = os.tmpname()
  local f = assert(io.open(key, "w"))
  f:write(pem)
  f:close()
  local signer = assert(dkim.signer { domain = "example.com", selector = "s", key_file = key })
  os.remove(key)
  local bytes = { "a", ".", "\r", "\n", "\r\n", "\195\188" }
  math.randomseed(11)
  for round = 1, 300 do
    local body = {}
    for i = 1, math.random(0, 30) do body[i] = bytes[math.random(#bytes)] end
    local msg = "From: a@example.com\r\nSubject: x\r\n\r\n" .. table.concat(body)
    local signed = assert(signer:sign(msg, 1700000000))
    local header = assert(signer:header(msg, 1700000000))
    eq(signed:sub(1, #header), header, "round " .. round)
    eq(signed:sub(#header + 1), text.crlf(msg), "round " .. round)
  end
end)

return check.finish("test_text.lua")
