-- mailshot.mime: build RFC 5322 / MIME messages from (hostile) row data.
--
-- Every value that reaches a header goes through header_text(): CR, LF and
-- NUL runs become one space, so no value can start a header line of its
-- own; what is not plain printable ASCII is then RFC 2047 encoded.  Bodies
-- are 7bit only when they are plain ASCII with lines of at most 998 octets,
-- else quoted-printable (or 8bit on request); attachments are base64.
-- Multipart boundaries are random and checked against every part's
-- encoded text before use.
--
-- Output: CRLF line endings, no line over 998 octets (RFC 5322 2.1.1),
-- header lines folded at 78 where a space allows it.  The message is NOT
-- dot-stuffed: that is the SMTP client's job (RFC 5321 4.5.2).
--
-- Errors: bad data (addresses, unreadable attachment, oversized header
-- values) -> nil, message.  Wrong types, bad header names, a message with
-- neither text nor html -> error().

local string, table, math, os, io, utf8, type, tostring, error, assert,
      pairs, ipairs, select =
      string, table, math, os, io, utf8, type, tostring, error, assert,
      pairs, ipairs, select
local byte, find, sub, gsub, match, format, lower, gmatch =
      string.byte, string.find, string.sub, string.gsub,
      string.match, string.format, string.lower, string.gmatch
local concat, sort = table.concat, table.sort

local M = {}

-- Relative attachment paths are resolved against this folder (nil = the
-- current directory); the campaign runner sets it like template.base_dir.
M.base_dir = nil

local CRLF = "\r\n"
local MAX_LINE = 998        -- RFC 5322 2.1.1: MUST
local FOLD_AT = 78          -- RFC 5322 2.1.1: SHOULD
local QP_LINE = 76          -- RFC 2045 6.7 (5)
local B64_LINE = 76         -- RFC 2045 6.8
local WORD_MAX = 75         -- RFC 2047 2: an encoded-word is at most 75 chars
local LONG_WORD = 70        -- plain words longer than this get encoded

---------------------------------------------------------------- base64

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_2 = {}            -- 12 bits -> two base64 characters
for i = 0, 4095 do
  local a, b = (i >> 6) + 1, (i & 63) + 1
  B64_2[i] = sub(B64, a, a) .. sub(B64, b, b)
end

-- mime.base64(s) -> base64 of s in lines of 76 characters joined by CRLF
-- (no CRLF after the last line).
local function base64(s)
  local n, lines, line = #s, {}, {}
  local whole = n - n % 3
  for i = 1, whole, 57 do              -- 57 bytes = one 76-character line
    local last, k = i + 56, 0
    if last > whole then last = whole end
    for j = i, last, 3 do
      local a, b, c = byte(s, j, j + 2)
      local v = a << 16 | b << 8 | c
      line[k + 1], line[k + 2], k = B64_2[v >> 12], B64_2[v & 4095], k + 2
    end
    lines[#lines + 1] = concat(line, "", 1, k)
  end
  local rest = n - whole
  if rest > 0 then
    local a, b = byte(s, whole + 1, n)
    local v = a << 16 | (b or 0) << 8
    local tail = B64_2[v >> 12] .. (rest == 2 and sub(B64_2[v & 4095], 1, 1) .. "=" or "==")
    local lastline = lines[#lines]
    if lastline and #lastline + 4 <= B64_LINE then
      lines[#lines] = lastline .. tail
    else
      lines[#lines + 1] = tail
    end
  end
  return concat(lines, CRLF)
end
M.base64 = base64

---------------------------------------------------------------- quoted-printable

local function hex_byte(c) return format("=%02X", byte(c)) end

-- Encode one line (no line break in it) and cut it with soft breaks.
local function qp_line(line, out)
  -- RFC 2045 6.7 (1)-(3): printable ASCII but "=" stays, space/tab stay
  -- except at the end of the line.
  local e = gsub(line, "[^\t\32-\60\62-\126]", hex_byte)
  e = gsub(e, "([\t ])$", hex_byte)
  local pos, n = 1, #e
  while n - pos + 1 > QP_LINE do
    local cut = pos + QP_LINE - 2              -- 75 chars, then "="
    -- never split an "=XX" escape
    if sub(e, cut, cut) == "=" then cut = cut - 1
    elseif sub(e, cut - 1, cut - 1) == "=" then cut = cut - 2 end
    out[#out + 1] = sub(e, pos, cut) .. "="
    pos = cut + 1
  end
  out[#out + 1] = sub(e, pos)
end

-- Split text into lines on CRLF, CR or LF.
local function lines_of(s)
  s = gsub(s, "\r\n?", "\n")
  local t = {}
  for l in gmatch(s .. "\n", "([^\n]*)\n") do t[#t + 1] = l end
  return t
end

-- mime.qp(s) -> quoted-printable text with CRLF line breaks; line breaks in
-- s (CRLF, CR or LF) are line breaks of the text.
local function qp(s)
  local out = {}
  for _, l in ipairs(lines_of(s)) do qp_line(l, out) end
  return concat(out, CRLF)
end
M.qp = qp

---------------------------------------------------------------- header text

-- Invalid UTF-8 bytes become U+FFFD: headers say their charset is UTF-8.
local function fix_utf8(s)
  if utf8.len(s) then return s end
  local out, pos = {}, 1
  while true do
    local ok, bad = utf8.len(s, pos)
    if ok then out[#out + 1] = sub(s, pos) break end
    out[#out + 1] = sub(s, pos, bad - 1)
    out[#out + 1] = "\239\191\189"
    pos = bad + 1
  end
  return concat(out)
end

-- Header values are data: a run of CR/LF/NUL, with the blanks around it,
-- becomes one space (it could start a new header line); leading and
-- trailing blanks go; invalid UTF-8 is replaced.
local function header_text(s)
  s = gsub(s, "[ \t]*[\r\n%z]+[ \t]*", " ")
  return fix_utf8(match(s, "^[ \t]*(.-)[ \t]*$"))
end
M.header_text = header_text

-- True when s must be RFC 2047 encoded: non-ASCII or control bytes, text
-- that a reader would take for an encoded-word, or a word too long to fold.
local function needs_encoding(s)
  if find(s, "[^\t\32-\126]") or find(s, "=?", 1, true) then return true end
  for w in gmatch(s, "[^ \t]+") do
    if #w > LONG_WORD then return true end
  end
  return false
end

-- RFC 2047 5 (3): the characters a Q-encoded word may carry as they are in
-- any header position (phrases are the strictest).
local Q_SAFE = "[%w!%*%+%-/]"
local function q_unit(c)
  if c == " " then return "_" end
  if find(c, "^" .. Q_SAFE .. "$") then return c end
  return (gsub(c, ".", hex_byte))
end

-- One UTF-8 character (or one stray byte): never split inside a sequence.
local UNIT = "[%z\1-\255][\128-\191]?[\128-\191]?[\128-\191]?"

-- encode_words(s, first) -> list of encoded-words for s; the first one is
-- at most `first` characters, the others at most 75 (RFC 2047 2).  A word
-- that is full ends after the last space in it when it has one, so the
-- words split where the text has spaces (readers that wrongly keep the
-- blank between encoded-words then show a double space, not a split word).
local function encode_words(s, first)
  local qlen = 0
  for c in gmatch(s, ".") do qlen = qlen + ((c == " " or find(c, Q_SAFE)) and 1 or 3) end
  local use_q = qlen <= 4 * ((#s + 2) // 3)
  local prefix = use_q and "=?UTF-8?Q?" or "=?UTF-8?B?"
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
    local piece = use_q and gsub(u, ".", q_unit) or u
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

-- mime.encode_header(s [, used]) -> s ready for an unstructured header:
-- unfolded (CR/LF/NUL -> space) and, when needed, RFC 2047 encoded-words
-- (UTF-8, B or Q, whichever is shorter) separated by spaces.  `used` is how
-- many characters precede the value on the header's first line ("Subject: "
-- is 9) so that line stays within 78.
local function encode_header(s, used)
  s = header_text(s)
  if not needs_encoding(s) then return s end
  local first = FOLD_AT - (used or 0)
  if first > WORD_MAX then first = WORD_MAX elseif first < 20 then first = 20 end
  return concat(encode_words(s, first), " ")
end
M.encode_header = encode_header

-- fold(name, value) -> "Name: value" with CRLF + space inserted before
-- whitespace so lines stay within 78 where the value allows it.  Returns
-- nil if a line would still exceed 998.
local function fold(name, value)
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

---------------------------------------------------------------- addresses

local ATEXT = "[%w!#%$%%&'%*%+/=%?%^_`{|}~%-]"
local DOT_ATOM = "^" .. ATEXT .. "+$"

-- mime.valid_address(addr) -> true | false, reason
-- Accepts local@domain: a dot-atom local part (RFC 5322 3.4.1, no quoted
-- local parts) of at most 64 octets, and a domain of LDH labels (RFC 1035)
-- of at most 253 octets.  ASCII only (no SMTPUTF8).
local function valid_address(addr)
  if type(addr) ~= "string" then return false, "not a string" end
  if addr == "" then return false, "empty address" end
  if find(addr, "[%c ]") then return false, "space or control character in address" end
  if find(addr, "[\128-\255]") then return false, "non-ASCII address (SMTPUTF8 is not supported)" end
  local at = select(2, gsub(addr, "@", "@"))
  if at == 0 then return false, "no @ in address" end
  if at > 1 then return false, "more than one @ in address" end
  local lp, domain = match(addr, "^(.*)@(.*)$")
  if lp == "" then return false, "empty local part" end
  if domain == "" then return false, "empty domain" end
  if #lp > 64 then return false, "local part longer than 64 octets" end
  if sub(lp, 1, 1) == "." or sub(lp, -1) == "." or find(lp, "..", 1, true) then
    return false, "misplaced dot in local part"
  end
  for atom in gmatch(lp, "[^.]+") do
    if not find(atom, DOT_ATOM) then return false, "bad character in local part" end
  end
  if #domain > 253 then return false, "domain longer than 253 octets" end
  if sub(domain, -1) == "." or sub(domain, 1, 1) == "." or find(domain, "..", 1, true) then
    return false, "misplaced dot in domain"
  end
  for label in gmatch(domain, "[^.]+") do
    if #label > 63 or not find(label, "^%w[%w%-]*$") or sub(label, -1) == "-" then
      return false, "bad domain label \"" .. label .. "\""
    end
  end
  return true
end
M.valid_address = valid_address

local function bad_address(s, why)
  return nil, format("invalid address %q: %s", s, why)
end

-- mime.parse_address(s) -> { name = string|nil, address = string } | nil, err
-- Forms: "addr@x", "<addr@x>", "Name <addr@x>", "\"Quoted, Name\" <addr@x>".
-- CR/LF/NUL runs count as spaces first.
local function parse_address(s)
  if type(s) ~= "string" then error("address must be a string, got " .. type(s), 2) end
  local text = header_text(s)
  local name, addr = match(text, "^(.-)[ \t]*<([^<>]*)>$")
  if not addr then addr = text end
  addr = match(addr, "^[ \t]*(.-)[ \t]*$")
  local ok, why = valid_address(addr)
  if not ok then return bad_address(text, why) end
  if name then
    local q = match(name, '^"(.*)"$')
    if q then name = gsub(q, "\\(.)", "%1") end
    if name == "" then name = nil end
  end
  return { name = name, address = addr }
end
M.parse_address = parse_address

-- Display name as an RFC 5322 phrase: encoded-words if needed, else as is
-- when it is atoms, else a quoted-string.
local function phrase(name)
  name = header_text(name)
  if name == "" then return nil end
  -- first word at most 66: "Reply-To: " + 66 stays within 78
  if needs_encoding(name) then return concat(encode_words(name, 66), " ") end
  if find(name, "^[%w!#%$%%&'%*%+/=%?%^_`{|}~%- \t]+$") then return name end
  return '"' .. gsub(name, '(["\\])', "\\%1") .. '"'
end

-- One mailbox from "Name <a@x>", "a@x" or { name=, address= }; `level`
-- is for error() on a value of the wrong type.
local function mailbox(v, what, level)
  if type(v) == "string" then
    local a, err = parse_address(v)
    if not a then return nil, what .. ": " .. err end
    return a
  elseif type(v) == "table" then
    if type(v.address) ~= "string" then
      if v.address == nil then return nil, what .. ": no address" end
      error(what .. ": address must be a string", level)
    end
    if v.name ~= nil and type(v.name) ~= "string" then error(what .. ": name must be a string", level) end
    local addr = match(v.address, "^[ \t]*(.-)[ \t]*$")
    local ok, why = valid_address(addr)
    if not ok then return nil, what .. ": " .. select(2, bad_address(v.address, why)) end
    return { name = v.name, address = addr }
  end
  error(what .. ": expected an address string or table, got " .. type(v), level)
end

-- mailbox_list(v, what) -> list of mailboxes | nil, err (v: one or a list)
local function mailbox_list(v, what)
  local one = type(v) ~= "table" or v.address ~= nil or v.name ~= nil
  local items = one and { v } or v
  if #items == 0 then return nil, "no " .. what .. " address" end
  local list = {}
  for i, item in ipairs(items) do
    local mb, err = mailbox(item, what, 5)   -- <- mailbox_list <- addresses <- build
    if not mb then return nil, err end
    list[i] = mb
  end
  return list
end

local function format_mailboxes(list)
  local out = {}
  for i, mb in ipairs(list) do
    local p = mb.name and phrase(mb.name)
    out[i] = p and (p .. " <" .. mb.address .. ">") or mb.address
  end
  return concat(out, ", ")
end

---------------------------------------------------------------- dates & ids

local DAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local MONTHS = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                 "Sep", "Oct", "Nov", "Dec" }

-- mime.date(t) -> RFC 5322 3.3 date in UTC, English names whatever the locale.
local function rfc_date(t)
  local d = os.date("!*t", t)
  return format("%s, %02d %s %04d %02d:%02d:%02d +0000", DAYS[d.wday], d.day,
                MONTHS[d.month], d.year, d.hour, d.min, d.sec)
end
M.date = rfc_date

-- math.random is seeded at state creation in Lua 5.4; the counter keeps
-- ids unique within a run even if a script reseeds it.
local counter = 0
local function random_hex(n)
  local t = {}
  for i = 1, n do t[i] = format("%x", math.random(0, 15)) end
  return concat(t)
end

local function new_message_id(domain)
  counter = counter + 1
  return format("<%d.%s.%x%s@%s>", os.time(), random_hex(8), counter, random_hex(8), domain)
end

local function new_boundary()
  return "=_ms_" .. random_hex(24)     -- "=_" never occurs in QP or base64
end

---------------------------------------------------------------- bodies & parts

-- Content-Transfer-Encoding for a text body, and its encoded form.
local function encode_text(s, eightbit)
  local lines = lines_of(s)
  local long, ascii = false, not find(s, "[\128-\255]")
  for _, l in ipairs(lines) do
    if #l > MAX_LINE then long = true break end
  end
  if not long and not find(s, "%z") and (ascii or eightbit) then
    return concat(lines, CRLF), ascii and "7bit" or "8bit"
  end
  return qp(s), "quoted-printable"
end

local TYPES = {
  pdf = "application/pdf", png = "image/png", jpg = "image/jpeg",
  jpeg = "image/jpeg", gif = "image/gif", txt = "text/plain", csv = "text/csv",
  html = "text/html", htm = "text/html", zip = "application/zip",
  ics = "text/calendar",
}
M.content_types = TYPES

local function guess_type(filename)
  local ext = match(filename, "%.([^./\\]+)$")
  return ext and TYPES[lower(ext)] or "application/octet-stream"
end

-- A MIME parameter: quoted-string when short printable ASCII, else RFC 2231
-- (UTF-8 percent-encoding, split into numbered sections).  Returns the
-- "; name=value" pieces, each to go on its own folded line.
local function param(name, value)
  value = header_text(value)
  if not find(value, "[^\32-\126]") and #value <= 60 then
    return { name .. '="' .. gsub(value, '(["\\])', "\\%1") .. '"' }
  end
  local enc = gsub(value, "[^%w!#%$&%+%-%.%^_`|~]", function(c)
    return format("%%%02X", byte(c))
  end)
  local out, i, section = {}, 1, 0
  while i <= #enc do
    local j = i + 59
    if sub(enc, j - 1, j - 1) == "%" then j = j - 2        -- keep %XX whole
    elseif sub(enc, j, j) == "%" then j = j - 1 end
    out[#out + 1] = format("%s*%d*=%s%s", name, section,
                           section == 0 and "UTF-8''" or "", sub(enc, i, j))
    i, section = j + 1, section + 1
  end
  return out
end

local function header_with_params(name, value, params)
  local t = { name .. ": " .. value }
  for _, p in ipairs(params) do t[#t] = t[#t] .. ";"; t[#t + 1] = " " .. p end
  return concat(t, CRLF)
end

local function read_file(path)
  local full = path
  if M.base_dir and M.base_dir ~= "" and sub(path, 1, 1) ~= "/" then
    full = (sub(M.base_dir, -1) == "/" and M.base_dir or M.base_dir .. "/") .. path
  end
  local f, err = io.open(full, "rb")
  local data
  if f then
    data, err = f:read("a")
    f:close()
  end
  if not data then
    local reason = tostring(err)
    if sub(reason, 1, #full + 2) == full .. ": " then reason = sub(reason, #full + 3) end
    return nil, "attachment " .. full .. ": " .. reason
  end
  return data
end

-- Encoded attachment contents by raw content: a campaign attaches the same
-- file to every message.  Bounded by total size.
local b64_cache, b64_cached = {}, 0
local B64_CACHE_MAX = 64 * 1024 * 1024

local function cached_base64(data)
  local e = b64_cache[data]
  if not e then
    e = base64(data)
    if b64_cached + #e > B64_CACHE_MAX then b64_cache, b64_cached = {}, 0 end
    if #e <= B64_CACHE_MAX then b64_cache[data], b64_cached = e, b64_cached + #e end
  end
  return e
end

-- attachment_part(a) -> { headers = {...}, body = string } | nil, err
local function attachment_part(a, i)
  if type(a) ~= "table" then error("attachments[" .. i .. "] must be a table", 4) end
  local data, filename = a.data, a.filename
  if data ~= nil then
    if type(data) ~= "string" then error("attachments[" .. i .. "].data must be a string", 4) end
    if type(filename) ~= "string" then
      error("attachments[" .. i .. "] with data needs a filename", 4)
    end
  elseif type(a.path) == "string" then
    local err
    data, err = read_file(a.path)
    if not data then return nil, err end
    filename = filename or a.path
  else
    error("attachments[" .. i .. "] needs a path or data + filename", 4)
  end
  if type(filename) ~= "string" then error("attachments[" .. i .. "].filename must be a string", 4) end
  filename = match(filename, "([^/\\]*)$")          -- no directories in names
  if filename == "" then filename = "attachment" end
  local ctype = a.content_type or guess_type(filename)
  if type(ctype) ~= "string" or not find(ctype, "^[%w!#%$&%^_%.%+%-]+/[%w!#%$&%^_%.%+%-]+$") then
    error("attachments[" .. i .. "].content_type must be type/subtype", 4)
  end
  return {
    headers = {
      header_with_params("Content-Type", ctype, param("name", filename)),
      header_with_params("Content-Disposition", "attachment", param("filename", filename)),
      "Content-Transfer-Encoding: base64",
    },
    body = cached_base64(data),
  }
end

local function text_part(s, subtype, eightbit)
  local body, cte = encode_text(s, eightbit)
  return {
    headers = { "Content-Type: text/" .. subtype .. "; charset=UTF-8",
                "Content-Transfer-Encoding: " .. cte },
    body = body, eightbit = cte == "8bit",
  }
end

local function serialize(part)
  return concat(part.headers, CRLF) .. CRLF .. CRLF .. part.body
end

-- multipart(subtype, parts) -> part, with a boundary found in none of them.
local function multipart(subtype, parts)
  local texts, eightbit = {}, false
  for i, p in ipairs(parts) do
    texts[i] = serialize(p)
    eightbit = eightbit or p.eightbit
  end
  local boundary
  repeat
    boundary = new_boundary()
    local clash = false
    for _, t in ipairs(texts) do
      if find(t, boundary, 1, true) then clash = true break end
    end
  until not clash
  local delim = CRLF .. "--" .. boundary .. CRLF
  return {
    headers = { "Content-Type: multipart/" .. subtype .. ";" .. CRLF
                .. ' boundary="' .. boundary .. '"',
                "Content-Transfer-Encoding: " .. (eightbit and "8bit" or "7bit") },
    body = "--" .. boundary .. CRLF .. concat(texts, delim)
           .. CRLF .. "--" .. boundary .. "--" .. CRLF,
    eightbit = eightbit,
  }
end

---------------------------------------------------------------- headers

-- Headers build() writes itself; `headers` may not set them.
local RESERVED = {
  ["date"] = "date", ["from"] = "from", ["to"] = "to", ["cc"] = "cc",
  ["bcc"] = "bcc", ["reply-to"] = "reply_to", ["subject"] = "subject",
  ["message-id"] = "message_id", ["mime-version"] = false,
  ["content-type"] = false, ["content-transfer-encoding"] = false,
  ["content-disposition"] = false,
}

local function extra_header(name, value, out)
  if type(name) ~= "string" or not find(name, "^[!-9;-~]+$") then
    error("bad header name " .. format("%q", tostring(name)), 5)
  end
  local r = RESERVED[lower(name)]
  if r ~= nil then
    error("header " .. name .. " is written by mime.build"
          .. (r and " (use the " .. r .. " field)" or ""), 5)
  end
  if type(value) == "number" then value = tostring(value) end
  if type(value) ~= "string" then error("header " .. name .. ": value must be a string", 5) end
  value = header_text(value)
  -- Extra headers may be structured (List-Unsubscribe): encode only what
  -- can't go as it is.
  if find(value, "[^\t\32-\126]") then value = encode_header(value, #name + 2) end
  local line = fold(name, value)
  if not line then return nil, "header " .. name .. ": a word is longer than 998 octets" end
  out[#out + 1] = line
  return true
end

local function extra_headers(h, out)
  if h == nil then return true end
  if type(h) ~= "table" then error("headers must be a table", 4) end
  for i, pair in ipairs(h) do
    if type(pair) ~= "table" then error("headers[" .. i .. "] must be { name, value }", 4) end
    local ok, err = extra_header(pair[1], pair[2], out)
    if not ok then return nil, err end
  end
  local names = {}
  for k in pairs(h) do
    if type(k) ~= "number" then names[#names + 1] = k end
  end
  sort(names, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(names) do
    local ok, err = extra_header(k, h[k], out)
    if not ok then return nil, err end
  end
  return true
end

-- Never fails in practice (addresses <= 318 octets, encoded-words <= 75),
-- but fold() says so when a line would pass 998.
local function address_header(name, list, out)
  local line = fold(name, format_mailboxes(list))
  if not line then return false end
  out[#out + 1] = line
  return true
end

---------------------------------------------------------------- build

local function check_string(m, field)
  local v = m[field]
  if v ~= nil and type(v) ~= "string" then
    error("mime.build: " .. field .. " must be a string, got " .. type(v), 3)
  end
  return v
end

-- addresses(m) -> { from=, to=, cc=, bcc=, reply_to= } (mailbox lists,
-- from a single mailbox) | nil, err
local function addresses(m)
  if m.from == nil then return nil, "no from address" end
  if m.to == nil then return nil, "no to address" end
  local a, err = {}, nil
  a.from, err = mailbox(m.from, "from", 4)  -- <- addresses <- build
  if not a.from then return nil, err end
  for _, field in ipairs({ "to", "cc", "bcc", "reply_to" }) do
    if m[field] ~= nil then
      a[field], err = mailbox_list(m[field], field)
      if not a[field] then return nil, err end
    end
  end
  return a
end

-- body_part(m, text, html) -> the message's top part | nil, err: text, html
-- or both as multipart/alternative, inside multipart/mixed with attachments.
local function body_part(m, text, html)
  local part
  if text and html then
    part = multipart("alternative", { text_part(text, "plain", m.eightbit),
                                      text_part(html, "html", m.eightbit) })
  else
    part = text_part(text or html, text and "plain" or "html", m.eightbit)
  end
  local list = m.attachments
  if list == nil then return part end
  if type(list) ~= "table" then error("mime.build: attachments must be a list", 3) end
  if #list == 0 then return part end
  local parts = { part }
  for i, a in ipairs(list) do
    local p, err = attachment_part(a, i)
    if not p then return nil, err end
    parts[#parts + 1] = p
  end
  return multipart("mixed", parts)
end

local function date_value(date)
  if date == nil or type(date) == "number" then return rfc_date(date or os.time()) end
  if type(date) ~= "string" then error("mime.build: date must be a string or a time number", 4) end
  date = header_text(date)
  if date == "" or find(date, "[^\32-\126]") or #date > 200 then return nil, "invalid date" end
  return date
end

local function message_id_value(mid, from)
  if mid == nil then return new_message_id(lower(match(from.address, "@(.*)$"))) end
  if type(mid) ~= "string" then error("mime.build: message_id must be a string", 4) end
  mid = header_text(mid)
  if not find(mid, "^<.*>$") then mid = "<" .. mid .. ">" end
  if not find(mid, "^<[!-;=?-~]+@[!-;=?-~]+>$") or #mid > 250 then
    return nil, format("invalid message_id %q", mid)
  end
  return mid
end

-- header_lines(m, a, part) -> list of header lines, message id | nil, err
local function header_lines(m, a, part)
  local date, err = date_value(m.date)
  if not date then return nil, err end
  local mid
  mid, err = message_id_value(m.message_id, a.from)
  if not mid then return nil, err end
  local h = { "Date: " .. date }
  local ok = address_header("From", { a.from }, h) and address_header("To", a.to, h)
             and (not a.cc or address_header("Cc", a.cc, h))
             and (not a.reply_to or address_header("Reply-To", a.reply_to, h))
  if not ok then return nil, "address header too long" end
  if m.subject then h[#h + 1] = assert(fold("Subject", encode_header(m.subject, 9))) end
  h[#h + 1] = "Message-ID: " .. mid
  h[#h + 1] = "MIME-Version: 1.0"
  for _, line in ipairs(part.headers) do h[#h + 1] = line end
  ok, err = extra_headers(m.headers, h)
  if not ok then return nil, err end
  return h, mid
end

-- mime.build(m) -> data, info | nil, err
-- The fields of m and info are listed in README.md, "Lua API reference".
function M.build(m)
  if type(m) ~= "table" then error("mime.build: expected a table", 2) end
  local text, html = check_string(m, "text"), check_string(m, "html")
  check_string(m, "subject")
  if text == nil and html == nil then error("mime.build: message needs text or html", 2) end
  local a, err = addresses(m)
  if not a then return nil, err end
  local part
  part, err = body_part(m, text, html)
  if not part then return nil, err end
  local h, mid = header_lines(m, a, part)
  if not h then return nil, mid end

  local body = part.body
  if body ~= "" and sub(body, -2) ~= CRLF then body = body .. CRLF end
  local data = concat(h, CRLF) .. CRLF .. CRLF .. body

  local recipients, seen = {}, {}
  for _, list in ipairs({ a.to, a.cc or {}, a.bcc or {} }) do
    for _, mb in ipairs(list) do
      local key = lower(mb.address)
      if not seen[key] then seen[key] = true; recipients[#recipients + 1] = mb.address end
    end
  end
  return data, {
    message_id = mid, size = #data, envelope_from = a.from.address,
    recipients = recipients, eightbit = part.eightbit or false,
  }
end

return M
