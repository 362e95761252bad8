/* csv_encoding.h - the character encodings a recipient list may be declared in, and their
 * conversion to UTF-8 (what every template, header and report takes).
 *
 *   CSV_ENC_BYTES   no declaration: bytes pass as they are, unchecked (the Lua API's default)
 *   CSV_ENC_UTF8    strict UTF-8: no overlong forms, surrogates or code points past U+10FFFF
 *   CSV_ENC_LATIN1  ISO-8859-1, except 0x80-0x9F: C1 control codes there are never a name's
 *                   letters, but the curly quotes and euro sign of windows-1252, so they are errors
 *   CSV_ENC_CP1252  windows-1252 (what Excel writes on Western Windows); 0x81, 0x8D, 0x8F, 0x90
 *                   and 0x9D are undefined, hence errors
 *   CSV_ENC_LATIN9  ISO-8859-15: Latin-1 with the euro sign, Š š Ž ž Œ œ Ÿ (0x80-0x9F as Latin-1)
 */
#ifndef MAILSHOT_CSV_ENCODING_H
#define MAILSHOT_CSV_ENCODING_H

#include <stddef.h>

enum { CSV_ENC_BYTES, CSV_ENC_UTF8, CSV_ENC_LATIN1, CSV_ENC_CP1252, CSV_ENC_LATIN9 };

/* An encoding by name, ignoring case: "utf-8" ("utf8"), "latin-1" ("latin1", "iso-8859-1"),
 * "windows-1252" ("cp1252"), "iso-8859-15" ("latin-9", "latin9").  -1 when unknown. */
int csv_encoding_lookup(const char *name);

/* The canonical name ("utf-8", "latin-1", "windows-1252", "iso-8859-15"; "bytes"). */
const char *csv_encoding_name(int enc);

/* The character at s[0..n): its length (1-4) when valid in enc, 0 when s[0] starts no valid
 * character, -1 when n is too short to tell (a UTF-8 sequence cut by the end of the buffer).
 * n must be at least 1. */
int csv_encoding_char(int enc, const unsigned char *s, size_t n);

/* Index of the first byte of s[0..n) that starts no valid character of enc (a UTF-8 sequence cut
 * by the end counts as invalid); n when all of s is valid.  ASCII runs are skipped 8 bytes at a
 * time. */
size_t csv_encoding_check(int enc, const unsigned char *s, size_t n);

/* Is converting needed at all?  False for BYTES and UTF8 (bytes are kept as they are). */
int csv_encoding_converts(int enc);

/* The length s[0..n) of enc, already checked valid, has in UTF-8. */
size_t csv_encoding_utf8_len(int enc, const unsigned char *s, size_t n);

/* Converts s[0..n) of enc, already checked valid, to UTF-8 in out (room for 3 * n bytes: the
 * euro sign is 3 bytes of UTF-8 for 1 of windows-1252).  Returns the bytes written.  BYTES and
 * UTF8 copy s as it is. */
size_t csv_encoding_to_utf8(int enc, const unsigned char *s, size_t n, unsigned char *out);

#endif
