-- mailshot.cluster: several mailshot processes (workers) share one campaign through Redis.
--
-- Every worker reads the same CSV file in order (the campaign's fingerprint, stored in Redis by
-- the first worker, must match).  The file is cut into blocks of `block` lines (a line's block:
-- line // block; the first worker's size, cluster.read_ahead, is the campaign's), handed out in
-- file order by a counter in Redis (NEXT_BLOCK, one call per block); a worker takes only the rows
-- that start in its blocks, though it reads every row (the duplicate check sees every address).
-- Right before a row's message goes out its task marks the line in flight (START_ROWS), as the
-- journal's I record is on one machine; the mark is refused when the row's holder is no longer
-- this worker.  A worker keeps a lease (its score in the `alive` sorted set, refreshed every
-- lease/3); at the end of its pass a live worker takes what workers whose lease ran out held
-- (SWEEP: their blocks, their claimed lines, their deferred rows), reports the rows they had
-- marked in flight `in-flight` (possibly sent; sent again with resend_in_flight) and sends the
-- others.  Outcomes go to Redis in batches (SETTLE, every 0.1 s), each worker's report keeps the
-- rows it did, and `mailshot cluster report` writes the merged report.
--
-- Keys, all under "mailshot:{KEY}:" (KEY: the campaign's cluster.key, else its name; the braces
-- are a Redis Cluster hash tag: every key of a campaign lives in one slot, so one script may
-- touch them all):
--   meta     HASH  fingerprint, name, created (unix seconds), lease_ms, block (lines per block)
--   alive    ZSET  worker -> the end of its lease (Redis TIME, ms).  One sorted set rather than a
--                  key per worker so that a script sees every lease through one KEYS entry
--   workers  HASH  worker -> "state\tstarted\tpid@host" (state: running, finished, lost)
--   cursor   STRING  the number of blocks handed out (INCR: the next one)
--   blocks   HASH  block -> the worker holding it; released (HDEL) once every row the worker
--                  took from it is final or deferred and its reading went past it
--   claim    HASH  line -> worker: a row claimed on its own, not through its block: a worker's
--                  own retry claimed again (CLAIM_RETRY), a line the sweep took over alone.  A
--                  line's holder is its `claim` entry if any, else its block's holder
--   flight   HASH  line -> worker: marked in flight (its message may have gone out), until its
--                  outcome is settled
--   retry    HASH  line -> a record: deferred (a temporary failure), waiting for its holder's
--                  retry queue; a dead or finished holder's rows are taken over by the next
--                  worker to end a pass (they were not sent: sending them is safe)
--   done     HASH  line -> a record: the final outcome (sent, failed, skipped, in-flight)
--   counts   HASH  status -> n, and "worker\tstatus" -> n (final outcomes only)
-- A record is a journal-style line without its newline: worker, line, email, then the report's
-- fields (result.RECORD, status first), tab-separated, with \t \n \r \\ escaped.

local core = require("mailshot.core")
local smtp = require("mailshot.smtp")
local util = require("mailshot.util")
local tsv_record = require("mailshot.text").tsv_record
local RECORD = require("mailshot.result").RECORD

local M = {}

M.DEFAULT_LEASE = 10            -- seconds: a dead worker's rows wait this long at most
M.DEFAULT_BLOCK = 36           -- lines per block (run.lua: 1.5 x the concurrency, cluster.read_ahead)
local MAX_BATCH = 1000          -- lines in one settle script call

-- URL, password, options -----------------------------------------------------------------------

--- parse_url("redis://[user@]host[:port][/db]" or "rediss://...") -> { tls, user, host, port, db }
--- | nil, err.  A password in the URL is refused: it would show in ps and in shell history.
function M.parse_url(url)
  if type(url) ~= "string" then return nil, "the cluster URL must be a string" end
  local scheme, rest = url:match("^(rediss?)://(.+)$")
  if not scheme then
    return nil, ("%s: not a Redis URL (redis://HOST:PORT/DB or rediss://HOST:PORT/DB for TLS)"):format(url)
  end
  local auth, hostport = rest:match("^([^@/]*)@(.*)$")
  if not auth then hostport = rest end
  if auth and auth:find(":", 1, true) then
    return nil, ("%s: a password in the URL is refused (it would show in ps and in shell history): "
                 .. "put it in MAILSHOT_REDIS_PASSWORD or cluster.password_file (--redis-password-file)"):format(
                 url:gsub("(//[^:@/]*:)[^@/]*@", "%1***@"), nil)
  end
  local hp, path = hostport:match("^([^/]*)(.*)$")
  local host, port = hp:match("^%[([^%]]+)%]:?(%d*)$")          -- [::1]:6379
  if not host then host, port = hp:match("^([^:]+):?(%d*)$") end
  if not host or host == "" then return nil, ("%s: no host in the Redis URL"):format(url) end
  port = port ~= "" and math.tointeger(tonumber(port)) or 6379
  if not port or port < 1 or port > 65535 then return nil, ("%s: bad port"):format(url) end
  local db = 0
  if path ~= "" and path ~= "/" then
    db = path:match("^/(%d+)$")
    db = db and math.tointeger(tonumber(db))
    if not db then return nil, ("%s: the path must be a database number (/0, /1, ...)"):format(url) end
  end
  return { tls = scheme == "rediss", user = auth ~= "" and auth or nil, host = host, port = port, db = db, url = url }
end

-- "10s", "500ms", "2m" or a number of seconds -> seconds | nil
local function seconds(v)
  if type(v) == "number" then return v > 0 and v or nil end
  local n, unit = tostring(v):match("^%s*([%d%.]+)%s*(%a*)%s*$")
  local f = ({ [""] = 1, s = 1, ms = 0.001, m = 60, min = 60 })[unit or "x"]
  local x = tonumber(n)
  return x and f and x * f > 0 and x * f or nil
end

local SPEC_KEYS = { url = true, password_file = true, ca_file = true, key = true, lease = true, worker = true,
                    read_ahead = true }

--- Check a campaign's `cluster = {...}` (campaign.new): raises on a misuse.
function M.check_campaign_option(t)
  for k, v in pairs(t) do
    if not SPEC_KEYS[k] then error(("mailshot.campaign: cluster: unknown option '%s'"):format(tostring(k)), 4) end
    if k ~= "lease" and k ~= "read_ahead" and type(v) ~= "string" then
      error(("mailshot.campaign: cluster.%s must be a string"):format(k), 4)
    end
  end
  if t.read_ahead ~= nil and (math.type(t.read_ahead) ~= "integer" or t.read_ahead < 1) then
    error("mailshot.campaign: cluster.read_ahead must be a whole number of rows, at least 1", 4)
  end
  if t.lease ~= nil and not seconds(t.lease) then
    error("mailshot.campaign: cluster.lease must be a duration (\"10s\", \"500ms\") or a number of seconds", 4)
  end
  if t.url then
    local ok, err = M.parse_url(t.url)
    if not ok then error("mailshot.campaign: cluster.url: " .. err, 4) end
  end
  if t.worker and not t.worker:match("^[%w%.%-_:@]+$") then
    error("mailshot.campaign: cluster.worker: letters, digits and . - _ : @ only", 4)
  end
end

local function read_first_line(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local l = f:read("l")
  f:close()
  return l
end

--- The default worker name: host:pid (Linux /proc), unique on one machine.
function M.default_worker()
  local host = read_first_line("/proc/sys/kernel/hostname") or "host"
  local stat = read_first_line("/proc/self/stat") or ""
  local pid = stat:match("^(%d+)") or tostring(math.random(1, 1 << 30))
  return (host:gsub("[^%w%.%-_]", "_")) .. ":" .. pid
end

--- The cluster spec of a run: the campaign's `cluster` table, overridden by the command line's
--- o = { url, worker, password_file }.  nil when neither names a URL (no cluster).
--- -> spec | nil | nil, err
function M.spec(c, o)
  o = o or {}
  local t = c.cluster or {}
  local url = o.url or t.url
  if not url then return nil end
  local u, err = M.parse_url(url)
  if not u then return nil, "--cluster " .. err end
  local paths = require("mailshot.path")
  local function resolve(p) return p and paths.resolve(p, c.base_dir) end
  local worker = o.worker or t.worker or M.default_worker()
  if not worker:match("^[%w%.%-_:@]+$") then
    return nil, ("--worker %s: letters, digits and . - _ : @ only"):format(worker)
  end
  u.password_file = o.password_file or resolve(t.password_file)
  u.ca_file = resolve(t.ca_file)
  u.key = t.key or c.name
  u.worker = worker
  u.lease = seconds(t.lease or M.DEFAULT_LEASE)
  u.read_ahead = t.read_ahead
  return u
end

--- The password for a spec: MAILSHOT_REDIS_PASSWORD, else the first line of password_file,
--- else none.  -> password | false | nil, err
function M.password(spec)
  if spec.password_file then
    local f, err = io.open(spec.password_file, "r")
    if not f then return nil, "Redis password file: " .. err end
    local l = f:read("l") or ""
    f:close()
    return l
  end
  return os.getenv("MAILSHOT_REDIS_PASSWORD") or false
end

-- Scripts ------------------------------------------------------------------------------------

local Script = {}
Script.__index = Script

--- cluster.script(source) -> s; s:run(conn, keys, args) -> reply | nil, err, kind.  The script is
--- loaded once per connection (SCRIPT LOAD gives its SHA-1), then run with EVALSHA; a server
--- that lost it (a restart, SCRIPT FLUSH) answers NOSCRIPT: it is loaded again.
function M.script(source)
  return setmetatable({ source = source, sha = setmetatable({}, { __mode = "k" }) }, Script)
end

function Script:run(conn, keys, args)
  -- the command as one list (table.move copies in C), sent as a pipeline of one: thousands of
  -- arguments are not spread on the stack by table.unpack
  local argv = { "EVALSHA", false, #keys }
  table.move(keys, 1, #keys, 4, argv)
  if args then table.move(args, 1, #args, 4 + #keys, argv) end
  local cmd = { argv }
  for _ = 1, 2 do
    local sha = self.sha[conn]
    if not sha then
      local s, err, kind = conn:call("SCRIPT", "LOAD", self.source)
      if not s then return nil, err, kind end
      sha = s
      self.sha[conn] = s
    end
    argv[2] = sha
    local replies, err, kind = conn:pipeline(cmd)
    if not replies then return nil, err, kind end
    local reply = replies[1]
    if type(reply) == "table" and reply.err ~= nil then
      if not tostring(reply.err):match("^NOSCRIPT") then return nil, reply.err, "reply" end
    else
      return reply
    end
    self.sha[conn] = nil
  end
  return nil, "NOSCRIPT twice", "reply"
end

-- now in ms by the server's clock, and a worker's lease: one clock for every worker
local PRELUDE = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = {}
local function is_live(alive, w)
  local v = live[w]
  if v == nil then
    local s = redis.call('ZSCORE', alive, w)
    v = s ~= false and s ~= nil and tonumber(s) > now
    live[w] = v
  end
  return v
end
local function status_of(rec) return rec:match('^[^\t]*\t[^\t]*\t[^\t]*\t([^\t]*)') end
local function worker_of(rec) return rec:match('^([^\t]*)') end
]]

-- KEYS meta alive workers blocks claim retry flight; ARGV fingerprint name worker lease_ms info block
-- -> {"ok", block} | {"fingerprint", stored} | {"alive", ms left}.  The first worker's block size
-- (lines per block) is the campaign's: every worker must cut the file the same way.
local START = M.script(PRELUDE .. [[
local meta, alive, workers = KEYS[1], KEYS[2], KEYS[3]
local fp, name, me, lease, info = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local stored = redis.call('HGET', meta, 'fingerprint')
if stored and stored ~= fp then return { 'fingerprint', stored } end
local s = redis.call('ZSCORE', alive, me)
if s and tonumber(s) > now then return { 'alive', tostring(tonumber(s) - now) } end
if not stored then
  redis.call('HSET', meta, 'fingerprint', fp, 'name', name, 'created', t[1], 'lease_ms', lease, 'block', ARGV[6])
end
-- A worker that starts again under its name (after kill -9, SIGINT, a lost Redis) finds what
-- its earlier run held: blocks, claimed and deferred rows, in-flight marks.  They pass to a name
-- no live worker has, so that the sweep at the end of a pass takes them like a dead worker's
-- (this worker's own included): its blocks' unsent rows are sent, its marked rows reported.
local earlier = me .. ' (earlier run)'
local function hand_over(key, rewrite)
  local kv = redis.call('HGETALL', key)
  for i = 1, #kv, 2 do
    local v = kv[i + 1]
    if rewrite then
      if worker_of(v) == me then redis.call('HSET', key, kv[i], earlier .. v:sub(#me + 1)) end
    elseif v == me then
      redis.call('HSET', key, kv[i], earlier)
    end
  end
end
hand_over(KEYS[4]); hand_over(KEYS[5]); hand_over(KEYS[7]); hand_over(KEYS[6], true)
redis.call('ZADD', alive, now + lease, me)
redis.call('HSET', workers, me, 'running\t' .. t[1] .. '\t' .. info)
return { 'ok', redis.call('HGET', meta, 'block') or ARGV[6] }
]])

-- KEYS alive; ARGV worker lease_ms -> the lease's old end minus now (ms; negative: it had run out)
local HEARTBEAT = M.script(PRELUDE .. [[
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if not s then return -1 end
return tonumber(s) - now
]])

-- The next block of lines for this worker: KEYS cursor blocks; ARGV worker -> block number.
-- Blocks are handed out in file order; a worker reads the whole file but takes only the rows
-- that start in its blocks, so that the workers split the file without asking Redis about
-- each row (one call per block of lines, not one per row and worker).
local NEXT_BLOCK = M.script([[
local b = redis.call('INCR', KEYS[1]) - 1
redis.call('HSET', KEYS[2], b, ARGV[1])
return b
]])

-- A due retry, claimed again: KEYS claim done retry; ARGV worker, lines.  -> per line 1 (this
-- worker's deferred row: claimed again, in `claim`), 0 (taken over meanwhile, or final).
local CLAIM_RETRY = M.script([[
local claim, done, retry, me = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local out = {}
for i = 2, #ARGV do
  local line, r = ARGV[i], 0
  local h = redis.call('HGET', retry, line)
  if h and h:match('^([^\t]*)') == me and redis.call('HEXISTS', done, line) == 0 then
    redis.call('HDEL', retry, line)
    redis.call('HSET', claim, line, me)
    r = 1
  end
  out[#out + 1] = r
end
return out
]])

-- Who holds a line: its own claim (a retry, or a row taken over alone), else its block's holder.
-- (`claim` is empty in most runs: asked once per call, not once per line.)
local HOLDER = [[
local held = {}
local claims = nil
local function holder(claim, blocks, line, size)
  if claims == nil then claims = redis.call('HLEN', claim) > 0 end
  local h = claims and redis.call('HGET', claim, line)
  if h then return h end
  local b = tostring(math.floor(tonumber(line) / size))
  local v = held[b]
  if v == nil then v = redis.call('HGET', blocks, b) or false; held[b] = v end
  return v
end
]]

-- In flight: KEYS claim flight blocks; ARGV worker, block size, lines.  Each line still held by
-- this worker is marked in flight (-> 1); a line another worker took over meanwhile (this one's
-- lease ran out while it was stalled) is not (-> 0), and must not be sent.
local START_ROWS = M.script(HOLDER .. [[
local claim, flight, blocks, me, size = KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  if holder(claim, blocks, ARGV[i], size) == me then
    redis.call('HSET', flight, ARGV[i], me)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
]])

-- Outcomes: KEYS claim done retry counts flight blocks; ARGV worker, then (op, line, record)
-- triples.  op "F": final (done); "D": deferred (to retry; both release the row's own claim, if
-- any); "B": the block numbered `line` is finished (every row of it this worker took is final or
-- deferred): released.  A final outcome replaces an earlier one of the line (a worker that took
-- over this one's block while its lease had run out reported it in-flight): the counts move
-- with it.  -> the number of records written
local SETTLE = M.script(PRELUDE .. [[
local claim, done, retry, counts, flight, blocks = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local me = ARGV[1]
local n = 0
local add = {}
local function count(k, d) add[k] = (add[k] or 0) + d end
-- `claim` and `retry` are empty in most runs: asked once per call, not once per line
local claims, retries = redis.call('HLEN', claim) > 0, redis.call('HLEN', retry) > 0
for i = 2, #ARGV, 3 do
  local op, line, rec = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'B' then
    if redis.call('HGET', blocks, line) == me then redis.call('HDEL', blocks, line) end
  else
    if claims and redis.call('HGET', claim, line) == me then redis.call('HDEL', claim, line) end
    -- a final outcome ends the row's flight, whoever marked it (a dead worker's in-flight row that
    -- this one reports); a deferred row only ends this worker's own mark
    if op == 'F' or redis.call('HGET', flight, line) == me then redis.call('HDEL', flight, line) end
    if op == 'F' then
      if retries then redis.call('HDEL', retry, line) end
      -- the usual case, a line's first outcome, in one call
      if redis.call('HSETNX', done, line, rec) == 0 then
        local old = redis.call('HGET', done, line)
        local ost = status_of(old)
        count(ost, -1)
        count(worker_of(old) .. '\t' .. ost, -1)
        redis.call('HSET', done, line, rec)
      end
      local st = status_of(rec)
      count(st, 1)
      count(me .. '\t' .. st, 1)
      n = n + 1
    elseif op == 'D' then
      if redis.call('HEXISTS', done, line) == 0 then
        redis.call('HSET', retry, line, rec); retries = true; n = n + 1
      end
    end
  end
end
for k, d in pairs(add) do
  if d ~= 0 then redis.call('HINCRBY', counts, k, d) end
end
return n
]])

-- At the end of a worker's pass over the file: KEYS claim retry alive flight blocks done; ARGV
-- worker, block size.  Takes what workers whose lease ran out held: their blocks -> "B", block,
-- holder, codes (one character per line of the block: "." final, "I" in flight, "R" not
-- started), their claimed rows and deferred rows -> "I"|"R", line, holder.  -> { others, ... },
-- others: blocks and lines still held by live workers.
local SWEEP = M.script(PRELUDE .. [[
local claim, retry, alive, flight, blocks, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local me, size = ARGV[1], tonumber(ARGV[2])
local out = { 0 }
-- every entry of `hash` held by another worker: counted when that one is alive, else taken
-- (the hash names this worker now) and given to take(key, holder)
local function sweep(hash, take)
  local kv = redis.call('HGETALL', hash)
  for i = 1, #kv, 2 do
    local k, h = kv[i], kv[i + 1]
    if h ~= me then
      if is_live(alive, h) then out[1] = out[1] + 1
      else redis.call('HSET', hash, k, me); take(k, h) end
    end
  end
end
sweep(claim, function(line, h)
  out[#out + 1] = redis.call('HEXISTS', flight, line) == 1 and 'I' or 'R'
  out[#out + 1] = line; out[#out + 1] = h
end)
sweep(blocks, function(b, h)
  local codes = {}
  for line = tonumber(b) * size, tonumber(b) * size + size - 1 do
    if redis.call('HEXISTS', done, line) == 1 then codes[#codes + 1] = '.'
    elseif redis.call('HEXISTS', flight, line) == 1 then codes[#codes + 1] = 'I'
    else codes[#codes + 1] = 'R' end
  end
  out[#out + 1] = 'B'; out[#out + 1] = b; out[#out + 1] = h .. '\t' .. table.concat(codes)
end)
local r = redis.call('HGETALL', retry)
for i = 1, #r, 2 do
  local line, h = r[i], worker_of(r[i + 1])
  if h ~= me and not is_live(alive, h) then
    redis.call('HDEL', retry, line)
    redis.call('HSET', claim, line, me)
    out[#out + 1] = 'R'; out[#out + 1] = line; out[#out + 1] = h
  end
end
return out
]])

-- Connecting ---------------------------------------------------------------------------------

local Cluster = {}
Cluster.__index = Cluster

function Cluster:key(suffix) return self.prefix .. suffix end

local function where(spec) return ("Redis %s"):format(spec.url) end

--- connect(spec, campaign) -> cl | nil, err: connected, authenticated (AUTH with the password
--- from MAILSHOT_REDIS_PASSWORD or password_file, as spec.user when the URL names one), the
--- database selected.  From a task.
function M.connect(spec, c)
  local redis = require("mailshot.redis")
  local password, perr = M.password(spec)
  if password == nil then return nil, perr end
  local conn, err = redis.connect { host = spec.host, port = spec.port, tls = spec.tls, verify = true,
                                    ca_file = spec.ca_file, server_name = spec.tls and spec.host or nil,
                                    timeout = spec.timeout or 5 }
  if not conn then return nil, ("%s: cannot connect: %s"):format(where(spec), tostring(err)) end
  if password then
    local ok, aerr
    if spec.user then ok, aerr = conn:call("AUTH", spec.user, password) else ok, aerr = conn:call("AUTH", password) end
    if not ok then conn:close(); return nil, ("%s: AUTH failed: %s"):format(where(spec), tostring(aerr)) end
  end
  if spec.db ~= 0 then
    local ok, serr = conn:call("SELECT", spec.db)
    if not ok then conn:close(); return nil, ("%s: SELECT %d: %s"):format(where(spec), spec.db, tostring(serr)) end
  end
  -- a server that wants a password says so at the first command
  local pong, perr2 = conn:call("PING")
  if not pong then
    conn:close()
    local hint = tostring(perr2):match("^NOAUTH") and " (set MAILSHOT_REDIS_PASSWORD or --redis-password-file)" or ""
    return nil, ("%s: %s%s"):format(where(spec), tostring(perr2), hint)
  end
  local key = spec.key or (c and c.name) or "campaign"
  local self = setmetatable({ redis = conn, spec = spec, worker = spec.worker, lease = spec.lease or M.DEFAULT_LEASE,
                              prefix = "mailshot:{" .. key .. "}:", settleq = {}, unsettled = 0,
                              settled = 0 }, Cluster)
  self.k = { meta = self:key("meta"), alive = self:key("alive"), workers = self:key("workers"),
             claim = self:key("claim"), retry = self:key("retry"), done = self:key("done"),
             counts = self:key("counts"), flight = self:key("flight"), cursor = self:key("cursor"),
             blocks = self:key("blocks") }
  self.held = {}            -- block -> rows of it taken and not yet final or deferred (this worker's)
  return self
end

-- Redis is gone (a transport error): remember why, once, and tell the run.
function Cluster:fail(err, kind)
  if kind == "io" and not self.lost then
    self.lost = tostring(err)
    if self.on_lost then self.on_lost(self.lost) end
  end
  return nil, err
end

--- Join the campaign: the fingerprint is checked (stored by the first worker), the worker
--- registered and its heartbeat started.  -> true | nil, err
function Cluster:start(fingerprint, name, block)
  local k = self.k
  local host = read_first_line("/proc/sys/kernel/hostname") or "?"
  local pid = (read_first_line("/proc/self/stat") or ""):match("^(%d+)") or "?"
  self.info = pid .. "@" .. host
  local r, err = START:run(self.redis, { k.meta, k.alive, k.workers, k.blocks, k.claim, k.retry, k.flight },
                           { fingerprint, name or "", self.worker, math.floor(self.lease * 1000), self.info,
                            block or M.DEFAULT_BLOCK })
  if not r then return nil, ("%s: %s"):format(where(self.spec), tostring(err)) end
  if r[1] == "fingerprint" then
    return nil, ("%s: campaign %s: this worker's recipients file, script or templates differ from the ones the "
                 .. "cluster started with (fingerprint here %s, in Redis %s): every worker must run the same "
                 .. "files, since rows are matched by CSV line"):format(where(self.spec), self.prefix:match("{(.*)}"),
                 fingerprint, r[2])
  elseif r[1] == "alive" then
    return nil, ("%s: a worker named %s is alive (its lease has %.1f s left): another process uses that name, "
                 .. "or it stopped less than a lease ago; give another --worker, or wait"):format(
                 where(self.spec), self.worker, (tonumber(r[2]) or 0) / 1000)
  end
  self.block = math.tointeger(tonumber(r[2])) or block or M.DEFAULT_BLOCK
  self.running, self.started = true, os.time()
  core.spawn(function() self:heartbeat() end)
  return true
end

-- Redis is the campaign's journal: a Redis that restarted without persistence has forgotten
-- the campaign, and a worker started then would begin it again, sending everyone a second copy.
-- So a worker leaves a marker beside its report (NAME.cluster: key and URL, no password), and a
-- worker that finds its marker but no trace of the campaign in Redis refuses to start, unless
-- --force (start the campaign over).  -> true | nil, err
function Cluster:check_marker(path, force)
  if not path or force then return true end
  local f = io.open(path, "r")
  if not f then return true end
  local text = f:read("a") or ""
  f:close()
  local n, err = self.redis:call("EXISTS", self.k.meta)
  if not n then return nil, ("%s: %s"):format(where(self.spec), tostring(err)) end
  if n == 1 then return true end
  return nil, ("%s has no trace of campaign %s, which was run in cluster mode from here before (%s: %s): "
               .. "Redis lost its data (a restart without persistence?), or this is another database. Starting "
               .. "would send everyone a second copy. Check the URL; --force starts the campaign over"):format(
               where(self.spec), self.prefix:match("{(.*)}"), path, (text:gsub("%s+$", "")))
end

function Cluster:write_marker(path)
  if not path then return end
  local ok, err = util.replace_file(path, ("key %s url %s started %s\n"):format(self.prefix:match("{(.*)}"),
                                                                             self.spec.url, os.date("!%Y-%m-%dT%H:%M:%SZ")))
  if not ok then io.stderr:write("mailshot: ", tostring(err), "\n") end
end

function Cluster:heartbeat()
  local every = self.lease / 3
  while self.running do
    core.sleep(every)
    if not self.running or self.lost then break end
    local left, err, kind = HEARTBEAT:run(self.redis, { self.k.alive }, { self.worker, math.floor(self.lease * 1000) })
    if not left then self:fail(err, kind)
    elseif left < 0 and not self.warned_lease then
      self.warned_lease = true
      io.stderr:write(("mailshot: cluster: worker %s's lease ran out %.1f s before this heartbeat (the process "
                       .. "was stalled): other workers may have reported its rows in flight\n"):format(
                       self.worker, -left / 1000))
    end
  end
end

-- Blocks and claims ------------------------------------------------------------------------

--- The next block of lines handed to this worker (from a task: waits for Redis) -> number |
--- nil, err.  Its rows are this worker's until it settles them; a block with no row of this
--- worker's left open is released (Cluster:block_done).
function Cluster:next_block()
  if self.lost then return nil, self.lost end
  local b, err, kind = NEXT_BLOCK:run(self.redis, { self.k.cursor, self.k.blocks }, { self.worker })
  if not b then return self:fail(err, kind) end
  return b
end

--- This worker took a row of one of its blocks (to send, or to settle at once).
function Cluster:took(line)
  local b = line // self.block
  self.held[b] = (self.held[b] or 0) + 1
  self.open = self.open or {}
  self.open[line] = b
end

--- A block that this worker's reading has gone past (or that it held and found nothing in):
--- released once every row taken from it is settled.  keep: rows of it were given back (not
--- started): the block stays held, and a worker that finds it after this one stops takes them.
function Cluster:block_done(b, keep)
  self.closed = self.closed or {}
  if keep then self.kept = self.kept or {}; self.kept[b] = true end
  self.closed[b] = true
  self:release_if_done(b)
end

function Cluster:release_if_done(b)
  if (self.held[b] or 0) > 0 or not self.closed[b] or (self.kept and self.kept[b]) then return end
  self.held[b], self.closed[b] = nil, nil
  local q = self.settleq
  q[#q + 1] = "B"; q[#q + 1] = b; q[#q + 1] = ""
end

-- A row's first final or deferred outcome (or its giving back) ends its part in its block.
function Cluster:untake(line, keep)
  local open = self.open
  local b = open and open[line]
  if not b then return end
  open[line] = nil
  self.held[b] = self.held[b] - 1
  if keep then self.kept = self.kept or {}; self.kept[b] = true end
  if self.closed and self.closed[b] then self:release_if_done(b) end
end

--- claim_retry(line) -> true | false (taken over meanwhile, or final): this worker's deferred
--- row claimed again for its next try (one script call; retries are few).
function Cluster:claim_retry(line)
  if self.lost then return false end
  local r, err, kind = CLAIM_RETRY:run(self.redis, { self.k.claim, self.k.done, self.k.retry }, { self.worker, line })
  if not r then self:fail(err, kind); return false end
  return r[1] == 1
end

--- Mark a row of this worker's in flight, right before its message goes out -> a gate
--- (mailshot.smtp.gate) that opens once Redis has the mark, or is refused: another worker took
--- the row over (this one's lease ran out while it was stalled: do not send it), or Redis is
--- lost (cl.lost says why).  The rows that tasks mark in one turn of the loop go in one script
--- call.  A relay send given the gate (msg.gate) waits in its relay's line meanwhile, without a
--- session, so the round trip to Redis overlaps the wait for a session.
function Cluster:mark(line)
  local gate = smtp.gate()
  if self.lost then gate:refuse("Redis is lost: " .. self.lost); return gate end
  local q = self.startq
  if not q then
    q = { lines = {}, gates = {} }
    self.startq = q
    core.spawn(function()
      coroutine.yield()                   -- the other tasks of this turn join the batch
      self.startq = nil
      local args = { self.worker, self.block }
      table.move(q.lines, 1, #q.lines, 3, args)
      local r, err, kind = START_ROWS:run(self.redis, { self.k.claim, self.k.flight, self.k.blocks }, args)
      if not r then self:fail(err, kind) end
      for i, g in ipairs(q.gates) do
        if r and r[i] == 1 then g:open()
        elseif r then g:refuse("another worker took this row over (this worker's lease ran out)")
        else g:refuse("Redis is lost: " .. tostring(err)) end
      end
    end)
  end
  local i = #q.lines + 1
  q.lines[i], q.gates[i] = line, gate
  return gate
end

--- A report row's record (the value kept in Redis).
function Cluster:record(rep)
  return (tsv_record(self.worker, rep.line, rep.email, rep, RECORD):sub(1, -2))
end

--- An outcome of this worker: op "F" (final), "D" (deferred: waiting for a retry, or left
--- for the next worker), "U" (taken, not started: its block stays held, and the worker that
--- takes the block after this one stops sends it), "X" (taken over by another worker: nothing
--- in Redis).  Sent with the next flush.
function Cluster:settle(op, rep)
  self:untake(rep.line, op == "U")
  if op == "U" or op == "X" then return end
  local q = self.settleq
  q[#q + 1] = op; q[#q + 1] = rep.line; q[#q + 1] = self:record(rep)
  self.unsettled = self.unsettled + 1
  if #q >= 3 * MAX_BATCH then self:flush() end
end

--- Send the buffered outcomes (one script call per MAX_BATCH).  From a task.  -> true | nil, err
function Cluster:flush()
  if self.lost then return nil, self.lost end
  while self.settleq[1] do
    local q = self.settleq
    local n = math.min(#q, 3 * MAX_BATCH)
    local args = table.move(q, 1, n, 2, { self.worker })
    if n == #q then self.settleq = {} else self.settleq = table.move(q, n + 1, #q, 1, {}) end
    local r, err, kind = SETTLE:run(self.redis, { self.k.claim, self.k.done, self.k.retry, self.k.counts, self.k.flight,
                                                  self.k.blocks }, args)
    if not r then
      -- put them back in front: they are counted as unsettled in the end-of-run message
      self.settleq = table.move(self.settleq, 1, #self.settleq, n + 1, table.move(args, 2, n + 1, 1, {}))
      return self:fail(err, kind)
    end
    local rows = 0
    for i = 2, n + 1, 3 do if args[i] ~= "B" then rows = rows + 1 end end
    self.unsettled = self.unsettled - rows
    self.settled = self.settled + rows
  end
  return true
end

--- At the end of this worker's pass over the file: what workers whose lease ran out held, now
--- this worker's -> { lines = { [line] = { kind = "I"|"R", holder } }, blocks = { [block] =
--- { holder, codes } } (codes: a character per line of the block, from its first: "." final,
--- "I" in flight, "R" not started) }, count, others (blocks and lines held by live workers) |
--- nil, err
function Cluster:sweep()
  if self.lost then return nil, self.lost end
  self:flush()
  local r, err, kind = SWEEP:run(self.redis, { self.k.claim, self.k.retry, self.k.alive, self.k.flight, self.k.blocks,
                                               self.k.done }, { self.worker, self.block })
  if not r then return self:fail(err, kind) end
  local found, n = { lines = {}, blocks = {} }, 0
  for i = 2, #r, 3 do
    local id = math.tointeger(tonumber(r[i + 1]))
    if r[i] == "B" then
      local holder, codes = r[i + 2]:match("^(.*)\t(.*)$")
      found.blocks[id] = { holder = holder, codes = codes }
    else
      found.lines[id] = { kind = r[i], holder = r[i + 2] }
    end
    n = n + 1
  end
  return found, n, r[1]
end

--- What a swept block or line says about `line`: "." (final: nothing to do), "I"|"R", holder, or
--- nil (not taken over).
function Cluster:orphan_of(found, line)
  local o = found.lines[line]
  if o then return o.kind, o.holder end
  local b = found.blocks[line // self.block]
  if b then
    local code = b.codes:sub(line % self.block + 1, line % self.block + 1)
    return code, b.holder
  end
end

--- The run is over: outcomes flushed, the worker marked finished and its lease given up (its
--- deferred rows go to whichever worker runs next).  -> true | nil, err
function Cluster:finish()
  self.running = false
  if self.lost then return nil, self.lost end
  local ok, err = self:flush()
  if not ok then return nil, err end
  local r, perr, kind = self.redis:pipeline {
    { "HSET", self.k.workers, self.worker, ("finished\t%d\t%s"):format(self.started or os.time(), self.info or "") },
    { "ZREM", self.k.alive, self.worker },
  }
  if not r then return self:fail(perr, kind) end
  return true
end

function Cluster:close()
  self.running = false
  if self.redis and not self.redis:closed() then self.redis:close() end
end

-- Status and the merged report -----------------------------------------------------------------

local UNESC = { t = "\t", n = "\n", r = "\r", ["\\"] = "\\" }
local function split(rec)
  local out = {}
  for f in (rec .. "\t"):gmatch("([^\t]*)\t") do out[#out + 1] = (f:gsub("\\(.)", UNESC)) end
  return out
end

--- A record as a report row (worker in .worker).
function M.parse_record(rec)
  local t = split(rec)
  local rep = { worker = t[1], line = math.tointeger(tonumber(t[2])), email = t[3] }
  for i, k in ipairs(RECORD) do
    local v = t[3 + i]
    if v ~= nil and v ~= "" then rep[k] = v end
  end
  return rep
end

-- Every HASH entry, by HSCAN (a big hash is read in steps, not in one reply).
local function hscan(conn, key, each)
  local cursor = "0"
  repeat
    local r, err = conn:call("HSCAN", key, cursor, "COUNT", 1000)
    if not r then return nil, err end
    cursor = r[1]
    local kv = r[2]
    for i = 1, #kv, 2 do each(kv[i], kv[i + 1]) end
  until cursor == "0"
  return true
end

--- The campaign's state in Redis -> { meta, workers = { {name, state, alive, lease_left, started,
--- info, counts, claimed, blocks} }, counts, claimed, deferred, done, now } | nil, err.  claimed:
--- the rows marked in flight now (`flight`); blocks: the blocks a worker holds.
function Cluster:state()
  local k, conn = self.k, self.redis
  local r, err = conn:pipeline {
    { "HGETALL", k.meta }, { "HGETALL", k.workers }, { "ZRANGE", k.alive, 0, -1, "WITHSCORES" },
    { "HGETALL", k.counts }, { "HGETALL", k.flight }, { "HLEN", k.retry }, { "TIME" }, { "HLEN", k.done },
    { "HGETALL", k.blocks },
  }
  if not r then return nil, err end
  for _, x in ipairs(r) do if type(x) == "table" and x.err then return nil, x.err end end
  local function pairs_of(a) local t = {} for i = 1, #a, 2 do t[a[i]] = a[i + 1] end return t end
  local now = tonumber(r[7][1]) * 1000 + tonumber(r[7][2]) // 1000
  local st = { meta = pairs_of(r[1]), counts = {}, workers = {}, claimed = 0, deferred = r[6], done = r[8], now = now }
  local leases = pairs_of(r[3])
  local by = {}
  for name, v in pairs(pairs_of(r[2])) do
    local state, started, info = v:match("^([^\t]*)\t([^\t]*)\t?(.*)$")
    local left = leases[name] and tonumber(leases[name]) - now
    local w = { name = name, state = state, started = tonumber(started), info = info, counts = {}, claimed = 0,
                blocks = 0, alive = left ~= nil and left > 0, lease_left = left }
    by[name] = w
    st.workers[#st.workers + 1] = w
  end
  for key, n in pairs(pairs_of(r[4])) do
    local w, status = key:match("^(.*)\t(.*)$")
    n = math.tointeger(tonumber(n))
    if w then
      if by[w] then by[w].counts[status] = n end
    else
      st.counts[key] = n
    end
  end
  for _, holder in pairs(pairs_of(r[5])) do              -- claimed: rows in flight now
    st.claimed = st.claimed + 1
    if by[holder] then by[holder].claimed = by[holder].claimed + 1 end
  end
  for _, holder in pairs(pairs_of(r[9])) do
    if by[holder] then by[holder].blocks = by[holder].blocks + 1 end
  end
  table.sort(st.workers, function(a, b) return (a.started or 0) < (b.started or 0) or
                                               (a.started == b.started and a.name < b.name) end)
  return st
end

local STATUSES = { "sent", "failed", "skipped", "in-flight" }

--- The text `mailshot cluster status` prints.
function M.status_text(st, name, total)
  local out = {}
  local c = st.counts
  local final = 0
  for _, s in ipairs(STATUSES) do final = final + (c[s] or 0) end
  if not st.meta.fingerprint then
    return ("%s: no such campaign in Redis (no worker has started it)"):format(name)
  end
  out[#out + 1] = ("%s: %d%s rows final: %d sent, %d failed, %d skipped, %d in-flight (possibly sent); "
                   .. "%d deferred; %d in flight now"):format(name, final, total and ("/" .. total) or "",
                   c.sent or 0, c.failed or 0, c.skipped or 0, c["in-flight"] or 0, st.deferred, st.claimed)
  local alive, dead = 0, 0
  for _, w in ipairs(st.workers) do
    if w.alive then alive = alive + 1 elseif w.state ~= "finished" then dead = dead + 1 end
  end
  out[#out + 1] = ("workers: %d alive, %d dead, %d finished"):format(alive, dead, #st.workers - alive - dead)
  for _, w in ipairs(st.workers) do
    local what = w.alive and ("alive (lease %.1f s)"):format(w.lease_left / 1000)
                 or w.state == "finished" and "finished"
                 or ((w.claimed > 0 or w.blocks > 0)
                     and "dead: the next worker takes its rows (the in-flight ones are reported in-flight)" or "dead")
    local n = w.counts
    out[#out + 1] = ("  %-28s %-10s sent %d  failed %d  skipped %d  in-flight %d  in flight now %d  blocks %d  %s"):format(
      w.name, w.info ~= "" and w.info or "", n.sent or 0, n.failed or 0, n.skipped or 0, n["in-flight"] or 0,
      w.claimed, w.blocks, what)
  end
  return table.concat(out, "\n")
end

--- Write the merged report: every row of the campaign's CSV file, in line order, with its
--- outcome in Redis (final, deferred), else from its holder (its `claim` entry, else its block's):
--- `in-flight` when marked in flight, `not-started` when only reserved or held by no one.
--- -> counts | nil, err
function Cluster:write_report(c, path, columns)
  local outcome = require("mailshot.outcome")
  local rows = require("mailshot.rows")
  local k, conn = self.k, self.redis
  local byline = {}
  local ok, err = hscan(conn, k.done, function(line, rec) byline[tonumber(line)] = M.parse_record(rec) end)
  if not ok then return nil, err end
  ok, err = hscan(conn, k.retry, function(line, rec)
    local n = tonumber(line)
    if not byline[n] then
      local rep = M.parse_record(rec)
      rep.status = "deferred"
      byline[n] = rep
    end
  end)
  if not ok then return nil, err end
  local st
  st, err = self:state()
  if not st then return nil, err end
  local alive = {}
  for _, w in ipairs(st.workers) do alive[w.name] = w.alive end
  local claimed, flying, blocks = {}, {}, {}
  ok, err = hscan(conn, k.claim, function(line, holder) claimed[tonumber(line)] = holder end)
  if not ok then return nil, err end
  ok, err = hscan(conn, k.blocks, function(b, holder) blocks[tonumber(b)] = holder end)
  if not ok then return nil, err end
  local size = math.tointeger(tonumber(st.meta.block)) or M.DEFAULT_BLOCK
  ok, err = hscan(conn, k.flight, function(line) flying[tonumber(line)] = true end)
  if not ok then return nil, err end
  local reader
  reader, err = rows.open_reader(c)
  if not reader then return nil, err end
  local report
  report, err = outcome.open_report(path, columns)
  if not report then reader:close(); return nil, err end
  local function emit(line, email)
    local rep = byline[line]
    local h = not rep and (claimed[line] or blocks[line // size])
    if h then
      if alive[h] and flying[line] then
        rep = { line = line, email = email, status = "in-flight", stage = "cluster",
                response = ("being sent by worker %s"):format(h) }
      elseif alive[h] then
        rep = { line = line, email = email, status = "not-started", stage = "cluster",
                response = ("reserved by worker %s, which has not sent it yet"):format(h) }
      elseif flying[line] then
        rep = { line = line, email = email, status = "in-flight", stage = "cluster",
                response = ("possibly sent by worker %s, which stopped while it was in flight"):format(h) }
      else
        rep = { line = line, email = email, status = "not-started", stage = "cluster",
                response = ("reserved by worker %s, which stopped before sending it; the next worker sends it"):format(h) }
      end
    end
    rep = rep or { line = line, email = email, status = "not-started", response = "no worker has reached this row yet" }
    rep.line = line
    report:add(rep)
  end
  local last = 1
  while true do
    local row, line = reader:read()
    if row == nil and not line then break end
    if line then
      emit(line, row and row[c.email_field])
      last = reader:line()
      for n = line + 1, last do if byline[n] then emit(n) end end      -- lines a broken record swallowed
    end
  end
  reader:close()
  ok, err = report:close()
  if not ok then return nil, err end
  local total = 0
  for _, n in pairs(report.counts) do total = total + n end
  report.counts.total = total
  return report.counts
end

return M
