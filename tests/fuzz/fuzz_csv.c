/* fuzz_csv.c - libFuzzer target for the streaming CSV reader (src/csv_reader.c over libcsv).
 * make build/fuzz/fuzz_csv   (clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc
 *   tests/fuzz/fuzz_csv.c src/csv_reader.c src/csv_encoding.c -lcsv)
 *
 * csv_reader reads from a path only, so the input goes into a memfd opened as /proc/self/fd/N.
 * The first byte may pick a mode, the file is then what follows its arguments:
 *   0x00 D Q   options: delimiter D, quote Q (0 = the default);
 *   0x01 B     chunk boundary: the file's first line, then a line of spaces (a blank line: skipped,
 *              but counted) that puts the rest B bytes before the end of the reader's first
 *              CSV_READER_CHUNK, so that rows, quoted fields and resynchronisation cross a refill;
 *   0x02 E     encoding E % 5 (CSV_ENC_*): fields are checked and converted to UTF-8;
 *   otherwise  the input is the file, with the default options.
 *
 * Checked: open fails with a message or gives unique, non-empty, trimmed column names; every row
 * is OK (ncols NUL-terminated fields without a NUL inside; without any quote in the file, no field
 * holds the delimiter or a line break), BAD (with a message) or EOF, then EOF for good; each row
 * starts on a later line than the one before, within the file's lines; the reader's buffers stay
 * within a bound of the input size; no leak (the reader is closed every time).  With an encoding:
 * every field is valid UTF-8, and a row is bad for its encoding only when csv_scan_encoding finds
 * a bad byte in the file. */
#include "csv_reader.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define ASSERT(c) do { if (!(c)) { fprintf(stderr, "fuzz_csv: %s:%d: %s\n", __FILE__, __LINE__, #c); abort(); } } while (0)

static int mfd = -1;
static char path[64];

/* Physical lines in s: LF, CRLF and a lone CR each end one (as csv_reader counts them).  memchr:
 * the files of mode 0x01 are 64 KB. */
static unsigned long count_lines (const uint8_t *s, size_t n)
{
  unsigned long lines = 0;
  const uint8_t *p = s, *end = s + n;
  while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL)
    lines++, p++;
  for (p = s; (p = memchr(p, '\r', (size_t)(end - p))) != NULL; p++)
    if (p + 1 == end || p[1] != '\n')
      lines++;
  return lines;
}

static int is_blank (char c)
{
  return c == ' ' || c == '\t';
}

static void check_header (const csv_reader *r)
{
  size_t n = csv_reader_ncols(r);
  ASSERT(n >= 1);
  ASSERT(csv_reader_colname(r, n) == NULL);
  for (size_t i = 0; i < n; i++) {
    const char *a = csv_reader_colname(r, i);
    size_t len = strlen(a);
    ASSERT(len > 0 && !is_blank(a[0]) && !is_blank(a[len - 1]));
    for (size_t j = 0; j < i; j++)
      ASSERT(strcmp(a, csv_reader_colname(r, j)) != 0);
  }
}

static void check_row (const csv_reader *r, const csv_row *row, unsigned char delim, int quoted, int enc)
{
  ASSERT(row->error == NULL && row->nfields == csv_reader_ncols(r) && row->fields != NULL);
  for (size_t i = 0; i < row->nfields; i++) {
    const csv_field *f = &row->fields[i];
    ASSERT(f->ptr != NULL && f->ptr[f->len] == '\0' && memchr(f->ptr, '\0', f->len) == NULL);
    if (enc != CSV_ENC_BYTES)
      ASSERT(csv_encoding_check(CSV_ENC_UTF8, (const unsigned char *)f->ptr, f->len) == f->len);
    if (!quoted) {  /* only quotes can put these in a field */
      ASSERT(memchr(f->ptr, delim, f->len) == NULL);
      ASSERT(memchr(f->ptr, '\n', f->len) == NULL && memchr(f->ptr, '\r', f->len) == NULL);
    }
  }
}

static void read_all (const uint8_t *file, size_t size, const csv_options *opt)
{
  unsigned char delim = opt->delimiter ? opt->delimiter : ',';
  unsigned char quote = opt->quote ? opt->quote : '"';
  int quoted = memchr(file, quote, size) != NULL;
  unsigned long lines = count_lines(file, size), prev = 0;
  char err[256];
  csv_reader *r;
  csv_row row;
  csv_scan scan = {0};
  int st;

  if (opt->encoding != CSV_ENC_BYTES) {
    ASSERT(csv_scan_encoding(path, opt, &scan, err, sizeof err) == 0);
    ASSERT(scan.bad_lines <= lines + 1 && (scan.bad_lines == 0 || (scan.line >= 1 && scan.offset < size)));
  }

  memset(err, 'x', sizeof err);
  r = csv_reader_open(path, opt, err, sizeof err);
  if (!r) {
    ASSERT(memchr(err, '\0', sizeof err) != NULL && strncmp(err, path, strlen(path)) == 0);
    return;
  }
  check_header(r);
  /* each row takes at least one byte: a reader that does not stop is a bug */
  for (size_t k = 0; k <= size + 1; k++) {
    st = csv_reader_next(r, &row);
    ASSERT(st == CSV_ROW_OK || st == CSV_ROW_BAD || st == CSV_ROW_EOF);  /* no read error on a memfd */
    if (st == CSV_ROW_EOF)
      break;
    ASSERT(row.line >= 2 && row.line > prev && row.line <= lines + 1);  /* one row a line at most */
    ASSERT(row.line <= csv_reader_line(r) && csv_reader_line(r) <= lines + 1);
    prev = row.line;
    if (st == CSV_ROW_OK)
      check_row(r, &row, delim, quoted, opt->encoding);
    else
      ASSERT(row.error != NULL && row.error[0] != '\0' && (scan.bad_lines || !strstr(row.error, " is not valid ")));
    /* memory grows with the longest row, never with the file: a loose bound of the input size */
    ASSERT(csv_reader_buffer_size(r) <= 40 * size + 16384);
  }
  ASSERT(st == CSV_ROW_EOF);
  ASSERT(csv_reader_next(r, &row) == CSV_ROW_EOF);
  ASSERT(csv_reader_line(r) <= lines + 1);
  csv_reader_close(r);
}

/* The file for mode 0x01 (see the top): malloc'd, *len set; NULL when the first line is too long. */
static uint8_t *boundary_file (const uint8_t *d, size_t n, unsigned back, size_t *len)
{
  size_t head = 0, at = CSV_READER_CHUNK - back, fill;
  uint8_t *f;
  while (head < n && d[head] != '\n' && d[head] != '\r')
    head++;
  if (head < n)
    head += d[head] == '\r' && head + 1 < n && d[head + 1] == '\n' ? 2 : 1;
  if (head + 2 > at)
    return NULL;
  fill = at - head;  /* fill - 1 spaces and a LF */
  f = malloc(n + fill);
  ASSERT(f != NULL);
  memcpy(f, d, head);
  memset(f + head, ' ', fill - 1);
  f[head + fill - 1] = '\n';
  memcpy(f + at, d + head, n - head);
  *len = n + fill;
  return f;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  csv_options opt = { 0, 0, CSV_ENC_BYTES };
  uint8_t *big = NULL;

  if (mfd < 0) {
    mfd = memfd_create("fuzz_csv", MFD_CLOEXEC);
    ASSERT(mfd >= 0);
    snprintf(path, sizeof path, "/proc/self/fd/%d", mfd);
  }
  if (size >= 3 && data[0] == 0x00) {
    opt.delimiter = data[1];
    opt.quote = data[2];
    data += 3, size -= 3;
  } else if (size >= 2 && data[0] == 0x02) {
    opt.encoding = data[1] % 5;
    data += 2, size -= 2;
  } else if (size >= 2 && data[0] == 0x01) {
    size_t len;
    big = boundary_file(data + 2, size - 2, data[1], &len);
    data = big ? big : data + 2;
    size = big ? len : size - 2;
  }
  ASSERT(ftruncate(mfd, 0) == 0);
  ASSERT(size == 0 || pwrite(mfd, data, size, 0) == (ssize_t)size);
  read_all(data, size, &opt);
  free(big);
  return 0;
}
