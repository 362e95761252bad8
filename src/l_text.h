/* l_text.h - module "mailshot.text" (see l_text.c). */
#ifndef MAILSHOT_L_TEXT_H
#define MAILSHOT_L_TEXT_H

#include <lua.h>

int luaopen_mailshot_text(lua_State *L);

#endif
