-- test_unsubscribe.lua - mailshot.unsubscribe: List-Unsubscribe / List-Unsubscribe-Post headers
-- (RFC 2369, RFC 8058), signed tokens, URL encoding of row values, header injection, setup checks.
-- Run: make mailshot && ./mailshot exec tests/lua/test_unsubscribe.lua
--      (or MAILSHOT_LUA_PATH=lua ./mailshot exec tests/lua/test_unsubscribe.lua to test the tree)
-- The expected token below was computed independently with Python's hmac/base64 modules.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, checkerr = check.case, check.eq, check.checkerr
local fails = check.fails   -- fails(part, v, err): v is nil and err contains part
local no_new_globals = check.globals_snapshot()

local unsubscribe = require "mailshot.unsubscribe"
local util = require "mailshot.util"

local SECRET = "0123456789abcdef0123"
-- python3: b64(e) + "." + b64(hmac.new(SECRET, b"\n" + e, sha256).digest()[:16]), e = b"ann@example.net"
local ANN_TOKEN = "YW5uQGV4YW1wbGUubmV0.cGJ_yKv1WRSaDdXlaNWXpg"

local function no_crlf(h)
  for k, v in pairs(h) do
    assert(not v:find("[%c\127]"), k .. " has a control character: " .. string.format("%q", v))
  end
end

---------------------------------------------------------------- util.hmac_sha256

case("util.hmac_sha256 matches RFC 4231 test cases 1 and 2", function()
  eq(util.hmac_sha256(string.rep("\11", 20), "Hi There"),
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
  eq(util.hmac_sha256("Jefe", "what do ya want for nothing?"),
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
  checkerr("bad argument", util.hmac_sha256, "key")
end)

---------------------------------------------------------------- tokens

case("token: base64url(email).base64url(HMAC-SHA256[1..16]), as computed independently", function()
  eq(unsubscribe.token(SECRET, "ann@example.net"), ANN_TOKEN)
  assert(ANN_TOKEN:find("^[%w%-_]+%.[%w%-_]+$"), "URL-safe")
end)

case("token round trip: verify gives the email back, for ASCII and UTF-8 addresses", function()
  for _, e in ipairs { "ann@example.net", "a", "ab", "abc", "J\195\182rg+news@b\195\188cher.example",
                       '"odd local"@x.example' } do
    local t = unsubscribe.token(SECRET, e)
    eq(unsubscribe.verify(SECRET, t), e, "round trip of " .. e)
    assert(not t:find("[^%w%-_%.]"), "token is URL-safe: " .. t)
  end
end)

case("token with a campaign: verifies only with that campaign", function()
  local t = unsubscribe.token(SECRET, "ann@example.net", "spring-2026")
  eq(unsubscribe.verify(SECRET, t, "spring-2026"), "ann@example.net")
  fails("bad signature", unsubscribe.verify(SECRET, t, "autumn-2026"))
  fails("bad signature", unsubscribe.verify(SECRET, t))
  fails("bad signature", unsubscribe.verify(SECRET, ANN_TOKEN, "spring-2026"))
end)

case("a tampered token is rejected: other email, other MAC, other secret, truncated", function()
  local mac = ANN_TOKEN:match("%.(.*)$")
  local other = unsubscribe.token(SECRET, "bob@example.net"):match("^(.-)%.")
  fails("bad signature", unsubscribe.verify(SECRET, other .. "." .. mac))
  local flipped = mac:sub(1, 5) .. (mac:sub(6, 6) == "A" and "B" or "A") .. mac:sub(7)
  fails("bad signature", unsubscribe.verify(SECRET, ANN_TOKEN:match("^(.-)%.") .. "." .. flipped))
  fails("bad signature", unsubscribe.verify("another secret of 20 b", ANN_TOKEN))
  fails("bad signature", unsubscribe.verify(SECRET, ANN_TOKEN:sub(1, -3)))
end)

case("malformed tokens are rejected without raising", function()
  for _, t in ipairs { "", ".", "abc", "YW5u.", ".cGJ_", "a.b.c", "YW5u QGV4.cGJ", "YW5uQ.cGJ_yKv1WRSaDdXlaNWXpg",
                       "YR.cGJ_yKv1WRSaDdXlaNWXpg", "YWF.cGJ_yKv1WRSaDdXlaNWXpg",  -- non-canonical: unused bits set
                       "YQ.cGJ_yKv1WRSaDdXlaNWXp",    -- a MAC part of 4k+1 characters
                       "YW5uQGV4YW1wbGUubmV0=.cGJ_yKv1WRSaDdXlaNWXpg", string.rep("A", 5000) .. ".AAAA" } do
    fails("malformed token", unsubscribe.verify(SECRET, t))
  end
  fails("malformed token", unsubscribe.verify(SECRET, nil))
end)

case("token and verify: a missing or empty secret, a bad campaign, raise", function()
  checkerr("secret must be a string", unsubscribe.token, nil, "a@b.example")
  checkerr("secret is empty", unsubscribe.verify, "", ANN_TOKEN)
  checkerr("email must be a string", unsubscribe.token, SECRET, 42)
  checkerr("campaign must not contain a newline", unsubscribe.token, SECRET, "a@b", "x\ny")
end)

---------------------------------------------------------------- headers

local OPTS = {
  url = "https://acme.example/u/{{token}}",
  mailto = "unsub@acme.example",
  secret = SECRET,
}

case("headers: List-Unsubscribe with the https URL and the mailto, List-Unsubscribe-Post, the URL", function()
  local h, url = unsubscribe.headers(OPTS, { email = "ann@example.net" }, "ann@example.net")
  eq(h["List-Unsubscribe"], "<https://acme.example/u/" .. ANN_TOKEN .. ">, "
                            .. "<mailto:unsub@acme.example?subject=unsubscribe%20" .. ANN_TOKEN .. ">")
  eq(h["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")
  eq(url, "https://acme.example/u/" .. ANN_TOKEN)
  local n = 0
  for _ in pairs(h) do n = n + 1 end
  eq(n, 2, "header count")
end)

case("URL encoding: a field with &, #, spaces, non-ASCII, / and % is percent-encoded", function()
  local u = unsubscribe.new { url = "https://acme.example/u?t={{token}}&list={{list}}&n={{name}}", secret = SECRET }
  local h, url = u:headers({ list = "news & offers #1", name = "Zo\195\171/50%" }, "ann@example.net")
  eq(url, "https://acme.example/u?t=" .. ANN_TOKEN .. "&list=news%20%26%20offers%20%231&n=Zo%C3%AB%2F50%25")
  eq(h["List-Unsubscribe"], "<" .. url .. ">")
end)

case("a CSV value with CR/LF, <, >, commas cannot inject a header or another URI", function()
  local u = unsubscribe.new { url = "https://acme.example/u/{{token}}/{{list}}", mailto = "unsub@acme.example", secret = SECRET }
  local evil = "x>\r\nBcc: victim@example.com\r\n\r\n<https://evil.example/, <mailto:a@b>"
  local h, url = u:headers({ list = evil }, "ann@example.net\r\nX-Injected: 1")
  no_crlf(h)
  assert(not url:find("[<>, ]"), url)
  assert(url:find("%%0D%%0ABcc%%3A%%20victim%%40example.com"), url)
  local _, commas = h["List-Unsubscribe"]:gsub(",", "")
  eq(commas, 1, "exactly one separator between the two URIs")
  assert(unsubscribe.verify(SECRET, url:match("/u/([^/]+)/")) == "ann@example.net\r\nX-Injected: 1",
         "the address travels inside the token, encoded")
end)

case("row fields: numbers are converted, email falls back to the recipient, token is ours", function()
  local u = unsubscribe.new { url = "https://acme.example/u/{{id}}/{{email}}/{{token}}", secret = SECRET }
  local _, url = u:headers({ id = 42, token = "forged" }, "ann@example.net")
  eq(url, "https://acme.example/u/42/ann%40example.net/" .. ANN_TOKEN)
end)

case("a missing row field is nil, message (a failure of that row), not an error", function()
  local u = unsubscribe.new { url = "https://acme.example/u/{{token}}?l={{list}}", secret = SECRET }
  fails('field "list" is missing', u:headers({}, "ann@example.net"))
  local _, url = unsubscribe.new { url = "https://acme.example/u/{{token}}?l={{ list | 'all' }}", secret = SECRET }
                   :headers({}, "ann@example.net")
  eq(url, "https://acme.example/u/" .. ANN_TOKEN .. "?l=all")
  fails("no email address", u:headers({ list = "x" }, ""))
end)

case("a URL too long for one header line is nil, message", function()
  local u = unsubscribe.new { url = "https://acme.example/u/{{token}}?x={{x}}", secret = SECRET }
  fails("octets long", u:headers({ x = string.rep("\195\169", 400) }, "ann@example.net"))
end)

case("mailto only: no List-Unsubscribe-Post; without a secret the subject is just 'unsubscribe'", function()
  local h, url = unsubscribe.headers({ mailto = "unsub@acme.example" }, {}, "ann@example.net")
  eq(h["List-Unsubscribe"], "<mailto:unsub@acme.example?subject=unsubscribe>")
  eq(h["List-Unsubscribe-Post"], nil)
  eq(url, nil)
  local h2 = unsubscribe.headers({ mailto = "mailto:Unsub+News@B\195\188cher.example", secret = SECRET }, {}, "ann@example.net")
  eq(h2["List-Unsubscribe"], "<mailto:Unsub+News@xn--bcher-kva.example?subject=unsubscribe%20" .. ANN_TOKEN .. ">")
end)

case("one_click = false leaves List-Unsubscribe-Post out", function()
  local h = unsubscribe.headers({ url = OPTS.url, secret = SECRET, one_click = false }, {}, "ann@example.net")
  eq(h["List-Unsubscribe"], "<https://acme.example/u/" .. ANN_TOKEN .. ">")
  eq(h["List-Unsubscribe-Post"], nil)
end)

case("a token function replaces the HMAC token (no secret needed); its value is encoded", function()
  local u = unsubscribe.new { url = "https://acme.example/u/{{token}}", mailto = "u@acme.example",
                              token = function(row, email) return row.id .. " " .. email end }
  local h, url = u:headers({ id = "7/8" }, "ann@example.net")
  eq(url, "https://acme.example/u/7%2F8%20ann%40example.net")
  eq(h["List-Unsubscribe"], "<" .. url .. ">, <mailto:u@acme.example?subject=unsubscribe%207%2F8%20ann%40example.net>")
  local v = unsubscribe.new { url = "https://a.example/{{token}}", token = function() return nil, "no id" end }
  fails("token: no id", v:headers({}, "ann@example.net"))
end)

case("the campaign option goes into the token", function()
  local _, url = unsubscribe.headers({ url = OPTS.url, secret = SECRET, campaign = "spring" }, {}, "ann@example.net")
  eq(unsubscribe.verify(SECRET, url:match("/u/(.*)$"), "spring"), "ann@example.net")
end)

---------------------------------------------------------------- setup checks (programmer mistakes raise)

case("https check: an http (or other) URL raises when the object is made; HTTPS in capitals is fine", function()
  checkerr("is not https://", unsubscribe.new, { url = "http://acme.example/u/{{token}}", secret = SECRET })
  checkerr("is not https://", unsubscribe.new, { url = "{{base}}/u/{{token}}", secret = SECRET })
  checkerr("is not https://", unsubscribe.headers, { url = "ftp://acme.example/", secret = SECRET }, {}, "a@b.example")
  local _, url = unsubscribe.new { url = "HTTPS://acme.example/u/{{token}}", secret = SECRET }:headers({}, "ann@example.net")
  eq(url, "HTTPS://acme.example/u/" .. ANN_TOKEN)
end)

case("setup: no secret for {{token}}, a short secret, bad mailto, bad literal URL text, unknown options raise", function()
  checkerr("no secret is set", unsubscribe.new, { url = "https://acme.example/u/{{ token }}" })
  checkerr("use at least 16", unsubscribe.new, { url = OPTS.url, secret = "short" })
  checkerr("option secret must be a string", unsubscribe.new, { url = OPTS.url, secret = 42 })
  checkerr("is not a plain address", unsubscribe.new, { mailto = "Unsub <u@acme.example>" })
  checkerr("mailto", unsubscribe.new, { mailto = "u@acme.example?subject=x" })
  checkerr("is not a plain address", unsubscribe.new, { mailto = "a&b@acme.example" })
  checkerr("mailto: invalid domain", unsubscribe.new, { mailto = "u@acme_example" })
  checkerr("outside {{ }}", unsubscribe.new, { url = "https://acme.example/u/{{token}} now", secret = SECRET })
  checkerr("outside {{ }}", unsubscribe.new, { url = "https://acme.example/\195\188/{{token}}", secret = SECRET })
  checkerr("is never closed", unsubscribe.new, { url = "https://acme.example/{{#if x}}", secret = SECRET })
  checkerr("unknown option", unsubscribe.new, { url = OPTS.url, secret = SECRET, mail_to = "x@y.example" })
  checkerr("give url, mailto, or both", unsubscribe.new, { secret = SECRET })
  checkerr("email must be a string", unsubscribe.headers, OPTS, {}, nil)
end)

case("a URL without {{token}} needs no secret", function()
  local _, url = unsubscribe.new { url = "https://acme.example/u?id={{id}}" }:headers({ id = "a b" }, "ann@example.net")
  eq(url, "https://acme.example/u?id=a%20b")
end)

case("unsubscribe.headers makes the object once per options table", function()
  local calls = 0
  local opts = { url = "https://a.example/{{token}}", token = function() calls = calls + 1; return "t" end }
  for _ = 1, 3 do assert(unsubscribe.headers(opts, {}, "a@b.example")) end
  eq(calls, 3)
  eq(tostring(unsubscribe.new(OPTS)), "unsubscribe (https://acme.example/u/{{token}}, mailto:unsub@acme.example)")
end)

case("util.same: equality of strings of any bytes, lengths first", function()
  local same = require("mailshot.util").same
  eq(same("", ""), true)
  eq(same("abc", "abc"), true)
  eq(same("abc", "abd"), false)
  eq(same("abc", "ab"), false)
  eq(same("a\0b", "a\0b"), true)
  eq(same("a\0b", "a\0c"), false)
  checkerr("bad argument", same, "a", nil)
end)

case("the module writes no globals", no_new_globals)

return check.finish("test_unsubscribe.lua")
