-- Benchmark for mime.build: microseconds of CPU per message for the
-- message shapes a campaign sends.  Not a test (nothing is asserted).
--   MAILSHOT_LUA_PATH=lua ./mailshot exec tests/lua/bench_mime.lua [MIME_FILE]
-- MIME_FILE: another copy of mime.lua to measure instead (A/B comparisons).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path

local mime = arg and arg[1] and dofile(arg[1]) or require "mailshot.mime"
local clock = os.clock

-- ASCII prose in lines of ~70 characters, LF line endings: text and html
-- of ~1.5 KB each.
local function prose(bytes, word)
  local t, n, line = {}, 0, 0
  while n < bytes do
    local w = word(#t)
    t[#t + 1] = w
    n, line = n + #w + 1, line + #w + 1
    if line > 68 then t[#t + 1] = "\n"; line = 0 else t[#t + 1] = " " end
  end
  return table.concat(t)
end
local WORDS = { "Hello", "campaign", "newsletter", "spring", "offers", "your", "account",
                "update", "the", "and", "please", "read", "more", "about", "our", "news" }
local text = prose(1500, function(i) return WORDS[i % #WORDS + 1] end)
local html = "<html><body><p>" .. prose(1320, function(i) return WORDS[(i * 7) % #WORDS + 1] end)
             :gsub("\n", "</p>\n<p>") .. "</p></body></html>\n"
local UWORDS = { "Grüße", "aus", "Köln", "schöne", "Angebote", "für", "Sie", "Zoë", "日本語", "und" }
local utext = prose(1500, function(i) return UWORDS[i % #UWORDS + 1] end)
local blob = {}
for i = 1, 100000 do blob[i] = string.char((i * 7 + i // 256) % 256) end
blob = table.concat(blob)
local blob_path = os.tmpname()            -- the same bytes in a file: read for every message
local f = assert(io.open(blob_path, "wb"))
f:write(blob)
f:close()

-- 1000 recipients, cycled: the sender is the same on every message, the
-- bodies start with the recipient's name (a template's output: a new
-- string for every message, as in a campaign).
local rcpt = {}
for i = 1, 1000 do rcpt[i] = "Recipient " .. i .. " <r" .. i .. "@example.org>" end

local function message(i, extra)
  local who = "Recipient " .. i % #rcpt + 1
  local m = { from = "Sender Name <sender@example.com>", to = rcpt[i % #rcpt + 1],
              subject = "Our spring newsletter" }
  for k, v in pairs(extra) do m[k] = v end
  m.text = "Dear " .. who .. ",\n\n" .. (m.text or text)
  if m.html then m.html = "<p>Dear " .. who .. ",</p>\n" .. m.html end
  return m
end

local CASES = {
  { "text only, 1.5 KB ASCII", {} },
  { "text + html, ASCII", { html = html } },
  { "non-ASCII text (QP)", { text = utext, subject = "Grüße aus Köln" } },
  { "text + 100 KB attachment", { attachments = { { data = blob, filename = "report.pdf" } } } },
  { "text + 100 KB file attached", { attachments = { { path = blob_path, filename = "report.pdf" } } } },
}

-- us_per_build(extra) -> median over 3 rounds of ~0.3 s CPU each.  Each
-- message is made just before its build, as a campaign does (thousands
-- made in advance would not be in the CPU cache); the time to make them
-- is measured alone and taken off.
local function us_per_build(extra)
  local build = mime.build
  local function run(n, with_build)
    local t0 = clock()
    for i = 1, n do
      local m = message(i, extra)
      if with_build then build(m) end
    end
    return clock() - t0
  end
  for i = 1, 200 do assert(build(message(i, extra))) end        -- warm up
  local n = 200
  n = math.max(200, math.floor(n * 0.3 / math.max(run(n, true), 1e-6)))
  local rounds = {}
  for r = 1, 3 do
    collectgarbage()
    local made = run(n, false)
    collectgarbage()
    rounds[r] = (run(n, true) - made) / n * 1e6
  end
  table.sort(rounds)
  return rounds[2]
end

print(string.format("mime.build (%s), CPU us per message, median of 3:",
                    arg and arg[1] or "mailshot.mime"))
for _, c in ipairs(CASES) do
  print(string.format("  %-28s %8.1f", c[1], us_per_build(c[2])))
end
os.remove(blob_path)
