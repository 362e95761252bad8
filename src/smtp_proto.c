/* smtp_proto.c - pure SMTP helpers: reply parsing, EHLO capabilities, envelope address checks,
 * dot-stuffing. No I/O, no global mutable state; see smtp_proto.h for the contracts. */
#include "smtp_proto.h"
#include "seterr.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A reply that fits the byte bound must be able to hold at least one maximal line. */
_Static_assert(SMTP_REPLY_BYTES_MAX >= SMTP_LINE_MAX + 2, "reply bound smaller than one line");

/* ---------------------------------------------------------------- small helpers */

static int smtp_isdigit(unsigned char c) { return c >= '0' && c <= '9'; }

/* ASCII-only case folding: keywords and mechanism names must not depend on the locale. */
static unsigned char smtp_lower(unsigned char c) {
  return (c >= 'A' && c <= 'Z') ? (unsigned char)(c - 'A' + 'a') : c;
}

static int smtp_ieq(const char *a, size_t alen, const char *b) {
  size_t blen = strlen(b);
  if (alen != blen) return 0;
  for (size_t i = 0; i < alen; i++)
    if (smtp_lower((unsigned char)a[i]) != smtp_lower((unsigned char)b[i])) return 0;
  return 1;
}

/* ---------------------------------------------------------------- replies */

/* Validates what we have of a line's first four bytes (the whole line may not be here yet):
 * Reply-code = %x32-35 %x30-35 %x30-39 (RFC 5321 §4.2); we accept any digit for the last two like
 * OpenSMTPD does, then " ", "-" or the end of the line. `code` is the code of the reply's earlier
 * lines or 0. Returns NULL or the reason. */
static const char *smtp_line_prefix_error(const char *p, size_t n, int code) {
  if (n > 0 && (p[0] < '2' || p[0] > '5'))
    return "reply line does not start with a reply code 2xx-5xx (RFC 5321 §4.2)";
  if ((n > 1 && !smtp_isdigit((unsigned char)p[1])) || (n > 2 && !smtp_isdigit((unsigned char)p[2])))
    return "reply code is not three digits (RFC 5321 §4.2)";
  if (n > 3 && p[3] != ' ' && p[3] != '-' && p[3] != '\r')
    return "reply code not followed by space or '-' (RFC 5321 §4.2)";
  if (n > 2 && code && (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0') != code)
    return "lines of one multi-line reply have different codes (RFC 5321 §4.2.1)";
  return NULL;
}

/* Length of an enhanced status code at the start of t (RFC 2034 §4, RFC 3463 §2:
 * class "." 1*3digit "." 1*3digit, class 2/4/5), followed by a space or the end of the text.
 * With match_class, the class must equal the reply code's first digit. 0 when there is none. */
static size_t smtp_enhanced_len(const char *t, size_t n, int code, int match_class) {
  size_t i = 0;
  if (n < 5 || (t[0] != '2' && t[0] != '4' && t[0] != '5') || t[1] != '.') return 0;
  if (match_class && t[0] - '0' != code / 100) return 0;
  i = 2;
  for (int part = 0; part < 2; part++) {
    size_t start = i;
    while (i < n && i - start < 4 && smtp_isdigit((unsigned char)t[i])) i++;
    if (i == start || i - start > 3) return 0;
    if (part == 0) {
      if (i >= n || t[i] != '.') return 0;
      i++;
    }
  }
  if (i < n && t[i] != ' ') return 0;
  return i; /* at most 1+1+3+1+3 = 9 < sizeof(enhanced) */
}

/* Appends one line's text to r->text (with a '\n' before all but the first), made safe to log. */
static void smtp_reply_add_text(smtp_reply *r, size_t *tlen, const char *t, size_t n) {
  size_t room = SMTP_REPLY_TEXT_MAX - 1 - *tlen; /* keep one byte for the NUL */
  if (r->nlines > 0) {
    if (room == 0) {
      r->truncated = 1;
      return;
    }
    r->text[(*tlen)++] = '\n';
    room--;
  }
  if (n > room) {
    n = room;
    r->truncated = 1;
  }
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)t[i];
    r->text[(*tlen)++] = (c < 0x20 && c != '\t') || c == 0x7f ? '?' : (char)c;
  }
  r->text[*tlen] = '\0';
}

/* One complete line (line end removed): checks it and adds it to r. Returns NULL or the reason;
 * *more says whether it was a continuation line ("ddd-"). */
static const char *smtp_reply_line(smtp_reply *r, size_t *tlen, const char *p, size_t n, int enhanced,
                                   int *more) {
  const char *why, *t;
  size_t tn, elen;
  int code;

  if (n < 3) return "reply line shorter than a reply code (RFC 5321 §4.2)";
  if ((why = smtp_line_prefix_error(p, n, r->nlines ? r->code : 0)) != NULL) return why;
  if (n > 3 && p[3] == '\r') /* "250\rx": a CR inside the line where the separator must be */
    return "reply code not followed by space or '-' (RFC 5321 §4.2)";
  if (r->nlines >= SMTP_REPLY_LINES_MAX)
    return "reply has more than 1000 lines (our bound; RFC 5321 §4.2.1 sets none)";
  code = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
  *more = n > 3 && p[3] == '-';
  t = n > 4 ? p + 4 : p + n;
  tn = n > 4 ? n - 4 : 0;
  if ((elen = smtp_enhanced_len(t, tn, code, !enhanced)) > 0) {
    if (r->nlines == 0) {
      memcpy(r->enhanced, t, elen);
      r->enhanced[elen] = '\0';
    }
    while (elen < tn && t[elen] == ' ') elen++;
    t += elen;
    tn -= elen;
  }
  if (r->nlines == 0) r->code = code;
  smtp_reply_add_text(r, tlen, t, tn);
  r->nlines++;
  return NULL;
}

int smtp_reply_parse(const char *buf, size_t len, int enhanced, smtp_reply *r, char *err, size_t errlen) {
  size_t pos = 0, tlen = 0;
  const char *why;

  r->code = 0;
  r->enhanced[0] = '\0';
  r->text[0] = '\0';
  r->nlines = 0;
  r->truncated = 0;
  if (err && errlen) err[0] = '\0';
  for (;;) {
    const char *line = buf + pos;
    size_t avail = len - pos, scan, n;
    const char *nl;
    int more = 0;

    /* a line holds at most SMTP_LINE_MAX octets plus CRLF: never look further for its LF */
    scan = avail < SMTP_LINE_MAX + 2 ? avail : SMTP_LINE_MAX + 2;
    nl = memchr(line, '\n', scan);
    if (!nl) {
      n = avail - (avail > 0 && line[avail - 1] == '\r'); /* octets certainly in the line */
      if (n > SMTP_LINE_MAX)
        why = "reply line longer than 8192 octets (RFC 5321 §4.5.3.1.5 says 512; we allow 8192)";
      else if (len > SMTP_REPLY_BYTES_MAX)
        why = "reply longer than 65536 octets (our bound)";
      else if (avail > 0 && r->nlines >= SMTP_REPLY_LINES_MAX)
        why = "reply has more than 1000 lines (our bound; RFC 5321 §4.2.1 sets none)";
      else
        why = smtp_line_prefix_error(line, avail, r->nlines ? r->code : 0);
      if (why) goto fail;
      return 0;
    }
    n = (size_t)(nl - line);
    pos += n + 1;
    if (n > 0 && line[n - 1] == '\r') n--;
    if (n > SMTP_LINE_MAX) {
      why = "reply line longer than 8192 octets (RFC 5321 §4.5.3.1.5 says 512; we allow 8192)";
      goto fail;
    }
    if (pos > SMTP_REPLY_BYTES_MAX) {
      why = "reply longer than 65536 octets (our bound)";
      goto fail;
    }
    if ((why = smtp_reply_line(r, &tlen, line, n, enhanced, &more)) != NULL) goto fail;
    if (!more) return (int)pos;
  }
fail:
  seterr(err, errlen, "%s", why);
  return -1;
}

smtp_class smtp_reply_class(const smtp_reply *r) {
  if (!r || r->code < 200 || r->code > 599) return SMTP_CLASS_TEMPORARY;
  /* The first digit decides (RFC 5321 §4.2.1). An enhanced code's class can only agree with it (the
   * parser keeps a disagreeing one only when ENHANCEDSTATUSCODES was advertised, and RFC 2034 §4
   * forbids it), so a server bug like "550 4.2.2" stays permanent: the basic code wins, as in Postfix. */
  switch (r->code / 100) {
    case 2:
    case 3:
      return SMTP_CLASS_OK;
    case 4:
      return SMTP_CLASS_TEMPORARY;
    default:
      return SMTP_CLASS_PERMANENT;
  }
}

/* ---------------------------------------------------------------- EHLO capabilities */

/* Appends word w (n bytes) to the space separated list dst (size cap) if it fits whole. */
static void smtp_list_add(char *dst, size_t cap, const char *w, size_t n) {
  size_t used = strlen(dst), need = n + (used > 0);
  if (n == 0 || used + need >= cap) return;
  if (used > 0) dst[used++] = ' ';
  memcpy(dst + used, w, n);
  dst[used + n] = '\0';
}

/* 1 if the space separated list holds word w (n bytes), case-insensitively. */
static int smtp_list_has(const char *list, const char *w, size_t n) {
  const char *p = list;
  while (*p) {
    const char *e = strchr(p, ' ');
    size_t l = e ? (size_t)(e - p) : strlen(p);
    if (l == n) {
      size_t i = 0;
      while (i < n && smtp_lower((unsigned char)p[i]) == smtp_lower((unsigned char)w[i])) i++;
      if (i == n) return 1;
    }
    p += l + (e != NULL);
  }
  return 0;
}

/* AUTH mechanisms (RFC 4954 §3), space separated in p/n. */
static void smtp_caps_auth(smtp_caps *caps, const char *p, size_t n) {
  size_t i = 0;
  while (i < n) {
    size_t s;
    while (i < n && p[i] == ' ') i++;
    s = i;
    while (i < n && p[i] != ' ') i++;
    if (i == s) break;
    if (smtp_ieq(p + s, i - s, "PLAIN"))
      caps->auth_plain = 1;
    else if (smtp_ieq(p + s, i - s, "LOGIN"))
      caps->auth_login = 1;
    if (!smtp_list_has(caps->auth, p + s, i - s)) smtp_list_add(caps->auth, sizeof(caps->auth), p + s, i - s);
  }
}

/* SIZE parameter (RFC 1870 §4): digits; none or junk = 0 (no limit given); saturates on overflow. */
static unsigned long long smtp_caps_size(const char *p, size_t n) {
  unsigned long long v = 0;
  size_t i = 0;
  while (i < n && p[i] == ' ') i++;
  if (i == n) return 0;
  for (; i < n && smtp_isdigit((unsigned char)p[i]); i++) {
    unsigned d = (unsigned)(p[i] - '0');
    if (v > (~0ULL - d) / 10) return ~0ULL;
    v = v * 10 + d;
  }
  return i == n || p[i] == ' ' ? v : 0;
}

/* One EHLO line: ehlo-keyword *( SP ehlo-param ) (RFC 5321 §4.1.1.1). */
static void smtp_caps_line(smtp_caps *caps, const char *p, size_t n) {
  size_t k = 0, a;
  while (n > 0 && (*p == ' ' || *p == '\t')) p++, n--;
  while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t')) n--;
  if (n == 0) return;
  smtp_list_add(caps->names, sizeof(caps->names), p, n);
  while (k < n && p[k] != ' ' && p[k] != '=') k++;
  a = k < n ? k + 1 : n; /* parameters start after the SP, or after "AUTH=" */
  if (smtp_ieq(p, k, "PIPELINING"))
    caps->pipelining = 1; /* RFC 2920 */
  else if (smtp_ieq(p, k, "STARTTLS"))
    caps->starttls = 1; /* RFC 3207 */
  else if (smtp_ieq(p, k, "8BITMIME"))
    caps->eightbitmime = 1; /* RFC 6152 */
  else if (smtp_ieq(p, k, "ENHANCEDSTATUSCODES"))
    caps->enhancedstatuscodes = 1; /* RFC 2034 */
  else if (smtp_ieq(p, k, "SMTPUTF8"))
    caps->smtputf8 = 1; /* RFC 6531 */
  else if (smtp_ieq(p, k, "SIZE") && (k == n || p[k] == ' ')) { /* RFC 1870 */
    caps->size_present = 1;
    caps->size = smtp_caps_size(p + a, n - a);
  } else if (smtp_ieq(p, k, "AUTH")) /* RFC 4954, and the old "AUTH=" of RFC 2554 drafts */
    smtp_caps_auth(caps, p + a, n - a);
}

void smtp_caps_parse(const smtp_reply *ehlo_reply, smtp_caps *caps) {
  const char *p;
  size_t n;

  memset(caps, 0, sizeof(*caps));
  if (!ehlo_reply) return;
  p = ehlo_reply->text;
  n = strnlen(p, sizeof(ehlo_reply->text));
  /* the first line is the server's domain and greeting, not a keyword (RFC 5321 §4.1.1.1) */
  {
    const char *e = memchr(p, '\n', n);
    if (!e) return;
    n -= (size_t)(e + 1 - p);
    p = e + 1;
  }
  while (n > 0) {
    const char *e = memchr(p, '\n', n);
    size_t l = e ? (size_t)(e - p) : n;
    smtp_caps_line(caps, p, l);
    p += l;
    n -= l;
    if (e) {
      p++;
      n--;
    }
  }
}

void smtp_caps_parse_raw(const char *buf, size_t len, smtp_caps *caps) {
  char line[SMTP_LINE_MAX + 1];
  size_t pos = 0;
  int first = 1;

  memset(caps, 0, sizeof(*caps));
  while (pos < len) {
    const char *p = buf + pos, *e = memchr(p, '\n', len - pos);
    size_t n = e ? (size_t)(e - p) : len - pos, elen;
    pos += n + (e != NULL);
    if (n > 0 && p[n - 1] == '\r') n--;
    if (first || n <= 4) { /* the greeting line (RFC 5321 §4.1.1.1), or "250" with no keyword */
      first = 0;
      continue;
    }
    p += 4; /* "250-" / "250 " */
    n -= 4;
    if (n > SMTP_LINE_MAX) /* cannot happen after smtp_reply_parse(); bounds the copy anyway */
      n = SMTP_LINE_MAX;
    /* as smtp_reply_line() does: an enhanced code of the reply's class is not part of the keyword */
    if ((elen = smtp_enhanced_len(p, n, (p[-4] - '0') * 100, 1)) > 0) {
      while (elen < n && p[elen] == ' ') elen++;
      p += elen;
      n -= elen;
    }
    for (size_t i = 0; i < n; i++) {
      unsigned char c = (unsigned char)p[i];
      line[i] = (c < 0x20 && c != '\t') || c == 0x7f ? '?' : (char)c;
    }
    smtp_caps_line(caps, line, n);
  }
}

/* ---------------------------------------------------------------- envelope addresses */

static int smtp_addr_fail(char *why, size_t whylen, const char *reason) {
  seterr(why, whylen, "%s", reason);
  return 0;
}

/* Characters that may never appear unquoted in an address: RFC 5321 §4.1.2 allows only atext and '.'
 * in a Dot-string; we reject the specials that could confuse a server's parser and let other odd but
 * harmless printable bytes through (real mailboxes have them). */
static int smtp_addr_special(unsigned char c) {
  return c == ' ' || c == '<' || c == '>' || c == '(' || c == ')' || c == '[' || c == ']' || c == ',' ||
         c == ';' || c == ':' || c == '\\' || c == '"' || c == '@';
}

/* The local part at a[0..]: returns its length (up to the '@'), or 0 with *reason set. */
static size_t smtp_addr_local(const char *a, size_t len, const char **reason) {
  size_t i = 0;
  if (a[0] == '"') { /* Quoted-string (RFC 5321 §4.1.2): qtextSMTP / quoted-pairSMTP */
    for (i = 1; i < len && a[i] != '"'; i++)
      if (a[i] == '\\' && ++i >= len) break;
    if (i >= len) {
      *reason = "unterminated quoted local part";
      return 0;
    }
    i++; /* past the closing quote */
    if (i >= len || a[i] != '@') {
      *reason = len > i ? "text after the quoted local part" : "no '@' in address";
      return 0;
    }
    return i;
  }
  for (i = 0; i < len && a[i] != '@'; i++)
    if (smtp_addr_special((unsigned char)a[i])) {
      *reason = a[i] == ' ' ? "space outside a quoted local part" : "special character in local part";
      return 0;
    }
  if (i == len) {
    *reason = "no '@' in address";
    return 0;
  }
  if (i == 0) *reason = "empty local part";
  return i;
}

/* The domain (RFC 5321 §4.1.2: Domain or address-literal). NULL if fine, else the reason. */
static const char *smtp_addr_domain(const char *d, size_t n) {
  if (n == 0) return "empty domain";
  if (n > SMTP_DOMAIN_MAX) return "domain longer than 255 octets (RFC 5321 §4.5.3.1.2)";
  if (d[0] == '[') { /* address-literal: dcontent = %d33-90 / %d94-126 */
    if (n < 3 || d[n - 1] != ']') return "malformed address literal";
    for (size_t i = 1; i < n - 1; i++)
      if (d[i] == '[' || d[i] == ']' || d[i] == '\\') return "malformed address literal";
    return NULL;
  }
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)d[i];
    if (c == '@') return "more than one '@' in address";
    if (c == '.' && (i == 0 || i == n - 1 || d[i - 1] == '.')) return "empty label in domain";
    if (!(c >= 0x80 || c == '-' || c == '.' || c == '_' || smtp_isdigit(c) ||
          (smtp_lower(c) >= 'a' && smtp_lower(c) <= 'z')))
      return "invalid character in domain";
  }
  return NULL;
}

int smtp_addr_ok(const char *addr, size_t len, int allow_empty, char *why, size_t whylen) {
  const char *reason = NULL;
  size_t local;

  if (why && whylen) why[0] = '\0';
  if (len == 0) return allow_empty ? 1 : smtp_addr_fail(why, whylen, "empty address");
  if (!addr) return smtp_addr_fail(why, whylen, "empty address");
  if (len + 2 > SMTP_PATH_MAX)
    return smtp_addr_fail(why, whylen, "address longer than 254 octets (RFC 5321 §4.5.3.1.3: path 256)");
  /* the injection vectors first, wherever they are, quoted or not */
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)addr[i];
    if (c == '\r' || c == '\n') return smtp_addr_fail(why, whylen, "CR or LF in address");
    if (c == '\0') return smtp_addr_fail(why, whylen, "NUL in address");
    if (c < 0x20 || c == 0x7f) return smtp_addr_fail(why, whylen, "control character in address");
    if (c == '<' || c == '>') return smtp_addr_fail(why, whylen, "'<' or '>' in address");
  }
  local = smtp_addr_local(addr, len, &reason);
  if (reason) return smtp_addr_fail(why, whylen, reason);
  if (local > SMTP_LOCAL_MAX)
    return smtp_addr_fail(why, whylen, "local part longer than 64 octets (RFC 5321 §4.5.3.1.1)");
  if ((reason = smtp_addr_domain(addr + local + 1, len - local - 1)) != NULL)
    return smtp_addr_fail(why, whylen, reason);
  return 1;
}

/* ---------------------------------------------------------------- DATA */

int smtp_dot_stuff(bytebuf *out, const char *msg, size_t len) {
  size_t start = out->len;

  if (bytebuf_crlf(out, msg, len, 1) < 0) return -1;
  /* data ends with CRLF unless empty (bytebuf_crlf writes a CR only in a CRLF), then ".CRLF"
   * (RFC 5321 §4.1.1.4) */
  if (out->len > start && (out->len - start < 2 || memcmp(out->data + out->len - 2, "\r\n", 2) != 0) &&
      bytebuf_append(out, "\r\n", 2) < 0)
    goto fail;
  if (bytebuf_append(out, ".\r\n", 3) < 0) goto fail;
  return 0;
fail:
  out->len = start;
  out->data[start] = '\0';
  return -1;
}

int smtp_data_has_8bit(const char *msg, size_t len) {
  size_t i = 0;
  /* eight bytes at a time; memcpy keeps it free of alignment and aliasing trouble */
  for (; i + 8 <= len; i += 8) {
    uint64_t w;
    memcpy(&w, msg + i, 8);
    if (w & UINT64_C(0x8080808080808080)) return 1;
  }
  for (; i < len; i++)
    if ((unsigned char)msg[i] & 0x80) return 1;
  return 0;
}
