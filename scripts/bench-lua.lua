-- bench-lua.lua - CPU rates of the Lua-side work done per recipient (make bench runs it):
--   ./mailshot exec scripts/bench-lua.lua
-- idna.to_ascii conversions/s, CSV rows read/s, rows/s rendered into the example campaign's bodies, mime.build messages/s with a
-- 100 kB attachment.
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

print("Lua-side CPU rates, median of 3:")
print(("  idna.to_ascii                      %10.0f conversions/s"):format(idna_rate))
print(("  csv reader (4 columns)             %10.0f rows/s"):format(csv_rate))
print(("  template render (example bodies)  %10.0f rows/s (text + html)"):format(template_rate))
print(("  mime.build, 100 kB attachment      %10.0f messages/s"):format(mime_rate))
