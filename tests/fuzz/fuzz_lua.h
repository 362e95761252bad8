/* fuzz_lua.h - what the Lua harnesses (fuzz_template.c, fuzz_mime.c) share: a Lua state with the
 * embedded modules in package.preload, Lua line coverage for libFuzzer, and a checker written in Lua.
 *
 * Coverage.  liblua5.4 is Debian's, not built with -fsanitize=fuzzer, and the modules under test are
 * Lua: libFuzzer's own counters would only see this file.  So a line hook maps each (previous line,
 * line) pair run in an embedded module (chunk "@lua/mailshot/...") to a byte of an array in the
 * __libfuzzer_extra_counters section, which libFuzzer reads as more coverage (like AFL's edges).
 * Chunks made at run time (compiled templates, the checker) are left out: their names and lines
 * change with every input and would make every input look new.
 *
 * The hook costs a lua_getinfo() a line, so it is on only where the checker asks: coverage(true)
 * before it calls the module, coverage(false) before it checks the result.
 *
 * By hand, run these targets with -detect_leaks=0 (as `make fuzz-smoke` does): the state lives
 * across inputs, and its garbage and caches make libFuzzer scan the heap for leaks after most inputs
 * (the C code they drive is liblua's, not ours).  tests/fuzz/NAME.dict helps them find the syntax.
 *
 * Checker.  The harness keeps its assertions in Lua (a string in the harness): the chunk returns a
 * function called once per input with the input as a string.  fail(msg) aborts at once, inside any
 * pcall, and so does an error that escapes the checker. */
#ifndef MAILSHOT_FUZZ_LUA_H
#define MAILSHOT_FUZZ_LUA_H

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "embedded.h"
#include "l_text.h"


#define LUA_COV_SIZE (1 << 16)
__attribute__((used, section("__libfuzzer_extra_counters")))
static uint8_t lua_cov[LUA_COV_SIZE];
static uint32_t lua_cov_prev;

static void cov_hook (lua_State *L, lua_Debug *ar)
{
  static const char *last_src;
  static uint32_t last_hash;
  uint32_t loc, i;
  if (!lua_getinfo(L, "S", ar) || ar->source[0] != '@')
    return;
  if (ar->source != last_src) {  /* a module's source string lives as long as the module */
    uint32_t h = 2166136261u;
    for (const char *p = ar->source; *p; p++)
      h = (h ^ (unsigned char)*p) * 16777619u;
    last_src = ar->source, last_hash = h;
  }
  loc = last_hash ^ ((uint32_t)ar->currentline * 2654435761u);
  i = (loc ^ lua_cov_prev) & (LUA_COV_SIZE - 1);
  if (lua_cov[i] < 255)
    lua_cov[i]++;
  lua_cov_prev = loc >> 1;
}

/* fail(msg): a broken invariant.  Aborts, so that libFuzzer saves the input. */
static int fuzz_fail (lua_State *L)
{
  fprintf(stderr, "\n==== fuzz assertion failed: %s\n", luaL_tolstring(L, 1, NULL));
  fflush(stderr);
  abort();
  return 0;
}

/* coverage(on): starts or stops counting lines */
static int fuzz_coverage (lua_State *L)
{
  if (lua_toboolean(L, 1))
    lua_sethook(L, cov_hook, LUA_MASKLINE, 0);
  else
    lua_sethook(L, NULL, 0, 0);
  return 0;
}

static lua_State *fuzz_L;
static int fuzz_check_ref = LUA_NOREF;

/* Creates the state once: standard libraries, embedded modules, fail(), and the checker (chunk
 * `checker` returning a function).  Any error here is a broken harness: abort. */
static void fuzz_lua_init (const char *checker)
{
  lua_State *L;
  if (fuzz_L)
    return;
  L = fuzz_L = luaL_newstate();
  if (!L)
    abort();
  luaL_openlibs(L);
  embedded_preload(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_mailshot_text);   /* the C primitives mime.lua uses */
  lua_setfield(L, -2, "mailshot.text");
  lua_pop(L, 1);
  lua_register(L, "fail", fuzz_fail);
  lua_register(L, "coverage", fuzz_coverage);
  if (luaL_loadbuffer(L, checker, strlen(checker), "=checker") != LUA_OK || lua_pcall(L, 0, 1, 0) != LUA_OK
      || !lua_isfunction(L, -1)) {
    fprintf(stderr, "fuzz harness: checker: %s\n", lua_tostring(L, -1));
    abort();
  }
  fuzz_check_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* Runs the checker on one input.  An error that escapes it is a finding too. */
static void fuzz_lua_run (const uint8_t *data, size_t size)
{
  lua_State *L = fuzz_L;
  lua_cov_prev = 0;
  lua_sethook(L, NULL, 0, 0);  /* off, whatever the last input left */
  lua_rawgeti(L, LUA_REGISTRYINDEX, fuzz_check_ref);
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    fprintf(stderr, "\n==== fuzz: error escaped the checker: %s\n", luaL_tolstring(L, -1, NULL));
    fflush(stderr);
    abort();
  }
  lua_settop(L, 0);
}

#endif
