/* csv_reader.h - a streaming CSV reader with a header row, over libcsv.
 *
 * The file is read in fixed CSV_READER_CHUNK-byte chunks; memory grows with the longest row, never with
 * the length of the file.  The first non-empty row is the header (read by csv_reader_open); every later
 * row is returned with the 1-based physical line it starts on, so a campaign can report
 * "recipients.csv:17: ..." even after quoted fields that contain newlines.
 *
 * Malformed rows do not stop the reader: csv_reader_next returns CSV_ROW_BAD with a message, and the
 * next call goes on with the following row (see "Resynchronisation" in csv_reader.c).
 *
 * What counts as a row (libcsv's rules, strict mode):
 *   - rows end at LF, CRLF or a lone CR outside quotes; each of those ends one physical line;
 *   - blank lines (nothing but spaces/tabs) are skipped, but they are counted;
 *   - spaces and tabs around an unquoted field are trimmed; inside quotes everything is kept;
 *   - "" inside a quoted field is one quote; a quote inside an unquoted field, or anything but a
 *     delimiter, spaces or the end of the line after a closing quote, makes the row bad;
 *   - a row must have exactly as many fields as the header ("a,b," has 3 fields: trailing empty
 *     fields count, so a ragged file is reported, not silently padded).
 *
 * Encodings: with opt->encoding set, each field (and column name) is checked as it is read, and one
 * in latin-1, windows-1252 or iso-8859-15 is converted to UTF-8; a field with a byte that is not a
 * character of the encoding makes the row bad ("field 2 (last_name) is not valid windows-1252: byte
 * 0x81 at byte 4 of the field").  csv_scan_encoding checks a whole file before it is sent.
 */
#ifndef MAILSHOT_CSV_READER_H
#define MAILSHOT_CSV_READER_H

#include <stddef.h>

#include "csv_encoding.h"

#define CSV_READER_CHUNK   (64 * 1024)         /* bytes read from the file at a time */
#define CSV_READER_MAX_ROW (16 * 1024 * 1024)  /* a longer field or row is CSV_ROW_BAD */

typedef struct csv_reader csv_reader;

typedef struct csv_options {
  unsigned char delimiter;  /* 0 means ','; any byte but CR, LF and the quote */
  unsigned char quote;      /* 0 means '"' */
  int encoding;             /* CSV_ENC_* (csv_encoding.h); 0 (CSV_ENC_BYTES): bytes as they are */
} csv_options;

typedef struct csv_field {
  const char *ptr;  /* NUL-terminated; a field with a NUL byte inside is never returned */
  size_t len;
} csv_field;

/* One result of csv_reader_next.  Pointers stay valid until the next call on the reader. */
typedef struct csv_row {
  const csv_field *fields;  /* CSV_ROW_OK: nfields fields, nfields == csv_reader_ncols() */
  size_t nfields;
  unsigned long line;       /* OK, BAD: 1-based physical line where the row starts */
  const char *error;        /* BAD, IOERR: what went wrong; NULL otherwise */
} csv_row;

enum {
  CSV_ROW_OK,     /* a row */
  CSV_ROW_BAD,    /* a malformed row, skipped: report it and call again */
  CSV_ROW_EOF,    /* no more rows; further calls return CSV_ROW_EOF again */
  CSV_ROW_IOERR   /* read error or out of memory; further calls return it again */
};

/* Opens path and reads its header row.  opt may be NULL for the defaults.
 * Returns NULL with "path: reason" in err (always NUL-terminated when errlen > 0) when the file cannot
 * be opened or read, the options are invalid, there is no header row (empty or blank file), the header
 * row is malformed, or a column name is empty or appears twice. */
csv_reader *csv_reader_open(const char *path, const csv_options *opt, char *err, size_t errlen);

/* Reads the next row into *out.  Returns CSV_ROW_OK, CSV_ROW_BAD, CSV_ROW_EOF or CSV_ROW_IOERR. */
int csv_reader_next(csv_reader *r, csv_row *out);

/* Closes the file and frees everything; r may be NULL. */
void csv_reader_close(csv_reader *r);

/* Header: column names, trimmed of surrounding whitespace, unique and non-empty. */
size_t csv_reader_ncols(const csv_reader *r);
const char *csv_reader_colname(const csv_reader *r, size_t i);  /* NULL when i >= ncols */

const char *csv_reader_path(const csv_reader *r);

/* The physical line of the last byte consumed so far (0 before any): after a row, the line it ends
 * on; at end of file, the number of lines in the file. */
unsigned long csv_reader_line(const csv_reader *r);

/* What csv_scan_encoding found. */
typedef struct csv_scan {
  unsigned long bad_lines;  /* physical lines with at least one byte that is no character of the encoding */
  unsigned long line;       /* the first such line (1-based), 0 when none */
  size_t field;             /* its field on that row, 1-based (counted by quotes and delimiters) */
  unsigned long long offset;/* the file offset of the first bad byte */
  unsigned char byte;       /* that byte */
} csv_scan;

/* Reads the whole file at path and checks every byte against opt->encoding (UTF-8 when 0), in
 * 64 KiB blocks, a word at a time through ASCII: a file without a bad byte is read once, fast.
 * Returns 0 with *out filled (out->bad_lines == 0: the file is clean), or -1 with "path: reason"
 * in err.  Lines and fields follow the reader's rules (LF, CRLF and a lone CR end a line; a
 * delimiter outside quotes ends a field), without its error recovery: for a well-formed file they
 * are the reader's. */
int csv_scan_encoding(const char *path, const csv_options *opt, csv_scan *out, char *err, size_t errlen);

/* Debug: bytes held by the buffers that grow with the longest row (the row buffer, its field table
 * and libcsv's field buffer); the fixed chunk buffer is not counted.  Lets tests prove that reading
 * a long file does not grow the reader. */
size_t csv_reader_buffer_size(const csv_reader *r);

/* Debug: how many name comparisons checking the header for duplicates took (a hash set: about one
 * per column, not one per pair of columns).  Lets tests prove that the check is linear. */
size_t csv_reader_header_probes(const csv_reader *r);

#endif
