/* dns.h - DNS lookups with c-ares, driven by our event loop: c-ares's sockets are watched by
 * the loop and its retransmission timeouts are a loop timer.  No thread, no blocking call.
 *
 * A resolver is one c-ares channel: the system configuration (/etc/resolv.conf) or the servers
 * the user names ("IP[:PORT],IP[:PORT]").  Answers are parsed here into records with their TTL,
 * because c-ares's own MX parser drops the TTL, which the per-run cache needs. */
#ifndef MAILSHOT_DNS_H
#define MAILSHOT_DNS_H
#include <stddef.h>
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
  DNS_SERVFAIL,    /* the server failed: temporary */
  DNS_REFUSED,     /* the server refused to answer */
  DNS_ERROR,       /* anything else (bad name, malformed answer, out of memory) */
  DNS_CANCELLED    /* the resolver is being destroyed */
} dns_status;

typedef struct {
  int type;
  unsigned ttl;
  int pref;            /* MX preference */
  char data[256];      /* MX host ("" for the null MX "."), address text, or TXT text (truncated) */
} dns_rr;

typedef struct dns_resolver dns_resolver;

/* servers: NULL or "" for the system configuration, else "IP[:PORT],..." (IPv6 as [addr]:port).
 * timeout_ms: per try; tries: attempts per server. */
dns_resolver *dns_resolver_new(loop *lp, const char *servers, int timeout_ms, int tries,
                               char *err, size_t errlen);
void dns_resolver_free(dns_resolver *r);   /* pending queries complete with DNS_CANCELLED */

/* Called once per query.  rrs (records of the asked type only) live until the callback returns. */
typedef void dns_done_fn(void *ud, dns_status st, const char *msg, const dns_rr *rrs, int nrr);

/* Start a query; the callback may run before this returns (for instance for a malformed name). */
void dns_query(dns_resolver *r, const char *name, int type, dns_done_fn *fn, void *ud);

const char *dns_status_name(dns_status st);   /* "nxdomain", "timeout", ... */
unsigned long dns_queries_sent(const dns_resolver *r);

/* Parse a DNS answer (exposed for the unit tests): fills up to max records of `type`;
 * returns the number found, or -1 if the message is malformed. */
int dns_parse_answer(const unsigned char *abuf, int alen, int type, dns_rr *out, int max);

#endif
