-- mailshot.bounce: read one returned message (a bounce, a complaint, an auto-reply) and classify it.
--
--   local bounce = require "mailshot.bounce"
--   local b = bounce.parse(raw, { max_bytes = 10 * 1024 * 1024 })
--   local class, rule = bounce.classify(b)          -- "hard", "soft", "policy", "complaint", "autoreply", "unknown"
--
-- parse() never raises on what a mailbox may hold (malformed MIME, missing boundaries, deep nesting, binary
-- garbage, huge lines, a message of any size): a message it cannot read is b.kind = "unparsed" with b.error.
-- It is a small MIME reader for one message, bounded everywhere:
--   * only the first opts.max_bytes (default 10 MB) are read; the rest is ignored (b.truncated = true), so
--     the headers and the early parts of a huge message still parse;
--   * multipart nesting deeper than MAX_DEPTH and parts past MAX_PARTS are not opened (b.warnings says so);
--   * a header block is read up to MAX_HEADER_BYTES, a text part decoded up to MAX_TEXT bytes (what a
--     DSN's human part or a delivery-status part needs; attachments are never decoded).
-- Kinds (b.kind), in the order they are tried:
--   "dsn"       RFC 3464 multipart/report; report-type=delivery-status (message/delivery-status or RFC 6533
--               message/global-delivery-status, even base64-encoded): b.recipients, b.reporting_mta, ...
--   "arf"       RFC 5965 multipart/report; report-type=feedback-report: b.feedback
--   "autoreply" RFC 3834 Auto-Submitted: auto-replied, X-Autoreply, X-Autorespond, Precedence: auto_reply,
--               or (for a message that does not look like a bounce) a vacation subject in several languages
--   "guessed"   no report part, but the message looks like a bounce (From MAILER-DAEMON/postmaster, an empty
--               Return-Path, a bounce subject, X-Failed-Recipients) and its text names a failed address
--               and/or an SMTP reply ("550 5.1.1", "said: 550 ...", qmail's "(#5.1.1)", ...)
--   "unparsed"  looks like a bounce but names no recipient nor any status, or could not be read (b.error)
--   "other"     anything else (a person's reply, a newsletter): not a bounce
-- The fields of b and the default rules are listed in README.md, "Bounces: mailshot.bounce".

local string, table, type, tostring, error, ipairs, pairs, pcall, tonumber, math, next, select, utf8 =
      string, table, type, tostring, error, ipairs, pairs, pcall, tonumber, math, next, select, utf8
local find, sub, lower, gsub, match, gmatch, byte, char, rep =
      string.find, string.sub, string.lower, string.gsub, string.match, string.gmatch,
      string.byte, string.char, string.rep
local concat = table.concat

local M = {}

local DEFAULT_MAX_BYTES = 10 * 1024 * 1024
local MAX_DEPTH = 20                -- multipart/message nesting opened (a DSN needs 2 or 3)
local MAX_PARTS = 200               -- MIME parts opened in one message
local MAX_HEADER_BYTES = 256 * 1024 -- one header block; the rest of a longer block is skipped
local MAX_HEADER_LINES = 2000       -- header fields kept from one block
local MAX_TEXT = 256 * 1024         -- bytes of a text part decoded for reading (guessing, DSN fields)
local MAX_RECIPIENTS = 1000         -- per-recipient groups kept from one DSN or guessed from one text
local MAX_DIAGNOSTIC = 1000         -- bytes kept of a diagnostic text
M.limits = {
  max_bytes = DEFAULT_MAX_BYTES, depth = MAX_DEPTH, parts = MAX_PARTS, header_bytes = MAX_HEADER_BYTES,
  text = MAX_TEXT, recipients = MAX_RECIPIENTS,
}

---------------------------------------------------------------- small helpers

-- Lua patterns backtrack: "(.-)%s*$" or "%w+@" over a long run of blanks or letters is quadratic.  Hostile
-- input has such runs, so the helpers below scan with anchored or literal searches only.
local function trim(s)
  local i = find(s, "[^ \t\r\n]")
  if not i then return "" end
  local j = #s
  local c = byte(s, j)
  while c == 32 or c == 9 or c == 13 or c == 10 do j = j - 1; c = byte(s, j) end
  return sub(s, i, j)
end

local LOCAL_CHARS = "[%w.!#$%%&'*+/=?^_`{|}~%-]"
local LOCAL_PART = LOCAL_CHARS .. "+$"
local LOCAL_CHAR_AT = "^" .. LOCAL_CHARS
local DOMAIN = "^[%w%-]+%.[%w.%-]*%w"
local DOMAIN_LABELS = "^[%w%-]+[%w.%-]*"

-- The addresses in s (local@domain.tld), found from each "@": at most 64 octets before it, 255 after
-- (RFC 5321 limits), so a long run costs no more than its length.  f(address, start) for each.
local function each_address(s, f, loose)
  local pos = 1
  while true do
    local at = find(s, "@", pos, true)
    if not at then return end
    local lp, dom
    if find(s, LOCAL_CHAR_AT, at - 1) and find(s, "^[%w%-]", at + 1) then      -- cheap test first
      lp = match(sub(s, at > 64 and at - 64 or 1, at - 1), LOCAL_PART)
      dom = match(sub(s, at + 1, at + 255), loose and DOMAIN_LABELS or DOMAIN)
    end
    if lp then lp = match(lp, "^['`.]*(.*)$") end        -- quoted in text: 'a@b', `a@b`
    if lp and lp ~= "" and dom then
      if f(lp .. "@" .. dom, at - #lp) then return end
    end
    pos = at + 1
  end
end

local function cap(s, n)
  if #s > n then return sub(s, 1, n) end
  return s
end

-- The bare address of an address header or DSN field: "<a@b>" / "Name <a@b>" / "a@b (c)" / "rfc822; a@b".
local function bare_address(v)
  if not v then return nil end
  local a = match(v, "<([^<>]*)>")
  if a and #a > 320 then a = nil end
  if not a or a == "" then
    each_address(v, function(x) a = x; return true end, true)
  end
  if not a then
    a = trim(v)
    if a == "" or #a > 320 or find(a, "[%s<>]") then return nil end
  end
  return a
end

---------------------------------------------------------------- decoders

local B64 = {}
do
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  for i = 1, 64 do B64[sub(alphabet, i, i)] = i - 1 end
end

local function b64_quad(q)
  local a, b, c, d = B64[sub(q, 1, 1)], B64[sub(q, 2, 2)], B64[sub(q, 3, 3)], B64[sub(q, 4, 4)]
  local n = (a << 18) | (b << 12) | (c << 6) | d
  return char(n >> 16, (n >> 8) & 255, n & 255)
end

-- base64 as mail has it: line breaks and junk ignored, missing padding tolerated, stops at "=".
local function base64_decode(s)
  s = gsub(s, "[^A-Za-z0-9+/=]", "")
  local pad = find(s, "=", 1, true)
  if pad then s = sub(s, 1, pad - 1) end
  local whole = #s - #s % 4
  local out = gsub(sub(s, 1, whole), "....", b64_quad)
  local rest = sub(s, whole + 1)
  if #rest >= 2 then
    local q = b64_quad(rest .. rep("A", 4 - #rest))
    out = out .. sub(q, 1, #rest - 1)
  end
  return out
end
M.base64_decode = base64_decode

local function hexbyte(h) return char(tonumber(h, 16)) end

local function qp_decode(s)
  s = gsub(s, "[ \t]+(\r?\n)", "%1")       -- trailing blanks are transport padding
  s = gsub(s, "=\r?\n", "")                -- soft line breaks
  return (gsub(s, "=(%x%x)", hexbyte))
end
M.qp_decode = qp_decode

-- Latin-1 (and the printable part of windows-1252 that Latin-1 shares) to UTF-8.
local function latin1_to_utf8(s)
  return (gsub(s, "[\128-\255]", function(c)
    local n = byte(c)
    return char(0xC0 | (n >> 6), 0x80 | (n & 0x3F))
  end))
end

local function to_utf8(s, charset)
  charset = lower(charset or "")
  if charset == "iso-8859-1" or charset == "latin1" or charset == "iso-8859-15" or charset == "windows-1252"
     or charset == "cp1252" then
    return latin1_to_utf8(s)
  end
  return s        -- UTF-8, US-ASCII, or a charset we keep as its bytes (display only)
end

-- RFC 2047 encoded-words in an unstructured header (for display): =?charset?B|Q?text?=; the blanks between
-- two adjacent encoded-words go.
local function decode_words(s)
  if not find(s, "=?", 1, true) then return s end
  s = gsub(s, "(%?=)[ \t\r\n]+(=%?)", "%1%2")
  return (gsub(s, "=%?([^?%s]+)%?([BbQq])%?([^?%s]*)%?=", function(charset, enc, text)
    charset = match(charset, "^[^*]*")               -- RFC 2231 language suffix
    local bytes
    if enc == "B" or enc == "b" then
      bytes = base64_decode(text)
    else
      bytes = gsub(gsub(text, "_", " "), "=(%x%x)", hexbyte)
    end
    return to_utf8(bytes, charset)
  end))
end
M.decode_words = decode_words

---------------------------------------------------------------- headers

-- Header block raw[s .. e] -> list of { name (lower-case), value (unfolded) }, map lower name -> first value.
local function parse_headers(raw, s, e, warn)
  local list, map = {}, {}
  if e - s + 1 > MAX_HEADER_BYTES then
    e = s + MAX_HEADER_BYTES - 1
    warn("header block over " .. MAX_HEADER_BYTES .. " bytes: the rest of it skipped")
  end
  if e < s then return list, map end
  local block = sub(raw, s, e)
  local name, parts = nil, nil
  local function flush()
    if name then
      local v = trim(concat(parts, " "))
      list[#list + 1] = { name = name, value = v }
      if map[name] == nil then map[name] = v end
    end
    name = nil
  end
  local lines = 0
  for line in gmatch(block, "([^\n]*)\n?") do
    if #list >= MAX_HEADER_LINES then
      warn("more than " .. MAX_HEADER_LINES .. " header fields: the rest skipped")
      break
    end
    lines = lines + 1
    if sub(line, -1) == "\r" then line = sub(line, 1, -2) end
    local c = byte(line, 1)
    if c == 32 or c == 9 then
      if name then parts[#parts + 1] = trim(line) end        -- folded continuation
    elseif line ~= "" then
      flush()
      local n, v = match(line, "^([!-9;-~]+)[ \t]*:(.*)$")
      if n then
        name, parts = lower(n), { v }
      end                                                     -- a line without a colon is dropped
    end
  end
  flush()
  return list, map
end
M.parse_headers = function(text)
  local list, map = parse_headers(text, 1, #text, function() end)
  return map, list
end

-- "type/subtype; a=b; c="d"" -> "type/subtype", { a = "b", c = "d" }
local function content_type(v)
  if not v then return "text/plain", {} end
  local t = lower(match(v, "^%s*([^;%s]*)") or "")
  if not find(t, "^[%w!#$&^_.+%-]+/[%w!#$&^_.+%-]+$") then t = "text/plain" end
  local params = {}
  local rest = match(v, "^[^;]*;(.*)$") or ""
  local i, n = 1, #rest
  local guard = 0
  while i <= n and guard < 100 do
    guard = guard + 1
    local ns, ne, pname = find(rest, "^[%s;]*([^=%s;]+)%s*=%s*", i)
    if not ns then break end
    pname = lower(pname)
    local value
    if sub(rest, ne + 1, ne + 1) == '"' then
      local j, buf = ne + 2, {}
      while j <= n do
        local c = sub(rest, j, j)
        if c == "\\" then buf[#buf + 1] = sub(rest, j + 1, j + 1); j = j + 2
        elseif c == '"' then j = j + 1; break
        else buf[#buf + 1] = c; j = j + 1 end
      end
      value, i = concat(buf), j
    else
      local vs, ve = find(rest, "^[^;%s]*", ne + 1)
      value, i = sub(rest, vs, ve), ve + 1
    end
    local base = match(pname, "^(.-)%*$")                     -- RFC 2231 name*=charset'lang'value
    if base then
      value = gsub(match(value, "^[^']*'[^']*'(.*)$") or value, "%%(%x%x)", hexbyte)
      pname = base
    end
    if params[pname] == nil then params[pname] = value end
  end
  return t, params
end

---------------------------------------------------------------- MIME structure

-- An entity is raw[s .. e]: { headers (map), list, ctype, params, bs, be (its body), parts = {...} }.
-- Bodies are positions in the one raw string: nothing is copied while the structure is read.

-- The end of the header block starting at s: hs_end (last header byte), body start.  The search is
-- made in a copy of at most MAX_HEADER_BYTES: a search in raw would run to its end for each part that has
-- no blank line (200 such parts in 10 MB took 20 s).  A header block longer than that has no body.
local function split_head(raw, s, e, warn)
  -- an entity that starts with its blank line has no headers
  local c = byte(raw, s)
  if c == 10 then return s - 1, s + 1 end
  if c == 13 and byte(raw, s + 1) == 10 then return s - 1, s + 2 end
  -- most header blocks end within 8 kB: look there first, then in the whole allowance
  local last = math.min(e, s + 8192)
  local i, j = find(sub(raw, s, last), "\n\r?\n")
  if not i and last < e then
    last = math.min(e, s + MAX_HEADER_BYTES + 2)
    i, j = find(sub(raw, s, last), "\n\r?\n")
  end
  if not i then
    if last < e and warn then warn("header block over " .. MAX_HEADER_BYTES .. " bytes: the entity's body skipped") end
    return e, e + 1
  end
  return s + i - 2, s + j
end

-- The parts of a multipart body raw[bs .. be] with this boundary: list of { s, e }.
local function split_multipart(raw, bs, be, boundary, ctx)
  local delim = "--" .. boundary
  local parts, pos, start = {}, bs, nil
  local closed = false
  while true do
    local i = find(raw, delim, pos, true)
    if not i or i > be then break end
    local after = i + #delim
    if (i == bs or byte(raw, i - 1) == 10) and
       (find(raw, "^[ \t\r]*\n", after) or find(raw, "^%-%-", after) or after > be) then
      if start then
        local pe = i - 2                                       -- the line break before belongs to it
        if byte(raw, pe) == 13 then pe = pe - 1 end
        parts[#parts + 1] = { start, math.min(pe, be) }
      end
      if sub(raw, after, after + 1) == "--" then closed = true; break end
      if ctx.parts + #parts >= MAX_PARTS then
        ctx.warn("more than " .. MAX_PARTS .. " MIME parts: the rest not opened")
        start = nil
        break
      end
      local nl = find(raw, "\n", after, true)
      if not nl or nl > be then start = nil; break end
      start, pos = nl + 1, nl + 1
    else
      pos = i + 1
    end
  end
  if not closed and start and start <= be then
    parts[#parts + 1] = { start, be }                         -- no closing delimiter: up to the end
    ctx.warn("multipart without its closing boundary")
  end
  return parts
end

local parse_entity

local function open_children(node, raw, depth, ctx)
  local major = match(node.ctype, "^([^/]*)")
  if major == "multipart" then
    local boundary = node.params.boundary
    if not boundary or boundary == "" or #boundary > 200 then
      ctx.warn("multipart without a boundary")
      return
    end
    if depth >= MAX_DEPTH then ctx.warn("MIME nesting deeper than " .. MAX_DEPTH .. ": not opened"); return end
    local parts
    local size = node.be - node.bs + 1
    if #raw - node.be > 4 * size + 65536 then
      -- a small multipart early in a big message: a boundary that is not in it would be searched for to
      -- the end of raw; search a copy of it instead (the copies of siblings add up to raw's size at most)
      parts = split_multipart(sub(raw, node.bs, node.be), 1, size, boundary, ctx)
      for _, p in ipairs(parts) do p[1], p[2] = p[1] + node.bs - 1, p[2] + node.bs - 1 end
    else
      parts = split_multipart(raw, node.bs, node.be, boundary, ctx)
    end
    node.parts = {}
    for _, p in ipairs(parts) do
      if ctx.parts >= MAX_PARTS then ctx.warn("more than " .. MAX_PARTS .. " MIME parts: the rest not opened"); break end
      ctx.parts = ctx.parts + 1
      node.parts[#node.parts + 1] = parse_entity(raw, p[1], p[2], depth + 1, ctx)
    end
  elseif node.ctype == "message/rfc822" or node.ctype == "message/global" then
    if depth >= MAX_DEPTH then ctx.warn("MIME nesting deeper than " .. MAX_DEPTH .. ": not opened"); return end
    local cte = lower(node.headers["content-transfer-encoding"] or "")
    if cte == "base64" or cte == "quoted-printable" then
      -- rare, but allowed for message/global: decode (bounded) and read that
      local text = ctx.decode(node)
      if ctx.parts < MAX_PARTS then
        ctx.parts = ctx.parts + 1
        node.message = parse_entity(text, 1, #text, depth + 1, ctx)
        node.message.raw = text
      end
    elseif ctx.parts < MAX_PARTS then
      ctx.parts = ctx.parts + 1
      node.message = parse_entity(raw, node.bs, node.be, depth + 1, ctx)
    end
  end
end

function parse_entity(raw, s, e, depth, ctx)
  local he, bs = split_head(raw, s, e, ctx.warn)
  local list, map = parse_headers(raw, s, he, ctx.warn)
  local ctype, params = content_type(map["content-type"])
  local node = { headers = map, list = list, ctype = ctype, params = params, bs = bs, be = e, raw = raw }
  open_children(node, raw, depth, ctx)
  return node
end

-- The decoded body of a leaf, at most MAX_TEXT bytes of it.
local function decode_body(node)
  local raw = node.raw
  local be = node.be
  local cte = lower(match(node.headers["content-transfer-encoding"] or "", "^%s*([^%s;]*)") or "")
  if cte == "base64" then
    -- 4 encoded bytes per 3: read a little more than needed, then cut
    local stop = math.min(be, node.bs + (MAX_TEXT // 3) * 4 + MAX_TEXT // 38 + 4)
    return cap(base64_decode(sub(raw, node.bs, stop)), MAX_TEXT)
  end
  local text = sub(raw, node.bs, math.min(be, node.bs + MAX_TEXT - 1))
  if cte == "quoted-printable" then return qp_decode(text) end
  return text
end

-- Depth-first search for the first node satisfying pred.
local function find_node(node, pred, depth)
  depth = depth or 0
  if depth > MAX_DEPTH + 2 then return nil end
  if pred(node) then return node end
  for _, p in ipairs(node.parts or {}) do
    local f = find_node(p, pred, depth + 1)
    if f then return f end
  end
  return nil
end

---------------------------------------------------------------- report parts

-- A delivery-status body -> groups (each a map lower field name -> value), separated by blank lines.
local function field_groups(text)
  text = gsub(text, "\r\n", "\n")
  local groups = {}
  local s = 1
  local n = #text
  while s <= n and #groups <= MAX_RECIPIENTS do
    local i, j = find(text, "\n[ \t]*\n", s)
    local block = sub(text, s, (i or n + 1) - 1)
    if find(block, "%S") then
      local _, map = parse_headers(block, 1, #block, function() end)
      if next(map) then groups[#groups + 1] = map end
    end
    if not i then break end
    s = j + 1
  end
  return groups
end

-- RFC 6533 utf-8-addr-xtext / unitext: "\x{HHHH}" stands for one code point.
local function unescape_unicode(s)
  return (gsub(s, "\\x{(%x+)}", function(h)
    local cp = tonumber(h, 16)
    if not cp or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return "\239\191\189" end
    return utf8.char(cp)
  end))
end

-- "rfc822; a@b" -> "a@b" (any address type; \x{} decoded for utf-8).  No xtext decoding: MTAs write
-- the address as is, and "+HH" is common in plus-addresses (bob+dec@example.org).
local function typed_address(v)
  if not v then return nil end
  local typ, addr = match(v, "^%s*([%w%-]+)%s*;(.*)$")
  if typ then addr = trim(addr) else addr = trim(v); typ = "rfc822" end
  typ = lower(typ)
  if typ == "utf-8" then addr = unescape_unicode(addr) end
  addr = match(addr, "^<(.*)>$") or addr
  if addr == "" then return nil end
  return addr
end

-- "dns; mx.example.com" / "smtp; 550 5.1.1 ..." -> the text after the type.
local function typed_text(v)
  if not v then return nil end
  return trim(match(v, "^%s*[%w%-]+%s*;(.*)$") or v)
end

local STATUS = "([245]%.%d%d?%d?%.%d%d?%d?)"

-- An RFC 3463 code in text, not part of a longer dotted number (an IP address, a version).
local function find_status(text)
  if not text then return nil end
  local pos = 1
  while true do
    local s, e, code = find(text, STATUS, pos)
    if not s then return nil end
    local before, after = sub(text, s - 1, s - 1), sub(text, e + 1, e + 1)
    if (s == 1 or not find(before, "[%d.]")) and not find(after, "^[%d]") and
       not (after == "." and find(text, "^%.%d", e + 1)) then
      return code, s
    end
    pos = s + 1
  end
end
M.find_status = find_status

local function recipient_from(g)
  local diag = g["diagnostic-code"]
  local status = g.status and match(g.status, "^%s*([245]%.%d+%.%d+)")
  local r = {
    address = typed_address(g["final-recipient"]) or typed_address(g["original-recipient"]),
    original = typed_address(g["original-recipient"]),
    action = g.action and lower(match(g.action, "^%s*([%w%-]+)") or "") or nil,
    status = status,
    diagnostic = diag and cap(unescape_unicode(typed_text(diag)), MAX_DIAGNOSTIC) or nil,
    remote_mta = typed_text(g["remote-mta"]),
    last_attempt = g["last-attempt-date"],
    will_retry_until = g["will-retry-until"],
  }
  -- the Status field is the DSN's word, but some MTAs (Exim) always write X.0.0 there and quote the
  -- remote server's precise code in the diagnostic: take that one then (same class), keeping the field's
  local quoted = r.diagnostic and find_status(r.diagnostic)
  if not r.status then
    r.status = quoted
  elseif quoted and find(r.status, "^%d%.0%.0$") and sub(quoted, 1, 1) == sub(r.status, 1, 1) then
    r.dsn_status, r.status = r.status, quoted
  end
  if r.diagnostic then
    local code = match(r.diagnostic, "^%s*([2-5]%d%d)[%s%-]")
    r.smtp_code = code
  end
  return r
end

local function read_delivery_status(b, node)
  local groups = field_groups(decode_body(node))
  local first = groups[1] or {}
  local start = 1
  if first["final-recipient"] or first["original-recipient"] then
    start = 1                                    -- no per-message group (seen from a few MTAs)
  else
    start = 2
    b.reporting_mta = typed_text(first["reporting-mta"])
    b.arrival_date = first["arrival-date"]
    b.received_from_mta = typed_text(first["received-from-mta"])
    b.original_envelope_id = first["original-envelope-id"]
  end
  for k = start, #groups do
    local g = groups[k]
    -- a group that names no address (a torn or garbled report) tells nothing we could act on
    if (g["final-recipient"] or g["original-recipient"]) and #b.recipients < MAX_RECIPIENTS then
      local r = recipient_from(g)
      if r.address then b.recipients[#b.recipients + 1] = r end
    end
  end
end

local function read_feedback(b, node)
  local text = decode_body(node)
  local list, map = parse_headers(text, 1, #text, function() end)
  local f = { fields = map }
  f.type = map["feedback-type"] and lower(trim(map["feedback-type"])) or nil
  f.user_agent = map["user-agent"]
  f.version = map["version"]
  f.original_rcpt_to = bare_address(map["original-rcpt-to"])
  f.original_mail_from = bare_address(map["original-mail-from"])
  f.arrival_date = map["arrival-date"] or map["received-date"]
  f.source_ip = map["source-ip"]
  f.reporting_mta = typed_text(map["reporting-mta"])
  f.reported_domain = map["reported-domain"]
  f.reported_uri = map["reported-uri"]
  f.incidents = map["incidents"] and tonumber(match(map["incidents"], "%d+")) or nil
  f.authentication_results = map["authentication-results"]
  local rcpts = {}
  for _, h in ipairs(list) do
    if h.name == "original-rcpt-to" then rcpts[#rcpts + 1] = bare_address(h.value) end
  end
  f.original_rcpt_tos = rcpts
  b.feedback = f
end

-- The original message's headers (a map) -> b.original.
local function original_from(map)
  return {
    message_id = map["message-id"] and trim(map["message-id"]) or nil,
    from = bare_address(map["from"]),
    to = bare_address(map["to"]),
    return_path = map["return-path"] and (match(map["return-path"], "<([^>]*)>") or trim(map["return-path"])) or nil,
    subject = map["subject"] and decode_words(map["subject"]) or nil,
    date = map["date"],
    headers = map,
  }
end

local function is_original_part(n)
  return n.ctype == "message/rfc822" or n.ctype == "message/global" or n.ctype == "text/rfc822-headers"
         or n.ctype == "message/global-headers" or n.ctype == "message/rfc822-headers"
end

local function read_original(b, node, ctx)
  if node.message then
    b.original = original_from(node.message.headers)
  else
    local text = decode_body(node)
    local he = select(1, split_head(text, 1, #text))
    local _, map = parse_headers(text, 1, he, ctx.warn)
    if next(map) then b.original = original_from(map) end
  end
end

---------------------------------------------------------------- auto-replies and non-standard bounces

-- RFC 3834 and the de-facto headers.  X-Auto-Response-Suppress is Microsoft's request NOT to auto-reply
-- (Outlook sets it on many ordinary messages): it says nothing about the message itself.
local function autoreply_header(h)
  local as = h["auto-submitted"] and lower(h["auto-submitted"])
  if as and find(as, "^%s*auto%-replied") then return "Auto-Submitted: auto-replied" end
  if h["x-autoreply"] and not find(lower(h["x-autoreply"]), "^%s*no") then return "X-Autoreply" end
  if h["x-autorespond"] then return "X-Autorespond" end
  if h["x-autoresponder"] then return "X-Autoresponder" end
  local prec = h["precedence"] and lower(h["precedence"])
  if prec and find(prec, "auto[_%-]reply") then return "Precedence: auto_reply" end
  return nil
end

-- Vacation subjects, lower-case (UTF-8 as decoded from RFC 2047); matched anywhere in the subject.
M.vacation_subjects = {
  "out of office", "out of the office", "automatic reply", "auto%-reply", "autoreply", "auto reply",
  "^auto:", "on vacation", "^vacation", "away from the office", "away from my desk",
  "abwesenheitsnotiz", "automatische antwort", "abwesend", "nicht im büro", "außer haus",
  "réponse automatique", "reponse automatique", "absence du bureau", "absent du bureau",
  "respuesta automática", "respuesta automatica", "fuera de la oficina", "fuera de oficina",
  "risposta automatica", "fuori ufficio", "assente", "automatisch antwoord", "afwezig",
  "resposta automática", "ausente", "automatiskt svar", "frånvaro", "automatisk svar", "autosvar",
  "автоответ", "нет на месте", "自動応答", "自动回复",
}

local function vacation_subject(s)
  if not s then return nil end
  s = lower(sub(s, 1, 1000))
  for _, p in ipairs(M.vacation_subjects) do
    if find(s, p) then return p end
  end
  return nil
end

-- Bounce subjects of the common MTAs and providers (lower-case, matched anywhere).
M.bounce_subjects = {
  "undeliver", "undelivered mail", "delivery status notification", "returned mail", "mail delivery failed",
  "delivery failure", "failure notice", "delivery has failed", "could not be delivered", "not delivered",
  "mail delivery system", "delivery notification", "nondeliverable", "non%-delivery", "unzustellbar",
  "nicht zustellbar", "non remis", "message non délivré", "no se puede entregar", "non recapitabile",
  "warning: message .* delayed", "delayed mail", "delivery delayed", "mail system error",
  "returned to sender",
}

local function looks_like_bounce(b, autoreply)
  local from = lower(b.headers["from"] or "")
  if find(from, "mailer%-daemon") or find(from, "postmaster@") or find(from, "mail delivery subsystem")
     or find(from, "mail delivery system") then
    return "from"
  end
  if b.return_path == "" and not autoreply then return "null return path" end
  if b.headers["x-failed-recipients"] then return "X-Failed-Recipients" end
  local s = lower(sub(b.subject or "", 1, 1000))
  for _, p in ipairs(M.bounce_subjects) do
    if find(s, p) then return "subject" end
  end
  return nil
end

-- Where a single-part bounce starts quoting the original (qmail, Exim, Postfix without DSN, Sendmail).
local COPY_MARKERS = {
  "\n%-%-%- Below this line is a copy of the message%.",
  "\n%-+ This is a copy of the message, including all the headers%. %-+",
  "\n%-+ The header of the original message is following%. %-+",
  "\n%-+ Original message follows %-+",
  "\n%-+ Original Message %-+",
  "\n%-+Original message%-+",
  "\n%-+ Returned message %-+",
  "\n%-+ Message header follows %-+",
  "\n%-+ The message header follows %-+",
  "\nOriginal message headers:",                            -- Exchange
}


local BASIC_CODE_PATTERNS = {
  "^[ \t>]*([45][0-5]%d)[ %-:]",        -- a reply line:  550 5.1.1 ..., 550-..., 554: delivery error
  "said:%s*([45][0-5]%d)[ %-]",          -- Postfix/Sendmail: host x said: 550 ...
  "returned '([45][0-5]%d)[ %-]",        -- Exchange: Remote Server returned '550 5.1.1 ...'
  "error:%s*([45][0-5]%d)[ %-]",
  "reason:%s*([45][0-5]%d)[ %-]",        -- Sendmail: (reason: 550 5.1.1 ...)
  "smtp;%s*([45][0-5]%d)[ %-]",          -- a Diagnostic-Code line read as text
  "#([45][0-5]%d)[ %-]",
}

local function basic_code(line)
  for _, p in ipairs(BASIC_CODE_PATTERNS) do
    local c = match(line, p)
    if c then return c end
  end
  return nil
end

-- Recipients named in a bounce's text: each status or SMTP reply found goes to the nearest address
-- before it (on the same line first), or, when none came yet, to the next one.
local function guess_recipients(text, excluded, failed_header)
  text = gsub(text, "\r\n", "\n")
  local found, by_addr = {}, {}
  local last_addr, pending = nil, nil
  local function add(addr, status, code, line)
    local key = lower(addr)
    local r = by_addr[key]
    if not r then
      if #found >= MAX_RECIPIENTS then return end
      r = { address = addr }
      by_addr[key] = r
      found[#found + 1] = r
    end
    if status and not r.status then r.status = status end
    if code and not r.smtp_code then r.smtp_code = code end
    if line and not r.diagnostic then r.diagnostic = cap(trim(line), MAX_DIAGNOSTIC) end
  end
  for _, a in ipairs(failed_header) do add(a) end
  local lines = 0
  for line in gmatch(text, "([^\n]*)\n?") do
    lines = lines + 1
    if lines > 5000 then break end
    local first_here
    each_address(line, function(a)
      local la = lower(a)
      if not excluded[la] and not find(la, "^mailer%-daemon@") and not find(la, "^postmaster@") then
        first_here = first_here or a
        last_addr = a
      end
    end)
    if pending and first_here then
      add(first_here, pending.status, pending.code, pending.line)
      pending = nil
    end
    -- an address alone on its line ("  a@b", "<a@b>:"): the list of failed addresses of Exim, qmail,
    -- Sendmail; kept when the text says whether the failure is permanent or temporary
    if first_here and #line <= #first_here + 40 then
      local t = trim(line)
      if #t <= #first_here + 3 and find(t, first_here, 1, true) and not find(t, "[^<>:]", #first_here + 1)
         and (t == first_here or sub(t, 1, 1) == "<") then
        add(first_here)
      end
    end
    local status, at = find_status(line)
    local code = basic_code(line)
    -- a dotted number in running text ("version 5.1.2") is no status: one counts only beside a reply
    -- code, at the start of a line, after "#" or "(" (qmail, Exchange), or after "Status:"
    if status and not code then
      local before = lower(sub(line, at > 40 and at - 40 or 1, at - 1))
      local reply = match(before, "%f[%d]([45]%d%d)[ %-]$")    -- "addr: 550 5.1.1", "550-5.1.1"
      if reply then
        code = reply
      elseif not (find(before, "^[%s>]*$") and at <= 41 or find(before, "[#(]%s*$") or find(before, "status:?%s*$")) then
        status = nil
      end
    end
    if status or code then
      local target = first_here or last_addr
      if target then
        add(target, status, code, line)
      elseif not pending then
        pending = { status = status, code = code, line = line }
      end
    end
  end
  -- a lone status with no address, and X-Failed-Recipients naming one: it is that one's
  if pending and #found == 1 then
    local r = found[1]
    r.status = r.status or pending.status
    r.smtp_code = r.smtp_code or pending.code
    r.diagnostic = r.diagnostic or cap(trim(pending.line), MAX_DIAGNOSTIC)
  end
  -- an address without a reply (Exim's "  addr\n    Unrouteable address"): the next line says why, and
  -- the text whether it is permanent
  local lt = lower(text)
  local permanent_text = find(lt, "permanent error") or find(lt, "permanent fatal") or find(lt, "given up")
                         or find(lt, "failed permanently") or find(lt, "permanently failed")
  local temporary_text = find(lt, "not yet been delivered") or find(lt, "will continue") or find(lt, "still trying")
                         or find(lt, "will be retried") or find(lt, "will keep trying") or find(lt, "temporary error")
  for _, r in ipairs(found) do
    if not r.status and not r.smtp_code then
      local s, e = find(text, r.address, 1, true)
      if s then
        local nl = find(text, "\n", e, true)
        local nextline = nl and match(text, "^[ \t]*([^\n]*%S)", nl + 1)
        if nextline and not find(nextline, "@", 1, true) then r.diagnostic = cap(trim(nextline), MAX_DIAGNOSTIC) end
      end
      if permanent_text then r.status = "5.0.0" elseif temporary_text then r.status = "4.0.0" end
    end
    if not r.status and r.smtp_code then r.status = sub(r.smtp_code, 1, 1) .. ".0.0" end
    if r.status then
      local c = sub(r.status, 1, 1)
      r.action = c == "5" and "failed" or c == "4" and "delayed" or c == "2" and "delivered" or nil
    end
  end
  -- keep the addresses that came with a status; X-Failed-Recipients ones always
  local keep, failed = {}, {}
  for _, a in ipairs(failed_header) do failed[lower(a)] = true end
  for _, r in ipairs(found) do
    if r.status or failed[lower(r.address)] then keep[#keep + 1] = r end
  end
  return keep
end

local function guess(b, root, ctx)
  -- the human-readable text: the first text/plain part outside any attached message, else the body
  local node = find_node(root, function(n) return n.ctype == "text/plain" and not n.parts end)
  if not node then
    node = find_node(root, function(n) return n.ctype == "text/html" end)
  end
  if not node and not root.parts then node = root end     -- a multipart that could not be opened: its body
  local text = node and decode_body(node) or ""
  if node and node.ctype == "text/html" then
    -- "<[^<>]*>", not "<[^>]*>": a run of "<" without ">" would make the latter quadratic
    text = gsub(gsub(text, "<[Bb][Rr]%s*/?>", "\n"), "<[^<>]*>", "")
    text = gsub(text, "&lt;", "<"); text = gsub(text, "&gt;", ">"); text = gsub(text, "&amp;", "&")
    text = gsub(text, "&nbsp;", " ")
  end
  -- a copy of the original quoted inline: read its headers as b.original, and keep it out of the guess
  local cut
  for _, m in ipairs(COPY_MARKERS) do
    local s, e = find(text, m)
    if s and (not cut or s < cut) then cut = s; ctx.copy_at = e end
  end
  if cut then
    if not b.original then
      local rest = match(sub(text, ctx.copy_at + 1), "^[ \t\r\n]*(.*)$")
      if rest then
        local he = split_head(rest, 1, #rest)
        local _, map = parse_headers(rest, 1, he, function() end)
        if map["message-id"] or map["from"] or map["to"] then b.original = original_from(map) end
      end
    end
    text = sub(text, 1, cut)
  end
  if not b.original then
    local part = find_node(root, is_original_part)
    if part then read_original(b, part, ctx) end
  end
  local excluded = {}
  for _, a in ipairs(b.envelope_candidates) do excluded[lower(a)] = true end
  if b.from then excluded[lower(b.from)] = true end
  if b.return_path and b.return_path ~= "" then excluded[lower(b.return_path)] = true end
  if b.original and b.original.from then excluded[lower(b.original.from)] = true end
  if b.original and b.original.return_path and b.original.return_path ~= "" then
    excluded[lower(b.original.return_path)] = true
  end
  local failed = {}
  if b.headers["x-failed-recipients"] then
    each_address(b.headers["x-failed-recipients"], function(a)
      if #failed < MAX_RECIPIENTS then failed[#failed + 1] = a end
    end)
  end
  return guess_recipients(text, excluded, failed)
end

---------------------------------------------------------------- parse

local function parse(raw, opts)
  local max = opts.max_bytes or DEFAULT_MAX_BYTES
  local b = {
    kind = "other", recipients = {}, warnings = {}, size = #raw, truncated = false,
  }
  local nwarn = 0
  local ctx = { parts = 0 }
  function ctx.warn(msg)
    nwarn = nwarn + 1
    if nwarn <= 20 then b.warnings[#b.warnings + 1] = msg end
  end
  ctx.decode = decode_body
  if #raw > max then
    raw = sub(raw, 1, max)
    b.truncated = true
    ctx.warn("message over " .. max .. " bytes: the rest ignored")
  end
  if raw == "" or not find(raw, "^[!-9;-~]+[ \t]*:") and not find(raw, "^[\r\n]") then
    -- no header line at the top: an mbox "From " line is skipped, anything else is not a message
    local nl = find(raw, "\n", 1, true)
    if sub(raw, 1, 5) == "From " and nl then
      raw = sub(raw, nl + 1)
    else
      b.kind, b.error = "unparsed", "not a mail message: no header at the start"
      b.headers = {}
      return b
    end
  end
  local root = parse_entity(raw, 1, #raw, 0, ctx)
  local h = root.headers
  b.headers = h
  b.header_list = root.list
  b.message_id = h["message-id"]
  b.subject = h["subject"] and decode_words(h["subject"]) or nil
  b.date = h["date"]
  b.from = bare_address(h["from"])
  b.return_path = h["return-path"] and (match(h["return-path"], "<([^>]*)>") or trim(h["return-path"])) or nil
  b.content_type = root.ctype
  -- where VERP tokens come back: X-Original-To keeps the address as it arrived even when an alias map
  -- rewrote the final recipient (Postfix sets both); then Delivered-To, then To
  local cands, seen = {}, {}
  local function cand(v)
    local a = #cands < 20 and bare_address(v)               -- 20: a hostile message may have thousands
    if a and not seen[lower(a)] then
      seen[lower(a)] = true
      cands[#cands + 1] = a
    end
  end
  for _, name in ipairs({ "x-original-to", "delivered-to", "envelope-to", "to" }) do
    for _, f in ipairs(root.list) do if f.name == name then cand(f.value) end end
  end
  b.envelope_candidates = cands
  b.envelope_to = cands[1]

  -- a report: the first multipart/report in the message (some gateways wrap it in multipart/mixed)
  local report = find_node(root, function(n) return n.ctype == "multipart/report" and n.parts end)
  if report then
    local rtype = lower(report.params["report-type"] or "")
    b.report_type = rtype
    local status_part, feedback_part, original_part
    for _, p in ipairs(report.parts) do
      local t = p.ctype
      if not status_part and (t == "message/delivery-status" or t == "message/global-delivery-status"
                              or t == "text/delivery-status") then
        status_part = p
      elseif not feedback_part and t == "message/feedback-report" then
        feedback_part = p
      elseif not original_part and is_original_part(p) then
        original_part = p
      end
    end
    if original_part then read_original(b, original_part, ctx) end
    if status_part and rtype ~= "feedback-report" then
      b.kind = "dsn"
      read_delivery_status(b, status_part)
      if #b.recipients == 0 then
        -- a delivery-status part without a recipient group: read what the text says instead
        b.recipients = guess(b, report, ctx)
        if #b.recipients == 0 then
          b.kind, b.error = "unparsed", "delivery-status part names no recipient"
        end
      end
      return b
    elseif feedback_part then
      b.kind = "arf"
      read_feedback(b, feedback_part)
      return b
    end
    -- a multipart/report of another type (disposition-notification: a read receipt), or one without its
    -- machine-readable part: go on as for any other message
  end

  -- RFC 3834 replies are sent with an empty Return-Path too: with an auto-reply header or a vacation
  -- subject, only the stronger signs (MAILER-DAEMON, X-Failed-Recipients, a bounce subject) make it a
  -- bounce (Postfix marks its own bounces "Auto-Submitted: auto-replied")
  local auto = autoreply_header(h)
  local vacation = vacation_subject(b.subject)
  local bounce_sign = looks_like_bounce(b, auto ~= nil or vacation ~= nil)
  if bounce_sign then
    b.bounce_sign = bounce_sign
    b.recipients = guess(b, root, ctx)
    if #b.recipients > 0 then
      b.kind = "guessed"
      return b
    end
  end
  if vacation then
    b.kind, b.autoreply = "autoreply", auto or "subject"
    return b
  end
  -- a bounce we cannot read is kept for a person to look at (quarantined), even when it says auto-replied
  if bounce_sign then
    b.kind, b.error = "unparsed", "looks like a bounce (" .. bounce_sign .. ") but names no failed recipient"
    return b
  end
  if auto then
    b.kind, b.autoreply = "autoreply", auto
    return b
  end
  local as = h["auto-submitted"] and lower(h["auto-submitted"])
  if as and not find(as, "^%s*no") then b.auto_submitted = as end
  return b
end

-- bounce.parse(raw [, opts]) -> b.  opts.max_bytes: bytes read (default 10 MB).
function M.parse(raw, opts)
  if type(raw) ~= "string" then error("bounce.parse: expected a string, got " .. type(raw), 2) end
  if opts ~= nil and type(opts) ~= "table" then error("bounce.parse: opts must be a table", 2) end
  opts = opts or {}
  if opts.max_bytes ~= nil and (math.type(opts.max_bytes) ~= "integer" or opts.max_bytes < 1) then
    error("bounce.parse: max_bytes must be a positive integer", 2)
  end
  local ok, b = pcall(parse, raw, opts)
  if ok then return b end
  -- a bug met by hostile input must not stop a run over a mailbox: say so and move on
  return { kind = "unparsed", error = "parse error: " .. tostring(b), recipients = {}, warnings = {},
           headers = {}, envelope_candidates = {}, size = #raw }
end

---------------------------------------------------------------- classification

local function status_class(r) return r and r.status and sub(r.status, 1, 1) end
local function status_of(r) return r and r.status or "" end

local function diag(b, r)
  local t = r and r.diagnostic or ""
  return lower(t)
end

local function any_text(text, patterns)
  for _, p in ipairs(patterns) do
    if find(text, p) then return true end
  end
  return false
end

-- Diagnostic texts (lower-case Lua patterns).
M.texts = {
  -- "Recipient address rejected:" alone is only Postfix's prefix (the reason follows: "User unknown ...",
  -- "Access denied", "Greylisted"), so it is not here; Exchange Online's "Access denied. AS(2018...)" for a
  -- recipient not in its directory is
  user_unknown = {
    "user unknown", "unknown user", "no such user", "no such recipient", "unknown recipient",
    "recipient unknown", "recipient not found", "user not found", "mailbox not found", "mailbox unavailable",
    "does not exist", "doesn't exist", "may not exist", "no mailbox", "invalid recipient", "invalid mailbox",
    "invalid address", "not a valid mailbox", "not a valid recipient", "unrouteable address", "no such address", "doesn't have a",
    "address couldn't be found", "not our customer", "account has been disabled", "account is disabled",
    "mailbox disabled", "recipnotfound", "recipientnotfound", "no longer available", "unknown local part",
    "undeliverable address", "bad destination mailbox", "address not found", "no valid recipients",
    "access denied%. as%(", "unbekannt", "existiert nicht", "n'existe pas", "inexistant", "no existe",
    "inesistente",
  },
  mailbox_full = {
    "mailbox full", "mailbox is full", "quota exceeded", "over quota", "overquota", "exceeded storage",
    "insufficient storage", "out of storage", "mailbox size limit", "exceeds? .*quota", "full mailbox",
  },
  policy = {
    "spam", "blocked", "blacklist", "blocklist", "block list", "black list", "reputation", "spamhaus",
    "rbl", "dnsbl", "listed at", "listed on", "policy", "rejected for abuse", "banned", "junk",
    "not authorized", "dmarc", "spf", "dkim", "content rejected", "message rejected",
  },
  no_domain = { "host not found", "domain not found", "nxdomain", "no such domain", "host or domain name not found" },
}

local function permanent(r) return status_class(r) == "5" end

M.rules = {
  { name = "autoreply", class = "autoreply",
    match = function(b) return b.kind == "autoreply" end },
  -- RFC 5965 feedback types: abuse and fraud are complaints, virus too (the recipient reports what we sent);
  -- a report without a type is an abuse report (old feedback loops). not-spam (RFC 6430), auth-failure
  -- (RFC 6591: our own SPF/DKIM failed) and other are not complaints by the recipient.
  { name = "complaint", class = "complaint",
    match = function(b)
      if b.kind ~= "arf" then return false end
      local t = b.feedback and b.feedback.type
      return t == nil or t == "abuse" or t == "fraud" or t == "virus"
    end },
  { name = "feedback-other", class = "unknown", match = function(b) return b.kind == "arf" end },
  { name = "not-a-bounce", class = "unknown",
    match = function(b) return b.kind ~= "dsn" and b.kind ~= "guessed" end },
  { name = "no-recipient", class = "unknown", match = function(b, r) return r == nil end },
  -- a warning that delivery is still being tried, whatever status it quotes, is never hard
  { name = "delayed", class = "soft", match = function(b, r) return r.action == "delayed" end },
  { name = "delivered", class = "unknown",
    match = function(b, r)
      return r.action == "delivered" or r.action == "relayed" or r.action == "expanded" or status_class(r) == "2"
    end },
  { name = "transient", class = "soft", match = function(b, r) return status_class(r) == "4" end },
  -- 5.1.7 and 5.1.8 are about OUR sender address: a policy problem, not the recipient's
  { name = "sender-address", class = "policy",
    match = function(b, r) return status_of(r) == "5.1.7" or status_of(r) == "5.1.8" end },
  { name = "bad-mailbox", class = "hard", match = function(b, r) return find(status_of(r), "^5%.1%.") ~= nil end },
  { name = "mailbox-disabled", class = "hard", match = function(b, r) return status_of(r) == "5.2.1" end },
  -- RFC 3463: 5.2.2 is a "persistent transient" failure: the mailbox may be emptied
  { name = "mailbox-full", class = "soft",
    match = function(b, r) return status_of(r) == "5.2.2" or (permanent(r) and any_text(diag(b, r), M.texts.mailbox_full)) end },
  { name = "policy-status", class = "policy", match = function(b, r) return find(status_of(r), "^5%.7%.") ~= nil end },
  -- an authoritative "no such domain" under a routing code (Postfix: 5.4.4 Host or domain name not found)
  { name = "no-such-domain", class = "hard",
    match = function(b, r)
      return find(status_of(r), "^5%.4%.4") ~= nil and any_text(diag(b, r), M.texts.no_domain)
             and not find(diag(b, r), "try again")
    end },
  -- before the routing codes: Exchange Online refuses unknown recipients with "550 5.4.1 Recipient address
  -- rejected: Access denied"
  { name = "user-unknown-text", class = "hard",
    match = function(b, r) return permanent(r) and any_text(diag(b, r), M.texts.user_unknown) end },
  { name = "network", class = "soft",
    match = function(b, r) return find(status_of(r), "^5%.[34]%.") ~= nil end },
  { name = "policy-text", class = "policy",
    match = function(b, r) return permanent(r) and any_text(diag(b, r), M.texts.policy) end },
}

-- The recipient a message is classified by: the first that failed, else the first.
function M.main_recipient(b)
  local rs = b.recipients or {}
  for _, r in ipairs(rs) do
    if r.action == "failed" then return r end
  end
  return rs[1]
end

-- bounce.classify(b [, rules [, recipient]]) -> class, rule name.  Rules are tried in order, the first
-- whose match(b, r) is true wins (r: the recipient classified, by default bounce.main_recipient(b)).
-- A rule may set class to a function(b, r) -> class.  Nothing matched: "unknown", "default".
function M.classify(b, rules, r)
  if type(b) ~= "table" then error("bounce.classify: expected a parsed message", 2) end
  rules = rules or M.rules
  if type(rules) ~= "table" then error("bounce.classify: rules must be a list", 2) end
  if r == nil then r = M.main_recipient(b) end
  for i, rule in ipairs(rules) do
    if type(rule) ~= "table" or type(rule.match) ~= "function" then
      error("bounce.classify: rule " .. i .. " needs a match function", 2)
    end
    if rule.match(b, r) then
      local class = rule.class
      if type(class) == "function" then class = class(b, r) end
      return class or "unknown", rule.name or ("rule " .. i)
    end
  end
  return "unknown", "default"
end

M.CLASSES = { "hard", "soft", "policy", "complaint", "autoreply", "unknown" }

return M
