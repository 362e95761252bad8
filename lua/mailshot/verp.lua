-- mailshot.verp: VERP-style return paths (variable envelope return paths), signed.
--
--   local verp = require "mailshot.verp"
--   local v = verp.new { domain = "bounces.acme.example", secret = os.getenv "BOUNCE_SECRET",
--                        campaign = "spring-2027", prefix = "b" }
--   v:address(42, "ann@example.net")   --> "b+tttt llllllll mmmmmmmmmmmmmmmm@bounces.acme.example"
--                                           (28 characters, without the spaces)
--   local d, why = v:decode("B+TTTT...@Bounces.Acme.Example")   -- any case
--   --> { campaign_tag = "tttt", line = 42, ... } | nil, "not ours" / "malformed token" / "another campaign"
--   v:verify(d, "ann@example.net")    --> true | nil, "forged token"
--
-- Each message's envelope sender (MAIL FROM) names its campaign and CSV line, so a bounce that
-- quotes nothing of the original (no headers, no recipient) still says whom it is about: the
-- bounce comes back to that address.  The address itself is not in the token (it would not fit
-- in the 64 octets of a local part, RFC 5321 4.5.3.1.1); `mailshot bounces` finds it from the
-- line in the campaign's CSV file (its index of the list) or from the DSN's recipients, and v:verify
-- checks it against the MAC, so nobody can make us suppress an address by mailing us a
-- made-up token.
--
-- The token: 28 characters of lower-case base32 (RFC 4648 alphabet a-z 2-7: no case to lose, as
-- some MTAs fold the case of local parts), three fixed-width fields, each cut from an
-- HMAC-SHA256 under the secret:
--   tag   4 chars, 20 bits  HMAC(secret, "mailshot verp campaign\n" .. campaign): which campaign
--   line  8 chars, 40 bits  the CSV line XOR HMAC(secret, "mailshot verp line\n" .. campaign):
--                           masked, so recipients do not read their place in the list (a mask, not
--                           encryption: two recipients can learn the difference of their lines)
--   mac  16 chars, 80 bits  HMAC(secret, "mailshot verp\n" .. campaign .. "\n" .. line .. "\n" ..
--                           the address lower-cased, its domain as A-labels)
-- 80 bits of MAC: a forger must send about 2^79 bounces to get one address suppressed.  Lines go
-- up to 2^40 - 1.  The local part is PREFIX "+" TOKEN: at most 20 + 1 + 28 = 49 octets.
--
-- Errors: bad options raise when the object is made (the messages say where a secret comes
-- from); decode and verify return nil, reason for anything a bounce can bring.

local string, table, type, tostring, tonumber, error, pairs, setmetatable, getmetatable, math, io =
      string, table, type, tostring, tonumber, error, pairs, setmetatable, getmetatable, math, io
local find, sub, lower, format, byte, match, gsub = string.find, string.sub, string.lower, string.format,
      string.byte, string.match, string.gsub
local concat = table.concat

local idna = require "mailshot.idna"
local hmac_sha256 = require("mailshot.util").hmac_sha256
local same = require("mailshot.util").same   -- MACs compared in constant time

local M = {}

local MIN_SECRET = 16                 -- octets; a short secret can be guessed offline
local MAX_PREFIX = 20
local MAX_CAMPAIGN = 200
local TAG_CHARS, LINE_CHARS, MAC_CHARS = 4, 8, 16
local TOKEN_CHARS = TAG_CHARS + LINE_CHARS + MAC_CHARS
local MAX_LINE = (1 << (5 * LINE_CHARS)) - 1     -- 2^40 - 1
local MAX_LOCAL = 64                  -- RFC 5321 4.5.3.1.1
assert(MAX_PREFIX + 1 + TAG_CHARS + LINE_CHARS + MAC_CHARS <= MAX_LOCAL, "a local part must fit 64 octets")
local MAX_PATH = 256                  -- RFC 5321 4.5.3.1.3: "<" address ">"
local MAX_INPUT = 1024                -- decode() looks no further than this

M.TOKEN_CHARS, M.MAX_LINE, M.MIN_SECRET = TOKEN_CHARS, MAX_LINE, MIN_SECRET

---------------------------------------------------------------- base32 (lower case)

local B32 = "abcdefghijklmnopqrstuvwxyz234567"
local B32_VAL = {}
for i = 1, 32 do B32_VAL[byte(B32, i)] = i - 1 end

-- Every 10-bit value as its two base32 characters: a token is a few table look-ups.
local PAIR = {}
for v = 0, 1023 do PAIR[v] = sub(B32, (v >> 5) + 1, (v >> 5) + 1) .. sub(B32, (v & 31) + 1, (v & 31) + 1) end

-- The low 20 bits of integer v as 4 base32 characters, most significant first.
local function b32_20(v) return PAIR[(v >> 10) & 1023] .. PAIR[v & 1023] end

-- The low 40 bits of v as 8 characters.
local function b32_40(v) return b32_20(v >> 20) .. b32_20(v) end

-- s[i .. i+n-1] (n <= 12) as an integer; nil when a character is not base32 (lower case: the caller folds).
local function b32_int(s, i, n)
  local v = 0
  for j = i, i + n - 1 do
    local d = B32_VAL[byte(s, j)]
    if not d then return nil end
    v = (v << 5) | d
  end
  return v
end

-- The first `chars` hex digits of an HMAC as an integer (at most 15: 60 bits).
local function hex_int(hex, chars) return math.tointeger(tonumber(sub(hex, 1, chars), 16)) end

-- The first 20 * groups bits of an HMAC (hex) as 4 * groups base32 characters (20 bits: 5 hex digits).
local function hex_b32(hex, groups)
  if groups == 1 then return b32_20(hex_int(hex, 5)) end
  local out = {}
  for k = 0, groups - 1 do out[k + 1] = b32_20(hex_int(sub(hex, 5 * k + 1), 5)) end
  return concat(out)
end


---------------------------------------------------------------- addresses

-- The address as the MAC sees it: surrounding spaces and one pair of <> dropped, lower-cased,
-- the domain as A-labels when it converts (a list may hold "Ann@Bücher.example", a DSN
-- "ann@xn--bcher-kva.example": both are one address).
local function normalize(email)
  email = match(email, "^%s*<?(.-)>?%s*$")
  local at = find(email, "@[^@]*$")
  if not at then return lower(email) end
  local dom = sub(email, at + 1)
  if find(dom, "[\128-\255]") then dom = idna.to_ascii(dom) or lower(dom)
  else dom = lower((gsub(dom, "%.$", ""))) end      -- what to_ascii makes of an ASCII name, 10 times faster
  return lower(sub(email, 1, at)) .. dom
end
M.normalize = normalize

---------------------------------------------------------------- the object

local Verp = {}
Verp.__index = Verp
Verp.__name = "mailshot.verp"

local OPTS = { domain = "string", secret = "string", secret_file = "string", campaign = "string", prefix = "string" }

local SECRET_HINT = "set it from the environment (secret = os.getenv \"BOUNCE_SECRET\") or a file "
                    .. "(secret_file = \"bounce.key\"), never on the command line; make one with "
                    .. "`openssl rand -base64 32`"

local function read_secret(path)
  local f, err = io.open(path, "rb")
  if not f then error("verp: secret_file: " .. tostring(err), 3) end
  local s = f:read("a") or ""
  f:close()
  return (s:gsub("[\r\n]+$", "")), path
end

-- verp.new(opts) -> v; raises on bad options.  opts: domain (required; an IDN is converted to
-- A-labels), secret or secret_file (required, >= 16 octets), campaign (required: the campaign's
-- id, mixed into every token), prefix (default "b": letters, digits, "-" and "_", at most 20).
function M.new(opts)
  if type(opts) ~= "table" then error("verp: options must be a table", 2) end
  for k, v in pairs(opts) do
    if not OPTS[k] then error(format("verp: unknown option '%s' (known: campaign, domain, prefix, secret, secret_file)", tostring(k)), 2) end
    if type(v) ~= OPTS[k] then error(format("verp: option '%s' must be a %s, got %s", k, OPTS[k], type(v)), 2) end
  end
  if opts.domain == nil then error("verp: 'domain' is required (the domain bounces come back to, e.g. \"bounces.acme.example\")", 2) end
  local domain, why = idna.to_ascii(opts.domain)
  if not domain then error("verp: domain: " .. why, 2) end
  if not find(domain, ".", 1, true) then
    error(format("verp: domain %q must be a fully qualified name (bounces.acme.example) with an MX or A record", opts.domain), 2)
  end

  local secret, from = opts.secret, "secret"
  if secret ~= nil and opts.secret_file ~= nil then error("verp: give secret or secret_file, not both", 2) end
  if opts.secret_file ~= nil then secret, from = read_secret(opts.secret_file) end
  if secret == nil then error("verp: no secret (is BOUNCE_SECRET in the environment?): " .. SECRET_HINT, 2) end
  if #secret < MIN_SECRET then
    error(format("verp: %s is %d octets; use at least %d random ones: %s", from == "secret" and "secret" or "secret_file " .. from,
                 #secret, MIN_SECRET, SECRET_HINT), 2)
  end

  local campaign = opts.campaign
  if campaign == nil or campaign == "" then error("verp: 'campaign' is required (the campaign's id, e.g. \"spring-2027\")", 2) end
  if #campaign > MAX_CAMPAIGN or find(campaign, "%c") then
    error(format("verp: campaign must be at most %d characters, without control characters", MAX_CAMPAIGN), 2)
  end

  local prefix = opts.prefix or "b"
  if not find(prefix, "^[%w][%w_-]*$") or #prefix > MAX_PREFIX then
    error(format("verp: prefix %q must be 1 to %d letters, digits, '-' or '_', starting with a letter or digit", prefix, MAX_PREFIX), 2)
  end
  prefix = lower(prefix)
  local path = 1 + #prefix + 1 + TOKEN_CHARS + 1 + #domain + 1
  if path > MAX_PATH then
    error(format("verp: domain %q is too long: the return path would be %d octets (RFC 5321 allows %d)", domain, path, MAX_PATH), 2)
  end

  local tag = hex_b32(hmac_sha256(secret, "mailshot verp campaign\n" .. campaign), TAG_CHARS // 4)
  local mask = hex_int(hmac_sha256(secret, "mailshot verp line\n" .. campaign), 10)
  return setmetatable({ domain = domain, campaign = campaign, prefix = prefix, tag = tag,
                        secret = secret, mask = mask }, Verp)
end

local function check_self(self, name)
  if getmetatable(self) ~= Verp then error(format("verp: use v:%s(...)", name), 3) end
end

local function mac(self, line, email)
  return hex_b32(hmac_sha256(self.secret, "mailshot verp\n" .. self.campaign .. "\n" .. line .. "\n"
                             .. normalize(email)), MAC_CHARS // 4)
end

-- v:token(line, email) -> the 28-character token.
function Verp:token(line, email)
  check_self(self, "token")
  line = math.tointeger(line) or line             -- 42.0 is line 42
  if math.type(line) ~= "integer" or line < 1 or line > MAX_LINE then
    error(format("verp: line must be a whole number from 1 to %d, got %s", MAX_LINE, tostring(line)), 2)
  end
  if type(email) ~= "string" or email == "" then error("verp: email must be a non-empty string, got " .. type(email), 2) end
  return self.tag .. b32_40(line ~ self.mask) .. mac(self, line, email)
end

-- v:address(line, email) -> "PREFIX+TOKEN@DOMAIN": the envelope sender for that row.
function Verp:address(line, email)
  check_self(self, "address")
  return self.prefix .. "+" .. self:token(line, email) .. "@" .. self.domain
end

-- v:decode(address_or_token) -> { campaign_tag, line, campaign, token, mac } | nil, reason
-- Takes an address (any case, with or without <>), "PREFIX+TOKEN" or the bare token.  reason:
-- "not ours" (another domain or prefix, no address at all), "malformed token" (not 28 base32
-- characters, line 0), "another campaign" (the tag is not this campaign's: another campaign
-- or another secret).  Nothing is verified yet: v:verify(d, email) does that.
function Verp:decode(s)
  check_self(self, "decode")
  if s == nil then return nil, "not ours" end
  if type(s) ~= "string" then error("verp: decode expects a string, got " .. type(s), 2) end
  if #s > MAX_INPUT then return nil, "not ours" end
  s = lower(match(s, "^%s*<?(.-)>?%s*$"))
  local at = find(s, "@[^@]*$")
  local token = s
  if at then
    local dom = sub(s, at + 1):gsub("%.$", "")
    if dom ~= self.domain and idna.to_ascii(dom) ~= self.domain then return nil, "not ours" end
    token = sub(s, 1, at - 1)
  end
  local plus = find(token, "+", 1, true)
  if plus then
    if sub(token, 1, plus - 1) ~= self.prefix then return nil, "not ours" end
    token = sub(token, plus + 1)
  elseif at then
    return nil, "not ours"                  -- an address of our domain without PREFIX+
  end
  if #token ~= TOKEN_CHARS or find(token, "[^a-z2-7]") then return nil, "malformed token" end
  local tag = sub(token, 1, TAG_CHARS)
  local masked = b32_int(token, TAG_CHARS + 1, LINE_CHARS)
  if tag ~= self.tag then return nil, "another campaign" end
  local line = masked ~ self.mask
  if line < 1 then return nil, "malformed token" end
  return { campaign_tag = tag, line = line, campaign = self.campaign, token = token,
           mac = sub(token, TAG_CHARS + LINE_CHARS + 1) }
end

-- v:verify(decoded, email) -> true | nil, "forged token"
-- Is the token's MAC the one we made for (this campaign, decoded.line, email)?  email: the
-- address from the CSV line, or a DSN's Final-Recipient / Original-Recipient (case and an IDN
-- domain's form do not matter).  nil, "another campaign" for a table another campaign decoded.
function Verp:verify(d, email)
  check_self(self, "verify")
  if type(d) ~= "table" or math.type(d.line) ~= "integer" or type(d.mac) ~= "string" then
    error("verp: verify expects the table v:decode returned", 2)
  end
  if email == nil or email == "" then return nil, "forged token" end
  if type(email) ~= "string" then error("verp: verify: email must be a string, got " .. type(email), 2) end
  if d.campaign_tag ~= self.tag then return nil, "another campaign" end
  if d.line < 1 or d.line > MAX_LINE then return nil, "forged token" end
  if not same(mac(self, d.line, email), lower(d.mac)) then return nil, "forged token" end
  return true
end

Verp.__tostring = function(self)
  return format("verp (%s+TOKEN@%s, campaign %q)", self.prefix, self.domain, self.campaign)
end

return M
