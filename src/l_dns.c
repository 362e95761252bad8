/* l_dns.c - Lua binding of the c-ares resolver: module "mailshot.resolver".
 *
 *   local resolver = require "mailshot.resolver"
 *   local r = resolver.new{ servers = "127.0.0.1:5353", timeout = 2, tries = 2 }
 *   local records, kind, msg = r:query("example.com", "MX"[, deadline])
 *     records: { {host=, preference=, ttl=}, ... } for MX, { {address=, ttl=}, ... } for A/AAAA,
 *              { {text=, ttl=} } for TXT (only records owned by the name asked, or by its CNAME chain);
 *     or nil, kind, message: kind is a stable word (dns.h's dns_status_name): "nxdomain", "nodata",
 *     "timeout", "servfail", "refused", "connrefused", "unanswered", "formerr", "notimp",
 *     "badname", "error", "cancelled"
 *     deadline (seconds): answer "timeout" once it has passed, whatever c-ares's tries have left
 *
 *   resolver.address_class("127.0.0.1") -> "loopback" (nil for a global unicast address)
 *
 * The caching, IDN conversion and MX ordering rules are in lua/mailshot/dns.lua. */
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <ares.h>
#include <string.h>

#include "dns.h"
#include "l_check.h"
#include "l_class.h"
#include "task.h"

#define RESOLVER_MT "mailshot.resolver"

typedef struct { dns_resolver *r; } lresolver;

/* One query from Lua: results are kept here when the answer comes before the task yields.
 * Owned by the query (freed by on_done) once the task parked. */
typedef struct {
  task_wait wait;      /* the parked task: only this query's answer wakes it */
  int suspended;       /* the task has parked: push and wake */
  int done;
  dns_status st;
  char msg[128];
  dns_rr *rrs;
  int nrr;
} lquery;

static int push_answer(lua_State *L, dns_status st, const char *msg, const dns_rr *rrs, int nrr) {
  if (st != DNS_OK) {
    lua_pushnil(L);
    lua_pushstring(L, dns_status_name(st));
    lua_pushstring(L, msg);
    return 3;
  }
  lua_createtable(L, nrr, 0);
  for (int i = 0; i < nrr; i++) {
    const dns_rr *rr = &rrs[i];
    lua_createtable(L, 0, 3);
    if (rr->type == DNS_T_MX) {
      lua_pushlstring(L, rr->data, rr->len);
      lua_setfield(L, -2, "host");
      lua_pushinteger(L, rr->pref);
      lua_setfield(L, -2, "preference");
    } else {
      lua_pushlstring(L, rr->data, rr->len);
      lua_setfield(L, -2, rr->type == DNS_T_TXT ? "text" : "address");
    }
    lua_pushinteger(L, rr->ttl);
    lua_setfield(L, -2, "ttl");
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static void on_done(void *ud, dns_status st, const char *msg, const dns_rr *rrs, int nrr) {
  lquery *q = ud;
  if (st == DNS_CANCELLED) {
    if (!q->suspended) { q->done = 1; q->st = st; snprintf(q->msg, sizeof q->msg, "the resolver was closed"); return; }
    msg = "the resolver was closed";   /* the parked task gets nil, "cancelled", msg */
    nrr = 0;
  }
  if (q->suspended) {
    lua_State *co = task_wait_target(&q->wait);   /* NULL: nobody to tell (dropped safely) */
    int n = co && lua_checkstack(co, nrr + 8) ? push_answer(co, st, msg, rrs, nrr) : 0;
    task_wait_done(&q->wait, n);
    free(q);
    return;
  }
  /* answered synchronously (a malformed name, say): keep a copy for the caller */
  q->done = 1;
  q->st = st;
  snprintf(q->msg, sizeof q->msg, "%s", msg ? msg : "");
  if (nrr > 0 && (q->rrs = dns_rrs_copy(rrs, nrr)) != NULL) q->nrr = nrr;
}

static lresolver *check_resolver(lua_State *L) {
  lresolver *lr = luaL_checkudata(L, 1, RESOLVER_MT);
  if (!lr->r) luaL_error(L, "attempt to use a closed resolver");
  return lr;
}

/* resolver.new{ servers=, timeout=, tries= } -> resolver | nil, err */
static int l_new(lua_State *L) {
  if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TTABLE);
  const char *servers = NULL;
  lua_Number timeout = 3, tries = 2;
  if (lua_istable(L, 1)) {
    lua_getfield(L, 1, "servers");
    servers = luaL_optstring(L, -1, NULL);
    if (l_has_nul(L, -1)) return luaL_error(L, "option 'servers' must not contain a NUL byte");
    lua_getfield(L, 1, "timeout");
    timeout = luaL_optnumber(L, -1, timeout);
    lua_getfield(L, 1, "tries");
    tries = luaL_optnumber(L, -1, tries);
    lua_pop(L, 2);   /* keep servers' string anchored */
  }
  luaL_argcheck(L, timeout > 0 && timeout <= 60, 1, "timeout must be in (0, 60] seconds");
  luaL_argcheck(L, tries >= 1 && tries <= 10, 1, "tries must be in [1, 10]");
  lresolver *lr = lua_newuserdatauv(L, sizeof *lr, 0);
  lr->r = NULL;
  luaL_setmetatable(L, RESOLVER_MT);
  char err[200];
  lr->r = dns_resolver_new(task_loop(L), servers, (int)(timeout * 1000), (int)tries, err, sizeof err);
  if (!lr->r) { lua_pushnil(L); lua_pushstring(L, err); return 2; }
  return 1;
}

static int type_of(lua_State *L, int idx) {
  static const char *const names[] = { "A", "AAAA", "MX", "TXT", NULL };
  static const int types[] = { DNS_T_A, DNS_T_AAAA, DNS_T_MX, DNS_T_TXT };
  return types[luaL_checkoption(L, idx, NULL, names)];
}

/* resolver:query(name, type[, deadline]) -> records | nil, kind, message */
static int l_query(lua_State *L) {
  lresolver *lr = check_resolver(L);
  size_t len;
  const char *name = luaL_checklstring(L, 2, &len);
  int type = type_of(L, 3);
  lua_Number deadline = luaL_optnumber(L, 4, 0);
  luaL_argcheck(L, deadline >= 0 && deadline <= 3600, 4, "deadline must be in [0, 3600] seconds");
  if (memchr(name, '\0', len)) {   /* C would ask for the name cut at the NUL: another name */
    lua_pushnil(L);
    lua_pushstring(L, dns_status_name(DNS_ERROR));
    lua_pushliteral(L, "invalid name: it contains a NUL byte");
    return 3;
  }
  if (!task_can_wait(L)) return task_suspend(L);   /* raises the "inside a task" error */
  lquery *q = calloc(1, sizeof *q);
  if (!q) return luaL_error(L, "out of memory");
  /* at least 1 ms: 0 would mean no deadline */
  dns_query_timed(lr->r, name, type, deadline > 0 ? (unsigned)(deadline * 1000) + 1 : 0, on_done, q);
  if (q->done) {
    int n = push_answer(L, q->st, q->msg, q->rrs, q->nrr);
    dns_rrs_free(q->rrs, q->nrr);
    free(q);
    return n;
  }
  q->suspended = 1;
  task_wait_begin(L, &q->wait, "resolver:query");   /* no answer can come before we yield */
  return task_suspend(L);
}

static int l_stats(lua_State *L) {
  lresolver *lr = check_resolver(L);
  lua_createtable(L, 0, 1);
  lua_pushinteger(L, (lua_Integer)dns_queries_sent(lr->r));
  lua_setfield(L, -2, "queries");
  return 1;
}

static int l_gc(lua_State *L) {
  lresolver *lr = luaL_checkudata(L, 1, RESOLVER_MT);
  if (lr->r) { dns_resolver_free(lr->r); lr->r = NULL; }
  return 0;
}

/* resolver.address_class(text) -> nil for a global unicast address, else why direct delivery
 * must not connect to it ("loopback", "private (RFC 1918)", ..., "not an IP address") */
static int l_address_class(lua_State *L) {
  const char *why = dns_address_class(luaL_checkstring(L, 1));
  if (why) lua_pushstring(L, why); else lua_pushnil(L);
  return 1;
}

int luaopen_mailshot_resolver(lua_State *L) {
  static const luaL_Reg methods[] = { { "query", l_query }, { "stats", l_stats }, { "close", l_gc }, { NULL, NULL } };
  static const luaL_Reg meta[] = { { "__gc", l_gc }, { "__close", l_gc }, { NULL, NULL } };
  static const luaL_Reg funcs[] = { { "new", l_new }, { "address_class", l_address_class }, { NULL, NULL } };
  static int initialised;
  if (!initialised) {
    int st = ares_library_init(ARES_LIB_INIT_ALL);
    if (st != ARES_SUCCESS) return luaL_error(L, "c-ares: %s", ares_strerror(st));
    initialised = 1;
  }
  l_newclass(L, RESOLVER_MT, meta, methods);
  luaL_newlib(L, funcs);
  return 1;
}
