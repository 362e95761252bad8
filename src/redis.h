/* redis.h - one connection to a Redis (or Valkey) server on our event loop: connect (a name is
 * resolved on the loop), TLS when asked, then requests queued and answered in order.
 *
 * hiredis does only the wire format here (redisFormatCommandArgv encodes, its redisReader parses):
 * its own clients block or bring their own event glue and, in Debian's 0.14, have no TLS.  The I/O
 * is ours: net.h streams (plain or TLS), loop fd watches, one loop timer and one deferred flush.
 *
 * Pipelining: every request sent during one turn of the loop goes out in one write (loop_defer),
 * and since Redis answers in order, replies are matched to requests first in, first out.  A
 * request may carry several commands (a pipeline): it completes once all its replies are in.
 *
 * Failure: a transport error, a protocol error, EOF or a request past its deadline kills the
 * connection; every pending request then completes with REDIS_DONE_FAIL and the reason, and every
 * later send is refused at once.  There is no reconnection: the caller decides. */
#ifndef MAILSHOT_REDIS_H
#define MAILSHOT_REDIS_H
#include <stddef.h>
#include <stdint.h>
#include <hiredis/hiredis.h>
#include <openssl/ssl.h>

#include "bytebuf.h"
#include "dns.h"
#include "loop.h"

typedef struct redis_conn redis_conn;
typedef struct redis_req redis_req;

enum {
  REDIS_DONE_OK,       /* every reply is in (an error reply is a reply: the connection lives on) */
  REDIS_DONE_FAIL,     /* the connection died first: err says why */
  REDIS_DONE_CANCEL    /* the connection is being freed: nobody is to be told */
};

/* Called once per request.  replies[0..n) (REDIS_DONE_OK only) belong to the connection and are
 * freed when the callback returns.  The callback may free q (it owns it) and may send more. */
typedef void redis_done_fn(redis_req *q, int status, redisReply **replies, int n, const char *err);

/* A request, owned by the caller (embedded in whatever waits for it); the caller sets n, fn, ud
 * and timeout_ms; the rest is the connection's. */
struct redis_req {
  redis_req *next;
  redis_done_fn *fn;
  void *ud;
  int n;                  /* commands in it: replies expected */
  int got;
  redisReply *one;        /* the reply of a single command */
  redisReply **many;      /* the replies of a pipeline (n > 1) */
  int timeout_ms;         /* from the send to the last reply; 0 = none */
  uint64_t deadline;      /* absolute, loop_clock_ms() */
};

typedef struct redis_config {
  char host[256];         /* IP literal or name */
  char port[8];
  char server_name[256];  /* for TLS: the name sent as SNI and checked (default host) */
  SSL_CTX *ssl_ctx;       /* NULL: plain TCP.  The connection takes ownership. */
  int verify;
  dns_resolver *resolver; /* for a host name (NULL for an IP literal).  The connection takes ownership. */
  int connect_timeout_ms; /* TCP connect and TLS handshake together */
} redis_config;

/* Called once when the connection is up (err NULL) or could not be made (err set). */
typedef void redis_open_fn(void *ud, const char *err);

/* A new connection with cfg (copied; its ssl_ctx and resolver now belong to the connection, even
 * when this fails).  NULL: out of memory. */
redis_conn *redis_conn_new(loop *lp, const redis_config *cfg);
/* Start connecting; fn may run before this returns. -1: already started. */
int  redis_conn_open(redis_conn *c, redis_open_fn *fn, void *ud);
/* Queue q, whose q->n commands are encoded in cmd[0..len), to be written this turn of the loop.
 * 0 queued; -1 the connection is not up (dead, or not connected): q was not queued, see
 * redis_conn_error; -2 out of memory. */
int  redis_conn_send(redis_conn *c, redis_req *q, const char *cmd, size_t len);
/* Kill the connection now, why ("closed by the client") as the reason pending requests get. */
void redis_conn_close(redis_conn *c, const char *why);
/* Close and free.  Pending requests complete with REDIS_DONE_CANCEL; a pending open's callback
 * does not run.  Safe from inside a callback (the free then happens on the way out). */
void redis_conn_free(redis_conn *c);

int  redis_conn_dead(const redis_conn *c);
int  redis_conn_ready(const redis_conn *c);
const char *redis_conn_error(const redis_conn *c);  /* "redis HOST:PORT: why" once dead */
const char *redis_conn_name(const redis_conn *c);   /* "HOST:PORT" ("[v6]:PORT") */
size_t redis_conn_pending(const redis_conn *c);     /* requests awaiting replies */

/* What went through the connection: requests sent, commands in them, write calls that carried
 * them (far fewer than requests when many tasks share the connection: the auto-pipelining). */
typedef struct { unsigned long requests, commands, writes; } redis_stats;
void redis_conn_stats(const redis_conn *c, redis_stats *st);

/* Append one command (argc arguments, binary-safe) in Redis's wire format (RESP) to out.
 * 0 ok, -1 out of memory (out unchanged). */
int  redis_format(bytebuf *out, int argc, const char **argv, const size_t *argvlen);

#endif
