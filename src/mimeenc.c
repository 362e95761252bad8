/* mimeenc.c - quoted-printable, base64 lines and RFC 2047 encoded-words; see mimeenc.h.
 *
 * These used to be Lua (mime.lua); on a campaign with international names they were more than half
 * of the CPU time of a run: a QP body made with gsub and a table of escapes, and an encoded-word
 * built a UTF-8 character at a time.  The rules, and the output, are those of the Lua code. */
#include "mimeenc.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>

static const char HEX[] = "0123456789ABCDEF";

/* ---------------------------------------------------------------- quoted-printable */

/* RFC 2045 6.7 (2), (3): printable ASCII but "=" goes as it is, and so do tab and space, except at
 * the end of a line (qp_line). */
static int qp_plain(unsigned char c) { return (c >= 32 && c <= 126 && c != '=') || c == '\t'; }

/* bytebuf_lines callback: one line of the text, encoded, and a CRLF when a break ended it.  The
 * encoded length is counted first: while more than 76 characters of the line are left, a soft break
 * ("=" CRLF) follows the most whole characters or =XX escapes that make at most 75. */
static int qp_line(void *ud, const char *line, size_t n, int brk) {
  bytebuf *out = ud;
  const unsigned char *s = (const unsigned char *)line;
  size_t len = n, i = 0;                          /* the encoded line's length */
  for (; i + 8 <= n; i += 8) {                    /* 8 bytes at a time: any to look at? */
    const uint64_t ones = 0x0101010101010101ull, high = 0x8080808080808080ull;
    uint64_t w;
    memcpy(&w, s + i, 8);
    /* the lowest byte < 32, >= 127 or "=" sets its high bit in one of these (higher ones may be
     * false alarms, and tab is one): exact enough to skip 8 plain bytes */
    if (((w | (w - 0x20 * ones) | (w + ones) | ((w ^ 0x3D * ones) - ones)) & high) == 0) continue;
    for (size_t j = i; j < i + 8; j++) len += qp_plain(s[j]) ? 0 : 2;
  }
  for (; i < n; i++) len += qp_plain(s[i]) ? 0 : 2;
  int blank_end = n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t');
  if (blank_end) len += 2;                        /* RFC 2045 6.7 (3): =20 or =09 */
  if (len > (SIZE_MAX - 8) / 2 || bytebuf_reserve(out, len + 3 * (len / 73 + 1) + 2) < 0) return -1;
  char *d = out->data + out->len;
  size_t left = len, col = 0;                     /* characters from the current line's start on */
  if (len == n) {                                 /* all plain (an ASCII line): 75 at a time */
    for (; left > MIMEENC_QP_LINE; line += MIMEENC_QP_LINE - 1, left -= MIMEENC_QP_LINE - 1) {
      memcpy(d, line, MIMEENC_QP_LINE - 1);
      memcpy(d + MIMEENC_QP_LINE - 1, "=\r\n", 3);
      d += MIMEENC_QP_LINE + 2;
    }
    memcpy(d, line, left);
    d += left;
    n = 0;
  }
  for (i = 0; i < n; i++) {
    unsigned char c = s[i];
    int plain = qp_plain(c) && !(blank_end && i + 1 == n);
    size_t k = plain ? 1 : 3;
    if (left > MIMEENC_QP_LINE && col + k > MIMEENC_QP_LINE - 1) {
      memcpy(d, "=\r\n", 3);
      d += 3;
      left -= col;
      col = 0;
    }
    if (plain) *d++ = (char)c;
    else d[0] = '=', d[1] = HEX[c >> 4], d[2] = HEX[c & 15], d += 3;
    col += k;
  }
  if (brk) *d++ = '\r', *d++ = '\n';
  out->len = (size_t)(d - out->data);
  out->data[out->len] = '\0';
  return 0;
}

int mimeenc_qp(bytebuf *out, const char *s, size_t n) {
  size_t len0 = out->len;
  if (bytebuf_reserve(out, n + n / 8 + 16) < 0) return -1;   /* the usual size, in one go */
  if (bytebuf_lines(s, n, qp_line, out) != 0) {
    out->len = len0;
    out->data[len0] = '\0';
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

/* ---------------------------------------------------------------- base64 lines */

int mimeenc_base64_lines(bytebuf *out, const void *s, size_t n) {
  const unsigned char *p = s;
  const size_t per_line = MIMEENC_B64_LINE / 4 * 3;          /* 57 bytes make a whole line */
  size_t len0 = out->len;
  if (n > SIZE_MAX / 2 || bytebuf_reserve(out, (n + 2) / 3 * 4 + n / per_line * 2 + 1) < 0) {
    errno = ENOMEM;
    return -1;
  }
  for (size_t i = 0; i < n; i += per_line) {
    size_t k = n - i < per_line ? n - i : per_line;
    if ((i > 0 && bytebuf_append(out, "\r\n", 2) < 0) || bytebuf_base64_encode(out, p + i, k) < 0) {
      out->len = len0;
      out->data[len0] = '\0';
      return -1;
    }
  }
  return 0;
}

/* ---------------------------------------------------------------- RFC 2047 encoded-words */

/* RFC 2047 5 (3): what a Q-encoded word may carry as it is in any header position (a phrase is the
 * strictest); a space is "_" (4.2 (2)); anything else =XX. */
static int q_safe(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '!'
         || c == '*' || c == '+' || c == '-' || c == '/';
}
static size_t q_len(unsigned char c) { return c == ' ' || q_safe(c) ? 1 : 3; }

/* The end of the character starting at s[i]: a byte and the continuation bytes after it, at most
 * three (a stray continuation byte is a character of its own). */
static size_t unit_end(const unsigned char *s, size_t i, size_t n) {
  size_t j = i + 1;
  while (j < n && j < i + 4 && (s[j] & 0xC0) == 0x80) j++;
  return j;
}

typedef struct {
  bytebuf *out;
  const unsigned char *s;
  int q;          /* Q, else B */
  int words;      /* how many written */
} word_writer;

/* Write s[a..b) as one encoded-word (after a space unless it is the first). */
static int emit(word_writer *w, size_t a, size_t b) {
  bytebuf *out = w->out;
  if (bytebuf_reserve(out, 14 + 3 * (b - a)) < 0) return -1;
  if (w->words++ > 0) out->data[out->len++] = ' ';
  memcpy(out->data + out->len, w->q ? "=?UTF-8?Q?" : "=?UTF-8?B?", 10);
  out->len += 10;
  if (w->q) {
    char *d = out->data + out->len;
    for (size_t i = a; i < b; i++) {
      unsigned char c = w->s[i];
      if (c == ' ') *d++ = '_';
      else if (q_safe(c)) *d++ = (char)c;
      else d[0] = '=', d[1] = HEX[c >> 4], d[2] = HEX[c & 15], d += 3;
    }
    out->len = (size_t)(d - out->data);
  } else if (bytebuf_base64_encode(out, w->s + a, b - a) < 0) {
    return -1;
  }
  return bytebuf_append(out, "?=", 2);
}

/* Does an encoded-word with len bytes of text fit in room characters? */
static int fits(int q, size_t len, size_t room) {
  return 12 + (q ? len : 4 * ((len + 2) / 3)) <= room;
}

static int words(word_writer *w, size_t n, size_t first) {
  const unsigned char *s = w->s;
  size_t unsafe = 0;
  for (size_t i = 0; i < n; i++) unsafe += q_len(s[i]) == 3;
  size_t qlen = n + 2 * unsafe, blen = 4 * ((n + 2) / 3);
  w->q = qlen <= blen;
  if (n > 0 && 12 + (w->q ? qlen : blen) <= first) return emit(w, 0, n);   /* all in one word */
  const size_t NONE = SIZE_MAX;
  size_t room = first, start = 0, curlen = 0, brk = NONE, brklen = 0;
  for (size_t i = 0, e; i < n; i = e) {
    e = unit_end(s, i, n);
    size_t plen = 0;
    if (w->q) for (size_t j = i; j < e; j++) plen += q_len(s[j]);
    else plen = e - i;
    while (curlen > 0 && !fits(w->q, curlen + plen, room)) {
      /* full: end the word after its last space when text follows that space, else here */
      if (brk != NONE && brk < i) {
        if (emit(w, start, brk) < 0) return -1;
        start = brk, curlen -= brklen;
      } else {
        if (emit(w, start, i) < 0) return -1;
        start = i, curlen = 0;
      }
      brk = NONE, room = MIMEENC_WORD_MAX;
    }
    curlen += plen;
    if (e - i == 1 && s[i] == ' ') brk = e, brklen = curlen;
  }
  if (curlen > 0 && emit(w, start, n) < 0) return -1;
  return 0;
}

int mimeenc_words(bytebuf *out, const char *s, size_t n, size_t first) {
  size_t len0 = out->len;
  word_writer w = { out, (const unsigned char *)s, 0, 0 };
  if (n > SIZE_MAX / 4 || bytebuf_reserve(out, 0) < 0 || words(&w, n, first) < 0) {
    if (out->data) out->len = len0, out->data[len0] = '\0';
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

/* ---------------------------------------------------------------- header text and folding */

static int blank(unsigned char c) { return c == ' ' || c == '\t'; }
static int line_break(unsigned char c) { return c == '\r' || c == '\n' || c == '\0'; }
static int plain_text(unsigned char c) { return c == '\t' || (c >= 32 && c <= 126); }

/* The length of the UTF-8 character at s[i] (s[i..n)), or 0 when it is not valid: Lua 5.4's
 * utf8_decode in strict mode (what utf8.len checks), with bytes past n read as NUL. */
static size_t utf8_char(const unsigned char *s, size_t i, size_t n) {
  static const uint32_t limits[] = { ~(uint32_t)0, 0x80, 0x800, 0x10000u, 0x200000u, 0x4000000u };
  unsigned int c = s[i];
  if (c < 0x80) return 1;
  uint32_t res = 0;
  size_t count = 0;
  for (; c & 0x40; c <<= 1) {
    count++;
    unsigned int cc = i + count < n ? s[i + count] : 0;
    if ((cc & 0xC0) != 0x80 || count > 5) return 0;
    res = (res << 6) | (cc & 0x3F);
  }
  res |= (uint32_t)(c & 0x7F) << (count * 5);
  if (res > 0x7FFFFFFFu || res < limits[count]) return 0;
  if (res > 0x10FFFFu || (res >= 0xD800u && res <= 0xDFFFu)) return 0;
  return count + 1;
}

/* Copy s[0..n) to out, each invalid byte as U+FFFD (the character after it is decoded afresh). */
static int fix_utf8(bytebuf *out, const unsigned char *s, size_t n) {
  if (bytebuf_reserve(out, 3 * n) < 0) return -1;
  char *d = out->data + out->len;
  for (size_t i = 0; i < n;) {
    size_t k = utf8_char(s, i, n);
    if (k == 0) memcpy(d, "\xEF\xBF\xBD", 3), d += 3, i++;
    else memcpy(d, s + i, k), d += k, i += k;
  }
  out->len = (size_t)(d - out->data);
  out->data[out->len] = '\0';
  return 0;
}

/* s[a..b) without blanks at either end */
static void trim(const unsigned char *s, size_t *a, size_t *b) {
  while (*a < *b && blank(s[*a])) (*a)++;
  while (*b > *a && blank(s[*b - 1])) (*b)--;
}

static int utf8_valid(const unsigned char *s, size_t n) {
  for (size_t i = 0, k; i < n; i += k)
    if ((k = utf8_char(s, i, n)) == 0) return 0;
  return 1;
}

int mimeenc_header_text(bytebuf *out, const char *str, size_t n, size_t *a, size_t *b) {
  const unsigned char *s = (const unsigned char *)str;
  int breaks = 0, plain = 1;
  for (size_t i = 0; i < n; i++) {
    breaks |= line_break(s[i]);
    plain &= plain_text(s[i]);
  }
  *a = 0, *b = n;
  if (!breaks) {
    trim(s, a, b);
    if (plain || utf8_valid(s + *a, *b - *a)) return 0;
    return fix_utf8(out, s + *a, *b - *a) < 0 ? -1 : 1;
  }
  /* each run of CR/LF/NUL with the blanks on both sides -> one space; then trimmed, then fixed */
  bytebuf tmp = { 0 };
  if (bytebuf_reserve(&tmp, n) < 0) return -1;
  char *d = tmp.data;
  for (size_t i = 0; i < n;) {
    size_t j = i;
    while (j < n && blank(s[j])) j++;
    if (j < n && line_break(s[j])) {
      while (j < n && line_break(s[j])) j++;
      while (j < n && blank(s[j])) j++;
      *d++ = ' ';
    } else {
      if (j == i) j++;
      memcpy(d, s + i, j - i), d += j - i;
    }
    i = j;
  }
  tmp.len = (size_t)(d - tmp.data);
  size_t ta = 0, tb = tmp.len;
  trim((const unsigned char *)tmp.data, &ta, &tb);
  int rc = fix_utf8(out, (const unsigned char *)tmp.data + ta, tb - ta);
  bytebuf_free(&tmp);
  return rc < 0 ? -1 : 1;
}

int mimeenc_needs_words(const char *str, size_t n) {
  const unsigned char *s = (const unsigned char *)str;
  size_t word = 0;
  int long_word = 0;
  for (size_t i = 0; i < n; i++) {
    if (!plain_text(s[i]) || (s[i] == '=' && i + 1 < n && s[i + 1] == '?')) return 1;
    word = blank(s[i]) ? 0 : word + 1;
    long_word |= word > MIMEENC_LONG_WORD;
  }
  return long_word;
}

int mimeenc_fold(bytebuf *out, const char *name, size_t nl, const char *value, size_t vl) {
  const unsigned char *v = (const unsigned char *)value;
  size_t len0 = out->len;
  /* every word may add a CRLF: at most one per 2 characters of value */
  if (vl > SIZE_MAX / 4 || nl > SIZE_MAX / 4 || bytebuf_reserve(out, nl + 3 + 2 * vl) < 0) return -1;
  char *d = out->data + out->len;
  memcpy(d, name, nl), d += nl, *d++ = ':';
  if (nl + 2 + vl <= MIMEENC_FOLD_AT) {
    *d++ = ' ';
    memcpy(d, value, vl), d += vl;
  } else {
    /* the words of " " value, each with the blanks before it: a line full at 78 goes on the next,
     * unless the line has no word yet (the header's first line, or one word that is longer) */
    char *line = out->data + out->len;
    size_t cur = nl + 1, longest = 0;
    for (size_t i = 0; i < vl;) {            /* i: the value's character after the " " */
      size_t j = i;
      while (j < vl && blank(v[j])) j++;
      size_t k = j;
      while (k < vl && !blank(v[k])) k++;
      if (k == j) break;                    /* blanks at the end */
      size_t seg = 1 + (j - i) + (k - j) - (i > 0); /* the leading " " belongs to the first word */
      const char *from = i > 0 ? value + i : NULL;
      if (cur + seg > MIMEENC_FOLD_AT && cur >= nl + 2) {
        if ((size_t)(d - line) > longest) longest = (size_t)(d - line);
        *d++ = '\r', *d++ = '\n';
        line = d;
        cur = 0;
      }
      if (from) memcpy(d, from, k - i), d += k - i;
      else *d++ = ' ', memcpy(d, value, k), d += k;
      cur += seg;
      i = k;
    }
    if ((size_t)(d - line) > longest) longest = (size_t)(d - line);
    if (longest > MIMEENC_MAX_LINE) {
      out->data[len0] = '\0';
      return 1;
    }
  }
  out->len = (size_t)(d - out->data);
  out->data[out->len] = '\0';
  return 0;
}
