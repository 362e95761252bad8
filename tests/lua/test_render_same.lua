-- The messages a campaign renders, byte for byte, against a digest taken before the per-message
-- CPU work of issue 13 (bound renderers, fewer tables): a change made for speed must not change one
-- byte of what is sent.  The clock and the random generator are fixed, so the Date, Message-ID and
-- MIME boundaries are the same on every run; international names and subjects as make bench has them,
-- text+HTML, encoded-words, a reply-to, cc and header templates, helpers, a section, and rows that
-- fail (a missing field: its message names the row) or are skipped.
--   ./mailshot exec tests/lua/test_render_same.lua
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path

local HERE = (debug and debug.getinfo(1, "S").source:match("^@(.*/)")) or "tests/lua/"
local check = dofile(HERE .. "check.lua")
local case, eq = check.case, check.eq

local template = require "mailshot.template"
local util = require "mailshot.util"

-- mime keeps os.time from when it is loaded, and counts its Message-IDs: each digest loads it
-- afresh (and what holds it) with the clock fixed
local function fresh_campaign_module()
  local real_time = os.time
  os.time = function(t) if t then return real_time(t) end return 1764770000 end
  for _, m in ipairs { "mailshot.mime", "mailshot.classify", "mailshot.campaign" } do package.loaded[m] = nil end
  local campaign = require "mailshot.campaign"
  os.time = real_time
  return campaign
end

local NAMES = { { "John", "Smith" }, { "Иван", "Петров" }, { "José", "García" }, { "Mary", "Johnson" },
                { "محمد", "العلي" }, { "王", "小明" }, { "Peter", "Brown" }, { "Γιώργος", "Παπαδόπουλος" },
                { "Ayşe", "Yılmaz" }, { "Linda", "Davis" }, { "山田", "太郎" }, { "François", "Müller" },
                { "Ann & <Co>", "O'Neil \"Jr\"" }, { "Ольга", "Смирнова" }, { "김", "민준" },
                { "דוד", "כהן" }, { "अमित", "शर्मा" }, { "Nguyễn", "Thị Hương" }, { "สมชาย", "ใจดี" } }
local SUBJECTS = { "Наше предложение № %d", "Notre offre n° %d pour vous", "عرضنا رقم %d", "我们的优惠 %d",
                   "Our offer number %d", "Unser Angebot Nr. %d für Sie, lang genug um gefaltet zu werden, wirklich",
                   "특별 할인 %d" }

local TEXT = "Hello {{first_name}},\n\n" .. ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n"):rep(6)
             .. "{{#if vip}}A gift for you, {{ shout(first_name) }}.\n{{else}}See you soon.\n{{/if}}"
             .. "Best regards,\nThe Acme team\n"
local HTML = "<html><body><p>Hello {{first_name}} {{{last_name}}},</p>\n"
             .. ("<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.</p>\n"):rep(5)
             .. "<p>{{ city | \"nowhere\" }}</p></body></html>\n"

local function new_campaign()
  return fresh_campaign_module().new({
    recipients = "list.csv", from = "Acme News <news@acme.example>",
    reply_to = "{{first_name}} {{last_name}} <reply@acme.example>",
    cc = function(row) return row.cc end,
    subject = "{{subject}}, {{first_name}}", to_name = "{{first_name}} {{last_name}}",
    text = template.new(TEXT, { name = "body.txt", helpers = { shout = string.upper } }),
    html = HTML, headers = { ["X-Campaign"] = "spring {{first_name}}" },
    helpers = { shout = function(s) return (s:upper()) end },
  }, "/nonexistent", "golden")
end

local function rows()
  local list = {}
  for i = 1, 120 do
    local n = NAMES[i % #NAMES + 1]
    list[i] = { email = ("user%d@example.com"):format(i), first_name = n[1], last_name = n[2],
                subject = SUBJECTS[i % #SUBJECTS + 1]:format(i), vip = i % 5 == 0 and "yes" or "",
                city = i % 3 == 0 and "Zürich" or nil, cc = i % 17 == 0 and "Boss <boss@acme.example>" or nil }
  end
  list[30].last_name = nil                        -- to_name and reply_to need it: the row fails
  list[31].email = "not an address"               -- skipped
  list[32].email = "ünï@bücher.example"           -- refused (SMTPUTF8)
  list[33].email = "someone@bücher.example"       -- IDN domain: its A-label
  return list
end

-- Everything a render gives, one record per row, in one digest
local function digest()
  local c = new_campaign()
  math.randomseed(20261203)
  local out = {}
  for i, row in ipairs(rows()) do
    local m, err, kind = c:message(row, i + 1)
    if m then
      out[#out + 1] = table.concat({ "ok", m.data, m.from, m.header_from, table.concat(m.to, ","), m.message_id,
                                     m.email, tostring(m.eightbit), tostring(m.line) }, "\0")
    else
      out[#out + 1] = table.concat({ "no", tostring(err), tostring(kind) }, "\0")
    end
  end
  return util.sha256(table.concat(out, "\1")), out
end

case("120 international rows render to the same bytes as before", function()
  local d, out = digest()
  if os.getenv("SHOW_RENDER") then for _, o in ipairs(out) do io.write(o:gsub("%z", " | "), "\n\n") end end
  eq(d, "c8ec397f5e92a9dd6a8b425b4e18e5516e8b16e6824abd5dd928e4b461f7ff2d", "digest of the rendered messages")
end)

case("rendering the same rows twice gives the same bytes (the fixed clock and seed hold)", function()
  eq(digest(), digest())
end)

return check.finish("test_render_same.lua")
