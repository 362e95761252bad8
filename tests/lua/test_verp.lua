-- test_verp.lua - mailshot.verp: signed VERP return paths (round trip, case folding, forged
-- and foreign tokens, malformed input, the 64-octet local part), the campaign's `return_path`
-- option, and rows.emails_at (a CSV line -> address look-up for scripts).
-- Run: make mailshot && ./mailshot exec tests/lua/test_verp.lua
--      (or MAILSHOT_LUA_PATH=lua ./mailshot exec tests/lua/test_verp.lua to test the tree)
-- The expected tokens below were computed independently with Python's hmac/base64 modules:
--   H(m) = hmac.new(secret, m, sha256).digest()
--   tag  = b32encode(H("mailshot verp campaign\n" + campaign)[:3]).lower()[:4]
--   line = b32encode((line ^ int.from_bytes(H("mailshot verp line\n" + campaign)[:5])).to_bytes(5)).lower()
--   mac  = b32encode(H("mailshot verp\n" + campaign + "\n" + str(line) + "\n" + email)[:10]).lower()

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, checkerr = check.case, check.eq, check.checkerr
local fails, contains = check.fails, check.contains
local no_new_globals = check.globals_snapshot()

local verp = require "mailshot.verp"
local campaign = require "mailshot.campaign"
local rows = require "mailshot.rows"

local SECRET = "0123456789abcdef"
local DOMAIN = "bounces.acme.example"
local ANN_TOKEN = "q77ln2rfxklbzggqrbiy4pvlr2kk"     -- line 42, ann@example.net, campaign spring-2027

local DIR = os.tmpname()
os.remove(DIR)
assert(os.execute("mkdir -m 700 '" .. DIR .. "'"), "mkdir " .. DIR)

local function write(name, content)
  local f = assert(io.open(DIR .. "/" .. name, "wb"))
  assert(f:write(content))
  assert(f:close())
  return DIR .. "/" .. name
end

local function new(o)
  local opts = { domain = DOMAIN, secret = SECRET, campaign = "spring-2027" }
  for k, v in pairs(o or {}) do opts[k] = v end
  return verp.new(opts)
end

-- Flip the character at position i of s to another base32 character.
local function flip(s, i)
  local c = s:sub(i, i)
  return s:sub(1, i - 1) .. (c == "a" and "b" or "a") .. s:sub(i + 1)
end

---------------------------------------------------------------- the token

case("address: PREFIX+TOKEN@DOMAIN, the token as computed independently", function()
  local v = new()
  eq(v:address(42, "ann@example.net"), "b+" .. ANN_TOKEN .. "@" .. DOMAIN)
  eq(v:token(42, "ann@example.net"), ANN_TOKEN)
  eq(#ANN_TOKEN, verp.TOKEN_CHARS)
  -- the MAC is over the address lower-cased: the list's spelling does not matter
  eq(v:token(42, "Ann@EXAMPLE.net"), ANN_TOKEN)
  eq(v:token(42, " <ann@example.net> "), ANN_TOKEN)
end)

case("round trip: decode gives the line back, verify accepts the address", function()
  local v = new()
  for _, line in ipairs { 1, 2, 3, 42, 65536, 999999, 1000000000, 1000000007, verp.MAX_LINE } do
    local a = v:address(line, "ann@example.net")
    local d, why = v:decode(a)
    assert(d, why)
    eq(d.line, line, "line")
    eq(d.campaign_tag, v.tag, "tag")
    eq(d.campaign, "spring-2027")
    eq(v:verify(d, "ann@example.net"), true, "verify " .. line)
  end
end)

case("tokens of different lines and addresses differ; every one decodes to its own line", function()
  local v = new()
  local seen, n = {}, check.scaled(2000, 200)
  for line = 2, n + 1 do
    local t = v:token(line, "user" .. line .. "@example.net")
    assert(not seen[t], "duplicate token " .. t)
    seen[t] = true
    local d = assert(v:decode(t))
    eq(d.line, line)
  end
  assert(v:token(5, "a@example.net") ~= v:token(5, "b@example.net"))
end)

case("case folding: an MTA that upper-cases the address changes nothing", function()
  local v = new()
  local a = v:address(42, "ann@example.net")
  for _, s in ipairs { a:upper(), "<" .. a:upper() .. ">", "  " .. a .. "  ", "B+" .. ANN_TOKEN:upper(),
                       ANN_TOKEN:upper(), ANN_TOKEN, a .. "." --[[ a final dot on the domain ]] } do
    local d, why = v:decode(s)
    assert(d, ("%s: %s"):format(s, tostring(why)))
    eq(d.line, 42, s)
    eq(v:verify(d, "ANN@Example.Net"), true, s)
  end
end)

case("IDN: the address verifies in its U-label and A-label forms alike", function()
  local v = new()
  local d = assert(v:decode(v:address(7, "bob@b\xC3\xBCcher.example")))
  eq(v:verify(d, "bob@xn--bcher-kva.example"), true)
  eq(v:verify(d, "Bob@B\xC3\xBCcher.Example"), true)
  local d2 = assert(v:decode(v:address(7, "bob@xn--bcher-kva.example")))
  eq(v:verify(d2, "bob@b\xC3\xBCcher.example"), true)
  -- an IDN bounce domain is written as A-labels, and decodes from either form
  local w = new { domain = "b\xC3\xBCcher.example" }
  local a = w:address(3, "x@example.net")
  assert(a:find("@xn%-%-bcher%-kva%.example$"), a)
  eq(assert(w:decode(a:gsub("xn%-%-bcher%-kva", "b\xC3\xBCcher"))).line, 3)
end)

case("forged tokens: a changed MAC, line or address fails verify", function()
  local v = new()
  local a = v:address(42, "ann@example.net")
  local d = assert(v:decode(a))
  fails("forged token", v:verify(d, "bob@example.net"))
  fails("forged token", v:verify(d, ""))
  fails("forged token", v:verify(d, nil))
  for i = 13, 28 do          -- every MAC character
    local dd = assert(v:decode(flip(ANN_TOKEN, i)))
    fails("forged token", v:verify(dd, "ann@example.net"))
  end
  for i = 5, 12 do           -- every line character: another line, whose MAC this is not
    local dd = v:decode(flip(ANN_TOKEN, i))
    if dd then
      assert(dd.line ~= 42)
      fails("forged token", v:verify(dd, "ann@example.net"))
    end
  end
  -- a token made with another secret for the same campaign: another tag, so "another campaign"
  local other = new { secret = "another secret of 16+ octets" }
  fails("another campaign", v:decode(other:address(42, "ann@example.net")))
  -- a hand-made table with this campaign's tag and a guessed MAC
  fails("forged token", v:verify({ campaign_tag = v.tag, line = 42, mac = string.rep("a", 16) }, "ann@example.net"))
end)

case("another campaign: decode says so, and verify refuses its tokens", function()
  local spring, autumn = new(), new { campaign = "autumn-2027" }
  local a = spring:address(42, "ann@example.net")
  fails("another campaign", autumn:decode(a))
  local d = assert(spring:decode(a))
  fails("another campaign", autumn:verify(d, "ann@example.net"))
  -- the same CSV line and address in two campaigns: different tokens
  assert(spring:token(42, "ann@example.net") ~= autumn:token(42, "ann@example.net"))
end)

case("malformed and foreign input: nil, reason, never an error", function()
  local v = new()
  local a = v:address(42, "ann@example.net")
  fails("not ours", v:decode(nil))
  fails("not ours", v:decode("b+" .. ANN_TOKEN .. "@other.example"))
  fails("not ours", v:decode("x+" .. ANN_TOKEN .. "@" .. DOMAIN))
  fails("not ours", v:decode(ANN_TOKEN .. "@" .. DOMAIN))               -- no PREFIX+
  fails("not ours", v:decode("x+" .. ANN_TOKEN))
  fails("not ours", v:decode("postmaster@" .. DOMAIN))
  fails("not ours", v:decode(string.rep("b", 5000) .. "@" .. DOMAIN))
  fails("malformed token", v:decode(""))
  fails("malformed token", v:decode("b+@" .. DOMAIN))
  fails("malformed token", v:decode("b+" .. ANN_TOKEN:sub(2) .. "@" .. DOMAIN))       -- too short
  fails("malformed token", v:decode("b+" .. ANN_TOKEN .. "a@" .. DOMAIN))             -- too long
  fails("malformed token", v:decode("b+" .. ANN_TOKEN:sub(1, 27) .. "1@" .. DOMAIN))  -- 0 1 8 9 are not base32
  fails("malformed token", v:decode("b+" .. ANN_TOKEN:sub(1, 27) .. "=@" .. DOMAIN))
  fails("malformed token", v:decode("b+" .. ANN_TOKEN:sub(1, 10) .. "\0" .. ANN_TOKEN:sub(12) .. "@" .. DOMAIN))
  fails("malformed token", v:decode("b+" .. ANN_TOKEN .. "+x@" .. DOMAIN))
  fails("malformed token", v:decode("b+\xC3\xA9" .. ANN_TOKEN:sub(3) .. "@" .. DOMAIN))
  -- line 0 (the masked field decoding to 0) is not a CSV line
  local tag, mac = ANN_TOKEN:sub(1, 4), ANN_TOKEN:sub(13)
  local zero
  do
    -- line 1's field XOR 1 is the mask's encoding: flip the lowest bit of the last line character
    local l1 = v:token(1, "x@y.example"):sub(5, 12)
    local B32 = "abcdefghijklmnopqrstuvwxyz234567"
    local last = B32:find(l1:sub(8, 8), 1, true) - 1
    zero = l1:sub(1, 7) .. B32:sub((last ~ 1) + 1, (last ~ 1) + 1)
  end
  fails("malformed token", v:decode("b+" .. tag .. zero .. mac .. "@" .. DOMAIN))
  -- misuse raises
  checkerr("decode expects a string", v.decode, v, 42)
  checkerr("use v:decode", v.decode, "b+x@y")
  checkerr("verify expects the table v:decode returned", v.verify, v, "b+x", "ann@example.net")
  checkerr("email must be a string", v.verify, v, assert(v:decode(a)), 42)
end)

case("cost: addresses made and decoded+verified per second (a figure, not a bound)", function()
  local v = new()
  local n = check.scaled(50000, 2000)
  local list = {}
  local t0 = os.clock()
  for i = 1, n do list[i] = v:address(i + 1, "user" .. i .. "@example.net") end
  local t1 = os.clock()
  for i = 1, n do assert(v:verify(assert(v:decode(list[i])), "user" .. i .. "@example.net")) end
  local t2 = os.clock()
  print(string.format("     verp: %d addresses in %.3f s (%.0f/s); decode+verify %.0f/s", n, t1 - t0,
                      n / math.max(t1 - t0, 1e-6), n / math.max(t2 - t1, 1e-6)))
end)

---------------------------------------------------------------- the 64-octet bound

case("the local part is at most 64 octets, the path at most 256, for every line and prefix", function()
  local long_prefix = string.rep("p", 20)
  local v = new { prefix = long_prefix }
  for _, line in ipairs { 1, 1000000000, verp.MAX_LINE } do
    local a = v:address(line, string.rep("x", 64) .. "@" .. string.rep("y", 60) .. ".example")
    local lp = a:match("^(.*)@")
    assert(#lp <= 64, #lp)
    eq(#lp, 20 + 1 + 28)
    eq(assert(v:decode(a)).line, line)
  end
  -- the longest domain that fits a 256-octet path: "<" local "@" domain ">"
  local label = string.rep("d", 63)
  local dom = table.concat({ label, label, label }, ".") .. "." .. string.rep("e", 256 - 52 - 192)   -- 204 octets
  local w = new { domain = dom, prefix = long_prefix }
  local a = w:address(verp.MAX_LINE, "ann@example.net")
  eq(#a + 2, 256, "path")
  checkerr({ "too long", "RFC 5321" }, new, { domain = dom .. "e", prefix = long_prefix })
  checkerr("line must be a whole number from 1 to " .. verp.MAX_LINE, v.address, v, verp.MAX_LINE + 1, "a@b.example")
  checkerr("line must be a whole number", v.address, v, 0, "a@b.example")
  checkerr("line must be a whole number", v.address, v, 1.5, "a@b.example")
  checkerr("email must be a non-empty string", v.address, v, 1, "")
end)

---------------------------------------------------------------- options

case("options: clear errors for a missing or short secret, a bad domain, unknown keys", function()
  checkerr({ "no secret", "BOUNCE_SECRET", "environment", "never on the command line" }, verp.new,
           { domain = DOMAIN, campaign = "c" })
  checkerr({ "secret is 15 octets", "at least 16" }, verp.new, { domain = DOMAIN, campaign = "c", secret = string.rep("s", 15) })
  checkerr("'domain' is required", verp.new, { secret = SECRET, campaign = "c" })
  checkerr({ "domain", "invalid domain" }, verp.new, { domain = "bad_domain.example", secret = SECRET, campaign = "c" })
  checkerr({ "domain", "invalid domain" }, verp.new, { domain = "a..example", secret = SECRET, campaign = "c" })
  checkerr("fully qualified", verp.new, { domain = "localhost", secret = SECRET, campaign = "c" })
  checkerr("unknown option 'secert'", verp.new, { domain = DOMAIN, secert = SECRET, campaign = "c" })
  checkerr("option 'secret' must be a string", verp.new, { domain = DOMAIN, secret = 12345678901234567, campaign = "c" })
  checkerr("'campaign' is required", verp.new, { domain = DOMAIN, secret = SECRET })
  checkerr("control characters", verp.new, { domain = DOMAIN, secret = SECRET, campaign = "a\nb" })
  checkerr("prefix", verp.new, { domain = DOMAIN, secret = SECRET, campaign = "c", prefix = "b+x" })
  checkerr("prefix", verp.new, { domain = DOMAIN, secret = SECRET, campaign = "c", prefix = string.rep("p", 21) })
  checkerr("prefix", verp.new, { domain = DOMAIN, secret = SECRET, campaign = "c", prefix = "" })
  checkerr("options must be a table", verp.new, "x")
  -- a prefix in capitals is written in lower case, and decodes in any case
  local v = new { prefix = "Bounce_1" }
  local a = v:address(9, "ann@example.net")
  eq(a:sub(1, 9), "bounce_1+")
  eq(assert(v:decode(a:upper())).line, 9)
end)

case("secret_file: the secret from a file (trailing newline dropped), not both", function()
  local path = write("bounce.key", SECRET .. "\n")
  local v = verp.new { domain = DOMAIN, secret_file = path, campaign = "spring-2027" }
  eq(v:token(42, "ann@example.net"), ANN_TOKEN)
  checkerr("secret or secret_file, not both", verp.new, { domain = DOMAIN, secret_file = path, secret = SECRET, campaign = "c" })
  checkerr({ "secret_file", "No such file" }, verp.new, { domain = DOMAIN, secret_file = DIR .. "/nope", campaign = "c" })
  checkerr({ "secret_file", "short.key", "is 5 octets" }, verp.new,
           { domain = DOMAIN, secret_file = write("short.key", "short\n"), campaign = "c" })
  -- the secret is not shown by tostring
  assert(not tostring(v):find(SECRET, 1, true))
end)

---------------------------------------------------------------- the campaign option

local CSV = write("list.csv", table.concat({
  "email,name",                        -- 1
  "ann@example.net,Ann",               -- 2
  "",                                  -- 3 (blank)
  "\"bob@example.net\",\"Bob",         -- 4 a quoted field over two lines
  "Smith\"",                           -- 5
  "broken\"quote,x",                   -- 6 malformed
  "Carol@B\xC3\xBCcher.example,Carol", -- 7
  "dave@example.net,Dave",             -- 8
}, "\r\n") .. "\r\n")

local function camp(rp, def)
  local d = { recipients = CSV, from = "News <news@acme.example>", subject = "hi", text = "Hello {{name}}",
              return_path = rp }
  for k, v in pairs(def or {}) do d[k] = v end
  return campaign.new(d, DIR, "spring")
end

case("campaign return_path: the envelope sender is the row's signed address; From is unchanged", function()
  local c = camp { domain = DOMAIN, secret = SECRET, campaign = "spring-2027" }
  assert(c.verp, "c.verp")
  local row = { email = "ann@example.net", name = "Ann" }
  local m = assert(c:message(row, 42))
  eq(m.from, "b+" .. ANN_TOKEN .. "@" .. DOMAIN)
  assert(m.data:find("\r\nFrom: News <news@acme.example>\r\n", 1, true) or m.data:find("^From: News <news@acme.example>\r\n"),
         "From header")
  assert(not m.data:find("Return-Path", 1, true), "no Return-Path in what is sent")
  -- the Message-ID keeps the From domain
  assert(m.data:find("Message%-ID: <[^>]*@acme%.example>"), "Message-ID domain")
  -- without return_path the envelope sender is From's address, as before
  eq(assert(camp(nil):message({ email = "ann@example.net", name = "Ann" }, 42)).from, "news@acme.example")
  -- an IDN recipient: signed as sent (A-labels), verified from the list's spelling too
  local m2 = assert(c:message({ email = "carol@b\xC3\xBCcher.example", name = "C" }, 7))
  local d = assert(c.verp:decode(m2.from))
  eq(d.line, 7)
  eq(c.verp:verify(d, "Carol@B\xC3\xBCcher.example"), true)
end)

case("campaign return_path: the campaign id defaults to the name, then the script's name", function()
  local c = camp { domain = DOMAIN, secret = SECRET }
  eq(c.verp.campaign, "spring")
  eq(c.name, "spring")
  local named = camp({ domain = DOMAIN, secret = SECRET }, { name = "spring-2027" })
  eq(named.verp.campaign, "spring-2027")
  eq(named.verp:token(42, "ann@example.net"), ANN_TOKEN)
  -- no name to default to (a campaign made outside `mailshot run`): an error, not a guess
  checkerr({ "return_path", "campaign =" }, campaign.new,
           { recipients = CSV, from = "a@acme.example", text = "x", return_path = { domain = DOMAIN, secret = SECRET } }, DIR)
end)

case("campaign return_path: bad options stop the script with the option named", function()
  checkerr({ "mailshot.campaign: return_path:", "no secret", "BOUNCE_SECRET" }, camp, { domain = DOMAIN, secret = os.getenv "MAILSHOT_NO_SUCH_VAR" })
  checkerr({ "mailshot.campaign: return_path:", "unknown option 'domian'" }, camp, { domian = DOMAIN, secret = SECRET })
  checkerr({ "mailshot.campaign: return_path:", "invalid domain" }, camp, { domain = "-x.example", secret = SECRET })
  checkerr("option 'return_path' must be a table", camp, "b+x@y")
  -- secret_file is relative to the script's folder
  write("key.txt", SECRET .. "\n")
  local c = camp { domain = DOMAIN, secret_file = "key.txt", campaign = "spring-2027" }
  eq(c.verp:token(42, "ann@example.net"), ANN_TOKEN)
end)

---------------------------------------------------------------- rows.emails_at

case("rows.emails_at: the addresses on the lines asked for, as written in the file", function()
  local c = camp(nil)
  check.eq_deep(assert(rows.emails_at(c, { 2, 4, 7, 8 })),
                { [2] = "ann@example.net", [4] = "bob@example.net", [7] = "Carol@B\xC3\xBCcher.example", [8] = "dave@example.net" })
  check.eq_deep(assert(rows.emails_at(c, { [8] = true, [2] = true })), { [2] = "ann@example.net", [8] = "dave@example.net" })
  -- lines with no row of their own: the header, a blank line, inside a record, malformed, past the end
  check.eq_deep(assert(rows.emails_at(c, { 1, 3, 5, 6, 9, 1000 })), {})
  check.eq_deep(assert(rows.emails_at(c, {})), {})
  -- the campaign's email_field (matched as a run matches it) and delimiter
  local semi = write("semi.csv", "Name;E-Mail\r\nAnn;ann@example.net\r\nBob;bob@example.net\r\n")
  local c2 = campaign.new({ recipients = semi, delimiter = ";", email_field = "e-mail", from = "a@acme.example", text = "x" }, DIR)
  check.eq_deep(assert(rows.emails_at(c2, { 3 })), { [3] = "bob@example.net" })
  fails({ "nope.csv", "No such file" }, rows.emails_at(campaign.new({ recipients = "nope.csv", from = "a@acme.example", text = "x" }, DIR), { 2 }))
  checkerr("line number must be an integer", rows.emails_at, c, { "2" })
end)

case("rows.emails_at: streams; stops after the last line asked", function()
  local n = check.scaled(200000, 20000)
  local parts = { "email" }
  for i = 1, n do parts[#parts + 1] = ("user%d@example.net"):format(i) end
  local c = camp(nil, { recipients = write("big.csv", table.concat(parts, "\n") .. "\n") })
  collectgarbage()
  local before = collectgarbage("count")
  local t0 = os.clock()
  local got = assert(rows.emails_at(c, { n + 1, 2, n // 2 }))
  local dt = os.clock() - t0
  collectgarbage()
  local grew = collectgarbage("count") - before
  check.eq_deep(got, { [2] = "user1@example.net", [n // 2] = ("user%d@example.net"):format(n // 2 - 1),
                       [n + 1] = ("user%d@example.net"):format(n) })
  local t1 = os.clock()
  eq(assert(rows.emails_at(c, { 2 }))[2], "user1@example.net")
  local dt_first = os.clock() - t1
  print(string.format("     rows.emails_at: %d rows, 3 lines in %.3f s (%.0f rows/s); line 2 only in %.4f s; Lua heap kept: %+.1f KiB",
                      n, dt, n / math.max(dt, 1e-6), dt_first, grew))
  -- the whole file's rows would be megabytes; what is kept is the lines asked
  assert(grew < 256, "memory kept")
end)

case("the module writes no globals", no_new_globals)

os.execute("rm -rf '" .. DIR .. "'")

return check.finish("test_verp.lua")
