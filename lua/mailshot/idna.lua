-- mailshot.idna: internationalised domain names in the form the DNS wants.
--
-- Direct delivery looks up the MX records of each recipient's domain; a
-- domain such as "bücher.example" must be asked for as its A-label form
-- "xn--bcher-kva.example" (RFC 5890 2.3.2.1, RFC 5891 4.4).  This module
-- has the RFC 3492 Punycode codec and the label-by-label conversion
-- around it.
--
-- What to_ascii() does NOT do: the full UTS #46 mapping (width folding,
-- compatibility forms, removal of ignorable characters) and Unicode
-- normalisation.  Input should already be NFC (what keyboards and nearly
-- all data produce).  Only simple upper-to-lower case mapping is done, for
-- the scripts domains in practice use: Latin-1 Supplement, Latin
-- Extended-A, Latin Extended Additional (Vietnamese), modern Greek,
-- Cyrillic and Armenian.  The IDNA2008 code point tables (PVALID,
-- DISALLOWED, CONTEXTJ/O) and the Bidi rule are not applied either: only
-- ASCII outside [a-z0-9-], controls, invisible characters and spaces are
-- refused, so a label of, say, symbols converts and the DNS then answers
-- NXDOMAIN for it.  A-labels given as input get the RFC 5891 5.4 check
-- (they decode, and encode back to the same label).
--
-- Errors, two tiers (README.md, "Lua API reference", conventions): a domain or address that cannot be
-- converted is bad data -> nil, message; an argument that is not a string
-- is a programmer's mistake -> error().

local string, table, utf8, type, error =
      string, table, utf8, type, error
local byte, char, sub, find, lower, format =
      string.byte, string.char, string.sub, string.find, string.lower, string.format
local concat, insert = table.concat, table.insert

local M = {}

---------------------------------------------------------------- Punycode (RFC 3492)

-- RFC 3492 5: the bootstring parameters for Punycode
local BASE, TMIN, TMAX = 36, 1, 26
local SKEW, DAMP = 38, 700
local INITIAL_BIAS, INITIAL_N = 72, 128
-- RFC 3492 6.4: overflow is detected against the largest integer the
-- implementation has; we use the 32-bit signed limit (Lua's are 64-bit, so
-- the checks below can be done exactly as the RFC writes them).
local MAXINT = 0x7FFFFFFF
local MAX_CODE_POINT = 0x10FFFF

-- RFC 3492 6.1
local function adapt(delta, numpoints, firsttime)
  delta = firsttime and delta // DAMP or delta // 2
  delta = delta + delta // numpoints
  local k = 0
  while delta > ((BASE - TMIN) * TMAX) // 2 do
    delta = delta // (BASE - TMIN)
    k = k + BASE
  end
  return k + (BASE - TMIN + 1) * delta // (delta + SKEW)
end

-- RFC 3492 6.2/6.3: t for digit position k
local function threshold(k, bias)
  if k <= bias then return TMIN end
  if k >= bias + TMAX then return TMAX end
  return k - bias
end

-- RFC 3492 5: digit values 0..25 are a..z, 26..35 are 0..9 (we write lower case)
local function encode_digit(d)
  return d < 26 and d + 97 or d + 22
end

-- BASE means "not a digit"; both cases are accepted (RFC 3492 5)
local function decode_digit(c)
  if c >= 48 and c <= 57 then return c - 22 end
  if c >= 65 and c <= 90 then return c - 65 end
  if c >= 97 and c <= 122 then return c - 97 end
  return BASE
end

-- UTF-8 -> array of code points, or nil, why.  utf8.len() without `lax`
-- refuses overlong forms, surrogates and values past U+10FFFF.
local function code_points(s)
  local n, bad = utf8.len(s)
  if not n then return nil, format("invalid UTF-8 at byte %d", bad) end
  local cps = {}
  for _, c in utf8.codes(s) do cps[#cps + 1] = c end
  return cps
end

local function to_utf8(cps)
  local out = {}
  for i = 1, #cps do out[i] = utf8.char(cps[i]) end
  return concat(out)
end

-- RFC 3492 6.3, on code points; -> ASCII string or nil, why.  Case flags
-- (appendix A) are not used: basic code points are copied as they are and
-- digits are written in lower case.
local function encode_cps(cps)
  local out = {}
  for i = 1, #cps do
    if cps[i] < 0x80 then out[#out + 1] = char(cps[i]) end
  end
  local b = #out
  local h = b
  if b > 0 then out[#out + 1] = "-" end
  local n, delta, bias = INITIAL_N, 0, INITIAL_BIAS
  while h < #cps do
    local m = MAXINT                    -- the smallest code point >= n left to do
    for i = 1, #cps do
      if cps[i] >= n and cps[i] < m then m = cps[i] end
    end
    if m - n > (MAXINT - delta) // (h + 1) then return nil, "overflow" end
    delta = delta + (m - n) * (h + 1)
    n = m
    for i = 1, #cps do
      local c = cps[i]
      if c < n then
        delta = delta + 1
        if delta > MAXINT then return nil, "overflow" end
      elseif c == n then
        local q, k = delta, BASE         -- delta as a generalised variable-length integer
        while true do
          local t = threshold(k, bias)
          if q < t then break end
          out[#out + 1] = char(encode_digit(t + (q - t) % (BASE - t)))
          q = (q - t) // (BASE - t)
          k = k + BASE
        end
        out[#out + 1] = char(encode_digit(q))
        bias = adapt(delta, h + 1, h == b)
        delta = 0
        h = h + 1
      end
    end
    delta = delta + 1
    n = n + 1
  end
  return concat(out)
end

-- RFC 3492 6.2; ASCII string -> array of code points, or nil, why
local function decode_cps(s)
  if find(s, "[\128-\255]") then return nil, "non-ASCII character in Punycode" end
  local out = {}
  local last = 0                        -- position of the last delimiter
  for i = #s, 1, -1 do
    if byte(s, i) == 0x2D then last = i; break end
  end
  for i = 1, last - 1 do out[i] = byte(s, i) end
  -- the delimiter is consumed only when code points came before it, so a
  -- leading "-" is read as a (bad) digit, as the RFC says
  local pos = last > 1 and last + 1 or 1
  local n, i, bias = INITIAL_N, 0, INITIAL_BIAS
  while pos <= #s do
    local oldi, w, k = i, 1, BASE
    while true do
      if pos > #s then return nil, "truncated Punycode" end
      local digit = decode_digit(byte(s, pos))
      pos = pos + 1
      if digit >= BASE then return nil, format("bad Punycode digit %q", sub(s, pos - 1, pos - 1)) end
      if digit > (MAXINT - i) // w then return nil, "overflow" end
      i = i + digit * w
      local t = threshold(k, bias)
      if digit < t then break end
      if w > MAXINT // (BASE - t) then return nil, "overflow" end
      w = w * (BASE - t)
      k = k + BASE
    end
    local count = #out + 1
    bias = adapt(i - oldi, count, oldi == 0)
    if i // count > MAXINT - n then return nil, "overflow" end
    n = n + i // count                  -- never below INITIAL_N: no basic code point can appear here
    i = i % count
    if n > MAX_CODE_POINT or (n >= 0xD800 and n <= 0xDFFF) then
      return nil, format("Punycode decodes to U+%X, which is not a Unicode scalar value", n)
    end
    insert(out, i + 1, n)
    i = i + 1
  end
  return out
end

-- A public punycode entry: the string checked, then from = its code points (or
-- nil, why) and to = the result (or nil, why); errors say "punycode: ".
-- Tail-called, so a wrong argument is blamed on the caller of the entry.
local function punycode(fname, s, from, to)
  if type(s) ~= "string" then error(fname .. ": expected a string, got " .. type(s), 2) end
  local cps, why = from(s)
  if not cps then return nil, "punycode: " .. why end
  local out, err = to(cps)
  if not out then return nil, "punycode: " .. err end
  return out
end

-- idna.punycode_encode(label) -> ASCII string (no "xn--") | nil, err
-- label is UTF-8; it is encoded as it is (no case mapping, no checks).
function M.punycode_encode(label) return punycode("punycode_encode", label, code_points, encode_cps) end

-- idna.punycode_decode(ascii) -> UTF-8 string | nil, err
-- Takes the part after "xn--"; digits of either case are accepted.
function M.punycode_decode(s) return punycode("punycode_decode", s, decode_cps, to_utf8) end

---------------------------------------------------------------- labels

local MAX_LABEL = 63                    -- RFC 1034 3.1, RFC 5890 2.3.2.1 (octets)
local MAX_NAME = 253                    -- RFC 1034 3.1: 255 on the wire = 253 written, no final dot
local ACE_PREFIX = "xn--"               -- RFC 5890 2.3.2.1

-- Code points that end a label: "." and the IDNA dots of RFC 3490 3.1
-- (ideographic, fullwidth and halfwidth ideographic full stops).
local DOTS = { [0x2E] = true, [0x3002] = true, [0xFF0E] = true, [0xFF61] = true }

local EVEN, ODD = "even", "odd"         -- upper case on even / odd code points of a pair block
-- Simple lower-case mapping (UnicodeData.txt column 13) for the blocks named
-- at the top: { first, last, offset to add | EVEN | ODD }.
local LOWER = {
  { 0x0041, 0x005A, 0x20 },             -- A-Z
  { 0x00C0, 0x00D6, 0x20 },             -- Latin-1 Supplement (U+00D7 is the multiplication sign)
  { 0x00D8, 0x00DE, 0x20 },
  { 0x0100, 0x012F, EVEN },             -- Latin Extended-A (U+0130 is special, see lower_cp)
  { 0x0132, 0x0137, EVEN },
  { 0x0139, 0x0148, ODD },
  { 0x014A, 0x0177, EVEN },
  { 0x0178, 0x0178, 0x00FF - 0x0178 },  -- Ÿ -> ÿ
  { 0x0179, 0x017E, ODD },
  { 0x0386, 0x0386, 0x26 },             -- Greek with tonos
  { 0x0388, 0x038A, 0x25 },
  { 0x038C, 0x038C, 0x40 },
  { 0x038E, 0x038F, 0x3F },
  { 0x0391, 0x03A1, 0x20 },             -- Greek capitals (U+03A2 is unassigned)
  { 0x03A3, 0x03AB, 0x20 },
  { 0x03D8, 0x03EF, EVEN },             -- archaic Greek and Coptic pairs
  { 0x0400, 0x040F, 0x50 },             -- Cyrillic Ѐ..Џ
  { 0x0410, 0x042F, 0x20 },             -- Cyrillic А..Я
  { 0x0460, 0x0481, EVEN },
  { 0x048A, 0x04BF, EVEN },
  { 0x04C0, 0x04C0, 0x0F },             -- Ӏ -> ӏ
  { 0x04C1, 0x04CE, ODD },
  { 0x04D0, 0x052F, EVEN },             -- and Cyrillic Supplement
  { 0x0531, 0x0556, 0x30 },             -- Armenian
  { 0x1E00, 0x1E95, EVEN },             -- Latin Extended Additional
  { 0x1E9E, 0x1E9E, 0x00DF - 0x1E9E },  -- capital sharp s -> ß
  { 0x1EA0, 0x1EFF, EVEN },             -- Vietnamese
}

-- -> the lower-case code point(s) of c (two only for U+0130)
local function lower_cp(c)
  if c < 0x41 then return c end
  if c == 0x130 then return 0x69, 0x307 end   -- İ -> i + combining dot above (as UTS #46 maps it)
  for j = 1, #LOWER do
    local r = LOWER[j]
    if c < r[1] then return c end       -- the table is sorted
    if c <= r[2] then
      local how = r[3]
      if how == EVEN then return c % 2 == 0 and c + 1 or c end
      if how == ODD then return c % 2 == 1 and c + 1 or c end
      return c + how
    end
  end
  return c
end

local function lower_cps(cps)
  local out = {}
  for i = 1, #cps do
    local a, b = lower_cp(cps[i])
    out[#out + 1] = a
    if b then out[#out + 1] = b end
  end
  return out
end

-- Non-ASCII code points refused in a label: controls, spaces and invisible
-- characters (they turn up in pasted data and can never be in a real name).
local function invisible(c)
  return c <= 0xA0 or c == 0xAD or c == 0x1680 or (c >= 0x2000 and c <= 0x200B)
      or (c >= 0x2028 and c <= 0x202F) or (c >= 0x205F and c <= 0x2064)
      or c == 0x3000 or c == 0xFEFF or (c >= 0xFFF0 and c <= 0xFFFF)
end

-- The blocks of combining diacritical marks; a label must not start with one (RFC 5891 4.2.3.2)
local function combining(c)
  return (c >= 0x0300 and c <= 0x036F) or (c >= 0x1AB0 and c <= 0x1AFF)
      or (c >= 0x1DC0 and c <= 0x1DFF) or (c >= 0x20D0 and c <= 0x20FF)
      or (c >= 0xFE20 and c <= 0xFE2F)
end

local function ldh(c)
  return (c >= 0x61 and c <= 0x7A) or (c >= 0x30 and c <= 0x39) or c == 0x2D
end

-- Checks every label shares: hyphens at the ends, ASCII letters-digits-hyphen.
local function check_ldh(cps)
  if cps[1] == 0x2D then return nil, "starts with a hyphen" end
  if cps[#cps] == 0x2D then return nil, "ends with a hyphen" end
  for i = 1, #cps do
    local c = cps[i]
    if c < 0x80 and not ldh(c) then
      local shown = (c < 0x20 or c == 0x7F) and format("U+%04X", c) or format("%q", char(c))
      return nil, format("contains %s (only letters, digits and hyphens are allowed)", shown)
    end
  end
  return true
end

-- A lower-cased label with non-ASCII in it (a U-label, RFC 5891 4.2.3) -> ok | nil, why
local function check_u_label(cps)
  local ok, why = check_ldh(cps)
  if not ok then return nil, why end
  if cps[3] == 0x2D and cps[4] == 0x2D then return nil, "has hyphens in the 3rd and 4th positions" end
  if combining(cps[1]) then return nil, "starts with a combining mark" end
  for i = 1, #cps do
    if cps[i] >= 0x80 and invisible(cps[i]) then
      return nil, format("contains U+%04X (a control, space or invisible character)", cps[i])
    end
  end
  return true
end

-- An ASCII label starting "xn--" (lower case) must be a real A-label
-- (RFC 5891 5.4): it decodes, the result is a U-label we would accept,
-- and encoding it again gives the same label.  -> cps | nil, why
local function check_a_label(label)
  local cps, err = decode_cps(sub(label, 5))
  if not cps then return nil, "is not a valid A-label: " .. err end
  local ascii_only = true
  for i = 1, #cps do
    if cps[i] >= 0x80 then ascii_only = false; break end
  end
  if ascii_only then return nil, "is not a valid A-label: it encodes no non-ASCII character" end
  local ok, why = check_u_label(cps)
  if not ok then return nil, "is not a valid A-label: its Unicode form " .. why end
  if to_utf8(lower_cps(cps)) ~= to_utf8(cps) then
    return nil, "is not a valid A-label: its Unicode form has upper-case letters"
  end
  if encode_cps(cps) ~= sub(label, 5) then return nil, "is not a valid A-label: it does not encode back to itself" end
  return cps
end

-- One label (code points as given) -> its ASCII form | nil, why
local function label_to_ascii(cps)
  if #cps == 0 then return nil, "empty label" end
  local name = to_utf8(cps)
  -- every code point becomes at least one octet: this bounds the work below
  if #cps > MAX_LABEL then return nil, format("label %q is longer than %d octets", name, MAX_LABEL) end
  local low = lower_cps(cps)
  local ascii = true
  for i = 1, #low do
    if low[i] >= 0x80 then ascii = false; break end
  end
  if ascii then
    local ok, why = check_ldh(low)
    if not ok then return nil, format("label %q %s", name, why) end
    local s = to_utf8(low)
    if sub(s, 1, 4) == ACE_PREFIX then
      local good, err = check_a_label(s)
      if not good then return nil, format("label %q %s", name, err) end
    end
    return s
  end
  local ok, why = check_u_label(low)
  if not ok then return nil, format("label %q %s", name, why) end
  local enc, err = encode_cps(low)
  if not enc then return nil, format("label %q: %s", name, err) end
  local s = ACE_PREFIX .. enc
  if #s > MAX_LABEL then
    return nil, format("label %q is longer than %d octets as %s", name, MAX_LABEL, s)
  end
  return s
end

---------------------------------------------------------------- domains

-- domain -> A-label form | nil, why (the why without the domain)
local function convert(domain)
  local cps, why = code_points(domain)
  if not cps then return nil, why end
  -- each code point but a final dot gives at least one octet: refuse
  -- oversized input before doing any work on it
  if #cps - 1 > MAX_NAME then return nil, format("name longer than %d octets", MAX_NAME) end
  local labels, cur = {}, {}
  for i = 1, #cps do
    if DOTS[cps[i]] then
      labels[#labels + 1] = cur
      cur = {}
    else
      cur[#cur + 1] = cps[i]
    end
  end
  if #cur > 0 or #labels == 0 then labels[#labels + 1] = cur end   -- one final dot is dropped
  if #labels == 1 and #labels[1] == 0 then return nil, "empty domain" end
  local out = {}
  for i = 1, #labels do
    local s, err = label_to_ascii(labels[i])
    if not s then return nil, err end
    out[i] = s
  end
  local name = concat(out, ".")
  if #name > MAX_NAME then return nil, format("name longer than %d octets (%d as A-labels)", MAX_NAME, #name) end
  return name
end

-- idna.to_ascii(domain) -> A-label domain | nil, err
-- Splits on "." and the IDNA dots U+3002, U+FF0E, U+FF61, drops one final
-- dot, lower-cases, turns labels with non-ASCII into "xn--" A-labels and
-- checks the result: labels of 1..63 octets of [a-z0-9-] not starting or
-- ending with "-", any "xn--" label a valid A-label, at most 253 octets in
-- all.  ASCII domains come back lower-cased, so this is also the domain
-- syntax check.  Underscores (_dmarc...) and address literals are refused.
function M.to_ascii(domain)
  if type(domain) ~= "string" then error("to_ascii: expected a string, got " .. type(domain), 2) end
  local name, why = convert(domain)
  if not name then return nil, format("invalid domain %q: %s", domain, why) end
  return name
end

-- idna.to_unicode(domain) -> string
-- For display: every label that is a valid A-label (prefix in any case) is
-- decoded; all else, including "xn--" labels that do not decode, is left as
-- it is.  Splits on "." only; a final dot stays.  Never fails on a string.
function M.to_unicode(domain)
  if type(domain) ~= "string" then error("to_unicode: expected a string, got " .. type(domain), 2) end
  local out = {}
  local start = 1
  while true do
    local dot = find(domain, ".", start, true)
    local label = sub(domain, start, (dot or 0) - 1)
    local low = lower(label)
    if sub(low, 1, 4) == ACE_PREFIX and #low <= MAX_LABEL and not find(low, "[^a-z0-9-]") then
      local cps = check_a_label(low)
      if cps then label = to_utf8(cps) end
    end
    out[#out + 1] = label
    if not dot then break end
    start = dot + 1
  end
  return concat(out, ".")
end

---------------------------------------------------------------- addresses

-- idna.split_address(addr) -> local, domain | nil, err
-- Splits a bare address (no "Name <...>", no spaces around) at its LAST
-- "@", so a quoted local part may hold "@": "\"a@b\"@x.test".  Neither part
-- may be empty; nothing else is checked (mime.valid_address does that).
function M.split_address(addr)
  if type(addr) ~= "string" then error("split_address: expected a string, got " .. type(addr), 2) end
  local at = find(addr, "@[^@]*$")
  if not at then return nil, format("invalid address %q: no @", addr) end
  local loc, dom = sub(addr, 1, at - 1), sub(addr, at + 1)
  if loc == "" then return nil, format("invalid address %q: empty local part", addr) end
  if dom == "" then return nil, format("invalid address %q: empty domain", addr) end
  return loc, dom
end

-- idna.address_domain_ascii(addr) -> the domain as to_ascii() gives it | nil, err
-- The name to look up MX records for.  Address literals ("x@[192.0.2.1]")
-- have none and are refused.
function M.address_domain_ascii(addr)
  local loc, dom = M.split_address(addr)
  if not loc then return nil, dom end
  if sub(dom, 1, 1) == "[" then
    return nil, format("invalid address %q: address literals are not supported", addr)
  end
  local name, why = convert(dom)
  if not name then return nil, format("invalid address %q: %s", addr, why) end
  return name
end

return M
