-- mime_ref.lua - the Lua encoders mime.lua had before they moved to C (src/mimeenc.c): base64 in
-- lines, quoted-printable, RFC 2047 encoded-words.  Not a test (make luatest runs test_*.lua only):
-- test_mimeenc.lua compares the C encoders with these, byte for byte, on random input.
--   local ref = dofile(here .. "mime_ref.lua")  -> { base64 =, qp =, encode_words =, header_text =,
--                                                  header_words =, fold = }
-- (header_text, header_words and fold: the header code mime.lua had before text.header_text,
-- text.header_words and text.fold.)

local string, table, setmetatable = string, table, setmetatable
local byte, char, find, sub, gsub, format, gmatch, unpack =
      string.byte, string.char, string.find, string.sub, string.gsub, string.format, string.gmatch,
      string.unpack
local concat = table.concat
local CRLF = "\r\n"
local QP_LINE, B64_LINE, WORD_MAX = 76, 76, 75
local M = {}

---------------------------------------------------------------- base64

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_2 = {}            -- 12 bits -> two base64 characters
for i = 0, 4095 do
  local a, b = (i >> 6) + 1, (i & 63) + 1
  B64_2[i] = sub(B64, a, a) .. sub(B64, b, b)
end

local B64_BYTES = B64_LINE // 4 * 3        -- 57 bytes make a whole line

-- One whole line from the 57 bytes at s[i]: one unpack and one
-- concatenation per line instead of a call and two stores per 3 bytes
-- (twice as fast on the 100 kB attachment of tests/lua/bench_mime.lua).
local LINE_FMT = ">" .. string.rep("I3", B64_BYTES // 3)
local function b64_line(s, i)
  local B = B64_2
  local v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15, v16, v17, v18, v19 =
        unpack(LINE_FMT, s, i)
  return B[v1 >> 12] .. B[v1 & 4095] .. B[v2 >> 12] .. B[v2 & 4095] .. B[v3 >> 12] .. B[v3 & 4095]
      .. B[v4 >> 12] .. B[v4 & 4095] .. B[v5 >> 12] .. B[v5 & 4095] .. B[v6 >> 12] .. B[v6 & 4095]
      .. B[v7 >> 12] .. B[v7 & 4095] .. B[v8 >> 12] .. B[v8 & 4095] .. B[v9 >> 12] .. B[v9 & 4095]
      .. B[v10 >> 12] .. B[v10 & 4095] .. B[v11 >> 12] .. B[v11 & 4095] .. B[v12 >> 12]
      .. B[v12 & 4095] .. B[v13 >> 12] .. B[v13 & 4095] .. B[v14 >> 12] .. B[v14 & 4095]
      .. B[v15 >> 12] .. B[v15 & 4095] .. B[v16 >> 12] .. B[v16 & 4095] .. B[v17 >> 12]
      .. B[v17 & 4095] .. B[v18 >> 12] .. B[v18 & 4095] .. B[v19 >> 12] .. B[v19 & 4095]
end

-- mime.base64(s) -> base64 of s in lines of 76 characters joined by CRLF
-- (no CRLF after the last line).
local function base64(s)
  local n, lines, k = #s, {}, 0
  local full = n - n % B64_BYTES
  for i = 1, full, B64_BYTES do k = k + 1; lines[k] = b64_line(s, i) end
  local whole, line, j = n - n % 3, {}, 0      -- the last line, if short
  for i = full + 1, whole, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = a << 16 | b << 8 | c
    line[j + 1], line[j + 2], j = B64_2[v >> 12], B64_2[v & 4095], j + 2
  end
  if n > whole then
    local a, b = byte(s, whole + 1, n)
    local v = a << 16 | (b or 0) << 8
    line[j + 1] = B64_2[v >> 12] .. (n - whole == 2 and sub(B64_2[v & 4095], 1, 1) .. "=" or "==")
    j = j + 1
  end
  if j > 0 then k = k + 1; lines[k] = concat(line, "", 1, j) end
  return concat(lines, CRLF, 1, k)
end
M.base64 = base64
---------------------------------------------------------------- quoted-printable

local HEX_ESC = {}          -- byte -> "=XX" (RFC 2045 6.7 (1), RFC 2047 4.2 (1))
for i = 0, 255 do HEX_ESC[char(i)] = format("=%02X", i) end

-- Escaped forms of runs of bytes to escape, made on first use: UTF-8 text
-- repeats a few runs (its letters), and one lookup a run is cheaper than
-- one a byte.  Kept for short runs only, and at most QP_RUNS_MAX of them.
local nqp_runs, QP_RUNS_MAX = 0, 2048
local qp_runs = setmetatable({}, { __index = function(t, run)
  local e = gsub(run, ".", HEX_ESC)
  if #run <= 12 and nqp_runs < QP_RUNS_MAX then t[run], nqp_runs = e, nqp_runs + 1 end
  return e
end })

-- Append to out[k+1...] the encoded line e cut with soft breaks; -> new k.
local function qp_cut(e, out, k)
  local pos, n = 1, #e
  while n - pos + 1 > QP_LINE do
    local cut = pos + QP_LINE - 2              -- 75 chars, then "="
    -- never split an "=XX" escape
    if byte(e, cut) == 61 then cut = cut - 1
    elseif byte(e, cut - 1) == 61 then cut = cut - 2 end
    k = k + 1
    out[k] = sub(e, pos, cut) .. "="
    pos = cut + 1
  end
  k = k + 1
  out[k] = sub(e, pos)
  return k
end

-- mime.qp(s) -> quoted-printable text with CRLF line breaks; line breaks in
-- s (CRLF, CR or LF) are line breaks of the text.
local function qp(s)
  if find(s, "\r", 1, true) then s = gsub(s, "\r\n?", "\n") end
  -- RFC 2045 6.7 (1)-(3): printable ASCII but "=" stays, space/tab stay
  -- except at the end of a line.  One pass over the whole text; then
  -- line by line for the trailing blank and the soft breaks.
  local e = gsub(s, "[^\t\n\32-\60\62-\126]+", qp_runs)
  local out, k, pos, n = {}, 0, 1, #e
  while true do
    local nl = find(e, "\n", pos, true)
    local last = (nl or n + 1) - 1             -- the line is e[pos..last]
    local line
    local b = last >= pos and byte(e, last)
    if b == 32 or b == 9 then
      line = sub(e, pos, last - 1) .. HEX_ESC[char(b)]
    else
      line = sub(e, pos, last)
    end
    if #line > QP_LINE then
      k = qp_cut(line, out, k)
    else
      k = k + 1
      out[k] = line
    end
    if not nl then break end
    pos = nl + 1
  end
  return concat(out, CRLF, 1, k)
end
M.qp = qp


-- RFC 2047 5 (3): the characters a Q-encoded word may carry as they are in
-- any header position (phrases are the strictest).  Q_CHAR: byte -> its
-- form in a Q-encoded word (RFC 2047 4.2), "_" for a space.
local Q_SAFE = "[A-Za-z0-9!%*%+%-/]"
local Q_UNSAFE = "[^A-Za-z0-9!%*%+%-/ ]"    -- takes 3 characters in Q
local Q_CHAR = {}
for i = 0, 255 do
  local c = char(i)
  Q_CHAR[c] = c == " " and "_" or find(c, Q_SAFE) and c or HEX_ESC[c]
end

-- One UTF-8 character (or one stray byte): never split inside a sequence.
local UNIT = "[%z\1-\255][\128-\191]?[\128-\191]?[\128-\191]?"

-- encode_words(s, first) -> list of encoded-words for s; the first one is
-- at most `first` characters, the others at most 75 (RFC 2047 2).  A word
-- that is full ends after the last space in it when it has one, so the
-- words split where the text has spaces (readers that wrongly keep the
-- blank between encoded-words then show a double space, not a split word).
local function encode_words(s, first)
  local _, unsafe = gsub(s, Q_UNSAFE, "")
  local qlen = #s + 2 * unsafe
  local use_q = qlen <= 4 * ((#s + 2) // 3)
  local prefix = use_q and "=?UTF-8?Q?" or "=?UTF-8?B?"
  if #s > 0 and 12 + (use_q and qlen or 4 * ((#s + 2) // 3)) <= first then
    -- all in one word: what the loop below makes of it, without the loop
    return { prefix .. (use_q and gsub(s, ".", Q_CHAR) or base64(s)) .. "?=" }
  end
  local words, room = {}, first
  local cur, curlen = {}, 0        -- pieces of the word being filled
  local brk, brklen                -- pieces up to its last space, and their length
  local function fits(len)
    return 12 + (use_q and len or 4 * ((len + 2) // 3)) <= room
  end
  local function emit(last)
    local raw = concat(cur, "", 1, last)
    words[#words + 1] = prefix .. (use_q and raw or gsub(base64(raw), "\r\n", "")) .. "?="
    room = WORD_MAX
  end
  for u in gmatch(s, UNIT) do
    local piece = use_q and gsub(u, ".", Q_CHAR) or u
    while curlen > 0 and not fits(curlen + #piece) do
      if brk and brk < #cur then
        emit(brk)
        cur, curlen = table.move(cur, brk + 1, #cur, 1, {}), curlen - brklen
      else
        emit(#cur)
        cur, curlen = {}, 0
      end
      brk, brklen = nil, nil
    end
    cur[#cur + 1], curlen = piece, curlen + #piece
    if u == " " then brk, brklen = #cur, curlen end
  end
  if curlen > 0 then emit(#cur) end
  return words
end

M.encode_words = encode_words

---------------------------------------------------------------- header text and folding
-- (mime.lua's, before text.header_text / text.header_words / text.fold)

local match, utf8_len, ipairs = string.match, utf8.len, ipairs
local FOLD_AT, MAX_LINE, LONG_WORD = 78, 998, 70

local function fix_utf8(s)
  if utf8_len(s) then return s end
  local out, pos = {}, 1
  while true do
    local ok, bad = utf8_len(s, pos)
    if ok then out[#out + 1] = sub(s, pos) break end
    out[#out + 1] = sub(s, pos, bad - 1)
    out[#out + 1] = "\239\191\189"
    pos = bad + 1
  end
  return concat(out)
end

local function trim(s)
  local first, last = byte(s, 1), byte(s, -1)
  if first == 32 or first == 9 or last == 32 or last == 9 then
    return (match(s, "^[ \t]*(.-)[ \t]*$"))
  end
  return s
end

local function header_text(s)
  if find(s, "^[\33-\126][\t\32-\126]*[\33-\126]$") then return s end
  if find(s, "^[\t\32-\126]*$") then return trim(s) end
  if find(s, "\n", 1, true) or find(s, "\r", 1, true) or find(s, "\0", 1, true) then
    s = gsub(s, "[ \t]*[\r\n%z]+[ \t]*", " ")
  end
  return fix_utf8(trim(s))
end
M.header_text = header_text

local function needs_encoding(s)
  if not find(s, "^[\t\32-\126]*$") or find(s, "=?", 1, true) then return true end
  if #s <= LONG_WORD then return false end
  for w in gmatch(s, "[^ \t]+") do
    if #w > LONG_WORD then return true end
  end
  return false
end

-- header_words(s, first) -> what text.header_words returns
function M.header_words(s, first)
  s = header_text(s)
  if not needs_encoding(s) then return s, false end
  return concat(encode_words(s, first), " "), true
end

function M.fold(name, value)
  local line = name .. ": " .. value
  if #line <= FOLD_AT then return line end
  local out, cur = {}, name .. ":"
  for seg in gmatch(" " .. value, "[ \t]+[^ \t]+") do
    if #cur + #seg > FOLD_AT and find(cur, "[^ \t]", #name + 2) then
      out[#out + 1] = cur
      cur = seg
    else
      cur = cur .. seg
    end
  end
  out[#out + 1] = cur
  for _, l in ipairs(out) do
    if #l > MAX_LINE then return nil end
  end
  return concat(out, CRLF)
end

return M
