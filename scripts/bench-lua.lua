-- bench-lua.lua - CPU rates of the Lua-side work done per recipient (make bench runs it):
--   ./mailshot exec scripts/bench-lua.lua
-- idna.to_ascii conversions/s, CSV rows read/s, rows/s rendered into the example campaign's bodies, mime.build messages/s with a
-- 100 kB attachment, bounce.parse + classify messages/s over tests/data/bounces, and what reading a list in each
-- encoding costs (the last section).
-- Each figure is the median of 3 rounds of CPU time (os.clock).  Not a test: nothing is asserted
-- but that the work succeeded (the tests in tests/lua check what it produces).
local idna = require "mailshot.idna"
local csv = require "mailshot.csv"
local mime = require "mailshot.mime"
local template = require "mailshot.template"

local function median3(f)
  local t = {}
  for r = 1, 3 do
    collectgarbage()
    local t0 = os.clock()
    local n = f()
    t[r] = n / math.max(os.clock() - t0, 1e-9)
  end
  table.sort(t)
  return t[2]
end

local idna_rate = median3(function()
  local n = 20000
  for i = 1, n do
    assert(idna.to_ascii((i % 2 == 0) and "Bücher" .. i .. ".example" or "mail" .. i .. ".example.com"))
  end
  return n
end)

local path = os.tmpname()
do
  local f = assert(io.open(path, "w"))
  f:write("email,first_name,last_name,code\n")
  for i = 1, 200000 do f:write(('user%d@example.org,First%d,"Last, %d",%d\n'):format(i, i, i, i * 7)) end
  f:close()
end
local csv_rate = median3(function()
  local r <close> = assert(csv.open(path))
  local n = 0
  while r:read() do n = n + 1 end
  assert(n == 200000)
  return n
end)
os.remove(path)

-- the example campaign's two bodies (run from the top of the tree, as make bench does)
local EXAMPLE = "scripts/examples/newsletter/"
local txt, htm = template.file(EXAMPLE .. "body.txt"), template.file(EXAMPLE .. "body.html")
local rows = {}
for i = 1, 100 do rows[i] = { first_name = "Ann & Co " .. i, email = "ann" .. i .. "@example.com" } end
local template_rate = median3(function()
  local n = 50000
  for i = 1, n do
    local row = rows[i % 100 + 1]
    assert(txt:render(row, { row_label = "bench" }))
    assert(htm:render(row, { html = true, row_label = "bench" }))
  end
  return n
end)

local blob = {}
for i = 1, 100000 do blob[i] = string.char((i * 7 + i // 256) % 256) end
blob = table.concat(blob)
local mime_rate = median3(function()
  local n = 3000
  for i = 1, n do
    assert(mime.build { from = "Sender <sender@example.com>", to = "Recipient " .. i .. " <r" .. i .. "@example.org>",
                        subject = "Grüße Nummer " .. i, text = "Hi there\n", html = "<p>Hallo " .. i .. "</p>",
                        attachments = { { data = blob, filename = "report.pdf" } } })
  end
  return n
end)

-- bounce.parse + classify over the corpus of returned messages (DSNs, ARF, auto-replies, guessed bounces)
local bounce = require "mailshot.bounce"
local bounce_raws = {}
do
  local dir = "tests/data/bounces/"
  local p = assert(io.popen("ls " .. dir))
  for name in p:lines() do
    if name:match("%.eml$") then
      local f = assert(io.open(dir .. name, "rb"))
      bounce_raws[#bounce_raws + 1] = f:read("a")
      f:close()
    end
  end
  p:close()
  assert(#bounce_raws > 0, "no corpus in " .. dir)
end
local bounce_rate = median3(function()
  local n = 0
  for _ = 1, 100 do
    for _, raw in ipairs(bounce_raws) do
      assert(bounce.classify(bounce.parse(raw)))
      n = n + 1
    end
  end
  return n
end)

print("Lua-side CPU rates, median of 3:")
print(("  idna.to_ascii                      %10.0f conversions/s"):format(idna_rate))
print(("  csv reader (4 columns)             %10.0f rows/s"):format(csv_rate))
print(("  template render (example bodies)  %10.0f rows/s (text + html)"):format(template_rate))
print(("  mime.build, 100 kB attachment      %10.0f messages/s"):format(mime_rate))
print(("  bounce.parse + classify (corpus)   %10.0f messages/s (%d files of tests/data/bounces)"):format(bounce_rate, #bounce_raws))

-- CSV encodings: what declaring a recipient list's encoding costs.  The same 100,000 rows (a third of
-- the names non-ASCII: Zoë Müller, Ñandú Ibáñez) written as UTF-8 and as windows-1252; rows/s read
-- without an encoding (bytes as they are, the csv.open default), checked as UTF-8 (a campaign's
-- default), and converted from latin-1 / windows-1252; and the whole-file scan a run makes before
-- sending (csv.check_encoding), in MB/s, on a clean file and on one whose last line has a bad byte
-- (the slow path: a second, byte-by-byte pass).
do
local ROWS = 100000
local FIRST = { "Ann", "Zoë", "Ñandú", "Bob", "Groß", "Chloé" }
local LAST = { "Smith", "Müller", "Ibáñez", "Jones", "O'Brien", "Lefèvre" }

-- UTF-8 text to windows-1252 (only the characters used here)
local CP1252 = { ["ë"] = "\xEB", ["ü"] = "\xFC", ["Ñ"] = "\xD1", ["ú"] = "\xFA", ["á"] = "\xE1", ["ñ"] = "\xF1",
                 ["ß"] = "\xDF", ["é"] = "\xE9", ["è"] = "\xE8" }
local function to_cp1252(s) return (s:gsub("[\xC2-\xF4][\x80-\xBF]+", CP1252)) end

local function write(path, conv)
  local f = assert(io.open(path, "wb"))
  f:write("email,first_name,last_name,code\n")
  for i = 1, ROWS do
    f:write(conv(("user%d@example.org,%s,\"%s, %d\",%d\n"):format(i, FIRST[i % 6 + 1], LAST[i % 6 + 1], i, i * 7)))
  end
  f:close()
  local g = assert(io.open(path, "rb"))
  local size = g:seek("end")
  g:close()
  return size
end

local function rows_per_s(path, encoding)
  return median3(function()
    local r <close> = assert(csv.open(path, { encoding = encoding }))
    local n = 0
    while true do
      local row = r:read()
      if row == nil then break end
      assert(row, "a bad row")
      n = n + 1
    end
    assert(n == ROWS)
    return n
  end)
end

local utf8_path, cp_path = os.tmpname(), os.tmpname()
local utf8_size = write(utf8_path, function(s) return s end)
local cp_size = write(cp_path, to_cp1252)
local big_path = os.tmpname()
do -- 10 copies of the UTF-8 rows, then one bad byte at the very end
  local src = assert(io.open(utf8_path, "rb")):read("a")
  local f = assert(io.open(big_path, "wb"))
  f:write(src)
  local body = src:match("^[^\n]*\n(.*)$")
  for _ = 2, 10 do f:write(body) end
  f:close()
end
local big_size = utf8_size * 10

local function scan_mb_s(path, size, encoding, want_ok)
  return median3(function()
    local ok = csv.check_encoding(path, { encoding = encoding })
    assert(ok == want_ok)
    return size / 1e6
  end)
end

local plain = rows_per_s(utf8_path, nil)
print(("CSV encodings, %d rows (UTF-8 file %.1f MB, windows-1252 file %.1f MB), median of 3:"):format(
  ROWS, utf8_size / 1e6, cp_size / 1e6))
print(("  read, no encoding (bytes as is)    %10.0f rows/s"):format(plain))
local u = rows_per_s(utf8_path, "utf-8")
print(("  read, checked as utf-8             %10.0f rows/s (%.0f%% of no encoding)"):format(u, 100 * u / plain))
local l = rows_per_s(cp_path, "latin-1")
print(("  read, converted from latin-1       %10.0f rows/s (%.0f%%)"):format(l, 100 * l / plain))
local w = rows_per_s(cp_path, "windows-1252")
print(("  read, converted from windows-1252  %10.0f rows/s (%.0f%%)"):format(w, 100 * w / plain))
print(("  check_encoding, clean UTF-8 %.0f MB  %10.0f MB/s"):format(big_size / 1e6, scan_mb_s(big_path, big_size, "utf-8", true)))
do
  local f = assert(io.open(big_path, "ab"))
  f:write("last@example.org,Zo\xEB,X,1\n")
  f:close()
end
print(("  check_encoding, bad last line       %10.0f MB/s (two passes)"):format(scan_mb_s(big_path, big_size, "utf-8", false)))
print(("  check_encoding, windows-1252 file   %10.0f MB/s"):format(scan_mb_s(cp_path, cp_size, "windows-1252", true)))
os.remove(utf8_path)
os.remove(cp_path)
os.remove(big_path)
end
