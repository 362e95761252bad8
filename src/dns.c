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
#include <strings.h>

struct dns_resolver {
  loop *loop;
  ares_channel channel;
  loop_timer timer;
  unsigned long sent;
  int nservers;
  int destroying;
};

typedef struct {
  dns_resolver *r;
  int type;
  dns_done_fn *fn;      /* NULL once the deadline has passed (the callback ran then) */
  void *ud;
  loop_timer deadline;
  int starting, done;   /* inside dns_query_timed / c-ares answered there */
} dns_pending;

const char *dns_status_name(dns_status st) {
  static const char *names[] = { "ok", "nxdomain", "nodata", "timeout", "servfail", "refused", "connrefused",
                                 "unanswered", "formerr", "notimp", "badname", "error", "cancelled" };
  return st <= DNS_CANCELLED ? names[st] : "error";
}

const char *dns_status_text(dns_status st) {
  switch (st) {
  case DNS_OK: return "ok";
  case DNS_NXDOMAIN: return "the name does not exist (NXDOMAIN)";
  case DNS_NODATA: return "no record of that type";
  case DNS_TIMEOUT: return "no answer from the DNS server (timeout)";
  case DNS_SERVFAIL: return "the DNS server failed (SERVFAIL)";
  case DNS_REFUSED: return "the DNS server refused the query (REFUSED)";
  case DNS_CONNREFUSED: return "connection to the DNS server refused (nothing listening?)";
  case DNS_UNANSWERED:
    return "no DNS server gave an answer: each refused the query, failed (SERVFAIL) or was not listening";
  case DNS_FORMERR: return "the DNS server could not read the query (FORMERR)";
  case DNS_NOTIMP: return "the DNS server does not implement this query (NOTIMP)";
  case DNS_BADNAME: return "not a valid domain name";
  case DNS_CANCELLED: return "the resolver was closed";
  default: return "the DNS lookup failed";
  }
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
  return dns_resolver_new_ex(lp, servers, timeout_ms, tries, 0, err, errlen);
}

static int count_servers(ares_channel ch) {
  struct ares_addr_port_node *list = NULL;
  if (ares_get_servers_ports(ch, &list) != ARES_SUCCESS) return 0;
  int n = 0;
  for (struct ares_addr_port_node *s = list; s; s = s->next) n++;
  ares_free_data(list);
  return n;
}

static int open_channel(dns_resolver *r, const char *servers, int timeout_ms, int tries, int flags,
                        char *err, size_t errlen) {
  struct ares_options o;
  memset(&o, 0, sizeof o);
  o.sock_state_cb = on_sock_state;
  o.sock_state_cb_data = r;
  o.timeout = timeout_ms;
  o.tries = tries;
  o.flags = flags;
  int st = ares_init_options(&r->channel, &o, ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_FLAGS);
  if (st != ARES_SUCCESS) {
    snprintf(err, errlen, "cannot start the resolver: %s", ares_strerror(st));
    return -1;
  }
  if (servers && *servers && (st = ares_set_servers_ports_csv(r->channel, servers)) != ARES_SUCCESS) {
    snprintf(err, errlen, "bad DNS server list \"%s\": %s", servers, ares_strerror(st));
    ares_destroy(r->channel);
    return -1;
  }
  r->nservers = count_servers(r->channel);
  return 0;
}

dns_resolver *dns_resolver_new_ex(loop *lp, const char *servers, int timeout_ms, int tries, int search,
                                  char *err, size_t errlen) {
  dns_resolver *r = calloc(1, sizeof *r);
  if (!r) { snprintf(err, errlen, "out of memory"); return NULL; }
  r->loop = lp;
  loop_timer_init(&r->timer, on_timer, r);
  /* ARES_FLAG_NOSEARCH: names are fully qualified, never tried with the local search list.
   * ARES_FLAG_NOCHECKRESP: c-ares 1.18 drops a SERVFAIL, REFUSED or NOTIMP answer to try the
   * next server, and when none is left reports "connection refused" whatever the servers said.
   * With one server there is no next one: take its answer as it is, so that it can be named.
   * With several, failing over is worth more, and such an outcome is DNS_UNANSWERED. */
  int flags = search ? 0 : ARES_FLAG_NOSEARCH;
  if (open_channel(r, servers, timeout_ms, tries, flags | ARES_FLAG_NOCHECKRESP, err, errlen) < 0) { free(r); return NULL; }
  if (r->nservers > 1) {
    ares_destroy(r->channel);   /* nothing asked yet: nothing to call back */
    if (open_channel(r, servers, timeout_ms, tries, flags, err, errlen) < 0) { free(r); return NULL; }
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

#define MAX_CHAIN 8   /* CNAME hops followed in one answer (resolvers stop at about as many) */

/* One resource record of the answer section, located but not yet decoded. */
typedef struct {
  char *owner;                 /* from ares_expand_name */
  int type;
  unsigned ttl, rdlen;
  const unsigned char *rd;
} raw_rr;

/* Expand a (possibly compressed) name at p: its encoded length, or -1.  *name is set when
 * name is not NULL (free with ares_free_string). */
static long expand_name(const unsigned char *p, const unsigned char *abuf, int alen, char **name) {
  char *n = NULL;
  long enclen = 0;
  if (ares_expand_name(p, abuf, alen, &n, &enclen) != ARES_SUCCESS) return -1;
  if (name) *name = n; else ares_free_string(n);
  return enclen;
}

static char *dup_bytes(const void *p, size_t n) {
  char *d = malloc(n + 1);
  if (!d) return NULL;
  memcpy(d, p, n);
  d[n] = '\0';
  return d;
}

static int parse_rdata(const raw_rr *raw, const unsigned char *abuf, int alen, dns_rr *rr) {
  const unsigned char *rd = raw->rd;
  unsigned rdlen = raw->rdlen;
  char text[INET6_ADDRSTRLEN];
  if ((raw->type == DNS_T_A && rdlen == 4) || (raw->type == DNS_T_AAAA && rdlen == 16)) {
    if (!inet_ntop(raw->type == DNS_T_A ? AF_INET : AF_INET6, rd, text, sizeof text)) return -1;
    rr->len = strlen(text);
    return (rr->data = dup_bytes(text, rr->len)) ? 0 : -1;
  }
  if (raw->type == DNS_T_MX && rdlen >= 3) {
    char *host = NULL;
    rr->pref = (int)get16(rd);
    if (expand_name(rd + 2, abuf, alen, &host) < 0) return -1;
    rr->len = strlen(host);                 /* "" is the root: a null MX (RFC 7505) */
    rr->data = dup_bytes(host, rr->len);
    ares_free_string(host);
    return rr->data ? 0 : -1;
  }
  if (raw->type == DNS_T_TXT) {   /* every character-string joined, as SPF and DKIM expect (RFC 7208 §3.3) */
    if (!(rr->data = malloc(rdlen + 1))) return -1;
    size_t n = 0;
    for (unsigned i = 0; i < rdlen;) {
      unsigned len = rd[i++];
      if (i + len > rdlen) { free(rr->data); rr->data = NULL; return -1; }
      memcpy(rr->data + n, rd + i, len);
      n += len;
      i += len;
    }
    rr->data[n] = '\0';
    rr->len = n;
    return 0;
  }
  return -1;
}

void dns_rrs_free(dns_rr *rrs, int n) {
  if (!rrs) return;
  for (int i = 0; i < n; i++) free(rrs[i].data);
  free(rrs);
}

dns_rr *dns_rrs_copy(const dns_rr *rrs, int n) {
  dns_rr *c = n > 0 ? calloc((size_t)n, sizeof *c) : NULL;
  if (!c) return NULL;
  for (int i = 0; i < n; i++) {
    c[i] = rrs[i];
    if (!(c[i].data = dup_bytes(rrs[i].data, rrs[i].len))) { dns_rrs_free(c, i); return NULL; }
  }
  return c;
}

/* Names compare without regard to case (RFC 4343), as ares_expand_name spells both. */
static int in_chain(char *const *chain, int n, const char *name) {
  for (int i = 0; i < n; i++) if (strcasecmp(chain[i], name) == 0) return 1;
  return 0;
}

/* The names whose records answer the question: qname, then each CNAME target in turn. */
static int follow_chain(const raw_rr *raws, int nraw, const unsigned char *abuf, int alen, char **chain) {
  int n = 1;
  while (n < MAX_CHAIN + 1) {
    int i = 0;
    while (i < nraw && !(raws[i].type == 5 /* CNAME */ && strcasecmp(raws[i].owner, chain[n - 1]) == 0)) i++;
    if (i == nraw) break;
    char *target = NULL;
    if (expand_name(raws[i].rd, abuf, alen, &target) < 0) break;
    if (in_chain(chain, n, target)) { ares_free_string(target); break; }   /* a loop */
    chain[n++] = target;
  }
  return n;
}

static int by_preference(const void *a, const void *b) {
  const dns_rr *x = a, *y = b;
  return x->pref != y->pref ? (x->pref < y->pref ? -1 : 1) : 0;
}

static int decode_answers(const unsigned char *abuf, int alen, int type, const raw_rr *raws, int nraw,
                          char **chain, int nchain, dns_rr **out) {
  int found = 0;
  dns_rr *rrs = NULL;
  for (int i = 0; i < nraw; i++) {
    const raw_rr *raw = &raws[i];
    if (raw->type != type || !in_chain(chain, nchain, raw->owner)) continue;   /* someone else's record */
    if (!rrs && !(rrs = calloc((size_t)nraw, sizeof *rrs))) return -1;
    dns_rr *rr = &rrs[found];
    memset(rr, 0, sizeof *rr);
    rr->type = raw->type;
    rr->ttl = raw->ttl > 0x7fffffff ? 0 : raw->ttl;   /* RFC 2181 §8: a TTL with the top bit set means zero */
    if (parse_rdata(raw, abuf, alen, rr) == 0) found++;
  }
  if (type == DNS_T_MX && found > DNS_MAX_MX) {
    /* keep the most preferred; qsort is not stable, but equal preferences are shuffled later */
    qsort(rrs, (size_t)found, sizeof *rrs, by_preference);
    for (int i = DNS_MAX_MX; i < found; i++) free(rrs[i].data);
    found = DNS_MAX_MX;
  }
  if (found == 0) { free(rrs); rrs = NULL; }
  *out = rrs;
  return found;
}

int dns_parse_answer(const unsigned char *abuf, int alen, int type, dns_rr **out) {
  *out = NULL;
  if (alen < 12) return -1;
  unsigned qd = get16(abuf + 4), an = get16(abuf + 6);
  if (qd < 1) return -1;                 /* nothing to check the owners against */
  const unsigned char *p = abuf + 12, *end = abuf + alen;
  char *chain[MAX_CHAIN + 1] = { NULL };
  int nchain = 0, nraw = 0, result = -1;
  raw_rr *raws = NULL;
  for (unsigned i = 0; i < qd; i++) {
    long n = expand_name(p, abuf, alen, i == 0 ? &chain[0] : NULL);
    if (n >= 0 && i == 0) nchain = 1;
    if (n < 0 || p + n + 4 > end) goto done;
    p += n + 4;
  }
  /* a record takes 11 bytes at least: no more of them than the message can hold */
  unsigned most = (unsigned)(end - p) / 11;
  if (an > most) an = most;
  if (an > 0 && !(raws = calloc(an, sizeof *raws))) goto done;
  for (unsigned i = 0; i < an; i++) {
    raw_rr *raw = &raws[nraw];
    long n = expand_name(p, abuf, alen, &raw->owner);
    if (n < 0) goto done;
    nraw++;
    if (p + n + 10 > end) goto done;
    p += n;
    raw->type = (int)get16(p);
    raw->ttl = get32(p + 4);
    raw->rdlen = get16(p + 8);
    p += 10;
    if (p + raw->rdlen > end) goto done;
    raw->rd = p;
    p += raw->rdlen;
  }
  nchain = follow_chain(raws, nraw, abuf, alen, chain);
  result = decode_answers(abuf, alen, type, raws, nraw, chain, nchain, out);
done:
  for (int i = 0; i < nraw; i++) ares_free_string(raws[i].owner);
  free(raws);
  for (int i = 0; i < nchain; i++) ares_free_string(chain[i]);
  return result;
}

/* c-ares's status as ours.  ECONNREFUSED is c-ares's status for "no server answered and none
 * timed out": with one server (and NOCHECKRESP) that is a refused connection; with several it
 * may also hide SERVFAIL or REFUSED answers (see dns_resolver_new_ex). */
static dns_status map_status(const dns_resolver *r, int st) {
  switch (st) {
  case ARES_SUCCESS: return DNS_OK;
  case ARES_ENOTFOUND: return DNS_NXDOMAIN;
  case ARES_ENODATA: return DNS_NODATA;
  case ARES_ETIMEOUT: return DNS_TIMEOUT;
  case ARES_ECONNREFUSED: return r->nservers > 1 ? DNS_UNANSWERED : DNS_CONNREFUSED;
  case ARES_ESERVFAIL: return DNS_SERVFAIL;
  case ARES_EREFUSED: return DNS_REFUSED;
  case ARES_EFORMERR: return DNS_FORMERR;
  case ARES_ENOTIMP: return DNS_NOTIMP;
  case ARES_EBADNAME: return DNS_BADNAME;
  case ARES_EDESTRUCTION: case ARES_ECANCELLED: return DNS_CANCELLED;
  default: return DNS_ERROR;
  }
}

static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen) {
  dns_pending *q = arg;
  loop_timer_stop(q->r->loop, &q->deadline);
  if (q->fn) {
    dns_rr *rrs = NULL;
    int n = 0;
    dns_status st = map_status(q->r, status);
    const char *msg = st == DNS_ERROR ? ares_strerror(status) : dns_status_text(st);
    if (st == DNS_OK) {
      n = dns_parse_answer(abuf, alen, q->type, &rrs);
      if (n < 0) { st = DNS_ERROR; msg = "malformed answer (or out of memory)"; n = 0; }
      else if (n == 0) { st = DNS_NODATA; msg = dns_status_text(st); }
    }
    q->fn(q->ud, st, msg, rrs, n);
    dns_rrs_free(rrs, n);
  }
  if (q->starting) q->done = 1; else free(q);
}

/* The deadline passed: answer "timeout" now; c-ares's own answer, when it comes, frees q. */
static void on_deadline(loop *l, void *data) {
  dns_pending *q = data;
  dns_done_fn *fn = q->fn;
  q->fn = NULL;
  if (fn) fn(q->ud, DNS_TIMEOUT, dns_status_text(DNS_TIMEOUT), NULL, 0);
}

void dns_query_timed(dns_resolver *r, const char *name, int type, unsigned deadline_ms, dns_done_fn *fn, void *ud) {
  dns_pending *q = calloc(1, sizeof *q);
  if (!q) { fn(ud, DNS_ERROR, "out of memory", NULL, 0); return; }
  q->r = r;
  q->type = type;
  q->fn = fn;
  q->ud = ud;
  q->starting = 1;
  loop_timer_init(&q->deadline, on_deadline, q);
  r->sent++;
  ares_query(r->channel, name, 1 /* C_IN */, type, on_answer, q);
  if (q->done) { free(q); return; }   /* answered at once (a bad name) */
  q->starting = 0;
  if (deadline_ms > 0) loop_timer_start(r->loop, &q->deadline, deadline_ms);
  if (!r->destroying) rearm(r);
}

void dns_query(dns_resolver *r, const char *name, int type, dns_done_fn *fn, void *ud) {
  dns_query_timed(r, name, type, 0, fn, ud);
}

/* ---- host addresses for connecting (ares_getaddrinfo: the hosts file, then DNS) ---- */

struct dns_lookup {
  const dns_resolver *r;
  dns_addr_fn *fn;      /* NULL once cancelled */
  void *ud;
  int starting, done;   /* inside dns_resolve / the callback ran there */
};

static const char *describe_status(dns_status st, int status) {
  switch (st) {
  case DNS_NXDOMAIN: return "no such host (NXDOMAIN)";
  case DNS_NODATA: return "the name has no address";
  case DNS_ERROR: return ares_strerror(status);
  default: return dns_status_text(st);
  }
}

static void on_addrinfo(void *arg, int status, int timeouts, struct ares_addrinfo *res) {
  dns_lookup *q = arg;
  if (q->fn) {
    dns_status st = map_status(q->r, status);
    const char *msg = describe_status(st, status);
    dns_addr *v = NULL;
    int n = 0;
    if (st == DNS_OK) {
      int count = 0;
      for (struct ares_addrinfo_node *a = res ? res->nodes : NULL; a; a = a->ai_next) count++;
      if (count > 0 && !(v = calloc((size_t)count, sizeof *v))) { st = DNS_ERROR; msg = "out of memory"; }
      for (struct ares_addrinfo_node *a = res && v ? res->nodes : NULL; a; a = a->ai_next) {
        if ((a->ai_family != AF_INET && a->ai_family != AF_INET6) || a->ai_addrlen > (int)sizeof v[n].ss) continue;
        memcpy(&v[n].ss, a->ai_addr, (size_t)a->ai_addrlen);
        v[n++].len = (socklen_t)a->ai_addrlen;
      }
      if (st == DNS_OK && n == 0) { st = DNS_NODATA; msg = describe_status(st, status); }
    }
    q->fn(q->ud, st, msg, v, n);
    free(v);
  }
  if (res) ares_freeaddrinfo(res);
  if (q->starting) q->done = 1; else free(q);
}

dns_lookup *dns_resolve(dns_resolver *r, const char *host, const char *port, dns_addr_fn *fn, void *ud) {
  dns_lookup *q = calloc(1, sizeof *q);
  if (!q) { fn(ud, DNS_ERROR, "out of memory", NULL, 0); return NULL; }
  q->r = r;
  q->fn = fn;
  q->ud = ud;
  q->starting = 1;
  struct ares_addrinfo_hints hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = ARES_AI_NUMERICSERV;
  r->sent++;
  ares_getaddrinfo(r->channel, host, port, &hints, on_addrinfo, q);
  if (!r->destroying) rearm(r);
  if (q->done) { free(q); return NULL; }   /* answered at once (the hosts file, a bad name) */
  q->starting = 0;
  return q;
}

void dns_lookup_cancel(dns_lookup *q) {
  if (q) q->fn = NULL;
}

/* ---- address classes (IANA special-purpose registries, RFC 6890) ---- */

static const char *ipv4_class(const unsigned char *a) {
  unsigned a0 = a[0], a1 = a[1], a2 = a[2];
  if (a0 == 127) return "loopback";
  if (a0 == 0) return "unspecified (\"this network\", 0.0.0.0/8)";
  if (a0 == 10 || (a0 == 172 && (a1 & 0xf0) == 16) || (a0 == 192 && a1 == 168)) return "private (RFC 1918)";
  if (a0 == 169 && a1 == 254) return "link-local";
  if (a0 == 100 && (a1 & 0xc0) == 64) return "shared address space (carrier-grade NAT, RFC 6598)";
  if (a0 == 255 && a1 == 255 && a2 == 255 && a[3] == 255) return "broadcast";
  if ((a0 & 0xf0) == 224) return "multicast";
  if ((a0 & 0xf0) == 240) return "reserved (240.0.0.0/4)";
  if ((a0 == 192 && a1 == 0 && a2 == 2) || (a0 == 198 && a1 == 51 && a2 == 100) || (a0 == 203 && a1 == 0 && a2 == 113))
    return "reserved for documentation (RFC 5737)";
  if (a0 == 198 && (a1 & 0xfe) == 18) return "reserved for benchmarking (RFC 2544)";
  return NULL;
}

static const char *ipv6_class(const unsigned char *a) {
  static const unsigned char zero[16], mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff },
                             nat64[12] = { 0, 0x64, 0xff, 0x9b };
  if (memcmp(a, mapped, 12) == 0 || memcmp(a, nat64, 12) == 0) return ipv4_class(a + 12);
  if (memcmp(a, zero, 15) == 0) return a[15] == 1 ? "loopback" : a[15] == 0 ? "unspecified" : "reserved (IPv4-compatible)";
  if (memcmp(a, zero, 12) == 0) return "reserved (IPv4-compatible, deprecated)";
  if (a[0] == 0xff) return "multicast";
  if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) return "link-local";
  if (a[0] == 0xfe && (a[1] & 0xc0) == 0xc0) return "site-local (deprecated)";
  if ((a[0] & 0xfe) == 0xfc) return "unique local (RFC 4193)";
  if (a[0] == 0x20 && a[1] == 0x01 && a[2] == 0x0d && a[3] == 0xb8) return "reserved for documentation (RFC 3849)";
  if (a[0] == 0x01 && memcmp(a + 1, zero, 7) == 0) return "discard-only (RFC 6666)";
  return NULL;
}

const char *dns_address_class(const char *text) {
  unsigned char a[16];
  if (inet_pton(AF_INET, text, a) == 1) return ipv4_class(a);
  if (inet_pton(AF_INET6, text, a) == 1) return ipv6_class(a);
  return "not an IP address";
}
