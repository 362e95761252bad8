/* test_mimeenc.c - the MIME encoders (src/mimeenc.c): quoted-printable (RFC 2045 6.7), base64 lines
 * (RFC 2045 6.8), RFC 2047 encoded-words, header text and folding, on their boundary cases, then on random text against
 * the rules themselves (line and word lengths, no split escape or UTF-8 sequence, the decoded form
 * is the input).  tests/lua/test_mimeenc.lua compares them byte for byte with the Lua code they
 * replaced. */
#include "check.h"
#include "mimeenc.h"

#include <stdlib.h>

/* Each helper's output, valid until the next call (freed first, so ASan sees reads past it). */
static bytebuf out;

static char *qp(const char *s, size_t n) {
  bytebuf_free(&out);
  if (mimeenc_qp(&out, s, n) < 0) return NULL;
  return out.data;
}
#define QP(lit) qp(lit, sizeof lit - 1)

static char *words(const char *s, size_t first) {
  bytebuf_free(&out);
  if (mimeenc_words(&out, s, strlen(s), first) < 0) return NULL;
  return out.data;
}

static char *b64(const char *s, size_t n) {
  bytebuf_free(&out);
  if (mimeenc_base64_lines(&out, s, n) < 0) return NULL;
  return out.data;
}

/* Longest line of s (lines end at CRLF). */
static size_t longest_line(const char *s) {
  size_t best = 0;
  for (const char *p = s;;) {
    const char *e = strstr(p, "\r\n");
    size_t n = e ? (size_t)(e - p) : strlen(p);
    if (n > best) best = n;
    if (!e) return best;
    p = e + 2;
  }
}

static void test_qp_escapes_and_line_ends(void) {
  CHECK_STR(QP(""), "");
  CHECK_STR(QP("\n"), "\r\n");
  CHECK_STR(QP("a=b"), "a=3Db");
  CHECK_STR(QP("\xc3\xa9"), "=C3=A9");
  CHECK_STR(QP("a \rb\t\r\n c "), "a=20\r\nb=09\r\n c=20");      /* blanks ending a line */
  CHECK_STR(QP("a b\tc"), "a b\tc");                             /* ...not inside one */
  CHECK_STR(QP("a\r\nb\rc\n"), "a\r\nb\r\nc\r\n");
  CHECK_STR(QP("a\n\r"), "a\r\n\r\n");                           /* LF then CR: two breaks */
  CHECK_STR(QP("x\x7f\x01~"), "x=7F=01~");
  CHECK_STR(qp("a\0b", 3), "a=00b");
}

static void test_qp_soft_breaks(void) {
  char line[200];
  memset(line, 'a', 76);
  CHECK_STR(qp(line, 76), "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");  /* 76 fits */
  memset(line, 'a', 77);
  char *e = qp(line, 77);                                        /* 77: 75, "=", then 2 */
  CHECK(e && strlen(e) == 75 + 3 + 2 && memcmp(e + 75, "=\r\naa", 5) == 0);
  /* an escape that would straddle the 75th character goes to the next line whole */
  for (size_t at = 70; at < 78; at++) {
    memset(line, 'a', 100);
    memcpy(line + at, "\xc3\xa9", 2);
    e = qp(line, 100);
    CHECK(e != NULL);
    if (!e) continue;
    CHECK(longest_line(e) <= MIMEENC_QP_LINE);
    for (const char *p = e; (p = strstr(p, "=\r\n")); p += 3) {
      CHECK(p - e >= 2 && p[-1] != '=' && p[-2] != '=');         /* no "=X" or "=" before the break */
    }
  }
  /* a line of escapes only: every line but the last ends "=XX=" */
  memset(line, '\xff', 60);
  e = qp(line, 60);
  CHECK(e && longest_line(e) <= MIMEENC_QP_LINE);
  CHECK(e && strncmp(e, "=FF=FF", 6) == 0 && strstr(e, "=FF=\r\n=FF") != NULL);
  /* a blank ending a line becomes =20 before the cut: 73 b's and =20 fit in 76, 74 do not, and
   * then the =20 goes whole to the next line */
  memset(line, 'b', 73);
  line[73] = ' ';
  e = qp(line, 74);
  CHECK(e && strlen(e) == 76 && strcmp(e + 73, "=20") == 0);
  memset(line, 'b', 74);
  line[74] = ' ';
  e = qp(line, 75);
  CHECK(e && strlen(e) == 74 + 3 + 3 && strcmp(e + 74, "=\r\n=20") == 0);
}

static void test_base64_lines(void) {
  CHECK_STR(b64("", 0), "");
  CHECK_STR(b64("f", 1), "Zg==");
  CHECK_STR(b64("foobar", 6), "Zm9vYmFy");
  char in[200];
  memset(in, 0xff, sizeof in);
  char *e = b64(in, 57);                                          /* exactly one whole line */
  CHECK(e && strlen(e) == 76 && !strchr(e, '\r'));
  e = b64(in, 58);
  CHECK(e && strlen(e) == 76 + 2 + 4 && strcmp(e + 76, "\r\n/w==") == 0);
  e = b64(in, 114);
  CHECK(e && strlen(e) == 76 + 2 + 76);
}

static void test_words(void) {
  CHECK_STR(words("", 75), "");
  CHECK_STR(words("Caf\xc3\xa9 au lait", 75), "=?UTF-8?Q?Caf=C3=A9_au_lait?=");
  CHECK_STR(words("Gr\xc3\xbc\xc3\x9f" "e", 75), "=?UTF-8?B?R3LDvMOfZQ==?=");   /* 12 in B, 15 in Q */
  CHECK_STR(words("a b", 75), "=?UTF-8?Q?a_b?=");
  CHECK_STR(words("\xd0\x98\xd0\xb2\xd0\xb0\xd0\xbd", 75), "=?UTF-8?B?0JjQstCw0L0=?=");   /* B is shorter */
  CHECK_STR(words("a=?b", 75), "=?UTF-8?Q?a=3D=3Fb?=");
  /* exactly 75 in one word; one more character makes two */
  char s[400];
  memset(s, 'x', 63);
  s[63] = '\0';
  CHECK_STR(words(s, 75), "=?UTF-8?Q?xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx?=");
  s[63] = 'x', s[64] = '\0';
  char *e = words(s, 75);
  CHECK(e && strlen(e) == 75 + 1 + 13 && e[75] == ' ');
  /* the first word within `first`, and full words end after their last space */
  e = words("aaaa bbbb cccc dddd eeee ffff", 20);
  CHECK_STR(e, "=?UTF-8?Q?aaaa_?= =?UTF-8?Q?bbbb_cccc_dddd_eeee_ffff?=");
  /* a long Cyrillic name: B words of at most 75 that each decode to whole characters */
  s[0] = '\0';
  for (int i = 0; i < 40; i++) strcat(s, "\xd0\x96");
  e = words(s, 30);
  CHECK(e != NULL);
  if (!e) return;
  size_t nwords = 0;
  for (char *p = e; *p;) {
    char *sp = strchr(p, ' ');
    size_t len = sp ? (size_t)(sp - p) : strlen(p);
    CHECK(len <= (nwords ? MIMEENC_WORD_MAX : 30));
    CHECK(strncmp(p, "=?UTF-8?B?", 10) == 0);
    /* 2-byte characters: a whole number of them is an even byte count, base64 of 3k+2 or 3k+1... */
    size_t enc = len - 12, pad = p[len - 3] == '=' ? (p[len - 4] == '=' ? 2 : 1) : 0;
    size_t bytes = enc / 4 * 3 - pad;
    CHECK(bytes % 2 == 0);
    nwords++;
    p += len + (sp ? 1 : 0);
  }
  CHECK(nwords >= 3);
}

/* header_text: the slice of s when only blanks at the ends go, else the rewritten text in out. */
static char *htext(const char *s, size_t n) {
  static char slice[256];
  size_t a, b;
  bytebuf_free(&out);
  int rc = mimeenc_header_text(&out, s, n, &a, &b);
  if (rc < 0) return NULL;
  if (rc == 1) return out.data;
  CHECK(b - a < sizeof slice);
  memcpy(slice, s + a, b - a);
  slice[b - a] = '\0';
  return slice;
}
#define HTEXT(lit) htext(lit, sizeof lit - 1)

static char *fold(const char *name, const char *v, int *rc) {
  bytebuf_free(&out);
  *rc = mimeenc_fold(&out, name, strlen(name), v, strlen(v));
  return out.data ? out.data : "";
}

static void test_header_text(void) {
  size_t a, b;
  CHECK_INT(mimeenc_header_text(&out, " Ivan\t", 6, &a, &b), 0);      /* nothing written */
  CHECK(a == 1 && b == 5);
  CHECK_STR(HTEXT("Caf\xc3\xa9"), "Caf\xc3\xa9");
  CHECK_STR(HTEXT("a \r\n\tb"), "a b");                          /* a break and its blanks: one space */
  CHECK_STR(HTEXT(" \r \t \n "), "");
  CHECK_STR(HTEXT("x \r \t \n y"), "x  y");                        /* two runs apart: two spaces */
  CHECK_STR(HTEXT("a\0\0b"), "a b");
  CHECK_STR(HTEXT("\xff a"), "\xef\xbf\xbd a");                   /* invalid bytes: U+FFFD each */
  CHECK_STR(HTEXT("\xc0\x80"), "\xef\xbf\xbd\xef\xbf\xbd");             /* overlong */
  CHECK_STR(HTEXT("\xed\xa0\x80!"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd!");   /* a surrogate */
  CHECK_STR(HTEXT("\xe2\x82"), "\xef\xbf\xbd\xef\xbf\xbd");             /* cut short at the end */
  CHECK_INT(mimeenc_needs_words("plain text", 10), 0);
  CHECK_INT(mimeenc_needs_words("a=?b", 4), 1);
  CHECK_INT(mimeenc_needs_words("\xc3\xa9", 2), 1);
  char w[80];
  memset(w, 'x', 71);
  CHECK_INT(mimeenc_needs_words(w, 70), 0);
  CHECK_INT(mimeenc_needs_words(w, 71), 1);                      /* a word over 70 cannot be folded */
}

static void test_fold(void) {
  int rc;
  CHECK_STR(fold("To", "a@example.com", &rc), "To: a@example.com");
  char v[1100];
  memset(v, 'a', 74);
  v[74] = '\0';                                                  /* "To: " + 74 = 78: one line */
  CHECK(strlen(fold("To", v, &rc)) == 78 && rc == 0);
  memcpy(v, "aaaa ", 5);                                         /* 79: folds before the second word */
  v[75] = '\0', v[74] = 'b';
  char *e = fold("To", v, &rc);
  CHECK(rc == 0 && strncmp(e, "To: aaaa\r\n aaa", 14) == 0 && longest_line(e) <= 78);
  memset(v, 'c', 999);                                           /* a word of 999: no fold helps */
  strcpy(v + 999, " d");
  CHECK(fold("To", v, &rc) && rc == 1);
  CHECK_INT((long long)out.len, 0);
  memset(v, 'c', 994);                                           /* "To: " + 994 = 998: allowed */
  strcpy(v + 994, " d");
  e = fold("To", v, &rc);
  CHECK(rc == 0 && longest_line(e) == 998);
  memset(v, ' ', 90);                                            /* blanks at the end go */
  strcpy(v + 90, "");
  v[0] = 'w';
  CHECK_STR(fold("X", v, &rc), "X: w");
}

/* Random text over the bytes that matter: every Q word and every QP line in bounds. */
static void test_random_bounds(void) {
  static const char *pieces[] = { "a", " ", "\t", "=", "?", "_", "\r", "\n", "\xc3\xa9", "\xe4\xb8\xad",
                                  "\xf0\x9f\x98\x80", "\xd0\x96", "\x80", "\xff", "Z", "0" };
  srand(13);
  for (int round = 0; round < 2000; round++) {
    char s[600] = "";
    size_t n = 0, want = (size_t)(rand() % 300);
    while (n < want) {
      const char *p = pieces[rand() % 16];
      size_t k = strlen(p);
      memcpy(s + n, p, k);
      n += k;
    }
    s[n] = '\0';
    char *e = qp(s, n);
    CHECK(e && longest_line(e) <= MIMEENC_QP_LINE);
    size_t first = 20 + (size_t)(rand() % 56);
    e = words(s, first);
    CHECK(e != NULL);
    if (!e) continue;
    size_t i = 0;
    for (char *p = e; *p; i++) {
      char *sp = strchr(p, ' ');
      size_t len = sp ? (size_t)(sp - p) : strlen(p);
      /* 4-byte characters in Q take 12: a word may hold only one of them with a first of 20 */
      CHECK(len <= (i ? MIMEENC_WORD_MAX : first < 24 ? 24 : first));
      p += len + (sp ? 1 : 0);
    }
  }
}

int main(void) {
  test_qp_escapes_and_line_ends();
  test_qp_soft_breaks();
  test_base64_lines();
  test_words();
  test_header_text();
  test_fold();
  test_random_bounds();
  bytebuf_free(&out);
  return DONE();
}
