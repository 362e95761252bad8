/* fuzz_bounce.c - libFuzzer target for bounce.parse and bounce.classify (lua/mailshot/bounce.lua) on
 * hostile messages: what a bounce mailbox may hold.
 * make build/fuzz/fuzz_bounce   (clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc
 *   $(pkg-config --cflags lua5.4) tests/fuzz/fuzz_bounce.c build/lua_embed.c -llua5.4 -lm)
 *
 * The input is the raw message.  parse() catches its own errors (so one bad message cannot stop a run
 * over a mailbox) and reports them as kind "unparsed" with b.error "parse error: ..."; here any such
 * error is a finding, as is a raise.  The reading must be consistent:
 *   - kind is one of the six; a dsn or guessed reading has recipients, each with a string address and
 *     a status that is an RFC 3463 code or nil; an arf reading has its feedback table;
 *   - classify() gives one of bounce.CLASSES and a rule name, for the message and for each recipient;
 *   - with max_bytes smaller than the input, truncated is set.
 * The checks are Lua (CHECKER below); fuzz_lua.h runs them and turns a failure into abort(). */
#include "fuzz_lua.h"

static const char CHECKER[] =
  "local bounce = require 'mailshot.bounce'\n"
  "local find, format = string.find, string.format\n"
  "local KINDS = { dsn = true, arf = true, autoreply = true, guessed = true, unparsed = true, other = true }\n"
  "local CLASSES = {}\n"
  "for _, c in ipairs(bounce.CLASSES) do CLASSES[c] = true end\n"
  "local MAX = 16384\n"
  "\n"
  "local function classified(b, r, what)\n"
  "  local class, rule = bounce.classify(b, nil, r)\n"
  "  if not CLASSES[class] then fail(what .. ': class ' .. tostring(class)) end\n"
  "  if type(rule) ~= 'string' then fail(what .. ': rule ' .. tostring(rule)) end\n"
  "end\n"
  "\n"
  "return function(raw)\n"
  "  coverage(true)\n"
  "  local ok, b = pcall(bounce.parse, raw, { max_bytes = MAX })\n"
  "  coverage(false)\n"
  "  if not ok then fail('parse raised: ' .. tostring(b)) end\n"
  "  if type(b) ~= 'table' or not KINDS[b.kind] then fail('kind ' .. tostring(b and b.kind)) end\n"
  "  if b.error ~= nil and type(b.error) ~= 'string' then fail('error not a string') end\n"
  "  if b.error and find(b.error, 'parse error', 1, true) then fail(b.error) end\n"
  "  if b.kind == 'unparsed' and not b.error then fail('unparsed without an error') end\n"
  "  if (b.kind == 'dsn' or b.kind == 'guessed') and #b.recipients == 0 then fail(b.kind .. ' without recipients') end\n"
  "  if b.kind == 'arf' and type(b.feedback) ~= 'table' then fail('arf without feedback') end\n"
  "  if #raw > MAX and b.kind ~= 'unparsed' and not b.truncated then fail('not truncated') end\n"
  "  for i, r in ipairs(b.recipients) do\n"
  "    if type(r.address) ~= 'string' then fail(format('recipient %d: address %s', i, tostring(r.address))) end\n"
  "    if r.status ~= nil and not find(r.status, '^[245]%.%d+%.%d+$') then\n"
  "      fail(format('recipient %d: status %q', i, tostring(r.status)))\n"
  "    end\n"
  "  end\n"
  "  coverage(true)\n"
  "  classified(b, nil, 'message')\n"
  "  for i, r in ipairs(b.recipients) do classified(b, r, 'recipient ' .. i) end\n"
  "  coverage(false)\n"
  "end\n";

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  fuzz_lua_init(CHECKER);
  fuzz_lua_run(data, size);
  return 0;
}
