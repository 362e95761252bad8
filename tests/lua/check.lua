-- check.lua - the assertion helpers shared by tests/lua/test_*.lua (not a test itself: `make luatest`
-- runs test_*.lua only).  A test loads it through its own location, so any working directory and
-- both binaries (./mailshot, build/asan/mailshot) and plain lua5.4 work:
--
--   local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
--   local check = dofile(here .. "check.lua")
--   local case, eq, checkerr = check.case, check.eq, check.checkerr
--   ...
--   return check.finish("test_x.lua")      -- last line: prints the summary, returns the exit status
--
-- Each dofile gives a fresh table with its own counters.  Everything here is local: loading it
-- writes no global, so a test's "the module writes no globals" case still sees only its module.
--
-- Running cases
--   case(name, f)           run f under pcall; count it passed or failed (a failure prints
--                           "FAIL name" and the message, and the run goes on)
--   finish(name)            print "NAME: N passed, M failed" and return 0 (none failed) or 1, the
--                           exit status `mailshot exec` takes from the chunk; under plain lua5.4,
--                           which ignores it, a failed run exits 1 instead
--   counts()                passed, failed so far
--   globals_snapshot()      remember the globals now; returns a function that raises on any global
--                           added since (take it before requiring the module under test)
-- Values (each raises at the caller's line)
--   eq(got, want, what)     got == want (plain Lua equality: tables by identity)
--   eq_deep(got, want, what)  same(got, want): tables compared key by key, recursively
--   same(a, b), show(v)     the comparison and printing eq_deep uses
--   near(got, want, what, tol)  |got - want| < tol (default 1e-9)
--   contains(s, part)       s is a string with `part` in it, as a plain substring
-- Errors: raised (checkerr*) or returned as nil, message (fails*)
--   checkerr(parts, f, ...)       f(...) raises; its message contains every part (a string or a
--                                 list) as a PLAIN substring; returns the message
--   checkerr_match(pattern, f, ...)  f(...) raises; its message matches the Lua PATTERN; returns it
--   fails(parts, v, err)          v is nil and tostring(err) contains every part (plain); for a
--                                 call's results: fails("x", f(a))
--   fails_call(parts, f, ...)     f(...) returns nil and a string message containing every part
--                                 (plain); returns the message
-- Sizes
--   scaled(n, small)        n, or small when MAILSHOT_VALGRIND is set (`make valgrind` runs the tests
--                           under valgrind, ~30 times slower): for loops whose figures are only printed
--   under_valgrind          true when MAILSHOT_VALGRIND is set

local M = {}

M.under_valgrind = (os.getenv("MAILSHOT_VALGRIND") or "0") ~= "0"
function M.scaled(n, small) return M.under_valgrind and small or n end

local passed, failed = 0, 0

function M.case(name, f)
  local ok, err = pcall(f)
  if ok then
    passed = passed + 1
  else
    failed = failed + 1
    print("FAIL " .. name .. "\n     " .. tostring(err))
  end
end

function M.counts() return passed, failed end

function M.finish(name)
  print(string.format("%s: %d passed, %d failed", name, passed, failed))
  -- the mailshot runner takes the chunk's return value as exit status; plain lua5.4 does not
  if failed > 0 and package.preload["mailshot.core"] == nil then os.exit(1) end
  return failed == 0 and 0 or 1
end

function M.globals_snapshot()
  local before = {}
  for k in pairs(_G) do before[k] = true end
  return function()
    for k in pairs(_G) do assert(before[k], "new global " .. tostring(k)) end
  end
end

---------------------------------------------------------------- values

function M.eq(got, want, what)
  if got ~= want then
    error(string.format("%s: expected %q, got %q", what or "value", tostring(want), tostring(got)), 2)
  end
end

local LITERAL = { string = true, number = true, boolean = true, ["nil"] = true }

local function show(v)
  if type(v) ~= "table" then
    return LITERAL[type(v)] and string.format("%q", v) or tostring(v)
  end
  local parts = {}
  for k, x in pairs(v) do parts[#parts + 1] = tostring(k) .. "=" .. show(x) end
  table.sort(parts)
  return "{" .. table.concat(parts, ", ") .. "}"
end
M.show = show

local function same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end
M.same = same

function M.eq_deep(got, want, what)
  if not same(got, want) then
    error(string.format("%s: got %s, want %s", what or "value", show(got), show(want)), 2)
  end
end

function M.near(got, want, what, tol)
  if not (math.abs(got - want) < (tol or 1e-9)) then
    error(string.format("%s: expected %.12g, got %.12g", what or "value", want, got), 2)
  end
end

function M.contains(s, part)
  if type(s) ~= "string" or not string.find(s, part, 1, true) then
    error(string.format("%q does not contain %q", tostring(s), part), 2)
  end
end

---------------------------------------------------------------- errors

-- Why `err` fails to contain every one of `parts` (a string or a list) as a plain substring, or nil.
local function lacking(err, parts)
  for _, p in ipairs(type(parts) == "table" and parts or { parts }) do
    if not string.find(err, p, 1, true) then
      return string.format("error %q does not contain %q", err, p)
    end
  end
end

-- Why v, err is not a failure (nil, message with every part), or nil.  A returned v is shown cut to
-- a readable length; need_string also wants err to be a string, not merely printable.
local function not_failure(parts, v, err, need_string)
  if v ~= nil then
    local s = tostring(v)
    return string.format("expected nil, message; got %q", #s > 200 and s:sub(1, 200) .. "..." or s)
  end
  if need_string and type(err) ~= "string" then return "expected an error message, got " .. type(err) end
  return lacking(tostring(err), parts)
end

function M.checkerr(parts, f, ...)
  local ok, err = pcall(f, ...)
  if ok then error("expected an error, got none", 2) end
  err = tostring(err)
  local why = lacking(err, parts)
  if why then error(why, 2) end
  return err
end

function M.checkerr_match(pattern, f, ...)
  local ok, err = pcall(f, ...)
  if ok then error("expected an error matching " .. pattern .. ", got none", 2) end
  err = tostring(err)
  if not string.find(err, pattern) then
    error(string.format("error %q does not match the pattern %q", err, pattern), 2)
  end
  return err
end

function M.fails(parts, v, err)
  local why = not_failure(parts, v, err, false)
  if why then error(why, 2) end
  return tostring(err)
end

function M.fails_call(parts, f, ...)
  local v, err = f(...)
  local why = not_failure(parts, v, err, true)
  if why then error(why, 2) end
  return err
end

return M
