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

/* ---------------------------------------------------------------- encodings (csv_encoding.c) */

static void test_encoding_names (void)
{
  CHECK_INT(csv_encoding_lookup("UTF-8"), CSV_ENC_UTF8);
  CHECK_INT(csv_encoding_lookup("latin1"), CSV_ENC_LATIN1);
  CHECK_INT(csv_encoding_lookup("ISO-8859-1"), CSV_ENC_LATIN1);
  CHECK_INT(csv_encoding_lookup("cp1252"), CSV_ENC_CP1252);
  CHECK_INT(csv_encoding_lookup("latin-9"), CSV_ENC_LATIN9);
  CHECK_INT(csv_encoding_lookup("ebcdic"), -1);
  CHECK_STR(csv_encoding_name(CSV_ENC_CP1252), "windows-1252");
}

/* s converted from enc is want. */
static void expect_utf8 (int srcline, int enc, const char *s, const char *want)
{
  unsigned char out[64];
  size_t n = strlen(s), len;
  check_count++;
  if (csv_encoding_check(enc, (const unsigned char *)s, n) != n) {
    check_failures++;
    fprintf(stderr, "%s:%d: FAIL: \"%s\" not valid in %s\n", __FILE__, srcline, s, csv_encoding_name(enc));
    return;
  }
  len = csv_encoding_to_utf8(enc, (const unsigned char *)s, n, out);
  CHECK_INT(csv_encoding_utf8_len(enc, (const unsigned char *)s, n), len);
  check_count++;
  if (len != strlen(want) || memcmp(out, want, len) != 0) {
    check_failures++;
    fprintf(stderr, "%s:%d: FAIL: %s \"%s\" -> \"%.*s\", want \"%s\"\n", __FILE__, srcline, csv_encoding_name(enc), s,
            (int)len, out, want);
  }
}
#define EXPECT_UTF8(enc, s, want) expect_utf8(__LINE__, enc, s, want)

static void test_single_byte_encodings_convert_to_utf8 (void)
{
  EXPECT_UTF8(CSV_ENC_LATIN1, "Zo\xEB M\xFCller \xD1" "and\xFA", "Zoë Müller Ñandú");
  EXPECT_UTF8(CSV_ENC_LATIN1, "\xA0\xA4\xFF", "\xC2\xA0¤ÿ");
  EXPECT_UTF8(CSV_ENC_CP1252, "\x93quoted\x94 O\x92" "Brien \x80 5 \x96 \x8C\x9C\x9F\x8A", "“quoted” O’Brien € 5 – ŒœŸŠ");
  EXPECT_UTF8(CSV_ENC_CP1252, "caf\xE9", "café");
  EXPECT_UTF8(CSV_ENC_LATIN9, "\xA4 \xA6\xA8\xB4\xB8\xBC\xBD\xBE \xE9", "€ ŠšŽžŒœŸ é");
  EXPECT_UTF8(CSV_ENC_UTF8, "déjà", "déjà");
  EXPECT_UTF8(CSV_ENC_LATIN1, "plain ASCII", "plain ASCII");
}

static void test_bytes_that_are_no_character_are_found (void)
{
  const unsigned char undefined[] = {0x81, 0x8D, 0x8F, 0x90, 0x9D};
  for (size_t i = 0; i < sizeof undefined; i++) CHECK_INT(csv_encoding_char(CSV_ENC_CP1252, undefined + i, 1), 0);
  CHECK_INT(csv_encoding_check(CSV_ENC_CP1252, (const unsigned char *)"abc\x81", 4), 3);
  CHECK_INT(csv_encoding_check(CSV_ENC_LATIN1, (const unsigned char *)"\x93x", 2), 0); /* C1 control */
  CHECK_INT(csv_encoding_check(CSV_ENC_LATIN9, (const unsigned char *)"ab\x80", 3), 2);
  CHECK_INT(csv_encoding_check(CSV_ENC_BYTES, (const unsigned char *)"\xFF\xFE", 2), 2);
}

static void test_utf8_is_checked_strictly (void)
{
  static const struct { const char *s; size_t bad; } cases[] = {
    {"0123456789abcdef\xC3\xA9", 18},             /* ASCII words, then a valid 2-byte sequence */
    {"Zo\xEB", 2},                                /* Latin-1 */
    {"\xC0\x80", 0}, {"\xC1\xBF", 0},             /* overlong 2-byte */
    {"\xE0\x80\x80", 0}, {"\xE0\xA0\x80", 3},     /* overlong 3-byte; the smallest valid one */
    {"\xED\xA0\x80", 0}, {"\xED\x9F\xBF", 3},     /* surrogate; the last before them */
    {"\xF0\x8F\xBF\xBF", 0}, {"\xF0\x90\x80\x80", 4},
    {"\xF4\x90\x80\x80", 0}, {"\xF4\x8F\xBF\xBF", 4}, /* past U+10FFFF; U+10FFFF */
    {"\xF5\x80\x80\x80", 0}, {"a\xBF", 1},        /* no such lead byte; a lone continuation */
    {"ab\xE2\x82", 2},                            /* cut short at the end */
    {"\xE2\x82x", 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    size_t n = strlen(cases[i].s), got = csv_encoding_check(CSV_ENC_UTF8, (const unsigned char *)cases[i].s, n);
    check_count++;
    if (got != (cases[i].bad < n ? cases[i].bad : n)) {
      check_failures++;
      fprintf(stderr, "%s:%d: FAIL: case %zu: bad at %zu, want %zu\n", __FILE__, __LINE__, i, got, cases[i].bad);
    }
  }
  CHECK_INT(csv_encoding_char(CSV_ENC_UTF8, (const unsigned char *)"\xE2\x82", 2), -1);
  CHECK_INT(csv_encoding_char(CSV_ENC_UTF8, (const unsigned char *)"\xE2\x82\xAC", 3), 3);
}

static void test_reader_converts_fields_and_names_a_bad_one (void)
{
  csv_options o = { .encoding = CSV_ENC_CP1252 };
  const char *s = "email,n\xE4me\n"
                  "a@example.org,\x93Zo\xEB\x94\n"
                  "b@example.org,Bad\x81\n"
                  "c@example.org,\"multi\nl\xEDne \x80\"\n";
  csv_reader *r = open_data(s, strlen(s), &o);
  if (!r) { CHECK(r); return; }
  CHECK_STR(csv_reader_colname(r, 1), "näme");
  EXPECT_ROW(r, 2, "a@example.org", "“Zoë”");
  EXPECT_BAD(r, 3, "field 2 (näme) is not valid windows-1252: byte 0x81 at byte 4 of the field");
  EXPECT_ROW(r, 4, "c@example.org", "multi\nlíne €");
  EXPECT_EOF(r);
  csv_reader_close(r);

  o.encoding = CSV_ENC_UTF8;
  s = "email,name\nzoe@example.org,Zo\xEB\nb@example.org,\xC3\xA9\n";
  r = open_data(s, strlen(s), &o);
  if (!r) { CHECK(r); return; }
  EXPECT_BAD(r, 2, "field 2 (name) is not valid utf-8: byte 0xEB at byte 3 of the field");
  EXPECT_ROW(r, 3, "b@example.org", "é");
  csv_reader_close(r);

  o.encoding = CSV_ENC_LATIN1;
  s = "email,name\nq@example.org,\x93q\x94\n";
  r = open_data(s, strlen(s), &o);
  if (!r) { CHECK(r); return; }
  EXPECT_BAD(r, 2, "byte 0x93 at byte 1 of the field (a control code there: the file is likely windows-1252)");
  csv_reader_close(r);

  o.encoding = CSV_ENC_UTF8;
  EXPECT_OPEN_ERROR("em\xE4il,name\n", &o, "bad header row: field 1 is not valid utf-8: byte 0xE4");
  r = open_str("email,name\nzoe@example.org,Zo\xEB\n"); /* no encoding: bytes as they are */
  if (!r) { CHECK(r); return; }
  EXPECT_ROW(r, 2, "zoe@example.org", "Zo\xEB");
  csv_reader_close(r);
}

/* csv_scan_encoding over s: bad_lines, line, field, offset (bad_lines 0: the rest unchecked). */
static void expect_scan (int srcline, const char *s, size_t n, int enc, unsigned long lines, unsigned long line,
                         size_t field, unsigned long long offset)
{
  csv_options o = { .encoding = enc };
  csv_scan scan;
  check_count++;
  if (csv_scan_encoding(write_file(s, n), &o, &scan, err, sizeof err) != 0 || scan.bad_lines != lines
      || (lines && (scan.line != line || scan.field != field || scan.offset != offset))) {
    check_failures++;
    fprintf(stderr, "%s:%d: FAIL: scan: %lu lines, first line %lu field %zu offset %llu (%s); want %lu, %lu, %zu, %llu\n",
            __FILE__, srcline, scan.bad_lines, scan.line, scan.field, scan.offset, err, lines, line, field, offset);
  }
}
#define EXPECT_SCAN(s, enc, lines, line, field, offset) expect_scan(__LINE__, s, strlen(s), enc, lines, line, field, offset)

static void test_scan_finds_the_first_bad_line_field_and_offset_and_counts_lines (void)
{
  EXPECT_SCAN("email,name\r\na@x.test,Ann\r\n", CSV_ENC_UTF8, 0, 0, 0, 0);
  EXPECT_SCAN("\xEF\xBB\xBF" "email,name\na@x.test,Zo\xC3\xAB\n", CSV_ENC_UTF8, 0, 0, 0, 0);
  /* CRLF counted once; a quoted field with a delimiter and a newline; two bad bytes on one line */
  EXPECT_SCAN("email,name,city\r\na@x.test,\"x,\r\ny\",M\xFCnchen \xFC\r\nb@x.test,Zo\xEB,Oslo\n", CSV_ENC_UTF8,
              2, 3, 3, 35);
  EXPECT_SCAN("email,name\r\n\r\na@x.test,B\x81" "d\r\n", CSV_ENC_CP1252, 1, 3, 2, 24);
  EXPECT_SCAN("email,name\ra@x.test,Bad\xE2\x82", CSV_ENC_UTF8, 1, 2, 2, 23); /* cut short by the end */
  EXPECT_SCAN("email,name\na@x.test,\x93q\x94\n", CSV_ENC_LATIN1, 1, 2, 2, 20);
  EXPECT_SCAN("email,name\na@x.test,\x93q\x94\n", CSV_ENC_CP1252, 0, 0, 0, 0);
  {
    csv_options o = { .delimiter = ';' }; /* the default encoding is UTF-8 */
    csv_scan scan;
    CHECK_INT(csv_scan_encoding(write_file("a;b,c;d\nx;y,z;\xFF\n", 16), &o, &scan, err, sizeof err), 0);
    CHECK_INT(scan.field, 3);
    CHECK_INT(scan.byte, 0xFF);
  }
  CHECK(csv_scan_encoding("/nonexistent/x.csv", NULL, &(csv_scan){0}, err, sizeof err) == -1);
  CHECK(strstr(err, "/nonexistent/x.csv: No such file") == err);
}

/* A UTF-8 sequence cut by the end of a 64 KiB block is carried into the next one, in both passes. */
static void test_scan_across_block_boundaries (void)
{
  size_t n = 3 * CSV_READER_CHUNK;
  char *s = malloc(n + 1);
  if (!s) { CHECK(s); return; }
  memset(s, 'x', n);
  memcpy(s, "email\n", 6);
  memcpy(s + CSV_READER_CHUNK - 5, "\xE2\x82\xAC", 3);
  memcpy(s + CSV_READER_CHUNK - 1, "\xE2\x82\xAC", 3); /* the 1st block ends after its first byte */
  s[n] = '\0';
  expect_scan(__LINE__, s, n, CSV_ENC_UTF8, 0, 0, 0, 0);
  s[2 * CSV_READER_CHUNK + 5] = '\xFF';            /* one bad byte late in the file: found by offset */
  /* a 4-byte sequence cut by the end of the 2nd block (which starts with the 1st one's last byte) */
  memcpy(s + 2 * CSV_READER_CHUNK - 3, "\xF0\x9F\x98\x80", 4);
  expect_scan(__LINE__, s, n, CSV_ENC_UTF8, 1, 2, 1, 2 * CSV_READER_CHUNK + 5);
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
  test_encoding_names();
  test_single_byte_encodings_convert_to_utf8();
  test_bytes_that_are_no_character_are_found();
  test_utf8_is_checked_strictly();
  test_reader_converts_fields_and_names_a_bad_one();
  test_scan_finds_the_first_bad_line_field_and_offset_and_counts_lines();
  test_scan_across_block_boundaries();
  cleanup();
  return DONE();
}
