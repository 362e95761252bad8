/* dns.c - c-ares on the event loop.  See dns.h.
 *
 * Wiring (c-ares's documented integration for external event loops): ARES_OPT_SOCK_STATE_CB
 * tells us which sockets to watch for what; we call ares_process_fd() when one is ready, and
 * after every call we re-arm one loop timer at ares_timeout() so retries and timeouts happen. */
#include "dns.h"

#include <ares.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RR 64

struct dns_resolver {
  loop *loop;
  ares_channel channel;
  loop_timer timer;
  unsigned long sent;
  int destroying;
};

typedef struct {
  dns_resolver *r;
  int type;
  dns_done_fn *fn;
  void *ud;
} dns_pending;

const char *dns_status_name(dns_status st) {
  static const char *names[] = { "ok", "nxdomain", "nodata", "timeout", "servfail", "refused", "error", "cancelled" };
  return st <= DNS_CANCELLED ? names[st] : "error";
}

unsigned long dns_queries_sent(const dns_resolver *r) { return r->sent; }

static void rearm(dns_resolver *r) {
  struct timeval tv, *tvp = ares_timeout(r->channel, NULL, &tv);
  if (tvp) loop_timer_start(r->loop, &r->timer, (uint64_t)tvp->tv_sec * 1000 + (uint64_t)tvp->tv_usec / 1000 + 1);
  else loop_timer_stop(r->loop, &r->timer);
}

static void on_io(loop *l, int fd, int events, void *data) {
  dns_resolver *r = data;
  ares_process_fd(r->channel, events & LOOP_READ ? fd : ARES_SOCKET_BAD, events & LOOP_WRITE ? fd : ARES_SOCKET_BAD);
  rearm(r);
}

static void on_timer(loop *l, void *data) {
  dns_resolver *r = data;
  ares_process_fd(r->channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);   /* expire what is due */
  rearm(r);
}

static void on_sock_state(void *data, ares_socket_t fd, int readable, int writable) {
  dns_resolver *r = data;
  if (readable || writable) {
    if (loop_watch(r->loop, fd, (readable ? LOOP_READ : 0) | (writable ? LOOP_WRITE : 0), on_io, r) < 0)
      perror("mailshot: dns: epoll");   /* the query then times out, which is reported */
  } else {
    loop_unwatch(r->loop, fd);
  }
}

dns_resolver *dns_resolver_new(loop *lp, const char *servers, int timeout_ms, int tries, char *err, size_t errlen) {
  dns_resolver *r = calloc(1, sizeof *r);
  if (!r) { snprintf(err, errlen, "out of memory"); return NULL; }
  r->loop = lp;
  loop_timer_init(&r->timer, on_timer, r);
  struct ares_options o;
  memset(&o, 0, sizeof o);
  o.sock_state_cb = on_sock_state;
  o.sock_state_cb_data = r;
  o.timeout = timeout_ms;
  o.tries = tries;
  /* ARES_FLAG_NOSEARCH: names are fully qualified, never tried with the local search list */
  o.flags = ARES_FLAG_NOSEARCH;
  int st = ares_init_options(&r->channel, &o, ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_FLAGS);
  if (st != ARES_SUCCESS) {
    snprintf(err, errlen, "cannot start the resolver: %s", ares_strerror(st));
    free(r);
    return NULL;
  }
  if (servers && *servers && (st = ares_set_servers_ports_csv(r->channel, servers)) != ARES_SUCCESS) {
    snprintf(err, errlen, "bad DNS server list \"%s\": %s", servers, ares_strerror(st));
    ares_destroy(r->channel);
    free(r);
    return NULL;
  }
  return r;
}

void dns_resolver_free(dns_resolver *r) {
  if (!r) return;
  r->destroying = 1;
  ares_destroy(r->channel);     /* pending callbacks run with ARES_EDESTRUCTION */
  loop_timer_stop(r->loop, &r->timer);
  free(r);
}

/* ---- answer parsing (RFC 1035 §4.1) ---- */

static unsigned get16(const unsigned char *p) { return (unsigned)p[0] << 8 | p[1]; }
static unsigned get32(const unsigned char *p) { return (unsigned)p[0] << 24 | (unsigned)p[1] << 16 | (unsigned)p[2] << 8 | p[3]; }

/* Skip a (possibly compressed) name at p; returns its encoded length or -1. */
static long skip_name(const unsigned char *p, const unsigned char *abuf, int alen) {
  char *name = NULL;
  long enclen = 0;
  if (ares_expand_name(p, abuf, alen, &name, &enclen) != ARES_SUCCESS) return -1;
  ares_free_string(name);
  return enclen;
}

static int parse_rdata(int type, const unsigned char *rd, unsigned rdlen, const unsigned char *abuf, int alen, dns_rr *rr) {
  if (type == DNS_T_A && rdlen == 4) return inet_ntop(AF_INET, rd, rr->data, sizeof rr->data) ? 0 : -1;
  if (type == DNS_T_AAAA && rdlen == 16) return inet_ntop(AF_INET6, rd, rr->data, sizeof rr->data) ? 0 : -1;
  if (type == DNS_T_MX && rdlen >= 3) {
    char *host = NULL;
    long enclen = 0;
    rr->pref = (int)get16(rd);
    if (ares_expand_name(rd + 2, abuf, alen, &host, &enclen) != ARES_SUCCESS) return -1;
    snprintf(rr->data, sizeof rr->data, "%s", host);   /* "" is the root: a null MX (RFC 7505) */
    ares_free_string(host);
    return 0;
  }
  if (type == DNS_T_TXT) {   /* character-strings joined, as SPF and DKIM expect (RFC 7208 §3.3) */
    size_t n = 0;
    for (unsigned i = 0; i < rdlen;) {
      unsigned len = rd[i++];
      if (i + len > rdlen) return -1;
      for (unsigned k = 0; k < len && n + 1 < sizeof rr->data; k++) rr->data[n++] = (char)rd[i + k];
      i += len;
    }
    rr->data[n] = '\0';
    return 0;
  }
  return -1;
}

int dns_parse_answer(const unsigned char *abuf, int alen, int type, dns_rr *out, int max) {
  if (alen < 12) return -1;
  unsigned qd = get16(abuf + 4), an = get16(abuf + 6);
  const unsigned char *p = abuf + 12, *end = abuf + alen;
  for (unsigned i = 0; i < qd; i++) {
    long n = skip_name(p, abuf, alen);
    if (n < 0 || p + n + 4 > end) return -1;
    p += n + 4;
  }
  int found = 0;
  for (unsigned i = 0; i < an; i++) {
    long n = skip_name(p, abuf, alen);
    if (n < 0 || p + n + 10 > end) return -1;
    p += n;
    int rtype = (int)get16(p);
    unsigned ttl = get32(p + 4), rdlen = get16(p + 8);
    p += 10;
    if (p + rdlen > end) return -1;
    if (rtype == type && found < max) {   /* CNAMEs on the way are followed by the server; skip them */
      dns_rr *rr = &out[found];
      memset(rr, 0, sizeof *rr);
      rr->type = rtype;
      rr->ttl = ttl > 0x7fffffff ? 0 : ttl;   /* RFC 2181 §8: a TTL with the top bit set means zero */
      if (parse_rdata(rtype, p, rdlen, abuf, alen, rr) == 0) found++;
    }
    p += rdlen;
  }
  return found;
}

static dns_status map_status(int st) {
  switch (st) {
  case ARES_SUCCESS: return DNS_OK;
  case ARES_ENOTFOUND: return DNS_NXDOMAIN;
  case ARES_ENODATA: return DNS_NODATA;
  case ARES_ETIMEOUT: case ARES_ECONNREFUSED: return DNS_TIMEOUT;
  case ARES_ESERVFAIL: return DNS_SERVFAIL;
  case ARES_EREFUSED: return DNS_REFUSED;
  case ARES_EDESTRUCTION: case ARES_ECANCELLED: return DNS_CANCELLED;
  default: return DNS_ERROR;
  }
}

static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen) {
  dns_pending *q = arg;
  dns_rr rrs[MAX_RR];
  int n = 0;
  dns_status st = map_status(status);
  const char *msg = ares_strerror(status);
  if (st == DNS_OK) {
    n = dns_parse_answer(abuf, alen, q->type, rrs, MAX_RR);
    if (n < 0) { st = DNS_ERROR; msg = "malformed answer"; n = 0; }
    else if (n == 0) { st = DNS_NODATA; msg = "no record of this type"; }
  }
  if (st == DNS_TIMEOUT && status == ARES_ECONNREFUSED) msg = "the DNS server refused the connection (nothing listening?)";
  q->fn(q->ud, st, msg, rrs, n);
  free(q);
}

void dns_query(dns_resolver *r, const char *name, int type, dns_done_fn *fn, void *ud) {
  dns_pending *q = malloc(sizeof *q);
  if (!q) { fn(ud, DNS_ERROR, "out of memory", NULL, 0); return; }
  q->r = r;
  q->type = type;
  q->fn = fn;
  q->ud = ud;
  r->sent++;
  ares_query(r->channel, name, 1 /* C_IN */, type, on_answer, q);
  if (!r->destroying) rearm(r);
}
