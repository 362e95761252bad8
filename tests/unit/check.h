/* check.h - the few assertion helpers our C unit tests share.
 * Each test file has its own main(); CHECK records a failure and goes on, so one run shows every
 * broken case; DONE() prints the tally and gives the exit status. */
#ifndef MAILSHOT_CHECK_H
#define MAILSHOT_CHECK_H
#include <stdio.h>
#include <string.h>

static int check_failures, check_count;

#define CHECK(cond) do { check_count++; if (!(cond)) { check_failures++; \
  fprintf(stderr, "%s:%d: FAIL: %s\n", __FILE__, __LINE__, #cond); } } while (0)
#define CHECK_INT(got, want) do { long long g_ = (got), w_ = (want); check_count++; if (g_ != w_) { \
  check_failures++; fprintf(stderr, "%s:%d: FAIL: %s = %lld, want %lld\n", __FILE__, __LINE__, #got, g_, w_); } } while (0)
#define CHECK_STR(got, want) do { const char *g_ = (got), *w_ = (want); check_count++; \
  if (!g_ || !w_ || strcmp(g_, w_) != 0) { check_failures++; fprintf(stderr, "%s:%d: FAIL: %s = \"%s\", want \"%s\"\n", \
  __FILE__, __LINE__, #got, g_ ? g_ : "(null)", w_ ? w_ : "(null)"); } } while (0)
#define DONE() (printf("%s: %d checks, %d failed\n", __FILE__, check_count, check_failures), check_failures ? 1 : 0)

#endif
