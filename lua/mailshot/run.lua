-- mailshot.run: one run of a campaign.
--
-- A Run owns everything that lives only while a campaign runs: the rows (mailshot.rows), the
-- outcome sink (report, journal, bounces: mailshot.outcome), the rate limiters and their saved
-- state, the stop flag, the progress line.  The campaign definition is not changed by a run.
--
-- A message's walk, once through each function, in one direction:
--   Rows:next (CSV, --resume records, duplicates) -> Run:process -> classify.row (IDN, address,
--   suppression, roles, filter) -> Campaign:render (templates, mime.build, DKIM) -> Run:deliver
--   -> sender.limited (campaign, domain and relay limits) -> Run:send_one (sink:in_flight, then
--   the sender: relay:send and the C session) -> on_result -> outcome.from_result ->
--   sink:bounce -> Run:work -> sink:add (report, journal) or Rows:defer (retry queue).

local core = require("mailshot.core")
local rate = require("mailshot.rate")
local journal = require("mailshot.journal")
local util = require("mailshot.util")
local classify = require("mailshot.classify")
local outcome = require("mailshot.outcome")
local rows = require("mailshot.rows")
local sender = require("mailshot.sender")
local health = require("mailshot.health")
local cluster_rate = require("mailshot.cluster_rate")
local cluster_suppress = require("mailshot.cluster_suppress")

local M = {}

-- A stop (SIGINT/SIGTERM) must not wait for a quota that frees up tomorrow: rate waits sleep
-- in slices and give up with STOPPED, and the row is left to --resume, untouched.
local STOPPED = setmetatable({}, { __tostring = function() return "stopped while waiting for a rate limit" end })
M.STOPPED = STOPPED

-- What send_one returns for a row whose in-flight mark Redis refused: this worker's lease ran
-- out while it was stalled (SIGSTOP, a long pause, a frozen VM) and another worker took the row
-- over.  Not a send's result: the row is not this worker's any more, so no outcome of it goes to
-- Redis (the other worker's is the row's; a `failed` settled here would replace it) and none to
-- on_result, the relay's health or the bounces; this worker's own report says not-started.
local TAKEN_OVER = setmetatable({}, { __tostring = function() return "taken over by another worker" end })
M.TAKEN_OVER_TEXT = rows.TAKEN_OVER

local Run = {}
Run.__index = Run

function Run:rate_sleep(sec)
  local until_ = core.now() + sec
  while true do
    if self.stopping then error(STOPPED, 0) end
    local left = until_ - core.now()
    if left <= 0 then return end
    core.sleep(math.min(left, 0.5) + 0.0005)            -- the loop's timers tick in milliseconds
  end
end

-- With a cluster (--cluster) a limiter is shared by every worker through Redis under `key`
-- (mailshot.cluster_rate: same methods); without, it is this process's own.
local function limiter(self, spec, name, key)
  if self.cluster then
    local l = cluster_rate.new(self.cluster, key or name, type(spec) == "function" and rate.custom(spec) or spec,
                               { name = name, sleep = function(sec) return self:rate_sleep(sec) end })
    self.shared[#self.shared + 1] = l
    return l
  end
  return rate.new(type(spec) == "function" and rate.custom(spec) or spec,
                  { name = name, sleep = function(sec) return self:rate_sleep(sec) end })
end

-- The limiters for a recipient domain: the campaign's own, then the domain's (domain_rate[domain],
-- or domain_rate["*"] as every other domain's own limiter), then the relay's own `rate` when the
-- campaign sends through a relay that has one.  -> a list for sender.limited
function Run:limiters_for(domain)
  local dr = self.c.domain_rate
  if not dr then return self.campaign_limiters end
  local list = self.by_domain[domain]
  if list == nil then
    local spec = dr[domain] or dr["*"]
    local l = spec and limiter(self, spec, domain, "domain " .. domain) or false
    local saved = l and self.saved_rates and self.saved_rates["domain " .. domain]
    if saved then pcall(l.restore, l, saved) end
    self.domain_limiters[domain] = l
    list = { self.limiter or false, l, self.send_limiter or false }
    self.by_domain[domain] = list
  end
  return list
end

local function safe_name(s)
  return (tostring(s or "x"):gsub("[^%w@%.%-_+]", "_"):sub(1, 80))
end

--- Write (dry run) or send one message; fills and returns its report row.
function Run:deliver(msg, email, row, line, rep)
  local c, opts = self.c, self.opts
  if opts.dry then
    local path = ("%s/%06d-%s.eml"):format(opts.outbox, line, safe_name(email))
    -- a new 0600 file renamed over path: a symlink planted in the outbox is replaced, not followed
    -- with return_path, the envelope sender is shown as the delivering MTA would record it
    -- (RFC 5321 4.4): a Return-Path line first; what is sent has none
    local data = c.verp and ("Return-Path: <" .. msg.from .. ">\r\n" .. msg.data) or msg.data
    local ok, ferr = util.replace_file(path, data)
    if not ok then rep.status, rep.stage, rep.response = "failed", "write", ferr; return rep end
    rep.status, rep.response = "written", path
    return rep
  end
  local domain = (email:match("@([^@]+)$") or ""):lower()
  local res, refused = sender.limited(self:limiters_for(domain), domain, nil, self.send_one, self, msg, row, line, email)
  if res == TAKEN_OVER then
    rep.status, rep.stage, rep.response, rep.taken_over = "not-started", "cluster", M.TAKEN_OVER_TEXT, true
    return rep
  end
  if refused and refused == self.send_limiter then
    res.via = "relay"                    -- the relay's own limit: its result, as relay:send gives it
  elseif refused then
    -- a rule said no for now (a warm-up quota): left for a later run (--resume), not retried here
    rep.status, rep.stage, rep.response, rep.temporary, rep.retry = "failed", "rate", res.message, true, false
    return rep
  end
  if type(res) ~= "table" then
    rep.status, rep.stage, rep.response = "failed", "send", "send function returned " .. tostring(res)
    return rep
  end
  if c.on_result then
    -- the campaign's own classification: it may change res (temporary, retry, ok) or return
    -- another result (after trying another path itself)
    local other = c.on_result(res, msg, row)
    if type(other) == "table" then res = other end
  end
  outcome.from_result(rep, res)
  self.health:result(res, rep)                       -- its path, and the relay-down rule
  self.sink:bounce(email, res, rep)
  return rep
end

-- Under the rate slots: the journal says "in flight", then the campaign's send.
function Run:send_one(msg, row, line, email)
  self.sink:in_flight(line, email)
  local cl = self.cluster
  if not cl then return sender.call(self.send, msg, row) end
  -- the row's in-flight mark is in Redis before its message goes out: a worker killed from here
  -- on leaves it reported in-flight, never sent twice (before, it is only reserved, and another
  -- worker sends it).  mailshot's own senders take the mark's gate and wait in their relay's
  -- line meanwhile; any other send is called once Redis has answered.
  local gate = cl:mark(line)
  local res
  if self.gated then
    msg.gate = gate
    res = sender.call(self.send, msg, row)
    msg.gate = nil
  end
  if not gate:wait() then
    -- not sent: another worker took the row over (this worker was stalled past its lease), or
    -- Redis is lost (the run stops: not started, in this worker's report)
    if cl.lost then error(STOPPED, 0) end
    return TAKEN_OVER
  end
  return res or sender.call(self.send, msg, row)
end

--- One row through classify, render and deliver -> its report row.
function Run:process(row, line)
  local c = self.c
  local rep = { line = line, email = row[c.email_field] }
  local email, why = classify.row(c, row)
  if not email then rep.status, rep.response = "skipped", why; return rep end
  local msg, err = c:render(row, line)
  if not msg then rep.status, rep.stage, rep.response = "failed", "render", err; return rep end
  return self:deliver(msg, email, row, line, rep)
end

-- Progress ------------------------------------------------------------------------------

local function fmt_duration(s)
  if not s or s ~= s or s == math.huge then return "--:--" end
  s = math.floor(s + 0.5)
  if s >= 3600 then return ("%d:%02d:%02d"):format(s // 3600, s % 3600 // 60, s % 60) end
  return ("%d:%02d"):format(s // 60, s % 60)
end

--- A task that shows the run's progress until stop() is called: a live line rewritten in
--- place on a terminal (`live`), or a plain line every `interval` seconds.  It only reads
--- counters, so it costs a few microseconds per refresh.
function Run:progress_task(p)
  local report, source, name = self.report, self.rows, self.c.name
  local total = p.total
  local started, running = core.now(), true
  local last_t, last_done, per_s = started, 0, 0
  local out = io.stderr
  local function line()
    local c = report.counts
    local done = c.sent + c.failed + c.skipped + c.written + c.deferred + c["in-flight"]
    local now = core.now()
    if now - last_t >= 1 or per_s == 0 then     -- a rate over the last second or so
      per_s = (done - last_done) / math.max(now - last_t, 1e-3)
      last_t, last_done = now, done
    end
    local avg = done / math.max(now - started, 1e-3)
    local eta = total and total > done and avg > 0 and (total - done) / avg or nil
    local deferred = c.deferred + source:waiting()
    -- why: a relay failing row after row (mailshot.health), else the last temporary failure
    local why = deferred > 0 and (self.health:progress(60) or self.last_temporary)
    local last = why and (" (last: %s)"):format(why) or ""
    return ("%s%d%s  sent %d  failed %d  deferred %d%s  skipped %d  %.0f/s  ETA %s  conns %d"):format(
      name and (name .. ": ") or "", done, total and ("/" .. total) or "", c.sent, c.failed,
      deferred, last, c.skipped, per_s, fmt_duration(eta), p.connections and p.connections() or 0)
  end
  core.spawn(function()
    while running do
      core.sleep(p.live and 0.25 or p.interval)
      if not running then break end
      if p.live then out:write("\r\27[K", line()) else out:write("mailshot: ", line(), "\n") end
      out:flush()
    end
  end)
  return { stop = function()
    running = false
    if p.live then out:write("\r\27[K"); out:flush() end
  end }
end

-- Starting ----------------------------------------------------------------------------------

-- What a resumed run says at its start (returned to the caller, who prints it).
local function resume_notice(c, previous, opts)
  if not previous then return nil end
  local n = {}
  for k, v in pairs(previous.counts) do n[k] = v end
  n.text = ("resuming %s: %d recipients already final (%d sent, %d failed, %d skipped), %d deferred to retry now, "
            .. "%d in flight when the last run stopped: %s"):format(c.name, n.final, n.sent, n.failed, n.skipped,
            n.deferred, n.inflight, n.inflight == 0 and "none"
            or (c.resend_in_flight or opts.resend_in_flight) and "sent again"
            or "reported as possibly sent, not sent again (add --resend-in-flight to send them again)")
  if opts.notice then opts.notice(n.text) end
  return n
end

-- The journal of a --send run: jrn, previous records (on --resume) | nil, err
local function open_journal(c, opts)
  if not opts.journal then
    if opts.resume then return nil, "--resume needs --send (dry runs keep no journal)" end
    return false
  end
  -- a resume indexes the journal by CSV line, and a line never starts past the file's size
  -- (a line count would miss lines ended by a lone CR)
  local size, f = nil, opts.resume and io.open(c.recipients_path, "rb")
  if f then size = f:seek("end"); f:close() end
  return journal.open(opts.journal, { fingerprint = c:fingerprint(opts.script), name = c.name,
                                      resume = opts.resume, force = opts.force, max_line = size and size + 1 })
end

--- Make a run of campaign c: opts as campaign:run, columns the report's.  -> run | nil, err
--- (nothing started).
function M.new(c, opts, columns)
  if not opts.dry and not c.send then return nil, "the campaign has no 'send' function: it can only be run as a dry run" end
  -- a list that is not UTF-8 and says no encoding: a dry run warns, --send refuses (mailshot.rows)
  local reader, err = rows.open_reader(c, { refuse_undeclared = not opts.dry })
  if not reader then return nil, err end
  if err then io.stderr:write("mailshot: warning: ", err, "\n") end
  if opts.dry then
    local ok, merr = os.execute(("mkdir -p '%s'"):format(opts.outbox:gsub("'", "'\\''")))
    if not ok then reader:close(); return nil, "cannot create outbox " .. opts.outbox .. ": " .. tostring(merr) end
  end
  -- several machines (opts.cluster, mailshot.cluster): Redis is the journal; joined before
  -- anything is written, so that a refusal (unreachable, another fingerprint) leaves nothing
  local cl
  if opts.cluster and not opts.dry then
    local cerr
    cl, cerr = require("mailshot.cluster").connect(opts.cluster, c)
    if cl then
      local ok, serr = cl:check_marker(opts.cluster_marker, opts.force)
      -- the file is cut in blocks of read_ahead lines (1.5 x the concurrency by default): the
      -- first worker's size is the campaign's
      local block = opts.cluster.read_ahead or math.max(8, 3 * (opts.concurrency or c.concurrency) // 2)
      if ok then ok, serr = cl:start(c:fingerprint(opts.script), c.name, block) end
      if ok then cl:write_marker(opts.cluster_marker) end
      if not ok then cl:close(); cl, cerr = nil, serr end
    end
    if not cl then reader:close(); return nil, cerr end
  end
  local jrn, previous = false, nil
  if not cl then jrn, previous = open_journal(c, opts) end
  if jrn == nil then reader:close(); return nil, previous end
  jrn = jrn or nil
  local report, rerr = outcome.open_report(opts.report, columns)
  if not report then reader:close(); if jrn then jrn:close() end; if cl then cl:close() end; return nil, rerr end
  local self = setmetatable({ c = c, opts = opts, journal = jrn, report = report, domain_limiters = {},
                              by_domain = {}, stopping = nil,
                              health = health.new(not opts.dry and c.stop_when_down) }, Run)
  self.cluster = cl                                   -- before the limiters: shared ones need it
  if cl then
    cl.on_lost = function(e) self:stop_for_redis(e) end
  end
  self.sink = outcome.sink(report, jrn, c.bounces_path, cl)
  if cl then        -- a hard bounce here stops the other workers sending to the address
    self.sink.publish = function(email, reason) return cluster_suppress.publish(cl, email, reason) end
  end
  self.rows = rows.new(c, reader, { sink = self.sink, previous = previous, limit = opts.limit, cluster = cl,
                                    ahead = cl and math.max(4, (opts.concurrency or c.concurrency) // 2),
                                    resend_in_flight = c.resend_in_flight or opts.resend_in_flight,
                                    retry = not opts.dry and c.retry,
                                    stopped = function() return self.stopping ~= nil end })
  self.limiters = {}                                  -- by name: their state is kept across --resume
  self.shared = {}                                   -- cluster_rate limiters, closed at the end
  for name, l in pairs(opts.relay_limiters or {}) do
    if self.cluster then                           -- the fleet's relay limit, in Redis as "relay HOST:PORT"
      l = sender.share(l, limiter(self, l.rules, name, (name:gsub("^relay relay %((.*)%)$", "relay %1"))))
    end
    self.limiters[name] = l
  end
  if c.rate ~= nil then
    self.limiter = limiter(self, c.rate, "campaign")
    self.limiters.campaign = self.limiter
  end
  self.send, self.send_limiter = sender.unwrap(c.send)
  self.gated = sender.gated(self.send)                -- passes msg.gate on (mailshot.sender)
  self.campaign_limiters = (self.limiter or self.send_limiter) and { self.limiter or false, self.send_limiter or false }
                           or sender.NONE
  if jrn and previous then
    -- daily quotas hold across --resume: the limiters continue from where the last run left them
    self.saved_rates = journal.load_rates(opts.journal .. ".rates")
    for name, l in pairs(self.limiters) do
      local st = self.saved_rates[name]
      if st then pcall(l.restore, l, st) end
    end
  end
  self.resumed = resume_notice(c, previous, opts)
  if cl then      -- the suppressions shared by the workers: loaded now, followed during the run
    local watch, serr = cluster_suppress.start(cl, c, self)
    if not watch then self.rows:close(); report.f:close(); cl:close(); return nil, serr end
    self.shared_list = watch
  end
  return self
end

function Run:save_rates()
  if not self.journal then return end
  local states = {}
  for name, l in pairs(self.limiters) do states[name] = l:state() end
  for d, l in pairs(self.domain_limiters) do if l then states["domain " .. d] = l:state() end end
  if next(states) then journal.save_rates(self.opts.journal .. ".rates", states) end
end

-- Outcomes reach the kernel within 0.1 s even when nothing else is sent.
function Run:flusher()
  local ticks = 0
  while self.flushing do
    core.sleep(0.1)
    if self.flushing then
      if self.cluster then self.cluster:flush() end
      if self.journal then self.journal:flush() end
      ticks = ticks + 1
      if ticks % 50 == 0 then self:save_rates() end     -- quotas survive even a kill -9 (to 5 s)
    end
  end
end

-- SIGINT/SIGTERM: take no new recipients, let the messages in flight finish (each bounded by
-- its own timeouts), then write everything.  A second signal stops at once, with the journal
-- still consistent (every record is whole, in-flight ones say so).
function Run:watch_signals()
  self.stopping = util.wait_signal()
  io.stderr:write(("\nmailshot: %s: stopping: no new messages; waiting for the ones in flight "
                  .. "(signal again to stop at once)\n"):format(self.stopping == "INT" and "interrupted" or "terminated"))
  util.wait_signal()
  if self.journal then self.journal:flush(true) end
  self:save_rates()
  self.report.f:flush()
  io.stderr:write("mailshot: stopped at once; the journal marks the messages that were in flight\n")
  util.exit_now(self.stopping == "INT" and 130 or 143)
end

local function traceback_unless_stopped(e) return e == STOPPED and e or debug.traceback(e) end

-- A row's report row, or STOPPED: an error in the campaign's own code (send, filter, a template
-- function) costs this recipient, not the run; it is shown once on stderr with its traceback.
function Run:outcome_of(row, line)
  local ok, rep = xpcall(self.process, traceback_unless_stopped, self, row, line)
  if ok or rep == STOPPED then return rep end
  if not self.script_error_shown then io.stderr:write("mailshot: ", tostring(rep), "\n"); self.script_error_shown = true end
  return { line = line, email = row[self.c.email_field], status = "failed", stage = "script",
           response = outcome.one_line(tostring(rep):match("^[^\n]*")) }
end

--- A temporary failure's reason, short enough for the progress line: "relay HOST:PORT: text"
--- (the relay from the result when it names one; a reply with its code: "451 4.2.1 try later"),
--- cut at 60 characters.
function M.short_reason(rep)
  local text = tostring(rep.response or rep.error or "temporary failure"):gsub("%s+", " ")
  local code = math.tointeger(rep.code)
  if code and code > 0 and not text:find("^" .. code) then
    text = ("%d %s%s"):format(code, rep.enhanced and (rep.enhanced .. " ") or "", text)
  end
  if rep.relay and not text:find(tostring(rep.relay), 1, true) then text = ("relay %s: %s"):format(rep.relay, text) end
  if #text > 60 then text = text:sub(1, 57) .. "..." end
  return text
end

-- A relay is down (mailshot.health): the run stops as after SIGINT (no new rows; the ones in
-- flight finish; the retry queue is reported deferred), and says why at once.
function Run:stop_for_relay(down)
  self.stopping, self.down = "relay", down
  local live = self.opts.progress and self.opts.progress.live
  io.stderr:write(("%smailshot: %s: stopping: no new messages; waiting for the ones in flight\n"):format(
    live and "\r\27[K" or "", down.text))
end

-- Redis is lost (a transport error or timeout, mailshot.cluster): no new rows; the ones in
-- flight finish (their outcomes stay in this worker's report: Redis cannot take them).
function Run:stop_for_redis(err)
  if self.redis_lost then return end
  self.redis_lost = err
  if not self.stopping then self.stopping = "redis" end
  local live = self.opts.progress and self.opts.progress.live
  io.stderr:write(("%smailshot: Redis lost (%s): stopping: no new rows; waiting for the ones in flight\n"):format(
    live and "\r\27[K" or "", err))
end

-- One of `concurrency` tasks: rows until there are none (or a stop).
function Run:work()
  local source, sink = self.rows, self.sink
  while not self.failure do
    local row, line, item = source:next()
    if not row then break end
    local rep = self:outcome_of(row, line)
    if rep == STOPPED then                           -- not started: --resume takes the row
      if item and item.rep then item.rep.status = "deferred"; sink:add(item.rep)
      else source:not_started(row, line) end
      break
    end
    if rep.taken_over then                           -- another worker's row now: this report only
      sink.report:add(rep)
      self.cluster:settle("X", rep)                    -- (its part in this worker's block ends)
    elseif rep.status == "failed" and rep.temporary then
      self.last_temporary = M.short_reason(rep)        -- why "deferred" grows: on the progress line
      if not (rep.retry ~= false and source:defer(item or { row = row, line = line }, rep)) then
        rep.status = "deferred"                        -- not delivered: --resume tries again
        self.health:final(rep)
        sink:add(rep)
      end
    else
      self.health:final(rep)
      sink:add(rep)
    end
    if self.health.down and not self.stopping then self:stop_for_relay(self.health.down) end
  end
end

--- Run it: the counts table (see campaign:run).
function Run:go()
  local opts = self.opts
  local started = core.now()
  local progress = opts.progress and self:progress_task(opts.progress)
  local workers = opts.dry and 1 or (opts.concurrency or self.c.concurrency)
  local running, main = workers, core.current()
  local function worker()
    local ok, e = xpcall(self.work, debug.traceback, self)
    if not ok then self.failure = self.failure or e end
    running = running - 1
    if running == 0 then core.wake(main) end
  end
  if self.journal or self.cluster then
    self.flushing = true
    core.spawn(self.flusher, self)
  end
  if opts.signals then core.spawn(self.watch_signals, self) end
  for _ = 1, workers do core.spawn(worker) end
  core.suspend()
  if self.shared_list then self.shared_list.stop() end
  for _, l in ipairs(self.shared) do l:close() end  -- completions reported, reserved slots given back
  self.rows:drain(function(rep) self.health:final(rep) end)   -- stopped before their next try
  -- the report names everyone (a cluster worker's report: the rows it did; `mailshot cluster
  -- report` names everyone)
  if self.stopping and not self.failure and not self.cluster then self.rows:rest() end
  if self.cluster then self.rows:release_ready() end  -- read ahead, never started: their blocks stay held
  if opts.signals then util.stop_signals() end
  self.flushing = false
  self:save_rates()
  local cl = self.cluster
  if cl then
    cl:finish()                                        -- outcomes flushed; the lease given up
    cl:close()
  end
  if progress then progress.stop() end
  self.rows:close()
  local rok, rerr = self.report:close()
  if not rok then
    io.stderr:write(("mailshot: report %s: not rewritten in CSV order (%s); its rows are in the order they completed\n")
      :format(self.report.path, tostring(rerr)))
  end
  if self.journal then self.journal:close() end
  if self.failure then error(self.failure, 0) end
  local counts = self.report.counts
  counts.total = self.rows.seen
  if cl then
    -- this worker's rows (the others' are theirs), and what Redis could not take
    counts.total = 0
    for k, n in pairs(self.report.counts) do if k ~= "total" then counts.total = counts.total + n end end
    counts.cluster = { worker = cl.worker, lost = cl.lost, unsettled = cl.unsettled }
  end
  counts.seconds = core.now() - started
  counts.stopped = self.stopping
  counts.resumed = self.resumed
  counts.last_temporary = self.last_temporary
  counts.paths = self.health:summary()               -- one line per path that failed rows
  counts.down = self.down                            -- the relay that stopped the run
  return counts
end

return M
