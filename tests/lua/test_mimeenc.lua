-- test_mimeenc.lua - the C MIME encoders (text.qp, text.base64, text.encode_words; src/mimeenc.c)
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

case("misuse raises", function()
  assert(not pcall(text.qp, nil))
  assert(not pcall(text.encode_words, "a", 0))
  assert(not pcall(text.encode_words, "a"))
end)

return check.finish("test_mimeenc.lua")
