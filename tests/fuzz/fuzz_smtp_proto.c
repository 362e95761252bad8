/* fuzz_smtp_proto.c - libFuzzer target for the pure SMTP helpers.
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc tests/fuzz/fuzz_smtp_proto.c src/smtp_proto.c
 *
 * The first input byte picks what to feed, the rest is the data:
 *   even: server bytes -> smtp_reply_parse (pipelined, both enhanced modes) -> smtp_caps_parse,
 *         checking the invariants every caller relies on;
 *   odd:  the same bytes through smtp_addr_ok, smtp_dot_stuff (undone again and compared) and base64. */
#include "smtp_proto.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ASSERT(c) do { if (!(c)) { __builtin_trap(); } } while (0)

static void
check_reply(const smtp_reply *r, int n, size_t len)
{
  size_t tl = strnlen(r->text, sizeof(r->text));
  ASSERT((size_t)n <= len);
  ASSERT(r->code >= 200 && r->code <= 599);
  ASSERT(r->nlines >= 1 && r->nlines <= SMTP_REPLY_LINES_MAX);
  ASSERT(tl < sizeof(r->text));
  ASSERT(strnlen(r->enhanced, sizeof(r->enhanced)) < sizeof(r->enhanced));
  ASSERT(r->enhanced[0] == '\0' || r->enhanced[0] == '2' || r->enhanced[0] == '4' || r->enhanced[0] == '5');
  for (size_t i = 0; i < tl; i++)                 /* safe to log */
    ASSERT((unsigned char)r->text[i] >= 0x20 || r->text[i] == '\t' || r->text[i] == '\n');
}

static void
fuzz_replies(const char *d, size_t len)
{
  static smtp_reply r, r2;        /* static: 4 KB each */
  char err[128];
  smtp_caps caps;

  for (int enhanced = 0; enhanced < 2; enhanced++) {
    size_t off = 0;
    for (;;) {
      int n = smtp_reply_parse(d + off, len - off, enhanced, &r, err, sizeof(err));
      if (n <= 0) {
        ASSERT(n == 0 || err[0] != '\0');
        ASSERT(n < 0 || len - off <= SMTP_REPLY_BYTES_MAX);
        break;
      }
      check_reply(&r, n, len - off);
      (void)smtp_reply_class(&r);
      smtp_caps_parse(&r, &caps);
      ASSERT(strnlen(caps.auth, sizeof(caps.auth)) < sizeof(caps.auth));
      ASSERT(strnlen(caps.names, sizeof(caps.names)) < sizeof(caps.names));
      {
        /* what the session uses: the raw bytes; it agrees with the text whenever the text is whole */
        smtp_caps raw;
        smtp_caps_parse_raw(d + off, (size_t)n, &raw);
        ASSERT(strnlen(raw.auth, sizeof(raw.auth)) < sizeof(raw.auth));
        ASSERT(strnlen(raw.names, sizeof(raw.names)) < sizeof(raw.names));
        ASSERT(r.truncated || enhanced || (raw.starttls == caps.starttls && raw.pipelining == caps.pipelining
                               && strcmp(raw.auth, caps.auth) == 0));
      }
      /* the reply alone parses the same, and any shorter prefix of it needs more bytes */
      ASSERT(smtp_reply_parse(d + off, (size_t)n, enhanced, &r2, err, sizeof(err)) == n);
      ASSERT(r2.code == r.code && r2.nlines == r.nlines && strcmp(r2.text, r.text) == 0);
      ASSERT(smtp_reply_parse(d + off, (size_t)n - 1, enhanced, &r2, err, sizeof(err)) == 0);
      ASSERT(smtp_reply_parse(d + off, (size_t)n / 2, enhanced, &r2, err, sizeof(err)) == 0);
      off += (size_t)n;
    }
  }
}

/* Undoes dot-stuffing and checks the result is the input with every line end made "\n". */
static void
check_unstuff(const char *in, size_t len, const bytebuf *b)
{
  bytebuf want = { 0 }, got = { 0 };
  size_t i = 0;
  /* the input, line ends normalised, "\n" added when it does not end with one */
  for (size_t k = 0; k < len; k++) {
    char c = in[k];
    if (c == '\r') {
      if (k + 1 < len && in[k + 1] == '\n')
        k++;
      c = '\n';
    }
    ASSERT(bytebuf_append(&want, &c, 1) == 0);
  }
  if (len && want.data[want.len - 1] != '\n')
    ASSERT(bytebuf_append(&want, "\n", 1) == 0);
  /* the output: CRLF lines, a leading dot removed, until the lone "." */
  for (;;) {
    const char *e = NULL;
    for (size_t k = i; k + 1 < b->len; k++)
      if (b->data[k] == '\r') {
        ASSERT(b->data[k + 1] == '\n');             /* no bare CR */
        e = b->data + k;
        break;
      }
    ASSERT(e != NULL);
    size_t l = (size_t)(e - (b->data + i));
    ASSERT(memchr(b->data + i, '\n', l) == NULL);   /* no bare LF */
    if (l == 1 && b->data[i] == '.') {
      ASSERT(i + 3 == b->len);                      /* the terminator is the very end */
      break;
    }
    if (l > 0 && b->data[i] == '.') {
      ASSERT(l > 1 && b->data[i + 1] == '.');       /* every dot line was stuffed */
      i++, l--;
    }
    ASSERT(bytebuf_append(&got, b->data + i, l) == 0 && bytebuf_append(&got, "\n", 1) == 0);
    i += l + 2;
  }
  ASSERT(got.len == want.len && (got.len == 0 || memcmp(got.data, want.data, got.len) == 0));
  bytebuf_free(&want);
  bytebuf_free(&got);
}

static void
fuzz_data(const char *d, size_t len)
{
  bytebuf b = { 0 }, e = { 0 }, x = { 0 };
  char why[128];

  if (smtp_addr_ok(d, len, 1, why, sizeof(why))) {
    for (size_t i = 0; i < len; i++)                /* nothing that could end or confuse a command */
      ASSERT(d[i] != '\r' && d[i] != '\n' && d[i] != '\0' && d[i] != '<' && d[i] != '>');
    ASSERT(len + 2 <= SMTP_PATH_MAX);
  } else
    ASSERT(why[0] != '\0');

  ASSERT(smtp_dot_stuff(&b, d, len) == 0);
  check_unstuff(d, len, &b);
  ASSERT(smtp_data_has_8bit(d, len) == smtp_data_has_8bit(b.data, b.len));

  ASSERT(bytebuf_base64_encode(&e, d, len) == 0);
  ASSERT(bytebuf_base64_decode(e.data, e.len, &x) == 0);
  ASSERT(x.len == len && (len == 0 || memcmp(x.data, d, len) == 0));
  x.len = 0;
  if (bytebuf_base64_decode(d, len, &x) == 0)           /* decoding never grows the data */
    ASSERT(x.len <= len);
  bytebuf_free(&b);
  bytebuf_free(&e);
  bytebuf_free(&x);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  if (data[0] & 1)
    fuzz_data((const char *)data + 1, size - 1);
  else
    fuzz_replies((const char *)data + 1, size - 1);
  return 0;
}
