/* l_smtp.c - Lua binding of the SMTP client: module "mailshot.smtp", object "mailshot.relay".
 *
 *   relay = smtp.relay{ server = "host:port", tls = "starttls"|"tls"|"none", user=, password=,
 *                       ca_file=, verify=true, helo=, timeout=60, max_connections=8,
 *                       allow_plaintext_auth=false, source=, trace=false,
 *                       dns="IP[:PORT],...", dns_timeout=3 }   (for a server given by name)
 *   result = relay:send{ from = "a@x", to = "b@y" | {...}, data = "RFC 5322 text", gate = g }
 *   info   = relay:check()
 *   relay:close()
 *   g = smtp.gate(); g:open(); g:refuse(why); g:wait() -> true | false, why; g:state()
 *
 * A relay owns a pool of sessions shared by every task: send() takes an idle session, opens a
 * new one while under max_connections, or waits its turn.  The operations (send_op) are plain C
 * structs owned by the relay, so a Lua-side collection order at exit can never leave a session
 * pointing at freed memory.
 *
 * A gate holds a send back until someone else says it may go: a cluster worker's message may
 * only go out once Redis has its in-flight mark (mailshot.cluster), and the mark's round trip
 * overlaps the send's wait for a session instead of coming before it.  A send whose gate is
 * closed waits in the relay's line without taking a session; g:open() lets it take one in its
 * turn, g:refuse(why) ends it unsent.  Nothing of the message goes to a server before the gate
 * opens. */
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dns.h"
#include "net.h"
#include "l_check.h"
#include "smtp.h"
#include "task.h"
#include "tls.h"

#define RELAY_MT "mailshot.relay"

/* smtp.log(path): the SMTP dialogue of every relay made afterwards goes to this file
 * (AUTH data masked), for `mailshot run --log FILE`.  Kept open until exit. */
static FILE *dialogue_log;

#define GATE_MT "mailshot.gate"

enum { GATE_CLOSED, GATE_OPEN, GATE_REFUSED };

/* Shared by its Lua object and the send that waits on it (refs): freed by the last one. */
typedef struct gate {
  int refs, state;
  struct send_op *op;       /* the send held back by it, while it waits in its relay's line */
  task_wait waiter;         /* a task in g:wait() */
  char why[512];            /* refused: why */
} gate;

typedef struct send_op {
  struct send_op *next, *prev;   /* every op of the relay (doubly linked: O(1) unlink) */
  struct send_op *qnext;    /* waiting queue */
  struct relay *relay;
  task_wait wait;           /* the task parked in send() or check(): only this op wakes it */
  smtp_txn *txn;
  smtp_conn *conn;
  gate *gate;               /* held back while it is closed (NULL: none) */
} send_op;

typedef struct relay {
  smtp_config cfg;
  loop *loop;
  smtp_conn **conns;        /* every pooled session, busy or idle */
  int nconns, capconns, max_connections;
  send_op *ops;             /* every operation in progress or waiting */
  send_op *queue_head, *queue_tail;   /* sends waiting for a session (chained by qnext) */
  smtp_conn *extra[64];     /* sessions outside the pool: check() and closing ones */
  int nextra;
  task_wait closer;         /* the task waiting in close() */
  int closing;              /* close() counts the QUITs it waits for */
  int closing_count, closed;
  /* The server refused our login for good (a 535 bad password ...): no session logs in again in
   * this run; every send gets this refusal at once, deferred for --resume. */
  int auth_refused;
  smtp_result auth_refusal;
  char name[272];           /* "host:port" ("[v6]:port") for results, made once: set_relay_name */
} relay;

/* ---------------- pool bookkeeping ---------------- */

static void op_link(relay *r, send_op *op) {
  op->prev = NULL;
  op->next = r->ops;
  if (r->ops) r->ops->prev = op;
  r->ops = op;
}

/* Runs once per finished message: constant time, however many are in flight. */
static void op_unlink(relay *r, send_op *op) {
  if (op->prev) op->prev->next = op->next; else r->ops = op->next;
  if (op->next) op->next->prev = op->prev;
  op->next = op->prev = NULL;
}

static void gate_unref(gate *g) {
  if (g && --g->refs == 0) { task_wait_cancel(&g->waiter); free(g); }
}

static int op_held(const send_op *op) { return op->gate && op->gate->state == GATE_CLOSED; }

static void op_free(send_op *op) {
  task_wait_cancel(&op->wait);   /* a no-op once the task was woken */
  if (op->gate) {
    if (op->gate->op == op) op->gate->op = NULL;
    gate_unref(op->gate);
  }
  smtp_txn_free(op->txn);
  free(op);
}

static void pool_remove(relay *r, smtp_conn *c) {
  for (int i = 0; i < r->nconns; i++)
    if (r->conns[i] == c) { r->conns[i] = r->conns[--r->nconns]; return; }
}

static int pool_add(relay *r, smtp_conn *c) {
  if (r->nconns == r->capconns) {
    int n = r->capconns ? r->capconns * 2 : 8;
    smtp_conn **p = realloc(r->conns, (size_t)n * sizeof *p);
    if (!p) return -1;
    r->conns = p;
    r->capconns = n;
  }
  r->conns[r->nconns++] = c;
  return 0;
}

static void extra_remove(relay *r, smtp_conn *c) {
  for (int i = 0; i < r->nextra; i++)
    if (r->extra[i] == c) { r->extra[i] = r->extra[--r->nextra]; return; }
}

/* ---------------- results to Lua ---------------- */

static void set_str(lua_State *L, const char *k, const char *v) {
  lua_pushstring(L, v ? v : "");
  lua_setfield(L, -2, k);
}
static void set_int(lua_State *L, const char *k, lua_Integer v) { lua_pushinteger(L, v); lua_setfield(L, -2, k); }
static void set_bool(lua_State *L, const char *k, int v) { lua_pushboolean(L, v); lua_setfield(L, -2, k); }

/* The relay a result came from, "host:port" ("[v6]:port"): a run tells its relays apart by it
 * (the progress line, the summary, the relay-down rule of mailshot.health). */
static void set_relay_name(lua_State *L, relay *r) {
  if (!r->name[0])
    snprintf(r->name, sizeof r->name, strchr(r->cfg.host, ':') ? "[%s]:%s" : "%s:%s", r->cfg.host, r->cfg.port);
  set_str(L, "relay", r->name);
}

static void push_result(lua_State *L, const smtp_result *res, const smtp_txn *txn, relay *r) {
  lua_createtable(L, 0, 10);
  set_bool(L, "ok", res->ok);
  set_int(L, "code", res->code);
  if (res->enhanced[0]) set_str(L, "enhanced", res->enhanced);
  set_str(L, "message", res->message);
  set_bool(L, "temporary", !res->ok && res->temporary);
  if (!res->ok) set_str(L, "stage", res->stage ? res->stage : "connect");
  if (!res->ok && smtp_error_name(res->error)) set_str(L, "error", smtp_error_name(res->error));
  set_str(L, "via", "relay");
  set_relay_name(L, r);
  if (res->defer) set_bool(L, "defer", 1);
  if (txn && txn->nrcpt > 1) {
    set_int(L, "accepted", res->accepted);
    lua_createtable(L, txn->nrcpt, 0);
    for (int i = 0; i < txn->nrcpt; i++) {
      const smtp_rcpt *rc = &txn->rcpt[i];
      lua_createtable(L, 0, 5);
      set_str(L, "address", rc->address);
      set_bool(L, "ok", rc->code >= 200 && rc->code < 300);
      set_int(L, "code", rc->code);
      if (rc->enhanced[0]) set_str(L, "enhanced", rc->enhanced);
      set_str(L, "message", rc->text);
      lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "recipients");
  }
}

/* ---------------- a refused login stops the relay ---------------- */

/* A permanent refusal of our credentials (RFC 4954 §6: 535 authentication failed, 534 mechanism too
 * weak, 538 encryption required; RFC 3463 5.7.8): trying again with the same password can only
 * fail again, and a server counts failed logins: after a few hundred it locks the account. A 454
 * (temporary) or our own refusal to log in without TLS (no code: nothing was sent) is not one. */
static int is_auth_refusal(const smtp_result *res) {
  if (res->ok || !res->stage || strcmp(res->stage, "auth") != 0) return 0;
  return res->code == 535 || res->code == 534 || res->code == 538
      || (res->code >= 500 && res->code < 600 && strcmp(res->enhanced, "5.7.8") == 0);
}

/* The first refusal stops the relay's logins: one line on stderr, and the refusal kept for the rest. */
static void relay_refuse_logins(relay *r, const smtp_result *res) {
  if (r->auth_refused) return;
  r->auth_refused = 1;
  r->auth_refusal = *res;
  char words[201];                     /* the server's words on one line (a multi-line reply has '\n') */
  snprintf(words, sizeof words, "%.200s", res->message);
  for (char *p = words; *p; p++) if (*p == '\n') *p = ' ';
  /* on a terminal, clear the live progress line first so this line stands alone */
  fprintf(stderr, "%smailshot: relay %s:%s refused our login (%d%s%s %s): no further logins this run; "
          "fix the credentials, then run again with --resume\n", isatty(2) ? "\r\033[K" : "",
          r->cfg.host, r->cfg.port, res->code, res->enhanced[0] ? " " : "", res->enhanced, words);
}

/* The result of a send the refused login stops: not sent, deferred (`defer`: not retried within the
 * run, left to --resume), with the server's words.  first: the send whose login was refused. */
static void auth_refusal_result(const relay *r, smtp_result *out, int first) {
  smtp_result res = r->auth_refusal;
  res.ok = 0;
  res.error = SMTP_ERR_AUTH;
  res.temporary = smtp_error_temporary(SMTP_ERR_AUTH);
  res.defer = 1;
  snprintf(res.message, sizeof res.message, "not sent: relay %s:%s refused our login%s (%d%s%s %.3000s); no "
           "further login was attempted in this run: fix the credentials, then run again with --resume",
           r->cfg.host, r->cfg.port, first ? "" : " earlier in this run", r->auth_refusal.code,
           r->auth_refusal.enhanced[0] ? " " : "", r->auth_refusal.enhanced, r->auth_refusal.message);
  res.accepted = out->accepted;
  *out = res;
}

static void push_auth_refusal(lua_State *L, relay *r) {
  smtp_result res = { 0 };
  auth_refusal_result(r, &res, 0);
  push_result(L, &res, NULL, r);
}

static void push_words(lua_State *L, const char *s) {
  lua_newtable(L);
  int n = 0;
  while (s && *s) {
    while (*s == ' ') s++;
    const char *e = s;
    while (*e && *e != ' ') e++;
    if (e > s) { lua_pushlstring(L, s, (size_t)(e - s)); lua_rawseti(L, -2, ++n); }
    s = e;
  }
}

static void push_check(lua_State *L, smtp_conn *c, relay *r) {
  const smtp_result *res = smtp_conn_result(c);
  smtp_info in;
  smtp_conn_info(c, &in);
  push_result(L, res, NULL, r);
  set_str(L, "server", r->cfg.host);
  set_str(L, "port", r->cfg.port);
  if (in.peer[0]) set_str(L, "address", in.peer);
  if (in.greeting) set_str(L, "greeting", in.greeting);
  set_bool(L, "esmtp", in.ehlo);
  push_words(L, in.caps->names);
  lua_setfield(L, -2, "capabilities");
  if (in.tls) {
    lua_createtable(L, 0, 4);
    set_str(L, "version", in.tls_version);
    set_str(L, "cipher", in.tls_cipher);
    set_str(L, "subject", in.tls_subject);
    set_bool(L, "verified", in.tls_verified);
    lua_setfield(L, -2, "tls");
  }
  if (r->cfg.user) {
    lua_createtable(L, 0, 4);
    set_str(L, "user", r->cfg.user);
    set_bool(L, "ok", in.authenticated);
    set_bool(L, "tried", in.auth_mech != NULL);   /* AUTH was sent (not refused or never reached) */
    if (in.auth_mech) set_str(L, "mechanism", in.auth_mech);
    lua_setfield(L, -2, "auth");
  }
}

/* ---------------- driving sessions ---------------- */

static void on_send_done(smtp_conn *c, smtp_txn *t, void *ud);
static int start_op(relay *r, send_op *op, smtp_conn *c);

static void quit_done(smtp_conn *c, void *ud) {
  relay *r = ud;
  extra_remove(r, c);
  smtp_conn_free(c);
  /* the last QUIT close() waits for (not one that ended before close() could park) */
  if (r->closing && --r->closing_count == 0 && r->closer.co) {
    r->closing = 0;
    task_wait_done(&r->closer, 0);
  }
}

/* Politely end a session that is outside the pool; abrupt when there is no room to track it. */
static void quit_extra(relay *r, smtp_conn *c) {
  if (smtp_conn_ready(c) && r->nextra < (int)(sizeof r->extra / sizeof r->extra[0])) {
    r->extra[r->nextra++] = c;
    if (r->closing) r->closing_count++;   /* before: quit_done may run before smtp_conn_quit returns */
    if (smtp_conn_quit(c, quit_done, r) == 0) return;
    if (r->closing) r->closing_count--;
    extra_remove(r, c);
  }
  smtp_conn_free(c);
}

static void queue_unlink(relay *r, send_op *op, send_op *prev) {
  if (prev) prev->qnext = op->qnext; else r->queue_head = op->qnext;
  if (r->queue_tail == op) r->queue_tail = prev;
  op->qnext = NULL;
}

/* The first send in line that may start (one whose gate is closed waits, and lets the ones
 * behind it pass); NULL: none. */
static send_op *queue_first(relay *r, send_op **prev_out) {
  send_op *prev = NULL;
  for (send_op *op = r->queue_head; op; prev = op, op = op->qnext)
    if (!op_held(op)) { if (prev_out) *prev_out = prev; return op; }
  return NULL;
}

static send_op *queue_pop(relay *r) {
  send_op *prev = NULL, *op = queue_first(r, &prev);
  if (op) queue_unlink(r, op, prev);
  return op;
}

/* Every send in line, held or not (the login was refused: they all end). */
static send_op *queue_pop_any(relay *r) {
  send_op *op = r->queue_head;
  if (op) queue_unlink(r, op, NULL);
  return op;
}

static void queue_push(relay *r, send_op *op) {
  op->conn = NULL;
  op->qnext = NULL;
  if (r->queue_tail) r->queue_tail->qnext = op; else r->queue_head = op;
  r->queue_tail = op;
}

/* An operation ends: its task (if it still waits on it) gets the result, and the op is freed. */
static void complete_op(relay *r, send_op *op, const smtp_result *res, const smtp_txn *t) {
  lua_State *co = task_wait_target(&op->wait);   /* NULL: nobody to tell (dropped safely) */
  if (co && lua_checkstack(co, 8)) {
    push_result(co, res, t, r);
    task_wait_done(&op->wait, 1);
  } else {
    task_wait_done(&op->wait, 0);   /* cannot happen with a sane stack; the caller sees nil */
  }
  op_unlink(r, op);
  op_free(op);
}

/* A send waiting its turn when the login was refused: it ends now, with no session. */
static void refuse_waiter(relay *r, send_op *op) {
  smtp_result res = { 0 };
  auth_refusal_result(r, &res, 0);
  complete_op(r, op, &res, NULL);
}

/* A session finished a transaction or is gone: give it (or a new one, within
 * max_connections) to the sends waiting their turn. */
static void next_waiter(relay *r, smtp_conn *c) {
  if (c && smtp_conn_dead(c)) { pool_remove(r, c); smtp_conn_free(c); c = NULL; }
  if (r->auth_refused) {             /* no new session, no new login: the waiting sends end here */
    send_op *op;
    while ((op = queue_pop_any(r)) != NULL) refuse_waiter(r, op);
    return;
  }
  while (c && smtp_conn_can_take(c) && queue_first(r, NULL)) start_op(r, queue_pop(r), c);
  while (queue_first(r, NULL) && r->nconns < r->max_connections) {
    smtp_conn *fresh = smtp_conn_new(r->loop, &r->cfg);
    if (!fresh || pool_add(r, fresh) < 0) { smtp_conn_free(fresh); return; }
    start_op(r, queue_pop(r), fresh);
  }
}

static void on_send_done(smtp_conn *c, smtp_txn *t, void *ud) {
  send_op *op = ud;
  relay *r = op->relay;
  complete_op(r, op, &t->res, t);
  next_waiter(r, c);
}

/* Every transaction's end passes here first: a refused login stops the relay's logins. */
static void on_send_result(smtp_conn *c, smtp_txn *t, void *ud) {
  send_op *op = ud;
  if (is_auth_refusal(&t->res)) {
    relay_refuse_logins(op->relay, &t->res);
    auth_refusal_result(op->relay, &t->res, 1);
  }
  on_send_done(c, t, ud);
}

static int start_op(relay *r, send_op *op, smtp_conn *c) {
  op->conn = c;
  if (smtp_conn_send(c, op->txn, on_send_result, op) < 0) {
    /* the session cannot take it after all: back to the head of the line */
    op->qnext = r->queue_head;
    r->queue_head = op;
    if (!r->queue_tail) r->queue_tail = op;
    return -1;
  }
  return 0;
}

/* The session for a new send: an idle one, a new one while under max_connections, then one
 * that can pipeline it behind the message it carries; NULL: wait in line. */
static smtp_conn *pick_session(relay *r) {
  smtp_conn *pipelined = NULL;
  for (int i = 0; i < r->nconns; i++) {
    smtp_conn *c = r->conns[i];
    if (smtp_conn_ready(c)) return c;
    if (!pipelined && smtp_conn_can_take(c)) pipelined = c;
  }
  for (int i = r->nconns - 1; i >= 0; i--)
    if (smtp_conn_dead(r->conns[i])) { smtp_conn *d = r->conns[i]; pool_remove(r, d); smtp_conn_free(d); }
  if (r->nconns < r->max_connections) {
    smtp_conn *c = smtp_conn_new(r->loop, &r->cfg);
    if (c && pool_add(r, c) == 0) return c;
    smtp_conn_free(c);
  }
  return pipelined;
}

/* Start the sends in line that may start, while sessions take them (a gate opened). */
static void dispatch(relay *r) {
  while (queue_first(r, NULL)) {
    smtp_conn *c = pick_session(r);
    if (!c || start_op(r, queue_pop(r), c) < 0) return;
  }
}

static void on_check_done(smtp_conn *c, void *ud) {
  send_op *op = ud;
  relay *r = op->relay;
  lua_State *co = task_wait_target(&op->wait);
  if (co && lua_checkstack(co, 8)) { push_check(co, c, r); task_wait_done(&op->wait, 1); }
  else task_wait_done(&op->wait, 0);
  op_unlink(r, op);
  op_free(op);
  extra_remove(r, c);
  quit_extra(r, c);
}

/* ---------------- Lua methods ---------------- */

static relay *check_relay(lua_State *L) {
  relay *r = luaL_checkudata(L, 1, RELAY_MT);
  if (r->closed) luaL_error(L, "attempt to use a closed relay");
  return r;
}

static const char *field_str(lua_State *L, int t, const char *k, const char *def) {
  int ty = lua_getfield(L, t, k);
  const char *v = def;
  if (ty == LUA_TSTRING) v = lua_tostring(L, -1);
  else if (ty != LUA_TNIL) luaL_error(L, "option '%s' must be a string", k);
  if (l_has_nul(L, -1)) luaL_error(L, "option '%s' must not contain a NUL byte", k);
  lua_pop(L, 1);
  return v;   /* a string (no conversion): still anchored in the options table */
}

/* A string option copied into a fixed buffer: too long is an error, never a silent cut. */
static void field_copy(lua_State *L, const char *k, const char *v, char *buf, size_t size) {
  if (strlen(v) >= size) luaL_error(L, "option '%s' is too long (at most %d bytes)", k, (int)size - 1);
  memcpy(buf, v, strlen(v) + 1);
}

static int field_bool(lua_State *L, int t, const char *k, int def) {
  int ty = lua_getfield(L, t, k);
  int v = ty == LUA_TNIL ? def : lua_toboolean(L, -1);
  if (ty != LUA_TNIL && ty != LUA_TBOOLEAN) luaL_error(L, "option '%s' must be a boolean", k);
  lua_pop(L, 1);
  return v;
}

static lua_Number field_num(lua_State *L, int t, const char *k, lua_Number def) {
  int ty = lua_getfield(L, t, k);
  lua_Number v = def;
  if (ty == LUA_TNUMBER) v = lua_tonumber(L, -1);
  else if (ty != LUA_TNIL) luaL_error(L, "option '%s' must be a number", k);
  lua_pop(L, 1);
  return v;
}

static void default_helo(char *buf, size_t len) {
  char host[256];
  if (gethostname(host, sizeof host) != 0 || !host[0]) snprintf(host, sizeof host, "localhost");
  host[sizeof host - 1] = '\0';
  snprintf(buf, len, "%s", host);
}

static char *dup_secret(lua_State *L, const char *s) {
  if (!s) return NULL;
  char *d = strdup(s);
  if (!d) luaL_error(L, "out of memory");
  return d;
}

/* A relay given by name gets its own c-ares resolver (options dns = "IP[:PORT],...", default the
 * system's resolv.conf, and dns_timeout = seconds per try): /etc/hosts first, then DNS, with the
 * system's search list, as getaddrinfo did, but without blocking the loop.  An IP address needs
 * none. */
static int open_resolver(lua_State *L, relay *r, char *err, size_t errlen) {
  smtp_config *cfg = &r->cfg;
  const char *target = cfg->connect_addr[0] ? cfg->connect_addr : cfg->host;
  struct sockaddr_storage ss;
  socklen_t len;
  const char *servers = field_str(L, 1, "dns", NULL);
  lua_Number timeout = field_num(L, 1, "dns_timeout", 3);
  luaL_argcheck(L, timeout > 0 && timeout <= 60, 1, "dns_timeout must be in (0, 60] seconds");
  if (net_numeric_addr(target, cfg->port, &ss, &len) == 0) return 0;
  cfg->resolver = dns_resolver_new_ex(r->loop, servers, (int)(timeout * 1000), 2, 1, err, errlen);
  return cfg->resolver ? 0 : -1;
}

/* timeouts = { connect =, greeting =, command =, data_end = } in seconds: per-wait overrides. */
static void read_timeouts(lua_State *L, smtp_config *cfg) {
  if (lua_getfield(L, 1, "timeouts") == LUA_TTABLE) {
    static const char *const names[] = { "connect", "greeting", "command", "data_end" };
    int *slots[] = { &cfg->timeout_connect_ms, &cfg->timeout_greeting_ms, &cfg->timeout_command_ms,
                     &cfg->timeout_data_end_ms };
    int t = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, t)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
      int i = 0;
      while (i < 4 && strcmp(k, names[i]) != 0) i++;
      if (i == 4) luaL_error(L, "option 'timeouts': unknown wait '%s' (connect, greeting, command, data_end)", k);
      lua_Number v = lua_tonumber(L, -1);
      if (!lua_isnumber(L, -1) || v <= 0 || v > 3600)
        luaL_error(L, "option 'timeouts.%s' must be in (0, 3600] seconds", k);
      *slots[i] = (int)(v * 1000);
      lua_pop(L, 1);
    }
  } else if (!lua_isnil(L, -1)) {
    luaL_error(L, "option 'timeouts' must be a table");
  }
  lua_pop(L, 1);
}

static smtp_tls_mode read_tls_mode(lua_State *L) {
  const char *tls = field_str(L, 1, "tls", "starttls");
  if (!strcmp(tls, "starttls")) return SMTP_TLS_STARTTLS;
  if (!strcmp(tls, "tls") || !strcmp(tls, "ssl")) return SMTP_TLS_IMPLICIT;
  if (!strcmp(tls, "none")) return SMTP_TLS_NONE;
  if (!strcmp(tls, "opportunistic")) return SMTP_TLS_OPPORTUNISTIC;
  luaL_error(L, "option 'tls' must be \"starttls\", \"tls\" or \"none\" (got \"%s\")", tls);
  return SMTP_TLS_NONE;   /* not reached */
}

/* smtp.relay(opts) -> relay */
static int l_relay_new(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  relay *r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  r->closed = 1;                         /* "closed" until fully built: __gc then has nothing to undo */
  luaL_setmetatable(L, RELAY_MT);
  smtp_config *cfg = &r->cfg;
  cfg->tls = read_tls_mode(L);
  const char *server = field_str(L, 1, "server", NULL);
  if (!server) return luaL_error(L, "option 'server' (\"host:port\") is required");
  const char *defport = cfg->tls == SMTP_TLS_IMPLICIT ? "465" : cfg->tls == SMTP_TLS_STARTTLS ? "587" : "25";
  if (net_split_hostport(server, cfg->host, sizeof cfg->host, cfg->port, sizeof cfg->port, defport) < 0)
    return luaL_error(L, "option 'server': \"%s\" is not host:port", server);
  cfg->verify = field_bool(L, 1, "verify", 1);
  cfg->allow_plaintext_auth = field_bool(L, 1, "allow_plaintext_auth", 0);
  lua_Number timeout = field_num(L, 1, "timeout", 60);
  luaL_argcheck(L, timeout > 0 && timeout <= 3600, 1, "timeout must be in (0, 3600] seconds");
  cfg->timeout_ms = (int)(timeout * 1000);
  read_timeouts(L, cfg);
  lua_Number idle = field_num(L, 1, "idle_timeout", 60);
  luaL_argcheck(L, idle >= 0 && idle <= 3600, 1, "idle_timeout must be in [0, 3600] seconds");
  cfg->idle_timeout_ms = (int)(idle * 1000);
  lua_Number maxm = field_num(L, 1, "max_messages_per_connection", 0);
  luaL_argcheck(L, maxm >= 0 && maxm <= 1e9, 1, "max_messages_per_connection must be >= 0");
  cfg->max_messages = (int)maxm;
  lua_Number depth = field_num(L, 1, "pipeline_depth", 3);
  luaL_argcheck(L, depth >= 0 && depth <= 4, 1, "pipeline_depth must be 0 (no pipelining), 1, 2, 3 or 4");
  cfg->pipeline_depth = (int)depth;
  lua_Number maxc = field_num(L, 1, "max_connections", 8);
  luaL_argcheck(L, maxc >= 1 && maxc <= 10000, 1, "max_connections must be in [1, 10000]");
  r->max_connections = (int)maxc;
  const char *helo = field_str(L, 1, "helo", NULL);
  if (helo) field_copy(L, "helo", helo, cfg->helo, sizeof cfg->helo); else default_helo(cfg->helo, sizeof cfg->helo);
  for (const char *p = cfg->helo; *p; p++)
    if ((unsigned char)*p <= ' ' || *p == 0x7f) return luaL_error(L, "option 'helo' must be one word");
  const char *source = field_str(L, 1, "source", NULL);
  if (source) field_copy(L, "source", source, cfg->source, sizeof cfg->source);
  const char *addr = field_str(L, 1, "address", NULL);   /* connect here, keep server's name for TLS */
  if (addr) field_copy(L, "address", addr, cfg->connect_addr, sizeof cfg->connect_addr);
  if (field_bool(L, 1, "trace", 0)) cfg->trace = stderr;
  else if (dialogue_log) cfg->trace = dialogue_log;
  const char *user = field_str(L, 1, "user", NULL);
  const char *password = field_str(L, 1, "password", NULL);
  if (user && *user && !password) return luaL_error(L, "option 'user' is set but 'password' is not");
  char err[300];
  cfg->ssl_ctx = tls_client_ctx(cfg->verify, field_str(L, 1, "ca_file", NULL), err, sizeof err);
  if (!cfg->ssl_ctx) { lua_pushnil(L); lua_pushstring(L, err); return 2; }
  cfg->user = user && *user ? dup_secret(L, user) : NULL;
  cfg->password = cfg->user ? dup_secret(L, password) : NULL;
  r->loop = task_loop(L);
  if (open_resolver(L, r, err, sizeof err) < 0) { lua_pushnil(L); lua_pushstring(L, err); return 2; }
  r->closed = 0;
  return 1;
}

/* The list of recipients at idx into out (pointers into the table's own strings).  Strings
 * only: a number would be converted on the stack, into a string that nothing holds once
 * popped (a use after free), and a number is no address anyway: a programmer's mistake. */
static int table_len_strings(lua_State *L, int idx, const char **out, int max) {
  int n = (int)luaL_len(L, idx);
  luaL_argcheck(L, n >= 1 && n <= max, 2, "'to' must list 1 to 1000 addresses");
  for (int i = 0; i < n; i++) {
    if (lua_rawgeti(L, idx, i + 1) != LUA_TSTRING)
      luaL_error(L, "message field 'to'[%d] must be a string (got %s)", i + 1, luaL_typename(L, -1));
    out[i] = lua_tostring(L, -1);
    lua_pop(L, 1);   /* still referenced by the table */
  }
  return n;
}

/* Does any of the n strings of list idx (or the string at idx) hold a NUL byte? */
static int any_nul(lua_State *L, int idx, int n) {
  if (lua_type(L, idx) == LUA_TSTRING) return l_has_nul(L, idx);
  int found = 0;
  for (int i = 1; i <= n && !found; i++) {
    lua_rawgeti(L, idx, i);
    found = l_has_nul(L, -1);
    lua_pop(L, 1);
  }
  return found;
}

/* A bad envelope: this message's permanent failure, decided before any network. */
static void push_invalid(lua_State *L, relay *r, const char *stage, const char *msg) {
  smtp_result res = { .error = SMTP_ERR_INVALID, .stage = stage };
  snprintf(res.message, sizeof res.message, "%s", msg);
  push_result(L, &res, NULL, r);
}

static void push_gate_refusal(lua_State *L, relay *r, const gate *g);

/* relay:send{ from=, to=, data=, gate= } -> result */
static int l_relay_send(lua_State *L) {
  relay *r = check_relay(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  int fty = lua_getfield(L, 2, "from");
  if (fty != LUA_TNIL && fty != LUA_TSTRING) return luaL_error(L, "message field 'from' must be a string");
  const char *from = fty == LUA_TNIL ? "" : lua_tostring(L, -1);
  int from_idx = lua_gettop(L);
  lua_getfield(L, 2, "data");
  size_t len;
  const char *data = lua_tolstring(L, -1, &len);
  if (!data) return luaL_error(L, "message field 'data' must be a string");
  const char *to[1000];
  int nto;
  int ty = lua_getfield(L, 2, "to");
  if (ty == LUA_TSTRING) { to[0] = lua_tostring(L, -1); nto = 1; }
  else if (ty == LUA_TTABLE) nto = table_len_strings(L, lua_gettop(L), to, 1000);
  else return luaL_error(L, "message field 'to' must be a string or a list of strings");
  /* the body's class: the message says so when it was built by mime.build (the campaign passes its
   * info.eightbit on), so it is not scanned twice; a message that does not say is scanned here */
  int ety = lua_getfield(L, 2, "eightbit");
  if (ety != LUA_TNIL && ety != LUA_TBOOLEAN) return luaL_error(L, "message field 'eightbit' must be a boolean");
  int eightbit = ety == LUA_TBOOLEAN ? lua_toboolean(L, -1) : smtp_data_has_8bit(data, len);
  lua_pop(L, 1);
  /* C would cut an address at a NUL byte (a@b.test\0evil to a@b.test): this message's
   * permanent failure, like any bad envelope, before any network */
  if (l_has_nul(L, from_idx)) { push_invalid(L, r, "mail", "invalid sender address: it contains a NUL byte"); return 1; }
  if (any_nul(L, lua_gettop(L), nto)) { push_invalid(L, r, "rcpt", "invalid recipient address: it contains a NUL byte"); return 1; }
  gate *g = NULL;
  if (lua_getfield(L, 2, "gate") != LUA_TNIL) {
    gate **box = luaL_testudata(L, -1, GATE_MT);
    if (!box || !*box) return luaL_error(L, "message field 'gate' must be a gate (mailshot.smtp.gate())");
    g = *box;
    /* one send per gate: the gate knows only the last send given it, so an earlier one would
     * stay in line for ever once the gate is refused (or opened, on another relay), and, no
     * longer held, wedge its relay's line */
    if (g->state == GATE_CLOSED && g->op)
      return luaL_error(L, "relay:send: this gate already holds a send (one gate per send)");
  }
  lua_pop(L, 1);
  smtp_result why;
  smtp_txn *txn = smtp_txn_new(from, to, nto, data, len, &why);
  if (!txn) { push_result(L, &why, NULL, r); return 1; }   /* a bad envelope: no network */
  txn->eightbit = eightbit;
  if (r->auth_refused) {               /* the login was refused earlier: no new one */
    smtp_txn_free(txn);
    push_auth_refusal(L, r);
    return 1;
  }
  if (g && g->state == GATE_REFUSED) {  /* nothing goes out */
    smtp_txn_free(txn);
    push_gate_refusal(L, r, g);
    return 1;
  }
  if (!task_can_wait(L)) { smtp_txn_free(txn); return task_suspend(L); /* raises */ }
  send_op *op = calloc(1, sizeof *op);
  if (!op) { smtp_txn_free(txn); return luaL_error(L, "out of memory"); }
  op->relay = r;
  op->txn = txn;
  op_link(r, op);
  task_wait_begin(L, &op->wait, "relay:send");   /* before start_op: it may finish at once */
  if (g && g->state == GATE_CLOSED) {  /* in line, without a session, until the gate opens */
    op->gate = g;
    g->refs++;
    g->op = op;
    queue_push(r, op);
    return task_suspend(L);
  }
  smtp_conn *c = queue_first(r, NULL) ? NULL : pick_session(r);   /* no overtaking those already waiting */
  if (c) start_op(r, op, c); else queue_push(r, op);
  return task_suspend(L);
}

/* relay:check() -> info: connect, greet, TLS, AUTH on a fresh session, then QUIT */
static int l_relay_check(lua_State *L) {
  relay *r = check_relay(L);
  if (r->nextra >= (int)(sizeof r->extra / sizeof r->extra[0])) return luaL_error(L, "too many checks at once");
  if (!task_can_wait(L)) return task_suspend(L);   /* raises the "inside a task" error */
  send_op *op = calloc(1, sizeof *op);
  smtp_conn *c = smtp_conn_new(r->loop, &r->cfg);
  if (!op || !c) { free(op); smtp_conn_free(c); return luaL_error(L, "out of memory"); }
  op->relay = r;
  op->conn = c;
  op_link(r, op);
  task_wait_begin(L, &op->wait, "relay:check");
  r->extra[r->nextra++] = c;
  smtp_conn_open(c, on_check_done, op);
  return task_suspend(L);
}

/* relay:close(): QUIT idle sessions and wait (bounded by the timeout) for them to end */
static int l_relay_close(lua_State *L) {
  relay *r = luaL_checkudata(L, 1, RELAY_MT);
  if (r->closed) return 0;
  /* wait for the QUITs when we can, and when no other task already waits in close() */
  int wait = task_can_wait(L) && !r->closing;
  if (wait) { r->closing = 1; r->closing_count = 0; }
  for (int i = r->nconns - 1; i >= 0; i--) {
    smtp_conn *c = r->conns[i];
    if (!smtp_conn_ready(c)) continue;
    pool_remove(r, c);
    quit_extra(r, c);
  }
  if (!wait) return 0;
  if (r->closing_count == 0) { r->closing = 0; return 0; }
  task_wait_begin(L, &r->closer, "relay:close");
  return task_suspend(L);
}

static int l_relay_stats(lua_State *L) {
  relay *r = check_relay(L);
  int idle = 0, waiting = 0;
  for (int i = 0; i < r->nconns; i++) idle += smtp_conn_ready(r->conns[i]);
  for (send_op *op = r->queue_head; op; op = op->qnext) waiting++;
  lua_createtable(L, 0, 5);
  set_int(L, "connections", r->nconns);
  set_int(L, "idle", idle);
  set_int(L, "waiting", waiting);
  set_int(L, "max_connections", r->max_connections);
  set_int(L, "pipeline_depth", r->cfg.pipeline_depth);
  return 1;
}

static int l_relay_gc(lua_State *L) {
  relay *r = luaL_checkudata(L, 1, RELAY_MT);
  for (int i = 0; i < r->nconns; i++) smtp_conn_free(r->conns[i]);
  for (int i = 0; i < r->nextra; i++) smtp_conn_free(r->extra[i]);
  r->nconns = r->nextra = 0;
  free(r->conns);
  r->conns = NULL;
  /* tasks still parked in send() or check() (the state is closing, or a `<close>` relay went
   * out of scope under them) are not woken: their waits are cancelled, never completed */
  while (r->ops) { send_op *op = r->ops; r->ops = op->next; op_free(op); }
  r->queue_head = r->queue_tail = NULL;
  r->closing = 0;
  task_wait_cancel(&r->closer);
  if (r->cfg.password) { explicit_bzero(r->cfg.password, strlen(r->cfg.password)); free(r->cfg.password); }
  free(r->cfg.user);
  r->cfg.user = r->cfg.password = NULL;
  if (r->cfg.ssl_ctx) SSL_CTX_free(r->cfg.ssl_ctx);
  r->cfg.ssl_ctx = NULL;
  dns_resolver_free(r->cfg.resolver);   /* after the sessions: they cancelled their lookups */
  r->cfg.resolver = NULL;
  r->closed = 1;
  return 0;
}

static int l_relay_tostring(lua_State *L) {
  relay *r = luaL_checkudata(L, 1, RELAY_MT);
  if (r->closed) lua_pushliteral(L, "relay (closed)");
  else lua_pushfstring(L, "relay (%s:%s)", r->cfg.host, r->cfg.port);
  return 1;
}

static int l_log(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  FILE *f = fopen(path, "a");
  if (!f) return luaL_fileresult(L, 0, path);
  setvbuf(f, NULL, _IOLBF, 0);   /* a line at a time: the log is for watching a run */
  if (dialogue_log) fclose(dialogue_log);
  dialogue_log = f;
  lua_pushboolean(L, 1);
  return 1;
}

/* ---------------- gates ---------------- */

static void refusal_result(const gate *g, smtp_result *res) {
  memset(res, 0, sizeof *res);
  res->error = SMTP_ERR_LOCAL;
  res->temporary = 1;
  res->stage = "gate";
  snprintf(res->message, sizeof res->message, "not sent: %s", g->why);
}

static void push_gate_refusal(lua_State *L, relay *r, const gate *g) {
  smtp_result res;
  refusal_result(g, &res);
  push_result(L, &res, NULL, r);
}

static gate *check_gate(lua_State *L) { return *(gate **)luaL_checkudata(L, 1, GATE_MT); }

/* smtp.gate() -> a closed gate */
static int l_gate_new(lua_State *L) {
  gate **box = lua_newuserdatauv(L, sizeof *box, 0);
  *box = calloc(1, sizeof **box);
  if (!*box) return luaL_error(L, "out of memory");
  (*box)->refs = 1;
  luaL_setmetatable(L, GATE_MT);
  return 1;
}

/* A task in g:wait() learns the answer: true, or false and why. */
static void gate_wake(gate *g) {
  lua_State *co = task_wait_target(&g->waiter);
  if (!co || !lua_checkstack(co, 2)) { task_wait_done(&g->waiter, 0); return; }
  lua_pushboolean(co, g->state == GATE_OPEN);
  if (g->state == GATE_OPEN) { task_wait_done(&g->waiter, 1); return; }
  lua_pushstring(co, g->why);
  task_wait_done(&g->waiter, 2);
}

/* g:open(): the send it holds takes its turn in its relay's line */
static int l_gate_open(lua_State *L) {
  gate *g = check_gate(L);
  if (g->state != GATE_CLOSED) return luaL_error(L, "gate:open(): the gate was already %s",
                                                 g->state == GATE_OPEN ? "opened" : "refused");
  g->state = GATE_OPEN;
  gate_wake(g);
  if (g->op) dispatch(g->op->relay);
  return 0;
}

/* g:refuse(why): the send it holds ends unsent, with why in its result's message */
static int l_gate_refuse(lua_State *L) {
  gate *g = check_gate(L);
  const char *why = luaL_optstring(L, 2, "refused");
  if (g->state != GATE_CLOSED) return luaL_error(L, "gate:refuse(): the gate was already %s",
                                                 g->state == GATE_OPEN ? "opened" : "refused");
  g->state = GATE_REFUSED;
  snprintf(g->why, sizeof g->why, "%s", why);
  gate_wake(g);
  send_op *op = g->op;
  if (op) {                            /* still in line (a held send never has a session) */
    relay *r = op->relay;
    send_op *prev = NULL;
    for (send_op *q = r->queue_head; q && q != op; q = q->qnext) prev = q;
    queue_unlink(r, op, prev);
    smtp_result res;
    refusal_result(g, &res);
    complete_op(r, op, &res, NULL);
  }
  return 0;
}

/* g:wait() -> true | false, why: at once when the gate is open or refused, else when it is */
static int l_gate_wait(lua_State *L) {
  gate *g = check_gate(L);
  if (g->state == GATE_OPEN) { lua_pushboolean(L, 1); return 1; }
  if (g->state == GATE_REFUSED) { lua_pushboolean(L, 0); lua_pushstring(L, g->why); return 2; }
  if (g->waiter.co) return luaL_error(L, "gate:wait(): another task already waits on this gate");
  if (!task_can_wait(L)) return task_suspend(L);   /* raises */
  task_wait_begin(L, &g->waiter, "gate:wait");
  return task_suspend(L);
}

/* g:state() -> "closed" | "open" | "refused", why */
static int l_gate_state(lua_State *L) {
  gate *g = check_gate(L);
  static const char *const names[] = { "closed", "open", "refused" };
  lua_pushstring(L, names[g->state]);
  if (g->state != GATE_REFUSED) return 1;
  lua_pushstring(L, g->why);
  return 2;
}

static int l_gate_gc(lua_State *L) {
  gate **box = luaL_checkudata(L, 1, GATE_MT);
  gate_unref(*box);
  *box = NULL;
  return 0;
}

int luaopen_mailshot_smtp(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "send", l_relay_send }, { "check", l_relay_check }, { "close", l_relay_close },
    { "stats", l_relay_stats }, { NULL, NULL }
  };
  static const luaL_Reg meta[] = {
    { "__gc", l_relay_gc }, { "__close", l_relay_gc }, { "__tostring", l_relay_tostring }, { NULL, NULL }
  };
  static const luaL_Reg funcs[] = { { "relay", l_relay_new }, { "gate", l_gate_new }, { "log", l_log }, { NULL, NULL } };
  static const luaL_Reg gate_methods[] = {
    { "open", l_gate_open }, { "refuse", l_gate_refuse }, { "wait", l_gate_wait }, { "state", l_gate_state },
    { NULL, NULL }
  };
  luaL_newmetatable(L, GATE_MT);
  lua_pushcfunction(L, l_gate_gc);
  lua_setfield(L, -2, "__gc");
  luaL_newlib(L, gate_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newmetatable(L, RELAY_MT);
  luaL_setfuncs(L, meta, 0);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");       /* metatable.__index = methods (not exported: rate limits
                                           wrap a relay in Lua, mailshot.sender) */
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
