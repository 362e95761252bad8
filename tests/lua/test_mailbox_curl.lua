-- test_mailbox_curl.lua - mailshot.mailbox_curl without a server: URLs, refusals before any connection,
-- the binding's argument checks.  (Against a real dovecot: tests/integration/test_mailbox_imap.py.)
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, checkerr, contains = check.case, check.eq, check.checkerr, check.contains

local mc = require "mailshot.mailbox_curl"
local mailfetch = require "mailshot.mailfetch"

case("IMAP URLs: the mailbox (INBOX by default, percent-decoded), the user, no userinfo in where", function()
  local u = assert(mc.parse_url("imaps://bounces@mail.example.com:993/Bounces%20In"))
  eq(u.proto, "imap"); eq(u.tls, "implicit"); eq(u.user, "bounces")
  eq(u.mailbox, "Bounces In"); eq(u.mailbox_path, "Bounces%20In")
  eq(u.base, "imaps://mail.example.com:993")
  eq(u.where, "imaps://mail.example.com:993/Bounces%20In")
  eq(assert(mc.parse_url("imap://mail.example.com")).mailbox, "INBOX")
  eq(assert(mc.parse_url("IMAP://mail.example.com/")).tls, "required")   -- STARTTLS, required
  eq(assert(mc.parse_url("imap://mail.example.com/INBOX;UIDVALIDITY=5")).mailbox, "INBOX")
end)

case("POP3 URLs name no mailbox", function()
  local u = assert(mc.parse_url("pop3s://mail.example.com/"))
  eq(u.proto, "pop3"); eq(u.tls, "implicit"); eq(u.where, "pop3s://mail.example.com")
  eq(assert(mc.parse_url("pop3://mail.example.com")).tls, "required")
  local ok, err = mc.parse_url("pop3s://mail.example.com/INBOX")
  eq(ok, nil); contains(err, "names no mailbox")
end)

case("other schemes and a password in the URL are refused, and the password is not repeated", function()
  local ok, err = mc.parse_url("https://mail.example.com/")
  eq(ok, nil); contains(err, "not an imap://")
  ok, err = mc.open("imaps://bounces:Secret123@mail.example.com/INBOX", { password = "x" })
  eq(ok, nil); contains(err, "a password in the URL is refused")
  assert(not err:find("Secret123", 1, true), err)
  ok, err = mc.open("imaps://mail.example.com/INBOX", { password = "x" })
  eq(ok, nil); contains(err, "no user")
end)

case("no password anywhere: a clear error before any connection", function()
  -- MAILSHOT_IMAP_PASSWORD may be set around this test: a password_file that does not exist wins
  local ok, err = mc.open("imaps://u@127.0.0.1:1/INBOX", { password_file = "/nonexistent/pw" })
  eq(ok, nil); contains(err, "--password-file")
end)

case("argument checks raise", function()
  checkerr({ "url must be a string" }, mc.open, nil)
  checkerr({ "max_bytes" }, mc.open, "imaps://u@127.0.0.1:1/", { password = "x", max_bytes = 0 })
  checkerr({ "timeout must be in [1, 3600]" }, mailfetch.new, { timeout = 0 })
  checkerr({ "option 'timeout' must be a number" }, mailfetch.new, { timeout = "soon" })
  checkerr({ "option 'password' must not contain a NUL byte" }, mailfetch.new, { password = "a\0b" })
  checkerr({ "option 'user' must be a string" }, mailfetch.new, { user = {} })
  checkerr({ "tls" }, mailfetch.new, { tls = "sometimes" })
  local h = assert(mailfetch.new{})
  checkerr({ "one line" }, h.perform, h, "imap://127.0.0.1:1/", "NOOP\r\nLOGOUT")
  checkerr({ "NUL" }, h.perform, h, "imap://127.0.0.1:1/\0x")
  h:close()
  checkerr({ "closed" }, h.perform, h, "imap://127.0.0.1:1/")
end)

case("a refused connection is kind \"connect\"", function()
  local h = assert(mailfetch.new{ timeout = 5 })
  local body, err, kind = h:perform("imaps://127.0.0.1:1/INBOX", "NOOP")
  eq(body, nil); eq(kind, "connect"); contains(err, "127.0.0.1")
  h:close()
end)

case("a password found in a message is masked; a very short one mangles nothing", function()
  -- curl's messages never hold the password: a password equal to a word of one shows the masking
  local h = assert(mailfetch.new{ user = "u", password = "connect", timeout = 5 })
  local _, err = h:perform("imaps://127.0.0.1:1/INBOX", "NOOP")
  assert(not err:find("connect", 1, true), err); contains(err, "***")
  h:close()
  h = assert(mailfetch.new{ user = "u", password = "p", timeout = 5 })
  _, err = h:perform("imaps://127.0.0.1:1/INBOX", "NOOP")
  contains(err, "port 1")
  h:close()
end)

return check.finish("test_mailbox_curl.lua")
