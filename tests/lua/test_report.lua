-- test_report.lua - mailshot.outcome's report: rows added in completion order end up in CSV line
-- order when the report is closed, whatever their order, size or quoting.
-- (End to end, with a real run, in tests/integration/test_report.py.)
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq = check.case, check.eq

local outcome = require "mailshot.outcome"

local DIR = os.tmpname()
os.remove(DIR)
assert(os.execute("mkdir -p '" .. DIR .. "'"))
local COLUMNS = { "line", "email", "status", "response" }

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- the rows `reps` added in the order `order` -> the file's text after close
local function written(name, reps, order)
  local path = DIR .. "/" .. name
  local report = assert(outcome.open_report(path, COLUMNS))
  for _, i in ipairs(order) do report:add(reps[i]) end
  assert(report:close())
  return slurp(path)
end

local function rows(n, response)
  local reps = {}
  for i = 1, n do
    reps[i] = { line = i + 1, email = ("u%d@example.com"):format(i), status = "sent", response = response(i) }
  end
  return reps
end

local function in_order(n) local o = {} for i = 1, n do o[i] = i end return o end

-- rows shuffled near their place (as completions come: a few lines apart), with a fixed seed
local function near(n, span, seed)
  local o = in_order(n)
  local rnd = math.random
  math.randomseed(seed)
  for i = 1, n do
    local j = math.min(n, i + rnd(0, span))
    o[i], o[j] = o[j], o[i]
  end
  math.randomseed()
  return o, rnd
end

local function reversed(n) local o = {} for i = 1, n do o[i] = n + 1 - i end return o end

case("plain rows: any order gives the in-order file", function()
  local reps = rows(3000, function(i) return "250 2.0.0 queued as " .. i end)
  local want = written("a.csv", reps, in_order(#reps))
  eq(written("b.csv", reps, near(#reps, 40, 7)), want, "shuffled near their place")
  eq(written("c.csv", reps, reversed(#reps)), want, "reversed")
end)

case("quoted cells with commas, quotes and line breaks", function()
  local reps = rows(500, function(i)
    if i % 3 == 0 then return ('550 "no"\r\nsuch, user %d\n"x"'):format(i) end
    if i % 3 == 1 then return ("a,b %d"):format(i) end
    return ("  spaces %d  "):format(i)
  end)
  local want = written("d.csv", reps, in_order(#reps))
  eq(written("e.csv", reps, near(#reps, 25, 11)), want, "shuffled")
  eq(written("f.csv", reps, reversed(#reps)), want, "reversed")
end)

case("rows longer than the read-back window, around the window's edges", function()
  local big = ("x"):rep(700 * 1024)
  local reps = rows(12, function(i)
    if i % 4 == 0 then return big .. '"' .. i .. '"\r\n' .. big end     -- 1.4 MB, quoted, a line break
    if i % 4 == 1 then return big end
    return "small " .. i
  end)
  local want = written("g.csv", reps, in_order(#reps))
  eq(#want > 6 * 700 * 1024, true, "the file is bigger than several windows")
  eq(written("h.csv", reps, reversed(#reps)), want, "reversed")
  eq(written("i.csv", reps, { 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11 }), want, "pairs swapped")
end)

os.execute("rm -rf '" .. DIR .. "'")
return check.finish("test_report.lua")
