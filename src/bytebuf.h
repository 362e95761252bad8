/* bytebuf.h - a growable byte buffer, and the byte-level encodings written into one that SMTP and DKIM
 * share: line breaks made CRLF (the one normaliser), base64.  No I/O, no global state. */
#ifndef MAILSHOT_BYTEBUF_H
#define MAILSHOT_BYTEBUF_H
#include <stddef.h>

/* Growable output buffer the caller owns; start it as {0}. After every successful call data is
 * non-NULL and data[len] == '\0' (handy for logs), though the contents may hold NULs themselves.
 * On failure the buffer is left exactly as it was before the call. */
typedef struct { char *data; size_t len, cap; } bytebuf;
int  bytebuf_append(bytebuf *b, const void *p, size_t n);     /* 0 ok, -1 ENOMEM; amortised growth */
int  bytebuf_reserve(bytebuf *b, size_t n);                   /* room for n more bytes: 0 ok, -1 ENOMEM */
int  bytebuf_printf(bytebuf *b, const char *fmt, ...)         /* 0 ok, -1 (ENOMEM or a format error) */
#if defined(__GNUC__)
  __attribute__((format(printf, 2, 3)))
#endif
  ;
void bytebuf_free(bytebuf *b);                                 /* frees and resets to {0} */

/* Line breaks, the one place they are found: a CRLF, a bare LF and a bare CR each end a line
 * (RFC 5321 §2.3.8 wants CRLF; messages come with any of the three).  bytebuf_lines calls
 * fn(ud, line, n, brk) for each line of s, line/n without its break, brk the break: 2 for CRLF, 1 for a
 * bare LF or CR, 0 for a last line with none (not called for an empty one).  It stops at the first
 * non-zero return of fn and returns that; 0 when every line was seen. */
typedef int bytebuf_line_fn(void *ud, const char *line, size_t n, int brk);
int  bytebuf_lines(const char *s, size_t n, bytebuf_line_fn *fn, void *ud);

/* Appends s with every line break made CRLF; with dot_stuff, a '.' starting a line is doubled (SMTP's
 * transparency, RFC 5321 §4.5.2).  A last line without a break is appended without one.
 * 0 ok, -1 ENOMEM (out unchanged). */
int  bytebuf_crlf(bytebuf *out, const char *s, size_t n, int dot_stuff);

/* base64 (RFC 4648 §4), for AUTH PLAIN/LOGIN (RFC 4954 §4) and DKIM. encode: appends, 0 ok, -1 ENOMEM.
 * decode: appends the decoded bytes; -1 on invalid input (a byte outside the alphabet, misplaced '=',
 * a length that cannot be base64) or ENOMEM, out unchanged. Missing trailing padding is accepted;
 * whitespace is not. */
int  bytebuf_base64_encode(bytebuf *out, const void *in, size_t n);
int  bytebuf_base64_decode(const char *in, size_t n, bytebuf *out);

#endif
