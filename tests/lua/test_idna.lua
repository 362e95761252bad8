-- Tests for mailshot.idna: RFC 3492 Punycode and domain names in A-label form.
--   cd /work/main && lua5.4 tests/lua/test_idna.lua
--   ./mailshot exec tests/lua/test_idna.lua
-- Expected values come from RFC 3492 7.1 and were checked against an
-- independent codec (Python's "punycode" and "idna" codecs).
local HERE = (debug and debug.getinfo(1, "S").source:match("^@(.*/)")) or "tests/lua/"
package.path = HERE .. "../../lua/?.lua;" .. HERE .. "../../lua/?/init.lua;" .. package.path

local check = dofile(HERE .. "check.lua")
local case, eq, checkerr = check.case, check.eq, check.checkerr
-- fails(parts, f, ...): f(...) returns nil and a message containing every part.
local fails = check.fails_call
local no_new_globals = check.globals_snapshot()

local idna = require "mailshot.idna"

local U = utf8.char

-- n CJK ideographs (U+4E00 + 37 i): 27 give an A-label of exactly 63 octets, 28 give 66
local function cjk(n)
  local t = {}
  for i = 0, n - 1 do t[#t + 1] = U(0x4E00 + 37 * i) end
  return table.concat(t)
end

---------------------------------------------------------------- RFC 3492 7.1

-- { name, code points, Punycode }
local SAMPLES = {
  { "(A) Arabic (Egyptian)",
    { 0x0644, 0x064A, 0x0647, 0x0645, 0x0627, 0x0628, 0x062A, 0x0643, 0x0644,
      0x0645, 0x0648, 0x0634, 0x0639, 0x0631, 0x0628, 0x064A, 0x061F },
    "egbpdaj6bu4bxfgehfvwxn" },
  { "(B) Chinese (simplified)",
    { 0x4ED6, 0x4EEC, 0x4E3A, 0x4EC0, 0x4E48, 0x4E0D, 0x8BF4, 0x4E2D, 0x6587 },
    "ihqwcrb4cv8a8dqg056pqjye" },
  { "(C) Chinese (traditional)",
    { 0x4ED6, 0x5011, 0x7232, 0x4EC0, 0x9EBD, 0x4E0D, 0x8AAA, 0x4E2D, 0x6587 },
    "ihqwctvzc91f659drss3x8bo0yb" },
  { "(D) Czech: Pro<ccaron>prost<ecaron>nemluv<iacute><ccaron>esky",
    { 0x0050, 0x0072, 0x006F, 0x010D, 0x0070, 0x0072, 0x006F, 0x0073, 0x0074,
      0x011B, 0x006E, 0x0065, 0x006D, 0x006C, 0x0075, 0x0076, 0x00ED, 0x010D,
      0x0065, 0x0073, 0x006B, 0x0079 },
    "Proprostnemluvesky-uyb24dma41a" },
  { "(E) Hebrew",
    { 0x05DC, 0x05DE, 0x05D4, 0x05D4, 0x05DD, 0x05E4, 0x05E9, 0x05D5, 0x05D8,
      0x05DC, 0x05D0, 0x05DE, 0x05D3, 0x05D1, 0x05E8, 0x05D9, 0x05DD, 0x05E2,
      0x05D1, 0x05E8, 0x05D9, 0x05EA },
    "4dbcagdahymbxekheh6e0a7fei0b" },
  { "(L) Japanese 3<nen>B<gumi><kinpachi><sensei>",
    { 0x0033, 0x5E74, 0x0042, 0x7D44, 0x91D1, 0x516B, 0x5148, 0x751F },
    "3B-ww4c5e180e575a65lsy2b" },
  { "(M) <amuro><namie>-with-SUPER-MONKEYS",
    { 0x5B89, 0x5BA4, 0x5948, 0x7F8E, 0x6075, 0x002D, 0x0077, 0x0069, 0x0074,
      0x0068, 0x002D, 0x0053, 0x0055, 0x0050, 0x0045, 0x0052, 0x002D, 0x004D,
      0x004F, 0x004E, 0x004B, 0x0045, 0x0059, 0x0053 },
    "-with-SUPER-MONKEYS-pc58ag80a8qai00g7n9n" },
  { "(O) <hitotsu><yane><no><shita>2",
    { 0x3072, 0x3068, 0x3064, 0x5C4B, 0x6839, 0x306E, 0x4E0B, 0x0032 },
    "2-u9tlzr9756bt3uc0v" },
  { "(S) -> $1.00 <- (all ASCII)",
    { 0x002D, 0x003E, 0x0020, 0x0024, 0x0031, 0x002E, 0x0030, 0x0030, 0x0020,
      0x003C, 0x002D },
    "-> $1.00 <--" },
}

for _, s in ipairs(SAMPLES) do
  local text = U(table.unpack(s[2]))
  case("RFC 3492 " .. s[1] .. " encodes to the sample", function()
    eq(idna.punycode_encode(text), s[3], "encode")
  end)
  case("RFC 3492 " .. s[1] .. " decodes from the sample", function()
    eq(idna.punycode_decode(s[3]), text, "decode")
  end)
end

case("RFC 3492 (I) Russian: the sample's upper-case D (a case flag) decodes, flags ignored", function()
  local text = U(0x043F, 0x043E, 0x0447, 0x0435, 0x043C, 0x0443, 0x0436, 0x0435,
                 0x043E, 0x043D, 0x0438, 0x043D, 0x0435, 0x0433, 0x043E, 0x0432,
                 0x043E, 0x0440, 0x044F, 0x0442, 0x043F, 0x043E, 0x0440, 0x0443,
                 0x0441, 0x0441, 0x043A, 0x0438)
  eq(idna.punycode_decode("b1abfaaepdrnnbgefbaDotcwatmq2g4l"), text, "decode")
  eq(idna.punycode_encode(text), "b1abfaaepdrnnbgefbadotcwatmq2g4l", "encode (digits in lower case)")
end)

case("Punycode: astral and mixed strings match Python's codec", function()
  eq(idna.punycode_encode(U(0x1F600)), "e28h")
  eq(idna.punycode_encode("a" .. U(0x1F600) .. "b" .. U(0x1D518) .. "ü-z"), "ab-z-1ra92103e0eqb")
  eq(idna.punycode_encode(U(0x10FFFD)), "bn32g")
  eq(idna.punycode_encode("éééééx"), "x-9faaaaa")
  eq(idna.punycode_decode("bn32g"), U(0x10FFFD))
end)

case("Punycode: empty and all-ASCII strings", function()
  eq(idna.punycode_encode(""), "")
  eq(idna.punycode_decode(""), "")
  eq(idna.punycode_encode("hello"), "hello-")
  eq(idna.punycode_decode("hello-"), "hello")
  eq(idna.punycode_encode("-"), "--")
  eq(idna.punycode_decode("--"), "-")
end)

case("Punycode: bad input to decode gives nil, message", function()
  fails("non-ASCII", idna.punycode_decode, "bücher")
  fails("bad Punycode digit", idna.punycode_decode, "abc-!x")
  fails("bad Punycode digit", idna.punycode_decode, "-abc")      -- RFC 3492 6.2: leading delimiter is not consumed
  fails("truncated", idna.punycode_decode, "a-b")                 -- "b" needs a following digit
  fails("overflow", idna.punycode_decode, "99999999999999")
end)

case("Punycode: decoding to a surrogate or past U+10FFFF is refused", function()
  -- single code point samples: the generalised integer of (c - 128) with bias 72
  fails("U+D800", idna.punycode_decode, "ib9b")
  fails("U+DFFF", idna.punycode_decode, "zy0c")
  fails("U+110000", idna.punycode_decode, "en32g")
end)

case("Punycode: invalid UTF-8 to encode gives nil, message", function()
  fails("invalid UTF-8", idna.punycode_encode, "b\xFCcher")        -- Latin-1
  fails("invalid UTF-8", idna.punycode_encode, "\xC0\x80")         -- overlong NUL
  fails("invalid UTF-8", idna.punycode_encode, "\xED\xA0\x80")     -- surrogate
  fails("invalid UTF-8", idna.punycode_encode, "\xF4\x90\x80\x80") -- past U+10FFFF
  fails("invalid UTF-8", idna.punycode_encode, "ab\xE2\x82")       -- truncated
end)

-- random strings from several pools: ASCII, Latin, CJK, astral, and a few repeats
local function random_string(len)
  local cps = {}
  for i = 1, len do
    local pool = math.random(6)
    local c
    if pool == 1 then c = math.random(0x20, 0x7E)
    elseif pool == 2 then c = math.random(0x80, 0x24F)
    elseif pool == 3 then c = math.random(0x370, 0x2FFF)
    elseif pool == 4 then c = math.random(0x3000, 0xD7FF)
    elseif pool == 5 then c = math.random(0xE000, 0x10FFFF)
    else c = cps[math.random(math.max(i - 1, 1))] or 0x4E2D end
    if c >= 0xD800 and c <= 0xDFFF then c = 0xFFFD end
    cps[i] = c
  end
  return U(table.unpack(cps))
end

case("Punycode: 2000 seeded random strings round-trip", function()
  math.randomseed(3492)
  for n = 1, 2000 do
    local s = random_string(math.random(0, 40))
    local enc, err = idna.punycode_encode(s)
    if not enc then error(string.format("#%d %q: %s", n, s, err)) end
    if string.find(enc, "[^\32-\126]") then error(string.format("#%d: output %q is not printable ASCII", n, enc)) end
    local back = idna.punycode_decode(enc)
    if back ~= s then error(string.format("#%d: %q -> %q -> %q", n, s, enc, tostring(back))) end
    -- digits are case-insensitive (RFC 3492 5): upper-case the part after the last delimiter
    -- (the encoder writes a delimiter only when the string has ASCII in it)
    local head, digits = "", enc
    if string.find(s, "[\0-\127]") then head, digits = enc:match("^(.*%-)(.-)$") end
    local up = idna.punycode_decode(head .. string.upper(digits))
    if up ~= s then error(string.format("#%d: %q with upper-case digits decodes to %q", n, enc, tostring(up))) end
  end
end)

---------------------------------------------------------------- to_ascii

case("to_ascii: bücher.example -> xn--bcher-kva.example", function()
  eq(idna.to_ascii("bücher.example"), "xn--bcher-kva.example")
end)

case("to_ascii: BÜCHER.Example. is lower-cased and loses its final dot", function()
  eq(idna.to_ascii("BÜCHER.Example."), "xn--bcher-kva.example")
end)

case("to_ascii: пример.испытание -> xn--e1afmkfd.xn--80akhbyknj4f", function()
  eq(idna.to_ascii("пример.испытание"), "xn--e1afmkfd.xn--80akhbyknj4f")
  eq(idna.to_ascii("ПРИМЕР.ИСПЫТАНИЕ"), "xn--e1afmkfd.xn--80akhbyknj4f", "upper-case Cyrillic")
end)

case("to_ascii: münchen.de -> xn--mnchen-3ya.de", function()
  eq(idna.to_ascii("münchen.de"), "xn--mnchen-3ya.de")
end)

case("to_ascii: simple case mapping of Greek, Vietnamese, Armenian, Polish, Turkish İ", function()
  eq(idna.to_ascii("ΕΛΛΗΝΙΚΆ.example"), "xn--hxargifdar.example")
  eq(idna.to_ascii("TIẾNGVIỆT.vn"), "xn--tingvit-5t4cyc.vn")
  eq(idna.to_ascii("ՀԱՅԵՐԵՆ.am"), "xn--y9aia5b0ai2e.am")
  eq(idna.to_ascii("ŁÓDŹ.pl"), "xn--d-uga0v4h.pl")
  eq(idna.to_ascii("İstanbul.tr"), "xn--istanbul-o0e.tr", "İ -> i + U+0307 as UTS #46 maps it")
  eq(idna.to_ascii("straße.de"), "xn--strae-oqa.de", "ß is kept (IDNA2008), not mapped to ss")
end)

case("to_ascii: the IDNA dots U+3002, U+FF0E, U+FF61 separate labels", function()
  eq(idna.to_ascii("bücher" .. U(0x3002) .. "example"), "xn--bcher-kva.example")
  eq(idna.to_ascii("a" .. U(0xFF0E) .. "b" .. U(0xFF61) .. "c" .. U(0x3002)), "a.b.c")
end)

case("to_ascii: ASCII domains come back lower-cased and checked", function()
  eq(idna.to_ascii("Mail.Example.COM"), "mail.example.com")
  eq(idna.to_ascii("example.com."), "example.com")
  eq(idna.to_ascii("a-b.c0m"), "a-b.c0m")
  eq(idna.to_ascii("localhost"), "localhost")
  eq(idna.to_ascii("r3---sn-abc.example"), "r3---sn-abc.example", "hyphens at 3-4 are fine in non-xn ASCII labels")
end)

case("to_ascii: a valid A-label is accepted in any case and comes back lower-cased", function()
  eq(idna.to_ascii("xn--bcher-kva.example"), "xn--bcher-kva.example")
  eq(idna.to_ascii("XN--BCHER-KVA.Example"), "xn--bcher-kva.example")
  eq(idna.to_ascii("xn--e1afmkfd.xn--80akhbyknj4f"), "xn--e1afmkfd.xn--80akhbyknj4f")
end)

case("to_ascii: lengths at the limits are accepted", function()
  local l63 = string.rep("a", 63)
  eq(idna.to_ascii(l63 .. ".test"), l63 .. ".test")
  local name = table.concat({ l63, l63, l63, string.rep("b", 61) }, ".")   -- 253 octets
  eq(#name, 253, "setup")
  eq(idna.to_ascii(name), name)
  eq(idna.to_ascii(name .. "."), name, "253 octets plus the final dot")
  eq(idna.to_ascii(cjk(27)), "xn--4gq6c1e7f9goiqjqkolwmrnyoqpwq2r8svt0u5vexjyoz0z40ap0ar1at2a",
     "A-label of 63 octets")
end)

case("to_ascii: an empty label is refused (a..b, .a, a.., empty)", function()
  fails({ "invalid domain", "a..b", "empty label" }, idna.to_ascii, "a..b")
  fails("empty label", idna.to_ascii, ".a")
  fails("empty label", idna.to_ascii, "a..")
  fails("empty domain", idna.to_ascii, "")
  fails("empty domain", idna.to_ascii, ".")
end)

case("to_ascii: a label over 63 octets is refused, before and after encoding", function()
  fails("longer than 63 octets", idna.to_ascii, string.rep("a", 64) .. ".test")
  fails("longer than 63 octets", idna.to_ascii, cjk(28) .. ".test")   -- 28 code points, 66 octets as an A-label
  fails("longer than 63 octets", idna.to_ascii, string.rep("ü", 200) .. ".test")
end)

case("to_ascii: a name over 253 octets is refused", function()
  local l63 = string.rep("a", 63)
  fails("longer than 253 octets", idna.to_ascii, table.concat({ l63, l63, l63, string.rep("b", 62) }, "."))
  fails("longer than 253 octets", idna.to_ascii, string.rep("a.", 127) .. "a")
  fails("longer than 253 octets", idna.to_ascii, string.rep("a.", 100000))     -- refused without the work
  -- 4 x 27 + 3 = 111 code points, but 4 x 63 + 3 = 255 octets as A-labels
  local u = cjk(27)
  fails("longer than 253 octets", idna.to_ascii, table.concat({ u, u, u, u }, "."))
end)

case("to_ascii: invalid UTF-8 is refused", function()
  fails({ "invalid UTF-8", "byte 2" }, idna.to_ascii, "b\xFCcher.example")
  fails("invalid UTF-8", idna.to_ascii, "a.\xED\xA0\x80.test")
  fails("invalid UTF-8", idna.to_ascii, "test\xC3")
end)

case("to_ascii: hyphens at either end of a label are refused", function()
  fails({ "-abc", "starts with a hyphen" }, idna.to_ascii, "-abc.test")
  fails("ends with a hyphen", idna.to_ascii, "abc-.test")
  fails("starts with a hyphen", idna.to_ascii, "-bücher.test")
  fails("hyphens in the 3rd and 4th positions", idna.to_ascii, "ab--ü.test")
end)

case("to_ascii: characters outside letters, digits and hyphens are refused", function()
  fails("only letters, digits and hyphens", idna.to_ascii, "exa mple.com")
  fails("only letters, digits and hyphens", idna.to_ascii, "_dmarc.example.com")
  fails("only letters, digits and hyphens", idna.to_ascii, "user@example.com")
  fails("only letters, digits and hyphens", idna.to_ascii, "bü cher.example")
  fails("only letters, digits and hyphens", idna.to_ascii, "[192.0.2.1]")
  fails("U+00A0", idna.to_ascii, "bücher" .. U(0xA0) .. ".example")
  fails("U+200B", idna.to_ascii, "bü" .. U(0x200B) .. "cher.example")
  fails("U+0085", idna.to_ascii, "b" .. U(0x85) .. ".example")
  fails("combining mark", idna.to_ascii, U(0x301) .. "a.test")
end)

case("to_ascii: an xn-- label that is not a valid A-label is refused", function()
  fails({ "xn--!!", "only letters, digits and hyphens" }, idna.to_ascii, "xn--!!.test")
  fails('"xn--"', idna.to_ascii, "xn--.test")
  fails("xn--abc-", idna.to_ascii, "xn--abc-.test")                    -- would decode to plain "abc"
  fails("not a valid A-label", idna.to_ascii, "xn--99999999999999.test") -- overflow
  fails("not a valid A-label", idna.to_ascii, "xn--a.test")            -- U+0080, a control
  fails("not a valid A-label", idna.to_ascii, "xn--ib9b.test")         -- a surrogate
  fails("upper-case", idna.to_ascii, "xn--bcher-2pa.test")             -- "bÜcher"
  fails("not a valid A-label", idna.to_ascii, "xn--bcher-kva0.test")   -- trailing garbage: truncated
end)

case("to_ascii: a non-string argument is a programmer's error", function()
  checkerr("expected a string", idna.to_ascii, nil)
  checkerr("expected a string", idna.to_ascii, 42)
  checkerr("expected a string", idna.punycode_encode, {})
  checkerr("expected a string", idna.punycode_decode, nil)
  checkerr("expected a string", idna.to_unicode, false)
  checkerr("expected a string", idna.split_address, nil)
  checkerr("expected a string", idna.address_domain_ascii, 1)
end)

---------------------------------------------------------------- to_unicode

case("to_unicode: xn-- labels are decoded, others kept", function()
  eq(idna.to_unicode("xn--bcher-kva.example"), "bücher.example")
  eq(idna.to_unicode("xn--e1afmkfd.xn--80akhbyknj4f"), "пример.испытание")
  eq(idna.to_unicode("XN--MNCHEN-3YA.de"), "münchen.de")
  eq(idna.to_unicode("mail.example.com."), "mail.example.com.", "final dot kept")
  eq(idna.to_unicode(""), "")
end)

case("to_unicode: an xn-- label that does not decode is shown as it is", function()
  eq(idna.to_unicode("xn--!!.test"), "xn--!!.test")
  eq(idna.to_unicode("xn--abc-.xn--bcher-kva"), "xn--abc-.bücher")
  eq(idna.to_unicode("xn--ib9b.test"), "xn--ib9b.test")
end)

case("to_unicode is the inverse of to_ascii (on lower-case NFC input)", function()
  for _, d in ipairs({ "bücher.example", "пример.испытание", "münchen.de", "ελληνικά.example",
                       "3年b組金八先生.jp", "tiếngviệt.vn", "mail.example.com", "a" .. U(0x1F600) .. ".test" }) do
    local a = assert(idna.to_ascii(d))
    eq(idna.to_unicode(a), d, d)
    eq(idna.to_ascii(idna.to_unicode(a)), a, "again " .. d)
  end
end)

---------------------------------------------------------------- addresses

case("split_address splits at the last @", function()
  local l, d = idna.split_address('"quoted@local"@x.test')
  eq(l, '"quoted@local"', "local part")
  eq(d, "x.test", "domain")
  l, d = idna.split_address("user@bücher.example")
  eq(l, "user"); eq(d, "bücher.example")
  l, d = idna.split_address("a@b@c")
  eq(l, "a@b"); eq(d, "c")
end)

case("split_address: no @, empty local part or empty domain give nil, message", function()
  fails({ "invalid address", "no @" }, idna.split_address, "user.example.com")
  fails("empty local part", idna.split_address, "@x.test")
  fails("empty domain", idna.split_address, "user@")
  fails("empty domain", idna.split_address, '"a@b"@')
end)

case("address_domain_ascii gives the A-label domain to look up", function()
  eq(idna.address_domain_ascii("user@Bücher.Example"), "xn--bcher-kva.example")
  eq(idna.address_domain_ascii('"quoted@local"@münchen.de'), "xn--mnchen-3ya.de")
  eq(idna.address_domain_ascii("x@пример.испытание."), "xn--e1afmkfd.xn--80akhbyknj4f")
  eq(idna.address_domain_ascii("Someone@Example.ORG"), "example.org")
end)

case("address_domain_ascii: bad domains and address literals give nil, message", function()
  fails({ "invalid address", "user@-x.test", "starts with a hyphen" }, idna.address_domain_ascii, "user@-x.test")
  fails("address literals are not supported", idna.address_domain_ascii, "user@[192.0.2.1]")
  fails("no @", idna.address_domain_ascii, "nobody")
  fails("invalid UTF-8", idna.address_domain_ascii, "u@b\xFCcher.de")
  fails("empty label", idna.address_domain_ascii, "u@a..b")
end)

---------------------------------------------------------------- hygiene

case("many conversions in a row: each A-label decodes back to its name, ASCII names stay as they are", function()
  -- (the conversion rate is a benchmark: scripts/bench-lua.lua)
  local n = check.scaled(2000, 200)
  eq(idna.to_ascii("Bücher.example"), "xn--bcher-kva.example")
  for i = 1, n do
    local name = (i % 2 == 0) and "Bücher" .. i .. ".example" or "mail" .. i .. ".example.com"
    local a = assert(idna.to_ascii(name))
    assert(not a:find("[\128-\255]"), a)
    if i % 2 == 0 then
      eq(a:match("^xn%-%-bcher" .. i .. "%-%w+%.example$") ~= nil, true, a)
      eq(idna.to_unicode(a), name:lower())
    else
      eq(a, name)
    end
  end
end)

case("the module writes no globals", no_new_globals)

return check.finish("test_idna.lua")
