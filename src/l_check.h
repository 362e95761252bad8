/* l_check.h - checks shared by the Lua bindings for text that crosses into C.
 *
 * A Lua string may hold NUL bytes; the C side takes most text as NUL-terminated, and would
 * silently cut "a@b.test\0evil" to "a@b.test" (another address, host, header or file than the
 * one given).  Such text is refused where it crosses, never truncated. */
#ifndef MAILSHOT_L_CHECK_H
#define MAILSHOT_L_CHECK_H
#include <lauxlib.h>
#include <lua.h>
#include <string.h>

/* Does the string at idx hold a NUL byte?  (0 for a value that is not a string.) */
static inline int l_has_nul(lua_State *L, int idx) {
  size_t len;
  const char *s = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &len) : NULL;
  return s && memchr(s, '\0', len) != NULL;
}

/* Argument arg as a C string: a string (or a number) without a NUL byte, else an argument error. */
static inline const char *l_checkcstring(lua_State *L, int arg) {
  size_t len;
  const char *s = luaL_checklstring(L, arg, &len);
  if (memchr(s, '\0', len)) luaL_argerror(L, arg, "must not contain a NUL byte");
  return s;
}

#endif
