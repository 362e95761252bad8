/* l_dkim.c - Lua binding of DKIM signing (src/dkim.c): require "mailshot.dkim".
 *
 *   local signer, err = dkim.signer{ domain = "acme.example", selector = "s1", key_file = "k.pem",
 *                                    algorithm = "rsa-sha256" | "ed25519-sha256",  -- checked against the key
 *                                    headers = { "from", "to", ... }, canonicalization = "relaxed/relaxed",
 *                                    expire = 86400, threads = 2 }
 *   signed, err = signer:sign(message [, time])     -- the message with DKIM-Signature: prepended
 *   header, err = signer:header(message [, time])   -- just that field, CRLF-terminated
 *   signer:dns_record()  signer:algorithm()
 *   pem, txt = dkim.keygen{ algorithm = "rsa-sha256", bits = 2048 }
 *   signed, err = dkim.sign(message, options)       -- a signer per distinct options, kept for reuse
 *
 * Signing from a task hands the message to the signer's worker threads (dkim_pool.c) and yields
 * until the loop sees the job done; elsewhere (the main chunk, a C call that cannot yield, or
 * threads = 0) it signs at once on the calling thread.  Either way the result is the same bytes.
 *
 * Following liolib.c: a key file that is missing, unreadable, not a key or of the wrong type is a
 * failure of the world (nil, "path: reason"); an option of the wrong type or value raises.
 * Documented in README.md, "DKIM signing: mailshot.dkim".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lua.h>
#include <lauxlib.h>

#include "dkim.h"
#include "dkim_pool.h"
#include "l_check.h"
#include "l_class.h"
#include "task.h"

#define SIGNER_MT "mailshot.dkim.signer"
#define SIGNER_BUF_KEEP (1024 * 1024) /* a scratch buffer bigger than this is freed after use */
#define MAX_TIME ((lua_Integer)253402300799) /* 9999-12-31T23:59:59Z: t= + x= cannot overflow */
#define MAX_EXPIRE ((lua_Integer)3155760000) /* 100 years */
/* Messages copied into the pool at once, per thread: enough that the workers never run dry
 * between two turns of the loop, few enough that the copies stay small (~10 KB each for a 4 KB
 * message and its signed copy).  More tasks wait in line for a slot, holding only their own
 * string: whatever the concurrency, the pool's memory stays bounded. */
#define SLOTS_PER_THREAD 32

typedef struct sjob sjob;

typedef struct LSigner {
  dkim_key *key; /* NULL when closed */
  dkim_opts o; /* its strings live in store */
  char *store; /* header-name pointers, then domain, selector and the names: one block */
  lua_Integer expire; /* x= is t= plus this, when > 0 */
  bytebuf buf; /* scratch for the result: no allocation per message once grown */
  int threads; /* workers: -1 one per core (the default), 0 none (sign on the loop) */
  dkim_pool *pool; /* started by the first signature made in a task */
  int pool_failed; /* it could not start: sign on the loop */
  int closing;
  size_t slots; /* jobs in the pool at most */
  sjob *waiting, *waiting_tail; /* tasks waiting for a slot, in order */
  sjob *spare; /* finished jobs kept for reuse, with their buffers */
  size_t nspare;
} LSigner;

/* A task's signature on its way through the pool.  Owned by the signer, not by the task: a
 * worker may still write into it after the task is gone (its completion is then dropped). */
struct sjob {
  dkim_job j; /* first: a dkim_job * is an sjob * */
  task_wait w;
  const char *src; /* waiting for a slot: the task's message (a Lua string on its stack) */
  size_t srclen;
};

#define toLSigner(L) ((LSigner *)luaL_checkudata(L, 1, SIGNER_MT))

static LSigner *tosigner(lua_State *L) {
  LSigner *p = toLSigner(L);
  l_checkopen(L, p->key != NULL, "dkim signer");
  return p;
}

static void job_free(sjob *j) {
  bytebuf_free(&j->j.in);
  bytebuf_free(&j->j.out);
  free(j);
}

/* Wakes the task that waits on j, if it still does, with nil, why. */
static void job_fail(sjob *j, const char *why) {
  lua_State *co = task_wait_target(&j->w);
  int n = 0;
  if (co && lua_checkstack(co, 2)) {
    luaL_pushfail(co);
    lua_pushstring(co, why);
    n = 2;
  }
  task_wait_done(&j->w, n);
}

static void close_pool(LSigner *p);

/* Frees what p holds and leaves it closed; safe to call twice. */
static void s_gc_signer(LSigner *p) {
  close_pool(p);
  dkim_key_free(p->key);
  p->key = NULL;
  free(p->store);
  p->store = NULL;
  bytebuf_free(&p->buf);
}

/* ---------------------------------------------------------------- options */

typedef struct sopts {
  const char *domain, *selector, *key_file, *algorithm;
  int has_headers;
  dkim_canon hc, bc;
  lua_Integer expire;
  int threads;
} sopts;

static const char *optstring(lua_State *L, int arg, const char *key) {
  if (lua_type(L, -1) != LUA_TSTRING) luaL_argerror(L, arg, lua_pushfstring(L, "%s must be a string", key));
  if (l_has_nul(L, -1)) /* C would cut it there: another domain, selector or file */
    luaL_argerror(L, arg, lua_pushfstring(L, "%s must not contain a NUL byte", key));
  return lua_tostring(L, -1); /* stays valid: the table at arg holds it */
}

static const char *checkalgorithm(lua_State *L, int arg, const char *s) {
  luaL_argcheck(L, strcmp(s, "rsa-sha256") == 0 || strcmp(s, "ed25519-sha256") == 0, arg,
                lua_pushfstring(L, "unknown algorithm '%s' (rsa-sha256 or ed25519-sha256)", s));
  return s;
}

/* Reads the options table at arg; an unknown key is an error, so that a typo is not ignored. */
static void getoptions(lua_State *L, int arg, sopts *so) {
  memset(so, 0, sizeof *so);
  so->hc = so->bc = DKIM_RELAXED;
  so->threads = -1;
  luaL_checktype(L, arg, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, arg) != 0) {
    const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
    if (strcmp(key, "domain") == 0)
      so->domain = optstring(L, arg, key);
    else if (strcmp(key, "selector") == 0)
      so->selector = optstring(L, arg, key);
    else if (strcmp(key, "key_file") == 0)
      so->key_file = optstring(L, arg, key);
    else if (strcmp(key, "algorithm") == 0)
      so->algorithm = checkalgorithm(L, arg, optstring(L, arg, key));
    else if (strcmp(key, "canonicalization") == 0) {
      const char *c = optstring(L, arg, key);
      luaL_argcheck(L, dkim_parse_canon(c, &so->hc, &so->bc) == 0, arg,
                    lua_pushfstring(L,
                                    "invalid canonicalization '%s' (\"relaxed/relaxed\", "
                                    "\"relaxed/simple\", \"simple/relaxed\" or \"simple/simple\")",
                                    c));
    } else if (strcmp(key, "expire") == 0) {
      luaL_argcheck(L, lua_isinteger(L, -1) && lua_tointeger(L, -1) > 0 && lua_tointeger(L, -1) <= MAX_EXPIRE,
                    arg, "expire must be a positive integer (seconds, at most 100 years)");
      so->expire = lua_tointeger(L, -1);
    } else if (strcmp(key, "threads") == 0) {
      luaL_argcheck(L,
                    lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 0 &&
                        lua_tointeger(L, -1) <= DKIM_POOL_MAX_THREADS,
                    arg,
                    lua_pushfstring(L, "threads must be an integer from 0 (sign on the main thread) to %d",
                                    DKIM_POOL_MAX_THREADS));
      so->threads = (int)lua_tointeger(L, -1);
    } else if (strcmp(key, "headers") == 0) {
      luaL_argcheck(L, lua_type(L, -1) == LUA_TTABLE, arg, "headers must be a list of names");
      so->has_headers = 1;
    } else
      luaL_argerror(L, arg, lua_pushfstring(L, "unknown option '%s'", key));
    lua_pop(L, 1);
  }
  luaL_argcheck(L, so->domain, arg, "domain is required");
  luaL_argcheck(L, so->selector, arg, "selector is required");
  luaL_argcheck(L, so->key_file, arg, "key_file is required");
}

/* Copies domain, selector and the header names into one block owned by p (freed by __gc, so a
 * raise below leaks nothing). */
static void buildstore(lua_State *L, int arg, LSigner *p, const sopts *so) {
  size_t nh = 0, size, dl = strlen(so->domain) + 1, sl = strlen(so->selector) + 1;
  const char **names;
  char *s;
  if (so->has_headers) {
    lua_getfield(L, arg, "headers");
    nh = (size_t)luaL_len(L, -1);
    luaL_argcheck(L, nh < 1000, arg, "too many headers");
  }
  size = (nh + 1) * sizeof(char *) + dl + sl;
  /* raw reads, both times: an __index could give a longer name the second time (an overflow) */
  for (size_t i = 1; i <= nh; i++) {
    if (lua_rawgeti(L, -1, (lua_Integer)i) != LUA_TSTRING)
      luaL_argerror(L, arg, "headers must be a list of names");
    if (l_has_nul(L, -1)) luaL_argerror(L, arg, "headers: a name must not contain a NUL byte");
    size += lua_rawlen(L, -1) + 1;
    lua_pop(L, 1);
  }
  if ((p->store = malloc(size)) == NULL) luaL_error(L, "out of memory");
  names = (const char **)(void *)p->store;
  s = p->store + (nh + 1) * sizeof(char *);
  p->o.domain = memcpy(s, so->domain, dl);
  p->o.selector = memcpy(s + dl, so->selector, sl);
  s += dl + sl;
  for (size_t i = 1; i <= nh; i++) {
    size_t n;
    const char *h;
    lua_rawgeti(L, -1, (lua_Integer)i);
    h = lua_tolstring(L, -1, &n);
    names[i - 1] = memcpy(s, h, n + 1);
    s += n + 1;
    lua_pop(L, 1);
  }
  names[nh] = NULL;
  p->o.headers = so->has_headers ? names : NULL;
  if (so->has_headers) lua_pop(L, 1);
}

/* ---------------------------------------------------------------- module functions */

/* dkim.signer(options) -> signer | nil, "key_file: reason" */
static int dkim_signer(lua_State *L) {
  sopts so;
  LSigner *p;
  char err[512];

  getoptions(L, 1, &so);
  p = (LSigner *)lua_newuserdatauv(L, sizeof(LSigner), 0);
  memset(p, 0, sizeof *p); /* closed until the key is loaded: an error below leaves nothing half-built */
  luaL_setmetatable(L, SIGNER_MT);
  buildstore(L, 1, p, &so);
  p->o.header_canon = so.hc;
  p->o.body_canon = so.bc;
  p->expire = so.expire;
  p->threads = so.threads;
  if (dkim_opts_check(&p->o, err, sizeof err) < 0) luaL_argerror(L, 1, err);
  p->key = dkim_key_load(so.key_file, err, sizeof err);
  if (p->key == NULL) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  if (so.algorithm && strcmp(so.algorithm, dkim_key_algorithm(p->key)) != 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: the key is for %s, but algorithm is %s", so.key_file, dkim_key_algorithm(p->key),
                    so.algorithm);
    dkim_key_free(p->key);
    p->key = NULL;
    return 2;
  }
  return 1;
}

/* dkim.keygen{ algorithm = "rsa-sha256", bits = 2048 } -> private_pem, txt_value | nil, err
 * The new key lives in a closed signer while it is written out, so that a raise (memory) frees it. */
static int dkim_keygen(lua_State *L) {
  const char *alg = "rsa-sha256";
  int bits = 0;
  char err[256];
  LSigner *p;
  size_t pemlen;

  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 1) != 0) {
      const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
      if (strcmp(key, "algorithm") == 0)
        alg = checkalgorithm(L, 1, optstring(L, 1, key));
      else if (strcmp(key, "bits") == 0) {
        luaL_argcheck(L,
                      lua_isinteger(L, -1) && lua_tointeger(L, -1) >= DKIM_RSA_MIN_BITS &&
                          lua_tointeger(L, -1) <= 4096,
                      1, "bits must be an integer from 1024 to 4096");
        bits = (int)lua_tointeger(L, -1);
      } else
        luaL_argerror(L, 1, lua_pushfstring(L, "unknown option '%s'", key));
      lua_pop(L, 1);
    }
  }
  luaL_argcheck(L, bits == 0 || strcmp(alg, "rsa-sha256") == 0, 1, "bits is for rsa-sha256 keys only");
  p = (LSigner *)lua_newuserdatauv(L, sizeof(LSigner), 0);
  memset(p, 0, sizeof *p);
  luaL_setmetatable(L, SIGNER_MT);
  if ((p->key = dkim_key_generate(alg, bits, err, sizeof err)) == NULL) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  if (dkim_key_private_pem(p->key, &p->buf) < 0) return luaL_error(L, "out of memory");
  pemlen = p->buf.len;
  if (dkim_key_public_record(p->key, &p->buf) < 0) return luaL_error(L, "out of memory");
  lua_pushlstring(L, p->buf.data, pemlen);
  lua_pushlstring(L, p->buf.data + pemlen, p->buf.len - pemlen);
  explicit_bzero(p->buf.data, p->buf.len);
  s_gc_signer(p);
  return 2;
}

/* ---------------------------------------------------------------- signing on the workers */

static sjob *job_get(LSigner *p) {
  sjob *j = p->spare;
  if (j) {
    p->spare = (sjob *)j->j.next;
    p->nspare--;
  } else if ((j = calloc(1, sizeof *j)) == NULL) {
    return NULL;
  }
  j->j.next = NULL;
  j->src = NULL;
  return j;
}

static void job_put(LSigner *p, sjob *j) {
  if (p->closing || p->nspare >= p->slots) {
    job_free(j);
    return;
  }
  if (j->j.in.cap > SIGNER_BUF_KEEP) bytebuf_free(&j->j.in);
  if (j->j.out.cap > SIGNER_BUF_KEEP) bytebuf_free(&j->j.out);
  j->j.next = (dkim_job *)p->spare;
  p->spare = j;
  p->nspare++;
}

/* Copies the message into j and gives it to the workers: 0, or -1 (out of memory, or the loop
 * cannot watch the pool). */
static int job_submit(LSigner *p, sjob *j, const char *msg, size_t len) {
  j->j.in.len = 0;
  if (bytebuf_append(&j->j.in, msg, len) < 0) return -1;
  j->src = NULL;
  return dkim_pool_submit(p->pool, &j->j);
}

/* Tasks waiting for a slot get one, first come first served. */
static void refill(LSigner *p) {
  while (p->waiting && dkim_pool_pending(p->pool) < p->slots) {
    sjob *j = p->waiting;
    p->waiting = (sjob *)j->j.next;
    if (p->waiting == NULL) p->waiting_tail = NULL;
    if (task_wait_target(&j->w) == NULL) { /* the task is gone: so is its string */
      task_wait_done(&j->w, 0);
      job_put(p, j);
    } else if (job_submit(p, j, j->src, j->srclen) < 0) {
      job_fail(j, "out of memory");
      job_put(p, j);
    }
  }
}

/* A job back from the pool (on the loop thread): its task gets the result, if it still waits. */
static void job_done(dkim_job *dj, void *data) {
  sjob *j = (sjob *)dj;
  LSigner *p = data;
  lua_State *co = task_wait_target(&j->w);
  if (!dj->signed_)
    job_fail(j, "the dkim signer was closed while the message waited to be signed");
  else if (dj->rc < 0)
    job_fail(j, dj->err);
  else if (co && lua_checkstack(co, 1)) {
    lua_pushlstring(co, dj->out.data, dj->out.len);
    task_wait_done(&j->w, 1);
  } else
    task_wait_done(&j->w, 0);
  job_put(p, j);
  if (!p->closing) refill(p);
}

/* The pool, started on first use: NULL when the signer signs on the loop (threads = 0, or it
 * could not start, which is said once on stderr: the messages are signed all the same). */
static dkim_pool *pool_of(lua_State *L, LSigner *p) {
  char err[256];
  int n;
  if (p->pool || p->pool_failed || p->threads == 0) return p->pool;
  n = p->threads > 0 ? p->threads : dkim_pool_cores();
  if (n > DKIM_POOL_MAX_THREADS) n = DKIM_POOL_MAX_THREADS;
  p->pool = dkim_pool_new(p->key, n, task_loop(L), job_done, p, err, sizeof err);
  if (p->pool == NULL) {
    p->pool_failed = 1;
    fprintf(stderr, "mailshot: dkim: %s; signing on the main thread instead\n", err);
  } else {
    p->slots = (size_t)n * SLOTS_PER_THREAD;
  }
  return p->pool;
}

/* Stops the workers; every task still waiting on this signer gets its result (when signed) or
 * nil, err.  The loop thread only, outside job_done. */
static void close_pool(LSigner *p) {
  p->closing = 1;
  dkim_pool_free(p->pool); /* hands back every job it holds, through job_done */
  p->pool = NULL;
  while (p->waiting) {
    sjob *j = p->waiting;
    p->waiting = (sjob *)j->j.next;
    job_fail(j, "the dkim signer was closed while the message waited to be signed");
    job_free(j);
  }
  p->waiting_tail = NULL;
  while (p->spare) {
    sjob *j = p->spare;
    p->spare = (sjob *)j->j.next;
    job_free(j);
  }
  p->nspare = 0;
}

/* Hands the message to the pool and yields; 0 (nothing pushed) when it must be signed here. */
static int sign_async(lua_State *L, LSigner *p, const dkim_opts *o, const char *msg, size_t len, int whole) {
  dkim_pool *pool = pool_of(L, p);
  sjob *j;
  if (pool == NULL) return 0;
  if ((j = job_get(p)) == NULL) return luaL_error(L, "out of memory");
  j->j.o = *o;
  j->j.whole = whole;
  j->j.data = p;
  if (p->waiting == NULL && dkim_pool_pending(pool) < p->slots) {
    if (job_submit(p, j, msg, len) < 0) { /* sign here: slower, but the message goes out */
      job_put(p, j);
      return 0;
    }
  } else { /* wait in line; the string stays on this task's stack while it waits */
    j->src = msg, j->srclen = len;
    if (p->waiting_tail) p->waiting_tail->j.next = &j->j; else p->waiting = j;
    p->waiting_tail = j;
  }
  task_wait_begin(L, &j->w, "signer:sign"); /* the loop hands the job back only after we yield */
  return task_suspend(L);
}

/* ---------------------------------------------------------------- signing */

/* Pushes the signed message (whole) or the header; nil, err for a message that cannot be signed.
 * In a task that may wait, the workers sign it while the loop goes on. */
static int signwith(lua_State *L, LSigner *p, int msgarg, int timearg, int whole) {
  size_t len;
  const char *msg = luaL_checklstring(L, msgarg, &len);
  lua_Integer now = timearg ? luaL_optinteger(L, timearg, (lua_Integer)time(NULL)) : (lua_Integer)time(NULL);
  dkim_opts o = p->o;
  char err[256];
  int rc;

  luaL_argcheck(L, now > 0 && now <= MAX_TIME, timearg,
                "time must be seconds since the epoch, before year 10000");
  o.timestamp = now;
  o.expire = p->expire > 0 ? now + p->expire : 0;
  if (p->threads != 0 && task_can_wait(L) && (rc = sign_async(L, p, &o, msg, len, whole)) != 0) return rc;
  p->buf.len = 0;
  rc = dkim_sign(p->key, &o, msg, len, &p->buf, err, sizeof err);
  if (rc == 0 && whole && bytebuf_crlf(&p->buf, msg, len, 0) < 0) return luaL_error(L, "out of memory");
  if (rc < 0) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
  } else
    lua_pushlstring(L, p->buf.data, p->buf.len);
  if (p->buf.cap > SIGNER_BUF_KEEP) bytebuf_free(&p->buf);
  return rc < 0 ? 2 : 1;
}

/* dkim.sign(message, options) -> signed | nil, err.  Signers are kept in the upvalue table, keyed
 * by every option, so a key file is read once per distinct set of options (and not again: a key
 * replaced on disk is seen by the next run). */
static int dkim_sign_l(lua_State *L) {
  static const char *const fields[] = {"key_file", "domain", "selector", "algorithm", "canonicalization",
                                       "expire",   "threads", NULL};
  int n = 0;
  luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  /* the cache key: each option's text and a NUL, then the header names */
  lua_getfield(L, 2, "headers"); /* 3 */
  for (int i = 0; fields[i]; i++, n += 2) {
    int t = lua_getfield(L, 2, fields[i]);
    if (t != LUA_TSTRING && t != LUA_TNUMBER) {
      lua_pop(L, 1);
      lua_pushliteral(L, "");
    }
    lua_pushlstring(L, "", 1);
  }
  if (lua_istable(L, 3))
    for (lua_Integer i = 1;; i++, n += 2) {
      luaL_checkstack(L, 2, "too many headers");
      if (lua_geti(L, 3, i) != LUA_TSTRING) {
        lua_pop(L, 1);
        break;
      }
      lua_pushliteral(L, ":");
    }
  lua_concat(L, n);
  lua_replace(L, 3); /* 3: the cache key */
  lua_pushvalue(L, 3);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TUSERDATA) { /* 4 */
    lua_pop(L, 1);
    lua_pushcfunction(L, dkim_signer);
    lua_pushvalue(L, 2);
    lua_call(L, 1, 2);
    if (lua_isnil(L, -2)) return 2; /* nil, err */
    lua_pop(L, 1);
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 4);
    lua_rawset(L, lua_upvalueindex(1));
  }
  return signwith(L, (LSigner *)lua_touserdata(L, 4), 1, 0, 1);
}

/* ---------------------------------------------------------------- signer methods */

/* signer:sign(message [, time]) -> message with DKIM-Signature: prepended | nil, err */
static int s_sign(lua_State *L) { return signwith(L, tosigner(L), 2, 3, 1); }

/* signer:header(message [, time]) -> "DKIM-Signature: ...\r\n" | nil, err */
static int s_header(lua_State *L) { return signwith(L, tosigner(L), 2, 3, 0); }

/* signer:dns_record() -> "v=DKIM1; k=rsa; p=..." */
static int s_dns_record(lua_State *L) {
  LSigner *p = tosigner(L);
  p->buf.len = 0;
  if (dkim_key_public_record(p->key, &p->buf) < 0) return luaL_error(L, "out of memory");
  lua_pushlstring(L, p->buf.data, p->buf.len);
  return 1;
}

static int s_algorithm(lua_State *L) {
  lua_pushstring(L, dkim_key_algorithm(tosigner(L)->key));
  return 1;
}

static int s_gc(lua_State *L) {
  s_gc_signer(toLSigner(L));
  return 0;
}

static int s_tostring(lua_State *L) {
  LSigner *p = toLSigner(L);
  if (p->key == NULL)
    lua_pushliteral(L, "dkim signer (closed)");
  else
    lua_pushfstring(L, "dkim signer (%s._domainkey.%s, %s)", p->o.selector, p->o.domain,
                    dkim_key_algorithm(p->key));
  return 1;
}

static const luaL_Reg dkimlib[] = {{"signer", dkim_signer},
                                   {"keygen", dkim_keygen},
                                   {"sign", NULL}, /* a closure over the signer cache, set in luaopen */
                                   {NULL, NULL}};

static const luaL_Reg methods[] = {{"sign", s_sign},
                                   {"header", s_header},
                                   {"dns_record", s_dns_record},
                                   {"algorithm", s_algorithm},
                                   {NULL, NULL}};

static const luaL_Reg metameth[] = {
    {"__gc", s_gc}, {"__close", s_gc}, {"__tostring", s_tostring}, {NULL, NULL}};

int luaopen_mailshot_dkim(lua_State *L) {
  luaL_newlib(L, dkimlib);
  lua_newtable(L); /* the signer cache of dkim.sign */
  lua_pushcclosure(L, dkim_sign_l, 1);
  lua_setfield(L, -2, "sign");
  l_newclass(L, SIGNER_MT, metameth, methods);
  return 1;
}
