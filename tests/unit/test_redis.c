/* test_redis.c - the Redis connection (src/redis.c) against a TCP peer this test plays itself, for
 * what a well-behaved redis-server never sends: replies cut anywhere across reads, a reply to no
 * command, a malformed reply, a peer that closes or goes silent; and the connection freed with
 * requests pending, or from inside a request's own callback.  The real server's behaviour is in
 * tests/integration/test_redis.py. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "loop.h"
#include "redis.h"

static const char PING[] = "*1\r\n$4\r\nPING\r\n";

typedef struct {
  redis_req q;
  int status, done, n;
  char text[4][64];        /* the replies' strings (or the error) */
  long long ints[4];
  int types[4];
  int free_conn;           /* free the connection from inside the callback */
} req;

static loop *L;
static redis_conn *conn;
static int opened;
static char open_err[700];

static void stop(loop *l, void *data) { (void)data; loop_stop(l); }

/* Run the loop for ms (or until a callback stops it). */
static void run_for(int ms) {
  loop_timer t;
  loop_timer_init(&t, stop, NULL);
  loop_timer_start(L, &t, (uint64_t)ms);
  loop_run(L);
  loop_timer_stop(L, &t);
}

static void on_done(redis_req *q, int status, redisReply **replies, int n, const char *err) {
  req *r = q->ud;
  r->status = status;
  r->done++;
  r->n = n;
  if (err) snprintf(r->text[0], sizeof r->text[0], "%s", err);
  for (int i = 0; i < n && i < 4; i++) {
    r->types[i] = replies[i]->type;
    r->ints[i] = replies[i]->integer;
    if (replies[i]->str) snprintf(r->text[i], sizeof r->text[i], "%.*s", (int)replies[i]->len, replies[i]->str);
  }
  if (r->free_conn) { redis_conn_free(conn); conn = NULL; }
  loop_stop(L);
}

static void on_open(void *ud, const char *err) {
  (void)ud;
  opened = 1;
  snprintf(open_err, sizeof open_err, "%s", err ? err : "");
  loop_stop(L);
}

/* A listening socket on 127.0.0.1; its port in *port. */
static int listener(int *port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
  socklen_t len = sizeof a;
  if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 4) < 0
      || getsockname(fd, (struct sockaddr *)&a, &len) < 0) { perror("listener"); exit(2); }
  *port = ntohs(a.sin_port);
  return fd;
}

/* A connection to a fresh listener, opened; the peer's side of it in *peer. */
static void connect_pair(int *peer) {
  int port;
  int lst = listener(&port);
  redis_config cfg = { .connect_timeout_ms = 2000 };
  snprintf(cfg.host, sizeof cfg.host, "127.0.0.1");
  snprintf(cfg.port, sizeof cfg.port, "%d", port);
  conn = redis_conn_new(L, &cfg);
  opened = 0;
  CHECK_INT(redis_conn_open(conn, on_open, NULL), 0);
  *peer = accept(lst, NULL, NULL);      /* the kernel completed the handshake already */
  close(lst);
  if (!opened) run_for(2000);
  CHECK(opened);
  CHECK_STR(open_err, "");
  CHECK(redis_conn_ready(conn));
}

static void send_req(req *r, int n, const char *cmd, size_t len, int timeout_ms) {
  memset(r, 0, sizeof *r);
  r->q.n = n;
  r->q.fn = on_done;
  r->q.ud = r;
  r->q.timeout_ms = timeout_ms;
  CHECK_INT(redis_conn_send(conn, &r->q, cmd, len), 0);
}

static void peer_write(int peer, const char *s, size_t n) { CHECK_INT(write(peer, s, n), (long long)n); }

static void format_is_binary_safe(void) {
  bytebuf b = { 0 };
  const char *argv[] = { "SET", "k\0x", "a\r\nb" };
  size_t lens[] = { 3, 3, 4 };
  CHECK_INT(redis_format(&b, 3, argv, lens), 0);
  static const char want[] = "*3\r\n$3\r\nSET\r\n$3\r\nk\0x\r\n$4\r\na\r\nb\r\n";
  CHECK_INT(b.len, sizeof want - 1);
  CHECK(memcmp(b.data, want, sizeof want - 1) == 0);
  bytebuf_free(&b);
}

/* Requests from one turn go out in one write; replies cut anywhere still reach their requests,
 * in order, a pipeline collecting as many as it has commands. */
static void replies_cut_anywhere_reach_their_requests_in_order(void) {
  int peer;
  connect_pair(&peer);
  req a, b;
  char three[3 * sizeof PING];
  snprintf(three, sizeof three, "%s%s%s", PING, PING, PING);
  send_req(&a, 3, three, strlen(three), 0);
  send_req(&b, 1, PING, strlen(PING), 0);
  run_for(50);
  char buf[256];
  CHECK_INT(read(peer, buf, sizeof buf), (long long)(4 * strlen(PING)));   /* one write */
  CHECK_INT(redis_conn_pending(conn), 2);
  const char *parts[] = { "+O", "K\r\n:4", "2\r\n$5\r\nhel", "lo\r\n", "*2\r\n$-1\r\n-ERR x\r\n" };
  for (int i = 0; i < 4; i++) {
    peer_write(peer, parts[i], strlen(parts[i]));
    run_for(i == 3 ? 2000 : 30);
    CHECK_INT(a.done, i == 3);
    CHECK_INT(b.done, 0);
  }
  CHECK_INT(a.status, REDIS_DONE_OK);
  CHECK_INT(a.n, 3);
  CHECK_INT(a.types[0], REDIS_REPLY_STATUS);
  CHECK_STR(a.text[0], "OK");
  CHECK_INT(a.types[1], REDIS_REPLY_INTEGER);
  CHECK_INT(a.ints[1], 42);
  CHECK_STR(a.text[2], "hello");
  peer_write(peer, parts[4], strlen(parts[4]));
  run_for(2000);
  CHECK_INT(b.done, 1);
  CHECK_INT(b.types[0], REDIS_REPLY_ARRAY);
  CHECK_INT(redis_conn_pending(conn), 0);
  redis_stats st;
  redis_conn_stats(conn, &st);
  CHECK_INT(st.requests, 2);
  CHECK_INT(st.commands, 4);
  CHECK_INT(st.writes, 1);
  redis_conn_free(conn);
  close(peer);
}

/* A reply with no request waiting: the stream can no longer be trusted. */
static void a_reply_to_no_command_kills_the_connection(void) {
  int peer;
  connect_pair(&peer);
  peer_write(peer, ":1\r\n", 4);
  run_for(100);
  CHECK(redis_conn_dead(conn));
  CHECK(strstr(redis_conn_error(conn), "a reply to no command") != NULL);
  req r;
  memset(&r, 0, sizeof r);
  r.q.n = 1;
  r.q.fn = on_done;
  r.q.ud = &r;
  CHECK_INT(redis_conn_send(conn, &r.q, PING, strlen(PING)), -1);   /* refused at once */
  redis_conn_free(conn);
  close(peer);
}

static void a_malformed_reply_fails_the_pending_requests(void) {
  int peer;
  connect_pair(&peer);
  req a, b;
  send_req(&a, 1, PING, strlen(PING), 0);
  send_req(&b, 1, PING, strlen(PING), 0);
  peer_write(peer, "+OK\r\n?what\r\n", 12);
  run_for(100);
  run_for(100);
  CHECK_INT(a.status, REDIS_DONE_OK);
  CHECK_INT(b.done, 1);
  CHECK_INT(b.status, REDIS_DONE_FAIL);
  CHECK(strncmp(b.text[0], "redis 127.0.0.1:", 16) == 0 && strstr(b.text[0], ": protocol error: ") != NULL);
  redis_conn_free(conn);
  close(peer);
}

static void a_peer_that_closes_fails_the_pending_requests(void) {
  int peer;
  connect_pair(&peer);
  req a;
  send_req(&a, 2, PING, strlen(PING), 0);
  run_for(30);
  char buf[64];
  CHECK_INT(read(peer, buf, sizeof buf), (long long)strlen(PING));   /* else the close would be a reset */
  peer_write(peer, "+PONG\r\n", 7);   /* half of a two-command request */
  close(peer);
  run_for(2000);
  CHECK_INT(a.done, 1);
  CHECK_INT(a.status, REDIS_DONE_FAIL);
  CHECK(strstr(a.text[0], ": connection closed by the server") != NULL);
  redis_conn_free(conn);
}

static void a_silent_peer_times_the_request_out(void) {
  int peer;
  connect_pair(&peer);
  req a, b;
  send_req(&a, 1, PING, strlen(PING), 5000);
  send_req(&b, 1, PING, strlen(PING), 50);   /* the later, shorter deadline still counts */
  run_for(3000);
  CHECK_INT(a.status, REDIS_DONE_FAIL);
  CHECK_INT(b.status, REDIS_DONE_FAIL);
  CHECK(strstr(a.text[0], ": timeout: no reply within 0.05 s") != NULL);
  CHECK(redis_conn_dead(conn));
  redis_conn_free(conn);
  close(peer);
}

/* Freed with requests pending: each is cancelled, none told anything else; freed from inside a
 * callback: the free waits for the way out (ASan would see the use after free otherwise). */
static void freeing_cancels_and_is_safe_inside_a_callback(void) {
  int peer;
  connect_pair(&peer);
  req a, b;
  send_req(&a, 1, PING, strlen(PING), 0);
  send_req(&b, 1, PING, strlen(PING), 0);
  redis_conn_free(conn);
  CHECK_INT(a.status, REDIS_DONE_CANCEL);
  CHECK_INT(b.status, REDIS_DONE_CANCEL);
  close(peer);

  connect_pair(&peer);
  send_req(&a, 1, PING, strlen(PING), 0);
  send_req(&b, 1, PING, strlen(PING), 0);
  a.free_conn = 1;
  peer_write(peer, "+A\r\n+B\r\n", 8);
  run_for(2000);
  CHECK_INT(a.status, REDIS_DONE_OK);
  CHECK(conn == NULL);
  CHECK_INT(b.done, 1);                  /* the rest were cancelled by the free */
  CHECK_INT(b.status, REDIS_DONE_CANCEL);
  close(peer);
}

static void a_refused_connect_says_so(void) {
  int port;
  int lst = listener(&port);
  close(lst);                            /* nothing listens there now */
  redis_config cfg = { .connect_timeout_ms = 2000 };
  snprintf(cfg.host, sizeof cfg.host, "127.0.0.1");
  snprintf(cfg.port, sizeof cfg.port, "%d", port);
  conn = redis_conn_new(L, &cfg);
  opened = 0;
  redis_conn_open(conn, on_open, NULL);
  if (!opened) run_for(2000);
  char want[100];
  snprintf(want, sizeof want, "redis 127.0.0.1:%d: connection refused", port);
  CHECK_STR(open_err, want);
  CHECK(redis_conn_dead(conn));
  redis_conn_free(conn);
}

int main(void) {
  L = loop_new();
  format_is_binary_safe();
  replies_cut_anywhere_reach_their_requests_in_order();
  a_reply_to_no_command_kills_the_connection();
  a_malformed_reply_fails_the_pending_requests();
  a_peer_that_closes_fails_the_pending_requests();
  a_silent_peer_times_the_request_out();
  freeing_cancels_and_is_safe_inside_a_callback();
  a_refused_connect_says_so();
  loop_free(L);
  return DONE();
}
