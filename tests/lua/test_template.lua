-- Tests for mailshot.template.
--   cd /work/main && lua5.4 tests/lua/test_template.lua
--   ./mailshot exec tests/lua/test_template.lua
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local check = dofile(here .. "check.lua")
local case, eq, checkerr, contains = check.case, check.eq, check.checkerr, check.contains
local no_new_globals = check.globals_snapshot()

local template = require "mailshot.template"

-- render_ok(src, row, opts) -> rendered string; asserts success.
local function render_ok(src, row, opts, name)
  local t = template.new(src, name or "t")
  local s, err = t:render(row, opts)
  if not s then error("render failed: " .. tostring(err), 2) end
  return s
end

-- missing(src, row, opts) -> the error message of a render that must fail.
local function missing(src, row, opts, name)
  local t = template.new(src, name or "t")
  local s, err = t:render(row, opts)
  if s ~= nil then error("expected nil, got " .. string.format("%q", s), 2) end
  assert(type(err) == "string", "second result is the message")
  return err
end

---------------------------------------------------------------- values

case("{{field}} and {{ field }} insert the row's value", function()
  eq(render_ok("Hi {{name}}, {{ name }}!", { name = "Ann" }), "Hi Ann, Ann!")
end)

case("field names may have dots, dashes and underscores", function()
  eq(render_ok("{{a.b}} {{first-name}} {{_x_1}}", { ["a.b"] = 1, ["first-name"] = "F", _x_1 = "u" }),
     "1 F u")
end)

case("text without tags renders unchanged", function()
  eq(render_ok("plain } text { with braces }}", {}), "plain } text { with braces }}")
  eq(render_ok("", {}), "")
end)

case("numbers and booleans are tostring'ed", function()
  eq(render_ok("{{n}} {{f}} {{b}}", { n = 42, f = 1.5, b = true }), "42 1.5 true")
end)

case("a value containing template syntax renders literally", function()
  local row = { v = "{{x}} {{#if y}}z{{/if}} {{{w}}}", x = "X", y = "Y", w = "W" }
  eq(render_ok("[{{v}}]", row), "[{{x}} {{#if y}}z{{/if}} {{{w}}}]")
  eq(render_ok("[{{{v}}}]", row, { html = true }), "[{{x}} {{#if y}}z{{/if}} {{{w}}}]")
  eq(render_ok("[{{upper(v)}}]", row), "[{{X}} {{#IF Y}}Z{{/IF}} {{{W}}}]")
end)

case("a value with % and pattern characters is copied as is", function()
  eq(render_ok("{{v}}", { v = "100% %1 $1 \\" }), "100% %1 $1 \\")
end)

case("rows may be proxies with __index (no rawget)", function()
  local row = setmetatable({}, { __index = function(_, k) return "<" .. k .. ">" end })
  eq(render_ok("{{a}}{{b}}", row), "<a><b>")
end)

case("{{ \"literal\" }} inserts a string, the way to write {{ in output", function()
  eq(render_ok('{{ "{{" }}x{{ "}}" }} {{ 7 }}', {}), "{{x}} 7")
end)

---------------------------------------------------------------- missing values

case("a missing field is an error naming template, field and row", function()
  local t = template.new("Dear {{first_name}},", "body.txt")
  local s, err = t:render({}, { row_label = "recipients.csv line 12" })
  eq(s, nil)
  eq(err, 'template body.txt: field "first_name" is missing in recipients.csv line 12'
          .. ' (use {{ first_name | "default" }} to give a default)')
end)

case("an empty string counts as missing", function()
  local err = missing("{{ a }}", { a = "" }, { row_label = "row 3" })
  contains(err, 'field "a" is missing in row 3')
end)

case("a missing field without row_label still names template and field", function()
  local err = missing("{{a}}", {}, nil, "subj")
  contains(err, 'template subj: field "a" is missing')
end)

case("the first missing field of several is reported", function()
  contains(missing("{{a}} {{b}}", { a = "x" }), 'field "b"')
end)

case("a default is used for a missing or empty field", function()
  eq(render_ok('Hi {{ name | "Friend" }}', {}), "Hi Friend")
  eq(render_ok("Hi {{ name | 'Friend' }}", { name = "" }), "Hi Friend")
  eq(render_ok('Hi {{ name | "Friend" }}', { name = "Ann" }), "Hi Ann")
  eq(render_ok('Hi {{name|"Friend"}}', {}), "Hi Friend")
end)

case('an empty default "" makes a field optional', function()
  eq(render_ok('[{{ middle | "" }}]', {}), "[]")
end)

case("a default may contain }} and the other quote", function()
  eq(render_ok([[{{ a | "}} it's" }}]], {}), "}} it's")
  eq(render_ok([[{{ a | '"q"' }}]], {}), '"q"')
end)

---------------------------------------------------------------- HTML

case("html = true escapes & < > \" ' in values", function()
  eq(render_ok("<p>{{v}}</p>", { v = [[<a href="x">&'</a>]] }, { html = true }),
     "<p>&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;</p>")
end)

case("without html values are not escaped", function()
  eq(render_ok("{{v}}", { v = "<b>&" }), "<b>&")
end)

case("{{{ field }}} inserts raw even in html", function()
  eq(render_ok("{{{ v }}}|{{{v}}}", { v = "<b>" }, { html = true }), "<b>|<b>")
end)

case("defaults and literals are escaped in html too", function()
  eq(render_ok('{{ a | "<Friend>" }} {{ "&" }}', {}, { html = true }), "&lt;Friend&gt; &amp;")
end)

case("function results are escaped in html", function()
  eq(render_ok("{{ upper(v) }}", { v = "<b>" }, { html = true }), "&lt;B&gt;")
  eq(render_ok("{{{ upper(v) }}}", { v = "<b>" }, { html = true }), "<B>")
end)

case("the template's html option is the render default", function()
  local t = template.new("{{v}}", { name = "h", html = true })
  eq(t:render({ v = "<" }), "&lt;")
  eq(t:render({ v = "<" }, { html = false }), "<")
end)

case("template text itself is never escaped", function()
  eq(render_ok("<p>&amp; {{v}}</p>", { v = "x" }, { html = true }), "<p>&amp; x</p>")
end)

---------------------------------------------------------------- sections

case("{{#if}} renders its body when the field is present and non-empty", function()
  local src = "{{#if vip}}VIP{{/if}}."
  eq(render_ok(src, { vip = "yes" }), "VIP.")
  eq(render_ok(src, { vip = "" }), ".")
  eq(render_ok(src, {}), ".")
  eq(render_ok(src, { vip = false }), ".")
  eq(render_ok(src, { vip = 0 }), "VIP.")
end)

case("{{#if}} {{else}} {{/if}} chooses a branch", function()
  local src = "{{#if vip}}dear {{name}}{{else}}hello{{/if}}"
  eq(render_ok(src, { vip = "y", name = "Ann" }), "dear Ann")
  eq(render_ok(src, {}), "hello")
end)

case("{{#unless}} renders when the field is missing, with optional else", function()
  eq(render_ok("{{#unless a}}none{{/unless}}", {}), "none")
  eq(render_ok("{{#unless a}}none{{/unless}}", { a = "x" }), "")
  eq(render_ok("{{#unless a}}none{{else}}{{a}}{{/unless}}", { a = "x" }), "x")
end)

case("sections nest", function()
  local src = "{{#if a}}A{{#if b}}B{{else}}b{{#unless c}}!c{{/unless}}{{/if}}{{/if}}"
  eq(render_ok(src, { a = 1, b = 1 }), "AB")
  eq(render_ok(src, { a = 1 }), "Ab!c")
  eq(render_ok(src, { a = 1, c = 1 }), "Ab")
  eq(render_ok(src, {}), "")
end)

case("a missing field in a condition is not an error; in a skipped branch neither", function()
  eq(render_ok("{{#if x}}{{x}} {{y}}{{/if}}ok", {}), "ok")
end)

case("a section tag alone on its line takes the line with it", function()
  local src = "Hi\n{{#if vip}}\n  VIP line\n  {{else}}  \nnormal\n{{/if}}\nBye\n"
  eq(render_ok(src, { vip = 1 }), "Hi\n  VIP line\nBye\n")
  eq(render_ok(src, {}), "Hi\nnormal\nBye\n")
end)

case("standalone lines work with CRLF and at the end of the template", function()
  eq(render_ok("a\r\n{{#if x}}\r\nX\r\n{{/if}}\r\nb", { x = 1 }), "a\r\nX\r\nb")
  eq(render_ok("a\n{{#if x}}\nX\n{{/if}}", { x = 1 }), "a\nX\n")
end)

case("section tags sharing a line with text keep the line", function()
  eq(render_ok("a {{#if x}}X{{/if}} b\n", { x = 1 }), "a X b\n")
  eq(render_ok("{{v}}{{#if x}}\nX\n{{/if}}", { x = 1, v = "v" }), "v\nX\n")
end)

---------------------------------------------------------------- functions

case("built-in upper, lower, trim, capitalize, title", function()
  local row = { s = "  hello wORLD  ", n = "jOHN o'neil-smith élodie" }
  eq(render_ok("{{upper(s)}}|{{lower(s)}}|{{trim(s)}}", row),
     "  HELLO WORLD  |  hello world  |hello wORLD")
  eq(render_ok("{{capitalize(trim(s))}}", row), "Hello wORLD")
  eq(render_ok("{{ title(n) }}", row), "John O'Neil-Smith élodie")
end)

case("built-in truncate counts UTF-8 characters, optional suffix", function()
  local row = { s = "Grüße aus Köln" }
  eq(render_ok("{{ truncate(s, 4) }}", row), "Grüß")
  eq(render_ok('{{ truncate(s, 5, "...") }}', row), "Grüße...")
  eq(render_ok('{{ truncate(s, 50, "...") }}', row), "Grüße aus Köln")
  eq(render_ok("{{ truncate(s, '3') }}", row), "Grü")
  eq(render_ok("{{ truncate(s, 0) }}", row), "")
  eq(render_ok("[{{ truncate(bad, 2) }}]", { bad = "\128\129abc" }), "[\128\129ab]")
end)

case("built-in date formats the current time with os.date", function()
  eq(render_ok('{{ date("%Y") }}', {}), os.date("%Y"))
  eq(render_ok("{{ date() }}", {}), os.date("%Y-%m-%d"))
end)

case("functions take fields, literals in both quotes, numbers and calls", function()
  local t = template.new("{{ j(a, \"x\", 'y', 3, upper(b)) }}", {
    name = "f", helpers = { j = function(...) return table.concat({ ... }, ",") end } })
  eq(t:render({ a = "A", b = "b" }), "A,x,y,3,B")
end)

case("a default after a call covers a missing argument", function()
  eq(render_ok('{{ upper(first_name) | "Friend" }}', {}), "Friend")
  eq(render_ok('{{ upper(first_name) | "Friend" }}', { first_name = "ann" }), "ANN")
end)

case("a default after a call covers a nil or empty result", function()
  local h = { none = function() return nil end, empty = function() return "" end }
  local t = template.new('{{ none(a) | "d1" }} {{ empty(a) | "d2" }}', { name = "x", helpers = h })
  eq(t:render({ a = "v" }), "d1 d2")
end)

case("without a default a nil or empty result renders empty", function()
  local t = template.new("[{{ none(a) }}]", { helpers = { none = function() end } })
  eq(t:render({ a = "v" }), "[]")
end)

case("a missing argument without a default is an error naming the field", function()
  local err = missing("{{ upper(trim(first_name)) }}", {}, { row_label = "r.csv line 2" }, "b.txt")
  contains(err, 'template b.txt: field "first_name" is missing in r.csv line 2')
  contains(err, '{{ upper(trim(first_name)) | "default" }}')
end)

case("helper results that are numbers are tostring'ed", function()
  local t = template.new("{{ len(a) }}", { helpers = { len = function(s) return #s end } })
  eq(t:render({ a = "abc" }), "3")
end)

case("helpers given to new() are callable and override built-ins", function()
  local t = template.new("{{ upper(a) }} {{ twice(a) }}", { name = "h", helpers = {
    upper = function(s) return "U:" .. s end, twice = function(s) return s .. s end } })
  eq(t:render({ a = "x" }), "U:x xx")
end)

case("render helpers override template helpers and built-ins", function()
  local t = template.new("{{ upper(a) }} {{ h(a) }}", { helpers = { h = function() return "tpl" end } })
  eq(t:render({ a = "x" }, { helpers = { h = function() return "render" end } }), "X render")
  eq(t:render({ a = "x" }, { helpers = { upper = function() return "up" end } }), "up tpl")
  eq(t:render({ a = "x" }), "X tpl")
end)

case("an unknown function is a compile error naming template, function and line", function()
  checkerr({ "template body.txt line 2", 'unknown function "shout"' },
           template.new, "x\n{{ shout(a) }}", "body.txt")
  checkerr('unknown function "inner"', template.new, "{{ upper(inner(a)) }}", "b")
end)

case("a helper that is not a function is an error", function()
  checkerr('helpers."x" is not a function', template.new, "", { helpers = { x = 1 } })
end)

case("errors raised by a helper propagate", function()
  local t = template.new("{{ boom(a) }}", { helpers = { boom = function() error("kaboom") end } })
  checkerr("kaboom", t.render, t, { a = 1 })
end)

---------------------------------------------------------------- syntax errors

case("syntax errors name the template and the line", function()
  local cases = {
    { "a\nb {{ name", "line 2: unclosed {{" },
    { "\n\n{{{ raw }}", "line 3: unclosed {{{" },
    { "{{#if a}}\nx\n", "line 1: {{#if}} is never closed" },
    { "x\n{{/if}}", "line 2: {{/if}} without an open section" },
    { "{{#if a}}\n{{/unless}}", "line 2: {{/unless}} closes {{#if}} from line 1" },
    { "\n{{else}}", "line 2: {{else}} outside" },
    { "{{#if a}}{{else}}{{else}}{{/if}}", "line 1: second {{else}}" },
    { "{{#each a}}{{/each}}", "line 1: unknown section" },
    { "{{#if}}{{/if}}", "needs one field name" },
    { "{{#if a b}}{{/if}}", "needs one field name" },
    { "{{ a b }}", "line 1: unexpected 'b'" },
    { "{{ }}", "missing expression" },
    { "{{ a | b }}", "default after '|' must be a quoted string" },
    { "{{ 'abc }}", "unclosed {{" },
    { "{{ upper(a }}", "expected ',' or ')'" },
    { "{{ a + b }}", "unexpected '+'" },
    { "{{{#if a}}}", "{{{ cannot open a section" },
  }
  for _, c in ipairs(cases) do
    checkerr({ "template bad.txt ", c[2] }, template.new, c[1], "bad.txt")
  end
end)

case("a syntax error after many lines reports the right line", function()
  checkerr("template long line 101: unclosed {{",
           template.new, string.rep("ok {{a}}\n", 100) .. "{{ oops", "long")
end)

case("wrong argument types are programmer errors", function()
  checkerr("source must be a string", template.new, nil)
  local t = template.new("x")
  checkerr("row must be a table", t.render, t, "row")
  checkerr("options must be a table", t.render, t, {}, "html")
  checkerr("expected a template, a string or a function", template.render, 42, {})
end)

---------------------------------------------------------------- objects & files

case("is_template and tostring", function()
  local t = template.new("x", "greeting")
  assert(template.is_template(t))
  assert(not template.is_template({}))
  assert(not template.is_template("x"))
  eq(tostring(t), "template greeting")
  eq(tostring(template.new("x")), "template (unnamed)")
end)

local function tmpdir()
  local base = os.tmpname()
  os.remove(base)
  assert(os.execute("mkdir -p '" .. base .. "'"))
  return base
end

case("template.file resolves relative paths against opts.base_dir; a script's view (mailshot.for_folder) gives its folder", function()
  local dir = tmpdir()
  local f = assert(io.open(dir .. "/body.txt", "wb"))
  f:write("Hello {{name}}\n")
  f:close()
  assert(template.base_dir == nil, "no module global")
  local ok, t = pcall(template.file, "body.txt", { base_dir = dir })
  assert(ok, t)
  -- a campaign script's view of the module (mailshot run loads scripts with it) knows its folder
  local _, tpl_view = require("mailshot").for_folder(dir)
  eq(tpl_view.file("body.txt"):render({ name = "Bo" }), "Hello Bo\n")
  eq(select(2, pcall(template.file, "body.txt")):match("^template file body.txt: ") ~= nil, true)
  eq(t.name, "body.txt")
  eq(tostring(t), "template body.txt")
  eq(t:render({ name = "Ann" }), "Hello Ann\n")
  local t2 = template.file(dir .. "/body.txt", { name = "custom" })   -- absolute path
  eq(t2.name, "custom")
  local _, err = t:render({}, { row_label = "rows.csv line 9" })
  contains(err, 'template body.txt: field "name" is missing in rows.csv line 9')
  os.remove(dir .. "/body.txt")
  os.remove(dir)
end)

case("template.file on a missing file raises template file <path>: <reason>", function()
  local err = checkerr("template file /nonexistent/mailshot/x.txt: ", template.file, "/nonexistent/mailshot/x.txt")
  contains(err, "No such file")
end)

case("template.file reports syntax errors with the path and line", function()
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write("line1\n{{#if a}}\n")
  f:close()
  checkerr({ "template " .. path .. " line 2", "never closed" }, template.file, path)
  os.remove(path)
end)

---------------------------------------------------------------- template.render

case("template.render accepts a template object", function()
  eq(template.render(template.new("{{a}}"), { a = "x" }), "x")
end)

case("template.render accepts a source string and caches it", function()
  eq(template.render("Hi {{a}}", { a = "x" }), "Hi x")
  eq(template.render("Hi {{a}}", { a = "y" }, { html = true }), "Hi y")
  local s, err = template.render("Hi {{a}}", {}, { row_label = "line 4" })
  eq(s, nil)
  contains(err, 'template "Hi {{a}}": field "a" is missing in line 4')
end)

case("template.render with a string takes render helpers", function()
  local h = { shout = function(s) return s .. "!" end }
  eq(template.render("{{ shout(a) }}", { a = "hey" }, { helpers = h }), "hey!")
  checkerr('unknown function "shout"', template.render, "{{ shout(a) }}", { a = "hey" })
  checkerr('unknown function "nope"', template.render, "{{ nope(a) }}", { a = 1 })
end)

case("template.render accepts a function of the row", function()
  local f = function(row) return "Dear " .. row.name end
  eq(template.render(f, { name = "Ann" }), "Dear Ann")
  local s, err = template.render(function() return nil, "no luck" end, {})
  eq(s, nil); eq(err, "no luck")
end)

case("the string cache stays bounded", function()
  for i = 1, 1000 do eq(template.render("n" .. i .. " {{a}}", { a = i }), "n" .. i .. " " .. i) end
end)

---------------------------------------------------------------- performance & hygiene

case("many renders of one template: each row gets its own text, HTML-escaped", function()
  -- (the render rate is a benchmark: scripts/bench-lua.lua)
  local t = template.new([[
Hello {{ first_name | "Friend" }} {{last_name}},
{{#if vip}}
Thanks for being a VIP, {{ upper(first_name) }}!
{{else}}
Welcome.
{{/if}}
Your code: {{code}} <{{email}}>
]], "perf")
  local rows = {}
  for i = 1, 100 do
    rows[i] = { first_name = (i % 10 == 5) and "" or "Ann" .. i, last_name = "O'Neil & Co", vip = (i % 2 == 0) and "y" or "",
                code = i * 7, email = "ann" .. i .. "@example.com" }
  end
  local n = check.scaled(5000, 500)
  for i = 1, n do
    local row = rows[i % 100 + 1]
    local first = row.first_name ~= "" and row.first_name or "Friend"
    local want = "Hello " .. first .. " O&#39;Neil &amp; Co,\n"
      .. (row.vip ~= "" and "Thanks for being a VIP, " .. first:upper() .. "!\n" or "Welcome.\n")
      .. "Your code: " .. row.code .. " <" .. row.email .. ">\n"
    eq(t:render(row, { html = true, row_label = "perf" }), want)
  end
end)

case("the modules write no globals", no_new_globals)

case("sections nested too deep are a syntax error naming the template and line (fuzz finding)", function()
  local src = ("{{#if name}}"):rep(190) .. "x" .. ("{{/if}}"):rep(190)
  local ok, err = pcall(template.new, src, "deep.txt")
  assert(not ok and tostring(err):find("template deep.txt line 1: sections nested deeper than 100", 1, true), tostring(err))
  local fine = template.new(("{{#if name}}"):rep(100) .. "x" .. ("{{/if}}"):rep(100), "ok.txt")
  assert(fine:render({ name = "n" }) == "x")
end)

case("required_fields: fields without a default, outside a section on themselves, call arguments too", function()
  local t = template.new('{{a}} {{ b | "x" }} {{#if c}}{{c}} {{d}}{{else}}{{e}}{{/if}}'
                         .. '{{#unless f}}{{f2}}{{else}}{{f}}{{/unless}} {{ upper(g) }} {{ lower(h) | "" }} {{a}}', "t")
  local got = t:required_fields()
  eq(table.concat(got, ","), "a,d,e,f2,g")
  eq(#template.new("plain text", "p"):required_fields(), 0)
end)

case("a template without sections renders the same as one with them (one `..` against a buffer)", function()
  local helpers = { n = function() return 5 end, big = function() return 2.5 end }
  -- the value is a string even when the only piece is a helper's number
  eq(template.new("{{ n() }}", { helpers = helpers }):render({}), "5")
  eq(math.type(template.new("{{ n() }}", { helpers = helpers }):render({})), nil)
  eq(template.new("", "empty"):render({}), "")
  local row = { a = "x<y", b = "", c = "3" }
  local flat = template.new("A{{a}}B{{ b | \"dflt\" }}C{{ n() }}{{ big() }}{{{a}}}{{c}}",
                            { helpers = helpers, html = true })
  -- the same pieces through the section path (a section that is always true: c is set)
  local sect = template.new("{{#if c}}A{{a}}B{{ b | \"dflt\" }}C{{ n() }}{{ big() }}{{{a}}}{{c}}{{/if}}",
                            { helpers = helpers, html = true })
  eq(flat:render(row), sect:render(row))
  eq(flat:render(row), "Ax&lt;yBdfltC52.5x<y3")
  local err = select(2, flat:render({ b = "", c = "1" }))
  contains(err, 'field "a" is missing')
  -- many pieces: past the cap, the buffer path is taken and gives the same text
  local src, want = {}, {}
  for i = 1, 100 do src[#src + 1] = "<{{c}}>"; want[#want + 1] = "<3>" end
  eq(template.new(table.concat(src), "many"):render(row), table.concat(want))
end)

case("tpl:renderer gives what tpl:render gives: html, helpers, defaults, a missing field's message with its label", function()
  local t = template.new("Hi {{ shout(name) }} {{ town | \"?\" }} <{{x}}>", { name = "t", helpers = { shout = string.upper } })
  local loud = { shout = function(s) return s .. "!" end }
  local rows = { { name = "ann & bob", x = "<b>" }, { name = "Zoë", town = "Köln", x = 3 }, { name = "x" } }
  for _, opts in ipairs { {}, { html = true }, { helpers = loud }, { html = true, helpers = loud } } do
    local r = t:renderer(opts)
    for i, row in ipairs(rows) do
      local label = setmetatable({}, { __tostring = function() return "list.csv line " .. i end })
      local got, gerr = r(row, label)
      local want, werr = t:render(row, { html = opts.html, helpers = opts.helpers, row_label = "list.csv line " .. i })
      eq(got, want, "text")
      eq(gerr, werr, "message")
    end
  end
  contains(select(2, t:renderer()({ name = "x" })), 'field "x" is missing (use')
  local needs = template.new("{{ up(a) }}", { name = "n", helpers = { up = string.upper } })
  eq(needs:renderer()({ a = "b" }), "B")
  checkerr("renderer: not a template", template.new("x").renderer, {})
  checkerr("options must be a table", needs.renderer, needs, "html")
end)

return check.finish("test_template.lua")
