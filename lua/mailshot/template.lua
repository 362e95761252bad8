-- mailshot.template: {{field}} templates for subjects and bodies.
--
-- A template is compiled once into a generated Lua function (literal text
-- and field names live in a constants table K, so no source text is ever
-- spliced into code); rendering a row runs that function and concatenates
-- one buffer.  Row values are data: they are looked up and copied, never
-- parsed, so a value containing "{{x}}" renders as those five characters.
--
-- Errors, two tiers (README.md, "Lua API reference", conventions):
--   * template source, helpers, arguments: written by the programmer, so
--     compile problems raise error() with "template NAME line N: ...";
--   * a row without a value the template needs: bad data, so render()
--     returns nil, "template NAME: field "x" is missing in LABEL (...)".

local string, table, type, tostring, tonumber, error, pcall, pairs, ipairs,
      next, setmetatable, getmetatable, load, assert, io, os =
      string, table, type, tostring, tonumber, error, pcall, pairs, ipairs,
      next, setmetatable, getmetatable, load, assert, io, os
local find, sub, match, gsub, format, upper, lower =
      string.find, string.sub, string.match, string.gsub, string.format,
      string.upper, string.lower
local concat = table.concat

local paths = require("mailshot.path")

local M = {}


local FIELD = "[%a_][%w_%.%-]*"          -- CSV headers have dots and dashes
local FIELD_ONLY = "^" .. FIELD .. "$"

---------------------------------------------------------------- escaping

local HTML_ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;",
                   ['"'] = "&quot;", ["'"] = "&#39;" }

-- escape_html(s) -> s with & < > " ' replaced by entities.
local function escape_html(s)
  if not find(s, "[&<>\"']") then return s end   -- common case: no copy
  return (gsub(s, "[&<>\"']", HTML_ESC))
end
M.escape_html = escape_html

---------------------------------------------------------------- built-in functions

local function str(s)
  if type(s) == "string" then return s end
  if s == nil then return "" end
  return tostring(s)
end

-- Word characters for title(): ASCII alphanumerics and any byte of a UTF-8
-- multibyte sequence, so "élodie" is one word (its é is left as it is).
local WORDCH = "%w\128-\255"

local builtins = {
  upper = function(s) return upper(str(s)) end,
  lower = function(s) return lower(str(s)) end,
  trim = function(s) return (match(str(s), "^%s*(.-)%s*$")) end,
  capitalize = function(s)
    return (gsub(str(s), "^(%s*)(%l)", function(sp, c) return sp .. upper(c) end))
  end,
  title = function(s)
    return (gsub(lower(str(s)), "%f[" .. WORDCH .. "]%l", upper))
  end,
  truncate = function(s, n, suffix)
    s = str(s)
    n = tonumber(n)
    if not n or n < 0 then error("truncate: second argument must be a count >= 0", 2) end
    n = n // 1
    -- count characters by their first bytes (not utf8.offset: it raises on
    -- data that starts with a continuation byte)
    local count = 0
    for p in string.gmatch(s, "()[^\128-\191]") do
      count = count + 1
      if count > n then return sub(s, 1, p - 1) .. (suffix and str(suffix) or "") end
    end
    return s
  end,
  date = function(fmt) return os.date(fmt and str(fmt) or "%Y-%m-%d") end,
}
M.builtins = builtins

---------------------------------------------------------------- lexing & parsing

-- A short label for a template given as a plain string (template.render).
local function inline_name(src)
  local s = gsub(sub(src, 1, 40), "%c+", " ")
  if #src > 40 then s = s .. "..." end
  return '"' .. s .. '"'
end

-- Tokens of one tag's inside: names, strings, numbers, ( ) , |
local function tokenize(text, fail)
  local toks, pos = {}, 1
  while true do
    pos = find(text, "%S", pos)
    if not pos then break end
    local c = sub(text, pos, pos)
    local s, e, cap = find(text, "^(" .. FIELD .. ")", pos)
    if s then
      toks[#toks + 1] = { t = "name", v = cap }
    elseif c == '"' or c == "'" then
      e = find(text, c, pos + 1, true)
      if not e then fail("unterminated string in {{ " .. text .. " }}") end
      toks[#toks + 1] = { t = "string", v = sub(text, pos + 1, e - 1) }
    elseif find(text, "^%-?%d", pos) then
      s, e, cap = find(text, "^(%-?%d+%.?%d*)", pos)
      toks[#toks + 1] = { t = "number", v = tonumber(cap) }
    elseif c == "(" or c == ")" or c == "," or c == "|" then
      e = pos
      toks[#toks + 1] = { t = c }
    else
      fail("unexpected '" .. c .. "' in {{ " .. text .. " }}")
    end
    pos = e + 1
  end
  return toks
end

-- Expression: "str" | 'str' | number | field | name(expr, ...)
-- Returns an AST node; `known` tells which function names exist.
local function parse_expr(toks, i, known, fail, text)
  local tok = toks[i]
  if not tok then fail("missing expression in {{ " .. text .. " }}") end
  if tok.t == "string" or tok.t == "number" then
    return { k = "lit", v = tok.v }, i + 1
  elseif tok.t ~= "name" then
    fail("unexpected '" .. tok.t .. "' in {{ " .. text .. " }}")
  end
  local nxt = toks[i + 1]
  if not (nxt and nxt.t == "(") then return { k = "field", v = tok.v }, i + 1 end
  if not known[tok.v] then fail('unknown function "' .. tok.v .. '"') end
  local node = { k = "call", fn = tok.v, args = {} }
  i = i + 2
  if toks[i] and toks[i].t == ")" then return node, i + 1 end
  while true do
    local arg
    arg, i = parse_expr(toks, i, known, fail, text)
    node.args[#node.args + 1] = arg
    local sep = toks[i]
    if sep and sep.t == ")" then return node, i + 1 end
    if not (sep and sep.t == ",") then
      fail("expected ',' or ')' in {{ " .. text .. " }}")
    end
    i = i + 1
  end
end

-- Value tag: expr [ '|' default-string ]
local function parse_value(text, raw, known, fail)
  local toks = tokenize(text, fail)
  local expr, i = parse_expr(toks, 1, known, fail, text)
  local node = { k = "out", expr = expr, raw = raw, text = match(text, "^%s*(.-)%s*$") }
  if toks[i] and toks[i].t == "|" then
    local d = toks[i + 1]
    if not (d and (d.t == "string" or d.t == "number")) then
      fail("default after '|' must be a quoted string in {{ " .. text .. " }}")
    end
    node.default = tostring(d.v)
    i = i + 2
  end
  if toks[i] then fail("unexpected '" .. (toks[i].v or toks[i].t) .. "' in {{ " .. text .. " }}") end
  return node
end

-- Find the end of a tag starting after its opening braces at `pos`,
-- skipping quoted strings (a default may contain "}}").  Returns the
-- position of the closing braces or nil.
local function tag_end(src, pos, close)
  while true do
    local p = find(src, "[\"'}]", pos)
    if not p then return nil end
    local c = sub(src, p, p)
    if c == "}" then
      if sub(src, p, p + #close - 1) == close then return p end
      pos = p + 1
    else
      local q = find(src, c, p + 1, true)
      if not q then return nil end
      pos = q + 1
    end
  end
end

local BLOCK = { ["if"] = true, ["unless"] = true }

-- A section tag alone on its line takes the whole line with it (its
-- indentation and line break), as in Mustache.  Tag at s..after-1: returns
-- how many blanks before it to drop and where the text goes on, or nil.
local function standalone(src, s, after)
  local ls = s
  while ls > 1 and find(sub(src, ls - 1, ls - 1), "[ \t]") do ls = ls - 1 end
  if ls > 1 and sub(src, ls - 1, ls - 1) ~= "\n" then return nil end
  local _, nl = find(src, "^[ \t]*\r?\n", after)
  if nl then return s - ls, nl + 1 end
  if not find(src, "%S", after) then return s - ls, #src + 1 end   -- last line
  return nil
end

local MAX_DEPTH = 100

-- Section tags ({{#if x}}, {{#unless x}}, {{else}}, {{/if}}, {{/unless}})
-- open, switch and close entries of `stack`; stack[1] is the root.
local function section(inner, stack, emit, fail, tagline)
  local c1 = sub(inner, 1, 1)
  local top = stack[#stack]
  if c1 == "#" then
    local kind, arg = match(inner, "^#(%a+)%s+(.-)$")
    if not kind then kind = match(inner, "^#(%a*)") end
    if not BLOCK[kind] then fail("unknown section {{" .. inner .. "}} (use #if or #unless)") end
    if not (arg and find(arg, FIELD_ONLY)) then fail("{{#" .. kind .. "}} needs one field name") end
    -- the compiled template nests one Lua block per section, and Lua's parser stops at 200
    -- nested levels (LUAI_MAXCCALLS): refuse deep nesting with a proper message (found by fuzzing)
    if #stack > MAX_DEPTH then fail(("sections nested deeper than %d"):format(MAX_DEPTH)) end
    local node = { k = "if", field = arg, negate = kind == "unless", yes = {}, no = {} }
    emit(node)
    stack[#stack + 1] = { nodes = node.yes, node = node, kind = kind, line = tagline }
  elseif inner == "else" then
    if not top.node then fail("{{else}} outside {{#if}} or {{#unless}}") end
    if top.in_else then fail("second {{else}} in one section") end
    top.in_else, top.nodes = true, top.node.no
  else                                  -- "/"
    local kind = match(inner, "^/%s*(%a*)$")
    if not top.node then fail("{{" .. inner .. "}} without an open section") end
    if kind ~= top.kind then
      fail("{{" .. inner .. "}} closes {{#" .. top.kind .. "}} from line " .. top.line)
    end
    stack[#stack] = nil
  end
end

-- parse(src, name, known) -> list of nodes:
--   { k="text", v=string }
--   { k="out", expr=..., raw=bool, default=string|nil, text=source }
--   { k="if", field=name, negate=bool, yes={...}, no={...} }
local function parse(src, name, known)
  local line, counted = 1, 1           -- line number of position `counted`
  local tagline
  local function fail(msg)
    error("template " .. name .. " line " .. tagline .. ": " .. msg, 0)
  end
  local root = {}
  local stack = { { nodes = root } }   -- open sections; stack[1] is the root
  local function emit(node) local t = stack[#stack].nodes; t[#t + 1] = node end

  local pos = 1
  while true do
    local s = find(src, "{{", pos, true)
    local text = sub(src, pos, (s or 0) - 1)
    if not s then
      if text ~= "" then emit({ k = "text", v = text }) end
      break
    end
    for _ in string.gmatch(sub(src, counted, s - 1), "\n") do line = line + 1 end
    tagline, counted = line, s
    local raw = sub(src, s + 2, s + 2) == "{"
    local close = raw and "}}}" or "}}"
    local e = tag_end(src, s + #close, close)
    if not e then fail("unclosed " .. (raw and "{{{" or "{{")) end
    local inner = match(sub(src, s + #close, e - 1), "^%s*(.-)%s*$")
    local after = e + #close
    local c1 = sub(inner, 1, 1)
    local is_section = c1 == "#" or c1 == "/" or inner == "else"
    if is_section then
      if raw then fail("{{{ cannot open a section; use {{" .. inner .. "}}") end
      local indent, next_pos = standalone(src, s, after)
      if indent then text, after = sub(text, 1, #text - indent), next_pos end
    end
    if text ~= "" then emit({ k = "text", v = text }) end
    if is_section then
      section(inner, stack, emit, fail, tagline)
    else
      emit(parse_value(inner, raw, known, fail))
    end
    pos = after
  end
  if #stack > 1 then
    local top = stack[#stack]
    tagline = top.line
    fail("{{#" .. top.kind .. "}} is never closed (missing {{/" .. top.kind .. "}})")
  end
  return root
end

---------------------------------------------------------------- code generation

local MISSING_TEST = "v==nil or v==false or v==''"

-- Compile a call/literal expression to a closure f(row, F) -> value, missing
-- where value is a string, or nil with `missing` = the name of the absent
-- field.  (Plain fields are inlined by the code generator instead.)
local function expr_closure(e)
  if e.k == "lit" then
    local v = tostring(e.v)
    return function() return v end
  elseif e.k == "field" then
    local name = e.v
    return function(row)
      local v = row[name]
      if v == nil or v == false or v == "" then return nil, name end
      if type(v) ~= "string" then v = tostring(v) end
      return v
    end
  end
  local fname, args, n = e.fn, {}, #e.args
  for i, a in ipairs(e.args) do args[i] = expr_closure(a) end
  local function result(r)
    if r == nil then return "" end
    if type(r) ~= "string" then return tostring(r) end
    return r
  end
  if n == 1 then                       -- the common case, without a table
    local a1 = args[1]
    return function(row, F)
      local v, m = a1(row, F)
      if v == nil then return nil, m end
      return result(F[fname](v))
    end
  end
  return function(row, F)
    local vals = {}
    for i = 1, n do
      local v, m = args[i](row, F)
      if v == nil then return nil, m end
      vals[i] = v
    end
    return result(F[fname](table.unpack(vals, 1, n)))
  end
end

-- gen(nodes, ctx) appends Lua source lines to ctx.code.  Generated locals:
-- row, html, F (functions), label, b (buffer), n (its length), v, m.
local function gen(nodes, ctx)
  local code = ctx.code
  local function k(value)                -- index of a constant
    local i = ctx.kindex[value]
    if not i then
      i = #ctx.K + 1
      ctx.K[i], ctx.kindex[value] = value, i
    end
    return i
  end
  for _, node in ipairs(nodes) do
    if node.k == "text" then
      if ctx.pieces then ctx.pieces[#ctx.pieces + 1] = format("K[%d]", k(node.v))
      else code[#code + 1] = format("n=n+1 b[n]=K[%d]", k(node.v)) end
    elseif node.k == "if" then
      code[#code + 1] = format("v=row[K[%d]]", k(node.field))
      code[#code + 1] = "if " .. (node.negate and "" or "not (") .. MISSING_TEST
                        .. (node.negate and "" or ")") .. " then"
      gen(node.yes, ctx)
      if #node.no > 0 then
        code[#code + 1] = "else"
        gen(node.no, ctx)
      end
      code[#code + 1] = "end"
    else                                 -- "out"
      ctx.outs[#ctx.outs + 1] = node
      local id, e = #ctx.outs, node.expr
      local on_missing = node.default and format("v=K[%d]", k(node.default))
                         or format("do return nil,MISS(%d,label,m) end", id)
      if e.k == "field" then
        code[#code + 1] = format("v=row[K[%d]] m=K[%d]", k(e.v), k(e.v))
        code[#code + 1] = "if " .. MISSING_TEST .. " then " .. on_missing
                          .. " elseif type(v)~='string' then v=tostring(v) end"
      else
        ctx.X[#ctx.X + 1] = expr_closure(e)
        code[#code + 1] = format("v,m=X[%d](row,F)", #ctx.X)
        -- A missing argument (m set) or an empty result takes the default;
        -- without one, a missing argument is an error, an empty result is ''.
        if node.default then
          code[#code + 1] = "if v==nil or v=='' then " .. on_missing .. " end"
        else
          code[#code + 1] = "if v==nil then " .. on_missing .. " end"
        end
      end
      if not node.raw then code[#code + 1] = "if html then v=E(v) end" end
      if ctx.pieces then
        ctx.pieces[#ctx.pieces + 1] = "p" .. id
        code[#code + 1] = "local p" .. id .. "=v"
      else
        code[#code + 1] = "n=n+1 b[n]=v"
      end
    end
  end
end

local function collect_calls(nodes, used)
  local function walk_expr(e)
    if e.k == "call" then
      used[e.fn] = true
      for _, a in ipairs(e.args) do walk_expr(a) end
    end
  end
  for _, node in ipairs(nodes) do
    if node.k == "out" then walk_expr(node.expr)
    elseif node.k == "if" then collect_calls(node.yes, used); collect_calls(node.no, used) end
  end
  return used
end

-- check_helpers(h, what, level): h is nil or a table of callables; `level`
-- goes to error() so the message points at the user's call.
local function check_helpers(h, what, level)
  if h == nil then return nil end
  if type(h) ~= "table" then error(what .. " must be a table of functions", level) end
  for name, f in pairs(h) do
    if type(name) ~= "string" or not find(name, FIELD_ONLY) then
      error(what .. ": bad function name " .. tostring(name), level)
    end
    local mt = getmetatable(f)
    if type(f) ~= "function" and not (mt and mt.__call) then
      error(what .. '."' .. name .. '" is not a function', level)
    end
  end
  return h
end

local Template = {}
Template.__index = Template
Template.__name = "mailshot.template"

-- compile(source, name, helpers, html, known) -> template object; raises on
-- syntax errors.  `known` (optional) is an extra table of function names
-- accepted at compile time without being stored in the template.
local function compile(source, name, helpers, html, known)
  local names = {}
  for fname in pairs(builtins) do names[fname] = true end
  for fname in pairs(helpers or {}) do names[fname] = true end
  for fname in pairs(known or {}) do names[fname] = true end
  local tree = parse(source, name, names)

  local ctx = { code = {}, K = {}, kindex = {}, X = {}, outs = {} }
  -- A template without sections (nearly all of them) renders as one `..` of its pieces, which
  -- copies each piece once into a string made at its final size; a buffer table and
  -- table.concat grow and copy a buffer several times.  The leading '' makes a one-piece
  -- template's value a string, as table.concat did (a helper may return a number).  Capped so the pieces stay well within a function's 200 locals / 255 registers.
  local flat = #tree <= 60
  for _, node in ipairs(tree) do if node.k == "if" then flat = false end end
  ctx.pieces = flat and {} or nil
  gen(tree, ctx)
  local locals, result = "local b,n,v,m={},0", "concat(b,'',1,n)"
  if flat then locals, result = "local v,m", "''.." .. (#ctx.pieces > 0 and concat(ctx.pieces, "..") or "''") end
  local code = "local K,X,E,MISS,type,tostring,concat=...\n"
            .. "return function(row,html,F,label)\n"
            .. locals .. "\n"
            .. concat(ctx.code, "\n")
            .. "\nreturn " .. result .. "\nend\n"

  local outs = ctx.outs
  local function miss(id, label, field)
    local node = outs[id]
    return "template " .. name .. ': field "' .. tostring(field) .. '" is missing'
           .. (label and " in " .. tostring(label) or "")
           .. " (use {{ " .. node.text .. ' | "default" }} to give a default)'
  end
  local chunk = assert(load(code, "=template " .. name, "t", {}))
  local fn = chunk(ctx.K, ctx.X, escape_html, miss, type, tostring, concat)

  -- Functions this template calls, resolved once: helpers over built-ins.
  local used, fns, complete = collect_calls(tree, {}), {}, true
  for fname in pairs(used) do
    fns[fname] = (helpers and helpers[fname]) or builtins[fname]
    if fns[fname] == nil then complete = false end    -- a render helper's name
  end
  return setmetatable({
    name = name, source = source, helpers = helpers, html = html and true or false,
    _fn = fn, _used = used, _fns = fns, _complete = complete, _tree = tree,
  }, Template)
end

local function creation_opts(arg, default_name, level)
  local opts
  if type(arg) == "string" then opts = { name = arg }
  elseif arg == nil then opts = {}
  elseif type(arg) == "table" then opts = arg
  else error("template options must be a name or a table", level) end
  local name = opts.name or default_name
  if type(name) ~= "string" then error("template name must be a string", level) end
  return name, check_helpers(opts.helpers, "helpers", level + 1), opts.html
end

-- template.new(source, name_or_opts) -> template
-- opts: name (string, for messages; default "(unnamed)"), helpers (table of
-- functions), html (default for render's html option).  Raises on a syntax
-- error or an unknown function.
function M.new(source, opts)
  if type(source) ~= "string" then error("template source must be a string", 2) end
  local name, helpers, html = creation_opts(opts, "(unnamed)", 3)
  local ok, res = pcall(compile, source, name, helpers, html)
  if not ok then error(res, 2) end
  return res
end

-- template.file(path, opts) -> template, loaded from path.  A relative path
-- is resolved against opts.base_dir (nil: the current directory; a campaign
-- script run by `mailshot run` gets its own folder).  The name is the path as
-- given.  Raises "template file <path>: <reason>" when the file
-- can't be read.
function M.file(path, opts)
  if type(path) ~= "string" then error("template path must be a string", 2) end
  local name, helpers, html = creation_opts(opts, path, 3)
  local base = type(opts) == "table" and opts.base_dir or nil
  if base ~= nil and type(base) ~= "string" then error("template base_dir must be a string", 2) end
  local source, err = paths.read(path, base, "template file")
  if not source then error(err, 2) end
  local ok, res = pcall(compile, source, name, helpers, html)
  if not ok then error(res, 2) end
  return res
end

-- Function table for one render: the template's own, or with the render's
-- helpers over it.  The last one built is remembered per template, since a
-- campaign passes the same helpers table for every row.
local function functions_for(tpl, extra)
  if extra == nil or next(tpl._used) == nil then return tpl._fns end
  if tpl._last_extra == extra then return tpl._last_fns end
  check_helpers(extra, "render helpers", 4)   -- <- functions_for <- render <- caller
  local F = {}
  for fname in pairs(tpl._used) do
    F[fname] = extra[fname] or tpl._fns[fname]
    if F[fname] == nil then
      error("template " .. tpl.name .. ': unknown function "' .. fname .. '"', 3)
    end
  end
  tpl._last_extra, tpl._last_fns = extra, F
  return F
end

-- tpl:render(row, opts) -> string | nil, message
-- opts: html (escape values; default the template's html option),
-- row_label (names the row in messages), helpers (functions over the
-- built-ins and template helpers).
function Template.render(tpl, row, opts)
  if getmetatable(tpl) ~= Template then error("render: not a template (use tpl:render)", 2) end
  local rt = type(row)
  if rt ~= "table" and rt ~= "userdata" then error("render: row must be a table, got " .. rt, 2) end
  local html, label, F = tpl.html, nil, tpl._fns
  if opts ~= nil then
    if type(opts) ~= "table" then error("render: options must be a table", 2) end
    if opts.html ~= nil then html = opts.html end
    label = opts.row_label
    F = functions_for(tpl, opts.helpers)
  end
  if F == tpl._fns and not tpl._complete then functions_for(tpl, {}) end  -- raises
  return tpl._fn(row, html, F, label)
end

-- tpl:renderer(opts) -> function(row, label) -> string | nil, message
-- tpl:render(row, { html = opts.html, helpers = opts.helpers, row_label = label }) with the options
-- checked and the functions resolved once, here (a campaign renders each template for every row):
-- raises now what render would raise on every row (an unknown function).  label may be anything
-- tostring() makes the row's name of (only a missing field's message uses it).  row must be a
-- table (or indexable): it is not checked on each call.
function Template.renderer(tpl, opts)
  if getmetatable(tpl) ~= Template then error("renderer: not a template (use tpl:renderer)", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("renderer: options must be a table", 2) end
  local html, F = tpl.html, tpl._fns
  if opts ~= nil then
    if opts.html ~= nil then html = opts.html end
    F = functions_for(tpl, opts.helpers)
  end
  if F == tpl._fns and not tpl._complete then functions_for(tpl, {}) end  -- raises
  local fn = tpl._fn
  return function(row, label) return fn(row, html, F, label) end
end

-- tpl:required_fields() -> list of the row fields a render cannot do without, in order of
-- first use: a field used without a `| "default"` and outside a section on that same field
-- ({{#if f}}...{{/if}}, or the {{else}} of {{#unless f}}).  A section's own field is not
-- required (a missing field only picks a branch).
function Template.required_fields(tpl)
  local list, seen = {}, {}
  local function need(f, guarded)
    if not guarded[f] and not seen[f] then seen[f] = true; list[#list + 1] = f end
  end
  local function walk_expr(e, guarded)
    if e.k == "field" then need(e.v, guarded)
    elseif e.k == "call" then for _, a in ipairs(e.args) do walk_expr(a, guarded) end end
  end
  local function walk(nodes, guarded)
    for _, node in ipairs(nodes) do
      if node.k == "out" then
        if not node.default then walk_expr(node.expr, guarded) end
      elseif node.k == "if" then
        local g = setmetatable({ [node.field] = true }, { __index = guarded })
        walk(node.negate and node.no or node.yes, g)
        walk(node.negate and node.yes or node.no, guarded)
      end
    end
  end
  walk(tpl._tree, {})
  return list
end

function Template.__tostring(tpl) return "template " .. tpl.name end

-- template.is_template(x) -> bool
function M.is_template(x) return getmetatable(x) == Template end

-- Cache of templates given as strings to template.render, by source.
-- Bounded: cleared when it holds CACHE_MAX entries (string keys are never
-- collected from weak tables).
local CACHE_MAX = 256
local cache, cached = {}, 0

-- template.render(t, row, opts) -> string | nil, message
-- t: a template, a source string (compiled once and cached), or a function
-- f(row, opts) -> string | nil, message.
function M.render(t, row, opts)
  if getmetatable(t) == Template then return Template.render(t, row, opts) end
  local tt = type(t)
  if tt == "string" then
    local tpl = cache[t]
    if not tpl then
      -- The render's helpers may be called by the source: accept their
      -- names now; they are looked up again on every render.
      local ok, res = pcall(compile, t, inline_name(t), nil, nil,
                            opts and check_helpers(opts.helpers, "render helpers", 3))
      if not ok then error(res, 2) end
      tpl = res
      if cached >= CACHE_MAX then cache, cached = {}, 0 end
      cache[t], cached = tpl, cached + 1
    end
    return Template.render(tpl, row, opts)
  elseif tt == "function" then
    local s, err = t(row, opts)
    if s == nil then return nil, err or "template function returned nil" end
    if type(s) == "number" then s = tostring(s) end
    if type(s) ~= "string" then error("template function returned a " .. type(s), 2) end
    return s
  end
  error("template.render: expected a template, a string or a function, got " .. tt, 2)
end

return M
