/* l_redis.c - Lua binding of the Redis client (src/redis.c): module "mailshot.redis".
 *
 *   conn, err = redis.connect{ host = "127.0.0.1", port = 6379, tls = false, verify = true,
 *                              ca_file = nil, server_name = nil, timeout = 5, dns = nil }
 *   reply | nil, err, kind = conn:call("SET", "k", "v")
 *   replies | nil, err, "io" = conn:pipeline{ {"SET", "a", 1}, {"GET", "a"} }
 *   conn:settimeout(seconds); conn:close(); conn:closed() -> bool; conn:stats(); redis.null
 *
 * The cosocket model, as in l_smtp.c: a call queues its command on the connection, begins a
 * task_wait and yields; the connection's reply (or its death) wakes exactly that task.  Calls from
 * many tasks on one connection are written together once per turn of the loop and answered in
 * order (auto-pipelining).  The waits are plain C structs owned by their request, so the order in
 * which Lua collects things at exit can never leave a connection pointing at freed memory. */
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>

#include "dns.h"
#include "l_check.h"
#include "net.h"
#include "redis.h"
#include "task.h"
#include "tls.h"

#define CONN_MT "mailshot.redis.conn"
#define NESTING_MAX 64

/* redis.null: what a nil bulk string or nil array becomes (nil would end a Lua array there, and a
 * table could not tell "absent" from "empty"); a light userdata, the same value everywhere. */
static const char null_sentinel = 0;
#define REDIS_NULL ((void *)&null_sentinel)

typedef struct lconn {
  redis_conn *c;            /* NULL once closed */
  int timeout_ms;           /* per call */
  task_wait opener;         /* the task in connect() */
  int self_ref;             /* the userdata, anchored while connect() waits (LUA_NOREF otherwise) */
  lua_State *L;             /* the main state, for the anchor */
  char name[280];           /* HOST:PORT, kept for messages after close */
} lconn;

typedef struct call {
  redis_req q;
  task_wait wait;
  int pipeline;             /* replies come back as one array, errors as { err = ... } */
} call;

/* ---------------- replies to Lua ---------------- */

static void push_reply(lua_State *L, const redisReply *r, int depth) {
  if (!lua_checkstack(L, 4) || depth > NESTING_MAX) luaL_error(L, "redis: reply nested too deeply");
  switch (r->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS:
    lua_pushlstring(L, r->str, r->len);
    break;
  case REDIS_REPLY_INTEGER:
    lua_pushinteger(L, (lua_Integer)r->integer);
    break;
  case REDIS_REPLY_ERROR:           /* inside an array (or a pipeline): the caller sees it in place */
    lua_createtable(L, 0, 1);
    lua_pushlstring(L, r->str, r->len);
    lua_setfield(L, -2, "err");
    break;
  case REDIS_REPLY_ARRAY:
    lua_createtable(L, r->elements > 1u << 24 ? 1 << 24 : (int)r->elements, 0);
    for (size_t i = 0; i < r->elements; i++) {
      push_reply(L, r->element[i], depth + 1);
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    break;
  default:                          /* REDIS_REPLY_NIL */
    lua_pushlightuserdata(L, REDIS_NULL);
    break;
  }
}

static void on_call_done(redis_req *q, int status, redisReply **replies, int n, const char *err) {
  call *k = q->ud;
  if (status == REDIS_DONE_CANCEL) { task_wait_cancel(&k->wait); free(k); return; }
  lua_State *co = task_wait_target(&k->wait);
  int nres = 0;
  if (co && lua_checkstack(co, 8)) {
    if (status == REDIS_DONE_FAIL) {
      lua_pushnil(co);
      lua_pushstring(co, err);
      lua_pushliteral(co, "io");
      nres = 3;
    } else if (k->pipeline) {
      lua_createtable(co, n, 0);
      for (int i = 0; i < n; i++) { push_reply(co, replies[i], 0); lua_rawseti(co, -2, i + 1); }
      nres = 1;
    } else if (replies[0]->type == REDIS_REPLY_ERROR) {
      lua_pushnil(co);
      lua_pushlstring(co, replies[0]->str, replies[0]->len);
      lua_pushliteral(co, "reply");
      nres = 3;
    } else {
      push_reply(co, replies[0], 0);
      nres = 1;
    }
  }
  task_wait_done(&k->wait, nres);
  free(k);
}

/* ---------------- commands from Lua ---------------- */

/* An integer's decimal digits into num (at least 21 bytes); its length.  snprintf's format
 * parsing cost more than the rest of an argument's encoding: scripts take thousands of line
 * numbers per call. */
static size_t int_text(lua_Integer v, char *num) {
  char tmp[24];
  size_t n = 0;
  lua_Unsigned u = v < 0 ? (lua_Unsigned)0 - (lua_Unsigned)v : (lua_Unsigned)v;
  do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u);
  size_t len = 0;
  if (v < 0) num[len++] = '-';
  while (n) num[len++] = tmp[--n];
  num[len] = '\0';
  return len;
}

/* Arguments as (pointer, length): strings as they are (binary-safe), integers in decimal, floats
 * as %.17g (every double read back exactly), into nums; anything else is a programmer's mistake,
 * named as argument i of `what` (a pipeline entry when entry > 0). */
static void arg_at(lua_State *L, int idx, const char *what, int entry, int i, const char **p, size_t *len,
                   char *num) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING:
    *p = lua_tolstring(L, idx, len);
    return;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) *len = int_text(lua_tointeger(L, idx), num);
    else *len = (size_t)snprintf(num, 32, "%.17g", (double)lua_tonumber(L, idx));
    *p = num;
    return;
  default:
    if (entry > 0)
      luaL_error(L, "redis: %s %d argument %d must be a string or a number (got %s)", what, entry, i,
                 luaL_typename(L, idx));
    luaL_error(L, "redis: %s argument %d must be a string or a number (got %s)", what, i, luaL_typename(L, idx));
  }
}

/* Scratch space for one command's argument list: pointers, lengths and number texts; a Lua
 * userdata, so an error half-way frees it with the rest. */
typedef struct { const char **argv; size_t *lens; char (*nums)[32]; } argbuf;

static void argbuf_new(lua_State *L, argbuf *a, int n) {
  size_t each = sizeof *a->argv + sizeof *a->lens + sizeof *a->nums;
  if ((size_t)n > ((size_t)1 << 30) / each) luaL_error(L, "redis: too many arguments");
  char *mem = lua_newuserdatauv(L, (size_t)n * each, 0);
  a->argv = (const char **)mem;
  a->lens = (size_t *)(mem + (size_t)n * sizeof *a->argv);
  a->nums = (char (*)[32])(mem + (size_t)n * (sizeof *a->argv + sizeof *a->lens));
}

/* The command at stack[first .. first + n) (n >= 1) appended to out. */
static void encode_stack(lua_State *L, int first, int n, bytebuf *out) {
  argbuf a;
  argbuf_new(L, &a, n);
  for (int i = 0; i < n; i++) arg_at(L, first + i, "command", 0, i + 1, &a.argv[i], &a.lens[i], a.nums[i]);
  if (redis_format(out, n, a.argv, a.lens) < 0) luaL_error(L, "out of memory");
  lua_pop(L, 1);
}

/* The command in the list at idx (pipeline entry number `entry`) appended to out. */
static void encode_list(lua_State *L, int idx, int entry, bytebuf *out) {
  if (lua_type(L, idx) != LUA_TTABLE) luaL_error(L, "redis: pipeline entry %d must be a list {\"CMD\", args...}", entry);
  int n = (int)luaL_len(L, idx);
  if (n < 1) luaL_error(L, "redis: pipeline entry %d is empty (it needs a command name)", entry);
  luaL_checkstack(L, n + 4, "redis: too many arguments");
  argbuf a;
  argbuf_new(L, &a, n);
  int base = lua_gettop(L);
  for (int i = 0; i < n; i++) {
    lua_rawgeti(L, idx, i + 1);   /* stays on the stack: a string stays anchored while encoding */
    arg_at(L, -1, "pipeline entry", entry, i + 1, &a.argv[i], &a.lens[i], a.nums[i]);
  }
  if (redis_format(out, n, a.argv, a.lens) < 0) luaL_error(L, "out of memory");
  lua_settop(L, base - 1);
}

/* ---------------- the connection object ---------------- */

static lconn *check_conn(lua_State *L) { return luaL_checkudata(L, 1, CONN_MT); }

static int push_io_error(lua_State *L, lconn *u) {
  lua_pushnil(L);
  if (u->c) lua_pushstring(L, redis_conn_error(u->c));
  else lua_pushfstring(L, "redis %s: connection closed", u->name);
  lua_pushliteral(L, "io");
  return 3;
}

/* Queue the encoded command(s) in cmd for the running task and yield. */
static int start_call(lua_State *L, lconn *u, bytebuf *cmd, int n, int pipeline) {
  if (!u->c || !redis_conn_ready(u->c)) { bytebuf_free(cmd); return push_io_error(L, u); }
  call *k = calloc(1, sizeof *k);
  if (!k) { bytebuf_free(cmd); return luaL_error(L, "out of memory"); }
  k->pipeline = pipeline;
  k->q.n = n;
  k->q.fn = on_call_done;
  k->q.ud = k;
  k->q.timeout_ms = u->timeout_ms;
  task_wait_begin(L, &k->wait, pipeline ? "redis:pipeline" : "redis:call");
  int r = redis_conn_send(u->c, &k->q, cmd->data, cmd->len);
  bytebuf_free(cmd);
  if (r < 0) {
    task_wait_cancel(&k->wait);
    free(k);
    return r == -1 ? push_io_error(L, u) : luaL_error(L, "out of memory");
  }
  return task_suspend(L);
}

/* conn:call(cmd, args...) -> reply | nil, err, kind */
static int l_call(lua_State *L) {
  lconn *u = check_conn(L);
  int n = lua_gettop(L) - 1;
  luaL_argcheck(L, n >= 1, 2, "a command name is required");
  if (!task_can_wait(L)) return task_suspend(L);   /* raises the "inside a task" error */
  bytebuf cmd = { 0 };
  encode_stack(L, 2, n, &cmd);                      /* raises on a bad argument: cmd is empty then */
  return start_call(L, u, &cmd, 1, 0);
}

/* conn:pipeline{ {cmd, args...}, ... } -> { reply, ... } | nil, err, "io" */
static int l_pipeline(lua_State *L) {
  lconn *u = check_conn(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  int n = (int)luaL_len(L, 2);
  if (n == 0) { lua_newtable(L); return 1; }
  if (!task_can_wait(L)) return task_suspend(L);
  /* the encoded commands live in a Lua-owned buffer until sent: an error half-way leaks nothing */
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (int i = 1; i <= n; i++) {
    bytebuf one = { 0 };
    lua_rawgeti(L, 2, i);
    int top = lua_gettop(L);
    encode_list(L, top, i, &one);   /* raises before anything is appended to `one` */
    lua_pop(L, 1);
    luaL_addlstring(&b, one.data, one.len);
    bytebuf_free(&one);
  }
  luaL_pushresult(&b);
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  bytebuf cmd = { 0 };
  if (bytebuf_append(&cmd, s, len) < 0) return luaL_error(L, "out of memory");
  lua_pop(L, 1);
  return start_call(L, u, &cmd, n, 1);
}

static int l_settimeout(lua_State *L) {
  lconn *u = check_conn(L);
  lua_Number t = luaL_checknumber(L, 2);
  luaL_argcheck(L, t > 0 && t <= 86400, 2, "timeout must be in (0, 86400] seconds");
  u->timeout_ms = (int)(t * 1000) > 0 ? (int)(t * 1000) : 1;
  return 0;
}

/* conn:close(): pending calls get nil, "redis HOST:PORT: closed by the client", "io" */
static int l_close(lua_State *L) {
  lconn *u = check_conn(L);
  if (u->c) {
    redis_conn *c = u->c;
    u->c = NULL;
    redis_conn_close(c, "connection closed by the client");
    redis_conn_free(c);
  }
  return 0;
}

static int l_closed(lua_State *L) {
  lconn *u = check_conn(L);
  lua_pushboolean(L, !u->c || redis_conn_dead(u->c));
  return 1;
}

/* conn:stats() -> { pending =, requests =, commands =, writes = } (all 0 once closed) */
static int l_stats(lua_State *L) {
  lconn *u = check_conn(L);
  redis_stats st = { 0 };
  if (u->c) redis_conn_stats(u->c, &st);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, u->c ? (lua_Integer)redis_conn_pending(u->c) : 0);
  lua_setfield(L, -2, "pending");
  lua_pushinteger(L, (lua_Integer)st.requests);
  lua_setfield(L, -2, "requests");
  lua_pushinteger(L, (lua_Integer)st.commands);
  lua_setfield(L, -2, "commands");
  lua_pushinteger(L, (lua_Integer)st.writes);
  lua_setfield(L, -2, "writes");
  return 1;
}

static int l_gc(lua_State *L) {
  lconn *u = check_conn(L);
  task_wait_cancel(&u->opener);
  if (u->self_ref != LUA_NOREF) { luaL_unref(L, LUA_REGISTRYINDEX, u->self_ref); u->self_ref = LUA_NOREF; }
  redis_conn_free(u->c);      /* pending calls (only at exit: a waiting task holds the conn) are cancelled */
  u->c = NULL;
  return 0;
}

static int l_tostring(lua_State *L) {
  lconn *u = check_conn(L);
  lua_pushfstring(L, "redis connection %s%s", u->name, !u->c ? " (closed)" : redis_conn_dead(u->c) ? " (dead)" : "");
  return 1;
}

/* ---------------- connect ---------------- */

static void on_open(void *ud, const char *err) {
  lconn *u = ud;
  lua_State *co = task_wait_target(&u->opener);
  int nres = 0;
  if (co && lua_checkstack(co, 4)) {
    if (err) { lua_pushnil(co); lua_pushstring(co, err); nres = 2; }
    else { lua_rawgeti(co, LUA_REGISTRYINDEX, u->self_ref); nres = 1; }
  }
  luaL_unref(u->L, LUA_REGISTRYINDEX, u->self_ref);
  u->self_ref = LUA_NOREF;
  task_wait_done(&u->opener, nres);
}

static const char *opt_str(lua_State *L, const char *k) {
  int ty = lua_getfield(L, 1, k);
  if (ty != LUA_TNIL && ty != LUA_TSTRING) luaL_error(L, "redis.connect: option '%s' must be a string", k);
  if (l_has_nul(L, -1)) luaL_error(L, "redis.connect: option '%s' must not contain a NUL byte", k);
  const char *v = lua_tostring(L, -1);
  lua_pop(L, 1);
  return v;   /* anchored in the options table */
}

static int opt_bool(lua_State *L, const char *k, int def) {
  int ty = lua_getfield(L, 1, k);
  if (ty != LUA_TNIL && ty != LUA_TBOOLEAN) luaL_error(L, "redis.connect: option '%s' must be a boolean", k);
  int v = ty == LUA_TNIL ? def : lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

static void opt_copy(lua_State *L, const char *k, const char *v, char *buf, size_t size) {
  if (strlen(v) >= size) luaL_error(L, "redis.connect: option '%s' is too long", k);
  memcpy(buf, v, strlen(v) + 1);
}

static void check_known_options(lua_State *L) {
  static const char *const known[] = { "host", "port", "tls", "verify", "ca_file", "server_name", "timeout",
                                       "dns", NULL };
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    lua_pop(L, 1);
    const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    int i = 0;
    while (k && known[i] && strcmp(k, known[i]) != 0) i++;
    if (!k || !known[i])
      luaL_error(L, "redis.connect: unknown option '%s' (host, port, tls, verify, ca_file, server_name, timeout, dns)",
                 k ? k : luaL_typename(L, -1));
  }
}

/* redis.connect(opts) -> conn | nil, err   (from a task: it yields until connected) */
static int l_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  check_known_options(L);
  redis_config cfg;
  memset(&cfg, 0, sizeof cfg);
  const char *host = opt_str(L, "host");
  opt_copy(L, "host", host ? host : "127.0.0.1", cfg.host, sizeof cfg.host);
  if (!cfg.host[0]) return luaL_error(L, "redis.connect: option 'host' is empty");
  int pty = lua_getfield(L, 1, "port");
  lua_Integer port = pty == LUA_TNIL ? 6379 : lua_tointeger(L, -1);
  if ((pty != LUA_TNIL && !lua_isinteger(L, -1) && !(pty == LUA_TSTRING && lua_isnumber(L, -1)))
      || port < 1 || port > 65535)
    return luaL_error(L, "redis.connect: option 'port' must be a port number (1-65535)");
  lua_pop(L, 1);
  snprintf(cfg.port, sizeof cfg.port, "%d", (int)port);
  int tls = opt_bool(L, "tls", 0);
  cfg.verify = opt_bool(L, "verify", 1);
  const char *ca_file = opt_str(L, "ca_file");
  const char *server_name = opt_str(L, "server_name");
  if (server_name) opt_copy(L, "server_name", server_name, cfg.server_name, sizeof cfg.server_name);
  const char *dns = opt_str(L, "dns");
  int tty = lua_getfield(L, 1, "timeout");
  lua_Number timeout = tty == LUA_TNIL ? 5 : lua_tonumber(L, -1);
  if ((tty != LUA_TNIL && tty != LUA_TNUMBER) || !(timeout > 0 && timeout <= 86400))
    return luaL_error(L, "redis.connect: option 'timeout' must be in (0, 86400] seconds");
  lua_pop(L, 1);
  if (!task_can_wait(L)) return task_suspend(L);   /* raises the "inside a task" error */

  lconn *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  u->self_ref = LUA_NOREF;
  luaL_setmetatable(L, CONN_MT);
  u->timeout_ms = (int)(timeout * 1000) > 0 ? (int)(timeout * 1000) : 1;
  snprintf(u->name, sizeof u->name, strchr(cfg.host, ':') ? "[%s]:%s" : "%s:%s", cfg.host, cfg.port);
  char err[300];
  if (tls && !(cfg.ssl_ctx = tls_client_ctx(cfg.verify, ca_file, err, sizeof err))) {
    lua_pushnil(L);
    lua_pushfstring(L, "redis %s: %s", u->name, err);
    return 2;
  }
  cfg.connect_timeout_ms = u->timeout_ms;
  struct sockaddr_storage ss;
  socklen_t sl;
  if (net_numeric_addr(cfg.host, cfg.port, &ss, &sl) != 0) {
    /* a name: resolved on the loop, /etc/hosts then DNS, as the relays' names are */
    cfg.resolver = dns_resolver_new_ex(task_loop(L), dns, 3000, 2, 1, err, sizeof err);
    if (!cfg.resolver) {
      if (cfg.ssl_ctx) SSL_CTX_free(cfg.ssl_ctx);
      lua_pushnil(L);
      lua_pushfstring(L, "redis %s: %s", u->name, err);
      return 2;
    }
  }
  u->c = redis_conn_new(task_loop(L), &cfg);     /* owns ssl_ctx and resolver from here on */
  if (!u->c) return luaL_error(L, "out of memory");
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);   /* outlives this task's thread */
  u->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  lua_pushvalue(L, -1);
  u->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  task_wait_begin(L, &u->opener, "redis:connect");   /* before open: it may finish at once */
  redis_conn_open(u->c, on_open, u);
  return task_suspend(L);
}

int luaopen_mailshot_redis(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "call", l_call }, { "pipeline", l_pipeline }, { "settimeout", l_settimeout },
    { "close", l_close }, { "closed", l_closed }, { "stats", l_stats }, { NULL, NULL }
  };
  static const luaL_Reg meta[] = {
    { "__gc", l_gc }, { "__close", l_close }, { "__tostring", l_tostring }, { NULL, NULL }
  };
  static const luaL_Reg funcs[] = { { "connect", l_connect }, { NULL, NULL } };
  luaL_newmetatable(L, CONN_MT);
  luaL_setfuncs(L, meta, 0);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  lua_pushlightuserdata(L, REDIS_NULL);
  lua_setfield(L, -2, "null");
  return 1;
}
