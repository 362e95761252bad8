/* dns.h - DNS lookups with c-ares, driven by our event loop: c-ares's sockets are watched by
 * the loop and its retransmission timeouts are a loop timer.  No thread, no blocking call.
 *
 * A resolver is one c-ares channel: the system configuration (/etc/resolv.conf) or the servers
 * the user names ("IP[:PORT],IP[:PORT]").  Answers are parsed here into records with their TTL,
 * because c-ares's own MX parser drops the TTL, which the per-run cache needs. */
#ifndef MAILSHOT_DNS_H
#define MAILSHOT_DNS_H
#include <stddef.h>
#include <sys/socket.h>
#include "loop.h"

#define DNS_T_A    1
#define DNS_T_MX   15
#define DNS_T_TXT  16
#define DNS_T_AAAA 28

typedef enum {
  DNS_OK,
  DNS_NXDOMAIN,    /* the name does not exist: permanent */
  DNS_NODATA,      /* the name exists, without records of this type */
  DNS_TIMEOUT,     /* no server answered: temporary */
  DNS_SERVFAIL,    /* the server answered SERVFAIL: temporary */
  DNS_REFUSED,     /* the server answered REFUSED (it does not serve us, or not this name) */
  DNS_CONNREFUSED, /* nothing listens at the server's address (ICMP port unreachable, TCP RST) */
  DNS_UNANSWERED,  /* several servers: each refused, failed or was unreachable (c-ares tells no more) */
  DNS_FORMERR,     /* the server answered FORMERR: it could not read the query */
  DNS_NOTIMP,      /* the server answered NOTIMP */
  DNS_BADNAME,     /* the name cannot be asked (empty label, too long) */
  DNS_ERROR,       /* anything else (malformed answer, out of memory) */
  DNS_CANCELLED    /* the resolver is being destroyed */
} dns_status;

typedef struct {
  int type;
  unsigned ttl;
  int pref;            /* MX preference */
  char *data;          /* MX host ("" for the null MX "."), address text, or TXT text: every
                          character-string of the record joined, whatever its length (malloc'd) */
  size_t len;          /* bytes in data (a TXT record may hold a NUL byte) */
} dns_rr;

/* MX answers keep at most this many records: the most preferred ones (RFC 5321 §5.1 orders
 * hosts by preference, not by their place in the answer). */
#define DNS_MAX_MX 64

typedef struct dns_resolver dns_resolver;

/* servers: NULL or "" for the system configuration, else "IP[:PORT],..." (IPv6 as [addr]:port).
 * timeout_ms: per try; tries: attempts per server. */
dns_resolver *dns_resolver_new(loop *lp, const char *servers, int timeout_ms, int tries,
                               char *err, size_t errlen);
/* The same, with the system's search list applied to names without a dot when `search` is set
 * (the relays' host names, which getaddrinfo used to resolve; MX lookups never search). */
dns_resolver *dns_resolver_new_ex(loop *lp, const char *servers, int timeout_ms, int tries, int search,
                                  char *err, size_t errlen);
void dns_resolver_free(dns_resolver *r);   /* pending queries complete with DNS_CANCELLED */

/* Called once per query.  rrs (records of the asked type only) live until the callback returns. */
typedef void dns_done_fn(void *ud, dns_status st, const char *msg, const dns_rr *rrs, int nrr);

/* Start a query; the callback may run before this returns (for instance for a malformed name). */
void dns_query(dns_resolver *r, const char *name, int type, dns_done_fn *fn, void *ud);
/* The same with a deadline: when no answer came within deadline_ms (> 0), the callback runs
 * with DNS_TIMEOUT then, whatever retries c-ares still had in mind (they go on unheard). */
void dns_query_timed(dns_resolver *r, const char *name, int type, unsigned deadline_ms, dns_done_fn *fn, void *ud);

const char *dns_status_name(dns_status st);   /* "nxdomain", "timeout", "servfail", ... (stable words) */
const char *dns_status_text(dns_status st);   /* what it means, for people */
unsigned long dns_queries_sent(const dns_resolver *r);

/* A host's addresses for connecting: /etc/hosts first, then DNS, as getaddrinfo would, but on the
 * loop.  The callback runs exactly once unless the lookup is cancelled; it may run before
 * dns_resolve returns (a name found in /etc/hosts), and then dns_resolve returns NULL.
 * Otherwise the handle may be given to dns_lookup_cancel until the callback has run. */
typedef struct { struct sockaddr_storage ss; socklen_t len; } dns_addr;
typedef void dns_addr_fn(void *ud, dns_status st, const char *msg, const dns_addr *addrs, int n);
typedef struct dns_lookup dns_lookup;
dns_lookup *dns_resolve(dns_resolver *r, const char *host, const char *port, dns_addr_fn *fn, void *ud);
void dns_lookup_cancel(dns_lookup *q);   /* the callback will not run; the resolver frees q later */

/* Parse a DNS answer (exposed for the unit tests).  Keeps the records of `type` owned by the
 * question name, or by a name a CNAME chain from it leads to (a record for another name is
 * ignored, RFC 2181 §5.4.1); for MX at most DNS_MAX_MX, the most preferred.  Returns the
 * number kept, with *out an array to free with dns_rrs_free (NULL when none), or -1 if the
 * message is malformed. */
int dns_parse_answer(const unsigned char *abuf, int alen, int type, dns_rr **out);
void dns_rrs_free(dns_rr *rrs, int n);
dns_rr *dns_rrs_copy(const dns_rr *rrs, int n);   /* a deep copy, or NULL (out of memory) */

/* Why an address must not be connected to by direct delivery: NULL for a global unicast
 * address, else a short reason ("loopback", "private (RFC 1918)", ...).  IPv4-mapped IPv6
 * (::ffff:a.b.c.d) and the NAT64 prefix 64:ff9b::/96 are judged by their IPv4 address.  Text
 * that is not an IP address gives "not an IP address". */
const char *dns_address_class(const char *text);

#endif
