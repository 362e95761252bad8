/* redis.c - a Redis connection on our loop, hiredis for the wire format only.  See redis.h.
 *
 * Shape: RS_RESOLVE -> RS_CONNECT (each address in turn) -> RS_HANDSHAKE (TLS) -> RS_READY ->
 * RS_DEAD.  Once ready, requests wait in a FIFO (head .. tail) for their replies; what they
 * carry is appended to `out` and written once per turn of the loop (the deferred flush).  One
 * timer serves every deadline: the connect's while connecting, then the requests': it is armed
 * for the earliest one it knows of and, when it fires, finds the late request if there is one. */
#include "redis.h"
#include "net.h"
#include "tls.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <hiredis/read.h>

enum { RS_NEW, RS_RESOLVE, RS_CONNECT, RS_HANDSHAKE, RS_READY, RS_DEAD };

#define READ_CHUNK 65536

struct redis_conn {
  loop *loop;
  redis_config cfg;
  int state;
  net_stream s;
  int watched;
  int read_wants_write;         /* TLS: SSL_read asked for writability (a renegotiation, a key update) */
  redisReader *reader;
  bytebuf out;                  /* encoded commands not yet written: out.data[out_off .. out.len) */
  size_t out_off;
  redis_req *head, *tail;       /* requests awaiting replies, oldest first */
  size_t npending;
  redis_stats stats;
  loop_timer timer;
  loop_deferred flusher;
  dns_lookup *lookup;
  dns_addr *addrs;
  int naddrs, next_addr;
  redis_open_fn *open_fn;
  void *open_ud;
  int busy, free_pending;
  char name[280];               /* HOST:PORT */
  char connect_err[256];
  char err[700];                /* "redis HOST:PORT: why" once dead */
};

static void on_io(loop *l, int fd, int events, void *data);

/* ---------------- re-entrancy ---------------- */

/* Every entry point (loop callbacks, public calls that call back) runs between enter() and leave():
 * a callback that frees the connection only marks it, and leave() frees it (returning 1). */
static void enter(redis_conn *c) { c->busy++; }
static void conn_destroy(redis_conn *c);
static int leave(redis_conn *c) {
  if (--c->busy > 0 || !c->free_pending) return 0;
  conn_destroy(c);
  return 1;
}

/* ---------------- requests ---------------- */

static redis_req *pop_head(redis_conn *c) {
  redis_req *q = c->head;
  if (q) {
    c->head = q->next;
    if (!c->head) c->tail = NULL;
    q->next = NULL;
    c->npending--;
  }
  return q;
}

/* Tell q how it ended.  Its replies are taken out of it first: the callback may free q. */
static void complete(redis_req *q, int status, const char *err) {
  redisReply *one = q->one, **many = q->many;
  int n = q->n, got = q->got;
  redisReply **replies = n == 1 ? &one : many;
  q->one = NULL;
  q->many = NULL;
  if (status != REDIS_DONE_OK) {
    for (int i = 0; i < got; i++) freeReplyObject(replies[i]);
    if (n != 1) free(many);
    q->fn(q, status, NULL, 0, err);
    return;
  }
  q->fn(q, status, replies, n, NULL);
  for (int i = 0; i < n; i++) freeReplyObject(replies[i]);
  if (n != 1) free(many);
}

/* ---------------- dying ---------------- */

static void close_socket(redis_conn *c) {
  if (c->s.fd >= 0 && c->watched) loop_unwatch(c->loop, c->s.fd);
  c->watched = 0;
  net_close(&c->s);
}

/* "Connection refused" -> "connection refused": the reason reads as part of our sentence. */
static void lower_first(char *s) {
  if (s[0] && isupper((unsigned char)s[0]) && !isupper((unsigned char)s[1])) s[0] = (char)tolower((unsigned char)s[0]);
}

/* The connection ends here, for the reason given: the open (if it was under way) and every pending
 * request learn it, and every later send is refused with it. */
static void die(redis_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void die(redis_conn *c, const char *fmt, ...) {
  if (c->state == RS_DEAD) return;
  char why[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  lower_first(why);
  snprintf(c->err, sizeof c->err, "redis %s: %s", c->name, why);
  c->state = RS_DEAD;
  dns_lookup_cancel(c->lookup);
  c->lookup = NULL;
  loop_timer_stop(c->loop, &c->timer);
  loop_cancel_deferred(c->loop, &c->flusher);
  close_socket(c);
  bytebuf_free(&c->out);
  c->out_off = 0;
  enter(c);
  if (c->open_fn) {
    redis_open_fn *fn = c->open_fn;
    c->open_fn = NULL;
    fn(c->open_ud, c->err);
  }
  /* detached first: a callback that sends again finds the connection dead, not this list */
  redis_req *q = c->head;
  c->head = c->tail = NULL;
  c->npending = 0;
  while (q) {
    redis_req *next = q->next;
    q->next = NULL;
    complete(q, REDIS_DONE_FAIL, c->err);
    q = next;
  }
  leave(c);
}

/* ---------------- timer ---------------- */

static void arm_at(redis_conn *c, uint64_t deadline) {
  uint64_t now = loop_clock_ms();
  loop_timer_start(c->loop, &c->timer, deadline > now ? deadline - now : 0);
}

static void on_timer(loop *l, void *data) {
  redis_conn *c = data;
  enter(c);
  if (c->state != RS_READY) {
    die(c, "timeout: not connected within %g s%s", c->cfg.connect_timeout_ms / 1000.0,
        c->state == RS_HANDSHAKE ? " (TLS handshake)" : "");
  } else {
    /* a request past its deadline kills the connection: its reply, when it comes, could no longer
     * be told apart from the next request's */
    uint64_t now = loop_clock_ms(), next = 0;
    for (redis_req *q = c->head; q; q = q->next) {
      if (!q->deadline) continue;
      if (q->deadline <= now) {
        die(c, "timeout: no reply within %g s", q->timeout_ms / 1000.0);
        break;
      }
      if (!next || q->deadline < next) next = q->deadline;
    }
    if (c->state == RS_READY && next) arm_at(c, next);
  }
  leave(c);
}

/* ---------------- writing ---------------- */

static void update_watch(redis_conn *c) {
  if (c->s.fd < 0) return;
  int mask;
  if (c->state == RS_CONNECT) mask = LOOP_WRITE;
  else if (c->state == RS_HANDSHAKE) return;              /* the handshake sets its own */
  else {
    mask = LOOP_READ;
    /* writability only for what a write left over, not for what the deferred flush will write
     * before the next poll anyway */
    if ((c->out_off < c->out.len && !c->flusher.queued) || c->read_wants_write) mask |= LOOP_WRITE;
  }
  if (loop_watch(c->loop, c->s.fd, mask, on_io, c) < 0) { die(c, "epoll: %s", strerror(errno)); return; }
  c->watched = 1;
}

/* Write what is queued until done or the socket is full. */
static void flush(redis_conn *c) {
  while (c->state == RS_READY && c->out_off < c->out.len) {
    int want = 0;
    ssize_t n = net_write(&c->s, c->out.data + c->out_off, c->out.len - c->out_off, &want);
    if (n == NET_AGAIN) break;
    if (n <= 0) { die(c, "write: %s", n == NET_EOF ? "connection closed by the server" : c->s.err); return; }
    c->out_off += (size_t)n;
    c->stats.writes++;
  }
  if (c->state == RS_READY && c->out_off == c->out.len) {
    c->out_off = 0;
    c->out.len = 0;
    if (c->out.cap > 1 << 20) bytebuf_free(&c->out);   /* a 10 MB value does not stay allocated */
  }
}

static void deferred_flush(loop *l, void *data) {
  redis_conn *c = data;
  if (c->state != RS_READY) return;
  enter(c);
  flush(c);
  if (c->state == RS_READY) update_watch(c);
  leave(c);
}

int redis_format(bytebuf *out, int argc, const char **argv, const size_t *argvlen) {
  char *cmd = NULL;
  int n = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
  if (n < 0 || !cmd) return -1;
  int r = bytebuf_append(out, cmd, (size_t)n);
  redisFreeCommand(cmd);
  return r;
}

int redis_conn_send(redis_conn *c, redis_req *q, const char *cmd, size_t len) {
  if (c->state != RS_READY) return -1;
  q->next = NULL;
  q->got = 0;
  q->one = NULL;
  q->many = NULL;
  if (q->n < 1) return -2;
  q->deadline = q->timeout_ms > 0 ? loop_clock_ms() + (uint64_t)q->timeout_ms : 0;
  if (q->n > 1 && !(q->many = calloc((size_t)q->n, sizeof *q->many))) return -2;
  if (bytebuf_append(&c->out, cmd, len) < 0) { free(q->many); q->many = NULL; return -2; }
  if (c->tail) c->tail->next = q; else c->head = q;
  c->tail = q;
  c->npending++;
  c->stats.requests++;
  c->stats.commands += (unsigned long)q->n;
  if (q->deadline && (!loop_timer_armed(&c->timer) || q->deadline < c->timer.when)) arm_at(c, q->deadline);
  loop_defer(c->loop, &c->flusher);
  return 0;
}

/* ---------------- reading ---------------- */

/* One reply parsed: it answers the oldest request. */
static void on_reply(redis_conn *c, redisReply *r) {
  redis_req *q = c->head;
  if (!q) {
    freeReplyObject(r);
    die(c, "protocol error: a reply to no command (subscribe and monitor modes are not supported)");
    return;
  }
  if (q->n == 1) q->one = r; else q->many[q->got] = r;
  if (++q->got < q->n) return;
  pop_head(c);
  complete(q, REDIS_DONE_OK, NULL);
  if (!c->head) loop_timer_stop(c->loop, &c->timer);
}

static void read_input(redis_conn *c) {
  char buf[READ_CHUNK];
  c->read_wants_write = 0;
  /* a callback may free the connection: then the rest is cancelled, not delivered */
  while (c->state == RS_READY && !c->free_pending) {
    int want = 0;
    ssize_t n = net_read(&c->s, buf, sizeof buf, &want);
    if (n == NET_AGAIN) { c->read_wants_write = want == LOOP_WRITE; return; }
    if (n == NET_EOF) { die(c, "connection closed by the server"); return; }
    if (n < 0) { die(c, "read: %s", c->s.err); return; }
    if (redisReaderFeed(c->reader, buf, (size_t)n) != REDIS_OK) { die(c, "out of memory"); return; }
    while (c->state == RS_READY && !c->free_pending) {
      void *reply = NULL;
      if (redisReaderGetReply(c->reader, &reply) != REDIS_OK) {
        die(c, "protocol error: %s", c->reader->errstr);
        return;
      }
      if (!reply) break;
      on_reply(c, reply);
    }
    /* a plain socket that gave less than asked for is empty now: the loop (level-triggered) calls
     * again when more comes, and a read that only says EAGAIN is one system call saved per turn.
     * TLS gives one record at a time, so a short read says nothing there. */
    if (!c->s.ssl && (size_t)n < sizeof buf) return;
  }
}

/* ---------------- connecting ---------------- */

static void ready(redis_conn *c) {
  c->state = RS_READY;
  loop_timer_stop(c->loop, &c->timer);
  update_watch(c);
  if (c->state != RS_READY) return;
  redis_open_fn *fn = c->open_fn;
  c->open_fn = NULL;
  if (fn) fn(c->open_ud, NULL);
}

static void try_connect(redis_conn *c);

static void handshake(redis_conn *c) {
  int want = 0;
  int r = tls_handshake(&c->s, &want);
  if (r == NET_AGAIN) {
    if (loop_watch(c->loop, c->s.fd, want == LOOP_WRITE ? LOOP_WRITE : LOOP_READ, on_io, c) < 0)
      die(c, "epoll: %s", strerror(errno));
    return;
  }
  if (r < 0) { die(c, "%s", c->s.err); return; }
  ready(c);
}

static void on_connected(redis_conn *c) {
  if (net_connect_finish(c->s.fd, c->connect_err, sizeof c->connect_err) < 0) {
    close_socket(c);
    try_connect(c);                     /* the next address, if any */
    return;
  }
  if (!c->cfg.ssl_ctx) { ready(c); return; }
  const char *name = c->cfg.server_name[0] ? c->cfg.server_name : c->cfg.host;
  if (tls_begin(&c->s, c->cfg.ssl_ctx, name, c->cfg.verify) < 0) { die(c, "%s", c->s.err); return; }
  c->state = RS_HANDSHAKE;
  handshake(c);
}

static void try_connect(redis_conn *c) {
  while (c->next_addr < c->naddrs) {
    const dns_addr *a = &c->addrs[c->next_addr++];
    int fd = net_connect_start((const struct sockaddr *)&a->ss, a->len, NULL, c->connect_err, sizeof c->connect_err);
    if (fd < 0) continue;
    c->s.fd = fd;
    c->state = RS_CONNECT;
    update_watch(c);
    return;
  }
  die(c, "%s", c->connect_err[0] ? c->connect_err : "no address to connect to");
}

static void on_resolved(void *ud, dns_status st, const char *msg, const dns_addr *addrs, int n) {
  redis_conn *c = ud;
  c->lookup = NULL;
  enter(c);
  if (st != DNS_OK || n < 1) die(c, "cannot resolve %s: %s", c->cfg.host, msg);
  else if (!(c->addrs = malloc((size_t)n * sizeof *addrs))) die(c, "out of memory");
  else {
    memcpy(c->addrs, addrs, (size_t)n * sizeof *addrs);
    c->naddrs = n;
    c->next_addr = 0;
    try_connect(c);
  }
  leave(c);
}

static void on_io(loop *l, int fd, int events, void *data) {
  redis_conn *c = data;
  enter(c);
  switch (c->state) {
  case RS_CONNECT: on_connected(c); break;
  case RS_HANDSHAKE: handshake(c); break;
  case RS_READY:
    read_input(c);
    if (c->state == RS_READY && c->out_off < c->out.len) flush(c);
    if (c->state == RS_READY) update_watch(c);
    break;
  default: break;
  }
  leave(c);
}

int redis_conn_open(redis_conn *c, redis_open_fn *fn, void *ud) {
  if (c->state != RS_NEW) return -1;
  c->open_fn = fn;
  c->open_ud = ud;
  c->state = RS_RESOLVE;
  enter(c);
  if (c->cfg.connect_timeout_ms > 0) loop_timer_start(c->loop, &c->timer, (uint64_t)c->cfg.connect_timeout_ms);
  dns_addr a;
  if (net_numeric_addr(c->cfg.host, c->cfg.port, &a.ss, &a.len) == 0) on_resolved(c, DNS_OK, "", &a, 1);
  else if (!c->cfg.resolver) die(c, "cannot resolve %s: no resolver", c->cfg.host);
  else c->lookup = dns_resolve(c->cfg.resolver, c->cfg.host, c->cfg.port, on_resolved, c);
  leave(c);
  return 0;
}

/* ---------------- life cycle ---------------- */

redis_conn *redis_conn_new(loop *lp, const redis_config *cfg) {
  redis_conn *c = calloc(1, sizeof *c);
  redisReader *rd = redisReaderCreate();
  if (!c || !rd) {
    free(c);
    if (rd) redisReaderFree(rd);
    if (cfg->ssl_ctx) SSL_CTX_free(cfg->ssl_ctx);
    dns_resolver_free(cfg->resolver);
    return NULL;
  }
  c->loop = lp;
  c->cfg = *cfg;
  c->reader = rd;
  c->s.fd = -1;
  c->state = RS_NEW;
  snprintf(c->name, sizeof c->name, strchr(cfg->host, ':') ? "[%s]:%s" : "%s:%s", cfg->host, cfg->port);
  loop_timer_init(&c->timer, on_timer, c);
  c->flusher.fn = deferred_flush;
  c->flusher.data = c;
  return c;
}

void redis_conn_close(redis_conn *c, const char *why) {
  if (c) die(c, "%s", why);
}

static void conn_destroy(redis_conn *c) {
  dns_lookup_cancel(c->lookup);
  c->lookup = NULL;
  loop_timer_stop(c->loop, &c->timer);
  loop_cancel_deferred(c->loop, &c->flusher);
  close_socket(c);
  redis_req *q = c->head;
  c->head = c->tail = NULL;
  while (q) {
    redis_req *next = q->next;
    q->next = NULL;
    complete(q, REDIS_DONE_CANCEL, NULL);
    q = next;
  }
  bytebuf_free(&c->out);
  redisReaderFree(c->reader);
  free(c->addrs);
  if (c->cfg.ssl_ctx) SSL_CTX_free(c->cfg.ssl_ctx);
  dns_resolver_free(c->cfg.resolver);   /* after cancelling the lookup */
  free(c);
}

void redis_conn_free(redis_conn *c) {
  if (!c) return;
  c->open_fn = NULL;
  if (c->busy) { c->free_pending = 1; return; }
  conn_destroy(c);
}

int redis_conn_dead(const redis_conn *c) { return c->state == RS_DEAD; }
int redis_conn_ready(const redis_conn *c) { return c->state == RS_READY; }
const char *redis_conn_error(const redis_conn *c) { return c->err[0] ? c->err : "not connected"; }
const char *redis_conn_name(const redis_conn *c) { return c->name; }
size_t redis_conn_pending(const redis_conn *c) { return c->npending; }
void redis_conn_stats(const redis_conn *c, redis_stats *st) { *st = c->stats; }
