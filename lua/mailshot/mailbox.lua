-- mailshot.mailbox: the messages of a mailbox, one at a time, in bounded memory.
--
--   local box = assert(mailbox.open("Maildir", { max_bytes = 10 * 1024 * 1024 }))
--   for msg in box:messages() do        -- msg = { id, raw, size, truncated, where }; box:each() the same
--     ...
--     box:mark(msg, "seen")             -- or "move", "quarantine"
--   end
--   box:close()
--
-- Sources: a Maildir (a folder with cur/ and new/), an mbox file (a file whose first line starts
-- with "From "), a single message file (.eml or any other file), "-" (standard input: one
-- message, or an mbox when it starts with "From "), and imap://, imaps://, pop3://, pop3s://
-- URLs (mailshot.mailbox_curl).  A message bigger than max_bytes is never loaded whole: raw holds
-- its first max_bytes bytes, size the real size, truncated is true.
--
-- Marking (README, "mailshot bounces"):
--   Maildir  "seen": new/NAME is renamed cur/NAME:2,S (the Maildir spec's info part; a cur/ name
--            gets the S flag added); "move": into the folder opts.move_to ("Processed" by default),
--            marked seen; "quarantine": into opts.quarantine ("Quarantine"), unmarked.  A folder
--            NAME is the Maildir++ folder .NAME beside the source when the source is itself a
--            folder (its name starts with "."), inside it otherwise; a NAME with a "/" is a Maildir
--            path.  Missing folders are created (tmp/, new/, cur/, mode 0700).
--   mbox, .eml, stdin
--            read-only: "seen" and "move" do nothing (the report lists what was processed);
--            "quarantine" writes a copy into the Maildir opts.quarantine (the whole message, even
--            one over max_bytes: streamed from the file), named after the message so a second pass
--            does not copy it twice.
-- Nothing is ever deleted.

local util = require("mailshot.util")

local find, format, gsub, lower, match, sub = string.find, string.format, string.gsub, string.lower,
  string.match, string.sub

local M = {}

M.MAX_BYTES = 10 * 1024 * 1024   -- default cap on the bytes of one message held in memory
local CHUNK = 65536

local function check_opts(opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error("mailbox.open: options must be a table", 3) end
  if opts.max_bytes ~= nil and (math.type(opts.max_bytes) ~= "integer" or opts.max_bytes < 1) then
    error("mailbox.open: max_bytes must be a positive integer", 3)
  end
  return opts
end

local function basename(p) return match(p, "([^/]+)/*$") or p end
local function dirname(p)
  local d = match(p, "^(.*)/[^/]+/*$")
  if d == nil then return "." end
  return d == "" and "/" or d
end

local function is_dir(p) return util.stat(p) == "dir" end

-- A Maildir (with tmp/ new/ cur/) at path, created if missing; -> true | nil, err
local function ensure_maildir(path, plus_folder)
  for _, p in ipairs { path, path .. "/tmp", path .. "/new", path .. "/cur" } do
    local ok, err, exists = util.mkdir(p)
    if not ok and exists ~= "exists" then return nil, err end
    if not is_dir(p) then return nil, p .. ": not a folder" end
  end
  if plus_folder then              -- Maildir++: a folder says so (Dovecot, Courier)
    local f = io.open(path .. "/maildirfolder", "ab")
    if f then f:close() end
  end
  return true
end

-- The folder NAME of a Maildir source (see the header comment) -> path, plus_folder
local function folder_path(source, name)
  if find(name, "/", 1, true) then return name, false end
  if sub(name, 1, 1) ~= "." then name = "." .. name end
  local base = basename(source)
  if sub(base, 1, 1) == "." then return dirname(source) .. "/" .. name, true end
  return gsub(source, "/+$", "") .. "/" .. name, true
end

-- Reads a file: at most max bytes into memory -> raw, size, truncated | nil, err
local function read_capped(path, max)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local size = f:seek("end")
  f:seek("set", 0)
  local raw = f:read(math.min(size, max)) or ""
  f:close()
  return raw, size, size > max
end

-- Delivers a message into a Maildir's new/ as the Maildir spec asks: written in tmp/, then renamed
-- into new/, so no reader sees half a message.  fill(out) writes it: true | nil, err.  A message
-- already in new/ (copied by an earlier pass) is left as it is.  -> name | nil, err
local function deliver(dir, name, fill)
  local final = dir .. "/new/" .. name
  if util.stat(final) then return name end
  local tmp = dir .. "/tmp/" .. name
  local out, err = io.open(tmp, "wb")
  if not out then return nil, err end
  local ok, werr = fill(out)
  local cok, cerr = out:close()
  if not ok or not cok then os.remove(tmp); return nil, werr or cerr end
  local rok, rerr = os.rename(tmp, final)
  if not rok then os.remove(tmp); return nil, rerr end
  return name
end

-- Copies a file into a Maildir, streaming (also done when an earlier pass's copy was since
-- marked, in cur/): -> name | nil, err
local function copy_into_maildir(src_path, dir, name)
  for _, n in ipairs(util.list_dir(dir .. "/cur") or {}) do
    if match(n, "^[^:]*") == name then return name end
  end
  return deliver(dir, name, function(out)
    local src, err = io.open(src_path, "rb")
    if not src then return nil, err end
    while true do
      local chunk = src:read(CHUNK)
      if not chunk then break end
      local ok, werr = out:write(chunk)
      if not ok then src:close(); return nil, werr end
    end
    src:close()
    return true
  end)
end

-- Copies an mbox message (bytes range.from .. range.to - 1 of range.path) into a Maildir,
-- streaming, ">From " lines unquoted as Mbox:each does -> name | nil, err
local line_reader
local function copy_range_into_maildir(range, dir, name)
  return deliver(dir, name, function(out)
    local src, err = io.open(range.path, "rb")
    if not src then return nil, err end
    src:seek("set", range.from)
    local left, next_line, at_start = range.to - range.from, line_reader(src), true
    while left > 0 do
      local l, cont = next_line()
      if not l then break end
      if #l > left then l = sub(l, 1, left) end
      left = left - #l
      if at_start and not cont and find(l, "^>+From ") then l = sub(l, 2) end
      at_start = sub(l, -1) == "\n"
      local ok, werr = out:write(l)
      if not ok then src:close(); return nil, werr end
    end
    src:close()
    return true
  end)
end

-- Writes a string into a Maildir -> name | nil, err
local function write_into_maildir(data, dir, name)
  return deliver(dir, name, function(out) return out:write(data) end)
end

-- A name for a message copied out of a read-only source: stable for the same message, so a
-- second pass finds it already there.
local function copy_name(msg)
  return "mailshot-" .. sub(util.sha256(msg.where .. "\0" .. sub(msg.raw, 1, 4096)), 1, 32)
end

---------------------------------------------------------------- Maildir

local Maildir = {}
Maildir.__index = Maildir

function Maildir:each()
  local lists = {}
  for _, sub_dir in ipairs { "new", "cur" } do
    local names, err = util.list_dir(self.path .. "/" .. sub_dir)
    if not names then error(err, 0) end
    table.sort(names)                                   -- a stable order: reports compare
    for _, n in ipairs(names) do
      if sub(n, 1, 1) ~= "." then lists[#lists + 1] = sub_dir .. "/" .. n end   -- the spec: skip dot files
    end
  end
  local i = 0
  return function()
    while true do
      i = i + 1
      local rel = lists[i]
      if not rel then return nil end
      local full = self.path .. "/" .. rel
      local raw, size, truncated = read_capped(full, self.max)
      if raw then                                      -- gone meanwhile (another reader): skip
        return { id = match(basename(rel), "^[^:]*"), raw = raw, size = size, truncated = truncated,
                 where = full, file = full, sub_dir = match(rel, "^[^/]+") }
      end
    end
  end
end

-- "cur/NAME:2,FLAGS" with S added (flags kept in ASCII order, as the spec asks)
local function seen_name(name)
  local base, flags = match(name, "^(.-):2,(%a*)$")
  if not base then return name .. ":2,S" end
  if find(flags, "S", 1, true) then return name end
  local t = {}
  for c in (flags .. "S"):gmatch(".") do t[#t + 1] = c end
  table.sort(t)
  return base .. ":2," .. table.concat(t)
end

local function move_file(from, to)
  if util.stat(to) then return nil, to .. ": already exists" end
  local ok, err = os.rename(from, to)
  if not ok then return nil, err end
  return true
end

function Maildir:mark(msg, how, folder_name)
  local name = basename(msg.file)
  if how == "seen" then
    local to = self.path .. "/cur/" .. seen_name(name)
    if to == msg.file then return true end
    local ok, err = move_file(msg.file, to)
    if ok then msg.file, msg.where = to, to end
    return ok, err
  end
  local folder, plus
  if how == "move" then folder, plus = folder_path(self.path, folder_name or self.move_to or "Processed")
  elseif how == "quarantine" then folder, plus = folder_path(self.path, folder_name or self.quarantine or "Quarantine")
  else error("mailbox: mark: expected \"seen\", \"move\" or \"quarantine\", got " .. tostring(how), 2) end
  local ok, err = ensure_maildir(folder, plus)
  if not ok then return nil, err end
  local to = how == "move" and folder .. "/cur/" .. seen_name(name) or folder .. "/" .. msg.sub_dir .. "/" .. name
  ok, err = move_file(msg.file, to)
  if ok then msg.file, msg.where = to, to end
  return ok, err
end

function Maildir:close() end
Maildir.messages = Maildir.each

---------------------------------------------------------------- mbox

-- Reads a file in chunks and hands out lines (with their "\n"); a line longer than CHUNK comes
-- in pieces, the later ones with cont = true (so a 50 MB line never sits in memory whole).
function line_reader(f)
  local buf, pos = "", 1
  return function()
    while true do
      local nl = find(buf, "\n", pos, true)
      if nl then
        local line = sub(buf, pos, nl)
        pos = nl + 1
        return line
      end
      if #buf - pos + 1 >= CHUNK then
        local piece = sub(buf, pos)
        buf, pos = "", 1
        return piece, true
      end
      local more = f:read(CHUNK)
      if not more then
        if pos > #buf then return nil end
        local rest = sub(buf, pos)
        buf, pos = "", 1
        return rest
      end
      buf = sub(buf, pos) .. more
      pos = 1
    end
  end
end

local Mbox = {}
Mbox.__index = Mbox

-- Messages start at a "From " line at the top of the file or after a blank line (mboxo and
-- mboxrd; a "From " line inside a body is quoted ">From " by any writer).  ">From ", ">>From "
-- ... lose one ">" (mboxrd; mboxo writers quote only "From ", and a body line ">From " is then
-- read with one ">" less, the usual compromise).  The blank line before the next "From " belongs
-- to the separator.
function Mbox:each()
  local f, err = io.open(self.path, "rb")
  if not f then error(err, 0) end
  self.f = f
  local next_line = line_reader(f)
  local lineno, pending, pending_no, pending_end = 0, nil, nil, nil
  local prev_blank, cont_prev = true, false
  local off = 0                                   -- bytes of the file read so far
  local function read_line()
    local l, cont = next_line()
    if l and not cont_prev then lineno = lineno + 1 end
    cont_prev = l ~= nil and sub(l, -1) ~= "\n"
    if l then off = off + #l end
    return l, cont
  end
  -- find the first "From " line
  pending, pending_no = nil, nil
  while true do
    local l, cont = read_line()
    if not l then break end
    if not cont and sub(l, 1, 5) == "From " then pending, pending_no, pending_end = l, lineno, off; break end
  end
  local max = self.max
  return function()
    if not pending then return nil end
    local start, body_off = pending_no, pending_end
    pending = nil
    local body_end                                           -- where the separator starts
    local parts, held, size = {}, 0, 0
    local blank_held = nil                                   -- a blank line that may be a separator's
    local function add(s)
      size = size + #s
      if held < max then
        local take = sub(s, 1, max - held)
        parts[#parts + 1] = take
        held = held + #take
      end
    end
    prev_blank = false
    local at_line_start = true
    while true do
      local l, cont = read_line()
      if not l then break end
      local line_start = at_line_start and not cont
      at_line_start = sub(l, -1) == "\n"
      if line_start and sub(l, 1, 5) == "From " and prev_blank then
        pending, pending_no, pending_end = l, lineno, off
        break
      end
      if blank_held then add(blank_held); blank_held = nil end
      if line_start and (l == "\n" or l == "\r\n") then
        blank_held, prev_blank, body_end = l, true, off - #l
      else
        if line_start and find(l, "^>+From ") then l = sub(l, 2) end
        prev_blank = false
        add(l)
      end
    end
    if blank_held and pending == nil then add(blank_held) end   -- the file's end: keep it
    if pending == nil then body_end = off end
    -- the message's last newline is the separator's too (mboxrd): it stays, harmless
    local raw = table.concat(parts)
    return { id = format("%s:%d", self.path, start), raw = raw, size = size, truncated = size > max,
             where = format("%s:%d", self.path, start),
             range = { path = self.path, from = body_off, to = body_end } }
  end
end

-- mbox (and a single message) is read-only here: see the header comment
function Mbox:mark(msg, how, folder_name)
  if how == "quarantine" then return self.owner:copy_out(msg, folder_name) end
  if how ~= "seen" and how ~= "move" then
    error("mailbox: mark: expected \"seen\", \"move\" or \"quarantine\", got " .. tostring(how), 2)
  end
  return true, "read-only"
end

function Mbox:close() if self.f then self.f:close(); self.f = nil end end
Mbox.messages = Mbox.each

---------------------------------------------------------------- one message (a file, stdin)

local Single = {}
Single.__index = Single

function Single:each()
  local done = false
  return function()
    if done then return nil end
    done = true
    local raw, size, truncated = read_capped(self.path, self.max)
    if not raw then error(size, 0) end
    return { id = self.label, raw = raw, size = size, truncated = truncated, where = self.label, file = self.path }
  end
end

Single.mark = Mbox.mark   -- read-only as well

function Single:close()
  if self.temp then os.remove(self.path); self.temp = nil end
end
Single.messages = Single.each

---------------------------------------------------------------- opening

-- The shared part of the read-only sources: a quarantine copy.
local Owner = {}
Owner.__index = Owner

function Owner:copy_out(msg, dir)
  dir = dir or self.quarantine
  if not dir then return nil, "no quarantine folder given" end
  local ok, err = ensure_maildir(dir, false)
  if not ok then return nil, err end
  local name = copy_name(msg)
  local got
  if msg.file then
    got, err = copy_into_maildir(msg.file, dir, name)   -- the whole file, over max_bytes too
  elseif msg.range then
    got, err = copy_range_into_maildir(msg.range, dir, name)
  elseif msg.truncated then
    return nil, "only the first " .. #msg.raw .. " bytes were read"
  else
    got, err = write_into_maildir(msg.raw, dir, name)
  end
  if not got then return nil, err end
  return true, dir .. "/new/" .. got
end

-- The first bytes of a file: does it look like an mbox?
local function starts_with_from(path)
  local f = io.open(path, "rb")
  if not f then return false end
  local head = f:read(5)
  f:close()
  return head == "From "
end

-- Standard input to a private temporary file (streaming: any size, bounded memory).
local function spool_stdin()
  local tmpdir = os.getenv("TMPDIR")
  if not tmpdir or tmpdir == "" then tmpdir = "/tmp" end
  local f, tmp = util.temp_file(tmpdir .. "/mailshot-stdin")
  if not f then return nil, "stdin: " .. tostring(tmp) end
  while true do
    local chunk = io.stdin:read(CHUNK)
    if not chunk then break end
    local ok, err = f:write(chunk)
    if not ok then f:close(); os.remove(tmp); return nil, "stdin: " .. tostring(err) end
  end
  local ok, err = f:close()
  if not ok then os.remove(tmp); return nil, "stdin: " .. tostring(err) end
  return tmp
end

local URL_SCHEMES = { imap = true, imaps = true, pop3 = true, pop3s = true }

-- Wraps what mailshot.mailbox_curl's open returns: an object with each/mark/close, or an
-- iterator function and a mark function.
local function wrap_remote(a, b)
  if type(a) == "function" then
    return { each = function() return a end, mark = function(_, msg, how) return b(msg, how) end,
             close = function() end, kind = "url" }
  end
  return a
end

-- mailbox.open(source, opts) -> box | nil, err
-- opts: max_bytes (M.MAX_BYTES), move_to, quarantine (folder names or paths, see above), copy_to
-- (the quarantine Maildir of read-only sources when quarantine is not given), and for URLs
-- whatever mailshot.mailbox_curl takes (user, password, ca_file, ...).
function M.open(source, opts)
  if type(source) ~= "string" then error("mailbox.open: source must be a string", 2) end
  opts = check_opts(opts)
  local max = opts.max_bytes or M.MAX_BYTES
  local scheme = match(source, "^(%a[%w+.-]*)://")
  if scheme then
    if not URL_SCHEMES[lower(scheme)] then
      return nil, format("%s: unsupported URL scheme %q (imap, imaps, pop3, pop3s)", source, scheme)
    end
    local ok, curl = pcall(require, "mailshot.mailbox_curl")
    if not ok then return nil, source .. ": IMAP and POP3 mailboxes are not built yet in this mailshot" end
    local a, b = curl.open(source, opts)
    if not a then return nil, b end
    return wrap_remote(a, b)
  end
  local owner = setmetatable({ quarantine = opts.quarantine or opts.copy_to }, Owner)
  if source == "-" then
    local tmp, err = spool_stdin()
    if not tmp then return nil, err end
    if starts_with_from(tmp) then
      local box = setmetatable({ path = tmp, max = max, owner = owner, kind = "stdin", temp = tmp }, Mbox)
      -- ids and places name stdin, not the temporary file
      local each = box.each
      box.each = function(self)
        local it = each(self)
        return function()
          local m = it()
          if m then m.id = gsub(m.id, "^.*:(%d+)$", "stdin:%1"); m.where = m.id; m.file = nil end
          return m
        end
      end
      box.messages = box.each
      local close = box.close
      box.close = function(self) close(self); os.remove(tmp) end
      return box
    end
    return setmetatable({ path = tmp, label = "stdin", max = max, owner = owner, kind = "stdin", temp = tmp }, Single)
  end
  local kind, err = util.stat(source)
  if not kind then return nil, err end
  if kind == "dir" then
    if not is_dir(source .. "/new") or not is_dir(source .. "/cur") then
      return nil, source .. ": a folder but not a Maildir (no cur/ and new/ in it)"
    end
    return setmetatable({ path = gsub(source, "(.)/+$", "%1"), max = max, move_to = opts.move_to,
                          quarantine = opts.quarantine, kind = "maildir" }, Maildir)
  end
  if kind ~= "file" then return nil, source .. ": not a file, a Maildir or a URL" end
  if starts_with_from(source) then
    return setmetatable({ path = source, max = max, owner = owner, kind = "mbox" }, Mbox)
  end
  return setmetatable({ path = source, label = source, max = max, owner = owner, kind = "eml" }, Single)
end

M._seen_name = seen_name          -- for tests
M._folder_path = folder_path

return M
