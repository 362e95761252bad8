/* embedded.h - the Lua library carried inside a binary: build/lua_embed.c (made by embed_gen from
 * lua/) holds the modules, compiled (bytecode with debug information); embedded_preload() puts a
 * package.preload loader in place for each.
 *
 * Only the programs that link build/lua_embed.c include this: src/main.c and the Lua fuzz
 * harnesses (tests/fuzz/fuzz_lua.h).  The functions are static so that the library objects
 * (and the C unit tests that link them) never need the generated table. */
#ifndef MAILSHOT_EMBEDDED_H
#define MAILSHOT_EMBEDDED_H

#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>

extern const struct { const char *name, *path; const char *src; size_t len; } mailshot_lua_modules[];

/* package.preload loader for an embedded module; upvalue = its index in mailshot_lua_modules.
 * The chunk is named "@lua/mailshot/x.lua", as it would be when loaded from the source tree (the
 * name is in the bytecode; "b": nothing else is taken here). */
static int embedded_load(lua_State *L) {
  int i = (int)lua_tointeger(L, lua_upvalueindex(1));
  char chunkname[300];
  snprintf(chunkname, sizeof chunkname, "@%s", mailshot_lua_modules[i].path);
  if (luaL_loadbufferx(L, mailshot_lua_modules[i].src, mailshot_lua_modules[i].len, chunkname, "b") != LUA_OK)
    return lua_error(L);
  lua_pushstring(L, mailshot_lua_modules[i].name);
  lua_call(L, 1, 1);
  return 1;
}

static void embedded_preload(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (int i = 0; mailshot_lua_modules[i].name; i++) {
    lua_pushinteger(L, i);
    lua_pushcclosure(L, embedded_load, 1);
    lua_setfield(L, -2, mailshot_lua_modules[i].name);
  }
  lua_pop(L, 1);
}

#endif
