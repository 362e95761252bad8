/* bytebuf.c - growable byte buffer, CRLF line breaks, base64; see bytebuf.h for the contracts. */
#include "bytebuf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- output buffer */

/* Room for n more bytes plus a NUL. */
int bytebuf_reserve(bytebuf *b, size_t n) {
  size_t need, cap;
  char *p;
  if (n > SIZE_MAX - 1 - b->len) {
    errno = ENOMEM;
    return -1;
  }
  need = b->len + n + 1;
  if (b->data && need <= b->cap)
    return 0;
  cap = b->cap < 64 ? 64 : b->cap;
  while (cap < need)
    cap = cap > SIZE_MAX / 2 ? need : cap * 2;
  if ((p = realloc(b->data, cap)) == NULL) {
    errno = ENOMEM;
    return -1;
  }
  if (!b->data)
    p[0] = '\0';
  b->data = p;
  b->cap = cap;
  return 0;
}

int bytebuf_append(bytebuf *b, const void *p, size_t n) {
  if (bytebuf_reserve(b, n) < 0)
    return -1;
  if (n)
    memcpy(b->data + b->len, p, n);
  b->len += n;
  b->data[b->len] = '\0';
  return 0;
}

int bytebuf_printf(bytebuf *b, const char *fmt, ...) {
  va_list ap;
  int n;
  size_t room;

  if (bytebuf_reserve(b, 0) < 0)
    return -1;
  room = b->cap - b->len;
  va_start(ap, fmt);
  n = vsnprintf(b->data + b->len, room, fmt, ap);
  va_end(ap);
  if (n < 0)
    goto fail;
  if ((size_t)n >= room) {      /* did not fit: grow, then format again */
    if (bytebuf_reserve(b, (size_t)n) < 0)
      goto fail;
    va_start(ap, fmt);
    n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0)
      goto fail;
  }
  b->len += (size_t)n;
  return 0;
fail:
  b->data[b->len] = '\0';       /* undo any partial output */
  return -1;
}

void bytebuf_free(bytebuf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* ---------------------------------------------------------------- line breaks */

/* Next CR or LF at or after p, using cached positions so every byte is scanned at most once per
 * character even when one of them never appears (an LF-only message has no CR at all). */
static const char *next_eol(const char *p, const char *end, const char **cr, const char **lf) {
  if (*cr && *cr < p)
    *cr = memchr(p, '\r', (size_t)(end - p));
  if (*lf && *lf < p)
    *lf = memchr(p, '\n', (size_t)(end - p));
  if (!*cr && !*lf)
    return end;
  if (!*cr)
    return *lf;
  if (!*lf)
    return *cr;
  return *cr < *lf ? *cr : *lf;
}

int bytebuf_lines(const char *s, size_t n, bytebuf_line_fn *fn, void *ud) {
  const char *p = s, *end = s + n;
  const char *cr = n ? memchr(s, '\r', n) : NULL, *lf = n ? memchr(s, '\n', n) : NULL;
  while (p < end) {
    const char *e = next_eol(p, end, &cr, &lf);
    int brk = e == end ? 0 : (*e == '\r' && e + 1 < end && e[1] == '\n') ? 2 : 1;
    int rc = fn(ud, p, (size_t)(e - p), brk);
    if (rc)
      return rc;
    p = e + brk;
  }
  return 0;
}

/* Copies s[from, to) into out, room for it reserved by the caller's growth checks. */
static int put(bytebuf *out, const char *from, const char *to) {
  return to > from ? bytebuf_append(out, from, (size_t)(to - from)) : 0;
}

/* The same breaks as bytebuf_lines, but without a call per line: a message is nearly always CRLF
 * already, so the bytes between the places that change (a bare CR or LF, a '.' starting a line) are
 * copied in one piece.  Every byte is scanned at most twice (memchr for LF over the rest, for CR over
 * one line), against a callback and three appends a line before: DATA and DKIM both do this for
 * every message, and it was a tenth of the CPU a message costs. */
static int crlf_copy(bytebuf *out, const char *s, size_t n, int dot_stuff) {
  const char *p = s, *end = s + n, *from = s;   /* [from, p): bytes seen and not yet copied */
  while (p < end) {                              /* p: the start of a line */
    if (dot_stuff && *p == '.') {
      if (put(out, from, p) < 0 || bytebuf_append(out, ".", 1) < 0) return -1;
      from = p;                                  /* the line's own '.' goes with the line */
    }
    const char *lf = memchr(p, '\n', (size_t)(end - p));
    const char *stop = lf ? lf : end;
    const char *cr = memchr(p, '\r', (size_t)(stop - p));
    if (cr && cr + 1 != lf) {                    /* a bare CR ends this line */
      if (put(out, from, cr) < 0 || bytebuf_append(out, "\r\n", 2) < 0) return -1;
      p = from = cr + 1;
    } else if (!lf) {                            /* the last line, without a break */
      break;
    } else if (!cr) {                            /* a bare LF */
      if (put(out, from, lf) < 0 || bytebuf_append(out, "\r\n", 2) < 0) return -1;
      p = from = lf + 1;
    } else {                                     /* CRLF: nothing to change */
      p = lf + 1;
    }
  }
  return put(out, from, end);
}

int bytebuf_crlf(bytebuf *out, const char *s, size_t n, int dot_stuff) {
  size_t start = out->len;
  /* one reservation for the usual case: a few CRs added */
  if (bytebuf_reserve(out, n + n / 32 + 8) < 0)
    return -1;
  if (crlf_copy(out, s, n, dot_stuff) != 0) {
    out->len = start;
    out->data[start] = '\0';
    return -1;
  }
  return 0;
}

/* ---------------------------------------------------------------- base64 (RFC 4648 §4) */

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int bytebuf_base64_encode(bytebuf *out, const void *in, size_t n) {
  const unsigned char *s = in;
  size_t olen, i;
  char *d;

  if (n > (SIZE_MAX - 4) / 4 * 3) {
    errno = ENOMEM;
    return -1;
  }
  olen = (n + 2) / 3 * 4;
  if (bytebuf_reserve(out, olen) < 0)
    return -1;
  d = out->data + out->len;
  for (i = 0; i + 3 <= n; i += 3) {
    unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8 | s[i + 2];
    *d++ = b64[v >> 18];
    *d++ = b64[(v >> 12) & 63];
    *d++ = b64[(v >> 6) & 63];
    *d++ = b64[v & 63];
  }
  if (i < n) {                  /* one or two bytes left: pad (RFC 4648 §4) */
    unsigned v = (unsigned)s[i] << 16 | (i + 1 < n ? (unsigned)s[i + 1] << 8 : 0);
    *d++ = b64[v >> 18];
    *d++ = b64[(v >> 12) & 63];
    *d++ = i + 1 < n ? b64[(v >> 6) & 63] : '=';
    *d++ = '=';
  }
  out->len += olen;
  out->data[out->len] = '\0';
  return 0;
}

static int b64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

int bytebuf_base64_decode(const char *in, size_t n, bytebuf *out) {
  size_t start = out->len, pad = 0, i;
  unsigned v = 0;
  int bits = 0;

  /* padding only at the very end, at most two, and only to complete a quantum */
  while (pad < n && pad < 2 && in[n - 1 - pad] == '=')
    pad++;
  if (pad && n % 4 != 0)
    goto fail;
  n -= pad;
  if (n % 4 == 1)               /* 6 bits cannot make a byte */
    goto fail;
  if (bytebuf_reserve(out, n / 4 * 3 + 2) < 0)
    return -1;
  for (i = 0; i < n; i++) {
    int c = b64_value((unsigned char)in[i]);
    if (c < 0)
      goto fail;
    v = (v << 6 | (unsigned)c) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out->data[out->len++] = (char)(v >> bits & 0xff);
    }
  }
  out->data[out->len] = '\0';
  return 0;
fail:
  out->len = start;
  if (out->data)
    out->data[start] = '\0';
  return -1;
}
