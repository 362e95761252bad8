/* l_class.h - a userdata type for the Lua bindings: its metatable, registered once by name.
 *
 * Every binding's objects (a CSV reader, a DKIM signer, a resolver, a lock...) have a metatable in the
 * registry under a name ("mailshot.csv.reader") that luaL_checkudata tests, with __gc/__close/
 * __tostring, and their methods as __index; this is that one piece of setup. */
#ifndef MAILSHOT_L_CLASS_H
#define MAILSHOT_L_CLASS_H
#include <lauxlib.h>
#include <lua.h>

/* Register metatable `name` (unless it exists) with the metamethods `meta`, and as __index the table of
 * `methods`, or the metatable itself when methods is NULL (methods and metamethods in one list).
 * Leaves the stack as it was. */
static inline void l_newclass(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods) {
  if (luaL_newmetatable(L, name)) {
    luaL_setfuncs(L, meta, 0);
    if (methods) {
      lua_newtable(L);
      luaL_setfuncs(L, methods, 0);
    } else {
      lua_pushvalue(L, -1);
    }
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
}

/* A method's check that its object (a reader, a signer) is still open; a closed one is an error, as
 * with Lua's files: "attempt to use a closed WHAT". */
static inline void l_checkopen(lua_State *L, int open, const char *what) {
  if (!open) luaL_error(L, "attempt to use a closed %s", what);
}

#endif
