/* smtp.c - SMTP client session state machine (RFC 5321, 3207, 8314, 4954, 2920).  See smtp.h.
 *
 * Shape: the session's own states (connect, greeting, EHLO, STARTTLS, AUTH) advance in
 * on_reply(); once READY, transactions flow through a queue of awaited replies (expect_reply):
 * each command sent pushes what its reply will answer, each reply pops one.  With PIPELINING
 * (RFC 2920) MAIL, every RCPT and DATA go out in one write, and the next message's commands
 * go out right behind the previous message's final dot, so a message costs about one round
 * trip.  Replies are parsed once, by smtp_reply_parse(); the failure class comes from
 * smtp_reply_class().  Every failure names its kind (smtp_error) where it happens: set_result()
 * records it, fail() ends the session with it; state changes go through set_state(), and every
 * entry point runs between enter() and leave(). */
#include "smtp.h"
#include "dns.h"
#include "net.h"
#include "tls.h"

#include <errno.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

typedef enum {
  ST_NEW, ST_CONNECT, ST_HANDSHAKE, ST_GREETING, ST_EHLO, ST_HELO, ST_STARTTLS,
  ST_AUTH_PLAIN, ST_AUTH_LOGIN, ST_AUTH_USER, ST_AUTH_PASS,
  ST_READY, ST_QUIT, ST_DEAD
} smtp_state;

static const char *state_names[] = {
  "new", "connect", "tls", "greeting", "ehlo", "helo", "starttls",
  "auth", "auth", "auth", "auth", "ready", "quit", "dead"
};

enum { OP_NONE, OP_OPEN, OP_QUIT };

/* Transaction phases */
enum { T_QUEUED, T_CMDS, T_BODY, T_DONE };

/* What the next reply answers, in the order the commands went out (RFC 2920 §3.1: replies
 * come in the order of the commands). */
typedef enum { EXP_MAIL, EXP_RCPT, EXP_DATA, EXP_DOT, EXP_RSET } exp_kind;
typedef struct { exp_kind kind; smtp_txn *t; } expect;
static const char *exp_stage[] = { "mail", "rcpt", "data", "message", "rset" };

#define IN_MAX (2 * SMTP_REPLY_BYTES_MAX)   /* a reply plus what pipelining may queue behind it */
#define PIPE_MAX 4                          /* transactions one session holds at most */

struct smtp_conn {
  loop *loop;
  const smtp_config *cfg;
  net_stream s;
  smtp_state state;
  int op;                       /* open/quit operation in progress, with its callback */
  smtp_done_fn *fn;
  void *ud;
  smtp_txn *q[PIPE_MAX];        /* transactions held, oldest first */
  int nq;
  expect *exp;                  /* replies awaited: exp[exp_head .. exp_len) */
  size_t exp_head, exp_len, exp_cap;
  loop_timer timer;
  loop_deferred flusher;        /* writes what was queued, once per turn of the loop */
  bytebuf out;
  size_t out_off;
  char *in;
  size_t inlen;
  smtp_reply reply;
  smtp_caps caps;
  smtp_result res;              /* the session's own outcome (open, or why it died) */
  dns_addr *addrs;              /* where to connect, tried in turn */
  int naddrs, next_addr;
  dns_lookup *lookup;           /* the host name's lookup in flight, or NULL */
  char connect_err[256];
  char *greeting, *ehlo_text;
  int ehlo_ok, tls_on, authenticated, handshake_after_starttls, retiring;
  const char *auth_mech;         /* set when AUTH was sent: NULL = AUTH never tried */
  /* the TLS session as negotiated, kept after the socket closes so that a later failure (a wrong
   * password) still reports the TLS that was up */
  char tls_version[32], tls_cipher[96], tls_subject[512];
  int tls_verified;
  int busy, free_pending, watched, messages;
  char peer[64];
  unsigned long id;             /* the session's number in the dialogue log: [s1], [s2], ... */
  const char *raw;              /* the reply being handled, as received (c->in), for EHLO */
  size_t rawlen;
};

static unsigned long session_seq;  /* the loop is one thread: a plain counter numbers the sessions */

static const char *const error_names[] = {
  NULL, "invalid", "dns", "connect", "timeout", "closed", "tls", "cert", "protocol", "tempfail", "permfail",
  "auth", "local", "internal"
};
_Static_assert(sizeof error_names / sizeof error_names[0] == SMTP_ERR_INTERNAL + 1, "a name for every smtp_error");

const char *smtp_error_name(smtp_error e) {
  return e > SMTP_ERR_NONE && e <= SMTP_ERR_INTERNAL ? error_names[e] : NULL;
}

/* The network, a 4xx, a broken session: another try may work.  A 5xx, a bad envelope, a certificate
 * that does not verify, our own refusal: it will fail the same way again. */
int smtp_error_temporary(smtp_error e) {
  return e != SMTP_ERR_NONE && e != SMTP_ERR_INVALID && e != SMTP_ERR_CERT && e != SMTP_ERR_PERMFAIL
      && e != SMTP_ERR_LOCAL;
}

/* Set this to 1 to have every state change in the dialogue log (debugging the machine itself). */
#ifndef SMTP_TRACE_STATES
#define SMTP_TRACE_STATES 0
#endif

static void trace(smtp_conn *c, const char *dir, const char *fmt, ...);

/* Every change of state passes here. */
static void set_state(smtp_conn *c, smtp_state st) {
  if (SMTP_TRACE_STATES && c->cfg->trace && st != c->state)
    trace(c, "--", "state %s -> %s", state_names[c->state], state_names[st]);
  c->state = st;
}

/* The re-entrancy guard of every entry point (loop callbacks, public calls): a callback run inside
 * may free the session; enter() defers that, and leave() does it, returning 1 when c is gone. */
static void enter(smtp_conn *c) { c->busy++; }
static int leave(smtp_conn *c) {
  if (--c->busy > 0 || !c->free_pending) return 0;
  smtp_conn_free(c);
  return 1;
}

static int exp_pending(const smtp_conn *c) { return c->exp_len > c->exp_head; }

/* The stage a failure of the session is reported at: the command whose reply we wait for. */
static const char *stage_of(const smtp_conn *c) {
  if (c->state != ST_READY || !exp_pending(c)) return state_names[c->state];
  return exp_stage[c->exp[c->exp_head].kind];
}

/* ---------------- transactions ---------------- */

static int has_8bit(const char *s) { return smtp_data_has_8bit(s, strlen(s)); }

static void set_result(smtp_result *r, smtp_error kind, const char *stage, int code, const char *enh,
                       const char *msg);

/* A bad envelope: this message's permanent failure, before any network. */
static int envelope_ok(const char *from, const char *const *to, int nto, smtp_result *res) {
  char why[160], msg[200];
  if (!smtp_addr_ok(from, strlen(from), 1, why, sizeof why)) {
    snprintf(msg, sizeof msg, "invalid sender address: %s", why);
    set_result(res, SMTP_ERR_INVALID, "mail", 0, "", msg);
    return 0;
  }
  int i = 0;
  while (i < nto && smtp_addr_ok(to[i], strlen(to[i]), 0, why, sizeof why)) i++;
  if (nto >= 1 && i == nto) return 1;
  if (nto < 1) snprintf(msg, sizeof msg, "no recipient");
  else snprintf(msg, sizeof msg, "invalid recipient address: %s", why);
  set_result(res, SMTP_ERR_INVALID, "rcpt", 0, "", msg);
  return 0;
}

smtp_txn *smtp_txn_new(const char *from, const char *const *to, int nto, const char *msg, size_t len,
                       smtp_result *why) {
  if (!envelope_ok(from, to, nto, why)) return NULL;
  smtp_txn *t = malloc(sizeof *t);
  if (!t) goto nomem;
  memset(t, 0, offsetof(smtp_txn, res));   /* res is last (smtp.h) */
  smtp_result_clear(&t->res);
  t->from = strdup(from);
  t->rcpt = calloc((size_t)nto, sizeof *t->rcpt);
  if (!t->from || !t->rcpt) goto nomem;
  t->nrcpt = nto;
  t->utf8 = has_8bit(from);
  for (int i = 0; i < nto; i++) {
    if (!(t->rcpt[i].address = strdup(to[i]))) goto nomem;
    t->utf8 |= has_8bit(to[i]);
  }
  if (smtp_dot_stuff(&t->data, msg, len) < 0) goto nomem;
  t->size = len;   /* eightbit: the caller's (l_smtp.c), who may know it without a scan */
  return t;
nomem:
  smtp_txn_free(t);
  set_result(why, SMTP_ERR_INTERNAL, "mail", 0, "", "out of memory");
  return NULL;
}

void smtp_txn_free(smtp_txn *t) {
  if (!t) return;
  free(t->from);
  if (t->rcpt)
    for (int i = 0; i < t->nrcpt; i++) { free(t->rcpt[i].address); free(t->rcpt[i].text); }
  free(t->rcpt);
  bytebuf_free(&t->data);
  free(t);
}

/* ---------------- plumbing ---------------- */

static void on_io(loop *l, int fd, int events, void *data);
static void on_timeout(loop *l, void *data);
static void flush(smtp_conn *c);
static void read_input(smtp_conn *c);
static void pump(smtp_conn *c);

/* Bytes written as they are in the dialogue log: printable ASCII but the backslash. Everything else
 * (CR, LF, ESC, any control byte, bytes >= 0x80, the backslash itself) becomes \xNN, so no byte from
 * a server can end a log line, start a forged one or drive a terminal. */
static int trace_plain(unsigned char ch) { return ch >= 0x20 && ch < 0x7f && ch != '\\'; }

/* One dialogue log line: "[HH:MM:SS.mmm ][sN] PEER DIR TEXT", DIR being ">" (us), "<" (one line of a
 * server reply: a multi-line reply gives one log line each), "--" (a note) or "!!" (a failure). */
static void trace_line(smtp_conn *c, const char *dir, const char *p, size_t n) {
  FILE *f = c->cfg->trace;
  if (f != stderr) {                   /* a log file: wall-clock time first */
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    fprintf(f, "%02d:%02d:%02d.%03ld ", tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
  }
  fprintf(f, "[s%lu] %s %s ", c->id, c->peer[0] ? c->peer : c->cfg->host, dir);
  size_t i = 0;
  while (i < n) {
    size_t run = i;
    while (run < n && trace_plain((unsigned char)p[run])) run++;
    if (run > i) fwrite(p + i, 1, run - i, f);
    if (run < n) fprintf(f, "\\x%02X", (unsigned char)p[run++]);
    i = run;
  }
  fputc('\n', f);
}

static void trace(smtp_conn *c, const char *dir, const char *fmt, ...) {
  if (!c->cfg->trace) return;
  char text[2048];                     /* commands are at most 1100 bytes; notes are short */
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(text, sizeof text, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  trace_line(c, dir, text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1);
}

/* A server reply in the log: each of its lines as received, on a log line of its own. */
static void trace_reply(smtp_conn *c, const char *p, size_t n) {
  if (!c->cfg->trace) return;
  while (n > 0) {
    const char *e = memchr(p, '\n', n);
    size_t l = e ? (size_t)(e - p) : n;
    trace_line(c, "<", p, l > 0 && p[l - 1] == '\r' ? l - 1 : l);
    if (!e) break;
    n -= l + 1;
    p = e + 1;
  }
}

static int is_waiting(smtp_state st) { return st != ST_NEW && st != ST_DEAD; }

static void update_watch(smtp_conn *c);

/* Commands may be written: the socket is connected and not in the middle of a TLS handshake. */
static int can_write(const smtp_conn *c) {
  return c->state != ST_DEAD && c->state != ST_NEW && c->state != ST_CONNECT && c->state != ST_HANDSHAKE;
}

static void deferred_flush(loop *l, void *data) {
  smtp_conn *c = data;
  if (!can_write(c)) return;
  enter(c);
  flush(c);
  if (leave(c)) return;
  if (c->state != ST_DEAD) update_watch(c);
}

/* Write at the end of this turn of the loop, together with whatever else gets queued. */
static void want_flush(smtp_conn *c) {
  if (c->out_off < c->out.len) loop_defer(c->loop, &c->flusher);
}

/* Keep the fd's watch mask in line with what the session waits for. */
static void update_watch(smtp_conn *c) {
  if (c->s.fd < 0) return;
  int mask = 0;
  if (c->state == ST_CONNECT) mask = LOOP_WRITE;
  else if (is_waiting(c->state)) {
    mask = LOOP_READ;
    /* wait for writability only for what a write left over, not for what the deferred
     * flush will write before the next poll anyway */
    if (c->out_off < c->out.len && !c->flusher.queued) mask |= LOOP_WRITE;
  }
  if (loop_watch(c->loop, c->s.fd, mask, on_io, c) == 0) c->watched = 1;
}

/* The wait now starting: its own timeout when the configuration gives one (RFC 5321
 * §4.5.3.2 lists the waits: the greeting, each command, and the end of DATA, which may
 * legitimately take long while the server checks the message). */
static int wait_ms(const smtp_conn *c) {
  const smtp_config *k = c->cfg;
  int ms = 0;
  if (c->state == ST_CONNECT || c->state == ST_HANDSHAKE) ms = k->timeout_connect_ms;
  else if (c->state == ST_GREETING) ms = k->timeout_greeting_ms;
  else if (c->state == ST_READY && exp_pending(c) && c->exp[c->exp_head].kind == EXP_DOT) ms = k->timeout_data_end_ms;
  else ms = k->timeout_command_ms;
  return ms > 0 ? ms : k->timeout_ms;
}

static void arm_timer(smtp_conn *c) { loop_timer_start(c->loop, &c->timer, (uint64_t)wait_ms(c)); }

/* In READY: the reply timeout while replies are awaited, else the idle timeout. */
static void arm_ready_timer(smtp_conn *c) {
  if (exp_pending(c)) arm_timer(c);
  else if (c->cfg->idle_timeout_ms > 0) loop_timer_start(c->loop, &c->timer, (uint64_t)c->cfg->idle_timeout_ms);
  else loop_timer_stop(c->loop, &c->timer);
}

static void close_socket(smtp_conn *c) {
  loop_timer_stop(c->loop, &c->timer);
  loop_cancel_deferred(c->loop, &c->flusher);
  if (c->s.fd >= 0 && c->watched) loop_unwatch(c->loop, c->s.fd);
  c->watched = 0;
  net_close(&c->s);
  set_state(c, ST_DEAD);
  c->exp_head = c->exp_len = 0;
}

/* End the open/quit operation: exactly one call of its callback. */
static void finish(smtp_conn *c) {
  int op = c->op;
  c->op = OP_NONE;
  if (op != OP_NONE && c->fn) c->fn(c, c->ud);
}

/* Every failure is recorded here, with its kind: the kind decides `temporary`. */
/* The QUIT was answered, or the server closed, or its reply is late: the polite end is over. */
static void quit_done(smtp_conn *c) {
  close_socket(c);
  c->res.ok = 1;
  finish(c);
}

void smtp_result_clear(smtp_result *r) {
  r->ok = r->temporary = r->code = r->accepted = r->defer = 0;
  r->error = SMTP_ERR_NONE;
  r->stage = NULL;
  r->enhanced[0] = r->message[0] = '\0';
}

/* s into dst[size], cut to size - 1 bytes (what snprintf "%s" does, without its format parsing) */
static void copy_text(char *dst, size_t size, const char *s) {
  size_t n = s ? strnlen(s, size - 1) : 0;
  memcpy(dst, s ? s : "", n);
  dst[n] = '\0';
}

static void set_result(smtp_result *r, smtp_error kind, const char *stage, int code, const char *enh,
                       const char *msg) {
  int accepted = r->accepted;
  smtp_result_clear(r);
  r->error = kind;
  r->stage = stage;
  r->temporary = smtp_error_temporary(kind);
  r->code = code;
  r->accepted = accepted;
  copy_text(r->enhanced, sizeof r->enhanced, enh);
  copy_text(r->message, sizeof r->message, msg);
}

/* A failure on the server's reply: its class (RFC 5321 §4.2.1) is the kind; a 2xx or 3xx where
 * another reply was due is the server breaking the dialogue. */
static smtp_error reply_kind(const smtp_conn *c) {
  switch (smtp_reply_class(&c->reply)) {
  case SMTP_CLASS_PERMANENT: return SMTP_ERR_PERMFAIL;
  case SMTP_CLASS_TEMPORARY: return SMTP_ERR_TEMPFAIL;
  default: return SMTP_ERR_PROTOCOL;
  }
}

static void reply_result(smtp_conn *c, smtp_result *r, const char *stage) {
  set_result(r, reply_kind(c), stage, c->reply.code, c->reply.enhanced, c->reply.text);
}

/* The transaction is over: take it off the session, then tell its owner (who may hand the
 * session a new one from the callback). */
static void txn_done(smtp_conn *c, smtp_txn *t) {
  for (int i = 0; i < c->nq; i++)
    if (c->q[i] == t) {
      memmove(&c->q[i], &c->q[i + 1], (size_t)(c->nq - i - 1) * sizeof c->q[0]);
      c->nq--;
      break;
    }
  t->phase = T_DONE;
  if (t->res.ok) c->messages++;
  if (t->fn) t->fn(c, t, t->ud);
}

/* Where a transaction stood when its session died. */
static const char *txn_stage(const smtp_conn *c, const smtp_txn *t) {
  switch (t->phase) {
  case T_QUEUED: return "mail";
  case T_CMDS: return !t->mail_ok && t->rcpt_replied == 0 ? "mail" : t->rcpt_replied < t->nrcpt ? "rcpt" : "data";
  default: return "message";
  }
}

/* The session died (c->res says why): every transaction it held fails with that reason,
 * then the open/quit operation ends. */
static void fail_all(smtp_conn *c, int queued_get_session_stage) {
  smtp_txn *held[PIPE_MAX];
  int n = c->nq;
  memcpy(held, c->q, (size_t)n * sizeof held[0]);
  for (int i = 0; i < n; i++) {
    smtp_txn *t = held[i];
    if (t->phase == T_DONE) continue;
    if (!t->res.stage) {
      const char *stage = t->phase == T_QUEUED && queued_get_session_stage ? c->res.stage : txn_stage(c, t);
      set_result(&t->res, c->res.error, stage, c->res.code, c->res.enhanced, c->res.message);
    }
    t->res.ok = 0;
    txn_done(c, t);
  }
  finish(c);
}

/* The session fails: why (kind, stage, message) goes to the session's result and to every transaction
 * it holds, and the socket closes.  A server's refusal (SMTP_ERR_TEMPFAIL, SMTP_ERR_PERMFAIL) takes the
 * code and words of the reply just received: fmt is then NULL, and the log already shows the reply. */
static void fail(smtp_conn *c, smtp_error kind, const char *stage, const char *fmt, ...) {
  int established = c->state == ST_READY;
  if (!fmt) {
    set_result(&c->res, kind, stage, c->reply.code, c->reply.enhanced, c->reply.text);
  } else {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    set_result(&c->res, kind, stage, 0, "", msg);
    trace(c, "!!", "%s: %s", stage, msg);
  }
  close_socket(c);
  fail_all(c, !established);
}

static void send_raw(smtp_conn *c, const char *p, size_t n) {
  if (bytebuf_append(&c->out, p, n) < 0) fail(c, SMTP_ERR_INTERNAL, stage_of(c), "out of memory");
}

/* Queue one command line; `shown` replaces it in the trace (for AUTH). */
static void send_cmd(smtp_conn *c, const char *shown, const char *fmt, ...) {
  char line[1100];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line - 2, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof line - 2) {
    fail(c, SMTP_ERR_LOCAL, stage_of(c), "command too long");
    return;
  }
  trace(c, ">", "%s", shown ? shown : line);
  memcpy(line + n, "\r\n", 2);
  send_raw(c, line, (size_t)n + 2);
}

static void expect_reply(smtp_conn *c, exp_kind kind, smtp_txn *t) {
  if (c->exp_head == c->exp_len) c->exp_head = c->exp_len = 0;
  if (c->exp_len == c->exp_cap) {
    if (c->exp_head > 0) {           /* slide down before growing */
      memmove(c->exp, c->exp + c->exp_head, (c->exp_len - c->exp_head) * sizeof *c->exp);
      c->exp_len -= c->exp_head;
      c->exp_head = 0;
    } else {
      size_t n = c->exp_cap ? c->exp_cap * 2 : 16;
      expect *e = realloc(c->exp, n * sizeof *e);
      if (!e) { fail(c, SMTP_ERR_INTERNAL, stage_of(c), "out of memory"); return; }
      c->exp = e;
      c->exp_cap = n;
    }
  }
  c->exp[c->exp_len++] = (expect){ kind, t };
}

/* ---------------- connecting ---------------- */

static void try_connect(smtp_conn *c) {
  while (c->next_addr < c->naddrs) {
    const dns_addr *a = &c->addrs[c->next_addr++];
    net_addr_str((const struct sockaddr *)&a->ss, c->peer, sizeof c->peer);
    int fd = net_connect_start((const struct sockaddr *)&a->ss, a->len, c->cfg->source[0] ? c->cfg->source : NULL,
                               c->connect_err, sizeof c->connect_err);
    if (fd < 0) continue;
    c->s.fd = fd;
    set_state(c, ST_CONNECT);
    arm_timer(c);
    update_watch(c);
    return;
  }
  fail(c, SMTP_ERR_CONNECT, "connect", "cannot connect to %s:%s: %s", c->cfg->host, c->cfg->port,
       c->connect_err[0] ? c->connect_err : "no address");
}

static void start_handshake(smtp_conn *c) {
  if (tls_begin(&c->s, c->cfg->ssl_ctx, c->cfg->host, c->cfg->verify) < 0) {
    fail(c, SMTP_ERR_LOCAL, "tls", "%s", c->s.err);
    return;
  }
  set_state(c, ST_HANDSHAKE);
  arm_timer(c);
}

static void on_connected(smtp_conn *c) {
  if (net_connect_finish(c->s.fd, c->connect_err, sizeof c->connect_err) < 0) {
    loop_unwatch(c->loop, c->s.fd);
    c->watched = 0;
    net_close(&c->s);
    try_connect(c);                  /* the next address, if any */
    return;
  }
  trace(c, "--", "connected to %s port %s", c->peer, c->cfg->port);
  if (c->cfg->tls == SMTP_TLS_IMPLICIT) { start_handshake(c); return; }
  set_state(c, ST_GREETING);
  arm_timer(c);
}

static void send_ehlo(smtp_conn *c) {
  set_state(c, ST_EHLO);
  send_cmd(c, NULL, "EHLO %s", c->cfg->helo);
}

static void on_handshake(smtp_conn *c) {
  int want = 0;
  int r = tls_handshake(&c->s, &want);
  if (r == NET_AGAIN) {
    if (loop_watch(c->loop, c->s.fd, want == LOOP_WRITE ? LOOP_WRITE : LOOP_READ, on_io, c) < 0)
      fail(c, SMTP_ERR_INTERNAL, "tls", "epoll: %s", strerror(errno));
    return;
  }
  if (r < 0) {
    /* a certificate that does not check out will not check out on retry either */
    int cert = SSL_get_verify_result(c->s.ssl) != X509_V_OK;
    fail(c, cert ? SMTP_ERR_CERT : SMTP_ERR_TLS, "tls", "%s", c->s.err);
    return;
  }
  c->tls_on = 1;
  c->tls_verified = c->s.tls_verified;
  tls_describe(&c->s, c->tls_version, sizeof c->tls_version, c->tls_cipher, sizeof c->tls_cipher,
               c->tls_subject, sizeof c->tls_subject);
  trace(c, "--", "TLS %s %s, peer %s%s", c->tls_version, c->tls_cipher, c->tls_subject,
        c->tls_verified ? " (verified)" : " (not verified)");
  if (c->handshake_after_starttls) {
    memset(&c->caps, 0, sizeof c->caps);   /* RFC 3207 §4.2: forget what we knew, EHLO again */
    send_ehlo(c);
    arm_timer(c);                           /* the EHLO wait starts now, not with the handshake */
  } else {
    set_state(c, ST_GREETING);
    arm_timer(c);
    read_input(c);                          /* the greeting may already sit in OpenSSL's buffer */
  }
}

/* ---------------- after EHLO: TLS, AUTH, ready ---------------- */

static void ready(smtp_conn *c);

static void start_auth(smtp_conn *c) {
  const smtp_config *cfg = c->cfg;
  if (!cfg->user || !*cfg->user) { ready(c); return; }
  if (!c->tls_on && !cfg->allow_plaintext_auth) {
    fail(c, SMTP_ERR_LOCAL, "auth", "refusing to send the password over an unencrypted connection "
                                    "(use TLS, or set allow_plaintext_auth = true)");
    return;
  }
  if (!c->ehlo_ok || !c->caps.auth[0]) {
    fail(c, SMTP_ERR_LOCAL, "auth", "the server does not offer AUTH");
    return;
  }
  bytebuf b = { 0 }, raw = { 0 };
  if (c->caps.auth_plain) {
    /* RFC 4616: authzid NUL authcid NUL passwd, sent as the initial response (RFC 4954 §4) */
    int e = bytebuf_append(&raw, "", 1) | bytebuf_append(&raw, cfg->user, strlen(cfg->user)) |
            bytebuf_append(&raw, "", 1) |
            bytebuf_append(&raw, cfg->password ? cfg->password : "", cfg->password ? strlen(cfg->password) : 0) |
            bytebuf_base64_encode(&b, raw.data, raw.len);
    if (e) { fail(c, SMTP_ERR_INTERNAL, "auth", "out of memory"); goto out; }
    c->auth_mech = "PLAIN";
    set_state(c, ST_AUTH_PLAIN);
    send_cmd(c, "AUTH PLAIN ********", "AUTH PLAIN %s", b.data);
  } else if (c->caps.auth_login) {
    c->auth_mech = "LOGIN";
    set_state(c, ST_AUTH_LOGIN);
    send_cmd(c, NULL, "AUTH LOGIN");
  } else {
    fail(c, SMTP_ERR_LOCAL, "auth", "no AUTH mechanism in common (the server offers: %s; mailshot speaks PLAIN "
                                    "and LOGIN)", c->caps.auth);
  }
out:
  if (raw.data) { explicit_bzero(raw.data, raw.len); bytebuf_free(&raw); }
  if (b.data) { explicit_bzero(b.data, b.len); bytebuf_free(&b); }
}

static void after_ehlo(smtp_conn *c) {
  smtp_tls_mode m = c->cfg->tls;
  if (!c->tls_on && (m == SMTP_TLS_STARTTLS || (m == SMTP_TLS_OPPORTUNISTIC && c->caps.starttls))) {
    if (!c->caps.starttls) {
      /* never a silent downgrade: the user asked for TLS */
      fail(c, SMTP_ERR_LOCAL, "starttls", "the server does not offer STARTTLS; refusing to continue in "
                                          "plaintext (tls = \"none\" allows it)");
      return;
    }
    set_state(c, ST_STARTTLS);
    send_cmd(c, NULL, "STARTTLS");
    return;
  }
  start_auth(c);
}

static void send_login_secret(smtp_conn *c, const char *secret, smtp_state next) {
  bytebuf b = { 0 };
  if (bytebuf_base64_encode(&b, secret, strlen(secret)) < 0) {
    fail(c, SMTP_ERR_INTERNAL, "auth", "out of memory");
    return;
  }
  set_state(c, next);
  send_cmd(c, "********", "%s", b.data);
  explicit_bzero(b.data, b.len);
  bytebuf_free(&b);
}


/* ---------------- transactions ---------------- */

static void ready(smtp_conn *c) {
  set_state(c, ST_READY);
  loop_timer_stop(c->loop, &c->timer);
  if (c->op == OP_OPEN) {
    c->res.ok = 1;
    c->res.stage = "ready";
    finish(c);
    if (c->state != ST_READY) return;
  }
  pump(c);
}

/* Refuse, before any command, what this server cannot take. */
static int precheck(smtp_conn *c, smtp_txn *t) {
  if (c->caps.size_present && c->caps.size && t->size > c->caps.size) {
    char msg[160];
    snprintf(msg, sizeof msg, "message of %zu bytes exceeds the server's limit of %llu (SIZE)", t->size, c->caps.size);
    set_result(&t->res, SMTP_ERR_LOCAL, "mail", 552, "5.3.4", msg);
    return -1;
  }
  if (t->eightbit && !c->caps.eightbitmime) {
    set_result(&t->res, SMTP_ERR_LOCAL, "mail", 0, "", "the message has 8-bit content and the server does not "
                                                       "offer 8BITMIME (build it with eightbit = false)");
    return -1;
  }
  if (t->utf8 && !c->caps.smtputf8) {
    set_result(&t->res, SMTP_ERR_LOCAL, "mail", 0, "",
               "a non-ASCII address needs SMTPUTF8, which the server does not offer");
    return -1;
  }
  return 0;
}

static void send_rcpt(smtp_conn *c, smtp_txn *t, int i) {
  send_cmd(c, NULL, "RCPT TO:<%s>", t->rcpt[i].address);
  expect_reply(c, EXP_RCPT, t);
}

static void send_data_cmd(smtp_conn *c, smtp_txn *t) {
  send_cmd(c, NULL, "DATA");
  expect_reply(c, EXP_DATA, t);
}

static void start_txn(smtp_conn *c, smtp_txn *t) {
  char params[96] = "";
  int n = 0;
  if (c->caps.size_present) n += snprintf(params + n, sizeof params - (size_t)n, " SIZE=%zu", t->size);
  if (t->eightbit) n += snprintf(params + n, sizeof params - (size_t)n, " BODY=8BITMIME");
  if (t->utf8) snprintf(params + n, sizeof params - (size_t)n, " SMTPUTF8");
  t->phase = T_CMDS;
  send_cmd(c, NULL, "MAIL FROM:<%s>%s", t->from, params);
  expect_reply(c, EXP_MAIL, t);
  if (c->caps.pipelining) {              /* RFC 2920 §3.1: DATA may end the pipelined group */
    for (int i = 0; i < t->nrcpt; i++) send_rcpt(c, t, i);
    send_data_cmd(c, t);
  }
  arm_timer(c);
}

/* Start what can start: the oldest queued transaction, once no other one has commands out
 * (with PIPELINING, right behind the previous message's final dot; without, when the
 * session is quiet).  An idle session past its message quota is retired with QUIT. */
static void pump(smtp_conn *c) {
  while (c->state == ST_READY) {
    smtp_txn *next = NULL;
    int cmds_out = 0;
    for (int i = 0; i < c->nq; i++) {
      if (c->q[i]->phase == T_CMDS) cmds_out = 1;
      if (c->q[i]->phase == T_QUEUED && !next) next = c->q[i];
    }
    if (!next || cmds_out || (!c->caps.pipelining && exp_pending(c))) break;
    if (precheck(c, next) < 0) { txn_done(c, next); continue; }
    start_txn(c, next);
  }
  if (c->state != ST_READY || c->nq > 0 || exp_pending(c)) return;
  if (c->cfg->max_messages > 0 && c->messages >= c->cfg->max_messages) c->retiring = 1;
  if (c->retiring && c->op == OP_NONE) {
    set_state(c, ST_QUIT);
    send_cmd(c, NULL, "QUIT");
    arm_timer(c);
    return;
  }
  arm_ready_timer(c);
}

/* The transaction failed before its message went: report it, and reset the session. */
static void txn_failed(smtp_conn *c, smtp_txn *t) {
  send_cmd(c, NULL, "RSET");
  expect_reply(c, EXP_RSET, NULL);
  txn_done(c, t);
}

static void on_mail_reply(smtp_conn *c, smtp_txn *t, int ok) {
  t->mail_ok = ok;
  if (!ok) { reply_result(c, &t->res, "mail"); if (!c->caps.pipelining) txn_failed(c, t); }
  else if (!c->caps.pipelining) send_rcpt(c, t, 0);
}

static void on_rcpt_reply(smtp_conn *c, smtp_txn *t, int ok) {
  int i = t->rcpt_replied++;
  smtp_rcpt *r = &t->rcpt[i];
  r->code = c->reply.code;
  snprintf(r->enhanced, sizeof r->enhanced, "%s", c->reply.enhanced);
  free(r->text);
  r->text = strdup(c->reply.text);
  if (ok && t->mail_ok) t->res.accepted++;
  else if (t->mail_ok && t->res.stage == NULL) reply_result(c, &t->res, "rcpt");   /* first refusal */
  if (c->caps.pipelining) return;
  if (i + 1 < t->nrcpt) send_rcpt(c, t, i + 1);
  else if (t->res.accepted == 0) txn_failed(c, t);
  else send_data_cmd(c, t);
}

static void on_data_reply(smtp_conn *c, smtp_txn *t) {
  if (c->reply.code != 354) {
    if (t->mail_ok && t->res.accepted > 0) reply_result(c, &t->res, "data");
    txn_failed(c, t);
    return;
  }
  t->phase = T_BODY;
  if (t->mail_ok && t->res.accepted > 0) {
    trace(c, ">", "[message: %zu bytes]", t->data.len);
    send_raw(c, t->data.data, t->data.len);
  } else {
    /* RFC 2920 §3.1: a server may say 354 though every RCPT failed: send an empty message
     * end so the session stays in step, and report the earlier refusal */
    t->body_abort = 1;
    send_raw(c, ".\r\n", 3);
  }
  expect_reply(c, EXP_DOT, t);
  pump(c);          /* the next message's MAIL, RCPT, DATA go in the same write */
}

static void on_dot_reply(smtp_conn *c, smtp_txn *t) {
  if (!t->body_abort) {
    int ok = c->reply.code >= 200 && c->reply.code < 300;
    set_result(&t->res, ok ? SMTP_ERR_NONE : reply_kind(c), "message", c->reply.code, c->reply.enhanced,
               c->reply.text);
    t->res.ok = ok;
  }
  txn_done(c, t);
  pump(c);
}

static void on_txn_reply(smtp_conn *c) {
  if (!exp_pending(c)) {
    /* unsolicited: typically "421 idle timeout" before the server hangs up */
    trace(c, "--", "unsolicited reply while idle; closing");
    fail(c, reply_kind(c), "mail", NULL);
    return;
  }
  expect e = c->exp[c->exp_head++];
  int ok = c->reply.code >= 200 && c->reply.code < 400;
  switch (e.kind) {
  case EXP_MAIL: on_mail_reply(c, e.t, ok); break;
  case EXP_RCPT: on_rcpt_reply(c, e.t, ok); break;
  case EXP_DATA: on_data_reply(c, e.t); break;
  case EXP_DOT: on_dot_reply(c, e.t); break;
  case EXP_RSET:
    if (!ok) { fail(c, reply_kind(c), "rset", NULL); return; }
    pump(c);
    break;
  }
}

/* ---------------- replies ---------------- */

static void on_ehlo_reply(smtp_conn *c) {
  int code = c->reply.code;
  if (code >= 200 && code < 300) {
    c->ehlo_ok = 1;
    /* from every line as received: the reply's text may have been cut at 4 KiB */
    smtp_caps_parse_raw(c->raw, c->rawlen, &c->caps);
    if (c->cfg->pipeline_depth < 2) c->caps.pipelining = c->caps.pipelining && c->cfg->pipeline_depth >= 1;
    free(c->ehlo_text);
    c->ehlo_text = strdup(c->reply.text);
    after_ehlo(c);
  } else if (code >= 500 && code != 554 && !c->tls_on) {   /* an old server: fall back to HELO */
    set_state(c, ST_HELO);
    send_cmd(c, NULL, "HELO %s", c->cfg->helo);
  } else {
    fail(c, reply_kind(c), "ehlo", NULL);
  }
}

/* RFC 4954 §4: 235 ends AUTH PLAIN and LOGIN's password; 334 asks for LOGIN's user name, then password. */
static void on_auth_reply(smtp_conn *c) {
  int want = c->state == ST_AUTH_PLAIN || c->state == ST_AUTH_PASS ? 235 : 334;
  if (c->reply.code != want) { fail(c, reply_kind(c), "auth", NULL); return; }
  if (want == 235) {
    c->authenticated = 1;
    ready(c);
  } else if (c->state == ST_AUTH_LOGIN) {
    send_login_secret(c, c->cfg->user, ST_AUTH_USER);
  } else {
    send_login_secret(c, c->cfg->password ? c->cfg->password : "", ST_AUTH_PASS);
  }
}

static void on_reply(smtp_conn *c) {
  int code = c->reply.code;
  int ok2 = code >= 200 && code < 300;
  switch (c->state) {
  case ST_GREETING:
    if (code != 220) { fail(c, reply_kind(c), "greeting", NULL); return; }
    free(c->greeting);
    c->greeting = strdup(c->reply.text);
    send_ehlo(c);
    return;
  case ST_EHLO: on_ehlo_reply(c); return;
  case ST_HELO:
    if (!ok2) { fail(c, reply_kind(c), "helo", NULL); return; }
    c->ehlo_ok = 0;
    memset(&c->caps, 0, sizeof c->caps);
    after_ehlo(c);
    return;
  case ST_STARTTLS:
    if (code != 220) {
      if (c->cfg->tls == SMTP_TLS_OPPORTUNISTIC && code < 500 && code != 421) { start_auth(c); return; }
      fail(c, reply_kind(c), "starttls", NULL);
      return;
    }
    c->handshake_after_starttls = 1;
    start_handshake(c);
    return;
  case ST_AUTH_PLAIN: case ST_AUTH_LOGIN: case ST_AUTH_USER: case ST_AUTH_PASS: on_auth_reply(c); return;
  case ST_READY: on_txn_reply(c); return;
  case ST_QUIT: quit_done(c); return;
  default:
    fail(c, SMTP_ERR_PROTOCOL, stage_of(c), "unexpected reply in state %s", state_names[c->state]);
    return;
  }
}

/* 421 (RFC 5321 §3.8) in any state: the server is closing the channel. */
static int closing_reply(smtp_conn *c) {
  if (c->reply.code != 421 || c->state == ST_QUIT) return 0;
  fail(c, reply_kind(c), stage_of(c), NULL);
  return 1;
}

/* Handles the complete replies in c->in; returns how many (0: only part of one has come). */
static int process_input(smtp_conn *c) {
  size_t off = 0;
  int replies = 0;
  char err[160];
  while (off < c->inlen && c->state != ST_DEAD && !c->free_pending) {
    int r = smtp_reply_parse(c->in + off, c->inlen - off, c->caps.enhancedstatuscodes, &c->reply, err, sizeof err);
    if (r == 0) break;
    if (r < 0) { fail(c, SMTP_ERR_PROTOCOL, stage_of(c), "protocol error: %s", err); return replies; }
    c->raw = c->in + off;
    c->rawlen = (size_t)r;
    trace_reply(c, c->raw, c->rawlen);
    off += (size_t)r;
    replies++;
    if (closing_reply(c)) return replies;
    smtp_state before = c->state;
    on_reply(c);
    if (before == ST_STARTTLS && c->state == ST_HANDSHAKE) {
      /* CVE-2011-0411: bytes after the STARTTLS reply were sent in plaintext before TLS and
       * must never be read as replies inside the TLS session */
      if (off < c->inlen) trace(c, "--", "discarded %zu bytes sent before the TLS handshake", c->inlen - off);
      c->inlen = 0;
      return replies;
    }
  }
  if (c->state == ST_DEAD) return replies;
  memmove(c->in, c->in + off, c->inlen - off);
  c->inlen -= off;
  return replies;
}

static void read_input(smtp_conn *c) {
  for (;;) {
    if (c->inlen == IN_MAX) { fail(c, SMTP_ERR_PROTOCOL, stage_of(c), "protocol error: reply too long"); return; }
    int want = 0;
    ssize_t n = net_read(&c->s, c->in + c->inlen, IN_MAX - c->inlen, &want);
    if (n == NET_AGAIN) return;
    if (n == NET_EOF || n == NET_ERR) {
      if (c->state == ST_READY && !exp_pending(c) && c->nq == 0) { close_socket(c); return; }   /* idle: fine */
      if (c->state == ST_QUIT) { quit_done(c); return; }
      if (n == NET_EOF)
        fail(c, SMTP_ERR_CLOSED, stage_of(c), "connection closed by the server while waiting for the %s reply",
             stage_of(c));
      else
        fail(c, SMTP_ERR_CLOSED, stage_of(c), "connection lost while waiting for the %s reply: %s", stage_of(c),
             c->s.err);
      return;
    }
    size_t space = IN_MAX - c->inlen;
    c->inlen += (size_t)n;
    int replies = process_input(c);
    if (c->state == ST_DEAD || c->free_pending || c->state == ST_HANDSHAKE) return;
    /* A wait's timeout counts from its start: only a complete reply starts the next wait with a
     * full timeout.  Part of a reply restarts nothing, or a server dripping a byte a second would
     * hold the session for ever against a timeout of seconds. */
    if (replies > 0) {
      if (c->state == ST_READY) arm_ready_timer(c);
      else arm_timer(c);
    }
    /* a short read drained the socket (epoll is level-triggered, so anything that arrives
     * later wakes us again): skip the read() that would only say EAGAIN */
    if ((size_t)n < space && (!c->s.ssl || SSL_pending(c->s.ssl) == 0)) return;
  }
}

static void flush(smtp_conn *c) {
  while (c->out_off < c->out.len) {
    int want = 0;
    ssize_t n = net_write(&c->s, c->out.data + c->out_off, c->out.len - c->out_off, &want);
    if (n == NET_AGAIN) break;
    if (n <= 0) {
      fail(c, SMTP_ERR_CLOSED, stage_of(c), "connection lost while sending: %s", n == 0 ? "closed" : c->s.err);
      return;
    }
    c->out_off += (size_t)n;
  }
  if (c->out_off == c->out.len) { c->out.len = 0; c->out_off = 0; }
}

static void on_io(loop *l, int fd, int events, void *data) {
  smtp_conn *c = data;
  enter(c);
  if (c->state == ST_CONNECT) on_connected(c);
  else if (c->state != ST_HANDSHAKE) {
    if (c->out_off < c->out.len) flush(c);
    if (c->state != ST_DEAD && !c->free_pending) read_input(c);
  }
  if (c->state == ST_HANDSHAKE && !c->free_pending) on_handshake(c);
  /* Write what the replies just released (the next message's body, the commands of the one
   * queued behind it) now, before the loop resumes any Lua task: on a single session the
   * round trip is the bottleneck, and the tasks' work can overlap the server's. */
  if (can_write(c) && !c->free_pending && c->out_off < c->out.len) {
    loop_cancel_deferred(c->loop, &c->flusher);
    flush(c);
  }
  if (leave(c)) return;
  if (c->state != ST_HANDSHAKE) update_watch(c);
}

static void on_timeout(loop *l, void *data) {
  smtp_conn *c = data;
  enter(c);
  const char *st = stage_of(c);
  if (c->state == ST_QUIT) quit_done(c);
  else if (c->state == ST_READY && !exp_pending(c) && c->nq == 0) {
    c->retiring = 1;                 /* idle too long: say goodbye */
    pump(c);
    flush(c);
    if (c->state != ST_DEAD) update_watch(c);
  }
  else {
    int ms = wait_ms(c);
    if (c->inlen > 0 && c->state != ST_CONNECT && c->state != ST_HANDSHAKE)
      fail(c, SMTP_ERR_TIMEOUT, st, "timed out after %g s waiting for the %s reply (%zu bytes of it came; a reply "
                                    "must be complete within the timeout)", ms / 1000.0, st, c->inlen);
    else
      fail(c, SMTP_ERR_TIMEOUT, st, "timed out after %g s waiting for the %s reply", ms / 1000.0, st);
  }
  leave(c);
}

/* ---------------- public ---------------- */

smtp_conn *smtp_conn_new(loop *lp, const smtp_config *cfg) {
  smtp_conn *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->in = malloc(IN_MAX);
  if (!c->in) { free(c); return NULL; }
  c->loop = lp;
  c->cfg = cfg;
  c->id = ++session_seq;
  c->s.fd = -1;
  loop_timer_init(&c->timer, on_timeout, c);
  c->flusher.fn = deferred_flush;
  c->flusher.data = c;
  return c;
}

void smtp_conn_free(smtp_conn *c) {
  if (!c) return;
  /* Freed from inside one of its own callbacks (a relay dropping a dead session): the
   * transactions it still holds get their callbacks all the same (fail_all is delivering
   * them); only the open/quit operation is forgotten. */
  dns_lookup_cancel(c->lookup);   /* a lookup in flight no longer calls us back */
  c->lookup = NULL;
  if (c->busy) { c->free_pending = 1; c->fn = NULL; return; }
  close_socket(c);
  free(c->addrs);
  bytebuf_free(&c->out);
  free(c->exp);
  free(c->in);
  free(c->greeting);
  free(c->ehlo_text);
  free(c);
}

static int begin(smtp_conn *c, int op, smtp_done_fn *fn, void *ud) {
  if (c->op != OP_NONE) return -1;
  c->op = op;
  c->fn = fn;
  c->ud = ud;
  smtp_result_clear(&c->res);
  return 0;
}

static const char *connect_target(const smtp_conn *c) {
  return c->cfg->connect_addr[0] ? c->cfg->connect_addr : c->cfg->host;
}

/* The host name's addresses are known (or not): connect to them in turn. */
static void on_resolved(void *ud, dns_status st, const char *msg, const dns_addr *addrs, int n) {
  smtp_conn *c = ud;
  c->lookup = NULL;
  enter(c);
  if (st != DNS_OK || n < 1) {
    /* temporary whatever the answer: the relay's name is our configuration, not the recipient's */
    fail(c, SMTP_ERR_DNS, "connect", "cannot resolve %s: %s", connect_target(c), msg);
  } else if (!(c->addrs = malloc((size_t)n * sizeof *addrs))) {
    fail(c, SMTP_ERR_INTERNAL, "connect", "out of memory");
  } else {
    memcpy(c->addrs, addrs, (size_t)n * sizeof *addrs);
    c->naddrs = n;
    c->next_addr = 0;
    try_connect(c);
  }
  leave(c);
}

/* An IP address is used as it is; a name is looked up on the loop (never getaddrinfo, which
 * would block every other session while the DNS server takes its time). */
static void open_connection(smtp_conn *c) {
  const char *target = connect_target(c);
  dns_addr a;
  if (c->lookup || c->addrs) return;   /* already under way */
  if (net_numeric_addr(target, c->cfg->port, &a.ss, &a.len) == 0) {
    on_resolved(c, DNS_OK, "", &a, 1);
    return;
  }
  if (!c->cfg->resolver) {
    fail(c, SMTP_ERR_DNS, "connect", "cannot resolve %s: no resolver", target);
    return;
  }
  c->lookup = dns_resolve(c->cfg->resolver, target, c->cfg->port, on_resolved, c);
}

/* A public call's work, inside the re-entrancy guard; then what it queued is written this turn. */
static void guarded(smtp_conn *c, void (*work)(smtp_conn *)) {
  enter(c);
  work(c);
  if (!leave(c) && can_write(c)) want_flush(c);
}

int smtp_conn_open(smtp_conn *c, smtp_done_fn *fn, void *ud) {
  if (c->state != ST_NEW || begin(c, OP_OPEN, fn, ud) < 0) return -1;
  guarded(c, open_connection);
  return 0;
}

int smtp_conn_can_take(const smtp_conn *c) {
  if (c->op != OP_NONE || c->retiring || c->nq >= PIPE_MAX) return 0;
  if (c->cfg->max_messages > 0 && c->messages + c->nq >= c->cfg->max_messages) return 0;
  if (c->state == ST_READY) {
    int depth = c->caps.pipelining ? (c->cfg->pipeline_depth > 0 ? c->cfg->pipeline_depth : 1) : 1;
    return c->nq < depth;
  }
  return c->state != ST_DEAD && c->state != ST_QUIT && c->nq == 0;   /* opening: one waits for it */
}

int smtp_conn_send(smtp_conn *c, smtp_txn *t, smtp_txn_fn *fn, void *ud) {
  if (!smtp_conn_can_take(c)) return -1;
  smtp_result_clear(&t->res);
  t->phase = T_QUEUED;
  t->mail_ok = t->rcpt_replied = t->body_abort = 0;
  for (int i = 0; i < t->nrcpt; i++) { free(t->rcpt[i].text); t->rcpt[i].text = NULL; t->rcpt[i].code = 0; }
  t->fn = fn;
  t->ud = ud;
  c->q[c->nq++] = t;
  if (c->state == ST_NEW) guarded(c, open_connection);
  else if (c->state == ST_READY) guarded(c, pump);
  return 0;
}

int smtp_conn_quit(smtp_conn *c, smtp_done_fn *fn, void *ud) {
  if (c->state != ST_READY || c->nq > 0 || exp_pending(c) || begin(c, OP_QUIT, fn, ud) < 0) return -1;
  set_state(c, ST_QUIT);
  send_cmd(c, NULL, "QUIT");
  arm_timer(c);
  flush(c);
  if (c->state != ST_DEAD) update_watch(c);
  return 0;
}

int smtp_conn_ready(const smtp_conn *c) {
  return c->state == ST_READY && c->op == OP_NONE && c->nq == 0 && !exp_pending(c) && !c->retiring;
}
int smtp_conn_dead(const smtp_conn *c) { return c->state == ST_DEAD; }
const smtp_result *smtp_conn_result(const smtp_conn *c) { return &c->res; }

void smtp_conn_info(smtp_conn *c, smtp_info *info) {
  memset(info, 0, sizeof *info);
  info->greeting = c->greeting;
  info->caps = &c->caps;
  info->ehlo = c->ehlo_ok;
  info->ehlo_text = c->ehlo_text;
  info->tls = c->tls_on;
  info->tls_verified = c->tls_on && c->tls_verified;
  if (c->tls_on) {
    snprintf(info->tls_version, sizeof info->tls_version, "%s", c->tls_version);
    snprintf(info->tls_cipher, sizeof info->tls_cipher, "%s", c->tls_cipher);
    snprintf(info->tls_subject, sizeof info->tls_subject, "%s", c->tls_subject);
  }
  info->authenticated = c->authenticated;
  info->auth_mech = c->auth_mech;
  snprintf(info->peer, sizeof info->peer, "%s", c->peer);
  info->messages = c->messages;
}
