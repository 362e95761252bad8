-- mailshot.suppress: suppression lists (unsubscribed, bounced, complained, blocked domains).
--
--   local suppress = require "mailshot.suppress"
--   local list = assert(suppress.load({ "unsubscribed.csv", "bounced.txt" }))
--   local why = list:check("Ann@Example.NET")    --> nil | "suppressed: bounced.txt line 3"
--   suppress.append("bounced.txt", "ann@example.net", "550 5.1.1 user unknown")
--
-- Text files hold one entry a line: an address ("a@b.example") or a whole domain
-- ("@b.example" or "b.example"); "#" starts a comment at the start of a line or after a space
-- or tab (so "a#b@x.example", a valid address, stays whole).  CSV files (".csv") give their
-- `email` column (or `column`), read with mailshot.csv.
--
-- Matching: the domain is compared in its A-label form (idna.to_ascii: lower-cased, IDN
-- converted), the local part case-insensitively unless case_sensitive_local is set.  RFC 5321
-- 2.4 leaves the local part to the receiving server, and every large provider treats it
-- case-insensitively, so "Ann@x" and "ann@x" are one person: better one unsent message than a
-- message to someone who unsubscribed.  Only ASCII letters are folded in local parts.
--
-- Memory: two Lua tables keyed by the normalised string ("ann@example.net", "example.net"),
-- each value one integer packing the file and the line (no string per entry).  About 100 bytes
-- an entry for typical addresses (measured: tests/lua/test_suppress.lua prints it).
--
-- Errors, two tiers (README.md, "Lua API reference", conventions): a wrong argument or option
-- raises; a missing file or a CSV
-- without the column returns nil, "file: reason"; a malformed entry is a warning
-- ("file:line: ...") in list.warnings, and the entry is skipped.

local string, table, type, tostring, error, ipairs, pairs, setmetatable, io, os =
      string, table, type, tostring, error, ipairs, pairs, setmetatable, io, os
local find, sub, lower, format, gsub, match = string.find, string.sub, string.lower,
      string.format, string.gsub, string.match

local idna = require("mailshot.idna")
local csv = require("mailshot.csv")
local paths = require("mailshot.path")

local M = {}

-- Warnings kept in list.warnings; list.malformed counts them all.  A file of garbage must not
-- turn into a million strings.
local MAX_WARNINGS = 100
-- File index and line packed into one integer: line * FILES + index (index < FILES).
local FILES = 65536
-- A reason written by append() is cut to this many octets (on a UTF-8 boundary).
local MAX_REASON = 300
-- IDN domains converted by check() are remembered, up to this many (then forgotten at once).
local IDN_CACHE = 4096

---------------------------------------------------------------- role addresses

-- Local parts that name a function, not a person: RFC 2142 (mailbox names for common services:
-- postmaster, hostmaster, abuse, noc, security, webmaster, www, usenet, news, uucp, ftp) and
-- the usual system and "do not reply" accounts.  Mail to them is not consented to by anyone,
-- and bulk mail to abuse@ or postmaster@ is how a sender gets reported.  info@, sales@,
-- support@, contact@ are left out on purpose: businesses sign up with them.  The table is the
-- module's own: add or remove names (lower case) to change what is_role() says.
M.roles = {}
for _, name in ipairs {
  "postmaster", "hostmaster", "abuse", "noc", "security", "webmaster", "www", "usenet",
  "news", "uucp", "ftp",
  "mailer-daemon", "root", "admin", "administrator", "sysadmin", "nobody", "devnull",
  "noreply", "no-reply", "no_reply", "donotreply", "do-not-reply", "do_not_reply",
} do M.roles[name] = true end

-- suppress.is_role(address) -> boolean
-- True when the local part (ASCII lower-cased, a "+tag" dropped) is in suppress.roles:
-- "Postmaster@x", "abuse+reports@x".  An address without "@" is not a role address.
function M.is_role(address)
  if type(address) ~= "string" then error("is_role: expected a string, got " .. type(address), 2) end
  local loc = match(address, "^%s*(.-)@[^@]*$")
  if not loc or loc == "" then return false end
  loc = lower(loc)
  return M.roles[loc] == true or M.roles[(match(loc, "^([^+]+)%+"))] == true
end

---------------------------------------------------------------- normalising

-- ASCII domains need no conversion beyond lower-casing; to_ascii does the rest (and checks).
local function domain_key(domain, cache)
  local key = cache and cache[domain]
  if key then return key end
  local why
  if sub(domain, 1, 1) == "[" and sub(domain, -1) == "]" then
    key = lower(domain)                  -- an address literal: kept as written, lower-cased
  else
    key, why = idna.to_ascii(domain)
    if not key then return nil, why end
  end
  if cache then cache[domain] = key end
  return key
end

-- entry_key(text, fold_local, cache) -> "a", key | "d", key | nil, why
-- text is one trimmed entry: an address, "@domain" or "domain".
local function entry_key(text, fold_local, cache)
  if find(text, "[%s%c]") then return nil, "spaces or control characters in an entry" end
  local at = find(text, "@[^@]*$")
  if not at then
    local key, why = domain_key(text, cache)
    if not key then return nil, why end
    return "d", key
  end
  local loc, dom = sub(text, 1, at - 1), sub(text, at + 1)
  if dom == "" then return nil, "empty domain" end
  local key, why = domain_key(dom, cache)
  if not key then return nil, why end
  if loc == "" then return "d", key end
  return "a", (fold_local and lower(loc) or loc) .. "@" .. key
end

---------------------------------------------------------------- the list

local List = {}
List.__index = List
List.__name = "mailshot.suppress.list"

local function warn(list, file, line, msg)
  list.malformed = list.malformed + 1
  if #list.warnings < MAX_WARNINGS then
    list.warnings[#list.warnings + 1] = format("%s:%d: %s", file, line, msg)
  elseif #list.warnings == MAX_WARNINGS then
    list.warnings[MAX_WARNINGS + 1] = "(more malformed entries: see list.malformed for the count)"
  end
end

-- Adds one entry; the first occurrence of an entry is the one a reason names.
local function add(list, text, fidx, line, cache)
  local kind, key = entry_key(text, not list.case_sensitive_local, cache)
  if not kind then
    local shown = gsub(format("%q", text), "\\\n", "\\n")   -- a warning stays on one line
    warn(list, list.files[fidx], line, format("malformed entry %s skipped: %s", shown, key))
    return
  end
  local t = kind == "a" and list.addresses or list.domains
  if t[key] == nil then
    t[key] = line * FILES + fidx
    list.count = list.count + 1
  end
end

-- "#" starts a comment at the start of the line or after whitespace.
local function strip_comment(s)
  if sub(s, 1, 1) == "#" then return "" end
  local c = find(s, "[ \t]#")
  if c then s = sub(s, 1, c) end
  return match(s, "^%s*(.-)%s*$")
end

local function load_text(list, path, fidx, cache)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local n = 0
  for s in f:lines() do
    n = n + 1
    if n == 1 and sub(s, 1, 3) == "\239\187\191" then s = sub(s, 4) end   -- UTF-8 BOM
    s = strip_comment(gsub(s, "\r$", ""))
    if s ~= "" then add(list, s, fidx, n, cache) end
  end
  f:close()
  return true
end

local function load_csv(list, path, fidx, column, delimiter, cache)
  local reader, err = csv.open(path, delimiter and { delimiter = delimiter } or nil)
  if not reader then return nil, err end
  local has = false
  for _, name in ipairs(reader:header()) do has = has or name == column end
  if not has then
    local cols = table.concat(reader:header(), ", ")
    reader:close()
    return nil, format("%s: no column %q (columns: %s)", path, column, cols)
  end
  while true do
    local row, line, rerr = reader:read()
    if row then
      local v = match(row[column], "^%s*(.-)%s*$")
      if v ~= "" then add(list, v, fidx, line, cache) end      -- an empty cell is no entry
    elseif row == false then
      warn(list, list.files[fidx], line, "bad CSV row skipped: " .. rerr)
    elseif rerr then
      reader:close()
      return nil, rerr
    else
      break
    end
  end
  reader:close()
  return true
end

local function new_list(case_sensitive_local)
  return setmetatable({
    files = {}, addresses = {}, domains = {}, warnings = {}, malformed = 0, count = 0,
    case_sensitive_local = case_sensitive_local, _idn = {}, _idn_n = 0,
  }, List)
end

local LOAD_OPTS = { base_dir = "string", column = "string", delimiter = "string",
                    case_sensitive_local = "boolean" }

local function check_opts(opts, known, fname)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error(fname .. ": options must be a table", 3) end
  for k, v in pairs(opts) do
    local want = known[k]
    if not want then error(fname .. ": unknown option " .. tostring(k), 3) end
    if type(v) ~= want then error(format("%s: option %s must be a %s", fname, k, want), 3) end
  end
  return opts
end

-- suppress.load(files [, opts]) -> list | nil, "path: reason"
-- files: a path or a list of paths; ".csv" (any case) is read as CSV, anything else as text.
-- opts: base_dir (relative paths are resolved against it; default: the current directory; a
-- campaign passes its own folder), column ("email"), delimiter (for CSV files),
-- case_sensitive_local (false).
function M.load(files, opts)
  if type(files) == "string" then files = { files } end
  if type(files) ~= "table" then error("suppress.load: expected a path or a list of paths", 2) end
  opts = check_opts(opts, LOAD_OPTS, "suppress.load")
  local base_dir = opts.base_dir
  local list = new_list(opts.case_sensitive_local == true)
  if #files >= FILES then error("suppress.load: too many files", 2) end
  local cache = {}                        -- domain as written -> A-label form, for this load
  for i, name in ipairs(files) do
    if type(name) ~= "string" then error("suppress.load: file " .. i .. " is not a string", 2) end
    list.files[i] = name
    local path = paths.resolve(name, base_dir)
    local ok, err
    if find(lower(name), "%.csv$") then
      ok, err = load_csv(list, path, i, opts.column or "email", opts.delimiter, cache)
    else
      ok, err = load_text(list, path, i, cache)
    end
    if not ok then return nil, err end
  end
  return list
end

-- suppress.new([opts]) -> an empty list (opts: case_sensitive_local), for list:add().
function M.new(opts)
  opts = check_opts(opts, { case_sensitive_local = "boolean" }, "suppress.new")
  return new_list(opts.case_sensitive_local == true)
end

-- list:add(entry [, source]) -> true | nil, why
-- Adds an address or domain (as in a text file) during a run, e.g. after a hard bounce, so a
-- second row with the same address is skipped too.  source names it in reasons ("bounces").
function List:add(entry, source)
  if type(entry) ~= "string" then error("list:add: expected a string, got " .. type(entry), 2) end
  source = source or "added"
  local fidx
  for i, name in ipairs(self.files) do if name == source then fidx = i end end
  local kind, key = entry_key(match(entry, "^%s*(.-)%s*$"), not self.case_sensitive_local)
  if not kind then return nil, format("malformed entry %q: %s", entry, key) end
  if not fidx then
    if #self.files + 1 >= FILES then error("list:add: too many sources", 2) end
    fidx = #self.files + 1
    self.files[fidx] = source
  end
  local t = kind == "a" and self.addresses or self.domains
  if t[key] == nil then
    t[key] = fidx                         -- line 0: not from a file
    self.count = self.count + 1
  end
  return true
end

local function origin(self, code)
  local line, fidx = code // FILES, code % FILES
  local file = self.files[fidx]
  if line == 0 then return file end
  return file .. " line " .. line
end

-- list:check(address) -> nil (not suppressed) | reason
--   "suppressed: unsubscribed.csv line 12"
--   "suppressed domain example.net (bounced.txt line 3)"
-- An address that can't be parsed is not suppressed (the runner refuses it anyway); its domain
-- is then compared lower-cased as written.
function List:check(address)
  if type(address) ~= "string" then error("list:check: expected a string, got " .. type(address), 2) end
  if self.count == 0 then return nil end  -- an empty list (a cluster's shared one, before any addition)
  address = match(address, "^%s*(.-)%s*$")
  local at = find(address, "@[^@]*$")
  if not at then return nil end
  local loc, dom = sub(address, 1, at - 1), sub(address, at + 1)
  local key
  if not find(dom, "[\128-\255]") and sub(dom, -1) ~= "." then
    key = lower(dom)                      -- what to_ascii gives for a valid ASCII name
  else
    local cache = self._idn
    if self._idn_n >= IDN_CACHE then cache = {}; self._idn, self._idn_n = cache, 0 end
    key = cache[dom]
    if not key then
      key = domain_key(dom) or lower(dom)
      cache[dom], self._idn_n = key, self._idn_n + 1
    end
  end
  if loc ~= "" then
    local code = self.addresses[(self.case_sensitive_local and loc or lower(loc)) .. "@" .. key]
    if code then return "suppressed: " .. origin(self, code) end
  end
  local code = self.domains[key]
  if code then return format("suppressed domain %s (%s)", idna.to_unicode(key), origin(self, code)) end
  return nil
end

function List:__tostring()
  return format("suppression list (%d entries from %s)", self.count, table.concat(self.files, ", "))
end

---------------------------------------------------------------- appending

-- A reason on one line: control characters (CR, LF, TAB, NUL, ...) and the Unicode line
-- separators U+0085, U+2028, U+2029 become spaces; runs of spaces one space; cut to MAX_REASON.
local function one_line(s)
  s = gsub(s, "[%c\127]", " ")
  s = gsub(s, "\194\133", " ")
  s = gsub(s, "\226\128[\168\169]", " ")
  s = gsub(match(s, "^%s*(.-)%s*$"), "%s+", " ")
  if #s > MAX_REASON then
    local cut = MAX_REASON
    while cut > 0 and find(sub(s, cut + 1, cut + 1), "^[\128-\191]") do cut = cut - 1 end
    s = sub(s, 1, cut) .. "..."
  end
  return s
end

-- suppress.append(path, address, reason [, opts]) -> true | nil, err
-- Appends "address  # YYYY-MM-DD reason" to a text suppression file, creating it.  The address
-- must be one that load() reads back (no spaces or controls, valid domain, no leading "#");
-- the reason is put on one line (see one_line).  Relative paths as in load (opts.base_dir).
-- The line goes out in one write(2) on an O_APPEND file, so lines from concurrent writers
-- don't interleave.
function M.append(path, address, reason, opts)
  if type(path) ~= "string" then error("suppress.append: path must be a string", 2) end
  if type(address) ~= "string" then error("suppress.append: address must be a string", 2) end
  if reason ~= nil and type(reason) ~= "string" then error("suppress.append: reason must be a string", 2) end
  opts = check_opts(opts, { base_dir = "string" }, "suppress.append")
  address = match(address, "^%s*(.-)%s*$")
  if sub(address, 1, 1) == "#" then return nil, format("cannot store %q: a line starting with # is a comment", address) end
  local kind, why = entry_key(address, false)
  if not kind then return nil, format("cannot store %q: %s", address, why) end
  path = paths.resolve(path, opts.base_dir)
  local text = one_line(reason or "")
  local line = address .. "  # " .. os.date("%Y-%m-%d") .. (text ~= "" and " " .. text or "") .. "\n"
  local f, err = io.open(path, "a+b")
  if not f then return nil, err end
  -- a file whose last line has no newline would swallow ours
  local size = f:seek("end")
  if size and size > 0 then
    f:seek("set", size - 1)
    if f:read(1) ~= "\n" then line = "\n" .. line end
    f:seek("end")                         -- C wants a seek between a read and a write
  end
  f:setvbuf("full", #line + 1)
  local ok, werr = f:write(line)
  local cok, cerr = f:close()
  if not ok then return nil, path .. ": " .. tostring(werr) end
  if not cok then return nil, path .. ": " .. tostring(cerr) end
  return true
end

return M
