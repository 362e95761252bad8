-- mailshot.mailbox_curl: bounce mailboxes on an IMAP or POP3 server, read through libcurl
-- (the C binding mailshot.mailfetch).  mailshot.mailbox sends imap://, imaps://, pop3:// and
-- pop3s:// sources here.
--
--   local box, err = mailbox_curl.open("imaps://mail.example.com/INBOX", {
--     user = "bounces", password = "...",   -- or password_file =, else $MAILSHOT_IMAP_PASSWORD
--     ca_file = "ca.pem", insecure = false, timeout = 30, allow_plaintext = false,
--     max_bytes = 10 MiB, all = false, skip = { [id] = true, ... } })
--   for msg in box:messages() do ... end   -- { id =, raw =, size =, where = } (box:each() the same;
--                                          -- raw = nil, error = ... when a message could not be read)
--   box:mark(msg, "seen") / box:mark(msg, "move", "Processed") / box:mark(msg, "quarantine", "Bad")
--   box:close()
--
-- Decisions, as a careful operator would want them:
-- * TLS always, verified: imaps:// and pop3s:// are TLS from the first byte; imap:// and pop3:// must
--   upgrade with STARTTLS (STLS), and a server that does not offer it is refused unless
--   allow_plaintext is set (then STARTTLS is still used when offered).  The password is given to
--   libcurl apart from the URL and never appears in an error; a URL with a password in it is refused.
-- * IMAP lists the messages not \Seen (all = true: every one), none flagged \Deleted, in UID order,
--   with their sizes (FETCH a:b (UID FLAGS RFC822.SIZE), opts.list_window = 100 messages at a time:
--   no long SEARCH line).  Reading never marks a message seen: messages are fetched with the mailbox
--   opened read-only (EXAMINE), so a run
--   that stops half-way, or a --dry-run, leaves the mailbox as it was.  (curl's own fetch sends
--   BODY[], not BODY.PEEK[], and a custom "UID FETCH n BODY.PEEK[]" loses the literal; so EXAMINE is
--   sent as a custom command and curl, which believes its SELECT still holds, fetches by URL on the
--   read-only mailbox.  test_mailbox_imap checks the \Seen flag after reading, should curl change.)  mark(msg, "seen") stores
--   \Seen; "move" and "quarantine" move it to the folder (created when missing) with UID MOVE, or
--   without MOVE with UID COPY, \Deleted and, with UIDPLUS, UID EXPUNGE of that one UID (never a
--   plain EXPUNGE, which would remove other messages someone flagged \Deleted; without UIDPLUS the
--   original stays flagged \Deleted and \Seen).
-- * POP3 has no flags and no folders, so messages are left on the server: mark(msg, "seen") only
--   records msg.id (the UIDL) in box.seen, and the caller keeps processed UIDLs (opts.skip on the next
--   run); "move" and "quarantine" are refused with a message saying so.  Nothing is ever deleted.
-- * A message over max_bytes (default 10 MiB, as mailshot.mailbox) is never loaded whole: its size is
--   known from the listing and only its first max_bytes bytes are fetched (IMAP BODY[]<0.N>; POP3 RETR
--   cut off there), raw holds them, truncated = too_big = true, size the real size.  One that turns
--   out larger than the server said is cut off by the binding at max_bytes the same way.

local mailfetch = require "mailshot.mailfetch"

local M = {}

M.DEFAULT_MAX_BYTES = 10 * 1024 * 1024
local LIST_MAX_BYTES = 512 * 1024 * 1024   -- a listing: ~50 bytes a message

local SCHEMES = {
  imap  = { proto = "imap", tls = "required" },
  imaps = { proto = "imap", tls = "implicit" },
  pop3  = { proto = "pop3", tls = "required" },
  pop3s = { proto = "pop3", tls = "implicit" },
}

local function pct_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- url -> { scheme, proto, tls, base = "imaps://host:port", mailbox, mailbox_path, user, where }
local function parse_url(url)
  local scheme, authority, path = url:match("^(%a[%w+.-]*)://([^/?#]*)(.*)$")
  local info = scheme and SCHEMES[scheme:lower()]
  if not info then
    return nil, "not an imap://, imaps://, pop3:// or pop3s:// URL"
  end
  scheme = scheme:lower()
  local userinfo, hostport = authority:match("^(.*)@([^@]*)$")
  if not userinfo then hostport = authority end
  if userinfo and userinfo:find(":", 1, true) then
    return nil, "a password in the URL is refused (it would show in ps, logs and reports): "
      .. "set MAILSHOT_IMAP_PASSWORD or use --password-file"
  end
  if hostport == "" then return nil, "no host in the URL" end
  local u = { scheme = scheme, proto = info.proto, tls = info.tls, base = scheme .. "://" .. hostport }
  if userinfo and userinfo ~= "" then u.user = pct_decode(userinfo:match("^[^;]*")) end
  if u.proto == "imap" then
    local p = path:match("^/([^;?#]*)") or ""
    if p == "" then p = "INBOX" end
    u.mailbox_path, u.mailbox = p, pct_decode(p)
    u.where = u.base .. "/" .. p
  else
    if path ~= "" and path ~= "/" then return nil, "a POP3 URL names no mailbox: use pop3s://host[:port]/" end
    u.where = u.base
  end
  return u
end
M.parse_url = parse_url

-- An IMAP quoted string; mailbox names outside printable ASCII would need modified UTF-7.
local function quote(name)
  if name == "" or name:find("[%z\1-\31\127-\255]") then
    return nil, string.format("folder name %q: only printable ASCII is supported", name)
  end
  return '"' .. name:gsub('[\\"]', "\\%0") .. '"'
end

local function read_password(opts)
  if opts.password ~= nil then return opts.password end
  if opts.password_file then
    local f, err = io.open(opts.password_file, "r")
    if not f then return nil, "--password-file: " .. err end
    local s = f:read("l") or ""
    f:close()
    return (s:gsub("\r$", ""))
  end
  local p = os.getenv("MAILSHOT_IMAP_PASSWORD")
  if p then return p end
  return nil, "no password: set MAILSHOT_IMAP_PASSWORD or use --password-file"
end

local HINTS = {
  login = "login refused (check the user and password)",
  mailbox = "cannot open the mailbox",
  tls = "TLS failed (a server certificate is verified against the system's CAs and --ca-file)",
  starttls = "the server does not offer STARTTLS: refusing to log in without TLS "
    .. "(use imaps:// or pop3s://, or allow plaintext with --allow-plaintext)",
  connect = "cannot connect",
  dropped = "the server closed the connection",
  timeout = "timed out",
}

local Box = {}
Box.__index = Box

-- One transfer; errors come back as nil, "WHERE: hint: curl's reason", kind, size.  A connection kept
-- from an earlier transfer that the server has closed meanwhile (idle timeout, restart) is replaced
-- once: every operation here can be repeated (fetches are read-only, \Seen and moves idempotent).
function Box:_do(url, request, max)
  local before = self.h:connects()
  local body, err, kind, size, partial = self.h:perform(url, request, max or LIST_MAX_BYTES)
  if not body and kind == "dropped" and self.h:connects() == before then
    body, err, kind, size, partial = self.h:perform(url, request, max or LIST_MAX_BYTES)
  end
  if self.h:connects() ~= before then
    -- a new connection: curl logged in again and SELECTed the URL's mailbox (read-write)
    self.mode = url:find("/[^/]", #self.u.base + 1) and "rw" or nil
    self.reconnected = true
  end
  if body then return body end
  self.mode = nil   -- curl closes the connection after most failures
  local hint = HINTS[kind]
  return nil, self.u.where .. ": " .. (hint and hint .. ": " or "") .. err, kind, size, partial
end

function Box:_mailbox_url() return self.u.base .. "/" .. self.u.mailbox_path end

-- IMAP ----------------------------------------------------------------------------------------

-- The listing goes LIST_WINDOW messages at a time (message numbers are dense, UIDs need not be):
-- libcurl caps the untagged lines of one command at 300 kB ("Too large response headers"), which
-- one FETCH 1:* reaches at about 300 messages.
local LIST_WINDOW = 100

function Box:_imap_list()
  local caps, err = self:_do(self.u.base .. "/", "CAPABILITY")
  if not caps then return nil, err end
  self.caps = {}
  for word in (caps:match("%* CAPABILITY ([^\r\n]*)") or ""):gmatch("%S+") do self.caps[word:upper()] = true end
  local q
  q, err = quote(self.u.mailbox)
  if not q then return nil, self.u.where .. ": " .. err end
  local status, kind
  status, err, kind = self:_do(self.u.base .. "/", "STATUS " .. q .. " (MESSAGES)")
  if not status then
    if kind ~= "refused" then return nil, err end   -- the server said NO: no such mailbox, or not ours
    return nil, self.u.where .. ": cannot open the mailbox: " .. err:sub(#self.u.where + 3)
  end
  local count = tonumber(status:match("MESSAGES (%d+)"))
  if not count then return nil, self.u.where .. ": no message count in the server's STATUS answer" end
  local list, window = {}, self.list_window or LIST_WINDOW
  for first = 1, count, window do
    -- curl SELECTs the mailbox before the first one
    local body
    body, err = self:_do(self:_mailbox_url(), string.format("FETCH %d:%d (UID FLAGS RFC822.SIZE)", first,
                                                            math.min(first + window - 1, count)))
    if not body then return nil, err end
    self.mode = "rw"
    self:_parse_listing(body, list)
  end
  table.sort(list, function(a, b) return a.id < b.id end)
  self.list = list
  return true
end

function Box:_parse_listing(body, list)
  for line in body:gmatch("[^\r\n]+") do
    local uid = tonumber(line:match("[(%s]UID (%d+)"))
    local flags = line:match("FLAGS %(([^)]*)%)") or ""
    local size = tonumber(line:match("RFC822%.SIZE (%d+)"))
    if uid and size and line:match("^%* %d+ FETCH") then
      local seen = flags:find("\\Seen", 1, true) ~= nil
      if not flags:find("\\Deleted", 1, true) and (self.all or not seen) then
        list[#list + 1] = { id = uid, size = size, seen = seen }
      end
    end
  end
end

function Box:_imap_mode(mode)
  if self.mode == mode then return true end
  local q = assert(quote(self.u.mailbox))
  local ok, err = self:_do(self:_mailbox_url(), (mode == "ro" and "EXAMINE " or "SELECT ") .. q)
  if not ok then return nil, err end
  self.mode = mode
  return true
end

-- The message, or (over max_bytes) its first max_bytes bytes: BODY[]<0.max>, read-only too.
function Box:_imap_fetch(m)
  local ok, err = self:_imap_mode("ro")
  if not ok then return nil, err end
  self.reconnected = false
  local url = self:_mailbox_url() .. ";UID=" .. m.id
  if m.size > self.max_bytes then url = url .. "/;PARTIAL=0." .. self.max_bytes end
  local raw, kind, size, partial
  raw, err, kind, size, partial = self:_do(url, nil, self.max_bytes)
  if self.reconnected and not m.seen then
    -- the connection was new: curl had SELECTed read-write, so this fetch set \Seen: undo it
    self:_do(self:_mailbox_url(), "UID STORE " .. m.id .. " -FLAGS.SILENT (\\Seen)")
  end
  return raw, err, kind, size, partial
end

function Box:_imap_folder(folder)
  if self.folders[folder] then return true end
  local q, err = quote(folder)
  if not q then return nil, self.u.where .. ": " .. err end
  local found
  found, err = self:_do(self.u.base .. "/", 'LIST "" ' .. q)
  if not found then return nil, err end
  if not found:find("* LIST", 1, true) then
    local ok
    ok, err = self:_do(self.u.base .. "/", "CREATE " .. q)
    if not ok then return nil, err end
  end
  self.folders[folder] = true
  return true
end

function Box:_imap_mark(msg, action, folder)
  local ok, err = self:_imap_mode("rw")
  if not ok then return nil, err end
  local url, uid = self:_mailbox_url(), math.tointeger(msg.id)
  if not uid then error("mark: msg.id is not an IMAP UID", 3) end
  if action == "seen" then
    ok, err = self:_do(url, "UID STORE " .. uid .. " +FLAGS.SILENT (\\Seen)")
    return ok and true, err
  end
  ok, err = self:_imap_folder(folder)
  if not ok then return nil, err end
  local q = quote(folder)
  if self.caps.MOVE then
    ok, err = self:_do(url, "UID MOVE " .. uid .. " " .. q)
    return ok and true, err
  end
  ok, err = self:_do(url, "UID COPY " .. uid .. " " .. q)
  if ok then ok, err = self:_do(url, "UID STORE " .. uid .. " +FLAGS.SILENT (\\Seen \\Deleted)") end
  if ok and self.caps.UIDPLUS then ok, err = self:_do(url, "UID EXPUNGE " .. uid) end
  return ok and true, err
end

-- POP3 ----------------------------------------------------------------------------------------

-- UIDL and LIST: UIDL -> message number for this session, and the list in server order.
function Box:_pop3_list()
  local uidl, err = self:_do(self.u.base .. "/", "UIDL")
  if not uidl then return nil, err end
  local sizes
  sizes, err = self:_do(self.u.base .. "/", "LIST")
  if not sizes then return nil, err end
  local size_of = {}
  for n, s in sizes:gmatch("(%d+) (%d+)") do size_of[tonumber(n)] = tonumber(s) end
  local list, num = {}, {}
  for n, id in uidl:gmatch("(%d+) ([\33-\126]+)") do
    n = tonumber(n)
    num[id] = n
    list[#list + 1] = { id = id, size = size_of[n] or 0, n = n }
  end
  table.sort(list, function(a, b) return a.n < b.n end)
  self.num, self.session = num, self.h:connects()
  return list
end

function Box:_pop3_fetch(m)
  if self.h:connects() ~= self.session then   -- a new session numbers messages anew
    local ok, err = self:_pop3_list()
    if not ok then return nil, err, "error" end
  end
  local n = self.num[m.id]
  if not n then return nil, self.u.where .. ": no longer on the server", "gone" end
  local raw, err, kind, size, partial = self:_do(self.u.base .. "/" .. n, nil, self.max_bytes)
  if raw and self.h:connects() ~= self.session then
    local ok
    ok, err = self:_pop3_list()
    if not ok then return nil, err, "error" end
    if self.num[m.id] ~= n then return nil, self.u.where .. ": the server renumbered its messages", "gone" end
  end
  return raw, err, kind, size, partial
end

-- The object ------------------------------------------------------------------------------------

--- Connects, logs in and lists the mailbox: a box, or nil, "URL: reason".
function M.open(url, opts)
  if type(url) ~= "string" then error("mailbox_curl.open: url must be a string", 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("mailbox_curl.open: options must be a table", 2) end
  local u, err = parse_url(url)
  if not u then return nil, (url:gsub("//[^/@]*:[^/@]*@", "//")) .. ": " .. err end
  local user = opts.user or u.user
  if not user or user == "" then return nil, u.where .. ": no user: give --user or put it in the URL" end
  local password
  password, err = read_password(opts)
  if not password then return nil, u.where .. ": " .. err end
  local tls = u.tls
  if tls == "required" and opts.allow_plaintext then tls = "optional" end
  local max = opts.max_bytes or M.DEFAULT_MAX_BYTES
  if math.type(max) ~= "integer" or max < 1 then error("mailbox_curl.open: max_bytes must be a positive integer", 2) end
  local h, herr = mailfetch.new{ user = user, password = password, tls = tls, timeout = opts.timeout or 30,
                                 ca_file = opts.ca_file ~= "" and opts.ca_file or nil, insecure = opts.insecure }
  if not h then return nil, u.where .. ": " .. herr end
  local box = setmetatable({ h = h, u = u, where = u.where, max_bytes = max, all = opts.all and true or false,
                             skip = opts.skip or {}, seen = {}, folders = {},
                             move_to = opts.move_to, quarantine = opts.quarantine,
                             list_window = opts.list_window }, Box)
  local ok
  if u.proto == "imap" then
    ok, err = box:_imap_list()
  else
    ok, err = box:_pop3_list()
    box.list = ok or nil
  end
  if not ok then h:close(); return nil, err end
  return box
end

--- How many messages the listing found (before skip).
function Box:count() return #self.list end

--- Iterator over the messages: { id =, raw =, size =, where = }; one over max_bytes has only its first
--- max_bytes bytes in raw, truncated = too_big = true and its real size in size; one that could not
--- be read has raw = nil and error = reason.  After a failure of the connection itself the iteration
--- ends and box.failed holds the reason.
function Box:messages()
  local i = 0
  return function()
    while not self.failed do
      i = i + 1
      local m = self.list[i]
      if not m then return nil end
      if not self.skip[m.id] then
        local label = self.u.proto == "imap" and " uid " or " uidl "
        local msg = { id = m.id, size = m.size, where = self.u.where .. label .. m.id }
        local raw, err, kind, size, partial
        if self.u.proto == "imap" then raw, err, kind, size, partial = self:_imap_fetch(m)
        else raw, err, kind, size, partial = self:_pop3_fetch(m) end
        if raw and m.size <= self.max_bytes then
          msg.raw, msg.size = raw, #raw
        elseif raw or kind == "too-big" then   -- only the first max_bytes bytes were read
          msg.raw, msg.truncated, msg.too_big = raw or partial, true, true
          msg.size = math.max(m.size, size or 0, #msg.raw + 1)
        else
          msg.error = err
          if kind ~= "gone" then self.failed = err end
        end
        return msg
      end
    end
    return nil
  end
end

Box.each = Box.messages   -- the name mailshot.mailbox's other readers use

--- mark(msg, "seen" | "move" | "quarantine"[, folder]) -> true | nil, reason; the folder defaults to
--- opts.move_to or "Processed" (move), opts.quarantine or "Quarantine" (quarantine).
function Box:mark(msg, action, folder)
  if type(msg) ~= "table" or msg.id == nil then error("mark: expected a message from box:messages()", 2) end
  if action ~= "seen" and action ~= "move" and action ~= "quarantine" then
    error("mark: action must be \"seen\", \"move\" or \"quarantine\"", 2)
  end
  if action == "move" then folder = folder or self.move_to or "Processed" end
  if action == "quarantine" then folder = folder or self.quarantine or "Quarantine" end
  if action ~= "seen" and (type(folder) ~= "string" or folder == "") then
    error("mark: \"" .. action .. "\" needs a folder name", 2)
  end
  if not self.h then error("mark: the mailbox is closed", 2) end
  if self.u.proto == "pop3" then
    if action == "seen" then self.seen[msg.id] = true; return true end
    return nil, self.u.where .. ": POP3 has no folders: messages are left on the server "
      .. "(processed ones are remembered by their UIDL); use IMAP to move them"
  end
  return self:_imap_mark(msg, action, folder)
end

--- Logs out (IMAP LOGOUT, POP3 QUIT) and closes the connection.
function Box:close()
  if self.h then self.h:close(); self.h = nil end
end
Box.__close = Box.close
Box.__gc = Box.close

return M
