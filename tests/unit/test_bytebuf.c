/* test_bytebuf.c - the byte buffer and its one line-break normaliser (bytebuf_lines, bytebuf_crlf),
 * which DATA (smtp_dot_stuff), DKIM signing and text.crlf all use. */
#include "check.h"
#include "bytebuf.h"
#include "smtp_proto.h"

#include <stdlib.h>

/* bytebuf_lines' calls, written out as "line|brk;" for each. */
static int record(void *ud, const char *line, size_t n, int brk) {
  bytebuf *b = ud;
  return bytebuf_append(b, line, n) || bytebuf_printf(b, "|%d;", brk);
}

static void lines_are(const char *s, const char *want) {
  bytebuf b = { 0 };
  CHECK_INT(bytebuf_lines(s, strlen(s), record, &b), 0);
  CHECK_STR(b.data ? b.data : "", want);
  bytebuf_free(&b);
}

static void test_every_kind_of_line_break_ends_one_line(void) {
  lines_are("", "");
  lines_are("a", "a|0;");
  lines_are("a\r\nb\nc\rd", "a|2;b|1;c|1;d|0;");
  lines_are("a\r\r\nb", "a|1;|2;b|0;");          /* a bare CR, then a CRLF */
  lines_are("a\n\r", "a|1;|1;");                  /* LF then CR: two breaks, not one */
  lines_are("\r\n\r\n", "|2;|2;");
  lines_are("x\r", "x|1;");
}

static int stop_at_b(void *ud, const char *line, size_t n, int brk) {
  (void)brk;
  ++*(int *)ud;
  return n && *line == 'b' ? 7 : 0;
}

static void test_lines_stop_at_the_first_nonzero_return(void) {
  int calls = 0;
  CHECK_INT(bytebuf_lines("a\nb\nc\n", 6, stop_at_b, &calls), 7);
  CHECK_INT(calls, 2);
}

static void crlf_is(const char *s, int dots, const char *want) {
  bytebuf b = { 0 };
  CHECK_INT(bytebuf_crlf(&b, s, strlen(s), dots), 0);
  CHECK(b.data != NULL);                          /* even for "" */
  CHECK_STR(b.data, want);
  bytebuf_free(&b);
}

static void test_crlf_makes_every_break_crlf_and_dot_stuffs_on_request(void) {
  crlf_is("", 0, "");
  crlf_is("a\nb\rc\r\nd", 0, "a\r\nb\r\nc\r\nd");
  crlf_is("a\r\r\n", 0, "a\r\n\r\n");
  crlf_is(".a\n..b\n.", 0, ".a\r\n..b\r\n.");
  crlf_is(".a\n..b\n.", 1, "..a\r\n...b\r\n..");
  crlf_is("a.\n .b", 1, "a.\r\n .b");
}

/* DATA is the normalised, dot-stuffed message, a CRLF when it lacks one, and ".CRLF": over random
 * messages of the bytes that matter, smtp_dot_stuff agrees with bytebuf_crlf, and no bare CR or LF
 * survives either. */
static void test_dot_stuff_is_the_normaliser_plus_the_terminator(void) {
  static const char alphabet[] = "a.\r\n";
  char s[40];
  srand(11);
  for (int round = 0; round < 20000; round++) {
    size_t n = (size_t)(rand() % (int)sizeof s);
    for (size_t i = 0; i < n; i++) s[i] = alphabet[rand() % 4];
    bytebuf data = { 0 }, want = { 0 };
    CHECK_INT(smtp_dot_stuff(&data, s, n), 0);
    CHECK_INT(bytebuf_crlf(&want, s, n, 1), 0);
    if (want.len && !(want.len >= 2 && want.data[want.len - 2] == '\r' && want.data[want.len - 1] == '\n'))
      CHECK_INT(bytebuf_append(&want, "\r\n", 2), 0);
    CHECK_INT(bytebuf_append(&want, ".\r\n", 3), 0);
    CHECK(data.len == want.len && memcmp(data.data, want.data, data.len) == 0);
    for (size_t i = 0; i < data.len; i++)
      if ((data.data[i] == '\r') != (i + 1 < data.len && data.data[i + 1] == '\n') ||
          (data.data[i] == '\n' && (i == 0 || data.data[i - 1] != '\r'))) {
        CHECK(!"bare CR or LF in DATA");
        break;
      }
    bytebuf_free(&data);
    bytebuf_free(&want);
  }
}

/* The normaliser as it was first written, one bytebuf_lines callback a line: bytebuf_crlf now copies
 * the unchanged stretches in one piece, and must write exactly what this writes. */
struct ref_out { bytebuf *out; int dots; };
static int ref_line(void *ud, const char *line, size_t n, int brk) {
  struct ref_out *r = ud;
  if (r->dots && n && *line == '.' && bytebuf_append(r->out, ".", 1) < 0) return -1;
  if (bytebuf_append(r->out, line, n) < 0 || (brk && bytebuf_append(r->out, "\r\n", 2) < 0)) return -1;
  return 0;
}

static void test_crlf_writes_what_one_call_a_line_writes(void) {
  static const char alphabet[] = "ab.\r\n";
  char s[64];
  srand(12);
  for (int round = 0; round < 50000; round++) {
    size_t n = (size_t)(rand() % (int)sizeof s);
    for (size_t i = 0; i < n; i++) s[i] = alphabet[rand() % 5];
    int dots = round & 1;
    bytebuf got = { 0 }, want = { 0 };
    struct ref_out r = { &want, dots };
    CHECK_INT(bytebuf_append(&want, "", 0), 0);
    CHECK_INT(bytebuf_lines(s, n, ref_line, &r), 0);
    CHECK_INT(bytebuf_crlf(&got, s, n, dots), 0);
    if (!(got.len == want.len && memcmp(got.data, want.data, got.len) == 0)) {
      CHECK(!"bytebuf_crlf differs from the line-by-line normaliser");
      break;
    }
    bytebuf_free(&got);
    bytebuf_free(&want);
  }
}

static void test_crlf_appends_after_what_the_buffer_holds(void) {
  bytebuf b = { 0 };
  CHECK_INT(bytebuf_append(&b, "X-Head: 1\r\n", 11), 0);
  CHECK_INT(bytebuf_crlf(&b, "body\n", 5, 0), 0);
  CHECK_STR(b.data, "X-Head: 1\r\nbody\r\n");
  bytebuf_free(&b);
}

int main(void) {
  test_every_kind_of_line_break_ends_one_line();
  test_lines_stop_at_the_first_nonzero_return();
  test_crlf_makes_every_break_crlf_and_dot_stuffs_on_request();
  test_crlf_writes_what_one_call_a_line_writes();
  test_dot_stuff_is_the_normaliser_plus_the_terminator();
  test_crlf_appends_after_what_the_buffer_holds();
  return DONE();
}
