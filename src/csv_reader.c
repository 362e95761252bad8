/* csv_reader.c - streaming CSV reader over libcsv: header row, line numbers, recovery from bad rows.
 *
 * How bytes flow.  The file is read into one CSV_READER_CHUNK buffer.  The chunk is cut into
 * "segments": the bytes up to and including the next CR or LF (or up to the end of the chunk), and
 * each segment goes to csv_parse on its own.  libcsv ends rows only at a CR or LF outside quotes, so
 * a row can only end on the last byte of a segment, and we know the physical line of every byte we
 * hand over.  That gives exact row-start lines without a second CSV scanner: a row starts on the
 * line of the first segment that is not blank (by libcsv's own rule for skipping blank lines) while
 * no row is in progress.  Lines end at LF, CRLF or a lone CR, like libcsv's rows.
 *
 * Memory.  libcsv copies the current field into its buffer; on_field() appends each finished field
 * (plus a NUL) to our row buffer.  Both grow to the longest field/row seen, never further: the chunk
 * is fixed, and rows wider than the header store no extra fields.  libcsv grows its buffer through
 * bounded_realloc(), which refuses to pass CSV_READER_MAX_ROW; on_field() applies the same limit to
 * the whole row.
 *
 * Resynchronisation.  When libcsv stops on a parse error (strict mode: a quote inside an unquoted
 * field, text after a closing quote) or on a field over the limit, the row is reported bad with the
 * line it started on, the rest of the physical line where the error was found is dropped, and a
 * fresh parser starts on the next line.  The end of the line is the only boundary left to trust:
 * whether we are inside quotes is exactly what is in doubt, and a stray quote taken as an opening
 * quote would swallow the rest of the file.  The cost: if the error is found inside a multi-line
 * quoted field, the lines after it are read as rows of their own (each then valid or reported bad).
 * Errors found at the end of a row (field count, NUL byte, row too long) need no resync: libcsv's
 * row boundary is sound there.  An opening quote never closed swallows the rest of the file (or
 * CSV_READER_MAX_ROW bytes): one bad row, "unterminated quoted field".
 */
#include "csv_reader.h"
#include "seterr.h"

#include <csv.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PARSER_OPTS (CSV_STRICT | CSV_STRICT_FINI) /* report stray and unterminated quotes */
#define MIN_BLK 4096 /* first step of libcsv's field buffer; later steps double it */

enum { ST_READING, ST_DONE, ST_FAILED };

struct csv_reader {
  char *path;
  int fd;
  int state; /* ST_* */
  struct csv_parser parser;
  unsigned char delim, quote;
  int enc; /* CSV_ENC_*: fields are checked (and converted to UTF-8) unless CSV_ENC_BYTES */

  unsigned char *chunk; /* CSV_READER_CHUNK bytes; chunk[pos..len) not consumed yet */
  size_t pos, len;
  int at_eof; /* read() has returned 0 */

  unsigned long line; /* physical line of the next byte */
  unsigned long last_line; /* physical line of the last byte consumed */
  int after_cr; /* the last byte consumed was a CR: an LF now is the rest of a CRLF */
  int skipping; /* resynchronising: dropping bytes up to the end of the line */

  /* the row being assembled */
  int in_row; /* libcsv has begun a row */
  int row_done; /* ... and ended it (or we gave up on it) */
  unsigned long row_line;
  size_t nfields; /* fields seen, stored or not */
  char *buf; /* stored fields, each followed by a NUL */
  size_t buflen, bufcap;
  csv_field *fields; /* lengths while assembling, pointers into buf once the row is done */
  size_t fieldcap;
  int bad, oom;
  char msg[256]; /* why the row is bad */

  size_t ncols; /* 0 while reading the header itself */
  char **names;
  char *namebuf;
  size_t name_probes; /* debug: occupied hash slots looked at while checking the header */
  char err[256]; /* "path: reason" for open errors and CSV_ROW_IOERR */
};

/* The first problem found in a row is the one reported. */
static void row_bad(csv_reader *r, const char *fmt, ...) {
  va_list ap;
  if (r->bad) return;
  r->bad = 1;
  va_start(ap, fmt);
  vsnprintf(r->msg, sizeof r->msg, fmt, ap);
  va_end(ap);
}

/* Grows an array of elem-sized items to hold need items; returns it, or NULL (p untouched). */
static void *grow(void *p, size_t *cap, size_t need, size_t elem) {
  size_t n = *cap ? *cap : 16;
  void *q;
  if (need <= *cap) return p;
  while (n < need) n *= 2; /* need is bounded by CSV_READER_MAX_ROW: no overflow */
  q = realloc(p, n * elem);
  if (q) *cap = n;
  return q;
}

/* ---------------------------------------------------------------- libcsv */

/* libcsv grows its field buffer through this.  Refusing past the limit makes csv_parse stop with
 * CSV_ENOMEM; libcsv first retries smaller steps, so the buffer ends exactly at the limit, which is
 * how parse_stopped() tells "too long" from a real lack of memory. */
static void *bounded_realloc(void *p, size_t n) { return n > CSV_READER_MAX_ROW ? NULL : realloc(p, n); }

static int parser_start(csv_reader *r) {
  if (csv_init(&r->parser, PARSER_OPTS) != 0) return -1;
  csv_set_delim(&r->parser, r->delim);
  csv_set_quote(&r->parser, r->quote);
  csv_set_realloc_func(&r->parser, bounded_realloc);
  return 0;
}

/* libcsv has no reset after an error (csv_fini refuses an unterminated quote), so start afresh. */
static int parser_restart(csv_reader *r) {
  csv_free(&r->parser);
  return parser_start(r);
}

/* Field idx holds a byte at s[at] that is no character of the reader's encoding. */
static void not_encoded(csv_reader *r, size_t idx, const unsigned char *s, size_t at) {
  int c1 = r->enc != CSV_ENC_UTF8 && r->enc != CSV_ENC_CP1252 && s[at] < 0xA0;
  row_bad(r, "field %zu%s%.60s%s is not valid %s: byte 0x%02X at byte %zu of the field%s", idx + 1,
          r->ncols ? " (" : "", r->ncols ? r->names[idx] : "", r->ncols ? ")" : "", csv_encoding_name(r->enc),
          s[at], at + 1, c1 ? " (a control code there: the file is likely windows-1252)" : "");
}

static void on_field(void *data, size_t len, void *ctx) {
  csv_reader *r = ctx;
  size_t idx = r->nfields++;
  size_t used = r->buflen + idx * sizeof(csv_field), outlen = len, bad;
  char *b;
  csv_field *f;

  if (r->bad || r->oom || (r->ncols && idx >= r->ncols))
    return; /* the row will be reported, no need to keep its fields */
  if (len && memchr(data, '\0', len)) {
    row_bad(r, "NUL byte in field %zu", idx + 1);
    return;
  }
  if (r->enc != CSV_ENC_BYTES && (bad = csv_encoding_check(r->enc, data, len)) < len) {
    not_encoded(r, idx, data, bad);
    return;
  }
  if (csv_encoding_converts(r->enc)) outlen = csv_encoding_utf8_len(r->enc, data, len);
  if (outlen + 1 + sizeof(csv_field) > CSV_READER_MAX_ROW - used) {
    row_bad(r, "row is longer than %d bytes", CSV_READER_MAX_ROW);
    return;
  }
  b = grow(r->buf, &r->bufcap, r->buflen + outlen + 1, 1);
  if (b) r->buf = b;
  f = grow(r->fields, &r->fieldcap, idx + 1, sizeof *f);
  if (f) r->fields = f;
  if (!b || !f) {
    r->oom = 1;
    return;
  }
  if (outlen != len) /* only a field with a byte >= 0x80 of a single-byte encoding */
    csv_encoding_to_utf8(r->enc, data, len, (unsigned char *)r->buf + r->buflen);
  else if (len)
    memcpy(r->buf + r->buflen, data, len);
  r->buf[r->buflen + outlen] = '\0';
  r->buflen += outlen + 1;
  r->fields[idx].ptr = NULL;
  r->fields[idx].len = outlen;
}

static void on_row(int term, void *ctx) {
  csv_reader *r = ctx;
  (void)term;
  r->row_done = 1;
  r->in_row = 0;
}

/* ---------------------------------------------------------------- bytes and lines */

/* Fills the chunk.  Returns 0, or -1 with the reader failed. */
static int refill(csv_reader *r) {
  r->pos = r->len = 0;
  while (r->len < CSV_READER_CHUNK && !r->at_eof) {
    ssize_t n = read(r->fd, r->chunk + r->len, CSV_READER_CHUNK - r->len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      seterr(r->err, sizeof r->err, "%s: %s", r->path, strerror(errno));
      r->state = ST_FAILED;
      return -1;
    }
    if (n == 0) r->at_eof = 1;
    r->len += (size_t)n;
  }
  return 0;
}

/* Length of the next segment: up to and including the next CR or LF, or to the end of the chunk. */
static size_t segment_len(const csv_reader *r) {
  const unsigned char *s = r->chunk + r->pos, *end = r->chunk + r->len, *p = s;
  while (p < end && *p != '\n' && *p != '\r') p++;
  return (size_t)(p - s) + (p < end);
}

static int ends_line(const unsigned char *s, size_t n) { return s[n - 1] == '\n' || s[n - 1] == '\r'; }

/* Does s hold only what libcsv skips before a row (spaces and tabs that are not the delimiter,
 * CR, LF)?  Mirrors the ROW_NOT_BEGUN case of csv_parse. */
static int blank(const csv_reader *r, const unsigned char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char c = s[i];
    if (c != '\r' && c != '\n' && !((c == ' ' || c == '\t') && c != r->delim)) return 0;
  }
  return 1;
}

/* Accounts for a consumed segment: LF, CRLF and a lone CR each end one line. */
static void count_lines(csv_reader *r, const unsigned char *s, size_t n) {
  unsigned char last = s[n - 1];
  if (!(n == 1 && last == '\n' && r->after_cr)) {
    r->last_line = r->line;
    if (last == '\n' || last == '\r') r->line++;
  }
  r->after_cr = last == '\r';
}

/* csv_parse stopped before the end of segment s at byte c: report the row, resynchronise. */
static void parse_stopped(csv_reader *r, const unsigned char *s, size_t n, unsigned char c) {
  size_t field = r->nfields + 1;
  if (csv_error(&r->parser) == CSV_EPARSE && c == r->quote)
    row_bad(r, "stray quote in field %zu", field);
  else if (csv_error(&r->parser) == CSV_EPARSE)
    row_bad(r, "unexpected text after the closing quote of field %zu", field);
  else if (csv_get_buffer_size(&r->parser) >= CSV_READER_MAX_ROW)
    row_bad(r, "field %zu is longer than %d bytes", field, CSV_READER_MAX_ROW);
  else
    r->oom = 1;
  if (r->line != r->row_line && !r->oom) {
    size_t k = strlen(r->msg);
    snprintf(r->msg + k, sizeof r->msg - k, " (on line %lu)", r->line);
  }
  r->row_done = 1;
  r->in_row = 0;
  r->skipping = !ends_line(s, n);
  if (parser_restart(r) != 0) r->oom = 1;
}

/* Consumes one segment. */
static void feed(csv_reader *r, const unsigned char *s, size_t n) {
  if (r->skipping) {
    r->skipping = !ends_line(s, n);
  } else {
    size_t cap = csv_get_buffer_size(&r->parser), done;
    if (!r->in_row && !blank(r, s, n)) {
      r->in_row = 1;
      r->row_line = r->line;
    }
    csv_set_blk_size(&r->parser, cap < MIN_BLK ? MIN_BLK : cap); /* default is +128 bytes a step */
    done = csv_parse(&r->parser, s, n, on_field, on_row, r);
    if (done < n) parse_stopped(r, s, n, s[done]);
  }
  count_lines(r, s, n);
}

/* ---------------------------------------------------------------- rows */

static int fail(csv_reader *r, csv_row *out, const char *reason) {
  if (reason) seterr(r->err, sizeof r->err, "%s: %s", r->path, reason);
  r->state = ST_FAILED;
  out->error = r->err;
  return CSV_ROW_IOERR;
}

static int finish_row(csv_reader *r, csv_row *out) {
  char *p = r->buf;
  if (r->oom) return fail(r, out, "out of memory");
  out->line = r->row_line;
  if (!r->bad && r->ncols && r->nfields != r->ncols)
    row_bad(r, "row has %zu field%s, header has %zu", r->nfields, r->nfields == 1 ? "" : "s", r->ncols);
  if (r->bad) {
    out->error = r->msg;
    return CSV_ROW_BAD;
  }
  for (size_t i = 0; i < r->nfields; i++) { /* buf may have moved while the row grew */
    r->fields[i].ptr = p;
    p += r->fields[i].len + 1;
  }
  out->fields = r->fields;
  out->nfields = r->nfields;
  return CSV_ROW_OK;
}

static int finish_file(csv_reader *r, csv_row *out) {
  r->state = ST_DONE;
  if (csv_fini(&r->parser, on_field, on_row, r) != 0) { /* flushes a last row without newline */
    row_bad(r, "unterminated quoted field %zu (runs to the end of the file)", r->nfields + 1);
    r->row_done = 1;
  }
  return r->row_done ? finish_row(r, out) : CSV_ROW_EOF;
}

int csv_reader_next(csv_reader *r, csv_row *out) {
  memset(out, 0, sizeof *out);
  if (r->state == ST_FAILED) return fail(r, out, NULL);
  if (r->state == ST_DONE) return CSV_ROW_EOF;
  r->row_done = r->bad = r->oom = 0;
  r->nfields = r->buflen = 0;
  r->msg[0] = '\0';
  while (!r->row_done) {
    const unsigned char *s;
    size_t n;
    if (r->pos == r->len) {
      if (r->at_eof) return finish_file(r, out);
      if (refill(r) != 0) return fail(r, out, NULL);
      continue;
    }
    s = r->chunk + r->pos;
    n = segment_len(r);
    r->pos += n;
    feed(r, s, n);
  }
  return finish_row(r, out);
}

/* ---------------------------------------------------------------- open, header, close */

/* FNV-1a: column names come from the user's own file, so no defence against chosen collisions. */
static uint32_t name_hash(const char *s) {
  uint32_t h = 2166136261u;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
  return h;
}

static int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* Checks that the n names are unique, in time linear in n (headers of 100,000+ columns exist: a
 * pairwise check took 30 s at 120,000).  An open-addressing hash set of column indexes, at most half
 * full; the first duplicate in column order is reported with the column it repeats.  Returns 0, or -1
 * with r->err set. */
static int check_unique(csv_reader *r, size_t n, unsigned long line) {
  size_t cap = 16, mask, *slot;
  uint32_t *hash;
  int rc = 0;
  while (cap < 2 * n) cap *= 2; /* n is bounded by CSV_READER_MAX_ROW: no overflow */
  mask = cap - 1;
  slot = malloc(cap * sizeof *slot);
  hash = malloc(n * sizeof *hash);
  if (!slot || !hash) {
    seterr(r->err, sizeof r->err, "%s: out of memory", r->path);
    rc = -1;
    goto done;
  }
  for (size_t k = 0; k < cap; k++) slot[k] = SIZE_MAX; /* empty */
  for (size_t i = 0; i < n && rc == 0; i++) {
    size_t k;
    hash[i] = name_hash(r->names[i]);
    for (k = hash[i] & mask; slot[k] != SIZE_MAX; k = (k + 1) & mask) {
      size_t j = slot[k];
      r->name_probes++;
      if (hash[j] == hash[i] && strcmp(r->names[j], r->names[i]) == 0) {
        seterr(r->err, sizeof r->err, "%s: line %lu: duplicate column name \"%.60s\" (columns %zu and %zu)",
               r->path, line, r->names[i], j + 1, i + 1);
        rc = -1;
        break;
      }
    }
    slot[k] = i;
  }
  if (rc == 0) r->ncols = n;
done:
  free(slot);
  free(hash);
  return rc;
}

/* Copies the header row's names, trimmed, and checks them.  Returns 0, or -1 with r->err set. */
static int take_header(csv_reader *r, const csv_row *row) {
  size_t n = row->nfields;
  char *p;
  r->namebuf = malloc(r->buflen);
  r->names = malloc(n * sizeof *r->names);
  if (!r->namebuf || !r->names) {
    seterr(r->err, sizeof r->err, "%s: out of memory", r->path);
    return -1;
  }
  p = r->namebuf;
  for (size_t i = 0; i < n; i++) {
    const char *s = row->fields[i].ptr, *e = s + row->fields[i].len;
    while (s < e && is_space((unsigned char)*s)) s++;
    while (e > s && is_space((unsigned char)e[-1])) e--;
    memcpy(p, s, (size_t)(e - s));
    p[e - s] = '\0';
    r->names[i] = p;
    p += e - s + 1;
    if (!*r->names[i]) {
      seterr(r->err, sizeof r->err, "%s: line %lu: column %zu has an empty name", r->path, row->line, i + 1);
      return -1;
    }
  }
  return check_unique(r, n, row->line);
}

static int read_header(csv_reader *r) {
  csv_row row;
  switch (csv_reader_next(r, &row)) {
    case CSV_ROW_OK:
      return take_header(r, &row);
    case CSV_ROW_BAD:
      seterr(r->err, sizeof r->err, "%s: line %lu: bad header row: %s", r->path, row.line, row.error);
      return -1;
    case CSV_ROW_EOF:
      seterr(r->err, sizeof r->err, "%s: no header row (the file is empty)", r->path);
      return -1;
    default:
      return -1; /* r->err says why */
  }
}

csv_reader *csv_reader_open(const char *path, const csv_options *opt, char *err, size_t errlen) {
  unsigned char delim = opt && opt->delimiter ? opt->delimiter : ',';
  unsigned char quote = opt && opt->quote ? opt->quote : '"';
  int enc = opt ? opt->encoding : CSV_ENC_BYTES;
  csv_reader *r;

  if (enc < CSV_ENC_BYTES || enc > CSV_ENC_LATIN9) {
    seterr(err, errlen, "%s: invalid encoding", path);
    return NULL;
  }
  if (delim == quote || delim == '\r' || delim == '\n' || quote == '\r' || quote == '\n') {
    seterr(err, errlen, "%s: invalid delimiter or quote character", path);
    return NULL;
  }
  r = calloc(1, sizeof *r); /* a zeroed parser is safe to csv_free */
  if (!r) {
    seterr(err, errlen, "%s: out of memory", path);
    return NULL;
  }
  r->fd = -1;
  r->delim = delim;
  r->quote = quote;
  r->enc = enc;
  r->line = 1;
  r->path = strdup(path);
  r->chunk = malloc(CSV_READER_CHUNK);
  if (!r->path || !r->chunk || parser_start(r) != 0) {
    seterr(err, errlen, "%s: out of memory", path);
    goto error;
  }
  r->fd = open(path, O_RDONLY | O_CLOEXEC);
  if (r->fd < 0) {
    seterr(err, errlen, "%s: %s", path, strerror(errno));
    goto error;
  }
  if (refill(r) != 0) goto header_error;
  if (r->len >= 3 && memcmp(r->chunk, "\xEF\xBB\xBF", 3) == 0)
    r->pos = 3; /* UTF-8 byte order mark, as spreadsheet exports write it */
  if (read_header(r) != 0) goto header_error;
  return r;

header_error:
  seterr(err, errlen, "%s", r->err);
error:
  csv_reader_close(r);
  return NULL;
}

void csv_reader_close(csv_reader *r) {
  if (!r) return;
  if (r->fd >= 0) close(r->fd); /* read-only: nothing to lose if it fails */
  csv_free(&r->parser);
  free(r->chunk);
  free(r->buf);
  free(r->fields);
  free(r->names);
  free(r->namebuf);
  free(r->path);
  free(r);
}

size_t csv_reader_ncols(const csv_reader *r) { return r->ncols; }

const char *csv_reader_colname(const csv_reader *r, size_t i) { return i < r->ncols ? r->names[i] : NULL; }

const char *csv_reader_path(const csv_reader *r) { return r->path; }

unsigned long csv_reader_line(const csv_reader *r) { return r->last_line; }

size_t csv_reader_buffer_size(const csv_reader *r) {
  /* libcsv 3.0.3 declares csv_get_buffer_size without const; it only reads */
  return r->bufcap + r->fieldcap * sizeof(csv_field) + csv_get_buffer_size((struct csv_parser *)&r->parser);
}

size_t csv_reader_header_probes(const csv_reader *r) { return r->name_probes; }

/* ---------------------------------------------------------------- whole-file encoding scan */

/* The file in blocks; a UTF-8 sequence cut by the end of a block is carried into the next. */
typedef struct scan_file {
  int fd, enc, eof;
  unsigned char *buf; /* CSV_READER_CHUNK + 4 bytes */
  size_t n; /* bytes in buf */
  unsigned long long base; /* file offset of buf[0] */
} scan_file;

/* Keeps buf[keep..n) (a cut sequence) and reads the next block after it.  Returns 0, or -1 with
 * errno set. */
static int scan_next(scan_file *f, size_t keep) {
  size_t left = f->n - keep;
  memmove(f->buf, f->buf + keep, left);
  f->base += keep;
  f->n = left;
  while (f->n < CSV_READER_CHUNK && !f->eof) {
    ssize_t got = read(f->fd, f->buf + f->n, CSV_READER_CHUNK - f->n);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return -1;
    if (got == 0) f->eof = 1;
    f->n += (size_t)got;
  }
  return 0;
}

/* Is buf[i..n) only the start of a sequence the next block completes? */
static int scan_cut(const scan_file *f, size_t i) {
  return !f->eof && csv_encoding_char(f->enc, f->buf + i, f->n - i) < 0;
}

/* Pass 1: the offset of the first bad byte, or -1 when there is none (or -2 on a read error). */
static long long scan_fast(scan_file *f) {
  size_t keep = 0;
  do {
    size_t i;
    if (scan_next(f, keep) != 0) return -2;
    i = csv_encoding_check(f->enc, f->buf, f->n);
    if (i < f->n && !scan_cut(f, i)) return (long long)(f->base + i);
    keep = i < f->n ? i : f->n;
  } while (f->n > 0 && !(f->eof && keep == f->n));
  return -1;
}

/* Pass 2, when pass 1 found a bad byte: byte by byte, following lines, quotes and fields. */
static int scan_detail(scan_file *f, unsigned char delim, unsigned char quote, csv_scan *out) {
  unsigned long line = 1, last_bad = 0;
  size_t field = 1, keep = 0;
  int in_quotes = 0, after_cr = 0;
  do {
    size_t i = 0;
    if (scan_next(f, keep) != 0) return -1;
    while (i < f->n) {
      unsigned char c = f->buf[i];
      int k = 1;
      if (c >= 0x80) {
        if (scan_cut(f, i)) break;
        k = csv_encoding_char(f->enc, f->buf + i, f->n - i);
        if (k <= 0) {
          if (line != last_bad) {
            if (out->bad_lines++ == 0) {
              out->line = line;
              out->field = field;
              out->offset = f->base + i;
              out->byte = c;
            }
            last_bad = line;
          }
          k = 1;
        }
      } else if (c == '\r' || c == '\n') {
        if (c == '\r' || !after_cr) line++;
        if (!in_quotes) field = 1;
      } else if (c == quote) {
        in_quotes = !in_quotes;
      } else if (c == delim && !in_quotes) {
        field++;
      }
      after_cr = c == '\r';
      i += (size_t)k;
    }
    keep = i;
  } while (f->n > 0 && !(f->eof && keep == f->n));
  return 0;
}

int csv_scan_encoding(const char *path, const csv_options *opt, csv_scan *out, char *err, size_t errlen) {
  scan_file f = {-1, opt && opt->encoding ? opt->encoding : CSV_ENC_UTF8, 0, NULL, 0, 0};
  long long first;
  int rc = -1;
  memset(out, 0, sizeof *out);
  if (f.enc < CSV_ENC_BYTES || f.enc > CSV_ENC_LATIN9) {
    seterr(err, errlen, "%s: invalid encoding", path);
    return -1;
  }
  f.buf = malloc(CSV_READER_CHUNK + 4);
  if (!f.buf) {
    seterr(err, errlen, "%s: out of memory", path);
    return -1;
  }
  f.fd = open(path, O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) goto done;
  first = scan_fast(&f);
  if (first == -2) goto done;
  if (first >= 0) { /* again from the start, now counting lines and fields */
    if (lseek(f.fd, 0, SEEK_SET) != 0) goto done;
    f.eof = 0;
    f.n = 0;
    f.base = 0;
    if (scan_detail(&f, opt && opt->delimiter ? opt->delimiter : ',', opt && opt->quote ? opt->quote : '"', out) != 0)
      goto done;
  }
  rc = 0;
done:
  if (rc != 0) seterr(err, errlen, "%s: %s", path, strerror(errno));
  if (f.fd >= 0) close(f.fd);
  free(f.buf);
  return rc;
}
