/* seterr.h - the one way a C module fills its caller's error buffer (csv_reader, dkim, smtp_proto):
 * printf-style into err[errlen]; nothing when there is no buffer. */
#ifndef MAILSHOT_SETERR_H
#define MAILSHOT_SETERR_H
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

static inline void seterr(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static inline void seterr(char *err, size_t errlen, const char *fmt, ...) {
  if (!err || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  if (vsnprintf(err, errlen, fmt, ap) < 0) err[0] = '\0';
  va_end(ap);
}

#endif
