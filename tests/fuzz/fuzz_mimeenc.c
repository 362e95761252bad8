/* fuzz_mimeenc.c - libFuzzer target for the MIME encoders (src/mimeenc.c).
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc tests/fuzz/fuzz_mimeenc.c src/mimeenc.c src/bytebuf.c
 *
 * The first input byte picks `first` for the encoded-words (20..75), the rest is the text.  Checked:
 *   - quoted-printable: only printable ASCII and CRLF, no line over 76, no "=" at a line's end but a
 *     soft break, no blank ending a line; decoded, it is the text with its line breaks made CRLF;
 *   - base64 lines: 76 characters but the last, decoded back to the text;
 *   - encoded-words: each at most `first` (the first; 24 when one 4-byte character alone takes that
 *     in Q) or 75, printable ASCII with no space inside; decoded and joined, they are the text; no word
 *     ends inside a UTF-8 sequence. */
#include "mimeenc.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ASSERT(c) do { if (!(c)) { __builtin_trap(); } } while (0)

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static void check_qp(const char *s, size_t n) {
  bytebuf e = { 0 }, dec = { 0 }, want = { 0 };
  ASSERT(mimeenc_qp(&e, s, n) == 0);
  ASSERT(bytebuf_crlf(&want, s, n, 0) == 0);
  ASSERT(bytebuf_reserve(&dec, e.len) == 0);
  size_t col = 0;
  for (size_t i = 0; i < e.len; i++) {
    char c = e.data[i];
    if (c == '\r') {
      ASSERT(i + 1 < e.len && e.data[i + 1] == '\n');
      ASSERT(col == 0 || (e.data[i - 1] != ' ' && e.data[i - 1] != '\t'));
      dec.data[dec.len++] = '\r', dec.data[dec.len++] = '\n';
      i++, col = 0;
      continue;
    }
    ASSERT((c >= 32 && c <= 126) || c == '\t');
    if (c == '=') {
      if (i + 1 < e.len && e.data[i + 1] == '\r') {               /* soft break */
        ASSERT(i + 2 < e.len && e.data[i + 2] == '\n');
        ASSERT(col + 1 <= MIMEENC_QP_LINE);
        i += 2, col = 0;
        continue;
      }
      ASSERT(i + 2 < e.len && hexval(e.data[i + 1]) >= 0 && hexval(e.data[i + 2]) >= 0);
      dec.data[dec.len++] = (char)(hexval(e.data[i + 1]) * 16 + hexval(e.data[i + 2]));
      i += 2, col += 3;
    } else {
      dec.data[dec.len++] = c;
      col++;
    }
    ASSERT(col <= MIMEENC_QP_LINE);
  }
  ASSERT(col == 0 || (e.data[e.len - 1] != ' ' && e.data[e.len - 1] != '\t'));
  ASSERT(dec.len == want.len && memcmp(dec.data, want.data, dec.len) == 0);
  bytebuf_free(&e), bytebuf_free(&dec), bytebuf_free(&want);
}

static void check_base64(const char *s, size_t n) {
  bytebuf e = { 0 }, joined = { 0 }, dec = { 0 };
  ASSERT(mimeenc_base64_lines(&e, s, n) == 0);
  for (size_t i = 0; i < e.len;) {
    char *crlf = memchr(e.data + i, '\r', e.len - i);
    size_t len = crlf ? (size_t)(crlf - (e.data + i)) : e.len - i;
    ASSERT(crlf ? len == MIMEENC_B64_LINE : len <= MIMEENC_B64_LINE);
    ASSERT(bytebuf_append(&joined, e.data + i, len) == 0);
    i += len + (crlf ? 2 : 0);
  }
  if (n) ASSERT(bytebuf_base64_decode(joined.data, joined.len, &dec) == 0);
  ASSERT(dec.len == n && (n == 0 || memcmp(dec.data, s, n) == 0));
  bytebuf_free(&e), bytebuf_free(&joined), bytebuf_free(&dec);
}

static int is_cont(unsigned char c) { return (c & 0xC0) == 0x80; }

static void check_words(const char *s, size_t n, size_t first) {
  bytebuf e = { 0 }, dec = { 0 };
  ASSERT(mimeenc_words(&e, s, n, first) == 0);
  ASSERT(n > 0 || e.len == 0);
  size_t nwords = 0;
  for (size_t i = 0; i < e.len; nwords++) {
    char *sp = memchr(e.data + i, ' ', e.len - i);
    size_t len = sp ? (size_t)(sp - (e.data + i)) : e.len - i;
    const char *w = e.data + i;
    ASSERT(len <= (nwords ? MIMEENC_WORD_MAX : first < 24 ? 24 : first));
    ASSERT(len >= 12 && memcmp(w, "=?UTF-8?", 8) == 0 && w[9] == '?' && memcmp(w + len - 2, "?=", 2) == 0);
    for (size_t k = 0; k < len; k++) ASSERT(w[k] > 32 && w[k] < 127);
    size_t before = dec.len;
    if (w[8] == 'B') {
      ASSERT(bytebuf_base64_decode(w + 10, len - 12, &dec) == 0);
    } else {
      ASSERT(w[8] == 'Q');
      for (size_t k = 10; k < len - 2; k++) {
        char c = w[k];
        ASSERT(c != '?' && c != ' ');
        if (c == '=') {
          ASSERT(k + 2 < len - 2 && hexval(w[k + 1]) >= 0 && hexval(w[k + 2]) >= 0);
          c = (char)(hexval(w[k + 1]) * 16 + hexval(w[k + 2]));
          k += 2;
        } else if (c == '_') {
          c = ' ';
        }
        ASSERT(bytebuf_append(&dec, &c, 1) == 0);
      }
    }
    ASSERT(dec.len > before);
    /* a word ends at a character's end: the next byte is no continuation of a sequence */
    if (dec.len < n && is_cont((unsigned char)s[dec.len])) {
      size_t k = dec.len, c = 0;
      while (k > 0 && c < 3 && is_cont((unsigned char)s[k - 1])) k--, c++;
      ASSERT(c == 3);               /* ...unless it is a stray one after a full sequence */
    }
    i += len + (sp ? 1 : 0);
  }
  ASSERT(dec.len == n && (n == 0 || memcmp(dec.data, s, n) == 0));
  bytebuf_free(&e), bytebuf_free(&dec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1 || size > 4096) return 0;
  size_t first = 20 + data[0] % 56;
  const char *s = (const char *)data + 1;
  check_qp(s, size - 1);
  check_base64(s, size - 1);
  check_words(s, size - 1, first);
  return 0;
}
