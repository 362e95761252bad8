-- mailshot.rows: the one source of a campaign's recipient rows.
--
-- The CSV reader, the previous run's journal records (--resume), the duplicate check and the
-- retry queue of temporary failures, behind one next().  Rows that need no message (a bad CSV
-- line, a duplicate address, an outcome a previous run made final) go straight to the outcome
-- sink; next() returns only rows to classify and deliver.  The loop is one thread: tasks take
-- rows in turn.

local core = require("mailshot.core")
local csv = require("mailshot.csv")
local util = require("mailshot.util")

local M = {}

local Rows = {}
Rows.__index = Rows

local DUPLICATE = "duplicate address: an earlier row has it (addresses are compared ignoring case)"
M.DUPLICATE = DUPLICATE

-- The Levenshtein distance of two short strings (column names; longer ones are never near).
local function distance(a, b)
  if #a > 64 or #b > 64 then return math.huge end
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

--- The column a misspelt name most likely meant (for "did you mean"): the same but for case,
--- else the nearest within 2 edits; nil when none is that near.
function M.nearest_column(name, header)
  local want, best, best_d = name:lower(), nil, nil
  for _, h in ipairs(header) do
    if h:lower() == want then return h end
    local d = distance(want, h:lower())
    if d <= 2 and (not best_d or d < best_d) then best, best_d = h, d end
  end
  return best
end

--- The header's column for the address: email_field exactly, else the one column equal to it
--- ignoring case and surrounding spaces ("Email", " EMAIL ").  nil, err when none or several
--- match; the message names the columns and suggests the nearest name.
function M.email_column(c, header)
  local want = c.email_field:lower():match("^%s*(.-)%s*$")
  local loose = {}
  for _, h in ipairs(header) do
    if h == c.email_field then return h end
    if h:lower():match("^%s*(.-)%s*$") == want then loose[#loose + 1] = h end
  end
  if #loose == 1 then return loose[1] end
  local quoted = {}
  for i, h in ipairs(loose) do quoted[i] = ("'%s'"):format(h) end
  if #loose > 1 then
    return nil, ("%s: columns %s all match email_field '%s' ignoring case; set email_field to one of them exactly")
      :format(c.recipients_path, table.concat(quoted, " and "), c.email_field)
  end
  local only, hint = #header == 1 and header[1], ""
  if only and not c.delimiter and (only:find(";", 1, true) or only:find("\t", 1, true)) then
    hint = ("; the header has no comma: set delimiter = %q"):format(only:find(";", 1, true) and ";" or "\t")
  else
    local best = M.nearest_column(want, header)
    if best then hint = ("; did you mean email_field = %q?"):format(best) end
  end
  return nil, ("%s: no '%s' column (columns: %s)%s"):format(c.recipients_path, c.email_field,
    table.concat(header, ", "), hint)
end

-- The file's bytes against its encoding (c.encoding, else UTF-8): nil when every byte is a
-- character of it, else a warning naming the first bad line, column and byte, and how many lines.
-- Fast (one read of the file, a word at a time through ASCII), so every run can afford it.
local function encoding_problem(c, header)
  local enc = c.encoding or "utf-8"
  local ok, info = csv.check_encoding(c.recipients_path, { delimiter = c.delimiter, encoding = enc })
  if ok ~= false then return nil end                   -- clean, or unreadable: csv.open says why
  local where = ("line %d, %s, byte 0x%02X at offset %d"):format(info.line,
    header and header[info.field] and ("column '%s'"):format(header[info.field]) or ("field %d"):format(info.field),
    info.byte, info.offset)
  local lines = info.lines == 1 and "1 line" or ("%d lines"):format(info.lines)
  if c.encoding then
    return ("%s: %s not valid %s (first: %s); their rows are skipped"):format(
      c.recipients_path, info.lines == 1 and "1 line is" or lines .. " are", info.encoding, where)
  end
  return ("%s is not valid UTF-8: %s (%s in all); --send refuses such a file, a dry run skips those rows. If it is a Latin-1 or Windows-1252 list (as Excel saves "
    .. "CSV), set encoding = \"latin-1\" or encoding = \"windows-1252\" in the campaign; encoding = \"utf-8\" "
    .. "sends the other rows and skips these"):format(c.recipients_path, where, lines)
end

--- rows.open(c [, o]) -> reader, warning | nil, err: the campaign's recipients file, with its header
--- checked for the address column (c.email_field becomes the header's spelling of it).  Fields are
--- read in c.encoding (converted to UTF-8), else checked as UTF-8: a row with bytes that are not is
--- skipped, never sent garbled.  warning: the file has such rows (encoding_problem); with
--- o.refuse_undeclared and no c.encoding declared, that is an error instead (--send refuses).
function M.open_reader(c, o)
  local reader, err = csv.open(c.recipients_path, { delimiter = c.delimiter, encoding = c.encoding or "utf-8" })
  if not reader then
    local problem = err and encoding_problem(c)
    return nil, problem and err .. "; " .. problem or err
  end
  local header = reader:header()
  local warning = encoding_problem(c, header)
  if warning and not c.encoding and o and o.refuse_undeclared then
    reader:close()
    return nil, "not sending: " .. warning
  end
  local col, cerr = M.email_column(c, header)
  if not col then reader:close(); return nil, cerr end
  c.email_field = col
  -- a template field no column has would fail every row: one message, before anything
  if c.check_fields then
    local ok, ferr = c:check_fields(header)
    if not ok then reader:close(); return nil, ferr end
  end
  return reader, warning
end

--- rows.emails_at(c, lines) -> { [line] = email } | nil, err
--- The addresses on the given CSV lines of campaign c's recipients file (the report's `line`:
--- the line a row starts on), read as a run reads them (delimiter, encoding, email column), as
--- written in the file.  lines: a list of line numbers or a set { [line] = true }.  A line
--- that holds no row (the header, a blank or malformed line, past the end) is left out.  The
--- file is streamed and left at the last line asked for: memory holds the lines asked, not the
--- file.  What `mailshot bounces` uses to find the address a VERP token's line was sent to.
function M.emails_at(c, lines)
  if type(lines) ~= "table" then error("rows.emails_at: lines must be a list or a set of line numbers", 2) end
  local want, left, last = {}, 0, 0
  for k, v in pairs(lines) do
    local n = v == true and k or v
    if math.type(n) ~= "integer" then error("rows.emails_at: a line number must be an integer, got " .. tostring(n), 2) end
    if not want[n] then want[n], left, last = true, left + 1, math.max(last, n) end
  end
  local found = {}
  if left == 0 then return found end
  local reader <close>, err = csv.open(c.recipients_path, { delimiter = c.delimiter, encoding = c.encoding or "utf-8" })
  if not reader then return nil, err end
  local col, cerr = M.email_column(c, reader:header())
  if not col then return nil, cerr end
  while left > 0 do
    local row, line, msg = reader:read()
    if row == nil then
      if msg then return nil, ("%s: %s"):format(c.recipients_path, msg) end
      break
    end
    if line > last then break end
    if row and want[line] then
      found[line], left = row[col], left - 1
    end
  end
  return found
end

--- A duplicate check: each address once per campaign, compared ignoring case.  dedupe(address)
--- -> true for its first row (and for a row without an address: classify says why it is out).
function M.dedupe()
  local addresses = util.new_set()
  return function(address)
    return not (address and address ~= "") or addresses:add(address:lower())
  end
end

--- rows.new(c, reader, o): o = { sink, previous (journal records), limit, resend_in_flight,
--- retry (the schedule, or false), stopped = function() -> true once no new row may start,
--- cluster (mailshot.cluster: the rows of this worker's blocks only, each marked in flight in
--- Redis before it is sent; nil on one machine) }.
function M.new(c, reader, o)
  return setmetatable({
    c = c, reader = reader, sink = o.sink, previous = o.previous, limit = o.limit, cluster = o.cluster,
    ahead = o.ahead or 8, ready = {}, ready_head = 1, ready_tail = 0, waiting_tasks = {},
    resend_in_flight = o.resend_in_flight, retry = o.retry, stopped = o.stopped,
    first = M.dedupe(), queue = {}, seen = 0, exhausted = false,
  }, Rows)
end

--- Why line n has no row of its own: the broken record that starts on line `start` ran over it.
function M.swallowed(recipients, n, start)
  return ("%s line %d: swallowed by the broken record that starts on line %d (a quote opened there "
          .. "runs over this line)"):format(recipients, n, start)
end

-- One row read from the CSV: the rows that need no message go to the sink here (a bad line, a
-- duplicate, an outcome the journal already has); -> row, line for a row to deliver.
local function take(self, row, line, msg)
  local c, sink = self.c, self.sink
  self.seen = self.seen + 1
  local old = self.previous and self.previous:record(line)
  local address = row and row[c.email_field]
  if row and old and old.kind == "F" then
    sink.report:add(old)                           -- already in the journal
  elseif row and not self.first(address) then
    sink:add { line = line, email = address, status = "skipped", response = DUPLICATE }
  elseif row and old and old.kind == "I" and not self.resend_in_flight then
    -- journalled as an F record of status in-flight, which a later --resume still counts in
    -- flight: --resume --resend-in-flight can send it then
    sink:add { line = line, email = old.email, status = "in-flight", stage = "resume",
               response = "possibly sent before the previous run stopped; not sent again (--resend-in-flight sends it)" }
  elseif row then
    return row, line
  else
    sink:add { line = line, status = "skipped", response = ("%s line %d: %s"):format(c.recipients, line, msg) }
    -- a broken record over several lines (a quote opened and never closed where it should
    -- be): each line it swallowed gets a row of its own, so that every line is in the report
    for n = line + 1, self.reader:line() do
      self.seen = self.seen + 1
      sink:add { line = n, status = "skipped", response = M.swallowed(c.recipients, n, line) }
    end
  end
end

--- The next row to deliver: row, line, retry item (nil on its first try), or nil at the end.
--- Waits for a due retry when the file is read.
function Rows:next()
  local queue, c = self.queue, self.c
  while not self.stopped() do
    if queue[1] and queue[1].due <= core.now() then
      local item = table.remove(queue, 1)
      -- in a cluster, claimed again first (this worker's again, in `claim`; it is marked in flight
      -- when it starts); a worker that took it over while this one's lease had run out reports it
      -- instead
      if not self.cluster or self.cluster:claim_retry(item.line) then
        return item.row, item.line, item
      end
      local rep = item.rep                 -- in this worker's report only
      if self.cluster.lost then
        rep.status = "deferred"            -- Redis is lost: the run stops, the row is still to do
      else
        rep.status, rep.stage, rep.response = "not-started", "cluster", M.TAKEN_OVER
      end
      self.sink.report:add(rep)
    end
    local row, line, msg
    if self.cluster then
      row, line = self:claimed_row()         -- false: none yet, look again; nil: the file is read
      if row then return row, line end
      if row == nil and (self.stopped() or self:next_pass()) then row = false end
    elseif not self.exhausted and not (self.limit and self.seen >= self.limit) then
      row, line, msg = self.reader:read()
    end
    if row == nil then
      if msg then io.stderr:write("mailshot: ", c.recipients_path, ": ", msg, "\n") end
      self.exhausted = true
      if not queue[1] then return nil end
      core.sleep(math.min(math.max(queue[1].due - core.now(), 0), 1))   -- the next retry, or a look at stopping
    elseif line and not self.cluster then
      local r, l = take(self, row, line, msg)
      if r then return r, l end
    end
  end
end

-- Cluster mode (mailshot.cluster) -------------------------------------------------------------

M.TAKEN_OVER = "not sent here: another worker took this row over while this worker was stalled past its "
               .. "lease; its outcome is that worker's (mailshot cluster report)"

local ORPHAN = "possibly sent by worker %s, which stopped (its lease ran out) while this row was in flight; "
               .. "not sent again (--resend-in-flight sends it)"
M.ORPHAN = ORPHAN

local function push_ready(self, row, line)
  if row then
    self.ready_tail = self.ready_tail + 1
    self.ready[self.ready_tail] = { row, line }
  end
end

-- Blocks: the workers split the file into blocks of cluster.block lines, handed out in file
-- order by a counter in Redis (Cluster:next_block).  Every worker reads the whole file (a
-- duplicate is the second row of an address anywhere in it, so every row's address is seen)
-- and takes the rows that start in its own blocks: Redis is asked once per block of lines, not
-- once per row and worker.  The next block is asked for ahead (a task of its own), so that
-- reading seldom waits for Redis.  A worker killed with kill -9 leaves its blocks held: once its
-- lease runs out, the next worker to finish its pass takes them (Cluster:sweep), reports the rows
-- it had marked in flight `in-flight` and sends the others.

-- Ask Redis for the next block, in the background.
function Rows:fetch_block()
  local f = {}
  self.fetching = f
  core.spawn(function()
    f.b = self.cluster:next_block()
    f.done = true
    if f.drop and f.b then self.cluster:block_done(f.b, f.keep) end     -- the pass ended meanwhile
    if f.waiter then core.wake(f.waiter) end
  end)
end

-- The next block of this worker's (waits for Redis when it is not here yet), the one after it
-- asked for at once.  -> number | nil (Redis is lost)
function Rows:take_block()
  if not self.fetching then self:fetch_block() end
  local f = self.fetching
  if not f.done then
    f.waiter = core.current()
    core.suspend()
  end
  self.fetching = nil
  if f.b then self:fetch_block() end
  return f.b
end

-- The end of a pass: this worker's blocks in it are read (each is released once its rows are
-- settled), and a block asked for ahead is not needed.
-- keep: the pass stopped before the end of the file (--limit): the blocks stay held, rows not
-- read included, and the worker that sweeps them once this one has finished sends those.
function Rows:end_of_pass(keep)
  local cl = self.cluster
  self.exhausted = true
  if self.only then
    for b in pairs(self.only.blocks) do cl:block_done(b, keep) end
  elseif self.block then
    cl:block_done(self.block, keep)
  end
  self.block = nil
  local f = self.fetching
  if f then
    self.fetching = nil
    if f.done then if f.b then cl:block_done(f.b, keep) end else f.drop, f.keep = true, keep end
  end
end

-- Is the row that starts on `line` this worker's?  First pass: it is when its block is; the
-- blocks this worker's reading goes past are done, and a block with no row in it (a record
-- over many lines) too.  -> true | false | nil (Redis is lost)
function Rows:in_my_block(line)
  local cl = self.cluster
  local b = line // cl.block
  while not self.block or b > self.block do
    if self.block then cl:block_done(self.block) end
    self.block = self:take_block()
    if not self.block then return nil end
  end
  return b == self.block
end

-- One row of a second pass (a stopped worker's block or line, now this worker's): a row of it
-- that is not final is sent ("R": it was not) or reported in-flight ("I": possibly sent; sent
-- again with resend_in_flight).  -> row, line to deliver, or nil
function Rows:orphan(row, line, kind, holder, msg, first)
  local c, cl = self.c, self.cluster
  cl:took(line)
  if not row then
    self:bad_line(line, msg)
  elseif not first then
    self.sink:add { line = line, email = row[c.email_field], status = "skipped", response = DUPLICATE }
  elseif kind == "R" or self.resend_in_flight then
    return row, line
  else
    self.sink:add { line = line, email = row[c.email_field], status = "in-flight", stage = "cluster",
                    response = ORPHAN:format(holder) }
  end
end

-- A line that is not a record (and each line it swallowed): skipped, each in the report.
function Rows:bad_line(line, msg)
  local c, cl = self.c, self.cluster
  self.sink:add { line = line, status = "skipped", response = ("%s line %d: %s"):format(c.recipients, line, msg) }
  for k = line + 1, self.reader:line() do
    self.seen = self.seen + 1
    if cl then cl:took(k) end
    self.sink:add { line = k, status = "skipped", response = M.swallowed(c.recipients, k, line) }
  end
end

-- Read rows until `ahead` of this worker's are ready for the tasks.  One task reads at a time
-- (self.reading: the reader is shared); the others wait for it.
function Rows:refill()
  if self.reading or self.exhausted then return end
  self.reading = true
  local c, cl = self.c, self.cluster
  local n = 0
  while n < self.ahead and not (self.limit and self.seen >= self.limit) do
    local row, line, msg = self.reader:read()
    if row == nil then
      if msg then io.stderr:write("mailshot: ", c.recipients_path, ": ", msg, "\n") end
      break
    end
    self.seen = self.seen + 1
    local first = not row or self.first(row[c.email_field])
    if self.only then                     -- a second pass: only the blocks and lines taken over
      local kind, holder = cl:orphan_of(self.only, line)
      if kind and kind ~= "." then
        local r, l = self:orphan(row, line, kind, holder, msg, first)
        if r then push_ready(self, r, l); n = n + 1 end
      end
    else
      local mine = self:in_my_block(line)
      if mine == nil then break end       -- Redis is lost: the run stops
      if mine then
        cl:took(line)
        if not row then self:bad_line(line, msg)
        elseif not first then
          self.sink:add { line = line, email = row[c.email_field], status = "skipped", response = DUPLICATE }
        else
          push_ready(self, row, line)
          n = n + 1
        end
      end
    end
  end
  if n < self.ahead and not self.exhausted then self:end_of_pass(self.limit and self.seen >= self.limit) end
  self.reading = false
  local waiting = self.waiting_tasks
  self.waiting_tasks = {}
  for _, t in ipairs(waiting) do core.wake(t) end
end

-- The next row of this worker's: row, line | false (none yet: ask again) | nil (the file is read).
function Rows:claimed_row()
  if self.refill_error then error(self.refill_error, 0) end
  local head = self.ready_head
  local item = self.ready[head]
  if item then
    self.ready[head] = nil
    self.ready_head = head + 1
    local left = self.ready_tail - head
    if left <= 3 * self.ahead and not self.reading and not self.exhausted and not self.stopped() then
      core.spawn(function()
        local ok, e = xpcall(self.refill, debug.traceback, self)
        if not ok then self.refill_error = e; self.reading = false end
      end)
    end
    return item[1], item[2]
  end
  if self.reading then                      -- another task reads (or waits for a block): wait for it
    self.waiting_tasks[#self.waiting_tasks + 1] = core.current()
    core.suspend()
    return false
  end
  if self.exhausted then return nil end
  self:refill()
  return false
end

--- The rows read ahead that no task took (the run stopped): reported not-started; their blocks
--- stay held, and the worker that takes them after this one stops sends them.
function Rows:release_ready()
  for i = self.ready_head, self.ready_tail do
    local item = self.ready[i]
    if item then self:not_started(item[1], item[2]) end
  end
  self.ready, self.ready_head, self.ready_tail = {}, 1, 0
end

-- At the end of a pass over the file: take what workers whose lease ran out held (their blocks,
-- their claimed lines and their deferred rows), and read the file again for those only.  While
-- live workers still hold blocks or claimed lines, look again every 0.1 s (a worker killed now
-- is found once its lease runs out), for at most two leases and a second: every row is then
-- final in Redis, or held by a live worker (or, if that one dies later, shown by `mailshot
-- cluster report` in-flight when marked, not-started when only reserved, and taken by the next
-- worker).
-- -> true when a new pass starts.  One task sweeps; the others wait for it.
function Rows:next_pass()
  if self.sweeping then                   -- another task sweeps: read again after it
    while self.sweeping do core.sleep(0.05) end
    return true
  end
  if self.next_sweep and core.now() < self.next_sweep then return false end
  if self.limit and self.seen >= self.limit then self.exhausted = true; return false end   -- --limit: no more
  self.sweeping = true
  local cl = self.cluster
  local deadline = core.now() + 2 * cl.lease + 1
  local found, n, others
  while true do
    found, n, others = cl:sweep()
    if not found or n > 0 or others == 0 or core.now() >= deadline or self.stopped() then break end
    core.sleep(math.min(cl.lease / 3, 0.1))          -- the others' last rows take milliseconds
  end
  self.next_sweep = core.now() + cl.lease / 3
  self.sweeping = false
  if not found or n == 0 then
    self.exhausted = true
    return false
  end
  local reader, err = M.open_reader(self.c)
  if not reader then
    io.stderr:write("mailshot: ", tostring(err), "\n")
    self.exhausted = true
    return false
  end
  self.reader:close()
  self.reader, self.only, self.exhausted = reader, found, false
  self.first = M.dedupe()                 -- a duplicate is told again, from the first row on
  return true
end

local NOT_STARTED = "the run was stopped before this row; --resume sends it"
M.NOT_STARTED = NOT_STARTED

--- A row the run took but did not start (stopped while waiting for a rate limit): in the report
--- as `not-started`, and nothing in the journal, so --resume sends it.
function Rows:not_started(row, line)
  self.sink.report:add { line = line, email = row[self.c.email_field], status = "not-started", response = NOT_STARTED }
  if self.cluster then self.cluster:settle("U", { line = line }) end   -- its block stays held
end

--- After a stop (SIGINT/SIGTERM): the rest of the file goes to the report, so that it names
--- every recipient: rows that need no message as always (journal outcomes, duplicates, bad
--- lines), every other row `not-started`, in the report only (the journal has no record of it:
--- --resume sends it).  Streams the file: memory does not grow with the rows left.
function Rows:rest()
  while not self.exhausted and not (self.limit and self.seen >= self.limit) do
    local row, line, msg = self.reader:read()
    if row == nil then
      if msg then io.stderr:write("mailshot: ", self.c.recipients_path, ": ", msg, "\n") end
      break
    end
    local r, l = take(self, row, line, msg)
    if r then self:not_started(r, l) end
  end
  self.exhausted = true
end

--- Temporary failures wait here for their next try (RFC 5321 §4.5.4.1: retry, with growing
--- intervals), sorted by due time; the campaign goes on meanwhile.  false when the row is out of
--- tries (or the run has no retries): the caller reports it deferred.
function Rows:defer(item, rep)
  local retry = self.retry
  if not retry then return false end
  local now = core.now()
  item.first = item.first or now
  item.attempt = (item.attempt or 1) + 1
  local d = math.min(retry.max, retry.first * 2 ^ (item.attempt - 2))
  d = d / 2 + math.random() * d / 2                    -- jitter: spread the retries of a burst
  if now + d > item.first + retry.give_up_after then return false end
  item.due, item.rep = now + d, rep
  local queue = self.queue
  local i = #queue + 1
  while i > 1 and queue[i - 1].due > item.due do queue[i] = queue[i - 1]; i = i - 1 end
  queue[i] = item
  self.sink:waiting(rep)
  return true
end

--- Rows waiting for a retry (for the progress line).
function Rows:waiting() return #self.queue end

--- At the end of the run: the rows still waiting for a retry are reported deferred (each(rep)
--- is called first for each, when given).
function Rows:drain(each)
  for _, item in ipairs(self.queue) do
    item.rep.status = "deferred"
    if each then each(item.rep) end
    self.sink:add(item.rep)
  end
  self.queue = {}
end

function Rows:close() self.reader:close() end

return M
