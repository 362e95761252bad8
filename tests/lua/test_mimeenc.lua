-- test_mimeenc.lua - the C MIME encoders (text.qp, text.base64, text.encode_words, text.header_text,
-- text.header_words, text.fold; src/mimeenc.c)
-- write byte for byte what the Lua code they replaced wrote (tests/lua/mime_ref.lua), on hand-picked
-- edges and on random UTF-8 text with the bytes that matter (line breaks, blanks, "=", "?", "_",
-- stray continuation bytes).  mime.qp / mime.base64 are the C ones.
-- Run: make mailshot && ./mailshot exec tests/lua/test_mimeenc.lua

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq = check.case, check.eq

local text = require "mailshot.text"
local mime = require "mailshot.mime"
local ref = dofile(here .. "mime_ref.lua")

local function ref_words(s, first) return table.concat(ref.encode_words(s, first), " ") end

local PIECES = { "a", "Z", "0", " ", " ", "\t", "=", "?", "_", "!", "*", "\r", "\n", "\r\n", "é", "Ж",
                 "中", "😀", "ش", "\128", "\255", "\0", "~", "\127" }

-- Mostly plain letters (long plain runs, as in a real body: the C encoder skips those 8 bytes at a
-- time) with a special piece now and then, or specials throughout.
local function random_text(n, plain)
  local t = {}
  for i = 1, n do
    t[i] = plain and math.random(12) > 1 and string.char(math.random(32, 126)) or PIECES[math.random(#PIECES)]
  end
  return table.concat(t)
end

case("mime.qp and mime.base64 are the C encoders", function()
  eq(mime.qp, text.qp)
  eq(mime.base64, text.base64)
end)

case("qp: edges match the Lua encoder", function()
  local edges = { "", "\n", "\r", "\r\n", "a \n", "a\t", " ", "=", string.rep("a", 75),
                  string.rep("a", 76), string.rep("a", 77), string.rep("a", 74) .. " ",
                  string.rep("a", 75) .. " ", string.rep("é", 40), string.rep("a", 73) .. "é",
                  string.rep("a", 74) .. "é", string.rep("a", 75) .. "é", string.rep("=", 30) .. "\n",
                  string.rep("a", 200), string.rep("a", 151) .. " ", string.rep("abcdefg=", 20),
                  string.rep("abcdefg\t", 20), string.rep("abcdefg\127", 20), string.rep("x", 300) .. "\n\n" }
  for _, s in ipairs(edges) do eq(text.qp(s), ref.qp(s), string.format("%q", s)) end
end)

case("base64: every length up to 200 matches the Lua encoder", function()
  for n = 0, 200 do
    local s = random_text(n):sub(1, n)
    eq(text.base64(s), ref.base64(s), "length " .. n)
  end
end)

case("encode_words: edges match the Lua encoder", function()
  local edges = { "", "a", " ", "Grüße", "Café au lait", "Иван Петров", "王 小明", string.rep("x", 63),
                  string.rep("x", 64), string.rep("Ж", 40), "aaaa bbbb cccc dddd eeee ffff",
                  string.rep("😀", 30), "a =?b?= c", string.rep("\128", 9) }
  for _, s in ipairs(edges) do
    for _, first in ipairs { 20, 21, 30, 66, 75 } do
      eq(text.encode_words(s, first), ref_words(s, first), string.format("%q at %d", s, first))
    end
  end
end)

case("random UTF-8 text: qp, base64 and encode_words match the Lua encoders", function()
  math.randomseed(13)
  for round = 1, 3000 do
    local s = random_text(math.random(0, round % 10 == 0 and 400 or 60), round % 2 == 0)
    eq(text.qp(s), ref.qp(s), "qp " .. string.format("%q", s))
    eq(text.base64(s), ref.base64(s), "base64 " .. string.format("%q", s))
    local first = math.random(20, 75)
    eq(text.encode_words(s, first), ref_words(s, first), "words " .. string.format("%q %d", s, first))
  end
end)

case("a large body: the reused buffer grows, is given back, and the next result is right", function()
  local big = string.rep("é ligne longue ", 80000)           -- 1.3 MB: over the 1 MB kept
  local e = text.qp(big)
  eq(#e, #ref.qp(big))
  eq(text.qp("a=b"), "a=3Db")
  eq(text.base64("foobar"), "Zm9vYmFy")
end)

-- Header values: line breaks and NULs among blanks, "=?", invalid UTF-8 of every kind Lua's utf8.len
-- rejects (overlong, surrogate, over U+10FFFF, 5- and 6-byte forms, truncated, stray continuation),
-- and long words (over 70: encoded; over 998: no fold can help).
local HEAD_PIECES = { "a", "Zz", " ", " ", "  ", "\t", "\r", "\n", "\r\n", "\0", "=?", "=", "?", "é", "Ж",
                      "中", "😀", "\192\128", "\224\128\128", "\237\160\128", "\244\144\128\128",
                      "\248\136\128\128\128", "\252\132\128\128\128\128", "\254", "\255", "\128",
                      "\226\130", "\240\159", string.rep("w", 71), string.rep("y", 40), "\"", "<", ">" }

local function random_header(n)
  local t = {}
  for i = 1, n do t[i] = HEAD_PIECES[math.random(#HEAD_PIECES)] end
  return table.concat(t)
end

case("header_text, header_words: edges match the Lua code they replaced", function()
  local edges = { "", " ", "a", " a ", "\t\tx\t", "a\r\nb", "a \r\n\tb", " \r \t \n ", "\0", "a\0\0b",
                  "Grüße \r\n", "\255", "\255 ", " \226\130", "=?x?=", "a=?", string.rep("x", 70),
                  string.rep("x", 71), "a " .. string.rep("x", 71) .. " b", "Иван\nПетров" }
  for _, s in ipairs(edges) do
    eq(text.header_text(s), ref.header_text(s), string.format("%q", s))
    eq(mime.header_text(s), ref.header_text(s), string.format("%q", s))
    for _, first in ipairs { 20, 66, 75 } do
      local v, enc = text.header_words(s, first)
      local rv, renc = ref.header_words(s, first)
      eq(v, rv, string.format("%q at %d", s, first))
      eq(enc, renc, string.format("%q at %d: encoded", s, first))
    end
  end
end)

case("fold: edges match the Lua code it replaced", function()
  local x = string.rep
  local edges = { "", "short", x("a", 68), x("a", 69), x("a", 70), x("a ", 60), " " .. x("b", 80),
                  x("c", 100) .. " d", "d " .. x("c", 100), x("e", 997), x("e", 996) .. " f",
                  x("e", 995), x("e", 999) .. " f", "f " .. x("e", 999), x("w ", 40) .. "   ",
                  x(" ", 90), "a" .. x(" ", 90), x("ab\t", 40), "x  y" .. x(" z", 50),
                  x("=?UTF-8?Q?abc?= ", 10) }
  for _, name in ipairs { "To", "Subject", "X-A-Very-Long-Header-Name", "" } do
    for _, v in ipairs(edges) do
      eq(text.fold(name, v), ref.fold(name, v), string.format("%s: %q", name, v))
    end
  end
end)

case("random header values: header_text, header_words and fold match the Lua code", function()
  math.randomseed(1313)
  for round = 1, 4000 do
    local s = random_header(math.random(0, round % 10 == 0 and 60 or 12))
    eq(text.header_text(s), ref.header_text(s), "header_text " .. string.format("%q", s))
    local first = math.random(20, 75)
    local v, enc = text.header_words(s, first)
    local rv, renc = ref.header_words(s, first)
    eq(v, rv, "header_words " .. string.format("%q %d", s, first))
    eq(enc, renc, "header_words encoded " .. string.format("%q %d", s, first))
    local name = ({ "To", "Subject", "Reply-To", "X-Campaign-Id" })[round % 4 + 1]
    eq(text.fold(name, v), ref.fold(name, v), "fold " .. string.format("%q", v))
    eq(text.fold(name, s), ref.fold(name, s), "fold raw " .. string.format("%q", s))
  end
end)

case("header_text gives back the very string when nothing changes", function()
  local s = "Ivan " .. "Petrov " .. tostring(math.random(1000))
  assert(rawequal(text.header_text(s), s))
  eq(text.header_text(" a "), "a")
end)

case("misuse raises", function()
  assert(not pcall(text.qp, nil))
  assert(not pcall(text.encode_words, "a", 0))
  assert(not pcall(text.encode_words, "a"))
  assert(not pcall(text.header_text, nil))
  assert(not pcall(text.header_words, "a", 0))
  assert(not pcall(text.fold, "To"))
end)

return check.finish("test_mimeenc.lua")
