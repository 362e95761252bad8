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

local string, table, math, os, io, type, tostring, error, assert,
      pairs, ipairs, select =
      string, table, math, os, io, type, tostring, error, assert,
      pairs, ipairs, select
local byte, find, sub, gsub, match, format, lower, gmatch =
      string.byte, string.find, string.sub, string.gsub,
      string.match, string.format, string.lower, string.gmatch
local concat, sort = table.concat, table.sort
local random, time = math.random, os.time
local text = require("mailshot.text")
local paths = require("mailshot.path")

local M = {}


local CRLF = "\r\n"
local MAX_LINE = 998        -- RFC 5322 2.1.1: MUST
local FOLD_AT = 78          -- RFC 5322 2.1.1: SHOULD
local WORD_MAX = 75         -- RFC 2047 2: an encoded-word is at most 75 chars
local LONG_WORD = 70        -- plain words longer than this get encoded

---------------------------------------------------------------- encoders

-- The byte-level encodings are C (src/mimeenc.c; the tests compare them with
-- the Lua code they replaced):
--   mime.base64(s) -> base64 of s in lines of 76 characters joined by CRLF
--   (no CRLF after the last line).
--   mime.qp(s) -> quoted-printable text with CRLF line breaks; line breaks in
--   s (CRLF, CR or LF) are line breaks of the text.  RFC 2045 6.7: printable
--   ASCII but "=" stays, space/tab stay except at the end of a line, lines
--   over 76 get soft breaks that never split an "=XX".
local base64, qp = text.base64, text.qp
M.base64, M.qp = base64, qp

---------------------------------------------------------------- header text

-- s without leading and trailing blanks (space, tab).
local function trim(s)
  local first, last = byte(s, 1), byte(s, -1)
  if first == 32 or first == 9 or last == 32 or last == 9 then
    return (match(s, "^[ \t]*(.-)[ \t]*$"))
  end
  return s
end

-- mime.header_text(s): header values are data (C: text.header_text): a run
-- of CR/LF/NUL, with the blanks around it, becomes one space (it could
-- start a new header line); leading and trailing blanks go; invalid UTF-8
-- is replaced (U+FFFD: headers say their charset is UTF-8).
local header_text = text.header_text
M.header_text = header_text

-- header_words(s, first) -> header_text(s), as encoded-words when it must
-- be (C: text.header_words): non-ASCII or control bytes, text that a
-- reader would take for an encoded-word ("=?"), or a word too long to fold
-- (over 70); and whether it was encoded.  The encoded-words (C:
-- text.encode_words): UTF-8, Q or B, whichever is shorter; the first word is
-- at most `first` characters, the others at most 75 (RFC 2047 2), and no
-- word ends inside a UTF-8 sequence.  A word that is full ends after the
-- last space in it when it has one, so the words split where the text has
-- spaces (readers that wrongly keep the blank between encoded-words then
-- show a double space, not a split word).
local header_words = text.header_words

-- mime.encode_header(s [, used]) -> s ready for an unstructured header:
-- unfolded (CR/LF/NUL -> space) and, when needed, RFC 2047 encoded-words
-- (UTF-8, B or Q, whichever is shorter) separated by spaces.  `used` is how
-- many characters precede the value on the header's first line ("Subject: "
-- is 9) so that line stays within 78.
local function encode_header(s, used)
  local first = FOLD_AT - (used or 0)
  if first > WORD_MAX then first = WORD_MAX elseif first < 20 then first = 20 end
  return (header_words(s, first))
end
M.encode_header = encode_header

-- fold(name, value) -> "Name: value" with CRLF inserted before the blanks
-- before a word so lines stay within 78 where the value allows it (C:
-- text.fold).  Returns nil if a line would still exceed 998.
local fold = text.fold

---------------------------------------------------------------- addresses

local ATEXT = "[%w!#%$%%&'%*%+/=%?%^_`{|}~%-]"
local DOT_ATOM = "^" .. ATEXT .. "+$"

-- domain_error(domain) -> nil | why it is not a valid domain (domain: ASCII,
-- not empty, no "@", space or control character).
local function domain_error(domain)
  if #domain > 253 then return "domain longer than 253 octets" end
  if sub(domain, -1) == "." or sub(domain, 1, 1) == "." or find(domain, "..", 1, true) then
    return "misplaced dot in domain"
  end
  for label in gmatch(domain, "[^.]+") do
    if #label > 63 or not find(label, "^%w[%w%-]*$") or sub(label, -1) == "-" then
      return "bad domain label \"" .. label .. "\""
    end
  end
end

-- What nearly every address looks like: the usual characters in explicit
-- ASCII ranges (%w follows the C library's locale; a class is scanned in
-- order for each character; the other characters take the general path),
-- at most 64 octets (so both parts are short enough), a local part that
-- neither starts nor ends with ".".  The domain is looked up among those
-- already found valid (recipients share a few domains; cleared when full).
-- Enough to accept; valid_address() says why it rejects.
-- An address alone is matched by text.fast_address, which is "^" .. ADDR_SPEC .. "$" in C (one
-- pass, where the pattern matcher tries each character against each class entry).
local ADDR_SPEC = "[a-z0-9A-Z_+%-][a-z0-9.A-Z_+%-]*[a-z0-9A-Z_+%-]@([a-z0-9.A-Z%-]+)"
local fast_address = text.fast_address
local good_domains, ngood, GOOD_MAX = {}, 0, 1024

-- fast_parts(addr, domain) -> true when addr, matched by ADDR_SPEC with
-- this domain, is valid
local function fast_parts(addr, domain)
  if #addr > 64 or find(addr, "..", 1, true) then return false end
  if good_domains[domain] then return true end
  if domain_error(domain) then return false end
  if ngood >= GOOD_MAX then good_domains, ngood = {}, 0 end
  good_domains[domain], ngood = true, ngood + 1
  return true
end

local function fast_valid(addr)
  local domain = fast_address(addr)
  return domain ~= nil and fast_parts(addr, domain)
end

-- mime.valid_address(addr) -> true | false, reason
-- One rule set with the SMTP client: text.address_ok is smtp_addr_ok, the C
-- check of every MAIL FROM and RCPT TO (no CR, LF, control character, "<"
-- or ">"; lengths of RFC 5321 4.5.3.1; one "@").  A header narrows it: a
-- dot-atom local part (RFC 5322 3.4.1, no quoted local parts), a domain of
-- LDH labels (RFC 1035; an IDN goes as its A-label, idna.to_ascii), ASCII
-- only (no SMTPUTF8).
local address_ok = text.address_ok
-- The last address found valid: a campaign checks each recipient's address when it classifies the
-- row, and mime.build checks it again in the To header.
local last_valid = {}
local function valid_address(addr)
  if addr == last_valid then return true end
  if type(addr) ~= "string" then return false, "not a string" end
  if fast_valid(addr) then last_valid = addr; return true end
  local ok, why = address_ok(addr)
  if not ok then return false, why end
  if find(addr, "[\128-\255]") then return false, "non-ASCII address (SMTPUTF8 is not supported)" end
  if find(addr, " ", 1, true) then return false, "space in address" end
  local lp, domain = match(addr, "^(.*)@(.*)$")
  if sub(lp, 1, 1) == "." or sub(lp, -1) == "." or find(lp, "..", 1, true) then
    return false, "misplaced dot in local part"
  end
  for atom in gmatch(lp, "[^.]+") do
    if not find(atom, DOT_ATOM) then return false, "bad character in local part" end
  end
  local derr = domain_error(domain)
  if derr then return false, derr end
  return true
end
M.valid_address = valid_address

local function bad_address(s, why)
  return nil, format("invalid address %q: %s", s, why)
end

-- "Name <a@b>" as header_text() leaves it (printable ASCII, no blank at
-- either end), with no quotes to undo: one match gives what the general
-- path finds (the name without its trailing blanks, the address, its
-- domain for fast_parts()) without its lazy "(.-)" trying every length.
local FAST_MAILBOX = "^([?-~!#-;=][?-~ !#-;=\t]*[?-~!#-;=])[ \t]*<(" .. ADDR_SPEC .. ")>$"

-- mime.parse_address(s) -> { name = string|nil, address = string } | nil, err
-- Forms: "addr@x", "<addr@x>", "Name <addr@x>", "\"Quoted, Name\" <addr@x>".
-- CR/LF/NUL runs count as spaces first.
local function parse_address(s)
  if type(s) ~= "string" then error("address must be a string, got " .. type(s), 2) end
  local name, addr, domain
  if byte(s, -1) == 62 then                                      -- ">"
    name, addr, domain = match(s, FAST_MAILBOX)
  else
    addr, domain = s, fast_address(s)
  end
  if domain and fast_parts(addr, domain) then return { name = name, address = addr } end
  local text = header_text(s)
  name, addr = nil, nil
  if byte(text, -1) == 62 then name, addr = match(text, "^(.-)[ \t]*<([^<>]*)>$") end
  if not addr then addr = text end
  addr = trim(addr)
  local ok, why = valid_address(addr)
  if not ok then return bad_address(text, why) end
  if name then
    local q = byte(name, 1) == 34 and match(name, '^"(.*)"$')
    if q then name = gsub(q, "\\(.)", "%1") end
    if name == "" then name = nil end
  end
  return { name = name, address = addr }
end
M.parse_address = parse_address

-- Atoms (without "=" and "?", so no "=?") and blanks, no blank at either
-- end: phrase() returns such a name as it is when no word is over LONG_WORD.
local PLAIN_ATOM = "a-zA-Z0-9!#%$%%&'%*%+/^_`{|}~%-"
local PLAIN_PHRASE = "^[" .. PLAIN_ATOM .. "][a-z " .. PLAIN_ATOM .. "\t]*[" .. PLAIN_ATOM .. "]$"

-- Display name as an RFC 5322 phrase: encoded-words if needed, else as is
-- when it is atoms, else a quoted-string.
local function phrase(name)
  if #name <= LONG_WORD and find(name, PLAIN_PHRASE) then return name end
  -- first word at most 66: "Reply-To: " + 66 stays within 78
  local encoded
  name, encoded = header_words(name, 66)
  if encoded then return name end
  if name == "" then return nil end
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
    local addr = trim(v.address)
    local ok, why = valid_address(addr)
    if not ok then return nil, what .. ": " .. select(2, bad_address(v.address, why)) end
    return { name = v.name, address = addr }
  end
  error(what .. ": expected an address string or table, got " .. type(v), level)
end

-- mailbox_list(v, what) -> list of mailboxes | nil, err (v: one or a list)
local function mailbox_list(v, what)
  local one = type(v) ~= "table" or v.address ~= nil or v.name ~= nil
  if one then
    local mb, err = mailbox(v, what, 5)      -- <- mailbox_list <- addresses <- build
    if not mb then return nil, err end
    return { mb }
  end
  if #v == 0 then return nil, "no " .. what .. " address" end
  local list = {}
  for i, item in ipairs(v) do
    local mb, err = mailbox(item, what, 5)   -- <- mailbox_list <- addresses <- build
    if not mb then return nil, err end
    list[i] = mb
  end
  return list
end

local function format_mailboxes(list)
  if #list == 1 then                       -- the usual case, without a table
    local mb = list[1]
    local p = mb.name and phrase(mb.name)
    return p and (p .. " <" .. mb.address .. ">") or mb.address
  end
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
local cached_t, cached_date      -- build() asks for the same second many times
local function rfc_date(t)
  if t == cached_t then return cached_date end
  local d = os.date("!*t", t)
  cached_date = format("%s, %02d %s %04d %02d:%02d:%02d +0000", DAYS[d.wday], d.day,
                       MONTHS[d.month], d.year, d.hour, d.min, d.sec)
  cached_t = t
  return cached_date
end
M.date = rfc_date

-- math.random is seeded at state creation in Lua 5.4; the counter keeps
-- ids unique within a run even if a script reseeds it.  The hex digits are
-- written by text.message_id and text.boundary (C: one call, where a table
-- lookup per byte and string.format's "%x" made a few hundred VM steps).
local message_id, boundary_of = text.message_id, text.boundary

local counter, id_time, id_prefix = 0, nil, nil
-- "<time.RRRRRRRR.CRRRRRRRR@domain>": R random hex digits (random(0)'s high
-- half, then its low half), C the counter in hex
local function new_message_id(domain)
  counter = counter + 1
  local t = time()
  if t ~= id_time then id_time, id_prefix = t, "<" .. t .. "." end
  return message_id(id_prefix, random(0), counter, domain)
end

-- "=_ms_" and 24 hex digits: all of random(0), the low half of another
-- ("=_" never occurs in QP or base64)
local function new_boundary()
  local r, q = random(0), random(0)
  return boundary_of(r, q)
end

---------------------------------------------------------------- bodies & parts

-- Content-Transfer-Encoding for a text body, and its encoded form.  Line breaks become CRLF
-- (text.crlf, in C: one pass over the bytes); 7bit/8bit only while no line is over MAX_LINE.
local function encode_text(s, eightbit)
  -- "7bit", "8bit" (a byte over 127), "nul"; without eightbit, 8bit and nul both mean QP, so the
  -- scan stops at the first byte over 127 (a greeting's name, in the first line)
  local kind = text.kind(s, not eightbit)
  if kind == "7bit" or (kind == "8bit" and eightbit) then
    local r = text.crlf(s, MAX_LINE)
    if r then return r, kind end
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

-- an attachment's file, relative to the message's base_dir
local function read_file(path, base)
  return paths.read(path, base, "attachment")
end

-- Encoded attachment contents by raw content: a campaign attaches the same
-- file to every message.  Bounded by total size.  A file read again for
-- each message is a new string, and using it as a table key hashes all of
-- it (~1 ns a byte); so the last few contents are first compared with ==,
-- which is a memcmp() that stops at the first difference.
local b64_cache, b64_cached = {}, 0
local B64_CACHE_MAX = 64 * 1024 * 1024
local recent, RECENT_MAX = {}, 4   -- { data, encoded } in b64_cache, newest first

local function cached_base64(data)
  for i = 1, #recent do
    local r = recent[i]
    if r[1] == data then return r[2] end
  end
  local e = b64_cache[data]
  if not e then
    e = base64(data)
    if b64_cached + #e > B64_CACHE_MAX then b64_cache, b64_cached, recent = {}, 0, {} end
    if #e > B64_CACHE_MAX then return e end
    b64_cache[data], b64_cached = e, b64_cached + #e
  end
  table.insert(recent, 1, { data, e })
  recent[RECENT_MAX + 1] = nil
  return e
end

-- A part is { head = its header lines joined by CRLF, body = string,
-- eightbit = true when the body is 8bit }; multipart() parts have parts
-- and a boundary instead of a body until multipart_text().

-- Attachment heads by given content type ("" for none) and file name: a
-- campaign attaches the same files to every message.  Cleared when full.
local att_heads, natt_heads, ATT_HEADS_MAX = {}, 0, 64

-- attachment_part(a) -> part | nil, err
local function attachment_part(a, i, base)
  if type(a) ~= "table" then error("attachments[" .. i .. "] must be a table", 4) end
  local data, filename = a.data, a.filename
  if data ~= nil then
    if type(data) ~= "string" then error("attachments[" .. i .. "].data must be a string", 4) end
    if type(filename) ~= "string" then
      error("attachments[" .. i .. "] with data needs a filename", 4)
    end
  elseif type(a.path) == "string" then
    local err
    data, err = read_file(a.path, base)
    if not data then return nil, err end
    filename = filename or a.path
  else
    error("attachments[" .. i .. "] needs a path or data + filename", 4)
  end
  if type(filename) ~= "string" then error("attachments[" .. i .. "].filename must be a string", 4) end
  local given = a.content_type or ""               -- "" is not a valid type: no clash
  local head = att_heads[given] and att_heads[given][filename]
  if not head then
    local name = match(filename, "([^/\\]*)$")      -- no directories in names
    if name == "" then name = "attachment" end
    local ctype = a.content_type or guess_type(name)
    if type(ctype) ~= "string" or not find(ctype, "^[%w!#%$&%^_%.%+%-]+/[%w!#%$&%^_%.%+%-]+$") then
      error("attachments[" .. i .. "].content_type must be type/subtype", 4)
    end
    head = header_with_params("Content-Type", ctype, param("name", name)) .. CRLF
           .. header_with_params("Content-Disposition", "attachment", param("filename", name))
           .. CRLF .. "Content-Transfer-Encoding: base64"
    if natt_heads >= ATT_HEADS_MAX then att_heads, natt_heads = {}, 0 end
    att_heads[given] = att_heads[given] or {}
    att_heads[given][filename], natt_heads = head, natt_heads + 1
  end
  return { head = head, body = cached_base64(data), encoded = true }
end

local TEXT_HEAD = {}             -- [subtype][cte] -> head
for _, subtype in ipairs({ "plain", "html" }) do
  TEXT_HEAD[subtype] = {}
  for _, cte in ipairs({ "7bit", "8bit", "quoted-printable" }) do
    TEXT_HEAD[subtype][cte] = "Content-Type: text/" .. subtype .. "; charset=UTF-8" .. CRLF
                              .. "Content-Transfer-Encoding: " .. cte
  end
end

-- encoded: the body is quoted-printable or base64, where "=_" (how every boundary starts) cannot
-- occur: "=" is always followed by two hex digits or a line break, or ends base64 with "=" or a
-- line break.  multipart() does not search such a body.
local function text_part(s, subtype, eightbit)
  local body, cte = encode_text(s, eightbit)
  return { head = TEXT_HEAD[subtype][cte], body = body, eightbit = cte == "8bit", encoded = cte == "quoted-printable" }
end

-- multipart(subtype, parts) -> part, with a boundary found in none of the
-- parts.  Its body is left to multipart_text(): the top part's text is
-- written straight into the message, not copied there (attachments!).
local function multipart(subtype, parts)
  local eightbit = false
  for _, p in ipairs(parts) do eightbit = eightbit or p.eightbit end
  local boundary
  repeat
    boundary = new_boundary()
    local clash = false
    -- A part's text is its headers, CRLF CRLF, its body: the boundary has
    -- no CR or LF, so it is in the text only if it is in one of the two.
    for _, p in ipairs(parts) do
      if find(p.head, boundary, 1, true) or (not p.encoded and find(p.body, boundary, 1, true)) then
        clash = true
        break
      end
    end
  until not clash
  return {
    head = "Content-Type: multipart/" .. subtype .. ";" .. CRLF .. ' boundary="' .. boundary
           .. '"' .. CRLF .. "Content-Transfer-Encoding: " .. (eightbit and "8bit" or "7bit"),
    parts = parts, boundary = boundary, eightbit = eightbit,
  }
end

-- multipart_text(part, prefix) -> prefix .. the body of a multipart() part
local function multipart_text(part, prefix)
  local boundary, parts = part.boundary, part.parts
  local delim = CRLF .. "--" .. boundary .. CRLF
  if #parts == 2 then
    -- text + html, or a body + one attachment: one `..` copies each piece
    -- once, where table.concat copies its growing buffer several times
    return prefix .. "--" .. boundary .. CRLF .. parts[1].head .. CRLF .. CRLF .. parts[1].body
           .. delim .. parts[2].head .. CRLF .. CRLF .. parts[2].body
           .. CRLF .. "--" .. boundary .. "--" .. CRLF
  end
  local out, k = { prefix, "--" .. boundary .. CRLF }, 2
  for i, p in ipairs(parts) do
    if i > 1 then k = k + 1; out[k] = delim end
    out[k + 1], out[k + 2], out[k + 3], k = p.head, CRLF .. CRLF, p.body, k + 3
  end
  out[k + 1] = CRLF .. "--" .. boundary .. "--" .. CRLF
  return concat(out)
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

-- What build() makes of a `from` string, by string: a campaign sends every
-- message from one or a few senders.  Cleared when full.
local senders, nsenders, SENDERS_MAX = {}, 0, 16

-- sender(v) -> { mailbox =, line = From line (false if over 998), domain = }
-- | nil, err
local function sender(v)
  local s = senders[v]
  if s then return s end
  local mb, err = mailbox(v, "from", 5)      -- <- sender <- addresses <- build
  if not mb then return nil, err end
  s = { mailbox = mb, line = fold("From", format_mailboxes({ mb })) or false,
        domain = lower(match(mb.address, "@(.*)$")) }
  if type(v) == "string" then                -- a table's fields may change
    if nsenders >= SENDERS_MAX then senders, nsenders = {}, 0 end
    senders[v], nsenders = s, nsenders + 1
  end
  return s
end

local LIST_FIELDS = { "to", "cc", "bcc", "reply_to" }

-- addresses(m) -> { from=, to=, cc=, bcc=, reply_to= } (mailbox lists,
-- from a sender()) | nil, err
local function addresses(m)
  if m.from == nil then return nil, "no from address" end
  if m.to == nil then return nil, "no to address" end
  local from, err = sender(m.from)
  if not from then return nil, err end
  local a = { from = from, to = false, cc = false, bcc = false, reply_to = false }  -- sized once
  for _, field in ipairs(LIST_FIELDS) do
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
  if part.parts then part.body = multipart_text(part, "") end
  local parts = { part }
  for i, a in ipairs(list) do
    local p, err = attachment_part(a, i, m.base_dir)
    if not p then return nil, err end
    parts[#parts + 1] = p
  end
  return multipart("mixed", parts)
end

local function date_value(date)
  if date == nil or type(date) == "number" then return rfc_date(date or time()) end
  if type(date) ~= "string" then error("mime.build: date must be a string or a time number", 4) end
  date = header_text(date)
  if date == "" or find(date, "[^\32-\126]") or #date > 200 then return nil, "invalid date" end
  return date
end

local function message_id_value(mid, domain)
  if mid == nil then return new_message_id(domain) end
  if type(mid) ~= "string" then error("mime.build: message_id must be a string", 4) end
  mid = header_text(mid)
  if not find(mid, "^<.*>$") then mid = "<" .. mid .. ">" end
  if not find(mid, "^<[!-;=?-~]+@[!-;=?-~]+>$") or #mid > 250 then
    return nil, format("invalid message_id %q", mid)
  end
  return mid
end

-- The Subject line; the last one is kept: campaigns often send one subject.
local last_subject, last_subject_line
local function subject_line(s)
  if s ~= last_subject then
    last_subject_line = assert(fold("Subject", encode_header(s, 9)))
    last_subject = s
  end
  return last_subject_line
end

local last_date, last_date_line

-- header_lines(m, a, part) -> list of header lines, message id | nil, err
local function header_lines(m, a, part)
  local date, err = date_value(m.date)
  if not date then return nil, err end
  local mid
  mid, err = message_id_value(m.message_id, a.from.domain)
  if not mid then return nil, err end
  if date ~= last_date then last_date, last_date_line = date, "Date: " .. date end
  -- nils: room for the usual 8 lines without a resize (# is still 2)
  local h = { last_date_line, a.from.line, nil, nil, nil, nil, nil, nil }
  local ok = a.from.line and address_header("To", a.to, h)
             and (not a.cc or address_header("Cc", a.cc, h))
             and (not a.reply_to or address_header("Reply-To", a.reply_to, h))
  if not ok then return nil, "address header too long" end
  if m.subject then h[#h + 1] = subject_line(m.subject) end
  h[#h + 1] = "Message-ID: " .. mid
  h[#h + 1] = "MIME-Version: 1.0"
  h[#h + 1] = part.head
  ok, err = extra_headers(m.headers, h)
  if not ok then return nil, err end
  return h, mid
end

-- Append the addresses of list (may be nil) not yet seen (any case).
local function add_recipients(list, seen, out)
  if not list then return end
  for _, mb in ipairs(list) do
    local key = lower(mb.address)
    if not seen[key] then seen[key] = true; out[#out + 1] = mb.address end
  end
end

-- mime.build(m) -> data, info | nil, err
-- The fields of m and info are listed in README.md, "Lua API reference".
function M.build(m)
  if type(m) ~= "table" then error("mime.build: expected a table", 2) end
  local text, html = check_string(m, "text"), check_string(m, "html")
  check_string(m, "subject")
  check_string(m, "base_dir")
  if text == nil and html == nil then error("mime.build: message needs text or html", 2) end
  local a, err = addresses(m)
  if not a then return nil, err end
  local part
  part, err = body_part(m, text, html)
  if not part then return nil, err end
  local h, mid = header_lines(m, a, part)
  if not h then return nil, mid end

  -- one concatenation: the body is copied once
  local body, data = part.body, nil
  if part.parts then
    data = multipart_text(part, concat(h, CRLF) .. CRLF .. CRLF)     -- ends with CRLF
  elseif body ~= "" and sub(body, -2) ~= CRLF then
    data = concat(h, CRLF) .. CRLF .. CRLF .. body .. CRLF
  else
    data = concat(h, CRLF) .. CRLF .. CRLF .. body
  end

  local recipients
  if #a.to == 1 and not a.cc and not a.bcc then
    recipients = { a.to[1].address }
  else
    local seen = {}
    recipients = {}
    add_recipients(a.to, seen, recipients)
    add_recipients(a.cc, seen, recipients)
    add_recipients(a.bcc, seen, recipients)
  end
  return data, {
    message_id = mid, size = #data, envelope_from = a.from.mailbox.address,
    recipients = recipients, eightbit = part.eightbit or false,
  }
end

return M
