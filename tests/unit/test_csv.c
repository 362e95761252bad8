/* test_csv.c - the streaming CSV reader (src/csv_reader.c): header, dialects, line numbers, bad rows,
 * limits, and memory that does not grow with the file. */
#include "check.h"
#include "csv_reader.h"

#include <stdarg.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char dir[] = "/tmp/mailshot-test-csv-XXXXXX";
static int nfiles;
static char err[256];
static char last_path[512];  /* the file write_file wrote last */

/* Writes len bytes to a fresh file in the temp dir; returns its path (static, one at a time). */
static const char *write_file (const char *data, size_t len)
{
  FILE *f;
  snprintf(last_path, sizeof last_path, "%s/%d.csv", dir, ++nfiles);
  f = fopen(last_path, "wb");
  if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
    perror(last_path);
    exit(2);
  }
  return last_path;
}

static csv_reader *open_data (const char *data, size_t len, const csv_options *opt)
{
  csv_reader *r = csv_reader_open(write_file(data, len), opt, err, sizeof err);
  if (!r)
    fprintf(stderr, "open failed: %s\n", err);
  return r;
}

static csv_reader *open_str (const char *s)
{
  return open_data(s, strlen(s), NULL);
}

/* Reads one row and checks it is OK, starts on line, and has the given fields (NULL-terminated). */
static void expect_row (int srcline, csv_reader *r, unsigned long line, ...)
{
  csv_row row;
  va_list ap;
  size_t i = 0;
  const char *want;
  int rc = csv_reader_next(r, &row);
  check_count++;
  if (rc != CSV_ROW_OK || row.line != line) {
    check_failures++;
    fprintf(stderr, "%s:%d: FAIL: row rc=%d line=%lu (%s), want OK at line %lu\n", __FILE__, srcline, rc, row.line,
            row.error ? row.error : "-", line);
    return;
  }
  va_start(ap, line);
  while ((want = va_arg(ap, const char *)) != NULL) {
    check_count++;
    if (i >= row.nfields || strlen(want) != row.fields[i].len || memcmp(want, row.fields[i].ptr, row.fields[i].len)
        || row.fields[i].ptr[row.fields[i].len] != '\0') {
      check_failures++;
      fprintf(stderr, "%s:%d: FAIL: field %zu = \"%s\", want \"%s\"\n", __FILE__, srcline, i + 1,
              i < row.nfields ? row.fields[i].ptr : "(missing)", want);
    }
    i++;
  }
  va_end(ap);
  CHECK_INT(row.nfields, i);
}
#define EXPECT_ROW(r, line, ...) expect_row(__LINE__, r, line, __VA_ARGS__, (const char *)NULL)

/* Reads one row and checks it is BAD, starts on line, and its message contains msg. */
static void expect_bad (int srcline, csv_reader *r, unsigned long line, const char *msg)
{
  csv_row row;
  int rc = csv_reader_next(r, &row);
  check_count++;
  if (rc != CSV_ROW_BAD || row.line != line || !row.error || !strstr(row.error, msg)) {
    check_failures++;
    fprintf(stderr, "%s:%d: FAIL: rc=%d line=%lu error=\"%s\", want BAD at line %lu with \"%s\"\n", __FILE__, srcline,
            rc, row.line, row.error ? row.error : "(null)", line, msg);
  }
}
#define EXPECT_BAD(r, line, msg) expect_bad(__LINE__, r, line, msg)

static void expect_eof (int srcline, csv_reader *r)
{
  csv_row row;
  int rc = csv_reader_next(r, &row);
  check_count++;
  if (rc != CSV_ROW_EOF) {
    check_failures++;
    fprintf(stderr, "%s:%d: FAIL: rc=%d line=%lu (%s), want EOF\n", __FILE__, srcline, rc, row.line,
            row.error ? row.error : "-");
  }
}
#define EXPECT_EOF(r) expect_eof(__LINE__, r)

/* Opening must fail with an error that names the file and contains msg. */
static void expect_open_error (int srcline, const char *data, size_t len, const csv_options *opt, const char *msg)
{
  const char *path = write_file(data, len);
  csv_reader *r = csv_reader_open(path, opt, err, sizeof err);
  check_count++;
  if (r || strncmp(err, path, strlen(path)) != 0 || !strstr(err, msg)) {
    check_failures++;
    fprintf(stderr, "%s:%d: FAIL: open gave %s \"%s\", want an error with \"%s\"\n", __FILE__, srcline,
            r ? "a reader" : "error", r ? "" : err, msg);
  }
  csv_reader_close(r);
}
#define EXPECT_OPEN_ERROR(data, opt, msg) expect_open_error(__LINE__, data, strlen(data), opt, msg)

static double now (void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---------------------------------------------------------------- cases */

static void test_header_names_are_trimmed_and_available (void)
{
  csv_reader *r = open_str(" email ,\" first name \",\tcity\n"
                           "a@example.org,Ann,Oslo\n");
  if (!r) { CHECK(r); return; }
  CHECK_INT(csv_reader_ncols(r), 3);
  CHECK_STR(csv_reader_colname(r, 0), "email");
  CHECK_STR(csv_reader_colname(r, 1), "first name");
  CHECK_STR(csv_reader_colname(r, 2), "city");
  CHECK(csv_reader_colname(r, 3) == NULL);
  CHECK_INT(csv_reader_line(r), 1);
  CHECK(strstr(csv_reader_path(r), dir) == csv_reader_path(r));
  EXPECT_ROW(r, 2, "a@example.org", "Ann", "Oslo");
  EXPECT_EOF(r);
  EXPECT_EOF(r);  /* and again */
  csv_reader_close(r);
}

static void test_utf8_bom_is_ignored (void)
{
  csv_reader *r = open_str("\xEF\xBB\xBF" "email,name\nb@example.org,Bob\n");
  if (!r) { CHECK(r); return; }
  CHECK_STR(csv_reader_colname(r, 0), "email");
  EXPECT_ROW(r, 2, "b@example.org", "Bob");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_bom_only_counts_at_the_very_start (void)
{
  csv_reader *r = open_str("email\n\xEF\xBB\xBF" "x\n");
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "\xEF\xBB\xBF" "x");
  csv_reader_close(r);
}

static void test_semicolon_delimiter (void)
{
  csv_options o = { .delimiter = ';' };
  const char *s = "email;amount\nc@example.org;1,50\n\"d;e@example.org\";2\n";
  csv_reader *r = open_data(s, strlen(s), &o);
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "c@example.org", "1,50");
  EXPECT_ROW(r, 3, "d;e@example.org", "2");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_tab_delimiter_keeps_empty_fields (void)
{
  csv_options o = { .delimiter = '\t' };
  const char *s = "email\tname\tnote\ne@example.org\tEve Smith\t\n\tx\ty\n";
  csv_reader *r = open_data(s, strlen(s), &o);
  if (!r) { CHECK(r); return; }
  CHECK_INT(csv_reader_ncols(r), 3);
  EXPECT_ROW(r, 2, "e@example.org", "Eve Smith", "");
  EXPECT_ROW(r, 3, "", "x", "y");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_quoted_fields_keep_delimiters_and_doubled_quotes (void)
{
  csv_reader *r = open_str("a,b,c\n"
                           "\"Smith, John\",\"say \"\"hi\"\"\",\"\"\n"
                           "  padded  , \" kept \" ,\"\"\"\"\n");
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "Smith, John", "say \"hi\"", "");
  EXPECT_ROW(r, 3, "padded", " kept ", "\"");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_newlines_inside_quotes_keep_line_numbers_right (void)
{
  csv_reader *r = open_str("id,text\n"                        /* 1 */
                           "1,one\n"                          /* 2 */
                           "2,\"first\nsecond\nthird\"\n"     /* 3-5 */
                           "3,after\n"                        /* 6 */
                           "\"4\n\",\"\n\n\"\n"               /* 7-10 */
                           "5,last\n");                       /* 11 */
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "1", "one");
  EXPECT_ROW(r, 3, "2", "first\nsecond\nthird");
  CHECK_INT(csv_reader_line(r), 5);
  EXPECT_ROW(r, 6, "3", "after");
  EXPECT_ROW(r, 7, "4\n", "\n\n");
  EXPECT_ROW(r, 11, "5", "last");
  EXPECT_EOF(r);
  CHECK_INT(csv_reader_line(r), 11);
  csv_reader_close(r);
}

static void test_crlf_lines_are_counted_once (void)
{
  csv_reader *r = open_str("id,text\r\n"
                           "1,one\r\n"
                           "\r\n"
                           "2,\"two\r\nlines\"\r\n"
                           "3,three\r\n");
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "1", "one");
  EXPECT_ROW(r, 4, "2", "two\r\nlines");
  EXPECT_ROW(r, 6, "3", "three");
  EXPECT_EOF(r);
  CHECK_INT(csv_reader_line(r), 6);
  csv_reader_close(r);
}

static void test_lone_cr_ends_a_line (void)
{
  csv_reader *r = open_str("id,text\r1,one\r\r2,two\r");
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "1", "one");
  EXPECT_ROW(r, 4, "2", "two");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_blank_lines_are_skipped_but_counted (void)
{
  csv_reader *r = open_str("\n  \n"
                           "email,name\n"   /* 3 */
                           "\n"
                           "a@x.org,A\n"    /* 5 */
                           " \t \n\n\n"
                           "b@x.org,B\n"    /* 9 */
                           "\n\n");
  if (!r) { CHECK(r); return; }
  CHECK_STR(csv_reader_colname(r, 0), "email");
  CHECK_INT(csv_reader_line(r), 3);
  EXPECT_ROW(r, 5, "a@x.org", "A");
  EXPECT_ROW(r, 9, "b@x.org", "B");
  EXPECT_EOF(r);
  CHECK_INT(csv_reader_line(r), 11);
  csv_reader_close(r);
}

static void test_last_row_without_newline_is_read (void)
{
  csv_reader *r = open_str("a,b\n1,2\n3,\"4\"");
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "1", "2");
  EXPECT_ROW(r, 3, "3", "4");
  EXPECT_EOF(r);
  CHECK_INT(csv_reader_line(r), 3);
  csv_reader_close(r);
}

static void test_stray_quote_is_reported_and_reading_goes_on (void)
{
  csv_reader *r = open_str("email,name\n"
                           "a@x.org,A\n"              /* 2 */
                           "b@x.org,Bo\"b\n"          /* 3: quote inside an unquoted field */
                           "c@x.org,C\n"              /* 4 */
                           "\"d@x.org\"x,\"D\n"       /* 5: text after a closing quote; the rest of */
                           "e@x.org,E\n"              /* 6    the line (an opening quote) is dropped */
                           "f@x.org,\"F\n"            /* 7: quoted field spanning lines ... */
                           "G\" oops\"\n"             /* 8    ... closed, then text: found on line 8 */
                           "h@x.org,H\n");            /* 9 */
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "a@x.org", "A");
  EXPECT_BAD(r, 3, "stray quote in field 2");
  EXPECT_ROW(r, 4, "c@x.org", "C");
  EXPECT_BAD(r, 5, "unexpected text after the closing quote of field 1");
  EXPECT_ROW(r, 6, "e@x.org", "E");
  EXPECT_BAD(r, 7, "unexpected text after the closing quote of field 2 (on line 8)");
  EXPECT_ROW(r, 9, "h@x.org", "H");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_wrong_field_count_is_bad (void)
{
  csv_reader *r = open_str("a,b,c\n"
                           "1,2\n"
                           "1\n"
                           "1,2,3,4,5\n"
                           "1,2,3,\n"
                           "\"x\ny\",2,3\n"
                           "4,5,6\n");
  if (!r) { CHECK(r); return; }
  EXPECT_BAD(r, 2, "row has 2 fields, header has 3");
  EXPECT_BAD(r, 3, "row has 1 field, header has 3");
  EXPECT_BAD(r, 4, "row has 5 fields, header has 3");
  EXPECT_BAD(r, 5, "row has 4 fields, header has 3");  /* a trailing empty field counts */
  EXPECT_ROW(r, 6, "x\ny", "2", "3");
  EXPECT_ROW(r, 8, "4", "5", "6");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_nul_byte_rejects_the_row (void)
{
  static const char s[] = "a,b\n1,x\0y\n\"2\0\",z\n3,ok\n";
  csv_reader *r = open_data(s, sizeof s - 1, NULL);
  if (!r) { CHECK(r); return; }
  EXPECT_BAD(r, 2, "NUL byte in field 2");
  EXPECT_BAD(r, 3, "NUL byte in field 1");
  EXPECT_ROW(r, 4, "3", "ok");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_nul_byte_in_header_is_an_error (void)
{
  static const char s[] = "a,b\0c\n1,2\n";
  expect_open_error(__LINE__, s, sizeof s - 1, NULL, "NUL byte in field 2");
}

static void test_one_mib_field_is_read_whole (void)
{
  size_t big = 1024 * 1024, n = 0;
  char *s = malloc(big + 64);
  csv_reader *r;
  csv_row row;
  if (!s) { CHECK(s); return; }
  n += (size_t)sprintf(s, "id,body\n1,\"");
  for (size_t i = 0; i < big; i++)
    s[n++] = i % 80 == 79 ? '\n' : (char)('a' + i % 26);
  n += (size_t)sprintf(s + n, "\"\n2,small\n");
  r = open_data(s, n, NULL);
  if (!r) { CHECK(r); free(s); return; }
  CHECK_INT(csv_reader_next(r, &row), CSV_ROW_OK);
  CHECK_INT(row.line, 2);
  CHECK_INT(row.nfields, 2);
  CHECK_INT(row.fields[1].len, big);
  CHECK(row.fields[1].len == big && memcmp(row.fields[1].ptr, s + 11, big) == 0);
  EXPECT_ROW(r, 2 + big / 80 + 1, "2", "small");
  EXPECT_EOF(r);
  CHECK(csv_reader_buffer_size(r) < 5 * big);  /* libcsv's buffer and ours, each under 2x the field */
  csv_reader_close(r);
  unlink(last_path);
  free(s);
}

static void test_field_over_the_limit_is_bad_and_reading_goes_on (void)
{
  size_t big = CSV_READER_MAX_ROW + 100, n = 0;
  char *s = malloc(big + 64);
  csv_reader *r;
  if (!s) { CHECK(s); return; }
  n += (size_t)sprintf(s, "id,body\n1,");
  memset(s + n, 'x', big);
  n += big;
  n += (size_t)sprintf(s + n, "\n2,small\n");
  r = open_data(s, n, NULL);
  if (!r) { CHECK(r); free(s); return; }
  EXPECT_BAD(r, 2, "field 2 is longer than 16777216 bytes");
  EXPECT_ROW(r, 3, "2", "small");
  EXPECT_EOF(r);
  CHECK(csv_reader_buffer_size(r) <= CSV_READER_MAX_ROW + 65536);
  csv_reader_close(r);
  unlink(last_path);
  free(s);
}

static void test_row_over_the_limit_is_bad_and_reading_goes_on (void)
{
  size_t half = CSV_READER_MAX_ROW / 2 + 10, n = 0;
  char *s = malloc(2 * half + 64);
  csv_reader *r;
  if (!s) { CHECK(s); return; }
  n += (size_t)sprintf(s, "a,b\n");
  memset(s + n, 'x', half);
  n += half;
  s[n++] = ',';
  memset(s + n, 'y', half);
  n += half;
  n += (size_t)sprintf(s + n, "\n1,2\n");
  r = open_data(s, n, NULL);
  if (!r) { CHECK(r); free(s); return; }
  EXPECT_BAD(r, 2, "row is longer than 16777216 bytes");
  EXPECT_ROW(r, 3, "1", "2");
  csv_reader_close(r);
  unlink(last_path);
  free(s);
}

static void test_unterminated_quote_is_bad_at_end_of_file (void)
{
  csv_reader *r = open_str("a,b\n1,2\n3,\"never closed\n4,5\n");
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "1", "2");
  EXPECT_BAD(r, 3, "unterminated quoted field 2");
  EXPECT_EOF(r);
  csv_reader_close(r);
}

static void test_open_errors_name_the_file_and_the_reason (void)
{
  csv_options same = { .delimiter = '"' };
  csv_reader *r;
  EXPECT_OPEN_ERROR("", NULL, "no header row");
  EXPECT_OPEN_ERROR("\n \n\r\n", NULL, "no header row");
  EXPECT_OPEN_ERROR("\xEF\xBB\xBF", NULL, "no header row");
  EXPECT_OPEN_ERROR("email,name,email\n", NULL, "duplicate column name \"email\" (columns 1 and 3)");
  EXPECT_OPEN_ERROR("email, name ,\"name\"\n", NULL, "duplicate column name \"name\" (columns 2 and 3)");
  EXPECT_OPEN_ERROR("\nemail,,name\n", NULL, "line 2: column 2 has an empty name");
  EXPECT_OPEN_ERROR("email,\" \"\n", NULL, "column 2 has an empty name");
  EXPECT_OPEN_ERROR("em\"ail,name\n", NULL, "line 1: bad header row: stray quote in field 1");
  EXPECT_OPEN_ERROR("email\n", &same, "invalid delimiter");
  r = csv_reader_open("/nonexistent/x.csv", NULL, err, sizeof err);
  CHECK(r == NULL);
  CHECK_STR(err, "/nonexistent/x.csv: No such file or directory");
  r = csv_reader_open(dir, NULL, err, sizeof err);
  CHECK(r == NULL);
  CHECK(strstr(err, "Is a directory") != NULL);
  r = csv_reader_open(dir, NULL, NULL, 0);  /* no error buffer: still no crash */
  CHECK(r == NULL);
}

/* The same rows must come out wherever the 64 KiB chunk boundaries fall: in a CRLF, inside quotes,
 * in a doubled quote, in the middle of a bad row being skipped. */
static void test_rows_do_not_depend_on_chunk_boundaries (void)
{
  static const char tail[] =
    "\"q\r\n\"\"x\"\"\",  y  \r\n"
    "\r\n"
    "bad\"row,skipped rest\"\n"
    "\"a\"b,c\n"
    "\xC3\xA9t\xC3\xA9,z\r"
    "last,row";
  /* "h1,h2\n0," + base + pad + "\n" puts the first chunk boundary pad bytes before the tail's end */
  size_t base = CSV_READER_CHUNK - 9 - (sizeof tail - 1);
  char *s = malloc(CSV_READER_CHUNK + 2 * sizeof tail);
  if (!s) { CHECK(s); return; }
  for (size_t pad = 0; pad <= sizeof tail; pad++) {
    size_t n = (size_t)sprintf(s, "h1,h2\n0,");
    csv_reader *r;
    memset(s + n, 'p', base + pad);
    n += base + pad;
    s[n++] = '\n';
    memcpy(s + n, tail, sizeof tail - 1);
    n += sizeof tail - 1;
    r = open_data(s, n, NULL);
    if (!r) { CHECK(r); break; }
    CHECK_INT(csv_reader_next(r, &(csv_row){0}), CSV_ROW_OK);
    EXPECT_ROW(r, 3, "q\r\n\"x\"", "y");
    EXPECT_BAD(r, 6, "stray quote in field 1");
    EXPECT_BAD(r, 7, "unexpected text after the closing quote of field 1");
    EXPECT_ROW(r, 8, "\xC3\xA9t\xC3\xA9", "z");
    EXPECT_ROW(r, 9, "last", "row");
    EXPECT_EOF(r);
    CHECK_INT(csv_reader_line(r), 9);
    csv_reader_close(r);
    unlink(last_path);  /* keep the temp dir small */
  }
  free(s);
}

/* 200,000 rows: all read, last line right, and the reader's buffers sized by the longest row. */
static void test_large_file_is_streamed_in_bounded_memory (void)
{
  const long rows = 200000;
  FILE *f;
  csv_reader *r;
  csv_row row;
  long count = 0, bad = 0;
  unsigned long last = 0;
  size_t maxbuf = 0, longest = 0;
  double t0, dt;
  int rc;

  f = fopen(write_file("", 0), "w");
  if (!f) { CHECK(f); return; }
  fprintf(f, "email,first_name,last_name,city,code\n");
  for (long i = 1; i <= rows; i++) {
    int len = fprintf(f, "user%ld@example.org,First%ld,\"Last, %ld\",City %ld,%ld\n", i, i, i, i % 977, i * 7);
    if ((size_t)len > longest)
      longest = (size_t)len;
  }
  CHECK(fclose(f) == 0);

  t0 = now();
  r = csv_reader_open(last_path, NULL, err, sizeof err);
  if (!r) { CHECK(r); return; }
  while ((rc = csv_reader_next(r, &row)) == CSV_ROW_OK || rc == CSV_ROW_BAD) {
    count += rc == CSV_ROW_OK;
    bad += rc == CSV_ROW_BAD;
    last = row.line;
    if (csv_reader_buffer_size(r) > maxbuf)
      maxbuf = csv_reader_buffer_size(r);
  }
  dt = now() - t0;
  CHECK_INT(rc, CSV_ROW_EOF);
  CHECK_INT(count, rows);
  CHECK_INT(bad, 0);
  CHECK_INT(last, rows + 1);
  CHECK_INT(csv_reader_line(r), rows + 1);
  /* libcsv's first 4 KiB step, a row buffer and a field table for 5 fields: far below one chunk */
  CHECK(maxbuf <= 4096 + 4 * longest + 64 * sizeof(csv_field));
  printf("  %ld rows in %.3f s: %.0f rows/s; reader buffers peaked at %zu bytes (longest row %zu bytes, "
         "chunk %d bytes)\n", count, dt, (double)count / dt, maxbuf, longest, CSV_READER_CHUNK);
  csv_reader_close(r);
  unlink(last_path);
}

/* A header of n columns "column_0", "column_1", ..., after first and before last if they are not NULL. */
static char *wide_header (const char *first, size_t n, const char *last, size_t *len)
{
  size_t cap = n * 16 + 64, k = 0;
  char *s = malloc(cap);
  if (!s) {
    perror("malloc");
    exit(2);
  }
  if (first)
    k += (size_t)snprintf(s + k, cap - k, "%s,", first);
  for (size_t i = 0; i < n; i++)
    k += (size_t)snprintf(s + k, cap - k, "%scolumn_%zu", i ? "," : "", i);
  if (last)
    k += (size_t)snprintf(s + k, cap - k, ",%s", last);
  k += (size_t)snprintf(s + k, cap - k, "\n");
  *len = k;
  return s;
}

/* 200,000 columns: the duplicate check must be linear.  Pairwise it would compare 2e10 pairs (minutes;
 * 120,000 columns took 30 s); the probe count proves the hash set, and duplicates are still found,
 * with both columns named, at either end of the header. */
static void test_wide_header_is_checked_in_linear_time (void)
{
  enum { N = 200000 };
  size_t len;
  char *s = wide_header(NULL, N, NULL, &len);
  csv_reader *r = open_data(s, len, NULL);
  free(s);
  if (!r) { CHECK(r); return; }
  CHECK_INT(csv_reader_ncols(r), N);
  CHECK_STR(csv_reader_colname(r, 0), "column_0");
  CHECK_STR(csv_reader_colname(r, N - 1), "column_199999");
  CHECK(csv_reader_header_probes(r) <= 2 * (size_t)N);
  printf("  header of %d columns: %zu name comparisons (pairwise: %.0f)\n", N, csv_reader_header_probes(r),
         (double)N * (N - 1) / 2);
  csv_reader_close(r);

  s = wide_header(NULL, N, "column_0", &len);
  expect_open_error(__LINE__, s, len, NULL, "line 1: duplicate column name \"column_0\" (columns 1 and 200001)");
  free(s);
  s = wide_header(NULL, N, " column_199998 ", &len);
  expect_open_error(__LINE__, s, len, NULL, "duplicate column name \"column_199998\" (columns 199999 and 200001)");
  free(s);
  s = wide_header("column_100000", N, NULL, &len);
  expect_open_error(__LINE__, s, len, NULL, "duplicate column name \"column_100000\" (columns 1 and 100002)");
  free(s);
}

static void cleanup (void)
{
  for (int i = 1; i <= nfiles; i++) {
    snprintf(last_path, sizeof last_path, "%s/%d.csv", dir, i);
    unlink(last_path);  /* most are there; the big ones are gone already */
  }
  rmdir(dir);
}

int main (void)
{
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 2;
  }
  test_header_names_are_trimmed_and_available();
  test_utf8_bom_is_ignored();
  test_bom_only_counts_at_the_very_start();
  test_semicolon_delimiter();
  test_tab_delimiter_keeps_empty_fields();
  test_quoted_fields_keep_delimiters_and_doubled_quotes();
  test_newlines_inside_quotes_keep_line_numbers_right();
  test_crlf_lines_are_counted_once();
  test_lone_cr_ends_a_line();
  test_blank_lines_are_skipped_but_counted();
  test_last_row_without_newline_is_read();
  test_stray_quote_is_reported_and_reading_goes_on();
  test_wrong_field_count_is_bad();
  test_nul_byte_rejects_the_row();
  test_nul_byte_in_header_is_an_error();
  test_one_mib_field_is_read_whole();
  test_field_over_the_limit_is_bad_and_reading_goes_on();
  test_row_over_the_limit_is_bad_and_reading_goes_on();
  test_unterminated_quote_is_bad_at_end_of_file();
  test_open_errors_name_the_file_and_the_reason();
  test_wide_header_is_checked_in_linear_time();
  test_rows_do_not_depend_on_chunk_boundaries();
  test_large_file_is_streamed_in_bounded_memory();
  cleanup();
  return DONE();
}
