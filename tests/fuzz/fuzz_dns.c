/* fuzz_dns.c - libFuzzer target for the DNS answer parser (what any server on the path may send).
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc tests/fuzz/fuzz_dns.c src/dns.c src/loop.c -lcares
 *
 * The first input byte picks the record type asked for (A, AAAA, MX, TXT), the rest is the
 * message.  Checks what the callers rely on: a count in range, every record of the type asked,
 * data NUL-terminated at len, at most DNS_MAX_MX MX records; and that a deep copy equals. */
#include "dns.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ASSERT(c) do { if (!(c)) { __builtin_trap(); } } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const int types[] = { DNS_T_A, DNS_T_AAAA, DNS_T_MX, DNS_T_TXT };
  if (size < 1 || size > 65536) return 0;
  int type = types[data[0] % 4];
  dns_rr *rrs = NULL;
  int n = dns_parse_answer(data + 1, (int)(size - 1), type, &rrs);
  ASSERT(n >= -1);
  ASSERT((n > 0) == (rrs != NULL));
  if (type == DNS_T_MX) ASSERT(n <= DNS_MAX_MX);
  for (int i = 0; i < n; i++) {
    ASSERT(rrs[i].type == type);
    ASSERT(rrs[i].data && rrs[i].data[rrs[i].len] == '\0');
    if (type != DNS_T_TXT) ASSERT(strlen(rrs[i].data) == rrs[i].len);
    if (type == DNS_T_TXT) ASSERT(rrs[i].len < size);
  }
  dns_rr *copy = n > 0 ? dns_rrs_copy(rrs, n) : NULL;
  for (int i = 0; copy && i < n; i++) ASSERT(copy[i].len == rrs[i].len && memcmp(copy[i].data, rrs[i].data, rrs[i].len) == 0);
  dns_rrs_free(copy, n);
  dns_rrs_free(rrs, n);
  return 0;
}
