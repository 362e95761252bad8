/* test_dns.c - the DNS answer parser on crafted messages (what no test server sends: records
 * owned by another name, CNAME chains, long TXT records, more MX records than are kept) and
 * the address classes direct delivery refuses. */
#include <stdlib.h>

#include "check.h"
#include "dns.h"

/* A DNS message under construction: header, one question, answer records. */
typedef struct { unsigned char b[65535]; size_t n; int an; } msg;

static void put8(msg *m, unsigned v) { m->b[m->n++] = (unsigned char)v; }
static void put16(msg *m, unsigned v) { put8(m, v >> 8 & 0xff); put8(m, v & 0xff); }
static void put32(msg *m, unsigned v) { put16(m, v >> 16); put16(m, v & 0xffff); }

static void put_name(msg *m, const char *name) {
  while (*name) {
    const char *dot = strchr(name, '.');
    size_t len = dot ? (size_t)(dot - name) : strlen(name);
    put8(m, (unsigned)len);
    memcpy(m->b + m->n, name, len);
    m->n += len;
    name += len + (dot ? 1 : 0);
  }
  put8(m, 0);
}

static void start(msg *m, const char *qname, int qtype) {
  memset(m, 0, sizeof *m);
  put16(m, 0x1234);
  put16(m, 0x8180);   /* response, RD, RA, NOERROR */
  put16(m, 1);
  put16(m, 0);        /* answer count: patched by finish() */
  put16(m, 0);
  put16(m, 0);
  put_name(m, qname);
  put16(m, (unsigned)qtype);
  put16(m, 1);
}

/* An answer record: the rdata length is patched once the rdata is written. */
static size_t rr_begin(msg *m, const char *owner, int type, unsigned ttl) {
  put_name(m, owner);
  put16(m, (unsigned)type);
  put16(m, 1);
  put32(m, ttl);
  put16(m, 0);
  m->an++;
  return m->n;
}

static void rr_end(msg *m, size_t rdstart) {
  size_t len = m->n - rdstart;
  m->b[rdstart - 2] = (unsigned char)(len >> 8);
  m->b[rdstart - 1] = (unsigned char)(len & 0xff);
}

static void add_mx(msg *m, const char *owner, int pref, const char *host) {
  size_t s = rr_begin(m, owner, DNS_T_MX, 300);
  put16(m, (unsigned)pref);
  put_name(m, host);
  rr_end(m, s);
}

static void add_a(msg *m, const char *owner, unsigned char a, unsigned char b, unsigned char c, unsigned char d) {
  size_t s = rr_begin(m, owner, DNS_T_A, 60);
  put8(m, a); put8(m, b); put8(m, c); put8(m, d);
  rr_end(m, s);
}

static void add_cname(msg *m, const char *owner, const char *target) {
  size_t s = rr_begin(m, owner, 5, 60);
  put_name(m, target);
  rr_end(m, s);
}

static int finish(msg *m) {
  m->b[6] = (unsigned char)(m->an >> 8);
  m->b[7] = (unsigned char)(m->an & 0xff);
  return (int)m->n;
}

static msg m;

static void records_of_another_owner_are_ignored(void) {
  start(&m, "a.test", DNS_T_MX);
  add_mx(&m, "evil.test", 0, "mx.evil.test");      /* not what was asked: a poisoning attempt */
  add_mx(&m, "A.Test", 10, "mx.a.test");           /* the same name, another case */
  add_mx(&m, "sub.a.test", 5, "mx.sub.a.test");    /* a subdomain is another name too */
  int len = finish(&m);
  dns_rr *rrs = NULL;
  int n = dns_parse_answer(m.b, len, DNS_T_MX, &rrs);
  CHECK_INT(n, 1);
  if (n == 1) {
    CHECK_STR(rrs[0].data, "mx.a.test");
    CHECK_INT(rrs[0].pref, 10);
  }
  dns_rrs_free(rrs, n);
  /* only a foreign record: nothing at all */
  start(&m, "a.test", DNS_T_MX);
  add_mx(&m, "evil.test", 0, "mx.evil.test");
  len = finish(&m);
  n = dns_parse_answer(m.b, len, DNS_T_MX, &rrs);
  CHECK_INT(n, 0);
  CHECK(rrs == NULL);
}

static void a_cname_chain_is_followed_and_nothing_else(void) {
  start(&m, "www.a.test", DNS_T_A);
  add_a(&m, "other.test", 10, 0, 0, 1);            /* unrelated */
  add_cname(&m, "www.a.test", "edge.cdn.test");
  add_cname(&m, "EDGE.cdn.test", "node.cdn.test");
  add_a(&m, "node.cdn.test", 192, 0, 2, 7);
  add_a(&m, "edge.cdn.test", 192, 0, 2, 8);        /* owned by a name of the chain: kept */
  int len = finish(&m);
  dns_rr *rrs = NULL;
  int n = dns_parse_answer(m.b, len, DNS_T_A, &rrs);
  CHECK_INT(n, 2);
  if (n == 2) {
    CHECK_STR(rrs[0].data, "192.0.2.7");
    CHECK_STR(rrs[1].data, "192.0.2.8");
  }
  dns_rrs_free(rrs, n);
  /* a CNAME loop ends; the foreign A record is still refused */
  start(&m, "x.test", DNS_T_A);
  add_cname(&m, "x.test", "y.test");
  add_cname(&m, "y.test", "x.test");
  add_a(&m, "z.test", 10, 0, 0, 1);
  len = finish(&m);
  n = dns_parse_answer(m.b, len, DNS_T_A, &rrs);
  CHECK_INT(n, 0);
}

static void more_mx_than_kept_keeps_the_most_preferred(void) {
  start(&m, "many.test", DNS_T_MX);
  char host[64];
  for (int i = 0; i < 70; i++) {
    snprintf(host, sizeof host, "mx%d.many.test", i);
    add_mx(&m, "many.test", i == 69 ? 1 : 100 + i, host);   /* the best one comes last */
  }
  int len = finish(&m);
  dns_rr *rrs = NULL;
  int n = dns_parse_answer(m.b, len, DNS_T_MX, &rrs);
  CHECK_INT(n, DNS_MAX_MX);
  int best = 0, worst = 0;
  for (int i = 0; i < n; i++) {
    if (rrs[i].pref == 1 && strcmp(rrs[i].data, "mx69.many.test") == 0) best = 1;
    if (rrs[i].pref > worst) worst = rrs[i].pref;
  }
  CHECK(best);
  CHECK_INT(worst, 100 + 62);   /* 64 kept: pref 1 and 100..162 */
  dns_rrs_free(rrs, n);
}

static void a_long_txt_record_is_joined_whole(void) {
  start(&m, "s1._domainkey.a.test", DNS_T_TXT);
  size_t s = rr_begin(&m, "s1._domainkey.a.test", DNS_T_TXT, 300);
  char want[700];
  size_t wn = 0;
  int sizes[] = { 255, 255, 100, 0, 3 };   /* an empty character-string is legal too */
  for (int k = 0; k < 5; k++) {
    put8(&m, (unsigned)sizes[k]);
    for (int i = 0; i < sizes[k]; i++) {
      char c = (char)('A' + (k * 7 + i) % 26);
      put8(&m, (unsigned char)c);
      want[wn++] = c;
    }
  }
  want[wn] = '\0';
  rr_end(&m, s);
  int len = finish(&m);
  dns_rr *rrs = NULL;
  int n = dns_parse_answer(m.b, len, DNS_T_TXT, &rrs);
  CHECK_INT(n, 1);
  if (n == 1) {
    CHECK_INT((long long)rrs[0].len, 613);
    CHECK_STR(rrs[0].data, want);
    dns_rr *copy = dns_rrs_copy(rrs, n);
    CHECK(copy && copy[0].data != rrs[0].data && strcmp(copy[0].data, want) == 0);
    dns_rrs_free(copy, n);
  }
  dns_rrs_free(rrs, n);
}

static void malformed_messages_are_refused(void) {
  start(&m, "a.test", DNS_T_MX);
  add_mx(&m, "a.test", 10, "mx.a.test");
  int len = finish(&m);
  dns_rr *rrs = NULL;
  CHECK_INT(dns_parse_answer(m.b, len - 3, DNS_T_MX, &rrs), -1);   /* cut short */
  CHECK(rrs == NULL);
  m.b[5] = 0;                                                       /* no question */
  CHECK_INT(dns_parse_answer(m.b, len, DNS_T_MX, &rrs), -1);
  CHECK_INT(dns_parse_answer(m.b, 11, DNS_T_MX, &rrs), -1);
  /* a TXT character-string running past its record */
  start(&m, "t.test", DNS_T_TXT);
  size_t s = rr_begin(&m, "t.test", DNS_T_TXT, 300);
  put8(&m, 200);
  put8(&m, 'x');
  rr_end(&m, s);
  len = finish(&m);
  CHECK_INT(dns_parse_answer(m.b, len, DNS_T_TXT, &rrs), 0);
}

static void address_classes(void) {
  static const struct { const char *addr; const char *want; } cases[] = {
    { "127.0.0.1", "loopback" }, { "127.255.1.2", "loopback" },
    { "10.1.2.3", "private (RFC 1918)" }, { "172.16.0.1", "private (RFC 1918)" },
    { "172.31.255.255", "private (RFC 1918)" }, { "172.32.0.1", NULL }, { "172.15.0.1", NULL },
    { "192.168.1.1", "private (RFC 1918)" }, { "169.254.1.1", "link-local" },
    { "100.64.0.1", "shared address space (carrier-grade NAT, RFC 6598)" },
    { "100.127.255.255", "shared address space (carrier-grade NAT, RFC 6598)" }, { "100.128.0.1", NULL },
    { "0.0.0.0", "unspecified (\"this network\", 0.0.0.0/8)" }, { "0.1.2.3", "unspecified (\"this network\", 0.0.0.0/8)" },
    { "224.0.0.1", "multicast" }, { "239.255.255.255", "multicast" },
    { "240.0.0.1", "reserved (240.0.0.0/4)" }, { "255.255.255.255", "broadcast" },
    { "192.0.2.1", "reserved for documentation (RFC 5737)" }, { "198.18.0.1", "reserved for benchmarking (RFC 2544)" },
    { "8.8.8.8", NULL }, { "1.1.1.1", NULL }, { "93.184.216.34", NULL }, { "223.255.255.255", NULL },
    { "::1", "loopback" }, { "::", "unspecified" }, { "fe80::1", "link-local" }, { "febf::1", "link-local" },
    { "fc00::1", "unique local (RFC 4193)" }, { "fd12:3456::1", "unique local (RFC 4193)" },
    { "ff02::1", "multicast" }, { "::ffff:127.0.0.1", "loopback" }, { "::ffff:10.0.0.1", "private (RFC 1918)" },
    { "::ffff:8.8.8.8", NULL }, { "64:ff9b::10.0.0.1", "private (RFC 1918)" }, { "64:ff9b::8.8.8.8", NULL },
    { "2001:db8::1", "reserved for documentation (RFC 3849)" },
    { "2001:4860:4860::8888", NULL }, { "2a00:1450::1", NULL },
    { "localhost", "not an IP address" }, { "[127.0.0.1]", "not an IP address" }, { "", "not an IP address" },
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *got = dns_address_class(cases[i].addr);
    if (cases[i].want) CHECK_STR(got, cases[i].want);
    else if (got) { CHECK_STR(got, "(global: NULL)"); fprintf(stderr, "  for %s\n", cases[i].addr); }
    else CHECK(1);
  }
}

/* The kind words reach Lua, results and reports: each status has its own word and text. */
static void status_words_are_distinct(void) {
  static const char *want[] = { "ok", "nxdomain", "nodata", "timeout", "servfail", "refused", "connrefused",
                                "unanswered", "formerr", "notimp", "badname", "error", "cancelled" };
  CHECK(sizeof want / sizeof want[0] == DNS_CANCELLED + 1);
  for (int i = 0; i <= DNS_CANCELLED; i++) {
    CHECK_STR(dns_status_name((dns_status)i), want[i]);
    for (int j = 0; j < i; j++) CHECK(strcmp(dns_status_text((dns_status)i), dns_status_text((dns_status)j)) != 0);
  }
  CHECK(strstr(dns_status_text(DNS_SERVFAIL), "(SERVFAIL)") != NULL);
  CHECK(strstr(dns_status_text(DNS_REFUSED), "(REFUSED)") != NULL);
  CHECK(strstr(dns_status_text(DNS_TIMEOUT), "timeout") != NULL);
}

int main(void) {
  records_of_another_owner_are_ignored();
  a_cname_chain_is_followed_and_nothing_else();
  more_mx_than_kept_keeps_the_most_preferred();
  a_long_txt_record_is_joined_whole();
  malformed_messages_are_refused();
  address_classes();
  status_words_are_distinct();
  return DONE();
}
