-- mailshot.unsubscribe: List-Unsubscribe (RFC 2369) and one-click unsubscribe (RFC 8058).
--
--   local unsubscribe = require "mailshot.unsubscribe"
--   local u = unsubscribe.new { url = "https://acme.example/u/{{token}}", mailto = "unsub@acme.example",
--                               secret = os.getenv "UNSUB_SECRET" }
--   local headers, url = u:headers(row, "ann@example.net")
--   --> { ["List-Unsubscribe"] = "<https://acme.example/u/TOKEN>, <mailto:unsub@acme.example?subject=unsubscribe%20TOKEN>",
--   --    ["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click" }, "https://acme.example/u/TOKEN"
--
-- Tokens: base64url(email) "." base64url(first 16 bytes of HMAC-SHA256(secret, campaign "\n" email)),
-- so the web endpoint learns the address from the token and proves it was ours
-- (unsubscribe.verify, or the same few lines in any language).  They do not expire: an
-- unsubscribe link must keep working (CAN-SPAM: at least 30 days; in practice for ever).
--
-- Header safety: every value the URL template inserts (row fields, the token) is
-- percent-encoded (RFC 3986: all but A-Z a-z 0-9 - . _ ~), and the finished URL must consist of
-- URI characters only, so no CSV value can bring CR, LF, "<", ">", a space or a comma into the
-- header.  We do not rely on the MIME builder's unfolding.
--
-- Errors, two tiers (README.md, "Lua API reference", conventions): a bad option (http URL, no
-- secret for {{token}}, a bad mailto
-- address) raises when the object is made; a row the URL can't be made for (a missing field,
-- a URL too long) returns nil, message.

local string, table, type, tostring, error, pairs, pcall, setmetatable, getmetatable, tonumber =
      string, table, type, tostring, error, pairs, pcall, setmetatable, getmetatable, tonumber
local find, sub, lower, format, gsub, byte, char, match =
      string.find, string.sub, string.lower, string.format, string.gsub, string.byte,
      string.char, string.match
local concat = table.concat

local template = require "mailshot.template"
local idna = require "mailshot.idna"
local hmac_sha256 = require("mailshot.util").hmac_sha256
local same = require("mailshot.util").same   -- MACs compared in constant time

local M = {}

local MAC_BYTES = 16                      -- 128 bits of HMAC-SHA256: plenty against forgery
local MIN_SECRET = 16                     -- octets; a short secret can be guessed offline
-- A header line holds 998 octets (RFC 5322 2.1.1); "List-Unsubscribe: <" URL ">," must fit on
-- one, and the MIME builder folds only at spaces.
local MAX_URL = 900
local MAX_TOKEN = 2048                    -- verify() refuses longer input unread
local ONE_CLICK = "List-Unsubscribe=One-Click"   -- RFC 8058 3.1: the POST body, and the header value

---------------------------------------------------------------- encodings

-- unsubscribe.url_encode(s) -> s with every octet but A-Z a-z 0-9 - . _ ~ as %XX (RFC 3986 2.3):
-- safe in a path segment, a query value and a mailto header value alike.
local function url_encode(s)
  return (gsub(s, "[^%w%-%._~]", function(c) return format("%%%02X", byte(c)) end))
end
M.url_encode = url_encode

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local B64_VAL = {}
for i = 1, 64 do B64_VAL[byte(B64, i)] = i - 1 end

-- base64url without padding (RFC 4648 5).
local function b64url(s)
  local out, n = {}, 0
  for i = 1, #s, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = a * 65536 + (b or 0) * 256 + (c or 0)
    local k = c and 4 or b and 3 or 2
    for j = 1, k do
      local d = (v >> (18 - 6 * (j - 1))) & 63
      n = n + 1
      out[n] = sub(B64, d + 1, d + 1)
    end
  end
  return concat(out)
end

-- The inverse; nil for anything that is not canonical base64url (bad characters, a length of
-- 4k+1, non-zero unused bits), so one string has one token.
local function b64url_decode(s)
  if #s % 4 == 1 or find(s, "[^%w%-_]") then return nil end
  local out, n = {}, 0
  for i = 1, #s, 4 do
    local v, k = 0, 0
    for j = i, i + 3 do
      local d = B64_VAL[byte(s, j)]
      v, k = v * 64 + (d or 0), k + (d and 1 or 0)
    end
    local bytes = char((v >> 16) & 255, (v >> 8) & 255, v & 255)
    n = n + 1
    out[n] = sub(bytes, 1, k - 1)
  end
  local r = concat(out)
  if b64url(r) ~= s then return nil end
  return r
end

local function hex_to_bytes(h)
  return (gsub(h, "%x%x", function(x) return char(tonumber(x, 16)) end))
end

---------------------------------------------------------------- tokens

local function check_secret(secret, fname)
  if type(secret) ~= "string" then error(fname .. ": secret must be a string, got " .. type(secret), 3) end
  if secret == "" then error(fname .. ": secret is empty", 3) end
end

local function check_campaign(campaign, fname)
  if campaign == nil then return "" end
  if type(campaign) ~= "string" then error(fname .. ": campaign must be a string", 3) end
  if find(campaign, "\n", 1, true) then error(fname .. ": campaign must not contain a newline", 3) end
  return campaign
end

local function mac(secret, email, campaign)
  return b64url(hex_to_bytes(sub(hmac_sha256(secret, campaign .. "\n" .. email), 1, 2 * MAC_BYTES)))
end

-- unsubscribe.token(secret, email [, campaign]) -> token
-- base64url(email) .. "." .. base64url(HMAC-SHA256(secret, campaign .. "\n" .. email)[1..16]);
-- campaign defaults to "" (so the message is "\n" .. email).  URL-safe as it is.
function M.token(secret, email, campaign)
  check_secret(secret, "unsubscribe.token")
  if type(email) ~= "string" then error("unsubscribe.token: email must be a string, got " .. type(email), 2) end
  campaign = check_campaign(campaign, "unsubscribe.token")
  return b64url(email) .. "." .. mac(secret, email, campaign)
end


-- unsubscribe.verify(secret, token [, campaign]) -> email | nil, reason
-- reason: "malformed token" (not two base64url parts, too long, not a string) or
-- "bad signature" (altered, another secret, or another campaign).
function M.verify(secret, token, campaign)
  check_secret(secret, "unsubscribe.verify")
  campaign = check_campaign(campaign, "unsubscribe.verify")
  if type(token) ~= "string" or #token > MAX_TOKEN then return nil, "malformed token" end
  local e64, m64 = match(token, "^([%w%-_]+)%.([%w%-_]+)$")
  local email = e64 and b64url_decode(e64)
  if not email or not b64url_decode(m64) then return nil, "malformed token" end
  if not same(mac(secret, email, campaign), m64) then return nil, "bad signature" end
  return email
end

---------------------------------------------------------------- headers

local OPTS = { url = "string", mailto = "string", secret = "string", token = "function",
               campaign = "string", one_click = "boolean" }

-- URI characters (RFC 3986 2.2, 2.3) and "%" of a percent-encoding.
local URI_CHARS = "^[%w%-%._~:/%?#%[%]@!%$&'%(%)%*%+,;=%%]*$"

-- The mailto address: a dot-atom local part without the characters RFC 6068 2 would make us
-- encode (% / ? # &), and a domain that converts to A-labels.
local function mailto_address(addr)
  addr = gsub(addr, "^[Mm][Aa][Ii][Ll][Tt][Oo]:", "")
  local loc, dom = match(addr, "^([%w!%$'%*%+=%^_`{|}~%.%-]+)@([^@]+)$")
  if not loc or find(loc, "^%.") or find(loc, "%.$") or find(loc, "%.%.") then
    error(format("unsubscribe: mailto %q is not a plain address (local@domain)", addr), 3)
  end
  local ascii, why = idna.to_ascii(dom)
  if not ascii then error("unsubscribe: mailto: " .. why, 3) end
  return loc .. "@" .. ascii
end

-- Does the URL template use the token?  Any tag mentioning the name counts.
local function uses_token(source)
  for tag in source:gmatch("{{(.-)}}") do
    if find(tag, "%f[%w_]token%f[^%w_]") then return true end
  end
  return false
end

local function compile_url(url)
  if not find(lower(url), "^https://") then
    error(format("unsubscribe: url %q is not https:// (RFC 8058 one-click needs an https URI)", url), 3)
  end
  local literal = gsub(gsub(url, "{{{.-}}}", ""), "{{.-}}", "")
  local bad = match(literal, "[^%w%-%._~:/%?#%[%]@!%$&'%(%)%*%+,;=%%]")
  if bad then
    error(format("unsubscribe: url %q has %q outside {{ }}: write it percent-encoded", url, bad), 3)
  end
  local ok, tpl = pcall(template.new, url, "unsubscribe url")
  if not ok then error(tpl, 3) end
  return tpl
end

local Unsub = {}
Unsub.__index = Unsub
Unsub.__name = "mailshot.unsubscribe"

-- unsubscribe.new(opts) -> object with :headers(row, email); raises on bad options.
-- opts: url (https template: {{token}} and row fields, values percent-encoded), mailto (an
-- address; the token goes in the subject), secret (the HMAC key, >= 16 octets; required when
-- the URL uses {{token}} and no token function is given), token (function(row, email) ->
-- token), campaign (mixed into the HMAC), one_click (default true: List-Unsubscribe-Post).
function M.new(opts)
  if type(opts) ~= "table" then error("unsubscribe: options must be a table", 2) end
  for k, v in pairs(opts) do
    if not OPTS[k] then error("unsubscribe: unknown option " .. tostring(k), 2) end
    if type(v) ~= OPTS[k] then error(format("unsubscribe: option %s must be a %s, got %s", k, OPTS[k], type(v)), 2) end
  end
  if not opts.url and not opts.mailto then error("unsubscribe: give url, mailto, or both", 2) end
  local self = setmetatable({ one_click = opts.one_click ~= false, token_fn = opts.token,
                              secret = opts.secret, campaign = opts.campaign }, Unsub)
  if opts.url then self.url = compile_url(opts.url) end
  if opts.mailto then self.mailto = mailto_address(opts.mailto) end
  if self.secret and #self.secret < MIN_SECRET then
    error(format("unsubscribe: secret is %d octets; use at least %d random ones", #self.secret, MIN_SECRET), 2)
  end
  if self.url and uses_token(opts.url) and not self.secret and not self.token_fn then
    error("unsubscribe: the url uses {{token}} but no secret is set (is UNSUB_SECRET in the environment?)", 2)
  end
  if self.campaign then check_campaign(self.campaign, "unsubscribe") end
  return self
end

-- The row as the URL template sees it: every value percent-encoded (the token too: ours is
-- URL-safe already, a token function's may not be); `token` is ours, `email` falls back to the
-- recipient's address.
local function encoded_row(row, email, token)
  return setmetatable({}, { __index = function(_, k)
    if k == "token" then return token and url_encode(token) end
    local v = row[k]
    if v == nil and k == "email" then v = email end
    if v == nil or v == false then return v end
    if type(v) ~= "string" then v = tostring(v) end
    return url_encode(v)
  end })
end

-- u:headers(row, email) -> headers, url | nil, message
-- headers: { ["List-Unsubscribe"] = "<url>, <mailto:...>", ["List-Unsubscribe-Post"] =
-- "List-Unsubscribe=One-Click" (with a url and one_click) }; url: the rendered URL or nil.
function Unsub:headers(row, email)
  if getmetatable(self) ~= Unsub then error("unsubscribe: use u:headers(row, email)", 2) end
  if row == nil then row = {} end
  if type(row) ~= "table" and type(row) ~= "userdata" then error("unsubscribe.headers: row must be a table", 2) end
  if type(email) ~= "string" then error("unsubscribe.headers: email must be a string, got " .. type(email), 2) end
  if email == "" then return nil, "unsubscribe: no email address" end
  local token
  if self.token_fn then
    local t, err = self.token_fn(row, email)
    if t == nil then return nil, "unsubscribe: token: " .. tostring(err or "no token") end
    if type(t) ~= "string" or t == "" then error("unsubscribe: the token function must return a non-empty string", 2) end
    token = t
  elseif self.secret then
    token = M.token(self.secret, email, self.campaign)
  end
  local parts, url = {}, nil
  if self.url then
    local err
    url, err = self.url:render(encoded_row(row, email, token), { html = false })
    if not url then return nil, "unsubscribe: " .. err end
    if not find(url, URI_CHARS) or not find(lower(url), "^https://[^/?#]") then
      return nil, format("unsubscribe: the url %q is not a valid https URI", url)
    end
    if #url > MAX_URL then return nil, format("unsubscribe: the url is %d octets long (limit %d)", #url, MAX_URL) end
    parts[1] = "<" .. url .. ">"
  end
  if self.mailto then
    local subject = token and "unsubscribe " .. token or "unsubscribe"
    parts[#parts + 1] = "<mailto:" .. self.mailto .. "?subject=" .. url_encode(subject) .. ">"
  end
  local h = { ["List-Unsubscribe"] = concat(parts, ", ") }
  if url and self.one_click then h["List-Unsubscribe-Post"] = ONE_CLICK end
  return h, url
end

Unsub.__tostring = function(self)
  return "unsubscribe (" .. (self.url and self.url.source or "") .. (self.url and self.mailto and ", " or "")
         .. (self.mailto and "mailto:" .. self.mailto or "") .. ")"
end

-- unsubscribe.headers(opts, row, email) -> headers, url | nil, message
-- The same as unsubscribe.new(opts):headers(row, email), the object made once per opts table
-- (remembered while the table lives; don't change the table afterwards).
local made = setmetatable({}, { __mode = "k" })
function M.headers(opts, row, email)
  if type(opts) ~= "table" then error("unsubscribe.headers: options must be a table", 2) end
  local u = made[opts]
  if not u then
    u = M.new(opts)
    made[opts] = u
  end
  return u:headers(row, email)
end

return M
