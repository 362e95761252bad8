-- mailshot.cluster_suppress: a suppression list shared by every worker of a cluster run (issue 15).
--
--   local cs = require "mailshot.cluster_suppress"
--   local watch = assert(cs.start(cl, campaign, run))   -- load, then follow additions
--   cs.publish(cl, "ann@example.net", "550 5.1.1 user unknown")
--   watch.stop()
--
-- Redis holds two keys of the campaign (cl:key): "suppress", a SET of the entries (addresses, or
-- "@domain"), and "suppress:log", a LIST of the same additions in the order they were made
-- ("entry\treason"), which the workers follow: a worker loads the set once at the start of its
-- run (after noting the log's length, so nothing added meanwhile is missed), then reads the log
-- from there every POLL seconds.  An entry reaches every worker within about POLL seconds of its
-- publication; rows a worker classifies after that are "suppressed: shared suppression list".
-- A message already handed to the relay is not called back.
--
-- publish is one script: SADD, and RPUSH only when the set did not have the entry, so the log
-- holds each entry once.  The local suppression files (campaign `suppress`) are not pushed to
-- Redis: every worker loads its own files (the same script on every host names the same files);
-- only additions made during a run (hard bounces of the run, `mailshot bounces --cluster`) are
-- shared.

local core = require("mailshot.core")
local suppress = require("mailshot.suppress")

local M = {}

M.POLL = 0.5                 -- seconds between two reads of the log
M.SOURCE = "shared suppression list"
local BATCH = 1000           -- entries per SSCAN / LRANGE

M.PUBLISH = [[
if redis.call("SADD", KEYS[1], ARGV[1]) == 1 then
  redis.call("RPUSH", KEYS[2], ARGV[1] .. "\t" .. ARGV[2])
  return 1
end
return 0
]]

local function script(which)
  M._scripts = M._scripts or {}
  local s = M._scripts[which]
  if not s then
    local cluster = require("mailshot.cluster")
    s = cluster.script(M[which])
    M._scripts[which] = s
  end
  return s
end

local function one_line(s)
  return (tostring(s or ""):gsub("[%c\127]", " "):gsub("%s+", " "):match("^%s*(.-)%s*$"):sub(1, 300))
end

--- cluster_suppress.publish(cl, entry [, reason]) -> true, added | nil, err
--- Adds an address (or "@domain") to the campaign's shared list; added is false when it was
--- there already.  Yields (a Redis call).  A malformed entry is refused (nil, why).
function M.publish(cl, entry, reason)
  if type(cl) ~= "table" or not cl.redis then error("cluster_suppress.publish: expected a cluster connection", 2) end
  if type(entry) ~= "string" then error("cluster_suppress.publish: entry must be a string", 2) end
  entry = entry:match("^%s*(.-)%s*$")
  local ok, why = suppress.new():add(entry)          -- the same check as a file's entries
  if not ok or entry:find("^#") then return nil, why or ("cannot store %q"):format(entry) end
  local r, err = (M.script_for_test or script("PUBLISH")):run(cl.redis, { cl:key("suppress"), cl:key("suppress:log") },
                                                             { entry, one_line(reason) })
  if not r then return nil, "shared suppression list: " .. tostring(err) end
  return true, r == 1
end

local function add(list, entry)
  entry = entry:match("^([^\t]*)")
  list:add(entry, M.SOURCE)                          -- a malformed entry is skipped
end

--- cluster_suppress.load(cl, list) -> log position | nil, err: every entry of the shared set
--- into list (a mailshot.suppress list).  Yields.
function M.load(cl, list)
  local conn = cl.redis
  local pos, err = conn:call("LLEN", cl:key("suppress:log"))
  if not pos then return nil, "shared suppression list: " .. tostring(err) end
  local cursor, rounds = "0", 0
  repeat
    local r
    r, err = conn:call("SSCAN", cl:key("suppress"), cursor, "COUNT", BATCH)
    if not r then return nil, "shared suppression list: " .. tostring(err) end
    cursor = r[1]
    for _, e in ipairs(r[2]) do add(list, e) end
    rounds = rounds + 1
  until cursor == "0" or rounds > 1e7
  return pos
end

--- cluster_suppress.poll(cl, list, pos) -> new pos | nil, err: the log's entries from pos.
function M.poll(cl, list, pos)
  local conn = cl.redis
  while true do
    local r, err = conn:call("LRANGE", cl:key("suppress:log"), pos, pos + BATCH - 1)
    if not r then return nil, "shared suppression list: " .. tostring(err) end
    for _, e in ipairs(r) do add(list, e) end
    pos = pos + #r
    if #r < BATCH then return pos end
  end
end

--- cluster_suppress.start(cl, c [, run]) -> watch | nil, err
--- Loads the shared set into c.suppressed (made empty when the campaign has no `suppress`), then
--- follows the log in a task until watch.stop() is called or run.stopping is set.  Yields.
function M.start(cl, c, run)
  if not c.suppressed then c.suppressed = suppress.new() end
  local list = c.suppressed
  local pos, err = M.load(cl, list)
  if not pos then return nil, err end
  local watch = { running = true, pos = pos }
  function watch.stop() watch.running = false end
  core.spawn(function()
    local warned = false
    while watch.running and not (run and run.stopping) do
      core.sleep(M.POLL)
      if not watch.running then break end
      local p, perr = M.poll(cl, list, watch.pos)
      if p then
        watch.pos = p
      elseif watch.running then                      -- (not the end of the run closing Redis)
        if not warned then io.stderr:write("mailshot: ", tostring(perr), "\n"); warned = true end
        if cl.redis.closed and cl.redis:closed() then break end
      end
    end
    watch.running = false
  end)
  return watch
end

return M
