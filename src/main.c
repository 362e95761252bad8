/* main.c - the mailshot program: a Lua 5.4 state with the C modules, the Lua library carried
 * inside the binary, and one event loop.  The command line itself is handled in Lua
 * (lua/mailshot/cli.lua) so that commands stay as easy to change as campaigns.
 *
 * MAILSHOT_LUA_PATH=DIR (or --lua-path DIR as the first argument) loads the Lua modules from a
 * source tree instead of the embedded copy, for development.  MAILSHOT_MALLOC=libc gives the Lua state
 * the C library's allocator instead of mimalloc (for memory checkers: the tests set it under valgrind). */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#ifdef MAILSHOT_MIMALLOC
#include <mimalloc.h>
#endif

#include "embedded.h"
#include "loop.h"
#include "task.h"

int luaopen_mailshot_smtp(lua_State *L);
int luaopen_mailshot_csv(lua_State *L);
int luaopen_mailshot_resolver(lua_State *L);
int luaopen_mailshot_util(lua_State *L);
int luaopen_mailshot_dkim(lua_State *L);
int luaopen_mailshot_text(lua_State *L);
int luaopen_mailshot_mailfetch(lua_State *L);
int luaopen_mailshot_redis(lua_State *L);

static void preload(lua_State *L, const char *name, lua_CFunction f) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, f);
  lua_setfield(L, -2, name);
  lua_pop(L, 1);
}

static void setup_modules(lua_State *L, const char *lua_path) {
  preload(L, "mailshot.core", luaopen_mailshot_core);
  preload(L, "mailshot.smtp", luaopen_mailshot_smtp);
  preload(L, "mailshot.csv", luaopen_mailshot_csv);
  preload(L, "mailshot.resolver", luaopen_mailshot_resolver);
  preload(L, "mailshot.util", luaopen_mailshot_util);
  preload(L, "mailshot.dkim", luaopen_mailshot_dkim);
  preload(L, "mailshot.text", luaopen_mailshot_text);
  preload(L, "mailshot.mailfetch", luaopen_mailshot_mailfetch);
  preload(L, "mailshot.redis", luaopen_mailshot_redis);
  if (lua_path) {
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", lua_path, lua_path);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
    return;
  }
  embedded_preload(L);
}

/* Reports, journals, logs and outboxes hold addresses and servers' replies, and the process holds
 * relay passwords: every file mailshot creates is 0600 and every folder 0700 (the umask loses its
 * group and other bits), and no core dump is ever written.  prctl(PR_SET_DUMPABLE, 0) would also
 * stop the same user's tools (gdb, /proc/PID/fd) and is left out. */
static void protect_private_data(void) {
  mode_t mask = umask(077);
  umask(mask | 077);
  struct rlimit none = { 0, 0 };
  if (setrlimit(RLIMIT_CORE, &none) != 0) perror("mailshot: setrlimit(RLIMIT_CORE)");
}

/* ---------------------------------------------------------------- the Lua state

 * A campaign makes and drops many small strings and tables for every message, and the allocator was a
 * tenth of the CPU a message costs with glibc's malloc (callgrind, `make bench`'s campaign): mimalloc
 * (Microsoft's, Debian's libmimalloc) takes about half as much.  Only the Lua state uses it; the C
 * code's buffers stay on malloc.  The sanitizer builds (no MAILSHOT_MIMALLOC) keep the C library's, so
 * ASan sees every block. */
static void *alloc_libc(void *ud, void *p, size_t osize, size_t nsize) {
  (void)ud; (void)osize;
  if (nsize == 0) { free(p); return NULL; }
  return realloc(p, nsize);
}

#ifdef MAILSHOT_MIMALLOC
static void *alloc_mimalloc(void *ud, void *p, size_t osize, size_t nsize) {
  (void)ud; (void)osize;
  if (nsize == 0) { mi_free(p); return NULL; }
  return mi_realloc(p, nsize);
}
#endif

/* What luaL_newstate installs, written here because lua_newstate takes the allocator: a panic
 * message, and warn() off until a script says "@on" (lauxlib.c's warnfoff/warnfon). */
static int on_panic(lua_State *L) {
  const char *msg = lua_tostring(L, -1);
  fprintf(stderr, "mailshot: PANIC: unprotected error in call to Lua API (%s)\n", msg ? msg : "?");
  return 0;
}

static void warn_to_stderr(void *ud, const char *msg, int tocont) {
  int *state = ud;   /* 0 off, 1 on, 2 on in the middle of a message */
  if (*state != 2 && !tocont && *msg == '@') {   /* a control message */
    if (strcmp(msg, "@off") == 0) *state = 0;
    else if (strcmp(msg, "@on") == 0) *state = 1;
    return;
  }
  if (*state == 0) return;
  if (*state == 1) fputs("Lua warning: ", stderr);
  fputs(msg, stderr);
  if (tocont) *state = 2;
  else { fputc('\n', stderr); *state = 1; }
}

static lua_State *new_state(void) {
  static int warn_state;
  lua_Alloc f = alloc_libc;
#ifdef MAILSHOT_MIMALLOC
  const char *m = getenv("MAILSHOT_MALLOC");
  if (!m || strcmp(m, "libc") != 0) f = alloc_mimalloc;
#endif
  lua_State *L = lua_newstate(f, NULL);
  if (L) {
    lua_atpanic(L, on_panic);
    lua_setwarnf(L, warn_to_stderr, &warn_state);
  }
  return L;
}

int main(int argc, char **argv) {
  protect_private_data();
  signal(SIGPIPE, SIG_IGN);   /* a peer that hangs up must give EPIPE, not kill the run (OpenSSL writes too) */
  const char *lua_path = getenv("MAILSHOT_LUA_PATH");
  int first = 1;
  if (argc > 2 && strcmp(argv[1], "--lua-path") == 0) { lua_path = argv[2]; first = 3; }
  if (lua_path && !*lua_path) lua_path = NULL;

  loop *lp = loop_new();
  lua_State *L = new_state();
  if (!lp || !L) { fprintf(stderr, "mailshot: out of memory\n"); return 70; }
  sched *s = sched_new(L, lp);
  if (!s) { fprintf(stderr, "mailshot: out of memory\n"); return 70; }
  luaL_openlibs(L);
  /* Generational collection: a campaign makes many short-lived strings and tables per message
   * and keeps few; measured ~10% faster than incremental on the send path. */
  lua_gc(L, LUA_GCGEN, 0, 0);
  setup_modules(L, lua_path);

  /* the main task is a Lua function (not a C one) so that everything under it may yield */
  if (luaL_loadstring(L, "return require('mailshot.cli').main(...)") != LUA_OK) {
    fprintf(stderr, "mailshot: %s\n", lua_tostring(L, -1));
    return 70;
  }
  for (int i = first; i < argc; i++) lua_pushstring(L, argv[i]);
  task_spawn(L, argc - first);
  lua_State *main_task = lua_tothread(L, -1);
  int status = sched_run_main(s, main_task) == 0 ? sched_exit_status(s) : 1;

  lua_close(L);               /* collects relays, readers, timers: they detach from the loop */
  sched_free(s);
  loop_free(lp);
  return status;
}
